/*
 * vmig incoming and vmig restore: this process receives a VM from a
 * stream (a live migration, or a file written by vmig save) and, once it
 * has it, becomes that VM's VMM, exactly as if `vmig run` had started it.
 *
 * The VM's name is known only once the stream's CONFIG arrives (unless
 * --name gives it): the name's lock is taken then, before any memory is
 * built, so a name already running here refuses the VM and the source
 * keeps it.  With --detach the parent returns once the listener is up
 * (incoming) or the VM is loaded (restore), with errors through a pipe.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "vmig/migrate.h"
#include "vmig/transport.h"
#include "vmig/util.h"
#include "vmig/vm.h"
#include "cli.h"

/* Pipe size asked for stdin with --stdio (Linux caps it at pipe-max-size). */
#define STDIO_PIPE_SIZE (1 << 20)

struct in_opts {
	const char *cmd;           /* "incoming" or "restore" */
	const char *listen;        /* incoming: URI */
	bool stdio;                /* incoming: the stream on stdin/stdout */
	const char *file;          /* restore */
	const char *name;
	bool detach;
	bool paused, resume;
	uint64_t prealloc;         /* --prealloc bytes, 0 = none */
	const char *join;          /* --join SESSION: a channel for another incoming */
	int notify_fd;
};

struct claim_ctx {
	struct cli_paths paths;
	int lock_fd;
	const char *tmp_log;       /* detached: rename to NAME.log */
};

static int claim_name(void *arg, const char *name, struct vmig_err *err)
{
	struct claim_ctx *c = arg;
	char why[512];

	/* Also when the name was taken earlier: the host may be drained since. */
	if (cli_drain_check(why, sizeof(why)) < 0) {
		vmig_err_set(err, -EBUSY, "VM '%s' refused: %s", name, why);
		return -EBUSY;
	}
	if (c->lock_fd >= 0)
		return 0;       /* --name, taken while waiting (the same name) */
	if (cli_make_paths(name, &c->paths) < 0) {
		vmig_err_set(err, -EINVAL, "cannot set up the run directory for '%s'", name);
		return -EINVAL;
	}
	c->lock_fd = cli_lock_name(name, c->paths.pid);
	if (c->lock_fd < 0) {
		vmig_err_set(err, -EEXIST, "a VM named '%s' already runs on this host, or a "
			     "vmig incoming waits for it (see vmig list)", name);
		return -EEXIST;
	}
	cli_write_pid(c->lock_fd);
	if (c->tmp_log && rename(c->tmp_log, c->paths.log) < 0)
		vmig_log(VMIG_LOG_WARN, "cannot rename %s: %s", c->tmp_log, strerror(errno));
	return 0;
}

static void progress(void *arg, uint64_t iteration, uint64_t bytes)
{
	char b[32];

	(void)arg;
	vmig_size_format(bytes, b, sizeof(b));
	vmig_log(VMIG_LOG_INFO, "iteration %llu received, %s so far",
		 (unsigned long long)iteration, b);
}

/*
 * --stdio, once the VM is ours: outlive the SSH session that started us.
 * stdin/stdout are sshd's pipes (the transport used dups of them) and
 * stderr too, where the console went so far: once the source hangs up,
 * sshd closes them.  So stdin/stdout become /dev/null and stderr (the
 * console, the log) NAME.log in the run directory, as for --detach; a
 * hang-up is ignored, and a new session leaves sshd's (when this process
 * does not lead it already).  No fork: KVM's fds work only in the process
 * that created the VM.
 */
static void detach_from_ssh(const struct claim_ctx *claim)
{
	int null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
	int log_fd = open(claim->paths.log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);

	signal(SIGHUP, SIG_IGN);
	if (null_fd >= 0) {
		dup2(null_fd, STDIN_FILENO);
		dup2(null_fd, STDOUT_FILENO);
		dup2(log_fd >= 0 ? log_fd : null_fd, STDERR_FILENO);
	}
	if (null_fd > STDERR_FILENO)
		close(null_fd);
	if (log_fd > STDERR_FILENO)
		close(log_fd);
	if (getsid(0) != getpid())
		setsid();
}

