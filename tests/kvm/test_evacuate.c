/*
 * vmig evacuate and vmig host-info, process to process, as an admin uses
 * them: real VMs on "host A" move through real sshd instances to two
 * targets, "B" and "C".
 *
 * The hosts are run directories.  B and C each have an OpenSSH sshd of
 * their own on 127.0.0.1 (keys made with ssh-keygen, nothing of the
 * system's read or changed, as in test_ssh.c) whose sshd_config sets
 * VMIG_RUN_DIR for its sessions with SetEnv, and VMIG_TEST_FREE_MEMORY,
 * host-info's test hook, to the free memory the test wants that host to
 * report.  --remote-vmig is the vmig under test.  Guests are small (64 to
 * 192 MiB) so the suite stays quick.  Every VM name starts with "ev".
 *
 * Skips (77) without /dev/kvm or without sshd.
 */
#include "config.h"

#include <dirent.h>
#include <inttypes.h>
#include <signal.h>
#include <sys/stat.h>

#include <json-c/json.h>

#include "vmig/transport.h"
#include "kvm-test.h"
#include "proc-test.h"

#define SSHD       KVM_TEST_SSHD
#define SSH_KEYGEN KVM_TEST_SSH_KEYGEN
#define MIB        ((uint64_t)1 << 20)

static const char *vmig_bin;
static char base[128];         /* every test's directory, made by the runner */
static char dir[256];          /* everything of one test */
static char run_a[300];        /* the host being evacuated */
static char known_hosts[300];
static char user_key[300];

struct target {
	char name;             /* 'B' or 'C' */
	char run[300];
	char sdir[300];
	struct kvm_test_sshd sshd;
	char uri[400];
};
static struct target tb = { .name = 'B' }, tc = { .name = 'C' };
static char extra_target[200]; /* a third target for --to, or "" */

#define VMIG(r, dir_, ...) KVM_TEST_VMIG((r), (dir_), __VA_ARGS__)

static struct json_object *parse_json(const char *text)
{
	struct json_object *o = json_tokener_parse(text);

	ck_assert_msg(o != NULL, "not JSON: %s", text);
	return o;
}

static const char *jstr(struct json_object *o, const char *key)
{
	struct json_object *v;

	if (!json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, json_type_string))
		return NULL;
	return json_object_get_string(v);
}

/* Where VM @name runs: 'A', 'B' or 'C'; fails unless exactly one place. */
static char runs_exactly_once(const char *name)
{
	const char *dirs[3] = { run_a, tb.run, tc.run };
	char where = 0, found[8] = "";
	int i, n = 0;

	for (i = 0; i < 3; i++) {
		struct json_object *o = kvm_test_vm_status_try(dirs[i], name);

		if (!o)
			continue;
		found[n++] = (char)('A' + i);
		where = (char)('A' + i);
		json_object_put(o);
	}
	ck_assert_msg(n == 1, "VM %s runs in %d places (%s), not exactly once", name, n, found);
	return where;
}

static void start_vm(const char *name, const char *memory, const char *workload)
{
	kvm_test_start_vm(run_a, name, memory, "1", workload);
}

/* ------------------------------------------------------------------------
 * The targets' sshd
 */

/* Start @t's sshd; its sessions see @free_mem as this host's free memory. */
static void start_target(struct target *t, const char *free_mem)
{
	char setenv_line[800];

	snprintf(setenv_line, sizeof(setenv_line),
		 "SetEnv VMIG_RUN_DIR=%s VMIG_TEST_FREE_MEMORY=%s\n", t->run, free_mem);
	/* One host key and one authorized_keys, in DIR, for both targets. */
	kvm_test_sshd_start(&t->sshd, t->sdir, dir, setenv_line);
	kvm_test_sshd_authorize(&t->sshd, user_key);
	kvm_test_sshd_uri(&t->sshd, t->uri, sizeof(t->uri));
	kvm_test_sshd_trust(&t->sshd, known_hosts, true);
}

static void start_targets(const char *free_b, const char *free_c)
{
	start_target(&tb, free_b);
	start_target(&tc, free_c);
}

static void setup(void)
{
	struct target *ts[2] = { &tb, &tc };
	int i;

	vmig_bin = kvm_test_vmig_bin();
	kvm_test_make_dirs(base, dir, sizeof(dir), run_a, NULL, sizeof(run_a));
	for (i = 0; i < 2; i++) {
		struct target *t = ts[i];

		t->sshd.pid = 0;
		snprintf(t->run, sizeof(t->run), "%s/%c", dir, t->name);
		snprintf(t->sdir, sizeof(t->sdir), "%s/sshd-%c", dir, t->name);
		ck_assert_int_eq(mkdir(t->run, 0700), 0);
		ck_assert_int_eq(mkdir(t->sdir, 0700), 0);
	}
	snprintf(known_hosts, sizeof(known_hosts), "%s/known_hosts", dir);
	snprintf(user_key, sizeof(user_key), "%s/id_user", dir);
	kvm_test_keygen(user_key);
	kvm_test_write_file(known_hosts, "", 0600);
	extra_target[0] = 0;
	/* Nothing of the user's: no agent, no ~/.ssh. */
	kvm_test_ssh_isolate(dir);
}

