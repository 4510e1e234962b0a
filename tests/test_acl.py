"""
Tests for L{streamrelay.acl}: rule parsing, GoDoxy's evaluation order, and the
prefix tables checked against a naive scan over the rules.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import random
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from streamrelay.acl import AccessList, AclError, Decision

EXAMPLE = {
    "default": "deny",
    "allow_local": True,
    "allow": ["ip:198.51.100.7", "cidr:192.168.0.0/16", "2001:db8::/32"],
    "deny": ["cidr:203.0.113.0/24"],
}


def allowed(rule: str) -> Decision:
    return Decision(True, rule)


def denied(rule: str) -> Decision:
    return Decision(False, rule)


# ------------------------------------------------------------ matching tables


@pytest.mark.parametrize(
    "host, expected",
    [
        ("198.51.100.7", allowed("allow ip:198.51.100.7")),
        ("198.51.100.8", denied("default deny")),
        ("203.0.113.9", denied("deny cidr:203.0.113.0/24")),
        ("203.0.114.0", denied("default deny")),
        ("192.168.44.1", allowed("allow_local")),
        ("10.1.2.3", allowed("allow_local")),
        ("127.0.0.1", allowed("allow_local")),
        ("8.8.8.8", denied("default deny")),
        ("2001:db8::1", allowed("allow 2001:db8::/32")),
        ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", allowed("allow 2001:db8::/32")),
        ("2001:db9::1", denied("default deny")),
        ("::1", allowed("allow_local")),
        ("fd12:3456::1", allowed("allow_local")),
        ("::ffff:198.51.100.7", allowed("allow ip:198.51.100.7")),
        ("::ffff:203.0.113.1", denied("deny cidr:203.0.113.0/24")),
        ("::ffff:10.0.0.1", allowed("allow_local")),
        ("::ffff:8.8.8.8", denied("default deny")),
    ],
)
def test_allow_local(host: str, expected: Decision) -> None:
    assert AccessList.from_config(EXAMPLE).check(host) == expected


@pytest.mark.parametrize(
    "host, expected",
    [
        ("198.51.100.7", allowed("allow ip:198.51.100.7")),
        ("203.0.113.9", denied("deny cidr:203.0.113.0/24")),
        ("192.168.44.1", allowed("allow cidr:192.168.0.0/16")),
        ("::ffff:192.168.0.1", allowed("allow cidr:192.168.0.0/16")),
        ("10.1.2.3", denied("default deny")),
        ("127.0.0.1", denied("default deny")),
        ("::1", denied("default deny")),
        ("fd12:3456::1", denied("default deny")),
        ("2001:db8::1", allowed("allow 2001:db8::/32")),
    ],
)
def test_no_allow_local(host: str, expected: Decision) -> None:
    acl = AccessList.from_config({**EXAMPLE, "allow_local": False})
    assert acl.check(host) == expected


@pytest.mark.parametrize(
    "host, local",
    [
        ("127.255.255.254", True),
        ("10.255.255.255", True),
        ("172.15.255.255", False),
        ("172.16.0.0", True),
        ("172.31.255.255", True),
        ("172.32.0.0", False),
        ("192.167.255.255", False),
        ("192.168.0.0", True),
        ("192.169.0.0", False),
        ("169.254.1.1", False),  # link-local: GoDoxy's IsPrivate() excludes it
        ("100.64.0.1", False),  # CGNAT: likewise
        ("::1", True),
        ("::2", False),
        ("fc00::", True),
        ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", True),
        ("fe00::1", False),
        ("fe80::1", False),
        ("fe80::1%eth0", False),
        ("::ffff:127.0.0.1", True),
        ("::ffff:172.16.0.1", True),
    ],
)
def test_local_ranges(host: str, local: bool) -> None:
    acl = AccessList.from_config({"default": "deny"})
    assert acl.check(host) == (allowed("allow_local") if local else denied("default deny"))


@pytest.mark.parametrize(
    "rule, host, matches",
    [
        ("fe80::/10", "fe80::1%eth0", True),
        ("ip:fe80::1", "fe80::1%eth0", True),
        ("ip:fe80::1", "fe80::2%eth0", False),
        # Mapped rules are unmapped like clients, so both spellings match.
        ("ip:::ffff:198.51.100.7", "198.51.100.7", True),
        ("::ffff:198.51.100.0/120", "::ffff:198.51.100.200", True),
        ("ip:198.51.100.7", "::FFFF:198.51.100.7", True),
        # An IPv6 network does not match IPv4 clients, even when it spans ::ffff:0:0/96.
        ("::/0", "198.51.100.7", False),
        ("::/0", "2001:db8::1", True),
        ("0.0.0.0/0", "2001:db8::1", False),
        ("cidr:198.51.100.7", "198.51.100.7", True),  # a cidr: without a length is one host
    ],
)
def test_address_forms(rule: str, host: str, matches: bool) -> None:
    acl = AccessList.from_config({"allow_local": False, "deny": [rule]})
    assert acl.check(host).allowed is not matches


# ------------------------------------------------------------ evaluation order


@pytest.mark.parametrize(
    "config, host, expected",
    [
        # Deny beats allow, whichever of the two is more specific.
        (
            {"allow": ["ip:203.0.113.5"], "deny": ["cidr:203.0.113.0/24"]},
            "203.0.113.5",
            denied("deny cidr:203.0.113.0/24"),
        ),
        (
            {"allow": ["203.0.113.0/24"], "deny": ["ip:203.0.113.5"]},
            "203.0.113.5",
            denied("deny ip:203.0.113.5"),
        ),
        (
            {"allow": ["203.0.113.0/24"], "deny": ["ip:203.0.113.5"]},
            "203.0.113.6",
            allowed("allow 203.0.113.0/24"),
        ),
        # allow_local beats deny.
        ({"deny": ["cidr:10.0.0.0/8"]}, "10.9.9.9", allowed("allow_local")),
        ({"deny": ["::1"]}, "::1", allowed("allow_local")),
        # ...unless it is off.
        ({"allow_local": False, "deny": ["10.0.0.0/8"]}, "10.9.9.9", denied("deny 10.0.0.0/8")),
        # The default applies when nothing matches.
        ({"deny": ["203.0.113.0/24"]}, "198.51.100.1", allowed("default allow")),
        ({"default": "deny", "allow": ["203.0.113.0/24"]}, "198.51.100.1", denied("default deny")),
        # The most specific match is reported, and the first of duplicates.
        (
            {"deny": ["0.0.0.0/0", "203.0.113.0/24", "203.0.0.0/16"]},
            "203.0.113.1",
            denied("deny 203.0.113.0/24"),
        ),
        (
            {"deny": ["ip:203.0.113.1", "203.0.113.1/32", "203.0.113.1"]},
            "203.0.113.1",
            denied("deny ip:203.0.113.1"),
        ),
    ],
)
def test_evaluation_order(config: dict, host: str, expected: Decision) -> None:
    assert AccessList.from_config(config).check(host) == expected


# ----------------------------------------------------------- the whole object


def test_defaults() -> None:
    acl = AccessList.from_config({})
    assert acl == AccessList(default_allow=True, allow_local=True, allow=(), deny=())
    assert acl.check("8.8.8.8") == allowed("default allow")
    assert acl.check("10.0.0.1") == allowed("allow_local")


def test_null_means_absent() -> None:
    """YAML's C{key:} with no value reads as None; GoDoxy treats that as unset."""
    nulls = {"default": None, "allow_local": None, "allow": None, "deny": None}
    assert AccessList.from_config(nulls) == AccessList.from_config({})
    assert AccessList.from_config(None) is AccessList.allow_all()


