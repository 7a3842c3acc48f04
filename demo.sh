#!/bin/sh
# The demo: build vmig, start a 2-vCPU VM running the built-in test guest,
# and live-migrate it to a second VMM process on this host while the guest
# keeps writing memory.  "Host A" and "host B" are two run directories, as
# two machines would have.  Needs root (or sudo) for apt and /dev/kvm.
set -eu
top=$(cd "$(dirname "$0")" && pwd)
build="$top/_build"

"$top/tools/build" "$build"
vmig="$build/vmig"
demo=$(mktemp -d /tmp/vmig-demo.XXXXXX)
A="$demo/hostA" B="$demo/hostB"
port=$(( 20000 + $$ % 20000 ))
name=demo

cleanup() {
	VMIG_RUN_DIR=$A "$vmig" stop "$name" >/dev/null 2>&1 || true
	VMIG_RUN_DIR=$B "$vmig" stop "$name" >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM

say() { printf '\n\033[1m%s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

say "Host A: start a VM whose guest dirties 2 x 64 MiB at 20,000 pages/s per vCPU"
VMIG_RUN_DIR=$A run "$vmig" run "$name" --memory 512M --vcpus 2 \
	--workload rate=20000,wss=64M --detach
sleep 2
VMIG_RUN_DIR=$A run "$vmig" status "$name"

say "Host B: wait for the migration"
VMIG_RUN_DIR=$B run "$vmig" incoming --listen "tcp://127.0.0.1:$port" --detach

say "Host A: live-migrate it to host B"
VMIG_RUN_DIR=$A run "$vmig" migrate "$name" "tcp://127.0.0.1:$port"

say "Host A no longer runs it:"
VMIG_RUN_DIR=$A run "$vmig" list
say "Host B runs it, and the guest's own counters go on from where they were:"
VMIG_RUN_DIR=$B run "$vmig" status "$name"
sleep 1
VMIG_RUN_DIR=$B "$vmig" status "$name" | grep -E 'generation|pages_written'
say "The guest's serial console, now on host B:"
tail -n 3 "$B/$name.log"
say "Stop it"
VMIG_RUN_DIR=$B run "$vmig" stop "$name"
trap - EXIT INT TERM
rm -rf "$demo"
