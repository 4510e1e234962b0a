"""
Bandwidth limits: token buckets of bytes per connection, per client and per
route, each direction on its own.

A route's C{bandwidth} gives each relayed connection (a UDP session) one
L{Meter} per direction: the buckets its bytes are taken from, its own
(C{per_connection}), its client's (C{per_client}, shared by every connection
of that client host on the route) and the route's (C{per_route}, shared by
all).  A bucket holds at most one second's worth of its rate, starts full,
and refills from the reactor's clock as it is read: no timers until a
connection has to wait.

The relay paths ask their meter in their own terms (L{streamrelay.tcp.Side},
L{streamrelay.splice}, L{streamrelay.udp}): Twisted's transports read first
and L{Meter.charge} afterwards (a bucket may go into debt by one read), the
splice engine asks L{Meter.allowance} how much it may move before it reads,
and a datagram passes L{Meter.admit} whole or is dropped.  A reader that
has to wait stops reading until L{Meter.delay} has passed: no byte is held
in the process meanwhile.  A meter leases bytes from its buckets ahead of
use, so a limit that is never reached costs a subtraction per read.

The per-client table keeps the clients with open connections, and the
others until their buckets have refilled (a client that reconnects gets no
fresh burst), at most L{MAX_IDLE_CLIENTS} of those, least recently left
dropped first: a flood of spoofed UDP sources cannot grow it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Callable, Final, Literal

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = [
    "CHUNK", "MAX_IDLE_CLIENTS", "Bandwidth", "ByteRate", "Directions", "Meter", "Shaper", "parse_byte_rate",
]

#: Bytes per unit of a rate, largest first (the order L{ByteRate.__str__} tries).
UNITS: Final = {"GiB": 1 << 30, "GB": 10**9, "MiB": 1 << 20, "MB": 10**6, "KiB": 1 << 10, "kB": 1000, "B": 1}
#: The highest rate accepted: 1 TiB/s, beyond any link.
MAX_RATE: Final = 1 << 40
#: A reader that has to wait waits until every bucket holds this much (or
#: its whole second, if smaller): Twisted's read size, so that a limited
#: connection is woken once per read and not once per byte.
CHUNK: Final = 1 << 16
#: A meter's lease is this fraction of a second of its slowest rate (L{Meter}).
LEASES_PER_SECOND: Final = 16
#: Clients without open connections whose buckets are still refilling, kept at most.
MAX_IDLE_CLIENTS: Final = 65536

_RATE = re.compile(r"([0-9]{1,16}(?:\.[0-9]{1,16})?) ?(" + "|".join(UNITS) + ")/s")

#: A direction: C{up} is read from the client, C{down} from the target.
Direction = Literal["up", "down"]
DIRECTIONS: Final[tuple[Direction, ...]] = ("up", "down")


@dataclass(frozen=True)
class ByteRate:
    """Bytes per second."""

    per_second: int

    def __str__(self) -> str:
        """The largest unit that writes it exactly: C{10MiB/s}, C{1500kB/s}."""
        return next(f"{self.per_second // size}{unit}/s" for unit, size in UNITS.items() if not self.per_second % size)


def parse_byte_rate(value: object) -> ByteRate:
    """
    C{10MiB/s}, C{1.5 GB/s}, C{500kB/s}: a number and a unit (bytes, decimal
    or binary multiples), per second; rounded down to whole bytes.
    """
    match = _RATE.fullmatch(value) if isinstance(value, str) else None
    per_second = int(Decimal(match.group(1)) * UNITS[match.group(2)]) if match else 0
    if not 1 <= per_second <= MAX_RATE:
        raise ValueError("a rate such as 10MiB/s (B, kB, KiB, MB, MiB, GB or GiB per second; from 1B/s to 1024GiB/s)")
    return ByteRate(per_second)


@dataclass(frozen=True)
class Directions:
    """One limit's rates: each direction limited on its own; C{None}: not limited."""

    up: ByteRate | None = None
    down: ByteRate | None = None

    def of(self, direction: Direction) -> ByteRate | None:
        return self.up if direction == "up" else self.down


