"""Test support: a real gateway process, real plane servers, raw HTTP clients, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from gateway.routing.loader import TableInvalid, compile_table

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "routing_config" / "example.yaml"
DEMO_KEY = "demo-key-acme"
KEY_HEADER = {"Authorization": f"Api-Key {DEMO_KEY}"}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def example_doc(us_url: str, eu_url: str) -> dict:
    """The example table with its planes pointed at the given addresses."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["planes"]["us-east-1"]["url"] = us_url
    doc["planes"]["eu-west-1"]["url"] = eu_url
    return doc


def loader_problems(doc: dict) -> list[str]:
    """Every problem the loader reports for `doc`; [] when it compiles."""
    try:
        compile_table(doc)
    except TableInvalid as error:
        return list(error.problems)
    return []


def write_table(path: Path, doc: dict) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)  # atomic, as an operator's deploy tool would do
    return path


class GatewayProcess:
    """`python -m gateway serve` as a child process on free loopback ports."""

    def __init__(self, config: Path, *extra: str, env: dict | None = None, grpc_port: int | None = None) -> None:
        self.config = config
        self.grpc_port = grpc_port  # with a port: `--grpc-port` (the gRPC listener, SPEC §9)
        self.port = free_port()
        self.admin_port = free_port()
        self.extra = extra
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.log_path = config.parent / f"gateway-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(self.config), "--port", str(self.port),
               "--admin-port", str(self.admin_port), *self.extra]  # fmt: skip
        if self.grpc_port is not None:
            cmd += ["--grpc-port", str(self.grpc_port)]
        return cmd

    def start(self) -> GatewayProcess:
        cmd = self.command()
        self.log = open(self.log_path, "wb")
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.admin_url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"gateway not ready after 30 s:\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def admin(self, method: str, path: str, token: str | None = None, body: object = None) -> tuple[int, dict | str]:
        """An admin call (`body`: sent as JSON); the status and the decoded answer."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.admin_url + path, data=data, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode()


def interrupt(proc: subprocess.Popen) -> None:
    """Ctrl-C for a child (`gateway demo`): SIGINT, then SIGKILL after 10 s; its stdout pipe closed."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def wait_for(predicate: Callable[[], Any], what: str = "the condition", timeout: float = 30.0) -> Any:
    """Poll until `predicate()` is truthy and return its value; fail after `timeout` (a bound, not a timing assert)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def running_gateway(
    config: Path, *extra: str, env: dict | None = None, grpc_port: int | None = None
) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(config, *extra, env=env, grpc_port=grpc_port).start()
    try:
        yield gw
    finally:
        gw.stop()


async def raw_request(
    port: int, data: bytes, *, read_until_close: bool = True, timeout: float = 10, partial_on_timeout: bool = False
) -> bytes:
    """Send raw bytes, return raw bytes read (until close, or one response's worth of time).

    With `partial_on_timeout`, a server that keeps the connection open past `timeout` (it is
    waiting for more of a request) yields what was read so far instead of raising.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not read_until_close and b"\r\n\r\n" in b"".join(chunks):
                    break
    except TimeoutError:
        if not partial_on_timeout:
            raise
    finally:
        writer.close()
    return b"".join(chunks)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body
