"""The PromQL of `dashboards/`: every expression the dashboard and the rules hold, ready to run.

Grafana's variables are replaced by what Grafana would send for "All" over a
short range; alert conditions get `bool`, so a healthy system still returns its
series (`x > 0` answers nothing while all is well; `x > bool 0` answers 0).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "gateway.json"
RULES = ROOT / "dashboards" / "rules.yml"
RULES_TEST = ROOT / "tests" / "prometheus" / "rules_test.yml"

# What Grafana substitutes: its interval variables, and "All" (allValue) for ours.
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "job": ".+",
    "pixel": ".+",
}
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_METRIC = re.compile(r"\bgateway_[a-z0-9_]+\b")
_RECORDED = re.compile(r"\bgateway:[a-z0-9_:]+\b")


@dataclass(frozen=True)
class Expression:
    where: str  # "panel 'Traffic by source' A", "alert TikTokGatewayNoTraffic", ...
    promql: str  # as written in the file
    runnable: str  # what is sent to Prometheus


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def load_rules() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return rules


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' collapsed children included."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def substitute(promql: str) -> str:
    """Grafana's variables replaced as Grafana would for "All"; an unknown one is an error."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in GRAFANA_VARIABLES:
            raise KeyError(f"unknown dashboard variable ${name} in {promql!r}")
        return GRAFANA_VARIABLES[name]

    return _VARIABLE.sub(value, promql)


def with_bool(promql: str) -> str:
    """Every comparison outside label matchers and strings made a `bool` comparison."""
    out: list[str] = []
    depth = 0
    i = 0
    while i < len(promql):
        char = promql[i]
        if char in "\"'`":
            end = i + 1
            while end < len(promql) and promql[end] != char:
                end += 2 if promql[end] == "\\" else 1
            out.append(promql[i : end + 1])
            i = end + 1
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif depth == 0:
            op = next((o for o in _COMPARISONS if promql.startswith(o, i)), None)
            if op is not None:
                i += len(op)
                out.append(op)
                if not re.match(r"\s*bool\b", promql[i:]):
                    out.append(" bool")
                continue
        out.append(char)
        i += 1
    return "".join(out)


def dashboard_expressions(dashboard: dict[str, Any]) -> list[Expression]:
    found = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            where = f"panel {panel['title']!r} {target['refId']}"
            found.append(Expression(where, target["expr"], substitute(target["expr"])))
    return found


def rule_expressions(rules: dict[str, Any]) -> list[Expression]:
    found = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                found.append(Expression(f"record {rule['record']}", rule["expr"], rule["expr"]))
            else:
                expr = rule["expr"]
                found.append(Expression(f"alert {rule['alert']}", expr, with_bool(expr)))
    return found


def record_names(rules: dict[str, Any]) -> set[str]:
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def alert_names(rules: dict[str, Any]) -> list[str]:
    return [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]


def template_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """The query of each `query` variable, e.g. `label_values(metric{...}, label)`."""
    queries = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries[variable["name"]] = query["query"] if isinstance(query, dict) else query
    return queries


def metric_names(promql: str) -> set[str]:
    """The gateway's metric names a piece of PromQL uses (`gateway_...`)."""
    return set(_METRIC.findall(promql))


def recorded_names(promql: str) -> set[str]:
    """The recording rules' series a piece of PromQL uses (`gateway:...`)."""
    return set(_RECORDED.findall(promql))
