"""Region networks (SPEC §8): which resolved addresses a region's plane may be connected at. Pure.

Fail closed: an address is allowed only when it parses as an IP address and lies inside one of the
networks; anything else (another family, a malformed string) is refused.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

V4Networks = tuple[ipaddress.IPv4Network, ...]
V6Networks = tuple[ipaddress.IPv6Network, ...]


@functools.lru_cache(maxsize=256)
def compile_networks(networks: tuple[str, ...]) -> tuple[V4Networks, V6Networks]:
    """CIDR strings -> (IPv4 networks, IPv6 networks), parsed once per distinct tuple.

    Host bits are ignored as in the table loader (`10.1.2.3/16` is `10.1.0.0/16`); a string that is not
    a network raises ValueError naming it (tables are validated before they get here).
    """
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for text in networks:
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not a network in CIDR form") from None
        if isinstance(network, ipaddress.IPv4Network):
            v4.append(network)
        else:
            v6.append(network)
    return tuple(v4), tuple(v6)


def inside(address: str, v4: V4Networks, v6: V6Networks) -> bool:
    """Whether `address` lies in one of the networks; False for anything that is not an IP address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv4Address):
        return any(ip in network for network in v4)
    if any(ip in network for network in v6):
        return True
    # ::ffff:a.b.c.d is a.b.c.d on a dual-stack socket (RFC 4291 §2.5.5.2): judge it by where it goes.
    mapped = ip.ipv4_mapped
    return mapped is not None and any(mapped in network for network in v4)


def allowed(addresses: Iterable[str], networks: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split `addresses` into (allowed, refused) by `networks`, each in input order.

    Contract: every address in `allowed` lies inside `networks`; `allowed` and `refused` together are
    exactly the input (same strings, same multiplicity). Empty `networks` means no restriction: all
    allowed. Results are cached per (addresses, networks), so the hot path parses nothing twice.
    """
    addresses = tuple(addresses)
    if not networks:
        return addresses, ()
    return _split(addresses, networks)


@functools.lru_cache(maxsize=1024)
def _split(addresses: tuple[str, ...], networks: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    v4, v6 = compile_networks(networks)
    verdicts = [inside(address, v4, v6) for address in addresses]
    return (
        tuple(a for a, ok in zip(addresses, verdicts) if ok),
        tuple(a for a, ok in zip(addresses, verdicts) if not ok),
    )
