#!/usr/bin/env bash
# Start a real one-box Slurm for the tests (.ci/run calls it; run it as root): munged, slurmdbd (accounting in the
# local MariaDB), slurmctld and two slurmd (node1, node2) on this machine, installed with apt-get when missing.
# Idempotent: running daemons are left as they are.
# Prints nothing but errors; `sinfo` shows the result.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="${SLURM_STATE_DIR:-/var/lib/minicloud-slurm}"

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1 || ! command -v slurmdbd >/dev/null 2>&1
then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm slurmdbd munge >/dev/null
fi
mkdir -p "$state/ctld" /etc/slurm /run/munge /var/log/munge /var/lib/munge
host="$(hostname -s)"
cpus="$(nproc)"
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # MB per node: half the machine each
sed -e "s/@HOST@/$host/g" -e "s/@CPUS@/$cpus/g" -e "s/@MEM@/$mem/g" -e "s#@STATE@#$state#g" \
  "$here/slurm.conf.in" > /etc/slurm/slurm.conf
# two stand-in GPU "devices" (plain files: slurmd only looks them up; Slurm's sharing needs each GPU's File)
mkdir -p "$state/dev" && touch "$state/dev/gpu0" "$state/dev/gpu1"
printf 'Name=gpu File=%s/dev/gpu[0-1]\nName=shard Count=8\n' "$state" > /etc/slurm/gres.conf
sed -e "s#@STATE@#$state#g" "$here/slurmdbd.conf.in" > /etc/slurm/slurmdbd.conf
chmod 0600 /etc/slurm/slurmdbd.conf  # slurmdbd refuses a config others may read

if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "munged --force" 2>/dev/null || munged --force
# accounting first: slurmctld registers the cluster with slurmdbd when it starts
mariadb -h 127.0.0.1 -u root -e "CREATE DATABASE IF NOT EXISTS minicloud_slurm_acct"
pgrep -x slurmdbd >/dev/null || slurmdbd
for _ in $(seq 30); do
  sacctmgr -n list cluster >/dev/null 2>&1 && break
  sleep 1
done
sacctmgr -n list cluster format=cluster | grep -qw minicloud || sacctmgr -i add cluster minicloud >/dev/null
pgrep -x slurmctld >/dev/null || slurmctld
for n in node1 node2; do
  mkdir -p "$state/d-$n"
  pgrep -f "slurmd -N $n" >/dev/null || slurmd -N "$n"
done
for _ in $(seq 60); do
  if [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated|completing)$')" -ge 2 ]; then
    exit 0
  fi
  sleep 1
done
echo "Slurm did not come up:" >&2
sinfo -N >&2 || true
tail -20 "$state/slurmdbd.log" "$state/slurmctld.log" "$state"/slurmd-*.log >&2 || true
exit 1
