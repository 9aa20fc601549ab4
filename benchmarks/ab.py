#!/usr/bin/env python3
"""A/B the gateway at two revisions on this machine, alternating, with the benchmark scripts of this checkout.

    .venv/bin/python benchmarks/ab.py                       # before a476c78, after HEAD, 3 rounds, ~5 min
    .venv/bin/python benchmarks/ab.py --before REV --after REV --rounds 5 --duration 5

Each revision is exported with `git -C <repo> archive REV | tar -x -C /tmp/ab-<sha>` (committed files
only: uncommitted edits in the checkout are in neither side). The scripts run from this checkout
(benchmarks/run_http.py and benchmarks/run_grpc.py, same peers, loads and nginx), and only the gateway
process runs from the export: `--gateway-root /tmp/ab-<sha>`, i.e. `python -m gateway` with that cwd,
which comes first on sys.path, so that tree is imported (checked before the first round by printing
`gateway.__file__` from a subprocess with that cwd).

Every round measures both revisions, in alternating order (before/after, then after/before, ...), so
that a slow drift of the machine does not favour one side. Per revision and round:
  run_http.py --only direct,nginx-proxy,gateway --conns 32   req/s, and the gateway's CPU us per request
  run_grpc.py --only direct,gateway --loads unary:32         calls/s, and the gateway's CPU us per call
The ratios (gateway / nginx-proxy, gateway / direct) are taken within one script run. The final table
holds the medians of the rounds per revision and the after/before change; the spread of the rounds is
printed as the noise band. Writes benchmarks/results/ab-latest.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H  # noqa: E402

HTTP_RATIO_GOAL = 0.35  # gateway / nginx-proxy req/s at 32 connections, one worker
GRPC_RATIO_GOAL = 0.6  # gateway / direct unary calls/s at 32 in flight
HTTP_FLAGS = ("--config", "--host", "--port", "--admin-port")
GRPC_FLAGS = ("--config", "--port", "--admin-port", "--grpc-port")

# (key, column header, format, higher is better)
METRICS = [
    ("http_gw_rps", "HTTP gw req/s", ",.0f", True),
    ("http_ratio", "gw/nginx-proxy", ".3f", True),
    ("http_gw_cpu_us", "HTTP gw CPU us/call", ".1f", False),
    ("grpc_gw_cps", "gRPC gw calls/s", ",.0f", True),
    ("grpc_ratio", "gw/direct", ".3f", True),
    ("grpc_gw_cpu_us", "gRPC gw CPU us/call", ".1f", False),
]


# --------------------------------------------------------------------------- revisions


def git(repo: Path, *argv: str, timeout: float = 60) -> str:
    r = subprocess.run(["git", "-C", str(repo), *argv], capture_output=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise SystemExit(f"git {' '.join(argv)} failed: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout.decode().strip()


def export(repo: Path, sha: str) -> Path:
    """`git archive sha | tar -x` into /tmp/ab-<sha> (reused if a previous export completed)."""
    dest = Path(tempfile.gettempdir()) / f"ab-{sha}"
    marker = dest / ".ab-export-complete"
    if marker.exists():
        H.log(f"reusing export {dest}")
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(repo), "archive", sha], stdout=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, capture_output=True, timeout=120)
    archive.stdout.close()  # type: ignore[union-attr]
    if archive.wait(timeout=120) != 0 or tar.returncode != 0:
        raise SystemExit(f"export of {sha} failed: {tar.stderr.decode(errors='replace')}")
    marker.write_text(sha + "\n")
    H.log(f"exported {sha} to {dest}")
    return dest


def cli_flags(python: str, root: Path) -> tuple[set[str], str | None]:
    """The long options `gateway serve --help` lists in that tree, or why it could not be run."""
    try:
        r = subprocess.run([python, "-m", "gateway", "serve", "--help"], cwd=root, capture_output=True,
                           timeout=60, start_new_session=True)  # fmt: skip
    except subprocess.TimeoutExpired:
        return set(), "`gateway serve --help` timed out"
    out = (r.stdout + r.stderr).decode(errors="replace")
    if r.returncode != 0:
        return set(), f"`gateway serve --help` exit {r.returncode}: {out[-500:]}"
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out)), None


class Rev:
    def __init__(self, label: str, spec: str, sha: str, subject: str, root: Path):
        self.label, self.spec, self.sha, self.subject, self.root = label, spec, sha, subject, root
        self.imported = ""
        self.problems: dict[str, str] = {}  # bench -> why it cannot run on this revision

    @property
    def short(self) -> str:
        return self.sha[:7]


# --------------------------------------------------------------------------- running one script


class Runner:
    def __init__(self, args, tmp: Path):
        self.args, self.tmp = args, tmp
        self.deadline = time.monotonic() + 60 * args.max_minutes
        self.current: subprocess.Popen | None = None
        self.n = 0

    def run(self, label: str, argv: list[str], timeout: float) -> tuple[dict | None, str | None]:
        """Run a benchmark script with a time limit; returns (its JSON results, problem)."""
        left = self.deadline - time.monotonic()
        if left < min(timeout, 30):
            return None, "skipped: --max-minutes budget used up"
        timeout = min(timeout, left)
        self.n += 1
        out = self.tmp / f"{self.n:02d}-{label}.json"
        logp = self.tmp / f"{self.n:02d}-{label}.log"
        argv = argv + ["--output", str(out)]
        t0 = time.monotonic()
        with open(logp, "wb") as logf:
            self.current = subprocess.Popen(argv, cwd=H.REPO_ROOT, stdin=subprocess.DEVNULL, stdout=logf,
                                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            try:
                rc = self.current.wait(timeout=timeout)
                problem = None
            except subprocess.TimeoutExpired:
                self.stop_current()
                rc, problem = None, f"timed out after {timeout:.0f} s"
            except BaseException:  # Ctrl-C / SIGTERM: the script stops its servers on our SIGTERM
                self.stop_current()
                raise
            self.current = None
        H.log(f"  {label}: {time.monotonic() - t0:.0f} s, exit {rc}")
        data = None
        if out.exists():
            try:
                data = json.loads(out.read_text())
            except ValueError as e:
                problem = problem or f"unreadable results: {e}"
        elif problem is None:
            problem = f"exit {rc}, no results"
        if problem or rc not in (0, None):
            tail = logp.read_text(errors="replace")[-3000:]
            H.log(f"----- {label} output (tail) -----\n{tail}\n----- end -----")
        return data, problem

    def stop_current(self) -> None:
        """SIGTERM first: the scripts turn it into a clean stop of every server they started."""
        p = self.current
        if p is None or p.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                return
            try:
                p.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


# --------------------------------------------------------------------------- metrics of one round


def _noise_notes(prefix: str, rows: list[dict]) -> list[str]:
    notes = []
    for r in rows:
        cell = H.noise_cell(r.get("noise"))
        if cell:
            notes.append(f"{prefix} {r['target']}: {cell}")
    return notes


def _busy(rows: list[dict]) -> list[dict]:
    """The busiest processes outside the benchmark during the noisy rows (from the scripts' noise records)."""
    return [h for r in rows if H.noise_cell(r.get("noise")) for h in (r.get("noise") or {}).get("other_top", [])]


def http_metrics(data: dict | None, problem: str | None) -> dict:
    m: dict = {"notes": [], "noise": []}
    if problem:
        m["notes"].append(f"http: {problem}")
    if not data:
        return m
    rows = {r["target"]: r for r in data.get("results", []) if r.get("conns") == 32}
    for name, key in (("direct", "http_direct_rps"), ("nginx-proxy", "http_nginx_rps"), ("gateway", "http_gw_rps")):
        r = rows.get(name)
        if r is None:
            m["notes"].append(f"http {name}: not measured")
        elif r.get("failed") or r.get("rps") is None:
            m["notes"].append(f"http {name}: {str(r.get('failed', 'no result')).splitlines()[0][:160]}")
        elif r.get("errors_total"):
            # Errors answered fast would inflate req/s: the row does not count.
            m["notes"].append(f"http {name}: {r['errors_total']} errors, row not counted")
        else:
            m[key] = r["rps"]
            if name == "gateway":
                m["http_gw_cpu_us"] = r.get("cpu_us_per_call")
    if m.get("http_gw_rps") and m.get("http_nginx_rps"):
        m["http_ratio"] = m["http_gw_rps"] / m["http_nginx_rps"]
    m["noise"], m["busy"] = _noise_notes("http", list(rows.values())), _busy(list(rows.values()))
    return m


def grpc_metrics(data: dict | None, problem: str | None) -> dict:
    m: dict = {"notes": [], "noise": []}
    if problem:
        m["notes"].append(f"grpc: {problem}")
    if not data:
        return m
    rows = {r["target"]: r for r in data.get("results", []) if r.get("mode") == "unary" and r.get("concurrency") == 32}
    for name, key in (("direct", "grpc_direct_cps"), ("gateway", "grpc_gw_cps")):
        r = rows.get(name)
        if r is None:
            m["notes"].append(f"grpc {name}: not measured")
        elif r.get("failed") or r.get("calls_per_s") is None:
            m["notes"].append(f"grpc {name}: {str(r.get('failed', 'no result')).splitlines()[0][:160]}")
        elif r.get("errors"):
            m["notes"].append(f"grpc {name}: errors {r['errors']}, row not counted")
        else:
            m[key] = r["calls_per_s"]
            if name == "gateway":
                cpu = (r.get("cpu_ms") or {}).get("target")
                m["grpc_gw_cpu_us"] = None if cpu is None else 1000 * cpu
    if m.get("grpc_gw_cps") and m.get("grpc_direct_cps"):
        m["grpc_ratio"] = m["grpc_gw_cps"] / m["grpc_direct_cps"]
    m["noise"], m["busy"] = _noise_notes("grpc", list(rows.values())), _busy(list(rows.values()))
    return m


# --------------------------------------------------------------------------- report


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _values(rounds: list[dict], label: str, key: str) -> list[float]:
    return [r[key] for r in rounds if r["rev"] == label and r.get(key) is not None]


def summarize(rounds: list[dict], revs: list[Rev], n_rounds: int) -> dict:
    s: dict = {}
    for key, _, _, _ in METRICS:
        entry: dict = {}
        for rev in revs:
            vals = _values(rounds, rev.label, key)
            med = statistics.median(vals) if vals else None
            spread = (max(vals) - min(vals)) / med if len(vals) > 1 and med else None
            entry[rev.label] = {"median": med, "n": len(vals), "values": vals, "spread": spread}
        b, a = entry["before"]["median"], entry["after"]["median"]
        entry["change"] = a / b - 1 if a is not None and b else None
        spreads = [entry[r.label]["spread"] for r in revs if entry[r.label]["spread"] is not None]
        entry["noise_band"] = max(spreads) if spreads else None
        # Paired: after/before within each round (both measured minutes apart, in alternating order).
        pairs = []
        for i in range(1, n_rounds + 1):
            vb = [r[key] for r in rounds if r["round"] == i and r["rev"] == "before" and r.get(key) is not None]
            va = [r[key] for r in rounds if r["round"] == i and r["rev"] == "after" and r.get(key) is not None]
            if vb and va and vb[0]:
                pairs.append(va[0] / vb[0] - 1)
        entry["paired"] = pairs
        entry["paired_median"] = statistics.median(pairs) if pairs else None
        entry["paired_up"] = sum(1 for x in pairs if x > 0)
        s[key] = entry
    return s


def print_rounds(rounds: list[dict]) -> None:
    hdr = (f"{'round':>5} | {'rev':<14} | {'http direct':>11} | {'nginx-proxy':>11} | {'http gw':>8} | {'ratio':>6} | "
           f"{'cpu us':>6} | {'grpc direct':>11} | {'grpc gw':>8} | {'ratio':>6} | {'cpu us':>6} | noise")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for r in rounds:
        print(
            f"{r['round']:>5} | {r['rev'] + ' ' + r['sha'][:7]:<14} | {_fmt(r.get('http_direct_rps'), ',.0f'):>11} | "
            f"{_fmt(r.get('http_nginx_rps'), ',.0f'):>11} | {_fmt(r.get('http_gw_rps'), ',.0f'):>8} | "
            f"{_fmt(r.get('http_ratio'), '.3f'):>6} | {_fmt(r.get('http_gw_cpu_us'), '.1f'):>6} | "
            f"{_fmt(r.get('grpc_direct_cps'), ',.0f'):>11} | {_fmt(r.get('grpc_gw_cps'), ',.0f'):>8} | "
            f"{_fmt(r.get('grpc_ratio'), '.3f'):>6} | {_fmt(r.get('grpc_gw_cpu_us'), '.1f'):>6} | "
            f"{'; '.join(r['noise'])}"
        )
    for r in rounds:
        for note in r["notes"]:
            print(f"  ! round {r['round']} {r['rev']}: {note}")


def print_final(summary: dict, revs: list[Rev], n_rounds: int) -> None:
    widths = [max(len(h), 9) for _, h, _, _ in METRICS]
    hdr = f"{'revision':<20} | " + " | ".join(f"{h:>{w}}" for (_, h, _, _), w in zip(METRICS, widths, strict=True))
    print(hdr)
    print("-" * len(hdr))
    for rev in revs:
        cells = []
        for (key, _, spec, _), w in zip(METRICS, widths, strict=True):
            e = summary[key][rev.label]
            cell = _fmt(e["median"], spec)
            if e["median"] is not None and e["n"] < n_rounds:
                cell += f" ({e['n']}/{n_rounds})"
            cells.append(f"{cell:>{w}}")
        print(f"{rev.label + ' ' + rev.short:<20} | " + " | ".join(cells))
    cells = []
    for (key, _, _, _), w in zip(METRICS, widths, strict=True):
        c = summary[key]["change"]
        cells.append(f"{'-' if c is None else format(100 * c, '+.1f') + '%':>{w}}")
    print(f"{'after/before':<20} | " + " | ".join(cells))
    cells = []
    for (key, _, _, _), w in zip(METRICS, widths, strict=True):
        b = summary[key]["noise_band"]
        cells.append(f"{'-' if b is None else format(100 * b, '.1f') + '%':>{w}}")
    print(f"{'noise band':<20} | " + " | ".join(cells))
    cells = []
    for (key, _, _, _), w in zip(METRICS, widths, strict=True):
        c = summary[key]["paired_median"]
        cells.append(f"{'-' if c is None else format(100 * c, '+.1f') + '%':>{w}}")
    print(f"{'paired change':<20} | " + " | ".join(cells))
    cells = []
    for (key, _, _, _), w in zip(METRICS, widths, strict=True):
        e = summary[key]
        cells.append(f"{str(e['paired_up']) + '/' + str(len(e['paired'])) if e['paired'] else '-':>{w}}")
    print(f"{'rounds after>before':<20} | " + " | ".join(cells))


def verdicts(summary: dict) -> list[str]:
    lines = []

    def med(key, label="after"):
        return summary[key][label]["median"]

    for key, label, goal in (
        ("http_ratio", "HTTP gateway / nginx-proxy req/s @32", HTTP_RATIO_GOAL),
        ("grpc_ratio", "gRPC gateway / direct unary calls/s @32", GRPC_RATIO_GOAL),
    ):
        v = med(key)
        verdict = "n/a" if v is None else ("goal met" if v >= goal else "goal missed")
        lines.append(f"{label:<44} after {_fmt(v, '.3f'):>7}  (before {_fmt(med(key, 'before'), '.3f')})   "
                     f"goal >= {goal}   {verdict}")  # fmt: skip
    for key, label, higher_better in (
        ("http_gw_rps", "HTTP gateway req/s @32", True),
        ("http_gw_cpu_us", "HTTP gateway CPU us/call @32", False),
        ("grpc_gw_cps", "gRPC gateway calls/s @32", True),
        ("grpc_gw_cpu_us", "gRPC gateway CPU us/call @32", False),
    ):
        e = summary[key]
        c, band, pairs = e["change"], e["noise_band"], e["paired"]
        worse_rounds = sum(1 for x in pairs if (x < 0 if higher_better else x > 0))
        if c is None:
            verdict = "n/a"
        elif band is None:
            verdict = "no noise band (one round)"
        else:
            worse = -c if higher_better else c
            if abs(c) > band:
                verdict = "regression beyond noise" if worse > 0 else "improvement beyond noise"
            elif len(pairs) >= 3 and worse_rounds in (0, len(pairs)):
                side = "worse" if worse_rounds else "better"
                verdict = f"within noise, but {side} in every round: rerun to confirm"
            else:
                verdict = "within noise"
        if pairs:
            verdict += f"  (paired {'/'.join(format(100 * x, '+.0f') for x in pairs)}%)"
        lines.append(f"{label:<44} change {'-' if c is None else format(100 * c, '+.1f') + '%':>7}   "
                     f"noise band {'-' if band is None else format(100 * band, '.1f') + '%':>6}   {verdict}")  # fmt: skip
    return lines


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="a476c78", help="revision A (default a476c78)")
    ap.add_argument("--after", default="HEAD", help="revision B (default HEAD)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each measuring both revisions (default 3)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default 5)")
    ap.add_argument("--repo", default=str(H.REPO_ROOT), help="git repository to export from (default this one)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the scripts, peers and gateway")
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra argument for `gateway serve` (both)")
    ap.add_argument("--max-minutes", type=float, default=15.0, help="budget for the whole run (default 15)")
    ap.add_argument("--output", default=str(H.RESULTS_DIR / "ab-latest.json"))
    ap.add_argument("--keep-tmp", action="store_true", help="keep the scripts' outputs and logs")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    args.rounds = max(1, args.rounds)
    H.install_signal_handlers()
    started = time.monotonic()
    repo = Path(args.repo).resolve()

    for tool in ("nginx", "wrk"):
        if not (shutil.which(tool) or (tool == "nginx" and os.path.exists("/usr/sbin/nginx"))):
            H.log(f"{tool} not found (apt-get install -y nginx wrk)")
            return 2

    revs = []
    for label, spec in (("before", args.before), ("after", args.after)):
        sha = git(repo, "rev-parse", "--verify", f"{spec}^{{commit}}")
        subject = git(repo, "log", "-1", "--format=%s", sha)
        rev = Rev(label, spec, sha, subject, export(repo, sha))
        rev.imported = H.gateway_import_path(args.python, rev.root)
        if not Path(rev.imported).resolve().is_relative_to(rev.root / "gateway"):
            H.log(f"{label}: with cwd={rev.root}, `import gateway` gives {rev.imported}: not that tree")
            return 2
        flags, problem = cli_flags(args.python, rev.root)
        for bench, needed in (("http", HTTP_FLAGS), ("grpc", GRPC_FLAGS)):
            missing = [f for f in needed if f not in flags] if not problem else []
            if problem:
                rev.problems[bench] = problem
            elif missing:
                rev.problems[bench] = f"`gateway serve` of {sha[:7]} lacks {', '.join(missing)}"
        extra_missing = [a for a in args.gateway_arg if a.startswith("--") and a.split("=")[0] not in flags]
        if extra_missing and not problem:
            for bench in ("http", "grpc"):
                rev.problems.setdefault(bench, f"`gateway serve` of {sha[:7]} lacks {', '.join(extra_missing)}")
        H.log(f"{label}: {spec} = {sha[:12]} {subject[:70]!r}")
        H.log(f"  gateway.__file__ with cwd={rev.root}: {rev.imported}")
        for bench, why in rev.problems.items():
            H.log(f"  {bench} cannot run: {why}")
        revs.append(rev)

    d = args.duration
    extra = [x for a in args.gateway_arg for x in ("--gateway-arg", a)]
    # 3 targets x (1 s warm-up + d), up to 30 s for the gateway to get ready, slack for wrk/teardown.
    http_timeout = 90 + 3 * (d + 1) * 2
    # 2 targets x (1 s warm-up + d + the load generator's start), gateway start, slack.
    grpc_timeout = 90 + 2 * (d + 4) * 2

    rounds: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="gw-ab-"))
    runner = Runner(args, tmp)
    try:
        for i in range(args.rounds):
            order = revs if i % 2 == 0 else revs[::-1]
            for rev in order:
                H.log(f"[round {i + 1}/{args.rounds}] {rev.label} {rev.short}")
                base = [args.python]
                common = ["--duration", f"{d:g}", "--python", args.python, "--gateway-root", str(rev.root), *extra]
                if "http" in rev.problems:
                    hm = http_metrics(None, rev.problems["http"])
                else:
                    data, problem = runner.run(
                        f"r{i + 1}-{rev.label}-http",
                        base + [str(H.BENCH_DIR / "run_http.py"), "--only", "direct,nginx-proxy,gateway",
                                "--conns", "32", *common],
                        http_timeout,
                    )  # fmt: skip
                    hm = http_metrics(data, problem)
                if "grpc" in rev.problems:
                    gm = grpc_metrics(None, rev.problems["grpc"])
                else:
                    data, problem = runner.run(
                        f"r{i + 1}-{rev.label}-grpc",
                        base + [str(H.BENCH_DIR / "run_grpc.py"), "--only", "direct,gateway", "--loads", "unary:32",
                                *common],
                        grpc_timeout,
                    )  # fmt: skip
                    gm = grpc_metrics(data, problem)
                row = {"round": i + 1, "rev": rev.label, "sha": rev.sha}
                row.update({k: v for k, v in hm.items() if k not in ("notes", "noise", "busy")})
                row.update({k: v for k, v in gm.items() if k not in ("notes", "noise", "busy")})
                row["notes"], row["noise"] = hm["notes"] + gm["notes"], hm["noise"] + gm["noise"]
                row["busy"] = hm.get("busy", []) + gm.get("busy", [])
                rounds.append(row)
                H.log(
                    f"  http gw {_fmt(row.get('http_gw_rps'), ',.0f')} req/s "
                    f"(x{_fmt(row.get('http_ratio'), '.3f')} nginx-proxy, {_fmt(row.get('http_gw_cpu_us'), '.1f')} us/call)"
                    f", grpc gw {_fmt(row.get('grpc_gw_cps'), ',.0f')} calls/s "
                    f"(x{_fmt(row.get('grpc_ratio'), '.3f')} direct, {_fmt(row.get('grpc_gw_cpu_us'), '.1f')} us/call)"
                )
    except KeyboardInterrupt:
        runner.stop_current()
        H.log("interrupted; the running script was stopped (it stops its servers)")
        return 130
    finally:
        if args.keep_tmp:
            H.log(f"scripts' outputs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(rounds, revs, args.rounds)
    wall = time.monotonic() - started
    print()
    print(
        f"A/B: before {revs[0].spec} ({revs[0].short}) vs after {revs[1].spec} ({revs[1].short}); "
        f"{args.rounds} rounds alternating, {d:g} s per measurement, {os.cpu_count()} CPUs, {wall / 60:.1f} min"
    )
    for rev in revs:
        print(f"  {rev.label:<6} {rev.sha[:12]} {rev.subject[:90]}")
        print(f"         gateway imported from {rev.imported}")
    print()
    print("Per round (HTTP at 32 connections, gRPC unary at 32 in flight; cpu us = gateway CPU per call):")
    print()
    print_rounds(rounds)
    print()
    print("Medians of the rounds:")
    print()
    print_final(summary, revs, args.rounds)
    print("  (noise band: the largest (max - min) / median of the rounds of either revision)")
    print()
    for line in verdicts(summary):
        print(line)
    noisy = [r for r in rounds if r["noise"]]
    if noisy:
        print()
        print(f"  ! {len(noisy)} of {len(rounds)} revision-rounds had noise (CPU of processes outside the")
        print("    benchmark, or steal, over 5% of the machine): the per-round table names them.")
        hogs: dict[str, dict] = {}
        for r in noisy:
            for h in r.get("busy", []):
                k = h["cmd"][:60]
                if k not in hogs or h["cpu_pct"] > hogs[k]["cpu_pct"]:
                    hogs[k] = h
        for h in sorted(hogs.values(), key=lambda h: -h["cpu_pct"])[:5]:
            print(f"    busy: {h['cmd'][:70]} (up to {h['cpu_pct']}% of a CPU)")

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "ab",
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "duration_s": d,
        "rounds_requested": args.rounds,
        "wall_s": round(wall, 1),
        "revisions": {
            r.label: {
                "spec": r.spec,
                "sha": r.sha,
                "subject": r.subject,
                "root": str(r.root),
                "gateway_file": r.imported,
                "problems": r.problems,
            }
            for r in revs
        },  # fmt: skip
        "rounds": rounds,
        "summary": summary,
        "verdicts": verdicts(summary),
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nresults written to {out}")
    complete = all(summary[k][r.label]["n"] == args.rounds for k, _, _, _ in METRICS for r in revs)
    return 0 if complete else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        H.log("interrupted")
        sys.exit(130)
