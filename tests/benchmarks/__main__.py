"""
Run the relay benchmark: ``python -m tests.benchmarks [--quick] [--json FILE]``.

Starts the targets on the load CPU, then every relay on the relay CPU in
front of them (the relays with TLS modes a second time, with TLS routes, for
the TLS workloads), all kept running side by side, idle but for the one
measured.  Then it interleaves: each repetition runs each workload through
every relay in turn before the next workload, so the two figures of a ratio
are measured seconds or minutes apart, not a whole relay's workloads apart,
and the next repetition starts the relays one place further along, so none
always comes first.  It prints a table per workload (and ``--json FILE``):
medians over the repetitions, and ratios to the reference relays taken per
repetition, with their spread.  ``--relays`` and ``--workloads`` take
comma-separated names to run a subset; ``--list`` shows the names.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import tls
from .relays import (
    UDP_ROUTE,
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
    Figures,
    Metric,
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
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (a smoke run)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--text", type=Path, metavar="FILE", help="also write the tables to FILE")
    parser.add_argument("--relays", help="comma-separated relays to run (default: all)")
    parser.add_argument("--workloads", help="comma-separated workloads to run (default: all)")
    parser.add_argument("--runs", type=int, metavar="N",
                        help="repetitions, each running every workload through every relay"
                             " (default: 3, or 1 with --quick)")
    parser.add_argument("--references", metavar="RELAYS",
                        help="comma-separated relays to give every figure's ratio to as well, besides HAProxy and"
                             " portforward (nginx for UDP): e.g. streamrelay, for its variants")
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
    """
    The targets every relay forwards to, on the load CPU (C{oneway} with a
    TLS client), and a second short-connection and UDP target (L{Targets.twins}).
    """
    tcp = {route: ports.take() for route in ("iperf", "sockperf", "reply", "bulk", "oneway")}
    udp = ports.take()
    twins = {"reply": ports.take(), UDP_ROUTE: ports.take()}
    listens = {**tcp, "reply-twin": twins["reply"]}
    commands = {
        "reply": [str(loadgen), "tcp-target", str(tcp["reply"])],
        "reply-twin": [str(loadgen), "tcp-target", str(twins["reply"])],
        "bulk": [sys.executable, "-m", "tests.benchmarks.bulkpeer", "serve", str(tcp["bulk"]),
                 str(settings.duplex_bytes)],
    }
    if "bulk" in workloads:
        commands["iperf"] = ["iperf3", "-s", "-p", str(tcp["iperf"])]
    if "latency" in workloads:
        commands["sockperf"] = ["sockperf", "sr", "--tcp", "-i", "127.0.0.1", "-p", str(tcp["sockperf"])]
    if tls_client is not None:
        commands["oneway"] = [str(tls_client.binary), "bulk-target", str(tcp["oneway"])]
    datagrams = {"udp": udp, "udp-twin": twins[UDP_ROUTE]}
    commands.update({name: [str(loadgen), "udp-echo", str(port)] for name, port in datagrams.items()})
    processes = [start(f"target-{name}", argv, cpu, workdir, cwd=REPO) for name, argv in commands.items()]
    wait_until(lambda: listening([listens[name] for name in commands if name in listens],
                                 list(datagrams.values())), processes)
    return Targets(tcp, udp, twins=twins), processes


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
Item = TypeVar("Item")


@dataclass
class Started:
    """
    A relay started for the whole benchmark (with its plain routes, or its TLS
    routes), and the workloads it takes.
    """

    relay: Relay
    start: Starter
    running: Running
    workloads: list[Workload]
    #: Nothing measured since it started (a fresh_relay workload need not restart it).
    fresh: bool = True
    #: A process of it exited: it takes no further run.
    failed: bool = False

    def measure(self, workload: Workload, context: Context, env: Environment) -> Figures:
        """One run of C{workload}, on a relay started again if the workload wants it fresh."""
        if workload.fresh_relay and not self.fresh:
            self.running.stop()
            self.running = self.start(context)
        self.fresh = False
        return workload.measure(env, self.running)


def taken(relay: Relay, workloads: list[Workload], results: Results) -> list[Workload]:
    """The workloads C{relay} takes; a note says why not each other."""
    kept = []
    for workload in workloads:
        if workload.protocol == "udp" and not relay.relays_udp:
            results.note(relay.name, workload.name, "skipped", relay.tcp_only_reason)
        elif relay.only_workloads is not None and workload.name not in relay.only_workloads:
            results.note(relay.name, workload.name, "skipped", relay.only_reason)
        else:
            kept.append(workload)
    return kept


def start_relays(relays: list[Relay], workloads: list[Workload], context: Context,
                 results: Results) -> list[Started]:
    """Start each relay for its plain workloads, and again with TLS routes for the TLS ones."""
    started = []
    for relay in relays:
        wanted = taken(relay, [w for w in workloads if not w.over_tls or relay.tls_modes], results)
        plain = [w for w in wanted if not w.over_tls]
        over_tls = [w for w in wanted if w.over_tls]
        for start_relay, what, its_workloads in ((relay.start, "", plain), (relay.start_tls, "tls", over_tls)):
            if not its_workloads:
                continue
            try:
                running = start_relay(context)
            except Skipped as e:
                results.note(relay.name, what, "skipped", str(e))
                continue
            if running.udp_skipped:
                results.note(relay.name, "udp", "skipped", running.udp_skipped)
                its_workloads = [w for w in its_workloads if w.protocol != "udp"]
            started.append(Started(relay, start_relay, running, its_workloads))
    return started


def rotated(items: list[Item], repetition: int) -> list[Item]:
    """C{items} starting C{repetition} places along, so that no relay always runs first."""
    shift = repetition % len(items) if items else 0
    return items[shift:] + items[:shift]


def run_interleaved(started: list[Started], workloads: list[Workload], context: Context, env: Environment,
                    results: Results) -> None:
    """Each repetition: each workload through every started relay that takes it."""
    runs = env.settings.runs
    for repetition in range(runs):
        for workload in workloads:
            taking = [s for s in started if workload in s.workloads and not s.failed]
            if taking:
                print(f"repetition {repetition + 1}/{runs}, {workload.name}:", flush=True)
            for instance in rotated(taking, repetition):
                run_once(instance, workload, repetition, context, env, results)


def run_once(started: Started, workload: Workload, repetition: int, context: Context, env: Environment,
             results: Results) -> None:
    """One run of C{workload} through C{started}, its figures printed as they come."""
    name = started.relay.name
    began = time.monotonic()
    try:
        figures = started.measure(workload, context, env)
    except (RuntimeError, ValueError, KeyError, subprocess.SubprocessError, Skipped) as e:
        results.note(name, workload.name, "failed", f"repetition {repetition + 1}: {type(e).__name__}: {e}")
    else:
        results.add(workload.name, name, figures, repetition)
        print_run(name, workload.name, workload.metrics, figures, time.monotonic() - began)
    dead = [p.name for p in started.running.processes if not p.alive()]
    if dead:
        results.note(name, workload.name, "failed", f"relay exited: {', '.join(dead)}; no further runs")
        started.failed = True


def print_run(relay: str, workload: str, metrics: tuple[Metric, ...], figures: Figures, seconds: float) -> None:
    """One run's figures, a line per variant."""
    lines = [
        f"  {relay:<28} {workload:<8} {variant:<20} "
        + ", ".join(f"{values[m.key]:.4g} {m.unit}" for m in metrics if m.key in values)
        for variant, values in figures.items()
    ]
    print("\n".join(lines) + f"  [{seconds:.1f} s]", flush=True)


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
    started: dict[str, Running] = {}
    try:
        for variant, top_level in variants.items():
            relay = StreamRelay("streamrelay", top_level=top_level, with_udp=False, routes=("reply",),
                                refusal="acl refused by the config")
            try:
                started[variant] = relay.start(context)
            except Skipped as e:
                results.note("streamrelay", f"{ACL} ({variant})", "skipped", str(e))
                continue
            results.meta.setdefault("streamrelay_sources", {})[f"acl, {variant}"] = relay.sources
        for repetition in range(env.settings.runs):
            print(f"repetition {repetition + 1}/{env.settings.runs}, {ACL}:", flush=True)
            for variant in rotated(list(started), repetition):
                began = time.monotonic()
                figures = {variant: connections_per_second(env, started[variant])}
                results.add(ACL, "streamrelay", figures, repetition)
                print_run("streamrelay", ACL, ShortConnections.metrics, figures, time.monotonic() - began)
    finally:
        for running in started.values():
            running.stop()


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
    extra_references = tuple(chosen(args.references or "", [r.name for r in relays], "relays"))
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
        "order": "interleaved: each repetition runs each workload through every relay in turn",
    }
    chosen_relays = [r for r in relays if r.name in relay_names]
    results = Results(meta, [r.name for r in chosen_relays])
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
        references = workload.references + tuple(r for r in extra_references if r not in workload.references)
        results.section(workload.name, workload.describe(settings), workload.metrics, workload.variants, references)

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
        print(f"{meta['mode']} run, {settings.runs} repetition(s); relays on CPU {cpus.relay},"
              f" load and targets on CPU {cpus.load}", flush=True)
        try:
            if certificates is not None:
                tls_ports, tls_processes = start_tls_target(context, certificates, results)
                context.targets = dataclasses.replace(targets, tls=tls_ports)
                target_processes += tls_processes
            started = start_relays(chosen_relays, selected, context, results)
            try:
                run_interleaved(started, selected, context, env, results)
            finally:
                for instance in started:
                    instance.running.stop()
            if ACL in workload_names:
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
