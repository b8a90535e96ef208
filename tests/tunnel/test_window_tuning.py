"""Receive-window tuning in a real worker tunnel: an upload's window follows the reader.

The worker is the real ``Tunnel`` on a socketpair with a :class:`FakeClock`; the proxy is the
raw-frame peer (``tests/h2peer.py``), which ACKs the worker's round-trip probe by hand after
moving the clock 50 ms, so the worker measures a 50 ms round trip whatever the machine does.
No timing asserts: what is checked is which WINDOW_UPDATEs the worker sent and what the app read.
(The rule itself, frame by frame and on a simulated path: tests/unit/test_window_tuning.py.)
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hyperframe.frame import PingFrame, WindowUpdateFrame

from tests.h2peer import DEFAULT_TIMEOUT, S
from tests.tunnel.harness import FakeClock, WorkerHarness, worker_options

pytestmark = pytest.mark.timeout(60)

INITIAL = 65535
CAP = 1 << 20
RTT = 0.05


def _tuned(make_worker: Any, app: Any, clock: FakeClock) -> WorkerHarness:
    h: WorkerHarness = make_worker(
        app, options=worker_options(initial_window_size=INITIAL, max_window_size=CAP, connection_window_size=1 << 24),
        auto_ack_ping=False, tunnel_kw={"clock": clock})
    return h


def _answer_probe(h: WorkerHarness, clock: FakeClock) -> None:
    """Wait for the worker's round-trip probe, move the clock one round trip, ACK it."""
    probe = h.peer.wait_for(lambda f: isinstance(f, PingFrame) and "ACK" not in f.flags
                            and f.opaque_data.startswith(b"rtt\0"), what="the worker's round-trip probe")
    clock.advance(RTT)
    h.peer.send_ping(probe.opaque_data, ack=True)
    h.peer.barrier()
    srtt = h.proto.receive_windows()[0]
    assert srtt == pytest.approx(RTT)


def _stream_increments(h: WorkerHarness, sid: int) -> list[int]:
    with h.peer.cond:
        return [f.window_increment for f in h.peer.frames if isinstance(f, WindowUpdateFrame) and f.stream_id == sid]


def _reader(chunk: int, *, before_read: Any = None, stop_at: int | None = None,
            stopped: threading.Event | None = None, resume: threading.Event | None = None) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        inp = environ["wsgi.input"]
        total = 0
        while True:
            if stop_at is not None and total >= stop_at and stopped is not None and resume is not None:
                stopped.set()
                assert resume.wait(DEFAULT_TIMEOUT)
            if before_read is not None:
                before_read()
            data = inp.read(chunk)
            if not data:
                break
            total += len(data)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(total).encode()]
    return app


def test_upload_window_grows_for_a_reader_that_keeps_up(make_worker: Any) -> None:
    clock = FakeClock()
    h = _tuned(make_worker, _reader(65536), clock)
    p = h.peer
    p.request(1, "POST", "/", end_stream=False)
    p.send_body(1, b"a" * 32768, end_stream=False)  # half the window outstanding: the probe goes out
    _answer_probe(h, clock)
    body = 4 << 20
    p.send_body(1, b"b" * body, end_stream=True)
    assert p.response(1).body == str(32768 + body).encode()
    incs = _stream_increments(h, 1)
    # the window doubled at each half window consumed within two round trips, up to the cap
    assert max(incs) > INITIAL
    assert h.proto.receive_windows()[2] == CAP
    assert sum(incs) > 32768 + body - INITIAL  # more credit than bytes: the growth


def test_upload_window_does_not_grow_for_a_slow_reader(make_worker: Any) -> None:
    clock = FakeClock()
    go = threading.Event()

    def one_second_per_read() -> None:
        assert go.wait(DEFAULT_TIMEOUT)
        clock.advance(1.0)  # each 16 KiB read comes a second after the last: 20 round trips

    h = _tuned(make_worker, _reader(16384, before_read=one_second_per_read), clock)
    p = h.peer
    p.request(1, "POST", "/", end_stream=False)
    p.send_body(1, b"a" * 32768, end_stream=False)
    _answer_probe(h, clock)
    go.set()
    body = 512 << 10
    p.send_body(1, b"b" * body, end_stream=True)
    assert p.response(1).body == str(32768 + body).encode()
    assert max(_stream_increments(h, 1)) <= INITIAL
    assert h.proto.receive_windows()[2] == INITIAL
    with p.cond:
        assert p.send_stream_window.get(1, 0) <= INITIAL


def test_unread_bytes_stay_under_the_cap_when_the_reader_stops(make_worker: Any) -> None:
    """A reader that keeps up until its window reached the cap, then stops: the proxy can send no
    more than the window, so the worker holds at most the cap unread, however long it waits."""
    clock = FakeClock()
    stopped, resume = threading.Event(), threading.Event()
    consumed_before_stop = 2 << 20
    h = _tuned(make_worker, _reader(65536, stop_at=consumed_before_stop, stopped=stopped, resume=resume), clock)
    p = h.peer
    p.request(1, "POST", "/", end_stream=False)
    p.send_body(1, b"a" * 32768, end_stream=False)
    _answer_probe(h, clock)
    sent = 32768
    for _ in range(10_000):  # bounded: each pass sends at least one byte or ends
        p.barrier()  # every WINDOW_UPDATE the worker sent so far is in
        with p.cond:
            room = min(p.send_conn_window, p.send_stream_window.get(1, 0),
                       p.remote_settings.get(S.MAX_FRAME_SIZE, 16384))
        if room <= 0:
            if stopped.is_set():
                p.barrier()
                with p.cond:
                    if min(p.send_conn_window, p.send_stream_window.get(1, 0)) <= 0:
                        break
            continue
        p.send_data(1, b"c" * room)
        sent += room
    else:
        raise AssertionError("the proxy never ran out of window")
    assert h.proto.receive_windows()[2] == CAP  # it had grown to the cap
    unread = sent - consumed_before_stop
    assert 0 < unread <= CAP, unread
    resume.set()
    p.send_body(1, b"", end_stream=True)
    assert p.response(1).body == str(sent).encode()

