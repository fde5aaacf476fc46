"""`tiktok-gateway` admin commands, run in-process against the test Redis and real gateways.

`main()` calls `asyncio.run`, so it runs in a worker thread while this test's
loop keeps serving the gateway and the TikTok stand-in. The environment is
what the CLI reads: it is set through `monkeypatch`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from gateway import __version__
from gateway.cli import main
from gateway.records import DeadLetter
from gateway.store import LAYOUT_KEY
from tests.helpers import post_server, server_event, wait_drained, wait_timeline
from tests.support import (
    PIXEL,
    PIXEL2,
    TOKEN,
    TOKEN2,
    Gateway,
    GatewayFactory,
    free_port,
    poll_until,
    sha256,
)
from tests.tiktok_stub import TikTokStub


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


Cli = Callable[..., Awaitable[Result]]


def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    redis_url: str,
    tmp_path: Path,
) -> Cli:
    """Run `main(argv)` with the environment a deployment beside `make_gateway`'s would have."""
    _clean_environment(monkeypatch)
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_url)
    monkeypatch.setenv("GATEWAY_DATA_DIR", str(tmp_path / "cli-data"))
    monkeypatch.setenv("GATEWAY_PIXELS", f"{PIXEL}={TOKEN},{PIXEL2}={TOKEN2}")
    # make_gateway's stores use 4 shards: a key's shard (and so its Redis keys) depends on it.
    monkeypatch.setenv("GATEWAY_SHARDS", "4")

    # main() points the root logger at stderr, as a process of its own should; here it
    # would also catch the in-test gateway's log lines. test_process.py covers logging.
    monkeypatch.setattr("gateway.cli.setup_logging", lambda *_args: None)

    async def run(*argv: str) -> Result:
        capsys.readouterr()
        code = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


async def wait_dead_letters(gateway: Gateway, n: int) -> None:
    """Until the gateway's Redis holds `n` dead letters, whatever is pending."""

    async def counted() -> bool:
        return (await gateway.store.counts())[1] == n

    await poll_until(counted, f"{n} dead letters")


async def make_dead_letters(
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    bad_ids: list[str],
) -> Gateway:
    """A gateway whose stand-in refused `bad_ids`; `good-1`, sent with them, was delivered."""
    gateway = await make_gateway(merge_window=0.2)
    tiktok.reject_event_ids = set(bad_ids)
    events = [server_event(event_id) for event_id in [*bad_ids, "good-1"]]
    answer = await post_server(http, gateway.url, events)
    assert answer["code"] == 0, answer
    [delivered] = await tiktok.wait_for_events(1)
    assert delivered["event_id"] == "good-1"
    await wait_dead_letters(gateway, len(bad_ids))
    return gateway


async def list_json(cli: Cli) -> list[dict[str, Any]]:
    """`dead-letters list --json`, parsed."""
    result = await cli("dead-letters", "list", "--json")
    assert result.code == 0, result
    return [orjson.loads(line) for line in result.out.splitlines()]


# -- start-up checks ---------------------------------------------------------------


def test_version() -> None:
    # argparse prints the version and exits before anything asynchronous happens.
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0


def test_version_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"tiktok-gateway {__version__}"


async def test_check_config_against_redis_says_ok(cli: Cli) -> None:
    result = await cli("check-config")
    assert result.code == 0, result
    assert (
        "configuration OK (2 pixel(s)); Redis reachable, shards=4 dedup_buckets=1024 "
        "store=log; scripts loaded" in result.out
    )
    assert result.err == ""


async def test_check_config_lists_the_effective_settings_secrets_masked(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "admin-secret")
    monkeypatch.setenv("GATEWAY_MERGE_WINDOWS", "10")  # a typo: ignored, but named
    result = await cli("check-config")
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert f"GATEWAY_PIXELS={PIXEL}=***,{PIXEL2}=***" in lines
    assert "GATEWAY_ADMIN_TOKEN=***" in lines
    assert "GATEWAY_SHARDS=4" in lines and "GATEWAY_MERGE_WINDOW=300" in lines
    assert not [line for line in lines if TOKEN in line or TOKEN2 in line or "secret" in line]
    [warning] = [r for r in caplog.records if "GATEWAY_MERGE_WINDOWS" in r.getMessage()]
    assert warning.levelname == "WARNING"
    assert warning.getMessage().endswith("did you mean GATEWAY_MERGE_WINDOW?")


