"""
A route's several targets (C{targets}): the L{Balancer} that picks one per
TCP connection or UDP session, the L{HealthChecker} that marks them up and
down, and the DNS names behind them.

A target given by name is every address its name resolves to, followed in
the background through the process's L{DNSCache}: a changed answer changes
the balancer's targets (a target whose address stays keeps its state) and
the checks.  The pool is L{ready} once every name has had its first answer;
a connection that comes earlier waits for it.  Transitions are logged with
the route's events: C{target-down}/C{target-up} (active checks),
C{target-failed}/C{target-recovered} (passive: failed dials), and
C{targets} when the list changes.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred, DeferredList, succeed

from .addresses import join_host_port
from .balance import Balancer, Target, TargetSpec
from .config import RouteConfig
from .dnscache import DNSCache
from .events import RouteEvents
from .health import HealthChecker
from .interfaces import IRelayReactor

__all__ = ["TargetPool"]


class TargetPool:
    """The targets of one route, kept across reloads that leave the route in place."""

    def __init__(self, route: RouteConfig, reactor: IRelayReactor, events: RouteEvents, dns: DNSCache) -> None:
        self.reactor = reactor
        self.events = events
        self.dns = dns
        self.route = route
        self.balancer = Balancer((), route.load_balance, clock=reactor.seconds)
        self.checker: HealthChecker | None = None
        #: Each configured target's addresses: the name's latest answer (an IP literal is its own).
        self.answers: list[list[str]] = []
        self.unsubscribe: list[Callable[[], None]] = []
        self.ready: Deferred[None] = succeed(None)
        self.configure(route)

    def configure(self, route: RouteConfig) -> None:
        """Take C{route}'s targets and settings; checks restart only if their settings changed."""
        old = self.route
        self.route = route
        self.balancer.settings = route.load_balance
        if self.checker is None or old.healthcheck != route.healthcheck or old.protocol != route.protocol:
            self.stop_checking()
            if route.healthcheck is not None:
                probe = route.healthcheck.probe(udp=route.protocol == "udp")
                self.checker = HealthChecker(self.reactor, probe, self.health_changed, route.healthcheck)
            else:
                self.unchecked()
        if old.targets != route.targets or old.family != route.family or not self.answers:
            self.follow(route)
        else:
            self.rebuild()

    def follow(self, route: RouteConfig) -> None:
        """
        Follow each target's name; IP literals are their own answer.  Every
        answer the cache already holds is taken before the one rebuild, so a
        reload that keeps a name keeps its targets' state.
        """
        for unsubscribe in self.unsubscribe:
            unsubscribe()
        self.unsubscribe = []
        self.answers = []
        waiting = []
        for index, spec in enumerate(route.targets):
            known = self.dns.addresses(spec.host, route.family)
            self.answers.append(known or [])

            def changed(addresses: list[str], index: int = index) -> None:
                self.answers[index] = addresses
                self.rebuild()

            self.unsubscribe.append(self.dns.subscribe(spec.host, route.family, changed))
            if known is None:  # the first answer reaches changed(); the cache logs a name without one (dns-none)
                waiting.append(self.dns.resolve(spec.host, route.family).addErrback(lambda _: None))
        self.ready = DeferredList(waiting).addCallback(lambda _: None) if waiting else succeed(None)
        self.rebuild()

    def when_ready(self) -> Deferred[None]:
        """
        A Deferred of the caller's own that fires once every name has its
        first answer: cancelling it leaves C{ready} (shared) alone.
        """
        waiting: Deferred[None] = Deferred()
        self.ready.addCallback(lambda _: None if waiting.called else waiting.callback(None))
        return waiting

    def rebuild(self) -> None:
        """The balancer's (and the checks') targets from the answers in hand."""
        specs = [
            TargetSpec(address, spec.port, spec.weight, spec.backup)
            for spec, addresses in zip(self.route.targets, self.answers) for address in addresses
        ]
        changes = self.balancer.set_targets(specs)
        if changes.added or changes.removed:
            self.events.info(
                "targets", added=", ".join(_names(changes.added)), removed=", ".join(_names(changes.removed)),
                targets=", ".join(_names(self.balancer.targets)),
            )
        if self.checker is not None:
            self.checker.set_targets(self.balancer.targets)

    def unchecked(self) -> None:
        """Without active checks every target counts as up: those they had marked down come back."""
        for target in self.balancer.targets:
            if not target.up:
                target.up = True
                self.health_changed(target, True, "healthcheck removed")

    # -- choosing, and what the relay reports

    def pick(self, client_host: str, exclude: list[Target]) -> Target | None:
        """A target for a new pair or session (counted as active until L{done})."""
        target = self.balancer.pick(client_host, exclude)
        if target is not None:
            self.balancer.connected(target)
        return target

    def failed(self, target: Target, reason: str) -> None:
        """A dial to C{target} failed: it no longer counts as active, and may be out for C{fail_timeout}."""
        self.balancer.closed(target)
        if self.balancer.failed(target, reason):
            self.events.warn(
                "target-failed", target=_name(target), reason=reason,
                fail_timeout=self.balancer.settings.fail_timeout,
            )

    def succeeded(self, target: Target) -> None:
        if self.balancer.succeeded(target):
            self.events.info("target-recovered", target=_name(target))

    def done(self, target: Target) -> None:
        """A pair or session that reached C{target} has ended."""
        self.balancer.closed(target)

    def health_changed(self, target: Target, up: bool, reason: str) -> None:
        if up:
            self.events.info("target-up", target=_name(target), reason=reason)
        else:
            self.events.warn("target-down", target=_name(target), reason=reason)

    # -- stopping

    def stop_checking(self) -> Deferred[None]:
        checker, self.checker = self.checker, None
        return checker.stop() if checker is not None else succeed(None)

    def stop(self) -> Deferred[None]:
        """No more checks or DNS answers; fires once no check is in flight."""
        for unsubscribe in self.unsubscribe:
            unsubscribe()
        self.unsubscribe = []
        return self.stop_checking()


def _name(target: Target) -> str:
    return join_host_port(target.host, target.port)


def _names(targets: list[Target] | tuple[Target, ...]) -> list[str]:
    return [_name(target) for target in targets]
