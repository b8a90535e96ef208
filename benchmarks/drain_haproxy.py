"""What a graceful worker drain costs behind HAProxy (or our proxy), with a frame trace of the drain.

Steady load (``--clients`` threads, one fresh HTTP/1.1 connection per ``GET /hello``) runs through
the proxy while a worker is drained ``--drains`` times.  Each drain follows one ``--sequence``:

* ``baseline``: worker B (2 tunnels) stays up; worker A (2 tunnels) starts, HAProxy uses it
  (``--warm`` streams), then ``A.shutdown()``: today's drain (two-phase GOAWAY + PING).
* ``replace``: make-before-break.  Only one worker at a time serves; its replacement is dialled and
  waited for until HAProxy has sent it ``--warm`` streams, and only then the old one gets its GOAWAY.
* ``settings0``: as ``baseline``, but A first sends SETTINGS_MAX_CONCURRENT_STREAMS=0 and waits
  ``--pause`` seconds before its GOAWAY ("stop advertising capacity first").
* ``pause``: as ``baseline`` with a ``--pause`` between HAProxy using A and the GOAWAY (control).
* ``quiet-close``: as ``baseline``, but each tunnel of A waits (up to ``--quiet-max`` s, polling
  every 0.5 ms) for a moment with no stream in flight, then sends GOAWAY(last stream it accepted),
  TLS close_notify and FIN in one write: HAProxy reads the GOAWAY and the end of the connection
  together, so the tunnel never sits in its pool as "received GOAWAY but still open".  A tunnel
  that is never quiet falls back to today's two-phase drain.

It prints, per drain, the requests during the drain window and the failures, then the totals and
the HAProxy log lines of the failures.  With ``--trace`` (the default) the worker side records
every HTTP/2 frame each tunnel sends and receives, with monotonic and wall-clock timestamps,
through a test-only shim around :class:`rhttp_wsgi.tls.TLSSession` (``encrypt``/``decrypt`` see the
plaintext HTTP/2 byte streams; the library is not changed).  For every failed request it then
prints whether its request id (HAProxy's ``X-Request-ID``) ever reached a worker, and the frames
of the draining tunnels around it: when the worker sent each GOAWAY, when HAProxy's PING ACK (its
proof of having read the first GOAWAY) arrived, and when the 503 was logged.  ``--haproxy-trace``
also turns on HAProxy's own ``h2`` trace (via its CLI, into a ring) and prints its lines around
each failure (``--trace-out`` keeps all of them).

    python benchmarks/drain_haproxy.py                       # HAProxy at HAPROXY_BIN or the default
    python benchmarks/drain_haproxy.py --sequence replace --drains 15
    HAPROXY_BIN=/opt/rhttp-haproxy-new/bin/haproxy python benchmarks/drain_haproxy.py
    python benchmarks/drain_haproxy.py --proxy ours           # our proxy instead of HAProxy

Loopback only; everything it starts is stopped before it exits.  Wall-clock free: the figures are
counts, not rates, so it can run on a busy machine (a busy machine makes races likelier, not rarer).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import http.client
import re
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hpack

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rhttp_wsgi import tls as tls_module  # noqa: E402
from rhttp_wsgi.worker import WorkerPool  # noqa: E402
from tests.interop.haproxy_fixtures import RECOMMENDED_CFG, Lab, TestApp, find_haproxy  # noqa: E402

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_NAMES = {0: "DATA", 1: "HEADERS", 2: "PRIORITY", 3: "RST_STREAM", 4: "SETTINGS", 5: "PUSH_PROMISE",
               6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE", 9: "CONTINUATION"}
SETTING_NAMES = {1: "HEADER_TABLE_SIZE", 2: "ENABLE_PUSH", 3: "MAX_CONCURRENT_STREAMS", 4: "INITIAL_WINDOW_SIZE",
                 5: "MAX_FRAME_SIZE", 6: "MAX_HEADER_LIST_SIZE", 8: "ENABLE_CONNECT_PROTOCOL"}


# ---------------------------------------------------------------------------
# The worker-side frame trace (a test-only shim around TLSSession)
# ---------------------------------------------------------------------------


@dataclass
class Frame:
    mono: float
    wall: float
    tunnel: int  # index of the TLS session, in handshake order
    direction: str  # "rx" (from the proxy) or "tx" (to the proxy)
    type: str
    flags: int
    stream: int
    info: str = ""
    request_id: str = ""

    def line(self, t0: float | None = None) -> str:
        when = f"{(self.mono - t0) * 1000:+9.3f} ms" if t0 is not None else f"{self.mono:.6f}"
        wall = time.strftime("%H:%M:%S", time.localtime(self.wall)) + f".{int(self.wall % 1 * 1e6):06d}"
        arrow = "<-" if self.direction == "rx" else "->"
        return (f"{when} {wall} tunnel#{self.tunnel} {arrow} {self.type:<13} stream={self.stream:<5}"
                f" flags=0x{self.flags:02x} {self.info}").rstrip()


class _Direction:
    """One direction of one tunnel: splits the plaintext byte stream into frames."""

    def __init__(self, trace: FrameTrace, tunnel: int, direction: str) -> None:
        self.trace = trace
        self.tunnel = tunnel
        self.direction = direction
        self.buf = b""
        # The worker dials, so it sends the client preface (the proxy reverses the roles after it);
        # checked in both directions rather than assumed.
        self.preface = True
        self.hpack = hpack.Decoder()
        self.hpack.max_allowed_table_size = 1 << 20
        self.header_block = b""
        self.header_stream = 0
        self.header_frame: Frame | None = None

    def feed(self, data: bytes, mono: float, wall: float) -> None:
        self.buf += data
        if self.preface:
            if len(self.buf) < len(PREFACE) and PREFACE.startswith(self.buf):
                return
            if self.buf.startswith(PREFACE):
                self.buf = self.buf[len(PREFACE):]
            self.preface = False
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + length:
                return
            ftype, flags = self.buf[3], self.buf[4]
            stream = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload = self.buf[9:9 + length]
            self.buf = self.buf[9 + length:]
            self._frame(ftype, flags, stream, payload, mono, wall)

    def _frame(self, ftype: int, flags: int, stream: int, payload: bytes, mono: float, wall: float) -> None:
        f = Frame(mono, wall, self.tunnel, self.direction, FRAME_NAMES.get(ftype, f"type{ftype}"), flags, stream)
        if ftype == 0:
            f.info = f"len={len(payload)}" + (" END_STREAM" if flags & 1 else "")
        elif ftype in (1, 9):
            block = payload
            if ftype == 1:
                pad = payload[0] if flags & 0x8 else 0
                block = payload[(1 if flags & 0x8 else 0) + (5 if flags & 0x20 else 0):len(payload) - pad]
                self.header_block, self.header_stream, self.header_frame = b"", stream, f
            self.header_block += block
            if flags & 0x4 and self.header_frame is not None:  # END_HEADERS
                self._headers(self.header_frame, self.header_block, end_stream=bool(self.header_frame.flags & 1))
            if ftype == 9:
                f.info = "(continuation)"
        elif ftype == 3:
            f.info = f"code={int.from_bytes(payload[:4], 'big')}"
        elif ftype == 4:
            if flags & 1:
                f.info = "ACK"
            else:
                items = [struct.unpack(">HI", payload[i:i + 6]) for i in range(0, len(payload) - 5, 6)]
                f.info = " ".join(f"{SETTING_NAMES.get(k, k)}={v}" for k, v in items)
        elif ftype == 6:
            f.info = ("ACK " if flags & 1 else "") + payload.hex()
        elif ftype == 7:
            last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            f.info = f"last_stream={last} code={int.from_bytes(payload[4:8], 'big')} {payload[8:]!r}"
        elif ftype == 8:
            f.info = f"+{int.from_bytes(payload[:4], 'big') & 0x7FFFFFFF}"
        self.trace.add(f)

    def _headers(self, f: Frame, block: bytes, end_stream: bool) -> None:
        try:
            fields = self.hpack.decode(block, raw=True)
        except Exception as e:  # a trace must not break the tunnel
            f.info = f"(undecodable header block: {e})"
            return
        d = {k.decode("latin-1"): v.decode("latin-1") for k, v in fields}
        if self.direction == "rx":
            f.request_id = d.get("x-request-id", "")
            f.info = f"{d.get(':method', '')} {d.get(':path', '')} rid={f.request_id}"
        else:
            f.info = f":status {d.get(':status', '')}"
        if end_stream:
            f.info += " END_STREAM"


class FrameTrace:
    """Records every HTTP/2 frame of every worker tunnel of this process, both ways.

    Installed by wrapping :class:`rhttp_wsgi.tls.TLSSession`'s ``handshake`` (numbers the tunnel),
    ``decrypt`` (what the proxy sent) and ``encrypt`` (what the worker sends; timestamped just before
    the ``sendall``).  Sessions are told apart by the object; the wrapped methods are the class's own,
    restored by :meth:`uninstall`.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.frames: list[Frame] = []
        self.tunnels: dict[int, tuple[_Direction, _Direction, str]] = {}  # id(session) -> rx, tx, label
        self.labels: dict[int, str] = {}
        self._saved: dict[str, Any] = {}

    def add(self, f: Frame) -> None:
        self.frames.append(f)  # under self.lock (feed runs under it)

    def _dirs(self, session: Any) -> tuple[_Direction, _Direction, str] | None:
        return self.tunnels.get(id(session))

    def install(self) -> None:
        cls = tls_module.TLSSession
        self._saved = {name: getattr(cls, name) for name in ("handshake", "encrypt", "decrypt", "close_notify")}
        orig_close_notify = self._saved["close_notify"]
        orig_handshake, orig_encrypt, orig_decrypt = (self._saved[n] for n in ("handshake", "encrypt", "decrypt"))
        trace = self

        def handshake(session: Any, sock: socket.socket, timeout: float) -> None:
            orig_handshake(session, sock, timeout)
            if session.server_side:
                return
            with trace.lock:
                index = len(trace.labels)
                label = f"{threading.current_thread().name} local port {sock.getsockname()[1]}"
                trace.labels[index] = label
                trace.tunnels[id(session)] = (_Direction(trace, index, "rx"), _Direction(trace, index, "tx"), label)

        def encrypt(session: Any, data: bytes) -> bytes:
            if data:
                mono, wall = time.monotonic(), time.time()
                with trace.lock:
                    dirs = trace._dirs(session)
                    if dirs is not None:
                        dirs[1].feed(bytes(data), mono, wall)
            return orig_encrypt(session, data)

        def decrypt(session: Any, data: bytes) -> bytes:
            plain = orig_decrypt(session, data)
            if plain:
                mono, wall = time.monotonic(), time.time()
                with trace.lock:
                    dirs = trace._dirs(session)
                    if dirs is not None:
                        dirs[0].feed(plain, mono, wall)
            return plain

        def close_notify(session: Any) -> bytes:
            mono, wall = time.monotonic(), time.time()
            with trace.lock:
                dirs = trace._dirs(session)
                if dirs is not None:
                    trace.add(Frame(mono, wall, dirs[1].tunnel, "tx", "TLS-CLOSE", 0, 0, "close_notify, then FIN"))
            return orig_close_notify(session)

        cls.close_notify = close_notify  # type: ignore[method-assign]
        cls.handshake = handshake  # type: ignore[method-assign]
        cls.encrypt = encrypt  # type: ignore[method-assign]
        cls.decrypt = decrypt  # type: ignore[method-assign]

    def uninstall(self) -> None:
        for name, fn in self._saved.items():
            setattr(tls_module.TLSSession, name, fn)

    def snapshot(self) -> list[Frame]:
        with self.lock:
            return list(self.frames)


