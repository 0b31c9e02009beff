"""deploy/: the systemd unit and the shell scripts pass their linters, and the Slurm
prolog and epilog run a real job: two nodes simulated on this machine, each with its
own run dir, ports and shared-memory directory, a real two-rank training across both
daemons, then the epilog freeing everything.
"""

from __future__ import annotations

import ctypes
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

from _support import finish, run_trainer, status_of_socket, trainer_log, unreachable_for_others

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "shardguard.service"
SLURM = REPO / "deploy" / "slurm"
SHARDGUARD = Path(sys.executable).with_name("shardguard")
SHM = Path("/dev/shm")
STEPS = 6
PR_SET_CHILD_SUBREAPER = 36


# --------------------------------------------------------------------------
# linters
# --------------------------------------------------------------------------


def verify_unit(unit: Path) -> tuple[int, list[str]]:
    """``systemd-analyze verify``: its exit status and every line it says about ``unit``."""
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60)
    lines = (r.stdout + r.stderr).splitlines()
    return r.returncode, [line for line in lines if unit.name in line]


def unit_copy(tmp_path: Path, extra: str = "") -> Path:
    """The unit with ExecStart's binary replaced by this checkout's, which verify requires
    to exist, and ``extra`` lines appended to [Service]."""
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/shardguard daemon" in text
    text = text.replace("ExecStart=/usr/local/bin/shardguard", f"ExecStart={SHARDGUARD}")
    text = text.replace("\n[Install]", f"{extra}\n[Install]")
    d = tmp_path / uuid.uuid4().hex[:8]
    d.mkdir()
    (d / UNIT.name).write_text(text)
    return d / UNIT.name


def test_systemd_unit_verifies_cleanly(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (it comes with systemd): "
                    "deploy/systemd/shardguard.service is not checked")
    rc, said = verify_unit(unit_copy(tmp_path))
    assert rc == 0 and said == [], said
    # The check sees what it is meant to: a misspelt directive is reported.
    _, said = verify_unit(unit_copy(tmp_path, "ProtectSytem=strict\n"))
    assert any("ProtectSytem" in line for line in said), said


def test_slurm_scripts_pass_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (`make tools` installs it as root with "
                    "apt-get): deploy/slurm is not checked")
    scripts = sorted(SLURM.glob("*.sh")) + [SLURM / "train.sbatch"]
    r = subprocess.run(["shellcheck", "--external-sources", *map(str, scripts)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------
# a Slurm job simulated on this machine
# --------------------------------------------------------------------------


@dataclass
class Node:
    """One simulated node: its own run dir root, shm directory and ports."""

    name: str
    run_root: Path
    shm_dir: Path
    env: dict[str, str]
    job: int
    pids: list[int] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.run_root / f"job-{self.job}"

    @property
    def sock(self) -> str:
        return str(self.run_dir / "agent.sock")

    def daemon_pid(self) -> int:
        return int((self.run_dir / "daemon.pid").read_text())

    def shm_files(self) -> list[Path]:
        return sorted(self.shm_dir.glob(f"sg-job{self.job}.*"))

    def log(self) -> str:
        path = self.run_dir / "daemon.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no daemon.log)"


@dataclass
class Job:
    id: int
    nodes: list[Node]

    def prolog(self, node: Node) -> subprocess.CompletedProcess[str]:
        r = self._run("prolog.sh", node)
        if (node.run_dir / "daemon.pid").exists():
            node.pids.append(node.daemon_pid())
        return r

    def epilog(self, node: Node) -> subprocess.CompletedProcess[str]:
        return self._run("epilog.sh", node)

    def _run(self, script: str, node: Node) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(SLURM / script)], env=node.env,
                              capture_output=True, text=True, timeout=120)


def gone(pid: int) -> bool:
    """Dead, or a zombie (which is collected when it is our child)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


@pytest.fixture
def subreaper() -> Iterator[None]:
    """The prolog detaches its daemon (setsid, then exits), so the daemon is reparented;
    as a child subreaper this test process becomes its parent and can collect it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture
