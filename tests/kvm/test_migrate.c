/*
 * Live migration against real KVM, engine to engine in one process: the
 * source VM and its migration thread on one side, vmig_migrate_dst_run()
 * building the destination VM in another thread, over real unix and TCP
 * sockets on this host.  Two VMs in one process: KVM allows it, and it
 * lets the test compare every page of the paused source with the
 * destination at switchover.
 *
 * Also: a 4 GiB guest, save/restore through a file, a paused VM, cancel
 * at several points, a destination that dies or refuses at several points
 * (the source resumes; after COMMIT the handoff is uncertain and the
 * source stays paused), and truncated or bit-flipped streams (a clear
 * error, no VM left).
 */
#include "config.h"

#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "vmig/guest-abi.h"
#include "vmig/migrate.h"
#include "vmig/stream.h"
#include "vmig/transport.h"
#include "vmig/vm.h"
#include "kvm-test.h"

static char tmpdir[128];

static void setup(void)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/vmig-mig-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

static void teardown(void)
{
	char cmd[200];

	snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
	if (system(cmd) != 0)
		fprintf(stderr, "cannot remove %s\n", tmpdir);
}

struct vmig_migrate_stats;
static enum vmig_migrate_status migrate_p(struct vmig_vm *vm, struct vmig_migrate_params p,
					  int cancel_after_ms, struct vmig_migrate_stats *st);

static enum vmig_compress compress_mode = VMIG_COMPRESS_LZ4;
static unsigned int channels_mode = 1;

static enum vmig_migrate_status migrate(struct vmig_vm *vm, const char *uri,
					uint32_t downtime_ms, int cancel_after_ms,
					struct vmig_migrate_stats *st)
{
	struct vmig_migrate_params p = {
		.uri = uri, .max_downtime_ms = downtime_ms, .compress = compress_mode,
		.channels = channels_mode,
	};

	return migrate_p(vm, p, cancel_after_ms, st);
}

static struct vmig_vm *make_vm(uint64_t mem, unsigned int vcpus, const char *workload)
{
	struct vmig_vm_config cfg = {
		.name = "mig", .mem_size = mem, .nr_vcpus = vcpus,
		.workload = workload, .console_fd = -1,
	};
	struct vmig_err err = { 0 };
	struct vmig_vm *vm = NULL;
	int ret = vmig_vm_create(&cfg, &vm, &err);

	ck_assert_msg(ret == 0, "create: %s", err.msg);
	ret = vmig_vm_start(vm, &err);
	ck_assert_msg(ret == 0, "start: %s", err.msg);
	return vm;
}

static const volatile struct vmig_guest_status *gstatus(struct vmig_vm *vm)
{
	return vmig_vm_gpa_to_hva(vm, VMIG_GUEST_STATUS_GPA, sizeof(struct vmig_guest_status));
}

static void wait_guest(struct vmig_vm *vm, unsigned int vcpus)
{
	const volatile struct vmig_guest_status *st = gstatus(vm);
	uint64_t end = kvm_test_now_ms() + 30000;
	unsigned int i, ok;

	do {
		ok = 0;
		if (st->magic == VMIG_GUEST_STATUS_MAGIC)
			for (i = 0; i < vcpus; i++)
				ok += st->vcpu[i].pages_written > 0;
		if (ok == vcpus)
			return;
		kvm_test_sleep_ms(10);
	} while (kvm_test_now_ms() < end);
	ck_abort_msg("guest did not start: %s", vmig_vm_stop_reason(vm));
}

static uint64_t pages_written(struct vmig_vm *vm)
{
	struct vmig_guest_progress p;

	vmig_guest_progress(vm, &p);
	return p.pages_written;
}

/* ---- the destination, in a thread ---- */

struct dst_ctx {
	char uri[256];
	struct vmig_listener *l;
	bool paused;
	bool live;
	bool no_channels;             /* do not offer the listener for channels */
	struct vmig_prealloc *prealloc;
	struct vmig_transport *t;     /* file restore: given */
	struct vmig_vm *vm;           /* result */
	struct vmig_stream_stats rs;  /* what arrived */
	int ret;
	struct vmig_err err;
	pthread_t thread;
};

static void *dst_main(void *arg)
{
	struct dst_ctx *d = arg;
	struct vmig_dst_params p = { .console_fd = -1, .paused = d->paused, .live = d->live };
	struct vmig_transport *t = d->t;

	if (!d->no_channels)
		p.listener = d->l;
	p.prealloc = d->prealloc;
	p.stats_out = &d->rs;

	if (!t) {
		d->ret = vmig_transport_accept(d->l, 30000, &t, &d->err);
		if (d->ret)
			return NULL;
	}
	d->ret = vmig_migrate_dst_run(t, &p, &d->vm, &d->err);
	vmig_transport_close(t);
	return NULL;
}

static void dst_listen(struct dst_ctx *d, bool tcp)
{
	struct vmig_err err = { 0 };
	int ret;

	d->live = true;
	(void)ret;
	if (tcp)
		snprintf(d->uri, sizeof(d->uri), "tcp://127.0.0.1:0");
	else
		snprintf(d->uri, sizeof(d->uri), "unix:%s/mig.sock", tmpdir);
	ret = vmig_transport_listen(d->uri, &d->l, &err);
	ck_assert_msg(ret == 0, "listen %s: %s", d->uri, err.msg);
	if (tcp)
		snprintf(d->uri, sizeof(d->uri), "%s", vmig_listener_uri(d->l));
	ck_assert_int_eq(pthread_create(&d->thread, NULL, dst_main, d), 0);
}

static void dst_join(struct dst_ctx *d)
{
	pthread_join(d->thread, NULL);
	vmig_listener_close(d->l);
	d->l = NULL;
}

/* ---- the source ---- */

