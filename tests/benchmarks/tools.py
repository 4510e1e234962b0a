"""
Processes, ports and the compiled load generator, shared by the relays and
the workloads.

Every process this benchmark starts runs in a session of its own, pinned to
one CPU with ``taskset``, and is stopped through its process group, so a
relay that forks (socat) or has workers (nginx) is stopped whole.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Cpus:
    """Where relays run and where load tools and targets run."""

    relay: int
    load: int


def choose_cpus() -> Cpus:
    """CPU 0 for relays, CPU 1 for the rest (both 0 on a one-CPU machine)."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        print(f"warning: only CPU {available[0]} available: relays and load share it")
        return Cpus(available[0], available[0])
    return Cpus(available[0], available[1])


def raise_fd_limit(wanted: int = 65536) -> int:
    """
    Raise the descriptor limit, which every relay and tool inherits: both
    limits to C{wanted} if allowed (as root), else the soft one to the hard.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(wanted, hard), max(wanted, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class PortAllocator:
    """Free loopback ports, none handed out twice in one run."""

    def __init__(self) -> None:
        self.given: set[int] = set()

    def take(self) -> int:
        for _ in range(100):
            with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                tcp.bind((LOOPBACK, 0))
                port: int = tcp.getsockname()[1]
                try:
                    udp.bind((LOOPBACK, port))
                except OSError:
                    continue
            if port not in self.given:
                self.given.add(port)
                return port
        raise RuntimeError("no free loopback port found")


def _bound_ports(table: str, state: str) -> set[int]:
    """Local ports in /proc/net/TABLE whose socket is in C{state} (hex)."""
    ports: set[int] = set()
    for name in (table, table + "6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == state:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def listening(tcp: Sequence[int] = (), udp: Sequence[int] = ()) -> bool:
    """Whether every port in C{tcp} is listening and every one in C{udp} bound."""
    return set(tcp) <= _bound_ports("tcp", "0A") and set(udp) <= _bound_ports("udp", "07")


@dataclass
class Process:
    """A started process, its output in files under the work directory."""

    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    stopped: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """Standard output and error so far (for error messages)."""
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after C{timeout} seconds."""
        if self.stopped:
            return
        self.stopped = True
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Descendants (socat's children) outlive their parent briefly.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start(name: str, argv: Sequence[str], cpu: int, workdir: Path,
          env: dict[str, str] | None = None, cwd: Path | None = None) -> Process:
    """Start C{argv} pinned to C{cpu}, in its own session, output to files."""
    stdout_path = workdir / f"{name}.out"
    stderr_path = workdir / f"{name}.err"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        popen = subprocess.Popen(
            ["taskset", "-c", str(cpu), *argv], stdout=out, stderr=err,
            stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, **(env or {})}, cwd=cwd or workdir,
        )
    return Process(name, popen, stdout_path, stderr_path)


def wait_until(ready: Callable[[], bool], processes: Sequence[Process], timeout: float = 15.0) -> None:
    """
    Wait until C{ready()}; raise C{RuntimeError} with the output of the
    first of C{processes} to exit early, or on timeout.
    """
    deadline = time.monotonic() + timeout
    while not ready():
        for process in processes:
            if not process.alive():
                raise RuntimeError(f"{process.name} exited ({process.popen.returncode}): "
                                   f"{last_line(process.output())}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready within {timeout}s: " + ", ".join(p.name for p in processes))
        time.sleep(0.05)


def last_line(output: str) -> str:
    """The line of a program's output that most likely says why it stopped."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if "streamrelay:" in line or re.search(r"error|alert|emerg", line, re.IGNORECASE):
            return _shortened(line)
    return _shortened(lines[-1]) if lines else "(no output)"


def _shortened(line: str, length: int = 240) -> str:
    return line if len(line) <= length else line[:length] + "..."


def run(argv: Sequence[str], cpu: int, timeout: float, cwd: Path | None = None) -> str:
    """Run a load tool pinned to C{cpu} and return its standard output."""
    completed = subprocess.run(
        ["taskset", "-c", str(cpu), *argv], capture_output=True, text=True, timeout=timeout, cwd=cwd,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({completed.returncode}): {last_line(completed.stderr)}")
    return completed.stdout


def compile_tool(workdir: Path, source: Path, *libraries: str) -> Path:
    """Compile the C program C{source} (linked with C{libraries}) into C{workdir}."""
    binary = workdir / source.stem
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(binary), str(source), *libraries],
        check=True, capture_output=True, text=True,
    )
    return binary


def ensure(what: str, package: str, present: Callable[[], bool]) -> str | None:
    """
    None if C{present()}, installing C{package} with apt-get first when it is
    not and the benchmark runs as root; else why C{what} is not available.
    """
    if present():
        return None
    if os.geteuid() != 0:
        return f"{what} is not installed (package {package}; not root, so not installing it)"
    print(f"installing {package} (for {what}) with apt-get", flush=True)
    result = subprocess.run(
        ["apt-get", "install", "-y", "-q", package], capture_output=True, text=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=600, check=False,
    )
    if not present():
        return f"{what} is missing and apt-get install {package} failed: {result.stderr.strip()[-300:]}"
    return None


def have(binary: str) -> Callable[[], bool]:
    """A check for L{ensure}: C{binary} is on the PATH."""
    return lambda: shutil.which(binary) is not None
