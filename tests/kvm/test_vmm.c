/*
 * vmm/ against real KVM: the built-in guest boots and makes progress on
 * one and two vCPUs, fills pages and then idles when asked, pause
 * freezes it and resume restarts it, a paused guest's memory verifies page
 * by page and a corrupted page is caught,
 * a guest with RAM above 4 GiB runs, power-off and destroy leave nothing
 * behind, and bad configurations fail with clear errors.
 */
#include "config.h"

#include <dirent.h>
#include <inttypes.h>
#include <poll.h>

#include "vmig/guest-abi.h"
#include "vmig/vm.h"
#include "kvm-test.h"

static struct vmig_vm *make_vm(uint64_t mem, unsigned int vcpus, const char *workload)
{
	struct vmig_vm_config cfg = {
		.name = "test",
		.mem_size = mem,
		.nr_vcpus = vcpus,
		.workload = workload,
		.console_fd = -1,
	};
	struct vmig_err err = { 0 };
	struct vmig_vm *vm = NULL;
	int ret;

	ret = vmig_vm_create(&cfg, &vm, &err);
	ck_assert_msg(ret == 0, "vmig_vm_create: %d: %s", ret, err.msg);
	ret = vmig_vm_start(vm, &err);
	ck_assert_msg(ret == 0, "vmig_vm_start: %d: %s", ret, err.msg);
	return vm;
}

static const volatile struct vmig_guest_status *status(struct vmig_vm *vm)
{
	return vmig_vm_gpa_to_hva(vm, VMIG_GUEST_STATUS_GPA, sizeof(struct vmig_guest_status));
}

/* Wait until every vCPU of the guest runs its ring-3 loop. */
static void wait_running(struct vmig_vm *vm, unsigned int vcpus, unsigned int timeout_ms)
{
	const volatile struct vmig_guest_status *st = status(vm);
	uint64_t end = kvm_test_now_ms() + timeout_ms;
	unsigned int i, running;

	for (;;) {
		running = 0;
		if (st->magic == VMIG_GUEST_STATUS_MAGIC)
			for (i = 0; i < st->nr_vcpus && i < VMIG_GUEST_MAX_VCPUS; i++)
				running += st->vcpu[i].pages_written > 0;
		if (running == vcpus)
			break;
		ck_assert_msg(kvm_test_now_ms() < end, "guest not running after %u ms: "
			      "magic %s, %u of %u vCPUs writing pages; stop reason '%s'",
			      timeout_ms, st->magic == VMIG_GUEST_STATUS_MAGIC ? "set" : "unset",
			      running, vcpus, vmig_vm_stop_reason(vm));
		kvm_test_sleep_ms(10);
	}
	ck_assert_uint_eq(st->nr_vcpus, vcpus);
}

static void check_progress(unsigned int vcpus)
{
	struct vmig_vm *vm = make_vm(64 << 20, vcpus, "rate=max,wss=1M,quiet");
	const volatile struct vmig_guest_status *st = status(vm);
	uint64_t before[VMIG_GUEST_MAX_VCPUS];
	struct vmig_guest_progress p1, p2;
	unsigned int i;

	wait_running(vm, vcpus, 20000);
	ck_assert_int_eq(vmig_guest_progress(vm, &p1), 0);
	for (i = 0; i < vcpus; i++)
		before[i] = st->vcpu[i].pages_written;
	kvm_test_sleep_ms(300);
	ck_assert_int_eq(vmig_guest_progress(vm, &p2), 0);
	ck_assert(p2.present);
	ck_assert_uint_eq(p2.nr_vcpus, vcpus);
	for (i = 0; i < vcpus; i++)
		ck_assert_msg(st->vcpu[i].pages_written > before[i],
			      "vCPU %u made no progress: %" PRIu64 " pages before, %" PRIu64
			      " after 300 ms", i, before[i], (uint64_t)st->vcpu[i].pages_written);
	ck_assert_msg(p2.generation > p1.generation,
		      "generation did not advance in 300 ms at rate=max over 1 MiB: %"
		      PRIu64 " -> %" PRIu64, p1.generation, p2.generation);
	ck_assert_int_eq(vmig_vm_state(vm), VMIG_VM_RUNNING);
	vmig_vm_destroy(vm);
}

START_TEST(runs_one_vcpu)
{
	check_progress(1);
}
END_TEST

START_TEST(runs_two_vcpus)
{
	check_progress(2);
}
END_TEST

/*
 * fill= writes the page body and idle_after=1 stops the writing after one
 * pass: the page count stops at the working set, the heartbeat goes on,
 * the bodies hold what the ABI says, and the stamps still verify.
 */