static void teardown(void)
{
	kvm_test_sshd_stop(&tb.sshd);
	kvm_test_sshd_stop(&tc.sshd);
	kvm_test_reap(dir);
}

static void runner_setup(void)
{
	kvm_test_make_base(base, sizeof(base), "ev");
}

static void runner_teardown(void)
{
	kvm_test_reap(base);
}

/* The argv of `vmig evacuate --to B,C` with our SSH set-up and @extra. */
static void evacuate_argv(const char **argv, const char *const *extra)
{
	static char to[1100];
	unsigned int i = 0;

	snprintf(to, sizeof(to), "%s,%s%s%s", tb.uri, tc.uri, extra_target[0] ? "," : "",
		 extra_target);
	argv[i++] = vmig_bin;
	argv[i++] = "evacuate";
	argv[i++] = "--to";
	argv[i++] = to;
	argv[i++] = "--known-hosts";
	argv[i++] = known_hosts;
	argv[i++] = "--identity";
	argv[i++] = user_key;
	argv[i++] = "--remote-vmig";
	argv[i++] = vmig_bin;
	while (extra && *extra && i < 62)
		argv[i++] = *extra++;
	argv[i] = NULL;
}

static void evacuate(struct kvm_test_result *r, const char *const *extra)
{
	const char *argv[64];

	evacuate_argv(argv, extra);
	kvm_test_run_argv(r, &(struct kvm_test_proc){ .run_dir = run_a }, argv);
}

/* Start the evacuation of evacuate() in the background as @p says. */
static void evacuate_spawn(struct kvm_test_proc *p, const char *const *extra)
{
	const char *argv[64];

	evacuate_argv(argv, extra);
	p->run_dir = run_a;
	kvm_test_spawn(p, argv);
}

/* The report's entry for VM @name. */
static struct json_object *report_vm(struct json_object *rep, const char *name)
{
	struct json_object *vms;
	size_t i;

	ck_assert(json_object_object_get_ex(rep, "vms", &vms));
	for (i = 0; i < json_object_array_length(vms); i++) {
		struct json_object *v = json_object_array_get_idx(vms, i);

		if (!strcmp(jstr(v, "name"), name))
			return v;
	}
	ck_abort_msg("VM %s not in the report", name);
	return NULL;
}

static char target_of(struct json_object *v)
{
	const char *uri = jstr(v, "target");
	char port[16];

	ck_assert_ptr_nonnull(uri);
	snprintf(port, sizeof(port), ":%d", tb.sshd.port);
	if (strstr(uri, port))
		return 'B';
	snprintf(port, sizeof(port), ":%d", tc.sshd.port);
	if (strstr(uri, port))
		return 'C';
	ck_abort_msg("target %s is neither B nor C", uri);
	return 0;
}

static const char *run_dir_of(char where)
{
	return where == 'A' ? run_a : where == 'B' ? tb.run : tc.run;
}

/* Whether a detached `vmig incoming`'s log in @run_dir came to say @what. */
static bool incoming_log_says(const char *run_dir, const char *what)
{
	uint64_t end = kvm_test_now_ms() + 5000;
	char path[700], text[8192];

	do {
		DIR *d = opendir(run_dir);
		struct dirent *e;

		ck_assert_ptr_nonnull(d);
		while ((e = readdir(d))) {
			/* incoming.PID.log, or NAME.log once it took --name NAME */
			if (!strstr(e->d_name, ".log"))
				continue;
			snprintf(path, sizeof(path), "%s/%s", run_dir, e->d_name);
			kvm_test_read_file(path, text, sizeof(text));
			if (strstr(text, what)) {
				closedir(d);
				return true;
			}
		}
		closedir(d);
		kvm_test_sleep_ms(50);
	} while (kvm_test_now_ms() < end);
	return false;
}

static bool drained(const char *run_dir)
{
	struct json_object *o, *v;
	struct kvm_test_result r;
	bool d;

	VMIG(&r, run_dir, "host-info", "--json");
	ck_assert_msg(r.status == 0, "host-info: %s", r.err);
	o = parse_json(r.out);
	ck_assert(json_object_object_get_ex(o, "drained", &v));
	d = json_object_get_boolean(v);
	json_object_put(o);
	return d;
}

/* ------------------------------------------------------------------------
 * Tests
 */

/*
 * Four VMs of different sizes to two targets that report different free
 * memory, two at a time: all arrive and run; no target gets more than it
 * has; at no moment did more than two migrations run; the report says
 * what happened.
 */