static enum vmig_migrate_status migrate_p(struct vmig_vm *vm, struct vmig_migrate_params p,
					  int cancel_after_ms, struct vmig_migrate_stats *st)
{
	struct vmig_err err = { 0 };
	struct vmig_migration *m = NULL;
	uint64_t start = kvm_test_now_ms();
	struct pollfd pfd;
	bool cancelled = false;
	int ret = vmig_migrate_src_start(vm, &p, &m, &err);

	ck_assert_msg(ret == 0, "migrate start: %s", err.msg);
	pfd = (struct pollfd){ .fd = vmig_migrate_src_event_fd(m), .events = POLLIN };
	for (;;) {
		uint64_t v;

		poll(&pfd, 1, 20);
		if (read(pfd.fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
			ck_abort_msg("eventfd: %s", strerror(errno));
		vmig_migrate_src_stats(m, st);
		if (vmig_migrate_status_final(st->status))
			break;
		if (cancel_after_ms >= 0 && !cancelled &&
		    kvm_test_now_ms() - start >= (uint64_t)cancel_after_ms) {
			vmig_migrate_src_cancel(m);
			cancelled = true;
		}
		ck_assert_msg(kvm_test_now_ms() - start < 120000, "migration hangs");
	}
	return vmig_migrate_src_finish(m, st);
}

/* Every page of @a equals @b's, read through the memfds (holes stay holes). */
static void compare_memory(struct vmig_vm *a, struct vmig_vm *b)
{
	const struct vmig_mem_region *ra, *rb;
	unsigned int n = vmig_vm_regions(a, &ra), i;
	static uint8_t bufa[1 << 20], bufb[1 << 20];

	ck_assert_uint_eq(vmig_vm_regions(b, &rb), n);
	for (i = 0; i < n; i++) {
		uint64_t off;

		ck_assert_uint_eq(ra[i].size, rb[i].size);
		for (off = 0; off < ra[i].size; off += sizeof(bufa)) {
			size_t len = sizeof(bufa), p;

			ck_assert_int_eq(pread(vmig_vm_mem_fd(a), bufa, len, ra[i].offset + off), len);
			ck_assert_int_eq(pread(vmig_vm_mem_fd(b), bufb, len, rb[i].offset + off), len);
			if (!memcmp(bufa, bufb, len))
				continue;
			for (p = 0; p < len; p += 4096)
				ck_assert_msg(!memcmp(bufa + p, bufb + p, 4096),
					      "page at gpa 0x%" PRIx64 " differs between source "
					      "and destination", ra[i].gpa + off + p);
		}
	}
}

/* The destination guest continues exactly where the source stopped. */
static void check_continues(struct vmig_vm *src, struct vmig_vm *dst, unsigned int vcpus)
{
	const volatile struct vmig_guest_status *s = src ? gstatus(src) : NULL, *d = gstatus(dst);
	struct vmig_err err = { 0 };
	unsigned int i;
	uint64_t before[VMIG_GUEST_MAX_VCPUS];

	ck_assert_int_eq(vmig_vm_state(dst), VMIG_VM_PAUSED);
	ck_assert_msg(vmig_guest_verify(dst, &err) == 0, "destination: %s", err.msg);
	for (i = 0; src && i < vcpus; i++) {
		ck_assert_uint_eq(d->vcpu[i].generation, s->vcpu[i].generation);
		ck_assert_uint_eq(d->vcpu[i].cursor, s->vcpu[i].cursor);
		ck_assert_uint_eq(d->vcpu[i].pages_written, s->vcpu[i].pages_written);
		ck_assert_uint_eq(d->vcpu[i].heartbeat, s->vcpu[i].heartbeat);
	}
	for (i = 0; i < vcpus; i++)
		before[i] = d->vcpu[i].heartbeat;
	ck_assert_int_eq(vmig_vm_resume(dst), 0);
	kvm_test_sleep_ms(300);
	/* The heartbeat counts every loop turn, even at rate=1. */
	for (i = 0; i < vcpus; i++)
		ck_assert_msg(d->vcpu[i].heartbeat > before[i],
			      "vCPU %u did not continue on the destination", i);
	ck_assert_int_eq(vmig_vm_pause(dst), 0);
	/* No gap, no reset: the stamps still verify after running on. */
	vmig_err_clear(&err);
	ck_assert_msg(vmig_guest_verify(dst, &err) == 0, "after running on: %s", err.msg);
}

/*
 * Migrate @src with @p (its uri set here) to a live destination in a
 * thread, paused on arrival as @d says; the destination's result in @d.
 */
static enum vmig_migrate_status migrate_live(struct vmig_vm *src, struct vmig_migrate_params p,
					     struct dst_ctx *d, struct vmig_migrate_stats *st)
{
	enum vmig_migrate_status s;

	dst_listen(d, true);
	p.uri = d->uri;
	s = migrate_p(src, p, -1, st);
	dst_join(d);
	return s;
}

/* @dst holds exactly @src's memory and its @vcpus go on from there; both go. */
static void arrived_whole(struct vmig_vm *src, struct vmig_vm *dst, unsigned int vcpus)
{
	compare_memory(src, dst);
	check_continues(src, dst, vcpus);
	vmig_vm_destroy(dst);
	vmig_vm_destroy(src);
}

static void migrate_case(unsigned int vcpus, bool tcp, const char *workload,
			 enum vmig_compress compress, unsigned int channels)
{
	struct vmig_vm *src = make_vm(128 << 20, vcpus, workload);
	struct dst_ctx d = { .paused = true };
	struct vmig_migrate_stats st;
	enum vmig_migrate_status s;

	wait_guest(src, vcpus);
	kvm_test_sleep_ms(200);
	dst_listen(&d, tcp);
	compress_mode = compress;
	channels_mode = channels;
	s = migrate(src, d.uri, 300, -1, &st);
	channels_mode = 1;
	dst_join(&d);
	ck_assert_msg(s == VMIG_MIGRATE_COMPLETED, "status %s: %s",
		      vmig_migrate_status_name(s), st.error);
	ck_assert_msg(d.ret == 0, "destination: %s", d.err.msg);
	ck_assert_int_eq(vmig_vm_state(src), VMIG_VM_PAUSED);
	printf("%u vCPU(s) over %s x%u, %s, compress %d: %" PRIu64 " ms, downtime %" PRIu64
	       " ms, %" PRIu64 " bytes, %" PRIu64 " iterations, pages %" PRIu64 " zero %"
	       PRIu64 " raw %" PRIu64 " lz4, %" PRIu64 " arrived torn and came again\n", vcpus,
	       tcp ? "tcp" : "unix", channels, workload, (int)compress, st.total_ms,
	       st.downtime_ms, st.transferred_bytes, st.iteration, st.pages_zero, st.pages_raw,
	       st.pages_lz4, d.rs.pages_torn);
	/* Every page sent arrived, and was counted the same way. */
	ck_assert_uint_eq(d.rs.pages_zero, st.pages_zero);
	ck_assert_uint_eq(d.rs.pages_raw, st.pages_raw);
	ck_assert_uint_eq(d.rs.pages_lz4, st.pages_lz4);
	if (compress == VMIG_COMPRESS_NONE)
		ck_assert_msg(st.pages_lz4 == 0, "%" PRIu64 " lz4 pages with compression off",
			      st.pages_lz4);
	arrived_whole(src, d.vm, vcpus);
}

static const struct {
	unsigned int vcpus;
	bool tcp;
	const char *workload;
	enum vmig_compress compress;
	unsigned int channels;
} cases[] = {
	{ 1, true,  "rate=1,wss=1M,quiet", VMIG_COMPRESS_LZ4, 1 },
	{ 1, false, "rate=1,wss=1M,quiet", VMIG_COMPRESS_AUTO, 1 },
	{ 2, true,  "rate=1,wss=1M,quiet", VMIG_COMPRESS_NONE, 1 },
	{ 2, false, "rate=1,wss=1M,quiet", VMIG_COMPRESS_LZ4, 1 },
	{ 1, true,  "rate=max,wss=16M,quiet", VMIG_COMPRESS_AUTO, 1 },
	{ 1, false, "rate=max,wss=16M,quiet", VMIG_COMPRESS_NONE, 1 },
	{ 2, true,  "rate=max,wss=8M,quiet", VMIG_COMPRESS_LZ4, 1 },
	{ 2, false, "rate=max,wss=8M,quiet", VMIG_COMPRESS_AUTO, 1 },
	/* Several channels: pages of one pass spread, passes kept in order. */
	{ 1, true,  "rate=max,wss=16M,quiet", VMIG_COMPRESS_NONE, 2 },
	{ 2, false, "rate=max,wss=8M,quiet", VMIG_COMPRESS_AUTO, 3 },
	{ 1, true,  "rate=20000,wss=24M,quiet", VMIG_COMPRESS_LZ4, 4 },
};

START_TEST(migrates_page_exact)
{
	migrate_case(cases[_i].vcpus, cases[_i].tcp, cases[_i].workload, cases[_i].compress,
		     cases[_i].channels);
}
END_TEST

START_TEST(migrates_4g_guest)
{
	struct vmig_vm *src = make_vm(4ull << 30, 2, "rate=max,wss=4M,quiet");
	struct dst_ctx d = { .paused = true };
	struct vmig_migrate_stats st;

	wait_guest(src, 2);
	dst_listen(&d, true);
	ck_assert_int_eq(migrate(src, d.uri, 300, -1, &st), VMIG_MIGRATE_COMPLETED);
	dst_join(&d);
	ck_assert_msg(d.ret == 0, "destination: %s", d.err.msg);
	ck_assert_uint_eq(st.ram_total_bytes, 4ull << 30);
	arrived_whole(src, d.vm, 2);
}
END_TEST

START_TEST(paused_vm_single_pass)
{
	struct vmig_vm *src = make_vm(64 << 20, 2, "rate=max,wss=2M,quiet");
	struct dst_ctx d = { .paused = false };
	struct vmig_migrate_stats st;
	uint64_t pw;

	wait_guest(src, 2);
	ck_assert_int_eq(vmig_vm_pause(src), 0);
	pw = pages_written(src);
	dst_listen(&d, false);
	ck_assert_int_eq(migrate(src, d.uri, 300, -1, &st), VMIG_MIGRATE_COMPLETED);
	dst_join(&d);
	ck_assert_msg(d.ret == 0, "destination: %s", d.err.msg);
	ck_assert_uint_eq(st.iteration, 1);
	/* It left paused, it arrives paused. */
	ck_assert_int_eq(vmig_vm_state(d.vm), VMIG_VM_PAUSED);
	compare_memory(src, d.vm);
	ck_assert_uint_eq(pages_written(d.vm), pw);
	check_continues(src, d.vm, 2);
	vmig_vm_destroy(d.vm);
	vmig_vm_destroy(src);
}
END_TEST

START_TEST(paused_vm_resume_on_arrival)
{
	struct vmig_vm *src = make_vm(64 << 20, 1, "rate=max,wss=2M,quiet");
	struct dst_ctx d = { .paused = false };
	struct vmig_migrate_params p = { .max_downtime_ms = 300, .resume_dst = true };
	struct vmig_migrate_stats st;
	uint64_t a;

	wait_guest(src, 1);
	ck_assert_int_eq(vmig_vm_pause(src), 0);
	dst_listen(&d, false);
	p.uri = d.uri;
	ck_assert_int_eq(migrate_p(src, p, -1, &st), VMIG_MIGRATE_COMPLETED);
	dst_join(&d);
	ck_assert_msg(d.ret == 0, "destination: %s", d.err.msg);
	ck_assert_int_eq(vmig_vm_state(d.vm), VMIG_VM_RUNNING);
	a = pages_written(d.vm);
	kvm_test_sleep_ms(200);
	ck_assert_uint_gt(pages_written(d.vm), a);
	vmig_vm_destroy(d.vm);
	vmig_vm_destroy(src);
}
END_TEST

START_TEST(timeout_cancels_or_forces)
{
	struct vmig_vm *src = make_vm(256 << 20, 1, "rate=max,wss=64M,quiet");
	struct vmig_migrate_params p = { .max_downtime_ms = 1, .timeout_s = 1, .compress = true };
	struct vmig_migrate_stats st;
	struct dst_ctx d = { .paused = true };
	uint64_t a;

	wait_guest(src, 1);
	/* 1 ms with 64 MiB dirtied at full speed never converges: cancel at 1 s. */
	p.on_timeout = VMIG_ON_TIMEOUT_CANCEL;
	ck_assert_int_eq(migrate_live(src, p, &d, &st), VMIG_MIGRATE_FAILED);
	ck_assert_msg(strstr(st.error, "did not converge within 1 s"), "%s", st.error);
	ck_assert_msg(st.total_ms >= 1000 && st.total_ms < 10000, "took %" PRIu64 " ms",
		      st.total_ms);
	ck_assert(d.ret != 0 && !d.vm);
	ck_assert_int_eq(vmig_vm_state(src), VMIG_VM_RUNNING);
	a = pages_written(src);
	kvm_test_sleep_ms(100);
	ck_assert_uint_gt(pages_written(src), a);

	/* The same with force: it switches over at 1 s and arrives whole. */
	memset(&d, 0, sizeof(d));
	d.paused = true;
	p.on_timeout = VMIG_ON_TIMEOUT_FORCE;
	ck_assert_int_eq(migrate_live(src, p, &d, &st), VMIG_MIGRATE_COMPLETED);
	ck_assert_msg(d.ret == 0, "destination: %s", d.err.msg);
	ck_assert_msg(st.total_ms >= 1000, "forced before the timeout: %" PRIu64 " ms",
		      st.total_ms);
	arrived_whole(src, d.vm, 1);
}
END_TEST

/*
 * --bandwidth: 16 MiB of guest data at 16 MiB/s cannot take much less
 * than a second (unpaced, loopback moves it in a few ms).  Only a lower
 * bound: a loaded machine makes it slower, never faster.
 */
START_TEST(bandwidth_cap_holds)
{
	struct vmig_vm *src = make_vm(64 << 20, 1, "rate=max,wss=16M,quiet");
	struct vmig_migrate_params p = {
		.max_downtime_ms = 5000, .compress = VMIG_COMPRESS_NONE,
		.bandwidth_bps = 16 << 20,
	};
	struct vmig_migrate_stats st;
	struct dst_ctx d = { .paused = true };

	wait_guest(src, 1);
	kvm_test_sleep_ms(300);          /* every page of the working set stamped */
	ck_assert_int_eq(migrate_live(src, p, &d, &st), VMIG_MIGRATE_COMPLETED);
	ck_assert_msg(d.ret == 0, "destination: %s", d.err.msg);
	printf("bandwidth cap 16 MiB/s: %" PRIu64 " bytes in %" PRIu64 " ms, %" PRIu64
	       " iterations\n", st.transferred_bytes, st.total_ms, st.iteration);
	ck_assert_msg(st.transferred_bytes >= 16u << 20, "only %" PRIu64 " bytes sent",
		      st.transferred_bytes);
	ck_assert_msg(st.total_ms >= 800, "16 MiB at 16 MiB/s took %" PRIu64 " ms",
		      st.total_ms);
	ck_assert_uint_eq(st.bandwidth_limit_bps, 16 << 20);
	arrived_whole(src, d.vm, 1);
}
END_TEST

/*
 * Auto-converge.  A guest rewriting a 16 MiB working set at up to 20,000
 * pages/s (80 MiB/s; under dirty logging a slow host manages ~9,000) over
 * a link capped at 16 MiB/s, raw, never gets under 50 ms of downtime
 * (shown first, with throttling off); throttled in steps it
 * converges and arrives whole.  The guest paces itself by the clock and
 * catches up after pauses under 100 ms, so a fast host needs the 99 %
 * step, a slow one less: either way it converges.  (A guest dirtying at
 * full speed a working set smaller than what it rewrites in one 10 ms
 * slice cannot be helped by any throttle.)  A cancelled migration leaves
 * the guest unthrottled.
 */
START_TEST(auto_converge_throttles)
{
	struct vmig_vm *src = make_vm(64 << 20, 1, "rate=20000,wss=16M,quiet");
	struct vmig_migrate_params p = {
		.max_downtime_ms = 50, .compress = VMIG_COMPRESS_NONE,
		.bandwidth_bps = 16 << 20, .timeout_s = 3,
	};
	struct vmig_migrate_stats st;
	struct vmig_migration *m = NULL;
	struct vmig_err err = { 0 };
	struct dst_ctx d = { .paused = true };
	uint64_t a, start;

	wait_guest(src, 1);
	kvm_test_sleep_ms(300);

	/* Throttling off: no convergence. */
	ck_assert_int_eq(migrate_live(src, p, &d, &st), VMIG_MIGRATE_FAILED);
	ck_assert_msg(strstr(st.error, "did not converge"), "%s", st.error);
	ck_assert_uint_eq(st.throttle_pct, 0);
	ck_assert_uint_eq(vmig_vm_throttle(src), 0);

	/* On: throttled; cancelled once it is, the guest runs at full speed. */
	memset(&d, 0, sizeof(d));
	d.paused = true;
	dst_listen(&d, true);
	p.uri = d.uri;
	p.timeout_s = 0;
	p.throttle_initial = 50;
	p.throttle_step = 25;
	p.throttle_max = 99;
	ck_assert_int_eq(vmig_migrate_src_start(src, &p, &m, &err), 0);
	start = kvm_test_now_ms();
	do {
		kvm_test_sleep_ms(20);
		vmig_migrate_src_stats(m, &st);
		ck_assert_msg(kvm_test_now_ms() - start < 60000, "never throttled");
	} while (!st.throttle_pct && !vmig_migrate_status_final(st.status));
	ck_assert_uint_ge(vmig_vm_throttle(src), 50);
	vmig_migrate_src_cancel(m);
	ck_assert_int_eq(vmig_migrate_src_finish(m, &st), VMIG_MIGRATE_CANCELLED);
	dst_join(&d);
	ck_assert_uint_eq(vmig_vm_throttle(src), 0);
	ck_assert_int_eq(vmig_vm_state(src), VMIG_VM_RUNNING);
	a = pages_written(src);
	kvm_test_sleep_ms(100);
	ck_assert_uint_gt(pages_written(src), a);

	/* On, to the end, over two channels (many passes, each split in two
	 * and paced at half the cap each): it converges and arrives whole. */
	memset(&d, 0, sizeof(d));
	d.paused = true;
	p.channels = 2;
	ck_assert_int_eq(migrate_live(src, p, &d, &st), VMIG_MIGRATE_COMPLETED);
	ck_assert_msg(d.ret == 0, "destination: %s", d.err.msg);
	printf("auto-converge: %" PRIu64 " ms, downtime %" PRIu64 " ms, %" PRIu64
	       " iterations, throttle %u %%, %" PRIu64 " bytes\n", st.total_ms, st.downtime_ms,
	       st.iteration, st.throttle_pct, st.transferred_bytes);
	/* The cap held across both channels: 16 MiB/s, one pass at most unpaced. */
	ck_assert_msg(st.transferred_bytes <= (st.total_ms + 1000) * (16ull << 20) / 1000,
		      "%" PRIu64 " bytes in %" PRIu64 " ms at 16 MiB/s", st.transferred_bytes,
		      st.total_ms);
	ck_assert_uint_ge(st.throttle_pct, 50);
	arrived_whole(src, d.vm, 1);
}
END_TEST

/*
 * --channels to a destination that takes one connection (like incoming
 * --stdio): it refuses before any page lands and the source runs on.
 * Also: a file or ssh:// target refuses several channels at once.
 */
START_TEST(channels_refused_cleanly)
{
	struct vmig_vm *src = make_vm(64 << 20, 1, "rate=max,wss=4M,quiet");
	struct vmig_migrate_params p = { .max_downtime_ms = 300, .channels = 2 };
	struct vmig_migrate_stats st;
	struct vmig_migration *m = NULL;
	struct vmig_err err = { 0 };
	struct dst_ctx d = { .paused = true, .no_channels = true };
	char uri[300];
	uint64_t a;

	wait_guest(src, 1);
	ck_assert_int_eq(migrate_live(src, p, &d, &st), VMIG_MIGRATE_FAILED);
	ck_assert_msg(strstr(st.error, "takes one"), "%s", st.error);
	ck_assert(d.ret != 0 && !d.vm);
	ck_assert_int_eq(vmig_vm_state(src), VMIG_VM_RUNNING);
	a = pages_written(src);
	kvm_test_sleep_ms(100);
	ck_assert_uint_gt(pages_written(src), a);

	snprintf(uri, sizeof(uri), "file:%s/x.vmig", tmpdir);
	p.uri = uri;
	ck_assert_int_eq(vmig_migrate_src_start(src, &p, &m, &err), -EINVAL);
	ck_assert_msg(strstr(err.msg, "several channels need tcp://, unix: or ssh://"), "%s", err.msg);
	p.channels = VMIG_MIGRATE_MAX_CHANNELS + 1;
	p.uri = "tcp://127.0.0.1:1";
	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_migrate_src_start(src, &p, &m, &err), -EINVAL);
	vmig_vm_destroy(src);
}
END_TEST

/*
 * incoming --prealloc: RAM allocated beforehand is taken over when it is
 * large enough (and the guest arrives whole in it), left alone when not.
 */
START_TEST(prealloc_is_taken_over)
{
	struct vmig_vm *src = make_vm(128 << 20, 1, "rate=max,wss=16M,quiet");
	struct vmig_migrate_stats st;
	struct vmig_err err = { 0 };
	static const uint64_t sizes[] = { 256 << 20, 64 << 20 };

	wait_guest(src, 1);
	for (unsigned int i = 0; i < 2; i++) {
		struct dst_ctx d = { .paused = true };

		ck_assert_msg(vmig_prealloc_create(sizes[i], &d.prealloc, &err) == 0, "%s",
			      err.msg);
		dst_listen(&d, true);
		ck_assert_int_eq(migrate(src, d.uri, 300, -1, &st), VMIG_MIGRATE_COMPLETED);
		dst_join(&d);
		ck_assert_msg(d.ret == 0, "destination: %s", d.err.msg);
		ck_assert_int_eq(d.prealloc->used, i == 0);
		/* Taken over: the rest was given back, nothing is left to free. */
		if (i == 0)
			ck_assert(d.prealloc->fd < 0 && !d.prealloc->mem);
		vmig_prealloc_destroy(d.prealloc);
		compare_memory(src, d.vm);
		check_continues(src, d.vm, 1);
		vmig_vm_destroy(d.vm);
		ck_assert_int_eq(vmig_vm_resume(src), 0);
	}
	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_prealloc_create(3 << 20, &(struct vmig_prealloc *){ NULL }, &err),
			 -EINVAL);
	vmig_vm_destroy(src);
}
END_TEST

