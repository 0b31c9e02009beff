"""Peers on one node, one table: shardguard against DLRover, ml-flashpoint, NVRx, torchft and DCP (``make bench-peers``).

Every peer runs in a virtual environment of its own under ``.bench-venvs/`` (torch
2.13.0 installed first and pinned by ``constraints.txt``, then the peer at a pinned
version with its shims: ``bench/peers/requirements/``), one process per peer per
round, its adapter module (``bench/peers/*.py``) run as a script under the harness
``bench/peers/_harness.py``, which measures it with ``bench/bench_node.py``'s own
state, loop and floor and writes JSON back. shardguard and DCP run in the project's
venv, shardguard against a real node daemon started for its run. Rounds run every
peer once, each round in a rotated order; the table shows medians over rounds, each
figure also as a ratio to the memcpy floor measured in the same process and to
shardguard's figure in the same round. A peer that cannot be installed or run is a
row that says why.

Usage: ``python bench/bench_peers.py [--install] [--quick] [--rounds N] [--mib M] [--only KEY,...]``
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import base_parser, load_average, print_rows, raise_interrupt, write_results

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PEERS_DIR = BENCH_DIR / "peers"
REQUIREMENTS = PEERS_DIR / "requirements"
VENVS = ROOT / ".bench-venvs"
SHM_DIR = "/dev/shm"
SHM_PREFIX = "shardguard-bench-peers"
TORCH = "torch==2.13.0"
RUN_TIMEOUT_S = 600.0
INSTALL_ERROR = "install-error.txt"

# ml-flashpoint's C++ build takes abseil-cpp from grpcio's sdist (see flashpoint_build/abseil).
ABSEIL_FROM = "grpcio==1.85.3"
FLASHPOINT_BUILD = PEERS_DIR / "flashpoint_build"


# --------------------------------------------------------------------- the peers


@dataclass(frozen=True)
class Venv:
    """A peer's virtual environment: ``requirements/<name>.txt`` after torch and the harness's needs."""

    name: str
    #: Extra ``pip install`` arguments (config settings for a source build), given the sources dir.
    pip_args: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return VENVS / self.name

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


@dataclass(frozen=True)
class Peer:
    key: str
    name: str
    script: str
    venv: Venv | None = None  # None: the project's venv (this interpreter)
    options: tuple[str, ...] = ()
    launcher: tuple[str, ...] = ()  # a launcher script in bench/peers and its arguments
    daemon: bool = False  # needs a shardguard node daemon


FLASHPOINT = Venv("flashpoint", pip_args=(
    "--no-cache-dir",  # a wheel cached from a build without the shims below would be reused
    "--config-settings=cmake.define.FETCHCONTENT_SOURCE_DIR_ABSEIL-CPP={src}/abseil-cpp",
    "--config-settings=cmake.define.FETCHCONTENT_FULLY_DISCONNECTED=ON",
    "--config-settings=cmake.define.BUILD_TESTING=OFF",
    f"--config-settings=cmake.define.CMAKE_PROJECT_ml_flashpoint_cpp_INCLUDE={FLASHPOINT_BUILD}/install_extensions.cmake",
))
DLROVER, NVRX, TORCHFT = Venv("dlrover"), Venv("nvrx"), Venv("torchft")
VENV_LIST = (DLROVER, FLASHPOINT, NVRX, TORCHFT)

PEERS = (
    Peer("shardguard", "shardguard snapshot", "shardguard_snapshot.py", daemon=True),
    Peer("dcp", "DCP async_save -> /dev/shm", "dcp_async.py"),
    Peer("dlrover", "DLRover flash checkpoint (MEMORY)", "dlrover_flash.py", DLROVER,
         launcher=("dlrover_run.py", "--standalone", "--nproc_per_node=1")),
    Peer("flashpoint", "ml-flashpoint (DCP async_save, thread)", "flashpoint_thread.py", FLASHPOINT),
    Peer("nvrx", "NVRx local checkpoint (async, /dev/shm)", "nvrx_local.py", NVRX),
    Peer("torchft-http", "torchft HTTPTransport (live peer)", "torchft_live.py", TORCHFT, ("transport=http",)),
    Peer("torchft-pg", "torchft PGTransport (live peer)", "torchft_live.py", TORCHFT, ("transport=pg",)),
)
BASE = "shardguard"


# ------------------------------------------------------------------- installing


def install(venv: Venv) -> str | None:
    """Create ``venv`` unless it is up to date; None, or why it cannot be used (one line, also kept
    in the venv's install-error.txt so that a later run's row says it without reinstalling)."""
    stamp = venv.path / ".installed"
    want = _install_key(venv)
    if stamp.exists() and stamp.read_text(encoding="utf-8") == want:
        return None
    stamp.unlink(missing_ok=True)
    (venv.path / INSTALL_ERROR).unlink(missing_ok=True)
    print(f"installing {venv.name} into {venv.path.relative_to(ROOT)} ...", flush=True)
    t0 = time.monotonic()
    try:
        if not _has_pip(venv):
            # None yet, or one an interrupted install left without pip: made afresh.
            _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--clear",
                  str(venv.path)])
        pip = [str(venv.python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt")]
        # torch first: a peer's own requirements would otherwise bring a CUDA build of it.
        _run([*pip, TORCH])
        src = _prepare_sources(venv)
        args = [a.format(src=src) for a in venv.pip_args]
        # The peer's own lines on the command line, not with -r: pip hands --config-settings
        # only to the requirements named there (pip 25: a -r file's sdist was built without
        # them, and ml-flashpoint's build went to GitHub for abseil).
        _run([*pip, "-r", str(REQUIREMENTS / "harness.txt"), *_requirements(venv), *args])
    except _InstallError as exc:
        (venv.path / INSTALL_ERROR).write_text(str(exc) + "\n", encoding="utf-8")
        print(f"  {venv.name}: not installed: {exc}", flush=True)
        return str(exc)
    stamp.write_text(want, encoding="utf-8")
    print(f"  {venv.name}: installed in {time.monotonic() - t0:.0f} s", flush=True)
    return None


def _requirements(venv: Venv) -> list[str]:
    """The requirement lines of ``requirements/<venv>.txt``, comments left out."""
    lines = (REQUIREMENTS / f"{venv.name}.txt").read_text(encoding="utf-8").splitlines()
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


def _has_pip(venv: Venv) -> bool:
    return venv.python.exists() and subprocess.run(
        [str(venv.python), "-m", "pip", "--version"], capture_output=True, check=False).returncode == 0


def install_error(venv: Venv) -> str | None:
    """Why ``venv`` cannot be used now, without installing anything."""
    err = venv.path / INSTALL_ERROR
    if err.exists():
        return err.read_text(encoding="utf-8").strip()
    if not (venv.path / ".installed").exists():
        return f"not installed: run `make bench-peers` (or bench_peers.py --install) to create {venv.path.name}"
    return None


def _install_key(venv: Venv) -> str:
    """What the venv was made from: reinstall when any of it changes."""
    h = hashlib.sha256(TORCH.encode())
    for f in (REQUIREMENTS / "harness.txt", REQUIREMENTS / f"{venv.name}.txt", ROOT / "constraints.txt"):
        h.update(f.read_bytes())
    h.update(repr(venv.pip_args).encode())
    if venv is FLASHPOINT:
        for f in sorted(FLASHPOINT_BUILD.rglob("*")):
            if f.is_file():
                h.update(f.read_bytes())
    return h.hexdigest()


def _prepare_sources(venv: Venv) -> Path:
    """Sources a peer's build needs besides its sdist; for ml-flashpoint, abseil-cpp (grpcio's copy)."""
    src = VENVS / "_src"
    if venv is not FLASHPOINT:
        return src
    absl = src / "abseil-cpp"
    shutil.rmtree(absl, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=VENVS) as tmp:
        sdist = _download_sdist(*ABSEIL_FROM.split("=="), Path(tmp))
        with tarfile.open(sdist) as tar:
            inner = "third_party/abseil-cpp/"
            members = [m for m in tar.getmembers() if inner in m.name and m.isfile()]
            for m in members:
                m.name = str(Path("abseil-cpp") / m.name.split(inner, 1)[1])
            tar.extractall(src, members=members, filter="data")
    shutil.copy(FLASHPOINT_BUILD / "abseil" / "CMakeLists.txt", absl / "CMakeLists.txt")
    return src


def _download_sdist(name: str, version: str, into: Path) -> Path:
    """``name``'s source archive at ``version``, from the package index, its sha256 checked.

    Not ``pip download --no-binary``: pip prepares an sdist's metadata by running its
    build backend, and grpcio's compiles its C core for it (most of an hour on 2 cores),
    when all the build needs here is a directory of its archive.
    """
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    cafile = os.environ.get("PIP_CERT") or None
    ctx = ssl.create_default_context(cafile=cafile)
    want = f"{name}-{version}.tar.gz"
    try:
        with urllib.request.urlopen(f"{index}/{name}/", timeout=60, context=ctx) as page:
            html = page.read().decode()
        link = next((m.group(1) for m in re.finditer(r'href="([^"]+)"', html)
                     if urllib.parse.urlsplit(m.group(1)).path.endswith("/" + want)), None)
        if link is None:
            raise _InstallError(f"{index}/{name}/ lists no {want}")
        url = urllib.parse.urljoin(f"{index}/{name}/", link)
        digest = urllib.parse.urlsplit(url).fragment.removeprefix("sha256=")
        out = into / want
        with urllib.request.urlopen(url.split("#")[0], timeout=600, context=ctx) as r, \
                open(out, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except OSError as exc:
        raise _InstallError(f"downloading {want}: {exc}") from None
    if len(digest) != 64 or hashlib.sha256(out.read_bytes()).hexdigest() != digest:
        raise _InstallError(f"{want}: its sha256 does not match the index's")
    return out


class _InstallError(Exception):
    pass


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2"})
    if proc.returncode != 0:
        raise _InstallError(_why(proc.stdout + proc.stderr) or f"{cmd[0]} exited with {proc.returncode}")


def _why(output: str) -> str:
    """The line of a failed command's output that says why: pip's ERROR, else an exception, else the last."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for marker in ("ERROR:", "Error:", "error:"):
        picked = [ln for ln in lines if marker in ln and "Ignored" not in ln]
        if picked:
            return picked[-1][:400]
    return lines[-1][:400] if lines else ""


