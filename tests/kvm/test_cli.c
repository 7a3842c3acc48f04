/*
 * The vmig command against real KVM, as an admin uses it: separate VMM
 * processes started with `vmig run`, driven over their control sockets
 * by `vmig list|status|pause|resume|stop`, stopped by signals and by the
 * guest, and the errors for a name already running, bad flags, no
 * permission on /dev/kvm and no /dev/kvm at all.
 *
 * Each test has its own VMIG_RUN_DIR.  $VMIG names the binary under test.
 */
#include "config.h"

#include <grp.h>
#include <inttypes.h>
#include <pwd.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <pthread.h>

#include <json-c/json.h>

#include "vmig/stream.h"
#include "vmig/transport.h"
#include "kvm-test.h"

static const char *vmig_bin;
static char run_dir[256];      /* "host A": where VMs start */
static char run_dir_b[300];    /* "host B": where they migrate to */

struct result {
	int status;            /* exit code, or 128 + signal */
	char out[65536];
	char err[65536];
};

static void read_all(int fd, char *buf, size_t cap)
{
	size_t len = 0;
	ssize_t n;

	while (len < cap - 1 && (n = read(fd, buf + len, cap - 1 - len)) != 0) {
		if (n < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		len += n;
	}
	buf[len] = 0;
}

/* Run vmig with @args (NULL-terminated); @pre runs in the child first. */
static void run_vmig_pre(struct result *r, void (*pre)(void), const char *const *args)
{
	const char *argv[32];
	int out[2], err[2], st;
	unsigned int i = 0;
	pid_t pid;

	argv[i++] = vmig_bin;
	while (*args && i < 31)
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
		if (pre)
			pre();
		execv(vmig_bin, (char *const *)argv);
		_exit(127);
	}
	close(out[1]);
	close(err[1]);
	/* A detached VMM keeps no copy of these pipes: it reopens 1 and 2. */
	read_all(err[0], r->err, sizeof(r->err));
	read_all(out[0], r->out, sizeof(r->out));
	close(out[0]);
	close(err[0]);
	ck_assert_int_eq(waitpid(pid, &st, 0), pid);
	r->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

#define RUN(r, ...) run_vmig_pre((r), NULL, (const char *const[]){ __VA_ARGS__, NULL })

static bool exists(const char *name, const char *suffix)
{
	char path[512];

	snprintf(path, sizeof(path), "%s/%s.%s", run_dir, name, suffix);
	return access(path, F_OK) == 0;
}

static void setup(void)
{
	vmig_bin = getenv("VMIG");
	ck_assert_msg(vmig_bin && *vmig_bin, "set VMIG to the vmig binary");
	snprintf(run_dir, sizeof(run_dir), "/tmp/vmig-test-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(run_dir));
	setenv("VMIG_RUN_DIR", run_dir, 1);
	snprintf(run_dir_b, sizeof(run_dir_b), "%s/hostB", run_dir);
}

static void teardown(void)
{
	char cmd[1200];

	/* Anything a failed test left running is stopped, then removed. */
	snprintf(cmd, sizeof(cmd), "umount %s/small 2>/dev/null; ", run_dir);
	if (system(cmd) < 0)
		fprintf(stderr, "umount failed\n");
	snprintf(cmd, sizeof(cmd), "for p in %s/*.pid %s/hostB/*.pid; do [ -s \"$p\" ] && "
		 "kill -9 $(cat \"$p\") 2>/dev/null; done; pkill -9 -f 'incomin[g].*%s' ; rm -rf %s",
		 run_dir, run_dir, run_dir, run_dir);
	if (system(cmd) != 0)
		fprintf(stderr, "cleanup of %s failed\n", run_dir);
}

static struct json_object *status_json(const char *name)
{
	struct result r;
	struct json_object *o;

	RUN(&r, "status", name, "--json");
	ck_assert_msg(r.status == 0, "status %s: exit %d: %s", name, r.status, r.err);
	o = json_tokener_parse(r.out);
	ck_assert_msg(o != NULL, "status --json printed no JSON: %s", r.out);
	return o;
}

static uint64_t jget(struct json_object *o, const char *key)
{
	struct json_object *v;

	ck_assert_msg(json_object_object_get_ex(o, key, &v), "no '%s' in %s", key,
		      json_object_to_json_string(o));
	return json_object_get_uint64(v);
}

static const char *jstate(struct json_object *o)
{
	struct json_object *v;

	ck_assert(json_object_object_get_ex(o, "state", &v));
	return json_object_get_string(v);
}

static uint64_t pages_written_after_boot(const char *name)
{
	uint64_t end = kvm_test_now_ms() + 20000, pw = 0;

	while (kvm_test_now_ms() < end) {
		struct json_object *o = status_json(name);
		struct json_object *v;

		if (json_object_object_get_ex(o, "pages_written", &v))
			pw = json_object_get_uint64(v);
		json_object_put(o);
		if (pw)
			return pw;
		kvm_test_sleep_ms(50);
	}
	ck_abort_msg("guest of %s wrote no page in 20 s", name);
	return 0;
}

static void to_host_b(void)
{
	setenv("VMIG_RUN_DIR", run_dir_b, 1);
}

#define RUN_B(r, ...) run_vmig_pre((r), to_host_b, (const char *const[]){ __VA_ARGS__, NULL })

static bool exists_b(const char *name, const char *suffix)
{
	char path[512];

	snprintf(path, sizeof(path), "%s/%s.%s", run_dir_b, name, suffix);
	return access(path, F_OK) == 0;
}

static struct json_object *status_json_b(const char *name)
{
	struct result r;
	struct json_object *o;

	RUN_B(&r, "status", name, "--json");
	ck_assert_msg(r.status == 0, "status %s on B: exit %d: %s", name, r.status, r.err);
	o = json_tokener_parse(r.out);
	ck_assert_ptr_nonnull(o);
	return o;
}

/* vmig in the background, output to files; returns its pid. */
static pid_t spawn_vmig(const char *tag, const char *const *args)
{
	const char *argv[32];
	char out[512];
	unsigned int i = 0;
	pid_t pid;

	argv[i++] = vmig_bin;
	while (*args && i < 31)
		argv[i++] = *args++;
	argv[i] = NULL;
	snprintf(out, sizeof(out), "%s/%s.out", run_dir, tag);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0600);

		dup2(fd, 1);
		dup2(fd, 2);
		close(fd);
		execv(vmig_bin, (char *const *)argv);
		_exit(127);
	}
	return pid;
}

