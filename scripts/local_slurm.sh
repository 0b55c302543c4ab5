#!/usr/bin/env bash
# A self-contained Slurm cluster on this machine (Debian's Slurm 22.05): munged, slurmctld and
# NODES slurmd (default 4, named n1..nN, each claiming 64 CPUs and 8 fake GPUs as GRES), all
# state, logs, keys and configs in DIR. Used by tests/distributed/test_slurm.py; by hand:
#
#   bash scripts/local_slurm.sh install          # apt-get the Debian packages that are missing
#   bash scripts/local_slurm.sh up DIR [NODES]   # start; then: export SLURM_CONF=DIR/slurm.conf
#   SLURM_CONF=DIR/slurm.conf sbatch ...         # sinfo, squeue, scontrol, scancel likewise
#   bash scripts/local_slurm.sh down DIR         # stop every daemon by the PID it recorded
#
# Nothing outside DIR is changed: the daemons run in a private mount namespace in which
# DIR/hosts (this machine's /etc/hosts plus "127.0.0.1 n1 ... nN") is mounted over /etc/hosts,
# so jobs resolve the node names (the Slurm script's rendezvous host) and the host's /etc/hosts
# stays as it is. Ports: SLURM_PORTS="CTLD N1 N2 ..." (free ones are picked otherwise). Needs
# root (munged and slurmd run as root, as on the test machines). docs/testing.md, Slurm tier.
set -euo pipefail

usage() { sed -n '2,16p' "$0" >&2; exit 2; }

