#!/bin/sh
# Run vmig's whole test suite on this machine: installs what is missing
# (Debian packages), builds in _build/, runs `make check` and the Linux
# guest suite (`make check-linux`), and prints the totals as its last line.
# KVM tests need /dev/kvm (they skip without it).
set -u
top=$(cd "$(dirname "$0")" && pwd)
build=${VMIG_BUILD_DIR:-"$top/_build"}

"$top/tools/build" "$build" || { echo "build failed"; echo "0 passed, 1 failed, 0 skipped"; exit 1; }
cd "$build"
rm -f $(find tests -name '*.trs' -o -name '*.log' 2>/dev/null)
make -s check >/dev/null 2>&1
status=$?
# The Linux guest suite, once (not in TESTS, so .ci/run's sanitizer rerun
# skips it).  Its first run builds the test kernel from Debian's
# linux-source-6.1 (about 6.5 minutes at -j2), cached in ~/.cache/vmig.
make -s check-linux >/dev/null 2>&1 || status=1
for log in $(find tests -name '*.log' | sort); do
	trs=${log%.log}.trs
	[ -f "$trs" ] || continue
	printf '%s: %s\n' "$(sed -n 's/^:test-result: //p' "$trs" | head -n 1)" "${log%.log}"
	if ! grep -q '^:test-result: PASS' "$trs"; then
		sed 's/^/    /' "$log"
	fi
done
"$top/tests/summarize" "$build"
sum=$?
[ $status -eq 0 ] && [ $sum -eq 0 ]
