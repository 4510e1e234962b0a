"""
The pair's state machine as a table (L{streamrelay.lifecycle}), checked on
its own: no reactor, no sockets.  What the table promises here is what
L{streamrelay.tcp.Pair} relies on when it looks an input up and runs the
named action; C{tests/test_pair.py} drives a real pair through it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import deque
from enum import Enum
from typing import get_args

import pytest

from streamrelay import tcp
from streamrelay.config import RouteConfig, parse_config
from streamrelay.lifecycle import DEADLINES, IGNORED, TRANSITIONS, Action, Input, State

FINAL = State.CLOSED
ACTIONS = sorted({action for _, action in TRANSITIONS.values() if action})


def successors(state: State) -> set[State]:
    return {following for (origin, _), (following, _) in TRANSITIONS.items() if origin is state}


def reachable_from(start: State) -> set[State]:
    seen, queue = {start}, deque([start])
    while queue:
        for following in successors(queue.popleft()):
            if following not in seen:
                seen.add(following)
                queue.append(following)
    return seen


def default_route() -> RouteConfig:
    config = parse_config("routes:\n  r: {scheme: tcp4, bind: 127.0.0.1, host: 127.0.0.1, port: '1:2'}\n")
    return config.routes[0]


# -- the table is complete and unambiguous


def test_every_state_and_input_is_either_a_transition_or_ignored() -> None:
    every = {(state, input) for state in State for input in Input}
    transitions, ignored = set(TRANSITIONS), set(IGNORED)
    assert transitions & ignored == set(), "listed both as a transition and as ignored"
    assert every - transitions - ignored == set(), "neither a transition nor ignored"
    assert transitions | ignored == every  # and nothing that is not a (State, Input) pair


def test_transitions_lead_to_states_with_declared_actions() -> None:
    declared = set(get_args(Action))
    for key, (following, action) in TRANSITIONS.items():
        assert isinstance(following, State), key
        assert action in declared, f"{key}: {action!r} is not an Action"


@pytest.mark.parametrize("action", ACTIONS)
def test_every_action_is_a_pair_method_taking_side_and_detail(action: str) -> None:
    """C{Pair.feed} calls C{getattr(pair, action)(side, detail)}: two positional arguments."""
    method = getattr(tcp.Pair, action, None)
    assert callable(method), f"Pair has no method {action!r}"
    signature = inspect.signature(method)
    parameters = list(signature.parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    assert len(parameters) == 3, f"Pair.{action}{signature}"
    assert all(p.kind in positional and p.default is p.empty for p in parameters), f"Pair.{action}{signature}"
    assert parameters[2].name == "detail", f"Pair.{action}{signature}"


def test_every_declared_action_is_used() -> None:
    """A method named in C{Action} but in no transition would be dead code."""
    assert set(get_args(Action)) - {""} == set(ACTIONS)


# -- the graph


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.name)
def test_closed_is_reached_from_every_state(state: State) -> None:
    assert FINAL in reachable_from(state)


def test_every_state_is_reached_from_checking() -> None:
    assert reachable_from(State.CHECKING) == set(State)


def test_closed_only_loops_on_a_late_target() -> None:
    out_of_closed = {key: step for key, step in TRANSITIONS.items() if key[0] is FINAL}
    assert out_of_closed == {(FINAL, Input.CONNECTED): (FINAL, "drop_target")}


def test_only_the_last_socket_closing_reaches_closed() -> None:
    """C{finish} logs and counts the pair once: only GONE may lead to it."""
    into_closed = {key for key, (following, _) in TRANSITIONS.items() if following is FINAL and key[0] is not FINAL}
    assert {input for _, input in into_closed} == {Input.GONE}
    assert all(TRANSITIONS[key][1] == "finish" for key in into_closed)
    finishing = {key for key, (_, action) in TRANSITIONS.items() if action == "finish"}
    assert finishing == into_closed


@pytest.mark.parametrize("state", [s for s in State if s is not FINAL], ids=lambda s: s.name)
def test_every_open_state_can_be_shut_down_aborted_and_timed_out(state: State) -> None:
    for input in (Input.ABORT, Input.TIMEOUT):
        following, action = TRANSITIONS[(state, input)]
        assert following is State.CLOSING, (state, input)
    assert TRANSITIONS[(state, Input.ABORT)][1] == "abort_all"
    if state is State.CLOSING:
        assert (state, Input.SHUTDOWN) in IGNORED  # already closing
    else:
        assert TRANSITIONS[(state, Input.SHUTDOWN)] == (State.CLOSING, "close_all")


# -- deadlines


def test_deadlines_cover_every_state() -> None:
    assert set(DEADLINES) == set(State)
    assert DEADLINES[FINAL] is None


@pytest.mark.parametrize("state", [s for s in State if s is not FINAL], ids=lambda s: s.name)
def test_every_open_state_has_a_deadline_setting(state: State) -> None:
    setting = DEADLINES[state]
    if state is State.DIALING:
        # Checking's budget runs on through the dial: one budget, not two.
        assert setting is None
        setting = DEADLINES[State.CHECKING]
    assert setting is not None, f"{state.name} has no deadline"
    fields = {f.name for f in dataclasses.fields(RouteConfig)}
    assert setting in fields or isinstance(getattr(RouteConfig, setting, None), property), setting
    value = getattr(default_route(), setting)
    assert isinstance(value, float) and value >= 0


def test_every_timeout_has_a_reason() -> None:
    """C{Pair.timed_out} looks the reason up by state: a missing one would raise."""
    timing_out = {state for state, input in TRANSITIONS if input is Input.TIMEOUT}
    assert timing_out == {s for s in State if s is not FINAL}
    assert set(tcp._TIMEOUT_REASONS) >= timing_out
    assert tcp._TIMEOUT_REASONS[State.CHECKING] == tcp._TIMEOUT_REASONS[State.DIALING] == "dial timeout"


def test_default_deadlines() -> None:
    route = default_route()
    assert route.dial_budget == route.connect_timeout * (route.retries + 1) == 10.0
    assert (route.idle_timeout, route.half_close_timeout, route.close_timeout) == (0.0, 30.0, 10.0)


# -- spot checks


@pytest.mark.parametrize(
    ("state", "input", "step"),
    [
        (State.CHECKING, Input.ADMITTED, (State.DIALING, "dial")),
        (State.CHECKING, Input.REFUSED, (State.CLOSING, "refuse")),
        (State.CHECKING, Input.GONE, (State.CLOSED, "finish")),
        (State.DIALING, Input.CONNECTED, (State.RELAYING, "relay")),
        (State.DIALING, Input.DIAL_FAILED, (State.CLOSING, "give_up")),
        (State.DIALING, Input.TIMEOUT, (State.CLOSING, "give_up")),
        (State.RELAYING, Input.FIN, (State.HALF_CLOSED, "pass_fin")),
        (State.RELAYING, Input.LOST, (State.CLOSING, "close_survivor")),
        (State.HALF_CLOSED, Input.FIN, (State.CLOSING, "close_all")),
        (State.HALF_CLOSED, Input.LOST, (State.CLOSING, "close_survivor")),
        (State.CLOSING, Input.TIMEOUT, (State.CLOSING, "abort_all")),
        (State.CLOSING, Input.CONNECTED, (State.CLOSING, "drop_target")),
        (State.CLOSING, Input.GONE, (State.CLOSED, "finish")),
    ],
    ids=lambda value: value.name if isinstance(value, Enum) else "",
)
def test_spot_checks(state: State, input: Input, step: tuple[State, str]) -> None:
    assert TRANSITIONS[(state, input)] == step


@pytest.mark.parametrize(
    ("state", "input"),
    [
        (State.CHECKING, Input.FIN),  # remembered by the side, passed on at connect
        (State.DIALING, Input.ADMITTED),  # a late hook answer
        (State.RELAYING, Input.DIAL_FAILED),  # a dial cut short
        (State.CLOSING, Input.LOST),
        (State.CLOSED, Input.TIMEOUT),
        (State.CLOSED, Input.GONE),
    ],
)
def test_spot_checks_ignored(state: State, input: Input) -> None:
    assert (state, input) in IGNORED
    assert (state, input) not in TRANSITIONS

