"""
Target selection (L{streamrelay.balance}) against a fake clock: the three
modes' shares, backups, passive failures, sticky clients and target lists
that change under running state.  No sockets: the balancer touches none.
"""

from __future__ import annotations

from collections import Counter

import pytest
from twisted.internet.task import Clock

from streamrelay import balance
from streamrelay.balance import Balancer, LoadBalance, Target, TargetSpec

CLIENTS = [f"198.51.100.{i}" for i in range(1, 201)]  # TEST-NET-2


def specs(*weights: int, backups: int = 0) -> list[TargetSpec]:
    """Primaries on 127.0.0.1.. with C{weights}, then C{backups} backups."""
    primaries = [TargetSpec(f"127.0.0.{i}", 80, weight) for i, weight in enumerate(weights, 1)]
    return primaries + [TargetSpec(f"127.0.1.{i}", 80, backup=True) for i in range(1, backups + 1)]


def make(clock: Clock, *weights: int, backups: int = 0, **settings: object) -> Balancer:
    return Balancer(specs(*weights, backups=backups), LoadBalance(**settings), clock.seconds)  # type: ignore[arg-type]


def hosts(picks: list[Target | None]) -> list[str | None]:
    return [None if t is None else t.host for t in picks]


# ------------------------------------------------------------------ roundrobin


def test_roundrobin_weights_1_2_3_give_exactly_1_2_3_in_every_6_picks() -> None:
    lb = make(Clock(), 1, 2, 3)
    picks = hosts([lb.pick("192.0.2.1") for _ in range(6000)])
    assert Counter(picks) == {"127.0.0.1": 1000, "127.0.0.2": 2000, "127.0.0.3": 3000}
    # smooth, as nginx: interleaved rather than 1, 2, 2, 3, 3, 3, and the same every 6 picks
    assert picks[:6] == ["127.0.0.3", "127.0.0.2", "127.0.0.1", "127.0.0.3", "127.0.0.2", "127.0.0.3"]
    assert picks == picks[:6] * 1000
    assert [t.picked for t in lb.targets] == [1000, 2000, 3000]


def test_an_ineligible_target_is_skipped_and_the_others_keep_their_ratio() -> None:
    lb = make(Clock(), 1, 2, 3)
    lb.targets[2].up = False
    picks = hosts([lb.pick("192.0.2.1") for _ in range(300)])
    assert Counter(picks) == {"127.0.0.1": 100, "127.0.0.2": 200}


def test_exclude_moves_a_failed_dial_to_the_next_target_then_none() -> None:
    lb = make(Clock(), 1, 1, 1)
    tried: list[Target] = []
    while (target := lb.pick("192.0.2.1", exclude=tried)) is not None:
        tried.append(target)
    assert sorted(hosts(tried)) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]  # each once


# ------------------------------------------------------------------ leastconn


def test_leastconn_picks_the_fewest_active_pairs_per_weight() -> None:
    lb = make(Clock(), 1, 1, 2, mode="leastconn")
    one, two, heavy = lb.targets
    for target, count in ((one, 3), (two, 1), (heavy, 4)):
        for _ in range(count):
            lb.connected(target)
    assert lb.pick("192.0.2.1") is two  # 1/1 against 3/1 and 4/2
    lb.connected(two)
    lb.connected(two)  # two: 3/1; heavy's 4/2 is now the fewest
    assert lb.pick("192.0.2.1") is heavy
    for _ in range(3):
        lb.closed(one)  # one: 0/1
    assert lb.pick("192.0.2.1") is one


def test_leastconn_fills_targets_by_weight_and_ties_go_round() -> None:
    lb = make(Clock(), 1, 1, 2, mode="leastconn")
    opened = []
    for _ in range(40):
        target = lb.pick("192.0.2.1")
        assert target is not None
        lb.connected(target)
        opened.append(target)
    assert [t.active for t in lb.targets] == [10, 10, 20]
    for target in opened:  # every pair closed: all tied, so smooth round robin decides
        lb.closed(target)
    assert Counter(hosts([lb.pick("192.0.2.1") for _ in range(40)])) == {
        "127.0.0.1": 10, "127.0.0.2": 10, "127.0.0.3": 20,
    }


