"""What a finished call means for its replica and its metrics, for every protocol (issue 10), pure."""

from __future__ import annotations

from gateway.errors import GatewayError
from gateway.upstream.balance import Outcome

CLIENT_GONE = 499  # nginx's status for a client that closed its connection before the answer


def outcome_of(error: GatewayError | None, status: int) -> Outcome:
    """The replica's outcome of one attempt: only the plane's own faults count towards ejection.

    - an error blamed on the upstream (connect, broken, timeout) is a failure, as is a 5xx the
      plane answered itself;
    - a client's fault (413 mid-upload, a bad request, the client going away) and the gateway's
      own decisions end the attempt without judging the replica (`cancelled`);
    - anything else the plane answered, 4xx included, is `ok`.
    """
    if error is not None:
        if error.blame != "upstream":
            return "cancelled"
        return "connect_failure" if error.kind == "connect" else "failure"
    if status == CLIENT_GONE:
        return "cancelled"
    return "failure" if status >= 500 else "ok"


def error_kind(error: GatewayError | None) -> str | None:
    """The `kind` label of `gateway_upstream_errors_total` for `error`, or None if it is not the plane's fault."""
    if error is None or error.blame != "upstream":
        return None
    return error.kind or "broken"
