"""
Collecting figures, and printing them as tables and JSON.

Every figure is the median of its repetitions.  Its ratio to each reference
relay of its workload (HAProxy and C{twistd portforward}; nginx for UDP) is
taken per repetition, from the two figures measured minutes apart at most
(the benchmark interleaves the relays), and given as the median of those
ratios with their spread (lowest to highest): drift on a shared machine
then moves both figures of a pair rather than the ratio.  Latency also
gets the time the relay adds over C{direct}.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .workloads import Figures, Metric


class Repeated:
    """Values by repetition number (a failed run leaves its repetition out), and their median."""

    runs: dict[int, float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs.values())


@dataclass
class Entry(Repeated):
    """One figure: a metric of one variant of a workload through one relay."""

    workload: str
    variant: str
    relay: str
    metric: Metric
    runs: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Ratio(Repeated):
    """A figure over a reference relay's, in each repetition both have: their median and spread."""

    runs: dict[int, float]

    @property
    def low(self) -> float:
        return min(self.runs.values())

    @property
    def high(self) -> float:
        return max(self.runs.values())

    def to_json(self) -> dict[str, float]:
        """The median and spread (each repetition's ratio follows from the two figures' runs)."""
        return {"median": self.median, "min": self.low, "max": self.high}


@dataclass
class Section:
    """A workload's table: its title and the order of variants and metrics."""

    name: str
    title: str
    metrics: tuple[Metric, ...]
    variants: list[str] = field(default_factory=list)
    #: The relays every other is compared with, where they have the figure.
    references: tuple[str, ...] = ()


