"""
Bandwidth limits (C{bandwidth}): the buckets, the client table and a side's
two reasons to pause against a fake clock; the field's parsing and dump; and
real relays timing transfers on both relay paths (run side by side in
threads, each with its own relay, so the suite waits once for both),
sharing a client's buckets, keeping their memory, watching throttled
sockets, and dropping UDP datagrams over the budget.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from streamrelay.bandwidth import CHUNK, Bandwidth, ByteRate, Directions, Meter, Shaper, parse_byte_rate
from streamrelay.config import ConfigError, parse_config
from streamrelay.dump import dump
from streamrelay.events import RefusalLog, RouteEvents
from streamrelay.hooks import NO_HOOKS
from streamrelay.service import RouteService
from streamrelay.splice import AVAILABLE
from streamrelay.tcp import Pair, RelayFactory
from tests.harness import DEADLINE, Relay, Target, connect, connect_from, poll, tcp_route, write_config
from tests.test_udp import UDPEcho, bound_client, udp_route

MIB = 1 << 20
#: The relay paths, run side by side: Twisted's transports, and splice where the platform has it.
PATHS = ("false", "true") if AVAILABLE else ("false",)


def both(limit: str) -> Directions:
    rate = parse_byte_rate(limit)
    return Directions(rate, rate)


def drain(meter: Meter | None) -> int:
    """Everything C{meter} lets the splice engine read now, lease by lease."""
    assert meter is not None
    total = 0
    while budget := meter.allowance():
        meter.take(budget)
        total += budget
    return total


# ------------------------------------------------------------------ buckets


def test_a_connection_gets_one_second_at_once_then_its_rate() -> None:
    clock = Clock()
    up, down = Shaper(Bandwidth(per_connection=both("1MiB/s")), clock).open("192.0.2.1")
    assert drain(up) == MIB
    assert up is not None and up.delay() == pytest.approx(CHUNK / MIB)  # until a chunk has come in
    clock.advance(0.5)
    assert drain(up) == MIB // 2
    assert drain(down) == MIB  # the other direction is another bucket
    clock.advance(10)
    assert drain(up) == MIB  # never more than one second's worth


def test_twisteds_reads_are_charged_after_the_fact() -> None:
    clock = Clock()
    up, _ = Shaper(Bandwidth(per_connection=both("1MiB/s")), clock).open("192.0.2.1")
    assert up is not None
    assert up.charge(MIB - CHUNK)  # a chunk is left: read on
    assert up.credit == CHUNK  # and it is leased: the next reads cost a subtraction
    assert up.charge(CHUNK)
    assert not up.charge(1)
    assert up.delay() == pytest.approx((CHUNK + 1) / MIB)


def test_a_read_larger_than_the_bucket_is_repaid() -> None:
    """Twisted reads first: the bucket goes into debt, and the reader waits until it holds a chunk again."""
    clock = Clock()
    up, _ = Shaper(Bandwidth(per_connection=Directions(up=parse_byte_rate("1kB/s"))), clock).open("192.0.2.1")
    assert up is not None
    assert not up.charge(CHUNK)  # 1000 - 65536 tokens
    assert up.delay() == pytest.approx(CHUNK / 1000)  # until the bucket is full again (1000 < CHUNK)
    clock.advance(up.delay() - 0.01)
    assert drain(up) == 0
    clock.advance(0.011)
    assert drain(up) == 1000


def test_direction_limits_apart() -> None:
    setting = Bandwidth(per_connection=Directions(up=parse_byte_rate("1MiB/s")))
    up, down = Shaper(setting, Clock()).open("192.0.2.1")
    assert up is not None and down is None  # down: not limited, not metered


def test_a_clients_connections_share_its_bucket_and_the_route_shares_one() -> None:
    clock = Clock()
    setting = Bandwidth(per_connection=both("4MiB/s"), per_client=both("3MiB/s"), per_route=both("5MiB/s"))
    shaper = Shaper(setting, clock)
    first, _ = shaper.open("192.0.2.1")
    second, _ = shaper.open("192.0.2.1")
    other, _ = shaper.open("192.0.2.2")
    assert first is not None and other is not None
    assert first.names == ("per_connection", "per_client", "per_route")
    first.charge(2 * MIB)
    held = first.credit  # leased ahead: 1/16 of its slowest rate
    assert held == 3 * MIB / 16
    assert drain(second) == MIB - held  # its own bucket is full; its client's held 1 MiB, less the lease
    first.close()  # the lease goes back
    assert drain(second) == held
    assert drain(other) == 2 * MIB  # its client's bucket is full; the route's held 2 MiB
    assert other.admit(1) == "per_route"


def test_datagrams_pass_whole_or_not_at_all() -> None:
    clock = Clock()
    setting = Bandwidth(per_client=Directions(up=parse_byte_rate("10kB/s")))
    up, _ = Shaper(setting, clock).open("192.0.2.1")
    assert up is not None
    assert [up.admit(1000) for _ in range(11)] == [None] * 10 + ["per_client"]
    clock.advance(0.1)
    assert up.admit(1000) is None
    clock.advance(1)
    assert up.admit(65000) is None  # larger than the bucket: passes when it is full
    assert up.admit(1) == "per_client"


def test_a_client_that_comes_back_gets_no_fresh_burst() -> None:
    clock = Clock()
    shaper = Shaper(Bandwidth(per_client=both("1MiB/s")), clock)
    up, down = shaper.open("192.0.2.1")
    assert up is not None and down is not None
    up.charge(MIB)
    up.close()
    down.close()
    assert list(shaper.idle) == ["192.0.2.1"]
    again, _ = shaper.open("192.0.2.1")
    assert drain(again) == 0
    assert not shaper.idle


def test_idle_clients_expire_once_refilled_and_are_capped() -> None:
    clock = Clock()
    shaper = Shaper(Bandwidth(per_client=both("1MiB/s")), clock, max_idle_clients=1000)
    for i in range(20_000):  # a spoofed-source flood: every session a new client, over at once
        for meter in shaper.open(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"):
            assert meter is not None
            meter.charge(1)
            meter.close()
        assert len(shaper.clients) <= 1000
    shaper.open("192.0.2.1")  # a client with an open connection is never dropped
    clock.advance(1)  # every idle client's bucket is full again: as good as unknown
    shaper.open("192.0.2.2")
    assert set(shaper.clients) == {"192.0.2.1", "192.0.2.2"} and not shaper.idle


def test_a_reload_keeps_the_buckets_while_the_setting_stays() -> None:
    route = parse_config(route_with("{per_client: 1MiB/s}")).routes[0]
    service = RouteService(route, 1.0, Clock())  # type: ignore[arg-type]  # a Clock is reactor enough here
    first = service.factory.shaper
    assert first is not None
    service.configure(dataclasses.replace(route, retries=3), NO_HOOKS, service.events)
    assert service.factory.shaper is first
    old = service.factory
    changed = dataclasses.replace(route, bandwidth=Bandwidth(per_route=both("1MiB/s")))
    service.configure(changed, NO_HOOKS, service.events)
    assert service.factory.shaper is not first
    assert old.shaper is first  # its pairs keep their limits
    service.configure(dataclasses.replace(route, bandwidth=None), NO_HOOKS, service.events)
    assert service.factory.shaper is None


class SocketlessTransport(StringTransport):
    """A transport whose socket the hangup watch passes over (it has no descriptor)."""

    def fileno(self) -> int:
        return -1

    def getHandle(self) -> socket.socket:
        closed = socket.socket()
        closed.close()
        return closed


def throttled_side(clock: Clock) -> tuple[Pair, SocketlessTransport]:
    """A pair's client side relaying under 1 MiB/s, with fake transports."""
    route = parse_config(route_with("{per_connection: 1MiB/s}")).routes[0]
    events = RouteEvents(route)
    pair = Pair(RelayFactory(route, events, RefusalLog(events, clock), clock))  # type: ignore[arg-type]
    side = pair.client
    side.transport = transport = SocketlessTransport()  # type: ignore[assignment]
    side.sink = SocketlessTransport()  # type: ignore[assignment]
    side.meter, _ = Shaper(route.bandwidth, clock).open("192.0.2.1")  # type: ignore[arg-type]
    pair.open_sides = 1
    return pair, transport


