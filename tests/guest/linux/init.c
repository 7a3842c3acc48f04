/*
 * /init of vmig's Linux test guest: a tiny static program (host gcc
 * -static) that the test suite watches on the serial console.
 *
 * It prints one line as soon as user space runs, starts a busybox shell on
 * the console (so tests can type commands), and then, forever, dirties a
 * working set of memory and prints once a second:
 *
 *   vmig-heartbeat N wall=SECONDS.MICROS dirty=PAGES
 *
 * N counts up by one from 1; a migration that loses no time leaves no gap
 * and no reset in it.  wall is the guest's CLOCK_REALTIME when the line was
 * made, so the host can compare it with its own clock; dirty counts the
 * page writes so far.
 *
 * It also answers the ACPI power button (vmig shutdown) as a distribution's
 * logind does: the kernel's button driver reports a press as KEY_POWER on
 * an input device, and a child of init that reads the event devices prints
 *
 *   vmig-init: power button, powering off
 *
 * syncs and powers the machine off (ACPI S5).
 *
 * Options, read from /proc/cmdline: vmig.wss=MiB, the working set (default
 * 8); vmig.spin=1 to dirty it over and over for the whole second instead
 * of once per second.  Ring-3 code runs natively even where guest ring 0
 * is emulated, so dirtying is cheap there; each page's first touch is a
 * guest page fault, which is not.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096ul

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void say(const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(buf) - 1)
		n = sizeof(buf) - 1;
	/* One write per line, so lines from the shell do not split it. */
	if (write(STDOUT_FILENO, buf, n) < 0)
		return;
}

static unsigned long cmdline_ulong(const char *key, unsigned long dflt)
{
	char buf[4096], *p;
	ssize_t n;
	int fd = open("/proc/cmdline", O_RDONLY);

	if (fd < 0)
		return dflt;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return dflt;
	buf[n] = 0;
	for (p = buf; (p = strstr(p, key)); p++)
		if (p == buf || p[-1] == ' ')
			return strtoul(p + strlen(key), NULL, 0);
	return dflt;
}

static pid_t start_shell(void)
{
	pid_t pid = fork();

	if (pid == 0) {
		char *argv[] = { "/bin/sh", NULL };
		char *envp[] = { "PATH=/bin:/sbin", "HOME=/", "TERM=dumb", "PS1=# ", NULL };

		setsid();
		ioctl(STDIN_FILENO, TIOCSCTTY, 1);
		execve(argv[0], argv, envp);
		say("vmig-init: cannot run /bin/sh: %s\n", strerror(errno));
		_exit(127);
	}
	return pid;
}

/*
 * Clock setting from the console, finer than busybox date's seconds: the
 * tests type "echo SECONDS.NANOS >/tmp/vmig-settime" (set the clock) or
 * "echo +SECONDS >/tmp/vmig-settime" (move it by that much: typing a line
 * takes a good part of a second where guest ring 0 is emulated, so the
 * tests measure the offset on heartbeat lines, whose way out is quick, and
 * type the correction).  The file is a FIFO a child of init waits on.
 * Why at all: a kernel booting on an emulating KVM loses timer ticks
 * before it switches to kvmclock, and its wall clock starts behind.
 */
static void settime_server(void)
{
	static const char path[] = "/tmp/vmig-settime";
	struct timespec host, now;
	char buf[64], *p;
	int fd, digits;
	ssize_t n;
	double delta;

	if (mkfifo(path, 0600) < 0 && errno != EEXIST)
		return;
	if (fork() != 0)
		return;
	for (;;) {
		fd = open(path, O_RDONLY);
		if (fd < 0)
			_exit(1);
		n = read(fd, buf, sizeof(buf) - 1);
		clock_gettime(CLOCK_REALTIME, &now);
		close(fd);
		if (n <= 0)
			continue;
		buf[n] = 0;
		if (buf[0] == '+' || buf[0] == '-') {
			/* A correction: the typing's delay does not matter. */
			delta = strtod(buf, NULL);
			host.tv_sec = now.tv_sec + (time_t)delta;
			host.tv_nsec = now.tv_nsec + (long)((delta - (double)(time_t)delta) * 1e9);
			while (host.tv_nsec >= 1000000000) {
				host.tv_nsec -= 1000000000;
				host.tv_sec++;
			}
			while (host.tv_nsec < 0) {
				host.tv_nsec += 1000000000;
				host.tv_sec--;
			}
			goto set;
		}
		host.tv_nsec = 0;
		digits = 0;
		host.tv_sec = strtoll(buf, &p, 10);
		if (*p == '.')
			for (p++; *p >= '0' && *p <= '9' && digits < 9; p++, digits++)
				host.tv_nsec = host.tv_nsec * 10 + (*p - '0');
		for (; digits < 9; digits++)
			host.tv_nsec *= 10;
		delta = (double)(host.tv_sec - now.tv_sec) + (host.tv_nsec - now.tv_nsec) / 1e9;
set:
		if (clock_settime(CLOCK_REALTIME, &host) < 0)
			say("vmig-settime failed: %s\n", strerror(errno));
		else
			say("vmig-settime done: moved the clock by %+.3f s\n", delta);
	}
}