START_TEST(evacuate_to_two_targets)
{
	static const struct { const char *name, *mem; uint64_t bytes; } vms[] = {
		{ "eva", "192M", 192 * MIB }, { "evb", "128M", 128 * MIB },
		{ "evc", "96M", 96 * MIB }, { "evd", "64M", 64 * MIB },
	};
	uint64_t on_b = 0, on_c = 0, free_b = 400 * MIB, free_c = 200 * MIB;
	int64_t start[4], end[4];
	struct json_object *rep, *v;
	char report[400], text[65536];
	struct kvm_test_result r;
	unsigned int i, j;

	start_targets("400M", "200M");
	for (i = 0; i < 4; i++)
		start_vm(vms[i].name, vms[i].mem, "rate=5000,wss=4M");
	snprintf(report, sizeof(report), "%s/report.json", dir);

	/* --stream-version 1, as for targets still on vmig 0.1.0 (the others use 2). */
	evacuate(&r, (const char *const[]){ "--all", "--parallel", "2", "--report", report,
					    "--bandwidth", "2G", "--stream-version", "1", NULL });
	ck_assert_msg(r.status == 0, "evacuate: exit %d\nstdout: %s\nstderr: %s", r.status,
		      r.out, r.err);
	ck_assert_msg(strstr(r.out, "4 of 4 VMs moved"), "summary: %s", r.out);
	ck_assert_msg(strstr(r.err, "total:") && strstr(r.err, "starting"),
		      "no progress or events on stderr: %s", r.err);

	kvm_test_read_file(report, text, sizeof(text));
	rep = parse_json(text);
	ck_assert_str_eq(jstr(rep, "result"), "completed");
	ck_assert_uint_eq(kvm_test_ju64(rep, "moved"), 4);
	ck_assert_uint_eq(kvm_test_ju64(rep, "failed"), 0);
	ck_assert_uint_eq(kvm_test_ju64(rep, "parallel"), 2);
	/* 2 GiB/s over two at once: each migration was given half. */
	ck_assert_uint_eq(kvm_test_ju64(rep, "bandwidth_per_migration_bps"), 1ull << 30);
	for (i = 0; i < 4; i++) {
		char where;

		v = report_vm(rep, vms[i].name);
		ck_assert_str_eq(jstr(v, "result"), "completed");
		ck_assert_msg(jstr(v, "error") == NULL, "%s: error %s", vms[i].name, jstr(v, "error"));
		ck_assert_uint_eq(kvm_test_ju64(v, "memory"), vms[i].bytes);
		ck_assert_uint_gt(kvm_test_ju64(v, "transferred_bytes"), 0);
		ck_assert_uint_gt(kvm_test_ju64(v, "total_time_ms"), 0);
		ck_assert_uint_eq(kvm_test_ju64(v, "stream_version"), 1);
		(void)kvm_test_ju64(v, "downtime_ms");
		start[i] = (int64_t)kvm_test_ju64(v, "started_at_ms");
		end[i] = (int64_t)kvm_test_ju64(v, "ended_at_ms");
		ck_assert_msg(end[i] >= start[i], "%s: ended before it started", vms[i].name);

		/* It runs where the report says, only there, and goes on. */
		where = runs_exactly_once(vms[i].name);
		ck_assert_msg(where == target_of(v), "%s runs on %c, the report says %c",
			      vms[i].name, where, target_of(v));
		kvm_test_assert_guest_runs(run_dir_of(where), vms[i].name);
		ck_assert(!kvm_test_exists_in(run_a, vms[i].name, "pid"));
		if (where == 'B')
			on_b += vms[i].bytes;
		else
			on_c += vms[i].bytes;
	}
	/* Placement respected free memory (and used both targets). */
	ck_assert_msg(on_b <= free_b && on_c <= free_c, "B got %" PRIu64 " MiB of %" PRIu64
		      ", C %" PRIu64 " of %" PRIu64, on_b / MIB, free_b / MIB, on_c / MIB,
		      free_c / MIB);
	ck_assert_msg(on_b && on_c, "one target got nothing: B %" PRIu64 " C %" PRIu64, on_b, on_c);

	/* --parallel 2: at no start did two others run already. */
	for (i = 0; i < 4; i++) {
		unsigned int overlap = 0;

		for (j = 0; j < 4; j++)
			if (j != i && start[j] <= start[i] && end[j] > start[i])
				overlap++;
		ck_assert_msg(overlap <= 1, "%u migrations ran when %s started", overlap + 1,
			      vms[i].name);
	}
	json_object_put(rep);

	/* The host stays drained: nothing starts or lands here. */
	ck_assert(drained(run_a));
	VMIG(&r, run_a, "run", "eve", "--memory", "64M", "--detach");
	ck_assert_msg(r.status == 1 && strstr(r.err, "drained"), "run on a drained host: %d %s",
		      r.status, r.err);
	ck_assert(!kvm_test_exists_in(run_a, "eve", "sock"));
	for (i = 0; i < 4; i++) {
		char where = runs_exactly_once(vms[i].name);

		VMIG(&r, run_dir_of(where), "stop", vms[i].name);
	}
}
END_TEST

/*
 * A target that refuses a VM: C is drained after the plan was made, so
 * its incoming refuses the VM placed there.  The others complete; the
 * report names the failure; the VM runs on, here.
 */
