"""
Several targets per route, end to end: a real C{twistd streamrelay} in front
of real targets on loopback addresses 127.0.0.x, on the real clock.  Each
target greets a connection with its address, so a client sees which one
the relay picked; health checks run every 100 ms so that a test waits a
second at most for a target to go down or come back.  Host names are served
by a C{twisted.names} server in a process of its own.  Then, in memory, a
route's pool across reloads, and the configuration's errors.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DomainError
from twisted.names.server import DNSServerFactory

from streamrelay.config import ConfigError, load_config, parse_config
from streamrelay.dnscache import DNSCache
from streamrelay.events import RouteEvents
from streamrelay.proxyproto import build_v2
from streamrelay.targets import TargetPool
from tests.harness import DEADLINE, Relay, Target, connect_from, echo, poll, write_config
from tests.test_reload import hup
from tests.test_udp import UDPEcho

ROOT = Path(__file__).resolve().parent.parent

#: The checks' settings in these tests: a killed target is down within
#: interval × retries, plus one interval for the check in flight.
CHECK = "{interval: 100ms, timeout: 500ms, retries: 2}"
DOWN_WITHIN = 0.1 * 2 + 0.1
#: What the relay may take beyond that (a loaded machine, the event's way to the test).
SLACK = 1.0


class Named(Target):
    """
    A target on C{host} that sends C{greeting} (default: its address and a
    newline) to each connection, then echoes.  On C{port} if given: a target
    restarted where it was, or the same port on two addresses.
    """

    def __init__(self, host: str, port: int = 0, greeting: bytes | None = None) -> None:
        self.wanted_port = port
        self.greeting = f"{host}\n".encode() if greeting is None else greeting
        super().__init__(self.greet, host)

    def _run(self, started: threading.Event) -> None:  # Target's, on the port asked for
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, self.host, self.wanted_port))
        started.set()
        self.loop.run_forever()

    async def greet(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.greeting)
        await writer.drain()
        await echo(reader, writer)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        """Stop it (a killed target); again at the end of its C{with} does nothing."""
        if not self.loop.is_closed():
            super().close()


def entry(target: Named, **fields: object) -> str:
    """C{target} as an entry of a route's C{targets} (YAML flow): C{host:port}, or a mapping with C{fields}."""
    if not fields:
        return f'"{target.address}"'
    mapping = {"host": target.host, "port": target.port, **fields}
    return "{" + ", ".join(f"{key}: {value}" for key, value in mapping.items()) + "}"


def balanced(name: str, targets: list[str], scheme: str = "tcp4", **fields: object) -> str:
    """A route on 127.0.0.1, on a port the system picks, over C{targets}."""
    lines = [f"scheme: {scheme}", "bind: 127.0.0.1", "port: 0", f"targets: [{', '.join(targets)}]"]
    lines += [f"{key}: {value}" for key, value in fields.items()]
    return f"  {name}:\n" + "".join(f"    {line}\n" for line in lines)


def start(directory: Path, routes: str, top: str = "") -> Relay:
    """A relay on C{routes}, with C{top}-level blocks before them."""
    return Relay(write_config(directory, top + "routes:\n" + routes))


def greeted(sock: socket.socket, header: bytes = b"") -> str:
    """
    The greeting of the target that C{sock}, a connection through the
    relay, reaches (after C{header}, a PROXY header), once its echo has
    proved the pair works: a refusal or a reset fails the test.
    """
    sock.sendall(header + b"ping\n")
    received = b""
    while received.count(b"\n") < 2:
        chunk = sock.recv(4096)
        assert chunk, f"closed after {received!r}"
        received += chunk
    greeting, echoed, _ = received.split(b"\n", 2)
    assert echoed == b"ping"
    return greeting.decode().rstrip("\r")


def reached(port: int, header: bytes = b"") -> str:
    """Which target a new connection reaches; closed once it has answered."""
    with connect_from("127.0.0.1", port) as sock:
        return greeted(sock, header)


