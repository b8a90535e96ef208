"""Regenerate docs/demo-page.png: ``rhttp-wsgi demo``'s live page in headless Chromium, once it is live.

    python scripts/demo_page_screenshot.py [OUTPUT.png]

Runs the real CLI (``python -m rhttp_wsgi demo --port 0``), opens the page, waits until the server-sent
events finished and the WebSocket echoed and ticked, types into the echo box, then captures the page and
stops everything.  Needs ``chromium`` and the ``websockets`` package (a test dependency).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.interop import chromium  # noqa: E402
from tests.interop.test_demo_page_chromium import ALL_LIVE, LIVE, demo_cli, live_page  # noqa: E402

WIDTH, HEIGHT = 1200, 720


def main(out: Path) -> int:
    binary = chromium.find_chromium()
    if binary is None:
        print("chromium not found (apt-get install chromium)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp, demo_cli() as demo:
        url = demo.wait_url() + "/"
        with live_page(binary, Path(tmp) / "profile", url) as page:
            page.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                      mobile=False)
            if not page.wait_for(ALL_LIVE, LIVE) and "--anyway" not in sys.argv:
                print("the page did not go live:\n" + demo.log(), file=sys.stderr)
                return 1
            page.evaluate("document.querySelector('#ws-text').value = 'hello through the tunnel';"
                          " document.querySelector('#ws-form button').click()")
            page.wait_for("document.querySelectorAll('#ws-log li.echo').length >= 2", 10)
            page.wait_for("Number(document.querySelector('#ws-clock').dataset.ticks) >= 6", 10)
            png = page.screenshot(WIDTH, HEIGHT)
        demo.stop()
    out.write_bytes(png)
    print(f"wrote {out} ({len(png)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "demo-page.png"))
