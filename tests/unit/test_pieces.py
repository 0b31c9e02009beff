"""storage/pieces.py: parity piece files are reused step after step, their mappings kept
with them, cleared only when asked; another file in the pool's place is mapped anew."""

from __future__ import annotations

import os
from pathlib import Path

from shardguard.daemon.storage.pieces import PieceFiles

N = 3 * 4096 + 100


def test_a_reused_piece_keeps_its_file_and_mapping_and_is_cleared_only_when_asked(
        tmp_path: Path) -> None:
    pf = PieceFiles(str(tmp_path), "t")
    p0 = pf.create("j", 0, 0, 1, 3, N, clear=False)
    assert not p0.any()  # a new file is zero
    p0[:] = 7
    pf.release_before("j", 1)  # step 0's file goes to the pool
    assert not os.path.exists(pf.path("j", 0, 0, 1, 3))
    p1 = pf.create("j", 1, 0, 1, 3, N, clear=False)
    assert p1 is p0 and (p1 == 7).all()  # the same file and mapping, not cleared
    with open(pf.path("j", 1, 0, 1, 3), "rb") as fh:
        assert fh.read() == bytes([7]) * N  # what the mapping shows is the step's file
    pf.release_before("j", 2)
    p2 = pf.create("j", 2, 0, 1, 3, N)
    assert p2 is p0 and not p2.any()  # cleared when asked
    pf.release_before("j", 3)
    p3 = pf.create("j", 3, 0, 1, 3, N + 4096, clear=False)
    assert p3 is not p0 and len(p3) == N + 4096  # another size: mapped again


def test_a_steps_parity_and_the_previous_ones_take_turns_both_kept_mapped(
        tmp_path: Path) -> None:
    """As in a run: step s's file goes to the pool only once step s+1 is restorable, so
    two files of a position alternate; neither is mapped again."""
    pf = PieceFiles(str(tmp_path), "t")
    got = []
    for step in range(6):
        piece = pf.create("j", step, 0, 0, 3, N, clear=False)
        piece[:] = step
        got.append(piece)
        pf.release_before("j", step)  # step is restorable: older ones are released
    assert got[0] is got[2] is got[4] and got[1] is got[3] is got[5]
    assert got[0] is not got[1]
    assert (got[4] == 4).all() and (got[5] == 5).all()


def test_another_file_in_the_pools_place_is_mapped_anew(tmp_path: Path) -> None:
    pf = PieceFiles(str(tmp_path), "t")
    p0 = pf.create("j", 0, 0, 0, 3, N, clear=False)
    p0[:] = 1
    pf.release_before("j", 1)
    pool = tmp_path / "t.j.q.g0.s0.i3"
    os.unlink(pool)  # the pool file replaced by another one (a restarted daemon's, say)
    with open(pool, "wb") as fh:
        fh.write(bytes([9]) * N)
    os.chmod(pool, 0o600)
    p1 = pf.create("j", 1, 0, 0, 3, N, clear=False)
    assert p1 is not p0 and (p1 == 9).all()


def test_a_deleted_piece_and_a_dropped_job_let_go_of_their_mappings(tmp_path: Path) -> None:
    pf = PieceFiles(str(tmp_path), "t")
    pf.create("j", 0, 0, 0, 3, N)
    pf.release_before("j", 1)  # into the pool (kept mapped)
    pf.create("j", 1, 0, 0, 3, N)  # from the pool
    pf.create("j", 2, 0, 0, 3, N)  # the pool is empty: a new file, mapped
    assert len(pf._mapped) == 1
    pf.release_before("j", 3)  # step 1's file to the pool; step 2's deleted (pool taken)
    assert not list(tmp_path.glob("t.j.p*"))
    pool = os.stat(tmp_path / "t.j.q.g0.s0.i3")
    # Whichever file went to the pool, no mapping of the deleted one is kept.
    assert set(pf._mapped[("j", "g0.s0.i3")]) <= {(pool.st_dev, pool.st_ino)}
    pf.drop("j")
    assert not pf._mapped and not list(tmp_path.iterdir())
