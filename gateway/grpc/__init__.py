"""The gRPC relay (SPEC §9): its own HTTP/2 listener, routing by `:authority`, calls relayed to the planes.

framing.py        the wire details, pure: message prefixes, grpc-timeout, grpc-message, metadata rules
h2server.py       the HTTP/2 server (h2c and TLS), handing each stream to the relay
relay.py          the app: resolve, then forward one call's frames both ways
upstream.py       the HTTP/2 client to the planes: pooled h2c connections, frames forwarded unchanged
wire.py           the HTTP/2 frame layer both sides use (RFC 9113 for gRPC's needs: frames, flow control, HPACK)
hpack_literal.py  the HPACK encoder both sides use (static table and literals, no Huffman)
limits.py         what a hostile peer may make the gateway hold or do: the flood bounds, pure decisions
malformed.py      which request field sections HTTP/2 calls malformed (RFC 9113 §8.2, §8.3), pure
listener.py       the listener a gateway worker starts and drains
"""
