"""
The zero-copy path of the TCP relay: a plain pair's two sockets relayed with
C{os.splice} (socket → pipe → socket), so bulk bytes never enter Python.

While a pair is spliced the reactor's events for each socket reach an
L{_End} (through a lean connection, which stays registered and passes them
on, or as the one descriptor registered for a Twisted connection's fd: epoll
keeps one handler per fd): it reads its socket for its outgoing L{_Flow} and drains its incoming flow into
the socket.  A flow whose sink cannot take everything stops reading its
source until what is in flight has gone: that is the backpressure, and at
most one pipe (or one small read) of bytes per direction is ever in flight.

splice(2) pays off for streams, not for small messages: two splices cost
more than a C{recv} and a C{send} of a few hundred bytes, and a pipe costs
two descriptors.  So a flow copies (C{recv}, C{send}) until a read fills
L{COPY_SIZE}, splices while reads stay that large, and a flow holds a pipe
only while bytes are in it; empty pipes wait in a L{PipePool} for the next
flow, never more of them than there are spliced pairs.  An idle pair holds
its two sockets and nothing else.

Under a route's C{bandwidth} a flow asks its L{Meter} how many bytes it may
move before each read, and reads no more; when the answer is 0 it stops
reading its source until the buckets have refilled (a timer), so the bytes
moved per tick are bounded and nothing waits in the process meanwhile.

The transports stay attached to their protocols, Twisted's detached from the
reactor (not reading, not writing, write buffers empty), until the end, when
each gets its socket back through its own C{connectionLost}, which closes the
socket and tells the protocol, as if Twisted had relayed the bytes itself:

    the source's FIN        → protocol.readConnectionLost(); the FIN is passed on once nothing is in flight
    a socket error          → connectionLost(ConnectionLost) at once ("reset")
    L{Splice.close}         → connectionLost(ConnectionDone) once nothing is in flight towards it
    L{Splice.abort}         → abortConnection() (a reset), dropping what was in flight towards it
"""

from __future__ import annotations

import fcntl
import os
import socket
from typing import Callable

from twisted.internet import tcp
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IReactorFDSet,
    IReadWriteDescriptor,
)
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from .bandwidth import Meter
from .compat import hand_back
from .hangups import HangupWatch, watch_for
from .lean import LeanConnection

__all__ = ["AVAILABLE", "COPY_SIZE", "PIPE_SIZE", "PipePool", "Splice", "socket_connection"]

#: Linux with Python 3.10 or newer.
AVAILABLE = hasattr(os, "splice")
#: Asked for each pipe, best effort.  256 KiB spends a quarter of the CPU per
#: GiB that the default 64 KiB does, and about what 1 MiB does; larger pipes
#: would only use up an unprivileged user's pipe budget (pipe-user-pages-soft,
#: 64 MiB) sooner, after which new pipes get two pages (pipe(7)).
PIPE_SIZE = 1 << 18
#: A flow copies reads up to this size; one that fills it starts splicing,
#: and a splice that moves less goes back to copying.
COPY_SIZE = 1 << 14
#: Spare empty pipes kept at most, however many pairs are spliced.
MAX_SPARE_PIPES = 64
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_SIOCATMARK = 0x8905  # Linux <asm-generic/sockios.h>; Python does not name it
#: What an unlimited flow may read at once, as far as a meter is concerned: everything.
_UNLIMITED = 1 << 62

#: Called with the protocol whose socket the bytes were read from, and how many.
Moved = Callable[[IProtocol, int], None]
#: A socket's transport: Twisted's, or a lean one (L{streamrelay.lean}).
SocketConnection = tcp.Connection | LeanConnection


def socket_connection(protocol: IProtocol) -> SocketConnection | None:
    """
    The TCP connection under C{protocol}'s transport, if it hands its bytes
    straight to C{protocol}: wrappers that stepped out of the data path (the
    inbound PROXY header's) are looked through, a layer that must see the
    bytes (TLS) makes the answer C{None}.
    """
    transport = protocol.transport  # type: ignore[attr-defined]
    while not isinstance(transport, (tcp.Connection, LeanConnection)):
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return transport if transport.protocol is protocol else None


