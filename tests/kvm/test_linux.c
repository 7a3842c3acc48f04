/*
 * A real Linux guest in vmig: boot to user space, the serial console both
 * ways, a live migration while the guest's workload runs, then a reboot on
 * the destination (from the images that came with the state) and an ACPI
 * power-off; the firmware tables; a rejected instruction reported; vmig
 * shutdown through the ACPI power button.  Each boot takes 30 s to minutes
 * on an emulating KVM, so the cases share boots: three in all (vmlinux
 * under vmig run, shut down; bzImage, and its reboot after migrating).
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

#include <elf.h>
#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <linux/kvm.h>

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

/* Type @cmd into the guest's UART. */
static void type_text(struct vmig_vm *vm, const char *cmd)
{
	size_t sent = 0, len = strlen(cmd);
	uint64_t end = kvm_test_now_ms() + 5000;

	while (sent < len && kvm_test_now_ms() < end) {
		sent += vmig_vm_console_input(vm, cmd + sent, len - sent);
		if (sent < len)
			kvm_test_sleep_ms(10);
	}
	ck_assert_msg(sent == len, "the UART took %zu of %zu bytes", sent, len);
}

/* Type @cmd at the guest's shell and wait for @expect. */
static void shell_roundtrip(struct vmig_vm *vm, struct console *con, const char *cmd,
			    const char *expect)
{
	size_t from = console_len(con);

	type_text(vm, cmd);
	ck_assert_msg(console_wait(con, from, expect, 60000) != (size_t)-1,
		      "typed '%s' and no '%s' came back; console ends:\n%s", cmd, expect,
		      console_tail(con));
}

/* Wait until the VM stopped on its own (power-off, reset). */
static void wait_stopped(struct vmig_vm *vm, struct console *con, const char *why)
{
	uint64_t end = kvm_test_now_ms() + 120000;

	while (vmig_vm_state(vm) != VMIG_VM_STOPPED && kvm_test_now_ms() < end)
		kvm_test_sleep_ms(50);
	ck_assert_msg(vmig_vm_state(vm) == VMIG_VM_STOPPED, "the VM still runs 120 s after "
		      "%s; console ends:\n%s", why, console_tail(con));
}

/* ---- cases ---- */

/* ---- vmig run and vmig shutdown: the ACPI power button ---- */

/* The vmig binary: $VMIG (make check-linux sets it), else the build's. */
static const char *vmig_bin(void)
{
	static char path[4200];
	const char *env = getenv("VMIG");
	char self[4096];
	ssize_t n;

	if (env && *env)
		return env;
	n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	ck_assert_int_gt(n, 0);
	self[n] = 0;
	*strrchr(self, '/') = 0;                    /* .../tests/kvm */
	snprintf(path, sizeof(path), "%s/../../vmig", self);
	ck_assert_msg(access(path, X_OK) == 0, "no vmig binary at %s: set VMIG", path);
	return path;
}

/*
 * vmig with @args, stdout and stderr into @out_fd, stdin /dev/null; killed
 * if this test process dies first (a failed case leaves no VMM behind).
 */
static pid_t spawn_vmig(const char *const *args, int out_fd)
{
	const char *argv[32];
	unsigned int i = 0;
	pid_t pid;

	argv[i++] = vmig_bin();
	while (*args && i < 31)
		argv[i++] = *args++;
	argv[i] = NULL;
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		int null_fd = open("/dev/null", O_RDONLY);

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		dup2(null_fd, 0);
		dup2(out_fd, 1);
		dup2(out_fd, 2);
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	return pid;
}