free_ports() {  # $1 ports that are free on loopback now
  python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

write_config() {  # $1 dir, $2 nodes
  local dir=$1 nodes=$2 ports i names=()
  read -r -a ports <<< "${SLURM_PORTS:-$(free_ports $((nodes + 1)))}"
  if [ ${#ports[@]} -ne $((nodes + 1)) ]; then
    echo "SLURM_PORTS needs $((nodes + 1)) ports" >&2
    exit 2
  fi
  mkdir -p "$dir/log" "$dir/state/ctld" "$dir/dev"
  chmod 700 "$dir"
  for i in $(seq 1 "$nodes"); do names+=("n$i"); mkdir -p "$dir/state/n$i"; done
  # GPUs for --gpus-per-node: Slurm wants device files for GRES and refuses regular files; these
  # are character devices of /dev/null's type, never opened (no job here uses a GPU).
  for i in 0 1 2 3 4 5 6 7; do
    [ -e "$dir/dev/nvidia$i" ] || mknod "$dir/dev/nvidia$i" c 1 3
  done
  { cat /etc/hosts; echo "127.0.0.1 ${names[*]}"; } > "$dir/hosts"
  # munge's key: 1 KiB of random bytes, readable by root only
  (umask 077 && head -c 1024 /dev/urandom > "$dir/munge.key")
  cat > "$dir/slurm.conf" <<EOF
# written by scripts/local_slurm.sh: $nodes nodes on 127.0.0.1, everything under $dir
ClusterName=trblocal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=${ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# the munge socket of this cluster; short credential lifetime: a requeued job may start again
# cred_expire seconds after it ended (10 s instead of 120)
AuthInfo=socket=$dir/munge.socket,cred_expire=10
StateSaveLocation=$dir/state/ctld
SlurmdSpoolDir=$dir/state/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# each slurmd claims the CPUs written below, not the host's
SlurmdParameters=config_overrides
GresTypes=gpu
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
# seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or preempted: enough
# for a training step and a checkpoint of the tests' miniature models on a loaded machine
KillWait=120
EOF
  for i in $(seq 1 "$nodes"); do
    echo "NodeName=n$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=${ports[$i]}" \
      "CPUs=64 RealMemory=1000 Gres=gpu:8 State=UNKNOWN" >> "$dir/slurm.conf"
  done
  echo "PartitionName=local Nodes=n[1-$nodes] Default=YES MaxTime=INFINITE State=UP" \
    >> "$dir/slurm.conf"
  echo "NodeName=n[1-$nodes] Name=gpu File=$dir/dev/nvidia[0-7]" > "$dir/gres.conf"
}

up() {  # $1 dir, $2 nodes
  local dir nodes=${2:-4} start
  dir="$(mkdir -p "$1" && cd "$1" && pwd)"
  start=$(date +%s%N)
  write_config "$dir" "$nodes"
  export SLURM_CONF="$dir/slurm.conf"
  # the daemons daemonize inside a private mount namespace that sees DIR/hosts as /etc/hosts
  unshare --mount --propagation private bash "${BASH_SOURCE[0]}" _daemons "$dir" "$nodes" \
    || { echo "[local_slurm] a daemon did not start (logs in $dir/log)" >&2; down "$dir"; exit 1; }
  for _ in $(seq 1 300); do  # up to 30 s for every node to register and be idle
    if [ "$(sinfo -h -N -o '%t' 2>/dev/null | grep -c '^idle$')" = "$nodes" ]; then
      echo "[local_slurm] $nodes nodes idle in $((($(date +%s%N) - start) / 1000000)) ms;" \
        "export SLURM_CONF=$SLURM_CONF" >&2
      return 0
    fi
    sleep 0.1
  done
  echo "[local_slurm] the nodes did not come up:" >&2
  sinfo -N >&2 || true
  tail -n 20 "$dir/log/"*.log >&2 || true
  down "$dir"
  exit 1
}

alive() {  # a process that has not exited (a zombie waits only for its parent to reap it)
  [ -f "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

in_namespace() {  # live processes in this cluster's mount namespace (daemons, jobs)
  local ns=$1 proc
  for proc in /proc/[0-9]*; do
    [ "$(readlink "$proc/ns/mnt" 2>/dev/null)" = "$ns" ] && alive "${proc#/proc/}" \
      && echo "${proc#/proc/}"
  done
  return 0
}

down() {  # $1 dir
  local dir=$1 ns daemons=() pidfile pid
  [ -f "$dir/mntns" ] || return 0
  ns=$(cat "$dir/mntns")
  for pidfile in "$dir"/slurmd-*.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
    [ -f "$pidfile" ] && daemons+=("$(cat "$pidfile")")
  done
  # Every process the cluster started lives in its mount namespace: first the jobs (steps,
  # their slurmstepd), killed outright, then the daemons in order (slurmd, slurmctld, munged),
  # each given 10 s to exit after SIGTERM; whatever is left then is killed.
  for pid in $(in_namespace "$ns"); do
    [[ " ${daemons[*]} " == *" $pid "* ]] && continue
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmscriptd ] && continue  # slurmctld's helper
    kill -KILL "$pid" 2>/dev/null || true
  done
  for pid in "${daemons[@]}"; do
    [ "$(readlink "/proc/$pid/ns/mnt" 2>/dev/null)" = "$ns" ] || continue
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
  done
  for pid in $(in_namespace "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 50); do [ -z "$(in_namespace "$ns")" ] && break; sleep 0.1; done
  rm -f "$dir/mntns" "$dir"/*.pid
}

start_daemons() {  # $1 dir, $2 nodes; run by "up" inside the new mount namespace
  local dir=$1 nodes=$2 i
  readlink /proc/self/ns/mnt > "$dir/mntns"  # what "down" stops, also after a failed start
  mount --bind "$dir/hosts" /etc/hosts
  munged --force --key-file "$dir/munge.key" --socket "$dir/munge.socket" \
    --pid-file "$dir/munged.pid" --log-file "$dir/log/munged.log" --seed-file "$dir/munged.seed"
  slurmctld
  for i in $(seq 1 "$nodes"); do slurmd -N "n$i"; done
}

case "${1:-}" in
  install) bash "$(dirname "${BASH_SOURCE[0]}")/apt_install.sh" --no-install-recommends \
    slurm-wlm slurmctld slurmd slurm-client munge ;;
  _daemons) start_daemons "$2" "$3" ;;
  up) [ $# -ge 2 ] || usage; up "$2" "${3:-4}" ;;
  down) [ $# -eq 2 ] || usage; down "$2" ;;
  *) usage ;;
esac