def test_backpressure_never_resumes_a_throttled_side_nor_the_other_way_round() -> None:
    clock = Clock()
    pair, transport = throttled_side(clock)
    side = pair.client
    side.dataReceived(b"x" * MIB)  # the whole second's worth: throttled
    assert transport.producerState == "paused"
    side.pauseProducing()  # and the target cannot take more
    clock.advance(1)
    assert transport.producerState == "paused"
    side.resumeProducing()
    assert transport.producerState == "producing"

    side.pauseProducing()
    side.dataReceived(b"x" * MIB)
    side.resumeProducing()
    assert transport.producerState == "paused"
    clock.advance(1)
    assert transport.producerState == "producing"


def test_a_lost_side_leaves_no_timer_behind() -> None:
    clock = Clock()
    pair, _ = throttled_side(clock)
    pair.client.dataReceived(b"x" * MIB)
    assert clock.getDelayedCalls()
    pair.client.connectionLost()
    assert not clock.getDelayedCalls()


# ------------------------------------------------------------------ config


def route_with(bandwidth: str, scheme: str = "tcp") -> str:
    return f"routes:\n  r: {{scheme: {scheme}, port: ':1', bandwidth: {bandwidth}}}\n"


@pytest.mark.parametrize(("text", "expected"), [
    ("{per_connection: 10MiB/s}", Bandwidth(per_connection=both("10MiB/s"))),
    (
        "{per_client: {up: 1 MB/s, down: 1.5GiB/s}, per_route: 2GB/s}",
        Bandwidth(
            per_client=Directions(ByteRate(10**6), ByteRate(3 << 29)),
            per_route=Directions(ByteRate(2 * 10**9), ByteRate(2 * 10**9)),
        ),
    ),
    ("{per_route: {down: 100kB/s}}", Bandwidth(per_route=Directions(down=ByteRate(100_000)))),
    ("{per_connection: 0.5KiB/s}", Bandwidth(per_connection=Directions(ByteRate(512), ByteRate(512)))),
    ("{per_connection: 1.9B/s}", Bandwidth(per_connection=Directions(ByteRate(1), ByteRate(1)))),
])
def test_bandwidth_field(text: str, expected: Bandwidth) -> None:
    for scheme in ("tcp", "udp"):
        assert parse_config(route_with(text, scheme)).routes[0].bandwidth == expected