class _Pipe:
    """A non-blocking pipe, enlarged to L{PIPE_SIZE} if the kernel allows."""

    __slots__ = ("read_fd", "write_fd", "size")

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.size = fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # above pipe-max-size, or the user's pipe budget is spent
            self.size = fcntl.fcntl(self.write_fd, fcntl.F_GETPIPE_SZ)

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class PipePool:
    """
    Empty pipes between uses.  It keeps no more spare pipes than there are
    spliced pairs (and at most L{MAX_SPARE_PIPES}), so a relay with no pair
    spliced holds no pipe at all.
    """

    def __init__(self) -> None:
        self.spare: list[_Pipe] = []
        self.users = 0  # spliced pairs

    def take(self) -> _Pipe:
        """An empty pipe; C{OSError} when none is spare and no descriptor is left for one."""
        return self.spare.pop() if self.spare else _Pipe()

    def give(self, pipe: _Pipe) -> None:
        """Take back an empty pipe."""
        self.spare.append(pipe)
        self.trim()

    def attach(self) -> None:
        self.users += 1

    def detach(self) -> None:
        self.users -= 1
        self.trim()

    def trim(self) -> None:
        keep = min(self.users, MAX_SPARE_PIPES)
        while len(self.spare) > keep:
            self.spare.pop().close()


#: The process's pool, shared by every route.
PIPES = PipePool()


class Splice:
    """
    Relays two connected sockets until both are closed.  L{start} takes the
    sockets over from Twisted, whose write buffers must be empty, and writes
    its preamble (a PROXY header, bytes held while dialing) to C{second}
    before anything else.  A socket that is neither read nor written (its
    peer's flow is stalled) is kept in the hangup watch, so its reset is
    seen.  Both protocols are C{IHalfCloseableProtocol}s: a FIN is reported
    to its socket's protocol with C{readConnectionLost}.
    """

    def __init__(self, reactor: IReactorFDSet, first: SocketConnection, second: SocketConnection, moved: Moved,
                 *, pipes: PipePool = PIPES, watch: HangupWatch | None = None) -> None:
        self.reactor = reactor
        self.moved = moved
        self.pipes = pipes
        self.watch = watch or watch_for(reactor)
        a, b = _End(self, first), _End(self, second)
        self.ends = {a.protocol: a, b.protocol: b}
        a.outgoing = b.incoming = _Flow(self, a, b)
        b.outgoing = a.incoming = _Flow(self, b, a)

    def start(self, preamble: bytes = b"") -> None:
        """Take the sockets over; C{preamble} goes to the second before anything else."""
        self.pipes.attach()
        first = next(iter(self.ends.values()))
        first.outgoing.unsent = preamble
        for end in self.ends.values():
            end.take_over()
        for end in self.ends.values():
            end.outgoing.flush()  # the preamble, if any; otherwise starts reading

    def limit(self, protocol: IProtocol, meter: Meter) -> None:
        """Bound what is read from C{protocol}'s socket by C{meter} (before L{start})."""
        self.ends[protocol].outgoing.meter = meter

    def close(self, protocol: IProtocol) -> None:
        """Close C{protocol}'s socket once what is in flight towards it is written."""
        end = self.ends[protocol]
        if end.closing or end.released:
            return
        end.closing = True
        end.outgoing.stop()
        end.incoming.stop()
        end.incoming.flush()  # releases the end once nothing is in flight

    def abort(self, protocol: IProtocol) -> None:
        """Reset C{protocol}'s socket now, dropping what is in flight towards it."""
        end = self.ends[protocol]
        if not end.released:
            self.release(end)
            end.connection.abortConnection()

    def closed(self, end: _End) -> None:
        """C{end} is closing and nothing is in flight towards it: an orderly close."""
        self.release(end)
        hand_back(end.connection, connectionDone)

    def lost(self, end: _End, reason: Failure) -> None:
        """C{end}'s socket failed: tell its protocol now, as the reactor would."""
        self.release(end)
        hand_back(end.connection, reason)

    def release(self, end: _End) -> None:
        """Stop splicing C{end}'s socket (once); the pipes go back with the last one."""
        assert not end.released
        end.released = True
        end.read(False)
        end.write(False)
        if isinstance(end.connection, LeanConnection):
            end.connection.driver = None
        end.outgoing.stop()  # what is already in flight still goes to the other end
        end.incoming.stop()
        end.incoming.drop()  # nowhere to go any more
        if all(other.released for other in self.ends.values()):
            end.outgoing.drop()  # the other end's incoming flow: its pipe goes back too
            self.pipes.detach()


