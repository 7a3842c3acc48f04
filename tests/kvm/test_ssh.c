/*
 * vmig migrate over ssh:// against a real OpenSSH sshd, process to
 * process, as an admin uses it.
 *
 * Each test makes a directory with its own sshd: host and user keys made
 * with ssh-keygen, an sshd_config that listens on 127.0.0.1 on a free
 * port (AuthorizedKeysFile, PidFile and HostKey in the directory, no PAM,
 * no system file read or changed), started as `/usr/sbin/sshd -D -f CONF
 * -e`.  "Host A" and "host B" are two run directories; sshd does not pass
 * the environment on, so --remote-vmig names a wrapper script that sets
 * VMIG_RUN_DIR for B and execs $VMIG.  The known_hosts file is the
 * directory's too, HOME points there (no ~/.ssh keys) and SSH_AUTH_SOCK
 * is unset, but for the test that starts its own ssh-agent.  The runner
 * stops whatever a failed test left running.
 *
 * When root runs sshd, sshd needs its privilege separation directory
 * /run/sshd (normally made by its service unit): created if missing, as
 * an empty directory.
 *
 * Skips (77) without /dev/kvm or without sshd (tools/install-deps
 * installs Debian's openssh-server).
 */
#include "config.h"

#include <dirent.h>
#include <inttypes.h>
#include <signal.h>
#include <sys/wait.h>

#include <json-c/json.h>

#include "vmig/transport.h"
#include "kvm-test.h"
#include "proc-test.h"

#define SSHD       KVM_TEST_SSHD
#define SSH_KEYGEN KVM_TEST_SSH_KEYGEN
#define SSH_AGENT  "/usr/bin/ssh-agent"
#define SSH_ADD    "/usr/bin/ssh-add"

static const char *vmig_bin;
static char base[128];         /* every test's directory, made by the runner */
static char dir[256];          /* everything of one test */
static char run_a[300];        /* host A: where VMs start */
static char run_b[300];        /* host B: where they go over ssh */
static char known_hosts[300];
static char user_key[300];     /* authorized */
static char other_key[300];    /* not authorized */
static char rvmig_b[300];      /* the remote vmig for B: a wrapper */
static char rvmig_a[300];      /* the same for A, to come back */
static char ssh_uri[400];
static struct kvm_test_sshd sshd;

#define RUN_A(r, ...) KVM_TEST_VMIG((r), run_a, __VA_ARGS__)
#define RUN_B(r, ...) KVM_TEST_VMIG((r), run_b, __VA_ARGS__)
#define RUN(r, ...)   KVM_TEST_RUN((r), __VA_ARGS__)

static pid_t pid_in(const char *run_dir, const char *name)
{
	char path[600], buf[32];

	snprintf(path, sizeof(path), "%s/%s.pid", run_dir, name);
	kvm_test_read_file(path, buf, sizeof(buf));
	return (pid_t)atoi(buf);
}

static void start_vm(const char *name, const char *workload)
{
	kvm_test_start_vm(run_a, name, "160M", "2", workload);
}

/* ------------------------------------------------------------------------
 * The sshd of one test
 */

/* "SHA256:..." of a public key file, as OpenSSH prints it. */
static void fingerprint_of(const char *pub, char *buf, size_t len)
{
	struct kvm_test_result r;
	char *sp, *end;

	RUN(&r, SSH_KEYGEN, "-l", "-E", "sha256", "-f", pub);
	ck_assert_msg(r.status == 0, "ssh-keygen -lf %s: %s", pub, r.err);
	sp = strchr(r.out, ' ');
	ck_assert_ptr_nonnull(sp);
	end = strchr(sp + 1, ' ');
	ck_assert_ptr_nonnull(end);
	*end = 0;
	snprintf(buf, len, "%s", sp + 1);
}

/* A known_hosts line for our sshd with the key in @pub. */
static void known_hosts_line(const char *pub, char *buf, size_t len)
{
	kvm_test_known_hosts_line(sshd.port, pub, buf, len);
}

static void sshd_log(char *buf, size_t len)
{
	kvm_test_sshd_log(&sshd, buf, len);
}

