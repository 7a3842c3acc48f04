#!/bin/sh
# Run the dirty log benchmark (bench/dirtylog.c): harvest cost per mode for
# 1, 4 and 16 GiB guests with about 0 %, 1 % and 10 % of pages dirty.
# JSON goes to stdout, or to FILE with -o FILE; progress goes to stderr.
# Other arguments are passed to dirtylog-bench (see its --help), e.g.
#   bench/dirtylog.sh -o dirtylog.json --runs 7 --sizes 1,4
# The binary is taken from $VMIG_BUILD_DIR (default: _build next to this
# tree) and built there if missing.  Needs /dev/kvm and about 2 GiB of
# free RAM; takes 2-10 minutes on a 2-core machine.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
build=${VMIG_BUILD_DIR:-"$top/_build"}
bin="$build/bench/dirtylog-bench"
out=
if [ "${1:-}" = "-o" ]; then
	[ $# -ge 2 ] || { echo "usage: $0 [-o FILE] [dirtylog-bench args]" >&2; exit 2; }
	out=$2
	shift 2
fi
if [ ! -x "$bin" ]; then
	[ -f "$build/Makefile" ] || { echo "$0: no build in $build (run tools/build)" >&2; exit 1; }
	make -s -C "$build" bench/dirtylog-bench >&2
fi
[ -r /dev/kvm ] && [ -w /dev/kvm ] || { echo "$0: cannot use /dev/kvm" >&2; exit 77; }
if [ -n "$out" ]; then
	exec "$bin" --out "$out" "$@"
else
	exec "$bin" "$@"
fi
