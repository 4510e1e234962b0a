"""
The agent's listening port (GoDoxy-compatible): one mutual-TLS port where
ALPN picks what the connection is.  C{godoxy-agent-stream/1} is a tunnel, a
pair of the agent's pseudo-route whose client names its target with the
header of L{streamrelay.agentheader}; C{http/1.1} or no ALPN gets the status
resources over the same TLS connection.  Clients without a certificate from
the agent's CA fail the handshake, before either.

The same port number over UDP serves DTLS (L{streamrelay.dtls}): each
session's first datagram is the header, then L{TunnelDatagrams} relays one
datagram per record to the target over a connected UDP socket.

On the other end, L{AgentHealth} checks each C{agents} entry with the probe
header (L{streamrelay.health.AgentProbe}) and logs its changes.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory
from twisted.internet.protocol import DatagramProtocol, Protocol, ServerFactory
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from .addresses import describe, join_host_port
from . import events
from .agentheader import PROBE, HeaderReader, Request, encode_header
from .balance import Target
from .compat import SessionPort
from .config import AGENT_ALPN, AgentLinkConfig
from .dial import resolve
from .dtls import DTLSSession
from .events import RefusalLog, RouteEvents
from .health import AgentProbe, HealthChecker
from .interfaces import IRelayReactor
from .stats import RouteStats
from .tcp import RelayFactory, TLSTerminator
from .tlscontext import client_context
from .tlslayer import TLSFacts, TLSLayer
from .udp import MAX_DATAGRAM, next_session_id

__all__ = ["AgentFront", "AgentHealth", "Switch", "TunnelDatagrams"]


class AgentFront(ServerFactory):
    """The agent port's factory: a TLS layer over each connection, its inner protocol picked by ALPN."""

    noisy = False

    def __init__(self, relay: RelayFactory, site: IProtocolFactory) -> None:
        self.relay = relay
        self.site = site
        self.terminator = TLSTerminator(relay)

    def buildProtocol(self, addr: IAddress | None) -> TLSLayer:
        switch = Switch(self)
        layer = TLSLayer(
            switch, self.terminator.context, server=True, reactor=self.relay.reactor,
            handshake_timeout=self.terminator.handshake_timeout, on_failure=switch.failed,
        )
        layer.handshake.addCallback(switch.chosen)
        return layer


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


