"""
The log observers behind C{--logger=streamrelay.events.text_observer} and
C{json_observer}: what they write for streamrelay's events and for anyone
else's, checked on real events through C{twisted.logger}.
"""

from __future__ import annotations

import io
import json
import re

from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure

from streamrelay import events
from streamrelay.config import parse_config
from streamrelay.events import LineObserver, RouteEvents

ROUTE = parse_config("routes:\n  r:\n    scheme: tcp4\n    port: '1:2'\n").routes[0]
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"


def capture(line: str) -> tuple[io.StringIO, LogPublisher]:
    """A publisher whose events go to a L{LineObserver} writing C{line} lines into a buffer."""
    out = io.StringIO()
    publisher = LogPublisher(LineObserver(out, getattr(events, f"_{line}_line")))
    return out, publisher


def emit_closed(publisher: LogPublisher, monkeypatch) -> None:
    monkeypatch.setattr(events, "_log", Logger(namespace="streamrelay", observer=publisher))
    RouteEvents(ROUTE).info(
        "closed", conn=7, client="[::1]:9", reason="a {braced} reason", duration=0.5,
        bytes_up=1, bytes_down=2, unique_id=None,
    )


def test_text_line_of_a_streamrelay_event(monkeypatch) -> None:
    out, publisher = capture("text")
    emit_closed(publisher, monkeypatch)
    expected = (
        r" \[streamrelay#info\] route r: #7 \[::1\]:9 closed \(a \{braced\} reason\) after 0.500s,"
        r" 1 bytes up, 2 bytes down\n"
    )
    assert re.fullmatch(STAMP + expected, out.getvalue())


def test_text_lines_of_other_events_and_failures() -> None:
    out, publisher = capture("text")
    log = Logger(namespace="elsewhere", observer=publisher)
    log.warn("{count} thing{s}", count=2, s="s")
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("it broke", Failure())
    first, second, *traceback = out.getvalue().splitlines()
    assert re.fullmatch(STAMP + r" \[elsewhere#warn\] 2 things", first)
    assert re.fullmatch(STAMP + r" \[elsewhere#critical\] it broke", second)
    assert traceback and all(line.startswith("\t") for line in traceback)
    assert "ZeroDivisionError" in traceback[-1]


def test_json_line_keeps_the_fields(monkeypatch) -> None:
    out, publisher = capture("json")
    emit_closed(publisher, monkeypatch)
    Logger(namespace="elsewhere", observer=publisher).info("object {o}", o=object())
    mine, other = (json.loads(line) for line in out.getvalue().splitlines())
    assert re.fullmatch(STAMP, mine.pop("time"))
    assert mine == {
        "level": "info", "namespace": "streamrelay",
        "text": "route r: #7 [::1]:9 closed (a {braced} reason) after 0.500s, 1 bytes up, 2 bytes down",
        "action": "closed", "route": "r", "protocol": ROUTE.protocol, "listen": ROUTE.listen, "dst": ROUTE.dst,
        "conn": 7, "client": "[::1]:9", "reason": "a {braced} reason", "duration": 0.5,
        "bytes_up": 1, "bytes_down": 2, "unique_id": None,
    }
    assert other["text"].startswith("object <object object at") and other["o"].startswith("<object object")
