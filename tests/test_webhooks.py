"""Webhook delivery (SPEC §10 "Results and webhooks"): signatures, outcomes and the address rule.

Pure parts are table-driven. Deliveries go to real receivers on 127.0.0.1: an aiohttp app that
verifies both signature schemes, and a raw asyncio server that counts every connection it accepts
(so "refused" is shown to mean "never dialled"). Names resolve through the test DNS server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import ssl
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
import uvloop
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.asyncq.webhook import (
    WEBHOOK_TIMEOUT_SECONDS,
    Delivery,
    WebhookRefused,
    WebhookSender,
    allowed_host_set,
    check_addresses,
    load_secrets,
    payload,
    refused_address,
    retry_delay,
    signature_headers,
    url_problem,
    verify_baseten,
    verify_standard,
)
from gateway.dns import Resolver
from gateway.errors import ConnectFailed, NoAddress
from gateway.routing.loader import compile_table
from gateway.upstream.connect import Connector
from tests.dnsserver import DNSServer
from tests.support import example_doc, free_port
from tests.test_connector import FakeLookup

T = TypeVar("T")
REQUEST_ID = "0123456789abcdef0123456789abcdef"
PLAIN = b"plain-secret-\xff-bytes"
WHSEC = b"whsec_" + base64.b64encode(b"the standard key, 32 bytes long!")
LOOPBACK = frozenset({"127.0.0.1"})
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}  # the gateway runs on uvloop


def run(scenario: Coroutine[Any, Any, T], loop: str = "uvloop") -> T:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(scenario)


@pytest.fixture(autouse=True)
def no_loop_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A protocol callback that raised, a task nobody awaited: the event loop only logs them."""
    yield
    records = caplog.get_records("setup") + caplog.get_records("call")
    errors = [r.getMessage() for r in records if r.name == "asyncio" and r.levelno >= logging.WARNING]
    assert not errors, errors


# -- receivers ---------------------------------------------------------------------------------------


