"""The gunicorn worker class, run as users run it: a real ``gunicorn`` master.

Each test starts our real :class:`~rhttp_wsgi.proxy.Proxy` (tunnels and public
HTTP on 127.0.0.1, real mTLS) and a ``gunicorn -k ...RHTTPWorker`` master as a
subprocess whose workers dial it; requests go to the proxy's public port with
``http.client``.  The app (``tests/apps/pid_app.py``) answers with the pid of
the process that served it.  The master and every worker it booted are
stopped by pid at teardown.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rhttp_wsgi.errors import ConfigError
from rhttp_wsgi.pki import DemoPKI
from rhttp_wsgi.proxy import Proxy

pytest.importorskip("gunicorn", reason="gunicorn is in the 'test' extra")

from rhttp_wsgi.gunicorn_worker import build_options  # after the gunicorn check

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.apps.pid_app:app"
DOTTED = "rhttp_wsgi.gunicorn_worker.RHTTPWorker"
WAIT = 20.0


def wait_until(pred: Callable[[], bool], timeout: float = WAIT, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


class Gunicorn:
    """A gunicorn master subprocess; its log (stdout + stderr) goes to a file."""

    def __init__(self, tmp_path: Path, env: dict[str, str], *args: str, worker_class: str = DOTTED) -> None:
        self.log_path = tmp_path / "gunicorn.log"
        self._log_file = self.log_path.open("wb")
        cmd = [sys.executable, "-m", "gunicorn", "-k", worker_class, "-b", "127.0.0.1:0",
               "--graceful-timeout", "10", "--timeout", "30", *args, APP]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def booted(self) -> list[int]:
        return [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", self.log())]

    def exited(self) -> set[int]:
        return {int(p) for p in re.findall(r"Worker exiting \(pid: (\d+)\)", self.log())}

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = WAIT) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Terminate the master (then kill it), then kill any worker it left behind, by pid."""
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            for pid in self.booted():
                if _is_our_gunicorn(pid):
                    os.kill(pid, signal.SIGKILL)
        finally:
            self._log_file.close()