/*
 * SIGINT/SIGTERM/SIGHUP before the handoff: give up, the source keeps the
 * VM.  (They are blocked and read from the signalfd, so without this they
 * would wait, pending, and stop the VM right after it arrived.)
 */
static bool signalled(const int *sig_fd, struct vmig_err *err)
{
	struct signalfd_siginfo si;

	if (*sig_fd < 0 || read(*sig_fd, &si, sizeof(si)) != sizeof(si))
		return false;
	vmig_err_set(err, -EINTR, "%s before the handoff: nothing was received, the VM "
		     "stays on its source", strsignal((int)si.ssi_signo));
	return true;
}

static int abort_on_signal(void *arg, struct vmig_err *err)
{
	return signalled(arg, err) ? -EINTR : 0;
}

/*
 * Channels over SSH.  A source with --channels N opens N - 1 more SSH
 * connections, each running `vmig incoming --join SESSION`; that process
 * connects to RUN_DIR/join-SESSION.sock, which the `incoming --stdio` of
 * the migration opens once CONFIG has named the session, hands over its
 * stdin and stdout (SCM_RIGHTS: no copy through it), and waits until the
 * receiving process closes the connection: its exit would end the SSH
 * session.
 */
struct join_ctx {
	char path[4200];
	int listen_fd;
	int conns[VMIG_MIGRATE_MAX_CHANNELS];
	unsigned int nr_conns;
};

static int join_path(uint64_t session, char *buf, size_t len)
{
	char dir[4096];

	if (vmig_rundir_get(dir, sizeof(dir)) < 0 || vmig_rundir_ensure(dir) < 0)
		return -ENOENT;
	snprintf(buf, len, "%s/join-%016" PRIx64 ".sock", dir, session);
	return strlen(buf) < sizeof(((struct sockaddr_un *)0)->sun_path) ? 0 : -ENAMETOOLONG;
}

static int accept_joined_channel(void *arg, uint64_t session, int timeout_ms,
				 struct vmig_transport **out, struct vmig_err *err)
{
	struct join_ctx *j = arg;
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char cbuf[CMSG_SPACE(2 * sizeof(int))], byte;
	struct iovec iov = { &byte, 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cm;
	struct pollfd pfd;
	int fd, fds[2], ret;

	if (j->listen_fd < 0) {
		ret = join_path(session, j->path, sizeof(j->path));
		if (ret) {
			vmig_err_set(err, ret, "no run directory for the channels' socket");
			return ret;
		}
		memcpy(sa.sun_path, j->path, strlen(j->path) + 1);   /* fits: join_path */
		unlink(j->path);
		j->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (j->listen_fd < 0 || bind(j->listen_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
		    chmod(j->path, 0600) < 0 || listen(j->listen_fd, 8) < 0) {
			ret = -errno;
			vmig_err_set(err, ret, "cannot listen on %s: %s", j->path, strerror(-ret));
			return ret;
		}
	}
	if (j->nr_conns == VMIG_MIGRATE_MAX_CHANNELS) {
		vmig_err_set(err, -EMFILE, "too many channels");
		return -EMFILE;
	}
	pfd = (struct pollfd){ .fd = j->listen_fd, .events = POLLIN };
	ret = poll(&pfd, 1, timeout_ms);
	if (ret <= 0) {
		vmig_err_set(err, -ETIMEDOUT, "no 'vmig incoming --join' came to %s within "
			     "%d s", j->path, timeout_ms / 1000);
		return -ETIMEDOUT;
	}
	fd = accept4(j->listen_fd, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "accept on %s: %s", j->path, strerror(-ret));
		return ret;
	}
	if (recvmsg(fd, &mh, MSG_CMSG_CLOEXEC) != 1 || !(cm = CMSG_FIRSTHDR(&mh)) ||
	    cm->cmsg_type != SCM_RIGHTS || cm->cmsg_len != CMSG_LEN(2 * sizeof(int))) {
		close(fd);
		vmig_err_set(err, -EPROTO, "a joining process sent no stdin/stdout");
		return -EPROTO;
	}
	memcpy(fds, CMSG_DATA(cm), sizeof(fds));
	ret = vmig_transport_from_fds(fds[0], fds[1], out);
	if (ret) {
		close(fds[0]);
		close(fds[1]);
		close(fd);
		vmig_err_set(err, ret, "out of memory");
		return ret;
	}
	j->conns[j->nr_conns++] = fd;   /* closed when the migration is over */
	return 0;
}

static void join_ctx_fini(struct join_ctx *j)
{
	for (unsigned int i = 0; i < j->nr_conns; i++)
		close(j->conns[i]);
	j->nr_conns = 0;
	if (j->listen_fd >= 0) {
		close(j->listen_fd);
		unlink(j->path);
	}
	j->listen_fd = -1;
}

/* `vmig incoming --join SESSION`: hand stdin/stdout over, wait, exit. */
static int join_channel(const char *session)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char cbuf[CMSG_SPACE(2 * sizeof(int))], byte = 'j', path[4200];
	struct iovec iov = { &byte, 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cm;
	uint64_t sess;
	char *end;
	int fd = -1, fds[2] = { STDIN_FILENO, STDOUT_FILENO }, tries;