def dead_port(host: str, kind: int = socket.SOCK_STREAM) -> int:
    """A port on C{host} that nothing listens on (TCP: refused; UDP: port unreachable)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def went_down(relay: Relay, target: Named) -> None:
    """C{target} was just killed: the relay says it is down within L{DOWN_WITHIN} (and the slack)."""
    relay.wait_for("target-down", target=target.address, timeout=DOWN_WITHIN + SLACK)


# -- choosing


def test_weighted_roundrobin_over_6000_connections(tmp_path: Path) -> None:
    with Named("127.0.0.2") as one, Named("127.0.0.3") as two, Named("127.0.0.4") as three:
        targets = [entry(t, weight=w) for t, w in ((one, 1), (two, 2), (three, 3))]
        with start(tmp_path, balanced("web", targets)) as relay, ThreadPoolExecutor(4) as clients:
            got = Counter(clients.map(lambda _: reached(relay.ports["web"]), range(6000)))  # 4 at a time
        for target, weight in ((one, 1), (two, 2), (three, 3)):
            assert got[target.host] == target.accepted
            assert abs(got[target.host] - 1000 * weight) <= 50 * weight, got


def test_leastconn_sends_new_pairs_to_the_target_with_the_fewest(tmp_path: Path) -> None:
    with Named("127.0.0.2") as a, Named("127.0.0.3") as b, Named("127.0.0.4") as c:
        routes = balanced("db", [entry(t) for t in (a, b, c)], load_balance="{mode: leastconn}")
        with start(tmp_path, routes) as relay:
            port = relay.ports["db"]
            held: dict[str, list[socket.socket]] = {a.host: [], b.host: [], c.host: []}

            def hold() -> str:
                sock = connect_from("127.0.0.1", port)
                host = greeted(sock)
                held[host].append(sock)
                return host

            assert Counter(hold() for _ in range(6)) == {a.host: 2, b.host: 2, c.host: 2}
            for sock in held[b.host]:
                sock.close()
            relay.wait_for("closed", count=2, target=b.address)
            assert [hold(), hold()] == [b.host, b.host]
            held[a.host].pop().close()
            relay.wait_for("closed", count=1, target=a.address)
            assert hold() == a.host
            for socks in held.values():
                for sock in socks:
                    sock.close()


def test_iphash_keeps_each_client_on_one_target_and_a_removal_moves_only_its_clients(tmp_path: Path) -> None:
    """200 real clients behind a trusted proxy (PROXY v2 headers), then a reload that removes one of 4 targets."""
    clients = [(f"198.51.100.{n}", 1000 + n) for n in range(1, 201)]
    targets = [Named(f"127.0.0.{n}") for n in (2, 3, 4, 5)]
    try:
        def route(kept: list[Named]) -> str:
            return "routes:\n" + balanced(
                "web", [entry(t) for t in kept], load_balance="{mode: iphash}",
                proxy_protocol="{mode: required, trusted_proxies: [127.0.0.1]}",
            )

        path = write_config(tmp_path, route(targets))
        with Relay(path) as relay:
            port = relay.ports["web"]

            def placement() -> list[str]:
                return [reached(port, header=build_v2(client, ("127.0.0.1", port))) for client in clients]

            first = placement()
            assert placement() == first
            assert all(count >= 20 for count in Counter(first).values()) and len(set(first)) == 4, Counter(first)
            removed = targets[1]
            assert hup(relay, route([t for t in targets if t is not removed]))["changed"].startswith("web")
            after = placement()
        for before, now in zip(first, after):
            assert now == before if before != removed.host else now != removed.host
    finally:
        for target in targets:
            target.close()


# -- health


def test_a_killed_target_goes_down_gets_nothing_and_comes_back_after_a_restart(tmp_path: Path) -> None:
    with Named("127.0.0.2") as a, Named("127.0.0.3") as b:
        with start(tmp_path, balanced("web", [entry(a), entry(b)], healthcheck=CHECK)) as relay:
            port = relay.ports["web"]
            assert {reached(port) for _ in range(4)} == {a.host, b.host}
            b.close()
            went_down(relay, b)
            assert {reached(port) for _ in range(10)} == {a.host}
            assert relay.actions("target-failed") == []  # never dialed: no dial failed
            with Named(b.host, b.port) as restarted:
                relay.wait_for("target-up", target=b.address, timeout=0.1 + SLACK)
                assert b.host in {reached(port) for _ in range(4)}
            assert restarted.accepted > 1  # checks, and pairs


def test_backups_take_over_only_when_every_primary_is_down(tmp_path: Path) -> None:
    with Named("127.0.0.2") as a, Named("127.0.0.3") as b, Named("127.0.0.4") as backup:
        targets = [entry(a), entry(b), entry(backup, backup="true")]
        with start(tmp_path, balanced("web", targets, healthcheck=CHECK)) as relay:
            port = relay.ports["web"]
            assert Counter(reached(port) for _ in range(6)) == {a.host: 3, b.host: 3}
            a.close()
            went_down(relay, a)
            assert {reached(port) for _ in range(4)} == {b.host}
            b.close()
            went_down(relay, b)
            assert {reached(port) for _ in range(4)} == {backup.host}
            with Named(a.host, a.port):
                relay.wait_for("target-up", target=a.address, timeout=0.1 + SLACK)
                assert {reached(port) for _ in range(4)} == {a.host}


def test_a_failed_dial_fails_over_without_a_client_noticing(tmp_path: Path) -> None:
    """No active checks: passive ones alone (max_fails), the dead target tried again every fail_timeout."""
    with Named("127.0.0.2") as live:
        dead = f"127.0.0.3:{dead_port('127.0.0.3')}"
        routes = balanced("web", [f'"{dead}"', entry(live)], fail_timeout="200ms")
        with start(tmp_path, routes) as relay:
            port = relay.ports["web"]
            assert {reached(port) for _ in range(1000)} == {live.host}
            closed = relay.wait_for("closed", count=1000)
        assert {event["target"] for event in closed} == {live.address}
        assert relay.actions("dial-failed") == []
        failed = relay.actions("target-failed", target=dead)
        assert len(failed) > 1 and "refused" in failed[0]["reason"]  # out, then out again after each trial


def test_a_greeting_check_marks_a_target_that_never_greets_down(tmp_path: Path) -> None:
    with Named("127.0.0.2", greeting=b"SSH-2.0-OpenSSH_9.6\r\n") as ssh, Named("127.0.0.3", greeting=b"") as mute:
        check = '{interval: 100ms, timeout: 300ms, retries: 1, expect: "SSH-2.0"}'
        with start(tmp_path, balanced("ssh", [entry(ssh), entry(mute)], healthcheck=check)) as relay:
            [down] = relay.wait_for("target-down", target=mute.address, timeout=0.1 + 0.3 + SLACK)
            assert down["reason"] == "no reply within 0.3s"
            assert {reached(relay.ports["ssh"]) for _ in range(4)} == {"SSH-2.0-OpenSSH_9.6"}
            assert ssh.accepted > 4  # its checks too, all passed:
            assert relay.actions("target-down", target=ssh.address) == []


def test_udp_checks_mark_a_closed_port_down_and_sessions_go_to_the_live_one(tmp_path: Path) -> None:
    with UDPEcho("127.0.0.2") as live:
        dead = f"127.0.0.3:{dead_port('127.0.0.3', socket.SOCK_DGRAM)}"
        check = "{interval: 100ms, timeout: 300ms, retries: 1}"
        routes = balanced("dns", [f'"127.0.0.2:{live.port}"', f'"{dead}"'], scheme="udp4", healthcheck=check)
        with start(tmp_path, routes) as relay:
            [down] = relay.wait_for("target-down", target=dead, timeout=0.1 + SLACK)
            assert down["reason"] == "port unreachable"
            clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(10)]
            for n, client in enumerate(clients):
                with client:
                    client.settimeout(DEADLINE)
                    client.connect(("127.0.0.1", relay.ports["dns"]))
                    client.send(b"query %d" % n)
                    assert client.recv(100) == b"query %d" % n
            assert relay.actions("target-down", target=f"127.0.0.2:{live.port}") == []
        sessions = {sender for sender, data in live.received if data.startswith(b"query")}
        assert len(sessions) == 10


# -- host names that follow DNS


class FileZone(ResolverBase):
    """One name's A record, read from a file at each query (TTL 1 s); no answer at all while the file is empty."""

    def __init__(self, name: str, answer: Path) -> None:
        super().__init__()
        self.name = name
        self.answer = answer

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        address = self.answer.read_text().strip()
        if not address:
            return Deferred()  # silence: the client times out
        if name.decode() != self.name:
            return fail(DomainError(name))
        records = [dns.RRHeader(name, dns.A, dns.IN, 1, dns.Record_A(address, 1))] if type == dns.A else []
        return succeed((records, [], []))


