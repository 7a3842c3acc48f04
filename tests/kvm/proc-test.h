/*
 * Shared helpers of the KVM tests that run processes and talk to sockets
 * (test_cli, test_ssh, test_evacuate, test_libvirt, test_rdma): files,
 * ports, a process runner, the suites' base directory and its reaper, the
 * state of VMs that vmig runs, and a real sshd on 127.0.0.1.  Everything
 * is static inline: a test uses what it needs without unused-function
 * warnings.
 */
#ifndef VMIG_PROC_TEST_H
#define VMIG_PROC_TEST_H

#include <arpa/inet.h>
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <json-c/json.h>

#include "kvm-test.h"

/* Read @fd to its end (at most @cap - 1 bytes), NUL-terminated. */
static inline void kvm_test_read_all(int fd, char *buf, size_t cap)
{
	size_t len = 0;
	ssize_t n;

	while (len < cap - 1 && (n = read(fd, buf + len, cap - 1 - len)) != 0) {
		if (n < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		len += (size_t)n;
	}
	buf[len] = 0;
}

/* The start of file @path, NUL-terminated; "" if it cannot be read. */
static inline void kvm_test_read_file(const char *path, char *buf, size_t cap)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	buf[0] = 0;
	if (fd < 0)
		return;
	kvm_test_read_all(fd, buf, cap);
	close(fd);
}

/* Create or replace @path with @text, mode @mode; fails the test otherwise. */
static inline void kvm_test_write_file(const char *path, const char *text, mode_t mode)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);

	ck_assert_msg(fd >= 0, "cannot write %s: %s", path, strerror(errno));
	ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
	close(fd);
}

/* A TCP port on 127.0.0.1 that was free a moment ago. */
static inline int kvm_test_free_port(void)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	socklen_t len = sizeof(sa);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), port;

	ck_assert_int_ge(fd, 0);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
	port = ntohs(sa.sin_port);
	close(fd);
	return port;
}

/* Does something accept connections on 127.0.0.1:@port? */
static inline bool kvm_test_port_open(int port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	bool ok;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	ok = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
	close(fd);
	return ok;
}

/* ------------------------------------------------------------------------
 * Processes: start one, capture what it prints, wait for its exit status
 */

#define KVM_TEST_SSHD       "/usr/sbin/sshd"
#define KVM_TEST_SSH_KEYGEN "/usr/bin/ssh-keygen"

/* What a finished process left. */
struct kvm_test_result {
	int status;            /* exit code, or 128 + signal */
	bool timed_out;        /* killed with SIGKILL at the timeout */
	char out[65536];       /* its stdout (from the pipe, or out_path) */
	char err[65536];       /* its stderr, likewise */
};

/*
 * How to start a process; every field may be left 0.  kvm_test_spawn()
 * fills in the second part.  A stream not sent to a file goes to a pipe
 * that kvm_test_finish() reads to its end: a detached VMM keeps no copy of
 * these pipes (it reopens 1 and 2), so the end comes when vmig exits.
 */
struct kvm_test_proc {
	const char *run_dir;           /* VMIG_RUN_DIR of the child; NULL: ours */
	const char *const *env;        /* more NAME=VALUE for the child, NULL-ended */
	const char *stdin_path;        /* the child's stdin from this file; NULL: ours */
	const char *out_path;          /* stdout to this file, made anew; NULL: a pipe */
	const char *err_path;          /* stderr likewise; may be out_path */
	void (*pre)(void);             /* in the child just before exec (may _exit) */
	unsigned int timeout_ms;       /* killed then; 0: only the tcase's timeout */

	pid_t pid;                     /* the child */
	int out_fd, err_fd;            /* read ends of the pipes, or -1 */
	uint64_t deadline_ms;          /* kvm_test_now_ms() of the timeout, or 0 */
};

/* In the child: open @path onto @fd, or end with 126. */
static inline void kvm_test__redirect(int fd, const char *path, int flags)
{
	int f = open(path, flags | O_CLOEXEC, 0600);

	if (f < 0 || dup2(f, fd) < 0)
		_exit(126);
	close(f);
}

