#!/bin/bash
# Slurm Prolog: start this job's shardguard daemon on this node, as the job's user,
# and return once it answers. slurm.conf: Prolog=/etc/shardguard/slurm/prolog.sh and
# PrologFlags=Alloc, so that it runs on every node of the allocation (spares too) when
# the job is allocated. A non-zero exit fails the job's start here (Slurm drains the
# node); the reason goes to stderr. deploy/README.md has the whole picture.
#
# From Slurm: SLURM_JOB_ID, SLURM_JOB_USER, SLURM_JOB_UID, SLURM_JOB_GID,
# SLURM_JOB_NODELIST. Settings, all optional:
#   SHARDGUARD_BIN          the shardguard command (default: shardguard on PATH)
#   SHARDGUARD_RUN_DIR      where the per-job run dirs go (default /run/shardguard)
#   SHARDGUARD_SHM_DIR      the arenas' tmpfs directory (default /dev/shm)
#   SHARDGUARD_HOST         the address the job's other nodes reach this one at
#                           (default: the first IPv4 address of `hostname -I`, else the name)
#   SHARDGUARD_PORT_BASE    control port = base + 2 * (job id % 1000), data port = control + 1
#                           (default 47000): every node of the job, a spare and a restarted
#                           daemon agree on them without talking to each other
#   SHARDGUARD_CONTROL_PORT, SHARDGUARD_DATA_PORT  fixed ports instead
#   SHARDGUARD_SITE_KEY     the key each job's secret is derived from, the same file on
#                           every node (default /etc/shardguard/site.key)
#   SHARDGUARD_PYTHON       a Python 3 to derive it with (default python3)
#   SHARDGUARD_START_TIMEOUT_S  how long the daemon has to answer (default 60)
#   SHARDGUARD_CONFIG       the daemon's config file for everything else (group_size,
#                           parity, memory budget, ...; default /etc/shardguard/shardguard.toml)
# These are the prolog's settings. The daemon gets what it needs from them as flags,
# and no other SHARDGUARD_* variable of this environment reaches it.
set -euo pipefail
umask 077
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

bin=${SHARDGUARD_BIN:-shardguard}
log_file=$run_dir/daemon.log
start_timeout_s=${SHARDGUARD_START_TIMEOUT_S:-60}

# Cleans up what this run started, keeping daemon.log and nodes for a post-mortem
# (the epilog removes the run dir).
fail() {
    printf 'shardguard prolog.sh: job %s: %s\n' "$job" "$1" >&2
    if [[ -s $log_file ]]; then
        echo "last lines of $log_file:" >&2
        tail -n 20 "$log_file" >&2
    fi
    stop_daemon
    wipe_shm
    rm -f -- "$run_dir/secret" "$run_dir/secret.new"
    exit 1
}

node_address() {
    local addrs a
    if [[ -n ${SHARDGUARD_HOST:-} ]]; then
        printf '%s\n' "$SHARDGUARD_HOST"
        return
    fi
    read -ra addrs <<<"$(hostname -I 2>/dev/null || true)"
    for a in "${addrs[@]}"; do
        # IPv4 first: the daemon advertises host:port, which an IPv6 address would garble.
        if [[ $a != *:* ]]; then
            printf '%s\n' "$a"
            return
        fi
    done
    hostname
}

job_hosts() {
    local nodelist=${SLURM_JOB_NODELIST:-$(hostname)}
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$nodelist"
    else
        [[ $nodelist != *"["* ]] || die "cannot expand $nodelist without scontrol"
        tr ',' '\n' <<<"$nodelist"
    fi
}

