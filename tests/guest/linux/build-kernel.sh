#!/bin/sh
# Build vmig's Linux test guest: a small kernel from Debian's
# linux-source-6.1 with the configuration fragment beside this script, and
# an initramfs of Debian's busybox-static plus init.c (host gcc -static).
#
# Usage: build-kernel.sh [--print-dir] [--no-install] [--jobs N]
#
# The result is cached in $VMIG_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/vmig)
# under linux-<hash>/, keyed by a hash of the configuration, init.c, this
# script and the two packages' versions; a second run with nothing changed
# does nothing.  The directory holds bzImage, vmlinux, initramfs.cpio,
# cmdline (the kernel command line the tests use) and build-seconds.
# With --print-dir the directory is the only thing printed on stdout.
#
# Missing Debian packages are installed with apt-get when run as root (or
# with sudo); with --no-install, or when that is impossible, the script
# exits 3 with the reason on stderr (tests take that as "skip").
# Everything comes from Debian packages; nothing is downloaded otherwise.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
print_dir=0
install=1
jobs=$(nproc 2>/dev/null || echo 2)
while [ $# -gt 0 ]; do
	case "$1" in
	--print-dir) print_dir=1 ;;
	--no-install) install=0 ;;
	--jobs) shift; jobs=$1 ;;
	-h|--help) sed -n '2,20p' "$0"; exit 0 ;;
	*) echo "build-kernel.sh: unknown option $1" >&2; exit 2 ;;
	esac
	shift
done

log() { echo "build-kernel: $*" >&2; }
die() { log "$*"; exit "${2:-1}"; }

# Tools the kernel build needs, and the two sources.
PKGS="linux-source-6.1 busybox-static build-essential bc bison flex libelf-dev
libssl-dev cpio xz-utils patch"
missing=""
for p in $PKGS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
		missing="$missing $p"
done
if [ -n "$missing" ]; then
	[ "$install" = 1 ] || die "missing Debian packages:$missing" 3
	if [ "$(id -u)" -eq 0 ]; then
		SUDO=
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
		SUDO=sudo
	else
		die "missing Debian packages:$missing (run as root or install them)" 3
	fi
	log "installing Debian packages:$missing"
	export DEBIAN_FRONTEND=noninteractive
	$SUDO apt-get update -q >&2 || true
	# shellcheck disable=SC2086
	$SUDO apt-get install -y -q --no-install-recommends $missing >&2 ||
		die "apt-get could not install:$missing" 3
fi

tarball=$(ls /usr/src/linux-source-6.1.tar.* 2>/dev/null | head -n 1)
[ -n "$tarball" ] || die "linux-source-6.1 has no tarball in /usr/src" 3
[ -x /bin/busybox ] || die "busybox-static installed no /bin/busybox" 3
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1)
bbver=$(dpkg-query -W -f='${Version}' busybox-static)

cache=${VMIG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmig}
key=$( (echo "$srcver $bbver"; cat "$here/config" "$here/init.c" "$here/pvm-syscall.patch" \
	"$here/acpi-nopci.patch" "$0") |
	sha256sum | cut -c1-16)
out="$cache/linux-$key"
if [ -f "$out/done" ]; then
	[ "$print_dir" = 1 ] && echo "$out"
	exit 0
fi
mkdir -p "$cache"

# One build at a time per cache: a second caller waits for the first.
exec 9>"$cache/build.lock"
flock 9
if [ -f "$out/done" ]; then
	[ "$print_dir" = 1 ] && echo "$out"
	exit 0
fi

start=$(date +%s)
src="$cache/linux-source-$srcver"
if [ ! -f "$src/.unpacked" ]; then
	log "unpacking $tarball into $src"
	rm -rf "$src" "$src.tmp"
	mkdir -p "$src.tmp"
	tar -xf "$tarball" -C "$src.tmp" --strip-components=1
	touch "$src.tmp/.unpacked"
	mv "$src.tmp" "$src"
fi

# Two changes to Debian's source.  First, a 25 Hz timer choice.  Every timer tick is
# a few thousand instructions of ring-0 code, which an emulating KVM runs
# at 1-2 million a second per vCPU; at the lowest stock choice, 100 Hz, the
# ticks alone eat a large part of that, and on a busy host the boot can
# livelock in them before the kernel reaches tickless mode.
if ! grep -q "config HZ_25$" "$src/kernel/Kconfig.hz"; then
	sed -i -e 's/^\tconfig HZ_100$/\tconfig HZ_25\n\t\tbool "25 HZ"\n\n&/' \
	       -e 's/^\tdefault 100 if HZ_100$/\tdefault 25 if HZ_25\n&/' "$src/kernel/Kconfig.hz"
	grep -q 'default 25 if HZ_25' "$src/kernel/Kconfig.hz" ||
		die "cannot add the 25 Hz choice to $src/kernel/Kconfig.hz"
