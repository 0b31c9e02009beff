"""The persistent tier with real daemons, real trainers and real SIGKILLs: a whole-job loss
(every daemon and every rank killed, every arena wiped) resumes bit-exact from the
directory at its last flushed step; a crash mid-flush never leaves ``latest`` naming a
partial step; plain DCP reads what the tier wrote; and the tier is off by default.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

import shardguard.client as sg
from shardguard.client.errors import RestoreError
from shardguard.daemon.service import cluster
from shardguard.daemon.base.config import Config, ConfigError, replace
from shardguard.daemon.storage.store import Store
from shardguard.daemon.roles.tier import Tier
from shardguard.proto import tier as layout
from conftest import record
from _fuzz_support import restorable
from _support import restored_steps
from _support import (assert_matches_reference, assert_same_state, environ, finish, read_losses,
                      reference_run, run_trainer, trainer_log)
from test_cluster import local_cluster, sockets  # noqa: F401 (local_cluster: a fixture)
from test_node_api import assert_equal, rich_state
from trainer import build, state_of

# ------------------------------------------------------------------- helpers


def incomplete(root: str, job: str, step: int, world: int) -> str | None:
    """What step ``step`` of the tier lacks (None: it is complete and DCP can plan it)."""
    where = layout.step_dir(root, job, step)
    if not os.path.exists(os.path.join(where, layout.STEP_DOC)):
        return f"step {step}: no {layout.STEP_DOC}"
    for rank in range(world):
        mine = layout.rank_dir(where, rank)
        for name in (".metadata", "__0_0.distcp", layout.RANK_DOC):
            if not os.path.exists(os.path.join(mine, name)):
                return f"step {step} rank {rank}: no {name}"
        FileSystemReader(mine).read_metadata()
    return None


class PointerWatch(threading.Thread):
    """Checks, as often as it can, that ``latest`` only ever names a complete step."""

    def __init__(self, root: str, job: str, world: int) -> None:
        super().__init__(daemon=True)
        self.root, self.job, self.world = root, job, world
        self.seen: list[int] = []
        self.problems: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            step = layout.read_pointer(self.root, self.job)
            if step is not None and (not self.seen or self.seen[-1] != step):
                self.seen.append(step)
                problem = incomplete(self.root, self.job, step, self.world)
                if problem:
                    self.problems.append(problem)
            time.sleep(0.005)

    def __enter__(self) -> "PointerWatch":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join(5)


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def tidy(root: Path, job: str) -> bool:
    """No flush directory of a step up to ``latest`` is left, nor more than tier_keep steps."""
    last = pointer(root, job)
    steps = [layout.parse_step_name(n) for n in os.listdir(root / job)]
    wrecks = [s for s, token in filter(None, steps) if token is not None and s <= last]
    kept = [s for s, token in filter(None, steps) if token is None]
    return not wrecks and len(kept) <= Config().tier_keep


def flushing(root: Path, job: str) -> bool:
    """A flush newer than ``latest`` is being written."""
    last = pointer(root, job)
    steps = [layout.parse_step_name(n) for n in os.listdir(root / job)]
    return any(token is not None and s > last for s, token in filter(None, steps))


def pointer(root: Path, job: str) -> int:
    step = layout.read_pointer(str(root), job)
    return -1 if step is None else step


def kill_group(proc) -> None:  # type: ignore[no-untyped-def]
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def tier_flags(tier: Path, every: int) -> list[str]:
    return ["--tier-dir", str(tier), "--tier-every", str(every)]


# --------------------------------------------------------------------- tests


def test_the_tier_is_off_by_default(daemon_factory, tmp_path: Path) -> None:
    assert Config().tier_dir == ""
    d = daemon_factory()
    tier = tmp_path / "tier"
    out = tmp_path / "run"
    # The trainers know of a tier directory; the daemon has none configured.
    proc = run_trainer(out, "off", d.socket, 2, 8, env={layout.TIER_DIR_ENV: str(tier)})
    assert finish(proc) == 0, trainer_log(out)
    assert restored_steps(out, 2) == {"None"}
    assert not tier.exists() or not any(tier.iterdir())
    assert "persistent tier" not in d.log_path.read_text()


def test_tier_options_are_checked(tmp_path: Path) -> None:
    for bad in ({"tier_dir": "relative/dir"}, {"tier_every": 0}, {"tier_keep": 0},
                {"tier_timeout_s": 0}):
        with pytest.raises(ConfigError):
            replace(Config(), **bad)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    store = Store(str(tmp_path), "sgtier", 1 << 20)
    try:
        with pytest.raises(ConfigError, match="tier_dir"):
            Tier(replace(Config(), tier_dir=str(blocker / "tier")), store)
        assert not Tier(Config(), store).enabled
    finally:
        store.close()


def test_plain_dcp_load_reads_what_the_tier_wrote(daemon_factory, tmp_path: Path) -> None:
    tier = tmp_path / "tier"
    d = daemon_factory(tier_flags(tier, 1))
    model, opt = build()
    model(torch.randn(4, 64)).sum().backward()
    opt.step()  # the optimizer has state: int keys, step tensors, param_groups
    state = state_of(model, opt, 7)
    with sg.connect(d.socket, "plain", tier_dir=str(tier)) as c:
        c.snapshot(7, state).wait()
        wait_for(lambda: pointer(tier, "plain") == 7, what="step 7 flushed")
    assert incomplete(str(tier), "plain", 7, 1) is None

    # Without shardguard: DCP's own reader, into a state of the same structure.
    other, other_opt = build(seed=1)
    other(torch.randn(4, 64)).sum().backward()
    other_opt.step()
    target = state_of(other, other_opt, 0)
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.load(target, storage_reader=FileSystemReader(str(tier / "plain" / "step-7" / "rank-0")))
    assert_same_state(state, target)


def test_restore_from_the_tier_matches_memory_after_losing_everything(
        daemon_factory, tmp_path: Path) -> None:
    tier = tmp_path / "tier"
    d = daemon_factory(tier_flags(tier, 1))
    state = {**rich_state(), "obj": Fraction(1, 3)}  # a pickled leaf as well
    with sg.connect(d.socket, "rich", tier_dir=str(tier), allow_pickle=True) as c:
        c.snapshot(0, state).wait()
        wait_for(lambda: pointer(tier, "rich") == 0, what="step 0 flushed")
        _, from_memory = c.restore()
    d.kill()
    d.wipe()  # every arena and meta file gone: only the directory is left
    d.start()
    with sg.connect(d.socket, "rich", tier_dir=str(tier)) as c:
        assert c.latest() == 0
        with pytest.raises(RestoreError, match="pickled object"):
            c.restore()  # the same rule as from memory: no code runs unless asked
        step, got = c.restore(allow_pickle=True)
        assert step == 0
        assert_equal(from_memory, got)
        assert_equal(state, got)
        assert got["sd"]._metadata == {"": {"version": 2}}
        big = torch.zeros(600, 500)
        _, again = c.restore(into={"views": {"big": big}}, allow_pickle=True)
        assert again["views"]["big"] is big  # restored in place, as from memory
        assert_equal(state["views"]["big"], big)
    # Without a tier the job simply has nothing.
    with sg.connect(d.socket, "rich", tier_dir="") as c:
        assert c.latest() is None
    record("persistent tier: whole-job loss (every arena wiped), one node: restore from the tier", 1,
           "resumed bit-exact at the last flushed step; never a pointer to a partial step")


def lose_the_job(proc, daemons) -> None:  # type: ignore[no-untyped-def]
    """A whole-job loss: every daemon SIGKILLed with its shared memory, every rank too."""
    for lose in daemons:
        lose()
    kill_group(proc)


def assert_resumed_bit_exact(tmp_path: Path, out: Path, world: int, steps: int) -> None:
    """Every loss of both runs and the final state equal an uninterrupted run's."""
    assert_matches_reference(out, reference_run(tmp_path / "ref", world, steps), world)


