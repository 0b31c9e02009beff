"""Helpers the integration tests share: run the trainer, read its output, compare states."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import numpy as np
import psutil
import torch

from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.paths import grpc_target

TRAINER = str(Path(__file__).with_name("trainer.py"))


@contextlib.contextmanager
def environ(changes: Mapping[str, str | None]) -> Iterator[None]:
    """``os.environ`` with ``changes`` (None: unset) inside the block, as it was after it:
    daemons started inside (``cluster.up``/``start``) inherit them, nothing else does."""
    old = {k: os.environ.get(k) for k in changes}
    try:
        for k, v in changes.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def run_trainer(out: Path, job: str, socket: str, world: int, steps: int, *,
                no_snapshot: bool = False, env: dict[str, str] | None = None,
                expect_restore_error: bool = False,
                step_sleep: float = 0.0) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, TRAINER, "--out", str(out), "--job", job, "--world", str(world),
           "--steps", str(steps), "--socket", socket]
    if no_snapshot:
        cmd.append("--no-snapshot")
    if expect_restore_error:
        cmd.append("--expect-restore-error")
    if step_sleep:
        cmd += ["--step-sleep", str(step_sleep)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "trainer.log", "ab") as log:
        return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, start_new_session=True,
                                stdout=log, stderr=subprocess.STDOUT)


def unreachable_for_others() -> list[str]:
    """Directories on the way to this code that another user cannot traverse (a process
    that runs as another user imports from them, lazily too)."""
    import shardguard.proto

    bad = []
    for start in (Path(shardguard.proto.__file__).resolve(), Path(sys.prefix).resolve()):
        for d in start.parents:
            if not os.stat(d).st_mode & 0o001:
                bad.append(str(d))
    return bad


# Runs a module or code with another interpreter's stdlib but this environment's packages:
# argv = [BOOT, site-packages, "-m" | "-c", module or code, args...].
_BOOT = ("import runpy, site, sys\n"
         "site.addsitedir(sys.argv[1])\n"
         "mode, what = sys.argv[2], sys.argv[3]\n"
         "sys.argv = [what, *sys.argv[4:]]\n"
         "if mode == '-m':\n"
         "    runpy.run_module(what, run_name='__main__', alter_sys=True)\n"
         "else:\n"
         "    exec(compile(what, '<string>', 'exec'), {'__name__': '__main__'})\n")


def python_for_others() -> list[str] | None:
    """How another user runs Python with this environment's packages (the command, to be
    followed by ``-m module`` or ``-c code`` and arguments); None when they cannot.

    This interpreter if they can reach it; else, when it lies under a directory they
    cannot enter (a pyenv build under /root), a system Python of the same version,
    without its own site-packages (``-S``), with this environment's added.
    """
    if unreachable_for_others():
        return None
    exe = Path(os.path.realpath(sys.executable))
    if not any(not os.stat(d).st_mode & 0o001 for d in [*exe.parents,
                                                        *Path(sys.base_prefix).parents]):
        return [sys.executable]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    other = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if other is None or any(not os.stat(d).st_mode & 0o001
                            for d in Path(os.path.realpath(other)).parents):
        return None
    return [other, "-S", "-c", _BOOT, sysconfig.get_paths()["purelib"]]


def trainer_log(out: Path) -> str:
    return (out / "trainer.log").read_text(errors="replace")[-3000:]


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc``'s process group and every descendant: torchrun starts its workers in
    sessions of their own, so killing the launcher's group alone would orphan a hung worker."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def finish(proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        proc.wait(10)
        raise
    # A rank killed mid-collective can leave its peers behind; reap the whole group.
    _kill_tree(proc)
    return proc.returncode


def read_losses(out: Path, rank: int) -> list[tuple[int, str]]:
    path = out / f"losses.{rank}"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:  # the last line of a killed rank may be torn
            rows.append((int(parts[0]), parts[1]))
    return rows


def assert_same_state(a: object, b: object, path: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b), path
        else:
            assert a == b, path




def status_of_socket(socket: str) -> pb.StatusReply:
    with grpc.insecure_channel(grpc_target(socket)) as ch:
        return pb_grpc.AgentStub(ch).Status(pb.StatusRequest(), timeout=10)


def restored_steps(out: Path, world: int) -> set[str]:
    """The step each rank's last incarnation restored (as the trainer wrote it)."""
    return {(out / f"restored.{r}").read_text().split()[-1] for r in range(world)}


def reference_run(out: Path, world: int, steps: int, timeout: float = 120) -> Path:
    """The uninterrupted run, without snapshots, that a faulted run must equal; returns ``out``."""
    proc = run_trainer(out, "ref", "/nonexistent", world, steps, no_snapshot=True)
    assert finish(proc, timeout=timeout) == 0, trainer_log(out)
    return out


def assert_matches_reference(out: Path, ref: Path, world: int) -> None:
    """Every loss the run computed (every incarnation) and its final state equal the reference's."""
    for rank in range(world):
        want = dict(read_losses(ref, rank))
        got = read_losses(out, rank)
        assert got, f"rank {rank} trained nothing"
        for step, loss in got:
            assert loss == want[step], f"rank {rank} step {step}: {loss} != {want[step]}"
        a = torch.load(ref / f"final.{rank}.pt", weights_only=False)
        b = torch.load(out / f"final.{rank}.pt", weights_only=False)
        assert_same_state(a, b)
