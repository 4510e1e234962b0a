"""
What C{--check} and C{--dump} print: one line per route, and the effective
configuration as YAML.

The line is a summary to read and grep; the YAML is the whole truth.  It
writes every route with every field that applies to it, defaults filled in
and the top-level C{defaults}, C{proxy_protocol} and C{acl} blocks already
applied, so that C{parse_config(dump(config))} gives C{config} back (but for
its C{path}).
"""

from __future__ import annotations

from typing import Any

import yaml

from .acl import AccessList
from .addresses import join_host_port
from .bandwidth import Bandwidth, Directions
from .config import (
    TUNABLES, AgentConfig, AgentLinkConfig, Config, ProxyProtocolConfig, ResolverConfig, RouteConfig, RouteLoader, parse_duration, port_span,
)
from .gateway import GatewayConfig
from .ratelimit import RateLimit

__all__ = ["describe", "dump", "report"]


def report(config: Config, as_yaml: bool = False) -> str:
    """The text a check prints: the route lines, or the YAML with C{as_yaml}."""
    if as_yaml:
        return dump(config)
    return "".join(describe(route) + "\n" for route in config.routes)


def describe(route: RouteConfig) -> str:
    """
    C{NAME: SCHEME LISTEN -> TARGET (NOTES)}: the notes name what decides
    who gets through and how (server names and TLS, inbound and outbound PROXY headers, the ACL,
    the limits in force, C{reuse_port}, and C{splice} for every TCP route).
    """
    notes = []
    if route.sni:
        notes.append(f"sni {' '.join(route.sni)}" + (" passthrough" if route.tls_passthrough else ""))
    if route.tls is not None:
        notes.append("tls" + (f" verify_client {route.tls.verify_client}" if route.tls.verify_client != "none" else ""))
    if route.upstream_tls is not None:
        upstream = route.upstream_tls
        notes.append(f"upstream_tls {upstream.server_name or route.host}" + ("" if upstream.verify else " unverified"))
    if route.agent is not None:
        notes.append(f"agent {route.agent.name} ({join_host_port(route.agent.host, route.agent.port)})")
    if route.proxy_protocol.mode != "disabled":
        notes.append(f"proxy_protocol {route.proxy_protocol.mode}")
    if route.relay_proxy_protocol_header:
        notes.append(f"relay_proxy_protocol_header v{route.proxy_protocol_version}")
    if route.udp_proxy_protocol:
        notes.append("udp_proxy_protocol")
    acl = route.acl
    if not acl.permits_everything:  # its stages in the order a client meets them
        stages = ["allow_local"] if acl.allow_local else []
        stages += [f"{len(rules)} {verdict}" for verdict, rules in (("deny", acl.deny), ("allow", acl.allow)) if rules]
        stages.append("default allow" if acl.default_allow else "default deny")
        notes.append("acl " + " ".join(stages))
    limits = ("max_connections", "max_connections_per_client") if route.protocol == "tcp" else ("max_udp_sessions",)
    notes.extend(f"{limit} {getattr(route, limit)}" for limit in limits if getattr(route, limit))
    if route.rate_limit is not None:
        notes.append("rate_limit " + " ".join(f"{key} {value}" for key, value in _rate_limit(route.rate_limit).items()))
    if route.bandwidth is not None:
        notes.append("bandwidth " + " ".join(
            f"{key} {value}" if isinstance(value, str) else f"{key} " + " ".join(f"{d} {r}" for d, r in value.items())
            for key, value in _bandwidth(route.bandwidth).items()
        ))
    if route.targets:
        balance, check = route.load_balance, route.healthcheck
        notes.append(f"load_balance {balance.mode}" + (" sticky" if balance.sticky else ""))
        notes.append(f"healthcheck {_duration(check.interval)}" if check is not None else "no healthcheck")
    if route.reuse_port:
        notes.append("reuse_port")
    if route.protocol == "tcp":
        notes.append(f"splice {_scalar(route.splice)}")
    target = f"gateway ({route.gateway.format}, {len(route.gateway.allow_targets)} allow_targets)" if route.gateway else route.dst
    line = f"{route.name}: {route.scheme} {route.listen} -> {target}"
    return f"{line} ({', '.join(notes)})" if notes else line


