"""The `h2` connection both sides of the relay use, with two per-frame costs of h2 4.x taken out.

- `_receive_frame` is h2's own but for its first line, `logger.trace("...", repr(frame))`: the repr
  of every received frame was built whether or not anything logs it (about 3% of the gateway's
  CPU per relayed call in py-spy).
- h2 counts the open streams by scanning all of them (and drops the closed ones while at it) each
  time a stream opens; the relay keeps its own counts and limits (`len(streams)` against the
  peer's or our MAX_CONCURRENT_STREAMS), so here the scan, and its clean-up, runs every 128th time.
- HPACK encoding is `LiteralEncoder`'s (see hpack_literal.py), and decoding is hpack's behind a
  cache of whole header blocks (`BlockCache`): gRPC peers send the same blocks over and over (the
  plane's response headers and `grpc-status: 0` trailers, fully indexed after the first call).
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import hpack
from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError, StreamIDTooLowError
from hyperframe.frame import Frame, RstStreamFrame

from gateway.grpc.hpack_literal import LiteralEncoder

SCAN_EVERY = 128
MAX_CACHED_BLOCKS = 256


class BlockCache(hpack.Decoder):
    """hpack's decoder, remembering the fields of header blocks that left the dynamic table unchanged.

    A header block decodes to the same fields as long as the dynamic table is the same (RFC 7541
    §2.3), so a block that inserted nothing and resized nothing is cached by its bytes, and the
    whole cache is dropped whenever a block changes the table.
    """

    def __init__(self) -> None:
        super().__init__()
        self.blocks: dict[bytes, list] = {}
        self.changes = 0
        add = self.header_table.add

        def counted_add(name: bytes, value: bytes) -> Any:
            self.changes += 1
            return add(name, value)

        self.header_table.add = counted_add  # type: ignore[method-assign]

    def decode(self, data: Any, raw: bool = False) -> Any:
        key = data if type(data) is bytes else bytes(data)
        cached = self.blocks.get(key)
        if cached is not None:
            return list(cached)
        changes, size = self.changes, self.header_table.maxsize
        fields = list(super().decode(key, raw))
        if self.changes != changes or self.header_table.maxsize != size:
            self.blocks.clear()  # the table changed: the cached blocks may mean something else now
        else:
            if len(self.blocks) >= MAX_CACHED_BLOCKS:
                self.blocks.clear()
            self.blocks[key] = fields
            return list(fields)
        return fields


class H2Connection(h2.connection.H2Connection):
    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self.encoder = LiteralEncoder()  # type: ignore[assignment]
        self.decoder = BlockCache()
        self.decoder.max_header_list_size = self.DEFAULT_MAX_HEADER_LIST_SIZE
        self.opened = 0

    @property
    def open_outbound_streams(self) -> int:
        self.opened += 1
        return super().open_outbound_streams if self.opened % SCAN_EVERY == 0 else 0

    @property
    def open_inbound_streams(self) -> int:
        self.opened += 1
        return super().open_inbound_streams if self.opened % SCAN_EVERY == 0 else 0

    def _receive_frame(self, frame: Frame) -> list:
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as e:
            # A stream closed by RST_STREAM gets RST_STREAM again; otherwise it is a connection error.
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except StreamIDTooLowError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events
