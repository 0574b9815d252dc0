#!/bin/bash
# Idempotent setup for the AMPEL baseline benchmark:
#   .bench/ampel-venv      pinned AMPEL 0.10 stable set + mongomock
#   .bench/ampel_conf.yaml built with `ampel config build` (rebuilt only if the versions change)
#   .bench/secantus-venv   SecantusDB (Mongo-wire server), only with --secantus
# Usage: benchmarks/ampel_baseline/setup_ampel.sh [--secantus] [--rebuild-config]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
args=(--setup-only)
for a in "$@"; do
  case "$a" in
    --secantus) args+=(--backend secantus) ;;
    --rebuild-config) args+=(--rebuild-config) ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done
exec python3 "$HERE/run_ampel.py" "${args[@]}"
