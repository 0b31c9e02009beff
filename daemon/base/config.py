"""Daemon configuration: one frozen dataclass, from TOML, then ``SHARDGUARD_*`` env, then flags.

Times end in ``_s``, sizes in ``_bytes`` (accepting "8GiB", "512MiB", "1e9").
``deploy/shardguard.toml`` is the annotated sample of every option.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import psutil

from shardguard.daemon.base import cgroup
from shardguard.daemon.errors import ConfigError
from shardguard.daemon.base.logs import FORMATS as LOG_FORMATS
from shardguard.proto.paths import default_socket_path

ENV_PREFIX = "SHARDGUARD_"
CONFIG_ENV = "SHARDGUARD_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/shardguard/shardguard.toml"
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,48}$")
_SIZE_RE = re.compile(r"^\s*([0-9.eE+]+)\s*([KMGTP]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}


def parse_bytes(value: Any) -> int:
    """``"8GiB"`` -> 8589934592; ints pass through."""
    if isinstance(value, bool):
        raise ConfigError(f"not a size: {value!r}")
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    try:
        if not m:
            raise ValueError(value)
        return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
    except (ValueError, OverflowError):
        raise ConfigError(f"not a size: {value!r} (examples: 8GiB, 512MiB, 1000000)") from None


@dataclass(frozen=True)
class Config:
    """Every daemon option; see deploy/shardguard.toml for the annotated sample."""

    socket: str = field(default_factory=default_socket_path)
    shm_dir: str = "/dev/shm"
    shm_prefix: str = "shardguard"
    # 0 means: memory_budget_fraction of the memory available at start: what psutil
    # reports, or what the daemon's cgroup still allows when that is less.
    memory_budget_bytes: int = 0
    memory_budget_fraction: float = 0.5
    grpc_workers: int = 16
    verify_on_restore: bool = True
    log_level: str = "INFO"
    # Peers (erasure coding across nodes).
    host: str = "127.0.0.1"
    control_port: int = 0
    data_port: int = 0
    group_size: int = 4
    parity: int = 1
    # How a job's nodes form groups (daemon/coding/placement.py): "contiguous" (nodes
    # i*g .. i*g+g-1), or "stride" (node i joins group i mod groups: with the node list
    # ordered by rack or switch, a lost rack costs every group only a few nodes).
    placement: str = "contiguous"
    peer_timeout_s: float = 10.0
    # A per-job secret shared by the job's daemons: every peer call must carry an
    # HMAC made with it. Empty: peers are not authenticated (one trusted host).
    secret_file: str = ""
    # TLS for the peer gRPC service (mutual: each daemon presents its certificate and
    # checks the other's against the CA). All three or none; none: plain TCP.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    # Observability. One log line per record: "text" (logfmt) or "json".
    log_format: str = "text"
    # Prometheus /metrics over HTTP: -1 off, 0 a free port (logged at start), else this port.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = -1
    # Seconds between health checks of the peer nodes (the peers_up gauge); 0: none.
    peer_probe_interval_s: float = 5.0
    # Persistent tier (daemon/roles/tier.py): restorable steps written in DCP's format to this
    # directory (a shared file system for multi-node jobs). Empty: off.
    tier_dir: str = ""
    # Flush the first restorable step of every window of this many steps.
    tier_every: int = 100
    # Flushed steps kept per job (the newest ones; older ones are deleted).
    tier_keep: int = 2
    # A flush not complete on every node after this long is given up.
    tier_timeout_s: float = 600.0
    # Save the newest step on the way down: when a job's trainers are gone (they crashed, or
    # the job ended) or the daemon is stopped, its newest restorable step is flushed too,
    # whatever tier_every says; a stopping daemon waits up to tier_exit_wait_s for it.
    tier_on_exit: bool = True
    tier_exit_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.shm_prefix, str) or not _NAME_RE.fullmatch(self.shm_prefix):
            raise ConfigError(f"shm_prefix {self.shm_prefix!r} must match {_NAME_RE.pattern}")
        if not os.path.isabs(self.shm_dir):
            raise ConfigError(f"shm_dir {self.shm_dir!r} must be an absolute path")
        if self.memory_budget_bytes < 0:
            raise ConfigError("memory_budget_bytes must be >= 0")
        if not 0.0 < self.memory_budget_fraction <= 1.0:
            raise ConfigError("memory_budget_fraction must be in (0, 1]")
        if self.grpc_workers < 2:
            raise ConfigError("grpc_workers must be >= 2")
        if not 0 <= self.control_port < 65536 or not 0 <= self.data_port < 65536:
            raise ConfigError("ports must be in [0, 65535]")
        if self.parity < 1 or self.group_size < self.parity + 1:
            raise ConfigError("need parity >= 1 and group_size >= parity + 1")
        if self.placement not in ("contiguous", "stride"):
            raise ConfigError(f"placement must be contiguous or stride, got {self.placement!r}")
        if self.peer_timeout_s <= 0:
            raise ConfigError("peer_timeout_s must be > 0")
        if self.secret_file and not os.path.isabs(self.secret_file):
            raise ConfigError(f"secret_file {self.secret_file!r} must be an absolute path")
        tls = {"tls_cert_file": self.tls_cert_file, "tls_key_file": self.tls_key_file,
               "tls_ca_file": self.tls_ca_file}
        if any(tls.values()) and not all(tls.values()):
            raise ConfigError(f"TLS needs all of {sorted(tls)}; missing: "
                              f"{sorted(k for k, v in tls.items() if not v)}")
        for key, value in tls.items():
            if value and not os.path.isabs(value):
                raise ConfigError(f"{key} {value!r} must be an absolute path")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format {self.log_format!r} must be one of {LOG_FORMATS}")
        if not -1 <= self.metrics_port < 65536:
            raise ConfigError("metrics_port must be -1 (off), 0 (a free port) or a port")
        if not 0 <= self.peer_probe_interval_s < float("inf"):
            raise ConfigError("peer_probe_interval_s must be >= 0 (0: no probe)")
        if self.tier_dir and not os.path.isabs(self.tier_dir):
            raise ConfigError(f"tier_dir {self.tier_dir!r} must be an absolute path "
                              "(or empty: no persistent tier)")
        if self.tier_every < 1:
            raise ConfigError("tier_every must be >= 1 (steps between flushed steps)")
        if self.tier_keep < 1:
            raise ConfigError("tier_keep must be >= 1 (flushed steps kept per job)")
        if not 0 < self.tier_timeout_s < float("inf"):
            raise ConfigError("tier_timeout_s must be > 0")

    def budget_bytes(self) -> int:
        return self.budget()[0]

    def budget(self) -> tuple[int, str]:
        """The memory budget in force, and which limit it comes from (for the log).

        The configured one, else ``memory_budget_fraction`` of the memory the daemon may
        take: the host's available memory, or the room its cgroup leaves (limit minus
        usage, the tightest of its cgroup and their ancestors, v2 or v1) when less.
        """
        if self.memory_budget_bytes:
            return self.memory_budget_bytes, "memory_budget_bytes"
        f = self.memory_budget_fraction
        host = psutil.virtual_memory().available
        room = cgroup.memory_room()
        if room is not None and room.room_bytes < host:
            return int(room.room_bytes * f), (
                f"{f} of what cgroup {room.where} leaves ({room.room_bytes} bytes: limit "
                f"{room.limit_bytes}, in use {room.used_bytes}; the host has {host} available)")
        also = "" if room is None else f"; cgroup {room.where} leaves {room.room_bytes}"
        return int(host * f), f"{f} of the host's available memory ({host} bytes{also})"


def _coerce(name: str, kind: Any, value: Any) -> Any:
    try:
        if name.endswith("_bytes"):
            return parse_bytes(value)
        if kind in (bool, "bool"):
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind in (int, "int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind in (float, "float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option {name}: cannot use {value!r}") from None


def load(path: str | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Config:
    """Build the config: defaults < TOML file < ``SHARDGUARD_*`` env < ``overrides`` (flags).

    ``path`` None means ``$SHARDGUARD_CONFIG`` or /etc/shardguard/shardguard.toml if present.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = path or env.get(CONFIG_ENV)
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    known = {f.name: f.type for f in fields(Config)}
    if path:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        table = doc.get("daemon", doc)
        if "daemon" in doc and len(doc) > 1:
            stray = sorted(k for k in doc if k != "daemon")
            raise ConfigError(f"{path}: options {stray} lie outside the [daemon] table")
        for key, value in table.items():
            if key not in known:
                raise ConfigError(f"{path}: unknown option {key!r}")
            values[key] = _coerce(key, known[key], value)
    for key, kind in known.items():
        env_key = ENV_PREFIX + key.upper()
        if env_key in env:
            values[key] = _coerce(key, kind, env[env_key])
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in known:
            raise ConfigError(f"unknown option {key!r}")
        values[key] = _coerce(key, known[key], value)
    return Config(**values)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--option-name`` flag per config field."""
    for f in fields(Config):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            metavar=f.name.upper(), help=f"override {f.name}")


def flag_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(ns, f.name, None) for f in fields(Config)}


def replace(config: Config, **changes: Any) -> Config:
    return dataclasses.replace(config, **changes)
