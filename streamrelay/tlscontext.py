"""
The OpenSSL contexts of a route's TLS: the server side (C{tls:}, towards
clients) and the client side (C{upstream_tls:}, towards the target), built
from the configuration's dataclasses with every file checked first.

A context is built once per route (and per reload), never per connection.
A mistake an operator can make in a file (unreadable, not PEM, a key that
is not the certificate's, an expired certificate) is a L{TLSSetupError}
naming the file and the problem, so that a start or reload can say what to
fix instead of failing its first handshake.

Verification failures are kept per connection (L{verify_failure}) in
operator terms ("unknown ca", "certificate expired"), for the handshake's
failure reason; L{verify_server} checks the target's name after the
handshake, with C{service_identity}.
"""

from __future__ import annotations

import datetime
import hashlib
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address

from .config import TLSConfig, TLSVersion, UpstreamTLSConfig
from .dial import is_ip_literal

if TYPE_CHECKING:
    from OpenSSL.SSL import _NoOverlappingProtocols

__all__ = [
    "TLSSetupError", "TLSVerificationError", "client_context", "file_digest", "load_certificates", "note_failure",
    "server_context", "use_identity", "verify_failure", "verify_server",
]

#: OpenSSL's default suites without RSA key transport (no forward secrecy)
#: and without the PSK and SRP suites no route configures.
CIPHERS = b"DEFAULT:!kRSA:!PSK:!SRP"

#: The keys that can sign a handshake, as pyOpenSSL takes them.
SigningKey = Union[
    rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey, dsa.DSAPrivateKey
]
_SIGNING_KEYS = (
    rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey, dsa.DSAPrivateKey
)

_VERSIONS: dict[TLSVersion, int] = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

#: X.509 verification errors (OpenSSL's X509_V_ERR_*) in the words of the
#: alert OpenSSL sends for them; others keep OpenSSL's number.
_VERIFY_ERRORS = {
    2: "unknown ca",  # unable to get issuer certificate
    7: "bad certificate signature",
    9: "certificate not yet valid",
    10: "certificate expired",
    18: "unknown ca",  # self-signed certificate
    19: "unknown ca",  # self-signed certificate in certificate chain
    20: "unknown ca",  # unable to get local issuer certificate
    21: "unknown ca",  # unable to verify the first certificate
    22: "certificate chain too long",
    24: "unknown ca",  # invalid CA certificate
    26: "unsupported certificate purpose",
}

#: The first verification error of each connection that had one (gone with the connection).
_failures: weakref.WeakKeyDictionary[SSL.Connection, int] = weakref.WeakKeyDictionary()


class TLSSetupError(ValueError):
    """A certificate, key or CA file that cannot be used; C{path} is the file at fault."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


class TLSVerificationError(Exception):
    """The target's certificate is not for the name it was dialed by."""


def server_context(tls: TLSConfig) -> SSL.Context:
    """The context that terminates TLS from a route's clients."""
    if tls.verify_client != "none" and not tls.client_ca:
        raise TLSSetupError("", f"verify_client {tls.verify_client} needs a client_ca file")
    if tls.verify_client == "none" and tls.client_ca:
        raise TLSSetupError(tls.client_ca, f"{tls.client_ca}: client_ca is set but verify_client is none")
    context = _context(SSL.TLS_SERVER_METHOD, tls.min_version)
    use_identity(context, tls.cert, tls.key, tls.chain)
    if tls.client_ca:
        for authority in load_certificates(tls.client_ca):
            context.add_client_ca(authority)  # the names a client picks its certificate by
        context.load_verify_locations(tls.client_ca)
        mode = SSL.VERIFY_PEER
        if tls.verify_client == "require":
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        context.set_verify(mode, note_failure)
    # Resumed sessions carry their client's verification: only within the same settings.
    context.set_session_id(hashlib.sha256(repr(tls).encode()).digest()[:32])
    if tls.alpn:
        preferences = [protocol.encode() for protocol in tls.alpn]
        context.set_alpn_select_callback(lambda connection, offered: _select(preferences, offered))
    return context


def client_context(upstream: UpstreamTLSConfig) -> SSL.Context:
    """The context that originates TLS to a route's target."""
    if (upstream.cert is None) != (upstream.key is None):
        given = upstream.cert or upstream.key or ""
        raise TLSSetupError(given, f"{given}: a client certificate needs both cert and key")
    context = _context(SSL.TLS_CLIENT_METHOD, upstream.min_version)
    if upstream.cert and upstream.key:
        use_identity(context, upstream.cert, upstream.key, None)
    if upstream.ca:
        load_certificates(upstream.ca)  # checked even where verify is false: a typo stays one
    if upstream.verify:
        if upstream.ca:
            context.load_verify_locations(upstream.ca)
        else:
            # OpenSSL's default paths; with cryptography's own OpenSSL build,
            # pyOpenSSL falls back to the distribution's bundle
            # (/etc/ssl/certs/ca-certificates.crt on Debian).
            context.set_default_verify_paths()
        context.set_verify(SSL.VERIFY_PEER, note_failure)
    if upstream.alpn:
        context.set_alpn_protos([protocol.encode() for protocol in upstream.alpn])
    return context


