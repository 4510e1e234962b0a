"""
The TCP relay.

Each accepted connection becomes a L{Pair}: the client's L{Side}, and once
the target is dialed, the target's.  A pair's life is an explicit state
machine::

    CHECKING ──admitted──> DIALING ──connected──> RELAYING ──one side's FIN──> HALF_CLOSED ──other FIN──┐
       │                      │                      │                            │                      │
       └── denied, ───────────┴── dial failed, ──────┴── reset, close, timeout, ──┴──────────────────────┴─> CLOSED
           refused                client gone            shutdown

Until RELAYING, what the client sends is held (up to L{HOLD_LIMIT}, then the
client is paused) and written first, in order, once the target connects.
While relaying, each transport is the streaming producer of the other, so a
full write buffer on one side stops reading on the other: memory stays
bounded whatever the speeds.  A FIN is passed on as a FIN (half-close), and a
half-closed pair that stays silent for C{half_close_timeout} is aborted.

On routes that splice, a pair whose sockets are plain TCP takes the other
path once the target connects: both sockets are handed to
L{streamrelay.splice}, which writes the PROXY header and the held bytes
first, then relays outside Twisted's transports and reports bytes, FINs and
losses back in the same terms, so counters, timers and states work alike on
both paths.
"""

from __future__ import annotations

import itertools
import os
from enum import Enum
from typing import TYPE_CHECKING, Callable

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, ITCPTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from . import events, splice
from .addresses import HOLD_LIMIT, describe
from .config import RouteConfig
from .dial import Dial, is_ip_literal, resolve
from .events import RouteEvents, Throttle
from .hooks import NO_HOOKS, ConnectionContext, Hooks
from .proxyproto import PP2_TYPE_UNIQUE_ID, build_v1, build_v2, unify_families

if TYPE_CHECKING:
    from twisted.internet import tcp
    from twisted.internet.interfaces import IAddress

__all__ = ["Pair", "RelayFactory", "Side", "State"]

_connection_ids = itertools.count(1)
#: Makes PROXY v2 unique ids differ across relay restarts and processes.
_RUN_ID = os.urandom(4).hex()


class State(Enum):
    CHECKING = "checking"  # access control, limits and the pre_dial hook
    DIALING = "dialing"
    RELAYING = "relaying"
    HALF_CLOSED = "half-closed"
    CLOSED = "closed"


@implementer(IHalfCloseableProtocol)
class Side(Protocol):
    """
    One of a pair's two connections.  It writes what it reads straight into
    C{sink}, the other side's transport, and reports the rest to its pair.
    """

    transport: ITCPTransport

    def __init__(self, pair: Pair, name: str) -> None:
        self.pair = pair
        self.name = name
        self.sink: ITCPTransport | None = None
        self.received = 0
        self.eof = False
        self.lost = False

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.setTcpKeepAlive(True)
        self.pair.side_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        sink = self.sink
        if sink is None:
            self.pair.hold(data)
            return
        sink.write(data)
        timer = self.pair.timer
        if timer is not None:
            timer.reset(self.pair.timer_period)

    def readConnectionLost(self) -> None:
        if not self.eof:
            self.eof = True
            self.pair.read_finished(self)

    def writeConnectionLost(self) -> None:
        """Our FIN went out; nothing to do until the peer finishes too."""

    def connectionLost(self, reason: Failure) -> None:
        self.lost = True
        self.pair.side_lost(self, reason)

    def close(self) -> None:
        """Flush what is buffered, then close."""
        if self.lost:
            return
        if self.pair.splice is not None:
            self.pair.splice.close(self)
        else:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.lost:
            return
        if self.pair.splice is not None:
            self.pair.splice.abort(self)
        else:
            self.transport.abortConnection()


class ObservedSide(Side):
    """A side whose reads are also reported to an C{on_read} hook."""

    def __init__(self, pair: Pair, name: str) -> None:
        super().__init__(pair, name)
        self.direction = "up" if name == "client" else "down"
        self.observing = True

    def dataReceived(self, data: bytes) -> None:
        if self.observing:
            try:
                self.pair.factory.hooks.on_read(self.pair.context, len(data), self.direction)
            except Exception as e:
                self.observing = False
                self.pair.factory.events.warn(
                    "hook-failed", conn=self.pair.id, client=self.pair.peer, hook="on_read", reason=repr(e)
                )
        super().dataReceived(data)