START_TEST(one_vm_fails_the_others_complete)
{
	char report[400], text[65536], out[400], err_path[400], errs[65536];
	struct kvm_test_proc ev = { .out_path = out, .err_path = err_path };
	struct json_object *rep, *v;
	struct kvm_test_result r;
	int st;
	uint64_t end;

	start_targets("1000M", "900M");
	/* Placement: evf1 -> B (most free), evf2 -> C, evf3 -> B. */
	start_vm("evf1", "128M", "rate=5000,wss=4M");
	start_vm("evf2", "96M", "rate=5000,wss=4M");
	start_vm("evf3", "64M", "rate=5000,wss=4M");
	snprintf(report, sizeof(report), "%s/report.json", dir);
	snprintf(out, sizeof(out), "%s/evacuate.out", dir);
	snprintf(err_path, sizeof(err_path), "%s/evacuate.err", dir);
	evacuate_spawn(&ev, KVM_TEST_ARGS("evf1", "evf2", "evf3", "--order", "evf1,evf2,evf3",
					  "--report", report));
	/* Once the first migration starts, the plan is made: drain C. */
	end = kvm_test_now_ms() + 30000;
	do {
		kvm_test_sleep_ms(5);
		kvm_test_read_file(err_path, errs, sizeof(errs));
	} while (!strstr(errs, "evf1 (128.0 MiB)") && kvm_test_now_ms() < end);
	kill(ev.pid, SIGSTOP);
	ck_assert_msg(strstr(errs, "evf1 (128.0 MiB)"), "evacuate never started evf1: %s", errs);
	ck_assert_msg(!strstr(errs, "evf2 (96.0 MiB)"), "evf2 started before evf1 ended: %s", errs);
	VMIG(&r, tc.run, "host-info", "--drain=test");
	kill(ev.pid, SIGCONT);
	ck_assert_msg(r.status == 0, "host-info --drain: %s", r.err);

	st = kvm_test_finish(&ev, NULL);
	kvm_test_read_file(err_path, errs, sizeof(errs));
	kvm_test_read_file(out, text, sizeof(text));
	ck_assert_msg(st == 1, "evacuate: exit %d\n%s\n%s", st, text, errs);
	ck_assert_msg(strstr(text, "2 of 3 VMs moved") && strstr(text, "1 failed") &&
		      strstr(text, "evf2"), "summary: %s", text);

	kvm_test_read_file(report, text, sizeof(text));
	rep = parse_json(text);
	ck_assert_str_eq(jstr(rep, "result"), "incomplete");
	ck_assert_uint_eq(kvm_test_ju64(rep, "moved"), 2);
	ck_assert_uint_eq(kvm_test_ju64(rep, "failed"), 1);
	v = report_vm(rep, "evf2");
	ck_assert_str_eq(jstr(v, "result"), "failed");
	ck_assert_int_eq(target_of(v), 'C');
	ck_assert_msg(jstr(v, "error") && strstr(jstr(v, "error"), "drained"),
		      "the failure is not named: %s", json_object_to_json_string(v));
	ck_assert_str_eq(jstr(report_vm(rep, "evf1"), "result"), "completed");
	ck_assert_str_eq(jstr(report_vm(rep, "evf3"), "result"), "completed");
	ck_assert_int_eq(target_of(report_vm(rep, "evf1")), 'B');
	ck_assert_int_eq(target_of(report_vm(rep, "evf3")), 'B');
	json_object_put(rep);

	ck_assert_int_eq(runs_exactly_once("evf1"), 'B');
	ck_assert_int_eq(runs_exactly_once("evf3"), 'B');
	ck_assert_int_eq(runs_exactly_once("evf2"), 'A');
	kvm_test_assert_guest_runs(run_a, "evf2");
	kvm_test_assert_guest_runs(tb.run, "evf3");
	/* C took nothing. */
	ck_assert(!kvm_test_exists_in(tc.run, "evf2", "pid") &&
		  !kvm_test_exists_in(tc.run, "evf2", "sock"));
	VMIG(&r, tb.run, "stop", "evf1");
	VMIG(&r, tb.run, "stop", "evf3");
	VMIG(&r, run_a, "stop", "evf2");
}
END_TEST

/*
 * Ctrl-C while two migrations run that cannot converge (a guest dirtying
 * 48 MiB at full speed, a 1 ms downtime limit): both are cancelled, the
 * third never starts, and every VM runs exactly once, here.
 */