def _is_our_gunicorn(pid: int) -> bool:
    """Is ``pid`` still one of the workers (checked by command line, so a reused pid is left alone)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"gunicorn" in cmdline and APP.encode() in cmdline


@pytest.fixture()
def pki(tmp_path: Path) -> DemoPKI:
    return DemoPKI.create(tmp_path / "pki", worker_names=("gunicorn",))


class Front:
    """The proxy and the addresses its listeners got (from ``start_tunnels`` / ``start_public``)."""

    def __init__(self, proxy: Front) -> None:
        self.proxy = proxy
        self.tunnel = proxy.start_tunnels()
        self.public = proxy.start_public()

    def workers(self) -> int:
        return len(self.proxy.workers())

    def wait_for_workers(self, n: int, timeout: float = WAIT) -> bool:
        return self.proxy.wait_for_workers(n, timeout)


@pytest.fixture()
def proxy(pki: DemoPKI) -> Iterator[Front]:
    p = Proxy(cert=str(pki.server_cert), key=str(pki.server_key), workers_ca=str(pki.ca_cert),
              tunnel_bind="127.0.0.1:0", public_bind="127.0.0.1:0", selector="round-robin",
              shutdown_timeout=5.0)
    try:
        yield Front(p)
    finally:
        p.shutdown(5.0)


@pytest.fixture()
def start(tmp_path: Path, pki: DemoPKI, proxy: Front) -> Iterator[Callable[..., Gunicorn]]:
    masters: list[Gunicorn] = []
    cert, key = pki.workers["gunicorn"]
    tunnel_host, tunnel_port = proxy.tunnel
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RHTTP_", "GUNICORN_"))}
    base.update(RHTTP_PROXY=f"{tunnel_host}:{tunnel_port}", RHTTP_CERT=str(cert), RHTTP_KEY=str(key),
                RHTTP_CA=str(pki.ca_cert), RHTTP_SERVER_NAME="localhost", RHTTP_CONNECTIONS="1",
                PYTHONPATH=str(ROOT),
                # gunicorn >= 25.1 opens a control socket in $XDG_RUNTIME_DIR (else ~/.gunicorn)
                XDG_RUNTIME_DIR=str(tmp_path))

    def _start(*args: str, worker_class: str = DOTTED, env: dict[str, str | None] | None = None) -> Gunicorn:
        full = dict(base)
        for k, v in (env or {}).items():
            if v is None:
                full.pop(k, None)
            else:
                full[k] = v
        g = Gunicorn(tmp_path, full, *args, worker_class=worker_class)
        masters.append(g)
        return g

    try:
        yield _start
    finally:
        for g in masters:
            g.stop()


def get(proxy: Front, path: str = "/", timeout: float = 15.0) -> tuple[int, str, dict[str, str]]:
    host, port = proxy.public
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode(), {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


def attached(proxy: Front, g: Gunicorn, n: int) -> None:
    assert proxy.wait_for_workers(n), f"{n} tunnel(s) not attached\n" + g.log()


# -- options ---------------------------------------------------------------------------------


def _app(environ: object, start_response: object) -> list[bytes]:
    return []


def test_options_come_from_rhttp_environment_and_gunicorn_threads(pki: DemoPKI) -> None:
    cert, key = pki.workers["gunicorn"]
    env = {"RHTTP_PROXY": "127.0.0.1:8443", "RHTTP_CERT": str(cert), "RHTTP_KEY": str(key),
           "RHTTP_CONNECTIONS": "3", "RHTTP_PING_INTERVAL": "2.5", "RHTTP_URL_SCHEME": "https"}
    o = build_options(_app, gunicorn_threads=8, environ=env)
    assert (o.proxy, o.connections, o.ping_interval, o.url_scheme, o.threads) == \
        (("127.0.0.1:8443",), 3, 2.5, "https", 8)
    assert build_options(_app, gunicorn_threads=8, environ={**env, "RHTTP_THREADS": "2"}).threads == 2
    assert build_options(_app, gunicorn_threads=1, environ=env).threads == 16  # gunicorn's default keeps ours
    with pytest.raises(ConfigError, match="connections"):
        build_options(_app, environ={**env, "RHTTP_CONNECTIONS": "many"})


def test_graceful_timeout_is_the_drain_budget_the_environment_may_only_shorten(pki: DemoPKI) -> None:
    cert, key = pki.workers["gunicorn"]
    env = {"RHTTP_PROXY": "127.0.0.1:8443", "RHTTP_CERT": str(cert), "RHTTP_KEY": str(key)}
    assert build_options(_app, graceful_timeout=12.0, environ=env).shutdown_timeout == 12.0
    for variable, budget in (("5", 5.0), ("60", 12.0)):
        o = build_options(_app, graceful_timeout=12.0, environ={**env, "RHTTP_SHUTDOWN_TIMEOUT": variable})
        assert o.shutdown_timeout == budget
    assert build_options(None, environ=env).app is None  # validated before the app is imported


# -- a real master ------------------------------------------------------------------------------


def test_two_processes_each_with_its_own_tunnel_serve(proxy: Front, start: Callable[..., Gunicorn]) -> None:
    ep = [e for e in importlib.metadata.entry_points(group="gunicorn.workers") if e.name == "rhttp"]
    if not ep:
        pytest.skip("rhttp-wsgi is not installed (pip install -e .): the egg:rhttp-wsgi#rhttp entry point"
                    " is missing")
    g = start("--workers", "2", "--threads", "4", worker_class="egg:rhttp-wsgi#rhttp")
    attached(proxy, g, 2)
    assert proxy.workers() == 2
    replies = [get(proxy) for _ in range(20)]
    assert {r[2]["x-multiprocess"] for r in replies} == {"True"}  # PEP 3333: siblings serve the app
    seen = Counter(r[1] for r in replies)
    assert set(seen) == {str(p) for p in g.booted()}, (seen, g.log())
    assert len(seen) == 2 and all(n == 10 for n in seen.values()), seen  # round-robin over 2 tunnels
    assert g.log().count("1 tunnel(s), 4 app thread(s)") == 2, g.log()
    g.signal(signal.SIGTERM)
    assert g.wait() == 0, g.log()


def test_sigterm_drains_an_in_flight_request(proxy: Front, start: Callable[..., Gunicorn],
                                             tmp_path: Path) -> None:
    g = start("--workers", "2")
    attached(proxy, g, 2)
    marker = tmp_path / "slow-started"
    result: list[tuple[int, str, dict[str, str]] | BaseException] = []

    def slow() -> None:
        try:
            result.append(get(proxy, f"/slow?seconds=2&marker={marker}"))
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=slow, name="slow-client")
    t.start()
    try:
        assert wait_until(marker.exists), g.log()
        g.signal(signal.SIGTERM)
        assert g.wait() == 0, g.log()
    finally:
        t.join(WAIT)
    status, body, _ = result[0]  # type: ignore[misc]
    assert (status, body) == (200, marker.read_text()), result
    log = g.log()
    assert log.count("rhttp worker: drained") == 2, log
    # The master waited for the drain.  It runs in another process (no clock to move), so the proof
    # is the order of its log, which every process appends to: a worker says "drained" once its
    # in-flight request was answered (the slow one above), and the master's last line comes after both.
    assert log.rindex("rhttp worker: drained") < log.rindex("Shutting down: Master"), log


def test_sigquit_exits_at_once(proxy: Front, start: Callable[..., Gunicorn], tmp_path: Path) -> None:
    g = start("--workers", "1")
    attached(proxy, g, 1)
    marker = tmp_path / "slow-started"
    result: list[object] = []

    def slow() -> None:
        try:
            result.append(get(proxy, f"/slow?seconds=30&marker={marker}")[0])
        except (OSError, http.client.HTTPException) as e:
            result.append(e)

    t = threading.Thread(target=slow, name="slow-client")
    t.start()
    try:
        assert wait_until(marker.exists), g.log()
        started = time.monotonic()
        g.signal(signal.SIGQUIT)
        assert g.wait() == 0, g.log()
        assert time.monotonic() - started < 5.0, g.log()
    finally:
        t.join(WAIT)
    assert result and result[0] != 200, result  # cut off (502 from the proxy), not served
    assert "closing tunnels now" in g.log()


def test_sighup_replaces_workers_without_a_failed_request(proxy: Front, start: Callable[..., Gunicorn]) -> None:
    g = start("--workers", "2")
    attached(proxy, g, 2)
    old = set(g.booted())
    assert len(old) == 2
    results: list[tuple[int, str] | str] = []
    stop = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + 40
        while not stop.is_set() and time.monotonic() < deadline and len(results) < 20000:
            try:
                status, body, _ = get(proxy, timeout=10)
                results.append((status, body))
            except (OSError, http.client.HTTPException) as e:
                results.append(repr(e))

    t = threading.Thread(target=client, name="hup-client")
    t.start()
    try:
        assert wait_until(lambda: len(results) >= 20)
        g.signal(signal.SIGHUP)
        assert wait_until(lambda: old <= g.exited()), "old workers still running\n" + g.log()
        # (each old worker waited for *a* new one: the other may still be booting)
        assert wait_until(lambda: len(set(g.booted()) - old) == 2), "no 2 new workers\n" + g.log()
        new = set(g.booted()) - old
        mark = len(results)  # the one request in flight now may still be an old worker's
        assert wait_until(lambda: len(results) >= mark + 20)
    finally:
        stop.set()
        t.join(WAIT)
    assert not t.is_alive()
    failures = [r for r in results if not (isinstance(r, tuple) and r[0] == 200)]
    assert not failures, (failures[:5], len(failures), g.log())
    pids = [int(r[1]) for r in results if isinstance(r, tuple)]
    assert set(pids) <= old | new
    assert set(pids[mark + 1:]) <= new and old & set(pids) and new & set(pids), Counter(pids)
    assert "serving until a new worker is connected" in g.log()
    assert wait_until(lambda: proxy.workers() == 2)
    g.signal(signal.SIGTERM)
    assert g.wait() == 0, g.log()


def test_sighup_to_the_master_puts_rotated_certificate_files_in_use(proxy: Front, start: Callable[..., Gunicorn],
                                                                    pki: DemoPKI) -> None:
    """Under gunicorn, certificate rotation is gunicorn's reload: the new workers read the files afresh."""
    from cryptography import x509

    def serial(path: Path) -> int:
        return x509.load_pem_x509_certificate(path.read_bytes()).serial_number

    g = start("--workers", "2")
    attached(proxy, g, 2)
    old_pids = set(g.booted())
    old = serial(pki.workers["gunicorn"][0])
    assert {w.certificate.serial_number for w in proxy.proxy.workers()} == {old}
    new = serial(pki.issue_worker("gunicorn")[0])
    g.signal(signal.SIGHUP)
    assert wait_until(lambda: old_pids <= g.exited()), "old workers still running\n" + g.log()
    assert wait_until(lambda: [w.certificate.serial_number for w in proxy.proxy.workers()] == [new, new]), \
        g.log()
    assert get(proxy)[0] == 200
    g.signal(signal.SIGTERM)
    assert g.wait() == 0, g.log()


