"""
L{DNSCache} against a real DNS server on loopback UDP: a C{twisted.names}
server whose records, TTLs and silences each test changes, counting the
queries it gets.  Real clock, TTLs of a second or less.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredQueue, fail, succeed
from twisted.internet.error import DNSLookupError
from twisted.logger import globalLogPublisher
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DomainError
from twisted.names.server import DNSServerFactory
from twisted.trial.unittest import TestCase

from streamrelay.dnscache import DNSCache, read_resolv_conf

A, AAAA = dns.A, dns.AAAA

#: The longest a test waits for a query or a notification that should come far sooner.
DEADLINE = 5.0


def within(waiting: Deferred[Any]) -> Deferred[Any]:
    """C{waiting}, failed with a TimeoutError after L{DEADLINE}: a broken cache fails, not hangs."""
    return waiting.addTimeout(DEADLINE, reactor)


class Zone(ResolverBase):
    """
    What the test's server answers: each name's A and AAAA addresses (in an
    order rotating at every query, as round-robin DNS servers do) with one
    TTL; NXDOMAIN for other names.  Record types in C{silent} go unanswered;
    C{failure} is raised (a SERVFAIL).  Every query is recorded with its time.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[tuple[str, int], list[str]] = {}
        self.ttls: dict[str, int] = {}
        self.queries: list[tuple[str, int, float]] = []
        self.silent: set[int] = set()
        self.failure: Exception | None = None
        self.watchers: list[tuple[str, int | None, Deferred[float]]] = []

    def serve(self, name: str, a: list[str] | None = None, aaaa: list[str] | None = None, ttl: int = 0) -> None:
        self.records[name, A] = a or []
        self.records[name, AAAA] = aaaa or []
        self.ttls[name] = ttl

    def asked(self, name: str, rtype: int | None = None) -> list[float]:
        """When C{name} was asked for (records of C{rtype})."""
        return [when for host, kind, when in self.queries if host == name and rtype in (None, kind)]

    def next_query(self, name: str, rtype: int | None = None) -> Deferred[float]:
        """Fires with the time of the next query for C{name}."""
        arrived: Deferred[float] = Deferred()
        self.watchers.append((name, rtype, arrived))
        return within(arrived)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        host, now = name.decode(), reactor.seconds()
        self.queries.append((host, type, now))
        for watcher in [w for w in self.watchers if w[0] == host and w[1] in (None, type)]:
            self.watchers.remove(watcher)
            watcher[2].callback(now)
        if type in self.silent:
            return Deferred()
        if self.failure is not None:
            return fail(self.failure)
        if (host, type) not in self.records:
            return fail(DomainError(name))
        addresses, ttl = self.records[host, type], self.ttls[host]
        turn = len(self.queries) % max(len(addresses), 1)
        rotated = addresses[turn:] + addresses[:turn]
        record = dns.Record_A if type == A else dns.Record_AAAA
        answers = [dns.RRHeader(name, type, dns.IN, ttl, record(address, ttl)) for address in rotated]
        # A negative answer says how long it holds in its SOA (RFC 2308): here, not at all.
        soa = dns.RRHeader(b"test", dns.SOA, dns.IN, 0, dns.Record_SOA(b"ns.test", b"admin.test", minimum=0, ttl=0))
        return succeed((answers, [] if answers else [soa], []))


