"""
The UDP sessions' hub (L{streamrelay.hub}), in-process with the real reactor
and real loopback sockets: one reactor event reads every ready session
socket, an ICMP error reaches its session, and the hub leaves the reactor
with its last socket.
"""

from __future__ import annotations

import select
import socket

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from streamrelay.compat import SessionPort
from streamrelay.hub import hub_for
from streamrelay.udp import MAX_DATAGRAM
from tests.harness import DEADLINE, free_port
from tests.reactor import until


class Recording(DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.refused = 0

    def datagramReceived(self, data: bytes, addr: object) -> None:  # type: ignore[override]
        self.received.append(data)

    def connectionRefused(self) -> None:
        self.refused += 1


class HubTests(TestCase):
    def session(self, target: tuple[str, int]) -> tuple[SessionPort, Recording]:
        protocol = Recording()
        port = SessionPort(0, protocol, "127.0.0.1", MAX_DATAGRAM, reactor)
        port.startListening()
        port.connect(*target)
        self.addCleanup(port.stopListening)
        return port, protocol

    def test_one_event_reads_every_ready_session(self) -> None:
        target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(target.close)
        target.bind(("127.0.0.1", 0))
        sessions = [self.session(target.getsockname()) for _ in range(50)]
        hub = hub_for(reactor)
        self.assertIn(hub, reactor.getReaders())
        for port, _ in sessions:
            self.assertNotIn(port, reactor.getReaders())  # polled by the hub, not the reactor
        for index, (port, _) in enumerate(sessions):
            target.sendto(b"reply %d" % index, ("127.0.0.1", port.getHost().port))
        for port, _ in sessions:
            assert select.select([port.getHandle()], [], [], DEADLINE)[0]
        hub.doRead()  # what the reactor calls once the hub's epoll set is readable
        self.assertEqual([protocol.received for _, protocol in sessions],
                         [[b"reply %d" % index] for index in range(50)])

    async def test_an_icmp_error_reaches_its_session(self) -> None:
        port, protocol = self.session(("127.0.0.1", free_port()))
        port.write(b"anyone?")
        await until(lambda: protocol.refused)
        self.assertEqual(protocol.refused, 1)

    async def test_the_hub_leaves_the_reactor_with_its_last_socket(self) -> None:
        hub = hub_for(reactor)
        port, _ = self.session(("127.0.0.1", free_port()))
        self.assertIn(hub, reactor.getReaders())
        self.assertEqual(len(hub), 1)
        await port.stopListening()
        self.assertEqual(len(hub), 0)
        self.assertNotIn(hub, reactor.getReaders())