/* Start @argv[0] (a path) with @argv as @p says. */
static inline void kvm_test_spawn(struct kvm_test_proc *p, const char *const *argv)
{
	int out[2] = { -1, -1 }, err[2] = { -1, -1 };
	const int wr = O_WRONLY | O_CREAT | O_TRUNC;

	if (!p->out_path)
		ck_assert_int_eq(pipe2(out, O_CLOEXEC), 0);
	if (!p->err_path)
		ck_assert_int_eq(pipe2(err, O_CLOEXEC), 0);
	p->deadline_ms = p->timeout_ms ? kvm_test_now_ms() + p->timeout_ms : 0;
	p->pid = fork();
	ck_assert_int_ge(p->pid, 0);
	if (p->pid == 0) {
		const char *const *e;

		if (p->stdin_path)
			kvm_test__redirect(0, p->stdin_path, O_RDONLY);
		if (p->out_path)
			kvm_test__redirect(1, p->out_path, wr);
		else if (dup2(out[1], 1) < 0)
			_exit(126);
		if (p->err_path && p->out_path && !strcmp(p->err_path, p->out_path)) {
			if (dup2(1, 2) < 0)
				_exit(126);
		} else if (p->err_path) {
			kvm_test__redirect(2, p->err_path, wr);
		} else if (dup2(err[1], 2) < 0) {
			_exit(126);
		}
		if (p->run_dir)
			setenv("VMIG_RUN_DIR", p->run_dir, 1);
		for (e = p->env; e && *e; e++) {
			const char *eq = strchr(*e, '=');
			char name[128];

			if (!eq || (size_t)(eq - *e) >= sizeof(name))
				_exit(126);
			memcpy(name, *e, (size_t)(eq - *e));
			name[eq - *e] = 0;
			setenv(name, eq + 1, 1);
		}
		if (p->pre)
			p->pre();
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	if (out[1] >= 0)
		close(out[1]);
	if (err[1] >= 0)
		close(err[1]);
	p->out_fd = out[0];
	p->err_fd = err[0];
}

/* Milliseconds to @deadline (0: none, -1), at least 0. */
static inline int kvm_test__left_ms(uint64_t deadline)
{
	uint64_t now = kvm_test_now_ms();

	if (!deadline)
		return -1;
	return now >= deadline ? 0 : (int)(deadline - now);
}

/*
 * Read @p's pipes to their end, wait for it and return its status (exit
 * code, or 128 + signal); with @r (may be NULL) its output too.  Past
 * @p's timeout it is killed: status 128 + SIGKILL, r->timed_out.
 */
static inline int kvm_test_finish(struct kvm_test_proc *p, struct kvm_test_result *r)
{
	static char scratch[4096];
	int fds[2] = { p->out_fd, p->err_fd };
	size_t len[2] = { 0, 0 };
	bool timed_out = false;
	int st = 0, i;

	if (r) {
		r->out[0] = r->err[0] = 0;
		r->timed_out = false;
	}
	while ((fds[0] >= 0 || fds[1] >= 0) && !timed_out) {
		struct pollfd pf[2];
		int idx[2], n = 0, k, left = kvm_test__left_ms(p->deadline_ms);

		for (i = 0; i < 2; i++) {
			if (fds[i] >= 0) {
				pf[n] = (struct pollfd){ .fd = fds[i], .events = POLLIN };
				idx[n++] = i;
			}
		}
		k = poll(pf, (nfds_t)n, left);
		if (k < 0 && errno == EINTR)
			continue;
		ck_assert_msg(k >= 0, "poll: %s", strerror(errno));
		if (k == 0) {
			timed_out = true;
			break;
		}
		for (k = 0; k < n; k++) {
			char *buf = scratch;
			size_t room = sizeof(scratch);
			ssize_t got;

			i = idx[k];
			if (!pf[k].revents)
				continue;
			if (r && len[i] < sizeof(r->out) - 1) {
				buf = (i ? r->err : r->out) + len[i];
				room = sizeof(r->out) - 1 - len[i];
			}
			got = read(fds[i], buf, room);
			if (got < 0 && errno == EINTR)
				continue;
			if (got <= 0) {
				close(fds[i]);
				fds[i] = -1;
			} else if (buf != scratch) {
				len[i] += (size_t)got;
				buf[got] = 0;
			}
		}
	}
	for (i = 0; i < 2; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	p->out_fd = p->err_fd = -1;
	while (!timed_out && p->deadline_ms) {
		pid_t w = waitpid(p->pid, &st, WNOHANG);

		ck_assert_msg(w >= 0 || errno == EINTR, "waitpid: %s", strerror(errno));
		if (w == p->pid)
			break;
		if (kvm_test__left_ms(p->deadline_ms) == 0)
			timed_out = true;
		else
			kvm_test_sleep_ms(10);
	}
	if (timed_out)
		kill(p->pid, SIGKILL);
	if (timed_out || !p->deadline_ms)
		ck_assert_int_eq(waitpid(p->pid, &st, 0), p->pid);
	p->pid = 0;
	st = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
	if (r) {
		r->status = st;
		r->timed_out = timed_out;
		if (p->out_path)
			kvm_test_read_file(p->out_path, r->out, sizeof(r->out));
		if (p->err_path)
			kvm_test_read_file(p->err_path, r->err, sizeof(r->err));
	}
	return st;
}

/* Run @argv to its end as @how says (NULL: plainly); @r gets the outcome. */
static inline void kvm_test_run_argv(struct kvm_test_result *r, const struct kvm_test_proc *how,
				     const char *const *argv)
{
	struct kvm_test_proc p = { 0 };

	if (how)
		p = *how;
	kvm_test_spawn(&p, argv);
	kvm_test_finish(&p, r);
}

/* The vmig under test, from $VMIG. */
static inline const char *kvm_test_vmig_bin(void)
{
	const char *bin = getenv("VMIG");

	ck_assert_msg(bin && *bin, "set VMIG to the vmig binary");
	return bin;
}

/* $VMIG followed by @args (NULL-ended) in @argv (@cap entries). */
static inline void kvm_test_vmig_argv(const char **argv, size_t cap, const char *const *args)
{
	size_t i = 0;

	argv[i++] = kvm_test_vmig_bin();
	while (*args && i < cap - 1)
		argv[i++] = *args++;
	ck_assert_msg(!*args, "more than %zu arguments", cap - 2);
	argv[i] = NULL;
}

/* Run vmig @args (NULL-ended) with VMIG_RUN_DIR @run_dir (NULL: ours). */
static inline void kvm_test_vmig(struct kvm_test_result *r, const char *run_dir,
				 const char *const *args)
{
	struct kvm_test_proc how = { .run_dir = run_dir };
	const char *argv[64];

	kvm_test_vmig_argv(argv, 64, args);
	kvm_test_run_argv(r, &how, argv);
}

#define KVM_TEST_ARGS(...) ((const char *const[]){ __VA_ARGS__, NULL })
/* KVM_TEST_RUN(&r, "/usr/bin/prog", "arg", ...): run it plainly. */
#define KVM_TEST_RUN(r, ...) kvm_test_run_argv((r), NULL, KVM_TEST_ARGS(__VA_ARGS__))
/* KVM_TEST_VMIG(&r, run_dir, "status", name, ...): vmig in that run directory. */
#define KVM_TEST_VMIG(r, run_dir, ...) kvm_test_vmig((r), (run_dir), KVM_TEST_ARGS(__VA_ARGS__))

/* Does @run_dir hold NAME.SUFFIX (a VM's pid file, socket...)? */
static inline bool kvm_test_exists_in(const char *run_dir, const char *name, const char *suffix)
{
	char path[600];

	snprintf(path, sizeof(path), "%s/%s.%s", run_dir, name, suffix);
	return access(path, F_OK) == 0;
}

/*
 * A suite's base directory /tmp/vmig-@tag-XXXXXX, made in the runner
 * (Check's unchecked fixture) so that kvm_test_reap() can stop what a
 * failed test left running: a test that fails ends its process at once,
 * without its teardown.
 */
static inline void kvm_test_make_base(char *base, size_t len, const char *tag)
{
	snprintf(base, len, "/tmp/vmig-%s-XXXXXX", tag);
	if (!mkdtemp(base)) {
		perror("mkdtemp");
		exit(EXIT_FAILURE);
	}
}

/*
 * One test's directory @dir (@len bytes) under @base, with the run
 * directories of "host A" and, unless @run_b is NULL, "host B" in it:
 * DIR/A and DIR/B (@run_len bytes each).
 */
static inline void kvm_test_make_dirs(const char *base, char *dir, size_t len, char *run_a,
				      char *run_b, size_t run_len)
{
	snprintf(dir, len, "%s/t-XXXXXX", base);
	ck_assert_msg(mkdtemp(dir), "mkdtemp %s: %s", dir, strerror(errno));
	snprintf(run_a, run_len, "%s/A", dir);
	ck_assert_int_eq(mkdir(run_a, 0700), 0);
	if (run_b) {
		snprintf(run_b, run_len, "%s/B", dir);
		ck_assert_int_eq(mkdir(run_b, 0700), 0);
	}
}

/* Stop whatever runs from a pid file under @path (3 levels), remove @path. */
static inline void kvm_test_reap(const char *path)
{
	char cmd[1024];

	snprintf(cmd, sizeof(cmd), "for p in %s/*.pid %s/*/*.pid %s/*/*/*.pid; do "
		 "[ -s \"$p\" ] && kill -9 $(cat \"$p\") 2>/dev/null; done; rm -rf %s",
		 path, path, path, path);
	if (system(cmd) != 0)
		fprintf(stderr, "cleanup of %s failed\n", path);
}

/* ------------------------------------------------------------------------
 * VMs that `vmig run` started: what `vmig status --json` says of them
 */

/* The number @key of @o; fails the test if it is missing. */
static inline uint64_t kvm_test_ju64(struct json_object *o, const char *key)
{
	struct json_object *v;

	ck_assert_msg(json_object_object_get_ex(o, key, &v), "no '%s' in %s", key,
		      json_object_to_json_string(o));
	return json_object_get_uint64(v);
}

/* `vmig status NAME --json` in @run_dir (NULL: ours), or NULL if it fails. */
static inline struct json_object *kvm_test_vm_status_try(const char *run_dir, const char *name)
{
	struct kvm_test_result r;

	struct json_object *o;

	KVM_TEST_VMIG(&r, run_dir, "status", name, "--json");
	if (r.status != 0)
		return NULL;
	o = json_tokener_parse(r.out);
	ck_assert_msg(o != NULL, "status --json printed no JSON: %s", r.out);
	return o;
}

/* The same, and VM @name must run there; json_object_put() it. */
static inline struct json_object *kvm_test_vm_status(const char *run_dir, const char *name)
{
	struct kvm_test_result r;
	struct json_object *o;

	KVM_TEST_VMIG(&r, run_dir, "status", name, "--json");
	ck_assert_msg(r.status == 0, "status %s in %s: exit %d: %s", name,
		      run_dir ? run_dir : "$VMIG_RUN_DIR", r.status, r.err);
	o = json_tokener_parse(r.out);
	ck_assert_msg(o != NULL, "status --json printed no JSON: %s", r.out);
	return o;
}

/* The guest's page counter, 0 until the guest has published it. */
static inline uint64_t kvm_test_pages_written(struct json_object *o)
{
	struct json_object *v;

	return json_object_object_get_ex(o, "pages_written", &v) ? json_object_get_uint64(v) : 0;
}

/* "running", "paused"... */
static inline const char *kvm_test_vm_state(struct json_object *o)
{
	struct json_object *v;

	ck_assert_msg(json_object_object_get_ex(o, "state", &v), "no state in %s",
		      json_object_to_json_string(o));
	return json_object_get_string(v);
}

/* The guest of @name in @run_dir runs: its page counter moves within 5 s. */
static inline void kvm_test_assert_guest_runs(const char *run_dir, const char *name)
{
	struct json_object *o = kvm_test_vm_status(run_dir, name);
	uint64_t a, b, end = kvm_test_now_ms() + 5000;

	ck_assert_str_eq(kvm_test_vm_state(o), "running");
	a = kvm_test_pages_written(o);
	json_object_put(o);
	do {
		kvm_test_sleep_ms(100);
		o = kvm_test_vm_status(run_dir, name);
		b = kvm_test_pages_written(o);
		json_object_put(o);
	} while (b <= a && kvm_test_now_ms() < end);
	ck_assert_msg(b > a, "the guest of %s in %s made no progress: %" PRIu64 " -> %" PRIu64,
		      name, run_dir ? run_dir : "$VMIG_RUN_DIR", a, b);
}

/*
 * After a migration: VM @name runs in @run_dir, and its guest's page
 * counter is past @before, read on the source before the migration (the
 * guest's memory came along).  Returns the counter.
 */
static inline uint64_t kvm_test_assert_arrived(const char *run_dir, const char *name,
					       uint64_t before)
{
	struct json_object *o = kvm_test_vm_status(run_dir, name);
	uint64_t after;

	ck_assert_str_eq(kvm_test_vm_state(o), "running");
	after = kvm_test_pages_written(o);
	json_object_put(o);
	ck_assert_msg(after > before, "guest counters went back: %" PRIu64 " -> %" PRIu64,
		      before, after);
	return after;
}

/* Wait (20 s at most) until the guest of @name has written a page: the count. */
static inline uint64_t kvm_test_wait_first_page(const char *run_dir, const char *name)
{
	uint64_t end = kvm_test_now_ms() + 20000;

	while (kvm_test_now_ms() < end) {
		struct json_object *o = kvm_test_vm_status(run_dir, name);
		uint64_t pw = kvm_test_pages_written(o);

		json_object_put(o);
		if (pw)
			return pw;
		kvm_test_sleep_ms(50);
	}
	ck_abort_msg("guest of %s wrote no page in 20 s", name);
	return 0;
}

/*
 * `vmig run NAME --memory @memory --vcpus @vcpus --workload @workload
 * --detach` in @run_dir; returns once its guest has written a page.
 */
static inline void kvm_test_start_vm(const char *run_dir, const char *name, const char *memory,
				     const char *vcpus, const char *workload)
{
	struct kvm_test_result r;

	KVM_TEST_VMIG(&r, run_dir, "run", name, "--memory", memory, "--vcpus", vcpus,
		      "--workload", workload, "--detach");
	ck_assert_msg(r.status == 0, "run %s: exit %d: %s", name, r.status, r.err);
	kvm_test_wait_first_page(run_dir, name);
}

/* ------------------------------------------------------------------------
 * A real OpenSSH sshd on 127.0.0.1 with keys the test makes
 *
 * Its sshd_config listens on a free port, names the host key, the
 * authorized_keys file and the pid file (all in the test's directories),
 * uses no PAM and no password, and reads or changes no file of the
 * system's; it runs as `sshd -D -f CONF -e`, its log in DIR/sshd.log.
 * When root runs sshd, sshd needs its privilege separation directory
 * /run/sshd (normally made by its service unit): created if missing, as
 * an empty directory.
 */

struct kvm_test_sshd {
	char dir[300];             /* sshd_config, sshd.log, sshd.pid */
	char host_key[300];        /* private key; the public one is host_key.pub */
	char authorized_keys[300];
	char log[320];
	int port;                  /* on 127.0.0.1 */
	pid_t pid;                 /* 0: not running */
};

/* A new ed25519 key pair @path, @path.pub without a passphrase. */
static inline void kvm_test_keygen(const char *path)
{
	struct kvm_test_proc how = { .timeout_ms = 30000 };
	struct kvm_test_result r;

	kvm_test_run_argv(&r, &how, KVM_TEST_ARGS(KVM_TEST_SSH_KEYGEN, "-q", "-t", "ed25519",
						   "-N", "", "-C", "vmig-test", "-f", path));
	ck_assert_msg(r.status == 0, "ssh-keygen -f %s: exit %d: %s", path, r.status, r.err);
}

/* Let the key pair @key (its .pub) log in to @s, alone. */
static inline void kvm_test_sshd_authorize(const struct kvm_test_sshd *s, const char *key)
{
	char pub[400], text[4096];

	snprintf(pub, sizeof(pub), "%s.pub", key);
	kvm_test_read_file(pub, text, sizeof(text));
	ck_assert_msg(text[0], "no public key %s", pub);
	kvm_test_write_file(s->authorized_keys, text, 0600);
}

/*
 * Start an sshd with its files in @dir and the host key and
 * authorized_keys in @key_dir (shared by several sshd; the host key is
 * made unless it exists); @extra_config: more sshd_config lines, or NULL.
 * Returns once it listens; fails the test if it exits or does not listen
 * within 10 s.
 */
static inline void kvm_test_sshd_start(struct kvm_test_sshd *s, const char *dir,
				       const char *key_dir, const char *extra_config)
{
	struct kvm_test_proc how = { 0 };
	char conf[400], text[4096];
	uint64_t end;

	snprintf(s->dir, sizeof(s->dir), "%s", dir);
	snprintf(s->host_key, sizeof(s->host_key), "%s/hostkey", key_dir);
	snprintf(s->authorized_keys, sizeof(s->authorized_keys), "%s/authorized_keys", key_dir);
	snprintf(s->log, sizeof(s->log), "%s/sshd.log", dir);
	snprintf(conf, sizeof(conf), "%s/sshd_config", dir);
	if (access(s->host_key, F_OK) < 0)
		kvm_test_keygen(s->host_key);
	s->port = kvm_test_free_port();
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
		 "%s"
		 "LogLevel VERBOSE\n",
		 s->port, s->host_key, s->authorized_keys, dir, extra_config ? extra_config : "");
	kvm_test_write_file(conf, text, 0600);
	if (geteuid() == 0 && mkdir("/run/sshd", 0755) < 0 && errno != EEXIST)
		ck_abort_msg("cannot create /run/sshd: %s", strerror(errno));

	how.out_path = how.err_path = s->log;
	kvm_test_spawn(&how, KVM_TEST_ARGS(KVM_TEST_SSHD, "-D", "-f", conf, "-e"));
	s->pid = how.pid;
	end = kvm_test_now_ms() + 10000;
	while (!kvm_test_port_open(s->port)) {
		if (waitpid(s->pid, NULL, WNOHANG) == s->pid) {
			s->pid = 0;
			kvm_test_read_file(s->log, text, sizeof(text));
			ck_abort_msg("sshd of %s exited at start: %s", dir, text);
		}
		ck_assert_msg(kvm_test_now_ms() < end, "sshd of %s does not listen on port %d",
			      dir, s->port);
		kvm_test_sleep_ms(20);
	}
}

/* Stop @s's sshd (not its sessions) if it runs. */
static inline void kvm_test_sshd_stop(struct kvm_test_sshd *s)
{
	if (s->pid > 0) {
		kill(s->pid, SIGTERM);
		waitpid(s->pid, NULL, 0);
		s->pid = 0;
	}
}

/* What @s's sshd logged so far. */
static inline void kvm_test_sshd_log(const struct kvm_test_sshd *s, char *buf, size_t len)
{
	kvm_test_read_file(s->log, buf, len);
}

/* A known_hosts line for 127.0.0.1:@port with the public key in @pub. */
static inline void kvm_test_known_hosts_line(int port, const char *pub, char *buf, size_t len)
{
	char key[4096], *sp;

	kvm_test_read_file(pub, key, sizeof(key));
	key[strcspn(key, "\n")] = 0;
	sp = strrchr(key, ' ');       /* drop the comment */
	if (sp && sp != strchr(key, ' '))
		*sp = 0;
	snprintf(buf, len, "[127.0.0.1]:%d %s\n", port, key);
}

/* Trust @s's host key in @known_hosts: replace the file, or @append to it. */
static inline void kvm_test_sshd_trust(const struct kvm_test_sshd *s, const char *known_hosts,
				       bool append)
{
	char pub[400], line[4200];
	int fd;

	snprintf(pub, sizeof(pub), "%s.pub", s->host_key);
	kvm_test_known_hosts_line(s->port, pub, line, sizeof(line));
	fd = open(known_hosts, O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC),
		  0600);
	ck_assert_msg(fd >= 0, "cannot write %s: %s", known_hosts, strerror(errno));
	ck_assert_int_eq(write(fd, line, strlen(line)), (ssize_t)strlen(line));
	close(fd);
}

/* ssh://USER@127.0.0.1:PORT of @s for the user running the test. */
static inline void kvm_test_sshd_uri(const struct kvm_test_sshd *s, char *buf, size_t len)
{
	struct passwd *pw = getpwuid(geteuid());

	ck_assert_ptr_nonnull(pw);
	snprintf(buf, len, "ssh://%s@127.0.0.1:%d", pw->pw_name, s->port);
}

/* No agent and no ~/.ssh of the user's: HOME is @home. */
static inline void kvm_test_ssh_isolate(const char *home)
{
	unsetenv("SSH_AUTH_SOCK");
	setenv("HOME", home, 1);
}

#endif
