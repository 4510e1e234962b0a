"""
Per-connection access control in GoDoxy's C{acl} format.

The list is consulted for every accepted TCP connection and every new UDP
source, so a check must not get slower as rules are added.  Rules are
therefore stored per address family as one dict per (verdict, prefix length),
keyed by the network number; a check costs one dict lookup per distinct prefix
length present, whatever the number of rules.

Evaluation order follows GoDoxy: with C{allow_local} (the default), loopback
and private addresses are admitted first, then deny rules are checked (deny
beats allow), then allow rules, then C{default}.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from socket import AF_INET, AF_INET6, inet_pton
from typing import Iterable, Mapping

__all__ = ["AccessList", "AclError", "Decision"]


class AclError(ValueError):
    """
    The C{acl} block is unusable.  The message starts with the field path
    inside the block (C{acl.deny[2]: ...}); the caller prefixes file and route.
    """


@dataclass(frozen=True)
class Decision:
    """The verdict for one client and the rule, as written, that decided it."""

    allowed: bool
    rule: str


# GoDoxy admits net.IP.IsLoopback() and, with allow_local, net.IP.IsPrivate()
# (internal/acl/config.go, Config.IPAllowed).  Link-local and CGNAT ranges are
# deliberately absent: GoDoxy treats them as public.
_LOCAL_NETWORKS = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::1/128",
    "fc00::/7",
)
_ALLOW_LOCAL = Decision(True, "allow_local")
_GEOIP_TYPES = ("country", "tz")
_RULE_TYPES = ("ip", "cidr")
_KEYS = ("default", "allow_local", "allow", "deny")
_V4_MAPPED = 0xFFFF  # value of the top 96 bits of ::ffff:a.b.c.d

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# One level per (verdict, prefix length): the shift that turns an address into
# its network number at that length, and the network numbers present.
_Levels = tuple[tuple[int, dict[int, Decision]], ...]


@dataclass(frozen=True)
class AccessList:
    """
    An immutable, validated C{acl} block.

    Equality and hashing use the settings and the rule texts, so two routes
    configured identically compare equal.  Build it with L{from_config} for
    values loaded from YAML, or call the constructor with the same fields.
    """

    default_allow: bool = True
    allow_local: bool = True
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    # Derived from the fields above by __post_init__, so left out of
    # equality: the lookup levels per address family, the verdict when no
    # rule matches, and that verdict again when no rule can match at all.
    _v4: _Levels = field(init=False, repr=False, compare=False)
    _v6: _Levels = field(init=False, repr=False, compare=False)
    _default: Decision = field(init=False, repr=False, compare=False)
    _constant: Decision | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        allow = tuple(self.allow)
        deny = tuple(self.deny)
        if not (self.allow_local or self.default_allow or allow):
            # GoDoxy refuses this too: it would turn every client away.
            raise AclError(
                "acl: default is deny, allow_local is false and acl.allow is empty,"
                " so every client would be refused"
            )
        local = [(ipaddress.ip_network(n), _ALLOW_LOCAL) for n in _LOCAL_NETWORKS]
        stages = [
            local if self.allow_local else [],
            _parse_rules("deny", deny, allowed=False),
            _parse_rules("allow", allow, allowed=True),
        ]
        v4 = _build_levels(stages, 4)
        v6 = _build_levels(stages, 6)
        verdict = "allow" if self.default_allow else "deny"
        default = Decision(self.default_allow, f"default {verdict}")
        set_ = object.__setattr__
        set_(self, "allow", allow)
        set_(self, "deny", deny)
        set_(self, "_v4", v4)
        set_(self, "_v6", v6)
        set_(self, "_default", default)
        # Nothing can match: skip even parsing the client address.
        set_(self, "_constant", default if not (v4 or v6) else None)

    @classmethod
    def from_config(cls, value: object) -> AccessList:
        """
        Validate the C{acl} value as loaded from YAML.

        A null value or key counts as absent, as it does in GoDoxy; an absent
        C{acl} block admits everyone (L{allow_all}).

        @raise AclError: naming the offending field or entry.
        """
        if value is None:
            return cls.allow_all()
        if not isinstance(value, Mapping):
            raise AclError(f"acl: expected a mapping, got {type(value).__name__}")
        unknown = [key for key in value if key not in _KEYS]
        if unknown:
            raise AclError(
                f"acl: unknown key {unknown[0]!r}; valid keys are {', '.join(_KEYS)}"
            )
        default = value.get("default")
        if default not in (None, "allow", "deny"):
            raise AclError(f"acl.default: expected 'allow' or 'deny', got {default!r}")
        allow_local = value.get("allow_local")
        if allow_local is not None and not isinstance(allow_local, bool):
            raise AclError(f"acl.allow_local: expected true or false, got {allow_local!r}")
        return cls(
            default_allow=default != "deny",
            allow_local=True if allow_local is None else allow_local,
            allow=_rule_list("allow", value.get("allow")),
            deny=_rule_list("deny", value.get("deny")),
        )

    @classmethod
    def allow_all(cls) -> AccessList:
        """The list that admits every client without looking at its address."""
        return _ALLOW_ALL

    @property
    def permits_everything(self) -> bool:
        """True if no client can be refused, so callers may skip L{check}."""
        return self.default_allow and not self.deny

    def check(self, host: str) -> Decision:
        """
        Decide for the client at C{host}, a textual IPv4 or IPv6 address.

        IPv4-mapped IPv6 addresses are checked as IPv4; a zone id is ignored.

        @raise ValueError: if C{host} is not an IP address (never raised when
            no rule can match, as the address is then not parsed).
        """
        if self._constant is not None:
            return self._constant
        try:
            if ":" in host:
                value = int.from_bytes(inet_pton(AF_INET6, host.partition("%")[0]), "big")
                if value >> 32 == _V4_MAPPED:
                    value &= 0xFFFFFFFF
                    levels = self._v4
                else:
                    levels = self._v6
            else:
                value = int.from_bytes(inet_pton(AF_INET, host), "big")
                levels = self._v4
        except OSError:
            raise ValueError(f"not an IP address: {host!r}") from None
        for shift, networks in levels:
            decision = networks.get(value >> shift)
            if decision is not None:
                return decision
        return self._default


def _rule_list(name: str, value: object) -> tuple[str, ...]:
    """Check that C{acl.<name>} is a list of strings; the rules are parsed later."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise AclError(f"acl.{name}: expected a list of rules, got {type(value).__name__}")
    for i, rule in enumerate(value):
        if not isinstance(rule, str):
            raise AclError(f"acl.{name}[{i}]: expected a string, got {type(rule).__name__}")
    return tuple(value)


