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

#include <arpa/inet.h>
#include <dirent.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <json-c/json.h>

#include "vmig/transport.h"
#include "kvm-test.h"
#include "proc-test.h"

#define SSHD       "/usr/sbin/sshd"
#define SSH_KEYGEN "/usr/bin/ssh-keygen"
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
static int sshd_port;
static pid_t sshd_pid;

struct result {
	int status;            /* exit code, or 128 + signal */
	char out[65536];
	char err[65536];
};

/* Run @argv[0] with @env_run_dir as VMIG_RUN_DIR (NULL: keep). */
static void run_argv(struct result *r, const char *env_run_dir, const char *const *argv)
{
	int out[2], err[2], st;
	pid_t pid;

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
		if (env_run_dir)
			setenv("VMIG_RUN_DIR", env_run_dir, 1);
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	close(out[1]);
	close(err[1]);
	/* A detached VMM keeps no copy of these pipes: it reopens 1 and 2. */
	kvm_test_read_all(err[0], r->err, sizeof(r->err));
	kvm_test_read_all(out[0], r->out, sizeof(r->out));
	close(out[0]);
	close(err[0]);
	ck_assert_int_eq(waitpid(pid, &st, 0), pid);
	r->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static void run_vmig(struct result *r, const char *run_dir, const char *const *args)
{
	const char *argv[40];
	unsigned int i = 0;

	argv[i++] = vmig_bin;
	while (*args && i < 39)
		argv[i++] = *args++;
	argv[i] = NULL;
	run_argv(r, run_dir, argv);
}

#define RUN_A(r, ...) run_vmig((r), run_a, (const char *const[]){ __VA_ARGS__, NULL })
#define RUN_B(r, ...) run_vmig((r), run_b, (const char *const[]){ __VA_ARGS__, NULL })
#define RUN(r, ...)   run_argv((r), NULL, (const char *const[]){ __VA_ARGS__, NULL })

static bool exists_in(const char *run_dir, const char *name, const char *suffix)
{
	char path[512];

	snprintf(path, sizeof(path), "%s/%s.%s", run_dir, name, suffix);
	return access(path, F_OK) == 0;
}

static pid_t pid_in(const char *run_dir, const char *name)
{
	char path[600], buf[32];

	snprintf(path, sizeof(path), "%s/%s.pid", run_dir, name);
	kvm_test_read_file(path, buf, sizeof(buf));
	return (pid_t)atoi(buf);
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

static uint64_t jget(struct json_object *o, const char *key)
{
	struct json_object *v;

	ck_assert_msg(json_object_object_get_ex(o, key, &v), "no '%s' in %s", key,
		      json_object_to_json_string(o));
	return json_object_get_uint64(v);
}

/* The guest's page counter, 0 until the guest has published it. */
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

	RUN_A(&r, "run", name, "--memory", "160M", "--vcpus", "2", "--workload", workload,
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

/* ------------------------------------------------------------------------
 * The sshd of one test
 */

static void keygen(const char *path)
{
	struct result r;

	RUN(&r, SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "vmig-test", "-f", path);
	ck_assert_msg(r.status == 0, "ssh-keygen -f %s: %s", path, r.err);
}

/* "SHA256:..." of a public key file, as OpenSSH prints it. */
static void fingerprint_of(const char *pub, char *buf, size_t len)
{
	struct result r;
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
	char key[4096], *nl, *sp;

	kvm_test_read_file(pub, key, sizeof(key));
	nl = strchr(key, '\n');
	if (nl)
		*nl = 0;
	sp = strrchr(key, ' ');       /* drop the comment */
	if (sp && sp != strchr(key, ' '))
		*sp = 0;
	snprintf(buf, len, "[127.0.0.1]:%d %s\n", sshd_port, key);
}

static void sshd_log(char *buf, size_t len)
{
	char path[400];

	snprintf(path, sizeof(path), "%s/sshd.log", dir);
	kvm_test_read_file(path, buf, len);
}

static void start_sshd(void)
{
	char conf[600], text[4096], log[400], hostkey[400], auth[400], pub[400];
	uint64_t end;
	int fd;

	snprintf(hostkey, sizeof(hostkey), "%s/hostkey", dir);
	snprintf(auth, sizeof(auth), "%s/authorized_keys", dir);
	snprintf(conf, sizeof(conf), "%s/sshd_config", dir);
	snprintf(log, sizeof(log), "%s/sshd.log", dir);
	sshd_port = kvm_test_free_port();
	snprintf(text, sizeof(text),
		 "ListenAddress 127.0.0.1\n"
		 "Port %d\n"
		 "HostKey %s\n"
		 "AuthorizedKeysFile %s\n"
		 "PidFile %s/sshd.pid\n"
		 "StrictModes no\n"
		 "UsePAM no\n"
		 "PasswordAuthentication no\n"
		 "KbdInteractiveAuthentication no\n"
		 "PermitRootLogin prohibit-password\n"
		 "PrintMotd no\n"
		 "LogLevel VERBOSE\n",
		 sshd_port, hostkey, auth, dir);
	kvm_test_write_file(conf, text, 0600);
	if (geteuid() == 0 && mkdir("/run/sshd", 0755) < 0 && errno != EEXIST)
		ck_abort_msg("cannot create /run/sshd: %s", strerror(errno));

	sshd_pid = fork();
	ck_assert_int_ge(sshd_pid, 0);
	if (sshd_pid == 0) {
		fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
		dup2(fd, 2);
		dup2(fd, 1);
		execl(SSHD, SSHD, "-D", "-f", conf, "-e", (char *)NULL);
		_exit(127);
	}
	end = kvm_test_now_ms() + 10000;
	while (!kvm_test_port_open(sshd_port)) {
		int st;

		if (waitpid(sshd_pid, &st, WNOHANG) == sshd_pid) {
			sshd_pid = 0;
			sshd_log(text, sizeof(text));
			ck_abort_msg("sshd exited at start: %s", text);
		}
		ck_assert_msg(kvm_test_now_ms() < end, "sshd does not listen on port %d", sshd_port);
		kvm_test_sleep_ms(20);
	}
	snprintf(pub, sizeof(pub), "%s.pub", user_key);
	kvm_test_read_file(pub, text, sizeof(text));
	kvm_test_write_file(auth, text, 0600);
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
		if (ppid == sshd_pid && kill(atoi(e->d_name), SIGKILL) == 0)
			killed++;
	}
	closedir(d);
	return killed;
}

static void setup(void)
{
	char text[1200];
	struct passwd *pw = getpwuid(geteuid());

	vmig_bin = getenv("VMIG");
	ck_assert_msg(vmig_bin && *vmig_bin, "set VMIG to the vmig binary");
	ck_assert_ptr_nonnull(pw);
	snprintf(dir, sizeof(dir), "%s/t-XXXXXX", base);
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(run_a, sizeof(run_a), "%s/A", dir);
	snprintf(run_b, sizeof(run_b), "%s/B", dir);
	ck_assert_int_eq(mkdir(run_a, 0700), 0);
	ck_assert_int_eq(mkdir(run_b, 0700), 0);
	snprintf(known_hosts, sizeof(known_hosts), "%s/known_hosts", dir);
	snprintf(user_key, sizeof(user_key), "%s/id_user", dir);
	snprintf(other_key, sizeof(other_key), "%s/id_other", dir);
	snprintf(text, sizeof(text), "%s/hostkey", dir);
	keygen(text);
	keygen(user_key);
	keygen(other_key);

	/* sshd passes no environment: the wrappers say which "host" this is. */
	snprintf(rvmig_b, sizeof(rvmig_b), "%s/vmig-on-b", dir);
	snprintf(text, sizeof(text), "#!/bin/sh\nVMIG_RUN_DIR=%s; export VMIG_RUN_DIR\n"
		 "exec %s \"$@\"\n", run_b, vmig_bin);
	kvm_test_write_file(rvmig_b, text, 0755);
	snprintf(rvmig_a, sizeof(rvmig_a), "%s/vmig-on-a", dir);
	snprintf(text, sizeof(text), "#!/bin/sh\nVMIG_RUN_DIR=%s; export VMIG_RUN_DIR\n"
		 "exec %s \"$@\"\n", run_a, vmig_bin);
	kvm_test_write_file(rvmig_a, text, 0755);

	start_sshd();
	snprintf(ssh_uri, sizeof(ssh_uri), "ssh://%s@127.0.0.1:%d", pw->pw_name, sshd_port);
	/* Nothing of the user's: no agent, no ~/.ssh. */
	unsetenv("SSH_AUTH_SOCK");
	setenv("HOME", dir, 1);
}

/* Stop whatever runs from @path (VMMs, sshd, the agent), remove it all. */
static void reap(const char *path)
{
	char cmd[1024];

	snprintf(cmd, sizeof(cmd), "for p in %s/*.pid %s/*/*.pid %s/*/*/*.pid; do "
		 "[ -s \"$p\" ] && kill -9 $(cat \"$p\") 2>/dev/null; done; rm -rf %s",
		 path, path, path, path);
	if (system(cmd) != 0)
		fprintf(stderr, "cleanup of %s failed\n", path);
}

static void teardown(void)
{
	if (sshd_pid > 0) {
		kill(sshd_pid, SIGTERM);
		waitpid(sshd_pid, NULL, 0);
	}
	reap(dir);
}

/*
 * In the runner, around the whole case: a test that fails ends its
 * process at once, without its teardown, so what it started (VMMs, sshd)
 * is stopped here, from the pid files under @base.
 */
static void runner_setup(void)
{
	snprintf(base, sizeof(base), "/tmp/vmig-ssh-XXXXXX");
	if (!mkdtemp(base)) {
		perror("mkdtemp");
		exit(EXIT_FAILURE);
	}
}

static void runner_teardown(void)
{
	reap(base);
}

/* known_hosts with our sshd's real key; hashed with ssh-keygen -H. */
static void trust_sshd(bool hashed)
{
	char line[4200], pub[400], old[400];
	struct result r;

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
static void migrate_ssh(struct result *r, const char *run_dir, const char *name,
			const char *rvmig, const char *const *extra)
{
	const char *args[40] = { "migrate", name, ssh_uri, "--known-hosts", known_hosts,
				 "--remote-vmig", rvmig, "--json" };
	unsigned int i = 8;

	while (extra && *extra && i < 39)
		args[i++] = *extra++;
	args[i] = NULL;
	run_vmig(r, run_dir, args);
}

/* The migration failed with @want in its message; the VM runs on A. */
static void assert_refused(const struct result *r, const char *name, const char *want)
{
	char log[8192];

	sshd_log(log, sizeof(log));
	ck_assert_msg(r->status == 1, "migrate: exit %d: %s %s (sshd: %s)", r->status, r->out,
		      r->err, log);
	ck_assert_msg(strstr(r->err, want), "migrate said '%s', expected '%s'", r->err, want);
	ck_assert_msg(strstr(r->err, "keeps running"), "migrate said '%s'", r->err);
	assert_guest_runs(run_a, name);
	ck_assert(!exists_in(run_b, name, "pid") && !exists_in(run_b, name, "sock"));
}

/* ------------------------------------------------------------------------
 * Tests
 */

START_TEST(live_migration_over_ssh)
{
	struct json_object *res, *o;
	struct result r;
	char log[8192];
	uint64_t before, after;
	pid_t dst;

	trust_sshd(true);              /* a hashed entry, as Debian's ssh writes */
	start_vm("mv", "rate=max,wss=2M");
	o = status_json(run_a, "mv");
	before = pages_written(o);
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
	ck_assert_uint_gt(jget(res, "transferred_bytes"), 0);
	json_object_put(res);

	/* The source VMM let go; B runs the VM under its new name, and on. */
	ck_assert(!exists_in(run_a, "mv", "pid") && !exists_in(run_a, "mv", "sock"));
	o = status_json(run_b, "web2");
	ck_assert_str_eq(jstate(o), "running");
	after = pages_written(o);
	json_object_put(o);
	ck_assert_msg(after > before, "guest counters went back: %" PRIu64 " -> %" PRIu64,
		      before, after);

	/* It outlives the SSH session, and sshd itself. */
	dst = pid_in(run_b, "web2");
	ck_assert_int_gt(dst, 0);
	kill_sshd_sessions();
	kill(sshd_pid, SIGKILL);
	waitpid(sshd_pid, NULL, 0);
	sshd_pid = 0;
	kvm_test_sleep_ms(300);
	ck_assert_msg(kill(dst, 0) == 0, "the VMM on B died with the SSH session");
	assert_guest_runs(run_b, "web2");
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
	struct result r;
	char log[8192], cmd[600];
	uint64_t before, after;

	trust_sshd(false);
	start_vm("mc", "rate=max,wss=8M");
	o = status_json(run_a, "mc");
	before = pages_written(o);
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
	ck_assert_msg(pages && jget(pages, "raw") > 2000, "%s", r.out);
	json_object_put(res);
	/* Three logins: the migration's and one per extra channel. */
	{
		unsigned int logins = 0;

		for (const char *p = log; (p = strstr(p, "Accepted publickey")); p++)
			logins++;
		ck_assert_msg(logins == 3, "%u SSH logins, want 3 (sshd: %s)", logins, log);
	}
	o = status_json(run_b, "mc");
	ck_assert_str_eq(jstate(o), "running");
	after = pages_written(o);
	json_object_put(o);
	ck_assert_msg(after > before, "guest counters went back: %" PRIu64 " -> %" PRIu64,
		      before, after);
	assert_guest_runs(run_b, "mc");
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
	char sock[400];
	struct result r;
	pid_t agent;
	int i;

	trust_sshd(false);
	start_vm("ag", "rate=max,wss=2M");
	snprintf(sock, sizeof(sock), "%s/agent.sock", dir);
	agent = fork();
	ck_assert_int_ge(agent, 0);
	if (agent > 0) {
		char pid[400], num[32];

		snprintf(pid, sizeof(pid), "%s/agent.pid", dir);
		snprintf(num, sizeof(num), "%d\n", (int)agent);
		kvm_test_write_file(pid, num, 0600);
	}
	if (agent == 0) {
		int fd = open("/dev/null", O_RDWR);

		dup2(fd, 0);
		dup2(fd, 1);
		execl(SSH_AGENT, SSH_AGENT, "-D", "-a", sock, (char *)NULL);
		_exit(127);
	}
	for (i = 0; i < 500 && access(sock, F_OK) < 0; i++)
		kvm_test_sleep_ms(10);
	ck_assert_msg(access(sock, F_OK) == 0, "ssh-agent did not start");
	setenv("SSH_AUTH_SOCK", sock, 1);
	RUN(&r, SSH_ADD, "-q", user_key);
	ck_assert_msg(r.status == 0, "ssh-add: %s", r.err);

	migrate_ssh(&r, run_a, "ag", rvmig_b, NULL);
	kill(agent, SIGTERM);
	waitpid(agent, NULL, 0);
	unsetenv("SSH_AUTH_SOCK");
	ck_assert_msg(r.status == 0, "migrate: exit %d: %s %s", r.status, r.out, r.err);
	assert_guest_runs(run_b, "ag");
	RUN_B(&r, "stop", "ag");
}
END_TEST

START_TEST(unknown_host_key_refused)
{
	char fp[128], pub[400], kh[256];
	struct result r;

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
	struct result r;

	/* known_hosts holds another key for our host: that of an impostor. */
	snprintf(impostor, sizeof(impostor), "%s/impostor", dir);
	keygen(impostor);
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
	struct result r;

	start_vm("an", "rate=max,wss=2M");
	ck_assert(access(known_hosts, F_OK) < 0);
	migrate_ssh(&r, run_a, "an", rvmig_b,
		    (const char *const[]){ "--identity", user_key, "--accept-new-host-key", NULL });
	ck_assert_msg(r.status == 0, "migrate: exit %d: %s %s", r.status, r.out, r.err);
	assert_guest_runs(run_b, "an");

	/* Recorded as OpenSSH would, and OpenSSH's own tools find it. */
	snprintf(pub, sizeof(pub), "%s/hostkey.pub", dir);
	known_hosts_line(pub, line, sizeof(line));
	kvm_test_read_file(known_hosts, kh, sizeof(kh));
	ck_assert_str_eq(kh, line);
	snprintf(host, sizeof(host), "[127.0.0.1]:%d", sshd_port);
	RUN(&r, SSH_KEYGEN, "-F", host, "-f", known_hosts);
	ck_assert_msg(r.status == 0, "ssh-keygen -F %s: %s %s", host, r.out, r.err);

	/* And from then on it is known: back from B to A, without the flag. */
	migrate_ssh(&r, run_b, "an", rvmig_a, (const char *const[]){ "--identity", user_key, NULL });
	ck_assert_msg(r.status == 0, "migrate back: exit %d: %s %s", r.status, r.out, r.err);
	assert_guest_runs(run_a, "an");
	ck_assert(!exists_in(run_b, "an", "pid"));
	kvm_test_read_file(known_hosts, kh, sizeof(kh));
	ck_assert_str_eq(kh, line);
	RUN_A(&r, "stop", "an");
}
END_TEST

START_TEST(authentication_failure)
{
	struct result r;

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
	struct result r;

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
	char out[8192], path[400];
	const char *argv[16];
	pid_t mig, dst = 0;
	int i, st, fd, killed;

	trust_sshd(false);
	/* 96 MiB dirtied at full speed never converges under a 1 ms limit. */
	start_vm("sk", "rate=max,wss=48M");
	argv[0] = vmig_bin;
	argv[1] = "migrate";
	argv[2] = "sk";
	argv[3] = ssh_uri;
	argv[4] = "--known-hosts";
	argv[5] = known_hosts;
	argv[6] = "--remote-vmig";
	argv[7] = rvmig_b;
	argv[8] = "--identity";
	argv[9] = user_key;
	argv[10] = "--max-downtime";
	argv[11] = "1";
	argv[12] = NULL;
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
	for (i = 0; i < 1000 && !dst; i++) {
		kvm_test_sleep_ms(10);
		dst = pid_in(run_b, "sk");
	}
	ck_assert_msg(dst > 0, "the destination never claimed the VM");
	kvm_test_sleep_ms(300);
	killed = kill_sshd_sessions();
	ck_assert_msg(killed > 0, "no sshd session to kill");

	ck_assert_int_eq(waitpid(mig, &st, 0), mig);
	kvm_test_read_file(path, out, sizeof(out));
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 1, "migrate: %d: %s", st, out);
	ck_assert_msg(strstr(out, "failed") && strstr(out, "keeps running"), "%s", out);
	ck_assert_msg(strstr(out, "127.0.0.1"), "the error does not name the host: %s", out);
	assert_guest_runs(run_a, "sk");

	/* The destination, cut off, discards its half and exits. */
	for (i = 0; i < 500 && kill(dst, 0) == 0; i++)
		kvm_test_sleep_ms(20);
	ck_assert_msg(kill(dst, 0) < 0, "the destination still runs after sshd died");
	ck_assert(!exists_in(run_b, "sk", "pid"));
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
