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
#include <sys/stat.h>
#include <sys/wait.h>

#ifdef HAVE_RDMA
#include <infiniband/verbs.h>
#endif
#include <json-c/json.h>

#include "kvm-test.h"
#include "proc-test.h"

static const char *vmig_bin;
static char base[128];
static char dir[256];
static char run_a[300];
static char run_b[300];

struct result {
	int status;            /* exit code, or 128 + signal */
	char out[65536];
	char err[65536];
};

/* Run vmig with @args and @run_dir as VMIG_RUN_DIR. */
static void run_vmig(struct result *r, const char *run_dir, const char *const *args)
{
	const char *argv[40];
	unsigned int i = 0;
	int out[2], err[2], st;
	pid_t pid;

	argv[i++] = vmig_bin;
	while (*args && i < 39)
		argv[i++] = *args++;
	argv[i] = NULL;
	ck_assert_int_eq(pipe(out), 0);
	ck_assert_int_eq(pipe(err), 0);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		dup2(out[1], 1);
		dup2(err[1], 2);
		close(out[0]);
		close(err[0]);
		close(out[1]);
		close(err[1]);
		setenv("VMIG_RUN_DIR", run_dir, 1);
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	close(out[1]);
	close(err[1]);
	kvm_test_read_all(err[0], r->err, sizeof(r->err));
	kvm_test_read_all(out[0], r->out, sizeof(r->out));
	close(out[0]);
	close(err[0]);
	ck_assert_int_eq(waitpid(pid, &st, 0), pid);
	r->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

#define RUN_A(r, ...) run_vmig((r), run_a, (const char *const[]){ __VA_ARGS__, NULL })
#define RUN_B(r, ...) run_vmig((r), run_b, (const char *const[]){ __VA_ARGS__, NULL })

static bool exists_in(const char *run_dir, const char *name, const char *suffix)
{
	char path[512];

	snprintf(path, sizeof(path), "%s/%s.%s", run_dir, name, suffix);
	return access(path, F_OK) == 0;
}

static struct json_object *status_json(const char *run_dir, const char *name)
{
	struct result r;
	struct json_object *o;

	run_vmig(&r, run_dir, (const char *const[]){ "status", name, "--json", NULL });
	ck_assert_msg(r.status == 0, "status %s in %s: exit %d: %s", name, run_dir, r.status,
		      r.err);
	o = json_tokener_parse(r.out);
	ck_assert_msg(o != NULL, "status --json printed no JSON: %s", r.out);
	return o;
}

static uint64_t pages_written(struct json_object *o)
{
	struct json_object *v;

	return json_object_object_get_ex(o, "pages_written", &v) ? json_object_get_uint64(v) : 0;
}

static const char *jstate(struct json_object *o)
{
	struct json_object *v;

	ck_assert(json_object_object_get_ex(o, "state", &v));
	return json_object_get_string(v);
}

/* The guest of @name in @run_dir runs: its page counter moves. */
static void assert_guest_runs(const char *run_dir, const char *name)
{
	struct json_object *o = status_json(run_dir, name);
	uint64_t a, b, end = kvm_test_now_ms() + 5000;

	ck_assert_str_eq(jstate(o), "running");
	a = pages_written(o);
	json_object_put(o);
	do {
		kvm_test_sleep_ms(100);
		o = status_json(run_dir, name);
		b = pages_written(o);
		json_object_put(o);
	} while (b <= a && kvm_test_now_ms() < end);
	ck_assert_msg(b > a, "the guest of %s in %s made no progress: %" PRIu64 " -> %" PRIu64,
		      name, run_dir, a, b);
}

static void start_vm(const char *name, const char *workload)
{
	struct result r;
	uint64_t end = kvm_test_now_ms() + 20000;

	RUN_A(&r, "run", name, "--memory", "96M", "--vcpus", "1", "--workload", workload,
	      "--detach");
	ck_assert_msg(r.status == 0, "run: %s", r.err);
	while (kvm_test_now_ms() < end) {
		struct json_object *o = status_json(run_a, name);
		uint64_t pw = pages_written(o);

		json_object_put(o);
		if (pw)
			return;
		kvm_test_sleep_ms(50);
	}
	ck_abort_msg("guest of %s wrote no page in 20 s", name);
}

/* Stop whatever runs from @path (VMMs), remove it all. */
static void reap(const char *path)
{
	char cmd[1024];

	snprintf(cmd, sizeof(cmd), "for p in %s/*.pid %s/*/*.pid %s/*/*/*.pid; do "
		 "[ -s \"$p\" ] && kill -9 $(cat \"$p\") 2>/dev/null; done; rm -rf %s",
		 path, path, path, path);
	if (system(cmd) != 0)
		fprintf(stderr, "cleanup of %s failed\n", path);
}

static void setup(void)
{
	vmig_bin = getenv("VMIG");
	ck_assert_msg(vmig_bin && *vmig_bin, "set VMIG to the vmig binary");
	snprintf(dir, sizeof(dir), "%s/t-XXXXXX", base);
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(run_a, sizeof(run_a), "%s/A", dir);
	snprintf(run_b, sizeof(run_b), "%s/B", dir);
	ck_assert_int_eq(mkdir(run_a, 0700), 0);
	ck_assert_int_eq(mkdir(run_b, 0700), 0);
}

static void teardown(void)
{
	reap(dir);
}

static void runner_setup(void)
{
	snprintf(base, sizeof(base), "/tmp/vmig-rdma-XXXXXX");
	if (!mkdtemp(base)) {
		perror("mkdtemp");
		exit(EXIT_FAILURE);
	}
}

static void runner_teardown(void)
{
	reap(base);
}

/* What a host without RDMA says, and why (for the SKIP line). */
static bool have_device(char *why, size_t len)
{
#ifdef HAVE_RDMA
	struct ibv_device **list;
	int n = 0;

	errno = 0;
	list = ibv_get_device_list(&n);
	if (list)
		ibv_free_device_list(list);
	if (list && n > 0)
		return true;
	snprintf(why, len, "no RDMA device: ibv_get_device_list found none (%s)",
		 errno ? strerror(errno) : "empty list");
	return false;
#else
	snprintf(why, len, "vmig was built without RDMA support");
	return false;
#endif
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
	struct result r;

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
	assert_guest_runs(run_a, "rdm");
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
	assert_guest_runs(run_a, "rdm");
	RUN_A(&r, "stop", "rdm");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

START_TEST(incoming_without_rdma)
{
	struct result r;

	RUN_B(&r, "incoming", "--listen", "rdma://127.0.0.1:0", "--name", "rdin");
	ck_assert_msg(r.status == 1, "incoming: exit %d: %s %s", r.status, r.out, r.err);
	ck_assert_msg(strstr(r.err, NO_RDMA_MSG), "incoming said '%s'", r.err);
	ck_assert_msg(strstr(r.err, "cannot listen on rdma://127.0.0.1:0"), "%s", r.err);
	ck_assert(!exists_in(run_b, "rdin", "pid") && !exists_in(run_b, "rdin", "sock"));

	/* --detach: the parent reports the child's failure and exits 1. */
	RUN_B(&r, "incoming", "--listen", "rdma://[::1]:4444", "--name", "rdin", "--detach");
	ck_assert_msg(r.status == 1, "incoming --detach: exit %d: %s %s", r.status, r.out,
		      r.err);
	ck_assert_msg(strstr(r.err, NO_RDMA_MSG), "incoming --detach said '%s'", r.err);
	ck_assert(!exists_in(run_b, "rdin", "pid") && !exists_in(run_b, "rdin", "sock"));
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
	struct result r;
	char uri[300];
	uint64_t before, after;

	rdma_uri(uri, sizeof(uri), test_port());
	start_vm("rdlive", "rate=max,wss=2M");
	o = status_json(run_a, "rdlive");
	before = pages_written(o);
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

	ck_assert(!exists_in(run_a, "rdlive", "pid") && !exists_in(run_a, "rdlive", "sock"));
	o = status_json(run_b, "rdlive");
	ck_assert_str_eq(jstate(o), "running");
	after = pages_written(o);
	json_object_put(o);
	ck_assert_msg(after > before, "guest counters went back: %" PRIu64 " -> %" PRIu64,
		      before, after);
	assert_guest_runs(run_b, "rdlive");
	RUN_B(&r, "stop", "rdlive");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

START_TEST(destination_killed_mid_stream)
{
	char uri[300], out[8192], path[400], pidfile[400], buf[32];
	const char *argv[10];
	struct result r;
	pid_t mig, dst = 0;
	int i, st, fd;

	rdma_uri(uri, sizeof(uri), test_port() + 1);
	/* Dirtied at full speed, never converges under a 1 ms limit. */
	start_vm("rdkill", "rate=max,wss=48M");
	RUN_B(&r, "incoming", "--listen", uri, "--detach");
	ck_assert_msg(r.status == 0, "incoming: exit %d: %s", r.status, r.err);
	argv[0] = vmig_bin;
	argv[1] = "migrate";
	argv[2] = "rdkill";
	argv[3] = uri;
	argv[4] = "--max-downtime";
	argv[5] = "1";
	argv[6] = NULL;
	snprintf(path, sizeof(path), "%s/migrate.out", dir);
	mig = fork();
	ck_assert_int_ge(mig, 0);
	if (mig == 0) {
		fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
		dup2(fd, 1);
		dup2(fd, 2);
		setenv("VMIG_RUN_DIR", run_a, 1);
		execv(vmig_bin, (char *const *)argv);
		_exit(127);
	}
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

	ck_assert_int_eq(waitpid(mig, &st, 0), mig);
	kvm_test_read_file(path, out, sizeof(out));
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 1, "migrate: %d: %s", st, out);
	ck_assert_msg(strstr(out, "failed") && strstr(out, "keeps running"), "%s", out);
	ck_assert_msg(strstr(out, "rdma://"), "the error does not name the peer: %s", out);
	assert_guest_runs(run_a, "rdkill");
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
