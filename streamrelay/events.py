"""
Structured log events.

Every event goes through C{twisted.logger} with the fields C{route},
C{protocol}, C{listen}, C{dst} and C{action} (and C{client}, C{conn} for a
connection), so C{twistd --logger} observers and JSON log files get
machine-readable records while the text log stays readable.  Events below the
process log level are dropped before any event dict is built, so
per-connection debug events cost nothing when debug logging is off.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any, Callable

from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from zope.interface import implementer

from .config import RouteConfig

__all__ = ["RefusalLog", "RouteEvents", "Throttle", "json_observer", "set_log_level", "text_observer"]

_log = Logger(namespace="streamrelay")

LEVELS = ("debug", "info", "warn", "error")
_enabled: set[LogLevel] = {LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical}

#: One readable line per action; the structured fields travel alongside.
FORMATS = {
    "start": "route {route}: {protocol} listening on {listen}, relaying to {dst}",
    "stop": "route {route}: stopped listening on {listen}",
    "accept": "route {route}: #{conn} accepted {client}",
    "connected": "route {route}: #{conn} {client} connected to {dst} from {via}",
    "spliced": "route {route}: #{conn} {client} spliced",
    "dial-failed": "route {route}: #{conn} {client} could not reach {dst}: {reason}",
    "closed": (
        "route {route}: #{conn} {client} closed ({reason}) after {duration:.3f}s,"
        " {bytes_up} bytes up, {bytes_down} bytes down"
    ),
    "denied": "route {route}: denied {client} by {rule} ({suppressed} more not logged)",
    "limited": "route {route}: #{conn} refused {client}: {reason} ({suppressed} more not logged)",
    "refused": "route {route}: #{conn} refused {client}: {reason} ({suppressed} more not logged)",
    "hook-failed": "route {route}: #{conn} {client}: {hook} hook raised {reason}; disabled for this connection",
    "rejected": "route {route}: rejected {client}: {reason}",
    "abort": "route {route}: #{conn} {client} aborted: {reason}",
    "session-open": "route {route}: {client} session to {dst} opened from {via}",
    "session-closed": (
        "route {route}: {client} session closed ({reason}) after {duration:.3f}s,"
        " {datagrams_up} datagrams ({bytes_up} bytes) up, {datagrams_down} datagrams"
        " ({bytes_down} bytes) down, {dropped} dropped"
    ),
    "fd-limit": "descriptor limit raised from {old} to {new}",
}


def set_log_level(name: str) -> None:
    """Emit only events at C{name} (one of L{LEVELS}) or above."""
    chosen = LogLevel.levelWithName(name)
    _enabled.clear()
    _enabled.update(level for level in LogLevel.iterconstants() if level >= chosen)


def enabled(level: LogLevel) -> bool:
    return level in _enabled


def text_observer() -> ILogObserver:
    """
    twistd's classic text lines on standard output, for
    C{twistd --logger=streamrelay.events.text_observer}.
    """
    return LineObserver(sys.stdout, _text_line)


def json_observer() -> ILogObserver:
    """
    One JSON object per line on standard output, for
    C{twistd --logger=streamrelay.events.json_observer}.
    """
    return LineObserver(sys.stdout, _json_line)


@implementer(ILogObserver)
class LineObserver:
    """
    Writes each event as one line, and flushes.  Twisted's own file
    observers work out the time zone and format the time for every event,
    which costs more than the rest of a short connection's logging; this
    formats the time once a second and takes the text of streamrelay's own
    events as it was formatted at emit (C{log_text}).
    """

    def __init__(self, stream: IO[str], line: Callable[[str, dict[str, Any]], str]) -> None:
        self.stream = stream
        self.line = line
        self.second = -1
        self.stamp = ""

    def __call__(self, event: dict[str, Any]) -> None:
        second = int(event.get("log_time", 0))
        if second != self.second:
            self.second = second
            self.stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
        self.stream.write(self.line(self.stamp, event))
        self.stream.flush()


def _event_text(event: dict[str, Any]) -> str:
    text = event.get("log_text")
    if text is None:
        text = formatEvent(event)
    failure = event.get("log_failure")
    return text if failure is None else f"{text}\n{failure.getTraceback().rstrip()}"


def _text_line(stamp: str, event: dict[str, Any]) -> str:
    """C{<time> [<namespace>#<level>] <text>}, as twistd writes it."""
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
    text = _event_text(event).replace("\n", "\n\t")
    return f"{stamp} [{system}] {text}\n"


def _json_line(stamp: str, event: dict[str, Any]) -> str:
    """The event's own fields, and C{time}, C{level}, C{namespace} and C{text}."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": stamp, "level": level.name if level else None,
        "namespace": event.get("log_namespace"), "text": _event_text(event),
    }
    for key, value in event.items():
        if not key.startswith("log_"):
            record[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
    return json.dumps(record) + "\n"


def emit(level: LogLevel, action: str, **fields: Any) -> None:
    """An event that belongs to no route (process-wide)."""
    if level in _enabled:
        _emit(level, action, fields)


def _emit(level: LogLevel, action: str, fields: dict[str, Any]) -> None:
    """
    Emit with the text formatted now, by C{str.format}, into C{log_text}:
    C{twisted.logger}'s own formatter is pure Python and cost more than the
    rest of a short connection, and the format C{"{log_text}"} leaves it
    nothing to parse.
    """
    _log.emit(level, "{log_text}", log_text=FORMATS[action].format(**fields), action=action, **fields)


class RouteEvents:
    """Emits events carrying one route's fixed fields."""

    __slots__ = ("fields",)

    def __init__(self, route: RouteConfig) -> None:
        self.fields = {
            "route": route.name,
            "protocol": route.protocol,
            "listen": route.listen,
            "dst": route.dst,
        }

    def set_listen(self, listen: str) -> None:
        """The address actually bound (a port of 0 becomes the chosen one)."""
        self.fields["listen"] = listen

    def emit(self, level: LogLevel, action: str, **fields: Any) -> None:
        if level in _enabled:
            _emit(level, action, {**self.fields, **fields})

    def debug(self, action: str, **fields: Any) -> None:
        self.emit(LogLevel.debug, action, **fields)

    def info(self, action: str, **fields: Any) -> None:
        self.emit(LogLevel.info, action, **fields)

    def warn(self, action: str, **fields: Any) -> None:
        self.emit(LogLevel.warn, action, **fields)


class Throttle:
    """
    Lets an event through at most once per C{period} seconds, so a flood of
    refused connections cannot flood the log; counts what it holds back.
    """

    def __init__(self, reactor: Any, period: float = 1.0) -> None:
        self.reactor = reactor
        self.period = period
        self.next_time = 0.0
        self.suppressed = 0

    def allow(self) -> int | None:
        """C{None} to stay quiet, else how many events were held back before this one."""
        now = self.reactor.seconds()
        if now < self.next_time:
            self.suppressed += 1
            return None
        self.next_time = now + self.period
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


class RefusalLog:
    """
    Counts a route's refusals by kind (the event's action: C{denied},
    C{limited}, C{refused}, C{rejected}) and logs each kind at most once a
    period, with how many of that kind were held back: a flood of one kind
    neither hides another nor mixes its count into another's.
    """

    __slots__ = ("events", "reactor", "counts", "throttles")

    def __init__(self, events: RouteEvents, reactor: Any) -> None:
        self.events = events
        self.reactor = reactor
        self.counts: dict[str, int] = {}
        self.throttles: dict[str, Throttle] = {}

    def refuse(self, kind: str, **fields: Any) -> None:
        """Count one refusal of C{kind}, and log it unless its throttle holds it back."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        throttle = self.throttles.get(kind)
        if throttle is None:
            throttle = self.throttles[kind] = Throttle(self.reactor)
        suppressed = throttle.allow()
        if suppressed is not None:
            self.events.warn(kind, suppressed=suppressed, **fields)
