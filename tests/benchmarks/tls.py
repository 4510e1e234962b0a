"""
What the TLS workloads share: the certificates, the services a TLS relay
listens for, and the client.

A relay runs the TLS workloads in one or both L{MODES}: C{terminate} (it
holds the certificate and forwards plaintext to the plain targets) and
C{passthrough} (it forwards the TLS stream to the TLS target, HAProxy on the
load CPU, which terminates in front of the same plain targets).  Its TLS
routes are named by L{route}: one per mode and service.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.tls_ca import KeyType, TestCA

from .tools import HERE, LOOPBACK, compile_tool

MODES = ("terminate", "passthrough")
#: The TLS services: name -> (the plain target, a key of L{Targets.tcp}; the certificate's key type).
SERVICES: dict[str, tuple[str, KeyType]] = {
    "reply-rsa": ("reply", "rsa"), "reply-ec": ("reply", "ec"), "oneway": ("oneway", "ec"),
}
#: How the key types are named in the report.
KEY_NAMES: dict[KeyType, str] = {"rsa": "RSA 2048", "ec": "ECDSA P-256"}
#: The name clients send (SNI) and verify; every certificate is issued for it.
SERVER_NAME = "localhost"
OPENSSL_HEADER = Path("/usr/include/openssl/ssl.h")


def route(mode: str, service: str) -> str:
    """The name of a relay's TLS route (a key of L{Running.tcp})."""
    return f"{mode}-{service}"


@dataclass(frozen=True)
class Certificates:
    """A CA and a server certificate of each key type, as PEM files."""

    ca: Path
    cert: dict[KeyType, Path]
    key: dict[KeyType, Path]
    #: Certificate and key in one file, as HAProxy's C{crt} takes them.
    bundle: dict[KeyType, Path]

    @classmethod
    def make(cls, directory: Path) -> Certificates:
        directory.mkdir(exist_ok=True)
        ca = TestCA(directory, "benchmark CA")
        cert, key, bundle = {}, {}, {}
        for kind in KEY_NAMES:
            issued = ca.server(SERVER_NAME, LOOPBACK, key_type=kind)
            cert[kind], key[kind] = issued.cert, issued.key
            bundle[kind] = directory / f"{kind}.pem"
            bundle[kind].write_bytes(issued.cert.read_bytes() + issued.key.read_bytes())
        return cls(ca.cert, cert, key, bundle)

    def for_service(self, service: str) -> tuple[Path, Path, Path]:
        """The certificate, key and bundle a service's listener uses."""
        kind = SERVICES[service][1]
        return self.cert[kind], self.key[kind], self.bundle[kind]


@dataclass(frozen=True)
class Client:
    """The compiled TLS client (and the bulk target), and the CA it trusts."""

    binary: Path
    ca: Path

    @classmethod
    def build(cls, workdir: Path, ca: Path) -> Client:
        """Compile C{tlsload.c} (it needs L{OPENSSL_HEADER}) into C{workdir}."""
        return cls(compile_tool(workdir, HERE / "tlsload.c", "-lssl", "-lcrypto"), ca)

    def argv(self, mode: str, port: int, *args: object) -> list[str]:
        """C{tlsload MODE} against a loopback C{port}."""
        return [str(self.binary), mode, LOOPBACK, str(port), *map(str, args), str(self.ca), SERVER_NAME]
