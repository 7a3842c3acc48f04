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

#include <pthread.h>

#include <json-c/json.h>

#include "vmig/stream.h"
#include "vmig/transport.h"
#include "kvm-test.h"
#include "proc-test.h"

static const char *vmig_bin;
static char run_dir[256];      /* "host A": where VMs start */
static char run_dir_b[300];    /* "host B": where they migrate to */

/* Run vmig with @args (NULL-terminated); @pre runs in the child first. */
static void run_vmig_pre(struct kvm_test_result *r, void (*pre)(void), const char *const *args)
{
	struct kvm_test_proc how = { .pre = pre };
	const char *argv[32];

	kvm_test_vmig_argv(argv, 32, args);
	kvm_test_run_argv(r, &how, argv);
}

#define RUN(r, ...) KVM_TEST_VMIG((r), NULL, __VA_ARGS__)

static bool exists(const char *name, const char *suffix)
{
	return kvm_test_exists_in(run_dir, name, suffix);
}

static void setup(void)
{
	vmig_bin = kvm_test_vmig_bin();
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

#define RUN_B(r, ...) KVM_TEST_VMIG((r), run_dir_b, __VA_ARGS__)

static bool exists_b(const char *name, const char *suffix)
{
	return kvm_test_exists_in(run_dir_b, name, suffix);
}

/* vmig in the background. */
struct bg_vmig {
	struct kvm_test_proc proc;
	char path[512];        /* its stdout and stderr: RUN_DIR/TAG.out */
};

static void spawn_vmig(struct bg_vmig *b, const char *tag, const char *const *args)
{
	const char *argv[32];

	kvm_test_vmig_argv(argv, 32, args);
	snprintf(b->path, sizeof(b->path), "%s/%s.out", run_dir, tag);
	b->proc = (struct kvm_test_proc){ .out_path = b->path, .err_path = b->path };
	kvm_test_spawn(&b->proc, argv);
}

/* Wait for @b; its exit status, what it printed in @out. */
static int wait_status(struct bg_vmig *b, char *out, size_t len)
{
	int st = kvm_test_finish(&b->proc, NULL);

	kvm_test_read_file(b->path, out, len);
	return st;
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

/*
 * A VM @name here and `vmig incoming --listen @uri --detach` on host B.
 * Returns the address B listens on, as it printed it (a port 0 in @uri
 * becomes the one it got).
 */
static const char *start_pair(const char *name, const char *workload, const char *uri)
{
	static char real[512];
	struct kvm_test_result r;
	const char *at, *end;

	RUN(&r, "run", name, "--memory", "160M", "--vcpus", "2", "--workload", workload,
	    "--detach");
	ck_assert_msg(r.status == 0, "run: %s", r.err);
	kvm_test_wait_first_page(NULL, name);
	RUN_B(&r, "incoming", "--listen", uri, "--detach");
	ck_assert_msg(r.status == 0, "incoming: exit %d: %s", r.status, r.err);
	at = strstr(r.out, "waiting for a migration on ");
	ck_assert_msg(at, "incoming --detach printed: %s", r.out);
	at += strlen("waiting for a migration on ");
	end = strstr(at, " (pid ");
	ck_assert_msg(end && (size_t)(end - at) < sizeof(real), "incoming printed: %s", r.out);
	snprintf(real, sizeof(real), "%.*s", (int)(end - at), at);
	ck_assert_msg(!strstr(real, ":0") || strstr(uri, "unix:"), "still port 0: %s", real);
	return real;
}

/*
 * `vmig console NAME` on host B, stdin at end of file: it shows the guest's
 * output until the VM goes away.  Its output goes to RUN_DIR/console.out.
 */
static void console_b(struct kvm_test_proc *p, const char *name)
{
	static char out[512];

	snprintf(out, sizeof(out), "%s/console.out", run_dir);
	*p = (struct kvm_test_proc){ .run_dir = run_dir_b, .stdin_path = "/dev/null",
				     .out_path = out, .err_path = out };
	kvm_test_spawn(p, KVM_TEST_ARGS(vmig_bin, "console", name));
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
		kvm_test_read_all(fileno(f), buf, len);
		fclose(f);
	}
}

static void migrate_over(const char *uri_fmt, const char *channels)
{
	struct json_object *res, *o;
	char uri[512], out[65536];
	uint64_t before, after, end;
	struct kvm_test_proc console;
	struct kvm_test_result r;

	snprintf(uri, sizeof(uri), uri_fmt, run_dir);
	/* tcp: port 0, the one B got is what it prints. */
	snprintf(uri, sizeof(uri), "%s", start_pair("mv", "rate=max,wss=2M", uri));
	o = kvm_test_vm_status(NULL, "mv");
	before = kvm_test_ju64(o, "pages_written");
	json_object_put(o);

	if (channels)   /* the engine's knobs, through the CLI and vmig incoming */
		RUN(&r, "migrate", "mv", uri, "--json", "--channels", channels,
		    "--compress", "none", "--bandwidth", "1G");
	else
		RUN(&r, "migrate", "mv", uri, "--json");
	ck_assert_msg(r.status == 0, "migrate: exit %d: %s %s", r.status, r.out, r.err);
	res = json_tokener_parse(r.out);
	ck_assert_msg(res, "--json printed: %s", r.out);
	/* --channels auto: one connection per CPU here, at most 4. */
	{
		long cpus = sysconf(_SC_NPROCESSORS_ONLN);
		uint64_t want = channels ? strtoull(channels, NULL, 10) :
				cpus < 1 ? 1 : cpus > 4 ? 4 : (uint64_t)cpus;

		ck_assert_uint_eq(kvm_test_ju64(res, "channels"), want);
		ck_assert_uint_eq(kvm_test_ju64(res, "stream_version"), 2);
	}
	if (channels) {
		struct json_object *pg = json_object_object_get(res, "pages");

		ck_assert_uint_eq(kvm_test_ju64(res, "bandwidth_limit_bps"), 1ull << 30);
		ck_assert_msg(pg && kvm_test_ju64(pg, "lz4") == 0 && kvm_test_ju64(pg, "raw") > 0,
			      "%s", r.out);
	}
	ck_assert_msg(json_object_object_get(res, "status") &&
		      !strcmp(json_object_get_string(json_object_object_get(res, "status")),
			      "completed"), "result: %s", r.out);
	ck_assert_uint_gt(kvm_test_ju64(res, "transferred_bytes"), 0);
	ck_assert_uint_ge(kvm_test_ju64(res, "iterations"), 1);
	ck_assert(json_object_object_get(res, "total_time_ms") != NULL);
	ck_assert(json_object_object_get(res, "downtime_ms") != NULL);
	json_object_put(res);

	/* The source VMM let go of the VM; host B runs it and it goes on. */
	RUN(&r, "stop", "mv");
	ck_assert_int_eq(r.status, 1);
	ck_assert(!exists("mv", "sock") && !exists("mv", "pid"));
	o = kvm_test_vm_status(run_dir_b, "mv");
	ck_assert_str_eq(kvm_test_vm_state(o), "running");
	after = kvm_test_ju64(o, "pages_written");
	json_object_put(o);
	ck_assert_msg(after > before, "guest counters went back: %" PRIu64 " -> %" PRIu64,
		      before, after);
	kvm_test_sleep_ms(300);
	o = kvm_test_vm_status(run_dir_b, "mv");
	ck_assert_uint_gt(kvm_test_ju64(o, "pages_written"), after);
	json_object_put(o);
	/* Its console is served on host B too; the guest prints every ~2 s. */
	console_b(&console, "mv");
	for (end = kvm_test_now_ms() + 15000; kvm_test_now_ms() < end; kvm_test_sleep_ms(100)) {
		console_b_output(out, sizeof(out));
		if (strstr(out, "vmig-guest"))
			break;
	}
	ck_assert_msg(strstr(out, "vmig-guest"), "vmig console on host B showed: '%s'", out);
	RUN_B(&r, "stop", "mv");
	ck_assert_int_eq(r.status, 0);
	ck_assert(!exists_b("mv", "sock") && !exists_b("mv", "pid"));
	/* The VM went away: the console client ends on its own, within 10 s. */
	console.deadline_ms = kvm_test_now_ms() + 10000;
	kvm_test_finish(&console, &r);
	ck_assert_msg(!r.timed_out, "vmig console still runs after the VM stopped");
	ck_assert_msg(r.status == 0, "vmig console: exit %d: %s", r.status, r.out);
}

START_TEST(migrate_tcp)
{
	migrate_over("tcp://127.0.0.1:0", NULL);
}
END_TEST

START_TEST(migrate_unix)
{
	migrate_over("unix:%s/mig.sock", NULL);
}
END_TEST

START_TEST(migrate_tcp_channels)
{
	migrate_over("tcp://127.0.0.1:0", "3");
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
	struct kvm_test_result r;
	uint64_t a;
	struct bg_vmig mig;

	snprintf(uri, sizeof(uri), "unix:%s/mig.sock", run_dir);
	start_pair("cx", "rate=max,wss=48M", uri);
	/* A 1 ms limit with 96 MiB dirtied at full speed never converges. */
	spawn_vmig(&mig, "mig", (const char *const[]){ "migrate", "cx", uri,
						       "--max-downtime", "1", NULL });
	kvm_test_sleep_ms(700);
	/* status shows the migration in progress, with its figures. */
	o = kvm_test_vm_status(NULL, "cx");
	{
		struct json_object *m = json_object_object_get(o, "migration");

		ck_assert_msg(m, "no migration in %s", json_object_to_json_string(o));
		ck_assert_str_eq(json_object_get_string(json_object_object_get(m, "status")),
				 "active");
		ck_assert_uint_ge(kvm_test_ju64(m, "iteration"), 1);
		ck_assert_uint_gt(kvm_test_ju64(m, "transferred_bytes"), 0);
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
	ck_assert_int_eq(wait_status(&mig, out, sizeof(out)), 1);
	ck_assert_msg(strstr(out, "cancelled") && strstr(out, "keeps running"), "%s", out);
	o = kvm_test_vm_status(NULL, "cx");
	ck_assert_str_eq(kvm_test_vm_state(o), "running");
	a = kvm_test_ju64(o, "pages_written");
	json_object_put(o);
	kvm_test_sleep_ms(200);
	o = kvm_test_vm_status(NULL, "cx");
	ck_assert_uint_gt(kvm_test_ju64(o, "pages_written"), a);
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
	struct kvm_test_result r;
	uint64_t a;
	struct bg_vmig mig;
	pid_t dst = 0;
	int i;

	snprintf(uri, sizeof(uri), "unix:%s/mig.sock", run_dir);
	start_pair("dk", "rate=max,wss=48M", uri);
	spawn_vmig(&mig, "mig", (const char *const[]){ "migrate", "dk", uri,
						       "--max-downtime", "1", NULL });
	for (i = 0; i < 200 && !dst; i++) {
		kvm_test_sleep_ms(10);
		dst = pid_in(run_dir_b, "dk");
	}
	ck_assert_msg(dst > 0, "the destination never claimed the VM");
	kvm_test_sleep_ms(300);
	ck_assert_int_eq(kill(dst, SIGKILL), 0);
	ck_assert_int_eq(wait_status(&mig, out, sizeof(out)), 1);
	ck_assert_msg(strstr(out, "failed") && strstr(out, "keeps running"), "%s", out);
	o = kvm_test_vm_status(NULL, "dk");
	ck_assert_str_eq(kvm_test_vm_state(o), "running");
	a = kvm_test_ju64(o, "pages_written");
	json_object_put(o);
	kvm_test_sleep_ms(200);
	o = kvm_test_vm_status(NULL, "dk");
	ck_assert_uint_gt(kvm_test_ju64(o, "pages_written"), a);
	json_object_put(o);
	RUN(&r, "stop", "dk");
}
END_TEST

START_TEST(source_killed_destination_discards)
{
	char uri[512], log[600], out[8192];
	struct kvm_test_result r;
	struct bg_vmig mig;
	pid_t src, dst = 0;
	int i;
	FILE *f;

	snprintf(uri, sizeof(uri), "unix:%s/mig.sock", run_dir);
	start_pair("sk", "rate=max,wss=48M", uri);
	src = pid_in(run_dir, "sk");
	spawn_vmig(&mig, "mig", (const char *const[]){ "migrate", "sk", uri,
						       "--max-downtime", "1", NULL });
	for (i = 0; i < 200 && !dst; i++) {
		kvm_test_sleep_ms(10);
		dst = pid_in(run_dir_b, "sk");
	}
	ck_assert_msg(dst > 0, "the destination never claimed the VM");
	kvm_test_sleep_ms(300);
	ck_assert_int_eq(kill(src, SIGKILL), 0);
	wait_status(&mig, out, sizeof(out));
	for (i = 0; i < 500 && kill(dst, 0) == 0; i++)
		kvm_test_sleep_ms(20);
	ck_assert_msg(kill(dst, 0) < 0, "the destination still runs after its source died");
	ck_assert(!exists_b("sk", "sock") && !exists_b("sk", "pid"));
	snprintf(log, sizeof(log), "%s/sk.log", run_dir_b);
	f = fopen(log, "r");
	ck_assert_ptr_nonnull(f);
	kvm_test_read_all(fileno(f), r.out, sizeof(r.out));
	fclose(f);
	ck_assert_msg(strstr(r.out, "vmig: "), "no error in the destination's log: %s", r.out);
}
END_TEST

/* vmig incoming --stdio fed a damaged stream: a clear error, nothing left. */
static void incoming_refuses(const char *file, const char *want)
{
	struct kvm_test_result r;

	kvm_test_run_argv(&r, &(struct kvm_test_proc){ .stdin_path = file },
			  KVM_TEST_ARGS(vmig_bin, "incoming", "--stdio"));
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
	struct kvm_test_result r;
	char uri[512];
	pthread_t th;
	uint64_t a;

	snprintf(uri, sizeof(uri), "unix:%s/fake.sock", run_dir);
	RUN(&r, "run", "hu", "--memory", "64M", "--workload", "rate=2000,wss=2M", "--detach");
	ck_assert_int_eq(r.status, 0);
	kvm_test_wait_first_page(NULL, "hu");
	ck_assert_int_eq(vmig_transport_listen(uri, &l, &err), 0);
	ck_assert_int_eq(pthread_create(&th, NULL, vanishing_destination, l), 0);
	RUN(&r, "migrate", "hu", uri);
	pthread_join(th, NULL);
	vmig_listener_close(l);
	ck_assert_int_eq(r.status, 1);
	ck_assert_msg(strstr(r.err, "handoff-uncertain") && strstr(r.err, "resume --force"),
		      "migrate said: %s", r.err);

	/* Held paused here; status says so and says what to do. */
	o = kvm_test_vm_status(NULL, "hu");
	ck_assert_str_eq(kvm_test_vm_state(o), "handoff-uncertain");
	a = kvm_test_ju64(o, "pages_written");
	json_object_put(o);
	RUN(&r, "status", "hu");
	ck_assert_msg(strstr(r.out, "uncertain") && strstr(r.out, "resume --force"), "%s", r.out);
	kvm_test_sleep_ms(200);
	o = kvm_test_vm_status(NULL, "hu");
	ck_assert_uint_eq(kvm_test_ju64(o, "pages_written"), a);
	json_object_put(o);

	/* A plain resume is refused; the admin's --force resumes. */
	RUN(&r, "resume", "hu");
	ck_assert_int_eq(r.status, 1);
	ck_assert_msg(strstr(r.err, "uncertain"), "%s", r.err);
	RUN(&r, "resume", "--force", "hu");
	ck_assert_msg(r.status == 0, "resume --force: %s", r.err);
	kvm_test_sleep_ms(300);
	o = kvm_test_vm_status(NULL, "hu");
	ck_assert_str_eq(kvm_test_vm_state(o), "running");
	ck_assert_uint_gt(kvm_test_ju64(o, "pages_written"), a);
	json_object_put(o);
	RUN(&r, "stop", "hu");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

START_TEST(save_to_full_disk)
{
	char dir[512], file[600], old[700];
	struct json_object *o;
	struct kvm_test_result r;
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
	kvm_test_wait_first_page(NULL, "fd");
	RUN(&r, "save", "fd", file);
	ck_assert_msg(r.status == 1, "save to a full disk: exit %d: %s", r.status, r.out);
	ck_assert_msg(strstr(r.err, "no space left") || strstr(r.err, "No space left"),
		      "message does not say the disk is full: %s", r.err);
	o = kvm_test_vm_status(NULL, "fd");
	ck_assert_str_eq(kvm_test_vm_state(o), "running");
	a = kvm_test_ju64(o, "pages_written");
	json_object_put(o);
	kvm_test_sleep_ms(200);
	o = kvm_test_vm_status(NULL, "fd");
	ck_assert_uint_gt(kvm_test_ju64(o, "pages_written"), a);
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
	struct bg_vmig inc;
	struct stat sb;
	int i;

	/* Foreground incoming, signalled while it waits: it must end, now. */
	snprintf(uri, sizeof(uri), "unix:%s/wait.sock", run_dir);
	spawn_vmig(&inc, "inc", (const char *const[]){ "incoming", "--listen", uri, NULL });
	for (i = 0; i < 250 && stat(uri + 5, &sb) < 0; i++)
		kvm_test_sleep_ms(20);
	ck_assert_msg(i < 250, "incoming never listened");
	ck_assert_int_eq(kill(inc.proc.pid, SIGTERM), 0);
	ck_assert_int_eq(wait_status(&inc, out, sizeof(out)), 1);
	ck_assert_msg(strstr(out, "before the handoff"), "incoming said: %s", out);
}
END_TEST

START_TEST(save_to_a_device_keeps_it)
{
	struct kvm_test_result r;
	struct stat sb;

	RUN(&r, "run", "dv", "--memory", "32M", "--workload", "rate=100,wss=256K", "--detach");
	ck_assert_int_eq(r.status, 0);
	kvm_test_wait_first_page(NULL, "dv");
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
	struct kvm_test_result r;
	struct stat sb;
	uint64_t saved;

	snprintf(file, sizeof(file), "%s/sv.vmig", run_dir);
	RUN(&r, "run", "sv", "--memory", "64M", "--workload", "rate=max,wss=2M", "--detach");
	ck_assert_int_eq(r.status, 0);
	kvm_test_wait_first_page(NULL, "sv");
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
	o = kvm_test_vm_status(NULL, "sv");
	ck_assert_str_eq(kvm_test_vm_state(o), "running");
	saved = kvm_test_ju64(o, "pages_written");
	json_object_put(o);
	kvm_test_sleep_ms(300);
	o = kvm_test_vm_status(NULL, "sv");
	ck_assert_uint_gt(kvm_test_ju64(o, "pages_written"), saved);
	json_object_put(o);
	RUN(&r, "stop", "sv");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

START_TEST(detached_vm_lifecycle)
{
	struct json_object *o;
	uint64_t a, b, c;
	struct kvm_test_result r;

	RUN(&r, "run", "lc", "--memory", "64M", "--vcpus", "2", "--workload",
	    "rate=max,wss=1M", "--detach");
	ck_assert_msg(r.status == 0, "run --detach: exit %d: %s", r.status, r.err);
	ck_assert_msg(strstr(r.out, "running"), "run printed: %s", r.out);
	ck_assert(exists("lc", "sock"));
	ck_assert(exists("lc", "pid"));

	a = kvm_test_wait_first_page(NULL, "lc");
	o = kvm_test_vm_status(NULL, "lc");
	ck_assert_str_eq(kvm_test_vm_state(o), "running");
	ck_assert_uint_eq(kvm_test_ju64(o, "vcpus"), 2);
	ck_assert_uint_eq(kvm_test_ju64(o, "memory"), 64 << 20);
	ck_assert_uint_ge(kvm_test_ju64(o, "pid"), 2);
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
	o = kvm_test_vm_status(NULL, "lc");
	ck_assert_str_eq(kvm_test_vm_state(o), "paused");
	b = kvm_test_ju64(o, "pages_written");
	json_object_put(o);
	ck_assert_uint_ge(b, a);
	kvm_test_sleep_ms(300);
	o = kvm_test_vm_status(NULL, "lc");
	ck_assert_uint_eq(kvm_test_ju64(o, "pages_written"), b);
	json_object_put(o);

	RUN(&r, "resume", "lc");
	ck_assert_msg(r.status == 0, "resume: %s", r.err);
	/* Progress resumes (give a loaded machine a few seconds). */
	for (c = b, a = 0; c == b && a < 100; a++) {
		kvm_test_sleep_ms(50);
		o = kvm_test_vm_status(NULL, "lc");
		ck_assert_str_eq(kvm_test_vm_state(o), "running");
		c = kvm_test_ju64(o, "pages_written");
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

/*
 * A waiting `vmig incoming` is visible and can be ended by name: listed
 * as waiting with where it listens, other commands refused, its name
 * taken, `vmig stop` ends it and leaves nothing; an unnamed one is
 * incoming-PID; a named one still takes a migration under that name.
 */
START_TEST(waiting_incoming_is_listed_and_stoppable)
{
	struct kvm_test_result r;
	struct json_object *o;
	char unnamed[64];
	const char *at;

	RUN_B(&r, "incoming", "--listen", "tcp://127.0.0.1:0", "--name", "wq", "--detach");
	ck_assert_msg(r.status == 0, "incoming: %s", r.err);
	RUN_B(&r, "list");
	ck_assert_msg(strstr(r.out, "wq") && strstr(r.out, "waiting"), "list: %s", r.out);
	o = kvm_test_vm_status(run_dir_b, "wq");
	ck_assert_str_eq(kvm_test_vm_state(o), "waiting");
	ck_assert_msg(json_object_object_get(o, "listen") &&
		      strstr(json_object_get_string(json_object_object_get(o, "listen")),
			     "tcp://127.0.0.1:") &&
		      !strstr(json_object_get_string(json_object_object_get(o, "listen")), ":0"),
		      "status: %s", json_object_to_json_string(o));
	json_object_put(o);
	/* Not a VM: host-info (and so evacuate --all) leaves it out. */
	RUN_B(&r, "host-info", "--json");
	ck_assert_msg(r.status == 0 && !strstr(r.out, "\"wq\""), "host-info: %s", r.out);
	RUN_B(&r, "pause", "wq");
	ck_assert_int_eq(r.status, 1);
	ck_assert_msg(strstr(r.err, "waiting for a migration"), "pause: %s", r.err);
	RUN_B(&r, "incoming", "--listen", "tcp://127.0.0.1:0", "--name", "wq", "--detach");
	ck_assert_int_eq(r.status, 1);
	ck_assert_msg(strstr(r.err, "waits for it"), "second listener: %s", r.err);
	RUN_B(&r, "stop", "wq");
	ck_assert_msg(r.status == 0, "stop: %s", r.err);
	ck_assert(!exists_b("wq", "sock") && !exists_b("wq", "pid"));

	RUN_B(&r, "incoming", "--listen", "tcp://127.0.0.1:0", "--detach");
	ck_assert_msg(r.status == 0, "incoming: %s", r.err);
	at = strstr(r.out, "(pid ");
	ck_assert_msg(at, "incoming printed: %s", r.out);
	snprintf(unnamed, sizeof(unnamed), "incoming-%d", atoi(at + 5));
	RUN_B(&r, "list");
	ck_assert_msg(strstr(r.out, unnamed), "list: %s", r.out);
	RUN_B(&r, "stop", unnamed);
	ck_assert_msg(r.status == 0, "stop: %s", r.err);
	ck_assert(!exists_b(unnamed, "sock") && !exists_b(unnamed, "pid"));

	/* Named and waiting, then a VM arrives: it runs under that name. */
	{
		char uri[512];

		RUN(&r, "run", "wsrc", "--memory", "64M", "--workload", "rate=2000,wss=2M",
		    "--detach");
		ck_assert_msg(r.status == 0, "run: %s", r.err);
		kvm_test_wait_first_page(NULL, "wsrc");
		RUN_B(&r, "incoming", "--listen", "tcp://127.0.0.1:0", "--name", "wq2", "--detach");
		ck_assert_msg(r.status == 0, "incoming: %s", r.err);
		at = strstr(r.out, "tcp://");
		ck_assert_msg(at && strstr(at, " (pid "), "incoming printed: %s", r.out);
		snprintf(uri, sizeof(uri), "%.*s", (int)(strstr(at, " (pid ") - at), at);
		RUN(&r, "migrate", "wsrc", uri);
		ck_assert_msg(r.status == 0, "migrate: %s %s", r.out, r.err);
		o = kvm_test_vm_status(run_dir_b, "wq2");
		ck_assert_str_eq(kvm_test_vm_state(o), "running");
		json_object_put(o);
		RUN_B(&r, "stop", "wq2");
		ck_assert_int_eq(r.status, 0);
	}
}
END_TEST

START_TEST(name_already_running)
{
	struct kvm_test_result r;

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
	struct kvm_test_result r;
	char path[512], log[8192];

	RUN(&r, "run", "sd", "--memory", "64M", "--workload", "rate=1000,wss=4M", "--detach");
	ck_assert_msg(r.status == 0, "run: %s", r.err);
	kvm_test_wait_first_page(NULL, "sd");
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
		kvm_test_read_all(fileno(f), log, sizeof(log));
		fclose(f);
	}
	ck_assert_msg(strstr(log, "shutdown:") && strstr(log, "power"), "log: %s", log);
}
END_TEST

START_TEST(sigterm_stops_cleanly)
{
	struct kvm_test_result r;
	pid_t pid;
	char log[512];
	FILE *f;

	RUN(&r, "run", "sig", "--memory", "32M", "--detach");
	ck_assert_msg(r.status == 0, "run: %s", r.err);
	pid = read_pid("sig");
	kvm_test_wait_first_page(NULL, "sig");
	ck_assert_int_eq(kill(pid, SIGTERM), 0);
	wait_gone(pid, "sig");
	snprintf(log, sizeof(log), "%s/sig.log", run_dir);
	f = fopen(log, "r");
	ck_assert_ptr_nonnull(f);
	kvm_test_read_all(fileno(f), r.out, sizeof(r.out));
	fclose(f);
	ck_assert_msg(strstr(r.out, "vmig-guest"), "console log lacks the guest banner: %s",
		      r.out);
	ck_assert_msg(strstr(r.out, "stopping"), "log lacks the stop: %s", r.out);
}
END_TEST

START_TEST(foreground_guest_power_off)
{
	struct kvm_test_result r;

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
		{ "migrate", "x", "tcp://127.0.0.1:1", "--stream-version", "3", NULL },
		{ "migrate", "x", "tcp://127.0.0.1:1", "--channels", "none", NULL },
		{ "incoming", "--listen", "tcp://127.0.0.1:1", "--prealloc", "3M", NULL },
	};
	struct kvm_test_result r;
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
	struct kvm_test_result r;
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
	struct kvm_test_result r;

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
	tcase_add_test(tc, waiting_incoming_is_listed_and_stoppable);
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
