"""Run the benchmark and write its figures: `python -m bench.run [--smoke]`.

The rig (each part its own process, all on 127.0.0.1): redis-server with
an append-only file (everysec); the stand-in; the gateway (`bench.probe`,
i.e. `tiktok-gateway serve` counting its Redis round trips); B0; B1 (B0 with
the gateway's own parsing and validation, `bench.baseline --validate`); and,
for each phase, one load generator. First the memory measurement (its own
Redis), then R0 and the phases, the gateway's, B0's and B1's interleaved:

    memory             bench.memory: bytes per remembered key, 250k keys, through
                       Store, less its history (a diagnosis)
    R0                 bench.reference: Redis CPU per pipelined SET of 1 KB
    saturation-pixel   closed loop, single-event beacons              gateway, B0, B1
    saturation-server  closed loop, 100-event batches                 gateway, B0, B1
    latency-pixel      constant rate, 50% of the gateway's saturation  gateway, B0, B1
    latency-server     the same for batches                           gateway, B0, B1
    mixed              pairs across both sources, 70% of capacity     gateway
    accounting         ingest-only, then forward-only windows: Redis round
                       trips, script calls, commands (INFO commandstats)
                       and CPU per event                              gateway
    remembered         bench.remembered: bytes per remembered key, default
                       settings, sent over HTTP to a gateway on a Redis of its own
    profile            py-spy on the gateway under each saturating load
    scale-out          saturation-pixel and -server again, on `tiktok-gateway
                       serve --workers 2`: on the rig's Redis, then on a
                       3-primary Redis Cluster (bench.cluster)        gateway2, gateway2-cluster
    wait-replicas      saturation-server on a 3-primary cluster with a replica each,
                       GATEWAY_REDIS_WAIT_REPLICAS 0 then 1: what waiting for a
                       replica costs                                  gateway2-replicated-wait0|1

After each phase the stand-in checks every acknowledged key (exactly once
for the gateway; at least once for B0), then its ledger and Redis are
emptied (but for the running gateways' shard leases: see bench.cluster.KEPT).
Counters are read at the edges of each measured window (`bench.counters`).
A phase in which other processes (or other virtual machines) took more than
a quarter of a core runs once more, while the time budget allows.
Everything is stopped at the end, on error and on Ctrl-C or SIGTERM; every
wait is bounded.

    python -m bench.run                   # full: bench/results/<date>.json, docs/benchmarks.md
    python -m bench.run --smoke           # half a minute of tiny loads, into a temp directory
    python -m bench.run --redis-server /usr/bin/redis-server
    python -m bench.run --only scale-out  # the gateway's saturation phases and scale-out only
    python -m bench.run --only wait-replicas  # the cost of GATEWAY_REDIS_WAIT_REPLICAS only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import redis.asyncio as aioredis

from bench import counters, floor, memory, profiling, reference, remembered
from bench.cluster import NODES, primary_of
from bench.common import choose_redis_server, redis_version, stop
from bench.rig import FULL, SCALE_WORKERS, SMOKE, Plan, Rig, Target
from bench.traffic import DUPLICATE_RATE, NO_ID_RATE
from gateway.settings import Settings
from gateway.store import Store

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BUDGET_SECONDS = 700.0  # the whole run, memory included: under 12 minutes
RIG_SECONDS = 560.0  # the rig's phases and the remembered keys, without reruns, with room


def code_fingerprint() -> str:
    """SHA-256 of the gateway's sources, so a result names the code it measured."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# -- the phases -------------------------------------------------------------------------


def rate_of(result: dict[str, Any], kind: str) -> float:
    return float(result["load"]["kinds"][kind]["requests_per_s"])


async def saturation(rig: Rig, plan: Plan, target: Target, workload: str) -> dict[str, Any]:
    """A closed loop of the plan's connections: the target's throughput."""
    conc = {"pixel": plan.pixel_concurrency, "server": plan.server_concurrency}
    return await rig.phase(
        f"{target.name}-saturation-{workload}", target, workload, "closed",
        concurrency=conc[workload], warmup=plan.warmup, duration=plan.duration,
    )  # fmt: skip