START_TEST(save_restore_round_trip)
{
	struct vmig_vm *src = make_vm(64 << 20, 2, "rate=max,wss=2M,quiet");
	struct dst_ctx d = { .paused = true, .live = false };
	struct vmig_migrate_stats st;
	struct vmig_err err = { 0 };
	char uri[300], path[200];
	struct stat sb;

	wait_guest(src, 2);
	snprintf(path, sizeof(path), "%s/vm.save", tmpdir);
	snprintf(uri, sizeof(uri), "file:%s", path);
	ck_assert_int_eq(migrate(src, uri, 300, -1, &st), VMIG_MIGRATE_COMPLETED);
	ck_assert_int_eq(stat(path, &sb), 0);
	ck_assert_uint_eq(st.transferred_bytes, (uint64_t)sb.st_size);
	ck_assert_int_eq(vmig_transport_open_file(path, false, &d.t, &err), 0);
	dst_main(&d);
	ck_assert_msg(d.ret == 0, "restore: %s", d.err.msg);
	/* A save pauses the VM; stop_after was not asked, so it runs again. */
	ck_assert_int_eq(vmig_vm_state(src), VMIG_VM_RUNNING);
	ck_assert_msg(pages_written(d.vm) > 0 && pages_written(d.vm) < pages_written(src),
		      "restored counters %" PRIu64 " vs source now %" PRIu64,
		      pages_written(d.vm), pages_written(src));
	check_continues(NULL, d.vm, 2);

	/* And a paused VM saved: the file is exactly the paused VM. */
	vmig_vm_destroy(d.vm);
	memset(&d, 0, sizeof(d));
	d.paused = true;
	ck_assert_int_eq(vmig_vm_pause(src), 0);
	ck_assert_int_eq(migrate(src, uri, 300, -1, &st), VMIG_MIGRATE_COMPLETED);
	ck_assert_int_eq(vmig_vm_state(src), VMIG_VM_PAUSED);
	ck_assert_int_eq(vmig_transport_open_file(path, false, &d.t, &err), 0);
	dst_main(&d);
	ck_assert_msg(d.ret == 0, "restore: %s", d.err.msg);
	arrived_whole(src, d.vm, 2);
}
END_TEST

