"""
streamrelay: a layer-4 TCP and UDP relay for Twisted.

The public API, for C{.tac} files and programs that embed the relay::

    from twisted.application.service import Application
    from streamrelay import load_config, make_service

    application = Application("streamrelay")
    make_service(load_config("routes.yml")).setServiceParent(application)

C{RelayService.reload(config)} applies a new configuration in place (what
SIGHUP does under twistd).
"""

from .config import Config, ConfigError, RouteConfig, load_config, parse_config
from .hooks import ConnectionContext, Hooks, Refused
from .service import RelayService, ReloadResult, make_service

__all__ = [
    "Config",
    "ConfigError",
    "ConnectionContext",
    "Hooks",
    "Refused",
    "RelayService",
    "ReloadResult",
    "RouteConfig",
    "load_config",
    "make_service",
    "parse_config",
]
