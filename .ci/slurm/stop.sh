#!/usr/bin/env bash
# Stop the CI SLURM cluster that .ci/slurm/start.sh started, by the PIDs it recorded, and remove the
# configless client cache so later snakemake/scontrol calls do not wait on a dead controller.
#
#   .ci/slurm/stop.sh [WORKDIR]       # WORKDIR defaults to the one start.sh recorded
#
# Only processes listed in WORKDIR/pids are signalled, and only if their name still matches (a PID
# may have been reused). Safe to run twice or when nothing runs. Logs stay in WORKDIR for inspection.
set -uo pipefail

POINTER="${TMPDIR:-/tmp}/fedpsmos-slurm-ci.dir"
WORKDIR="${1:-$(cat "$POINTER" 2>/dev/null || true)}"
PIDS="${WORKDIR:+$WORKDIR/pids}"

stop_pid() {  # name pid
    local name="$1" pid="$2"
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name"* ]] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { echo "stop.sh: stopped $name ($pid)"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    echo "stop.sh: killed $name ($pid) after 10 s"
}

if [[ -n "$PIDS" && -s "$PIDS" ]]; then
    # Jobs still queued or running on this private cluster would leave slurmstepd processes behind.
    if command -v scancel >/dev/null && grep -q '^slurmctld ' "$PIDS"; then
        jobs="$(timeout 10 squeue -h -o %i 2>/dev/null || true)"
        if [[ -n "$jobs" ]]; then
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs 2>/dev/null || true
            sleep 1
        fi
    fi
    # Reverse start order: slurmd, slurmctld, then munged (which both need until they exit).
    for name in slurmd slurmctld munged; do
        pid="$(awk -v n="$name" '$1 == n {print $2}' "$PIDS")"
        [[ -n "$pid" ]] && stop_pid "$name" "$pid"
    done
    : >"$PIDS"
else
    echo "stop.sh: no PID file${WORKDIR:+ in $WORKDIR}; nothing to stop"
    # start.sh reused a cluster another WORKDIR owns (its PIDs live there): leave its client cache and
    # pointer alone, or its clients would lose the configuration while it still runs.
    owner="$(cat "$POINTER" 2>/dev/null || true)"
    if [[ -n "$owner" && "$owner" != "$WORKDIR" && -s "$owner/pids" ]]; then
        exit 0
    fi
fi

rm -rf /run/slurm/conf
rmdir /run/slurm 2>/dev/null || true
[[ -n "$WORKDIR" ]] && rm -rf "$WORKDIR/spool/conf-cache"
rm -f "$POINTER"
exit 0