async def throughput_and_latency(rig: Rig, plan: Plan) -> dict[str, Any]:
    phases: dict[str, Any] = {}
    gateway, b0, b1 = rig.targets["gateway"], rig.targets["b0"], rig.targets["b1"]
    conc = {"pixel": plan.pixel_concurrency, "server": plan.server_concurrency}
    for workload in ("pixel", "server"):
        for target in (gateway, b0, b1):
            phases[f"{target.name}-saturation-{workload}"] = await saturation(
                rig, plan, target, workload)
    for workload in ("pixel", "server"):
        rate = plan.latency_load * rate_of(phases[f"gateway-saturation-{workload}"], workload)
        for target in (gateway, b0, b1):
            phases[f"{target.name}-latency-{workload}"] = await rig.phase(
                f"{target.name}-latency-{workload}", target, workload, "open", rate=rate,
                concurrency=conc[workload], warmup=plan.warmup / 2, duration=plan.duration,
            )  # fmt: skip
    # Mixed: equal pixel and server copies per action; the action rate that takes
    # `mixed_load` of the gateway's capacity, from its cost per event in each workload.
    per_action = (1 - NO_ID_RATE / 2) * 0.9 * (1 + DUPLICATE_RATE)  # copies per source
    pixel_eps = phases["gateway-saturation-pixel"]["load"]["kinds"]["pixel"]["events_per_s"]
    server_eps = phases["gateway-saturation-server"]["load"]["kinds"]["server"]["events_per_s"]
    actions = plan.mixed_load / (per_action / pixel_eps + per_action / server_eps)
    phases["gateway-mixed"] = await rig.phase(
        "gateway-mixed", gateway, "mixed", "open", rate=actions,
        concurrency=plan.pixel_concurrency, warmup=plan.warmup / 2,
        duration=plan.mixed_duration,
    )  # fmt: skip
    return phases


async def accounting(rig: Rig, plan: Plan) -> dict[str, Any]:
    """Redis cost of ingest and of forwarding, in windows where only one of them happens.

    Background first (the forwarder's idle polls, the gauges), subtracted from
    both. The ingest window is a closed loop of copies that all wait for the
    merge window (no pairs, no event without event_id), and ends before the
    first of them is due; the forward window follows, until all have arrived.
    The shards' owners read the logs and merge as copies come, so Redis's own
    figures of the ingest window include that reading; their round trips are
    counted with the forward's.
    """
    gateway = rig.targets["gateway"]
    idle_a = await rig.snapshot(gateway, None)
    await asyncio.sleep(1.0)
    background = counters.window(idle_a, await rig.snapshot(gateway, None))
    out: dict[str, Any] = {"background": background}
    conc = {"pixel": plan.pixel_concurrency, "server": plan.server_concurrency}
    for workload in ("pixel", "server"):
        name = f"gateway-accounting-{workload}"
        seconds = plan.accounting_seconds
        load, (a, b), acked = await rig.run_load(
            name, gateway, [0.0, seconds + 0.15], workload=workload, mode="closed",
            concurrency=conc[workload], warmup=0, duration=seconds, no_id_rate=0,
        )  # fmt: skip
        delivery = await rig.deliver(name, acked, gateway)
        c = await rig.snapshot(gateway, None)
        await rig.clear()
        ingest, forward = counters.window(a, b), counters.window(b, c)
        out[workload] = {
            "load": load,
            "delivery": delivery,
            "ingest_window": ingest,
            "forward_window": forward,
            "ingest": _per_unit(ingest, background, _ingest_part(ingest, "by_role"),
                                _ingest_part(ingest, "script_calls_by_role"),
                                load["totals"]["requests"], load["totals"]["acked_events"]),
            # The shards' owners read and merge the copies as they come, in the ingest
            # window: their round trips there count with the forward's.
            "forward": _per_unit(forward, background,
                                 _forward_part(ingest, background, "by_role")
                                 + _forward_part(forward, background, "by_role"),
                                 _forward_part(ingest, background, "script_calls_by_role")
                                 + _forward_part(forward, background, "script_calls_by_role"),
                                 None, forward["standin"]["events"]),
        }
    return out


