"""
The service tree: one L{RelayService} (a C{MultiService}) holding one named
child per route, C{route:NAME}, which owns the route's listening port.

Ports are bound in C{privilegedStartService} (before twistd drops
privileges), or adopted when systemd passed a socket named after the route;
if any route cannot start, the ones already bound are closed and start-up
stops with a message naming the route and the address.  Stopping stops
listening at once, then closes open connections cleanly, aborting whatever
is still open after C{shutdown_timeout}; UDP sessions have nothing to flush
and are closed at once.

A reload (SIGHUP, or L{RelayService.reload}) compares the new routes with
the running ones by name.  Settings that need no new socket reach new
connections while the port stays open: a TCP route starts a new generation
of its factories (a pair reads its settings from the factory it began in,
for its whole life), a UDP route's relay gives them to new sessions.  A new
listening address is bound before the old port closes; removed routes stop
listening and let their connections finish, up to C{shutdown_timeout}.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, cast

from twisted.application.service import MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, DeferredLock, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import Binding, IAddress, IListeningPort, IProtocolFactory, IReactorFromThreads
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.tcp import makeBinding
from twisted.logger import LogLevel
from zope.interface import implementer

from . import events
from .addresses import join_host_port
from .bandwidth import Shaper
from .compat import LimitedPort, adopt_limited, inherited_sockets, listen_limited
from .acl import AccessList
from .agent import AgentFront, AgentHealth, TunnelDatagrams
from .agentheader import HeaderReader
from .config import AgentConfig, Config, ConfigError, RouteConfig, StatusConfig, load_config
from .dnscache import DNSCache
from .dtls import DTLSServer, DTLSSession, server_context
from .events import RefusalLog, RouteEvents
from .hooks import NO_HOOKS, Hooks, hooks_for
from .inbound import ProxyHeaderFactory
from .interfaces import IRelayReactor
from .lifecycle import Input, State
from .ratelimit import RateLimiter
from .stats import RouteStats
from .status import GuardedSite, Page, StatusService
from .sni import Membership, SharedPort
from .targets import TargetPool
from .tcp import Pair, RelayFactory, TLSTerminator, splicing
from .udp import MAX_DATAGRAM, DatagramRelay, Door

__all__ = ["RelayService", "ReloadResult", "RouteService", "StartError", "UDPRouteService", "make_service"]

#: The route fields that say where a route listens: changing one needs a new socket.
SOCKET_FIELDS = frozenset({"scheme", "bind", "listen_port", "port_count", "reuse_port"})


class StartError(SystemExit):
    """
    A route could not start.  A C{SystemExit}, so that twistd prints the
    message and exits non-zero instead of printing a traceback.
    """


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did, route by route (the C{reload} event says the same)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    #: Route name to the fields that changed (C{hooks} for the hooks mapping).
    changed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    unchanged: tuple[str, ...] = ()
    #: Routes that kept their previous state because their socket could not be opened, and why.
    failed: Mapping[str, str] = field(default_factory=dict)
    #: What changed but needs a restart to apply (C{status}).
    restart_needed: tuple[str, ...] = ()
    #: Set when the whole reload was refused: nothing changed.
    error: str = ""


#: A socket systemd passed: its descriptor and address family.
Inherited = tuple[int, socket.AddressFamily]


def inherited_socket(route: RouteConfig, number: int) -> Inherited | None:
    """
    The descriptor and address family of the socket systemd passed for port
    C{number} of C{route}, made non-blocking as Twisted needs; C{None} if
    there is none.  Its C{FileDescriptorName=} is the route's name, or on a
    route with a port range C{NAME@PORT} (systemd allows no colon in a name),
    and it must be bound to that port.  A socket of another type or family
    than the route's scheme says is a L{StartError}.
    """
    name = route.name if route.port_count == 1 else f"{route.name}@{number}"
    fd = inherited_sockets().get(name)
    if fd is None:
        return None
    families = {4: (socket.AF_INET,), 6: (socket.AF_INET6,), None: (socket.AF_INET, socket.AF_INET6)}
    with socket.socket(fileno=os.dup(fd)) as sock:
        family, kind = sock.family, sock.type
        listening = kind != socket.SOCK_STREAM or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        bound = sock.getsockname()[1] if family in families[None] else None
    wanted = socket.SOCK_STREAM if route.protocol == "tcp" else socket.SOCK_DGRAM
    if kind != wanted or family not in families[route.family] or not listening:
        what = f"{'' if listening else 'non-listening '}{family.name} {kind.name}"
        problem = f"is {what}, which scheme {route.scheme} cannot use"
    elif route.port_count > 1 and bound != number:
        problem = f"is bound to port {bound}"
    else:
        os.set_blocking(fd, False)
        return fd, family
    raise StartError(f"streamrelay: route {route.name!r}: the socket systemd passed as {name!r} {problem}")


@implementer(IListeningPort)
class PortGroup:
    """
    The ports of a route with a port range, as one: bound together (by
    L{_ListeningService.bind}) and closed together, and on a TCP route
    paused and resumed together, so that C{max_connections} counts
    connections across the range.
    """

    def __init__(self, ports: list[IListeningPort]) -> None:
        self.ports = ports
        self.reading = True

    def getHost(self) -> IAddress:
        """The first port's address."""
        return self.ports[0].getHost()

    def startListening(self) -> None:
        """Every port listens already."""

    def stopListening(self) -> Deferred[None]:
        closing = [maybeDeferred(port.stopListening) for port in self.ports]
        return DeferredList(closing).addCallback(lambda _: None)

    def startReading(self) -> None:
        """
        Accept on every port again; only if paused, as every connection
        that opens or closes under C{max_connections} calls this or
        L{stopReading}.
        """
        if not self.reading:
            self.reading = True
            for port in self.ports:
                cast(LimitedPort, port).startReading()

    def stopReading(self) -> None:
        """Leave newcomers in every port's backlog."""
        if self.reading:
            self.reading = False
            for port in self.ports:
                cast(LimitedPort, port).stopReading()

    def set_backlog(self, backlog: int) -> None:
        for port in self.ports:
            cast(LimitedPort, port).set_backlog(backlog)


