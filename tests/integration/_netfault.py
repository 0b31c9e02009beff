"""Network faults made by the kernel for the tests: nftables rules in a table of the test's own.

Everything here needs root and the ``nft`` command (the Makefile's ``tools``
target installs nftables where it can); :func:`firewall_or_skip` skips the test
with the reason otherwise. Rules match only the ports a test names, on the
loopback traffic of this machine, so that tests running side by side do not
touch each other; the table is deleted however the test ends.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

import pytest


def _nft(*args: str) -> None:
    subprocess.run(["nft", *args], check=True, capture_output=True, text=True, timeout=30)


class Firewall:
    """One nftables table with an input chain whose rules drop what a test says."""

    def __init__(self) -> None:
        self.table = f"sgtest_{os.getpid()}_{secrets.token_hex(3)}"
        _nft("add", "table", "inet", self.table)
        _nft("add", "chain", "inet", self.table, "input",
             "{ type filter hook input priority -10 ; policy accept ; }")

    def block_port(self, port: int) -> None:
        """Drop every TCP packet to ``port``: a firewalled port (no RST: connections hang)."""
        _nft("add", "rule", "inet", self.table, "input", "tcp", "dport", str(port), "drop")

    def drop_share(self, port: int, percent: int) -> None:
        """Drop ``percent`` % of the TCP packets to ``port`` at random (a lossy link)."""
        _nft("add", "rule", "inet", self.table, "input", "tcp", "dport", str(port),
             "numgen", "random", "mod", "100", "<", str(percent), "drop")

    def clear(self) -> None:
        _nft("flush", "chain", "inet", self.table, "input")

    def close(self) -> None:
        try:
            _nft("delete", "table", "inet", self.table)
        except subprocess.CalledProcessError:
            pass


def firewall_or_skip() -> Firewall:
    if os.geteuid() != 0:
        pytest.skip("needs root to change nftables rules")
    if shutil.which("nft") is None:
        pytest.skip("needs the nft command (Debian package nftables; `make tools` installs it)")
    try:
        return Firewall()
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"this kernel refuses nftables rules here: {exc.stderr.strip()}")


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])
