"""
Port ranges: one route listening on many ports, TCP and UDP, each port
relayed to the target port at the same offset or all of them to one.

End to end against real C{twistd} processes (the targets are one TCP and one
UDP server per port in a single asyncio loop, each answering with its own
port number), plus the configuration errors, and the cost of starting 1,000
ports of each protocol measured in-process on the real reactor.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from streamrelay import load_config, make_service, parse_config
from streamrelay.config import ConfigError
from tests.harness import DEADLINE, Relay, Target, poll, recv_exactly, run_twistd, write_config
from tests.test_activation import ActivatedRelay, taken
from tests.test_reload import hup
from tests.test_udp import UDPEcho
from tests.test_udp_proxy import HeaderTarget, encode, exchange

# -- helpers


def _free(port: int) -> bool:
    return not taken(socket.SOCK_STREAM, port) and not taken(socket.SOCK_DGRAM, port)


def free_range(count: int) -> int:
    """
    The first of C{count} consecutive ports of 127.0.0.1 free for TCP and
    UDP, below Linux's ephemeral range (where other tests' ports come from).
    """
    for _ in range(100):
        base = random.randrange(10000, 32768 - count)
        if all(_free(port) for port in range(base, base + count)):
            return base
    raise AssertionError(f"no {count} consecutive free ports")


class _TaggedEcho(asyncio.DatagramProtocol):
    """Answers each datagram with C{PORT:} and the datagram."""

    def __init__(self, port: int) -> None:
        self.tag = b"%d:" % port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(self.tag + data, addr)


class RangeTargets:
    """
    A TCP and a UDP server on each of C{ports} (127.0.0.1), in one asyncio
    loop on a thread of its own.  Each names its port first: TCP writes
    C{PORT\\n}, then echoes; UDP answers C{PORT:} and the datagram.
    """

    def __init__(self, ports: range) -> None:
        self.ports = ports
        self.tasks: set[asyncio.Task[None]] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self.loop).result(DEADLINE)

    async def _open(self) -> None:
        self.servers = [await asyncio.start_server(partial(self._serve, port), "127.0.0.1", port) for port in self.ports]
        self.endpoints = [
            (await self.loop.create_datagram_endpoint(partial(_TaggedEcho, port), local_addr=("127.0.0.1", port)))[0]
            for port in self.ports
        ]

    async def _serve(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            writer.write(b"%d\n" % port)
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.tasks.discard(task)

    def close(self) -> None:
        async def shutdown() -> None:
            for server in self.servers:
                server.close()
            for endpoint in self.endpoints:
                endpoint.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(DEADLINE)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE)
        self.loop.close()

    def __enter__(self) -> RangeTargets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def route(name: str, scheme: str, port: str, **fields: object) -> str:
    extra = "".join(f", {key}: {value}" for key, value in fields.items())
    return f"  {name}: {{scheme: {scheme}, bind: 127.0.0.1, host: 127.0.0.1, port: '{port}'{extra}}}\n"


def started(path: Path, *args: str) -> Relay:
    """
    A relay on C{path}, once every route has logged C{start} (the harness's
    own wait reads each route's C{listen} as one port, which a range is not).
    """
    relay = Relay(path, *args, wait=False)
    relay.wait_for("start", count=len(load_config(str(path)).routes))
    return relay


def tcp_reaches(port: int, target: int) -> bool:
    """A connection to C{port} is relayed to C{target}, both ways."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(b"ping")
        tag = b"%d\n" % target
        return recv_exactly(sock, len(tag) + 4) == tag + b"ping"


def udp_answers(sock: socket.socket, ports: Iterable[int]) -> dict[int, bytes]:
    """Send C{hi} to each of C{ports} from C{sock}; the answers by the port they came from."""
    sent = 0
    for port in ports:
        sock.sendto(b"hi", ("127.0.0.1", port))
        sent += 1
    answers: dict[int, bytes] = {}
    while len(answers) < sent:
        data, sender = sock.recvfrom(100)
        answers[sender[1]] = data
    return answers


def udp_client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(DEADLINE)
    return sock


# -- relaying


def test_100_tcp_ports_reach_the_targets_at_their_offsets(tmp_path: Path) -> None:
    base = free_range(200)
    listen, targets = range(base, base + 100), range(base + 100, base + 200)
    with RangeTargets(targets):
        path = write_config(tmp_path, "routes:\n" + route("game", "tcp4", f"{base}-{base + 99}:{base + 100}-{base + 199}"))
        with started(path) as relay:
            [start] = relay.actions("start")
            assert (start["listen"], start["dst"]) == (f"127.0.0.1:{base}-{base + 99}", f"127.0.0.1:{base + 100}-{base + 199}")
            for port, target in zip(listen, targets):
                assert tcp_reaches(port, target)
            closed = relay.wait_for("closed", count=100)
            assert sorted(event["port"] for event in closed) == list(listen)  # the event names the port
            assert {event["listen"] for event in closed} == {start["listen"]}  # one route, one set of events


def test_100_udp_ports_answer_through_the_port_written_to(tmp_path: Path) -> None:
    base = free_range(200)
    listen, targets = range(base, base + 100), range(base + 100, base + 200)
    with RangeTargets(targets), udp_client() as sock:
        path = write_config(tmp_path, "routes:\n" + route("rtp", "udp4", f"{base}-{base + 99}:{base + 100}-{base + 199}"))
        with started(path) as relay:
            # One client socket writes to every port: a session per port, each
            # answered from the port it wrote to, by the target at its offset.
            for _ in range(2):
                assert udp_answers(sock, listen) == {port: b"%d:hi" % target for port, target in zip(listen, targets)}
            relay.stop()  # sessions close at shutdown, each logged
        closed = relay.actions("session-closed")
        assert sorted(event["port"] for event in closed) == list(listen)
        assert {(event["reason"], event["datagrams_up"], event["datagrams_down"]) for event in closed} == {("shutdown", 2, 2)}


def test_a_range_to_one_target_port(tmp_path: Path) -> None:
    base = free_range(5)
    ports = range(base, base + 5)
    with Target() as target, UDPEcho() as echo, udp_client() as sock:
        text = "routes:\n" + route("t", "tcp4", f"{base}-{base + 4}:{target.port}") + route("u", "udp4", f"{base}-{base + 4}:{echo.port}")
        with started(write_config(tmp_path, text)) as relay:
            assert {event["dst"] for event in relay.actions("start")} == {f"127.0.0.1:{target.port}", f"127.0.0.1:{echo.port}"}
            for port in ports:
                with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as client:
                    client.sendall(b"ping")
                    assert recv_exactly(client, 4) == b"ping"
            assert udp_answers(sock, ports) == {port: b"hi" for port in ports}
            assert target.accepted == 5 and len(echo.received) == 5
            assert sorted(event["port"] for event in relay.wait_for("closed", count=5)) == list(ports)


def test_a_proxy_header_does_not_choose_the_offset(tmp_path: Path) -> None:
    """The header's destination port (here 20001) is the client's business: the socket's port picks the target."""
    base = free_range(6)
    with RangeTargets(range(base + 3, base + 6)):
        text = "routes:\n" + route(
            "r", "tcp4", f"{base}-{base + 2}:{base + 3}-{base + 5}", proxy_protocol="{mode: required, trusted_proxies: [127.0.0.1]}",
        )
        with started(write_config(tmp_path, text)) as relay:
            with socket.create_connection(("127.0.0.1", base + 1), timeout=DEADLINE) as sock:
                sock.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.1 5000 20001\r\nping")
                tag = b"%d\n" % (base + 4)
                assert recv_exactly(sock, len(tag) + 4) == tag + b"ping"
            [closed] = relay.wait_for("closed")
            assert (closed["client"], closed["port"]) == ("192.0.2.7:5000", base + 1)


def test_udp_ranges_read_and_write_proxy_headers(tmp_path: Path) -> None:
    base = free_range(4)
    target = HeaderTarget()
    with target, udp_client() as sock:
        text = "routes:\n" + route(
            "inbound", "udp4", f"{base}-{base + 1}:{target.port}", udp_proxy_protocol="true",
            proxy_protocol="{mode: required, trusted_proxies: [127.0.0.1]}",
        ) + route("outbound", "udp4", f"{base + 2}-{base + 3}:{target.port}", udp_proxy_protocol="true")
        with started(write_config(tmp_path, text)) as relay:
            header = encode(("192.0.2.7", 5000), ("198.51.100.1", 53))
            for port in (base, base + 1):  # one real client, two ports: two sessions, each answered from its port
                sock.sendto(header + b"hi", ("127.0.0.1", port))
                assert sock.recvfrom(100) == (b"hi", ("127.0.0.1", port))
            sock.sendto(b"no header", ("127.0.0.1", base))
            assert relay.wait_for("rejected")[0]["header_error"] == "missing"
            for port in (base + 2, base + 3):
                assert exchange(sock, port, b"hi") == b"hi"
            assert [(source, destination) for source, destination, _, _ in target.headers] == [
                (("192.0.2.7", 5000), ("198.51.100.1", 53)), (("192.0.2.7", 5000), ("198.51.100.1", 53)),
                (sock.getsockname(), ("127.0.0.1", base + 2)), (sock.getsockname(), ("127.0.0.1", base + 3)),
            ]


def test_max_connections_counts_across_the_range(tmp_path: Path) -> None:
    base = free_range(3)
    with Target() as target:
        path = write_config(tmp_path, "routes:\n" + route("r", "tcp4", f"{base}-{base + 2}:{target.port}", max_connections=2))
        with started(path, "--log-level", "debug") as relay:
            first = [socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) for port in (base, base + 1)]
            for sock in first:
                sock.sendall(b"ping")
                assert recv_exactly(sock, 4) == b"ping"
            with socket.create_connection(("127.0.0.1", base + 2), timeout=0.5) as third:
                third.sendall(b"wait")
                with pytest.raises(socket.timeout):
                    third.recv(4)  # in the third port's backlog: the route is full
                assert len(relay.actions("accept")) == 2 and target.accepted == 2
                first.pop().close()
                third.settimeout(DEADLINE)
                assert recv_exactly(third, 4) == b"wait"
            first.pop().close()


