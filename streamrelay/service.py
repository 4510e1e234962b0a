"""
The service tree: one L{RelayService} (a C{MultiService}) holding one named
child per route, C{route:NAME}, which owns the route's listening port.

Ports are bound in C{privilegedStartService} (before twistd drops
privileges); if any route cannot bind, the ones already bound are closed
and start-up stops with a message naming the route and the address.
Stopping stops listening at once, then closes open connections cleanly,
aborting whatever is still open after C{shutdown_timeout}.
"""

from __future__ import annotations

import resource
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import LogLevel

from . import events
from .config import Config, RouteConfig, join_host_port
from .events import RouteEvents
from .tcp import RelayFactory

__all__ = ["RelayService", "RouteService", "StartError", "make_service"]


class StartError(SystemExit):
    """
    A route could not start.  A C{SystemExit}, so that twistd prints the
    message and exits non-zero instead of printing a traceback.
    """


class RouteService(Service):
    """A TCP route: its listening port and the pairs it relays."""

    def __init__(self, route: RouteConfig, shutdown_timeout: float, reactor: Any) -> None:
        self.name = f"route:{route.name}"
        self.route = route
        self.shutdown_timeout = shutdown_timeout
        self.reactor = reactor
        self.events = RouteEvents(route)
        self.factory = RelayFactory(route, self.events, reactor)
        self.port: IListeningPort | None = None

    def bind(self) -> None:
        """Listen on the route's address; raise L{StartError} if it cannot."""
        route = self.route
        try:
            self.port = self.reactor.listenTCP(
                route.listen_port, self.factory, backlog=route.backlog, interface=route.bind
            )
        except CannotListenError as e:
            raise StartError(
                f"streamrelay: route {route.name!r}: cannot listen on tcp "
                f"{route.listen}: {e.socketError}"
            ) from None
        host = self.port.getHost()
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

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        stopped = port.stopListening() if port is not None else None
        if port is not None:
            self.events.info("stop")
        pairs = list(self.factory.pairs)
        for pair in pairs:
            pair.close("shutdown")
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
            pair.abort("shutdown timeout")

    def unbind(self) -> None:
        """Close the listening port of a route whose siblings failed to start."""
        if self.port is not None:
            self.port.stopListening()
            self.port = None


class RelayService(MultiService):
    """Every route of one configuration."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        for route in config.routes:
            if route.protocol != "tcp":
                raise StartError(
                    f"streamrelay: {config.path}: route {route.name!r}: "
                    f"{route.scheme} routes are not relayed yet"
                )
            RouteService(route, config.shutdown_timeout, reactor).setServiceParent(self)

    def privilegedStartService(self) -> None:
        raise_descriptor_limit()
        started: list[RouteService] = []
        try:
            for child in self:
                child.privilegedStartService()
                started.append(child)
        except BaseException:
            for child in started:
                child.unbind()
            raise


def raise_descriptor_limit() -> None:
    """Every pair costs two descriptors: use all the process may have."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return
        events.emit(LogLevel.info, "fd-limit", old=soft, new=hard)


def make_service(config: Config, reactor: Any = None) -> RelayService:
    """
    The service for every route of C{config}, ready to be given a parent
    (a twistd application, a C{.tac} file's application, or any
    C{MultiService}).
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return RelayService(config, reactor)
