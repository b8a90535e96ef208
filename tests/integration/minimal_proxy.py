"""Just enough proxy to test the worker over real mutual TLS on 127.0.0.1.

It accepts tunnels (optionally misbehaving on purpose) and lets a test open
streams on them.  The real proxy lives in ``rhttp_wsgi.proxy``; this one is
deliberately tiny so worker tests do not depend on it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from OpenSSL import SSL

from rhttp_wsgi._protocol import TunnelProtocol
from rhttp_wsgi._tunnel import Tunnel
from rhttp_wsgi.errors import TLSSetupError
from rhttp_wsgi.options import TunnelOptions
from rhttp_wsgi.tls import TLSSession, server_context


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass
class MiniProxy:
    cert: str
    key: str
    workers_ca: str
    #: called per accepted TCP connection (index) -> "ok" | "close" | "silent" | "no-settings" | "no-h2"
    behaviour: Callable[[int], str] = lambda i: "ok"
    options: TunnelOptions = field(default_factory=TunnelOptions)
    tunnels: list[Tunnel] = field(default_factory=list)
    sni_seen: list[str | None] = field(default_factory=list)
    handshake_errors: list[str] = field(default_factory=list)
    accepted: int = 0

    def start(self) -> int:
        self._ctx = server_context(self.cert, self.key, self.workers_ca)
        self._ctx.set_tlsext_servername_callback(self._on_sni)
        self._plain_ctx = SSL.Context(SSL.TLS_SERVER_METHOD)  # for the "no-h2" behaviour
        self._plain_ctx.use_certificate_chain_file(self.cert)
        self._plain_ctx.use_privatekey_file(self.key)
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._cond = threading.Condition()
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        t = threading.Thread(target=self._accept_loop, name="mini-proxy-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self.port

    def _on_sni(self, conn: SSL.Connection) -> None:
        name = conn.get_servername()
        self.sni_seen.append(name.decode() if name else None)

    def _accept_loop(self) -> None:
        while True:
            try:
                s, _ = self._sock.accept()
            except OSError:
                return
            with self._cond:
                if self._stop:
                    s.close()
                    return
                index = self.accepted
                self.accepted += 1
                self._conns.append(s)
                self._cond.notify_all()
            t = threading.Thread(target=self._serve, args=(s, self.behaviour(index)), daemon=True,
                                 name=f"mini-proxy-conn-{index}")
            self._threads.append(t)
            t.start()

    def _serve(self, s: socket.socket, how: str) -> None:
        try:
            if how == "close":
                return
            if how == "silent":
                while s.recv(65536):  # never answer; until the worker gives up
                    pass
                return
            ctx = self._plain_ctx if how == "no-h2" else self._ctx
            sess = TLSSession(ctx, server_side=True)
            try:
                sess.handshake(s, 5)
            except TLSSetupError as e:
                with self._cond:
                    self.handshake_errors.append(str(e))
                    self._cond.notify_all()
                return
            if how in ("no-h2", "no-settings"):
                while s.recv(65536):  # read until the worker closes
                    pass
                return
            tunnel = Tunnel(s, sess, TunnelProtocol("client", self.options), self.options, name="mini-proxy",
                            on_ready=lambda t: self._notify())
            with self._cond:
                self.tunnels.append(tunnel)
            tunnel.run()
            self._notify()
        finally:
            s.close()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def live(self) -> list[Tunnel]:
        return [t for t in self.tunnels if t.accepting]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        # Some predicates read tunnel state that does not notify this
        # condition, so wake up every few milliseconds to re-check (bounded).
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.01))
            return True

    def wait_tunnels(self, n: int, timeout: float = 5.0) -> list[Tunnel]:
        assert self.wait_for(lambda: len(self.live()) >= n, timeout), \
            f"expected {n} live tunnels, have {len(self.live())}"
        return self.live()

    def request(self, method: str = "GET", path: str = "/", *, body: bytes | None = None,
                headers: list[tuple[str, str]] = (), authority: str | None = "example.test",  # type: ignore[assignment]
                tunnel: Tunnel | None = None, timeout: float = 5.0) -> Response:
        t = tunnel or self.wait_tunnels(1)[0]
        h = [(b":method", method.encode()), (b":scheme", b"https"), (b":path", path.encode())]
        if authority is not None:
            h.insert(2, (b":authority", authority.encode()))
        h += [(k.lower().encode(), v.encode()) for k, v in headers]
        ch = t.open_stream(h, end_stream=body is None)
        if body is not None:
            ch.write(body, end=True)
        resp = ch.wait_response(timeout)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = ch.read(-1, timeout)
            if not data:
                break
            chunks.append(data)
        status = int(dict(resp)[b":status"])
        return Response(status, [(k.decode(), v.decode()) for k, v in resp if not k.startswith(b":")],
                        b"".join(chunks))

    def close(self) -> None:
        with self._cond:
            self._stop = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self._sock.close()
        for t in list(self.tunnels):
            t.close("test over")
        with self._cond:
            for s in self._conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for th in self._threads:
            th.join(5)