def file_digest(*paths: str | None) -> str:
    """SHA-256 over the files' bytes (C{None}s skipped), to notice a renewed certificate."""
    digest = hashlib.sha256()
    for path in paths:
        if path is not None:
            data = _read(path)
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)
    return digest.hexdigest()


def verify_server(connection: SSL.Connection, server_name: str) -> None:
    """
    Check that the certificate the target presented is for C{server_name},
    a host name or an IP address; raise L{TLSVerificationError} saying
    which names it has instead.
    """
    try:
        if is_ip_literal(server_name):
            verify_ip_address(connection, server_name)
        else:
            verify_hostname(connection, server_name)
    except (VerificationError, CertificateError):
        certificate = connection.get_peer_certificate(as_cryptography=True)
        names = _subject_names(certificate) if certificate is not None else []
        has = ", ".join(names) if names else "no names"
        raise TLSVerificationError(f"certificate names {has}, not {server_name}") from None


def verify_failure(connection: SSL.Connection) -> str | None:
    """Why the peer's certificate failed verification on C{connection}, if it did."""
    error = _failures.get(connection)
    if error is None:
        return None
    return _VERIFY_ERRORS.get(error, f"X.509 error {error}")


# -- helpers


def _context(method: int, min_version: TLSVersion) -> SSL.Context:
    context = SSL.Context(method)
    context.set_min_proto_version(_VERSIONS[min_version])
    context.set_options(SSL.OP_NO_RENEGOTIATION)
    context.set_cipher_list(CIPHERS)
    return context


def use_identity(context: SSL.Context, cert_path: str, key_path: str, chain_path: str | None) -> None:
    """Load a certificate (its file may hold the chain too), its key and chain, checked."""
    certificates = load_certificates(cert_path)
    leaf = certificates[0]
    _check_validity(cert_path, leaf)
    key = _load_key(key_path)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise TLSSetupError(key_path, f"{key_path}: this key does not match the certificate in {cert_path}")
    context.use_certificate(leaf)
    context.use_privatekey(key)
    for intermediate in certificates[1:] + (load_certificates(chain_path) if chain_path else []):
        context.add_extra_chain_cert(intermediate)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSSetupError(path, f"{path}: cannot read: {e.strerror}") from None


def load_certificates(path: str) -> list[x509.Certificate]:
    data = _read(path)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSSetupError(path, f"{path}: not a PEM certificate file") from None


def _load_key(path: str) -> SigningKey:
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSSetupError(path, f"{path}: the key is encrypted; give it without a passphrase") from None
    except (ValueError, crypto.Error):
        raise TLSSetupError(path, f"{path}: not a PEM private key") from None
    if not isinstance(key, _SIGNING_KEYS):
        raise TLSSetupError(path, f"{path}: a {type(key).__name__} cannot sign a TLS handshake")
    return key


def _check_validity(path: str, certificate: x509.Certificate) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    if certificate.not_valid_after_utc < now:
        when = certificate.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
        raise TLSSetupError(path, f"{path}: the certificate expired on {when}")
    if certificate.not_valid_before_utc > now:
        when = certificate.not_valid_before_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
        raise TLSSetupError(path, f"{path}: the certificate is not valid before {when}")


def note_failure(connection: SSL.Connection, certificate: crypto.X509, error: int, depth: int, ok: int) -> bool:
    """OpenSSL's verdict, unchanged; the first error is kept for L{verify_failure}."""
    if not ok:
        _failures.setdefault(connection, error)
    return bool(ok)


def _select(preferences: list[bytes], offered: list[bytes]) -> bytes | _NoOverlappingProtocols:
    """The server's first preference that the client offers; none: no ALPN, no failure."""
    for protocol in preferences:
        if protocol in offered:
            return protocol
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _subject_names(certificate: x509.Certificate) -> Sequence[str]:
    """What a certificate is for: its subjectAltName entries, else its subject CN."""
    try:
        alternatives = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return alternatives.get_values_for_type(x509.DNSName) + [
        str(address) for address in alternatives.get_values_for_type(x509.IPAddress)
    ]
