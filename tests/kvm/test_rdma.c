/*
 * vmig migrate / vmig incoming over rdma://, process to process, as an
 * admin uses them.
 *
 * Everywhere (no device needed): on a host without an RDMA device, or a
 * vmig built without --with-rdma, `vmig migrate NAME rdma://...` fails
 * with an error that names the cause, and the VM keeps running on the
 * source; `vmig incoming --listen rdma://...` (in the foreground and with
 * --detach) fails the same way and leaves nothing behind.
 *
 * With an RDMA device (a NIC, or soft-RoCE: see docs/rdma.md): a live
 * migration over rdma:// (the guest runs on at the destination, the
 * source let go), and a destination killed mid-stream (the source
 * resumes).  Without one those cases are not run, with the reason printed.
 * VMIG_TEST_RDMA_ADDR names the address (default 127.0.0.1).
 *
 * "Host A" and "host B" are two run directories; every test has its own
 * under a directory the runner removes, stopping what a failed test left
 * running.  VM names start with "rd".  Skips (77) without /dev/kvm.
 */
#include "config.h"

#include <inttypes.h>
#include <signal.h>

#include <json-c/json.h>

#include "vmig/transport.h"
#include "kvm-test.h"
#include "proc-test.h"

static const char *vmig_bin;
static char base[128];
static char dir[256];
static char run_a[300];
static char run_b[300];

#define RUN_A(r, ...) KVM_TEST_VMIG((r), run_a, __VA_ARGS__)
#define RUN_B(r, ...) KVM_TEST_VMIG((r), run_b, __VA_ARGS__)

static void start_vm(const char *name, const char *workload)
{
	kvm_test_start_vm(run_a, name, "96M", "1", workload);
}

static void setup(void)
{
	vmig_bin = kvm_test_vmig_bin();
	kvm_test_make_dirs(base, dir, sizeof(dir), run_a, run_b, sizeof(run_a));
}

static void teardown(void)
{
	kvm_test_reap(dir);
}

static void runner_setup(void)
{
	kvm_test_make_base(base, sizeof(base), "rdma");
}

static void runner_teardown(void)
{
	kvm_test_reap(base);
}

/* What a host without RDMA says, and why (for the SKIP line). */
static bool have_device(char *why, size_t len)
{
	struct vmig_err err = { 0 };

	if (vmig_transport_rdma_check(&err) == 0)
		return true;
	snprintf(why, len, "%.240s", err.msg);   /* a SKIP line */
	return false;
}

#ifdef HAVE_RDMA
#define NO_RDMA_MSG "no RDMA device (ibv_get_device_list found none"
#else
#define NO_RDMA_MSG "vmig was built without RDMA support (configure --with-rdma)"
#endif

/* ------------------------------------------------------------------------
 * No device needed
 */

