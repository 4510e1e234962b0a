"""
Active health checks (L{streamrelay.health}) on the real reactor: the
probes' verdicts against real targets on loopback addresses (127.0.0.x),
then the checker marking targets down and up, once per transition, in time,
and leaving nothing behind when it stops.  Intervals are tens of
milliseconds; every wait is on a Deferred with a deadline.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from streamrelay.balance import Target
from streamrelay.health import CheckFailed, HealthCheck, HealthChecker, Probe, TCPProbe, UDPProbe, default_retries

DEADLINE = 5.0


class Log(list):  # type: ignore[type-arg]
    """What a test waits for: L{wait} fires once C{predicate(self)} holds, or fails after L{DEADLINE}."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[tuple[Callable[[Log], bool], Deferred[Log]]] = []

    def add(self, item: object) -> None:
        self.append(item)
        for waiter in list(self.waiting):
            predicate, d = waiter
            if predicate(self):
                self.waiting.remove(waiter)
                d.callback(self)

    def wait(self, predicate: Callable[[Log], bool]) -> Deferred[Log]:
        if predicate(self):
            return succeed(self)
        d: Deferred[Log] = Deferred()
        self.waiting.append((predicate, d))
        return d.addTimeout(DEADLINE, reactor)


# ------------------------------------------------------------------ targets


class Server(Protocol):
    """
    Logs each connection in the factory's C{accepted}; sends the factory's
    C{greeting} in two parts, 20 ms apart (the check must put them
    together), then closes if the factory says C{close}; answers Redis's
    C{PING}.
    """

    def connectionMade(self) -> None:
        self.factory.accepted.add(self)  # type: ignore[attr-defined]
        greeting: bytes = self.factory.greeting  # type: ignore[attr-defined]
        self.later = reactor.callLater(0.02, self.rest, greeting[3:])
        self.transport.write(greeting[:3])

    def rest(self, data: bytes) -> None:
        self.transport.write(data)
        if self.factory.close:  # type: ignore[attr-defined]
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        if self.later.active():
            self.later.cancel()

    def dataReceived(self, data: bytes) -> None:
        if data == b"PING\r\n":  # Redis
            self.transport.write(b"+PONG\r\n")


class UDPEcho(DatagramProtocol):
    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.transport.write(data, addr)


