"""What a call's rate_limit costs (issue 13): `Limiter.admit` + `Permit.release` per call for a key
without limits, a key with its own limits, and a key with its own and its team's, against the pure
`resolve()` of the same call measured in the same run (the work every call does anyway).

Run from the repository root: `.venv/bin/python benchmarks/run_ratelimit.py [--calls N]`.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.calls.ratelimit import Limiter  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.routing.loader import compile_table  # noqa: E402
from gateway.routing.resolve import Call, resolve  # noqa: E402

LIMIT = {"requests_per_second": 1e6, "burst": 1000000, "max_concurrent": 1000}


def table():  # noqa: ANN201
    def key(name: str, team: str, limited: bool) -> dict:
        k = {"name": name, "team": team, "sha256": hashlib.sha256(name.encode()).hexdigest()}
        return {**k, "rate_limit": LIMIT} if limited else k

    return compile_table({
        "version": 1, "domains": ["api.example.com"], "regions": {"us": {}},
        "planes": {"us-1": {"region": "us", "url": "http://127.0.0.1:9001"}},
        "teams": {"free": {}, "paid": {"rate_limit": LIMIT}},
        "api_keys": [key("none", "free", False), key("own", "free", True), key("both", "paid", True)],
        "models": {"m1": {"team": "free", "deployments": {"d1": {"plane": "us-1"}},
                          "environments": {"production": {"deployment": "d1"}}}},
    })  # fmt: skip


def per_call(fn, calls: int) -> float:  # noqa: ANN001
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    t = table()
    keys = {k.name: k for k in t.api_keys.values()}
    limiter = Limiter(Metrics(), time.monotonic)
    call = Call("POST", "model-m1.api.example.com", "/production/predict", "Api-Key none")
    base = per_call(lambda: resolve(t, call), args.calls)
    print(f"resolve() of the call: {base * 1e9:.0f} ns")
    for name in ("none", "own", "both"):
        key = keys[name]
        cost = per_call(lambda key=key: limiter.admit(t, key).release(), args.calls)
        print(f"admit + release, key {name!r}: {cost * 1e9:.0f} ns = {cost / base:.2f}x resolve()")


if __name__ == "__main__":
    main()