static void check_fill_then_idle(const char *workload, bool text)
{
	struct vmig_vm *vm = make_vm(64 << 20, 1, workload);
	const volatile struct vmig_guest_status *st = status(vm);
	const uint64_t n = (2 << 20) / VMIG_GUEST_PAGE_SIZE;
	uint64_t end = kvm_test_now_ms() + 20000, k, i, same = 0;
	struct vmig_guest_progress a, b;
	struct vmig_err err = { 0 };
	const uint64_t *p, *q;

	wait_running(vm, 1, 20000);
	while (st->vcpu[0].pages_written < n) {
		ck_assert_msg(kvm_test_now_ms() < end, "only %" PRIu64 " of %" PRIu64
			      " pages written after 20 s", (uint64_t)st->vcpu[0].pages_written, n);
		kvm_test_sleep_ms(10);
	}
	vmig_guest_progress(vm, &a);
	kvm_test_sleep_ms(200);
	vmig_guest_progress(vm, &b);
	ck_assert_msg(b.pages_written == n && b.heartbeat > a.heartbeat,
		      "%s: pages %" PRIu64 " -> %" PRIu64 " (want %" PRIu64 " both), heartbeat %"
		      PRIu64 " -> %" PRIu64, workload, a.pages_written, b.pages_written, n,
		      a.heartbeat, b.heartbeat);
	ck_assert_uint_eq(st->fill, text ? VMIG_GUEST_FILL_TEXT : VMIG_GUEST_FILL_RANDOM);
	for (k = 0; k + 1 < n; k++) {
		p = vmig_vm_gpa_to_hva(vm, vmig_guest_page_gpa(st->low_end, k), 4096);
		q = vmig_vm_gpa_to_hva(vm, vmig_guest_page_gpa(st->low_end, k + 1), 4096);
		/* words 8 and 505 are random in both modes (i % 8 < 2) */
		ck_assert_msg(p[8] && p[8] != q[8] && p[505] != q[505],
			      "work page %" PRIu64 ": body word 8 is %#" PRIx64 " (next page %#"
			      PRIx64 "): not filled", k, p[8], q[8]);
		for (i = 4; i < VMIG_GUEST_TAIL_OFFSET / 8; i++)
			same += p[i] == q[i];
	}
	/* text: 6 of each 8 words are the same text on every page */
	if (text)
		ck_assert_msg(same > (n - 1) * 370, "text pages share only %" PRIu64 " words",
			      same);
	else
		ck_assert_msg(same < n, "random pages share %" PRIu64 " words", same);
	ck_assert_int_eq(vmig_vm_pause(vm), 0);
	ck_assert_msg(vmig_guest_verify(vm, &err) == 0, "%s", err.msg);
	vmig_vm_destroy(vm);
}

START_TEST(fill_then_idle)
{
	check_fill_then_idle("rate=max,wss=2M,fill=random,idle_after=1,quiet", false);
	check_fill_then_idle("rate=max,wss=2M,fill=text,idle_after=1,quiet", true);
}
END_TEST

START_TEST(pause_freezes_resume_restarts)
{
	struct vmig_vm *vm = make_vm(64 << 20, 2, "rate=max,wss=1M,quiet");
	struct vmig_guest_progress a, b, c;

	wait_running(vm, 2, 20000);
	ck_assert_int_eq(vmig_vm_pause(vm), 0);
	ck_assert_int_eq(vmig_vm_state(vm), VMIG_VM_PAUSED);
	ck_assert_int_eq(vmig_vm_pause(vm), 0);          /* idempotent */
	vmig_guest_progress(vm, &a);
	kvm_test_sleep_ms(300);
	vmig_guest_progress(vm, &b);
	ck_assert_msg(a.pages_written == b.pages_written && a.heartbeat == b.heartbeat,
		      "paused guest moved: pages %" PRIu64 " -> %" PRIu64 ", heartbeat %"
		      PRIu64 " -> %" PRIu64, a.pages_written, b.pages_written,
		      a.heartbeat, b.heartbeat);
	ck_assert_int_eq(vmig_vm_resume(vm), 0);
	ck_assert_int_eq(vmig_vm_state(vm), VMIG_VM_RUNNING);
	kvm_test_sleep_ms(300);
	vmig_guest_progress(vm, &c);
	ck_assert_msg(c.pages_written > b.pages_written,
		      "resumed guest made no progress: %" PRIu64 " -> %" PRIu64,
		      b.pages_written, c.pages_written);
	vmig_vm_destroy(vm);
}
END_TEST