class _ListeningService(Service):
    """
    What TCP and UDP routes share: the route's name, settings, events and
    counters, and its port, opened by C{privilegedStartService} (or
    C{startService} under a parent without a privileged phase).
    """

    def __init__(
        self, route: RouteConfig, reactor: IRelayReactor, previous: _ListeningService | None = None,
        dns: DNSCache | None = None,
    ) -> None:
        self.name = f"route:{route.name}"
        self.route = route
        self.reactor = reactor
        self.events = RouteEvents(route)
        if previous is None:
            self.refusals = RefusalLog(self.events, reactor)
            self.stats = RouteStats()
        else:  # the route under another protocol or address: its counters go on
            self.refusals, self.stats = previous.refusals, previous.stats
        #: The C{rate_limit} buckets, kept while the setting stays the same (L{limiter_for}).
        self.limiter: RateLimiter | None = None if previous is None else previous.limiter
        #: The C{bandwidth} buckets, likewise (L{shaper_for}).
        self.shaper: Shaper | None = None if previous is None else previous.shaper
        #: Where host-name targets are resolved: the relay's cache, shared by its routes.
        self.dns = dns if dns is not None else DNSCache(reactor)
        #: The route's several targets (L{pool_for}); kept across reloads, its checks' state with it.
        self.pool: TargetPool | None = None
        self.port: IListeningPort | None = None
        #: Set when a reload removed the route: stopping then lets its connections finish.
        self.retired = False

    @property
    def hooks(self) -> Hooks:
        """The hooks new connections get."""
        raise NotImplementedError

    def listen(self, route: RouteConfig, number: int, inherited: Inherited | None) -> IListeningPort:
        """Adopt the C{inherited} socket, else bind port C{number} of the route (C{CannotListenError})."""
        raise NotImplementedError

    def update(self, route: RouteConfig, hooks: Hooks) -> None:
        """New settings on the same socket, for new connections."""
        raise NotImplementedError

    def shut_down(self) -> None:
        """Close the connections as the process stops."""
        raise NotImplementedError

    def bind(self, route: RouteConfig, events: RouteEvents) -> IListeningPort:
        """
        Open the port of C{route} (or every port of its range, as a
        L{PortGroup}) and log C{start} with C{events}, saying whether systemd
        passed the sockets (and on a range how many); L{StartError} naming the
        port that cannot be opened, once those opened before it are closed.
        """
        ports: list[IListeningPort] = []
        adopted = 0
        try:
            for number in route.listen_ports:
                inherited = inherited_socket(route, number)
                try:
                    ports.append(self.listen(route, number, inherited))
                except CannotListenError as e:
                    raise StartError(
                        f"streamrelay: route {route.name!r}: cannot listen on {route.protocol} "
                        f"{join_host_port(route.bind, number)}: {e.socketError}"
                    ) from None
                adopted += inherited is not None
        except BaseException:
            for port in ports:
                port.stopListening()
            raise
        host = ports[0].getHost()
        assert isinstance(host, (IPv4Address, IPv6Address))  # a TCP or UDP port's
        listen = join_host_port(host.host, host.port)
        if len(ports) == 1:
            events.set_listen(listen)
            events.info("start", inherited=adopted > 0)
            return ports[0]
        events.set_listen(f"{listen}-{route.listen_ports[-1]}")
        events.info("start", inherited=adopted > 0, adopted=adopted)
        return PortGroup(ports)

    def open(self) -> None:
        """Open the route's port, unless it is open already."""
        if self.port is None:
            self.port = self.bind(self.route, self.events)
            self.refusals.events = self.events  # a replaced route's refusals are logged as ours now

    def privilegedStartService(self) -> None:
        self.open()
        super().privilegedStartService()

    def startService(self) -> None:
        self.open()
        super().startService()

    def unbind(self) -> None:
        """Close the listening port of a route whose siblings failed to start."""
        if self.port is not None:
            self.port.stopListening()
            self.port = None

    def stop_listening(self) -> Deferred[None] | None:
        """Close the port (C{stop} event); the Deferred fires once it is closed."""
        port, self.port = self.port, None
        if port is None:
            return None
        self.events.info("stop", **self.stop_fields())
        return port.stopListening()

    def stop_fields(self) -> dict[str, Any]:
        """What the C{stop} event adds."""
        return {}

    def limiter_for(self, route: RouteConfig) -> RateLimiter | None:
        """
        The buckets for C{route}'s C{rate_limit}: those in force if the
        setting is unchanged (a reload does not hand every client a fresh
        burst), new ones if it changed, none without it.
        """
        setting = route.rate_limit
        if setting is None:
            self.limiter = None
        elif self.limiter is None or self.limiter.setting != setting:
            self.limiter = RateLimiter(setting, self.reactor.seconds)
        return self.limiter

    def shaper_for(self, route: RouteConfig) -> Shaper | None:
        """The buckets for C{route}'s C{bandwidth}, kept or renewed as L{limiter_for} does."""
        setting = route.bandwidth
        if setting is None or self.shaper is None or self.shaper.setting != setting:
            self.shaper = None if setting is None else Shaper(setting, self.reactor)
        return self.shaper

    def pool_for(self, route: RouteConfig, events: RouteEvents) -> TargetPool | None:
        """The pool for C{route}'s C{targets}: the one in force, reconfigured; none without targets."""
        if not route.targets:
            self.stop_pool()
            return None
        if self.pool is None:
            self.pool = TargetPool(route, self.reactor, events, self.dns)
        else:
            self.pool.events = events
            self.pool.configure(route)
        return self.pool

    def stop_pool(self) -> Deferred[None]:
        """End the pool's checks; fires once none is in flight."""
        pool, self.pool = self.pool, None
        return pool.stop() if pool is not None else succeed(None)

    def events_on_this_socket(self, route: RouteConfig) -> RouteEvents:
        """Events for C{route}'s new settings, on the address already bound."""
        new = RouteEvents(route)
        new.set_listen(self.events.fields["listen"])
        return new

    def switch(self, route: RouteConfig, events: RouteEvents) -> None:
        """Route settings and events for what comes next; refusals are logged with them."""
        self.route, self.events = route, events
        self.refusals.events = events


