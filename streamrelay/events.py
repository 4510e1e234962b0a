"""
Structured log events.

Every event goes through C{twisted.logger} with the fields C{route},
C{protocol}, C{listen}, C{dst} and C{action} (and C{client}, C{conn} for a
connection), so C{twistd --logger} observers and JSON log files get
machine-readable records while the text log stays readable.  Events below the
process log level are dropped before any event dict is built, so
per-connection debug events cost nothing when debug logging is off.

The observers behind C{--logger} never wait for a reader on the reactor
thread.  Where standard output is a regular file (or C{/dev/null}), whose
writes wait for no reader, they write each line at once.  Otherwise (a pipe,
a socket, a terminal) the reactor thread only appends each line to a buffer
of at most L{BUFFER_LIMIT} characters, and a thread of the observer's own
writes the buffer out.  A reader that stops
reading (a blocked pipe, a stalled journald) then costs log lines, dropped
and counted (L{dropped_lines}), instead of stopping every relay.  A thread
rather than non-blocking writes driven by the reactor: standard output may be
a regular file, which epoll refuses; making it non-blocking would change a
file description shared with standard error and with other processes (the
shell's terminal, journald's stream); and twistd logs lines before the
reactor starts and after it stops.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import stat
import sys
import threading
import time
import weakref
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from zope.interface import implementer

from .config import RouteConfig

__all__ = [
    "RefusalLog", "RouteEvents", "Throttle", "dropped_lines", "json_observer", "set_log_level", "text_observer",
]

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
    "dial-failed": "route {route}: #{conn} {client} could not reach {target}: {reason}",
    "closed": (
        "route {route}: #{conn} {client} closed ({reason}) after {duration:.3f}s,"
        " {bytes_up} bytes up, {bytes_down} bytes down"
    ),
    "denied": "route {route}: denied {client} by {rule} ({suppressed} more not logged)",
    "limited": "route {route}: #{conn} refused {client}: {reason} ({suppressed} more not logged)",
    "refused": "route {route}: #{conn} refused {client}: {reason} ({suppressed} more not logged)",
    "hook-failed": "route {route}: #{conn} {client}: {hook} hook raised {reason}; disabled for this connection",
    "rejected": "route {route}: rejected {client}: {reason} ({suppressed} more not logged)",
    "abort": "route {route}: #{conn} {client} aborted: {reason}",
    "oversized": (
        "route {route}: #{conn} {client}: dropped a {size}-byte datagram, over {limit} bytes with the"
        " {header}-byte PROXY header ({suppressed} more not logged)"
    ),
    "session-open": "route {route}: {client} session to {dst} opened from {via}",
    "session-closed": (
        "route {route}: {client} session closed ({reason}) after {duration:.3f}s,"
        " {datagrams_up} datagrams ({bytes_up} bytes) up, {datagrams_down} datagrams"
        " ({bytes_down} bytes) down, {dropped} dropped"
    ),
    "fd-limit": "descriptor limit raised from {old} to {new}",
    "reload": (
        "reloaded {path}: added [{added}], removed [{removed}], changed [{changed}], unchanged [{unchanged}],"
        " not applied [{failed}], needs a restart [{restart_needed}]"
    ),
    "reload-failed": "{path} not reloaded, the configuration in force goes on: {error}",
    "log-dropped": "log writer dropped {dropped} lines: the reader fell more than {limit} characters behind",
    "status-start": "status endpoint listening on {listen}",
    "gateway": "route {route}: #{conn} answered {client} {status}: {reason} ({suppressed} more not logged)",
    "banned": "route {route}: #{conn} refused {client}: banned after repeated 401s ({suppressed} more not logged)",
    "rate-limited": "route {route}: refused {client}: over the {limit} rate_limit ({suppressed} more not logged)",
    "over-bandwidth": (
        "route {route}: #{conn} {client}: dropped a {size}-byte datagram {direction}, over the {limit}"
        " bandwidth ({suppressed} more not logged)"
    ),
    "status-stop": "status endpoint stopped listening on {listen}",
    "target-down": "route {route}: target {target} down: {reason}",
    "target-up": "route {route}: target {target} up: {reason}",
    "target-failed": "route {route}: target {target} out for {fail_timeout:g}s: {reason}",
    "target-recovered": "route {route}: target {target} back: a dial succeeded",
    "targets": "route {route}: targets now [{targets}] (added [{added}], removed [{removed}])",
    "tls-failed": "route {route}: #{conn} {client}: TLS handshake failed: {reason} ({suppressed} more not logged)",
    "agent-tls": "agent: refused {client}: TLS handshake failed: {reason} ({suppressed} more not logged)",
    "agent-header": "agent: #{conn} closed {client}: bad header: {reason} ({suppressed} more not logged)",
    "dtls-oversized": (
        "route {route}: #{conn} {client}: dropped a {size}-byte datagram, over the {limit}-byte DTLS record limit"
        " ({suppressed} more not logged)"
    ),
    "agent-down": "agent {agent} ({address}) down: {reason}",
    "agent-up": "agent {agent} ({address}) up: {reason}",
    "agent-denied": "agent: #{conn} refused {client} the target {target}: {reason} ({suppressed} more not logged)",
    "no-route": (
        "route {route}: refused {client}: no route on {listen} takes server name {sni!r}"
        " ({suppressed} more not logged)"
    ),
    "bad-hello": "route {route}: refused {client}: {reason} ({suppressed} more not logged)",
    "hello-timeout": "route {route}: refused {client}: {reason} ({suppressed} more not logged)",
    "full": "route {route}: refused {client} ({sni}): max_connections reached ({suppressed} more not logged)",
    "status-denied": "status endpoint: denied {client} by {rule} ({suppressed} more not logged)",
    "dns-answer": "resolver: {host} {lookup} is {addresses} (was {previous}); next lookup in {ttl:.1f}s",
    "dns-stale": (
        "resolver: {host} {lookup}: {reason}; still using {addresses}, for up to {max_stale:g}s past their TTL"
    ),
    "dns-none": "resolver: {host} {lookup} has no address: {reason}",
}

#: What an observer holds for a reader that has fallen behind: about 1 MiB of
#: text, in characters.  Lines that do not fit are dropped and counted.
BUFFER_LIMIT = 1 << 20

#: How long the end of the process waits for the reader to take the last lines.
FLUSH_TIMEOUT = 5.0

#: A line's text from the event's time stamp and the event.
LineFormat = Callable[[str, dict[str, Any]], str]


def set_log_level(name: str) -> None:
    """Emit only events at C{name} (one of L{LEVELS}) or above."""
    chosen = LogLevel.levelWithName(name)
    _enabled.clear()
    _enabled.update(level for level in LogLevel.iterconstants() if level >= chosen)


def enabled(level: LogLevel) -> bool:
    return level in _enabled


def text_observer() -> LineObserver:
    """
    twistd's classic text lines on standard output, for
    C{twistd --logger=streamrelay.events.text_observer}.
    """
    return _on_stdout(_text_line)


def json_observer() -> LineObserver:
    """
    One JSON object per line on standard output, for
    C{twistd --logger=streamrelay.events.json_observer}.
    """
    return _on_stdout(_json_line)


def _on_stdout(line: LineFormat) -> LineObserver:
    """
    An observer on standard output that writes what is left when the reactor
    stops and when the process exits: twistd logs its last lines after the
    reactor has stopped, then may kill itself with the signal that stopped it
    (skipping C{atexit}).
    """
    from twisted.internet import reactor

    sys.stdout.flush()  # what was printed before comes first
    observer = LineObserver(sys.stdout.fileno(), line)
    reactor.addSystemEventTrigger("after", "shutdown", observer.finish)
    atexit.register(observer.finish)
    return observer


_observers: weakref.WeakSet[LineObserver] = weakref.WeakSet()


def dropped_lines() -> int:
    """Log lines the observers have dropped since the process started, for metrics."""
    return sum(observer.dropped for observer in list(_observers))


#: What Twisted's ports say through the legacy logger whatever C{noisy} says:
#: "RelayFactory starting on 2222", "(TCP Port 2222 Closed)", and the same
#: for every UDP session's socket.  A route's C{start} and C{stop} events
#: already say it, with the route's name.
_PORT_CHATTER = re.compile(r"\S+ starting on \d+|\((?:TCP|UDP) Port \d+ Closed\)")


def is_port_chatter(event: dict[str, Any]) -> bool:
    """Whether a legacy event is one of Twisted's per-port lines (L{_PORT_CHATTER})."""
    message = event.get("message")
    if not message:
        return False
    return len(message) == 1 and _PORT_CHATTER.fullmatch(str(message[0])) is not None


