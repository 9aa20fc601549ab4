"""deploy/fleet/ (issue 14): the compose file's topology checked, then run for real on 127.0.0.1.

Docker is not available here, so the compose file is not run by Docker: its gateway, plane and
migrate commands are run as they are written (ports, paths and database hosts remapped), over
fresh databases on the real PostgreSQL, behind a real HAProxy started with deploy/fleet/haproxy.cfg
(its addresses remapped the same way). Calls go through the load balancer; an admin change through
one gateway is served through it; a gateway told to stop (SIGTERM) is taken out by the /readyz
health check while its call in flight finishes.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from gateway.cli import _parser
from gateway.routing.loader import load_table
from tests.fleet import fresh_database
from tests.support import REPO, free_port, wait_for

FLEET = REPO / "deploy" / "fleet"
TOKEN = "fleet-test-token"
KEY = "demo-key-acme"  # the demo key of deploy/fleet/table.yaml
HOST = "model-abc123.api.example.com"
STATE = "/var/lib/gateway"


# -- the files, read --------------------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((FLEET / "compose.yaml").read_text())


def services(kind: str) -> dict[str, dict]:
    """The compose services of one kind: gateway (`gateway serve`), plane, migrate, database, lb."""
    out = {}
    for name, svc in compose()["services"].items():
        entry = svc.get("entrypoint") or []
        image = svc["image"]
        found = (
            "lb" if image.startswith("haproxy:") else
            "database" if image.startswith("postgres:") else
            "migrate" if entry[:3] == ["gateway", "store", "migrate"] else
            "plane" if entry[-1:] == ["gateway.demo.planes"] else
            "gateway" if not entry else None
        )  # fmt: skip
        if found == kind:
            out[name] = svc
    return out


def flag_values(command: list[str], name: str) -> list[str]:
    return [item.partition("=")[2] for item in command if item.partition("=")[0] == name]


def flag(command: list[str], name: str) -> str:
    (value,) = flag_values(command, name)
    return value


def queue_urls(command: list[str]) -> dict[str, str]:
    return dict(value.split("=", 1) for value in flag_values(command, "--queue-store") if "=" in value)


def database_service(url: str) -> tuple[str, str]:
    """(compose service, database name) a store URL points at."""
    parts = urlsplit(url)
    return str(parts.hostname), parts.path.lstrip("/")


def lb_servers() -> dict[str, list[tuple[str, int, int | None]]]:
    """haproxy.cfg: backend -> [(server host, port, health check port or None)]."""
    backends: dict[str, list] = {}
    current = None
    for line in (FLEET / "haproxy.cfg").read_text().splitlines():
        words = line.split("#")[0].split()
        if words[:1] == ["backend"]:
            current = backends.setdefault(words[1], [])
        elif words[:1] in (["frontend"], ["defaults"], ["global"], ["resolvers"]):
            current = None
        elif words[:1] == ["server"] and current is not None:
            host, port = words[2].rsplit(":", 1)
            check = int(words[words.index("port") + 1]) if "port" in words[3:] else None
            current.append((host, int(port), check))
    return backends


def lb_binds() -> list[int]:
    return [int(m) for m in re.findall(r"^\s*bind :(\d+)", (FLEET / "haproxy.cfg").read_text(), re.M)]


def serve_args(command: list[str], monkeypatch: pytest.MonkeyPatch) -> object:
    """The real `gateway serve` parser over a compose command (GATEWAY_CONFIG as the container has it)."""
    monkeypatch.setenv("GATEWAY_CONFIG", "/etc/gateway/table.yaml")
    return _parser().parse_args(["serve", *list(command)])


# -- the files, checked ------------------------------------------------------------------------------------------


def test_three_gateways_after_the_migration_with_one_control_and_one_queue_database_per_region(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateways, databases = services("gateway"), services("database")
    (migrate,) = services("migrate").values()
    assert len(gateways) == 3
    table = load_table(str(FLEET / "table.yaml"))
    names = {name: svc["environment"]["POSTGRES_DB"] for name, svc in databases.items()}
    migrated = {flag(migrate["command"], "--store"), *queue_urls(migrate["command"]).values()}
    for name, svc in gateways.items():
        command = svc["command"]
        args = serve_args(command, monkeypatch)
        control = flag(command, "--store")
        assert args.store == control and control.startswith("postgresql://")  # type: ignore[attr-defined]
        queues = queue_urls(command)
        assert set(queues) == set(table.regions), f"{name}: a queue database for every region it serves"
        urls = [control, *queues.values()]
        assert len({database_service(u) for u in urls}) == len(urls), f"{name}: one database each, never shared"
        for url in urls:
            host, db = database_service(url)
            assert names[host] == db, f"{name}: {url} names a database its service does not create"
        assert set(urls) == migrated, f"{name}: the migrate service migrates exactly the databases it uses"
        assert svc["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        # The table read-only at GATEWAY_CONFIG; what the gateway writes (the cache) in its volume.
        env = svc["environment"]
        assert env["GATEWAY_CONFIG"] == "/etc/gateway/table.yaml"
        assert f"./table.yaml:{env['GATEWAY_CONFIG']}:ro" in svc["volumes"]
        assert f"{name}:{STATE}" in svc["volumes"]
        assert flag(command, "--store-cache").startswith(STATE + "/")
        assert re.fullmatch(r"\$\{GATEWAY_ADMIN_TOKEN:\?.+\}", env["GATEWAY_ADMIN_TOKEN"])  # required, not defaulted
        assert flag(command, "--admin-host") == "0.0.0.0"  # allowed only with the token, which is required
        assert f":{flag(command, '--admin-port')}/readyz" in " ".join(svc["healthcheck"]["test"])
        grace = float(svc["stop_grace_period"].removesuffix("s"))
        assert grace > float(flag(command, "--drain-timeout"))
    migrate_args = _parser().parse_args(["store", "migrate", *list(migrate["command"])])
    assert migrate_args.store == flag(migrate["command"], "--store")
    assert set(migrate["depends_on"]) == set(databases)
    assert all(d == {"condition": "service_healthy"} for d in migrate["depends_on"].values())


def test_the_load_balancer_checks_readyz_of_every_gateway_on_its_ports(tmp_path: Path) -> None:
    gateways = services("gateway")
    (lb,) = services("lb").values()
    commands = {name: svc["command"] for name, svc in gateways.items()}
    backends = lb_servers()
    text = (FLEET / "haproxy.cfg").read_text()
    for backend, port_flag in (("gateways", "--port"), ("gateways-grpc", "--grpc-port"), ("gateways-admin", None)):
        servers = backends[backend]
        assert {host for host, _, _ in servers} == set(gateways), backend
        for host, port, check in servers:
            command = commands[host]
            admin = int(flag(command, "--admin-port"))
            assert port == int(flag(command, port_flag or "--admin-port")), (backend, host)
            assert (check or port) == admin, f"{backend}/{host}: the health check goes to the admin port"
        block = text.split(f"backend {backend}\n", 1)[1].split("\nfrontend", 1)[0]
        assert "option httpchk GET /readyz" in block and "http-check expect status 200" in block
    published = {int(p.rsplit(":", 1)[1]) for p in lb["ports"]}
    assert published == set(lb_binds())
    assert set(lb["depends_on"]) == set(gateways)
    done = subprocess.run(
        ["haproxy", "-c", "-f", str(remapped_lb_config(tmp_path, {})[0])], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- the topology, run ---------------------------------------------------------------------------------------------


def remapped_lb_config(directory: Path, gateway_ports: dict[str, dict[int, int]]) -> tuple[Path, dict[int, int]]:
    """haproxy.cfg with every `gateway-N:PORT` and bind on 127.0.0.1 (ports mapped; free ones when unknown)."""
    text = (FLEET / "haproxy.cfg").read_text()
    chosen = {port: free_port() for port in lb_binds()}
    text = re.sub(r"bind :(\d+)", lambda m: f"bind 127.0.0.1:{chosen[int(m.group(1))]}", text)

    def server(m: re.Match) -> str:
        ports = gateway_ports.get(m.group(1), {})
        line = f"127.0.0.1:{ports.get(int(m.group(2)), free_port())}{m.group(3)}"
        return re.sub(r"port (\d+)", lambda p: f"port {ports.get(int(p.group(1)), free_port())}", line)

    text = re.sub(r"(gateway-\d+):(\d+)(.*)", server, text)
    path = directory / "haproxy.cfg"
    path.write_text(text)
    return path, chosen


class Topology:
    """The compose services as local processes: planes, the migration, gateways, HAProxy."""

    def __init__(self, tmp: Path, databases: dict[str, str]) -> None:
        self.tmp = tmp
        self.databases = databases  # compose database service -> the fresh database's URL (server part)
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, dict[int, int]] = {}  # service -> {port in compose: port here}
        self.lb_ports: dict[int, int] = {}

    def url(self, url: str) -> str:
        host, _ = database_service(url)
        return self.databases[host]

    def remap(self, service: str, command: list[str]) -> list[str]:
        out = []
        for item in list(command):
            name, eq, value = item.partition("=")
            if name in ("--port", "--admin-port", "--grpc-port"):
                value = str(self.ports.setdefault(service, {}).setdefault(int(value), free_port()))
            elif name in ("--host", "--admin-host"):
                value = "127.0.0.1"
            elif name == "--store":
                value = self.url(value)
            elif name == "--queue-store" and "=" in value:
                region, url = value.split("=", 1)
                value = f"{region}={self.url(url)}"
            elif value.startswith(STATE + "/"):
                value = str(self.tmp / service / "state" / value.removeprefix(STATE + "/"))
                Path(value).parent.mkdir(parents=True, exist_ok=True)
            out.append(f"{name}{eq}{value}")
        return out

    def start(self, service: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{service}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
                                env={**os.environ, **(env or {})})  # fmt: skip
        log.close()
        self.procs[service] = proc
        return proc

    def output(self, service: str) -> str:
        return (self.tmp / f"{service}.log").read_text(errors="replace")

    def planes(self) -> None:
        for name, svc in services("plane").items():
            argv = [sys.executable, *svc["entrypoint"][1:], *self.remap(name, svc["command"])]
            # The drain test needs a call that lasts: the streamed tokens come slower than the image's default.
            self.start(name, [*argv, "--token-interval=0.4"])
            port = next(iter(self.ports[name].values()))
            wait_for(lambda port=port: _answers(f"http://127.0.0.1:{port}/v1/models"), f"{name} to listen")

    def migrate(self) -> None:
        (svc,) = services("migrate").values()
        done = subprocess.run([sys.executable, "-m", "gateway", *svc["entrypoint"][1:], *self.remap("migrate", svc["command"])],
                              capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

    def table(self, service: str) -> Path:
        """deploy/fleet/table.yaml as this gateway's copy, its plane hosts on the local planes."""
        text = (FLEET / "table.yaml").read_text()
        for plane, ports in self.ports.items():
            for inside, here in ports.items():
                text = text.replace(f"http://{plane}:{inside}", f"http://127.0.0.1:{here}")
        path = self.tmp / service / "etc" / "table.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def gateways(self) -> None:
        for name, svc in services("gateway").items():
            env = {"GATEWAY_CONFIG": str(self.table(name)), "GATEWAY_ADMIN_TOKEN": TOKEN}
            self.start(name, [sys.executable, "-m", "gateway", "serve", *self.remap(name, svc["command"])], env)
        for name in services("gateway"):
            wait_for(lambda name=name: self.procs[name].poll() is not None or _answers(self.admin(name) + "/readyz"),
                     f"{name} to be ready", 90)  # fmt: skip
            assert self.procs[name].poll() is None, self.output(name)

    def admin(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service][9090]}"

    def public(self, service: str) -> int:
        return self.ports[service][8080]

    def balancer(self) -> None:
        path, self.lb_ports = remapped_lb_config(self.tmp, self.ports)
        self.start("lb", ["haproxy", "-db", "-f", str(path)])
        wait_for(lambda: self.procs["lb"].poll() is not None or _answers(self.stats_url()), "HAProxy", 30)
        assert self.procs["lb"].poll() is None, self.output("lb")

    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.lb_ports[8404]}/stats;csv"

    def stats(self, backend: str) -> dict[str, dict]:
        """HAProxy's view of each server of `backend`: its status (UP, DOWN, ...) and last check."""
        with urllib.request.urlopen(self.stats_url(), timeout=5) as r:
            rows = csv.DictReader(io.StringIO(r.read().decode().removeprefix("# ")))
            return {
                row["svname"]: row for row in rows if row["pxname"] == backend and row["svname"].startswith("gateway")
            }

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
            if proc.poll() is None:
                proc.kill()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def call(port: int, path: str = "/production/predict", host: str = HOST) -> tuple[int, dict]:
    """One call on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("POST", path, body=b"{}", headers={"Host": host, "Authorization": f"Api-Key {KEY}",
                                                       "Content-Type": "application/json"})  # fmt: skip
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def admin(base: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def requests_served(topology: Topology, service: str) -> float:
    with urllib.request.urlopen(topology.admin(service) + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(r"^gateway_requests_total\{[^}]*\} (\S+)$", text, re.M))


@contextlib.contextmanager
def databases() -> Iterator[dict[str, str]]:
    """A fresh, unmigrated database for every database service of the compose file."""
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(fresh_database(migrated=False)) for name in services("database")}


def test_the_compose_topology_runs_behind_haproxy(tmp_path: Path) -> None:
    with databases() as dbs:
        top = Topology(tmp_path, dbs)
        try:
            top.migrate()
            top.planes()
            top.gateways()
            top.balancer()
            lb = top.lb_ports[8080]
            wait_for(lambda: all(s["status"] == "UP" for s in top.stats("gateways").values()), "every gateway UP")

            # Calls through the load balancer, spread over the three gateways.
            before = {name: requests_served(top, name) for name in services("gateway")}
            for _ in range(30):
                status, body = call(lb)
                assert (status, body.get("deployment_id")) == (200, "v1"), body
            status, body = call(lb, "/environments/prod-eu/predict")
            assert (status, body.get("deployment_id"), body.get("region")) == (200, "v3", "eu"), body
            wait_for(lambda: all(requests_served(top, n) > before[n] for n in before), "calls on every gateway")

            # An admin change through one gateway is served through the load balancer, whichever gateway answers.
            start = time.monotonic()
            status, _ = admin(top.admin("gateway-1"), "POST", "/v1/models/abc123/environments/production/promote",
                              {"deployment_id": "v2"})  # fmt: skip
            assert status == 200
            wait_for(lambda: call(top.public("gateway-1"))[1].get("deployment_id") == "v2", "gateway-1 to serve it")
            itself = time.monotonic() - start  # the promotion is written, then finished by its lease holder
            wait_for(lambda: all(call(top.public(n))[1].get("deployment_id") == "v2" for n in before), "everywhere")
            print(f"promote through gateway-1: served by it after {itself * 1000:.0f} ms, by all three after "
                  f"{(time.monotonic() - start) * 1000:.0f} ms")  # fmt: skip
            for _ in range(30):
                assert call(lb)[1].get("deployment_id") == "v2"
            status, view = admin(f"http://127.0.0.1:{top.lb_ports[9090]}", "GET", "/v1/routing")
            assert status == 200 and view["store"]["state"] == "ok", view

            # SIGTERM: /readyz turns 503, the balancer takes the gateway out, its call in flight finishes.
            stream: dict = {}
            streaming = threading.Thread(target=_stream, args=(top.public("gateway-3"), stream))
            streaming.start()
            wait_for(lambda: stream.get("first"), "the stream to start")
            top.procs["gateway-3"].send_signal(signal.SIGTERM)
            down = wait_for(lambda: (s := top.stats("gateways")["gateway-3"])["status"] == "DOWN" and s,
                            "the balancer to take gateway-3 out", 30)  # fmt: skip
            assert top.procs["gateway-3"].poll() is None, "still draining its call when taken out"
            assert down["check_status"] == "L7STS" and down["check_code"] == "503", down  # by /readyz's answer
            outcomes = [call(lb)[0] for _ in range(20)]
            assert outcomes == [200] * 20, outcomes
            streaming.join(30)
            assert stream["status"] == 200 and stream["body"].endswith(b"data: [DONE]\n\n"), stream
            assert top.procs["gateway-3"].wait(30) == 0
            print(f"gateway-3 taken out by its /readyz ({down['check_status']} {down['check_code']}) while its "
                  f"stream went on; {len(outcomes)} calls through the balancer meanwhile: all 200")  # fmt: skip
        finally:
            top.close()


def _stream(port: int, out: dict) -> None:
    """A streaming call (llm7's token stream) directly to one gateway: its status, when it began, its body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/production/predict", body=b'{"max_tokens": 18}', headers={
            "Host": "model-llm7.api.example.com", "Authorization": f"Api-Key {KEY}",
            "Content-Type": "application/json",
        })  # fmt: skip
        r = conn.getresponse()
        out["status"] = r.status
        body = r.read1(65536)
        out["first"] = True
        while chunk := r.read1(65536):
            body += chunk
        out["body"] = body
    finally:
        out.setdefault("first", True)
        out.setdefault("body", b"")
        conn.close()


