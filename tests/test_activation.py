"""
Socket activation for real: C{systemd-socket-activate} (Debian's systemd
package) listens, and on the first client starts C{twistd streamrelay} with
the socket, named like the route (C{LISTEN_FDNAMES}), as systemd would; and
the unit files shipped in C{etc/} against the example routes.
"""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from streamrelay import load_config
from tests.harness import Relay, Target, poll, recv_exactly, write_config
from tests.test_reuse_port import free_port
from tests.test_udp import UDPEcho

ACTIVATE = shutil.which("systemd-socket-activate") or "/lib/systemd/systemd-socket-activate"
ETC = Path(__file__).parent.parent / "etc"


class ActivatedRelay(Relay):
    """A L{Relay} that C{systemd-socket-activate} starts on the first client, with C{options} for it."""

    def __init__(self, config_path: Path, *options: str) -> None:
        # systemd-socket-activate passes its child a fresh environment.
        environment = ["--setenv=PYTHONPATH"] if "PYTHONPATH" in os.environ else []
        super().__init__(config_path, wait=False, prefix=(ACTIVATE, *environment, *options))


def taken(kind: socket.SocketKind, port: int) -> bool:
    """Whether something listens on 127.0.0.1:C{port} (TCP) or is bound there (UDP)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def route(name: str, scheme: str, listen: int, target: int) -> str:
    return f"  {name}: {{scheme: {scheme}, bind: 127.0.0.1, host: 127.0.0.1, port: '{listen}:{target}'}}\n"


def test_a_tcp_route_takes_its_socket_from_systemd(tmp_path: Path) -> None:
    port, own = free_port(), free_port()
    with Target() as target:
        path = write_config(tmp_path, "routes:\n" + route("ssh", "tcp4", own, target.port) + route("other", "tcp4", 0, target.port))
        with ActivatedRelay(path, "-l", f"127.0.0.1:{port}", "--fdname=ssh") as relay:
            poll(lambda: taken(socket.SOCK_STREAM, port))
            with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:  # starts twistd
                sock.sendall(b"through systemd's socket")
                assert recv_exactly(sock, 24) == b"through systemd's socket"
            relay.wait_started()
            [start] = relay.actions("start", route="ssh")
            assert (start["inherited"], start["listen"]) == (True, f"127.0.0.1:{port}")
            assert relay.actions("start", route="other")[0]["inherited"] is False  # bound as usual
            assert not taken(socket.SOCK_STREAM, own)  # the route's own port was never bound

            moved = route("ssh", "tcp4", free_port(), target.port) + route("other", "tcp4", 0, target.port)
            path.write_text("routes:\n" + moved)
            relay.process.send_signal(signal.SIGHUP)
            assert relay.wait_for("reload")[0]["changed"] == "ssh (listen_port)"
            [_, again] = relay.actions("start", route="ssh")
            assert (again["inherited"], again["listen"]) == (True, f"127.0.0.1:{port}")  # adopted again
            with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
                sock.sendall(b"still")
                assert recv_exactly(sock, 5) == b"still"


def test_a_udp_route_takes_its_socket_from_systemd(tmp_path: Path) -> None:
    port, own = free_port(), free_port()
    with UDPEcho() as target:
        path = write_config(tmp_path, "routes:\n" + route("dns", "udp4", own, target.port))
        with ActivatedRelay(path, "--datagram", "-l", f"127.0.0.1:{port}", "--fdname=dns") as relay:
            poll(lambda: taken(socket.SOCK_DGRAM, port))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(15)
                sock.connect(("127.0.0.1", port))
                sock.send(b"query")  # starts twistd, which reads it from the adopted socket
                assert sock.recv(100) == b"query"
            [start] = relay.wait_for("start", route="dns")
            assert (start["inherited"], start["listen"]) == (True, f"127.0.0.1:{port}")
            assert not taken(socket.SOCK_DGRAM, own)


def test_a_socket_of_the_wrong_kind_stops_the_start(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, "routes:\n" + route("ssh", "tcp4", 0, 22))
    with ActivatedRelay(path, "--datagram", "-l", f"127.0.0.1:{port}", "--fdname=ssh") as relay:
        poll(lambda: taken(socket.SOCK_DGRAM, port))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"wake up", ("127.0.0.1", port))
        assert relay.process.wait(15) != 0
        assert (
            "route 'ssh': the socket systemd passed as 'ssh' is AF_INET SOCK_DGRAM, which scheme tcp4 cannot use"
            in "".join(relay.lines) + relay.stderr()
        )


def test_the_systemd_endpoint_parser_holds_the_inherited_sockets() -> None:
    """
    Pins L{streamrelay.compat.inherited_sockets}: Twisted's C{systemd:}
    endpoint parser reads C{LISTEN_*} when C{twisted.internet.endpoints} is
    imported and takes them out of the environment.
    """
    script = (
        "import os; os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='2', LISTEN_FDNAMES='ssh:dns')\n"
        "from streamrelay.compat import inherited_sockets\n"
        "print(inherited_sockets(), 'LISTEN_FDS' in os.environ)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True,
                            env={**os.environ, "PYTHONPATH": str(ETC.parent)})
    assert result.stdout == "{'ssh': 3, 'dns': 4} False\n"


def test_the_shipped_socket_units_match_the_example_routes() -> None:
    routes = {route.name: route for route in load_config(str(ETC / "routes.yml")).routes}
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read(ETC / "streamrelay.service")
    units = sorted(path.name for path in ETC.glob("*.socket"))
    assert sorted(service["Service"]["Sockets"].split()) == units == ["streamrelay-dns.socket", "streamrelay.socket"]
    for name in units:
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.read(ETC / name)
        sockets = unit["Socket"]
        route = routes[sockets["FileDescriptorName"]]
        listen = sockets["ListenStream" if route.protocol == "tcp" else "ListenDatagram"]
        assert (listen, sockets["Service"]) == (route.listen, "streamrelay.service")
