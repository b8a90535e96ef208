"""Fixtures of the tunnel tests: ``make_worker`` (see ``harness.py``)."""

from tests.tunnel.harness import make_worker

__all__ = ["make_worker"]