START_TEST(ctrl_c_cancels_running_ones)
{
	char report[400], text[65536], err_path[400], errs[65536], out[400];
	static const char *const names[] = { "evi1", "evi2", "evi3" };
	struct kvm_test_proc ev = { .out_path = out, .err_path = err_path };
	struct json_object *rep;
	struct kvm_test_result r;
	unsigned int i, started;
	uint64_t end;
	int st;

	start_targets("2G", "2G");
	for (i = 0; i < 3; i++)
		start_vm(names[i], "128M", "rate=max,wss=48M");
	snprintf(report, sizeof(report), "%s/report.json", dir);
	snprintf(out, sizeof(out), "%s/evacuate.out", dir);
	snprintf(err_path, sizeof(err_path), "%s/evacuate.err", dir);
	evacuate_spawn(&ev, KVM_TEST_ARGS("--all", "--parallel", "2", "--max-downtime", "1",
					  "--report", report));
	/* Wait until two destinations have claimed their VM: both run. */
	end = kvm_test_now_ms() + 60000;
	do {
		kvm_test_sleep_ms(20);
		started = 0;
		for (i = 0; i < 3; i++)
			started += kvm_test_exists_in(tb.run, names[i], "pid") ||
				   kvm_test_exists_in(tc.run, names[i], "pid");
	} while (started < 2 && kvm_test_now_ms() < end);
	kvm_test_read_file(err_path, errs, sizeof(errs));
	ck_assert_msg(started == 2, "%u migrations under way, expected 2: %s", started, errs);
	kvm_test_sleep_ms(300);
	kill(ev.pid, SIGINT);

	st = kvm_test_finish(&ev, NULL);
	kvm_test_read_file(err_path, errs, sizeof(errs));
	kvm_test_read_file(out, text, sizeof(text));
	ck_assert_msg(st == 1, "evacuate: exit %d\n%s\n%s", st, text, errs);
	ck_assert_msg(strstr(errs, "cancelling"), "no word of the cancel: %s", errs);

	kvm_test_read_file(report, text, sizeof(text));
	rep = parse_json(text);
	ck_assert_str_eq(jstr(rep, "result"), "interrupted");
	ck_assert_uint_eq(kvm_test_ju64(rep, "moved"), 0);
	ck_assert_uint_eq(kvm_test_ju64(rep, "not_started"), 1);
	{
		unsigned int cancelled = 0, not_started = 0;

		for (i = 0; i < 3; i++) {
			const char *res = jstr(report_vm(rep, names[i]), "result");

			cancelled += !strcmp(res, "cancelled");
			not_started += !strcmp(res, "not-started");
		}
		ck_assert_msg(cancelled == 2 && not_started == 1, "results: %s", text);
	}
	json_object_put(rep);

	/* Every VM runs exactly once: here; the destinations dropped theirs. */
	for (i = 0; i < 3; i++) {
		ck_assert_int_eq(runs_exactly_once(names[i]), 'A');
		kvm_test_assert_guest_runs(run_a, names[i]);
	}
	end = kvm_test_now_ms() + 10000;
	for (i = 0; i < 3; i++)
		while ((kvm_test_exists_in(tb.run, names[i], "pid") ||
			kvm_test_exists_in(tc.run, names[i], "pid")) && kvm_test_now_ms() < end)
			kvm_test_sleep_ms(50);
	for (i = 0; i < 3; i++) {
		ck_assert_msg(!kvm_test_exists_in(tb.run, names[i], "pid") &&
			      !kvm_test_exists_in(tc.run, names[i], "pid"),
			      "a destination kept a half-received %s", names[i]);
		VMIG(&r, run_a, "stop", names[i]);
	}
}
END_TEST

/*
 * --timeout-per-gib: a guest that dirties 48 MiB at full speed cannot
 * converge under a 1 ms limit.  128 MiB at 8 s/GiB is a 1 s timeout:
 * with cancel it stays here (and the evacuation fails); with force it
 * moves.
 */
START_TEST(timeout_per_gib_cancel_and_force)
{
	char report[400], text[65536];
	struct json_object *rep, *v;
	struct kvm_test_result r;

	start_targets("1G", "1G");
	start_vm("evt", "128M", "rate=max,wss=48M");
	snprintf(report, sizeof(report), "%s/report.json", dir);

	evacuate(&r, (const char *const[]){ "evt", "--max-downtime", "1", "--timeout-per-gib",
					    "8", "--report", report, NULL });
	ck_assert_msg(r.status == 1, "evacuate: exit %d: %s %s", r.status, r.out, r.err);
	kvm_test_read_file(report, text, sizeof(text));
	rep = parse_json(text);
	v = report_vm(rep, "evt");
	ck_assert_msg(strcmp(jstr(v, "result"), "completed") && jstr(v, "error") &&
		      strstr(jstr(v, "error"), "1 s"), "after the timeout: %s", text);
	json_object_put(rep);
	ck_assert_int_eq(runs_exactly_once("evt"), 'A');
	kvm_test_assert_guest_runs(run_a, "evt");

	/* Again, forced: it moves (the host is drained already: still fine). */
	evacuate(&r, (const char *const[]){ "evt", "--max-downtime", "1", "--timeout-per-gib",
					    "8", "--on-timeout", "force", "--report", report,
					    NULL });
	ck_assert_msg(r.status == 0, "forced: exit %d: %s %s", r.status, r.out, r.err);
	kvm_test_read_file(report, text, sizeof(text));
	rep = parse_json(text);
	ck_assert_str_eq(jstr(report_vm(rep, "evt"), "result"), "completed");
	json_object_put(rep);
	ck_assert_int_ne(runs_exactly_once("evt"), 'A');
	VMIG(&r, kvm_test_exists_in(tb.run, "evt", "sock") ? tb.run : tc.run, "stop", "evt");
}
END_TEST

/*
 * --all and a VM that starts after the VMs were listed (here: the drain
 * mark is removed behind the evacuation's back, as if `vmig run` had
 * passed its check just before the mark was set): the host is not
 * empty, and the evacuation says so.
 */