/*
 * Wait for KEY_POWER on the event devices (evdev, char 13:64+N; no devtmpfs
 * here, so the nodes are made) and power off.  The button driver registers
 * its input device before init runs.  A child of init, so the heartbeat
 * loop stays as it is.
 */
static void power_button_watcher(void)
{
	struct pollfd pfd[8];
	char path[32], name[64];
	unsigned int n = 0, i;
	struct input_event ev[16];

	mkdir("/dev/input", 0755);
	for (i = 0; i < 8; i++) {
		int fd;

		snprintf(path, sizeof(path), "/dev/input/event%u", i);
		if (mknod(path, S_IFCHR | 0600, makedev(13, 64 + i)) < 0 && errno != EEXIST)
			continue;
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			unlink(path);             /* no such device */
			continue;
		}
		if (ioctl(fd, EVIOCGNAME(sizeof(name)), name) < 0)
			snprintf(name, sizeof(name), "?");
		say("vmig-init: input device %s: %s\n", path, name);
		pfd[n++] = (struct pollfd){ .fd = fd, .events = POLLIN };
	}
	if (!n) {
		say("vmig-init: no input devices: the power button is not watched\n");
		return;
	}
	if (fork() != 0) {
		for (i = 0; i < n; i++)
			close(pfd[i].fd);
		return;
	}
	for (;;) {
		if (poll(pfd, n, -1) < 0) {
			if (errno == EINTR)
				continue;
			_exit(1);
		}
		for (i = 0; i < n; i++) {
			ssize_t got;
			size_t k;

			if (!(pfd[i].revents & POLLIN))
				continue;
			got = read(pfd[i].fd, ev, sizeof(ev));
			if (got < 0 && errno != EINTR && errno != EAGAIN)
				_exit(1);
			for (k = 0; got > 0 && k < (size_t)got / sizeof(ev[0]); k++) {
				if (ev[k].type != EV_KEY || ev[k].code != KEY_POWER ||
				    ev[k].value != 1)
					continue;
				say("vmig-init: power button, powering off\n");
				sync();
				reboot(RB_POWER_OFF);
				say("vmig-init: power-off failed: %s\n", strerror(errno));
			}
		}
	}
}

int main(void)
{
	struct timespec now, next, up;
	unsigned long wss_mib, pages, i, beat = 0, dirtied = 0;
	bool spin;
	volatile uint64_t *mem;
	pid_t shell;
	int fd;

	/* The kernel opened /dev/console for us if the initramfs has it. */
	if (fcntl(STDOUT_FILENO, F_GETFD) < 0) {
		fd = open("/dev/console", O_RDWR);
		if (fd >= 0) {
			dup2(fd, 0);
			dup2(fd, 1);
			dup2(fd, 2);
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &up);
	say("vmig-init: user space up at %ld.%03ld s\n", (long)up.tv_sec,
	    up.tv_nsec / 1000000);

	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	wss_mib = cmdline_ulong("vmig.wss=", 8);
	spin = cmdline_ulong("vmig.spin=", 0) != 0;
	pages = wss_mib * (1024 * 1024 / PAGE);
	mem = mmap(NULL, pages ? pages * PAGE : PAGE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		say("vmig-init: cannot map %lu MiB: %s\n", wss_mib, strerror(errno));
		pages = 0;
	}
	signal(SIGCHLD, SIG_DFL);
	settime_server();
	power_button_watcher();
	shell = start_shell();

	clock_gettime(CLOCK_MONOTONIC, &next);
	for (;;) {
		/* Dirty the working set until the next whole second. */
		do {
			for (i = 0; i < pages; i++)
				mem[i * (PAGE / sizeof(*mem))] = beat + i;
			dirtied += pages;
			clock_gettime(CLOCK_MONOTONIC, &now);
		} while (spin && pages && (now.tv_sec < next.tv_sec + 1 ||
					   (now.tv_sec == next.tv_sec + 1 &&
					    now.tv_nsec < next.tv_nsec)));
		next.tv_sec++;
		/* Fell behind (the first touch of the working set is slow): no burst. */
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (now.tv_sec > next.tv_sec)
			next = now;
		if (!spin || !pages)
			while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
				;
		clock_gettime(CLOCK_REALTIME, &now);
		say("vmig-heartbeat %lu wall=%ld.%06ld dirty=%lu\n", ++beat, (long)now.tv_sec,
		    now.tv_nsec / 1000, dirtied);
		/* Reap the shell (and its orphans, which init inherits); restart it. */
		for (;;) {
			pid_t pid = waitpid(-1, NULL, WNOHANG);

			if (pid <= 0)
				break;
			if (pid == shell)
				shell = start_shell();
		}
	}
}