@implementer(ILogObserver)
class LineObserver:
    """
    Writes each event as one line on a file descriptor, from a thread of its
    own (see the module's docstring); lines beyond C{limit} characters
    waiting to be written are dropped and counted in C{dropped}, and once
    the writer has caught up a C{log-dropped} line says how many.

    Twisted's own file observers work out the time zone and format the time
    for every event, which costs more than the rest of a short connection's
    logging; this formats the time once a second and takes the text of
    streamrelay's own events as it was formatted at emit (C{log_text}).
    """

    def __init__(self, fd: int, line: LineFormat, limit: int = BUFFER_LIMIT) -> None:
        self.fd = fd
        self.line = line
        self.limit = limit
        #: Write on the caller's thread: a file's writes wait for no reader,
        #: and a thread costs more (it takes the GIL from the reactor).
        self.direct = _never_waits_for_a_reader(fd)
        self.second = -1
        self.stamp = ""
        #: Lines dropped since the start.
        self.dropped = 0
        #: Set once the process is ending: from then on each line waits for the writer.
        self.deadline: float | None = None
        self._start_empty()
        _observers.add(self)

    def _start_empty(self) -> None:
        """
        An empty buffer, new locks and no writer (one starts with the next
        line): at start, and in a forked child, whose copies of the locks may
        be held by a writer thread that the child does not have.
        """
        # Re-entrant: a signal handler (twistd's SIGTERM logs a line) runs on
        # the main thread, maybe while that thread is inside _put already.
        lock = threading.RLock()
        self.wake = threading.Condition(lock)  # the writer waits here for lines
        self.idle = threading.Condition(lock)  # flush() waits here for the writer
        self.pending: list[str] = []
        self.size = 0  # characters pending and being written
        self.unreported = 0  # lines dropped since the last log-dropped line
        self.writer: threading.Thread | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "log_legacy" and is_port_chatter(event):
            return
        second = int(event.get("log_time", 0))
        if second != self.second:
            self.second = second
            self.stamp = _stamp(second)
        self._put(self.line(self.stamp, event))
        if self.deadline is not None:
            self.flush(self.deadline - time.monotonic())

    def _put(self, line: str) -> None:
        if self.direct:
            try:
                _write_all(self.fd, line.encode("utf-8", "backslashreplace"))
            except OSError:
                self.dropped += 1
            return
        with self.wake:
            idle = not self.pending and not self.unreported  # else the writer will look again
            if self.size + len(line) > self.limit:
                self.dropped += 1
                self.unreported += 1
            else:
                self.pending.append(line)
                self.size += len(line)
            if self.writer is None:
                self.writer = threading.Thread(target=self._write_forever, name="log writer", daemon=True)
                self.writer.start()
            elif idle:
                self.wake.notify()

    def flush(self, timeout: float) -> bool:
        """Wait up to C{timeout} seconds for everything to be written; whether it was."""
        with self.idle:
            return self.idle.wait_for(lambda: not self.size and not self.unreported, timeout)

    def finish(self) -> None:
        """
        The process is ending: wait for the writer, for at most
        L{FLUSH_TIMEOUT} in all however often this is called, and have every
        later line wait too, now that no reactor is left to stall.
        """
        if self.deadline is None:
            self.deadline = time.monotonic() + FLUSH_TIMEOUT
        self.flush(self.deadline - time.monotonic())

    def _write_forever(self) -> None:
        """The writer thread: everything pending in one write, or the count of what was dropped."""
        while True:
            with self.wake:
                while not self.pending and not self.unreported:
                    self.idle.notify_all()
                    self.wake.wait()
            if self.deadline is None:
                # Let lines gather: one wake-up and one write for many.  Woken
                # for every line, the thread would take the GIL from the
                # reactor for each one (a tenth of a short connection's CPU).
                time.sleep(BATCH_DELAY)
            with self.wake:
                if self.pending:
                    batch, self.pending = self.pending, []
                else:
                    batch = [self._report()]
                    self.size += len(batch[0])
            try:
                _write_all(self.fd, "".join(batch).encode("utf-8", "backslashreplace"))
                failed = 0
            except OSError:  # the reader has gone: count, never report, what it cannot get
                failed = len(batch)
            with self.wake:
                self.size -= sum(map(len, batch))
                self.dropped += failed

    def _report(self) -> str:
        """The C{log-dropped} line for the lines dropped since the last one."""
        dropped, self.unreported = self.unreported, 0
        now = time.time()
        fields = {"dropped": dropped, "limit": self.limit}
        return self.line(_stamp(int(now)), {
            "log_time": now, "log_level": LogLevel.warn, "log_namespace": "streamrelay",
            "log_text": FORMATS["log-dropped"].format(**fields), "action": "log-dropped", **fields,
        })


