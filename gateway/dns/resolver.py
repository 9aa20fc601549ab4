"""The gateway's DNS resolver for plane and endpoint hosts (SPEC §8, §12 `dns: {nameservers}`).

An asyncio shell around three pure parts: `lookup` (the dnspython boundary, the only code that sees
dnspython), `entries` (the cache policy: fresh, refresh ahead, stale, negative) and `networks` (the
region check). Its own choices, written down for operators:

- IP literals (`10.0.0.7`, `::1`, `[::1]`) are their own answer, and `localhost` and names under
  `.localhost` answer `127.0.0.1`: never a query (RFC 6761 §6.3 asks resolvers not to send
  localhost names to DNS).
- Names are queried as given, fully qualified (no resolv.conf search list), A and AAAA at once;
  the addresses returned are IPv4 first, then IPv6, each in answer order.
- Answers are cached for their TTL clamped to [min_ttl, max_ttl]. A name used during the last
  quarter of its TTL is refreshed in the background, so steady traffic never waits on DNS; a name
  nobody uses is not queried again. One query per name is in flight at a time; concurrent callers
  share it.
- When a query fails (timeout, SERVFAIL, refused, no nameserver), the last answer is served stale
  for up to `stale_seconds` past its TTL (RFC 8767), retried in the background every
  `retry_seconds`; after that the failure is a 503 `model_unavailable` naming the host and the cause.
- Negative answers (NXDOMAIN, no A/AAAA records) are a 503 at once and are cached for their
  RFC 2308 negative TTL clamped to [min_ttl, negative_ttl] (5 s by default): a plane whose record
  is being created is found within seconds, and a flood of calls to a missing name costs one query
  per name per negative TTL. A negative answer replaces a cached address answer (the name is gone:
  it is not a failure to ride out with stale data).
- A failure with no answer to fall back on is remembered for `retry_seconds`: callers in that
  window get the 503 at once instead of each waiting for another timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Literal

from gateway.dns.entries import Entry, Use, answered, clamp, combine_addresses, denied, failed, order_services, plan
from gateway.dns.lookup import Failed, Lookup, Negative, Outcome, Records
from gateway.dns.networks import allowed
from gateway.errors import NoAddress
from gateway.metrics import Metrics

log = logging.getLogger("gateway.dns")

Kind = Literal["addresses", "srv"]
LOCALHOST = ("127.0.0.1",)
_MEMO_LIMIT = 4096  # static answers and warning marks kept per resolver before pruning


class Resolver:
    """Resolves plane and endpoint hosts; see the module docstring for the policy.

    `nameservers`: `IP[:port]` strings (IPv6 as `[addr]:port` or a bare address); empty = the system's
    configuration (`resolv_conf`, default /etc/resolv.conf). `clock` is injectable for tests (it must be
    monotonic seconds); `timeout` bounds one query (all its retries) in real time.
    """

    def __init__(
        self,
        nameservers: tuple[str, ...] = (),
        *,
        metrics: Metrics | None = None,
        stale_seconds: float = 30.0,
        min_ttl: float = 1.0,
        max_ttl: float = 300.0,
        negative_ttl: float = 5.0,
        retry_seconds: float = 1.0,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        resolv_conf: str | None = None,
    ) -> None:
        _check(min_ttl > 0, f"min_ttl must be > 0, got {min_ttl}")
        _check(max_ttl >= min_ttl, f"max_ttl ({max_ttl}) must be >= min_ttl ({min_ttl})")
        _check(negative_ttl >= min_ttl, f"negative_ttl ({negative_ttl}) must be >= min_ttl ({min_ttl})")
        _check(stale_seconds >= 0, f"stale_seconds must be >= 0, got {stale_seconds}")
        _check(retry_seconds >= 0, f"retry_seconds must be >= 0, got {retry_seconds}")
        _check(timeout > 0, f"timeout must be > 0, got {timeout}")
        self._lookup = Lookup(tuple(nameservers), timeout=timeout, resolv_conf=resolv_conf)
        self._metrics = metrics
        self._stale_seconds = stale_seconds
        self._min_ttl, self._max_ttl, self._negative_ttl = min_ttl, max_ttl, negative_ttl
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._static: dict[str, tuple[str, ...]] = {}  # host as given -> literal / localhost answer
        self._cache: dict[Kind, dict[str, Entry]] = {"addresses": {}, "srv": {}}
        self._addresses = self._cache["addresses"]
        self._inflight: dict[tuple[Kind, str], asyncio.Task[None]] = {}
        self._warned: dict[tuple[str, str], float] = {}  # (host, refused address) -> warn again after
        self._closed = False
        if self._lookup.config_error:
            log.warning("DNS: %s; only IP literals and localhost will resolve", self._lookup.config_error)

    # -- public API ---------------------------------------------------------------------------------

    async def resolve(self, host: str) -> tuple[str, ...]:
        """The addresses of `host` (non-empty), or NoAddress (503).

        IP literals return themselves (normalized, unbracketed) and localhost names `("127.0.0.1",)`,
        without a query. Names: cached answer, a shared query, or a stale answer while the resolver
        fails (module docstring). Case and one trailing dot are ignored.
        """
        static = self._static.get(host)
        if static is not None:
            return static
        entry = self._addresses.get(host)
        if entry is not None and entry.value and self._clock() < entry.refresh_at:
            return entry.value  # the hot path: one dict lookup and a clock read
        name = host.lower().removesuffix(".")
        static = self._static_of(host, name)
        if static is not None:
            return static
        value: tuple[str, ...] = await self._answer("addresses", name)
        return value

    async def resolve_srv(self, name: str) -> tuple[tuple[str, int], ...]:
        """Replica discovery: `_service._proto.name` -> (target host, port) pairs, non-empty.

        Ordered by priority (lowest first), then weight (heaviest first); targets with "." dropped
        (RFC 2782). Cached, refreshed and served stale like `resolve`; NXDOMAIN, no SRV records or only
        "." targets -> NoAddress. Targets are host names: resolve them with `resolve`.
        """
        value: tuple[tuple[str, int], ...] = await self._answer("srv", name.lower().removesuffix("."))
        return value

    def srv_recheck_in(self, name: str) -> float:
        """Seconds until asking `resolve_srv(name)` again may give another answer (replica discovery).

        The rest of the answer's TTL (positive or negative), or `retry_seconds` after a failure, so a
        discovery loop follows TTLs and retries a failing resolver at the resolver's own pace; never
        less than `min_ttl`.
        """
        entry = self._cache["srv"].get(name.lower().removesuffix("."))
        if entry is None or entry.failure is not None:
            return max(self._retry_seconds, self._min_ttl)
        return max(entry.expires - self._clock(), self._min_ttl)

    async def resolve_in_region(self, host: str, region: str, networks: tuple[str, ...]) -> tuple[str, ...]:
        """The addresses of `host`, every one inside `networks` (empty = no restriction), or NoAddress.

        SPEC §8: "every resolved address must lie inside them, otherwise the plane is treated as
        unavailable". An answer with any outside address fails whole (issue 10): keeping the inside
        ones would trust a name whose records someone outside the region controls. Each refused
        address is counted in `gateway_dns_region_violations_total{region, host}` on every call and
        logged at WARNING once per (host, address) per TTL. The check runs on the very tuple
        `resolve` returned, so no refresh or stale answer can slip an outside address through.
        """
        addresses = await self.resolve(host)
        if not networks:
            return addresses
        _, outside = allowed(addresses, networks)
        if outside:
            self._refused(host, region, outside)
            raise NoAddress(
                f"plane host {host!r} resolves to {', '.join(sorted(outside)[:4])}, outside region {region!r} "
                "networks; refusing to connect"
            )
        return addresses

    def peek(self, host: str) -> tuple[str, ...] | None:
        """The answer `resolve(host)` would give now, without waiting: None when nothing is cached.

        A name with no addresses any more (NXDOMAIN) is `()`. Like `resolve`, a name whose TTL is
        nearly over (or past) is refreshed in the background, so pooled connections follow a DNS
        change under steady traffic although no new connection asks for the name (issue 10).
        """
        static = self._static.get(host)
        if static is not None:
            return static
        name = host.lower().removesuffix(".")
        entry = self._addresses.get(name)
        if entry is None:
            return self._static_of(host, name)
        now = self._clock()
        if now >= entry.refresh_at:
            step = plan(entry, now, self._stale_seconds)
            if (
                (step.refresh or step.use is Use.QUERY)
                and not self._closed
                and ("addresses", name) not in self._inflight
            ):
                self._start("addresses", name)
        if entry.negative is not None:
            return ()
        return entry.value or None

    def _static_of(self, host: str, name: str) -> tuple[str, ...] | None:
        """The answer of an IP literal or a localhost name (memoised by `host` as given), else None."""
        static = _static_answer(name)
        if static is not None:
            if len(self._static) >= _MEMO_LIMIT:
                self._static.clear()
            self._static[host] = static
        return static

    def close(self) -> None:
        """Cancel every query in flight (background refreshes included); later queries are refused.

        Callers waiting on a cancelled query get NoAddress; cached answers and IP literals
        keep being served until they would need a query.
        """
        self._closed = True
        tasks = list(self._inflight.values())
        self._inflight.clear()
        for task in tasks:
            task.cancel()

    async def wait_idle(self) -> None:
        """Return once no query is in flight (background refreshes finished): for tests and shutdown."""
        while self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    def __repr__(self) -> str:
        now = self._clock()
        entries = [e for cache in self._cache.values() for e in cache.values()]
        cached = sum(1 for e in entries if (e.value or e.negative is not None) and now < e.expires)
        stale = sum(1 for e in entries if e.value and e.expires <= now < e.expires + self._stale_seconds)
        closed = " | closed" if self._closed else ""
        return f"<Resolver {cached} names cached | {len(self._inflight)} refreshing | {stale} stale{closed}>"

    # -- cache and queries --------------------------------------------------------------------------

    async def _answer(self, kind: Kind, name: str) -> Any:
        cache = self._cache[kind]
        step = plan(cache.get(name), self._clock(), self._stale_seconds)
        if step.refresh and not self._closed and (kind, name) not in self._inflight:
            self._start(kind, name)
        if step.use is Use.QUERY:
            await self._join(kind, name)
            step = plan(cache.get(name), self._clock(), self._stale_seconds, may_query=False)
        entry = cache.get(name)
        if step.use is Use.ERROR or entry is None:
            raise NoAddress(self._error_message(kind, name, entry))
        if step.use is Use.STALE:
            self._count("stale_served")
        return entry.value

    async def _join(self, kind: Kind, name: str) -> None:
        """Wait for the query of (kind, name) in flight, starting it if there is none."""
        if self._closed:
            raise NoAddress(f"DNS resolver is closed; cannot resolve {name!r}")
        task = self._inflight.get((kind, name)) or self._start(kind, name)
        try:
            await asyncio.shield(task)  # one caller giving up must not cancel the others' query
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                raise NoAddress(f"DNS resolver is closed; cannot resolve {name!r}") from None
            raise

    def _start(self, kind: Kind, name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._query(kind, name), name=f"dns {kind} {name}")
        self._inflight[(kind, name)] = task
        task.add_done_callback(_log_crash)
        return task

    async def _query(self, kind: Kind, name: str) -> None:
        try:
            if kind == "addresses":
                a, aaaa = await asyncio.gather(self._lookup.query(name, "A"), self._lookup.query(name, "AAAA"))
                outcome = combine_addresses(a, aaaa)
                if isinstance(outcome, Records) and (isinstance(a, Failed) or isinstance(aaaa, Failed)):
                    failure = a if isinstance(a, Failed) else aaaa
                    log.info("DNS: %r answered one address family only; the other failed: %s", name, failure)
            else:
                outcome = order_services(await self._lookup.query(name, "SRV"))
            self._store(kind, name, outcome)
        finally:
            if self._inflight.get((kind, name)) is asyncio.current_task():
                del self._inflight[(kind, name)]

    def _store(self, kind: Kind, name: str, outcome: Outcome) -> None:
        cache, now = self._cache[kind], self._clock()
        previous = cache.get(name)
        if isinstance(outcome, Records):
            cache[name] = answered(outcome.values, clamp(outcome.ttl, self._min_ttl, self._max_ttl), now)
            self._count("ok")
            if previous is not None and previous.failure is not None:
                log.info("DNS: %r resolves again after failing (%s)", name, previous.failure)
        elif isinstance(outcome, Negative):
            cache[name] = denied(outcome.reason, clamp(outcome.ttl, self._min_ttl, self._negative_ttl), now)
            self._count("not_found")
            if previous is not None and previous.value:
                log.warning("DNS: %r no longer resolves (%s); dropping its cached answer", name, outcome.reason)
        else:
            cache[name] = failed(previous, outcome.reason, now, self._retry_seconds)
            self._count("failed")
            first = previous is None or previous.failure is None
            level = logging.WARNING if first else logging.DEBUG
            if previous is not None and previous.value:
                until = previous.expires + self._stale_seconds - now
                log.log(level, "DNS lookup of %r failed: %s; its last answer may be served for %.1fs more",
                        name, outcome.reason, max(until, 0.0))  # fmt: skip
            else:
                log.log(level, "DNS lookup of %r failed: %s", name, outcome.reason)
        if previous is None and len(cache) > _MEMO_LIMIT:
            self._prune(cache, now)

    def _prune(self, cache: dict[str, Entry], now: float) -> None:
        """Drop entries that can serve nothing any more (dead answers, expired negatives and failures)."""
        for name, entry in list(cache.items()):
            if max(entry.expires + (self._stale_seconds if entry.value else 0.0), entry.retry_at) <= now:
                del cache[name]

    def _error_message(self, kind: Kind, name: str, entry: Entry | None) -> str:
        what = f"plane host {name!r}" if kind == "addresses" else f"service {name!r}"
        if entry is None:
            return f"DNS lookup of {what} was abandoned"
        if entry.negative is not None:
            return f"{what} does not resolve: {entry.negative}"
        if entry.value:
            return (
                f"DNS lookup of {what} failed: {entry.failure}; its last answer expired more than "
                f"{self._stale_seconds:g}s ago"
            )
        return f"DNS lookup of {what} failed: {entry.failure}"

    # -- region enforcement ---------------------------------------------------------------------------

    def _refused(self, host: str, region: str, outside: tuple[str, ...]) -> None:
        now = self._clock()
        entry = self._addresses.get(host.lower().removesuffix("."))
        ttl = entry.ttl if entry is not None and entry.value else self._max_ttl
        if len(self._warned) >= _MEMO_LIMIT:
            self._warned = {key: until for key, until in self._warned.items() if until > now}
        for address in outside:
            if self._metrics is not None:
                self._metrics.dns_region_violations.inc((region, host))
            if self._warned.get((host, address), -math.inf) <= now:
                self._warned[(host, address)] = now + ttl
                log.warning(
                    "plane host %r resolved to %s, outside region %r networks; address refused (SPEC §8)",
                    host, address, region,
                )  # fmt: skip

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.dns_lookups.inc((result,))


def _static_answer(name: str) -> tuple[str, ...] | None:
    """The answer for an IP literal or a localhost name, or None for a name to query."""
    if name == "localhost" or name.endswith(".localhost"):
        return LOCALHOST
    text = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        return (str(ipaddress.ip_address(text)),)
    except ValueError:
        return None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _log_crash(task: asyncio.Task[None]) -> None:
    """Retrieve and log an unexpected exception of a query nobody may be waiting for."""
    if not task.cancelled() and task.exception() is not None:
        log.error("DNS query task %s crashed", task.get_name(), exc_info=task.exception())
