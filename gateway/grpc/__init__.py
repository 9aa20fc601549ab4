"""The gRPC relay (SPEC §9): its own HTTP/2 listener, routing by `:authority`, calls relayed to the planes.

framing.py   the wire details, pure: message prefixes, grpc-timeout, grpc-message, metadata rules
h2server.py  the HTTP/2 server (h2c and TLS) that serves the relay as an ASGI app
relay.py     the ASGI app: resolve, then relay one call message by message
upstream.py  grpc.aio channels to the planes: the one boundary for grpc's exceptions
listener.py  the listener a gateway worker starts and drains
"""
