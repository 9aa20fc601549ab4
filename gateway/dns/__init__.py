"""DNS for plane and endpoint hosts (SPEC §8): cached, refreshed, stale-tolerant, region-checked.

`Resolver` is the I/O shell; `allowed` is the pure region check it applies. dnspython is touched
only in `gateway.dns.lookup`.
"""

from gateway.dns.lookup import parse_nameserver
from gateway.dns.networks import allowed
from gateway.dns.resolver import Resolver

__all__ = ["Resolver", "allowed", "parse_nameserver"]
