"""The sample WSGI app served by ``rhttp-wsgi demo``: a live page, an echo endpoint, an SSE stream, a WebSocket.

The page (``/``) shows the path its own request took — public client, proxy, tunnel, worker — with the
identities each hop verified and the HTTP/2 stream id, renders ``/events`` (server-sent events) as they
arrive, and opens a WebSocket on ``/ws`` (a clock the server pushes, and an echo box).  Everything here
is the standard library plus rhttp-wsgi itself, so it runs after a plain ``pip install .``; the WebSocket
speaks RFC 6455 through :mod:`rhttp_wsgi._demo_websocket` on the socket the worker offers for an upgrade.

``rhttp-wsgi demo`` runs the proxy in the same process and routes through :class:`RouteLog`, a selector
that remembers which tunnel the proxy picked for each request id, so the page can name it; anywhere else
(``rhttp-wsgi worker rhttp_wsgi.demo_app:app``) that hop says what the worker alone knows.
"""

from __future__ import annotations

import html
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ._demo_websocket import CLOSE_GOING_AWAY, WebSocket, is_upgrade, upgrade_socket, valid_key
from .tls import peer_common_name

log = logging.getLogger("rhttp_wsgi.demo")

#: SSE: this many ticks, this far apart, then an ``end`` event (the page then stops listening).
SSE_TICKS = 10
SSE_INTERVAL = 0.5
#: The WebSocket clock pushes once a second and stops (closing the socket, 1001) after this many.
CLOCK_TICKS = 600
CLOCK_INTERVAL = 1.0
#: How long the app thread waits for the clock thread once the socket is over.
CLOCK_JOIN = 5.0


@dataclass(frozen=True)
class Route:
    """The tunnel the proxy chose for one request, as the proxy names it."""

    worker_id: str
    common_name: str | None
    remote_addr: str


class RouteLog:
    """A proxy selector that delegates to ``inner`` and remembers its choice per request id (the last
    ``size``), so the demo app, in the same process, can show which tunnel carried its request."""

    def __init__(self, inner: Callable[[Any, Sequence[Any]], Any], size: int = 1024) -> None:
        self.inner = inner
        self.size = size
        self._routes: OrderedDict[str, Route] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, environ: Any, workers: Sequence[Any]) -> Any:
        worker = self.inner(environ, workers)
        rid = environ.get("rhttp.request_id")
        if worker is not None and rid:
            addr = worker.remote_addr
            route = Route(worker.id, worker.common_name, f"{addr[0]}:{addr[1]}" if addr else "")
            with self._lock:
                self._routes[str(rid)] = route
                while len(self._routes) > self.size:
                    self._routes.popitem(last=False)
        return worker

    def lookup(self, request_id: str | None) -> Route | None:
        if not request_id:
            return None
        with self._lock:
            return self._routes.get(str(request_id))


@dataclass(frozen=True)
class Hop:
    """One step of the path on the page: ``key`` (data-hop), a title, and label/value lines."""

    key: str
    title: str
    facts: tuple[tuple[str, str], ...]


def request_path(environ: dict[str, Any], route: Route | None, worker_name: str | None) -> list[Hop]:
    """The hops of this request, from what the environ (and the proxy's route, when known) says."""
    stream = environ.get("rhttp.stream_id")
    proxy_cn = peer_common_name(environ.get("rhttp.peer_certificate"))
    public_host = environ.get("HTTP_X_FORWARDED_HOST") or environ.get("HTTP_HOST") or ""
    scheme = environ.get("HTTP_X_FORWARDED_PROTO") or environ.get("wsgi.url_scheme", "")
    client = environ.get("REMOTE_ADDR", "")
    cn = (route.common_name if route else None) or worker_name
    return [
        Hop("client", "Public client", (("address", client or "?"),
                                        ("asked for", f"{scheme}://{public_host}{environ.get('PATH_INFO', '/')}"))),
        Hop("proxy", "Proxy", (("listens on", public_host or "?"),
                               ("certificate", f"CN={proxy_cn}" if proxy_cn else "(not a TLS tunnel)"),
                               ("request id", str(environ.get("rhttp.request_id", ""))))),
        Hop("tunnel", "Tunnel", (("tunnel", route.worker_id if route else "(known to the proxy)"),
                                 ("dialled from", route.remote_addr if route else "the worker, outbound"),
                                 ("carried as", f"HTTP/2 stream {stream}" if stream is not None else "?"))),
        Hop("worker", "Worker", (("identity", f"CN={cn}" if cn else "?"),
                                 ("process", f"{socket.gethostname()} pid {os.getpid()}"),
                                 ("thread", threading.current_thread().name))),
    ]