def test_allow_all() -> None:
    acl = AccessList.allow_all()
    assert acl is AccessList.allow_all()
    assert acl.permits_everything
    assert acl == AccessList(default_allow=True, allow_local=False)
    for host in ("8.8.8.8", "10.0.0.1", "::1", "2001:db8::1"):
        assert acl.check(host) == allowed("default allow")
    # It answers without parsing the address at all.
    assert acl.check("not an address") == allowed("default allow")


@pytest.mark.parametrize(
    "config, permits_everything",
    [
        ({}, True),
        ({"allow": ["203.0.113.0/24"]}, True),
        ({"allow_local": False}, True),
        ({"deny": ["203.0.113.0/24"]}, False),
        ({"default": "deny"}, False),
    ],
)
def test_permits_everything(config: dict, permits_everything: bool) -> None:
    assert AccessList.from_config(config).permits_everything is permits_everything


@pytest.mark.parametrize("host", ["", "example.com", "1.2.3", "256.0.0.1", "::g", "1.2.3.4 "])
def test_check_rejects_non_addresses(host: str) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        AccessList.from_config(EXAMPLE).check(host)


def test_immutable_equal_and_hashable() -> None:
    first = AccessList.from_config(EXAMPLE)
    second = AccessList.from_config(dict(EXAMPLE))
    assert first == second
    assert hash(first) == hash(second)
    assert first != AccessList.from_config({**EXAMPLE, "deny": []})
    assert isinstance(first.allow, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.deny = ()  # type: ignore[misc]


def test_constructor_accepts_lists() -> None:
    """Direct construction normalises to tuples so the result stays hashable."""
    acl = AccessList(allow=["203.0.113.0/24"])  # type: ignore[arg-type]
    assert acl.allow == ("203.0.113.0/24",)
    assert hash(acl) == hash(AccessList(allow=("203.0.113.0/24",)))


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "config, message",
    [
        (["allow"], "acl: expected a mapping, got list"),
        ("deny", "acl: expected a mapping, got str"),
        (
            {"log": {}},
            "acl: unknown key 'log'; valid keys are default, allow_local, allow, deny, maxmind",
        ),
        ({"default": "block"}, "acl.default: expected 'allow' or 'deny', got 'block'"),
        ({"default": True}, "acl.default: expected 'allow' or 'deny', got True"),
        ({"allow_local": "yes"}, "acl.allow_local: expected true or false, got 'yes'"),
        ({"allow_local": 1}, "acl.allow_local: expected true or false, got 1"),
        ({"allow": "10.0.0.0/8"}, "acl.allow: expected a list of rules, got str"),
        ({"deny": {"ip": "1.2.3.4"}}, "acl.deny: expected a list of rules, got dict"),
        ({"deny": ["1.2.3.4", 5]}, "acl.deny[1]: expected a string, got int"),
        (
            {"allow_local": False, "default": "deny"},
            "acl: default is deny, allow_local is false and acl.allow is empty,"
            " so every client would be refused",
        ),
    ],
)
def test_config_errors(config: object, message: str) -> None:
    with pytest.raises(AclError, match=f"^{re.escape(message)}$"):
        AccessList.from_config(config)


