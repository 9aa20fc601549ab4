"""The operator artefacts: Dockerfile, deploy/kubernetes/ and README links, checked against the real gateway."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.support import REPO, free_port, wait_for

K8S = REPO / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes release the manifests are validated against (strict schemas)
BIN = Path(sys.executable).parent


# -- Dockerfile -------------------------------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def args_of(kind: str) -> str:
    return next(rest for word, rest in instructions() if word == kind)


def flags(args: list[str]) -> dict[str, str]:
    """`--name value` and `--name=value` items of a command line."""
    out, i = {}, 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if eq:
            out[name] = value
        elif name.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[name] = args[i + 1]
            i += 1
        i += 1
    return out


def env_of(rest: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(rest))


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions():
        if word == "ENV":
            env.update(env_of(rest))
    return env


def test_dockerfile_runs_as_a_user_exposes_the_ports_and_pins_what_it_installs() -> None:
    steps = instructions()
    words = [word for word, _ in steps]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", args_of("FROM")), "pin the base image's exact version"
    user = [rest for word, rest in steps if word == "USER"]
    assert (
        user
        and user[-1] not in ("root", "0")
        and words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    )
    cmd = flags(json.loads(args_of("CMD")))
    assert json.loads(args_of("ENTRYPOINT")) == ["gateway", "serve"] and "--config" not in cmd
    exposed = {int(p) for p in args_of("EXPOSE").split()}
    assert exposed == {int(cmd["--port"]), int(cmd["--admin-port"]), int(cmd["--grpc-port"])}
    env = image_env()
    assert env["GATEWAY_CONFIG"] == "/etc/gateway/table.yaml" and env["PIP_CONSTRAINT"] == "/app/constraints.txt"
    assert any(word == "COPY" and "constraints.txt" in rest for word, rest in steps)
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
    for package, version in re.findall(r'pip install "?([\w-]+)==([\w.]+)', args_of("RUN")):
        assert pins[package] == version, f"{package}=={version} in the Dockerfile, {pins[package]} in constraints.txt"
    for volume_path in (cmd["--store"], cmd["--queue-store"]):
        assert volume_path.startswith(args_of("VOLUME") + "/")


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([str(BIN / "hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def healthcheck() -> list[str]:
    rest = args_of("HEALTHCHECK")
    return json.loads(rest[rest.index("CMD ") + 4 :])


def serve(args: list[str], env: dict[str, str], tmp_path: Path) -> tuple[subprocess.Popen, dict[str, int]]:
    """`gateway serve` with `args` as given, but free ports and paths under `tmp_path`; ready."""
    chosen = {"--port": free_port(), "--admin-port": free_port(), "--grpc-port": free_port()}
    out = []
    for item in args:
        name, eq, value = item.partition("=")
        if value.startswith("/var/lib/gateway"):
            value = str(tmp_path / "state" / value.removeprefix("/var/lib/gateway/"))
        out.append(f"{name}={chosen.get(name, value)}" if eq else item)
    fixed = flags(out)
    line = [item for name in fixed for item in (name, str(chosen.get(name, fixed[name])))]
    proc = subprocess.Popen([str(BIN / "gateway"), "serve", *line], env={**os.environ, **env}, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(lambda: proc.poll() is not None or _ready(chosen["--admin-port"]), "the gateway to be ready")
    assert proc.poll() is None, proc.communicate()[1]
    return proc, chosen


def _ready(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def table_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "etc" / "table.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_image_command_serves_the_mounted_table_and_its_healthcheck_answers(tmp_path: Path) -> None:
    table = table_file(tmp_path, (REPO / "routing_config" / "example.yaml").read_text())
    env = {"GATEWAY_CONFIG": str(table), "GATEWAY_DEMO_WEBHOOK_SECRET": "image-test"}
    args = [f"{name}={value}" for name, value in flags(json.loads(args_of("CMD"))).items()]
    proc, ports = serve(args, env, tmp_path)
    check = [sys.executable if part == "python" else part for part in healthcheck()]
    check = [part.replace(":9090/", f":{ports['--admin-port']}/") for part in check]
    try:
        assert "/healthz" in " ".join(check)
        assert subprocess.run(check, capture_output=True, timeout=10).returncode == 0
    finally:
        assert stop(proc) == 0
    assert subprocess.run(check, capture_output=True, timeout=10).returncode != 0  # nothing listens now


# -- Kubernetes ---------------------------------------------------------------------------------------------------


def manifests() -> dict[str, dict]:
    """`Kind/name` -> document, from every file of deploy/kubernetes/."""
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name'] if 'metadata' in doc else path.stem}"] = doc
    return docs


def test_manifests_are_valid_kubernetes_objects() -> None:
    docs = manifests()
    kustomization = docs.pop("Kustomization/kustomization")
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.stem != "kustomization")
    assert {key.split("/")[0] for key in docs} == {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
    }
    for doc in docs.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises, naming the field, when invalid
    broken = docs["Deployment/gateway"]
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):  # the strict schemas do see a misspelt field
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def deployment() -> tuple[dict, dict, dict[str, str]]:
    dep = manifests()["Deployment/gateway"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, container, flags(container["args"])


def test_probes_ports_selectors_and_grace_period_agree_with_the_container() -> None:
    docs = manifests()
    dep, container, args = deployment()
    pod = dep["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(args["--port"]), "grpc": int(args["--grpc-port"]), "admin": int(args["--admin-port"])}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "admin"}
    # The admin listener binds a non-loopback address only with an admin token: the Secret provides it.
    assert args["--admin-host"] == "0.0.0.0"
    env = {e["name"]: e for e in container["env"]}
    ref = env["GATEWAY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in docs[f"Secret/{ref['name']}"]["stringData"]
    # SIGTERM: the preStop pause and the whole drain fit in the grace period.
    pause = re.search(r"sleep\((\d+)\)", " ".join(container["lifecycle"]["preStop"]["exec"]["command"]))
    assert pause is not None
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(args["--drain-timeout"]) + int(pause.group(1))
    labels = pod["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert docs["PodDisruptionBudget/gateway"]["spec"]["selector"]["matchLabels"] == selector
    for name in ("Service/gateway", "Service/gateway-admin"):
        service = docs[name]["spec"]
        assert service["selector"].items() <= labels.items()
        assert all(p["targetPort"] in ports for p in service["ports"])
    # Non-root, as the image's USER; a read-only root, so every path the gateway writes is a volume.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert str(pod["spec"]["securityContext"]["runAsUser"]) == args_of("USER")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for written in (args["--store"], args["--queue-store"], "/tmp/x"):
        assert any(written.startswith(m + "/") for m in mounts), written
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()


def test_the_configmap_table_passes_gateway_check_at_the_mounted_path(tmp_path: Path) -> None:
    docs = manifests()
    dep, container, _ = deployment()
    env = {e["name"]: e.get("value") for e in container["env"]}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "table"]
    (volume,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "table"]
    key = env["GATEWAY_CONFIG"].removeprefix(mount["mountPath"] + "/")
    text = docs[f"ConfigMap/{volume['configMap']['name']}"]["data"][key]
    table = table_file(tmp_path, text)
    result = subprocess.run([str(BIN / "gateway"), "check", str(table)], capture_output=True, text=True)
    assert result.returncode == 0 and ": ok (" in result.stdout, result.stdout


def test_the_deployment_command_serves_its_probes_with_the_secret_token(tmp_path: Path) -> None:
    docs = manifests()
    _, container, _ = deployment()
    table = table_file(tmp_path, docs["ConfigMap/gateway-table"]["data"]["table.yaml"])
    token = docs["Secret/gateway-admin"]["stringData"]["GATEWAY_ADMIN_TOKEN"]
    proc, ports = serve(container["args"], {"GATEWAY_CONFIG": str(table), "GATEWAY_ADMIN_TOKEN": token}, tmp_path)
    admin = f"http://127.0.0.1:{ports['--admin-port']}"
    try:
        for path in ("/healthz", "/readyz", "/metrics"):  # what the kubelet and Prometheus call, without the token
            with urllib.request.urlopen(admin + path, timeout=5) as r:
                assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(admin + "/v1/routing", timeout=5)
        assert refused.value.code == 401
        refused.value.close()
        req = urllib.request.Request(admin + "/v1/routing", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.load(r)["models"] == 1
    finally:
        assert stop(proc) == 0


# -- README -------------------------------------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_links_stay_inside_the_repository() -> None:
    for target in LINK.findall((REPO / "README.md").read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (REPO / target.partition("#")[0]).resolve()
        assert path.is_relative_to(REPO), f"README links outside the repository: {target}"
        assert path.exists(), f"README links a missing file: {target}"


def test_the_contract_is_in_the_repository() -> None:
    spec = (REPO / "docs" / "SPEC.md").read_text()
    assert "](docs/SPEC.md)" in (REPO / "README.md").read_text()
    assert "## §12 Settings with fixed names" in spec