/* vmig with @args to its end: its exit status, and its output in @out. */
static int run_vmig(const char *const *args, char *out, size_t cap)
{
	int p[2], st;
	size_t len = 0;
	ssize_t n;
	pid_t pid;

	ck_assert_int_eq(pipe2(p, O_CLOEXEC), 0);
	pid = spawn_vmig(args, p[1]);
	close(p[1]);
	while (len < cap - 1 && (n = read(p[0], out + len, cap - 1 - len)) != 0)
		if (n > 0)
			len += (size_t)n;
		else if (errno != EINTR)
			break;
	out[len] = 0;
	close(p[0]);
	ck_assert_int_eq(waitpid(pid, &st, 0), pid);
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/*
 * The ELF vmlinux boots under vmig run (1 vCPU), and vmig shutdown ends
 * it the way virsh shutdown would: the ACPI power button, which the
 * kernel's button driver turns into KEY_POWER, which the test init answers
 * by powering off (ACPI S5); the VMM exits 0 saying so.
 */
START_TEST(vmlinux_runs_and_shuts_down_on_request)
{
	char kernel[4200], initrd[4200], cmdline[2600], out[4096];
	const char *name = "pbsd";
	struct console con;
	uint64_t t0 = kvm_test_now_ms();
	int st, ret;
	pid_t vmm;

	snprintf(kernel, sizeof(kernel), "%s/vmlinux", kdir);
	snprintf(initrd, sizeof(initrd), "%s/initramfs.cpio", kdir);
	snprintf(cmdline, sizeof(cmdline), "%s vmig.wss=1", kcmdline);
	setenv("VMIG_RUN_DIR", tmpdir, 1);
	console_open(&con);
	vmm = spawn_vmig((const char *const[]){ "run", name, "--memory", "256M",
						"--kernel", kernel, "--initrd", initrd,
						"--cmdline", cmdline, NULL }, con.wfd);
	ck_assert_msg(console_wait(&con, 0, "vmig-init: user space up",
				   BOOT_TIMEOUT_S * 1000) != (size_t)-1,
		      "no user space after %d s; console ends:\n%s", BOOT_TIMEOUT_S,
		      console_tail(&con));
	printf("linux: ELF vmlinux, 1 vCPU, under vmig run: first user-space line after "
	       "%.1f s\n", (kvm_test_now_ms() - t0) / 1000.0);
	fflush(stdout);
	/* The kernel took the fixed-feature button and init watches it. */
	ck_assert_msg(console_wait(&con, 0, "vmig-init: input device /dev/input/event0: "
				   "Power Button", 30000) != (size_t)-1,
		      "no power button input device; console ends:\n%s", console_tail(&con));

	t0 = kvm_test_now_ms();
	ret = run_vmig((const char *const[]){ "shutdown", name, NULL }, out, sizeof(out));
	ck_assert_msg(ret == 0, "vmig shutdown: exit %d: %s; console ends:\n%s", ret, out,
		      console_tail(&con));
	ck_assert_msg(strstr(out, "shut down"), "vmig shutdown said: %s", out);
	ck_assert_int_eq(waitpid(vmm, &st, 0), vmm);
	printf("linux: vmig shutdown returned after %.1f s\n", (kvm_test_now_ms() - t0) / 1000.0);
	fflush(stdout);
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the VMM ended with status 0x%x; "
		      "console ends:\n%s", st, console_tail(&con));
	ck_assert_msg(console_wait(&con, 0, "vmig-init: power button, powering off", 0) !=
		      (size_t)-1, "the guest's init saw no power button; console ends:\n%s",
		      console_tail(&con));
	ck_assert_msg(console_wait(&con, 0, "the guest powered off (ACPI S5)", 0) != (size_t)-1,
		      "the VMM did not report an ACPI power-off; console ends:\n%s",
		      console_tail(&con));
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

/* ---- ACPI tables, read back from guest memory ---- */

static uint8_t sum8(const uint8_t *p, size_t len)
{
	uint8_t s = 0;

	while (len--)
		s += *p++;
	return s;
}

static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* The table at @gpa, with its signature and checksum checked. */
static const uint8_t *acpi_table(struct vmig_vm *vm, uint64_t gpa, const char *sig)
{
	const uint8_t *t = vmig_vm_gpa_to_hva(vm, gpa, 36);
	uint32_t len;

	ck_assert_msg(t, "table %s at 0x%" PRIx64 " is outside RAM", sig, gpa);
	ck_assert_msg(!memcmp(t, sig, 4), "table at 0x%" PRIx64 " is '%.4s', expected %s",
		      gpa, (const char *)t, sig);
	len = rd32(t + 4);
	ck_assert_msg(len >= 36 && len < 4096, "%s length %u", sig, len);
	ck_assert_msg(sum8(t, len) == 0, "%s checksum is off by %u", sig, sum8(t, len));
	return t;
}

/*
 * The tables a Linux guest is given, without booting it: RSDP (where the
 * zero page says and where the kernel's scan looks), XSDT, FADT with the
 * PM1 ports and reset register vmig emulates, a DSDT with \_S5, a MADT
 * with one LAPIC per vCPU and the IOAPIC.
 */
START_TEST(acpi_tables_are_well_formed)
{
	char kernel[4200];
	struct vmig_vm_config cfg = {
		.name = "lxacpi", .mem_size = 64ull << 20, .nr_vcpus = 3, .console_fd = -1,
		.kernel = kernel, .cmdline = "console=ttyS0",
	};
	struct vmig_err err = { 0 };
	struct vmig_vm *vm = NULL;
	const uint8_t *rsdp, *xsdt, *fadt = NULL, *madt = NULL, *dsdt, *zp, *p;
	unsigned int i, n, lapics = 0, ioapics = 0;
	uint64_t rsdp_gpa;

	snprintf(kernel, sizeof(kernel), "%s/bzImage", kdir);
	ck_assert_msg(vmig_vm_create(&cfg, &vm, &err) == 0, "create: %s", err.msg);
	zp = vmig_vm_gpa_to_hva(vm, 0x7000, 4096);
	rsdp_gpa = rd64(zp + 0x70);                 /* boot_params.acpi_rsdp_addr */
	ck_assert_msg(rsdp_gpa >= 0xe0000 && rsdp_gpa < 0x100000 && !(rsdp_gpa & 15),
		      "acpi_rsdp_addr 0x%" PRIx64 " is not where the kernel scans", rsdp_gpa);
	rsdp = vmig_vm_gpa_to_hva(vm, rsdp_gpa, 36);
	ck_assert(!memcmp(rsdp, "RSD PTR ", 8));
	ck_assert_msg(sum8(rsdp, 20) == 0 && sum8(rsdp, 36) == 0, "RSDP checksums");
	ck_assert_uint_eq(rsdp[15], 2);
	acpi_table(vm, rd32(rsdp + 16), "RSDT");
	xsdt = acpi_table(vm, rd64(rsdp + 24), "XSDT");
	n = (rd32(xsdt + 4) - 36) / 8;
	for (i = 0; i < n; i++) {
		const uint8_t *t = vmig_vm_gpa_to_hva(vm, rd64(xsdt + 36 + 8 * i), 4);

		ck_assert_ptr_nonnull(t);
		if (!memcmp(t, "FACP", 4))
			fadt = acpi_table(vm, rd64(xsdt + 36 + 8 * i), "FACP");
		else if (!memcmp(t, "APIC", 4))
			madt = acpi_table(vm, rd64(xsdt + 36 + 8 * i), "APIC");
	}
	ck_assert_msg(fadt && madt, "XSDT lists %u tables, no FADT or MADT", n);
	/* FADT: PM1a event block 0x600/4, control block 0x604/2, reset 0xcf9 = 6. */
	ck_assert_uint_eq(rd32(fadt + 56), 0x600);
	ck_assert_uint_eq(rd32(fadt + 64), 0x604);
	ck_assert_uint_eq(fadt[88], 4);
	ck_assert_uint_eq(fadt[89], 2);
	ck_assert_msg(rd32(fadt + 112) & (1u << 10), "FADT flags 0x%x: no reset register",
		      rd32(fadt + 112));
	/* The power button is a fixed feature (PWR_BUTTON clear); SCI on IRQ 9. */
	ck_assert_msg(!(rd32(fadt + 112) & (1u << 4)), "FADT flags 0x%x: no fixed power "
		      "button", rd32(fadt + 112));
	ck_assert_uint_eq(fadt[46] | fadt[47] << 8, 9);
	ck_assert_uint_eq(fadt[116], 1);
	ck_assert_uint_eq(rd64(fadt + 120), 0xcf9);
	ck_assert_uint_eq(fadt[128], 6);
	ck_assert_msg(!memcmp(vmig_vm_gpa_to_hva(vm, rd32(fadt + 36), 4), "FACS", 4), "no FACS");
	dsdt = acpi_table(vm, rd64(fadt + 140), "DSDT");
	ck_assert_msg(memmem(dsdt + 36, rd32(dsdt + 4) - 36, "_S5_", 4), "the DSDT has no \\_S5");
	/* MADT: a LAPIC per vCPU, IDs 0..2, and the IOAPIC at 0xfec00000. */
	for (p = madt + 44; p < madt + rd32(madt + 4); p += p[1]) {
		ck_assert_uint_ge(p[1], 2);
		if (p[0] == 0) {
			ck_assert_uint_eq(p[3], lapics);
			ck_assert_uint_eq(rd32(p + 4) & 1, 1);
			lapics++;
		} else if (p[0] == 1) {
			ck_assert_uint_eq(rd32(p + 4), 0xfec00000u);
			ioapics++;
		}
	}
	ck_assert_msg(lapics == 3 && ioapics == 1, "MADT: %u LAPICs, %u IOAPICs", lapics,
		      ioapics);
	/* The MP table is still there, for kernels without ACPI. */
	ck_assert(!memcmp(vmig_vm_gpa_to_hva(vm, 0x9fc00, 4), "_MP_", 4));
	ck_assert(vmig_vm_can_reboot(vm));
	vmig_vm_destroy(vm);
}
END_TEST

/*
 * A "kernel" whose first instruction is CMPXCHG16B in ring 0, which an
 * emulating KVM (kvm_pvm) cannot run: vmig must stop the VM and say where
 * and what, not hang.  On a KVM that runs it, the code goes on and powers
 * off with status 7 through the built-in guest's exit port.
 */
START_TEST(rejected_instruction_is_reported)
{
	static const uint8_t code[] = {
		0x48, 0x0f, 0xc7, 0x0e,        /* cmpxchg16b (%rsi)  (RSI = zero page) */
		0x66, 0xba, 0x01, 0x05,        /* mov $0x501, %dx */
		0xb0, 0x07,                    /* mov $7, %al */
		0xee,                          /* out %al, (%dx) */
		0xf4, 0xeb, 0xfd,              /* hlt; jmp hlt */
	};
	char path[4200];
	struct vmig_vm_config cfg = {
		.name = "lxinsn", .mem_size = 64ull << 20, .nr_vcpus = 1, .console_fd = -1,
		.kernel = path, .cmdline = "",
	};
	struct vmig_err err = { 0 };
	struct vmig_vm *vm = NULL;
	uint8_t file[0x1000 + sizeof(code)] = { 0 };
	Elf64_Ehdr *eh = (Elf64_Ehdr *)file;
	Elf64_Phdr *ph = (Elf64_Phdr *)(file + sizeof(*eh));
	uint64_t end;
	FILE *f;

	memcpy(eh->e_ident, ELFMAG, SELFMAG);
	eh->e_ident[EI_CLASS] = ELFCLASS64;
	eh->e_ident[EI_DATA] = ELFDATA2LSB;
	eh->e_ident[EI_VERSION] = EV_CURRENT;
	eh->e_type = ET_EXEC;
	eh->e_machine = EM_X86_64;
	eh->e_version = EV_CURRENT;
	eh->e_entry = 0x1000000;
	eh->e_phoff = sizeof(*eh);
	eh->e_ehsize = sizeof(*eh);
	eh->e_phentsize = sizeof(*ph);
	eh->e_phnum = 1;
	ph->p_type = PT_LOAD;
	ph->p_flags = PF_R | PF_X;
	ph->p_offset = 0x1000;
	ph->p_vaddr = ph->p_paddr = 0x1000000;
	ph->p_filesz = sizeof(code);
	ph->p_memsz = 0x1000;
	memcpy(file + 0x1000, code, sizeof(code));
	snprintf(path, sizeof(path), "%s/cmpxchg16b.elf", tmpdir);
	f = fopen(path, "w");
	ck_assert_ptr_nonnull(f);
	ck_assert_int_eq(fwrite(file, 1, sizeof(file), f), sizeof(file));
	fclose(f);

	ck_assert_msg(vmig_vm_create(&cfg, &vm, &err) == 0, "create: %s", err.msg);
	ck_assert_msg(vmig_vm_start(vm, &err) == 0, "start: %s", err.msg);
	for (end = kvm_test_now_ms() + 30000; vmig_vm_state(vm) != VMIG_VM_STOPPED &&
	     kvm_test_now_ms() < end; )
		kvm_test_sleep_ms(20);
	ck_assert_msg(vmig_vm_state(vm) == VMIG_VM_STOPPED, "the VM neither stopped nor "
		      "powered off in 30 s");
	if (vmig_vm_exit_code(vm) == 7) {
		printf("linux: this KVM runs CMPXCHG16B in ring 0; nothing to report\n");
	} else {
		const char *why = vmig_vm_stop_reason(vm);

		printf("linux: %s\n", why);
		ck_assert_int_eq(vmig_vm_exit_code(vm), -1);
		ck_assert_msg(strstr(why, "cannot emulate") && strstr(why, "rip 0x1000000,") &&
			      strstr(why, "instruction bytes 48 0f c7 0e"),
			      "the stop reason lacks the instruction: %s", why);
	}
	fflush(stdout);
	vmig_vm_destroy(vm);
}
END_TEST

/* ---- the boot images in the state, without booting ---- */

struct saved {
	struct vmig_state_section sec[512];
	size_t n;
};

static int save_section(void *arg, const char *name, uint16_t version, uint32_t instance,
			const void *data, size_t len)
{
	struct saved *sv = arg;
	void *copy = malloc(len ? len : 1);

	ck_assert_uint_lt(sv->n, 512);
	ck_assert_ptr_nonnull(copy);
	memcpy(copy, data, len);
	sv->sec[sv->n++] = (struct vmig_state_section){ strdup(name), version, instance,
							copy, len };
	return 0;
}

static struct vmig_state_section *saved_find(struct saved *sv, const char *name,
					     uint32_t instance)
{
	size_t i;

	for (i = 0; i < sv->n; i++)
		if (sv->sec[i].instance == instance && !strcmp(sv->sec[i].name, name))
			return &sv->sec[i];
	ck_abort_msg("the state has no section %s/%u", name, instance);
	return NULL;
}

/* Load @sv into a fresh incoming VM; the VM, or NULL with the error in @err. */
static struct vmig_vm *load_into_new(struct saved *sv, struct vmig_err *err)
{
	struct vmig_vm_config cfg = {
		.name = "lxin", .mem_size = 64ull << 20, .nr_vcpus = 1, .console_fd = -1,
		.incoming = true,
	};
	struct vmig_vm *vm = NULL;

	ck_assert_msg(vmig_vm_create(&cfg, &vm, err) == 0, "create: %s", err->msg);
	if (vmig_vm_state_load(vm, sv->sec, sv->n, err) == 0)
		return vm;
	vmig_vm_destroy(vm);
	return NULL;
}

static uint8_t *file_bytes(const char *path, size_t *len)
{
	FILE *f = fopen(path, "r");
	uint8_t *buf;
	long n;

	ck_assert_ptr_nonnull(f);
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	rewind(f);
	buf = malloc((size_t)n);
	ck_assert_ptr_nonnull(buf);
	ck_assert_int_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
	fclose(f);
	*len = (size_t)n;
	return buf;
}

/*
 * A Linux VM's state carries its kernel, initrd and command line
 * (linux.boot, linux.kernel/N, linux.initrd/N); a VM loaded from it can
 * reboot into them, and damaged ones are refused by name.
 */
START_TEST(boot_images_travel_with_the_state)
{
	char kernel[4200], initrd[4200];
	struct vmig_vm_config cfg = {
		.name = "lxsrc", .mem_size = 64ull << 20, .nr_vcpus = 1, .console_fd = -1,
		.kernel = kernel, .initrd = initrd, .cmdline = "console=ttyS0 lx-boot-test",
	};
	struct vmig_err err = { 0 };
	struct vmig_vm *src = NULL, *dst;
	struct saved *sv = calloc(1, sizeof(*sv));
	struct vmig_state_section *k0, *hdr;
	const uint8_t *zp, *in_guest;
	uint8_t *rd;
	uint32_t rd_gpa, rd_len;
	size_t rd_file_len, i, saved_len;
	uint64_t zero = 0, saved_k;

	ck_assert_ptr_nonnull(sv);
	snprintf(kernel, sizeof(kernel), "%s/bzImage", kdir);
	snprintf(initrd, sizeof(initrd), "%s/initramfs.cpio", kdir);
	ck_assert_msg(vmig_vm_create(&cfg, &src, &err) == 0, "create: %s", err.msg);
	ck_assert_msg(vmig_vm_state_save(src, save_section, sv, &err) == 0, "save: %s", err.msg);
	vmig_vm_destroy(src);
	hdr = saved_find(sv, "linux.boot", 0);
	ck_assert_uint_eq(hdr->len, 24 + strlen(cfg.cmdline));

	/* Loaded, the VM can reboot: into the same initrd and command line. */
	dst = load_into_new(sv, &err);
	ck_assert_msg(dst, "load: %s", err.msg);
	ck_assert(vmig_vm_can_reboot(dst));
	ck_assert_msg(vmig_vm_recreate(&dst, &err) == 0, "recreate: %s", err.msg);
	ck_assert_str_eq(vmig_vm_gpa_to_hva(dst, 0x20000, strlen(cfg.cmdline) + 1),
			 cfg.cmdline);
	zp = vmig_vm_gpa_to_hva(dst, 0x7000, 4096);
	memcpy(&rd_gpa, zp + 0x218, 4);
	memcpy(&rd_len, zp + 0x21c, 4);
	rd = file_bytes(initrd, &rd_file_len);
	ck_assert_uint_eq(rd_len, rd_file_len);
	in_guest = vmig_vm_gpa_to_hva(dst, rd_gpa, rd_len);
	ck_assert_ptr_nonnull(in_guest);
	ck_assert_msg(!memcmp(in_guest, rd, rd_len), "the rebooted VM's initrd differs");
	free(rd);
	vmig_vm_destroy(dst);

	/* A truncated chunk, an extra chunk, a bad header: refused, by name. */
	k0 = saved_find(sv, "linux.kernel", 0);
	saved_len = k0->len;
	k0->len--;
	ck_assert_ptr_null(load_into_new(sv, &err));
	ck_assert_msg(strstr(err.msg, "linux.kernel"), "message: %s", err.msg);
	k0->len = saved_len;
	err = (struct vmig_err){ 0 };
	save_section(sv, "linux.kernel", 1, 99, "x", 1);
	ck_assert_ptr_null(load_into_new(sv, &err));
	ck_assert_msg(strstr(err.msg, "linux.kernel"), "message: %s", err.msg);
	sv->n--;
	err = (struct vmig_err){ 0 };
	memcpy(&saved_k, hdr->data, 8);
	memcpy((void *)hdr->data, &zero, 8);
	ck_assert_ptr_null(load_into_new(sv, &err));
	ck_assert_msg(strstr(err.msg, "linux.boot") && strstr(err.msg, "damaged"),
		      "message: %s", err.msg);
	memcpy((void *)hdr->data, &saved_k, 8);

	for (i = 0; i < sv->n; i++) {
		free((void *)sv->sec[i].name);
		free((void *)sv->sec[i].data);
	}
	free(sv);
}
END_TEST

/*
 * The power button without booting: refused until the guest enables it
 * (PWRBTN_EN, which the state carries; here set in the state as a guest
 * would), then pressed: PWRBTN_STS set and the SCI raised (IOAPIC pin 9,
 * still masked, holds it), and both go with the state to the next VM.
 * The built-in guest, still booting, is refused too.
 */
START_TEST(power_button_state_travels)
{
	char kernel[4200];
	struct vmig_vm_config cfg = {
		.name = "lxpb", .mem_size = 64ull << 20, .nr_vcpus = 1, .console_fd = -1,
		.kernel = kernel, .cmdline = "console=ttyS0",
	};
	struct vmig_err err = { 0 };
	struct vmig_vm *vm = NULL, *dst, *dst2;
	struct saved *sv = calloc(3, sizeof(*sv));
	struct vmig_state_section *pm;
	const struct kvm_ioapic_state *io;
	uint16_t regs[4];
	size_t i, k;

	ck_assert_ptr_nonnull(sv);
	snprintf(kernel, sizeof(kernel), "%s/bzImage", kdir);
	ck_assert_msg(vmig_vm_create(&cfg, &vm, &err) == 0, "create: %s", err.msg);
	ck_assert_int_eq(vmig_vm_request_poweroff(vm, &err), -EAGAIN);
	ck_assert_msg(strstr(err.msg, "not enabled its ACPI power button"), "message: %s",
		      err.msg);
	ck_assert_msg(vmig_vm_state_save(vm, save_section, &sv[0], &err) == 0, "save: %s",
		      err.msg);
	vmig_vm_destroy(vm);

	/* As if the guest's button driver had set PWRBTN_EN. */
	pm = saved_find(&sv[0], "acpi.pm", 0);
	ck_assert_uint_eq(pm->len, sizeof(regs));
	memcpy(regs, pm->data, sizeof(regs));
	ck_assert_uint_eq(regs[0] & 0x100, 0);
	io = saved_find(&sv[0], "irqchip.ioapic", 0)->data;
	ck_assert_msg(!(io->irr & (1u << 9)), "IOAPIC IRR 0x%x before any press", io->irr);
	regs[1] |= 0x100;
	memcpy((void *)pm->data, regs, sizeof(regs));
	dst = load_into_new(&sv[0], &err);
	ck_assert_msg(dst, "load: %s", err.msg);
	err = (struct vmig_err){ 0 };
	ck_assert_msg(vmig_vm_request_poweroff(dst, &err) == 0, "press: %s", err.msg);
	ck_assert_msg(vmig_vm_state_save(dst, save_section, &sv[1], &err) == 0, "save: %s",
		      err.msg);
	vmig_vm_destroy(dst);
	memcpy(regs, saved_find(&sv[1], "acpi.pm", 0)->data, sizeof(regs));
	ck_assert_msg((regs[0] & 0x100) && (regs[1] & 0x100), "after the press PM1_STS is "
		      "0x%04x, PM1_EN 0x%04x", regs[0], regs[1]);
	io = saved_find(&sv[1], "irqchip.ioapic", 0)->data;
	ck_assert_msg(io->irr & (1u << 9), "the SCI is not raised: IOAPIC IRR 0x%x", io->irr);

	/* The next VM has the press pending too. */
	dst2 = load_into_new(&sv[1], &err);
	ck_assert_msg(dst2, "load: %s", err.msg);
	ck_assert_msg(vmig_vm_state_save(dst2, save_section, &sv[2], &err) == 0, "save: %s",
		      err.msg);
	vmig_vm_destroy(dst2);
	memcpy(regs, saved_find(&sv[2], "acpi.pm", 0)->data, sizeof(regs));
	ck_assert_msg(regs[0] & 0x100, "the press was lost on the way: PM1_STS 0x%04x",
		      regs[0]);
	io = saved_find(&sv[2], "irqchip.ioapic", 0)->data;
	ck_assert_msg(io->irr & (1u << 9), "the SCI was lost on the way: IOAPIC IRR 0x%x",
		      io->irr);

	/* The built-in guest, not started: it cannot be asked yet. */
	cfg.kernel = NULL;
	cfg.cmdline = NULL;
	ck_assert_msg(vmig_vm_create(&cfg, &vm, &err) == 0, "create: %s", err.msg);
	ck_assert_int_eq(vmig_vm_request_poweroff(vm, &err), -EAGAIN);
	ck_assert_msg(strstr(err.msg, "built-in guest"), "message: %s", err.msg);
	vmig_vm_destroy(vm);

	for (k = 0; k < 3; k++)
		for (i = 0; i < sv[k].n; i++) {
			free((void *)sv[k].sec[i].name);
			free((void *)sv[k].sec[i].data);
		}
	free(sv);
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
	printf("linux: bzImage, 2 vCPUs: first user-space line after %.1f s\n",
	       wait_user_space(vm, &src_con, t0));
	fflush(stdout);
	/* Both vCPUs came up (ACPI MADT, INIT/SIPI through the in-kernel LAPIC). */
	ck_assert_msg(console_wait(&src_con, 0, "Brought up 1 node, 2 CPUs", 0) != (size_t)-1,
		      "the second vCPU did not come up; console ends:\n%s", console_tail(&src_con));
	/* Input: the UART's receive side and IRQ 4, through the shell. */
	shell_roundtrip(vm, &src_con, "echo vmig-$((6*7))-ok\n", "vmig-42-ok");
	shell_roundtrip(vm, &src_con, "cat /proc/interrupts | grep -c ttyS\n", "1\r\n");
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

	/*
	 * The guest reboots on the destination, which never had its kernel
	 * file: the images came with its state (linux.boot), as a reboot
	 * through the CLI uses them (vmig_vm_recreate).
	 */
	ck_assert(vmig_vm_can_reboot(d.vm));
	from = console_len(&dst_con);
	t0 = kvm_test_now_ms();
	type_text(d.vm, "reboot -f\n");
	wait_stopped(d.vm, &dst_con, "reboot -f");
	ck_assert_msg(vmig_vm_reboot_requested(d.vm), "the VM stopped without a reset: %s",
		      vmig_vm_stop_reason(d.vm));
	ret = vmig_vm_recreate(&d.vm, &err);
	ck_assert_msg(ret == 0, "recreate: %s", err.msg);
	ret = vmig_vm_start(d.vm, &err);
	ck_assert_msg(ret == 0, "start: %s", err.msg);
	ck_assert_msg(console_wait(&dst_con, from, "vmig-init: user space up",
				   BOOT_TIMEOUT_S * 1000) != (size_t)-1,
		      "the migrated guest did not come back after its reboot (VM %s: %s); "
		      "console ends:\n%s", vmig_vm_state_name(vmig_vm_state(d.vm)),
		      vmig_vm_stop_reason(d.vm), console_tail(&dst_con));
	printf("linux: rebooted on the destination, user space again after %.1f s\n",
	       (kvm_test_now_ms() - t0) / 1000.0);
	fflush(stdout);
	ck_assert_msg(console_wait(&dst_con, from, "ACPI: Interpreter enabled", 0) != (size_t)-1,
		      "the kernel did not take the ACPI tables; console ends:\n%s",
		      console_tail(&dst_con));

	/* The console works after the reboot; a power-off (ACPI S5) ends the VM. */
	shell_roundtrip(d.vm, &dst_con, "echo rebooted-$((40+2))\n", "rebooted-42");
	type_text(d.vm, "poweroff -f\n");
	wait_stopped(d.vm, &dst_con, "poweroff -f");
	ck_assert_msg(strstr(vmig_vm_stop_reason(d.vm), "powered off") &&
		      vmig_vm_exit_code(d.vm) == 0 && !vmig_vm_reboot_requested(d.vm),
		      "after poweroff: '%s', exit code %d", vmig_vm_stop_reason(d.vm),
		      vmig_vm_exit_code(d.vm));

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

/* VMIG_LINUX_ONLY=NAME[,NAME...] runs only those cases (each boot is long). */
static bool wanted(const char *name)
{
	const char *only = getenv("VMIG_LINUX_ONLY"), *p;
	size_t len = strlen(name);

	if (!only || !*only)
		return true;
	for (p = only; (p = strstr(p, name)); p += len)
		if ((p == only || p[-1] == ',') && (p[len] == 0 || p[len] == ','))
			return true;
	return false;
}

#define ADD_TEST(tc, t) do { if (wanted(#t)) tcase_add_test(tc, t); } while (0)

int main(void)
{
	Suite *s = suite_create("linux");
	TCase *tc = tcase_create("linux");
	TCase *pb = tcase_create("power-button");

	kvm_test_require_kvm();
	find_kernel();
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 2 * BOOT_TIMEOUT_S + 200);   /* migration: two boots */
	ADD_TEST(tc, refuses_what_is_not_a_kernel);
	ADD_TEST(tc, acpi_tables_are_well_formed);
	ADD_TEST(tc, rejected_instruction_is_reported);
	ADD_TEST(tc, boot_images_travel_with_the_state);
	ADD_TEST(tc, power_button_state_travels);
	ADD_TEST(tc, migrates_while_the_workload_runs);
	suite_add_tcase(s, tc);
	/* One boot, under vmig run, ended by vmig shutdown. */
	tcase_add_checked_fixture(pb, setup, teardown);
	tcase_set_timeout(pb, BOOT_TIMEOUT_S + 120);
	ADD_TEST(pb, vmlinux_runs_and_shuts_down_on_request);
	suite_add_tcase(s, pb);
	return kvm_test_run(s);
}
