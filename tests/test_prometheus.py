"""A real Prometheus scrapes a gateway under traffic; the dashboard and the rules work on it.

Debian's `prometheus` (installed by `make test` through scripts/ensure-debian-package.sh)
runs on a free loopback port with a scratch data directory, loads
dashboards/rules.yml and scrapes a gateway served by this test every second.
Then: `promtool check rules` and `promtool test rules` pass; every PromQL
expression of the dashboard and the rules parses and returns data from that
Prometheus (alert conditions as `bool` comparisons, see tests/promql.py);
every recording rule has produced its series; the template variables find the
configured pixels; every metric name used is one the gateway exposes.

Without prometheus/promtool the tests skip, saying so; under CI=true they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import promql
from tests.helpers import browser_event, post_browser, post_server, server_event, wait_drained
from tests.support import PIXEL, PIXEL2, TOKEN2, Gateway, GatewayFactory, free_port
from tests.tiktok_stub import Answer, TikTokStub

JOB = "tiktok-gateway"
SCRAPE_INTERVAL = "1s"


def tool(name: str) -> str:
    """The path of a Prometheus binary; skips (or under CI=true fails) when it is missing."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is not None:
        return path
    reason = (
        f"*** {name} NOT INSTALLED: the real-Prometheus checks did not run. "
        "`make test` installs Debian's prometheus package (scripts/ensure-debian-package.sh) "
        "when run as root with apt-get; or `apt-get install prometheus`. ***"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


async def run(*argv: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


# -- promtool ------------------------------------------------------------------------------


async def test_promtool_check_rules_passes() -> None:
    code, out = await run(tool("promtool"), "check", "rules", str(promql.RULES))
    assert code == 0, out
    assert "SUCCESS" in out


async def test_promtool_rule_unit_tests_pass() -> None:
    """Each alert fires in its scenario and not beside it (tests/prometheus/rules_test.yml)."""
    code, out = await run(tool("promtool"), "test", "rules", str(promql.RULES_TEST))
    assert code == 0, out


# -- a real Prometheus ---------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    http: aiohttp.ClientSession
    log: Path

    async def query(self, expr: str) -> dict[str, Any]:
        """`/api/v1/query`; the whole answer (status, data or error)."""
        async with self.http.get(f"{self.url}/api/v1/query", params={"query": expr}) as resp:
            answer: dict[str, Any] = await resp.json()
            return answer

    async def values(self, expr: str) -> list[float]:
        answer = await self.query(expr)
        assert answer["status"] == "success", (expr, answer)
        return [float(r["value"][1]) for r in answer["data"]["result"]]

    async def label_values(self, label: str, match: str) -> list[str]:
        url = f"{self.url}/api/v1/label/{label}/values"
        async with self.http.get(url, params={"match[]": match}) as resp:
            answer = await resp.json()
        assert answer["status"] == "success", answer
        values: list[str] = answer["data"]
        return values

    async def wait_for(self, expr: str, check: Any, seconds: float = 15.0) -> list[float]:
        """Until `check(values of expr)` holds; fails with what was last seen."""
        deadline = time.monotonic() + seconds
        values: list[float] = []
        while time.monotonic() < deadline:
            values = await self.values(expr)
            if check(values):
                return values
            await asyncio.sleep(0.25)
        raise AssertionError(f"{expr}: still {values} after {seconds}s\n{self.log.read_text()}")


@contextlib.asynccontextmanager
async def prometheus_scraping(
    target: str, tmp_path: Path, http: aiohttp.ClientSession
) -> AsyncIterator[Prometheus]:
    """Prometheus on loopback, scraping `target` every second, with the rules loaded."""
    binary = tool("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {
                    "scrape_interval": SCRAPE_INTERVAL,
                    "scrape_timeout": SCRAPE_INTERVAL,
                    "evaluation_interval": SCRAPE_INTERVAL,
                },
                "rule_files": [str(promql.RULES)],
                "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
            }
        )
    )
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    prometheus = Prometheus(f"http://127.0.0.1:{port}", http, log)
    try:
        await _wait_ready(prometheus, process)
        yield prometheus
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _wait_ready(prometheus: Prometheus, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.returncode is not None:
            log = prometheus.log.read_text()
            raise AssertionError(f"prometheus exited {process.returncode}:\n{log}")
        with contextlib.suppress(aiohttp.ClientError):
            async with prometheus.http.get(f"{prometheus.url}/-/ready") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise AssertionError(f"prometheus not ready after 20s:\n{prometheus.log.read_text()}")


async def send_traffic(gateway: Gateway, tiktok: TikTokStub, http: aiohttp.ClientSession) -> None:
    """Everything the panels show: pairs, lone copies, a duplicate, refusals, a retry, a dead
    letter, a custom event, an event without event_id, and a second pixel."""
    tiktok.queue(Answer(http_status=503, raw_body=b"<html>upstream busy</html>"))
    tiktok.reject_event_ids.add("prom-bad")
    for i in range(3):
        await post_browser(http, gateway.url, browser_event(f"prom-pair-{i}"))
        server = server_event(f"prom-pair-{i}")
        server["user"]["phone"] = "+1 415 555 2671"
        await post_server(http, gateway.url, [server])
    await post_browser(http, gateway.url, browser_event("prom-lone-pixel", "AddToCart"))
    await post_server(
        http, gateway.url,
        [server_event("prom-lone-server"), server_event("prom-lead", "Lead"),
         server_event("prom-custom", "MyCustomEvent"), server_event(None, "ViewContent"),
         server_event("prom-bad")],
    )
    await post_server(
        http, gateway.url, [server_event("prom-p2")], pixel=PIXEL2, token=TOKEN2
    )
    async with http.post(f"{gateway.url}/pixel/events", data=b"{") as resp:
        assert resp.status == 400
    await wait_drained(gateway, dead_letters=1)
    await post_server(http, gateway.url, [server_event("prom-pair-0")])  # a late duplicate


async def gateway_sample_names(http: aiohttp.ClientSession, gateway: Gateway) -> set[str]:
    async with http.get(f"{gateway.url}/metrics") as resp:
        text = await resp.text()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


async def test_a_real_prometheus_runs_every_dashboard_and_rule_expression(
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("gateway.housekeeping.GAUGE_REFRESH_SECONDS", 0.2)
    gateway = await make_gateway(merge_window=0.3)
    target = gateway.url.removeprefix("http://")
    async with prometheus_scraping(target, tmp_path, http) as prometheus:
        # A scrape before the traffic, so counters have a starting point for rate().
        await prometheus.wait_for(f'up{{job="{JOB}"}}', lambda v: v == [1.0])
        await send_traffic(gateway, tiktok, http)
        forwarded = sum(
            gateway.metric("gateway_events_forwarded_total", {"pixel": p}) for p in (PIXEL, PIXEL2)
        )
        # Prometheus has scraped the gateway's state after the traffic, and evaluated the rules.
        await prometheus.wait_for(
            "sum(gateway_events_forwarded_total)", lambda v: v == [forwarded]
        )
        await prometheus.wait_for("gateway_dead_letter_events", lambda v: v == [1.0])
        await prometheus.wait_for(
            "sum(gateway_events_duplicates_dropped_total)", lambda v: v == [1.0]
        )
        await asyncio.sleep(2.5)  # two more rule evaluations on those samples

        dashboard, rules = promql.load_dashboard(), promql.load_rules()
        failures = []
        for expression in [
            *promql.dashboard_expressions(dashboard),
            *promql.rule_expressions(rules),
        ]:
            answer = await prometheus.query(expression.runnable)
            if answer["status"] != "success":
                error = answer.get("error")
                failures.append(f"{expression.where}: {error}\n  {expression.runnable}")
            elif not answer["data"]["result"]:
                failures.append(f"{expression.where}: no data\n  {expression.runnable}")
        for record in sorted(promql.record_names(rules)):
            if not await prometheus.values(record):
                failures.append(f"recording rule {record}: Prometheus recorded nothing")
        assert not failures, "\n".join(failures)

        # The template variables: label_values(...) as Grafana asks Prometheus for them.
        assert set(await prometheus.label_values("job", "gateway_build_info")) == {JOB}
        pixels = await prometheus.label_values(
            "pixel", f'gateway_events_received_total{{job=~"{JOB}"}}'
        )
        assert set(pixels) == {PIXEL, PIXEL2}

        # The numbers mean what the README says.
        [pair] = await prometheus.values(
            f'gateway:pair_completion:ratio_rate1h{{pixel="{PIXEL}", event="Purchase"}}'
        )
        assert pair == pytest.approx(3 / 4)  # three pairs, one server copy that never paired
        [email] = await prometheus.values(
            f'gateway:match_key_coverage:ratio_rate1h{{pixel="{PIXEL}", key="email"}}'
        )
        assert 0 < email <= 1
        await prometheus.wait_for(
            'ALERTS{alertname="TikTokGatewayDeadLettersGrowing", reason="rejected"}',
            lambda v: v == [1.0],
        )
        assert await prometheus.values('ALERTS{alertname="TikTokGatewayRedisUnreachable"}') == []

        # Every metric name the files use is one the gateway exposes.
        exposed = await gateway_sample_names(http, gateway)
        texts = [
            *(e.promql for e in promql.dashboard_expressions(dashboard)),
            *(e.promql for e in promql.rule_expressions(rules)),
            *promql.template_queries(dashboard).values(),
        ]
        unknown = set().union(*(promql.metric_names(t) for t in texts)) - exposed
        assert not unknown, f"not exposed by the gateway: {sorted(unknown)}"
