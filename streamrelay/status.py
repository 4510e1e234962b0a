"""
The status endpoint: Prometheus metrics, a status page and its JSON, and a
health check, served by C{twisted.web} on the C{status} block's address.

Everything is read from the routes when a request comes: the relay path
keeps its plain counters (L{streamrelay.stats}) and nothing more, so
turning the endpoint on costs a connection nothing.  Requests are answered
on the reactor thread, which alone may read the pair and session tables
(prometheus_client's own Twisted resource collects in a thread pool); what
a request lists is bounded by its C{limit}, so a relay with 100,000 pairs
still answers quickly.
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from itertools import chain, islice
from typing import TYPE_CHECKING, Any, Union

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from . import events, service
from .acl import AccessList
from .addresses import describe, join_host_port
from .balance import Target
from .config import StatusConfig
from .events import Throttle
from .inbound import ProxyHeaderProtocol
from .interfaces import IRelayReactor
from .paths import SplicePath
from .targets import TargetPool
from .tcp import Pair
from .udp import Session

if TYPE_CHECKING:
    from twisted.web.http import _GenericHTTPChannelProtocol  # what Site.buildProtocol is typed to return

__all__ = ["DEFAULT_LIMIT", "StatusService"]

#: Connections listed per route when a request gives no C{limit}.
DEFAULT_LIMIT = 100
#: How often the status page reloads itself, in seconds.
PAGE_REFRESH = 5

AnyRoute = Union["service.RouteService", "service.UDPRouteService"]


class StatusService(Service):
    """
    Serves what the relay's routes know about themselves.  Its port is bound
    with the routes' (L{bind}, in C{privilegedStartService}), and closed
    once they have drained, so that C{/healthz} says 503 meanwhile.
    """

    name = "status"

    def __init__(self, config: StatusConfig, relay: service.RelayService, reactor: IRelayReactor) -> None:
        self.config = config
        self.relay = relay
        self.reactor = reactor
        self.port: IListeningPort | None = None
        self.registry = CollectorRegistry()
        self.registry.register(RelayCollector(self))
        ProcessCollector(registry=self.registry)
        self.site = GuardedSite(Page(self), config.acl, reactor)

    # -- the port

    def bind(self) -> None:
        """Listen on the configured endpoint; raise L{service.StartError} if it cannot."""
        endpoint = self.config.endpoint
        try:
            self.port = listen_now(serverFromString(self.reactor, endpoint), self.site)
        except CannotListenError as e:
            raise service.StartError(f"streamrelay: status: cannot listen on {endpoint}: {e.socketError}") from None
        except Exception as e:  # a malformed endpoint string, an unreadable certificate, no socket passed
            raise service.StartError(f"streamrelay: status: cannot listen on {endpoint}: {e}") from None
        events.emit(LogLevel.info, "status-start", listen=address_text(self.port.getHost()))

    def unbind(self) -> Deferred[None] | None:
        """Close the port (at stop, or when a sibling failed to start)."""
        port, self.port = self.port, None
        if port is None:
            return None
        events.emit(LogLevel.info, "status-stop", listen=address_text(port.getHost()))
        return port.stopListening()

    def privilegedStartService(self) -> None:
        if self.port is None:
            self.bind()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:
            self.bind()
        super().startService()

    def stopService(self) -> Deferred[None]:
        """
        Keep answering (C{/healthz}: 503) until the TCP routes' pairs are
        gone (their own C{stopService} closes them within
        C{shutdown_timeout}), then close.
        """
        super().stopService()
        tcp_routes = [*self.routes(), *self.relay.retiring]  # routes removed by a reload still drain
        pairs = [pair.done for route in tcp_routes if isinstance(route, service.RouteService)
                 for pair in route.pairs()]
        drained: Deferred[Any] = DeferredList(pairs)
        return drained.addCallback(lambda _: self.unbind())

    # -- what the resources read

    def routes(self) -> Iterator[AnyRoute]:
        """The relay's TCP and UDP routes in force, in the configuration's order."""
        for child in self.relay.routes():
            if isinstance(child, (service.RouteService, service.UDPRouteService)):
                yield child

    @property
    def draining(self) -> bool:
        """Whether the relay is stopping."""
        return self.relay.draining

    def health(self) -> tuple[int, str]:
        """200 while every route listens; 503 while draining or with a route down."""
        if self.draining:
            return 503, "draining"
        down = [route.route.name for route in self.routes() if route.port is None]
        if down:
            return 503, f"not listening: {', '.join(down)}"
        return 200, "ok"

    def snapshot(self, name: str | None = None, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
        """
        Every route (or only C{name}: L{KeyError} if there is none) with at
        most C{limit} of its live connections, oldest first.
        """
        routes = [route for route in self.routes() if name is None or route.route.name == name]
        if name is not None and not routes:
            raise KeyError(name)
        now = self.reactor.seconds()
        return {
            "health": self.health()[1],
            "config_loaded_at": self.relay.loaded_at,
            "routes": [route_snapshot(route, now, limit) for route in routes],
            "agents": agents_snapshot(self.relay.agent_health.targets, now),
        }


# ---------------------------------------------------------------- the routes


def route_snapshot(route: AnyRoute, now: float, limit: int) -> dict[str, Any]:
    """A route's settings that matter, and its oldest C{limit} live connections."""
    config = route.route
    settings: dict[str, Any] = {"acl": not config.acl.permits_everything, "reuse_port": config.reuse_port}
    if isinstance(route, service.RouteService):
        settings.update(
            max_connections=config.max_connections,
            max_connections_per_client=config.max_connections_per_client,
            idle_timeout=config.idle_timeout, dial_timeout=config.dial_budget, splice=route.factory.splicing,
            proxy_protocol=config.proxy_protocol.mode,
            relay_proxy_protocol_header=config.relay_proxy_protocol_header,
        )
        pairs = live_pairs(route)  # oldest first: generations in order, each in accept order
        active = len(pairs)
        connections = [pair_snapshot(pair, now) for pair in islice(pairs, limit)]
    else:
        settings.update(max_udp_sessions=config.max_udp_sessions, udp_idle_timeout=config.udp_idle_timeout)
        sessions = route.relay.sessions  # a dict: oldest first already
        active = len(sessions)
        connections = [session_snapshot(session, config.dst, now) for session in islice(sessions.values(), limit)]
    return {
        "name": config.name, "protocol": config.protocol, "scheme": config.scheme,
        "listen": route.events.fields["listen"], "listening": route.port is not None, "target": config.dst,
        "settings": settings, "active": active, "connections": connections,
        "targets": [] if route.pool is None else targets_snapshot(route.pool, now),
    }