@pytest.mark.parametrize(
    "rule, message",
    [
        # Places need a database (tests/test_geoip.py has the rest), but are
        # checked for shape first.
        (
            "country:US",
            "'country:US' needs a MaxMind database; add maxmind: {database: FILE} to this acl block",
        ),
        (
            "tz:America/Argentina/Salta",
            "'tz:America/Argentina/Salta' needs a MaxMind database;"
            " add maxmind: {database: FILE} to this acl block",
        ),
        *[
            (
                f"country:{code}",
                f"'country:{code}' is not a country; expected a two-letter ISO 3166-1 code, as in country:DE",
            )
            for code in ("usa", "U", "", "U1", "ÜS", " US")
        ],
        *[
            (
                f"tz:{zone}",
                f"'tz:{zone}' is not a time zone; expected an IANA Area/City name, as in tz:Europe/Berlin",
            )
            for zone in ("Nowhere", "UTC", "US/Eastern", "europe/berlin", "Europe/", "Europe/Berlin/", "Europe/Bär")
        ],
        ("cidr:10.0.0.1/8", "'cidr:10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8?"),
        ("10.0.0.1/8", "'10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8?"),
        ("2001:db8::1/32", "'2001:db8::1/32' has host bits set; did you mean 2001:db8::/32?"),
        ("ip:1.2.3.999", "'ip:1.2.3.999' is not a valid IP address"),
        ("ip:", "'ip:' is not a valid IP address"),
        ("cidr:10.0.0.0/33", "'cidr:10.0.0.0/33' is not a valid IP address or CIDR"),
        ("1.2.3", "'1.2.3' is not a valid IP address or CIDR"),
        ("", "'' is not a valid IP address or CIDR"),
        ("dead:beef", "'dead:beef' is not a valid IP address or CIDR"),
        (
            "host:example.com",
            "'host:example.com' has unknown rule type 'host';"
            " expected ip:, cidr:, country:, tz: or a bare address or CIDR",
        ),
        ("ip:10.0.0.0/8", "'ip:10.0.0.0/8' is a network; write it as cidr:10.0.0.0/8"),
        ("fe80::1%eth0", "'fe80::1%eth0' has a zone id; rules cannot name an interface"),
        (
            "cidr:fe80::%eth0/64",
            "'cidr:fe80::%eth0/64' has a zone id; rules cannot name an interface",
        ),
    ],
)
@pytest.mark.parametrize("field", ["allow", "deny"])
def test_rule_errors(field: str, rule: str, message: str) -> None:
    config = {field: ["203.0.113.0/24", rule]}
    with pytest.raises(AclError, match=f"^{re.escape(f'acl.{field}[1]: {message}')}$"):
        AccessList.from_config(config)


# ------------------------------------------------- against a naive linear scan

# Go's net.IP.IsLoopback() and IsPrivate(), which GoDoxy's allow_local uses.
LOCAL = [
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
] + [ipaddress.ip_network("fc00::/7")]


