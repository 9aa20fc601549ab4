"""The management API with the platform's own SDK (issue 12): models, deployments, environments,
environment create and patch, promote and its controls (pause, resume, cancel, force_cancel,
force_roll_forward), activate/deactivate.

Two layers: the pure views validated by the SDK's pydantic models (every model, deployment and
environment of the example table, and the edge cases), then the real `ManagementClient` against a
running gateway's admin listener, unchanged but for `base_url_override`, with live calls through the
public listener where a change moves traffic.
"""

from __future__ import annotations

import ast
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from baseten.client import ManagementClient
from baseten.client.managementapi import (
    ApiClient,
    CreateEnvironmentRequest,
    Deployment,
    Environment,
    GetModelsDeploymentsParams,
    GetModelsParams,
    Model,
    PromoteToEnvironmentRequest,
    ResponseError,
    UpdateAutoscalingSettings,
    UpdateEnvironmentRequest,
    UpdateEnvironmentResponse,
    UpdatePromotionSettings,
    UpdateRequestBackpressureSettings,
)

from gateway.environments.promote_body import promote_options
from gateway.environments.sdk_settings import settings_changes
from gateway.environments.sdk_views import deployment_view, deployments_view, model_view, models_view
from gateway.environments.views import environment_view
from gateway.errors import ClientError
from gateway.routing.loader import compile_table
from gateway.routing.model import Autoscaling, Table
from tests.support import EXAMPLE, REPO, GatewayProcess, example_doc, running_gateway, wait_for, write_table
from tests.test_environments import AUTH, HOST, TestPlane, table_doc

TOKEN = "sdk-admin-secret"
NOWHERE = "http://127.0.0.1:9"  # nothing here calls a plane


def example_table(doc: dict | None = None) -> Table:
    return compile_table(doc if doc is not None else yaml.safe_load(EXAMPLE.read_text()))


# -- the views, checked by the SDK's own models ---------------------------------------------------


def test_every_model_and_deployment_of_the_example_validates_as_the_sdk_reads_it() -> None:
    table = example_table()
    for model in table.models.values():
        assert Model.model_validate(model_view(model)).id == model.id
        for dep in model.deployments.values():
            parsed = Deployment.model_validate(deployment_view(model, dep))
            assert (parsed.id, parsed.model_id) == (dep.id, model.id)
            assert parsed.created_at.tzinfo is not None


def test_model_view_maps_the_table() -> None:
    model = example_table().models["abc123"]
    assert model_view(model) == {
        "id": "abc123",
        "name": "abc123",
        "created_at": "1970-01-01T00:00:00Z",
        "deployments_count": 5,
        "production_deployment_id": "v1",
        "development_deployment_id": "dev",
        "instance_type_name": "n/a",
        "team_name": "acme",
    }
    other = example_table().models["xyz789"]
    assert (model_view(other)["team_name"], model_view(other)["development_deployment_id"]) == ("globex", None)


@pytest.mark.parametrize(
    ("dep_id", "facts"),
    [
        # v1 serves production, staging and prod-us: production wins (its autoscaling defaults).
        ("v1", {"is_production": True, "environment": "production", "status": "ACTIVE", "active_replica_count": 1}),
        # v2 is only staging's canary: a canary share is not "the environment it serves".
        ("v2", {"is_production": False, "environment": None, "autoscaling_settings": None}),
        ("v3", {"environment": "prod-eu", "region": {"slug": "eu", "display_name": "eu"}}),
        ("dev", {"is_development": True, "is_production": False, "environment": None}),
        (
            "v0",
            {"status": "SCALED_TO_ZERO", "active_replica_count": 0, "request_backpressure_settings": {"policy": None}},
        ),  # fmt: skip
    ],
)
def test_deployment_view_maps_the_table(dep_id: str, facts: dict) -> None:
    model = example_table().models["abc123"]
    view = deployment_view(model, model.deployments[dep_id])
    assert {key: view[key] for key in facts} == facts
    assert (view["name"], view["labels"], view["instance_type_name"]) == (dep_id, {}, None)


