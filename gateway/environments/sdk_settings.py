"""An environment's settings as the platform SDK writes them (issue 12), mapped onto the table's fields.

The SDK's `CreateEnvironmentRequest` and `UpdateEnvironmentRequest` carry `autoscaling_settings`
(`UpdateAutoscalingSettings`) and `request_backpressure_settings` (`UpdateRequestBackpressureSettings`).
The SDK sends only the fields its caller set, and an explicit null means "clear"
(docs/baseten-sdk-management-api.md §0.3), so:

- `autoscaling_settings` is a partial update over the environment's current autoscaling: an absent
  field is unchanged, a null one goes back to the table's default (`min_replica` 0, `max_replica` 1,
  no `concurrency_target`). The platform's timing fields have no meaning here: null is accepted,
  a value is refused with the field named (a silent drop would look applied);
- `request_backpressure_settings: {"policy": P}` is the table's `backpressure: {"policy": P}`;
  `{"policy": null}` clears it (the table's default, QUEUE_ON_FULL); `{}` changes nothing;
- the whole object null is refused, as for the older `backpressure` (there is nothing to clear it to).

Pure: the table's own validation (`writer.change`) then checks the values.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import ClientError
from gateway.routing.model import Autoscaling

SCALING_FIELDS = ("min_replica", "max_replica", "concurrency_target")
# UpdateAutoscalingSettings fields for replicas this gateway does not run.
NO_MEANING = ("autoscaling_window", "scale_down_delay", "max_scale_down_rate", "target_in_flight_tokens",
              "target_utilization_percentage")  # fmt: skip
DEFAULT_POLICY = "QUEUE_ON_FULL"  # the table's default: what "no policy" means here
SDK_FIELDS = ("autoscaling_settings", "request_backpressure_settings")


def autoscaling_doc(current: Autoscaling | None, update: Any) -> dict[str, Any]:
    """The table's `autoscaling` after the SDK's partial `update` over `current` (None: a new environment)."""
    if not isinstance(update, dict):
        raise ClientError("'autoscaling_settings' must be an object")
    for key in NO_MEANING:
        if update.get(key) is not None:
            raise ClientError(f"autoscaling_settings.{key}: has no meaning here (the gateway runs no replicas); "
                              "send null or leave it out")  # fmt: skip
    doc: dict[str, Any] = {}
    if current is not None:
        doc = {"min_replica": current.min_replica, "max_replica": current.max_replica}
        if current.concurrency_target is not None:
            doc["concurrency_target"] = current.concurrency_target
    for key, value in update.items():
        if key in NO_MEANING:
            continue
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value  # unknown keys reach the table's validation, which names them
    return doc


def backpressure_doc(update: Any) -> dict[str, Any] | None:
    """The table's `backpressure` for the SDK's `request_backpressure_settings`; None: unchanged."""
    if not isinstance(update, dict):
        raise ClientError("'request_backpressure_settings' must be an object")
    unknown = sorted(set(update) - {"policy"})
    if unknown:
        raise ClientError(f"request_backpressure_settings: unknown field '{unknown[0][:64]}' (expected: policy)")
    if "policy" not in update:
        return None
    return {"policy": DEFAULT_POLICY if update["policy"] is None else update["policy"]}


def settings_changes(body: dict[str, Any], current: Autoscaling | None) -> dict[str, Any]:
    """The table fields (`autoscaling`, `backpressure`) that a create or patch body's SDK keys set."""
    if "request_backpressure_settings" in body and "backpressure" in body:
        raise ClientError("send 'request_backpressure_settings' or the older 'backpressure', not both")
    for key in SDK_FIELDS:
        if key in body and body[key] is None:
            raise ClientError(f"'{key}' cannot be null (leave it out to keep it unchanged)")
    fields: dict[str, Any] = {}
    if "autoscaling_settings" in body:
        fields["autoscaling"] = autoscaling_doc(current, body["autoscaling_settings"])
    if "request_backpressure_settings" in body:
        backpressure = backpressure_doc(body["request_backpressure_settings"])
        if backpressure is not None:
            fields["backpressure"] = backpressure
    return fields