# ------------------------------------------------------------------ iphash


def mapping(lb: Balancer) -> dict[str, str | None]:
    return {client: hosts([lb.pick(client)])[0] for client in CLIENTS}


def test_iphash_keeps_each_client_on_one_target_and_spreads_them() -> None:
    lb = make(Clock(), 1, 1, 1, 1, mode="iphash")
    first = mapping(lb)
    assert all(mapping(lb) == first for _ in range(3))
    shares = Counter(first.values())
    assert set(shares) == {"127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"}
    assert min(shares.values()) > 200 / 4 / 2  # no target starved


def test_iphash_removing_one_of_four_moves_only_its_clients() -> None:
    lb = make(Clock(), 1, 1, 1, 1, mode="iphash")
    before = mapping(lb)
    lb.set_targets(specs(1, 1, 1, 1)[:2] + specs(1, 1, 1, 1)[3:])  # without 127.0.0.3
    after = mapping(lb)
    moved = {client for client in CLIENTS if after[client] != before[client]}
    its_clients = {client for client in CLIENTS if before[client] == "127.0.0.3"}
    assert moved == its_clients and len(moved) > 20
    assert "127.0.0.3" not in after.values()


def test_iphash_a_down_target_sends_its_clients_on_and_gets_them_back() -> None:
    lb = make(Clock(), 1, 1, 1, 1, mode="iphash")
    before = mapping(lb)
    lb.targets[1].up = False
    during = mapping(lb)
    assert {c for c in CLIENTS if during[c] != before[c]} == {c for c in CLIENTS if before[c] == "127.0.0.2"}
    lb.targets[1].up = True
    assert mapping(lb) == before


def test_iphash_weight_gives_a_larger_share() -> None:
    lb = make(Clock(), 1, 3, mode="iphash")
    shares = Counter(mapping(lb).values())
    assert shares["127.0.0.2"] > 2 * shares["127.0.0.1"]


# ------------------------------------------------------------------ backups


@pytest.mark.parametrize("mode", balance.MODES)
def test_backups_only_while_no_primary_is_eligible(mode: str) -> None:
    clock = Clock()
    lb = make(clock, 1, 1, backups=2, mode=mode)
    first, second, backup_one, backup_two = lb.targets
    assert {lb.pick(c).host for c in CLIENTS[:50]} <= {"127.0.0.1", "127.0.0.2"}  # type: ignore[union-attr]
    first.up = False
    assert {lb.pick(c) for c in CLIENTS[:50]} == {second}
    lb.failed(second, "refused")  # out passively: no primary left
    assert {lb.pick(c) for c in CLIENTS[:50]} <= {backup_one, backup_two}
    backup_one.up = backup_two.up = False
    assert lb.pick(CLIENTS[0]) is None  # nothing eligible: refuse, as nginx does
    first.up = True
    assert {lb.pick(c) for c in CLIENTS[:50]} == {first}


# ------------------------------------------------------------------ passive failures


def test_max_fails_within_fail_timeout_takes_a_target_out_for_fail_timeout() -> None:
    clock = Clock()
    lb = make(clock, 1, 1, max_fails=2, fail_timeout=10)
    target, other = lb.targets
    assert lb.failed(target, "refused") is False
    clock.advance(10)  # the first failure has left the window
    assert lb.failed(target, "refused") is False
    clock.advance(9)
    assert lb.failed(target, "timeout") is True  # two within 10 s: out
    assert (target.failures, target.last_error) == (3, "timeout")
    assert {lb.pick(c) for c in CLIENTS[:20]} == {other}
    clock.advance(9.9)
    assert not lb.eligible(target)
    clock.advance(0.1)
    assert lb.eligible(target)  # back on trial
    assert lb.failed(target, "refused") is True  # and one failure is enough to be out again
    clock.advance(10)
    assert lb.succeeded(target) is True  # a dial connected: fully back
    assert lb.succeeded(target) is False
    assert lb.failed(target, "refused") is False  # max_fails counts afresh


