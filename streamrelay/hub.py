"""
The relay's own sockets behind one reactor descriptor.

Each readiness event the reactor dispatches passes through Twisted's
per-event machinery (the log context pushed and popped, the descriptor
looked up and checked), which costs more than relaying a small datagram or
a short request in Python.  The L{Hub} keeps the sockets the relay drives
itself (UDP sessions' connected sockets, lean TCP connections and their
dials) in an epoll set of its own, registered with the reactor as one
reader: when it is readable, one event serves every socket that is ready,
each through its own C{doRead} or C{doWrite}.

An error or a hang-up is served the same way: the socket's next C{recv},
C{send} or C{SO_ERROR} reports it (an ICMP port unreachable on a UDP
session, a reset, a refused dial), so the hub never judges an event
itself.

One hub serves the whole process; it makes its epoll descriptor when a
route that uses it is set up and keeps it (sockets coming and going cost
only their own registrations), and it is in the reactor while it holds
some socket.
Without epoll the sockets go to the reactor as usual.
"""

from __future__ import annotations

import functools
import select
from typing import Protocol as Interface

from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["AVAILABLE", "Hub", "hub_for"]

#: Whether the platform has epoll (else the sockets go to the reactor).
AVAILABLE = hasattr(select, "epoll")
#: Sockets served per hub event at most; more ready ones wait for the next turn.
BATCH = 512
_IN, _OUT = (select.EPOLLIN, select.EPOLLOUT) if AVAILABLE else (0, 0)
_TROUBLE = select.EPOLLERR | select.EPOLLHUP if AVAILABLE else 0
_READABLE = _IN | _TROUBLE
_WRITABLE = _OUT | _TROUBLE

_log = Logger()


class Descriptor(Interface):
    """A socket as the hub serves it: what the reactor would ask of it."""

    def fileno(self) -> int: ...

    def doRead(self) -> object: ...

    def doWrite(self) -> object: ...

    def connectionLost(self, reason: Failure) -> None: ...


@implementer(IReadDescriptor)
class Hub:
    """The process's own sockets, polled through one reactor descriptor."""

    def __init__(self, reactor: IReactorFDSet) -> None:
        self.reactor = reactor
        self.epoll: select.epoll | None = select.epoll() if AVAILABLE else None
        #: By descriptor number: the socket's handler and what it waits for (EPOLLIN, EPOLLOUT).
        self.descriptors: dict[int, Descriptor] = {}
        self.masks: dict[int, int] = {}

    def update(self, descriptor: Descriptor, reading: bool, writing: bool) -> None:
        """Serve C{descriptor} when it is readable, writable, either, or (both false) no more."""
        fd = descriptor.fileno()
        mask = (_IN if reading else 0) | (_OUT if writing else 0)
        current = self.masks.get(fd)
        if mask == (current or 0):
            return
        if not mask:
            del self.descriptors[fd], self.masks[fd]
            assert self.epoll is not None
            self.epoll.unregister(fd)
            if not self.descriptors:  # nothing for the reactor to poll
                self.reactor.removeReader(self)
            return
        assert self.epoll is not None  # callers check AVAILABLE
        if current is None:
            if not self.descriptors:
                self.reactor.addReader(self)
            self.epoll.register(fd, mask)
            self.descriptors[fd] = descriptor
        else:
            self.epoll.modify(fd, mask)
        self.masks[fd] = mask

    def __len__(self) -> int:
        return len(self.descriptors)

    # -- IReadDescriptor: the epoll set's own descriptor is readable

    def fileno(self) -> int:
        return self.epoll.fileno() if self.epoll is not None else -1

    def doRead(self) -> None:
        if self.epoll is None:
            return
        descriptors, masks = self.descriptors, self.masks
        for fd, event in self.epoll.poll(0, BATCH):
            descriptor = descriptors.get(fd)
            if descriptor is None:
                continue  # gone since, earlier in this batch
            try:
                mask = masks[fd]
                if event & _READABLE and mask & _IN:
                    descriptor.doRead()
                if event & _WRITABLE and mask & _OUT and descriptors.get(fd) is descriptor and masks[fd] & _OUT:
                    descriptor.doWrite()
            except Exception:  # one socket's failure stays its own, as the reactor keeps it
                failure = _failure(None)  # the exception being handled
                _log.failure("serving descriptor {fd}", failure, fd=fd)
                if descriptors.get(fd) is descriptor:
                    self.update(descriptor, False, False)
                    descriptor.connectionLost(failure)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped us (it is shutting down): so are the sockets, as the reactor would tell them."""
        for descriptor in list(self.descriptors.values()):
            if descriptor.fileno() in self.descriptors:
                self.update(descriptor, False, False)
                descriptor.connectionLost(_failure(ConnectionLost()))

    def logPrefix(self) -> str:
        return "Hub"


def _failure(error: BaseException | None) -> Failure:
    """A failure of C{error}, or of the exception being handled: Twisted's constructor has no annotations."""
    return Failure(error)  # type: ignore[no-untyped-call]


@functools.cache
def hub_for(reactor: IReactorFDSet) -> Hub:
    """The process's hub for C{reactor}."""
    return Hub(reactor)
