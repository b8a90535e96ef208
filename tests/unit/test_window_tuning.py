"""Receive windows that follow the bandwidth-delay product (``H2Core.acknowledge_received_data``).

Two kinds of test, both on a fake clock (no sockets, no threads, no timing asserts):

* frame by frame: the probe PING, its ACK, and the WINDOW_UPDATE that grows a window, byte
  for byte; with tuning off, or a reader too slow to ever grow its window, the WINDOW_UPDATEs
  are h2's (differential, against ``h2.connection.H2Connection``);
* a simulated path (:class:`Path`): the peer sends as fast as its windows and the link allow,
  every frame takes ``delay`` seconds each way, the peer answers our PINGs, and our reader
  consumes at a given rate.  Time advances in 1 ms steps; every run is deterministic.
"""

from __future__ import annotations

import collections
import struct
from typing import Any

import h2.events as ev
import hpack
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection

from rhttp_wsgi._h2core import RTT_PROBE_GAP, WindowBudget
from rhttp_wsgi._protocol import PREFACE, TunnelProtocol
from tests.unit.h2core_harness import (
    ACK,
    END_HEADERS,
    HEADERS,
    PING,
    REQ,
    RESP,
    ROLES,
    WINDOW_UPDATE,
    Raw,
    data,
    frame,
    of,
    options,
    parse,
    ping,
    settings,
    settings_ack,
    wu,
)

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
KiB = 1 << 10
FRAME = 16384


def _probes(frames: list[Any]) -> list[bytes]:
    return [f.payload for f in frames if f.type == PING and not f.flags & ACK]


# ===================================================================================================
# frame by frame
# ===================================================================================================


def test_no_probe_for_a_small_body() -> None:
    """A request body under a quarter of the stream window costs no PING (the hello path stays as it was)."""
    r = Raw("server")
    r.request_ok(1, end=False)
    r.now = 101.0
    r.feed(data(1, b"x" * 8000), data(1, b"y" * 1000, end=True))
    assert _probes(r.out()) == []


def test_probe_then_growth_frame_by_frame() -> None:
    """The probe goes out once a quarter of the window is outstanding; its ACK gives the round trip;
    credit returned within two round trips of the first DATA grows the window: one WINDOW_UPDATE
    returns the consumed half plus the growth."""
    r = Raw("server", options("server", initial_window_size=65535, max_window_size=1 << 20,
                              connection_window_size=1 << 24))
    r.request_ok(1, end=False)
    r.now = 200.0
    r.feed(data(1, b"a" * 8000))  # first DATA: the clocks start; 8,000 < 65,535/4 outstanding
    assert r.out() == []
    r.feed(data(1, b"b" * 9000))  # 17,000 outstanding >= 16,383: probe
    [probe] = _probes(r.out())
    assert r.proto.receive_windows() == (None, 1 << 24, 65535)
    r.now = 200.05
    r.feed(ping(probe, ack=True))
    srtt, _conn, learned = r.proto.receive_windows()
    assert srtt == pytest.approx(0.05) and learned == 65535
    r.feed(data(1, b"c" * 16000))  # 33,000 received
    # consumed 33,000 >= half the window, 0.06 s after the first DATA (< 2 x 0.05): the window doubles
    r.core.acknowledge_received_data(33000, 1, 200.06)
    [(sid, inc)] = wu(r.out())
    assert sid == 1
    assert inc == 33000 + 65535  # the consumed bytes plus the growth (65,535 -> 131,070)
    assert r.core.streams[1].in_window == 131070
    assert r.proto.receive_windows()[2] == 131070


def test_credit_returned_late_does_not_grow() -> None:
    """The same bytes consumed 0.5 s after the first DATA (ten round trips): h2's WINDOW_UPDATE, no growth."""
    r = Raw("server", options("server", initial_window_size=65535, max_window_size=1 << 20))
    r.request_ok(1, end=False)
    r.now = 200.0
    r.feed(data(1, b"a" * 8000), data(1, b"b" * 9000))
    [probe] = _probes(r.out())
    r.now = 200.05
    r.feed(ping(probe, ack=True), data(1, b"c" * 16000))
    r.core.acknowledge_received_data(33000, 1, 200.5)
    assert wu(r.out()) == [(1, 33000)]
    assert r.core.streams[1].in_window == 65535


