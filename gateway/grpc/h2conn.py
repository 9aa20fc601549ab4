"""The `h2` connection both sides of the relay use, with two per-frame costs of h2 4.x taken out.

- `_receive_frame` is h2's own but for its first line, `logger.trace("...", repr(frame))`: the repr
  of every received frame was built whether or not anything logs it (about 3% of the gateway's
  CPU per relayed call in py-spy).
- HPACK encoding is `LiteralEncoder`'s (see hpack_literal.py).
"""

from __future__ import annotations

import h2.config
import h2.connection
from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError, StreamIDTooLowError
from hyperframe.frame import Frame, RstStreamFrame

from gateway.grpc.hpack_literal import LiteralEncoder


class H2Connection(h2.connection.H2Connection):
    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self.encoder = LiteralEncoder()  # type: ignore[assignment]

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
