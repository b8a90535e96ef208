"""Fixtures for the HAProxy end-to-end tests (``@pytest.mark.haproxy``).

HAProxy is looked up once per session (``HAPROXY_BIN``, then ``PATH``, then
``/opt/rhttp-haproxy/bin/haproxy``).  When none is usable the tests skip with
the reason, except under CI (``CI=true``) where that is a failure: a CI run
that silently skipped its end-to-end tests would prove nothing.

The version used is printed in the report header, logged once, attached to
every test as a user property (``--junitxml`` records it) and repeated in the
terminal summary.

Each test gets a :class:`~haproxy_fixtures.Lab` (``lab`` fixture): its own PKI
under ``tmp_path``, its own ports, its own HAProxy processes and worker pools,
all stopped at teardown.  When a test fails, the HAProxy logs are attached to
its report as extra sections.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .haproxy_fixtures import HAProxyBinary, Lab, find_haproxy, in_ci

log = logging.getLogger("tests.interop")


def pytest_report_header(config: pytest.Config) -> list[str]:
    found = find_haproxy()
    if found.binary is not None:
        return [f"haproxy: {found.binary.describe()}"]
    mode = "FAIL (CI=true)" if in_ci() else "SKIP"
    return [f"haproxy: not available, HAProxy tests will {mode}: {found.reason}"]


@pytest.fixture(scope="session")
def haproxy_bin(record_testsuite_property: Callable[[str, object], None]) -> HAProxyBinary:
    found = find_haproxy()
    record_testsuite_property(
        "haproxy_version", found.binary.describe() if found.binary else f"unavailable: {found.reason}")
    if found.binary is None:
        if in_ci():
            pytest.fail(f"HAProxy is required under CI (CI=true): {found.reason}", pytrace=False)
        pytest.skip(found.reason)
    log.warning("HAProxy end-to-end tests run against %s", found.binary.describe())
    return found.binary


@pytest.fixture()
def lab(request: pytest.FixtureRequest, tmp_path: Path, haproxy_bin: HAProxyBinary) -> Iterator[Lab]:
    request.node.user_properties.append(("haproxy_version", haproxy_bin.version))
    rhttp_logger = logging.getLogger("rhttp_wsgi")
    old_level = rhttp_logger.level
    rhttp_logger.setLevel(logging.INFO)  # captured and shown for failing tests
    the_lab = Lab(haproxy_bin, tmp_path / "lab")
    try:
        yield the_lab
    finally:
        problems = the_lab.close()
        rhttp_logger.setLevel(old_level)
        if problems:
            logs = "\n".join(f"----- {title} -----\n{text}" for title, text in the_lab.logs())
            pytest.fail("teardown: " + "; ".join(problems) + "\n" + logs, pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        the_lab = getattr(item, "funcargs", {}).get("lab")
        if isinstance(the_lab, Lab):
            for title, text in the_lab.logs():
                report.sections.append((title, text))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    stats = terminalreporter.stats
    ran = any(
        "haproxy" in getattr(rep, "keywords", {})
        for key in ("passed", "failed", "error")
        for rep in stats.get(key, [])
    )
    if not ran:
        return
    found = find_haproxy()
    if found.binary is not None:
        terminalreporter.write_line(f"HAProxy end-to-end tests ran against {found.binary.describe()}")
