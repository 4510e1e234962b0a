"""
The zero-copy path of the TCP relay: a plain pair's two sockets relayed with
C{os.splice} (socket → pipe → socket), so relayed bytes never enter Python.

While a pair is spliced the reactor knows each socket through an L{_End}, the
one descriptor registered for that fd (epoll keeps one handler per fd): it
reads its socket into the pipe of its outgoing L{_Flow} and drains the pipe
of its incoming flow into the socket.  A flow whose pipe the sink cannot take
stops reading its source until the pipe is empty: that is the backpressure,
and at most one pipe of bytes per direction is ever in flight.

Twisted's transports stay attached to their protocols but detached from the
reactor (not reading, not writing, write buffers empty) until the end, when
each gets its socket back through its own C{connectionLost}, which closes the
socket and tells the protocol, as if Twisted had relayed the bytes itself:

    the source's FIN        → protocol.readConnectionLost(); the FIN is passed on once the pipe is empty
    a socket error          → connectionLost(ConnectionLost) at once ("reset")
    L{Splice.close}         → connectionLost(ConnectionDone) a turn after the pipe towards it is empty
    L{Splice.abort}         → abortConnection() (a reset), dropping what was in flight towards it

The pipes are closed as soon as neither socket is spliced any more.
"""

from __future__ import annotations

import fcntl
import os
import socket
from typing import Any, Callable

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol, IReadWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["AVAILABLE", "PIPE_SIZE", "Splice", "socket_connection"]

#: Linux with Python 3.10 or newer.
AVAILABLE = hasattr(os, "splice")
#: Asked for each pipe, best effort.  256 KiB spends a quarter of the CPU per
#: GiB that the default 64 KiB does, and about what 1 MiB does; larger pipes
#: would only use up an unprivileged user's pipe budget (pipe-user-pages-soft,
#: 64 MiB) sooner, after which new pipes get two pages (pipe(7)).
PIPE_SIZE = 1 << 18
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_SIOCATMARK = 0x8905  # Linux <asm-generic/sockios.h>; Python does not name it

#: Called with the protocol whose socket the bytes were read from, and how many.
Moved = Callable[[IProtocol, int], None]


def socket_connection(protocol: IProtocol) -> tcp.Connection | None:
    """
    The TCP connection under C{protocol}'s transport, if it hands its bytes
    straight to C{protocol}: wrappers that stepped out of the data path (the
    inbound PROXY header's) are looked through, a layer that must see the
    bytes (TLS) makes the answer C{None}.
    """
    transport = protocol.transport  # type: ignore[attr-defined]
    while not isinstance(transport, tcp.Connection):
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return transport if transport.protocol is protocol else None


class Splice:
    """
    Relays two connected sockets through two pipes until both are closed.
    Creating one makes the pipes (C{OSError} if it cannot); L{start} takes the
    sockets over from Twisted, whose write buffers must be empty.
    """

    def __init__(self, reactor: Any, first: tcp.Connection, second: tcp.Connection, moved: Moved) -> None:
        self.reactor = reactor
        self.moved = moved
        a, b = _End(self, first), _End(self, second)
        self.ends = {a.protocol: a, b.protocol: b}
        up = _pipe()
        try:
            down = _pipe()
        except OSError:
            os.close(up[0])
            os.close(up[1])
            raise
        self.fds = (*up[:2], *down[:2])
        self.pipe_size = min(up[2], down[2])
        a.outgoing = b.incoming = _Flow(self, a, b, up)
        b.outgoing = a.incoming = _Flow(self, b, a, down)

    def start(self) -> None:
        # Twisted's registrations go first: the reactor keys them by fd.
        for end in self.ends.values():
            end.connection.stopReading()
            end.connection.stopWriting()
        for end in self.ends.values():
            end.read(True)

    def close(self, protocol: IProtocol) -> None:
        """Close C{protocol}'s socket once what is in flight towards it is written."""
        end = self.ends[protocol]
        if end.closing or end.released:
            return
        end.closing = True
        end.outgoing.stop()
        end.incoming.stop()
        end.incoming.flush()  # releases the end once the pipe is empty

    def abort(self, protocol: IProtocol) -> None:
        """Reset C{protocol}'s socket now, dropping what is in flight towards it."""
        end = self.ends[protocol]
        if not end.released:
            self.release(end)
            end.connection.abortConnection()

    def closed(self, end: _End) -> None:
        """C{end} is closing and its incoming pipe is empty: an orderly close, next turn."""
        self.release(end)
        self.reactor.callLater(0, end.connection.connectionLost, Failure(ConnectionDone()))

    def lost(self, end: _End, reason: Failure) -> None:
        """C{end}'s socket failed: tell its protocol now, as the reactor would."""
        self.release(end)
        end.connection.connectionLost(reason)

    def release(self, end: _End) -> None:
        """Stop splicing C{end}'s socket (once); close the pipes if it was the last one."""
        assert not end.released
        end.read(False)
        end.write(False)
        end.released = True
        end.outgoing.stop()  # what is already in its pipe still goes to the other end
        end.incoming.stop()
        end.incoming.pending = 0  # nowhere to go any more
        if all(other.released for other in self.ends.values()):
            for fd in self.fds:
                os.close(fd)