class _Entrance(ServerFactory):
    """
    A TCP route's listening factory, the same for the port's whole life: it
    hands each connection to the route's newest generation, so a reload
    changes settings without touching the port.
    """

    noisy = False
    #: The newest generation's PROXY header factory, else its TLS layer's, else its relay factory.
    front: RelayFactory | ProxyHeaderFactory | TLSTerminator | AgentFront
    #: Whether its connections get lean transports (read by L{LimitedPort}): plain pairs, spliced.
    lean = False

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self.front.buildProtocol(addr)


def _unlimited() -> int:
    return sys.maxsize


class SharedPorts:
    """The ports that routes share by C{sni}, by address, while some route uses each."""

    def __init__(self, reactor: IRelayReactor) -> None:
        self.reactor = reactor
        self.ports: dict[tuple[str, int], SharedPort] = {}

    def join(
        self, service: RouteService, route: RouteConfig, inherited: Inherited | None,
        listen: Callable[[RouteConfig, Inherited | None, IProtocolFactory, Callable[[], int]], LimitedPort],
    ) -> Membership:
        """
        Join the routes on C{route}'s address; the first one opens the port,
        behind an inbound PROXY header reader if the routes read one.
        """
        key = (route.bind, route.listen_port)
        shared = self.ports.get(key)
        if shared is None:
            shared = SharedPort(key, self.reactor, self.forget)

        def bind() -> LimitedPort:
            entrance: IProtocolFactory = shared.router
            if route.proxy_protocol.mode != "disabled":
                entrance = ProxyHeaderFactory(entrance, route.proxy_protocol, service.refusals, self.reactor, service.stats)
                shared.headers = entrance
            return listen(route, inherited, entrance, _unlimited)  # max_connections: per route, by the router

        membership = shared.join(service, bind)
        self.ports[key] = shared
        return membership

    def forget(self, shared: SharedPort) -> None:
        if self.ports.get(shared.key) is shared:
            del self.ports[shared.key]