	errno = 0;
	sess = strtoull(session, &end, 16);
	if (errno || *end || !*session) {
		cli_error("bad --join '%s': a session number from the source", session);
		return VMIG_EXIT_USAGE;
	}
	if (join_path(sess, path, sizeof(path)) < 0) {
		cli_error("no usable run directory: set VMIG_RUN_DIR or XDG_RUNTIME_DIR");
		return VMIG_EXIT_ERROR;
	}
	memcpy(sa.sun_path, path, strlen(path) + 1);          /* fits: join_path */
	/* The receiving process opens the socket once CONFIG has come. */
	for (tries = 0; tries < 300; tries++) {
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
			break;
		if (fd >= 0)
			close(fd);
		fd = -1;
		usleep(50000);
	}
	if (fd < 0) {
		cli_error("no migration %s to join here (%s)", session, path);
		return VMIG_EXIT_ERROR;
	}
	cm = CMSG_FIRSTHDR(&mh);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(fds));
	memcpy(CMSG_DATA(cm), fds, sizeof(fds));
	if (sendmsg(fd, &mh, 0) != 1) {
		cli_error("cannot hand the channel over: %s", strerror(errno));
		close(fd);
		return VMIG_EXIT_ERROR;
	}
	/* Ours no more: keep them open only through the receiver's copies. */
	close(STDIN_FILENO);
	close(STDOUT_FILENO);
	while (read(fd, &byte, 1) > 0 || errno == EINTR)
		;
	close(fd);
	return VMIG_EXIT_OK;
}

/*
 * While `incoming --listen` waits, it answers on a control socket of its
 * own, so that an admin sees the wait and can end it: NAME.sock with
 * --name (the name is taken from the start: a second listener for it is
 * refused), else incoming-PID.sock.  `status` says where it waits,
 * `stop` (or `cancel`) ends the wait, anything else is refused until the
 * VM has arrived.  Served between the listener's accept ticks.
 */