# -- binding and reloading


def test_binding_is_all_or_nothing(tmp_path: Path) -> None:
    base = free_range(10)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base + 6))
        squatter.listen()
        path = write_config(tmp_path, "routes:\n" + route("r", "tcp4", f"{base}-{base + 9}:{base + 9}"))
        result = run_twistd(path)
        assert result.returncode != 0
        assert f"route 'r': cannot listen on tcp 127.0.0.1:{base + 6}: [Errno 98] Address already in use" in result.stdout + result.stderr

        # At a reload the relay goes on, and closes the ports it bound before the one that failed.
        with Target() as target:
            path.write_text("routes:\n" + route("other", "tcp4", f":{target.port}"))
            with started(path) as relay:
                event = hup(relay, "routes:\n" + route("other", "tcp4", f":{target.port}") + route("r", "tcp4", f"{base}-{base + 9}:1"))
                assert f"cannot listen on tcp 127.0.0.1:{base + 6}" in event["failed"]
                assert not any(taken(socket.SOCK_STREAM, port) for port in range(base, base + 6))
                assert relay.actions("start", route="r") == []


def test_a_changed_range_is_bound_before_the_old_one_closes(tmp_path: Path) -> None:
    base = free_range(40)
    old, new, targets = range(base, base + 10), range(base + 10, base + 20), range(base + 20, base + 30)
    with RangeTargets(targets), udp_client() as sock:
        def routes(ports: range) -> str:
            span = f"{ports[0]}-{ports[-1]}:{targets[0]}-{targets[-1]}"
            return "routes:\n" + route("t", "tcp4", span) + route("u", "udp4", span)

        path = write_config(tmp_path, routes(old))
        with started(path) as relay:
            assert tcp_reaches(old[3], targets[3])
            event = hup(relay, routes(new))
            assert (event["changed"], event["failed"]) == ("t (listen_port), u (listen_port)", "")
            for port, target in zip(new, targets):
                assert tcp_reaches(port, target)
            assert udp_answers(sock, new) == {port: b"%d:hi" % target for port, target in zip(new, targets)}
            poll(lambda: not any(taken(kind, port) for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM) for port in old))