class TunnelDatagrams(DatagramProtocol):
    """
    One DTLS session on the agent's UDP side (its L{DatagramHandler}): the
    first datagram is the header, checked as on TCP (a probe is answered by
    closing, a refusal is logged), then a socket connected to the target
    carries one datagram per record both ways.  Logged and counted as a UDP
    route's sessions, under the agent's pseudo-route.
    """

    noisy = False

    def __init__(
        self, session: DTLSSession, reader: HeaderReader, events: RouteEvents, refusals: RefusalLog,
        stats: RouteStats, reactor: IRelayReactor, header_timeout: float,
    ) -> None:
        self.session, self.reader, self.events, self.refusals = session, reader, events, refusals
        self.stats, self.reactor = stats, reactor
        self.id = next_session_id()
        self.client = join_host_port(*session.address)
        self.started = reactor.seconds()
        self.request: Request | None = None
        self.port: SessionPort | None = None
        self.datagrams_up = self.bytes_up = self.datagrams_down = self.bytes_down = self.dropped = 0
        self.deadline = reactor.callLater(header_timeout, self.refuse, self.reader.timed_out())

    def datagram_received(self, data: bytes) -> None:
        if self.port is not None:
            self.datagrams_up += 1
            self.bytes_up += len(data)
            try:
                self.port.getHandle().send(data)
            except OSError:
                self.dropped += 1
        elif self.request is None:
            self.take_header(data)
        else:  # the target's name is being resolved
            self.dropped += 1

    def take_header(self, data: bytes) -> None:
        self.deadline.cancel()
        found = self.reader.take(data, self.session.address[0])
        if found is None:
            self.refuse(("agent-header", {"reason": f"a {len(data)}-byte first datagram, not a header"}, b""))
        elif len(found) == 3:
            self.refuse(found)
        else:
            self.request = request = found[0]
            if request.probe:
                self.session.close("probe")
            else:
                self.stats.sessions_opened += 1
                resolve(self.reactor, request.host, None).addCallbacks(self.connect, self.resolve_failed)

    def refuse(self, refusal: tuple[str, dict[str, Any], bytes]) -> None:
        kind, fields, _ = refusal
        self.refusals.refuse(kind, conn=self.id, client=self.client, **fields)
        self.session.close(kind)

    def connect(self, addresses: list[str]) -> None:
        request = self.request
        if self.session.closed or request is None:
            return
        address = addresses[0]
        try:
            port = SessionPort(0, self, "::" if ":" in address else "0.0.0.0", MAX_DATAGRAM, self.reactor)
            port.startListening()
        except CannotListenError as e:
            self.session.close(f"no socket: {e.socketError}")
            return
        self.port = port
        try:
            port.connect(address, request.port)
        except OSError as e:
            self.session.close(f"target unreachable: {e.strerror}")
            return
        port.discard_strangers()
        self.events.debug(
            "session-open", conn=self.id, client=self.client, via=describe(port.getHost()),
            target=join_host_port(request.host, request.port),
        )

    def resolve_failed(self, reason: Failure) -> None:
        self.session.close(f"resolve failed: {reason.getErrorMessage()}")

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        """A reply from the target: one record to the client."""
        self.datagrams_down += 1
        self.bytes_down += len(data)
        if not self.session.send(data):
            self.dropped += 1

    def connectionRefused(self) -> None:
        self.session.close("target unreachable")

    def stopProtocol(self) -> None:
        """The reactor tore the socket down (an ICMP error, twisted#5377), unless the session is over."""
        self.session.close("target unreachable")

    def session_closed(self, reason: str) -> None:
        if self.deadline.active():
            self.deadline.cancel()
        port, self.port = self.port, None
        if port is not None:
            port.stopListening()
        request = self.request
        if request is None or request.probe:
            return
        stats = self.stats
        stats.sessions_closed[reason] += 1
        stats.datagrams_up += self.datagrams_up
        stats.datagrams_down += self.datagrams_down
        stats.datagrams_dropped += self.dropped
        stats.bytes_up += self.bytes_up
        stats.bytes_down += self.bytes_down
        self.events.info(
            "session-closed", conn=self.id, client=self.client, reason=reason,
            duration=self.reactor.seconds() - self.started, datagrams_up=self.datagrams_up, bytes_up=self.bytes_up,
            datagrams_down=self.datagrams_down, bytes_down=self.bytes_down, dropped=self.dropped,
            target=join_host_port(request.host, request.port),
        )


class AgentHealth(Service):
    """
    The C{agents} entries' health: each is probed every C{healthcheck.interval}
    and is up until C{retries} probes in a row fail (L{HealthChecker}'s rules);
    each change is logged (C{agent-down}, C{agent-up}).  C{targets} has
    their state, by name, for the status page and metrics.
    """

    name = "agents"

    def __init__(self, links: tuple[AgentLinkConfig, ...], reactor: IRelayReactor) -> None:
        self.links = links
        self.reactor = reactor
        self.targets = {link.name: Target(link.host, link.port) for link in links}
        self.checkers: list[HealthChecker] = []

    def startService(self) -> None:
        super().startService()
        for link in self.links:
            probe = AgentProbe(
                client_context(link.upstream), link.server_name, encode_header(link.host, link.port, PROBE)
            )
            checker = HealthChecker(self.reactor, probe, partial(self.changed, link), link.healthcheck)
            checker.set_targets([self.targets[link.name]])
            self.checkers.append(checker)

    def changed(self, link: AgentLinkConfig, target: Target, up: bool, reason: str) -> None:
        events.emit(
            LogLevel.info if up else LogLevel.warn, "agent-up" if up else "agent-down", agent=link.name,
            address=join_host_port(link.host, link.port), reason=reason,
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        checkers, self.checkers = self.checkers, []
        return gatherResults([checker.stop() for checker in checkers]).addCallback(lambda _: None)