def test_settings_come_from_the_environment_served() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    envs = doc["models"]["abc123"]["environments"]
    envs["staging"] = {"deployment": "v2", "autoscaling": {"min_replica": 1, "max_replica": 3, "concurrency_target": 4},
                       "backpressure": {"policy": "REJECT_ON_FULL"}}  # fmt: skip
    model = example_table(doc).models["abc123"]
    view = deployment_view(model, model.deployments["v2"])
    assert view["environment"] == "staging"
    assert view["autoscaling_settings"] == {"min_replica": 1, "max_replica": 3, "concurrency_target": 4,
                                            "autoscaling_window": None, "scale_down_delay": None,
                                            "target_utilization_percentage": None}  # fmt: skip
    assert view["request_backpressure_settings"] == {"policy": "REJECT_ON_FULL"}
    # No concurrency target in the table: 0 (the SDK's field is a required int).
    assert deployment_view(model, model.deployments["v1"])["autoscaling_settings"]["concurrency_target"] == 0


def test_replica_counts_and_statuses() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    deps = doc["models"]["abc123"]["deployments"]
    deps["v2"] = {"plane": "us-east-1", "endpoints": ["http://127.0.0.1:9001", "http://127.0.0.1:9003"]}
    deps["v3"] = {"plane": "eu-west-1", "replicas": 3}
    deps["v9"] = {"plane": "us-east-1", "status": "inactive", "replicas": 3}
    model = example_table(doc).models["abc123"]
    counts = {dep: deployment_view(model, model.deployments[dep])["active_replica_count"] for dep in ("v2", "v3", "v9")}
    assert counts == {"v2": 2, "v3": 3, "v9": 0}
    assert deployment_view(model, model.deployments["v9"])["status"] == "INACTIVE"


def test_list_views_sort_by_id_and_filter_by_name() -> None:
    table = example_table()
    assert [m["id"] for m in models_view(table)["models"]] == sorted(table.models)
    assert [m["id"] for m in models_view(table, "llm7")["models"]] == ["llm7"]
    assert models_view(table, "nope") == {"models": []}
    model = table.models["abc123"]
    assert [d["id"] for d in deployments_view(model)["deployments"]] == ["dev", "v0", "v1", "v2", "v3"]
    assert [d["id"] for d in deployments_view(model, "v3")["deployments"]] == ["v3"]


def test_every_environment_of_the_example_validates_as_the_sdk_reads_it() -> None:
    table = example_table()
    for model in table.models.values():
        for env in model.environments.values():
            parsed = Environment.model_validate(environment_view(model, env, {}))
            assert (parsed.name, parsed.model_id, parsed.traffic_routing) == (env.name, model.id, None)
            current = parsed.current_deployment
            assert (current.id if current else None) == (env.deployment.id if env.deployment else None)


def test_environment_view_with_a_shadow_and_a_running_promotion() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["models"]["abc123"]["environments"]["staging"]["shadow"] = {"deployment": "v3", "percent": 12.5}
    model = example_table(doc).models["abc123"]
    record = {"status": "RAMPING_UP", "percent": 30, "deployment_id": "v0", "error_message": None}
    overlay = {"models": {"abc123": {"environments": {"staging": {"promotion": record}}}}}
    view = environment_view(model, model.environments["staging"], overlay)
    parsed = Environment.model_validate(view)
    assert parsed.candidate_deployment is not None and parsed.candidate_deployment.id == "v0"
    assert parsed.in_progress_promotion is not None
    assert (parsed.in_progress_promotion.status, parsed.in_progress_promotion.percent_traffic_to_new_version) == (
        "RAMPING_UP", 30)  # fmt: skip
    assert view["traffic_routing"] == {"rules": [{
        "id": "shadow", "type": "SHADOW", "targets": [{"model_id": "abc123", "deployment_id": "v3", "environment": None}],
        "percent_traffic": 12, "expires_at": "9999-12-31T23:59:59Z", "sampling_mode": "RANDOM",
        "propagate_client_cancellation": False}]}  # fmt: skip
    # The older §6 keys stay, with the exact share.
    assert view["shadow"] == {"deployment": "v3", "percent": 12.5, "max_body_bytes": 1024 * 1024}
    assert (view["backpressure"], view["request_backpressure_settings"]) == ({"policy": "QUEUE_ON_FULL"},) * 2
    assert view["instance_type"]["id"] == "n/a" and view["autoscaling_schedules"] is None
    assert view["promotion_settings"]["promotion_cleanup_strategy"] == "SCALE_TO_ZERO"