@functools.lru_cache(maxsize=None)
def rule_network(rule: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(rule.removeprefix("ip:").removeprefix("cidr:"))


def naive_check(config: dict, host: str) -> Decision:
    """The specification, read literally: scan every rule for every check."""
    address = ipaddress.ip_address(host.partition("%")[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if config.get("allow_local", True) and any(address in n for n in LOCAL):
        return allowed("allow_local")
    for verb in ("deny", "allow"):
        matches = []
        for index, rule in enumerate(config.get(verb, [])):
            network = rule_network(rule)
            if address in network:
                matches.append((-network.prefixlen, index, rule))
        if matches:
            return Decision(verb == "allow", f"{verb} {min(matches)[2]}")
    default = config.get("default", "allow")
    return Decision(default == "allow", f"default {default}")


def spell(network: ipaddress.IPv4Network | ipaddress.IPv6Network, style: int) -> str:
    """Write C{network} in one of the accepted rule forms."""
    if network.num_addresses == 1 and style == 0:
        return f"ip:{network.network_address}"
    return f"cidr:{network}" if style == 1 else str(network)


# Addresses cluster around a few bases so rules and clients overlap often.
V4_BASES = [
    int(ipaddress.IPv4Address(a))
    for a in ("10.0.0.0", "172.16.0.0", "198.51.100.0", "203.0.113.0")
]
V6_BASES = [
    int(ipaddress.IPv6Address(a)) for a in ("::", "2001:db8::", "fd00::", "fe80::")
]
v4_ints = st.builds(int.__add__, st.sampled_from(V4_BASES), st.integers(0, 1023))
v6_ints = st.builds(int.__add__, st.sampled_from(V6_BASES), st.integers(0, 1023))
v4_rules = st.builds(
    lambda a, n, s: spell(ipaddress.IPv4Network((a, n), strict=False), s),
    v4_ints,
    st.integers(0, 32),
    st.integers(0, 2),
)
v6_rules = st.builds(
    lambda a, n, s: spell(ipaddress.IPv6Network((a, n), strict=False), s),
    v6_ints,
    st.integers(0, 128),
    st.integers(0, 2),
)
rule_lists = st.lists(st.one_of(v4_rules, v6_rules), max_size=12)
hosts = st.one_of(
    v4_ints.map(lambda a: str(ipaddress.IPv4Address(a))),
    v4_ints.map(lambda a: f"::ffff:{ipaddress.IPv4Address(a)}"),
    v6_ints.map(lambda a: str(ipaddress.IPv6Address(a))),
    v6_ints.map(lambda a: f"{ipaddress.IPv6Address(a)}%eth0"),
)


@settings(max_examples=200, deadline=None)
@given(
    default=st.sampled_from(["allow", "deny"]),
    allow_local=st.booleans(),
    allow=rule_lists,
    deny=rule_lists,
    probes=st.lists(hosts, min_size=1, max_size=10),
)
def test_matches_naive_scan(
    default: str, allow_local: bool, allow: list[str], deny: list[str], probes: list[str]
) -> None:
    assume(allow_local or default == "allow" or allow)
    config = {"default": default, "allow_local": allow_local, "allow": allow, "deny": deny}
    acl = AccessList.from_config(config)
    for host in probes:
        assert acl.check(host) == naive_check(config, host)


def test_ten_thousand_rules() -> None:
    """Many rules of many lengths build fine and still answer correctly."""
    rng = random.Random(20240601)

    def random_network() -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        if rng.random() < 0.7:
            return ipaddress.IPv4Network((rng.getrandbits(32), rng.randint(8, 32)), strict=False)
        return ipaddress.IPv6Network((rng.getrandbits(128), rng.randint(16, 128)), strict=False)

    networks = [random_network() for _ in range(10_000)]
    rules = [spell(n, rng.randint(0, 2)) for n in networks]
    config = {"default": "deny", "allow_local": False, "allow": rules[::2], "deny": rules[1::2]}
    acl = AccessList.from_config(config)

    probes = [str(n[rng.randrange(n.num_addresses)]) for n in rng.sample(networks, 40)]
    probes += [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(20)]
    probes += [f"::ffff:{ipaddress.IPv4Address(rng.getrandbits(32))}" for _ in range(10)]
    probes += [str(ipaddress.IPv6Address(rng.getrandbits(128))) for _ in range(10)]
    for host in probes:
        assert acl.check(host) == naive_check(config, host)
    # The probes drawn from rule networks must have hit rules, not the default.
    assert all(acl.check(host).rule != "default deny" for host in probes[:40])
