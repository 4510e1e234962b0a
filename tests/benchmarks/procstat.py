"""
What a relay spends, read from /proc: CPU seconds and memory of a process
tree (socat forks a child per connection, nginx has a master and a worker,
streamrelay-2proc is two processes).

CPU of a tree is the sum, over its live processes, of their own user and
system time plus that of their children already reaped (``cutime`` and
``cstime``): when a child exits and is waited for, its time moves into its
parent's ``cutime``/``cstime``, so it is counted exactly once either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def _parents() -> dict[int, int]:
    """The parent of every live process."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parents[int(entry)] = int(fields[1])
    return parents


def tree(roots: Iterable[int]) -> list[int]:
    """C{roots} and all their live descendants."""
    children: dict[int, list[int]] = {}
    parents = _parents()
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found: list[int] = []
    pending = [pid for pid in roots if pid in parents]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, ()))
    return found


def cpu_seconds(roots: Iterable[int]) -> float:
    """User plus system CPU seconds of the trees under C{roots}, reaped children included."""
    ticks = 0
    for pid in tree(roots):
        fields = _stat_fields(pid)
        if fields is not None:
            # After the name: state(0) ... utime(11) stime(12) cutime(13) cstime(14).
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / _TICKS


def memory_bytes(roots: Iterable[int]) -> int:
    """
    Proportional set size (PSS) of the trees under C{roots}: resident memory
    with pages shared between processes divided among them, so forked
    children are not counted once per process.  For a single process it is
    its RSS less its share of shared libraries.
    """
    total = 0
    for pid in tree(roots):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return total
