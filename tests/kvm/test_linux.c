/*
 * A real Linux guest in vmig: boot to user space, the serial console both
 * ways, and a live migration while the guest's workload runs.
 *
 * The guest is the small test kernel and initramfs that
 * tests/guest/linux/build-kernel.sh builds from Debian's linux-source-6.1
 * and busybox-static (cached; see docs/linux-guest.md).  Its /init
 * (tests/guest/linux/init.c) prints "vmig-init: user space up", starts a
 * shell on the console and prints "vmig-heartbeat N wall=S.US" every
 * second while it dirties memory.  The suite is skipped (exit 77) when
 * /dev/kvm is missing or the kernel cannot be built here.
 *
 * Consoles are pipes read by a thread of the test, which keeps everything
 * the guest printed and when each line arrived (host CLOCK_REALTIME), so
 * the migration case can check the heartbeat's numbers and the guest's
 * clock against the host's.
 */
#include "config.h"

#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "vmig/migrate.h"
#include "vmig/transport.h"
#include "vmig/vm.h"
#include "kvm-test.h"

#define BOOT_TIMEOUT_S 300       /* the aim is 120 s on an emulating KVM */

static char kdir[4096];          /* the built kernel's directory */
static char kcmdline[2048];
static char tmpdir[128];

/* ---- console capture ---- */

struct console {
	int rfd, wfd;
	pthread_t thread;
	pthread_mutex_t lock;
	char *buf;
	size_t len, cap;
	/* Host real time (ns) at which each byte offset's line was complete. */
	size_t nr_marks;
	struct { size_t off; uint64_t t_ns; } marks[8192];
	bool echo;
};

static uint64_t real_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *console_reader(void *arg)
{
	struct console *c = arg;
	char tmp[4096];
	ssize_t n;

	while ((n = read(c->rfd, tmp, sizeof(tmp))) > 0) {
		uint64_t t = real_ns();
		ssize_t i;

		if (c->echo && write(STDERR_FILENO, tmp, (size_t)n) < 0)
			c->echo = false;
		pthread_mutex_lock(&c->lock);
		if (c->len + (size_t)n + 1 > c->cap) {
			c->cap = (c->len + (size_t)n + 1) * 2;
			c->buf = realloc(c->buf, c->cap);
			ck_assert_ptr_nonnull(c->buf);
		}
		memcpy(c->buf + c->len, tmp, (size_t)n);
		for (i = 0; i < n; i++)
			if (tmp[i] == '\n' && c->nr_marks < sizeof(c->marks) / sizeof(c->marks[0])) {
				c->marks[c->nr_marks].off = c->len + (size_t)i;
				c->marks[c->nr_marks++].t_ns = t;
			}
		c->len += (size_t)n;
		c->buf[c->len] = 0;
		pthread_mutex_unlock(&c->lock);
	}
	return NULL;
}

static void console_open(struct console *c)
{
	int p[2];

	memset(c, 0, sizeof(*c));
	ck_assert_int_eq(pipe2(p, O_CLOEXEC), 0);
	c->rfd = p[0];
	c->wfd = p[1];
	c->echo = getenv("VMIG_TEST_CONSOLE") != NULL;
	pthread_mutex_init(&c->lock, NULL);
	ck_assert_int_eq(pthread_create(&c->thread, NULL, console_reader, c), 0);
}

/* Call after the VMs writing to it are destroyed. */
static void console_close(struct console *c)
{
	close(c->wfd);
	pthread_join(c->thread, NULL);
	close(c->rfd);
	free(c->buf);
}

/*
 * Wait until @needle appears at or after byte @from; returns the offset
 * just past it, or (size_t)-1 on timeout.
 */
static size_t console_wait(struct console *c, size_t from, const char *needle,
			   unsigned int timeout_ms)
{
	uint64_t end = kvm_test_now_ms() + timeout_ms;

	for (;;) {
		size_t found = (size_t)-1;

		pthread_mutex_lock(&c->lock);
		if (from < c->len) {
			char *p = strstr(c->buf + from, needle);

			if (p)
				found = (size_t)(p - c->buf) + strlen(needle);
		}
		pthread_mutex_unlock(&c->lock);
		if (found != (size_t)-1 || kvm_test_now_ms() >= end)
			return found;
		kvm_test_sleep_ms(50);
	}
}

static size_t console_len(struct console *c)
{
	size_t n;

	pthread_mutex_lock(&c->lock);
	n = c->len;
	pthread_mutex_unlock(&c->lock);
	return n;
}

