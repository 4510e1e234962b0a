"""
Load and validate the YAML route file into immutable objects.

Everything is checked here, before a single socket is bound, so that a typo
stops ``twistd`` with a message naming the file, the route and the field
instead of surfacing as a half-started relay.  Field names follow GoDoxy's
stream routes where the two overlap.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Final, Literal, Mapping, NamedTuple, NoReturn, TypeVar, Union, get_args

import yaml

from .acl import AccessList, AclError
from .addresses import join_host_port, unmapped
from .bandwidth import Bandwidth, ByteRate, Directions, parse_byte_rate
from .gateway import GatewayConfig, TargetRule, parse_target_rule
from .balance import MODES, LoadBalance, TargetSpec
from .health import HealthCheck
from .ratelimit import Rate, RateLimit

__all__ = [
    "Config", "ConfigError", "ProxyMode", "RouteConfig", "RouteLoader", "RouteProtocol", "Scheme",
    "SpliceSetting", "StatusConfig",
    "load_config", "parse_config",
]

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: A route's C{scheme}: its protocol, and an address family (4 or 6) or either.
Scheme = Literal["tcp", "tcp4", "tcp6", "udp", "udp4", "udp6"]
#: What a route relays: the first three letters of its scheme.
RouteProtocol = Literal["tcp", "udp"]
#: C{proxy_protocol.mode}: whether inbound PROXY headers are refused, required
#: (C{required}, C{mixed}: from trusted peers) or parsed if present.
ProxyMode = Literal["disabled", "required", "mixed", "optional"]
#: C{splice}: C{True}, C{False} or C{"auto"}.
SpliceSetting = Union[bool, Literal["auto"]]

SCHEMES: Final[tuple[Scheme, ...]] = get_args(Scheme)
PROXY_MODES: Final[tuple[ProxyMode, ...]] = get_args(ProxyMode)

_T = TypeVar("_T")
#: A mapping as YAML loaded it: keys and values of any type, checked as read.
_YAMLMapping = dict[Any, Any]


class ConfigError(Exception):
    """
    The route file is unusable.  C{str()} is the complete message an operator
    sees: file, route, field, what was expected and what was found.
    """


class _Invalid(ValueError):
    """A field value is wrong; the message says what was expected."""


# ---------------------------------------------------------------- YAML loading


class RouteLoader(yaml.SafeLoader):
    """
    SafeLoader with YAML 1.2 numbers, no duplicate keys and a nesting limit.

    YAML 1.1 reads an unquoted C{2222:22} as the base-60 integer 133342, which
    would turn GoDoxy's port syntax into nonsense; a key written twice is
    almost always a mistake that YAML would silently resolve to the last one.
    PyYAML composes nested nodes recursively, so a small file of C{[[[[...}
    would otherwise end in a C{RecursionError} a few hundred levels down.
    """

    #: Far beyond any route file, far short of Python's recursion limit.
    MAX_DEPTH = 64
    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self._depth == self.MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested too deeply (more than {self.MAX_DEPTH} levels)",
                self.peek_event().start_mark,  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
RouteLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RouteLoader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789")
)
RouteLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)


# ------------------------------------------------------------- value parsers

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """
    Seconds from C{250ms}, C{5s}, C{1m30s}, C{2h} or a plain number of
    seconds; never infinite (C{1.0e400} and 400 nines are numbers too).
    """
    seconds = _duration(value)
    if not math.isfinite(seconds):
        raise _Invalid("a finite duration such as 250ms, 5s, 1m30s, 2h or a number of seconds")
    return seconds


def _duration(value: object) -> float:
    """What L{parse_duration} parses, infinities included."""
    expected = "a duration such as 250ms, 5s, 1m30s, 2h or a number of seconds"
    if isinstance(value, bool):
        raise _Invalid(expected)
    if isinstance(value, (int, float)):
        if value < 0:
            raise _Invalid(expected + " (not negative)")
        return float(value)
    if not isinstance(value, str) or not value:
        raise _Invalid(expected)
    text = value.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    position, seconds = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text) or position == 0:
        raise _Invalid(expected)
    return seconds


def _positive_duration(value: object) -> float:
    """A duration above zero: for periods where 0 would mean "always", not "never"."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise _Invalid("a duration above 0 such as 250ms, 5s or 1m")
    return seconds


def _integer(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"an integer from {low} to {high}")
        if not low <= value <= high:
            raise _Invalid(f"an integer from {low} to {high}")
        return value

    return parse


def _port_number(text: str, low: int, what: str) -> int:
    if not re.fullmatch(r"0|[1-9][0-9]{0,4}", text) or not low <= int(text) <= 65535:
        raise _Invalid(f"{what} port from {low} to 65535")
    return int(text)


def parse_port(value: object) -> tuple[int, int]:
    """
    GoDoxy's C{[LISTEN:]TARGET}: C{"2222:22"}; C{"22"} or C{":22"} listen on
    a port the system picks.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Invalid('"LISTEN:TARGET" ports, e.g. "2222:22", or a target port')
    listen, _, target = str(value).rpartition(":")
    try:
        return (
            _port_number(listen, 0, "a listening") if listen else 0,
            _port_number(target, 1, "a target"),
        )
    except _Invalid as e:
        raise _Invalid(f'"LISTEN:TARGET" ports, e.g. "2222:22": {e}') from None


#: The most listening ports one route may have: more than a TURN, RTP or
#: passive-FTP range needs, and a bound on what one route costs to start.
MAX_PORT_RANGE: Final = 4096


class Ports(NamedTuple):
    """A route's C{port} field: its listening ports, and where each relays to."""

    listen: int
    target: int
    #: How many listening ports, from C{listen} on.
    size: int = 1
    #: Whether the target ports are a range as long: each listening port relays to the one at its offset.
    target_range: bool = False


def parse_ports(value: object) -> Ports:
    """
    L{parse_port}'s C{LISTEN:TARGET}, or a range of listening ports:
    C{"10000-10099:20000-20099"} relays each to the target port at the same
    offset, C{"10000-10099:3478"} all of them to one.
    """
    if not isinstance(value, str) or "-" not in value:
        return Ports(*parse_port(value))
    listen, _, target = value.rpartition(":")
    try:
        low, high = _port_range(listen, "a listening")
        count = high - low + 1
        if count > MAX_PORT_RANGE:
            raise _Invalid(f"at most {MAX_PORT_RANGE} listening ports per route (this range has {count})")
        if "-" not in target:
            return Ports(low, _port_number(target, 1, "a target"), count)
        first, last = _port_range(target, "a target")
        if last - first + 1 != count:
            raise _Invalid(f"a target range as long as the listening one ({count} ports, not {last - first + 1}) or one target port")
        return Ports(low, first, count, count > 1)
    except _Invalid as e:
        raise _Invalid(f'"LOW-HIGH:TARGET" or "LOW-HIGH:LOW-HIGH" port ranges, e.g. "10000-10099:20000-20099": {e}') from None


def _port_range(text: str, what: str) -> tuple[int, int]:
    """C{LOW-HIGH}, LOW at most HIGH, neither 0 (a range has no port the system picks)."""
    low, dash, high = text.partition("-")
    if not dash:
        raise _Invalid(f"{what} range LOW-HIGH, not {text!r}")
    first, last = _port_number(low, 1, what), _port_number(high, 1, what)
    if first > last:
        raise _Invalid(f"{what} range from its low port to its high one, not {text}")
    return first, last


def port_span(ports: range) -> str:
    """C{10000-10099}, or C{22} for one port: ports as the C{port} field writes them."""
    return str(ports[0]) if len(ports) == 1 else f"{ports[0]}-{ports[-1]}"


def parse_address(value: object) -> str:
    """An IP literal, in canonical form."""
    if not isinstance(value, str):
        raise _Invalid("an IPv4 or IPv6 address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _Invalid("an IPv4 or IPv6 address") from None


def parse_status_listen(value: object) -> str:
    """
    The status endpoint: C{IP:port} (C{[v6]:port} for IPv6) becomes a
    C{tcp:} endpoint string bound to that address; a Twisted server endpoint
    string (C{tcp:}, C{tcp6:}, C{unix:}, C{systemd:}, C{ssl:}) is kept.
    """
    expected = 'an IP:port such as "127.0.0.1:9180" or a server endpoint such as "unix:/run/streamrelay.sock"'
    if not isinstance(value, str) or not value:
        raise _Invalid(expected)
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([0-9.]+):(\d+)", value)
    if match:
        host = match.group(1) or match.group(3)
        port = match.group(2) or match.group(4)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise _Invalid(expected) from None
        number = _port_number(port, 0, "a listening")
        if address.version == 6:
            return f"tcp6:{number}:interface={str(address).replace(':', chr(92) + ':')}"
        return f"tcp:{number}:interface={address}"
    if value.partition(":")[0] in _ENDPOINT_TYPES and ":" in value:
        return value
    raise _Invalid(expected)


_HOSTNAME = re.compile(
    r"(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+", re.ASCII
)


def parse_host(value: object) -> str:
    """A target host: an IP literal (canonicalised) or a DNS name."""
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            if _HOSTNAME.fullmatch(value):
                return value
    raise _Invalid("a host name or an IP address")


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("true or false")
    return value


def _splice(value: object) -> SpliceSetting:
    """C{auto}, C{true} or C{false}; C{true} only where C{os.splice} exists."""
    if value == "auto":
        return "auto"
    if not isinstance(value, bool):
        raise _Invalid("auto, true or false")
    if value is True and not hasattr(os, "splice"):
        raise _Invalid("auto or false (this platform has no os.splice: it needs Linux and Python 3.10 or newer)")
    return value


def parse_network(value: object) -> IPNetwork:
    """An address or a CIDR block, e.g. C{10.0.0.0/8} or C{::1}."""
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value, strict=True)
        except ValueError:
            pass
    raise _Invalid("an IP address or a CIDR block such as 10.0.0.0/8 (no host bits set)")


def _choice(*allowed: _T) -> Callable[[object], _T]:
    def parse(value: object) -> _T:
        if isinstance(value, bool) or value not in allowed:
            raise _Invalid("one of " + ", ".join(map(str, allowed)))
        return allowed[allowed.index(value)]  # the allowed value itself, typed as such

    return parse


_RATE = re.compile(r"([1-9][0-9]{0,8})/([smh])")
_RATE_LIMIT_FIELDS = ("per_client", "burst", "per_route")


def parse_rate(value: object) -> Rate:
    """C{20/s}, C{600/m}, C{1/h}: connections (or new UDP sessions) per second, minute or hour."""
    match = _RATE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise _Invalid("a rate such as 20/s, 600/m or 1/h")
    return Rate(int(match.group(1)), match.group(2))


def parse_rate_limit(value: object) -> RateLimit:
    """
    C{{per_client: 20/s, burst: 40, per_route: 2000/s}}, at least one rate;
    C{burst} (with C{per_client} only) defaults to one second of it.
    """
    if not isinstance(value, dict) or not {"per_client", "per_route"} & value.keys():
        raise _Invalid("a mapping with per_client and/or per_route (and burst), e.g. {per_client: 20/s, burst: 40}")
    for key in value:
        if key not in _RATE_LIMIT_FIELDS:
            raise _Invalid(f"only {', '.join(_RATE_LIMIT_FIELDS)} (not {key!r})")

    def part(key: str, parse: Callable[[object], _T]) -> _T:
        try:
            return parse(value[key])
        except _Invalid as e:
            raise _Invalid(f"{key} as {e}") from None

    rates = {key: part(key, parse_rate) for key in ("per_client", "per_route") if key in value}
    client = rates.get("per_client")
    if "burst" not in value:
        return RateLimit(burst=client.one_second if client else 1, **rates)
    if client is None:
        raise _Invalid("burst only together with per_client")
    return RateLimit(burst=part("burst", _integer(1, 10_000_000)), **rates)


def parse_bandwidth(value: object) -> Bandwidth:
    """
    C{{per_connection: 10MiB/s, per_client: {up: 1MiB/s, down: 50MiB/s}, per_route: 1GiB/s}}, at least
    one of them: a rate limits each direction to it, C{up} and C{down} one direction each.
    """
    fields = ("per_connection", "per_client", "per_route")
    if not isinstance(value, dict) or not value:
        raise _Invalid(f"a mapping with {', '.join(fields)} (one or more), e.g. {{per_connection: 10MiB/s}}")

    def rate(key: str, text: object) -> ByteRate:
        try:
            return parse_byte_rate(text)
        except ValueError as e:
            raise _Invalid(f"{key} as {e}") from None

    limits = {}
    for key, limit in value.items():
        if key not in fields:
            raise _Invalid(f"only {', '.join(fields)} (not {key!r})")
        if not isinstance(limit, dict):
            both = rate(key, limit)
            limits[key] = Directions(both, both)
        elif limit and limit.keys() <= {"up", "down"}:
            limits[key] = Directions(**{direction: rate(f"{key}.{direction}", text) for direction, text in limit.items()})
        else:
            raise _Invalid(f"{key} as a rate or {{up: RATE, down: RATE}} (one or both)")
    return Bandwidth(**limits)


# ------------------------------------------------------------------ objects


@dataclass(frozen=True)
class ProxyProtocolConfig:
    """Inbound PROXY headers: who may send them, and whether they must."""

    mode: ProxyMode = "disabled"
    trusted_proxies: tuple[IPNetwork, ...] = ()
    timeout: float = 3.0
    detect_timeout: float = 0.3
    #: C{trusted_proxies} as the ACL's prefix-length table, so that the check
    #: every connection makes costs the same however many proxies are listed;
    #: derived, so left out of equality.  L{None}: no proxy is trusted.
    _trusted: AccessList | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.trusted_proxies:
            allow = tuple(str(network) for network in self.trusted_proxies)
            table = AccessList(default_allow=False, allow_local=False, allow=allow)
            object.__setattr__(self, "_trusted", table)

    def trusts(self, host: str) -> bool:
        """
        Whether the socket peer C{host} may send a header (a v4-mapped
        C{host} is checked as IPv4).
        """
        return self._trusted is not None and self._trusted.check(host).allowed


TLSVersion = Literal["1.2", "1.3"]
VerifyClient = Literal["none", "optional", "require"]


@dataclass(frozen=True)
class TLSConfig:
    """C{tls}: terminate TLS from clients with this certificate."""

    cert: str
    key: str
    chain: str | None = None
    #: CA file that client certificates must chain to (C{verify_client}).
    client_ca: str | None = None
    verify_client: VerifyClient = "none"
    #: Protocols offered to clients by ALPN, in order of preference; empty: no ALPN.
    alpn: tuple[str, ...] = ()
    min_version: TLSVersion = "1.2"
    handshake_timeout: float = 10.0
    #: SHA-256 of the files read, so that a reload notices a renewed certificate.
    digest: str = ""


@dataclass(frozen=True)
class UpstreamTLSConfig:
    """C{upstream_tls}: originate TLS to the target and check who answers."""

    #: The name sent as SNI and verified; default: the route's target host.
    server_name: str | None = None
    #: CA file to verify the target against; None: the system's store.
    ca: str | None = None
    #: A client certificate and key to present, for targets that ask for one.
    cert: str | None = None
    key: str | None = None
    verify: bool = True
    alpn: tuple[str, ...] = ()
    min_version: TLSVersion = "1.2"
    digest: str = ""


#: The ALPN protocol that selects a GoDoxy agent's stream tunnel.
AGENT_ALPN: Final = "godoxy-agent-stream/1"
#: The agent's pseudo-route, under which its tunnels are logged and counted.
AGENT_ROUTE: Final = "@agent"


@dataclass(frozen=True)
class AgentLinkConfig:
    """One entry of C{agents}: an agent that routes with C{agent: NAME} reach their targets through."""

    name: str
    host: str
    port: int
    ca: str
    cert: str
    key: str
    server_name: str = "godoxy.agent"
    #: Probed with the agent's probe header every C{interval} (L{streamrelay.health.AgentProbe}).
    healthcheck: HealthCheck = HealthCheck()
    digest: str = ""

    @property
    def upstream(self) -> UpstreamTLSConfig:
        """The mutual TLS towards the agent: our certificate, its name and CA checked, the tunnel's ALPN."""
        return UpstreamTLSConfig(
            server_name=self.server_name, ca=self.ca, cert=self.cert, key=self.key, alpn=(AGENT_ALPN,)
        )


@dataclass(frozen=True)
class AgentConfig:
    """C{agent}: serve GoDoxy agent tunnels (and the status resources) on one mutual-TLS port."""

    bind: str
    port: int
    ca: str
    cert: str
    key: str
    allow_targets: tuple[TargetRule, ...]
    header_timeout: float = 10.0
    digest: str = ""

    @property
    def tls(self) -> TLSConfig:
        """Client certificates from C{ca} required; ALPN picks the tunnel or HTTP."""
        return TLSConfig(
            cert=self.cert, key=self.key, client_ca=self.ca, verify_client="require", alpn=(AGENT_ALPN, "http/1.1"),
        )

    @property
    def route(self) -> RouteConfig:
        """The pseudo-route of the tunnels: its listening port, its TLS, no fixed target."""
        return RouteConfig(
            name=AGENT_ROUTE, scheme="tcp", bind=self.bind, listen_port=self.port, host="", target_port=0,
            tls=self.tls, splice=False,
        )


@dataclass(frozen=True)
class RouteConfig:
    """One route: where it listens, where it relays to, and how."""

    name: str
    scheme: Scheme
    bind: str
    listen_port: int
    host: str
    target_port: int
    #: Listening ports from C{listen_port} on: more than 1 for a C{port} range.
    port_count: int = 1
    #: With a range: each listening port relays to the target port at its offset (else all to C{target_port}).
    target_range: bool = False
    connect_timeout: float = 5.0
    retries: int = 1
    dial_timeout: float = 0.0  # 0: connect_timeout × (retries + 1), see budget
    idle_timeout: float = 0.0
    half_close_timeout: float = 30.0
    close_timeout: float = 10.0
    backlog: int = 4096
    proxy_protocol: ProxyProtocolConfig = ProxyProtocolConfig()
    relay_proxy_protocol_header: bool = False
    proxy_protocol_version: int = 2
    proxy_protocol_unique_id: bool = False
    acl: AccessList = AccessList.allow_all()
    max_connections: int = 0
    max_connections_per_client: int = 0
    #: Connection (UDP: new session) rates per client and per route; None: unlimited.
    rate_limit: RateLimit | None = None
    #: Bytes per second per connection (UDP: session), per client and per route, each way; None: unlimited.
    bandwidth: Bandwidth | None = None
    splice: SpliceSetting = "auto"
    reuse_port: bool = False
    udp_idle_timeout: float = 300.0
    udp_cleanup_interval: float = 60.0
    max_udp_sessions: int = 4096
    udp_proxy_protocol: bool = False
    udp_max_replies: int = 0
    udp_max_requests: int = 0
    #: An encrypted-target gateway's settings: its clients name the target.
    gateway: GatewayConfig | None = None
    #: Terminate TLS from clients (L{streamrelay.tlslayer}).
    tls: TLSConfig | None = None
    #: Originate TLS to the target.
    upstream_tls: UpstreamTLSConfig | None = None
    #: TLS server names this route takes on a listening address it shares ("*": the default).
    sni: tuple[str, ...] = ()
    #: With C{sni}: relay the TLS stream as it is instead of terminating it.
    tls_passthrough: bool = False
    #: With C{sni}: how long a client may take to send its whole ClientHello.
    tls_hello_timeout: float = 5.0
    #: Several targets (L{streamrelay.targets}); empty: C{host} and C{target_port} alone.
    targets: tuple[TargetSpec, ...] = ()
    load_balance: LoadBalance = LoadBalance()
    healthcheck: HealthCheck | None = None
    #: Reach the target through this agent (L{streamrelay.agent}): the agent dials C{host}:C{target_port}.
    agent: AgentLinkConfig | None = None

    @property
    def protocol(self) -> RouteProtocol:
        """C{"tcp"} or C{"udp"}."""
        return scheme_protocol(self.scheme)

    @property
    def family(self) -> int | None:
        """4 or 6 for the C{*4}/C{*6} schemes, C{None} for either."""
        return int(self.scheme[3:]) if len(self.scheme) > 3 else None

    @property
    def dial_budget(self) -> float:
        """
        How long a connection may spend from its accept to its target's
        connect (access checks, the C{pre_dial} hook, name resolution and
        every dial attempt): C{dial_timeout}, or by default
        C{connect_timeout × (retries + 1)}.
        """
        return self.dial_timeout or self.connect_timeout * (self.retries + 1)

    @property
    def listen_ports(self) -> range:
        """Every listening port: C{listen_port} alone, or the range."""
        return range(self.listen_port, self.listen_port + self.port_count)

    @property
    def target_ports(self) -> range:
        """The target ports: one, or a range as long as L{listen_ports}."""
        return range(self.target_port, self.target_port + (self.port_count if self.target_range else 1))

    def target_port_for(self, listen_port: int) -> int:
        """Where a client of C{listen_port}, one of L{listen_ports}, is relayed to."""
        return self.target_port + listen_port - self.listen_port if self.target_range else self.target_port

    @property
    def listen(self) -> str:
        """The configured listening address, as C{host:port} (C{host:low-high} for a range)."""
        address = join_host_port(self.bind, self.listen_port)
        return address if self.port_count == 1 else f"{address}-{self.listen_ports[-1]}"

    @property
    def dst(self) -> str:
        """The target, as C{host:port}; the first of several, and how many there are."""
        if len(self.targets) > 1:
            first = self.targets[0]
            return f"{join_host_port(first.host, first.port)} (+{len(self.targets) - 1} more)"
        target = join_host_port(self.host, self.target_port)
        return f"{target}-{self.target_ports[-1]}" if self.target_range else target


def scheme_protocol(scheme: Scheme) -> RouteProtocol:
    """What a route of C{scheme} relays: C{"tcp"} or C{"udp"}."""
    return "udp" if scheme.startswith("udp") else "tcp"


@dataclass(frozen=True)
class ResolverConfig:
    """C{resolver}: the DNS servers that host-name targets are asked of, and how long answers count."""

    #: C{(ip, port)}; empty: the system's hosts file and resolv.conf.
    servers: tuple[tuple[str, int], ...] = ()
    dns_min_ttl: float = 1.0
    dns_max_ttl: float = 300.0
    dns_max_stale: float = 3600.0


@dataclass(frozen=True)
class Config:
    """A whole route file."""

    path: str
    routes: tuple[RouteConfig, ...]
    shutdown_timeout: float = 10.0
    status: StatusConfig | None = None
    resolver: ResolverConfig = ResolverConfig()
    agent: AgentConfig | None = None
    agents: tuple[AgentLinkConfig, ...] = ()


#: Who may read the status endpoint when its block has no C{acl}: loopback.
_STATUS_ACL = {"default": "deny", "allow_local": False, "allow": ["cidr:127.0.0.0/8", "cidr:::1/128"]}


@dataclass(frozen=True)
class StatusConfig:
    """The status endpoint: metrics, the status page and its JSON, health."""

    #: A Twisted server endpoint string (an C{IP:port} in the file becomes C{tcp:...}).
    endpoint: str
    #: Who may connect (over TCP); loopback only unless the file says otherwise.
    acl: AccessList = field(default_factory=lambda: AccessList.from_config(_STATUS_ACL))


@dataclass(frozen=True)
class _Tunable:
    """A route field that C{defaults} may also set."""

    parse: Callable[[object], Any]
    protocols: frozenset[RouteProtocol] = field(default=frozenset({"tcp", "udp"}))


_TCP: frozenset[RouteProtocol] = frozenset({"tcp"})
_UDP: frozenset[RouteProtocol] = frozenset({"udp"})

#: Fields settable per route and in C{defaults}.
TUNABLES: Mapping[str, _Tunable] = {
    "connect_timeout": _Tunable(_positive_duration, _TCP),
    "retries": _Tunable(_integer(0, 100), _TCP),
    "dial_timeout": _Tunable(_positive_duration, _TCP),
    "idle_timeout": _Tunable(parse_duration, _TCP),
    "half_close_timeout": _Tunable(parse_duration, _TCP),
    "close_timeout": _Tunable(_positive_duration, _TCP),
    "backlog": _Tunable(_integer(1, 65535), _TCP),
    "relay_proxy_protocol_header": _Tunable(_boolean, _TCP),
    "proxy_protocol_version": _Tunable(_choice(1, 2), _TCP),
    "proxy_protocol_unique_id": _Tunable(_boolean),
    "max_connections": _Tunable(_integer(0, 10_000_000), _TCP),
    "max_connections_per_client": _Tunable(_integer(0, 10_000_000), _TCP),
    "rate_limit": _Tunable(parse_rate_limit),
    "bandwidth": _Tunable(parse_bandwidth),
    "splice": _Tunable(_splice, _TCP),
    "udp_idle_timeout": _Tunable(_positive_duration, _UDP),
    "udp_cleanup_interval": _Tunable(_positive_duration, _UDP),
    "max_udp_sessions": _Tunable(_integer(1, 1 << 20), _UDP),
    "udp_proxy_protocol": _Tunable(_boolean, _UDP),
    "udp_max_replies": _Tunable(_integer(0, 1 << 31), _UDP),
    "udp_max_requests": _Tunable(_integer(0, 1 << 31), _UDP),
    "reuse_port": _Tunable(_boolean),
    "tls_hello_timeout": _Tunable(_positive_duration, _TCP),
}

_TARGETS_FIELDS = ("targets", "load_balance", "healthcheck", "max_fails", "fail_timeout")
_ROUTE_ONLY = (
    "scheme", "bind", "host", "port", "proxy_protocol", "acl", "gateway", "tls", "upstream_tls", "sni", "tls_passthrough",
    "agent", *_TARGETS_FIELDS,
)
_TLS_FIELDS = ("cert", "key", "chain", "client_ca", "verify_client", "alpn", "min_version", "handshake_timeout")
_UPSTREAM_TLS_FIELDS = ("server_name", "ca", "cert", "key", "verify", "alpn", "min_version")
#: What the routes sharing one listening address by C{sni} must agree on: it applies before the name is known.
_SHARED_PORT_FIELDS = ("proxy_protocol", "reuse_port", "backlog", "tls_hello_timeout")
_TOP_LEVEL = (
    "defaults", "routes", "shutdown_timeout", "proxy_protocol", "entrypoint", "acl", "status", "resolver", "agent", "agents",
)
_AGENT_FIELDS = ("listen", "ca", "cert", "key", "allow_targets", "header_timeout")
_AGENT_LINK_FIELDS = ("address", "ca", "cert", "key", "server_name", "healthcheck")
_AGENT_HEALTHCHECK_FIELDS = ("interval", "timeout", "retries")
_RESOLVER_FIELDS = ("servers", "dns_min_ttl", "dns_max_ttl", "dns_max_stale")
_LOAD_BALANCE_FIELDS = ("mode", "sticky", "sticky_max_age")
_HEALTHCHECK_FIELDS = ("interval", "timeout", "retries", "disable", "send", "expect")
_STATUS_FIELDS = ("listen", "acl")
#: Server endpoint types the status block may name (Twisted's, by their prefix).
_ENDPOINT_TYPES = ("tcp", "tcp6", "unix", "systemd", "ssl")
_PROXY_FIELDS = ("mode", "trusted_proxies", "timeout", "detect_timeout")


# ------------------------------------------------------------------ loading


def load_config(path: str) -> Config:
    """
    Read and validate the route file at C{path}.

    @raise ConfigError: with a message naming the file, route and field.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the route file: {e}") from None
    return parse_config(text, path)


def parse_config(text: str, path: str = "<string>") -> Config:
    """Validate route file contents; C{path} is only used in messages."""
    try:
        document = yaml.load(text, Loader=RouteLoader)  # noqa: S506 - a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}YAML error: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML error: {e}") from None
    return _Parser(path).document(document)


class _Parser:
    """Walks the YAML document, keeping the file name for every message."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.links: tuple[AgentLinkConfig, ...] = ()  # the C{agents} that routes may name

    def fail(self, route: str | None, name: str, message: str) -> ConfigError:
        where = f"route {route!r}: " if route is not None else ""
        return ConfigError(f"{self.path}: {where}field {name!r}: {message}")

    def value(self, route: str | None, name: str, raw: object, parse: Callable[[object], _T]) -> _T:
        try:
            return parse(raw)
        except _Invalid as e:
            self._raise(route, name, f"expected {e}, found {raw!r}")

    def _raise(self, route: str | None, name: str, message: str) -> NoReturn:
        raise self.fail(route, name, message)

    def mapping(self, route: str | None, name: str, raw: object, allowed: Collection[str]) -> _YAMLMapping:
        if not isinstance(raw, dict):
            self._raise(route, name, f"expected a mapping, found {raw!r}")
        for key in raw:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                self._raise(route, f"{name}.{key}" if name else key,
                            f"unknown field (known fields: {known})")
        return raw

    def document(self, document: object) -> Config:
        if document is None:
            raise ConfigError(f"{self.path}: the route file is empty")
        top = self.mapping(None, "", document, _TOP_LEVEL)
        defaults = self.defaults(top.get("defaults", {}))
        defaults["proxy_protocol"] = self.top_proxy_protocol(top)
        defaults["acl"] = self.acl(None, top.get("acl"))
        extra: dict[str, Any] = {}
        if "agents" in top:
            extra["agents"] = self.links = self.agent_links(top["agents"])
        if "agent" in top:
            extra["agent"] = self.agent(top["agent"])
        routes_raw = top.get("routes", {} if "agent" in top else None)  # an agent alone needs no routes
        if not isinstance(routes_raw, dict) or not (routes_raw or "agent" in top):
            raise self.fail(None, "routes", f"expected a mapping of route names to routes, found {routes_raw!r}")
        names = [str(name) for name in routes_raw]
        for name in names:
            if names.count(name) > 1:  # e.g. 1 and "1": one route name twice
                raise self.fail(None, "routes", f"route name {name!r} is given twice (as a number and as text)")
        routes = tuple(
            self.route(name, raw, defaults) for name, raw in zip(names, routes_raw.values())
        )
        if "agent" in top:  # its TLS port, and DTLS on the same port number
            agent = extra["agent"].route
            self.check_clashes((*routes, agent, dataclasses.replace(agent, scheme="udp")))
        else:
            self.check_clashes(routes)
        if "status" in top:
            extra["status"] = self.status(top["status"])
        if "resolver" in top:
            extra["resolver"] = self.resolver(top["resolver"])
        if "shutdown_timeout" in top:
            extra["shutdown_timeout"] = self.value(
                None, "shutdown_timeout", top["shutdown_timeout"], parse_duration
            )
        return Config(path=self.path, routes=routes, **extra)

    def resolver(self, raw: object) -> ResolverConfig:
        block = self.mapping(None, "resolver", raw, _RESOLVER_FIELDS)
        settings: dict[str, Any] = {
            key: self.value(None, f"resolver.{key}", block[key], _positive_duration)
            for key in ("dns_min_ttl", "dns_max_ttl", "dns_max_stale") if key in block
        }
        if "servers" in block:
            servers = block["servers"]
            if not isinstance(servers, list) or not servers:
                self._raise(None, "resolver.servers", 'expected a list of "IP:port" DNS servers')
            settings["servers"] = tuple(
                self.value(None, f"resolver.servers[{i}]", entry, _dns_server) for i, entry in enumerate(servers)
            )
        config = ResolverConfig(**settings)
        if config.dns_min_ttl > config.dns_max_ttl:
            self._raise(None, "resolver.dns_min_ttl", "must not be above dns_max_ttl")
        return config

    def status(self, raw: object) -> StatusConfig:
        block = self.mapping(None, "status", raw, _STATUS_FIELDS)
        if "listen" not in block:
            self._raise(None, "status.listen", 'missing (an IP:port such as "127.0.0.1:9180")')
        endpoint = self.value(None, "status.listen", block["listen"], parse_status_listen)
        if "acl" in block:
            return StatusConfig(endpoint, self.acl(None, block["acl"], "status.acl"))
        return StatusConfig(endpoint)

    def defaults(self, raw: object) -> dict[str, Any]:
        if raw is None:
            return {}
        defaults = self.mapping(None, "defaults", raw, TUNABLES)
        return {
            key: self.value(None, f"defaults.{key}", value, TUNABLES[key].parse)
            for key, value in defaults.items()
        }

    def top_proxy_protocol(self, top: _YAMLMapping) -> ProxyProtocolConfig:
        """The top-level block, also accepted as GoDoxy's C{entrypoint.proxy_protocol}."""
        if "entrypoint" in top:
            entrypoint = self.mapping(None, "entrypoint", top["entrypoint"], ("proxy_protocol",))
            if "proxy_protocol" in top and "proxy_protocol" in entrypoint:
                self._raise(None, "entrypoint.proxy_protocol", "given twice: also at the top level")
            if "proxy_protocol" in entrypoint:
                return self.proxy_protocol(None, "entrypoint.proxy_protocol", entrypoint["proxy_protocol"])
        if "proxy_protocol" in top:
            return self.proxy_protocol(None, "proxy_protocol", top["proxy_protocol"])
        return ProxyProtocolConfig()

    def acl(self, route: str | None, raw: object, name: str = "acl") -> AccessList:
        try:
            return AccessList.from_config(raw, os.path.dirname(self.path))
        except AclError as e:
            field_path, _, message = str(e).partition(": ")
            self._raise(route, name + field_path.removeprefix("acl"), message)

    def proxy_protocol(self, route: str | None, name: str, raw: object) -> ProxyProtocolConfig:
        raw = self.mapping(route, name, raw, _PROXY_FIELDS)
        settings: dict[str, Any] = {}
        if "mode" in raw:
            settings["mode"] = self.value(route, f"{name}.mode", raw["mode"], _choice(*PROXY_MODES))
        for key in ("timeout", "detect_timeout"):
            if key in raw:
                settings[key] = self.value(route, f"{name}.{key}", raw[key], parse_duration)
        trusted = raw.get("trusted_proxies", [])
        if not isinstance(trusted, list):
            self._raise(route, f"{name}.trusted_proxies", f"expected a list of addresses or CIDR blocks, found {trusted!r}")
        settings["trusted_proxies"] = tuple(
            self.value(route, f"{name}.trusted_proxies[{i}]", entry, parse_network)
            for i, entry in enumerate(trusted)
        )
        config = ProxyProtocolConfig(**settings)
        if config.mode != "disabled" and not config.trusted_proxies:
            self._raise(
                route, f"{name}.trusted_proxies",
                f"mode {config.mode} needs at least one trusted proxy "
                "(to trust every peer, write 0.0.0.0/0 and ::/0)",
            )
        return config

    def route(self, name: str, raw: object, defaults: dict[str, Any]) -> RouteConfig:
        raw = self.mapping(name, "", raw, (*_ROUTE_ONLY, *TUNABLES))
        if "scheme" not in raw:
            self._raise(name, "scheme", "missing (one of " + ", ".join(SCHEMES) + ")")
        scheme = self.value(name, "scheme", raw["scheme"], _choice(*SCHEMES))
        protocol, family = scheme_protocol(scheme), scheme[3:]
        if "port" not in raw:
            self._raise(name, "port", 'missing ("LISTEN:TARGET", e.g. "2222:22")')
        if name == AGENT_ROUTE:
            self._raise(name, "", f"{AGENT_ROUTE} is the agent's own name: name the route otherwise")
        if "agent" in raw:
            return self.agent_route(name, raw, defaults)
        if "gateway" in raw:
            return self.gateway_route(name, raw, defaults)
        if "targets" in raw:
            return self.targets_route(name, raw, defaults)
        ports = self.value(name, "port", raw["port"], parse_ports)
        listen_port, target_port = ports.listen, ports.target

        bind = self.value(name, "bind", raw.get("bind", "0.0.0.0" if family == "4" else "::"), parse_address)
        host = self.value(name, "host", raw.get("host", "localhost"), parse_host)
        for key, address in (("bind", bind), ("host", host)):
            self.check_family(name, key, scheme, address)

        settings: dict[str, Any] = {}
        if protocol == "tcp":
            settings["proxy_protocol"] = defaults["proxy_protocol"]
        if "proxy_protocol" in raw:  # a UDP route's own block only: the top-level one is for TCP
            settings["proxy_protocol"] = self.proxy_protocol(name, "proxy_protocol", raw["proxy_protocol"])
        settings["acl"] = self.acl(name, raw["acl"]) if "acl" in raw else defaults["acl"]
        for key, tunable in TUNABLES.items():
            if key in raw:
                if protocol not in tunable.protocols:
                    only = "/".join(sorted(tunable.protocols))
                    self._raise(name, key, f"only supported for {only} routes, not {scheme}")
                settings[key] = self.value(name, key, raw[key], tunable.parse)
            elif key in defaults and protocol in tunable.protocols:
                settings[key] = defaults[key]
        settings.update(self.tls_settings(name, raw, protocol, host))
        if ports.size > 1 and settings.get("sni"):
            self._raise(name, "port", "port ranges are not supported on routes with sni")
        settings.update(self.balancing(name, raw))
        if "healthcheck" in raw and ports.target_range:
            self._raise(name, "healthcheck", "not supported with a range of target ports (it checks one)")
        if "healthcheck" in raw:  # one target, checked: a pool of one
            settings["targets"] = (TargetSpec(host, target_port),)
        for key in _TARGETS_FIELDS[1:]:
            if key in raw and not settings.get("targets"):
                self._raise(name, key, "only for routes with targets (or, for healthcheck, a host)")
        return RouteConfig(
            name=name, scheme=scheme, bind=bind, listen_port=listen_port,
            host=host, target_port=target_port, port_count=ports.size, target_range=ports.target_range, **settings,
        )

    def targets_route(self, name: str, raw: _YAMLMapping, defaults: dict[str, Any]) -> RouteConfig:
        """
        A route with several targets: C{port} is the listening port alone,
        and C{host} has no place (each target names its own).
        """
        if "host" in raw:
            self._raise(name, "targets", "a route has either host (and a target port) or targets, not both")
        entries = raw["targets"]
        if not isinstance(entries, list) or not entries:
            self._raise(name, "targets", 'expected a list of "host:port" or {host, port, weight, backup} entries')
        specs = tuple(self.target(name, f"targets[{i}]", entry) for i, entry in enumerate(entries))
        scheme = raw["scheme"]
        for i, spec in enumerate(specs):
            self.check_family(name, f"targets[{i}]", scheme, spec.host)
        if all(spec.backup for spec in specs):
            self._raise(name, "targets", "every target is a backup: mark at least one as primary")
        listen = self.value(name, "port", raw["port"], _listen_port)
        first = specs[0]
        plain = {k: v for k, v in raw.items() if k not in _TARGETS_FIELDS}  # balancing() reads them below
        plain.update(port=f"{listen}:{first.port}", host=first.host)
        route = self.route(name, plain, defaults)
        return dataclasses.replace(route, targets=specs, **self.balancing(name, raw))

    def target(self, route: str, name: str, raw: object) -> TargetSpec:
        if isinstance(raw, str):
            host, port = self.value(route, name, raw, _host_port)
            return TargetSpec(host, port)
        block = self.mapping(route, name, raw, ("host", "port", "weight", "backup"))
        for key in ("host", "port"):
            if key not in block:
                self._raise(route, f"{name}.{key}", "missing")
        return TargetSpec(
            self.value(route, f"{name}.host", block["host"], parse_host),
            self.value(route, f"{name}.port", block["port"], _target_port),
            self.value(route, f"{name}.weight", block.get("weight", 1), _integer(1, 1000)),
            self.value(route, f"{name}.backup", block.get("backup", False), _boolean),
        )

    def balancing(self, route: str, raw: _YAMLMapping) -> dict[str, Any]:
        """C{load_balance}, C{max_fails}, C{fail_timeout} and C{healthcheck}."""
        settings: dict[str, Any] = {}
        balance: dict[str, Any] = {}
        if "load_balance" in raw:
            block = self.mapping(route, "load_balance", raw["load_balance"], _LOAD_BALANCE_FIELDS)
            if "mode" in block:
                balance["mode"] = self.value(route, "load_balance.mode", block["mode"], _choice(*MODES))
            if "sticky" in block:
                balance["sticky"] = self.value(route, "load_balance.sticky", block["sticky"], _boolean)
            if "sticky_max_age" in block:
                balance["sticky_max_age"] = self.value(
                    route, "load_balance.sticky_max_age", block["sticky_max_age"], _positive_duration
                )
        if "max_fails" in raw:
            balance["max_fails"] = self.value(route, "max_fails", raw["max_fails"], _integer(0, 1000))
        if "fail_timeout" in raw:
            balance["fail_timeout"] = self.value(route, "fail_timeout", raw["fail_timeout"], _positive_duration)
        if balance:
            settings["load_balance"] = LoadBalance(**balance)
        if "healthcheck" in raw:
            block = self.mapping(route, "healthcheck", raw["healthcheck"], _HEALTHCHECK_FIELDS)
            check = self.health_check(route, "healthcheck", block)
            for key in ("send", "expect"):
                if key in block:
                    check[key] = self.value(route, f"healthcheck.{key}", block[key], _probe_bytes)
            disabled = self.value(route, "healthcheck.disable", block.get("disable", False), _boolean)
            settings["healthcheck"] = None if disabled else HealthCheck(**check)
        return settings

    def health_check(self, route: str | None, where: str, block: _YAMLMapping) -> dict[str, Any]:
        """C{interval}, C{timeout} and C{retries} of a C{healthcheck} block (GoDoxy's names)."""
        check: dict[str, Any] = {
            key: self.value(route, f"{where}.{key}", block[key], _positive_duration)
            for key in ("interval", "timeout") if key in block
        }
        if "retries" in block:
            check["retries"] = self.value(route, f"{where}.retries", block["retries"], _integer(1, 1000))
        return check

    def tls_settings(self, route: str, raw: _YAMLMapping, protocol: RouteProtocol, host: str) -> dict[str, Any]:
        """C{tls}, C{upstream_tls}, C{sni} and C{tls_passthrough}, checked together."""
        present = [key for key in ("tls", "upstream_tls", "sni", "tls_passthrough") if key in raw]
        if not present:
            return {}
        if protocol != "tcp":
            self._raise(route, present[0], "only supported for tcp routes")
        settings: dict[str, Any] = {}
        if "tls" in raw:
            settings["tls"] = self.tls(route, raw["tls"])
        if "upstream_tls" in raw:
            settings["upstream_tls"] = self.upstream_tls(route, raw["upstream_tls"], host)
        if "tls_passthrough" in raw:
            settings["tls_passthrough"] = self.value(route, "tls_passthrough", raw["tls_passthrough"], _boolean)
        if "sni" in raw:
            settings["sni"] = self.value(route, "sni", raw["sni"], _server_names)
        if settings.get("tls_passthrough"):
            if not settings.get("sni"):
                self._raise(route, "tls_passthrough", "needs sni: the names whose TLS streams this route relays as they are")
            if "tls" in settings:
                self._raise(route, "tls_passthrough", "a route either terminates TLS (tls) or passes it through, not both")
        elif settings.get("sni") and "tls" not in settings:
            self._raise(route, "sni", "give tls (to terminate) or tls_passthrough: true (to relay the TLS stream as it is)")
        return settings

    def fields(
        self, route: str | None, name: str, block: _YAMLMapping, parsers: Mapping[str, Callable[[object], Any]]
    ) -> dict[str, Any]:
        """The fields of C{block} that C{parsers} names, each parsed."""
        return {key: self.value(route, f"{name}.{key}", block[key], parse) for key, parse in parsers.items() if key in block}

    def tls_file(self, route: str | None, name: str, raw: object) -> str:
        """A certificate, key or CA file, relative to the route file's directory."""
        location = self.value(route, name, raw, _nonempty_text)
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), location)

    def tls(self, route: str, raw: object) -> TLSConfig:
        from . import tlscontext  # pyOpenSSL is only loaded for files that use TLS

        block = self.mapping(route, "tls", raw, _TLS_FIELDS)
        for key in ("cert", "key"):
            if key not in block:
                self._raise(route, f"tls.{key}", "missing (a PEM file)")
        settings: dict[str, Any] = {
            key: self.tls_file(route, f"tls.{key}", block[key]) for key in ("cert", "key", "chain", "client_ca") if key in block
        }
        settings.update(self.fields(route, "tls", block, _TLS_SETTINGS))
        if settings.get("verify_client", "none") != "none" and "client_ca" not in settings:
            self._raise(route, "tls.client_ca", f"verify_client {settings['verify_client']} needs a client_ca file")
        if "client_ca" in settings and settings.get("verify_client", "none") == "none":
            self._raise(route, "tls.verify_client", "client_ca is given: say optional or require (none would ignore it)")
        config = TLSConfig(**settings)
        try:
            tlscontext.server_context(config)
            digest = tlscontext.file_digest(config.cert, config.key, config.chain, config.client_ca)
        except tlscontext.TLSSetupError as e:
            self._raise(route, "tls", str(e))
        return dataclasses.replace(config, digest=digest)

    def upstream_tls(self, route: str, raw: object, host: str) -> UpstreamTLSConfig:
        from . import tlscontext

        block = self.mapping(route, "upstream_tls", raw, _UPSTREAM_TLS_FIELDS)
        settings: dict[str, Any] = {
            key: self.tls_file(route, f"upstream_tls.{key}", block[key]) for key in ("ca", "cert", "key") if key in block
        }
        if ("cert" in settings) != ("key" in settings):
            self._raise(route, "upstream_tls.cert", "a client certificate needs both cert and key")
        settings.update(self.fields(route, "upstream_tls", block, _UPSTREAM_TLS_SETTINGS))
        config = UpstreamTLSConfig(**settings)
        try:
            tlscontext.client_context(config)
            digest = tlscontext.file_digest(config.ca, config.cert, config.key)
        except tlscontext.TLSSetupError as e:
            self._raise(route, "upstream_tls", str(e))
        return dataclasses.replace(config, digest=digest)

    def gateway_route(self, name: str, raw: _YAMLMapping, defaults: dict[str, Any]) -> RouteConfig:
        """
        A TCP route whose clients name their target (L{streamrelay.gateway}):
        C{port} is the listening port alone, and C{host} has no place.
        """
        if scheme_protocol(raw["scheme"]) != "tcp" or "host" in raw:
            self._raise(name, "gateway", "only for tcp routes, which then have no host (clients name the target)")
        listen = self.value(name, "port", raw["port"], _listen_port)
        plain = self.route(name, {**{k: v for k, v in raw.items() if k != "gateway"}, "port": f"{listen}:1"}, defaults)
        return dataclasses.replace(plain, target_port=0, gateway=self.gateway(name, raw["gateway"]))

    def gateway(self, route: str, raw: object) -> GatewayConfig:
        block = self.mapping(route, "gateway", raw, (*_GATEWAY_FIELDS, "secret_file", "secret_env", "allow_targets"))
        sources = [key for key in ("secret_file", "secret_env") if key in block]
        if len(sources) != 1:
            self._raise(route, "gateway.secret_file", "give exactly one of secret_file and secret_env (never the secret itself)")
        source = sources[0]
        location = self.value(route, f"gateway.{source}", block[source], _nonempty_text)
        try:
            if source == "secret_file":
                with open(os.path.join(os.path.dirname(self.path), location), "rb") as f:
                    secret = f.read().removesuffix(b"\n").removesuffix(b"\r")
            else:
                secret = os.environ.get(location, "").encode()
        except OSError as e:
            self._raise(route, f"gateway.{source}", f"cannot read the secret: {e}")
        if not secret:
            self._raise(route, f"gateway.{source}", f"the secret in {location!r} is missing or empty")
        targets = block.get("allow_targets")
        if not isinstance(targets, list) or not targets:
            self._raise(route, "gateway.allow_targets", "required: a list of NETWORK:PORTS entries, or [any]")
        settings: dict[str, Any] = {
            key: self.value(route, f"gateway.{key}", block[key], parse) for key, parse in _GATEWAY_FIELDS.items() if key in block
        }
        settings[source] = location
        rules = tuple(
            self.value(route, f"gateway.allow_targets[{i}]", entry, _target_rule) for i, entry in enumerate(targets)
        )
        return GatewayConfig(secret=secret, allow_targets=rules, **settings)

    def agent_route(self, name: str, raw: _YAMLMapping, defaults: dict[str, Any]) -> RouteConfig:
        """A route whose target the agent it names dials (one target: the agent checks it)."""
        for key in ("gateway", "targets", "healthcheck", "upstream_tls"):
            if key in raw:
                self._raise(name, "agent", f"not with {key}: the agent reaches one host and port, in the clear")
        wanted = raw["agent"]
        link = next((link for link in self.links if link.name == wanted), None)
        if link is None:
            known = ", ".join(link.name for link in self.links) or "none"
            self._raise(name, "agent", f"{wanted!r} is not in agents (known: {known})")
        plain = self.route(name, {k: v for k, v in raw.items() if k != "agent"}, defaults)
        return dataclasses.replace(plain, agent=link)

    def agent_links(self, raw: object) -> tuple[AgentLinkConfig, ...]:
        from . import tlscontext

        if not isinstance(raw, dict) or not raw:
            self._raise(None, "agents", "expected a mapping of agent names to {address, ca, cert, key, server_name}")
        links = []
        for name, entry in raw.items():
            where = f"agents.{name}"
            block = self.mapping(None, where, entry, _AGENT_LINK_FIELDS)
            for key in ("address", "ca", "cert", "key"):
                if key not in block:
                    self._raise(None, f"{where}.{key}", "missing")
            host, port = self.value(None, f"{where}.address", block["address"], _host_port)
            files = {key: self.tls_file(None, f"{where}.{key}", block[key]) for key in ("ca", "cert", "key")}
            settings: dict[str, Any] = self.fields(None, where, block, {"server_name": _nonempty_text})
            if "healthcheck" in block:
                check = self.mapping(None, f"{where}.healthcheck", block["healthcheck"], _AGENT_HEALTHCHECK_FIELDS)
                settings["healthcheck"] = HealthCheck(**self.health_check(None, f"{where}.healthcheck", check))
            link = AgentLinkConfig(
                name=str(name), host=host, port=port, ca=files["ca"], cert=files["cert"], key=files["key"], **settings
            )
            try:
                tlscontext.client_context(link.upstream)
                digest = tlscontext.file_digest(link.ca, link.cert, link.key)
            except tlscontext.TLSSetupError as e:
                self._raise(None, where, str(e))
            links.append(dataclasses.replace(link, digest=digest))
        return tuple(links)

    def agent(self, raw: object) -> AgentConfig:
        from . import tlscontext

        block = self.mapping(None, "agent", raw, _AGENT_FIELDS)
        for key in ("listen", "ca", "cert", "key"):
            if key not in block:
                self._raise(None, f"agent.{key}", "missing")
        bind, port = self.value(None, "agent.listen", block["listen"], _listen_address)
        files = {key: self.tls_file(None, f"agent.{key}", block[key]) for key in ("ca", "cert", "key")}
        targets = block.get("allow_targets")
        if not isinstance(targets, list) or not targets:
            self._raise(None, "agent.allow_targets", "required: a list of NETWORK:PORTS entries, or [any]")
        rules = tuple(self.value(None, f"agent.allow_targets[{i}]", entry, _target_rule) for i, entry in enumerate(targets))
        settings = self.fields(None, "agent", block, {"header_timeout": _positive_duration})
        config = AgentConfig(
            bind=bind, port=port, ca=files["ca"], cert=files["cert"], key=files["key"], allow_targets=rules, **settings
        )
        try:
            tlscontext.server_context(config.tls)
            digest = tlscontext.file_digest(config.ca, config.cert, config.key)
        except tlscontext.TLSSetupError as e:
            self._raise(None, "agent", str(e))
        return dataclasses.replace(config, digest=digest)

    def check_family(self, route: str, key: str, scheme: Scheme, address: str) -> None:
        try:
            version = ipaddress.ip_address(address).version
        except ValueError:
            return  # a host name: resolved within the scheme's family at dial time
        wanted = scheme[3:]
        if wanted and str(version) != wanted:
            self._raise(route, key, f"expected an IPv{wanted} address for scheme {scheme}, found {address!r}")

    def check_clashes(self, routes: tuple[RouteConfig, ...]) -> None:
        """
        Two routes may not listen on one address, unless both route by
        C{sni} on exactly the same address, agreeing on what applies before
        the name is known, with no server name twice.
        """
        for i, first in enumerate(routes):
            for second in routes[i + 1 :]:
                if first.protocol != second.protocol or not _binds_overlap(first.bind, second.bind):
                    continue
                common = _common_port(first, second)
                if common is not None:
                    if first.sni and second.sni and first.bind == second.bind:
                        self.check_sharing(first, second)
                        continue
                    ranges = first.port_count > 1 or second.port_count > 1
                    raise self.fail(
                        second.name, "port",
                        f"{second.protocol} {second.listen} clashes with route "
                        f"{first.name!r} listening on {first.listen}" + (f" (both take port {common})" if ranges else ""),
                    )


    def check_sharing(self, first: RouteConfig, second: RouteConfig) -> None:
        for key in _SHARED_PORT_FIELDS:
            if getattr(first, key) != getattr(second, key):
                raise self.fail(
                    second.name, key,
                    f"differs from route {first.name!r}, which shares {second.listen} by sni: "
                    "routes on one address must agree on it",
                )
        common = sorted(set(first.sni) & set(second.sni))
        if common:
            raise self.fail(second.name, "sni", f"{common[0]!r} is also route {first.name!r}'s, on {second.listen}")


def _server_names(value: object) -> tuple[str, ...]:
    """C{sni}: server names, C{*.example.org} wildcards, C{"*"} for the default."""
    from .clienthello import NameTable

    if not isinstance(value, list) or not value:
        raise _Invalid('a list of server names (exact, "*.example.org", or "*" for the default)')
    names: list[str] = []
    for entry in value:
        if not isinstance(entry, str):
            raise _Invalid(f"server names as text, not {entry!r}")
        try:
            name = NameTable.normalize(entry)
        except ValueError as e:
            raise _Invalid(f"server names ({entry!r}: {e})") from None
        if name in names:
            raise _Invalid(f"each server name once ({name!r} is there twice)")
        names.append(name)
    return tuple(names)


def _host_port(value: object) -> tuple[str, int]:
    """C{host:port}, C{[v6]:port}."""
    expected = 'a "host:port" target ("[2001:db8::1]:443" for IPv6)'
    if not isinstance(value, str):
        raise _Invalid(expected)
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", value)
    if not match:
        raise _Invalid(expected)
    try:
        host = parse_host(match.group(1) or match.group(3))
        return host, _port_number(match.group(2) or match.group(4), 1, "a target")
    except _Invalid as e:
        raise _Invalid(f"{expected}: {e}") from None


def _listen_address(value: object) -> tuple[str, int]:
    """C{IP:port} (C{[v6]:port}) or a port alone (all addresses), for the agent's listening port."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"[::]:{value}"
    if not isinstance(value, str) or ":" not in value:
        raise _Invalid('an "IP:port" to listen on ("[::]:8890" for every address)')
    host, _, port = value.rpartition(":")
    return parse_address(host.removeprefix("[").removesuffix("]")), _port_number(port, 0, "a listening")


def _target_port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Invalid("a target port from 1 to 65535")
    return _port_number(str(value), 1, "a target")


def _dns_server(value: object) -> tuple[str, int]:
    """C{IP} (port 53) or C{IP:port}, C{[v6]:port}."""
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value)), 53
        except ValueError:
            pass
    host, port = _host_port(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise _Invalid('a DNS server as "IP" or "IP:port"') from None
    return host, port


def _probe_bytes(value: object) -> bytes:
    """C{send}/C{expect}: text, with C{\\r}, C{\\n} and C{\\xNN} escapes as YAML's double quotes give them."""
    if not isinstance(value, str) or not value:
        raise _Invalid('non-empty text such as "PING\\r\\n"')
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        raise _Invalid("text of characters up to \\xff (bytes)") from None


def _alpn(value: object) -> tuple[str, ...]:
    if (
        not isinstance(value, list) or not value
        or not all(isinstance(p, str) and 0 < len(p.encode()) < 256 for p in value)
    ):
        raise _Invalid('a list of protocol names such as ["h2", "http/1.1"]')
    return tuple(value)


def _tls_version(value: object) -> TLSVersion:
    text = str(value) if isinstance(value, (str, float)) else ""
    if text not in ("1.2", "1.3"):
        raise _Invalid('"1.2" or "1.3"')
    return "1.2" if text == "1.2" else "1.3"


#: The C{tls} and C{upstream_tls} fields that are not file names.
_TLS_SETTINGS: Mapping[str, Callable[[object], Any]] = {
    "verify_client": _choice("none", "optional", "require"),
    "alpn": _alpn,
    "min_version": _tls_version,
    "handshake_timeout": _positive_duration,
}
_UPSTREAM_TLS_SETTINGS: Mapping[str, Callable[[object], Any]] = {
    "server_name": parse_host,
    "verify": _boolean,
    "alpn": _alpn,
    "min_version": _tls_version,
}


def _listen_port(value: object) -> int:
    """A gateway route's C{port}: the listening port alone."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Invalid("a listening port from 0 to 65535")
    if isinstance(value, str) and "-" in value:
        raise _Invalid("a listening port from 0 to 65535 (port ranges are not supported with gateway or targets)")
    return _port_number(str(value), 0, "a listening")


def _nonempty_text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid("a file name or an environment variable's name")
    return value


def _target_rule(value: object) -> TargetRule:
    try:
        return parse_target_rule(value)
    except ValueError as e:
        raise _Invalid(str(e)) from None


#: A C{gateway} block's settings besides the secret and C{allow_targets}.
_GATEWAY_FIELDS: Mapping[str, Callable[[object], Any]] = {
    "format": _choice("openssl", "sealed"),
    "kdf": _choice("sha256", "md5", "pbkdf2"),
    "iterations": _integer(1, 10_000_000),
    "retry": _integer(1, 100),
    "timeout": _positive_duration,
    "line_timeout": _positive_duration,
    "max_line": _integer(64, 65536),
    "max_failures": _integer(0, 1_000_000),
    "failure_window": _positive_duration,
    "ban_time": _positive_duration,
    "cache_size": _integer(0, 1_000_000),
}


def _common_port(a: RouteConfig, b: RouteConfig) -> int | None:
    """The lowest listening port two routes both take, if any (0, a port the system picks, never is)."""
    low = max(a.listen_port, b.listen_port)
    return low if 0 < low <= min(a.listen_ports[-1], b.listen_ports[-1]) else None


def _binds_overlap(a: str, b: str) -> bool:
    """
    Whether two listeners on the same port and protocol would collide.  The
    dual-stack C{::} covers every address; C{0.0.0.0} covers every IPv4 one.
    """
    if a == b or "::" in (a, b):
        return True
    return "0.0.0.0" in (a, b) and "." in a and "." in b