def targets_snapshot(pool: TargetPool, now: float) -> list[dict[str, Any]]:
    """A route's several targets, primaries then backups: health, load, and the last failure."""
    balancer = pool.balancer
    return [
        {
            "target": join_host_port(target.host, target.port), "weight": target.weight, "backup": target.backup,
            "up": target.up, "eligible": balancer.eligible(target), "active": target.active,
            "picked": target.picked, "failures": target.failures,
            "last_check": None if target.last_check is None else round(now - target.last_check, 3),
            "last_error": target.last_error,
        }
        for target in balancer.targets
    ]


def agents_snapshot(targets: Mapping[str, Target], now: float) -> list[dict[str, Any]]:
    """The C{agents} entries: what their probes say."""
    return [
        {
            "agent": name, "address": join_host_port(target.host, target.port), "up": target.up,
            "last_check": None if target.last_check is None else round(now - target.last_check, 3),
            "last_error": target.last_error,
        }
        for name, target in targets.items()
    ]


def live_pairs(route: service.RouteService) -> Collection[Pair]:
    """A TCP route's open pairs, oldest first, of every generation (older ones live on after a reload)."""
    return route.pairs()


def pair_snapshot(pair: Pair, now: float) -> dict[str, Any]:
    """A live TCP pair: its real client (after PROXY) and the socket peer it came from."""
    client, target = pair.client, pair.target
    header = client.transport if isinstance(client.transport, ProxyHeaderProtocol) else None
    idle = pair.idle_seconds()
    return {
        "id": pair.id, "client": pair.peer, "peer": header.peer if header is not None else pair.peer,
        "target": describe(target.transport.getPeer()) if target is not None else None,
        "state": str(pair.state), "path": "splice" if isinstance(pair.path, SplicePath) else "twisted",
        "bytes_up": client.received, "bytes_down": target.received if target is not None else 0,
        "age": round(now - pair.started, 3), "idle": None if idle is None else round(idle, 3),
    }


