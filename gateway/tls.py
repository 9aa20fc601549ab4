"""TLS for the gateway's own listeners: server contexts that remember the client's SNI.

Python's server-side `SSLObject.server_hostname` is always None; the name the client asked for
is only seen by the context's `sni_callback`, which stores it on the connection's SSL object.
Both listeners compare it with the host a request routes by (issue 9: 421 on a mismatch).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

SNI_ATTRIBUTE = "gateway_sni"


def _remember_sni(ssl_object: Any, server_name: str | None, _context: ssl.SSLContext) -> None:
    setattr(ssl_object, SNI_ATTRIBUTE, server_name)


def server_context(cert: str, key: str, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    ctx.sni_callback = _remember_sni
    return ctx


def sni_of(transport: asyncio.BaseTransport | None) -> str | None:
    """The server name the client sent in its TLS ClientHello; None on cleartext or without SNI."""
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    return getattr(ssl_object, SNI_ATTRIBUTE, None) if ssl_object is not None else None