def test_a_range_that_overlaps_the_old_one_rebinds_with_reuse_port(tmp_path: Path) -> None:
    base = free_range(20)
    targets = range(base + 10, base + 20)
    with RangeTargets(targets):
        def routes(low: int, reuse_port: str) -> str:
            return "routes:\n" + route("t", "tcp4", f"{low}-{low + 4}:{targets[0]}-{targets[4]}", reuse_port=reuse_port)

        with started(write_config(tmp_path, routes(base, "false"))) as relay:
            refused = hup(relay, routes(base + 2, "false"))
            assert f"cannot listen on tcp 127.0.0.1:{base + 2}: [Errno 98] Address already in use" in refused["failed"]
            assert tcp_reaches(base, targets[0])  # the old range goes on

        with started(write_config(tmp_path, routes(base, "true"))) as relay:
            assert hup(relay, routes(base + 2, "true"))["failed"] == ""
            for offset in range(5):
                assert tcp_reaches(base + 2 + offset, targets[offset])
            poll(lambda: not any(taken(socket.SOCK_STREAM, port) for port in (base, base + 1)))


def test_systemd_passes_sockets_for_some_ports_of_a_range(tmp_path: Path) -> None:
    base = free_range(6)
    with RangeTargets(range(base + 3, base + 6)):
        path = write_config(tmp_path, "routes:\n" + route("r", "tcp4", f"{base}-{base + 2}:{base + 3}-{base + 5}"))
        passed = ("-l", f"127.0.0.1:{base}", "-l", f"127.0.0.1:{base + 2}", f"--fdname=r@{base}:r@{base + 2}")
        with ActivatedRelay(path, *passed) as relay:
            poll(lambda: taken(socket.SOCK_STREAM, base))
            assert tcp_reaches(base, base + 3)  # starts twistd, which relays from the adopted socket
            [start] = relay.wait_for("start")
            assert (start["inherited"], start["adopted"]) == (True, 2)
            assert tcp_reaches(base + 1, base + 4)  # bound by the relay itself
            assert tcp_reaches(base + 2, base + 5)


