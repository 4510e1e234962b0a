"""
Per-connection access control in GoDoxy's C{acl} format.

The list is consulted for every accepted TCP connection and every new UDP
source, so a check must not get slower as rules are added.  Rules are
therefore stored per address family as one dict per (verdict, prefix length),
keyed by the network number; a check costs one dict lookup per distinct prefix
length present, whatever the number of rules.

C{country:} and C{tz:} rules ask a MaxMind database (L{streamrelay.geoip})
where the client is.  Each list's such rules form one more level after its
address rules, so lists without them pay nothing, and a client is looked up
only when it gets that far.

Evaluation order follows GoDoxy: with C{allow_local} (the default), loopback
and private addresses are admitted first, then deny rules are checked (deny
beats allow), then allow rules, then C{default}.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from socket import AF_INET, AF_INET6, inet_pton
from typing import Callable, Iterable, Mapping, Protocol

from .geoip import GeoIPDatabase, GeoIPError, Location, open_database

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
_KEYS = ("default", "allow_local", "allow", "deny", "maxmind")
_V4_MAPPED = 0xFFFF  # value of the top 96 bits of ::ffff:a.b.c.d
_COUNTRY = re.compile(r"[A-Za-z]{2}")
# IANA zone names under the areas MaxMind reports (America/Argentina/Salta has
# three parts).  Checked by shape, not against zoneinfo: the system's zone
# data may be missing (container images often leave tzdata out) or older than the
# database, and a file must check the same on every host.
_TIME_ZONE = re.compile(
    r"(Africa|America|Antarctica|Arctic|Asia|Atlantic|Australia|Europe|Indian|Pacific|Etc)(/[\w+-]+)+", re.ASCII
)

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# A country: or tz: rule: its type and value (the country in capitals).
_Place = tuple[str, str]


class _Level(Protocol):
    """What a check asks of a level: the decision for a shifted address, if any."""

    def get(self, key: int, /) -> Decision | None: ...


# One level per (verdict, prefix length): the shift that turns an address into
# its network number at that length, and the network numbers present; then
# per verdict one level for its country: and tz: rules, if any (L{_Places}).
_Levels = tuple[tuple[int, _Level], ...]


@dataclass(frozen=True)
class AccessList:
    """
    An immutable, validated C{acl} block.

    Equality and hashing use the settings, the rule texts and the database
    file as opened, so two routes configured identically compare equal, and
    a list whose database file was replaced since does not.  Build it with L{from_config} for
    values loaded from YAML, or call the constructor with the same fields.
    """

    default_allow: bool = True
    allow_local: bool = True
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    #: The database that C{country:} and C{tz:} rules consult.
    maxmind: GeoIPDatabase | None = None
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
        local: list[tuple[_Network | _Place, Decision]] = [
            (ipaddress.ip_network(n), _ALLOW_LOCAL) for n in _LOCAL_NETWORKS
        ]
        stages = [
            local if self.allow_local else [],
            _parse_rules("deny", deny, self.maxmind, allowed=False),
            _parse_rules("allow", allow, self.maxmind, allowed=True),
        ]
        v4 = _build_levels(stages, 4, self.maxmind)
        v6 = _build_levels(stages, 6, self.maxmind)
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
    def from_config(cls, value: object, directory: str = "") -> AccessList:
        """
        Validate the C{acl} value as loaded from YAML, opening the database
        C{maxmind.database} names (relative to C{directory}: the route file's).

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
        maxmind = value.get("maxmind")
        return cls(
            default_allow=default != "deny",
            allow_local=True if allow_local is None else allow_local,
            allow=_rule_list("allow", value.get("allow")),
            deny=_rule_list("deny", value.get("deny")),
            maxmind=None if maxmind is None else _database(maxmind, directory),
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


def _database(value: object, directory: str) -> GeoIPDatabase:
    """Open the file C{acl.maxmind.database} names."""
    if not isinstance(value, Mapping):
        raise AclError(f"acl.maxmind: expected a mapping with a database, got {type(value).__name__}")
    unknown = [key for key in value if key != "database"]
    if unknown:
        raise AclError(f"acl.maxmind: unknown key {unknown[0]!r}; the only key is database")
    path = value.get("database")
    if not isinstance(path, str) or not path:
        raise AclError(f"acl.maxmind.database: expected the path of a MaxMind database file, got {path!r}")
    try:
        return open_database(os.path.join(directory, path))
    except GeoIPError as e:
        raise AclError(f"acl.maxmind.database: {e}") from None


def _parse_rules(
    name: str, rules: Iterable[str], database: GeoIPDatabase | None, *, allowed: bool
) -> list[tuple[_Network | _Place, Decision]]:
    """Parse C{acl.<name>}, pairing each network or place with the decision it yields."""
    verb = "allow" if allowed else "deny"
    parsed: list[tuple[_Network | _Place, Decision]] = []
    for i, rule in enumerate(rules):
        path = f"acl.{name}[{i}]"
        target = _parse_rule(path, rule)
        if isinstance(target, tuple) and database is None:
            raise AclError(f"{path}: {rule!r} needs a MaxMind database; add maxmind: {{database: FILE}} to this acl block")
        parsed.append((target, Decision(allowed, f"{verb} {rule}")))
    return parsed


def _parse_rule(path: str, rule: str) -> _Network | _Place:
    """
    Parse one C{ip:}, C{cidr:} or bare address/CIDR rule into a network, or
    a C{country:} or C{tz:} rule into a place.

    IPv4-mapped rules become IPv4 networks, because clients are unmapped
    before the lookup and would otherwise never match them.
    """
    kind, sep, body = rule.partition(":")
    if sep and kind in _GEOIP_TYPES:
        return _parse_place(path, rule, kind, body)
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


def _parse_place(path: str, rule: str, kind: str, body: str) -> _Place:
    """Check the value of a C{country:} or C{tz:} rule; countries in any case."""
    if kind == "country":
        if not _COUNTRY.fullmatch(body):
            raise AclError(f"{path}: {rule!r} is not a country; expected a two-letter ISO 3166-1 code, as in country:DE")
        return kind, body.upper()
    if not _TIME_ZONE.fullmatch(body):
        raise AclError(f"{path}: {rule!r} is not a time zone; expected an IANA Area/City name, as in tz:Europe/Berlin")
    return kind, body


def _unparsable(rule: str, kind: str) -> str:
    """Say why C{rule} is not a rule, guessing at a misspelt type prefix."""
    prefix, sep, _ = rule.partition(":")
    # Letters beyond a-f cannot start a bare IPv6 address, so this was meant as a type.
    if not kind and sep and prefix.isalpha() and not set(prefix.lower()) <= set("abcdef"):
        return (
            f"{rule!r} has unknown rule type {prefix!r};"
            " expected ip:, cidr:, country:, tz: or a bare address or CIDR"
        )
    what = "IP address" if kind == "ip" else "IP address or CIDR"
    return f"{rule!r} is not a valid {what}"


def _build_levels(
    stages: Iterable[list[tuple[_Network | _Place, Decision]]], version: int, database: GeoIPDatabase | None
) -> _Levels:
    """
    Turn the rules of one address family into lookup levels.

    Stages (local, deny, allow) keep their order, since the first hit decides.
    Within a stage the longest prefix comes first, so the reported rule is the
    most specific match, and among duplicates the first rule written wins;
    its country: and tz: rules come last, after every address rule.
    """
    bits = 32 if version == 4 else 128
    levels: list[tuple[int, _Level]] = []
    for stage in stages:
        by_length: dict[int, dict[int, Decision]] = {}
        places: dict[_Place, Decision] = {}
        for rule, decision in stage:
            if isinstance(rule, tuple):
                places.setdefault(rule, decision)
            elif rule.version == version:
                networks = by_length.setdefault(rule.prefixlen, {})
                key = int(rule.network_address) >> (bits - rule.prefixlen)
                networks.setdefault(key, decision)
        for length in sorted(by_length, reverse=True):
            levels.append((bits - length, by_length[length]))
        if places and database is not None:  # _parse_rules saw to the database
            levels.append((0, _Places(database.locate, version, places)))
    return tuple(levels)


class _Places:
    """
    One stage's country: and tz: rules as a level: given the whole address
    (shift 0), it asks the database where that is.  Country rules are
    checked before time-zone rules.
    """

    __slots__ = ("locate", "version", "countries", "zones")

    def __init__(self, locate: Callable[[int, int], Location], version: int, rules: dict[_Place, Decision]) -> None:
        self.locate = locate
        self.version = version
        self.countries = {value: d for (kind, value), d in rules.items() if kind == "country"}
        self.zones = {value: d for (kind, value), d in rules.items() if kind == "tz"}

    def get(self, address: int) -> Decision | None:
        country, zone = self.locate(self.version, address)
        return self.countries.get(country) or self.zones.get(zone)


_ALLOW_ALL = AccessList(default_allow=True, allow_local=False)