def serve_dns(name: str, answer: str) -> None:
    """Run a C{twisted.names} server on 127.0.0.1 UDP for L{FileZone}; its port goes to standard output."""
    from twisted.internet import reactor

    protocol = dns.DNSDatagramProtocol(DNSServerFactory(authorities=[FileZone(name, Path(answer))]))
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()


class DNSServer:
    """L{serve_dns} in a process of its own (the test process's reactor belongs to trial)."""

    def __init__(self, directory: Path, name: str, address: str) -> None:
        self.file = directory / "answer"
        self.answer(address)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.test_balancing", name, str(self.file)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def answer(self, address: str) -> None:
        """Answer with C{address} from the next query on; C{""}: stop answering."""
        self.file.write_text(address)

    def __enter__(self) -> DNSServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(DEADLINE)
        assert self.process.stdout is not None
        self.process.stdout.close()


def test_a_host_name_follows_its_dns_answer_and_outlives_its_server(tmp_path: Path) -> None:
    with Named("127.0.0.2") as old, DNSServer(tmp_path, "svc.test", old.host) as server:
        with Named("127.0.0.3", old.port) as new:
            top = f'resolver: {{servers: ["127.0.0.1:{server.port}"], dns_min_ttl: 100ms}}\n'
            with start(tmp_path, balanced("svc", [f'"svc.test:{old.port}"']), top=top) as relay:
                port = relay.ports["svc"]
                assert reached(port) == old.host
                server.answer(new.host)
                poll(lambda: reached(port) == new.host, timeout=1.0 + SLACK)  # the TTL, and the slack
                relay.wait_for("targets", added=new.address, removed=old.address)
                server.answer("")
                [stale] = relay.wait_for("dns-stale", host="svc.test", timeout=1.0 + 4.0 + SLACK)
                assert stale["addresses"] == new.host and "no answer from" in stale["reason"]
                assert {reached(port) for _ in range(3)} == {new.host}


