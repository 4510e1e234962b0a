"""
How to start and stop each relay in front of the benchmark's targets.

A started relay is a L{Running}: one listening port per target (the TCP
routes named in L{TCP_ROUTES}, and C{udp} if it relays UDP) and the
processes whose CPU and memory count as the relay's.  C{direct} has no
process: its "ports" are the targets' own.

A relay that cannot run here (a tool missing, a config field not
implemented yet) raises L{Skipped}; the benchmark prints the reason and goes
on with the others.  A relay whose C{only_workloads} leaves a workload out
is skipped for it, with C{only_reason}.

Relays with C{tls_modes} also take the TLS workloads: L{Relay.start_tls}
starts them again with a TLS route per mode and service (see L{tls}),
instead of the routes above.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from . import procstat, tls
from .tools import (
    LOOPBACK,
    REPO,
    Cpus,
    PortAllocator,
    Process,
    ensure,
    have,
    listening,
    start,
    wait_until,
)

#: The TCP targets every relay forwards to, by route name.
TCP_ROUTES = ("iperf", "sockperf", "reply", "bulk")
#: The name of the UDP route.
UDP_ROUTE = "udp"
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


class Skipped(Exception):
    """The relay (or one of its protocols) cannot run here; the message says why."""


@dataclass(frozen=True)
class Targets:
    """The ports of the targets: one per TCP route, and the UDP echo."""

    tcp: dict[str, int]
    udp: int
    #: The TLS target's ports, by TLS service (none if it could not start).
    tls: dict[str, int] = field(default_factory=dict)
    #: A second target for some routes (C{reply} and C{udp}), for load balancing.
    twins: dict[str, int] = field(default_factory=dict)

    def port(self, route: str) -> int:
        """The target of C{route}: a key of C{tcp}, or C{"udp"}."""
        return self.udp if route == UDP_ROUTE else self.tcp[route]


@dataclass
class Running:
    """A started relay."""

    tcp: dict[str, int]
    udp: int | None
    processes: list[Process] = field(default_factory=list)
    #: Why UDP is not relayed, when C{udp} is None.
    udp_skipped: str = ""
    #: Per TCP route, a file holding what a client sends first (a gateway's line).
    prefixes: dict[str, Path] = field(default_factory=dict)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def cpu_seconds(self) -> float:
        return procstat.cpu_seconds(self.pids)

    def memory_bytes(self) -> int:
        return procstat.memory_bytes(self.pids)

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


@dataclass
class Context:
    """What every relay needs to start."""

    workdir: Path
    targets: Targets
    ports: PortAllocator
    cpus: Cpus
    fd_limit: int
    #: The certificates relays terminate TLS with (made when a TLS workload runs).
    certificates: tls.Certificates | None = None


@dataclass(frozen=True)
class TLSRoute:
    """One TLS listener of a relay: what it serves and where it forwards to."""

    mode: str
    service: str
    listen: int
    target: int
    #: The service's certificate, key and both in one file (used when terminating).
    cert: Path
    key: Path
    bundle: Path

    @property
    def name(self) -> str:
        return tls.route(self.mode, self.service)

    @property
    def terminates(self) -> bool:
        return self.mode == "terminate"


class Relay(ABC):
    """A way to relay: started once per benchmark, then given every workload."""

    name: str
    #: Whether it relays UDP at all (C{Running.udp} may still be None).
    relays_udp: bool = False
    #: Why not, when it does not.
    tcp_only_reason: str = "relays TCP only"
    #: The workloads it can take (None: all), and why not the others.
    only_workloads: tuple[str, ...] | None = None
    only_reason: str = ""
    #: The TLS modes it runs the TLS workloads in (none: it takes no TLS workload).
    tls_modes: tuple[str, ...] = ()

    @abstractmethod
    def start(self, context: Context) -> Running:
        """Start listening in front of C{context.targets}; raise L{Skipped} if it cannot."""

    def start_tls(self, context: Context) -> Running:
        """Start listening on L{_tls_routes} only, for the TLS workloads."""
        raise Skipped("takes no TLS workload")

    def _tls_routes(self, context: Context) -> list[TLSRoute]:
        """A route per mode and TLS service; passthrough ones only if the TLS target runs."""
        if context.certificates is None:
            raise Skipped("no certificates were made")
        routes = []
        for mode in self.tls_modes:
            for service, (plain, _) in tls.SERVICES.items():
                target = context.targets.tcp[plain] if mode == "terminate" else context.targets.tls.get(service)
                if target is not None:
                    routes.append(TLSRoute(mode, service, context.ports.take(), target,
                                           *context.certificates.for_service(service)))
        if not routes:
            raise Skipped("no TLS route: the TLS target is not running")
        return routes

    def _listen_ports(self, context: Context) -> dict[str, int]:
        return {route: context.ports.take() for route in TCP_ROUTES}

    def _await(self, processes: list[Process], tcp: dict[str, int], udp: int | None = None) -> Running:
        """Wait until every port listens; stop everything and raise if it does not."""
        running = Running(tcp, udp, processes)
        try:
            wait_until(lambda: listening(list(tcp.values()), [udp] if udp else []), processes)
        except RuntimeError as e:
            running.stop()
            raise Skipped(f"did not start: {e}") from None
        return running


class Direct(Relay):
    """No relay: the load goes straight to the targets (the physical limit)."""

    name = "direct"
    relays_udp = True
    tls_modes = ("passthrough",)

    def start(self, context: Context) -> Running:
        return Running(dict(context.targets.tcp), context.targets.udp)

    def start_tls(self, context: Context) -> Running:
        """Straight to the TLS target (the load CPU's own limit for passthrough)."""
        if not context.targets.tls:
            raise Skipped("the TLS target is not running")
        return Running({tls.route("passthrough", s): port for s, port in context.targets.tls.items()}, None)


class StreamRelay(Relay):
    """
    streamrelay, through C{twistd -n streamrelay} logging as the units in
    C{etc/} do (C{text_observer} at the default C{info} level: one C{closed}
    line per connection).

    C{route_fields} are added to every TCP route (C{splice}, C{reuse_port}),
    C{udp_fields} to the UDP route (C{udp_proxy_protocol});
    C{top_level} to the file (C{acl}); with C{gateway}, the TCP routes are
    encrypted-target gateways (that block's fields besides the secret, in a
    file of the work directory, and C{allow_targets}, the route's target
    alone), and L{Running.prefixes} holds each route's line, made by
    C{streamrelay gateway-encrypt}; with C{balance} (a C{load_balance}
    block), each route has C{targets}: its own and its twin in
    L{Targets.twins}; C{processes} copies share the ports
    (needs C{reuse_port}), one on each CPU in turn: the second shares the
    load generator's CPU, as it would share a 2-core machine with anything.  A refused config raises L{Skipped} with
    C{refusal} and the relay's message.  C{source} is the checkout whose
    code runs (another revision, for C{--baseline}).  With C{with_tls}, it takes
    the TLS workloads: terminating routes (C{tls: {cert, key}}) and
    passthrough ones (C{sni: ["*"]}, C{tls_passthrough: true}).
    """

    def __init__(self, name: str, *, route_fields: dict[str, Any] | None = None,
                 top_level: dict[str, Any] | None = None, processes: int = 1,
                 refusal: str = "config refused", with_udp: bool = True,
                 routes: tuple[str, ...] = TCP_ROUTES, source: Path = REPO,
                 udp_fields: dict[str, Any] | None = None, gateway: dict[str, Any] | None = None,
                 balance: dict[str, Any] | None = None,
                 only_workloads: tuple[str, ...] | None = None, only_reason: str = "",
                 with_tls: bool = False) -> None:
        self.name = name
        self.source = source
        self.route_fields = route_fields or {}
        self.udp_fields = udp_fields or {}
        self.top_level = top_level or {}
        self.processes = processes
        self.refusal = refusal
        self.relays_udp = with_udp
        self.tcp_only_reason = "TCP routes only in this variant"
        self.routes = routes
        self.gateway = gateway
        self.balance = balance
        self.only_workloads = only_workloads
        self.only_reason = only_reason
        self.tls_modes = tls.MODES if with_tls else ()
        #: L{source_digest} at each start, in order.
        self.sources: list[str] = []

    def config(self, context: Context, tcp: dict[str, int], udp: int | None) -> dict[str, Any]:
        routes: dict[str, Any] = {
            name: {"scheme": "tcp4", "bind": LOOPBACK, **self._target(context, name, port), **self.route_fields}
            for name, port in tcp.items()
        }
        if udp is not None:
            # Each repetition's sources are new ones and sessions idle out after 5 minutes: 4,096
            # sessions (the default limit) would refuse the fifth repetition of 1,000 sources.
            routes[UDP_ROUTE] = {"scheme": "udp4", "bind": LOOPBACK, **self._target(context, UDP_ROUTE, udp),
                                 "max_udp_sessions": 65536, **self.udp_fields}
        return {"shutdown_timeout": "1s", **self.top_level, "routes": routes}

    def start(self, context: Context) -> Running:
        tcp = {route: context.ports.take() for route in self.routes}
        if not self.relays_udp:
            return self._launch(context, tcp, None)
        udp = context.ports.take()
        try:
            return self._launch(context, tcp, udp)
        except Skipped as with_udp:
            try:
                running = self._launch(context, tcp, None)
            except Skipped:
                raise with_udp from None
            running.udp_skipped = f"UDP route refused: {with_udp}"
            return running

    def _target(self, context: Context, route: str, port: int) -> dict[str, Any]:
        """
        The fields of C{route} (listening on C{port}) naming its target: a
        gateway route lets its clients name it, a balanced one has two.
        """
        target = context.targets.port(route)
        if self.gateway is not None:
            return {"port": port, "gateway": {"secret_file": str(self._secret_file(context)),
                                              "allow_targets": [f"{LOOPBACK}:{target}"], **self.gateway}}
        if self.balance is not None:
            return {"port": port, "targets": [f"{LOOPBACK}:{t}" for t in (target, context.targets.twins[route])],
                    "load_balance": self.balance}
        return {"host": LOOPBACK, "port": f"{port}:{target}"}

    def _secret_file(self, context: Context) -> Path:
        """The gateway's secret, random, written once per run."""
        path = context.workdir / f"{self.name}.secret"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
        return path

    def _python_path(self) -> dict[str, str]:
        return {"PYTHONPATH": os.pathsep.join(filter(None, [str(self.source), os.environ.get("PYTHONPATH")]))}

    def _gateway_lines(self, context: Context, tcp: dict[str, int]) -> dict[str, Path]:
        """Each gateway route's line, from C{python -m streamrelay gateway-encrypt}."""
        if self.gateway is None:
            return {}
        options = [f"--{key}={self.gateway[key]}" for key in ("format", "kdf", "iterations") if key in self.gateway]
        lines = {}
        for name in tcp:
            completed = subprocess.run(
                [sys.executable, "-m", "streamrelay", "gateway-encrypt", "--secret-file",
                 str(self._secret_file(context)), *options, f"{LOOPBACK}:{context.targets.tcp[name]}"],
                capture_output=True, text=True, timeout=30, check=False,
                env={**os.environ, **self._python_path()},
            )
            if completed.returncode != 0 or not completed.stdout.strip():
                raise Skipped(f"gateway-encrypt failed: {completed.stderr.strip()[-300:]}")
            lines[name] = context.workdir / f"{self.name}-{name}.line"
            lines[name].write_text(completed.stdout.strip() + "\n")
        return lines

    def start_tls(self, context: Context) -> Running:
        routes = self._tls_routes(context)
        config = {"shutdown_timeout": "1s", **self.top_level,
                  "routes": {route.name: self._tls_route(route) for route in routes}}
        processes = self._spawn(context, f"{self.name}-tls", config, len(routes))
        return Running({route.name: route.listen for route in routes}, None, processes)

    def _tls_route(self, route: TLSRoute) -> dict[str, Any]:
        fields: dict[str, Any] = (
            {"tls": {"cert": str(route.cert), "key": str(route.key)}} if route.terminates
            else {"sni": ["*"], "tls_passthrough": True}
        )
        return {"scheme": "tcp4", "bind": LOOPBACK, "host": LOOPBACK, "port": f"{route.listen}:{route.target}",
                **fields, **self.route_fields}

    def _launch(self, context: Context, tcp: dict[str, int], udp: int | None) -> Running:
        prefixes = self._gateway_lines(context, tcp)
        processes = self._spawn(context, self.name, self.config(context, tcp, udp), len(tcp) + (udp is not None))
        return Running(tcp, udp, processes, prefixes=prefixes)

    def _spawn(self, context: Context, stem: str, config: dict[str, Any], routes: int) -> list[Process]:
        """Write C{config} to C{stem}.yml and start the processes on it; wait for each route's C{start}."""
        self.sources.append(source_digest(self.source))
        path = context.workdir / f"{stem}.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        twistd = str(Path(sys.executable).parent / "twistd")
        processes: list[Process] = []
        for index in range(self.processes):
            process = start(
                f"{stem}-{index}",
                [twistd, "-n", "--pidfile=", "--logger=streamrelay.events.text_observer",
                 "streamrelay", "--config", str(path)],
                (context.cpus.relay, context.cpus.load)[index % 2], context.workdir,
                env=self._python_path(),
            )
            processes.append(process)
            try:
                wait_until(partial(_started_all, process, routes), [process])
            except RuntimeError as e:
                for started in processes:
                    started.stop()
                raise Skipped(f"{self.refusal}: {e}") from None
        return processes


def source_digest(source: Path = REPO) -> str:
    """
    A short digest of streamrelay's source as it is now: the code changes
    under a long benchmark when others work in the same tree.
    """
    h = hashlib.sha256()
    for path in sorted((source / "streamrelay").rglob("*.py")):
        h.update(path.relative_to(source).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def _started_all(process: Process, routes: int) -> bool:
    """Whether the relay has logged a C{start} event for each of its C{routes}."""
    return routes <= sum(
        "[streamrelay#info] route " in line and " listening on " in line
        for line in process.stdout_path.read_text(errors="replace").splitlines()
    )


class PortForward(Relay):
    """Twisted's own C{twistd portforward}: one process per route."""

    name = "portforward"

    def start(self, context: Context) -> Running:
        tcp = self._listen_ports(context)
        twistd = str(Path(sys.executable).parent / "twistd")
        processes = [
            start(f"portforward-{route}",
                  [twistd, "-n", "--pidfile=", "portforward", "-p", f"tcp:{port}:interface={LOOPBACK}",
                   "-h", LOOPBACK, "-d", str(context.targets.tcp[route])],
                  context.cpus.relay, context.workdir)
            for route, port in tcp.items()
        ]
        return self._await(processes, tcp)


class Socat(Relay):
    """socat, forking a child per connection (and per UDP peer)."""

    name = "socat"
    relays_udp = True

    def start(self, context: Context) -> Running:
        missing = ensure("socat", "socat", have("socat"))
        if missing:
            raise Skipped(missing)
        tcp = self._listen_ports(context)
        udp = context.ports.take()
        argvs = {
            f"socat-{route}": ["socat", f"TCP4-LISTEN:{port},bind={LOOPBACK},fork,reuseaddr",
                               f"TCP4:{LOOPBACK}:{context.targets.tcp[route]}"]
            for route, port in tcp.items()
        }
        argvs["socat-udp"] = ["socat", f"UDP4-LISTEN:{udp},bind={LOOPBACK},fork,reuseaddr",
                              f"UDP4:{LOOPBACK}:{context.targets.udp}"]
        processes = [start(name, argv, context.cpus.relay, context.workdir) for name, argv in argvs.items()]
        return self._await(processes, tcp, udp)


class HAProxy(Relay):
    """
    HAProxy in C{mode tcp} with C{option splice-auto}, one thread.  For the
    TLS workloads it terminates with C{bind ... ssl crt}, or passes through
    once it has the ClientHello (C{req.ssl_hello_type}, as an SNI router
    does).
    """

    name = "haproxy"
    tls_modes = tls.MODES

    def start(self, context: Context) -> Running:
        tcp = self._listen_ports(context)
        listeners = [haproxy_listener(route, port, context.targets.tcp[route]) for route, port in tcp.items()]
        process = start_haproxy("haproxy", listeners, context.cpus.relay, context.workdir, context.fd_limit)
        return self._await([process], tcp)

    def start_tls(self, context: Context) -> Running:
        routes = self._tls_routes(context)
        listeners = [
            haproxy_listener(r.name, r.listen, r.target, crt=r.bundle if r.terminates else None,
                             after_hello=not r.terminates)
            for r in routes
        ]
        process = start_haproxy("haproxy-tls", listeners, context.cpus.relay, context.workdir, context.fd_limit)
        return self._await([process], {r.name: r.listen for r in routes})


def haproxy_listener(name: str, port: int, target: int, crt: Path | None = None,
                     after_hello: bool = False) -> str:
    """
    A C{listen} section relaying C{port} to C{target}: terminating TLS with
    the certificate and key in C{crt}, or C{after_hello} a TLS ClientHello.
    """
    bind = f"    bind {LOOPBACK}:{port}" + (f" ssl crt {crt}" if crt else "") + "\n"
    hello = ("    tcp-request inspect-delay 5s\n"
             "    tcp-request content accept if { req.ssl_hello_type 1 }\n") if after_hello else ""
    return f"listen {name}\n{bind}{hello}    server {name} {LOOPBACK}:{target}\n"


def start_haproxy(name: str, listeners: list[str], cpu: int, workdir: Path, fd_limit: int) -> Process:
    """HAProxy with C{listeners}, one thread on C{cpu}, its config in C{workdir}/C{name}.cfg."""
    missing = ensure("haproxy", "haproxy", have("haproxy"))
    if missing:
        raise Skipped(missing)
    config = workdir / f"{name}.cfg"
    # HAProxy wants about 2.5 descriptors per connection within the limit.
    maxconn = (fd_limit - 100) * 2 // 5
    config.write_text(
        f"global\n    maxconn {maxconn}\n    nbthread 1\n"
        "defaults\n    mode tcp\n    option splice-auto\n    timeout connect 5s\n"
        "    timeout client 1h\n    timeout server 1h\n" + "".join(listeners)
    )
    return start(name, ["haproxy", "-db", "-f", str(config)], cpu, workdir)


class Nginx(Relay):
    """
    nginx's stream module, one worker, its own prefix in the work directory.
    For the TLS workloads it terminates (C{listen ... ssl}) or passes through
    after reading the ClientHello (C{ssl_preread on}).
    """

    name = "nginx"
    relays_udp = True
    tls_modes = tls.MODES

    def start(self, context: Context) -> Running:
        tcp = self._listen_ports(context)
        udp = context.ports.take()
        servers = [f"listen {LOOPBACK}:{port}; proxy_pass {LOOPBACK}:{context.targets.tcp[route]};"
                   for route, port in tcp.items()]
        servers.append(f"listen {LOOPBACK}:{udp} udp; proxy_pass {LOOPBACK}:{context.targets.udp}; proxy_timeout 10s;")
        return self._await([self._run(context, "nginx", servers)], tcp, udp)

    def start_tls(self, context: Context) -> Running:
        routes = self._tls_routes(context)
        servers = [
            f"listen {LOOPBACK}:{r.listen} ssl; ssl_certificate {r.cert}; ssl_certificate_key {r.key};"
            f" proxy_pass {LOOPBACK}:{r.target};" if r.terminates
            else f"listen {LOOPBACK}:{r.listen}; ssl_preread on; proxy_pass {LOOPBACK}:{r.target};"
            for r in routes
        ]
        return self._await([self._run(context, "nginx-tls", servers)], {r.name: r.listen for r in routes})

    def _run(self, context: Context, name: str, servers: list[str]) -> Process:
        """nginx with a C{server} block for each of C{servers}, its prefix C{workdir}/C{name}."""
        missing = ensure("nginx", "nginx", have("nginx")) or ensure(
            "nginx's stream module", "libnginx-mod-stream", NGINX_STREAM_MODULE.exists
        )
        if missing:
            raise Skipped(missing)
        prefix = context.workdir / name
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        blocks = "".join(f"    server {{ {server} }}\n" for server in servers)
        user = "user root;\n" if os.geteuid() == 0 else ""
        (prefix / "nginx.conf").write_text(
            f"load_module {NGINX_STREAM_MODULE};\n{user}worker_processes 1;\n"
            f"worker_rlimit_nofile {context.fd_limit};\npid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/logs/error.log warn;\n"
            f"events {{ worker_connections {context.fd_limit - 100}; }}\n"
            f"stream {{\n{blocks}}}\n"
        )
        return start(
            name, ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
            context.cpus.relay, context.workdir,
        )


def baseline_relays(source: Path) -> list[Relay]:
    """streamrelay's default and no-splice variants, run from another checkout."""
    return [
        StreamRelay("baseline", source=source, with_tls=True),
        StreamRelay("baseline-nosplice", route_fields={"splice": False}, with_udp=False, source=source),
    ]


def all_relays() -> list[Relay]:
    """Every relay, in the order of the report."""
    return [
        Direct(),
        StreamRelay("streamrelay", with_tls=True),
        StreamRelay("streamrelay-status", top_level={"status": {"listen": f"{LOOPBACK}:0"}}),
        StreamRelay("streamrelay-udp-proxy", udp_fields={"udp_proxy_protocol": True},
                    refusal="no udp_proxy_protocol field"),
        StreamRelay("streamrelay-gateway", gateway={}, routes=("reply",), with_udp=False,
                    only_workloads=("cps", "burst", "idle"),
                    only_reason="its clients send a line first, which only loadgen does (cps, burst, idle)",
                    refusal="no gateway routes"),
        StreamRelay("streamrelay-gateway-nocache", gateway={"cache_size": 0}, routes=("reply",), with_udp=False,
                    only_workloads=("cps", "burst", "idle"),
                    only_reason="its clients send a line first, which only loadgen does (cps, burst, idle)",
                    refusal="no gateway routes"),
        StreamRelay("streamrelay-lb", balance={"mode": "roundrobin"}, routes=("reply",),
                    only_workloads=("cps", "burst", "idle", "udp"),
                    only_reason="two targets for short connections and UDP only (round robin would send"
                                " iperf3's data connections to another server than its control connection)",
                    refusal="no targets or load_balance fields"),
        StreamRelay("streamrelay-ratelimit", top_level={"defaults": {"rate_limit": {
                        "per_client": "100000/s", "burst": 100000, "per_route": "1000000/s"}}},
                    refusal="no rate_limit field"),
        StreamRelay("streamrelay-bandwidth",
                    top_level={"defaults": {"bandwidth": {"per_connection": "100GiB/s"}}},
                    refusal="no bandwidth field"),
        StreamRelay("streamrelay-nosplice", route_fields={"splice": False},
                    refusal="no splice field (the default path is the only one)", with_udp=False),
        StreamRelay("streamrelay-splice", route_fields={"splice": True},
                    refusal="splice path not implemented", with_udp=False),
        StreamRelay("streamrelay-2proc", route_fields={"reuse_port": True}, processes=2,
                    refusal="reuse_port not implemented", with_udp=False),
        PortForward(),
        Socat(),
        HAProxy(),
        Nginx(),
    ]
