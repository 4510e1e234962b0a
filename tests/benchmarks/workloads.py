"""
The workloads.  Each one measures a single run against a started relay and
returns, per variant, its figures; the runner repeats the runs, interleaved
with the other relays', and keeps medians.  Relay CPU is read from /proc
just before and just after the load tool runs, so it covers exactly the
work of that run.

All load tools and targets run on the load CPU; every loop they run is
bounded by a count and a deadline.

The TLS workloads run through a relay's TLS routes (L{Relay.start_tls}),
one variant per TLS mode the relay has; their client is C{tlsload}.
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, TypeVar

from . import bulkpeer, tls
from .relays import Running
from .tools import LOOPBACK, REPO, run

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class Settings:
    """How big each workload is (quick mode shrinks them)."""

    runs: int
    iperf_seconds: int
    cps_connections: int
    burst_clients: int
    idle_pairs: int
    latency_seconds: int
    udp_seconds: float
    duplex_bytes: int
    cps_concurrency: int = 32
    idle_concurrency: int = 256
    udp_sources: int = 1000
    udp_window: int = 128
    udp_timeout_ms: int = 200
    #: A TCP client that has no reply by then counts as an error (SYN retries
    #: come after 1 s and 3 s).
    connect_timeout_ms: int = 5000
    acl_rules: int = 10_000
    #: Short TLS connections per variant, and bytes of a one-way TLS transfer.
    tls_connections: int = 3000
    tls_bytes: int = GIB

    @classmethod
    def quick(cls) -> Settings:
        return cls(runs=1, iperf_seconds=1, cps_connections=2000, burst_clients=2000,
                   idle_pairs=1000, latency_seconds=1, udp_seconds=1, duplex_bytes=64 * MIB,
                   connect_timeout_ms=2000, tls_connections=300, tls_bytes=64 * MIB)

    @classmethod
    def full(cls) -> Settings:
        return cls(runs=3, iperf_seconds=2, cps_connections=10_000, burst_clients=2000,
                   idle_pairs=5000, latency_seconds=2, udp_seconds=3, duplex_bytes=GIB)


@dataclass(frozen=True)
class Environment:
    """What the workloads use besides the relay."""

    settings: Settings
    loadgen: Path
    cpu: int  # where load tools run
    #: The TLS client, when a TLS workload runs.
    tls_client: tls.Client | None = None


@dataclass(frozen=True)
class Metric:
    key: str
    unit: str
    #: Whether ratios to other relays mean anything (not for error counts).
    ratios: bool = True
    #: Whether C{direct} has the figure (not relay CPU or memory: it has no relay).
    vs_direct: bool = True
    lower_is_better: bool = False
    #: The workload's main figure: checked for C{direct} beating every relay.
    headline: bool = False
    #: Also report the difference to C{direct} (latency added by the relay).
    added: bool = False


#: One run's figures: variant -> metric key -> value.
Figures = dict[str, dict[str, float]]

#: How busy the relay was: no ratio, as it says whether the relay was the bottleneck, not what it costs.
RELAY_CPU_PCT = Metric("relay_cpu_pct", "CPU % of a core", ratios=False, vs_direct=False, lower_is_better=True)
RELAY_CPU_PER_GIB = Metric("relay_cpu_s_per_gib", "CPU s/GiB", vs_direct=False, lower_is_better=True)
ERRORS = Metric("errors", "errors", ratios=False, lower_is_better=True)


class Workload(ABC):
    name: str
    title: str
    protocol: str = "tcp"
    metrics: tuple[Metric, ...]
    #: Start the relay again before each run unless it has run nothing since
    #: it started (memory must be measured from a clean start).
    fresh_relay: bool = False
    #: Whether it runs through the relay's TLS routes.
    over_tls: bool = False
    #: Its variants in the order of the report, where known before it runs.
    variants: tuple[str, ...] = ()
    #: The relays the report gives every other's ratio to (where they have the figure).
    references: tuple[str, ...] = ("haproxy", "portforward")

    def describe(self, settings: Settings) -> str:
        return self.title

    @abstractmethod
    def measure(self, env: Environment, relay: Running) -> Figures:
        """One run of every variant."""


T = TypeVar("T")


def _cpu_around(relay: Running, action: Callable[[], T]) -> tuple[T, float, float]:
    """C{action()}'s result, the relay's CPU seconds meanwhile, and the wall time."""
    cpu, began = relay.cpu_seconds(), time.monotonic()
    result = action()
    return result, relay.cpu_seconds() - cpu, time.monotonic() - began


def _loadgen_json(env: Environment, *args: object, timeout: float) -> dict[str, Any]:
    output = run([str(env.loadgen), *map(str, args)], env.cpu, timeout)
    return json.loads(output.splitlines()[-1])


def _client(relay: Running, mode: str, route: str = "reply") -> list[str]:
    """loadgen's arguments up to C{mode}: a gateway route's clients send its line first."""
    prefix = relay.prefixes.get(route)
    return ["--prefix", str(prefix), mode] if prefix else [mode]


class Bulk(Workload):
    name = "bulk"
    title = "bulk throughput (iperf3)"
    metrics = (Metric("gbit_s", "Gbit/s", headline=True), RELAY_CPU_PER_GIB, RELAY_CPU_PCT)

    def describe(self, settings: Settings) -> str:
        return f"{self.title}, {settings.iperf_seconds} s per run; up: client to target, down: -R"

    def measure(self, env: Environment, relay: Running) -> Figures:
        figures: Figures = {}
        for streams in (1, 4):
            for reverse in (False, True):
                variant = f"{streams} stream{'s' if streams > 1 else ''} {'down' if reverse else 'up'}"
                report, cpu, wall = _cpu_around(relay, partial(self._iperf, env, relay, streams, reverse))
                received = report["end"]["sum_received"]
                figures[variant] = {
                    "gbit_s": received["bits_per_second"] / 1e9,
                    "relay_cpu_s_per_gib": cpu / (received["bytes"] / GIB),
                    "relay_cpu_pct": 100 * cpu / wall,
                }
        return figures

    def _iperf(self, env: Environment, relay: Running, streams: int, reverse: bool) -> dict:
        seconds = env.settings.iperf_seconds
        argv = ["iperf3", "-c", LOOPBACK, "-p", str(relay.tcp["iperf"]), "-t", str(seconds),
                "-P", str(streams), "-J", "--connect-timeout", "3000", *(["-R"] if reverse else [])]
        for attempt in range(3):
            completed = subprocess.run(["taskset", "-c", str(env.cpu), *argv],
                                       capture_output=True, text=True, timeout=seconds + 30, check=False)
            report = json.loads(completed.stdout or "{}")
            if "error" not in report and completed.returncode == 0:
                return report
            time.sleep(1)  # "the server is busy": the last test is still being torn down
        raise RuntimeError(f"iperf3 failed: {report.get('error', completed.stderr.strip())}")


class ShortConnections(Workload):
    name = "cps"
    title = "short connections"
    metrics = (Metric("per_s", "conn/s", headline=True), ERRORS,
               Metric("relay_cpu_s_per_1k", "CPU s/1k conn", vs_direct=False, lower_is_better=True),
               RELAY_CPU_PCT)

    def describe(self, settings: Settings) -> str:
        return (f"{self.title}: {settings.cps_connections} x (connect, 100 B request, 100 B reply,"
                f" close), {settings.cps_concurrency} at a time")

    def measure(self, env: Environment, relay: Running) -> Figures:
        return {"100 B": connections_per_second(env, relay)}


def connections_per_second(env: Environment, relay: Running) -> dict[str, float]:
    """The short-connection figures through the C{reply} route (also used by the ACL benchmark)."""
    settings = env.settings
    return _connection_figures(*_cpu_around(relay, lambda: _loadgen_json(
        env, *_client(relay, "cps"), LOOPBACK, relay.tcp["reply"], settings.cps_connections,
        settings.cps_concurrency, settings.connect_timeout_ms,
        timeout=settings.cps_connections * 0.01 + 60)))


def _connection_figures(result: dict[str, Any], cpu: float, wall: float) -> dict[str, float]:
    """ShortConnections' figures from a client's result and the relay's CPU seconds meanwhile."""
    return {
        "per_s": result["per_second"],
        "errors": result["errors"],
        "relay_cpu_s_per_1k": 1000 * cpu / max(result["ok"], 1),
        "relay_cpu_pct": 100 * cpu / wall,
    }