@pytest.mark.parametrize(
    ("body", "cleanup", "ramp"),
    [
        ({}, "SCALE_TO_ZERO", 0),  # the SDK leaves its defaults out: scale down, at once
        ({"scale_down_previous_deployment": True, "preserve_env_instance_type": False}, "SCALE_TO_ZERO", 0),
        ({"scale_down_previous_deployment": False}, "KEEP", 0),
        ({"promotion_settings_override": {"promotion_cleanup_strategy": "DEACTIVATE"}}, "DEACTIVATE", 0),
        (
            {
                "scale_down_previous_deployment": False,
                "promotion_settings_override": {"promotion_cleanup_strategy": "DEACTIVATE"},
            },
            "KEEP",
            0,
        ),  # false wins over the override's strategy
        ({"promotion_settings_override": {"ramp_up_while_promoting": True}}, "SCALE_TO_ZERO", 600),
        (
            {
                "promotion_settings_override": {"ramp_up_while_promoting": True, "ramp_up_duration_seconds": 30},
                "ramp_up_duration_seconds": 5,
            },
            "SCALE_TO_ZERO",
            5,
        ),  # the body's own ramp wins
        ({"promotion_settings_override": None, "environment_settings_update": {"region": None}}, "SCALE_TO_ZERO", 0),
    ],
)
def test_promote_options_take_the_sdk_fields(body: dict, cleanup: str, ramp: float) -> None:
    options = promote_options({"deployment_id": "v2", **body})
    assert (options["cleanup"], options["ramp_up_duration_seconds"]) == (cleanup, ramp)


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"scale_down_previous_deployment": "no"}, "'scale_down_previous_deployment' must be true or false"),
        ({"promotion_settings_override": {"promotion_cleanup_strategy": "BURN"}}, "must be one of SCALE_TO_ZERO"),
        ({"promotion_settings_override": {"colour": 1}}, "unknown field 'promotion_settings_override.colour'"),
        ({"environment_settings_update": {"region": "eu"}}, "'environment_settings_update.region' has no meaning here"),
        ({"environment_settings_update": {"instance_type_id": "1x4"}}, "has no meaning here"),
    ],
)
def test_promote_options_refuse_what_they_cannot_apply(body: dict, text: str) -> None:
    with pytest.raises(ClientError) as error:
        promote_options({"deployment_id": "v2", **body})
    assert text in error.value.message


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, {}),
        # A partial autoscaling update keeps what it leaves out; null goes back to the default.
        ({"autoscaling_settings": {"max_replica": 4}}, {"autoscaling": {"min_replica": 1, "max_replica": 4,
                                                                        "concurrency_target": 2}}),
        ({"autoscaling_settings": {"concurrency_target": None, "autoscaling_window": None}},
         {"autoscaling": {"min_replica": 1, "max_replica": 3}}),
        ({"request_backpressure_settings": {"policy": "REJECT_ON_FULL"}}, {"backpressure": {"policy": "REJECT_ON_FULL"}}),
        ({"request_backpressure_settings": {"policy": None}}, {"backpressure": {"policy": "QUEUE_ON_FULL"}}),
        ({"request_backpressure_settings": {}}, {}),  # absent policy: unchanged
    ],
)  # fmt: skip
def test_sdk_settings_map_onto_the_table(body: dict, fields: dict) -> None:
    assert settings_changes(body, Autoscaling(min_replica=1, max_replica=3, concurrency_target=2)) == fields


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"autoscaling_settings": {"scale_down_delay": 60}}, "autoscaling_settings.scale_down_delay"),
        ({"autoscaling_settings": None}, "cannot be null"),
        ({"request_backpressure_settings": None}, "cannot be null"),
        ({"request_backpressure_settings": {"policy": "X", "size": 3}}, "size"),
        ({"request_backpressure_settings": {}, "backpressure": {}}, "not both"),
    ],
)
def test_sdk_settings_refuse_what_they_cannot_apply(body: dict, text: str) -> None:
    with pytest.raises(ClientError, match=text):
        settings_changes(body, None)


def test_the_gateway_never_imports_the_sdk() -> None:
    # A test dependency only: the gateway's install (the Dockerfile's `pip install .`) does not have it.
    for path in (REPO / "gateway").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("baseten", "pydantic")], path