def tier_daemon_with_fault(daemon_factory, tier: Path, fault: str):  # type: ignore[no-untyped-def]
    """A daemon flushing every 2nd step to ``tier`` with the tier fault ``fault`` armed."""
    with environ({"SHARDGUARD_TEST_TIER_FAULT": fault}):
        return daemon_factory(tier_flags(tier, 2))


def resume_steps(out: Path, world: int, last: int) -> int:
    """How many steps the resumed run trains: past what the lost run reached, and more."""
    reached = max((s for r in range(world) for s, _ in read_losses(out, r)), default=0)
    return max(reached, last) + 4


@pytest.mark.slow
def test_crash_mid_flush_never_leaves_a_pointer_to_a_partial_step(daemon_factory,
                                                                 tmp_path: Path) -> None:
    """The flusher of the first step >= 4 is SIGKILLed half-way (one rank written): the
    pointer stays at a complete step, the next flush recovers, the wreck is cleaned up.
    Then the whole job is lost, and resumes bit-exact from the tier."""
    tier = tmp_path / "tier"
    d = tier_daemon_with_fault(daemon_factory, tier, "mid-write@4")
    out = tmp_path / "run"
    env = {layout.TIER_DIR_ENV: str(tier)}
    with PointerWatch(str(tier), "mid", 2) as watch:
        proc = run_trainer(out, "mid", d.socket, 2, 1000, env=env, step_sleep=0.1)
        wait_for(lambda: "flusher exited with status -9" in d.log_path.read_text(), 90,
                 "the killed flusher")
        at_crash = pointer(tier, "mid")
        # A later flush commits, then deletes the killed attempt's directory and the
        # steps beyond tier_keep.
        wait_for(lambda: pointer(tier, "mid") > max(at_crash, 4) and tidy(tier, "mid"), 90,
                 "a flush after the crash, and the clean-up")
        lose_the_job(proc, [lambda: (d.kill(), d.wipe())])
    assert not watch.problems, watch.problems
    last = pointer(tier, "mid")
    assert incomplete(str(tier), "mid", last, 2) is None

    d.start()
    steps = resume_steps(out, 2, last)
    assert finish(run_trainer(out, "mid", d.socket, 2, steps, env=env)) == 0, trainer_log(out)
    assert restored_steps(out, 2) == {str(last)}
    assert_resumed_bit_exact(tmp_path, out, 2, steps)
    record("persistent tier: flusher SIGKILLed mid-write", 1,
           "resumed bit-exact at the last flushed step; never a pointer to a partial step")