/* The last few hundred bytes, for failure messages. */
static const char *console_tail(struct console *c)
{
	static char tail[601];
	size_t start;

	pthread_mutex_lock(&c->lock);
	start = c->len > 600 ? c->len - 600 : 0;
	snprintf(tail, sizeof(tail), "%s", c->buf ? c->buf + start : "");
	pthread_mutex_unlock(&c->lock);
	return tail;
}

struct beat {
	unsigned long n;
	double wall;            /* guest CLOCK_REALTIME, seconds */
	double host;            /* host CLOCK_REALTIME when the line arrived */
};

/* Every heartbeat line from byte @from on, in order. */
static size_t heartbeats(struct console *c, size_t from, struct beat *out, size_t max)
{
	size_t n = 0, m = 0;
	char *p;

	pthread_mutex_lock(&c->lock);
	p = c->buf ? c->buf + from : NULL;
	while (p && n < max && (p = strstr(p, "vmig-heartbeat "))) {
		size_t off = (size_t)(p - c->buf);
		char *nl = strchr(p, '\n');

		if (!nl)
			break;
		if (sscanf(p, "vmig-heartbeat %lu wall=%lf", &out[n].n, &out[n].wall) == 2) {
			while (m < c->nr_marks && c->marks[m].off < off)
				m++;
			out[n].host = m < c->nr_marks ? c->marks[m].t_ns / 1e9 : 0;
			n++;
		}
		p = nl;
	}
	pthread_mutex_unlock(&c->lock);
	return n;
}

/* ---- VMs ---- */

static struct vmig_vm *boot_vm(const char *image, unsigned int vcpus, const char *extra,
			       struct console *con)
{
	char kernel[4200], initrd[4200], cmdline[2600];
	struct vmig_vm_config cfg = {
		.name = "linux", .mem_size = 256ull << 20, .nr_vcpus = vcpus,
		.console_fd = con->wfd, .kernel = kernel, .initrd = initrd, .cmdline = cmdline,
	};
	struct vmig_err err = { 0 };
	struct vmig_vm *vm = NULL;
	int ret;

	snprintf(kernel, sizeof(kernel), "%s/%s", kdir, image);
	snprintf(initrd, sizeof(initrd), "%s/initramfs.cpio", kdir);
	snprintf(cmdline, sizeof(cmdline), "%s %s", kcmdline, extra ? extra : "");
	ret = vmig_vm_create(&cfg, &vm, &err);
	ck_assert_msg(ret == 0, "create: %s", err.msg);
	ret = vmig_vm_start(vm, &err);
	ck_assert_msg(ret == 0, "start: %s", err.msg);
	return vm;
}

/* Wait for user space; returns the seconds it took. */
static double wait_user_space(struct vmig_vm *vm, struct console *con, uint64_t t0)
{
	size_t at = console_wait(con, 0, "vmig-init: user space up", BOOT_TIMEOUT_S * 1000);

	ck_assert_msg(at != (size_t)-1, "no user space after %d s (VM %s: %s); console "
		      "ends:\n%s", BOOT_TIMEOUT_S, vmig_vm_state_name(vmig_vm_state(vm)),
		      vmig_vm_stop_reason(vm), console_tail(con));
	return (kvm_test_now_ms() - t0) / 1000.0;
}

/* Type @cmd at the guest's shell and wait for @expect. */
static void shell_roundtrip(struct vmig_vm *vm, struct console *con, const char *cmd,
			    const char *expect)
{
	size_t from = console_len(con), sent = 0, len = strlen(cmd);
	uint64_t end = kvm_test_now_ms() + 5000;

	while (sent < len && kvm_test_now_ms() < end) {
		sent += vmig_vm_console_input(vm, cmd + sent, len - sent);
		if (sent < len)
			kvm_test_sleep_ms(10);
	}
	ck_assert_msg(sent == len, "the UART took %zu of %zu bytes", sent, len);
	ck_assert_msg(console_wait(con, from, expect, 60000) != (size_t)-1,
		      "typed '%s' and no '%s' came back; console ends:\n%s", cmd, expect,
		      console_tail(con));
}

/* ---- cases ---- */

