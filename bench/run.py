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
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import redis.asyncio as aioredis

from bench import counters, floor, memory, profiling, reference, remembered
from bench.cluster import NODES, LocalCluster, clear_keys, primary_of
from bench.common import (
    PIXEL,
    START_SECONDS,
    TOKEN,
    free_port,
    python_module,
    spawn,
    stop,
    wait_http,
)
from bench.traffic import DUPLICATE_RATE, NO_ID_RATE
from gateway.embedded import EmbeddedRedis
from gateway.redis_process import find_redis_server
from gateway.settings import Settings
from gateway.store import Store

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LOAD_EXIT_GRACE = 40.0  # longest wait for a load generator after its window
DISTURBED = 25.0  # % of one core taken outside the rig (see disturbance) to run a phase again
BUDGET_SECONDS = 700.0  # the whole run, memory included: under 12 minutes
RIG_SECONDS = 560.0  # the rig's phases and the remembered keys, without reruns, with room
SCALE_WORKERS = 2  # gateway processes in the scale-out phases: one per core of the bench machine
WORKERS_STOP_SECONDS = 30.0  # longest wait for `serve --workers` to drain and exit


@dataclass(frozen=True)
class Plan:
    """How long and how hard each phase runs."""

    warmup: float
    duration: float
    mixed_duration: float
    pixel_concurrency: int
    server_concurrency: int
    merge_window: float
    memory_keys: int
    profile_seconds: float  # 0: no profile
    latency_load: float = 0.5  # share of the gateway's saturation for the latency phases
    mixed_load: float = 0.7  # share of the gateway's capacity for the mixed phase
    r0_sets: int = 200_000  # pipelined SETs of R0
    remembered_keys: tuple[int, ...] = (100_000,)  # keys sent over HTTP, measured at each
    accounting_seconds: float = 1.3  # must end before the first keys' merge window does
    start_lead: float = 1.0  # seconds between spawning a load generator and its start
    reruns: int = 4  # phases run again at most, when other processes took the CPU
    settle: float = 0.3  # seconds after the last expected arrival, for a late repeat to show


FULL = Plan(warmup=2.0, duration=8.0, mixed_duration=12.0, pixel_concurrency=32,
            server_concurrency=8, merge_window=2.0, memory_keys=250_000, profile_seconds=6.0,
            reruns=3, remembered_keys=(100_000, 1_000_000))
SMOKE = Plan(warmup=0.2, duration=0.6, mixed_duration=0.8, pixel_concurrency=4,
             server_concurrency=2, merge_window=0.5, memory_keys=5_000, profile_seconds=0.0,
             accounting_seconds=0.25, start_lead=0.5, reruns=0, settle=0.05, r0_sets=5_000,
             remembered_keys=(1_000, 2_000))


@dataclass(frozen=True)
class Target:
    name: str  # "gateway", "b0" or "b1"
    port: int
    pid: int
    merge_window: float  # 0 for B0 and B1: they forward at once
    uses_redis: bool  # the rig's Redis: its INFO is read at the edges of each window
    workers: int = 1  # > 1: `serve --workers N`, its CPU is the process tree's


def redis_version(binary: str) -> tuple[int, ...]:
    try:
        text = subprocess.run([binary, "--version"], capture_output=True, text=True,
                              timeout=10, check=False).stdout
    except OSError:
        return ()
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(x) for x in match.groups()) if match else ()


def choose_redis_server() -> str:
    """$BENCH_REDIS_SERVER, else the newest redis-server found (the system's or the embedded)."""
    chosen = os.environ.get("BENCH_REDIS_SERVER")
    if chosen:
        return chosen
    found = {p for p in (shutil.which("redis-server"), "/usr/bin/redis-server",
                         "/usr/local/bin/redis-server", find_redis_server()) if p and
             os.access(p, os.X_OK)}  # fmt: skip
    return max(sorted(found), key=redis_version)