def dump(config: Config) -> str:
    """C{config} as a route file: every field written out, nothing left to defaults."""
    document: dict[str, Any] = {"shutdown_timeout": _duration(config.shutdown_timeout)}
    if config.status is not None:
        document["status"] = {"listen": config.status.endpoint, "acl": _acl(config.status.acl)}
    if config.resolver != ResolverConfig() or any(route.targets for route in config.routes):
        document["resolver"] = _resolver(config.resolver)
    if config.agent is not None:
        document["agent"] = _agent(config.agent)
    if config.agents:
        document["agents"] = {link.name: _agent_link(link) for link in config.agents}
    document["routes"] = {route.name: _route(route) for route in config.routes}
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=None, allow_unicode=True)


def _route(route: RouteConfig) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "scheme": route.scheme,
        "bind": route.bind,
        "host": route.host,
        "port": f"{port_span(route.listen_ports)}:{port_span(route.target_ports)}",
    }
    for key, tunable in TUNABLES.items():
        value = getattr(route, key)
        # dial_timeout 0 stands for its default, connect_timeout × (retries + 1),
        # and rate_limit or bandwidth None for no limit, which the file can only
        # express by leaving the field out.
        if route.protocol in tunable.protocols and not (key in ("dial_timeout", "rate_limit", "bandwidth") and not value):
            fields[key] = _field(value)
    fields["proxy_protocol"] = _proxy_protocol(route.proxy_protocol)
    fields["acl"] = _acl(route.acl)
    if route.sni:
        fields["sni"] = list(route.sni)
        fields["tls_passthrough"] = route.tls_passthrough
    for key in ("tls", "upstream_tls"):
        settings = getattr(route, key)
        if settings is not None:  # the files as absolute paths; the digest is the loader's own
            fields[key] = {
                name: list(value) if isinstance(value, tuple) else _field(value)
                for name, value in vars(settings).items() if value not in (None, ()) and name != "digest"
            }
    if route.targets:  # each target names its host and port: the listening port alone
        del fields["host"]
        fields["port"] = str(route.listen_port)
        fields.update(_targets(route))
    if route.gateway is not None:  # clients name the target: no host, the listening port alone
        del fields["host"]
        fields["port"] = str(route.listen_port)
        fields["gateway"] = _gateway(route.gateway)
    if route.agent is not None:
        fields["agent"] = route.agent.name
    return fields


def _agent(settings: AgentConfig) -> dict[str, Any]:
    return {
        "listen": join_host_port(settings.bind, settings.port), "ca": settings.ca, "cert": settings.cert,
        "key": settings.key, "allow_targets": [rule.text for rule in settings.allow_targets],
        "header_timeout": _duration(settings.header_timeout),
    }


def _agent_link(link: AgentLinkConfig) -> dict[str, Any]:
    check = link.healthcheck
    return {
        "address": join_host_port(link.host, link.port), "ca": link.ca, "cert": link.cert, "key": link.key,
        "server_name": link.server_name,
        "healthcheck": {
            "interval": _duration(check.interval), "timeout": _duration(check.timeout),
            **({"retries": check.retries} if check.retries is not None else {}),
        },
    }


def _gateway(settings: GatewayConfig) -> dict[str, Any]:
    """Where the secret is kept, never the secret."""
    fields = {
        key: _duration(value) if isinstance(value, float) else value
        for key, value in vars(settings).items() if key != "secret" and value is not None
    }
    fields["allow_targets"] = [rule.text for rule in settings.allow_targets]
    return fields