@pytest.mark.slow
def test_whole_job_loss_on_three_nodes_resumes_bit_exact_from_the_tier(local_cluster,
                                                                       tmp_path: Path) -> None:
    """Every node's daemon and memory and every rank are lost at once, with a flush most
    likely in flight; replacement daemons start empty; the job resumes from the tier."""
    tier = tmp_path / "tier"
    root = local_cluster(3, 3, 1, env={layout.TIER_DIR_ENV: str(tier),
                                       "SHARDGUARD_TIER_EVERY": "3"})
    out = tmp_path / "run"
    env = {layout.TIER_DIR_ENV: str(tier)}
    with PointerWatch(str(tier), "job", 3) as watch:
        proc = run_trainer(out, "job", sockets(root), 3, 1000, env=env, step_sleep=0.1)
        wait_for(lambda: pointer(tier, "job") >= 3, 120, "a flushed step after the first")
        # The next flush starts at the next due step: lose the job while it writes.
        deadline = time.monotonic() + 15
        while not (in_flight := flushing(tier, "job")) and time.monotonic() < deadline:
            time.sleep(0.005)
        lose_the_job(proc, [lambda i=i: cluster.kill(str(root), i) for i in range(3)])
    assert not watch.problems, watch.problems
    last = pointer(tier, "job")
    assert incomplete(str(tier), "job", last, 3) is None
    for node in range(3):
        cluster.start(str(root), node, extra_args=tier_flags(tier, 3))
    steps = resume_steps(out, 3, last)
    assert finish(run_trainer(out, "job", sockets(root), 3, steps, env=env)) == 0, \
        trainer_log(out)
    assert restored_steps(out, 3) == {str(last)}, f"lost with a flush in flight: {in_flight}"
    assert_resumed_bit_exact(tmp_path, out, 3, steps)
    record("persistent tier: whole-job loss on three nodes (every daemon, memory and rank) mid-flush", 1,
           "resumed bit-exact at the last flushed step; never a pointer to a partial step")


