"""Kill trainer ranks for real (SIGKILL) at random instants; the resumed run must be bit-exact."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from conftest import record
from _support import (assert_matches_reference, finish, read_losses, reference_run, run_trainer,
                      trainer_log)
FAULT_POINTS = ["before-snapshot", "before-copy", "mid-copy", "before-seal", "after-seal",
                "mid-restore"]


def crash_loop(tmp_path: Path, daemon, world: int, steps: int, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    ref = reference_run(tmp_path / "ref", world, steps)
    out = tmp_path / "run"
    done_kills, incarnations = 0, 0
    while True:
        incarnations += 1
        assert incarnations < kills * 4, "training made no progress"
        status = daemon.status()
        job = next((j for j in status.jobs if j.job == "crashy"), None)
        restorable = job.restorable_step if job is not None and job.HasField("restorable_step") \
            else -1
        env: dict[str, str] = {}
        external = False
        if done_kills < kills:
            victim = rng.randrange(world)
            if rng.random() < 0.5:
                point = rng.choice(FAULT_POINTS)
                at = restorable if point == "mid-restore" else restorable + rng.randint(1, 3)
                if point == "mid-restore" and restorable < 0:
                    point, at = "mid-copy", 1
                env = {"SHARDGUARD_TEST_FAULT": f"{point}@{at}",
                       "SHARDGUARD_TEST_FAULT_RANK": str(victim)}
            else:
                external = True
        for stale in out.glob("pid.*"):
            stale.unlink()
        seen = len(read_losses(out, victim)) if external else 0
        proc = run_trainer(out, "crashy", daemon.socket, world, steps, env=env)
        if external:
            # SIGKILL a rank from outside at a random instant a few steps after it resumed.
            goal = restorable + rng.randint(1, 4)
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                rows = read_losses(out, victim)
                if len(rows) > seen and rows[-1][0] >= goal:
                    break
                time.sleep(0.002)
            time.sleep(rng.random() * 0.02)
            pid_file = out / f"pid.{victim}"
            if proc.poll() is None and pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        rc = finish(proc)
        if env or external:
            done_kills += 1 if rc != 0 else 0
        elif rc == 0:
            break
        else:
            pytest.fail(f"trainer failed without a fault: {trainer_log(out)}")
        if rc == 0 and done_kills >= kills:
            break
    assert done_kills >= kills
    for rank in range(world):
        assert {s for s, _ in read_losses(out, rank)} == {s for s, _ in read_losses(ref, rank)}, \
            f"rank {rank} trained other steps"
    assert_matches_reference(out, ref, world)


@pytest.mark.slow
def test_five_random_kills_resume_bit_exact(tmp_path: Path, daemon) -> None:
    crash_loop(tmp_path, daemon, world=2, steps=30, kills=5, seed=3)
    record("trainer SIGKILL (random instants and named points), 2 ranks", 5,
           "bit-exact resume, every loss and the final state")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_twenty_random_kills_resume_bit_exact(tmp_path: Path, daemon) -> None:
    crash_loop(tmp_path, daemon, world=2, steps=70, kills=20, seed=1)
    record("trainer SIGKILL (random instants and named points), 2 ranks", 20,
           "bit-exact resume, every loss and the final state")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_four_ranks_random_kills_resume_bit_exact(tmp_path: Path, daemon) -> None:
    crash_loop(tmp_path, daemon, world=4, steps=50, kills=10, seed=2)
    record("trainer SIGKILL (random instants and named points), 4 ranks", 10,
           "bit-exact resume, every loss and the final state")
