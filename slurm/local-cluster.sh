#!/usr/bin/env bash
# A real Slurm (Debian 12, Slurm 22.05) on this one machine, for tests and CI:
#   partition debug (the default): one node named after this host, 4 CPUs;
#   partition two: nodes n1 and n2, 2 CPUs each, for jobs that span nodes.
# Each node has its own slurmd (`slurmd -N NODE`, its own port, spool dir, log and pid file).
#
#   slurm/local-cluster.sh up       install if needed, start munged, slurmctld, the slurmds;
#                                   prints only `export SLURM_CONF=...` on stdout, so:
#                                     eval "$(slurm/local-cluster.sh up)"
#   slurm/local-cluster.sh down     cancel all jobs, stop the daemons
#   slurm/local-cluster.sh status   say what runs (exit 0 all up, 1 partly, 3 nothing)
#
# Everything (configs, state, spool, logs, pid files, munge key and socket) lives under
# one base dir, ${CMBAGENT_SLURM_DIR:-/var/tmp/cmbagent-slurm}, so the cluster never
# touches /etc/slurm, /etc/munge or /run/munge and cannot clash with a system install.
# Runs as root, without systemd: daemons are started directly and tracked by pid files.
# All diagnostics go to stderr; stdout carries only the export line (and status).

set -euo pipefail

BASE=${CMBAGENT_SLURM_DIR:-/var/tmp/cmbagent-slurm}
CTLD_PORT=${CMBAGENT_SLURM_CTLD_PORT:-6917}   # not Slurm's 6817/6818: no clash with a real one
SLURMD_PORT=${CMBAGENT_SLURM_SLURMD_PORT:-6918}   # this host's node; n1 and n2 take the next two ports
START_TIMEOUT=${CMBAGENT_SLURM_START_TIMEOUT:-30}
# Step credential lifetime, which is also the delay before a requeued job may run again
# (Slurm's default, 120 s, would make every requeue test wait two minutes). 5 is the
# smallest value Slurm 22.05 accepts; a smaller one is rejected and 120 is used instead.
CRED_EXPIRE=${CMBAGENT_SLURM_CRED_EXPIRE:-5}

ETC=$BASE/etc
CONF=$ETC/slurm.conf
RUN=$BASE/run
LOG=$BASE/log
MUNGE_DIR=$RUN/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
MUNGE_KEY=$ETC/munge.key
NODE=$(hostname -s)
PAIR=(n1 n2)   # the nodes of partition two
NODES=("$NODE" "${PAIR[@]}")

export SLURM_CONF=$CONF

log() { printf 'local-cluster: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    [[ ${COMMAND:-} == up ]] && log "what did start keeps running; '$0 down' stops it"
    exit 1
}

# show_logs NAME: the last lines of a daemon's log and of its captured stdio, to stderr.
show_logs() {
    local f
    for f in "$LOG/$1.log" "$LOG/$1.out"; do
        if [[ -s $f ]]; then
            log "last lines of $f:"
            tail -n 20 "$f" | sed 's/^/    /' >&2
        fi
    done
}

# --- process bookkeeping -------------------------------------------------------------

# A daemon's NAME is its command, or slurmd-NODE for the slurmd of NODE; its pid file is run/NAME.pid
# (munged's under run/munge/), its log log/NAME.log and its captured stdio log/NAME.out.

# pid_of NAME: the pid from NAME's pid file if that process is alive and really is NAME's
# command (a stale pid file whose pid was reused by something else does not count, nor a
# daemon that died and waits to be reaped).
pid_of() {
    local name=$1 file pid comm
    file=$(pidfile "$name")
    [[ -r $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "${name%%-*}" ]] || return 1
    ! grep -q '^State:.*zombie' "/proc/$pid/status" 2>/dev/null || return 1
    echo "$pid"
}

pidfile() {
    case $1 in
        munged) echo "$MUNGE_DIR/munged.pid" ;;
        *) echo "$RUN/$1.pid" ;;
    esac
}

