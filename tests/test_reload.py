"""
Reloads: SIGHUP to a real C{twistd streamrelay} process with real clients
(the first part), and C{RelayService.reload} in-process with the real
reactor, as a C{.tac} file would call it (the second).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from streamrelay import Hooks, load_config, make_service, parse_config
from streamrelay.service import RelayService, RouteService
from tests import harness
from tests.harness import Relay, Target, connect, connect_from, poll, recv_all, write_config
from tests.test_access import echoes, refused, refused_from
from tests.test_compat import accept_queue
from tests.test_hooks import until
from tests.test_reuse_port import free_port
from tests.test_udp import UDPEcho

# -- end to end: SIGHUP


def route(name: str, target: int, listen: int | str = "", **fields: object) -> str:
    """A tcp4 route on 127.0.0.1 (on port C{listen}, or one the system picks) to C{target}."""
    extra = "".join(f"    {k}: {v}\n" for k, v in {**harness.ROUTE_DEFAULTS, **fields}.items())
    return (
        f"  {name}:\n    scheme: tcp4\n    bind: 127.0.0.1\n    host: 127.0.0.1\n"
        f"    port: '{listen}:{target}'\n{extra}"
    )


def udp_route(name: str, target: int, listen: int | str = "") -> str:
    """A udp4 route on 127.0.0.1 (on port C{listen}, or one the system picks) to C{target}."""
    return f"  {name}: {{scheme: udp4, bind: 127.0.0.1, host: 127.0.0.1, port: '{listen}:{target}'}}\n"


def hup(relay: Relay, text: str | None = None, action: str = "reload") -> dict[str, Any]:
    """Write C{text} as the route file (if given), send SIGHUP, and return the C{action} event it causes."""
    if text is not None:
        relay.config_path.write_text(text)
    count = len(relay.actions(action))
    relay.process.send_signal(signal.SIGHUP)
    return relay.wait_for(action, count=count + 1)[-1]


def test_an_unchanged_route_streams_64_mib_across_five_reloads(tmp_path: Path, relay_paths: str) -> None:
    payload = os.urandom(64 << 20)
    piece = len(payload) // 6

    def config(i: int) -> str:
        return "routes:\n" + route("stream", target.port) + route("other", target.port, idle_timeout=f"{i + 1}s")

    with Target() as target, Relay(write_config(tmp_path, config(0))) as relay:
        with connect(relay.ports["stream"]) as sock:
            received: list[bytes] = []
            reader = threading.Thread(target=lambda: received.append(recv_all(sock)))
            reader.start()
            for i in range(5):
                sock.sendall(payload[i * piece:(i + 1) * piece])
                event = hup(relay, config(i + 1))
                assert (event["unchanged"], event["changed"]) == ("stream", "other (idle_timeout)")
            sock.sendall(payload[5 * piece:])
            sock.shutdown(socket.SHUT_WR)
            reader.join(harness.DEADLINE)
        assert hashlib.sha256(received[0]).digest() == hashlib.sha256(payload).digest()
        [closed] = relay.wait_for("closed", route="stream")
        assert (closed["reason"], closed["bytes_up"], closed["bytes_down"]) == ("done", len(payload), len(payload))


def test_an_acl_change_refuses_no_allowed_client_and_applies_to_new_connections(tmp_path: Path) -> None:
    def config(denied: str) -> str:
        return "routes:\n" + route("r", target.port, acl=f"{{allow_local: false, default: allow, deny: [{denied}]}}")

    with Target() as target, Relay(write_config(tmp_path, config("192.0.2.1"))) as relay:
        port = relay.ports["r"]
        held = connect_from("127.0.0.2", port)
        assert echoes(held)
        failures: list[BaseException] = []
        done = [0]
        stop = threading.Event()

        def connect_in_a_loop() -> None:
            while not stop.is_set():
                try:
                    with connect_from("127.0.0.1", port) as sock:
                        assert echoes(sock)
                    done[0] += 1
                except (OSError, AssertionError) as e:
                    failures.append(e)

        loop = threading.Thread(target=connect_in_a_loop)
        loop.start()
        try:
            for denied in ("127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3", "127.0.0.2"):
                before = done[0]
                assert hup(relay, config(denied))["changed"] == "r (acl)"
                poll(lambda: done[0] >= before + 20)
        finally:
            stop.set()
            loop.join(harness.DEADLINE)
        assert failures == [] and done[0] >= 100
        assert echoes(held)  # began under the old ACL: keeps it
        assert refused_from("127.0.0.2", port)
        assert relay.wait_for("denied")[0]["client"].startswith("127.0.0.2:")
        held.close()


def test_a_broken_file_changes_nothing(tmp_path: Path) -> None:
    with Target() as first, Target() as second:
        path = write_config(tmp_path, "routes:\n" + route("r", first.port))
        with Relay(path) as relay, connect(relay.ports["r"]) as held:
            assert echoes(held)
            broken = "routes:\n" + route("r", second.port) + route("new", second.port, max_connections="lots")
            failed = hup(relay, broken, action="reload-failed")
            assert failed["level"] == "error" and failed["path"] == str(path)
            assert failed["error"].startswith(f"{path}: route 'new': field 'max_connections': ")
            assert echoes(held)
            with connect(relay.ports["r"]) as sock:
                assert echoes(sock)
            assert (first.accepted, second.accepted) == (2, 0)  # still the old target
            assert not relay.actions("reload") and not relay.actions("start", route="new")

            assert hup(relay, "routes:\n" + route("r", second.port))["changed"] == "r (target_port)"
            with connect(relay.ports["r"]) as sock:
                assert echoes(sock)
            assert (first.accepted, second.accepted) == (2, 1)


def test_a_removed_routes_pair_is_drained_then_aborted_at_the_deadline(tmp_path: Path) -> None:
    with Target() as target:
        both = "shutdown_timeout: 1s\nroutes:\n" + route("keep", target.port) + route("gone", target.port)
        with Relay(write_config(tmp_path, both)) as relay, connect(relay.ports["gone"]) as held:
            assert echoes(held)
            reloaded = time.monotonic()
            event = hup(relay, "shutdown_timeout: 1s\nroutes:\n" + route("keep", target.port))
            assert (event["removed"], event["unchanged"]) == ("gone", "keep")
            assert relay.actions("stop", route="gone")
            with pytest.raises(ConnectionRefusedError):
                connect(relay.ports["gone"])
            assert echoes(held)  # draining: still relayed
            [abort] = relay.wait_for("abort", route="gone")
            assert abort["reason"] == "drain timeout"
            assert refused(held)  # reset, or closed with nothing more
            assert time.monotonic() - reloaded >= 1.0
            [closed] = relay.wait_for("closed", route="gone")
            assert closed["reason"] == "drain timeout"
            with connect(relay.ports["keep"]) as sock:
                assert echoes(sock)


def test_moved_added_renamed_and_unbindable_routes(tmp_path: Path) -> None:
    moved_to, taken = free_port(), socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with taken, Target() as target:
        path = write_config(tmp_path, "routes:\n" + route("a", target.port) + route("b", target.port))
        with Relay(path) as relay, connect(relay.ports["a"]) as held:
            assert echoes(held)
            old_a, old_b = relay.ports["a"], relay.ports["b"]
            event = hup(relay, "routes:\n" + route("a", target.port, moved_to) + route("c", target.port, old_b)
                        + route("d", target.port, taken.getsockname()[1]))
            assert event["level"] == "warn"
            assert (event["added"], event["removed"], event["changed"]) == ("c", "b", "a (listen_port)")
            assert event["failed"].startswith("route 'd': cannot listen on tcp 127.0.0.1:")
            assert "Address already in use" in event["failed"]
            for port in (moved_to, old_b):
                with connect(port) as sock:
                    assert echoes(sock)
            with pytest.raises(ConnectionRefusedError):
                connect(old_a)
            assert echoes(held)  # accepted by the old socket: drained, not dropped
            assert relay.actions("start", route="a", listen=f"127.0.0.1:{moved_to}")
            assert relay.actions("stop", route="a", listen=f"127.0.0.1:{old_a}")

            taken.close()  # the next reload binds the route that failed
            assert hup(relay)["added"] == "d"


def test_udp_sessions_keep_their_target(tmp_path: Path) -> None:
    with UDPEcho() as first, UDPEcho() as second:
        path = write_config(tmp_path, "routes:\n" + udp_route("u", first.port))
        with Relay(path) as relay:
            port = relay.ports["u"]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as old, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as new:
                for sock in (old, new):
                    sock.settimeout(harness.DEADLINE)
                    sock.connect(("127.0.0.1", port))
                old.send(b"before")
                assert old.recv(100) == b"before"
                assert hup(relay, "routes:\n" + udp_route("u", second.port))["changed"] == "u (target_port)"
                old.send(b"after")
                new.send(b"new")
                assert (old.recv(100), new.recv(100)) == (b"after", b"new")
            assert [data for _, data in first.received] == [b"before", b"after"]
            assert [data for _, data in second.received] == [b"new"]

            moved = free_port()
            assert hup(relay, "routes:\n" + udp_route("u", second.port, moved))["changed"] == "u (listen_port)"
            assert {e["reason"] for e in relay.wait_for("session-closed", count=2)} == {"reload"}
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(harness.DEADLINE)
                sock.connect(("127.0.0.1", moved))
                sock.send(b"moved")
                assert sock.recv(100) == b"moved"


# -- in-process: RelayService.reload


class Tagged(Protocol):
    """A target that answers each chunk with its tag and the chunk."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.factory.tag + data)


