"""
Host-name targets that follow DNS: each name's addresses, cached for their
records' TTL and refreshed in the background, shared by every route of the
process.

The reactor's C{nameResolver} (C{getaddrinfo} in a thread) gives no TTL, so
a relay built on it resolves at every dial: a DNS round trip before each
connection, and a slow or dead DNS server stalls every dial.  L{DNSCache}
asks for A and AAAA records itself, with C{twisted.names.client.Resolver},
and keeps each answer for its TTL, bounded by C{min_ttl} (a TTL of 0 would
mean a query per dial) and C{max_ttl} (a day-long TTL would hide a change for
a day).  Dials read the cache and never wait for DNS, but for a name's first
answer.

A refresh that gets no answer (a timeout, SERVFAIL, REFUSED, a network
error) keeps the last good answer, for at most C{max_stale} past its TTL
(RFC 8767's serve-stale): a DNS outage does not become a relay outage.  An
authoritative "no such name" (NXDOMAIN) or "no such record" is an answer and
is followed at once.  Failed refreshes are retried after C{min_ttl}, doubling
up to L{RETRY_LIMIT}.

Where the answers come from:
  - IP literals are their own answer and never touch DNS.
  - With the system's configuration (no C{servers}), a name the hosts file
    lists with addresses of the family asked for is answered from it alone,
    as glibc's C{hosts: files dns}; otherwise the C{nameserver} lines of
    C{resolv.conf} are asked.  Both files are read again at every refresh
    (hosts answers are kept for C{max_ttl}), so edits apply without a
    restart.
  - C{localhost} and the names under C{.localhost} are never sent to a
    server (RFC 6761 §6.3): the hosts file answers them, else they are
    C{127.0.0.1} and C{::1}.  The default target stays local whatever the
    configured servers say.
  - Names are asked as written: C{resolv.conf}'s C{search} and C{ndots} are
    not applied (Twisted parses them but never uses them; nginx's and
    HAProxy's resolvers do the same), so targets must be fully qualified.

The cache holds the names of the configuration's targets and no more
(L{DNSCache.retain} forgets those a reload removed), and its only timers are
one refresh per name, which L{DNSCache.stop} cancels.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Collection, Sequence

from twisted.internet.defer import Deferred, DeferredList, TimeoutError, fail, gatherResults, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger, LogLevel
from twisted.names import client, dns
from twisted.names.error import (
    DNSFormatError,
    DNSNameError,
    DNSNotImplementedError,
    DNSQueryRefusedError,
    DNSServerError,
    DNSUnknownError,
)
from twisted.names.hosts import searchFileForAll
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from . import events
from .dial import is_ip_literal
from .interfaces import IRelayReactor

__all__ = [
    "DEFAULT_MAX_STALE", "DEFAULT_MAX_TTL", "DEFAULT_MIN_TTL", "DNSCache", "Family", "read_resolv_conf",
]

#: The shortest time an answer is kept.  nginx honours any TTL and HAProxy
#: asks again every 10 s (C{hold valid}) whatever the TTL; a floor of 1 s
#: follows DNS as closely as nginx while a TTL of 0 (Consul's default) costs
#: one query a second per name, not one per dial.
DEFAULT_MIN_TTL = 1.0

#: The longest time an answer is kept however long its TTL: nginx's resolver
#: kept every answer for exactly 5 minutes before it honoured TTLs, and a
#: change made under a day-long TTL is then seen within minutes.
DEFAULT_MAX_TTL = 300.0

#: How long past its TTL a name's last good answer is used while its DNS
#: servers do not answer: CoreDNS's C{serve_stale} default (RFC 8767
#: suggests one to three days; a relay sending clients to an address nobody
#: has confirmed for an hour has waited long enough).
DEFAULT_MAX_STALE = 3600.0

#: Each query is sent to every server in turn, waiting this long for each,
#: then again with the next timeout: at most 4 s per server in all (HAProxy
#: waits 1 s and retries 3 times; glibc's 5 s twice would hold a name's
#: first dial for 10 s).
QUERY_TIMEOUTS = (1.0, 3.0)

#: The longest wait between the retries of a name whose refresh failed
#: (HAProxy's C{hold timeout}).
RETRY_LIMIT = 30.0

#: How long a "no such name" or "no such record" answer is kept when it
#: carries no SOA record to say (HAProxy's C{hold nx}).
NEGATIVE_TTL = 30.0

#: 4, 6, or C{None} for both, IPv4 addresses first: a dial tries them in
#: order, and many hosts have no IPv6 route.
Family = int | None

_TYPES: dict[Family, tuple[int, ...]] = {4: (dns.A,), 6: (dns.AAAA,), None: (dns.A, dns.AAAA)}
_TYPE_NAMES = {dns.A: "A", dns.AAAA: "AAAA"}
_NO_RECORD = {dns.A: "no IPv4 address", dns.AAAA: "no IPv6 address"}
_FAMILIES = {dns.A: socket.AF_INET, dns.AAAA: socket.AF_INET6}
_TYPE_OF = {4: dns.A, 6: dns.AAAA}
_LOOPBACK = {dns.A: ("127.0.0.1",), dns.AAAA: ("::1",)}

#: What a failed query's response code says, in words.
_RCODES = {
    DNSServerError: "server failure (SERVFAIL)",
    DNSQueryRefusedError: "query refused (REFUSED)",
    DNSFormatError: "query format error (FORMERR)",
    DNSNotImplementedError: "query not implemented (NOTIMP)",
    DNSUnknownError: "unknown response code",
}

_log = Logger(namespace="streamrelay")


def read_resolv_conf(path: str) -> list[tuple[str, int]]:
    """
    The servers of C{resolv.conf(5)}'s C{nameserver} lines: the first three,
    as glibc, or C{127.0.0.1} when there are none (or no file), as glibc.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as lines:
            servers = [
                (fields[1], dns.PORT)
                for fields in map(str.split, lines)
                if len(fields) > 1 and fields[0] == "nameserver" and is_ip_literal(fields[1])
            ]
    except OSError:
        servers = []
    return servers[:3] or [("127.0.0.1", dns.PORT)]


