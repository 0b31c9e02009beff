"""Real DistributedDataParallel (gloo, 3 and 4 ranks, launched by real torchrun) with a rank
SIGKILLed mid-run and every worker restarted by torchrun: with the wrapper's bucket order kept
in the snapshot (``sg.ddp_state`` / ``sg.load_ddp_state``) every loss and the final state equal
the uninterrupted run's; without it they do not (so the exact case is not exact by luck).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _support import assert_matches_reference, finish, read_losses

TRAINER = str(Path(__file__).with_name("ddp_trainer.py"))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
STEPS = 10
# torchrun launches and restarts take seconds each on a loaded 2-core machine.
RUN_TIMEOUT_S = 240


def torchrun(out: Path, world: int, *args: str, restarts: int = 0,
             env: dict[str, str] | None = None) -> int:
    """Run ddp_trainer.py under torchrun (standalone rendezvous on a free port); its exit code."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(world),
           "--max-restarts", str(restarts), "--monitor-interval", "0.2",
           TRAINER, "--out", str(out), "--steps", str(STEPS), *args]
    # torch 2.13: workers restarted by an agent whose rendezvous store they share fail to
    # connect gloo (issue 10, item 5); the agent then gives them their own store.
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env or {})}
    with open(out / "torchrun.log", "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return finish(proc, timeout=RUN_TIMEOUT_S)


def log_of(out: Path) -> str:
    return (out / "torchrun.log").read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """The uninterrupted run per (world, static_graph): plain DDP, no shardguard; run once."""
    runs: dict[tuple[int, bool], Path] = {}

    def get(world: int, static_graph: bool = False) -> Path:
        key = (world, static_graph)
        if key not in runs:
            out = tmp_path_factory.mktemp(f"ref-w{world}{'-static' if static_graph else ''}")
            args = ["--static-graph"] if static_graph else []
            assert torchrun(out, world, *args) == 0, log_of(out)
            # Several buckets, or the bucket order would not matter.
            assert len((out / "buckets.0").read_text().split(",")) >= 3, log_of(out)
            runs[key] = out
        return runs[key]

    return get


def killed_and_resumed(out: Path, daemon, world: int, kill_step: int, *args: str) -> None:
    """Rank 1 SIGKILLs itself as it reaches step ``kill_step``'s snapshot (step kill_step - 1
    is restorable: the trainer waits for each); torchrun restarts every worker, which resume."""
    fault = {"SHARDGUARD_TEST_FAULT": f"before-snapshot@{kill_step}",
             "SHARDGUARD_TEST_FAULT_RANK": "1"}
    rc = torchrun(out, world, "--socket", daemon.socket, "--job", f"ddp-{out.name}", *args,
                  restarts=1, env=fault)
    assert rc == 0, log_of(out)
    for rank in range(world):
        restored = [line.split()[0] for line in (out / f"restored.{rank}").read_text().splitlines()]
        assert restored == ["None", str(kill_step - 1)], (rank, restored, log_of(out))


def load_answers(out: Path, world: int) -> set[str]:
    """What load_ddp_state answered on each rank of the resumed incarnation."""
    return {(out / f"restored.{r}").read_text().splitlines()[-1].split()[1] for r in range(world)}


def difference(out: Path, ref: Path, world: int) -> str:
    """How the run's losses and final parameters differ from the reference's ('' if they don't)."""
    steps, worst = [], 0.0
    for rank in range(world):
        want = dict(read_losses(ref, rank))
        steps += [step for step, loss in read_losses(out, rank) if loss != want[step]]
        a = torch.load(ref / f"final.{rank}.pt", weights_only=True)["model"]
        b = torch.load(out / f"final.{rank}.pt", weights_only=True)["model"]
        worst = max([worst] + [(a[k] - b[k]).abs().max().item() for k in a])
    if not steps and worst == 0.0:
        return ""
    return f"losses differ at steps {sorted(set(steps))}, parameters by up to {worst:.3g}"


# Kill step 1 resumes from the snapshot of the wrapper's first iteration, taken before DDP
# rebuilt its buckets (ddp_state performs the pending rebuild); 6 from a later one.
@pytest.mark.parametrize("world", [3, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kill_step", [1, pytest.param(6, marks=pytest.mark.slow)])
def test_ddp_resume_with_bucket_order_is_bit_exact(tmp_path: Path, daemon, reference,
                                                   world: int, kill_step: int) -> None:
    ref = reference(world)
    out = tmp_path / "run"
    killed_and_resumed(out, daemon, world, kill_step, "--ddp-state")
    assert load_answers(out, world) == {"True"}
    for rank in range(world):
        assert {s for s, _ in read_losses(out, rank)} == set(range(STEPS))
    assert_matches_reference(out, ref, world)


# The control: the same kill and resume without the bucket order. With this model, these
# seeds and kill step 1 the resumed run differs at both world sizes; were it equal, the
# exact test above would prove nothing (so world 3 runs with it in the default suite).
@pytest.mark.parametrize("world", [3, pytest.param(4, marks=pytest.mark.slow)])
def test_ddp_resume_without_bucket_order_differs(tmp_path: Path, daemon, reference,
                                                 world: int) -> None:
    ref = reference(world)
    out = tmp_path / "run"
    killed_and_resumed(out, daemon, world, 1)
    how = difference(out, ref, world)
    print(f"world {world}, resumed without the bucket order: {how}")
    assert how


# static_graph reduces its first iteration late and rebuilds only after the second: a
# resume from any later snapshot is exact; from the first one load_ddp_state says it is not.
@pytest.mark.slow
@pytest.mark.parametrize("kill_step,exact", [(4, True), (1, False)])
def test_ddp_static_graph_resume(tmp_path: Path, daemon, reference, kill_step: int,
                                 exact: bool) -> None:
    world = 3
    ref = reference(world, static_graph=True)
    out = tmp_path / "run"
    killed_and_resumed(out, daemon, world, kill_step, "--ddp-state", "--static-graph")
    assert load_answers(out, world) == {str(exact)}
    if exact:
        assert_matches_reference(out, ref, world)
    else:
        assert "DdpResumeWarning" in log_of(out)
        assert difference(out, ref, world)