class Burst(Workload):
    name = "burst"
    title = "connection burst"
    metrics = (Metric("seconds", "s until all echoed", lower_is_better=True, headline=True), ERRORS)

    def describe(self, settings: Settings) -> str:
        return f"{self.title}: {settings.burst_clients} clients connect at once; time until each has its echo"

    def measure(self, env: Environment, relay: Running) -> Figures:
        clients = env.settings.burst_clients
        result = _loadgen_json(env, *_client(relay, "open"), LOOPBACK, relay.tcp["reply"], clients, clients,
                               env.settings.connect_timeout_ms, timeout=90)
        time.sleep(0.2)  # let the relay finish closing them
        return {f"{clients} clients": {"seconds": result["seconds"], "errors": result["errors"]}}


_PERCENTILE = re.compile(r"percentile (\d+\.\d+) =\s+([\d.]+)")
_SENT = re.compile(r"\[Total Run\].*SentMessages=(\d+)")


class Latency(Workload):
    name = "latency"
    title = "request/response latency (sockperf ping-pong, one TCP connection, round trip)"
    metrics = (Metric("p50_us", "p50 µs", lower_is_better=True, headline=True, added=True),
               Metric("p99_us", "p99 µs", lower_is_better=True, added=True),
               Metric("p999_us", "p99.9 µs", lower_is_better=True, added=True),
               Metric("relay_cpu_us_per_rtt", "CPU µs/rtt", vs_direct=False, lower_is_better=True))

    def describe(self, settings: Settings) -> str:
        return f"{self.title}, {settings.latency_seconds} s per run"

    def measure(self, env: Environment, relay: Running) -> Figures:
        seconds = env.settings.latency_seconds
        argv = ["sockperf", "pp", "--tcp", "-i", LOOPBACK, "-p", str(relay.tcp["sockperf"]),
                "-t", str(seconds), "--full-rtt"]
        output, cpu, _ = _cpu_around(relay, lambda: run(argv, env.cpu, seconds + 30))
        percentiles = {float(p): float(v) for p, v in _PERCENTILE.findall(output)}
        sent = _SENT.search(output)
        if not percentiles or sent is None:
            raise RuntimeError(f"unexpected sockperf output: {output[-500:]}")
        return {"12 B": {
            "p50_us": percentiles[50.0], "p99_us": percentiles[99.0], "p999_us": percentiles[99.9],
            "relay_cpu_us_per_rtt": 1e6 * cpu / int(sent.group(1)),
        }}