# -- the real SDK against a running gateway ---------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp: Path = tmp_path_factory.mktemp("sdk")
    gw = GatewayProcess(write_table(tmp / "table.yaml", example_doc(NOWHERE, NOWHERE)), "--admin-token", TOKEN)
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[ManagementClient]:
    with ManagementClient(api_key=TOKEN, base_url_override=gateway.admin_url) as sdk:
        yield sdk


def test_sdk_lists_and_reads_models(client: ManagementClient) -> None:
    models = {m.id: m for m in client.api.get_models().models}
    assert sorted(models) == ["abc123", "llm7", "pipeline1", "xyz789"]
    assert (models["abc123"].production_deployment_id, models["abc123"].development_deployment_id) == ("v1", "dev")
    assert models["xyz789"].team_name == "globex" and models["llm7"].deployments_count == 2
    model = client.api.get_models_model_id(model_id="abc123")
    assert model == models["abc123"]
    assert [m.id for m in client.api.get_models(params=GetModelsParams(name="llm7")).models] == ["llm7"]


def test_sdk_lists_and_reads_deployments(client: ManagementClient) -> None:
    deps = {d.id: d for d in client.api.get_models_deployments(model_id="abc123").deployments}
    assert sorted(deps) == ["dev", "v0", "v1", "v2", "v3"]
    assert {d.id: d.status for d in deps.values()} == {"dev": "ACTIVE", "v0": "SCALED_TO_ZERO", "v1": "ACTIVE",
                                                       "v2": "ACTIVE", "v3": "ACTIVE"}  # fmt: skip
    assert deps["v3"].region is not None and deps["v3"].region.slug == "eu"
    assert deps["v3"].environment == "prod-eu" and deps["v1"].environment == "production"
    params = GetModelsDeploymentsParams(name="v0")
    assert [d.id for d in client.api.get_models_deployments(model_id="abc123", params=params).deployments] == ["v0"]
    v0 = client.api.get_models_deployments_deployment_id(model_id="abc123", deployment_id="v0")
    assert v0 == deps["v0"] and v0.active_replica_count == 0


def test_sdk_production_and_development_shortcuts(client: ManagementClient) -> None:
    production = client.api.get_models_deployments_production(model_id="abc123")
    assert (production.id, production.is_production, production.environment) == ("v1", True, "production")
    assert production.region is not None and production.region.slug == "us"
    development = client.api.get_models_deployments_development(model_id="abc123")
    assert (development.id, development.is_development) == ("dev", True)
    with pytest.raises(ResponseError) as missing:
        client.api.get_models_deployments_development(model_id="llm7")  # llm7 has no development deployment
    assert missing.value.status_code == 404


@pytest.mark.parametrize(
    "call",
    [
        lambda api: api.get_models_model_id(model_id="nope"),
        lambda api: api.get_models_deployments(model_id="nope"),
        lambda api: api.get_models_deployments_deployment_id(model_id="abc123", deployment_id="v9"),
        lambda api: api.get_models_deployments_production(model_id="nope"),
        lambda api: api.get_models_deployments_deployment_id(model_id="m 1/x", deployment_id="v1"),  # sent as %20, %2F
    ],
)
def test_sdk_unknown_ids_raise_404(client: ManagementClient, call: Callable[[ApiClient], object]) -> None:
    with pytest.raises(ResponseError) as error:
        call(client.api)
    assert error.value.status_code == 404


def test_sdk_with_a_wrong_key_gets_401(gateway: GatewayProcess) -> None:
    with ManagementClient(api_key="wrong", base_url_override=gateway.admin_url) as sdk:
        with pytest.raises(ResponseError) as error:
            sdk.api.get_models()
    assert error.value.status_code == 401