@dataclass(frozen=True)
class Bandwidth:
    """A route's C{bandwidth} setting; at least one of the limits is set."""

    per_connection: Directions | None = None
    per_client: Directions | None = None
    per_route: Directions | None = None


class Bucket:
    """Bytes that may move, up to one second of C{rate}; in debt (negative) after a read larger than it held."""

    __slots__ = ("rate", "low", "tokens", "stamp")

    def __init__(self, rate: ByteRate, now: float) -> None:
        self.rate = float(rate.per_second)
        #: What a waiting reader waits for.
        self.low = float(min(CHUNK, rate.per_second))
        self.tokens = self.rate
        self.stamp = now

    def fill(self, now: float) -> float:
        """Add what the rate brought since the last count, up to one second's worth; the tokens now."""
        tokens = self.tokens + max(0.0, now - self.stamp) * self.rate
        self.tokens = tokens = min(tokens, self.rate)
        self.stamp = now
        return tokens


class _Client:
    """A client host's buckets, and how many meters use them."""

    __slots__ = ("buckets", "users")

    def __init__(self, buckets: dict[Direction, Bucket]) -> None:
        self.buckets = buckets
        self.users = 0

    def full(self, now: float) -> bool:
        """Whether every bucket has refilled: such a client is as good as unknown."""
        return all(bucket.fill(now) >= bucket.rate for bucket in self.buckets.values())


class Meter:
    """
    One direction of one connection: the buckets (its own, its client's,
    the route's) every byte it moves is taken from.

    Reads happen tens of thousands of times per GiB, so a meter takes bytes
    from its buckets ahead of use, a lease of 1/16 s of its slowest rate
    (at least a chunk), and spends that C{credit} without reading the clock;
    only when the credit runs out does it settle with the buckets (the
    clock, the refill, the debt) and take the next lease.  What a meter
    holds is not lost to the connections sharing its buckets for longer
    than that: L{close} gives it back.
    """

    __slots__ = ("buckets", "names", "reactor", "low", "lease", "credit", "release")

    def __init__(
        self, buckets: tuple[Bucket, ...], names: tuple[str, ...], reactor: IReactorTime,
        release: Callable[[], None] | None,
    ) -> None:
        self.buckets = buckets
        #: Each bucket's limit (C{per_connection}, C{per_client}, C{per_route}), for the logs.
        self.names = names
        self.reactor = reactor
        self.low = min(bucket.low for bucket in buckets)
        self.lease = min(max(bucket.low, bucket.rate / LEASES_PER_SECOND) for bucket in buckets)
        #: Bytes already taken from every bucket and not yet moved.
        self.credit = 0.0
        self.release = release

    def charge(self, count: int) -> bool:
        """Take C{count} bytes already read; whether reading may go on (every bucket still holds its chunk)."""
        credit = self.credit - count
        if credit >= 0:
            self.credit = credit
            return True
        self.credit = credit  # a debt, paid now
        return self.settle()

    def allowance(self) -> int:
        """How many bytes may be read now: the credit, 0 unless every bucket holds its chunk."""
        if self.credit < self.low and not self.settle():
            return 0
        return int(self.credit)

    def take(self, count: int) -> None:
        """Take C{count} bytes just read within L{allowance}."""
        self.credit -= count

    def admit(self, size: int) -> str | None:
        """
        Take a datagram of C{size} bytes if every bucket holds it (or is
        full: a datagram larger than a second's worth is not stuck forever);
        else the name of the limit it is over.
        """
        if self.credit >= size:
            self.credit -= size
            return None
        self.settle(lease=False)
        for bucket, name in zip(self.buckets, self.names):
            if bucket.tokens < min(size, bucket.rate):
                return name
        self.credit = -size
        self.settle()  # pays for it, and leases ahead if the buckets allow
        return None

    def settle(self, lease: bool = True) -> bool:
        """
        Give the credit back to the buckets (or pay the debt), refilled up
        to now; whether every bucket holds its chunk, and if so (and
        C{lease}) take the next lease.
        """
        now = self.reactor.seconds()
        credit, self.credit = self.credit, 0.0
        ready = True
        least = float(MAX_RATE)
        for bucket in self.buckets:
            bucket.tokens = tokens = min(bucket.fill(now) + credit, bucket.rate)
            ready = ready and tokens >= bucket.low
            least = min(least, tokens)
        if ready and lease:
            self.credit = taken = min(self.lease, least)
            for bucket in self.buckets:
                bucket.tokens -= taken
        return ready

    def delay(self) -> float:
        """Seconds until every bucket holds its chunk again (0: now)."""
        now = self.reactor.seconds()
        return max(0.0, *((bucket.low - bucket.fill(now)) / bucket.rate for bucket in self.buckets))

    def later(self, resume: Callable[[], None]) -> IDelayedCall:
        """Call C{resume} once L{delay} has passed (shared buckets may have been emptied again by then)."""
        return self.reactor.callLater(self.delay(), resume)

    def close(self) -> None:
        """The connection is gone: the credit goes back, and its client's buckets may be forgotten once unused."""
        self.settle(lease=False)
        release, self.release = self.release, None
        if release is not None:
            release()


