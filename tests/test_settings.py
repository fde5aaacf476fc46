"""Configuration: defaults from PRODUCT.md, one clear error per bad variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.settings import (
    DECLARED,
    GROUPS,
    Declared,
    Settings,
    StoreSettings,
    effective,
    markdown_table,
)

README = Path(__file__).resolve().parent.parent / "README.md"


def test_defaults_match_the_contract() -> None:
    s = Settings.from_env({})
    assert s.listen == "127.0.0.1:8080"
    assert s.redis_url is None
    assert s.sandbox
    assert s.merge_window == 300
    assert s.dedup_window == 172_800
    assert s.early_flush and s.legacy_aliases and s.passthrough
    assert s.max_event_age == 604_800
    assert s.upstream_url == "https://business-api.tiktok.com"


def test_parses_every_documented_variable() -> None:
    s = Settings.from_env(
        {
            "GATEWAY_LISTEN": "0.0.0.0:9000",
            "GATEWAY_REDIS_URL": "redis://redis:6379/0",
            "GATEWAY_PIXELS": "PIX1=tok1, PIX2=tok2",
            "GATEWAY_MERGE_WINDOW": "2.5",
            "GATEWAY_DEDUP_WINDOW": "60",
            "GATEWAY_EARLY_FLUSH": "0",
            "GATEWAY_TEST_EVENT_CODE": "TEST123",
            "GATEWAY_ALLOWED_ORIGINS": "https://shop.example.com,https://www.example.com/",
            "GATEWAY_TRUSTED_PROXIES": "10.0.0.0/8, ::1",
            "GATEWAY_ADMIN_TOKEN": "admin",
            "GATEWAY_MAX_EVENT_AGE": "3600",
            "GATEWAY_PHONE_REGION": "us",
            "GATEWAY_LEGACY_ALIASES": "false",
            "GATEWAY_PASSTHROUGH": "no",
            "GATEWAY_PASSTHROUGH_PATHS": "/open_api/v1.3/pixel/list/, /open_api/v1.3/offline",
            "OTHER": "ignored",
        }
    )
    assert (s.listen_host, s.listen_port) == ("0.0.0.0", 9000)
    assert dict(s.pixels) == {"PIX1": "tok1", "PIX2": "tok2"}
    assert not s.sandbox
    assert s.merge_window == 2.5 and s.dedup_window == 60
    assert not s.early_flush and not s.legacy_aliases and not s.passthrough
    assert s.passthrough_paths == ("/open_api/v1.3/pixel/list/", "/open_api/v1.3/offline")
    assert s.allowed_origins == {"https://shop.example.com", "https://www.example.com"}
    assert len(s.trusted_proxies) == 2
    assert s.phone_region == "US"
    assert s.test_event_code == "TEST123"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEWAY_LISTEN", "8080"),
        ("GATEWAY_LISTEN", "host:99999"),
        ("GATEWAY_REDIS_URL", "localhost:6379"),
        ("GATEWAY_PIXELS", "PIX1"),
        ("GATEWAY_PIXELS", "PIX-1=tok"),
        ("GATEWAY_MERGE_WINDOW", "five"),
        ("GATEWAY_MERGE_WINDOW", "-1"),
        ("GATEWAY_EARLY_FLUSH", "maybe"),
        ("GATEWAY_ALLOWED_ORIGINS", "shop.example.com"),
        ("GATEWAY_TRUSTED_PROXIES", "not-a-network"),
        ("GATEWAY_PHONE_REGION", "USA"),
        ("GATEWAY_UPSTREAM_URL", "ftp://x"),
        ("GATEWAY_FORWARD_BATCH_SIZE", "5000"),
        ("GATEWAY_PIXEL_RATE_LIMIT", "-1"),
        ("GATEWAY_PIXEL_RATE_LIMIT", "inf"),
        ("GATEWAY_PASSTHROUGH_PATHS", "/open_api/v1.3/pixel/,campaign"),
        ("GATEWAY_PASSTHROUGH_PATHS", "/admin/"),
        ("GATEWAY_PASSTHROUGH_PATHS", "/open_api"),
        ("GATEWAY_PASSTHROUGH_PATHS", "/open_api/v1.3/pixel/../campaign/"),
        ("GATEWAY_PASSTHROUGH_PATHS", "/open_api//v1.3/"),
        ("GATEWAY_PASSTHROUGH_PATHS", "/open_api/v1.3/%70ixel/"),
        ("GATEWAY_PASSTHROUGH_PATHS", "/open_api/v1.3/pixel/,"),
        ("GATEWAY_PASSTHROUGH_PATHS", "https://upstream.invalid/open_api/v1.3/"),
        ("GATEWAY_DEBUG_HISTORY", "-1"),
        ("GATEWAY_DEBUG_HISTORY", "1e5"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert info.value.variable == name
    assert str(info.value).startswith(name)


def test_passthrough_paths_default_to_what_an_events_client_calls() -> None:
    paths = Settings.from_env({}).passthrough_paths
    assert paths == ("/open_api/v1.2/pixel/", "/open_api/v1.3/pixel/", "/open_api/v1.3/offline/")
    everything = Settings.from_env({"GATEWAY_PASSTHROUGH_PATHS": "/open_api/"})
    assert everything.passthrough_paths == ("/open_api/",)  # the operator's explicit choice


def test_a_pixel_rate_limit_of_zero_is_no_limit() -> None:
    assert Settings.from_env({"GATEWAY_PIXEL_RATE_LIMIT": "0"}).pixel_rate_limit == 0


def test_dedup_window_shorter_than_merge_window_is_refused() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_DEDUP_WINDOW"):
        Settings.from_env({"GATEWAY_MERGE_WINDOW": "100", "GATEWAY_DEDUP_WINDOW": "10"})


@pytest.mark.parametrize("url", [None, "unix:///run/redis.sock"])
def test_cluster_needs_a_tcp_url(url: str | None) -> None:
    env = {"GATEWAY_REDIS_CLUSTER": "1"}
    if url:
        env["GATEWAY_REDIS_URL"] = url
    with pytest.raises(ConfigError, match=r"^GATEWAY_REDIS_CLUSTER"):
        Settings.from_env(env)
    ok = Settings.from_env({**env, "GATEWAY_REDIS_URL": "rediss://node-1:6380"})
    assert ok.redis_cluster


def test_toml_file_sets_the_same_names_and_environment_wins(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        'merge_window = 10\nGATEWAY_EARLY_FLUSH = false\n[pixels]\nPIX1 = "tok1"\n'
    )
    s = Settings.from_env({"GATEWAY_MERGE_WINDOW": "20"}, path)
    assert s.merge_window == 20
    assert not s.early_flush
    assert dict(s.pixels) == {"PIX1": "tok1"}


def test_unreadable_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("merge_window = [")
    with pytest.raises(ConfigError, match="GATEWAY_CONFIG"):
        Settings.from_env({}, path)


def test_wait_replicas_and_their_timeout() -> None:
    default = Settings.from_env({})
    assert (default.redis_wait_replicas, default.redis_wait_timeout) == (0, 1.0)
    s = Settings.from_env({"GATEWAY_REDIS_WAIT_REPLICAS": "2", "GATEWAY_REDIS_WAIT_TIMEOUT": "0.2"})
    assert (s.redis_wait_replicas, s.redis_wait_timeout) == (2, 0.2)
    for bad in ("-1", "one", "1.5"):
        with pytest.raises(ConfigError, match=r"^GATEWAY_REDIS_WAIT_REPLICAS"):
            Settings.from_env({"GATEWAY_REDIS_WAIT_REPLICAS": bad})
    # WAIT must give up before the connection does.
    with pytest.raises(ConfigError, match=r"^GATEWAY_REDIS_WAIT_TIMEOUT"):
        Settings.from_env({"GATEWAY_REDIS_WAIT_REPLICAS": "1", "GATEWAY_REDIS_WAIT_TIMEOUT": "5"})


def test_debug_history_is_a_number_of_entries_and_zero_turns_it_off() -> None:
    assert Settings.from_env({}).debug_history == 10_000
    assert Settings.from_env({"GATEWAY_DEBUG_HISTORY": "2000"}).debug_history == 2000
    assert Settings.from_env({"GATEWAY_DEBUG_HISTORY": "0"}).debug_history == 0


def test_a_retired_variable_is_named_with_what_replaced_it(tmp_path: Path) -> None:
    assert Settings.from_env({}).retired == ()
    [said] = Settings.from_env({"GATEWAY_TIMELINE_RETENTION": "3600"}).retired
    assert said.startswith("GATEWAY_TIMELINE_RETENTION is no longer used")
    assert "GATEWAY_DEBUG_HISTORY" in said
    config = tmp_path / "gateway.toml"
    config.write_text("timeline_retention = 0\n")
    assert len(Settings.from_env({}, config).retired) == 1


def test_the_readme_table_is_the_declarations() -> None:
    # Regenerate with: python -c "from gateway.settings import *; print(markdown_table())"
    readme = README.read_text()
    start = readme.index("| name | default | meaning |")
    assert readme[start : readme.index("\n\n", start) + 1] == markdown_table()


@pytest.mark.parametrize("declared", DECLARED, ids=lambda d: d.variable.name)
def test_each_declared_default_reads_back_from_what_the_readme_shows(declared: Declared) -> None:
    shown = declared.shown_default
    if declared.variable.unset is not None and not declared.default:
        assert shown == declared.variable.unset
        return
    # The README's default, set as the variable, gives the default.
    [text] = re.fullmatch(r"`(.*)`", shown).groups()  # type: ignore[union-attr]
    assert declared.value(Settings.from_env({declared.variable.name: text})) == declared.default
    assert declared.value(Settings()) == declared.default


def test_every_field_of_a_group_is_declared_once() -> None:
    names = [name for d in DECLARED for name in d.fields]
    assert len(names) == len(set(names))
    assert set(names) == {f for group in GROUPS for f in group.__dataclass_fields__}
    variables = [d.variable.name for d in DECLARED]
    assert len(variables) == len(set(variables))


def test_settings_are_every_group_so_a_component_takes_only_its_own() -> None:
    s = Settings.from_env({"GATEWAY_SHARDS": "4", "GATEWAY_MERGE_WINDOW": "7"})
    for group in GROUPS:
        assert isinstance(s, group)
    store = StoreSettings()
    assert (s.shards, s.merge_window, store.shards) == (4, 7.0, 16)


def test_an_unknown_variable_is_named_with_the_closest_known_one(tmp_path: Path) -> None:
    s = Settings.from_env({"GATEWAY_MERGE_WINDOWS": "10", "GATEWAY_QQQ": "1", "OTHER": "x"})
    assert s.unknown == (
        "GATEWAY_MERGE_WINDOWS is not a setting of the gateway and is ignored; "
        "did you mean GATEWAY_MERGE_WINDOW?",
        "GATEWAY_QQQ is not a setting of the gateway and is ignored",
    )
    assert s.merge_window == 300  # ignored, as before
    assert Settings.from_env({"GATEWAY_TIMELINE_RETENTION": "1"}).unknown == ()  # retired
    config = tmp_path / "gateway.toml"
    config.write_text("erly_flush = false\n")
    [said] = Settings.from_env({}, config).unknown
    assert said.startswith("GATEWAY_ERLY_FLUSH is not") and said.endswith("GATEWAY_EARLY_FLUSH?")


def test_the_effective_settings_mask_secrets() -> None:
    lines = effective(
        Settings.from_env(
            {
                "GATEWAY_PIXELS": "PIX1=secret-token-1,PIX2=secret-token-2",
                "GATEWAY_ADMIN_TOKEN": "secret-admin",
                "GATEWAY_REDIS_URL": "redis://user:secret-pw@redis:6379/0",
                "GATEWAY_LISTEN": "[::]:9000",
                "GATEWAY_MERGE_WINDOW": "2.5",
            }
        )
    )
    assert not [line for line in lines if "secret" in line]
    assert "GATEWAY_PIXELS=PIX1=***,PIX2=***" in lines
    assert "GATEWAY_ADMIN_TOKEN=***" in lines
    assert "GATEWAY_REDIS_URL=redis://user:***@redis:6379/0" in lines
    assert "GATEWAY_LISTEN=[::]:9000" in lines
    assert "GATEWAY_MERGE_WINDOW=2.5" in lines
    assert "GATEWAY_PHONE_REGION=  # unset" in lines
    assert len(lines) == len(DECLARED)
