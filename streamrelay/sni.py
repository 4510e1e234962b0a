"""
Routing on the TLS server name: several TCP routes on one listening address,
each taking the names in its C{sni} list.

A L{SharedPort} is the one listening port of such an address.  Each
connection is read by a L{HelloPeek} (behind the inbound PROXY header, if
the routes read one: a load balancer's header comes before the ClientHello)
until the ClientHello is complete; nothing is consumed.  The name picks the
route, whose own entrance then gets the connection and every byte read so
far, as if it had accepted it: its access checks, limits and TLS (terminated
with the route's certificate, or relayed as it is) follow as on a port of its
own.  The peek stays as the route's transport, so the pair can still ask it
which name the client sent (L{server_name}).

A name no route takes (and no C{"*"} default), a malformed ClientHello or
one that takes longer than C{tls_hello_timeout} resets the connection before
anything is dialed; the first route on the address counts and logs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IListeningPort,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from .addresses import describe
from .clienthello import ClientHello, HelloReader, InvalidClientHello, NameTable
from .compat import connection_under, swap_protocol
from .inbound import ProxyHeaderFactory

if TYPE_CHECKING:
    from .service import RouteService

__all__ = ["HelloPeek", "SNIRouter", "SharedPort", "server_name"]


@implementer(IHalfCloseableProtocol)
class HelloPeek(ProtocolWrapper):
    """Reads one connection's ClientHello, then hands it to the route it names."""

    factory: SNIRouter
    transport: ITCPTransport

    def __init__(self, router: SNIRouter) -> None:
        super().__init__(router, None)  # type: ignore[arg-type]  # the route's protocol comes later
        #: Everything read, for the route's protocol: chunks, joined once (a hello may trickle in by the byte).
        self.received: list[bytes] = []
        self.reader = HelloReader()  # reads each byte once, however the hello trickles in
        self.hello: ClientHello | None = None
        self.timer: IDelayedCall | None = None

    def logPrefix(self) -> str:
        return "HelloPeek"

    def makeConnection(self, transport: ITCPTransport) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        router = self.factory
        router.pending.add(self)
        self.timer = router.reactor.callLater(router.hello_timeout(), self.refuse, "hello-timeout", "no ClientHello in time")

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        try:
            hello = self.reader.feed(data)
        except InvalidClientHello as e:
            self.refuse("bad-hello", str(e))
            return
        if hello is not None:
            self.route(hello)

    def readConnectionLost(self) -> None:
        self.stop_waiting()
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Only reached before a route took the connection."""
        self.stop_waiting()

    def stop_waiting(self) -> None:
        self.factory.pending.discard(self)
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def refuse(self, kind: str, reason: str, **fields: object) -> None:
        self.stop_waiting()
        self.factory.refused(kind, client=describe(self.getPeer()), reason=reason, **fields)
        self.transport.abortConnection()

    def route(self, hello: ClientHello) -> None:
        self.stop_waiting()
        self.hello = hello
        service = self.factory.table.lookup(hello.server_name)
        if service is None:
            self.refuse("no-route", "no route takes this server name", sni=hello.server_name or "")
            return
        if service.room() <= 0:
            self.stop_waiting()
            service.refusals.refuse("full", client=describe(self.getPeer()), sni=hello.server_name or "")
            self.transport.abortConnection()
            return
        inner = service.entrance.buildProtocol(self.getPeer())
        self.wrappedProtocol = inner
        swap_protocol(connection_under(self), inner)  # out of the data path from now on
        inner.makeConnection(self)  # provides the transport's interfaces
        data, self.received = b"".join(self.received), []
        inner.dataReceived(data)


def server_name(transport: object) -> str | None:
    """The server name a pair's client sent, if a L{HelloPeek} read it."""
    while transport is not None:
        if isinstance(transport, HelloPeek):
            return transport.hello.server_name if transport.hello is not None else None
        transport = getattr(transport, "transport", None)
    return None


class SNIRouter(ServerFactory):
    """The entrance of a shared port: a L{HelloPeek} per connection."""

    noisy = False

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        #: The routes on this address by name, in the order they joined.
        self.members: dict[str, Membership] = {}
        self.table: NameTable[RouteService] = NameTable(())
        self.pending: set[HelloPeek] = set()

    def buildProtocol(self, addr: IAddress | None) -> HelloPeek:  # type: ignore[override]
        return HelloPeek(self)

    def first(self) -> RouteService:
        return next(iter(self.members.values())).service

    def hello_timeout(self) -> float:
        return self.first().route.tls_hello_timeout

    def refused(self, kind: str, **fields: object) -> None:
        """Counted and logged (throttled) by the first route on the address."""
        self.first().refusals.refuse(kind, **fields)

    def rebuild(self) -> None:
        """
        The name table from the members' C{sni} lists.  A reload may move a
        name from one route to another one route at a time: until it is
        done, the route updated last has it.
        """
        names: dict[str, RouteService] = {}
        for membership in self.members.values():
            for name in membership.service.route.sni:
                names[name] = membership.service
        self.table = NameTable(names.items())

    def close_pending(self) -> None:
        for peek_ in list(self.pending):
            peek_.stop_waiting()
            peek_.transport.abortConnection()


class SharedPort:
    """
    One listening port that several routes share by C{sni}.  The first
    route to open it binds it; the last to leave closes it.
    """

    def __init__(self, key: tuple[str, int], reactor: IReactorTime, forget: Callable[[SharedPort], None]) -> None:
        self.key = key
        self.router = SNIRouter(reactor)
        #: The inbound PROXY header reader in front of the router, if the routes read headers.
        self.headers: ProxyHeaderFactory | None = None
        self.port: IListeningPort | None = None
        self.forget = forget

    def join(self, service: RouteService, bind: Callable[[], IListeningPort]) -> Membership:
        """
        Add C{service}; C{bind} opens the port if it is not open yet
        (L{StartError} if it cannot).  The port keeps the socket options it
        was opened with until the last route leaves it.
        """
        if self.port is None:
            self.port = bind()
        membership = Membership(self, service)
        self.router.members[service.route.name] = membership
        self.router.rebuild()
        return membership

    def leave(self, membership: Membership) -> Deferred[None]:
        router = self.router
        name = membership.service.route.name
        if router.members.get(name) is membership:  # not replaced by the same route's new membership
            del router.members[name]
        router.rebuild()
        if router.members or self.port is None:
            return succeed(None)
        self.close_pending()
        port, self.port = self.port, None
        self.forget(self)
        return port.stopListening() or succeed(None)

    def close_pending(self) -> None:
        """Drop connections still waiting for their PROXY header or ClientHello (shutdown)."""
        if self.headers is not None:
            self.headers.close_pending()
        self.router.close_pending()


@implementer(IListeningPort)
class Membership:
    """
    What a route sharing a port holds as its port: leaving the group
    stands for closing it, and accepting is the group's business.
    """

    def __init__(self, shared: SharedPort, service: RouteService) -> None:
        self.shared = shared
        self.service = service

    def getHost(self) -> IAddress:
        assert self.shared.port is not None
        return self.shared.port.getHost()

    def startListening(self) -> None:
        """Joining the group opened the port already."""

    def stopListening(self) -> Deferred[None]:
        return self.shared.leave(self)

    def startReading(self) -> None:
        """C{max_connections} is checked per connection on a shared port (L{HelloPeek.route})."""

    def stopReading(self) -> None:
        """See L{startReading}."""