START_TEST(cancel_keeps_source_running)
{
	static const int points[] = { 0, 30, 200, 600 };
	struct vmig_vm *src = make_vm(256 << 20, 1, "rate=max,wss=64M,quiet");
	unsigned int i;

	wait_guest(src, 1);
	for (i = 0; i < sizeof(points) / sizeof(points[0]); i++) {
		struct dst_ctx d = { .paused = true };
		struct vmig_migrate_stats st;
		uint64_t a, b;

		dst_listen(&d, i % 2);
		/* 1 ms downtime with 64 MiB dirtied at full speed never converges. */
		ck_assert_int_eq(migrate(src, d.uri, 1, points[i], &st), VMIG_MIGRATE_CANCELLED);
		dst_join(&d);
		ck_assert_msg(d.ret != 0 && !d.vm, "the destination kept a VM");
		ck_assert_msg(strstr(d.err.msg, "cancel"), "destination's reason: %s", d.err.msg);
		ck_assert_int_eq(vmig_vm_state(src), VMIG_VM_RUNNING);
		a = pages_written(src);
		kvm_test_sleep_ms(100);
		b = pages_written(src);
		ck_assert_msg(b > a, "source stalled after cancel at %d ms", points[i]);
	}
	vmig_vm_destroy(src);
}
END_TEST