class RouteService(_ListeningService):
    """
    A TCP route: its listening port and the pairs it relays, in generations.
    A generation is a L{RelayFactory} (behind a L{ProxyHeaderFactory} where
    inbound headers are read) with one set of settings; a reload that
    changes them starts a new one for new connections, and older ones stay
    while their pairs do.  Generations share the per-client counts, and
    C{max_connections} counts the connections of all of them.
    """

    def __init__(
        self, route: RouteConfig, shutdown_timeout: float, reactor: IRelayReactor, hooks: Hooks = NO_HOOKS,
        previous: _ListeningService | None = None, shared_ports: SharedPorts | None = None,
        dns: DNSCache | None = None,
    ) -> None:
        super().__init__(route, reactor, previous, dns)
        self.shutdown_timeout = shutdown_timeout
        #: Where routes that share an address by C{sni} find each other.
        self.shared_ports = shared_ports if shared_ports is not None else SharedPorts(reactor)
        self.per_client: dict[str, int] = {}
        #: Oldest first; the last is the one new connections get.
        self.generations: list[tuple[RelayFactory, ProxyHeaderFactory | None]] = []
        self.entrance = _Entrance()
        self.configure(route, hooks, self.events)

    @property
    def factory(self) -> RelayFactory:
        """The newest generation's relay factory."""
        return self.generations[-1][0]

    @property
    def hooks(self) -> Hooks:
        return self.factory.hooks

    def pairs(self) -> list[Pair]:
        """Every open pair, whichever generation it began in, oldest first."""
        return [pair for factory, _ in self.generations for pair in factory.pairs]

    def configure(self, route: RouteConfig, hooks: Hooks, events: RouteEvents) -> None:
        """Start a generation with these settings; generations left without connections go."""
        factory = RelayFactory(route, events, self.refusals, self.reactor, hooks, self.stats, self.per_client)
        factory.limiter = self.limiter_for(route)
        factory.shaper = self.shaper_for(route)
        factory.pool = self.pool_for(route, events)
        front: RelayFactory | TLSTerminator = factory if route.tls is None else TLSTerminator(factory)
        headers = None
        if route.proxy_protocol.mode != "disabled" and not route.sni:  # a shared port reads it before the name
            headers = ProxyHeaderFactory(front, route.proxy_protocol, self.refusals, self.reactor, self.stats)
        self.generations = [
            (old, old_headers) for old, old_headers in self.generations
            if old.pairs or (old_headers is not None and old_headers.pending)
        ]
        self.generations.append((factory, headers))
        self.entrance.front = front if headers is None else headers
        self.entrance.lean = factory.lean and route.tls is None
        self.switch(route, events)
        if isinstance(self.port, Membership):
            self.port.shared.router.rebuild()  # the route's names may have changed
        if route.max_connections:
            for relay, pending in self.generations:
                relay.changed = self.connections_changed
                if pending is not None:
                    pending.changed = self.connections_changed
        self.connections_changed()  # the limit may have moved either way

    def room(self) -> int:
        """How many more connections C{max_connections} allows (PROXY headers awaited count)."""
        limit = self.route.max_connections
        if not limit:
            return sys.maxsize
        open_now = 0
        for factory, headers in self.generations:
            open_now += len(factory.pairs) + (len(headers.pending) if headers is not None else 0)
        return limit - open_now

    def connections_changed(self) -> None:
        """
        Stop accepting at C{max_connections} and resume below it: the
        kernel's backlog holds newcomers meanwhile, and the port accepts no
        more in one go than there is room for (L{LimitedPort}).
        """
        port = self.port
        if port is None:
            return
        if self.room() > 0:
            port.startReading()  # type: ignore[attr-defined]
        else:
            port.stopReading()  # type: ignore[attr-defined]

    def listen(self, route: RouteConfig, number: int, inherited: Inherited | None) -> LimitedPort | Membership:
        if route.sni:
            return self.shared_ports.join(self, route, inherited, self.listen_alone)
        return self.listen_alone(route, inherited, self.entrance, self.room, number)

    def listen_alone(
        self, route: RouteConfig, inherited: Inherited | None, entrance: IProtocolFactory, room: Callable[[], int],
        number: int | None = None,
    ) -> LimitedPort:
        """
        Open a port of the route's own (or the one routes sharing it by
        C{sni} use): port C{number} of a range, else the route's one port.
        """
        if inherited is not None:
            port = adopt_limited(self.reactor, *inherited, entrance, room)
            port.set_backlog(route.backlog)
            return port
        listen_port = route.listen_port if number is None else number
        address: int | Binding = listen_port
        if route.reuse_port:
            address = makeBinding(route.bind, listen_port, reuseAddress=True, reusePort=True)
        return listen_limited(self.reactor, address, entrance, room, route.backlog, route.bind)

    def update(self, route: RouteConfig, hooks: Hooks) -> None:
        if isinstance(self.port, (LimitedPort, PortGroup)) and route.backlog != self.route.backlog:
            self.port.set_backlog(route.backlog)
        self.configure(route, hooks, self.events_on_this_socket(route))

    def rebind(self, route: RouteConfig, hooks: Hooks) -> None:
        """
        A new listening address: bind it first (L{StartError}: nothing
        changed), then close the old port and drain the pairs it accepted.
        """
        events = RouteEvents(route)
        port = self.bind(route, events)
        stopped = self.stop_listening()
        older = [factory for factory, _ in self.generations]
        self.port = port
        self.configure(route, hooks, events)
        self.settle(older, stopped, "drain timeout")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        stopped = self.stop_listening()
        if not self.retired:
            self.shut_down()
        factories = [factory for factory, _ in self.generations]
        settled = self.settle(factories, stopped, "drain timeout" if self.retired else "shutdown timeout")
        return settled.addCallback(lambda _: self.stop_pool())

    def shut_down(self) -> None:
        if isinstance(self.port, Membership):
            self.port.shared.close_pending()
        for _, headers in self.generations:
            if headers is not None:
                headers.close_pending()
        for pair in self.pairs():
            pair.feed(Input.SHUTDOWN, detail="shutdown")

    def settle(self, factories: list[RelayFactory], stopped: Deferred[None] | None, reason: str) -> Deferred[None]:
        """
        Wait for the pairs of C{factories}, and the port being C{stopped};
        abort the pairs still open after C{shutdown_timeout} (C{abort} event
        and C{closed} reason: C{reason}).
        """
        waiting = [pair.done for factory in factories for pair in factory.pairs if not pair.done.called]
        if stopped is not None:
            waiting.append(stopped)
        if not waiting:
            return succeed(None)
        deadline = self.reactor.callLater(self.shutdown_timeout, self.abort, factories, reason)

        def settled(_: object) -> None:
            if deadline.active():
                deadline.cancel()

        return DeferredList(waiting).addCallback(settled)

    def abort(self, factories: list[RelayFactory], reason: str) -> None:
        for factory in factories:
            for pair in list(factory.pairs):
                factory.events.warn("abort", conn=pair.id, client=pair.peer, reason=reason)
                pair.feed(Input.ABORT, detail=reason)


