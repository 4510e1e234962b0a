"""
The service tree: one L{RelayService} (a C{MultiService}) holding one named
child per route, C{route:NAME}, which owns the route's listening port.

Ports are bound in C{privilegedStartService} (before twistd drops
privileges); if any route cannot bind, the ones already bound are closed
and start-up stops with a message naming the route and the address.
Stopping stops listening at once, then closes open connections cleanly,
aborting whatever is still open after C{shutdown_timeout}; UDP sessions have
nothing to flush and are closed at once.
"""

from __future__ import annotations

import resource
import socket
from typing import Mapping, cast

from twisted.application.service import MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import Binding, IListeningPort
from twisted.internet.tcp import makeBinding
from twisted.internet.protocol import ServerFactory
from twisted.logger import LogLevel

from . import events
from .addresses import join_host_port
from .config import Config, RouteConfig
from .events import RefusalLog, RouteEvents
from .compat import listen_limited
from .hooks import NO_HOOKS, Hooks, hooks_for
from .interfaces import IRelayReactor
from .lifecycle import Input
from .inbound import ProxyHeaderFactory
from .stats import RouteStats
from .status import StatusService
from .tcp import RelayFactory
from .udp import MAX_DATAGRAM, DatagramRelay

__all__ = ["RelayService", "RouteService", "StartError", "UDPRouteService", "make_service"]


class StartError(SystemExit):
    """
    A route could not start.  A C{SystemExit}, so that twistd prints the
    message and exits non-zero instead of printing a traceback.
    """


class _ListeningService(Service):
    """
    What TCP and UDP routes share: the route's name and events, and its port,
    bound by C{privilegedStartService} (or C{startService} under a parent
    without a privileged phase).
    """

    def __init__(self, route: RouteConfig, reactor: IRelayReactor) -> None:
        self.name = f"route:{route.name}"
        self.route = route
        self.reactor = reactor
        self.events = RouteEvents(route)
        self.refusals = RefusalLog(self.events, reactor)
        self.stats = RouteStats()
        self.port: IListeningPort | None = None

    def listen(self) -> IListeningPort:
        """Bind the route's port (C{CannotListenError} if it cannot)."""
        raise NotImplementedError

    def bind(self) -> None:
        """Listen on the route's address; raise L{StartError} if it cannot."""
        route = self.route
        try:
            self.port = self.listen()
        except CannotListenError as e:
            raise StartError(
                f"streamrelay: route {route.name!r}: cannot listen on {route.protocol} "
                f"{route.listen}: {e.socketError}"
            ) from None
        host = self.port.getHost()
        assert isinstance(host, (IPv4Address, IPv6Address))  # a TCP or UDP port's
        self.events.set_listen(join_host_port(host.host, host.port))
        self.events.info("start")

    def privilegedStartService(self) -> None:
        if self.port is None:
            self.bind()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:
            self.bind()
        super().startService()

    def unbind(self) -> None:
        """Close the listening port of a route whose siblings failed to start."""
        if self.port is not None:
            self.port.stopListening()
            self.port = None


