"""Fixtures shared by the unit tests."""

from tests.unit.peer import make_worker

__all__ = ["make_worker"]
