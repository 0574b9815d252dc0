#!/usr/bin/env bash
# Install the Debian packages for the one-node SLURM used by ampel-dask's tests (Debian 12: SLURM 22.05 + munge).
# Idempotent: a no-op (well under a second) when everything is installed. Needs root (or sudo).
# Debian's postinst tries to start the daemons through invoke-rc.d; that fails harmlessly without systemd,
# and slurm/start_slurm.sh starts them by hand anyway.
set -euo pipefail
PKGS=(slurm-wlm slurmctld slurmd slurm-client munge)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "slurm/install.sh: already installed: ${PKGS[*]}"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "slurm/install.sh: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "slurm/install.sh: installing ${missing[*]} ..."
t0=$(date +%s)
if ! { $SUDO apt-get update -qq && \
       $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "slurm/install.sh: apt-get failed" >&2
  exit 1
fi
echo "slurm/install.sh: done in $(( $(date +%s) - t0 )) s ($(dpkg-query -W -f='${Version}' slurmctld))"
