"""
Run the relay benchmark: ``python -m tests.benchmarks [--quick] [--json FILE]``.

Starts the targets on the load CPU, then each relay in turn on the relay
CPU in front of them, runs every workload through it, and prints a table per
workload (and ``--json FILE``).  ``--relays`` and ``--workloads`` take
comma-separated names to run a subset; ``--list`` shows the names.  The TLS
workloads run through the relays that have TLS modes, started again with
TLS routes once their plain workloads are done.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import ipaddress
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import tls
from .relays import (
    Context,
    Relay,
    Running,
    Skipped,
    StreamRelay,
    Targets,
    all_relays,
    baseline_relays,
    haproxy_listener,
    start_haproxy,
)
from .report import Results
from .tools import (
    HERE,
    REPO,
    PortAllocator,
    Process,
    choose_cpus,
    compile_tool,
    ensure,
    have,
    listening,
    raise_fd_limit,
    start,
    wait_until,
)
from .workloads import (
    Environment,
    Settings,
    ShortConnections,
    Workload,
    all_workloads,
    connections_per_second,
)

ACL = "acl"
#: What each workload needs besides Python and gcc: (what, its Debian package, whether it is here).
NEEDS: dict[str, tuple[str, str, Callable[[], bool]]] = {
    "bulk": ("iperf3", "iperf3", have("iperf3")),
    "latency": ("sockperf", "sockperf", have("sockperf")),
    "tls-bulk": ("OpenSSL's headers", "libssl-dev", tls.OPENSSL_HEADER.exists),
    "tls-cps": ("OpenSSL's headers", "libssl-dev", tls.OPENSSL_HEADER.exists),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run each (a smoke run)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--text", type=Path, metavar="FILE", help="also write the tables to FILE")
    parser.add_argument("--relays", help="comma-separated relays to run (default: all)")
    parser.add_argument("--workloads", help="comma-separated workloads to run (default: all)")
    parser.add_argument("--runs", type=int, help="runs per figure (default: 3, or 1 with --quick)")
    parser.add_argument("--list", action="store_true", help="list relay and workload names")
    parser.add_argument(
        "--baseline", type=Path, metavar="DIR",
        help="also run streamrelay from the checkout DIR (relays baseline, baseline-nosplice), "
             "e.g. a `git worktree add` of an older revision, to compare in one run",
    )
    return parser.parse_args()


def chosen(names: str | None, available: list[str], what: str) -> list[str]:
    if names is None:
        return available
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in available]
    if unknown:
        sys.exit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(available)})")
    return [n for n in available if n in wanted]


def start_targets(workdir: Path, ports: PortAllocator, cpu: int, loadgen: Path, workloads: list[str],
                  settings: Settings, tls_client: tls.Client | None) -> tuple[Targets, list[Process]]:
    """The targets every relay forwards to, on the load CPU (C{oneway} with a TLS client)."""
    tcp = {route: ports.take() for route in ("iperf", "sockperf", "reply", "bulk", "oneway")}
    udp = ports.take()
    commands = {
        "reply": [str(loadgen), "tcp-target", str(tcp["reply"])],
        "bulk": [sys.executable, "-m", "tests.benchmarks.bulkpeer", "serve", str(tcp["bulk"]),
                 str(settings.duplex_bytes)],
    }
    if "bulk" in workloads:
        commands["iperf"] = ["iperf3", "-s", "-p", str(tcp["iperf"])]
    if "latency" in workloads:
        commands["sockperf"] = ["sockperf", "sr", "--tcp", "-i", "127.0.0.1", "-p", str(tcp["sockperf"])]
    if tls_client is not None:
        commands["oneway"] = [str(tls_client.binary), "bulk-target", str(tcp["oneway"])]
    processes = [start(f"target-{name}", argv, cpu, workdir, cwd=REPO) for name, argv in commands.items()]
    processes.append(start("target-udp", [str(loadgen), "udp-echo", str(udp)], cpu, workdir))
    wait_until(lambda: listening([tcp[name] for name in commands], [udp]), processes)
    return Targets(tcp, udp), processes


def start_tls_target(context: Context, certificates: tls.Certificates,
                     results: Results) -> tuple[dict[str, int], list[Process]]:
    """
    What passthrough relays forward to: HAProxy on the load CPU terminating
    each TLS service in front of its plain target (the cheapest TLS server at
    hand; its CPU is the load's, not the relay's).  Without it, passthrough
    is skipped.
    """
    ports = {service: context.ports.take() for service in tls.SERVICES}
    listeners = [
        haproxy_listener(f"target-{service}", ports[service], context.targets.tcp[plain], crt=certificates.bundle[kind])
        for service, (plain, kind) in tls.SERVICES.items()
    ]
    try:
        process = start_haproxy("target-tls", listeners, context.cpus.load, context.workdir, context.fd_limit)
    except Skipped as e:
        results.note("", "tls passthrough", "skipped", f"no TLS target: {e}")
        return {}, []
    try:
        wait_until(lambda: listening(list(ports.values())), [process])
    except RuntimeError as e:
        process.stop()
        results.note("", "tls passthrough", "skipped", f"no TLS target: {e}")
        return {}, []
    return ports, [process]


Starter = Callable[[Context], Running]


def run_workload(relay: Relay, start_relay: Starter, workload: Workload, running: Running,
                 context: Context, env: Environment, results: Results) -> Running:
    """All runs of one workload through one relay; returns the relay now running."""
    began = time.monotonic()
    for index in range(env.settings.runs):
        if workload.fresh_relay and index > 0:
            running.stop()
            running = start_relay(context)
        results.add(workload.name, relay.name, workload.measure(env, running))
    section = results.sections[workload.name]
    lines = []
    for variant in section.variants:
        figures = [
            f"{results.median(workload.name, variant, relay.name, m.key):.4g} {m.unit}"
            for m in section.metrics
            if results.median(workload.name, variant, relay.name, m.key) is not None
        ]
        if figures:
            lines.append(f"  {relay.name:<20} {workload.name:<8} {variant:<16} " + ", ".join(figures))
    if lines:
        print("\n".join(lines) + f"  [{time.monotonic() - began:.1f} s]", flush=True)
    return running


def applicable(relay: Relay, workloads: list[Workload]) -> list[Workload]:
    """The workloads C{relay} takes: TLS ones only if it has TLS modes."""
    return [w for w in workloads if not w.over_tls or relay.tls_modes]


def run_relay(relay: Relay, workloads: list[Workload], context: Context, env: Environment,
              results: Results) -> None:
    """The plain workloads through C{relay}, then the TLS ones through it started with TLS routes."""
    plain = [w for w in workloads if not w.over_tls]
    over_tls = [w for w in workloads if w.over_tls]
    if plain:
        run_started(relay, relay.start, "", plain, context, env, results)
    if over_tls:
        run_started(relay, relay.start_tls, "tls", over_tls, context, env, results)


def run_started(relay: Relay, start_relay: Starter, what: str, workloads: list[Workload], context: Context,
                env: Environment, results: Results) -> None:
    """Start the relay with C{start_relay} and run C{workloads} through it (C{what}: their kind, for notes)."""
    try:
        running = start_relay(context)
    except Skipped as e:
        results.note(relay.name, what, "skipped", str(e))
        return
    if running.udp_skipped:
        results.note(relay.name, "udp", "skipped", running.udp_skipped)
    try:
        for workload in workloads:
            if workload.protocol == "udp" and running.udp is None:
                if not running.udp_skipped:
                    results.note(relay.name, workload.name, "skipped", relay.tcp_only_reason)
                continue
            if relay.only_workloads is not None and workload.name not in relay.only_workloads:
                results.note(relay.name, workload.name, "skipped", relay.only_reason)
                continue
            try:
                running = run_workload(relay, start_relay, workload, running, context, env, results)
            except (RuntimeError, ValueError, KeyError, subprocess.SubprocessError, Skipped) as e:
                results.note(relay.name, workload.name, "failed", f"{type(e).__name__}: {e}")
            dead = [p.name for p in running.processes if not p.alive()]
            if dead:
                results.note(relay.name, workload.name, "failed", f"relay exited: {', '.join(dead)}")
                return
    finally:
        running.stop()


def deny_rules(count: int) -> list[str]:
    """C{count} distinct CIDR rules inside 203.0.0.0/8, of prefix lengths 16 to 32."""
    rules: list[str] = []
    seen: set[str] = set()
    number = 0
    while len(rules) < count:
        length = 16 + number % 17
        address = (203 << 24) | ((number * 2654435761) & 0xFFFFFF)
        network = ipaddress.ip_network((address, length), strict=False)
        rule = f"cidr:{network}"
        if rule not in seen:
            seen.add(rule)
            rules.append(rule)
        number += 1
    return rules


def run_acl(context: Context, env: Environment, results: Results) -> None:
    """
    Accept rate through one streamrelay route without an ACL and with
    C{acl_rules} deny rules that do not match.  With C{allow_local: true}
    a loopback client is admitted before any rule is looked at; with
    C{allow_local: false} every rule level is consulted.
    """
    if not (REPO / "streamrelay" / "acl.py").exists():
        results.note("streamrelay", ACL, "skipped", "streamrelay.acl does not exist")
        return
    count = env.settings.acl_rules
    results.section(ACL, f"accept rate through streamrelay with {count:,} non-matching deny rules"
                    " (short connections as in cps)", ShortConnections.metrics)
    rules = deny_rules(count)
    variants = {
        "no acl": {},
        "allow_local: true": {"acl": {"default": "allow", "allow_local": True, "deny": rules}},
        "allow_local: false": {"acl": {"default": "allow", "allow_local": False, "deny": rules}},
    }
    for variant, top_level in variants.items():
        relay = StreamRelay("streamrelay", top_level=top_level, with_udp=False, routes=("reply",),
                            refusal="acl refused by the config")
        try:
            running = relay.start(context)
        except Skipped as e:
            results.note("streamrelay", f"{ACL} ({variant})", "skipped", str(e))
            continue
        results.meta.setdefault("streamrelay_sources", {})[f"acl, {variant}"] = relay.sources
        try:
            for _ in range(env.settings.runs):
                figures = connections_per_second(env, running)
                results.add(ACL, "streamrelay", {variant: figures})
        finally:
            running.stop()
        print(f"  streamrelay          {ACL:<8} {variant:<20} "
              f"{results.median(ACL, variant, 'streamrelay', 'per_s'):.0f} conn/s", flush=True)


def versions() -> dict[str, str]:
    commands = {
        "haproxy": ["haproxy", "-v"], "nginx": ["nginx", "-v"], "socat": ["socat", "-V"],
        "iperf3": ["iperf3", "--version"], "sockperf": ["sockperf", "--version"],
        "openssl": ["openssl", "version"],
        "twisted": [sys.executable, "-c", "import twisted; print('Twisted', twisted.__version__)"],
        "streamrelay": ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
    }
    found = {"python": platform.python_version(), "kernel": platform.release()}
    for name, argv in commands.items():
        try:
            completed = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        lines = [line for line in (completed.stdout + completed.stderr).splitlines()
                 if line.strip() and "by Gerhard" not in line]
        if lines:
            found[name] = lines[0].strip()
    return found


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def busy_fraction(seconds: float = 0.5) -> float:
    """How busy the machine's CPUs are over C{seconds}, before anything starts."""
    def ticks() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    busy, total = ticks()
    time.sleep(seconds)
    busy_after, total_after = ticks()
    return (busy_after - busy) / max(total_after - total, 1)


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so every started process is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args()
    relays = all_relays()
    if args.baseline:
        relays += baseline_relays(args.baseline.resolve())
    workloads = all_workloads()
    if args.list:
        print("relays:   ", ", ".join(r.name for r in relays))
        print("workloads:", ", ".join([w.name for w in workloads] + [ACL]))
        return
    relay_names = chosen(args.relays, [r.name for r in relays], "relays")
    workload_names = chosen(args.workloads, [w.name for w in workloads] + [ACL], "workloads")
    settings = Settings.quick() if args.quick else Settings.full()
    if args.runs:
        settings = dataclasses.replace(settings, runs=args.runs)
    began = time.monotonic()
    cpus = choose_cpus()
    fd_limit = raise_fd_limit()
    meta: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cpus": {"relay": cpus.relay, "load": cpus.load},
        "fd_limit": fd_limit, "settings": settings.__dict__, "versions": versions(),
        "busy_before_start": busy_fraction(),
    }
    results = Results(meta)
    if meta["busy_before_start"] > 0.1:
        results.note("", "", "warning", f"the CPUs were {meta['busy_before_start']:.0%} busy before the"
                     " benchmark started: other work on this machine will disturb the figures")
    for name, (what, package, present) in NEEDS.items():
        missing = name in workload_names and ensure(what, package, present)
        if missing:
            results.note("", name, "skipped", missing)
            workload_names.remove(name)
    selected = [w for w in workloads if w.name in workload_names]
    for workload in selected:
        results.section(workload.name, workload.describe(settings), workload.metrics, workload.variants)

    with tempfile.TemporaryDirectory(prefix="streamrelay-bench-") as temp:
        workdir = Path(temp)
        loadgen = compile_tool(workdir, HERE / "loadgen.c")
        certificates = tls.Certificates.make(workdir / "certs") if any(w.over_tls for w in selected) else None
        tls_client = tls.Client.build(workdir, certificates.ca) if certificates else None
        ports = PortAllocator()
        targets, target_processes = start_targets(workdir, ports, cpus.load, loadgen, workload_names, settings,
                                                  tls_client)
        context = Context(workdir, targets, ports, cpus, fd_limit, certificates)
        env = Environment(settings, loadgen, cpus.load, tls_client)
        print(f"{meta['mode']} run, {settings.runs} run(s) per figure; relays on CPU {cpus.relay},"
              f" load and targets on CPU {cpus.load}", flush=True)
        try:
            if certificates is not None:
                tls_ports, tls_processes = start_tls_target(context, certificates, results)
                context.targets = dataclasses.replace(targets, tls=tls_ports)
                target_processes += tls_processes
            for relay in relays:
                taken = applicable(relay, selected)
                if relay.name in relay_names and taken:
                    print(f"{relay.name}:", flush=True)
                    relay_began = time.monotonic()
                    run_relay(relay, taken, context, env, results)
                    print(f"  ({relay.name}: {time.monotonic() - relay_began:.1f} s)", flush=True)
            if ACL in workload_names:
                print("acl:", flush=True)
                run_acl(context, env, results)
        finally:
            for process in target_processes:
                process.stop()

    meta["seconds"] = round(time.monotonic() - began, 1)
    sources = meta.setdefault("streamrelay_sources", {})
    sources.update({r.name: r.sources for r in relays if isinstance(r, StreamRelay) and r.sources})
    if len({digest for started in sources.values() for digest in started}) > 1:
        results.note("streamrelay", "", "warning", "its source changed during the benchmark, so its"
                     f" variants were measured on different code: {sources}")
    text = results.text() + f"\n({meta['mode']} run, {meta['date']}, {meta['seconds']} s)\n"
    print(text, end="")
    if args.json:
        results.write_json(args.json)
    if args.text:
        args.text.write_text(text)


if __name__ == "__main__":
    main()