def _ingest_part(win: dict[str, Any], key: str) -> float:
    """Round trips (or script calls) of ingest: all but the forwarder's and the gauges',
    so a task that batches requests' calls together still counts as ingest."""
    roles = win["round_trips"][key]
    return float(sum(roles.values()) - roles.get("forwarder", 0) - roles.get("gauges", 0))


def _forward_part(win: dict[str, Any], background: dict[str, Any], key: str) -> float:
    """Round trips (or script calls) of the forwarder, less its idle polls."""
    idle = background["round_trips"][key].get("forwarder", 0) / background["seconds"]
    return max(0.0, win["round_trips"][key].get("forwarder", 0) - idle * win["seconds"])


def _per_unit(
    win: dict[str, Any], background: dict[str, Any], trips: float, calls: float,
    requests: int | None, events: int,
) -> dict[str, Any]:
    """Redis cost in a window per request and per event. Round trips and script calls are
    counted in the gateway per task; Redis's own figures are less the background (the
    forwarder's idle polls), scaled to the window's length."""
    scale = float(win["seconds"] / background["seconds"])

    def net(value: float, idle: float) -> float:
        return max(0.0, value - idle * scale)

    usec = net(win["script_usec"], background["script_usec"])
    redis_cpu = net(win["cpu_s"]["redis"], background["cpu_s"]["redis"])
    commands = net(redis_commands(win), redis_commands(background))
    out: dict[str, Any] = {"events": events, "requests": requests}
    if events:
        out |= {
            "redis_commands_per_event": round(commands / events, 3),
            "round_trips_per_event": round(trips / events, 4),
            "script_calls_per_event": round(calls / events, 4),
            "script_usec_per_event": round(usec / events, 2),
            "script_usec_per_call": round(usec / calls, 2) if calls else None,
            "redis_cpu_usec_per_event": round(redis_cpu * 1e6 / events, 2),
        }
    if requests:
        out["round_trips_per_request"] = round(trips / requests, 4)
    return out


def redis_commands(win: dict[str, Any]) -> int:
    """Commands Redis ran in a window (INFO commandstats): each EVALSHA once, and each command
    its script ran once more; the bench's own INFO at the window's edges left out."""
    return sum(v["calls"] for name, v in win["commandstats"].items() if name != "info")


async def profile(rig: Rig, plan: Plan) -> dict[str, Any]:
    """py-spy on the gateway while each workload saturates it (not in the measured phases)."""
    if plan.profile_seconds <= 0 or profiling.py_spy() is None:
        return {"skipped": "no py-spy" if plan.profile_seconds > 0 else "smoke run"}
    gateway = rig.targets["gateway"]
    out: dict[str, Any] = {}
    conc = {"pixel": plan.pixel_concurrency, "server": plan.server_concurrency}
    for workload in ("pixel", "server"):
        name = f"gateway-profile-{workload}"
        raw = rig.workdir / f"{name}.txt"
        warm = 1.0
        spy: subprocess.Popen[bytes] | None = None

        async def start_spy(raw: Path = raw, warm: float = warm) -> None:
            nonlocal spy
            await asyncio.sleep(plan.start_lead + warm)
            spy = profiling.record(gateway.pid, plan.profile_seconds, raw)

        starter = asyncio.create_task(start_spy())
        try:
            load, snaps, acked = await rig.run_load(
                name, gateway, [warm, warm + plan.profile_seconds], workload=workload,
                mode="closed", concurrency=conc[workload], warmup=warm,
                duration=plan.profile_seconds + 1,
            )  # fmt: skip
        finally:
            await starter
        if spy is not None:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                stop(spy)
        await rig.deliver(name, acked, gateway)
        await rig.clear()
        if raw.exists():
            out[workload] = profiling.summarise(raw, plan.profile_seconds)
            out[workload]["events_per_s"] = load["kinds"][workload]["events_per_s"]
            out[workload]["window"] = counters.window(*snaps)
        else:
            error = spy.stderr.read().decode()[-500:] if spy and spy.stderr else "not started"
            out[workload] = {"error": error}
    return out