def test_rates_are_written_in_the_largest_exact_unit() -> None:
    assert [str(ByteRate(n)) for n in (3 << 30, 10**9, 1536 << 10, 1500000, 2048, 1000, 999)] == [
        "3GiB/s", "1GB/s", "1536KiB/s", "1500kB/s", "2KiB/s", "1kB/s", "999B/s",
    ]


def test_bandwidth_in_defaults() -> None:
    config = parse_config(
        "defaults: {bandwidth: {per_client: 5MiB/s}}\nroutes:\n"
        "  a: {scheme: tcp, port: ':1'}\n  b: {scheme: udp, port: ':2', bandwidth: {per_route: 9MiB/s}}\n"
    )
    assert [route.bandwidth for route in config.routes] == [
        Bandwidth(per_client=both("5MiB/s")), Bandwidth(per_route=both("9MiB/s")),
    ]
    assert parse_config("routes: {a: {scheme: tcp, port: ':1'}}").routes[0].bandwidth is None


RATE_EXPECTED = "a rate such as 10MiB/s (B, kB, KiB, MB, MiB, GB or GiB per second; from 1B/s to 1024GiB/s)"
DIRECTIONS_EXPECTED = "a rate or {up: RATE, down: RATE} (one or both)"


@pytest.mark.parametrize(("text", "message"), [
    ("{per_connection: 10}", f"expected per_connection as {RATE_EXPECTED}"),
    ("{per_connection: 10MiB}", f"expected per_connection as {RATE_EXPECTED}"),
    ("{per_connection: 10mib/s}", f"expected per_connection as {RATE_EXPECTED}"),
    ("{per_connection: 10KB/s}", f"expected per_connection as {RATE_EXPECTED}"),
    ("{per_connection: 0B/s}", f"expected per_connection as {RATE_EXPECTED}"),
    ("{per_connection: 0.5B/s}", f"expected per_connection as {RATE_EXPECTED}"),
    ("{per_route: 1025GiB/s}", f"expected per_route as {RATE_EXPECTED}"),
    ("{per_client: {up: fast}}", f"expected per_client.up as {RATE_EXPECTED}"),
    ("{per_client: {up: 1MiB/s, left: 1MiB/s}}", f"expected per_client as {DIRECTIONS_EXPECTED}"),
    ("{per_client: {}}", f"expected per_client as {DIRECTIONS_EXPECTED}"),
    ("{per_second: 1MiB/s}", "expected only per_connection, per_client, per_route (not 'per_second')"),
    ("{}", "expected a mapping with per_connection, per_client, per_route (one or more)"),
    ("10MiB/s", "expected a mapping with per_connection, per_client, per_route (one or more)"),
])
def test_bandwidth_errors_name_file_route_and_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(route_with(text), "routes.yml")
    assert str(raised.value).startswith("routes.yml: route 'r': field 'bandwidth': " + message)