START_TEST(migrate_without_rdma)
{
	struct kvm_test_result r;

	start_vm("rdm", "rate=max,wss=2M");
	RUN_A(&r, "migrate", "rdm", "rdma://127.0.0.1:4444");
	ck_assert_msg(r.status == 1, "migrate: exit %d: %s %s", r.status, r.out, r.err);
	ck_assert_msg(strstr(r.err, NO_RDMA_MSG), "migrate said '%s', expected '%s'", r.err,
		      NO_RDMA_MSG);
	ck_assert_msg(strstr(r.err, "rdma://127.0.0.1:4444"), "the error does not name the "
		      "address: %s", r.err);
	ck_assert_msg(strstr(r.err, "keeps running"), "migrate said '%s'", r.err);
#ifdef HAVE_RDMA
	ck_assert_msg(strstr(r.err, "rdma_rxe"), "no hint on what to load: %s", r.err);
#endif
	kvm_test_assert_guest_runs(run_a, "rdm");
	/* An IPv6 address and a name: the same. */
	RUN_A(&r, "migrate", "rdm", "rdma://[::1]:4444", "--json");
	ck_assert_msg(r.status == 1, "migrate: exit %d: %s %s", r.status, r.out, r.err);
	ck_assert_msg(strstr(r.out, NO_RDMA_MSG), "--json said '%s'", r.out);
	RUN_A(&r, "migrate", "rdm", "rdma://localhost:4444");
	ck_assert_msg(r.status == 1 && strstr(r.err, NO_RDMA_MSG), "migrate: exit %d: %s",
		      r.status, r.err);
	/* A malformed rdma:// URI fails before anything is tried. */
	RUN_A(&r, "migrate", "rdm", "rdma://localhost");
	ck_assert_msg(r.status != 0 && strstr(r.err, "missing port"), "migrate: exit %d: %s",
		      r.status, r.err);
	kvm_test_assert_guest_runs(run_a, "rdm");
	RUN_A(&r, "stop", "rdm");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

START_TEST(incoming_without_rdma)
{
	struct kvm_test_result r;

	RUN_B(&r, "incoming", "--listen", "rdma://127.0.0.1:0", "--name", "rdin");
	ck_assert_msg(r.status == 1, "incoming: exit %d: %s %s", r.status, r.out, r.err);
	ck_assert_msg(strstr(r.err, NO_RDMA_MSG), "incoming said '%s'", r.err);
	ck_assert_msg(strstr(r.err, "cannot listen on rdma://127.0.0.1:0"), "%s", r.err);
	ck_assert(!kvm_test_exists_in(run_b, "rdin", "pid") &&
		  !kvm_test_exists_in(run_b, "rdin", "sock"));

	/* --detach: the parent reports the child's failure and exits 1. */
	RUN_B(&r, "incoming", "--listen", "rdma://[::1]:4444", "--name", "rdin", "--detach");
	ck_assert_msg(r.status == 1, "incoming --detach: exit %d: %s %s", r.status, r.out,
		      r.err);
	ck_assert_msg(strstr(r.err, NO_RDMA_MSG), "incoming --detach said '%s'", r.err);
	ck_assert(!kvm_test_exists_in(run_b, "rdin", "pid") &&
		  !kvm_test_exists_in(run_b, "rdin", "sock"));
}
END_TEST

/* ------------------------------------------------------------------------
 * With a device
 */

#ifdef HAVE_RDMA
static void rdma_uri(char *buf, size_t len, int port)
{
	const char *a = getenv("VMIG_TEST_RDMA_ADDR");

	if (!a || !*a)
		a = "127.0.0.1";
	snprintf(buf, len, strchr(a, ':') ? "rdma://[%s]:%d" : "rdma://%s:%d", a, port);
}

/* A port for this test: the CM's port space is not TCP's, so pick one. */
static int test_port(void)
{
	return 20000 + (int)(getpid() % 20000);
}

START_TEST(live_migration_over_rdma)
{
	struct json_object *res, *o;
	struct kvm_test_result r;
	char uri[300];
	uint64_t before;

	rdma_uri(uri, sizeof(uri), test_port());
	start_vm("rdlive", "rate=max,wss=2M");
	o = kvm_test_vm_status(run_a, "rdlive");
	before = kvm_test_pages_written(o);
	json_object_put(o);
	RUN_B(&r, "incoming", "--listen", uri, "--detach");
	ck_assert_msg(r.status == 0, "incoming: exit %d: %s", r.status, r.err);

	RUN_A(&r, "migrate", "rdlive", uri, "--json");
	ck_assert_msg(r.status == 0, "migrate: exit %d: %s %s", r.status, r.out, r.err);
	res = json_tokener_parse(r.out);
	ck_assert_msg(res, "--json printed: %s", r.out);
	ck_assert_msg(!strcmp(json_object_get_string(json_object_object_get(res, "status")),
			      "completed"), "result: %s", r.out);
	json_object_put(res);

	ck_assert(!kvm_test_exists_in(run_a, "rdlive", "pid") &&
		  !kvm_test_exists_in(run_a, "rdlive", "sock"));
	kvm_test_assert_arrived(run_b, "rdlive", before);
	kvm_test_assert_guest_runs(run_b, "rdlive");
	RUN_B(&r, "stop", "rdlive");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

START_TEST(destination_killed_mid_stream)
{
	char uri[300], path[400], pidfile[400], buf[32];
	struct kvm_test_proc mig = { .run_dir = run_a, .out_path = path, .err_path = path };
	struct kvm_test_result r;
	pid_t dst = 0;
	int i;

	rdma_uri(uri, sizeof(uri), test_port() + 1);
	/* Dirtied at full speed, never converges under a 1 ms limit. */
	start_vm("rdkill", "rate=max,wss=48M");
	RUN_B(&r, "incoming", "--listen", uri, "--detach");
	ck_assert_msg(r.status == 0, "incoming: exit %d: %s", r.status, r.err);
	snprintf(path, sizeof(path), "%s/migrate.out", dir);
	kvm_test_spawn(&mig, KVM_TEST_ARGS(vmig_bin, "migrate", "rdkill", uri, "--max-downtime",
					   "1"));
	/* The destination claims the name once CONFIG came: kill it then. */
	snprintf(pidfile, sizeof(pidfile), "%s/rdkill.pid", run_b);
	for (i = 0; i < 1000 && dst <= 0; i++) {
		kvm_test_sleep_ms(10);
		kvm_test_read_file(pidfile, buf, sizeof(buf));
		dst = (pid_t)atoi(buf);
	}
	ck_assert_msg(dst > 0, "the destination never claimed the VM");
	kvm_test_sleep_ms(300);
	ck_assert_int_eq(kill(dst, SIGKILL), 0);

	kvm_test_finish(&mig, &r);
	ck_assert_msg(r.status == 1, "migrate: exit %d: %s", r.status, r.out);
	ck_assert_msg(strstr(r.out, "failed") && strstr(r.out, "keeps running"), "%s", r.out);
	ck_assert_msg(strstr(r.out, "rdma://"), "the error does not name the peer: %s", r.out);
	kvm_test_assert_guest_runs(run_a, "rdkill");
	RUN_A(&r, "stop", "rdkill");
	ck_assert_int_eq(r.status, 0);
}
END_TEST
#endif /* HAVE_RDMA */

int main(void)
{
	Suite *s = suite_create("rdma");
	TCase *tc = tcase_create("no device needed");
	char why[256];
	bool device;

	kvm_test_require_kvm();
	device = have_device(why, sizeof(why));
	tcase_add_unchecked_fixture(tc, runner_setup, runner_teardown);
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 60);
	/* With a device these would connect: the device cases cover it. */
	if (!device) {
		tcase_add_test(tc, migrate_without_rdma);
		tcase_add_test(tc, incoming_without_rdma);
		suite_add_tcase(s, tc);
	}
#ifdef HAVE_RDMA
	if (device) {
		tc = tcase_create("device");
		tcase_add_unchecked_fixture(tc, runner_setup, runner_teardown);
		tcase_add_checked_fixture(tc, setup, teardown);
		tcase_set_timeout(tc, 120);
		tcase_add_test(tc, live_migration_over_rdma);
		tcase_add_test(tc, destination_killed_mid_stream);
		suite_add_tcase(s, tc);
	}
#endif
	if (!device)
		printf("SKIP: the RDMA device cases (live migration over rdma://, destination "
		       "killed mid-stream): %s (see docs/rdma.md to run them with rdma_rxe)\n",
		       why);
	return kvm_test_run(s);
}
