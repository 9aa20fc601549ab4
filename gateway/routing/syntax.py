"""Value syntax: names, hosts, ports, URLs, nameservers, SRV names, networks.

Each parser takes the text written in the table and returns its normalized form, or raises
`SyntaxProblem` whose message is the problem reported at the value's path.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from gateway.routing.model import Upstream
from gateway.routing.problems import quote

_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<path>[^?#]*)(?P<rest>.*)\Z", re.S)
_IPV4_LIKE = re.compile(r"[0-9.]+\Z")
HEX64 = re.compile(r"[0-9A-Fa-f]{64}\Z")


class SyntaxProblem(ValueError):
    pass


def dns_name(host: str) -> str:
    """Validate a DNS host name (RFC 1123 labels); return it lowercased."""
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise SyntaxProblem(f"{quote(host)} is not a valid host name")
    if labels[-1].isdigit():  # RFC 3696 §2: a top-level label is never all-numeric
        raise SyntaxProblem(f"{quote(host)} is neither a valid IPv4 address nor a host name")
    return host.lower()


def _host(text: str) -> str:
    """A DNS name, an IPv4 address or a bracketed IPv6 address -> normalized host (IPv6 unbracketed)."""
    if text.startswith("["):
        if not text.endswith("]"):
            raise SyntaxProblem(f"{quote(text)} is not a valid bracketed IPv6 address")
        return _ipv6(text[1:-1])
    if ":" in text:
        raise SyntaxProblem(f"IPv6 address {quote(text)} must be written in brackets: [{text}]")
    if _IPV4_LIKE.match(text):
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise SyntaxProblem(f"{quote(text)} is not a valid IPv4 address") from None
    return dns_name(text)


def _ipv6(text: str) -> str:
    if "%" in text:
        raise SyntaxProblem(f"IPv6 zone ids are not supported ({quote(text)})")
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise SyntaxProblem(f"{quote(text)} is not a valid IPv6 address") from None


def _port(text: str) -> int:
    if not text:
        raise SyntaxProblem("the port is empty")
    if not _PORT.match(text) or not 1 <= int(text) <= 65535:
        raise SyntaxProblem(f"{quote(text)} is not a valid port (1-65535)")
    return int(text)


def _split_host_port(text: str) -> tuple[str, str | None]:
    """'host', 'host:port', '[v6]' or '[v6]:port' -> (host text, port text or None)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SyntaxProblem(f"{quote(text)} has an unclosed '['")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise SyntaxProblem(f"unexpected {quote(rest)} after the IPv6 address")
        return host, (rest[1:] if rest else None)
    if text.count(":") > 1:
        raise SyntaxProblem(f"{quote(text)}: an IPv6 address must be written in brackets, like [::1]:8080")
    host, sep, port = text.partition(":")
    return host, (port if sep else None)


def parse_upstream(url: str) -> Upstream:
    """`http(s)://host[:port][/]` -> Upstream; anything else (path, query, user info) is refused."""
    match = _URL.match(url)
    if match is None:
        raise SyntaxProblem(f"{quote(url)} is not a URL like http://host:port or https://host:port")
    scheme = match["scheme"].lower()
    if scheme not in ("http", "https"):
        raise SyntaxProblem(f"unsupported scheme {quote(match['scheme'])} (use http:// or https://)")
    authority = match["authority"]
    if "@" in authority:
        raise SyntaxProblem("must not contain user information (user@); planes authenticate with tls")
    if match["path"] not in ("", "/"):
        raise SyntaxProblem(f"must not have a path ({quote(match['path'])}); give only scheme, host and port")
    if match["rest"]:
        part = "query" if match["rest"].startswith("?") else "fragment"
        raise SyntaxProblem(f"must not have a {part} ({quote(match['rest'])})")
    host, port = _split_host_port(authority)
    if not host:
        raise SyntaxProblem(f"{quote(url)} has no host")
    default = 443 if scheme == "https" else 80
    return Upstream(scheme, _host(host), default if port is None else _port(port))  # type: ignore[arg-type]


def parse_host_port(text: str) -> str:
    """`host:port` (gRPC target) -> normalized `host:port` (IPv6 as `[addr]:port`)."""
    if "://" in text:
        raise SyntaxProblem(f"{quote(text)} must be host:port, without a scheme")
    host, port = _split_host_port(text)
    if port is None:
        raise SyntaxProblem(f"{quote(text)} needs a port (host:port)")
    if not host:
        raise SyntaxProblem(f"{quote(text)} has no host")
    normalized = _host(host)
    return f"[{normalized}]:{_port(port)}" if ":" in normalized else f"{normalized}:{_port(port)}"


def parse_nameserver(text: str) -> str:
    """`IP`, `IP:port`, `[IPv6]` or `[IPv6]:port` -> normalized in the same form."""
    if text.count(":") > 1 and not text.startswith("["):
        return _ipv6(text)  # a bare IPv6 address, no port
    host, port = _split_host_port(text)
    if host.startswith("["):
        address = _ipv6(host[1:-1])
        return f"[{address}]:{_port(port)}" if port is not None else address
    try:
        address = str(ipaddress.IPv4Address(host))
    except ValueError:
        raise SyntaxProblem(f"{quote(text)} is not an IP address with an optional port (IP[:port])") from None
    return f"{address}:{_port(port)}" if port is not None else address


_SRV_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


def parse_srv_name(text: str) -> str:
    """An SRV owner name (`_service._proto.name`, RFC 2782: labels may start with '_') -> lowercased,
    without a trailing dot."""
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_SRV_LABEL.match(label) for label in labels):
        raise SyntaxProblem(f"{quote(text)} is not a valid SRV name (like _http._tcp.v1.models.internal)")
    if _IPV4_LIKE.match(name):
        raise SyntaxProblem(f"{quote(text)} is an address, not an SRV name; list addresses under endpoints")
    return name.lower()


def parse_network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise SyntaxProblem(f"{quote(text)} is not a network in CIDR form (like 10.10.0.0/16)") from None


def host_key(host: str) -> str:
    """A host as compared with `async.webhook_allowed_hosts`: lowercase, no trailing dot, IP literals
    unbracketed and normalized."""
    name = host.strip().lower().removesuffix(".")
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        return name


def allowed_host_set(hosts: Iterable[str]) -> frozenset[str]:
    """`async.webhook_allowed_hosts` (§12) as the table holds it and webhooks compare hosts with it
    (`host_key` of each)."""
    return frozenset(host_key(host) for host in hosts)