async def scale_out(rig: Rig, plan: Plan) -> dict[str, Any]:
    """The saturation phases again on `serve --workers 2`: on the rig's Redis, then on a
    3-primary Redis Cluster; each set of processes runs only for its own phases."""
    shards = Settings().shards  # the gateways run with the default
    homes = [primary_of(Store.prefix(shard)) for shard in range(shards)]
    out: dict[str, Any] = {
        "workers": SCALE_WORKERS, "cluster_nodes": NODES, "redis_server": rig.redis_binary,
        "redis_version": ".".join(map(str, redis_version(rig.redis_binary))),
        "shards": shards, "shards_per_primary": [homes.count(i) for i in range(NODES)],
        "phases": {},
    }  # fmt: skip
    for name, cluster in (("gateway2", False), ("gateway2-cluster", True)):
        started = time.monotonic()
        target = await rig.start_workers(name, cluster)
        print(f"  {name} started in {time.monotonic() - started:.1f} s", flush=True)
        try:
            for workload in ("pixel", "server"):
                out["phases"][f"{name}-saturation-{workload}"] = await saturation(
                    rig, plan, target, workload)
        finally:
            await rig.stop_workers(name)
    return out


async def wait_replicas_cost(rig: Rig, plan: Plan) -> dict[str, Any]:
    """saturation-server on a 3-primary cluster with a replica each, without and with
    GATEWAY_REDIS_WAIT_REPLICAS=1: every ingest pipeline then ends with WAIT on each
    primary it wrote to."""
    out: dict[str, Any] = {"workers": SCALE_WORKERS, "cluster_nodes": NODES, "replicas": 1,
                           "phases": {}}  # fmt: skip
    for wait in (0, 1):
        name = f"gateway2-replicated-wait{wait}"
        target = await rig.start_workers(name, True, replicas=1, wait_replicas=wait)
        try:
            out["phases"][f"{name}-saturation-server"] = await saturation(
                rig, plan, target, "server"
            )
        finally:
            await rig.stop_workers(name)
    return out


def wait_replicas_figures(results: dict[str, Any]) -> dict[str, Any]:
    """Events/s and latency of server batches, per GATEWAY_REDIS_WAIT_REPLICAS."""
    rows = {}
    for wait in (0, 1):
        phase = results["wait_replicas"]["phases"].get(
            f"gateway2-replicated-wait{wait}-saturation-server"
        )
        if phase is not None:
            acked = phase["load"]["kinds"]["server"]["acked_events"]
            cpu_s = phase["window"]["cpu_s"]

            def per_1000(role: str, cpu_s: dict[str, float] = cpu_s, acked: int = acked) -> Any:
                return round(cpu_s.get(role, 0.0) / acked * 1e6, 1) if acked else None

            rows[f"wait_replicas_{wait}"] = {
                "events_per_s": phase["load"]["kinds"]["server"]["events_per_s"],
                "latency_ms": _lat(phase, "server"),
                "exactly_once": phase["delivery"]["exactly_once"],
                # CPU per event holds better than events/s when six Redis nodes, two gateway
                # processes and the load share two cores.
                "gateway_cpu_ms_per_1000_events": per_1000(phase["target"]),
                "redis_cpu_ms_per_1000_events": per_1000("cluster"),
                "machine_busy_percent": phase["window"]["machine_busy_percent"],
            }
    return rows


# -- figures ----------------------------------------------------------------------------


SCALE_SETUPS = (  # figures key, phase name prefix, CPU role of its Redis
    ("one_process", "gateway", "redis"),
    ("workers_one_redis", "gateway2", "redis"),
    ("workers_cluster", "gateway2-cluster", "cluster"),
)


