"""The dependency rules of docs/design.md §2: client -> proto <- daemon; the daemon never imports
torch, the client, the flusher or the integrations (run-time module names included); inside the
daemon each layer imports only the layers below it, without cycles; the tier's flusher imports
only proto (and torch); proto imports nothing else of ours; no import cycle inside the client.

Run-time checks import the modules and look at what came with them; static checks read every
import statement of a folder, function-level ones included (what runs only in a subprocess,
or only on some path, shows there too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


def imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    return set(out.split())


def test_daemon_imports_neither_torch_nor_the_client() -> None:
    mods = imported_after("shardguard.daemon.service.server, shardguard.daemon.service.cli, "
                          "shardguard.daemon.service.cluster, shardguard.daemon.roles.rebuild")
    assert "torch" not in mods
    assert not any(m.startswith("shardguard.client") for m in mods)


def test_client_does_not_import_the_daemon() -> None:
    mods = imported_after("shardguard.client")
    assert not any(m.startswith("shardguard.daemon") for m in mods)


# ------------------------------------------------------------------ static imports

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"client": "shardguard.client", "daemon": "shardguard.daemon",
           "flusher": "shardguard.flusher", "proto": "shardguard.proto"}


def modules_of(folder: str) -> dict[str, Path]:
    """Every module under ``folder``, by its import name."""
    out = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts
                 if p != "__init__"]
        out[".".join([FOLDERS[folder], *parts])] = path
    return out


KNOWN = {name for folder in FOLDERS for name in modules_of(folder)}


def imports_of(name: str, path: Path) -> set[str]:
    """The shardguard modules ``name`` (at ``path``) imports anywhere in its code;
    ``from package import x`` counts as importing ``package.x`` when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in KNOWN else base)
    return {m for m in found if m == "shardguard" or m.startswith("shardguard.")}


def foreign_imports(folder: str, allowed: tuple[str, ...]) -> dict[str, set[str]]:
    """Per module of ``folder``, what of ours it imports outside ``allowed`` packages."""
    out = {}
    for name, path in modules_of(folder).items():
        bad = {m for m in imports_of(name, path)
               if not any(m == a or m.startswith(a + ".") for a in allowed)}
        if bad:
            out[name] = bad
    return out


def cycle_in(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (module -> modules it imports), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_no_client_module_imports_the_daemon() -> None:
    assert not foreign_imports("client", ("shardguard.client", "shardguard.proto",
                                          "shardguard.flusher"))


def test_the_flusher_imports_only_proto() -> None:
    assert not foreign_imports("flusher", ("shardguard.flusher", "shardguard.proto"))
    mods = imported_after("shardguard.flusher.write, shardguard.flusher.__main__")
    assert {m for m in mods if m.startswith("shardguard.")} <= {
        m for m in mods if m.startswith(("shardguard.proto", "shardguard.flusher"))}
    assert not any(m.startswith(("shardguard.client", "shardguard.daemon")) for m in mods)


def test_proto_imports_nothing_else_of_ours() -> None:
    assert not foreign_imports("proto", ("shardguard.proto",))
    mods = imported_after(", ".join(modules_of("proto")))
    assert not any(m.startswith("shardguard.") and not m.startswith("shardguard.proto")
                   for m in mods)


def test_no_import_cycle_in_the_client() -> None:
    graph = {name: {m for m in imports_of(name, path) if m.startswith("shardguard.client")}
             for name, path in modules_of("client").items()}
    assert cycle_in(graph) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


# ------------------------------------------------------------------ the daemon's layers

#: Lowest first: a module may import its own layer and those below (never above).
LAYERS = ("base", "coding", "storage", "transport", "roles", "service")


def layer_of(module: str) -> int:
    """The layer of a daemon module; the package, its ``errors`` re-export and
    ``__main__`` count as base and service."""
    parts = module.split(".")
    if len(parts) > 2 and parts[2] in LAYERS:
        return LAYERS.index(parts[2])
    return LAYERS.index("service") if parts[-1] == "__main__" else 0


def test_each_daemon_layer_imports_only_the_layers_below() -> None:
    wrong = {}
    for name, path in modules_of("daemon").items():
        mine = layer_of(name)
        up = {m for m in imports_of(name, path)
              if m.startswith("shardguard.daemon") and layer_of(m) > mine}
        if up:
            wrong[name] = up
    assert not wrong, wrong


def test_no_import_cycle_in_the_daemon() -> None:
    graph = {name: {m for m in imports_of(name, path) if m.startswith("shardguard.daemon")}
             for name, path in modules_of("daemon").items()}
    assert cycle_in(graph) == []


def test_the_daemon_never_names_the_client_torch_or_the_integrations() -> None:
    assert not foreign_imports("daemon", ("shardguard.daemon", "shardguard.proto"))
    banned = ("torch", "shardguard.client", "shardguard.integrations")
    for name, path in modules_of("daemon").items():
        tree = ast.parse(path.read_text(), str(path))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        # Run-time names too: a module the daemon starts by name (``python -m ...``).
        names |= {n.value for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str)
                  and n.value.startswith("shardguard.")}
        assert not {m for m in names if m.split(".")[0] == "torch"
                    or m.startswith(banned[1:])}, (name, names)
    # The daemon starts the tier's flusher by module name: the flusher, not the client.
    assert "shardguard.flusher" in (ROOT / "daemon" / "roles" / "tier_flush.py").read_text()