STYLE = """
:root{--bg:#f6f7f9;--card:#fff;--ink:#1d2430;--mute:#687385;--line:#e1e5eb;--accent:#2563eb;--ok:#16a34a;
--warn:#d97706;--bad:#dc2626;font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
*{box-sizing:border-box}body{margin:0;background:var(--bg);color:var(--ink);font-size:15px}
header{background:#111827;color:#f9fafb;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:6px 0 0;color:#cbd5e1;max-width:60em;line-height:1.4}
main{padding:20px 28px;display:grid;gap:18px;grid-template-columns:1fr 1fr;max-width:1200px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 16px}
section.wide{grid-column:1/-1}h2{font-size:15px;margin:0 0 10px;display:flex;gap:8px;align-items:center}
ol.path{list-style:none;margin:0;padding:0;display:flex;gap:0;align-items:stretch;flex-wrap:wrap}
ol.path li.hop{flex:1 1 0;min-width:190px;border:1px solid var(--line);border-radius:8px;padding:10px 12px;
background:#fbfcfe;position:relative;margin-right:26px}
ol.path li.hop:not(:last-child)::after{content:"\\2192";position:absolute;right:-22px;top:40%;color:var(--accent);
font-weight:700}
ol.path li.hop:last-child{margin-right:0}.hop b{display:block;margin-bottom:4px;color:var(--accent)}
.hop dl{margin:0;display:grid;grid-template-columns:auto 1fr;gap:2px 8px;font-size:13px}
.hop dt{color:var(--mute)}.hop dd{margin:0;font-family:ui-monospace,Menlo,monospace;word-break:break-all}
.badge{font-size:12px;font-weight:600;border-radius:99px;padding:2px 9px;background:#e5e7eb;color:#374151}
[data-state=live] .badge,[data-state=open] .badge{background:#dcfce7;color:var(--ok)}
[data-state=done] .badge{background:#dbeafe;color:var(--accent)}
[data-state=error] .badge,[data-state=closed] .badge{background:#fee2e2;color:var(--bad)}
ul.log{list-style:none;margin:0;padding:0;max-height:236px;overflow:auto;font-family:ui-monospace,Menlo,monospace;
font-size:13px}ul.log li{padding:3px 0;border-bottom:1px dashed var(--line)}
ul.log li.new{animation:flash 1s}@keyframes flash{from{background:#fef9c3}to{background:transparent}}
.clock{font:600 30px ui-monospace,Menlo,monospace;margin:4px 0 10px}.mute{color:var(--mute);font-size:13px}
form{display:flex;gap:8px;margin:8px 0}input{flex:1;padding:6px 8px;border:1px solid var(--line);border-radius:6px}
button{padding:6px 14px;border:0;border-radius:6px;background:var(--accent);color:#fff;font-weight:600}
code{font-family:ui-monospace,Menlo,monospace;font-size:13px;background:#eef2f7;padding:1px 5px;border-radius:4px}
footer{padding:0 28px 24px;color:var(--mute);font-size:13px}
"""