def test_dump_writes_the_setting_back() -> None:
    text = (
        "defaults: {bandwidth: {per_route: 1GiB/s}}\nroutes:\n"
        "  a: {scheme: tcp, port: ':1', bandwidth: {per_connection: 1.5MiB/s, per_client: {up: 1MB/s, down: 1MB/s}}}\n"
        "  b: {scheme: udp, port: ':2', bandwidth: {per_client: {down: 100kB/s}}}\n"
        "  c: {scheme: tcp, port: ':3'}\n"
    )
    original = parse_config(text)
    written = dump(original)
    assert "per_connection: 1536KiB/s" in written and "per_client: 1MB/s" in written
    assert "{down: 100kB/s}" in written
    assert parse_config(written) == original
    assert dump(parse_config("routes: {a: {scheme: tcp, port: ':1'}}")).count("bandwidth") == 0


# ------------------------------------------------------------ real relays


class Exchange(Target):
    """
    A target that reads a line saying how many bytes to send, sends them
    while it reads what the client uploads, and closes after both; it notes
    when each upload ended.
    """

    def __init__(self) -> None:
        self.uploads: list[tuple[int, float]] = []
        self.uploaded = 0  # by every client so far
        super().__init__(self.exchange)

    async def exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int(await reader.readline())

        async def send() -> None:
            chunk = bytes(MIB)
            for offset in range(0, size, MIB):
                writer.write(chunk[: size - offset])
                await writer.drain()

        sending = asyncio.ensure_future(send())
        received = 0
        while data := await reader.read(MIB):
            received += len(data)
            self.uploaded += len(data)
        self.uploads.append((received, time.monotonic()))
        await sending


