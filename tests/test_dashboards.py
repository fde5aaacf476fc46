"""`dashboards/`: the Grafana dashboard imports cleanly, the rules are well formed, both use
only metrics the gateway exposes, and the README describes every panel and alert.

Grafana is not run here, and no JSON schema for its dashboards is available as a
small package, so the dashboard is checked against what Grafana's import needs:
the fields of its dashboard model, unique panel ids, grid positions on the
24-column grid, the `${datasource}` variable on every panel and query, and the
`datasource` and `pixel` template variables. The real-Prometheus checks (every
expression parses and returns data) are in test_prometheus.py.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import make_metrics
from tests import promql
from tests.promql import ROOT, all_panels, load_dashboard, load_rules

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_COLUMNS = 24
# Panel types shipped with Grafana 10 and 11 (no plugin needed).
PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "text", "heatmap"}
REQUIRED_ALERTS = {
    "TikTokGatewayUpstreamFailing",
    "TikTokGatewayDeadLettersGrowing",
    "TikTokGatewayBacklogNotDraining",
    "TikTokGatewayRedisUnreachable",
    "TikTokGatewayNoTraffic",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


@pytest.fixture(scope="module")
def rules() -> dict[str, Any]:
    return load_rules()


def exposed_names() -> set[str]:
    """Every sample name a gateway's /metrics shows (with `_total`, `_bucket`, ...)."""
    metrics = make_metrics(CollectorRegistry(), {"CPIXEL0000000000001": "token"})
    text = generate_latest(metrics.registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


# -- the dashboard's model ----------------------------------------------------------------


def test_dashboard_has_the_fields_grafana_import_needs(dashboard: dict[str, Any]) -> None:
    assert isinstance(dashboard["title"], str) and dashboard["title"]
    uid = dashboard["uid"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid), "Grafana uids: 40 characters at most"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    # An id would make the import overwrite whatever dashboard has it in the target Grafana.
    assert dashboard.get("id") is None
    assert isinstance(dashboard["panels"], list) and dashboard["panels"]
    assert isinstance(dashboard["time"]["from"], str) and isinstance(dashboard["time"]["to"], str)
    assert isinstance(dashboard["tags"], list)
    assert isinstance(dashboard["editable"], bool)
    assert isinstance(dashboard["annotations"]["list"], list)


def test_templating_has_a_prometheus_datasource_and_a_pixel_variable(
    dashboard: dict[str, Any],
) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"

    pixel = variables["pixel"]
    assert pixel["type"] == "query"
    assert pixel["datasource"] == DATASOURCE
    query = promql.template_queries(dashboard)["pixel"]
    assert re.fullmatch(r"label_values\(gateway_events_received_total(\{[^}]*\})?, pixel\)", query)
    assert pixel["multi"] and pixel["includeAll"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]
            assert variable["refresh"] in (1, 2), variable["name"]  # on load / on time change


def test_panels_have_unique_ids_types_and_the_datasource_variable(
    dashboard: dict[str, Any],
) -> None:
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [p["title"] for p in panels if p["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        if panel["type"] == "row":
            assert isinstance(panel["collapsed"], bool)
            assert isinstance(panel["panels"], list)
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what the panel shows"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert isinstance(target["expr"], str) and target["expr"].strip(), panel["title"]
        assert isinstance(panel["fieldConfig"]["defaults"], dict)


def test_panels_sit_on_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    taken: set[tuple[int, int]] = set()
    for panel in all_panels(dashboard):
        pos = panel["gridPos"]
        assert set(pos) >= {"h", "w", "x", "y"}, panel["title"]
        assert all(isinstance(pos[k], int) and pos[k] >= 0 for k in "hwxy"), panel["title"]
        assert pos["w"] >= 1 and pos["h"] >= 1
        assert pos["x"] + pos["w"] <= GRID_COLUMNS, panel["title"]
        cells = {
            (pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_dashboard_covers_what_an_operator_watches(dashboard: dict[str, Any]) -> None:
    """Traffic by source, dedup ratio, forward success and latency, backlog, coverage, Redis."""
    exprs = " ".join(e.promql for e in promql.dashboard_expressions(dashboard))
    titles = {p["title"] for p in all_panels(dashboard)}
    assert {
        "Traffic by source", "Dedup ratio", "Forward success", "Forward latency",
        "Pending events", "Dead-letter backlog", "Match-key coverage",
        "Pair completion by event", "Redis health",
    } <= titles
    for name in exposed_names():
        family = re.sub(r"_(bucket|sum|count|total|info)$", "", name)
        assert family in exprs, f"{family} is exposed but on no panel"


# -- the rules file -------------------------------------------------------------------------


def test_rules_are_well_formed(rules: dict[str, Any]) -> None:
    names = []
    for group in rules["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert ("record" in rule) != ("alert" in rule), rule
            assert isinstance(rule["expr"], str)
            if "record" in rule:
                # level:metric:operations, the Prometheus convention for recorded series
                assert re.fullmatch(r"gateway:[a-z0-9_]+:[a-z0-9_]+", rule["record"])
                names.append(rule["record"])
            else:
                assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
                assert rule["annotations"]["summary"], rule["alert"]
                assert rule["annotations"]["description"], rule["alert"]
                names.append(rule["alert"])
    assert len(names) == len(set(names))
    assert set(promql.alert_names(rules)) >= REQUIRED_ALERTS


def test_every_alert_has_a_promtool_scenario(rules: dict[str, Any]) -> None:
    tested = promql.RULES_TEST.read_text()
    for alert in promql.alert_names(rules):
        assert f"alertname: {alert}\n" in tested, f"{alert}: no scenario in rules_test.yml"


# -- names -------------------------------------------------------------------------------


def test_every_metric_the_files_use_is_exposed_by_the_gateway(
    dashboard: dict[str, Any], rules: dict[str, Any]
) -> None:
    exposed = exposed_names()
    recorded = promql.record_names(rules)
    texts = [
        *(e.promql for e in promql.dashboard_expressions(dashboard)),
        *(e.promql for e in promql.rule_expressions(rules)),
        *promql.template_queries(dashboard).values(),
    ]
    for text in texts:
        assert promql.metric_names(text) <= exposed, (text, promql.metric_names(text) - exposed)
        assert promql.recorded_names(text) <= recorded, text


def test_the_readme_describes_every_panel_and_alert(
    dashboard: dict[str, Any], rules: dict[str, Any]
) -> None:
    readme = (ROOT / "README.md").read_text()
    operations = readme.split("## Operations", 1)[1].split("\n## ", 1)[0]
    for panel in all_panels(dashboard):
        if panel["type"] != "row":
            assert f"**{panel['title']}**" in operations, f"README: panel {panel['title']!r}"
    for alert in promql.alert_names(rules):
        assert f"`{alert}`" in operations, f"README: alert {alert}"


# -- the helpers the real-Prometheus test relies on ----------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("x > 0", "x > bool 0"),
        ("x == bool 0", "x == bool 0"),
        ('x{a!="b", c=~"d>e"} >= 1', 'x{a!="b", c=~"d>e"} >= bool 1'),
        ("a > 0 and on (job) b == 0", "a > bool 0 and on (job) b == bool 0"),
        ('up{job="x"} != 1 or vector("<")', 'up{job="x"} != bool 1 or vector("<")'),
    ],
)
def test_with_bool(expr: str, expected: str) -> None:
    assert promql.with_bool(expr) == expected


def test_substitute_knows_every_variable_the_dashboard_uses(dashboard: dict[str, Any]) -> None:
    for expression in promql.dashboard_expressions(dashboard):
        assert "$" not in expression.runnable, expression.where
    with pytest.raises(KeyError):
        promql.substitute("rate(x[$unknown])")
