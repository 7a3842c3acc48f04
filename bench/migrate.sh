#!/bin/sh
# Kept for old habits: the migration benchmark is bench/migrate now (vmig
# side by side with QEMU, see its header).  bench/migrate.sh [RUNS] [ARGS]
# runs it with RUNS runs per workload (default 3) and any further options.
set -eu
runs=3
case "${1:-}" in [0-9]*) runs=$1; shift ;; esac
exec "$(dirname "$0")/migrate" --runs "$runs" "$@"
