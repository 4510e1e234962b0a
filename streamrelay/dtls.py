"""
DTLS 1.2 over UDP on Twisted's reactor, with pyOpenSSL: the datagram half of
an agent tunnel (GoDoxy's wire protocol: mutual authentication, extended
master secret, a cookie exchange before any state is kept).

Twisted has no DTLS transport, so each association is a pyOpenSSL
C{Connection} on memory BIOs (L{DTLSSession}): what a socket receives is fed
in, what OpenSSL writes out is cut into datagrams at record boundaries and
sent, and OpenSSL's retransmission timer is armed from
C{DTLSv1_get_timeout} after every step.  After the handshake each record's
plaintext is one datagram, both ways, handed to a L{DatagramHandler}.

L{DTLSServer} serves every peer from one listening socket.  A datagram from
an address without a session goes to a throwaway C{Connection} whose
C{DTLSv1_listen} answers a ClientHello without a valid cookie (an HMAC of
the peer's address under a per-process secret) with a HelloVerifyRequest,
and keeps nothing: a spoofed source costs one small reply and no memory.
The reply is never larger than what provoked it.  Only a ClientHello that
returns the cookie, proving the address is reachable, gets a session, and
only while the peer table has room.

L{DTLSClient} runs one session over a connected UDP socket and checks the
server's certificate for the name it was given (C{service_identity}).

A session that has not finished its handshake within C{handshake_timeout}
is dropped; an established one with no datagram either way for
C{idle_timeout} is closed with a close_notify, as is every session when its
owner stops.  OpenSSL cannot require the extended master secret, so a
handshake without it is closed once it is done.

Plaintext datagrams are limited to a record's payload, L{MAX_DATAGRAM}
(2^14 bytes): L{DTLSSession.send} refuses larger ones (it returns False, and
the caller drops and counts them).  Records above the path MTU leave as
fragmented UDP datagrams; handshake flights are cut to L{MTU}.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from OpenSSL import SSL
from OpenSSL._util import lib as _openssl
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol

from .dial import is_ip_literal
from .tlscontext import (
    CIPHERS, TLSVerificationError, load_certificates, note_failure, use_identity, verify_failure, verify_server,
)

__all__ = [
    "MAX_DATAGRAM", "MTU", "DTLSClient", "DTLSHandshakeError", "DTLSServer", "DTLSSession", "DatagramHandler",
    "client_context", "server_context",
]

Address = tuple[str, int]

#: The largest plaintext a DTLS record carries (RFC 6347 §4.1.1: 2^14 bytes).
MAX_DATAGRAM = 1 << 14
#: Handshake flights are cut into datagrams of at most this many bytes
#: (memory BIOs cannot ask the kernel for the path MTU).
MTU = 1400
#: OpenSSL's DTLS1_2_VERSION (pyOpenSSL does not export it).
DTLS1_2_VERSION = 0xFEFD
#: A DTLS record header: type, version, epoch, sequence number, length.
RECORD_HEADER = 13

#: Keys the cookies; a restart invalidates outstanding cookies, as it should.
_COOKIE_SECRET = os.urandom(32)
_COOKIE_SIZE = 16


class DTLSHandshakeError(Exception):
    """A client's handshake failed or timed out; the message says why."""


class DatagramHandler(Protocol):
    """What a session delivers to: one plaintext datagram per record, then its end."""

    def datagram_received(self, data: bytes) -> None: ...

    def session_closed(self, reason: str) -> None: ...


# -- contexts


def server_context(ca: str, cert: str, key: str) -> SSL.Context:
    """A DTLS 1.2 server context that requires a client certificate from C{ca} and a cookie."""
    context = _context(SSL.DTLS_SERVER_METHOD, ca, cert, key)
    for authority in load_certificates(ca):
        context.add_client_ca(authority)
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, note_failure)
    context.set_cookie_generate_callback(_cookie)
    context.set_cookie_verify_callback(lambda connection, cookie: hmac.compare_digest(cookie, _cookie(connection)))
    return context


def client_context(ca: str, cert: str, key: str) -> SSL.Context:
    """A DTLS 1.2 client context that presents C{cert} and verifies the server against C{ca}."""
    context = _context(SSL.DTLS_CLIENT_METHOD, ca, cert, key)
    context.set_verify(SSL.VERIFY_PEER, note_failure)
    return context


