"""
For tests that run Twisted's real reactor in-process (trial C{TestCase}s
with C{async def} tests): waiting for a condition while the reactor runs.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.task import deferLater

DEADLINE = 10.0


async def until(predicate: Callable[[], Any], timeout: float = DEADLINE) -> None:
    """Let the reactor run until C{predicate()} is true; fail after C{timeout} seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"not true within {timeout}s: {predicate}")
        await deferLater(reactor, 0.005)
