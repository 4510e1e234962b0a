"""
Real processes and real peers for the end-to-end tests.

L{Relay} runs C{twistd -n streamrelay} with the JSON logger and reads its
events; L{Target} is an asyncio server on loopback in a thread, so the tests
can drive plain blocking sockets against both.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from streamrelay.proxyproto import ProxyInfo, parse

TWISTD = str(Path(sys.executable).parent / "twistd")
DEADLINE = 15.0


def poll(predicate: Callable[[], Any], timeout: float = DEADLINE, interval: float = 0.02) -> Any:
    """Wait until C{predicate()} is truthy, or fail after C{timeout} seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


class Relay:
    """A C{twistd -n streamrelay} process and the events it logs."""

    def __init__(self, config_path: Path, *args: str, wait: bool = True, prefix: tuple[str, ...] = ()) -> None:
        """C{prefix}: a command that runs twistd (C{systemd-socket-activate ...})."""
        self.config_path = config_path
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [*prefix, TWISTD, "-n", "--pidfile=", "--logger=streamrelay.events.json_observer",
             "streamrelay", "--config", str(config_path), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=config_path.parent,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            self.ports = self.wait_started()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    @property
    def pid(self) -> int:
        return self.process.pid

    def actions(self, action: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e for e in list(self.events)
            if e.get("action") == action and all(e.get(k) == v for k, v in fields.items())
        ]

    def wait_for(self, action: str, count: int = 1, timeout: float = DEADLINE, **fields: Any) -> list[dict]:
        def enough() -> list[dict] | None:
            if self.process.poll() is not None and len(self.actions(action, **fields)) < count:
                raise AssertionError(f"relay exited ({self.process.returncode}): {self.stderr()}")
            found = self.actions(action, **fields)
            return found if len(found) >= count else None

        return poll(enough, timeout)

    def wait_started(self) -> dict[str, int]:
        """The listening port of every route, once all have started."""
        names = _route_names(self.config_path)
        started = self.wait_for("start", count=len(names))
        return {e["route"]: int(e["listen"].rsplit(":", 1)[1]) for e in started}

    def stderr(self) -> str:
        if self.process.poll() is None:
            return ""
        assert self.process.stderr is not None
        return self.process.stderr.read()

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss(self) -> int:
        """Resident memory in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self, timeout: float = DEADLINE) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def _route_names(config_path: Path) -> list[str]:
    import yaml

    return list(yaml.safe_load(config_path.read_text())["routes"])


def run_twistd(config_path: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run twistd to completion (for configurations that must not start)."""
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "--logger=streamrelay.events.json_observer",
         "streamrelay", "--config", str(config_path)],
        capture_output=True, text=True, timeout=timeout, cwd=config_path.parent,
    )


class Target:
    """
    An asyncio TCP server on 127.0.0.1 in its own thread.  C{handler} is a
    coroutine C{(reader, writer)}; the default echoes until EOF, then closes.
    """

    def __init__(self, handler: Callable | None = None, host: str = "127.0.0.1") -> None:
        self.handler = handler or echo
        self.host = host
        self.open_connections = 0
        self.accepted = 0
        self.peers: list[tuple] = []
        self.tasks: set[asyncio.Task] = set()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait(DEADLINE)
        self.port: int = self.server.sockets[0].getsockname()[1]

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, self.host, 0, limit=1 << 20)
        )
        started.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())
        self.open_connections += 1
        self.accepted += 1
        self.peers.append(writer.get_extra_info("peername"))
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.open_connections -= 1
            self.tasks.discard(asyncio.current_task())

    def close(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self.thread.join(DEADLINE)
        self.loop.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()


def connect(port: int, host: str = "127.0.0.1", timeout: float = DEADLINE) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise AssertionError(f"EOF with {remaining} of {size} bytes missing")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def recv_all(sock: socket.socket) -> bytes:
    """Everything until EOF."""
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


#: Fields every L{tcp_route} gets unless the caller sets them; the
#: C{relay_paths} fixture (conftest.py) switches C{splice} per module run.
ROUTE_DEFAULTS: dict[str, object] = {"splice": "false"}


def tcp_route(target_port: int, name: str, **fields: object) -> str:
    """A tcp4 route on 127.0.0.1 relaying to C{target_port} on 127.0.0.1."""
    extra = "".join(f"    {k}: {v}\n" for k, v in {**ROUTE_DEFAULTS, **fields}.items())
    return (
        f"  {name}:\n    scheme: tcp4\n    bind: 127.0.0.1\n    host: 127.0.0.1\n"
        f"    port: ':{target_port}'\n{extra}"
    )


def connect_from(source: str, port: int) -> socket.socket:
    """A connection to 127.0.0.1:C{port} from the loopback address C{source}."""
    return socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(source, 0))


def write_config(directory: Path, text: str, name: str = "routes.yml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


class HeaderTarget(Target):
    """A target that reads a PROXY header, records it, then echoes."""

    def __init__(self, reply: bytes | None = None) -> None:
        self.headers: list[ProxyInfo] = []
        self.reply = reply
        super().__init__(self.handle)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = b""
        while (parsed := parse(received)) is None:
            data = await reader.read(4096)
            if not data:
                return
            received += data
        info, length = parsed
        self.headers.append(info)
        if self.reply is not None:
            writer.write(self.reply)
            await writer.drain()
            return
        writer.write(received[length:])
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


needs_haproxy = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")


class HAProxy:
    """An C{haproxy -db} process with the configuration C{body} (after global and defaults)."""

    @classmethod
    def in_front(cls, directory: Path, port: int, send_proxy: str = "send-proxy-v2") -> HAProxy:
        """
        HAProxy in TCP mode in front of 127.0.0.1:C{port}, sending a PROXY
        header (C{send_proxy}); its own port is C{front}, already listening.
        """
        front = free_port()
        body = (
            f"frontend fe\n  mode tcp\n  bind 127.0.0.1:{front}\n  default_backend be\n"
            f"backend be\n  mode tcp\n  server relay 127.0.0.1:{port} {send_proxy}\n"
        )
        haproxy = cls(directory, body)
        haproxy.front = front
        haproxy.wait_listening(front)
        return haproxy

    front = 0

    def __init__(self, directory: Path, body: str) -> None:
        path = directory / "haproxy.cfg"
        path.write_text(
            "global\n  log stdout format raw local0\n"
            "defaults\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n" + body
        )
        self.process = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def wait_listening(self, port: int) -> None:
        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                assert self.process.poll() is None, self.process.stdout.read()  # type: ignore[union-attr]
                return False

        poll(up)

    def __enter__(self) -> HAProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(15)
        self.process.stdout.close()  # type: ignore[union-attr]
