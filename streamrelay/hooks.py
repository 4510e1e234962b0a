"""
Hooks for programs that embed streamrelay (GoDoxy's preDial and onRead).

    make_service(config, hooks={"ssh": Hooks(pre_dial=check), "*": Hooks(on_read=count)})

C{"*"} applies to every route without an entry of its own.  A hook that
raises never takes the route down: a failing C{pre_dial} refuses that one
connection, a failing C{on_read} is logged and switched off for that
connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Optional, Union

__all__ = ["ConnectionContext", "Hooks", "Refused", "hooks_for"]


@dataclass(frozen=True)
class ConnectionContext:
    """What a hook knows about a connection."""

    route: str
    conn: int
    client: tuple[str, int]  # the real client, after any PROXY header
    listen: tuple[str, int]  # the address the client connected to
    target: tuple[str, int]  # the configured target (host may be a name)


class Refused(Exception):
    """Raised by C{pre_dial} to refuse a connection; the message is logged."""


#: Called after access control, before dialing.  Returning (or a Deferred or
#: coroutine firing with) C{False}, or raising, refuses the connection.
PreDial = Callable[[ConnectionContext], Union[Optional[bool], Awaitable[Optional[bool]], Any]]
#: Called with each chunk's size and C{"up"} (client to target) or C{"down"}.
OnRead = Callable[[ConnectionContext, int, str], None]


@dataclass(frozen=True)
class Hooks:
    pre_dial: PreDial | None = None
    on_read: OnRead | None = None


NO_HOOKS = Hooks()


def hooks_for(hooks: Mapping[str, Hooks] | None, route: str) -> Hooks:
    """A route's own hooks, else the C{"*"} entry, else none."""
    if not hooks:
        return NO_HOOKS
    return hooks.get(route) or hooks.get("*") or NO_HOOKS