/* ---- a destination that misbehaves on purpose ---- */

enum die_at { DIE_AT_ACCEPT, DIE_AFTER_CONFIG, DIE_MID_PAGES, DIE_AT_SWITCHOVER,
	      NACK_AT_SWITCHOVER, DIE_AFTER_READY, DIE_CHANNEL_MID_PAGES };

/*
 * --channels 2: take the extra connection, read some of its pages, then
 * drop it while the main connection stays up.
 */
static void fake_channel_dies(struct vmig_listener *l)
{
	struct vmig_transport *t = NULL;
	struct vmig_stream_reader *r = NULL;
	struct vmig_err err = { 0 };
	struct vmig_record rec;
	unsigned int n = 0;

	if (vmig_transport_accept(l, 10000, &t, &err))
		return;
	vmig_stream_reader_create(t, VMIG_STREAM_FORWARD, &r);
	if (vmig_stream_read_header(r, &err) == 0)
		while (n++ < 10 && vmig_stream_read_record(r, &rec, &err) == 0)
			;
	vmig_stream_reader_destroy(r);
	vmig_transport_close(t);
}

struct fake_dst {
	struct vmig_listener *l;
	enum die_at at;
	pthread_t thread;
};

static void *fake_dst_main(void *arg)
{
	struct fake_dst *f = arg;
	struct vmig_transport *t = NULL;
	struct vmig_stream_reader *r = NULL;
	struct vmig_stream_writer *w = NULL;
	struct vmig_err err = { 0 };
	struct vmig_record rec;
	unsigned int n = 0;

	if (vmig_transport_accept(f->l, 30000, &t, &err))
		return NULL;
	if (f->at == DIE_AT_ACCEPT)
		goto out;
	vmig_stream_reader_create(t, VMIG_STREAM_FORWARD, &r);
	vmig_stream_writer_create(t, VMIG_STREAM_REVERSE, &w);
	vmig_stream_write_header(w);
	vmig_stream_flush(w);
	if (vmig_stream_read_header(r, &err))
		goto out;
	while (vmig_stream_read_record(r, &rec, &err) == 0) {
		n++;
		if (rec.type == VMIG_REC_ITER_END) {
			/* Acknowledge it like a real destination. */
			uint64_t body[2];

			memcpy(body, rec.body, 8);
			body[1] = 0;
			vmig_stream_write_record(w, VMIG_REC_ITER_DONE, 0, body, sizeof(body));
			vmig_stream_flush(w);
		}
		if (f->at == DIE_AFTER_CONFIG && rec.type == VMIG_REC_CONFIG)
			break;
		if (f->at == DIE_CHANNEL_MID_PAGES && rec.type == VMIG_REC_CONFIG)
			fake_channel_dies(f->l);
		if (f->at == DIE_MID_PAGES && n > 20 &&
		    (rec.type == VMIG_REC_PAGES || rec.type == VMIG_REC_LIVE_PAGES))
			break;
		if (rec.type != VMIG_REC_SWITCHOVER)
			continue;
		if (f->at == NACK_AT_SWITCHOVER) {
			vmig_stream_write_error(w, VMIG_REC_NACK, EINVAL, "refused for the test");
			vmig_stream_flush(w);
		} else if (f->at == DIE_AFTER_READY) {
			vmig_stream_write_record(w, VMIG_REC_READY, 0, NULL, 0);
			vmig_stream_flush(w);
			/* Read COMMIT, then vanish without RUNNING. */
			vmig_stream_read_record(r, &rec, &err);
		}
		break;
	}
out:
	vmig_stream_reader_destroy(r);
	vmig_stream_writer_destroy(w);
	vmig_transport_close(t);
	return NULL;
}

