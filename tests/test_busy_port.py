"""A listener port already taken: one line naming the port and its flag, exit 2, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.ports import EXIT_CODE
from tests.support import REPO, example_doc, free_port, write_table

ENV = {**os.environ, "GATEWAY_DEMO_WEBHOOK_SECRET": "busy-port-test"}  # the example table's webhook secret


def taken() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def ports(flag: str, busy: int) -> list[str]:
    chosen = {"--port": free_port(), "--admin-port": free_port(), "--grpc-port": free_port(), flag: busy}
    return [item for name, port in chosen.items() for item in (name, str(port))]


def assert_one_line(result: subprocess.CompletedProcess, flag: str, busy: int) -> None:
    assert result.returncode == EXIT_CODE, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"gateway: cannot listen on 127.0.0.1:{busy}: port {busy} is already in use (change {flag})"
    ]


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("flag", ["--port", "--admin-port", "--grpc-port"])
def test_serve_on_a_busy_port_says_which_port_and_flag(tmp_path: Path, flag: str, workers: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = write_table(tmp_path / "t.yaml", example_doc(dead, dead))
    sock, busy = taken()
    with sock:
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", workers, *ports(flag, busy)],
            capture_output=True, text=True, timeout=60, cwd=REPO, env=ENV,
        )  # fmt: skip
    assert_one_line(result, flag, busy)


@pytest.mark.parametrize("flag", ["--port", "--admin-port", "--grpc-port"])
def test_demo_on_a_busy_port_says_which_port_and_flag(tmp_path: Path, flag: str) -> None:
    doc = example_doc(f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}")
    config = write_table(tmp_path / "demo.yaml", doc)
    sock, busy = taken()
    with sock:
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "demo", "--config", str(config), *ports(flag, busy)],
            capture_output=True, text=True, timeout=60, cwd=REPO, env=ENV,
        )  # fmt: skip
    assert_one_line(result, flag, busy)


def test_demo_names_the_plane_whose_port_is_busy(tmp_path: Path) -> None:
    sock, busy = taken()
    with sock:
        doc = example_doc(f"http://127.0.0.1:{busy}", f"http://127.0.0.1:{free_port()}")
        config = write_table(tmp_path / "demo.yaml", doc)
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "demo", "--config", str(config), *ports("--port", free_port())],
            capture_output=True, text=True, timeout=60, cwd=REPO, env=ENV,
        )  # fmt: skip
    assert result.returncode == EXIT_CODE and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"gateway: cannot listen on 127.0.0.1:{busy}: port {busy} is already in use "
        f"(change plane us-east-1's url in {config})"
    ]
