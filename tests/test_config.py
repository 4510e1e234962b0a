"""
The route file: parsing, defaults, and every error naming file, route and
field, both in-process and through a real C{twistd} that must exit before
binding anything.
"""

from __future__ import annotations

import re
import textwrap

import pytest

from streamrelay.config import ConfigError, parse_config, parse_duration, parse_port
from tests.harness import run_twistd, write_config


def route(body: str, name: str = "ssh", extra: str = "") -> str:
    return extra + "routes:\n  " + name + ":\n" + textwrap.indent(textwrap.dedent(body), "    ")


def test_defaults_and_overrides() -> None:
    config = parse_config(
        textwrap.dedent(
            """
            defaults:
              connect_timeout: 250ms
              retries: 3
              idle_timeout: 1m30s
            routes:
              ssh:
                scheme: tcp4
                host: 10.0.0.5
                port: 2222:22
              db:
                scheme: tcp
                port: ":5432"
                retries: 0
                backlog: 50
              dns:
                scheme: udp
                port: "53"
            """
        ),
        "r.yml",
    )
    ssh, db, dns = config.routes
    assert (ssh.bind, ssh.listen_port, ssh.host, ssh.target_port) == ("0.0.0.0", 2222, "10.0.0.5", 22)
    assert (ssh.connect_timeout, ssh.retries, ssh.idle_timeout) == (0.25, 3, 90.0)
    assert (db.bind, db.host, db.listen_port, db.retries, db.backlog) == ("::", "localhost", 0, 0, 50)
    assert ssh.half_close_timeout == 30.0 and ssh.backlog == 4096
    assert (dns.protocol, dns.listen_port, dns.target_port) == ("udp", 0, 53)
    assert ssh.listen == "0.0.0.0:2222" and db.listen == "[::]:0"
    assert config.shutdown_timeout == 10.0


