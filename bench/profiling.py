"""Where the gateway's CPU goes: py-spy's samples, summed by function and by area.

py-spy samples the running process from outside (`--nonblocking`: without
pausing it) and writes collapsed stacks, one `frame;frame;... count` a line.
A frame's *self* share counts the samples where it was the innermost frame;
its *total* share the samples where it was anywhere on the stack. Samples
of a thread waiting in epoll are not taken, so the shares are of busy time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

RATE = 200  # samples per second
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::\d+)?\)$")
# Packages under site-packages, by their top directory; anything else there by its own name.
PACKAGES = {"redis": "redis-py", "hiredis": "redis-py", "multidict": "aiohttp",
            "yarl": "aiohttp", "propcache": "aiohttp", "aiohttp": "aiohttp"}


def py_spy() -> str | None:
    """The py-spy executable beside this Python, or on the PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes] | None:
    """Start sampling `pid` for `seconds` into `output` (collapsed stacks)."""
    exe = py_spy()
    if exe is None:
        return None
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
         "--rate", str(RATE), "--format", "raw", "--nonblocking", "--output", str(output)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


ENTRY_FILES = ("gateway/cli.py", "gateway/server.py")  # on every stack: no information


def _frame(raw: str) -> tuple[str, str]:
    """(function, file) of one frame; py-spy already shortens the file's path."""
    match = _FRAME.match(raw.strip())
    if not match:
        return raw.strip(), ""
    return match["func"], match["file"]


def area(path: str) -> str:
    """What a file belongs to: a gateway module, a package, asyncio, or a stdlib module."""
    if path.startswith("gateway/"):
        # A package (gateway/store/) counts as one area, as its single module did.
        return "gateway." + Path(path).parts[1].removesuffix(".py")
    if path == "bench/probe.py":
        return "bench.probe (the round-trip counter)"
    if path.startswith("bench/"):
        return "bench." + Path(path).stem
    if "/" in path:
        top = path.split("/", 1)[0]
        if top != "asyncio" and top in sys.stdlib_module_names:
            return f"stdlib {top}"
        return PACKAGES.get(top, top)
    return f"stdlib {Path(path).stem}" if path else "other"


def summarise(path: Path, seconds: float, top: int = 15) -> dict[str, Any]:
    """Self share by function and by area, total share of the gateway's functions, and how
    busy the process was (samples over what a fully busy process would give)."""
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        frames = [f for f in frames if f[1]]  # drop the process/thread pseudo-frames
        if not frames:
            continue
        samples += count
        func, file = frames[-1]
        self_time[f"{func} ({file})"] += count
        areas[area(file)] += count
        # Total time of the gateway's own functions (not its entry point), once per stack.
        for name in {f"{fn} ({fl})" for fn, fl in frames
                     if fl.startswith("gateway/") and fl not in ENTRY_FILES}:
            total_time[name] += count

    def shares(counter: Counter[str], n: int) -> list[list[Any]]:
        return [[name, round(100 * c / samples, 1)] for name, c in counter.most_common(n)]

    return {
        "samples": samples,
        "busy_percent": round(100 * samples / (RATE * seconds), 1) if seconds else None,
        "self_by_area": shares(areas, 20) if samples else [],
        "self_by_function": shares(self_time, top) if samples else [],
        "total_by_function": shares(total_time, top + 5) if samples else [],
    }