class Results:
    """Everything measured in one benchmark run, in the order it was measured."""

    def __init__(self, meta: dict[str, Any], relays: list[str]) -> None:
        self.meta = meta
        self.sections: dict[str, Section] = {}
        self.entries: dict[tuple[str, str, str, str], Entry] = {}
        #: The order of the rows (a relay not listed is added when it first has a figure).
        self.relays = list(relays)
        self.notes: list[dict[str, str]] = []
        #: How many repetitions have figures.
        self.repetitions = 0

    def section(self, name: str, title: str, metrics: tuple[Metric, ...], variants: tuple[str, ...] = (),
                references: tuple[str, ...] = ()) -> None:
        """A workload's table; C{variants} fixes the order of those known beforehand."""
        self.sections.setdefault(name, Section(name, title, metrics, list(variants), references))

    def add(self, workload: str, relay: str, figures: Figures, repetition: int) -> None:
        """One run's figures, measured in C{repetition}."""
        section = self.sections[workload]
        self.repetitions = max(self.repetitions, repetition + 1)
        if relay not in self.relays:
            self.relays.append(relay)
        for variant, values in figures.items():
            if variant not in section.variants:
                section.variants.append(variant)
            for metric in section.metrics:
                if relay == "direct" and not metric.vs_direct:
                    continue  # no relay process: nothing to measure
                key = (workload, variant, relay, metric.key)
                entry = self.entries.setdefault(key, Entry(workload, variant, relay, metric))
                entry.runs[repetition] = values[metric.key]

    def note(self, relay: str, workload: str, status: str, reason: str) -> None:
        """A relay or workload that was skipped or failed, printed as it happens."""
        print(f"{_where(relay, workload)}: {status}: {reason}", flush=True)
        self.notes.append({"relay": relay, "workload": workload, "status": status, "reason": reason})

    def median(self, workload: str, variant: str, relay: str, metric: str) -> float | None:
        entry = self.entries.get((workload, variant, relay, metric))
        return entry.median if entry is not None else None

    def ratio(self, entry: Entry, reference: str) -> Ratio | None:
        """C{entry} over C{reference}'s figure, repetition by repetition."""
        base = self.entries.get((entry.workload, entry.variant, reference, entry.metric.key))
        if not entry.metric.ratios or base is None:
            return None
        runs = {rep: value / base.runs[rep] for rep, value in entry.runs.items() if base.runs.get(rep)}
        return Ratio(runs) if runs else None

    def references(self, section: Section, metric: Metric) -> list[str]:
        """The reference relays with C{metric} in C{section}: the ratio columns of its table."""
        if not metric.ratios:
            return []
        return [
            reference for reference in section.references
            if any((section.name, variant, reference, metric.key) in self.entries for variant in section.variants)
        ]

    def added(self, entry: Entry) -> float | None:
        """How much more than C{direct} (for latency)."""
        base = self.median(entry.workload, entry.variant, "direct", entry.metric.key)
        return entry.median - base if entry.metric.added and base is not None else None

    # ------------------------------------------------------------ output

    def to_json(self) -> dict[str, Any]:
        figures = []
        for entry in self.entries.values():
            section = self.sections[entry.workload]
            ratios = {reference: ratio.to_json() for reference in ("direct", *section.references)
                      if (ratio := self.ratio(entry, reference)) is not None}
            figures.append({
                "workload": entry.workload, "variant": entry.variant, "relay": entry.relay,
                "metric": entry.metric.key, "unit": entry.metric.unit,
                "lower_is_better": entry.metric.lower_is_better,
                "median": entry.median, "ratios": ratios,
                # In the order of the repetitions, None where a run failed.
                "runs": [entry.runs.get(repetition) for repetition in range(self.repetitions)],
                **({"added_over_direct": self.added(entry)} if entry.metric.added else {}),
            })
        return {
            "meta": self.meta,
            "workloads": {s.name: s.title for s in self.sections.values()},
            "notes": self.notes,
            "figures": figures,
            "load_generator_check": self.headroom(),
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n")

    def text(self) -> str:
        lines: list[str] = []
        for section in self.sections.values():
            lines += ["", f"== {section.name}: {section.title}", *self._table(section)]
        lines += ["", ("== direct vs the fastest relay: direct runs both ends on the load CPU, so a"
                       " relay close to it is held back by the load CPU, not its own (see its CPU figures)")]
        lines += self.headroom()
        if self.notes:
            lines += ["", "== skipped, failed and warnings"]
            lines += [f"{_where(n['relay'], n['workload'])}: {n['status']}: {n['reason']}"
                      for n in self.notes]
        return "\n".join(lines) + "\n"

    def _table(self, section: Section) -> list[str]:
        header = ["relay", "variant"]
        columns = {metric.key: self.references(section, metric) for metric in section.metrics}
        for metric in section.metrics:
            header.append(metric.unit)
            if metric.added:
                header.append("+µs/direct")
            header += [f"/{reference}" for reference in columns[metric.key]]
        rows = [header]
        for variant in section.variants:
            for relay in self.relays:
                if (section.name, variant, relay, section.metrics[0].key) not in self.entries:
                    continue
                row = [relay, variant]
                for metric in section.metrics:
                    entry = self.entries.get((section.name, variant, relay, metric.key))
                    row.append(_number(entry.median if entry else None))
                    if metric.added:
                        row.append(_number(self.added(entry) if entry else None))
                    row += [_ratio(self.ratio(entry, r) if entry else None) for r in columns[metric.key]]
                rows.append(row)
        return _aligned(rows)

    def headroom(self) -> list[str]:
        """
        For each headline figure, direct against the best relay: the load
        generator is not the bottleneck if direct is at least 1.5 times better.
        """
        lines = []
        for section in self.sections.values():
            for metric in (m for m in section.metrics if m.headline):
                for variant in section.variants:
                    direct = self.median(section.name, variant, "direct", metric.key)
                    others = [
                        value for relay in self.relays if relay != "direct"
                        if (value := self.median(section.name, variant, relay, metric.key))
                    ]
                    if not direct or not others:
                        continue
                    best = min(others) if metric.lower_is_better else max(others)
                    advantage = best / direct if metric.lower_is_better else direct / best
                    verdict = "ok" if advantage >= 1.5 else "WARNING: the load generator may be the bottleneck"
                    lines.append(f"{section.name} {variant} {metric.unit}: direct {_number(direct)},"
                                 f" best relay {_number(best)}: direct {advantage:.1f}x better ({verdict})")
        return lines


def _where(relay: str, workload: str) -> str:
    return " ".join(filter(None, (relay, workload))) or "benchmark"


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000 or value == int(value):
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ratio(ratio: Ratio | None) -> str:
    """The median ratio, then its spread if the repetitions differ (never for the reference itself)."""
    if ratio is None:
        return "-"
    spread = f" ({ratio.low:.2f}-{ratio.high:.2f})" if ratio.low != ratio.high else ""
    return f"{ratio.median:.2f}x{spread}"


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                  for i, (cell, width) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]
