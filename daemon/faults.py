"""Named fault-injection points in the daemon: for tests, off unless a test turns them on.

``SHARDGUARD_TEST_DAEMON_FAULT=point@step@node[:action][,...]`` arms a fault:
the first time this daemon, as node ``node`` of a multi-node job, reaches
``point`` at a step >= ``step`` (trainers may skip a step), it does
``action``. Each armed fault fires once per process. Without the variable a
point costs one dictionary lookup.

Points, one per protocol step (DESIGN.md §3-§5):

=================  ===========================================================
``seal``           a rank's seal is validated, not yet recorded
``sealed``         every local rank sealed the step, no piece sent yet
``mid-transfer``   a source sent the first frame of a piece, not the rest
``mid-encode``     an encoder received data frames of a stripe, not all
``partial-parity`` an encoder finished its parity, not forwarded or reported it
``announce``       the coordinator announced the step to some nodes, not all
``sync``           a restarted or replacement daemon starts catching up
``mid-rebuild``    a rebuilding daemon wrote part of a rank, not all of it
=================  ===========================================================

Actions: ``kill`` (SIGKILL, the default: a crash), ``stop`` (SIGSTOP: a hung
daemon, until someone sends SIGCONT or SIGKILL), ``drop`` (the operation at
hand fails as a dropped connection would: :class:`PeerUnavailableError`),
``slow`` (the operation at hand stalls for ``SLOW_S`` seconds: a slow peer).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from shardguard.daemon.errors import PeerUnavailableError

logger = logging.getLogger(__name__)

ENV = "SHARDGUARD_TEST_DAEMON_FAULT"
POINTS = ("seal", "sealed", "mid-transfer", "mid-encode", "partial-parity", "announce", "sync",
          "mid-rebuild")
ACTIONS = ("kill", "stop", "drop", "slow")
#: How long ``slow`` holds the operation at hand (a slow peer); tests may set it.
SLOW_S = float(os.environ.get("SHARDGUARD_TEST_DAEMON_FAULT_SLOW_S", "3.0"))


def _parse(spec: str) -> list[tuple[str, int, int, str]]:
    armed = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        where, _, action = item.partition(":")
        point, step, node = where.split("@")
        action = action or "kill"
        if point not in POINTS or action not in ACTIONS:
            raise ValueError(f"{ENV}: unknown point or action in {item!r} "
                             f"(points {POINTS}, actions {ACTIONS})")
        armed.append((point, int(step), int(node), action))
    return armed


_ARMED = _parse(os.environ.get(ENV, ""))
_FIRED: set[int] = set()
_LOCK = threading.Lock()


def point(name: str, step: int, node: int | None) -> None:
    """Fire the fault armed at ``name`` for this step and node, if any."""
    if not _ARMED or node is None:
        return
    for i, (p, s, n, action) in enumerate(_ARMED):
        if p != name or step < s or node != n:
            continue
        with _LOCK:
            if i in _FIRED:
                continue
            _FIRED.add(i)
        logger.error("test fault %s@%d@%d:%s fires at step %d", p, s, n, action, step,
                     extra={"step": step, "node": node})
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action == "slow":
            time.sleep(SLOW_S)
        else:
            raise PeerUnavailableError(f"test fault {p}: connection dropped")
