"""Route lookup cost for 10 vs 100,000 models: the pure `resolve()`, no cache in front of it.

Goal (issue 2): lookup for 100,000 models no slower than 1.5x lookup for 10.
Run from the repository root: `.venv/bin/python benchmarks/run_lookup.py [--models N] [--calls N]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.routing.loader import compile_table  # noqa: E402
from gateway.routing.resolve import Call, resolve  # noqa: E402


def build(n: int):
    doc = {
        "version": 1,
        "domains": ["api.example.com"],
        "regions": {"us": {}, "eu": {}},
        "planes": {"us-1": {"region": "us", "url": "http://127.0.0.1:9001"},
                   "eu-1": {"region": "eu", "url": "http://127.0.0.1:9002"}},
        "teams": {"acme": {"regional_environments": {"prod-us": "us"}}},
        "api_keys": [{"name": "k", "team": "acme", "sha256": hashlib.sha256(b"key").hexdigest()}],
        "models": {
            f"m{i}": {
                "team": "acme",
                "deployments": {"d1": {"plane": "us-1"}, "d2": {"plane": "us-1"}},
                "environments": {
                    "production": {"deployment": "d1"},
                    "staging": {"deployment": "d1", "canary": {"deployment": "d2", "percent": 10}},
                    "prod-us": {"deployment": "d1"},
                },
            }
            for i in range(n)
        },
    }  # fmt: skip
    started = time.perf_counter()
    table = compile_table(doc)
    return table, time.perf_counter() - started


def calls(n_models: int, count: int) -> list[Call]:
    rng = random.Random(7)
    shapes = [
        ("model-{}.api.example.com", "/production/predict"),
        ("model-{}.api.example.com", "/environments/staging/predict"),
        ("model-{}-prod-us.api.example.com", "/predict"),
        ("model-{}.api.example.com", "/production/sync/v1/chat/completions?stream=true"),
    ]
    out = []
    for _ in range(count):
        host, path = rng.choice(shapes)
        out.append(Call("POST", host.format(f"m{rng.randrange(n_models)}"), path, "Api-Key key", None))
    return out


def measure(table, batch: list[Call], rounds: int) -> list[float]:
    per_call = []
    for _ in range(rounds):
        started = time.perf_counter()
        for c in batch:
            resolve(table, c)
        per_call.append((time.perf_counter() - started) / len(batch) * 1e9)
    return per_call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    small, small_compile = build(10)
    big, big_compile = build(args.models)
    results = {}
    for name, table, n in (("10 models", small, 10), (f"{args.models} models", big, args.models)):
        batch = calls(n, args.calls)
        measure(table, batch[:2000], 1)  # warm up
        results[name] = statistics.median(measure(table, batch, args.rounds))
    print(f"table compile: 10 models {small_compile * 1e3:.1f} ms, {args.models} models {big_compile:.1f} s")
    print(f"{'table':>16} | {'ns per resolve (median of rounds)':>34}")
    for name, ns in results.items():
        print(f"{name:>16} | {ns:>34.0f}")
    small_ns, big_ns = results["10 models"], results[f"{args.models} models"]
    ratio = big_ns / small_ns
    print(
        f"ratio {args.models} / 10 models: {ratio:.2f}x (goal <= 1.5x: {'goal met' if ratio <= 1.5 else 'goal missed'})"
    )
    out = Path(__file__).parent / "results" / "lookup-latest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"ns_per_resolve": results, "ratio": ratio, "compile_seconds": big_compile}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
