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
``announce``       a group leader announced the step to some nodes of its group, not all
``sync``           a restarted or replacement daemon starts catching up
``mid-rebuild``    a rebuilding daemon wrote part of a rank, not all of it
=================  ===========================================================

Actions: ``kill`` (SIGKILL, the default: a crash), ``stop`` (SIGSTOP: a hung
daemon, until someone sends SIGCONT or SIGKILL), ``drop`` (the operation at
hand fails as a dropped connection would: :class:`PeerUnavailableError`),
``slow`` (the operation at hand stalls for ``SLOW_S`` seconds: a slow peer).
The parsing, the once-per-process registry and the actions are
``shardguard.proto.faults``, shared with the trainer's client and the tier.
"""

from __future__ import annotations

import logging
import os

from shardguard.daemon.errors import PeerUnavailableError
from shardguard.proto import faults

logger = logging.getLogger(__name__)

ENV = "SHARDGUARD_TEST_DAEMON_FAULT"
POINTS = ("seal", "sealed", "mid-transfer", "mid-encode", "partial-parity", "announce", "sync",
          "mid-rebuild")
ACTIONS = faults.ACTIONS
#: How long ``slow`` holds the operation at hand (a slow peer); tests may set it.
SLOW_S = float(os.environ.get("SHARDGUARD_TEST_DAEMON_FAULT_SLOW_S", str(faults.SLOW_S)))

_ARMED = faults.Faults.from_env(ENV, points=POINTS, actions=ACTIONS, who_in_spec=True,
                                slow_s=SLOW_S, drop_error=PeerUnavailableError, log=logger,
                                who_name="node")


def point(name: str, step: int, node: int | None) -> None:
    """Fire the fault armed at ``name`` for this step and node, if any."""
    _ARMED.point(name, step, node)
