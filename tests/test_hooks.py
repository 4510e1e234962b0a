"""
Hooks for embedding programs, in-process with the real reactor and real
loopback sockets: C{make_service(config, hooks=...)} as a C{.tac} would use it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from streamrelay import ConnectionContext, Hooks, Refused, make_service, parse_config


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
    async def relay(self, hooks: dict[str, Hooks]) -> int:
        """Start an echo target and a relay with C{hooks}; the relay's port."""
        target = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Echo))
        self.addCleanup(target.stopListening)
        config = parse_config(
            "routes:\n"
            f"  r: {{scheme: tcp4, bind: 127.0.0.1, host: 127.0.0.1, port: ':{target.getHost().port}'}}\n"
        )
        service = make_service(config, hooks=hooks)
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
