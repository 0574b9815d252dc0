#!/usr/bin/env bash
# Stop the one-node SLURM started by start_slurm.sh: cancel all jobs, then stop slurmd, slurmctld and our
# munged by the PIDs in their pid files (nothing else is killed), wait for them to exit, remove the state.
# Idempotent: when nothing is running it says so and exits 0. Logs and slurm.conf in the directory are kept.
#
# Environment: AMPEL_DASK_SLURM_DIR [/tmp/ampel-dask-slurm]
set -uo pipefail
D=${AMPEL_DASK_SLURM_DIR:-/tmp/ampel-dask-slurm}
export SLURM_CONF=$D/slurm.conf
say() { echo "stop_slurm.sh: $*"; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stopped=()

stop_pidfile() {   # stop_pidfile FILE NAME: SIGTERM, wait up to 10 s, then SIGKILL
  local f=$1 name=$2 p
  [ -s "$f" ] || return 0
  p=$(cat "$f")
  if kill -0 "$p" 2>/dev/null; then
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$p" 2>/dev/null; then
      say "$name ($p) did not exit after 10 s: SIGKILL"
      kill -KILL "$p" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    fi
    stopped+=("$name($p)")
  fi
  rm -f "$f"
}

# 1. cancel every job while slurmctld and slurmd are still there to clean them up
if alive "$D/slurmctld.pid" && [ -f "$SLURM_CONF" ]; then
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null || true
    for _ in $(seq 100); do   # wait (up to 10 s) until no job is left, completing ones included
      [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1
    done
    left=$(timeout 5 squeue -h -o "%A:%T" 2>/dev/null | tr '\n' ' ')
    [ -n "${left// /}" ] && say "warning: jobs still listed after 10 s: $left"
  fi
fi

# 2. daemons, by PID from their pid files only
stop_pidfile "$D/slurmd.pid" slurmd
stop_pidfile "$D/slurmctld.pid" slurmctld
stop_pidfile "$D/munge/munged.pid" munged    # only exists if start_slurm.sh started munged itself

# 3. state (fresh every start); keep logs and slurm.conf for post-mortems
rm -rf "$D/state" "$D/spool" "$D/munge/munged.seed"

if [ ${#stopped[@]} -eq 0 ]; then say "not running (nothing to stop in $D)"; else say "stopped ${stopped[*]}"; fi
exit 0