# ---------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------


@dataclass
class Result:
    wall: float
    mono: float
    status: int  # -1: connection error
    client_port: int
    error: str = ""


class Load:
    """``n`` threads, each a loop of fresh-connection ``GET /hello`` requests until stopped."""

    def __init__(self, port: int, n: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.results: list[Result] = []
        self.threads = [threading.Thread(target=self._client, name=f"load-{i}", daemon=True) for i in range(n)]

    def start(self) -> Load:
        for th in self.threads:
            th.start()
        return self

    def _client(self) -> None:
        deadline = time.monotonic() + 3600  # bounded: an hour at most
        while not self.stop.is_set() and time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            wall, mono, port = time.time(), time.monotonic(), 0
            try:
                conn.connect()
                port = conn.sock.getsockname()[1]
                conn.request("GET", "/hello", headers={"Host": "app.example"})
                r = conn.getresponse()
                r.read()
                item = Result(wall, mono, r.status, port)
            except OSError as e:
                item = Result(wall, mono, -1, port, repr(e))
            finally:
                conn.close()
            with self.lock:
                self.results.append(item)

    def count(self) -> int:
        with self.lock:
            return len(self.results)

    def since(self, n: int) -> list[Result]:
        with self.lock:
            return self.results[n:]

    def close(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(15)


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def served(pool: WorkerPool) -> int:
    return sum(t.streams_total for t in pool.tunnels())


# ---------------------------------------------------------------------------
# HAProxy side: config with ms timings, its CLI and its h2 trace ring
# ---------------------------------------------------------------------------

LOG_FORMAT = ('log-format "${HAPROXY_HTTP_LOG_FMT} rid=%ID acc=%[accept_date(us)] tr=%tr TR=%TR Tw=%Tw Tc=%Tc'
              ' Tr=%Tr Ta=%Ta term=%tsc retries=%rc"')


def haproxy_config(cli_socket: Path | None) -> str:
    text = RECOMMENDED_CFG.read_text()
    text, n = re.subn(r'^\s*log-format .*$', "    " + LOG_FORMAT, text, count=1, flags=re.M)
    assert n == 1, "the recommended config has no log-format line to extend"
    if cli_socket is not None:
        text = text.replace("global\n", f"global\n    stats socket {cli_socket} level admin\n", 1)
        text += "\nring h2trace\n    format timed\n    maxlen 1024\n    size 268435456\n"
    return text


def haproxy_cli(sock_path: Path, command: str, timeout: float = 30.0) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode("utf-8", "replace")


HAPROXY_TRACE_COMMANDS = ("trace h2 sink h2trace", "trace h2 level developer", "trace h2 verbosity minimal",
                          "trace h2 start now")


class RingReader:
    """Streams HAProxy's trace ring (``show events h2trace -w``) into a file until closed.

    A one-shot ``show events`` at the end would lose what the ring overwrote; following it keeps all.
    """

    def __init__(self, sock_path: Path, out: Path) -> None:
        self.out = out
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(sock_path))
        self.sock.sendall(b"show events h2trace -w -n\n")
        self.thread = threading.Thread(target=self._run, name="haproxy-ring", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with open(self.out, "wb") as f:
            while True:
                try:
                    data = self.sock.recv(1 << 20)
                except OSError:
                    return
                if not data:
                    return
                f.write(data)

    def close(self) -> list[str]:
        """Stop following (after a moment for the last lines) and return every line read."""
        if self.thread.is_alive():
            time.sleep(0.5)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(10)
        self.sock.close()
        return self.out.read_text("utf-8", "replace").splitlines()


_LOG_LINE = re.compile(r" (?P<status>\d{3}) .* rid=(?P<rid>\S+) acc=(?P<acc>\d+) ")


# ---------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------


@dataclass
class Drain:
    index: int
    t_shutdown: float  # monotonic
    t_done: float
    results: list[Result]
    drained: bool
    goaway_tunnels: set[int] = field(default_factory=set)

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.status != 200]


def make_worker(lab: Lab | None, ours: Any, name: str, tunnel_port: int, connections: int) -> WorkerPool:
    app = TestApp(name)
    if lab is not None:
        return lab.worker(app, tunnel_port, name=name, connections=connections, threads=32)
    pki, workers = ours
    cert, key = pki.workers[name]
    pool = WorkerPool(app, proxy=f"127.0.0.1:{tunnel_port}", cert=str(cert), key=str(key), ca=str(pki.ca_cert),
                      connections=connections, threads=32, server_name="localhost").start()
    workers.append(pool)
    assert pool.wait_ready(10), f"worker {name} not ready: {pool.tunnels()}"
    return pool


def send_settings_zero(pool: WorkerPool) -> None:
    """SETTINGS_MAX_CONCURRENT_STREAMS=0 on every tunnel of ``pool`` (experiment only: private API)."""
    for t in pool._live_tunnels():
        with t.lock:
            t.proto.core._frame(4, 0, 0, struct.pack(">HI", 3, 0))
            t._kick_locked()


def quiet_close(pool: WorkerPool, quiet_max: float) -> list[threading.Thread]:
    """Experiment (private API): make each tunnel's ``drain()`` wait for a quiet moment, then close.

    ``pool.shutdown()`` calls ``drain()`` on each tunnel; the replacement hands the tunnel to a
    thread that, under the tunnel's lock (so the reader cannot dispatch a new stream in between),
    checks that no stream is in flight and then queues GOAWAY + close_notify and closes.
    """
    import types

    from h2.errors import ErrorCodes

    threads = []
    for t in pool._live_tunnels():
        original = t.drain

        def waiter(t: Any = t, original: Any = original) -> None:
            deadline = time.monotonic() + quiet_max
            while time.monotonic() < deadline:
                with t.lock:
                    if t.closing:
                        return
                    if not t._channels:
                        t.proto.goaway(ErrorCodes.NO_ERROR)
                        t._close_locked("drained at a quiet moment")
                        return
                time.sleep(0.0005)
            original()

        def drain(self: Any, waiter: Callable[[], None] = waiter) -> None:
            th = threading.Thread(target=waiter, name="quiet-close", daemon=True)
            threads.append(th)
            th.start()

        t.drain = types.MethodType(drain, t)  # type: ignore[method-assign]
    return threads


def run(args: argparse.Namespace) -> int:
    trace = FrameTrace() if args.trace else None
    if trace is not None:
        trace.install()
    workdir = Path(tempfile.mkdtemp(prefix="rhttp-drain-"))
    lab: Lab | None = None
    hp = None
    cli: Path | None = None
    ours_proxy = None
    ring: RingReader | None = None
    ours: tuple[Any, list[WorkerPool]] | None = None
    load: Load | None = None
    pools: list[WorkerPool] = []
    drains: list[Drain] = []
    try:
        if args.proxy == "haproxy":
            found = find_haproxy()
            if found.binary is None:
                print(f"SKIP: {found.reason}")
                return 2
            print(f"proxy: {found.binary.describe()}")
            lab = Lab(found.binary, workdir)
            for name in ("worker-a", "worker-b"):
                lab.worker_cert(name)
            cli = workdir / "admin.sock" if args.haproxy_trace else None
            hp, tport, pport = lab.start_recommended(allowed=("worker-a", "worker-b"),
                                                     cfg_text=haproxy_config(cli))
            if cli is not None:
                ring = RingReader(cli, Path(args.trace_out) if args.trace_out else workdir / "h2trace.txt")
                for cmd in HAPROXY_TRACE_COMMANDS:
                    out = haproxy_cli(cli, cmd).strip()
                    if out:
                        print(f"haproxy CLI {cmd!r}: {out}")
        else:
            from rhttp_wsgi.pki import DemoPKI
            from rhttp_wsgi.proxy import Proxy

            print("proxy: ours (rhttp_wsgi.proxy.Proxy)")
            pki = DemoPKI.create(workdir / "pki", worker_names=("worker-a", "worker-b"))
            ours = (pki, pools)
            ours_proxy = Proxy(cert=str(pki.server_cert), key=str(pki.server_key), workers_ca=str(pki.ca_cert),
                               tunnel_bind="127.0.0.1:0", public_bind="127.0.0.1:0")
            tport = ours_proxy.start_tunnels()[1]
            pport = ours_proxy.start_public()[1]

        def worker(name: str) -> WorkerPool:
            pool = make_worker(lab, ours, name, tport, args.connections)
            if lab is None:
                return pool
            pools.append(pool)
            return pool

        current = worker("worker-b")  # the survivor (baseline) or the first generation (replace)
        if lab is not None:
            lab.wait_serving(pport, "/hello")
        load = Load(pport, args.clients).start()
        assert wait_until(lambda: load.count() > 20, 20), "no load got through"
        print(f"sequence: {args.sequence}; {args.drains} drains; {args.clients} clients;"
              f" {args.connections} tunnels per worker")
        for i in range(args.drains):
            if args.sequence == "replace":
                old = current
                new = worker("worker-a" if i % 2 == 0 else "worker-b")
                before = served(new)
                used = wait_until(lambda new=new, before=before: served(new) - before >= args.warm, 10)
                draining, current = old, new
            else:
                draining = worker("worker-a")
                used = wait_until(lambda draining=draining: served(draining) >= args.warm, 10)
            if not used:
                print(f"  drain {i}: warning: HAProxy sent the new tunnels fewer than {args.warm} streams in 10 s")
            n0 = load.count()
            if args.sequence == "settings0":
                send_settings_zero(draining)
                time.sleep(args.pause)
            elif args.sequence == "pause":
                time.sleep(args.pause)
            elif args.sequence == "quiet-close":
                quiet_close(draining, args.quiet_max)
            frames_before = len(trace.snapshot()) if trace else 0
            t_shutdown = time.monotonic()
            ok = draining.shutdown(10)
            t_done = time.monotonic()
            time.sleep(0.2)  # requests that raced the end of the drain are in the window too
            d = Drain(i, t_shutdown, t_done, load.since(n0), ok)
            if trace is not None:
                d.goaway_tunnels = {f.tunnel for f in trace.snapshot()[frames_before:]
                                    if f.direction == "tx" and f.type == "GOAWAY"}
            drains.append(d)
            statuses = [r.status for r in d.failures]
            print(f"  drain {i}: {len(d.results)} requests in the window, {len(d.failures)} failed {statuses}"
                  f" drained={ok} ({(t_done - t_shutdown) * 1000:.0f} ms)", flush=True)
            if pools and draining in pools:
                pools.remove(draining)
                if lab is not None and draining in lab.workers:
                    lab.workers.remove(draining)
        load.close()
        all_results = list(load.results)
        total_window = sum(len(d.results) for d in drains)
        failed = sum(len(d.failures) for d in drains)
        other_fail = sum(1 for r in all_results if r.status != 200) - failed
        print(f"\nTOTAL {args.proxy} {args.sequence}: {failed} failed of {total_window} requests in the drain"
              f" windows over {len(drains)} drains ({len(all_results)} requests in all,"
              f" {other_fail} failed outside the windows)")
        if hp is not None:
            report_haproxy(hp, drains, trace, ring, args)
        return 0 if failed == 0 else 1
    finally:
        if load is not None:
            load.close()
        if lab is not None:
            for problem in lab.close():
                print(f"teardown: {problem}")
        for pool in pools:
            pool.shutdown(5)
        if ours_proxy is not None:
            ours_proxy.shutdown(5)
        if ring is not None:
            ring.close()
        if trace is not None:
            trace.uninstall()
        print(f"(files in {workdir})")


def report_haproxy(hp: Any, drains: list[Drain], trace: FrameTrace | None, ring: RingReader | None,
                   args: argparse.Namespace) -> None:
    log_lines = [line for line in hp.log_text(limit=1 << 30).splitlines() if " rid=" in line]
    # (the <BADREQ> lines with rid=- are the port probes of the harness, not requests)
    bad = [line for line in log_lines if (m := _LOG_LINE.search(line)) and m.group("status") != "200"
           and m.group("rid") != "-"]
    print(f"HAProxy log: {len(log_lines)} requests, {len(bad)} not 200:")
    for line in bad:
        print("  " + line)
    h2_lines: list[str] = []
    if ring is not None:
        h2_lines = ring.close()
        print(f"HAProxy h2 trace: {len(h2_lines)} lines in {ring.out}")
    if trace is None:
        return
    frames = trace.snapshot()
    rids = {f.request_id for f in frames if f.request_id}
    walls = [f.wall for f in frames]
    print("\nTrace: what the draining worker's tunnels sent and received around each failure")
    for line in bad:
        m = _LOG_LINE.search(line)
        assert m is not None
        rid, acc = m.group("rid"), int(m.group("acc")) / 1e6
        reached = rid in rids
        print(f"\n* {m.group('status')} rid={rid} accepted at {fmt_wall(acc)}:"
              f" {'REACHED a worker' if reached else 'never reached any worker (no HEADERS with this id)'}")
        drain = next((d for d in drains if any(abs(r.wall - acc) < 0.002 and r.status != 200 for r in d.results)),
                     None)
        tunnels = drain.goaway_tunnels if drain else set()
        lo, hi = bisect.bisect_left(walls, acc - args.window), bisect.bisect_right(walls, acc + args.window)
        near = [f for f in frames[lo:hi] if f.tunnel in tunnels or f.type in ("GOAWAY", "PING", "SETTINGS")]
        for f in summarize(near, acc):
            print("    " + f)
        for t in sorted(tunnels):
            print("    " + tunnel_summary(frames, t, acc))
        if h2_lines:
            for hl in haproxy_lines_near(h2_lines, acc, args.window):
                print("    HAProxy: " + hl)


def fmt_wall(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1e6):06d}"