def test_probes_are_spaced_and_one_at_a_time() -> None:
    r = Raw("server", options("server", initial_window_size=65535, max_window_size=1 << 20,
                              connection_window_size=1 << 24))
    r.request_ok(1, end=False)
    r.now = 300.0
    r.feed(data(1, b"a" * 16384), data(1, b"a" * 16384))
    [probe] = _probes(r.out())
    r.core.acknowledge_received_data(32768, 1, 300.0)
    r.feed(data(1, b"a" * 16384), data(1, b"a" * 16384))
    assert _probes(r.out()) == []  # one in flight
    r.core.acknowledge_received_data(32768, 1, 300.0)
    r.now = 300.01
    r.feed(ping(probe, ack=True))
    r.feed(data(1, b"a" * 16384), data(1, b"a" * 16384))
    assert _probes(r.out()) == []  # acknowledged, but the last was sent < RTT_PROBE_GAP ago
    r.core.acknowledge_received_data(32768, 1, 300.01)
    r.now = 300.0 + RTT_PROBE_GAP
    r.feed(data(1, b"a" * 16384), data(1, b"a" * 16384))
    assert len(_probes(r.out())) == 1


def test_a_peer_ping_ack_that_is_not_our_probe_is_ignored() -> None:
    r = Raw("server", options("server", initial_window_size=65535, max_window_size=1 << 20))
    r.request_ok(1, end=False)
    r.now = 10.0
    r.feed(data(1, b"a" * 16384), data(1, b"a" * 16384))
    assert len(_probes(r.out())) == 1
    r.now = 10.5
    r.feed(ping(b"rtt\x00\x00\x00\x00\x09", ack=True))
    assert r.proto.receive_windows()[0] is None


@pytest.mark.parametrize("role", ROLES)
def test_tuning_off_sends_h2s_window_updates(role: str) -> None:
    """max_window_size at initial_window_size: no probe and h2's WINDOW_UPDATEs, whatever the timing."""
    opts = options(role, initial_window_size=65535, max_window_size=65535, connection_window_size=65535,
                   max_connection_window_size=65535)
    assert _run_against_h2(opts, role, ack_every=0.0001) == 0


def test_slow_reader_sends_h2s_window_updates_with_tuning_on() -> None:
    """Tuning on (defaults), but credit returns slower than two round trips: identical to h2."""
    assert _run_against_h2(options("server", initial_window_size=65535, connection_window_size=65535),
                           "server", ack_every=1.0) == 0


def _run_against_h2(opts: Any, role: str, ack_every: float) -> int:
    """Feed our protocol and h2's H2Connection (server side) the same DATA, acknowledge the same
    bytes at ``ack_every`` second steps, ACK our probes 10 ms later; returns how many WINDOW_UPDATEs
    differed (they must not)."""
    ours = TunnelProtocol("server", opts)
    ours.initiate(1.0)
    ours.data_to_send()
    theirs = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    theirs.initiate_connection()
    theirs.data_to_send()
    start = settings() + frame(HEADERS, END_HEADERS, 1, hpack.Encoder().encode(REQ))
    ours.receive(start, 1.0)
    theirs.receive_data(PREFACE + start)
    ours.data_to_send()
    theirs.data_to_send()
    credit = {0: 65535, 1: 65535}
    now = 2.0
    differ = 0
    for _ in range(200):
        n = min(FRAME, credit[0], credit[1])
        if n == 0:
            pass
        else:
            f = data(1, b"d" * n)
            ours.receive(f, now)
            theirs.receive_data(f)
            credit[0] -= n
            credit[1] -= n
        out = parse(ours.data_to_send())
        for payload in _probes(out):
            ours.receive(ping(payload, ack=True), now + 0.01)
        if n:
            now += ack_every
            ours.acknowledge_received_data(n, 1, now)
            theirs.acknowledge_received_data(n, 1)
        o = wu(out + parse(ours.data_to_send()))
        t = wu(parse(theirs.data_to_send()))
        differ += o != t
        for sid, inc in o:
            credit[sid] += inc
    return differ


# ===================================================================================================
# a simulated long fat pipe
# ===================================================================================================