#: How many port numbers an agent on port 0 tries before giving up.
_PORT_ATTEMPTS = 16


class AgentService(RouteService):
    """
    The agent's port (L{streamrelay.agent}): the tunnels are the pairs of
    its pseudo-route, whose clients name their targets by header within
    C{header_timeout}; other connections get C{site}.
    """

    def __init__(
        self, agent: AgentConfig, site: GuardedSite, shutdown_timeout: float, reactor: IRelayReactor, dns: DNSCache,
    ) -> None:
        self.agent, self.site = agent, site
        super().__init__(agent.route, shutdown_timeout, reactor, dns=dns)

    def configure(self, route: RouteConfig, hooks: Hooks, events: RouteEvents) -> None:
        super().configure(route, hooks, events)
        factory = self.factory
        factory.requests = self.reader = HeaderReader(self.agent)
        factory.deadlines[State.CHECKING] = self.agent.header_timeout
        self.entrance.front = AgentFront(factory, self.site)
        self.entrance.lean = False  # the front tells tunnels from other clients by what they send

    #: The UDP side: DTLS on the TCP port's number, opened after it.
    datagrams: DTLSServer | None = None
    #: With C{listen} on port 0: the UDP socket bound first, whose number the TCP port took.
    reserved: socket.socket | None = None

    def listen(self, route: RouteConfig, number: int, inherited: Inherited | None) -> LimitedPort | Membership:
        """
        On port 0 the system picks a TCP port whose UDP twin may be taken:
        bind UDP first, then TCP on its number (again if that one is taken).
        """
        if number != 0 or inherited is not None:
            return super().listen(route, number, inherited)
        family = socket.AF_INET6 if ":" in route.bind else socket.AF_INET
        for _ in range(_PORT_ATTEMPTS):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind((route.bind, 0))
                port = super().listen(route, sock.getsockname()[1], None)
            except (OSError, CannotListenError):
                sock.close()
                continue
            self.reserved = sock
            return port
        raise CannotListenError(route.bind, 0, OSError("no port number free for both TCP and UDP"))

    def open(self) -> None:
        super().open()
        if self.datagrams is not None:
            return
        assert self.port is not None
        agent = self.agent
        host = self.port.getHost()
        assert isinstance(host, (IPv4Address, IPv6Address))  # a TCP port's
        server = DTLSServer(
            server_context(agent.ca, agent.cert, agent.key), self.tunnel, clock=self.reactor,
            refused=lambda address, reason: self.refusals.refuse(
                "agent-tls", client=join_host_port(*address), reason=reason
            ),
        )
        reserved, self.reserved = self.reserved, None
        try:
            if reserved is not None:
                with reserved:
                    reserved.setblocking(False)
                    self.reactor.adoptDatagramPort(reserved.fileno(), reserved.family, server, MAX_DATAGRAM)
            else:
                self.reactor.listenUDP(host.port, server, interface=agent.bind, maxPacketSize=MAX_DATAGRAM)
        except CannotListenError as e:
            self.unbind()
            raise StartError(
                f"streamrelay: agent: cannot listen on udp {join_host_port(agent.bind, host.port)}: {e.socketError}"
            ) from None
        self.datagrams = server

    def tunnel(self, session: DTLSSession) -> TunnelDatagrams:
        """A verified DTLS session's handler: it reads the header, then relays."""
        return TunnelDatagrams(
            session, self.reader, self.events, self.refusals, self.stats, self.reactor, self.agent.header_timeout,
        )

    def stop_listening(self) -> Deferred[None] | None:
        """The TCP port, then the DTLS sessions (each gets a close_notify) and their socket."""
        stopped = super().stop_listening()
        server, self.datagrams = self.datagrams, None
        if server is None:
            return stopped
        closed = server.stop()
        return closed if stopped is None else DeferredList([stopped, closed]).addCallback(lambda _: None)

    def unbind(self) -> None:
        super().unbind()
        server, self.datagrams = self.datagrams, None
        if server is not None:
            server.stop()


