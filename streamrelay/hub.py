"""
The UDP sessions' sockets behind one reactor descriptor.

Every UDP session has a socket of its own, connected to its target, which
receives one reply at a time.  Registered with the reactor, each reply
would cost a pass through Twisted's per-event dispatch (the log context
pushed and popped, the descriptor looked up and checked), which is most of
what relaying a small datagram costs in Python.  The L{SessionHub} keeps
those sockets in an epoll set of its own instead, registered with the
reactor as one reader: when it is readable, one event reads a reply from
every session socket that has one, each through its port's own C{doRead}.
An ICMP error on a session socket (a target's port unreachable) is read the
same way, as C{ECONNREFUSED} from the port's C{recv}.

One hub serves the whole process; it makes its epoll descriptor with the
first session socket and keeps it, so sessions coming and going cost no
more than their own sockets, and it is in the reactor while some session
socket is open.  Without epoll the sockets go to the reactor as usual.
"""

from __future__ import annotations

import functools
import select
from typing import Protocol as Interface

from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["AVAILABLE", "SessionHub", "hub_for"]

#: Whether the platform has epoll (else session sockets go to the reactor).
AVAILABLE = hasattr(select, "epoll")
#: Sockets served per hub event at most; more ready ones wait for the next turn.
BATCH = 512

_log = Logger()


class Reader(Interface):
    """A session socket as the hub sees it (a L{streamrelay.compat.SessionPort})."""

    def fileno(self) -> int: ...

    def doRead(self) -> object: ...


@implementer(IReadDescriptor)
class SessionHub:
    """The process's session sockets, read through one reactor descriptor."""

    def __init__(self, reactor: IReactorFDSet) -> None:
        self.reactor = reactor
        self.epoll: select.epoll | None = None
        self.readers: dict[int, Reader] = {}

    def add(self, reader: Reader) -> None:
        """Read C{reader} whenever its socket has a datagram (or an error), until L{remove}."""
        fd = reader.fileno()
        if fd in self.readers:
            return
        if self.epoll is None:
            self.epoll = select.epoll()
        if not self.readers:
            self.reactor.addReader(self)
        self.epoll.register(fd, select.EPOLLIN)
        self.readers[fd] = reader

    def remove(self, reader: Reader) -> None:
        """Stop reading C{reader} (before its socket closes)."""
        fd = reader.fileno()
        if self.readers.get(fd) is not reader or self.epoll is None:
            return
        del self.readers[fd]
        self.epoll.unregister(fd)
        if not self.readers:  # nothing for the reactor to poll
            self.reactor.removeReader(self)

    def __len__(self) -> int:
        return len(self.readers)

    # -- IReadDescriptor: the epoll set's own descriptor is readable

    def fileno(self) -> int:
        return self.epoll.fileno() if self.epoll is not None else -1

    def doRead(self) -> None:
        if self.epoll is None:
            return
        readers = self.readers
        for fd, _ in self.epoll.poll(0, BATCH):
            reader = readers.get(fd)
            if reader is None:
                continue  # removed by an earlier reader of this batch
            try:
                reader.doRead()
            except Exception:  # one session's failure stays its own, as the reactor keeps it
                _log.failure("reading the session socket {fd}", fd=fd)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped us (it is shutting down): the ports close on their own."""
        self.readers.clear()
        if self.epoll is not None:
            self.epoll.close()
            self.epoll = None

    def logPrefix(self) -> str:
        return "SessionHub"


@functools.cache
def hub_for(reactor: IReactorFDSet) -> SessionHub:
    """The process's hub for C{reactor}."""
    return SessionHub(reactor)