class Pair:
    """The life of one relayed connection, from accept to close."""

    def __init__(self, factory: RelayFactory) -> None:
        self.factory = factory
        self.id = next(_connection_ids)
        self.state = State.CHECKING
        self.client = factory.side_class(self, "client")
        self.target: Side | None = None
        self.dial: Dial | None = None
        self.held: list[bytes] = []
        self.held_size = 0
        self.client_paused = False
        self.timer: IDelayedCall | None = None
        self.timer_period = 0.0
        self.timer_reason = ""
        self.reason = ""
        self.unique_id: str | None = None
        self.closing = False
        self.peer = ""
        self.client_host = ""
        self.counted_client = False
        self.logged = False
        self.context: ConnectionContext | None = None
        self.splice: splice.Splice | None = None  # set while the sockets are spliced
        self.started = factory.reactor.seconds()
        self.done: Deferred[None] = Deferred()

    # -- events from the sides

    def side_connected(self, side: Side) -> None:
        if side is self.client:
            self.accepted()
        else:
            self.connected(side)

    def accepted(self) -> None:
        """Check the real client against the ACL, the limits and C{pre_dial}."""
        factory = self.factory
        peer = self.client.transport.getPeer()
        self.peer = describe(peer)
        self.client_host = peer.host
        factory.events.debug("accept", conn=self.id, client=self.peer)
        if not factory.route.acl.permits_everything:
            decision = factory.route.acl.check(peer.host)
            if not decision.allowed:
                self.refuse("denied", rule=decision.rule)
                return
        if not factory.admit_client(self):
            self.refuse("limited", reason="max_connections_per_client reached")
            return
        pre_dial = factory.hooks.pre_dial
        if factory.hooks.on_read is not None or pre_dial is not None:
            host = self.client.transport.getHost()
            route = factory.route
            self.context = ConnectionContext(
                route.name, self.id, (peer.host, peer.port), (host.host, host.port), (route.host, route.target_port)
            )
        if pre_dial is None:
            self.start_resolve()
            return
        # maybeDeferred turns a raise into a failure and awaits coroutines.
        maybeDeferred(pre_dial, self.context).addCallbacks(self.pre_dial_done, self.pre_dial_failed)

    def pre_dial_done(self, allowed: object) -> None:
        if self.state is not State.CHECKING:
            return
        if allowed is False:
            self.refuse("refused", reason="pre_dial refused")
        else:
            self.start_resolve()

    def pre_dial_failed(self, reason: Failure) -> None:
        if self.state is State.CHECKING:
            self.refuse("refused", reason=f"pre_dial failed: {reason.getErrorMessage() or reason.type.__name__}")

    def refuse(self, action: str, **fields: str) -> None:
        """Close a client that may not be relayed; logged (rate-limited) by the factory."""
        self.reason = action
        self.logged = True
        self.factory.log_refusal(action, self, fields)
        self.client.abort()

    def start_resolve(self) -> None:
        self.state = State.DIALING
        route = self.factory.route
        if is_ip_literal(route.host):  # no Deferred on the common path
            self.start_dial([route.host])
            return
        resolve(self.factory.reactor, route.host, route.family).addCallbacks(
            self.start_dial, self.dial_failed
        )

    def start_dial(self, addresses: list[str]) -> None:
        if self.state is not State.DIALING:
            return
        route = self.factory.route
        self.dial = Dial(
            self.factory.reactor, addresses, route.target_port, route.connect_timeout,
            route.retries, lambda: self.factory.side_class(self, "target"), self.dial_failed,
        )
        self.dial.start()

    def hold(self, data: bytes) -> None:
        """Keep what the client sends while the target is being dialed."""
        self.held.append(data)
        self.held_size += len(data)
        if self.held_size >= HOLD_LIMIT and not self.client_paused:
            self.client_paused = True
            self.client.transport.pauseProducing()

    def connected(self, target: Side) -> None:
        if self.state is not State.DIALING:
            target.transport.abortConnection()
            return
        self.state = State.RELAYING
        self.target = target
        first = [self.proxy_header()] if self.factory.route.relay_proxy_protocol_header else []
        first += self.held
        self.held = []
        if events.enabled(LogLevel.debug):  # getHost() is a system call
            self.factory.events.debug(
                "connected", conn=self.id, client=self.peer, via=describe(target.transport.getHost())
            )
        sockets = self.splice_sockets() if self.factory.splicing and not self.client.eof else None
        if sockets is None:
            self.relay(first)
        else:
            self.start_splice(first, sockets)
        if self.factory.route.idle_timeout and not self.client.eof:
            self.arm_timer(self.factory.route.idle_timeout, "idle timeout")

    def relay(self, first: list[bytes]) -> None:
        """Relay through Twisted, writing C{first} to the target first."""
        assert self.target is not None
        client, upstream = self.client.transport, self.target.transport
        client.registerProducer(upstream, True)
        self.target.sink = client
        if self.client.eof:
            upstream.writeSequence(first)
            self.read_finished(self.client)
            return
        upstream.registerProducer(client, True)
        if self.client_paused:
            self.client_paused = False
            client.resumeProducing()
        upstream.writeSequence(first)
        self.client.sink = upstream

    def splice_sockets(self) -> tuple[tcp.Connection, tcp.Connection] | None:
        """Both sides' TCP connections, if nothing but this pair sees their bytes."""
        assert self.target is not None
        client, target = splice.socket_connection(self.client), splice.socket_connection(self.target)
        return None if client is None or target is None else (client, target)

    def start_splice(self, first: list[bytes], sockets: tuple[tcp.Connection, tcp.Connection]) -> None:
        """Hand both sockets to the splice engine, which writes C{first} to the target first."""
        self.splice = splice.Splice(self.factory.reactor, *sockets, self.spliced_bytes, preamble=b"".join(first))
        self.splice.start()
        self.factory.events.debug("spliced", conn=self.id, client=self.peer)

    def spliced_bytes(self, side: Side, count: int) -> None:
        """What C{Side.dataReceived} counts and times on the other path."""
        side.received += count
        timer = self.timer
        if timer is not None:
            timer.reset(self.timer_period)

    def proxy_header(self) -> bytes:
        """
        The PROXY header for the target: the real client (from an accepted
        inbound header, else the socket peer) and the address it reached.
        """
        peer, host = self.client.transport.getPeer(), self.client.transport.getHost()
        source, destination = unify_families((peer.host, peer.port), (host.host, host.port))
        route = self.factory.route
        if route.proxy_protocol_version == 1:
            return build_v1(source, destination)
        tlvs = []
        if route.proxy_protocol_unique_id:
            self.unique_id = f"{_RUN_ID}-{self.id}"
            tlvs.append((PP2_TYPE_UNIQUE_ID, self.unique_id.encode("ascii")))
        return build_v2(source, destination, tlvs=tlvs)

    def read_finished(self, side: Side) -> None:
        """C{side} sent a FIN: pass it on, and close once both have."""
        if self.target is None:
            return  # passed on when the target connects
        other = self.target if side is self.client else self.client
        assert other is not None
        if self.splice is None:  # spliced, the FIN follows what is in flight
            other.transport.unregisterProducer()
            other.transport.loseWriteConnection()
        if other.eof:
            self.close("done")
        else:
            self.state = State.HALF_CLOSED
            self.arm_timer(self.factory.route.half_close_timeout, "half-close timeout")

    def side_lost(self, side: Side, reason: Failure) -> None:
        if self.state is State.CLOSED:
            return
        if not self.reason:
            how = "closed" if isinstance(reason.value, ConnectionDone) else "reset"
            self.reason = f"{side.name} {how}"
        if self.target is None:
            self.state = State.CLOSED
            if self.dial is not None:
                self.dial.cancel()
            self.finished()
            return
        other = self.target if side is self.client else self.client
        assert other is not None
        if other.lost:
            self.state = State.CLOSED
            self.finished()
        else:
            other.close()

    def dial_failed(self, reason: Failure) -> None:
        if self.state is not State.DIALING:
            return
        self.reason = "dial failed"
        self.factory.events.warn(
            "dial-failed", conn=self.id, client=self.peer, reason=reason.getErrorMessage()
        )
        self.client.close()

    # -- timers and closing

    def arm_timer(self, period: float, reason: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if period:
            self.timer_period = period
            self.timer_reason = reason
            self.timer = self.factory.reactor.callLater(period, self.timed_out)

    def timed_out(self) -> None:
        """Close gracefully; if the pair is still open one period later, abort it."""
        self.timer = None
        if self.closing:
            self.abort(self.timer_reason)
        else:
            self.close(self.timer_reason)
            self.arm_timer(self.timer_period, self.timer_reason)

    def close(self, reason: str) -> None:
        """Close both sides once their buffers are flushed."""
        self.reason = self.reason or reason
        self.closing = True
        self.client.close()
        if self.target is not None:
            self.target.close()
        elif self.dial is not None:
            self.dial.cancel()

    def abort(self, reason: str) -> None:
        """Close both sides at once, dropping what is buffered."""
        self.reason = self.reason or reason
        if self.dial is not None and self.target is None:
            self.dial.cancel()
        self.client.abort()
        if self.target is not None:
            self.target.abort()

    def finished(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.logged:  # refusals have their own rate-limited event
            target_bytes = self.target.received if self.target is not None else 0
            self.factory.events.info(
                "closed", conn=self.id, client=self.peer, reason=self.reason,
                duration=self.factory.reactor.seconds() - self.started,
                bytes_up=self.client.received, bytes_down=target_bytes, unique_id=self.unique_id,
            )
        self.factory.pair_closed(self)
        self.done.callback(None)


class RelayFactory(ServerFactory):
    """A TCP route's server factory: one L{Pair} per accepted connection."""

    noisy = False

    def __init__(self, route: RouteConfig, events: RouteEvents, reactor, hooks: Hooks = NO_HOOKS) -> None:
        self.route = route
        self.events = events
        self.reactor = reactor
        self.hooks = hooks
        self.side_class = Side if hooks.on_read is None else ObservedSide
        self.splicing = splicing(route, hooks)
        self.pairs: set[Pair] = set()
        self.per_client: dict[str, int] = {}
        self.refusals = {"denied": 0, "limited": 0, "refused": 0}
        self.refusal_log = Throttle(reactor)
        #: Called whenever the number of open pairs changes (connection limits).
        self.changed: Callable[[], None] = _nothing

    def buildProtocol(self, addr: IAddress) -> Side:
        pair = Pair(self)
        self.pairs.add(pair)
        self.changed()
        return pair.client

    def admit_client(self, pair: Pair) -> bool:
        """Count the pair against C{max_connections_per_client}, if it fits."""
        limit = self.route.max_connections_per_client
        if not limit:
            return True
        count = self.per_client.get(pair.client_host, 0)
        if count >= limit:
            return False
        self.per_client[pair.client_host] = count + 1
        pair.counted_client = True
        return True

    def log_refusal(self, action: str, pair: Pair, fields: dict[str, str]) -> None:
        self.refusals[action] += 1
        suppressed = self.refusal_log.allow()
        if suppressed is not None:
            self.events.warn(action, conn=pair.id, client=pair.peer, suppressed=suppressed, **fields)

    def pair_closed(self, pair: Pair) -> None:
        self.pairs.discard(pair)
        if pair.counted_client:
            count = self.per_client.pop(pair.client_host) - 1
            if count:
                self.per_client[pair.client_host] = count
        self.changed()


def splicing(route: RouteConfig, hooks: Hooks) -> bool:
    """
    Whether a route's plain pairs are spliced: C{auto} splices where the
    platform can and no C{on_read} hook needs to see each read.
    """
    if route.splice is False:
        return False
    if hooks.on_read is not None:
        if route.splice is True:
            raise ValueError(f"route {route.name!r}: splice: true leaves nothing for its on_read hook to see")
        return False
    return splice.AVAILABLE


def _nothing() -> None:
    pass
