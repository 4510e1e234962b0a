"""
A throwaway certificate authority for the TLS tests: a CA (RSA or ECDSA)
that issues server certificates for DNS names and IP addresses, client
certificates with a CN, intermediates, and certificates outside their
validity, each written as PEM files into a directory.

Import the fixtures into a test module to use them (pytest finds fixtures
in the modules that use them or in conftest.py)::

    from tests.tls_ca import TestCA, ecdsa_ca, other_ca, tls_ca  # noqa: F401

RSA keys take tens of milliseconds to make, so leaf certificates share one
key per type unless given their own (L{new_key}).
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Issued", "KeyType", "TestCA", "ecdsa_ca", "new_key", "other_ca", "tls_ca"]

KeyType = Literal["rsa", "ec"]
Key = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]

DAY = datetime.timedelta(days=1)
_serials = itertools.count(1000)


def new_key(kind: KeyType = "rsa") -> Key:
    """A fresh key: RSA 2048 or ECDSA P-256."""
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


@functools.cache
def shared_key(kind: KeyType) -> Key:
    """The key leaf certificates of C{kind} share."""
    return new_key(kind)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files (C{chain}: the intermediates above it, if any)."""

    cert: Path
    key: Path
    certificate: x509.Certificate
    chain: Path | None = None


class TestCA:
    """A CA whose certificate is C{cert} (a PEM file in C{directory})."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(
        self, directory: Path, name: str = "streamrelay test CA", key_type: KeyType = "rsa",
        issuer: TestCA | None = None,
    ) -> None:
        self.directory = directory
        self.name = name
        self.key = new_key(key_type)
        self.issuer = issuer
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(self.key.public_key())
            .serial_number(next(_serials))
            .not_valid_before(now - DAY)
            .not_valid_after(now + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
        )
        if issuer is None:
            self.certificate = builder.issuer_name(subject).sign(self.key, hashes.SHA256())
        else:
            self.certificate = issuer.sign(builder)
        self.cert = self.write(f"{self.slug}.crt", self.certificate)

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "-")

    def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Issue C{builder}'s certificate under this CA."""
        return (
            builder.issuer_name(self.certificate.subject)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def intermediate(self, name: str, key_type: KeyType = "rsa") -> TestCA:
        """A CA below this one: its leaves need its certificate sent as their chain."""
        return TestCA(self.directory, name, key_type, issuer=self)

    def server(
        self, *names: str, key_type: KeyType = "rsa", key: Key | None = None,
        not_before: datetime.datetime | None = None, not_after: datetime.datetime | None = None,
        file_name: str | None = None,
    ) -> Issued:
        """A server certificate for DNS names and IP addresses (the first is also its CN)."""
        alternatives: list[x509.GeneralName] = []
        for name in names:
            try:
                alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternatives.append(x509.DNSName(name))
        return self.issue(
            names[0], key or shared_key(key_type), ExtendedKeyUsageOID.SERVER_AUTH, alternatives,
            not_before, not_after, file_name or f"server-{names[0]}-{key_type}",
        )

    def client(self, cn: str, key_type: KeyType = "rsa", key: Key | None = None) -> Issued:
        """A client certificate whose subject CN is C{cn}."""
        return self.issue(cn, key or shared_key(key_type), ExtendedKeyUsageOID.CLIENT_AUTH, [], None, None,
                          f"client-{cn}-{key_type}")

    def expired(self, *names: str) -> Issued:
        """A server certificate that expired yesterday."""
        now = datetime.datetime.now(datetime.timezone.utc)
        return self.server(*names, not_before=now - 30 * DAY, not_after=now - DAY, file_name=f"expired-{names[0]}")

    def issue(
        self, cn: str, key: Key, usage: x509.ObjectIdentifier, alternatives: list[x509.GeneralName],
        not_before: datetime.datetime | None, not_after: datetime.datetime | None, stem: str,
    ) -> Issued:
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .public_key(key.public_key())
            .serial_number(next(_serials))
            .not_valid_before(not_before or now - DAY)
            .not_valid_after(not_after or now + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if alternatives:
            builder = builder.add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        certificate = self.sign(builder)
        stem = f"{self.slug}-{stem}"
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        key_path = self.directory / f"{stem}.key"
        key_path.write_bytes(key_pem)
        chain = self.write(f"{stem}.chain.crt", *self.intermediates()) if self.issuer is not None else None
        return Issued(self.write(f"{stem}.crt", certificate), key_path, certificate, chain)

    def intermediates(self) -> Iterator[x509.Certificate]:
        """This CA's certificate and those above it, but for the root."""
        ca: TestCA | None = self
        while ca is not None and ca.issuer is not None:
            yield ca.certificate
            ca = ca.issuer

    def write(self, file_name: str, *certificates: x509.Certificate) -> Path:
        path = self.directory / file_name
        path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates))
        return path


@pytest.fixture(scope="session")
def tls_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """The CA the tests' servers and clients trust."""
    return TestCA(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A CA nobody trusts, with a name of its own."""
    return TestCA(tmp_path_factory.mktemp("tls-other"), "untrusted test CA")


@pytest.fixture(scope="session")
def ecdsa_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A trusted CA whose own key is ECDSA P-256 (for ECDSA chains end to end)."""
    return TestCA(tmp_path_factory.mktemp("tls-ecdsa"), "ecdsa test CA", key_type="ec")