def scale_out_figures(results: dict[str, Any]) -> dict[str, Any]:
    """Per workload and setup: events/s, the gateway processes' CPU per 1,000 events, and
    where the machine's CPU went in the window."""
    phases = {**results["phases"], **results["scale_out"]["phases"]}
    out: dict[str, Any] = {"workers": results["scale_out"]["workers"]}
    for w in ("pixel", "server"):
        rows: dict[str, Any] = {}
        for key, prefix, redis_role in SCALE_SETUPS:
            phase = phases.get(f"{prefix}-saturation-{w}")
            if phase is None:
                continue
            win, kind = phase["window"], phase["load"]["kinds"][w]
            cpu = win["cpu_percent_of_one_core"]
            acked = kind["acked_events"]
            rows[key] = {
                "events_per_s": kind["events_per_s"],
                "cpu_ms_per_1000_events": round(win["cpu_s"][phase["target"]] / acked * 1e6, 1)
                if acked else None,
                "gateway_cpu_percent": cpu.get(phase["target"]),
                "redis_cpu_percent": cpu.get(redis_role),
                "client_cpu_percent": cpu.get("client"),
                "standin_cpu_percent": cpu.get("standin"),
                "machine_busy_percent": win["machine_busy_percent"],
                "other_cpu_percent": win["other_cpu_percent_of_one_core"],
                "exactly_once": phase["delivery"]["exactly_once"],
            }  # fmt: skip
        base = rows.get("one_process", {}).get("events_per_s")
        for row in rows.values():
            row["to_one_process"] = round(row["events_per_s"] / base, 2) if base else None
        out[w] = rows
    return out


def _lat(phase: dict[str, Any], kind: str) -> dict[str, float]:
    lat = phase["load"]["kinds"][kind]["latency_ms"]
    return {q: lat[q] for q in ("p50", "p99", "p99.9")}