class IdlePairs(Workload):
    name = "idle"
    title = "concurrent idle pairs"
    metrics = (Metric("open_s", "s to open", lower_is_better=True, headline=True), ERRORS,
               Metric("kib_per_pair", "KiB/pair", vs_direct=False, lower_is_better=True),
               Metric("baseline_mib", "MiB before", ratios=False, vs_direct=False, lower_is_better=True))
    fresh_relay = True

    def describe(self, settings: Settings) -> str:
        return (f"{self.title}: {settings.idle_pairs} pairs opened {settings.idle_concurrency} at a time"
                " (each echoes one byte end to end); relay memory (PSS) per pair, on a fresh relay")

    def measure(self, env: Environment, relay: Running) -> Figures:
        settings = env.settings
        before = relay.memory_bytes()
        holder = subprocess.Popen(
            ["taskset", "-c", str(env.cpu), str(env.loadgen), *_client(relay, "open"), LOOPBACK,
             str(relay.tcp["reply"]),
             str(settings.idle_pairs), str(settings.idle_concurrency), str(settings.connect_timeout_ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdin is not None
            ready, _, _ = select.select([holder.stdout], [], [], 60)
            if not ready:
                raise RuntimeError("idle pairs not opened within 60 s")
            result = json.loads(holder.stdout.readline())
            time.sleep(0.2)  # let the relay's allocations settle
            during = relay.memory_bytes()
            holder.stdin.close()
            holder.wait(30)
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
        opened = max(result["ok"], 1)
        return {f"{settings.idle_pairs} pairs": {
            "open_s": result["seconds"], "errors": result["errors"],
            "kib_per_pair": (during - before) / opened / 1024, "baseline_mib": before / MIB,
        }}


class Datagrams(Workload):
    name = "udp"
    title = "UDP datagrams"
    protocol = "udp"
    references = ("nginx",)  # neither HAProxy nor portforward relays UDP
    metrics = (Metric("per_s", "dgram/s", headline=True), Metric("loss_pct", "loss %", ratios=False, lower_is_better=True),
               Metric("relay_cpu_us_per_dgram", "CPU µs/dgram", vs_direct=False, lower_is_better=True),
               RELAY_CPU_PCT)

    def describe(self, settings: Settings) -> str:
        return (f"{self.title}: {settings.udp_sources} sources in turn, 64 B, at most"
                f" {settings.udp_window} awaiting their echo, lost after {settings.udp_timeout_ms} ms,"
                f" {settings.udp_seconds:g} s; dgram/s = echoes received")

    def measure(self, env: Environment, relay: Running) -> Figures:
        settings = env.settings
        assert relay.udp is not None
        result, cpu, wall = _cpu_around(relay, lambda: _loadgen_json(
            env, "udp-load", LOOPBACK, relay.udp, settings.udp_sources, settings.udp_seconds,
            settings.udp_window, settings.udp_timeout_ms, timeout=settings.udp_seconds + 30))
        relayed = result["sent"] + result["received"]  # each echo crosses the relay both ways
        return {f"{settings.udp_sources} sources": {
            "per_s": result["per_second"], "loss_pct": result["loss_pct"],
            "relay_cpu_us_per_dgram": 1e6 * cpu / max(relayed, 1), "relay_cpu_pct": 100 * cpu / wall,
        }}


@cache
def _expected_digests(size: int) -> dict[str, str]:
    return bulkpeer.expected_digests(size)


class Duplex(Workload):
    name = "duplex"
    title = "both ways at once, SHA-256 at both ends (hashed after the timed transfer)"
    metrics = (Metric("gbit_s", "Gbit/s (sum)", headline=True),
               Metric("mismatches", "bad digests", ratios=False, lower_is_better=True), RELAY_CPU_PER_GIB, RELAY_CPU_PCT)

    def describe(self, settings: Settings) -> str:
        return f"{settings.duplex_bytes // MIB} MiB {self.title}"

    def measure(self, env: Environment, relay: Running) -> Figures:
        size = env.settings.duplex_bytes
        expected = _expected_digests(size)
        argv = [sys.executable, "-m", "tests.benchmarks.bulkpeer", "send", str(relay.tcp["bulk"]), str(size)]
        output, cpu, wall = _cpu_around(relay, lambda: run(argv, env.cpu, 600, cwd=REPO))
        result = json.loads(output)
        return {f"{size // MIB} MiB each way": {
            "gbit_s": 2 * size * 8 / result["seconds"] / 1e9,
            "mismatches": (result["up"] != expected["up"]) + (result["down"] != expected["down"]),
            "relay_cpu_s_per_gib": cpu / (2 * size / GIB),
            "relay_cpu_pct": 100 * cpu / wall,
        }}


def _tls_variants(*cases: str) -> tuple[str, ...]:
    """Each case in each TLS mode, as the TLS workloads name their variants."""
    return tuple(f"{mode}, {case}" for mode in tls.MODES for case in cases)


def _tls_json(env: Environment, mode: str, port: int, *args: object, timeout: float) -> dict[str, Any]:
    if env.tls_client is None:
        raise RuntimeError("the TLS client was not built")
    result: dict[str, Any] = json.loads(run(env.tls_client.argv(mode, port, *args), env.cpu, timeout))
    return result


class TLSBulk(Workload):
    name = "tls-bulk"
    title = "one TLS stream one way (tlsload), SHA-256 checked after the timed transfer"
    over_tls = True
    metrics = (Metric("gbit_s", "Gbit/s", headline=True),
               Metric("mismatches", "bad digests", ratios=False, lower_is_better=True),
               RELAY_CPU_PER_GIB, RELAY_CPU_PCT)
    variants = _tls_variants("up", "down")

    def describe(self, settings: Settings) -> str:
        return (f"{settings.tls_bytes // MIB} MiB {self.title}; up: client to target; passthrough:"
                " HAProxy on the load CPU terminates in front of the target")

    def measure(self, env: Environment, relay: Running) -> Figures:
        figures: Figures = {}
        size = env.settings.tls_bytes
        for mode in tls.MODES:
            port = relay.tcp.get(tls.route(mode, "oneway"))
            if port is None:
                continue
            for direction in ("up", "down"):
                result, cpu, _ = _cpu_around(relay, partial(
                    _tls_json, env, "bulk", port, direction, size, timeout=size / MIB / 10 + 60))
                # CPU % over the timed transfer: the relay idles while the ends hash.
                figures[f"{mode}, {direction}"] = {
                    "gbit_s": size * 8 / result["seconds"] / 1e9, "mismatches": result["mismatches"],
                    "relay_cpu_s_per_gib": cpu / (size / GIB), "relay_cpu_pct": 100 * cpu / result["seconds"],
                }
        return figures


class TLSConnections(Workload):
    name = "tls-cps"
    title = "short TLS connections"
    over_tls = True
    metrics = ShortConnections.metrics
    variants = _tls_variants(*tls.KEY_NAMES.values())

    def describe(self, settings: Settings) -> str:
        return (f"{self.title}: {settings.tls_connections} x (connect, full TLS handshake, 100 B request,"
                f" 100 B reply, close), {settings.cps_concurrency} at a time, through a server certificate of"
                " each key type; passthrough: HAProxy on the load CPU terminates in front of the target")

    def measure(self, env: Environment, relay: Running) -> Figures:
        settings = env.settings
        figures: Figures = {}
        for mode in tls.MODES:
            for kind, key_name in tls.KEY_NAMES.items():
                port = relay.tcp.get(tls.route(mode, f"reply-{kind}"))
                if port is None:
                    continue
                figures[f"{mode}, {key_name}"] = _connection_figures(*_cpu_around(relay, partial(
                    _tls_json, env, "cps", port, settings.tls_connections, settings.cps_concurrency,
                    settings.connect_timeout_ms, timeout=settings.tls_connections * 0.02 + 60)))
        return figures


def all_workloads() -> list[Workload]:
    """Every per-relay workload, in the order they run in each repetition and are reported."""
    # Latency first, while nothing from an earlier workload is still being torn down.
    return [Latency(), IdlePairs(), Bulk(), ShortConnections(), Burst(), Datagrams(), Duplex(),
            TLSBulk(), TLSConnections()]