@implementer(IReadWriteDescriptor)
class _End:
    """One spliced socket: the reactor's handler for its fd while spliced."""

    outgoing: _Flow
    incoming: _Flow

    def __init__(self, splice: Splice, connection: tcp.Connection) -> None:
        self.splice = splice
        self.connection = connection
        self.protocol: IProtocol = connection.protocol
        self.fd = connection.fileno()
        self.reading = False
        self.writing = False
        self.closing = False
        self.released = False

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "Splice"

    def doRead(self) -> None:
        if not self.released:
            self.outgoing.fill()

    def doWrite(self) -> None:
        if not self.released:
            self.incoming.flush()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor gave up on the fd (a hang-up while only writing, or shutdown)."""
        self.reading = self.writing = False  # the reactor has removed us
        self.splice.lost(self, reason)

    def read(self, wanted: bool) -> None:
        if wanted != self.reading:
            self.reading = wanted
            reactor = self.splice.reactor
            (reactor.addReader if wanted else reactor.removeReader)(self)

    def write(self, wanted: bool) -> None:
        if wanted != self.writing:
            self.writing = wanted
            reactor = self.splice.reactor
            (reactor.addWriter if wanted else reactor.removeWriter)(self)


class _Flow:
    """One direction: the source's socket → a pipe → the sink's socket."""

    def __init__(self, splice: Splice, source: _End, sink: _End, pipe: tuple[int, int, int]) -> None:
        self.splice = splice
        self.source = source
        self.sink = sink
        self.read_fd, self.write_fd, self.size = pipe
        self.pending = 0  # bytes in the pipe
        self.open = True  # the source may still be read
        self.fin = False  # a FIN is due to the sink once the pipe is empty

    def fill(self) -> None:
        """The source is readable: move what it has into the pipe, and on."""
        if not self.open:
            return  # an event polled before the flow stopped
        try:
            count = self.read()
        except BlockingIOError:
            return
        except OSError as e:
            self.splice.lost(self.source, Failure(ConnectionLost(e.strerror)))
            return
        if count:
            self.pending += count
            self.splice.moved(self.source.protocol, count)
            self.flush()
        else:
            self.finish()

    def read(self) -> int:
        """Move what the source has into the pipe: how many bytes, 0 at its FIN."""
        try:
            return os.splice(self.source.fd, self.write_fd, self.size, flags=_FLAGS)
        except BlockingIOError:
            if self.pending or not _at_urgent_mark(self.source.fd):
                raise
        # splice(2) stops for good at TCP urgent data; recv steps over it, and
        # drops the urgent byte as the default path does (no SO_OOBINLINE).
        data = self.source.connection.getHandle().recv(self.size)
        os.write(self.write_fd, data)  # an empty pipe takes its capacity
        return len(data)

    def finish(self) -> None:
        """The source sent its FIN: pass it on after the pipe, then tell the source's protocol."""
        self.stop()
        self.fin = True
        self.flush()
        if not self.source.released:
            IHalfCloseableProtocol(self.source.protocol).readConnectionLost()

    def flush(self) -> None:
        """Move the pipe into the sink; while it cannot take everything, stop reading the source."""
        while self.pending:
            try:
                count = os.splice(self.read_fd, self.sink.fd, self.pending, flags=_FLAGS)
            except BlockingIOError:
                break
            except OSError as e:
                self.splice.lost(self.sink, Failure(ConnectionLost(e.strerror)))
                return
            self.pending -= count
        if self.pending:
            self.source.read(False)
            self.sink.write(True)
            return
        self.sink.write(False)
        if self.sink.closing:
            self.splice.closed(self.sink)
        elif self.fin:
            self.fin = False
            try:
                self.sink.connection.getHandle().shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the reset, if any, surfaces on the next read
        elif self.open:
            self.source.read(True)

    def stop(self) -> None:
        """Never read the source again."""
        self.open = False
        self.source.read(False)


def _at_urgent_mark(fd: int) -> bool:
    return fcntl.ioctl(fd, _SIOCATMARK, b"\0\0\0\0") != b"\0\0\0\0"


def _pipe() -> tuple[int, int, int]:
    """A non-blocking pipe, enlarged if the kernel allows: (read fd, write fd, capacity)."""
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # above pipe-max-size, or the user's pipe budget is spent
        size = fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ)
    return read_fd, write_fd, size
