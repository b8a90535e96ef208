"""The proxy's admin endpoints: readiness, the inventory of attached workers, and a status page.

Served by :class:`AdminServer` on ``--admin-bind`` (stdlib only: no extra is
needed), or mounted anywhere as the WSGI app :class:`AdminApp`:

* ``GET /healthz``: ``200 ready: ...`` when at least one worker tunnel can take
  requests (attached, not draining) and the proxy is not shutting down; else
  ``503 not ready: <reason>``.  For load balancers and orchestrators' probes.
* ``GET /workers``: the same state as JSON (:func:`status_document`).
* ``GET /status``: a small HTML page, HAProxy's stats page in spirit: one table,
  a row per worker and a row per tunnel, states in colour, no external asset,
  refreshed by the browser every ``refresh`` seconds (``?refresh=N``, 0 = off).
* ``GET /metrics``: Prometheus, when a metrics app is given (the CLI does when
  ``--metrics-bind`` names the same address).

A *worker* here is a client certificate (common name + serial): the proxy
knows a worker only by the certificate its tunnels present, so the tunnels of
several processes sharing one certificate are listed together, each with its
remote address.  Nothing here touches the request path: every figure is read
from :meth:`Proxy.workers`' snapshots when a page is asked for.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from ._version import __version__
from .options import parse_address

if TYPE_CHECKING:  # pragma: no cover
    from .proxy import Proxy
    from .registry import WorkerInfo

__all__ = ["AdminApp", "AdminServer", "render_status_page", "status_document"]

log = logging.getLogger("rhttp_wsgi.admin")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: Default refresh period of /status (seconds), and the most a query may ask for.
DEFAULT_REFRESH = 5
MAX_REFRESH = 3600
#: A certificate that expires within this many days is shown as a warning (the startup check's threshold).
EXPIRY_WARNING_DAYS = 14
#: Seconds an admin client has to send its request (one thread per connection).
CLIENT_TIMEOUT = 10.0


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _readiness(workers: Sequence[WorkerInfo], shutting_down: bool) -> tuple[bool, str]:
    if shutting_down:
        return False, "the proxy is shutting down"
    if not workers:
        return False, "no worker is attached"
    usable = sum(1 for w in workers if not w.draining)
    if not usable:
        return False, f"every attached tunnel is draining ({len(workers)})"
    return True, f"{usable} tunnel{'s' if usable != 1 else ''} attached"


def status_document(workers: Sequence[WorkerInfo], *, shutting_down: bool, now: float | None = None
                    ) -> dict[str, Any]:
    """The state /workers answers with, from worker snapshots (``Proxy.workers()``).

    ``workers``: one entry per certificate (common name + serial), in the order
    its first tunnel attached, with ``tunnels``: one entry per tunnel.
    """
    now = time.time() if now is None else now
    ready, reason = _readiness(workers, shutting_down)
    groups: dict[tuple[str | None, int], list[WorkerInfo]] = {}
    for w in workers:
        groups.setdefault((w.common_name, w.certificate.serial_number), []).append(w)
    out = []
    for (cn, _serial), tunnels in groups.items():
        cert = tunnels[0].certificate
        not_after = cert.not_valid_after_utc
        since = min(t.attached_at for t in tunnels)
        out.append({
            "common_name": cn,
            "serial": format(cert.serial_number, "x"),
            "sans": list(tunnels[0].sans),
            "issuer": cert.issuer.rfc4514_string(),
            "not_after": not_after.isoformat().replace("+00:00", "Z"),
            "expires_in_days": round((not_after.timestamp() - now) / 86400, 2),
            "attached_since": _iso(since),
            "attached_for_seconds": round(now - since, 1),
            "in_flight": sum(t.in_flight for t in tunnels),
            "total": sum(t.total for t in tunnels),
            "draining": all(t.draining for t in tunnels),
            "tunnels": [{
                "id": t.id,
                "remote_addr": _addr(t.remote_addr),
                "attached_since": _iso(t.attached_at),
                "attached_for_seconds": round(now - t.attached_at, 1),
                "tls_version": t.tls_version,
                "in_flight": t.in_flight,
                "max_concurrent_streams": t.max_concurrent_streams,
                "total": t.total,
                "draining": t.draining,
            } for t in tunnels],
        })
    return {
        "ready": ready,
        "reason": reason,
        "shutting_down": shutting_down,
        "version": __version__,
        "generated_at": _iso(now),
        "tunnels_attached": len(workers),
        "tunnels_draining": sum(1 for w in workers if w.draining),
        "workers": out,
    }


def _addr(addr: tuple[Any, ...]) -> str:
    if len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr[0]) if addr else ""


def _age(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


_STYLE = """
body{font-family:Arial,Helvetica,sans-serif;font-size:13px;margin:12px;color:#000;background:#fff}
h1{font-size:18px;margin:0 0 6px}
.banner{display:inline-block;padding:4px 10px;font-weight:bold;border:1px solid #888}
.ready{background:#c0ffc0}.notready{background:#ff9090}
.meta{color:#555;margin:6px 0 10px}
table{border-collapse:collapse;min-width:60%}
th{background:#20a0ff;color:#fff;text-align:left;padding:3px 8px;border:1px solid #999}
td{padding:2px 8px;border:1px solid #bbb;white-space:nowrap}
tr.worker td{background:#e8e8ff;font-weight:bold}
tr.tunnel td:first-child{padding-left:22px}
tr.up td.state{background:#c0ffc0}tr.drain td.state{background:#b0d0ff}
td.num{text-align:right}
tr td.warn{background:#ffd020}tr td.expired{background:#ff9090}
td.empty{color:#777;font-style:italic}
.legend span{display:inline-block;padding:1px 6px;margin-right:6px;border:1px solid #bbb}
"""

_COLUMNS = ("Worker / tunnel", "Serial", "Expires", "From", "Attached", "TLS", "In flight", "Max streams",
            "Total", "State")


def render_status_page(doc: dict[str, Any], refresh: int) -> str:
    """The /status page for a :func:`status_document`; every value from a peer is escaped."""
    e = html.escape
    rows: list[str] = []
    for w in doc["workers"]:
        days = w["expires_in_days"]
        expiry_class = "expired" if days < 0 else "warn" if days < EXPIRY_WARNING_DAYS else ""
        expiry = f"{w['not_after'][:10]} ({'expired' if days < 0 else f'{days:.0f} d'})"
        state = "DRAIN" if w["draining"] else "UP"
        rows.append(
            f'<tr class="worker {"drain" if w["draining"] else "up"}" data-cn="{e(w["common_name"] or "")}"'
            f' data-serial="{e(w["serial"])}">'
            f'<td>{e(w["common_name"] or "(no CN)")}</td><td>{e(w["serial"])}</td>'
            f'<td class="{expiry_class}">{e(expiry)}</td>'
            f'<td>{len(w["tunnels"])} tunnel{"s" if len(w["tunnels"]) != 1 else ""}</td>'
            f'<td title="{e(w["attached_since"])}">{_age(w["attached_for_seconds"])}</td><td></td>'
            f'<td class="num">{w["in_flight"]}</td><td></td><td class="num">{w["total"]}</td>'
            f'<td class="state">{state}</td></tr>')
        for t in w["tunnels"]:
            rows.append(
                f'<tr class="tunnel {"drain" if t["draining"] else "up"}" data-tunnel="{e(t["id"])}">'
                f'<td>{e(t["id"])}</td><td></td><td></td><td>{e(t["remote_addr"])}</td>'
                f'<td title="{e(t["attached_since"])}">{_age(t["attached_for_seconds"])}</td>'
                f'<td>{e(t["tls_version"])}</td><td class="num">{t["in_flight"]}</td>'
                f'<td class="num">{t["max_concurrent_streams"]}</td><td class="num">{t["total"]}</td>'
                f'<td class="state">{"DRAIN" if t["draining"] else "UP"}</td></tr>')
    if not rows:
        rows.append(f'<tr><td class="empty" colspan="{len(_COLUMNS)}">no worker is attached</td></tr>')
    head = "".join(f"<th>{c}</th>" for c in _COLUMNS)
    banner_class = "ready" if doc["ready"] else "notready"
    banner = ("READY" if doc["ready"] else "NOT READY") + ": " + doc["reason"]
    refresh_meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh > 0 else ""
    refresh_text = (f'refreshed every {refresh} s (<a href="?refresh=0">stop</a>)' if refresh > 0
                    else f'not refreshing (<a href="?refresh={DEFAULT_REFRESH}">refresh every'
                         f' {DEFAULT_REFRESH} s</a>)')
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        # the empty data: icon keeps browsers from asking for /favicon.ico at every refresh
        f'{refresh_meta}<link rel="icon" href="data:,"><title>rhttp-wsgi proxy status</title>'
        f"<style>{_STYLE}</style></head>\n<body>"
        f"<h1>rhttp-wsgi proxy</h1>"
        f'<div id="readiness" class="banner {banner_class}">{e(banner)}</div>'
        f'<div class="meta">version {e(doc["version"])} &middot; generated {e(doc["generated_at"])} &middot;'
        f' {doc["tunnels_attached"]} tunnel(s), {doc["tunnels_draining"]} draining &middot; {refresh_text}'
        ' &middot; <a href="workers">JSON</a> &middot; <a href="healthz">healthz</a></div>\n'
        f'<table id="workers"><thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(rows) +
        "\n</tbody></table>\n"
        '<p class="legend"><span style="background:#c0ffc0">UP: takes requests</span>'
        '<span style="background:#b0d0ff">DRAIN: finishing its requests, takes no new ones</span>'
        f'<span style="background:#ffd020">expires within {EXPIRY_WARNING_DAYS} days</span>'
        '<span style="background:#ff9090">expired / not ready</span></p>\n'
        "</body></html>\n"
    )


class AdminApp:
    """WSGI app of the admin endpoints of ``proxy`` (see the module doc); ``metrics``: a /metrics app."""

    def __init__(self, proxy: Proxy, metrics: WSGIApp | None = None) -> None:
        self.proxy = proxy
        self.metrics = metrics

    def document(self) -> dict[str, Any]:
        return status_document(self.proxy.workers(), shutting_down=self.proxy.shutting_down)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics" and self.metrics is not None:
            return self.metrics(environ, start_response)
        if path not in ("/", "/healthz", "/workers", "/status"):
            return _reply(start_response, "404 Not Found", "text/plain; charset=utf-8",
                          b"not found: try /healthz, /workers, /status\n", method)
        if method not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", "text/plain; charset=utf-8",
                          b"only GET and HEAD\n", method, [("Allow", "GET, HEAD")])
        if path == "/":
            start_response("302 Found", [("Location", "status"), ("Content-Length", "0")])
            return [b""]
        doc = self.document()
        if path == "/healthz":
            text = f"{'ready' if doc['ready'] else 'not ready'}: {doc['reason']}\n"
            return _reply(start_response, "200 OK" if doc["ready"] else "503 Service Unavailable",
                          "text/plain; charset=utf-8", text.encode(), method)
        if path == "/workers":
            return _reply(start_response, "200 OK", "application/json",
                          json.dumps(doc, indent=1).encode() + b"\n", method)
        page = render_status_page(doc, _refresh(environ.get("QUERY_STRING", "")))
        # No script, no outside asset: the page needs nothing the policy would have to allow.
        return _reply(start_response, "200 OK", "text/html; charset=utf-8", page.encode(), method,
                      [("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")])


def _refresh(query: str) -> int:
    values = parse_qs(query).get("refresh")
    if not values:
        return DEFAULT_REFRESH
    try:
        return max(0, min(MAX_REFRESH, int(values[-1])))
    except ValueError:
        return DEFAULT_REFRESH


def _reply(start_response: Callable[..., Any], status: str, ctype: str, body: bytes, method: str,
           extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
               ("X-Content-Type-Options", "nosniff"), *(extra or [])]
    start_response(status, headers)
    return [b""] if method == "HEAD" else [body]


class _Handler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT  # StreamRequestHandler applies it to the connection

    def log_message(self, format: str, *args: Any) -> None:
        # Probes every few seconds: not worth an INFO line each.
        log.debug("%s %s", self.address_string(), format % args)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a connection thread ends with its one request, or CLIENT_TIMEOUT
    allow_reuse_address = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind would ask DNS for the host's FQDN (socket.getfqdn): a
        # reverse lookup that can stall startup for seconds; the bound address is enough.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])
        self.setup_environ()


class AdminServer:
    """A small threaded HTTP/1.0 server for :class:`AdminApp` (stdlib ``wsgiref``; one request per connection)."""

    def __init__(self, app: WSGIApp, addr: str) -> None:
        host, port = parse_address(addr, option="admin_bind")
        server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6}) if ":" in host else _Server
        self._server: _Server = server_cls((host, port), _Handler)
        self._server.set_app(app)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        bound = self._server.server_address
        return str(bound[0]), int(bound[1])

    def start(self) -> tuple[str, int]:
        """Serve in a background thread; returns the bound (host, port)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, name="rhttp-admin", daemon=True)
            self._thread.start()
            log.info("admin endpoints on http://%s/status (/healthz, /workers)", _addr(self.address))
        return self.address

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5.0)
            self._thread = None
        self._server.server_close()