def test_a_passed_socket_on_another_port_stops_the_start(tmp_path: Path) -> None:
    base = free_range(3)
    path = write_config(tmp_path, "routes:\n" + route("r", "tcp4", f"{base + 1}-{base + 2}:1"))
    with ActivatedRelay(path, "-l", f"127.0.0.1:{base}", f"--fdname=r@{base + 2}") as relay:
        poll(lambda: taken(socket.SOCK_STREAM, base))
        socket.create_connection(("127.0.0.1", base), timeout=DEADLINE).close()  # starts twistd
        assert relay.process.wait(DEADLINE) != 0
        assert f"the socket systemd passed as 'r@{base + 2}' is bound to port {base}" in "".join(relay.lines) + relay.stderr()


# -- configuration


def routes_text(*routes: tuple[str, str]) -> str:
    return "routes:\n" + "".join(f"  {name}: {{{body}}}\n" for name, body in routes)


@pytest.mark.parametrize("text, message", [
    (routes_text(("r", "scheme: tcp, port: '10000-10099:20000-20098'")),
     "route 'r': field 'port': expected \"LOW-HIGH:TARGET\" or \"LOW-HIGH:LOW-HIGH\" port ranges, e.g. "
     "\"10000-10099:20000-20099\": a target range as long as the listening one (100 ports, not 99) or one target port"),
    (routes_text(("r", "scheme: udp, port: '10099-10000:53'")),
     "a listening range from its low port to its high one, not 10099-10000"),
    (routes_text(("r", "scheme: tcp, port: '0-99:53'")), "a listening port from 1 to 65535, found '0-99:53'"),
    (routes_text(("r", "scheme: tcp, port: '100-199:0-99'")), "a target port from 1 to 65535"),
    (routes_text(("r", "scheme: tcp, port: '10000-14096:3478'")),
     "at most 4096 listening ports per route (this range has 4097)"),
    (routes_text(("r", "scheme: tcp, port: '10000:20000-20099'")), "a listening range LOW-HIGH, not '10000'"),
    (routes_text(("a", "scheme: tcp, port: '10000-10099:3478'"), ("b", "scheme: tcp4, bind: 127.0.0.1, port: '10050-10149:3478'")),
     "route 'b': field 'port': tcp 127.0.0.1:10050-10149 clashes with route 'a' listening on [::]:10000-10099 (both take port 10050)"),
    (routes_text(("a", "scheme: udp4, port: '10000-10099:3478'"), ("b", "scheme: udp4, port: '10099:53'")),
     "route 'b': field 'port': udp 0.0.0.0:10099 clashes with route 'a' listening on 0.0.0.0:10000-10099 (both take port 10099)"),
    (routes_text(("g", "scheme: tcp, port: '10000-10099', gateway: {secret_env: HOME, allow_targets: [any]}")),
     "route 'g': field 'port': expected a listening port from 0 to 65535 (port ranges are not supported with gateway or targets)"),
    (routes_text(("t", "scheme: tcp, port: '10000-10099', targets: ['a.example:1', 'b.example:1']")),
     "route 't': field 'port': expected a listening port from 0 to 65535 (port ranges are not supported with gateway or targets)"),
    (routes_text(("s", "scheme: tcp, port: '10000-10099:443', sni: [a.example], tls_passthrough: true")),
     "route 's': field 'port': port ranges are not supported on routes with sni"),
    (routes_text(("h", "scheme: tcp, port: '10000-10099:20000-20099', healthcheck: {}")),
     "route 'h': field 'healthcheck': not supported with a range of target ports (it checks one)"),
])
def test_range_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(text, "routes.yml")
    assert message in str(error.value)