@pytest.mark.parametrize(
    "text, seconds",
    [("250ms", 0.25), ("5s", 5), ("1m30s", 90), ("2h", 7200), (3, 3), (1.5, 1.5), ("0", 0), ("1.5s", 1.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("value, expected", [("2222:22", (2222, 22)), ("22", (0, 22)), (":22", (0, 22)), (22, (0, 22)), ("0:1", (0, 1))])
def test_ports(value: object, expected: tuple[int, int]) -> None:
    assert parse_port(value) == expected


#: (route file, text that the message must contain)
ERRORS = [
    ("", "the route file is empty"),
    ("routes: [", "line 1"),
    ("routes:\n  a: {scheme: tcp, port: '1:2'}\n  a: {scheme: tcp, port: '3:4'}\n", "duplicate key 'a'"),
    ("routs: {}\n", "field 'routs': unknown field"),
    ("routes: {}\n", "field 'routes': expected a mapping"),
    (route("scheme: tcp\nport: '1:2'\nconect_timeout: 5s\n"), "route 'ssh': field 'conect_timeout': unknown field"),
    (route("scheme: sctp\nport: '1:2'\n"), "route 'ssh': field 'scheme': expected one of tcp, tcp4, tcp6, udp, udp4, udp6, found 'sctp'"),
    (route("port: '1:2'\n"), "route 'ssh': field 'scheme': missing"),
    (route("scheme: tcp\n"), "route 'ssh': field 'port': missing"),
    (route("scheme: tcp\nport: '70000:22'\n"), "route 'ssh': field 'port': expected \"LISTEN:TARGET\""),
    (route("scheme: tcp\nport: '2222:0'\n"), "a target port from 1 to 65535"),
    (route("scheme: tcp\nport: 'ssh'\n"), "found 'ssh'"),
    (route("scheme: tcp\nport: '022:22'\n"), "field 'port'"),
    (route("scheme: tcp4\nport: '1:2'\nbind: '::1'\n"), "route 'ssh': field 'bind': expected an IPv4 address for scheme tcp4, found '::1'"),
    (route("scheme: tcp6\nport: '1:2'\nhost: 10.0.0.1\n"), "route 'ssh': field 'host': expected an IPv6 address for scheme tcp6"),
    (route("scheme: tcp\nport: '1:2'\nbind: example.com\n"), "route 'ssh': field 'bind': expected an IPv4 or IPv6 address"),
    (route("scheme: tcp\nport: '1:2'\nhost: 'bad host!'\n"), "route 'ssh': field 'host': expected a host name"),
    (route("scheme: tcp\nport: '1:2'\nconnect_timeout: soon\n"), "route 'ssh': field 'connect_timeout': expected a duration"),
    (route("scheme: tcp\nport: '1:2'\nconnect_timeout: 0\n"), "route 'ssh': field 'connect_timeout': expected a duration above 0"),
    (route("scheme: tcp\nport: '1:2'\nidle_timeout: 1.0e400\n"), "route 'ssh': field 'idle_timeout': expected a finite duration"),
    (route("scheme: tcp\nport: '1:2'\nidle_timeout: '" + "9" * 400 + "s'\n"), "route 'ssh': field 'idle_timeout': expected a finite duration"),
    ("routes:\n  1: {scheme: tcp, port: '1:2'}\n  '1': {scheme: tcp, port: '3:4'}\n", "field 'routes': route name '1' is given twice"),
    (route("scheme: tcp\nport: '1:2'\ndial_timeout: 0\n"), "route 'ssh': field 'dial_timeout': expected a duration above 0"),
    (route("scheme: tcp\nport: '1:2'\nclose_timeout: 0s\n"), "route 'ssh': field 'close_timeout': expected a duration above 0"),
    (route("scheme: tcp\nport: '1:2'\nretries: -1\n"), "route 'ssh': field 'retries': expected an integer from 0 to 100"),
    (route("scheme: tcp\nport: '1:2'\nbacklog: 0\n"), "route 'ssh': field 'backlog'"),
    (route("scheme: udp\nport: '1:2'\nidle_timeout: 5s\n"), "route 'ssh': field 'idle_timeout': only supported for tcp routes, not udp"),
    ("defaults: {connect_timeout: -1}\n" + route("scheme: tcp\nport: '1:2'\n"), "field 'defaults.connect_timeout': expected a duration"),
    ("defaults: {scheme: tcp}\n" + route("scheme: tcp\nport: '1:2'\n"), "field 'defaults.scheme': unknown field"),
    ("proxy_protocol: {mode: required}\n" + route("scheme: tcp\nport: '1:2'\n"),
     "field 'proxy_protocol.trusted_proxies': mode required needs at least one trusted proxy"),
    ("proxy_protocol: {mode: sometimes, trusted_proxies: [10.0.0.0/8]}\n" + route("scheme: tcp\nport: '1:2'\n"),
     "field 'proxy_protocol.mode': expected one of disabled, required, mixed, optional, found 'sometimes'"),
    ("proxy_protocol: {mode: mixed, trusted_proxies: [10.0.0.0/8, 10.0.0.1/8]}\n" + route("scheme: tcp\nport: '1:2'\n"),
     "field 'proxy_protocol.trusted_proxies[1]': expected an IP address or a CIDR block"),
    ("entrypoint: {proxy_protocol: {mode: mixed, trusted_proxies: [nope]}}\n" + route("scheme: tcp\nport: '1:2'\n"),
     "field 'entrypoint.proxy_protocol.trusted_proxies[0]'"),
    (route("scheme: tcp\nport: '1:2'\nproxy_protocol: {mode: optional, trusted: [1.2.3.4]}\n"),
     "route 'ssh': field 'proxy_protocol.trusted': unknown field"),
    (route("scheme: udp\nport: '1:2'\nrelay_proxy_protocol_header: true\n"),
     "route 'ssh': field 'relay_proxy_protocol_header': only supported for tcp routes, not udp"),
    (route("scheme: tcp4\nport: '1:2'\nudp_proxy_protocol: true\n"),
     "route 'ssh': field 'udp_proxy_protocol': only supported for udp routes, not tcp4"),
    (route("scheme: udp\nport: '1:2'\nreuse_port: maybe\n"), "route 'ssh': field 'reuse_port': expected true or false"),
    (route("scheme: tcp\nport: '1:2'\nproxy_protocol_version: 3\n"), "field 'proxy_protocol_version': expected one of 1, 2, found 3"),
    (route("scheme: tcp\nport: '1:2'\nrelay_proxy_protocol_header: yes please\n"), "expected true or false"),
    (
        "routes:\n  a: {scheme: tcp4, bind: 127.0.0.1, port: '7000:22'}\n  b: {scheme: tcp4, port: '7000:23'}\n",
        "route 'b': field 'port': tcp 0.0.0.0:7000 clashes with route 'a' listening on 127.0.0.1:7000",
    ),
    (
        "routes:\n  a: {scheme: tcp, port: '7000:22'}\n  b: {scheme: tcp4, port: '7000:23'}\n",
        "clashes with route 'a' listening on [::]:7000",
    ),
]


@pytest.mark.parametrize("text, message", ERRORS)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "routes.yml")
    assert str(caught.value).startswith("routes.yml: ")
    assert message in str(caught.value)


def test_proxy_protocol_blocks() -> None:
    config = parse_config(
        "entrypoint: {proxy_protocol: {mode: required, trusted_proxies: [10.0.0.0/8, 127.0.0.1, '::1']}}\n"
        "routes:\n"
        "  a: {scheme: tcp, port: ':1', relay_proxy_protocol_header: true, proxy_protocol_version: 1}\n"
        "  b: {scheme: tcp, port: ':1', proxy_protocol: {mode: optional, trusted_proxies: [192.0.2.7], timeout: 5s}}\n"
        "  c: {scheme: udp, port: ':1'}\n",
    )
    a, b, c = config.routes
    assert a.proxy_protocol.mode == "required" and a.proxy_protocol.timeout == 3.0
    assert a.proxy_protocol.trusts("::ffff:10.1.2.3") and a.proxy_protocol.trusts("::1")
    assert not a.proxy_protocol.trusts("192.0.2.7")
    assert (b.proxy_protocol.mode, b.proxy_protocol.timeout, b.proxy_protocol.detect_timeout) == ("optional", 5.0, 0.3)
    assert b.proxy_protocol.trusts("192.0.2.7") and not b.proxy_protocol.trusts("10.0.0.1")
    assert (a.relay_proxy_protocol_header, a.proxy_protocol_version, b.proxy_protocol_version) == (True, 1, 2)
    assert c.proxy_protocol.mode == "disabled"


def test_no_clash_across_protocols_or_family_specific_binds() -> None:
    config = parse_config(
        "routes:\n"
        "  a: {scheme: tcp4, bind: 127.0.0.1, port: '7000:22'}\n"
        "  b: {scheme: udp4, bind: 127.0.0.1, port: '7000:22'}\n"
        "  c: {scheme: tcp6, bind: '::1', port: '7000:22'}\n"
        "  d: {scheme: tcp4, bind: 127.0.0.2, port: '7000:22'}\n"
        "  e: {scheme: tcp, port: ':22'}\n  f: {scheme: tcp, port: ':22'}\n",
    )
    assert len(config.routes) == 6


@pytest.mark.parametrize(
    "text, message",
    [
        (route("scheme: tcp\nport: '1:2'\nretries: many\n"), "route 'ssh': field 'retries'"),
        ("routes: [\n", "YAML error"),
        (route("scheme: tcp4\nport: '1:2'\nbind: '::'\n"), "route 'ssh': field 'bind'"),
    ],
)
def test_twistd_exits_before_binding(tmp_path, text: str, message: str) -> None:
    path = write_config(tmp_path, text)
    result = run_twistd(path)
    assert result.returncode != 0
    assert str(path) in result.stderr and message in result.stderr
    assert "starting on" not in result.stdout


#: Nesting far beyond any route file: PyYAML's composer recurses once per level,
#: so 500 levels exhaust Python's stack.
DEEP = 500
NESTED = {
    "flow sequences": "[" * DEEP + "]" * DEEP,
    "flow mappings": "{a: " * DEEP + "1" + "}" * DEEP,
    "block mappings": "".join(" " * level + "a:\n" for level in range(DEEP)),
    "block sequences": "- " * DEEP + "x\n",
}


@pytest.mark.parametrize("text", NESTED.values(), ids=NESTED.keys())
def test_deep_nesting_is_refused(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "routes.yml")
    assert re.fullmatch(
        r"routes\.yml: line \d+, column \d+: YAML error: nested too deeply \(more than 64 levels\)",
        str(caught.value),
    )


def test_nesting_up_to_the_limit_reaches_validation() -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config("[" * 64 + "]" * 64, "routes.yml")


def test_twistd_refuses_deep_nesting_in_one_line(tmp_path) -> None:
    path = write_config(tmp_path, NESTED["flow sequences"])
    result = run_twistd(path)
    assert result.returncode != 0
    assert result.stderr == f"streamrelay: {path}: line 1, column 65: YAML error: nested too deeply (more than 64 levels)\n"
    assert "Traceback" not in result.stdout


def test_missing_file_names_it(tmp_path) -> None:
    result = run_twistd(tmp_path / "nope.yml")
    assert result.returncode != 0
    assert "nope.yml: cannot read the route file" in result.stderr


def test_bind_failure_names_route_and_address(tmp_path) -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        path = write_config(
            tmp_path,
            "routes:\n"
            "  first: {scheme: tcp4, bind: 127.0.0.1, port: ':9'}\n"
            f"  second: {{scheme: tcp4, bind: 127.0.0.1, port: '{port}:9'}}\n",
        )
        result = run_twistd(path)
    finally:
        busy.close()
    output = result.stdout + result.stderr  # twistd logs what the service printed
    assert result.returncode != 0
    assert f"route 'second': cannot listen on tcp 127.0.0.1:{port}" in output
    assert "Traceback" not in output
