# shellcheck shell=bash
# Sourced by prolog.sh and epilog.sh: where a job's daemon lives on this node, and
# how to stop it and free its shared memory. Needs bash >= 4.4.
#
#   $SHARDGUARD_RUN_DIR/job-$SLURM_JOB_ID/   (default /run/shardguard/job-<id>/, 0700, the job's user)
#       agent.sock   the daemon's socket (the trainers' SHARDGUARD_SOCKET)
#       daemon.pid   daemon.log   nodes (the job's hosts, one a line)   secret
#   $SHARDGUARD_SHM_DIR/sg-job<id>.*          (default /dev/shm) the job's arenas and parity

# slurmd gives prologs and epilogs a sparse environment.
export PATH=${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}

die() {
    printf 'shardguard %s: job %s: %s\n' "${0##*/}" "${SLURM_JOB_ID:-?}" "$*" >&2
    exit 1
}

job=${SLURM_JOB_ID:-}
# The id ends up in paths that the epilog removes: nothing but digits.
[[ $job =~ ^[0-9]+$ ]] || die "SLURM_JOB_ID must be a job number"
run_dir=${SHARDGUARD_RUN_DIR:-/run/shardguard}/job-$job
sock=$run_dir/agent.sock
pid_file=$run_dir/daemon.pid
shm_dir=${SHARDGUARD_SHM_DIR:-/dev/shm}
shm_prefix=sg-job$job

# True while process $1 is this job's daemon. A pid outlives its process (it can be
# reused, and a zombie keeps it), so the test is the command line naming our socket,
# which every stage of the start (setsid, env, setpriv, the daemon) carries.
is_our_daemon() {
    local cmdline
    cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
    [[ $cmdline == *"--socket $sock "* ]]
}

# Prints the daemon's pid if it runs.
daemon_pid() {
    local pid
    [[ -r $pid_file ]] || return 1
    pid=$(<"$pid_file")
    if ! [[ $pid =~ ^[0-9]+$ ]] || ! is_our_daemon "$pid"; then
        return 1
    fi
    printf '%s\n' "$pid"
}

# wait_gone PID SECONDS: true once PID is no longer our daemon.
wait_gone() {
    local end=$((SECONDS + $2))
    while is_our_daemon "$1"; do
        ((SECONDS < end)) || return 1
        sleep 0.1
    done
}

# SIGTERM (the daemon finishes its calls in flight), then SIGKILL.
stop_daemon() {
    local pid
    pid=$(daemon_pid) || return 0
    kill -TERM "$pid" 2>/dev/null || true
    wait_gone "$pid" "${SHARDGUARD_STOP_TIMEOUT_S:-30}" && return 0
    echo "shardguard ${0##*/}: job $job: daemon $pid ignored SIGTERM; SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 10 || die "daemon $pid survives SIGKILL"
}

# Every arena, meta and parity file of the job on this node.
wipe_shm() {
    local files
    shopt -s nullglob
    files=("$shm_dir/$shm_prefix".*)
    shopt -u nullglob
    ((${#files[@]} == 0)) || rm -f -- "${files[@]}"
}