def summarize(frames: list[Frame], acc: float) -> Iterator[str]:
    """Frame lines with times relative to the failed request's accept (ms); DATA/WINDOW_UPDATE folded."""
    folded = 0
    for f in frames:
        if f.type in ("DATA", "WINDOW_UPDATE"):
            folded += 1
            continue
        rel = (f.wall - acc) * 1000
        yield f"{rel:+9.3f} ms  " + f.line()
    if folded:
        yield f"(and {folded} DATA/WINDOW_UPDATE frames)"


def tunnel_summary(frames: list[Frame], tunnel: int, acc: float) -> str:
    """The drain milestones of one tunnel, relative to the failed request's accept (ms)."""
    mine = [f for f in frames if f.tunnel == tunnel]

    def rel(pred: Callable[[Frame], bool], last: bool = False) -> str:
        hits = [f for f in mine if pred(f)]
        if not hits:
            return "-"
        f = hits[-1] if last else hits[0]
        return f"{(f.wall - acc) * 1000:+.3f}"

    return (f"tunnel#{tunnel}: GOAWAY#1 sent {rel(lambda f: f.direction == 'tx' and f.type == 'GOAWAY')} ms,"
            f" PING ACK received {rel(lambda f: f.direction == 'rx' and f.type == 'PING' and f.flags & 1, True)} ms,"
            f" final GOAWAY sent {rel(lambda f: f.direction == 'tx' and f.type == 'GOAWAY', True)} ms,"
            f" last request HEADERS received {rel(lambda f: f.direction == 'rx' and f.type == 'HEADERS', True)} ms,"
            f" closed {rel(lambda f: f.type == 'TLS-CLOSE')} ms")