@implementer(IReadWriteDescriptor)
class _End:
    """One spliced socket: the reactor's handler for its fd while spliced."""

    outgoing: _Flow
    incoming: _Flow
    #: Whom the end asks to poll its socket (L{take_over}): a lean connection, or the reactor for itself.
    handle: LeanConnection | _Registrations

    def __init__(self, splice: Splice, connection: SocketConnection) -> None:
        self.splice = splice
        self.connection = connection
        self.protocol: IProtocol = connection.protocol
        self.socket: socket.socket = connection.getHandle()
        self.fd = connection.fileno()
        self.reading = False
        self.writing = False
        self.closing = False
        self.released = False

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "Splice"

    def take_over(self) -> None:
        """
        Become the one handler of the socket's readiness.  A lean connection
        stays registered and passes its events on; Twisted's drops its
        registrations first, as the reactor keeps one handler per fd.
        """
        connection = self.connection
        if isinstance(connection, LeanConnection):
            connection.driver = self
            self.handle = connection
            self.reading, self.writing = connection.reading, connection.writing
        else:
            connection.stopReading()
            connection.stopWriting()
            self.handle = _Registrations(self.splice.reactor, self)

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
            (self.handle.startReading if wanted else self.handle.stopReading)()
            self.watch()

    def write(self, wanted: bool) -> None:
        if wanted != self.writing:
            self.writing = wanted
            (self.handle.startWriting if wanted else self.handle.stopWriting)()
            self.watch()

    def watch(self) -> None:
        """
        Keep the socket in the hangup watch while its flow is stalled and
        the reactor does not poll it (after its FIN it is no longer read,
        and timers look after it).
        """
        if self.reading or self.writing or self.released or not self.outgoing.open:
            self.splice.watch.discard(self.fd)
        else:
            self.splice.watch.add(self.socket, self.hung_up)

    def hung_up(self, error: int) -> None:
        if error and not self.released:
            self.splice.lost(self, Failure(ConnectionLost(os.strerror(error))))


class _Registrations:
    """An end's own registrations with the reactor, in a connection's terms."""

    def __init__(self, reactor: IReactorFDSet, end: _End) -> None:
        self.reactor = reactor
        self.end = end

    def startReading(self) -> None:
        self.reactor.addReader(self.end)

    def stopReading(self) -> None:
        self.reactor.removeReader(self.end)

    def startWriting(self) -> None:
        self.reactor.addWriter(self.end)

    def stopWriting(self) -> None:
        self.reactor.removeWriter(self.end)


