#!/usr/bin/env bash
# Install the Debian packages of a single-node SLURM for tests/test_slurm_real.py (what .ci/run calls).
# Idempotent and quick when they are there already; needs root (or passwordless sudo) and apt-get.
# Without them the real-SLURM tests are skipped with the reason, they never fail for it.
set -euo pipefail
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
missing=0
for bin in slurmctld slurmd slurmdbd sbatch sacct munged mariadbd; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing=1
done
if [ "$missing" = 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm.sh: no apt-get here; the real-SLURM tests will be skipped" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install_slurm.sh: not root and no passwordless sudo; the real-SLURM tests will be skipped" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq $PACKAGES >/dev/null
