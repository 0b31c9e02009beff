"""A model for operators: what each ``(group_size, parity)`` costs a job and how safe it is.

Pure functions and frozen dataclasses, no I/O (``shardguard plan`` prints them). Every
figure comes from the placement of DESIGN.md §3 (:mod:`placement`), for a job of
``nodes`` nodes each holding ``state_bytes`` of training state (its payload ``D``):

- **Network per snapshot**, per node and each way: its ``k`` data pieces out, and as
  encoder ``m - 1`` parity pieces to the other holders, ``(k + m - 1) * P`` with
  ``P = source_piece_bytes(state, k)`` (``GroupLayout.load``); as much comes in. The
  **NIC share** is that over the snapshot interval at the NIC's line rate (one
  direction; a share above 1 means snapshots are skipped until the wire catches up).
- **Memory per node**: ``m * P`` of parity per step, kept for the restorable step and
  the one in flight (``2 * m * P``), next to the two arena slots per rank
  (``2 * state``). Parity per data byte is ``m * P / state`` (about ``m / k``).
- **Rebuild of one lost node**: its replacement holds nothing, and the lost node held
  exactly one piece of each of its group's ``g`` stripes (``k`` data pieces: its
  payload; ``m`` parity pieces). Each is decoded from ``k`` surviving pieces of its
  stripe (``GroupLayout.rebuild_sources``), so the replacement fetches ``g * k``
  pieces of ``P``: about ``g * state`` bytes, spread over the ``g - 1`` survivors. Its
  NIC (ingress) is the bottleneck: rebuild time is those bytes at line rate (decode
  CPU, detection and the relaunch are not in it).
- **Losing a step**: a group loses its state when one of its nodes fails while
  ``m`` others of the group are still down (failed within the last rebuild window
  ``w``). Node failures are exponential with mean ``mtbf_hours`` (independent,
  replaced nodes as good as new), so a node fails within ``w`` with
  ``p = 1 - exp(-w / MTBF)``. A group of ``g`` nodes then loses its state at the rate
  ``g / MTBF * P[Binomial(g - 1, p) >= m]`` per hour; over all groups and a horizon of
  ``H`` hours the expected losses are ``E = H * sum(rates)`` and the probability of at
  least one is ``1 - exp(-E)``. The window is ``max(rebuild_hours_floor, rebuild
  time)``: detecting the loss, relaunching the job and bringing up a replacement take
  longer than the transfer.

  The simpler count "more than ``m`` of a group's ``g`` nodes fail inside one window,
  over ``H / w`` back-to-back windows" (:func:`tiled_loss_probability`) misses the
  failures that straddle two windows: for small ``p`` it is ``m + 1`` times lower
  than the rate above, so it is kept for comparison only.
"""

from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from shardguard.daemon.coding import placement
from shardguard.daemon.errors import ConfigError

HOURS_PER_YEAR = 365.25 * 24
#: Without a measured figure: detecting a lost node, relaunching the job and bringing
#: up a replacement keep a group exposed for about an hour.
DEFAULT_REBUILD_HOURS_FLOOR = 1.0
DEFAULT_JOB_DAYS = 30.0
DEFAULT_GROUP_SIZES = (4, 8, 16)
DEFAULT_PARITIES = (1, 2)


