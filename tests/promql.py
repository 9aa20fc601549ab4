"""A small PromQL reader for tests: the metric names and label names an expression uses.

Enough of PromQL for dashboards: selectors with label matchers, function calls, aggregations with
`by`/`without` before or after their argument, `on`/`ignoring` groupings, ranges, numbers, strings,
Grafana's `$variables` and `label_values(metric, label)`. It refuses what it does not understand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TOKEN = re.compile(
    r"""(?P<ws>\s+)
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    |(?P<range>\[[^\]]*\])
    |(?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
    |(?P<var>\$\w+)
    |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    |(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>(){},])""",
    re.X,
)
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
AGGREGATIONS = frozenset({"sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
                          "count_values", "group"})  # fmt: skip
FUNCTIONS = AGGREGATIONS | frozenset({
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "abs", "ceil", "floor", "round",
    "clamp_min", "clamp_max", "time", "timestamp", "vector", "scalar", "avg_over_time", "max_over_time",
    "min_over_time", "sum_over_time", "label_values", "absent", "changes", "resets",
})  # fmt: skip
KEYWORDS = frozenset({"bool", "and", "or", "unless", "offset"})
MATCH_OPS = frozenset({"=", "!=", "=~", "!~"})


class PromQLError(ValueError):
    pass


@dataclass
class Selector:
    metric: str
    labels: list[str] = field(default_factory=list)


@dataclass
class Expression:
    selectors: list[Selector] = field(default_factory=list)
    grouping: list[str] = field(default_factory=list)  # labels named in by/without/on/ignoring/group_*


def tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if m is None:
            raise PromQLError(f"cannot read {text[pos : pos + 20]!r} in {text!r}")
        if m.lastgroup != "ws":
            out.append((m.lastgroup or "", m.group()))
        pos = m.end()
    return out


def parse(text: str) -> Expression:
    toks, expr, i = tokens(text), Expression(), 0

    def names_until(close: str, start: int, what: str) -> tuple[list[str], int]:
        names, j = [], start
        while toks[j][1] != close:
            if toks[j][0] != "ident":
                raise PromQLError(f"expected a label name in {what}, got {toks[j][1]!r} in {text!r}")
            names.append(toks[j][1])
            j += 1
            if toks[j][1] == ",":
                j += 1
        return names, j + 1

    while i < len(toks):
        kind, value = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "ident" and value in GROUPING:
            if nxt == "(":
                names, i = names_until(")", i + 2, value)
                expr.grouping += names
            else:
                i += 1  # group_left without a label list
            continue
        if kind == "ident" and value == "label_values" and nxt == "(":  # Grafana: label_values(metric, label)
            metric, comma, label, close = (t[1] for t in toks[i + 2 : i + 6])
            if comma != "," or close != ")":
                raise PromQLError(f"expected label_values(metric, label) in {text!r}")
            expr.selectors.append(Selector(metric, [label]))
            i += 6
            continue
        if kind == "ident" and (nxt == "(" or (value in AGGREGATIONS and nxt in GROUPING)):
            if value not in FUNCTIONS:
                raise PromQLError(f"unknown function {value!r} in {text!r}")
            i += 1
            continue
        if kind == "ident" and value in KEYWORDS:
            i += 1
            continue
        if kind == "ident":
            selector = Selector(value)
            i += 1
            if nxt == "{":
                i += 1
                while toks[i][1] != "}":
                    name, op, val = toks[i : i + 3]
                    if name[0] != "ident" or op[1] not in MATCH_OPS or val[0] != "string":
                        raise PromQLError(f"expected label matchers in {text!r}, got {name[1]} {op[1]} {val[1]}")
                    selector.labels.append(name[1])
                    i += 3
                    if toks[i][1] == ",":
                        i += 1
                i += 1
            expr.selectors.append(selector)
            continue
        if value == "{":
            raise PromQLError(f"a selector without a metric name in {text!r}")
        i += 1
    return expr


def problems(expr_text: str, exported: dict[str, set[str]], histograms: set[str]) -> list[str]:
    """What `expr_text` names that `exported` (sample name -> its label names) does not have."""
    expr = parse(expr_text)
    found: list[str] = []
    used_labels: set[str] = set()
    for sel in expr.selectors:
        base, _, suffix = sel.metric.rpartition("_")
        if suffix in ("bucket", "sum", "count") and sel.metric not in exported and base in histograms:
            found.append(f"{sel.metric}: histogram {base} exports no samples yet")
        elif sel.metric not in exported:
            found.append(f"{sel.metric}: not a metric the gateway exports")
            continue
        have = exported.get(sel.metric, set())
        used_labels |= have
        found += [f"{sel.metric}: no label {label!r}" for label in sel.labels if label not in have]
    found += [f"by/on ({label}): no metric of the expression has it" for label in expr.grouping
              if label not in used_labels]  # fmt: skip
    return found
