"""
Dialing a route's target: name resolution within the scheme's family, one
C{connectTCP} per attempt with C{connect_timeout}, and C{retries} more
attempts, rotating through the resolved addresses.

C{connectTCP} with a C{ClientFactory} is used rather than an endpoint: the
target's protocol is then the relay's own, with no wrapping layer on the
per-chunk path, and a pending attempt can be stopped when the client leaves.
A plain pair's route connects with L{streamrelay.lean.connect} instead,
which takes the same arguments.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Callable, Protocol as Interface

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import DNSLookupError, NotConnectingError
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IHostResolution,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IResolutionReceiver,
)
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["Attempt", "Connect", "Dial", "is_ip_literal", "resolve"]


class Attempt(Interface):
    """What a dial keeps of a connection attempt: Twisted's connector, or a lean one."""

    def stopConnecting(self) -> None: ...


#: How an attempt starts: C{reactor.connectTCP}, or L{streamrelay.lean.connect} bound to a reactor.
Connect = Callable[[str, int, ClientFactory, float], Attempt]

_ADDRESS_TYPES = {4: [IPv4Address], 6: [IPv6Address], None: None}


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects what the reactor's resolver finds into a Deferred list."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self.deferred: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        # Only IP addresses are asked for (_ADDRESS_TYPES), or found by
        # Twisted's resolvers when no type is given.
        if isinstance(address, (IPv4Address, IPv6Address)) and address.host not in self.found:
            self.found.append(address.host)

    def resolutionComplete(self) -> None:
        self.deferred.callback(self.found)


@functools.lru_cache(maxsize=256)
def is_ip_literal(host: str) -> bool:
    """Cached: routes have few targets, and this runs for every connection."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve(reactor: IReactorPluggableNameResolver, host: str, family: int | None) -> Deferred[list[str]]:
    """
    The addresses of C{host} (an IP literal resolves to itself), restricted
    to IPv4 or IPv6 when C{family} says so.  Fails with L{DNSLookupError}
    when nothing is found.
    """
    if is_ip_literal(host):
        return succeed([host])
    receiver = _Addresses()
    reactor.nameResolver.resolveHostName(receiver, host, 0, _ADDRESS_TYPES[family])

    def found(addresses: list[str]) -> list[str]:
        if not addresses:
            which = f"IPv{family} " if family else ""
            raise DNSLookupError(f"no {which}address found for {host!r}")
        return addresses

    return receiver.deferred.addCallback(found)


class Dial(ClientFactory):
    """
    One dial of a target, over up to C{1 + retries} connection attempts.

    C{make_protocol} builds the target-side protocol; the caller learns of
    success from that protocol's C{connectionMade}, and of failure through
    C{on_failure}, called once with the last attempt's reason.
    """

    noisy = False

    def __init__(
        self,
        reactor: IReactorTCP,
        addresses: list[str],
        port: int,
        timeout: float,
        retries: int,
        make_protocol: Callable[[], Protocol],
        on_failure: Callable[[Failure], None],
        connect: Connect | None = None,
    ) -> None:
        self.reactor = reactor
        self.connect: Connect = connect or reactor.connectTCP
        self.addresses = addresses
        self.port = port
        self.timeout = timeout
        self.max_attempts = retries + 1
        self.attempts_made = 0
        self.make_protocol = make_protocol
        self.on_failure = on_failure
        self.connector: Attempt | None = None
        #: The protocol of a connected attempt: one that connects its caller late (TLS) is reset if cancelled meanwhile.
        self.built: Protocol | None = None
        self.cancelled = False

    def start(self) -> None:
        address = self.addresses[self.attempts_made % len(self.addresses)]
        self.attempts_made += 1
        self.connector = self.connect(address, self.port, self, self.timeout)

    def cancel(self) -> None:
        """Stop a pending attempt; no failure is reported after this."""
        self.cancelled = True
        if self.connector is not None:
            try:
                self.connector.stopConnecting()
            except NotConnectingError:
                pass  # connected already, or between attempts
        if self.built is not None and self.built.transport is not None:
            self.built.transport.abortConnection()  # type: ignore[attr-defined]

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        self.built = self.make_protocol()
        return self.built

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if self.cancelled:
            return
        if self.attempts_made < self.max_attempts:
            self.start()
        else:
            self.on_failure(reason)
