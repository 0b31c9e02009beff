"""A careless operator and a hostile neighbour on the same machine (issue 15), for real.

Real second daemons, real Unix users made by the test (``useradd``; skipped, saying so,
when not root), real symlinks, a real memory cgroup where the kernel offers one, a real
full tmpfs. Each test reproduces one reported failure; what must hold afterwards is that
the running job lost nothing, nothing of the victim was read, written or followed, and the
operator got an error that names the cause.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
import torch

import shardguard.client as sg
from shardguard.daemon.service import cluster
from shardguard.proto import agent_pb2 as pb
from shardguard.proto import agent_pb2_grpc as pb_grpc
from shardguard.proto.errors import ERROR_METADATA_KEY
from shardguard.proto.paths import grpc_target
from conftest import record
from _support import (environ, finish, python_for_others, run_trainer, trainer_log,
                      unreachable_for_others)

FAULT_CATEGORY = ("hostile neighbour or careless operator on the node: a second daemon, "
                  "another user's directory, socket, symlinks and files, a cgroup limit, "
                  "a full tmpfs, a moved shm dir")
FAULT_OUTCOME = "refused before anything is touched, with an error naming the cause; job intact"
SHM = "/dev/shm"
#: How long a daemon that should refuse to start is given to exit (it takes about a second).
REFUSE_WITHIN_S = 30.0


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def local_user() -> Iterator[Callable[[], pwd.struct_passwd]]:
    """Make real Unix users (``useradd``); each is deleted at the end of the test."""
    if os.geteuid() != 0:
        pytest.skip("making Unix users and running processes as them needs root")
    if shutil.which("useradd") is None:
        pytest.skip("no useradd on this machine")
    if python_for_others() is None:
        pytest.skip(f"other users cannot run this Python with this code (directories they "
                    f"cannot enter: {unreachable_for_others() or sys.base_prefix})")
    made: list[str] = []

    def make() -> pwd.struct_passwd:
        name = f"sg{uuid.uuid4().hex[:10]}"
        r = subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell",
                            "/usr/sbin/nologin", name], capture_output=True, text=True,
                           timeout=60)
        if r.returncode != 0:
            pytest.skip(f"useradd {name} failed: {r.stderr.strip()}")
        made.append(name)
        return pwd.getpwnam(name)

    yield make
    for name in made:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can enter (pytest's own tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="sg-hostile-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def private_dir(parent: Path, user: pwd.struct_passwd) -> Path:
    d = parent / user.pw_name
    d.mkdir(mode=0o700)
    os.chown(d, user.pw_uid, user.pw_gid)
    return d


def user_env(**extra: str) -> dict[str, str]:
    """A clean environment for another user's process: no XDG_RUNTIME_DIR, no SLURM_* or
    SHARDGUARD_* (the defaults must be the ones in play), no system config file."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "LANG")}
    return {**keep, "HOME": "/nonexistent", "SHARDGUARD_CONFIG": "/dev/null", **extra}


def as_user(user: pwd.struct_passwd) -> dict[str, object]:
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "cwd": "/",
            "start_new_session": True}


def python_as(user: pwd.struct_passwd, what: list[str], timeout: float = 60.0
              ) -> subprocess.CompletedProcess[str]:
    """``python -c code args`` or ``python -m module args`` as ``user``: its exit, output."""
    return subprocess.run([*PY(), *what], env=user_env(), capture_output=True, text=True,
                          timeout=timeout, **as_user(user))  # type: ignore[call-overload]


def PY() -> list[str]:  # noqa: N802 - reads as the interpreter it names
    py = python_for_others()
    assert py is not None  # local_user skipped otherwise
    return py


