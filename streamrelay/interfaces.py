"""
What the relay asks of its reactor and of a TCP connection's transport, as
single interfaces for the type checker.

Twisted names each capability on its own (C{IReactorTime}, C{IReactorTCP},
C{IConsumer}, ...) and the objects the relay is given provide several of
them at once; Python's types have no intersection.  So, as Twisted itself
does for its global reactor (C{twisted.internet._IReactorCommon}), these
make-believe interfaces inherit the ones the relay uses, and code that needs
one capability takes just that interface, which these are subtypes of.

No class declares them: they are for annotations only, never ask
C{providedBy} about them.
"""

from __future__ import annotations

import socket

from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    IReactorFDSet,
    IReactorPluggableNameResolver,
    IReactorSocket,
    IReactorTCP2,
    IReactorTime,
    IReactorUDP,
    ITCPTransport,
)

__all__ = ["IRelayReactor", "IRelayTransport"]


class IRelayReactor(
    IReactorTime,
    IReactorTCP2,
    IReactorUDP,
    IReactorSocket,
    IReactorFDSet,
    IReactorPluggableNameResolver,
):
    """
    The reactor a route runs on: timers, TCP (listening on a
    C{makeBinding} too, as every posix reactor does), UDP, adopting a
    bound socket, descriptors of the relay's own (the splice engine, the
    hangup watch) and the pluggable name resolver.  Twisted's epoll, poll
    and select reactors provide all of it.
    """


class IRelayTransport(ITCPTransport, IConsumer, IPushProducer):
    """
    A TCP connection's transport as the relay drives it (a
    C{twisted.internet.tcp.Connection} or a L{streamrelay.lean.LeanConnection},
    or the inbound PROXY header's wrapper in front of one): a TCP transport
    that is also the consumer of the other side's bytes, a producer the
    other side can pause, and a socket the hangup watch can watch.
    """

    def fileno() -> int:
        """The socket's descriptor."""

    def getHandle() -> socket.socket:
        """The socket itself."""
