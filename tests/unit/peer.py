"""An in-memory HTTP/2 peer that plays the *proxy* against a worker-role tunnel.

The worker side is the real thing: ``Tunnel(sock_a, None, TunnelProtocol("server", options), options)``
running its reader/writer threads over one end of a ``socket.socketpair()``
(plaintext: ``tls=None``), with the worker's :class:`StreamPolicy` handing streams
to an :class:`AppThreadPool` (running :func:`run_wsgi` for a request).  The
other end is driven by :class:`H2Peer`, which speaks raw frames built with
``hyperframe`` and an ``hpack.Encoder``, so a test can send exactly the bytes it
wants (split header blocks, interleaved frames, tiny windows, bogus first
frames) and look at exactly the frames that come back.

What the peer does on its own (each can be switched off):

* reads the worker's client preface (``peer.preface``) -- the proxy never sends one;
* ACKs the worker's SETTINGS (``auto_ack_settings``), but never before its own
  SETTINGS went out (the worker requires SETTINGS as the first frame);
* returns flow-control credit for every DATA frame it receives (``auto_window``);
* ACKs the worker's PINGs (``auto_ack_ping``; off in a bare ``H2Peer``, on in
  ``WorkerHarness`` unless a test wants to watch liveness fail).

It also *checks* the worker continuously and records anything wrong in
``peer.violations`` (the harness asserts the list is empty at teardown): a bad
preface, DATA beyond the window the peer granted, frames larger than the
peer's MAX_FRAME_SIZE, a frame inside another stream's header block, a stray
CONTINUATION, a header block that does not HPACK-decode, an unparsable frame.

Typical use (``make_worker`` is a fixture, see ``conftest.py``)::

    h = make_worker(app, options=worker_options(...), peer_settings={S.INITIAL_WINDOW_SIZE: 10})
    h.peer.request(1, "POST", "/x", body=b"abc")
    r = h.peer.response(1)                      # status, headers, body, trailers, reset
    h.peer.wait_for(lambda f: isinstance(f, RstStreamFrame) and f.stream_id == 3, timeout=5)

Every wait is bounded and condition-based: ``wait_for(pred, timeout)`` blocks on
a condition variable that the reader thread notifies per frame; ``barrier()``
sends a PING and waits for its ACK, which proves the worker has processed
everything sent before it (frames are handled in order by one reader thread,
and their replies are queued in order).
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import hpack
import pytest
from h2.errors import ErrorCodes
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

from rhttp_wsgi._pool import AppThreadPool
from rhttp_wsgi._protocol import PREFACE, TunnelProtocol
from rhttp_wsgi._tunnel import Tunnel
from rhttp_wsgi.options import WorkerOptions
from rhttp_wsgi.streams import StreamPolicy
from rhttp_wsgi.wsgi import WSGIContext

__all__ = [
    "DEFAULT_TIMEOUT",
    "H2Peer",
    "Response",
    "S",
    "WorkerHarness",
    "make_worker",
    "worker_options",
]

DEFAULT_TIMEOUT = 5.0
DEFAULT_WINDOW = 65535


class S:
    """SETTINGS identifiers (RFC 9113 §6.5.2)."""

    HEADER_TABLE_SIZE = SettingsFrame.HEADER_TABLE_SIZE
    ENABLE_PUSH = SettingsFrame.ENABLE_PUSH
    MAX_CONCURRENT_STREAMS = SettingsFrame.MAX_CONCURRENT_STREAMS
    INITIAL_WINDOW_SIZE = SettingsFrame.INITIAL_WINDOW_SIZE
    MAX_FRAME_SIZE = SettingsFrame.MAX_FRAME_SIZE
    MAX_HEADER_LIST_SIZE = SettingsFrame.MAX_HEADER_LIST_SIZE


def _b(v: str | bytes) -> bytes:
    return v if isinstance(v, bytes) else v.encode("latin-1")


@dataclass
class Response:
    """One stream's answer as the peer saw it."""

    stream_id: int
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    informational: list[list[tuple[str, str]]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[str, str]] | None = None
    reset: int | None = None  # RST_STREAM error code, if the stream was reset
    ended: bool = False  # END_STREAM seen
    frames: list[Frame] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_names(self) -> list[str]:
        return [k for k, _ in self.headers]


