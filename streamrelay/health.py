"""
Active health checks of a route's targets.

A L{HealthChecker} checks each target every C{interval} (GoDoxy's fields and
defaults: 5 s, with a C{timeout} of 5 s), one check in flight per target, the
first at a random point of the first interval so that many targets do not
fire together.  C{retries} consecutive failures mark a target down, one
success marks it up again; each change sets L{Target.up} (which
L{streamrelay.balance.Balancer} reads) and calls C{on_change}, for the
caller to log.  Targets start up, so a route serves at once.  C{retries}
defaults to GoDoxy's: as many checks as fit in 15 s, at least one (3 at the
default interval); GoDoxy counts them before it reports a target down,
here before the target stops getting connections.

How a target is checked is a L{Probe}, a strategy object: L{TCPProbe},
L{UDPProbe} and L{AgentProbe} here.

  - TCP: the connection must open within C{timeout}.  With C{send}, those
    bytes are written once it is open; with C{expect}, the target's first
    bytes must begin with C{expect} (an SSH banner C{SSH-2.0}, an SMTP
    greeting C{220}, Redis's C{+PONG} after C{PING\\r\\n}): other bytes, or
    the connection closing or the timeout coming first, fail the check.
  - UDP: C{send} (an empty datagram without it) goes out on a connected
    socket, and the check passes on the first reply that begins with
    C{expect} (any reply without it).  Another reply, an ICMP port
    unreachable (the socket refused), or silence until C{timeout} fail it:
    unlike GoDoxy's UDP check, which cannot tell, a closed port or a silent
    service is down.
  - Agent (GoDoxy's): the mutual-TLS tunnel must open and the agent close
    it, with nothing sent back, after the probe header (flag "close
    immediately"); a failed handshake, bytes in reply, or the timeout fail it.

A check's socket is closed before its result is counted, so L{stop} (and
each check) leaves no socket or timer behind once its Deferred has fired.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Final, Protocol

from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IConnector, IDelayedCall, ITCPTransport, IUDPTransport
from twisted.internet.protocol import ClientFactory, DatagramProtocol, connectionDone
from twisted.internet.protocol import Protocol as StreamProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .balance import Target
from .interfaces import IRelayReactor

if TYPE_CHECKING:  # imported when used: it imports the configuration, which imports this module
    from .tlslayer import TLSLayer

__all__ = [
    "DOWN_DELAY", "AgentProbe", "CheckFailed", "HealthCheck", "HealthChecker", "Probe", "TCPProbe", "UDPProbe",
    "default_retries",
]

_log = Logger(namespace="streamrelay")

#: GoDoxy's C{HealthCheckDownNotifyDelayDefault}: how long a target may fail
#: before it is reported down, from which C{retries} defaults.
DOWN_DELAY: Final = 15.0


def default_retries(interval: float) -> int:
    """GoDoxy's default C{retries}: the checks that fit in L{DOWN_DELAY}, at least one."""
    return max(1, int(DOWN_DELAY // interval))


class CheckFailed(Exception):
    """The target answered, but not as a healthy one would (or not in time)."""


class Probe(Protocol):
    """How to check one target."""

    def check(self, reactor: IRelayReactor, host: str, port: int, timeout: float) -> Deferred[None]:
        """
        Succeed if C{host}:C{port} is healthy, or fail with the reason, within
        C{timeout}; fire only once the check's socket is closed.  Cancelling
        aborts the check (it then fails with L{CancelledError}, again once
        the socket is closed).
        """


@dataclass(frozen=True)
class TCPProbe:
    """Connect; then, if set, write C{send} and read a reply that begins with C{expect}."""

    send: bytes | None = None
    expect: bytes | None = None

    def check(self, reactor: IRelayReactor, host: str, port: int, timeout: float) -> Deferred[None]:
        return _StreamCheck(reactor, host, port, timeout, self.send, self.expect).result


@dataclass(frozen=True)
class UDPProbe:
    """Send C{send} from a connected socket and wait for a reply that begins with C{expect}."""

    send: bytes = b""
    expect: bytes | None = None

    def check(self, reactor: IRelayReactor, host: str, port: int, timeout: float) -> Deferred[None]:
        return _DatagramCheck(reactor, host, port, timeout, self.send, self.expect).result


@dataclass(frozen=True)
class AgentProbe:
    """Open an agent's TLS tunnel (C{context}, verified as C{server_name}) and send C{header}, a probe's."""

    context: SSL.Context
    server_name: str
    header: bytes

    def check(self, reactor: IRelayReactor, host: str, port: int, timeout: float) -> Deferred[None]:
        return _TunnelCheck(reactor, host, port, timeout, self).result


@dataclass(frozen=True)
class HealthCheck:
    """A route's C{healthcheck} setting.  C{retries} C{None}: L{default_retries}."""

    interval: float = 5.0
    timeout: float = 5.0
    retries: int | None = None
    send: bytes | None = None
    expect: bytes | None = None

    def probe(self, udp: bool) -> Probe:
        """The probe for a UDP route's targets, or a TCP route's."""
        if udp:
            return UDPProbe(self.send or b"", self.expect)
        return TCPProbe(self.send, self.expect)


class _Check:
    """
    One check of one target.  Its verdict is reached once (an answer, a
    refusal, the timeout, a cancel); the socket is then closed, and
    C{result} fires with the verdict once the socket is gone.
    """

    def __init__(self, reactor: IRelayReactor, timeout: float, expect: bytes | None) -> None:
        self.expect = expect
        self.result: Deferred[None] = Deferred(lambda _: self.conclude(CancelledError()))
        self._gone: Deferred[None] = Deferred()
        self.result.addBoth(lambda verdict: self._gone.addCallback(lambda _: verdict))
        self._timer: IDelayedCall = reactor.callLater(timeout, self._timed_out, timeout)

    def _timed_out(self, timeout: float) -> None:
        self.conclude(CheckFailed(f"{self.waiting_for()} within {timeout:g}s"))

    def waiting_for(self) -> str:
        """What a timeout means now, as in "no reply within 5s"."""
        return "no reply"

    def answered(self, data: bytes) -> bool:
        """
        Judge the target's first bytes: C{False} while they are fewer than
        C{expect}; otherwise conclude, with success if they begin with it.
        """
        expect = self.expect or b""
        if len(data) < len(expect):
            return False
        if data.startswith(expect):
            self.conclude(None)
        else:
            self.conclude(CheckFailed(f"expected {expect!r}, got {data[:max(len(expect), 16)]!r}"))
        return True

    def conclude(self, verdict: Failure | BaseException | None) -> None:
        """Give the verdict (C{None}: healthy), once, and close the socket."""
        if self.result.called:
            return
        if self._timer.active():
            self._timer.cancel()
        if verdict is None:
            self.result.callback(None)
        else:
            self.result.errback(verdict)
        self.close(healthy=verdict is None)

    def close(self, healthy: bool) -> None:
        """Close the socket: gracefully after a healthy verdict, at once otherwise."""
        raise NotImplementedError

    def gone(self) -> None:
        """The socket is closed (by us, or by the reactor): let the result through."""
        if not self._gone.called:
            self._gone.callback(None)


class _StreamCheck(_Check, StreamProtocol):
    """A TCP check: the check is the connection's protocol."""

    transport: ITCPTransport

    def __init__(
        self, reactor: IRelayReactor, host: str, port: int, timeout: float, send: bytes | None, expect: bytes | None
    ) -> None:
        super().__init__(reactor, timeout, expect)
        self.send = send
        self.received = b""
        self.state = "connecting"
        self.connector: IConnector = reactor.connectTCP(host, port, self.connection_factory(reactor, timeout))

    def connection_factory(self, reactor: IRelayReactor, timeout: float) -> ClientFactory:
        return _OneConnection(self)

    def waiting_for(self) -> str:
        return "not connected" if self.state == "connecting" else super().waiting_for()

    def connectionMade(self) -> None:
        self.state = "connected"
        if self.send:
            self.transport.write(self.send)
        if self.expect is None:
            self.conclude(None)

    def dataReceived(self, data: bytes) -> None:
        if self.result.called:
            return
        self.received += data
        self.answered(self.received)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.state = "closed"
        got = f"after {self.received!r}" if self.received else "without a reply"
        self.conclude(CheckFailed(f"closed {got}"))
        self.gone()

    def connect_failed(self, reason: Failure) -> None:
        self.state = "closed"
        self.conclude(reason)
        self.gone()

    def close(self, healthy: bool) -> None:
        if self.state == "connecting":
            self.connector.stopConnecting()  # closes the socket, and says so (connect_failed), at once
        elif self.state == "connected":
            self.state = "closing"
            if healthy:
                self.transport.loseConnection()
            else:
                self.transport.abortConnection()


class _OneConnection(ClientFactory):
    """The factory of one L{_StreamCheck}'s connection."""

    noisy = False

    def __init__(self, check: _StreamCheck) -> None:
        self.check = check

    def buildProtocol(self, addr: IAddress | None) -> StreamProtocol:
        return self.check

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.check.connect_failed(reason)


class _TunnelCheck(_StreamCheck):
    """
    An agent check: the check is the tunnel's inner protocol, connected once
    the agent is verified; the agent closing after the header is the pass.
    """

    def __init__(self, reactor: IRelayReactor, host: str, port: int, timeout: float, probe: AgentProbe) -> None:
        self.probe = probe
        self.layer: TLSLayer | None = None  # once the TCP connection is open
        super().__init__(reactor, host, port, timeout, probe.header, None)

    def connection_factory(self, reactor: IRelayReactor, timeout: float) -> ClientFactory:
        return _TunnelConnection(self, reactor, timeout)

    def waiting_for(self) -> str:
        if self.state == "connected":
            return "the agent did not close the probe"
        return "no TLS handshake" if self.layer is not None else "not connected"

    def connectionMade(self) -> None:
        self.state = "connected"
        self.transport.write(self.probe.header)

    def dataReceived(self, data: bytes) -> None:
        self.conclude(CheckFailed(f"the agent answered the probe with {data[:16]!r}"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.state = "closed"
        self.conclude(None)
        self.gone()

    def tls_failed(self, reason: str) -> None:
        self.conclude(CheckFailed(f"tls: {reason}"))

    def close(self, healthy: bool) -> None:
        if self.state == "connecting" and self.layer is not None:  # during the handshake
            self.state = "closing"
            self.layer.abortConnection()
        else:
            super().close(healthy)


class _TunnelConnection(_OneConnection):
    """The factory of one L{_TunnelCheck}'s connection: a client TLS layer around the check."""

    check: _TunnelCheck

    def __init__(self, check: _TunnelCheck, reactor: IRelayReactor, timeout: float) -> None:
        super().__init__(check)
        self.reactor = reactor
        self.timeout = timeout

    def buildProtocol(self, addr: IAddress | None) -> StreamProtocol:
        from .tlslayer import TLSLayer

        check = self.check
        check.layer = TLSLayer(
            check, check.probe.context, server=False, reactor=self.reactor, handshake_timeout=self.timeout,
            server_name=check.probe.server_name, on_failure=check.tls_failed,
        )
        return check.layer

    def clientConnectionLost(self, connector: IConnector, reason: Failure) -> None:
        """After the check's own C{connectionLost} if the handshake was done; else the only word of the end."""
        self.check.conclude(CheckFailed("closed during the TLS handshake"))
        self.check.gone()


class _DatagramCheck(_Check, DatagramProtocol):
    """
    A UDP check.  On epoll and poll reactors an ICMP port unreachable on the
    connected socket makes the reactor close it (twisted#5377): an
    unexpected C{stopProtocol} is that refusal.
    """

    transport: IUDPTransport
    noisy = False  # no "Starting protocol" line for every check

    def __init__(
        self, reactor: IRelayReactor, host: str, port: int, timeout: float, send: bytes, expect: bytes | None
    ) -> None:
        super().__init__(reactor, timeout, expect)
        self.open = False
        try:
            reactor.listenUDP(0, self, interface="::" if ":" in host else "", maxPacketSize=65535)
            self.open = True
            self.transport.connect(host, port)
            self.transport.write(send, (host, port))  # the connected address: the only one allowed
        except (CannotListenError, OSError, ValueError) as e:
            self.conclude(CheckFailed(f"cannot send: {e}"))
            if not self.open:
                self.gone()

    def datagramReceived(self, data: bytes, addr: object) -> None:
        if not self.answered(data):  # a reply shorter than expect
            self.conclude(CheckFailed(f"expected {self.expect!r}, got {data!r}"))

    def connectionRefused(self) -> None:
        self.conclude(CheckFailed("port unreachable"))

    def stopProtocol(self) -> None:
        self.open = False
        self.connectionRefused()
        self.gone()

    def close(self, healthy: bool) -> None:
        if self.open:
            self.open = False
            self.transport.stopListening()  # stopProtocol follows within a reactor turn


class HealthChecker:
    """
    Checks a route's targets with one L{Probe}, and marks them up and down.
    L{set_targets} says which targets to check; L{stop} ends every check.
    """

    def __init__(
        self,
        reactor: IRelayReactor,
        probe: Probe,
        on_change: Callable[[Target, bool, str], None],
        settings: HealthCheck = HealthCheck(),
    ) -> None:
        """C{on_change(target, up, reason)} is called on every transition, after C{target.up} has changed."""
        self.reactor = reactor
        self.probe = probe
        self.on_change = on_change
        self.settings = settings
        self.retries = settings.retries or default_retries(settings.interval)
        self._watches: dict[Target, _Watch] = {}

    def set_targets(self, targets: Iterable[Target]) -> None:
        """Check these targets from now on: new ones from a random point of the first interval."""
        wanted = list(targets)
        for target in set(self._watches) - set(wanted):
            self._watches.pop(target).stop()
        for target in wanted:
            if target not in self._watches:
                self._watches[target] = _Watch(self, target)

    def stop(self) -> Deferred[None]:
        """Stop checking; fires once no check is left in flight (their sockets closed)."""
        watches, self._watches = self._watches, {}
        return gatherResults([watch.stop() for watch in watches.values()]).addCallback(lambda _: None)


class _Watch:
    """The checks of one target: a C{LoopingCall}, which waits for each check before it schedules the next."""

    def __init__(self, checker: HealthChecker, target: Target) -> None:
        self.checker = checker
        self.target = target
        self.failures = 0  # consecutive
        self.stopped = False
        self.checking: Deferred[None] | None = None
        self.loop = LoopingCall(self.check)
        self.loop.clock = checker.reactor
        self.done: Deferred[LoopingCall] | None = None
        interval = checker.settings.interval
        self.first: IDelayedCall | None = checker.reactor.callLater(random.uniform(0, interval), self.start)

    def start(self) -> None:
        self.first = None
        self.done = self.loop.start(self.checker.settings.interval)
        self.done.addErrback(self.crashed)

    def crashed(self, failure: Failure) -> None:
        """A bug (in C{on_change}, say) ended the checks: say so rather than stop in silence."""
        _log.failure("health checks of {target} stopped", failure, target=self.target.key)

    def check(self) -> Deferred[None]:
        checker = self.checker
        target = self.target
        self.checking = checker.probe.check(checker.reactor, target.host, target.port, checker.settings.timeout)
        return self.checking.addBoth(self.record)

    def record(self, verdict: Failure | None) -> None:
        self.checking = None
        if self.stopped:
            return
        checker = self.checker
        target = self.target
        target.last_check = checker.reactor.seconds()
        if verdict is None:
            self.failures = 0
            if not target.up:
                target.up = True
                checker.on_change(target, True, "check passed")
            return
        reason = verdict.getErrorMessage()
        target.last_error = reason
        self.failures += 1
        if target.up and self.failures >= checker.retries:
            target.up = False
            checker.on_change(target, False, reason)

    def stop(self) -> Deferred[None]:
        """Fires once the check in flight, if any, has closed its socket."""
        self.stopped = True
        if self.first is not None:
            self.first.cancel()
            self.first = None
        if self.loop.running:
            self.loop.stop()
        if self.checking is not None and not self.checking.called:
            self.checking.cancel()
        return succeed(None) if self.done is None else self.done.addCallback(lambda _: None)
