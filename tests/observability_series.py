"""What the Prometheus rules and the Grafana dashboard in contrib/ read, for the tests that
check it against a live vdev's ``/metrics`` (tests/test_observability.py, tests/test_libvirt.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "contrib" / "prometheus" / "vballoon.rules.yml"
RULE_TESTS = REPO / "contrib" / "prometheus" / "vballoon.rules.test.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "vballoon-dashboard.json"

_SELECTOR = re.compile(r"(?<![\w:])((?:vballoon|process)_[A-Za-z0-9_]+)(?![\w:])(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!=|!~|=)\s*"([^"]*)"')


def rule_exprs() -> Iterator[str]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield str(rule["expr"])


def recorded_names() -> set[str]:
    return {
        str(rule["record"])
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def dashboard_exprs() -> Iterator[str]:
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            yield str(target["expr"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            yield str(var["definition"])


def selectors(exprs: Iterable[str]) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """(metric, fixed label matchers) for every series an expression selects. Only ``=``
    matchers on a literal value count; ``$variables`` and regexes are the user's choice."""
    found: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for expr in exprs:
        for m in _SELECTOR.finditer(expr):
            labels = tuple(
                sorted(
                    (name, value)
                    for name, op, value in _MATCHER.findall(m.group(2) or "")
                    if op == "=" and "$" not in value
                )
            )
            found.add((m.group(1), labels))
    return found


def exposed(text: str) -> dict[str, list[dict[str, str]]]:
    """Sample name -> the label sets exposed under it, from the text format."""
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        # a family with no samples yet still exists (e.g. guest stats before any report)
        out.setdefault(family.name, [])
        if family.type == "counter":  # its samples are NAME_total
            out.setdefault(f"{family.name}_total", [])
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


def missing_series(text: str, *, allow_empty: Iterable[str] = ()) -> list[str]:
    """The selectors of the rules and the dashboard that ``text`` (a /metrics body) has no
    series for. ``allow_empty``: metrics whose labelled series only some guests have (the
    family must still be declared)."""
    have = exposed(text)
    recorded = recorded_names()
    allow = set(allow_empty)
    problems: list[str] = []
    for metric, labels in sorted(selectors([*rule_exprs(), *dashboard_exprs()])):
        if metric in recorded:
            continue
        if metric not in have:
            problems.append(f"{metric}: not exported")
            continue
        if not labels or metric in allow:
            continue
        if not any(all(s.get(k) == v for k, v in labels) for s in have[metric]):
            problems.append(f"{metric}{dict(labels)}: no such series")
    return problems


def load_dashboard() -> Any:
    return json.loads(DASHBOARD.read_text())