def session_snapshot(session: Session, dst: str, now: float) -> dict[str, Any]:
    """
    A live UDP session: its target is the address its socket is connected
    to.  Its idle time is known to the sweep's precision: none when a
    datagram has moved since the last sweep.
    """
    port = session.port
    client = join_host_port(*session.client)
    moved = session.datagrams_up + session.datagrams_down != session.seen
    return {
        "id": session.id, "client": client, "peer": join_host_port(*session.peer),
        "target": join_host_port(*port.getHandle().getpeername()[:2]) if port is not None else dst,
        "state": "checking" if session.decision is not None else "dialing" if port is None else "relaying",
        "bytes_up": session.bytes_up, "bytes_down": session.bytes_down,
        "datagrams_up": session.datagrams_up, "datagrams_down": session.datagrams_down,
        "dropped": session.dropped,
        "age": round(now - session.started, 3), "idle": None if moved else round(now - session.last_active, 3),
    }


def listen_now(endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> IListeningPort:
    """
    The port C{endpoint} bound, or its error raised: every endpoint type the
    configuration accepts listens at once, before twistd drops privileges.
    """
    outcome: list[IListeningPort | Failure] = []
    endpoint.listen(factory).addBoth(outcome.append)
    [result] = outcome
    if isinstance(result, Failure):
        result.raiseException()
    return result


def address_text(address: IAddress) -> str:
    """A listening address as the C{status-start} event gives it: C{host:port} or C{unix:PATH}."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return describe(address)
    if isinstance(address, UNIXAddress):
        return "unix:" + os.fsdecode(address.name or b"")
    return str(address)


# ---------------------------------------------------------------- metrics

#: Refusal kinds (the events' actions, L{events.RefusalLog}) as the metrics name them.
REFUSAL_KINDS = {
    "tcp": {
        "denied": "acl", "limited": "per-client", "rejected": "proxy-header", "refused": "hook",
        "gateway": "gateway-line", "banned": "gateway-ban", "rate-limited": "rate", "tls-failed": "tls-handshake",
        "no-route": "sni-no-route", "bad-hello": "sni-bad-hello", "hello-timeout": "sni-hello-timeout",
        "full": "sni-full",
    },
    "udp": {"denied": "acl", "limited": "limit", "refused": "hook", "rate-limited": "rate"},
}

#: Per-route metric families: name (without C{streamrelay_}), help, whether a
#: counter, and the label telling the samples of one route apart, if any.
ROUTE_METRICS: tuple[tuple[str, str, bool, str | None], ...] = (
    ("connections_accepted", "TCP connections accepted (after any PROXY header), refused ones included", True, None),
    ("connections_closed", "TCP connections closed, by the reason of their closed event", True, "reason"),
    ("refused", "TCP connections or new UDP sources' datagrams refused, by kind", True, "kind"),
    ("dial_failures", "Targets not reached, by reason", True, "reason"),
    ("proxy_header_errors", "Inbound PROXY headers refused, by reason", True, "reason"),
    ("bytes_up", "Bytes read from clients", True, None),
    ("bytes_down", "Bytes read from targets", True, None),
    ("pairs_active", "Live TCP pairs", False, None),
    ("pairs_splicing", "Live TCP pairs on the splice path", False, None),
    ("pairs_spliced", "TCP pairs that went on the splice path", True, None),
    ("connections_awaiting_header", "TCP connections whose PROXY header is awaited", False, None),
    ("udp_sessions_active", "Live UDP sessions", False, None),
    ("udp_sessions_opened", "UDP sessions opened", True, None),
    ("udp_sessions_closed", "UDP sessions closed, by reason (idle: expired)", True, "reason"),
    ("datagrams_up", "Datagrams from clients", True, None),
    ("datagrams_down", "Datagrams from targets", True, None),
    ("datagrams_dropped", "Datagrams that could not be sent", True, None),
    ("datagrams_oversized", "Datagrams dropped as too large: with the outbound PROXY header, or for DTLS", True, None),
    ("target_up", "1 while the target may get connections (checks say up, not out after max_fails), else 0", False,
     "target"),
    ("target_active", "Pairs (UDP: sessions) open or dialing to the target", False, "target"),
    ("target_failures", "Failed dials (UDP: unreachable sessions) to the target", True, "target"),
)

#: A sample of a per-route family: its name, its value, its extra label's value.
Sample = tuple[str, float, str | None]


class RelayCollector(Collector):
    """Reads the relay's own counters at scrape time, the live connections' included."""

    def __init__(self, status: StatusService) -> None:
        self.status = status

    def collect(self) -> Iterable[Metric]:
        families = {
            name: (CounterMetricFamily if counter else GaugeMetricFamily)(
                f"streamrelay_{name}", text, labels=["route", "protocol", *([label] if label else [])]
            )
            for name, text, counter, label in ROUTE_METRICS
        }
        for route in self.status.routes():
            labels = [route.route.name, route.route.protocol]
            samples = tcp_samples(route) if isinstance(route, service.RouteService) else udp_samples(route)
            if isinstance(route, service.AgentService):
                samples = chain(samples, agent_datagram_samples(route))
            for name, value, extra in chain(samples, target_samples(route)):
                families[name].add_metric(labels if extra is None else [*labels, extra], value)
        yield from families.values()
        relay = self.status.relay
        agents = GaugeMetricFamily(
            "streamrelay_agent_up", "1 while the agent's probes pass (or none has failed retries times), else 0",
            labels=["agent"],
        )
        for name, target in relay.agent_health.targets.items():
            agents.add_metric([name], int(target.up))
        yield agents
        reloads = CounterMetricFamily("streamrelay_reloads", "Configuration reloads, by result", labels=["result"])
        done = relay.reloads
        for result in ("succeeded", "failed"):
            reloads.add_metric([result], done[result])
        yield reloads
        yield GaugeMetricFamily(
            "streamrelay_config_loaded_timestamp_seconds", "When the running configuration was loaded",
            value=relay.loaded_at,
        )
        yield CounterMetricFamily(
            "streamrelay_log_lines_dropped", "Log lines dropped because the log's reader fell behind",
            value=events.dropped_lines(),
        )


def refusal_samples(route: AnyRoute) -> Iterator[Sample]:
    """Every kind of refusal the route's protocol has, zero or not."""
    counts = route.refusals.counts
    for action, kind in REFUSAL_KINDS[route.route.protocol].items():
        yield "refused", counts.get(action, 0), kind


def target_samples(route: AnyRoute) -> Iterator[Sample]:
    """Each of a route's several targets: eligible or not, its load, its failed dials."""
    if route.pool is None:
        return
    balancer = route.pool.balancer
    for target in balancer.targets:
        name = join_host_port(target.host, target.port)
        yield "target_up", balancer.eligible(target), name
        yield "target_active", target.active, name
        yield "target_failures", target.failures, name


def tcp_samples(route: service.RouteService) -> Iterator[Sample]:
    stats, pairs = route.stats, live_pairs(route)
    up, down, splicing = stats.bytes_up, stats.bytes_down, 0
    for pair in pairs:  # one pass, the fewest lookups: about 30 ms per 100,000 pairs
        up += pair.client.received
        target = pair.target
        if target is not None:
            down += target.received
            splicing += isinstance(pair.path, SplicePath)
    yield "connections_accepted", stats.accepted, None
    for reason, count in stats.closed.items():
        yield "connections_closed", count, reason
    yield from refusal_samples(route)
    for reason, count in stats.dial_failures.items():
        yield "dial_failures", count, reason
    for reason, count in stats.header_errors.items():
        yield "proxy_header_errors", count, reason
    yield "bytes_up", up, None
    yield "bytes_down", down, None
    yield "pairs_active", len(pairs), None
    yield "pairs_splicing", splicing, None
    yield "pairs_spliced", stats.spliced, None
    awaiting = sum(len(headers.pending) for _, headers in route.generations if headers is not None)
    yield "connections_awaiting_header", awaiting, None


def agent_datagram_samples(route: service.AgentService) -> Iterator[Sample]:
    """The agent's DTLS sessions, as a UDP route's (their bytes join the route's as they close)."""
    stats = route.stats
    yield "udp_sessions_active", 0 if route.datagrams is None else len(route.datagrams.peers), None
    yield "udp_sessions_opened", stats.sessions_opened, None
    for reason, count in stats.sessions_closed.items():
        yield "udp_sessions_closed", count, reason
    yield "datagrams_up", stats.datagrams_up, None
    yield "datagrams_down", stats.datagrams_down, None
    yield "datagrams_dropped", stats.datagrams_dropped, None


def udp_samples(route: service.UDPRouteService) -> Iterator[Sample]:
    stats, sessions = route.stats, route.relay.sessions.values()
    yield "udp_sessions_active", len(sessions), None
    yield "udp_sessions_opened", stats.sessions_opened, None
    for reason, count in stats.sessions_closed.items():
        yield "udp_sessions_closed", count, reason
    yield from refusal_samples(route)
    yield "bytes_up", stats.bytes_up + sum(s.bytes_up for s in sessions), None
    yield "bytes_down", stats.bytes_down + sum(s.bytes_down for s in sessions), None
    yield "datagrams_up", stats.datagrams_up + sum(s.datagrams_up for s in sessions), None
    yield "datagrams_down", stats.datagrams_down + sum(s.datagrams_down for s in sessions), None
    yield "datagrams_dropped", stats.datagrams_dropped + sum(s.dropped for s in sessions), None
    yield "datagrams_oversized", stats.datagrams_oversized, None
    for reason, count in stats.header_errors.items():
        yield "proxy_header_errors", count, reason


# ---------------------------------------------------------------- twisted.web


class GuardedSite(Site):
    """
    A site that closes TCP peers its ACL refuses before reading a byte
    (a unix socket's peers have no address: its file's permissions guard
    it), and logs no request (a scrape every few seconds would fill the log).
    """

    noisy = False

    def __init__(self, root: IResource, acl: AccessList, reactor: IRelayReactor) -> None:
        super().__init__(root)
        self.acl = acl
        self.throttle = Throttle(reactor)

    def buildProtocol(self, addr: IAddress | None) -> _GenericHTTPChannelProtocol | None:
        if isinstance(addr, (IPv4Address, IPv6Address)):
            decision = self.acl.check(addr.host)
            if not decision.allowed:
                suppressed = self.throttle.allow()
                if suppressed is not None:
                    events.emit(LogLevel.warn, "status-denied", client=describe(addr), rule=decision.rule,
                                suppressed=suppressed)
                return None
        return super().buildProtocol(addr)

    def log(self, request: http.Request) -> None:
        pass


class StatusResource(Resource):
    """A leaf answering GETs with what L{StatusService} says, never cached."""

    isLeaf = True

    def __init__(self, status: StatusService) -> None:
        super().__init__()
        self.status = status

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        code, content_type, body = self.answer(request)
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type.encode())
        return body

    def answer(self, request: Request) -> tuple[int, str, bytes]:
        """The status code, content type and body."""
        raise NotImplementedError


