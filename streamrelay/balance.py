"""
Choosing a target for each connection (or UDP session) among a route's
several: the three modes of GoDoxy's load balancer, with nginx's semantics
for weights, backups and passive failures.

A L{Balancer} holds one L{Target} per address, primaries and backups, and
answers L{Balancer.pick}.  A target is eligible while its active checks say
it is up (L{streamrelay.health} sets C{up}) and it is not passively failed:
C{max_fails} failed dials within C{fail_timeout} take it out for
C{fail_timeout}, after which one dial is let through and a single failure
takes it out again, until a dial succeeds (nginx's C{max_fails} and
C{fail_timeout}, defaults 1 and 10 s).  Primaries get every connection while
one is eligible; backups only when none is.  When nothing is eligible,
C{pick} returns C{None} and the caller refuses the client without dialing,
as nginx does since 1.11.5 ("no live upstreams"; commit fd9e74f removed the
"quick recovery" that then reset every target and tried them anyway).  As in
nginx, a route with a single target and no backup never fails passively:
refusing its clients would help nobody.

C{roundrobin} is nginx's smooth weighted round robin (weights 1, 2 and 3
give exactly 1, 2 and 3 of every 6 picks, interleaved); C{leastconn} takes
the fewest active pairs per unit of weight, breaking ties by smooth round
robin (nginx's C{least_conn}); C{iphash} places each target on a hash ring
160 times per unit of weight and follows the client's address round the
ring to the first eligible target, so removing one of four targets moves
that target's clients alone.  With C{sticky}, roundrobin and leastconn send
a client back to the target it last got while it is eligible, for
C{sticky_max_age} after its last connection; the table keeps the
L{STICKY_CLIENTS} most recently seen clients.

Nothing here touches the reactor or logs: the methods that change a
target's state say whether it changed, and the caller logs transitions.
Each pick is a pass over the route's targets (a handful), the ring a
binary search.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import time
from collections import OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Callable, Final, Literal, get_args

__all__ = [
    "MODES", "STICKY_CLIENTS", "VIRTUAL_NODES", "Balancer", "Changes", "LoadBalance", "Mode", "Target", "TargetSpec",
]

Mode = Literal["roundrobin", "leastconn", "iphash"]
MODES: Final[tuple[Mode, ...]] = get_args(Mode)

#: Points on the iphash ring per unit of weight: enough that four targets'
#: shares stay within a few percent of their weights.
VIRTUAL_NODES: Final = 160

#: How many clients the sticky table remembers; past it, the least recently
#: seen client is forgotten (its next connection is balanced afresh).
STICKY_CLIENTS: Final = 65536


@dataclass(frozen=True)
class TargetSpec:
    """A target as configured: C{host} an IP address once resolved; C{weight} at least 1."""

    host: str
    port: int
    weight: int = 1
    backup: bool = False


@dataclass(frozen=True)
class LoadBalance:
    """A route's C{load_balance} setting and its passive-check fields (GoDoxy's and nginx's names and defaults)."""

    mode: Mode = "roundrobin"
    sticky: bool = False
    #: GoDoxy's default: one hour.
    sticky_max_age: float = 3600.0
    #: Failed dials within C{fail_timeout} that take a target out; 0 never does.
    max_fails: int = 1
    fail_timeout: float = 10.0


@dataclass(eq=False)
class Target:
    """
    One address of a route and what is known of it.  Compared by identity: a
    target that stays across L{Balancer.set_targets} is the same object.
    """

    host: str
    port: int
    weight: int = 1
    backup: bool = False
    #: What the active checks say (L{streamrelay.health}); up until they say otherwise.
    up: bool = True
    #: Pairs (or sessions) open or dialing: L{Balancer.connected} to L{Balancer.closed}.
    active: int = 0
    picked: int = 0
    #: Failed dials, in all.
    failures: int = 0
    #: When the last active check finished, on the checker's clock.
    last_check: float | None = None
    #: The last reason a dial or a check failed.
    last_error: str | None = None
    #: When recent failed dials happened (those within C{fail_timeout}).
    recent_failures: list[float] = field(default_factory=list)
    #: Out until then after C{max_fails}; set until a dial succeeds, so that
    #: one failure after it takes the target out again.
    failed_until: float | None = None
    #: Smooth weighted round robin's running weight.
    current_weight: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return self.host, self.port


