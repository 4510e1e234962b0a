"""
The UDP relay.

A route's listening socket belongs to a L{DatagramRelay}.  The first datagram
from a new client address opens a L{Session}: a socket of its own, connected
to the target, so that the kernel delivers it the target's replies and
nothing else.  Each reply goes back to the client from the listening socket,
so the client sees it come from the address it wrote to.  Sessions live in a
table keyed by the client's C{(host, port)}, exactly as the listener reports
it (C{::ffff:a.b.c.d} for IPv4 clients of a dual-stack listener, which is
also the form that socket needs to answer them).

A route's C{pre_dial} hook, if set, is asked once per session, after the
ACL and the session limit and before the session's socket opens; what the
client sends meanwhile is held.  A refusal drops it and removes the session,
so the client's next datagram asks again; a decision still pending
C{udp_idle_timeout} after the session began is cancelled, however busy the
client, so a hook that never answers cannot keep a table entry.

A session ends when a sweep finds it idle for C{udp_idle_timeout}, when its
target proves unreachable (an ICMP error on its connected socket), or at
shutdown; its socket is closed and its table entry removed at the same time.
A session keeps the route settings it began with (target, idle timeout,
events) when a reload gives the relay new ones (L{DatagramRelay.configure}).

The per-datagram path is two counter increments and one system call each
way.  It calls the sockets' own C{send}/C{sendto} rather than
C{transport.write}, which re-validates the address of every datagram; a
session's socket reads one reply per readiness event (L{SessionPort}), and
the process's session sockets are polled together, one reactor event for
all that are ready (L{streamrelay.hub.Hub}); and it keeps no timestamps: the sweep notices activity by comparing counters.  An
C{on_read} hook gets sessions of their own class (L{ObservedSession}), so
routes without one pay nothing for it.

The PROXY protocol over UDP (L{streamrelay.datagrams}) and the session
limits C{udp_max_replies}/C{udp_max_requests} are chosen once too: a route
with inbound headers gets a different C{datagramReceived} (its sessions are
keyed by C{(proxy peer, real client)} and answer the peer), and a session
that sends headers or counts requests or replies gets other C{send} and
C{reply} callables when it opens; a route without them runs the path above.

A route with a port range has one socket per port, each with a L{Door} as
its protocol (a Twisted protocol serves one port), and one relay behind
them all: one session table, limit, set of counters and sweep.  A door's
sessions are keyed by the client and the port, relay to the target port at
the port's offset, and reply through the door's socket.  The door does the
key's extra work; a route with one port has no door and pays nothing.
"""

from __future__ import annotations

import errno
import itertools
from functools import cache, cached_property
from typing import Any, Callable, Union, cast

from OpenSSL import SSL
from twisted.internet import udp
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from . import dtls
from .addresses import HOLD_LIMIT, RUN_ID, describe, join_host_port
from .agentheader import encode_header
from .bandwidth import Meter, Shaper
from .compat import SessionPort
from .config import AgentLinkConfig, RouteConfig
from .datagrams import MAX_UDP_PAYLOAD, DatagramDropped, read_header, session_header
from .dial import resolve
from .balance import Target
from .events import RefusalLog, RouteEvents
from .hooks import NO_HOOKS, ConnectionContext, Hooks, OnRead, PreDial
from .interfaces import IRelayReactor
from .ratelimit import RateLimiter
from .stats import RouteStats
from .targets import TargetPool

__all__ = ["MAX_DATAGRAM", "DatagramRelay", "Door", "Listener", "ObservedSession", "Session", "next_session_id"]

#: Read size of every socket: the largest UDP payload (65,507 bytes over
#: IPv4, 65,527 over IPv6) fits, so nothing is truncated.  Twisted's default
#: of 8192 silently would.
MAX_DATAGRAM = 65535

Address = tuple[str, int]
#: The client part of a session's key: the client's address, or on a route
#: with inbound PROXY headers C{(proxy peer, real client)}.
ClientKey = Union[Address, tuple[Address, Address]]
#: A session's key in its relay's table: its L{ClientKey}, on a route with a
#: port range together with the listening port (a client may write to several).
SessionKey = Union[ClientKey, tuple[ClientKey, int]]

