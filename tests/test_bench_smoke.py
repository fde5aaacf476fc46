"""The benchmark rig (bench/, `make bench`) runs end to end on tiny loads.

A smoke run's figures mean nothing on a shared machine, so nothing here is
timed. What must hold: every process starts and stops, the stand-in's ledger
finds every event the clients got code 0 for delivered exactly once by the
gateway (and at least once by B0), and the results carry every figure the
report needs, which it renders.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench import report

ROOT = Path(__file__).resolve().parent.parent


def _numbers(tree: Any) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    return [float(tree)] if isinstance(tree, int | float) and not isinstance(tree, bool) else []


@pytest.mark.timeout(240)
def test_smoke_run_delivers_exactly_once_and_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=220, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = orjson.loads(out.read_bytes())
    fig = results["figures"]

    assert fig["exactly_once"]["all_phases"], fig["exactly_once"]
    assert fig["exactly_once"]["acked_keys"] > 0
    phases = {**results["phases"], **results["scale_out"]["phases"]}
    for name, phase in phases.items():
        delivery = phase["delivery"]
        assert delivery["acked_keys"] > 0, name
        assert delivery["missing"] == 0, (name, delivery)
        if phase["target"].startswith("gateway"):
            assert delivery["repeated"] == 0, (name, delivery)

    for workload in ("pixel", "server"):
        throughput = fig["throughput"][workload]
        assert throughput["gateway_events_per_s"] > 0
        assert throughput["b0_events_per_s"] > 0
        assert throughput["ratio_to_b0"] > 0
        assert set(fig["latency"][workload]["added_ms"]) == {"p50", "p99", "p99.9"}
        # Background-corrected counts of a fraction of a second: present, not necessarily > 0.
        ingest, forward = fig["redis"][workload]["ingest"], fig["redis"][workload]["forward"]
        assert ingest["round_trips_per_request"] > 0
        for figure in ("round_trips_per_event", "script_calls_per_event",
                       "script_usec_per_event", "redis_cpu_usec_per_event"):
            assert ingest[figure] >= 0 and forward[figure] >= 0, figure
    assert fig["mixed"]["slip_ms"]["count"] > 0
    assert fig["memory"]["store_bytes_per_key"] > 0
    assert fig["memory"]["naive_bytes_per_key"] > 0
    assert fig["memory"]["false_drops"] == 0
    assert all(v > 0 for v in fig["gateway_cpu_s_per_1000_events"].values())
    # One process, `serve --workers 2` on the rig's Redis, and on a 3-primary cluster.
    for workload in ("pixel", "server"):
        for setup, figures in fig["scale_out"][workload].items():
            assert figures["events_per_s"] > 0, (workload, setup)
            assert figures["cpu_ms_per_1000_events"] > 0, (workload, setup)
        assert len(fig["scale_out"][workload]) == 3
    # The store redesign's figures: ratios to B0 and R0 in the same run, commands per event,
    # bytes per remembered key over HTTP (delivered exactly once at each step).
    per_event = fig["per_event"]
    assert per_event["r0_redis_cpu_usec_per_set"] > 0
    for workload in ("pixel", "server"):
        x = per_event[workload]
        for figure in ("gateway_cpu_to_b0", "b1_cpu_to_b0", "redis_cpu_to_r0"):
            assert x[figure] > 0, (workload, figure)
        # At least its fingerprint's lookup (HMGET) and the HSET that remembers it.
        assert x["redis_commands_per_event"] >= 2, workload
        assert x["added_p99_to_b0_p99"] is not None
    steps = results["remembered"]["steps"]
    assert [s["keys"] for s in steps] == sorted(s["keys"] for s in steps)
    previous = 0
    for step in steps:  # each step sends the keys it adds to the last, every one acknowledged
        assert step["delivery"]["exactly_once"], step
        assert step["acked_keys"] == step["keys"] - previous, step
        assert step["bytes_per_key"] > 0
        previous = step["keys"]
    assert not any(math.isnan(x) for x in _numbers(fig))
    floor = results["floor"]
    for figure in ("beacon_parse_us", "server_parse_us", "redis_round_trip_cpu_us",
                   "redis_round_trip_wall_us", "socket_round_trip_cpu_us"):
        assert floor[figure] > 0, figure

    page = report.render(results, out)
    assert "## Targets" in page
    assert "## Scaling out" in page
    assert "not measured" not in page
