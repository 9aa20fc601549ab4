"""Webhook delivery (SPEC §10 "Results and webhooks", "Details"): where a webhook may go, and one POST.

The checks of one delivery, in order; a refusal is final (`refused`, never retried):

1. `url_problem` (also the submit's 400, before any DNS): an absolute `https://` URL of at most 2048
   printable ASCII characters, with a host, no userinfo, no fragment, a port in 1-65535 if given;
   `http://` only for a host the operator lists (§12 `async.webhook_allowed_hosts`).
2. The host is resolved by the table's resolver (`Connector.open_checked`). Unless it is listed,
   every address must pass `refused_address` (loopback, private, link-local, metadata, CGNAT,
   multicast, reserved, and IPv6 forms that embed such an IPv4 address). One refused address
   refuses the host and nothing is dialled; the check runs on the very answer that is dialled, so
   a DNS answer cannot change between the check and the connect.
3. One connection, one `POST`, `connection: close`. The answer's status decides (`outcome_of`):
   any 2xx delivered, 410 gone (stop), anything else retry. Redirects are never followed: a 3xx is
   a failed delivery, and following one would reach an address nobody checked.

`timeout` bounds the whole exchange: DNS, connect, TLS, the request and the answer's head. Once
the head is in, its status stands; the body is read and discarded (64 KiB at most) until the
answer ends or the same deadline passes, so a receiver that answered 2xx is not sent the webhook
again because its body was slow. Network problems never raise: they are a `Delivery`.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import re
import ssl
from collections.abc import Callable
from functools import partial
from typing import Literal, NamedTuple, cast
from urllib.parse import urlsplit

import httptools

from gateway.asyncq.request import backoff_seconds
from gateway.asyncq.signing import load_secrets, payload, signature_headers, verify_baseten, verify_standard
from gateway.errors import ClientError, GatewayError
from gateway.routing.syntax import allowed_host_set, host_key
from gateway.upstream.connect import Connector

__all__ = [
    "WEBHOOK_TIMEOUT_SECONDS",
    "Delivery",
    "WebhookRefused",
    "WebhookSender",
    "allowed_host_set",
    "load_secrets",
    "outcome_of",
    "payload",
    "refused_address",
    "retry_delay",
    "signature_headers",
    "url_problem",
    "verify_baseten",
    "verify_standard",
]

WEBHOOK_TIMEOUT_SECONDS = 10.0  # SPEC §10: "timeouts (10 s) are retried"
MAX_URL_LENGTH = 2048
ANSWER_CAP = 64 * 1024  # bytes of the receiver's answer read, head included; the rest is not waited for
USER_AGENT = "baseten-gateway-webhook/1"
OWN_HEADERS = frozenset({"host", "user-agent", "content-type", "content-length", "connection", "transfer-encoding"})

Outcome = Literal["delivered", "gone", "retry", "refused"]


class WebhookRefused(ClientError):
    """A webhook URL, or an address its host resolves to, that may not receive webhooks (SPEC §10)."""


class Delivery(NamedTuple):
    outcome: Outcome  # "delivered" (2xx) | "gone" (410) | "retry" | "refused" (never retried)
    status: int | None  # the receiver's status, when it answered
    message: str  # for logs and the request's errors


# -- where a webhook may go (pure) ---------------------------------------------------------------------


class Target(NamedTuple):
    scheme: str  # "https" | "http"
    host: str  # `host_key` form: what the resolver and `allowed_hosts` see
    port: int
    authority: str  # the URL's, for the Host header
    path: str  # the request target: path and query
    listed: bool  # the host is in `allowed_hosts`: plain http and any address


def url_problem(url: str, allowed_hosts: frozenset[str]) -> str | None:
    """None when `url` may be a `webhook_endpoint`, else why not (a 400's message); no DNS.

    `allowed_hosts` in `allowed_host_set` form (plain lowercase names and IPv4 literals already are).
    """
    target = parse_target(url, allowed_hosts)
    return target if isinstance(target, str) else None


_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def parse_target(url: str, allowed_hosts: frozenset[str]) -> Target | str:
    """The parts of a webhook URL a delivery needs, or why the URL is refused (see `url_problem`)."""
    if not isinstance(url, str) or not url:
        return "webhook_endpoint must be a URL string"
    if len(url) > MAX_URL_LENGTH:
        return f"webhook_endpoint is longer than {MAX_URL_LENGTH} characters"
    if not url.isascii() or not url.isprintable() or " " in url:
        return "webhook_endpoint must be printable ASCII without spaces (percent-encode the rest, punycode the host)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        return f"webhook_endpoint is not a valid URL: {error}"
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or not parts.netloc:
        return "webhook_endpoint must be an absolute https:// URL"
    if "@" in parts.netloc:
        return "webhook_endpoint must not carry user info (user:password@)"
    if "#" in url:
        return "webhook_endpoint must not have a fragment"
    if not _valid_host(parts.hostname or "", bracketed=parts.netloc.startswith("[")):
        return f"webhook_endpoint has no valid host: {parts.hostname or parts.netloc!r}"
    if port is not None and not 1 <= port <= 65535:
        return f"webhook_endpoint port must be 1-65535, got {port}"
    host = host_key(parts.hostname or "")
    listed = host in allowed_hosts
    if scheme == "http" and not listed:
        return "webhook_endpoint must be https:// (plain http only for hosts in async.webhook_allowed_hosts)"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme, host, port or (443 if scheme == "https" else 80), parts.netloc, path, listed)


def _valid_host(host: str, *, bracketed: bool) -> bool:
    if bracketed:  # an IPv6 literal; a zone (`%eth0`) names an interface of this machine
        return "%" not in host and _parses(ipaddress.IPv6Address, host)
    name = host.removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return False
    # All digits at the end: an IPv4 literal or nothing (never `2130706433` or `0177.0.0.1`, which
    # some resolvers read as 127.0.0.1).
    return not labels[-1].isdigit() or _parses(ipaddress.IPv4Address, name)


def _parses(kind: Callable[[str], object], text: str) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


# Checked in order: the first match names the address. Metadata first: it lies inside link-local
# (169.254.169.254) and unique-local (fd00:ec2::254) space, and the more precise name helps.
_RULES = tuple(
    (ipaddress.ip_network(network), why)
    for network, why in (
        ("169.254.169.254/32", "a cloud metadata address"),
        ("fd00:ec2::254/128", "a cloud metadata address"),
        ("0.0.0.0/8", 'an unspecified ("this network") address'),
        ("::/128", "an unspecified address"),
        ("127.0.0.0/8", "a loopback address"),
        ("::1/128", "a loopback address"),
        ("10.0.0.0/8", "a private address"),
        ("172.16.0.0/12", "a private address"),
        ("192.168.0.0/16", "a private address"),
        ("fc00::/7", "a private (unique local) address"),
        ("169.254.0.0/16", "a link-local address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("100.64.0.0/10", "a shared (CGNAT) address"),
        ("224.0.0.0/4", "a multicast address"),
        ("ff00::/8", "a multicast address"),
        ("255.255.255.255/32", "the broadcast address"),
        ("240.0.0.0/4", "a reserved address"),
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 address


def refused_address(address: str) -> str | None:
    """Why a resolved address may not receive webhooks (SPEC §10), or None for a public address.

    An IPv6 address that stands for an IPv4 one (IPv4-mapped, NAT64, 6to4) is judged by that address.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"{address!r} is not an IP address"
    embedded = _embedded_v4(ip)
    if embedded is not None and _named(ip) is None:
        why = _reason(embedded)
        return None if why is None else f"{address} embeds {embedded}, {why}"
    why = _reason(ip)
    return None if why is None else f"{address} is {why}"


def _named(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    return next((why for network, why in _RULES if ip.version == network.version and ip in network), None)


def _reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    why = _named(ip)
    if why is None and (ip.is_reserved or not ip.is_global):  # documentation, benchmarking, IETF ranges
        why = "not a public address"
    return why


def _embedded_v4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for: IPv4-mapped (::ffff:a.b.c.d), NAT64, 6to4."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def check_addresses(host: str, addresses: tuple[str, ...]) -> None:
    """Raise WebhookRefused when any address of `host`'s answer is refused (fail closed)."""
    refused = [why for why in map(refused_address, addresses) if why is not None]
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise WebhookRefused(f"webhook host {host!r} resolves to a refused address: {refused[0]}{more}")


def _no_check(addresses: tuple[str, ...]) -> None:
    """A listed host: the operator vouches for every address."""


retry_delay = backoff_seconds  # the delivery schedule is the runs' back-off (gateway.asyncq.request)


def outcome_of(status: int, location: str | None = None) -> Delivery:
    """What a receiver's final status means for the delivery (SPEC §10)."""
    if 200 <= status < 300:
        return Delivery("delivered", status, f"the receiver answered {status}")
    if status == 410:
        return Delivery("gone", status, "the receiver answered 410 Gone: no further attempts")
    if 300 <= status < 400:
        where = f" to {location[:200]!r}" if location else ""
        return Delivery("retry", status, f"the receiver answered {status}: redirect{where} not followed (SPEC §10)")
    return Delivery("retry", status, f"the receiver answered {status}")


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2
_VALUE = re.compile(r"[\x20-\x7e]*")


def request_bytes(target: Target, body: bytes, headers: list[tuple[str, str]]) -> bytes:
    """The whole POST. `headers` may not set framing or identity headers of the client's own."""
    lines = [
        f"POST {target.path} HTTP/1.1",
        f"host: {target.authority}",
        f"user-agent: {USER_AGENT}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    for name, value in headers:
        if name.lower() in OWN_HEADERS or not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
            raise ValueError(f"webhook header {name!r} cannot be sent")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- one delivery (I/O) ---------------------------------------------------------------------------------


class Answer(asyncio.Protocol):
    """The receiver's answer, parsed by httptools as it arrives: the final status (1xx skipped), its
    Location, and `done` once the answer ended, the receiver closed, or ANSWER_CAP bytes came in."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status: int | None = None
        self.location: str | None = None
        self.problem = "the receiver closed the connection before answering"
        self.done = asyncio.get_running_loop().create_future()
        self._received = 0
        self._location: str | None = None

    # -- asyncio.Protocol (with TLS, the TLS layer calls these with the plain bytes) ------------------

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        data = data[: ANSWER_CAP - self._received]
        self._received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # a 101 nobody asked for: its status is the answer
            self._end()
        except httptools.HttpParserError as error:
            self._end(f"the receiver's answer is not HTTP/1.1: {error or type(error).__name__}")
        if self._received >= ANSWER_CAP:
            self._end(f"the receiver's answer head exceeds {ANSWER_CAP} bytes")

    def eof_received(self) -> bool:
        self._end()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"the connection broke: {exc}" if exc else None)

    def _end(self, problem: str | None = None) -> None:
        if not self.done.done():
            if problem is not None and self.status is None:
                self.problem = problem
            self.done.set_result(None)

    # -- httptools callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._location = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"location":
            self._location = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status >= 200 or status == 101:  # 100 Continue, 103 Early Hints: the answer follows
            self.status, self.location = status, self._location

    def on_message_complete(self) -> None:
        if self.status is not None:
            self._end()


class WebhookSender:
    """Delivers webhooks over the gateway's one connector; `deliver` always returns a `Delivery`.

    `allowed_hosts` (§12 `async.webhook_allowed_hosts`) may use plain http and any address;
    `ssl_context` defaults to the system's trust store (tests pass their own CA).
    """

    def __init__(
        self, connector: Connector, allowed_hosts: frozenset[str], timeout: float = WEBHOOK_TIMEOUT_SECONDS, *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        self.connector = connector
        self.allowed_hosts = allowed_host_set(allowed_hosts)
        self.timeout = timeout
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.outcomes: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        counts = ", ".join(f"{self.outcomes[o]} {o}" for o in ("delivered", "retry", "gone", "refused"))
        return f"<WebhookSender {counts} | {len(self.allowed_hosts)} allowed hosts, timeout {self.timeout:g} s>"

    async def deliver(self, url: str, body: bytes, headers: list[tuple[str, str]]) -> Delivery:
        """POST `body` to `url` with `headers` (`signature_headers`). Raises only ValueError, for a header
        that cannot be sent (a programming error): every network outcome is a `Delivery`."""
        target = parse_target(url, self.allowed_hosts)
        if isinstance(target, str):
            delivery = Delivery("refused", None, target)
        else:
            delivery = await self._deliver(target, request_bytes(target, body, headers))
        self.outcomes[delivery.outcome] += 1
        return delivery

    async def _deliver(self, target: Target, request: bytes) -> Delivery:
        check: Callable[[tuple[str, ...]], None] = _no_check if target.listed else partial(check_addresses, target.host)
        tls = self.ssl_context if target.scheme == "https" else None
        late = Delivery("retry", None, f"no answer from {target.authority} within {self.timeout:g} s")
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                opened, answer, _ = await self.connector.open_checked(
                    target.host, target.port, check, Answer, timeout=self.timeout, tls=tls
                )
        except TimeoutError:
            return late
        except WebhookRefused as error:
            return Delivery("refused", None, error.message)
        except GatewayError as error:  # ConnectFailed: DNS, refused, unreachable, TLS, connect timeout
            return Delivery("retry", None, error.message)
        transport = cast(asyncio.Transport, opened)
        ended = False
        try:
            transport.write(request)
            async with asyncio.timeout_at(deadline):
                await answer.done
            ended = True
        except TimeoutError:
            pass  # a head that came in stands (module docstring)
        finally:
            if ended:
                transport.close()
            else:
                transport.abort()  # timed out or cancelled: a hung peer must not hold the connection open
        if answer.status is not None:
            return outcome_of(answer.status, answer.location)
        return Delivery("retry", None, answer.problem) if ended else late