def test_reads_follow_a_promotion(tmp_path: Path) -> None:
    # The SDK reads the snapshot an admin change swapped in: promote t2 into llm7's production.
    config = write_table(tmp_path / "table.yaml", example_doc(NOWHERE, NOWHERE))
    with running_gateway(config, "--admin-token", TOKEN) as gw:
        status, body = gw.admin(
            "POST", "/v1/models/llm7/environments/production/promote", TOKEN, {"deployment_id": "t2"}
        )
        assert status == 200 and body["id"] == "t2", body  # the SDK's answer: the promoted deployment
        wait_for(
            lambda: (
                gw.admin("GET", "/v1/models/llm7/environments/production", TOKEN)[1]["current_deployment"]["id"] == "t2"
            )
        )
        with ManagementClient(api_key=TOKEN, base_url_override=gw.admin_url) as sdk:
            assert sdk.api.get_models_model_id(model_id="llm7").production_deployment_id == "t2"
            production = sdk.api.get_models_deployments_production(model_id="llm7")
            assert (production.id, production.environment, production.region.slug) == ("t2", "production", "eu")  # type: ignore[union-attr]
            t1 = sdk.api.get_models_deployments_deployment_id(model_id="llm7", deployment_id="t1")
            assert (t1.is_production, t1.environment, t1.status) == (False, "prod-us", "ACTIVE")  # still serves prod-us


def test_sdk_lists_and_reads_environments(client: ManagementClient) -> None:
    envs = {e.name: e for e in client.api.get_models_environments(model_id="abc123").environments}
    assert sorted(envs) == ["prod-eu", "prod-us", "production", "staging"]
    staging = client.api.get_models_environments_env_name(model_id="abc123", env_name="staging")
    assert staging == envs["staging"]
    assert staging.current_deployment is not None and staging.current_deployment.id == "v1"
    assert staging.current_deployment.status == "ACTIVE" and staging.candidate_deployment is None
    assert staging.instance_type.id == "n/a" and staging.request_backpressure_settings.policy == "QUEUE_ON_FULL"
    assert staging.promotion_settings.promotion_cleanup_strategy == "SCALE_TO_ZERO"
    assert envs["prod-eu"].current_deployment.region.slug == "eu"  # type: ignore[union-attr]
    with pytest.raises(ResponseError) as error:
        client.api.get_models_environments_env_name(model_id="abc123", env_name="nope")
    assert error.value.status_code == 404


# -- the SDK's changes, seen on live traffic ---------------------------------------------------------


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[GatewayProcess, ManagementClient]]:
    """A gateway in front of two planes that answer with the deployment they were addressed to."""
    us, eu = TestPlane(), TestPlane()
    gw = GatewayProcess(write_table(tmp_path / "table.yaml", table_doc(us.url, eu.url)), "--admin-token", TOKEN)
    gw.start()
    try:
        with ManagementClient(api_key=TOKEN, base_url_override=gw.admin_url) as sdk:
            yield gw, sdk
    finally:
        gw.stop()
        us.stop()
        eu.stop()


