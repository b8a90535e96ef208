"""Raw-frame HTTP/2 test peers: one frame machine, two roles.

A test that must send exactly the bytes it wants (split header blocks,
interleaved frames, tiny windows, bogus first frames, malformed responses,
floods) and look at exactly the frames that come back talks to the real thing
through one of these peers.  Frames are built with ``hyperframe`` and an
``hpack.Encoder`` that validates nothing (no lower-casing, no CR/LF check);
no rhttp_wsgi code runs on the peer's side.

* :class:`ProxyPeer` plays the *proxy* against a worker-role tunnel
  (``tests/tunnel``: the worker's ``Tunnel`` on the other end of a
  ``socket.socketpair()``, plaintext).  It reads the worker's client preface
  (the proxy never sends one), sends requests and assembles responses.
* :class:`WorkerPeer` plays the *worker* against the real proxy
  (``tests/integration``): it dials the tunnel listener over real mTLS, sends
  the client preface and its SETTINGS, and hands every complete request to
  ``responder(peer, stream_id, request)`` on its reader thread (the default,
  :func:`answer_ok`, answers ``200`` with ``ok <path>``; a responder that
  returns without answering leaves the stream open for the test).

What both do on their own (each can be switched off):

* ACK the other side's SETTINGS (``auto_ack_settings``), but never before their
  own SETTINGS went out (the other side requires SETTINGS as the first frame);
* ACK its PINGs (``auto_ack_ping``);
* return flow-control credit for every DATA frame received (``auto_window``);
* decode every header block (HEADERS + CONTINUATIONs): the HEADERS frame gets
  ``.decoded`` (a list of ``(str, str)``) once its block is complete, ``None``
  before, and ``.block_frames`` (how many frames the block took).

They also *check* the other side continuously and record anything wrong in
``violations`` (the tunnel harness asserts the list is empty at teardown): a
bad preface, DATA beyond the window granted, frames larger than our
MAX_FRAME_SIZE, a frame inside another stream's header block, a stray
CONTINUATION, a header block that does not HPACK-decode, an unparsable frame.

Every wait is bounded and condition-based: ``wait_for(pred, timeout)`` blocks
on a condition variable that the reader thread notifies per frame;
``barrier()`` sends a PING and waits for its ACK, which proves the other side
processed everything sent before it (frames are handled in order by one
reader, and their replies are queued in order).

Threads: one reader per peer.  Over TLS, ``TLSSession`` is not thread-safe:
the transport's ``tls_lock`` guards every encrypt/decrypt, and its
``send_lock`` keeps encrypt + ``sendall`` in order (a record encrypted first is
sent first); the reader never takes ``send_lock`` while it holds ``tls_lock``.
"""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import hpack
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

from rhttp_wsgi._protocol import PREFACE
from rhttp_wsgi.tls import TLSSession, client_context

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_WINDOW",
    "ProxyPeer",
    "RawPeer",
    "Request",
    "Responder",
    "Response",
    "S",
    "WorkerPeer",
    "answer_ok",
    "hpack_bomb",
]

DEFAULT_TIMEOUT = 5.0
DEFAULT_WINDOW = 65535

Fields = Iterable[tuple[str | bytes, str | bytes]]


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


def hpack_bomb(encoder: hpack.Encoder, fields: Fields, refs: int) -> tuple[bytes, bytes]:
    """Two header blocks of ``fields``: the first puts a ~4 KB ``x-bomb`` value in the dynamic table,
    the second refers to it ``refs`` times (one byte each: ~4 KB per byte once expanded)."""
    base = [(_b(k), _b(v)) for k, v in fields]
    first = encoder.encode([*base, (b"x-bomb", b"b" * 4000)])
    # the newest dynamic entry is index 62; each reference is one byte
    second = encoder.encode(base) + bytes([0x80 | 62]) * refs
    check = hpack.Decoder(max_header_list_size=1 << 30)
    check.decode(first)
    expanded: list[Any] = list(check.decode(second))
    assert expanded.count(("x-bomb", "b" * 4000)) == refs  # it really is a bomb
    return first, second