def test_ranges_that_do_not_clash() -> None:
    config = parse_config(routes_text(
        ("tcp", "scheme: tcp4, bind: 127.0.0.1, port: '10000-14095:3478'"),  # the cap itself
        ("udp", "scheme: udp4, port: '10000-14095:10000-14095'"),  # another protocol
        ("next", "scheme: tcp4, port: '14096-14096:20000-20000'"),  # a range of one is a port
        ("loopback", "scheme: tcp4, bind: 127.0.0.2, port: '10000-10001:1'"),
    ))
    tcp, udp, single, _ = config.routes
    assert (tcp.port_count, tcp.target_range, tcp.target_port_for(14095)) == (4096, False, 3478)
    assert (udp.target_range, udp.target_port_for(10007), udp.dst) == (True, 10007, "localhost:10000-14095")
    assert (single.listen, single.port_count, single.target_range) == ("0.0.0.0:14096", 1, False)


def test_overlapping_ranges_stop_twistd_naming_both_routes(tmp_path: Path) -> None:
    path = write_config(tmp_path, routes_text(("a", "scheme: udp, port: '10000-10009:53'"), ("b", "scheme: udp, port: '10005-10006:53'")))
    result = run_twistd(path)
    assert result.returncode != 0
    assert "route 'b': field 'port': udp [::]:10005-10006 clashes with route 'a' listening on [::]:10000-10009" in result.stderr


# -- the cost of 1,000 ports


def test_1000_tcp_and_1000_udp_ports_start_and_answer(tmp_path: Path) -> None:
    base = free_range(1000)
    ports = range(base, base + 1000)
    span = f"{base}-{base + 999}"
    with Target() as target, UDPEcho() as echo, udp_client() as sock:
        text = "routes:\n" + route("t", "tcp4", f"{span}:{target.port}") + route("u", "udp4", f"{span}:{echo.port}")
        with started(write_config(tmp_path, text)) as relay:
            assert [event["listen"] for event in relay.actions("start")] == [f"127.0.0.1:{span}"] * 2
            for port in ports[::10]:  # a sample of the TCP ports (each costs a pair), every UDP port
                with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as client:
                    client.sendall(b"ping")
                    assert recv_exactly(client, 4) == b"ping"
            assert udp_answers(sock, ports) == {port: b"hi" for port in ports}


class StartCost(TestCase):
    """Starting ports in-process on the real reactor, where the time and the timers can be read."""

    def test_1000_tcp_and_1000_udp_ports_start_fast_with_one_timer(self) -> None:
        base = free_range(1000)
        span = f"{base}-{base + 999}:9"
        service = make_service(parse_config("routes:\n" + route("t", "tcp4", span) + route("u", "udp4", span)))
        timers = len(reactor.getDelayedCalls())
        began = time.perf_counter()
        service.startService()
        elapsed = time.perf_counter() - began
        self.addCleanup(service.stopService)
        assert elapsed < 0.5, f"{elapsed:.3f}s to bind 2,000 ports"
        assert len(reactor.getDelayedCalls()) - timers == 1  # the UDP route's one sweep, no timer per port
        assert all(taken(kind, port) for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM) for port in (base, base + 999))