def predict(gw: GatewayProcess, env: str) -> tuple[int, str | None]:
    """A call through the public listener: its status and the deployment that answered it."""
    req = urllib.request.Request(
        f"{gw.url}/environments/{env}/predict", data=b"{}", headers=dict(AUTH, Host=HOST), method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            return answer.status, answer.headers.get("x-baseten-deployment-id")
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("x-baseten-deployment-id")


def test_sdk_promote_moves_live_traffic(live: tuple[GatewayProcess, ManagementClient]) -> None:
    gw, sdk = live
    assert predict(gw, "staging") == (200, "v4")
    request = PromoteToEnvironmentRequest(deployment_id="v2", scale_down_previous_deployment=False)
    promoted = sdk.api.post_models_environments_promote(model_id="m1", env_name="staging", request=request)
    assert (promoted.id, promoted.model_id) == ("v2", "m1")
    wait_for(lambda: predict(gw, "staging") == (200, "v2"), "staging to answer from v2")
    staging = sdk.api.get_models_environments_env_name(model_id="m1", env_name="staging")
    assert staging.current_deployment is not None and staging.current_deployment.id == "v2"
    assert staging.in_progress_promotion is not None and staging.in_progress_promotion.status == "SUCCEEDED"
    v4 = sdk.api.get_models_deployments_deployment_id(model_id="m1", deployment_id="v4")
    assert v4.status == "ACTIVE"  # scale_down_previous_deployment=false kept it
    # Back to v4, with the override's cleanup: v2 is deactivated once v4 serves.
    override = UpdatePromotionSettings(promotion_cleanup_strategy="DEACTIVATE")
    request = PromoteToEnvironmentRequest(deployment_id="v4", promotion_settings_override=override)
    assert sdk.api.post_models_environments_promote(model_id="m1", env_name="staging", request=request).id == "v4"
    wait_for(lambda: predict(gw, "staging") == (200, "v4"), "staging to answer from v4 again")
    wait_for(lambda: sdk.api.get_models_deployments_deployment_id(model_id="m1", deployment_id="v2").status
             == "INACTIVE", "v2 to be deactivated")  # fmt: skip
    # A second promote while one runs is 409; a regional environment refuses a candidate elsewhere: 400.
    ramp = PromoteToEnvironmentRequest(
        deployment_id="v1", promotion_settings_override=UpdatePromotionSettings(ramp_up_while_promoting=True)
    )
    sdk.api.post_models_environments_promote(model_id="m1", env_name="staging", request=ramp)
    with pytest.raises(ResponseError) as busy:
        sdk.api.post_models_environments_promote(model_id="m1", env_name="staging", request=ramp)
    assert busy.value.status_code == 409
    with pytest.raises(ResponseError) as elsewhere:
        far = PromoteToEnvironmentRequest(deployment_id="v3")
        sdk.api.post_models_environments_promote(model_id="m1", env_name="prod-us", request=far)
    assert elsewhere.value.status_code == 400 and "region" in elsewhere.value.body


def test_sdk_deactivate_is_the_kill_switch(live: tuple[GatewayProcess, ManagementClient]) -> None:
    gw, sdk = live
    assert predict(gw, "production") == (200, "v1")
    answer = sdk.api.post_models_deployments_deactivate(model_id="m1", deployment_id="v1")
    assert (answer.success, answer.no_op) == (True, False)
    assert predict(gw, "production") == (503, None)  # v1 serves production and prod-us: both stop
    assert predict(gw, "prod-us")[0] == 503
    assert sdk.api.post_models_deployments_production_deactivate(model_id="m1").no_op is True
    assert sdk.api.post_models_deployments_production_activate(model_id="m1").no_op is False
    assert predict(gw, "production") == (200, "v1")
    assert sdk.api.post_models_deployments_activate(model_id="m1", deployment_id="v1").no_op is True
    with pytest.raises(ResponseError) as none:
        sdk.api.post_models_deployments_development_activate(model_id="m1")  # m1 has no development deployment
    assert none.value.status_code == 404


def test_sdk_creates_an_environment_and_promotes_into_it(live: tuple[GatewayProcess, ManagementClient]) -> None:
    gw, sdk = live
    request = CreateEnvironmentRequest(
        name="qa",
        autoscaling_settings=UpdateAutoscalingSettings(max_replica=3),
        request_backpressure_settings=UpdateRequestBackpressureSettings(policy="REJECT_ON_FULL"),
    )
    created = sdk.api.post_models_environments(model_id="m1", request=request)  # 200, the SDK's Environment
    assert (created.name, created.current_deployment, created.autoscaling_settings.max_replica) == ("qa", None, 3)
    assert created.request_backpressure_settings.policy == "REJECT_ON_FULL"
    assert predict(gw, "qa")[0] == 404  # no deployment until its first promotion
    sdk.api.post_models_environments_promote(
        model_id="m1", env_name="qa", request=PromoteToEnvironmentRequest(deployment_id="v2")
    )
    wait_for(lambda: predict(gw, "qa") == (200, "v2"), "qa to answer from v2")
    with pytest.raises(ResponseError) as exists:
        sdk.api.post_models_environments(model_id="m1", request=CreateEnvironmentRequest(name="qa"))
    assert exists.value.status_code == 409


def test_sdk_patch_answers_the_update_wrapper(live: tuple[GatewayProcess, ManagementClient]) -> None:
    gw, sdk = live
    request = UpdateEnvironmentRequest(
        autoscaling_settings=UpdateAutoscalingSettings(min_replica=1, max_replica=4, concurrency_target=2),
        request_backpressure_settings=UpdateRequestBackpressureSettings(policy="REJECT_ON_FULL"),
    )
    answer = sdk.api.patch_models_environments(model_id="m1", env_name="staging", request=request)
    assert isinstance(answer, UpdateEnvironmentResponse)
    with pytest.deprecated_call():  # the SDK marks both keys deprecated, but requires them
        assert (answer.status, answer.message) == ("ACCEPTED", "Environment update accepted")
    scaling = answer.environment.autoscaling_settings
    assert (scaling.min_replica, scaling.max_replica, scaling.concurrency_target) == (1, 4, 2)
    assert answer.environment.request_backpressure_settings.policy == "REJECT_ON_FULL"
    # Partial: what a patch leaves out stays; an explicit null policy clears it (back to QUEUE_ON_FULL).
    request = UpdateEnvironmentRequest(
        autoscaling_settings=UpdateAutoscalingSettings(max_replica=6),
        request_backpressure_settings=UpdateRequestBackpressureSettings(policy=None),
    )
    env = sdk.api.patch_models_environments(model_id="m1", env_name="staging", request=request).environment
    assert (env.autoscaling_settings.min_replica, env.autoscaling_settings.max_replica) == (1, 6)
    assert env.request_backpressure_settings.policy == "QUEUE_ON_FULL"
    assert sdk.api.get_models_environments_env_name(model_id="m1", env_name="staging") == env
    assert predict(gw, "staging") == (200, "v4")  # a settings change does not move traffic
    with pytest.raises(ResponseError) as meaningless:
        timing = UpdateEnvironmentRequest(autoscaling_settings=UpdateAutoscalingSettings(scale_down_delay=60))
        sdk.api.patch_models_environments(model_id="m1", env_name="staging", request=timing)
    assert meaningless.value.status_code == 400 and "scale_down_delay" in meaningless.value.body


def ramp_to(sdk: ManagementClient, dep: str, seconds: int) -> None:
    """Promote `dep` into staging with a ramp and wait for its first stage."""
    override = UpdatePromotionSettings(ramp_up_while_promoting=True, ramp_up_duration_seconds=seconds)
    request = PromoteToEnvironmentRequest(
        deployment_id=dep, scale_down_previous_deployment=False, promotion_settings_override=override
    )
    sdk.api.post_models_environments_promote(model_id="m1", env_name="staging", request=request)

    def percent() -> int:
        env = sdk.api.get_models_environments_env_name(model_id="m1", env_name="staging")
        return env.in_progress_promotion.percent_traffic_to_new_version if env.in_progress_promotion else 0

    wait_for(lambda: percent() >= 10, f"the ramp to {dep} to start")


def test_sdk_pause_resume_roll_forward_cancel(live: tuple[GatewayProcess, ManagementClient]) -> None:
    gw, sdk = live
    api = sdk.api

    def status() -> str | None:
        env = api.get_models_environments_env_name(model_id="m1", env_name="staging")
        return env.in_progress_promotion.status if env.in_progress_promotion else None

    ramp_to(sdk, "v2", 120)
    assert api.post_models_environments_pause_promotion(model_id="m1", env_name="staging").success is True
    assert status() == "PAUSED"
    assert api.post_models_environments_resume_promotion(model_id="m1", env_name="staging").success is True
    assert status() == "RAMPING_UP"
    # Roll forward: v2 takes every call at once, the promotion succeeds.
    assert api.post_models_environments_force_roll_forward_promotion(model_id="m1", env_name="staging").success
    assert status() == "SUCCEEDED"
    assert {predict(gw, "staging") for _ in range(10)} == {(200, "v2")}
    with pytest.raises(ResponseError) as ended:
        api.post_models_environments_pause_promotion(model_id="m1", env_name="staging")
    assert ended.value.status_code == 409

    # Cancel after traffic moved ramps down; force_cancel then ends it at once, back on v2.
    ramp_to(sdk, "v4", 120)
    canceled = api.post_models_environments_cancel_promotion(model_id="m1", env_name="staging")
    assert canceled.status == "RAMPING_DOWN" and canceled.message
    assert api.post_models_environments_force_cancel_promotion(model_id="m1", env_name="staging").success is True
    assert status() == "CANCELED"
    assert {predict(gw, "staging") for _ in range(10)} == {(200, "v2")}
    for call in (api.post_models_environments_force_cancel_promotion,
                 api.post_models_environments_force_roll_forward_promotion):  # fmt: skip
        with pytest.raises(ResponseError) as none:
            call(model_id="m1", env_name="staging")
        assert none.value.status_code == 409
