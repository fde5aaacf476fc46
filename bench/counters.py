"""Counters read at the edges of a measured window, and their differences.

A `Snapshot` holds, at one instant: CPU seconds of each of the rig's
processes (psutil), the machine's busy and total CPU time, Redis's INFO
(commandstats, stats, cpu), the gateway's Redis round trips (bench.probe's
file) and the stand-in's arrival counts. `window(a, b)` turns two of them into
the figures of the window between.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import redis.asyncio as aioredis

# Commands a client sends to run a script; their usec include the script's own calls,
# which commandstats also lists under their own names.
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")
PROBE_WAIT = 2.0  # longest wait for bench.probe to write its counts
REDIS_STATS = (
    "total_commands_processed",
    "total_reads_processed",
    "total_writes_processed",
    "total_net_input_bytes",
    "total_net_output_bytes",
)


@dataclass
class Snapshot:
    at: float
    cpu: dict[str, float]  # role -> CPU seconds (user + system) of that process
    machine_busy: float  # CPU seconds of all cores, busy
    machine_total: float  # CPU seconds of all cores, busy or idle
    machine_steal: float  # CPU seconds the hypervisor gave to other machines
    commandstats: dict[str, tuple[int, int]] = field(default_factory=dict)  # cmd -> (calls, usec)
    redis_stats: dict[str, int] = field(default_factory=dict)
    round_trips: dict[str, int] | None = None  # task coroutine -> round trips; "total"
    script_calls: dict[str, int] = field(default_factory=dict)  # task coroutine -> EVALSHAs
    standin: dict[str, int] = field(default_factory=dict)


def process_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its descendants (`serve --workers N`: the workers).

    Each live process adds its own time and its exited children's (once waited for),
    so a worker that exits between two snapshots is still counted."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


# What a role's CPU is read from: one process, several (summed), or a process and its
# descendants (Tree).
@dataclass(frozen=True)
class Tree:
    pid: int


Processes = int | tuple[int, ...] | Tree | None


def role_cpu(processes: Processes) -> float:
    if isinstance(processes, Tree):
        return tree_cpu(processes.pid)
    if isinstance(processes, tuple):
        return sum(process_cpu(pid) for pid in processes)
    return process_cpu(processes)


async def take(
    pids: dict[str, Processes],
    redis: aioredis.Redis | None,
    probe: tuple[int, Path] | None,
    standin: dict[str, int],
) -> Snapshot:
    """Everything at once; the stand-in's counts are fetched by the caller just before.

    `probe` is the gateway's pid and bench.probe's file, when round trips are counted."""
    machine = psutil.cpu_times()
    busy = machine.user + machine.system + machine.nice + machine.irq + machine.softirq
    total = busy + machine.idle + machine.iowait + getattr(machine, "steal", 0.0)
    snap = Snapshot(
        at=time.time(),
        cpu={role: role_cpu(processes) for role, processes in pids.items()},
        machine_busy=busy,
        machine_total=total,
        machine_steal=getattr(machine, "steal", 0.0),
        standin=dict(standin),
    )
    if redis is not None:
        info = await redis.info("everything")
        snap.commandstats = {
            name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for name, v in info.items()
            if name.startswith("cmdstat_") and isinstance(v, dict)
        }
        snap.redis_stats = {k: int(info.get(k, 0)) for k in REDIS_STATS}
    if probe is not None:
        counts = await probe_counts(*probe)
        if counts is not None:
            snap.round_trips, snap.script_calls = counts
    return snap


def _read_probe(path: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {"seq": 0, "total": 0, "by_task": {}}
    return doc


async def probe_counts(pid: int, path: Path) -> tuple[dict[str, int], dict[str, int]] | None:
    """bench.probe's counts as of now (SIGUSR1): round trips, "total" and one per task
    coroutine; and script calls per task coroutine."""
    seen = _read_probe(path)["seq"]
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + PROBE_WAIT
    while time.monotonic() < deadline:
        doc = _read_probe(path)
        if doc["seq"] > seen:
            trips = {"total": int(doc["total"]), **doc["by_task"]}
            return trips, dict(doc.get("script_calls_by_task", {}))
        await asyncio.sleep(0.002)
    return None


FORWARDER_STEPS = ("Store.commit",)


def role_of_task(name: str) -> str:
    """Group the probe's task coroutines: HTTP requests, the forwarder, the rest.

    The forwarder (the shards' owner) shields its commits, which run as tasks of their
    own; its lease renewals run in `Forwarder._keep_leases`. Ingest's appends go out in
    the store's shared flush (`Runner._flush`), counted with the requests by the caller."""
    if name.startswith("RequestHandler"):
        return "requests"
    if "Forwarder" in name or "forward" in name or name.startswith(FORWARDER_STEPS):
        return "forwarder"
    if "gauges" in name:
        return "gauges"
    return name


def window(a: Snapshot, b: Snapshot) -> dict[str, Any]:
    """The differences between two snapshots, as plain JSON."""
    seconds = b.at - a.at
    cpu = {role: round(b.cpu[role] - a.cpu.get(role, 0.0), 3) for role in b.cpu}
    machine_busy = b.machine_busy - a.machine_busy
    machine_total = b.machine_total - a.machine_total
    ours = sum(cpu.values())
    out: dict[str, Any] = {
        "seconds": round(seconds, 3),
        "cpu_s": cpu,
        "cpu_percent_of_one_core": {r: round(100 * s / seconds, 1) for r, s in cpu.items()},
        "machine_busy_percent": round(100 * machine_busy / machine_total, 1)
        if machine_total
        else None,
        # Busy CPU not used by the rig's processes: other work on a shared machine; and
        # CPU time the hypervisor gave to other virtual machines.
        "other_cpu_percent_of_one_core": round(100 * max(0.0, machine_busy - ours) / seconds, 1),
        "steal_percent_of_one_core": round(100 * (b.machine_steal - a.machine_steal) / seconds, 1),
        "standin": {k: b.standin.get(k, 0) - a.standin.get(k, 0) for k in b.standin},
    }
    if b.commandstats:
        stats = {}
        for name, (calls, usec) in b.commandstats.items():
            calls0, usec0 = a.commandstats.get(name, (0, 0))
            if calls - calls0:
                stats[name] = {"calls": calls - calls0, "usec": usec - usec0}
        out["commandstats"] = stats
        out["script_calls"] = sum(stats.get(c, {}).get("calls", 0) for c in SCRIPT_COMMANDS)
        out["script_usec"] = sum(stats.get(c, {}).get("usec", 0) for c in SCRIPT_COMMANDS)
        out["redis_stats"] = {k: b.redis_stats[k] - a.redis_stats.get(k, 0) for k in REDIS_STATS}
    if b.round_trips is not None and a.round_trips is not None:
        by_role: dict[str, int] = {}
        for name, count in b.round_trips.items():
            if name != "total":
                role = role_of_task(name)
                by_role[role] = by_role.get(role, 0) + count - a.round_trips.get(name, 0)
        calls_by_role: dict[str, int] = {}
        for name, count in b.script_calls.items():
            role = role_of_task(name)
            calls = count - a.script_calls.get(name, 0)
            calls_by_role[role] = calls_by_role.get(role, 0) + calls
        out["round_trips"] = {
            "total": b.round_trips["total"] - a.round_trips["total"],
            "by_role": {k: v for k, v in by_role.items() if v},
            "script_calls_by_role": {k: v for k, v in calls_by_role.items() if v},
        }
    return out