def figures(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers the issue asks for, from the raw results."""
    ph = results["phases"]
    out: dict[str, Any] = {"throughput": {}, "latency": {}, "gateway_cpu_s_per_1000_events": {},
                           "bottleneck": {}}
    for w in ("pixel", "server"):
        g = ph[f"gateway-saturation-{w}"]
        b = ph[f"b0-saturation-{w}"]
        g_eps = g["load"]["kinds"][w]["events_per_s"]
        b_eps = b["load"]["kinds"][w]["events_per_s"]
        out["throughput"][w] = {
            "gateway_events_per_s": g_eps,
            "gateway_requests_per_s": g["load"]["kinds"][w]["requests_per_s"],
            "b0_events_per_s": b_eps,
            "ratio_to_b0": round(g_eps / b_eps, 3) if b_eps else None,
        }
        gl, bl = ph[f"gateway-latency-{w}"], ph[f"b0-latency-{w}"]
        g_lat, b_lat = _lat(gl, w), _lat(bl, w)
        out["latency"][w] = {
            "rate_requests_per_s": gl["load"]["offered_rate"],
            "gateway_ms": g_lat,
            "b0_ms": b_lat,
            "added_ms": {q: round(g_lat[q] - b_lat[q], 3) for q in g_lat},
        }
        g_win = g["window"]
        out["throughput"][w]["gateway_forwarded_events_per_s"] = round(
            g_win["standin"]["events"] / g_win["seconds"], 1)
        out["throughput"][w]["gateway_drain_s"] = g["delivery"]["waited_s"]
        for name in (f"gateway-saturation-{w}", f"b0-saturation-{w}", f"b1-saturation-{w}"):
            win = ph[name]["window"]["cpu_percent_of_one_core"]
            out["bottleneck"][name] = {
                "target_cpu_percent": win.get(ph[name]["target"]),
                "client_cpu_percent": win.get("client"),
                "redis_cpu_percent": win.get("redis"),
                "standin_cpu_percent": win.get("standin"),
                "machine_busy_percent": ph[name]["window"]["machine_busy_percent"],
                "other_cpu_percent": ph[name]["window"]["other_cpu_percent_of_one_core"],
            }
    for name in ("gateway-saturation-pixel", "gateway-saturation-server", "gateway-mixed",
                 "b0-saturation-pixel", "b0-saturation-server", "b1-saturation-pixel",
                 "b1-saturation-server"):
        acked = sum(k["acked_events"] for k in ph[name]["load"]["kinds"].values())
        cpu = ph[name]["window"]["cpu_s"][ph[name]["target"]]
        out["gateway_cpu_s_per_1000_events"][name] = round(cpu / acked * 1000, 4) if acked else None
    # What one whole core would carry at the measured CPU cost per event: less sensitive
    # than events/s to other work taking the machine's CPU meanwhile.
    costs = out["gateway_cpu_s_per_1000_events"]
    for w in ("pixel", "server"):
        g_cost, b_cost = costs[f"gateway-saturation-{w}"], costs[f"b0-saturation-{w}"]
        out["throughput"][w]["gateway_events_per_core_s"] = round(1000 / g_cost) if g_cost else None
        out["throughput"][w]["b0_events_per_core_s"] = round(1000 / b_cost) if b_cost else None
        out["throughput"][w]["cost_ratio_b0_to_gateway"] = (
            round(b_cost / g_cost, 3) if g_cost and b_cost else None)
    mixed = ph["gateway-mixed"]
    out["mixed"] = {
        "actions_per_s": mixed["load"]["offered_rate"],
        "latency_ms": {k: _lat(mixed, k) for k in mixed["load"]["kinds"]},
        "slip_ms": mixed["delivery"].get("slip_ms"),
        "slip_ms_by_kind": mixed["delivery"].get("slip_ms_by_kind"),
    }
    # Ingest round trips per request in each gateway phase: how well concurrent requests
    # share them depends on the load (every round trip but the forwarder's and the gauges').
    out["ingest_round_trips_per_request"] = {}
    for name, p in ph.items():
        trips = p["window"].get("round_trips")
        requests = sum(k["requests"] for k in p["load"]["kinds"].values())
        if p["target"] == "gateway" and trips and requests:
            roles = trips["by_role"]
            ingest = trips["total"] - roles.get("forwarder", 0) - roles.get("gauges", 0)
            out["ingest_round_trips_per_request"][name] = round(ingest / requests, 3)
    out["slip_p99_ms"] = {name: p["delivery"]["slip_ms"]["p99"] for name, p in ph.items()
                          if p["target"] == "gateway" and "slip_ms" in p["delivery"]}
    gateway_phases = [p for p in ph.values() if p["target"] == "gateway"]
    gateway_phases += list(results.get("scale_out", {}).get("phases", {}).values())
    gateway_phases += [results["accounting"][w] for w in ("pixel", "server")]
    gateway_phases += (results.get("remembered") or {}).get("steps", [])
    out["exactly_once"] = {
        "all_phases": all(p["delivery"]["exactly_once"] for p in gateway_phases),
        "acked_keys": sum(p["delivery"]["acked_keys"] for p in gateway_phases),
        "missing": sum(p["delivery"]["missing"] for p in gateway_phases),
        "repeated": sum(p["delivery"]["repeated"] for p in gateway_phases),
    }
    acc = results["accounting"]
    out["redis"] = {w: {"ingest": acc[w]["ingest"], "forward": acc[w]["forward"]}
                    for w in ("pixel", "server")}
    out["memory"] = {k: results["memory"].get(k) for k in (
        "keys", "store_bytes_per_key", "store_bytes_per_key_beyond_history", "naive_bytes_per_key",
        "false_drops", "history_bytes",
        "missed_duplicates", "redis_version", "mem_allocator")}
    if "scale_out" in results:
        out["scale_out"] = scale_out_figures(results)
    out["per_event"] = per_event_figures(results, out)
    return out


def per_event_figures(results: dict[str, Any], fig: dict[str, Any]) -> dict[str, Any]:
    """The issue's per-event figures, each a ratio within this run: gateway and B1 CPU per
    event to B0's, Redis CPU per event (ingest + forward) to R0, Redis commands per event,
    added p99 latency to B0's p99, and bytes per remembered key over HTTP."""
    costs, acc, ph = fig["gateway_cpu_s_per_1000_events"], results["accounting"], results["phases"]
    r0 = results["reference"]["redis_cpu_usec_per_set"]
    out: dict[str, Any] = {"r0_redis_cpu_usec_per_set": r0}
    for w in ("pixel", "server"):
        g, b0, b1 = (costs[f"{who}-saturation-{w}"] for who in ("gateway", "b0", "b1"))
        redis_cpu = sum(acc[w][step].get("redis_cpu_usec_per_event", 0.0)
                        for step in ("ingest", "forward"))  # fmt: skip
        lat = {who: ph[f"{who}-latency-{w}"]["load"]["kinds"][w]["latency_ms"]["p99"]
               for who in ("gateway", "b0", "b1")}  # fmt: skip
        out[w] = {
            "gateway_cpu_to_b0": round(g / b0, 2) if g and b0 else None,
            "b1_cpu_to_b0": round(b1 / b0, 2) if b1 and b0 else None,
            "gateway_cpu_to_b1": round(g / b1, 2) if g and b1 else None,
            "redis_cpu_usec_per_event": round(redis_cpu, 2),
            "redis_cpu_to_r0": round(redis_cpu / r0, 2) if r0 else None,
            "redis_commands_per_event": round(sum(
                acc[w][step].get("redis_commands_per_event", 0.0)
                for step in ("ingest", "forward")), 2),
            "latency_rate_requests_per_s": ph[f"gateway-latency-{w}"]["load"]["offered_rate"],
            "p99_ms": lat,
            "added_p99_ms": round(lat["gateway"] - lat["b0"], 3),
            "added_p99_to_b0_p99": round((lat["gateway"] - lat["b0"]) / lat["b0"], 2)
            if lat["b0"] else None,
            "b1_added_p99_to_b0_p99": round((lat["b1"] - lat["b0"]) / lat["b0"], 2)
            if lat["b0"] else None,
        }
    out["remembered_bytes_per_key"] = {
        str(step["keys"]): step["bytes_per_key"]
        for step in (results.get("remembered") or {}).get("steps", [])
    }
    return out


# -- main ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "redis_py": aioredis.__version__ if hasattr(aioredis, "__version__") else None,
    }


