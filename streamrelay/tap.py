"""
The twistd plugin's command line: C{twistd streamrelay --config FILE}.

The route file is loaded and validated while the options are parsed, so a
bad file stops twistd before it daemonizes or binds anything.  twistd's own
options are checked here too, where a mistake would do lasting harm.  For the
same reason C{--check} and C{--dump} print and exit from here: twistd has
done nothing yet that needs undoing.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from twisted.application.service import IService
from twisted.python import usage

from .config import Config, ConfigError, load_config
from .dump import report
from .events import LEVELS, set_log_level
from .service import make_service

__all__ = ["Options", "load_routes", "makeService"]


class Options(usage.Options):
    synopsis = "--config FILE [--log-level LEVEL] [--check] [--dump]"
    longdesc = "Relay the TCP and UDP routes of a YAML route file."

    optParameters = [
        ["config", "c", None, "YAML route file to run (required)."],
        ["log-level", None, "info", "Lowest level logged: " + ", ".join(LEVELS) + "."],
    ]
    optFlags = [
        ["check", None, "Validate the route file, print one line per route and exit"
                        " (status 1 and the start's message if invalid); binds nothing."],
        ["dump", None, "Like --check, but print the effective configuration"
                       " (defaults filled in) as YAML."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        if self["log-level"] not in LEVELS:
            raise usage.UsageError("--log-level must be one of " + ", ".join(LEVELS))
        if self.parent is not None:
            _check_logfile(self.parent)
        self["routes"] = load_routes(self["config"])
        if self["check"] or self["dump"]:
            print(report(self["routes"], as_yaml=self["dump"]), end="")
            raise SystemExit(0)


def load_routes(path: str) -> Config:
    """
    The route file at C{path}, or C{SystemExit} with the message (status 1)
    that starting and both checks give alike.
    """
    try:
        return load_config(path)
    except ConfigError as e:
        raise SystemExit(f"streamrelay: {e}") from None


def _check_logfile(twistd: Mapping[str, Any]) -> None:
    """
    Refuse a C{--logfile} that exists and is not a regular file: twistd's
    C{LogFile} "rotates" it after a megabyte by renaming it and creating a
    regular file in its place, which turns C{-l /dev/null} into a broken
    machine.
    """
    path = twistd.get("logfile")
    if path and path != "-" and os.path.exists(path) and not os.path.isfile(path):
        raise SystemExit(
            f"streamrelay: --logfile {path} is not a regular file: twistd's log rotation would"
            " replace it with one. To discard the log, use --logger=streamrelay.events.text_observer"
            " with standard output sent to /dev/null; to log less, use --log-level warn."
        )


def makeService(options: Options) -> IService:
    set_log_level(options["log-level"])
    return make_service(options["routes"])