# The job's daemons must share one secret, and no node can ask another for it here:
# each node derives it, HMAC-SHA256(site key, job id), from a site key that root holds
# on every node. A job's user can read its own secret, not the site key, so it learns
# nothing about other jobs' secrets. A one-node job needs no site key: a random secret.
write_secret() {
    local key=${SHARDGUARD_SITE_KEY:-/etc/shardguard/site.key}
    if [[ ! -e $key ]]; then
        (($1 == 1)) || die "no site key at $key, and a job on $1 nodes needs one: create it" \
            "once (head -c 32 /dev/urandom >$key; chmod 600 $key) and copy it to every node"
        key=""
    fi
    "${SHARDGUARD_PYTHON:-python3}" - "$key" "$job" >"$run_dir/secret.new" <<'PY' ||
import hashlib, hmac, os, secrets, stat, sys
path, job = sys.argv[1:]
if not path:
    print(secrets.token_hex(32))
    sys.exit()
with open(path, "rb") as fh:
    mode = os.fstat(fh.fileno()).st_mode
    if mode & 0o077:
        sys.exit(f"site key {path} is readable by others (mode {stat.S_IMODE(mode):o}): chmod 600 it")
    key = fh.read()
if len(key) < 32:
    sys.exit(f"site key {path} holds {len(key)} bytes, fewer than 32")
print(hmac.new(key, f"shardguard job {job}".encode(), hashlib.sha256).hexdigest())
PY
        fail "cannot make the job's secret"
    chown "$uid:$gid" "$run_dir/secret.new"
    mv -f -- "$run_dir/secret.new" "$run_dir/secret"
}

start_daemon() {
    local unset=() name
    for name in $(compgen -e); do
        if [[ $name == SHARDGUARD_* && $name != SHARDGUARD_CONFIG ]]; then
            unset+=(-u "$name")
        fi
    done
    touch "$log_file"
    chown "$uid:$gid" "$log_file"
    # setsid: the daemon outlives this script, whose process group Slurm may kill.
    setsid env "${unset[@]}" "${as_user[@]}" "$bin" daemon --socket "$sock" --host "$host" \
        --control-port "$control_port" --data-port "$data_port" --shm-dir "$shm_dir" \
        --shm-prefix "$shm_prefix" --secret-file "$run_dir/secret" \
        </dev/null >>"$log_file" 2>&1 &
    daemon=$!
    printf '%s\n' "$daemon" >"$pid_file"
}

answers() {
    [[ -S $sock ]] && "$bin" status --socket "$sock" --timeout-s 2 >/dev/null 2>&1
}

wait_ready() {
    local deadline=$((SECONDS + start_timeout_s)) rc=0
    until answers; do
        # Our child: kill -0 fails once bash has reaped it, and wait gives its status.
        if ! kill -0 "$daemon" 2>/dev/null; then
            wait "$daemon" || rc=$?
            fail "the daemon exited with status $rc while starting"
        fi
        ((SECONDS < deadline)) || fail "the daemon did not answer on $sock within ${start_timeout_s}s"
        sleep 0.2
    done
}

user=${SLURM_JOB_USER:-}
[[ -n $user ]] || die "SLURM_JOB_USER is not set"
uid=${SLURM_JOB_UID:-$(id -u "$user")}
gid=${SLURM_JOB_GID:-$(id -g "$user")}
as_user=()
if (($(id -u) != uid)); then
    (($(id -u) == 0)) || die "runs as uid $(id -u): must be root or the job's user $user"
    as_user=(setpriv "--reuid=$uid" "--regid=$gid" --init-groups --)
fi
command -v "$bin" >/dev/null 2>&1 || die "no $bin command (PATH=$PATH; set SHARDGUARD_BIN)"

port_base=${SHARDGUARD_PORT_BASE:-47000}
control_port=${SHARDGUARD_CONTROL_PORT:-$((port_base + 2 * (job % 1000)))}
data_port=${SHARDGUARD_DATA_PORT:-$((control_port + 1))}
host=$(node_address)

# Run again on a node where the job's daemon serves (a re-run prolog): nothing to do.
if daemon_pid >/dev/null; then
    answers && exit 0
    stop_daemon
fi

(umask 022 && mkdir -p -- "${run_dir%/*}")  # other users' job dirs sit beside this one
install -d -m 0700 -o "$uid" -g "$gid" -- "$run_dir"
job_hosts >"$run_dir/nodes"
chown "$uid:$gid" "$run_dir/nodes"
write_secret "$(grep -c . "$run_dir/nodes")"
start_daemon
wait_ready
