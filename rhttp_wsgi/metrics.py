"""Prometheus metrics (optional: ``pip install 'rhttp-wsgi[prometheus]'``).

Nothing here sits on the hot path of the tunnel: request figures come from a
thin WSGI middleware around the app (worker) or the forwarder (proxy), and
tunnel/worker gauges are read from the pool's and proxy's own snapshots at
scrape time.

    metrics = ProxyMetrics(proxy)          # or WorkerMetrics(pool) before pool.start()
    metrics.start_server("127.0.0.1:9100") # or mount metrics.wsgi_app anywhere
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._http import CompleteResponse
from .options import parse_address

if TYPE_CHECKING:  # pragma: no cover
    from .proxy import Proxy
    from .worker import WorkerPool

__all__ = ["InstrumentedApp", "ProxyMetrics", "WorkerMetrics"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Observer = Callable[[dict[str, Any], int, float, int, int], None]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _require() -> Any:
    try:
        import prometheus_client
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("metrics need prometheus_client: pip install 'rhttp-wsgi[prometheus]'") from e
    return prometheus_client


class _CountingInput:
    """``wsgi.input`` that counts what the app read.

    It offers ``read1`` (what has arrived, as the turnkey server's input does) so
    that a trickling upload keeps streaming through the forwarder with metrics on;
    over an input without ``read1`` it is a plain ``read``.  Anything else is the
    inner input's.
    """

    __slots__ = ("_inner", "count")

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.count = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def read(self, *args: Any) -> bytes:
        data: bytes = self._inner.read(*args)
        self.count += len(data)
        return data

    def read1(self, *args: Any) -> bytes:
        read1 = getattr(self._inner, "read1", None)
        data: bytes = read1(*args) if read1 is not None else self._inner.read(*args)
        self.count += len(data)
        return data

    def readinto(self, b: Any) -> int:
        n: int = self._inner.readinto(b)
        self.count += n or 0
        return n

    def readline(self, *args: Any) -> bytes:
        data: bytes = self._inner.readline(*args)
        self.count += len(data)
        return data

    def readlines(self, *args: Any) -> list[bytes]:
        lines: list[bytes] = self._inner.readlines(*args)
        self.count += sum(map(len, lines))
        return lines

    def __iter__(self) -> Iterator[bytes]:
        for line in self._inner:
            self.count += len(line)
            yield line


class _Body:
    """Counts bytes out and reports once, on close() (PEP 3333 always calls it)."""

    def __init__(self, result: Iterable[bytes], done: Callable[[int], None]) -> None:
        self._result = result
        self._done = done
        self._sent = 0
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._result:
            self._sent += len(chunk)
            yield chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._done(self._sent)


class InstrumentedApp:
    """WSGI middleware: calls ``observe(environ, status, seconds, bytes_in, bytes_out)`` per request.

    ``status`` is 0 when the app raised before choosing one.  A
    :class:`~rhttp_wsgi._http.CompleteResponse` is returned as it is (observed
    from its ``close``), so the turnkey server still writes it in one go.
    """

    def __init__(self, app: WSGIApp, observe: Observer) -> None:
        self.app = app
        self.observe = observe

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        t0 = time.perf_counter()
        status = [0]
        counting = _CountingInput(environ.get("wsgi.input"))
        environ["wsgi.input"] = counting

        def sr(s: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            try:
                status[0] = int(s[:3])
            except ValueError:
                status[0] = 0
            return start_response(s, headers, exc_info) if exc_info is not None else start_response(s, headers)

        def done(sent: int) -> None:
            self.observe(environ, status[0], time.perf_counter() - t0, counting.count, sent)

        try:
            result = self.app(environ, sr)
        except BaseException:
            done(0)
            raise
        if type(result) is CompleteResponse:
            inner = result.on_close
            complete = result

            def closed() -> None:
                try:
                    if inner is not None:
                        inner()
                finally:
                    done(len(complete.body))

            result.on_close = closed
            return result
        return _Body(result, done)


class _Base:
    def __init__(self, registry: Any = None) -> None:
        self._prom = _require()
        self.registry = registry if registry is not None else self._prom.CollectorRegistry()
        self._server: Any = None

    def wsgi_app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        """A ``/metrics`` WSGI app in Prometheus text format."""
        data: bytes = self._prom.generate_latest(self.registry)
        start_response("200 OK", [("Content-Type", self._prom.CONTENT_TYPE_LATEST),
                                  ("Content-Length", str(len(data)))])
        return [data]

    def start_server(self, addr: str) -> tuple[str, int]:
        """Serve ``/metrics`` on a separate port (a daemon thread); returns the bound address."""
        host, port = parse_address(addr, option="metrics_bind")
        server, thread = self._prom.start_http_server(port, addr=host, registry=self.registry)
        self._server = (server, thread)
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def stop_server(self) -> None:
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._server = None


class ProxyMetrics(_Base):
    """Attached workers, in-flight and total forwards by status, latency, bytes."""

    def __init__(self, proxy: Proxy, registry: Any = None) -> None:
        super().__init__(registry)
        p = self._prom
        self.forwards = p.Counter("rhttp_proxy_forwards", "Public requests forwarded, by HTTP status.",
                                  ["status"], registry=self.registry)
        self.latency = p.Histogram("rhttp_proxy_forward_seconds", "Time from request to the end of the response.",
                                   buckets=LATENCY_BUCKETS, registry=self.registry)
        self.bytes = p.Counter("rhttp_proxy_body_bytes", "Body bytes forwarded, by direction.",
                               ["direction"], registry=self.registry)
        self.registry.register(_ProxyCollector(proxy, p))
        proxy.wsgi_app = InstrumentedApp(proxy.wsgi_app, self._observe)

    def _observe(self, environ: dict[str, Any], status: int, seconds: float, bytes_in: int, bytes_out: int) -> None:
        if "rhttp.websocket_bytes_in" in environ:
            # A relayed WebSocket: it answered 101 on the socket it took over (never through
            # start_response); its bytes are rhttp_proxy_websocket_bytes.
            status = 101
        self.forwards.labels(status=str(status)).inc()
        self.latency.observe(seconds)
        self.bytes.labels(direction="request").inc(bytes_in)
        self.bytes.labels(direction="response").inc(bytes_out)


class _ProxyCollector:
    def __init__(self, proxy: Proxy, prom: Any) -> None:
        self._proxy = proxy
        self._prom = prom

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        workers = self._proxy.workers()
        attached = GaugeMetricFamily("rhttp_proxy_workers_attached", "Worker tunnels attached.")
        attached.add_metric([], len(workers))
        in_flight = GaugeMetricFamily("rhttp_proxy_in_flight", "Forwards in flight, per worker.",
                                      labels=["worker", "common_name"])
        for w in workers:
            in_flight.add_metric([w.id, w.common_name or ""], w.in_flight)
        yield attached
        yield in_flight
        ws = self._proxy.websocket_stats()
        ws_open = GaugeMetricFamily("rhttp_proxy_websockets_open", "Public WebSockets relayed now.")
        ws_open.add_metric([], ws["open"])
        yield ws_open
        ws_total = CounterMetricFamily("rhttp_proxy_websockets", "Public WebSockets relayed (101 sent), in total.")
        ws_total.add_metric([], ws["total"])
        yield ws_total
        ws_bytes = CounterMetricFamily("rhttp_proxy_websocket_bytes", "Bytes relayed over WebSockets, by direction"
                                       " (up: client to worker).", labels=["direction"])
        ws_bytes.add_metric(["up"], ws["bytes_up"])
        ws_bytes.add_metric(["down"], ws["bytes_down"])
        yield ws_bytes

    def describe(self) -> list[Any]:
        return []


class WorkerMetrics(_Base):
    """Tunnels up, reconnects, streams by outcome, app latency.  Create before ``pool.start()``."""

    def __init__(self, pool: WorkerPool, registry: Any = None) -> None:
        super().__init__(registry)
        p = self._prom
        self.streams = p.Counter("rhttp_worker_streams", "Requests served, by outcome (ok, error, cancelled).",
                                 ["outcome"], registry=self.registry)
        self.latency = p.Histogram("rhttp_worker_request_seconds", "Time in the app per request.",
                                   buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_WorkerCollector(pool))
        pool.app = InstrumentedApp(pool.app, self._observe)
        self._lock = threading.Lock()

    def _observe(self, environ: dict[str, Any], status: int, seconds: float, bytes_in: int, bytes_out: int) -> None:
        cancelled = environ.get("rhttp.cancelled")
        if cancelled is not None and cancelled.is_set():
            outcome = "cancelled"
        elif status == 0 or status >= 500:
            outcome = "error"
        else:
            outcome = "ok"
        self.streams.labels(outcome=outcome).inc()
        self.latency.observe(seconds)


class _WorkerCollector:
    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        infos = self._pool.tunnels()
        up = GaugeMetricFamily("rhttp_worker_tunnels_up", "Tunnels connected and accepting streams.")
        up.add_metric([], sum(1 for t in infos if t.connected))
        in_flight = GaugeMetricFamily("rhttp_worker_in_flight", "Streams in flight.")
        in_flight.add_metric([], sum(t.in_flight for t in infos))
        reconnects = CounterMetricFamily("rhttp_worker_reconnects", "Tunnel reconnects after a healthy close.",
                                         labels=["slot"])
        for t in infos:
            reconnects.add_metric([str(t.slot)], t.reconnects)
        per_proxy = GaugeMetricFamily("rhttp_worker_proxy_tunnels_up",
                                      "Tunnels connected and accepting streams, per proxy entry and address.",
                                      labels=["proxy", "address"])
        counts: dict[tuple[str, str], int] = {}
        for t in infos:
            counts[(t.proxy, t.address)] = counts.get((t.proxy, t.address), 0) + int(t.connected)
        for (proxy, address), n in counts.items():
            per_proxy.add_metric([proxy, address], n)
        yield per_proxy
        yield up
        yield in_flight
        yield reconnects

    def describe(self) -> list[Any]:
        return []
