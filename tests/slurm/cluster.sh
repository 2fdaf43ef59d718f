#!/bin/bash
# A real two-node SLURM cluster on this one machine, for the tests in tests/slurm/.
#
#   bash tests/slurm/cluster.sh install   # as root: apt-get install slurmctld slurmd munge (Debian/Ubuntu)
#   bash tests/slurm/cluster.sh start     # munged, slurmctld and two slurmd (node1, node2) on this host
#   bash tests/slurm/cluster.sh status    # sinfo
#   bash tests/slurm/cluster.sh stop
#
# Both nodes are this host (NodeHostname), each slurmd with its own port, spool and log
# (slurmd -N node1 / -N node2). Jobs run as the submitting user; the daemons as root.
# State and logs live under $ASR_DIST_SLURM_DIR (default /var/tmp/asr-dist-slurm).
set -euo pipefail
dir=${ASR_DIST_SLURM_DIR:-/var/tmp/asr-dist-slurm}
conf=/etc/slurm/slurm.conf
cmd=${1:-start}

need_root() { [ "$(id -u)" = 0 ] || { echo "cluster.sh $cmd: must run as root" >&2; exit 2; }; }

write_conf() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
  mkdir -p "$dir"/{ctld,log} /etc/slurm
  for n in node1 node2; do
    mkdir -p "$dir/$n"
    grep -qE "^[0-9.]+[[:space:]].*\b$n\b" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
  done
  cat > "$conf" <<CONF
# written by asr-dist tests/slurm/cluster.sh: two nodes on one host
ClusterName=asrdist
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/ctld
SlurmctldPidFile=$dir/slurmctld.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdSpoolDir=$dir/%n
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=600
KillWait=30
Waittime=0
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=16818 CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=16819 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
}

case "$cmd" in
  install)
    need_root
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
    fi
    ;;
  start)
    need_root
    "$0" stop >/dev/null 2>&1 || true
    write_conf
    if [ ! -s /etc/munge/munge.key ]; then
      mkdir -p /etc/munge
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R root:root /etc/munge 2>/dev/null || true
    chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    pgrep -x munged >/dev/null || munged --force
    slurmctld -f "$conf"
    for n in node1 node2; do slurmd -f "$conf" -N "$n"; done
    for _ in $(seq 60); do
      if sinfo -h -o '%T' 2>/dev/null | grep -qx idle && [ "$(sinfo -h -N -t idle -o %N | sort -u | wc -l)" = 2 ]; then
        sinfo; exit 0
      fi
      sleep 1
    done
    echo "cluster did not come up; logs in $dir/log" >&2
    sinfo >&2 || true
    tail -20 "$dir"/log/*.log >&2 || true
    exit 1
    ;;
  stop)
    need_root
    pkill -x slurmd || true
    pkill -x slurmctld || true
    sleep 1
    ;;
  status)
    sinfo
    ;;
  *)
    echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
