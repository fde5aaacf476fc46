"""The load generator: one process, raw keep-alive HTTP/1.1 over asyncio, cheap per request.

Two modes (`--mode`):

- `closed`: `--concurrency` workers, each on its own connection, send the
  next request as soon as the last one is answered: saturation.
- `open`: requests leave at scheduled times (constant arrival rate, or the
  mixed timeline), on as many connections as needed; latency is measured
  from the *scheduled* time, so a stall is not hidden by the client waiting
  (no coordinated omission).

Workloads: `pixel` (single-event beacons to /pixel/events), `server`
(100-event Events API 2.0 batches), `mixed` (both, paired; open loop only).

The run starts at `--start-at` (epoch seconds, so the orchestrator can read
counters at the same instants), warms up, measures `--duration` seconds,
then waits for answers in flight. It writes a JSON summary to `--out` and
every acknowledged key (code 0) to `--acked`, one `key<TAB>due<TAB>kind` a line: the
due time is when the gateway should forward the key (its first copy's send
time plus the merge window, or the moment the pair was complete, or at once
without event_id; for B0, whose window is 0, at once); the stand-in checks
against it. Send times are the client's, a little before the gateway's own
clock reads them, so slips are slightly overstated.

aiohttp's client costs several times more CPU per request than this one, and
on a 2-core machine the client competes with what it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import resource
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.common import summary_ms
from bench.traffic import BATCH, NO_ID_RATE, Copy, Request, Stream, mixed_plan, uniform_plan
from bench.traffic import pixel_request as render_pixel
from bench.traffic import server_request as render_server

MAX_CONNECTIONS = 512  # open loop: connections opened when every other one is busy
DRAIN_SECONDS = 15.0  # longest wait for answers in flight after the run
MAX_FAILURES = 50  # closed loop: failed requests in a row before a worker gives up
RECONNECT_PAUSE = 0.01
# A resend comes back up to ~3 s of traffic later, at these nominal rates (copies per second).
NOMINAL_RATE = {"pixel": 5_000, "server": 30_000}


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: Any = None  # asyncio's or uvloop's transport
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self._buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:  # every answer of aiohttp with a body has one
            self._fail(ConnectionError("answer without Content-Length"))
            return
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop > 0 else len(head)])
        total = end + 4 + length
        if len(self._buffer) < total:
            return
        status = int(head[9:12])
        body = bytes(self._buffer[end + 4 : total])
        del self._buffer[:total]
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result((status, body))

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    async def request(self, data: bytes) -> tuple[int, bytes]:
        if self.transport is None:
            raise ConnectionError("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self._waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int) -> Connection:
    _transport, conn = await asyncio.get_running_loop().create_connection(
        Connection, host, port
    )
    return conn


@dataclass
class Tally:
    """What one kind of request did inside the measured window, and every acked key."""

    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    events: int = 0
    acked_events: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    late_sends: int = 0  # open loop: sent more than 1 ms after their scheduled time

    def summary(self, seconds: float) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "events": self.events,
            "acked_events": self.acked_events,
            "requests_per_s": round(self.requests / seconds, 1),
            "events_per_s": round(self.acked_events / seconds, 1),
            "errors": self.errors,
            "late_sends": self.late_sends,
            "latency_ms": summary_ms(self.latencies),
        }


class Run:
    """One load run: the connections, the clock, the tallies and the ledger of acked copies."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.host_header = f"{args.host}:{args.port}".encode()
        self.window_start = args.start_at + args.warmup
        self.window_end = self.window_start + args.duration
        self.tallies = {"pixel": Tally(), "server": Tally()}
        # Over the whole run, warm-up and answers after the window included.
        self.totals = {"requests": 0, "events": 0, "acked_events": 0, "failed_requests": 0}
        self.connections = args.concurrency  # open loop: as many as were needed at once
        # key -> [first acked pixel send, first acked server send, no event_id]
        self.sends: dict[str, list[float]] = {}

    def render(self, kind: str, copies: list[Copy]) -> bytes:
        now = int(time.time())
        if kind == "pixel":
            return render_pixel(copies[0], now, self.host_header)
        return render_server(copies, now, self.host_header)

    async def send(
        self, conn: Connection, kind: str, copies: list[Copy], scheduled: float | None
    ) -> bool:
        """Send one request; tally it by its scheduled (open) or send (closed) time."""
        data = self.render(kind, copies)
        sent_wall = time.time()
        started = time.perf_counter()
        try:
            status, body = await conn.request(data)
            code, failed = answer_code(status, body)
        except (ConnectionError, OSError, ValueError) as exc:
            code, failed = None, set()
            error = type(exc).__name__
        else:
            error = f"http {status} code {code}" if code not in (0, 20001) else ""
        done_wall = time.time()
        latency = time.perf_counter() - started
        tally = self.tallies[kind]
        if scheduled is not None:  # open loop: from the scheduled time, and count by it
            latency += sent_wall - scheduled
            counted = self.window_start <= scheduled < self.window_end
            if sent_wall - scheduled > 0.001:
                tally.late_sends += counted
        else:  # closed loop: count what completed inside the window
            counted = self.window_start <= done_wall < self.window_end
        acked = [c for i, c in enumerate(copies) if code in (0, 20001) and i not in failed]
        for copy in acked:
            self.record(copy, sent_wall)
        self.totals["requests"] += 1
        self.totals["events"] += len(copies)
        self.totals["acked_events"] += len(acked)
        self.totals["failed_requests"] += bool(error)
        if counted:
            tally.requests += 1
            tally.events += len(copies)
            tally.acked_events += len(acked)
            tally.latencies.append(latency)
            if error:
                tally.errors[error] = tally.errors.get(error, 0) + 1
        return code is not None

    def record(self, copy: Copy, sent_wall: float) -> None:
        entry = self.sends.get(copy.key)
        if entry is None:
            entry = self.sends[copy.key] = [math.inf, math.inf, 0.0 if copy.event_id else 1.0]
        slot = 0 if copy.source == "pixel" else 1
        entry[slot] = min(entry[slot], sent_wall)

    def due_times(self) -> dict[str, tuple[float, str]]:
        """When the gateway should forward each acked key, and why (see the module's doc)."""
        window = self.args.merge_window
        out = {}
        for key, (pixel, server, no_id) in self.sends.items():
            first = min(pixel, server)
            if no_id:
                out[key] = (first, "no_event_id")
            elif math.isinf(max(pixel, server)):
                out[key] = (first + window, "lone")
            else:  # both sources: complete when the second arrived, if the window was open
                out[key] = (min(first + window, max(pixel, server)), "pair")
        return out