#: Session ids: the C{conn} of the logs and of the hooks' context.
_session_ids = itertools.count(1)
#: The next session id (the agent's UDP sessions share the sequence).
next_session_id = _session_ids.__next__


class Session(DatagramProtocol):
    """
    One client's datagrams, relayed through a socket connected to the
    target.  Until that socket exists (the C{pre_dial} hook is deciding, the
    target's name is being resolved) what the client sends is held, up to
    L{HOLD_LIMIT} bytes.

    C{client} is the real client (for the ACL, hooks, logs and any outbound
    header); C{peer}, where replies go, is the proxy that sent the client's
    datagrams with a PROXY header, else the client itself.  C{destination}
    is the address the client wrote to, when an inbound header says.
    """

    noisy = False

    def __init__(
        self, relay: DatagramRelay, client: Address, peer: Address | None = None, destination: Address | None = None,
        door: Door | None = None,
    ) -> None:
        self.relay = relay
        route = self.route = relay.route
        self.events = relay.events
        self.client = client
        self.peer = client if peer is None else peer
        #: The listening socket the client wrote to, which replies leave through: a range route's L{Door}.
        self.listener: Listener = relay if door is None else door
        key: ClientKey = client if peer is None else (peer, client)
        self.key: SessionKey = key if door is None else (key, door.number)
        self.destination = destination
        self.id = next(_session_ids)
        self.started = self.last_active = relay.reactor.seconds()
        self.seen = 0
        self.datagrams_up = self.bytes_up = 0
        self.datagrams_down = self.bytes_down = 0
        self.dropped = 0
        self.held: list[bytes] = []
        self.held_size = 0
        self.send: Callable[[bytes], Any] = self.hold
        self.reply = self.listener.sendto if not route.udp_max_replies else self.reply_then_close
        self.requests = 0
        self.port: SessionPort | None = None
        #: On a route with C{agent}: the DTLS session to the agent, in place of C{port}.
        self.tunnel: dtls.DTLSClient | None = None
        self.decision: Deferred[object] | None = None  # the pending pre_dial hook's
        self.closed = False
        #: With several targets: the one this session's socket is connected to, for its whole life.
        self.chosen: Target | None = None
        self.target_port = route.target_port if door is None else route.target_port_for(door.number)

    @cached_property
    def context(self) -> ConnectionContext:
        """What the hooks are told; built for sessions that have hooks only."""
        route = self.route
        return ConnectionContext(route.name, self.id, self.client, self.listener.listen, (route.host, self.target_port))

    # -- the datagram path

    def up(self, data: bytes) -> None:
        """A datagram from the client, for the target."""
        self.datagrams_up += 1
        self.bytes_up += len(data)
        try:
            self.send(data)
        except OSError as e:
            self.send_failed(e)

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        """A datagram from the target (the socket is connected: no one else's arrive)."""
        self.datagrams_down += 1
        self.bytes_down += len(data)
        try:
            self.reply(data, self.peer)
        except OSError:
            self.dropped += 1

    def reply_then_close(self, data: bytes, peer: Address) -> None:
        """C{reply} under C{udp_max_replies}: the last reply closes the session."""
        try:
            self.listener.sendto(data, peer)
        finally:
            if self.datagrams_down >= self.route.udp_max_replies:
                self.close("max_replies")

    def send_then_close(self, data: bytes) -> None:
        """C{send} under C{udp_max_requests}: the last request closes the session."""
        self.requests += 1
        try:
            self.send_next(data)
        finally:
            if self.requests >= self.route.udp_max_requests:
                self.close("max_requests")

    def send_with_header(self, data: bytes) -> None:
        """
        C{send} under C{udp_proxy_protocol}: the header and the payload in
        one datagram, as the spec requires; one too large for UDP is dropped.
        """
        if len(data) > self.room:
            self.dropped += 1
            relay = self.relay
            relay.stats.datagrams_oversized += 1
            relay.refusals.refuse(
                "oversized", conn=self.id, client=join_host_port(*self.client), size=len(data),
                header=len(self.header), limit=MAX_UDP_PAYLOAD,
            )
            return
        self.send_raw(self.header + data)

    #: Under a route's C{bandwidth}: what the datagrams up and down are charged to.
    meters: tuple[Meter | None, Meter | None] = (None, None)

    def send_within_bandwidth(self, data: bytes) -> None:
        """
        C{send} under a C{bandwidth} limit up: a datagram over it is dropped.
        What the meter's lease covers is taken here, without a call: the
        common case, and the whole cost of a limit that is never reached.
        """
        meter = self.meters[0]
        assert meter is not None  # set only for a direction with a meter
        if meter.credit >= len(data):
            meter.credit -= len(data)
            self.send_shaped(data)
        elif self.fits(meter, data, "up"):
            self.send_shaped(data)

    def reply_within_bandwidth(self, data: bytes, peer: Address) -> None:
        """C{reply} under a C{bandwidth} limit down: a datagram over it is dropped (see L{send_within_bandwidth})."""
        meter = self.meters[1]
        assert meter is not None
        if meter.credit >= len(data):
            meter.credit -= len(data)
            self.reply_shaped(data, peer)
        elif self.fits(meter, data, "down"):
            self.reply_shaped(data, peer)

    def fits(self, meter: Meter, data: bytes, direction: str) -> bool:
        """Whether C{data} fits the bandwidth; a datagram that does not is counted and logged (throttled)."""
        over = meter.admit(len(data))
        if over is None:
            return True
        self.dropped += 1
        self.relay.refusals.refuse(
            "over-bandwidth", conn=self.id, client=join_host_port(*self.client), size=len(data),
            direction=direction, limit=over,
        )
        return False

    def proxy_header(self) -> bytes:
        """The outbound header: the real client, and the address it wrote to (else the listener's)."""
        unique_id = f"{RUN_ID}-u{self.id}" if self.route.proxy_protocol_unique_id else None
        return session_header(self.client, self.destination or self.listener.listen, unique_id)

    def send_failed(self, error: OSError) -> None:
        """
        UDP writes are not buffered: a full queue (EAGAIN, ENOBUFS) or an
        oversized datagram (EMSGSIZE) loses this datagram only.  ECONNREFUSED
        is the target's ICMP port-unreachable, reported on a send.
        """
        self.dropped += 1
        if error.errno == errno.ECONNREFUSED:
            self.target_unreachable()

    def hold(self, data: bytes) -> None:
        """Keep what the client sends until the socket to the target exists."""
        if self.held and self.held_size + len(data) > HOLD_LIMIT:
            self.dropped += 1
            return
        self.held.append(data)
        self.held_size += len(data)

    # -- opening

    def check(self, pre_dial: PreDial) -> None:
        """Ask C{pre_dial} whether to open; what the client sends meanwhile is held."""
        # maybeDeferred turns a raise into a failure and awaits coroutines.
        self.decision = maybeDeferred(pre_dial, self.context)
        self.decision.addCallbacks(self.decided, self.decision_failed)

    def decided(self, allowed: object) -> None:
        if self.closed:  # a canceller that answered anyway
            return
        self.decision = None
        if allowed is False:
            self.refuse("pre_dial refused")
        else:
            self.open()

    def decision_failed(self, reason: Failure) -> None:
        if not self.closed:  # else cancelled because the session went away
            self.decision = None
            # Failure.type is only None before a Failure is built (Twisted's inferred type).
            why = reason.getErrorMessage() or reason.type.__name__  # type: ignore[union-attr]
            self.refuse(f"pre_dial failed: {why}")

    def refuse(self, reason: str) -> None:
        """
        The hook said no: drop what was held, no socket ever opened, and
        leave the table, so the client's next datagram asks again.  Logged
        with the route's other refusals, at most once a second.
        """
        self.leave()
        self.relay.refusals.refuse(
            "refused", conn=self.id, client=join_host_port(*self.client), reason=reason, dropped=self.dropped
        )

    def open(self) -> None:
        """Admitted: resolve the target's name (or pick one of several), then connect."""
        relay = self.relay
        relay.stats.sessions_opened += 1
        pool = relay.pool
        if pool is not None:
            if pool.ready.called:
                self.pick(pool)
            else:  # the first DNS answers are not in yet
                pool.when_ready().addCallback(lambda _: self.pick(pool))
            return
        link = self.route.agent
        if link is not None:
            resolve(relay.reactor, link.host, None).addCallbacks(
                lambda found: self.dial_agent(link, found[0]), self.resolve_failed
            )
            return
        resolve(relay.reactor, self.route.host, self.route.family).addCallbacks(
            self.connect, self.resolve_failed
        )

    def pick(self, pool: TargetPool) -> None:
        """The balancer's target for this client; the session stays on it."""
        if self.closed:
            return
        target = pool.pick(self.client[0], [])
        if target is None:
            self.close("no live target")
            return
        self.chosen, self.target_port = target, target.port
        self.connect([target.host])

    def connect(self, addresses: list[str]) -> None:
        """
        Open the socket to the target and send what was held.  After an
        unreachable target the route's next session tries the next address,
        as a TCP retry would.
        """
        if self.closed:
            return
        relay = self.relay
        address = addresses[relay.unreachable % len(addresses)]
        wildcard = "::" if ":" in address else "0.0.0.0"
        try:
            port = SessionPort(0, self, wildcard, MAX_DATAGRAM, relay.reactor)
            port.startListening()
        except CannotListenError as e:
            self.close(f"no socket: {e.socketError}")
            return
        self.port = port
        try:
            port.connect(address, self.target_port)
        except OSError as e:
            self.close(f"target unreachable: {e.strerror}")
            return
        port.discard_strangers()
        self.start_sending(port.getHandle().send, describe(port.getHost()))

    def dial_agent(self, link: AgentLinkConfig, address: str) -> None:
        """
        Open this session's DTLS session to the agent; once it is verified,
        the header naming the target goes first, then the held datagrams.
        """
        if self.closed:
            return
        route = self.route
        self.tunnel = tunnel = dtls.DTLSClient(
            _agent_context(link), (address, link.port), link.server_name, self,
            handshake_timeout=route.connect_timeout, clock=self.relay.reactor,
        )
        wildcard = "::" if ":" in address else "0.0.0.0"
        try:
            self.relay.reactor.listenUDP(0, tunnel, interface=wildcard, maxPacketSize=MAX_DATAGRAM)
        except CannotListenError as e:
            self.tunnel = None
            self.close(f"no socket: {e.socketError}")
            return
        tunnel.handshake.addCallbacks(
            self.tunnel_open, lambda reason: self.close(f"agent: {reason.getErrorMessage()}")
        )

    def tunnel_open(self, _: None) -> None:
        tunnel = self.tunnel
        assert tunnel is not None and tunnel.transport is not None
        tunnel.send(encode_header(self.route.host, self.target_port))
        self.start_sending(self.send_in_tunnel, describe(tunnel.transport.getHost()))

    def send_in_tunnel(self, data: bytes) -> None:
        """C{send} through an agent: a datagram over the DTLS record limit is dropped and counted."""
        assert self.tunnel is not None
        if len(data) > dtls.MAX_DATAGRAM:
            self.dropped += 1
            self.relay.stats.datagrams_oversized += 1
            self.relay.refusals.refuse(
                "dtls-oversized", conn=self.id, client=join_host_port(*self.client), size=len(data),
                limit=dtls.MAX_DATAGRAM,
            )
        elif not self.tunnel.send(data):
            self.dropped += 1

    # The DTLS session's handler (L{dtls.DatagramHandler}): the agent's datagrams are the target's.

    def datagram_received(self, data: bytes) -> None:
        self.datagramReceived(data, self.peer)

    def session_closed(self, reason: str) -> None:
        self.close(f"agent: {reason}")

    def start_sending(self, send: Callable[[bytes], Any], via: str) -> None:
        """Send through C{send} (wrapped for the route's settings) from now on, what was held first."""
        relay = self.relay
        route = self.route
        if route.udp_proxy_protocol:
            self.header = self.proxy_header()
            self.room = MAX_UDP_PAYLOAD - len(self.header)
            self.send_raw, send = send, self.send_with_header
        if route.udp_max_requests:
            self.send_next, send = send, self.send_then_close
        if relay.shaper is not None:  # outermost: a datagram over the bandwidth is not a request
            self.meters = up, down = relay.shaper.open(self.client[0])
            if up is not None:
                self.send_shaped, send = send, self.send_within_bandwidth
            if down is not None:
                self.reply_shaped, self.reply = self.reply, self.reply_within_bandwidth
        self.send = send
        self.events.debug(
            "session-open", conn=self.id, client=join_host_port(*self.client), via=via,
            **self.target_field(),
        )
        # Popped one by one: what a closing send leaves here, leave() counts as dropped.
        held, self.held_size = self.held, 0
        while held and not self.closed:
            try:
                send(held.pop(0))
            except OSError as e:
                self.send_failed(e)

    def target_field(self) -> dict[str, str]:
        """The target picked among several, for the session's events."""
        chosen = self.chosen
        return {"target": join_host_port(chosen.host, chosen.port)} if chosen is not None else {}

    def resolve_failed(self, reason: Failure) -> None:
        self.close(f"resolve failed: {reason.getErrorMessage()}")

    # -- closing

    def connectionRefused(self) -> None:
        """Twisted read the target's ICMP error on the socket."""
        self.target_unreachable()

    def stopProtocol(self) -> None:
        """
        The socket is gone.  Unless we closed it, the reactor tore it down:
        on epoll and poll reactors that is how an ICMP error on a connected
        UDP socket ends (twisted#5377), and C{connectionRefused} never comes.
        """
        if not self.closed:
            self.target_unreachable()

    def target_unreachable(self) -> None:
        self.relay.unreachable += 1
        chosen, self.chosen = self.chosen, None
        if chosen is not None:
            self.relay.pool.failed(chosen, "target unreachable")  # type: ignore[union-attr]  # chosen from it
        self.close("target unreachable")

    def leave(self) -> None:
        """Leave the table, dropping what is held and cancelling a pending hook."""
        self.closed = True
        del self.relay.sessions[self.key]
        self.dropped += len(self.held)
        self.held = []
        stats = self.relay.stats
        stats.datagrams_up += self.datagrams_up
        stats.datagrams_down += self.datagrams_down
        stats.datagrams_dropped += self.dropped
        stats.bytes_up += self.bytes_up
        stats.bytes_down += self.bytes_down
        if self.decision is not None:
            decision, self.decision = self.decision, None
            decision.cancel()
        for meter in self.meters:
            if meter is not None:
                meter.close()
        if self.chosen is not None:
            self.relay.pool.done(self.chosen)  # type: ignore[union-attr]
            self.chosen = None

    def close(self, reason: str) -> Deferred[None] | None:
        """
        Leave the table and log now; the socket is closed within a reactor
        turn, when the returned Deferred (if any) fires.
        """
        if self.closed:
            return None
        target = self.target_field()  # before leave() gives the target back
        self.leave()
        relay = self.relay
        relay.stats.sessions_closed[reason] += 1
        self.events.info(
            "session-closed", conn=self.id, client=join_host_port(*self.client), reason=reason,
            duration=relay.reactor.seconds() - self.started,
            datagrams_up=self.datagrams_up, bytes_up=self.bytes_up,
            datagrams_down=self.datagrams_down, bytes_down=self.bytes_down,
            dropped=self.dropped, **({"port": self.listener.listen[1]} if self.route.port_count > 1 else {}),
            **target,
        )
        if self.tunnel is not None:
            return self.tunnel.stop()
        return self.port.stopListening() if self.port is not None else None