START_TEST(boots_to_user_space_and_console_works)
{
	struct console con;
	struct vmig_vm *vm;
	uint64_t t0 = kvm_test_now_ms();
	double secs;

	console_open(&con);
	vm = boot_vm("bzImage", 2, NULL, &con);
	secs = wait_user_space(vm, &con, t0);
	printf("linux: bzImage, 2 vCPUs: first user-space line after %.1f s\n", secs);
	fflush(stdout);
	/* Both vCPUs came up (MP table, INIT/SIPI through the in-kernel LAPIC). */
	ck_assert_msg(console_wait(&con, 0, "Brought up 1 node, 2 CPUs", 0) != (size_t)-1,
		      "the second vCPU did not come up; console ends:\n%s", console_tail(&con));
	/* Input: the UART's receive side and IRQ 4, through the shell. */
	shell_roundtrip(vm, &con, "echo vmig-$((6*7))-ok\n", "vmig-42-ok");
	shell_roundtrip(vm, &con, "cat /proc/interrupts | grep -c ttyS\n", "1\r\n");
	vmig_vm_destroy(vm);
	console_close(&con);
}
END_TEST

START_TEST(boots_elf_vmlinux)
{
	struct console con;
	struct vmig_vm *vm;
	uint64_t t0 = kvm_test_now_ms();
	double secs;

	console_open(&con);
	vm = boot_vm("vmlinux", 1, NULL, &con);
	secs = wait_user_space(vm, &con, t0);
	printf("linux: ELF vmlinux, 1 vCPU: first user-space line after %.1f s\n", secs);
	fflush(stdout);
	vmig_vm_destroy(vm);
	console_close(&con);
}
END_TEST

START_TEST(refuses_what_is_not_a_kernel)
{
	char path[4200], old[4200];
	struct vmig_vm_config cfg = {
		.name = "bad", .mem_size = 64ull << 20, .nr_vcpus = 1, .console_fd = -1,
		.kernel = path,
	};
	struct vmig_err err = { 0 };
	struct vmig_vm *vm = NULL;
	uint8_t hdr[0x1000];
	FILE *f;
	int ret;

	snprintf(path, sizeof(path), "%s/not-a-kernel", tmpdir);
	f = fopen(path, "w");
	ck_assert_ptr_nonnull(f);
	fputs("this is text, not a kernel\n", f);
	fclose(f);
	ret = vmig_vm_create(&cfg, &vm, &err);
	ck_assert_int_eq(ret, -ENOEXEC);
	ck_assert_msg(strstr(err.msg, "not a Linux kernel"), "message: %s", err.msg);

	/* The real bzImage's header with an old protocol version. */
	snprintf(old, sizeof(old), "%s/bzImage", kdir);
	f = fopen(old, "r");
	ck_assert_ptr_nonnull(f);
	ck_assert_int_eq(fread(hdr, 1, sizeof(hdr), f), sizeof(hdr));
	fclose(f);
	hdr[0x206] = 0x04;          /* 2.04 */
	snprintf(path, sizeof(path), "%s/old-bzImage", tmpdir);
	f = fopen(path, "w");
	ck_assert_ptr_nonnull(f);
	ck_assert_int_eq(fwrite(hdr, 1, sizeof(hdr), f), sizeof(hdr));
	fclose(f);
	err = (struct vmig_err){ 0 };
	ret = vmig_vm_create(&cfg, &vm, &err);
	ck_assert_int_eq(ret, -ENOEXEC);
	ck_assert_msg(strstr(err.msg, "boot protocol 2.04"), "message: %s", err.msg);

	/* --workload and --kernel together. */
	cfg.workload = "rate=10";
	err = (struct vmig_err){ 0 };
	ck_assert_int_eq(vmig_vm_create(&cfg, &vm, &err), -EINVAL);
	ck_assert_ptr_null(vm);
}
END_TEST

struct dst_ctx {
	char uri[256];
	struct vmig_listener *l;
	int console_fd;
	struct vmig_vm *vm;
	int ret;
	struct vmig_err err;
	pthread_t thread;
};

static void *dst_main(void *arg)
{
	struct dst_ctx *d = arg;
	struct vmig_dst_params p = { .console_fd = d->console_fd, .live = true };
	struct vmig_transport *t = NULL;

	d->ret = vmig_transport_accept(d->l, 60000, &t, &d->err);
	if (d->ret)
		return NULL;
	d->ret = vmig_migrate_dst_run(t, &p, &d->vm, &d->err);
	vmig_transport_close(t);
	return NULL;
}

