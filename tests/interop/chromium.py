"""Headless Chromium, run as a subprocess in its own process group and always killed by that group's id.

Used by the status-page test and by ``scripts/status_page_screenshot.py``.
Chromium is found as ``$CHROMIUM_BIN``, then ``chromium`` / ``chromium-browser``
/ ``google-chrome`` on ``PATH`` (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Every run is bounded: a browser that has not finished by then is killed.
RUN_TIMEOUT = 60.0


def find_chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM_BIN"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _args(binary: str, profile: Path) -> list[str]:
    # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start; the page is ours.
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
            f"--user-data-dir={profile}"]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the browser's process group (its id is the pid we started), then wait until it is empty."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)  # zombies being reaped by init: a few ms
    raise AssertionError(f"chromium process group {proc.pid} still alive after SIGKILL")


def run(binary: str, profile: Path, *args: str, timeout: float = RUN_TIMEOUT) -> bytes:
    """Run one headless command (``--dump-dom URL``, ``--screenshot=... URL``); returns its stdout."""
    proc = subprocess.Popen([*_args(binary, profile), *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc)  # also the helpers (zygote, renderer) a finished browser may leave for a moment
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"chromium exited with {proc.returncode}")
    return out


@contextmanager
def browsing(binary: str, profile: Path, url: str) -> Iterator[subprocess.Popen[bytes]]:
    """A browser that keeps ``url`` open (and follows whatever the page does) until the block ends."""
    proc = subprocess.Popen([*_args(binary, profile), "--remote-debugging-port=0", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        _kill_group(proc)