def _parse_rules(
    name: str, rules: Iterable[str], *, allowed: bool
) -> list[tuple[_Network, Decision]]:
    """Parse C{acl.<name>}, pairing each network with the decision it yields."""
    verb = "allow" if allowed else "deny"
    return [
        (_parse_rule(f"acl.{name}[{i}]", rule), Decision(allowed, f"{verb} {rule}"))
        for i, rule in enumerate(rules)
    ]


def _parse_rule(path: str, rule: str) -> _Network:
    """
    Parse one C{ip:}, C{cidr:} or bare address/CIDR rule into a network.

    IPv4-mapped rules become IPv4 networks, because clients are unmapped
    before the lookup and would otherwise never match them.
    """
    kind, sep, body = rule.partition(":")
    if sep and kind in _GEOIP_TYPES:
        raise AclError(
            f"{path}: cannot use {rule!r}: {kind}: rules need a GeoIP database,"
            " which streamrelay does not support yet"
        )
    if not (sep and kind in _RULE_TYPES):
        kind, body = "", rule
    if "%" in body:
        raise AclError(f"{path}: {rule!r} has a zone id; rules cannot name an interface")
    if kind == "ip" and "/" in body:
        raise AclError(f"{path}: {rule!r} is a network; write it as cidr:{body}")
    try:
        network = ipaddress.ip_network(body)
    except ValueError:
        try:
            loose = ipaddress.ip_network(body, strict=False)
        except ValueError:
            raise AclError(f"{path}: {_unparsable(rule, kind)}") from None
        raise AclError(f"{path}: {rule!r} has host bits set; did you mean {loose}?") from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _unparsable(rule: str, kind: str) -> str:
    """Say why C{rule} is not a rule, guessing at a misspelt type prefix."""
    prefix, sep, _ = rule.partition(":")
    # Letters beyond a-f cannot start a bare IPv6 address, so this was meant as a type.
    if not kind and sep and prefix.isalpha() and not set(prefix.lower()) <= set("abcdef"):
        return (
            f"{rule!r} has unknown rule type {prefix!r};"
            " expected ip:, cidr: or a bare address or CIDR"
        )
    what = "IP address" if kind == "ip" else "IP address or CIDR"
    return f"{rule!r} is not a valid {what}"


def _build_levels(stages: Iterable[list[tuple[_Network, Decision]]], version: int) -> _Levels:
    """
    Turn the rules of one address family into lookup levels.

    Stages (local, deny, allow) keep their order, since the first hit decides.
    Within a stage the longest prefix comes first, so the reported rule is the
    most specific match, and among duplicates the first rule written wins.
    """
    bits = 32 if version == 4 else 128
    levels: list[tuple[int, dict[int, Decision]]] = []
    for stage in stages:
        by_length: dict[int, dict[int, Decision]] = {}
        for network, decision in stage:
            if network.version == version:
                networks = by_length.setdefault(network.prefixlen, {})
                key = int(network.network_address) >> (bits - network.prefixlen)
                networks.setdefault(key, decision)
        for length in sorted(by_length, reverse=True):
            levels.append((bits - length, by_length[length]))
    return tuple(levels)


_ALLOW_ALL = AccessList(default_allow=True, allow_local=False)
