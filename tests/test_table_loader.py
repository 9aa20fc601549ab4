"""The routing table loader (SPEC §3, §12): parse, validate completely, compile into an immutable Table."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.routing import loader
from gateway.routing.loader import TableInvalid, compile_table, load_table, parse_document
from gateway.routing.model import Table, Timeouts, Upstream

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "routing_config" / "example.yaml"
DROP = object()  # marks a key to delete in an edit


def example() -> dict[str, Any]:
    return copy.deepcopy(_EXAMPLE_DOC)


_EXAMPLE_DOC = parse_document(EXAMPLE.read_bytes(), str(EXAMPLE))


def edit(doc: dict[str, Any], path: tuple[Any, ...], value: Any = DROP) -> dict[str, Any]:
    """Set (or with DROP delete) the value at `path`, creating mappings on the way."""
    node = doc
    for seg in path[:-1]:
        if isinstance(node, dict) and seg not in node:
            node[seg] = {}
        node = node[seg]
    if value is DROP:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def problems_of(doc: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(TableInvalid) as info:
        compile_table(doc, **kwargs)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def paths_of(problems: list[str]) -> set[str]:
    return {p.split(": ", 1)[0] for p in problems}


# -- the example table --------------------------------------------------------------------------


def test_schema_shipped_in_package_is_the_published_one() -> None:
    published = REPO / "routing_config" / "schema.json"
    assert loader.SCHEMA_PATH == REPO / "gateway" / "routing" / "schema.json"
    assert published.read_bytes() == loader.SCHEMA_PATH.read_bytes()


def test_example_loads() -> None:
    table = load_table(EXAMPLE)
    assert isinstance(table, Table)
    assert table.version == 1
    assert table.digest == hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()
    assert table.source == str(EXAMPLE)
    assert table.domains == {"api.example.com", "localhost"}
    assert table.gateway.regions == {"us"}
    assert table.gateway.hold_timeout_seconds == 300.0
    assert table.gateway.max_held_calls_per_deployment == 1000
    assert table.gateway.timeouts == Timeouts()
    assert table.regions["us"].networks == ("127.0.0.0/8", "10.10.0.0/16")
    assert table.regions["eu"].networks == ("127.0.0.0/8",)
    us = table.planes["us-east-1"]
    assert (us.region, us.url, us.grpc, us.timeouts, us.tls) == (
        "us",
        Upstream("http", "127.0.0.1", 9001),
        "127.0.0.1:9101",
        None,
        None,
    )
    assert table.planes["eu-west-1"].url.base_url == "http://127.0.0.1:9002"
    assert dict(table.teams["acme"].regional_environments) == {"prod-us": "us", "prod-eu": "eu"}
    assert dict(table.teams["globex"].regional_environments) == {}


def test_example_models() -> None:
    table = load_table(EXAMPLE)
    abc = table.models["abc123"]
    assert (abc.team, abc.kind) == ("acme", "model")
    assert set(abc.deployments) == {"v1", "v2", "v3", "dev", "v0"}
    assert abc.development is abc.deployments["dev"]
    assert abc.deployments["dev"].development and not abc.deployments["v1"].development
    assert abc.deployments["v0"].status == "scaled_to_zero"
    assert abc.deployments["v1"].status == "active"
    assert abc.deployments["v3"].region == "eu"
    assert abc.deployments["v1"].timeouts == Timeouts()
    assert abc.deleted_environments == {"old-staging"}
    envs = abc.environments
    assert set(envs) == {"production", "staging", "prod-us", "prod-eu"}
    assert {name: env.region for name, env in envs.items()} == {
        "production": None,
        "staging": None,
        "prod-us": "us",
        "prod-eu": "eu",
    }
    assert envs["prod-eu"].deployment is abc.deployments["v3"]
    staging = envs["staging"]
    assert staging.deployment is abc.deployments["v1"]
    assert staging.canary is not None and staging.canary.deployment is abc.deployments["v2"]
    assert staging.canary.percent == 10.0
    assert staging.shadow is None
    assert (staging.autoscaling.min_replica, staging.autoscaling.max_replica) == (0, 3)
    assert staging.autoscaling.concurrency_target == 4
    assert staging.backpressure == "QUEUE_ON_FULL"
    assert table.models["pipeline1"].kind == "chain"
    assert table.models["llm7"].development is None
    assert table.models["xyz789"].team == "globex"


def test_example_api_keys() -> None:
    table = load_table(EXAMPLE)
    demo = table.api_keys[hashlib.sha256(b"demo-key-acme").digest()]
    assert (demo.name, demo.team, demo.environments, demo.models) == ("demo", "acme", None, None)
    staging = table.api_keys[hashlib.sha256(b"demo-key-staging").digest()]
    assert (staging.environments, staging.models) == ({"staging"}, {"abc123"})
    assert table.api_keys[hashlib.sha256(b"demo-key-globex").digest()].team == "globex"
    assert len(table.api_keys) == 3


def test_json_document_compiles_like_yaml() -> None:
    data = json.dumps(_EXAMPLE_DOC).encode()
    assert compile_table(parse_document(data, "t.json")).models == load_table(EXAMPLE).models


# -- compiled values ------------------------------------------------------------------------------


def test_timeouts_most_specific_wins_field_by_field() -> None:
    doc = example()
    edit(doc, ("gateway", "timeouts"), {"connect_seconds": 2, "idle_seconds": 100})
    edit(doc, ("planes", "us-east-1", "timeouts"), {"idle_seconds": 50, "total_seconds": 900})
    edit(doc, ("models", "abc123", "deployments", "v2", "timeouts"), {"total_seconds": 60})
    table = compile_table(doc)
    assert table.gateway.timeouts == Timeouts(2.0, 1200.0, 100.0, 1200.0)
    assert table.planes["us-east-1"].timeouts == Timeouts(2.0, 1200.0, 50.0, 900.0)
    assert table.planes["eu-west-1"].timeouts is None  # inherits table.gateway.timeouts
    deployments = table.models["abc123"].deployments
    assert deployments["v1"].timeouts == Timeouts(2.0, 1200.0, 50.0, 900.0)
    assert deployments["v2"].timeouts == Timeouts(2.0, 1200.0, 50.0, 60.0)
    assert deployments["v3"].timeouts == Timeouts(2.0, 1200.0, 100.0, 1200.0)


def test_optional_settings_compile() -> None:
    doc = example()
    edit(doc, ("gateway", "hold_timeout_seconds"), 12.5)
    edit(doc, ("gateway", "max_held_calls_per_deployment"), 0)
    edit(doc, ("gateway", "dns"), {"nameservers": ["10.0.0.2", "10.0.0.3:5353", "[FD00::53]:53", "::1"]})
    del doc["gateway"]["regions"]
    edit(doc, ("domains",), ["API.Example.COM.", "localhost"])
    edit(doc, ("planes", "eu-west-1", "url"), "HTTPS://Plane-EU.Internal/")
    edit(doc, ("planes", "eu-west-1", "grpc"), "[::1]:9102")
    dep = doc["models"]["abc123"]["deployments"]["v2"]
    dep.update(endpoints=["http://10.0.0.1:8080", "http://[fd00::1]:8080/"], replicas=2, status="inactive")
    env = doc["models"]["abc123"]["environments"]["staging"]
    env.update(shadow={"deployment": "v0", "percent": 50}, backpressure={"policy": "REJECT_ON_FULL"})
    table = compile_table(doc)
    gw = table.gateway
    assert (gw.regions, gw.hold_timeout_seconds, gw.max_held_calls_per_deployment) == (None, 12.5, 0)
    assert gw.dns_nameservers == ("10.0.0.2", "10.0.0.3:5353", "[fd00::53]:53", "::1")
    assert table.domains == {"api.example.com", "localhost"}
    assert table.planes["eu-west-1"].url == Upstream("https", "plane-eu.internal", 443)
    assert table.planes["eu-west-1"].grpc == "[::1]:9102"
    v2 = table.models["abc123"].deployments["v2"]
    assert v2.endpoints == (Upstream("http", "10.0.0.1", 8080), Upstream("http", "fd00::1", 8080))
    assert (v2.replicas, v2.status) == (2, "inactive")
    staging = table.models["abc123"].environments["staging"]
    assert staging.shadow is not None
    assert (staging.shadow.deployment.id, staging.shadow.percent, staging.shadow.max_body_bytes) == (
        "v0",
        50.0,
        1024 * 1024,
    )
    assert staging.backpressure == "REJECT_ON_FULL"


def test_environment_without_deployment_compiles_to_none() -> None:
    doc = edit(example(), ("models", "abc123", "environments", "fresh"), {})
    assert compile_table(doc).models["abc123"].environments["fresh"].deployment is None


def test_tls_files_resolve_against_the_table_directory(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / "certs" / name).write_text("x")
    doc = example()
    edit(doc, ("planes", "eu-west-1", "url"), "https://plane-eu.internal:9443")
    edit(
        doc,
        ("planes", "eu-west-1", "tls"),
        {"ca": "certs/ca.pem", "cert": "certs/cert.pem", "key": "certs/key.pem"},
    )
    (tmp_path / "table.json").write_text(json.dumps(doc))
    tls = load_table(tmp_path / "table.json").planes["eu-west-1"].tls
    assert tls is not None
    assert tls.ca == str(tmp_path / "certs" / "ca.pem")
    assert (tls.cert, tls.key) == (str(tmp_path / "certs" / "cert.pem"), str(tmp_path / "certs" / "key.pem"))
    # compile_table takes the directory explicitly
    assert compile_table(doc, base_dir=tmp_path).planes["eu-west-1"].tls == tls
    problems = problems_of(doc, base_dir=tmp_path / "elsewhere")
    assert paths_of(problems) == {f"planes.eu-west-1.tls.{f}" for f in ("ca", "cert", "key")}
    assert all("file not found" in p for p in problems)


# -- immutability ---------------------------------------------------------------------------------


def test_compiled_table_is_immutable() -> None:
    table = load_table(EXAMPLE)
    model = table.models["abc123"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.models = {}  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.deployments["v1"].status = "inactive"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.gateway.timeouts.total_seconds = 1  # type: ignore[misc]
    mappings = [
        table.models,
        table.planes,
        table.regions,
        table.teams,
        table.api_keys,
        model.deployments,
        model.environments,
        table.teams["acme"].regional_environments,
    ]
    for mapping in mappings:
        with pytest.raises(TypeError):
            mapping["x"] = None  # type: ignore[index]
        with pytest.raises(AttributeError):
            mapping.clear()  # type: ignore[attr-defined]
    assert isinstance(table.domains, frozenset) and isinstance(model.deleted_environments, frozenset)
    assert isinstance(table.regions["us"].networks, tuple)


# -- every problem, by path -----------------------------------------------------------------------


def test_a_bad_table_lists_every_problem_by_path() -> None:
    doc = example()
    abc = doc["models"]["abc123"]
    edit(doc, ("planes", "us-east-1", "url"), "http://127.0.0.1:9001/v1")  # 1 path in url
    edit(doc, ("planes", "eu-west-1", "regoin"), "eu")  # 2 unknown key
    edit(abc, ("environments", "prod-us", "deployment"), "v9")  # 3 unknown deployment
    edit(abc, ("environments", "prod-eu", "canary"), {"deployment": "v1", "percent": 5})  # 4 residency
    edit(abc, ("deployments", "v0", "development"), True)  # 5 second development deployment
    edit(abc, ("deleted_environments",), ["old-staging", "production"])  # 6 production deleted
    edit(doc, ("api_keys", 1, "team"), "umbrella")  # 7 unknown team
    edit(doc, ("regions", "eu", "networks"), ["10.0.0.0/33"])  # 8 bad CIDR
    del doc["models"]["llm7"]["environments"]["production"]  # 9 no production
    edit(
        doc,
        ("models", "xyz789", "environments", "production", "canary"),
        {"deployment": "g1", "percent": 101},
    )  # 10
    edit(doc, ("gateway", "timeouts", "total_seconds"), 1201)  # 11
    edit(doc, ("models", "Bad_Id"), copy.deepcopy(doc["models"]["pipeline1"]))  # 12 bad model id
    problems = problems_of(doc)
    assert paths_of(problems) == {
        "planes.us-east-1.url",
        "planes.eu-west-1.regoin",
        "models.abc123.environments.prod-us.deployment",
        "models.abc123.environments.prod-eu.canary.deployment",
        "models.abc123.deployments.v0.development",
        "models.abc123.deleted_environments[1]",
        "api_keys[1].team",
        "regions.eu.networks[0]",
        "models.llm7.environments.production",
        "models.xyz789.environments.production.canary.percent",
        "gateway.timeouts.total_seconds",
        "models.Bad_Id",
    }
    assert len(problems) == 12
    assert "models.abc123.environments.prod-us.deployment: unknown deployment 'v9'" in problems
    assert problems == sorted(problems, key=lambda p: loader._sort_key((tuple(p.split(": ")[0].split(".")), "")))


def test_problems_are_sorted_and_deduplicated() -> None:
    doc = example()
    for i in (2, 1, 0):
        edit(doc, ("api_keys", i, "team"), "nobody")
    doc["api_keys"].extend([{}] * 9)  # jsonschema reports each missing key per `required`: deduplicated
    problems = problems_of(doc)
    assert problems[:4] == [
        "api_keys[0].team: unknown team 'nobody'",
        "api_keys[1].team: unknown team 'nobody'",
        "api_keys[2].team: unknown team 'nobody'",
        "api_keys[3].name: required key 'name' is missing",
    ]
    assert problems[-1] == "api_keys[11].team: required key 'team' is missing"  # [11] after [3], not [1]
    assert len(problems) == len(set(problems)) == 3 + 9 * 3


# name, edits (path, value or DROP), expected problem path, text the message contains
CASES: list[tuple[str, list[tuple[tuple[Any, ...], Any]], str, str]] = [
    # unknown keys at every depth
    ("unknown top-level key", [(("modles",), {})], "modles", "unknown key 'modles' (did you mean 'models'?)"),
    ("unknown gateway key", [(("gateway", "region"), ["us"])], "gateway.region", "did you mean 'regions'?"),
    (
        "unknown timeouts key",
        [(("gateway", "timeouts", "connect"), 1)],
        "gateway.timeouts.connect",
        "unknown key",
    ),
    ("unknown region key", [(("regions", "us", "cidrs"), [])], "regions.us.cidrs", "unknown key 'cidrs'"),
    (
        "unknown plane key",
        [(("planes", "us-east-1", "port"), 1)],
        "planes.us-east-1.port",
        "unknown key 'port'",
    ),
    ("unknown team key", [(("teams", "acme", "regions"), {})], "teams.acme.regions", "unknown key"),
    ("unknown api key key", [(("api_keys", 0, "scope"), [])], "api_keys[0].scope", "unknown key 'scope'"),
    (
        "unknown model key",
        [(("models", "abc123", "owner"), "x")],
        "models.abc123.owner",
        "unknown key 'owner'",
    ),
    (
        "unknown deployment key",
        [(("models", "abc123", "deployments", "v1", "plan"), "x")],
        "models.abc123.deployments.v1.plan",
        "did you mean 'plane'?",
    ),
    (
        "unknown environment key",
        [(("models", "abc123", "environments", "staging", "canery"), {})],
        "models.abc123.environments.staging.canery",
        "did you mean 'canary'?",
    ),
    (
        "unknown canary key",
        [(("models", "abc123", "environments", "staging", "canary", "weight"), 1)],
        "models.abc123.environments.staging.canary.weight",
        "unknown key 'weight'",
    ),
    # top level
    ("version", [(("version",), 2)], "version", "must be 1"),
    ("missing version", [(("version",), DROP)], "version", "required key 'version' is missing"),
    ("missing models", [(("models",), DROP)], "models", "required key 'models' is missing"),
    ("no domains", [(("domains",), [])], "domains", "must not be empty"),
    ("bad domain", [(("domains",), ["api_example.com"])], "domains[0]", "not a valid DNS name"),
    (
        "numeric domain",
        [(("domains",), ["10.0.0.1"])],
        "domains[0]",
        "neither a valid IPv4 address nor a host",
    ),
    (
        "duplicate domain",
        [(("domains",), ["api.example.com", "API.example.com."])],
        "domains[1]",
        "duplicate domain 'api.example.com' (also domains[0])",
    ),
    # names
    ("bad region name", [(("regions", "US"), {})], "regions.US", "is not a valid name"),
    (
        "bad plane name",
        [(("planes", "east 1"), {"region": "us", "url": "http://a"})],
        'planes["east 1"]',
        "not a valid name",
    ),
    ("bad team name", [(("teams", "-acme"), {})], "teams.-acme", "not a valid name"),
    (
        "bad model id",
        [(("models", "abc-1"), {"team": "acme", "deployments": {}, "environments": {"production": {}}})],
        "models.abc-1",
        "is not a valid model id",
    ),
    (
        "model id too long",
        [(("models", "a" * 33), {"team": "acme", "deployments": {}, "environments": {"production": {}}})],
        "models." + "a" * 33,
        "is not a valid model id",
    ),
    (
        "bad deployment id",
        [(("models", "abc123", "deployments", "_v1"), {"plane": "us-east-1"})],
        "models.abc123.deployments._v1",
        "not a valid deployment id",
    ),
    (
        "bad environment name",
        [(("models", "abc123", "environments", "Prod"), {})],
        "models.abc123.environments.Prod",
        "not a valid environment name",
    ),
    (
        "environment name ends with hyphen",
        [(("models", "abc123", "environments", "prod-"), {})],
        "models.abc123.environments.prod-",
        "not a valid environment name",
    ),
    (
        "environment name with newline",
        [(("models", "abc123", "environments", "prod\n"), {})],
        'models.abc123.environments["prod\\n"]',
        "not a valid environment name",
    ),
    (
        "environment name too long",
        [(("models", "abc123", "environments", "e" * 41), {})],
        "models.abc123.environments." + "e" * 41,
        "at most 40 characters",
    ),
    (
        "development environment",
        [(("models", "abc123", "environments", "development"), {})],
        "models.abc123.environments.development",
        "'development' is reserved",
    ),
    (
        "development regional environment",
        [(("teams", "acme", "regional_environments", "development"), "us")],
        "teams.acme.regional_environments.development",
        "never a regional environment",
    ),
    (
        "bad regional environment name",
        [(("teams", "acme", "regional_environments", "Prod"), "us")],
        "teams.acme.regional_environments.Prod",
        "not a valid environment name",
    ),
    (
        "bad api key environment",
        [(("api_keys", 1, "environments"), ["staging", "Prod"])],
        "api_keys[1].environments[1]",
        "not a valid environment name",
    ),
    # production, development deployments, deleted environments
    (
        "missing production",
        [(("models", "abc123", "environments", "production"), DROP)],
        "models.abc123.environments.production",
        "every model needs a 'production' environment",
    ),
    (
        "two development deployments",
        [(("models", "abc123", "deployments", "v0", "development"), True)],
        "models.abc123.deployments.v0.development",
        "at most one development deployment, and 'dev' already is",
    ),
    (
        "deleted production",
        [(("models", "abc123", "deleted_environments"), ["production"])],
        "models.abc123.deleted_environments[0]",
        "'production' cannot be deleted",
    ),
    (
        "deleted and live",
        [(("models", "abc123", "deleted_environments"), ["old-staging", "staging"])],
        "models.abc123.deleted_environments[1]",
        "'staging' is also defined in environments",
    ),
    (
        "deleted development",
        [(("models", "abc123", "deleted_environments"), ["development"])],
        "models.abc123.deleted_environments[0]",
        "reserved",
    ),
    # plane URLs
    (
        "url with path",
        [(("planes", "us-east-1", "url"), "http://127.0.0.1:9001/api")],
        "planes.us-east-1.url",
        "must not have a path ('/api')",
    ),
    (
        "url with query",
        [(("planes", "us-east-1", "url"), "http://127.0.0.1:9001/?a=1")],
        "planes.us-east-1.url",
        "must not have a query",
    ),
    (
        "url with fragment",
        [(("planes", "us-east-1", "url"), "http://127.0.0.1:9001#x")],
        "planes.us-east-1.url",
        "must not have a fragment",
    ),
    (
        "url with userinfo",
        [(("planes", "us-east-1", "url"), "http://user:pw@127.0.0.1:9001")],
        "planes.us-east-1.url",
        "must not contain user information",
    ),
    (
        "url scheme",
        [(("planes", "us-east-1", "url"), "ftp://127.0.0.1:9001")],
        "planes.us-east-1.url",
        "unsupported scheme 'ftp'",
    ),
    (
        "url without scheme",
        [(("planes", "us-east-1", "url"), "127.0.0.1:9001")],
        "planes.us-east-1.url",
        "is not a URL like http://host:port",
    ),
    (
        "url without host",
        [(("planes", "us-east-1", "url"), "http://:9001")],
        "planes.us-east-1.url",
        "has no host",
    ),
    (
        "url bad port",
        [(("planes", "us-east-1", "url"), "http://127.0.0.1:65536")],
        "planes.us-east-1.url",
        "'65536' is not a valid port",
    ),
    (
        "url port zero",
        [(("planes", "us-east-1", "url"), "http://127.0.0.1:0")],
        "planes.us-east-1.url",
        "valid port",
    ),
    (
        "url empty port",
        [(("planes", "us-east-1", "url"), "http://127.0.0.1:")],
        "planes.us-east-1.url",
        "the port is empty",
    ),
    (
        "url bad ipv4",
        [(("planes", "us-east-1", "url"), "http://127.0.0.256:9001")],
        "planes.us-east-1.url",
        "not a valid IPv4 address",
    ),
    (
        "url unbracketed ipv6",
        [(("planes", "us-east-1", "url"), "http://::1:9001")],
        "planes.us-east-1.url",
        "must be written in brackets",
    ),
    (
        "url bad ipv6",
        [(("planes", "us-east-1", "url"), "http://[::g]:9001")],
        "planes.us-east-1.url",
        "not a valid IPv6 address",
    ),
    (
        "url bad host",
        [(("planes", "us-east-1", "url"), "http://plane_1.internal")],
        "planes.us-east-1.url",
        "not a valid host name",
    ),
    (
        "url with space",
        [(("planes", "us-east-1", "url"), " http://127.0.0.1:9001")],
        "planes.us-east-1.url",
        "is not a URL",
    ),
    (
        "endpoint with path",
        [(("models", "abc123", "deployments", "v1", "endpoints"), ["http://10.0.0.1/x"])],
        "models.abc123.deployments.v1.endpoints[0]",
        "must not have a path",
    ),
    (
        "duplicate endpoint",
        [
            (
                ("models", "abc123", "deployments", "v1", "endpoints"),
                ["http://10.0.0.1", "http://10.0.0.1:80/"],
            )
        ],
        "models.abc123.deployments.v1.endpoints[1]",
        "already listed at endpoints[0]",
    ),
    (
        "grpc without port",
        [(("planes", "us-east-1", "grpc"), "127.0.0.1")],
        "planes.us-east-1.grpc",
        "needs a port",
    ),
    (
        "grpc with scheme",
        [(("planes", "us-east-1", "grpc"), "http://127.0.0.1:9101")],
        "planes.us-east-1.grpc",
        "must be host:port, without a scheme",
    ),
    # tls
    (
        "tls on http plane",
        [(("planes", "us-east-1", "tls"), {"ca": __file__})],
        "planes.us-east-1.tls",
        "only allowed for https:// planes",
    ),
    (
        "tls cert without key",
        [
            (("planes", "us-east-1", "url"), "https://a.internal"),
            (("planes", "us-east-1", "tls"), {"cert": __file__}),
        ],
        "planes.us-east-1.tls",
        "cert and key go together",
    ),
    (
        "tls missing file",
        [
            (("planes", "us-east-1", "url"), "https://a.internal"),
            (("planes", "us-east-1", "tls"), {"ca": "/nonexistent/ca.pem"}),
        ],
        "planes.us-east-1.tls.ca",
        "file not found: /nonexistent/ca.pem",
    ),
    (
        "tls directory",
        [
            (("planes", "us-east-1", "url"), "https://a.internal"),
            (("planes", "us-east-1", "tls"), {"ca": "/"}),
        ],
        "planes.us-east-1.tls.ca",
        "not a regular file",
    ),
    (
        "empty tls",
        [(("planes", "us-east-1", "url"), "https://a.internal"), (("planes", "us-east-1", "tls"), {})],
        "planes.us-east-1.tls",
        "must not be empty",
    ),
    # unknown references
    (
        "plane region",
        [(("planes", "us-east-1", "region"), "asia")],
        "planes.us-east-1.region",
        "unknown region 'asia'",
    ),
    (
        "deployment plane",
        [(("models", "abc123", "deployments", "v1", "plane"), "us-west-9")],
        "models.abc123.deployments.v1.plane",
        "unknown plane 'us-west-9'",
    ),
    (
        "model team",
        [(("models", "xyz789", "team"), "initech")],
        "models.xyz789.team",
        "unknown team 'initech'",
    ),
    (
        "environment deployment",
        [(("models", "abc123", "environments", "prod-us", "deployment"), "v9")],
        "models.abc123.environments.prod-us.deployment",
        "unknown deployment 'v9'",
    ),
    (
        "other model's deployment",
        [(("models", "abc123", "environments", "production", "deployment"), "t1")],
        "models.abc123.environments.production.deployment",
        "unknown deployment 't1'",
    ),
    (
        "canary deployment",
        [(("models", "abc123", "environments", "staging", "canary", "deployment"), "v7")],
        "models.abc123.environments.staging.canary.deployment",
        "unknown deployment 'v7'",
    ),
    (
        "shadow deployment",
        [(("models", "abc123", "environments", "staging", "shadow"), {"deployment": "v8", "percent": 1})],
        "models.abc123.environments.staging.shadow.deployment",
        "unknown deployment 'v8'",
    ),
    (
        "team region",
        [(("teams", "acme", "regional_environments", "prod-asia"), "asia")],
        "teams.acme.regional_environments.prod-asia",
        "unknown region 'asia'",
    ),
    (
        "gateway region",
        [(("gateway", "regions"), ["us", "apac"])],
        "gateway.regions[1]",
        "unknown region 'apac'",
    ),
    ("api key team", [(("api_keys", 2, "team"), "initech")], "api_keys[2].team", "unknown team 'initech'"),
    (
        "api key model",
        [(("api_keys", 1, "models"), ["abc123", "nope"])],
        "api_keys[1].models[1]",
        "unknown model 'nope'",
    ),
    # residency
    (
        "residency current",
        [(("models", "abc123", "environments", "prod-us", "deployment"), "v3")],
        "models.abc123.environments.prod-us.deployment",
        "deployment 'v3' runs on plane 'eu-west-1' in region 'eu', but environment 'prod-us' is pinned to region 'us'",
    ),
    (
        "residency canary",
        [(("models", "abc123", "environments", "prod-us", "canary"), {"deployment": "v3", "percent": 1})],
        "models.abc123.environments.prod-us.canary.deployment",
        "is pinned to region 'us'",
    ),
    (
        "residency shadow",
        [(("models", "abc123", "environments", "prod-us", "shadow"), {"deployment": "v3", "percent": 1})],
        "models.abc123.environments.prod-us.shadow.deployment",
        "deployment 'v3' runs on plane 'eu-west-1' in region 'eu', but environment 'prod-us' is pinned to region 'us'",
    ),
    (
        "residency of another model",
        [(("models", "llm7", "environments", "prod-eu", "deployment"), "t1")],
        "models.llm7.environments.prod-eu.deployment",
        "pinned to region 'eu'",
    ),
    # canary / shadow / autoscaling / backpressure
    (
        "canary without deployment",
        [(("models", "abc123", "environments", "staging", "deployment"), DROP)],
        "models.abc123.environments.staging.canary",
        "a canary needs the environment to have a deployment",
    ),
    (
        "shadow without deployment",
        [(("models", "abc123", "environments", "fresh"), {"shadow": {"deployment": "v2", "percent": 5}})],
        "models.abc123.environments.fresh.shadow",
        "a shadow needs the environment to have a deployment",
    ),
    (
        "canary percent",
        [(("models", "abc123", "environments", "staging", "canary", "percent"), 100.5)],
        "models.abc123.environments.staging.canary.percent",
        "must be at most 100",
    ),
    (
        "canary percent NaN",
        [(("models", "abc123", "environments", "staging", "canary", "percent"), float("nan"))],
        "models.abc123.environments.staging.canary.percent",
        "expected a number, got the non-finite number nan",
    ),
    (
        "canary without percent",
        [(("models", "abc123", "environments", "staging", "canary", "percent"), DROP)],
        "models.abc123.environments.staging.canary.percent",
        "required key 'percent' is missing",
    ),
    (
        "shadow max body",
        [
            (
                ("models", "abc123", "environments", "staging", "shadow"),
                {"deployment": "v2", "percent": 5, "max_body_bytes": -1},
            )
        ],
        "models.abc123.environments.staging.shadow.max_body_bytes",
        "must be at least 0",
    ),
    (
        "autoscaling min over max",
        [(("models", "abc123", "environments", "staging", "autoscaling", "min_replica"), 4)],
        "models.abc123.environments.staging.autoscaling",
        "min_replica (4) is greater than max_replica (3)",
    ),
    (
        "autoscaling min over default max",
        [(("models", "abc123", "environments", "production", "autoscaling"), {"min_replica": 2})],
        "models.abc123.environments.production.autoscaling",
        "greater than the default max_replica (1)",
    ),
    (
        "autoscaling zero max",
        [(("models", "abc123", "environments", "staging", "autoscaling", "max_replica"), 0)],
        "models.abc123.environments.staging.autoscaling.max_replica",
        "must be at least 1",
    ),
    (
        "backpressure policy",
        [(("models", "abc123", "environments", "staging", "backpressure"), {"policy": "DROP"})],
        "models.abc123.environments.staging.backpressure.policy",
        "'DROP' is not one of: QUEUE_ON_FULL, REJECT_ON_FULL",
    ),
    (
        "deployment status",
        [(("models", "abc123", "deployments", "v1", "status"), "paused")],
        "models.abc123.deployments.v1.status",
        "'paused' is not one of: active, scaled_to_zero, inactive",
    ),
    (
        "model kind",
        [(("models", "abc123", "kind"), "pipeline")],
        "models.abc123.kind",
        "is not one of: model, chain",
    ),
    (
        "replicas",
        [(("models", "abc123", "deployments", "v1", "replicas"), 0)],
        "models.abc123.deployments.v1.replicas",
        "must be at least 1",
    ),
    (
        "development flag type",
        [(("models", "abc123", "deployments", "v1", "development"), "yes")],
        "models.abc123.deployments.v1.development",
        "expected true or false, got the string 'yes'",
    ),
    # api keys
    (
        "duplicate digest",
        [(("api_keys", 2, "sha256"), _EXAMPLE_DOC["api_keys"][0]["sha256"].upper())],
        "api_keys[2].sha256",
        "the same key digest is already listed at api_keys[0]",
    ),
    (
        "duplicate key name",
        [(("api_keys", 2, "name"), "demo")],
        "api_keys[2].name",
        "duplicate api key name 'demo'",
    ),
    ("bad digest", [(("api_keys", 0, "sha256"), "abc")], "api_keys[0].sha256", "is not a hex SHA-256 digest"),
    (
        "digest parsed as integer",
        [(("api_keys", 0, "sha256"), 12345)],
        "api_keys[0].sha256",
        "expected a string, got the integer 12345 (YAML read it as a number or boolean; quote it)",
    ),
    (
        "api key model of another team",
        [(("api_keys", 1, "models"), ["xyz789"])],
        "api_keys[1].models[0]",
        "model 'xyz789' belongs to team 'globex', not to the key's team 'acme'",
    ),
    ("api key missing digest", [(("api_keys", 0, "sha256"), DROP)], "api_keys[0].sha256", "is missing"),
    # timeouts and gateway settings
    (
        "total timeout over 1200",
        [(("planes", "us-east-1", "timeouts"), {"total_seconds": 1500})],
        "planes.us-east-1.timeouts.total_seconds",
        "must be at most 1200, got 1500",
    ),
    (
        "response start over 1200",
        [(("models", "abc123", "deployments", "v1", "timeouts"), {"response_start_seconds": 1200.5})],
        "models.abc123.deployments.v1.timeouts.response_start_seconds",
        "must be at most 1200",
    ),
    (
        "zero timeout",
        [(("gateway", "timeouts"), {"connect_seconds": 0})],
        "gateway.timeouts.connect_seconds",
        "must be greater than 0, got 0",
    ),
    (
        "infinite hold",
        [(("gateway", "hold_timeout_seconds"), float("inf"))],
        "gateway.hold_timeout_seconds",
        "non-finite",
    ),
    (
        "negative held calls",
        [(("gateway", "max_held_calls_per_deployment"), -1)],
        "gateway.max_held_calls_per_deployment",
        "must be at least 0",
    ),
    (
        "fractional held calls",
        [(("gateway", "max_held_calls_per_deployment"), 1.5)],
        "gateway.max_held_calls_per_deployment",
        "expected an integer",
    ),
    (
        "bad CIDR",
        [(("regions", "us", "networks"), ["127.0.0.0/8", "10.10.0.0/40"])],
        "regions.us.networks[1]",
        "'10.10.0.0/40' is not a network in CIDR form",
    ),
    (
        "CIDR not a string",
        [(("regions", "us", "networks"), [10])],
        "regions.us.networks[0]",
        "expected a string",
    ),
    (
        "nameserver host name",
        [(("gateway", "dns"), {"nameservers": ["dns.google"]})],
        "gateway.dns.nameservers[0]",
        "is not an IP address with an optional port",
    ),
    (
        "nameserver bad port",
        [(("gateway", "dns"), {"nameservers": ["8.8.8.8:0"]})],
        "gateway.dns.nameservers[0]",
        "not a valid port",
    ),
    (
        "nameserver unclosed bracket",
        [(("gateway", "dns"), {"nameservers": ["[::1:53"]})],
        "gateway.dns.nameservers[0]",
        "unclosed '['",
    ),
    (
        "nameserver bad ipv6",
        [(("gateway", "dns"), {"nameservers": ["[1::2::3]:53"]})],
        "gateway.dns.nameservers[0]",
        "not a valid IPv6 address",
    ),
    (
        "no nameservers",
        [(("gateway", "dns"), {})],
        "gateway.dns.nameservers",
        "required key 'nameservers' is missing",
    ),
    # types
    (
        "team is null",
        [(("teams", "globex"), None)],
        "teams.globex",
        "expected a mapping, got null (nothing) (write {} for an empty mapping)",
    ),
    ("models is a list", [(("models",), [])], "models", "expected a mapping, got a list"),
]


@pytest.mark.parametrize(("edits", "path", "text"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_rule_reports_one_precise_problem(edits: list[tuple[tuple[Any, ...], Any]], path: str, text: str) -> None:
    doc = example()
    for where, value in edits:
        edit(doc, where, value)
    problems = problems_of(doc)
    assert len(problems) == 1, problems
    got_path, message = problems[0].split(": ", 1)
    assert got_path == path
    assert text in message


def test_semantic_checks_still_run_next_to_structural_problems() -> None:
    doc = example()
    edit(doc, ("models", "abc123", "deployments", "v1", "status"), 3)  # structural
    edit(doc, ("models", "abc123", "environments", "prod-us", "deployment"), "v3")  # residency, same model
    edit(doc, ("models", "abc123", "deployments", "v2", "plane"), 7)  # structural: no cascade to references
    assert paths_of(problems_of(doc)) == {
        "models.abc123.deployments.v1.status",
        "models.abc123.deployments.v2.plane",
        "models.abc123.environments.prod-us.deployment",
    }


def test_moving_a_plane_reports_every_environment_it_breaks() -> None:
    doc = edit(example(), ("planes", "eu-west-1", "region"), "us")
    assert problems_of(doc) == [
        "models.abc123.environments.prod-eu.deployment: deployment 'v3' runs on plane 'eu-west-1' "
        "in region 'us', but environment 'prod-eu' is pinned to region 'eu'",
        "models.llm7.environments.prod-eu.deployment: deployment 't2' runs on plane 'eu-west-1' "
        "in region 'us', but environment 'prod-eu' is pinned to region 'eu'",
    ]


def test_a_pinned_environment_to_an_unknown_region_is_reported_once() -> None:
    doc = edit(example(), ("teams", "acme", "regional_environments", "prod-us"), "mars")
    assert problems_of(doc) == ["teams.acme.regional_environments.prod-us: unknown region 'mars'"]


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (None, "(document): the document is empty"),
        ([], "(document): expected a mapping, got a list"),
        ("text", "(document): expected a mapping, got the string 'text'"),
    ],
)
def test_documents_that_are_not_tables(doc: Any, expected: str) -> None:
    assert expected in problems_of(doc)


def test_recursive_python_document_is_a_problem_not_a_crash() -> None:
    doc = example()
    doc["models"]["abc123"]["deployments"]["v1"]["timeouts"] = doc["models"]["abc123"]
    assert problems_of(doc)


# -- parsing --------------------------------------------------------------------------------------


def parse_problem(data: bytes, source: str = "t.yaml") -> str:
    with pytest.raises(TableInvalid) as info:
        parse_document(data, source)
    assert len(info.value.problems) == 1
    return info.value.problems[0]


def test_yaml_syntax_error_names_source_and_line() -> None:
    problem = parse_problem(b"version: 1\ndomains: [a\nmodels: {}\n")
    assert problem.startswith("t.yaml: line ")
    assert "column" in problem


def test_duplicate_yaml_key_is_an_error_with_its_line() -> None:
    problem = parse_problem(b"version: 1\nmodels:\n  abc: {}\n  abc: {}\n")
    assert problem == "t.yaml: line 4, column 3: while reading a mapping found duplicate key 'abc'"


def test_duplicate_json_key_is_an_error_with_its_line() -> None:
    problem = parse_problem(b'{"version": 1,\n "version": 1}', "t.json")
    assert problem.startswith("t.json: line 2") and "duplicate key 'version'" in problem


def test_yaml_merge_keys_may_be_overridden() -> None:
    doc = parse_document(b"base: &b {a: 1, b: 2}\nx:\n  <<: *b\n  b: 3\n", "t.yaml")
    assert doc["x"] == {"a": 1, "b": 3}


def test_mapping_keys_keep_their_text() -> None:
    doc = parse_document(b"no: 1\n0123: 2\nnull: 3\n1.0: 4\n'q': 5\n", "t.yaml")
    assert list(doc) == ["no", "0123", "null", "1.0", "q"]
    assert doc["no"] == 1


def test_json_is_parsed() -> None:
    assert parse_document(b' {"version": 1, "x": [1.5, null, true]}', "t") == {
        "version": 1,
        "x": [1.5, None, True],
    }


def test_invalid_json_file_reports_the_json_error() -> None:
    problem = parse_problem(b'{"version": 1,, }', "t.json")
    assert problem.startswith("t.json: Expecting")


@pytest.mark.parametrize("depth", [64, 100])
def test_deep_nesting_is_refused_without_crashing(depth: int) -> None:
    # libyaml's own composer segfaults near 30,000 levels; this must stay an ordinary problem.
    assert "nesting deeper than 64 levels" in parse_problem(b"x: " + b"[" * depth + b"]" * depth)


@pytest.mark.parametrize(("data", "source"), [(b"x: " + b"[" * 50_000 + b"]" * 50_000, "t.yaml"),
                                              (b"[" * 50_000 + b"]" * 50_000, "t")])  # fmt: skip
def test_very_deep_documents_are_one_located_problem(data: bytes, source: str) -> None:
    # Refused by our composer bound or, from PyYAML 6.0.4 on, by libyaml's own flow-level limit,
    # whose wording is not ours: assert the behaviour (one problem, located, the process alive).
    problem = parse_problem(data, source)
    assert re.match(rf"{re.escape(source)}: line 1, column \d+: ", problem)
    assert "nest" in problem


def test_alias_bomb_is_refused() -> None:
    lines = [b"a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [b"a%d: &a%d [%s]" % (i, i, b", ".join([b"*a%d" % (i - 1)] * 10)) for i in range(1, 9)]
    assert "aliases expand the document to" in parse_problem(b"\n".join(lines))


def test_recursive_alias_is_refused() -> None:
    assert "refers to a node that contains it" in parse_problem(b"a: &x [1, *x]\n")


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"a: 1\n---\nb: 2\n", "expected a single document"),
        (b"a: !!python/object:os.system 1\n", "could not determine a constructor"),
        (b"a: 2024-02-30\n", "invalid value"),
        (b"\xff\xfe\xfa", "t.yaml: "),
        (b"? [a, b]\n: 1\n", "keys must be plain names"),
    ],
)
def test_other_parse_errors(data: bytes, text: str) -> None:
    assert text in parse_problem(data)


def test_empty_file_is_an_empty_document(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_bytes(b"# nothing\n")
    with pytest.raises(TableInvalid) as info:
        load_table(tmp_path / "t.yaml")
    assert info.value.problems == ["(document): the document is empty"]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(TableInvalid) as info:
        load_table(tmp_path / "missing.yaml")
    assert info.value.problems == [f"{tmp_path / 'missing.yaml'}: cannot read the file: No such file or directory"]


def test_odd_keys_are_quoted_in_paths() -> None:
    doc = edit(example(), ("models", "a.b"), {})
    assert "models[\"a.b\"]: 'a.b' is not a valid model id (1 to 32 lowercase letters and digits)" in problems_of(doc)


# -- properties -----------------------------------------------------------------------------------


def _all_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _all_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _all_paths(value, prefix + (i,))
    return out


_PATHS = _all_paths(_EXAMPLE_DOC)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["v1", "us", "eu", "acme", "production", "development", "http://x:1"]),
)
_KEYS = st.one_of(st.text(max_size=8), st.sampled_from(["development", "production", "Prod", "a.b", "v9"]))


class Rename:
    def __init__(self, key: str) -> None:
        self.key = key

    def __repr__(self) -> str:
        return f"Rename({self.key!r})"


_MUTATION = st.tuples(
    st.sampled_from(_PATHS),
    st.one_of(st.just(DROP), _SCALARS, st.just({}), st.just([]), st.builds(Rename, _KEYS)),
)


def _mutate(mutations: list[tuple[tuple[Any, ...], Any]]) -> dict[str, Any]:
    """Apply (path, DROP | Rename(new key) | new value) edits to the example; skip stale paths."""
    doc = example()
    for path, value in mutations:
        try:
            node = doc
            for seg in path[:-1]:
                node = node[seg]
            if value is DROP:
                del node[path[-1]]
            elif isinstance(value, Rename):
                if isinstance(node, dict):
                    node[value.key] = node.pop(path[-1])
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced the parent
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_tables_compile_or_list_problems(mutations: list[tuple[tuple[Any, ...], Any]]) -> None:
    doc = _mutate(mutations)
    try:
        table = compile_table(doc)
    except TableInvalid as exc:
        assert exc.problems
        assert all(": " in p for p in exc.problems)
    else:
        assert isinstance(table, Table)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_MUTATION, min_size=1, max_size=4))
def test_fast_gate_never_accepts_what_jsonschema_rejects(
    mutations: list[tuple[tuple[Any, ...], Any]],
) -> None:
    doc = _mutate(mutations)
    full = loader._explain(loader._DOC_VALIDATOR, doc, ())
    if loader._GATE.root(doc):
        assert full == []
    # Explaining model by model finds exactly what validating the whole document finds.
    assert set(loader._structural_problems(doc)) == set(full)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_any_bytes_parse_or_list_a_problem(data: bytes) -> None:
    try:
        doc = parse_document(data, "t.yaml")
    except TableInvalid as exc:
        assert len(exc.problems) == 1 and exc.problems[0].startswith("t.yaml: ")
        return
    try:
        compile_table(doc)
    except TableInvalid as exc:
        assert exc.problems


def test_big_collections_are_explained_entry_by_entry() -> None:
    # With 100,000 models jsonschema must not walk the whole document (see loader._structural_problems).
    assert set(loader._COLLECTIONS) == {"regions", "planes", "teams", "api_keys", "admin_keys", "models"}


@pytest.mark.parametrize("module", ["problems", "document", "syntax", "schema_gate", "semantics", "build", "loader"])
def test_loader_modules_import_on_their_own(module: str) -> None:
    # Each concern imports alone in a fresh interpreter: no import cycle hides behind the facade.
    import subprocess
    import sys

    code = f"import gateway.routing.{module}"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_facade_keeps_the_loader_names() -> None:
    from gateway.routing import build, document, schema_gate, semantics, syntax

    assert loader.parse_document is document.parse_document
    assert loader.parse_upstream is syntax.parse_upstream
    assert loader._GATE is schema_gate.GATE and loader._structural_problems is schema_gate.structural_problems
    assert loader.compile_table(_facade_doc()).models["m"].deployments["v1"].plane.name == "p"
    assert semantics.Semantics and build.Builder
    for name in loader.__all__:
        assert hasattr(loader, name), name


def _facade_doc() -> dict[str, Any]:
    return {
        "version": 1,
        "domains": ["api.example.com"],
        "regions": {"us": {}},
        "planes": {"p": {"region": "us", "url": "http://127.0.0.1:9001"}},
        "teams": {"t": {}},
        "models": {
            "m": {
                "team": "t",
                "deployments": {"v1": {"plane": "p"}},
                "environments": {"production": {"deployment": "v1"}},
            }
        },
    }