# -- transports ----------------------------------------------------------------------------------


class Transport(Protocol):
    sock: socket.socket

    def send(self, data: bytes) -> None: ...

    def recv(self) -> bytes | None:
        """Plaintext received (possibly empty); None at EOF."""


class PlainTransport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> bytes | None:
        return self.sock.recv(65536) or None


class TLSTransport:
    """A finished client-side ``TLSSession`` over ``sock`` (see the module docstring for the locks)."""

    def __init__(self, sock: socket.socket, session: TLSSession) -> None:
        self.sock = sock
        self.session = session
        self.tls_lock = threading.Lock()
        self.send_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self.send_lock:
            with self.tls_lock:
                cipher = self.session.encrypt(data)
            self.sock.sendall(cipher)

    def recv(self) -> bytes | None:
        data = self.sock.recv(65536)
        if not data:
            return None
        with self.tls_lock:
            return self.session.decrypt(data)


# -- what came in on a stream -----------------------------------------------------------------------


@dataclass
class Response:
    """One stream's answer as the proxy-role peer saw it."""

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


@dataclass
class Request:
    """One request as the worker-role peer saw it."""

    stream_id: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    ended: bool = False

    def get(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    @property
    def path(self) -> str:
        return (self.get(b":path") or b"").decode("latin-1")


# -- the frame machine ------------------------------------------------------------------------------


class RawPeer:
    """Raw-frame HTTP/2 peer over a transport: reading, bookkeeping, waiting, sending.

    ``expect_preface``: the other side starts with the client preface (it is
    the worker, which dials).  Subclasses add what their role does with
    complete header blocks (:meth:`_received_locked`).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        expect_preface: bool,
        auto_ack_settings: bool = True,
        auto_ack_ping: bool = False,
        auto_window: bool = True,
        name: str = "peer",
    ) -> None:
        self.transport = transport
        self.sock = transport.sock
        self.name = name
        self.auto_ack_settings = auto_ack_settings
        self.auto_ack_ping = auto_ack_ping
        self.auto_window = auto_window
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.cond = threading.Condition()
        self._send_lock = threading.Lock()
        #: Every frame received, in order.
        self.frames: list[Frame] = []
        #: Every plaintext byte received, preface included.
        self.raw = bytearray()
        self.preface: bytes | None = None if expect_preface else b""
        self.eof = False
        self.read_error: BaseException | None = None
        self.violations: list[str] = []
        # what the other side advertised (its first SETTINGS, updated by later ones)
        self.remote_settings: dict[int, int] = {}
        self.remote_settings_seen = False
        self.settings_acks = 0
        # what we advertised
        self.local_settings: dict[int, int] = {}
        self.local_initial_window = DEFAULT_WINDOW
        self.local_max_frame_size = 16384
        # receive-side flow control (windows we granted)
        self.recv_conn_window = DEFAULT_WINDOW
        self.recv_stream_window: dict[int, int] = {}
        # send-side flow control (windows granted to us)
        self.send_conn_window = DEFAULT_WINDOW
        self.send_stream_window: dict[int, int] = {}
        self._block: list[Any] | None = None  # open header block (HEADERS + CONTINUATIONs)
        self._thread = threading.Thread(target=self._reader, name=f"{name}-reader", daemon=True)
        self._ping_seq = 0
        self._settings_sent = False
        self._ack_pending = False
        #: Cleared by pause_reading(): the reader stops calling recv() (a peer
        #: that does not read, so the other side's output backs up).
        self._reading = threading.Event()
        self._reading.set()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> RawPeer:
        self._thread.start()
        return self

    def pause_reading(self) -> None:
        """Stop reading from the socket (one recv() already in progress still completes)."""
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

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
        assert not self._thread.is_alive(), f"{self.name}: reader thread did not stop"

    # -- reading (reader thread) ------------------------------------------------

    def _reader(self) -> None:
        buf = bytearray()
        try:
            while True:
                self._reading.wait()
                data = self.transport.recv()
                if data is None:
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
        except OSError as e:  # a closed or reset socket: the end
            self.read_error = e
        except Exception as e:  # a parse error (or a TLS alert) is the other side's doing
            self.read_error = e
            with self.cond:
                self.violations.append(f"unparsable input from {self.name}'s peer: {e!r}")
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def _on_frame(self, f: Frame) -> None:
        replies: list[Frame] = []
        then: Callable[[], None] | None = None
        with self.cond:
            if self._block is not None and not (
                isinstance(f, ContinuationFrame) and f.stream_id == self._block[0].stream_id
            ):
                self.violations.append(f"{f!r} inside a header block")
            block: HeadersFrame | None = None  # the HEADERS frame whose block this frame completes
            if isinstance(f, HeadersFrame):
                f.decoded = None  # type: ignore[attr-defined]
                f.block_frames = 1  # type: ignore[attr-defined]
                if "END_HEADERS" in f.flags:
                    self._decode(f, f.data)
                    block = f
                else:
                    self._block = [f]
            elif isinstance(f, ContinuationFrame):
                if self._block is None:
                    self.violations.append(f"stray {f!r}")
                else:
                    self._block.append(f)
                    if "END_HEADERS" in f.flags:
                        block = self._block[0]
                        block.block_frames = len(self._block)  # type: ignore[union-attr]
                        self._decode(block, b"".join(x.data for x in self._block))
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
                    old_iws = self.remote_settings.get(S.INITIAL_WINDOW_SIZE, DEFAULT_WINDOW)
                    self.remote_settings.update(f.settings)
                    self.remote_settings_seen = True
                    delta = self.remote_settings.get(S.INITIAL_WINDOW_SIZE, DEFAULT_WINDOW) - old_iws
                    for sid in self.send_stream_window:
                        self.send_stream_window[sid] += delta
                    if S.HEADER_TABLE_SIZE in f.settings:
                        self.encoder.header_table_size = f.settings[S.HEADER_TABLE_SIZE]
                    if self.auto_ack_settings:
                        # A real peer writes its own SETTINGS before it reads
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
            then = self._received_locked(f, block)
            self.cond.notify_all()
        for r in replies:
            try:
                self.send_frame(r)
            except OSError:
                pass
        if then is not None:
            then()

    def _received_locked(self, f: Frame, block: HeadersFrame | None) -> Callable[[], None] | None:
        """Role hook, lock held: ``f`` was recorded; ``block`` is the HEADERS frame whose header block
        ``f`` completed (else None).  May return a callable to run on the reader thread, lock released."""
        return None

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
                raise AssertionError(f"{self.name}: timed out after {timeout}s waiting for {what}; "
                                     f"frames: {self.dump()}")

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

    def find(self, what: Callable[[Frame], bool] | type[Frame], stream_id: int | None = None, *,
             start: int = 0, end: int | None = None) -> list[Any]:
        """Frames received (in ``[start:end]``) matching a predicate or of a frame type (on ``stream_id``)."""
        pred: Callable[[Frame], bool] = (
            (lambda f: isinstance(f, what)) if isinstance(what, type) else what)  # type: ignore[arg-type]
        with self.cond:
            return [f for f in self.frames[start:end]
                    if pred(f) and (stream_id is None or f.stream_id == stream_id)]

    def goaways(self) -> list[GoAwayFrame]:
        return self.find(GoAwayFrame)

    def mark(self) -> int:
        """Index of the next frame to arrive (for ``start=``)."""
        with self.cond:
            return len(self.frames)

    def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.wait_until(lambda: self.eof, timeout, "the other side to close the connection")

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
        """PING the other side and wait for the ACK; returns the ACK's frame index.

        Everything it queued in reaction to frames sent before the PING is in
        ``frames`` before the ACK (one reader thread, one ordered output buffer).
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

    # -- sending (any thread) -----------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        with self._send_lock:
            self.transport.send(data)

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
                # take the larger until ACKed: the other side may still use the old value
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

    def encode(self, headers: Fields) -> bytes:
        return self.encoder.encode([(_b(k), _b(v)) for k, v in headers])

    def headers_frame(self, stream_id: int, headers: Fields, *, end_stream: bool = False) -> HeadersFrame:
        """One complete HEADERS frame (END_HEADERS), encoded now: HPACK order is call order."""
        flags = ["END_HEADERS", "END_STREAM"] if end_stream else ["END_HEADERS"]
        return HeadersFrame(stream_id, data=self.encode(headers), flags=flags)

    @staticmethod
    def data_frame(stream_id: int, data: bytes, *, end_stream: bool = False) -> DataFrame:
        return DataFrame(stream_id, data=data, flags=["END_STREAM"] if end_stream else [])

    def send_headers(
        self,
        stream_id: int,
        headers: Fields,
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
        limit = self.remote_settings.get(S.MAX_FRAME_SIZE, 16384)
        parts = []
        for a, b in itertools.pairwise(cuts):
            parts.append(block[a:b])
            while len(parts[-1]) > limit:  # never exceed the other side's MAX_FRAME_SIZE
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
                stream_id, self.remote_settings.get(S.INITIAL_WINDOW_SIZE, DEFAULT_WINDOW))
        self.send_frame(*frames)
        return block

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False, pad: int | None = None) -> None:
        """One DATA frame, no flow-control checks (the caller is responsible)."""
        f = self.data_frame(stream_id, data, end_stream=end_stream)
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
        """Send ``data`` within the windows granted to us, waiting for WINDOW_UPDATEs.

        With ``pad`` every DATA frame carries that much padding (which is
        flow controlled too: RFC 9113 §6.1).
        """
        overhead = 0 if pad is None else pad + 1
        view = memoryview(data)
        while view:
            with self.cond:
                def room() -> int:
                    return min(self.send_conn_window, self.send_stream_window.get(stream_id, 0),
                               self.remote_settings.get(S.MAX_FRAME_SIZE, 16384)) - overhead

                if not self.cond.wait_for(lambda: self.eof or room() > 0, timeout) or self.eof:
                    raise AssertionError(f"no send window on stream {stream_id} within {timeout}s "
                                         f"(conn {self.send_conn_window}, "
                                         f"stream {self.send_stream_window.get(stream_id)}); {self.dump()}")
                n = min(len(view), room())
            chunk, view = view[:n], view[n:]
            self.send_data(stream_id, bytes(chunk), end_stream=end_stream and not view, pad=pad)
        if not data and end_stream:
            self.send_data(stream_id, b"", end_stream=True)


