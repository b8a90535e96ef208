"""The demo's own RFC 6455 server codec: framing, validation, closing, and agreement with wsproto."""

from __future__ import annotations

import os
import struct

import pytest

from rhttp_wsgi._demo_websocket import (
    CLOSE_ABNORMAL,
    CLOSE_INVALID_DATA,
    CLOSE_NO_STATUS,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Closed,
    FrameParser,
    Message,
    ProtocolError,
    ServerProtocol,
    WebSocket,
    accept_key,
    encode_close,
    encode_frame,
    handshake_response,
    is_upgrade,
    valid_key,
)

MASK = b"\x37\xfa\x21\x3d"


def client(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return encode_frame(opcode, payload, fin=fin, mask=MASK)


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    return [(f.opcode, f.payload) for f in FrameParser(require_mask=False).feed(data)]


def test_accept_key_is_the_rfc6455_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(("key", "ok"), [("dGhlIHNhbXBsZSBub25jZQ==", True), ("", False), (None, False),
                                         ("dGhlIHNhbXBsZQ==", False), ("not base64!!", False), ("é", False)])
def test_valid_key_wants_base64_of_16_bytes(key: str | None, ok: bool) -> None:
    assert valid_key(key) is ok


def test_handshake_response_is_a_101_head_with_the_accept_value() -> None:
    head = handshake_response("dGhlIHNhbXBsZSBub25jZQ==", "chat")
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and head.endswith(b"\r\n\r\n")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head
    assert b"\r\nSec-WebSocket-Protocol: chat\r\n" in head
    assert b"Sec-WebSocket-Protocol" not in handshake_response("dGhlIHNhbXBsZSBub25jZQ==")


def test_is_upgrade_reads_the_http11_upgrade_form() -> None:
    env = {"REQUEST_METHOD": "GET", "HTTP_UPGRADE": "WebSocket", "HTTP_CONNECTION": "keep-alive, Upgrade"}
    assert is_upgrade(env)
    assert not is_upgrade({**env, "REQUEST_METHOD": "POST"})
    assert not is_upgrade({**env, "HTTP_CONNECTION": "keep-alive"})
    assert not is_upgrade({**env, "HTTP_UPGRADE": "h2c"})


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_frames_of_every_length_encoding_round_trip_fed_in_any_split(size: int) -> None:
    payload = os.urandom(size)
    wire = client(OP_BINARY, payload)
    length_bytes = 0 if size < 126 else 2 if size < 65536 else 8
    assert len(wire) == 2 + length_bytes + 4 + size
    # byte by byte through the header, then in uneven pieces
    pieces = [wire[i:i + 1] for i in range(16)] + [wire[i:i + 4093] for i in range(16, len(wire), 4093)]
    for feed in (pieces, [wire]):
        parser = FrameParser(require_mask=True)
        frames = [f for piece in feed for f in parser.feed(piece)]
        assert [(f.fin, f.opcode, f.payload) for f in frames] == [(True, OP_BINARY, payload)]


def test_server_frames_are_unmasked_with_the_shortest_length() -> None:
    assert encode_frame(OP_TEXT, b"hi") == b"\x81\x02hi"
    assert encode_frame(OP_BINARY, b"x" * 126)[:4] == b"\x82\x7e\x00\x7e"
    assert encode_frame(OP_BINARY, b"x" * 65536)[:10] == b"\x82\x7f" + struct.pack("!Q", 65536)


@pytest.mark.parametrize(("wire", "code"), [
    (encode_frame(OP_TEXT, b"hi"), CLOSE_PROTOCOL_ERROR),                       # unmasked client frame
    (bytes([0xC1]) + client(OP_TEXT, b"hi")[1:], CLOSE_PROTOCOL_ERROR),         # RSV1 without an extension
    (bytes([0x83]) + client(OP_TEXT, b"hi")[1:], CLOSE_PROTOCOL_ERROR),         # reserved opcode 3
    (client(OP_PING, b"x" * 126), CLOSE_PROTOCOL_ERROR),                        # control frame over 125 bytes
    (client(OP_PING, b"x", fin=False), CLOSE_PROTOCOL_ERROR),                   # fragmented control frame
    (b"\x82\xff" + struct.pack("!Q", 1 << 63) + MASK, CLOSE_PROTOCOL_ERROR),    # 64-bit length, top bit set
    (b"\x82\xff" + struct.pack("!Q", 2 << 20) + MASK, CLOSE_TOO_BIG),           # over the limit, refused early
])
def test_parser_refuses_what_rfc6455_forbids(wire: bytes, code: int) -> None:
    with pytest.raises(ProtocolError) as err:
        FrameParser(require_mask=True).feed(wire)
    assert err.value.code == code


def test_text_and_binary_messages_reassemble_with_pings_between_fragments() -> None:
    proto = ServerProtocol()
    wire = (client(OP_TEXT, "hé".encode()[:2], fin=False) + client(OP_PING, b"p1")
            + client(OP_CONTINUATION, "hé".encode()[2:], fin=False) + client(OP_CONTINUATION, b"llo")
            + client(OP_BINARY, b"\x00\xff"))
    assert proto.receive_data(wire) == [Message("héllo"), Message(b"\x00\xff")]
    assert server_frames(proto.data_to_send()) == [(OP_PONG, b"p1")]


@pytest.mark.parametrize(("wire", "code"), [
    (client(OP_CONTINUATION, b"x"), CLOSE_PROTOCOL_ERROR),                        # nothing to continue
    (client(OP_TEXT, b"a", fin=False) + client(OP_TEXT, b"b"), CLOSE_PROTOCOL_ERROR),  # interleaved messages
    (client(OP_TEXT, b"\xff\xfe"), CLOSE_INVALID_DATA),                           # not UTF-8
    (client(OP_CLOSE, b"\x03"), CLOSE_PROTOCOL_ERROR),                             # one-byte close payload
    (client(OP_CLOSE, struct.pack("!H", 1005)), CLOSE_PROTOCOL_ERROR),             # code that may not be sent
    (client(OP_CLOSE, struct.pack("!H", 1000) + b"\xff"), CLOSE_INVALID_DATA),    # reason not UTF-8
])
def test_protocol_violations_close_with_the_matching_code(wire: bytes, code: int) -> None:
    proto = ServerProtocol()
    events = proto.receive_data(wire)
    assert [e.code for e in events if isinstance(e, Closed)] == [code]
    assert proto.closed and proto.receive_data(client(OP_TEXT, b"after")) == []
    frames = server_frames(proto.data_to_send())
    assert frames[-1][0] == OP_CLOSE and struct.unpack("!H", frames[-1][1][:2])[0] == code


def test_message_over_the_limit_across_fragments_closes_1009() -> None:
    proto = ServerProtocol(max_message=10)
    events = proto.receive_data(client(OP_BINARY, b"x" * 6, fin=False) + client(OP_CONTINUATION, b"x" * 6))
    assert [e.code for e in events if isinstance(e, Closed)] == [CLOSE_TOO_BIG]


def test_peer_close_is_echoed_and_ends_the_events() -> None:
    proto = ServerProtocol()
    events = proto.receive_data(client(OP_CLOSE, encode_close(4001, "bye")) + client(OP_TEXT, b"late"))
    assert events == [Closed(4001, "bye")]
    assert server_frames(proto.data_to_send()) == [(OP_CLOSE, struct.pack("!H", 4001))]
    assert proto.closed and proto.receive_data(client(OP_TEXT, b"more")) == []


def test_empty_close_is_answered_1000_and_reported_1005() -> None:
    proto = ServerProtocol()
    assert proto.receive_data(client(OP_CLOSE, b"")) == [Closed(CLOSE_NO_STATUS)]
    assert server_frames(proto.data_to_send()) == [(OP_CLOSE, struct.pack("!H", 1000))]


def test_server_close_waits_for_the_peer_and_sends_nothing_after_it() -> None:
    proto = ServerProtocol()
    proto.close(1001, "going")
    proto.close(1000)  # idempotent
    assert server_frames(proto.data_to_send()) == [(OP_CLOSE, struct.pack("!H", 1001) + b"going")]
    with pytest.raises(ConnectionError):
        proto.send_text("after close")
    assert not proto.closed
    assert proto.receive_data(client(OP_PING, b"")) == []
    assert proto.data_to_send() == b""  # no PONG once our CLOSE is out
    assert proto.receive_data(client(OP_CLOSE, encode_close(1001))) == [Closed(1001)]
    assert proto.data_to_send() == b""  # our CLOSE was the answer already
    assert proto.closed


def test_connection_end_without_close_is_1006() -> None:
    proto = ServerProtocol()
    assert proto.receive_data(b"") == [Closed(CLOSE_ABNORMAL, "the connection ended without a close frame")]


class ScriptedSocket:
    """The upgrade socket's shape (recv / sendall / close) with scripted reads; no real socket."""

    def __init__(self, reads: list[bytes]) -> None:
        self.reads = list(reads)
        self.sent = bytearray()
        self.closed = False

    def recv(self, n: int) -> bytes:
        return self.reads.pop(0) if self.reads else b""

    def sendall(self, data: bytes) -> None:
        if self.closed:
            raise BrokenPipeError("closed")
        self.sent += data

    def close(self) -> None:
        self.closed = True


def test_websocket_over_a_socket_like_object_handshakes_echoes_and_closes() -> None:
    sock = ScriptedSocket([client(OP_TEXT, b"one") + client(OP_PING, b"k")[:3], client(OP_PING, b"k")[3:],
                           client(OP_BINARY, b"two"), client(OP_CLOSE, encode_close(1000))])
    ws = WebSocket(sock)
    ws.accept("dGhlIHNhbXBsZSBub25jZQ==")
    got = []
    for message in ws.messages():
        got.append(message)
        ws.send_text(f"echo {message!r}")
    assert got == ["one", b"two"]
    assert ws.close_code == 1000 and ws.done.is_set()
    head, _, frames = bytes(sock.sent).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert server_frames(frames) == [(OP_TEXT, b"echo 'one'"), (OP_PONG, b"k"), (OP_TEXT, b"echo b'two'"),
                                     (OP_CLOSE, struct.pack("!H", 1000))]


def test_websocket_ends_when_the_client_vanishes_and_send_fails_cleanly() -> None:
    sock = ScriptedSocket([client(OP_TEXT, b"one")])
    ws = WebSocket(sock)
    assert list(ws.messages()) == ["one"]
    assert ws.close_code == CLOSE_ABNORMAL
    sock.closed = True
    with pytest.raises(ConnectionError):
        ws.send_text("too late")


# -- differential: wsproto (a test dependency) on the other end ----------------------------------------------

def test_agrees_with_wsproto_both_ways() -> None:
    wsproto = pytest.importorskip("wsproto", reason="wsproto is not installed (pip install -e '.[test]')")
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

    assert wsproto
    peer = Connection(ConnectionType.CLIENT)
    proto = ServerProtocol()
    big = os.urandom(70_000)
    wire = (peer.send(TextMessage("héllo")) + peer.send(BytesMessage(big)) + peer.send(Ping(b"hi"))
            + peer.send(TextMessage("part ", message_finished=False)) + peer.send(TextMessage("two")))
    assert proto.receive_data(wire) == [Message("héllo"), Message(big), Message("part two")]
    proto.send_text("from server")
    proto.send_binary(big)
    peer.receive_data(proto.data_to_send())
    events = list(peer.events())
    assert isinstance(events[0], Pong) and events[0].payload == b"hi"
    assert [(type(e), e.data) for e in events[1:]] == [(TextMessage, "from server"), (BytesMessage, big)]
    assert proto.receive_data(peer.send(CloseConnection(4000, "done"))) == [Closed(4000, "done")]
    peer.receive_data(proto.data_to_send())
    (closing,) = peer.events()
    assert isinstance(closing, CloseConnection) and closing.code == 4000
