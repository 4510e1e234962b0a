"""
Checking a route file without running it: C{twistd streamrelay --check} and
C{python -m streamrelay check}, their route lines, and C{--dump}'s YAML,
which must load back to the very configuration it was written from.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml

from streamrelay.config import load_config, parse_config
from streamrelay.dump import describe, dump, report
from tests.harness import DEADLINE, TWISTD, write_config

ROOT = Path(__file__).resolve().parent.parent

EVERY_FIELD = """
    defaults:
      connect_timeout: 2s
      retries: 3
      idle_timeout: 1m30s
      half_close_timeout: 0
      close_timeout: 250ms
      backlog: 128
      max_connections: 10
      reuse_port: true
      udp_idle_timeout: 45s
      max_udp_sessions: 7
    shutdown_timeout: 1.5
    proxy_protocol: {mode: optional, trusted_proxies: [10.0.0.0/8, "::1"], timeout: 2s, detect_timeout: 0.05}
    acl:
      default: deny
      allow_local: false
      allow: ["ip:198.51.100.7", "cidr:192.168.0.0/16", "2001:db8::/32", "::ffff:192.0.2.0/120"]
      deny: ["cidr:203.0.113.0/24"]
    status: {listen: "[::1]:9180", acl: {default: deny, allow_local: true}}
    routes:
      every:
        scheme: tcp4
        bind: 127.0.0.1
        host: example.net
        port: "1:65535"
        connect_timeout: 1s
        retries: 0
        dial_timeout: 7s
        idle_timeout: 2h
        half_close_timeout: 10s
        close_timeout: 3s
        backlog: 65535
        relay_proxy_protocol_header: true
        proxy_protocol_version: 1
        proxy_protocol_unique_id: true
        max_connections: 5
        max_connections_per_client: 2
        rate_limit: {per_client: 20/s, burst: 40, per_route: 2000/s}
        splice: false
        reuse_port: false
        proxy_protocol: {mode: mixed, trusted_proxies: [127.0.0.1], timeout: 1s, detect_timeout: 100ms}
        acl: {default: allow, deny: ["ip:10.1.2.3"]}
      inherits: {scheme: tcp6, bind: "::1", host: "2001:db8::1", port: ":443"}
      datagrams:
        scheme: udp
        bind: "::"
        host: "2001:db8::53"
        port: "53:53"
        udp_cleanup_interval: 2s
        max_udp_sessions: 1048576
        rate_limit: {per_client: 1/h}
        acl: {allow_local: false, deny: ["fc00::/7"]}
