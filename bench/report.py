"""Results JSON -> docs/benchmarks.md (targets, pass or miss and by how much, why) and a plot.

    python -m bench.report bench/results/2024-11-29.json

The page is generated whole from the JSON; the reasons given for a missed
target are read off the same run (CPU shares, round trips by task, the
profile), not written by hand, so a rerun never leaves stale prose behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "benchmarks.png"


@dataclass(frozen=True)
class Target:
    """One of the issue's targets: a figure, its bound, and how to read it."""

    label: str
    unit: str
    get: Callable[[dict[str, Any]], float | None]
    bound: float
    higher_is_better: bool
    stretch: float | None = None
    why: Callable[[dict[str, Any]], str] | None = None
    digits: int | None = None  # compare the value rounded so (noise below it is not a miss)

    def verdict(self, fig: dict[str, Any]) -> tuple[float | None, str]:
        value = self.get(fig)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return value, "not measured"
        if self.digits is not None:
            value = round(value, self.digits)
        ok = value >= self.bound if self.higher_is_better else value <= self.bound
        stretch_ok = self.stretch is not None and (
            value >= self.stretch if self.higher_is_better else value <= self.stretch
        )
        if ok:
            return value, "**pass**" + (", stretch met" if stretch_ok else "")
        gap = abs(value - self.bound)
        relative = f" ({gap / self.bound:.0%})" if self.bound else ""
        return value, f"**miss** by {_num(gap)}{self.unit and ' ' + self.unit}{relative}"


def _num(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3g}"


# -- reasons, read off the run -------------------------------------------------------


def _sat(r: dict[str, Any], who: str, workload: str) -> dict[str, Any]:
    phase: dict[str, Any] = r["phases"][f"{who}-saturation-{workload}"]
    return phase


def _profile_top(r: dict[str, Any], workload: str, n: int = 4) -> str:
    prof = r.get("profile", {}).get(workload) or {}
    areas = prof.get("self_by_area") or []
    if not areas:
        return ""
    listed = ", ".join(f"{name} {share:.0f}%" for name, share in areas[:n])
    return f" Where its CPU goes (py-spy, self time): {listed}."


def why_throughput(workload: str) -> Callable[[dict[str, Any]], str]:
    def why(r: dict[str, Any]) -> str:
        g = _sat(r, "gateway", workload)["window"]
        cpu = g["cpu_percent_of_one_core"]
        fig = r["figures"]["gateway_cpu_s_per_1000_events"]
        g_cost = fig[f"gateway-saturation-{workload}"]
        b_cost = fig[f"b0-saturation-{workload}"]
        text = (
            f"The gateway process used {cpu.get('gateway', 0):.0f}% of one core "
            f"(the client {cpu.get('client', 0):.0f}%, Redis {cpu.get('redis', 0):.0f}%, "
            f"the machine {g['machine_busy_percent']:.0f}% busy): "
        )
        if cpu.get("gateway", 0) >= 85:
            text += "the gateway's own CPU is the limit. "
        elif g["machine_busy_percent"] >= 90:
            text += (f"both cores were full (other processes took "
                     f"{g['other_cpu_percent_of_one_core']:.0f}% of a core), so the gateway did "
                     "not get a whole one. ")
        else:
            text += "the gateway is not at 100%: it waits (on Redis, or the network). "
        if g_cost and b_cost:
            text += (f"It spends {g_cost * 1000:.0f} ms of CPU per 1,000 events against "
                     f"B0's {b_cost * 1000:.0f} ms ({g_cost / b_cost:.1f} times as much): one "
                     f"whole core would carry about {1 / g_cost * 1000:,.0f} events/s.")
        trips = g.get("round_trips")
        requests = r["phases"][f"gateway-saturation-{workload}"]["load"]["kinds"][workload]
        if trips and requests["requests"]:
            roles = trips["by_role"]
            ingest = trips["total"] - roles.get("forwarder", 0) - roles.get("gauges", 0)
            text += (f" Ingest made {ingest / requests['requests']:.2f} Redis round trips per "
                     "request.")
        return text + _floor(r, workload) + _profile_top(r, workload)

    return why


def _floor(r: dict[str, Any], workload: str) -> str:
    """What validation alone costs per event (bench.floor), against B0's whole cost."""
    fl = r.get("floor") or {}
    us = fl.get("beacon_parse_us" if workload == "pixel" else "server_parse_us")
    if not us:
        return ""
    text = (f" Validating (and hashing) one event alone, in-process with no I/O, takes {us:.0f} "
            "µs")
    if workload == "server" and fl.get("server_phone_us"):
        text += f", {fl['server_phone_us']:.0f} µs of it the phone number (`phonenumbers`)"
    return text + f": a core could validate at most {1e6 / us:,.0f} events/s and do nothing else."


def why_latency(workload: str) -> Callable[[dict[str, Any]], str]:
    def why(r: dict[str, Any]) -> str:
        phase = r["phases"][f"gateway-latency-{workload}"]
        window = phase["window"]
        cpu = window["cpu_percent_of_one_core"]
        text = (f"At {phase['load']['offered_rate']:.0f} requests/s the gateway process was "
                f"{cpu.get('gateway', 0):.0f}% busy, so a request often waits for the event loop "
                "behind others (one process, one core).")
        fl = r.get("floor") or {}
        if workload == "server" and fl.get("server_parse_us"):
            text += (f" A 100-event batch is validated and hashed before it is stored: "
                     f"{fl['server_parse_us'] * 100 / 1000:.0f} ms of CPU by itself (bench.floor), "
                     "which B0 does not do.")
        trips = window.get("round_trips")
        requests = phase["load"]["kinds"][workload]["requests"]
        if trips and requests:
            roles = trips["by_role"]
            ingest = trips["total"] - roles.get("forwarder", 0) - roles.get("gauges", 0)
            text += f" Ingest made {ingest / requests:.2f} Redis round trips per request"
            text += (" (a beacon waits for two in sequence, the rate limit then the ingest, "
                     "each shared with whatever concurrent requests queued meanwhile; "
                     "`GATEWAY_PIXEL_RATE_LIMIT=0` drops the first where a CDN limits rates)."
                     if workload == "pixel" else ".")
            wall = fl.get("redis_round_trip_wall_us")
            if wall:
                waits = 2 if workload == "pixel" else 1
                text += (f" One round trip through the gateway's Redis client takes {wall:.0f} µs "
                         f"on this machine with nothing else running, and costs the caller "
                         f"{fl['redis_round_trip_cpu_us']:.0f} µs of CPU (a bare socket's PING: "
                         f"{fl['socket_round_trip_wall_us']:.0f} µs, "
                         f"{fl['socket_round_trip_cpu_us']:.0f} µs of CPU; bench.floor): "
                         f"{waits * wall / 1000:.1f} ms of every request's latency before any "
                         "queueing.")
        return text

    return why


