#!/usr/bin/env bash
# A real one-machine SLURM cluster (munge + slurmctld + slurmd from Debian's packages), for
# trying vitexp's SLURM launcher and for its tests.
#
#   scripts/slurm_local.sh start    # install if missing, write the config, start the daemons
#   scripts/slurm_local.sh status   # the node and the queue
#   scripts/slurm_local.sh stop     # stop only the daemons this script started (by pid)
#   eval "$(scripts/slurm_local.sh env)"   # SLURM_CONF for sbatch/srun/squeue in this shell
#
# State, spool, logs and the config live in $SLURM_LOCAL_DIR (default /tmp/vitexp-slurm).
# Needs root (apt-get, daemons). SlurmUser=root; munged runs as user munge.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/vitexp-slurm}
CONF=$DIR/slurm.conf
PIDS=$DIR/started.pids
NODE=$(hostname -s)

log() { echo "slurm_local: $*" >&2; }

install_packages() {
    local missing=()
    for bin in slurmctld slurmd sbatch munged; do
        command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
    mkdir -p "$DIR/state" "$DIR/spool"
    local mem_mb
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    cat >"$CONF" <<EOF
ClusterName=vitexp-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_for() {  # wait_for SECONDS COMMAND...
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -ge $deadline ] && return 1
        sleep 0.5
    done
}

node_ready() { sinfo -h -N -o '%t' | grep -qE '^(idle|mix|alloc)'; }

start() {
    if [ -f "$PIDS" ]; then
        log "already started (pids in $PIDS); run '$0 stop' first"
        exit 1
    fi
    install_packages
    write_config
    export SLURM_CONF=$CONF
    : >"$PIDS"
    if ! pgrep -x munged >/dev/null; then
        mkdir -p /run/munge && chown munge:munge /run/munge
        runuser -u munge -- /usr/sbin/munged
        wait_for 10 test -s /run/munge/munged.pid || { log "munged did not start"; exit 1; }
        echo "munged $(cat /run/munge/munged.pid)" >>"$PIDS"
    fi
    /usr/sbin/slurmctld -f "$CONF"
    wait_for 20 test -s "$DIR/slurmctld.pid" || { log "slurmctld did not start: $DIR/slurmctld.log"; exit 1; }
    echo "slurmctld $(cat "$DIR/slurmctld.pid")" >>"$PIDS"
    /usr/sbin/slurmd -f "$CONF"
    wait_for 20 test -s "$DIR/slurmd.pid" || { log "slurmd did not start: $DIR/slurmd.log"; exit 1; }
    echo "slurmd $(cat "$DIR/slurmd.pid")" >>"$PIDS"
    if ! wait_for 60 node_ready; then
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        wait_for 30 node_ready || { log "node $NODE is not ready: $(sinfo -N)"; exit 1; }
    fi
    log "up: node $NODE, $(nproc) CPUs, partition debug; export SLURM_CONF=$CONF"
}

stop() {
    [ -f "$PIDS" ] || { log "nothing started by this script"; return 0; }
    tac "$PIDS" | while read -r name pid; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" && log "stopped $name ($pid)"
            for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        fi
    done
    rm -f "$PIDS"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF=$CONF sinfo -N && SLURM_CONF=$CONF squeue ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
