"""torch.distributed.checkpoint (DCP) on shardguard: a StorageWriter, a StorageReader, and
helpers that turn sharded (DTensor) state into plain state and back.

    client = sg.connect_dcp()            # its own gloo group: safe for dcp.async_save
    dcp.save(state, checkpoint_id=step, storage_writer=sg.ShardguardWriter(client))
    dcp.load(state, storage_reader=sg.ShardguardReader(client))      # same world size
    dcp.load(state, storage_reader=sg.ShardguardReader("run-w4"))    # any world size

**Save.** DCP plans with its own collectives, then calls ``write_data`` on every
rank, in the same order, between the plan scatter and the result gather. That is
where each rank takes its snapshot (``Client.snapshot``, whose one collective every
rank then enters in the same place). A rank's snapshot holds the bytes of the items
of its final plan (tensor chunks as DCP resolved them, BYTE_IO items as bytes), a
plain-data description of each item (fqn, offsets, chunk box, dtype, global size)
and its plan's ``planner_data``. Nothing is written after the snapshot: at load, the
reader rebuilds DCP's ``Metadata`` from every old rank's descriptions with DCP's own
``create_default_global_save_plan`` (the function ``DefaultSavePlanner`` derives it
with), so the coordinator's ``finish`` has nothing left to store and no rank is
special. ``write_data`` first waits for the writer's previous step to be restorable,
so every rank agrees to take the step (``dcp.save`` saves or raises, it never skips),
and returns once the bytes are in the node's shared memory: the caller may change
the state afterwards; protection across nodes finishes in the background
(``client.wait(restorable=True)``).

**async_save.** DCP runs ``write_data`` on its own thread, and with it the client's
collective: the client's group must not be one the training loop uses meanwhile.
:func:`connect_dcp` gives the client a gloo group of its own; pass the same group to
``async_save(process_group=...)``, DCP's collectives then run on it from the same
thread, in order. A writer whose client agrees on the default group refuses to run
off the main thread (every rank raises the same error; nobody hangs).

**Load, and another world size.** DCP's metadata maps every chunk to the old rank
that wrote it, and any new rank may need any chunk. The reader restores each old
rank's snapshot once, from the daemon of the node that holds it, on one new rank of
that node, then moves exactly the boxes DCP's load plan asks for between new ranks
with one ``all_to_all`` over a gloo group. Two ways to get the old ranks:

- ``ShardguardReader(client)``: the job's own client, same world size; every rank
  restores its own snapshot (``client.restore``: one agreed step, one outcome).
- ``ShardguardReader("job")``: any world size. A daemon keeps a job's world size
  for the job's life (it refuses the job's snapshots to a world of another size),
  so a resized run trains under a new job name (``<name>-w<world>``;
  :func:`newest_job` finds the newest) and reads the old one: each new rank asks its
  daemon which old ranks it holds; a node's old ranks are spread over the new ranks
  on that node, which register as those ranks (with the old job's world size, node
  list and erasure code, so the daemon's record of the job is unchanged), restore
  them and let go.

**Limits.** A job holds one checkpoint: its newest restorable step (and, while its
slots are intact, the one before); ``checkpoint_id`` names the step to save as, not a
place that keeps it, so a history of checkpoints needs a second writer (files) every
so often. A resharding load reads old ranks through /dev/shm, so every node of
the old job must have its daemon up (with its ranks, rebuilt if it was replaced) and
at least one new rank: resize on the same nodes; a lost node is rebuilt by resuming
at the old world size first. A new rank holds the old ranks it restored while the
load runs (about ``old world / new world`` of its share, plus the exchange buffers).
Every rank of the client's world takes part in every save, and DCP's process group
must hold them in the same rank order (no HSDP replica-only saves); one save at a
time per client (wait for an ``async_save``'s future before the next save); the
writer stays in its process (``async_save``'s thread executor, not the process one). Planners that
put more into ``Metadata`` than ``state_dict_metadata`` and ``planner_data`` are not
reproduced. DCP itself unpickles BYTE_IO items (``torch.load(weights_only=False)``),
as it does from files: a DCP load trusts the checkpoint's writer, unlike
``client.restore`` with ``allow_pickle=False``.

**Sharded state through the native client.** ``client.snapshot`` stores dense
tensors; a DTensor is not one (its bytes live on many ranks). The native path goes
through :func:`sharded_state_dict_to_local` (each DTensor becomes its local shard
plus its placements, global shape and mesh, as plain data) and
:func:`sharded_state_dict_from_local`; it restores on the same world and mesh only.
Resharding is the DCP path's job.

**Modules.** ``connect`` (the client and group for DCP, job listing and drop),
``writer``, ``reader``, ``items`` (the plain-data form of DCP's write items that a
snapshot holds), ``resharding`` (which new rank restores which old rank, and those
restores), ``exchange`` (the boxes a load plan reads, moved between new ranks) and
``dtensor`` (sharded state through the native client).
"""

from shardguard.client.dcp.connect import connect_dcp, drop_job, newest_job
from shardguard.client.dcp.dtensor import (
    sharded_state_dict_from_local,
    sharded_state_dict_to_local,
)
from shardguard.client.dcp.items import FORMAT
from shardguard.client.dcp.reader import ShardguardReader
from shardguard.client.dcp.writer import ShardguardWriter

__all__ = ["FORMAT", "ShardguardReader", "ShardguardWriter", "connect_dcp", "drop_job",
           "newest_job", "sharded_state_dict_from_local", "sharded_state_dict_to_local"]