static int wait_status(pid_t pid, const char *tag, char *out, size_t len)
{
	char path[512];
	int st;
	FILE *f;

	ck_assert_int_eq(waitpid(pid, &st, 0), pid);
	snprintf(path, sizeof(path), "%s/%s.out", run_dir, tag);
	f = fopen(path, "r");
	ck_assert_ptr_nonnull(f);
	read_all(fileno(f), out, len);
	fclose(f);
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static pid_t pid_in(const char *dir, const char *name)
{
	char path[600];
	FILE *f;
	int pid = 0;

	snprintf(path, sizeof(path), "%s/%s.pid", dir, name);
	f = fopen(path, "r");
	if (!f)
		return 0;
	if (fscanf(f, "%d", &pid) != 1)
		pid = 0;
	fclose(f);
	return pid;
}

static void start_pair(const char *name, const char *workload, const char *uri)
{
	struct result r;

	RUN(&r, "run", name, "--memory", "160M", "--vcpus", "2", "--workload", workload,
	    "--detach");
	ck_assert_msg(r.status == 0, "run: %s", r.err);
	pages_written_after_boot(name);
	RUN_B(&r, "incoming", "--listen", uri, "--detach");
	ck_assert_msg(r.status == 0, "incoming: exit %d: %s", r.status, r.err);
}

/*
 * `vmig console NAME` on host B, stdin at end of file: it shows the guest's
 * output until the VM goes away.  Returns its pid; its output goes to
 * RUN_DIR/console.out.
 */
static pid_t console_b(const char *name)
{
	char out[512];
	pid_t pid;

	snprintf(out, sizeof(out), "%s/console.out", run_dir);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0600);
		int null_fd = open("/dev/null", O_RDONLY);

		dup2(null_fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		setenv("VMIG_RUN_DIR", run_dir_b, 1);
		execl(vmig_bin, vmig_bin, "console", name, (char *)NULL);
		_exit(127);
	}
	return pid;
}

/* What `vmig console` printed so far. */
static void console_b_output(char *buf, size_t len)
{
	char path[512];
	FILE *f;

	snprintf(path, sizeof(path), "%s/console.out", run_dir);
	buf[0] = 0;
	f = fopen(path, "r");
	if (f) {
		read_all(fileno(f), buf, len);
		fclose(f);
	}
}

static void migrate_over(const char *uri_fmt, const char *channels)
{
	struct json_object *res, *o;
	char uri[512], out[65536];
	uint64_t before, after, end;
	struct result r;
	pid_t console;
	int st;

	snprintf(uri, sizeof(uri), uri_fmt, run_dir);
	start_pair("mv", "rate=max,wss=2M", uri);
	o = status_json("mv");
	before = jget(o, "pages_written");
	json_object_put(o);

	if (channels)   /* the engine's knobs, through the CLI and vmig incoming */
		RUN(&r, "migrate", "mv", uri, "--json", "--channels", channels,
		    "--compress", "none", "--bandwidth", "1G");
	else
		RUN(&r, "migrate", "mv", uri, "--json");
	ck_assert_msg(r.status == 0, "migrate: exit %d: %s %s", r.status, r.out, r.err);
	res = json_tokener_parse(r.out);
	ck_assert_msg(res, "--json printed: %s", r.out);
	if (channels) {
		struct json_object *pg = json_object_object_get(res, "pages");

		ck_assert_uint_eq(jget(res, "bandwidth_limit_bps"), 1ull << 30);
		ck_assert_msg(pg && jget(pg, "lz4") == 0 && jget(pg, "raw") > 0, "%s", r.out);
	}
	ck_assert_msg(json_object_object_get(res, "status") &&
		      !strcmp(json_object_get_string(json_object_object_get(res, "status")),
			      "completed"), "result: %s", r.out);
	ck_assert_uint_gt(jget(res, "transferred_bytes"), 0);
	ck_assert_uint_ge(jget(res, "iterations"), 1);
	ck_assert(json_object_object_get(res, "total_time_ms") != NULL);
	ck_assert(json_object_object_get(res, "downtime_ms") != NULL);
	json_object_put(res);

	/* The source VMM let go of the VM; host B runs it and it goes on. */
	RUN(&r, "stop", "mv");
	ck_assert_int_eq(r.status, 1);
	ck_assert(!exists("mv", "sock") && !exists("mv", "pid"));
	o = status_json_b("mv");
	ck_assert_str_eq(jstate(o), "running");
	after = jget(o, "pages_written");
	json_object_put(o);
	ck_assert_msg(after > before, "guest counters went back: %" PRIu64 " -> %" PRIu64,
		      before, after);
	kvm_test_sleep_ms(300);
	o = status_json_b("mv");
	ck_assert_uint_gt(jget(o, "pages_written"), after);
	json_object_put(o);
	/* Its console is served on host B too; the guest prints every ~2 s. */
	console = console_b("mv");
	for (end = kvm_test_now_ms() + 15000; kvm_test_now_ms() < end; kvm_test_sleep_ms(100)) {
		console_b_output(out, sizeof(out));
		if (strstr(out, "vmig-guest"))
			break;
	}
	ck_assert_msg(strstr(out, "vmig-guest"), "vmig console on host B showed: '%s'", out);
	RUN_B(&r, "stop", "mv");
	ck_assert_int_eq(r.status, 0);
	ck_assert(!exists_b("mv", "sock") && !exists_b("mv", "pid"));
	/* The VM went away: the console client ends on its own. */
	for (end = kvm_test_now_ms() + 10000; waitpid(console, &st, WNOHANG) == 0;
	     kvm_test_sleep_ms(50))
		ck_assert_msg(kvm_test_now_ms() < end, "vmig console still runs after the VM stopped");
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "vmig console: status 0x%x", st);
}