# ---------------------------------------------------------------------- running


@dataclass
class Conf:
    rounds: int
    mib: int
    harness_args: list[str]
    timeout_s: float


@dataclass
class Outcome:
    """One peer in one round: its harness JSON, or why it did not run."""

    result: dict[str, Any] | None = None
    error: str | None = None
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def run_peer(peer: Peer, conf: Conf, round_no: int) -> Outcome:
    if peer.venv is not None and (why := install_error(peer.venv)):
        return Outcome(error=why)
    python = str(peer.venv.python) if peer.venv else sys.executable
    scratch = tempfile.mkdtemp(prefix=f"{SHM_PREFIX}.{peer.key}-", dir=SHM_DIR)
    out = os.path.join(scratch, "result.json")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # DLRover names its shared memory after the job: one of ours, to remove it afterwards.
    job = f"{SHM_PREFIX}-{peer.key}-{os.getpid()}-{round_no}"
    env["ELASTIC_JOB_NAME"] = job
    t0 = time.monotonic()
    try:
        with _daemon_for(peer) as options:
            cmd = [python, *([str(PEERS_DIR / peer.launcher[0]), *peer.launcher[1:]] if peer.launcher else []),
                   str(PEERS_DIR / peer.script), "--out", out, "--scratch", scratch, "--mib", str(conf.mib),
                   *conf.harness_args, *(f"--option={o}" for o in (*peer.options, *options, f"job={job}"))]
            log = os.path.join(scratch, "log.txt")
            with open(log, "w", encoding="utf-8") as f:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                      timeout=conf.timeout_s, start_new_session=True)
            if os.path.exists(out):
                result = json.loads(Path(out).read_text(encoding="utf-8"))
                if result.get("ok"):
                    return Outcome(result=result, wall_s=time.monotonic() - t0)
                return Outcome(error=result.get("error") or "failed", wall_s=time.monotonic() - t0)
            text = Path(log).read_text(encoding="utf-8", errors="replace")
            return Outcome(error=_why(text) or f"exited with {proc.returncode} and no result",
                           wall_s=time.monotonic() - t0)
    except subprocess.TimeoutExpired:
        return Outcome(error=f"no result within {conf.timeout_s:.0f} s", wall_s=time.monotonic() - t0)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for p in Path(SHM_DIR).glob(f"{job}_*"):
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def _daemon_for(peer: Peer) -> Iterator[tuple[str, ...]]:
    """A fresh shardguard node daemon for the peer that needs one (as each peer gets a fresh process)."""
    if not peer.daemon:
        yield ()
        return
    from bench_node import bench_daemon

    with tempfile.TemporaryDirectory(prefix=f"{SHM_PREFIX}-daemon-") as tmp, \
            bench_daemon(tmp, prefix=f"{SHM_PREFIX}-sg") as (sock, pid):
        yield (f"socket={sock}", f"daemon_pid={pid}")