def rpc_error(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str, str]:
    """(status, error class, details) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as err:
        fn()
    e = err.value
    name = dict(e.trailing_metadata() or ()).get(ERROR_METADATA_KEY, "")
    return e.code(), name, e.details()


def stub(sock: str) -> pb_grpc.AgentStub:
    return pb_grpc.AgentStub(grpc.insecure_channel(grpc_target(sock)))


def register(sock: str, job: str, slot_bytes: int = 1 << 16) -> pb.RegisterReply:
    return stub(sock).Register(pb.RegisterRequest(job=job, rank=0, world_size=1,
                                                  slot_bytes=slot_bytes, pid=os.getpid(),
                                                  local_ranks=[0]), timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(d, within_s: float = REFUSE_WITHIN_S) -> str:  # type: ignore[no-untyped-def]
    """Start daemon ``d`` that must refuse: its exit status 1 and its log."""
    proc = d.spawn()
    try:
        rc = proc.wait(within_s)
    except subprocess.TimeoutExpired:
        d.stop()
        pytest.fail(f"the daemon started instead of refusing:\n{d.log()}")
    assert rc == 1, d.log()
    return d.log()


def shm_state(prefix: str) -> dict[str, tuple[int, bytes]]:
    """Every shm file of a prefix: inode and content (a rewrite changes one or the other)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(SHM, glob.escape(prefix) + ".*"))):
        with open(path, "rb") as fh:
            out[path] = (os.stat(path).st_ino, fh.read())
    return out


# ------------------------------------------------- item 1: a second daemon, same socket/prefix


@pytest.mark.parametrize("shared", ["socket", "prefix", "socket and prefix",
                                    "socket, prefix and fixed ports"])
def test_a_second_daemon_on_a_running_daemons_socket_or_prefix_changes_nothing(
        daemon_factory, shared: str) -> None:
    """It used to start, adopt the live daemon's arenas and unlink its socket (with fixed
    ports it failed at the bind, after the unlink): the job's trainers lost their daemon,
    and a relaunch's registration overwrote the meta file. Now it refuses before it
    touches anything, naming the pid that holds the socket or the prefix."""
    port = free_port()
    fixed = ["--control-port", str(port)] if "fixed" in shared else []
    first = daemon_factory(fixed)
    with sg.connect(first.socket, "live", rank=0, world_size=1) as c:
        c.snapshot(0, {"w": torch.arange(64.0)}).wait()
        before = shm_state(first.prefix)
        sock_inode = os.stat(first.socket).st_ino
        second = daemon_factory(fixed, start=False)
        if "socket" in shared:
            second.socket = first.socket
        if "prefix" in shared:
            second.prefix = first.prefix
        log = refused(second)
        assert "ConfigError" in log and f"pid {first.proc.pid}" in log, log
        assert "adopted" not in log and "serving" not in log, log
        # The first daemon still owns everything, and the job restores.
        assert os.stat(first.socket).st_ino == sock_inode
        assert first.status().pid == first.proc.pid
        assert shm_state(first.prefix) == before
        step, state = c.restore()
    assert step == 0 and torch.equal(state["w"], torch.arange(64.0))


# ------------------------------------------------ item 3: another user's socket directory