# -- the two roles --------------------------------------------------------------------------------------


class ProxyPeer(RawPeer):
    """The proxy's half over a plaintext socket: no preface, sends requests, assembles responses.

    Call :meth:`start`, then :meth:`handshake` (or send frames by hand).
    """

    def __init__(self, sock: socket.socket, *, auto_ack_settings: bool = True, auto_ack_ping: bool = False,
                 auto_window: bool = True, name: str = "proxy-peer") -> None:
        super().__init__(PlainTransport(sock), expect_preface=True, auto_ack_settings=auto_ack_settings,
                         auto_ack_ping=auto_ack_ping, auto_window=auto_window, name=name)

    def handshake(self, settings: dict[int, int] | None = None, *, conn_window: int | None = None,
                  timeout: float = DEFAULT_TIMEOUT) -> None:
        """Send our SETTINGS (no preface), wait for the worker's SETTINGS and its ACK of ours."""
        self.send_settings(settings or {})
        if conn_window is not None and conn_window > DEFAULT_WINDOW:
            self.send_window_update(0, conn_window - DEFAULT_WINDOW)
        self.wait_until(lambda: self.remote_settings_seen and self.settings_acks >= 1, timeout,
                        "worker SETTINGS and SETTINGS ACK")

    def request(
        self,
        stream_id: int,
        method: str = "GET",
        path: str = "/",
        *,
        authority: str | None = "example.com",
        scheme: str = "https",
        headers: Fields = (),
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

    def stream_done(self, stream_id: int) -> bool:
        """The stream ended (END_STREAM on a complete block, or RST_STREAM)."""
        with self.cond:
            for f in self.frames:
                if f.stream_id != stream_id:
                    continue
                if isinstance(f, RstStreamFrame):
                    return True
                if isinstance(f, (DataFrame, HeadersFrame)) and "END_STREAM" in f.flags:
                    return not (isinstance(f, HeadersFrame) and getattr(f, "decoded", None) is None)
            return False

    def response(self, stream_id: int, timeout: float = DEFAULT_TIMEOUT) -> Response:
        """Wait until the stream ends (END_STREAM or RST_STREAM) and assemble what came."""
        self.wait_until(lambda: self.stream_done(stream_id) or self.eof, timeout,
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


Responder = Callable[["WorkerPeer", int, Request], None]


def answer_ok(w: WorkerPeer, sid: int, req: Request) -> None:
    w.respond(sid, 200, f"ok {req.path}".encode())


class WorkerPeer(RawPeer):
    """The worker's half: dials ``127.0.0.1:port`` over mTLS, sends the preface and SETTINGS, serves requests.

    Started on construction.  ``settings`` are its first SETTINGS (default:
    MAX_CONCURRENT_STREAMS 100, INITIAL_WINDOW_SIZE 1 MiB).  Sending never
    raises: once the proxy closed the tunnel, the test looks at what it sent.
    """

    def __init__(self, port: int, cert: str, key: str, ca: str, *, responder: Responder = answer_ok,
                 settings: dict[int, int] | None = None, auto_ack_ping: bool = True,
                 name: str = "raw-worker") -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=DEFAULT_TIMEOUT)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = TLSSession(client_context(cert, key, ca), server_side=False, verify_name="127.0.0.1")
            session.handshake(sock, DEFAULT_TIMEOUT)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        super().__init__(TLSTransport(sock, session), expect_preface=False, auto_ack_ping=auto_ack_ping,
                         name=name)
        self.responder = responder
        self.requests: dict[int, Request] = {}
        self.send_raw(PREFACE)
        self.send_settings(settings if settings is not None else {
            S.MAX_CONCURRENT_STREAMS: 100, S.INITIAL_WINDOW_SIZE: 1 << 20})
        self.start()

    def send_raw(self, data: bytes) -> None:
        try:
            super().send_raw(data)
        except OSError:
            pass  # the proxy closed the tunnel: the test looks at what it sent

    def _received_locked(self, f: Frame, block: HeadersFrame | None) -> Callable[[], None] | None:
        complete: Request | None = None
        if block is not None:
            req = self.requests.get(block.stream_id)
            ended = "END_STREAM" in block.flags
            if req is None:
                fields = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in block.decoded]  # type: ignore[attr-defined]
                req = self.requests[block.stream_id] = Request(block.stream_id, fields, ended=ended)
                complete = req if ended else None
            else:  # trailers
                req.ended = ended
                complete = req if ended else None
        elif isinstance(f, DataFrame):
            req = self.requests.get(f.stream_id)
            if req is not None:
                req.body += f.data
                if "END_STREAM" in f.flags:
                    req.ended = True
                    complete = req
        if complete is None:
            return None
        done = complete
        return lambda: self.responder(self, done.stream_id, done)

    def respond(self, sid: int, status: int | bytes, body: bytes = b"",
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
        code = status if isinstance(status, bytes) else str(status).encode()
        hs = [(b":status", code), (b"content-length", str(len(body)).encode()), *(headers or [])]
        if body:
            self.send_frame(self.headers_frame(sid, hs), self.data_frame(sid, body, end_stream=True))
        else:
            self.send_frame(self.headers_frame(sid, hs, end_stream=True))

    def wait_request(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> Request:
        found: list[Request] = []

        def check() -> bool:
            for r in self.requests.values():
                if r.path == path and r.ended:
                    found.append(r)
                    return True
            return False

        self.wait_until(check, timeout, f"request {path}")
        return found[0]