# The names of the slurmds, one per node.
slurmds() { printf 'slurmd-%s\n' "${NODES[@]}"; }

# port_of NODE: its slurmd's port.
port_of() {
    case $1 in
        "${PAIR[0]}") echo $((SLURMD_PORT + 1)) ;;
        "${PAIR[1]}") echo $((SLURMD_PORT + 2)) ;;
        *) echo "$SLURMD_PORT" ;;
    esac
}

running() { pid_of "$1" >/dev/null; }

# stop_daemons NAME...: SIGTERM to all at once (slurmctld alone needs ~1.5 s to save its
# state; one after the other took ~4 s), wait up to 10 s, then SIGKILL. Quiet for those
# not running.
stop_daemons() {
    local name pid pids=() i
    for name in "$@"; do
        if pid=$(pid_of "$name"); then
            log "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for ((i = 0; i < 100 && ${#pids[@]} > 0; i++)); do
        alive_pids pids
        ((${#pids[@]} > 0)) && sleep 0.1
    done
    if ((${#pids[@]} > 0)); then
        log "still running after 10 s, SIGKILL: ${pids[*]}"
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
    for name in "$@"; do rm -f "$(pidfile "$name")"; done
}

# alive_pids ARRAYNAME: keep only the pids that still exist.
alive_pids() {
    local -n arr=$1
    local p keep=()
    for p in "${arr[@]}"; do
        kill -0 "$p" 2>/dev/null && keep+=("$p")
    done
    arr=("${keep[@]}")
}

# wait_pidfile NAME: daemons fork and write their pid file a moment later.
wait_pidfile() {
    local name=$1 i
    for ((i = 0; i < 50; i++)); do
        running "$name" && return 0
        sleep 0.1
    done
    show_logs "$name"
    die "$name did not start (no live pid in $(pidfile "$name")); see $LOG"
}

# --- installation --------------------------------------------------------------------

ensure_installed() {
    local missing=0 cmd
    for cmd in munged munge slurmctld slurmd sinfo scontrol sbatch srun scancel sacct; do
        command -v "$cmd" >/dev/null 2>&1 || missing=1
    done
    ((missing)) || return 0
    [[ $(id -u) == 0 ]] || die "Slurm is not installed and installing it needs root"
    log "installing slurmctld slurmd slurm-client munge with apt-get"
    # --no-install-recommends: the recommends pull ~40 plugin -dev packages we don't need.
    # Debian's postinst would like to start the services; without systemd (and with the
    # usual container policy-rc.d) it does not, and we start our own instances anyway.
    local pkgs=(slurmctld slurmd slurm-client munge)
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${pkgs[@]}" >&2; then
        log "apt-get install failed; refreshing the package lists and retrying"
        apt-get update -qq >&2 || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${pkgs[@]}" >&2 || die "apt-get install ${pkgs[*]} failed"
    fi
    for cmd in munged munge slurmctld slurmd sinfo; do
        command -v "$cmd" >/dev/null 2>&1 || die "$cmd still missing after apt-get install"
    done
}

# --- configuration -------------------------------------------------------------------

make_dirs() {
    local n
    mkdir -p "$ETC" "$BASE/state" "$BASE/spool" "$LOG" "$RUN" "$MUNGE_DIR"
    # munged refuses paths that group/other can write, and a key others can read. (Not
    # $BASE itself: it may be a directory the caller owns and chose.)
    chmod 0755 "$ETC" "$LOG" "$RUN" "$MUNGE_DIR"
    chmod 0700 "$BASE/state" "$BASE/spool"
    for n in "${NODES[@]}"; do
        mkdir -p "$BASE/spool/$n"
        chmod 0700 "$BASE/spool/$n"
    done
    if [[ ! -s $MUNGE_KEY ]]; then
        (umask 077 && head -c 1024 /dev/urandom >"$MUNGE_KEY")
    fi
    chmod 0600 "$MUNGE_KEY"
}

# Memory in MB for RealMemory, so that `--mem` requests up to the machine's size work.
real_memory_mb() {
    awk '/^MemTotal:/ { printf "%d\n", $2 / 1024 * 0.9 }' /proc/meminfo
}

# Rewritten on every `up` of a stopped cluster, so edits to this script take effect.
write_slurm_conf() {
    cat >"$CONF.tmp" <<EOF
# Written by slurm/local-cluster.sh; rewritten on every 'up'. Nodes $NODE (partition debug), ${PAIR[*]} (two).
ClusterName=cmbagent
# No mail on this machine; the default /usr/bin/mail does not exist and slurmctld says so.
MailProg=/bin/true
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root

# Our own munged and socket under the base dir (used by auth/munge and cred/munge).
# cred_expire: step credential lifetime, and how long a requeued job waits (+1 s) before
# it may start again; Slurm's default is 120 s.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE

# %n: the node's name. Each slurmd needs its own spool dir: the pmi2 sockets of job steps are
# there, named by job and step alone, and a step over n1 and n2 has one on each.
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups in containers: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=pmi2

SchedulerType=sched/backfill
# Do not hold back batch jobs after submit (batch_sched_delay, default 3 s), and look at
# pending jobs every 2 s (sched_interval, bf_interval; defaults 60 and 30 s), so a requeued
# job starts soon after its begin time. Measured: a job starts within ~1 s of sbatch
# (~2 s for the first one after start-up).
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU

# No slurmdbd: job completions go to a text file, which 'sacct -c' reads.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt

# Reject at submit what a partition can never run (-N 2 or -n 5 in debug, -N 3 in two, ...)
# instead of leaving it PENDING forever with Reason=PartitionNodeLimit/PartitionConfig.
EnforcePartLimits=ALL
JobRequeue=1
KillWait=5
MinJobAge=300
OverTimeLimit=0
InactiveLimit=0
MessageTimeout=10
SlurmdTimeout=60
ReturnToService=2

# CPUs whatever the hardware: config_overrides makes slurmd trust these lines. n1 and n2 are
# this host too (NodeHostname), each with its own slurmd (slurmd -N) on its own Port.
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=4 RealMemory=$(real_memory_mb) State=UNKNOWN
NodeName=${PAIR[0]} NodeHostname=$NODE NodeAddr=127.0.0.1 Port=$(port_of "${PAIR[0]}") CPUs=2 RealMemory=$(real_memory_mb) State=UNKNOWN
NodeName=${PAIR[1]} NodeHostname=$NODE NodeAddr=127.0.0.1 Port=$(port_of "${PAIR[1]}") CPUs=2 RealMemory=$(real_memory_mb) State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=two Nodes=${PAIR[0]},${PAIR[1]} MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

# --- start ---------------------------------------------------------------------------
# Daemons get /dev/null and a log file as stdio, never our stdout/stderr: a daemon holding
# the pipe of `eval "$(... up)"` or of a test harness would make the caller hang.

# munged runs as root with every path it uses (key, socket, log, pid, seed) ours and
# root-owned: its security checks want each owned by the user it runs as and not
# writable by group/other, and nothing then depends on Debian's /etc/munge (munge-owned)
# or /run/munge (made only by the init script, which does not run without systemd).
start_munged() {
    running munged && return 0
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" \
        --pid-file="$(pidfile munged)" --log-file="$LOG/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" </dev/null >>"$LOG/munged.out" 2>&1 ||
        { show_logs munged; die "munged failed to start"; }
    wait_pidfile munged
    munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null ||
        { show_logs munged; die "munged runs but a munge/unmunge round trip fails"; }
}

# port_free PORT: nothing listens on 127.0.0.1:PORT (bash's /dev/tcp, no extra tools).
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

check_port() {
    port_free "$1" ||
        die "port $1 ($2) is in use, by another Slurm or something else; choose another with $3"
}

start_slurmctld() {
    running slurmctld && return 0
    check_port "$CTLD_PORT" SlurmctldPort CMBAGENT_SLURM_CTLD_PORT
    # Default start recovers saved state, so job ids keep growing across down/up.
    slurmctld -f "$CONF" </dev/null >>"$LOG/slurmctld.out" 2>&1 ||
        { show_logs slurmctld; die "slurmctld failed to start"; }
    wait_pidfile slurmctld
}

# start_slurmd NODE
start_slurmd() {
    local node=$1 name=slurmd-$1 port
    running "$name" && return 0
    port=$(port_of "$node")
    check_port "$port" "the Port of node $node" \
        "CMBAGENT_SLURM_SLURMD_PORT (${PAIR[0]} and ${PAIR[1]} take the two ports after it)"
    slurmd -f "$CONF" -N "$node" </dev/null >>"$LOG/$name.out" 2>&1 ||
        { show_logs "$name"; die "$name failed to start"; }
    wait_pidfile "$name"
}

# node_states: `NODE STATE` for each node, as slurmctld sees them.
node_states() { sinfo -h -N -o '%N %T' 2>/dev/null | sort -u; }

# ready STATE: a node is usable: `idle`, or `mixed`/`allocated` when jobs that survived a
# restart run again. `completing` (a job recovered from saved state still being cleaned
# up) is not: new jobs would wait for it.
ready() { [[ $1 =~ ^(idle|mixed|allocated)$ ]]; }

# unready_nodes: the nodes that are not (each as NODE=STATE, `no answer` when sinfo lacks it).
unready_nodes() {
    local states n state
    states=$(node_states || true)
    for n in "${NODES[@]}"; do
        state=$(awk -v n="$n" '$1 == n { print $2; exit }' <<<"$states")
        ready "$state" || echo "$n=${state:-no answer}"
    done
}

wait_nodes_ready() {
    local deadline=$((SECONDS + START_TIMEOUT)) unready="" d n
    while ((SECONDS < deadline)); do
        for d in slurmctld $(slurmds) munged; do
            running "$d" || { show_logs "$d"; die "$d died during start-up; see $LOG"; }
        done
        unready=$(unready_nodes)
        [[ -z $unready ]] && return 0
        for n in $unready; do
            case ${n#*=} in
                drain* | down*)
                    # A node left DOWN/DRAINED in saved state: give it back to service.
                    scontrol update NodeName="${n%%=*}" State=RESUME >/dev/null 2>&1 || true ;;
            esac
        done
        sleep 0.2
    done
    show_logs slurmctld
    for d in $(slurmds); do show_logs "$d"; done
    die "nodes not idle after ${START_TIMEOUT}s: ${unready//$'\n'/ }"
}

all_running() {
    local d
    for d in munged slurmctld $(slurmds); do running "$d" || return 1; done
}

any_slurmd_running() {
    local d
    for d in $(slurmds); do running "$d" && return 0; done
    return 1
}

cmd_up() {
    local n
    if all_running && [[ -z $(unready_nodes) ]]; then
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    [[ $NODE != n[12] ]] || die "this host is named $NODE, like a node of partition two"
    ensure_installed
    make_dirs
    # A cluster started by this script when it had one node (its slurmd's pid file is
    # run/slurmd.pid) knows no n1 and n2: restart it with this config. Its jobs survive
    # in slurmctld's saved state.
    if running slurmd; then
        log "restarting a single-node cluster with nodes $NODE, ${PAIR[0]} and ${PAIR[1]}"
        stop_daemons slurmd slurmctld
    fi
    # Rewrite the config only when nothing reads it yet; a half-up cluster keeps its own.
    if ! running slurmctld && ! any_slurmd_running; then
        write_slurm_conf
    fi
    start_munged
    start_slurmctld
    for n in "${NODES[@]}"; do start_slurmd "$n"; done
    wait_nodes_ready
    log "up: $(node_states | awk '{ printf "%s%s %s", (NR > 1 ? ", " : ""), $1, $2 }')" \
        "(partition debug: $NODE; two: ${PAIR[0]}, ${PAIR[1]}); logs in $LOG"
    echo "export SLURM_CONF=$CONF"
}

# --- stop ----------------------------------------------------------------------------

# Cancel every job and wait (bounded) until none is running or completing, so that no
# job step process outlives the cluster. scancel sends SIGTERM to every step and the
# batch shell, SIGKILL KillWait (5 s) later; we wait that plus a little.
cancel_all_jobs() {
    running slurmctld || return 0
    local ids i
    ids=$(squeue -h -o '%i' 2>/dev/null | tr '\n' ' ') || return 0
    [[ -n ${ids// /} ]] || return 0
    log "cancelling jobs: $ids"
    # shellcheck disable=SC2086
    scancel $ids 2>/dev/null || true
    for ((i = 0; i < 80; i++)); do
        [[ -z $(squeue -h -t running,completing,configuring,suspended -o '%i' 2>/dev/null) ]] &&
            return 0
        sleep 0.1
    done
    log "jobs still running or completing after 8 s; killing their processes"
}

# Our slurmstepd processes: slurmd chdirs to its log dir, and its step daemons inherit
# that cwd, which tells them apart from any other Slurm's on the machine.
our_stepds() {
    local p cwd
    for p in $(pgrep -x slurmstepd || true); do
        cwd=$(readlink "/proc/$p/cwd" 2>/dev/null) || continue
        [[ $cwd == "$BASE"/* ]] && echo "$p"
    done
    return 0
}

# descendants PID...: those pids and all their descendants (from one `ps` snapshot).
descendants() {
    ps -e -o pid=,ppid= | awk -v roots="$*" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
        { parent[$1] = $2 }
        END {
            do { changed = 0
                 for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 }
            } while (changed)
            for (p in keep) print p
        }'
}

# ancestors: this script and the processes above it, never to be killed (down may be run
# from inside a job).
ancestors() {
    local p=$$
    while [[ -n $p && $p != 0 ]]; do
        echo "$p"
        p=$(ps -o ppid= -p "$p" 2>/dev/null | tr -d ' ' || true)
    done
}

# Whatever scancel could not stop (a hung step, a slurmd that is gone): SIGKILL our
# slurmstepd processes and everything below them. proctrack/linuxproc tracks job
# processes the same way, by descent from slurmstepd.
kill_leftover_steps() {
    local stepds pids
    stepds=$(our_stepds)
    [[ -n $stepds ]] || return 0
    # shellcheck disable=SC2086
    pids=$(descendants $stepds | grep -vxF -f <(ancestors) || true)
    [[ -n $pids ]] || return 0
    log "killing leftover job step processes: ${pids//$'\n'/ }"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
}

cmd_down() {
    if [[ -r $CONF ]]; then
        cancel_all_jobs
    fi
    kill_leftover_steps
    # shellcheck disable=SC2046
    stop_daemons $(slurmds) slurmd slurmctld munged  # slurmd: a single-node cluster's
    # A step daemon that slurmd started while we were stopping it.
    kill_leftover_steps
    log "down"
}

# --- status --------------------------------------------------------------------------

cmd_status() {
    local n=0 d pid
    for d in munged slurmctld $(slurmds); do
        if pid=$(pid_of "$d"); then
            echo "$d: running (pid $pid)"
            n=$((n + 1))
        else
            echo "$d: stopped"
        fi
    done
    echo "base: $BASE"
    if running slurmctld; then
        echo "export SLURM_CONF=$CONF"
        sinfo -N -o '%N %P %T %C' 2>&1 || true
        squeue 2>&1 || true
    fi
    ((n == 2 + ${#NODES[@]})) && return 0
    ((n == 0)) && return 3
    return 1
}

main() {
    COMMAND=${1:-}
    case $COMMAND in
        up) cmd_up ;;
        down) cmd_down ;;
        status) cmd_status ;;
        *)
            echo "usage: $0 up|down|status" >&2
            exit 2
            ;;
    esac
}

main "$@"
