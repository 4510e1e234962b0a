"""
The PROXY v2 TLS TLVs against HAProxy itself: a real C{haproxy} terminates
TLS (SNI, ALPN, client certificates) and sends C{send-proxy-v2-ssl-cn} with
every TLS option to a plain socket; the parser must read what HAProxy
means, and L{tls_tlvs} given the same facts must produce the same bytes.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from streamrelay.proxyproto import SSLInfo, build_v2, parse, tls_tlvs
from streamrelay.proxyproto.info import VERIFY_FAILED
from tests.harness import DEADLINE, HAProxy, Target, free_port, needs_haproxy, poll

pytestmark = needs_haproxy

SERVER_NAME = "x.example"
ALPN = "h2"
#: What HAProxy reports for the RSA 2048 certificate signed with SHA-256
#: that L{haproxy} presents: the spec's own examples.
SIG_ALG, KEY_ALG = "RSA-SHA256", "RSA2048"


def self_signed(directory: Path, name: str, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> Path:
    """
    Write a self-signed certificate for C{name} and its key to one PEM file
    (as HAProxy's C{crt} and Python's C{load_cert_chain} both take it).
    """
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


class RawHeaderTarget(Target):
    """
    Records the bytes of each v2 header it receives, delimited by the
    header's own length field rather than by the parser under test.
    """

    def __init__(self) -> None:
        self.headers: list[bytes] = []
        super().__init__(self.record)

    async def record(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fixed = await reader.readexactly(16)
        self.headers.append(fixed + await reader.readexactly(int.from_bytes(fixed[14:], "big")))
        await reader.read()

    def header_from(self, port: int) -> bytes:
        """
        The header of the connection whose client used source C{port} (in
        an IPv4 header, bytes 24-25: after the fixed part and two addresses).
        """
        return poll(lambda: next((h for h in list(self.headers) if h[24:26] == port.to_bytes(2, "big")), None))


@dataclass
class Rig:
    front: int
    target: RawHeaderTarget
    trusted: Path
    stranger: Path


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """
    One HAProxy for the module: TLS on C{front} with ALPN, client
    certificates optional (C{trusted} verifies, C{stranger} does not but is
    let through), every TLS TLV sent on to the target.
    """
    directory = tmp_path_factory.mktemp("haproxy")
    server = self_signed(directory, "relay.example", rsa.generate_private_key(65537, 2048))
    trusted = self_signed(directory, "client.example", ec.generate_private_key(ec.SECP256R1()))
    stranger = self_signed(directory, "stranger.example", ec.generate_private_key(ec.SECP256R1()))
    front = free_port()
    with RawHeaderTarget() as target:
        body = (
            f"frontend tls\n  mode tcp\n"
            f"  bind 127.0.0.1:{front} ssl crt {server} alpn {ALPN},http/1.1 ca-file {trusted}"
            " verify optional ca-ignore-err all crt-ignore-err all\n"
            "  default_backend header\n"
            f"backend header\n  mode tcp\n  server target 127.0.0.1:{target.port} send-proxy-v2-ssl-cn"
            " proxy-v2-options authority,ssl-cipher,cert-sig,cert-key\n"
        )
        with HAProxy(directory, body) as haproxy:
            haproxy.wait_listening(front)
            yield Rig(front, target, trusted, stranger)


def through_haproxy(rig: Rig, certificate: Path | None, version: ssl.TLSVersion) -> tuple[bytes, ssl.SSLSocket]:
    """
    Connect to HAProxy over TLS C{version} as a client asking for
    L{SERVER_NAME} and L{ALPN}, optionally presenting C{certificate}; return
    the header the target got for this connection and the (still open) TLS
    socket.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = version
    context.set_alpn_protocols([ALPN])
    if certificate is not None:
        context.load_cert_chain(certificate)
    tls = context.wrap_socket(socket.create_connection(("127.0.0.1", rig.front), DEADLINE), server_hostname=SERVER_NAME)
    return rig.target.header_from(tls.getsockname()[1]), tls


def expected_ssl(tls: ssl.SSLSocket, cn: str | None, verified: bool) -> SSLInfo:
    """The facts the client side knows, as the relay would give them."""
    cipher = tls.cipher()
    assert cipher is not None
    return SSLInfo(
        client_ssl=True, client_cert_conn=cn is not None, client_cert_sess=cn is not None, verified=verified,
        version=tls.version(), cipher=cipher[0], sig_alg=SIG_ALG, key_alg=KEY_ALG, cn=cn,
    )


@pytest.mark.parametrize(
    "who, cn, verified, version",
    [
        pytest.param("anonymous", None, False, ssl.TLSVersion.TLSv1_3, id="anonymous"),
        pytest.param("trusted", "client.example", True, ssl.TLSVersion.TLSv1_3, id="trusted"),
        pytest.param("stranger", "stranger.example", False, ssl.TLSVersion.TLSv1_3, id="stranger"),
        pytest.param("trusted", "client.example", True, ssl.TLSVersion.TLSv1_2, id="trusted-tls1.2"),
    ],
)
def test_haproxy_header_parses_and_is_what_we_build(
    rig: Rig, who: str, cn: str | None, verified: bool, version: ssl.TLSVersion
) -> None:
    certificate = None if who == "anonymous" else getattr(rig, who)
    received, tls = through_haproxy(rig, certificate, version)
    with tls:
        ssl_info = expected_ssl(tls, cn, verified)
        client = tls.getsockname()[:2]
    info, length = parse(received)
    assert length == len(received)
    assert (info.source, info.destination) == (client, ("127.0.0.1", rig.front))
    assert (info.authority, info.alpn, info.ssl, info.vendor) == (SERVER_NAME, ALPN, ssl_info, {})

    tlvs = tls_tlvs(authority=SERVER_NAME, alpn=ALPN, ssl=ssl_info)
    # ALPN, AUTHORITY, then SSL: its client bits, then verify.
    verify_at = 16 + 12 + sum(3 + len(value) for _, value in tlvs[:2]) + 3 + 1
    verify = int.from_bytes(received[verify_at : verify_at + 4], "big")
    if who == "stranger":
        # HAProxy sends OpenSSL's reason (18, a self-signed certificate);
        # the relay knows only that it failed.
        assert verify not in (0, VERIFY_FAILED)
        received = received[:verify_at] + VERIFY_FAILED.to_bytes(4, "big") + received[verify_at + 4 :]
    else:
        # Zero when the certificate verified, and zero without one.
        assert verify == 0
    assert build_v2(client, ("127.0.0.1", rig.front), tlvs=tlvs) == received
