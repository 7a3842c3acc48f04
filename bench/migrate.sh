#!/bin/sh
# Live-migration benchmark: vmig, one host, loopback TCP, the built-in
# guest.  Each workload runs RUNS times (default 5); prints one JSON object
# with every run and the median of each figure.  The destination is not
# pre-populated (vmig does not do that yet): say so when quoting figures.
#
# Usage: bench/migrate.sh [RUNS] > result.json
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-5}
"$top/tools/build" "$top/_build"
vmig="$top/_build/vmig"
work=$(mktemp -d /tmp/vmig-bench.XXXXXX)
trap 'pkill -f "vmig-bench.*incomin[g]" 2>/dev/null; rm -rf "$work"' EXIT

# name|memory|vcpus|workload
workloads="idle-1g|1G|1|rate=1,wss=4M,quiet
dirty-256m-20kps|1G|1|rate=20000,wss=256M,quiet
dirty-256m-max|1G|1|rate=max,wss=256M,quiet"

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print int((v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
field() { sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"; }

printf '{"machine":{"nproc":%s,"kernel":"%s"},"destination_prepopulated":false,"workloads":[' \
	"$(nproc)" "$(uname -r)"
first=1
echo "$workloads" | while IFS='|' read -r name mem vcpus wl; do
	: > "$work/$name.runs"
	i=0
	while [ $i -lt "$runs" ]; do
		i=$((i + 1))
		A="$work/A" B="$work/B"
		rm -rf "$A" "$B"
		port=$(( 30000 + ($$ + i) % 20000 ))
		VMIG_RUN_DIR=$A "$vmig" run vm --memory "$mem" --vcpus "$vcpus" --workload "$wl" \
			--detach >/dev/null
		sleep 3      # boot and fill the working set
		VMIG_RUN_DIR=$B "$vmig" incoming --listen "tcp://127.0.0.1:$port" --detach >/dev/null
		VMIG_RUN_DIR=$A "$vmig" migrate vm "tcp://127.0.0.1:$port" --timeout 60 \
			--on-timeout force --json 2>/dev/null >> "$work/$name.runs" || true
		VMIG_RUN_DIR=$B "$vmig" stop vm >/dev/null 2>&1 || true
		VMIG_RUN_DIR=$A "$vmig" stop vm >/dev/null 2>&1 || true
	done
	[ $first -eq 1 ] || printf ','
	first=0
	printf '{"name":"%s","memory":"%s","vcpus":%s,"workload":"%s","runs":[%s],"median":{' \
		"$name" "$mem" "$vcpus" "$wl" "$(paste -sd, "$work/$name.runs")"
	sep=""
	for f in total_time_ms downtime_ms transferred_bytes iterations; do
		printf '%s"%s":%s' "$sep" "$f" "$(field "$f" < "$work/$name.runs" | median)"
		sep=","
	done
	printf '}}'
done
printf ']}\n'
