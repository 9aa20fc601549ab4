"""SRV replica discovery (issue 5; SPEC §3 `endpoints_srv`, §8): a deployment's replicas are the
targets of an SRV name, followed as its records and TTLs change.

`srv_upstreams` is the pure part (SRV targets -> replica addresses). `SrvDiscovery` is the shell: one
task per discovered deployment that asks the gateway's `Resolver` (TTL cache, stale answers while the
resolver fails, negative answers), waits out the answer's TTL, asks again, and hands every answer
that differs from the last to its owner (`gateway.upstream.replicas`), which folds it into the
deployment's `EndpointSet` with `updated()` so replicas that stay keep their health state.

- Targets are host names; they are resolved (A/AAAA) and checked against the region's `networks`
  when a connection is made, like any endpoint host (fail closed, counted).
- Scheme and TLS settings come from the deployment's plane (`url`, `tls`).
- No answer (the first query failed, the stale window passed, NXDOMAIN, no SRV records, only
  "." targets): the deployment has no replicas and calls get 503 `model_unavailable`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Literal

from gateway.dns import Resolver
from gateway.errors import ModelUnavailable
from gateway.routing.model import Upstream
from gateway.upstream.background import BackgroundLoop

log = logging.getLogger("gateway.discovery")

# (replica addresses, why there are none): exactly one of the two is non-empty.
Answer = tuple[tuple[Upstream, ...], str | None]
OnAnswer = Callable[[tuple[Upstream, ...], str | None], None]


def srv_upstreams(targets: Iterable[tuple[str, int]], scheme: Literal["http", "https"]) -> tuple[Upstream, ...]:
    """SRV (target, port) pairs -> replica addresses, in answer order (priority, then weight), no duplicates."""
    return tuple(dict.fromkeys(Upstream(scheme, host, port) for host, port in targets))


class SrvDiscovery(BackgroundLoop):
    """Follows one SRV name for one deployment until `stop()`; `on_answer` gets every change.

    `resolver` is called for each query, so a resolver replaced by a table swap (new nameservers) is
    used from the next query on. `on_answer` is called on the event loop, never concurrently.
    """

    def __init__(
        self, name: str, scheme: Literal["http", "https"], resolver: Callable[[], Resolver], on_answer: OnAnswer,
        *, what: str,
    ) -> None:  # fmt: skip
        self.name = name
        self.scheme = scheme
        self.what = what  # "deployment 'v1' of model 'abc123'", for messages
        self._resolver = resolver
        self._on_answer = on_answer
        self.last: Answer | None = None
        self.answers = 0  # answers handed over (changes only), for tests and reprs

    def start(self) -> SrvDiscovery:
        self._begin(f"srv discovery {self.name}")
        return self

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        if self.last is None:
            return f"<SrvDiscovery {self.name} {state} | no answer yet>"
        upstreams, reason = self.last
        found = ", ".join(u.authority for u in upstreams) if upstreams else f"none ({reason})"
        return f"<SrvDiscovery {self.name} {state} | {found}>"

    async def _run(self) -> None:
        while True:
            resolver = self._resolver()
            answer = await self._ask(resolver)
            if answer is None:  # the resolver was replaced while we asked: ask the new one at once
                continue
            self._hand_over(answer)
            await asyncio.sleep(resolver.srv_recheck_in(self.name))

    async def _ask(self, resolver: Resolver) -> Answer | None:
        try:
            targets = await resolver.resolve_srv(self.name)
        except ModelUnavailable as error:
            if resolver is not self._resolver():
                return None
            return (), f"no replicas of {self.what}: SRV {error.message}"
        return srv_upstreams(targets, self.scheme), None

    def _hand_over(self, answer: Answer) -> None:
        if answer == self.last:
            return
        upstreams, reason = answer
        if upstreams:
            log.info("%s: SRV %r lists %d replica(s): %s", self.what, self.name, len(upstreams),
                     ", ".join(u.authority for u in upstreams))  # fmt: skip
        else:
            log.warning("%s", reason)
        self.last = answer
        self.answers += 1
        self._on_answer(upstreams, reason)
