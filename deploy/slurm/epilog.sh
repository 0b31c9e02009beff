#!/bin/bash
# Slurm Epilog (slurm.conf: Epilog=/etc/shardguard/slurm/epilog.sh): stop this job's
# shardguard daemon on this node and free everything it held: its shared memory and
# its run dir. Safe to run after a failed prolog, on a node the prolog never reached,
# and twice. Settings as for prolog.sh (SHARDGUARD_RUN_DIR, SHARDGUARD_SHM_DIR), plus
# SHARDGUARD_STOP_TIMEOUT_S: how long the daemon has after SIGTERM before SIGKILL
# (default 30). It fails (and Slurm drains the node) only if the daemon survives SIGKILL.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stop_daemon
wipe_shm
rm -rf -- "$run_dir"
