"""
A relayed TCP connection's life, as one table and nothing else.

The table says, for each state and input, which state comes next and which
action the pair takes; it does no I/O, so it can be read (and tested) on its
own.  L{streamrelay.tcp.Pair} feeds it the inputs its sockets, its dial and
its timer produce, and carries out the actions.  Every state but CLOSED has
a deadline (L{DEADLINES}); an input a state does not list is absorbed, which
is how late events (a hook answering after a timeout, a target connecting
after the client left) end up doing nothing.

::

    CHECKING ─admitted─> DIALING ─connected─> RELAYING ─fin─> HALF_CLOSED ─fin─┐
       │ refused,           │ dial failed,       │ lost, timeout,   │ lost,       │
       │ timeout            │ timeout            │ shutdown         │ timeout     │
       └────────────────────┴────────────────────┴──────────────────┴─────> CLOSING ─gone─> CLOSED
       (gone while checking or dialing: straight to CLOSED)           timeout: abort ↺
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Literal

# StrEnum, not Enum: the table is looked up for every input of every
# connection, and a plain Enum member hashes in Python, a str in C.

__all__ = ["DEADLINES", "IGNORED", "TRANSITIONS", "Action", "Input", "State"]


class State(StrEnum):
    CHECKING = "checking"  # access control, limits and the pre_dial hook
    DIALING = "dialing"  # resolving the target and connecting to it
    RELAYING = "relaying"
    HALF_CLOSED = "half-closed"  # one side has sent its FIN
    CLOSING = "closing"  # sockets are flushing, or being reset
    CLOSED = "closed"

    #: A pair looks a (state, input) up on every event: str's C hash, not
    #: Enum's Python one (equal members are equal strings, so hashes agree).
    __hash__ = str.__hash__


class Input(StrEnum):
    ADMITTED = "admitted"  # ACL, limits and pre_dial let the client through
    REFUSED = "refused"  # one of them did not
    CONNECTED = "connected"  # the target accepted
    DIAL_FAILED = "dial failed"  # every attempt failed
    FIN = "fin"  # a side sent its FIN
    LOST = "lost"  # a side's socket closed, and the other's is open
    GONE = "gone"  # the last open socket closed
    TIMEOUT = "timeout"  # the state's deadline passed
    SHUTDOWN = "shutdown"  # the route is stopping: close gracefully
    ABORT = "abort"  # reset everything now

    __hash__ = str.__hash__  # as State's


#: What the pair does on a transition, named after its method.
Action = Literal[
    "dial", "refuse", "give_up", "relay", "drop_target", "pass_fin",
    "close_all", "close_survivor", "abort_all", "finish", "",
]

_S, _I = State, Input

TRANSITIONS: Final[dict[tuple[State, Input], tuple[State, Action]]] = {
    (_S.CHECKING, _I.ADMITTED): (_S.DIALING, "dial"),
    (_S.CHECKING, _I.REFUSED): (_S.CLOSING, "refuse"),
    (_S.CHECKING, _I.TIMEOUT): (_S.CLOSING, "give_up"),
    (_S.CHECKING, _I.GONE): (_S.CLOSED, "finish"),
    (_S.CHECKING, _I.SHUTDOWN): (_S.CLOSING, "close_all"),
    (_S.CHECKING, _I.ABORT): (_S.CLOSING, "abort_all"),
    (_S.DIALING, _I.CONNECTED): (_S.RELAYING, "relay"),
    (_S.DIALING, _I.DIAL_FAILED): (_S.CLOSING, "give_up"),
    (_S.DIALING, _I.TIMEOUT): (_S.CLOSING, "give_up"),
    (_S.DIALING, _I.GONE): (_S.CLOSED, "finish"),
    (_S.DIALING, _I.SHUTDOWN): (_S.CLOSING, "close_all"),
    (_S.DIALING, _I.ABORT): (_S.CLOSING, "abort_all"),
    (_S.RELAYING, _I.FIN): (_S.HALF_CLOSED, "pass_fin"),
    (_S.RELAYING, _I.LOST): (_S.CLOSING, "close_survivor"),
    (_S.RELAYING, _I.TIMEOUT): (_S.CLOSING, "close_all"),
    (_S.RELAYING, _I.SHUTDOWN): (_S.CLOSING, "close_all"),
    (_S.RELAYING, _I.ABORT): (_S.CLOSING, "abort_all"),
    (_S.HALF_CLOSED, _I.FIN): (_S.CLOSING, "close_all"),
    (_S.HALF_CLOSED, _I.LOST): (_S.CLOSING, "close_survivor"),
    (_S.HALF_CLOSED, _I.TIMEOUT): (_S.CLOSING, "close_all"),
    (_S.HALF_CLOSED, _I.SHUTDOWN): (_S.CLOSING, "close_all"),
    (_S.HALF_CLOSED, _I.ABORT): (_S.CLOSING, "abort_all"),
    (_S.CLOSING, _I.CONNECTED): (_S.CLOSING, "drop_target"),
    (_S.CLOSING, _I.TIMEOUT): (_S.CLOSING, "abort_all"),
    (_S.CLOSING, _I.ABORT): (_S.CLOSING, "abort_all"),
    (_S.CLOSING, _I.GONE): (_S.CLOSED, "finish"),
    (_S.CLOSED, _I.CONNECTED): (_S.CLOSED, "drop_target"),
}

#: Inputs a state absorbs on purpose; every other pair of state and input is
#: in L{TRANSITIONS} (a test checks that the two cover everything).
IGNORED: Final[frozenset[tuple[State, Input]]] = frozenset(
    # A FIN before the target is there is remembered by its side and passed
    # on once the target connects.
    {(_S.CHECKING, _I.FIN), (_S.DIALING, _I.FIN)}
    # Only the dial reports these, and only while dialing.
    | {(_S.CHECKING, _I.CONNECTED), (_S.CHECKING, _I.DIAL_FAILED)}
    # Checks are over once dialing starts; a late answer is stale.
    | {(_S.DIALING, _I.ADMITTED), (_S.DIALING, _I.REFUSED)}
    # Before RELAYING only the client has a socket: its loss is GONE.
    | {(_S.CHECKING, _I.LOST), (_S.DIALING, _I.LOST)}
    # While relaying both sockets are open, so a single loss is LOST.
    | {(_S.RELAYING, _I.GONE), (_S.HALF_CLOSED, _I.GONE)}
    # Stale reports from checks and dials that were cut short.
    | {(s, i) for s in (_S.RELAYING, _S.HALF_CLOSED, _S.CLOSING)
       for i in (_I.ADMITTED, _I.REFUSED, _I.DIAL_FAILED)}
    | {(_S.RELAYING, _I.CONNECTED), (_S.HALF_CLOSED, _I.CONNECTED)}
    # Already closing: FINs, single losses and a second shutdown change nothing.
    | {(_S.CLOSING, _I.FIN), (_S.CLOSING, _I.LOST), (_S.CLOSING, _I.SHUTDOWN)}
    # The final state absorbs everything (a target that connects anyway is reset).
    | {(_S.CLOSED, i) for i in Input if i is not _I.CONNECTED}
)

#: The route setting that bounds each state (a C{RouteConfig} attribute; 0
#: means no deadline).  DIALING has none of its own: CHECKING's budget runs
#: on through it, so checks and dial share one.
DEADLINES: Final[dict[State, str | None]] = {
    _S.CHECKING: "dial_budget",
    _S.DIALING: None,
    _S.RELAYING: "idle_timeout",
    _S.HALF_CLOSED: "half_close_timeout",
    _S.CLOSING: "close_timeout",
    _S.CLOSED: None,
}
