"""
The agent's listening port (GoDoxy-compatible): one mutual-TLS port where
ALPN picks what the connection is.  C{godoxy-agent-stream/1} is a tunnel, a
pair of the agent's pseudo-route whose client names its target with the
header of L{streamrelay.agentheader}; C{http/1.1} or no ALPN gets the status
resources over the same TLS connection.  Clients without a certificate from
the agent's CA fail the handshake, before either.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory
from twisted.internet.protocol import Protocol, ServerFactory

from .addresses import describe
from .config import AGENT_ALPN
from .tcp import RelayFactory, TLSTerminator
from .tlslayer import TLSFacts, TLSLayer

__all__ = ["AgentFront", "AgentLayer", "Switch"]


class AgentFront(ServerFactory):
    """The agent port's factory: a TLS layer over each connection, its inner protocol picked by ALPN."""

    noisy = False

    def __init__(self, relay: RelayFactory, site: IProtocolFactory) -> None:
        self.relay = relay
        self.site = site
        self.terminator = TLSTerminator(relay)

    def buildProtocol(self, addr: IAddress | None) -> TLSLayer:
        switch = Switch(self)
        layer = AgentLayer(
            switch, self.terminator.context, server=True, reactor=self.relay.reactor,
            handshake_timeout=self.terminator.handshake_timeout, on_failure=switch.failed,
        )
        layer.handshake.addCallback(switch.chosen)
        return layer


class AgentLayer(TLSLayer):
    """A TLS layer that also says whether it is closing, as twisted.web's line reader asks its transport."""

    @property
    def disconnecting(self) -> bool:
        return self.closing or self.failure is not None


class Switch(Protocol):
    """
    The inner protocol of an agent connection until its handshake is done:
    then the tunnel's pair or an HTTP channel takes the layer over, before
    the first plaintext is read.
    """

    transport: TLSLayer

    def __init__(self, front: AgentFront) -> None:
        self.front = front

    def chosen(self, facts: TLSFacts) -> None:
        layer = self.transport
        peer = layer.getPeer()
        protocol: IProtocol | None
        if facts.alpn == AGENT_ALPN:
            protocol = self.front.relay.buildProtocol(peer)
        else:
            protocol = self.front.site.buildProtocol(peer)
        if protocol is None:
            layer.loseConnection()
            return
        layer.inner = protocol
        protocol.makeConnection(layer)

    def failed(self, reason: str) -> None:
        """No certificate from the CA, or no TLS: refused, throttled like a route's refusals."""
        self.front.relay.refusals.refuse("agent-tls", client=describe(self.transport.getPeer()), reason=reason)
