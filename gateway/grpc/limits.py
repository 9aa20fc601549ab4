"""How much a hostile HTTP/2 peer may make the gateway hold or do, as constants and pure decisions.

wire.py and h2server.py only count (ints on the connection) and ask these; everything here is
unit-tested without sockets (tests/test_h2_hostile.py). The measured effect of each bound is in
benchmarks/h2_floods.md.

Per connection, what a client can make the gateway hold is then bounded by:
- input: one frame (h2server.MAX_FRAME, 1 MiB) plus one header block (MAX_HEADER_LIST, 64 KiB,
  in at most MAX_BLOCK_FRAMES frames) plus the unparsed rest of one read (256 KiB) when reading
  is paused;
- output: the transport's buffer up to OUTPUT_HIGH_WATER, then reading stops, plus the frames of
  one parse step (OUTPUT_CHECK_FRAMES answers) and at most MAX_OWED_ACKS PING/SETTINGS ACKs;
- HPACK: the dynamic table (4,096 bytes, RFC 7541 §4.2 default we advertise) plus
  CACHE_BYTES_PER_CONNECTION of cached decoded blocks;
- request data: the flow-control windows the gateway grants (h2server.CONNECTION_WINDOW, 16 MiB),
  which is what a legitimate upload may have in flight too.
Per worker, the HPACK block caches of all connections together stay under CACHE_BYTES_PER_WORKER.
"""

from __future__ import annotations

from gateway.calls.ratelimit import TokenBucket

# -- output the peer does not read

# The transport's write buffer limits (asyncio's defaults, written down): above the high-water mark
# the connection stops being read until the buffer is back under the low-water mark. A client that
# sends cheap requests and never reads their answers (trailers-only errors, PING ACKs) measured
# +174 MiB RSS for 14 MiB sent before this.
OUTPUT_HIGH_WATER = 64 * 1024
OUTPUT_LOW_WATER = 16 * 1024
# Answers queued in one parse step before the transport is asked whether it is full: a 256 KiB read
# of fully indexed HEADERS is ~20,000 requests, ~3 MiB of answers, if nothing looks in between.
OUTPUT_CHECK_FRAMES = 64
# PING and SETTINGS ACKs queued while the transport did not take them (nghttp2's max_outbound_ack,
# 1000, lib/nghttp2_session.h NGHTTP2_DEFAULT_MAX_OBQ_FLOOD_ITEM): past it, GOAWAY ENHANCE_YOUR_CALM.
MAX_OWED_ACKS = 1000

# -- header blocks (CVE-2024-27316 class: CONTINUATION floods)

# HEADERS plus CONTINUATION frames of one header block. Bytes are bounded by SETTINGS_MAX_HEADER_LIST_SIZE
# already, but empty CONTINUATION frames add no bytes (171 MiB of them were buffered as list entries).
# nghttp2 1.61 allows 8 CONTINUATIONs; 16 frames carry 64 KiB even at the smallest frame size a peer
# could be cutting at by choice (4 KiB).
MAX_BLOCK_FRAMES = 16

# -- the HPACK block cache (wire.BlockCache)

CACHED_BLOCK_MAX = 1024  # bytes of an encoded block worth caching: gRPC's recurring blocks are tens of bytes
CACHED_FIELDS_MAX = 4096  # bytes of its decoded fields (an indexed field may expand a 1-byte reference)
CACHE_ENTRY_OVERHEAD = 200  # dict slot, list, tuples: what an entry costs beyond its bytes (sys.getsizeof)
CACHE_BYTES_PER_CONNECTION = 64 * 1024
CACHE_BYTES_PER_WORKER = 8 * 1024 * 1024
SEEN_MAX = 256  # hashes of blocks seen once, remembered so that a second sighting is cached

# -- rapid reset (CVE-2023-44487)

# Client resets of open streams: a token bucket per connection, as nghttp2 1.57
# (NGHTTP2_DEFAULT_STREAM_RESET_BURST 1000, NGHTTP2_DEFAULT_STREAM_RESET_RATE 33 per second).
RESET_BURST = 1000
RESET_RATE = 33.0


def cache_cost(block: bytes, fields: list) -> int | None:
    """What caching `block` (decoded to `fields`) would cost in bytes; None when it is not worth caching."""
    if len(block) > CACHED_BLOCK_MAX:
        return None
    size = 0
    for name, value in fields:
        size += len(name) + len(value)
    if size > CACHED_FIELDS_MAX:
        return None
    return len(block) + size + CACHE_ENTRY_OVERHEAD


class CacheBudget:
    """The bytes every BlockCache of a worker may hold together (one instance per process: WORKER_CACHE)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def __repr__(self) -> str:
        return f"<CacheBudget {self.used}/{self.limit} bytes>"

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)


WORKER_CACHE = CacheBudget(CACHE_BYTES_PER_WORKER)


class ResetBudget(TokenBucket):
    """A token bucket of client stream resets: `burst` at once, refilled at `rate` per second;
    `spend(now)` is False once it is empty (the connection is to be closed)."""

    __slots__ = ()

    def __init__(self, now: float, burst: int = RESET_BURST, rate: float = RESET_RATE) -> None:
        super().__init__(rate, burst, now)

    spend = TokenBucket.take