class Shaper:
    """A route's buckets, kept across reloads that leave C{bandwidth} alone."""

    def __init__(self, setting: Bandwidth, reactor: IReactorTime, max_idle_clients: int = MAX_IDLE_CLIENTS) -> None:
        self.setting = setting
        self.reactor = reactor
        self.max_idle_clients = max_idle_clients
        now = reactor.seconds()
        self.route = self.buckets(setting.per_route, now)
        #: Client host to its buckets.
        self.clients: dict[str, _Client] = {}
        #: Those without open connections, least recently left first.
        self.idle: OrderedDict[str, _Client] = OrderedDict()

    @staticmethod
    def buckets(limit: Directions | None, now: float) -> dict[Direction, Bucket]:
        """A bucket for each direction C{limit} limits."""
        rates = {direction: limit.of(direction) for direction in DIRECTIONS} if limit else {}
        return {direction: Bucket(rate, now) for direction, rate in rates.items() if rate is not None}

    def open(self, client: str) -> tuple[Meter | None, Meter | None]:
        """The meters of a new connection from C{client}: up and down, C{None} for a direction not limited."""
        now = self.reactor.seconds()
        setting = self.setting
        own = self.buckets(setting.per_connection, now)
        shared = self.client(client, now).buckets if setting.per_client else {}
        meters: list[Meter | None] = []
        for direction in DIRECTIONS:
            chosen = [
                (name, buckets[direction])
                for name, buckets in (("per_connection", own), ("per_client", shared), ("per_route", self.route))
                if direction in buckets
            ]
            if not chosen:
                meters.append(None)
                continue
            release = None
            if direction in shared:
                self.clients[client].users += 1
                release = partial(self.leave, client)
            names, buckets = zip(*chosen)
            meters.append(Meter(buckets, names, self.reactor, release))
        return meters[0], meters[1]

    def client(self, client: str, now: float) -> _Client:
        """C{client}'s buckets, new ones if it is unknown; idle clients whose buckets have refilled are forgotten."""
        idle = self.idle
        while idle:  # least recently left first: stop at the first still refilling
            name, oldest = next(iter(idle.items()))
            if not oldest.full(now):
                break
            del idle[name], self.clients[name]
        entry = self.clients.get(client)
        if entry is None:
            entry = self.clients[client] = _Client(self.buckets(self.setting.per_client, now))
        else:
            idle.pop(client, None)
        return entry

    def leave(self, client: str) -> None:
        """One of C{client}'s meters is closed; past the last, the client waits in the idle table."""
        entry = self.clients[client]
        entry.users -= 1
        if entry.users:
            return
        self.idle[client] = entry
        if len(self.idle) > self.max_idle_clients:
            name, _ = self.idle.popitem(last=False)
            del self.clients[name]
