"""Calls to the planes' gRPC addresses, and the one boundary for grpc's exceptions.

One `grpc.aio` channel per plane address is shared by every call to it. A table swap retires the
channels whose address left the table; a retired channel is closed once its last call has
finished, so a reload never cuts a stream in flight (SPEC §3). Nothing outside this module
catches an exception from grpc.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc import aio

try:  # raised by grpc core when an operation is refused because the call is over
    from grpc._cython.cygrpc import ExecuteBatchError
except ImportError:  # pragma: no cover - grpcio moved it
    ExecuteBatchError = aio.UsageError  # type: ignore[assignment,misc]

from gateway.errors import ModelUnavailable, UpstreamTimeout
from gateway.grpc.framing import MAX_MESSAGE_BYTES, Metadata
from gateway.routing.model import Table

log = logging.getLogger("gateway.grpc")

CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # The client owns retries: the gateway sends each call once, and buffers no copies for retrying.
    ("grpc.enable_retries", 0),
    # A plane that was down is tried again within a second, not after grpc's default of up to 120 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
COMPRESSION = {"gzip": grpc.Compression.Gzip, "deflate": grpc.Compression.Deflate}
MAX_CACHED_METHODS = 1024
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED


class PlaneChannel:
    """A shared channel to one plane address, with the calls using it counted."""

    __slots__ = ("address", "channel", "users", "retired", "methods")

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.users = 0
        self.retired = False
        self.methods: dict[str, tuple] = {}  # method path -> (unary_stream, stream_stream) callables

    def __repr__(self) -> str:
        return f"<PlaneChannel {self.address} users={self.users}{' retired' if self.retired else ''}>"

    def callables(self, method: str) -> tuple:
        pair = self.methods.get(method)
        if pair is None:
            if len(self.methods) >= MAX_CACHED_METHODS:
                self.methods.clear()  # method paths come from clients: keep the cache bounded
            # No (de)serializers: messages are relayed as the bytes they are, whatever their schema.
            pair = self.methods[method] = (self.channel.unary_stream(method), self.channel.stream_stream(method))
        return pair


class Channels:
    """The gateway's plane channels, by address."""

    def __init__(self) -> None:
        self.open: dict[str, PlaneChannel] = {}
        self.closing: set[asyncio.Task] = set()

    def __repr__(self) -> str:
        return f"<Channels {sorted(self.open)} closing={len(self.closing)}>"

    def acquire(self, address: str) -> PlaneChannel:
        channel = self.open.get(address)
        if channel is None:
            channel = self.open[address] = PlaneChannel(address)
        channel.users += 1
        return channel

    def release(self, channel: PlaneChannel) -> None:
        channel.users -= 1
        if channel.users == 0 and channel.retired:
            self._close(channel)

    def table_swapped(self, table: Table) -> None:
        """Retire the channels whose address is in no plane of the new table."""
        keep = {plane.grpc for plane in table.planes.values() if plane.grpc}
        for address in [a for a in self.open if a not in keep]:
            channel = self.open.pop(address)
            channel.retired = True
            if channel.users == 0:
                self._close(channel)

    def _close(self, channel: PlaneChannel) -> None:
        task = asyncio.get_running_loop().create_task(channel.channel.close())
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)

    async def close(self) -> None:
        for channel in self.open.values():
            self._close(channel)
        self.open.clear()
        if self.closing:
            await asyncio.wait(list(self.closing), timeout=2)


class PlaneCall:
    """One relayed call: a stream-stream call, or unary-stream when the one request message is known at start.

    Both are the same on the wire (HEADERS, DATA..., END_STREAM), so every call shape is relayed
    without knowing it. Methods return plain values; the call's end is read from `status()`.
    """

    __slots__ = ("call", "deadline", "timeout", "loop")

    def __init__(
        self,
        channel: PlaneChannel,
        method: str,
        metadata: Metadata,
        timeout: float | None,
        encoding: str | None,
        request: bytes | None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.deadline = None if timeout is None else self.loop.time() + timeout
        unary_stream, stream_stream = channel.callables(method)
        compression = COMPRESSION.get(encoding or "")
        if request is not None:
            self.call = unary_stream(request, timeout=timeout, metadata=metadata, compression=compression)
        else:
            self.call = stream_stream(timeout=timeout, metadata=metadata, compression=compression)

    def cancel(self) -> None:
        self.call.cancel()  # the plane gets RST_STREAM(CANCEL); a no-op once the call is over

    async def write(self, message: bytes) -> bool:
        """Send one message; False when the call is already over (its status says why)."""
        call = self.call
        if call.done():
            return False
        send = getattr(getattr(call, "_cython_call", None), "send_serialized_message", None)
        try:
            if send is None:  # pragma: no cover - grpcio changed its internals
                await call.write(message)
            else:
                # Not `call.write()`: when the plane ends the call while a message is being sent,
                # grpc.aio 1.85's write() replaces the plane's status with INTERNAL "Internal error
                # from Core" for good (`_StreamRequestMixin._write` calls `set_internal_error`), so a
                # plane refusing an upload mid-stream would reach the client as INTERNAL. The send
                # underneath fails alone, and the plane's status stays (tests/test_grpc.py).
                await call.wait_for_connection()
                await send(message)
        except (ExecuteBatchError, aio.AioRpcError, asyncio.InvalidStateError, aio.UsageError):
            return False
        except asyncio.CancelledError:
            if _cancelling():
                call.cancel()
                raise
            return False
        return True

    async def done_writing(self) -> None:
        try:
            await self.call.done_writing()
        except (ExecuteBatchError, aio.AioRpcError, asyncio.InvalidStateError, aio.UsageError):
            pass
        except asyncio.CancelledError:
            if _cancelling():
                raise

    async def initial_metadata(self) -> Metadata:
        try:
            metadata = await self.call.initial_metadata()
        except aio.AioRpcError:
            return ()
        except asyncio.CancelledError:
            if _cancelling():
                raise
            return ()
        return tuple(metadata or ())

    async def read(self) -> bytes | None:
        """The next response message, or None at the end of the response stream."""
        try:
            message = await self.call.read()
        except aio.AioRpcError:
            return None
        except asyncio.CancelledError:
            if _cancelling():
                raise
            return None
        return None if message is aio.EOF else message

    async def status(self) -> tuple[int, str, Metadata]:
        """(code, details, trailing metadata) of the plane; GatewayError when the plane never answered."""
        code = await self.call.code()
        details = await self.call.details() or ""
        if code == UNAVAILABLE and details.startswith("failed to connect to all addresses"):
            reason = details.rpartition(": ")[2]
            raise ModelUnavailable(f"could not connect to the plane's gRPC address: {reason}")
        if code == DEADLINE_EXCEEDED and self.deadline is not None and self.loop.time() >= self.deadline - 0.01:
            raise UpstreamTimeout(f"the call did not finish within its deadline ({self.timeout:g} s)")
        trailing = await self.call.trailing_metadata()
        return code.value[0], details, tuple(trailing or ())


def _cancelling() -> bool:
    """grpc raises CancelledError from a call cancelled locally; only a cancelled *task* propagates it."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
