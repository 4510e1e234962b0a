"""
Connection-rate limits (C{rate_limit}): the buckets and the bounded client
table against a fake clock, the field's parsing, and real relays refusing a
fast client's connections and new UDP sessions while another client's pass.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from streamrelay.config import ConfigError, parse_config
from streamrelay.hooks import NO_HOOKS
from streamrelay.ratelimit import Rate, RateLimit, RateLimiter
from streamrelay.service import RouteService
from tests.harness import DEADLINE, Relay, Target, connect_from, tcp_route, write_config
from tests.test_udp import UDPEcho, bound_client, echoes, udp_route

# ------------------------------------------------------------------ buckets


def limiter(clock: Clock, **setting: object) -> RateLimiter:
    return RateLimiter(RateLimit(**setting), clock.seconds)  # type: ignore[arg-type]


def admitted(limit: RateLimiter, client: str, attempts: int) -> int:
    return sum(limit.admit(client) is None for _ in range(attempts))


def test_a_client_gets_its_burst_then_its_rate() -> None:
    clock = Clock()
    limit = limiter(clock, per_client=Rate(10, "s"), burst=10)
    assert admitted(limit, "192.0.2.1", 50) == 10
    assert limit.admit("192.0.2.1") == "per_client"
    clock.advance(0.5)
    assert admitted(limit, "192.0.2.1", 50) == 5
    assert admitted(limit, "192.0.2.2", 50) == 10  # another client: its own bucket


def test_slow_rates_refill_slowly() -> None:
    clock = Clock()
    limit = limiter(clock, per_client=Rate(1, "h"), burst=1)
    assert admitted(limit, "192.0.2.1", 2) == 1
    clock.advance(3599)
    assert limit.admit("192.0.2.1") == "per_client"
    clock.advance(1)
    assert limit.admit("192.0.2.1") is None


def test_the_route_limit_holds_every_client_together() -> None:
    clock = Clock()
    limit = limiter(clock, per_client=Rate(5, "s"), burst=5, per_route=Rate(8, "s"))
    assert admitted(limit, "192.0.2.1", 5) == 5
    assert admitted(limit, "192.0.2.2", 5) == 3
    assert limit.admit("192.0.2.3") == "per_route"
    clock.advance(0.25)
    assert admitted(limit, "192.0.2.2", 5) == 2  # its refusals by the route cost it nothing


def test_full_buckets_expire_and_the_table_is_capped() -> None:
    clock = Clock()
    limit = RateLimiter(RateLimit(per_client=Rate(20, "s"), burst=40), clock.seconds, max_clients=1000)
    for i in range(100_000):  # a spoofed-source flood: every datagram a new client
        limit.admit(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
        assert len(limit.clients) <= 1000
    assert len(limit.clients) == 1000
    clock.advance(2)  # burst / rate: every bucket is full again, as good as absent
    limit.admit("192.0.2.1")
    assert list(limit.clients) == ["192.0.2.1"]


def test_eviction_takes_the_least_recently_seen() -> None:
    clock = Clock()
    limit = RateLimiter(RateLimit(per_client=Rate(1, "s"), burst=1), clock.seconds, max_clients=2)
    for client in ("a", "b", "a", "c"):
        limit.admit(client)
    assert list(limit.clients) == ["a", "c"]
    assert limit.admit("a") == "per_client"  # still remembered, still empty


# ------------------------------------------------------------------ config


def route_with(rate_limit: str, scheme: str = "tcp") -> str:
    return f"routes:\n  r: {{scheme: {scheme}, port: ':1', rate_limit: {rate_limit}}}\n"


@pytest.mark.parametrize(("text", "expected"), [
    ("{per_client: 20/s, burst: 40, per_route: 2000/s}", RateLimit(Rate(20, "s"), 40, Rate(2000, "s"))),
    ("{per_client: 600/m}", RateLimit(Rate(600, "m"), 10)),
    ("{per_client: 30/m}", RateLimit(Rate(30, "m"), 1)),
    ("{per_client: 2500/s}", RateLimit(Rate(2500, "s"), 2500)),
    ("{per_route: 1/h}", RateLimit(per_route=Rate(1, "h"))),
])
def test_rate_limit_field(text: str, expected: RateLimit) -> None:
    for scheme in ("tcp", "udp"):
        assert parse_config(route_with(text, scheme)).routes[0].rate_limit == expected


def test_rate_limit_in_defaults() -> None:
    config = parse_config(
        "defaults: {rate_limit: {per_client: 5/s}}\nroutes:\n"
        "  a: {scheme: tcp, port: ':1'}\n  b: {scheme: udp, port: ':2', rate_limit: {per_route: 9/s}}\n"
    )
    assert [route.rate_limit for route in config.routes] == [
        RateLimit(Rate(5, "s"), 5), RateLimit(per_route=Rate(9, "s")),
    ]
    assert parse_config("routes: {a: {scheme: tcp, port: ':1'}}").routes[0].rate_limit is None


@pytest.mark.parametrize(("text", "message"), [
    ("{per_client: 20}", "expected per_client as a rate such as 20/s, 600/m or 1/h, found"),
    ("{per_client: 0/s}", "expected per_client as a rate such as 20/s"),
    ("{per_client: 20/d}", "expected per_client as a rate such as 20/s"),
    ("{per_route: fast}", "expected per_route as a rate such as 20/s"),
    ("{per_client: 1/s, burst: 0}", "expected burst as an integer from 1 to 10000000"),
    ("{per_route: 1/s, burst: 5}", "expected burst only together with per_client"),
    ("{burst: 5}", "expected a mapping with per_client and/or per_route"),
    ("20/s", "expected a mapping with per_client and/or per_route"),
    ("{per_client: 1/s, per_second: 1}", "expected only per_client, burst, per_route (not 'per_second')"),
])
def test_rate_limit_errors_name_file_route_and_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(route_with(text), "routes.yml")
    assert str(raised.value).startswith("routes.yml: route 'r': field 'rate_limit': " + message)


def test_a_reload_keeps_the_buckets_while_the_setting_stays() -> None:
    route = parse_config(route_with("{per_client: 1/s}")).routes[0]
    service = RouteService(route, 1.0, Clock())  # type: ignore[arg-type]  # a Clock is reactor enough here
    first = service.factory.limiter
    assert first is not None and first.admit("192.0.2.1") is None
    service.configure(dataclasses.replace(route, retries=3), NO_HOOKS, service.events)
    assert service.factory.limiter is first
    service.configure(dataclasses.replace(route, rate_limit=RateLimit(Rate(2, "s"), 2)), NO_HOOKS, service.events)
    assert service.factory.limiter is not first
    service.configure(dataclasses.replace(route, rate_limit=None), NO_HOOKS, service.events)
    assert service.factory.limiter is None


# ------------------------------------------------------------ real relays


def attempt(source: str, port: int) -> socket.socket | None:
    """A connection from C{source}; None if it was reset already (refused that fast)."""
    try:
        return connect_from(source, port)
    except ConnectionResetError:
        return None


def relays(sock: socket.socket | None) -> bool:
    """Whether the relay relayed C{sock} (an echo) rather than resetting it."""
    if sock is None:
        return False
    try:
        sock.sendall(b"x")
        return sock.recv(1) == b"x"
    except ConnectionError:
        return False


def test_a_fast_client_gets_its_rate_and_another_is_unaffected(tmp_path: Path) -> None:
    """100 connections a second against 10/s with a burst of 10: about 10/s through, after the burst."""
    attempts, per_second = 200, 100.0
    with Target() as target:
        routes = tcp_route(target.port, "web", rate_limit="{per_client: 10/s, burst: 10}")
        with Relay(write_config(tmp_path, "routes:\n" + routes)) as relay:
            port = relay.ports["web"]
            fast: list[socket.socket | None] = []
            calm: list[socket.socket | None] = []
            start = time.monotonic()
            for i in range(attempts):
                time.sleep(max(0.0, start + i / per_second - time.monotonic()))
                fast.append(attempt("127.0.0.2", port))
                if i % 20 == 0:  # 5/s: within its own burst and rate
                    calm.append(attempt("127.0.0.3", port))
            span = time.monotonic() - start
            try:
                through = sum(relays(sock) for sock in fast)
                assert all(relays(sock) for sock in calm)
                rate = (through - 10) / span
                assert 8 <= rate <= 12, (through, span)
                assert target.accepted == through + len(calm)
                refused = relay.wait_for("rate-limited")
                assert {e["limit"] for e in refused} == {"per_client"}
                assert all(e["client"].startswith("127.0.0.2:") for e in refused)
                assert len(refused) <= span + 2  # throttled: about one line a second
            finally:
                for sock in fast + calm:
                    if sock is not None:
                        sock.close()


def test_udp_counts_new_sessions(tmp_path: Path) -> None:
    """A client opening 50 sessions a second against 10/s with a burst of 5; its sessions go on."""
    attempts, per_second = 50, 50.0
    with UDPEcho() as target:
        route = udp_route("echo", target.port, rate_limit="{per_client: 10/s, burst: 5}")
        with Relay(write_config(tmp_path, "routes:\n" + route), "--log-level", "debug") as relay:
            port = relay.ports["echo"]
            socks = []
            try:
                start = time.monotonic()
                for i in range(attempts):
                    time.sleep(max(0.0, start + i / per_second - time.monotonic()))
                    socks.append(bound_client("127.0.0.2", port))
                    socks[-1].send(b"new")
                span = time.monotonic() - start
                other = bound_client("127.0.0.3", port)
                socks.append(other)
                # The listening socket takes datagrams in order: once this one
                # is answered, every datagram above has been judged.
                assert echoes(other, b"unaffected")
                relay.wait_for("session-open", client=f"127.0.0.3:{other.getsockname()[1]}")
                opened = [e for e in relay.actions("session-open") if e["client"].startswith("127.0.0.2:")]
                expected = 5 + 10 * span
                assert abs(len(opened) - expected) <= 0.2 * expected, (len(opened), span)
                assert relay.wait_for("rate-limited")[0]["limit"] == "per_client"
                assert socks[0].recv(65535) == b"new"  # the first session's, answered
                assert echoes(socks[0], b"an open session is not limited")
            finally:
                for sock in socks:
                    sock.close()


def test_per_route_limit_refuses_every_client(tmp_path: Path) -> None:
    with Target() as target:
        routes = tcp_route(target.port, "web", rate_limit="{per_route: 1/h}")
        with Relay(write_config(tmp_path, "routes:\n" + routes)) as relay:
            port = relay.ports["web"]
            with connect_from("127.0.0.2", port) as first, connect_from("127.0.0.3", port) as second:
                assert relays(first)
                assert not relays(second)
            assert relay.wait_for("rate-limited", limit="per_route", timeout=DEADLINE)
