"""
A pair's life in memory, in the style of Twisted's own tests: a
L{MemoryReactorClock} for the reactor (its C{tcpClients} are the dials, its
clock every deadline), string transports for the two sockets, and the pair's
inputs delivered by calling the sides' protocol methods as a transport
would.  No sockets (but for the hangup watch's own tests), no sleeps.
"""

from __future__ import annotations

import errno
import json
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport, _FakeConnector
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from streamrelay.addresses import HOLD_LIMIT
from streamrelay.config import RouteConfig, parse_config
from streamrelay.dial import Dial
from streamrelay.events import RefusalLog, RouteEvents
from streamrelay.hangups import HangupWatch
from streamrelay.hooks import NO_HOOKS, ConnectionContext, Hooks, Refused
from streamrelay.lifecycle import Input, State
from streamrelay.tcp import Pair, RelayFactory, Side

CLIENT = IPv4Address("TCP", "192.0.2.10", 40000)  # TEST-NET-1: not "local" to the ACL
LISTEN = IPv4Address("TCP", "127.0.0.1", 1)
VIA = IPv4Address("TCP", "127.0.0.1", 50000)
DEADLINE = 5.0  # for the few real sockets


def make_route(**settings: Any) -> RouteConfig:
    """One TCP route, relaying 127.0.0.1:1 to 127.0.0.1:2 on Twisted's transports."""
    fields = {"scheme": "tcp4", "bind": "127.0.0.1", "host": "127.0.0.1", "port": "1:2", "splice": False, **settings}
    return parse_config("routes:\n  r: " + json.dumps(fields) + "\n").routes[0]


class FakeTransport(StringTransport):
    """
    A string transport with the rest of what a TCP transport offers the
    relay, each call recorded in C{calls}.  As with Twisted's own transports
    C{unregisterProducer} without a producer is no error.  Losing the
    connection only records it: the test says when the socket is gone, with
    L{lose}, as the reactor would.
    """

    def __init__(self, peer: IPv4Address, host: IPv4Address, sock: socket.socket | None = None) -> None:
        super().__init__(hostAddress=host, peerAddress=peer, lenient=True)
        self.sock = sock
        self.calls: list[str] = []
        self.write_closed = False
        self.no_delay = self.keep_alive = False

    @property
    def closing(self) -> bool:
        """C{loseConnection} was called and C{abortConnection} was not."""
        return self.disconnecting and not self.disconnected

    @property
    def aborted(self) -> bool:
        return self.disconnected

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keep_alive = enabled

    def loseWriteConnection(self) -> None:
        self.calls.append("loseWriteConnection")
        self.write_closed = True

    def loseConnection(self) -> None:
        self.calls.append("loseConnection")
        super().loseConnection()

    def abortConnection(self) -> None:
        self.calls.append("abortConnection")
        self.disconnected = True
        self.disconnecting = True

    def unregisterProducer(self) -> None:
        self.calls.append("unregisterProducer")
        self.producer = None
        self.streaming = None

    def pauseProducing(self) -> None:
        self.calls.append("pauseProducing")
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self.calls.append("resumeProducing")
        super().resumeProducing()

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def getHandle(self) -> socket.socket | None:
        return self.sock


def state(pair: Pair) -> State:
    """C{pair.state}, read afresh (mypy would keep an earlier assert's narrowing of the attribute)."""
    return pair.state


def lose(side: Side, reason: Exception | None = None) -> None:
    """The reactor's last word on C{side}'s socket."""
    side.transport.connected = False  # type: ignore[attr-defined]
    side.connectionLost(Failure(reason if reason is not None else ConnectionDone()))


class Recorded(RouteEvents):
    """A route's events, kept (at every level) instead of logged."""

    def __init__(self, route: RouteConfig) -> None:
        super().__init__(route)
        self.log: list[tuple[LogLevel, str, dict[str, Any]]] = []

    def emit(self, level: LogLevel, action: str, **fields: Any) -> None:
        self.log.append((level, action, fields))

    def actions(self, action: str) -> list[dict[str, Any]]:
        return [fields for _, name, fields in self.log if name == action]


