"""
Building a route's TLS contexts: every file mistake is a TLSSetupError that
names the file, and the contexts that load do what the configuration says
(checked with in-memory handshakes between two pyOpenSSL connections).
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from streamrelay.config import TLSConfig, UpstreamTLSConfig
from streamrelay.tlscontext import (
    TLSSetupError, TLSVerificationError, client_context, file_digest, server_context, verify_failure, verify_server,
)
from tests.tls_ca import Issued, TestCA, new_key, other_ca, tls_ca  # noqa: F401  (fixtures)


def handshake(server: SSL.Context, client: SSL.Context) -> tuple[SSL.Connection, SSL.Connection]:
    """Both ends of a completed handshake, run in memory; an OpenSSL error if it fails."""
    accepting, connecting = SSL.Connection(server), SSL.Connection(client)
    run(accepting, connecting)
    return accepting, connecting


def run(accepting: SSL.Connection, connecting: SSL.Connection) -> None:
    """Pass each side's bytes to the other until both have completed the handshake."""
    accepting.set_accept_state()
    connecting.set_connect_state()
    done = set()
    for _ in range(20):
        for this, other in ((connecting, accepting), (accepting, connecting)):
            try:
                this.do_handshake()
                done.add(this)
            except SSL.WantReadError:
                pass
            try:
                other.bio_write(this.bio_read(1 << 20))
            except SSL.WantReadError:
                pass
        if len(done) == 2:
            return
    raise AssertionError("the handshake did not complete")


def trusting(ca: TestCA, **fields: Any) -> SSL.Context:
    return client_context(UpstreamTLSConfig(ca=str(ca.cert), **fields))


def tls(issued: Issued, **fields: Any) -> TLSConfig:
    return TLSConfig(cert=str(issued.cert), key=str(issued.key), **fields)


@pytest.fixture
def issued(tls_ca: TestCA) -> Issued:
    return tls_ca.server("db.example", "192.0.2.1")


# -- what loads


def test_a_certificate_and_its_chain(tls_ca: TestCA) -> None:
    intermediate = tls_ca.intermediate("issuing test CA")
    leaf = intermediate.server("db.example")
    assert leaf.chain is not None
    server, client = handshake(server_context(tls(leaf, chain=str(leaf.chain))), trusting(tls_ca))
    assert [c.subject for c in client.get_peer_cert_chain(as_cryptography=True)] == [
        leaf.certificate.subject, intermediate.certificate.subject,
    ]
    # The chain may as well follow the certificate in its own file.
    combined = leaf.cert.with_suffix(".full.crt")
    combined.write_bytes(leaf.cert.read_bytes() + leaf.chain.read_bytes())
    handshake(server_context(TLSConfig(cert=str(combined), key=str(leaf.key))), trusting(tls_ca))
    with pytest.raises(SSL.Error):  # without it, the client cannot reach its root
        handshake(server_context(tls(leaf)), trusting(tls_ca))


def test_min_version(issued: Issued, tls_ca: TestCA) -> None:
    server, client = handshake(server_context(tls(issued)), trusting(tls_ca, min_version="1.2"))
    assert server.get_protocol_version_name() == "TLSv1.3"
    old = trusting(tls_ca)
    old.set_max_proto_version(SSL.TLS1_2_VERSION)
    handshake(server_context(tls(issued)), old)
    with pytest.raises(SSL.Error):
        handshake(server_context(tls(issued, min_version="1.3")), old)


def test_alpn_picks_the_servers_first_preference_the_client_offers(issued: Issued, tls_ca: TestCA) -> None:
    server_side = server_context(tls(issued, alpn=("h2", "http/1.1")))
    cases = [(("http/1.1", "h2"), b"h2"), (("http/1.1",), b"http/1.1"), (("imap",), b""), ((), b"")]
    for offered, chosen in cases:
        server, client = handshake(server_side, trusting(tls_ca, alpn=offered))
        assert (server.get_alpn_proto_negotiated(), client.get_alpn_proto_negotiated()) == (chosen, chosen)


@pytest.mark.parametrize("mode", ["optional", "require"])
def test_client_certificates(mode: str, issued: Issued, tls_ca: TestCA, other_ca: TestCA) -> None:
    server_side = server_context(tls(issued, client_ca=str(tls_ca.cert), verify_client=mode))
    alice = tls_ca.client("alice")
    server, _ = handshake(server_side, trusting(tls_ca, cert=str(alice.cert), key=str(alice.key)))
    peer = server.get_peer_certificate(as_cryptography=True)
    assert peer is not None and peer.subject == alice.certificate.subject
    mallory = other_ca.client("mallory")
    with pytest.raises(SSL.Error, match="certificate verify failed"):
        handshake(server_side, trusting(tls_ca, cert=str(mallory.cert), key=str(mallory.key)))
    if mode == "require":
        with pytest.raises(SSL.Error, match="peer did not return a certificate"):
            handshake(server_side, trusting(tls_ca))
    else:
        server, _ = handshake(server_side, trusting(tls_ca))
        assert server.get_peer_certificate() is None


def test_verification_failures_are_kept_in_an_operators_words(issued: Issued, other_ca: TestCA) -> None:
    connecting = SSL.Connection(trusting(other_ca))
    with pytest.raises(SSL.Error, match="certificate verify failed"):
        run(SSL.Connection(server_context(tls(issued))), connecting)
    assert verify_failure(connecting) == "unknown ca"

    expired = other_ca.expired("db.example")
    serving = SSL.Context(SSL.TLS_SERVER_METHOD)  # server_context refuses it; served anyway
    serving.use_certificate(expired.certificate)
    serving.use_privatekey(serialization.load_pem_private_key(expired.key.read_bytes(), None))
    connecting = SSL.Connection(trusting(other_ca))
    with pytest.raises(SSL.Error, match="certificate verify failed"):
        run(SSL.Connection(serving), connecting)
    assert verify_failure(connecting) == "certificate expired"

    _, connecting = handshake(server_context(tls(other_ca.server("db.example"))), trusting(other_ca))
    assert verify_failure(connecting) is None