def test_max_requests_recycles_without_a_failed_request(proxy: Front, start: Callable[..., Gunicorn]) -> None:
    g = start("--workers", "2", "--max-requests", "5")
    attached(proxy, g, 2)
    pids: list[int] = []
    deadline = time.monotonic() + 30  # a replacement must boot (import the app, handshake) to show up
    while (len(pids) < 20 or len(set(pids)) < 3) and time.monotonic() < deadline:
        status, body, _ = get(proxy)
        assert status == 200, (status, body, g.log())
        pids.append(int(body))
        time.sleep(0.05)
    counts = Counter(pids)
    assert len(counts) >= 3, (pids, g.log())  # at least one process was replaced
    assert "Autorestarting worker" in g.log()
    first = g.booted()[:2]
    # The first process to reach the limit had a ready sibling: it retired at once.
    assert min(counts[p] for p in first) in (5, 6), (pids, g.log())
    g.signal(signal.SIGTERM)
    assert g.wait() == 0, g.log()


def test_max_requests_with_one_worker_recycles_the_slot(proxy: Front, start: Callable[..., Gunicorn]) -> None:
    """One process: it is replaced every 3 requests.  Between the old process's exit
    and the new one's tunnel the proxy has no worker, so it may answer 503 (with
    Retry-After); nothing else may fail (documented in docs/gunicorn.md)."""
    g = start("--workers", "1", "--max-requests", "3")
    attached(proxy, g, 1)
    served: list[int] = []
    other: list[tuple[int, str, dict[str, str]]] = []
    deadline = time.monotonic() + 30
    while len(set(served)) < 3 and time.monotonic() < deadline:
        status, body, headers = get(proxy)
        if status == 200:
            served.append(int(body))
        else:
            other.append((status, body, headers))
        time.sleep(0.05)
    assert len(set(served)) >= 3, (served, other, g.log())
    assert all(s == 503 and "retry-after" in h for s, _, h in other), other
    assert max(Counter(served).values()) <= 4, served  # the limit, or one more that raced the GOAWAY
    g.signal(signal.SIGTERM)
    assert g.wait() == 0, g.log()