class Metrics(StatusResource):
    """C{/metrics}: Prometheus text, or OpenMetrics for a scraper that asks for it."""

    def answer(self, request: Request) -> tuple[int, str, bytes]:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept is not None else "")
        return 200, content_type, encoder(self.status.registry)


class Health(StatusResource):
    """C{/healthz}: for load balancers and orchestrators, the code says it all."""

    def answer(self, request: Request) -> tuple[int, str, bytes]:
        code, text = self.status.health()
        return code, "text/plain; charset=utf-8", f"{text}\n".encode()


class SnapshotResource(StatusResource):
    """A view of L{StatusService.snapshot}: C{?route=NAME} and C{?limit=N} choose what it lists."""

    content_type = ""

    def answer(self, request: Request) -> tuple[int, str, bytes]:
        args = request.args or {}
        name = args.get(b"route", [None])[-1]
        limit = args.get(b"limit", [str(DEFAULT_LIMIT).encode()])[-1]
        if not limit.isdigit():
            return 400, "text/plain; charset=utf-8", b"limit must be a whole number\n"
        try:
            snapshot = self.status.snapshot(name.decode(errors="replace") if name is not None else None, int(limit))
        except KeyError:
            return 404, "text/plain; charset=utf-8", b"no such route\n"
        return 200, self.content_type, self.render_snapshot(snapshot).encode()

    def render_snapshot(self, snapshot: dict[str, Any]) -> str:
        raise NotImplementedError


