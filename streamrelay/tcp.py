"""
The TCP relay: a route's server factory, and one L{Pair} per connection.

A pair is the glue between its two L{Side} protocols (the client's and, once
dialed, the target's), its timer, and the state machine of
L{streamrelay.lifecycle}: sockets, dial and timer report inputs with
L{Pair.feed}, and the table picks the action, one of the pair's methods of
the same name.

Until the target connects, what the client sends is held (up to
L{HOLD_LIMIT}, then the client is paused) and becomes, behind the outbound
PROXY header, the preamble that the pair's relay path writes first (see
L{streamrelay.paths}).  A side paused because the other cannot take more is
kept in the L{HangupWatch}, so a reset of the paused side is seen at once.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Protocol as Interface

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol, IPushProducer
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory, connectionDone
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from . import events, hub, lean, splice
from .agentheader import Refusal, Request, encode_header
from .addresses import HOLD_LIMIT, RUN_ID, describe, join_host_port
from .bandwidth import Meter, Shaper
from .config import RouteConfig, UpstreamTLSConfig
from .compat import connection_under
from .dial import Attempt, Dial, is_ip_literal, resolve
from .events import RefusalLog, RouteEvents
from .gateway import BAD_LINE, DIAL_FAILED, DIAL_TIMEOUT, OK, Gateway, answer
from .hangups import HangupWatch, watch_for
from .hooks import NO_HOOKS, ConnectionContext, Hooks, OnRead
from .inbound import received_header
from .interfaces import IRelayReactor, IRelayTransport
from .lifecycle import DEADLINES, TRANSITIONS, Input, State
from .paths import TRANSPORTS, RelayPath, SplicePath
from .proxyproto import PP2_TYPE_UNIQUE_ID, SSLInfo, build_v1, build_v2, tls_tlvs, unify_families
from .ratelimit import RateLimiter
from .sni import server_name
from .stats import RouteStats, dial_failure_kind
from .balance import Target
from .targets import TargetPool
from .tlscontext import client_context, server_context
from .tlslayer import TLSFacts, TLSLayer

__all__ = ["Pair", "RelayFactory", "Side", "TLSTerminator", "UpstreamTLS"]

_connection_ids = itertools.count(1)

#: The C{reason} of a pair closed by its state's deadline.
_TIMEOUT_REASONS = {
    State.CHECKING: "dial timeout",
    State.DIALING: "dial timeout",
    State.RELAYING: "idle timeout",
    State.HALF_CLOSED: "half-close timeout",
    State.CLOSING: "close timeout",
}


#: Why a L{Side} stops reading: the other side's transport cannot take more, ...
BACKPRESSURE = 1
#: ... or the side read more than its C{bandwidth} buckets allow.
THROTTLED = 2


@implementer(IHalfCloseableProtocol, IPushProducer)
class Side(Protocol):
    """
    One of a pair's two connections.  It writes what it reads straight into
    C{sink}, the other side's transport, and reports the rest to its pair.
    It is also the producer the other side's transport pauses when its
    write buffer is full, and under a route's C{bandwidth} it stops reading
    itself when its C{meter} says so: two reasons to pause, each lifted on
    its own (L{paused}).
    """

    transport: IRelayTransport

    def __init__(self, pair: Pair, name: str) -> None:
        self.pair = pair
        self.name = name
        self.sink: IRelayTransport | None = None
        self.received = 0
        self.eof = False
        self.lost = False
        self.watched_fd = -1  # in the hangup watch while paused
        #: Why reading is stopped: L{BACKPRESSURE}, L{THROTTLED}, both, or 0.
        self.paused = 0
        #: What this side's reads are charged to under a route's C{bandwidth} (set by L{Pair.relay}).
        self.meter: Meter | None = None
        self.refill: IDelayedCall | None = None  # while THROTTLED: when to read again

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
        meter = self.meter
        if meter is not None and not meter.charge(len(data)) and self.refill is None:
            self.pause(THROTTLED)
            self.refill = meter.later(self.refilled)

    def refilled(self) -> None:
        """Read again once the buckets allow, unless others emptied the shared ones meanwhile."""
        assert self.meter is not None
        if self.meter.delay():
            self.refill = self.meter.later(self.refilled)
        else:
            self.refill = None
            self.resume(THROTTLED)

    def readConnectionLost(self) -> None:
        if not self.eof:
            self.eof = True
            self.pair.feed(Input.FIN, self)

    def writeConnectionLost(self) -> None:
        """Our FIN went out; nothing to do until the peer finishes too."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.unwatch()
        if self.meter is not None:
            self.meter.close()
            if self.refill is not None:
                self.refill.cancel()
                self.refill = None
        self.pair.side_lost(self, reason)

    # -- IPushProducer, for the other side's transport

    def pauseProducing(self) -> None:
        self.pause(BACKPRESSURE)

    def resumeProducing(self) -> None:
        self.resume(BACKPRESSURE)

    def pause(self, reason: int) -> None:
        """Stop reading for C{reason}; a paused socket is watched for resets."""
        if not self.paused:
            self.transport.pauseProducing()
            self.watched_fd = self.transport.fileno()
            self.pair.factory.watch.add(self.transport.getHandle(), self.hung_up)
        self.paused |= reason

    def resume(self, reason: int) -> None:
        """C{reason} is gone: read again, unless the other one still holds."""
        if self.paused == reason:
            self.unwatch()
            self.transport.resumeProducing()
        self.paused &= ~reason

    def stopProducing(self) -> None:
        """The other side is gone: what happens to this one is the pair's decision."""
        self.unwatch()

    def unwatch(self) -> None:
        if self.watched_fd >= 0:
            self.pair.factory.watch.discard(self.watched_fd)
            self.watched_fd = -1

    def hung_up(self, error: int) -> None:
        """The watch saw the paused socket fail (or hang up, C{error} 0)."""
        self.watched_fd = -1
        if error and not self.lost:
            self.transport.abortConnection()


