"""A minimal Chrome DevTools Protocol client for tests that must watch a live page (not just its first DOM).

``chromium.browsing`` starts the browser with ``--remote-debugging-port=0``; Chromium then writes the port
it picked to ``DevToolsActivePort`` in the profile directory.  :func:`page_session` finds the page target
showing a URL and talks CDP to it over its WebSocket (the ``websockets`` sync client, a test dependency).
Every wait is bounded.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

#: How long to wait for the browser to write its port and list the page.
STARTUP = 20.0


class CDPError(AssertionError):
    pass


class PageSession:
    """Commands to one page target; events are read and dropped while waiting for an answer."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self._stack = ExitStack()
        self._ws = self._stack.enter_context(connect(ws_url, max_size=None, open_timeout=STARTUP))
        self._ids = itertools.count(1)

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CDPError(f"no answer to {method} within {timeout}s")
            msg = json.loads(self._ws.recv(timeout=remaining))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error']}")
                result: dict[str, Any] = msg.get("result", {})
                return result

    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """The value of ``expression`` (a promise is awaited) in the page."""
        result = self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            raise CDPError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, condition: str, timeout: float) -> bool:
        """Poll the JS ``condition`` in the page (every 50 ms) until it holds or ``timeout`` passes."""
        script = f"""new Promise((resolve) => {{
            const end = Date.now() + {int(timeout * 1000)};
            (function check() {{
                let ok = false;
                try {{ ok = Boolean({condition}); }} catch (e) {{ ok = false; }}
                if (ok || Date.now() > end) resolve(ok); else setTimeout(check, 50);
            }})();
        }})"""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return bool(self.evaluate(script, timeout=timeout + 10))
            except CDPError as e:
                # The page navigated (the target showed up while its first load was committing): the
                # old document's promise died with it; ask the new one.
                if "context was destroyed" not in str(e) or time.monotonic() > deadline:
                    raise

    def dom(self) -> str:
        return str(self.evaluate("document.documentElement.outerHTML"))

    def screenshot(self, width: int, height: int) -> bytes:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        self._stack.close()


def page_session(profile: Path, url: str) -> PageSession:
    """A session on the page target showing ``url`` in the browser using ``profile``."""
    deadline = time.monotonic() + STARTUP
    port_file = profile / "DevToolsActivePort"
    last: Any = None
    while time.monotonic() < deadline:
        try:
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                targets = json.load(r)
        except (OSError, ValueError, IndexError) as e:
            last = e  # not written yet, or the browser is still starting
        else:
            last = targets
            for target in targets:
                if target.get("type") == "page" and target.get("url", "").startswith(url):
                    return PageSession(target["webSocketDebuggerUrl"])
        time.sleep(0.05)  # the browser writes the file and opens the page on its own schedule
    raise CDPError(f"no page showing {url} within {STARTUP}s (last: {last!r})")