START_TEST(destination_failures)
{
	static const enum die_at points[] = { DIE_AT_ACCEPT, DIE_AFTER_CONFIG, DIE_MID_PAGES,
					      DIE_AT_SWITCHOVER, NACK_AT_SWITCHOVER,
					      DIE_CHANNEL_MID_PAGES };
	struct vmig_vm *src = make_vm(128 << 20, 2, "rate=20000,wss=32M,quiet");
	unsigned int i;

	wait_guest(src, 2);
	kvm_test_sleep_ms(500);   /* some data to send */
	for (i = 0; i < sizeof(points) / sizeof(points[0]); i++) {
		struct fake_dst f = { .at = points[i] };
		struct vmig_migrate_stats st;
		struct vmig_err err = { 0 };
		char uri[256];
		uint64_t a, b;

		snprintf(uri, sizeof(uri), "unix:%s/fake%u.sock", tmpdir, i);
		ck_assert_int_eq(vmig_transport_listen(uri, &f.l, &err), 0);
		ck_assert_int_eq(pthread_create(&f.thread, NULL, fake_dst_main, &f), 0);
		channels_mode = points[i] == DIE_CHANNEL_MID_PAGES ? 2 : 1;
		ck_assert_int_eq(migrate(src, uri, 300, -1, &st), VMIG_MIGRATE_FAILED);
		channels_mode = 1;
		pthread_join(f.thread, NULL);
		vmig_listener_close(f.l);
		ck_assert_msg(st.error[0], "failure %u has no message", i);
		if (points[i] == NACK_AT_SWITCHOVER)
			ck_assert_msg(strstr(st.error, "refused for the test"), "%s", st.error);
		if (points[i] == DIE_CHANNEL_MID_PAGES)
			ck_assert_msg(strstr(st.error, "channel 1"), "%s", st.error);
		ck_assert_int_eq(vmig_vm_state(src), VMIG_VM_RUNNING);
		a = pages_written(src);
		kvm_test_sleep_ms(100);
		b = pages_written(src);
		ck_assert_msg(b > a, "source did not resume after failure %u (%s)", i, st.error);
	}
	vmig_vm_destroy(src);
}
END_TEST

