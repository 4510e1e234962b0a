"""
The twistd plugin's command line: C{twistd streamrelay --config FILE}.

The route file is loaded and validated while the options are parsed, so a
bad file stops twistd before it daemonizes or binds anything.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from .config import ConfigError, load_config
from .events import LEVELS, set_log_level
from .service import make_service

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    synopsis = "--config FILE [--log-level LEVEL]"
    longdesc = "Relay the TCP and UDP routes of a YAML route file."

    optParameters = [
        ["config", "c", None, "YAML route file to run (required)."],
        ["log-level", None, "info", "Lowest level logged: " + ", ".join(LEVELS) + "."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        if self["log-level"] not in LEVELS:
            raise usage.UsageError("--log-level must be one of " + ", ".join(LEVELS))
        try:
            self["routes"] = load_config(self["config"])
        except ConfigError as e:
            raise SystemExit(f"streamrelay: {e}") from None


def makeService(options: Options) -> IService:
    set_log_level(options["log-level"])
    return make_service(options["routes"])