def test_a_bad_setting_stops_the_master(start: Callable[..., Gunicorn]) -> None:
    # One worker: with several failing at once, gunicorn 27's master itself
    # crashes while halting (exit 1, a HaltServer traceback of its own).
    g = start("--workers", "1", env={"RHTTP_PROXY": None})
    assert g.wait() == 3, g.log()  # gunicorn's "Worker failed to boot"
    log = g.log()
    assert "rhttp worker: invalid setting: proxy: the proxy address (HOST:PORT) is required" in log
    assert "Traceback" not in log


# -- the worker's access log under gunicorn ---------------------------------------------------


@pytest.mark.parametrize(("args", "env"), [
    (("--access-logfile", "-"), {}),           # gunicorn's access log turns ours on and receives it
    ((), {"RHTTP_ACCESS_LOG": "1"}),           # without it: RHTTP_ACCESS_LOG, lines in the error log
], ids=["access-logfile", "RHTTP_ACCESS_LOG"])
def test_the_workers_access_lines_reach_gunicorns_log(proxy: Front, start: Callable[..., Gunicorn],
                                                      args: tuple[str, ...], env: dict[str, str]) -> None:
    import json

    g = start(*args, env={"RHTTP_ACCESS_LOG_FORMAT": "json", **env})
    attached(proxy, g, 1)
    status, body, _ = get(proxy, "/?via=gunicorn")
    assert status == 200

    def line() -> dict[str, object] | None:
        for text in g.log().splitlines():
            if '{"time"' in text:
                doc: dict[str, object] = json.loads(text[text.index('{"time"'):])
                return doc
        return None

    assert wait_until(lambda: line() is not None), g.log()
    doc = line()
    assert doc is not None
    assert (doc["side"], doc["target"], doc["status"], doc["cn"], doc["client"]) == \
        ("worker", "/?via=gunicorn", 200, "gunicorn", "127.0.0.1")
    assert doc["bytes"] == len(body) and doc["request_id"]
    g.signal(signal.SIGTERM)
    assert g.wait() == 0, g.log()