async def run(
    plan: Plan, redis_binary: str, workdir: Path, skip_memory: bool, only: str | None = None
) -> dict[str, Any]:
    started = time.time()
    results: dict[str, Any] = {
        "meta": {
            "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
            "plan": asdict(plan),
            "machine": machine(),
            "redis_server": redis_binary,
            "redis_version": ".".join(map(str, redis_version(redis_binary))),
            "code_fingerprint": code_fingerprint(),
            "note": "Measured on a shared 2-core development machine: other developers' test "
                    "runs may have taken CPU meanwhile (see other_cpu_percent per phase).",
        }
    }
    # Memory first: its length depends on the store's cost per key; the rig's phases
    # have fixed lengths, and run again when disturbed only while the budget allows.
    if only == "scale-out":
        return await run_scale_out_only(plan, redis_binary, workdir, results, started)
    if only == "wait-replicas":
        rig = Rig(workdir, plan, redis_binary)
        rig.reruns_until = time.monotonic() + BUDGET_SECONDS - RIG_SECONDS
        try:
            await rig.start()
            results["wait_replicas"] = await wait_replicas_cost(rig, plan)
        finally:
            await rig.close()
        results["figures"] = {"wait_replicas": wait_replicas_figures(results)}
        results["meta"]["seconds"] = round(time.time() - started, 1)
        return results
    if not skip_memory:
        print(f"memory: {plan.memory_keys:,} keys through the store", flush=True)
        results["memory"] = await memory.measure_per_key(plan.memory_keys, redis_binary)
        print(f"  {results['memory']['seconds']:.0f} s", flush=True)
    else:
        results["memory"] = {}
    print("floor: validation and hashing per event, in-process", flush=True)
    results["floor"] = floor.measure(repeat=2 if plan is SMOKE else 20)
    rig = Rig(workdir, plan, redis_binary)
    rig.reruns_until = time.monotonic() + BUDGET_SECONDS - (time.time() - started) - RIG_SECONDS
    try:
        print("starting the rig", flush=True)
        await rig.start()
        print("floor: one Redis round trip, before any load", flush=True)
        results["floor"] |= await floor.round_trip(rig.redis_url, 100 if plan is SMOKE else 2000)
        print(f"R0: {plan.r0_sets:,} pipelined SETs of 1 KB", flush=True)
        results["reference"] = await reference.measure(rig.redis_url, plan.r0_sets)
        print("throughput and latency", flush=True)
        results["phases"] = await throughput_and_latency(rig, plan)
        print("Redis accounting", flush=True)
        results["accounting"] = await accounting(rig, plan)
        print("profile", flush=True)
        results["profile"] = await profile(rig, plan)
        print(f"scale-out: {SCALE_WORKERS} processes", flush=True)
        results["scale_out"] = await scale_out(rig, plan)
        print("wait-replicas: a cluster with replicas, without and with WAIT", flush=True)
        results["wait_replicas"] = await wait_replicas_cost(rig, plan)
        print("remembered keys: default settings, over HTTP", flush=True)
        results["remembered"] = await remembered.measure(rig, list(plan.remembered_keys))
    finally:
        await rig.close()
    results["figures"] = figures(results)
    results["figures"]["wait_replicas"] = wait_replicas_figures(results)
    results["meta"]["seconds"] = round(time.time() - started, 1)
    return results


