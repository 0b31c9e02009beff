"""Daemon configuration: defaults, TOML < env < flags, sizes, validation, the deploy sample."""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest

from shardguard.daemon.base import config
from shardguard.daemon.base.cgroup import CgroupRoom
from shardguard.daemon.base.config import Config, ConfigError, load, parse_bytes
from shardguard.proto.paths import default_socket_path

SAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "shardguard.toml"


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Whatever /etc/shardguard holds on this machine must not leak into the tests."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))


def toml(tmp_path: Path, text: str, name: str = "sg.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------
# defaults and precedence
# --------------------------------------------------------------------------


def test_defaults() -> None:
    c = load(env={})
    assert c == Config()
    assert c.socket == default_socket_path()
    assert (c.shm_dir, c.shm_prefix) == ("/dev/shm", "shardguard")
    assert (c.memory_budget_bytes, c.memory_budget_fraction) == (0, 0.5)
    assert (c.grpc_workers, c.verify_on_restore, c.log_level) == (16, True, "INFO")
    assert (c.host, c.control_port, c.data_port) == ("127.0.0.1", 0, 0)
    assert (c.group_size, c.parity, c.peer_timeout_s) == (4, 1, 10.0)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().parity = 2  # type: ignore[misc]


def test_toml_then_env_then_overrides(tmp_path: Path) -> None:
    path = toml(tmp_path, 'group_size = 6\nparity = 2\ngrpc_workers = 8\nlog_level = "DEBUG"\n')
    env = {"SHARDGUARD_PARITY": "3", "SHARDGUARD_GRPC_WORKERS": "12"}
    c = load(path, env=env, overrides={"grpc_workers": 20, "log_level": None})
    assert c.group_size == 6  # TOML over the default
    assert c.parity == 3  # env over TOML
    assert c.grpc_workers == 20  # flag over env
    assert c.log_level == "DEBUG"  # an unset flag (None) overrides nothing
    assert c.shm_dir == "/dev/shm"  # untouched


def test_daemon_table_or_top_level(tmp_path: Path) -> None:
    top = load(toml(tmp_path, "parity = 2\ngroup_size = 5\n", "top.toml"), env={})
    table = load(toml(tmp_path, "[daemon]\nparity = 2\ngroup_size = 5\n", "table.toml"), env={})
    assert top == table == dataclasses.replace(Config(), parity=2, group_size=5)


def test_config_file_from_the_environment(tmp_path: Path) -> None:
    named = toml(tmp_path, "parity = 2\ngroup_size = 3\n", "named.toml")
    assert load(env={config.CONFIG_ENV: named}).parity == 2
    explicit = toml(tmp_path, "parity = 3\ngroup_size = 4\n", "explicit.toml")
    assert load(explicit, env={config.CONFIG_ENV: named}).parity == 3


def test_system_config_is_read_when_present(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH",
                        toml(tmp_path, "grpc_workers = 3\n", "etc.toml"))
    assert load(env={}).grpc_workers == 3


def test_flags_reach_the_config(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    config.add_flags(parser)
    ns = parser.parse_args(["--group-size", "6", "--memory-budget-bytes", "8GiB",
                            "--verify-on-restore", "no"])
    c = load(toml(tmp_path, "parity = 2\n"), env={"SHARDGUARD_GROUP_SIZE": "5"},
             overrides=config.flag_overrides(ns))
    assert (c.group_size, c.parity, c.memory_budget_bytes, c.verify_on_restore) == \
        (6, 2, 8 << 30, False)
    unset = vars(parser.parse_args([]))
    assert all(unset[f.name] is None for f in dataclasses.fields(Config))


def test_other_shardguard_variables_are_not_options() -> None:
    # Trainers and tests share the SHARDGUARD_ namespace; the daemon must not trip over it.
    env = {"SHARDGUARD_JOB": "j", "SHARDGUARD_TEST_FAULT": "mid-copy@3", "SHARDGUARD_NOPE": "1"}
    assert load(env=env) == Config()


def test_socket_from_the_environment() -> None:
    assert load(env={"SHARDGUARD_SOCKET": "/tmp/x/agent.sock"}).socket == "/tmp/x/agent.sock"


# --------------------------------------------------------------------------
# coercion
# --------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("8GiB", 8 << 30), ("512MiB", 512 << 20), ("64KiB", 64 << 10), ("2TiB", 2 << 40),
    ("1PiB", 1 << 50), ("1e9", 10**9), ("1E9", 10**9), ("8GB", 8 * 10**9), ("3kB", 3000),
    ("1.5GiB", 3 << 29), (" 2 kib ", 2048), ("8gib", 8 << 30), ("4096", 4096), ("4096B", 4096),
    ("1e+3", 1000), (4096, 4096), (0, 0),
])
def test_sizes(text: Any, want: int) -> None:
    assert parse_bytes(text) == want
    assert load(env={}, overrides={"memory_budget_bytes": text}).memory_budget_bytes == want