class RawReceiver:
    """A TCP server on 127.0.0.1 that reads one request per connection and sends `answer` (None: never).

    `connections` counts every accepted connection; `requests` keeps (head, body) of each request.
    With `keep_open` the server leaves the connection open after answering (ignoring `connection: close`).
    """

    def __init__(self, answer: bytes | None = OK, *, keep_open: bool = False) -> None:
        self.answer = answer
        self.keep_open = keep_open
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.port = 0
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RawReceiver:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        if self._tasks:  # each ends once its client closed; cancelling one logs noise on Python 3.11
            await asyncio.wait(set(self._tasks), timeout=5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length: *(\d+)", head)
                body = await reader.readexactly(int(length.group(1))) if length else b""
                self.requests.append((head, body))
                if self.answer is not None:
                    writer.write(self.answer)
                    await writer.drain()
                if self.answer is None or self.keep_open:
                    await reader.read()  # until the client gives up and closes
        finally:
            writer.close()
            self._tasks.discard(task)


@contextlib.asynccontextmanager
async def app_receiver(handler, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def sender(allowed: frozenset[str] = LOOPBACK, nameservers: tuple[str, ...] = (), **kw) -> WebhookSender:
    return WebhookSender(Connector(nameservers), allowed, **kw)


def deliver(url: str, body: bytes = b"{}", allowed: frozenset[str] = LOOPBACK, **kw) -> Delivery:
    async def scenario() -> Delivery:
        return await sender(allowed, **kw).deliver(url, body, signature_headers(body, REQUEST_ID, 1, ()))

    return run(scenario())


# -- signatures ----------------------------------------------------------------------------------------


def by_hand_baseten(body: bytes, secret: bytes) -> str:
    return "v1=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def by_hand_standard(msg_id: str, timestamp: int, body: bytes, secret: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(b"whsec_")) if secret.startswith(b"whsec_") else secret
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_real_receiver_verifies_both_schemes_with_either_secret(loop: str) -> None:
    body = payload(REQUEST_ID, "abc123", "v1", {"answer": [1, 2]}, [], 1_764_000_000.5)
    timestamp = 1_764_000_001
    headers = signature_headers(body, REQUEST_ID, timestamp, (PLAIN, WHSEC))
    seen: list[dict] = []

    async def receive(request: web.Request) -> web.Response:
        raw = await request.read()
        h = request.headers
        seen.append({
            "raw": raw, "headers": dict(h), "path": request.path_qs,
            "baseten": [verify_baseten(raw, h["x-baseten-signature"], s) for s in (PLAIN, WHSEC)],
            "standard": [verify_standard(raw, h, s) for s in (PLAIN, WHSEC)],
            "tampered": [verify_baseten(raw + b" ", h["x-baseten-signature"], s) for s in (PLAIN, WHSEC)]
            + [verify_standard(raw + b" ", h, s) for s in (PLAIN, WHSEC)],
            "other_secret": [verify_baseten(raw, h["x-baseten-signature"], b"x"), verify_standard(raw, h, b"x")],
        })  # fmt: skip
        return web.Response(status=200)

    async def scenario() -> Delivery:
        async with app_receiver(receive) as port:
            return await sender().deliver(f"http://127.0.0.1:{port}/hooks/done?team=1", body, headers)

    assert run(scenario(), loop) == Delivery("delivered", 200, "the receiver answered 200")
    (got,) = seen
    assert got["raw"] == body and got["path"] == "/hooks/done?team=1"
    assert got["baseten"] == [True, True] and got["standard"] == [True, True]  # rotation: either secret alone
    assert not any(got["tampered"]) and not any(got["other_secret"])
    h = {k.lower(): v for k, v in got["headers"].items()}
    assert h["x-baseten-signature"] == f"{by_hand_baseten(body, PLAIN)},{by_hand_baseten(body, WHSEC)}"
    assert h["webhook-signature"] == (
        f"{by_hand_standard(REQUEST_ID, timestamp, body, PLAIN)} {by_hand_standard(REQUEST_ID, timestamp, body, WHSEC)}"
    )
    assert (h["x-baseten-request-id"], h["webhook-id"], h["webhook-timestamp"]) == (
        REQUEST_ID,
        REQUEST_ID,
        str(timestamp),
    )
    assert h["content-type"] == "application/json" and h["user-agent"] == "baseten-gateway-webhook/1"
    assert h["content-length"] == str(len(body)) and h["connection"] == "close"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", h["host"])


def test_the_published_standard_webhooks_vector() -> None:
    # The example of the Standard Webhooks / Svix documentation: a whsec_ secret is keyed by its base64.
    body = b'{"test": 2432232314}'
    headers = {
        "Webhook-Id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "Webhook-Timestamp": "1614265330",
        "Webhook-Signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }
    secret = b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    assert verify_standard(body, headers, secret)
    assert not verify_standard(body, headers, secret, tolerance_seconds=300, now=1614265330 + 301)
    assert verify_standard(body, headers, secret, tolerance_seconds=300, now=1614265330 + 299)
    assert not verify_standard(body, {**headers, "Webhook-Timestamp": "1614265331"}, secret)


def test_signature_headers_without_secrets_and_their_order() -> None:
    assert signature_headers(b"{}", REQUEST_ID, 7, ()) == [
        ("x-baseten-request-id", REQUEST_ID),
        ("webhook-id", REQUEST_ID),
        ("webhook-timestamp", "7"),
    ]
    names = [name for name, _ in signature_headers(b"{}", REQUEST_ID, 7, (PLAIN,))]
    assert names == [
        "x-baseten-request-id",
        "x-baseten-signature",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    ]


@pytest.mark.parametrize(
    "header",
    ["", "v1=", "v0=abcd", "v1=zz,v1=", "sha256=00"],
)
def test_garbage_baseten_headers_do_not_verify(header: str) -> None:
    assert not verify_baseten(b"{}", header, PLAIN)


def test_garbage_standard_headers_do_not_verify() -> None:
    good = dict(signature_headers(b"{}", REQUEST_ID, 5, (PLAIN,)))
    assert verify_standard(b"{}", good, PLAIN)
    for broken in ({"webhook-signature": ""}, {"webhook-timestamp": "x5"}, {"webhook-id": ""},
                   {"webhook-signature": good["webhook-signature"].replace("v1,", "v2,")}):  # fmt: skip
        assert not verify_standard(b"{}", {**good, **broken}, PLAIN)
    assert not verify_standard(b"{}", good, b"whsec_!!!")  # a secret that is not base64 verifies nothing


def test_the_payload_is_compact_json_in_the_spec_shape() -> None:
    body = payload(
        "r" * 32, "chain9", "d1", None, [{"code": "MODEL_PREDICT_ERROR", "message": "boom"}], 1796223845.123456
    )
    assert b" " not in body.replace(b'"boom"', b"")
    assert json.loads(body) == {
        "request_id": "r" * 32, "model_id": "chain9", "deployment_id": "d1", "type": "async_request_completed",
        "time": "2026-12-02T15:04:05.123456Z", "data": None,
        "errors": [{"code": "MODEL_PREDICT_ERROR", "message": "boom"}],
    }  # fmt: skip
    assert list(json.loads(body)) == ["request_id", "model_id", "deployment_id", "type", "time", "data", "errors"]


# -- secrets -------------------------------------------------------------------------------------------


def test_secrets_come_from_the_environment_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "s").write_bytes(b"from-a-file\n")
    (tmp_path / "w").write_bytes(WHSEC + b"\r\n")
    monkeypatch.setenv("HOOK_SECRET", "from-the-env")
    specs = [
        {"name": "new", "secret_env": "HOOK_SECRET"},
        {"name": "old", "secret_file": str(tmp_path / "s")},
        {"name": "std", "secret_file": str(tmp_path / "w")},
    ]
    assert load_secrets(specs) == (b"from-the-env", b"from-a-file", WHSEC)
    assert load_secrets([{"name": "x", "secret_env": "V"}], environ={"V": "given"}) == (b"given",)
    assert load_secrets([]) == ()


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"name": "rotated", "secret_env": "NO_SUCH_VARIABLE_FOR_WEBHOOKS"}, ["'rotated'", "NO_SUCH_VARIABLE"]),
        ({"name": "filed", "secret_file": "/nonexistent/secret"}, ["'filed'", "/nonexistent/secret"]),
        ({"name": "empty", "secret_env": "EMPTY"}, ["'empty'", "empty"]),
        ({"name": "badstd", "secret_env": "BADSTD"}, ["'badstd'", "base64"]),
        ({"name": "both", "secret_env": "EMPTY", "secret_file": "/x"}, ["'both'", "exactly one"]),
        ({"secret_env": "EMPTY"}, ["name"]),
    ],
)
def test_a_secret_that_cannot_be_read_names_itself(spec: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as error:
        load_secrets([spec], environ={"EMPTY": "", "BADSTD": "whsec_not*base64"})
    assert all(word in str(error.value) for word in words), str(error.value)


# -- outcomes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    ("answer", "outcome", "status"),
    [
        (OK, "delivered", 200),
        (b"HTTP/1.1 204 No Content\r\n\r\n", "delivered", 204),
        (b"HTTP/1.1 202 Accepted\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "delivered", 202),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n", "delivered", 201),
        (b"HTTP/1.0 200 OK\r\n\r\nbody until close", "delivered", 200),
        (b"HTTP/1.1 410 Gone\r\ncontent-length: 0\r\n\r\n", "gone", 410),
        (b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\noops", "retry", 500),
        (b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n", "retry", 429),
        (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", "retry", 404),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 100_000, "delivered", 200),  # past the cap
        (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n", "retry", 101),
        (b"garbage, not HTTP\r\n\r\n", "retry", None),
        (b"", "retry", None),  # closed without a byte
        (b"HTTP/1.1 200 OK\r\nx: " + b"y" * 70_000 + b"\r\n\r\n", "retry", None),  # a head past the cap
    ],
)
def test_what_the_receiver_answers_decides(answer: bytes, outcome: str, status: int | None, loop: str) -> None:
    async def scenario() -> tuple[Delivery, RawReceiver]:
        async with RawReceiver(answer) as receiver:
            return await sender().deliver(receiver.url + "/hook", b'{"a":1}', []), receiver

    delivery, receiver = run(scenario(), loop)
    assert (delivery.outcome, delivery.status) == (outcome, status), delivery
    assert receiver.connections == 1 and receiver.requests[0][1] == b'{"a":1}'
    assert receiver.requests[0][0].startswith(b"POST /hook HTTP/1.1\r\n")


def test_a_redirect_is_a_failed_delivery_and_is_not_followed() -> None:
    async def scenario() -> tuple[Delivery, int, int]:
        async with RawReceiver() as target:
            answer = f"HTTP/1.1 302 Found\r\nlocation: {target.url}/elsewhere\r\ncontent-length: 0\r\n\r\n".encode()
            async with RawReceiver(answer) as receiver:
                delivery = await sender().deliver(receiver.url, b"{}", [])
                return delivery, receiver.connections, target.connections

    delivery, asked, redirected_to = run(scenario())
    assert delivery.outcome == "retry" and delivery.status == 302 and "/elsewhere" in delivery.message
    assert (asked, redirected_to) == (1, 0)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_receiver_that_never_answers_is_a_retry_within_the_timeout(loop: str) -> None:
    async def scenario() -> tuple[Delivery, RawReceiver]:
        async with RawReceiver(None) as receiver:
            return await asyncio.wait_for(sender(timeout=0.5).deliver(receiver.url, b"{}", []), 10), receiver

    delivery, receiver = run(scenario(), loop)
    assert delivery == Delivery("retry", None, f"no answer from 127.0.0.1:{receiver.port} within 0.5 s")
    assert receiver.requests == [(receiver.requests[0][0], b"{}")]


@pytest.mark.parametrize("loop", LOOPS)
def test_an_answer_head_stands_when_its_body_never_ends(loop: str) -> None:
    """A 2xx head is a delivery even if the receiver keeps the connection open mid-body (no resend)."""

    async def scenario() -> Delivery:
        async with RawReceiver(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", keep_open=True) as receiver:
            return await asyncio.wait_for(sender(timeout=0.5).deliver(receiver.url, b"{}", []), 10)

    assert run(scenario(), loop) == Delivery("delivered", 200, "the receiver answered 200")


def test_a_complete_answer_on_a_connection_left_open_ends_the_delivery() -> None:
    answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"

    async def scenario() -> Delivery:
        async with RawReceiver(answer, keep_open=True) as receiver:
            # A bound far below the sender's timeout: the sender stops at the end of the answer.
            return await asyncio.wait_for(sender(timeout=60).deliver(receiver.url, b"{}", []), 10)

    assert run(scenario()).outcome == "delivered"


def test_a_closed_port_is_a_retry() -> None:
    delivery = deliver(f"http://127.0.0.1:{free_port()}/hook")
    assert delivery.outcome == "retry" and delivery.status is None and "could not connect" in delivery.message


def test_a_name_that_does_not_resolve_is_a_retry() -> None:
    async def scenario() -> Delivery:
        async with DNSServer() as dns:
            hooks = sender(frozenset({"gone.test"}), (dns.address,))
            return await hooks.deliver("http://gone.test/hook", b"{}", [])

    delivery = run(scenario())
    assert delivery.outcome == "retry" and "gone.test" in delivery.message


@pytest.mark.parametrize("loop", LOOPS)
def test_https_verifies_the_urls_host_over_the_resolved_address(loop: str) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("hooks.test").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    got: list[str] = []

    async def receive(request: web.Request) -> web.Response:
        got.append(request.headers["host"])
        return web.Response(status=204)

    async def scenario() -> tuple[Delivery, Delivery, Delivery, int]:
        async with DNSServer() as dns, app_receiver(receive, server_ctx) as port:
            dns.set("hooks.test", "A", "127.0.0.1")
            dns.set("other.test", "A", "127.0.0.1")
            allowed = frozenset({"hooks.test", "other.test"})
            hooks = sender(allowed, (dns.address,), ssl_context=client_ctx)
            good = await hooks.deliver(f"https://hooks.test:{port}/h", b"{}", [])
            wrong_name = await hooks.deliver(f"https://other.test:{port}/h", b"{}", [])
            untrusted = await sender(allowed, (dns.address,)).deliver(f"https://hooks.test:{port}/h", b"{}", [])
            return good, wrong_name, untrusted, port

    good, wrong_name, untrusted, port = run(scenario(), loop)
    assert good.outcome == "delivered" and good.status == 204 and got == [f"hooks.test:{port}"]
    assert wrong_name.outcome == "retry" and "other.test" in wrong_name.message  # the certificate is not theirs
    assert untrusted.outcome == "retry"  # the system trust store does not know the test CA


# -- the address rule: nothing refused is ever dialled ------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_refused_destinations_are_never_dialled(loop: str) -> None:
    async def scenario() -> tuple[list[Delivery], RawReceiver, Connector, DNSServer]:
        async with RawReceiver() as receiver, DNSServer() as dns:
            dns.set("hook.test", "A", "127.0.0.1")
            dns.set("mixed.test", "A", "93.184.216.34", "127.0.0.1")  # one refused address refuses the name
            dns.set("six.test", "AAAA", "::ffff:10.0.0.1")
            connector = Connector((dns.address,))
            hooks = WebhookSender(connector, frozenset(), timeout=2)
            p = receiver.port
            urls = [
                f"http://127.0.0.1:{p}/", f"https://127.0.0.1:{p}/", "https://10.0.0.1/", "https://192.168.1.1/",
                "https://169.254.169.254/latest/meta-data/", f"https://[::1]:{p}/", "https://[fe80::1]/",
                f"https://[::ffff:127.0.0.1]:{p}/", f"https://hook.test:{p}/", "https://mixed.test/",
                "https://six.test/", f"https://localhost:{p}/", "https://100.64.0.1/", "https://0.0.0.0/",
            ]  # fmt: skip
            deliveries = [await hooks.deliver(url, b"{}", []) for url in urls]
            return deliveries, receiver, connector, dns

    deliveries, receiver, connector, dns = run(scenario(), loop)
    assert [d.outcome for d in deliveries] == ["refused"] * len(deliveries), deliveries
    assert all(d.status is None for d in deliveries)
    assert receiver.connections == 0 and connector.opened == 0
    assert dns.queries["hook.test"] and dns.queries["mixed.test"]  # refused on the resolved answer
    assert "plain http" in deliveries[0].message
    assert "'hook.test' resolves to a refused address: 127.0.0.1 is a loopback address" in deliveries[8].message
    assert "embeds 10.0.0.1, a private address" in deliveries[10].message


def test_a_listed_host_may_use_http_and_any_address() -> None:
    async def scenario() -> tuple[Delivery, Delivery, Delivery, RawReceiver]:
        async with RawReceiver() as receiver, DNSServer() as dns:
            dns.set("hook.test", "A", "127.0.0.1")
            hooks = WebhookSender(Connector((dns.address,)), frozenset({"HOOK.test", "localhost"}))
            by_name = await hooks.deliver(f"http://Hook.Test.:{receiver.port}/n", b"{}", [])
            by_localhost = await hooks.deliver(f"http://localhost:{receiver.port}/l", b"{}", [])
            unlisted = await hooks.deliver(f"http://127.0.0.1:{receiver.port}/l", b"{}", [])
            return by_name, by_localhost, unlisted, receiver

    by_name, by_localhost, unlisted, receiver = run(scenario())
    assert (by_name.outcome, by_localhost.outcome, unlisted.outcome) == ("delivered", "delivered", "refused")
    assert receiver.connections == 2
    assert b"\r\nhost: Hook.Test.:" in receiver.requests[0][0]  # the URL's authority, as written


ANY_ADDRESS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.sampled_from(["8.8.8.8", "1.1.1.1", "2606:4700::1111", "127.0.0.1", "10.1.1.1", "169.254.169.254",
                     "::ffff:10.0.0.1", "fd00:ec2::254", "100.64.1.1", "::1"]),
)  # fmt: skip


CLIENT_TLS = ssl.create_default_context()  # once: loading the trust store is most of an example's time


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=st.lists(ANY_ADDRESS, min_size=1, max_size=4, unique=True))
def test_no_refused_address_is_ever_dialled(answer: list[str]) -> None:
    dialled: list[str] = []

    async def scenario() -> Delivery:
        resolver = Resolver(())
        resolver._lookup = FakeLookup(tuple(answer))  # type: ignore[assignment]
        loop = asyncio.get_running_loop()

        async def recording(factory: Any, host: str, port: int, **kw: Any) -> Any:
            dialled.append(host)
            raise ConnectionRefusedError(111, "Connection refused")

        loop.create_connection = recording  # type: ignore[method-assign]
        try:
            hooks = WebhookSender(Connector(resolver=resolver), frozenset(), ssl_context=CLIENT_TLS)
            return await hooks.deliver("https://hook.test/", b"", [])
        finally:
            resolver.close()

    delivery = asyncio.run(scenario())
    if any(refused_address(a) for a in answer):
        assert delivery.outcome == "refused" and dialled == []  # fail closed: nothing dialled
        with pytest.raises(WebhookRefused):
            check_addresses("hook.test", tuple(answer))
    else:
        assert delivery.outcome == "retry" and dialled and set(dialled) <= set(answer)


def test_open_checked_refuses_before_dialling_and_maps_failures() -> None:
    calls: list[tuple[str, ...]] = []

    def refuse_any_loopback(addresses: tuple[str, ...]) -> None:
        calls.append(addresses)
        if any(refused_address(a) for a in addresses):
            raise WebhookRefused("refused")

    async def scenario() -> tuple[list[object], int]:
        async with RawReceiver() as receiver, DNSServer() as dns:
            dns.set("mixed.test", "A", "8.8.8.8", "127.0.0.1")
            connector = Connector((dns.address,))
            results: list[object] = []
            for host, port, check in (
                ("mixed.test", receiver.port, refuse_any_loopback),
                ("127.0.0.1", receiver.port, refuse_any_loopback),
                ("nowhere.test", receiver.port, refuse_any_loopback),
                ("127.0.0.1", free_port(), lambda a: None),
                ("127.0.0.1", receiver.port, lambda a: None),
            ):
                try:
                    transport, _, address = await connector.open_checked(host, port, check, asyncio.Protocol, timeout=2)
                    transport.close()
                    results.append(address)
                except (WebhookRefused, ConnectFailed) as error:
                    results.append(type(error))
            await asyncio.sleep(0.05)  # the accepted connection is counted
            return results, receiver.connections

    results, accepted = run(scenario())
    assert results == [WebhookRefused, WebhookRefused, NoAddress, ConnectFailed, "127.0.0.1"]
    assert [set(answer) for answer in calls] == [{"8.8.8.8", "127.0.0.1"}, {"127.0.0.1"}]  # whole answers, undialled
    assert accepted == 1


# -- url_problem, refused_address, retry_delay (pure) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://hooks.example.com/done", None),
        ("https://hooks.example.com:8443/done?team=a&x=%20", None),
        ("HTTPS://Hooks.Example.COM./", None),
        ("https://10.0.0.1/", None),  # an address is checked at delivery, after DNS
        ("https://[2001:db8::1]:443/", None),
        ("http://receiver.internal:8080/", None),  # listed
        ("http://RECEIVER.internal/", None),
        ("http://[::1]:9/", None),  # listed as [::1]
        ("http://hooks.example.com/", "plain http"),
        ("ftp://hooks.example.com/", "https://"),
        ("hooks.example.com/done", "https://"),
        ("/done", "https://"),
        ("https://", "https://"),
        ("https:///done", "https://"),
        ("https://user:pw@hooks.example.com/", "user info"),
        ("https://@hooks.example.com/", "user info"),
        ("https://hooks.example.com/#frag", "fragment"),
        ("https://hooks.example.com/#", "fragment"),
        ("https://hooks.example.com:0/", "1-65535"),
        ("https://hooks.example.com:65536/", "valid URL"),
        ("https://hooks.example.com:x/", "valid URL"),
        ("https://hooks.example.com/" + "a" * 2030, "2048"),
        ("https://hooks.example.com/a b", "ASCII"),
        ("https://hooks.example.com/\r\nx: y", "ASCII"),
        ("https://hooks.exämple.com/", "ASCII"),
        ("https://[fe80::1%25eth0]/", "valid host"),
        ("https://2130706433/", "valid host"),
        ("https://0177.0.0.1/", "valid host"),
        ("https://-bad.example.com/", "valid host"),
        ("https://bad..example.com/", "valid host"),
        ("https://exa%6dple.com/", "valid host"),
        ("", "URL"),
    ],
)
def test_url_problem(url: str, problem: str | None) -> None:
    allowed = allowed_host_set(["receiver.internal", "[::1]"])
    found = url_problem(url, allowed)
    assert (found is None) if problem is None else (found is not None and problem in found), found


def test_the_table_holds_allowed_hosts_as_webhooks_compare_them() -> None:
    doc = example_doc("http://127.0.0.1:1", "http://127.0.0.1:2")
    doc["gateway"]["async"] = {"webhook_allowed_hosts": ["Receiver.Internal.", "[0:0::1]", "127.0.0.1"]}
    allowed = compile_table(doc).gateway.async_settings.webhook_allowed_hosts
    assert allowed == {"receiver.internal", "::1", "127.0.0.1"}
    assert url_problem("http://receiver.internal:8080/hook", allowed) is None  # plain http: a listed host
    assert url_problem("http://[::1]:8080/hook", allowed) is None
    assert url_problem("http://other.internal/hook", allowed) is not None


def test_url_problem_at_the_length_limit() -> None:
    base = "https://hooks.example.com/"
    assert url_problem(base + "a" * (2048 - len(base)), frozenset()) is None
    assert url_problem(base + "a" * (2049 - len(base)), frozenset()) is not None


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("8.8.8.8", None),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::808:808", None),
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("100.64.0.1", "CGNAT"),
        ("100.127.255.255", "CGNAT"),
        ("192.0.2.1", "not a public"),
        ("2001:db8::1", "not a public"),
        ("fec0::1", "site-local"),
        ("::ffff:127.0.0.1", "embeds 127.0.0.1, a loopback"),
        ("::ffff:10.1.2.3", "embeds 10.1.2.3, a private"),
        ("::ffff:169.254.169.254", "metadata"),
        ("::ffff:100.64.0.1", "CGNAT"),
        ("::ffff:0.0.0.0", "unspecified"),
        ("64:ff9b::a00:1", "embeds 10.0.0.1"),
        ("2002:7f00:1::1", "embeds 127.0.0.1"),
        ("::127.0.0.1", "not a public"),  # IPv4-compatible (deprecated)
        ("not-an-ip", "not an IP"),
    ],
)
def test_refused_address(address: str, refused: str | None) -> None:
    found = refused_address(address)
    assert (found is None) if refused is None else (found is not None and refused in found), found