def download(port: int, size: int, source: str = "127.0.0.1", upload: int = 0) -> float:
    """Ask for C{size} bytes (sending C{upload} bytes meanwhile); when the last one arrived."""
    with connect_from(source, port) as sock:
        sock.sendall(b"%d\n" % size)
        sender = threading.Thread(target=lambda: (sock.sendall(bytes(upload)), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        received = 0
        while chunk := sock.recv(MIB):
            received += len(chunk)
        done = time.monotonic()
        sender.join()
    assert received == size
    return done


def side_by_side(check: Callable[[str, Path], None], directory: Path) -> None:
    """C{check(splice, directory)} for every relay path at once, each in a thread; the first failure is raised."""
    failures: list[BaseException] = []

    def run(splice: str) -> None:
        try:
            path = directory / f"splice-{splice}"
            path.mkdir()
            check(splice, path)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            failures.append(e)

    threads = [threading.Thread(target=run, args=(splice,)) for splice in PATHS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def relay_for(directory: Path, target: Target, splice: str, bandwidth: str | None) -> Relay:
    fields = {"splice": splice} if bandwidth is None else {"splice": splice, "bandwidth": bandwidth}
    return Relay(write_config(directory, "routes:\n" + tcp_route(target.port, "r", **fields)), "--log-level", "debug")


def peak_rss(relay: Relay) -> int:
    """The relay's highest resident memory so far, in bytes."""
    for line in Path(f"/proc/{relay.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def assert_path_taken(relay: Relay, splice: str) -> None:
    closed = relay.wait_for("closed")
    assert bool(relay.actions("spliced", conn=closed[0]["conn"])) == (splice == "true")


#: Memory a limited relay may hold beyond what the same transfer unlimited needed at its peak.
RSS_MARGIN = 2 * MIB


def test_64_mib_at_8_mib_s_takes_its_time_and_no_more_memory(tmp_path: Path) -> None:
    """
    The first second's worth (8 MiB) goes at once and the rest at the rate,
    so 7 s rather than the 8 s of 64 MiB / 8 MiB/s; both within 8 s ±15%.
    """
    size, rate = 64 * MIB, 8 * MIB
    expected = (size - rate) / rate

    def check(splice: str, directory: Path) -> None:
        with Exchange() as target:
            (directory / "free").mkdir()
            with relay_for(directory / "free", target, splice, None) as free:
                download(free.ports["r"], size)
                unlimited_peak = peak_rss(free)
                assert_path_taken(free, splice)
            with relay_for(directory, target, splice, "{per_connection: 8MiB/s}") as limited:
                start = time.monotonic()
                elapsed = download(limited.ports["r"], size) - start
                assert abs(elapsed - expected) <= 0.15 * expected, (splice, elapsed)
                assert abs(elapsed - 8) <= 0.15 * 8, (splice, elapsed)
                assert peak_rss(limited) <= unlimited_peak + RSS_MARGIN, (splice, peak_rss(limited), unlimited_peak)
                assert_path_taken(limited, splice)
                assert limited.wait_for("closed")[0]["bytes_down"] == size

    side_by_side(check, tmp_path)


def test_per_client_is_shared_by_a_clients_connections_only(tmp_path: Path) -> None:
    """4 connections of one client share 4 MiB/s; another client has its own 4 MiB/s meanwhile."""
    rate, each, other = 4 * MIB, 4 * MIB, 12 * MIB

    def check(splice: str, directory: Path) -> None:
        with Exchange() as target, relay_for(directory, target, splice, "{per_client: 4MiB/s}") as relay:
            port = relay.ports["r"]
            done: dict[str, list[float]] = {"127.0.0.2": [], "127.0.0.3": []}
            transfers = [("127.0.0.2", each)] * 4 + [("127.0.0.3", other)]
            threads = [
                threading.Thread(target=lambda s=source, n=size: done[s].append(download(port, n, s)))
                for source, size in transfers
            ]
            start = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert len(done["127.0.0.2"]) == 4 and len(done["127.0.0.3"]) == 1, "a download failed"
            shared = (4 * each - rate) / (max(done["127.0.0.2"]) - start)  # after the first second's worth
            alone = (other - rate) / (done["127.0.0.3"][0] - start)
            assert abs(shared - rate) <= 0.15 * rate, (splice, shared / MIB)
            assert abs(alone - rate) <= 0.15 * rate, (splice, alone / MIB)

    side_by_side(check, tmp_path)


def test_up_and_down_are_limited_apart(tmp_path: Path) -> None:
    """3 MiB up at 1 MiB/s and 12 MiB down at 4 MiB/s, at once on one connection: 2 s each."""

    def check(splice: str, directory: Path) -> None:
        with Exchange() as target:
            limit = "{per_connection: {up: 1MiB/s, down: 4MiB/s}}"
            with relay_for(directory, target, splice, limit) as relay:
                start = time.monotonic()
                down = download(relay.ports["r"], 12 * MIB, upload=3 * MIB) - start
                (received, ended), = target.uploads
                up = ended - start
                assert received == 3 * MIB
                assert abs(up - 2) <= 0.3 and abs(down - 2) <= 0.3, (splice, up, down)
                assert_path_taken(relay, splice)

    side_by_side(check, tmp_path)


def test_a_throttled_client_that_resets_is_seen_at_once(tmp_path: Path) -> None:
    """A side that stopped reading to wait for its buckets is watched for resets, as a backpressured one is."""

    def check(splice: str, directory: Path) -> None:
        with Exchange() as target, relay_for(directory, target, splice, "{per_connection: {up: 1B/s}}") as relay:
            sock = connect(relay.ports["r"])
            sock.sendall(b"0\n")
            poll(lambda: target.accepted)  # relaying: what the client sends now is metered
            sock.sendall(bytes(200_000))
            poll(lambda: target.uploaded)  # what the relay read it has charged: now it waits
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset
            reset = time.monotonic()
            closed = relay.wait_for("closed", timeout=DEADLINE)[0]
            assert time.monotonic() - reset < 0.5, splice
            assert closed["reason"] == "client reset"

    side_by_side(check, tmp_path)


class Burst(UDPEcho):
    """Answers each datagram with 30 datagrams of 1000 bytes."""

    def answer(self, data: bytes, sender: tuple) -> None:
        for _ in range(30):
            self.sock.sendto(bytes(1000), sender)


def received(sock: socket.socket, quiet: float = 0.3) -> int:
    """How many datagrams arrive until none has for C{quiet} seconds."""
    sock.settimeout(quiet)
    count = 0
    try:
        while True:
            sock.recv(65535)
            count += 1
    except TimeoutError:
        return count


def test_udp_datagrams_over_the_budget_are_dropped_and_counted(tmp_path: Path) -> None:
    with UDPEcho() as echo, Burst() as burst:
        routes = (
            udp_route("up", echo.port, bandwidth="{per_connection: 10kB/s}")
            + udp_route("down", burst.port, bandwidth="{per_client: {down: 10kB/s}}")
        )
        with Relay(write_config(tmp_path, "routes:\n" + routes), "--log-level", "debug") as relay:
            sender = bound_client("127.0.0.2", relay.ports["up"])
            emptied = time.monotonic()
            for _ in range(30):
                sender.send(bytes(1000))
            assert received(sender) == 10  # the bucket's 10 kB, then nothing until it refills
            assert len(echo.received) == 10
            refilled = min(10, int((time.monotonic() - emptied) * 10))  # 10 kB/s: one datagram per 0.1 s
            for _ in range(10):
                sender.send(bytes(1000))
            again = received(sender)
            assert abs(again - refilled) <= 1, (again, refilled)
            asker = bound_client("127.0.0.3", relay.ports["down"])
            asker.send(b"?")
            assert received(asker) == 10
            limited = relay.wait_for("over-bandwidth", count=2)
            assert {(e["route"], e["direction"], e["limit"], e["size"]) for e in limited} == {
                ("up", "up", "per_connection", 1000), ("down", "down", "per_client", 1000),
            }
            relay.stop()
            dropped = {e["route"]: e["dropped"] for e in relay.actions("session-closed")}
            assert dropped == {"up": 20 + 10 - again, "down": 20}
            sender.close()
            asker.close()
