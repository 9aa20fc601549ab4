"""The async endpoints of the public listener (SPEC §10), over `AsyncService`.

`async_predict` / `async_run_remote` (submit), `async_queue_status`, and `/async_request/<id>`
(GET status, DELETE cancel) with `/async_request/<id>/result`. Routing, auth and residency were
decided by `resolve` already; this turns the call into a service operation and answers it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from gateway.asyncq import webhook
from gateway.asyncq.request import MAX_SUBMIT_BYTES, parse_submit, view
from gateway.errors import ClientError, Conflict, GatewayError, NotImplementedYet, PayloadTooLarge
from gateway.routing.resolve import RequestLookup, Route

if TYPE_CHECKING:
    from gateway.asyncq.service import AsyncService
    from gateway.http.server import Request


async def answer(service: AsyncService | None, req: Request, route: Route | RequestLookup, request_id: str) -> int:
    """Answer one async call on `req`; the status sent."""
    rid = (("x-baseten-request-id", request_id),)
    try:
        if service is None:
            raise NotImplementedYet("async inference is not enabled on this gateway")
        status, body, headers = await _operate(service, req, route, request_id)
    except GatewayError as error:
        req.conn.send_error(error, rid)
        return error.status
    req.conn.send_simple(status, body, headers or rid)
    return status


async def _operate(
    service: AsyncService, req: Request, route: Route | RequestLookup, request_id: str
) -> tuple[int, bytes, tuple]:
    if isinstance(route, RequestLookup):
        if req.method == "DELETE":
            return 200, _json(await service.cancel(route)), ()
        _, stored = await service.lookup(route)
        if route.endpoint == "async_request":
            return 200, _json(view(stored)), ()
        if stored.result is None:  # not run yet, or it failed: the status says which
            raise Conflict(
                f"async request '{stored.request_id}' has no result ({stored.status}); see GET /async_request/<id>"
            )
        return 200, stored.result, (("x-baseten-request-id", stored.request_id),)
    if route.action == "async_status":
        return 200, _json(await service.queue_status(route)), ()
    if req.content_length is not None and req.content_length > MAX_SUBMIT_BYTES:
        raise PayloadTooLarge(f"an async request body may be at most 256 KiB ({MAX_SUBMIT_BYTES} bytes)")
    if not req.has_body:
        raise ClientError("the async request body must be a JSON object with 'model_input'")
    body = await req.body.read_all(MAX_SUBMIT_BYTES)
    allowed = service.state.table.gateway.async_settings.webhook_allowed_hosts  # host_key form (routing.build)
    submit = parse_submit(body, lambda url: webhook.url_problem(url, allowed))
    await service.submit(route, submit, request_id, req.routing_key or route.api_key.name)
    return 201, _json({"request_id": request_id}), ()


def _json(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()