# -- a route's pool across reloads, in memory


def pool_of(routes: str, hosts: Path) -> tuple[TargetPool, MemoryReactorClock]:
    """The pool of the first route in C{routes}, its names answered from the hosts file C{hosts}."""
    clock = MemoryReactorClock()
    route = parse_config("routes:\n" + routes).routes[0]
    pool = TargetPool(route, clock, RouteEvents(route), DNSCache(clock, hosts=str(hosts)))
    clock.advance(0)  # the names' first answers
    return pool, clock


def reconfigure(pool: TargetPool, routes: str) -> None:
    """What a reload that changes the route but not its address does."""
    pool.configure(parse_config("routes:\n" + routes).routes[0])


def test_a_reload_keeps_the_targets_of_the_names_it_keeps(tmp_path: Path) -> None:
    hosts = write_config(tmp_path, "127.0.0.2 app.test\n127.0.0.3 app.test\n127.0.0.4 api.test\n", "hosts")
    pool, _ = pool_of(balanced("app", ['"app.test:80"', '"api.test:80"']), hosts)
    targets = pool.balancer.targets
    assert [t.host for t in targets] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert [pool.pick("192.0.2.1", []) for _ in range(3)] == targets
    reconfigure(pool, balanced("app", ["{host: app.test, port: 80, weight: 2}", '"api.test:80"']))
    assert pool.balancer.targets == targets  # the same objects, with their counts
    assert [(t.weight, t.picked, t.active) for t in targets] == [(2, 1, 1), (2, 1, 1), (1, 1, 1)]


def test_removing_the_checks_brings_the_targets_they_took_out_back(tmp_path: Path) -> None:
    routes = balanced("app", ['"127.0.0.2:80"', '"127.0.0.3:80"'], healthcheck="{interval: 1s}")
    pool, clock = pool_of(routes, tmp_path / "hosts")
    [a, b] = pool.balancer.targets
    b.up = False  # as the checker does after retries failures
    assert pool.pick("192.0.2.1", []) is a and pool.pick("192.0.2.1", []) is a
    reconfigure(pool, balanced("app", ['"127.0.0.2:80"', '"127.0.0.3:80"']))
    assert pool.checker is None and b.up
    assert {pool.pick("192.0.2.1", []) for _ in range(2)} == {a, b}
    assert clock.getDelayedCalls() == []  # no check left to come


# -- configuration


@pytest.mark.parametrize(("fields", "field", "message"), [
    ('host: 127.0.0.2\n    targets: ["127.0.0.3:80"]', "targets", "a route has either host (and a target port) or targets"),
    ('targets: [{host: 127.0.0.2, port: 80, backup: true}]', "targets", "every target is a backup"),
    ('targets: ["127.0.0.2:80", {host: 127.0.0.3, port: 80, weight: 0}]', "targets[1].weight", "expected"),
    ("host: 127.0.0.2\n    load_balance: {mode: leastconn}", "load_balance", "only for routes with targets"),
], ids=["host and targets", "all backups", "bad weight", "load_balance without targets"])
def test_config_errors_name_the_file_route_and_field(tmp_path: Path, fields: str, field: str, message: str) -> None:
    path = write_config(tmp_path, f"routes:\n  web:\n    scheme: tcp4\n    port: 8080\n    {fields}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(str(path))
    assert str(raised.value).startswith(f"{path}: route 'web': field '{field}': {message}")


if __name__ == "__main__":
    serve_dns(*sys.argv[1:])