async def test_check_config_records_no_layout_of_its_own(
    cli: Cli, redis_client: aioredis.Redis
) -> None:
    assert (await cli("check-config")).code == 0
    # Run with settings other than the gateways', it must not lock them out.
    assert await redis_client.get(LAYOUT_KEY) is None


async def test_check_config_refuses_a_redis_laid_out_for_other_shards(
    cli: Cli, make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make_gateway()  # 4 shards, as the CLI here: it records the layout
    assert (await cli("check-config")).code == 0
    monkeypatch.setenv("GATEWAY_SHARDS", "8")
    result = await cli("check-config")
    assert result.code == 2, result
    [line] = result.err_lines
    assert line.startswith(
        "tiktok-gateway: configuration error: GATEWAY_SHARDS / GATEWAY_DEDUP_BUCKETS: this Redis "
        "holds state laid out with shards=4 dedup_buckets=1024 store=log, this instance has "
        "shards=8 dedup_buckets=1024 store=log; "
    )
    assert "delete the key tkgw:layout" in line


async def test_check_config_in_sandbox_mode(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_PIXELS")
    result = await cli("check-config")
    assert result.code == 0, result
    assert "configuration OK (sandbox)" in result.out


async def test_check_config_with_redis_away_fails_with_one_line(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_REDIS_URL", f"redis://127.0.0.1:{free_port()}")
    result = await cli("check-config")
    assert result.code == 1, result
    assert result.out == ""
    [line] = result.err_lines
    assert line.startswith("tiktok-gateway: Redis unavailable")


async def test_check_config_without_a_url_runs_its_own_redis_and_stops_it(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data_dir = tmp_path / "embedded"
    monkeypatch.delenv("GATEWAY_REDIS_URL")
    monkeypatch.setenv("GATEWAY_DATA_DIR", str(data_dir))
    result = await cli("check-config")
    assert result.code == 0, result
    assert "Redis reachable, shards=4 dedup_buckets=1024 store=log; scripts loaded" in result.out
    # Shut down cleanly: redis-server removes its pid file on SHUTDOWN.
    assert any(p.name.startswith("appendonly") for p in data_dir.iterdir())  # 6.2: a file, 7: a dir
    assert not (data_dir / "redis.pid").exists()


async def test_check_config_with_a_file_as_data_dir_names_it(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    monkeypatch.delenv("GATEWAY_REDIS_URL")
    monkeypatch.setenv("GATEWAY_DATA_DIR", str(not_a_dir))
    result = await cli("check-config")
    assert result.code == 2, result
    assert result.err_lines == [
        f"tiktok-gateway: configuration error: GATEWAY_DATA_DIR: cannot use {not_a_dir}: "
        "File exists"
    ]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GATEWAY_MERGE_WINDOW", "abc"),
        ("GATEWAY_LISTEN", "8080"),
        ("GATEWAY_PIXELS", "CPIXEL-without-token"),
        ("GATEWAY_REDIS_URL", "http://localhost:6379"),
        ("GATEWAY_EARLY_FLUSH", "maybe"),
    ],
)
def test_bad_variable_exits_2_with_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
) -> None:
    _clean_environment(monkeypatch)
    monkeypatch.setenv(variable, value)
    # Settings fail before anything asynchronous starts: no thread needed.
    code = main(["check-config"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith(f"tiktok-gateway: configuration error: {variable}: ")


def test_unreadable_config_file_names_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _clean_environment(monkeypatch)
    code = main(["--config", str(tmp_path / "missing.toml"), "check-config"])
    _out, err = capsys.readouterr()
    assert code == 2
    [line] = err.splitlines()
    assert "GATEWAY_CONFIG" in line and "missing.toml" in line


def test_dead_letters_needs_an_action(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["dead-letters"])
    assert exc.value.code == 2
    assert "list" in capsys.readouterr().err


# -- inspect -------------------------------------------------------------------------


async def test_inspect_prints_the_keys_state_as_json(
    cli: Cli, make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=0.2)
    answer = await post_server(http, gateway.url, [server_event("cli-inspect-1")])
    assert answer["code"] == 0, answer
    await tiktok.wait_for_events(1)
    await wait_drained(gateway)

    result = await cli("inspect", PIXEL, "cli-inspect-1", "Purchase")

    assert result.code == 0, result
    state = orjson.loads(result.out)
    assert state["key"] == {"pixel_code": PIXEL, "event_id": "cli-inspect-1", "event": "Purchase"}
    assert state["state"] == "sent"
    assert state["sources"] == ["server"]
    assert state["copies_received"] == 1
    assert state["tiktok_request_id"].startswith("stub")
    assert state["forwarded_at"] >= state["first_seen"]
    assert [e["outcome"] for e in state["timeline"]] == ["new", "forwarded"]
    assert "user.email" in state["timeline"][0]["fields"]
    # Field names only: neither the address nor its hash is shown.
    assert "jane.doe" not in result.out
    assert sha256("jane.doe@example.com") not in result.out


async def test_inspect_finds_a_key_by_its_legacy_event_name(
    cli: Cli, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    # A long window: the key is still open for merging when inspected.
    gateway = await make_gateway(merge_window=30.0)
    await post_server(http, gateway.url, [server_event("cli-inspect-2", "CompletePayment")])
    await wait_timeline(gateway, "cli-inspect-2", ["new"])  # read by the shard's owner

    result = await cli("inspect", PIXEL, "cli-inspect-2", "Purchase")

    assert result.code == 0, result
    state = orjson.loads(result.out)
    assert state["state"] == "open"
    assert state["due"] > state["first_seen"]


async def test_inspect_of_an_unknown_key_says_so_and_exits_1(cli: Cli) -> None:
    result = await cli("inspect", PIXEL, "never-sent", "Purchase")
    assert result.code == 1
    assert result.out.startswith("no such key")


# -- dead letters ----------------------------------------------------------------------


async def test_dead_letters_list_without_any(cli: Cli) -> None:
    result = await cli("dead-letters", "list")
    assert result.code == 0, result
    assert result.out.strip() == "no dead letters"
    result = await cli("dead-letters", "list", "--json")
    assert result.code == 0, result
    assert result.out == ""


async def test_dead_letters_list_is_a_readable_table(
    cli: Cli, make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    await make_dead_letters(make_gateway, tiktok, http, ["bad-1"])

    result = await cli("dead-letters", "list")

    assert result.code == 0, result
    header, row, footer = result.out.splitlines()
    assert header.split() == ["ID", "PIXEL", "EVENT", "EVENT_ID", "REASON", "CODE", "MESSAGE"]
    entry_id, pixel, event, event_id, reason, code, *message = row.split()
    shard, _, stream_id = entry_id.partition(":")  # SHARD:ID: stream ids repeat across shards
    assert shard.isdigit() and stream_id.count("-") == 1
    assert (pixel, event, event_id) == (PIXEL, "Purchase", "bad-1")
    assert (reason, code) == ("rejected", "40002")
    assert " ".join(message) == "data.0.event_id: Invalid value"
    # The columns line up under their headings.
    assert row.index(PIXEL) == header.index("PIXEL")
    assert row.index("bad-1") == header.index("EVENT_ID")
    assert footer == "1 dead letter(s)"


async def test_dead_letters_list_json_is_one_object_per_line(
    cli: Cli, make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    await make_dead_letters(make_gateway, tiktok, http, ["bad-1", "bad-2"])

    letters = await list_json(cli)

    assert sorted(dl["event"]["event_id"] for dl in letters) == ["bad-1", "bad-2"]
    for dl in letters:
        assert dl["id"] and dl["member"] == f"{PIXEL}:Purchase:{dl['event']['event_id']}"
        assert dl["pixel_code"] == PIXEL
        assert dl["reason"] == "rejected"
        assert dl["code"] == 40002
        assert dl["message"].endswith("event_id: Invalid value")
        assert dl["event"]["user"]["email"] == sha256("jane.doe@example.com")


async def test_replay_by_id_sends_the_event_again(
    cli: Cli, make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_dead_letters(make_gateway, tiktok, http, ["bad-1"])
    [letter] = await list_json(cli)
    tiktok.reject_event_ids.clear()

    result = await cli("dead-letters", "replay", letter["id"])

    assert result.code == 0, result
    assert result.out.startswith("replayed 1 dead letter(s)")
    events = await tiktok.wait_for_events(2)
    assert [e["event_id"] for e in events] == ["good-1", "bad-1"]
    assert events[1]["user"]["email"] == sha256("jane.doe@example.com")
    await wait_drained(gateway)
    assert await gateway.store.counts() == (0, 0)
    listing = await cli("dead-letters", "list")
    assert listing.out.strip() == "no dead letters"

    # The entry is gone: replaying it again sends nothing and says so.
    again = await cli("dead-letters", "replay", letter["id"])
    assert again.code == 1
    assert again.err_lines == [f"no dead letter {letter['id']}"]
    assert again.out.startswith("replayed 0 dead letter(s)")
    state = orjson.loads((await cli("inspect", PIXEL, "bad-1", "Purchase")).out)
    assert state["state"] == "sent"
    assert len(tiktok.events()) == 2


async def test_replay_without_ids_or_all_exits_2(
    cli: Cli, make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_dead_letters(make_gateway, tiktok, http, ["bad-1"])

    result = await cli("dead-letters", "replay")

    assert result.code == 2
    assert result.err_lines == ["name dead-letter ids to replay, or --all"]
    assert (await gateway.store.counts())[1] == 1


async def test_replay_all(
    cli: Cli, make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_dead_letters(make_gateway, tiktok, http, ["bad-1", "bad-2"])
    tiktok.reject_event_ids.clear()

    result = await cli("dead-letters", "replay", "--all")

    assert result.code == 0, result
    assert result.out.startswith("replayed 2 dead letter(s)")
    events = await tiktok.wait_for_events(3)
    assert sorted(e["event_id"] for e in events) == ["bad-1", "bad-2", "good-1"]
    await wait_drained(gateway)
    assert await gateway.store.counts() == (0, 0)


async def test_replay_of_an_unknown_id_is_reported(
    cli: Cli, make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_dead_letters(make_gateway, tiktok, http, ["bad-1"])
    [letter] = await list_json(cli)
    tiktok.reject_event_ids.clear()

    result = await cli("dead-letters", "replay", "1-0")

    assert result.code == 1
    assert result.err_lines == ["no dead letter 1-0"]
    assert result.out.startswith("replayed 0 dead letter(s)")
    assert (await gateway.store.counts())[1] == 1

    # Known and unknown together: the known one is replayed, the unknown still reported.
    result = await cli("dead-letters", "replay", letter["id"], "1-0")
    assert result.code == 1
    assert result.err_lines == ["no dead letter 1-0"]
    assert result.out.startswith("replayed 1 dead letter(s)")
    events = await tiktok.wait_for_events(2)
    assert events[-1]["event_id"] == "bad-1"


async def test_a_stream_id_two_shards_share_is_refused_and_shard_id_replays_one(
    cli: Cli, make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gateway = await make_gateway(forward=False)
    store = gateway.store
    for shard, event_id in ((1, "twin-a"), (2, "twin-b")):
        letter = DeadLetter(
            reason="rejected", code=40002, message="bad", pixel_code=PIXEL,
            event_source="web", test_event_code=None, first_seen=1.0, dead_lettered_at=2.0,
            attempts=1, dedup=True, event={"event": "Purchase", "event_id": event_id},
        )  # fmt: skip
        member = store.member_of(PIXEL, event_id, "Purchase")
        fields = {"member": member, "letter": letter.to_json()}
        await redis_client.xadd(store.dead_key(shard), fields, id="1700000000000-0")

    result = await cli("dead-letters", "replay", "1700000000000-0")
    assert result.code == 1
    assert result.err_lines == [
        "dead letter 1700000000000-0 is in several shards (1:1700000000000-0, "
        "2:1700000000000-0): name one"
    ]
    assert result.out.startswith("replayed 0 dead letter(s)")

    result = await cli("dead-letters", "replay", "2:1700000000000-0")
    assert result.code == 0, result
    [left] = await store.dead_letters()
    assert left.letter.event["event_id"] == "twin-a"