START_TEST(migrates_while_the_workload_runs)
{
	struct console src_con, dst_con;
	struct dst_ctx d = { 0 };
	struct vmig_migrate_params p = { .max_downtime_ms = 300, .compress = true };
	struct vmig_migrate_stats st = { 0 };
	struct vmig_migration *m = NULL;
	struct vmig_err err = { 0 };
	struct vmig_vm *vm;
	struct beat sb[512], db[512];
	size_t ns, nd, i, from;
	uint64_t t0 = kvm_test_now_ms();
	double worst = 0;
	int ret;

	console_open(&src_con);
	console_open(&dst_con);
	vm = boot_vm("bzImage", 2, "vmig.wss=16", &src_con);
	wait_user_space(vm, &src_con, t0);
	/*
	 * Set the guest's clock from the host's, as NTP would: booting on an
	 * emulating KVM, the kernel loses timer ticks before it switches to
	 * kvmclock and starts its wall clock seconds behind.  Typing takes
	 * long here, so measure the offset on a heartbeat (whose way out is
	 * quick) and type the correction.  What migration must do is keep the
	 * clock where it is.
	 */
	{
		char cmd[96];
		struct beat b[512];
		size_t nb;

		from = console_len(&src_con);
		ck_assert(console_wait(&src_con, from, "vmig-heartbeat ", 60000) != (size_t)-1);
		ck_assert(console_wait(&src_con, console_len(&src_con), "\n", 5000) != (size_t)-1);
		nb = heartbeats(&src_con, 0, b, 512);
		ck_assert_uint_gt(nb, 0);
		snprintf(cmd, sizeof(cmd), "echo %+.6f >/tmp/vmig-settime\n",
			 b[nb - 1].host - b[nb - 1].wall);
		shell_roundtrip(vm, &src_con, cmd, "vmig-settime done");
	}
	for (i = 0; i < 3; i++) {
		from = console_len(&src_con);
		ck_assert_msg(console_wait(&src_con, from, "vmig-heartbeat ", 60000) != (size_t)-1,
			      "no heartbeats; console ends:\n%s", console_tail(&src_con));
	}

	snprintf(d.uri, sizeof(d.uri), "unix:%s/mig.sock", tmpdir);
	d.console_fd = dst_con.wfd;
	ret = vmig_transport_listen(d.uri, &d.l, &err);
	ck_assert_msg(ret == 0, "listen: %s", err.msg);
	ck_assert_int_eq(pthread_create(&d.thread, NULL, dst_main, &d), 0);

	p.uri = d.uri;
	ret = vmig_migrate_src_start(vm, &p, &m, &err);
	ck_assert_msg(ret == 0, "migrate: %s", err.msg);
	for (;;) {
		struct pollfd pfd = { .fd = vmig_migrate_src_event_fd(m), .events = POLLIN };
		uint64_t v;

		poll(&pfd, 1, 50);
		if (read(pfd.fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
			ck_abort_msg("eventfd: %s", strerror(errno));
		vmig_migrate_src_stats(m, &st);
		if (vmig_migrate_status_final(st.status))
			break;
	}
	vmig_migrate_src_finish(m, &st);
	pthread_join(d.thread, NULL);
	vmig_listener_close(d.l);
	ck_assert_msg(st.status == VMIG_MIGRATE_COMPLETED, "migration %s: %s",
		      vmig_migrate_status_name(st.status), st.error);
	ck_assert_msg(d.ret == 0 && d.vm, "destination: %s", d.err.msg);
	printf("linux: migrated in %" PRIu64 " ms, downtime %" PRIu64 " ms, %" PRIu64
	       " iterations, %" PRIu64 " bytes\n", st.total_ms, st.downtime_ms, st.iteration,
	       st.transferred_bytes);

	/* The heartbeat goes on at the destination: next number, no reset. */
	ck_assert_msg(console_wait(&dst_con, 0, "vmig-heartbeat ", 30000) != (size_t)-1 &&
		      console_wait(&dst_con, 0, "\n", 5000) != (size_t)-1,
		      "no heartbeat on the destination (VM %s: %s); its console:\n%s",
		      vmig_vm_state_name(vmig_vm_state(d.vm)), vmig_vm_stop_reason(d.vm),
		      console_tail(&dst_con));
	kvm_test_sleep_ms(5000);
	ns = heartbeats(&src_con, 0, sb, 512);
	nd = heartbeats(&dst_con, 0, db, 512);
	ck_assert_msg(ns >= 3 && nd >= 3, "heartbeats: %zu on the source, %zu after", ns, nd);
	ck_assert_msg(db[0].n == sb[ns - 1].n + 1, "the source's last heartbeat was %lu, "
		      "the destination's first %lu", sb[ns - 1].n, db[0].n);
	for (i = 1; i < nd; i++)
		ck_assert_msg(db[i].n == db[i - 1].n + 1, "heartbeat %lu followed by %lu",
			      db[i - 1].n, db[i].n);
	/* No gap: the first beat there came about a second after the last here. */
	ck_assert_msg(db[0].wall - sb[ns - 1].wall < 2.5, "guest clock gap of %.3f s "
		      "across the migration", db[0].wall - sb[ns - 1].wall);
	/* The guest's wall clock stays with the host's. */
	for (i = 0; i < nd; i++) {
		double off = db[i].host - db[i].wall;

		if (off < 0)
			off = -off;
		if (off > worst)
			worst = off;
	}
	printf("linux: guest clock minus host clock at the line's arrival: source's last "
	       "beats %+.3f %+.3f s, destination's first %+.3f %+.3f s\n",
	       sb[ns - 2].wall - sb[ns - 2].host, sb[ns - 1].wall - sb[ns - 1].host,
	       db[0].wall - db[0].host, db[1].wall - db[1].host);
	printf("linux: after migration the guest clock is within %.3f s of the host's\n",
	       worst);
	fflush(stdout);
	ck_assert_msg(worst < 1.0, "the guest's clock is %.3f s off the host's", worst);
	/* And the migration itself moved it by little (the downtime at most). */
	ck_assert_msg(fabs((db[0].wall - db[0].host) - (sb[ns - 1].wall - sb[ns - 1].host)) < 0.5,
		      "the guest's clock moved by %.3f s against the host's across the migration",
		      (db[0].wall - db[0].host) - (sb[ns - 1].wall - sb[ns - 1].host));
	/* The console still works both ways there. */
	shell_roundtrip(d.vm, &dst_con, "echo moved-$((40+2))\n", "moved-42");

	vmig_vm_destroy(vm);
	vmig_vm_destroy(d.vm);
	console_close(&src_con);
	console_close(&dst_con);
}
END_TEST

static void setup(void)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/vmig-linux-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

static void teardown(void)
{
	char cmd[200];

	snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
	if (system(cmd) != 0)
		fprintf(stderr, "cannot remove %s\n", tmpdir);
}

/* Find or build the test kernel; exit 77 if that is impossible here. */
static void find_kernel(void)
{
	const char *dir = getenv("VMIG_LINUX_DIR");
	const char *script = getenv("VMIG_LINUX_BUILD");
	char cmd[4200], path[4200];
	FILE *f;
	size_t n;
	int status;

	if (!dir) {
		if (!script)
			script = "tests/guest/linux/build-kernel.sh";
		/* Builds once (minutes), then answers from the cache at once. */
		snprintf(cmd, sizeof(cmd), "%s --print-dir", script);
		fprintf(stderr, "test_linux: %s\n", cmd);
		f = popen(cmd, "r");
		if (!f || !fgets(kdir, sizeof(kdir), f)) {
			status = f ? pclose(f) : -1;
			printf("SKIP: the Linux test kernel cannot be built here (%s exited "
			       "%d; see its messages above)\n", script,
			       WIFEXITED(status) ? WEXITSTATUS(status) : -1);
			exit(SKIP_EXIT);
		}
		status = pclose(f);
		if (status != 0) {
			printf("SKIP: the Linux test kernel build failed (exit %d)\n",
			       WIFEXITED(status) ? WEXITSTATUS(status) : -1);
			exit(SKIP_EXIT);
		}
		kdir[strcspn(kdir, "\n")] = 0;
	} else {
		snprintf(kdir, sizeof(kdir), "%s", dir);
	}
	snprintf(path, sizeof(path), "%s/cmdline", kdir);
	f = fopen(path, "r");
	if (!f || !fgets(kcmdline, sizeof(kcmdline), f)) {
		printf("SKIP: no test kernel in %s (no cmdline file)\n", kdir);
		exit(SKIP_EXIT);
	}
	fclose(f);
	n = strcspn(kcmdline, "\n");
	kcmdline[n] = 0;
}

int main(void)
{
	Suite *s = suite_create("linux");
	TCase *tc = tcase_create("linux");

	kvm_test_require_kvm();
	find_kernel();
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, BOOT_TIMEOUT_S + 200);
	tcase_add_test(tc, refuses_what_is_not_a_kernel);
	tcase_add_test(tc, boots_to_user_space_and_console_works);
	tcase_add_test(tc, boots_elf_vmlinux);
	tcase_add_test(tc, migrates_while_the_workload_runs);
	suite_add_tcase(s, tc);
	return kvm_test_run(s);
}
