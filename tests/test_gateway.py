"""
The encrypted-target gateway end to end: lines made by the real C{openssl enc}
command (and by C{gateway-encrypt}), sent by real clients through a real
C{twistd -n streamrelay} process, every status answered for real.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamrelay.config import ConfigError, load_config, parse_config
from streamrelay.dump import describe, dump
from tests.harness import Relay, Target, connect, connect_from, recv_all, recv_exactly, write_config

SECRET = "p0S8rX680*48"
#: The C{openssl enc} options for each C{kdf}.
OPENSSL_KDF = {"sha256": ["-md", "sha256"], "md5": ["-md", "md5"], "pbkdf2": ["-pbkdf2", "-iter", "1000"]}

ROUTES = """\
routes:
{routes}
"""


def gateway_route(name: str, **gateway: object) -> str:
    settings = {
        "secret_file": "secret", "timeout": "300ms", "line_timeout": "300ms", "max_line": 128,
        "max_failures": 0, "allow_targets": '["127.0.0.1:*"]', **gateway,
    }
    block = "".join(f"      {k}: {v}\n" for k, v in settings.items())
    return f"  {name}:\n    scheme: tcp4\n    bind: 127.0.0.1\n    port: 0\n    gateway:\n{block}"


def openssl_line(target: str, kdf: str = "sha256", secret: str = SECRET) -> bytes:
    """What C{openssl enc -aes-256-cbc -salt -a -k SECRET} writes for C{target}."""
    return subprocess.run(
        ["openssl", "enc", "-e", "-aes-256-cbc", "-salt", "-a", "-k", secret, *OPENSSL_KDF[kdf]],
        input=target.encode(), capture_output=True, check=True,
    ).stdout.strip()


def gateway_encrypt(directory: Path, target: str, *options: str) -> bytes:
    return subprocess.run(
        [sys.executable, "-m", "streamrelay", "gateway-encrypt", "--secret-file", str(directory / "secret"),
         *options, target],
        capture_output=True, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    ).stdout.strip()


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    with Target() as echo_target:
        yield echo_target


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Relay, Path]]:
    directory = tmp_path_factory.mktemp("gateway")
    (directory / "secret").write_text(SECRET + "\n")
    routes = [
        gateway_route("sha256"), gateway_route("md5", kdf="md5"),
        gateway_route("pbkdf2", kdf="pbkdf2", iterations=1000), gateway_route("sealed", format="sealed"),
        gateway_route("ban", max_failures=3, failure_window="1m", ban_time="1m"),
    ]
    with Relay(write_config(directory, ROUTES.format(routes="".join(routes)))) as relay:
        yield relay, directory


def exchange(port: int, data: bytes, source: str = "127.0.0.1") -> socket.socket:
    sock = connect_from(source, port)
    sock.sendall(data)
    return sock


def answer_and_close(port: int, data: bytes, source: str = "127.0.0.1") -> bytes:
    """Everything the gateway says to a client sending C{data}, until it closes."""
    with exchange(port, data, source) as sock:
        return recv_all(sock)


@pytest.mark.parametrize("kdf", ["sha256", "md5", "pbkdf2"])
def test_openssl_lines_of_every_kdf_reach_the_target(gateway, target: Target, kdf: str) -> None:
    relay, _ = gateway
    line = openssl_line(f"127.0.0.1:{target.port}", kdf)
    with exchange(relay.ports[kdf], line + b"\r\nfirst bytes") as sock:
        # The bytes sent right after the line reach the target first, after the 200.
        assert recv_exactly(sock, 15) == b"200\nfirst bytes"
        sock.sendall(b" and more")
        assert recv_exactly(sock, 9) == b" and more"


def test_gateway_encrypt_lines_decrypt_with_openssl_and_are_accepted(gateway, target: Target) -> None:
    relay, directory = gateway
    line = gateway_encrypt(directory, f"127.0.0.1:{target.port}", "--kdf", "md5")
    decrypted = subprocess.run(
        ["openssl", "enc", "-d", "-aes-256-cbc", "-a", "-k", SECRET, "-md", "md5"],
        input=line + b"\n", capture_output=True, check=True,
    ).stdout
    assert decrypted == f"127.0.0.1:{target.port}".encode()
    with exchange(relay.ports["md5"], line + b"\n") as sock:
        assert recv_exactly(sock, 4) == b"200\n"


def test_sixteen_mib_both_ways(gateway, target: Target) -> None:
    relay, _ = gateway
    payload = os.urandom(16 << 20)
    with exchange(relay.ports["sha256"], openssl_line(f"127.0.0.1:{target.port}") + b"\n") as sock:
        assert recv_exactly(sock, 4) == b"200\n"
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        echoed = recv_all(sock)
        sender.join()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


def test_sealed_lines_accepted_and_a_flipped_byte_refused(gateway, target: Target) -> None:
    relay, directory = gateway
    line = gateway_encrypt(directory, f"127.0.0.1:{target.port}", "--format", "sealed")
    with exchange(relay.ports["sealed"], line + b"\n") as sock:
        assert recv_exactly(sock, 4) == b"200\n"
    raw = bytearray(base64.b64decode(line))
    raw[-20] ^= 1  # inside the ciphertext: the tag no longer matches
    assert answer_and_close(relay.ports["sealed"], base64.b64encode(raw) + b"\n") == b"401\n"
    # An openssl line is no sealed line either.
    assert answer_and_close(relay.ports["sealed"], openssl_line(f"127.0.0.1:{target.port}") + b"\n") == b"401\n"


def test_forgeries_answered_exactly_like_a_wrong_secret(gateway, target: Target) -> None:
    """A wrong secret, a CBC bit flip, and a target outside allow_targets: one answer, no dial."""
    relay, _ = gateway
    port = relay.ports["sha256"]
    accepted_before = target.accepted
    wrong_secret = openssl_line(f"127.0.0.1:{target.port}", secret="not the secret")
    raw = bytearray(base64.b64decode(openssl_line(f"127.0.0.1:{target.port}")))
    raw[16] ^= 0x80  # the first ciphertext block
    outside = openssl_line("127.0.0.2:22")
    answers = [answer_and_close(port, line + b"\n") for line in (outside, wrong_secret, base64.b64encode(raw))]
    assert answers == [b"401\n"] * 3
    # Logged (the first of a second: refusals are throttled per kind).
    relay.wait_for("gateway", route="sha256", status=401, reason="target not in allow_targets")
    assert target.accepted == accepted_before
    assert not relay.actions("dial-failed", route="sha256")


def test_unreadable_lines_answered_400(gateway) -> None:
    relay, _ = gateway
    port = relay.ports["sha256"]
    assert answer_and_close(port, b"not base64 at all!\n") == b"400\n"
    assert answer_and_close(port, b"A" * 200) == b"400\n"  # no newline within max_line (128)
    with exchange(port, b"U2FsdGVkX1") as sock:  # the rest never comes: line_timeout
        assert recv_all(sock) == b"400\n"


def test_refused_target_answered_502(gateway) -> None:
    relay, _ = gateway
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        free_port = closed.getsockname()[1]
    assert answer_and_close(relay.ports["sha256"], openssl_line(f"127.0.0.1:{free_port}") + b"\n") == b"502\n"
    failed = relay.wait_for("dial-failed", route="sha256", target=f"127.0.0.1:{free_port}")
    assert "could not reach 127.0.0.1:" in failed[0]["text"]


def test_black_holed_target_answered_504(gateway) -> None:
    """A listener never accepting, its backlog full: the kernel drops further SYNs."""
    relay, _ = gateway
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=1):  # fills a backlog of 0
            assert answer_and_close(relay.ports["sha256"], openssl_line(f"127.0.0.1:{port}") + b"\n") == b"504\n"


def test_a_source_earning_max_failures_401s_is_banned(gateway, target: Target) -> None:
    relay, _ = gateway
    port = relay.ports["ban"]
    bad = openssl_line(f"127.0.0.1:{target.port}", secret="guess") + b"\n"
    for _ in range(3):
        assert answer_and_close(port, bad, source="127.0.0.7") == b"401\n"
    good = openssl_line(f"127.0.0.1:{target.port}") + b"\n"
    try:  # reset before its line is read: while connecting, sending or receiving
        assert answer_and_close(port, good, source="127.0.0.7") == b""
    except ConnectionResetError:
        pass
    [event] = relay.wait_for("banned", route="ban")
    assert event["client"].startswith("127.0.0.7:")
    with exchange(port, good) as sock:  # other sources go on
        assert recv_exactly(sock, 4) == b"200\n"


# ---------------------------------------------------------------- configuration


def parse_gateway(tmp_path: Path, block: str) -> object:
    return parse_config(
        f"routes:\n  gw:\n    scheme: tcp\n    port: 7000\n    gateway: {block}\n", str(tmp_path / "routes.yml")
    ).routes[0].gateway


@pytest.mark.parametrize(("block", "message"), [
    ('{secret_file: secret}', "allow_targets"),
    ('{secret_file: empty, allow_targets: [any]}', "missing or empty"),
    ('{secret_file: absent, allow_targets: [any]}', "cannot read the secret"),
    ('{secret_env: STREAMRELAY_TEST_UNSET, allow_targets: [any]}', "missing or empty"),
    ('{allow_targets: [any]}', "secret_file"),
    ('{secret_file: secret, allow_targets: ["10.0.0.1/8:22"]}', "no host bits"),
    ('{secret_file: secret, allow_targets: ["::1:22"]}', "NETWORK:PORTS"),
    ('{secret_file: secret, allow_targets: ["10.0.0.0/8:0-70000"]}', "NETWORK:PORTS"),
])
def test_bad_gateway_blocks_name_the_field(tmp_path: Path, block: str, message: str) -> None:
    (tmp_path / "secret").write_text("s")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=message):
        parse_gateway(tmp_path, block)


def test_secret_from_the_environment_and_target_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMRELAY_TEST_SECRET", "from env")
    settings = parse_gateway(tmp_path, '{secret_env: STREAMRELAY_TEST_SECRET, allow_targets: ["10.0.0.0/8:22,8000-8100", "[fd00::/8]:*"]}')
    assert settings.secret == b"from env" and "from env" not in repr(settings)
    allowed = [rule.allows(ipaddress.ip_address(host), port) for rule in settings.allow_targets
               for host, port in [("10.1.2.3", 8050), ("10.1.2.3", 23), ("fd00::1", 1), ("11.0.0.1", 22)]]
    assert allowed == [True, False, False, False, False, False, True, False]


def test_check_line_and_dump_round_trip(tmp_path: Path) -> None:
    """C{--dump} writes where the secret is, never the secret, and loads back the same route."""
    (tmp_path / "secret").write_text(SECRET)
    original = load_config(str(write_config(tmp_path, ROUTES.format(routes=gateway_route("gw", format="sealed")))))
    assert describe(original.routes[0]) == "gw: tcp4 127.0.0.1:0 -> gateway (sealed, 1 allow_targets) (splice auto)"
    text = dump(original)
    assert SECRET not in text
    again = load_config(str(write_config(tmp_path, text, "dumped.yml")))
    assert again.routes == original.routes