SCRIPT = """
const $ = (id) => document.getElementById(id);
function add(list, text, cls) {
  const li = document.createElement('li'); li.textContent = text; li.className = 'new ' + (cls || '');
  list.prepend(li); return li;
}
function state(id, s, label) { $(id).dataset.state = s; $(id).querySelector('.badge').textContent = label || s; }

// Server-sent events: each tick as it arrives; the server ends with an "end" event (else EventSource redials).
const sse = new EventSource('events');
let ticks = 0;
sse.onopen = () => state('sse', 'live');
sse.onmessage = (e) => { ticks += 1; add($('sse-log'), e.data); $('sse-count').textContent = ticks; };
sse.addEventListener('end', () => { sse.close(); state('sse', 'done', 'done: ' + ticks + ' events'); });
sse.onerror = () => { if ($('sse').dataset.state !== 'done') state('sse', 'error'); sse.close(); };

// WebSocket: the server pushes a clock and echoes what the box sends; the page says hello on open.
const base = location.pathname.replace(/[^/]*$/, '');
const wsUrl = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + base + 'ws';
let ws;
try { ws = new WebSocket(wsUrl); } catch (err) { state('ws', 'error', 'error: ' + err); }
if (ws) {
  ws.onopen = () => { state('ws', 'open'); ws.send('hello from the browser'); };
  ws.onmessage = (e) => {
    const m = JSON.parse(e.data);
    if (m.type === 'hello') {
      $('ws-stream').textContent = 'HTTP/2 stream ' + m.stream + ' on tunnel ' + m.tunnel;
    } else if (m.type === 'clock') {
      $('ws-clock').textContent = m.time;
      $('ws-clock').dataset.ticks = m.n;
    } else if (m.type === 'echo') {
      add($('ws-log'), m.text + '  (echoed at ' + m.time + ')', 'echo').dataset.text = m.text;
    }
  };
  ws.onclose = (e) => {
    state('ws', 'closed', 'closed: ' + e.code + (e.reason ? ' (' + e.reason + ')' : ''));
    $('ws').dataset.code = e.code;
  };
  ws.onerror = () => state('ws', 'error');
  $('ws-form').onsubmit = (e) => {
    e.preventDefault();
    const text = $('ws-text').value;
    if (ws.readyState === WebSocket.OPEN && text) { ws.send(text); $('ws-text').value = ''; }
  };
}
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>rhttp-wsgi demo</title><link rel="icon" href="data:,"><style>{style}</style></head>
<body>
<header><h1>Hello from behind the tunnel</h1>
<p>This page was served by a WSGI app in a worker that has no inbound port. The worker dialled the proxy
over mutual TLS; your request came back down that tunnel as an HTTP/2 stream.</p></header>
<main>
<section class="wide" id="path-card"><h2>The path of this request</h2>
<ol class="path" id="path">{hops}</ol></section>
<section id="sse" data-state="waiting"><h2>Server-sent events <span class="badge">waiting</span></h2>
<p class="mute"><code>GET /events</code>, rendered as each event arrives: <span id="sse-count">0</span> so far.</p>
<ul class="log" id="sse-log"></ul></section>
<section id="ws" data-state="connecting"><h2>WebSocket <span class="badge">connecting</span></h2>
<p class="mute"><code>/ws</code>: <span id="ws-stream">an extended CONNECT down the tunnel</span></p>
<div class="clock" id="ws-clock" data-ticks="0">--:--:--</div>
<form id="ws-form"><input id="ws-text" placeholder="type, then Echo" autocomplete="off"><button>Echo</button></form>
<ul class="log" id="ws-log"></ul></section>
</main>
<footer>Try <code>curl -d 'hi' {base}/echo</code> (echoes a POST body) and <code>curl -N {base}/events</code>
(server-sent events); <code>{base}/info</code> shows the WSGI environ.</footer>
<script>{script}</script>
</body></html>
"""


def _render_hops(hops: list[Hop]) -> str:
    out = []
    for hop in hops:
        facts = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in hop.facts)
        out.append(f'<li class="hop" data-hop="{hop.key}"><b>{html.escape(hop.title)}</b><dl>{facts}</dl></li>')
    return "".join(out)


def render_page(environ: dict[str, Any], route: Route | None = None, worker_name: str | None = None) -> bytes:
    host = environ.get("HTTP_HOST", "")
    base = f"{environ.get('wsgi.url_scheme', 'http')}://{host}"
    return PAGE.format(style=STYLE, script=SCRIPT, hops=_render_hops(request_path(environ, route, worker_name)),
                       base=html.escape(base)).encode()


def sse_events(environ: dict[str, Any], ticks: int = SSE_TICKS, interval: float = SSE_INTERVAL) -> Iterator[bytes]:
    """``ticks`` events ``interval`` apart (stopping early if the client went away), then ``event: end``."""
    cancelled: threading.Event = environ["rhttp.cancelled"]
    draining: threading.Event | None = environ.get("rhttp.draining")
    stream = environ.get("rhttp.stream_id")
    for i in range(ticks):
        yield f"data: tick {i} at {time.strftime('%H:%M:%S')} (stream {stream})\n\n".encode()
        if cancelled.wait(interval):
            return
        if draining is not None and draining.is_set():
            break  # the worker is shutting down: finish now rather than hold its drain
    yield b"event: end\ndata: done\n\n"