class _Flow:
    """
    One direction, source socket to sink socket.  In flight at any time is
    either C{unsent} (bytes copied into the process) or C{pending} bytes in
    C{pipe}, never both: the source is not read until both are empty.
    """

    def __init__(self, splice: Splice, source: _End, sink: _End) -> None:
        self.splice = splice
        self.source = source
        self.sink = sink
        self.pipe: _Pipe | None = None  # held only while bytes are in it
        self.pending = 0  # bytes in the pipe
        self.unsent = b""  # bytes copied in, not yet taken by the sink
        self.splicing = False  # reads are large: splice them
        self.piped = 0  # bytes that went through a pipe, for the curious
        self.open = True  # the source may still be read
        self.fin = False  # a FIN is due to the sink once nothing is in flight
        self.meter: Meter | None = None  # the route's bandwidth, if it limits this direction
        self.refill: IDelayedCall | None = None  # set while over it: when to read again

    def fill(self) -> None:
        """The source is readable: move what it has (and the bandwidth allows) towards the sink."""
        if not self.open:
            return  # an event polled before the flow stopped
        meter = self.meter
        budget = _UNLIMITED if meter is None else meter.allowance()
        if not budget:
            self.wait()
            return
        try:
            count = self.splice_in(budget) if self.splicing else self.copy_in(budget)
        except BlockingIOError:
            return
        except OSError as e:
            self.splice.lost(self.source, Failure(ConnectionLost(e.strerror)))
            return
        if count:
            if meter is not None:
                meter.take(count)
            self.splice.moved(self.source.protocol, count)
            self.flush()
        else:
            self.finish()

    def copy_in(self, budget: int) -> int:
        """Read into the process, at most C{budget} bytes: how many, 0 at the source's FIN."""
        data = self.source.socket.recv(min(COPY_SIZE, budget))
        self.unsent = data
        self.splicing = len(data) == COPY_SIZE
        return len(data)

    def splice_in(self, budget: int) -> int:
        """Move what the source has into a pipe, at most C{budget} bytes: how many, 0 at its FIN."""
        try:
            pipe = self.pipe = self.pipe or self.splice.pipes.take()
        except OSError:  # no descriptor left for a pipe: copy instead
            return self.copy_in(budget)
        try:
            count = os.splice(self.source.fd, pipe.write_fd, min(pipe.size, budget), flags=_FLAGS)
        except BlockingIOError:
            # splice(2) stops for good at TCP urgent data; recv steps over it,
            # and drops the urgent byte as the default path does (no SO_OOBINLINE).
            if not _at_urgent_mark(self.source.fd):
                self.give_back()
                raise
            count = 0
        if count < COPY_SIZE:
            self.splicing = False
            if not count:
                self.give_back()
                return self.copy_in(budget)  # the FIN, or what follows the urgent mark
        self.pending = count
        self.piped += count
        return count

    def finish(self) -> None:
        """The source sent its FIN: pass it on after what is in flight, then tell the source's protocol."""
        self.stop()
        self.fin = True
        self.flush()
        if not self.source.released:
            self.source.protocol.readConnectionLost()  # type: ignore[attr-defined]  # half-closeable, as spliced ones are

    def flush(self) -> None:
        """Move what is in flight into the sink; while it cannot take everything, stop reading the source."""
        try:
            if self.unsent:
                sent = self.sink.socket.send(self.unsent)
                self.unsent = self.unsent[sent:]
            while self.pending:
                assert self.pipe is not None
                self.pending -= os.splice(self.pipe.read_fd, self.sink.fd, self.pending, flags=_FLAGS)
        except BlockingIOError:
            pass
        except OSError as e:
            self.splice.lost(self.sink, Failure(ConnectionLost(e.strerror)))
            return
        if self.unsent or self.pending:
            self.source.read(False)
            self.sink.write(True)
            return
        # Each step below is a call only where it changes something: a short
        # connection's few small writes come through here several times.
        if self.pipe is not None:
            self.give_back()
        sink = self.sink
        if sink.writing:
            sink.write(False)
        if sink.closing:
            self.splice.closed(sink)
        elif self.fin:
            self.fin = False
            try:
                sink.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the reset, if any, surfaces on the next read
        elif self.open and self.refill is None and not self.source.reading:
            self.source.read(True)

    def wait(self) -> None:
        """Over the bandwidth: stop reading the source until the meter's buckets have refilled."""
        assert self.meter is not None
        self.source.read(False)
        self.refill = self.meter.later(self.refilled)

    def refilled(self) -> None:
        """Read again; L{fill} asks the meter anew (shared buckets may be empty again)."""
        self.refill = None
        if self.open:
            self.source.read(True)

    def give_back(self) -> None:
        """Return the pipe to the pool once it is empty."""
        if self.pipe is not None and not self.pending:
            self.splice.pipes.give(self.pipe)
            self.pipe = None

    def drop(self) -> None:
        """Forget what is in flight (its sink is gone); a pipe with bytes in it is closed."""
        self.unsent = b""
        if self.pipe is not None and self.pending:
            self.pipe.close()
            self.pipe, self.pending = None, 0
        self.give_back()

    def stop(self) -> None:
        """Never read the source again."""
        self.open = False
        self.source.read(False)
        if self.refill is not None:
            self.refill.cancel()
            self.refill = None


def _at_urgent_mark(fd: int) -> bool:
    return fcntl.ioctl(fd, _SIOCATMARK, b"\0\0\0\0") != b"\0\0\0\0"