#: How long the writer lets lines gather before writing them (seconds).
BATCH_DELAY = 0.05


def _after_fork_in_child() -> None:
    for observer in list(_observers):
        observer._start_empty()  # the lines pending at the fork, and their drops, are the parent's


os.register_at_fork(after_in_child=_after_fork_in_child)


def _never_waits_for_a_reader(fd: int) -> bool:
    """Whether C{fd} is a regular file or a device other than a terminal (C{/dev/null})."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not os.isatty(fd))


def _write_all(fd: int, data: bytes) -> None:
    """All of C{data}, however long the reader takes."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:  # another process made the file description non-blocking
            select.select([], [fd], [])


def _stamp(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))


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
    """
    The event's own fields, then C{time}, C{level}, C{namespace} and
    C{text}, which win over fields of the same name (legacy events carry a
    numeric C{time} of their own).
    """
    record: dict[str, Any] = {
        key: value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        for key, value in event.items()
        if not key.startswith("log_")
    }
    level = event.get("log_level")
    record.update(
        time=stamp, level=level.name if level else None,
        namespace=event.get("log_namespace"), text=_event_text(event),
    )
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
    nothing to parse.  The event is what C{Logger.emit} builds, handed to
    the logger's observer directly: that method's check of the level walks
    every C{LogLevel} on each call, and callers pass levels of
    C{_enabled} only.
    """
    fields.update(
        log_text=FORMATS[action].format(**fields), action=action, log_logger=_log, log_level=level,
        log_namespace=_log.namespace, log_source=None, log_format="{log_text}", log_time=time.time(),
    )
    _log.observer(fields)


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

    def __init__(self, reactor: IReactorTime, period: float = 1.0) -> None:
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

    def __init__(self, events: RouteEvents, reactor: IReactorTime) -> None:
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
