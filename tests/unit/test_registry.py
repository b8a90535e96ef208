"""The worker registry: who is selectable, slot reservation, and the import direction around it."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509

from rhttp_wsgi.balancing import LeastInFlight
from rhttp_wsgi.errors import NoWorkerAvailable
from rhttp_wsgi.pki import CertificateAuthority
from rhttp_wsgi.registry import WorkerInfo, WorkerRegistry

PACKAGE = Path(__file__).resolve().parents[2] / "rhttp_wsgi"


@pytest.fixture(scope="module")
def cert() -> x509.Certificate:
    pem, _ = CertificateAuthority.create().issue_client("tenant-a")
    return x509.load_pem_x509_certificate(pem)


def _tunnel(mcs: int = 2, connect: bool = False) -> Any:
    """The four things the registry reads from a tunnel."""
    return SimpleNamespace(closing=False, accepting=True,
                           proto=SimpleNamespace(peer_max_concurrent_streams=lambda: mcs,
                                                 peer_enable_connect_protocol=lambda: connect))


def _worker(cert: x509.Certificate, seq: int, mcs: int = 2, connect: bool = False) -> WorkerInfo:
    w = WorkerInfo(seq, cert, ("192.0.2.1", 5000 + seq))
    w.tunnel = _tunnel(mcs, connect)
    return w


def test_identity_comes_from_the_certificate(cert: x509.Certificate) -> None:
    w = _worker(cert, 7)
    assert (w.id, w.common_name, w.sans) == ("w7", "tenant-a", ["tenant-a"])
    assert w.as_dict()["common_name"] == "tenant-a"


def test_only_a_pending_worker_with_an_open_tunnel_attaches(cert: x509.Certificate) -> None:
    reg = WorkerRegistry(LeastInFlight(), stream_wait=0.0)
    closing = _worker(cert, 1)
    closing.tunnel.closing = True
    assert not closing.pending and not reg.attach(closing)
    w = _worker(cert, 2)
    assert w.pending and not w.attached
    assert reg.attach(w) and w.attached and not w.pending
    assert not reg.attach(w)  # once
    assert reg.detach(w) and not w.attached and not reg.detach(w)
    assert not reg.attach(w)  # a detached worker never comes back


def test_acquire_reserves_a_slot_until_release(cert: x509.Certificate) -> None:
    reg = WorkerRegistry(LeastInFlight(), stream_wait=0.0)
    w = _worker(cert, 1, mcs=1)
    reg.attach(w)
    assert reg.acquire({}, ()) is w and (w.in_flight, w.total) == (1, 1)
    with pytest.raises(NoWorkerAvailable, match="stream limit"):
        reg.acquire({}, ())
    reg.release(w)
    assert reg.acquire({}, ()) is w and w.total == 2


def test_snapshot_is_frozen(cert: x509.Certificate) -> None:
    reg = WorkerRegistry(LeastInFlight(), stream_wait=0.0)
    w = _worker(cert, 1, mcs=5)
    reg.attach(w)
    (snap,) = reg.snapshot()
    w.in_flight = 3
    w.tunnel.accepting = False
    assert (snap.in_flight, snap.max_concurrent_streams, snap.attached, snap.draining) == (0, 5, True, False)
    assert w.draining and not w.selectable


def _imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    return {node.module.lstrip(".") for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}


def test_registry_balancing_and_forwarder_do_not_import_the_proxy() -> None:
    # proxy -> balancing, forwarder, registry; balancing, forwarder -> registry; never back.
    assert not _imports("registry") & {"proxy", "balancing", "forwarder"}
    assert not _imports("balancing") & {"proxy", "forwarder"}
    assert not _imports("forwarder") & {"proxy", "balancing"}
    assert "registry" in _imports("balancing") and "registry" in _imports("forwarder")


def test_worker_info_is_still_importable_from_the_proxy() -> None:
    from rhttp_wsgi.proxy import WorkerInfo as FromProxy

    assert FromProxy is WorkerInfo


def test_websockets_go_only_to_workers_that_advertised_extended_connect(cert: x509.Certificate) -> None:
    reg = WorkerRegistry(LeastInFlight(), stream_wait=0.0)
    plain, ws = _worker(cert, 1, mcs=10), _worker(cert, 2, mcs=10, connect=True)
    reg.attach(plain)
    reg.attach(ws)
    for _ in range(3):
        assert reg.acquire({}, (), extended_connect=True) is ws
    assert ws.in_flight == 3 and plain.in_flight == 0
    assert reg.acquire({}, ()) is plain  # requests still go to every worker (least in flight)
    assert [s.extended_connect for s in reg.snapshot()] == [False, True]


def test_no_worker_that_advertised_extended_connect_is_503_at_once(cert: x509.Certificate) -> None:
    reg = WorkerRegistry(LeastInFlight(), stream_wait=5.0, attach_wait=5.0)
    reg.attach(_worker(cert, 1))
    with pytest.raises(NoWorkerAvailable, match="SETTINGS_ENABLE_CONNECT_PROTOCOL"):
        reg.acquire({}, (), extended_connect=True)
