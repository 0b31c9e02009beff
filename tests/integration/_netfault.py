"""Network faults made by the kernel for the tests: nftables rules in a table of the test's own,
and, on an isolated cluster (``cluster.up(..., isolate=True)``), a node's link cut, made lossy
or slow.

Everything here needs root and the ``nft`` command (the Makefile's ``tools``
target installs nftables and iproute2 where it can); :func:`firewall_or_skip`
and :func:`isolated_or_skip` skip the test with the reason otherwise. On the
host, rules match only the ports a test names, on the loopback traffic of this
machine, so that tests running side by side do not touch each other; on an
isolated cluster every rule and qdisc lives in the cluster's own namespaces
(never on the host's ``lo``). Tables and qdiscs go however the test ends.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

import pytest

from shardguard.daemon.service import cluster


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)


class Firewall:
    """One nftables table whose rules drop what a test says, in network namespace
    ``netns`` (an isolated node) or else the host's."""

    def __init__(self, netns: str | None = None) -> None:
        self._in_ns = ("ip", "netns", "exec", netns) if netns else ()
        self.table = f"sgtest_{os.getpid()}_{secrets.token_hex(3)}"
        self._chains: list[str] = []
        self._nft("add", "table", "inet", self.table)
        self._chain("input")

    def _chain(self, hook: str) -> None:
        """The table's chain on ``hook`` (made on first use: the host gets no chain it
        does not need)."""
        if hook not in self._chains:
            self._nft("add", "chain", "inet", self.table, hook,
                      f"{{ type filter hook {hook} priority -10 ; policy accept ; }}")
            self._chains.append(hook)

    def _nft(self, *args: str) -> None:
        _run(*self._in_ns, "nft", *args)

    def block_port(self, port: int) -> None:
        """Drop every TCP packet to ``port``: a firewalled port (no RST: connections hang)."""
        self._nft("add", "rule", "inet", self.table, "input", "tcp", "dport", str(port), "drop")

    def drop_share(self, port: int, percent: int) -> None:
        """Drop ``percent`` % of the TCP packets to ``port`` at random (a lossy link)."""
        self._nft("add", "rule", "inet", self.table, "input", "tcp", "dport", str(port),
                  "numgen", "random", "mod", "100", "<", str(percent), "drop")

    def drop_share_of_all(self, percent: int) -> None:
        """Drop ``percent`` % of every packet in and out at random (a lossy link: meant for
        an isolated node's namespace, where all traffic is the node's)."""
        for chain in ("input", "output"):
            self._chain(chain)
            self._nft("add", "rule", "inet", self.table, chain, "meta", "iifname", "!=", "lo",
                      "meta", "oifname", "!=", "lo", "numgen", "random", "mod", "100", "<",
                      str(percent), "drop")

    def clear(self) -> None:
        for chain in self._chains:
            self._nft("flush", "chain", "inet", self.table, chain)

    def close(self) -> None:
        try:
            self._nft("delete", "table", "inet", self.table)
        except subprocess.CalledProcessError:
            pass  # its namespace, and the table with it, is gone already


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


def isolated_or_skip() -> None:
    """Skip unless this machine can run an isolated cluster and change its nodes' links."""
    why = cluster.isolation_unavailable()
    if why is not None:
        pytest.skip(f"isolated nodes: {why}")
    for tool, package in (("nft", "nftables"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            pytest.skip(f"needs the {tool} command (Debian package {package}; `make tools` "
                        "installs it)")


class NodeLink:
    """What the kernel does to one isolated node's network: its link cut, one of its ports
    firewalled, a share of its packets lost, its bandwidth limited; :meth:`heal` undoes
    whatever was done. Acts only inside the cluster's namespaces."""

    def __init__(self, spec: cluster.ClusterSpec, node: int) -> None:
        self.spec, self.node = spec, node
        self._firewall: Firewall | None = None
        self._limited = False

    def partition(self) -> None:
        """The node's switch port down: every packet to or from it is lost, its carrier too."""
        self._switch("link", "set", self.spec.switch_port(self.node), "down")

    def cut_port(self, port: int) -> None:
        """Drop every TCP packet to the node's ``port`` (connections to it hang)."""
        self._firewall_of_node().block_port(port)

    def lose(self, percent: int) -> None:
        """Drop ``percent`` % of the node's packets each way, at random.

        nftables rather than tc netem: netem is a kernel option (CONFIG_NET_SCH_NETEM)
        that some kernels, this suite's CI among them, are built without; a random drop
        in the node's own namespace loses packets the same way for TCP.
        """
        self._firewall_of_node().drop_share_of_all(percent)

    def limit(self, mbit: int) -> None:
        """A token bucket of ``mbit`` Mbit/s on the node's link, each way."""
        tbf = ("root", "tbf", "rate", f"{mbit}mbit", "burst", "64kb", "latency", "200ms")
        self._limited = True
        _run("tc", "-n", self.spec.switch_netns, "qdisc", "replace", "dev",
             self.spec.switch_port(self.node), *tbf)
        _run("tc", "-n", self.spec.netns(self.node), "qdisc", "replace", "dev",
             cluster.NODE_IFACE, *tbf)

    def heal(self) -> None:
        self._switch("link", "set", self.spec.switch_port(self.node), "up")
        if self._firewall is not None:
            self._firewall.close()
            self._firewall = None
        if self._limited:
            self._limited = False
            for ns, dev in ((self.spec.switch_netns, self.spec.switch_port(self.node)),
                            (self.spec.netns(self.node), cluster.NODE_IFACE)):
                _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root")

    def _firewall_of_node(self) -> Firewall:
        if self._firewall is None:
            self._firewall = Firewall(self.spec.netns(self.node))
        return self._firewall

    def _switch(self, *args: str) -> None:
        _run("ip", "-n", self.spec.switch_netns, *args)