class ObservedSide(Side):
    """A side whose reads are also reported to an C{on_read} hook."""

    def __init__(self, pair: Pair, name: str) -> None:
        super().__init__(pair, name)
        on_read = pair.factory.hooks.on_read
        assert on_read is not None  # the factory only makes these for routes with the hook
        self.on_read: OnRead = on_read
        self.direction = "up" if name == "client" else "down"
        self.observing = True

    def dataReceived(self, data: bytes) -> None:
        context = self.pair.context
        # No context: a client refused (ACL, limits) before one was built,
        # still handed the bytes that followed its inbound PROXY header.
        if self.observing and context is not None:
            try:
                self.on_read(context, len(data), self.direction)
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
        self.client: Side = factory.side_class(self, "client")
        self.target: Side | None = None
        self.path: RelayPath = TRANSPORTS
        self.open_sides = 0
        self.pending: Deferred[Any] | None = None  # the pre_dial hook, or name resolution
        self.connecting: Dial | None = None
        self.held: list[bytes] = []
        self.held_size = 0
        self.client_paused = False
        self.timer: IDelayedCall | None = None
        self.timer_period = 0.0
        self.reason = ""
        self.refused = False  # refusals have their own throttled event instead of "closed"
        self.unique_id: str | None = None
        self.peer = ""
        self.client_host = ""
        self.counted_client = False
        self.context: ConnectionContext | None = None
        route = factory.route
        self.target_host, self.target_port = route.host, route.target_port  # a gateway's line names them
        #: On a route with a port range: the port the client connected to, once accepted.
        self.listen_port = 0
        #: With several targets: the one being dialed or relayed to, and those that failed this pair.
        self.chosen: Target | None = None
        self.tried: list[Target] = []
        self.awaiting_request = False
        self.started = factory.reactor.seconds()
        self._done: Deferred[None] | None = None

    @property
    def done(self) -> Deferred[None]:
        """Fires once the pair is closed; made when first asked for, as most pairs are never waited for."""
        if self._done is None:
            self._done = succeed(None) if self.state is State.CLOSED else Deferred()
        return self._done

    # -- the state machine

    def feed(self, input: Input, side: Side | None = None, detail: Any = None) -> None:
        """Take C{input}: move to the table's next state and run its action."""
        step = TRANSITIONS.get((self.state, input))
        if step is None:
            return  # absorbed (lifecycle.IGNORED)
        state, action = step
        if state is self.state:
            if action:
                getattr(self, action)(side, detail)
            return
        self.state = state
        if action:
            getattr(self, action)(side, detail)
        if self.state is state:  # the action did not end the state at once (a close that had nothing to flush)
            self.arm(state)

    def arm(self, state: State) -> None:
        """Start C{state}'s deadline; DIALING keeps the one CHECKING started."""
        if state is State.DIALING:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        period = self.factory.deadlines[state]
        if period:
            self.timer_period = period
            self.timer = self.factory.reactor.callLater(period, self.timed_out)

    def idle_seconds(self) -> float | None:
        """
        Seconds since bytes last moved, where a deadline keeps track of it
        (C{idle_timeout}, C{half_close_timeout}); C{None} elsewhere, as
        nothing on the relay path notes the time of each read.
        """
        timer = self.timer
        if timer is None or self.state not in (State.RELAYING, State.HALF_CLOSED):
            return None
        return max(0.0, self.timer_period - (timer.getTime() - self.factory.reactor.seconds()))

    def timed_out(self) -> None:
        self.timer = None
        self.feed(Input.TIMEOUT, detail=_TIMEOUT_REASONS[self.state])

    # -- inputs from the sides

    def side_connected(self, side: Side) -> None:
        self.open_sides += 1
        if side is self.client:
            self.accepted()
        else:
            self.feed(Input.CONNECTED, side)

    def side_lost(self, side: Side, reason: Failure) -> None:
        if not self.reason:
            how = "closed" if isinstance(reason.value, ConnectionDone) else "reset"
            self.reason = f"{side.name} {how}"
        self.open_sides -= 1
        self.feed(Input.LOST if self.open_sides else Input.GONE, side)

    def hold(self, data: bytes) -> None:
        """Keep what the client sends while the target is being reached."""
        self.held.append(data)
        self.held_size += len(data)
        if self.awaiting_request:
            self.read_request()
        elif self.held_size >= HOLD_LIMIT and not self.client_paused:
            self.client_paused = True
            self.client.transport.pauseProducing()

    # -- checking

    def accepted(self) -> None:
        """Check the real client against the ACL, the limits and C{pre_dial}."""
        factory = self.factory
        peer = self.client.transport.getPeer()
        self.peer = describe(peer)
        self.client_host = peer.host
        factory.stats.accepted += 1
        if events.enabled(LogLevel.debug):
            factory.events.debug("accept", conn=self.id, client=self.peer)
        self.arm(State.CHECKING)
        route = factory.route
        if route.port_count > 1:
            self.listen_port = accepted_port(self.client.transport)
            self.target_port = route.target_port_for(self.listen_port)
        if not route.acl.permits_everything:
            decision = route.acl.check(self.client_host)
            if not decision.allowed:
                self.feed(Input.REFUSED, detail=("denied", {"rule": decision.rule}))
                return
        if factory.gateway is not None and factory.gateway.banned(self.client_host):
            self.feed(Input.REFUSED, detail=("banned", {}))
            return
        if factory.limiter is not None:
            over = factory.limiter.admit(self.client_host)
            if over is not None:
                self.feed(Input.REFUSED, detail=("rate-limited", {"limit": over}))
                return
        if not factory.admit_client(self):
            self.feed(Input.REFUSED, detail=("limited", {"reason": "max_connections_per_client reached"}))
            return
        pre_dial = factory.hooks.pre_dial
        if factory.hooks.on_read is None and pre_dial is None:
            self.admitted()
            return
        host = self.client.transport.getHost()
        self.context = context = ConnectionContext(
            route.name, self.id, (self.client_host, peer.port),
            (host.host, host.port), (route.host, self.target_port),
        )
        if pre_dial is None:
            self.admitted()
            return
        # maybeDeferred turns a raise into a failure and awaits coroutines;
        # cancelling it (the client left, the budget ran out) cancels those.
        self.pending = checking = maybeDeferred(pre_dial, context)
        checking.addCallbacks(self.pre_dial_done, self.pre_dial_failed)

    def pre_dial_done(self, allowed: object) -> None:
        self.pending = None
        if allowed is False:
            self.feed(Input.REFUSED, detail=("refused", {"reason": "pre_dial refused"}))
        else:
            self.admitted()

    def pre_dial_failed(self, reason: Failure) -> None:
        self.pending = None
        # Failure.type is only None before a Failure is built (Twisted's inferred type).
        why = reason.getErrorMessage() or reason.type.__name__  # type: ignore[union-attr]
        self.feed(Input.REFUSED, detail=("refused", {"reason": f"pre_dial failed: {why}"}))

    def admitted(self) -> None:
        """
        Through the checks: dial, once the client's TLS handshake is done
        (its certificate checked, the facts for the PROXY header known) and
        a gateway's or an agent's client has named its target.
        """
        layer = self.client.transport
        if isinstance(layer, TLSLayer) and layer.facts is None:
            if self.timer is not None:  # the handshake has its own timeout; the dial budget starts after it
                self.timer.cancel()
                self.timer = None
            self.pending = layer.handshake  # a failure comes to tls_failed instead
            layer.handshake.addCallbacks(self.handshake_done, lambda _: None)  # or cancelled: the pair gave up
        elif self.factory.requests is None:
            self.feed(Input.ADMITTED)
        else:
            self.awaiting_request = True
            self.read_request()

    def handshake_done(self, facts: TLSFacts) -> None:
        self.pending = None
        self.arm(State.CHECKING)
        self.admitted()

    def tls_failed(self, reason: str) -> None:
        """
        The client's handshake failed, whatever the pair was doing: the layer
        closes the connection itself (with the alert), and the pair finishes
        when it is gone.
        """
        if self.state is not State.CHECKING:
            return  # refused already (the ACL, a limit): one refusal is logged
        self.pending = None
        self.refused = True
        self.reason = "tls handshake failed"
        self.factory.refusals.refuse("tls-failed", conn=self.id, client=self.peer, reason=reason)

    def read_request(self) -> None:
        """
        Look for the request naming the target (a gateway's line, an agent's
        header) in what the client sent: the target it names is dialed, and
        the bytes after it stay held for the target.  A probe is answered by
        closing.
        """
        requests = self.factory.requests
        assert requests is not None
        data = b"".join(self.held)
        found = requests.take(data, self.client_host)
        if found is None:
            self.held = [data]
            return
        self.awaiting_request = False
        if len(found) == 3:
            self.feed(Input.REFUSED, detail=found)
            return
        request, size = found
        rest = data[size:]
        self.held, self.held_size = ([rest] if rest else []), len(rest)
        if self.timer is not None:  # the request's timeout: each connect attempt has its own from here
            self.timer.cancel()
            self.timer = None
        self.target_host, self.target_port = request.host, request.port
        if request.probe:
            self.feed(Input.SHUTDOWN, detail="probe")
        else:
            self.feed(Input.ADMITTED)

    # -- actions (named in lifecycle.TRANSITIONS)

    def dial(self, side: None, detail: None) -> None:
        """Resolve the target or its agent (IP literals need no Deferred), then dial it; or pick one of several."""
        route = self.factory.route
        host = route.agent.host if route.agent is not None else self.target_host
        pool = self.factory.pool
        if pool is not None:
            if pool.ready.called:
                self.dial_next(pool)
            else:  # the first DNS answers are not in yet
                self.pending = pool.when_ready()
                self.pending.addCallbacks(lambda _: self.dial_next(pool), lambda _: None)  # or cancelled
            return
        if is_ip_literal(host):
            self.start_dial([host])
            return
        self.pending = resolving = resolve(self.factory.reactor, host, route.family)
        resolving.addCallbacks(self.start_dial, self.dial_failed)

    def start_dial(self, addresses: list[str]) -> None:
        self.pending = None
        factory = self.factory
        agent = factory.route.agent
        self.connecting = Dial(
            factory.reactor, addresses, agent.port if agent is not None else self.target_port, factory.connect_timeout,
            factory.retries, self.target_protocol, self.dial_failed, factory.connect,
        )
        self.connecting.start()

    def target_protocol(self) -> Protocol:
        """
        The target's side, behind a TLS layer with C{upstream_tls} or an
        C{agent} (it connects once the target, or the agent, is verified).
        """
        factory = self.factory
        side = factory.side_class(self, "target")
        upstream = factory.upstream
        if upstream is None:
            return side
        return TLSLayer(
            side, upstream.context, server=False, reactor=factory.reactor, handshake_timeout=factory.connect_timeout,
            server_name=upstream.server_name, verify=upstream.verify, on_failure=self.upstream_failed,
        )

    def upstream_failed(self, reason: str) -> None:
        """The target's TLS handshake or certificate failed: never fall back to plaintext."""
        self.connecting = None
        self.feed(Input.DIAL_FAILED, detail=("tls", f"tls: {reason}"))

    def dial_failed(self, reason: Failure) -> None:
        self.pending = None
        self.feed(Input.DIAL_FAILED, detail=(dial_failure_kind(reason), reason.getErrorMessage()))

    def dial_next(self, pool: TargetPool, last_failure: Failure | None = None) -> None:
        """
        Dial the target the balancer picks, one attempt each; a failed one
        moves to another eligible target (the same one again only within
        C{retries}) while the dial budget lasts.
        """
        self.pending = None
        factory = self.factory
        target = pool.pick(self.client_host, self.tried)
        if target is None and len(self.tried) <= factory.retries:
            target = pool.pick(self.client_host, [])
        if target is None:
            if last_failure is not None:
                self.dial_failed(last_failure)
            else:
                self.feed(Input.DIAL_FAILED, detail=("no-target", "no live target"))
            return
        self.chosen = target
        self.target_host, self.target_port = target.host, target.port
        self.connecting = Dial(
            factory.reactor, [target.host], target.port, factory.connect_timeout, 0, self.target_protocol,
            self.target_failed, factory.connect,
        )
        self.connecting.start()

    def target_failed(self, reason: Failure) -> None:
        """One of several targets could not be reached: note it, and try another."""
        pool, target = self.factory.pool, self.chosen
        assert pool is not None and target is not None
        self.connecting, self.chosen = None, None
        pool.failed(target, reason.getErrorMessage())
        self.tried.append(target)
        self.dial_next(pool, reason)

    def refuse(self, side: None, detail: tuple[str, dict[str, Any]] | Refusal) -> None:
        """
        Reset a client that may not be relayed; logged per kind, throttled.
        A client whose request was refused (L{Refusal}) is sent the reply,
        if any (a gateway's C{status}), and closed instead.
        """
        kind, fields, *reply = detail
        self.refused = True
        self.factory.refusals.refuse(kind, conn=self.id, client=self.peer, **fields)
        status = fields.get("status")
        self.reason = kind if status is None else f"{kind} {status}"
        if reply:
            self.client.transport.write(reply[0])
            self.path.close(self.client)
        else:
            self.path.abort(self.client)

    def give_up(self, side: None, detail: str | tuple[str, str]) -> None:
        """
        The target cannot be reached (in time): close the client.  C{detail}
        is the budget's timeout reason, or a failed dial's kind and message.
        """
        if self.awaiting_request:
            assert self.factory.requests is not None
            self.awaiting_request = False
            self.refuse(side, self.factory.requests.timed_out())
            return
        kind, message = detail if isinstance(detail, tuple) else ("timeout", detail)
        self.reason = "dial failed"
        self.stop_reaching()
        if self.factory.gateway is not None:
            self.client.transport.write(answer(DIAL_TIMEOUT if kind == "timeout" else DIAL_FAILED))
        self.factory.stats.dial_failures[kind] += 1
        # No target picked among several: name them all (the route's dst), not the first.
        target = self.factory.route.dst if kind == "no-target" else join_host_port(self.target_host, self.target_port)
        self.factory.events.warn("dial-failed", conn=self.id, client=self.peer, reason=message, target=target)
        self.path.close(self.client)

    def relay(self, target: Side, detail: None) -> None:
        """
        The target connected: pick the relay path, which writes the outbound
        PROXY header and the held bytes first.
        """
        self.target = target
        self.connecting = None
        factory = self.factory
        if self.chosen is not None:
            factory.pool.succeeded(self.chosen)  # type: ignore[union-attr]  # a chosen target has its pool
        preamble = [self.proxy_header()] if factory.route.relay_proxy_protocol_header else []
        if factory.route.agent is not None:  # the agent reads its header first; the PROXY header is the target's
            preamble.insert(0, encode_header(self.target_host, self.target_port))
        preamble += self.held
        self.held = []
        if events.enabled(LogLevel.debug):  # getHost() is a system call
            factory.events.debug(
                "connected", conn=self.id, client=self.peer, via=describe(target.transport.getHost()),
                **({"target": join_host_port(self.target_host, self.target_port)} if factory.pool else {}),
            )
        if self.client_paused:
            self.client_paused = False
            self.client.transport.resumeProducing()
        if factory.shaper is not None:  # the bandwidth from now on: reads up, reads down
            self.client.meter, target.meter = factory.shaper.open(self.client_host)
        if factory.gateway is not None:
            self.client.transport.write(answer(OK))  # the splice engine takes only empty buffers
        elif factory.splicing and not self.client.eof:
            spliced = SplicePath.of(self.client, target, factory.reactor, self.spliced_bytes, factory.watch)
            if spliced is not None:
                self.path = spliced
                factory.stats.spliced += 1
                if events.enabled(LogLevel.debug):
                    factory.events.debug("spliced", conn=self.id, client=self.peer)
                for side in (self.client, target):
                    if side.meter is not None:
                        spliced.engine.limit(side, side.meter)
        self.path.start(self.client, target, preamble)
        if self.client.eof:
            self.feed(Input.FIN, self.client)

    def drop_target(self, target: Side, detail: None) -> None:
        """A target that connected after the pair gave up."""
        TRANSPORTS.abort(target)

    def pass_fin(self, side: Side, detail: None) -> None:
        self.path.half_close(self.other(side))

    def close_all(self, side: Side | None, detail: str | None) -> None:
        """Close both sides once what is buffered towards them is written."""
        self.reason = self.reason or detail or "done"
        self.stop_reaching()
        self.path.close(self.client)
        if self.target is not None:
            self.path.close(self.target)

    def close_survivor(self, lost: Side, detail: None) -> None:
        """One side is gone: flush the other, within C{close_timeout}."""
        self.path.close(self.other(lost))

    def abort_all(self, side: None, detail: str) -> None:
        """Reset both sides now, dropping what is buffered."""
        self.reason = self.reason or detail
        self.stop_reaching()
        self.path.abort(self.client)
        if self.target is not None:
            self.path.abort(self.target)

    def finish(self, side: Side | None, detail: None) -> None:
        """Every socket is closed: log, count, and tell whoever waits."""
        self.stop_reaching()
        factory = self.factory
        target_bytes = self.target.received if self.target is not None else 0
        stats = factory.stats
        stats.closed[self.reason] += 1
        stats.bytes_up += self.client.received
        stats.bytes_down += target_bytes
        if not self.refused:
            factory.events.info(
                "closed", conn=self.id, client=self.peer, reason=self.reason,
                duration=factory.reactor.seconds() - self.started,
                bytes_up=self.client.received, bytes_down=target_bytes, unique_id=self.unique_id,
                **self.closed_fields(),
            )
        factory.pair_closed(self)
        if self.chosen is not None:
            factory.pool.done(self.chosen)  # type: ignore[union-attr]
            self.chosen = None
        if self._done is not None and not self._done.called:
            self._done.callback(None)

    # -- helpers

    def closed_fields(self) -> dict[str, str | int]:
        """
        What the C{closed} event adds on some routes: the listening port of
        a range, the target picked among several, and the ids a cloud load
        balancer's PROXY header carried (AWS, Azure, GCP).
        """
        fields: dict[str, str | int] = {}
        factory = self.factory
        if self.listen_port:
            fields["port"] = self.listen_port
        if factory.pool is not None:
            fields["target"] = join_host_port(self.target_host, self.target_port)
        if factory.route.proxy_protocol.mode != "disabled":
            info = received_header(self.client.transport)
            if info is not None:
                fields.update(info.vendor)
        return fields

    def other(self, side: Side) -> Side:
        target = self.target
        assert target is not None
        return target if side is self.client else self.client

    def stop_reaching(self) -> None:
        """Cancel a hook, a resolution or a dial still in progress."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.cancel()
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None

    def spliced_bytes(self, side: Any, count: int) -> None:
        """What L{Side.dataReceived} counts and times on the other path."""
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
        tlvs = self.tls_tlvs()
        if route.proxy_protocol_unique_id:
            self.unique_id = f"{RUN_ID}-{self.id}"
            tlvs.append((PP2_TYPE_UNIQUE_ID, self.unique_id.encode("ascii")))
        return build_v2(source, destination, tlvs=tlvs)

    def tls_tlvs(self) -> list[tuple[int, bytes]]:
        """
        What the relay learned of the client's TLS, for the PROXY v2 header:
        a terminated handshake's facts, or the name a passed-through
        client asked for.
        """
        layer = self.client.transport
        if not isinstance(layer, TLSLayer):
            name = server_name(layer)
            return tls_tlvs(authority=name, alpn=None, ssl=None) if name else []
        facts = layer.facts
        if facts is None:
            return []
        ssl = SSLInfo(
            client_ssl=True, client_cert_conn=facts.client_cert, client_cert_sess=facts.client_cert,
            verified=facts.client_verified, version=facts.version, cipher=facts.cipher,
            sig_alg=facts.sig_alg, key_alg=facts.key_alg, cn=facts.client_cn,
        )
        return tls_tlvs(authority=facts.server_name, alpn=facts.alpn, ssl=ssl)


class RelayFactory(ServerFactory):
    """
    A TCP route's server factory: one L{Pair} per accepted connection.  A
    pair reads its settings here for its whole life, so a reload gives new
    connections a new factory, sharing C{per_client} with the older ones.
    """

    noisy = False
    #: The route's C{rate_limit} buckets, set by its service (shared with later generations).
    limiter: RateLimiter | None = None
    #: The route's C{bandwidth} buckets, likewise.
    shaper: Shaper | None = None
    #: The route's several targets, set by its service; None: C{host} alone.
    pool: TargetPool | None = None

    def __init__(
        self, route: RouteConfig, events: RouteEvents, refusals: RefusalLog, reactor: IRelayReactor,
        hooks: Hooks = NO_HOOKS, stats: RouteStats | None = None, per_client: dict[str, int] | None = None,
    ) -> None:
        self.route = route
        self.events = events
        self.refusals = refusals
        self.reactor = reactor
        self.hooks = hooks
        self.stats = stats or RouteStats()
        self.side_class: type[Side] = Side if hooks.on_read is None else ObservedSide
        self.splicing = splicing(route, hooks)
        self.deadlines = deadlines(route, hooks)
        self.gateway = Gateway(route.gateway, reactor) if route.gateway is not None else None
        #: What reads the request naming the target, where clients name it (a gateway, an agent).
        self.requests: TargetRequests | None = GatewayRequests(self.gateway) if self.gateway is not None else None
        self.upstream = UpstreamTLS.of(route)
        #: How the target is dialed: a gateway's own settings, or the route's.
        self.connect_timeout = route.gateway.timeout if route.gateway else route.connect_timeout
        self.retries = route.gateway.retry - 1 if route.gateway else route.retries
        #: Whether pairs are plain both ways and spliced, so that lean transports
        #: (L{streamrelay.lean}) can carry them: the target's always, the
        #: client's where the route's port gives connections straight to this factory.
        self.lean = (
            self.splicing and self.upstream is None and self.gateway is None and isinstance(reactor, PosixReactorBase)
            and hub.AVAILABLE
        )
        if self.lean:
            hub.hub_for(reactor)  # its descriptor, from the route's start rather than its first connection
        self.watch: HangupWatch = watch_for(reactor)
        #: Open pairs, oldest first (a dict keeps the order; the values mean nothing).
        self.pairs: dict[Pair, None] = {}
        #: Open pairs per real client host, for C{max_connections_per_client}.
        self.per_client: dict[str, int] = {} if per_client is None else per_client
        #: Called whenever the number of open pairs changes (connection limits).
        self.changed: Callable[[], None] = _nothing

    def buildProtocol(self, addr: IAddress | None) -> Side:
        pair = Pair(self)
        self.pairs[pair] = None
        self.changed()
        return pair.client

    def connect(self, host: str, port: int, factory: ClientFactory, timeout: float) -> Attempt:
        """Start one attempt to reach a target (L{Dial} makes them): lean where the pairs are."""
        if self.lean:
            return lean.connect(self.reactor, host, port, factory, timeout)
        return self.reactor.connectTCP(host, port, factory, timeout)

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

    def pair_closed(self, pair: Pair) -> None:
        self.pairs.pop(pair, None)
        if pair.counted_client:
            count = self.per_client.pop(pair.client_host) - 1
            if count:
                self.per_client[pair.client_host] = count
        self.changed()


class UpstreamTLS:
    """How a route's targets (or its agent) are reached over TLS: the context, and the name to send and verify."""

    def __init__(self, settings: UpstreamTLSConfig, host: str) -> None:
        self.context = client_context(settings)
        self.server_name = settings.server_name or host
        self.verify = settings.verify

    @classmethod
    def of(cls, route: RouteConfig) -> UpstreamTLS | None:
        if route.agent is not None:
            return cls(route.agent.upstream, route.agent.host)
        return cls(route.upstream_tls, route.host) if route.upstream_tls is not None else None


