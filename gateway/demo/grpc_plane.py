"""The demo's gRPC model on each sample plane: `demo.Echo` (gateway/demo/protos/demo.proto) on the plane's `grpc` address.

Like the HTTP sample plane, it serves every model it hosts on one address and tells them apart by
the identity metadata the gateway sets (SPEC §9): x-baseten-model-id, -environment, -deployment-id,
-request-id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpc import aio

from gateway.demo.protos import demo_pb2, demo_pb2_grpc


class GrpcSamplePlane(demo_pb2_grpc.EchoServicer):
    def __init__(self, name: str, region: str) -> None:
        self.name = name
        self.region = region
        self.server: aio.Server | None = None

    async def start(self, address: str) -> int:
        """Serve on `host:port` (h2c, as planes' gRPC addresses are); the port bound."""
        self.server = aio.server()
        demo_pb2_grpc.add_EchoServicer_to_server(self, self.server)
        port = self.server.add_insecure_port(address)
        await self.server.start()
        return port

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=1)

    async def Say(self, request: demo_pb2.SayRequest, context: aio.ServicerContext) -> demo_pb2.SayReply:  # noqa: N802
        who = dict(context.invocation_metadata() or ())
        return demo_pb2.SayReply(
            text=request.text,
            model_id=str(who.get("x-baseten-model-id", "")),
            environment=str(who.get("x-baseten-environment", "")),
            deployment_id=str(who.get("x-baseten-deployment-id", "")),
            request_id=str(who.get("x-baseten-request-id", "")),
            plane=self.name,
            region=self.region,
        )

    async def Chat(  # noqa: N802
        self, request_iterator: AsyncIterator[demo_pb2.ChatMessage], context: aio.ServicerContext
    ) -> AsyncIterator[demo_pb2.ChatMessage]:
        async for message in request_iterator:
            yield demo_pb2.ChatMessage(text=f"[{self.name}/{self.region}] {message.text}")
