"""`gateway` command line: serve, check, explain, demo (SPEC §11)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from urllib.parse import urlsplit

from gateway.asyncq.placement import check_regions, parse_queue_stores
from gateway.errors import GatewayError
from gateway.ports import EXIT_CODE, PortUnavailable
from gateway.routing.loader import TableInvalid, load_table
from gateway.routing.resolve import Call, RequestLookup, Route, resolve
from gateway.runner import OptionsError, ServeOptions, check_options, run_gateway
from gateway.state import load_serving_table
from gateway.stores.cli import add_store_commands, check_queue_stores, check_store
from gateway.supervisor import run_supervisor


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except OptionsError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except PortUnavailable as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_CODE
    except KeyboardInterrupt:
        return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="Regional inference gateway")
    p.add_argument("--log-level", default=os.environ.get("GATEWAY_LOG_LEVEL", "info"))
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve a routing table")
    config = os.environ.get("GATEWAY_CONFIG") or None  # the container image's mounted table (Dockerfile)
    s.add_argument(
        "--config", required=config is None, default=config, help="routing table (YAML or JSON; env GATEWAY_CONFIG)"
    )
    s.add_argument(
        "--store", default=None,
        help="admin store for §6 changes: a JSON file (default: <config>.admin.json), or postgresql://... (fleet mode, §13)",
    )  # fmt: skip
    s.add_argument(
        "--store-cache", default=None, metavar="FILE",
        help="fleet mode: the local copy of the last admin changes served (default: <config>.store-cache.json)",
    )  # fmt: skip
    s.add_argument(
        "--queue-store", action="append", default=[], metavar="DIR|REGION=URL",
        help="the async queues: a directory of embedded stores, one file per region (default: the table's directory); "
             "REGION=postgresql://... puts that region's queue in its own database (repeatable; fleet mode, §13)",
    )  # fmt: skip
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--grpc-port", type=int, default=None)
    s.add_argument("--admin-host", default="127.0.0.1")
    s.add_argument("--admin-port", type=int, default=9090)
    s.add_argument("--admin-token", default=os.environ.get("GATEWAY_ADMIN_TOKEN") or None)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--drain-timeout", type=float, default=30.0)
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.add_argument("--grpc-tls-cert", help="TLS on the gRPC listener: certificate chain (PEM)")
    s.add_argument("--grpc-tls-key", help="TLS on the gRPC listener: private key (PEM)")
    s.add_argument("--access-log", metavar="FILE|-", help="one line per call to FILE (appended) or stdout (-)")
    s.add_argument("--access-log-format", choices=("json", "combined"), default="json")
    s.add_argument("--otel", action="store_true", help="OpenTelemetry tracing, OTLP/HTTP (OTEL_EXPORTER_OTLP_*)")
    s.add_argument("--otel-sample-ratio", type=float, default=1.0, help="share of calls traced (default 1.0)")
    s.set_defaults(func=_serve)

    c = sub.add_parser("check", help="validate a routing table and list every problem")
    c.add_argument("file")
    c.set_defaults(func=_check)

    e = sub.add_parser("explain", help="print the routing decision for a call")
    e.add_argument("--config", required=True)
    e.add_argument("--store", default=None, help="admin store to apply (default: <config>.admin.json, if any)")
    e.add_argument("url", help="e.g. http://model-abc123.api.example.com/production/predict")
    e.add_argument("-X", "--method", default=None, help="HTTP method (default: GET for status calls, else POST)")
    e.add_argument("-H", "--header", action="append", default=[], metavar="K:V")
    e.set_defaults(func=_explain)

    d = sub.add_parser("demo", help="start sample planes and a gateway, print calls to try")
    d.add_argument("--port", type=int, default=8080)
    d.add_argument("--admin-port", type=int, default=9090)
    d.add_argument("--grpc-port", type=int, default=50051, help="the gateway's gRPC listener")
    d.add_argument("--config", default=None, help="table to use (default: routing_config/example.yaml)")
    d.add_argument("--python", action="store_true", help="also print the calls as a Python script (Host headers)")
    d.add_argument("--print-only", action="store_true", help=argparse.SUPPRESS)
    d.set_defaults(func=_demo)
    add_store_commands(sub)
    return p


def _serve(args: argparse.Namespace) -> int:
    try:
        queues = parse_queue_stores(args.queue_store)
    except ValueError as exc:
        raise OptionsError(str(exc)) from None
    if not check_store(args.store):
        return 2
    try:
        table = load_serving_table(
            args.config, args.store, args.store_cache
        )  # fail fast, with every problem, before binding anything
    except TableInvalid as exc:
        print(f"gateway: {args.config} is not a valid routing table:\n{exc}", file=sys.stderr)
        return 2
    try:
        check_regions(queues, table)
    except ValueError as exc:
        raise OptionsError(str(exc)) from None
    if not check_queue_stores(queues.databases):
        return 2
    opts = ServeOptions(
        config=args.config, store=args.store, store_cache=args.store_cache, host=args.host, port=args.port, admin_host=args.admin_host,
        admin_port=args.admin_port, admin_token=args.admin_token, grpc_port=args.grpc_port,
        workers=args.workers, drain_timeout=args.drain_timeout, tls_cert=args.tls_cert, tls_key=args.tls_key,
        grpc_tls_cert=args.grpc_tls_cert, grpc_tls_key=args.grpc_tls_key, queue_store=queues.directory,
        access_log=args.access_log, access_log_format=args.access_log_format, otel=args.otel,
        otel_sample_ratio=args.otel_sample_ratio, queue_databases=queues.databases,
    )  # fmt: skip
    check_options(opts)
    return run_supervisor(opts) if opts.workers > 1 else run_gateway(opts)


def _check(args: argparse.Namespace) -> int:
    try:
        table = load_table(args.file)
    except TableInvalid as exc:
        print(f"{args.file}: {len(exc.problems)} problem(s)")
        for problem in exc.problems:
            print(f"  {problem}")
        return 1
    print(f"{args.file}: ok ({len(table.models)} models, {len(table.planes)} planes, digest {table.digest[:12]})")
    return 0


def _explain(args: argparse.Namespace) -> int:
    try:
        table = load_serving_table(args.config, args.store)
    except TableInvalid as exc:
        print(f"{args.config} is not a valid routing table:\n{exc}", file=sys.stderr)
        return 2
    url = urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.netloc:
        print(f"gateway explain: expected an http(s) URL, got {args.url!r}", file=sys.stderr)
        return 2
    headers: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            print(f"gateway explain: --header takes K:V, got {item!r}", file=sys.stderr)
            return 2
        headers[name.strip().lower()] = value.strip()
    target = url.path or "/"
    if url.query:
        target += "?" + url.query
    method = args.method or ("GET" if target.rstrip("/").endswith(("async_queue_status", "websocket")) else "POST")
    call = Call(method, headers.get("host", url.netloc), target, headers.get("authorization"),
                headers.get("x-baseten-routing-key"))  # fmt: skip
    try:
        route = resolve(table, call)
    except GatewayError as error:
        print(f"error: {error.status} {error.error_code}: {error.message}")
        print(error.body().decode())
        return 1
    if isinstance(route, RequestLookup):
        where = f"region '{route.region}'" if route.region else "every region this gateway serves"
        print(f"async request lookup ({route.endpoint}) of '{route.request_id}' for {route.model.kind} "
              f"'{route.model.id}' (team {route.model.team}), in the store of {where}")  # fmt: skip
        return 0
    print(describe_route(route, method))
    return 0


def describe_route(route: Route, method: str) -> str:
    dep = route.deployment
    lines = [
        f"model:        {route.model.id} ({route.model.kind}, team {route.model.team})",
        f"environment:  {route.environment or '(none: deployment target)'}",
        f"deployment:   {dep.id} (status {dep.status}{'' if route.side == 'primary' else ', ' + route.side})",
        f"plane:        {dep.plane.name}",
        f"region:       {dep.region}" + (f" (regional host: pinned to {route.region})" if route.region else ""),
        f"action:       {route.action}"
        + (" (held while the plane wakes the deployment, then forwarded)" if route.action == "hold" else ""),
        f"upstream:     {'POST' if route.action == 'wake' else method} "
        + (dep.plane.url.base_url + "/wake" if route.action == "wake" else route.upstream_url),
    ]
    if dep.endpoints_srv is not None:
        lines.append(f"replicas:     the targets of SRV {dep.endpoints_srv} (resolved when called; the path above)")
    elif len(dep.endpoints) > 1:
        lines.append(f"replicas:     {', '.join(e.base_url for e in dep.endpoints)} (least loaded of two picked)")
    env = route.model.environments.get(route.environment)
    if env is not None and env.candidate is not None:
        lines.append(f"promotion:    {env.candidate.deployment.id} at {env.candidate.percent:g}% (sticky per caller)")
    if env is not None and env.canary is not None:
        lines.append(f"canary:       {env.canary.deployment.id} at {env.canary.percent:g}% (sticky per caller)")
    if env is not None and env.shadow is not None:
        lines.append(f"shadow:       {env.shadow.deployment.id} at {env.shadow.percent:g}%")
    return "\n".join(lines)


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo.run import run_demo

    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
