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

A session ends when a sweep finds it idle for C{udp_idle_timeout}, when its
target proves unreachable (an ICMP error on its connected socket), or at
shutdown; its socket is closed and its table entry removed at the same time.

The per-datagram path is two counter increments and one system call each
way.  It calls the sockets' own C{send}/C{sendto} rather than
C{transport.write}, which re-validates the address of every datagram; a
session's socket reads one reply per readiness event (L{SessionPort}); and it
keeps no timestamps: the sweep notices activity by comparing counters.
"""

from __future__ import annotations

import errno
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from .addresses import HOLD_LIMIT, describe, join_host_port
from .compat import SessionPort
from .config import RouteConfig
from .dial import resolve
from .events import RouteEvents, Throttle

__all__ = ["MAX_DATAGRAM", "DatagramRelay", "Session"]

#: Read size of every socket: the largest UDP payload (65,507 bytes over
#: IPv4, 65,527 over IPv6) fits, so nothing is truncated.  Twisted's default
#: of 8192 silently would.
MAX_DATAGRAM = 65535

Address = tuple[str, int]


class Session(DatagramProtocol):
    """
    One client's datagrams, relayed through a socket connected to the
    target.  Until that socket exists (the target's name is being resolved)
    what the client sends is held, up to L{HOLD_LIMIT} bytes.
    """

    noisy = False

    def __init__(self, relay: DatagramRelay, client: Address) -> None:
        self.relay = relay
        self.client = client
        self.started = self.last_active = relay.reactor.seconds()
        self.seen = 0
        self.datagrams_up = self.bytes_up = 0
        self.datagrams_down = self.bytes_down = 0
        self.dropped = 0
        self.held: list[bytes] = []
        self.held_size = 0
        self.send: Callable[[bytes], Any] = self.hold
        self.reply = relay.sendto
        self.closed = False

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
            self.reply(data, self.client)
        except OSError:
            self.dropped += 1

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
        try:
            port.connect(address, relay.route.target_port)
        except OSError as e:
            self.close(f"target unreachable: {e.strerror}")
            return
        port.discard_strangers()
        self.send = port.getHandle().send
        relay.events.debug("session-open", client=join_host_port(*self.client), via=describe(port.getHost()))
        held, self.held, self.held_size = self.held, [], 0
        for data in held:
            try:
                self.send(data)
            except OSError as e:
                self.send_failed(e)

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
        self.close("target unreachable")

    def close(self, reason: str) -> Deferred[None] | None:
        """
        Leave the table and log now; the socket is closed within a reactor
        turn, when the returned Deferred (if any) fires.
        """
        if self.closed:
            return None
        self.closed = True
        relay = self.relay
        del relay.sessions[self.client]
        self.dropped += len(self.held)
        self.held = []
        relay.events.info(
            "session-closed", client=join_host_port(*self.client), reason=reason,
            duration=relay.reactor.seconds() - self.started,
            datagrams_up=self.datagrams_up, bytes_up=self.bytes_up,
            datagrams_down=self.datagrams_down, bytes_down=self.bytes_down,
            dropped=self.dropped,
        )
        port = self.transport
        return port.stopListening() if port is not None else None


class DatagramRelay(DatagramProtocol):
    """
    A UDP route's listening protocol: its session table, its session limit
    and the sweep that expires idle sessions.
    """

    noisy = False

    def __init__(self, route: RouteConfig, events: RouteEvents, reactor: Any) -> None:
        self.route = route
        self.events = events
        self.reactor = reactor
        self.sessions: dict[Address, Session] = {}
        self.sweeper = LoopingCall(self.sweep)
        self.sweeper.clock = reactor
        self.opened = 0
        self.refused = 0
        self.denied = 0
        self.unreachable = 0
        self.refusal_log = Throttle(reactor)
        self.denial_log = Throttle(reactor)

    #: The listening socket's own C{sendto}, for the sessions' replies.
    sendto: Callable[[bytes, Address], Any]

    def startProtocol(self) -> None:
        self.sendto = self.transport.getHandle().sendto

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        session = self.sessions.get(addr)
        if session is not None:
            session.up(data)
        else:
            self.open(data, addr)

    def open(self, data: bytes, addr: Address) -> None:
        """
        A datagram from a new client: open its session, unless the ACL denies
        the client or the table is full.
        """
        route = self.route
        if not route.acl.permits_everything:
            decision = route.acl.check(addr[0])
            if not decision.allowed:
                self.denied += 1
                suppressed = self.denial_log.allow()
                if suppressed is not None:
                    self.events.warn("denied", client=join_host_port(*addr), rule=decision.rule, suppressed=suppressed)
                return
        if len(self.sessions) >= route.max_udp_sessions:
            self.refuse(data, addr)
            return
        session = self.sessions[addr] = Session(self, addr)
        self.opened += 1
        session.up(data)
        resolve(self.reactor, route.host, route.family).addCallbacks(
            session.connect, session.resolve_failed
        )

    def refuse(self, data: bytes, addr: Address) -> None:
        """
        Drop a new client's datagram at the session limit.  A flood of new
        sources must not become a flood of log lines: at most one
        C{session-closed} event (reason C{limit}) per period, whose
        C{dropped} counts every datagram refused since the previous one.
        """
        self.refused += 1
        suppressed = self.refusal_log.allow()
        if suppressed is not None:
            self.events.warn(
                "session-closed", client=join_host_port(*addr), reason="limit", duration=0.0,
                datagrams_up=1, bytes_up=len(data), datagrams_down=0, bytes_down=0,
                dropped=suppressed + 1,
            )

    def sweep(self) -> None:
        """
        Close the sessions idle for C{udp_idle_timeout}.  A session whose
        counters moved since the last sweep was active during the interval;
        crediting that to the sweep's time never closes a session early.
        """
        now = self.reactor.seconds()
        timeout = self.route.udp_idle_timeout
        for session in list(self.sessions.values()):
            activity = session.datagrams_up + session.datagrams_down
            if activity != session.seen:
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