def _is_localhost(host: str) -> bool:
    name = host.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


def _ordered(addresses: Collection[str]) -> tuple[str, ...]:
    """Sorted, so a server that rotates its answers never looks like a change."""
    return tuple(sorted(set(addresses), key=lambda text: ipaddress.get_mixed_type_key(ipaddress.ip_address(text))))


def _negative_ttl(authority: Sequence[dns.RRHeader]) -> float:
    """RFC 2308: a negative answer lives for its SOA's TTL, at most the SOA's C{minimum}."""
    for record in authority:
        if record.type == dns.SOA:
            return float(min(record.ttl, _payload(record).minimum))
    return NEGATIVE_TTL


def _payload(record: dns.RRHeader) -> Any:
    """
    The record's data, of the class its C{type} says: mypy-zope cannot
    narrow the payload's interface to its class (it takes C{isinstance} to
    be always false).
    """
    return record.payload


@dataclass(frozen=True)
class _Answer:
    """One record type's answer: its addresses (none: C{reason} says why) and how long it holds."""

    addresses: tuple[str, ...]
    ttl: float
    reason: str = ""


@dataclass(frozen=True)
class _Failure:
    """One record type's query got no answer."""

    reason: str


@dataclass(frozen=True)
class _Kept:
    """The last answer for one record type, and when it expires."""

    addresses: tuple[str, ...]
    expires: float


@dataclass(eq=False)
class _Name:
    """One name in one family: its answer, its refresh, who waits for it and who follows it."""

    host: str
    family: Family
    kept: dict[int, _Kept] = field(default_factory=dict)
    #: C{None} until the first refresh ends.
    addresses: tuple[str, ...] | None = None
    #: Why C{addresses} is empty.
    reason: str = ""
    #: Refreshes failed in a row.
    failures: int = 0
    timer: IDelayedCall | None = None
    waiters: list[Deferred[list[str]]] = field(default_factory=list)
    subscribers: list[Callable[[list[str]], object]] = field(default_factory=list)
    #: Set once L{DNSCache.retain} or L{DNSCache.stop} dropped the name.
    dropped: bool = False

    @property
    def lookup(self) -> str:
        return "+".join(_TYPE_NAMES[rtype] for rtype in _TYPES[self.family])

    def error(self) -> DNSLookupError:
        return DNSLookupError(f"{self.host} {self.lookup}: {self.reason}")