@pytest.mark.slow
def test_crash_between_rename_and_pointer_resumes_from_the_previous_step(
        daemon_factory, tmp_path: Path) -> None:
    """The daemon dies after renaming step >= 4 into place, before it moves ``latest``:
    the job resumes from the step ``latest`` names, and the unnamed one is deleted."""
    tier = tmp_path / "tier"
    d = tier_daemon_with_fault(daemon_factory, tier, "before-pointer@4")
    out = tmp_path / "run"
    env = {layout.TIER_DIR_ENV: str(tier)}
    proc = run_trainer(out, "rename", d.socket, 2, 1000, env=env, step_sleep=0.1)
    wait_for(lambda: d.proc.poll() is not None, 90, "the daemon's crash")
    lose_the_job(proc, [d.wipe])
    before = pointer(tier, "rename")
    complete = [layout.parse_step_name(n) for n in os.listdir(tier / "rename")]
    orphans = [s for s, token in filter(None, complete) if token is None and s > before]
    assert len(orphans) == 1, os.listdir(tier / "rename")  # renamed, never named
    d.start()
    steps = resume_steps(out, 2, before) + 10
    assert finish(run_trainer(out, "rename", d.socket, 2, steps, env=env,
                              step_sleep=0.1)) == 0, trainer_log(out)
    assert restored_steps(out, 2) == {str(before)}
    orphan = tier / "rename" / f"step-{orphans[0]}"

    def orphan_gone() -> bool:
        now = pointer(tier, "rename")
        return now > before and (now == orphans[0] or not orphan.exists())

    wait_for(orphan_gone, 60, "a commit after the restart, which deletes the unnamed step")
    assert_resumed_bit_exact(tmp_path, out, 2, steps)
    record("persistent tier: daemon killed between the rename and the pointer write", 1,
           "resumed bit-exact at the last flushed step; never a pointer to a partial step")


# ------------------------------------------------- the newest step, saved on the way down


def test_the_newest_step_is_saved_when_the_trainer_is_killed(daemon_factory,
                                                             tmp_path: Path) -> None:
    """tier_every = 100 flushes step 0 only; the trainer is SIGKILLed after step 7: the
    daemon sees its ranks gone and flushes step 7, the newest restorable step."""
    tier = tmp_path / "tier"
    d = daemon_factory(tier_flags(tier, 100))
    out = tmp_path / "run"
    proc = run_trainer(out, "gone", d.socket, 1, 10_000, env={"SHARDGUARD_TIER_DIR": str(tier)},
                       step_sleep=0.05)
    try:
        # The trainer logs a snapshot when it starts it: wait for the daemon's word that
        # step 7 is restorable, not for the log.
        wait_for(lambda: (restorable(d.socket, "gone") or -1) >= 7, what="step 7 restorable")
    finally:
        kill_group(proc)
        finish(proc)
    newest = d.status("gone").jobs[0].restorable_step
    assert newest >= 7
    wait_for(lambda: pointer(tier, "gone") == newest, what=f"step {newest} flushed")
    assert incomplete(str(tier), "gone", newest, 1) is None
    assert "saving step %d on the way down: its trainers are gone" % newest in d.log()


def test_the_newest_step_is_saved_when_the_daemon_is_stopped(daemon_factory,
                                                             tmp_path: Path) -> None:
    """The trainer is alive (between steps) when the daemon gets SIGTERM: it flushes the
    newest restorable step before it stops."""
    tier = tmp_path / "tier"
    d = daemon_factory(tier_flags(tier, 100))
    state = {"w": torch.arange(1000.0)}
    with sg.connect(d.socket, "stopped", tier_dir=str(tier)) as c:
        for step in range(5):
            c.snapshot(step, {"w": state["w"] + step}).wait()
            if step == 0:
                # The job's first flush allocates its staging buffer before it holds the
                # slot (design: a step overwritten meanwhile is not flushed): let it finish.
                wait_for(lambda: pointer(tier, "stopped") == 0,
                         what="step 0 flushed (every 100)")
        d.stop()
        assert pointer(tier, "stopped") == 4, d.log()
    assert incomplete(str(tier), "stopped", 4, 1) is None


@pytest.mark.slow
def test_a_multi_node_job_saves_its_newest_step_when_its_trainers_end(local_cluster,
                                                                      tmp_path: Path) -> None:
    tier = tmp_path / "tier"
    root = local_cluster(3, 3, 1, env={"SHARDGUARD_TIER_DIR": str(tier),
                                       "SHARDGUARD_TIER_EVERY": "100"})
    out = tmp_path / "run"
    assert finish(run_trainer(out, "job", sockets(root), 3, 6,
                              env={"SHARDGUARD_TIER_DIR": str(tier)})) == 0, trainer_log(out)
    wait_for(lambda: pointer(tier, "job") == 5, what="step 5 (the last) flushed")
    assert incomplete(str(tier), "job", 5, 3) is None
