"""
Hooks for embedding programs, in-process with the real reactor and real
loopback sockets: C{make_service(config, hooks=...)} as a C{.tac} would use it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredQueue
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from streamrelay import ConnectionContext, Hooks, Refused, make_service, parse_config
from streamrelay.service import UDPRouteService
from streamrelay.udp import MAX_DATAGRAM
from tests.reactor import until


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # after the echo is flushed

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class Client(Protocol):
    """Sends C{payload}, half-closes, and collects everything until close."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(self.received)


class HookTests(TestCase):
    async def relay(self, hooks: dict[str, Hooks], extra: str = "") -> int:
        """Start an echo target and a relay with C{hooks} (and route fields C{extra}); the relay's port."""
        target = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Echo))
        self.addCleanup(target.stopListening)
        config = parse_config(
            "routes:\n"
            f"  r: {{scheme: tcp4, bind: 127.0.0.1, host: 127.0.0.1, port: ':{target.getHost().port}'{extra}}}\n"
        )
        service = self.service = make_service(config, hooks=hooks)
        service.startService()
        self.addCleanup(service.stopService)
        return service.getServiceNamed("route:r").port.getHost().port

    async def exchange(self, port: int, payload: bytes) -> bytes:
        client = Client(payload)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        return await client.closed

    async def test_pre_dial_refusing(self) -> None:
        seen: list[ConnectionContext] = []

        def refuse(context: ConnectionContext) -> bool:
            seen.append(context)
            return False

        port = await self.relay({"r": Hooks(pre_dial=refuse)})
        self.assertEqual(await self.exchange(port, b"hello"), b"")
        [context] = seen
        self.assertEqual((context.route, context.client[0], context.listen), ("r", "127.0.0.1", ("127.0.0.1", port)))

    async def test_pre_dial_failing_asynchronously(self) -> None:
        async def fail_later(context: ConnectionContext) -> None:
            await deferLater(reactor, 0.05)
            raise Refused("not today")

        port = await self.relay({"*": Hooks(pre_dial=fail_later)})
        self.assertEqual(await self.exchange(port, b"hello"), b"")

    async def test_pre_dial_succeeding_after_a_delay(self) -> None:
        port = await self.relay({"r": Hooks(pre_dial=lambda context: deferLater(reactor, 0.2, lambda: True))})
        self.assertEqual(await self.exchange(port, b"held while checking"), b"held while checking")

    async def test_a_hook_that_never_answers_is_cancelled_at_the_dial_budget(self) -> None:
        cancelled: list[Deferred[bool]] = []
        port = await self.relay({"r": Hooks(pre_dial=lambda context: Deferred(cancelled.append))}, ", dial_timeout: 300ms")
        self.assertEqual(await self.exchange(port, b"held, then dropped"), b"")
        self.assertEqual(len(cancelled), 1)
        service = self.service
        self.assertEqual(len(service.getServiceNamed("route:r").factory.pairs), 0)

    async def test_the_client_leaving_cancels_a_pending_hook(self) -> None:
        started: list[ConnectionContext] = []
        cancelled: list[ConnectionContext] = []

        async def forever(context: ConnectionContext) -> bool:
            started.append(context)
            try:
                await Deferred()
            except CancelledError:
                cancelled.append(context)
                raise
            return True

        port = await self.relay({"r": Hooks(pre_dial=forever)})
        client = Protocol()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        await until(lambda: started)
        client.transport.abortConnection()  # a FIN alone is a half-close: the client may still read
        await until(lambda: cancelled)
        self.assertEqual(cancelled, started)

    def test_hooks_for_a_route_that_does_not_exist_are_refused(self) -> None:
        config = parse_config("routes:\n  r: {scheme: tcp4, port: '1:2'}\n")
        with self.assertRaises(ValueError) as caught:
            make_service(config, hooks={"r": Hooks(), "typo": Hooks(), "*": Hooks()})
        self.assertIn("'typo'", str(caught.exception))
        self.assertNotIn("'*'", str(caught.exception).split("but")[0])
        make_service(config, hooks={"r": Hooks(), "*": Hooks()})  # known names and "*" are fine

    async def test_on_read_counts_every_byte_both_ways(self) -> None:
        counted = {"up": 0, "down": 0}

        def count(context: ConnectionContext, nbytes: int, direction: str) -> None:
            counted[direction] += nbytes

        port = await self.relay({"*": Hooks(on_read=count)})
        payload = bytes(range(256)) * 4096
        self.assertEqual(await self.exchange(port, payload), payload)
        self.assertEqual(counted, {"up": len(payload), "down": len(payload)})

    async def test_raising_hooks_never_take_the_route_down(self) -> None:
        def broken(*args: object) -> None:
            raise RuntimeError("hook bug")

        port = await self.relay({"r": Hooks(pre_dial=broken)})
        self.assertEqual(await self.exchange(port, b"x"), b"")
        self.assertEqual(await self.exchange(port, b"y"), b"")  # the route still accepts

    async def test_raising_on_read_is_switched_off_for_that_connection(self) -> None:
        calls = []

        def broken(context: ConnectionContext, nbytes: int, direction: str) -> None:
            calls.append(direction)
            raise RuntimeError("hook bug")

        port = await self.relay({"r": Hooks(on_read=broken)})
        self.assertEqual(await self.exchange(port, b"still relayed"), b"still relayed")
        self.assertEqual(sorted(calls), ["down", "up"])