class DNSCache:
    """
    The addresses of the targets given by name, one instance per process.

    C{servers}: C{(ip, port)} pairs to ask (the configuration's
    C{resolver.servers}), or C{None} for the system's configuration:
    C{hosts}, then C{resolv_conf}'s servers.
    """

    def __init__(
        self,
        reactor: IRelayReactor,
        servers: Sequence[tuple[str, int]] | None = None,
        *,
        min_ttl: float = DEFAULT_MIN_TTL,
        max_ttl: float = DEFAULT_MAX_TTL,
        max_stale: float = DEFAULT_MAX_STALE,
        timeouts: Sequence[float] = QUERY_TIMEOUTS,
        resolv_conf: str = "/etc/resolv.conf",
        hosts: str = "/etc/hosts",
    ) -> None:
        if not 0 < min_ttl <= max_ttl or max_stale < 0 or not timeouts:
            raise ValueError("need 0 < min_ttl <= max_ttl, max_stale >= 0 and a query timeout")
        self.reactor = reactor
        self.servers = list(servers) if servers is not None else None
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.max_stale = max_stale
        self.timeouts = tuple(timeouts)
        self.resolv_conf = resolv_conf
        self.hosts = hosts
        self.names: dict[tuple[str, Family], _Name] = {}
        self.refreshing: set[Deferred[None]] = set()
        self.client: client.Resolver | None = None
        self.client_servers: list[tuple[str, int]] = []
        self.stopped = False

    def addresses(self, host: str, family: Family) -> list[str] | None:
        """
        C{host}'s addresses now, from the cache: C{None} before its first
        answer, an empty list while it has none (L{resolve} says why).
        """
        static = self._static(host, family)
        if static is not None:
            return static
        name = self.names.get((host, family))
        if name is None or name.addresses is None:
            return None
        return list(name.addresses)

    def resolve(self, host: str, family: Family) -> Deferred[list[str]]:
        """
        C{host}'s addresses: at once from the cache, else after its first
        answer, which this starts.  Fails with L{DNSLookupError}, saying
        why, while the name has no address.  Cancelling the result stops
        only this caller's wait.
        """
        static = self._static(host, family)
        if static is not None:
            return succeed(static)
        if self.stopped:
            return fail(DNSLookupError(f"{host}: the resolver has stopped"))
        name = self._name(host, family)
        if name.addresses is None:
            waiter: Deferred[list[str]] = Deferred(lambda d: name.waiters.remove(d) if d in name.waiters else None)
            name.waiters.append(waiter)
            return waiter
        if name.addresses:
            return succeed(list(name.addresses))
        return fail(name.error())

    def subscribe(self, host: str, family: Family, callback: Callable[[list[str]], object]) -> Callable[[], None]:
        """
        Call C{callback} with C{host}'s addresses each time they change (the
        first answer included; an empty list when the name has none left),
        and start resolving it if nothing has yet.  Returns the function
        that unsubscribes.  Answers known without asking (IP literals) never
        change: nothing is called.
        """
        if self._static(host, family) is not None or self.stopped:
            return lambda: None
        subscribers = self._name(host, family).subscribers
        subscribers.append(callback)
        return lambda: subscribers.remove(callback) if callback in subscribers else None

    def retain(self, keep: Collection[tuple[str, Family]]) -> None:
        """
        Stop following every name not in C{keep}, the C{(host, family)}
        pairs of the configuration in force: after a reload, what the
        removed routes used.
        """
        for key in [key for key in self.names if key not in keep]:
            self._drop(self.names.pop(key), "no longer in the configuration")

    def stop(self) -> Deferred[None]:
        """
        Cancel every refresh and fail every wait; fires once the queries
        already sent have ended (Twisted's DNS client cannot take them back;
        they last at most the query timeouts).
        """
        self.stopped = True
        for name in self.names.values():
            self._drop(name, "the resolver has stopped")
        self.names.clear()
        return DeferredList(list(self.refreshing)).addCallback(lambda _: None)

    def _static(self, host: str, family: Family) -> list[str] | None:
        """
        The answer known without asking: an IP literal's, and a loopback
        name's where no hosts file is read.
        """
        if is_ip_literal(host):
            return [host]
        if self.servers is not None and _is_localhost(host):
            return [address for rtype in _TYPES[family] for address in _LOOPBACK[rtype]]
        return None

    def _name(self, host: str, family: Family) -> _Name:
        """
        The name's entry; a new one's first refresh starts on the next
        reactor turn, once its caller has registered what it waits for.
        """
        name = self.names.get((host, family))
        if name is None:
            name = self.names[host, family] = _Name(host, family)
            name.timer = self.reactor.callLater(0, self._refresh, name)
        return name

    def _drop(self, name: _Name, reason: str) -> None:
        name.dropped = True
        if name.timer is not None:
            name.timer.cancel()
            name.timer = None
        name.reason = reason
        self._settle(name)

    def _refresh(self, name: _Name) -> None:
        """Ask for the name's records, from the hosts file or from DNS."""
        name.timer = None
        types = _TYPES[name.family]
        if self.servers is None:
            listed = _ordered(searchFileForAll(FilePath(self.hosts), name.host.encode("utf-8", "replace")))
            found = [tuple(a for a in listed if _TYPE_OF[ipaddress.ip_address(a).version] == t) for t in types]
            if not any(found) and _is_localhost(name.host):
                found = [_LOOPBACK[rtype] for rtype in types]
            if any(found):
                answers = [_Answer(a, self.max_ttl, "" if a else _NO_RECORD[t]) for a, t in zip(found, types)]
                self._refreshed(name, answers)
                return
        servers = self.servers if self.servers is not None else read_resolv_conf(self.resolv_conf)
        resolver = self._client(servers)
        lookups = [self._query(resolver, servers, name.host, rtype) for rtype in types]
        refreshed = gatherResults(lookups).addCallback(partial(self._refreshed, name))
        if not refreshed.called:
            self.refreshing.add(refreshed)
            refreshed.addCallback(lambda _: self.refreshing.discard(refreshed))

    def _client(self, servers: list[tuple[str, int]]) -> client.Resolver:
        """
        One client while the servers stay the same: it keeps the TCP
        connection that truncated answers need, instead of one per refresh.
        """
        if self.client is None or servers != self.client_servers:
            self.client = client.Resolver(servers=servers, timeout=self.timeouts, reactor=self.reactor)
            self.client_servers = servers
        return self.client

    def _query(
        self, resolver: client.Resolver, servers: list[tuple[str, int]], host: str, rtype: int,
    ) -> Deferred[_Answer | _Failure]:
        lookup = resolver.lookupAddress if rtype == dns.A else resolver.lookupIPV6Address
        query: Deferred[Any] = lookup(host)
        # Never fails, so the refresh always ends: an answer that cannot be read is a failure too.
        return query.addCallback(partial(self._answered, rtype)).addErrback(partial(self._failed, rtype, servers))

    def _answered(self, rtype: int, result: tuple[list[dns.RRHeader], list[dns.RRHeader], Any]) -> _Answer:
        answers, authority, _ = result
        family = _FAMILIES[rtype]
        found = [socket.inet_ntop(family, _payload(answer).address) for answer in answers if answer.type == rtype]
        if not found:
            return _Answer((), self._clamp(_negative_ttl(authority)), _NO_RECORD[rtype])
        # The whole chain's shortest TTL: a CNAME's record expires the answer too.
        return _Answer(_ordered(found), self._clamp(min(r.ttl for r in answers)))

    def _failed(self, rtype: int, servers: list[tuple[str, int]], reason: Failure) -> _Answer | _Failure:
        """NXDOMAIN is an answer; anything else, a failure in words."""
        error = reason.value
        if isinstance(error, DNSNameError):
            message = error.args[0] if error.args else None
            authority = message.authority if isinstance(message, dns.Message) else []
            return _Answer((), self._clamp(_negative_ttl(authority)), "no such name (NXDOMAIN)")
        if isinstance(error, TimeoutError):
            where = ", ".join(f"{host}:{port}" for host, port in servers)
            why = f"no answer from {where} within {sum(self.timeouts):g}s"
        else:
            rcodes = (text for kind, text in _RCODES.items() if isinstance(error, kind))
            why = next(rcodes, None) or reason.getErrorMessage() or type(error).__name__
        return _Failure(f"{_TYPE_NAMES[rtype]} query: {why}")

    def _clamp(self, ttl: float) -> float:
        return min(max(ttl, self.min_ttl), self.max_ttl)

    def _refreshed(self, name: _Name, outcomes: Sequence[_Answer | _Failure]) -> None:
        """Take a refresh's outcome per record type, schedule the next one, tell who waits or follows."""
        if name.dropped:
            return
        now = self.reactor.seconds()
        failures, reasons = [], []
        for rtype, outcome in zip(_TYPES[name.family], outcomes):
            if isinstance(outcome, _Answer):
                name.kept[rtype] = _Kept(outcome.addresses, now + outcome.ttl)
                reasons.append(outcome.reason)
                continue
            failures.append(outcome.reason)
            kept = name.kept.get(rtype)
            if kept is not None and now >= kept.expires + self.max_stale:
                del name.kept[rtype]
                failures[-1] += f", and the last answer is more than {self.max_stale:g}s past its TTL"
        previous, was_failing = name.addresses, name.failures > 0
        name.addresses = tuple(
            address for rtype in _TYPES[name.family] if rtype in name.kept for address in name.kept[rtype].addresses
        )
        name.reason = "; ".join(dict.fromkeys(failures or [reason for reason in reasons if reason]))
        name.failures = name.failures + 1 if failures else 0
        delay = self._next_refresh(name, now)
        name.timer = self.reactor.callLater(delay, self._refresh, name)
        self._log(name, previous, was_failing, delay)
        if name.addresses != previous:
            for subscriber in list(name.subscribers):
                try:
                    subscriber(list(name.addresses))
                except Exception:
                    _log.failure("resolver: a subscriber to {host} failed", host=name.host)
        # Last: a waiter's callbacks may subscribe, and must not hear of this answer again.
        self._settle(name)

    def _settle(self, name: _Name) -> None:
        """Answer those waiting for the name's first answer, or tell them why there is none."""
        waiters, name.waiters = name.waiters, []
        for waiter in waiters:
            if waiter.called:  # cancelled by an earlier waiter's callback
                continue
            if name.addresses:
                waiter.callback(list(name.addresses))
            else:
                waiter.errback(name.error())

    def _next_refresh(self, name: _Name, now: float) -> float:
        """
        When the first kept answer expires; after a failure, the next retry,
        or sooner if a kept answer goes stale before it.
        """
        if not name.failures:
            return min(kept.expires for kept in name.kept.values()) - now
        retry = min(self.min_ttl * 2.0 ** min(name.failures - 1, 32), RETRY_LIMIT, self.max_ttl)
        stale = [kept.expires + self.max_stale - now for kept in name.kept.values()]
        return max(0.0, min([retry, *stale]))

    def _log(self, name: _Name, previous: tuple[str, ...] | None, was_failing: bool, delay: float) -> None:
        """
        Log what changed: a new answer (or the end of an outage), the start
        of an outage that the last answer rides out, or a name left without
        an address.  Nothing while a name's state stays the same.
        """
        fields = {"host": name.host, "family": name.family, "lookup": name.lookup}
        current = name.addresses or ()
        if not current:
            if previous != current:
                events.emit(LogLevel.error, "dns-none", reason=name.reason, **fields)
        elif name.failures:
            if not was_failing:
                events.emit(
                    LogLevel.warn, "dns-stale", reason=name.reason, addresses=", ".join(current),
                    max_stale=self.max_stale, **fields,
                )
        elif current != previous or was_failing:
            events.emit(
                LogLevel.info, "dns-answer", addresses=", ".join(current),
                previous=", ".join(previous) if previous else "nothing",
                ttl=delay, **fields,
            )