START_TEST(vm_started_during_evacuation_is_reported)
{
	char report[400], text[65536], err_path[400], errs[65536], mark[400];
	struct json_object *rep, *late;
	struct kvm_test_proc ev = { .out_path = "/dev/null", .err_path = err_path };
	struct kvm_test_result r;
	uint64_t end;
	int st;

	start_targets("1G", "1G");
	start_vm("evl1", "64M", "rate=2000,wss=2M");
	snprintf(report, sizeof(report), "%s/report.json", dir);
	snprintf(err_path, sizeof(err_path), "%s/evacuate.err", dir);
	evacuate_spawn(&ev, KVM_TEST_ARGS("--all", "--report", report));
	end = kvm_test_now_ms() + 30000;
	do {
		kvm_test_sleep_ms(5);
		kvm_test_read_file(err_path, errs, sizeof(errs));
	} while (!strstr(errs, "evl1 (64.0 MiB)") && kvm_test_now_ms() < end);
	kill(ev.pid, SIGSTOP);
	snprintf(mark, sizeof(mark), "%s/drain", run_a);
	ck_assert_msg(unlink(mark) == 0, "no drain mark during the evacuation: %s",
		      strerror(errno));
	VMIG(&r, run_a, "run", "evl2", "--memory", "64M", "--workload", "rate=2000,wss=2M",
	     "--detach");
	kill(ev.pid, SIGCONT);
	ck_assert_msg(r.status == 0, "run evl2: %s", r.err);
	st = kvm_test_finish(&ev, NULL);
	kvm_test_read_file(err_path, errs, sizeof(errs));
	ck_assert_msg(st == 1, "evacuate: exit %d: %s", st, errs);
	ck_assert_msg(strstr(errs, "not moved") && strstr(errs, "evl2"), "%s", errs);

	kvm_test_read_file(report, text, sizeof(text));
	rep = parse_json(text);
	ck_assert_str_eq(jstr(rep, "result"), "incomplete");
	ck_assert_str_eq(jstr(report_vm(rep, "evl1"), "result"), "completed");
	ck_assert_msg(json_object_object_get_ex(rep, "started_during", &late) &&
		      json_object_array_length(late) == 1 &&
		      !strcmp(json_object_get_string(json_object_array_get_idx(late, 0)), "evl2"),
		      "report: %s", text);
	json_object_put(rep);
	ck_assert_int_ne(runs_exactly_once("evl1"), 'A');
	ck_assert_int_eq(runs_exactly_once("evl2"), 'A');
	VMIG(&r, run_a, "stop", "evl2");
	VMIG(&r, kvm_test_exists_in(tb.run, "evl1", "sock") ? tb.run : tc.run, "stop", "evl1");
}
END_TEST

/* --dry-run prints the plan and changes nothing, not even the drain mark. */
START_TEST(dry_run_moves_nothing)
{
	struct json_object *before, *after, *plan, *rep, *vms;
	struct kvm_test_result r;
	size_t i;

	start_targets("300M", "300M");
	/* A third target where nothing listens: left out, and the plan says why. */
	snprintf(extra_target, sizeof(extra_target), "127.0.0.1:%d", kvm_test_free_port());
	start_vm("evr1", "128M", "rate=2000,wss=2M");
	start_vm("evr2", "64M", "rate=2000,wss=2M");
	before = kvm_test_vm_status_try(run_a, "evr1");

	evacuate(&r, (const char *const[]){ "--all", "--dry-run", NULL });
	ck_assert_msg(r.status == 0, "dry run: exit %d: %s %s", r.status, r.out, r.err);
	ck_assert_msg(strstr(r.out, "evr1") && strstr(r.out, "evr2") &&
		      strstr(r.out, "Dry run") && strstr(r.out, "127.0.0.1:"), "plan: %s", r.out);
	ck_assert_msg(strstr(r.out, extra_target) && strstr(r.out, "unusable") &&
		      strcasestr(r.out, "connection refused"), "the dead target: %s", r.out);
	/* Each VM on its own target: spread, not packed. */
	{
		char b[32], c[32];

		snprintf(b, sizeof(b), ":%d\n", tb.sshd.port);
		snprintf(c, sizeof(c), ":%d\n", tc.sshd.port);
		ck_assert_msg(strstr(r.out, b) && strstr(r.out, c), "not spread: %s", r.out);
	}

	evacuate(&r, (const char *const[]){ "--all", "--dry-run", "--json", NULL });
	ck_assert_msg(r.status == 0, "dry run --json: exit %d: %s %s", r.status, r.out, r.err);
	rep = parse_json(r.out);
	ck_assert_str_eq(jstr(rep, "result"), "dry-run");
	ck_assert(json_object_object_get_ex(rep, "plan", &plan));
	ck_assert(json_object_object_get_ex(plan, "vms", &vms));
	ck_assert_uint_eq(json_object_array_length(vms), 2);
	for (i = 0; i < 2; i++)
		ck_assert_msg(jstr(json_object_array_get_idx(vms, i), "target"),
			      "no target in the plan: %s", r.out);
	/* Run order: small first by default. */
	ck_assert_str_eq(jstr(json_object_array_get_idx(vms, 0), "name"), "evr2");
	json_object_put(rep);

	/* --order and --exclude shape the plan. */
	{
		static const char *const orders[][2] = {
			{ "large-first", "evr1" }, { "evr1", "evr1" }, { "small-first", "evr2" },
		};

		for (i = 0; i < 3; i++) {
			evacuate(&r, (const char *const[]){ "--all", "--dry-run", "--json", "--order",
							    orders[i][0], NULL });
			ck_assert_msg(r.status == 0, "--order %s: %s", orders[i][0], r.err);
			rep = parse_json(r.out);
			json_object_object_get_ex(rep, "plan", &plan);
			json_object_object_get_ex(plan, "vms", &vms);
			ck_assert_str_eq(jstr(json_object_array_get_idx(vms, 0), "name"),
					 orders[i][1]);
			json_object_put(rep);
		}
		evacuate(&r, (const char *const[]){ "--all", "--dry-run", "--json", "--exclude",
						    "evr2", NULL });
		ck_assert_msg(r.status == 0, "--exclude: %s", r.err);
		rep = parse_json(r.out);
		json_object_object_get_ex(rep, "plan", &plan);
		json_object_object_get_ex(plan, "vms", &vms);
		ck_assert_uint_eq(json_object_array_length(vms), 1);
		ck_assert_str_eq(jstr(json_object_array_get_idx(vms, 0), "name"), "evr1");
		json_object_put(rep);
		evacuate(&r, (const char *const[]){ "evr1", "evz9", "--dry-run", NULL });
		ck_assert_msg(r.status == 1 && strstr(r.err, "evz9"), "unknown VM: %d %s",
			      r.status, r.err);
	}

	/* Nothing moved, nothing drained: the same VMM processes run on. */
	ck_assert_int_eq(runs_exactly_once("evr1"), 'A');
	ck_assert_int_eq(runs_exactly_once("evr2"), 'A');
	after = kvm_test_vm_status_try(run_a, "evr1");
	ck_assert_uint_eq(kvm_test_ju64(before, "pid"), kvm_test_ju64(after, "pid"));
	json_object_put(before);
	json_object_put(after);
	ck_assert(!drained(run_a));
	VMIG(&r, run_a, "stop", "evr1");
	VMIG(&r, run_a, "stop", "evr2");
}
END_TEST

