"""Certificates change without a restart: reload on the worker and the proxy, by API and by SIGHUP.

New handshakes use the new files; tunnels, public connections and requests in
flight keep theirs; a reload that cannot read its files changes nothing.
Every wait is on a condition with a bounded timeout: new handshakes are forced
by draining a tunnel at the proxy (the worker redials at once), not hoped for.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from rhttp_wsgi._signals import wait_for_stop_signal
from rhttp_wsgi.pki import DemoPKI, issue_to_files

from .proxy_fixtures import WAIT, Env, env_fixture, pki_fixture, wait_until  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[2]
SERVER_SANS = ("localhost", "127.0.0.1", "::1")
#: Bounds of the traffic loop: it stops at whichever comes first (or when the test says so).
MAX_REQUESTS = 20000
MAX_SECONDS = 60.0

pytestmark = pytest.mark.timeout(120)


def serial_of(path: Path) -> str:
    return format(x509.load_pem_x509_certificate(path.read_bytes()).serial_number, "x")


def rotate_server_cert(pki: DemoPKI, name: str = "server") -> str:
    """Re-issue the proxy's certificate (same names, same CA) in place; returns the new serial."""
    issued = issue_to_files(pki.ca, pki.directory, name, kind="server", sans=SERVER_SANS, overwrite=True)
    return serial_of(issued.cert_path)


def rotate_worker_cert(pki: DemoPKI, name: str) -> str:
    cert, _ = pki.issue_worker(name)
    return serial_of(cert)


class Gate:
    """Holds ``/slow`` requests in the app until opened."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()


def serial_app(gate: Gate) -> Callable[..., list[bytes]]:
    """Answers with the serial of the proxy certificate its tunnel negotiated (``rhttp.peer_certificate``)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = environ["wsgi.input"].read()
        if environ["PATH_INFO"] == "/slow":
            gate.entered.set()
            gate.open.wait(WAIT * 2)
        serial = format(environ["rhttp.peer_certificate"].serial_number, "x")
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Body-Length", str(len(body)))])
        return [serial.encode()]

    return app


class Traffic:
    """Client threads looping real requests (GET and POST) through the public port.

    Bounded: it stops after ``MAX_REQUESTS`` or ``MAX_SECONDS``, whichever
    comes first, or at :meth:`stop`.  Every answer but a 200 with the expected
    body, and every exception, is a failure.
    """

    def __init__(self, public: tuple[str, int], threads: int = 2) -> None:
        self.public = public
        self.done = 0
        self.failures: list[str] = []
        self.serials: dict[str, int] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + MAX_SECONDS
        self._threads = [threading.Thread(target=self._loop, args=(i,), name=f"traffic-{i}")
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def _loop(self, index: int) -> None:
        conn: http.client.HTTPConnection | None = None
        n = 0
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._cond:
                if self.done + len(self.failures) >= MAX_REQUESTS:
                    break
            n += 1
            post = n % 3 == 0
            body = b"x" * (n % 200) if post else None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(*self.public, timeout=WAIT * 2)
                conn.request("POST" if post else "GET", f"/t{index}/{n}", body=body)
                r = conn.getresponse()
                data = r.read().decode()
                ok = r.status == 200 and (not post or r.getheader("X-Body-Length") == str(len(body or b"")))
                failure = None if ok else f"{r.status} {data[:200]!r}"
                if r.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                failure, data = f"{type(e).__name__}: {e}", ""
                if conn is not None:
                    conn.close()
                conn = None
            with self._cond:
                if failure is None:
                    self.done += 1
                    self.serials[data] = self.serials.get(data, 0) + 1
                else:
                    self.failures.append(failure)
                self._cond.notify_all()
        if conn is not None:
            conn.close()

    def wait(self, pred: Callable[[Traffic], bool], timeout: float = WAIT * 2) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: pred(self) or bool(self.failures), timeout)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(WAIT * 3)


@pytest.fixture()
def traffic_factory() -> Iterator[Callable[[tuple[str, int]], Traffic]]:
    started: list[Traffic] = []

    def start(public: tuple[str, int]) -> Traffic:
        t = Traffic(public)
        started.append(t)
        return t

    yield start
    for t in started:
        t.stop()


def attached_serials(env: Env, *, accepting_only: bool = True) -> list[str]:
    return [format(w.certificate.serial_number, "x") for w in env.proxy.workers()
            if not (accepting_only and w.draining)]