fi

# And a fix for a host limitation, a no-op elsewhere: see pvm-syscall.patch.
if ! grep -q "vmig test kernel" "$src/arch/x86/mm/fault.c"; then
	patch -s -p1 -N -d "$src" <"$here/pvm-syscall.patch" ||
		die "cannot apply $here/pvm-syscall.patch to $src"
fi
# ACPI without PCI loads no DSDT in 6.1 (so no power-off): acpi-nopci.patch.
if ! grep -q "vmig test kernel" "$src/drivers/acpi/acpica/evhandler.c"; then
	patch -s -p1 -N -d "$src" <"$here/acpi-nopci.patch" ||
		die "cannot apply $here/acpi-nopci.patch to $src"
fi

# The object tree is kept across configurations: a changed fragment
# rebuilds only what it touches.
b="$cache/linux-build-$srcver"
rm -rf "$out.tmp"
mkdir -p "$out.tmp" "$b"

log "configuring (allnoconfig + $here/config)"
make -s -C "$src" O="$b" KCONFIG_ALLCONFIG="$here/config" allnoconfig >&2
# Every option the fragment sets must have survived Kconfig's dependencies.
bad=$(grep -E '^(CONFIG_[A-Z0-9_]+=|# CONFIG_[A-Z0-9_]+ is not set)' "$here/config" |
while IFS= read -r line; do
	case "$line" in
	"# "*) opt=${line#\# }; opt=${opt%% *}
	       ! grep -q "^$opt=" "$b/.config" || echo "$opt is set, wanted off" ;;
	*)     grep -qx "$line" "$b/.config" || echo "${line%%=*} did not come out as ${line#*=}" ;;
	esac
done)
[ -z "$bad" ] || die "the configuration fragment does not hold (fix $here/config):
$bad"

log "building bzImage with $jobs jobs (this takes several minutes)"
make -s -C "$src" O="$b" -j"$jobs" bzImage >"$out.tmp/make.log" 2>&1 ||
	{ tail -n 30 "$out.tmp/make.log" >&2; die "the kernel build failed (log: $out.tmp/make.log)"; }
cp "$b/arch/x86/boot/bzImage" "$b/vmlinux" "$b/.config" "$b/System.map" "$out.tmp/"

log "making the initramfs"
gcc -static -O2 -Wall -o "$out.tmp/init" "$here/init.c"
gcc -O2 -o "$out.tmp/gen_init_cpio" "$src/usr/gen_init_cpio.c"
{
	echo "dir /dev 0755 0 0"
	echo "nod /dev/console 0600 0 0 c 5 1"
	echo "nod /dev/null 0666 0 0 c 1 3"
	echo "nod /dev/ttyS0 0600 0 0 c 4 64"
	echo "dir /proc 0755 0 0"
	echo "dir /sys 0755 0 0"
	echo "dir /tmp 1777 0 0"
	echo "dir /bin 0755 0 0"
	echo "dir /sbin 0755 0 0"
	echo "file /init $out.tmp/init 0755 0 0"
	echo "file /bin/busybox /bin/busybox 0755 0 0"
	for a in sh ash cat echo ls mount umount ps kill sleep date uname dmesg \
		 free top head tail grep wc dd true false poweroff reboot halt sync; do
		echo "slink /bin/$a busybox 0777 0 0"
	done
} >"$out.tmp/initramfs.list"
# Uncompressed: the kernel unpacks it in (emulated) ring 0.
"$out.tmp/gen_init_cpio" "$out.tmp/initramfs.list" >"$out.tmp/initramfs.cpio"

# What the tests pass on the command line; see docs/linux-guest.md.
# noxsave and clearcpuid: features whose instructions KVM's emulator
# lacks (cx16 141, pcid 145, popcnt 151, rdrand 158, fsgsbase 288,
# invpcid 298, rdseed 306, smap 308); lpj: no delay-loop calibration.
echo "console=ttyS0,115200 noxsave clearcpuid=141,145,151,158,288,298,306,308 lpj=1000000 tsc=reliable clocksource=kvm-clock mitigations=off reboot=k panic=-1" \
	>"$out.tmp/cmdline"

end=$(date +%s)
echo $((end - start)) >"$out.tmp/build-seconds"
touch "$out.tmp/done"
rm -rf "$out"
mv "$out.tmp" "$out"
log "done in $((end - start)) s: $out"
[ "$print_dir" = 1 ] && echo "$out"
exit 0
