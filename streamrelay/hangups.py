"""
Errors on sockets that nobody polls.

A relay stops reading a socket while the other side cannot take more
(backpressure).  The reactor then forgets the socket altogether unless it
has bytes to write, so a peer that resets it goes unseen until the other
side drains, which may be never.  The L{HangupWatch} keeps such sockets in
an epoll set of its own with an empty event mask: epoll still reports
errors and hang-ups there, and nothing is read.  On an error the socket's
owner is told, so the pair can close (and its deadline start); a hang-up
without an error (both FINs exchanged) is left to the pair's own timers.

One watch serves the whole process; it holds an epoll descriptor, registered
with the reactor, only while it watches something.  On a platform without
epoll it watches nothing.
"""

from __future__ import annotations

import functools
import select
import socket
from typing import Callable

from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["HangupWatch", "watch_for"]

#: Called with the socket's pending error (an C{errno} value, 0 if none).
OnHangup = Callable[[int], None]


@implementer(IReadDescriptor)
class HangupWatch:
    """Sockets a relay paused, watched for errors and hang-ups only."""

    def __init__(self, reactor: IReactorFDSet) -> None:
        self.reactor = reactor
        self.epoll: select.epoll | None = None
        self.watched: dict[int, tuple[socket.socket, OnHangup]] = {}

    def add(self, sock: socket.socket, on_hangup: OnHangup) -> None:
        """Watch C{sock} until L{discard}, or until it reports something."""
        fd = sock.fileno()
        if fd < 0 or fd in self.watched or not hasattr(select, "epoll"):
            return
        if self.epoll is None:
            self.epoll = select.epoll()
            self.reactor.addReader(self)
        self.epoll.register(fd, 0)  # EPOLLERR and EPOLLHUP are always reported
        self.watched[fd] = (sock, on_hangup)

    def discard(self, fd: int) -> None:
        """Stop watching C{fd}, if it is watched (before or after its socket closed)."""
        if self.watched.pop(fd, None) is None or self.epoll is None:
            return
        if not self.watched:  # an idle watch holds no descriptor
            self.reactor.removeReader(self)
            self.epoll.close()
            self.epoll = None
            return
        try:
            self.epoll.unregister(fd)
        except OSError:
            pass  # closed already: the kernel dropped it from the set

    def __len__(self) -> int:
        return len(self.watched)

    # -- IReadDescriptor: the epoll set's own descriptor is readable

    def fileno(self) -> int:
        return self.epoll.fileno() if self.epoll is not None else -1

    def doRead(self) -> None:
        if self.epoll is None:
            return
        for fd, _ in self.epoll.poll(0):
            entry = self.watched.get(fd)
            if entry is None:
                continue
            sock, on_hangup = entry
            self.discard(fd)
            on_hangup(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped us (it is shutting down): forget everything."""
        self.watched.clear()

    def logPrefix(self) -> str:
        return "HangupWatch"


@functools.cache
def watch_for(reactor: IReactorFDSet) -> HangupWatch:
    """The process's watch for C{reactor}."""
    return HangupWatch(reactor)