START_TEST(lost_after_commit_is_uncertain)
{
	struct vmig_vm *src = make_vm(64 << 20, 1, "rate=1,wss=1M,quiet");
	struct fake_dst f = { .at = DIE_AFTER_READY };
	struct vmig_migrate_stats st;
	struct vmig_err err = { 0 };
	char uri[256];
	uint64_t a;

	wait_guest(src, 1);
	snprintf(uri, sizeof(uri), "unix:%s/fake.sock", tmpdir);
	ck_assert_int_eq(vmig_transport_listen(uri, &f.l, &err), 0);
	ck_assert_int_eq(pthread_create(&f.thread, NULL, fake_dst_main, &f), 0);
	ck_assert_int_eq(migrate(src, uri, 300, -1, &st), VMIG_MIGRATE_UNCERTAIN);
	pthread_join(f.thread, NULL);
	vmig_listener_close(f.l);
	/* Exactly one copy may run: this one stays paused. */
	ck_assert_int_eq(vmig_vm_state(src), VMIG_VM_PAUSED);
	a = pages_written(src);
	kvm_test_sleep_ms(200);
	ck_assert_uint_eq(pages_written(src), a);
	vmig_vm_destroy(src);
}
END_TEST

/* ---- damaged streams into the receiver ---- */

static uint8_t *saved;
static size_t saved_len;