def _context(method: int, ca: str, cert: str, key: str) -> SSL.Context:
    context = SSL.Context(method)
    context.set_min_proto_version(DTLS1_2_VERSION)
    context.set_max_proto_version(DTLS1_2_VERSION)
    context.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_QUERY_MTU)
    context.set_cipher_list(CIPHERS)
    use_identity(context, cert, key, None)
    context.load_verify_locations(ca)
    return context


def _cookie(connection: SSL.Connection) -> bytes:
    """The cookie for the address L{DTLSServer} attached to C{connection}."""
    host, port = connection.get_app_data()
    return hmac.digest(_COOKIE_SECRET, f"{host} {port}".encode(), hashlib.sha256)[:_COOKIE_SIZE]


def _extended_master_secret(connection: SSL.Connection) -> bool:
    """Whether the handshake negotiated RFC 7627's extended master secret (OpenSSL cannot require it)."""
    return bool(_openssl.SSL_get_extms_support(connection._ssl))


def _connection(context: SSL.Context) -> SSL.Connection:
    """A connection on memory BIOs, told the MTU it cannot discover."""
    connection = SSL.Connection(context, None)
    connection.set_ciphertext_mtu(MTU)
    return connection


def _pending(connection: SSL.Connection) -> bytes:
    """Everything OpenSSL has written to C{connection}'s outgoing memory BIO."""
    chunks = []
    while True:
        try:
            chunks.append(connection.bio_read(65536))
        except SSL.WantReadError:
            return b"".join(chunks)


def _first_in_epoch(hello_verify_request: bytes) -> bytes:
    """
    The HelloVerifyRequest record renumbered 0.  OpenSSL copies the
    ClientHello's record number into it (RFC 6347 4.2.1), but after
    C{DTLSv1_listen} the session numbers its flight from 1 whatever the
    ClientHello's, so after a retransmitted ClientHello (record 1) the
    client's replay check dropped the ServerHello (record 1 again) and the
    handshake waited a second more.  Clients do not check the number.
    """
    return hello_verify_request[:5] + bytes(6) + hello_verify_request[11:]


def _datagrams(data: bytes, mtu: int) -> Iterator[bytes]:
    """C{data}, whole DTLS records, packed into datagrams of at most C{mtu} bytes (a longer record alone)."""
    start = end = 0
    while end < len(data):
        record_end = end + RECORD_HEADER + int.from_bytes(data[end + 11:end + 13], "big")
        if record_end - start > mtu and end > start:
            yield data[start:end]
            start = end
        end = record_end
    if end > start:
        yield data[start:end]


# -- sessions


class _Owner(Protocol):
    """What a session reports to: L{DTLSServer} or L{DTLSClient}."""

    def handshake_done(self, session: DTLSSession) -> None: ...

    def session_ended(self, session: DTLSSession, reason: str) -> None: ...