@cache
def _agent_context(link: AgentLinkConfig) -> SSL.Context:
    """The DTLS context towards an agent, made once per C{agents} entry (files read once)."""
    return dtls.client_context(link.ca, link.cert, link.key)


class ObservedSession(Session):
    """A session whose datagrams are also reported to an C{on_read} hook."""

    def __init__(
        self, relay: DatagramRelay, client: Address, on_read: OnRead,
        peer: Address | None = None, destination: Address | None = None, door: Door | None = None,
    ) -> None:
        super().__init__(relay, client, peer, destination, door)
        self.on_read = on_read
        self.observing = True

    def up(self, data: bytes) -> None:
        self.observe(len(data), "up")
        super().up(data)

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        self.observe(len(data), "down")
        super().datagramReceived(data, addr)

    def observe(self, size: int, direction: str) -> None:
        """A hook that raises is logged once and switched off for this session, which goes on."""
        if self.observing:
            try:
                self.on_read(self.context, size, direction)
            except Exception as e:
                self.observing = False
                self.events.warn(
                    "hook-failed", conn=self.id, client=join_host_port(*self.client), hook="on_read", reason=repr(e)
                )


class Listener(DatagramProtocol):
    """A listening socket's protocol: its sessions reply through the socket, and name its address."""

    noisy = False
    #: The listening socket's own C{sendto}, for the sessions' replies.
    sendto: Callable[[bytes, Address], Any]
    #: The listening socket's address, for the hooks' context and outbound PROXY headers.
    listen: Address

    def startProtocol(self) -> None:
        port = cast(udp.Port, self.transport)  # what listenUDP and adoptDatagramPort return
        self.sendto = port.getHandle().sendto
        host = port.getHost()
        self.listen = (host.host, host.port)