def slurm_job(subreaper: None) -> Iterator[Callable[..., Job]]:
    """Make a simulated job; at the end every node gets the epilog, and whatever that
    missed (a daemon, a shm file) is killed or removed before the test may fail."""
    made: list[tuple[Job, Path]] = []

    def make(nodes: int = 2, user: str | None = None, site_key: bool = True) -> Job:
        base = Path(tempfile.mkdtemp(prefix="shardguard-t"))
        os.chmod(base, 0o755)  # the job's user must reach its run dir below
        job_id = 10**8 + uuid.uuid4().int % (9 * 10**8)
        pw = pwd.getpwnam(user) if user else pwd.getpwuid(os.getuid())
        key = base / "site.key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        names = [f"sim-node{i}" for i in range(nodes)]
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(("SLURM_", "SHARDGUARD_"))}
        job = Job(job_id, [])
        made.append((job, base))
        for name in names:
            shm = SHM / f"{base.name}-{name}"  # a node's own /dev/shm
            shm.mkdir()
            shm.chmod(0o1777)
            env = {**inherited,
                   "SLURM_JOB_ID": str(job_id), "SLURM_JOB_USER": pw.pw_name,
                   "SLURM_JOB_UID": str(pw.pw_uid), "SLURM_JOB_GID": str(pw.pw_gid),
                   "SLURM_JOB_NODELIST": ",".join(names),
                   "SHARDGUARD_RUN_DIR": str(base / f"run-{name}"),
                   "SHARDGUARD_SHM_DIR": str(shm), "SHARDGUARD_HOST": "127.0.0.1",
                   # Free ports: the ranks hand every daemon its peers' addresses.
                   "SHARDGUARD_CONTROL_PORT": "0", "SHARDGUARD_DATA_PORT": "0",
                   "SHARDGUARD_BIN": str(SHARDGUARD),
                   "SHARDGUARD_SITE_KEY": str(key if site_key else base / "no-site.key"),
                   "SHARDGUARD_STOP_TIMEOUT_S": "20"}
            job.nodes.append(Node(name, base / f"run-{name}", shm, env, job_id))
        return job

    yield make
    for job, base in made:
        for node in job.nodes:
            try:
                job.epilog(node)
            except subprocess.TimeoutExpired:
                pass  # what it left is removed below
            for pid in node.pids:
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)
                    wait_until(lambda: gone(pid), 10)
            for path in node.shm_files():
                path.unlink()
            shutil.rmtree(node.shm_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def assert_node_freed(node: Node) -> None:
    for pid in node.pids:
        assert wait_until(lambda: gone(pid), 10), f"{node.name}: daemon {pid} still runs"
    assert node.shm_files() == [], node.shm_files()
    assert not node.run_dir.exists()


def assert_private(path: Path, mode: int, uid: int) -> None:
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (mode, uid), path


def restorable_step(sock: str, job: str) -> int | None:
    for j in status_of_socket(sock).jobs:
        if j.job == job and j.HasField("restorable_step"):
            return j.restorable_step
    return None


def test_prolog_training_and_epilog_on_two_simulated_nodes(slurm_job, tmp_path: Path) -> None:
    job = slurm_job(nodes=2)
    for node in job.nodes:
        r = job.prolog(node)
        assert r.returncode == 0, f"{r.stderr}\n{node.log()}"

    uid = os.getuid()
    for node in job.nodes:
        assert_private(node.run_dir, 0o700, uid)
        assert_private(node.run_dir / "secret", 0o600, uid)
        assert (node.run_dir / "nodes").read_text().split() == ["sim-node0", "sim-node1"]
        argv = psutil.Process(node.daemon_pid()).cmdline()
        assert argv[argv.index("--shm-prefix") + 1] == f"sg-job{job.id}"
        assert argv[argv.index("--secret-file") + 1] == str(node.run_dir / "secret")
    # Derived on each node from the site key: the same secret, without the nodes talking.
    secrets = {(n.run_dir / "secret").read_text() for n in job.nodes}
    assert len(secrets) == 1 and re.fullmatch(r"[0-9a-f]{64}\n", secrets.pop())

    out = tmp_path / "train"
    proc = run_trainer(out, str(job.id), ",".join(n.sock for n in job.nodes), 2, STEPS)
    assert finish(proc) == 0, trainer_log(out)
    node0 = job.nodes[0]
    assert wait_until(lambda: restorable_step(node0.sock, str(job.id)) is not None, 30), \
        node0.log()

    # The CLI finds the job's daemon from SLURM_JOB_ID alone (proto/paths.py).
    assert "SHARDGUARD_SOCKET" not in node0.env
    r = subprocess.run([str(SHARDGUARD), "status", "--json"], env=node0.env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["socket"] == node0.sock
    (mine,) = [j for j in st["jobs"] if j["job"] == str(job.id)]
    assert 0 <= int(mine["restorableStep"]) < STEPS
    assert node0.shm_files(), "the arenas live in the node's shm directory"

    for node in job.nodes:
        r = job.epilog(node)
        assert r.returncode == 0, r.stderr
    for node in job.nodes:
        assert_node_freed(node)
        r = job.epilog(node)
        assert r.returncode == 0, r.stderr


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("case", ["no-binary-runs", "busy-port", "no-site-key"])
def test_a_failed_prolog_says_why_and_the_epilog_still_cleans_up(slurm_job, busy_port: int,
                                                                 case: str) -> None:
    job = slurm_job(nodes=2, site_key=case != "no-site-key")
    node = job.nodes[0]
    if case == "no-binary-runs":
        node.env["SHARDGUARD_BIN"] = "/bin/false"
    elif case == "busy-port":
        # The ports derived from the job id, base + 2 * (id % 1000) and the next one.
        del node.env["SHARDGUARD_CONTROL_PORT"], node.env["SHARDGUARD_DATA_PORT"]
        node.env["SHARDGUARD_PORT_BASE"] = str(busy_port - 2 * (job.id % 1000))
    r = job.prolog(node)
    assert r.returncode != 0
    want = {"no-binary-runs": "the daemon exited with status 1 while starting",
            "busy-port": "the daemon exited with status",
            "no-site-key": "no site key at"}[case]
    assert f"shardguard prolog.sh: job {job.id}: {want}" in r.stderr, r.stderr
    if case == "busy-port":
        # The daemon's own words, from its log (the data port, next to it, may be taken too).
        assert str(busy_port) in r.stderr or str(busy_port + 1) in r.stderr, r.stderr
    for pid in node.pids:
        assert gone(pid)
    assert not (node.run_dir / "secret").exists()
    for _ in range(2):
        r = job.epilog(node)
        assert r.returncode == 0, r.stderr
    assert_node_freed(node)


def test_prolog_as_root_starts_the_daemon_as_the_jobs_user(slurm_job) -> None:
    if os.geteuid() != 0:
        pytest.skip("the prolog switches users only when it runs as root, as under Slurm")
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to run a job as")
    if unreachable_for_others():
        pytest.skip(f"the job's user cannot run this code (directories it cannot enter: "
                    f"{unreachable_for_others()})")
    job = slurm_job(nodes=1, user="nobody", site_key=False)
    node = job.nodes[0]
    r = job.prolog(node)
    assert r.returncode == 0, f"{r.stderr}\n{node.log()}"
    pid = node.daemon_pid()
    assert set(psutil.Process(pid).uids()) == {user.pw_uid}
    assert set(psutil.Process(pid).gids()) == {user.pw_gid}
    for path, mode in ((node.run_dir, 0o700), (node.run_dir / "secret", 0o600),
                       (node.run_dir / "daemon.log", 0o600), (node.run_dir / "agent.sock", 0o600)):
        assert_private(path, mode, user.pw_uid)
    # One node needs no site key: a random secret.
    assert re.fullmatch(r"[0-9a-f]{64}\n", (node.run_dir / "secret").read_text())
    assert node.run_dir.stat().st_gid == user.pw_gid
    assert restorable_step(node.sock, str(job.id)) is None  # it answers; no job yet

    r = job.prolog(node)  # a second prolog finds it serving and leaves it be
    assert r.returncode == 0, r.stderr
    assert node.daemon_pid() == pid

    r = job.epilog(node)
    assert r.returncode == 0, r.stderr
    assert_node_freed(node)


# Stand-ins for Slurm and torchrun: node n2 dies during the first launch.
SBATCH_STUBS = {
    "scontrol": 'printf "%s\\n" n1 n2 n3\n',
    "sinfo": 'for a; do [[ $a == --nodes=* ]] && h=${a#--nodes=}; done\n'
             'if grep -qx "$h" "$STATE/dead" 2>/dev/null; then echo "down*"; else echo alloc; fi\n',
    "srun": 'while [[ $1 == --* ]]; do [[ $1 == --nodelist=* ]] && nodes=${1#--nodelist=}; shift; done\n'
            'if [[ $1 == true ]]; then ! grep -qx "$nodes" "$STATE/dead" 2>/dev/null; exit; fi\n'
            'IFS=, read -ra hosts <<<"$nodes"; rc=0\n'
            'for h in "${hosts[@]}"; do SLURMD_NODENAME=$h "$@" || rc=1; done; exit $rc\n',
    "torchrun": 'echo "$SLURMD_NODENAME $SHARDGUARD_JOB $*" >>"$STATE/launches"\n'
                'if [[ $SLURMD_NODENAME == n2 ]]; then echo n2 >"$STATE/dead"; exit 1; fi\n',
}


def test_train_sbatch_gives_a_lost_nodes_rank_to_the_spare(tmp_path: Path) -> None:
    """The relaunch loop of train.sbatch: survivors keep their node ranks, the spare
    takes the lost node's, and the job name stays the same."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in SBATCH_STUBS.items():
        (stubs / name).write_text("#!/bin/bash\n" + body)
        (stubs / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STATE": str(tmp_path),
           "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n[1-3]", "GPUS_PER_NODE": "2"}
    r = subprocess.run(["bash", str(SLURM / "train.sbatch")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "launch 2: n2 is lost; n3 takes node rank 1" in r.stderr

    def launch(host: str, rank: int, port: int) -> str:
        return (f"{host} 77 --nnodes=2 --node-rank={rank} --nproc-per-node=2 --master-addr=n1 "
                f"--master-port={port} --max-restarts=0 python train.py --config config.yaml")

    assert (tmp_path / "launches").read_text().splitlines() == [
        launch("n1", 0, 29501), launch("n2", 1, 29501),
        launch("n1", 0, 29502), launch("n3", 1, 29502)]
