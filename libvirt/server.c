/*
 * vmig libvirt-serve: libvirt's RPC protocol on a unix socket, in front of
 * the VMs of one run directory.
 *
 * Threads.  The main thread accepts connections (and watches for
 * SIGINT/SIGTERM through a signalfd).  Each connection has a reader
 * thread that reads whole packets and answers keepalive PINGs and
 * malformed packets itself; each call gets a thread of its own, so that
 * a call that blocks (a migration takes as long as it takes) never holds
 * up the calls behind it: virsh and libvirt's API poll job statistics on
 * the same connection while virDomainMigrateToURI3() waits.  Replies go
 * out whole under the connection's lock, in whatever order calls finish;
 * the serial number pairs them with their calls.  While calls are in
 * flight the reader also pings the client every LV_PING_MS (see
 * wait_readable(): libvirt's client library needs a packet to wake up and
 * send the calls of its other threads).
 *
 * Lifetime.  A connection is reference-counted: its reader holds one, as
 * does every call in flight.  When the client goes, the reader shuts the
 * socket down and drops its reference; calls still running finish (a
 * migration goes on to its end, as in libvirt), find the socket dead,
 * and the last one frees the connection.
 *
 * Malformed input never ends the server: a length that cannot be right
 * (shorter than a header, longer than LV_PACKET_MAX) leaves the stream out
 * of step, so the connection is closed; anything else (unknown program,
 * version, type or procedure, a body that does not decode) gets an error
 * reply and the connection goes on.
 */
#include "config.h"

#include <errno.h>
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>
#include <libvirt/virterror.h>

#include "vmig/util.h"
#include "libvirt-internal.h"

/* Calls in flight per connection; more get an error reply. */
#define LV_CALLS_MAX 32

struct lv_conn {
	int fd;
	struct lv_server *srv;
	pthread_mutex_t lock;        /* writes, refs, calls */
	unsigned int refs;
	unsigned int calls;
};

static void conn_unref(struct lv_conn *c)
{
	bool last;

	pthread_mutex_lock(&c->lock);
	last = --c->refs == 0;
	pthread_mutex_unlock(&c->lock);
	if (!last)
		return;
	close(c->fd);
	pthread_mutex_destroy(&c->lock);
	free(c);
}