class UDPRouteService(_ListeningService):
    """
    A UDP route: its listening socket and the sessions it relays.  Its
    sessions answer clients through that socket, so a reload that moves the
    route replaces the service (and closes the sessions) instead.
    """

    def __init__(
        self, route: RouteConfig, reactor: IRelayReactor, hooks: Hooks = NO_HOOKS,
        previous: _ListeningService | None = None, dns: DNSCache | None = None,
    ) -> None:
        super().__init__(route, reactor, previous, dns)
        self.relay = DatagramRelay(route, self.events, self.refusals, reactor, hooks, self.stats)
        self.relay.limiter = self.limiter_for(route)
        self.relay.shaper = self.shaper_for(route)
        self.relay.pool = self.pool_for(route, self.events)

    @property
    def hooks(self) -> Hooks:
        return self.relay.hooks

    def listen(self, route: RouteConfig, number: int, inherited: Inherited | None) -> IListeningPort:
        protocol = self.relay if route.port_count == 1 else Door(self.relay, number)
        if inherited is not None:
            return self.reactor.adoptDatagramPort(*inherited, protocol, maxPacketSize=MAX_DATAGRAM)
        if not route.reuse_port:
            return self.reactor.listenUDP(number, protocol, interface=route.bind, maxPacketSize=MAX_DATAGRAM)
        # Twisted's listenUDP cannot set SO_REUSEPORT: bind a socket and adopt it.
        family = socket.AF_INET6 if ":" in route.bind else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((route.bind, number))
            except OSError as e:
                raise CannotListenError(route.bind, number, e) from None
            sock.setblocking(False)
            return self.reactor.adoptDatagramPort(sock.fileno(), family, protocol, maxPacketSize=MAX_DATAGRAM)

    def update(self, route: RouteConfig, hooks: Hooks) -> None:
        self.switch(route, self.events_on_this_socket(route))
        self.relay.configure(route, self.events, hooks)
        self.relay.limiter = self.limiter_for(route)
        self.relay.shaper = self.shaper_for(route)
        self.relay.pool = self.pool_for(route, self.events)

    def startService(self) -> None:
        super().startService()
        self.relay.start_sweeping()

    def stop_fields(self) -> dict[str, Any]:
        relay = self.relay
        return {
            "sessions": relay.stats.sessions_opened, "refused": relay.refused, "denied": relay.denied,
            "unreachable": relay.unreachable,
        }

    def stopService(self) -> Deferred[list[tuple[bool, None]]]:
        super().stopService()
        waiting = [self.stop_listening(), self.stop_pool()] + self.relay.close_all("reload" if self.retired else "shutdown")
        return DeferredList([d for d in waiting if d is not None])

    def shut_down(self) -> None:
        self.relay.close_all("shutdown")