START_TEST(migrate_tcp)
{
	migrate_over("tcp://127.0.0.1:47391", NULL);
}
END_TEST

START_TEST(migrate_unix)
{
	migrate_over("unix:%s/mig.sock", NULL);
}
END_TEST

START_TEST(migrate_tcp_channels)
{
	migrate_over("tcp://127.0.0.1:47392", "3");
}
END_TEST

START_TEST(migrate_unix_channels)
{
	migrate_over("unix:%s/mig.sock", "2");
}
END_TEST

START_TEST(cancel_keeps_vm_here)
{
	char uri[512], out[8192];
	struct json_object *o;
	struct result r;
	uint64_t a;
	pid_t mig;

	snprintf(uri, sizeof(uri), "unix:%s/mig.sock", run_dir);
	start_pair("cx", "rate=max,wss=48M", uri);
	/* A 1 ms limit with 96 MiB dirtied at full speed never converges. */
	mig = spawn_vmig("mig", (const char *const[]){ "migrate", "cx", uri,
						       "--max-downtime", "1", NULL });
	kvm_test_sleep_ms(700);
	/* status shows the migration in progress, with its figures. */
	o = status_json("cx");
	{
		struct json_object *m = json_object_object_get(o, "migration");

		ck_assert_msg(m, "no migration in %s", json_object_to_json_string(o));
		ck_assert_str_eq(json_object_get_string(json_object_object_get(m, "status")),
				 "active");
		ck_assert_uint_ge(jget(m, "iteration"), 1);
		ck_assert_uint_gt(jget(m, "transferred_bytes"), 0);
		ck_assert(json_object_object_get(m, "expected_downtime_ms") != NULL);
	}
	json_object_put(o);
	RUN(&r, "status", "cx");
	ck_assert_msg(strstr(r.out, "migration:") && strstr(r.out, "active"), "%s", r.out);
	RUN(&r, "pause", "cx");
	ck_assert_int_eq(r.status, 1);
	ck_assert_msg(strstr(r.err, "migration is in progress"), "%s", r.err);
	RUN(&r, "cancel", "cx");
	ck_assert_msg(r.status == 0, "cancel: %s", r.err);
	ck_assert_int_eq(wait_status(mig, "mig", out, sizeof(out)), 1);
	ck_assert_msg(strstr(out, "cancelled") && strstr(out, "keeps running"), "%s", out);
	o = status_json("cx");
	ck_assert_str_eq(jstate(o), "running");
	a = jget(o, "pages_written");
	json_object_put(o);
	kvm_test_sleep_ms(200);
	o = status_json("cx");
	ck_assert_uint_gt(jget(o, "pages_written"), a);
	json_object_put(o);
	/* The destination discarded its half and exited. */
	kvm_test_sleep_ms(500);
	ck_assert(!exists_b("cx", "sock") && !exists_b("cx", "pid"));
}
END_TEST

START_TEST(destination_killed_source_resumes)
{
	char uri[512], out[8192];
	struct json_object *o;
	struct result r;
	uint64_t a;
	pid_t mig, dst = 0;
	int i;

	snprintf(uri, sizeof(uri), "unix:%s/mig.sock", run_dir);
	start_pair("dk", "rate=max,wss=48M", uri);
	mig = spawn_vmig("mig", (const char *const[]){ "migrate", "dk", uri,
						       "--max-downtime", "1", NULL });
	for (i = 0; i < 200 && !dst; i++) {
		kvm_test_sleep_ms(10);
		dst = pid_in(run_dir_b, "dk");
	}
	ck_assert_msg(dst > 0, "the destination never claimed the VM");
	kvm_test_sleep_ms(300);
	ck_assert_int_eq(kill(dst, SIGKILL), 0);
	ck_assert_int_eq(wait_status(mig, "mig", out, sizeof(out)), 1);
	ck_assert_msg(strstr(out, "failed") && strstr(out, "keeps running"), "%s", out);
	o = status_json("dk");
	ck_assert_str_eq(jstate(o), "running");
	a = jget(o, "pages_written");
	json_object_put(o);
	kvm_test_sleep_ms(200);
	o = status_json("dk");
	ck_assert_uint_gt(jget(o, "pages_written"), a);
	json_object_put(o);
	RUN(&r, "stop", "dk");
}
END_TEST