class DNSCacheTests(TestCase):
    def setUp(self) -> None:
        self.zone = Zone()
        server = dns.DNSDatagramProtocol(DNSServerFactory(authorities=[self.zone]))
        port = reactor.listenUDP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.server = ("127.0.0.1", port.getHost().port)
        self.events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if str(event.get("action", "")).startswith("dns-"):
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def directory(self) -> Path:
        temporary = tempfile.TemporaryDirectory()
        self.addCleanup(temporary.cleanup)
        return Path(temporary.name)

    def cache(self, **settings: Any) -> DNSCache:
        settings.setdefault("min_ttl", 0.1)
        settings.setdefault("timeouts", (1.0,))  # loopback answers at once: only silence waits this long
        cache = DNSCache(reactor, settings.pop("servers", [self.server]), **settings)
        self.addCleanup(cache.stop)
        return cache

    def follow(self, cache: DNSCache, host: str, family: int | None) -> DeferredQueue[list[str]]:
        """What C{subscribe} tells, in a queue."""
        told: DeferredQueue[list[str]] = DeferredQueue()
        self.addCleanup(cache.subscribe(host, family, told.put))
        return told

    def logged(self, action: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["action"] == action]

    async def test_first_answer_is_asked_once_then_kept_for_its_ttl(self) -> None:
        self.zone.serve("svc.test", a=["127.0.0.2"], ttl=1)
        cache = self.cache()
        self.assertIsNone(cache.addresses("svc.test", 4))
        first, second = cache.resolve("svc.test", 4), cache.resolve("svc.test", 4)
        self.assertEqual(await first, ["127.0.0.2"])
        self.assertEqual(await second, ["127.0.0.2"])
        cached = cache.resolve("svc.test", 4)
        self.assertEqual(self.successResultOf(cached), ["127.0.0.2"])  # at once
        self.assertEqual(cache.addresses("svc.test", 4), ["127.0.0.2"])
        self.assertEqual(len(self.zone.asked("svc.test")), 1)

        asked = self.zone.asked("svc.test")[0]
        refreshed = await self.zone.next_query("svc.test")
        self.assertGreaterEqual(refreshed - asked, 1.0)  # not before the 1 s TTL ran out
        self.assertEqual(len(self.zone.asked("svc.test")), 2)
        [answer] = self.logged("dns-answer")
        self.assertEqual(
            (answer["host"], answer["lookup"], answer["addresses"], answer["previous"]),
            ("svc.test", "A", "127.0.0.2", "nothing"),
        )
        self.assertIn("resolver: svc.test A is 127.0.0.2 (was nothing); next lookup in 1.0s", answer["log_text"])

    async def test_a_changed_answer_is_used_after_its_ttl_and_told_to_subscribers(self) -> None:
        self.zone.serve("svc.test", a=["127.0.0.2", "127.0.0.3"])  # TTL 0: asked every min_ttl
        cache = self.cache()
        told = self.follow(cache, "svc.test", 4)
        self.assertEqual(await within(told.get()), ["127.0.0.2", "127.0.0.3"])  # the first answer
        for _ in range(3):  # the same answer, in rotating order: no news
            await self.zone.next_query("svc.test")
        self.assertEqual(told.pending, [])

        self.zone.serve("svc.test", a=["127.0.0.4"])
        self.assertEqual(await within(told.get()), ["127.0.0.4"])
        self.assertEqual(cache.addresses("svc.test", 4), ["127.0.0.4"])
        self.assertEqual(self.successResultOf(cache.resolve("svc.test", 4)), ["127.0.0.4"])
        await self.zone.next_query("svc.test")
        self.assertEqual(told.pending, [])
        self.assertEqual(
            [e["addresses"] for e in self.logged("dns-answer")], ["127.0.0.2, 127.0.0.3", "127.0.0.4"],
        )

    async def test_a_silent_server_leaves_the_last_answer_in_use_until_max_stale(self) -> None:
        self.zone.serve("svc.test", a=["127.0.0.2"])
        cache = self.cache(max_stale=0.5, timeouts=(0.3,))
        self.assertEqual(await cache.resolve("svc.test", 4), ["127.0.0.2"])
        [asked] = self.zone.asked("svc.test")
        told = self.follow(cache, "svc.test", 4)
        self.zone.silent = {A}

        await self.zone.next_query("svc.test")
        await self.zone.next_query("svc.test")  # the first silent query timed out: a retry
        self.assertEqual(cache.addresses("svc.test", 4), ["127.0.0.2"])
        self.assertEqual(self.successResultOf(cache.resolve("svc.test", 4)), ["127.0.0.2"])
        [stale] = self.logged("dns-stale")
        where = "%s:%d" % self.server
        self.assertEqual(stale["reason"], f"A query: no answer from {where} within 0.3s")
        self.assertEqual(stale["addresses"], "127.0.0.2")

        self.assertEqual(await within(told.get()), [])  # the answer went stale
        self.assertGreaterEqual(reactor.seconds() - asked, 0.1 + 0.5)  # min_ttl, then max_stale
        self.assertEqual(cache.addresses("svc.test", 4), [])
        reason = f"A query: no answer from {where} within 0.3s, and the last answer is more than 0.5s past its TTL"
        error = self.failureResultOf(cache.resolve("svc.test", 4), DNSLookupError).value
        self.assertEqual(str(error), f"DNS lookup failed: svc.test A: {reason}.")
        [none] = self.logged("dns-none")
        self.assertEqual(none["reason"], reason)
        self.assertEqual(len(self.logged("dns-stale")), 1)  # once per outage, not per retry

        self.zone.silent = set()
        self.assertEqual(await within(told.get()), ["127.0.0.2"])
        self.assertEqual(self.logged("dns-answer")[-1]["previous"], "nothing")

    async def test_one_family_going_silent_keeps_its_addresses_until_max_stale(self) -> None:
        self.zone.serve("svc.test", a=["127.0.0.2"], aaaa=["::2"])
        cache = self.cache(max_stale=0.5, timeouts=(0.3,))
        told = self.follow(cache, "svc.test", None)
        self.assertEqual(await within(told.get()), ["127.0.0.2", "::2"])
        self.zone.silent = {AAAA}
        await self.zone.next_query("svc.test", AAAA)
        await self.zone.next_query("svc.test", AAAA)
        self.assertEqual(cache.addresses("svc.test", None), ["127.0.0.2", "::2"])
        self.assertEqual(await within(told.get()), ["127.0.0.2"])
        self.assertEqual(self.successResultOf(cache.resolve("svc.test", None)), ["127.0.0.2"])

    async def test_ttls_are_bounded_by_min_ttl_and_max_ttl(self) -> None:
        self.zone.serve("zero.test", a=["127.0.0.2"], ttl=0)
        self.zone.serve("day.test", a=["127.0.0.3"], ttl=86400)
        cache = self.cache(min_ttl=0.3, max_ttl=0.6)
        await cache.resolve("zero.test", 4)
        await cache.resolve("day.test", 4)
        await self.zone.next_query("zero.test")
        await self.zone.next_query("day.test")
        [zero, zero_again, *_] = self.zone.asked("zero.test")
        [day, day_again] = self.zone.asked("day.test")
        self.assertGreaterEqual(zero_again - zero, 0.3)
        self.assertGreaterEqual(day_again - day, 0.6)
        self.assertLess(day_again - day, 5)
        self.assertEqual(
            sorted((e["host"], round(e["ttl"], 1)) for e in self.logged("dns-answer")),
            [("day.test", 0.6), ("zero.test", 0.3)],
        )

    async def test_families_ask_for_a_aaaa_or_both(self) -> None:
        self.zone.serve("dual.test", a=["127.0.0.3", "127.0.0.2"], aaaa=["::2"], ttl=60)
        self.zone.serve("v4.test", a=["127.0.0.4"], ttl=60)
        cache = self.cache()
        self.assertEqual(await cache.resolve("dual.test", 4), ["127.0.0.2", "127.0.0.3"])
        self.assertEqual(await cache.resolve("dual.test", 6), ["::2"])
        self.assertEqual(await cache.resolve("dual.test", None), ["127.0.0.2", "127.0.0.3", "::2"])
        self.assertEqual([kind for host, kind, _ in self.zone.queries], [A, AAAA, A, AAAA])
        self.assertEqual(await cache.resolve("v4.test", None), ["127.0.0.4"])
        with self.assertRaises(DNSLookupError) as raised:
            await cache.resolve("v4.test", 6)
        self.assertIn("v4.test AAAA: no IPv6 address", str(raised.exception))
        # The empty answer's SOA says it holds for no time: asked again after min_ttl, not 30 s.
        asked = reactor.seconds()
        self.assertLess(await self.zone.next_query("v4.test", AAAA) - asked, 5)

    async def test_a_name_that_does_not_exist_fails_with_the_reason(self) -> None:
        cache = self.cache()
        told = self.follow(cache, "missing.test", None)
        with self.assertRaises(DNSLookupError) as raised:
            await cache.resolve("missing.test", None)
        self.assertEqual(
            str(raised.exception), "DNS lookup failed: missing.test A+AAAA: no such name (NXDOMAIN).",
        )
        self.assertEqual(cache.addresses("missing.test", None), [])
        self.assertEqual(told.pending, [[]])
        [none] = self.logged("dns-none")
        self.assertEqual(none["log_text"], "resolver: missing.test A+AAAA has no address: no such name (NXDOMAIN)")

    async def test_a_server_failure_is_a_failure_with_its_reason(self) -> None:
        self.zone.serve("svc.test", a=["127.0.0.2"])
        self.zone.failure = RuntimeError("the zone broke")
        cache = self.cache(min_ttl=10)  # no retry within the test
        with self.assertRaises(DNSLookupError) as raised:
            await cache.resolve("svc.test", 4)
        self.assertIn("svc.test A: A query: server failure (SERVFAIL)", str(raised.exception))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # the server's own log

    async def test_ip_literals_and_localhost_never_ask(self) -> None:
        cache = self.cache()
        answers = {
            ("127.0.0.9", 4): ["127.0.0.9"],
            ("::9", None): ["::9"],
            ("localhost", None): ["127.0.0.1", "::1"],
            ("LocalHost.", 4): ["127.0.0.1"],
            ("db.localhost", 6): ["::1"],
        }
        for (host, family), expected in answers.items():
            self.assertEqual(cache.addresses(host, family), expected)
            self.assertEqual(self.successResultOf(cache.resolve(host, family)), expected)
            cache.subscribe(host, family, self.fail)()
        self.assertEqual(self.zone.queries, [])

    async def test_system_configuration_answers_from_the_hosts_file(self) -> None:
        directory = self.directory()
        hosts = directory / "hosts"
        hosts.write_text("# comment\n127.0.0.7 listed.test\n::7 listed.test\n127.0.0.1 localhost\n")
        resolv_conf = directory / "resolv.conf"
        resolv_conf.write_text("nameserver 192.0.2.1\n")  # TEST-NET: asking there would time out
        cache = self.cache(servers=None, hosts=str(hosts), resolv_conf=str(resolv_conf), max_ttl=0.2)
        answers = {
            ("listed.test", None): ["127.0.0.7", "::7"],
            ("LISTED.test", 6): ["::7"],
            ("localhost", None): ["127.0.0.1"],  # the hosts file's view
            ("localhost", 6): ["::1"],  # not in the hosts file: loopback, never DNS
            ("db.localhost", None): ["127.0.0.1", "::1"],
        }
        for (host, family), expected in answers.items():
            self.assertEqual(await cache.resolve(host, family), expected)

        told = self.follow(cache, "listed.test", None)
        hosts.write_text("127.0.0.8 listed.test\n")
        self.assertEqual(await within(told.get()), ["127.0.0.8"])  # read again after max_ttl

    def test_resolv_conf_gives_the_first_three_nameservers(self) -> None:
        resolv_conf = self.directory() / "resolv.conf"
        resolv_conf.write_text(
            "# nameserver 192.0.2.9\nsearch example.com\nnameserver 192.0.2.1\nnameserver not-an-address\n"
            "nameserver 2001:db8::1\noptions ndots:2\nnameserver 192.0.2.2\nnameserver 192.0.2.3\n"
        )
        self.assertEqual(
            read_resolv_conf(str(resolv_conf)), [("192.0.2.1", 53), ("2001:db8::1", 53), ("192.0.2.2", 53)],
        )
        self.assertEqual(read_resolv_conf(str(resolv_conf) + ".missing"), [("127.0.0.1", 53)])

    async def test_a_cancelled_wait_leaves_the_others_waiting(self) -> None:
        self.zone.serve("svc.test", a=["127.0.0.2"])
        cache = self.cache()
        leaving, staying, last = (cache.resolve("svc.test", 4) for _ in range(3))
        leaving.cancel()
        self.failureResultOf(leaving, CancelledError)
        staying.addCallback(lambda addresses: last.cancel() or addresses)  # leaves while the answer is handed out
        self.assertEqual(await staying, ["127.0.0.2"])
        self.failureResultOf(last, CancelledError)

    def test_settings_out_of_bounds_are_refused(self) -> None:
        for settings in [{"min_ttl": 0}, {"min_ttl": 2, "max_ttl": 1}, {"max_stale": -1}, {"timeouts": ()}]:
            self.assertRaises(ValueError, DNSCache, reactor, [self.server], **settings)

    async def test_a_raising_subscriber_is_logged_and_the_others_still_told(self) -> None:
        self.zone.serve("svc.test", a=["127.0.0.2"])
        cache = self.cache()
        cache.subscribe("svc.test", 4, lambda addresses: 1 / 0)
        told = self.follow(cache, "svc.test", 4)
        self.assertEqual(await within(told.get()), ["127.0.0.2"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        await self.zone.next_query("svc.test")  # refreshes go on

    async def test_retain_forgets_names_and_stop_ends_everything(self) -> None:
        self.zone.serve("kept.test", a=["127.0.0.2"])
        self.zone.serve("dropped.test", a=["127.0.0.3"])
        cache = self.cache(timeouts=(0.2,))
        await cache.resolve("kept.test", 4)
        await cache.resolve("dropped.test", 4)
        self.zone.silent = {AAAA}
        waiting = cache.resolve("dropped.test", 6)
        await self.zone.next_query("dropped.test", AAAA)
        cache.retain({("kept.test", 4)})
        self.assertIn("dropped.test AAAA: no longer in the configuration", str(self.failureResultOf(waiting).value))
        asked = len(self.zone.asked("dropped.test"))
        for _ in range(3):
            await self.zone.next_query("kept.test")
        self.assertEqual(len(self.zone.asked("dropped.test")), asked)

        pending = cache.resolve("late.test", 6)
        await self.zone.next_query("late.test")  # sent; the silent server never answers it
        stopped = cache.stop()
        self.assertIn("late.test AAAA: the resolver has stopped", str(self.failureResultOf(pending).value))
        self.assertIn("the resolver has stopped", str(self.failureResultOf(cache.resolve("kept.test", 4)).value))
        await stopped  # once the query's 0.2 s timeout has run out; trial then finds the reactor clean
        self.assertIsNone(cache.addresses("kept.test", 4))