/* Write a whole packet; 0 or -errno.  Caller holds c->lock. */
static int send_locked(struct lv_conn *c, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = send(c->fd, buf, len, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

static int conn_send(struct lv_conn *c, const char *buf, size_t len)
{
	int ret;

	pthread_mutex_lock(&c->lock);
	ret = send_locked(c, buf, len);
	pthread_mutex_unlock(&c->lock);
	return ret;
}

/* What libvirt says first for error @code. */
static const char *error_prefix(int code)
{
	switch (code) {
	case VIR_ERR_INTERNAL_ERROR: return "internal error: ";
	case VIR_ERR_NO_SUPPORT: return "this function is not supported by the connection "
					"driver: ";
	case VIR_ERR_INVALID_ARG: return "invalid argument: ";
	case VIR_ERR_OPERATION_FAILED: return "operation failed: ";
	case VIR_ERR_NO_DOMAIN: return "Domain not found: ";
	case VIR_ERR_XML_ERROR: return "XML error: ";
	case VIR_ERR_OPERATION_INVALID: return "Requested operation is not valid: ";
	case VIR_ERR_OPERATION_TIMEOUT: return "Timed out during operation: ";
	case VIR_ERR_ARGUMENT_UNSUPPORTED: return "argument unsupported: ";
	case VIR_ERR_OPERATION_ABORTED: return "operation aborted: ";
	case VIR_ERR_OPERATION_UNSUPPORTED: return "Operation not supported: ";
	default: return "";
	}
}

int vmig__lv_fail(struct lv_call *c, int code, const char *fmt, ...)
{
	va_list ap;

	const char *prefix = error_prefix(code);
	size_t n;

	if (c->err.code)
		return -1;
	c->err.code = code;
	c->err.domain = VIR_FROM_REMOTE;
	/* libvirt's servers send the whole text, "what: detail": so do we. */
	n = (size_t)snprintf(c->err.msg, sizeof(c->err.msg), "%s", prefix);
	va_start(ap, fmt);
	vsnprintf(c->err.msg + n, sizeof(c->err.msg) - n, fmt, ap);
	va_end(ap);
	return -1;
}

static bool error_body(XDR *x, void *arg)
{
	return vmig__lv_xdr_error(x, arg);
}

/* Reply to the call of header @h with error @e. */
static void send_error(struct lv_conn *c, const struct lv_header *h, const struct lv_error *e)
{
	struct lv_header r = *h;
	char buf[4096];
	size_t len;

	r.type = LV_TYPE_REPLY;
	r.status = LV_STATUS_ERROR;
	len = vmig__lv_pack(buf, sizeof(buf), &r, error_body, (void *)e);
	if (len)
		conn_send(c, buf, len);
}

static void send_error_msg(struct lv_conn *c, const struct lv_header *h, int code,
			   const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void send_error_msg(struct lv_conn *c, const struct lv_header *h, int code,
			   const char *fmt, ...)
{
	struct lv_error e = { .code = code, .domain = VIR_FROM_RPC };
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(e.msg, sizeof(e.msg), fmt, ap);
	va_end(ap);
	vmig_log(VMIG_LOG_INFO, "libvirt: refused a packet: %s", e.msg);
	send_error(c, h, &e);
}

static void *call_thread(void *arg)
{
	struct lv_call *call = arg;
	struct lv_conn *c = call->conn;
	struct lv_header r = call->hdr;
	uint32_t body_len;
	size_t total;
	int ret;

	struct timespec t0, t1;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	xdrmem_create(&call->in, call->args, (u_int)call->args_len, XDR_DECODE);
	call->reply = malloc(LV_REPLY_MAX);
	if (!call->reply) {
		vmig__lv_fail(call, VIR_ERR_NO_MEMORY, "out of memory");
		ret = -1;
	} else {
		xdrmem_create(&call->out, call->reply + LV_LEN_SIZE + LV_HEADER_SIZE,
			      LV_REPLY_MAX - LV_LEN_SIZE - LV_HEADER_SIZE, XDR_ENCODE);
		ret = vmig__lv_dispatch(call);
	}
	if (ret < 0) {
		if (!call->err.code)
			vmig__lv_fail(call, VIR_ERR_INTERNAL_ERROR, "procedure %d failed",
				      call->hdr.proc);
		vmig_log(VMIG_LOG_INFO, "libvirt: %s (%d): %s",
			 vmig__lv_proc_name(call->hdr.proc) ? vmig__lv_proc_name(call->hdr.proc) : "?",
			 call->hdr.proc, call->err.msg);
		send_error(c, &call->hdr, &call->err);
	} else {
		/* The body is in place: put the length and header in front. */
		body_len = xdr_getpos(&call->out);
		r.type = LV_TYPE_REPLY;
		r.status = LV_STATUS_OK;
		total = vmig__lv_pack(call->reply, LV_LEN_SIZE + LV_HEADER_SIZE, &r, NULL, NULL);
		if (total) {
			uint32_t be = htonl((uint32_t)(total + body_len));

			memcpy(call->reply, &be, 4);
			conn_send(c, call->reply, total + body_len);
		}
		xdr_destroy(&call->out);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	vmig_log(VMIG_LOG_DEBUG, "libvirt: %s (serial %u) served in %ld ms",
		 vmig__lv_proc_name(call->hdr.proc), call->hdr.serial,
		 (long)((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000));
	if (call->close_after)
		shutdown(c->fd, SHUT_RDWR);
	xdr_destroy(&call->in);
	free(call->reply);
	free(call->args);
	free(call);
	pthread_mutex_lock(&c->lock);
	c->calls--;
	pthread_mutex_unlock(&c->lock);
	conn_unref(c);
	return NULL;
}

/* Read exactly @len bytes; 0, -EPIPE at end of stream, or -errno. */
static int read_full(int fd, void *buf, size_t len)
{
	char *p = buf;

	while (len) {
		ssize_t n = read(fd, p, len);

		if (n == 0)
			return -EPIPE;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static void keepalive(struct lv_conn *c, int proc)
{
	struct lv_header h = {
		.prog = LV_KEEPALIVE_PROGRAM, .vers = LV_KEEPALIVE_VERSION,
		.proc = proc, .type = LV_TYPE_MESSAGE, .serial = 0,
		.status = LV_STATUS_OK,
	};
	char buf[64];
	size_t len = vmig__lv_pack(buf, sizeof(buf), &h, NULL, NULL);

	if (len)
		conn_send(c, buf, len);
}

static void pong(struct lv_conn *c)
{
	keepalive(c, LV_KEEPALIVE_PONG);
}

static void ping(struct lv_conn *c)
{
	keepalive(c, LV_KEEPALIVE_PING);
}

/* Handle one packet of @len bytes (header and body) from @buf, which it
 * takes over. */
static void handle_packet(struct lv_conn *c, char *buf, size_t len)
{
	struct lv_header h;
	struct lv_call *call;
	pthread_attr_t attr;
	pthread_t tid;
	XDR x;
	bool ok;

	xdrmem_create(&x, buf, (u_int)len, XDR_DECODE);
	ok = vmig__lv_xdr_header(&x, &h);
	xdr_destroy(&x);
	if (!ok) {
		free(buf);
		return;
	}
	if (h.prog == LV_KEEPALIVE_PROGRAM) {
		/* Keepalive: answer PING; PONG (to our pings) and the
		 * rest are ignored, as libvirt does. */
		if (h.vers == LV_KEEPALIVE_VERSION && h.proc == LV_KEEPALIVE_PING &&
		    h.type == LV_TYPE_MESSAGE)
			pong(c);
		free(buf);
		return;
	}
	if (h.type != LV_TYPE_CALL && h.type != LV_TYPE_CALL_WITH_FDS) {
		/* Replies, events and stream data from a client: nothing we wait
		 * for.  Calls and only calls get replies. */
		vmig_log(VMIG_LOG_INFO, "libvirt: ignored a packet of type %d", h.type);
		free(buf);
		return;
	}
	if (h.prog != LV_PROGRAM) {
		send_error_msg(c, &h, VIR_ERR_RPC, "unknown program 0x%x: vmig serves libvirt's "
			       "remote program 0x%x and keepalive", h.prog, LV_PROGRAM);
		free(buf);
		return;
	}
	if (h.vers != LV_PROGRAM_VERSION) {
		send_error_msg(c, &h, VIR_ERR_RPC, "unknown protocol version %u (vmig speaks "
			       "version %u)", h.vers, LV_PROGRAM_VERSION);
		free(buf);
		return;
	}
	if (h.type == LV_TYPE_CALL_WITH_FDS) {
		send_error_msg(c, &h, VIR_ERR_NO_SUPPORT, "vmig's libvirt endpoint takes no file "
			       "descriptors");
		free(buf);
		return;
	}
	if (h.status != LV_STATUS_OK) {
		send_error_msg(c, &h, VIR_ERR_RPC, "a call with status %d", h.status);
		free(buf);
		return;
	}

	pthread_mutex_lock(&c->lock);
	if (c->calls >= LV_CALLS_MAX) {
		pthread_mutex_unlock(&c->lock);
		send_error_msg(c, &h, VIR_ERR_RPC, "too many calls in flight on this "
			       "connection (at most %d)", LV_CALLS_MAX);
		free(buf);
		return;
	}
	c->calls++;
	c->refs++;
	pthread_mutex_unlock(&c->lock);

	call = calloc(1, sizeof(*call));
	if (!call)
		goto undo;
	call->conn = c;
	call->srv = c->srv;
	call->hdr = h;
	/* The arguments start after the header: move them to the front. */
	memmove(buf, buf + LV_HEADER_SIZE, len - LV_HEADER_SIZE);
	call->args = buf;
	call->args_len = len - LV_HEADER_SIZE;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&attr, 256 * 1024);
	if (pthread_create(&tid, &attr, call_thread, call) == 0) {
		pthread_attr_destroy(&attr);
		return;
	}
	pthread_attr_destroy(&attr);
	free(call);
undo:
	pthread_mutex_lock(&c->lock);
	c->calls--;
	c->refs--;
	pthread_mutex_unlock(&c->lock);
	send_error_msg(c, &h, VIR_ERR_NO_MEMORY, "cannot start a thread for the call");
	free(buf);
}

/*
 * Wait until @c's socket is readable.  Meanwhile, while a call is in
 * flight, send the client a keepalive PING every LV_PING_MS: libvirt's
 * client library (9.0 at least) can leave a second thread's call unsent
 * while the first thread's call waits for its reply, until something
 * arrives on the connection; a PING is such a thing (clients answer PONG,
 * or ignore it without keepalive), so that job statistics polled during a
 * migration flow.  Returns false if the socket failed.
 */
#define LV_PING_MS 100
static bool wait_readable(struct lv_conn *c)
{
	for (;;) {
		struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
		unsigned int calls;
		int ret = poll(&pfd, 1, LV_PING_MS);

		if (ret > 0)
			return true;
		if (ret < 0 && errno != EINTR)
			return false;
		if (ret == 0) {
			pthread_mutex_lock(&c->lock);
			calls = c->calls;
			pthread_mutex_unlock(&c->lock);
			if (calls)
				ping(c);
		}
	}
}

static void *conn_thread(void *arg)
{
	struct lv_conn *c = arg;

	for (;;) {
		uint32_t be, len;
		char *buf;

		if (!wait_readable(c) || read_full(c->fd, &be, 4) < 0)
			break;
		len = ntohl(be);
		if (len < LV_LEN_SIZE + LV_HEADER_SIZE || len > LV_PACKET_MAX) {
			/* Nothing after this can be trusted to start a packet. */
			vmig_log(VMIG_LOG_INFO, "libvirt: a packet of %u bytes (must be %u to %u): "
				 "closing the connection", len, LV_LEN_SIZE + LV_HEADER_SIZE,
				 LV_PACKET_MAX);
			break;
		}
		len -= LV_LEN_SIZE;
		buf = malloc(len);
		if (!buf)
			break;
		if (read_full(c->fd, buf, len) < 0) {
			free(buf);
			break;
		}
		handle_packet(c, buf, len);
	}
	shutdown(c->fd, SHUT_RDWR);
	conn_unref(c);
	return NULL;
}

static void accept_one(struct lv_server *s, int listen_fd)
{
	struct lv_conn *c;
	pthread_attr_t attr;
	pthread_t tid;
	int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);

	if (fd < 0)
		return;
	c = calloc(1, sizeof(*c));
	if (!c) {
		close(fd);
		return;
	}
	c->fd = fd;
	c->srv = s;
	c->refs = 1;
	pthread_mutex_init(&c->lock, NULL);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&attr, 256 * 1024);
	if (pthread_create(&tid, &attr, conn_thread, c) != 0) {
		vmig_log(VMIG_LOG_WARN, "libvirt: cannot start a connection thread");
		conn_unref(c);
	}
	pthread_attr_destroy(&attr);
}

struct lv_vm_setting *vmig__lv_setting_locked(struct lv_server *s, const char *name)
{
	unsigned int i;

	for (i = 0; i < s->nr_vms; i++)
		if (!strcmp(s->vms[i].name, name))
			return &s->vms[i];
	if (s->nr_vms == sizeof(s->vms) / sizeof(s->vms[0]))
		return NULL;
	memset(&s->vms[s->nr_vms], 0, sizeof(s->vms[0]));
	snprintf(s->vms[s->nr_vms].name, sizeof(s->vms[0].name), "%s", name);
	return &s->vms[s->nr_vms++];
}

/* A socket handed over by systemd (LISTEN_FDS), or -1. */
static int systemd_socket(void)
{
	const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
	struct stat st;

	if (!pid || !fds || atol(pid) != (long)getpid() || atoi(fds) < 1)
		return -1;
	unsetenv("LISTEN_PID");
	unsetenv("LISTEN_FDS");
	unsetenv("LISTEN_FDNAMES");
	if (fstat(3, &st) < 0 || !S_ISSOCK(st.st_mode))
		return -1;
	return 3;
}

/*
 * Where definitions live (virsh define): @given, else
 * /var/lib/vmig/libvirt/domains for root, else
 * $XDG_CONFIG_HOME/vmig/libvirt/domains ($HOME/.config when unset).
 * 0 or -errno.
 */
static int config_dir_get(const char *given, char *buf, size_t len)
{
	const char *env;
	int n;

	if (given)
		n = snprintf(buf, len, "%s", given);
	else if (geteuid() == 0)
		n = snprintf(buf, len, "/var/lib/vmig/libvirt/domains");
	else if ((env = getenv("XDG_CONFIG_HOME")) && *env == '/')
		n = snprintf(buf, len, "%s/vmig/libvirt/domains", env);
	else if ((env = getenv("HOME")) && *env == '/')
		n = snprintf(buf, len, "%s/.config/vmig/libvirt/domains", env);
	else
		return -ENOENT;
	return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

int vmig_libvirt_serve(const struct vmig_libvirt_options *o)
{
	static struct lv_server srv;   /* calls may outlive a connection: never freed */
	char path[4096];
	sigset_t set;
	bool own_socket = false;
	int listen_fd, sfd, ret;

	memset(&srv, 0, sizeof(srv));
	pthread_mutex_init(&srv.lock, NULL);
	pthread_mutex_init(&srv.defs_lock, NULL);
	srv.remote_vmig = o->remote_vmig;
	srv.known_hosts = o->known_hosts;
	srv.identity = o->identity;
	srv.accept_new_host_key = o->accept_new_host_key;
	snprintf(srv.uri, sizeof(srv.uri), "vmig:///system");
	ret = vmig_rundir_get(srv.run_dir, sizeof(srv.run_dir));
	if (ret < 0) {
		fprintf(stderr, "vmig: no run directory: set VMIG_RUN_DIR or XDG_RUNTIME_DIR\n");
		return 1;
	}
	ret = vmig_rundir_ensure(srv.run_dir);
	if (ret < 0) {
		fprintf(stderr, "vmig: cannot create the run directory %s: %s\n", srv.run_dir,
			strerror(-ret));
		return 1;
	}

	ret = config_dir_get(o->config_dir, srv.config_dir, sizeof(srv.config_dir));
	if (ret < 0) {
		fprintf(stderr, "vmig: no directory for domain definitions: give --config-dir "
			"or set XDG_CONFIG_HOME or HOME\n");
		return 1;
	}
	ret = vmig_rundir_ensure(srv.config_dir);
	if (ret < 0) {
		fprintf(stderr, "vmig: cannot create the definitions directory %s: %s\n",
			srv.config_dir, strerror(-ret));
		return 1;
	}

	listen_fd = systemd_socket();
	if (listen_fd < 0) {
		if (o->socket_path)
			snprintf(path, sizeof(path), "%s", o->socket_path);
		else if ((size_t)snprintf(path, sizeof(path), "%s/libvirt-sock", srv.run_dir) >=
			 sizeof(path))
			return 1;
		ret = vmig_ctl_listen(path, &listen_fd);
		if (ret < 0) {
			fprintf(stderr, "vmig: cannot listen on %s: %s%s\n", path, strerror(-ret),
				ret == -EADDRINUSE ? " (another libvirt-serve answers there)" : "");
			return 1;
		}
		own_socket = true;
	}

	/* Signals go to the signalfd; no thread gets them otherwise, and no
	 * write to a dead client raises SIGPIPE. */
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	sfd = signalfd(-1, &set, SFD_CLOEXEC);
	if (sfd < 0) {
		fprintf(stderr, "vmig: signalfd: %s\n", strerror(errno));
		return 1;
	}
	if (own_socket)
		fprintf(stderr, "vmig: serving libvirt's protocol on %s for the VMs in %s "
			"(definitions in %s); connect with vmig+unix:///system?socket=%s\n", path,
			srv.run_dir, srv.config_dir, path);
	for (;;) {
		struct pollfd pfd[2] = {
			{ .fd = listen_fd, .events = POLLIN },
			{ .fd = sfd, .events = POLLIN },
		};

		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (pfd[1].revents) {
			struct signalfd_siginfo si;

			if (read(sfd, &si, sizeof(si)) == sizeof(si))
				fprintf(stderr, "vmig: %s: libvirt-serve stops (the VMs go on)\n",
					strsignal((int)si.ssi_signo));
			break;
		}
		if (pfd[0].revents)
			accept_one(&srv, listen_fd);
	}
	if (own_socket)
		unlink(path);
	close(listen_fd);
	close(sfd);
	return 0;
}