async def wait_listening(proc: subprocess.Popen[bytes], port: int, workers: int) -> None:
    """Until `workers` children of `proc` listen on `port` (a worker listens once its app
    is set up: Redis reached, scripts loaded); at most START_SECONDS."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with code {proc.returncode}")
        listening = 0
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    listening += any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                                     for c in child.net_connections("tcp"))  # fmt: skip
        if listening >= workers:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{workers} workers did not listen on {port} within {START_SECONDS:g}s")


def stop_tree(proc: subprocess.Popen[bytes]) -> None:
    """Stop `serve --workers` (SIGTERM: it drains and stops its workers, which run in
    sessions of their own); kill any of its workers still running after that."""
    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        workers = []
    stop(proc, WORKERS_STOP_SECONDS)
    for worker in workers:
        with contextlib.suppress(psutil.Error):
            worker.kill()  # psutil checks it is still the same process


def code_fingerprint() -> str:
    """SHA-256 of the gateway's sources, so a result names the code it measured."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class Rig:
    """The long-lived processes, and how to run one phase against them."""

    def __init__(self, workdir: Path, plan: Plan, redis_binary: str) -> None:
        self.workdir = workdir
        self.plan = plan
        self.redis_binary = redis_binary
        self.run_id = uuid.uuid4().hex[:8]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.loads: set[subprocess.Popen[bytes]] = set()
        self.redis = EmbeddedRedis(workdir / "redis", port=0, binary=redis_binary)
        self.redis_client: aioredis.Redis | None = None
        self.redis_url = ""
        self.cluster: LocalCluster | None = None  # the scale-out phases' Redis Cluster
        self.http: aiohttp.ClientSession | None = None
        self.standin_url = ""
        self.probe_file = workdir / "round_trips.json"
        self.targets: dict[str, Target] = {}
        self.reruns = plan.reruns
        self.reruns_until = math.inf  # no phase starts again after this (monotonic) time

    # -- processes ------------------------------------------------------------------

    async def start(self) -> None:
        redis_url = self.redis_url = await self.redis.start()
        self.redis_client = aioredis.Redis.from_url(redis_url)
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        port = free_port()
        self.standin_url = f"http://127.0.0.1:{port}"
        self._spawn("standin", python_module("bench.standin", "--port", str(port)))
        await wait_http(self.standin_url + "/stats", self.procs["standin"])

        port = free_port()
        env = self._gateway_env("gateway", port, redis_url)
        env["BENCH_PROBE_FILE"] = str(self.probe_file)
        gateway = self._spawn("gateway", python_module("bench.probe"), env)
        await wait_http(f"http://127.0.0.1:{port}/readyz", gateway)
        self.targets["gateway"] = Target("gateway", port, gateway.pid, self.plan.merge_window, True)

        port = free_port()
        b0 = self._spawn("b0", python_module("bench.baseline", "--port", str(port),
                                             "--upstream", self.standin_url))
        await wait_http(f"http://127.0.0.1:{port}/healthz", b0)
        self.targets["b0"] = Target("b0", port, b0.pid, 0.0, False)

        port = free_port()
        b1 = self._spawn("b1", python_module("bench.baseline", "--port", str(port),
                                             "--upstream", self.standin_url, "--validate"))
        await wait_http(f"http://127.0.0.1:{port}/healthz", b1)
        self.targets["b1"] = Target("b1", port, b1.pid, 0.0, False)

    def _gateway_env(self, name: str, port: int, redis_url: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(
            GATEWAY_LISTEN=f"127.0.0.1:{port}",
            GATEWAY_REDIS_URL=redis_url,
            GATEWAY_UPSTREAM_URL=self.standin_url,
            GATEWAY_PIXELS=f"{PIXEL}={TOKEN}",
            GATEWAY_MERGE_WINDOW=str(self.plan.merge_window),
            GATEWAY_ALLOWED_ORIGINS="https://www.example-shop.com",
            GATEWAY_TRUSTED_PROXIES="127.0.0.1/32",
            GATEWAY_PASSTHROUGH="0",
            GATEWAY_LOG_LEVEL="WARNING",
            GATEWAY_DATA_DIR=str(self.workdir / name),
        )
        return env

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        proc = spawn(argv, self.workdir / f"{name}.log", env)
        self.procs[name] = proc
        return proc

    async def start_workers(
        self, name: str, cluster: bool, *, replicas: int = 0, wait_replicas: int = 0
    ) -> Target:
        """`tiktok-gateway serve --workers N` on the rig's Redis, or on a fresh 3-primary
        cluster (started here, the rig's redis-server binary; `replicas` per primary);
        ready once every worker listens. Not under bench.probe: its round trips are not
        counted. `wait_replicas`: GATEWAY_REDIS_WAIT_REPLICAS."""
        if cluster:
            self.cluster = LocalCluster(
                self.redis_binary, appendfsync="everysec", replicas=replicas
            )
            await self.cluster.start()
        port = free_port()
        env = self._gateway_env(name, port, self.cluster.url if self.cluster else self.redis_url)
        if cluster:
            env["GATEWAY_REDIS_CLUSTER"] = "1"
        env["GATEWAY_REDIS_WAIT_REPLICAS"] = str(wait_replicas)
        argv = python_module("gateway", "serve", "--workers", str(SCALE_WORKERS))
        proc = self._spawn(name, argv, env)
        await wait_listening(proc, port, SCALE_WORKERS)
        await wait_http(f"http://127.0.0.1:{port}/readyz", proc)
        target = Target(name, port, proc.pid, self.plan.merge_window, uses_redis=not cluster,
                        workers=SCALE_WORKERS)  # fmt: skip
        self.targets[name] = target
        return target

    async def stop_workers(self, name: str) -> None:
        """Stop `serve --workers` (it drains its workers), then the cluster if there is one."""
        self.targets.pop(name, None)
        proc = self.procs.pop(name, None)
        if proc is not None:
            await asyncio.to_thread(stop_tree, proc)
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            await cluster.stop()

    async def close(self) -> None:
        for proc in list(self.loads):
            stop(proc, 2.0)
        for name in [n for n in self.procs if n not in ("b0", "b1", "gateway", "standin")]:
            await self.stop_workers(name)
        for name in ("b0", "b1", "gateway", "standin"):
            if name in self.procs:
                stop(self.procs[name])
        if self.cluster is not None:
            await self.cluster.stop()
        if self.http is not None:
            await self.http.close()
        if self.redis_client is not None:
            await self.redis_client.aclose()
        await self.redis.stop()

    # -- phases -----------------------------------------------------------------------

    async def snapshot(self, target: Target, client_pid: int | None) -> counters.Snapshot:
        standin = await self._get("/stats")
        # Every process of the rig, idle ones too, so that "other" CPU is only foreign work.
        pids: dict[str, counters.Processes] = {
            name: counters.Tree(t.pid) if t.workers > 1 else t.pid
            for name, t in self.targets.items()
        }
        pids |= {"redis": self.redis.pid, "standin": self.procs["standin"].pid,
                 "client": client_pid, "orchestrator": os.getpid()}
        if self.cluster is not None:
            pids["cluster"] = self.cluster.pids
        return await counters.take(
            pids,
            self.redis_client if target.uses_redis else None,
            (target.pid, self.probe_file) if target.name == "gateway" else None,
            standin,
        )

    async def run_load(
        self, name: str, target: Target, marks: list[float], **options: Any
    ) -> tuple[dict[str, Any], list[counters.Snapshot], Path]:
        """One load generator; snapshots at `marks` seconds after its start. Waits for it."""
        out, acked = self.workdir / f"{name}.json", self.workdir / f"{name}.acked"
        start_at = time.time() + self.plan.start_lead
        argv = python_module(
            "bench.load", "--port", str(target.port), "--start-at", f"{start_at:.6f}",
            "--merge-window", str(target.merge_window), "--prefix", f"{self.run_id}-{name}",
            "--seed", str(zlib.crc32(name.encode())), "--out", str(out), "--acked", str(acked),
        )  # fmt: skip
        for option, value in options.items():
            argv += [f"--{option.replace('_', '-')}", str(value)]
        client = spawn(argv, self.workdir / f"{name}.log")
        self.loads.add(client)
        snaps = []
        try:
            for mark in marks:
                await asyncio.sleep(max(0.0, start_at + mark - time.time()))
                snaps.append(await self.snapshot(target, client.pid))
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(client.wait, LOAD_EXIT_GRACE + max(marks, default=0.0))
        finally:
            stop(client, 2.0)
            self.loads.discard(client)
        if client.returncode != 0 or not out.exists():
            log = (self.workdir / f"{name}.log").read_text()[-2000:]
            raise RuntimeError(f"load generator of {name} failed ({client.returncode}): {log}")
        return orjson.loads(out.read_bytes()), snaps, acked

    async def phase(
        self, name: str, target: Target, workload: str, mode: str, **options: Any
    ) -> dict[str, Any]:
        """A measured phase; run again (within a budget) when other work took the CPU.

        Of the two runs the less disturbed is kept; both disturbances are recorded."""
        result = await self._phase_once(name, target, workload, mode, **options)
        other = disturbance(result)
        if other > DISTURBED and self.reruns > 0 and time.monotonic() < self.reruns_until:
            self.reruns -= 1
            print(f"    other work took {other:.0f}% of a core: once more", flush=True)
            again = await self._phase_once(f"{name}-again", target, workload, mode, **options)
            others = [other, disturbance(again)]
            result = min(result, again, key=disturbance)
            result["attempts_disturbance_percent"] = others
        return result

    async def _phase_once(
        self, name: str, target: Target, workload: str, mode: str, **options: Any
    ) -> dict[str, Any]:
        """A measured phase: warm-up, window, then the delivery check."""
        options = dict(options)
        warmup, duration = options.pop("warmup"), options.pop("duration")
        print(f"  {name}: {target.name}, {workload}, {mode} loop "
              + (f"at {options['rate']:.0f}/s" if "rate" in options else ""), flush=True)
        load, (a, b), acked = await self.run_load(
            name, target, [warmup, warmup + duration], workload=workload, mode=mode,
            warmup=warmup, duration=duration, **options,
        )  # fmt: skip
        delivery = await self.deliver(name, acked, target)
        await self.clear()
        return {"target": target.name, "workload": workload, "mode": mode, "load": load,
                "window": counters.window(a, b), "delivery": delivery}

    async def deliver(self, name: str, acked: Path, target: Target) -> dict[str, Any]:
        """Wait until every acked key arrived (bounded), then the stand-in's full check."""
        assert self.http is not None
        async with self.http.post(self.standin_url + "/expect",
                                  json={"phase": name, "path": str(acked)}) as response:
            response.raise_for_status()
        started = time.monotonic()
        deadline = started + target.merge_window + 30.0
        while time.monotonic() < deadline:
            status = await self._get(f"/check?phase={name}")
            if status["missing"] == 0:
                break
            await asyncio.sleep(0.1)
        waited = time.monotonic() - started
        await asyncio.sleep(self.plan.settle)
        result = await self._get(f"/check?phase={name}&full=1")
        result["waited_s"] = round(waited, 2)
        return result

    async def clear(self) -> None:
        assert self.http is not None and self.redis_client is not None
        async with self.http.post(self.standin_url + "/reset") as response:
            response.raise_for_status()
        await clear_keys(self.redis_client)
        if self.cluster is not None:
            await self.cluster.clear()

    async def _get(self, path: str) -> dict[str, Any]:
        assert self.http is not None
        async with self.http.get(self.standin_url + path) as response:
            response.raise_for_status()
            doc: dict[str, Any] = await response.json(loads=orjson.loads)
            return doc


# -- the phases -------------------------------------------------------------------------


def disturbance(result: dict[str, Any]) -> float:
    """% of a core taken during the window by other processes and other virtual machines."""
    win = result["window"]
    return float(win["other_cpu_percent_of_one_core"] + win["steal_percent_of_one_core"])


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
        results["memory"] = await memory.measure(plan.memory_keys, redis_binary)
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
