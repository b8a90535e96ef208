"""Helpers for the HAProxy end-to-end tests: find HAProxy, run it, talk to it.

Nothing here is a pytest fixture; ``conftest.py`` wires these into fixtures.

* :func:`find_haproxy` looks for a usable HAProxy (``HAPROXY_BIN``, then
  ``PATH``, then :data:`DEFAULT_BIN`), checks its version and that it accepts a
  reverse-HTTP config (``rhttp@`` + ``attach-srv``), and says why not otherwise.
* :class:`HAProxyProcess` runs one HAProxy in the foreground (``-db``) with its
  output in a log file, waits for its ports with a bounded deadline, and stops
  it by PID (terminate, then kill).
* :class:`Lab` is one test's world: a private PKI in ``tmp_path``, free ports on
  127.0.0.1, the HAProxy processes and worker pools it started (all stopped at
  teardown), and small HTTP helpers.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import http.client
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from rhttp_wsgi.pki import DemoPKI
from rhttp_wsgi.worker import WorkerPool

log = logging.getLogger("tests.interop.haproxy")

#: Where ``scripts/install-haproxy.sh`` puts HAProxy.
DEFAULT_BIN = "/opt/rhttp-haproxy/bin/haproxy"
#: Oldest HAProxy these tests run against (reverse HTTP needs >= 2.9; the
#: project supports 3.0, the Debian 13 version).
MIN_VERSION = (3, 0)
#: ``idle-ping`` exists from this version on.
IDLE_PING_VERSION = (3, 2)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples" / "haproxy"
RECOMMENDED_CFG = EXAMPLES / "haproxy.cfg"
RECOMMENDED_CFG_32 = EXAMPLES / "haproxy-3.2.cfg"

_VERSION_RE = re.compile(r"HA-?Proxy version (\S+)")


def in_ci() -> bool:
    """True under CI (``CI=true``, as GitHub Actions and most CI systems set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


# ---------------------------------------------------------------------------
# Finding HAProxy
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HAProxyBinary:
    path: str
    version: str  # as printed, e.g. "3.0.11-1+deb13u5"
    version_tuple: tuple[int, ...]
    source: str  # "HAPROXY_BIN", "PATH" or "default"

    def at_least(self, *version: int) -> bool:
        return self.version_tuple[: len(version)] >= version

    def describe(self) -> str:
        return f"HAProxy {self.version} at {self.path} (found via {self.source})"


@dataclass(frozen=True)
class HAProxyLookup:
    binary: HAProxyBinary | None
    reason: str  # why there is no usable binary ("" when there is one)


def _parse_version(text: str) -> tuple[str, tuple[int, ...]] | None:
    m = _VERSION_RE.search(text)
    if not m:
        return None
    raw = m.group(1)
    nums = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", raw)
    if not nums:
        return None
    return raw, tuple(int(x) for x in nums.groups(default="0"))


_PROBE_CFG = """\
global
    expose-experimental-directives
defaults
    mode http
    timeout connect 1s
    timeout client 1s
    timeout server 1s
frontend fe_tunnel
    bind 127.0.0.1:1 proto h2
    tcp-request session attach-srv be_rhttp/s
backend be_rhttp
    server s rhttp@
"""


def _probe(path: str, source: str, scratch: Path) -> tuple[HAProxyBinary | None, str]:
    try:
        out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{path} ({source}): cannot run `-v`: {e}"
    parsed = _parse_version(out.stdout + out.stderr)
    if parsed is None:
        return None, f"{path} ({source}): `-v` printed no version: {(out.stdout + out.stderr).strip()[:200]!r}"
    raw, tup = parsed
    if tup[:2] < MIN_VERSION:
        return None, (f"{path} ({source}) is HAProxy {raw}, too old: reverse HTTP (rhttp@, attach-srv)"
                      f" needs >= {'.'.join(map(str, MIN_VERSION))}")
    cfg = scratch / "probe.cfg"
    cfg.write_text(_PROBE_CFG)
    try:
        chk = subprocess.run([path, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{path} ({source}): cannot run `-c`: {e}"
    if chk.returncode != 0:
        return None, (f"{path} ({source}) is HAProxy {raw} but rejects a reverse-HTTP config"
                      f" (rhttp@ / attach-srv): {(chk.stdout + chk.stderr).strip()[-400:]}")
    return HAProxyBinary(path, raw, tup, source), ""


@lru_cache(maxsize=1)
def find_haproxy() -> HAProxyLookup:
    """``HAPROXY_BIN`` if set (and only it), else ``haproxy`` on PATH, else :data:`DEFAULT_BIN`.

    The first candidate that is new enough and accepts a reverse-HTTP config
    wins; otherwise the reason names every candidate tried.
    """
    import tempfile

    explicit = os.environ.get("HAPROXY_BIN", "").strip()
    candidates: list[tuple[str, str]] = []
    if explicit:
        resolved = shutil.which(explicit) or explicit
        candidates.append((resolved, "HAPROXY_BIN"))
    else:
        on_path = shutil.which("haproxy")
        if on_path:
            candidates.append((on_path, "PATH"))
        if os.path.realpath(DEFAULT_BIN) not in {os.path.realpath(c) for c, _ in candidates}:
            candidates.append((DEFAULT_BIN, "default"))
    reasons = []
    with tempfile.TemporaryDirectory(prefix="rhttp-haproxy-probe-") as scratch:
        for path, source in candidates:
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                reasons.append(f"{path} ({source}): not found or not executable")
                continue
            binary, reason = _probe(path, source, Path(scratch))
            if binary is not None:
                return HAProxyLookup(binary, "")
            reasons.append(reason)
    hint = "install it with scripts/install-haproxy.sh or point HAPROXY_BIN at a HAProxy >= 3.0"
    return HAProxyLookup(None, "no usable HAProxy: " + "; ".join(reasons) + f" ({hint})")


# ---------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open until all are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# One HAProxy process
# ---------------------------------------------------------------------------


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    # If pytest dies without tearing down, the kernel sends SIGTERM to
    # HAProxy: no process outlives the test run.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class HAProxyError(RuntimeError):
    pass


class HAProxyProcess:
    """One foreground HAProxy (``-db -f cfg``), output to ``log_path``, stopped by PID."""

    def __init__(self, binary: HAProxyBinary, cfg: Path, log_path: Path,
                 env: Mapping[str, str] | None = None, name: str = "haproxy") -> None:
        self.binary = binary
        self.cfg = cfg
        self.log_path = log_path
        self.env = dict(env or {})
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def _environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        return env

    def check(self) -> subprocess.CompletedProcess[str]:
        """``haproxy -c -f cfg`` with this process's environment."""
        return subprocess.run([self.binary.path, "-c", "-f", str(self.cfg)], capture_output=True,
                              text=True, timeout=30, env=self._environ())

    def start(self, wait_ports: Iterable[int] = (), timeout: float = 10.0) -> HAProxyProcess:
        if self.proc is not None and self.proc.poll() is None:
            raise HAProxyError(f"{self.name} is already running (pid {self.proc.pid})")
        self.starts += 1
        with open(self.log_path, "ab") as logf:
            logf.write(f"===== {self.name} start #{self.starts} at {time.strftime('%H:%M:%S')} "
                       f"({self.binary.path} -db -f {self.cfg}) =====\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(
                [self.binary.path, "-db", "-f", str(self.cfg)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=self._environ(), preexec_fn=_set_pdeathsig,
            )
        self.wait_ports(wait_ports, timeout)
        return self

    def wait_ports(self, ports: Iterable[int], timeout: float = 10.0) -> None:
        """Poll-connect every port until it accepts, within ``timeout``; fail fast if HAProxy exits."""
        deadline = time.monotonic() + timeout
        pending = list(ports)
        while pending:
            if self.proc is None or self.proc.poll() is not None:
                rc = None if self.proc is None else self.proc.returncode
                raise HAProxyError(f"{self.name} exited (rc={rc}) before listening:\n{self.log_text()}")
            if port_open(pending[0]):
                pending.pop(0)
                continue
            if time.monotonic() >= deadline:
                raise HAProxyError(f"{self.name} did not listen on 127.0.0.1:{pending[0]} within "
                                   f"{timeout:g}s:\n{self.log_text()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM (HAProxy's hard stop) by PID, then SIGKILL; always reaps. Returns the exit code."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout)
        with open(self.log_path, "ab") as logf:
            logf.write(f"===== {self.name} (pid {p.pid}) exited rc={p.returncode} =====\n".encode())
        return p.returncode

    def log_text(self, limit: int = 200_000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no log)"
        if len(data) > limit:
            data = b"...(truncated)...\n" + data[-limit:]
        return data.decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# HTTP helpers
# ---------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    elapsed: float

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def http_request(port: int, method: str = "GET", path: str = "/", body: bytes | None = None,
                 headers: Mapping[str, str] | None = None, timeout: float = 15.0) -> Response:
    """One HTTP/1.1 request to 127.0.0.1:port on a fresh connection."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        r = conn.getresponse()
        data = r.read()
        return Response(r.status, r.headers, data, time.monotonic() - t0)
    finally:
        conn.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_threads(fn: Callable[[int], Any], n: int, timeout: float) -> list[Any]:
    """Run ``fn(i)`` for i in range(n) on n threads at once; results (or exceptions) in order.

    Raises AssertionError if a thread is still running after ``timeout``.
    """
    results: list[Any] = [None] * n

    def target(i: int) -> None:
        try:
            results[i] = fn(i)
        except BaseException as e:  # reported to the caller
            results[i] = e

    threads = [threading.Thread(target=target, args=(i,), name=f"client-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"{len(alive)} client threads still running after {timeout:g}s: {alive[:5]}"
    return results


# ---------------------------------------------------------------------------
# The lab: one test's PKI, ports, HAProxy processes and workers
# ---------------------------------------------------------------------------


@dataclass
class Lab:
    binary: HAProxyBinary
    dir: Path
    pki: DemoPKI = field(init=False)
    server_pem: Path = field(init=False)
    haproxies: list[HAProxyProcess] = field(default_factory=list)
    workers: list[WorkerPool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pki = DemoPKI.create(self.dir / "pki", worker_names=("worker",))
        # HAProxy's `crt` wants the certificate and its key in one PEM file.
        self.server_pem = self.dir / "pki" / "server.pem"
        self.server_pem.write_bytes(self.pki.server_cert.read_bytes() + self.pki.server_key.read_bytes())
        self.server_pem.chmod(0o600)

    # -- certificates ---------------------------------------------------------

    def worker_cert(self, name: str) -> tuple[Path, Path]:
        if name not in self.pki.workers:
            self.pki.issue_worker(name)
        return self.pki.workers[name]

    def foreign_worker_cert(self, name: str = "worker") -> tuple[Path, Path]:
        """A client certificate with an allowed CN, but signed by another CA."""
        other = DemoPKI.create(self.dir / "other-pki", worker_names=(name,))
        return other.workers[name]

    # -- HAProxy ---------------------------------------------------------------

    def haproxy(self, cfg_text: str | None = None, *, cfg_path: Path | None = None,
                env: Mapping[str, str] | None = None, name: str | None = None) -> HAProxyProcess:
        """A (not yet started) HAProxy for ``cfg_text`` (written to the lab) or ``cfg_path``."""
        idx = len(self.haproxies)
        name = name or f"haproxy{idx}"
        if cfg_path is None:
            assert cfg_text is not None
            cfg_path = self.dir / f"{name}.cfg"
            cfg_path.write_text(cfg_text)
        hp = HAProxyProcess(self.binary, cfg_path, self.dir / f"{name}.log", env=env, name=name)
        self.haproxies.append(hp)
        return hp

    def recommended_env(self, tunnel_port: int, public_port: int,
                        allowed: Iterable[str] = ("worker",)) -> dict[str, str]:
        """Environment for examples/haproxy/haproxy*.cfg (paths and ports of this lab)."""
        workers_list = self.dir / "workers.lst"
        workers_list.write_text("".join(f"{cn}\n" for cn in allowed))
        return {
            "RHTTP_TUNNEL_BIND": f"127.0.0.1:{tunnel_port}",
            "RHTTP_PUBLIC_BIND": f"127.0.0.1:{public_port}",
            "RHTTP_SERVER_PEM": str(self.server_pem),
            "RHTTP_WORKERS_CA": str(self.pki.ca_cert),
            "RHTTP_WORKERS_LIST": str(workers_list),
        }

    def start_recommended(self, cfg_path: Path = RECOMMENDED_CFG, *, allowed: Iterable[str] = ("worker",),
                          cfg_text: str | None = None) -> tuple[HAProxyProcess, int, int]:
        """Start the recommended config; returns (process, tunnel port, public port)."""
        tunnel_port, public_port = free_ports(2)
        env = self.recommended_env(tunnel_port, public_port, allowed)
        if cfg_text is not None:
            hp = self.haproxy(cfg_text, env=env)
        else:
            hp = self.haproxy(cfg_path=cfg_path, env=env)
        hp.start(wait_ports=(tunnel_port, public_port))
        return hp, tunnel_port, public_port

    # -- workers ------------------------------------------------------------------

    def worker(self, app: Any, tunnel_port: int, *, name: str = "worker",
               cert: tuple[Path, Path] | None = None, wait: bool = True,
               ready_timeout: float = 10.0, **options: Any) -> WorkerPool:
        """Start a WorkerPool for ``app`` dialing 127.0.0.1:tunnel_port with worker cert ``name``."""
        cert_path, key_path = cert or self.worker_cert(name)
        options.setdefault("connections", 2)
        options.setdefault("server_name", "localhost")
        pool = WorkerPool(app, proxy=f"127.0.0.1:{tunnel_port}", cert=str(cert_path), key=str(key_path),
                          ca=str(self.pki.ca_cert), **options)
        self.workers.append(pool)
        pool.start()
        if wait:
            assert pool.wait_ready(ready_timeout), (
                f"worker {name!r} not ready within {ready_timeout:g}s: {pool.tunnels()}")
        return pool

    def wait_serving(self, public_port: int, path: str = "/", host: str = "app.example",
                     timeout: float = 5.0) -> None:
        """Until a request gets a non-503 answer (a tunnel is in HAProxy's pool), within ``timeout``."""
        deadline = time.monotonic() + timeout
        last: Response | OSError | None = None
        while time.monotonic() < deadline:
            try:
                last = http_request(public_port, "GET", path, headers={"Host": host}, timeout=5)
            except OSError as e:
                last = e
            else:
                if last.status != 503:
                    return
            time.sleep(0.02)
        raise AssertionError(f"HAProxy on :{public_port} did not route to a worker within {timeout:g}s: {last!r}")

    # -- teardown -------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop every worker pool, then every HAProxy (by PID). Returns problems found."""
        problems = []
        for pool in self.workers:
            t0 = time.monotonic()
            try:
                ok = pool.shutdown(5.0)
            except Exception as e:  # keep tearing down the rest
                problems.append(f"worker shutdown raised {e!r}")
                continue
            if not ok:
                problems.append(f"a worker pool did not drain within 5s ({time.monotonic() - t0:.1f}s)")
        for hp in self.haproxies:
            hp.stop()
            if hp.running:  # pragma: no cover - stop() kills and reaps
                problems.append(f"{hp.name} (pid {hp.pid}) still running")
        return problems

    def logs(self) -> Iterator[tuple[str, str]]:
        for hp in self.haproxies:
            if hp.log_path.exists():
                yield f"{hp.name} log ({hp.log_path})", hp.log_text()


# ---------------------------------------------------------------------------
# The WSGI app the workers serve
# ---------------------------------------------------------------------------


def pattern_bytes(n: int, seed: int = 0) -> bytes:
    """``n`` reproducible pseudo-random bytes (the test recomputes them to compare)."""
    import random

    return random.Random(seed).randbytes(n)


class TestApp:
    """One WSGI app with a route per scenario.  ``name`` tells which worker answered.

    * ``GET /hello``                 -> ``hello from <name>``
    * ``GET /env``                   -> JSON of the request's environ (host, scheme, forwarded headers)
    * ``GET /bytes?n=N&seed=S``      -> N bytes of :func:`pattern_bytes`, in 64 KiB chunks
    * ``POST /echo``                 -> the request body
    * ``POST /digest``               -> JSON {"len", "sha256", "worker"} of the request body
    * ``GET /sse?n=N&token=T``       -> N events; after each, waits (<= 10 s) until the test
                                        calls ``sse_ack(T, i)``
    * ``GET /barrier``               -> waits at :attr:`barrier` (every party must arrive)
    * ``GET /slow?ms=M``             -> streams 10 chunks over M ms, then ``done by <name>``
    * ``GET /cl-pause?ms=M``         -> a Content-Length body, then the iterable lingers M ms
    """

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "worker", barrier_parties: int = 0, barrier_timeout: float = 20.0) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.barrier = threading.Barrier(barrier_parties) if barrier_parties else None
        self.barrier_timeout = barrier_timeout
        self._acks: dict[str, list[threading.Event]] = {}
        self.sse_sent: dict[str, list[float]] = {}

    # -- test side -------------------------------------------------------------

    def sse_ack(self, token: str, i: int) -> None:
        self._sse_events(token)[i].set()

    def _sse_events(self, token: str, n: int = 64) -> list[threading.Event]:
        with self.lock:
            if token not in self._acks:
                self._acks[token] = [threading.Event() for _ in range(n)]
                self.sse_sent[token] = []
            return self._acks[token]

    # -- WSGI ---------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with self.lock:
            self.in_flight += 1
            self.requests += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self._route(environ, start_response)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _route(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        import json
        from urllib.parse import parse_qs

        path = environ["PATH_INFO"]
        q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        method = environ["REQUEST_METHOD"]
        if path == "/hello":
            return self._reply(start_response, f"hello from {self.name}".encode())
        if path == "/env":
            keys = ("HTTP_HOST", "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL", "REQUEST_METHOD",
                    "PATH_INFO", "QUERY_STRING", "REMOTE_ADDR", "wsgi.url_scheme",
                    "HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "HTTP_USER_AGENT")
            data = {k: environ.get(k) for k in keys}
            data["worker"] = self.name
            return self._reply(start_response, json.dumps(data).encode(), "application/json")
        if path == "/bytes":
            n, seed = int(q.get("n", "0")), int(q.get("seed", "0"))
            body = pattern_bytes(n, seed)
            start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                      ("Content-Length", str(n))])
            return (body[i:i + 65536] for i in range(0, n, 65536))
        if path == "/echo" and method == "POST":
            return self._reply(start_response, environ["wsgi.input"].read(), "application/octet-stream")
        if path == "/digest" and method == "POST":
            h = hashlib.sha256()
            total = 0
            stream = environ["wsgi.input"]
            while True:
                chunk = stream.read(65536)
                if not chunk:
                    break
                h.update(chunk)
                total += len(chunk)
            body = json.dumps({"len": total, "sha256": h.hexdigest(), "worker": self.name}).encode()
            return self._reply(start_response, body, "application/json")
        if path == "/sse":
            return self._sse(start_response, q.get("token", "sse"), int(q.get("n", "5")))
        if path == "/barrier":
            assert self.barrier is not None
            self.barrier.wait(self.barrier_timeout)  # BrokenBarrierError -> 500
            return self._reply(start_response, f"through the barrier at {self.name}".encode())
        if path == "/slow":
            return self._slow(start_response, int(q.get("ms", "500")))
        if path == "/cl-pause":
            return self._cl_pause(start_response, int(q.get("ms", "100")))
        return self._reply(start_response, b"not found\n", status="404 Not Found")

    def _reply(self, start_response: Callable[..., Any], body: bytes, ctype: str = "text/plain",
               status: str = "200 OK") -> list[bytes]:
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                                ("X-Worker", self.name)])
        return [body]

    def _sse(self, start_response: Callable[..., Any], token: str, n: int) -> Iterator[bytes]:
        events = self._sse_events(token)
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                                  ("X-Worker", self.name)])
        for i in range(n):
            self.sse_sent[token].append(time.monotonic())
            yield f"id: {i}\ndata: tick {i}\n\n".encode()
            # The next event is produced only once the client has seen this
            # one: if anything on the way buffered it, the test times out.
            if not events[i].wait(10.0):
                raise TimeoutError(f"client never acknowledged SSE event {i}")

    def _cl_pause(self, start_response: Callable[..., Any], ms: int) -> Iterator[bytes]:
        body = b"complete"
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        yield body
        time.sleep(ms / 1000)  # the iterable ends well after the last byte

    def _slow(self, start_response: Callable[..., Any], ms: int) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Worker", self.name)])
        for i in range(10):
            time.sleep(ms / 10000)
            yield f"{i}.".encode()
        yield f"done by {self.name}".encode()