class DemoApp:
    """The demo's WSGI app; ``routes`` (the proxy's :class:`RouteLog`) and ``worker_name`` fill in the
    hops only the proxy and the demo's wiring know."""

    def __init__(self, *, routes: RouteLog | None = None, worker_name: str | None = None) -> None:
        self.routes = routes
        self.worker_name = worker_name

    def route(self, environ: dict[str, Any]) -> Route | None:
        return self.routes.lookup(environ.get("rhttp.request_id")) if self.routes is not None else None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/":
            body = render_page(environ, self.route(environ), self.worker_name)
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                      ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
            return [body]
        if path == "/echo":
            data = environ["wsgi.input"].read()
            start_response("200 OK", [("Content-Type", environ.get("CONTENT_TYPE") or "application/octet-stream"),
                                      ("Content-Length", str(len(data)))])
            return [data]
        if path == "/events":
            start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
            return sse_events(environ)
        if path == "/ws":
            return self.websocket(environ, start_response)
        if path == "/info":
            info = {k: v for k, v in environ.items() if isinstance(v, (str, int, bool))}
            body = json.dumps(info, indent=1, sort_keys=True).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    def websocket(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """``/ws``: a clock pushed every second and an echo, until either side closes."""
        sock = upgrade_socket(environ)
        if not is_upgrade(environ):
            return _plain(start_response, "426 Upgrade Required", "/ws is a WebSocket\n", [("Upgrade", "websocket")])
        if environ.get("HTTP_SEC_WEBSOCKET_VERSION") != "13":
            return _plain(start_response, "426 Upgrade Required", "WebSocket version 13 only\n",
                          [("Sec-WebSocket-Version", "13")])
        key = environ.get("HTTP_SEC_WEBSOCKET_KEY")
        if not valid_key(key):
            return _plain(start_response, "400 Bad Request", "a valid Sec-WebSocket-Key is required\n")
        if sock is None:
            return _plain(start_response, "501 Not Implemented",
                          "this server offers no socket for a WebSocket upgrade\n")
        assert key is not None
        route = self.route(environ)
        ws = WebSocket(sock)
        ws.accept(key)
        clock = threading.Thread(target=_push_clock, args=(ws, environ.get("rhttp.draining")), name="demo-ws-clock",
                                 daemon=True)
        try:
            ws.send_text(json.dumps({"type": "hello", "stream": environ.get("rhttp.stream_id"),
                                     "tunnel": route.worker_id if route else "?"}))
            clock.start()
            for message in ws.messages():
                text = message if isinstance(message, str) else message.decode("utf-8", "replace")
                ws.send_text(json.dumps({"type": "echo", "text": text, "time": time.strftime("%H:%M:%S")}))
        except ConnectionError as e:
            log.debug("demo websocket ended: %s", e)
        finally:
            ws.done.set()
            if clock.is_alive():
                clock.join(CLOCK_JOIN)
            draining = environ.get("rhttp.draining")
            if draining is not None and draining.is_set():
                # The worker's drain ends our reads (EOF) but still lets us write: say why (1001).
                try:
                    ws.close(CLOSE_GOING_AWAY, "the demo is stopping")
                except ConnectionError:
                    pass
            close = getattr(sock, "close", None)
            if close is not None:
                close()
        log.info("demo websocket on stream %s closed (%s)", environ.get("rhttp.stream_id"), ws.close_code)
        # The upgrade was answered on the socket; like flask-sock outside werkzeug/gunicorn, nothing more.
        return []


def _push_clock(ws: WebSocket, draining: threading.Event | None) -> None:
    """Push the time every second; close the socket (1001) when the worker drains or after CLOCK_TICKS."""
    reason = "the demo clock stops after 10 minutes"
    for n in range(1, CLOCK_TICKS + 1):
        try:
            ws.send_text(json.dumps({"type": "clock", "time": time.strftime("%H:%M:%S"), "n": n}))
        except ConnectionError:
            return
        if ws.done.wait(CLOCK_INTERVAL):
            return
        if draining is not None and draining.is_set():
            reason = "the demo is stopping"
            break
    try:
        ws.close(CLOSE_GOING_AWAY, reason)
    except ConnectionError:
        pass


def _plain(start_response: Callable[..., Any], status: str, text: str,
           extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                            *(extra or [])])
    return [body]


#: For ``rhttp-wsgi worker rhttp_wsgi.demo_app:app`` and the like (no proxy-side route log).
app = DemoApp()
