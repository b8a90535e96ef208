"""``rhttp-wsgi demo``'s live page in a real browser (headless Chromium), through the real CLI.

The page must show the path its request took, render the server-sent events as they arrive and hold a
WebSocket (a pushed clock, an echo box) — all read back from the browser's DOM.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path

import pytest

from . import cdp, chromium

ROOT = Path(__file__).resolve().parents[2]
READY = 30.0
#: The SSE stream lasts about 5 s (10 ticks, 0.5 s apart); the clock ticks every second.
LIVE = 30.0

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def browser() -> str:
    binary = chromium.find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    pytest.importorskip("websockets", reason="websockets is not installed (pip install -e '.[test]')")
    return binary


class DemoCLI:
    """``python -m rhttp_wsgi demo --port 0``, its log collected by a reader thread."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "rhttp_wsgi", "demo", "--port", "0"], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.url: str | None = None
        self._reader = threading.Thread(target=self._read, name="demo-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line)
                m = re.search(r"open (http://\S+?)/  \(certificates in", line)
                if m:
                    self.url = m.group(1)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_url(self) -> str:
        with self.cond:
            self.cond.wait_for(lambda: self.url is not None or self.proc.poll() is not None, READY)
        assert self.url, "the demo did not start:\n" + self.log()
        return self.url

    def log(self) -> str:
        with self.cond:
            return "".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise
        finally:
            self._reader.join(5)
        return code


@contextmanager
def demo_cli() -> Iterator[DemoCLI]:
    demo = DemoCLI()
    try:
        yield demo
    finally:
        if demo.proc.poll() is None:
            demo.stop()


@contextmanager
def live_page(binary: str, profile: Path, url: str) -> Iterator[cdp.PageSession]:
    with chromium.browsing(binary, profile, url):
        session = cdp.page_session(profile, url)
        try:
            yield session
        finally:
            session.close()


#: The page worked: SSE finished after all its events, the WebSocket echoed the page's hello and the
#: server's clock ticked at least twice.
ALL_LIVE = ("document.querySelector('#sse').dataset.state === 'done'"
            " && document.querySelector('#ws-log li.echo') !== null"
            " && Number(document.querySelector('#ws-clock').dataset.ticks) >= 2")
#: Or it cannot work any more: no point waiting the rest of LIVE.
BROKEN = ("['error', 'closed'].includes(document.querySelector('#ws').dataset.state)"
          " || document.querySelector('#sse').dataset.state === 'error'")


class PageDOM(HTMLParser):
    """What the test checks, as the browser's DOM has it."""

    def __init__(self) -> None:
        super().__init__()
        self.hops: dict[str, list[str]] = {}
        self.states: dict[str, str] = {}
        self.sse: list[str] = []
        self.echoes: list[str] = []
        self.clock_ticks = 0
        self.ws_stream = ""
        self._hop = ""
        self._list = ""
        self._capture: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self._capture = None
        if tag == "ul":
            self._list = a.get("id", "")
        elif tag == "li" and a.get("data-hop"):
            self._hop = a["data-hop"]
            self.hops[self._hop] = []
        elif tag == "li" and self._list == "sse-log":
            self._capture = "sse"
        elif tag == "li" and "echo" in a.get("class", "").split():
            self.echoes.append(a.get("data-text", ""))
        elif tag == "dd" and self._hop:
            self._capture = "hop"
        elif tag == "section" and a.get("id") in ("sse", "ws"):
            self.states[a["id"]] = a.get("data-state", "")
        elif a.get("id") == "ws-clock":
            self.clock_ticks = int(a.get("data-ticks") or 0)
        elif a.get("id") == "ws-stream":
            self._capture = "ws-stream"

    def handle_endtag(self, tag: str) -> None:
        if tag == "ul":
            self._list = ""
        elif tag == "ol":
            self._hop = ""
        self._capture = None

    def handle_data(self, data: str) -> None:
        if self._capture == "hop":
            self.hops[self._hop].append(data)
        elif self._capture == "sse":
            self.sse.append(data)
        elif self._capture == "ws-stream":
            self.ws_stream += data


def test_demo_page_shows_the_path_streams_sse_and_holds_a_websocket(browser: str, tmp_path: Path) -> None:
    with demo_cli() as demo:
        url = demo.wait_url() + "/"
        with live_page(browser, tmp_path / "profile", url) as page:
            page.wait_for(f"({ALL_LIVE}) || {BROKEN}", LIVE)
            settled = page.evaluate(ALL_LIVE)
            dom = PageDOM()
            dom.feed(page.dom())
            assert settled, f"page not live within {LIVE}s: states {dom.states}, {len(dom.sse)} events, " \
                            f"echoes {dom.echoes}, clock {dom.clock_ticks}\n{demo.log()}"
            # the echo box, used like a person would
            page.evaluate("document.querySelector('#ws-text').value = 'typed into the box';"
                          " document.querySelector('#ws-form button').click()")
            typed = page.wait_for("document.querySelector('#ws-log li.echo[data-text=\"typed into the box\"]')", 10)
            assert typed, "the echo box's message did not come back"
            # Ctrl-C with the page open: the demo says goodbye on the socket (1001) and exits cleanly
            assert demo.stop() == 0, demo.log()
            assert page.wait_for("document.querySelector('#ws').dataset.code === '1001'", 10), page.dom()

    assert list(dom.hops) == ["client", "proxy", "tunnel", "worker"]
    assert dom.hops["client"][0] == "127.0.0.1"
    assert dom.hops["proxy"][1] == "CN=server"
    tunnel, dialled_from, carried = dom.hops["tunnel"]
    assert re.fullmatch(r"w\d+", tunnel) and re.fullmatch(r"127\.0\.0\.1:\d+", dialled_from)
    assert re.fullmatch(r"HTTP/2 stream \d+", carried)
    assert dom.hops["worker"][0] == "CN=demo-worker"
    assert dom.states == {"sse": "done", "ws": "open"}
    # the events, newest first, each as it arrived
    assert [re.sub(r" at .*", "", e) for e in dom.sse] == [f"tick {i}" for i in reversed(range(10))]
    assert dom.echoes == ["hello from the browser"]
    assert re.fullmatch(r"HTTP/2 stream \d+ on tunnel w\d+", dom.ws_stream), dom.ws_stream
    assert dom.clock_ticks >= 2