class DatagramRelay(Listener):
    """
    A UDP route's listening protocol (on a route with a port range, its
    L{Door}s are): its session table, its session limit, its hooks and the
    sweep that expires idle sessions.
    """

    #: The route's C{rate_limit} buckets for new sessions, set by its service.
    limiter: RateLimiter | None = None
    #: The route's C{bandwidth} buckets, likewise.
    shaper: Shaper | None = None
    #: The route's several targets, set by its service; None: C{host} alone.
    pool: TargetPool | None = None

    def __init__(
        self, route: RouteConfig, events: RouteEvents, refusals: RefusalLog, reactor: IRelayReactor,
        hooks: Hooks = NO_HOOKS, stats: RouteStats | None = None,
    ) -> None:
        self.route = route
        self.events = events
        self.refusals = refusals
        self.reactor = reactor
        self.hooks = hooks
        self.stats = stats or RouteStats()
        self.sessions: dict[SessionKey, Session] = {}
        self.sweeper = LoopingCall(self.sweep)
        self.sweeper.clock = reactor
        self.unreachable = 0
        #: A range route's listening ports, one L{Door} each (none on a route with one port).
        self.doors: list[Door] = []
        self.choose_path()

    def configure(self, route: RouteConfig, events: RouteEvents, hooks: Hooks) -> None:
        """New sessions get these settings (a reload); open sessions keep the ones they began with."""
        interval = self.route.udp_cleanup_interval
        self.route, self.events, self.hooks = route, events, hooks
        self.choose_path()
        if self.sweeper.running and route.udp_cleanup_interval != interval:
            self.sweeper.stop()
            self.start_sweeping()

    @property
    def refused(self) -> int:
        """New clients' datagrams dropped at C{max_udp_sessions} (the C{stop} event's C{refused})."""
        return self.refusals.counts.get("limited", 0)

    @property
    def denied(self) -> int:
        """New clients' datagrams dropped by the ACL (the C{stop} event's C{denied})."""
        return self.refusals.counts.get("denied", 0)

    #: What the listening port calls with each datagram: L{plain_datagram},
    #: or L{proxied_datagram} on a route with inbound PROXY headers (an
    #: attribute where Twisted declares a method: hence the ignore).
    datagramReceived: Callable[[bytes, Address], None]  # type: ignore[assignment]

    def choose_path(self) -> None:
        """Pick the per-datagram path for the route's settings, once rather than per datagram."""
        proxied = self.route.proxy_protocol.mode != "disabled"
        self.datagramReceived = self.proxied_datagram if proxied else self.plain_datagram
        for door in self.doors:
            door.choose_path(proxied)

    def plain_datagram(self, data: bytes, addr: Address) -> None:
        session = self.sessions.get(addr)
        if session is not None:
            session.up(data)
        else:
            self.open(data, addr)

    def proxied_datagram(self, data: bytes, addr: Address) -> None:
        """
        A datagram on a route with inbound PROXY headers, judged alone: its
        header (if any) stripped, its session that of C{(addr, real client)}.
        One dropped is counted by reason and logged as C{rejected}.
        """
        try:
            client, destination, payload = read_header(self.route.proxy_protocol, data, addr)
        except DatagramDropped as e:
            self.header_dropped(e, addr)
            return
        session = self.sessions.get((addr, client))
        if session is not None:
            session.up(payload)
        else:
            self.open(payload, client, addr, destination)

    def header_dropped(self, error: DatagramDropped, addr: Address) -> None:
        """Count and log (throttled) a datagram from C{addr} dropped for its PROXY header."""
        self.stats.header_errors[error.reason] += 1
        self.refusals.refuse("rejected", client=join_host_port(*addr), reason=str(error), header_error=error.reason)

    def open(
        self, data: bytes, client: Address, peer: Address | None = None, destination: Address | None = None,
        door: Door | None = None,
    ) -> None:
        """
        A datagram from a new client: open its session, unless the ACL denies
        the client or the table is full, once C{pre_dial} (if set) agrees.
        Each datagram refused is counted and logged by kind (C{denied},
        C{limited}) through the route's L{RefusalLog}: a flood of new
        sources cannot flood the log, nor one kind hide another.
        """
        route = self.route
        if not route.acl.permits_everything:
            decision = route.acl.check(client[0])
            if not decision.allowed:
                self.refusals.refuse("denied", client=join_host_port(*client), rule=decision.rule)
                return
        if self.limiter is not None:
            over = self.limiter.admit(client[0])
            if over is not None:
                self.refusals.refuse("rate-limited", client=join_host_port(*client), limit=over)
                return
        if len(self.sessions) >= route.max_udp_sessions:
            self.refusals.refuse(
                "limited", conn=next(_session_ids), client=join_host_port(*client), reason="max_udp_sessions reached"
            )
            return
        hooks = self.hooks
        on_read = hooks.on_read
        session = (
            Session(self, client, peer, destination, door) if on_read is None
            else ObservedSession(self, client, on_read, peer, destination, door)
        )
        self.sessions[session.key] = session
        session.up(data)
        if hooks.pre_dial is None:
            session.open()
        else:
            session.check(hooks.pre_dial)

    def sweep(self) -> None:
        """
        Close the sessions idle for C{udp_idle_timeout}, and those whose
        C{pre_dial} hook has not answered that long after they began.  A
        session whose counters moved since the last sweep was active during
        the interval; crediting that to the sweep's time never closes a
        session early.
        """
        now = self.reactor.seconds()
        for session in list(self.sessions.values()):
            timeout = session.route.udp_idle_timeout
            activity = session.datagrams_up + session.datagrams_down
            if session.decision is not None and now - session.started >= timeout:
                session.close("pre_dial timeout")
            elif activity != session.seen:
                session.seen = activity
                session.last_active = now
            elif now - session.last_active >= timeout:
                session.close("idle")

    def start_sweeping(self) -> None:
        self.sweeper.start(self.route.udp_cleanup_interval, now=False)

    def close_all(self, reason: str) -> list[Deferred[None]]:
        """Stop sweeping and close every session; the Deferreds fire as their sockets close."""
        if self.sweeper.running:
            self.sweeper.stop()
        closing = (session.close(reason) for session in list(self.sessions.values()))
        return [d for d in closing if d is not None]


