"""The one boundary with dnspython: a single DNS question in, a plain outcome out.

Nothing else in the gateway imports `dns.*` or catches its exceptions (STYLE: one boundary per
dependency). Every way a question can end is one of three values: `Records` (an answer),
`Negative` (the DNS says authoritatively that there is nothing: NXDOMAIN, no records of that
type, an impossible name) or `Failed` (no usable answer: timeout, SERVFAIL, refused, no
nameserver reachable, no resolver configured), so callers decide with `isinstance`, never `except`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.resolver

RdType = Literal["A", "AAAA", "SRV"]
SYSTEM_RESOLV_CONF = "/etc/resolv.conf"

# RFC 2308 §5: without an SOA in the negative answer there is no negative TTL; dnspython uses 300 s,
# the resolver clamps it to its own (short) negative cap anyway.
NEGATIVE_TTL_WITHOUT_SOA = float(dns.message.NEGATIVE_TTL_WITHOUT_SOA)


@dataclass(frozen=True, slots=True)
class Records:
    """An answer: A/AAAA address strings, or SRV (priority, weight, port, target) in answer order."""

    values: tuple[Any, ...]
    ttl: float  # the smallest TTL along the CNAME chain and the answer (dnspython's chaining result)


@dataclass(frozen=True, slots=True)
class Negative:
    """The DNS says there is nothing to connect to; `reason` is a short human phrase."""

    reason: str
    ttl: float  # RFC 2308 negative TTL: min(SOA TTL, SOA MINIMUM)
    nxdomain: bool = False


@dataclass(frozen=True, slots=True)
class Failed:
    """No usable answer this time (a transient failure); `reason` is a short human phrase."""

    reason: str


Outcome = Records | Negative | Failed


def parse_nameserver(text: str) -> tuple[str, int]:
    """`IP`, `IP:port`, `[IPv6]`, `[IPv6]:port` or a bare IPv6 address -> (address, port); ValueError otherwise."""
    host, port = text, 53
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end], text[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise ValueError(f"nameserver {text!r} is not IP[:port] (IPv6 as [addr]:port)")
        if rest:
            port = _port(text, rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(text, port_text)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise ValueError(f"nameserver {text!r} is not IP[:port] (IPv6 as [addr]:port)") from None


def _port(text: str, port: str) -> int:
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"nameserver {text!r} has an invalid port {port!r} (1-65535)")
    return int(port)


class Lookup:
    """Asks one question at a time of the configured nameservers; never raises for DNS trouble.

    `nameservers` empty: the system's resolver configuration (`resolv_conf`, /etc/resolv.conf by
    default). A missing or empty configuration does not fail construction (a table whose planes are
    all IP literals needs no DNS); every question then ends as `Failed` saying so.
    Names are asked as given, fully qualified: the search list of resolv.conf is never applied,
    so a routing table means the same thing on every machine.
    """

    def __init__(self, nameservers: tuple[str, ...], *, timeout: float, resolv_conf: str | None = None) -> None:
        self.timeout = timeout
        self.config_error: str | None = None
        self._resolver: dns.asyncresolver.Resolver | None = None
        if nameservers:
            servers = [parse_nameserver(text) for text in nameservers]
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(address, port) for address, port in servers]
            self.source = ", ".join(nameservers)
        else:
            path = resolv_conf or SYSTEM_RESOLV_CONF
            self.source = f"system ({path})"
            try:
                resolver = dns.asyncresolver.Resolver(filename=path)
            except dns.exception.DNSException as exc:  # NoResolverConfiguration: missing file, no nameserver
                self.config_error = f"no DNS resolver configured ({exc})"
                return
        resolver.cache = None  # the gateway's resolver keeps its own cache (TTL clamps, stale answers)
        resolver.lifetime = timeout
        # Each try gets a share of the lifetime, so a silent first nameserver leaves time for the next
        # one, and a single nameserver is asked at least twice (a lost UDP datagram is not an outage).
        resolver.timeout = timeout / max(2, len(resolver.nameservers))
        resolver.retry_servfail = False  # SERVFAIL is a failure now; the caller decides about retrying
        self._resolver = resolver

    async def query(self, name: str, rdtype: RdType) -> Outcome:
        """Ask `rdtype` for `name` (absolute, no search list); returns within about `timeout` seconds."""
        if self._resolver is None:
            return Failed(self.config_error or "no DNS resolver configured")
        if not name:
            return Negative("not a valid DNS name (empty)", NEGATIVE_TTL_WITHOUT_SOA)
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as exc:  # EmptyLabel, LabelTooLong, NameTooLong, BadEscape
            return Negative(f"not a valid DNS name ({exc})", NEGATIVE_TTL_WITHOUT_SOA)
        try:
            answer = await self._resolver.resolve(qname, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as exc:
            return Negative("no such name (NXDOMAIN)", _nxdomain_ttl(exc), nxdomain=True)
        except dns.resolver.YXDOMAIN:
            return Negative("name too long after DNAME substitution (YXDOMAIN)", NEGATIVE_TTL_WITHOUT_SOA)
        except dns.exception.Timeout:
            return Failed(f"no answer from {self.source} within {self.timeout:g}s")
        except dns.resolver.NoNameservers as exc:  # SERVFAIL, REFUSED, connection refused, ... from every server
            return Failed(_no_nameservers_text(exc))
        except dns.exception.DNSException as exc:
            return Failed(f"{type(exc).__name__}: {exc}")
        except OSError as exc:  # a socket error dnspython let through (network unreachable, ...)
            return Failed(f"{type(exc).__name__}: {exc}")
        rrset = answer.rrset
        ttl = float(answer.chaining_result.minimum_ttl)
        if rrset is None:
            return Negative(f"no {rdtype} records", ttl)
        if rdtype == "SRV":
            values: tuple[Any, ...] = tuple((rd.priority, rd.weight, rd.port, _target(rd.target)) for rd in rrset)
        else:
            values = tuple(rd.address for rd in rrset)
        return Records(values, ttl)


def _target(target: dns.name.Name) -> str:
    """An SRV target as a host name (lowercase, no final dot); the root name stays '.' (RFC 2782)."""
    if target == dns.name.root:
        return "."
    return str(target.to_text(omit_final_dot=True)).lower()


def _nxdomain_ttl(exc: dns.resolver.NXDOMAIN) -> float:
    """RFC 2308 §5 negative TTL from the NXDOMAIN response's SOA (dnspython's chaining computes it)."""
    for response in exc.responses().values():
        try:
            return float(response.resolve_chaining().minimum_ttl)
        except dns.exception.DNSException:
            continue
    return NEGATIVE_TTL_WITHOUT_SOA


def _no_nameservers_text(exc: dns.resolver.NoNameservers) -> str:
    """'127.0.0.1@5353 answered SERVFAIL' per server, rather than dnspython's whole sentence."""
    errors = exc.kwargs.get("errors") or []
    parts = [f"{error[0]} answered {error[3]}" for error in errors if len(error) >= 4]
    return "; ".join(parts) if parts else str(exc)