/*
 * A plan that does not fit is refused, with why, before anything moves:
 * B has too little memory, C is drained.  The drain mark set for the
 * evacuation is taken back.
 */
START_TEST(plan_that_does_not_fit_is_refused)
{
	char report[400], text[65536];
	struct json_object *rep;
	struct kvm_test_result r;

	start_targets("150M", "2G");
	VMIG(&r, tc.run, "host-info", "--drain=maintenance");
	ck_assert_msg(r.status == 0, "drain C: %s", r.err);
	start_vm("evn1", "192M", "rate=2000,wss=2M");
	start_vm("evn2", "64M", "rate=2000,wss=2M");
	snprintf(report, sizeof(report), "%s/report.json", dir);

	evacuate(&r, (const char *const[]){ "evn1", "evn2", "--report", report, NULL });
	ck_assert_msg(r.status == 1, "evacuate: exit %d: %s %s", r.status, r.out, r.err);
	ck_assert_msg(strstr(r.err, "does not fit") && strstr(r.err, "evn1") &&
		      strstr(r.err, "fits on no target") && strstr(r.err, "drained") &&
		      strstr(r.err, "Nothing was moved"), "no reason given: %s", r.err);
	ck_assert_msg(!strstr(r.err, "starting"), "something started: %s", r.err);

	kvm_test_read_file(report, text, sizeof(text));
	rep = parse_json(text);
	ck_assert_str_eq(jstr(rep, "result"), "refused");
	ck_assert_msg(strstr(jstr(rep, "error"), "evn1"), "%s", text);
	json_object_put(rep);

	ck_assert_int_eq(runs_exactly_once("evn1"), 'A');
	ck_assert_int_eq(runs_exactly_once("evn2"), 'A');
	ck_assert(!drained(run_a));
	ck_assert(drained(tc.run));
	VMIG(&r, run_a, "stop", "evn1");
	VMIG(&r, run_a, "stop", "evn2");
}
END_TEST

/*
 * host-info reports what the planner needs, and the drain mark refuses
 * `vmig run` and incoming migrations until --undrain.
 */
