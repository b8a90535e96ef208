"""Options: one declaration gives the constructor, the CLI flag and the environment variable."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rhttp_wsgi import MTLSRequiredError, WorkerPool
from rhttp_wsgi.balancing import LeastInFlight, RoundRobin, resolve_selector
from rhttp_wsgi.cli import _add_option_flags, _collect, build_parser
from rhttp_wsgi.errors import ConfigError
from rhttp_wsgi.mount import proxy_options_from_env
from rhttp_wsgi.options import (
    OptionKind,
    ProxyOptions,
    TunnelOptions,
    WorkerOptions,
    _opt,
    option_fields,
    option_kind,
    options_from_environ,
    parse_option,
    settings_reference,
)
from rhttp_wsgi.pki import DemoPKI
from rhttp_wsgi.proxy import Proxy

PROXY_REQUIRED = {"cert": "c", "key": "k", "workers_ca": "ca"}


@dataclass(frozen=True)
class FleetOptions(TunnelOptions):
    """Options with list fields, as several proxy addresses will need."""

    proxies: tuple[str, ...] = _opt((), "Proxies to dial.", metavar="HOST:PORT")
    ports: tuple[int, ...] = _opt((8443,), "Ports to try.", minimum=1, maximum=65535)


# -- types --------------------------------------------------------------------------------


def test_kind_of_each_option_comes_from_its_annotation() -> None:
    assert option_kind(WorkerOptions, "connections") == OptionKind(int, False)
    assert option_kind(WorkerOptions, "ping_interval") == OptionKind(float, False)
    assert option_kind(WorkerOptions, "cert") == OptionKind(str, False)
    assert option_kind(ProxyOptions, "trust_forwarded") == OptionKind(bool, False)
    assert option_kind(ProxyOptions, "selector") == OptionKind(str, False)  # str | callable: text on the CLI
    assert option_kind(FleetOptions, "proxies") == OptionKind(str, True)
    assert option_kind(FleetOptions, "ports") == OptionKind(int, True)


def test_parse_option_converts_text_and_names_the_option_on_error() -> None:
    assert parse_option(WorkerOptions, "connections", "3") == 3
    assert parse_option(WorkerOptions, "ping_interval", "2.5") == 2.5
    assert parse_option(ProxyOptions, "trust_forwarded", "yes") is True
    assert parse_option(ProxyOptions, "trust_forwarded", "off") is False
    for name, text in (("connections", "many"), ("ping_interval", "soon")):
        with pytest.raises(ConfigError, match=rf"^{name}: invalid value"):
            parse_option(WorkerOptions, name, text)
    with pytest.raises(ConfigError, match=r"^trust_forwarded:"):
        parse_option(ProxyOptions, "trust_forwarded", "maybe")


# -- the one environment reader ------------------------------------------------------------


def test_environment_reader_parses_rhttp_variables_of_the_class_only() -> None:
    env = {"RHTTP_CONNECTIONS": "3", "RHTTP_PING_INTERVAL": "2.5", "RHTTP_TRUST_FORWARDED": "1",
           "RHTTP_URL_SCHEME": "https", "RHTTP_APP": "x:y", "PATH": "/bin"}
    assert options_from_environ(WorkerOptions, env) == {"connections": 3, "ping_interval": 2.5,
                                                        "url_scheme": "https"}
    assert options_from_environ(ProxyOptions, env) == {"ping_interval": 2.5, "trust_forwarded": True}
    with pytest.raises(ConfigError, match=r"^connections:"):
        options_from_environ(WorkerOptions, {"RHTTP_CONNECTIONS": "many"})


def test_cli_and_mount_read_the_environment_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"RHTTP_CERT": "c", "RHTTP_KEY": "k", "RHTTP_WORKERS_CA": "ca", "RHTTP_STREAM_WAIT": "0.5",
           "RHTTP_TRUST_FORWARDED": "true", "RHTTP_SELECTOR": "cn:X-Tenant"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from_cli = ProxyOptions(**_collect(ProxyOptions, build_parser().parse_args(["proxy"])))
    assert from_cli == proxy_options_from_env(env) == ProxyOptions(
        cert="c", key="k", workers_ca="ca", stream_wait=0.5, trust_forwarded=True, selector="cn:X-Tenant")


def test_cli_flag_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RHTTP_STREAM_WAIT", "0.5")
    monkeypatch.setenv("RHTTP_TRUST_FORWARDED", "1")
    ns = build_parser().parse_args(["proxy", "--stream-wait", "3", "--no-trust-forwarded"])
    assert _collect(ProxyOptions, ns) == {"stream_wait": 3.0, "trust_forwarded": False}
    with pytest.raises(ConfigError, match=r"^stream_wait:"):
        _collect(ProxyOptions, build_parser().parse_args(["proxy", "--stream-wait", "soon"]))


# -- one selector vocabulary ----------------------------------------------------------------


@pytest.mark.parametrize("spec", ["least-in-flight", "round-robin", "rr", "cn", "cn:X-Tenant", "CN:X-Tenant"])
def test_options_accept_every_selector_name_the_proxy_accepts(spec: str) -> None:
    resolve_selector(spec)
    assert ProxyOptions(**PROXY_REQUIRED, selector=spec).selector == spec
    ns = build_parser().parse_args(["proxy", "--selector", spec])
    assert _collect(ProxyOptions, ns)["selector"] == spec


def test_options_accept_a_selector_callable() -> None:
    rr = RoundRobin()
    assert ProxyOptions(**PROXY_REQUIRED, selector=rr).selector is rr
    assert isinstance(resolve_selector(ProxyOptions(**PROXY_REQUIRED).selector), LeastInFlight)


@pytest.mark.parametrize("spec", ["random", "", 5])
def test_unknown_selector_is_a_config_error_naming_the_option(spec: Any) -> None:
    with pytest.raises(ConfigError, match=r"^selector: unknown selector") as e:
        ProxyOptions(**PROXY_REQUIRED, selector=spec)
    assert e.value.option == "selector"


# -- list options ------------------------------------------------------------------------------


def test_list_option_from_constructor_is_a_tuple() -> None:
    assert FleetOptions().proxies == ()
    assert FleetOptions(proxies=["a:1", "b:2"]).proxies == ("a:1", "b:2")
    assert FleetOptions(proxies="a:1").proxies == ("a:1",)  # one value as a plain string
    assert FleetOptions(proxies="a:1, b:2").proxies == ("a:1", "b:2")
    assert FleetOptions(ports=[1, 2]).ports == (1, 2)
    with pytest.raises(ConfigError, match=r"^ports: must be <= 65535"):
        FleetOptions(ports=(1, 70000))
    with pytest.raises(ConfigError, match=r"^proxies: expected a list"):
        FleetOptions(proxies=5)  # type: ignore[arg-type]


def test_list_option_from_comma_separated_environment_variable() -> None:
    env = {"RHTTP_PROXIES": "a:1, b:2,,", "RHTTP_PORTS": "443,8443"}
    assert options_from_environ(FleetOptions, env) == {"proxies": ("a:1", "b:2"), "ports": (443, 8443)}
    assert options_from_environ(FleetOptions, {"RHTTP_PROXIES": ""}) == {"proxies": ()}
    with pytest.raises(ConfigError, match=r"^ports: invalid value 'x'"):
        options_from_environ(FleetOptions, {"RHTTP_PORTS": "1,x"})


def test_list_option_from_repeated_cli_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RHTTP_PROXIES", "env:1")
    parser = argparse.ArgumentParser()
    _add_option_flags(parser, FleetOptions)
    ns = parser.parse_args(["--proxies", "a:1", "--proxies", "b:2,c:3", "--ports", "1"])
    assert _collect(FleetOptions, ns) == {"proxies": ("a:1", "b:2", "c:3"), "ports": (1,)}
    assert _collect(FleetOptions, parser.parse_args([])) == {"proxies": ("env:1",)}  # no flag: the variable


def test_settings_reference_documents_list_options() -> None:
    text = settings_reference([(FleetOptions, "Fleet")])
    assert "A list option takes its CLI flag once per value" in text
    assert "| `proxies` | `--proxies` (repeatable) | `RHTTP_PROXIES` (comma-separated) | none |" in text
    assert "| `ports` | `--ports` (repeatable) | `RHTTP_PORTS` (comma-separated) | (8443,) |" in text
    assert "| `proxy` | `--proxy` (repeatable) | `RHTTP_PROXY` (comma-separated) | required |" in settings_reference()


ABUSE_LIMITS = {
    # the worker's limits against a hostile proxy (tests/tunnel/test_abuse_worker.py)
    # option: (default, an invalid value)
    "max_header_count": (100, 0),
    "max_body_size": (0, -1),
    "body_timeout": (60.0, -1.0),
    "body_min_rate": (500, -1),
    "send_timeout": (60.0, -1.0),
    "request_timeout": (0.0, -1.0),
    "max_resets": (500, -1),
    "control_frame_rate": (100.0, -1.0),
    "control_frame_burst": (1000, 0),
    "max_output_backlog": (1 << 20, 1000),
}


@pytest.mark.parametrize("name", list(ABUSE_LIMITS))
def test_every_abuse_limit_is_a_validated_documented_option(name: str) -> None:
    base = {"proxy": "127.0.0.1:8443", "cert": "w.crt", "key": "w.key"}
    default, bad = ABUSE_LIMITS[name]
    assert getattr(WorkerOptions(**base), name) == default
    with pytest.raises(ConfigError) as info:
        WorkerOptions(**base, **{name: bad})
    assert info.value.option == name
    field = {f.name: f for f in option_fields(WorkerOptions)}[name]
    assert len(field.metadata["help"]) > 40
    assert f"`{name}`" in settings_reference()


# -- the public constructors refuse bad configuration, naming the option ------------------------


def _app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b""]


@pytest.fixture
def pki(tmp_path: Path) -> DemoPKI:
    return DemoPKI.create(tmp_path / "pki", worker_names=("worker",))


def test_mtls_required() -> None:
    with pytest.raises(MTLSRequiredError):
        Proxy(cert="x", key="y")


def test_missing_client_certificate_is_a_dedicated_error(pki: DemoPKI) -> None:
    with pytest.raises(MTLSRequiredError):
        WorkerPool(_app, proxy="127.0.0.1:1", ca=str(pki.ca_cert))
    assert issubclass(MTLSRequiredError, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"proxy": "nohost"}, "proxy"),
        ({"proxy": "h:99999"}, "proxy"),
        ({"connections": 0}, "connections"),
        ({"threads": 0}, "threads"),
        ({"max_concurrent_streams": 0}, "max_concurrent_streams"),
        ({"ping_interval": 0}, "ping_interval"),
        ({"url_scheme": "ftp"}, "url_scheme"),
        ({"initial_window_size": 2**31}, "initial_window_size"),
        ({"ca": "/nonexistent/ca.pem"}, "ca"),
    ],
)
def test_invalid_options_name_the_option(pki: DemoPKI, kwargs: dict[str, object], option: str) -> None:
    cert, key = pki.workers["worker"]
    base: dict[str, object] = {"proxy": "127.0.0.1:8443", "cert": str(cert), "key": str(key)}
    base.update(kwargs)
    with pytest.raises(ConfigError) as info:
        WorkerPool(_app, **base)
    assert info.value.option == option
    assert str(info.value).startswith(option)


# -- several proxies (issue 13) --------------------------------------------------------------------


def test_proxy_takes_a_list_a_comma_separated_string_or_repeated_flags() -> None:
    base = {"cert": "w.crt", "key": "w.key"}
    assert WorkerOptions(proxy="a:1", **base).proxy == ("a:1",)
    assert WorkerOptions(proxy="a:1, b:2", **base).proxy == ("a:1", "b:2")
    assert WorkerOptions(proxy=["a:1", "[::1]:2"], **base).proxy_addresses == (("a", 1), ("::1", 2))
    assert options_from_environ(WorkerOptions, {"RHTTP_PROXY": "a:1,b:2"})["proxy"] == ("a:1", "b:2")
    parser = argparse.ArgumentParser()
    _add_option_flags(parser, WorkerOptions)
    assert _collect(WorkerOptions, parser.parse_args(["--proxy", "a:1", "--proxy", "b:2"]))["proxy"] == ("a:1", "b:2")


@pytest.mark.parametrize(("value", "needle"), [("", "required"), ("a:1,a:1", "listed twice"), ("a:1,b", "HOST:PORT")])
def test_a_bad_proxy_list_is_refused_naming_the_option(value: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        WorkerOptions(proxy=value, cert="w.crt", key="w.key")
    assert info.value.option == "proxy"


def test_server_name_is_each_proxy_host_unless_set() -> None:
    o = WorkerOptions(proxy="p1.example:1,10.0.0.2:1", cert="w.crt", key="w.key")
    assert (o.verify_name_for("p1.example"), o.sni_for("p1.example")) == ("p1.example", "p1.example")
    assert (o.verify_name_for("10.0.0.2"), o.sni_for("10.0.0.2")) == ("10.0.0.2", None)  # no SNI for an IP
    named = WorkerOptions(proxy="p1.example:1,10.0.0.2:1", cert="w.crt", key="w.key", server_name="edge.example")
    assert named.verify_name_for("10.0.0.2") == named.sni_for("p1.example") == "edge.example"
