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
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import procstat
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
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


class Skipped(Exception):
    """The relay (or one of its protocols) cannot run here; the message says why."""


@dataclass(frozen=True)
class Targets:
    """The ports of the targets: one per TCP route, and the UDP echo."""

    tcp: dict[str, int]
    udp: int


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

    @abstractmethod
    def start(self, context: Context) -> Running:
        """Start listening in front of C{context.targets}; raise L{Skipped} if it cannot."""

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

    def start(self, context: Context) -> Running:
        return Running(dict(context.targets.tcp), context.targets.udp)


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
    C{streamrelay gateway-encrypt}; C{processes} copies share the ports
    (needs C{reuse_port}), one on each CPU in turn: the second shares the
    load generator's CPU, as it would share a 2-core machine with anything.  A refused config raises L{Skipped} with
    C{refusal} and the relay's message.  C{source} is the checkout whose
    code runs (another revision, for C{--baseline}).
    """

    def __init__(self, name: str, *, route_fields: dict[str, Any] | None = None,
                 top_level: dict[str, Any] | None = None, processes: int = 1,
                 refusal: str = "config refused", with_udp: bool = True,
                 routes: tuple[str, ...] = TCP_ROUTES, source: Path = REPO,
                 udp_fields: dict[str, Any] | None = None, gateway: dict[str, Any] | None = None,
                 only_workloads: tuple[str, ...] | None = None, only_reason: str = "") -> None:
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
        self.only_workloads = only_workloads
        self.only_reason = only_reason
        #: L{source_digest} at each start, in order.
        self.sources: list[str] = []

    def config(self, context: Context, tcp: dict[str, int], udp: int | None) -> dict[str, Any]:
        routes: dict[str, Any] = {
            name: {"scheme": "tcp4", "bind": LOOPBACK, **self._target(context, port, context.targets.tcp[name]),
                   **self.route_fields}
            for name, port in tcp.items()
        }
        if udp is not None:
            routes["udp"] = {"scheme": "udp4", "bind": LOOPBACK, "host": LOOPBACK,
                             "port": f"{udp}:{context.targets.udp}", **self.udp_fields}
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

    def _target(self, context: Context, port: int, target: int) -> dict[str, Any]:
        """A TCP route's fields naming its target: a gateway route lets its clients name it."""
        if self.gateway is None:
            return {"host": LOOPBACK, "port": f"{port}:{target}"}
        return {"port": port, "gateway": {"secret_file": str(self._secret_file(context)),
                                          "allow_targets": [f"{LOOPBACK}:{target}"], **self.gateway}}

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

    def _launch(self, context: Context, tcp: dict[str, int], udp: int | None) -> Running:
        self.sources.append(source_digest(self.source))
        path = context.workdir / f"{self.name}.yml"
        path.write_text(yaml.safe_dump(self.config(context, tcp, udp), sort_keys=False))
        prefixes = self._gateway_lines(context, tcp)
        twistd = str(Path(sys.executable).parent / "twistd")
        processes: list[Process] = []
        routes = len(tcp) + (udp is not None)
        for index in range(self.processes):
            process = start(
                f"{self.name}-{index}",
                [twistd, "-n", "--pidfile=", "--logger=streamrelay.events.text_observer",
                 "streamrelay", "--config", str(path)],
                (context.cpus.relay, context.cpus.load)[index % 2], context.workdir,
                env=self._python_path(),
            )
            processes.append(process)
            try:
                wait_until(lambda process=process: _started_routes(process) >= routes, [process])
            except RuntimeError as e:
                for started in processes:
                    started.stop()
                raise Skipped(f"{self.refusal}: {e}") from None
        return Running(tcp, udp, processes, prefixes=prefixes)


def source_digest(source: Path = REPO) -> str:
    """
    A short digest of streamrelay's source as it is now: the code changes
    under a long benchmark when others work in the same tree.
    """
    h = hashlib.sha256()
    for path in sorted((source / "streamrelay").rglob("*.py")):
        h.update(path.relative_to(source).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def _started_routes(process: Process) -> int:
    """How many C{start} events the relay has logged."""
    return sum(
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
    """HAProxy in C{mode tcp} with C{option splice-auto}, one thread."""

    name = "haproxy"

    def start(self, context: Context) -> Running:
        missing = ensure("haproxy", "haproxy", have("haproxy"))
        if missing:
            raise Skipped(missing)
        tcp = self._listen_ports(context)
        listeners = "".join(
            f"listen {route}\n    bind {LOOPBACK}:{port}\n"
            f"    server {route} {LOOPBACK}:{context.targets.tcp[route]}\n"
            for route, port in tcp.items()
        )
        config = context.workdir / "haproxy.cfg"
        # HAProxy wants about 2.5 descriptors per connection within the limit.
        maxconn = (context.fd_limit - 100) * 2 // 5
        config.write_text(
            f"global\n    maxconn {maxconn}\n    nbthread 1\n"
            "defaults\n    mode tcp\n    option splice-auto\n    timeout connect 5s\n"
            "    timeout client 1h\n    timeout server 1h\n" + listeners
        )
        process = start("haproxy", ["haproxy", "-db", "-f", str(config)], context.cpus.relay, context.workdir)
        return self._await([process], tcp)


class Nginx(Relay):
    """nginx's stream module, one worker, its own prefix in the work directory."""

    name = "nginx"
    relays_udp = True

    def start(self, context: Context) -> Running:
        missing = ensure("nginx", "nginx", have("nginx")) or ensure(
            "nginx's stream module", "libnginx-mod-stream", NGINX_STREAM_MODULE.exists
        )
        if missing:
            raise Skipped(missing)
        tcp = self._listen_ports(context)
        udp = context.ports.take()
        prefix = context.workdir / "nginx"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        servers = "".join(
            f"    server {{ listen {LOOPBACK}:{port}; proxy_pass {LOOPBACK}:{context.targets.tcp[route]}; }}\n"
            for route, port in tcp.items()
        )
        servers += (f"    server {{ listen {LOOPBACK}:{udp} udp; "
                    f"proxy_pass {LOOPBACK}:{context.targets.udp}; proxy_timeout 10s; }}\n")
        user = "user root;\n" if os.geteuid() == 0 else ""
        (prefix / "nginx.conf").write_text(
            f"load_module {NGINX_STREAM_MODULE};\n{user}worker_processes 1;\n"
            f"worker_rlimit_nofile {context.fd_limit};\npid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/logs/error.log warn;\n"
            f"events {{ worker_connections {context.fd_limit - 100}; }}\n"
            f"stream {{\n{servers}}}\n"
        )
        process = start(
            "nginx", ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
            context.cpus.relay, context.workdir,
        )
        return self._await([process], tcp, udp)


def baseline_relays(source: Path) -> list[Relay]:
    """streamrelay's default and no-splice variants, run from another checkout."""
    return [
        StreamRelay("baseline", source=source),
        StreamRelay("baseline-nosplice", route_fields={"splice": False}, with_udp=False, source=source),
    ]


def all_relays() -> list[Relay]:
    """Every relay, in the order of the report."""
    return [
        Direct(),
        StreamRelay("streamrelay"),
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