@dataclass(frozen=True)
class Job:
    """What the operator knows about a job and its machines.

    Args:
        nodes: nodes of the job.
        state_bytes: training state per node (all its ranks' snapshots).
        mtbf_hours: mean time between failures of one node (anything that loses its
            memory: hardware, kernel, power).
        nic_gbps: NIC line rate per node in Gb/s (bits), each way.
        interval_s: seconds between snapshots.
        rebuild_hours_floor: the least a group stays exposed after a loss.
        job_days: the length of one training job, the second horizon.
        placement: ``contiguous`` or ``stride`` (:data:`placement.PLACEMENTS`).
    """

    nodes: int
    state_bytes: int
    mtbf_hours: float
    nic_gbps: float
    interval_s: float
    rebuild_hours_floor: float = DEFAULT_REBUILD_HOURS_FLOOR
    job_days: float = DEFAULT_JOB_DAYS
    placement: str = "contiguous"

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"a job needs at least one node, got {self.nodes}")
        if self.state_bytes < 1:
            raise ConfigError(f"state per node must be > 0 bytes, got {self.state_bytes}")
        for name in ("mtbf_hours", "nic_gbps", "interval_s", "job_days"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.rebuild_hours_floor < math.inf:
            raise ConfigError(f"rebuild_hours_floor must be >= 0, got {self.rebuild_hours_floor}")

    @property
    def nic_bytes_per_s(self) -> float:
        return self.nic_gbps * 1e9 / 8

    @property
    def node_failures_per_year(self) -> float:
        """Node failures the whole job expects in a year."""
        return self.nodes * HOURS_PER_YEAR / self.mtbf_hours


@dataclass(frozen=True)
class Option:
    """One ``(group_size, parity)`` for a :class:`Job`. Per-node figures are the worst
    node's (with contiguous placement the remainder joins the last group, whose nodes
    send less but take longer to rebuild)."""

    group_size: int
    parity: int
    k: int
    #: Group sizes the placement makes, as ``{size: groups of that size}``.
    groups: dict[int, int]
    piece_bytes: int
    net_bytes_per_snapshot: int
    nic_share: float
    snapshot_wire_s: float
    parity_bytes: int
    parity_memory_bytes: int
    arena_bytes: int
    parity_per_data_byte: float
    rebuild_fetch_pieces: int
    rebuild_fetch_bytes: int
    rebuild_s: float
    window_h: float
    node_fails_in_window: float
    losses_per_year: float
    p_loss_job: float
    p_loss_year: float
    p_loss_job_tiled: float

    @property
    def years_between_losses(self) -> float:
        return math.inf if self.losses_per_year == 0 else 1 / self.losses_per_year

    def as_dict(self) -> dict:
        d = asdict(self)
        d["groups"] = {str(size): n for size, n in self.groups.items()}
        # JSON has no infinity: no loss expected is null.
        d["years_between_losses"] = self.years_between_losses if self.losses_per_year else None
        return d


@dataclass(frozen=True)
class Unfit:
    """A ``(group_size, parity)`` the job cannot use, and why."""

    group_size: int
    parity: int
    reason: str


# ------------------------------------------------------------------ the loss model


def node_failure_probability(window_h: float, mtbf_h: float) -> float:
    """Chance that one node fails within ``window_h`` hours (exponential failures)."""
    return -math.expm1(-window_h / mtbf_h)


def binomial_tail(n: int, p: float, at_least: int) -> float:
    """``P[Binomial(n, p) >= at_least]``, summed over the tail (no cancellation for tiny ``p``)."""
    if at_least <= 0:
        return 1.0
    if at_least > n:
        return 0.0
    return math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(at_least, n + 1))


def group_loss_rate(g: int, m: int, window_h: float, mtbf_h: float) -> float:
    """Expected state losses per hour of one group of ``g`` nodes with parity ``m``: a
    node fails (rate ``g / MTBF``) while at least ``m`` of the other ``g - 1`` are down."""
    p = node_failure_probability(window_h, mtbf_h)
    return g / mtbf_h * binomial_tail(g - 1, p, m)


def loss_probability(rate_per_h: float, horizon_h: float) -> float:
    """Chance of at least one loss in ``horizon_h`` hours at ``rate_per_h`` (Poisson)."""
    return -math.expm1(-rate_per_h * horizon_h)