def run_rounds(peers: list[Peer], conf: Conf) -> tuple[list[dict[str, Outcome]], list[dict[str, Any]]]:
    """``conf.rounds`` rounds, each running every peer once, starting one later in the list each time."""
    rounds: list[dict[str, Outcome]] = []
    loads: list[dict[str, Any]] = []
    for r in range(conf.rounds):
        order = peers[r % len(peers):] + peers[: r % len(peers)]
        start = load_average()
        print(f"\nround {r + 1}/{conf.rounds}: {', '.join(p.key for p in order)} (loadavg {start})", flush=True)
        outcomes: dict[str, Outcome] = {}
        for peer in order:
            o = outcomes[peer.key] = run_peer(peer, conf, r)
            if o.result is not None:
                loop = o.result["loop"]
                print(f"  {peer.key:<13} blocked {_ms(loop['blocked_s'])} ms, in memory {_ms(loop['complete_s'])} ms, "
                      f"restore {_ms(o.result['restore_s'])} ms ({o.wall_s:.0f} s, loadavg {load_average()})",
                      flush=True)
            else:
                print(f"  {peer.key:<13} did not run: {o.error}", flush=True)
        rounds.append(outcomes)
        loads.append({"round": r + 1, "order": [p.key for p in order], "start": start, "end": load_average()})
    return rounds, loads


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.1f}"


