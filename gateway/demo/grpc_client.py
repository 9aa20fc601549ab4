"""A small gRPC client for the demo's `demo.Echo` model, called through the gateway's gRPC listener.

    python -m gateway.demo.grpc_client --target 127.0.0.1:50051 --authority model-abc123.grpc.localhost
    python -m gateway.demo.grpc_client ... --chat 3                 # a bidirectional stream of 3 messages
    python -m gateway.demo.grpc_client ... -H x-baseten-environment:staging

The gateway routes by `:authority` (SPEC §1 gRPC hosts), so the channel sets it explicitly and
no DNS is needed. Exit status: 0 when the call ends OK, 1 with the gRPC status otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import grpc

from gateway.demo.protos import demo_pb2, demo_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway.demo.grpc_client", description=__doc__.splitlines()[0])
    p.add_argument("--target", default="127.0.0.1:50051", help="the gateway's gRPC listener, host:port")
    p.add_argument("--authority", required=True, help="e.g. model-abc123.grpc.localhost")
    p.add_argument("--key", default="demo-key-acme", help="API key (sent as `authorization: Api-Key <key>`)")
    p.add_argument("--text", default="hello")
    p.add_argument("--chat", type=int, default=0, metavar="N", help="send N messages on the Chat stream instead")
    p.add_argument("-H", "--metadata", action="append", default=[], metavar="KEY:VALUE")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    metadata = [("authorization", f"Api-Key {args.key}")] if args.key else []
    for item in args.metadata:
        key, sep, value = item.partition(":")
        if not sep:
            p.error(f"-H takes KEY:VALUE, got {item!r}")
        metadata.append((key.strip().lower(), value.strip()))
    with grpc.insecure_channel(args.target, options=[("grpc.default_authority", args.authority)]) as channel:
        stub = demo_pb2_grpc.EchoStub(channel)
        try:
            if args.chat:
                return _chat(stub, args.chat, args.text, metadata, args.timeout)
            reply, call = stub.Say.with_call(
                demo_pb2.SayRequest(text=args.text), metadata=metadata, timeout=args.timeout
            )
        except grpc.RpcError as error:
            return _failed(error)
    print(f'Say -> "{reply.text}" from plane {reply.plane} (region {reply.region})')
    print(f"  model {reply.model_id}, environment {reply.environment or '-'}, deployment {reply.deployment_id}")
    _status(call)
    return 0


def _chat(stub: demo_pb2_grpc.EchoStub, count: int, text: str, metadata: list, timeout: float) -> int:
    def messages() -> Iterator[demo_pb2.ChatMessage]:
        for i in range(count):
            yield demo_pb2.ChatMessage(text=f"{text} {i + 1}")

    replies = stub.Chat(messages(), metadata=metadata, timeout=timeout)
    for reply in replies:
        print(f"Chat <- {reply.text}")
    _status(replies)
    return 0


def _status(call: grpc.Call) -> None:
    request_id = dict(call.trailing_metadata() or ()).get("x-baseten-request-id", "-")
    print(f"status {call.code().name}, x-baseten-request-id {request_id}")


def _failed(error: grpc.RpcError) -> int:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    request_id = (
        dict(error.trailing_metadata() or ()).get("x-baseten-request-id", "-") if isinstance(error, grpc.Call) else "-"
    )
    print(f"status {code.name if code else 'UNKNOWN'}: {details}")
    print(f"  x-baseten-request-id {request_id}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
