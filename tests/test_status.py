"""
The status endpoint end to end: a real C{twistd} relay with a C{status}
block, real traffic through it, then what C{/metrics}, C{/status.json}, the
page (rendered by headless Chromium) and C{/healthz} say about it; its ACL,
a unix socket, a port in use; and, in memory, health with a route down.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import MemoryReactorClock

from streamrelay import make_service, parse_config
from streamrelay.status import StatusService
from tests.harness import DEADLINE, Relay, Target, connect, poll, recv_exactly, run_twistd, tcp_route, write_config
from tests.test_access import refused_from
from tests.test_udp import UDPEcho, udp_route

#: The real client that the PROXY header claims, unlike the socket's peer.
REAL_CLIENT = "192.0.2.7:4242"
PROXY_HEADER = b"PROXY TCP4 192.0.2.7 127.0.0.1 4242 80\r\n"
LOCAL_ONLY = '{default: deny, allow_local: false, allow: ["ip:127.0.0.1"]}'


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=DEADLINE)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(self.path)


def get(listen: str, path: str, source: str | None = None) -> tuple[int, str, str]:
    """The status code, content type and body of a GET to the status endpoint at C{listen}."""
    if listen.startswith("unix:"):
        conn: http.client.HTTPConnection = UnixHTTPConnection(listen[len("unix:"):])
    else:
        host, port = listen.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=DEADLINE,
                                          source_address=(source, 0) if source else None)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("content-type", ""), response.read().decode()
    finally:
        conn.close()


def status_listen(relay: Relay) -> str:
    """The status endpoint's address, from its C{status-start} event."""
    return relay.wait_for("status-start")[0]["listen"]