# ------------------------------------------------------------------- reporting

FIGURES = {  # column key: (how to read it off a harness result)
    "blocked": lambda r: r["loop"]["blocked_s"],
    "extra": lambda r: r["loop"]["extra_per_ckpt_s"],
    "in_memory": lambda r: r["loop"]["complete_s"],
    "restore": lambda r: r["restore_s"],
}


def summarise(peers: list[Peer], rounds: list[dict[str, Outcome]]) -> list[dict[str, Any]]:
    """Per peer: the median over rounds of each figure, of its ratio to the floor measured in the
    same process, and of its ratio to shardguard's in the same round."""
    rows: list[dict[str, Any]] = []
    for peer in peers:
        ok = [(r, o[peer.key].result) for r, o in enumerate(rounds) if o[peer.key].result is not None]
        errors = [o[peer.key].error for o in rounds if o[peer.key].error]
        row: dict[str, Any] = {"key": peer.key, "name": peer.name, "rounds_ok": len(ok), "rounds": len(rounds)}
        if not ok:
            row["error"] = errors[0] if errors else "did not run"
            rows.append(row)
            continue
        for col, get in FIGURES.items():
            values = [(r, get(res), res["floor"]["floor_s"]) for r, res in ok]
            row[f"{col}_ms"] = _median([v * 1e3 for _, v, _ in values if v is not None])
            row[f"{col}_floor"] = _median([v / f for _, v, f in values if v is not None])
            base = [(v, _get(rounds[r].get(BASE), get)) for r, v, _ in values]
            row[f"{col}_sg"] = _median([v / b for v, b in base if v is not None and b])
        first = ok[0][1]
        row.update(
            taken=f"{sum(res['loop']['taken'] for _, res in ok)}/{sum(res['loop']['steps'] for _, res in ok)}",
            floor_ms=_median([res["floor"]["floor_s"] * 1e3 for _, res in ok]),
            restore_verified=all(res["restore_verified"] for _, res in ok),
            restore_way=first["restore_way"],
            cpu_ms=_median([res["loop"]["extra_cpu_per_ckpt_s"] * 1e3 for _, res in ok
                            if res["loop"]["extra_cpu_per_ckpt_s"] is not None]),
            other_cpu_ms=_median([res["loop"]["daemon_cpu_per_ckpt_s"] * 1e3 for _, res in ok
                                  if res["loop"]["daemon_cpu_per_ckpt_s"] is not None]),
            extra_figures=[res["extra"] for _, res in ok],
        )
        if errors:
            row["error"] = f"{len(errors)} of {len(rounds)} rounds failed: {errors[0]}"
        rows.append(row)
    return rows


