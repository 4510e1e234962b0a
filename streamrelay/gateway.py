"""
The encrypted-target gateway (frontd's protocol): a route with no fixed
target, whose clients send one line, base64 of their target's C{host:port}
encrypted with a secret only the gateway and the operator hold.

Two line formats:

- C{openssl}: what C{openssl enc -aes-256-cbc -salt -a -k SECRET} writes
  (C{Salted__}, an 8-byte salt, AES-256-CBC with key and IV derived from the
  secret by EVP_BytesToKey over SHA-256 or MD5, or by PBKDF2-HMAC-SHA256).
  CBC has no MAC, so anyone who can connect can try forged lines: every
  failure therefore gets the same answer after the same work, only targets
  in C{allow_targets} are ever dialed, and a source that keeps failing is
  banned for a while.
- C{sealed}: AES-256-GCM with a random 12-byte nonce, under a key derived
  once from the secret; a forged or altered line fails authentication.

L{Gateway} is one route's reader of lines: the decryption, the check
against C{allow_targets}, a bounded LRU cache of lines already read, and the
table of failing sources.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final, Literal, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet.interfaces import IReactorTime

__all__ = [
    "BAD_LINE", "DENIED", "DIAL_FAILED", "DIAL_TIMEOUT", "OK", "Gateway", "GatewayConfig", "TargetRule",
    "decrypt", "encrypt", "parse_target_rule",
]

Kdf = Literal["sha256", "md5", "pbkdf2"]
LineFormat = Literal["openssl", "sealed"]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Target = tuple[str, int]
#: A line's refusal: the status to answer, and why (for the log only).
Refusal = tuple[int, str]

#: The answers, as the client reads them (three digits and a newline).
OK: Final = 200
BAD_LINE: Final = 400  # no line within max_line or line_timeout, or not base64
DENIED: Final = 401  # did not decrypt to an allowed host:port
DIAL_FAILED: Final = 502
DIAL_TIMEOUT: Final = 504

_MAGIC = b"Salted__"
_SEALED_SALT = b"streamrelay gateway sealed v1"  # fixed: the key is derived once per secret
_SEALED_AAD = b"streamrelay gateway"
_NONCE = 12
#: What a malformed C{openssl} line is replaced with, so it costs the same
#: key derivation and decryption as a well-formed one.
_STAND_IN = _MAGIC + bytes(8) + bytes(32)
#: What a line that did not decrypt is checked as instead, so that a padding
#: error costs the same parsing and C{allow_targets} check as a bad address.
_STAND_IN_TARGET = b"0.0.0.0:1"
#: How many failing sources the ban table remembers at most.
MAX_TRACKED_SOURCES: Final = 65536


def answer(status: int) -> bytes:
    """A status as written to the client."""
    return b"%d\n" % status


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class TargetRule:
    """One C{allow_targets} entry: a network and its ports (C{None}: any port)."""

    text: str
    network: Network | None  # None: "any"
    ports: tuple[tuple[int, int], ...] | None

    def allows(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        if self.network is not None and address not in self.network:
            return False
        return self.ports is None or any(low <= port <= high for low, high in self.ports)


_RULE = re.compile(r"\[(?P<v6>[^\]]+)\]:(?P<p6>[^:]+)|(?P<v4>[^:\[\]]+):(?P<p4>[^:]+)")


def parse_target_rule(text: object) -> TargetRule:
    """
    C{any}, or C{NETWORK:PORTS}: C{10.0.0.0/8:22}, C{10.1.2.3:27015-27030,8080},
    C{[fd00::/8]:*}.

    @raise ValueError: with what was expected.
    """
    expected = 'any, or NETWORK:PORTS such as "10.0.0.0/8:22,8000-8100" or "[fd00::/8]:*"'
    if not isinstance(text, str):
        raise ValueError(expected)
    if text == "any":
        return TargetRule("any", None, None)
    match = _RULE.fullmatch(text)
    if match is None:
        raise ValueError(expected)
    try:
        network = ipaddress.ip_network(match["v6"] or match["v4"], strict=True)
    except ValueError:
        raise ValueError(expected + " (the network with no host bits set)") from None
    if (match["v6"] is not None) != (network.version == 6):
        raise ValueError(expected + " (IPv6 networks in brackets)")
    spec = match["p6"] or match["p4"]
    if spec == "*":
        return TargetRule(text, network, None)
    ports = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        if not all(re.fullmatch(r"[1-9][0-9]{0,4}", p) for p in (low, high or low)):
            raise ValueError(expected)
        span = int(low), int(high or low)
        if not span[0] <= span[1] <= 65535:
            raise ValueError(expected + " (ports from 1 to 65535, ranges low-high)")
        ports.append(span)
    return TargetRule(text, network, tuple(ports))


@dataclass(frozen=True)
class GatewayConfig:
    """A route's C{gateway} block; C{secret} is read from C{secret_file} or C{secret_env}."""

    secret: bytes = field(repr=False)
    allow_targets: tuple[TargetRule, ...]
    secret_file: str | None = None
    secret_env: str | None = None
    format: LineFormat = "openssl"
    kdf: Kdf = "sha256"
    iterations: int = 10000
    retry: int = 1  # connection attempts
    timeout: float = 3.0  # per attempt
    line_timeout: float = 5.0
    max_line: int = 1024
    max_failures: int = 10  # 0: never ban
    failure_window: float = 60.0
    ban_time: float = 600.0
    cache_size: int = 4096