def free_port(host: str) -> int:
    """A port nothing listens on, TCP or UDP (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Targets(TestCase):
    def tcp(self, host: str, greeting: bytes = b"", close: bool = False, port: int = 0) -> tcp.Port:
        factory = Factory.forProtocol(Server)
        factory.__dict__.update(greeting=greeting, close=close, accepted=Log())
        listening = reactor.listenTCP(port, factory, interface=host)
        self.addCleanup(listening.stopListening)
        return listening

    def udp(self, host: str, protocol: DatagramProtocol) -> int:
        listening = reactor.listenUDP(0, protocol, interface=host)
        self.addCleanup(listening.stopListening)
        return int(listening.getHost().port)


# ------------------------------------------------------------------ probes


async def verdict(probe: Probe, host: str, port: int, timeout: float = DEADLINE) -> str | None:
    """C{None} when healthy, else why not."""
    try:
        await probe.check(reactor, host, port, timeout)
    except CheckFailed as e:
        return str(e)
    except Exception as e:
        return type(e).__name__
    return None


class ProbeTests(Targets):
    """One check at a time: the verdict and the reason it gives."""

    async def test_tcp_connect(self) -> None:
        port = self.tcp("127.0.0.11").getHost().port
        self.assertIsNone(await verdict(TCPProbe(), "127.0.0.11", port))
        self.assertEqual(await verdict(TCPProbe(), "127.0.0.11", free_port("127.0.0.11")), "ConnectionRefusedError")

    async def test_an_ssh_greeting_passes_and_silence_fails_after_the_timeout(self) -> None:
        ssh = TCPProbe(expect=b"SSH-2.0")
        greeter = self.tcp("127.0.0.11", greeting=b"SSH-2.0-x\r\n").getHost().port
        self.assertIsNone(await verdict(ssh, "127.0.0.11", greeter))
        mute = self.tcp("127.0.0.11").getHost().port
        started = reactor.seconds()
        self.assertEqual(await verdict(ssh, "127.0.0.11", mute, timeout=0.2), "no reply within 0.2s")
        self.assertGreaterEqual(reactor.seconds() - started, 0.2)

    async def test_another_greeting_fails_at_once(self) -> None:
        smtp = self.tcp("127.0.0.11", greeting=b"220 mail ESMTP\r\n").getHost().port
        self.assertEqual(
            await verdict(TCPProbe(expect=b"SSH-2.0"), "127.0.0.11", smtp), "expected b'SSH-2.0', got b'220 mail ESMTP\\r\\n'"
        )
        self.assertIsNone(await verdict(TCPProbe(expect=b"220"), "127.0.0.11", smtp))

    async def test_closing_before_the_whole_greeting_fails(self) -> None:
        ssh = TCPProbe(expect=b"SSH-2.0")
        closer = self.tcp("127.0.0.11", close=True).getHost().port
        self.assertEqual(await verdict(ssh, "127.0.0.11", closer), "closed without a reply")
        short = self.tcp("127.0.0.11", greeting=b"SSH-1", close=True).getHost().port
        self.assertEqual(await verdict(ssh, "127.0.0.11", short), "closed after b'SSH-1'")

    async def test_send_then_expect(self) -> None:
        redis = self.tcp("127.0.0.11").getHost().port
        self.assertIsNone(await verdict(TCPProbe(send=b"PING\r\n", expect=b"+PONG"), "127.0.0.11", redis))
        self.assertEqual(
            await verdict(TCPProbe(send=b"QUIT\r\n", expect=b"+PONG"), "127.0.0.11", redis, timeout=0.2),
            "no reply within 0.2s",
        )

    async def test_a_udp_reply_must_begin_with_expect(self) -> None:
        echo = self.udp("127.0.0.12", UDPEcho())
        self.assertIsNone(await verdict(UDPProbe(b"ping", b"pi"), "127.0.0.12", echo))
        self.assertIsNone(await verdict(UDPProbe(b"ping"), "127.0.0.12", echo))  # any reply
        self.assertEqual(await verdict(UDPProbe(b"ping", b"pong"), "127.0.0.12", echo), "expected b'pong', got b'ping'")

    async def test_a_closed_udp_port_fails_at_once(self) -> None:
        started = reactor.seconds()
        self.assertEqual(await verdict(UDPProbe(b"ping"), "127.0.0.12", free_port("127.0.0.12")), "port unreachable")
        self.assertLess(reactor.seconds() - started, 1.0)

    async def test_a_silent_udp_target_fails_after_the_timeout(self) -> None:
        silent = self.udp("127.0.0.12", DatagramProtocol())
        started = reactor.seconds()
        self.assertEqual(await verdict(UDPProbe(b"ping"), "127.0.0.12", silent, timeout=0.2), "no reply within 0.2s")
        self.assertGreaterEqual(reactor.seconds() - started, 0.2)

    async def test_ipv6(self) -> None:
        self.assertIsNone(await verdict(TCPProbe(), "::1", self.tcp("::1").getHost().port))
        self.assertIsNone(await verdict(UDPProbe(b"x", b"x"), "::1", self.udp("::1", UDPEcho())))


# ------------------------------------------------------------------ the checker


class Counted:
    """A probe that logs each verdict (C{None}: healthy, else the reason) in C{verdicts}."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.verdicts = Log()

    def check(self, reactor: Any, host: str, port: int, timeout: float) -> Deferred[None]:
        def log(outcome: Failure | None) -> Failure | None:
            self.verdicts.add(None if outcome is None else outcome.getErrorMessage() or outcome.type.__name__)
            return outcome

        return self.probe.check(reactor, host, port, timeout).addBoth(log)


class Scripted:
    """A probe without sockets: logs C{(host, time)} of each check in C{started}; C{passes(n)} judges the n-th."""

    def __init__(self, passes: Callable[[int], bool] = lambda n: True) -> None:
        self.passes = passes
        self.started = Log()

    def check(self, reactor: Any, host: str, port: int, timeout: float) -> Deferred[None]:
        self.started.add((host, reactor.seconds()))
        return succeed(None) if self.passes(len(self.started)) else fail(CheckFailed("scripted"))