class Path:
    """Our end (``role``) receiving one download per stream over a path of ``delay`` seconds each
    way and ``rate`` bytes/s from a peer that always has data, sends whatever its windows allow,
    and answers our PINGs; each stream's reader consumes ``read_rate`` bytes/s (None: at once;
    0: never)."""

    STEP = 0.001

    def __init__(self, role: str, *, delay: float, rate: float, read_rate: float | None,
                 streams: int = 1, budget: WindowBudget | None = None, **opts: Any) -> None:
        self.r = Raw(role, options(role, **opts), budget=budget)
        self.delay = delay
        self.rate = rate
        self.read_rate = read_rate
        self.sids = [2 * i + 1 for i in range(streams)]
        for sid in self.sids:
            if role == "server":
                self.r.request_ok(sid, end=False)
            else:
                self.r.core.send_headers(sid, REQ, end_stream=True)
                self.r.out()
                self.r.feed(self.r.headers(sid, RESP))
        init = self.r.initial
        conn0 = 65535 + sum(inc for sid, inc in wu(parse(init[len(PREFACE):] if role == "server" else init))
                            if sid == 0)
        # what the peer may send: the connection window and each stream's
        self.credit = {0: conn0, **{sid: opts.get("initial_window_size", 1 << 20) for sid in self.sids}}
        self.to_us: collections.deque[tuple[float, bytes]] = collections.deque()
        self.to_peer: collections.deque[tuple[float, list[Any]]] = collections.deque()
        self.unread = {sid: 0 for sid in self.sids}
        self.read_total = 0
        self.max_unread = 0
        self.max_unread_one = 0
        #: every WINDOW_UPDATE the peer got: (time, stream, increment)
        self.updates: list[tuple[float, int, int]] = []
        self.t = 1000.0
        self._link_free = self.t
        self.r.now = self.t

    def run(self, seconds: float) -> Path:
        steps = round(seconds / self.STEP)
        for _ in range(steps):
            self.t += self.STEP
            t = self.t
            r = self.r
            r.now = t
            # the peer: frames of ours that reached it
            while self.to_peer and self.to_peer[0][0] <= t:
                _, frames = self.to_peer.popleft()
                for f in frames:
                    if f.type == WINDOW_UPDATE:
                        inc = struct.unpack(">L", f.payload)[0]
                        self.credit[f.sid] += inc
                        self.updates.append((t, f.sid, inc))
                    elif f.type == PING and not f.flags & ACK:
                        self.to_us.append((t + self.delay, ping(f.payload, ack=True)))
            # the peer sends what its windows and the link allow in this step
            budget = int(self.rate * self.STEP) if self.rate else 1 << 40
            for sid in self.sids:
                while budget > 0:
                    n = min(FRAME, self.credit[0], self.credit[sid], budget)
                    if n <= 0:
                        break
                    self.credit[0] -= n
                    self.credit[sid] -= n
                    budget -= n
                    self.to_us.append((t + self.delay, data(sid, b"d" * n)))
            # we receive what arrived
            chunk = []
            while self.to_us and self.to_us[0][0] <= t:
                chunk.append(self.to_us.popleft()[1])
            if chunk:
                for e in of(r.feed(*chunk), ev.DataReceived):
                    self.unread[e.stream_id] += e.flow_controlled_length
            # the readers
            for sid in self.sids:
                take = self.unread[sid] if self.read_rate is None else min(self.unread[sid],
                                                                           int(self.read_rate * self.STEP))
                if take:
                    self.unread[sid] -= take
                    self.read_total += take
                    r.core.acknowledge_received_data(take, sid, t)
            self.max_unread = max(self.max_unread, sum(self.unread.values()))
            self.max_unread_one = max([self.max_unread_one, *self.unread.values()])
            out = r.out()
            if out:
                self.to_peer.append((t + self.delay, out))
        return self

    def window(self, sid: int = 1) -> int:
        return self.r.core.streams[sid].in_max

    @property
    def throughput(self) -> float:
        return self.read_total


@pytest.mark.parametrize("role", ROLES)
def test_window_grows_for_a_fast_reader_on_a_long_fat_pipe(role: str) -> None:
    """25 ms each way, a 1 GB/s link, a reader that keeps up: the 1 MiB window is what limits the
    peer (1 MiB per 50 ms, ~20 MB/s); the window grows to the cap and the transfer with it."""
    fixed = Path(role, delay=0.025, rate=1e9, read_rate=None, max_window_size=1 << 20).run(1.0)
    tuned = Path(role, delay=0.025, rate=1e9, read_rate=None, max_window_size=16 * MiB).run(1.0)
    assert fixed.window() == 1 * MiB
    assert tuned.window() == 16 * MiB
    srtt = tuned.r.proto.receive_windows()[0]
    assert srtt is not None and 0.05 <= srtt < 0.06
    # fixed: ~1 MiB per round trip; tuned: most of the second spent at 16 MiB per round trip
    assert fixed.read_total < 25 * MiB
    assert tuned.read_total > 5 * fixed.read_total


@pytest.mark.parametrize("role", ROLES)
def test_window_does_not_grow_for_a_slow_reader(role: str) -> None:
    """The same path, a reader taking 2 MB/s: the peer is held back by the reader, not the window."""
    p = Path(role, delay=0.025, rate=1e9, read_rate=2e6, max_window_size=16 * MiB).run(2.0)
    assert p.window() == 1 * MiB
    assert p.r.proto.receive_windows()[2] == 1 * MiB
    assert p.r.proto.receive_windows()[0] is not None  # the round trip was measured: it was not that