@dataclass(frozen=True)
class Changes:
    """What L{Balancer.set_targets} did: the targets that came and went."""

    added: tuple[Target, ...] = ()
    removed: tuple[Target, ...] = ()


class Balancer:
    """A route's targets and its choice among them."""

    def __init__(
        self,
        specs: Iterable[TargetSpec] = (),
        settings: LoadBalance = LoadBalance(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """C{settings} may be replaced later (a reload): nothing depends on it but the next pick."""
        self.settings = settings
        self.clock = clock
        self.primaries: list[Target] = []
        self.backups: list[Target] = []
        self._by_key: dict[tuple[str, int], Target] = {}
        self._rings: tuple[_Ring, _Ring] | None = None
        #: Client host -> (key of the target it last got, when).  Oldest first.
        self._sticky: OrderedDict[str, tuple[tuple[str, int], float]] = OrderedDict()
        self.set_targets(specs)

    @property
    def targets(self) -> list[Target]:
        """Primaries, then backups, each in configured order."""
        return self.primaries + self.backups

    def set_targets(self, specs: Iterable[TargetSpec]) -> Changes:
        """
        Replace the list of targets (a DNS answer changed, a reload).  A
        target whose address stays keeps its object and state, and takes the
        new weight and backup flag; the first of two specs with one address
        wins.
        """
        kept: dict[tuple[str, int], Target] = {}
        added: list[Target] = []
        for spec in specs:
            key = (spec.host, spec.port)
            if key in kept:
                continue
            target = self._by_key.get(key)
            if target is None:
                target = Target(spec.host, spec.port)
                added.append(target)
            target.weight, target.backup = spec.weight, spec.backup
            kept[key] = target
        removed = tuple(t for key, t in self._by_key.items() if key not in kept)
        self._by_key = kept
        self.primaries = [t for t in kept.values() if not t.backup]
        self.backups = [t for t in kept.values() if t.backup]
        self._rings = None
        return Changes(tuple(added), removed)

    # -- choosing

    def eligible(self, target: Target) -> bool:
        """Up, and not passively failed."""
        return _usable(target, self.clock(), ())

    def pick(self, client_host: str, exclude: Collection[Target] = ()) -> Target | None:
        """
        The target for a new connection from C{client_host} (the real
        client), or C{None} when no target outside C{exclude} (those a failed
        dial already tried) is eligible.  The caller then calls
        L{connected} and dials.
        """
        now = self.clock()
        settings = self.settings
        chosen: Target | None = None
        remember = settings.sticky and settings.mode != "iphash"
        if remember:
            chosen = self._remembered(client_host, now)
            if chosen is not None and not _usable(chosen, now, exclude):
                chosen = None
        if chosen is None:
            chosen = self._choose(client_host, now, exclude)
            if chosen is None:
                return None
        chosen.picked += 1
        if remember:
            self._remember(client_host, chosen, now)
        return chosen

    def _choose(self, client_host: str, now: float, exclude: Collection[Target]) -> Target | None:
        mode = self.settings.mode
        if mode == "iphash":
            point = _hash(client_host)
            for ring in self._ring_pair():
                found = ring.walk(point, now, exclude)
                if found is not None:
                    return found
            return None
        for tier in (self.primaries, self.backups):
            candidates = [t for t in tier if _usable(t, now, exclude)]
            if candidates:
                return _smooth(candidates) if mode == "roundrobin" else _least(candidates)
        return None

    def _ring_pair(self) -> tuple[_Ring, _Ring]:
        if self._rings is None:
            self._rings = (_Ring(self.primaries), _Ring(self.backups))
        return self._rings

    # -- sticky sessions

    def _remembered(self, client_host: str, now: float) -> Target | None:
        max_age = self.settings.sticky_max_age
        table = self._sticky
        while table:  # the oldest first: drop the expired ones
            oldest = next(iter(table.values()))
            if now - oldest[1] <= max_age:
                break
            table.popitem(last=False)
        entry = table.get(client_host)
        return None if entry is None else self._by_key.get(entry[0])

    def _remember(self, client_host: str, target: Target, now: float) -> None:
        table = self._sticky
        table[client_host] = (target.key, now)
        table.move_to_end(client_host)
        if len(table) > STICKY_CLIENTS:
            table.popitem(last=False)

    # -- what the caller reports

    def connected(self, target: Target) -> None:
        """A pair (or session) to C{target} begins: call it when its dial starts, so leastconn counts dials."""
        target.active += 1

    def closed(self, target: Target) -> None:
        """That pair (or session) has ended, or its dial failed."""
        target.active -= 1

    def failed(self, target: Target, reason: str) -> bool:
        """A dial to C{target} failed.  Whether that took the target out (log it)."""
        now = self.clock()
        target.failures += 1
        target.last_error = reason
        settings = self.settings
        if not settings.max_fails or (len(self.primaries) == 1 and not self.backups):
            return False
        if target.failed_until is not None:  # out already, or back on trial after fail_timeout
            was_eligible = now >= target.failed_until
            target.failed_until = now + settings.fail_timeout
            return was_eligible
        recent = [t for t in target.recent_failures if now - t < settings.fail_timeout]
        recent.append(now)
        if len(recent) < settings.max_fails:
            target.recent_failures = recent
            return False
        target.recent_failures = []
        target.failed_until = now + settings.fail_timeout
        return True

    def succeeded(self, target: Target) -> bool:
        """A dial to C{target} connected.  Whether that ended a passive failure (log it)."""
        if target.failed_until is None:
            return False
        target.failed_until = None
        return True


def _usable(target: Target, now: float, exclude: Collection[Target]) -> bool:
    """Eligible (up, not passively failed) and not already tried."""
    return target.up and (target.failed_until is None or now >= target.failed_until) and target not in exclude


def _smooth(candidates: list[Target]) -> Target:
    """
    nginx's smooth weighted round robin: each candidate gains its weight,
    the richest is chosen and pays back the total.
    """
    total = 0
    best = candidates[0]
    for target in candidates:
        target.current_weight += target.weight
        total += target.weight
        if target.current_weight > best.current_weight:
            best = target
    best.current_weight -= total
    return best


def _least(candidates: list[Target]) -> Target:
    """The fewest active pairs per unit of weight; ties by smooth round robin (nginx's C{least_conn})."""
    best = candidates[0]
    ties = [best]
    for target in candidates[1:]:
        # target.active / target.weight against best's, without division
        mine, theirs = target.active * best.weight, best.active * target.weight
        if mine < theirs:
            best, ties = target, [target]
        elif mine == theirs:
            ties.append(target)
    return best if len(ties) == 1 else _smooth(ties)


def _hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (Python's own is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class _Ring:
    """
    A consistent-hash ring: L{VIRTUAL_NODES} points per unit of weight for
    each target, drawn from a generator seeded with its address (the same
    in every process, and a higher weight only adds points).
    """

    def __init__(self, targets: list[Target]) -> None:
        nodes: list[tuple[int, int]] = []
        for n, target in enumerate(targets):
            draw = random.Random(f"{target.host} {target.port}").getrandbits
            nodes.extend((draw(64), n) for _ in range(VIRTUAL_NODES * target.weight))
        nodes.sort()
        self.points = [point for point, _ in nodes]
        self.owners = [targets[n] for _, n in nodes]
        self.distinct = len(targets)

    def walk(self, point: int, now: float, exclude: Collection[Target]) -> Target | None:
        """The first usable target clockwise from C{point}, asking each target once."""
        start = bisect.bisect(self.points, point)
        size = len(self.points)
        refused: set[Target] = set()
        for step in range(size):
            target = self.owners[(start + step) % size]
            if target in refused:
                continue
            if _usable(target, now, exclude):
                return target
            refused.add(target)
            if len(refused) == self.distinct:
                break
        return None
