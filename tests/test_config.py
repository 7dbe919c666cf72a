"""Configuration: defaults, overrides, and one clear error (exit 2) naming the bad key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from server.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from server.urls import mask_url
from tests.helpers import PYTHON, ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_shipped_config_equals_the_defaults() -> None:
    # config.toml documents every setting with its default: they must agree.
    assert load_config(DEFAULT_CONFIG_PATH, env={}) == Config()
    text = DEFAULT_CONFIG_PATH.read_text()
    cfg = Config()
    for section in (
        "server",
        "database",
        "redis",
        "embedded",
        "health",
        "users",
        "products",
        "ratelimit",
        "fetch",
        "streaming",
        "log",
        "metrics",
        "compression",
        "feed",
        "jobs",
        "smtp",
        "cache",
    ):
        assert f"[{section}]" in text
        for name in getattr(cfg, section).__dataclass_fields__:
            assert f"\n{name} = " in text, f"{section}.{name} is not documented in config.toml"


def test_environment_overrides() -> None:
    cfg = load_config(
        env={
            "DATABASE_URL": "postgresql://u:p@127.0.0.1/db",
            "REDIS_URL": "redis://127.0.0.1:6379/2",
            "HOTPATH_SERVER_PORT": "9001",
            "HOTPATH_SERVER_ACCESS_LOG": "true",
            "HOTPATH_DATABASE_COMMAND_TIMEOUT": "1.5",
            "HOTPATH_DATABASE_MAX_SIZE": "20",
        }
    )
    assert cfg.server.port == 9001
    assert cfg.server.access_log is True
    assert cfg.database.command_timeout == 1.5
    assert cfg.database.max_size == 20
    assert cfg.database.url == "postgresql://u:p@127.0.0.1/db"
    assert not cfg.embedded_mode


def test_cli_overrides_beat_environment() -> None:
    cfg = load_config(env={"HOTPATH_SERVER_PORT": "9001"}, overrides={"server": {"port": 9002}})
    assert cfg.server.port == 9002


@pytest.mark.parametrize(
    ("toml", "env", "key"),
    [
        ("[server]\nport = 70000\n", {}, "server.port"),
        ("[server]\nport = 0\n", {}, "server.port"),
        ('[server]\nport = "80"\n', {}, "server.port"),
        ("[server]\nprot = 80\n", {}, "server.prot"),
        ("[servre]\nport = 80\n", {}, "servre"),
        ("[server]\naccess_log = 1\n", {}, "server.access_log"),
        ("[log]\nlevel = 'LOUD'\n", {}, "log.level"),
        ("[database]\nmin_size = 5\nmax_size = 2\n", {}, "database.min_size"),
        ("[database]\nurl = 'mysql://x'\n[redis]\nurl = 'redis://x'\n", {}, "database.url"),
        ("", {"HOTPATH_SERVER_PORT": "eighty"}, "server.port"),
        ("", {"HOTPATH_SERVER_NOPE": "1"}, "server.nope"),
        ("", {"HOTPATH_NOPE_X": "1"}, "HOTPATH_NOPE_X"),
        ("", {"DATABASE_URL": "postgresql://x/y"}, "redis.url"),
        ("[server\n", {}, "config.toml"),
        ('[feed]\nprivate_channels = ["users", "secrets"]\n', {}, "feed.private_channels"),
        ("[auth]\nstream_token_ttl = 600\nstream_token_max_ttl = 60\n", {}, "auth.stream_token_ttl"),
        ('[ratelimit]\npolicies = { protected = "1/999999999999d" }\n', {}, "ratelimit.policies.protected"),
        ('[ratelimit]\ndefault = "2000000000/minute"\n', {}, "ratelimit.default"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, toml: str, env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, toml), env=env)
    assert key in str(info.value)


def test_float_accepts_integer_literal(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[database]\ncommand_timeout = 3\n"), env={})
    assert cfg.database.command_timeout == 3.0


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--port", "70000"], "server.port"),
        (["--port", "http"], "--port"),
        (["--config", "/nonexistent/hotpath.toml"], "--config"),
    ],
)
def test_run_py_exits_2_with_one_clear_line(args: list[str], key: str) -> None:
    proc = subprocess.run(
        [PYTHON, "run.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_mask_url_hides_passwords() -> None:
    assert mask_url("postgresql://app:s3cret@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert mask_url("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert mask_url("redis://cache:6379/0") == "redis://cache:6379/0"