START_TEST(paused_memory_verifies)
{
	struct vmig_vm *vm = make_vm(64 << 20, 2, "rate=max,wss=2M,quiet");
	struct vmig_err err = { 0 };
	unsigned int round;

	wait_running(vm, 2, 20000);
	/* Several pause points, so the cursor lands mid-pass. */
	for (round = 0; round < 5; round++) {
		kvm_test_sleep_ms(37 * (round + 1));
		ck_assert_int_eq(vmig_vm_pause(vm), 0);
		vmig_err_clear(&err);
		ck_assert_msg(vmig_guest_verify(vm, &err) == 0, "round %u: %s", round, err.msg);
		ck_assert_int_eq(vmig_vm_resume(vm), 0);
	}
	vmig_vm_destroy(vm);
}
END_TEST

START_TEST(corrupt_page_is_detected)
{
	struct vmig_vm *vm = make_vm(64 << 20, 1, "rate=max,wss=1M,quiet");
	const volatile struct vmig_guest_status *st = status(vm);
	struct vmig_err err = { 0 };
	uint64_t gpa, orig;
	uint8_t *page;
	int ret;

	wait_running(vm, 1, 20000);
	while (st->vcpu[0].generation < 3)
		kvm_test_sleep_ms(5);
	ck_assert_int_eq(vmig_vm_pause(vm), 0);
	ck_assert_msg(vmig_guest_verify(vm, &err) == 0, "%s", err.msg);

	/* A page in the middle of the working set, away from the cursor. */
	gpa = vmig_guest_page_gpa(st->low_end, st->vcpu[0].first_page +
				  (st->vcpu[0].cursor + st->vcpu[0].nr_pages / 2) %
				  st->vcpu[0].nr_pages);
	page = vmig_vm_gpa_to_hva(vm, gpa, VMIG_GUEST_PAGE_SIZE);
	ck_assert_ptr_nonnull(page);

	/* Its tail word: the stamp at offset 0 stays intact. */
	memcpy(&orig, page + VMIG_GUEST_TAIL_OFFSET, 8);
	page[VMIG_GUEST_TAIL_OFFSET] ^= 0x40;
	vmig_err_clear(&err);
	ret = vmig_guest_verify(vm, &err);
	ck_assert_msg(ret == -EBADMSG, "corrupted tail at gpa 0x%" PRIx64 " not detected: %d",
		      gpa, ret);
	ck_assert_msg(strstr(err.msg, "gpa") != NULL, "message does not name the page: %s",
		      err.msg);
	memcpy(page + VMIG_GUEST_TAIL_OFFSET, &orig, 8);

	/* A stamp that is self-consistent but from the wrong generation. */
	((struct vmig_guest_stamp *)page)->generation += 1;
	page[VMIG_GUEST_TAIL_OFFSET] += 1;
	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_guest_verify(vm, &err), -EBADMSG);
	((struct vmig_guest_stamp *)page)->generation -= 1;
	page[VMIG_GUEST_TAIL_OFFSET] -= 1;

	/* Restored: it verifies again. */
	vmig_err_clear(&err);
	ck_assert_msg(vmig_guest_verify(vm, &err) == 0, "%s", err.msg);
	vmig_vm_destroy(vm);
}
END_TEST

START_TEST(big_sparse_vm_runs)
{
	const struct vmig_mem_region *r;
	struct vmig_vm *vm = make_vm(5ull << 30, 2, "rate=max,wss=4M,quiet");
	struct vmig_err err = { 0 };
	unsigned int n = vmig_vm_regions(vm, &r);

	ck_assert_uint_eq(n, 2);
	ck_assert_uint_eq(r[0].gpa, 0);
	ck_assert_uint_eq(r[0].size, VMIG_VM_LOW_RAM_END);
	ck_assert_uint_eq(r[1].gpa, VMIG_VM_HIGH_RAM_START);
	ck_assert_uint_eq(r[1].size, (5ull << 30) - VMIG_VM_LOW_RAM_END);
	wait_running(vm, 2, 30000);
	ck_assert_uint_eq(status(vm)->high_end, VMIG_VM_HIGH_RAM_START + r[1].size);
	ck_assert_int_eq(vmig_vm_pause(vm), 0);
	ck_assert_msg(vmig_guest_verify(vm, &err) == 0, "%s", err.msg);
	vmig_vm_destroy(vm);
}
END_TEST

static unsigned int count_dir(const char *path)
{
	DIR *d = opendir(path);
	unsigned int n = 0;

	ck_assert_ptr_nonnull(d);
	while (readdir(d))
		n++;
	closedir(d);
	return n;
}

/* Threads of this process named vcpuN (vmm/vcpu.c names them so). */
static unsigned int count_vcpu_threads(void)
{
	DIR *d = opendir("/proc/self/task");
	struct dirent *de;
	unsigned int n = 0;

	ck_assert_ptr_nonnull(d);
	while ((de = readdir(d))) {
		char path[300], comm[32] = "";
		FILE *f;

		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/proc/self/task/%s/comm", de->d_name);
		f = fopen(path, "r");
		if (!f)
			continue;   /* the thread just exited */
		if (fgets(comm, sizeof(comm), f) && !strncmp(comm, "vcpu", 4))
			n++;
		fclose(f);
	}
	closedir(d);
	return n;
}