START_TEST(source_killed_destination_discards)
{
	char uri[512], log[600], out[8192];
	struct result r;
	pid_t src, mig, dst = 0;
	int i;
	FILE *f;

	snprintf(uri, sizeof(uri), "unix:%s/mig.sock", run_dir);
	start_pair("sk", "rate=max,wss=48M", uri);
	src = pid_in(run_dir, "sk");
	mig = spawn_vmig("mig", (const char *const[]){ "migrate", "sk", uri,
						       "--max-downtime", "1", NULL });
	for (i = 0; i < 200 && !dst; i++) {
		kvm_test_sleep_ms(10);
		dst = pid_in(run_dir_b, "sk");
	}
	ck_assert_msg(dst > 0, "the destination never claimed the VM");
	kvm_test_sleep_ms(300);
	ck_assert_int_eq(kill(src, SIGKILL), 0);
	wait_status(mig, "mig", out, sizeof(out));
	for (i = 0; i < 500 && kill(dst, 0) == 0; i++)
		kvm_test_sleep_ms(20);
	ck_assert_msg(kill(dst, 0) < 0, "the destination still runs after its source died");
	ck_assert(!exists_b("sk", "sock") && !exists_b("sk", "pid"));
	snprintf(log, sizeof(log), "%s/sk.log", run_dir_b);
	f = fopen(log, "r");
	ck_assert_ptr_nonnull(f);
	read_all(fileno(f), r.out, sizeof(r.out));
	fclose(f);
	ck_assert_msg(strstr(r.out, "vmig: "), "no error in the destination's log: %s", r.out);
}
END_TEST

static const char *stdin_file;

static void stdin_from_file(void)
{
	int fd = open(stdin_file, O_RDONLY);

	if (fd < 0 || dup2(fd, 0) < 0)
		_exit(126);
	close(fd);
}

/* vmig incoming --stdio fed a damaged stream: a clear error, nothing left. */
static void incoming_refuses(const char *file, const char *want)
{
	struct result r;

	stdin_file = file;
	run_vmig_pre(&r, stdin_from_file, (const char *const[]){ "incoming", "--stdio", NULL });
	ck_assert_msg(r.status == 1, "incoming --stdio < %s: exit %d: %s", file, r.status, r.err);
	ck_assert_msg(strstr(r.err, want), "incoming said '%s', expected '%s'", r.err, want);
	ck_assert(!exists("sv", "sock") && !exists("sv", "pid"));
}

/* A destination that says READY, reads COMMIT and vanishes. */
static void *vanishing_destination(void *arg)
{
	struct vmig_listener *l = arg;
	struct vmig_transport *t = NULL;
	struct vmig_stream_reader *rd = NULL;
	struct vmig_stream_writer *w = NULL;
	struct vmig_err err = { 0 };
	struct vmig_record rec;

	if (vmig_transport_accept(l, 30000, &t, &err))
		return NULL;
	vmig_stream_reader_create(t, VMIG_STREAM_FORWARD, &rd);
	vmig_stream_writer_create(t, VMIG_STREAM_REVERSE, &w);
	vmig_stream_write_header(w);
	vmig_stream_flush(w);
	if (vmig_stream_read_header(rd, &err) == 0) {
		while (vmig_stream_read_record(rd, &rec, &err) == 0) {
			if (rec.type == VMIG_REC_ITER_END) {
				uint64_t body[2] = { 0, 0 };

				memcpy(body, rec.body, 8);
				vmig_stream_write_record(w, VMIG_REC_ITER_DONE, 0, body,
							 sizeof(body));
				vmig_stream_flush(w);
			}
			if (rec.type == VMIG_REC_SWITCHOVER)
				break;
		}
		vmig_stream_write_record(w, VMIG_REC_READY, 0, NULL, 0);
		vmig_stream_flush(w);
		vmig_stream_read_record(rd, &rec, &err);   /* COMMIT */
	}
	vmig_stream_reader_destroy(rd);
	vmig_stream_writer_destroy(w);
	vmig_transport_close(t);
	return NULL;
}

