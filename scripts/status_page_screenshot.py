"""Regenerate docs/status-page.png: the proxy's /status page in headless Chromium, with a few workers.

    python scripts/status_page_screenshot.py [OUTPUT.png]

Everything runs in this process on 127.0.0.1 (a throwaway PKI, a proxy, three
worker tunnels, one of them draining a request) and is stopped before it exits.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rhttp_wsgi.admin import AdminApp, AdminServer  # noqa: E402
from rhttp_wsgi.pki import DemoPKI  # noqa: E402
from rhttp_wsgi.proxy import Proxy  # noqa: E402
from rhttp_wsgi.worker import WorkerPool  # noqa: E402
from tests.interop import chromium  # noqa: E402

release = threading.Event()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    if environ["PATH_INFO"] == "/report":
        release.wait(30)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def main(out: Path) -> int:
    binary = chromium.find_chromium()
    if binary is None:
        print("chromium not found (apt-get install chromium)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        pki = DemoPKI.create(Path(tmp), worker_names=("web-1",))
        pki.issue_worker("reports", days=9)
        proxy = Proxy(cert=str(pki.server_cert), key=str(pki.server_key), workers_ca=str(pki.ca_cert),
                      tunnel_bind="127.0.0.1:0", public_bind="127.0.0.1:0", selector="cn:X-Tenant")
        _, tport = proxy.start_tunnels()
        host, port = proxy.start_public()
        admin = AdminServer(AdminApp(proxy), "127.0.0.1:0")
        ahost, aport = admin.start()
        pools = []
        slow = None
        try:
            for name, n in (("web-1", 2), ("reports", 1)):
                cert, key = pki.workers[name]
                pool = WorkerPool(app, proxy=f"127.0.0.1:{tport}", cert=str(cert), key=str(key),
                                  ca=str(pki.ca_cert), connections=n)
                pools.append(pool)
                pool.start()
                pool.wait_ready(10)
            proxy.wait_for_workers(3, 10)
            for i in range(60):
                tenant = "reports" if i % 4 == 0 else "web-1"
                urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/", headers={"X-Tenant": tenant}),
                                       timeout=10).read()
            # one request held by the app on the reports worker's tunnel, which then drains
            (reports,) = [w for w in proxy.workers() if w.common_name == "reports"]
            slow = threading.Thread(target=lambda: urllib.request.urlopen(
                urllib.request.Request(f"http://{host}:{port}/report", headers={"X-Tenant": "reports"}),
                timeout=30).read())
            slow.start()
            deadline = time.monotonic() + 10
            while not any(w.in_flight for w in proxy.workers() if w.id == reports.id):
                if time.monotonic() > deadline:
                    raise SystemExit("the held request did not reach the reports worker")
                time.sleep(0.01)
            reports.tunnel.drain()
            proxy.wait_for_workers(4, 10)  # the worker redialled: a new tunnel next to the draining one
            chromium.run(binary, Path(tmp) / "profile", f"--screenshot={out}", "--window-size=1100,300",
                         "--hide-scrollbars", f"http://{ahost}:{aport}/status")
        finally:
            release.set()
            if slow is not None:
                slow.join(10)
            for pool in pools:
                pool.shutdown(5)
            proxy.shutdown(5)
            admin.stop()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "status-page.png"))