def test_sizes_in_toml(tmp_path: Path) -> None:
    path = toml(tmp_path, 'memory_budget_bytes = "8GiB"\n')
    assert load(path, env={}).memory_budget_bytes == 8 << 30
    assert load(toml(tmp_path, "memory_budget_bytes = 1e9\n", "f.toml"),
                env={}).memory_budget_bytes == 10**9
    assert load(env={"SHARDGUARD_MEMORY_BUDGET_BYTES": "512MiB"}).memory_budget_bytes == 512 << 20


BAD_SIZES = ["eight", "8XB", "8 GiBs", "GiB", "", "-1", "-1GiB", "8 G iB", "0x100", "null", True,
             False, [8]]


@pytest.mark.parametrize("text", BAD_SIZES)
def test_bad_size(text: Any) -> None:
    with pytest.raises(ConfigError, match="memory_budget_bytes"):
        load(env={}, overrides={"memory_budget_bytes": text})


@pytest.mark.parametrize("text", [t for t in BAD_SIZES if isinstance(t, (str, bool))])
def test_parse_bytes_refuses(text: Any) -> None:
    with pytest.raises(ConfigError, match="not a size"):
        parse_bytes(text)


def test_overflowing_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        load(env={}, overrides={"memory_budget_bytes": "1e999"})


@pytest.mark.parametrize("text", ["...", "e", "+", "1e999"])
def test_parse_bytes_raises_only_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_bytes(text)


@pytest.mark.parametrize("text, want", [
    ("1", True), ("true", True), ("YES", True), (" on ", True),
    ("0", False), ("False", False), ("no", False), ("off", False),
])
def test_booleans_from_the_environment(text: str, want: bool) -> None:
    assert load(env={"SHARDGUARD_VERIFY_ON_RESTORE": text}).verify_on_restore is want


@pytest.mark.parametrize("key, value", [
    ("SHARDGUARD_VERIFY_ON_RESTORE", "maybe"), ("SHARDGUARD_VERIFY_ON_RESTORE", ""),
    ("SHARDGUARD_GRPC_WORKERS", "many"), ("SHARDGUARD_GRPC_WORKERS", "4.5"),
    ("SHARDGUARD_PEER_TIMEOUT_S", "soon"), ("SHARDGUARD_CONTROL_PORT", ""),
])
def test_bad_value_from_the_environment_names_the_option(key: str, value: str) -> None:
    option = key.removeprefix("SHARDGUARD_").lower()
    with pytest.raises(ConfigError, match=f"option {option}: cannot use"):
        load(env={key: value})


def test_toml_types_are_coerced(tmp_path: Path) -> None:
    c = load(toml(tmp_path, 'peer_timeout_s = 5\ngrpc_workers = "8"\nverify_on_restore = "off"\n'),
             env={})
    assert c.peer_timeout_s == 5.0 and type(c.peer_timeout_s) is float
    assert c.grpc_workers == 8 and c.verify_on_restore is False


def test_fractional_value_for_an_integer_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="grpc_workers"):
        load(toml(tmp_path, "grpc_workers = 4.5\n"), env={})


# --------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------


def test_unknown_option_in_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown option 'group_sise'"):
        load(toml(tmp_path, "[daemon]\ngroup_sise = 6\n"), env={})


def test_unknown_table_in_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown option 'peers'"):
        load(toml(tmp_path, "[peers]\nhost = 'a'\n"), env={})


def test_options_outside_the_daemon_table_are_not_dropped(tmp_path: Path) -> None:
    path = toml(tmp_path, "grpc_workers = 4\n[daemon]\nparity = 2\ngroup_size = 4\n")
    with pytest.raises(ConfigError, match="grpc_workers"):
        load(path, env={})


def test_unknown_override() -> None:
    with pytest.raises(ConfigError, match="unknown option 'bogus'"):
        load(env={}, overrides={"bogus": 1})


