#!/usr/bin/env bash
# Install the SLURM and munge packages the CI cluster needs (Debian/Ubuntu, as root). Starts nothing.
set -euo pipefail
missing=()
for exe in munged slurmctld slurmd sinfo; do command -v "$exe" >/dev/null || missing+=("$exe"); done
if (( ${#missing[@]} == 0 )); then
    echo "install.sh: SLURM and munge already installed"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
