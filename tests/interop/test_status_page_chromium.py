"""The proxy's /status page in a real browser (headless Chromium): it lists the workers and refreshes itself."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from rhttp_wsgi.admin import AdminApp, AdminServer
from rhttp_wsgi.pki import DemoPKI
from rhttp_wsgi.proxy import Proxy
from rhttp_wsgi.worker import WorkerPool

from . import chromium

WAIT = 10.0

pytestmark = pytest.mark.timeout(120)


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


@pytest.fixture(scope="module")
def browser() -> str:
    binary = chromium.find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    return binary


class CountingApp:
    """Counts the browser's GET /status requests (the refreshes) around the admin app."""

    def __init__(self, app: AdminApp) -> None:
        self.app = app
        self.status_gets = 0
        self.cond = threading.Condition()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/status" and "HeadlessChrome" in environ.get("HTTP_USER_AGENT", ""):
            with self.cond:
                self.status_gets += 1
                self.cond.notify_all()
        return self.app(environ, start_response)


class Lab:
    def __init__(self, tmp_path: Path) -> None:
        self.pki = DemoPKI.create(tmp_path / "pki", worker_names=("alpha", "beta"))
        self.proxy = Proxy(cert=str(self.pki.server_cert), key=str(self.pki.server_key),
                           workers_ca=str(self.pki.ca_cert), tunnel_bind="127.0.0.1:0", public_bind="127.0.0.1:0")
        _, self.tport = self.proxy.start_tunnels()
        self.counting = CountingApp(AdminApp(self.proxy))
        self.admin = AdminServer(self.counting, "127.0.0.1:0")
        host, port = self.admin.start()
        self.base = f"http://{host}:{port}"
        self.pools: list[WorkerPool] = []

    def worker(self, name: str, connections: int) -> None:
        cert, key = self.pki.workers[name]
        pool = WorkerPool(hello, proxy=f"127.0.0.1:{self.tport}", cert=str(cert), key=str(key),
                          ca=str(self.pki.ca_cert), connections=connections)
        self.pools.append(pool)
        pool.start()
        assert pool.wait_ready(WAIT)

    def close(self) -> None:
        for p in self.pools:
            p.shutdown(5)
        self.proxy.shutdown(5)
        self.admin.stop()


@pytest.fixture()
def status_lab(tmp_path: Path) -> Iterator[Lab]:
    the_lab = Lab(tmp_path)
    try:
        yield the_lab
    finally:
        the_lab.close()


class Rows(HTMLParser):
    """The rows of table#workers, as the browser's DOM has them, and the page's meta refresh."""

    def __init__(self) -> None:
        super().__init__()
        self.in_table = False
        self.rows: list[dict[str, str]] = []
        self.refresh: str | None = None
        self.readiness = ""
        self._in_readiness = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table" and a.get("id") == "workers":
            self.in_table = True
        elif tag == "tr" and self.in_table:
            self.rows.append(a)
        elif tag == "meta" and a.get("http-equiv", "").lower() == "refresh":
            self.refresh = a.get("content")
        self._in_readiness = a.get("id") == "readiness"

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.in_table = False

    def handle_data(self, data: str) -> None:
        if self._in_readiness:
            self.readiness += data


def test_chromium_renders_the_worker_table_from_the_dom(browser: str, status_lab: Lab, tmp_path: Path) -> None:
    status_lab.worker("alpha", 2)
    status_lab.worker("beta", 1)
    assert status_lab.proxy.wait_for_workers(3, WAIT)
    dom = chromium.run(browser, tmp_path / "profile", "--dump-dom", status_lab.base + "/status").decode()
    page = Rows()
    page.feed(dom)
    workers = [r for r in page.rows if "worker" in r.get("class", "").split()]
    tunnels = [r for r in page.rows if "tunnel" in r.get("class", "").split()]
    assert sorted(r["data-cn"] for r in workers) == ["alpha", "beta"]
    assert len(tunnels) == 3 and all(r["class"] == "tunnel up" for r in tunnels)
    assert {r["data-tunnel"] for r in tunnels} == {w.id for w in status_lab.proxy.workers()}
    assert page.readiness == "READY: 3 tunnels attached"
    assert page.refresh == "5"


def test_chromium_refreshes_the_status_page_by_itself(browser: str, status_lab: Lab, tmp_path: Path) -> None:
    status_lab.worker("alpha", 1)
    with chromium.browsing(browser, tmp_path / "profile", status_lab.base + "/status?refresh=1"):
        with status_lab.counting.cond:
            # the first load and two refreshes the page asked for (1 s apart), nothing else asked it to
            refreshed = status_lab.counting.cond.wait_for(lambda: status_lab.counting.status_gets >= 3, 30)
    assert refreshed, f"only {status_lab.counting.status_gets} GET /status in 30 s"