class DTLSSession:
    """
    One association: a C{Connection} on memory BIOs, its retransmission,
    handshake and idle timers.  Its owner (server or client) learns of the
    handshake's end and of the session's; C{handler} gets the datagrams.
    """

    handler: DatagramHandler | None = None

    def __init__(
        self, connection: SSL.Connection, address: Address, write: Callable[[bytes], object], owner: _Owner,
        clock: IReactorTime, handshake_timeout: float, idle_timeout: float | None,
    ) -> None:
        self.connection = connection
        self.address = address
        self._write = write
        self._owner = owner
        self._clock = clock
        self._idle_timeout = idle_timeout
        self.established = False
        self.closed = False
        self._active = clock.seconds()
        self._retransmit: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = clock.callLater(handshake_timeout, self.close, "handshake timeout")

    def feed(self, datagram: bytes) -> None:
        """Process a datagram from the peer."""
        if not self.closed:
            self.connection.bio_write(datagram)
            self.advance()

    def advance(self) -> None:
        """Move the handshake on, deliver what has been decrypted, send what OpenSSL wrote."""
        if not self.established:
            self._handshake()
        if self.established and not self.closed:
            self._read()
        self._flush()
        self._arm()

    def send(self, data: bytes) -> bool:
        """Send one datagram as one record; False (nothing sent) if too large, empty or not open."""
        if not self.established or self.closed or not 0 < len(data) <= MAX_DATAGRAM:
            return False
        try:
            self.connection.send(data)
        except SSL.Error as e:
            self.close(_describe(e))
            return False
        self._active = self._clock.seconds()
        self._flush()
        return True

    def close(self, reason: str) -> None:
        """End the session: send close_notify if established, stop its timers, tell its owner and handler."""
        if self.closed:
            return
        self.closed = True
        for timer in (self._retransmit, self._deadline):
            if timer is not None and timer.active():
                timer.cancel()
        if self.established:
            try:
                self.connection.shutdown()
            except SSL.Error:
                pass
        self._flush()
        self._owner.session_ended(self, reason)
        if self.handler is not None:
            self.handler.session_closed(reason)

    def _handshake(self) -> None:
        try:
            self.connection.do_handshake()
        except SSL.WantReadError:
            return
        except SSL.Error as e:
            self.close(verify_failure(self.connection) or _describe(e))
            return
        if not _extended_master_secret(self.connection):
            self.connection.shutdown()  # the peer thinks it is through: tell it otherwise
            self.close("no extended master secret")
            return
        self.established = True
        self._active = self._clock.seconds()
        self._restart_idle()
        self._owner.handshake_done(self)

    def _read(self) -> None:
        while not self.closed:
            try:
                data = self.connection.recv(MAX_DATAGRAM)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                self.close("closed by peer")
                return
            except SSL.Error as e:
                self.close(_describe(e))
                return
            self._active = self._clock.seconds()
            if self.handler is not None:
                self.handler.datagram_received(data)

    def _flush(self) -> None:
        for datagram in _datagrams(_pending(self.connection), MTU):
            self._write(datagram)

    def _arm(self) -> None:
        """Follow OpenSSL's retransmission timer."""
        delay = None if self.closed else self.connection.DTLSv1_get_timeout()
        if delay is None:
            if self._retransmit is not None and self._retransmit.active():
                self._retransmit.cancel()
        elif self._retransmit is not None and self._retransmit.active():
            self._retransmit.reset(delay)
        else:
            self._retransmit = self._clock.callLater(delay, self._retransmission)

    def _retransmission(self) -> None:
        try:
            self.connection.DTLSv1_handle_timeout()
        except SSL.Error as e:
            self.close(_describe(e))
            return
        self._flush()
        self._arm()

    def _restart_idle(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self._idle_timeout is not None:
            self._deadline = self._clock.callLater(self._idle_timeout, self._idle)

    def _idle(self) -> None:
        """Close if nothing moved for the idle timeout (checked, not reset, per datagram)."""
        assert self._idle_timeout is not None
        left = self._active + self._idle_timeout - self._clock.seconds()
        if left > 0:
            self._deadline = self._clock.callLater(left, self._idle)
        else:
            self._deadline = None
            self.close("idle")


def _describe(error: SSL.Error) -> str:
    """OpenSSL's reason for a failure ("tlsv1 alert unknown ca"), without the library's tuple."""
    reasons = [reason for _, _, reason in error.args[0]] if error.args and isinstance(error.args[0], list) else []
    return "; ".join(reasons) or repr(error)


# -- the server


class DTLSServer(DatagramProtocol):
    """
    DTLS on one listening UDP socket (give C{reactor.listenUDP} a
    C{maxPacketSize} of 65535).  C{factory} makes each verified peer's
    L{DatagramHandler} once its handshake is done; C{refused} hears of
    handshakes that did not complete, with the reason; C{drops} counts
    datagrams dropped without a session, by reason.
    """

    def __init__(
        self, context: SSL.Context, factory: Callable[[DTLSSession], DatagramHandler], *,
        handshake_timeout: float = 10.0, idle_timeout: float | None = 120.0, max_peers: int = 4096,
        clock: IReactorTime | None = None, refused: Callable[[Address, str], object] | None = None,
    ) -> None:
        from twisted.internet import reactor

        self.context = context
        self.factory = factory
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.max_peers = max_peers
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.refused = refused
        self.peers: dict[Address, DTLSSession] = {}
        self.drops: Counter[str] = Counter()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        session = self.peers.get(addr)
        if session is not None:
            session.feed(datagram)
        else:
            self._listen(datagram, addr)

    def _listen(self, datagram: bytes, address: Address) -> None:
        """The stateless cookie exchange: a session only for a ClientHello with a valid cookie."""
        connection = _connection(self.context)
        connection.set_app_data(address)
        connection.set_accept_state()
        connection.bio_write(datagram)
        try:
            connection.DTLSv1_listen()
        except SSL.WantReadError:
            reply = _pending(connection)
            if not reply:
                self.drops["not a ClientHello"] += 1
            elif len(reply) > len(datagram):
                self.drops["reply too large"] += 1
            else:
                self._send(_first_in_epoch(reply), address)
            return
        except SSL.Error:
            self.drops["malformed"] += 1
            return
        if len(self.peers) >= self.max_peers:
            self.drops["peer table full"] += 1
            return
        session = DTLSSession(
            connection, address, lambda data: self._send(data, address), self, self.clock,
            self.handshake_timeout, self.idle_timeout,
        )
        self.peers[address] = session
        session.advance()

    def _send(self, data: bytes, address: Address) -> None:
        if self.transport is not None:
            try:
                self.transport.write(data, address)
            except OSError:  # a full socket buffer: lost, as the network could lose it
                self.drops["send failed"] += 1

    def handshake_done(self, session: DTLSSession) -> None:
        session.handler = self.factory(session)

    def session_ended(self, session: DTLSSession, reason: str) -> None:
        if self.peers.get(session.address) is session:
            del self.peers[session.address]
        if not session.established and self.refused is not None:
            self.refused(session.address, reason)

    def stopProtocol(self) -> None:
        self._close_sessions()

    def stop(self) -> Deferred[None]:
        """Close every session (each peer gets a close_notify), then the socket."""
        self._close_sessions()
        return _stop_listening(self)

    def _close_sessions(self) -> None:
        for session in list(self.peers.values()):
            session.close("shutdown")


# -- the client


class DTLSClient(DatagramProtocol):
    """
    One DTLS session to C{address} (an IP literal) over a connected UDP
    socket: C{reactor.listenUDP(0, client, interface=...)} starts it.
    C{handshake} fires once the server is verified as C{server_name} (or
    fails with L{DTLSHandshakeError}); then L{send} and C{handler} carry
    datagrams.
    """

    session: DTLSSession | None = None

    def __init__(
        self, context: SSL.Context, address: Address, server_name: str, handler: DatagramHandler, *,
        handshake_timeout: float = 10.0, idle_timeout: float | None = None, clock: IReactorTime | None = None,
    ) -> None:
        from twisted.internet import reactor

        self.context = context
        self.address = address
        self.server_name = server_name
        self.handler = handler
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.handshake: Deferred[None] = Deferred()

    def startProtocol(self) -> None:
        assert self.transport is not None
        self.transport.connect(*self.address)
        connection = _connection(self.context)
        if not is_ip_literal(self.server_name):
            connection.set_tlsext_host_name(self.server_name.encode("idna"))
        connection.set_connect_state()
        self.session = DTLSSession(
            connection, self.address, self._write, self, self.clock, self.handshake_timeout,
            self.idle_timeout,
        )
        self.session.advance()

    def _write(self, datagram: bytes) -> None:
        if self.transport is not None:
            try:
                self.transport.write(datagram, None)
            except OSError:  # a full socket buffer: lost, as the network could lose it
                pass

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self.session is not None:
            self.session.feed(datagram)

    def send(self, data: bytes) -> bool:
        """Send one datagram; False if it is larger than L{MAX_DATAGRAM} or the session is not open."""
        return self.session is not None and self.session.send(data)

    def handshake_done(self, session: DTLSSession) -> None:
        try:
            verify_server(session.connection, self.server_name)
        except TLSVerificationError as e:
            session.close(str(e))
            return
        session.handler = self.handler
        self.handshake.callback(None)

    def session_ended(self, session: DTLSSession, reason: str) -> None:
        if not self.handshake.called:
            self.handshake.errback(DTLSHandshakeError(reason))

    def connectionRefused(self) -> None:
        if self.session is not None:
            self.session.close("connection refused")

    def stopProtocol(self) -> None:
        if self.session is not None:
            self.session.close("socket closed")

    def stop(self) -> Deferred[None]:
        """Send close_notify and close the socket."""
        if self.session is not None:
            self.session.close("stopped")
        return _stop_listening(self)


def _stop_listening(protocol: DatagramProtocol) -> Deferred[None]:
    """Close C{protocol}'s socket; fires when it is closed."""
    stopped = protocol.transport.stopListening() if protocol.transport is not None else None
    return stopped if stopped is not None else succeed(None)
