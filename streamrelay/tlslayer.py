"""
TLS between a TCP transport and the protocol above it, with half-close.

Twisted's C{TLSMemoryBIOProtocol} cannot half-close: it has no
C{loseWriteConnection}, and a close_notify from the peer ends the whole
connection.  A relay must carry each direction's end on its own (TLS 1.3
allows it: a close_notify closes only its sender's side), so L{TLSLayer}
drives a pyOpenSSL connection over memory BIOs itself and maps TLS's ends
onto TCP's: C{loseWriteConnection} sends close_notify then a FIN and keeps
reading; the peer's close_notify, or its FIN without one, is the inner
protocol's C{readConnectionLost}, and writing goes on.

Ciphertext is handed to the transport below as soon as it is made, so that
transport's buffer is the only one and its producer wiring holds; each
C{dataReceived} decrypts every whole record it brought and hands the
plaintext up in one call.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID
from OpenSSL import SSL
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProducer,
    IProtocol,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from .dial import is_ip_literal
from .interfaces import IRelayTransport
from .tlscontext import TLSVerificationError, verify_failure, verify_server

__all__ = ["TLSFacts", "TLSHandshakeError", "TLSLayer"]

#: Plaintext the layer keeps before it acts: written before the handshake
#: completes, its producer is paused; written during a C{dataReceived}, it is
#: encrypted and handed on without waiting for the end.  (The transport's own
#: C{bufferSize}.)
BUFFER_SIZE = 65536
#: The most one C{SSL_read} asks for (records carry at most 16 KiB).
READ_SIZE = 65536
#: The most one C{BIO_read} takes: a full read's worth of records, and more.
CIPHERTEXT_SIZE = 131072

#: OpenSSL's short names of certificate signature algorithms (C{OBJ_nid2sn}),
#: which HAProxy sends as PP2_SUBTYPE_SSL_SIG_ALG.
_SIGNATURE_NAMES = {
    SignatureAlgorithmOID.RSA_WITH_SHA1: "RSA-SHA1",
    SignatureAlgorithmOID.RSA_WITH_SHA224: "RSA-SHA224",
    SignatureAlgorithmOID.RSA_WITH_SHA256: "RSA-SHA256",
    SignatureAlgorithmOID.RSA_WITH_SHA384: "RSA-SHA384",
    SignatureAlgorithmOID.RSA_WITH_SHA512: "RSA-SHA512",
    SignatureAlgorithmOID.RSASSA_PSS: "RSASSA-PSS",
    SignatureAlgorithmOID.ECDSA_WITH_SHA1: "ecdsa-with-SHA1",
    SignatureAlgorithmOID.ECDSA_WITH_SHA224: "ecdsa-with-SHA224",
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: "ecdsa-with-SHA256",
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: "ecdsa-with-SHA384",
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: "ecdsa-with-SHA512",
    SignatureAlgorithmOID.DSA_WITH_SHA1: "DSA-SHA1",
    SignatureAlgorithmOID.DSA_WITH_SHA256: "dsa_with_SHA256",
    SignatureAlgorithmOID.ED25519: "ED25519",
    SignatureAlgorithmOID.ED448: "ED448",
}

#: OpenSSL's handshake errors in an operator's words; the others are kept as OpenSSL says them.
_REASONS = {
    "peer did not return a certificate": "client certificate required but none sent",
    "tlsv13 alert certificate required": "peer requires a client certificate",
    "unsupported protocol": "no TLS version in common",
    "tlsv1 alert protocol version": "no TLS version in common",
    "wrong version number": "not TLS",
    "http request": "not TLS (an HTTP request)",
    "packet length too long": "not TLS",
    "record layer failure": "not TLS",
    "unexpected eof while reading": "peer closed during handshake",
}


class TLSHandshakeError(Exception):
    """The handshake failed; the message says why, in an operator's terms."""