struct waiting {
	char name[256];
	struct cli_paths own;     /* unnamed: incoming-PID's files */
	int own_lock;
	int ctl_fd;
	const char *sock;
	const char *uri;
	uint64_t since_ns;
	bool stop;
};

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int waiting_open(struct waiting *w, struct claim_ctx *claim, const char *name,
			const char *uri, struct vmig_err *err)
{
	int ret;

	w->own_lock = w->ctl_fd = -1;
	w->uri = uri;
	w->since_ns = mono_ns();
	if (name) {
		ret = claim_name(claim, name, err);
		if (ret)
			return ret;
		snprintf(w->name, sizeof(w->name), "%s", name);
		w->sock = claim->paths.sock;
	} else {
		snprintf(w->name, sizeof(w->name), "incoming-%d", (int)getpid());
		if (cli_make_paths(w->name, &w->own) < 0) {
			vmig_err_set(err, -EINVAL, "cannot set up the run directory");
			return -EINVAL;
		}
		w->own_lock = cli_lock_name(w->name, w->own.pid);
		if (w->own_lock < 0) {
			vmig_err_set(err, -EEXIST, "cannot take %s", w->own.pid);
			return -EEXIST;
		}
		cli_write_pid(w->own_lock);
		w->sock = w->own.sock;
	}
	ret = vmig_ctl_listen(w->sock, &w->ctl_fd);
	if (ret) {
		vmig_err_set(err, ret, "cannot listen on %s: %s", w->sock, strerror(-ret));
		return ret;
	}
	fcntl(w->ctl_fd, F_SETFL, fcntl(w->ctl_fd, F_GETFL) | O_NONBLOCK);
	return 0;
}

/* Answer the requests waiting on the control socket, if any. */
static void waiting_serve(struct waiting *w)
{
	int fd;

	while ((fd = accept4(w->ctl_fd, NULL, NULL, SOCK_CLOEXEC)) >= 0) {
		struct timeval tv = { 1, 0 };      /* a client sends its line at once */
		struct vmig_ctl_reader rd;
		struct json_object *req = NULL, *reply, *c;
		const char *cmd = NULL;

		setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
		vmig_ctl_reader_init(&rd, fd);
		if (vmig_ctl_recv(&rd, &req) == 0 && json_object_object_get_ex(req, "cmd", &c))
			cmd = json_object_get_string(c);
		if (cmd && !strcmp(cmd, "status")) {
			reply = vmig_ctl_reply_ok();
			json_object_object_add(reply, "name", json_object_new_string(w->name));
			json_object_object_add(reply, "state",
					       json_object_new_string("waiting"));
			json_object_object_add(reply, "pid", json_object_new_int((int)getpid()));
			json_object_object_add(reply, "listen", json_object_new_string(w->uri));
			json_object_object_add(reply, "uptime_ms", json_object_new_uint64(
				(mono_ns() - w->since_ns) / 1000000));
		} else if (cmd && (!strcmp(cmd, "stop") || !strcmp(cmd, "cancel"))) {
			reply = vmig_ctl_reply_ok();
			w->stop = true;
		} else {
			reply = vmig_ctl_reply_error(EBUSY, "'%s' is waiting for a migration on %s: "
						     "until a VM arrives, only status and stop work",
						     w->name, w->uri);
		}
		if (reply)
			vmig_ctl_send(fd, reply);
		json_object_put(reply);
		json_object_put(req);
		vmig_ctl_reader_fini(&rd);
		close(fd);
	}
}

/* Stop answering; an unnamed wait gives its name back. */
static void waiting_close(struct waiting *w)
{
	if (w->ctl_fd >= 0) {
		close(w->ctl_fd);
		unlink(w->sock);
		w->ctl_fd = -1;
	}
	if (w->own_lock >= 0) {
		unlink(w->own.pid);
		close(w->own_lock);
		w->own_lock = -1;
	}
}

