#!/usr/bin/env bash
# Start a real single-node Slurm cluster on this machine, for tests/test_run_with_submitit.py.
#
#     sudo bash tests/slurm/start_local_cluster.sh     # as root, on Debian or Ubuntu
#     sbatch --wrap hostname && squeue                  # it is a real cluster: any Slurm command works
#
# It installs slurm-wlm and munge when they are missing, makes a munge key, writes /etc/slurm/slurm.conf naming
# this host (its CPUs and memory as `slurmd -C` reports them) with two partitions, "debug" (the default, no time
# limit) and "short" (5 minutes), and starts munged, slurmctld and slurmd in the background. Idempotent: a running
# cluster with the same configuration is left as it is; a changed configuration restarts the daemons (queued jobs
# survive in the state directory).
# Exit 0 when the node is ready for jobs; otherwise exit 1 and say why (the Slurm tests then skip).
#
# Test-cluster choices: daemons and jobs run as root; no cgroups (proctrack/linuxproc, task/none), so it also
# runs in containers; no accounting database, but finished jobs are appended to /var/log/slurm/jobcomp.log
# (jobcomp/filetxt: state and exit code of every job, kept after `scontrol show job` forgets it).
set -u
LOG_DIR=/var/log/slurm
CONF=/etc/slurm/slurm.conf
export DEBIAN_FRONTEND=noninteractive

fail() { echo "start_local_cluster: $*" >&2; exit 1; }
say() { echo "start_local_cluster: $*"; }

node_ready() {  # the controller answers and this host's node takes jobs
    local state
    state=$(timeout 10 sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1)
    case "$state" in idle*|mixed*|allocated*|completing*) return 0 ;; *) return 1 ;; esac
}

[ "$(id -u)" = 0 ] || fail "must run as root (it installs packages and starts daemons)"
HOST=$(hostname -s 2>/dev/null || uname -n | cut -d. -f1)  # the short name slurmd knows itself by
[ -n "$HOST" ] || fail "this machine has no host name"

# ============ packages ============
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || fail "slurm-wlm and munge are not installed and there is no apt-get"
    say "installing slurm-wlm and munge"
    apt-get update -qq >/tmp/start_local_cluster.apt.log 2>&1 \
        && apt-get install -y -qq --no-install-recommends slurm-wlm munge >>/tmp/start_local_cluster.apt.log 2>&1 \
        || fail "apt-get install slurm-wlm munge failed: $(tail -n 3 /tmp/start_local_cluster.apt.log | tr '\n' ' ')"
fi

# ============ munge ============
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating a munge key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none || fail "could not write /etc/munge/munge.key"
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key && chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null 2>&1 || fail "munge credentials do not round-trip (see /var/log/munge/munged.log)"
fi

# ============ slurm.conf ============
# `slurmd -C` prints this host's "NodeName=... CPUs=... Boards=... RealMemory=..." as Slurm sees it
NODE_LINE=$(slurmd -C 2>/dev/null | head -n1)
case "$NODE_LINE" in NodeName=*) ;; *) fail "slurmd -C did not describe this host: $NODE_LINE" ;; esac
NODE_LINE="${NODE_LINE/NodeName=* CPUs=/NodeName=$HOST NodeAddr=127.0.0.1 CPUs=}"
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"
NEW_CONF=$(cat <<EOF
# Written by tests/slurm/start_local_cluster.sh: a single-node test cluster.
ClusterName=dinotest
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
ReturnToService=2
# finished jobs stay visible to scontrol for 10 minutes; processes get 5 s between SIGTERM and SIGKILL;
# a requeued job may start again after 5 s (Slurm waits the credential lifetime, 120 s by default) and the
# scheduler looks at the queue every 2 s besides each submission (60 s and 30 s by default)
MinJobAge=600
KillWait=5
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=2,bf_interval=2
$NODE_LINE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=$HOST MaxTime=5 State=UP
EOF
)
RESTART=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
    printf '%s\n' "$NEW_CONF" > "$CONF"
    RESTART=1
fi

# ============ daemons ============
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "$RESTART" = 1 ]; then  # a new configuration: stop the daemons this script started before
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        if running "$pidfile"; then
            say "restarting $(basename "$pidfile" .pid) with the new $CONF"
            kill "$(cat "$pidfile")"
            for _ in $(seq 20); do running "$pidfile" || break; sleep 0.5; done
        fi
    done
elif running /run/slurmctld.pid && running /run/slurmd.pid && node_ready; then
    say "Slurm is already up: node $HOST is $(sinfo -h -N -n "$HOST" -o %T | head -n1)"
    exit 0
fi
if ! running /run/slurmctld.pid; then
    say "starting slurmctld"
    slurmctld || fail "slurmctld did not start: $(tail -n 3 $LOG_DIR/slurmctld.log 2>/dev/null | tr '\n' ' ')"
fi
if ! running /run/slurmd.pid; then
    say "starting slurmd"
    slurmd || fail "slurmd did not start: $(tail -n 3 $LOG_DIR/slurmd.log 2>/dev/null | tr '\n' ' ')"
fi

for _ in $(seq 60); do
    node_ready && break
    # a node that was down (e.g. an unclean stop) is put back into service
    case "$(timeout 10 sinfo -h -N -n "$HOST" -o %T 2>/dev/null)" in
        down*|drain*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null ;;
    esac
    sleep 1
done
node_ready || fail "node $HOST is not ready: $(sinfo -N -o '%N %T %E' 2>&1 | tr '\n' ' ') \
(logs: $LOG_DIR/slurmctld.log, $LOG_DIR/slurmd.log)"
say "Slurm is up: partitions debug and short (5 minutes) on node $HOST" \
    "($(sinfo -h -N -n "$HOST" -o '%c CPUs, %m MB' | head -n1))"