def test_max_fails_0_never_takes_a_target_out() -> None:
    lb = make(Clock(), 1, 1, max_fails=0)
    target = lb.targets[0]
    assert not any(lb.failed(target, "refused") for _ in range(100))
    assert lb.eligible(target)


def test_a_lone_target_never_fails_passively() -> None:
    """nginx's rule: with one server and no backup there is nothing better to send the client to."""
    lb = make(Clock(), 1)
    assert lb.failed(lb.targets[0], "refused") is False
    assert lb.pick("192.0.2.1") is lb.targets[0]
    lb.targets[0].up = False  # active checks still count
    assert lb.pick("192.0.2.1") is None


# ------------------------------------------------------------------ sticky


def test_sticky_keeps_a_client_on_its_target_until_it_has_been_away_sticky_max_age() -> None:
    clock = Clock()
    lb = make(clock, 1, 1, sticky=True, sticky_max_age=60)
    first, second = lb.targets
    assert lb.pick("192.0.2.1") is first
    for _ in range(10):
        clock.advance(60)  # each pick refreshes the entry
        assert lb.pick("192.0.2.1") is first
    assert [lb.pick(f"192.0.2.{i}") for i in (2, 3)] == [second, first]  # others are balanced
    assert lb.pick("192.0.2.2") is second
    clock.advance(60.5)
    assert lb.pick("192.0.2.1") is second  # forgotten: balanced afresh, round robin's turn
    assert [lb.pick("192.0.2.3") for _ in range(3)] == [first, first, first]  # forgotten too; sticky again


@pytest.mark.parametrize("mode", ["roundrobin", "leastconn"])
def test_sticky_moves_a_client_whose_target_is_out(mode: str) -> None:
    lb = make(Clock(), 1, 1, sticky=True, mode=mode)
    first = lb.pick("192.0.2.1")
    assert first is not None
    first.up = False
    second = lb.pick("192.0.2.1")
    assert second is not None and second is not first
    first.up = True
    assert lb.pick("192.0.2.1") is second  # and stays where it moved to
    assert lb.pick("192.0.2.1", exclude=[second]) is first  # a failed dial moves it too


def test_the_sticky_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    def returns_to(bound: int) -> Target | None:
        monkeypatch.setattr(balance, "STICKY_CLIENTS", bound)
        lb = make(Clock(), 1, 1, sticky=True)
        assert lb.pick("192.0.2.1") is lb.targets[0]
        for i in range(2, 6):  # four more clients: .2 and .4 on targets[1]
            lb.pick(f"192.0.2.{i}")
        return lb.pick("192.0.2.1")  # the round robin's next is targets[1]

    assert returns_to(100).host == "127.0.0.1"  # type: ignore[union-attr]
    assert returns_to(3).host == "127.0.0.2"  # type: ignore[union-attr]  # forgotten


# ------------------------------------------------------------------ changing targets


def test_set_targets_keeps_the_state_of_targets_that_stay() -> None:
    clock = Clock()
    lb = make(clock, 1, 1, 1, max_fails=1)
    a, b, c = lb.targets
    lb.connected(a)
    b.up = False
    lb.failed(c, "refused")
    changes = lb.set_targets([
        TargetSpec("127.0.0.1", 80, weight=5), TargetSpec("127.0.0.2", 80, backup=True),
        TargetSpec("127.0.0.3", 80), TargetSpec("127.0.0.9", 80), TargetSpec("127.0.0.9", 80, weight=7),
    ])
    (nine,) = changes.added
    assert changes.removed == ()
    assert lb.primaries == [a, c, nine] and lb.backups == [b]
    assert (a.active, a.weight, b.up, b.backup, lb.eligible(c)) == (1, 5, False, True, False)
    assert (nine.host, nine.weight) == ("127.0.0.9", 1)  # the first of two specs for one address wins
    changes = lb.set_targets(specs(1))
    assert changes.added == () and set(changes.removed) == {b, c, nine}
    assert lb.targets == [a] and a.weight == 1 and a.active == 1