async def run_scale_out_only(
    plan: Plan, redis_binary: str, workdir: Path, results: dict[str, Any], started: float
) -> dict[str, Any]:
    """The gateway's saturation phases, then the scale-out phases: no memory, no B0 phases,
    no report (the figures hold the scale-out's only)."""
    rig = Rig(workdir, plan, redis_binary)
    rig.reruns_until = time.monotonic() + BUDGET_SECONDS - RIG_SECONDS
    try:
        await rig.start()
        gateway = rig.targets["gateway"]
        results["phases"] = {f"gateway-saturation-{w}": await saturation(rig, plan, gateway, w)
                             for w in ("pixel", "server")}  # fmt: skip
        print(f"scale-out: {SCALE_WORKERS} processes", flush=True)
        results["scale_out"] = await scale_out(rig, plan)
    finally:
        await rig.close()
    results["figures"] = {"scale_out": scale_out_figures(results)}
    results["meta"]["seconds"] = round(time.time() - started, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny loads")
    parser.add_argument("--out", type=Path, help="results JSON (default: bench/results/<date>)")
    parser.add_argument("--redis-server", help="redis-server binary (default: the newest found)")
    parser.add_argument("--no-report", action="store_true", help="do not write docs/")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--only", choices=["scale-out", "wait-replicas"],
                        help="only the gateway's saturation and the scale-out phases, or only "
                             "the cost of GATEWAY_REDIS_WAIT_REPLICAS (no report)")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    binary = args.redis_server or choose_redis_server()
    workdir = Path(tempfile.mkdtemp(prefix="tkgw-bench-"))
    out = args.out
    if out is None:
        out = (Path(tempfile.gettempdir()) / "tkgw-bench-smoke.json" if args.smoke
               else Path(tempfile.gettempdir()) / f"tkgw-bench-{args.only}.json" if args.only
               else RESULTS / f"{datetime.date.today().isoformat()}.json")
    loop_main = asyncio.new_event_loop()
    task = loop_main.create_task(run(plan, binary, workdir, args.skip_memory, args.only))
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop_main.add_signal_handler(signum, task.cancel)
    try:
        results = loop_main.run_until_complete(task)
    except (KeyboardInterrupt, asyncio.CancelledError):
        task.cancel()
        with contextlib.suppress(BaseException):
            loop_main.run_until_complete(task)
        print("interrupted; every process of the rig was stopped", file=sys.stderr)
        return 130
    finally:
        loop_main.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    print(f"results: {out} ({results['meta']['seconds']:.0f} s)", flush=True)
    if not args.no_report and not args.smoke and not args.only:
        from bench import report

        report.main([str(out)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
