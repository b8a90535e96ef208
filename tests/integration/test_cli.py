"""The command line, run as a user would: a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rhttp_wsgi import __version__
from rhttp_wsgi.pki import DemoPKI

from .minimal_proxy import MiniProxy

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rhttp_wsgi", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"rhttp-wsgi {__version__}"


@pytest.mark.parametrize("command", ["worker", "proxy", "certs", "demo"])
def test_help_has_examples(command: str) -> None:
    r = run(command, "--help")
    assert r.returncode == 0
    assert "examples:" in r.stdout and "rhttp-wsgi " + command in r.stdout


@pytest.fixture()
def pki(tmp_path: Path) -> DemoPKI:
    return DemoPKI.create(tmp_path, worker_names=("worker",))


def test_bad_config_exits_with_one_line(pki: DemoPKI, tmp_path: Path) -> None:
    cert, key = pki.workers["worker"]
    cases = [
        (["--proxy", "127.0.0.1:8443", "--cert", "/nonexistent.crt", "--key", str(key)], "no such file"),
        (["--proxy", "no-port", "--cert", str(cert), "--key", str(key)], "proxy:"),
        (["--proxy", "127.0.0.1:8443", "--cert", str(cert), "--key", str(tmp_path / "garbage.key")], "key"),
        (["--proxy", "127.0.0.1:8443"], "client certificate"),
    ]
    (tmp_path / "garbage.key").write_text("not a key\n")
    for flags, needle in cases:
        r = run("worker", "tests.apps.hello:app", *flags)
        assert r.returncode == 2, r
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and needle in lines[0], r.stderr


@pytest.fixture()
def proxy(pki: DemoPKI) -> Iterator[MiniProxy]:
    p = MiniProxy(str(pki.server_cert), str(pki.server_key), str(pki.ca_cert))
    p.start()
    yield p
    p.close()


@pytest.mark.parametrize(("spec", "body"), [("tests.apps.hello:app", b"hello from cli"),
                                            ("tests.apps.hello:create_app('hey')", b"hey")])
def test_worker_from_environment_serves_and_drains_on_sigterm(pki: DemoPKI, proxy: MiniProxy, spec: str,
                                                              body: bytes) -> None:
    cert, key = pki.workers["worker"]
    env = dict(os.environ, RHTTP_PROXY=f"127.0.0.1:{proxy.port}", RHTTP_CERT=str(cert), RHTTP_KEY=str(key),
               RHTTP_CA=str(pki.ca_cert), RHTTP_CONNECTIONS="2", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "rhttp_wsgi", "worker", spec], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tunnels = proxy.wait_tunnels(2, timeout=15)
        r = proxy.request("GET", "/", tunnel=tunnels[0])
        assert (r.status, r.body) == (200, body)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
    assert err.count("connected to 127.0.0.1") == 2, err
    assert "received SIGTERM" in err and "worker pool stopped (drained)" in err


def test_certs_creates_then_reuses_the_ca(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    r1 = run("certs", "--dir", str(d), "w1", "w2")
    assert r1.returncode == 0, r1.stderr
    ca1 = (d / "workers-ca.crt").read_bytes()
    for name in ("w1", "w2"):
        assert (d / f"{name}.crt").exists()
        assert (d / f"{name}.key").stat().st_mode & 0o777 == 0o600
        assert f"{name}.crt" in r1.stdout
    r2 = run("certs", "--dir", str(d), "w3", "--server", "proxy.example", "--san", "127.0.0.1")
    assert r2.returncode == 0, r2.stderr
    assert (d / "workers-ca.crt").read_bytes() == ca1
    assert (d / "proxy.example.crt").exists()


def test_certs_rejects_path_traversal(tmp_path: Path) -> None:
    r = run("certs", "--dir", str(tmp_path), "../evil")
    assert r.returncode == 2 and "evil" in r.stderr
    assert not (tmp_path.parent / "evil.crt").exists()


def test_settings_reference_matches_docs() -> None:
    r = run("settings")
    assert r.returncode == 0
    assert (ROOT / "docs" / "settings.md").read_text() == r.stdout, \
        "docs/settings.md is stale: regenerate with `python -m rhttp_wsgi settings > docs/settings.md`"


def test_demo_serves_page_echo_and_events_then_cleans_up() -> None:
    """The README's main job: `rhttp-wsgi demo`, driven like a user with an HTTP client."""
    import re
    import time
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "rhttp_wsgi", "demo", "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 20
        url = certs = None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"open (http://\S+?)/  \(certificates in (\S+)\)", line)
            if m:
                url, certs = m.group(1), m.group(2)
                break
        assert url and certs, "".join(lines)
        assert Path(certs).is_dir()
        with urllib.request.urlopen(url + "/", timeout=10) as r:
            assert r.status == 200 and b"behind the tunnel" in r.read()
        req = urllib.request.Request(url + "/echo", data=b"ping", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.read() == b"ping"
        with urllib.request.urlopen(url + "/events", timeout=10) as r:
            assert r.headers["Content-Type"] == "text/event-stream"
            assert r.readline().startswith(b"data: tick 0")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, "".join(lines) + err
    assert "demo stopped" in err
    assert not Path(certs).exists(), "the throwaway PKI must be removed"


def _wait_line(proc: subprocess.Popen[str], pattern: str, lines: list[str], timeout: float = 20) -> Any:
    import re
    import time

    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(lines))


def test_proxy_and_worker_commands_serve_together(pki: DemoPKI) -> None:
    """`rhttp-wsgi proxy` and `rhttp-wsgi worker` as two processes, like a deployment."""
    import urllib.request

    cert, key = pki.workers["worker"]
    proxy = subprocess.Popen(
        [sys.executable, "-m", "rhttp_wsgi", "proxy", "--tunnel-bind", "127.0.0.1:0", "--public-bind",
         "127.0.0.1:0", "--cert", str(pki.server_cert), "--key", str(pki.server_key),
         "--workers-ca", str(pki.ca_cert), "--selector", "round-robin"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [proxy]
    plines: list[str] = []
    wlines: list[str] = []
    try:
        m = _wait_line(proxy, r"tunnels on (\S+):(\d+), public HTTP on (\S+):(\d+)", plines)
        tport, public = m.group(2), f"http://{m.group(3)}:{m.group(4)}"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        worker = subprocess.Popen(
            [sys.executable, "-m", "rhttp_wsgi", "worker", "tests.apps.hello:app", "--proxy", f"localhost:{tport}",
             "--cert", str(cert), "--key", str(key), "--ca", str(pki.ca_cert)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(worker)
        _wait_line(worker, r"tunnel-0: connected to localhost", wlines)
        _wait_line(proxy, r"worker w1 attached: CN=worker", plines)
        with urllib.request.urlopen(public + "/", timeout=10) as r:
            assert r.read() == b"hello from cli"
        worker.send_signal(signal.SIGTERM)
        _, werr = worker.communicate(timeout=15)
        assert worker.returncode == 0, werr
        proxy.send_signal(signal.SIGTERM)
        _, perr = proxy.communicate(timeout=15)
        assert proxy.returncode == 0, perr
        assert "proxy stopped" in perr
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
