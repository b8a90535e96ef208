"""A raw-frame *worker* that dials the proxy over real mTLS and sends exactly the frames a test wants.

The proxy side is the real thing (``Proxy`` with its tunnel listener); this
peer does the worker's half by hand: TCP + TLS (pyOpenSSL memory BIOs, client
certificate), the client preface and SETTINGS, then frames built with
``hyperframe`` and an ``hpack.Encoder`` that validates nothing -- so a test can
answer with an uppercase header name, a CR/LF in a value, ``:status: abc``, a
PUSH_PROMISE or a PING flood, and look at what the proxy sends back.

What it does on its own: ACKs the proxy's SETTINGS and PINGs, returns flow
control credit for request bodies, decodes request headers, and hands every
complete request to ``responder(worker, stream_id, request)`` on its reader
thread (the default answers ``200`` with ``ok <path>``).  A responder that
returns without answering leaves the stream open: the test answers later with
:meth:`RawWorker.respond` or raw frames (the "held" request of the tests).

Threads: one reader thread.  ``TLSSession`` is not thread-safe: ``_tls_lock``
guards every encrypt/decrypt; ``_send_lock`` keeps encrypt + ``sendall`` in
order (a record encrypted first is sent first) and is never taken by the
reader while it holds ``_tls_lock``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from rhttp_wsgi._protocol import PREFACE
from rhttp_wsgi.tls import TLSSession, client_context

WAIT = 5.0


@dataclass
class Request:
    stream_id: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    ended: bool = False

    def get(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    @property
    def path(self) -> str:
        return (self.get(b":path") or b"").decode("latin-1")


Responder = Callable[["RawWorker", int, Request], None]


def answer_ok(w: RawWorker, sid: int, req: Request) -> None:
    w.respond(sid, 200, f"ok {req.path}".encode())


class RawWorker:
    """Dial ``127.0.0.1:port`` as a worker (mTLS) and speak raw HTTP/2 frames."""

    def __init__(self, port: int, cert: str, key: str, ca: str, *, responder: Responder = answer_ok,
                 settings: dict[int, int] | None = None, auto_ping_ack: bool = True,
                 name: str = "raw-worker") -> None:
        self.name = name
        self.responder = responder
        self.auto_ping_ack = auto_ping_ack
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tls = TLSSession(client_context(cert, key, ca), server_side=False, verify_name="127.0.0.1")
        self.tls.handshake(self.sock, WAIT)
        self.sock.settimeout(None)
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.cond = threading.Condition()
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.frames: list[Frame] = []
        self.requests: dict[int, Request] = {}
        self.eof = False
        self.proxy_settings_seen = False
        self._block: list[Frame] | None = None
        self._thread = threading.Thread(target=self._reader, name=f"{name}-reader", daemon=True)
        first = SettingsFrame(0, settings=settings if settings is not None else {
            SettingsFrame.MAX_CONCURRENT_STREAMS: 100, SettingsFrame.INITIAL_WINDOW_SIZE: 1 << 20})
        self.send_bytes(PREFACE + first.serialize())
        self._thread.start()

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(WAIT)
        self.sock.close()
        assert not self._thread.is_alive(), "raw worker reader did not stop"

    # -- sending (any thread) ----------------------------------------------------

    def send_bytes(self, plain: bytes) -> None:
        with self._send_lock:
            with self._tls_lock:
                cipher = self.tls.encrypt(plain)
            try:
                self.sock.sendall(cipher)
            except OSError:
                pass  # the proxy closed the tunnel: the test looks at what it sent

    def send(self, *frames: Frame) -> None:
        self.send_bytes(b"".join(f.serialize() for f in frames))

    def headers_frame(self, sid: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool = False) -> Frame:
        flags = ["END_HEADERS"] + (["END_STREAM"] if end_stream else [])
        # hpack encodes whatever it is given: no lower-casing, no CR/LF check.
        return HeadersFrame(sid, data=self.encoder.encode(headers), flags=flags)

    def data_frame(self, sid: int, data: bytes, *, end_stream: bool = False) -> Frame:
        return DataFrame(sid, data=data, flags=["END_STREAM"] if end_stream else [])

    def respond(self, sid: int, status: int | bytes, body: bytes = b"",
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
        code = status if isinstance(status, bytes) else str(status).encode()
        hs = [(b":status", code), (b"content-length", str(len(body)).encode()), *(headers or [])]
        if body:
            self.send(self.headers_frame(sid, hs), self.data_frame(sid, body, end_stream=True))
        else:
            self.send(self.headers_frame(sid, hs, end_stream=True))

    def ping(self, payload: bytes = b"rawping!") -> None:
        self.send(PingFrame(0, opaque_data=payload))

    # -- reading (reader thread) ----------------------------------------------------

    def _reader(self) -> None:
        buf = bytearray()
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                with self._tls_lock:
                    plain = self.tls.decrypt(data)
                buf += plain
                while len(buf) >= 9:
                    frame, length = Frame.parse_frame_header(memoryview(bytes(buf[:9])))
                    if len(buf) < 9 + length:
                        break
                    body = bytes(buf[9: 9 + length])
                    del buf[: 9 + length]
                    frame.parse_body(memoryview(body))
                    self._on_frame(frame)
        except Exception:  # a closed or reset socket, a TLS alert: the end
            pass
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def _on_frame(self, f: Frame) -> None:
        replies: list[Frame] = []
        complete: Request | None = None
        with self.cond:
            self.frames.append(f)
            if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
                self.proxy_settings_seen = True
                replies.append(SettingsFrame(0, flags=["ACK"]))
            elif isinstance(f, PingFrame) and "ACK" not in f.flags and self.auto_ping_ack:
                replies.append(PingFrame(0, opaque_data=f.opaque_data, flags=["ACK"]))
            elif isinstance(f, HeadersFrame):
                if "END_HEADERS" in f.flags:
                    complete = self._request_headers(f, f.data)
                else:
                    self._block = [f]
            elif isinstance(f, ContinuationFrame) and self._block is not None:
                self._block.append(f)
                if "END_HEADERS" in f.flags:
                    first = self._block[0]
                    complete = self._request_headers(first, b"".join(x.data for x in self._block))
                    self._block = None
            elif isinstance(f, DataFrame):
                req = self.requests.get(f.stream_id)
                if req is not None:
                    req.body += f.data
                    if "END_STREAM" in f.flags:
                        req.ended = True
                        complete = req
                n = f.flow_controlled_length
                if n:
                    wu = WindowUpdateFrame(0)
                    wu.window_increment = n
                    replies.append(wu)
                    if "END_STREAM" not in f.flags:
                        ws = WindowUpdateFrame(f.stream_id)
                        ws.window_increment = n
                        replies.append(ws)
            self.cond.notify_all()
        if replies:
            self.send(*replies)
        if complete is not None:
            self.responder(self, complete.stream_id, complete)

    def _request_headers(self, f: Frame, block: bytes) -> Request | None:
        headers = [(bytes(k), bytes(v)) for k, v in self.decoder.decode(block, raw=True)]
        req = self.requests.get(f.stream_id)
        if req is not None:  # trailers
            req.ended = "END_STREAM" in f.flags
            return req if req.ended else None
        req = Request(f.stream_id, headers, ended="END_STREAM" in f.flags)
        self.requests[f.stream_id] = req
        return req if req.ended else None

    # -- waiting ------------------------------------------------------------------------

    def wait_until(self, pred: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
        with self.cond:
            if not self.cond.wait_for(pred, timeout):
                raise AssertionError(f"{self.name}: timed out waiting for {what}; frames: {self.frames[-20:]}")

    def wait_request(self, path: str, timeout: float = WAIT) -> Request:
        found: list[Request] = []

        def check() -> bool:
            for r in self.requests.values():
                if r.path == path and r.ended:
                    found.append(r)
                    return True
            return False

        self.wait_until(check, timeout, f"request {path}")
        return found[0]

    def find(self, kind: type, stream_id: int | None = None) -> list[Any]:
        with self.cond:
            return [f for f in self.frames if isinstance(f, kind) and (stream_id is None or f.stream_id == stream_id)]

    def wait_rst(self, sid: int, timeout: float = WAIT) -> RstStreamFrame:
        self.wait_until(lambda: any(isinstance(f, RstStreamFrame) and f.stream_id == sid for f in self.frames),
                        timeout, f"RST_STREAM on stream {sid}")
        return self.find(RstStreamFrame, sid)[0]  # type: ignore[no-any-return]

    def wait_goaway(self, timeout: float = WAIT) -> GoAwayFrame:
        self.wait_until(lambda: any(isinstance(f, GoAwayFrame) for f in self.frames), timeout, "GOAWAY")
        return self.find(GoAwayFrame)[0]  # type: ignore[no-any-return]

    def wait_closed(self, timeout: float = WAIT) -> None:
        self.wait_until(lambda: self.eof, timeout, "the proxy to close the tunnel")

    def goaways(self) -> list[GoAwayFrame]:
        return self.find(GoAwayFrame)


__all__ = ["RawWorker", "Request", "Responder", "answer_ok"]