/* Receive, then serve the VM.  Runs in the (possibly detached) VMM process. */
static int receive_and_serve(struct in_opts *o, const char *tmp_log)
{
	struct claim_ctx claim = { .lock_fd = -1, .tmp_log = tmp_log };
	struct vmig_dst_params dp = {
		.name = o->name,
		.live = !o->file,
		.paused = o->paused,
		.resume = o->resume,
		.claim = claim_name,
		.claim_arg = &claim,
		.check_abort = abort_on_signal,
		.progress = progress,
	};
	struct vmig_err err = { 0 };
	struct vmig_listener *l = NULL;
	struct vmig_transport *t = NULL;
	struct vmig_vm *vm = NULL;
	struct cli_console *console = NULL;
	struct vmig_prealloc *pa = NULL;
	struct join_ctx join = { .listen_fd = -1 };
	struct waiting wait = { .own_lock = -1, .ctl_fd = -1 };
	char msg[4096 + 512];
	int sig_fd, listen_fd = -1, ret, code = VMIG_EXIT_ERROR;

	sig_fd = cli_block_signals();
	dp.check_arg = &sig_fd;
	if (sig_fd < 0) {
		snprintf(msg, sizeof(msg), "cannot set up signal handling");
		goto fail_msg;
	}
	dp.console_fd = o->stdio ? STDERR_FILENO : STDOUT_FILENO;
	/* Before listening: a source that connects finds the RAM ready. */
	if (o->prealloc) {
		ret = vmig_prealloc_create(o->prealloc, &pa, &err);
		if (ret) {
			snprintf(msg, sizeof(msg), "%s", err.msg[0] ? err.msg : strerror(-ret));
			goto fail_msg;
		}
		dp.prealloc = pa;
	}
	if (o->file) {
		ret = vmig_transport_open_file(o->file, false, &t, &err);
	} else if (o->stdio) {
		/*
		 * Dups, so that fds 0 and 1 stay taken until detach_from_ssh()
		 * points them at /dev/null: a socket opened meanwhile (the
		 * control socket) must not land on them.  Once the source has
		 * hung up, a console write to stderr must cost EPIPE, not the VM.
		 */
		signal(SIGPIPE, SIG_IGN);
		/*
		 * sshd feeds stdin through a pipe, 64 KiB by default: each
		 * time it fills, sshd waits for us to read, and the SSH
		 * window behind it stalls.  A bigger pipe lets it run ahead.
		 */
		if (fcntl(STDIN_FILENO, F_SETPIPE_SZ, STDIO_PIPE_SIZE) < 0 && errno != EBADF &&
		    errno != EINVAL)
			vmig_log(VMIG_LOG_DEBUG, "stdin: F_SETPIPE_SZ: %s", strerror(errno));
		ret = vmig_transport_from_fds(fcntl(STDIN_FILENO, F_DUPFD_CLOEXEC, 3),
					      fcntl(STDOUT_FILENO, F_DUPFD_CLOEXEC, 3), &t);
		if (ret)
			vmig_err_set(&err, ret, "cannot use stdin/stdout: %s", strerror(-ret));
	} else {
		ret = vmig_transport_listen(o->listen, &l, &err);
		if (!ret)
			ret = waiting_open(&wait, &claim, o->name, vmig_listener_uri(l), &err);
		if (!ret) {
			if (o->notify_fd >= 0) {
				/* Success (an empty message), then the real address:
				 * the parent prints it (a port 0 was picked here). */
				const char *u = vmig_listener_uri(l);

				if (write(o->notify_fd, "", 1) < 0 ||
				    write(o->notify_fd, u, strlen(u) + 1) < 0)
					vmig_log(VMIG_LOG_WARN, "cannot notify the parent: %s",
						 strerror(errno));
				close(o->notify_fd);
				o->notify_fd = -1;
			} else
				fprintf(stderr, "vmig: waiting for a migration on %s\n", vmig_listener_uri(l));
			/* Wait, but let SIGINT/SIGTERM end the wait. */
			do {
				ret = vmig_transport_accept(l, 200, &t, &err);
				if (ret == -ETIMEDOUT) {
					vmig_err_clear(&err);
					if (signalled(&sig_fd, &err)) {
						ret = -EINTR;
						break;
					}
					waiting_serve(&wait);
					if (wait.stop) {
						vmig_err_set(&err, -ECANCELED, "stopped while waiting "
							     "for a migration (vmig stop %s)", wait.name);
						ret = -ECANCELED;
						break;
					}
				}
			} while (ret == -ETIMEDOUT);
		}
		/* The VM's own socket (the same name, or its own) comes later. */
		waiting_close(&wait);
	}
	if (ret) {
		vmig_listener_close(l);
		snprintf(msg, sizeof(msg), "%s", err.msg[0] ? err.msg : strerror(-ret));
		goto fail_msg;
	}
	/* A source with --channels connects again: keep listening till it has. */
	dp.listener = l;
	if (o->stdio) {
		dp.accept_channel = accept_joined_channel;
		dp.accept_arg = &join;
	}
	ret = vmig_migrate_dst_run(t, &dp, &vm, &err);
	join_ctx_fini(&join);
	vmig_listener_close(l);
	vmig_transport_close(t);
	if (pa && !pa->used)
		vmig_log(VMIG_LOG_WARN, "--prealloc: the VM needs more than the %" PRIu64
			 " MiB preallocated; they were not used", o->prealloc >> 20);
	vmig_prealloc_destroy(pa);
	pa = NULL;
	if (ret) {
		snprintf(msg, sizeof(msg), "%s", err.msg[0] ? err.msg : strerror(-ret));
		goto fail_msg;
	}
	ret = vmig_ctl_listen(claim.paths.sock, &listen_fd);
	if (ret) {
		/* The VM runs here now: keep it, without a control socket. */
		fprintf(stderr, "vmig: cannot listen on %s: %s\n", claim.paths.sock, strerror(-ret));
	}
	/* `vmig console NAME` works here as for a VM started by `vmig run`. */
	ret = cli_console_start(vm, claim.paths.console, false, &console);
	if (ret)
		fprintf(stderr, "vmig: cannot listen on %s: %s\n", claim.paths.console,
			strerror(-ret));
	if (o->notify_fd >= 0) {
		cli_notify_parent(o->notify_fd, "");
		o->notify_fd = -1;
	}
	if (o->stdio)
		detach_from_ssh(&claim);
	fprintf(stderr, "vmig: VM '%s' %s here (%s); control socket %s\n",
		vmig_vm_config(vm)->name, o->file ? "restored" : "arrived",
		vmig_vm_state_name(vmig_vm_state(vm)), claim.paths.sock);
	code = cli_control_serve(vm, listen_fd, sig_fd);
	/*
	 * A Linux guest that reset itself boots again in a fresh VM, from
	 * the kernel, initrd and command line its source sent along.
	 */
	while (vmig_vm_reboot_requested(vm) && vmig_vm_can_reboot(vm)) {
		char name[128];

		snprintf(name, sizeof(name), "%s", vmig_vm_config(vm)->name);
		err = (struct vmig_err){ 0 };
		cli_console_set_vm(console, NULL);
		ret = vmig_vm_recreate(&vm, &err);
		if (!ret)
			ret = vmig_vm_start(vm, &err);
		if (ret) {
			cli_error("cannot restart VM '%s' after its reboot: %s", name,
				  err.msg[0] ? err.msg : strerror(-ret));
			code = VMIG_EXIT_ERROR;
			break;
		}
		cli_console_set_vm(console, vm);
		fprintf(stderr, "vmig: VM '%s' restarted\n", name);
		code = cli_control_serve(vm, listen_fd, sig_fd);
	}
	goto out;

fail_msg:
	if (o->notify_fd >= 0)
		cli_notify_parent(o->notify_fd, msg);
	cli_error("%s", msg);
out:
	cli_console_stop(console);
	if (listen_fd >= 0) {
		unlink(claim.paths.sock);
		close(listen_fd);
	}
	vmig_vm_destroy(vm);
	vmig_prealloc_destroy(pa);
	if (claim.lock_fd >= 0) {
		unlink(claim.paths.pid);
		close(claim.lock_fd);
	}
	if (sig_fd >= 0)
		close(sig_fd);
	return code;
}