START_TEST(host_info_and_drain_mark)
{
	struct json_object *o, *v;
	struct kvm_test_result r;

	setenv("VMIG_TEST_FREE_MEMORY", "123M", 1);
	VMIG(&r, run_a, "host-info", "--json");
	unsetenv("VMIG_TEST_FREE_MEMORY");
	ck_assert_msg(r.status == 0, "host-info: %s", r.err);
	o = parse_json(r.out);
	ck_assert_uint_eq(kvm_test_ju64(o, "free_memory_bytes"), 123 * MIB);
	ck_assert_uint_ge(kvm_test_ju64(o, "cpus"), 1);
	ck_assert_str_eq(jstr(o, "vmig_version"), PACKAGE_VERSION);
	ck_assert(json_object_object_get_ex(o, "kvm_cpuid", &v));
	ck_assert_uint_gt(json_object_array_length(v), 0);
	ck_assert(json_object_object_get_ex(o, "cpu_flags", &v));
	json_object_put(o);

	/* Without the hook: MemAvailable, which is not 0. */
	VMIG(&r, run_a, "host-info", "--json");
	o = parse_json(r.out);
	ck_assert_uint_gt(kvm_test_ju64(o, "free_memory_bytes"), 0);
	ck_assert_str_eq(jstr(o, "free_memory_source"), "MemAvailable");
	json_object_put(o);

	VMIG(&r, run_a, "host-info", "--drain=kernel update");
	ck_assert_msg(r.status == 0, "--drain: %s", r.err);
	ck_assert(drained(run_a));
	VMIG(&r, run_a, "host-info");
	ck_assert_msg(strstr(r.out, "kernel update"), "text output: %s", r.out);

	VMIG(&r, run_a, "run", "evx", "--memory", "64M", "--detach");
	ck_assert_msg(r.status == 1 && strstr(r.err, "drained") && strstr(r.err, "--undrain"),
		      "run: %d %s", r.status, r.err);
	ck_assert(!kvm_test_exists_in(run_a, "evx", "sock"));
	VMIG(&r, run_a, "incoming", "--listen", "tcp://127.0.0.1:0", "--detach");
	ck_assert_msg(r.status == 1 && strstr(r.err, "drained"), "incoming: %d %s", r.status,
		      r.err);

	/*
	 * A listener started before the mark still refuses the VM it gets
	 * (named: it took the name while waiting, the mark came after).
	 */
	VMIG(&r, run_a, "host-info", "--undrain");
	ck_assert_msg(r.status == 0, "--undrain: %s", r.err);
	{
		char sock[400], uri[420];

		snprintf(sock, sizeof(sock), "%s/in.sock", dir);
		snprintf(uri, sizeof(uri), "unix:%s", sock);
		VMIG(&r, tb.run, "run", "evy", "--memory", "64M", "--workload", "rate=2000,wss=2M",
		     "--detach");
		ck_assert_msg(r.status == 0, "run evy on B: %s", r.err);
		VMIG(&r, run_a, "incoming", "--listen", uri, "--name", "evy", "--detach");
		ck_assert_msg(r.status == 0, "incoming: %s", r.err);
		VMIG(&r, run_a, "host-info", "--drain");
		ck_assert_int_eq(r.status, 0);
		VMIG(&r, tb.run, "migrate", "evy", uri);
		ck_assert_msg(r.status == 1 && strstr(r.err, "keeps running"),
			      "migrate to a drained host: %d %s", r.status, r.err);
		/*
		 * The receiver refused the VM because of the mark, and said so in
		 * its log.  (The source usually repeats it, but over a socket it
		 * may see the connection close before it reads the refusal.)
		 */
		ck_assert_msg(incoming_log_says(run_a, "drained"), "the receiver did not refuse "
			      "for the drain mark; the source said: %s", r.err);
		ck_assert(!kvm_test_exists_in(run_a, "evy", "sock"));
		kvm_test_assert_guest_runs(tb.run, "evy");
		VMIG(&r, tb.run, "stop", "evy");
	}

	VMIG(&r, run_a, "host-info", "--undrain");
	ck_assert_msg(r.status == 0 && strstr(r.out, "takes VMs again"), "--undrain: %s", r.err);
	ck_assert(!drained(run_a));
	VMIG(&r, run_a, "run", "evx", "--memory", "64M", "--workload", "rate=2000,wss=2M",
	     "--detach");
	ck_assert_msg(r.status == 0, "run after --undrain: %s", r.err);
	VMIG(&r, run_a, "stop", "evx");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

/* The remote command for vmig_ssh_exec(), and option copies that keep it. */
START_TEST(remote_args_command)
{
	struct vmig_ssh_options o = { .remote_vmig = "/opt/vmig", .dest_name = "x",
				      .remote_args = "host-info --json" };
	struct vmig_ssh_options *copy;
	char buf[128];

	ck_assert_int_eq(vmig_ssh_remote_command(&o, buf, sizeof(buf)), 0);
	ck_assert_str_eq(buf, "/opt/vmig host-info --json");
	o.remote_vmig = NULL;
	ck_assert_int_eq(vmig_ssh_remote_command(&o, buf, sizeof(buf)), 0);
	ck_assert_str_eq(buf, "vmig host-info --json");
	ck_assert_int_eq(vmig_ssh_remote_command(&o, buf, 10), -ENOSPC);
	copy = vmig_ssh_options_dup(&o);
	ck_assert_ptr_nonnull(copy);
	ck_assert_str_eq(copy->remote_args, "host-info --json");
	ck_assert_str_eq(copy->dest_name, "x");
	free(copy);
	o.remote_args = NULL;
	ck_assert_int_eq(vmig_ssh_remote_command(&o, buf, sizeof(buf)), 0);
	ck_assert_str_eq(buf, "vmig incoming --stdio --name 'x'");
}
END_TEST

int main(void)
{
	Suite *s = suite_create("evacuate");
	TCase *tc_ev = tcase_create("evacuate");

	kvm_test_require_kvm();
	if (access(SSHD, X_OK) < 0 || access(SSH_KEYGEN, X_OK) < 0) {
		printf("SKIP: %s or ssh-keygen missing: these tests need Debian's openssh-server "
		       "and openssh-client (tools/install-deps installs them)\n", SSHD);
		return SKIP_EXIT;
	}
	tcase_add_unchecked_fixture(tc_ev, runner_setup, runner_teardown);
	tcase_add_checked_fixture(tc_ev, setup, teardown);
	tcase_set_timeout(tc_ev, 150);
	tcase_add_test(tc_ev, host_info_and_drain_mark);
	tcase_add_test(tc_ev, dry_run_moves_nothing);
	tcase_add_test(tc_ev, plan_that_does_not_fit_is_refused);
	tcase_add_test(tc_ev, evacuate_to_two_targets);
	tcase_add_test(tc_ev, one_vm_fails_the_others_complete);
	tcase_add_test(tc_ev, ctrl_c_cancels_running_ones);
	tcase_add_test(tc_ev, timeout_per_gib_cancel_and_force);
	tcase_add_test(tc_ev, vm_started_during_evacuation_is_reported);
	suite_add_tcase(s, tc_ev);
	{
		TCase *plain = tcase_create("options");

		tcase_add_test(plain, remote_args_command);
		suite_add_tcase(s, plain);
	}
	return kvm_test_run(s);
}