START_TEST(handoff_uncertain_needs_the_admin)
{
	struct vmig_listener *l = NULL;
	struct vmig_err err = { 0 };
	struct json_object *o;
	struct result r;
	char uri[512];
	pthread_t th;
	uint64_t a;

	snprintf(uri, sizeof(uri), "unix:%s/fake.sock", run_dir);
	RUN(&r, "run", "hu", "--memory", "64M", "--workload", "rate=2000,wss=2M", "--detach");
	ck_assert_int_eq(r.status, 0);
	pages_written_after_boot("hu");
	ck_assert_int_eq(vmig_transport_listen(uri, &l, &err), 0);
	ck_assert_int_eq(pthread_create(&th, NULL, vanishing_destination, l), 0);
	RUN(&r, "migrate", "hu", uri);
	pthread_join(th, NULL);
	vmig_listener_close(l);
	ck_assert_int_eq(r.status, 1);
	ck_assert_msg(strstr(r.err, "handoff-uncertain") && strstr(r.err, "resume --force"),
		      "migrate said: %s", r.err);

	/* Held paused here; status says so and says what to do. */
	o = status_json("hu");
	ck_assert_str_eq(jstate(o), "handoff-uncertain");
	a = jget(o, "pages_written");
	json_object_put(o);
	RUN(&r, "status", "hu");
	ck_assert_msg(strstr(r.out, "uncertain") && strstr(r.out, "resume --force"), "%s", r.out);
	kvm_test_sleep_ms(200);
	o = status_json("hu");
	ck_assert_uint_eq(jget(o, "pages_written"), a);
	json_object_put(o);

	/* A plain resume is refused; the admin's --force resumes. */
	RUN(&r, "resume", "hu");
	ck_assert_int_eq(r.status, 1);
	ck_assert_msg(strstr(r.err, "uncertain"), "%s", r.err);
	RUN(&r, "resume", "--force", "hu");
	ck_assert_msg(r.status == 0, "resume --force: %s", r.err);
	kvm_test_sleep_ms(300);
	o = status_json("hu");
	ck_assert_str_eq(jstate(o), "running");
	ck_assert_uint_gt(jget(o, "pages_written"), a);
	json_object_put(o);
	RUN(&r, "stop", "hu");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

START_TEST(save_to_full_disk)
{
	char dir[512], file[600], old[700];
	struct json_object *o;
	struct result r;
	uint64_t a;
	FILE *f;

	if (geteuid() != 0) {
		printf("note: save_to_full_disk needs root to mount a small tmpfs\n");
		return;
	}
	snprintf(dir, sizeof(dir), "%s/small", run_dir);
	ck_assert_int_eq(mkdir(dir, 0700), 0);
	ck_assert_msg(mount("tmpfs", dir, "tmpfs", 0, "size=16k") == 0, "mount: %s",
		      strerror(errno));
	snprintf(file, sizeof(file), "%s/vm.vmig", dir);
	/* An older save of that name must survive a failed one. */
	f = fopen(file, "w");
	ck_assert_ptr_nonnull(f);
	fputs("older save", f);
	fclose(f);

	RUN(&r, "run", "fd", "--memory", "64M", "--workload", "rate=max,wss=4M", "--detach");
	ck_assert_int_eq(r.status, 0);
	pages_written_after_boot("fd");
	RUN(&r, "save", "fd", file);
	ck_assert_msg(r.status == 1, "save to a full disk: exit %d: %s", r.status, r.out);
	ck_assert_msg(strstr(r.err, "no space left") || strstr(r.err, "No space left"),
		      "message does not say the disk is full: %s", r.err);
	o = status_json("fd");
	ck_assert_str_eq(jstate(o), "running");
	a = jget(o, "pages_written");
	json_object_put(o);
	kvm_test_sleep_ms(200);
	o = status_json("fd");
	ck_assert_uint_gt(jget(o, "pages_written"), a);
	json_object_put(o);
	f = fopen(file, "r");
	ck_assert_ptr_nonnull(f);
	ck_assert_ptr_nonnull(fgets(old, sizeof(old), f));
	fclose(f);
	ck_assert_str_eq(old, "older save");
	snprintf(old, sizeof(old), "ls %s | grep -c partial >/dev/null", dir);
	ck_assert_msg(system(old) != 0, "a partial file was left in %s", dir);
	RUN(&r, "stop", "fd");
	umount(dir);
}
END_TEST

START_TEST(incoming_ends_on_sigterm_while_waiting)
{
	char uri[512], out[4096];
	struct stat sb;
	pid_t pid;
	int i;

	/* Foreground incoming, signalled while it waits: it must end, now. */
	snprintf(uri, sizeof(uri), "unix:%s/wait.sock", run_dir);
	pid = spawn_vmig("inc", (const char *const[]){ "incoming", "--listen", uri, NULL });
	for (i = 0; i < 250 && stat(uri + 5, &sb) < 0; i++)
		kvm_test_sleep_ms(20);
	ck_assert_msg(i < 250, "incoming never listened");
	ck_assert_int_eq(kill(pid, SIGTERM), 0);
	ck_assert_int_eq(wait_status(pid, "inc", out, sizeof(out)), 1);
	ck_assert_msg(strstr(out, "before the handoff"), "incoming said: %s", out);
}
END_TEST

START_TEST(save_to_a_device_keeps_it)
{
	struct result r;
	struct stat sb;

	RUN(&r, "run", "dv", "--memory", "32M", "--workload", "rate=100,wss=256K", "--detach");
	ck_assert_int_eq(r.status, 0);
	pages_written_after_boot("dv");
	RUN(&r, "save", "dv", "/dev/null", "--keep-running");
	ck_assert_msg(r.status == 0, "save to /dev/null: %s", r.err);
	ck_assert_int_eq(stat("/dev/null", &sb), 0);
	ck_assert_msg(S_ISCHR(sb.st_mode), "/dev/null is no longer a device");
	RUN(&r, "stop", "dv");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

START_TEST(save_and_restore)
{
	char file[512], bad[600], cmd[2000];
	struct json_object *o;
	struct result r;
	struct stat sb;
	uint64_t saved;

	snprintf(file, sizeof(file), "%s/sv.vmig", run_dir);
	RUN(&r, "run", "sv", "--memory", "64M", "--workload", "rate=max,wss=2M", "--detach");
	ck_assert_int_eq(r.status, 0);
	pages_written_after_boot("sv");
	RUN(&r, "save", "sv", file);
	ck_assert_msg(r.status == 0, "save: %s %s", r.out, r.err);
	ck_assert_msg(strstr(r.out, "completed"), "%s", r.out);
	/* save stops the VM once the file is complete. */
	ck_assert(!exists("sv", "sock") && !exists("sv", "pid"));

	/* Damaged copies are refused, and leave nothing running. */
	snprintf(bad, sizeof(bad), "%s/bad.vmig", run_dir);
	ck_assert_int_eq(stat(file, &sb), 0);
	ck_assert_int_gt(sb.st_size, 10000);
	snprintf(cmd, sizeof(cmd), "head -c %lld %s > %s", (long long)sb.st_size / 2, file, bad);
	ck_assert_int_eq(system(cmd), 0);
	RUN(&r, "restore", bad);
	ck_assert_int_eq(r.status, 1);
	ck_assert_msg(strstr(r.err, "truncated") || strstr(r.err, "ends"),
		      "message does not say the stream is cut short: %s", r.err);
	ck_assert(!exists("sv", "sock") && !exists("sv", "pid"));
	incoming_refuses(bad, "vmig:");
	snprintf(cmd, sizeof(cmd), "cp %s %s && printf '\\377' | dd of=%s bs=1 seek=5000 "
		 "conv=notrunc 2>/dev/null", file, bad, bad);
	ck_assert_int_eq(system(cmd), 0);
	RUN(&r, "restore", bad);
	ck_assert_int_eq(r.status, 1);
	ck_assert_msg(strstr(r.err, "checksum") || strstr(r.err, "CRC") ||
		      strstr(r.err, "corrupt"), "message does not say what is wrong: %s", r.err);
	incoming_refuses(bad, "checksum");
	incoming_refuses("/dev/null", "vmig:");

	RUN(&r, "restore", file, "--detach");
	ck_assert_msg(r.status == 0, "restore: %s", r.err);
	o = status_json("sv");
	ck_assert_str_eq(jstate(o), "running");
	saved = jget(o, "pages_written");
	json_object_put(o);
	kvm_test_sleep_ms(300);
	o = status_json("sv");
	ck_assert_uint_gt(jget(o, "pages_written"), saved);
	json_object_put(o);
	RUN(&r, "stop", "sv");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

START_TEST(detached_vm_lifecycle)
{
	struct json_object *o;
	uint64_t a, b, c;
	struct result r;

	RUN(&r, "run", "lc", "--memory", "64M", "--vcpus", "2", "--workload",
	    "rate=max,wss=1M", "--detach");
	ck_assert_msg(r.status == 0, "run --detach: exit %d: %s", r.status, r.err);
	ck_assert_msg(strstr(r.out, "running"), "run printed: %s", r.out);
	ck_assert(exists("lc", "sock"));
	ck_assert(exists("lc", "pid"));

	a = pages_written_after_boot("lc");
	o = status_json("lc");
	ck_assert_str_eq(jstate(o), "running");
	ck_assert_uint_eq(jget(o, "vcpus"), 2);
	ck_assert_uint_eq(jget(o, "memory"), 64 << 20);
	ck_assert_uint_ge(jget(o, "pid"), 2);
	json_object_put(o);

	RUN(&r, "list");
	ck_assert_int_eq(r.status, 0);
	ck_assert_msg(strstr(r.out, "lc") && strstr(r.out, "running"), "list: %s", r.out);

	RUN(&r, "status", "lc");
	ck_assert_int_eq(r.status, 0);
	ck_assert_msg(strstr(r.out, "generation:") && strstr(r.out, "pages_written:"),
		      "status: %s", r.out);

	RUN(&r, "pause", "lc");
	ck_assert_msg(r.status == 0, "pause: %s", r.err);
	o = status_json("lc");
	ck_assert_str_eq(jstate(o), "paused");
	b = jget(o, "pages_written");
	json_object_put(o);
	ck_assert_uint_ge(b, a);
	kvm_test_sleep_ms(300);
	o = status_json("lc");
	ck_assert_uint_eq(jget(o, "pages_written"), b);
	json_object_put(o);

	RUN(&r, "resume", "lc");
	ck_assert_msg(r.status == 0, "resume: %s", r.err);
	/* Progress resumes (give a loaded machine a few seconds). */
	for (c = b, a = 0; c == b && a < 100; a++) {
		kvm_test_sleep_ms(50);
		o = status_json("lc");
		ck_assert_str_eq(jstate(o), "running");
		c = jget(o, "pages_written");
		json_object_put(o);
	}
	ck_assert_msg(c > b, "no progress after resume: %" PRIu64 " -> %" PRIu64, b, c);

	RUN(&r, "stop", "lc");
	ck_assert_msg(r.status == 0, "stop: %s", r.err);
	ck_assert_msg(!exists("lc", "sock") && !exists("lc", "pid"),
		      "stop left the socket or pid file behind");
	RUN(&r, "status", "lc");
	ck_assert_int_eq(r.status, 1);
	ck_assert_msg(strstr(r.err, "no VM named 'lc'"), "status after stop: %s", r.err);
}
END_TEST

START_TEST(name_already_running)
{
	struct result r;

	RUN(&r, "run", "dup", "--memory", "32M", "--detach");
	ck_assert_msg(r.status == 0, "run: %s", r.err);
	RUN(&r, "run", "dup", "--memory", "32M", "--detach");
	ck_assert_int_eq(r.status, 1);
	ck_assert_msg(strstr(r.err, "already running"), "stderr: %s", r.err);
	RUN(&r, "run", "dup", "--memory", "32M");
	ck_assert_int_eq(r.status, 1);
	ck_assert_msg(strstr(r.err, "already running"), "stderr: %s", r.err);
	RUN(&r, "stop", "dup");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

static pid_t read_pid(const char *name)
{
	char path[512];
	FILE *f;
	int pid = 0;

	snprintf(path, sizeof(path), "%s/%s.pid", run_dir, name);
	f = fopen(path, "r");
	ck_assert_ptr_nonnull(f);
	ck_assert_int_eq(fscanf(f, "%d", &pid), 1);
	fclose(f);
	return pid;
}

static void wait_gone(pid_t pid, const char *name)
{
	uint64_t end = kvm_test_now_ms() + 20000;

	while (kill(pid, 0) == 0) {
		ck_assert_msg(kvm_test_now_ms() < end, "VMM %d still alive", (int)pid);
		kvm_test_sleep_ms(20);
	}
	ck_assert_msg(!exists(name, "sock") && !exists(name, "pid"),
		      "VMM of %s left its socket or pid file", name);
}

/*
 * vmig shutdown: the built-in guest powers itself off when asked; the VMM
 * ends as on any guest power-off and says so in its log.  A paused guest
 * cannot do it: refused, and it stays.
 */
START_TEST(shutdown_asks_the_guest)
{
	struct result r;
	char path[512], log[8192];

	RUN(&r, "run", "sd", "--memory", "64M", "--workload", "rate=1000,wss=4M", "--detach");
	ck_assert_msg(r.status == 0, "run: %s", r.err);
	pages_written_after_boot("sd");
	RUN(&r, "pause", "sd");
	ck_assert_int_eq(r.status, 0);
	RUN(&r, "shutdown", "sd");
	ck_assert_int_eq(r.status, 1);
	ck_assert_msg(strstr(r.err, "paused"), "%s", r.err);
	RUN(&r, "resume", "sd");
	ck_assert_int_eq(r.status, 0);
	RUN(&r, "shutdown", "sd");
	ck_assert_msg(r.status == 0, "shutdown: exit %d: %s", r.status, r.err);
	ck_assert_msg(strstr(r.out, "shut down"), "%s", r.out);
	ck_assert(!exists("sd", "sock") && !exists("sd", "pid"));
	snprintf(path, sizeof(path), "%s/sd.log", run_dir);
	{
		FILE *f = fopen(path, "r");

		ck_assert_msg(f, "no %s", path);
		read_all(fileno(f), log, sizeof(log));
		fclose(f);
	}
	ck_assert_msg(strstr(log, "shutdown:") && strstr(log, "power"), "log: %s", log);
}
END_TEST

START_TEST(sigterm_stops_cleanly)
{
	struct result r;
	pid_t pid;
	char log[512];
	FILE *f;

	RUN(&r, "run", "sig", "--memory", "32M", "--detach");
	ck_assert_msg(r.status == 0, "run: %s", r.err);
	pid = read_pid("sig");
	pages_written_after_boot("sig");
	ck_assert_int_eq(kill(pid, SIGTERM), 0);
	wait_gone(pid, "sig");
	snprintf(log, sizeof(log), "%s/sig.log", run_dir);
	f = fopen(log, "r");
	ck_assert_ptr_nonnull(f);
	read_all(fileno(f), r.out, sizeof(r.out));
	fclose(f);
	ck_assert_msg(strstr(r.out, "vmig-guest"), "console log lacks the guest banner: %s",
		      r.out);
	ck_assert_msg(strstr(r.out, "stopping"), "log lacks the stop: %s", r.out);
}
END_TEST

START_TEST(foreground_guest_power_off)
{
	struct result r;

	RUN(&r, "run", "fg", "--memory", "32M", "--workload", "rate=max,wss=256K,gens=10");
	ck_assert_msg(r.status == 0, "exit %d: %s", r.status, r.err);
	ck_assert_msg(strstr(r.out, "vmig-guest"), "no guest banner on stdout: %s", r.out);
	ck_assert_msg(strstr(r.err, "powered off"), "stderr: %s", r.err);
	ck_assert(!exists("fg", "sock") && !exists("fg", "pid"));
}
END_TEST

START_TEST(bad_flags)
{
	static const char *const cases[][8] = {
		{ "run", "x", "--memory", "lots", NULL },
		{ "run", "x", "--vcpus", "0", NULL },
		{ "run", "x", "--vcpus", "3x", NULL },
		{ "run", "x", "--frobnicate", NULL },
		{ "run", NULL },
		{ "status", NULL },
		{ "status", "a", "b", NULL },
		{ "launch", NULL },
		{ "migrate", "x", "tcp://127.0.0.1:1", "--channels", "9", NULL },
		{ "migrate", "x", "rdma://h:1", "--channels", "2", NULL },
		{ "migrate", "x", "tcp://127.0.0.1:1", "--compress", "zstd", NULL },
		{ "migrate", "x", "tcp://127.0.0.1:1", "--bandwidth", "0", NULL },
		{ "migrate", "x", "tcp://127.0.0.1:1", "--max-throttle", "100", NULL },
		{ "incoming", "--listen", "tcp://127.0.0.1:1", "--prealloc", "3M", NULL },
	};
	struct result r;
	size_t i;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		run_vmig_pre(&r, NULL, cases[i]);
		ck_assert_msg(r.status == 2, "case %zu (%s): exit %d, want 2: %s", i,
			      cases[i][0], r.status, r.err);
		ck_assert_msg(strlen(r.err) > 10, "case %zu: no message", i);
	}
	RUN(&r, "run", "bad/name");
	ck_assert_int_eq(r.status, 1);
	ck_assert_msg(strstr(r.err, "bad VM name"), "%s", r.err);
	RUN(&r, "run", "big", "--memory", "64T");
	ck_assert_int_eq(r.status, 1);
	ck_assert_msg(strstr(r.err, "cannot give the guest"), "%s", r.err);
	ck_assert(!exists("big", "sock") && !exists("big", "pid"));
	RUN(&r, "run", "wl", "--workload", "rate=-3");
	ck_assert_int_eq(r.status, 1);
	ck_assert_msg(strstr(r.err, "rate"), "%s", r.err);
	RUN(&r, "--help");
	ck_assert_int_eq(r.status, 0);
	ck_assert_msg(strstr(r.out, "run") && strstr(r.out, "status"), "%s", r.out);
}
END_TEST

static void drop_to_nobody(void)
{
	struct passwd *pw = getpwnam("nobody");

	if (!pw || setgroups(0, NULL) < 0 || setgid(pw->pw_gid) < 0 || setuid(pw->pw_uid) < 0)
		_exit(126);
}

START_TEST(no_permission_on_kvm)
{
	struct result r;
	struct stat st;

	ck_assert_int_eq(stat("/dev/kvm", &st), 0);
	if (geteuid() != 0 || (st.st_mode & 0006)) {
		printf("note: no_permission_on_kvm needs root and a /dev/kvm closed to others\n");
		return;
	}
	ck_assert_int_eq(chmod(run_dir, 0777), 0);
	run_vmig_pre(&r, drop_to_nobody,
		     (const char *const[]){ "run", "perm", "--memory", "32M", NULL });
	ck_assert_msg(r.status == 1, "exit %d: %s", r.status, r.err);
	ck_assert_msg(strstr(r.err, "permission denied") && strstr(r.err, "group kvm"),
		      "stderr: %s", r.err);
}
END_TEST

static void hide_dev_kvm(void)
{
	/* A private mount namespace where /dev has no kvm node. */
	if (unshare(CLONE_NEWNS) < 0 ||
	    mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0 ||
	    mount("tmpfs", "/dev", "tmpfs", 0, "mode=0755") < 0)
		_exit(126);
}

START_TEST(no_dev_kvm)
{
	struct result r;

	if (geteuid() != 0) {
		printf("note: no_dev_kvm needs root for a mount namespace\n");
		return;
	}
	run_vmig_pre(&r, hide_dev_kvm,
		     (const char *const[]){ "run", "nokvm", "--memory", "32M", NULL });
	ck_assert_msg(r.status == 1, "exit %d: %s", r.status, r.err);
	ck_assert_msg(strstr(r.err, "/dev/kvm") && strstr(r.err, "no such device"),
		      "stderr: %s", r.err);
	ck_assert(!exists("nokvm", "sock") && !exists("nokvm", "pid"));
}
END_TEST

int main(void)
{
	Suite *s = suite_create("cli");
	TCase *tc = tcase_create("cli");

	kvm_test_require_kvm();
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, detached_vm_lifecycle);
	tcase_add_test(tc, name_already_running);
	tcase_add_test(tc, sigterm_stops_cleanly);
	tcase_add_test(tc, shutdown_asks_the_guest);
	tcase_add_test(tc, foreground_guest_power_off);
	tcase_add_test(tc, bad_flags);
	tcase_add_test(tc, no_permission_on_kvm);
	tcase_add_test(tc, no_dev_kvm);
	suite_add_tcase(s, tc);
	{
		TCase *mig = tcase_create("migrate");

		tcase_add_checked_fixture(mig, setup, teardown);
		tcase_set_timeout(mig, 120);
		tcase_add_test(mig, migrate_tcp);
		tcase_add_test(mig, migrate_unix);
		tcase_add_test(mig, migrate_tcp_channels);
		tcase_add_test(mig, migrate_unix_channels);
		tcase_add_test(mig, cancel_keeps_vm_here);
		tcase_add_test(mig, destination_killed_source_resumes);
		tcase_add_test(mig, source_killed_destination_discards);
		tcase_add_test(mig, save_and_restore);
		tcase_add_test(mig, save_to_full_disk);
		tcase_add_test(mig, save_to_a_device_keeps_it);
		tcase_add_test(mig, incoming_ends_on_sigterm_while_waiting);
		tcase_add_test(mig, handoff_uncertain_needs_the_admin);
		suite_add_tcase(s, mig);
	}
	return kvm_test_run(s);
}
