"""
Connection-rate limits: token buckets per client and per route.

A route's C{rate_limit} refuses a TCP connection, or a UDP datagram that
would open a session, before anything is dialed when its client (the real
one, after any PROXY header) or the route as a whole is over its rate.
Buckets refill from the reactor's clock as they are read: no timers.  The
per-client table is an LRU with a size cap, and a bucket that has refilled
is dropped (it says nothing an absent one would not), so a flood from
spoofed sources costs at most L{MAX_CLIENTS} entries.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Final, Literal

__all__ = ["MAX_CLIENTS", "Rate", "RateLimit", "RateLimiter", "Verdict"]

#: How many clients' buckets a route keeps at most; past it the least
#: recently seen client's bucket goes (that client starts afresh).
MAX_CLIENTS: Final = 65536

#: Seconds in each unit a rate may be given in.
UNITS: Final = {"s": 1, "m": 60, "h": 3600}

#: Which limit refused: L{RateLimiter.admit}'s answer (C{None}: admitted).
Verdict = Literal["per_client", "per_route", None]


@dataclass(frozen=True)
class Rate:
    """C{count} connections (or new UDP sessions) per C{unit} (C{s}, C{m}, C{h})."""

    count: int
    unit: str

    def __str__(self) -> str:
        return f"{self.count}/{self.unit}"

    @property
    def per_second(self) -> float:
        return self.count / UNITS[self.unit]

    @property
    def one_second(self) -> int:
        """One second's worth, rounded up, at least 1: the default burst."""
        return max(1, math.ceil(self.per_second))


@dataclass(frozen=True)
class RateLimit:
    """A route's C{rate_limit} setting; at least one of the rates is set."""

    per_client: Rate | None = None
    #: How many connections a client may open at once after a quiet spell.
    burst: int = 1
    per_route: Rate | None = None


class _Bucket:
    """Tokens and when they were last counted; the rate and size are the owner's."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp

    def fill(self, now: float, rate: float, size: float) -> float:
        """Add what C{rate} brought since the last count, up to C{size}; the tokens now."""
        self.tokens = min(size, self.tokens + max(0.0, now - self.stamp) * rate)
        self.stamp = now
        return self.tokens


class RateLimiter:
    """
    A route's buckets, kept across reloads that leave C{rate_limit} alone.
    The per-route bucket holds one second's worth of C{per_route}.
    """

    def __init__(self, setting: RateLimit, clock: Callable[[], float], max_clients: int = MAX_CLIENTS) -> None:
        self.setting = setting
        self.clock = clock
        self.max_clients = max_clients
        client = setting.per_client
        self.client_rate = client.per_second if client else 0.0
        #: Seconds after which a client's bucket is full again, whatever it held.
        self.refill_time = setting.burst / self.client_rate if client else 0.0
        #: Client host to bucket, least recently seen first.
        self.clients: OrderedDict[str, _Bucket] = OrderedDict()
        route = setting.per_route
        self.route_rate = route.per_second if route else 0.0
        self.route_size = float(route.one_second) if route else 0.0
        self.route: _Bucket | None = _Bucket(self.route_size, clock()) if route else None

    def admit(self, client: str) -> Verdict:
        """Take a token from C{client}'s bucket and the route's, if both have one; else say which has none."""
        now = self.clock()
        bucket = self.client_bucket(client, now) if self.client_rate else None
        if bucket is not None and bucket.tokens < 1:
            return "per_client"
        route = self.route
        if route is not None and route.fill(now, self.route_rate, self.route_size) < 1:
            return "per_route"
        if bucket is not None:
            bucket.tokens -= 1
        if route is not None:
            route.tokens -= 1
        return None

    def client_bucket(self, client: str, now: float) -> _Bucket:
        """C{client}'s bucket, filled up to now, as the most recently seen; expired and surplus ones go."""
        clients = self.clients
        while clients:  # least recently seen first: stop at the first still refilling
            _, oldest = next(iter(clients.items()))
            if now - oldest.stamp < self.refill_time:
                break
            clients.popitem(last=False)
        bucket = clients.pop(client, None)
        if bucket is None:
            bucket = _Bucket(float(self.setting.burst), now)
            if len(clients) >= self.max_clients:
                clients.popitem(last=False)
        else:
            bucket.fill(now, self.client_rate, self.setting.burst)
        clients[client] = bucket
        return bucket
