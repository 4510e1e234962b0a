"""
The log observers behind C{--logger=streamrelay.events.text_observer} and
C{json_observer}: what they write for streamrelay's events and for anyone
else's, checked on real events through C{twisted.logger} into real pipes, and
what they do when the pipe's reader stops reading.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure

from streamrelay import events
from streamrelay.config import parse_config
from streamrelay.events import LineObserver, RouteEvents
from tests.harness import DEADLINE, TWISTD, connect, poll

ROUTE = parse_config("routes:\n  r:\n    scheme: tcp4\n    port: '1:2'\n").routes[0]
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A real pipe: (read end, write end); reading it never blocks."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    yield read_fd, write_fd
    os.close(read_fd)
    os.close(write_fd)


def read_available(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def read_until(fd: int, wanted: str) -> str:
    """What arrives on C{fd} until C{wanted} has (within the harness's deadline)."""
    received = ""

    def arrived() -> bool:
        nonlocal received
        received += read_available(fd)
        return wanted in received

    poll(arrived)
    return received


def capture(pipe: tuple[int, int], line: str) -> tuple[Callable[[], str], LogPublisher]:
    """
    A publisher whose events go to a L{LineObserver} writing C{line} lines
    into C{pipe}, and a function returning what it has written.
    """
    observer = LineObserver(pipe[1], getattr(events, f"_{line}_line"))

    def output() -> str:
        assert observer.flush(DEADLINE)
        return read_available(pipe[0])

    return output, LogPublisher(observer)


def emit_closed(publisher: LogPublisher, monkeypatch) -> None:
    monkeypatch.setattr(events, "_log", Logger(namespace="streamrelay", observer=publisher))
    RouteEvents(ROUTE).info(
        "closed", conn=7, client="[::1]:9", reason="a {braced} reason", duration=0.5,
        bytes_up=1, bytes_down=2, unique_id=None,
    )


def test_text_line_of_a_streamrelay_event(pipe, monkeypatch) -> None:
    output, publisher = capture(pipe, "text")
    emit_closed(publisher, monkeypatch)
    expected = (
        r" \[streamrelay#info\] route r: #7 \[::1\]:9 closed \(a \{braced\} reason\) after 0.500s,"
        r" 1 bytes up, 2 bytes down\n"
    )
    assert re.fullmatch(STAMP + expected, output())


def test_text_lines_of_other_events_and_failures(pipe) -> None:
    output, publisher = capture(pipe, "text")
    log = Logger(namespace="elsewhere", observer=publisher)
    log.warn("{count} thing{s}", count=2, s="s")
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("it broke", Failure())
    first, second, *traceback = output().splitlines()
    assert re.fullmatch(STAMP + r" \[elsewhere#warn\] 2 things", first)
    assert re.fullmatch(STAMP + r" \[elsewhere#critical\] it broke", second)
    assert traceback and all(line.startswith("\t") for line in traceback)
    assert "ZeroDivisionError" in traceback[-1]


def test_json_line_keeps_the_fields(pipe, monkeypatch) -> None:
    output, publisher = capture(pipe, "json")
    emit_closed(publisher, monkeypatch)
    Logger(namespace="elsewhere", observer=publisher).info("object {o}", o=object())
    mine, other = (json.loads(line) for line in output().splitlines())
    assert re.fullmatch(STAMP, mine.pop("time"))
    assert mine == {
        "level": "info", "namespace": "streamrelay",
        "text": "route r: #7 [::1]:9 closed (a {braced} reason) after 0.500s, 1 bytes up, 2 bytes down",
        "action": "closed", "route": "r", "protocol": ROUTE.protocol, "listen": ROUTE.listen, "dst": ROUTE.dst,
        "conn": 7, "client": "[::1]:9", "reason": "a {braced} reason", "duration": 0.5,
        "bytes_up": 1, "bytes_down": 2, "unique_id": None,
    }
    assert other["text"].startswith("object <object object at") and other["o"].startswith("<object object")


def test_lines_beyond_the_bound_are_dropped_and_counted(pipe) -> None:
    """
    The reader stops: logging goes on without waiting, what fits in the
    buffer arrives in order once the reader resumes, then how many lines
    were dropped, then the lines logged after.
    """
    read_fd, write_fd = pipe
    os.set_blocking(write_fd, False)
    with contextlib.suppress(BlockingIOError):
        while True:  # fill the pipe, so that the writer cannot write a byte
            os.write(write_fd, b"\n" * 4096)
    os.set_blocking(write_fd, True)
    observer = LineObserver(write_fd, events._text_line, limit=16384)
    log = Logger(namespace="test", observer=observer)
    before = events.dropped_lines()
    for n in range(1000):
        log.info("line {n} {padding}", n=n, padding="x" * 100)
    assert observer.dropped > 0
    assert events.dropped_lines() - before == observer.dropped

    received = read_until(read_fd, "log writer dropped")
    log.info("after the gap")
    lines = [line for line in (received + read_until(read_fd, "after the gap")).splitlines() if line]
    numbers = [int(line.split("] line ")[1].split()[0]) for line in lines if "] line " in line]
    assert numbers == list(range(len(numbers)))
    assert len(numbers) + observer.dropped == 1000
    report, after = lines[len(numbers):]
    assert re.fullmatch(STAMP + rf" \[streamrelay#warn\] log writer dropped {observer.dropped} lines: .*", report)
    assert re.fullmatch(STAMP + r" \[test#info\] after the gap", after)


def test_a_line_logged_from_inside_a_line_does_not_deadlock(pipe) -> None:
    """
    twistd's SIGTERM handler logs a line on the main thread, which may be
    inside the observer already (a signal lands between any two bytecodes):
    the nested line goes through instead of waiting for itself.
    """
    observer = LineObserver(pipe[1], events._text_line)
    log = Logger(namespace="test", observer=observer)
    log.info("first")
    finished = threading.Event()

    def nested() -> None:
        with observer.wake:  # as if interrupted inside _put
            log.info("from the signal handler")
        finished.set()

    caller = threading.Thread(target=nested, daemon=True)
    caller.start()
    assert finished.wait(DEADLINE)
    assert "from the signal handler" in read_until(pipe[0], "from the signal handler")


#: A twistd application that logs C{COUNT} lines numbered from C{FIRST} for
#: each C{"FIRST COUNT"} line it receives, then replies with how many log
#: lines were dropped so far.  Its port goes into the file C{port}.
PROBE_TAC = """
import os

from twisted.application import service
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

from streamrelay import events

log = Logger(namespace="probe")


class Probe(LineReceiver):
    delimiter = b"\\n"

    def lineReceived(self, line):
        first, count = map(int, line.split())
        for n in range(first, first + count):
            log.info("line {n}", n=n, padding="x" * 200)
        self.sendLine(b"%d" % events.dropped_lines())


class Listen(service.Service):
    def startService(self):
        port = reactor.listenTCP(0, Factory.forProtocol(Probe), interface="127.0.0.1")
        with open("port.new", "w") as f:
            f.write(str(port.getHost().port))
        os.replace("port.new", "port")


application = service.Application("probe")
Listen().setServiceParent(application)
"""


def ask(sock: socket.socket, first: int, count: int) -> int:
    """Have the probe log C{count} lines; how many it has dropped."""
    sock.sendall(f"{first} {count}\n".encode())
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(64)
        assert chunk, "the probe closed the connection"
        reply += chunk
    return int(reply)


def test_a_stalled_reader_does_not_stall_the_reactor(tmp_path: Path) -> None:
    """
    A real twistd with the JSON observer on a pipe nobody reads: the reactor
    keeps answering while lines are dropped; once the pipe is read again the
    count arrives, and every line logged after arrives, shutdown included.
    """
    (tmp_path / "probe.tac").write_text(PROBE_TAC)
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logger=streamrelay.events.json_observer", "-y", "probe.tac"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr,
        )
    received: list[dict[str, Any]] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            received.append(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    try:
        port = poll(lambda: (tmp_path / "port").exists() and int((tmp_path / "port").read_text()))
        with connect(port) as probe:
            dropped = ask(probe, 0, 8000)  # about 2.5 MB of lines into a 64 KiB pipe
            assert dropped > 0
            assert ask(probe, 0, 0) == dropped
            reader.start()
            report = poll(lambda: next((e for e in list(received) if e.get("action") == "log-dropped"), None))
            assert (report["level"], report["dropped"]) == ("warn", dropped)
            assert ask(probe, 8000, 1000) == dropped
        process.send_signal(signal.SIGTERM)
        assert process.wait(DEADLINE) == -signal.SIGTERM
        reader.join(DEADLINE)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()
    numbers = [e["n"] for e in received if e["namespace"] == "probe"]
    assert numbers == sorted(set(numbers))
    assert numbers[-1000:] == list(range(8000, 9000))
    assert len(numbers) - 1000 + dropped == 8000
    assert received[-1]["text"] == "Server Shut Down."


def test_twisteds_per_port_lines_are_not_written(tmp_path: Path) -> None:
    """
    Twisted's ports log "... starting on N" and "(TCP Port N Closed)" (and
    the same for every UDP session's socket) whatever C{noisy} says; the
    routes' own start and stop events say it already.
    """
    from tests.harness import Relay, Target, write_config

    with Target() as target:
        echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        echo.bind(("127.0.0.1", 0))
        text = (
            "routes:\n"
            f"  t: {{scheme: tcp4, bind: 127.0.0.1, host: 127.0.0.1, port: ':{target.port}'}}\n"
            f"  u: {{scheme: udp4, bind: 127.0.0.1, host: 127.0.0.1, port: ':{echo.getsockname()[1]}'}}\n"
        )
        with echo, Relay(write_config(tmp_path, text)) as relay:
            with connect(relay.ports["t"]) as sock:
                sock.sendall(b"x")
                assert sock.recv(1) == b"x"
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with client:
                client.sendto(b"ping", ("127.0.0.1", relay.ports["u"]))
                data, peer = echo.recvfrom(100)
                assert data == b"ping"
                echo.sendto(b"pong", peer)
                client.settimeout(DEADLINE)
                assert client.recv(100) == b"pong"
            relay.stop()
    chatter = [line for line in relay.lines if re.search(r"starting on \d+|Port \d+ Closed", line)]
    assert relay.actions("stop") and relay.actions("closed") and relay.actions("session-closed")
    assert chatter == []


def test_a_regular_file_is_written_at_once_without_a_thread(tmp_path: Path) -> None:
    """A file's writes wait for no reader: no thread, each line written before the call returns."""
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        observer = LineObserver(fd, events._text_line)
        publisher = LogPublisher(observer)
        Logger(observer=publisher).info("first {n}", n=1)
        assert path.read_text().endswith("first 1\n")
        assert observer.direct and observer.writer is None
    finally:
        os.close(fd)
    with open(os.devnull, "w") as devnull:
        assert LineObserver(devnull.fileno(), events._text_line).direct