@dataclass
class Relayed:
    """A pair with both sides connected."""

    pair: Pair
    client: Side
    client_transport: FakeTransport
    target: Side
    target_transport: FakeTransport


class Rig:
    """One route's factory on a memory reactor, and ways to play its peers."""

    def __init__(self, hooks: Hooks = NO_HOOKS, **settings: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.route = make_route(**settings)
        self.events = Recorded(self.route)
        self.refusals = RefusalLog(self.events, self.reactor)
        self.factory = RelayFactory(self.route, self.events, self.refusals, self.reactor, hooks)

    def accept(self, peer: IPv4Address = CLIENT, sock: socket.socket | None = None) -> tuple[Pair, Side, FakeTransport]:
        """What the listening port does with a new connection."""
        side = self.factory.buildProtocol(peer)
        transport = FakeTransport(peer, LISTEN, sock)
        side.makeConnection(transport)
        return side.pair, side, transport

    def dial(self, which: int = -1) -> tuple[Dial, _FakeConnector]:
        factory = self.reactor.tcpClients[which][2]
        assert isinstance(factory, Dial)
        return factory, self.reactor.connectors[which]

    def connect_target(self, which: int = -1, sock: socket.socket | None = None) -> tuple[Side, FakeTransport]:
        """What C{connectTCP} does once the target accepts."""
        host, port, factory, _, _ = self.reactor.tcpClients[which]
        address = IPv4Address("TCP", host, port)
        side = factory.buildProtocol(address)
        assert isinstance(side, Side)
        transport = FakeTransport(address, VIA, sock)
        side.makeConnection(transport)
        return side, transport

    def relaying(self, peer: IPv4Address = CLIENT) -> Relayed:
        pair, client, client_transport = self.accept(peer)
        target, target_transport = self.connect_target()
        assert state(pair) is State.RELAYING
        return Relayed(pair, client, client_transport, target, target_transport)

    def closed(self) -> list[dict[str, Any]]:
        return self.events.actions("closed")


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    """streamrelay's events as C{twisted.logger} delivers them."""
    events: list[dict[str, Any]] = []

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "streamrelay":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def v2_header(source: IPv4Address, destination: IPv4Address) -> bytes:
    """A PROXY v2 header for TCP over IPv4, written out by hand."""
    addresses = (
        socket.inet_aton(source.host) + socket.inet_aton(destination.host)
        + struct.pack("!HH", source.port, destination.port)
    )
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


# -- relaying


@pytest.mark.parametrize("header", [False, True], ids=["plain", "proxy-v2"])
def test_held_bytes_go_first_then_both_ways(header: bool) -> None:
    rig = Rig(relay_proxy_protocol_header=header)
    pair, client, client_transport = rig.accept()
    assert state(pair) is State.DIALING
    assert [(host, port) for host, port, *_ in rig.reactor.tcpClients] == [("127.0.0.1", 2)]
    assert (client_transport.no_delay, client_transport.keep_alive) == (True, True)
    client.dataReceived(b"sent ")
    client.dataReceived(b"early")
    assert pair.held == [b"sent ", b"early"]

    target, target_transport = rig.connect_target()
    assert state(pair) is State.RELAYING
    preamble = v2_header(CLIENT, LISTEN) if header else b""
    assert target_transport.value() == preamble + b"sent early"
    assert pair.held == []

    client.dataReceived(b", then more")
    target.dataReceived(b"a reply")
    assert target_transport.value() == preamble + b"sent early, then more"
    assert client_transport.value() == b"a reply"
    # Each side produces for the other's transport: backpressure both ways.
    assert (target_transport.producer, target_transport.streaming) == (client, True)
    assert (client_transport.producer, client_transport.streaming) == (target, True)


def test_a_client_holding_the_limit_is_paused_until_the_target_connects() -> None:
    rig = Rig()
    _, client, client_transport = rig.accept()
    client.dataReceived(b"x" * (HOLD_LIMIT - 1))
    assert client_transport.producerState == "producing"
    client.dataReceived(b"y")
    assert client_transport.producerState == "paused"
    _, target_transport = rig.connect_target()
    assert client_transport.producerState == "producing"
    assert target_transport.value() == b"x" * (HOLD_LIMIT - 1) + b"y"


def test_a_normal_exchange_is_logged_with_its_reason_and_byte_counts() -> None:
    rig = Rig()
    pair, client, client_transport = rig.accept()
    client.dataReceived(b"12345")  # held
    rig.reactor.advance(0.25)
    target, target_transport = rig.connect_target()
    client.dataReceived(b"1234567")
    target.dataReceived(b"12345678901")
    target.dataReceived(b"1234")
    rig.reactor.advance(2.75)
    client.readConnectionLost()
    assert state(pair) is State.HALF_CLOSED
    target.readConnectionLost()
    assert state(pair) is State.CLOSING
    assert client_transport.closing and target_transport.closing
    lose(target)
    lose(client)
    assert state(pair) is State.CLOSED
    [closed] = rig.closed()
    assert closed["reason"] == "done"
    assert (closed["bytes_up"], closed["bytes_down"]) == (12, 15)
    assert closed["duration"] == 3.0
    assert (closed["conn"], closed["client"], closed["unique_id"]) == (pair.id, "192.0.2.10:40000", None)
    assert pair.done.called and rig.factory.pairs == {}


def test_the_unique_id_of_the_header_is_logged() -> None:
    rig = Rig(relay_proxy_protocol_header=True, proxy_protocol_unique_id=True)
    relayed = rig.relaying()
    assert relayed.pair.unique_id is not None and relayed.pair.unique_id.endswith(f"-{relayed.pair.id}")
    assert relayed.pair.unique_id.encode() in relayed.target_transport.value()
    lose(relayed.target)
    lose(relayed.client)
    assert rig.closed()[0]["unique_id"] == relayed.pair.unique_id


# -- the dial budget


def never_answering() -> tuple[Deferred[bool], list[Deferred[bool]]]:
    """A hook's Deferred that never fires, and the list its canceller appends to."""
    cancelled: list[Deferred[bool]] = []
    return Deferred(cancelled.append), cancelled


def test_the_dial_budget_cuts_a_hook_short(logged: list[dict[str, Any]]) -> None:
    checking, cancelled = never_answering()
    contexts: list[ConnectionContext] = []

    def pre_dial(context: ConnectionContext) -> Deferred[bool]:
        contexts.append(context)
        return checking

    rig = Rig(Hooks(pre_dial=pre_dial), dial_timeout="2s")
    rig.factory.events = RouteEvents(rig.route)  # the real thing: through twisted.logger
    pair, client, client_transport = rig.accept()
    assert state(pair) is State.CHECKING
    [context] = contexts
    assert (context.route, context.client, context.listen, context.target) == (
        "r", ("192.0.2.10", 40000), ("127.0.0.1", 1), ("127.0.0.1", 2)
    )
    rig.reactor.advance(1.5)
    assert not client_transport.disconnecting and cancelled == []
    rig.reactor.advance(0.5)
    assert state(pair) is State.CLOSING
    assert client_transport.closing
    assert cancelled == [checking]
    assert rig.reactor.tcpClients == []  # no dial after the budget
    [failed] = [e for e in logged if e["action"] == "dial-failed"]
    assert (failed["reason"], failed["log_level"], failed["route"], failed["conn"]) == (
        "dial timeout", LogLevel.warn, "r", pair.id
    )
    lose(client)
    [closed] = [e for e in logged if e["action"] == "closed"]
    assert closed["reason"] == "dial failed"


def test_the_dial_budget_covers_a_target_that_never_answers(logged: list[dict[str, Any]]) -> None:
    rig = Rig(connect_timeout="1s", retries=1, dial_timeout="2s")
    rig.factory.events = RouteEvents(rig.route)
    assert rig.route.dial_budget == 2.0
    pair, client, client_transport = rig.accept()
    dial, connector = rig.dial()
    assert rig.reactor.tcpClients[0][3] == 1.0  # each attempt's own limit
    rig.reactor.advance(1.5)
    assert state(pair) is State.DIALING and not client_transport.disconnecting
    rig.reactor.advance(0.5)
    assert state(pair) is State.CLOSING and client_transport.closing
    assert connector.stoppedConnecting and dial.cancelled
    assert [e["reason"] for e in logged if e["action"] == "dial-failed"] == ["dial timeout"]
    # The attempt failing after all (as a stopped connector does) starts nothing.
    dial.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
    assert len(rig.reactor.tcpClients) == 1
    assert len([e for e in logged if e["action"] == "dial-failed"]) == 1


def test_a_literal_target_without_hook_leaves_the_budget_to_the_attempts() -> None:
    """
    With no hook, an IP literal and no dial_timeout of its own, only the
    connect attempts take time, and their own timeouts (connect_timeout
    each, retries + 1 of them) add up to the default budget: no pair timer.
    """
    rig = Rig(connect_timeout="1s", retries=2)
    pair, _, _ = rig.accept()
    rig.dial()
    assert state(pair) is State.DIALING
    assert rig.reactor.getDelayedCalls() == []
    assert rig.reactor.tcpClients[0][3] == 1.0 and rig.route.dial_budget == 3.0
    assert Rig(connect_timeout="1s", dial_timeout="5s").factory.deadlines[State.CHECKING] == 5.0


def test_a_refused_dial_is_retried_then_given_up() -> None:
    rig = Rig(retries=1)
    pair, _, client_transport = rig.accept()
    dial, connector = rig.dial()
    dial.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
    assert len(rig.reactor.tcpClients) == 2 and state(pair) is State.DIALING
    dial.clientConnectionFailed(rig.reactor.connectors[-1], Failure(ConnectionRefusedError()))
    assert len(rig.reactor.tcpClients) == 2
    assert state(pair) is State.CLOSING and client_transport.closing
    [failed] = rig.events.actions("dial-failed")
    assert "refused" in failed["reason"]


# -- hooks: cancelled when the pair no longer needs them


@pytest.mark.parametrize("end", ["client left", "budget ran out"])
@pytest.mark.parametrize("kind", ["deferred", "coroutine"])
def test_a_pending_hook_is_cancelled(kind: str, end: str) -> None:
    seen: list[str] = []
    checking, cancelled = never_answering()

    async def coroutine(context: ConnectionContext) -> bool:
        try:
            await Deferred()
        except CancelledError:
            seen.append("cancelled inside")
            raise
        return True

    def deferred(context: ConnectionContext) -> Deferred[bool]:
        return checking

    rig = Rig(Hooks(pre_dial=coroutine if kind == "coroutine" else deferred), dial_timeout="2s")
    pair, client, client_transport = rig.accept()
    assert pair.pending is not None
    if end == "client left":
        lose(client)
    else:
        rig.reactor.advance(2)
        assert client_transport.closing
        lose(client)
    assert pair.pending is None
    assert (seen, cancelled) == ((["cancelled inside"], []) if kind == "coroutine" else ([], [checking]))
    assert state(pair) is State.CLOSED
    assert pair.done.called and rig.factory.pairs == {}
    assert rig.reactor.tcpClients == []
    assert rig.refusals.counts == {}  # a cancelled hook is no refusal
    assert [c["reason"] for c in rig.closed()] == ["client closed" if end == "client left" else "dial failed"]


@pytest.mark.parametrize("end", ["client left", "budget ran out"])
@pytest.mark.parametrize("answer", ["when cancelled", "swallowing the cancel", "later"])
def test_a_late_hook_answer_starts_no_dial(answer: str, end: str) -> None:
    later: Deferred[bool] = Deferred()

    async def swallowing(context: ConnectionContext) -> bool:
        try:
            await Deferred()
        except CancelledError:
            pass
        return True

    hooks = {
        "when cancelled": lambda context: Deferred(lambda d: d.callback(True)),
        "swallowing the cancel": swallowing,
        "later": lambda context: later,
    }
    rig = Rig(Hooks(pre_dial=hooks[answer]), dial_timeout="2s")
    pair, client, _ = rig.accept()
    if end == "client left":
        lose(client)
    else:
        rig.reactor.advance(2)
    if answer == "later":
        later.callback(True)
    pair.feed(Input.ADMITTED)  # however it comes
    assert rig.reactor.tcpClients == []
    assert state(pair) is (State.CLOSED if end == "client left" else State.CLOSING)


def test_the_hook_refusing_or_raising_is_a_refusal() -> None:
    def refuse(context: ConnectionContext) -> bool:
        return False

    def broken(context: ConnectionContext) -> bool:
        raise Refused("not today")

    for hook, reason in ((refuse, "pre_dial refused"), (broken, "pre_dial failed: not today")):
        rig = Rig(Hooks(pre_dial=hook))
        pair, client, client_transport = rig.accept()
        assert state(pair) is State.CLOSING and client_transport.aborted
        assert rig.refusals.counts == {"refused": 1}
        assert [e["reason"] for e in rig.events.actions("refused")] == [reason]
        lose(client, ConnectionAborted())
        assert rig.closed() == [] and rig.reactor.tcpClients == []


# -- half-close, idle and close deadlines


def test_a_fin_is_passed_on_and_the_half_close_timeout_runs_until_traffic_stops() -> None:
    rig = Rig(half_close_timeout="5s")
    r = rig.relaying()
    r.client.readConnectionLost()
    assert state(r.pair) is State.HALF_CLOSED
    assert r.target_transport.write_closed
    assert r.target_transport.calls == ["unregisterProducer", "loseWriteConnection"]
    assert r.target_transport.producer is None
    assert not r.client_transport.disconnecting
    rig.reactor.advance(4)
    r.target.dataReceived(b"the rest of the reply")  # traffic restarts the clock
    assert r.client_transport.value() == b"the rest of the reply"
    rig.reactor.advance(4)
    assert state(r.pair) is State.HALF_CLOSED
    rig.reactor.advance(1)
    assert state(r.pair) is State.CLOSING
    assert r.client_transport.closing and r.target_transport.closing
    lose(r.client)
    lose(r.target)
    assert [c["reason"] for c in rig.closed()] == ["half-close timeout"]


def test_a_fin_before_the_target_connects_is_passed_on_after_the_held_bytes() -> None:
    rig = Rig()
    pair, client, client_transport = rig.accept()
    client.dataReceived(b"request")
    client.readConnectionLost()
    assert state(pair) is State.DIALING  # remembered, not acted on
    target, target_transport = rig.connect_target()
    assert state(pair) is State.HALF_CLOSED
    assert target_transport.value() == b"request" and target_transport.write_closed
    assert target_transport.producer is None  # nothing more will come from the client
    target.dataReceived(b"reply")
    assert client_transport.value() == b"reply"


def test_the_idle_timeout_closes_a_quiet_pair_and_traffic_resets_it() -> None:
    rig = Rig(idle_timeout="10s")
    r = rig.relaying()
    rig.reactor.advance(9)
    r.client.dataReceived(b"up")
    rig.reactor.advance(9)
    r.target.dataReceived(b"down")
    rig.reactor.advance(9)
    assert state(r.pair) is State.RELAYING
    rig.reactor.advance(1)
    assert state(r.pair) is State.CLOSING
    assert r.client_transport.closing and r.target_transport.closing
    lose(r.client)
    lose(r.target)
    assert [c["reason"] for c in rig.closed()] == ["idle timeout"]


def test_no_idle_timeout_means_no_timer() -> None:
    rig = Rig()
    r = rig.relaying()
    assert rig.reactor.getDelayedCalls() == []
    rig.reactor.advance(10**6)
    assert state(r.pair) is State.RELAYING


def test_a_survivor_that_does_not_go_within_the_close_timeout_is_aborted() -> None:
    rig = Rig(close_timeout="3s")
    r = rig.relaying()
    lose(r.target, ConnectionLost())
    assert state(r.pair) is State.CLOSING
    assert r.client_transport.closing
    rig.reactor.advance(2.5)
    assert not r.client_transport.aborted
    rig.reactor.advance(0.5)
    assert r.client_transport.aborted
    lose(r.client, ConnectionAborted())
    assert state(r.pair) is State.CLOSED
    assert [c["reason"] for c in rig.closed()] == ["target reset"]


def test_a_survivor_that_goes_in_time_is_not_aborted() -> None:
    rig = Rig(close_timeout="3s")
    r = rig.relaying()
    lose(r.client)
    assert r.target_transport.closing
    rig.reactor.advance(1)
    lose(r.target)
    assert rig.reactor.getDelayedCalls() == []
    rig.reactor.advance(10)
    assert not r.target_transport.aborted
    assert [c["reason"] for c in rig.closed()] == ["client closed"]


# -- shutdown and abort


def test_shutdown_closes_both_and_abort_resets_both() -> None:
    rig = Rig()
    r = rig.relaying()
    r.pair.feed(Input.SHUTDOWN, detail="shutdown")
    assert state(r.pair) is State.CLOSING
    assert r.client_transport.closing and r.target_transport.closing
    calls = (list(r.client_transport.calls), list(r.target_transport.calls))
    r.pair.feed(Input.SHUTDOWN, detail="shutdown")  # a second one changes nothing
    assert (r.client_transport.calls, r.target_transport.calls) == calls
    r.pair.feed(Input.ABORT, detail="shutdown timeout")
    assert r.client_transport.aborted and r.target_transport.aborted
    lose(r.client, ConnectionAborted())
    lose(r.target, ConnectionAborted())
    assert [c["reason"] for c in rig.closed()] == ["shutdown"]


def test_abort_resets_both_at_once() -> None:
    rig = Rig()
    r = rig.relaying()
    r.pair.feed(Input.ABORT, detail="shutdown timeout")
    assert r.client_transport.calls[-1] == r.target_transport.calls[-1] == "abortConnection"
    assert "loseConnection" not in r.client_transport.calls + r.target_transport.calls
    lose(r.client, ConnectionAborted())
    lose(r.target, ConnectionAborted())
    assert [c["reason"] for c in rig.closed()] == ["shutdown timeout"]


def test_shutdown_while_checking_cancels_the_hook() -> None:
    checking, cancelled = never_answering()
    rig = Rig(Hooks(pre_dial=lambda context: checking))
    pair, client, client_transport = rig.accept()
    pair.feed(Input.SHUTDOWN, detail="shutdown")
    assert cancelled == [checking] and client_transport.closing
    lose(client)
    assert rig.reactor.tcpClients == []
    assert [c["reason"] for c in rig.closed()] == ["shutdown"]


# -- late inputs


def test_a_target_connecting_after_the_client_left_is_reset() -> None:
    rig = Rig()
    pair, client, _ = rig.accept()
    dial, connector = rig.dial()
    lose(client)
    assert state(pair) is State.CLOSED and pair.done.called
    assert connector.stoppedConnecting and dial.cancelled
    target, target_transport = rig.connect_target()  # raced the cancel
    assert target_transport.aborted and target_transport.value() == b""
    lose(target, ConnectionAborted())
    assert state(pair) is State.CLOSED
    assert len(rig.closed()) == 1  # and pair.done fired only once (a second time would raise)


def test_a_target_connecting_after_the_budget_is_reset() -> None:
    rig = Rig(dial_timeout="1s")
    pair, client, client_transport = rig.accept()
    client.dataReceived(b"held")
    rig.reactor.advance(1)
    assert state(pair) is State.CLOSING
    target, target_transport = rig.connect_target()
    assert state(pair) is State.CLOSING
    assert target_transport.aborted and target_transport.value() == b""
    assert pair.target is None and client.sink is None
    lose(target, ConnectionAborted())
    assert state(pair) is State.CLOSING  # the client is still there
    lose(client)
    [closed] = rig.closed()
    assert (closed["reason"], closed["bytes_up"], closed["bytes_down"]) == ("dial failed", 4, 0)


def test_inputs_after_closed_change_nothing() -> None:
    rig = Rig(idle_timeout="10s")
    r = rig.relaying()
    lose(r.client)
    lose(r.target)
    assert state(r.pair) is State.CLOSED
    before = (list(r.client_transport.calls), list(r.target_transport.calls), list(rig.events.log))
    for input in Input:
        if input is not Input.CONNECTED:
            r.pair.feed(input, r.client, "late")
    assert state(r.pair) is State.CLOSED
    assert (r.client_transport.calls, r.target_transport.calls, rig.events.log) == before
    assert rig.reactor.getDelayedCalls() == []


# -- refusals


def test_an_acl_denial_is_counted_and_the_client_reset() -> None:
    rig = Rig(acl={"default": "deny", "allow_local": False, "allow": ["203.0.113.0/24"]})
    stranger = IPv4Address("TCP", "198.51.100.7", 1234)
    for port in (1234, 1235):
        pair, client, client_transport = rig.accept(IPv4Address("TCP", stranger.host, port))
        assert state(pair) is State.CLOSING
        assert client_transport.calls == ["abortConnection"]
        lose(client, ConnectionAborted())
        assert state(pair) is State.CLOSED
    assert rig.refusals.counts == {"denied": 2}
    [denied] = rig.events.actions("denied")  # the second is throttled, but counted
    assert (denied["rule"], denied["client"], denied["suppressed"]) == ("default deny", "198.51.100.7:1234", 0)
    assert rig.closed() == [] and rig.reactor.tcpClients == [] and rig.factory.pairs == {}
    pair, _, _ = rig.accept(IPv4Address("TCP", "203.0.113.9", 1))
    assert state(pair) is State.DIALING


def test_max_connections_per_client_is_counted_and_released() -> None:
    rig = Rig(max_connections_per_client=1)
    first = rig.relaying(IPv4Address("TCP", "192.0.2.1", 1000))
    assert rig.factory.per_client == {"192.0.2.1": 1}
    pair, client, client_transport = rig.accept(IPv4Address("TCP", "192.0.2.1", 1001))
    assert state(pair) is State.CLOSING and client_transport.aborted
    assert rig.refusals.counts == {"limited": 1}
    [limited] = rig.events.actions("limited")
    assert limited["reason"] == "max_connections_per_client reached"
    lose(client, ConnectionAborted())
    assert rig.factory.per_client == {"192.0.2.1": 1}  # the refused one was never counted
    other, _, _ = rig.accept(IPv4Address("TCP", "192.0.2.2", 1000))
    assert state(other) is State.DIALING
    assert rig.factory.per_client == {"192.0.2.1": 1, "192.0.2.2": 1}
    lose(first.client)
    lose(first.target)
    assert rig.factory.per_client == {"192.0.2.2": 1}
    lose(other.client)
    assert rig.factory.per_client == {}
    assert [c["client"] for c in rig.closed()] == ["192.0.2.1:1000", "192.0.2.2:1000"]
    again, _, _ = rig.accept(IPv4Address("TCP", "192.0.2.1", 1002))
    assert state(again) is State.DIALING


def test_a_hook_refusal_after_the_limits_releases_the_client_count() -> None:
    """Counted by C{max_connections_per_client}, then refused by C{pre_dial}: uncounted at close."""
    rig = Rig(Hooks(pre_dial=lambda context: False), max_connections_per_client=1)
    pair, client, client_transport = rig.accept()
    assert state(pair) is State.CLOSING and client_transport.aborted
    assert rig.factory.per_client == {"192.0.2.10": 1}
    lose(client, ConnectionAborted())
    assert rig.factory.per_client == {} and rig.refusals.counts == {"refused": 1}
    assert rig.closed() == []


# -- the hangup watch


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        near = socket.create_connection(server.getsockname())
        far, _ = server.accept()
    return near, far


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def connected(sockets: list[socket.socket]) -> tuple[socket.socket, socket.socket]:
    near, far = tcp_pair()
    sockets += [near, far]
    return near, far


def reset(sock: socket.socket) -> None:
    """Close C{sock} with a reset (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def wait_readable(fd: int) -> None:
    assert select.select([fd], [], [], DEADLINE)[0], "nothing was reported"


def test_a_paused_side_is_watched_until_resumed_or_lost(sockets: list[socket.socket]) -> None:
    rig = Rig()
    watch = rig.factory.watch
    client_socket, _ = connected(sockets)
    pair, client, client_transport = rig.accept(sock=client_socket)
    rig.connect_target()
    assert len(watch) == 0 and watch not in rig.reactor.getReaders()
    client.pauseProducing()
    assert client_transport.producerState == "paused"
    assert len(watch) == 1 and watch in rig.reactor.getReaders()
    assert client.watched_fd == client_socket.fileno()
    client.resumeProducing()
    assert client_transport.producerState == "producing"
    assert len(watch) == 0 and watch not in rig.reactor.getReaders() and watch.fileno() == -1
    client.pauseProducing()
    assert len(watch) == 1
    lose(client)
    assert len(watch) == 0 and watch not in rig.reactor.getReaders()
    assert client.watched_fd == -1


def test_a_paused_side_that_resets_is_aborted_at_once(sockets: list[socket.socket]) -> None:
    rig = Rig()
    watch = rig.factory.watch
    target_socket, target_peer = connected(sockets)
    pair, client, _ = rig.accept()
    target, target_transport = rig.connect_target(sock=target_socket)
    target.pauseProducing()
    reset(target_peer)
    sockets.remove(target_peer)
    wait_readable(watch.fileno())
    watch.doRead()
    assert target_transport.calls[-1] == "abortConnection"
    assert len(watch) == 0 and target.watched_fd == -1
    lose(target, ConnectionAborted())
    assert state(pair) is State.CLOSING


def test_the_watch_reports_a_reset_with_its_error() -> None:
    reactor = MemoryReactor()
    watch = HangupWatch(reactor)
    near, far = tcp_pair()
    other, other_far = tcp_pair()
    try:
        assert watch.fileno() == -1 and reactor.getReaders() == []
        reported: list[int] = []
        watch.add(near, reported.append)
        watch.add(other, lambda error: pytest.fail("a quiet socket reported"))
        assert reactor.getReaders() == [watch] and len(watch) == 2
        reset(far)
        wait_readable(watch.fileno())
        watch.doRead()
        assert reported == [errno.ECONNRESET]
        assert len(watch) == 1 and reactor.getReaders() == [watch]  # still watching the other
        watch.discard(other.fileno())
        assert len(watch) == 0 and watch.fileno() == -1 and reactor.getReaders() == []
    finally:
        for sock in (near, other, other_far):
            sock.close()


def test_a_hang_up_without_an_error_reports_zero_and_leaves_the_side_alone(sockets: list[socket.socket]) -> None:
    rig = Rig()
    watch = rig.factory.watch
    client_socket, client_peer = connected(sockets)
    _, client, client_transport = rig.accept(sock=client_socket)
    rig.connect_target()
    client.pauseProducing()
    client_socket.shutdown(socket.SHUT_WR)  # both FINs: a hang-up, not an error
    client_peer.shutdown(socket.SHUT_WR)
    wait_readable(watch.fileno())
    watch.doRead()
    assert len(watch) == 0 and client.watched_fd == -1
    assert "abortConnection" not in client_transport.calls


def test_a_socket_closed_while_watched_can_still_be_discarded() -> None:
    reactor = MemoryReactor()
    watch = HangupWatch(reactor)
    first, first_far = tcp_pair()
    second, second_far = tcp_pair()
    try:
        watch.add(first, lambda error: None)
        watch.add(second, lambda error: None)
        fd = first.fileno()
        first.close()  # the kernel drops it from the epoll set
        watch.discard(fd)
        assert len(watch) == 1 and reactor.getReaders() == [watch]
        watch.discard(fd)  # twice: nothing
        assert len(watch) == 1
        watch.discard(second.fileno())
        assert watch.fileno() == -1 and reactor.getReaders() == []
    finally:
        for sock in (first_far, second, second_far):
            sock.close()
