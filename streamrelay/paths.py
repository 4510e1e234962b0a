"""
How a pair's bytes travel once both sides are connected: its relay path.

A path is started with the preamble (the outbound PROXY header and the
bytes held while dialing), which it writes to the target before anything
else; after that it can pass a FIN on to one side, close one side once what
is buffered towards it is written, or reset it.  Every path reports back in
the same terms, through the sides' own protocol methods: bytes read
(counted on the side, and resetting the pair's timer), a FIN
(C{readConnectionLost}) and a loss (C{connectionLost}).  So the pair never
asks which path it is on, and a new way of carrying bytes (TLS, a tunnel)
is one more class here.

Two paths exist:

- L{TRANSPORTS}: Twisted's transports, each the streaming producer of the
  other (through the L{streamrelay.tcp.Side}, which also watches a paused
  socket for resets): a full write buffer on one side stops reading on the
  other, so memory stays bounded whatever the speeds.
- L{SplicePath}: both sockets handed to the L{streamrelay.splice} engine,
  which moves the bytes itself (C{splice(2)} for streams) and passes each
  FIN on once nothing is in flight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from twisted.internet.interfaces import IReactorFDSet

from . import splice
from .hangups import HangupWatch

if TYPE_CHECKING:
    from .tcp import Side

__all__ = ["TRANSPORTS", "RelayPath", "SplicePath", "TransportPath"]


class RelayPath(Protocol):
    """What a pair asks of the way its bytes travel."""

    def start(self, client: Side, target: Side, preamble: list[bytes]) -> None:
        """Write C{preamble} to the target, then relay both ways."""

    def half_close(self, side: Side) -> None:
        """Send C{side} a FIN once what is buffered towards it is written."""

    def close(self, side: Side) -> None:
        """Close C{side} once what is buffered towards it is written."""

    def abort(self, side: Side) -> None:
        """Reset C{side} now, dropping what is buffered towards it."""


class TransportPath:
    """
    Relaying through Twisted's transports.  It keeps no state of its own
    (the wiring lives in the transports), so one instance serves every pair,
    before the target connects too.
    """

    def start(self, client: Side, target: Side, preamble: list[bytes]) -> None:
        inbound, outbound = client.transport, target.transport
        inbound.registerProducer(target, True)  # a full client buffer pauses the target
        target.sink = inbound
        outbound.writeSequence(preamble)
        if client.eof:
            return  # nothing more will come from the client
        outbound.registerProducer(client, True)
        client.sink = outbound

    def half_close(self, side: Side) -> None:
        if not side.lost:
            side.transport.unregisterProducer()
            side.transport.loseWriteConnection()

    def close(self, side: Side) -> None:
        if not side.lost:
            side.transport.unregisterProducer()
            side.transport.loseConnection()

    def abort(self, side: Side) -> None:
        if not side.lost:
            side.transport.abortConnection()


TRANSPORTS = TransportPath()


class SplicePath:
    """Relaying with the splice engine, for plain sockets on both sides."""

    def __init__(self, engine: splice.Splice) -> None:
        self.engine = engine

    @classmethod
    def of(
        cls, client: Side, target: Side, reactor: IReactorFDSet, moved: splice.Moved, watch: HangupWatch
    ) -> SplicePath | None:
        """
        A splice path for the pair, if nothing but the pair sees its bytes
        (no TLS layer in between); C{None} otherwise.
        """
        inbound, outbound = splice.socket_connection(client), splice.socket_connection(target)
        if inbound is None or outbound is None:
            return None
        return cls(splice.Splice(reactor, inbound, outbound, moved, watch=watch))

    def start(self, client: Side, target: Side, preamble: list[bytes]) -> None:
        self.engine.start(b"".join(preamble))

    def half_close(self, side: Side) -> None:
        """The engine already passes each FIN on, after what is in flight."""

    def close(self, side: Side) -> None:
        if not side.lost:
            self.engine.close(side)

    def abort(self, side: Side) -> None:
        if not side.lost:
            self.engine.abort(side)