def tiled_loss_probability(group_sizes: Iterable[int], m: int, window_h: float,
                           mtbf_h: float, horizon_h: float) -> float:
    """The simpler model: more than ``m`` nodes of some group fail inside one of
    ``horizon_h / window_h`` back-to-back windows. About ``m + 1`` times too optimistic
    for small ``p`` (it misses failures that straddle two windows); for comparison."""
    if window_h <= 0:
        return 0.0
    p = node_failure_probability(window_h, mtbf_h)
    windows = horizon_h / window_h
    log_safe = math.fsum(windows * math.log1p(-binomial_tail(g, p, m + 1)) for g in group_sizes)
    return -math.expm1(log_safe)


# ------------------------------------------------------------------ placement


@functools.lru_cache(maxsize=512)
def rebuild_fetch_pieces(g: int, m: int) -> int:
    """Pieces the replacement of one lost node of a group of ``g`` fetches.

    Walks the placement: for every stripe, the lost position's piece is decoded from
    the ``k`` pieces :meth:`GroupLayout.rebuild_sources` picks (any position: rotation
    makes them alike). ``g * k``.
    """
    layout = placement.GroupLayout(group=0, nodes=tuple(range(g)), m=m)
    lost = (0,)
    held = layout.lost_pieces(lost)  # stripe -> the lost node's pieces of it (one each)
    return sum(len(layout.rebuild_sources(s, lost)) for s, idx in held.items() if idx)


def option(job: Job, group_size: int, parity: int) -> Option:
    """The costs and the risk of ``(group_size, parity)`` for ``job``.

    Raises:
        ConfigError: the placement cannot make groups of more than ``parity`` nodes.
    """
    plan = placement.plan(job.nodes, group_size, parity, job.placement)
    sizes: dict[int, int] = {}
    for grp in plan.groups:
        sizes[grp.g] = sizes.get(grp.g, 0) + 1
    per_size = []  # (net bytes, P, parity bytes, rebuild pieces, rebuild bytes) per group size
    for g in sizes:
        layout = next(grp for grp in plan.groups if grp.g == g)
        p_bytes = placement.source_piece_bytes(job.state_bytes, layout.k)
        loads = [layout.load(pos, p_bytes) for pos in range(g)]
        pieces = rebuild_fetch_pieces(g, parity)
        per_size.append((max(max(ld.sent_bytes, ld.received_bytes) for ld in loads), p_bytes,
                         max(ld.parity_bytes for ld in loads), pieces, pieces * p_bytes))
    net, piece = max((row[0], row[1]) for row in per_size)
    par = max(row[2] for row in per_size)
    fetch, fetch_pieces = max((row[4], row[3]) for row in per_size)
    rebuild_s = fetch / job.nic_bytes_per_s
    window_h = max(job.rebuild_hours_floor, rebuild_s / 3600)
    rate = math.fsum(n * group_loss_rate(g, parity, window_h, job.mtbf_hours)
                     for g, n in sizes.items())
    horizon_job = job.job_days * 24
    wire_s = net / job.nic_bytes_per_s
    return Option(
        group_size=group_size, parity=parity, k=group_size - parity,
        groups=dict(sorted(sizes.items())), piece_bytes=piece,
        net_bytes_per_snapshot=net, nic_share=wire_s / job.interval_s, snapshot_wire_s=wire_s,
        parity_bytes=par, parity_memory_bytes=2 * par, arena_bytes=2 * job.state_bytes,
        parity_per_data_byte=par / job.state_bytes,
        rebuild_fetch_pieces=fetch_pieces, rebuild_fetch_bytes=fetch, rebuild_s=rebuild_s,
        window_h=window_h,
        node_fails_in_window=node_failure_probability(window_h, job.mtbf_hours),
        losses_per_year=rate * HOURS_PER_YEAR,
        p_loss_job=loss_probability(rate, horizon_job),
        p_loss_year=loss_probability(rate, HOURS_PER_YEAR),
        p_loss_job_tiled=tiled_loss_probability(
            [g for g, n in sizes.items() for _ in range(n)], parity, window_h,
            job.mtbf_hours, horizon_job),
    )