class RelayService(MultiService):
    """
    Every route of one configuration, and its reloads: SIGHUP re-reads the
    file, L{reload} takes a L{Config}.
    """

    def __init__(self, config: Config, reactor: IRelayReactor, hooks: Mapping[str, Hooks] | None = None) -> None:
        super().__init__()
        check_hook_names(config, hooks)
        self.config = config
        #: A changed status block needs a restart: the one in force.
        self.status_in_force = config.status
        self.reactor = reactor
        self.hooks: Mapping[str, Hooks] = hooks or {}
        #: Reloads by outcome: C{succeeded}, C{failed} (refused, or a route could not open its socket).
        self.reloads: Counter[str] = Counter()
        #: When the configuration in force was loaded (C{time.time()}).
        self.loaded_at = time.time()
        #: True once stopping began.
        self.draining = False
        #: Services of removed routes whose connections are still finishing, and the Deferred that says when.
        self.retiring: dict[_ListeningService, Deferred[object]] = {}
        self.reloading = DeferredLock()
        self.shared_ports = SharedPorts(reactor)
        self.dns_settings = resolver = config.resolver
        #: Host-name targets' addresses, for every route; its settings need a restart to change.
        self.dns = DNSCache(
            reactor, resolver.servers or None, min_ttl=resolver.dns_min_ttl, max_ttl=resolver.dns_max_ttl,
            max_stale=resolver.dns_max_stale,
        )
        self.previous_sighup: Any = None
        self.catching_sighup = False
        for route in config.routes:
            self.route_service(route, hooks_for(hooks, route.name), config.shutdown_timeout).setServiceParent(self)
        #: The C{agents} entries' health checks; their settings need a restart to change.
        self.agent_health = AgentHealth(config.agents, reactor)
        if config.agents:
            self.agent_health.setServiceParent(self)
        status = StatusService(config.status, self, reactor) if config.status is not None else None
        #: The agent's port, if this relay is one; its settings need a restart to change.
        self.agent: AgentService | None = None
        if config.agent is not None:  # the status resources over its TLS too, guarded by the client certificate
            resources = status or StatusService(StatusConfig(""), self, reactor)
            site = GuardedSite(Page(resources), AccessList.allow_all(), reactor)
            self.agent = AgentService(config.agent, site, config.shutdown_timeout, reactor, self.dns)
            self.agent.setServiceParent(self)
        if status is not None:
            status.setServiceParent(self)

    def route_service(
        self, route: RouteConfig, hooks: Hooks, shutdown_timeout: float, previous: _ListeningService | None = None,
    ) -> _ListeningService:
        if route.protocol == "tcp":
            return RouteService(route, shutdown_timeout, self.reactor, hooks, previous, self.shared_ports, self.dns)
        return UDPRouteService(route, self.reactor, hooks, previous, self.dns)

    def routes(self) -> list[_ListeningService]:
        """The services of the routes in force."""
        return [child for child in self if isinstance(child, _ListeningService)]

    def privilegedStartService(self) -> None:
        raise_descriptor_limit()
        self.catch_sighup()
        started: list[_ListeningService] = []
        try:
            for child in self:
                child.privilegedStartService()
                started.append(child)
        except BaseException:
            for child in started:
                child.unbind()
            raise

    def startService(self) -> None:
        self.catch_sighup()
        super().startService()

    def stopService(self) -> Deferred[list[tuple[bool, object]]]:
        self.draining = True
        if self.catching_sighup:
            self.catching_sighup = False
            signal.signal(signal.SIGHUP, self.previous_sighup or signal.SIG_DFL)
        for service in list(self.retiring):  # a service that finishes at once leaves the dict
            service.shut_down()
        stopping: Deferred[object] = super().stopService()
        return DeferredList([stopping, *self.retiring.values()]).addCallback(lambda _: self.dns.stop())

    # -- reloading

    def catch_sighup(self) -> None:
        """From now on SIGHUP reloads the route file."""
        if not self.catching_sighup:
            self.previous_sighup = signal.signal(signal.SIGHUP, self.hangup)
            self.catching_sighup = True

    def hangup(self, signum: int, frame: Any) -> None:
        """
        The SIGHUP handler: reload on the reactor's thread, which a signal
        may interrupt anywhere; then the handler this one replaced (another
        relay's, in a process that runs several).
        """
        IReactorFromThreads(self.reactor).callFromThread(self.reload_file)
        if callable(self.previous_sighup):
            self.previous_sighup(signum, frame)

    def reload_file(self) -> Deferred[ReloadResult]:
        """Re-read and apply the route file; a file that does not validate changes nothing."""
        path = self.config.path
        try:
            config = load_config(path)
        except ConfigError as e:
            return succeed(self.refuse_reload(path, str(e)))
        return self.reload(config)

    def reload(self, config: Config, hooks: Mapping[str, Hooks] | None = None) -> Deferred[ReloadResult]:
        """
        Run C{config} from now on (and C{hooks}, if given, instead of the
        mapping in force), one reload at a time.  Routes are matched by
        name; see L{ReloadResult} for the outcome, also logged (C{reload}
        or C{reload-failed}).
        """
        return self.reloading.run(self._reload, config, hooks)

    def refuse_reload(self, path: str, error: str) -> ReloadResult:
        self.reloads["failed"] += 1
        events.emit(LogLevel.error, "reload-failed", path=path, error=error)
        return ReloadResult(error=error)

    def _reload(self, config: Config, hooks: Mapping[str, Hooks] | None) -> Deferred[ReloadResult]:
        """Check everything first; stop the removed routes, then, once their ports are closed, the rest."""
        try:
            if self.draining or not self.running:
                raise ValueError("the relay is not running")
            if hooks is not None:
                check_hook_names(config, hooks)
            else:
                hooks = self.hooks
            for route in config.routes:
                if route.protocol == "tcp":
                    splicing(route, hooks_for(hooks, route.name))
        except ValueError as e:
            return succeed(self.refuse_reload(config.path, str(e)))
        names = {route.name for route in config.routes}
        removed = [service for service in self.routes() if service.route.name not in names and service is not self.agent]
        closing = [self.retire(service) for service in removed]
        ports_closed = DeferredList([d for d in closing if d is not None])
        return ports_closed.addCallback(
            lambda _: self._apply(config, hooks, tuple(service.route.name for service in removed))
        )

    def _apply(self, config: Config, hooks: Mapping[str, Hooks], removed: tuple[str, ...]) -> ReloadResult:
        running = {service.route.name: service for service in self.routes()}
        added: list[str] = []
        changed: dict[str, tuple[str, ...]] = {}
        unchanged: list[str] = []
        failed: dict[str, str] = {}
        for route in config.routes:
            route_hooks = hooks_for(hooks, route.name)
            service = running.get(route.name)
            try:
                if service is None:
                    self.start_route(route, route_hooks, config.shutdown_timeout)
                    added.append(route.name)
                    continue
                fields = route_changes(service.route, route) + (("hooks",) if service.hooks != route_hooks else ())
                if not fields:
                    unchanged.append(route.name)
                elif SOCKET_FIELDS.isdisjoint(fields) and bool(route.sni) == bool(service.route.sni):
                    service.update(route, route_hooks)
                elif isinstance(service, RouteService) and route.protocol == "tcp":
                    service.rebind(route, route_hooks)
                else:
                    self.replace(service, route, route_hooks, config.shutdown_timeout)
                if fields:
                    changed[route.name] = fields
            except StartError as e:
                failed[route.name] = str(e).removeprefix("streamrelay: ")
        for service in self.routes():
            if isinstance(service, RouteService):
                service.shutdown_timeout = config.shutdown_timeout
        result = ReloadResult(
            tuple(added), removed, changed, tuple(unchanged), failed,
            tuple(name for name, same in (
                ("status", config.status == self.status_in_force), ("resolver", config.resolver == self.dns_settings),
                ("agent", config.agent == self.config.agent), ("agents", config.agents == self.config.agents),
            ) if not same),
        )
        self.dns.retain({(spec.host, route.family) for route in config.routes for spec in route.targets})
        self.config, self.hooks, self.loaded_at = config, hooks, time.time()
        self.reloads["failed" if failed else "succeeded"] += 1
        events.emit(
            LogLevel.warn if failed else LogLevel.info, "reload", path=config.path,
            added=", ".join(result.added), removed=", ".join(result.removed),
            changed=", ".join(f"{name} ({', '.join(fields)})" for name, fields in changed.items()),
            unchanged=", ".join(result.unchanged), failed="; ".join(failed.values()),
            restart_needed=", ".join(result.restart_needed),
        )
        return result

    def start_route(self, route: RouteConfig, hooks: Hooks, shutdown_timeout: float) -> None:
        """Bind an added route (L{StartError}: it stays absent) and start it."""
        service = self.route_service(route, hooks, shutdown_timeout)
        service.open()
        service.setServiceParent(self)

    def replace(self, service: _ListeningService, route: RouteConfig, hooks: Hooks, shutdown_timeout: float) -> None:
        """
        A route moved to another protocol, or a UDP route to another address:
        a new service, with the old one's counters, bound before the old one retires.
        """
        new = self.route_service(route, hooks, shutdown_timeout, previous=service)
        new.open()
        self.retire(service)
        new.setServiceParent(self)

    def retire(self, service: _ListeningService) -> Deferred[None] | None:
        """
        Take a route out of service: its port closes (the returned Deferred
        fires then) and its connections may finish, up to C{shutdown_timeout}
        (UDP sessions close at once: their replies left through that port).
        """
        closed = service.stop_listening()
        service.retired = True
        finished = service.disownServiceParent()  # stopService, which now leaves the connections be
        if isinstance(finished, Deferred):
            self.retiring[service] = finished

            def retired(_: object) -> None:
                del self.retiring[service]

            finished.addBoth(retired)
        return closed


