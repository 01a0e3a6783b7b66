#!/usr/bin/env bash
# Start a single-node SLURM cluster (munge + slurmctld + slurmd) for CI, from templates next to this script.
#
#   .ci/slurm/start.sh [WORKDIR]      # WORKDIR defaults to a fresh mktemp folder
#
# Installs nothing (see install.sh). Runs as root. Everything the daemons write lives under WORKDIR,
# except munge's socket (/run/munge) and the configless client cache (/run/slurm/conf), which stop.sh
# removes. Idempotent: if a controller already answers and the node is idle, it reuses it and exits 0.
# Writes WORKDIR/pids ("name pid" per daemon started here) and records WORKDIR in $POINTER so that
# stop.sh needs no argument. Environment: SLURM_CI_GPU_TYPE (default "ci"), SLURM_CI_PARTITION
# (default "ci"), SLURM_CI_TIMEOUT seconds to wait for the node (default 60).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POINTER="${TMPDIR:-/tmp}/fedpsmos-slurm-ci.dir"
GPU_TYPE="${SLURM_CI_GPU_TYPE:-ci}"
PARTITION="${SLURM_CI_PARTITION:-ci}"
TIMEOUT="${SLURM_CI_TIMEOUT:-60}"

die() { echo "start.sh: $*" >&2; exit 1; }

[[ "$(id -u)" == 0 ]] || die "must run as root (slurmd needs it)"
for exe in munge unmunge munged slurmctld slurmd sinfo scontrol sbatch squeue; do
    command -v "$exe" >/dev/null || die "$exe not found: run .ci/slurm/install.sh first"
done

node_idle() { [[ "$(sinfo -h -N -o '%T' 2>/dev/null | head -n1)" =~ ^(idle|mixed|allocated) ]]; }
alive() {  # name pidfile-of-pids: is the daemon recorded there still running under that name?
    local pid
    pid="$(awk -v n="$1" '$1 == n {print $2}' "$2" 2>/dev/null)"
    [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1"* ]]
}

# Reuse a cluster an earlier start.sh left running: a second controller could not bind the ports.
if [[ -s "$POINTER" ]] && alive slurmctld "$(cat "$POINTER")/pids" && alive slurmd "$(cat "$POINTER")/pids"; then
    if node_idle; then
        echo "start.sh: reusing the running CI cluster in $(cat "$POINTER")"
        sinfo
        exit 0
    fi
    die "a CI cluster from $(cat "$POINTER") runs but its node is not idle; run .ci/slurm/stop.sh first"
fi

WORKDIR="${1:-$(mktemp -d "${TMPDIR:-/tmp}/fedpsmos-slurm.XXXXXX")}"
mkdir -p "$WORKDIR"
WORKDIR="$(cd "$WORKDIR" && pwd)"
mkdir -p "$WORKDIR"/{conf,state,spool,log}
PIDS="$WORKDIR/pids"
: >"$PIDS"
echo "$WORKDIR" >"$POINTER"

# A stale configless cache pointing at a dead controller makes every client call (and every
# snakemake start, through the plugin's `scontrol show config`) wait for a timeout.
rm -rf /run/slurm/conf

# --- munge -------------------------------------------------------------------------------------------
if ! (munge -n | unmunge) >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            /usr/sbin/create-munge-key -f
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    rm -f /run/munge/munged.pid
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
    echo "munged $(cat /run/munge/munged.pid)" >>"$PIDS"
    (munge -n | unmunge) >/dev/null || die "munged started but a credential does not round-trip"
fi

# --- configuration -----------------------------------------------------------------------------------
HOST="$(hostname -s)"
CPUS="$(nproc)"
# Offer the scheduler less memory than is free so that slurmd does not drain the node for
# "Low RealMemory" when page cache or other tests move the figure.
FREE_MB="$(awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo)"
MEMORY_MB=$(( FREE_MB * 8 / 10 ))
(( MEMORY_MB >= 1024 )) || die "only ${FREE_MB} MB available; the CI cluster needs at least 1.3 GB"

render() {
    sed -e "s|@HOST@|$HOST|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEMORY_MB@|$MEMORY_MB|g" \
        -e "s|@GPU_TYPE@|$GPU_TYPE|g" -e "s|@PARTITION@|$PARTITION|g" -e "s|@WORKDIR@|$WORKDIR|g" "$1" >"$2"
}
render "$HERE/slurm.conf.in" "$WORKDIR/conf/slurm.conf"
render "$HERE/gres.conf.in" "$WORKDIR/conf/gres.conf"

# --- daemons -----------------------------------------------------------------------------------------
wait_pidfile() {  # name pidfile
    for _ in $(seq 100); do
        if [[ -s "$2" ]] && kill -0 "$(cat "$2")" 2>/dev/null; then
            echo "$1 $(cat "$2")" >>"$PIDS"
            return 0
        fi
        sleep 0.1
    done
    tail -n 20 "$WORKDIR/log/$1.log" >&2 || true
    die "$1 did not start (log: $WORKDIR/log/$1.log)"
}

slurmctld -f "$WORKDIR/conf/slurm.conf" -i
wait_pidfile slurmctld "$WORKDIR/slurmctld.pid"
for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done

slurmd --conf-server "$HOST"
wait_pidfile slurmd "$WORKDIR/slurmd.pid"

for _ in $(seq $(( TIMEOUT * 2 ))); do
    if node_idle; then
        echo "start.sh: SLURM is up (workdir $WORKDIR)"
        sinfo
        cat "$PIDS"
        exit 0
    fi
    sleep 0.5
done
sinfo -N -l >&2 || true
tail -n 20 "$WORKDIR/log/slurmctld.log" "$WORKDIR/log/slurmd.log" >&2 || true
die "node $HOST not idle after ${TIMEOUT}s"