class TargetRequests(Interface):
    """Reads what a client sends first to name its target (a gateway's line, an agent's header)."""

    def take(self, data: bytes, client_host: str) -> tuple[Request, int] | Refusal | None:
        """The request and the bytes it took, a refusal, or C{None}: not all of it yet."""

    def timed_out(self) -> Refusal:
        """The refusal of a client that did not name its target in time."""


class GatewayRequests:
    """A gateway's line: up to a newline, within C{max_line}."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def take(self, data: bytes, client_host: str) -> tuple[Request, int] | Refusal | None:
        max_line = self.gateway.settings.max_line
        end = data.find(b"\n", 0, max_line + 1)
        if end < 0:
            return _gateway_refusal(BAD_LINE, "no line within max_line") if len(data) > max_line else None
        found = self.gateway.read(data[:end], client_host)
        if isinstance(found[0], int):
            return _gateway_refusal(*found)
        host, port = found
        return Request(host, port), end + 1

    def timed_out(self) -> Refusal:
        return _gateway_refusal(BAD_LINE, "no line within line_timeout")


def _gateway_refusal(status: int, why: object) -> Refusal:
    return "gateway", {"status": status, "reason": why}, answer(status)


class TLSTerminator(ServerFactory):
    """
    A route's factory behind a TLS layer (C{tls}): the pair's client side
    reads plaintext, and the pair waits for the handshake before dialing.
    """

    noisy = False

    def __init__(self, relay: RelayFactory) -> None:
        settings = relay.route.tls
        assert settings is not None
        self.relay = relay
        self.context = server_context(settings)
        self.handshake_timeout = settings.handshake_timeout

    def buildProtocol(self, addr: IAddress | None) -> TLSLayer:
        side = self.relay.buildProtocol(addr)
        return TLSLayer(
            side, self.context, server=True, reactor=self.relay.reactor,
            handshake_timeout=self.handshake_timeout, on_failure=side.pair.tls_failed,
        )


def deadlines(route: RouteConfig, hooks: Hooks) -> dict[State, float]:
    """
    Each state's deadline on this route, in seconds (0: none).  Where nothing
    but the connect attempts can take time (no C{pre_dial} hook, an IP
    literal target, no C{dial_timeout} of its own), their own timeouts add up
    to the default budget, so CHECKING needs no timer of its own.
    """
    periods = {state: float(getattr(route, setting)) if setting else 0.0 for state, setting in DEADLINES.items()}
    if route.gateway is not None:  # until the line is read; then each connect attempt has its timeout
        periods[State.CHECKING] = route.gateway.line_timeout
        return periods
    if (
        not route.dial_timeout and hooks.pre_dial is None and is_ip_literal(route.host) and route.upstream_tls is None
        and not route.targets and route.agent is None
    ):
        periods[State.CHECKING] = 0.0
    return periods


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


def accepted_port(transport: object) -> int:
    """
    The local port of the accepted socket under a pair's client transport
    and the layers over it (TLS, an inbound PROXY header's wrapper, whose
    C{getHost} answers with the header's destination).
    """
    port: int = connection_under(transport).getHost().port
    return port


def _nothing() -> None:
    pass
