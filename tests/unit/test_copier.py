"""The copy thread's CPU priority: lowered by default, configurable, bad values refused."""

from __future__ import annotations

import os
import threading

import pytest

from shardguard.client import copier
from shardguard.client.copier import COPY_NICE_ENV, Copier, copy_nice
from shardguard.proto.errors import ConfigError


def nice_of_copy_thread(c: Copier) -> int:
    seen: list[int] = []
    done = threading.Event()

    def job() -> None:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        done.set()
    c._queue.put(job)
    assert done.wait(10)
    c.close(10)
    return seen[0]


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="no per-thread priority here")
@pytest.mark.parametrize("nice", [0, 10, 19])
def test_the_copy_thread_runs_that_much_nicer_than_the_trainer(nice: int) -> None:
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert nice_of_copy_thread(Copier("j", 0, nice)) == min(19, mine + nice)
    # The trainer's own thread is untouched.
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_the_default_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(COPY_NICE_ENV, raising=False)
    assert copy_nice() == copier.COPY_NICE == 0
    monkeypatch.setenv(COPY_NICE_ENV, "10")
    assert copy_nice() == 10


@pytest.mark.parametrize("bad", ["-1", "20", "ten", "1.5"])
def test_a_bad_setting_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(COPY_NICE_ENV, bad)
    with pytest.raises(ConfigError, match=COPY_NICE_ENV):
        copy_nice()