class Peer(Protocol):
    """A client whose replies queue up."""

    def __init__(self) -> None:
        self.replies: DeferredQueue[bytes] = DeferredQueue()
        self.gone: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.replies.put(data)

    def connectionLost(self, reason: object) -> None:
        self.gone.callback(None)

    async def ask(self, data: bytes) -> bytes:
        self.transport.write(data)
        return await self.replies.get()


class ReloadTests(TestCase):
    async def target(self, tag: bytes) -> int:
        factory = Factory.forProtocol(Tagged)
        factory.tag = tag
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def config(self, target: int, **fields: object) -> Any:
        extra = "".join(f", {k}: {v}" for k, v in fields.items())
        return parse_config(
            f"routes:\n  r: {{scheme: tcp4, bind: 127.0.0.1, host: 127.0.0.1, port: ':{target}'{extra}}}\n"
        )

    def start(self, config: Any, hooks: dict[str, Hooks] | None = None) -> tuple[RelayService, RouteService]:
        service = make_service(config, hooks=hooks)
        service.startService()
        self.addCleanup(service.stopService)
        route = service.getServiceNamed("route:r")
        assert isinstance(route, RouteService)
        return service, route

    async def client(self, route: RouteService) -> Peer:
        peer = Peer()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", route.port.getHost().port), peer)
        self.addCleanup(lambda: peer.transport.abortConnection() if peer.transport.connected else None)
        return peer

    async def test_new_settings_reach_new_connections_only(self) -> None:
        a, b = await self.target(b"A"), await self.target(b"B")
        service, route = self.start(self.config(a))
        stats, refusals, port, loaded_at = route.stats, route.refusals, route.port, service.loaded_at
        old = await self.client(route)
        self.assertEqual(await old.ask(b"1"), b"A1")
        old_pair = next(iter(route.factory.pairs))

        result = await service.reload(self.config(b))
        self.assertEqual((result.changed, result.error), ({"r": ("target_port",)}, ""))
        self.assertEqual(service.reloads, {"succeeded": 1})
        self.assertGreater(service.loaded_at, loaded_at)
        self.assertIs(service.getServiceNamed("route:r"), route)
        self.assertEqual((route.stats, route.refusals, route.port), (stats, refusals, port))

        new = await self.client(route)
        self.assertEqual(await new.ask(b"2"), b"B2")
        self.assertEqual(await old.ask(b"3"), b"A3")
        self.assertNotIn(old_pair, route.factory.pairs)  # the newest generation's
        self.assertIn(old_pair, route.pairs())
        self.assertEqual(len(route.pairs()), 2)

    async def test_limits_count_the_connections_of_every_generation(self) -> None:
        a, b = await self.target(b"A"), await self.target(b"B")
        service, route = self.start(self.config(a, max_connections_per_client=1))
        first = await self.client(route)
        self.assertEqual(await first.ask(b"1"), b"A1")
        await service.reload(self.config(b, max_connections_per_client=1, max_connections=1))
        second = await self.client(route)  # the port stopped accepting: it waits in the backlog
        await until(lambda: accept_queue(route.port.socket) == 1)
        first.transport.loseConnection()
        self.assertEqual(await second.ask(b"2"), b"B2")  # accepted once the first pair is gone
        await service.reload(self.config(b, max_connections_per_client=1, idle_timeout=60))
        third = await self.client(route)
        await until(lambda: third.gone.called)  # the second, of an older generation, still counts
        self.assertEqual(route.refusals.counts, {"limited": 1})

    async def test_backlog_changes_on_the_same_socket(self) -> None:
        service, route = self.start(self.config(await self.target(b"A"), backlog=64))
        port = route.port
        tcpi_sacked = 28  # a listening socket's accept queue size in struct tcp_info
        backlog = lambda: struct.unpack_from("I", port.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), tcpi_sacked)[0]  # noqa: E731
        self.assertEqual(backlog(), 64)
        result = await service.reload(self.config(route.route.target_port, backlog=7))
        self.assertEqual((result.changed, route.port, backlog()), ({"r": ("backlog",)}, port, 7))

    async def test_a_new_hooks_mapping(self) -> None:
        service, route = self.start(self.config(await self.target(b"A")))
        result = await service.reload(service.config, hooks={"*": Hooks(pre_dial=lambda context: False)})
        self.assertEqual(result.changed, {"r": ("hooks",)})
        await (await self.client(route)).gone
        self.assertEqual(route.refusals.counts, {"refused": 1})
        self.assertEqual((await service.reload(service.config)).unchanged, ("r",))  # the mapping in force stays

    async def test_a_refused_reload_changes_nothing(self) -> None:
        service, route = self.start(self.config(await self.target(b"A")))
        config, factory = service.config, route.factory
        typo = await service.reload(self.config(1), hooks={"typo": Hooks()})
        self.assertIn("'typo'", typo.error)
        watched = await service.reload(self.config(1, splice="true"), hooks={"r": Hooks(on_read=lambda *a: None)})
        self.assertIn("splice: true", watched.error)
        self.assertEqual(service.reloads, {"failed": 2})
        self.assertEqual((service.config, route.factory), (config, factory))

    async def test_a_removed_route_finishes_its_connections_out_of_the_tree(self) -> None:
        service, route = self.start(self.config(await self.target(b"A")))
        peer = await self.client(route)
        self.assertEqual(await peer.ask(b"1"), b"A1")
        other = parse_config("routes:\n  s: {scheme: udp4, bind: 127.0.0.1, host: 127.0.0.1, port: ':9'}\n")
        result = await service.reload(other)
        self.assertEqual((result.added, result.removed), (("s",), ("r",)))
        self.assertEqual([s.name for s in service.routes()], ["route:s"])
        self.assertEqual(list(service.retiring), [route])
        self.assertEqual(await peer.ask(b"2"), b"A2")
        peer.transport.loseConnection()
        await until(lambda: not service.retiring)

    async def test_stopping_closes_the_connections_of_removed_routes_too(self) -> None:
        service, route = self.start(self.config(await self.target(b"A")))
        peer = await self.client(route)
        self.assertEqual(await peer.ask(b"1"), b"A1")
        await service.reload(parse_config("routes:\n  s: {scheme: udp4, bind: 127.0.0.1, port: ':9'}\n"))
        await service.stopService()  # does not wait for the drain's deadline
        self.assertEqual((peer.gone.called, service.retiring), (True, {}))
        self.assertEqual(route.stats.closed, {"shutdown": 1})

    async def test_sighup_reloads_the_file_until_the_service_stops(self) -> None:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = Path(directory.name) / "routes.yml"
        path.write_text("routes:\n  r: {scheme: tcp4, bind: 127.0.0.1, port: ':1'}\n")
        before = signal.getsignal(signal.SIGHUP)
        service = make_service(load_config(str(path)))
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        path.write_text("routes:\n  r: {scheme: tcp4, bind: 127.0.0.1, port: ':2'}\n")
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: service.reloads)
        self.assertEqual((service.reloads, service.config.routes[0].target_port), ({"succeeded": 1}, 2))
        await service.stopService()
        self.assertTrue(service.draining)
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)
        self.assertEqual((await service.reload(service.config)).error, "the relay is not running")

    async def test_a_new_status_block_waits_for_a_restart(self) -> None:
        service, route = self.start(self.config(await self.target(b"A")))
        routes = "routes:\n  r: {scheme: tcp4, bind: 127.0.0.1, host: 127.0.0.1, port: ':%d'}\n" % route.route.target_port
        result = await service.reload(parse_config("status: {listen: '127.0.0.1:0'}\n" + routes))
        self.assertEqual((result.restart_needed, result.unchanged), (("status",), ("r",)))
        self.assertEqual([child.name for child in service], ["route:r"])
