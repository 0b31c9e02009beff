"""A trainer forks while its client talks to the daemon (DataLoader workers, torchrun,
subprocess): gRPC's fork handlers must not run (proto/__init__.py).

With grpcio 1.85 they are on by default: a fork made while another thread is in a call
logged "Other threads are currently calling into gRPC, skipping fork() handlers",
sometimes aborted the child ("Check failed: next_worker->state == KICKED"), and once hung
the test process inside fork() (make test, test_hostile_local, 2026-12-04). Real daemon,
real forks, the user's environment without GRPC_ENABLE_FORK_SUPPORT.
"""

from __future__ import annotations

import os
import subprocess
import sys

_FORKER = r"""
import os, sys, threading
import shardguard.client  # what a trainer imports, before anything else of gRPC
from shardguard.client.session import ask
from shardguard.proto import agent_pb2 as pb

stop, calls = False, 0

def talk():
    global calls
    while not stop:
        ask(sys.argv[1], "Status", pb.StatusRequest(), 5.0)
        calls += 1

t = threading.Thread(target=talk)
t.start()
for _ in range(200):  # forked as DataLoader workers are: no exec
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
stop = True
t.join()
print("forks 200 calls", calls, "fork support", os.environ["GRPC_ENABLE_FORK_SUPPORT"])
"""


def test_forks_while_a_call_is_in_flight_run_no_grpc_fork_handler(daemon) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    out = subprocess.run([sys.executable, "-c", _FORKER, daemon.socket], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fork support false" in out.stdout, out.stdout
    assert "fork_posix" not in out.stderr and "Check failed" not in out.stderr, \
        out.stderr[-3000:]


def test_a_users_own_grpc_fork_setting_is_kept() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import os, shardguard.client; "
                               "print(os.environ['GRPC_ENABLE_FORK_SUPPORT'])"],
        env={**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "true"}, capture_output=True,
        text=True, timeout=120, check=True)
    assert out.stdout.strip() == "true"
