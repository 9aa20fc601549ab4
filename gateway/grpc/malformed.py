"""Which HTTP/2 request field sections are malformed (RFC 9113 §8.1.1, §8.2, §8.3), pure.

A malformed request is a stream error of type PROTOCOL_ERROR (§8.1.1): h2server resets the
stream and the request never reaches the relay, so no plane ever sees it. What the gRPC call's
fields mean (content-type, metadata keys and values, `:path`) is `framing.read_head`'s.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# The request pseudo-header fields are :method, :scheme, :authority and :path (§8.3.1); `:protocol`
# only exists once a server sends SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441 §4), which only the
# public listener does.
# Connection-specific fields (§8.2.2): malformed in HTTP/2, whatever their value; `te` only as `trailers`.
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
# A field name is a token (RFC 9110 §5.1) in lowercase (§8.2.1: uppercase is malformed).
NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")


# Field names already found to be lowercase tokens, so that a channel's names are matched once, not
# on every call (a memo: the verdicts are the same without it).
TOKENS_KEPT = 1024
TOKEN_KEPT_LENGTH = 64
_tokens: set[bytes] = set()


def request_problem(fields: Sequence[tuple[bytes, bytes]], extended_connect: bool = False) -> str | None:
    """Why a request's header fields are malformed, or None when they are not (`extended_connect`:
    the server allows `:protocol`, RFC 8441)."""
    regular = False
    authority = host = path = method = scheme = protocol = None
    tokens = _tokens
    # One variable per pseudo-header field rather than a set of those seen: a duplicate is one whose
    # variable is already set (this runs on every gRPC call).
    for name, value in fields:
        if name[:1] == b":":
            if regular:
                return f"pseudo-header field {_show(name)} after a regular field (RFC 9113 §8.3)"
            if name == b":path":
                duplicate, path = path is not None, value
            elif name == b":authority":
                duplicate, authority = authority is not None, value
            elif name == b":method":
                duplicate, method = method is not None, value
            elif name == b":scheme":
                duplicate, scheme = scheme is not None, value
            elif name == b":protocol" and extended_connect:
                duplicate, protocol = protocol is not None, value
            else:
                return f"unknown pseudo-header field {_show(name)} (RFC 9113 §8.3)"
            if duplicate:
                return f"duplicate pseudo-header field {_show(name)} (RFC 9113 §8.3)"
            continue
        regular = True
        if name not in tokens:
            if not NAME.match(name):
                return f"field name {_show(name)} is not a lowercase token (RFC 9113 §8.2.1)"
            if len(name) <= TOKEN_KEPT_LENGTH:
                if len(tokens) >= TOKENS_KEPT:
                    tokens.clear()
                tokens.add(name)
        if name in CONNECTION_SPECIFIC:
            return f"connection-specific field {_show(name)} (RFC 9113 §8.2.2)"
        if name == b"te":
            if value != b"trailers":
                return "te other than 'trailers' (RFC 9113 §8.2.2)"
        elif name == b"host":
            if host is not None:
                return "more than one host field (RFC 9110 §7.2)"
            host = value
    if method is None:
        return "no :method (RFC 9113 §8.3.1)"
    if protocol is not None and method != b"CONNECT":
        return ":protocol without CONNECT (RFC 8441 §4)"
    if (method != b"CONNECT" or protocol is not None) and (scheme is None or not path):
        return "no :scheme, or no or an empty :path (RFC 9113 §8.3.1)"
    if host is not None and authority is not None and host.lower() != authority.lower():
        return "host disagrees with :authority (RFC 9113 §8.3.1)"
    return None


def trailers_problem(fields: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why request trailers are malformed: they carry no pseudo-header fields (RFC 9113 §8.1)."""
    for name, _ in fields:
        if name[:1] == b":":
            return f"pseudo-header field {_show(name)} in trailers (RFC 9113 §8.1)"
    return None


def _show(name: bytes) -> str:
    return repr(name[:64].decode("latin-1"))
