"""The gRPC listener of a gateway worker: the relay app on its HTTP/2 server, started and drained by the runner."""

from __future__ import annotations

import ssl

from gateway.calls.pipeline import Pipeline
from gateway.grpc.h2server import H2Server
from gateway.grpc.relay import GrpcRelay
from gateway.grpc.upstream import Planes
from gateway.metrics import Metrics
from gateway.state import TableState
from gateway.tls import server_context


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    return server_context(cert, key, ["h2"])  # gRPC is HTTP/2 only


class GrpcListener:
    def __init__(
        self, state: TableState, metrics: Metrics, ssl_context: ssl.SSLContext | None, pipeline: Pipeline
    ) -> None:  # fmt: skip
        # The worker's call pipeline and its region-checked connector, shared with the HTTP listener
        # (one hold, one admission, one in-flight count per deployment); runner.DataPlane closes it.
        self.pipeline = pipeline
        self.planes = Planes(pipeline.connector)
        state.on_swap.append(self.planes.table_swapped)
        self.relay = GrpcRelay(state, metrics, self.planes, pipeline)
        self.server = H2Server(self.relay, ssl_context)
        self.tls = ssl_context is not None

    def __repr__(self) -> str:
        return f"<GrpcListener {self.server!r} {self.planes!r}>"

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        await self.server.start(host, port, reuse_port=reuse_port)

    @property
    def port(self) -> int | None:
        return self.server.port

    @property
    def busy(self) -> bool:
        return self.server.busy

    def stop_accepting(self) -> None:
        self.server.stop_accepting()

    async def close(self) -> None:
        await self.server.close()
        await self.planes.close()