def why_round_trips(workload: str) -> Callable[[dict[str, Any]], str]:
    def why(r: dict[str, Any]) -> str:
        by_role = _sat(r, "gateway", workload)["window"].get("round_trips", {}).get("by_role", {})
        listed = ", ".join(f"{k}: {v:,}" for k, v in sorted(by_role.items(), key=lambda x: -x[1]))
        return ("A request's copies wait for the store's next shared pipeline (`Runner._flush`, "
                "one round trip for every request queued meanwhile); a quiet moment sends one a "
                f"request. Round trips at saturation by task: {listed}.")

    return why


def why_memory(r: dict[str, Any]) -> str:
    m = r.get("memory") or {}
    keys = m.get("store_redis_keys_per_key")
    text = ""
    if keys:
        text = (f"The store leaves {keys:.2f} Redis keys per remembered event (a key of its own "
                "costs about the naive layout's bytes before any data)")
        if m.get("history_bytes"):
            text += (f"; the /debug history, a fixed {m['history_bytes'] / 1e6:.0f} MB whatever "
                     f"the traffic, is {m['history_bytes'] / m['keys']:.0f} bytes of each at "
                     f"{m['keys']:,} keys")
        text += ". "
    return text + "Packing many remembered keys into one Redis value is what gets below 32 bytes."


def why_slip(r: dict[str, Any]) -> str:
    phase = r["phases"]["gateway-mixed"]
    kinds = phase["delivery"].get("slip_ms_by_kind") or {}
    listed = ", ".join(f"{k} p99 {v['p99']:.0f} ms" for k, v in kinds.items())
    cpu = phase["window"]["cpu_percent_of_one_core"].get("gateway", 0)
    other = phase["window"]["other_cpu_percent_of_one_core"]
    return (f"By kind of key: {listed}. The gateway process was {cpu:.0f}% busy (other "
            f"processes on the machine: {other:.0f}% of a core): forwarding competes with "
            "ingest for the one event loop, and a late forward is a backlog.")


def _per_event(r: dict[str, Any], workload: str) -> dict[str, Any]:
    figures: dict[str, Any] = r["figures"]["per_event"][workload]
    return figures


def why_cpu_to_b0(workload: str) -> Callable[[dict[str, Any]], str]:
    def why(r: dict[str, Any]) -> str:
        x = _per_event(r, workload)
        return (f"B1, which is B0 plus the gateway's own parsing, validation and hashing, costs "
                f"{_num(x['b1_cpu_to_b0'])} times B0's CPU per event: that much is validation. The "
                f"gateway costs {_num(x['gateway_cpu_to_b1'])} times B1: the rest is deduplication "
                "and durability (the store, Redis round trips, the forwarder). "
                + why_throughput(workload)(r))

    return why