def test_unreadable_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load(toml(tmp_path, "parity = = 2\n"), env={})
    with pytest.raises(ConfigError, match="cannot read config"):
        load(str(tmp_path / "missing.toml"), env={})


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"shm_prefix": ""}, "shm_prefix"),
    ({"shm_prefix": "has space"}, "shm_prefix"),
    ({"shm_prefix": "a/b"}, "shm_prefix"),
    ({"shm_prefix": "dot.ted"}, "shm_prefix"),  # '.' separates prefix, job and rank
    ({"shm_prefix": "../x"}, "shm_prefix"),
    ({"shm_prefix": "x" * 49}, "shm_prefix"),
    ({"shm_dir": "dev/shm"}, "shm_dir .* absolute"),
    ({"shm_dir": ""}, "shm_dir .* absolute"),
    ({"memory_budget_bytes": -1}, "memory_budget_bytes"),
    ({"memory_budget_fraction": 0.0}, "memory_budget_fraction"),
    ({"memory_budget_fraction": 1.01}, "memory_budget_fraction"),
    ({"memory_budget_fraction": -0.5}, "memory_budget_fraction"),
    ({"memory_budget_fraction": float("nan")}, "memory_budget_fraction"),
    ({"grpc_workers": 1}, "grpc_workers"),
    ({"control_port": 65536}, "ports"),
    ({"data_port": -1}, "ports"),
    ({"parity": 0}, "parity"),
    ({"parity": 2, "group_size": 2}, "group_size >= parity \\+ 1"),
    ({"parity": 1, "group_size": 1}, "group_size >= parity \\+ 1"),
    ({"peer_timeout_s": 0.0}, "peer_timeout_s"),
    ({"peer_timeout_s": -1.0}, "peer_timeout_s"),
])
def test_validation(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(**changes)
    with pytest.raises(ConfigError, match=message):
        load(env={}, overrides=changes)


@pytest.mark.parametrize("changes", [
    {"shm_prefix": "x" * 48}, {"shm_prefix": "shardguard-t_01"}, {"shm_dir": "/tmp/x"},
    {"memory_budget_fraction": 1.0}, {"grpc_workers": 2}, {"control_port": 65535},
    {"parity": 2, "group_size": 3}, {"parity": 3, "group_size": 10},
])
def test_validation_boundaries_pass(changes: dict) -> None:
    assert load(env={}, overrides=changes) == dataclasses.replace(Config(), **changes)


def test_config_errors_are_value_errors() -> None:
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------
# the memory budget in force
# --------------------------------------------------------------------------


@pytest.fixture
def host_memory(monkeypatch: pytest.MonkeyPatch) -> Callable[[CgroupRoom | None], None]:
    """10 GB available on the host; the daemon's cgroup as the test says (None: no limit)."""
    monkeypatch.setattr(config.psutil, "virtual_memory",
                        lambda: SimpleNamespace(available=10_000_000_000, total=16 << 30))

    def cgroup_room(room: CgroupRoom | None) -> None:
        monkeypatch.setattr(config.cgroup, "memory_room", lambda: room)

    cgroup_room(None)
    return cgroup_room


def test_budget_is_a_fraction_of_available_memory(host_memory) -> None:
    assert Config().budget_bytes() == 5_000_000_000
    assert Config(memory_budget_fraction=0.25).budget_bytes() == 2_500_000_000
    assert Config(memory_budget_fraction=1.0).budget_bytes() == 10_000_000_000
    assert Config().budget()[1] == "0.5 of the host's available memory (10000000000 bytes)"


def test_budget_fits_the_cgroup_when_it_leaves_less(host_memory) -> None:
    """Issue 15, item 6: inside a 320 MiB cgroup, half the host's memory got the daemon
    OOM-killed; the budget is a fraction of what the cgroup leaves."""
    host_memory(CgroupRoom("/sys/fs/cgroup/job", 320 << 20, 64 << 20))
    budget, why = Config().budget()
    assert budget == (256 << 20) // 2
    assert why.startswith("0.5 of what cgroup /sys/fs/cgroup/job leaves (268435456 bytes: "
                          "limit 335544320, in use 67108864; the host has 10000000000")
    host_memory(CgroupRoom("/sys/fs/cgroup/big", 64 << 30, 0))  # the host is tighter
    budget, why = Config().budget()
    assert budget == 5_000_000_000 and "cgroup /sys/fs/cgroup/big leaves" in why


def test_explicit_budget_wins(host_memory) -> None:
    host_memory(CgroupRoom("/sys/fs/cgroup/job", 320 << 20, 0))
    assert Config(memory_budget_bytes=1 << 30, memory_budget_fraction=0.1).budget_bytes() == 1 << 30


def test_replace_validates_again() -> None:
    c = config.replace(Config(), parity=2, group_size=3)
    assert (c.parity, c.group_size) == (2, 3)
    with pytest.raises(ConfigError):
        config.replace(c, group_size=2)


# --------------------------------------------------------------------------
# the annotated sample in deploy/
# --------------------------------------------------------------------------


def test_sample_config_holds_the_defaults() -> None:
    with open(SAMPLE, "rb") as fh:
        table = tomllib.load(fh)["daemon"]
    assert table, "the sample sets no option"
    got, defaults = load(str(SAMPLE), env={}), Config()
    for key in table:
        assert getattr(got, key) == getattr(defaults, key), f"sample {key} is not the default"
    assert got == defaults


def test_sample_config_documents_every_option() -> None:
    text = SAMPLE.read_text()
    for f in dataclasses.fields(Config):
        # Set, or shown commented out where the default is computed (the socket).
        assert re.search(rf"^#? ?{f.name} = ", text, re.MULTILINE), f"sample lacks {f.name}"
