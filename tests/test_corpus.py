"""Real clients' bodies through a running gateway: what reaches TikTok, field by field.

Each file of tests/corpus/ (its README says where each shape is documented) holds a
body as one client sends it to one of the five paths, and the Events API 2.0 request
TikTok should get for it. The gateway runs on real Redis, forwards to the TikTok
stand-in, and every forwarded event must equal the expected one: hashed values
unchanged, plain ones normalised and hashed, everything else as sent. The field
warnings each body should raise are counted exactly, and no others.

Placeholders keep the files readable and their times fresh: "@pixel" is the test
pixel; "@now" (Unix seconds), "@now_ms", "@now_str", "@now_iso" and "@now_adobe" are
one moment in the forms clients send; {"@sha256": "text"} is the SHA-256 of "text".
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.field_warnings import FIELD_WARNINGS
from tests.support import PIXEL, TOKEN, GatewayFactory, sha256
from tests.tiktok_stub import TikTokStub

CORPUS = Path(__file__).parent / "corpus"
CASES = sorted(CORPUS.glob("*.json"))
BODIES = {path.stem: path.read_bytes() for path in CASES}  # read once, not in the event loop
PATHS = {
    "/open_api/v1.3/event/track/",
    "/open_api/v1.2/pixel/track/",
    "/open_api/v1.3/pixel/track/",
    "/open_api/v1.2/pixel/batch/",
    "/open_api/v1.3/pixel/batch/",
}
TOP_LEVEL = ("event_source", "event_source_id", "test_event_code")


def placeholders(now: int) -> dict[str, Any]:
    moment = datetime.fromtimestamp(now, UTC)
    return {
        "@pixel": PIXEL,
        "@now": now,
        "@now_ms": now * 1000 + 123,
        "@now_str": str(now),
        "@now_iso": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "@now_adobe": moment.strftime("%Y-%m-%dT%H:%M:%S:123+0000"),  # Adobe's own form
    }


def resolve(value: Any, values: dict[str, Any]) -> Any:
    """The value with every placeholder replaced."""
    if isinstance(value, dict):
        if value.keys() == {"@sha256"}:
            return sha256(value["@sha256"])
        return {key: resolve(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve(item, values) for item in value]
    if isinstance(value, str) and value in values:
        return values[value]
    return value


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Every field where `actual` is not `expected`, by its dotted path."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = []
        for key in sorted(expected.keys() | actual.keys()):
            where = f"{path}.{key}" if path else key
            if key not in actual:
                found.append(f"{where}: missing, expected {expected[key]!r}")
            elif key not in expected:
                found.append(f"{where}: not expected, got {actual[key]!r}")
            else:
                found.extend(differences(expected[key], actual[key], where))
        return found
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [d for i, (e, a) in enumerate(zip(expected, actual, strict=True))
                for d in differences(e, a, f"{path}.{i}")]  # fmt: skip
    # 46 and 46.0 are one JSON number; a bool is not a number here.
    same_type = isinstance(expected, bool) == isinstance(actual, bool)
    if same_type and expected == actual:
        return []
    return [f"{path}: {actual!r}, expected {expected!r}"]


def test_the_corpus_covers_every_path_and_shape() -> None:
    cases = [orjson.loads(path.read_bytes()) for path in CASES]
    assert {case["path"] for case in cases} == PATHS
    text = b"".join(path.read_bytes() for path in CASES).decode()
    for field in ('"callback"', '"test_event_code"', '"partner_name"', '"first_name"',
                  '"last_name"', '"zip_code"', '"city"', '"state"', '"country"', '"socks"',
                  '"dress"', '"phone_number"'):  # fmt: skip
        assert field in text, f"no corpus body carries {field}"
    readme = (CORPUS / "README.md").read_text()
    for path in CASES:
        assert f"`{path.name}`" in readme, f"tests/corpus/README.md: {path.name}"


@pytest.mark.parametrize("name", sorted(BODIES))
async def test_a_client_body_reaches_tiktok_as_documented(
    name: str,
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
) -> None:
    values = placeholders(int(time.time()) - 60)
    case = resolve(orjson.loads(BODIES[name]), values)
    gateway = await make_gateway(merge_window=0.2)

    async with http.post(
        gateway.url + case["path"], json=case["body"], headers={"Access-Token": TOKEN}
    ) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["code"] == 0, answer

    expected = case["forwarded"]
    events = await tiktok.wait_for_events(len(expected["data"]))
    for request in tiktok.track_requests():
        top = {key: request.body.get(key) for key in TOP_LEVEL}
        assert top == {key: expected.get(key) for key in TOP_LEVEL}
        assert request.headers["Access-Token"] == TOKEN
    by_id = {event["event_id"]: event for event in events}
    assert len(by_id) == len(events) == len(expected["data"]), events
    found = [
        f"{item['event_id']}: {difference}"
        for item in expected["data"]
        for difference in differences(item, by_id.get(item["event_id"]))
    ]
    assert not found, "\n".join(found)

    counts = {(w["field"], w["reason"]): w["count"] for w in case["warnings"]}
    assert counts.keys() <= {(w.field, w.reason) for w in FIELD_WARNINGS}
    seen = {
        (w.field, w.reason): gateway.metric(
            "gateway_field_warnings_total", {"pixel": PIXEL, "field": w.field, "reason": w.reason}
        )
        for w in FIELD_WARNINGS
    }
    assert {key: n for key, n in seen.items() if n} == counts
