#!/bin/sh
# SSH transport benchmark: the same migrations over raw TCP and over
# ssh:// (libssh2 to a private OpenSSH sshd on 127.0.0.1), interleaved so
# that a busy machine hurts both alike.  Prints one JSON object: every
# run, the medians, and for each workload the SSH/TCP throughput ratio
# (transferred bytes / total time, medians).
#
# Workloads (built-in guest, 1 vCPU):
#   paused-raw  768 MiB written, VM paused, --no-compress: one pass of raw
#               pages, i.e. the transport's throughput
#   paused-raw-x2  the same over two connections (--channels 2): over SSH,
#               two SSH connections, each with its own cipher and thread
#   paused-lz4  the same with compression (the default)
#   live        rate=20000 pages/s over 256 MiB, running, defaults
#
# Usage: bench/ssh.sh [RUNS] > result.json     (RUNS default 5; needs root
# for sshd's /run/sshd, /dev/kvm, and openssh-server: tools/install-deps)
# BUILD=DIR builds in DIR instead of _build: a build that changes under a
# running benchmark breaks it.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-5}
build=${BUILD:-"$top/_build"}
"$top/tools/build" "$build" >&2
vmig="$build/vmig"
work=$(mktemp -d /tmp/vmig-sshbench.XXXXXX)
sshd_pid=
cleanup() {
	[ -n "$sshd_pid" ] && kill "$sshd_pid" 2>/dev/null
	for p in "$work"/A/*.pid "$work"/B/*.pid; do
		[ -s "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null
	done
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

# ---- a private sshd on 127.0.0.1 ----
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
	echo $((20000 + $$ % 20000)))
ssh-keygen -q -t ed25519 -N '' -f "$work/hostkey"
ssh-keygen -q -t ed25519 -N '' -f "$work/id"
cp "$work/id.pub" "$work/authorized_keys"
cat > "$work/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port $port
HostKey $work/hostkey
AuthorizedKeysFile $work/authorized_keys
PidFile $work/sshd.pid
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
EOF
[ "$(id -u)" -eq 0 ] && mkdir -p /run/sshd
/usr/sbin/sshd -D -f "$work/sshd_config" -e 2> "$work/sshd.log" &
sshd_pid=$!
i=0
while ! ssh-keyscan -p "$port" -t ed25519 127.0.0.1 > "$work/known_hosts" 2>/dev/null ||
	[ ! -s "$work/known_hosts" ]; do
	i=$((i + 1))
	[ $i -lt 100 ] || { echo "sshd did not start: $(cat "$work/sshd.log")" >&2; exit 1; }
	sleep 0.1
done
mkdir -p "$work/A" "$work/B"
printf '#!/bin/sh\nVMIG_RUN_DIR=%s/B; export VMIG_RUN_DIR\nexec %s "$@"\n' "$work" "$vmig" \
	> "$work/vmig-on-b"
chmod +x "$work/vmig-on-b"
user=$(id -un)

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else print int((v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
field() { sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"; }

# Start the VM on A, fill its working set, pause it if asked.
start_vm() {   # wl wss_pages pause
	VMIG_LOG=debug VMIG_RUN_DIR="$work/A" "$vmig" run vm --memory 1G --vcpus 1 --workload "$1" \
		--detach >/dev/null
	n=0
	while :; do
		pw=$(VMIG_RUN_DIR="$work/A" "$vmig" status vm --json | field pages_written | tail -1)
		[ "${pw:-0}" -ge "$2" ] && break
		n=$((n + 1))
		[ $n -lt 600 ] || { echo "the guest did not fill its working set" >&2; exit 1; }
		sleep 0.1
	done
	[ "$3" = pause ] && VMIG_RUN_DIR="$work/A" "$vmig" pause vm >/dev/null
	return 0
}

# One migration over $1 (tcp|ssh) with options $2; appends its JSON to $3.
migrate_once() {
	VMIG_RUN_DIR="$work/B" "$vmig" stop vm >/dev/null 2>&1 || true
	if [ "$1" = tcp ]; then
		p=$((port + 1))
		VMIG_RUN_DIR="$work/B" "$vmig" incoming --listen "tcp://127.0.0.1:$p" --detach >/dev/null
		# shellcheck disable=SC2086
		VMIG_RUN_DIR="$work/A" "$vmig" migrate vm "tcp://127.0.0.1:$p" $2 --json \
			2>>"$work/errors" >> "$3" || true
	else
		# shellcheck disable=SC2086
		VMIG_RUN_DIR="$work/A" "$vmig" migrate vm "ssh://$user@127.0.0.1:$port" $2 \
			--known-hosts "$work/known_hosts" --identity "$work/id" \
			--remote-vmig "$work/vmig-on-b" --json 2>>"$work/errors" >> "$3" || true
		grep -h "ssh: \[127.0.0.1\]" "$work/A/vm.log" 2>/dev/null | tail -1 |
			sed 's/.*ssh: [^ ]* //' > "$work/cipher"
	fi
	VMIG_RUN_DIR="$work/B" "$vmig" stop vm >/dev/null 2>&1 || true
	VMIG_RUN_DIR="$work/A" "$vmig" stop vm >/dev/null 2>&1 || true
}

throughput() {   # runs file -> median bytes/s
	while read -r line; do
		b=$(echo "$line" | field transferred_bytes)
		t=$(echo "$line" | field total_time_ms)
		[ -n "$b" ] && [ "${t:-0}" -gt 0 ] && echo $((b * 1000 / t))
	done < "$1" | median
}

printf '{"machine":{"nproc":%s,"kernel":"%s","loadavg":"%s"},"libssh2":"%s","workloads":[' \
	"$(nproc)" "$(uname -r)" "$(cut -d' ' -f1-3 /proc/loadavg)" \
	"$(pkg-config --modversion libssh2 2>/dev/null || echo unknown)"
first=1
# name|workload|wss pages|pause|migrate options
# (one connection unless the workload says: --channels' default, auto, is
# one per CPU over tcp:// but one over ssh://, which would compare unlike)
for w in "paused-raw|rate=max,wss=768M,quiet|196608|pause|--no-compress --channels 1" \
	 "paused-raw-x2|rate=max,wss=768M,quiet|196608|pause|--no-compress --channels 2" \
	 "paused-lz4|rate=max,wss=768M,quiet|196608|pause|--channels 1" \
	 "live|rate=20000,wss=256M,quiet|65536|run|--channels 1 --timeout 60 --on-timeout force"; do
	IFS='|' read -r name wl wss pause opts <<EOF
$w
EOF
	: > "$work/$name.tcp"
	: > "$work/$name.ssh"
	i=0
	while [ $i -lt "$runs" ]; do
		i=$((i + 1))
		for t in tcp ssh; do
			start_vm "$wl" "$wss" "$pause"
			migrate_once "$t" "$opts" "$work/$name.$t"
		done
	done
	[ $first -eq 1 ] || printf ','
	first=0
	printf '{"name":"%s","workload":"%s","paused":%s,"options":"%s"' "$name" "$wl" \
		"$([ "$pause" = pause ] && echo true || echo false)" "$opts"
	for t in tcp ssh; do
		printf ',"%s":{"runs":[%s],"median":{' "$t" "$(paste -sd, "$work/$name.$t")"
		sep=""
		for f in total_time_ms downtime_ms transferred_bytes iterations; do
			printf '%s"%s":%s' "$sep" "$f" "$(field "$f" < "$work/$name.$t" | median)"
			sep=","
		done
		printf ',"throughput_Bps":%s}}' "$(throughput "$work/$name.$t")"
	done
	tcp=$(throughput "$work/$name.tcp")
	ssh=$(throughput "$work/$name.ssh")
	printf ',"ssh_over_tcp":%s}' "$(awk -v a="$ssh" -v b="$tcp" 'BEGIN { printf "%.3f", b ? a / b : 0 }')"
done
printf '],"ssh_cipher":"%s"}\n' "$(cat "$work/cipher" 2>/dev/null)"
[ -s "$work/errors" ] && { echo "errors:" >&2; cat "$work/errors" >&2; }
exit 0