@dataclass(frozen=True)
class TLSFacts:
    """
    What a completed handshake settled, as HAProxy's PROXY v2 SSL TLVs carry
    it.  C{client_*} describe the peer's certificate (the client's, on the
    server side); C{sig_alg} and C{key_alg} describe the certificate this
    side presented, as HAProxy's PP2_SUBTYPE_SSL_SIG_ALG (C{"RSA-SHA256"})
    and PP2_SUBTYPE_SSL_KEY_ALG (C{"RSA2048"}, C{"EC256"}) do.
    """

    version: str
    cipher: str
    server_name: str | None
    alpn: str | None
    client_cert: bool
    client_verified: bool
    client_cn: str | None
    sig_alg: str | None
    key_alg: str | None


@implementer(IHalfCloseableProtocol, ITCPTransport, IConsumer, IPushProducer)
class TLSLayer(Protocol):
    """
    The protocol of a TCP connection (C{transport}) and the transport of an
    inner protocol, with TLS between them.

    On the server side the inner protocol is connected at once (so that it
    can refuse the client before any handshake) but reads nothing until the
    handshake is done; what it writes meanwhile waits for it.  On the client
    side it is connected only once the handshake is done and the target's
    name checked.

    C{handshake} fires with the L{TLSFacts}.  A failure closes the
    connection (after the alert OpenSSL made, if any) and is reported once:
    to C{on_failure} with the reason if given (C{handshake} then never
    fires), else as a L{TLSHandshakeError} from C{handshake} to the
    callbacks added before the connection is lost (later ones see C{None}).
    """

    transport: IRelayTransport

    def __init__(
        self,
        inner: IProtocol,
        context: SSL.Context,
        *,
        server: bool,
        reactor: IReactorTime,
        handshake_timeout: float,
        server_name: str | None = None,
        verify: bool = True,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        if not server and verify and not server_name:
            raise ValueError("a verifying client needs the server_name to verify")
        self.inner = inner
        self.server = server
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.server_name = server_name
        self.verify = verify
        self.on_failure = on_failure
        self.tls = SSL.Connection(context, None)
        self.sni = None if server_name is None or is_ip_literal(server_name) else server_name
        if server:
            self.tls.set_accept_state()
        else:
            self.tls.set_connect_state()
            if self.sni is not None:
                self.tls.set_tlsext_host_name(self.sni.encode("idna"))
        self.handshake: Deferred[TLSFacts] = Deferred()
        self.facts: TLSFacts | None = None
        self.failure: str | None = None
        self.timer: IDelayedCall | None = None
        self.pending: list[bytes] = []  # plaintext written before the handshake completed
        self.pending_size = 0
        self.producer: IPushProducer | None = None
        self.producer_paused = False  # by us, for C{pending}
        self.paused = False  # by whoever reads the inner protocol's bytes
        self.batching = False  # in dataReceived: one transport write at its end
        self.unflushed = 0  # plaintext encrypted since the last flush
        self.read_closed = False  # close_notify or FIN received
        self.write_closed = False  # close_notify sent
        self.closing = False  # by the inner protocol
        self.close_after_handshake = False
        self.half_close_after_handshake = False
        self.inner_connected = False

    # -- from below

    def connectionMade(self) -> None:
        if self.handshake_timeout > 0:
            self.timer = self.reactor.callLater(self.handshake_timeout, self.timed_out)
        if self.server:
            self.inner_connected = True
            self.inner.makeConnection(self)
        else:
            self.advance()  # the ClientHello
            self.flush()

    def dataReceived(self, data: bytes) -> None:
        if self.failure is not None or self.read_closed:
            return
        self.batching = True
        try:
            self.tls.bio_write(data)
            if self.facts is None and not self.advance():
                return
            self.read_plaintext()
        finally:
            self.batching = False
            self.flush()

    def readConnectionLost(self) -> None:
        """A FIN from below, close_notify or not."""
        if self.facts is None:
            self.fail("peer closed during handshake")
        else:
            self.peer_finished()

    def writeConnectionLost(self) -> None:
        """Our FIN went out after our close_notify."""
        inner = IHalfCloseableProtocol(self.inner, None)
        if inner is not None and self.inner_connected:
            inner.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.stop_timer()
        if self.facts is None:
            self.fail("closed during handshake" if self.closing else "peer closed during handshake")
        if self.inner_connected:
            self.inner_connected = False
            self.inner.connectionLost(reason)
        # A failure nobody waited for (a client refused at accept) is not an unhandled error.
        self.handshake.addErrback(lambda failure: None)

    # -- the handshake

    def advance(self) -> bool:
        """Take the handshake as far as the bytes received allow; whether it completed."""
        try:
            self.tls.do_handshake()
        except SSL.WantReadError:
            return False
        except SSL.Error as e:
            self.fail(self.describe(e))
            return False
        if not self.server and self.verify:
            assert self.server_name is not None  # checked in __init__
            try:
                verify_server(self.tls, self.server_name)
            except TLSVerificationError as e:
                self.fail(str(e))
                return False
        self.established()
        return self.failure is None and self.facts is not None

    def established(self) -> None:
        self.stop_timer()
        self.facts = facts = self.read_facts()
        if not self.server:
            self.inner_connected = True
            self.inner.makeConnection(self)
        if self.paused:
            self.transport.pauseProducing()
        if self.producer_paused:
            self.producer_paused = False
            if self.producer is not None:
                self.producer.resumeProducing()
        pending, self.pending, self.pending_size = self.pending, [], 0
        for data in pending:
            self.encrypt(data)
        if self.half_close_after_handshake:
            self.loseWriteConnection()
        if self.close_after_handshake:
            self.loseConnection()
        self.handshake.callback(facts)

    def fail(self, reason: str) -> None:
        """End a handshake that cannot complete: send OpenSSL's alert, close, report once."""
        if self.failure is not None:
            return
        self.failure = reason
        self.stop_timer()
        self.flush()  # the alert
        self.transport.loseConnection()
        if self.on_failure is not None:
            self.on_failure(reason)
        else:
            self.handshake.errback(TLSHandshakeError(reason))

    def describe(self, error: SSL.Error) -> str:
        """A failed handshake's reason, from OpenSSL's error queue and the verification's."""
        queue = error.args[0] if error.args and isinstance(error.args[0], list) else []
        reason = queue[0][2] if queue else str(error)  # the first entry: (library, function, reason)
        if reason == "certificate verify failed":
            return f"certificate verify failed: {verify_failure(self.tls) or 'unknown error'}"
        if reason in _REASONS:
            return _REASONS[reason]
        for prefix in ("sslv3 alert ", "tlsv1 alert ", "tlsv13 alert "):
            if reason.startswith(prefix):
                return f"peer sent alert: {reason[len(prefix):]}"
        return reason

    def read_facts(self) -> TLSFacts:
        tls = self.tls
        peer = tls.get_peer_certificate(as_cryptography=True)
        verified = peer is not None and bool(tls.get_verify_mode() & SSL.VERIFY_PEER)
        own = tls.get_certificate(as_cryptography=True)
        if self.server:
            sent = tls.get_servername()  # A-labels (xn--...), as the client sent them
            server_name = sent.decode("ascii", "replace") if sent else None
        else:
            server_name = self.sni
        alpn = tls.get_alpn_proto_negotiated()
        return TLSFacts(
            version=tls.get_protocol_version_name(),
            cipher=tls.get_cipher_name() or "",
            server_name=server_name,
            alpn=alpn.decode("ascii", "replace") if alpn else None,
            client_cert=peer is not None,
            client_verified=verified,
            client_cn=common_name(peer) if verified and peer is not None else None,
            sig_alg=signature_algorithm(own) if own is not None else None,
            key_alg=key_algorithm(own) if own is not None else None,
        )

    def timed_out(self) -> None:
        self.timer = None
        self.fail("handshake timeout")

    def stop_timer(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    # -- relaying

    def read_plaintext(self) -> None:
        """Decrypt every whole record received, and hand the plaintext up in one call."""
        chunks = []
        finished = False
        try:
            while True:
                chunks.append(self.tls.recv(READ_SIZE))
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            finished = True
        except SSL.Error:  # a bad record or a fatal alert: the session is over both ways
            self.read_closed = self.write_closed = True
            self.flush()
            self.transport.loseConnection()
            return
        if chunks:
            self.inner.dataReceived(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if finished:
            self.peer_finished()

    def peer_finished(self) -> None:
        """The peer will send nothing more (close_notify, or a FIN without one)."""
        if self.read_closed:
            return
        self.read_closed = True
        inner = IHalfCloseableProtocol(self.inner, None)
        if inner is None:
            self.loseConnection()
            return
        inner.readConnectionLost()
        if self.write_closed:  # both directions are done
            self.transport.loseConnection()

    def encrypt(self, data: bytes) -> None:
        """Into records, into the outgoing BIO (pyOpenSSL's contexts write a record per call)."""
        view = memoryview(data)
        while view:
            view = view[self.tls.send(view) :]

    def flush(self) -> None:
        """Hand what OpenSSL wrote to the transport below, in one write."""
        self.unflushed = 0
        chunks = []
        try:
            while True:
                chunk = self.tls.bio_read(CIPHERTEXT_SIZE)
                chunks.append(chunk)
                if len(chunk) < CIPHERTEXT_SIZE:
                    break
        except SSL.WantReadError:
            pass
        if len(chunks) == 1:
            self.transport.write(chunks[0])
        elif chunks:
            self.transport.writeSequence(chunks)

    @property
    def disconnecting(self) -> bool:
        """Whether the layer is closing or has failed (twisted.web's line reader asks its transport)."""
        return self.closing or self.failure is not None

    @property
    def held(self) -> int:
        """Plaintext bytes the layer holds: written before the handshake, or decrypted and not handed up."""
        return self.pending_size + self.tls.pending()

    # -- the transport the inner protocol sees

    def write(self, data: bytes) -> None:
        if self.write_closed or self.failure is not None or not data:
            return
        if self.facts is None:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size >= BUFFER_SIZE and self.producer is not None and not self.producer_paused:
                self.producer_paused = True
                self.producer.pauseProducing()
            return
        self.encrypt(data)
        self.unflushed += len(data)
        if not self.batching or self.unflushed >= BUFFER_SIZE:
            self.flush()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """Send close_notify after what is written, then a FIN; keep reading."""
        if self.write_closed or self.failure is not None:
            return
        if self.facts is None:
            self.half_close_after_handshake = True
            return
        self.write_closed = True
        self.tls.shutdown()
        self.flush()
        if self.read_closed:
            self.transport.loseConnection()
        else:
            self.transport.loseWriteConnection()

    def loseConnection(self) -> None:
        """
        Close after what is written and a close_notify.  During the
        handshake, what the inner protocol wrote waits for it; with nothing
        written, the connection closes at once.
        """
        if self.failure is not None:
            return
        self.closing = True
        if self.facts is None and self.pending:
            self.close_after_handshake = True
            return
        if self.facts is not None and not self.write_closed:
            self.write_closed = True
            self.tls.shutdown()
            self.flush()
        self.stop_timer()
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.closing = True
        self.stop_timer()
        self.transport.abortConnection()

    def getPeer(self) -> IPv4Address | IPv6Address:
        return self.transport.getPeer()

    def getHost(self) -> IPv4Address | IPv6Address:
        return self.transport.getHost()

    def getTcpNoDelay(self) -> bool:
        return self.transport.getTcpNoDelay()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)

    def getTcpKeepAlive(self) -> bool:
        return self.transport.getTcpKeepAlive()

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.transport.setTcpKeepAlive(enabled)

    def fileno(self) -> int:
        return self.transport.fileno()

    def getHandle(self) -> socket.socket:
        return self.transport.getHandle()

    # IConsumer: the transport below is the buffer that fills up.

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.producer = IPushProducer(producer, None) if streaming else None
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producer_paused = False
        self.transport.unregisterProducer()

    # IPushProducer: whoever reads the inner protocol's bytes can stop the socket.

    def pauseProducing(self) -> None:
        self.paused = True
        if self.facts is not None:  # the handshake needs reading
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.loseConnection()


def common_name(certificate: x509.Certificate) -> str | None:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def signature_algorithm(certificate: x509.Certificate) -> str | None:
    """How the certificate was signed, as OpenSSL names it (C{"RSA-SHA256"})."""
    oid = certificate.signature_algorithm_oid
    return _SIGNATURE_NAMES.get(oid, oid.dotted_string)


def key_algorithm(certificate: x509.Certificate) -> str | None:
    """The certificate's key as HAProxy names it (C{"RSA2048"}, C{"EC256"}); C{None} for others."""
    key = certificate.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC{key.curve.key_size}"
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA{key.key_size}"
    return None
