"""Under gunicorn, an app or a certificate that cannot be used stops the master with gunicorn's statuses.

gunicorn loads the app itself (``Worker.load_wsgi``), so an app that does not
load fails the gunicorn way, and the rhttp worker keeps it: 3 ("Worker failed
to boot") when the module raised while imported, 4 ("App failed to load") when
the app is not in it.  Our own startup checks (settings, the certificate and
key) also end in 3, with one line.  Documented in ``docs/gunicorn.md``.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rhttp_wsgi.pki import DemoPKI

pytest.importorskip("gunicorn", reason="gunicorn is in the 'test' extra")

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]

APPS = {
    "raises_at_import": "raise RuntimeError('DATABASE_URL is not set')\n",
    "names_it_app": "def app(environ, start_response):\n    return []\n",
}


def gunicorn(tmp_path: Path, app: str, cert: Path, key: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    for name, source in APPS.items():
        (tmp_path / f"{name}.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RHTTP_", "GUNICORN_"))}
    env.update(RHTTP_PROXY="localhost:1", RHTTP_CERT=str(cert), RHTTP_KEY=str(key), RHTTP_CA=str(ca),
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), XDG_RUNTIME_DIR=str(tmp_path))
    return subprocess.run([sys.executable, "-m", "gunicorn", "-k", "rhttp_wsgi.gunicorn_worker.RHTTPWorker",
                           "-b", "127.0.0.1:0", "--workers", "1", app], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture()
def pki(tmp_path: Path) -> DemoPKI:
    return DemoPKI.create(tmp_path / "pki", worker_names=("gunicorn",))


@pytest.mark.parametrize(("app", "status", "words"), [
    ("not_a_module_here", 3, "No module named 'not_a_module_here'"),
    ("raises_at_import", 3, "DATABASE_URL is not set"),
    ("names_it_app", 4, "Failed to find attribute 'application' in 'names_it_app'."),
])
def test_an_app_that_does_not_load_stops_the_master_with_gunicorns_status(tmp_path: Path, pki: DemoPKI, app: str,
                                                                          status: int, words: str) -> None:
    cert, key = pki.workers["gunicorn"]
    r = gunicorn(tmp_path, app, cert, key, pki.ca_cert)
    assert r.returncode == status, r.stderr
    assert words in r.stderr
    assert ("Worker failed to boot." if status == 3 else "App failed to load.") in r.stderr


def test_an_expired_worker_certificate_stops_the_master_with_one_line(tmp_path: Path, pki: DemoPKI) -> None:
    cert, key = pki.issue_worker("expired", not_after=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1))
    r = gunicorn(tmp_path, "names_it_app:app", cert, key, pki.ca_cert)
    assert r.returncode == 3, r.stderr
    assert f"rhttp worker: invalid setting: cert: {cert} (subject CN=expired" in r.stderr
    assert "expired on" in r.stderr and "Traceback" not in r.stderr