static void make_saved_stream(void)
{
	struct vmig_vm *src = make_vm(32 << 20, 1, "rate=max,wss=256K,quiet");
	struct vmig_migrate_stats st;
	char uri[300], path[200];
	struct stat sb;
	int fd;

	wait_guest(src, 1);
	snprintf(path, sizeof(path), "%s/small.save", tmpdir);
	snprintf(uri, sizeof(uri), "file:%s", path);
	ck_assert_int_eq(migrate(src, uri, 300, -1, &st), VMIG_MIGRATE_COMPLETED);
	vmig_vm_destroy(src);
	fd = open(path, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(fstat(fd, &sb), 0);
	saved_len = sb.st_size;
	saved = malloc(saved_len);
	ck_assert_int_eq(read(fd, saved, saved_len), (ssize_t)saved_len);
	close(fd);
}

/*
 * Stream offset of the payload of the first page that has one (RAW or
 * LZ4) in a LIVE_PAGES record of @buf (a saved stream), its length in
 * *@plen_out; 0 if there is none.
 */
static size_t first_live_payload(const uint8_t *buf, size_t len, uint32_t *plen_out)
{
	size_t at = VMIG_STREAM_HEADER_SIZE;

	while (at + VMIG_STREAM_REC_HEADER <= len) {
		uint32_t type, count;
		uint64_t rlen, pay;

		memcpy(&type, buf + at, 4);
		memcpy(&rlen, buf + at + 8, 8);
		if (type == VMIG_REC_LIVE_PAGES) {
			memcpy(&count, buf + at + VMIG_STREAM_REC_HEADER, 4);
			pay = at + VMIG_STREAM_REC_HEADER + 8 + (uint64_t)count * VMIG_STREAM_PAGE_DESC;
			for (uint32_t i = 0; i < count; i++) {
				const uint8_t *d = buf + at + VMIG_STREAM_REC_HEADER + 8 +
						   (size_t)i * VMIG_STREAM_PAGE_DESC;
				uint64_t word;
				uint32_t plen;

				memcpy(&word, d, 8);
				memcpy(&plen, d + 8, 4);
				if (plen) {
					*plen_out = plen;
					return pay;
				}
				pay += plen;
			}
		}
		at += VMIG_STREAM_REC_HEADER + rlen + ((8 - rlen % 8) % 8) + VMIG_STREAM_REC_TRAILER;
	}
	return 0;
}

/* Feed @len bytes of @buf to a receiver in a thread; its result in @d. */
static void feed(const uint8_t *buf, size_t len, struct dst_ctx *d)
{
	int sv[2];
	size_t off = 0;

	*d = (struct dst_ctx){ .paused = true, .live = false };
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	ck_assert_int_eq(vmig_transport_from_fds(sv[0], sv[0], &d->t), 0);
	ck_assert_int_eq(pthread_create(&d->thread, NULL, dst_main, d), 0);
	while (off < len) {
		ssize_t n = write(sv[1], buf + off, len - off);

		if (n <= 0)
			break;   /* the receiver gave up early: fine */
		off += n;
	}
	shutdown(sv[1], SHUT_WR);
	pthread_join(d->thread, NULL);
	close(sv[1]);
}

/* Feed @len bytes of @buf to the receiver; expect a clean failure. */
static void feed_expect_error(const uint8_t *buf, size_t len, const char *what)
{
	struct dst_ctx d;

	feed(buf, len, &d);
	ck_assert_msg(d.ret < 0, "%s: accepted", what);
	ck_assert_msg(d.vm == NULL, "%s: a VM was left behind", what);
	ck_assert_msg(d.err.msg[0], "%s: no message (ret %d)", what, d.ret);
}

/* Record types found in a saved stream: a bit per type below 64. */
static uint64_t record_types(const uint8_t *buf, size_t len)
{
	size_t at = VMIG_STREAM_HEADER_SIZE;
	uint64_t seen = 0;

	while (at + VMIG_STREAM_REC_HEADER <= len) {
		uint32_t type;
		uint64_t rlen;

		memcpy(&type, buf + at, 4);
		memcpy(&rlen, buf + at + 8, 8);
		if (type < 64)
			seen |= 1ull << type;
		at += VMIG_STREAM_REC_HEADER + rlen + ((8 - rlen % 8) % 8) + VMIG_STREAM_REC_TRAILER;
	}
	return seen;
}

/*
 * --stream-version 1 (a destination running vmig 0.1.0): a version-1
 * stream with PAGES only, which loads; the default is version 2 with
 * LIVE_PAGES.
 */
START_TEST(stream_version_1_for_old_destinations)
{
	for (unsigned int v = 1; v <= 2; v++) {
		struct vmig_vm *src = make_vm(32 << 20, 1, "rate=max,wss=1M,fill=random,quiet");
		struct vmig_migrate_params p = { .max_downtime_ms = 300, .stream_version = v,
						 .compress = VMIG_COMPRESS_NONE };
		struct vmig_migrate_stats st;
		struct dst_ctx d;
		char uri[300], path[200];
		uint8_t *buf;
		uint64_t types;
		uint32_t version;
		struct stat sb;
		int fd;

		wait_guest(src, 1);
		snprintf(path, sizeof(path), "%s/v%u.save", tmpdir, v);
		snprintf(uri, sizeof(uri), "file:%s", path);
		p.uri = uri;
		ck_assert_int_eq(migrate_p(src, p, -1, &st), VMIG_MIGRATE_COMPLETED);
		vmig_vm_destroy(src);
		fd = open(path, O_RDONLY);
		ck_assert_int_ge(fd, 0);
		ck_assert_int_eq(fstat(fd, &sb), 0);
		buf = malloc(sb.st_size);
		ck_assert_int_eq(read(fd, buf, sb.st_size), (ssize_t)sb.st_size);
		close(fd);
		memcpy(&version, buf + 8, 4);
		types = record_types(buf, sb.st_size);
		ck_assert_uint_eq(version, v);
		if (v == 1)
			ck_assert_msg((types & (1ull << VMIG_REC_PAGES)) &&
				      !(types & (1ull << VMIG_REC_LIVE_PAGES)),
				      "version 1: record types 0x%llx", (unsigned long long)types);
		else
			ck_assert_msg(types & (1ull << VMIG_REC_LIVE_PAGES),
				      "version 2: record types 0x%llx", (unsigned long long)types);
		feed(buf, sb.st_size, &d);
		ck_assert_msg(d.ret == 0, "version %u refused: %s", v, d.err.msg);
		vmig_vm_destroy(d.vm);
		free(buf);
	}
}
END_TEST

START_TEST(damaged_streams_fail_cleanly)
{
	static const double cuts[] = { 0, 0.0001, 0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999 };
	unsigned int i, seed = 12345;
	uint8_t *copy;
	char what[128];

	make_saved_stream();
	/* The intact stream loads: the damage is what fails below. */
	{
		struct dst_ctx d;

		feed(saved, saved_len, &d);
		ck_assert_msg(d.ret == 0, "intact stream refused: %s", d.err.msg);
		vmig_vm_destroy(d.vm);
	}
	for (i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
		size_t len = (size_t)(saved_len * cuts[i]);

		snprintf(what, sizeof(what), "truncated at %zu of %zu", len, saved_len);
		feed_expect_error(saved, len, what);
	}
	feed_expect_error(saved, saved_len - 1, "last byte missing");
	copy = malloc(saved_len);
	for (i = 0; i < 40; i++) {
		size_t bit = rand_r(&seed) % (saved_len * 8);

		memcpy(copy, saved, saved_len);
		copy[bit / 8] ^= 1u << (bit % 8);
		snprintf(what, sizeof(what), "bit %zu flipped", bit);
		feed_expect_error(copy, saved_len, what);
	}
	/*
	 * A page damaged on the way looks torn (LIVE_PAGES: its own
	 * checksum), and is never sent again: the destination refuses at the
	 * switchover, saying so.
	 */
	{
		uint32_t plen = 0;
		size_t at = first_live_payload(saved, saved_len, &plen);
		struct dst_ctx d;

		ck_assert_msg(at > 0, "the saved stream has no page payload in a LIVE_PAGES record");
		memcpy(copy, saved, saved_len);
		copy[at + plen / 2] ^= 0x20;
		feed(copy, saved_len, &d);
		ck_assert_int_eq(d.ret, -EBADMSG);
		ck_assert(d.vm == NULL);
		ck_assert_msg(strstr(d.err.msg, "1 page arrived damaged and was never sent again"),
			      "%s", d.err.msg);
		ck_assert_uint_eq(d.rs.pages_torn, 1);
	}
	free(copy);
	free(saved);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("migrate");
	TCase *tc = tcase_create("migrate");
	TCase *fail = tcase_create("failures");

	kvm_test_require_kvm();
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 180);
	tcase_add_loop_test(tc, migrates_page_exact, 0, sizeof(cases) / sizeof(cases[0]));
	tcase_add_test(tc, migrates_4g_guest);
	tcase_add_test(tc, paused_vm_single_pass);
	tcase_add_test(tc, save_restore_round_trip);
	tcase_add_test(tc, paused_vm_resume_on_arrival);
	tcase_add_test(tc, timeout_cancels_or_forces);
	tcase_add_test(tc, bandwidth_cap_holds);
	tcase_add_test(tc, prealloc_is_taken_over);
	suite_add_tcase(s, tc);

	tcase_add_checked_fixture(fail, setup, teardown);
	tcase_set_timeout(fail, 180);
	tcase_add_test(fail, auto_converge_throttles);
	tcase_add_test(fail, channels_refused_cleanly);
	tcase_add_test(fail, cancel_keeps_source_running);
	tcase_add_test(fail, destination_failures);
	tcase_add_test(fail, lost_after_commit_is_uncertain);
	tcase_add_test(fail, damaged_streams_fail_cleanly);
	tcase_add_test(fail, stream_version_1_for_old_destinations);
	suite_add_tcase(s, fail);
	return kvm_test_run(s);
}
