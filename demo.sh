#!/bin/sh
# The demo: build vmig, start a 2-vCPU VM running the built-in test guest,
# show it working (its own progress counters, read from guest memory),
# pause and resume it, and stop it.  Needs root (or sudo) for apt and
# /dev/kvm; uses a run directory of its own.
set -eu
top=$(cd "$(dirname "$0")" && pwd)
build="$top/_build"

"$top/tools/build" "$build"
vmig="$build/vmig"
export VMIG_RUN_DIR="${VMIG_RUN_DIR:-$(mktemp -d /tmp/vmig-demo.XXXXXX)}"
name=demo

cleanup() { "$vmig" stop "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT INT TERM

echo "\$ vmig run $name --memory 512M --vcpus 2 --workload rate=20000,wss=64M --detach"
"$vmig" run "$name" --memory 512M --vcpus 2 --workload rate=20000,wss=64M --detach
sleep 1
echo "\$ vmig list"
"$vmig" list
for i in 1 2 3; do
	sleep 1
	echo "\$ vmig status $name"
	"$vmig" status "$name"
done
echo "\$ vmig pause $name"; "$vmig" pause "$name"
sleep 1
"$vmig" status "$name" | grep -E 'state|pages_written'
echo "\$ vmig resume $name"; "$vmig" resume "$name"
sleep 1
"$vmig" status "$name" | grep -E 'state|pages_written'
echo "\$ tail -n 3 $VMIG_RUN_DIR/$name.log   # the guest's serial console"
tail -n 3 "$VMIG_RUN_DIR/$name.log"
echo "\$ vmig stop $name"
"$vmig" stop "$name"
trap - EXIT INT TERM