# ------------------------------------------------------------ cryptography


def _openssl_key_iv(secret: bytes, salt: bytes, kdf: Kdf, iterations: int) -> tuple[bytes, bytes]:
    """Key and IV as C{openssl enc -k} derives them (EVP_BytesToKey, one round, or PBKDF2)."""
    if kdf == "pbkdf2":
        material = hashlib.pbkdf2_hmac("sha256", secret, salt, iterations, 48)
    else:
        material, block = b"", b""
        while len(material) < 48:
            block = hashlib.new(kdf, block + secret + salt).digest()
            material += block
    return material[:32], material[32:48]


def sealed_key(secret: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", secret, _SEALED_SALT, iterations, 32)


def encrypt(plaintext: bytes, settings: GatewayConfig) -> bytes:
    """A line (base64, without its newline) for C{plaintext}, in the settings' format."""
    if settings.format == "sealed":
        nonce = os.urandom(_NONCE)
        sealed = AESGCM(sealed_key(settings.secret, settings.iterations)).encrypt(nonce, plaintext, _SEALED_AAD)
        return base64.b64encode(nonce + sealed)
    salt = os.urandom(8)
    key, iv = _openssl_key_iv(settings.secret, salt, settings.kdf, settings.iterations)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return base64.b64encode(_MAGIC + salt + encryptor.update(padded) + encryptor.finalize())


def decrypt(raw: bytes, settings: GatewayConfig, key: bytes = b"") -> bytes | None:
    """
    The plaintext of a decoded line, or C{None}.  An C{openssl} line always
    costs one key derivation and one decryption, whatever is wrong with it.
    """
    if settings.format == "sealed":
        try:
            return AESGCM(key or sealed_key(settings.secret, settings.iterations)).decrypt(
                raw[:_NONCE], raw[_NONCE:], _SEALED_AAD
            )
        except (InvalidTag, ValueError):
            return None
    well_formed = raw.startswith(_MAGIC) and len(raw) >= 32 and len(raw) % 16 == 0
    data = raw if well_formed else _STAND_IN
    key, iv = _openssl_key_iv(settings.secret, data[8:16], settings.kdf, settings.iterations)
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(data[16:]) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        plaintext = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        return None
    return plaintext if well_formed else None


_TARGET = re.compile(rb"\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})|([0-9.]+):([0-9]{1,5})")


def parse_target(plaintext: bytes) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """C{IPv4:port} or C{[IPv6]:port}, or C{None}."""
    match = _TARGET.fullmatch(plaintext.strip())
    if match is None:
        return None
    try:
        address = ipaddress.ip_address((match[1] or match[3]).decode("ascii"))
    except ValueError:
        return None
    port = int(match[2] or match[4])
    return (address, port) if 0 < port <= 65535 else None


# ---------------------------------------------------------------- runtime


class Gateway:
    """
    One route's line reader: what a line says, whether its sender may still
    try, and the lines already read.
    """

    def __init__(self, settings: GatewayConfig, clock: IReactorTime) -> None:
        self.settings = settings
        self.clock = clock
        self.key = sealed_key(settings.secret, settings.iterations) if settings.format == "sealed" else b""
        self.cache: OrderedDict[bytes, Target] = OrderedDict()
        #: Failing sources: their recent failure times, oldest first.
        self.failures: OrderedDict[str, list[float]] = OrderedDict()
        self.banned_until: dict[str, float] = {}

    def banned(self, host: str) -> bool:
        until = self.banned_until.get(host)
        if until is None:
            return False
        if until > self.clock.seconds():
            return True
        del self.banned_until[host]
        return False

    def read(self, line: bytes, host: str) -> Target | Refusal:
        """The target C{line} names, or the status to answer (400, or 401 counted against C{host})."""
        line = line.removesuffix(b"\r")
        target = self.cache.get(line)
        if target is not None:
            self.cache.move_to_end(line)
            return target
        try:
            raw = base64.b64decode(line, validate=True)
        except binascii.Error:
            return BAD_LINE, "line not base64"
        plaintext = decrypt(raw, self.settings, self.key)
        parsed = parse_target(_STAND_IN_TARGET if plaintext is None else plaintext)
        allowed = parsed is not None and any(rule.allows(*parsed) for rule in self.settings.allow_targets)
        if plaintext is None or parsed is None or not allowed:
            why = "target not in allow_targets" if plaintext and parsed else "line did not decrypt to IP:port"
            if self.failed(host):
                why += f"; source banned for {self.settings.ban_time:g}s"
            return DENIED, why
        target = (str(parsed[0]), parsed[1])
        self.cache[line] = target
        if len(self.cache) > self.settings.cache_size:
            self.cache.popitem(last=False)
        return target

    def failed(self, host: str) -> bool:
        """Count a 401 against C{host}; ban it (and say so) at C{max_failures} within C{failure_window}."""
        settings = self.settings
        if not settings.max_failures:
            return False
        now = self.clock.seconds()
        times = [t for t in self.failures.pop(host, []) if t > now - settings.failure_window]
        times.append(now)
        if len(times) >= settings.max_failures:
            self.banned_until[host] = now + settings.ban_time
            return True
        self.failures[host] = times
        if len(self.failures) > MAX_TRACKED_SOURCES:
            self.failures.popitem(last=False)
        return False