def answer_code(status: int, body: bytes) -> tuple[int | None, set[int]]:
    """TikTok's `code` of an answer and the indices of refused events (partial success)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, set()
    code = doc.get("code") if isinstance(doc, dict) else None
    if status != 200 or not isinstance(code, int):
        return code if isinstance(code, int) else None, set()
    failed = (doc.get("data") or {}).get("failed_events") or []
    return code, {f["index"] for f in failed if isinstance(f, dict)}


async def sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def run_closed(run: Run) -> None:
    """`concurrency` workers, each sending its next request as soon as it has an answer."""
    args = run.args
    size = 1 if args.workload == "pixel" else BATCH
    stream = Stream(args.workload, args.prefix, args.seed, 3 * NOMINAL_RATE[args.workload],
                    args.no_id_rate)
    conns = [await connect(args.host, args.port) for _ in range(args.concurrency)]
    await sleep_until(args.start_at)

    async def worker(conn: Connection) -> None:
        failures = 0  # in a row: a target that keeps failing stops the worker
        while time.time() < run.window_end and failures < MAX_FAILURES:
            if await run.send(conn, args.workload, stream.take(size), None):
                failures = 0
                continue
            failures += 1
            conn.close()
            await asyncio.sleep(RECONNECT_PAUSE)
            with contextlib.suppress(OSError):
                conn = await connect(args.host, args.port)

    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for conn in conns:
            conn.close()


async def run_open(run: Run, plan: list[Request]) -> None:
    """Send each planned request at its time, on an idle connection or a new one."""
    args = run.args
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    opened = 0
    for _ in range(min(args.concurrency, MAX_CONNECTIONS)):
        idle.put_nowait(await connect(args.host, args.port))
        opened += 1
    tasks: set[asyncio.Task[None]] = set()

    async def one(conn: Connection, kind: str, copies: list[Copy], at: float) -> None:
        nonlocal opened
        if not await run.send(conn, kind, copies, at):
            conn.close()
            await asyncio.sleep(RECONNECT_PAUSE)
            try:
                conn = await connect(args.host, args.port)
            except OSError:
                opened -= 1  # one connection fewer; a new one is opened when none is idle
                return
        idle.put_nowait(conn)

    for offset, kind, copies in plan:
        at = args.start_at + offset
        if at >= run.window_end:
            break
        await sleep_until(at)
        if idle.empty() and opened < MAX_CONNECTIONS:
            opened += 1
            idle.put_nowait(await connect(args.host, args.port))
        conn = await idle.get()
        task = asyncio.create_task(one(conn, kind, copies, at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=DRAIN_SECONDS)
    run.connections = opened
    while not idle.empty():
        idle.get_nowait().close()


def build_plan(args: argparse.Namespace) -> list[Request]:
    seconds = args.warmup + args.duration
    if args.workload == "mixed":
        return mixed_plan(args.rate, seconds, args.prefix, args.seed)
    copies_per_s = args.rate * (1 if args.workload == "pixel" else BATCH)
    stream = Stream(args.workload, args.prefix, args.seed, int(3 * copies_per_s),
                    args.no_id_rate)
    return uniform_plan(stream, args.rate, seconds)


async def main_async(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The run's summary, and its acked keys as the lines of the --acked file."""
    run = Run(args)
    plan = build_plan(args) if args.mode == "open" else []
    cpu_start = _cpu()
    if args.mode == "closed":
        await asyncio.wait_for(run_closed(run), args.warmup + args.duration + 60)
    else:
        await asyncio.wait_for(run_open(run, plan), args.warmup + args.duration + 60)
    dues = run.due_times()
    lines = "".join(f"{key}\t{due:.6f}\t{kind}\n" for key, (due, kind) in dues.items())
    kinds = ("pixel", "server") if args.workload == "mixed" else (args.workload,)
    return {
        "workload": args.workload,
        "mode": args.mode,
        "concurrency": args.concurrency,
        "connections": run.connections,
        "offered_rate": args.rate,
        "window": [run.window_start, run.window_end],
        "acked_keys": len(dues),
        "client_cpu_s": round(_cpu() - cpu_start, 3),
        "totals": run.totals,
        "kinds": {k: run.tallies[k].summary(args.duration) for k in kinds},
    }, lines


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workload", choices=("pixel", "server", "mixed"), required=True)
    parser.add_argument("--mode", choices=("closed", "open"), required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="open loop: requests per second (mixed: actions per second)")
    parser.add_argument("--start-at", type=float, default=0.0, help="epoch seconds; 0: now")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--merge-window", type=float, default=0.0,
                        help="the target's merge window (0: forwards at once, as B0)")
    parser.add_argument("--no-id-rate", type=float, default=NO_ID_RATE,
                        help="share of copies without event_id (pure workloads)")
    parser.add_argument("--prefix", required=True, help="event_id prefix, unique per run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--acked", required=True)
    args = parser.parse_args(argv)
    if args.mode == "open" and args.rate <= 0:
        parser.error("--mode open needs --rate")
    if args.workload == "mixed" and args.mode != "open":
        parser.error("the mixed workload is open loop only")
    if not args.start_at:
        args.start_at = time.time() + 0.2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:  # the bench extra's uvloop: the same client at a fraction of asyncio's CPU
        import uvloop
    except ImportError:
        result, acked = asyncio.run(main_async(args))
    else:
        result, acked = uvloop.run(main_async(args))
    result["event_loop"] = "uvloop" if "uvloop" in sys.modules else "asyncio"
    Path(args.acked).write_text(acked)
    Path(args.out).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