def _get(outcome: Outcome | None, get: Any) -> float | None:
    return get(outcome.result) if outcome is not None and outcome.result is not None else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def report(rows: list[dict[str, Any]], conf: Conf, loads: list[dict[str, Any]], state: dict[str, Any]) -> None:
    floors = [r["floor_ms"] for r in rows if r.get("floor_ms")]
    floor = statistics.median(floors) if floors else None
    print(f"\nbench_peers: {conf.rounds} rotating rounds, one process per peer per round; state "
          f"{state.get('bytes', 0) / 2**20:.0f} MiB in {state.get('tensors', '?')} tensors (bench_node.llm_state), "
          f"{state.get('compute_ms', '?')} ms of compute per step on {state.get('threads', '?')} thread(s)")
    table = [{"name": "memcpy floor (reference)", "blocked_ms": floor, "blocked_floor": 1.0, "extra_ms": floor,
              "extra_floor": 1.0, "in_memory_ms": floor, "in_memory_floor": 1.0, "restore_ms": floor,
              "restore_floor": 1.0}]
    table += [r if "blocked_ms" in r else {"name": r["name"], "blocked_ms": "did not run (below)"} for r in rows]
    cols = [("name", "per checkpoint, median of rounds", "{}")]
    for col, head in (("blocked", "blocked"), ("extra", "extra"), ("in_memory", "in memory"), ("restore", "restore")):
        cols += [(f"{col}_ms", f"{head} ms", "{:.1f}"), (f"{col}_floor", "/floor", "{:.2f}x"),
                 (f"{col}_sg", "/sg", "{:.2f}x")]
    print_rows(table, cols + [("taken", "taken", "{}")],
               title="blocked: the call + what optimizer.step() waits; extra: wall time over a loop without "
               "checkpoints; in memory: until it outlives the trainer; restore: back into the state's tensors. "
               "/floor: over the memcpy of the same bytes measured in the same process; /sg: over shardguard's "
               "figure in the same round")
    print("\nnotes:")
    for r in rows:
        if "blocked_ms" in r:
            cpu = f"trainer CPU +{r['cpu_ms']:.0f} ms/ckpt" if r.get("cpu_ms") is not None else ""
            other = f", other process {r['other_cpu_ms']:.0f} ms/ckpt" if r.get("other_cpu_ms") else ""
            print(f"  {r['name']}: restore = {r['restore_way']}; verified {r['restore_verified']}; "
                  f"{r['rounds_ok']}/{r['rounds']} rounds; {cpu}{other}")
        if r.get("error"):
            print(f"  {r['name']}: {'' if 'blocked_ms' in r else 'DID NOT RUN: '}{r['error']}")
    for ld in loads:
        print(f"  round {ld['round']}: loadavg {ld['start']} -> {ld['end']}")


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="create or update the peers' venvs first")
    parser.add_argument("--install-only", action="store_true", help="only create or update the venvs")
    parser.add_argument("--rounds", type=int, default=None, help="rotating rounds (default 3)")
    parser.add_argument("--mib", type=int, default=None, help="state size in MiB (default 512, quick 128)")
    parser.add_argument("--compute-s", type=float, default=0.3, help="compute per step")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(p.key for p in PEERS)}")
    parser.add_argument("--timeout-s", type=float, default=RUN_TIMEOUT_S, help="per peer process")
    args = parser.parse_args()
    peers = [p for p in PEERS if not args.only or p.key in args.only.split(",")]
    if args.only and BASE not in args.only.split(","):
        peers.insert(0, PEERS[0])  # the ratios need shardguard in every round
    if args.install or args.install_only:
        for venv in VENV_LIST:
            if any(p.venv is venv for p in peers):
                install(venv)
        if args.install_only:
            return
    signal.signal(signal.SIGTERM, raise_interrupt)
    quick = args.quick
    conf = Conf(
        rounds=args.rounds or args.repeat or 3, mib=args.mib or (128 if quick else 512), timeout_s=args.timeout_s,
        harness_args=["--compute-s", str(args.compute_s), *(["--steps", "3", "--min-taken", "2"] if quick else [])],
    )
    t0 = time.monotonic()
    load_start = load_average()
    rounds, loads = run_rounds(peers, conf)
    rows = summarise(peers, rounds)
    some = next((o.result for rnd in rounds for o in rnd.values() if o.result is not None), None) or {}
    state = {"bytes": some.get("bytes", conf.mib * 2**20), "tensors": some.get("tensors"),
             "compute_ms": round(args.compute_s * 1e3), "threads": some.get("compute", {}).get("threads")}
    report(rows, conf, loads, state)
    elapsed = time.monotonic() - t0
    print(f"\ntotal {elapsed:.0f} s, load average {load_start} -> {load_average()}")
    write_results("peers" + ("_quick" if quick else ""), {
        "config": {"rounds": conf.rounds, "mib": conf.mib, "harness_args": conf.harness_args,
                   "peers": [p.key for p in peers]},
        "state": state, "load_average": {"start": load_start, "end": load_average(), "rounds": loads},
        "elapsed_s": elapsed, "rows": rows,
        "runs": [{k: {"result": o.result, "error": o.error, "wall_s": o.wall_s} for k, o in rnd.items()}
                 for rnd in rounds],
    })


if __name__ == "__main__":
    main()
