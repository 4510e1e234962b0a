"""
Packaging and entry points: the twistd plugin, the .tac file, the example
configuration and the log formats, each run as a real process.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.harness import DEADLINE, TWISTD, Relay, Target, connect, poll, recv_exactly, write_config

ROOT = Path(__file__).resolve().parent.parent


def test_plugin_is_discoverable() -> None:
    code = (
        "from twisted.plugin import getPlugins\n"
        "from twisted.application.service import IServiceMaker\n"
        "print([p.tapname for p in getPlugins(IServiceMaker)])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert "'streamrelay'" in result.stdout


def test_help_lists_the_options() -> None:
    result = subprocess.run([TWISTD, "streamrelay", "--help"], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0
    assert "--config=" in result.stdout and "--log-level=" in result.stdout


def test_config_is_required() -> None:
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "streamrelay"], capture_output=True, text=True, cwd="/")
    assert result.returncode != 0
    assert "--config FILE is required" in result.stdout + result.stderr


def test_logfile_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    """twistd's log rotation would rename /dev/null and put a regular file in its place."""
    config = write_config(tmp_path, "routes:\n  echo: {scheme: tcp4, bind: 127.0.0.1, port: ':9'}\n")
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "-l", "/dev/null", "streamrelay", "--config", str(config)],
        capture_output=True, text=True, cwd=tmp_path, timeout=DEADLINE,
    )
    assert result.returncode != 0
    assert "--logfile /dev/null is not a regular file" in result.stderr
    assert "--logger=streamrelay.events.text_observer" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_tac_file_runs_the_same_service(tmp_path: Path) -> None:
    with Target() as target:
        config = write_config(
            tmp_path,
            f"routes:\n  echo: {{scheme: tcp4, bind: 127.0.0.1, host: 127.0.0.1, port: ':{target.port}'}}\n",
        )
        process = subprocess.Popen(
            [TWISTD, "-ny", str(ROOT / "etc" / "streamrelay.tac"), "--pidfile=", "--logfile", "relay.log"],
            cwd=tmp_path, env={**os.environ, "STREAMRELAY_CONFIG": str(config)},
        )
        try:
            log = tmp_path / "relay.log"
            line = poll(lambda: next((l for l in _lines(log) if "route echo: tcp listening on" in l), None))
            port = int(line.split("listening on 127.0.0.1:")[1].split(",")[0])
            with connect(port) as sock:
                sock.sendall(b"tac")
                assert recv_exactly(sock, 3) == b"tac"
        finally:
            process.terminate()
            process.wait(15)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_example_config_starts(tmp_path: Path) -> None:
    with Relay(ROOT / "etc" / "routes.yml") as relay:
        assert set(relay.ports) == {"ssh", "web", "dns", "mail"}
        assert relay.ports["ssh"] == 2222
        assert relay.wait_for("status-start")[0]["listen"] == "127.0.0.1:9180"
        with urllib.request.urlopen("http://127.0.0.1:9180/healthz", timeout=15) as answer:
            assert answer.status == 200


@pytest.mark.parametrize("observer", ["twistd", "text_observer"])
def test_text_log_is_readable(tmp_path: Path, observer: str) -> None:
    """twistd's own log file, and the same lines from C{streamrelay.events.text_observer}."""
    with Target() as target:
        config = write_config(
            tmp_path,
            f"routes:\n  echo: {{scheme: tcp4, bind: 127.0.0.1, host: 127.0.0.1, port: ':{target.port}'}}\n",
        )
        log = tmp_path / "text.log"
        if observer == "twistd":
            logging, stdout = ["--logfile", str(log)], None
        else:
            logging, stdout = ["--logger=streamrelay.events.text_observer"], log.open("w")
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", *logging, "streamrelay", "--config", str(config)],
            cwd=tmp_path, stdout=stdout,
        )
        try:
            line = poll(lambda: next((l for l in _lines(log) if "listening on" in l), None))
            port = int(line.split("listening on 127.0.0.1:")[1].split(",")[0])
            with connect(port) as sock:
                sock.sendall(b"x")
                assert recv_exactly(sock, 1) == b"x"
            closed = poll(lambda: next((l for l in _lines(log) if "closed (done)" in l), None))
            assert "1 bytes up, 1 bytes down" in closed and "[streamrelay#info] route echo: #" in closed
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[streamrelay#info\] route echo: .*", closed)
        finally:
            process.terminate()
            process.wait(15)
            if stdout is not None:
                stdout.close()