class H2Peer:
    """Raw-frame HTTP/2 peer in the proxy role (no preface, HTTP/2 client)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        auto_ack_settings: bool = True,
        auto_ack_ping: bool = False,
        auto_window: bool = True,
        name: str = "peer",
    ) -> None:
        self.sock = sock
        self.name = name
        self.auto_ack_settings = auto_ack_settings
        self.auto_ack_ping = auto_ack_ping
        self.auto_window = auto_window
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.cond = threading.Condition()
        self._send_lock = threading.Lock()
        #: Every frame received, in order.  HEADERS frames get ``.decoded``
        #: (list of (str, str)) once their block is complete, ``None`` before.
        self.frames: list[Frame] = []
        #: Every byte received, preface included.
        self.raw = bytearray()
        self.preface: bytes | None = None
        self.eof = False
        self.read_error: BaseException | None = None
        self.violations: list[str] = []
        # what the worker advertised (its first SETTINGS, updated by later ones)
        self.worker_settings: dict[int, int] = {}
        self.worker_settings_seen = False
        self.settings_acks = 0
        # what we advertised
        self.local_settings: dict[int, int] = {}
        self.local_initial_window = DEFAULT_WINDOW
        self.local_max_frame_size = 16384
        # receive-side flow control (windows we granted to the worker)
        self.recv_conn_window = DEFAULT_WINDOW
        self.recv_stream_window: dict[int, int] = {}
        # send-side flow control (windows the worker granted to us)
        self.send_conn_window = DEFAULT_WINDOW
        self.send_stream_window: dict[int, int] = {}
        self._block: list[Any] | None = None  # open header block (HEADERS + CONTINUATIONs)
        self._thread = threading.Thread(target=self._reader, name=f"{name}-reader", daemon=True)
        self._ping_seq = 0
        self._settings_sent = False
        self._ack_pending = False
        #: Cleared by pause_reading(): the reader stops calling recv() (a peer
        #: that does not read, so the worker's output backs up).
        self._reading = threading.Event()
        self._reading.set()

    # -- lifecycle ---------------------------------------------------------

    def pause_reading(self) -> None:
        """Stop reading from the socket (one recv() already in progress still completes)."""
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def start(self) -> H2Peer:
        self._thread.start()
        return self

    def handshake(self, settings: dict[int, int] | None = None, *, conn_window: int | None = None,
                  timeout: float = DEFAULT_TIMEOUT) -> None:
        """Send our SETTINGS (no preface), wait for the worker's SETTINGS and its ACK of ours."""
        self.send_settings(settings or {})
        if conn_window is not None and conn_window > DEFAULT_WINDOW:
            self.send_window_update(0, conn_window - DEFAULT_WINDOW)
        self.wait_until(lambda: self.worker_settings_seen and self.settings_acks >= 1, timeout,
                        "worker SETTINGS and SETTINGS ACK")

    def close(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reading.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        try:
            self.sock.close()
        except OSError:
            pass
        assert not self._thread.is_alive(), "peer reader thread did not stop"

    # -- reading -------------------------------------------------------------

    def _reader(self) -> None:
        buf = bytearray()
        try:
            while True:
                self._reading.wait()
                data = self.sock.recv(65536)
                if not data:
                    break
                buf += data
                self.raw += data
                if self.preface is None:
                    if len(buf) < len(PREFACE):
                        continue
                    with self.cond:
                        self.preface = bytes(buf[: len(PREFACE)])
                        if self.preface != PREFACE:
                            self.violations.append(f"bad client preface {self.preface!r}")
                        self.cond.notify_all()
                    del buf[: len(PREFACE)]
                while len(buf) >= 9:
                    frame, length = Frame.parse_frame_header(memoryview(bytes(buf[:9])))
                    if len(buf) < 9 + length:
                        break
                    body = bytes(buf[9: 9 + length])
                    del buf[: 9 + length]
                    if length > self.local_max_frame_size:
                        self.violations.append(
                            f"{type(frame).__name__} of {length} bytes > our MAX_FRAME_SIZE "
                            f"{self.local_max_frame_size}")
                    frame.parse_body(memoryview(body))
                    self._on_frame(frame)
        except OSError as e:
            self.read_error = e
        except Exception as e:  # a parse error is a worker bug
            self.read_error = e
            with self.cond:
                self.violations.append(f"unparsable frame from worker: {e!r}")
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def _on_frame(self, f: Frame) -> None:
        replies: list[Frame] = []
        with self.cond:
            if self._block is not None and not (
                isinstance(f, ContinuationFrame) and f.stream_id == self._block[0].stream_id
            ):
                self.violations.append(f"{f!r} inside a header block")
            if isinstance(f, HeadersFrame):
                f.decoded = None  # type: ignore[attr-defined]
                f.block_frames = 1  # type: ignore[attr-defined]
                if "END_HEADERS" in f.flags:
                    self._decode(f, f.data)
                else:
                    self._block = [f]
            elif isinstance(f, ContinuationFrame):
                if self._block is None:
                    self.violations.append(f"stray {f!r}")
                else:
                    self._block.append(f)
                    if "END_HEADERS" in f.flags:
                        first = self._block[0]
                        first.block_frames = len(self._block)  # type: ignore[attr-defined]
                        self._decode(first, b"".join(x.data for x in self._block))
                        self._block = None
            elif isinstance(f, DataFrame):
                n = f.flow_controlled_length
                self.recv_conn_window -= n
                w = self.recv_stream_window.get(f.stream_id, self.local_initial_window) - n
                self.recv_stream_window[f.stream_id] = w
                if self.recv_conn_window < 0:
                    self.violations.append(f"DATA beyond the connection window ({self.recv_conn_window})")
                if w < 0:
                    self.violations.append(f"DATA beyond stream {f.stream_id}'s window ({w})")
                if self.auto_window and n:
                    self.recv_conn_window += n
                    replies.append(self._wu(0, n))
                    if "END_STREAM" not in f.flags:
                        self.recv_stream_window[f.stream_id] += n
                        replies.append(self._wu(f.stream_id, n))
            elif isinstance(f, SettingsFrame):
                if "ACK" in f.flags:
                    self.settings_acks += 1
                else:
                    old_iws = self.worker_settings.get(S.INITIAL_WINDOW_SIZE, DEFAULT_WINDOW)
                    self.worker_settings.update(f.settings)
                    self.worker_settings_seen = True
                    delta = self.worker_settings.get(S.INITIAL_WINDOW_SIZE, DEFAULT_WINDOW) - old_iws
                    for sid in self.send_stream_window:
                        self.send_stream_window[sid] += delta
                    if S.HEADER_TABLE_SIZE in f.settings:
                        self.encoder.header_table_size = f.settings[S.HEADER_TABLE_SIZE]
                    if self.auto_ack_settings:
                        # A real proxy writes its own SETTINGS before it reads
                        # anything; never let our ACK overtake them.
                        if self._settings_sent:
                            replies.append(SettingsFrame(0, flags=["ACK"]))
                        else:
                            self._ack_pending = True
            elif isinstance(f, WindowUpdateFrame):
                if f.stream_id == 0:
                    self.send_conn_window += f.window_increment
                elif f.stream_id in self.send_stream_window:
                    self.send_stream_window[f.stream_id] += f.window_increment
            elif isinstance(f, PingFrame):
                if "ACK" not in f.flags and self.auto_ack_ping:
                    replies.append(PingFrame(0, opaque_data=f.opaque_data, flags=["ACK"]))
            self.frames.append(f)
            self.cond.notify_all()
        for r in replies:
            try:
                self.send_frame(r)
            except OSError:
                pass

    def _decode(self, f: HeadersFrame, block: bytes) -> None:
        try:
            pairs = self.decoder.decode(block, raw=True)
        except Exception as e:
            self.violations.append(f"HPACK decode failed on stream {f.stream_id}: {e!r}")
            f.decoded = []  # type: ignore[attr-defined]
            return
        f.decoded = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in pairs]  # type: ignore[attr-defined]

    # -- waiting -------------------------------------------------------------------

    def wait_until(self, cond: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT, what: str = "condition") -> None:
        with self.cond:
            if not self.cond.wait_for(cond, timeout):
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; frames: {self.dump()}")

    def wait_for(self, pred: Callable[[Frame], bool], timeout: float = DEFAULT_TIMEOUT, *, start: int = 0,
                 what: str | None = None) -> Frame:
        """First received frame (from index ``start``) matching ``pred``; bounded."""
        found: list[Frame] = []

        def check() -> bool:
            for f in self.frames[start:]:
                if pred(f):
                    found.append(f)
                    return True
            return False

        self.wait_until(check, timeout, what or "a matching frame")
        return found[0]

    def find(self, pred: Callable[[Frame], bool], start: int = 0, end: int | None = None) -> list[Frame]:
        with self.cond:
            return [f for f in self.frames[start:end] if pred(f)]

    def mark(self) -> int:
        """Index of the next frame to arrive (for ``start=``)."""
        with self.cond:
            return len(self.frames)

    def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.wait_until(lambda: self.eof, timeout, "the worker to close the connection")

    def wait_goaway(self, timeout: float = DEFAULT_TIMEOUT, start: int = 0) -> GoAwayFrame:
        return self.wait_for(lambda f: isinstance(f, GoAwayFrame), timeout, start=start,  # type: ignore[return-value]
                             what="GOAWAY")

    def wait_headers(self, stream_id: int, timeout: float = DEFAULT_TIMEOUT, start: int = 0) -> HeadersFrame:
        return self.wait_for(  # type: ignore[return-value]
            lambda f: (isinstance(f, HeadersFrame) and f.stream_id == stream_id
                       and getattr(f, "decoded", None) is not None),
            timeout, start=start, what=f"complete HEADERS on stream {stream_id}")

    def wait_rst(self, stream_id: int, timeout: float = DEFAULT_TIMEOUT, start: int = 0) -> RstStreamFrame:
        return self.wait_for(  # type: ignore[return-value]
            lambda f: isinstance(f, RstStreamFrame) and f.stream_id == stream_id,
            timeout, start=start, what=f"RST_STREAM on stream {stream_id}")

    def barrier(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """PING the worker and wait for the ACK; returns the ACK's frame index.

        Everything the worker queued in reaction to frames sent before the
        PING is in ``frames`` before the ACK (one reader thread, one ordered
        output buffer).
        """
        self._ping_seq += 1
        payload = b"B" + self._ping_seq.to_bytes(7, "big")
        self.send_ping(payload)
        ack = self.wait_for(lambda f: isinstance(f, PingFrame) and "ACK" in f.flags and f.opaque_data == payload,
                            timeout, what="barrier PING ACK")
        with self.cond:
            return self.frames.index(ack)

    def stream_frames(self, stream_id: int) -> list[Frame]:
        with self.cond:
            return [f for f in self.frames if getattr(f, "stream_id", None) == stream_id]

    def _stream_done(self, stream_id: int) -> bool:
        for f in self.frames:
            if f.stream_id != stream_id:
                continue
            if isinstance(f, RstStreamFrame):
                return True
            if isinstance(f, (DataFrame, HeadersFrame)) and "END_STREAM" in f.flags:
                if isinstance(f, HeadersFrame) and getattr(f, "decoded", None) is None:
                    return False
                return True
        return False

    def response(self, stream_id: int, timeout: float = DEFAULT_TIMEOUT) -> Response:
        """Wait until the stream ends (END_STREAM or RST_STREAM) and assemble what came."""
        self.wait_until(lambda: self._stream_done(stream_id) or self.eof, timeout,
                        f"stream {stream_id} to end")
        return self.collect(stream_id)

    def collect(self, stream_id: int) -> Response:
        r = Response(stream_id)
        body = bytearray()
        with self.cond:
            for f in self.frames:
                if f.stream_id != stream_id:
                    continue
                r.frames.append(f)
                if isinstance(f, HeadersFrame):
                    hs = getattr(f, "decoded", None) or []
                    if r.status is None or (r.status < 200 and hs and hs[0][0] == ":status"):
                        status = int(dict(hs).get(":status", "0"))
                        fields = [(k, v) for k, v in hs if not k.startswith(":")]
                        if status < 200:
                            r.informational.append(fields)
                        else:
                            r.status, r.headers = status, fields
                    else:
                        r.trailers = list(hs)
                    if "END_STREAM" in f.flags:
                        r.ended = True
                elif isinstance(f, DataFrame):
                    body += f.data
                    if "END_STREAM" in f.flags:
                        r.ended = True
                elif isinstance(f, RstStreamFrame):
                    if r.reset is None:
                        r.reset = f.error_code
        r.body = bytes(body)
        return r

    def dump(self, last: int = 40) -> str:
        out = []
        for f in self.frames[-last:]:
            s = repr(f)
            if isinstance(f, HeadersFrame):
                s += f" decoded={getattr(f, 'decoded', None)!r}"[:300]
            elif isinstance(f, DataFrame):
                s = f"DataFrame(stream_id={f.stream_id}, flags={sorted(f.flags)}, len={len(f.data)})"
            out.append(s)
        return "\n  " + "\n  ".join(out) + f"\n  eof={self.eof} violations={self.violations}"

    # -- sending -----------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def send_frame(self, *frames: Frame) -> None:
        self.send_raw(b"".join(f.serialize() for f in frames))

    @staticmethod
    def _wu(stream_id: int, n: int) -> WindowUpdateFrame:
        f = WindowUpdateFrame(stream_id)
        f.window_increment = n
        return f

    def send_settings(self, settings: dict[int, int] | None = None, ack: bool = False) -> None:
        if ack:
            self.send_frame(SettingsFrame(0, flags=["ACK"]))
            return
        settings = dict(settings or {})
        with self.cond:
            self.local_settings.update(settings)
            if S.INITIAL_WINDOW_SIZE in settings:
                delta = settings[S.INITIAL_WINDOW_SIZE] - self.local_initial_window
                self.local_initial_window = settings[S.INITIAL_WINDOW_SIZE]
                for sid in self.recv_stream_window:
                    self.recv_stream_window[sid] += delta
            if S.MAX_FRAME_SIZE in settings:
                # take the larger until ACKed: the worker may still use the old value
                self.local_max_frame_size = max(self.local_max_frame_size, settings[S.MAX_FRAME_SIZE])
            if S.HEADER_TABLE_SIZE in settings:
                self.decoder.max_allowed_table_size = settings[S.HEADER_TABLE_SIZE]
            frames: list[Frame] = [SettingsFrame(0, settings=settings)]
            if not self._settings_sent:
                self._settings_sent = True
                if self._ack_pending:
                    self._ack_pending = False
                    frames.append(SettingsFrame(0, flags=["ACK"]))
            # sent under the condition so the reader cannot slip an ACK in first
            self.send_frame(*frames)

    def send_window_update(self, stream_id: int, increment: int) -> None:
        with self.cond:
            if stream_id == 0:
                self.recv_conn_window += increment
            else:
                self.recv_stream_window[stream_id] = (
                    self.recv_stream_window.get(stream_id, self.local_initial_window) + increment)
        self.send_frame(self._wu(stream_id, increment))

    def send_ping(self, data: bytes = b"\0" * 8, ack: bool = False) -> None:
        self.send_frame(PingFrame(0, opaque_data=data, flags=["ACK"] if ack else []))

    def send_goaway(self, last_stream_id: int, code: int = ErrorCodes.NO_ERROR, debug: bytes = b"") -> None:
        self.send_frame(GoAwayFrame(0, last_stream_id=last_stream_id, error_code=code, additional_data=debug))

    def send_rst(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        self.send_frame(RstStreamFrame(stream_id, error_code=code))

    def encode(self, headers: Iterable[tuple[str | bytes, str | bytes]]) -> bytes:
        return self.encoder.encode([(_b(k), _b(v)) for k, v in headers])

    def send_headers(
        self,
        stream_id: int,
        headers: Iterable[tuple[str | bytes, str | bytes]],
        *,
        end_stream: bool = False,
        split: Sequence[int] = (),
        end_headers: bool = True,
    ) -> bytes:
        """Send a header block; ``split`` gives cut offsets for CONTINUATION frames.

        With ``end_headers=False`` the block is left open (the caller sends the
        CONTINUATION frames).  Returns the encoded block.
        """
        block = self.encode(headers)
        cuts = [0, *[c for c in split if 0 < c < len(block)], len(block)]
        limit = self.worker_settings.get(S.MAX_FRAME_SIZE, 16384)
        parts = []
        for a, b in itertools.pairwise(cuts):
            parts.append(block[a:b])
            while len(parts[-1]) > limit:  # never exceed the worker's MAX_FRAME_SIZE
                head = parts.pop()
                parts += [head[:limit], head[limit:]]
        frames: list[Frame] = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = []
            if last and end_headers:
                flags.append("END_HEADERS")
            if i == 0:
                if end_stream:
                    flags.append("END_STREAM")
                frames.append(HeadersFrame(stream_id, data=part, flags=flags))
            else:
                frames.append(ContinuationFrame(stream_id, data=part, flags=flags))
        with self.cond:
            self.recv_stream_window.setdefault(stream_id, self.local_initial_window)
            self.send_stream_window.setdefault(
                stream_id, self.worker_settings.get(S.INITIAL_WINDOW_SIZE, DEFAULT_WINDOW))
        self.send_frame(*frames)
        return block

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False, pad: int | None = None) -> None:
        """One DATA frame, no flow-control checks (the caller is responsible)."""
        f = DataFrame(stream_id, data=data, flags=["END_STREAM"] if end_stream else [])
        if pad is not None:
            f.flags.add("PADDED")
            f.pad_length = pad
        n = f.flow_controlled_length
        with self.cond:
            self.send_conn_window -= n
            if stream_id in self.send_stream_window:
                self.send_stream_window[stream_id] -= n
        self.send_frame(f)

    def send_body(self, stream_id: int, data: bytes, *, end_stream: bool = True, pad: int | None = None,
                  timeout: float = DEFAULT_TIMEOUT) -> None:
        """Send ``data`` within the windows the worker granted, waiting for WINDOW_UPDATEs.

        With ``pad`` every DATA frame carries that much padding (which is
        flow controlled too: RFC 9113 §6.1).
        """
        overhead = 0 if pad is None else pad + 1
        view = memoryview(data)
        while view:
            with self.cond:
                def room() -> int:
                    return min(self.send_conn_window, self.send_stream_window.get(stream_id, 0),
                               self.worker_settings.get(S.MAX_FRAME_SIZE, 16384)) - overhead

                if not self.cond.wait_for(lambda: self.eof or room() > 0, timeout) or self.eof:
                    raise AssertionError(f"no send window on stream {stream_id} within {timeout}s "
                                         f"(conn {self.send_conn_window}, "
                                         f"stream {self.send_stream_window.get(stream_id)}); {self.dump()}")
                n = min(len(view), room())
            chunk, view = view[:n], view[n:]
            self.send_data(stream_id, bytes(chunk), end_stream=end_stream and not view, pad=pad)
        if not data and end_stream:
            self.send_data(stream_id, b"", end_stream=True)

    def request(
        self,
        stream_id: int,
        method: str = "GET",
        path: str = "/",
        *,
        authority: str | None = "example.com",
        scheme: str = "https",
        headers: Iterable[tuple[str | bytes, str | bytes]] = (),
        body: bytes | None = None,
        end_stream: bool | None = None,
        **kw: Any,
    ) -> None:
        """HEADERS for a request, then ``body`` (flow controlled).

        The request ends (END_STREAM) unless ``end_stream=False``, which leaves
        it open for more DATA or trailers.
        """
        hs: list[tuple[str | bytes, str | bytes]] = [(":method", method), (":scheme", scheme), (":path", path)]
        if authority is not None:
            hs.append((":authority", authority))
        hs.extend(headers)
        if end_stream is None:
            end_stream = True
        self.send_headers(stream_id, hs, end_stream=end_stream and body is None, **kw)
        if body is not None:
            self.send_body(stream_id, body, end_stream=end_stream)


# -- the worker under test -------------------------------------------------------------


def worker_options(**kw: Any) -> WorkerOptions:
    """``WorkerOptions`` for a harness worker: ``kw`` over the defaults (no proxy is dialled, no file read).

    The peer's SETTINGS deadline (``handshake_timeout``) is 5 s unless given.
    """
    kw.setdefault("handshake_timeout", 5.0)
    return WorkerOptions(proxy="127.0.0.1:9", cert="unused.crt", key="unused.key", **kw)


class WorkerHarness:
    """A worker-role tunnel on one end of a socketpair, an app pool, and an H2Peer on the other.

    ``options`` (see :func:`worker_options`) configures the protocol core, the
    tunnel and the stream policy alike, as in a ``WorkerPool``.
    """

    def __init__(
        self,
        app: Callable[..., Any],
        *,
        options: WorkerOptions | None = None,
        peer_settings: dict[int, int] | None = None,
        peer_conn_window: int | None = None,
        handshake: bool = True,
        threads: int = 16,
        auto_ack_ping: bool = True,
        auto_window: bool = True,
        auto_ack_settings: bool = True,
        tunnel_kw: dict[str, Any] | None = None,
        ctx_kw: dict[str, Any] | None = None,
        connect_handlers: dict[str | None, Callable[..., None]] | None = None,
    ) -> None:
        a, b = socket.socketpair()
        self.pool = AppThreadPool(threads, name="test-app")
        self.ctx = WSGIContext(app, **(ctx_kw or {}))
        self.options = options = options or worker_options()
        self.proto = TunnelProtocol("server", options)
        #: streams handed to the app pool
        self.dispatched = 0
        #: stream handlers (run_wsgi) that returned: the app thread is free again
        self.served = 0
        self._served_cond = threading.Condition()
        self.streams = StreamPolicy(options, self.ctx, self._submit, connect_handlers=connect_handlers or {})
        self.tunnel = Tunnel(a, None, self.proto, options, name="worker", streams=self.streams,
                             **(tunnel_kw or {}))
        self.reason: str | None = None
        self.thread = threading.Thread(target=self._run, name="worker-tunnel", daemon=True)
        self.peer = H2Peer(b, auto_ack_ping=auto_ack_ping, auto_window=auto_window,
                           auto_ack_settings=auto_ack_settings)
        self.thread.start()
        self.peer.start()
        if handshake:
            self.peer.handshake(peer_settings, conn_window=peer_conn_window)
            assert self.tunnel.ready.wait(DEFAULT_TIMEOUT), "worker tunnel never became ready"

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.dispatched += 1
        self.pool.submit(self._serve, fn, args)

    def _serve(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)  # (the policy's runner: the handler, then ch.handler_done())
        finally:
            with self._served_cond:
                self.served += 1
                self._served_cond.notify_all()

    def wait_served(self, n: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        with self._served_cond:
            if not self._served_cond.wait_for(lambda: self.served >= n, timeout):
                raise AssertionError(f"only {self.served} of {n} app calls returned within {timeout}s")

    def _run(self) -> None:
        self.reason = self.tunnel.run()

    def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        assert self.tunnel.closed.wait(timeout), f"tunnel still open after {timeout}s; {self.peer.dump()}"
        return self.tunnel.close_reason or ""

    def wait_in_flight(self, n: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.tunnel.in_flight != n:  # (a plain len() read: no lock needed)
            if time.monotonic() >= deadline:
                raise AssertionError(f"in_flight is {self.tunnel.in_flight}, expected {n}")
            time.sleep(0.005)

    def close(self) -> None:
        self.tunnel.close("test teardown")
        self.thread.join(DEFAULT_TIMEOUT)
        self.peer.close()
        pool_ok = self.pool.shutdown(DEFAULT_TIMEOUT)
        assert not self.thread.is_alive(), "worker tunnel thread did not exit"
        assert pool_ok, "app threads did not exit (an app is still blocked)"
        assert not self.peer.violations, f"worker broke the protocol: {self.peer.violations}"


@pytest.fixture
def make_worker() -> Any:
    """Factory fixture: ``h = make_worker(app, options=worker_options(...), peer_settings=...)``.

    Teardown closes every harness and asserts no thread was left behind.
    """
    before = set(threading.enumerate())
    made: list[WorkerHarness] = []

    def factory(app: Callable[..., Any], **kw: Any) -> WorkerHarness:
        h = WorkerHarness(app, **kw)
        made.append(h)
        return h

    yield factory
    errors = []
    for h in made:
        try:
            h.close()
        except AssertionError as e:
            errors.append(str(e))
    deadline = time.monotonic() + DEFAULT_TIMEOUT
    while True:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra or time.monotonic() > deadline:
            break
        extra[0].join(max(0.0, deadline - time.monotonic()))
    if extra:
        errors.append(f"leftover threads: {extra}")
    assert not errors, "; ".join(errors)