_RING_TIME = re.compile(r"^<\d+>(\S+?[+-]\d\d:\d\d) ")


def ring_time(line: str) -> float | None:
    """The wall-clock time of a trace ring line (ring ``format timed``: ISO 8601 with microseconds)."""
    m = _RING_TIME.match(line)
    if not m:
        return None
    from datetime import datetime

    return datetime.fromisoformat(m.group(1)).timestamp()


def haproxy_lines_near(lines: list[str], acc: float, window: float) -> list[str]:
    """The HAProxy trace lines timed within ``window`` s of ``acc``, times made relative to it (ms)."""
    out = []
    for line in lines:
        t = ring_time(line)
        if t is not None and acc - window <= t <= acc + window:
            out.append(f"{(t - acc) * 1000:+9.3f} ms  " + line.split(" ", 1)[1])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy", choices=("haproxy", "ours"), default="haproxy")
    ap.add_argument("--sequence", default="baseline",
                    choices=("baseline", "replace", "settings0", "pause", "quiet-close"))
    ap.add_argument("--drains", type=int, default=15)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--connections", type=int, default=2, help="tunnels per worker")
    ap.add_argument("--warm", type=int, default=20, help="streams HAProxy must send a new worker before a drain")
    ap.add_argument("--pause", type=float, default=0.2, help="seconds between SETTINGS(0) (or nothing) and GOAWAY")
    ap.add_argument("--quiet-max", type=float, default=2.0, help="quiet-close: longest wait for a quiet moment")
    ap.add_argument("--no-trace", dest="trace", action="store_false", help="no worker-side frame trace")
    ap.add_argument("--haproxy-trace", action="store_true", help="also HAProxy's own h2 trace (slower)")
    ap.add_argument("--trace-out", help="write HAProxy's whole h2 trace here")
    ap.add_argument("--window", type=float, default=0.005, help="seconds of trace shown around each failure")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