class Door(Listener):
    """
    One listening port of a route with a port range.  Its datagrams go to
    the route's relay, which holds the sessions, limits and sweep of the
    whole range, under keys that name the port, since one client may write
    to several; its sessions relay to the target port at its offset and
    reply through it, so a client hears from the port it wrote to.  The
    paths are the relay's own (L{DatagramRelay.plain_datagram},
    L{DatagramRelay.proxied_datagram}) with that key: a route with one port
    builds none of it.
    """

    #: L{plain_datagram} or L{proxied_datagram}, as the relay chose for its route.
    datagramReceived: Callable[[bytes, Address], None]  # type: ignore[assignment]

    def __init__(self, relay: DatagramRelay, number: int) -> None:
        self.relay = relay
        self.number = number
        self.sessions = relay.sessions
        relay.doors.append(self)
        self.choose_path(relay.route.proxy_protocol.mode != "disabled")

    def choose_path(self, proxied: bool) -> None:
        self.datagramReceived = self.proxied_datagram if proxied else self.plain_datagram

    def plain_datagram(self, data: bytes, addr: Address) -> None:
        session = self.sessions.get((addr, self.number))
        if session is not None:
            session.up(data)
        else:
            self.relay.open(data, addr, door=self)

    def proxied_datagram(self, data: bytes, addr: Address) -> None:
        relay = self.relay
        try:
            client, destination, payload = read_header(relay.route.proxy_protocol, data, addr)
        except DatagramDropped as e:
            relay.header_dropped(e, addr)
            return
        session = self.sessions.get(((addr, client), self.number))
        if session is not None:
            session.up(payload)
        else:
            relay.open(payload, client, addr, destination, self)