class RouteService(_ListeningService):
    """A TCP route: its listening port and the pairs it relays."""

    def __init__(
        self, route: RouteConfig, shutdown_timeout: float, reactor: IRelayReactor, hooks: Hooks = NO_HOOKS
    ) -> None:
        super().__init__(route, reactor)
        self.shutdown_timeout = shutdown_timeout
        self.factory = RelayFactory(route, self.events, self.refusals, reactor, hooks, self.stats)
        self.header_factory: ProxyHeaderFactory | None = None
        self.listening_factory: ServerFactory = self.factory
        if route.proxy_protocol.mode != "disabled":
            self.header_factory = ProxyHeaderFactory(
                self.factory, route.proxy_protocol, self.events, self.refusals, reactor, self.stats
            )
            self.listening_factory = self.header_factory
        if route.max_connections:
            self.factory.changed = self.connections_changed
            if self.header_factory is not None:
                self.header_factory.changed = self.connections_changed

    def room(self) -> int:
        """How many more connections C{max_connections} allows (PROXY headers awaited count)."""
        open_now = len(self.factory.pairs)
        if self.header_factory is not None:
            open_now += len(self.header_factory.pending)
        return self.route.max_connections - open_now

    def connections_changed(self) -> None:
        """
        Stop accepting at C{max_connections} and resume below it: the
        kernel's backlog holds newcomers meanwhile, and the port accepts no
        more in one go than there is room for (L{compat.LimitedPort}).
        """
        port = self.port
        if port is None:
            return
        if self.room() > 0:
            port.startReading()  # type: ignore[attr-defined]
        else:
            port.stopReading()  # type: ignore[attr-defined]

    def listen(self) -> IListeningPort:
        route = self.route
        port: int | Binding = route.listen_port
        if route.reuse_port:
            port = makeBinding(route.bind, route.listen_port, reuseAddress=True, reusePort=True)
        if route.max_connections:
            return listen_limited(
                self.reactor, port, self.listening_factory, self.room, route.backlog, route.bind
            )
        return self.reactor.listenTCP(port, self.listening_factory, backlog=route.backlog, interface=route.bind)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        stopped = port.stopListening() if port is not None else None
        if port is not None:
            self.events.info("stop")
        if self.header_factory is not None:
            self.header_factory.close_pending()
        pairs = list(self.factory.pairs)
        for pair in pairs:
            pair.feed(Input.SHUTDOWN, detail="shutdown")
        waiting = [pair.done for pair in pairs if not pair.done.called]
        if stopped is not None:
            waiting.append(stopped)
        if not waiting:
            return succeed(None)
        deadline = self.reactor.callLater(self.shutdown_timeout, self._abort_all)
        finished = DeferredList(waiting)

        def drained(_: object) -> None:
            if deadline.active():
                deadline.cancel()

        return finished.addCallback(drained)

    def _abort_all(self) -> None:
        for pair in list(self.factory.pairs):
            self.events.warn("abort", conn=pair.id, client=pair.peer, reason="shutdown timeout")
            pair.feed(Input.ABORT, detail="shutdown timeout")


class UDPRouteService(_ListeningService):
    """A UDP route: its listening socket and the sessions it relays."""

    def __init__(self, route: RouteConfig, reactor: IRelayReactor, hooks: Hooks = NO_HOOKS) -> None:
        super().__init__(route, reactor)
        self.relay = DatagramRelay(route, self.events, self.refusals, reactor, hooks, self.stats)

    def listen(self) -> IListeningPort:
        route = self.route
        if not route.reuse_port:
            return self.reactor.listenUDP(route.listen_port, self.relay, interface=route.bind, maxPacketSize=MAX_DATAGRAM)
        # Twisted's listenUDP cannot set SO_REUSEPORT: bind a socket and adopt it.
        family = socket.AF_INET6 if ":" in route.bind else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((route.bind, route.listen_port))
            except OSError as e:
                raise CannotListenError(route.bind, route.listen_port, e) from None
            sock.setblocking(False)
            return self.reactor.adoptDatagramPort(sock.fileno(), family, self.relay, maxPacketSize=MAX_DATAGRAM)

    def startService(self) -> None:
        super().startService()
        self.relay.start_sweeping()

    def stopService(self) -> Deferred[list[tuple[bool, None]]]:
        super().stopService()
        port, self.port = self.port, None
        waiting: list[Deferred[None] | None] = []
        if port is not None:
            waiting.append(port.stopListening())
            relay = self.relay
            self.events.info(
                "stop", sessions=relay.stats.sessions_opened, refused=relay.refused, denied=relay.denied,
                unreachable=relay.unreachable,
            )
        waiting += self.relay.close_all("shutdown")
        return DeferredList([d for d in waiting if d is not None])


class RelayService(MultiService):
    """Every route of one configuration."""

    def __init__(self, config: Config, reactor: IRelayReactor, hooks: Mapping[str, Hooks] | None = None) -> None:
        super().__init__()
        self.config = config
        check_hook_names(config, hooks)
        for route in config.routes:
            service: _ListeningService
            if route.protocol == "tcp":
                service = RouteService(route, config.shutdown_timeout, reactor, hooks_for(hooks, route.name))
            else:
                service = UDPRouteService(route, reactor, hooks_for(hooks, route.name))
            service.setServiceParent(self)
        if config.status is not None:
            StatusService(config.status, self, reactor).setServiceParent(self)

    def privilegedStartService(self) -> None:
        raise_descriptor_limit()
        started: list[_ListeningService] = []
        try:
            for child in self:
                child.privilegedStartService()
                started.append(child)
        except BaseException:
            for child in started:
                child.unbind()
            raise


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
