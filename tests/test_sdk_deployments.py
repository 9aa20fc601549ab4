"""The rest of the SDK's management calls (issue 12), each seen on live traffic where it moves any:
environment activate/deactivate and delete, the deployment-level promote (`PromoteRequest`), a
deployment's autoscaling and backpressure settings (admission), environment groups, and an
environment's writable `promotion_settings` honoured by the promotion runner.

The planes answer with the deployment they were addressed to (`ShadowPlane`: `slow` ones answer
late, so a call can be kept in flight). Nothing asserts on time: waits are bounded polls.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from baseten.client import ManagementClient
from baseten.client.managementapi import (
    EnvironmentGroup,
    EnvironmentGroups,
    GetDeploymentLogsRequest,
    GetModelsDeploymentsStartupsParams,
    GetModelsDeploymentsStartupsSummaryParams,
    GetModelsEnvironmentsStartupsParams,
    GetModelsEnvironmentsStartupsSummaryParams,
    PromoteRequest,
    PromoteToEnvironmentRequest,
    PromotionEnvironmentSettingsUpdate,
    ResponseError,
    UpdateAutoscalingSettings,
    UpdateEnvironmentGroupManageAccess,
    UpdateEnvironmentGroupRequest,
    UpdateEnvironmentRequest,
    UpdateModelPromotionSettings,
    UpdatePromotionSettings,
    UpdateRequestBackpressureSettings,
)

from gateway.environments.groups import groups_view
from gateway.environments.promote_body import production_promote_body, promote_options, promotion_settings_update
from gateway.errors import ClientError
from gateway.routing.loader import compile_table
from tests.support import wait_for
from tests.test_sdk_management import predict
from tests.test_sdk_traffic import Live, sdk_gateway, traffic_doc

TOKEN = "sdk-deployments-secret"


def doc(us: str, eu: str) -> dict:
    d = traffic_doc(us, eu)
    d["models"]["m1"]["deployments"]["dv"] = {"plane": "us-1", "development": True}
    return d


# -- pure ------------------------------------------------------------------------------------------


def test_environment_groups_are_the_team_environment_names() -> None:
    table = compile_table(doc("http://127.0.0.1:9", "http://127.0.0.1:9"))
    view = groups_view(table, None)
    EnvironmentGroups.model_validate(view)
    assert [(g["team_id"], g["name"], g["region"]) for g in view["items"]] == [
        ("acme", "canary", None), ("acme", "prod-us", "us"), ("acme", "production", None), ("acme", "staging", None),
        ("globex", "production", None)]  # fmt: skip
    assert [g["name"] for g in groups_view(table, "globex")["items"]] == ["production"]


@pytest.mark.parametrize(
    ("stored", "override", "cleanup", "ramp"),
    [
        ({}, {}, "SCALE_TO_ZERO", 0),
        ({"promotion_cleanup_strategy": "KEEP"}, {}, "KEEP", 0),
        ({"promotion_cleanup_strategy": "KEEP"}, {"promotion_cleanup_strategy": "DEACTIVATE"}, "DEACTIVATE", 0),
        ({"ramp_up_while_promoting": True}, {}, "SCALE_TO_ZERO", 600),
        ({"ramp_up_while_promoting": True, "ramp_up_duration_seconds": 60}, {}, "SCALE_TO_ZERO", 60),
        ({"ramp_up_while_promoting": True}, {"ramp_up_while_promoting": False}, "SCALE_TO_ZERO", 0),
    ],
)
def test_environment_promotion_settings_are_the_defaults_an_override_changes(
    stored: dict, override: dict, cleanup: str, ramp: int
) -> None:
    options = promote_options({"deployment_id": "v2", "promotion_settings_override": override}, stored)
    assert (options["cleanup"], options["ramp_up_duration_seconds"]) == (cleanup, ramp)


def test_promotion_settings_update_is_partial_and_checked() -> None:
    settings = promotion_settings_update({}, {"promotion_cleanup_strategy": "KEEP", "ramp_up_duration_seconds": 60})
    assert promotion_settings_update(settings, {"ramp_up_duration_seconds": None}) == {
        "promotion_cleanup_strategy": "KEEP"
    }
    for bad, text in (({"promotion_cleanup_strategy": "DROP"}, "one of SCALE_TO_ZERO"),
                      ({"ramp_up_duration_seconds": -1}, "whole number"), ({"colour": 1}, "unknown field")):  # fmt: skip
        with pytest.raises(ClientError, match=text):
            promotion_settings_update(settings, bad)


def test_the_deployment_level_promote_body_renames_its_scale_down_flag() -> None:
    assert production_promote_body({"scale_down_previous_production": False}, "v2") == {
        "scale_down_previous_deployment": False, "deployment_id": "v2"}  # fmt: skip


# -- the real SDK against a running gateway ------------------------------------------------------


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    with sdk_gateway(tmp_path / "table.yaml", doc, TOKEN) as running:
        yield running


def status_of(sdk: ManagementClient, dep: str) -> str:
    return sdk.api.get_models_deployments_deployment_id(model_id="m1", deployment_id=dep).status


def test_sdk_environment_activate_deactivate_and_delete(
    live: Live,
) -> None:
    gw, sdk, _ = live
    off = sdk.api.post_models_environments_deactivate(model_id="m1", env_name="staging")  # its deployment, v4
    assert (off.success, off.no_op) == (True, False) and status_of(sdk, "v4") == "INACTIVE"
    assert predict(gw, "staging") == (503, None)
    assert sdk.api.post_models_environments_deactivate(model_id="m1", env_name="staging").no_op is True
    assert sdk.api.post_models_environments_activate(model_id="m1", env_name="staging").no_op is False
    assert predict(gw, "staging") == (200, "v4")
    tombstone = sdk.api.delete_models_environments(model_id="m1", env_name="staging")
    assert (tombstone.name, tombstone.model_id, tombstone.deleted) == ("staging", "m1", True)
    assert predict(gw, "staging")[0] == 404
    with pytest.raises(ResponseError) as gone:
        sdk.api.post_models_environments_activate(model_id="m1", env_name="staging")
    assert gone.value.status_code == 404
    with pytest.raises(ResponseError) as production:
        sdk.api.delete_models_environments(model_id="m1", env_name="production")
    assert production.value.status_code == 400


def test_sdk_deployment_level_promote_is_into_production(
    live: Live,
) -> None:
    gw, sdk, _ = live
    promoted = sdk.api.post_models_deployments_promote(model_id="m1", deployment_id="v2", request=PromoteRequest())
    assert promoted.id == "v2"
    wait_for(lambda: predict(gw, "production") == (200, "v2"), "production to answer from v2")
    assert status_of(sdk, "v1") == "ACTIVE"  # prod-us still uses it
    keep = PromoteRequest(scale_down_previous_production=False)
    sdk.api.post_models_deployments_development_promote(model_id="m1", request=keep)
    wait_for(lambda: predict(gw, "production") == (200, "dv"), "production to answer from the development deployment")
    assert status_of(sdk, "v2") == "ACTIVE"  # scale_down_previous_production=false
    sdk.api.post_models_deployments_promote(model_id="m1", deployment_id="v2", request=PromoteRequest())
    wait_for(lambda: status_of(sdk, "dv") == "SCALED_TO_ZERO", "dv to be scaled to zero (the default cleanup)")
    assert predict(gw, "production") == (200, "v2")


def test_sdk_deployment_settings_change_admission(live: Live) -> None:
    gw, sdk, plane = live
    answer = sdk.api.patch_models_deployments_autoscaling_settings(
        model_id="m1", deployment_id="v4", request=UpdateAutoscalingSettings(concurrency_target=1)
    )
    assert answer.status == "ACCEPTED"
    again = sdk.api.patch_models_deployments_autoscaling_settings(
        model_id="m1", deployment_id="v4", request=UpdateAutoscalingSettings(concurrency_target=1)
    )
    assert again.status == "UNCHANGED"
    policy = sdk.api.patch_models_deployments_request_backpressure_settings(
        model_id="m1", deployment_id="v4", request=UpdateRequestBackpressureSettings(policy="REJECT_ON_FULL")
    )
    assert policy.policy == "REJECT_ON_FULL"
    staging = sdk.api.get_models_environments_env_name(model_id="m1", env_name="staging")  # the settings' owner
    assert staging.autoscaling_settings.concurrency_target == 1
    assert staging.request_backpressure_settings.policy == "REJECT_ON_FULL"
    plane.slow.add("v4")
    first: list[tuple[int, str | None]] = []
    slow = threading.Thread(target=lambda: first.append(predict(gw, "staging")))
    slow.start()
    wait_for(lambda: plane.arrived["v4"] == 1, "the first call to be in flight")
    assert predict(gw, "staging")[0] == 429  # one call in flight fills concurrency_target x 1 replica
    slow.join(30)
    assert first == [(200, "v4")]
    plane.slow.discard("v4")
    with pytest.raises(ResponseError) as unused:  # v5 serves no environment: nowhere to hold the settings
        sdk.api.patch_models_deployments_autoscaling_settings(
            model_id="m1", deployment_id="v5", request=UpdateAutoscalingSettings(max_replica=2)
        )
    assert unused.value.status_code == 409


def test_sdk_environment_groups(live: Live) -> None:
    gw, sdk, _ = live
    groups = sdk.api.get_environment_groups()
    assert [(g.team_id, g.name) for g in groups.items][:2] == [("acme", "canary"), ("acme", "prod-us")]
    assert groups.pagination.has_more is False
    group = sdk.api.get_teams_environment_groups_env_name(team_id="acme", env_name="prod-us")
    assert isinstance(group, EnvironmentGroup) and group.manage_access.is_restricted is False
    assert [g.name for g in sdk.api.get_teams_environment_groups(team_id="globex").items] == ["production"]
    assert sdk.api.get_environment_groups_env_name(env_name="staging").team_name == "acme"
    with pytest.raises(ResponseError) as two_teams:
        sdk.api.get_environment_groups_env_name(env_name="production")
    assert two_teams.value.status_code == 409
    unrestricted = UpdateEnvironmentGroupRequest(manage_access=UpdateEnvironmentGroupManageAccess(is_restricted=False))
    assert sdk.api.patch_environment_groups(env_name="staging", request=unrestricted).name == "staging"
    restricted = UpdateEnvironmentGroupRequest(manage_access=UpdateEnvironmentGroupManageAccess(is_restricted=True))
    with pytest.raises(ResponseError) as meaningless:
        sdk.api.patch_teams_environment_groups(team_id="acme", env_name="staging", request=restricted)
    assert meaningless.value.status_code == 400
    # A created environment is a group of its team from then on.
    status, _ = gw.admin("POST", "/v1/models/m1/environments", TOKEN, {"name": "qa"})
    assert status == 200
    assert sdk.api.get_teams_environment_groups_env_name(team_id="acme", env_name="qa").name == "qa"
    with pytest.raises(ResponseError) as missing:
        sdk.api.get_teams_environment_groups(team_id="nope")
    assert missing.value.status_code == 404


def settings(sdk: ManagementClient, env: str, **fields: object) -> None:
    request = UpdateEnvironmentRequest(promotion_settings=UpdateModelPromotionSettings(**fields))
    answer = sdk.api.patch_models_environments(model_id="m1", env_name=env, request=request)
    stored = answer.environment.promotion_settings.model_dump()  # not getattr: the ramp fields warn (deprecated)
    assert all(stored[key] == value for key, value in fields.items() if value is not None)


def test_sdk_promotion_settings_are_honoured(live: Live) -> None:
    gw, sdk, _ = live
    api = sdk.api
    settings(sdk, "staging", promotion_cleanup_strategy="KEEP")
    api.post_models_environments_promote(
        model_id="m1", env_name="staging", request=PromoteToEnvironmentRequest(deployment_id="v2")
    )
    wait_for(lambda: predict(gw, "staging") == (200, "v2"), "staging to answer from v2")
    assert status_of(sdk, "v4") == "ACTIVE"  # KEEP
    settings(sdk, "staging", promotion_cleanup_strategy="DEACTIVATE")
    api.post_models_environments_promote(
        model_id="m1", env_name="staging", request=PromoteToEnvironmentRequest(deployment_id="v4")
    )
    wait_for(lambda: status_of(sdk, "v2") == "INACTIVE", "v2 to be deactivated (DEACTIVATE)")
    assert predict(gw, "staging") == (200, "v4")
    # The default ramp: the promotion ramps in stages; a one-off override still wins.
    settings(
        sdk, "staging", ramp_up_while_promoting=True, ramp_up_duration_seconds=600, promotion_cleanup_strategy=None
    )
    env = api.get_models_environments_env_name(model_id="m1", env_name="staging")
    assert env.promotion_settings.promotion_cleanup_strategy == "SCALE_TO_ZERO"  # null: back to the default
    api.post_models_deployments_activate(model_id="m1", deployment_id="v2")
    api.post_models_environments_promote(
        model_id="m1", env_name="staging", request=PromoteToEnvironmentRequest(deployment_id="v2")
    )

    def promotion() -> tuple[str, int]:
        p = api.get_models_environments_env_name(model_id="m1", env_name="staging").in_progress_promotion
        return (p.status, p.percent_traffic_to_new_version) if p else ("", 0)

    wait_for(lambda: promotion() == ("RAMPING_UP", 10), "the first stage of the default ramp")
    candidate = api.get_models_environments_env_name(model_id="m1", env_name="staging").candidate_deployment
    assert candidate is not None and candidate.id == "v2"
    api.post_models_environments_force_cancel_promotion(model_id="m1", env_name="staging")
    no_ramp = PromoteToEnvironmentRequest(
        deployment_id="v2", promotion_settings_override=UpdatePromotionSettings(ramp_up_while_promoting=False)
    )
    api.post_models_environments_promote(model_id="m1", env_name="staging", request=no_ramp)
    wait_for(lambda: predict(gw, "staging") == (200, "v2"), "the override's immediate switch")


def test_sdk_promote_keeps_a_deployment_still_used_elsewhere(
    live: Live,
) -> None:
    gw, sdk, _ = live
    settings(sdk, "production", promotion_cleanup_strategy="DEACTIVATE")
    status, answer = gw.admin("POST", "/v1/models/m1/environments/production/promote", TOKEN, {"deployment_id": "v2"})
    assert status == 200 and isinstance(answer, dict), answer
    assert answer["previous_deployment"] == {
        "id": "v1",
        "cleanup": "KEEP",
        "still_used_by": ["environment 'prod-us' (current)"],
    }
    wait_for(lambda: predict(gw, "production") == (200, "v2"), "production to answer from v2")
    assert status_of(sdk, "v1") == "ACTIVE" and predict(gw, "prod-us") == (200, "v1")
    promoted = sdk.api.post_models_environments_promote(
        model_id="m1", env_name="staging", request=PromoteToEnvironmentRequest(deployment_id="v1")
    )
    assert promoted.id == "v1"


def test_sdk_null_shapes_and_team_models(live: Live) -> None:
    _, sdk, _ = live
    api = sdk.api
    window = {"start_epoch_millis": 0, "end_epoch_millis": 1000}
    assert api.get_models_deployments_logs(model_id="m1", deployment_id="v1").logs == []
    assert (
        api.post_models_deployments_logs(
            model_id="m1", deployment_id="v1", request=GetDeploymentLogsRequest(**window)
        ).logs
        == []
    )
    assert api.get_models_environments_logs(model_id="m1", env_name="staging").logs == []
    assert api.get_models_deployments_metrics(model_id="m1", deployment_id="production").metric_values == []
    assert api.get_models_environments_metrics(model_id="m1", env_name="staging").metric_descriptors == []
    startups = GetModelsDeploymentsStartupsParams(**window)
    assert api.get_models_deployments_startups(model_id="m1", deployment_id="v1", params=startups).total_count == 0
    summary = GetModelsDeploymentsStartupsSummaryParams(**window)
    assert (
        api.get_models_deployments_startups_summary(model_id="m1", deployment_id="v1", params=summary).phase_duration_ms
        == []
    )
    env_startups = GetModelsEnvironmentsStartupsParams(**window)
    assert api.get_models_environments_startups(model_id="m1", env_name="staging", params=env_startups).items == []
    env_summary = GetModelsEnvironmentsStartupsSummaryParams(**window)
    assert api.get_models_environments_startups_summary(model_id="m1", env_name="staging", params=env_summary)
    with pytest.raises(ResponseError) as missing:
        api.get_models_environments_logs(model_id="m1", env_name="nope")
    assert missing.value.status_code == 404
    assert [m.id for m in api.get_teams_models(team_id="acme").models] == ["m1", "m2"]
    assert [m.id for m in api.get_teams_models(team_id="globex").models] == ["m3"]
    with pytest.raises(ResponseError) as not_served:
        api.post_models_deployments_retry(model_id="m1", deployment_id="v1")  # no builds here
    assert not_served.value.status_code == 404


def test_sdk_promote_gives_the_environment_its_settings_update(
    live: Live,
) -> None:
    gw, sdk, plane = live
    api = sdk.api
    broken = PromotionEnvironmentSettingsUpdate(
        autoscaling_settings=UpdateAutoscalingSettings(min_replica=5, max_replica=2)
    )
    with pytest.raises(ResponseError) as refused:  # checked at the call, not when the switch would fail
        api.post_models_environments_promote(model_id="m1", env_name="staging",
            request=PromoteToEnvironmentRequest(deployment_id="v2", environment_settings_update=broken))  # fmt: skip
    assert refused.value.status_code == 400 and "problems" in refused.value.body
    update = PromotionEnvironmentSettingsUpdate(
        autoscaling_settings=UpdateAutoscalingSettings(concurrency_target=1),
        request_backpressure_settings=UpdateRequestBackpressureSettings(policy="REJECT_ON_FULL"),
        promotion_settings=UpdatePromotionSettings(promotion_cleanup_strategy="KEEP"),
    )
    api.post_models_environments_promote(model_id="m1", env_name="staging",
        request=PromoteToEnvironmentRequest(deployment_id="v2", environment_settings_update=update))  # fmt: skip
    wait_for(lambda: predict(gw, "staging") == (200, "v2"), "staging to answer from v2")
    env = api.get_models_environments_env_name(model_id="m1", env_name="staging")
    assert (env.autoscaling_settings.concurrency_target, env.request_backpressure_settings.policy) == (
        1,
        "REJECT_ON_FULL",
    )
    assert env.promotion_settings.promotion_cleanup_strategy == "KEEP"
    assert status_of(sdk, "v4") == "ACTIVE"  # this promotion already followed KEEP
    plane.slow.add("v2")
    before = plane.arrived["v2"]
    first: list[tuple[int, str | None]] = []
    slow = threading.Thread(target=lambda: first.append(predict(gw, "staging")))
    slow.start()
    wait_for(lambda: plane.arrived["v2"] == before + 1, "a call to be in flight")
    assert predict(gw, "staging")[0] == 429  # the settings the promotion gave admit one call at a time
    slow.join(30)
    assert first == [(200, "v2")]
