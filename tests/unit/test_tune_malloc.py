"""``rhttp-wsgi worker|proxy`` tune glibc malloc for the tunnels' transient buffers (see cli.tune_malloc)."""

from __future__ import annotations

import platform

import pytest

from rhttp_wsgi.cli import tune_malloc


@pytest.mark.parametrize("env", [{"RHTTP_MALLOC_TUNING": "0"}, {"MALLOC_ARENA_MAX": "2"},
                                 {"MALLOC_MMAP_THRESHOLD_": "131072"}])
def test_operator_settings_win(env: dict[str, str]) -> None:
    assert tune_malloc(env) is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc-only")
def test_applies_on_glibc() -> None:
    assert tune_malloc({}) is True