"""

#: Configurations whose round trip is checked; the example file is added below.
CONFIGS = {
    "every field": EVERY_FIELD,
    "defaults and overrides": """
        defaults: {connect_timeout: 250ms, retries: 2, splice: true, max_udp_sessions: 9, rate_limit: {per_route: 600/m}}
        entrypoint: {proxy_protocol: {mode: required, trusted_proxies: ["::/0", 0.0.0.0/0]}}
        routes:
          plain: {scheme: tcp, port: "22"}
          own: {scheme: tcp4, port: "2222:22", retries: 0, splice: false, proxy_protocol: {mode: disabled}}
          udp: {scheme: udp6, bind: "::1", host: "::1", port: "5353:53"}
    """,
    "status on a unix socket": """
        status: {listen: "unix:/run/streamrelay.sock"}
        routes: {a: {scheme: tcp, port: "1:2"}}
    """,
    "status on IPv4, odd durations": """
        shutdown_timeout: 0.0001
        status: {listen: "127.0.0.1:0"}
        routes:
          a: {scheme: tcp4, port: "1:2", idle_timeout: 1.0e3, close_timeout: 4.1, half_close_timeout: 1m0.5s}
    """,
    "names and hosts YAML could misread": """
        routes:
          "1.0e5": {scheme: tcp4, host: "1.0e5", port: "1:2"}
          "on": {scheme: tcp4, host: "null", port: "3:4"}
          80: {scheme: tcp4, host: "0x1", port: "5:6"}
          "-.5": {scheme: tcp4, host: "1e5", port: "7:8"}
    """,
    "several targets, checks and the resolver": """
        resolver: {servers: ["127.0.0.1:5353", "::1"], dns_min_ttl: 500ms, dns_max_ttl: 1m, dns_max_stale: 10m}
        routes:
          web:
            scheme: tcp
            bind: "::1"
            port: 8443
            targets:
              - "app1.example.net:8443"
              - {host: "2001:db8::7", port: 443, weight: 3}
              - {host: 192.0.2.9, port: 8443, backup: true}
            load_balance: {mode: iphash}
            max_fails: 3
            fail_timeout: 30s
          ssh: {scheme: tcp4, host: 10.0.0.5, port: "2222:22", healthcheck: {interval: 2s, timeout: 1s, retries: 2, expect: "SSH-2.0"}}
          redis:
            scheme: tcp4
            port: 6380
            targets: ["10.0.0.6:6379", "10.0.0.7:6379"]
            load_balance: {mode: leastconn, sticky: true, sticky_max_age: 10m}
            healthcheck: {send: "PING\\r\\n", expect: "+PONG"}
          dns: {scheme: udp4, port: 53, targets: ["10.0.0.53:53", "10.0.0.54:53"], healthcheck: {send: "\\0\\x01", disable: true}}
    """,
    "port ranges": """
        routes:
          game: {scheme: tcp, port: "27015-27030:37015-37030", max_connections: 100}
          turn: {scheme: udp4, host: 10.0.0.9, port: "49152-53247:3478", reuse_port: true}
          one: {scheme: tcp4, port: "6000-6000:7000-7000"}
    """,
}


def config_texts() -> Iterator[tuple[str, str]]:
    yield "etc/routes.yml", (ROOT / "etc" / "routes.yml").read_text()
    for name, text in CONFIGS.items():
        yield name, textwrap.dedent(text)


@pytest.mark.parametrize("text", [text for _, text in config_texts()], ids=[name for name, _ in config_texts()])
def test_dump_loads_back_to_the_same_config(tmp_path: Path, text: str) -> None:
    original = load_config(str(write_config(tmp_path, text)))
    written = dump(original)
    loaded = parse_config(written, "dumped.yml")
    assert loaded.path == "dumped.yml"
    assert dataclasses.replace(loaded, path=original.path) == original
    assert dump(loaded) == written


def test_dump_fills_in_every_default() -> None:
    config = parse_config("routes:\n  web: {scheme: tcp4, port: '8080:80'}\n  dns: {scheme: udp, port: '53'}\n")
    assert yaml.safe_load(dump(config)) == {
        "shutdown_timeout": "10s",
        "routes": {
            "web": {
                "scheme": "tcp4", "bind": "0.0.0.0", "host": "localhost", "port": "8080:80",
                "connect_timeout": "5s", "retries": 1, "idle_timeout": "0s", "half_close_timeout": "30s",
                "close_timeout": "10s", "backlog": 4096, "relay_proxy_protocol_header": False,
                "proxy_protocol_version": 2, "proxy_protocol_unique_id": False, "max_connections": 0,
                "max_connections_per_client": 0, "splice": "auto", "reuse_port": False, "tls_hello_timeout": "5s",
                "proxy_protocol": {"mode": "disabled", "trusted_proxies": [], "timeout": "3s", "detect_timeout": "300ms"},
                "acl": {"default": "allow", "allow_local": False, "allow": [], "deny": []},
            },
            "dns": {
                "scheme": "udp", "bind": "::", "host": "localhost", "port": "0:53",
                "proxy_protocol_unique_id": False,
                "udp_idle_timeout": "5m", "udp_cleanup_interval": "1m", "max_udp_sessions": 4096,
                "udp_proxy_protocol": False, "udp_max_replies": 0, "udp_max_requests": 0, "reuse_port": False,
                "proxy_protocol": {"mode": "disabled", "trusted_proxies": [], "timeout": "3s", "detect_timeout": "300ms"},
                "acl": {"default": "allow", "allow_local": False, "allow": [], "deny": []},
            },
        },
    }


def test_route_lines() -> None:
    config = parse_config(textwrap.dedent(EVERY_FIELD))
    assert [describe(route) for route in config.routes] == [
        "every: tcp4 127.0.0.1:1 -> example.net:65535 (proxy_protocol mixed, relay_proxy_protocol_header v1,"
        " acl allow_local 1 deny default allow, max_connections 5, max_connections_per_client 2,"
        " rate_limit per_client 20/s burst 40 per_route 2000/s, splice false)",
        "inherits: tcp6 [::1]:0 -> [2001:db8::1]:443 (proxy_protocol optional,"
        " acl 1 deny 4 allow default deny, max_connections 10, reuse_port, splice auto)",
        "datagrams: udp [::]:53 -> [2001:db8::53]:53 (acl 1 deny default allow, max_udp_sessions 1048576,"
        " rate_limit per_client 1/h burst 1, reuse_port)",
    ]


def run(*command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A command run to completion against the source tree."""
    return subprocess.run(
        command, capture_output=True, text=True, cwd=cwd, timeout=DEADLINE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def twistd_check(config: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return run(TWISTD, "-n", "--pidfile=", "streamrelay", "--check", *flags, "--config", str(config), cwd=config.parent)


def module_check(config: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "streamrelay", "check", str(config), *flags, cwd=config.parent)


def start(config: Path) -> subprocess.CompletedProcess[str]:
    """What an operator starting the relay on C{config} would see (for files that cannot start)."""
    return run(TWISTD, "-n", "--pidfile=", "streamrelay", "--config", str(config), cwd=config.parent)


CHECKS: list[Callable[..., subprocess.CompletedProcess[str]]] = [twistd_check, module_check]
BOTH = pytest.mark.parametrize("check", CHECKS, ids=["twistd", "python -m"])


def test_check_binds_nothing(tmp_path: Path) -> None:
    """Both checks pass on ports a socket of the test holds, which the start then fails to bind."""
    with socket.socket() as held_tcp, socket.socket(type=socket.SOCK_DGRAM) as held_udp:
        held_tcp.bind(("127.0.0.1", 0))
        held_tcp.listen()
        held_udp.bind(("127.0.0.1", 0))
        tcp_port, udp_port = held_tcp.getsockname()[1], held_udp.getsockname()[1]
        config = write_config(tmp_path, textwrap.dedent(f"""
            routes:
              web: {{scheme: tcp4, bind: 127.0.0.1, host: 127.0.0.1, port: "{tcp_port}:80"}}
              dns: {{scheme: udp4, bind: 127.0.0.1, host: 127.0.0.1, port: "{udp_port}:53"}}
        """))
        lines = (
            f"web: tcp4 127.0.0.1:{tcp_port} -> 127.0.0.1:80 (splice auto)\n"
            f"dns: udp4 127.0.0.1:{udp_port} -> 127.0.0.1:53 (max_udp_sessions 4096)\n"
        )
        for check in CHECKS:
            result = check(config)
            assert (result.returncode, result.stdout, result.stderr) == (0, lines, "")
        started = start(config)
    assert started.returncode == 1
    assert f"route 'web': cannot listen on tcp 127.0.0.1:{tcp_port}" in started.stdout


def test_twistd_check_neither_daemonizes_nor_logs(tmp_path: Path) -> None:
    """Without -n and with twistd's default pid and log files: the directory stays as it was."""
    config = write_config(tmp_path, "routes:\n  a: {scheme: tcp4, port: '2222:22'}\n")
    result = run(TWISTD, "streamrelay", "--check", "--config", config.name, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "a: tcp4 0.0.0.0:2222 -> localhost:22 (splice auto)\n")
    assert sorted(os.listdir(tmp_path)) == ["routes.yml"]


@pytest.mark.parametrize(
    "text",
    ["routes:\n  a: {scheme: tcp9, port: '1:2'}\n", "routes:\n  a: {scheme: tcp4, port: '1:2'\n"],
    ids=["field", "YAML syntax"],
)
def test_invalid_file_gives_the_start_message(tmp_path: Path, text: str) -> None:
    config = write_config(tmp_path, text)
    started = start(config)
    assert started.returncode == 1 and started.stderr.startswith(f"streamrelay: {config}: ")
    for check in CHECKS:
        result = check(config)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", started.stderr)


@BOTH
def test_missing_file_gives_the_start_message(tmp_path: Path, check: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    result = check(tmp_path / "absent.yml")
    assert result.returncode == 1
    assert result.stderr.startswith(f"streamrelay: {tmp_path / 'absent.yml'}: cannot read the route file: ")


@BOTH
def test_dump_prints_the_effective_configuration(tmp_path: Path, check: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    config_path = write_config(tmp_path, textwrap.dedent(EVERY_FIELD))
    result = check(config_path, "--dump")
    original = load_config(str(config_path))
    assert (result.returncode, result.stdout, result.stderr) == (0, dump(original), "")
    assert dataclasses.replace(parse_config(result.stdout), path=original.path) == original


def test_help(tmp_path: Path) -> None:
    module = run(sys.executable, "-m", "streamrelay", "--help", cwd=tmp_path)
    assert module.returncode == 0 and "check" in module.stdout
    no_command = run(sys.executable, "-m", "streamrelay", cwd=tmp_path)
    assert no_command.returncode == 2 and "COMMAND" in no_command.stderr
    twistd = run(TWISTD, "streamrelay", "--help", cwd=tmp_path)
    assert twistd.returncode == 0 and "--check" in twistd.stdout and "--dump" in twistd.stdout


def test_report_is_one_line_per_route_or_the_yaml() -> None:
    config = load_config(str(ROOT / "etc" / "routes.yml"))
    assert report(config).splitlines() == [describe(route) for route in config.routes]
    assert report(config, as_yaml=True) == dump(config)