def route_changes(old: RouteConfig, new: RouteConfig) -> tuple[str, ...]:
    """The fields whose values differ, by their names in L{RouteConfig}."""
    return tuple(f.name for f in dataclasses.fields(RouteConfig) if getattr(old, f.name) != getattr(new, f.name))


def check_hook_names(config: Config, hooks: Mapping[str, Hooks] | None) -> None:
    """A hook for a route that does not exist would silently never run: refuse it."""
    names = {route.name for route in config.routes}
    unknown = sorted(set(hooks or ()) - names - {"*"})
    if unknown:
        raise ValueError(
            f"hooks given for {', '.join(map(repr, unknown))}, but {config.path} has no such route "
            f"(its routes: {', '.join(map(repr, sorted(names)))}; \"*\" means every route)"
        )


def raise_descriptor_limit() -> None:
    """Every pair costs two descriptors: use all the process may have."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return
        events.emit(LogLevel.info, "fd-limit", old=soft, new=hard)


def make_service(
    config: Config, hooks: Mapping[str, Hooks] | None = None, reactor: IRelayReactor | None = None
) -> RelayService:
    """
    The service for every route of C{config}, ready to be given a parent
    (a twistd application, a C{.tac} file's application, or any
    C{MultiService}).  C{hooks} maps route names (or C{"*"}) to L{Hooks}.
    C{reactor} defaults to the global one.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        # Typed as the interfaces every reactor has; the posix ones the relay
        # runs on have the rest (see IRelayReactor).
        reactor = cast(IRelayReactor, default_reactor)
    return RelayService(config, reactor, hooks)