def test_a_socket_directory_made_by_another_user_is_never_used(local_user, shared_dir) -> None:
    """Without XDG_RUNTIME_DIR the default socket is /tmp/shardguard-<uid>/agent.sock. Another
    user made that directory first (0777) and put a listening socket in it: the victim's
    trainer sent its state there. Now the client refuses to connect and the daemon to
    start, both naming the directory and its owner; the planted socket gets no connection."""
    victim, attacker = local_user(), local_user()
    hijacked = f"/tmp/shardguard-{victim.pw_uid}"
    shutil.rmtree(hijacked, ignore_errors=True)  # a leftover of an earlier user of this uid
    listener_log = shared_dir / "listener.log"
    listen = (
        "import os, socket, sys\n"
        "d = sys.argv[1]; os.mkdir(d); os.chmod(d, 0o777)\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(d + '/agent.sock')\n"
        "os.chmod(d + '/agent.sock', 0o777); s.listen(8); print('ready', flush=True)\n"
        "while True:\n"
        "    c, _ = s.accept(); c.settimeout(2)\n"
        "    try: data = c.recv(65536)\n"
        "    except OSError: data = b''\n"
        "    print('connection', len(data), data[:200], flush=True); c.close()\n")
    with open(listener_log, "wb") as out:
        listener = subprocess.Popen([*PY(), "-c", listen, hijacked], stdout=out,
                                    stderr=subprocess.STDOUT, env=user_env(),
                                    **as_user(attacker))  # type: ignore[call-overload]
    try:
        deadline = time.monotonic() + 30
        while b"ready" not in listener_log.read_bytes():
            assert listener.poll() is None and time.monotonic() < deadline, \
                listener_log.read_text()
            time.sleep(0.05)
        trainer = python_as(victim, ["-c", (
            "import torch, shardguard.client as sg\n"
            "c = sg.connect(job='victim', rank=0, world_size=1, timeout_s=5)\n"
            "c.snapshot(0, {'secret': torch.full((4,), 42.0)}).wait()\n")])
        assert trainer.returncode != 0, trainer.stdout + trainer.stderr
        assert "UnsafePathError" in trainer.stderr and hijacked in trainer.stderr \
            and attacker.pw_name in trainer.stderr, trainer.stderr
        prefix = f"shardguard-t{uuid.uuid4().hex[:10]}"
        try:
            daemon = python_as(victim, ["-m", "shardguard.daemon", "--shm-prefix", prefix],
                               timeout=REFUSE_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail("the victim's daemon started in the other user's directory")
        finally:
            for path in glob.glob(f"{SHM}/{prefix}.*"):
                os.unlink(path)
        assert daemon.returncode == 1, daemon.stderr
        assert "UnsafePathError" in daemon.stderr and hijacked in daemon.stderr \
            and attacker.pw_name in daemon.stderr, daemon.stderr
        assert os.stat(f"{hijacked}/agent.sock").st_uid == attacker.pw_uid  # not unlinked
        assert b"connection" not in listener_log.read_bytes(), listener_log.read_text()
    finally:
        listener.kill()
        listener.wait(10)
        shutil.rmtree(hijacked, ignore_errors=True)


# ------------------------------------------- items 4 and 10: files planted in the shm dir


@pytest.fixture
def symlinks_followed() -> Iterator[None]:
    """fs.protected_symlinks = 0 (the kernel's default): the kernel itself then follows a
    symlink another user planted in a sticky directory, as the report saw; restored after."""
    path = "/proc/sys/fs/protected_symlinks"
    try:
        with open(path) as fh:
            old = fh.read().strip()
        if old != "0":
            with open(path, "w") as fh:
                fh.write("0")
    except OSError as exc:
        pytest.skip(f"cannot set fs.protected_symlinks to 0 here: {exc}")
    yield
    if old != "0":
        with open(path, "w") as fh:
            fh.write(old)


def plant(user: pwd.struct_passwd, files: dict[str, str], links: dict[str, str]) -> None:
    """As ``user``: ``files`` (path -> text, mode 0644) and ``links`` (path -> target)."""
    code = ("import json, os, sys\n"
            "files, links = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
            "for p, text in files.items():\n"
            "    with open(p, 'w') as fh: fh.write(text)\n"
            "    os.chmod(p, 0o644)\n"
            "for p, t in links.items(): os.symlink(t, p)\n")
    r = python_as(user, ["-c", code, json.dumps(files), json.dumps(links)])
    assert r.returncode == 0, r.stderr


def test_files_another_user_planted_are_not_adopted_followed_or_blocking(
        local_user, daemon_factory, symlinks_followed, tmp_path: Path) -> None:
    """A user who knows the prefix plants a meta file for a job "evil" and, at its arena's
    name, a symlink to a file of root. The root daemon used to adopt the job and write an
    arena header into root's file. Now neither is trusted, the file is untouched, and the
    job name is not blocked: registering it replaces what was planted."""
    mallory = local_user()
    d = daemon_factory(start=False)
    slot = 8192
    precious = tmp_path / "precious"  # root's, the size an arena of this meta would have
    precious.write_bytes(os.urandom(4096 + 2 * slot))
    before = precious.read_bytes()
    slots = [{"state": 3, "step": 5, "data_bytes": 0, "manifest_offset": 0,
              "manifest_bytes": 0, "data_crc": 0, "manifest_crc": 0, "generation": 1},
             {"state": 0, "step": -1, "data_bytes": 0, "manifest_offset": 0,
              "manifest_bytes": 0, "data_crc": 0, "manifest_crc": 0, "generation": 0}]
    meta = {"version": 1, "job": "evil", "world_size": 1, "local_ranks": [0],
            "restorable_step": 5, "previous_step": None, "topology": None,
            "ranks": {"0": {"slot_bytes": slot, "slots": slots}}}
    meta_path, arena_path = f"{SHM}/{d.prefix}.evil.meta", f"{SHM}/{d.prefix}.evil.r0"
    plant(mallory, {meta_path: json.dumps(meta)}, {arena_path: str(precious)})
    d.start()
    assert precious.read_bytes() == before
    assert [j.job for j in d.status().jobs] == []
    assert mallory.pw_name in d.log() and "not trusted" in d.log(), d.log()
    # The name is not blocked: root replaces what the other user planted, following nothing.
    register(d.socket, "evil", slot)
    assert precious.read_bytes() == before
    for path in (meta_path, arena_path):
        st = os.lstat(path)
        assert st.st_uid == 0 and not os.path.islink(path), path


PROTECT_STEPS = 4


def test_step_metadata_and_parity_never_follow_a_planted_symlink(local_user, symlinks_followed,
                                                                  tmp_path: Path) -> None:
    """The report's own reproduction: a user plants, at the predictable names of a
    multi-node job's step metadata temporaries and parity pieces, symlinks to a file of
    root; the root daemons truncated, overwrote and chmodded it."""
    mallory = local_user()
    root = tmp_path / "c"
    spec = cluster.up(str(root), 2, 2, 1)
    try:
        precious = tmp_path / "precious"
        precious.write_bytes(b"root's file\n")
        precious.chmod(0o644)
        links = {}
        for node in range(spec.nodes):
            p = f"{spec.shm_dir}/{spec.node_prefix(node)}.job"
            for step in range(PROTECT_STEPS):
                links[f"{p}.x{step}.tmp"] = str(precious)
                links[f"{p}.p{step}.g0.s{node}.i1"] = str(precious)  # node's parity piece
        plant(mallory, {}, links)
        out = tmp_path / "run"
        proc = run_trainer(out, "job", ",".join(cluster.sockets(str(root))), 2, PROTECT_STEPS)
        assert finish(proc) == 0, trainer_log(out)
        assert precious.read_bytes() == b"root's file\n"
        assert precious.stat().st_mode & 0o777 == 0o644
    finally:
        cluster.down(str(root))


def test_another_users_meta_file_is_a_clear_error_not_internal(local_user, daemon_factory,
                                                                shared_dir) -> None:
    """A daemon that is not root cannot replace another user's file in the sticky shm dir:
    a meta file planted at its job's name used to fail registration with INTERNAL
    (PermissionError). Now the error is typed and names the file and its owner, nothing is
    left half-made, and the daemon serves other jobs."""
    alice, mallory = local_user(), local_user()
    d = daemon_factory(start=False, workdir=private_dir(shared_dir, alice), user=alice.pw_uid,
                       python=PY())
    d.start()
    meta_path = f"{SHM}/{d.prefix}.train.meta"
    plant(mallory, {meta_path: "{}"}, {})
    code, name, details = rpc_error(lambda: register(d.socket, "train"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and name == "UnsafePathError", details
    assert meta_path in details and mallory.pw_name in details, details
    assert not os.path.exists(f"{SHM}/{d.prefix}.train.r0")
    register(d.socket, "other")
    assert sorted(j.job for j in d.status().jobs) == ["other"]


def test_another_users_daemon_on_the_same_prefix_is_refused_clearly(
        local_user, daemon_factory, shared_dir) -> None:
    """Two users' daemons with one prefix (the default one, say): the second used to start,
    then answer a job of the first's job name with INTERNAL (PermissionError). Now it
    refuses to start, naming the first user, and the first daemon's job is untouched."""
    alice, bob = local_user(), local_user()
    a = daemon_factory(start=False, workdir=private_dir(shared_dir, alice), user=alice.pw_uid,
                       python=PY())
    a.start()
    register(a.socket, "train")
    before = shm_state(a.prefix)
    b = daemon_factory(start=False, workdir=private_dir(shared_dir, bob), user=bob.pw_uid,
                       python=PY())
    b.prefix = a.prefix
    log = refused(b)
    assert "UnsafePathError" in log and alice.pw_name in log and a.prefix in log, log
    assert shm_state(a.prefix) == before
    assert [j.job for j in a.status().jobs] == ["train"]


# ---------------------------------------------------------- item 9's leftover: a full tmpfs


@pytest.fixture
def tiny_tmpfs() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = Path(tempfile.mkdtemp(prefix="sg-tiny-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=1777", "tmpfs", str(d)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        d.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", "--lazy", str(d)], capture_output=True, timeout=30)
    d.rmdir()


def test_a_full_shm_dir_leaves_no_temporary_file_behind(tiny_tmpfs, daemon_factory) -> None:
    """When the shm dir fills up, the meta write fails; its ``*.meta.tmp<thread>`` used to
    stay after ``drop`` and after the daemon stopped."""
    d = daemon_factory(["--shm-dir", str(tiny_tmpfs)])
    reg = register(d.socket, "full", 1 << 16)
    filler = tiny_tmpfs / "filler"
    with open(filler, "wb", buffering=0) as fh:  # every page left, as a neighbour would
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    with pytest.raises(grpc.RpcError):
        stub(d.socket).Begin(pb.BeginRequest(job="full", rank=0, lease=reg.lease, step=0),
                             timeout=10)
    filler.unlink()
    stub(d.socket).Drop(pb.DropRequest(job="full", everywhere=False), timeout=10)
    left = sorted(p.name for p in tiny_tmpfs.iterdir() if p.name.startswith(d.prefix + "."))
    assert left == [f"{d.prefix}.lock"], left  # only the live daemon's lock
    d.stop()
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == []


def test_a_full_shm_dir_is_a_typed_error_and_training_goes_on(tiny_tmpfs, daemon_factory) -> None:
    """ENOSPC used to reach the trainer as ``ShardguardError: StatusCode.INTERNAL: OSError:
    [Errno 28]`` and kill training: now the daemon answers NoSpaceError (RESOURCE_EXHAUSTED,
    typed), names the stall, and the trainer's snapshot is skipped with a warning; the
    restorable step stays, and snapshots are taken again once there is room."""
    d = daemon_factory(["--shm-dir", str(tiny_tmpfs)])
    state = {"w": torch.arange(1000.0)}
    with sg.connect(d.socket, "full") as c:
        c.snapshot(0, state).wait()
        filler = tiny_tmpfs / "filler"
        with open(filler, "wb", buffering=0) as fh:  # every page left, as a neighbour would
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError:
                pass
        h = c.snapshot(1, {"w": state["w"] + 1})
        assert h.skipped and isinstance(h.error, sg.NoSpaceError), h
        job = next(j for j in d.status().jobs if j.job == "full")
        assert job.stall_cause == "no_space", job
        assert c.latest() == 0
        filler.unlink()
        c.snapshot(2, {"w": state["w"] + 2}).wait()
        step, got = c.restore()
        assert step == 2 and torch.equal(got["w"], state["w"] + 2)


# ------------------------------------------------------------- item 6: a memory cgroup


@pytest.fixture
def memory_cgroup() -> Iterator[tuple[str, str]]:
    """A new memory cgroup limited to 320 MiB: (its cgroup.procs file, its directory)."""
    if os.geteuid() != 0:
        pytest.skip("making a cgroup needs root")
    limit = 320 << 20
    made = None
    for parent, limit_file in _cgroup_parents():
        child = os.path.join(parent, f"sg-test-{uuid.uuid4().hex[:8]}")
        try:
            os.mkdir(child)
        except OSError:
            continue
        try:
            with open(os.path.join(child, limit_file), "w") as fh:
                fh.write(str(limit))
            made = child
            break
        except OSError:
            os.rmdir(child)
    if made is None:
        pytest.skip("no memory cgroup can be made here (cgroup v2 with the memory controller "
                    "delegated, or cgroup v1's memory hierarchy, under /sys/fs/cgroup)")
    yield os.path.join(made, "cgroup.procs"), made
    for _ in range(50):
        try:
            os.rmdir(made)
            return
        except OSError:
            time.sleep(0.1)  # the daemon's exit is still being accounted


def _cgroup_parents() -> list[tuple[str, str]]:
    """Where a child memory cgroup may be made: under this process's own cgroup (v1 allows
    it), or beside it (v2: a cgroup with processes cannot enable controllers for children)."""
    out = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            here = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
            for parent in (os.path.dirname(here), "/sys/fs/cgroup"):
                control = os.path.join(parent, "cgroup.subtree_control")
                if os.path.exists(control) and "memory" in Path(control).read_text().split():
                    out.append((parent, "memory.max"))
        elif "memory" in controllers.split(",") and os.path.isdir("/sys/fs/cgroup/memory"):
            out.append((os.path.join("/sys/fs/cgroup/memory", path.lstrip("/")),
                        "memory.limit_in_bytes"))
    return out


def test_the_default_budget_fits_the_daemons_cgroup(memory_cgroup, daemon_factory) -> None:
    """Inside a 320 MiB cgroup the default budget was half the host's available memory; the
    cgroup's OOM killer then took the daemon. Now the budget is half of what the cgroup
    leaves, and the log says that the cgroup's limit applied."""
    procs, where = memory_cgroup
    join = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs]  # join the cgroup, then exec
    d = daemon_factory(start=False, launcher=join)
    d.start()
    out = subprocess.run([sys.executable, "-m", "shardguard.daemon.service.cli", "status", "--json",
                          "--socket", d.socket], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    budget = int(json.loads(out.stdout)["memoryBudgetBytes"])
    assert 0 < budget <= (320 << 20) // 2, (budget, d.log())
    assert f"of what cgroup {where} leaves" in d.log(), d.log()


# ------------------------------------------- item 11: the cluster's daemons moved shm dir


def test_cluster_kill_and_down_free_the_shm_dir_the_daemons_use(tmp_path: Path) -> None:
    """With SHARDGUARD_SHM_DIR set, ``cluster kill`` said "shared memory wiped" while the
    node's files stayed, and ``down`` left them all: both looked in /dev/shm."""
    shm = Path(tempfile.mkdtemp(prefix="sg-shm-", dir=SHM))
    root = tmp_path / "c"
    cli = [sys.executable, "-m", "shardguard.daemon.service.cli", "cluster"]
    try:
        with environ({"SHARDGUARD_SHM_DIR": str(shm)}):
            spec = cluster.up(str(root), 2, 2, 1)
        for i, sock in enumerate(cluster.sockets(str(root))):
            with sg.connect(sock, f"job{i}", rank=0, world_size=1) as c:
                c.snapshot(0, {"w": torch.ones(1000)}).wait()

        def files(node: int) -> list[str]:
            return sorted(p.name for p in shm.glob(glob.escape(spec.node_prefix(node)) + ".*"))

        assert files(0) and files(1)
        env = {**os.environ, "SHARDGUARD_SHM_DIR": str(shm)}
        r = subprocess.run([*cli, "kill", "--dir", str(root), "--node", "0"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "shared memory wiped" in r.stdout, r.stderr
        assert files(0) == [] and files(1)
        env.pop("SHARDGUARD_SHM_DIR")  # another shell: the cluster's spec knows the directory
        r = subprocess.run([*cli, "down", "--dir", str(root)], env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert os.listdir(shm) == []
    finally:
        if (root / "cluster.json").exists():
            cluster.down(str(root))
        shutil.rmtree(shm, ignore_errors=True)


# ------------------------------------------- twenty trials of the neighbour's moves (make faults)

HOSTILE_TRIALS = 20


def _attempt_connect(user: pwd.struct_passwd, sock: str) -> str:
    """As ``user``: connect to ``sock`` and ask the daemon for its status; what happened."""
    code = ("import sys, socket\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            "    s.connect(sys.argv[1]); s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n')\n"
            "    print('connected')\n"
            "except OSError as e:\n"
            "    print('refused', type(e).__name__)\n")
    return python_as(user, ["-c", code, sock]).stdout.strip()


def _attempt_read(user: pwd.struct_passwd, path: str) -> str:
    code = ("import sys\n"
            "try:\n"
            "    open(sys.argv[1], 'rb').read(16); print('read')\n"
            "except OSError as e:\n"
            "    print('refused', type(e).__name__)\n")
    return python_as(user, ["-c", code, path]).stdout.strip()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_twenty_trials_of_a_neighbours_moves_against_a_live_job(
        local_user, daemon_factory, shared_dir, symlinks_followed, tmp_path: Path) -> None:
    """A live job on a root daemon; another user (and a careless operator) try twenty times
    each, in a seeded random order, the moves of items 1, 3, 4 and 10: a second daemon on its socket or
    prefix, planted meta files and arena symlinks, connecting to its socket, reading its
    arena. After every move: the move was refused, root's file was not touched, and the
    live job restores exactly its last snapshot and takes the next one."""
    mallory = local_user()
    workdir = shared_dir / "daemon"
    workdir.mkdir(mode=0o755)
    d = daemon_factory(workdir=workdir)
    precious = tmp_path / "precious"
    precious.write_bytes(os.urandom(4096 + 2 * 8192))
    before = precious.read_bytes()
    rng = random.Random(15)
    moves = ["second daemon, same socket", "second daemon, same prefix",
             "planted meta file and arena symlink", "connect to the daemon's socket",
             "read the live job's arena"]
    with sg.connect(d.socket, "live", rank=0, world_size=1) as c:
        state = {"w": torch.arange(256.0)}
        c.snapshot(0, state)
        c.wait(restorable=True)
        order = moves * HOSTILE_TRIALS  # twenty of each move, in a seeded random order
        rng.shuffle(order)
        for trial, move in enumerate(order):
            if move.startswith("second daemon"):
                second = daemon_factory(start=False)
                if "socket" in move:
                    second.socket = d.socket
                else:
                    second.prefix = d.prefix
                log = refused(second)
                assert "ConfigError" in log and f"pid {d.proc.pid}" in log, log
                outcome = "refused at start, naming the daemon that holds it"
            elif move.startswith("planted"):
                job = f"evil{trial}"
                slot = 8192
                slots = [{"state": 3, "step": 5, "data_bytes": 0, "manifest_offset": 0,
                          "manifest_bytes": 0, "data_crc": 0, "manifest_crc": 0,
                          "generation": 1}] * 2
                meta = {"version": 1, "job": job, "world_size": 1, "local_ranks": [0],
                        "restorable_step": 5, "previous_step": None, "topology": None,
                        "ranks": {"0": {"slot_bytes": slot, "slots": slots}}}
                meta_path = f"{SHM}/{d.prefix}.{job}.meta"
                arena_path = f"{SHM}/{d.prefix}.{job}.r0"
                plant(mallory, {meta_path: json.dumps(meta)}, {arena_path: str(precious)})
                register(d.socket, job, slot)
                for path in (meta_path, arena_path):
                    st = os.lstat(path)
                    assert st.st_uid == 0 and not os.path.islink(path), path
                stub(d.socket).Drop(pb.DropRequest(job=job), timeout=10)
                outcome = "replaced by root's own files, nothing followed"
            elif move.startswith("connect"):
                got = _attempt_connect(mallory, d.socket)
                assert got.startswith("refused"), got
                outcome = f"refused by the kernel ({got.split()[-1]})"
            else:
                arena = sorted(glob.glob(f"{SHM}/{glob.escape(d.prefix)}.live.r0"))
                assert arena, os.listdir(SHM)
                got = _attempt_read(mallory, arena[0])
                assert got.startswith("refused"), got
                outcome = f"refused by the kernel ({got.split()[-1]})"
            assert precious.read_bytes() == before, move
            step, got_state = c.restore()
            assert step == trial and torch.equal(got_state["w"], state["w"]), (move, step)
            state = {"w": state["w"] + 1}
            c.snapshot(trial + 1, state)
            c.wait(restorable=True)
            record(f"hostile neighbour against a live job: {move}", 1,
                   f"{outcome}; job intact")
    assert d.status().pid == d.proc.pid
