"""Suite-wide policy.

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
