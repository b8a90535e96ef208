"""A small RFC 6455 server endpoint for the demo app, with no dependency beyond the standard library.

``rhttp-wsgi demo`` must work after a plain ``pip install .`` (no wsproto, no simple-websocket), so its
WebSocket panel speaks the protocol itself.  Two layers:

* :class:`ServerProtocol` is sans-IO: bytes in (:meth:`ServerProtocol.receive_data`), events out,
  bytes to send collected in :meth:`ServerProtocol.data_to_send`.  It validates what a server must
  (client frames masked, no reserved bits without an extension, control frames short and unfragmented,
  continuation order, UTF-8 text, close codes) and answers PING and CLOSE by itself.
* :class:`WebSocket` drives it over the socket-like object a WSGI server offers for an upgrade
  (``environ["werkzeug.socket"]`` / ``environ["gunicorn.socket"]``: ``recv``, ``sendall`` or ``send``,
  ``close``); one thread reads, any thread may send (a lock keeps frames whole).

No extension is negotiated (permessage-deflate offers are declined by not echoing them).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("rhttp_wsgi.demo")

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_DATA_OPS = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY})
_CONTROL_OPS = frozenset({OP_CLOSE, OP_PING, OP_PONG})

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005  # never sent: "the close frame had no code"
CLOSE_ABNORMAL = 1006  # never sent: "the connection ended without a close frame"
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009

#: Largest message (after reassembly) the demo accepts; the echo box sends a line of text.
MAX_MESSAGE = 1 << 20


class ProtocolError(Exception):
    """The peer broke RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def valid_key(key: str | None) -> bool:
    """A ``Sec-WebSocket-Key`` is the base64 of 16 bytes."""
    if not key:
        return False
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError):
        return False


def _valid_close_code(code: int) -> bool:
    # Codes a peer may put on the wire (RFC 6455 7.4.1 and the IANA registry); 1004-1006 and 1015 are reserved.
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or 3000 <= code <= 4999


def mask_bytes(mask: bytes, data: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (masking and unmasking are the same operation)."""
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None) -> bytes:
    """One frame; servers send unmasked (``mask`` None), clients pass a 4-byte ``mask``."""
    n = len(payload)
    head = bytearray([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask is not None else 0
    if n < 126:
        head.append(mask_bit | n)
    elif n < 1 << 16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", n)
    if mask is not None:
        if len(mask) != 4:
            raise ValueError("a mask is 4 bytes")
        return bytes(head) + mask + mask_bytes(mask, payload)
    return bytes(head) + payload


def encode_close(code: int, reason: str = "") -> bytes:
    """A CLOSE frame's payload: the code, then the reason (UTF-8, cut to fit a control frame)."""
    return struct.pack("!H", code) + reason.encode("utf-8")[:123]


@dataclass(frozen=True)
class Frame:
    fin: bool
    opcode: int
    payload: bytes


class FrameParser:
    """Frames out of a byte stream, however it is split; checks the framing rules of RFC 6455 5.2."""

    def __init__(self, *, require_mask: bool = True, max_payload: int = MAX_MESSAGE) -> None:
        self.require_mask = require_mask
        self.max_payload = max_payload
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> Frame | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        fin, opcode = bool(b0 & 0x80), b0 & 0x0F
        if b0 & 0x70:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
        if opcode not in _DATA_OPS and opcode not in _CONTROL_OPS:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        masked = bool(b1 & 0x80)
        if masked != self.require_mask:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR,
                                "client frames must be masked" if self.require_mask else "server frames are not masked")
        length = b1 & 0x7F
        pos = 2
        if opcode in _CONTROL_OPS and (length > 125 or not fin):
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "control frames are unfragmented and at most 125 bytes")
        if length == 126:
            if len(buf) < 4:
                return None
            (length,) = struct.unpack_from("!H", buf, 2)
            pos = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            (length,) = struct.unpack_from("!Q", buf, 2)
            if length >> 63:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "payload length has its top bit set")
            pos = 10
        if length > self.max_payload:
            raise ProtocolError(CLOSE_TOO_BIG, f"frame of {length} bytes (limit {self.max_payload})")
        mask = b""
        if masked:
            if len(buf) < pos + 4:
                return None
            mask = bytes(buf[pos:pos + 4])
            pos += 4
        if len(buf) < pos + length:
            return None
        payload = bytes(buf[pos:pos + length])
        del buf[:pos + length]
        return Frame(fin, opcode, mask_bytes(mask, payload) if masked else payload)