def _targets(route: RouteConfig) -> dict[str, Any]:
    """C{targets} as mappings, the balancing and check settings (a plain host with a check is a list of one)."""
    balance, check = route.load_balance, route.healthcheck
    fields: dict[str, Any] = {
        "targets": [vars(spec).copy() for spec in route.targets],
        "load_balance": {
            "mode": balance.mode, "sticky": balance.sticky, "sticky_max_age": _duration(balance.sticky_max_age),
        },
        "max_fails": balance.max_fails,
        "fail_timeout": _duration(balance.fail_timeout),
    }
    if check is not None:  # none: no healthcheck, or disable: true
        fields["healthcheck"] = {
            key: value.decode("latin-1") if isinstance(value, bytes) else _field(value)
            for key, value in vars(check).items() if value is not None
        }
    return fields


def _resolver(settings: ResolverConfig) -> dict[str, Any]:
    """The DNS servers (none listed: the system's) and the bounds on their answers."""
    fields: dict[str, Any] = {"servers": [join_host_port(*server) for server in settings.servers]} if settings.servers else {}
    for key in ("dns_min_ttl", "dns_max_ttl", "dns_max_stale"):
        fields[key] = _duration(getattr(settings, key))
    return fields


def _field(value: object) -> object:
    """A tunable's value as the route file writes it."""
    if isinstance(value, float):
        return _duration(value)
    if isinstance(value, Bandwidth):
        return _bandwidth(value)
    return _rate_limit(value) if isinstance(value, RateLimit) else value


def _bandwidth(setting: Bandwidth) -> dict[str, Any]:
    """Each limit as one rate where both directions share it, else as C{{up, down}}."""
    limits: dict[str, Directions | None] = vars(setting)
    return {
        key: str(limit.up) if limit.up == limit.down else {
            direction: str(rate) for direction, rate in vars(limit).items() if rate is not None
        }
        for key, limit in limits.items() if limit is not None
    }


def _rate_limit(setting: RateLimit) -> dict[str, Any]:
    """The rates as text (C{20/s}); C{burst} only beside C{per_client}."""
    fields: dict[str, Any] = {}
    if setting.per_client is not None:
        fields.update(per_client=str(setting.per_client), burst=setting.burst)
    if setting.per_route is not None:
        fields["per_route"] = str(setting.per_route)
    return fields


def _proxy_protocol(settings: ProxyProtocolConfig) -> dict[str, Any]:
    return {
        "mode": settings.mode,
        "trusted_proxies": [str(network) for network in settings.trusted_proxies],
        "timeout": _duration(settings.timeout),
        "detect_timeout": _duration(settings.detect_timeout),
    }


def _acl(acl: AccessList) -> dict[str, Any]:
    """
    The rules as written, so that denials in the log name the same rule, and
    the GeoIP database by its absolute path, so that the dump loads anywhere.
    """
    fields: dict[str, Any] = {
        "default": "allow" if acl.default_allow else "deny",
        "allow_local": acl.allow_local,
        "allow": list(acl.allow),
        "deny": list(acl.deny),
    }
    if acl.maxmind is not None:
        fields["maxmind"] = {"database": acl.maxmind.path}
    return fields


_UNITS = (("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1))


def _duration(seconds: float) -> str | float:
    """
    C{5s}, C{1m30s}, C{300ms}: as the README writes durations, where such
    text reads back to exactly C{seconds}; otherwise the number itself.
    """
    left = round(seconds * 1000)
    parts = []
    for unit, size in _UNITS:
        count, left = divmod(left, size)
        if count:
            parts.append(f"{count}{unit}")
    text = "".join(parts) or "0s"
    return text if parse_duration(text) == seconds else seconds


def _scalar(value: object) -> str:
    """A value as YAML writes it: C{auto}, C{true}, C{false}."""
    return str(value).lower()


class _Dumper(yaml.SafeDumper):
    """
    Quotes every string that YAML 1.1 readers or the route file's own loader
    (which reads numbers the YAML 1.2 way) would take for something else:
    C{"2222:22"} for the first, a host named C{1.0e5} for the second.
    """


_Dumper.yaml_implicit_resolvers = {
    first: [*yaml.SafeDumper.yaml_implicit_resolvers.get(first, []), *RouteLoader.yaml_implicit_resolvers.get(first, [])]
    for first in {*yaml.SafeDumper.yaml_implicit_resolvers, *RouteLoader.yaml_implicit_resolvers}
}
