"""Named fault-injection points for tests: the one mechanism every shardguard process uses
(standard library only, so that any process can arm it before its heavy imports).

A process arms faults from one environment variable (:meth:`Faults.from_env`), and
calls :meth:`Faults.point` (or asks :meth:`Faults.fires`) at each named instant of its
protocol. Without the variable a point costs one attribute test. Each side keeps its
own variable, points and meaning of "who":

=================================  ==========================  ===================
variable                           syntax                      who
=================================  ==========================  ===================
``SHARDGUARD_TEST_FAULT``          ``point@step``              the trainer rank in
                                                               ``..._FAULT_RANK``
``SHARDGUARD_TEST_DAEMON_FAULT``   ``point@step@node[:action]  the job's node
                                   [,...]``
``SHARDGUARD_TEST_TIER_FAULT``     ``point@step[,...]``        (anyone)
=================================  ==========================  ===================

An armed fault fires once per process, the first time its point is reached at a
step >= its step (trainers may skip a step) by its "who" (any, when it names none).
Actions: ``kill`` (SIGKILL, the default: a crash), ``stop`` (SIGSTOP: a hung process,
until someone sends SIGCONT or SIGKILL), ``drop`` (the operation at hand fails as a
dropped connection would: the side's ``drop_error``), ``slow`` (the operation at
hand stalls for ``slow_s`` seconds). A side allows the actions that mean something
to it; ``:action`` is accepted where it allows more than one.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ACTIONS = ("kill", "stop", "drop", "slow")
#: How long ``slow`` holds the operation at hand unless a side says otherwise.
SLOW_S = 3.0


@dataclass(frozen=True)
class Fault:
    """One armed fault: at ``point``, from ``step`` on, for ``who`` (None: anyone)."""

    point: str
    step: int
    who: int | None = None
    action: str = "kill"


class Faults:
    """The faults armed in this process, and what firing one does.

    Args:
        armed: the faults.
        slow_s: how long ``slow`` stalls.
        drop_error: what ``drop`` raises (the daemon's: PeerUnavailableError).
        spell_who: whether a fault's name carries its who (``point@step@who``).
        spell_action: whether a fault's name carries its action (``...:action``).
        log: where a firing fault is logged (None: not logged), with the step and, under
            ``who_name`` (``"node"``, ``"rank"``; None: not at all), the who in the record's
            extras.
    """

    def __init__(self, armed: Sequence[Fault] = (), *, slow_s: float = SLOW_S,
                 drop_error: type[Exception] = ConnectionError, spell_who: bool = False,
                 spell_action: bool = False, log: logging.Logger | None = None,
                 who_name: str | None = None) -> None:
        self.armed = tuple(armed)
        self.slow_s = slow_s
        self.drop_error = drop_error
        self._spell = (spell_who, spell_action)
        self._log = log
        self._who_name = who_name
        self._fired: set[int] = set()
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, env: str, *, points: Sequence[str], actions: Sequence[str] = ("kill",),
                 who_in_spec: bool = False, who_env: str | None = None,
                 environ: Mapping[str, str] = os.environ, **kwargs: Any) -> "Faults":
        """The faults ``environ[env]`` arms (none when it is unset or empty).

        Args:
            points: the point names this side has.
            actions: the actions this side allows (the first is the default).
            who_in_spec: a fault names its who (``point@step@who``); otherwise
                ``who_env`` (if given and set) names the one who for every fault.
            kwargs: passed on to :class:`Faults`.

        Raises:
            ValueError: a fault of another syntax, point or action.
        """
        armed = parse(environ.get(env, ""), label=env, points=points, actions=actions,
                      who_in_spec=who_in_spec)
        if who_env is not None and environ.get(who_env) is not None:
            who = int(environ[who_env])
            armed = [Fault(f.point, f.step, who, f.action) for f in armed]
        return cls(armed, spell_who=who_in_spec, spell_action=len(actions) > 1, **kwargs)

    def fires(self, point: str, step: int, who: int | None = None) -> Fault | None:
        """The fault armed at ``point`` that fires now, if any (each fires once)."""
        for i, f in enumerate(self.armed):
            if f.point != point or step < f.step or (f.who is not None and f.who != who):
                continue
            with self._lock:
                if i in self._fired:
                    continue
                self._fired.add(i)
            if self._log is not None:
                extra: dict[str, object] = {"step": step}
                if self._who_name is not None:
                    extra[self._who_name] = who
                self._log.error("test fault %s fires at step %d", self.name(f), step,
                                extra=extra)
            return f
        return None

    def point(self, point: str, step: int, who: int | None = None) -> None:
        """Do what the fault armed at ``point`` does, if one fires now."""
        if not self.armed:
            return
        f = self.fires(point, step, who)
        if f is not None:
            self.act(f)

    def act(self, f: Fault) -> None:
        if f.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif f.action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif f.action == "slow":
            time.sleep(self.slow_s)
        elif f.action == "drop":
            raise self.drop_error(f"test fault {f.point}: connection dropped")

    def name(self, f: Fault) -> str:
        """``f`` as its side spells it (``point@step[@who][:action]``)."""
        spell_who, spell_action = self._spell
        return (f"{f.point}@{f.step}" + (f"@{f.who}" if spell_who else "")
                + (f":{f.action}" if spell_action else ""))


def parse(spec: str, *, label: str, points: Sequence[str], actions: Sequence[str] = ("kill",),
          who_in_spec: bool = False) -> list[Fault]:
    """The faults of ``point@step[@who][:action][,...]`` (see the module's table).

    Raises:
        ValueError: an item of another syntax, or an unknown point or action.
    """
    armed = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        where, _, action = item.partition(":")
        parts = where.split("@")
        action = action or actions[0]
        if len(parts) != (3 if who_in_spec else 2) or not all(
                p.isdigit() for p in parts[1:]):
            raise ValueError(f"{label}: {item!r} is not point@step{'@who' if who_in_spec else ''}"
                             f"{'[:action]' if len(actions) > 1 else ''} (points {tuple(points)})")
        if parts[0] not in points or action not in actions:
            raise ValueError(f"{label}: unknown point or action in {item!r} "
                             f"(points {tuple(points)}, actions {tuple(actions)})")
        armed.append(Fault(parts[0], int(parts[1]), int(parts[2]) if who_in_spec else None,
                           action))
    return armed