@pytest.mark.parametrize(
    ("attempt", "initial", "cap", "seconds"),
    [(1, 1000, 5000, 1.0), (2, 1000, 5000, 2.0), (3, 1000, 5000, 4.0), (4, 1000, 5000, 5.0), (9, 1000, 5000, 5.0),
     (1, 0, 5000, 0.0), (5, 250, 600000, 4.0), (10_000, 1000, 600000, 600.0), (1, 1000, 500, 0.5)],
)  # fmt: skip
def test_retry_delay(attempt: int, initial: int, cap: int, seconds: float) -> None:
    assert retry_delay(attempt, initial, cap) == seconds


def test_retry_delay_is_one_based() -> None:
    with pytest.raises(ValueError, match="1-based"):
        retry_delay(0, 1000, 5000)


def test_the_default_timeout_and_the_senders_repr() -> None:
    assert WEBHOOK_TIMEOUT_SECONDS == 10.0
    hooks = sender(frozenset({"A.example"}))
    assert hooks.allowed_hosts == frozenset({"a.example"})
    assert repr(hooks) == "<WebhookSender 0 delivered, 0 retry, 0 gone, 0 refused | 1 allowed hosts, timeout 10 s>"
    run(hooks.deliver("http://nowhere.example/", b"{}", []))
    assert "1 refused" in repr(hooks)


def test_headers_that_would_break_the_request_are_a_programming_error() -> None:
    for bad in (("content-length", "1"), ("x-a", "b\r\nx-c: d"), ("bad name", "v"), ("Host", "evil")):
        with pytest.raises(ValueError, match="cannot be sent"):
            run(sender().deliver("http://127.0.0.1:9/", b"{}", [bad]))