def test_window_does_not_grow_when_the_link_is_the_limit() -> None:
    """A fast reader behind a 2 MB/s link: half a window takes far longer than two round trips."""
    p = Path("server", delay=0.025, rate=2e6, read_rate=None, max_window_size=16 * MiB).run(2.0)
    assert p.window() == 1 * MiB


def test_window_stops_growing_at_about_the_bandwidth_delay_product() -> None:
    """40 MB/s over 50 ms round trips (BDP 2 MB): the window grows past 1 MiB, and stays within
    four BDPs (half a window within two round trips), far below the 64 MiB cap."""
    p = Path("server", delay=0.025, rate=40e6, read_rate=None, max_window_size=64 * MiB,
             connection_window_size=128 * MiB, max_connection_window_size=128 * MiB).run(2.0)
    assert 2 * MiB <= p.window() <= 8 * MiB
    assert p.read_total > 0.8 * 40e6 * (2.0 - 0.2)  # the link is full once the window grew


@pytest.mark.parametrize("role", ROLES)
def test_memory_stays_under_the_cap_with_a_reader_that_stops(role: str) -> None:
    """Readers that keep up until their windows grew to the cap, then stop: the unread bytes stay
    within each stream's window (the cap), and all streams' within the connection window."""
    p = Path(role, delay=0.025, rate=1e9, read_rate=None, streams=3, max_window_size=4 * MiB,
             connection_window_size=8 * MiB, max_connection_window_size=8 * MiB).run(0.5)
    assert [p.window(sid) for sid in p.sids] == [4 * MiB] * 3
    p.read_rate = 0
    p.run(1.0)
    assert p.max_unread_one <= 4 * MiB
    assert p.max_unread <= 8 * MiB
    # the peer used up what it was granted: nothing more arrives
    assert p.credit[0] == 0 or all(p.credit[sid] == 0 for sid in p.sids)
    held = sum(p.unread.values())
    p.run(0.5)
    assert sum(p.unread.values()) == held
    assert [p.window(sid) for sid in p.sids] == [4 * MiB] * 3


def test_connection_window_grows_to_its_cap() -> None:
    """Four streams on a connection window of 2 MiB: it grows (to its 32 MiB cap), each stream's too."""
    p = Path("server", delay=0.025, rate=1e9, read_rate=None, streams=4, max_window_size=8 * MiB,
             connection_window_size=2 * MiB, max_connection_window_size=32 * MiB).run(1.0)
    assert p.r.proto.receive_windows()[1] == 32 * MiB
    assert [p.window(sid) for sid in p.sids] == [8 * MiB] * 4


def test_a_later_stream_jumps_to_the_learned_window() -> None:
    """Once one stream grew to 8 MiB, the next stream that is window-limited goes there in one step."""
    p = Path("server", delay=0.025, rate=1e9, read_rate=None, max_window_size=8 * MiB).run(0.6)
    assert p.window(1) == 8 * MiB
    # stream 1 ends once what was in flight arrived; stream 3 opens
    p.sids = []
    p.run(0.1)
    r = p.r
    r.feed(data(1, b"", end=True))
    r.core.send_headers(1, RESP, end_stream=True)
    r.request_ok(3, end=False)
    r.out()
    p.sids = [3]
    p.credit[3] = 1 * MiB
    p.unread[3] = 0
    grew: list[int] = []
    for _ in range(200):
        p.run(0.001)
        if p.window(3) != 1 * MiB:
            grew.append(p.window(3))
            break
    assert grew == [8 * MiB]


def _learned(role: str, window: int = 8 * MiB) -> Path:
    p = Path(role, delay=0.025, rate=1e9, read_rate=None, max_window_size=window).run(0.6)
    assert p.r.proto.receive_windows()[2] == window
    return p


def test_a_warm_connection_grants_the_learned_window_with_the_request() -> None:
    """Client role: once the connection learned 8 MiB, the next request's HEADERS are followed by a
    WINDOW_UPDATE to 8 MiB (the response need not spend a round trip at 1 MiB); a HEAD gets none."""
    r = _learned("client").r
    r.core.send_headers(3, REQ, end_stream=True)
    out = r.out()
    assert [f.type for f in out] == [HEADERS, WINDOW_UPDATE]
    assert wu(out) == [(3, 8 * MiB - 1 * MiB)]
    r.core.send_headers(5, [(b":method", b"HEAD"), *REQ[1:]], end_stream=True)
    assert [f.type for f in r.out()] == [HEADERS]