static int run_detached(struct in_opts *o)
{
	char dir[4096], log[4200], msg[1024];
	int pipefd[2], status;
	size_t len = 0;
	ssize_t n;
	pid_t child;

	if (vmig_rundir_get(dir, sizeof(dir)) < 0 || vmig_rundir_ensure(dir) < 0) {
		cli_error("no usable run directory: set VMIG_RUN_DIR or XDG_RUNTIME_DIR");
		return VMIG_EXIT_ERROR;
	}
	if (pipe2(pipefd, O_CLOEXEC) < 0) {
		cli_error("pipe: %s", strerror(errno));
		return VMIG_EXIT_ERROR;
	}
	fflush(NULL);
	child = fork();
	if (child < 0) {
		cli_error("fork: %s", strerror(errno));
		return VMIG_EXIT_ERROR;
	}
	if (child == 0) {
		int null_fd, log_fd;

		close(pipefd[0]);
		setsid();
		snprintf(log, sizeof(log), "%s/%s.%d.log", dir, o->cmd, (int)getpid());
		null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
		log_fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
		if (null_fd < 0 || log_fd < 0) {
			cli_notify_parent(pipefd[1], "cannot open a log file in the run directory");
			_exit(VMIG_EXIT_ERROR);
		}
		dup2(null_fd, STDIN_FILENO);
		dup2(log_fd, STDOUT_FILENO);
		dup2(log_fd, STDERR_FILENO);
		close(null_fd);
		close(log_fd);
		o->notify_fd = pipefd[1];
		_exit(receive_and_serve(o, log));
	}
	close(pipefd[1]);
	/* An error message, or an empty one and the listening address. */
	while (len < sizeof(msg) - 1) {
		n = read(pipefd[0], msg + len, sizeof(msg) - 1 - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += n;
		if (msg[0] ? memchr(msg, 0, len) != NULL :
		    len > 1 && memchr(msg + 1, 0, len - 1) != NULL)
			break;
	}
	close(pipefd[0]);
	msg[len] = 0;
	if (len == 0 || msg[0]) {
		cli_error("%s", len ? msg : "the receiving process exited during start-up");
		waitpid(child, &status, 0);
		return VMIG_EXIT_ERROR;
	}
	if (o->file)
		printf("VM restored from %s (pid %d)\n", o->file, (int)child);
	else
		printf("waiting for a migration on %s (pid %d)\n", len > 1 ? msg + 1 : o->listen,
		       (int)child);
	return VMIG_EXIT_OK;
}

static int parse_in(int argc, char **argv, struct in_opts *o, bool restore)
{
	static const struct option longopts[] = {
		{ "listen", required_argument, NULL, 'l' },
		{ "stdio",  no_argument,       NULL, 's' },
		{ "name",   required_argument, NULL, 'n' },
		{ "detach", no_argument,       NULL, 'd' },
		{ "paused", no_argument,       NULL, 'p' },
		{ "resume", no_argument,       NULL, 'r' },
		{ "prealloc", required_argument, NULL, 'P' },
		{ "join",   required_argument, NULL, 'J' },
		{ "help",   no_argument,       NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *cmd = restore ? "restore" : "incoming";
	int c;

	memset(o, 0, sizeof(*o));
	o->cmd = cmd;
	o->notify_fd = -1;
	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":l:sn:dprP:J:h", longopts, NULL)) != -1) {
		switch (c) {
		case 'l':
			if (restore)
				return cli_usage_error(cmd, "unknown option '--listen'");
			o->listen = optarg;
			break;
		case 's':
			if (restore)
				return cli_usage_error(cmd, "unknown option '--stdio'");
			o->stdio = true;
			break;
		case 'n':
			if (vmig_vm_name_valid(optarg) < 0)
				return cli_usage_error(cmd, "bad VM name '%s'", optarg);
			o->name = optarg;
			break;
		case 'd':
			o->detach = true;
			break;
		case 'p':
			if (!restore)
				return cli_usage_error(cmd, "unknown option '--paused'");
			o->paused = true;
			break;
		case 'r':
			if (!restore)
				return cli_usage_error(cmd, "unknown option '--resume'");
			o->resume = true;
			break;
		case 'J':
			if (restore)
				return cli_usage_error(cmd, "unknown option '--join'");
			o->join = optarg;
			break;
		case 'P':
			if (vmig_size_parse(optarg, &o->prealloc) < 0 || !o->prealloc ||
			    o->prealloc % (2u << 20))
				return cli_usage_error(cmd, "bad --prealloc '%s': a size in MiB or "
						       "GiB, a multiple of 2 MiB (e.g. 4G)", optarg);
			break;
		case 'h':
			if (restore)
				printf("Usage: vmig restore FILE [--name NAME] [--paused|--resume] [--detach]\n\n"
				       "Start the VM saved in FILE by 'vmig save'; this process becomes its VMM.\n\n"
				       "  -n, --name NAME   name it NAME instead of its saved name\n"
				       "  -p, --paused      keep it paused\n"
				       "  -r, --resume      run it even if it was paused when saved\n"
				       "      --prealloc SIZE  allocate SIZE of guest RAM before reading\n"
				       "  -d, --detach      run in the background once it is restored\n");
			else
				printf("Usage: vmig incoming (--listen URI | --stdio) [--name NAME] [--detach]\n\n"
				       "Receive a live migration from 'vmig migrate'; after the handoff this\n"
				       "process is the VM's VMM.\n\n"
				       "  -l, --listen URI  tcp://HOST:PORT or unix:PATH\n"
				       "  -s, --stdio       the stream on stdin/stdout (started through SSH)\n"
				       "  -n, --name NAME   name the VM NAME instead of its name on the source\n"
				       "      --prealloc SIZE  allocate and fault in SIZE of guest RAM before\n"
				       "                    listening (at least the VM's memory size)\n"
				       "  (vmig incoming --join SESSION: run by the source over SSH for each\n"
				       "   extra channel of a migration; hands it to that migration's --stdio)\n"
				       "  -d, --detach      return once listening; the VMM goes on in the background\n");
			exit(VMIG_EXIT_OK);
		case ':':
			return cli_usage_error(cmd, "option '%s' needs a value", argv[optind - 1]);
		default:
			return cli_usage_error(cmd, "unknown option '%s'", argv[optind - 1]);
		}
	}
	if (restore) {
		if (argc - optind != 1)
			return cli_usage_error(cmd, argc - optind < 1 ? "missing FILE" :
					       "too many arguments");
		o->file = argv[optind];
		if (o->paused && o->resume)
			return cli_usage_error(cmd, "--paused and --resume exclude each other");
	} else {
		if (optind != argc)
			return cli_usage_error(cmd, "too many arguments");
		if (o->join && (o->listen || o->stdio || o->detach || o->name || o->prealloc))
			return cli_usage_error(cmd, "--join takes no other option");
		if (o->join)
			return 0;
		if (!!o->listen == o->stdio)
			return cli_usage_error(cmd, "give either --listen URI or --stdio");
		if (o->stdio && o->detach)
			return cli_usage_error(cmd, "--stdio and --detach exclude each other");
		if (o->listen && strncmp(o->listen, "tcp://", 6) && strncmp(o->listen, "unix:", 5) &&
		    strncmp(o->listen, "rdma://", 7))
			return cli_usage_error(cmd, "bad --listen '%s': use tcp://HOST:PORT, "
					       "rdma://HOST:PORT or unix:PATH", o->listen);
	}
	return 0;
}

int cmd_incoming(int argc, char **argv)
{
	struct in_opts o;
	int ret = parse_in(argc, argv, &o, false);
	char why[512];

	if (ret)
		return ret;
	if (o.join)
		return join_channel(o.join);
	/* --stdio: the source is connected already; the VM's claim refuses
	 * it, and that error reaches the source. */
	if (!o.stdio && cli_drain_check(why, sizeof(why)) < 0) {
		cli_error("no incoming migration: %s", why);
		return VMIG_EXIT_ERROR;
	}
	return o.detach ? run_detached(&o) : receive_and_serve(&o, NULL);
}

int cmd_restore(int argc, char **argv)
{
	struct in_opts o;
	int ret = parse_in(argc, argv, &o, true);

	if (ret)
		return ret;
	if (access(o.file, R_OK) < 0) {
		cli_error("cannot read %s: %s", o.file, strerror(errno));
		return VMIG_EXIT_ERROR;
	}
	return o.detach ? run_detached(&o) : receive_and_serve(&o, NULL);
}
