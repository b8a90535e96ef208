"""Errors that name the fix, met the way a user meets them: the ``rhttp-wsgi`` commands as subprocesses.

Each failure a user can cause is one log line (or one ``error:`` line and exit
status 2) that names the flag, the file or address, and what to do.  The
certificates are minted with :mod:`rhttp_wsgi.pki` (what ``rhttp-wsgi certs`` runs).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from rhttp_wsgi.cli import EXIT_CONFIG, EXIT_NEVER_CONNECTED
from rhttp_wsgi.pki import DemoPKI, generate_certs, write_pem_atomic

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
NOW = dt.datetime.now(dt.timezone.utc)
FAST_RETRY = ("--reconnect-min", "0.05", "--reconnect-max", "0.2")


class Command:
    """``python -m rhttp_wsgi ARGS`` running in the background; its stderr collected line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "rhttp_wsgi", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.signalled = False
        self._cond = threading.Condition()
        self._pump = threading.Thread(target=self._read, name="test-stderr-pump", daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def mark(self) -> int:
        """Where the next line will be: ``wait_for(..., after=mark)`` looks only at lines from then on."""
        with self._cond:
            return len(self.lines)

    def wait_for(self, pattern: str, timeout: float = 20, after: int = 0) -> re.Match[str]:
        """The match in the first stderr line matching ``pattern`` (waits for it; ``.string``: the line)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[after:]:
                    m = re.search(pattern, line)
                    if m:
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._pump.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines))
                self._cond.wait(min(remaining, 0.1))

    def send(self, sig: int = signal.SIGTERM) -> None:
        self.signalled = True
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """SIGTERM (unless already signalled: a second one would kill it mid-drain); its exit status."""
        if self.proc.poll() is None and not self.signalled:
            self.send(sig)
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self._pump.join(5)
            assert self.proc.stdout is not None
            self.proc.stdout.close()
        return self.proc.returncode


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rhttp_wsgi", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env=env)


def error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The one line a configuration error prints (exit status 2): the last, after any INFO of what had started."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == EXIT_CONFIG, r
    assert "Traceback" not in r.stderr, r.stderr
    assert [x for x in lines if " error: " in x] == lines[-1:], r.stderr
    assert all(re.match(r"\S+ \S+ INFO ", x) for x in lines[:-1]), r.stderr
    return lines[-1]


def env_with(*paths: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, paths), str(ROOT)]))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return DemoPKI.create(tmp_path_factory.mktemp("pki"), worker_names=("worker",))


@pytest.fixture(scope="module")
def proxy(pki: DemoPKI) -> Iterator[tuple[Command, int, str]]:
    """One ``rhttp-wsgi proxy`` for the module: (command, tunnel port, public URL)."""
    p = Command("proxy", "--tunnel-bind", "127.0.0.1:0", "--public-bind", "127.0.0.1:0", "--cert",
                str(pki.server_cert), "--key", str(pki.server_key), "--workers-ca", str(pki.ca_cert))
    try:
        m = p.wait_for(r"tunnels on (\S+):(\d+), public HTTP on (\S+):(\d+)")
        yield p, int(m.group(2)), f"http://{m.group(3)}:{m.group(4)}"
    finally:
        assert p.stop() == 0, p.text


def worker(pki: DemoPKI, port: int, *flags: str, app: str = "tests.apps.hello:app",
           env: dict[str, str] | None = None, cert: Path | None = None, key: Path | None = None) -> Command:
    wcert, wkey = pki.workers["worker"]
    return Command("worker", app, "--proxy", f"localhost:{port}", "--cert", str(cert or wcert), "--key",
                   str(key or wkey), *flags, env=env)


# -- TLS failures name both certificates and the flag that fixes them ---------------------------------


def test_worker_certificate_from_another_ca_is_named_on_both_sides(pki: DemoPKI, proxy: tuple[Command, int, str],
                                                                   tmp_path: Path) -> None:
    p, port, _ = proxy
    generate_certs(tmp_path, ca_common_name="intruder CA", workers=["intruder"])
    w = worker(pki, port, "--ca", str(pki.ca_cert), *FAST_RETRY, cert=tmp_path / "intruder.crt",
               key=tmp_path / "intruder.key")
    try:
        line = w.wait_for(r"ERROR .*tunnel-0: ").string
        assert "the proxy rejected our client certificate (subject CN=intruder, issuer CN=intruder CA;" in line
        assert f"--cert {tmp_path / 'intruder.crt'}" in line and "unknown_ca" in line
        assert "--workers-ca" in line and "retry in" in line, line
        proxy_line = p.wait_for(r"ERROR .*tunnel from .* rejected: .*CN=intruder").string
        assert "the worker's certificate (subject CN=intruder, issuer CN=intruder CA) is not signed by" \
               f" --workers-ca {pki.ca_cert}" in proxy_line, proxy_line
    finally:
        status = w.stop()
    assert status == EXIT_NEVER_CONNECTED, w.text
    assert "stopped before any tunnel connected to localhost" in w.text
    assert " ready: " not in w.text


def test_ca_that_does_not_verify_the_proxy_names_the_proxy_certificate_and_the_flag(
        pki: DemoPKI, proxy: tuple[Command, int, str], tmp_path: Path) -> None:
    _, port, _ = proxy
    other = DemoPKI.create(tmp_path / "other", worker_names=())
    w = worker(pki, port, "--ca", str(other.ca_cert), *FAST_RETRY)
    try:
        line = w.wait_for(r"ERROR .*tunnel-0: cannot connect to ").string
    finally:
        assert w.stop() == EXIT_NEVER_CONNECTED, w.text
    assert "the proxy's certificate (subject CN=server, issuer CN=rhttp-wsgi demo CA) is not signed by" \
           f" --ca {other.ca_cert}" in line, line
    assert "retry in" in line and "certificate verify failed" in line


def test_name_mismatch_shows_the_name_checked_the_names_present_and_server_name(
        pki: DemoPKI, proxy: tuple[Command, int, str]) -> None:
    _, port, _ = proxy
    w = worker(pki, port, "--ca", str(pki.ca_cert), "--server-name", "proxy.elsewhere.example", *FAST_RETRY)
    try:
        line = w.wait_for(r"ERROR .*tunnel-0: cannot connect to ").string
    finally:
        assert w.stop() == EXIT_NEVER_CONNECTED, w.text
    assert "hostname mismatch" in line and "'proxy.elsewhere.example'" in line, line
    assert "names DNS:localhost, IP:127.0.0.1, IP:::1" in line and "--server-name" in line, line


def test_worker_logs_ready_once_when_its_first_tunnel_is_up_and_exits_0(
        pki: DemoPKI, proxy: tuple[Command, int, str]) -> None:
    p, port, url = proxy
    mark = p.mark()
    w = worker(pki, port, "--ca", str(pki.ca_cert), "--connections", "2")
    try:
        w.wait_for(r"INFO .* ready: serving through the proxy at localhost:\d+")
        p.wait_for(r"worker w\d+ attached: CN=worker", after=mark)
        with urllib.request.urlopen(url + "/", timeout=10) as r:
            assert r.read() == b"hello from cli"
    finally:
        status = w.stop()
    assert status == 0, w.text
    assert w.text.count(" ready: ") == 1
    # the startup line no longer claims to serve before anything is connected
    start = w.text.index("starting tests.apps.hello:app")
    assert start < w.text.index(" ready: ")


def test_worker_stopped_before_it_ever_connected_exits_3(pki: DemoPKI) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    w = worker(pki, port, "--ca", str(pki.ca_cert), *FAST_RETRY)
    try:
        w.wait_for(r"WARNING .*tunnel-0: cannot connect to localhost:\d+: .*retry in")
    finally:
        status = w.stop()
    assert status == EXIT_NEVER_CONNECTED == 3, w.text
    assert re.search(r"ERROR .*stopped before any tunnel connected to localhost:\d+; last error: .*refused", w.text)


# -- our own certificates, checked at startup ----------------------------------------------------------


def _server_pair(pki: DemoPKI, name: str, **validity: dt.datetime) -> tuple[Path, Path]:
    cert_pem, key_pem = pki.ca.issue_server("localhost", sans=["localhost", "127.0.0.1"], **validity)
    cert, key = pki.directory / f"{name}.crt", pki.directory / f"{name}.key"
    write_pem_atomic(cert, cert_pem, 0o644)
    write_pem_atomic(key, key_pem, 0o600)
    return cert, key


def _proxy_args(cert: Path, key: Path, ca: Path) -> list[str]:
    return ["proxy", "--tunnel-bind", "127.0.0.1:0", "--public-bind", "127.0.0.1:0", "--cert", str(cert),
            "--key", str(key), "--workers-ca", str(ca)]


def test_client_certificate_as_the_proxy_certificate_is_refused_at_startup(pki: DemoPKI) -> None:
    cert, key = pki.workers["worker"]
    line = error_line(run(*_proxy_args(cert, key, pki.ca_cert)))
    assert line.startswith(f"rhttp-wsgi proxy: error: --cert: {cert} (subject CN=worker"), line
    assert "extended key usage is clientAuth" in line and "rhttp-wsgi certs --server" in line


def test_server_certificate_as_the_worker_certificate_is_refused_at_startup(pki: DemoPKI) -> None:
    line = error_line(run("worker", "tests.apps.hello:app", "--proxy", "localhost:1", "--cert",
                          str(pki.server_cert), "--key", str(pki.server_key)))
    assert line.startswith(f"rhttp-wsgi worker: error: --cert: {pki.server_cert} (subject CN=server"), line
    assert "extended key usage is serverAuth" in line and "clientAuth" in line


@pytest.mark.parametrize(("validity", "needle"), [
    ({"not_after": NOW - dt.timedelta(days=1)}, "expired on"),
    ({"not_before": NOW + dt.timedelta(days=1)}, "is not valid before"),
], ids=["expired", "not-yet-valid"])
def test_certificate_out_of_its_validity_is_refused_at_startup(pki: DemoPKI, validity: dict[str, dt.datetime],
                                                               needle: str) -> None:
    name = "stale-" + next(iter(validity))
    cert, key = pki.issue_worker(name, **validity)
    line = error_line(run("worker", "tests.apps.hello:app", "--proxy", "localhost:1", "--cert", str(cert),
                          "--key", str(key)))
    assert line.startswith(f"rhttp-wsgi worker: error: --cert: {cert}") and needle in line, line
    scert, skey = _server_pair(pki, "proxy-" + name, **validity)
    line = error_line(run(*_proxy_args(scert, skey, pki.ca_cert)))
    assert line.startswith(f"rhttp-wsgi proxy: error: --cert: {scert}") and needle in line, line


def test_key_of_another_certificate_is_refused_at_startup(pki: DemoPKI) -> None:
    cert, _ = pki.workers["worker"]
    line = error_line(run("worker", "tests.apps.hello:app", "--proxy", "localhost:1", "--cert", str(cert),
                          "--key", str(pki.server_key)))
    assert line.startswith(f"rhttp-wsgi worker: error: --key: {pki.server_key} is not the key of {cert}"), line


def test_certificate_expiring_within_14_days_is_a_warning(pki: DemoPKI) -> None:
    cert, key = _server_pair(pki, "proxy-soon", not_after=NOW + dt.timedelta(days=5))
    p = Command(*_proxy_args(cert, key, pki.ca_cert))
    try:
        line = p.wait_for(r"WARNING .*expires on").string
        p.wait_for(r"proxy: tunnels on")  # (the stop-signal handler is installed before that line)
    finally:
        assert p.stop() == 0, p.text
    assert f"--cert {cert} (subject CN=localhost" in line and "in 5 days" in line, line


# -- addresses in use ---------------------------------------------------------------------------------


@pytest.fixture()
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("flag", ["--tunnel-bind", "--public-bind", "--metrics-bind"])
def test_proxy_address_in_use_names_the_flag_and_the_address(pki: DemoPKI, busy_port: int, flag: str) -> None:
    if flag == "--metrics-bind":
        pytest.importorskip("prometheus_client")
    line = error_line(run(*_proxy_args(pki.server_cert, pki.server_key, pki.ca_cert), flag, f"127.0.0.1:{busy_port}"))
    assert line.startswith(f"rhttp-wsgi proxy: error: {flag}: 127.0.0.1:{busy_port} is already in use"), line


def test_demo_port_in_use_suggests_port_0(busy_port: int) -> None:
    line = error_line(run("demo", "--port", str(busy_port)))
    assert line.startswith(f"rhttp-wsgi demo: error: --port: 127.0.0.1:{busy_port} is already in use"), line
    assert "--port 0" in line


# -- the app and the extras ---------------------------------------------------------------------------


APPS = {
    "needs_dependency": "import a_dependency_that_is_not_installed\n",
    "syntax_error": "def app(environ, start_response:\n    return []\n",
    "raises_at_import": "raise RuntimeError('DATABASE_URL is not set')\n",
    "names_it_app": "def app(environ, start_response):\n    return []\n",
    "defines_other": "import os\n\ndef serve(environ, start_response):\n    return []\n",
    "bad_factory": "def create_app(name):\n    raise ValueError('unknown config ' + name)\n",
}


@pytest.mark.parametrize(("spec", "needle"), [
    ("not_a_module_here", "no module named 'not_a_module_here': run from the directory that holds it"),
    ("needs_dependency", "importing 'needs_dependency' failed: No module named 'a_dependency_that_is_not_installed'"),
    ("syntax_error", "importing 'syntax_error' failed: syntax error in "),
    ("raises_at_import", "importing 'raises_at_import' raised RuntimeError: DATABASE_URL is not set"),
    ("names_it_app", "module 'names_it_app' has no attribute 'application'"),
    ("defines_other:app", "module 'defines_other' has no attribute 'app'; callables it defines: 'defines_other:serve'"),
    ("bad_factory:create_app('x')", "calling bad_factory:create_app('x') raised ValueError: unknown config x"),
])
def test_app_that_cannot_be_loaded_is_one_line_and_exit_2(pki: DemoPKI, tmp_path: Path, spec: str,
                                                           needle: str) -> None:
    for name, source in APPS.items():
        (tmp_path / f"{name}.py").write_text(source)
    cert, key = pki.workers["worker"]
    r = run("worker", spec, "--proxy", "localhost:1", "--cert", str(cert), "--key", str(key), env=env_with(tmp_path))
    line = error_line(r)
    assert line.startswith("rhttp-wsgi worker: error: app: ") and needle in line, line
    if spec == "names_it_app":
        assert line.endswith("did you mean 'names_it_app:app'?"), line


def test_app_import_traceback_is_logged_at_debug(pki: DemoPKI, tmp_path: Path) -> None:
    (tmp_path / "raises_at_import.py").write_text(APPS["raises_at_import"])
    cert, key = pki.workers["worker"]
    r = run("worker", "raises_at_import", "--proxy", "localhost:1", "--cert", str(cert), "--key", str(key),
            "--log-level", "debug", env=env_with(tmp_path))
    assert r.returncode == EXIT_CONFIG
    assert "Traceback (most recent call last)" in r.stderr and "raises_at_import.py\", line 1" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("rhttp-wsgi worker: error: app: importing")


@pytest.mark.parametrize("command", ["worker", "proxy"])
def test_metrics_without_prometheus_client_names_the_extra(pki: DemoPKI, tmp_path: Path, command: str) -> None:
    (tmp_path / "prometheus_client.py").write_text("raise ImportError('not installed (test stub)')\n")
    cert, key = pki.workers["worker"]
    if command == "worker":
        args = ["worker", "tests.apps.hello:app", "--proxy", "localhost:1", "--cert", str(cert), "--key", str(key)]
    else:
        args = _proxy_args(pki.server_cert, pki.server_key, pki.ca_cert)
    line = error_line(run(*args, "--metrics-bind", "127.0.0.1:0", env=env_with(tmp_path)))
    assert line == (f"rhttp-wsgi {command}: error: --metrics-bind: needs prometheus_client, which is not"
                    " installed: pip install 'rhttp-wsgi[prometheus]'"), line


# -- certs, --log-level, --help -----------------------------------------------------------------------


def test_certs_warns_when_a_reused_certificate_has_other_names_and_prints_its_summary_once(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    first = run("certs", "--dir", str(d), "--server", "proxy.example", "--san", "proxy.example", "--san", "10.0.0.5")
    assert first.returncode == 0, first.stderr
    r = run("certs", "--dir", str(d), "--server", "proxy.example", "--san", "proxy.example", "--san", "127.0.0.1")
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).count("Certificates in") == 1
    warning = next(x for x in r.stderr.splitlines() if "WARNING" in x)
    assert f"reusing {d / 'proxy.example.crt'}, which names CN:proxy.example, DNS:proxy.example, IP:10.0.0.5," \
           " not the requested CN:proxy.example, DNS:proxy.example, IP:127.0.0.1: pass --overwrite" in warning
    again = run("certs", "--dir", str(d), "--server", "proxy.example", "--san", "proxy.example", "--san", "10.0.0.5")
    assert "WARNING" not in again.stderr  # the same names: nothing to say


def test_log_level_is_accepted_after_the_command(tmp_path: Path) -> None:
    quiet = run("certs", "--dir", str(tmp_path / "a"), "--log-level", "warning", "w1")
    assert quiet.returncode == 0 and "INFO" not in quiet.stderr, quiet.stderr
    before = run("--log-level", "warning", "certs", "--dir", str(tmp_path / "b"), "w1")
    assert before.returncode == 0 and "INFO" not in before.stderr, before.stderr
    chatty = run("--log-level", "warning", "certs", "--dir", str(tmp_path / "c"), "--log-level", "info", "w1")
    assert "INFO" in chatty.stderr  # the later one wins


def test_worker_help_lists_the_essentials_first_and_marks_proxy_required() -> None:
    r = run("worker", "--help")
    assert r.returncode == 0
    assert r.stdout.startswith("usage: rhttp-wsgi worker MODULE:APP --proxy HOST:PORT --cert FILE --key FILE")
    out = r.stdout[r.stdout.index("essential options:"):]
    order = [out.index(s) for s in ("--proxy HOST:PORT", "--cert FILE", "--key FILE", "--ca FILE", "--server-name",
                                    "--connections", "--threads", "other options:", "--max-concurrent-streams",
                                    "general options:", "--log-level")]
    assert order == sorted(order), out
    proxy_help = out[out.index("--proxy HOST:PORT"):out.index("--cert FILE")]
    assert "[required; env RHTTP_PROXY]" in " ".join(proxy_help.split())


# -- log lines ----------------------------------------------------------------------------------------


LOG_APP = '''
import os
import time


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/slow" and "PID_FILE" in os.environ:
        with open(os.environ["PID_FILE"], "w") as f:
            f.write(str(os.getpid()))
    if path == "/boom":
        raise KeyError("settings")
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return stream()
    if path == "/slow":
        time.sleep(3)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def stream():
    yield b"first\\n"
    time.sleep(5)
    yield b"late\\n"
'''


def attached_log_worker(pki: DemoPKI, proxy: tuple[Command, int, str], tmp_path: Path, **env: str) -> Command:
    """A worker serving LOG_APP, ready and attached to ``proxy`` (stopped again if it never gets there)."""
    p, port, _ = proxy
    (tmp_path / "log_app.py").write_text(LOG_APP)
    mark = p.mark()
    w = worker(pki, port, "--ca", str(pki.ca_cert), app="log_app:app", env=dict(env_with(tmp_path), **env))
    try:
        w.wait_for(" ready: ")
        p.wait_for(r"worker w\d+ attached: CN=worker", after=mark)
    except BaseException:
        w.stop()
        raise
    return w


def test_app_error_names_method_path_and_tunnel(pki: DemoPKI, proxy: tuple[Command, int, str],
                                                tmp_path: Path) -> None:
    url = proxy[2]
    w = attached_log_worker(pki, proxy, tmp_path)
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/boom?x=1", timeout=10)
        assert e.value.code == 500
        line = w.wait_for(r"ERROR .*application error").string
    finally:
        assert w.stop() == 0, w.text
    assert re.search(r"tunnel-0 stream \d+: GET /boom\?x=1: application error before the response headers;"
                     r" answering 500", line), line


def test_client_leaving_mid_response_is_info_in_plain_words(pki: DemoPKI, proxy: tuple[Command, int, str],
                                                            tmp_path: Path) -> None:
    p, _, url = proxy
    w = attached_log_worker(pki, proxy, tmp_path)
    mark = p.mark()
    try:
        host, _, public_port = url.removeprefix("http://").rpartition(":")
        with socket.create_connection((host, int(public_port)), timeout=10) as c:
            c.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"first" in c.recv(4096)
        line = p.wait_for(r"left during the response to GET /stream", after=mark).string
    finally:
        assert w.stop() == 0, w.text
    assert " INFO " in line and re.search(r"client 127\.0\.0\.1:\d+ left during the response", line), line
    assert "_ClientGone" not in p.text and not re.search(r"WARNING .*GET /stream", p.text), p.text


def test_draining_worker_is_not_reported_as_no_worker_attached(pki: DemoPKI, proxy: tuple[Command, int, str],
                                                               tmp_path: Path) -> None:
    url = proxy[2]
    pid_file = tmp_path / "serving.pid"
    w = attached_log_worker(pki, proxy, tmp_path, PID_FILE=str(pid_file))
    slow: list[int] = []
    try:
        def get_slow() -> None:
            try:
                slow.append(urllib.request.urlopen(url + "/slow", timeout=20).status)
            except urllib.error.HTTPError as e:
                slow.append(e.code)

        t = threading.Thread(target=get_slow)
        t.start()
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text():  # the app wrote it: /slow is in flight
            assert time.monotonic() < deadline, "the slow request never reached the app"
            time.sleep(0.02)
        w.send(signal.SIGTERM)  # GOAWAY: the worker drains (3 s)
        w.wait_for("received SIGTERM")
        deadline = time.monotonic() + 5
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=10)
            except urllib.error.HTTPError as e:
                assert e.code == 503
                body = e.read().decode()
                break
            assert time.monotonic() < deadline, "the draining worker kept taking requests"
            time.sleep(0.05)
        t.join(20)
    finally:
        assert w.stop() == 0, w.text
    assert slow == [200]
    assert "every attached worker is draining (1)" in body, body
    assert "no worker is attached" not in body


def test_dying_worker_is_not_reported_as_having_refused_the_request(
        pki: DemoPKI, proxy: tuple[Command, int, str], tmp_path: Path) -> None:
    p, port, url = proxy
    (tmp_path / "log_app.py").write_text(LOG_APP)
    env = dict(env_with(tmp_path), PID_FILE=str(tmp_path / "serving.pid"))
    mark = p.mark()
    workers = [worker(pki, port, "--ca", str(pki.ca_cert), app="log_app:app", env=env) for _ in range(2)]
    result: list[int] = []
    try:
        for w in workers:
            w.wait_for(" ready: ")
        first = p.wait_for(r"worker (w\d+) attached: CN=worker", after=mark).group(1)
        p.wait_for(rf"worker (?!{first} )w\d+ attached: CN=worker", after=mark)
        t = threading.Thread(target=lambda: result.append(urllib.request.urlopen(url + "/slow", timeout=20).status))
        t.start()
        deadline = time.monotonic() + 10
        while not (tmp_path / "serving.pid").exists() or not (tmp_path / "serving.pid").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        dying = next(w for w in workers if w.proc.pid == int((tmp_path / "serving.pid").read_text()))
        dying.send(signal.SIGKILL)  # its tunnel dies with the request unanswered
        line = p.wait_for(r"retrying on another worker", after=mark).string
        t.join(20)
    finally:
        for w in workers:
            w.stop()
    assert result == [200]  # the other worker served it
    assert re.search(r"INFO .*worker w\d+ lost its tunnel before answering GET /slow \(", line), line
    assert "refused GET" not in p.text