def table(job: Job, group_sizes: Sequence[int] = DEFAULT_GROUP_SIZES,
          parities: Sequence[int] = DEFAULT_PARITIES) -> list[Option | Unfit]:
    """One row per ``(group_size, parity)``, group size first; unusable ones as :class:`Unfit`."""
    rows: list[Option | Unfit] = []
    for g in group_sizes:
        for m in parities:
            try:
                rows.append(option(job, g, m))
            except ConfigError as exc:
                rows.append(Unfit(g, m, str(exc)))
    return rows


# ------------------------------------------------------------------ text


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _prob(p: float) -> str:
    if p == 0:
        return "0"
    if p >= 0.01:
        return f"{100 * p:.1f}%"
    return f"{p:.1e}"


def _groups(sizes: dict[int, int]) -> str:
    return " + ".join(f"{n}x{g}" for g, n in sizes.items())


def describe(job: Job) -> str:
    """The job in one paragraph, the assumptions named."""
    return (f"{job.nodes} nodes, {_size(job.state_bytes)} of state each, a snapshot every "
            f"{job.interval_s:g} s, {job.nic_gbps:g} Gb/s NICs (line rate), node MTBF "
            f"{job.mtbf_hours:g} h ({job.node_failures_per_year:.0f} node failures a year "
            f"in the job), rebuild window at least {job.rebuild_hours_floor:g} h, "
            f"{job.placement} placement.")


COLUMNS = ("g", "m", "groups", "net/snapshot", "NIC share", "parity mem", "parity/data",
           "rebuild fetch", "rebuild", "window", "P(loss) job", "P(loss) year")


NOTES = [
    "net/snapshot: bytes each node sends per snapshot, (k+m-1)*P with P = state/k (as much "
    "comes in); NIC share: of one direction at the interval (! above 100%: snapshots are "
    "skipped until the wire catches up).",
    "parity mem: 2*m*P per node (the restorable and the in-flight step), besides 2 x the "
    "state in arena slots; parity/data: m*P/state.",
    "rebuild: the replacement of a lost node fetches k pieces for each of the g pieces the "
    "lost node held (g*k*P, about g x the state), at line rate; window: max(floor, rebuild).",
    "P(loss): a node fails while m others of its group are down (failed within the window); "
    "exponential failures, independent nodes. Per-node figures are the worst node's.",
]


def int_list(text: str) -> tuple[int, ...]:
    """``"4,8,16"`` -> ``(4, 8, 16)`` (a command-line list).

    Raises:
        ValueError: not a comma-separated list of positive integers.
    """
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise ValueError(text)
    return values


def format_table(job: Job, rows: Sequence[Option | Unfit]) -> str:
    """The table ``shardguard plan`` prints: a line on the job, a row per option, notes."""
    cells = [list(COLUMNS)]
    cells[0][10] = f"P(loss) {job.job_days:g} d"
    notes = []
    for r in rows:
        if isinstance(r, Unfit):
            notes.append(f"g={r.group_size} m={r.parity}: {r.reason}")
            continue
        share = f"{100 * r.nic_share:.1f}%" + (" !" if r.nic_share > 1 else "")
        cells.append([str(r.group_size), str(r.parity), _groups(r.groups),
                      _size(r.net_bytes_per_snapshot), share, _size(r.parity_memory_bytes),
                      f"{100 * r.parity_per_data_byte:.0f}%", _size(r.rebuild_fetch_bytes),
                      _duration(r.rebuild_s), _duration(r.window_h * 3600),
                      _prob(r.p_loss_job), _prob(r.p_loss_year)])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = [describe(job), ""]
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            lines.append("-" * len(lines[-1]))
    lines.append("")
    lines += [textwrap.fill(note, 100, subsequent_indent="  ") for note in NOTES + notes]
    return "\n".join(lines)


def as_json(job: Job, rows: Sequence[Option | Unfit]) -> dict:
    """The table as plain data (``shardguard plan --json``)."""
    return {"job": asdict(job),
            "options": [r.as_dict() if isinstance(r, Option) else asdict(r) for r in rows]}