def test_verify_server(tls_ca: TestCA) -> None:
    issued = tls_ca.server("db.example", "*.db.example", "192.0.2.1", "2001:db8::1")
    _, client = handshake(server_context(tls(issued)), trusting(tls_ca))
    for name in ("db.example", "a.db.example", "192.0.2.1", "2001:db8::1"):
        verify_server(client, name)
    for name, message in [
        ("other.example", "certificate names db.example, *.db.example, 192.0.2.1, 2001:db8::1, not other.example"),
        ("192.0.2.2", "certificate names db.example, *.db.example, 192.0.2.1, 2001:db8::1, not 192.0.2.2"),
    ]:
        with pytest.raises(TLSVerificationError) as raised:
            verify_server(client, name)
        assert str(raised.value) == message


def test_file_digest(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    first = file_digest(str(a), None, str(b))
    assert first == file_digest(str(a), str(b)) != file_digest(str(b), str(a))
    b.write_bytes(b"renewed")
    assert file_digest(str(a), str(b)) != first
    with pytest.raises(TLSSetupError) as raised:
        file_digest(str(tmp_path / "gone"))
    assert raised.value.path == str(tmp_path / "gone")


# -- what does not


def setup_error(build: Any, config: Any) -> TLSSetupError:
    with pytest.raises(TLSSetupError) as raised:
        build(config)
    error = raised.value
    if error.path:
        assert error.path in str(error)
    return error


def test_unreadable_and_non_pem_files(issued: Issued, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not PEM\n")
    cases = [
        (TLSConfig(cert=missing, key=str(issued.key)), missing, "cannot read: No such file or directory"),
        (TLSConfig(cert=str(garbage), key=str(issued.key)), str(garbage), "not a PEM certificate file"),
        (TLSConfig(cert=str(issued.cert), key=str(garbage)), str(garbage), "not a PEM private key"),
        (TLSConfig(cert=str(issued.cert), key=str(issued.cert)), str(issued.cert), "not a PEM private key"),
        (tls(issued, chain=str(garbage)), str(garbage), "not a PEM certificate file"),
        (tls(issued, client_ca=str(garbage), verify_client="require"), str(garbage), "not a PEM certificate file"),
        (tls(issued, client_ca=str(tmp_path), verify_client="require"), str(tmp_path), "cannot read: Is a directory"),
    ]
    for config, path, problem in cases:
        error = setup_error(server_context, config)
        assert (error.path, str(error)) == (path, f"{path}: {problem}")


def test_an_encrypted_key(issued: Issued, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(issued.key.read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    ))
    error = setup_error(server_context, TLSConfig(cert=str(issued.cert), key=str(locked)))
    assert str(error) == f"{locked}: the key is encrypted; give it without a passphrase"


def test_a_key_that_is_not_the_certificates(tls_ca: TestCA, issued: Issued) -> None:
    stranger = tls_ca.server("db.example", key=new_key("ec"), file_name="stranger")
    error = setup_error(server_context, TLSConfig(cert=str(issued.cert), key=str(stranger.key)))
    assert error.path == str(stranger.key)
    assert str(error) == f"{stranger.key}: this key does not match the certificate in {issued.cert}"


def test_certificates_outside_their_validity(tls_ca: TestCA) -> None:
    expired = tls_ca.expired("db.example")
    error = setup_error(server_context, tls(expired))
    day = expired.certificate.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert str(error) == f"{expired.cert}: the certificate expired on {day}"
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=2)
    early = tls_ca.server("db.example", not_before=later, file_name="early")
    error = setup_error(server_context, tls(early))
    assert str(error) == f"{early.cert}: the certificate is not valid before {later:%Y-%m-%d %H:%M:%S} UTC"
    assert error.path == str(early.cert)


def test_client_ca_and_verify_client_go_together(issued: Issued, tls_ca: TestCA) -> None:
    error = setup_error(server_context, tls(issued, verify_client="optional"))
    assert (error.path, str(error)) == ("", "verify_client optional needs a client_ca file")
    error = setup_error(server_context, tls(issued, client_ca=str(tls_ca.cert)))
    assert (error.path, str(error)) == (str(tls_ca.cert), f"{tls_ca.cert}: client_ca is set but verify_client is none")


def test_client_side_files(tls_ca: TestCA, tmp_path: Path) -> None:
    alice = tls_ca.client("alice")
    missing = str(tmp_path / "ca.pem")
    error = setup_error(client_context, UpstreamTLSConfig(ca=missing))
    assert str(error) == f"{missing}: cannot read: No such file or directory"
    error = setup_error(client_context, UpstreamTLSConfig(cert=str(alice.cert)))
    assert str(error) == f"{alice.cert}: a client certificate needs both cert and key"
    other = tls_ca.client("bob", key=new_key("ec"))
    error = setup_error(client_context, UpstreamTLSConfig(cert=str(alice.cert), key=str(other.key)))
    assert error.path == str(other.key)
    expired = tls_ca.expired("relay.example")
    error = setup_error(client_context, UpstreamTLSConfig(cert=str(expired.cert), key=str(expired.key)))
    assert error.path == str(expired.cert)
    error = setup_error(client_context, UpstreamTLSConfig(verify=False, ca=missing))  # unused, still checked
    assert str(error) == f"{missing}: cannot read: No such file or directory"
    client_context(UpstreamTLSConfig(ca=str(tls_ca.cert), cert=str(alice.cert), key=str(alice.key)))