# -- deploy/kubernetes/fleet/ ----------------------------------------------------------------------------------------

K8S_FLEET = REPO / "deploy" / "kubernetes" / "fleet"
VAR = re.compile(r"\$\(([A-Z_][A-Z0-9_]*)\)")  # Kubernetes' expansion of a container's env in its args


def fleet_manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S_FLEET.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name'] if 'metadata' in doc else path.stem}"] = doc
    return docs


def expanded(container: dict, docs: dict[str, dict], args: list[str] | None = None) -> list[str]:
    """The container's args as the kubelet runs them: `$(VAR)` from its env, secretKeyRefs read from the Secret."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            secret = docs[f"Secret/{ref['name']}"]["stringData"]
            assert ref["key"] in secret, f"{container['name']}: {ref} is not in the Secret"
            env[item["name"]] = secret[ref["key"]]

    def one(m: re.Match) -> str:
        assert m.group(1) in env, f"{container['name']}: $({m.group(1)}) is not in its env"
        return env[m.group(1)]

    return [VAR.sub(one, arg) for arg in (container["args"] if args is None else args)]


def pod() -> tuple[dict, dict, dict]:
    dep = fleet_manifests()["Deployment/gateway"]
    spec = dep["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    (migrate,) = spec["initContainers"]
    return dep, container, migrate


def test_fleet_manifests_are_valid_kubernetes_objects() -> None:
    from tests.test_deploy_artifacts import K8S_VERSION

    docs = fleet_manifests()
    kustomization = docs.pop("Kustomization/kustomization")
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S_FLEET.glob("*.yaml") if p.stem != "kustomization"
    )
    assert {key.split("/")[0] for key in docs} == {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
    }
    for doc in docs.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_fleet_pods_migrate_first_and_serve_the_regions_of_their_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_deploy_artifacts import args_of

    docs = fleet_manifests()
    dep, container, migrate = pod()
    assert dep["spec"]["replicas"] == 3
    monkeypatch.setenv("GATEWAY_CONFIG", "/etc/gateway/table.yaml")
    serve = expanded(container, docs)
    args = _parser().parse_args(["serve", *list(serve)])
    assert args.store.startswith("postgresql://") and args.workers == 2
    assert migrate["command"] == ["gateway", "store", "migrate"] and migrate["image"] == container["image"]
    migrated = expanded(migrate, docs)
    _parser().parse_args(["store", "migrate", *list(migrated)])
    assert {flag(serve, "--store"), *queue_urls(serve).values()} == {
        flag(migrated, "--store"),
        *queue_urls(migrated).values(),
    }
    table = yaml.safe_load(docs["ConfigMap/gateway-table"]["data"]["table.yaml"])
    assert set(queue_urls(serve)) == set(table["gateway"]["regions"]), "a queue database for each region served"
    # Ports, probes, the drain and the writable paths, as deploy/kubernetes/ (tests/test_deploy_artifacts.py).
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "http": int(flag(serve, "--port")),
        "grpc": int(flag(serve, "--grpc-port")),
        "admin": int(flag(serve, "--admin-port")),
    }
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "admin"}
    pause = re.search(r"sleep\((\d+)\)", " ".join(container["lifecycle"]["preStop"]["exec"]["command"]))
    assert pause is not None
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(flag(serve, "--drain-timeout")) + int(pause.group(1))
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/gateway"]["readOnly"] is True
    for written in (flag(serve, "--store-cache"), "/tmp/x"):
        assert any(written.startswith(m + "/") and not v.get("readOnly") for m, v in mounts.items()), written
    assert str(dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) == args_of("USER")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert docs["PodDisruptionBudget/gateway"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for name in ("Service/gateway", "Service/gateway-admin"):
        assert docs[name]["spec"]["selector"].items() <= labels.items()
        assert all(p["targetPort"] in ports for p in docs[name]["spec"]["ports"])


def test_a_fleet_pod_migrates_then_serves_its_probes_on_a_real_database(tmp_path: Path) -> None:
    from tests.test_deploy_artifacts import serve, stop, table_file

    docs = fleet_manifests()
    _, container, migrate = pod()
    table = table_file(tmp_path, docs["ConfigMap/gateway-table"]["data"]["table.yaml"])
    token = docs["Secret/gateway-admin"]["stringData"]["GATEWAY_ADMIN_TOKEN"]
    secret = docs["Secret/gateway-stores"]["stringData"]
    with contextlib.ExitStack() as stack:
        local = {key: stack.enter_context(fresh_database(migrated=False)) for key in secret}
        docs["Secret/gateway-stores"]["stringData"] = local  # each Secret URL -> a fresh database here
        (tmp_path / "state").mkdir()  # the pod's emptyDir at /var/lib/gateway
        done = subprocess.run([sys.executable, "-m", "gateway", *migrate["command"][1:],
                               *list(expanded(migrate, docs))],
                              capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        args = list(expanded(container, docs))
        proc, ports = serve(args, {"GATEWAY_CONFIG": str(table), "GATEWAY_ADMIN_TOKEN": token}, tmp_path)
        admin_url = f"http://127.0.0.1:{ports['--admin-port']}"
        try:
            for path in ("/healthz", "/readyz", "/metrics"):
                with urllib.request.urlopen(admin_url + path, timeout=5) as r:
                    assert r.status == 200
            req = urllib.request.Request(admin_url + "/v1/routing", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                view = json.load(r)
            assert view["store"]["state"] == "ok" and len(view["workers"]) == 2, view
            assert Path(flag(args, "--store-cache").replace("/var/lib/gateway", str(tmp_path / "state"))).exists()
        finally:
            assert stop(proc) == 0