/* Kill every per-connection sshd (the master's children): a crash. */
static int kill_sshd_sessions(void)
{
	DIR *d = opendir("/proc");
	struct dirent *e;
	int killed = 0;

	ck_assert_ptr_nonnull(d);
	while ((e = readdir(d))) {
		char path[300], buf[1024], *p;
		int ppid = 0;

		if (e->d_name[0] < '0' || e->d_name[0] > '9')
			continue;
		snprintf(path, sizeof(path), "/proc/%s/status", e->d_name);
		kvm_test_read_file(path, buf, sizeof(buf));
		p = strstr(buf, "\nPPid:");
		if (p)
			ppid = atoi(p + 6);
		if (ppid == sshd.pid && kill(atoi(e->d_name), SIGKILL) == 0)
			killed++;
	}
	closedir(d);
	return killed;
}

static void setup(void)
{
	char text[1200];

	vmig_bin = kvm_test_vmig_bin();
	kvm_test_make_dirs(base, dir, sizeof(dir), run_a, run_b, sizeof(run_a));
	snprintf(known_hosts, sizeof(known_hosts), "%s/known_hosts", dir);
	snprintf(user_key, sizeof(user_key), "%s/id_user", dir);
	snprintf(other_key, sizeof(other_key), "%s/id_other", dir);
	kvm_test_keygen(user_key);
	kvm_test_keygen(other_key);

	/* sshd passes no environment: the wrappers say which "host" this is. */
	snprintf(rvmig_b, sizeof(rvmig_b), "%s/vmig-on-b", dir);
	snprintf(text, sizeof(text), "#!/bin/sh\nVMIG_RUN_DIR=%s; export VMIG_RUN_DIR\n"
		 "exec %s \"$@\"\n", run_b, vmig_bin);
	kvm_test_write_file(rvmig_b, text, 0755);
	snprintf(rvmig_a, sizeof(rvmig_a), "%s/vmig-on-a", dir);
	snprintf(text, sizeof(text), "#!/bin/sh\nVMIG_RUN_DIR=%s; export VMIG_RUN_DIR\n"
		 "exec %s \"$@\"\n", run_a, vmig_bin);
	kvm_test_write_file(rvmig_a, text, 0755);

	kvm_test_sshd_start(&sshd, dir, dir, NULL);      /* makes the host key */
	kvm_test_sshd_authorize(&sshd, user_key);
	kvm_test_sshd_uri(&sshd, ssh_uri, sizeof(ssh_uri));
	/* Nothing of the user's: no agent, no ~/.ssh. */
	kvm_test_ssh_isolate(dir);
}

static void teardown(void)
{
	kvm_test_sshd_stop(&sshd);
	kvm_test_reap(dir);
}

/*
 * In the runner, around the whole case: a test that fails ends its
 * process at once, without its teardown, so what it started (VMMs, sshd)
 * is stopped here, from the pid files under @base.
 */
static void runner_setup(void)
{
	kvm_test_make_base(base, sizeof(base), "ssh");
}

static void runner_teardown(void)
{
	kvm_test_reap(base);
}

/* known_hosts with our sshd's real key; hashed with ssh-keygen -H. */
static void trust_sshd(bool hashed)
{
	char line[4200], pub[400], old[400];
	struct kvm_test_result r;

	snprintf(pub, sizeof(pub), "%s/hostkey.pub", dir);
	known_hosts_line(pub, line, sizeof(line));
	kvm_test_write_file(known_hosts, line, 0600);
	if (hashed) {
		RUN(&r, SSH_KEYGEN, "-q", "-H", "-f", known_hosts);
		ck_assert_msg(r.status == 0, "ssh-keygen -H: %s", r.err);
		kvm_test_read_file(known_hosts, line, sizeof(line));
		ck_assert_msg(!strncmp(line, "|1|", 3), "not hashed: %s", line);
		snprintf(old, sizeof(old), "%s.old", known_hosts);
		unlink(old);
	}
}

/* vmig migrate NAME over ssh with @extra options (NULL-terminated). */
static void migrate_ssh(struct kvm_test_result *r, const char *run_dir, const char *name,
			const char *rvmig, const char *const *extra)
{
	const char *args[40] = { "migrate", name, ssh_uri, "--known-hosts", known_hosts,
				 "--remote-vmig", rvmig, "--json" };
	unsigned int i = 8;

	while (extra && *extra && i < 39)
		args[i++] = *extra++;
	args[i] = NULL;
	kvm_test_vmig(r, run_dir, args);
}