class StatusJSON(SnapshotResource):
    """C{/status.json}: the snapshot for programs."""

    content_type = "application/json"

    def render_snapshot(self, snapshot: dict[str, Any]) -> str:
        return json.dumps(snapshot, indent=1)


class Page(SnapshotResource):
    """The status page at C{/}, and the parent of the other resources."""

    isLeaf = False
    content_type = "text/html; charset=utf-8"

    def __init__(self, status: StatusService) -> None:
        super().__init__(status)
        self.putChild(b"metrics", Metrics(status))
        self.putChild(b"status.json", StatusJSON(status))
        self.putChild(b"healthz", Health(status))

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self if path == b"" else super().getChild(path, request)

    def render_snapshot(self, snapshot: dict[str, Any]) -> str:
        return render_page(snapshot)


# ---------------------------------------------------------------- the page

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1b1f24; background: #fff; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
p.summary { color: #57606a; margin: 0 0 1em; }
.ok { color: #1a7f37; font-weight: 600; } .bad { color: #cf222e; font-weight: 600; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3em .7em; border-bottom: 1px solid #d0d7de; white-space: nowrap; }
th { background: #f6f8fa; } tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, td.addr { font-family: ui-monospace, monospace; }
td.addr.client { font-weight: 600; }
"""


def render_page(snapshot: dict[str, Any]) -> str:
    """The whole page, styles included: nothing to fetch, so it works offline."""
    health = snapshot["health"]
    loaded = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snapshot["config_loaded_at"]))
    routes = snapshot["routes"]
    rows = "".join(
        _row(route["name"], route["protocol"], (route["listen"], "addr"), (route["target"], "addr"),
             "listening" if route["listening"] else "down", (route["active"], "num"),
             _settings(route["settings"]))
        for route in routes
    )
    sections = _agents(snapshot["agents"]) + "".join(_targets(route) + _connections(route) for route in routes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{PAGE_REFRESH}">
<title>streamrelay status</title><style>{_STYLE}</style></head>
<body><h1>streamrelay</h1>
<p class="summary"><span class="{'ok' if health == 'ok' else 'bad'}">{_text(health)}</span>
 · {len(routes)} routes · configuration loaded {loaded} · page of {time.strftime("%H:%M:%S")},
 refreshed every {PAGE_REFRESH} s · <a href="metrics">metrics</a> · <a href="status.json">JSON</a></p>
<table><tr><th>Route</th><th>Protocol</th><th>Listen</th><th>Target</th><th>State</th><th>Live</th>
<th>Settings</th></tr>{rows}</table>{sections}</body></html>
"""


def _targets(route: dict[str, Any]) -> str:
    """
    A route's several targets: C{up}, C{down} (its active checks failed)
    or C{out} (after C{max_fails} failed dials), its load and last failure.
    """
    targets = route["targets"]
    if not targets:
        return ""
    rows = "".join(
        _row((t["target"], "addr"), (t["weight"], "num"), "backup" if t["backup"] else "primary",
             ("up", "ok") if t["eligible"] else ("down", "bad") if not t["up"] else ("out", "bad"),
             (t["active"], "num"), (t["picked"], "num"), (t["failures"], "num"),
             (_seconds(t["last_check"]), "num"), t["last_error"] or "")
        for t in targets
    )
    up = sum(t["eligible"] for t in targets)
    return (f"<h2>{_text(route['name'])}: {up} of {len(targets)} targets up</h2>"
            "<table><tr><th>Target</th><th>Weight</th><th>Role</th><th>State</th><th>Live</th><th>Picked</th>"
            f"<th>Failed dials</th><th>Checked ago</th><th>Last error</th></tr>{rows}</table>")


def _agents(agents: list[dict[str, Any]]) -> str:
    """The C{agents} entries: up or down by their probes, and the last failure."""
    if not agents:
        return ""
    rows = "".join(
        _row(a["agent"], (a["address"], "addr"), ("up", "ok") if a["up"] else ("down", "bad"),
             (_seconds(a["last_check"]), "num"), a["last_error"] or "")
        for a in agents
    )
    return ("<h2>Agents</h2><table><tr><th>Agent</th><th>Address</th><th>State</th><th>Checked ago</th>"
            f"<th>Last error</th></tr>{rows}</table>")


def _connections(route: dict[str, Any]) -> str:
    connections = route["connections"]
    title = f"<h2>{_text(route['name'])}: {route['active']} live"
    if len(connections) < route["active"]:
        title += f" (the oldest {len(connections)} shown)"
    title += "</h2>"
    if not connections:
        return title
    rows = "".join(
        _row(c["id"], (c["client"], "addr client"), (c["peer"], "addr"), (c["target"] or "", "addr"), c["state"],
             (_bytes(c["bytes_up"]), "num"), (_bytes(c["bytes_down"]), "num"), (_seconds(c["age"]), "num"),
             (_seconds(c["idle"]), "num"))
        for c in connections
    )
    return (f"{title}<table><tr><th>#</th><th>Client</th><th>Peer</th><th>Target</th><th>State</th>"
            f"<th>Up</th><th>Down</th><th>Age</th><th>Idle</th></tr>{rows}</table>")


def _settings(settings: dict[str, Any]) -> str:
    """The settings in force: a switch by its name, a value after its name; off, zero and disabled left out."""
    shown = (key if value is True else f"{key} {value:g}s" if isinstance(value, float) else f"{key} {value}"
             for key, value in settings.items() if value not in (False, 0, "disabled"))
    return ", ".join(shown) or "defaults"


def _row(*cells: object) -> str:
    """A table row; a cell is a value or a C{(value, class)} pair."""
    parts = []
    for cell in cells:
        value, css = cell if isinstance(cell, tuple) else (cell, "")
        parts.append(f'<td class="{css}">{_text(value)}</td>' if css else f"<td>{_text(value)}</td>")
    return f"<tr>{''.join(parts)}</tr>"


def _text(value: object) -> str:
    return html.escape(str(value))


def _bytes(count: int) -> str:
    exponent = min(3, (count.bit_length() - 1) // 10) if count else 0
    return f"{count / 1024 ** exponent:.1f} {'KMG'[exponent - 1]}iB" if exponent else f"{count} B"


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    minutes, seconds = divmod(int(value), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02}m"
    return f"{minutes}m{seconds:02}s" if minutes else f"{value:.1f}s"