def test_a_warm_connection_grants_the_learned_window_at_a_request_bodys_first_data() -> None:
    """Server role: nothing for a bodiless request; the learned window at a body's first DATA."""
    r = _learned("server").r
    r.request_ok(3, end=True)
    assert wu(r.out()) == []
    r.request_ok(5, end=False)
    assert r.out() == []
    r.feed(data(5, b"x" * 100))
    assert wu(r.out()) == [(5, 8 * MiB - 1 * MiB)]


@pytest.mark.parametrize("role", ROLES)
def test_the_settings_ack_gives_the_first_round_trip(role: str) -> None:
    """The peer's ACK of our first SETTINGS, 40 ms after we sent them, is the first round trip: a
    cold tunnel's first transfer can grow its window before any probe came back."""
    r = Raw(role, options(role), handshake=False)
    r.now = 100.04  # (Raw initiated at 100.0)
    pre = PREFACE if role == "client" else b""
    r.feed(pre + settings({}) + settings_ack())
    assert r.proto.receive_windows()[0] == pytest.approx(0.04)
    r.now = 100.2
    r.feed(settings_ack())  # a later ACK (of a later SETTINGS) is not a sample
    assert r.proto.receive_windows()[0] == pytest.approx(0.04)


def test_a_settings_ack_at_the_same_instant_is_no_sample() -> None:
    r = Raw("server")  # handshake at the instant of initiate
    assert r.proto.receive_windows()[0] is None


def test_grown_windows_return_credit_in_eighths_and_the_connection_in_quarters() -> None:
    """Once grown, a stream window's credit goes back at each eighth consumed and the connection
    window's at each quarter (h2's rule, at each half, is kept for windows that never grew): the
    peer then always holds at least 7/8 and 3/4 of them, so a window near the bandwidth-delay
    product is not left idle for most of a round trip.  Growth is still judged over a quarter."""
    p = Path("server", delay=0.025, rate=1e9, read_rate=0.5e9, max_window_size=8 * MiB,
             connection_window_size=16 * MiB, max_connection_window_size=32 * MiB).run(1.5)
    assert p.window() == 8 * MiB
    assert p.r.proto.receive_windows()[1] == 32 * MiB  # the connection window grew too
    late = [(sid, inc) for t, sid, inc in p.updates if t > p.t - 0.5]
    stream = [inc for sid, inc in late if sid == 1]
    conn = [inc for sid, inc in late if sid == 0]
    assert len(stream) > 20 and all(MiB <= inc < 2 * MiB for inc in stream), stream
    assert conn and all(inc == 8 * MiB for inc in conn), conn


def test_a_stream_window_never_grows_past_half_its_connection_window() -> None:
    """A 64 MiB stream cap on a tunnel whose connection window is fixed at 8 MiB: the stream stops at
    4 MiB, so one stalled stream can never hold every byte the tunnel may receive."""
    p = Path("server", delay=0.025, rate=1e9, read_rate=None, max_window_size=64 * MiB,
             connection_window_size=8 * MiB, max_connection_window_size=8 * MiB).run(1.0)
    assert p.window() == 4 * MiB
    assert p.r.proto.receive_windows()[1] == 8 * MiB


def test_connection_windows_grow_from_one_budget_per_process_and_give_it_back() -> None:
    """Two tunnels of one process share a 24 MiB growth budget: the first connection window grows
    by all of it (16 -> 40 MiB, under its 64 MiB cap), the second cannot grow and its stream stays
    at half its 16 MiB; once the first tunnel is gone the budget is whole again and a new tunnel
    grows."""
    budget = WindowBudget(24 * MiB)
    opts = {"max_window_size": 32 * MiB, "connection_window_size": 16 * MiB,
            "max_connection_window_size": 64 * MiB}
    first = Path("server", delay=0.025, rate=1e9, read_rate=None, budget=budget, **opts).run(1.0)
    assert first.r.proto.receive_windows()[1] == 40 * MiB
    assert budget.used == 24 * MiB
    second = Path("server", delay=0.025, rate=1e9, read_rate=None, budget=budget, **opts).run(1.0)
    assert second.r.proto.receive_windows()[1] == 16 * MiB
    assert second.window() == 8 * MiB
    first.r.proto.release_window_growth()
    first.r.proto.release_window_growth()  # (idempotent)
    assert budget.used == 0
    third = Path("server", delay=0.025, rate=1e9, read_rate=None, budget=budget, **opts).run(1.0)
    assert third.r.proto.receive_windows()[1] > 16 * MiB