class CheckerTests(Targets):
    """Transitions, their timing, and stopping."""

    def checker(self, probe: Probe, targets: list[Target], **settings: Any) -> tuple[HealthChecker, Log]:
        """Checks every 50 ms, down after 2 failures; C{on_change} logs C{(host, up, reason)}."""
        changes = Log()
        checker = HealthChecker(
            reactor, probe, lambda target, up, reason: changes.add((target.host, up, reason)),
            HealthCheck(**{"interval": 0.05, "timeout": 0.5, "retries": 2, **settings}),
        )
        checker.set_targets(targets)
        self.addCleanup(checker.stop)
        return checker, changes

    async def test_a_killed_target_goes_down_in_time_and_comes_back_after_a_restart(self) -> None:
        host, interval, retries = "127.0.0.21", 0.05, 2
        listening = self.tcp(host)
        port = listening.getHost().port
        target = Target(host, port)
        probe = Counted(TCPProbe())
        _, changes = self.checker(probe, [target], interval=interval, retries=retries)
        await probe.verdicts.wait(lambda v: v.count(None) >= 2)

        await listening.stopListening()
        killed = reactor.seconds()
        await changes.wait(len)
        self.assertLess(reactor.seconds() - killed, interval * retries + 0.2)
        self.assertEqual(changes[0][:2], (host, False))
        self.assertIn("refused", changes[0][2])
        self.assertEqual((target.up, target.last_error), (False, changes[0][2]))
        checked = len(probe.verdicts)
        await probe.verdicts.wait(lambda v: len(v) >= checked + 3)
        self.assertEqual(len(changes), 1)  # failing on: no second change

        self.tcp(host, port=port)
        restarted = reactor.seconds()
        await changes.wait(lambda c: len(c) == 2)
        self.assertLess(reactor.seconds() - restarted, interval + 0.2)
        self.assertEqual(changes[1], (host, True, "check passed"))
        self.assertTrue(target.up)
        checked = len(probe.verdicts)
        await probe.verdicts.wait(lambda v: len(v) >= checked + 3)
        self.assertEqual(len(changes), 2)
        self.assertGreaterEqual(target.last_check, restarted)  # type: ignore[arg-type]

    async def test_failures_short_of_retries_in_a_row_change_nothing(self) -> None:
        alternating = Scripted(lambda n: n % 2 == 0)
        target = Target("127.0.0.22", 1)
        _, changes = self.checker(alternating, [target], retries=2)
        await alternating.started.wait(lambda s: len(s) >= 8)
        self.assertEqual((list(changes), target.up, target.last_error), ([], True, "scripted"))

    async def test_an_ssh_target_that_never_greets_goes_down_and_one_that_greets_comes_up(self) -> None:
        mute = Target("127.0.0.23", self.tcp("127.0.0.23").getHost().port)
        ssh = Target("127.0.0.24", self.tcp("127.0.0.24", greeting=b"SSH-2.0-x\r\n").getHost().port, up=False)
        _, changes = self.checker(TCPProbe(expect=b"SSH-2.0"), [mute, ssh], timeout=0.1)
        await changes.wait(lambda c: len(c) == 2)
        self.assertEqual(
            sorted(changes), [("127.0.0.23", False, "no reply within 0.1s"), ("127.0.0.24", True, "check passed")]
        )

    async def test_udp_echo_up_silence_and_a_closed_port_down(self) -> None:
        echo = Target("127.0.0.25", self.udp("127.0.0.25", UDPEcho()), up=False)
        silent = Target("127.0.0.26", self.udp("127.0.0.26", DatagramProtocol()))
        closed = Target("127.0.0.27", free_port("127.0.0.27"))
        _, changes = self.checker(UDPProbe(b"ping", b"ping"), [echo, silent, closed], timeout=0.1)
        await changes.wait(lambda c: len(c) == 3)
        self.assertEqual(sorted(changes), [
            ("127.0.0.25", True, "check passed"),
            ("127.0.0.26", False, "no reply within 0.1s"),
            ("127.0.0.27", False, "port unreachable"),
        ])

    async def test_stop_leaves_no_socket_or_timer_with_a_check_in_flight(self) -> None:
        listening = self.tcp("127.0.0.28")
        target = Target("127.0.0.28", listening.getHost().port)
        probe = Counted(TCPProbe(expect=b"SSH-2.0"))
        checker = HealthChecker(reactor, probe, lambda *change: None, HealthCheck(interval=0.05, timeout=DEADLINE))
        checker.set_targets([target])
        await listening.factory.accepted.wait(len)  # a check waits for a greeting that never comes
        started = reactor.seconds()
        await checker.stop()
        self.assertLess(reactor.seconds() - started, 1.0)
        timers = [call for call in reactor.getDelayedCalls() if "onTimeout" not in repr(call)]  # not trial's
        self.assertEqual(timers, [])
        self.assertEqual([r for r in reactor.getReaders() + reactor.getWriters() if isinstance(r, tcp.Client)], [])
        self.assertEqual(probe.verdicts, ["CancelledError"])
        self.assertEqual((target.up, target.last_check), (True, None))  # a cancelled check counts for nothing

    async def test_set_targets_starts_new_targets_and_stops_removed_ones(self) -> None:
        probe = Scripted()
        kept, removed, added = Target("127.0.0.31", 1), Target("127.0.0.32", 1), Target("127.0.0.33", 1)
        checker, _ = self.checker(probe, [kept, removed])
        await probe.started.wait(lambda s: {"127.0.0.31", "127.0.0.32"} <= {host for host, _ in s})
        checker.set_targets([kept, added])
        probe.started.clear()
        await probe.started.wait(lambda s: [host for host, _ in s].count("127.0.0.33") >= 3)
        self.assertNotIn("127.0.0.32", {host for host, _ in probe.started})
        self.assertIn("127.0.0.31", {host for host, _ in probe.started})

    async def test_first_checks_are_spread_over_the_first_interval(self) -> None:
        probe = Scripted()
        self.checker(probe, [Target(f"127.0.1.{i}", 1) for i in range(1, 51)], interval=0.2)
        await probe.started.wait(lambda s: len({host for host, _ in s}) == 50)
        firsts: dict[str, float] = {}
        for host, when in probe.started:
            firsts.setdefault(host, when)
        self.assertGreater(max(firsts.values()) - min(firsts.values()), 0.1)


def test_default_retries_are_godoxys() -> None:
    """GoDoxy: as many checks as fit in 15 s (3 at its 5 s default interval), at least one."""
    assert [default_retries(i) for i in (5.0, 1.0, 10.0, 30.0)] == [3, 15, 1, 1]