@dataclass(frozen=True)
class Message:
    """A whole data message: ``str`` for text, ``bytes`` for binary."""

    data: str | bytes


@dataclass(frozen=True)
class Closed:
    """The closing handshake is over (or the peer broke the protocol): ``code`` as the peer sent it
    (1005 when its CLOSE had none, 1006 when the connection ended without one)."""

    code: int
    reason: str = ""


Event = Message | Closed


class ServerProtocol:
    """The server side of one WebSocket, sans-IO.

    Feed received bytes to :meth:`receive_data`; it returns whole messages and, last, :class:`Closed`.
    Frames to send (including the automatic PONG and CLOSE replies) accumulate until
    :meth:`data_to_send` takes them.
    """

    def __init__(self, *, max_message: int = MAX_MESSAGE) -> None:
        self._parser = FrameParser(require_mask=True, max_payload=max_message)
        self.max_message = max_message
        self._out = bytearray()
        self._fragments: list[bytes] = []
        self._fragment_op: int | None = None
        self._fragment_len = 0
        #: We sent our CLOSE (we may send nothing else after it).
        self.close_sent = False
        #: The exchange is over: no more events, nothing more to read.
        self.closed = False

    # -- sending ----------------------------------------------------------------

    def send_text(self, text: str) -> None:
        self._send(OP_TEXT, text.encode("utf-8"))

    def send_binary(self, data: bytes) -> None:
        self._send(OP_BINARY, data)

    def send_ping(self, data: bytes = b"") -> None:
        self._send(OP_PING, data[:125])

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Start the closing handshake (idempotent); then wait for the peer's CLOSE."""
        if not self.close_sent:
            self.close_sent = True
            self._out += encode_frame(OP_CLOSE, encode_close(code, reason))

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.close_sent:
            raise ConnectionError("the WebSocket is closing")
        self._out += encode_frame(opcode, payload)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- receiving --------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Events for ``data``; ``b""`` is the end of the connection."""
        if self.closed:
            return []
        if not data:
            self.closed = True
            return [Closed(CLOSE_ABNORMAL, "the connection ended without a close frame")]
        try:
            frames = self._parser.feed(data)
        except ProtocolError as e:
            return [self._fail(e)]
        events: list[Event] = []
        for frame in frames:
            try:
                event = self._frame(frame)
            except ProtocolError as e:
                events.append(self._fail(e))
                return events
            if event is not None:
                events.append(event)
                if isinstance(event, Closed):
                    return events
        return events

    def _fail(self, error: ProtocolError) -> Closed:
        log.info("demo websocket: closing with %d: %s", error.code, error.reason)
        self.close(error.code, error.reason)
        self.closed = True
        return Closed(error.code, error.reason)

    def _frame(self, frame: Frame) -> Event | None:
        op = frame.opcode
        if op == OP_PING:
            if not self.close_sent:
                self._out += encode_frame(OP_PONG, frame.payload)
            return None
        if op == OP_PONG:
            return None
        if op == OP_CLOSE:
            return self._peer_close(frame.payload)
        if op == OP_CONTINUATION:
            if self._fragment_op is None:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation frame with no message started")
        elif self._fragment_op is not None:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message before the previous one finished")
        else:
            self._fragment_op = op
        self._fragment_len += len(frame.payload)
        if self._fragment_len > self.max_message:
            raise ProtocolError(CLOSE_TOO_BIG, f"message over {self.max_message} bytes")
        self._fragments.append(frame.payload)
        if not frame.fin:
            return None
        whole = b"".join(self._fragments)
        kind = self._fragment_op
        self._fragments, self._fragment_op, self._fragment_len = [], None, 0
        if kind == OP_TEXT:
            try:
                return Message(whole.decode("utf-8"))
            except UnicodeDecodeError:
                raise ProtocolError(CLOSE_INVALID_DATA, "text message is not valid UTF-8") from None
        return Message(whole)

    def _peer_close(self, payload: bytes) -> Closed:
        if len(payload) == 1:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "close frame with a one-byte payload")
        code, reason = CLOSE_NO_STATUS, ""
        if payload:
            (code,) = struct.unpack_from("!H", payload)
            if not _valid_close_code(code):
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"close code {code} may not be sent")
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(CLOSE_INVALID_DATA, "close reason is not valid UTF-8") from None
        # Echo the peer's code (RFC 6455 5.5.1) unless we already sent our own CLOSE.
        self.close(CLOSE_NORMAL if code == CLOSE_NO_STATUS else code)
        self.closed = True
        return Closed(code, reason)


def handshake_response(key: str, subprotocol: str | None = None) -> bytes:
    """The ``101 Switching Protocols`` head a WSGI app writes to the upgraded socket."""
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Accept: {accept_key(key)}"]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def upgrade_socket(environ: dict[str, Any]) -> Any:
    """The socket-like object the server offers for an upgrade, or None (werkzeug's and gunicorn's keys)."""
    return environ.get("werkzeug.socket") or environ.get("gunicorn.socket")


def is_upgrade(environ: dict[str, Any]) -> bool:
    """Whether the request asks for a WebSocket (the HTTP/1.1 upgrade form a WSGI server presents)."""
    upgrade = environ.get("HTTP_UPGRADE", "").lower()
    connection = {t.strip().lower() for t in environ.get("HTTP_CONNECTION", "").split(",")}
    return environ.get("REQUEST_METHOD") == "GET" and upgrade == "websocket" and "upgrade" in connection


class WebSocket:
    """A server WebSocket over an upgraded socket-like object (``recv``, ``sendall``/``send``, ``close``).

    One thread iterates :meth:`messages`; other threads may :meth:`send_text` meanwhile.
    """

    RECV_SIZE = 65536

    def __init__(self, sock: Any, *, max_message: int = MAX_MESSAGE) -> None:
        self.sock = sock
        self.protocol = ServerProtocol(max_message=max_message)
        self._send_lock = threading.Lock()
        #: Set once the exchange is over either way (readers of other threads wait on it).
        self.done = threading.Event()
        self.close_code: int | None = None

    def accept(self, key: str, subprotocol: str | None = None) -> None:
        self._write(handshake_response(key, subprotocol))

    def send_text(self, text: str) -> None:
        with self._send_lock:
            self.protocol.send_text(text)
            self._write(self.protocol.data_to_send())

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send our CLOSE (once); :meth:`messages` ends when the peer answers or goes away."""
        with self._send_lock:
            self.protocol.close(code, reason)
            self._write(self.protocol.data_to_send())

    def messages(self) -> Iterator[str | bytes]:
        """Received messages until the closing handshake ends or the connection does."""
        try:
            while not self.protocol.closed:
                try:
                    data = self.sock.recv(self.RECV_SIZE)
                except OSError as e:
                    log.debug("demo websocket: read ended: %s", e)
                    data = b""
                with self._send_lock:
                    events = self.protocol.receive_data(data)
                    reply = self.protocol.data_to_send()
                    if reply:
                        try:
                            self._write(reply)
                        except ConnectionError:
                            pass  # the client is gone: the next read says so and ends the loop
                for event in events:
                    if isinstance(event, Closed):
                        self.close_code = event.code
                    else:
                        yield event.data
        finally:
            self.done.set()

    def _write(self, data: bytes) -> None:
        if not data:
            return
        try:
            sendall = getattr(self.sock, "sendall", None)
            if sendall is not None:
                sendall(data)
                return
            view = memoryview(data)
            while view:
                view = view[self.sock.send(view):]
        except OSError as e:
            # The client went away: the read side sees the end next and finishes the exchange.
            log.debug("demo websocket: write failed: %s", e)
            self.done.set()
            raise ConnectionError(str(e)) from e