def metrics(listen: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of C{/metrics}, by name and labels."""
    code, content_type, body = get(listen, "/metrics")
    assert code == 200 and content_type.startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body) for sample in family.samples
    }


def route_samples(samples: dict, route: str, protocol: str) -> dict[str, Any]:
    """One route's samples: by name, or by name and the extra label's value."""
    found: dict[str, Any] = {}
    for (name, labels), value in samples.items():
        labels = dict(labels)
        if labels.pop("route", None) != route or labels.pop("protocol") != protocol:
            continue
        if labels:
            [extra] = labels.values()
            found.setdefault(name, {})[extra] = value
        else:
            found[name] = value
    return found


def snapshot(listen: str, query: str = "") -> dict[str, Any]:
    code, content_type, body = get(listen, f"/status.json{query}")
    assert code == 200 and content_type == "application/json", body
    return json.loads(body)


def echoed(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


@dataclass
class Busy:
    """A relay that has done known things, and the connections it still holds."""

    relay: Relay
    listen: str
    target: Target
    held: list[socket.socket]
    proxied: socket.socket
    spliced: socket.socket
    udp: socket.socket


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Busy]:
    """
    Three echo pairs opened and closed, two held, one client denied by the
    ACL; one pair held behind a PROXY header, one header refused; one dial
    refused; one spliced pair held; one UDP session with two datagrams each
    way.
    """
    with Target() as target, UDPEcho() as udp_target:
        nothing = socket.socket()
        nothing.bind(("127.0.0.1", 0))
        dead_port = nothing.getsockname()[1]
        nothing.close()
        path = write_config(tmp_path_factory.mktemp("busy"), (
            'status: {listen: "127.0.0.1:0"}\nroutes:\n'
            + tcp_route(target.port, "echo", acl=LOCAL_ONLY)
            + tcp_route(target.port, "proxied", proxy_protocol="{mode: required, trusted_proxies: [127.0.0.1]}")
            + tcp_route(dead_port, "dead")
            + tcp_route(target.port, "spliced", splice="true")
            + udp_route("dns", udp_target.port)
        ))
        with Relay(path) as relay:
            ports = relay.ports
            for _ in range(3):
                with connect(ports["echo"]) as sock:
                    assert echoed(sock, b"x" * 100) == b"x" * 100
            relay.wait_for("closed", count=3, route="echo")
            held = [connect(ports["echo"]) for _ in range(2)]
            for sock in held:
                assert echoed(sock, b"y" * 10) == b"y" * 10
            assert refused_from("127.0.0.2", ports["echo"])
            relay.wait_for("denied", route="echo")
            proxied = connect(ports["proxied"])
            proxied.sendall(PROXY_HEADER)
            assert echoed(proxied, b"hello") == b"hello"
            with connect(ports["proxied"]) as sock:
                sock.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 04242 80\r\n")  # a leading zero: invalid
                relay.wait_for("rejected", route="proxied")
            with connect(ports["dead"]):
                relay.wait_for("dial-failed", route="dead")
            spliced = connect(ports["spliced"])
            assert echoed(spliced, b"s" * 20) == b"s" * 20
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.settimeout(DEADLINE)
            udp.connect(("127.0.0.1", ports["dns"]))
            for payload in (b"a" * 7, b"b" * 9):
                udp.send(payload)
                assert udp.recv(100) == payload
            yield Busy(relay, status_listen(relay), target, held, proxied, spliced, udp)
            for sock in [*held, proxied, spliced, udp]:
                sock.close()


def test_metrics_count_what_the_relay_did(busy: Busy) -> None:
    samples = metrics(busy.listen)
    t = "streamrelay_"
    assert route_samples(samples, "echo", "tcp") == {
        t + "connections_accepted_total": 6,  # the denied one too
        t + "connections_closed_total": {"done": 3, "denied": 1},
        t + "refused_total": {
            "acl": 1, "per-client": 0, "proxy-header": 0, "hook": 0, "gateway-line": 0, "gateway-ban": 0, "rate": 0,
            "tls-handshake": 0, "sni-no-route": 0, "sni-bad-hello": 0, "sni-hello-timeout": 0, "sni-full": 0,
        },
        t + "bytes_up_total": 320, t + "bytes_down_total": 320,  # the held pairs' bytes included
        t + "pairs_active": 2, t + "pairs_splicing": 0, t + "pairs_spliced_total": 0,
        t + "connections_awaiting_header": 0,
    }
    proxied = route_samples(samples, "proxied", "tcp")
    assert proxied[t + "connections_accepted_total"] == 1
    assert proxied[t + "proxy_header_errors_total"] == {"invalid": 1}
    assert proxied[t + "refused_total"]["proxy-header"] == 1
    assert proxied[t + "pairs_active"] == 1
    dead = route_samples(samples, "dead", "tcp")
    assert dead[t + "dial_failures_total"] == {"refused": 1}
    assert dead[t + "connections_closed_total"] == {"dial failed": 1}
    spliced = route_samples(samples, "spliced", "tcp")
    assert spliced[t + "pairs_splicing"] == spliced[t + "pairs_spliced_total"] == 1
    assert spliced[t + "bytes_down_total"] == 20
    assert route_samples(samples, "dns", "udp") == {
        t + "udp_sessions_active": 1, t + "udp_sessions_opened_total": 1,
        t + "refused_total": {"acl": 0, "limit": 0, "hook": 0, "rate": 0},
        t + "bytes_up_total": 16, t + "bytes_down_total": 16,
        t + "datagrams_up_total": 2, t + "datagrams_down_total": 2, t + "datagrams_dropped_total": 0,
        t + "datagrams_oversized_total": 0,
    }
    assert samples[(t + "reloads_total", frozenset({("result", "failed")}))] == 0
    assert samples[(t + "log_lines_dropped_total", frozenset())] == 0
    assert samples[("process_cpu_seconds_total", frozenset())] > 0
    assert samples[("process_open_fds", frozenset())] > 10


def test_status_json_lists_the_real_client_of_a_live_pair(busy: Busy) -> None:
    routes = {route["name"]: route for route in snapshot(busy.listen)["routes"]}
    assert list(routes) == ["echo", "proxied", "dead", "spliced", "dns"]
    proxied = routes["proxied"]
    assert proxied["settings"]["proxy_protocol"] == "required"
    [pair] = proxied["connections"]
    local = f"127.0.0.1:{busy.proxied.getsockname()[1]}"
    assert pair["client"] == REAL_CLIENT and pair["peer"] == local
    assert pair["target"] == f"127.0.0.1:{busy.target.port}"
    assert (pair["state"], pair["path"], pair["bytes_up"], pair["bytes_down"]) == ("relaying", "twisted", 5, 5)
    assert pair["age"] >= 0 and pair["idle"] is None  # no idle_timeout: nothing tracks it
    [pair] = routes["spliced"]["connections"]
    assert (pair["path"], pair["target"], pair["bytes_up"]) == ("splice", f"127.0.0.1:{busy.target.port}", 20)
    [session] = routes["dns"]["connections"]
    assert session["client"] == f"127.0.0.1:{busy.udp.getsockname()[1]}"
    assert (session["datagrams_up"], session["bytes_down"], session["state"]) == (2, 16, "relaying")


def test_status_json_filters_by_route_and_limits_the_list(busy: Busy) -> None:
    assert [route["name"] for route in snapshot(busy.listen, "?route=proxied")["routes"]] == ["proxied"]
    [echo] = snapshot(busy.listen, "?route=echo&limit=1")["routes"]
    assert echo["active"] == 2
    [oldest] = echo["connections"]
    assert oldest["client"] == f"127.0.0.1:{busy.held[0].getsockname()[1]}"
    assert get(busy.listen, "/status.json?route=nope")[0] == 404
    assert get(busy.listen, "/status.json?limit=-1")[0] == 400


def test_page_shows_the_real_client_in_chromium(busy: Busy, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "headless Chromium is needed: apt-get install chromium"
    url = f"http://{busy.listen}/"
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=60, check=True).stdout
    assert f'<td class="addr client">{REAL_CLIENT}</td>' in dom
    assert "<title>streamrelay status</title>" in dom and "echo: 2 live" in dom
    screenshot = tmp_path / "status-page.png"
    subprocess.run([*base, f"--screenshot={screenshot}", "--window-size=1200,800", url],
                   capture_output=True, timeout=60, check=True)
    assert screenshot.stat().st_size > 10_000
    print(f"status page screenshot: {screenshot}")


def test_each_target_of_a_route_is_listed_with_its_state_load_and_failures(tmp_path: Path) -> None:
    """
    A route over a dead target, a live one and a live backup: the dead one's
    refused dial takes it out (max_fails 1), the pairs go to the live one,
    and the checks (100 ms apart, down only after 15 s of failures) run.
    """
    with Target(host="127.0.0.2") as live, Target(host="127.0.0.3") as backup, socket.socket() as unused:
        unused.bind(("127.0.0.4", 0))
        dead, live_at, backup_at = f"127.0.0.4:{unused.getsockname()[1]}", f"127.0.0.2:{live.port}", f"127.0.0.3:{backup.port}"
        path = write_config(tmp_path, (
            'status: {listen: "127.0.0.1:0"}\nroutes:\n  pool:\n    scheme: tcp4\n    bind: 127.0.0.1\n    port: 0\n'
            f'    targets: ["{dead}", "{live_at}", {{host: 127.0.0.3, port: {backup.port}, backup: true}}]\n'
            "    healthcheck: {interval: 100ms}\n"
        ))
        with Relay(path) as relay:
            listen = status_listen(relay)
            held = [connect(relay.ports["pool"]) for _ in range(2)]
            for sock in held:
                assert echoed(sock, b"z") == b"z"

            def targets() -> list[dict[str, Any]]:
                [route] = snapshot(listen, "?route=pool")["routes"]
                return route["targets"]

            listed = poll(lambda: all(t["last_check"] is not None for t in targets()) and targets())
            samples = route_samples(metrics(listen), "pool", "tcp")
            code, _, page = get(listen, "/?route=pool")
            for sock in held:
                sock.close()
    assert [t.pop("last_check") < 1 for t in listed] == [True] * 3
    [refused] = {t.pop("last_error") for t in listed} - {None}
    assert "refused" in refused
    assert listed == [
        {"target": dead, "weight": 1, "backup": False, "up": True, "eligible": False, "active": 0, "picked": 1,
         "failures": 1},
        {"target": live_at, "weight": 1, "backup": False, "up": True, "eligible": True, "active": 2, "picked": 2,
         "failures": 0},
        {"target": backup_at, "weight": 1, "backup": True, "up": True, "eligible": True, "active": 0, "picked": 0,
         "failures": 0},
    ]
    t = "streamrelay_"
    assert samples[t + "target_up"] == {dead: 0, live_at: 1, backup_at: 1}
    assert samples[t + "target_active"] == {dead: 0, live_at: 2, backup_at: 0}
    assert samples[t + "target_failures_total"] == {dead: 1, live_at: 0, backup_at: 0}
    assert code == 200 and "pool: 2 of 3 targets up" in page
    assert f'<td class="addr">{dead}</td><td class="num">1</td><td>primary</td><td class="bad">out</td>' in page


def test_healthz_says_503_while_draining(tmp_path: Path) -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(b"z" * 65536)
            await writer.drain()

    with Target(flood) as target:
        path = write_config(tmp_path, 'status: {listen: "127.0.0.1:0"}\nroutes:\n' + tcp_route(target.port, "flood"))
        with Relay(path) as relay:
            listen = status_listen(relay)
            assert get(listen, "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
            client = connect(relay.ports["flood"])  # never reads: the relay holds bytes it cannot flush

            def bytes_down() -> int:
                [route] = snapshot(listen, "?route=flood")["routes"]
                return route["connections"][0]["bytes_down"] if route["connections"] else 0

            previous = [-1]

            def stalled() -> bool:  # backpressure: nothing moved since the last look
                now = bytes_down()
                before, previous[0] = previous[0], now
                return now > 0 and now == before

            poll(stalled, interval=0.2)
            relay.process.send_signal(signal.SIGTERM)
            poll(lambda: get(listen, "/healthz") == (503, "text/plain; charset=utf-8", "draining\n"))
            client.close()  # the pair goes; then the endpoint, then the process
            assert relay.process.wait(DEADLINE) == -signal.SIGTERM  # twistd re-raises the signal
            relay.wait_for("status-stop", listen=listen)
            with pytest.raises(ConnectionRefusedError):
                get(listen, "/healthz")


def test_acl_refuses_other_clients(tmp_path: Path) -> None:
    with Target() as target:
        path = write_config(tmp_path, (
            'status: {listen: "127.0.0.1:0", acl: {default: deny, allow_local: false, allow: ["ip:127.0.0.2"]}}\n'
            "routes:\n" + tcp_route(target.port, "r")
        ))
        with Relay(path) as relay:
            listen = status_listen(relay)
            assert get(listen, "/healthz", source="127.0.0.2")[0] == 200
            with pytest.raises(ConnectionError):  # closed unanswered
                get(listen, "/healthz", source="127.0.0.1")
            [denied] = relay.wait_for("status-denied")
            assert denied["client"].startswith("127.0.0.1:") and denied["rule"] == "default deny"


def test_unix_socket_endpoint(tmp_path: Path) -> None:
    sock_path = tmp_path / "status.sock"
    with Target() as target:
        config = f'status: {{listen: "unix:{sock_path}"}}\nroutes:\n' + tcp_route(target.port, "r")
        path = write_config(tmp_path, config)
        with Relay(path) as relay:
            listen = status_listen(relay)
            assert listen == f"unix:{sock_path}"
            assert get(listen, "/healthz")[0] == 200
            assert route_samples(metrics(listen), "r", "tcp")["streamrelay_pairs_active"] == 0


def test_status_port_in_use_stops_the_start(tmp_path: Path) -> None:
    with Target() as target, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = f'status: {{listen: "127.0.0.1:{port}"}}\nroutes:\n' + tcp_route(target.port, "r")
        path = write_config(tmp_path, config)
        result = run_twistd(path)
    assert result.returncode != 0
    assert f"status: cannot listen on tcp:{port}:interface=127.0.0.1: [Errno 98]" in result.stdout + result.stderr


def test_health_names_the_routes_not_listening() -> None:
    config = parse_config(
        'status: {listen: "127.0.0.1:0"}\nroutes:\n'
        "  a: {scheme: tcp4, bind: 127.0.0.1, port: ':1'}\n  b: {scheme: tcp4, bind: 127.0.0.1, port: ':2'}\n"
    )
    relay = make_service(config, reactor=MemoryReactorClock())
    status = relay.getServiceNamed("status")
    assert isinstance(status, StatusService)
    relay.startService()
    assert status.health() == (200, "ok")
    relay.getServiceNamed("route:b").unbind()
    assert status.health() == (503, "not listening: b")
    relay.stopService()
    assert status.health() == (503, "draining")