START_TEST(power_off_and_destroy_leave_nothing)
{
	unsigned int fds = count_dir("/proc/self/fd");
	struct vmig_vm *vm = make_vm(64 << 20, 2, "rate=max,wss=256K,gens=20,quiet");
	struct pollfd pfd = { .fd = vmig_vm_event_fd(vm), .events = POLLIN };

	ck_assert_msg(poll(&pfd, 1, 60000) == 1, "guest did not power off after gens=20");
	ck_assert_int_eq(vmig_vm_exit_code(vm), 0);
	ck_assert_msg(strstr(vmig_vm_stop_reason(vm), "powered off"), "reason: %s",
		      vmig_vm_stop_reason(vm));
	ck_assert_int_eq(vmig_vm_state(vm), VMIG_VM_STOPPED);
	ck_assert_int_eq(vmig_vm_pause(vm), -ESHUTDOWN);
	vmig_vm_destroy(vm);
	ck_assert_uint_eq(count_dir("/proc/self/fd"), fds);
	ck_assert_uint_eq(count_vcpu_threads(), 0);

	/* And a running VM destroyed mid-flight. */
	vm = make_vm(64 << 20, 2, "rate=max,wss=1M,quiet");
	wait_running(vm, 2, 20000);
	ck_assert_uint_eq(count_vcpu_threads(), 2);
	vmig_vm_destroy(vm);
	ck_assert_uint_eq(count_dir("/proc/self/fd"), fds);
	ck_assert_uint_eq(count_vcpu_threads(), 0);
}
END_TEST

static void expect_create_error(uint64_t mem, unsigned int vcpus, const char *workload,
				int want, const char *text)
{
	struct vmig_vm_config cfg = {
		.name = "bad", .mem_size = mem, .nr_vcpus = vcpus,
		.workload = workload, .console_fd = -1,
	};
	struct vmig_err err = { 0 };
	struct vmig_vm *vm = NULL;
	int ret = vmig_vm_create(&cfg, &vm, &err);

	ck_assert_msg(ret == want, "create(%" PRIu64 ", %u, %s) = %d, want %d (%s)",
		      mem, vcpus, workload ? workload : "-", ret, want, err.msg);
	ck_assert_ptr_null(vm);
	ck_assert_msg(strstr(err.msg, text), "message '%s' lacks '%s'", err.msg, text);
}

START_TEST(bad_configs_fail_clearly)
{
	expect_create_error(1ull << 40, 1, NULL, -ENOMEM, "cannot give the guest");
	expect_create_error(8 << 20, 1, NULL, -EINVAL, "at least 16 MiB");
	expect_create_error((64 << 20) + 4096, 1, NULL, -EINVAL, "multiple of 2 MiB");
	expect_create_error(64 << 20, 0, NULL, -EINVAL, "vCPU count");
	expect_create_error(64 << 20, 33, NULL, -EINVAL, "vCPU count");
	expect_create_error(64 << 20, 1, "rate=fast", -EINVAL, "rate");
	expect_create_error(64 << 20, 1, "speed=1", -EINVAL, "unknown key 'speed'");
	expect_create_error(64 << 20, 1, "fill=zero", -EINVAL, "fill");
	expect_create_error(64 << 20, 1, "idle_after=x", -EINVAL, "idle_after");
	expect_create_error(64 << 20, 2, "wss=40M", -EINVAL, "raise --memory");
}
END_TEST

int main(void)
{
	Suite *s = suite_create("vmm");
	TCase *run = tcase_create("run");
	TCase *mem = tcase_create("memory");
	TCase *life = tcase_create("lifecycle");

	kvm_test_require_kvm();
	tcase_set_timeout(run, 120);
	tcase_add_test(run, runs_one_vcpu);
	tcase_add_test(run, runs_two_vcpus);
	tcase_add_test(run, fill_then_idle);
	tcase_add_test(run, pause_freezes_resume_restarts);
	suite_add_tcase(s, run);

	tcase_set_timeout(mem, 180);
	tcase_add_test(mem, paused_memory_verifies);
	tcase_add_test(mem, corrupt_page_is_detected);
	tcase_add_test(mem, big_sparse_vm_runs);
	suite_add_tcase(s, mem);

	tcase_set_timeout(life, 120);
	tcase_add_test(life, power_off_and_destroy_leave_nothing);
	tcase_add_test(life, bad_configs_fail_clearly);
	suite_add_tcase(s, life);
	return kvm_test_run(s);
}