def test_rotation_under_traffic_no_request_fails_and_new_tunnels_show_the_new_certificates(
        env: Env, traffic_factory: Callable[[tuple[str, int]], Traffic], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rhttp_wsgi.tls")
    gate = Gate()
    env.start_proxy()
    pool = env.start_worker(serial_app(gate), "alpha", connections=2)
    old_worker = serial_of(env.pki.workers["alpha"][0])
    old_proxy = serial_of(env.pki.server_cert)
    old = env.proxy.workers()
    assert attached_serials(env) == [old_worker, old_worker]

    traffic = traffic_factory(env.public)
    assert traffic.wait(lambda t: t.done >= 200), traffic.failures
    # A request in flight across the whole rotation: it must finish on the tunnel it started on.
    slow: dict[str, Any] = {}

    def slow_request() -> None:
        c = http.client.HTTPConnection(*env.public, timeout=WAIT * 3)
        c.request("GET", "/slow")
        r = c.getresponse()
        slow.update(status=r.status, body=r.read().decode())
        c.close()

    slow_thread = threading.Thread(target=slow_request)
    slow_thread.start()
    assert gate.entered.wait(WAIT)

    new_worker = rotate_worker_cert(env.pki, "alpha")
    new_proxy = rotate_server_cert(env.pki)
    assert pool.reload_certificates() is True
    assert env.proxy.reload_certificates() is True
    assert "reloaded the worker certificates" in caplog.text and new_worker in caplog.text
    assert "reloaded the proxy certificates" in caplog.text and new_proxy in caplog.text
    # The tunnels already up are untouched by the reload.
    assert [w.id for w in env.proxy.workers()] == [w.id for w in old]
    assert attached_serials(env) == [old_worker, old_worker]
    before_rotation = traffic.done

    # Force new handshakes, one tunnel at a time: the proxy drains it, the worker redials at once.
    for i, w in enumerate(old, start=1):
        w.tunnel.drain()
        assert wait_until(lambda i=i: attached_serials(env).count(new_worker) >= i, WAIT * 2), \
            env.proxy.workers()
    gate.open.set()
    slow_thread.join(WAIT * 2)
    assert slow == {"status": 200, "body": old_proxy}, "the request in flight finished on its old tunnel"
    assert wait_until(lambda: attached_serials(env, accepting_only=False) == [new_worker, new_worker], WAIT * 2)
    # The worker's new tunnels verified the proxy's new certificate (the app reports what its tunnel saw).
    assert traffic.wait(lambda t: t.serials.get(new_proxy, 0) >= 200 and t.done >= before_rotation + 400)
    traffic.stop()
    print(f"rotation under traffic: {traffic.done} requests, {len(traffic.failures)} failed,"
          f" proxy serials seen {traffic.serials}")
    assert traffic.failures == []
    assert traffic.serials.get(old_proxy, 0) >= 200 and traffic.serials.get(new_proxy, 0) >= 200


def test_public_https_certificate_reloads_for_new_connections_only(env: Env) -> None:
    issued = issue_to_files(env.pki.ca, env.pki.directory, "public", kind="server", sans=("127.0.0.1",),
                            overwrite=True)
    env.start_proxy(public_cert=str(issued.cert_path), public_key=str(issued.key_path))
    env.start_worker(serial_app(Gate()))
    ctx = ssl.create_default_context(cafile=str(env.pki.ca_cert))

    def connect() -> http.client.HTTPSConnection:
        c = http.client.HTTPSConnection(*env.public, context=ctx, timeout=WAIT)
        c.connect()
        return c

    def served_serial(c: http.client.HTTPSConnection) -> str:
        der = c.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        c.request("GET", "/")
        r = c.getresponse()
        r.read()
        assert r.status == 200
        return format(x509.load_der_x509_certificate(der).serial_number, "x")

    old_conn = connect()
    old = served_serial(old_conn)
    new = rotate_server_cert(env.pki, "public")
    assert env.proxy.reload_certificates() is True
    new_conn = connect()
    assert new != old and served_serial(new_conn) == new
    assert served_serial(old_conn) == old  # the keep-alive connection from before goes on as it was
    old_conn.close()
    new_conn.close()


def test_a_reloaded_workers_ca_bundle_admits_the_workers_of_a_new_ca(env: Env, tmp_path: Path) -> None:
    from rhttp_wsgi.pki import CertificateAuthority

    bundle = tmp_path / "workers-ca.pem"
    bundle.write_bytes(env.pki.ca_cert.read_bytes())
    env.start_proxy(workers_ca=str(bundle))
    env.start_worker(serial_app(Gate()), "alpha")
    new_ca = CertificateAuthority.create("next workers CA")
    cert_pem, key_pem = new_ca.issue_client("gamma")
    (tmp_path / "gamma.crt").write_bytes(cert_pem)
    (tmp_path / "gamma.key").write_bytes(key_pem)
    env.pki.workers["gamma"] = (tmp_path / "gamma.crt", tmp_path / "gamma.key")

    def admitted() -> bool:
        """A fresh handshake as gamma: refused (an alert on the first read) or admitted (the proxy's SETTINGS).

        It never sends a preface of its own, so it never attaches as a worker.
        """
        ctx = ssl.create_default_context(cafile=str(env.pki.ca_cert))
        ctx.load_cert_chain(*map(str, env.pki.workers["gamma"]))
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", env.tunnel_port), timeout=WAIT) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            try:
                head = tls.recv(9)
                return len(head) == 9 and head[3] == 0x4  # the proxy's SETTINGS frame
            except ssl.SSLError as e:
                assert "unknown ca" in str(e).lower(), e
                return False

    assert not admitted()
    bundle.write_bytes(env.pki.ca_cert.read_bytes() + new_ca.cert_pem)  # the rollover bundle: old + new
    assert env.proxy.reload_certificates() is True
    assert admitted()
    env.start_worker(serial_app(Gate()), "gamma")
    assert sorted(w.common_name or "" for w in env.proxy.workers()) == ["alpha", "gamma"]


def test_a_failed_reload_keeps_the_old_contexts_and_names_the_file(env: Env, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    env.start_proxy()
    pool = env.start_worker(serial_app(Gate()), "alpha")
    old_worker = serial_of(env.pki.workers["alpha"][0])
    old_proxy = serial_of(env.pki.server_cert)
    # The proxy's key replaced by another certificate's key: it does not match server.crt.
    good_key = env.pki.server_key.read_bytes()
    env.pki.server_key.write_bytes(env.pki.workers["beta"][1].read_bytes())
    # The worker's certificate file gone.
    worker_cert = env.pki.workers["alpha"][0]
    worker_cert.rename(tmp_path / "moved.crt")
    with caplog.at_level(logging.ERROR, logger="rhttp_wsgi.tls"):
        assert env.proxy.reload_certificates() is False
        assert pool.reload_certificates() is False
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, errors
    assert str(env.pki.server_key) in errors[0] and "previous proxy certificates" in errors[0]
    assert str(worker_cert) in errors[1] and "previous worker certificates" in errors[1]
    # Still serving, and new handshakes (a drained tunnel redials) still work, with the old certificates.
    assert env.request("GET", "/")[0] == 200
    (w,) = env.proxy.workers()
    w.tunnel.drain()
    assert wait_until(lambda: [x.id for x in env.proxy.workers() if not x.draining] not in ([], [w.id]), WAIT * 2)
    assert attached_serials(env) == [old_worker]
    status, _, body, _ = env.request("GET", "/")
    assert (status, body.decode()) == (200, old_proxy)
    # Files fixed: the next reload succeeds.
    env.pki.server_key.write_bytes(good_key)
    (tmp_path / "moved.crt").rename(worker_cert)
    assert env.proxy.reload_certificates() is True and pool.reload_certificates() is True


def test_a_reload_applies_the_startup_checks_an_expired_certificate_is_refused(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    import datetime as dt

    env.start_proxy()
    pool = env.start_worker(serial_app(Gate()), "alpha")
    now = dt.datetime.now(dt.timezone.utc)
    cert, _ = env.pki.issue_worker("alpha", not_before=now - dt.timedelta(days=30),
                                   not_after=now - dt.timedelta(days=1))
    with caplog.at_level(logging.ERROR, logger="rhttp_wsgi.tls"):
        assert pool.reload_certificates() is False
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert str(cert) in error and "expired" in error
    assert env.request("GET", "/")[0] == 200


def _send_sighup_once_installed(before: object) -> threading.Thread:
    def run() -> None:
        deadline = time.monotonic() + 10
        while signal.getsignal(signal.SIGHUP) is before and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGHUP)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sighup_during_the_stop_wait_reloads_and_the_wait_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    before = signal.getsignal(signal.SIGHUP)
    reloaded = threading.Event()
    stop = threading.Event()

    def reload() -> bool:
        reloaded.set()
        threading.Timer(0.01, stop.set).start()  # then let the wait end
        raise RuntimeError("a reload bug must not end the wait")

    sender = _send_sighup_once_installed(before)
    with caplog.at_level(logging.INFO, logger="rhttp_wsgi.signals"):
        assert wait_for_stop_signal(stop, timeout=10, reload=reload) is True
    sender.join(5)
    assert reloaded.is_set()
    assert signal.getsignal(signal.SIGHUP) is before
    assert "received SIGHUP; reloading the certificates" in caplog.text
    assert "reloading on SIGHUP failed; still serving" in caplog.text


# -- the CLI, as a user runs it ----------------------------------------------------------------


class LogTail:
    """Collects a subprocess's stderr lines (a thread that ends with the process)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="log-tail")
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 20, start: int = 0) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def seen() -> bool:
            for line in self.lines[start:]:
                m = re.search(pattern, line)
                if m:
                    found.append(m)
                    return True
            return False

        with self._cond:
            if not self._cond.wait_for(seen, timeout):
                raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(self.lines))
        return found[0]

    def text(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._thread.join(10)


def _start(*args: str) -> LogTail:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "rhttp_wsgi", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return LogTail(proc)


def _terminate(tail: LogTail) -> int:
    tail.proc.send_signal(signal.SIGTERM)
    rc = tail.proc.wait(20)
    tail.stop()
    return rc


def test_worker_cli_reloads_its_certificate_on_sighup(env: Env) -> None:
    env.start_proxy()
    cert, key = env.pki.workers["alpha"]
    old = serial_of(cert)
    tail = _start("worker", "tests.apps.hello:app", "--proxy", f"127.0.0.1:{env.tunnel_port}", "--cert",
                  str(cert), "--key", str(key), "--ca", str(env.pki.ca_cert), "--connections", "2")
    try:
        assert env.proxy.wait_for_workers(2, 20), tail.text()
        tail.wait_for(r"tunnel-1: connected")
        assert attached_serials(env) == [old, old]
        new = rotate_worker_cert(env.pki, "alpha")
        tail.proc.send_signal(signal.SIGHUP)
        tail.wait_for(r"reloaded the worker certificates: .*serial " + new)
        assert env.request("GET", "/")[0] == 200
        for w in env.proxy.workers():
            w.tunnel.drain()
        assert wait_until(lambda: attached_serials(env) == [new, new], 20), env.proxy.workers()
        assert env.request("GET", "/")[:3:2] == (200, b"hello from cli")
        assert _terminate(tail) == 0, tail.text()
    finally:
        tail.stop()
    assert "received SIGHUP; reloading the certificates" in tail.text()


def _handshake_serial(port: int, pki: DemoPKI, worker: str = "alpha") -> str:
    """A fresh TLS handshake with the tunnel port, as a worker would (client certificate, ALPN h2)."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(*map(str, pki.workers[worker]))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def test_proxy_cli_reloads_on_sighup_and_a_failed_reload_keeps_serving(pki: DemoPKI, tmp_path: Path) -> None:
    from rhttp_wsgi.worker import WorkerPool

    tail = _start("proxy", "--tunnel-bind", "127.0.0.1:0", "--public-bind", "127.0.0.1:0", "--admin-bind",
                  "127.0.0.1:0", "--cert", str(pki.server_cert), "--key", str(pki.server_key),
                  "--workers-ca", str(pki.ca_cert))
    pool: WorkerPool | None = None
    try:
        m = tail.wait_for(r"tunnels on (\S+):(\d+), public HTTP on (\S+):(\d+)")
        tport, public = int(m.group(2)), f"http://{m.group(3)}:{m.group(4)}"
        admin = "http://" + tail.wait_for(r"admin endpoints on http://(\S+)/status").group(1)
        cert, key = pki.workers["alpha"]
        pool = WorkerPool(serial_app(Gate()), proxy=f"127.0.0.1:{tport}", cert=str(cert), key=str(key),
                          ca=str(pki.ca_cert))
        pool.start()
        old = serial_of(pki.server_cert)

        def get(url: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url, timeout=WAIT) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        # attached: the proxy's own readiness endpoint says so
        assert wait_until(lambda: get(admin + "/healthz")[0] == 200, 20), tail.text()
        assert get(public + "/") == (200, old)
        new = rotate_server_cert(pki)
        mark = len(tail.lines)
        tail.proc.send_signal(signal.SIGHUP)
        tail.wait_for(r"reloaded the proxy certificates: .*serial " + new, start=mark)
        assert _handshake_serial(tport, pki) == new  # a new tunnel handshake presents the new certificate
        assert get(public + "/") == (200, old)  # the tunnel from before goes on as it was

        # A broken key: the reload fails, one ERROR line names the file, the old context stays.
        pki.server_key.write_text("not a key\n")
        mark = len(tail.lines)
        tail.proc.send_signal(signal.SIGHUP)
        line = tail.wait_for(r"ERROR.*certificate reload failed.*", start=mark).group(0)
        assert str(pki.server_key) in line
        assert _handshake_serial(tport, pki) == new
        assert get(public + "/") == (200, old)
        status, text = get(admin + "/healthz")
        assert (status, text) == (200, "ready: 1 tunnel attached\n")
        assert tail.proc.poll() is None
        errors = [x for x in tail.lines[mark:] if " ERROR " in x]
        assert len(errors) == 1, errors
        pool.shutdown(5)
        pool = None
        assert _terminate(tail) == 0, tail.text()
    finally:
        if pool is not None:
            pool.shutdown(5)
        tail.stop()
