"""Active health checks of a deployment's replicas (issue 5; table key `health_check`).

Three parts, in the manner of the rest of `gateway.upstream`:

- `observe` (pure): a replica's probe view and one probe result -> the new view and what, if
  anything, to tell its `EndpointSet`. The rules are the table `RULES`:

  | view      | probe | streak reaches its threshold | new view  | `health_result` |
  |-----------|-------|------------------------------|-----------|-----------------|
  | HEALTHY   | pass  | -                            | HEALTHY   | -               |
  | HEALTHY   | fail  | no (`unhealthy_threshold`)   | HEALTHY   | -               |
  | HEALTHY   | fail  | yes                          | UNHEALTHY | unhealthy       |
  | UNHEALTHY | fail  | -                            | UNHEALTHY | unhealthy       |
  | UNHEALTHY | pass  | no (`healthy_threshold`)     | UNHEALTHY | -               |
  | UNHEALTHY | pass  | yes                          | HEALTHY   | healthy         |

  Every failed probe of an UNHEALTHY replica is reported: it keeps the ejection going past its
  back-off, and retries an ejection the half-of-the-deployment cap refused once there is room.
  A replica passively ejected (its calls failed) while its probes pass is left to its back-off:
  a passing `/healthz` does not prove that calls succeed.
- `probe` (one `GET path` to one replica, I/O): resolved through the region check, so a probe
  never connects to an address outside the region's networks; the result is one of `RESULTS`.
- `HealthProber` (the loop): every `interval_seconds`, probes every current replica of one
  deployment at once, feeds `observe`, counts `gateway_health_checks_total{model,deployment,result}`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gateway.errors import ConnectFailed, GatewayError, NoAddress
from gateway.metrics import Metrics
from gateway.routing.model import HealthCheck, Upstream
from gateway.upstream.background import BackgroundLoop
from gateway.upstream.balance import Endpoint, EndpointSet

log = logging.getLogger("gateway.health")
OpenStream = Callable[[Upstream], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

HEALTHY_RESULT = "healthy"
# healthy: a 2xx; bad_status: another status or not HTTP; timeout: no status line within timeout_seconds;
# connection_error: refused, reset, TLS failure; no_address: DNS failed or every address is outside the region.
RESULTS = (HEALTHY_RESULT, "bad_status", "timeout", "connection_error", "no_address")
USER_AGENT = "baseten-gateway-health-check"
MAX_STATUS_LINE = 8192


class View(enum.Enum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class ProbeView:
    """What the probes say of one replica: its view and how many probes in a row contradict it."""

    view: View = View.HEALTHY
    streak: int = 0


FRESH = ProbeView()

V = View
# (view, probe passed, streak reaches the threshold) -> (new view, report to the EndpointSet or None)
RULES: Mapping[tuple[View, bool, bool], tuple[View, bool | None]] = MappingProxyType(
    {
        (V.HEALTHY, True, False): (V.HEALTHY, None),
        (V.HEALTHY, True, True): (V.HEALTHY, None),
        (V.HEALTHY, False, False): (V.HEALTHY, None),
        (V.HEALTHY, False, True): (V.UNHEALTHY, False),
        (V.UNHEALTHY, False, False): (V.UNHEALTHY, False),
        (V.UNHEALTHY, False, True): (V.UNHEALTHY, False),
        (V.UNHEALTHY, True, False): (V.UNHEALTHY, None),
        (V.UNHEALTHY, True, True): (V.HEALTHY, True),
    }
)
del V


def observe(state: ProbeView, passed: bool, check: HealthCheck) -> tuple[ProbeView, bool | None]:
    """The view after one probe, and the `health_result` to report (None: nothing). See `RULES`."""
    contradicts = passed is (state.view is View.UNHEALTHY)
    streak = state.streak + 1 if contradicts else 0
    threshold = check.healthy_threshold if state.view is View.UNHEALTHY else check.unhealthy_threshold
    view, report = RULES[state.view, passed, contradicts and streak >= threshold]
    return ProbeView(view, 0 if view is not state.view else streak), report


# -- one probe --------------------------------------------------------------------------------------


def probe_head(up: Upstream, path: str, model_id: str, deployment_id: str) -> bytes:
    """The probe's request: `GET path` with the deployment's identity (SPEC §4 names), no body."""
    return (
        f"GET {path} HTTP/1.1\r\nhost: {up.authority}\r\nuser-agent: {USER_AGENT}\r\n"
        f"x-baseten-model-id: {model_id}\r\nx-baseten-deployment-id: {deployment_id}\r\n"
        f"connection: close\r\n\r\n"
    ).encode("latin-1")


def classify(status_line: bytes) -> str:
    """`HTTP/1.1 204 No Content` -> healthy; any other status, or no HTTP at all -> bad_status."""
    parts = status_line.split(None, 2)
    ok = len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and parts[1].isdigit() and parts[1][:1] == b"2"
    return HEALTHY_RESULT if ok and len(parts[1]) == 3 else "bad_status"


async def probe(up: Upstream, head: bytes, timeout: float, open_stream: OpenStream) -> str:
    """Send `head` to `up` on a fresh connection and judge the status line; one of `RESULTS`.

    `open_stream(up)` opens the connection the way calls are opened (`Connector.open_stream`: the
    table's resolver and the region check); the whole probe, DNS included, ends within `timeout`.
    """
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await open_stream(up)
            except NoAddress:  # DNS found nothing, or an address outside the region
                return "no_address"
            except ConnectFailed:
                return "connection_error"
            except GatewayError:
                return "no_address"
            try:
                writer.write(head)
                line = await reader.readline()
            finally:
                writer.close()
    except TimeoutError:
        return "timeout"
    except (OSError, ValueError, asyncio.IncompleteReadError):  # refused, reset, TLS (an OSError); line too long
        return "connection_error"
    return classify(line)


# -- the loop ---------------------------------------------------------------------------------------

Probe = Callable[[Upstream], Awaitable[str]]


class HealthProber(BackgroundLoop):
    """Probes the replicas of one deployment every `check.interval_seconds` until `stop()`.

    `endpoints()` gives the deployment's current set (it changes with table swaps and discovery);
    `probe(upstream)` runs one probe. `check` may be replaced while running (a table swap changed
    it): the next round uses the new one. Views survive changes for replicas that stay.
    """

    def __init__(
        self, labels: tuple[str, str], check: HealthCheck, endpoints: Callable[[], EndpointSet], probe: Probe,
        metrics: Metrics | None = None,
    ) -> None:  # fmt: skip
        self.labels = labels  # (model, deployment)
        self.check = check
        self._endpoints = endpoints
        self._probe = probe
        self._metrics = metrics
        self.views: dict[Endpoint, ProbeView] = {}
        self.rounds = 0

    def start(self) -> HealthProber:
        self._begin(f"health checks {self.labels[0]}/{self.labels[1]}")
        return self

    def __repr__(self) -> str:
        unhealthy = sum(1 for v in self.views.values() if v.view is View.UNHEALTHY)
        state = "running" if self.running else "stopped"
        return (
            f"<HealthProber {self.labels[0]}/{self.labels[1]} {state} | GET {self.check.path} every "
            f"{self.check.interval_seconds:g}s | {len(self.views)} replicas, {unhealthy} unhealthy | "
            f"{self.rounds} rounds>"
        )

    async def _run(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self.check.interval_seconds)

    async def probe_all(self) -> None:
        """One round: probe every current replica at once, then apply the results."""
        endpoints = self._endpoints().endpoints
        results = await asyncio.gather(*(self._probe(ep.upstream) for ep in endpoints), return_exceptions=True)
        current = self._endpoints()
        for ep, result in zip(endpoints, results):
            if isinstance(result, BaseException):
                log.error("health check of %s crashed", ep.upstream.base_url, exc_info=result)
                result = "connection_error"
            self._apply(current, ep, result)
        members = set(current.endpoints)
        self.views = {ep: view for ep, view in self.views.items() if ep in members}
        self.rounds += 1

    def _apply(self, endpoints: EndpointSet, ep: Endpoint, result: str) -> None:
        if self._metrics is not None:
            self._metrics.health_checks.inc(self.labels + (result,))
        before = self.views.get(ep, FRESH)
        after, report = observe(before, result == HEALTHY_RESULT, self.check)
        self.views[ep] = after
        if after.view is not before.view:
            level = logging.WARNING if after.view is View.UNHEALTHY else logging.INFO
            log.log(level, "replica %s of %s/%s is %s by its health checks (last: %s)", ep.upstream.base_url,
                    self.labels[0], self.labels[1], after.view.value, result)  # fmt: skip
        if report is not None:
            endpoints.health_result(ep, report)