def _top_commands(r: dict[str, Any], workload: str, n: int = 6) -> str:
    acc = r["accounting"][workload]
    calls: dict[str, float] = {}
    for step in ("ingest", "forward"):
        events = acc[step]["events"]
        for name, v in acc[f"{step}_window"].get("commandstats", {}).items():
            if name != "info" and events:
                calls[name] = calls.get(name, 0.0) + v["calls"] / events
    top = sorted(calls.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{name} {per:.2f}" for name, per in top)


def why_redis_cpu(workload: str) -> Callable[[dict[str, Any]], str]:
    def why(r: dict[str, Any]) -> str:
        acc, x = r["accounting"][workload], _per_event(r, workload)
        r0 = r["figures"]["per_event"]["r0_redis_cpu_usec_per_set"]
        return (f"Redis spends {_num(acc['ingest'].get('redis_cpu_usec_per_event'))} µs per "
                f"event on ingest and {_num(acc['forward'].get('redis_cpu_usec_per_event'))} µs "
                f"on the forward, against {_num(r0)} µs for R0: it runs "
                f"{_num(x['redis_commands_per_event'])} commands per event "
                "(commands, scripts and the commands they run) where R0 runs one. Per event: "
                f"{_top_commands(r, workload)}.")

    return why


def why_commands(workload: str) -> Callable[[dict[str, Any]], str]:
    def why(r: dict[str, Any]) -> str:
        return ("Ingest appends the copies to their shards' logs (one XADD a shard, shared by "
                "concurrent requests); each shard's owner reads its log (XREAD), looks up the "
                "fingerprints of keys it does not hold (HMGET a bucket) and records each batch "
                "in one script call (the fingerprints' HSET, the /debug history's LPUSH and "
                "LTRIM, the log's XTRIM, its bookkeeping's HSET). "
                f"Commands per event by name, ingest + forward: {_top_commands(r, workload, 9)}.")

    return why


def why_remembered(r: dict[str, Any]) -> str:
    steps = (r.get("remembered") or {}).get("steps") or []
    if not steps:
        return ""
    last = steps[-1]
    history = last.get("history_bytes")
    beyond = last.get("bytes_per_key_beyond_history")
    fixed = (f"Of that, the /debug history (a fixed budget of `GATEWAY_DEBUG_HISTORY` "
             f"entries, not a cost per key) takes {_num(history / 1e6)} MB; beyond it a "
             f"remembered key costs {_num(beyond)} bytes. " if history is not None else "")
    return (f"The gateway leaves {_num(last['redis_keys_per_key'])} Redis keys per remembered "
            f"key just after the forward. {fixed}Through the store and its shards' owner "
            "(`bench/memory.py`), less its history, the same state costs "
            f"{_num((r.get('memory') or {}).get('store_bytes_per_key_beyond_history'))} bytes "
            "per key (Memory, below).")


def why_added_p99(workload: str) -> Callable[[dict[str, Any]], str]:
    def why(r: dict[str, Any]) -> str:
        x = _per_event(r, workload)
        p99 = x["p99_ms"]
        return (f"p99 at {_num(x['latency_rate_requests_per_s'])} requests/s: gateway "
                f"{_num(p99['gateway'])} ms, B0 {_num(p99['b0'])} ms, B1 {_num(p99['b1'])} ms "
                f"(validation alone adds {_num(x['b1_added_p99_to_b0_p99'])} times B0's p99). "
                + why_latency(workload)(r))

    return why


def _issue(workload: str, key: str) -> Callable[[dict[str, Any]], float | None]:
    def get(fig: dict[str, Any]) -> float | None:
        value: float | None = fig.get("per_event", {}).get(workload, {}).get(key)
        return value

    return get


def _remembered(step: int) -> Callable[[dict[str, Any]], float | None]:
    """Bytes per remembered key at the run's first (0) or last (-1) count of keys."""

    def get(fig: dict[str, Any]) -> float | None:
        sizes = list(fig.get("per_event", {}).get("remembered_bytes_per_key", {}).values())
        return float(sizes[step]) if sizes else None

    return get


def _label(r: dict[str, Any], label: str) -> str:
    """A target's label with the run's counts of remembered keys (a smoke run sends fewer)."""
    keys = [int(k) for k in r["figures"].get("per_event", {}).get("remembered_bytes_per_key", {})]
    return label.format(first=f"{keys[0]:,}" if keys else "?", last=f"{keys[-1]:,}" if keys
                        else "?")


# The redesign's figures (each a ratio within the run, so that it holds on any machine).
ISSUE_TARGETS = [
    Target("Gateway CPU per event ÷ B0's, 100-event batches", "times",
           _issue("server", "gateway_cpu_to_b0"), 5, False, 3, why_cpu_to_b0("server")),
    Target("Gateway CPU per event ÷ B0's, beacons", "times",
           _issue("pixel", "gateway_cpu_to_b0"), 2, False, 1.5, why_cpu_to_b0("pixel")),
    Target("Redis CPU per event (ingest + forward) ÷ R0, batches", "times",
           _issue("server", "redis_cpu_to_r0"), 5, False, 3, why_redis_cpu("server")),
    Target("Redis CPU per event (ingest + forward) ÷ R0, beacons", "times",
           _issue("pixel", "redis_cpu_to_r0"), 5, False, 3, why_redis_cpu("pixel")),
    Target("Redis commands per event (ingest + forward), batches", "",
           _issue("server", "redis_commands_per_event"), 5, False, 3, why_commands("server")),
    Target("Redis commands per event (ingest + forward), beacons", "",
           _issue("pixel", "redis_commands_per_event"), 5, False, 3, why_commands("pixel")),
    Target("Redis bytes per remembered key, default settings over HTTP, {first} keys", "bytes",
           _remembered(0), 32, False, 20, why_remembered),
    Target("Redis bytes per remembered key, default settings over HTTP, {last} keys",
           "bytes", _remembered(-1), 32, False, 20, why_remembered),
    Target("Added p99 ingest latency ÷ B0's p99, beacons, at 50% of saturation", "times",
           _issue("pixel", "added_p99_to_b0_p99"), 2, False, 1, why_added_p99("pixel")),
    Target("Added p99 ingest latency ÷ B0's p99, batches, at 50% of saturation", "times",
           _issue("server", "added_p99_to_b0_p99"), 2, False, 1, why_added_p99("server")),
]

TARGETS = [
    Target("Pixel beacons at saturation", "events/s",
           lambda f: f["throughput"]["pixel"]["gateway_events_per_s"], 4000, True,
           why=why_throughput("pixel")),
    Target("… as a share of B0 (same run)", "", lambda f: f["throughput"]["pixel"]["ratio_to_b0"],
           0.8, True, 0.9, why_throughput("pixel")),
    Target("100-event server batches at saturation", "events/s",
           lambda f: f["throughput"]["server"]["gateway_events_per_s"], 25000, True,
           why=why_throughput("server")),
    Target("… as a share of B0 (same run)", "",
           lambda f: f["throughput"]["server"]["ratio_to_b0"], 0.8, True, 0.9,
           why_throughput("server")),
    Target("Added p99 ingest latency, beacons, at 50% of saturation", "ms",
           lambda f: f["latency"]["pixel"]["added_ms"]["p99"], 3.0, False,
           why=why_latency("pixel")),
    Target("Added p99 ingest latency, batches, at 50% of saturation", "ms",
           lambda f: f["latency"]["server"]["added_ms"]["p99"], 3.0, False,
           why=why_latency("server")),
    Target("Redis round trips per ingest request, beacons", "",
           lambda f: f["redis"]["pixel"]["ingest"].get("round_trips_per_request"), 1.0, False,
           0.99, why_round_trips("pixel"), digits=2),
    Target("Redis round trips per ingest request, batches", "",
           lambda f: f["redis"]["server"]["ingest"].get("round_trips_per_request"), 1.0, False,
           0.99, why_round_trips("server"), digits=2),
    Target("False drops (fresh keys taken for duplicates)", "",
           lambda f: f["memory"].get("false_drops"), 0, False),
    Target("Acknowledged events not delivered exactly once", "",
           lambda f: f["exactly_once"]["missing"] + f["exactly_once"]["repeated"], 0, False),
    Target("Forward slip p99, mixed traffic at 70% of capacity", "ms",
           lambda f: (f["mixed"]["slip_ms"] or {}).get("p99"), 1000, False, why=why_slip),
]


# -- the page ----------------------------------------------------------------------------


def targets_table(
    r: dict[str, Any], targets: list[Target] = TARGETS
) -> tuple[list[str], list[str]]:
    fig = r["figures"]
    rows = ["| figure | measured | target | stretch | verdict |",
            "| --- | ---: | ---: | ---: | --- |"]
    reasons = []
    for t in targets:
        t = dataclasses.replace(t, label=_label(r, t.label))
        value, verdict = t.verdict(fig)
        sign = "≥" if t.higher_is_better else "≤"
        if t.label.startswith("Forward slip"):
            sign = "<"
        stretch = f"{sign} {_num(t.stretch)}" if t.stretch is not None else ""
        if t.label.startswith("Redis round trips"):
            stretch = "shared by concurrent requests"
        rows.append(f"| {t.label} | {_num(value)} {t.unit} | {sign} {_num(t.bound)} | {stretch} "
                    f"| {verdict} |")
        if verdict.startswith("**miss**") and t.why is not None:
            reasons.append(f"- **{t.label}** ({_num(value)} {t.unit}): {t.why(r)}")
    return rows, reasons


def all_phases(r: dict[str, Any]) -> dict[str, Any]:
    """The rig's phases, then the scale-out's (when the run had them)."""
    return {**r["phases"], **(r.get("scale_out") or {}).get("phases", {})}


def phases_table(r: dict[str, Any]) -> list[str]:
    rows = [
        "| phase | load | events/s | p50 ms | p99 ms | p99.9 ms | target CPU % | client % "
        "| Redis % | stand-in % | other % | steal % | CPU s / 1k events | delivered "
        "| slip p99 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | --- | ---: |",
    ]
    for name, p in all_phases(r).items():
        load, win, d = p["load"], p["window"], p["delivery"]
        cpu = win["cpu_percent_of_one_core"]
        redis = cpu.get("cluster", cpu.get("redis"))  # the cluster's nodes, when it ran
        acked = sum(k["acked_events"] for k in load["kinds"].values())
        cost = win["cpu_s"][p["target"]] / acked * 1000 if acked else None
        how = (f"closed, {load['concurrency']} conns" if load["mode"] == "closed"
               else f"{load['offered_rate']:.0f}/s" + (" actions" if p["workload"] == "mixed"
                                                        else " req"))
        if p["target"].startswith("gateway"):
            delivered = "exactly once" if d["exactly_once"] else (
                f"{d['missing']} missing, {d['repeated']} repeated")
        else:
            delivered = ("all, +{:,} repeats".format(d["repeat_arrivals"]) if d["missing"] == 0
                         else f"{d['missing']} missing")
        for kind, k in load["kinds"].items():
            lat = k["latency_ms"]
            label = name if len(load["kinds"]) == 1 else f"{name} ({kind})"
            rows.append(
                f"| {label} | {how} | {_num(k['events_per_s'])} | {_num(lat['p50'])} "
                f"| {_num(lat['p99'])} | {_num(lat['p99.9'])} | {_num(cpu.get(p['target']))} "
                f"| {_num(cpu.get('client'))} | {_num(redis)} "
                f"| {_num(cpu.get('standin'))} | {_num(win['other_cpu_percent_of_one_core'])} "
                f"| {_num(win.get('steal_percent_of_one_core'))} "
                f"| {_num(cost)} | {delivered} | {_num((d.get('slip_ms') or {}).get('p99'))} |"
            )
    return rows


def cost_rows(r: dict[str, Any]) -> list[str]:
    fig = r["figures"]
    rows = []
    for w, label in (("pixel", "single-event beacons"), ("server", "100-event batches")):
        costs = fig["gateway_cpu_s_per_1000_events"]
        t = fig["throughput"][w]
        rows.append(
            f"| {label} | {_num(costs[f'gateway-saturation-{w}'] * 1000)} "
            f"| {_num(costs[f'b0-saturation-{w}'] * 1000)} "
            f"| {_num(t.get('gateway_events_per_core_s'))} | {_num(t.get('b0_events_per_core_s'))} "
            f"| {_num(t.get('cost_ratio_b0_to_gateway'))} |"
        )
    return rows


SCALE_SETUPS = (  # bench.run's figures key, and how the page names it
    ("one_process", "1 process (`serve`), one Redis"),
    ("workers_one_redis", "{n} processes (`serve --workers {n}`), one Redis"),
    ("workers_cluster", "{n} processes, 3-primary Redis Cluster"),
)


def scale_out_lines(r: dict[str, Any]) -> list[str]:
    """The scale-out table and what limited it, read off the run."""
    so = r["figures"]["scale_out"]
    n = so["workers"]
    rows = [
        "| workload | setup | events/s | share of 1 process | gateway CPU % (all its processes) "
        "| gateway ms CPU / 1,000 events | Redis CPU % | client % | stand-in % | machine busy % "
        "| delivered |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    busy: list[float] = []
    others: list[float] = []
    for w, label in (("pixel", "single-event beacons"), ("server", "100-event batches")):
        for key, setup in SCALE_SETUPS:
            x = so[w].get(key)
            if x is None:
                continue
            rows.append(
                f"| {label} | {setup.format(n=n)} | {_num(x['events_per_s'])} "
                f"| {_num(x['to_one_process'])} | {_num(x['gateway_cpu_percent'])} "
                f"| {_num(x['cpu_ms_per_1000_events'])} | {_num(x['redis_cpu_percent'])} "
                f"| {_num(x['client_cpu_percent'])} | {_num(x['standin_cpu_percent'])} "
                f"| {_num(x['machine_busy_percent'])} "
                f"| {'exactly once' if x['exactly_once'] else '**not** exactly once'} |"
            )
            if key != "one_process":
                busy.append(x["machine_busy_percent"] or 0)
                others.append(x["other_cpu_percent"] or 0)
    low, high = min(busy, default=0), max(busy, default=0)
    text = (f"What limits the {n}-process figures on this machine: its two cores are shared "
            f"by the gateway's {n} processes, Redis (three redis-servers for the cluster), the "
            f"stand-in and the load generator. In those windows the machine was {low:.0f} to "
            f"{high:.0f}% busy")
    if max(others, default=0) >= 25:
        text += (f", work outside the rig taking up to {max(others):.0f}% of a core (this "
                 "shared machine's other users)")
    if low >= 90:
        text += ", so the second gateway process got what the others left of a core, not a " \
                "core of its own."
    else:
        text += ("; where it was not full, the gateway's processes were not CPU-bound: they "
                 "also wait on Redis, and each serves only the connections the kernel gave it.")
    for w in ("pixel", "server"):
        costs = [(key, (so[w].get(key) or {}).get("cpu_ms_per_1000_events"))
                 for key, _ in SCALE_SETUPS]
        if all(cost for _, cost in costs):
            listed = ", ".join(f"{_num(cost)}" for _, cost in costs)
            text += (f" Gateway CPU per 1,000 {w} events (1 process, {n} on one Redis, {n} on "
                     f"the cluster): {listed} ms.")
    text += (" The CPU per event, not this machine's events/s, is the figure to size hosts by: "
             "on a host with a core per gateway process, more processes should carry "
             "proportionally more events until Redis (or the cluster's busiest node) is the "
             "limit; two cores shared by everything cannot show that.")
    return [*rows, "", text]


def client_check(r: dict[str, Any]) -> list[str]:
    lines = []
    for name, b in r["figures"]["bottleneck"].items():
        target, client = b["target_cpu_percent"] or 0, b["client_cpu_percent"] or 0
        busy = b["machine_busy_percent"] or 0
        if target >= 85 and client < 75:
            verdict = "the target is the limit"
        elif busy >= 90:
            verdict = "the machine's two cores are the limit (the target did not get a full core)"
        else:
            verdict = "neither is at its limit: the target waits (on Redis or the network)"
        lines.append(f"- {name}: target {target:.0f}%, client {client:.0f}%, machine "
                     f"{busy:.0f}% busy: {verdict}.")
    return lines


def redis_table(r: dict[str, Any]) -> list[str]:
    rows = [
        "| workload | step | round trips / request | round trips / event | script calls / event "
        "| script µs / event (commandstats) | µs per script call | Redis CPU µs / event |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for w in ("pixel", "server"):
        for step in ("ingest", "forward"):
            x = r["figures"]["redis"][w][step]
            cells = [_num(x.get(k)) for k in (
                "round_trips_per_request", "round_trips_per_event", "script_calls_per_event",
                "script_usec_per_event", "script_usec_per_call", "redis_cpu_usec_per_event",
            )]  # fmt: skip
            rows.append(f"| {w} | {step} | " + " | ".join(cells) + " |")
    return rows


def remembered_lines(r: dict[str, Any]) -> list[str]:
    """The result: bytes per remembered key in the default configuration, sent over HTTP."""
    steps = (r.get("remembered") or {}).get("steps") or []
    if not steps:
        return ["Not measured over HTTP in this run.", ""]
    rows = [
        "The result, in the default configuration through the HTTP path (how: Targets, above), "
        "just after the forward:",
        "",
        "| keys | bytes per remembered key | Redis keys per remembered key | copies sent "
        "| sent in | delivered |",
        "| ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in steps:
        d = s["delivery"]
        delivered = "exactly once" if d["exactly_once"] else (
            f"{d['missing']} missing, {d['repeated']} repeated")
        rows.append(f"| {s['keys']:,} | {_num(s['bytes_per_key'])} "
                    f"| {_num(s['redis_keys_per_key'])} | {s['copies']:,} "
                    f"| {s['send_seconds']:.0f} s | {delivered} |")
    return [*rows, ""]


def reference_lines(r: dict[str, Any]) -> list[str]:
    """How R0, the commands count, the memory over HTTP and B1 are measured, and B1's split."""
    ref, rem = r["reference"], r.get("remembered") or {}
    pe = r["figures"]["per_event"]
    lines = [
        f"- R0: {ref['sets']:,} `SET r0:<n> <1 KB>` of fresh keys, {ref['pipeline']} per "
        "write on one connection, pre-encoded; Redis's CPU from `INFO cpu` (used_cpu_user + "
        "used_cpu_sys) over the run, less the idle background of the second before "
        f"({ref['seconds']:.1f} s, {ref['redis_cpu_s']:.2f} s of Redis CPU). The rig's Redis "
        "writes its append-only file for these as for the gateway's commands.",
        "- Redis CPU and commands per event: the accounting phase's ingest window and forward "
        "window (Redis per event, below), each less the idle background, per event of the "
        "window, then ingest + forward. Commands are every call `INFO commandstats` counts: an "
        "EVALSHA is one, and every command its script runs is one more; the bench's own INFO "
        "is left out.",
    ]
    if rem.get("steps"):
        steps = ", ".join(f"{s['keys']:,} keys in {s['send_seconds']:.0f} s "
                          f"({_num(s['copies_per_s'])} copies/s)" for s in rem["steps"])
        lines.append(
            "- Bytes per remembered key (`bench/remembered.py`): a gateway (`serve --workers "
            f"{rem['workers']}`) on a redis-server of its own ({rem['redis_version']}, "
            f"{rem['mem_allocator']}, no append-only file), with the rig's settings: the "
            f"defaults but `GATEWAY_MERGE_WINDOW={_num(rem['merge_window'])}` (so that events "
            "forward promptly) and the pixel, origin, trusted proxy, upstream (the stand-in), "
            "pass-through off and log level; the /debug history is the default. "
            "80% of keys get a pixel and a server copy, 10% one only, 10% the other; server "
            f"copies in batches of {rem['server_batch']}, pixel copies {rem['pixel_list']} to "
            f"a beacon (a JSON list, to be fast enough), on {rem['connections']} connections. "
            "`used_memory` (settled) less its value before, divided by the keys, once the "
            f"stand-in has every key exactly once; the steps add keys on top of the last: {steps}.")
    lines.append(
        "- B1 (`bench/baseline.py --validate`): B0 whose handlers decode and parse each body "
        "with `gateway.formats` as the gateway's handlers do (validation, normalisation, PII "
        "hashing, the browser's fields), then forward the normalised events; no Redis. CPU per "
        "event against B0's: beacons "
        f"{_num(pe['pixel']['b1_cpu_to_b0'])} times, batches "
        f"{_num(pe['server']['b1_cpu_to_b0'])} times; "
        "the gateway against B1 (deduplication and durability): beacons "
        f"{_num(pe['pixel']['gateway_cpu_to_b1'])} times, batches "
        f"{_num(pe['server']['gateway_cpu_to_b1'])} times.")
    return lines


def commandstats_lines(r: dict[str, Any]) -> list[str]:
    lines = []
    for w in ("pixel", "server"):
        for step in ("ingest_window", "forward_window"):
            stats = r["accounting"][w][step].get("commandstats", {})
            top = sorted(stats.items(), key=lambda kv: -kv[1]["calls"])[:8]
            listed = ", ".join(f"{name} {v['calls']:,}" for name, v in top)
            lines.append(f"- {w}, {step.replace('_', ' ')}: {listed}")
    return lines


def profile_lines(r: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for w, label in (("pixel", "single-event beacons"), ("server", "100-event batches")):
        prof = (r.get("profile") or {}).get(w)
        if not prof or "self_by_area" not in prof:
            why = (prof or {}).get("error") or (r.get("profile") or {}).get("skipped", "no data")
            lines += [f"*{label}*: not profiled ({why}).", ""]
            continue
        lines.append(f"*{label}* at {_num(prof.get('events_per_s'))} events/s, "
                     f"{prof['samples']:,} samples, the process busy "
                     f"{_num(prof.get('busy_percent'))}% of the time:")
        lines.append("")
        lines.append("| self time by area | % | | total time, gateway functions | % |")
        lines.append("| --- | ---: | --- | --- | ---: |")
        areas, funcs = prof["self_by_area"][:12], prof["total_by_function"][:14]
        for i in range(max(len(areas), len(funcs))):
            area, a_share = areas[i] if i < len(areas) else ("", None)
            func, f_share = funcs[i] if i < len(funcs) else ("", None)
            a_text = _num(a_share) if a_share is not None else ""
            f_text = _num(f_share) if f_share is not None else ""
            lines.append(f"| {area} | {a_text} | | `{func}` | {f_text} |" if func
                         else f"| {area} | {a_text} | | | |")
        lines.append("")
        lines.append("Hottest functions (self time): " + ", ".join(
            f"`{name}` {share:.1f}%" for name, share in prof["self_by_function"][:8]) + ".")
        lines.append("")
    return lines


def wait_replicas_lines(r: dict[str, Any]) -> list[str]:
    """What GATEWAY_REDIS_WAIT_REPLICAS=1 costs, beside 0, on a cluster with replicas."""
    rows = r["figures"].get("wait_replicas") or {}
    if not rows:
        return []
    phases = r.get("wait_replicas") or {}
    lines = [
        "## Waiting for replicas",
        "",
        f"`saturation-server` on a 3-primary Redis Cluster with a replica each (append-only, "
        f"everysec; `serve --workers {phases.get('workers', 2)}`, `GATEWAY_REDIS_CLUSTER=1`), "
        "without and with `GATEWAY_REDIS_WAIT_REPLICAS=1` (every ingest pipeline then ends "
        "with `WAIT 1` on each primary it wrote to; concurrent requests share it). Six "
        "redis-servers, two gateway processes and the load share two cores here, so CPU per "
        "event is the figure to compare; events/s and latency move with whatever else ran.",
        "",
        "| `GATEWAY_REDIS_WAIT_REPLICAS` | events/s | gateway ms CPU / 1,000 events "
        "| Redis (six nodes) ms CPU / 1,000 events | p50 ms | p99 ms | machine busy % "
        "| delivered |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for wait in (0, 1):
        row = rows.get(f"wait_replicas_{wait}")
        if row is None:
            continue
        lat = row.get("latency_ms") or {}
        lines.append(
            f"| {wait} | {_num(row['events_per_s'])} "
            f"| {_num(row.get('gateway_cpu_ms_per_1000_events'))} "
            f"| {_num(row.get('redis_cpu_ms_per_1000_events'))} | {_num(lat.get('p50'))} "
            f"| {_num(lat.get('p99'))} | {_num(row.get('machine_busy_percent'))} "
            f"| {'exactly once' if row['exactly_once'] else '**not exactly once**'} |"
        )
    return [*lines, ""]


def render(r: dict[str, Any], json_path: Path) -> str:
    meta = r["meta"]
    mem = r.get("memory") or {}
    rows, reasons = targets_table(r)
    issue_rows, issue_reasons = targets_table(r, ISSUE_TARGETS)
    rel = json_path.resolve().relative_to(ROOT) if json_path.resolve().is_relative_to(ROOT) \
        else json_path
    plan = meta["plan"]
    out = [
        "# Benchmarks",
        "",
        "What the gateway costs next to **B0**, the plain aiohttp forwarder a user would write "
        "instead (validate, answer, batch to TikTok from memory: no Redis, no deduplication, not "
        "durable), measured in the same run on the same machine by `make bench` "
        "([bench/](../bench/)). This page is generated by `python -m bench.report` from "
        f"[{rel}](../{rel}).",
        "",
        f"Run of {meta['started']}, {meta['seconds']:.0f} s, gateway code "
        f"`{meta['code_fingerprint']}` (SHA-256 of gateway/**/*.py), redis-server "
        f"{meta['redis_version']} ({mem.get('mem_allocator', '?')}), Python "
        f"{meta['machine']['python']}, aiohttp {meta['machine']['aiohttp']}, "
        f"{meta['machine']['cpus']} cores. {meta['note']} Load average at the start: "
        f"{', '.join(str(x) for x in meta['machine']['load_average_at_start'])}.",
        "",
        "![throughput, latency and memory, gateway against B0](benchmarks.png)",
        "",
        "## Targets",
        "",
        "The cost figures the store's redesign is held to: each a ratio within this run, "
        "against B0, against R0 (Redis CPU per `SET` of one 1 KB value, pipelined 100 at a "
        "time, on the rig's Redis in this run: "
        f"{_num(r['figures']['per_event']['r0_redis_cpu_usec_per_set'])} µs), or a count:",
        "",
        *issue_rows,
        "",
        *reference_lines(r),
        "",
        "The earlier targets:",
        "",
        *rows,
        "",
    ]
    if reasons or issue_reasons:
        out += ["### Why the missed ones are missed (read off this run)", "", *issue_reasons,
                *reasons, ""]
    out += [
        "## CPU per event",
        "",
        "Events/s depend on how much of the two cores the target got; its CPU time per event "
        "(in the saturation windows) depends much less on other work on the machine. One "
        "whole core at that cost:",
        "",
        "| workload | gateway ms CPU / 1,000 events | B0 ms CPU / 1,000 events "
        "| gateway events/s per core | B0 events/s per core | gateway as a share of B0 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *cost_rows(r),
        "",
    ]
    if "scale_out" in r["figures"]:
        n = r["figures"]["scale_out"]["workers"]
        so_version = r["scale_out"].get("redis_version", meta["redis_version"])
        homes = r["scale_out"].get("shards_per_primary")
        shards = (f"; `GATEWAY_SHARDS` {r['scale_out']['shards']}, so "
                  f"{', '.join(map(str, homes))} shards on the three primaries") if homes else ""
        out += [
            "## Scaling out",
            "",
            f"The saturation phases again, with `tiktok-gateway serve --workers {n}` ({n} "
            "processes on one port, SO_REUSEPORT) on the same Redis, then on a 3-primary "
            f"Redis Cluster on loopback (redis-server {so_version}, append-only, "
            "everysec, like the rig's; `GATEWAY_REDIS_CLUSTER=1`" + shards + "): same load "
            "generator, same connections, same exactly-once check. The gateway's CPU is the sum "
            "over its "
            "processes; Redis CPU is the three nodes' for the cluster. These processes are not "
            "under `bench.probe`, so no round trips are counted for them.",
            "",
            *scale_out_lines(r),
            "",
        ]
    out += wait_replicas_lines(r)
    out += [
        "## Every phase",
        "",
        f"Measured windows of {plan['duration']:g} s after {plan['warmup']:g} s of warm-up "
        f"(latency phases {plan['warmup'] / 2:g} s; mixed {plan['mixed_duration']:g} s). CPU is "
        "% of one core over the window; *other* is busy CPU of processes outside the rig, "
        "*steal* CPU the hypervisor gave to other virtual machines (a phase with more than "
        f"25% of a core of both together is run again, once, at most {plan['reruns']} times "
        "in a run, while the time budget allows). "
        "Latency is per request, from the scheduled send time in the open-loop phases. *Slip* is "
        "when the stand-in first received a key minus when it was due (first copy + merge "
        f"window of {plan['merge_window']:g} s, or the moment a pair completed; B0: the send).",
        "",
        *phases_table(r),
        "",
        "Is the client the bottleneck? A target process near 100% of its one core, with the "
        "client well below, measures the target; otherwise the client, or the two cores "
        "shared by everything, limit the figure:",
        "",
        *client_check(r),
        "",
        "## Redis per event",
        "",
        "From the accounting phase: a closed-loop ingest window that ends before the first key "
        "is due (so nothing is forwarded in it), then a forward window until the stand-in has "
        "every key; the background of an idle second (the forwarder's polls) is subtracted. "
        "The shards' owners read their logs and merge as copies arrive, so Redis's figures "
        "(commandstats, CPU) of the ingest row include that reading; the owners' round trips "
        "and script calls, in both windows, are the forward row's. "
        "Round trips and script calls are counted in the gateway process, per task "
        "(`bench.probe`: every pipeline or command redis-py sends, and the EVALSHAs in it); "
        "script µs come from `INFO commandstats` (they include the commands the script runs); "
        "Redis CPU is the redis-server process's.",
        "",
        *redis_table(r),
        "",
        "Ingest round trips per request in every gateway phase (all but the forwarder's and "
        "the gauges'; concurrent requests can share one): "
        + ", ".join(f"{name.removeprefix('gateway-')} {_num(v)}"
                    for name, v in r["figures"].get("ingest_round_trips_per_request", {}).items())
        + ".",
        "",
        "Commands in each window (`INFO commandstats`, calls; script-internal commands are "
        "counted under their own names too):",
        "",
        *commandstats_lines(r),
        "",
        "## Memory",
        "",
        *remembered_lines(r),
    ]
    if mem:
        out += [
            "A diagnosis, not the result: "
            f"{mem['keys']:,} keys went through the store as a gateway drives it (`Store.ingest` "
            "of their copies, 80% pairs, into the shards' logs; the shards' owner, the gateway's "
            "`Forwarder` with a TikTok that accepts every batch, merging, sending, remembering "
            "the keys and trimming the logs, past the merge window) on a private "
            f"redis-server {mem['redis_version']} ({mem['mem_allocator']}); then, on the same "
            "server after FLUSHALL, the naive layout: one `SET tkgw:seen:<pixel>:<event>:"
            "<event_id> 1 PX <48 h>` per key. `used_memory` delta / keys:",
            "",
            "| layout | bytes per remembered key | Redis keys per remembered key |",
            "| --- | ---: | ---: |",
            f"| the gateway's store | {_num(mem['store_bytes_per_key'])} "
            f"| {_num(mem['store_redis_keys_per_key'])} |",
            f"| the same less the /debug history ({_num(mem.get('history_bytes', 0) / 1e6)} MB, "
            f"a fixed budget) | {_num(mem.get('store_bytes_per_key_beyond_history'))} | |",
            f"| naive SET with expiry | {_num(mem['naive_bytes_per_key'])} | 1 |",
            "",
            f"False drops: {mem['false_drops']} of {mem['probes']:,} fresh keys were taken for "
            f"duplicates; {mem['missed_duplicates']} of {mem['probes']:,} remembered keys were "
            f"not. Took {mem['seconds']:.0f} s ({mem['store_seconds']:.0f} s through the store: "
            f"{mem['store_client_cpu_s']:.0f} s of client CPU, {mem['store_redis_cpu_s']:.0f} s "
            f"of Redis CPU; {mem['naive_seconds']:.0f} s naive).",
            "",
        ]
    else:
        out += ["Not measured in this run.", ""]
    out += [
        "## Where the gateway's CPU goes",
        "",
        "py-spy (`--nonblocking`, 200 Hz) on the gateway process during a separate closed-loop "
        "run of each workload, so the measured phases carry no profiler. *Self* is where the "
        "CPU was spent (C extensions such as orjson and hiredis count as their Python caller); "
        "*total* includes callees.",
        "",
        *profile_lines(r),
        "## How it is measured",
        "",
        "- Every part is its own process on 127.0.0.1: redis-server (append-only, everysec), "
        "the gateway (`python -m bench.probe`: `tiktok-gateway serve` unchanged, plus a counter "
        "of Redis round trips), B0 (`bench/baseline.py`), the TikTok stand-in "
        "(`bench/standin.py`) and one load generator per phase (`bench/load.py`).",
        "- Traffic (`bench/traffic.py`): ~1 KB events; beacons carry the page URL with "
        "`ttclid`, the `_ttp` cookie, an `X-Forwarded-For` browser address and an `Origin`; "
        "server events carry email, phone and external id in plain text (hashed by the "
        "gateway) and a 3-item basket. Each workload resends 10% of its copies (some inside "
        "the merge window, some after the forward) and sends 3% without `event_id`. The mixed "
        "phase pairs 80% of actions (a pixel and a server copy of one `event_id` within the "
        "merge window), with 10% pixel-only and 10% server-only.",
        "- Saturation: a closed loop of N connections, each sending the next request when the "
        "last is answered. Latency: constant arrival rate at "
        f"{plan.get('latency_load', 0.7):.0%} of the gateway's saturation, "
        "the same rate for B0 and B1, measured from the scheduled send time (no coordinated "
        "omission; the event loop's 1 ms timer granularity is in all three).",
        "- Exactly once: the stand-in keeps a ledger per (pixel, event, event_id) (order id "
        "without event_id) and checks every key the clients got code 0 for: the gateway must "
        "deliver each exactly once; B0 at least once (it forwards duplicates).",
        "",
        "Reproduce: `make bench` (under 12 minutes; installs the `bench` extra), "
        "`make bench-smoke` (half a minute), `python -m bench.memory --keys 1000000` (memory "
        "alone), `python -m bench.run --only scale-out` (the scale-out phases and the "
        "one-process saturation phases beside them, about two minutes; no page), "
        f"`python -m bench.report {rel}` (this page).",
        "",
    ]
    return "\n".join(out)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = r["figures"]
    figure, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    colours = {"gateway": "#1f77b4", "B0": "#aaaaaa"}
    for ax, w, target, title in (
        (axes[0], "pixel", 4000, "beacons at saturation"),
        (axes[1], "server", 25000, "100-event batches at saturation"),
    ):
        t = fig["throughput"][w]
        values = [t["gateway_events_per_s"], t["b0_events_per_s"]]
        ax.bar(["gateway", "B0"], values, color=[colours["gateway"], colours["B0"]])
        ax.axhline(target, color="green", linestyle="--", label=f"target {target:,}")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
        ax.set_title(title)
        ax.set_ylabel("events/s")
        ax.legend(loc="upper left", fontsize=8)
    ax = axes[2]
    qs = ["p50", "p99", "p99.9"]
    x = range(len(qs))
    for offset, (w, who, key) in enumerate((
        ("pixel", "gateway", "gateway_ms"), ("pixel", "B0", "b0_ms"),
        ("server", "gateway", "gateway_ms"), ("server", "B0", "b0_ms"),
    )):  # fmt: skip
        values = [fig["latency"][w][key][q] for q in qs]
        ax.bar([i + offset * 0.2 - 0.3 for i in x], values, width=0.2,
               color=colours[who], alpha=1.0 if w == "pixel" else 0.55,
               hatch="" if w == "pixel" else "//", label=f"{w}, {who}")
    ax.set_xticks(list(x), qs)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.set_title(f"latency at {r['meta']['plan'].get('latency_load', 0.7):.0%} of saturation")
    ax.legend(fontsize=7)
    ax = axes[3]
    mem = fig["memory"]
    if mem.get("store_bytes_per_key") is not None:
        over_http = fig.get("per_event", {}).get("remembered_bytes_per_key", {})
        labels = [f"HTTP, {int(k):,}" for k in over_http] + ["Store", "naive SET"]
        values = [*over_http.values(), mem["store_bytes_per_key"], mem["naive_bytes_per_key"]]
        ax.bar(labels, values, color=[colours["gateway"]] * (len(values) - 1) + [colours["B0"]])
        ax.tick_params(axis="x", labelsize=7)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
        ax.axhline(32, color="green", linestyle="--", label="target 32")
        ax.axhline(20, color="olive", linestyle=":", label="stretch 20")
        ax.set_yscale("log")
        ax.set_ylim(bottom=10)
        ax.legend(fontsize=8)
    ax.set_title("Redis bytes per remembered key")
    figure.suptitle(f"gateway vs B0, {r['meta']['started']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args(argv)
    r = orjson.loads(args.results.read_bytes())
    args.doc.write_text(render(r, args.results))
    try:
        plot(r, args.plot)
    except ImportError:
        print("matplotlib is missing (pip install -e '.[bench]'): no plot")
    print(f"wrote {args.doc} and {args.plot}")


if __name__ == "__main__":
    main()
