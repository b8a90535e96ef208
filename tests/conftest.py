"""Suite-wide policy.

Layout, by what a test runs against:

* ``unit/``: sans-I/O -- the HTTP/2 core, HPACK, the HTTP rules, options,
  the environ, PKI minting; no socket, no thread (enforced there).
* ``tunnel/``: a real ``Tunnel`` (its reader and writer threads) over a
  socketpair, against an in-memory peer: the worker against the raw-frame
  proxy of ``h2peer.py`` (``make_worker``), the proxy's side against h2.
* ``integration/``: real sockets, threads, signals and subprocesses on
  127.0.0.1: the proxy and worker pools over mTLS, the public server, the CLI,
  the examples (the raw-frame *worker* of ``h2peer.py`` plays a hostile worker).
* ``interop/``: other people's servers: HAProxy, gunicorn, waitress, werkzeug.

Policies:

* Under CI (``CI=true``) a skipped test is a failure: a dependency CI did not
  install is a test that does not exist.  A skip whose reason starts with
  ``optional:`` is exempt (a feature this platform does not have).
* Every test must leave no thread behind (checked with a bounded wait).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "optional:" not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped under CI (a missing dependency is a failure here): {reason}"


def _live_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


@pytest.fixture(autouse=True)
def no_thread_leaks(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    before = _live_threads()
    yield
    if request.node.get_closest_marker("allow_thread_leak"):
        return
    deadline = time.monotonic() + 10.0
    while True:
        leaked = [t for t in _live_threads() - before if t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, f"threads left behind: {[t.name for t in leaked]}"
