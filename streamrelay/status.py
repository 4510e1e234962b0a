"""
The status endpoint (work in progress): metrics, the status page and its
JSON, and health, served by twisted.web on the configuration's C{status}
listen address.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.application.service import Service

from .config import StatusConfig
from .interfaces import IRelayReactor

if TYPE_CHECKING:
    from .service import RelayService

__all__ = ["StatusService"]


class StatusService(Service):
    """Serves what the relay's routes know about themselves."""

    name = "status"

    def __init__(self, config: StatusConfig, relay: RelayService, reactor: IRelayReactor) -> None:
        self.config = config
        self.relay = relay
        self.reactor = reactor
