"""Schemathesis against a live gateway on real Redis, generated from the OpenAPI document.

Every operation of gateway/static/openapi.json is called with examples from
the document, boundary values (the coverage phase), random valid and invalid
requests, and chains of calls (the stateful phase). The run fails on any 5xx,
any status or body the document does not describe, a wrong Content-Type, and
on network errors: a gateway that crashed or dropped a connection shows as
one. Afterwards the gateway must still be ready, and nothing it logged may be
an error of its own.

`make test` runs a bounded run: `FUZZ_MAX_EXAMPLES` (10) examples per operation
and phase, well under two minutes. `make fuzz` runs a deep one. `FUZZ_SEED`
replays a run (schemathesis prints the seed it used).

The gateway runs in sandbox mode (any pixel code accepted, so generated bodies
get past authentication into the parsers and Redis; the pass-through relays
nothing, and answers generated paths 400 or 401), with an admin token (the
debug endpoint is reachable), one allowed origin (so both CORS answers occur),
and a rate limit out of the fuzzer's way (tests/test_limits.py floods it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp.http_exceptions import HttpProcessingError

from tests.support import GatewayFactory

ST = Path(sys.executable).with_name("st")
DOCUMENT = json.loads((Path(__file__).parent.parent / "gateway/static/openapi.json").read_text())
DOCUMENT_OPERATIONS = [
    (path, method) for path, item in DOCUMENT["paths"].items() for method in item
    if method in ("get", "put", "post", "delete", "options", "head", "patch", "trace")
]  # fmt: skip
ADMIN_TOKEN = "fuzz-admin-token"
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "10"))
# The bounded run takes about 30 s on a shared machine; a deep run as long as it needs.
TIMEOUT = 180 if MAX_EXAMPLES <= 10 else 6 * 3600
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "response_schema_conformance",
    "content_type_conformance",
)


def st_command(url: str) -> list[str]:
    """`st run` against the gateway at `url`, from the document it serves."""
    command = [
        str(ST),
        "run",
        f"{url}/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--workers",
        "1",  # more workers race inside schemathesis and gain nothing here
        "--request-timeout",
        "10",
        "--request-retries",
        "0",  # a dropped connection is a failure, not something to retry
        "--generation-database",
        "none",  # no .hypothesis directory: every run starts afresh
        "--header",
        f"Authorization: Bearer {ADMIN_TOKEN}",
        "--no-color",
    ]
    if os.environ.get("FUZZ_SEED"):
        command += ["--seed", os.environ["FUZZ_SEED"]]
    return command


def own_errors(records: list[logging.LogRecord]) -> list[str]:
    """Errors the gateway logged about itself (aiohttp's notes on malformed HTTP are not)."""
    found = []
    for record in records:
        if record.levelno < logging.ERROR:
            continue
        exc = record.exc_info[1] if record.exc_info else None
        if record.name == "aiohttp.server" and isinstance(exc, HttpProcessingError):
            continue  # the fuzzer's own garbage (a NUL in a header), answered 400
        found.append(f"{record.name}: {record.getMessage()} {exc!r}")
    return found


@pytest.mark.timeout(TIMEOUT)
async def test_the_gateway_holds_to_its_openapi_document_under_fuzzing(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert ST.exists(), f"schemathesis is not installed in {ST.parent} (pip install -e '.[dev]')"
    gateway = await make_gateway(
        pixels={},
        admin_token=ADMIN_TOKEN,
        allowed_origins=frozenset({"https://shop.example.com"}),
        pixel_rate_limit=100_000.0,
        pixel_rate_burst=100_000,
        body_timeout=5.0,
    )
    caplog.set_level(logging.WARNING)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(NO_PROXY="127.0.0.1,localhost", COLUMNS="120")
    proc = await asyncio.create_subprocess_exec(
        *st_command(gateway.url),
        cwd=tmp_path,  # no schemathesis.toml of anyone else's is picked up
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT - 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"schemathesis failed (exit {proc.returncode}):\n{text[-20000:]}"
    # Every operation of the document was exercised: none skipped, none errored.
    selected = re.search(r"Selected: (\d+)/(\d+)", text)
    tested = re.search(r"Tested: (\d+)", text)
    assert selected and tested, text[-5000:]
    assert selected[1] == selected[2] == tested[1], text[-5000:]
    assert int(tested[1]) >= len(DOCUMENT_OPERATIONS) - 1  # all but GET /openapi.json itself

    async with http.get(f"{gateway.url}/readyz") as resp:
        assert resp.status == 200, "the gateway is not ready after the run"
    # The pass-through's 400 and 401 were among the answers checked; in sandbox mode no
    # token is ours, so nothing was relayed.
    outcomes = "gateway_passthrough_requests_total"
    assert gateway.metric(outcomes, {"outcome": "refused_path"}) > 0
    assert gateway.metric(outcomes, {"outcome": "refused_token"}) > 0
    assert gateway.metric(outcomes, {"outcome": "relayed"}) == 0
    assert own_errors(caplog.records) == []
