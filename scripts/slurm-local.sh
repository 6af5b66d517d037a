#!/bin/bash
# A real single-host Slurm cluster on this machine (issue #15): Debian's slurm-wlm and munge,
# slurmctld and slurmd for this host only, for tests of `geotrain slurm render` (as root).
#
#   bash scripts/slurm-local.sh start    install if needed, write the config, start munged, slurmctld, slurmd;
#                                        returns once the node is idle (prints "started" or "running")
#   bash scripts/slurm-local.sh stop     stop the daemons `start` started (of slurmd, slurmctld, munged), by pid file
#   bash scripts/slurm-local.sh status   sinfo
#
# The config (/etc/slurm/slurm.conf, written only by `start`, marked as ours) makes one node of this
# host's short name with GEOTRAIN_SLURM_CPUS CPUs (default 16), more than a small machine has, so that
# the control plane's job and every site's job of a test run at once: slurmd is told to take the
# configured CPUs as they are (SlurmdParameters=config_overrides), and nothing is bound to cores
# (task/none, proctrack/linuxproc: no cgroups, which containers often lack). No accounting daemon:
# job states come from `scontrol show job` (kept MinJobAge seconds after a job ends).
set -euo pipefail

ACTION=${1:-start}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/lib/geotrain-slurm
LOGS=/var/log/slurm
CPUS=${GEOTRAIN_SLURM_CPUS:-16}
NODE=$(hostname -s)
MARK="# written by geotrain scripts/slurm-local.sh"

log() { echo "slurm-local: $*" >&2; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        log "$CONF exists and was not written by this script: not touching it"
        exit 1
    fi
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$LOGS"
    cat >"$CONF" <<EOF
$MARK
ClusterName=geotrain
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    if pid_alive /run/munge/munged.pid; then
        return
    fi
    runuser -u munge -- /usr/sbin/munged
    echo munged >>"$STATE/ours"
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return; sleep 0.1; done
    log "munged does not answer"; exit 1
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1; }

start() {
    install
    write_conf
    start_munge
    local started=0
    if ! pid_alive "$STATE/slurmctld.pid"; then
        slurmctld
        echo slurmctld >>"$STATE/ours"
        started=1
    fi
    if ! pid_alive "$STATE/slurmd.pid"; then
        slurmd
        echo slurmd >>"$STATE/ours"
        started=1
    fi
    for _ in $(seq 150); do
        case "$(node_state)" in
            idle*|mixed*|allocated*) [ "$started" = 1 ] && echo started || echo running; return ;;
            down*|drain*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    log "the node did not come up; state: $(node_state)"
    tail -n 20 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
    exit 1
}

stop_one() {
    local pidfile=$1
    if pid_alive "$pidfile"; then
        local pid
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
}

stop() {  # only the daemons `start` started (listed in $STATE/ours), never a munged that was there before
    local ours=""
    [ -f "$STATE/ours" ] && ours=$(cat "$STATE/ours")
    if grep -qx slurmd <<<"$ours"; then stop_one "$STATE/slurmd.pid"; fi
    if grep -qx slurmctld <<<"$ours"; then stop_one "$STATE/slurmctld.pid"; fi
    if grep -qx munged <<<"$ours"; then stop_one /run/munge/munged.pid; fi
    rm -f "$STATE/ours"
    echo stopped
}

case "$ACTION" in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