/* The migration failed with @want in its message; the VM runs on A. */
static void assert_refused(const struct kvm_test_result *r, const char *name, const char *want)
{
	char log[8192];

	sshd_log(log, sizeof(log));
	ck_assert_msg(r->status == 1, "migrate: exit %d: %s %s (sshd: %s)", r->status, r->out,
		      r->err, log);
	ck_assert_msg(strstr(r->err, want), "migrate said '%s', expected '%s'", r->err, want);
	ck_assert_msg(strstr(r->err, "keeps running"), "migrate said '%s'", r->err);
	kvm_test_assert_guest_runs(run_a, name);
	ck_assert(!kvm_test_exists_in(run_b, name, "pid") &&
		  !kvm_test_exists_in(run_b, name, "sock"));
}

/* ------------------------------------------------------------------------
 * Tests
 */

START_TEST(live_migration_over_ssh)
{
	struct json_object *res, *o;
	struct kvm_test_result r;
	char log[8192];
	uint64_t before;
	pid_t dst;

	trust_sshd(true);              /* a hashed entry, as Debian's ssh writes */
	start_vm("mv", "rate=max,wss=2M");
	o = kvm_test_vm_status(run_a, "mv");
	before = kvm_test_pages_written(o);
	json_object_put(o);

	migrate_ssh(&r, run_a, "mv", rvmig_b,
		    (const char *const[]){ "--identity", user_key, "--dest-name", "web2", NULL });
	sshd_log(log, sizeof(log));
	ck_assert_msg(r.status == 0, "migrate: exit %d: %s %s (sshd: %s)", r.status, r.out,
		      r.err, log);
	res = json_tokener_parse(r.out);
	ck_assert_msg(res, "--json printed: %s", r.out);
	ck_assert_msg(!strcmp(json_object_get_string(json_object_object_get(res, "status")),
			      "completed"), "result: %s", r.out);
	ck_assert_uint_gt(kvm_test_ju64(res, "transferred_bytes"), 0);
	json_object_put(res);

	/* The source VMM let go; B runs the VM under its new name, and on. */
	ck_assert(!kvm_test_exists_in(run_a, "mv", "pid") &&
		  !kvm_test_exists_in(run_a, "mv", "sock"));
	kvm_test_assert_arrived(run_b, "web2", before);

	/* It outlives the SSH session, and sshd itself. */
	dst = pid_in(run_b, "web2");
	ck_assert_int_gt(dst, 0);
	kill_sshd_sessions();
	kill(sshd.pid, SIGKILL);
	waitpid(sshd.pid, NULL, 0);
	sshd.pid = 0;
	kvm_test_sleep_ms(300);
	ck_assert_msg(kill(dst, 0) == 0, "the VMM on B died with the SSH session");
	kvm_test_assert_guest_runs(run_b, "web2");
	RUN_B(&r, "stop", "web2");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

/*
 * --channels 3 over SSH: three SSH connections, the two extra ones running
 * `vmig incoming --join`, which hand their stdin/stdout to the first; the
 * VM arrives and runs on, and no join process or socket is left behind.
 */
START_TEST(channels_over_ssh)
{
	struct json_object *res, *pages, *o;
	struct kvm_test_result r;
	char log[8192], cmd[600];
	uint64_t before;

	trust_sshd(false);
	start_vm("mc", "rate=max,wss=8M");
	o = kvm_test_vm_status(run_a, "mc");
	before = kvm_test_pages_written(o);
	json_object_put(o);

	migrate_ssh(&r, run_a, "mc", rvmig_b,
		    (const char *const[]){ "--identity", user_key, "--channels", "3",
					   "--compress", "none", NULL });
	sshd_log(log, sizeof(log));
	ck_assert_msg(r.status == 0, "migrate: exit %d: %s %s (sshd: %s)", r.status, r.out,
		      r.err, log);
	res = json_tokener_parse(r.out);
	ck_assert_msg(res, "--json printed: %s", r.out);
	ck_assert_msg(!strcmp(json_object_get_string(json_object_object_get(res, "status")),
			      "completed"), "result: %s", r.out);
	pages = json_object_object_get(res, "pages");
	ck_assert_msg(pages && kvm_test_ju64(pages, "raw") > 2000, "%s", r.out);
	json_object_put(res);
	/* Three logins: the migration's and one per extra channel. */
	{
		unsigned int logins = 0;

		for (const char *p = log; (p = strstr(p, "Accepted publickey")); p++)
			logins++;
		ck_assert_msg(logins == 3, "%u SSH logins, want 3 (sshd: %s)", logins, log);
	}
	kvm_test_assert_arrived(run_b, "mc", before);
	kvm_test_assert_guest_runs(run_b, "mc");
	kvm_test_sleep_ms(300);
	snprintf(cmd, sizeof(cmd), "pgrep -f 'incoming --joi[n]' >/dev/null");
	ck_assert_msg(system(cmd) != 0, "a vmig incoming --join outlived the migration");
	snprintf(cmd, sizeof(cmd), "ls %s/join-*.sock >/dev/null 2>&1", run_b);
	ck_assert_msg(system(cmd) != 0, "the join socket was left in %s", run_b);
	RUN_B(&r, "stop", "mc");
	ck_assert_int_eq(r.status, 0);
}
END_TEST

/*
 * The key in the agent of the shell that runs vmig migrate, not in the
 * VMM's environment (started without SSH_AUTH_SOCK), and no key file.
 */
START_TEST(agent_authentication)
{
	char sock[400], log[400], pid[400], num[32];
	struct kvm_test_proc agent = { .stdin_path = "/dev/null", .out_path = "/dev/null",
				       .err_path = log };
	struct kvm_test_result r;
	int i;

	trust_sshd(false);
	start_vm("ag", "rate=max,wss=2M");
	snprintf(sock, sizeof(sock), "%s/agent.sock", dir);
	snprintf(log, sizeof(log), "%s/agent.log", dir);
	kvm_test_spawn(&agent, KVM_TEST_ARGS(SSH_AGENT, "-D", "-a", sock));
	snprintf(pid, sizeof(pid), "%s/agent.pid", dir);
	snprintf(num, sizeof(num), "%d\n", (int)agent.pid);
	kvm_test_write_file(pid, num, 0600);
	for (i = 0; i < 500 && access(sock, F_OK) < 0; i++)
		kvm_test_sleep_ms(10);
	kvm_test_read_file(log, r.err, sizeof(r.err));
	ck_assert_msg(access(sock, F_OK) == 0, "ssh-agent did not start: %s", r.err);
	setenv("SSH_AUTH_SOCK", sock, 1);
	RUN(&r, SSH_ADD, "-q", user_key);
	ck_assert_msg(r.status == 0, "ssh-add: %s", r.err);

	migrate_ssh(&r, run_a, "ag", rvmig_b, NULL);
	kill(agent.pid, SIGTERM);
	kvm_test_finish(&agent, NULL);
	unsetenv("SSH_AUTH_SOCK");
	ck_assert_msg(r.status == 0, "migrate: exit %d: %s %s", r.status, r.out, r.err);
	kvm_test_assert_guest_runs(run_b, "ag");
	RUN_B(&r, "stop", "ag");
}
END_TEST

START_TEST(unknown_host_key_refused)
{
	char fp[128], pub[400], kh[256];
	struct kvm_test_result r;

	kvm_test_write_file(known_hosts, "", 0600);
	start_vm("uk", "rate=max,wss=2M");
	migrate_ssh(&r, run_a, "uk", rvmig_b, (const char *const[]){ "--identity", user_key, NULL });
	assert_refused(&r, "uk", "not known");
	snprintf(pub, sizeof(pub), "%s/hostkey.pub", dir);
	fingerprint_of(pub, fp, sizeof(fp));
	ck_assert_msg(strstr(r.err, fp), "no fingerprint %s in '%s'", fp, r.err);
	ck_assert_msg(strstr(r.err, "--accept-new-host-key"), "no advice in '%s'", r.err);
	kvm_test_read_file(known_hosts, kh, sizeof(kh));
	ck_assert_msg(kh[0] == 0, "known_hosts changed: %s", kh);
}
END_TEST

START_TEST(changed_host_key_refused)
{
	char fp[128], pub[420], line[4200], kh[4200], impostor[400];
	struct kvm_test_result r;

	/* known_hosts holds another key for our host: that of an impostor. */
	snprintf(impostor, sizeof(impostor), "%s/impostor", dir);
	kvm_test_keygen(impostor);
	snprintf(pub, sizeof(pub), "%s.pub", impostor);
	known_hosts_line(pub, line, sizeof(line));
	kvm_test_write_file(known_hosts, line, 0600);
	start_vm("ck", "rate=max,wss=2M");

	migrate_ssh(&r, run_a, "ck", rvmig_b, (const char *const[]){ "--identity", user_key, NULL });
	assert_refused(&r, "ck", "CHANGED");
	snprintf(pub, sizeof(pub), "%s/hostkey.pub", dir);
	fingerprint_of(pub, fp, sizeof(fp));
	ck_assert_msg(strstr(r.err, fp), "no fingerprint %s in '%s'", fp, r.err);
	ck_assert_msg(strstr(r.err, "ssh-keygen"), "no advice in '%s'", r.err);

	/* accept-new never replaces a changed key. */
	migrate_ssh(&r, run_a, "ck", rvmig_b,
		    (const char *const[]){ "--identity", user_key, "--accept-new-host-key", NULL });
	assert_refused(&r, "ck", "CHANGED");
	kvm_test_read_file(known_hosts, kh, sizeof(kh));
	ck_assert_str_eq(kh, line);
}
END_TEST

START_TEST(accept_new_host_key_records_it)
{
	char line[4200], kh[4200], pub[400], host[64];
	struct kvm_test_result r;

	start_vm("an", "rate=max,wss=2M");
	ck_assert(access(known_hosts, F_OK) < 0);
	migrate_ssh(&r, run_a, "an", rvmig_b,
		    (const char *const[]){ "--identity", user_key, "--accept-new-host-key", NULL });
	ck_assert_msg(r.status == 0, "migrate: exit %d: %s %s", r.status, r.out, r.err);
	kvm_test_assert_guest_runs(run_b, "an");

	/* Recorded as OpenSSH would, and OpenSSH's own tools find it. */
	snprintf(pub, sizeof(pub), "%s/hostkey.pub", dir);
	known_hosts_line(pub, line, sizeof(line));
	kvm_test_read_file(known_hosts, kh, sizeof(kh));
	ck_assert_str_eq(kh, line);
	snprintf(host, sizeof(host), "[127.0.0.1]:%d", sshd.port);
	RUN(&r, SSH_KEYGEN, "-F", host, "-f", known_hosts);
	ck_assert_msg(r.status == 0, "ssh-keygen -F %s: %s %s", host, r.out, r.err);

	/* And from then on it is known: back from B to A, without the flag. */
	migrate_ssh(&r, run_b, "an", rvmig_a, (const char *const[]){ "--identity", user_key, NULL });
	ck_assert_msg(r.status == 0, "migrate back: exit %d: %s %s", r.status, r.out, r.err);
	kvm_test_assert_guest_runs(run_a, "an");
	ck_assert(!kvm_test_exists_in(run_b, "an", "pid"));
	kvm_test_read_file(known_hosts, kh, sizeof(kh));
	ck_assert_str_eq(kh, line);
	RUN_A(&r, "stop", "an");
}
END_TEST

START_TEST(authentication_failure)
{
	struct kvm_test_result r;

	trust_sshd(false);
	start_vm("af", "rate=max,wss=2M");
	migrate_ssh(&r, run_a, "af", rvmig_b, (const char *const[]){ "--identity", other_key, NULL });
	assert_refused(&r, "af", "cannot log in");
	ck_assert_msg(strstr(r.err, other_key) && strstr(r.err, "refused"),
		      "the key tried is not named: '%s'", r.err);
	/* No key at all: no agent, nothing in ~/.ssh. */
	migrate_ssh(&r, run_a, "af", rvmig_b, NULL);
	assert_refused(&r, "af", "cannot log in");
	ck_assert_msg(strstr(r.err, "no ssh-agent"), "'%s'", r.err);
}
END_TEST

START_TEST(vmig_missing_on_the_remote_side)
{
	char missing[400];
	struct kvm_test_result r;

	trust_sshd(false);
	start_vm("vm", "rate=max,wss=2M");
	snprintf(missing, sizeof(missing), "%s/no/such/vmig", dir);
	migrate_ssh(&r, run_a, "vm", missing, (const char *const[]){ "--identity", user_key, NULL });
	assert_refused(&r, "vm", "command not found");
	ck_assert_msg(strstr(r.err, missing) && strstr(r.err, "--remote-vmig"),
		      "no path or advice in '%s'", r.err);
}
END_TEST

START_TEST(sshd_killed_mid_stream)
{
	char path[400];
	struct kvm_test_proc mig = { .run_dir = run_a, .out_path = path, .err_path = path };
	struct kvm_test_result r;
	pid_t dst = 0;
	int i, killed;

	trust_sshd(false);
	/* 96 MiB dirtied at full speed never converges under a 1 ms limit. */
	start_vm("sk", "rate=max,wss=48M");
	snprintf(path, sizeof(path), "%s/migrate.out", dir);
	kvm_test_spawn(&mig, KVM_TEST_ARGS(vmig_bin, "migrate", "sk", ssh_uri, "--known-hosts",
					   known_hosts, "--remote-vmig", rvmig_b, "--identity",
					   user_key, "--max-downtime", "1"));
	for (i = 0; i < 1000 && !dst; i++) {
		kvm_test_sleep_ms(10);
		dst = pid_in(run_b, "sk");
	}
	ck_assert_msg(dst > 0, "the destination never claimed the VM");
	kvm_test_sleep_ms(300);
	killed = kill_sshd_sessions();
	ck_assert_msg(killed > 0, "no sshd session to kill");

	kvm_test_finish(&mig, &r);
	ck_assert_msg(r.status == 1, "migrate: exit %d: %s", r.status, r.out);
	ck_assert_msg(strstr(r.out, "failed") && strstr(r.out, "keeps running"), "%s", r.out);
	ck_assert_msg(strstr(r.out, "127.0.0.1"), "the error does not name the host: %s", r.out);
	kvm_test_assert_guest_runs(run_a, "sk");

	/* The destination, cut off, discards its half and exits. */
	for (i = 0; i < 500 && kill(dst, 0) == 0; i++)
		kvm_test_sleep_ms(20);
	ck_assert_msg(kill(dst, 0) < 0, "the destination still runs after sshd died");
	ck_assert(!kvm_test_exists_in(run_b, "sk", "pid"));
}
END_TEST

/* The remote command line, quoted for the remote shell; option copies. */
START_TEST(remote_command_and_options)
{
	struct vmig_ssh_options o = { .remote_vmig = "env X=1 /opt/vmig", .dest_name = "it's",
				      .known_hosts = "/k", .accept_new_host_key = true };
	struct vmig_ssh_options *copy;
	char buf[128];

	ck_assert_int_eq(vmig_ssh_remote_command(NULL, buf, sizeof(buf)), 0);
	ck_assert_str_eq(buf, "vmig incoming --stdio");
	ck_assert_int_eq(vmig_ssh_remote_command(&o, buf, sizeof(buf)), 0);
	ck_assert_str_eq(buf, "env X=1 /opt/vmig incoming --stdio --name 'it'\\''s'");
	ck_assert_int_eq(vmig_ssh_remote_command(&o, buf, 20), -ENOSPC);
	ck_assert_int_eq(vmig_ssh_remote_command(&o, buf, 40), -ENOSPC);

	copy = vmig_ssh_options_dup(&o);
	ck_assert_ptr_nonnull(copy);
	o.known_hosts = "/changed";
	ck_assert_str_eq(copy->known_hosts, "/k");
	ck_assert_str_eq(copy->dest_name, "it's");
	ck_assert_ptr_null(copy->identity);
	ck_assert(copy->accept_new_host_key);
	free(copy);
	copy = vmig_ssh_options_dup(NULL);
	ck_assert_ptr_nonnull(copy);
	ck_assert_ptr_null(copy->remote_vmig);
	free(copy);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("ssh");
	TCase *tc = tcase_create("ssh");

	kvm_test_require_kvm();
	if (access(SSHD, X_OK) < 0 || access(SSH_KEYGEN, X_OK) < 0 ||
	    access(SSH_AGENT, X_OK) < 0 || access(SSH_ADD, X_OK) < 0) {
		printf("SKIP: %s or OpenSSH's client tools missing: these tests need Debian's "
		       "openssh-server and openssh-client (tools/install-deps installs them)\n",
		       SSHD);
		return SKIP_EXIT;
	}
	tcase_add_unchecked_fixture(tc, runner_setup, runner_teardown);
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 90);
	tcase_add_test(tc, live_migration_over_ssh);
	tcase_add_test(tc, channels_over_ssh);
	tcase_add_test(tc, agent_authentication);
	tcase_add_test(tc, unknown_host_key_refused);
	tcase_add_test(tc, changed_host_key_refused);
	tcase_add_test(tc, accept_new_host_key_records_it);
	tcase_add_test(tc, authentication_failure);
	tcase_add_test(tc, vmig_missing_on_the_remote_side);
	tcase_add_test(tc, sshd_killed_mid_stream);
	suite_add_tcase(s, tc);
	{
		TCase *plain = tcase_create("options");

		tcase_add_test(plain, remote_command_and_options);
		suite_add_tcase(s, plain);
	}
	return kvm_test_run(s);
}
