"""The dependency rule of DESIGN.md §2: client -> proto <- daemon; the daemon never imports torch."""

from __future__ import annotations

import subprocess
import sys


def imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    return set(out.split())


def test_daemon_imports_neither_torch_nor_the_client() -> None:
    mods = imported_after("shardguard.daemon.service.server, shardguard.daemon.cli, "
                          "shardguard.daemon.cluster, shardguard.daemon.roles.rebuild")
    assert "torch" not in mods
    assert not any(m.startswith("shardguard.client") for m in mods)


def test_client_does_not_import_the_daemon() -> None:
    mods = imported_after("shardguard.client")
    assert not any(m.startswith("shardguard.daemon") for m in mods)
