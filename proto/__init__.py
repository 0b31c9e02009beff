"""The contracts shared by the client and the daemon.

``agent.proto`` is the client↔daemon gRPC service (package ``shardguard.v1``);
its generated modules (``agent_pb2``, ``agent_pb2_grpc``) are produced at build
time. ``arena`` is the /dev/shm arena format, ``manifest`` the plain-data
manifest codec, ``errors`` the typed errors that travel over the wire.
"""

import os as _os

# gRPC core runs fork handlers around every fork() of a process that uses it (grpcio
# 1.85 turns them on by default): with a call in flight on another thread they log
# "skipping fork() handlers", can abort the child ("Check failed: next_worker->state ==
# KICKED") and were seen to hang the parent inside fork() (a test's subprocess start).
# A trainer forks all the time (DataLoader workers, torchrun, subprocess) while its copy
# thread talks to the daemon, and shardguard never uses a channel in a forked child; so
# the handlers are off unless the user set GRPC_ENABLE_FORK_SUPPORT. Set here, before
# any module of ours imports grpc (gRPC reads it when it first initialises).
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