class DatagramEcho(DatagramProtocol):
    """A UDP target that sends every datagram back and keeps what it was sent."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.seen.append(data)
        self.transport.write(data, addr)


class DatagramClient(DatagramProtocol):
    """A UDP client connected to the relay; its replies queue up."""

    def __init__(self) -> None:
        self.replies: DeferredQueue[bytes] = DeferredQueue()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.replies.put(data)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    @property
    def address(self) -> tuple[str, int]:
        host = self.transport.getHost()
        return host.host, host.port



class DatagramHookTests(TestCase):
    """The same hooks on a UDP route: C{pre_dial} once per session, C{on_read} per datagram."""

    def listen(self, protocol: DatagramProtocol) -> Any:
        port = reactor.listenUDP(0, protocol, interface="127.0.0.1", maxPacketSize=MAX_DATAGRAM)
        self.addCleanup(port.stopListening)
        return port

    async def route(self, hooks: dict[str, Hooks], **fields: str) -> tuple[UDPRouteService, DatagramEcho]:
        """Start an echo target and a UDP relay with C{hooks}; the route's service and the target."""
        target = DatagramEcho()
        target_port = self.listen(target).getHost().port
        extra = "".join(f", {key}: {value}" for key, value in fields.items())
        config = parse_config(
            "routes:\n"
            f"  r: {{scheme: udp4, bind: 127.0.0.1, host: 127.0.0.1, port: ':{target_port}'{extra}}}\n"
        )
        service = self.service = make_service(config, hooks=hooks)
        service.startService()
        self.addCleanup(service.stopService)
        return service.getServiceNamed("route:r"), target

    def client(self, route: UDPRouteService) -> DatagramClient:
        client = DatagramClient()
        self.listen(client).connect("127.0.0.1", route.relay.transport.getHost().port)
        return client

    def capture(self, action: str) -> list[dict[str, Any]]:
        """The C{action} events logged from now until the test ends."""
        found: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("action") == action:
                found.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return found

    async def test_pre_dial_decides_before_the_session_socket_opens(self) -> None:
        decision: Deferred[bool] = Deferred()
        seen: list[ConnectionContext] = []

        def check(context: ConnectionContext) -> Deferred[bool]:
            seen.append(context)
            return decision

        route, target = await self.route({"r": Hooks(pre_dial=check)}, max_udp_sessions="1")
        relay = route.relay
        client, newcomer = self.client(route), self.client(route)
        for i in range(4):
            client.send(b"early %d" % i)
        await until(lambda: sum(s.datagrams_up for s in relay.sessions.values()) == 4)
        newcomer.send(b"no room")  # a pending session holds its place: the limit comes before the hook
        await until(lambda: relay.refusals.counts.get("limited"))
        [session] = relay.sessions.values()
        self.assertEqual(len(seen), 1)  # one pending decision per client, however much it sends
        self.assertIsNone(session.port)  # no socket until the hook says yes
        self.assertEqual(target.seen, [])
        decision.callback(True)
        replies = [await client.replies.get() for _ in range(4)]
        self.assertEqual(replies, [b"early %d" % i for i in range(4)])
        self.assertEqual(target.seen, replies)
        self.assertEqual(
            seen[0],
            ConnectionContext("r", session.id, client.address, ("127.0.0.1", relay.transport.getHost().port),
                              ("127.0.0.1", route.route.target_port)),
        )

    async def test_pre_dial_refusal_drops_what_was_held_and_the_next_datagram_asks_again(self) -> None:
        decisions: list[Deferred[bool]] = []

        def check(context: ConnectionContext) -> Deferred[bool]:
            decisions.append(Deferred())
            return decisions[-1]

        refused = self.capture("refused")
        route, target = await self.route({"r": Hooks(pre_dial=check)})
        relay, client = route.relay, self.client(route)
        for i in range(3):
            client.send(b"held %d" % i)
        await until(lambda: sum(s.datagrams_up for s in relay.sessions.values()) == 3)
        decisions[0].callback(False)
        self.assertEqual(relay.sessions, {})
        self.assertEqual(relay.refusals.counts, {"refused": 1})
        [event] = refused
        self.assertEqual(
            (event["client"], event["reason"], event["dropped"]),
            ("127.0.0.1:%d" % client.address[1], "pre_dial refused", 3),
        )
        client.send(b"asking again")
        await until(lambda: len(decisions) == 2)
        decisions[1].callback(True)
        self.assertEqual(await client.replies.get(), b"asking again")
        self.assertEqual(target.seen, [b"asking again"])  # nothing held before the refusal went out

    async def test_pre_dial_refusing_by_any_means(self) -> None:
        def broken(context: ConnectionContext) -> None:
            raise RuntimeError("hook bug")

        async def fail_later(context: ConnectionContext) -> None:
            await deferLater(reactor, 0.05)
            raise Refused("not today")

        refused = self.capture("refused")
        for hook in (lambda context: False, broken, fail_later):
            route, target = await self.route({"*": Hooks(pre_dial=hook)})
            self.client(route).send(b"let me in")
            await until(lambda: route.relay.refusals.counts.get("refused"))
            self.assertEqual((route.relay.sessions, target.seen), ({}, []))
        self.assertEqual(
            [event["reason"] for event in refused],
            ["pre_dial refused", "pre_dial failed: hook bug", "pre_dial failed: not today"],
        )

    async def test_a_hook_that_never_answers_is_cancelled_at_the_session_expiry(self) -> None:
        """Even while the client keeps sending: the bound runs from the first datagram."""
        cancelled: list[float] = []

        def cancel(decision: Deferred[bool]) -> None:
            if sending.running:  # a datagram still in flight may open a session that shutdown cancels
                sending.stop()
            cancelled.append(reactor.seconds())

        closed = self.capture("session-closed")
        route, target = await self.route(
            {"r": Hooks(pre_dial=lambda context: Deferred(cancel))},
            udp_idle_timeout="300ms", udp_cleanup_interval="100ms",
        )
        sending = LoopingCall(self.client(route).send, b"still here")
        started = reactor.seconds()
        sending.start(0.05)
        await until(lambda: cancelled)
        self.assertGreaterEqual(cancelled[0] - started, 0.3)
        self.assertEqual((closed[0]["reason"], target.seen), ("pre_dial timeout", []))
        self.assertGreater(closed[0]["datagrams_up"], 1)

    async def test_shutdown_cancels_a_pending_hook(self) -> None:
        cancelled: list[Deferred[bool]] = []
        closed = self.capture("session-closed")
        route, target = await self.route({"r": Hooks(pre_dial=lambda context: Deferred(cancelled.append))})
        self.client(route).send(b"anyone?")
        await until(lambda: route.relay.sessions)
        await route.stopService()
        self.assertEqual(len(cancelled), 1)
        self.assertEqual([event["reason"] for event in closed], ["shutdown"])

    async def test_on_read_counts_every_datagram_both_ways(self) -> None:
        counted = {"up": 0, "down": 0}
        contexts: set[ConnectionContext] = set()

        def count(context: ConnectionContext, nbytes: int, direction: str) -> None:
            counted[direction] += nbytes
            contexts.add(context)

        route, target = await self.route({"*": Hooks(on_read=count)})
        client = self.client(route)
        sizes = [1, 1400, 65507]
        for size in sizes:
            client.send(bytes(size))
            self.assertEqual(len(await client.replies.get()), size)
        self.assertEqual(counted, {"up": sum(sizes), "down": sum(sizes)})
        [session] = route.relay.sessions.values()
        self.assertEqual([(c.conn, c.client) for c in contexts], [(session.id, client.address)])

    async def test_raising_on_read_is_switched_off_for_that_session(self) -> None:
        calls: list[tuple[int, str]] = []

        def broken(context: ConnectionContext, nbytes: int, direction: str) -> None:
            calls.append((context.conn, direction))
            raise RuntimeError("hook bug")

        failed = self.capture("hook-failed")
        route, target = await self.route({"r": Hooks(on_read=broken)})
        for client in (self.client(route), self.client(route)):
            for payload in (b"still", b"relayed"):
                client.send(payload)
                self.assertEqual(await client.replies.get(), payload)
        self.assertEqual([direction for _, direction in calls], ["up", "up"])  # once per session
        self.assertEqual(len({conn for conn, _ in calls}), 2)
        self.assertEqual([(e["hook"], e["conn"]) for e in failed], [("on_read", conn) for conn, _ in calls])
