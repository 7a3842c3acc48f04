/*
 * The SSH transport: `vmig migrate NAME ssh://[USER@]HOST[:PORT]` logs in
 * to HOST with libssh2, runs `vmig incoming --stdio` there, and carries
 * the migration stream on that command's stdin and the replies on its
 * stdout.
 *
 * Set-up runs with libssh2 in blocking mode, each step bounded by what is
 * left of the connect timeout: TCP (keepalives on, as for tcp://), the
 * handshake (fast ciphers first; host key algorithms already recorded for
 * HOST first, as OpenSSH does, so that a known host is not taken for an
 * unknown one), the host key checked against known_hosts before any
 * credential is offered, public-key authentication (agent, then key
 * files; never a prompt), one session channel with a large receive
 * window, exec.
 *
 * Data moves with libssh2 in non-blocking mode and poll() on the socket,
 * so that every wait is bounded by t->timeout_ms and a dead or hung peer
 * costs at most that long (TCP keepalives and SSH keepalives find a dead
 * host sooner).  Three libssh2 rules shape the loops below:
 *
 *  - A call that returns EAGAIN after starting to send a packet
 *    (libssh2_session_block_directions() has BLOCK_OUTBOUND) must be
 *    repeated, with the same arguments, before any other call that might
 *    send: otherwise libssh2 fails with LIBSSH2_ERROR_BAD_USE.  Channel
 *    reads send window adjustments, so they count.  Every call here is
 *    therefore finished (repeated after POLLOUT) before the next one.
 *  - libssh2_keepalive_send() forgets a keepalive it could only partly
 *    send, which would wedge the session: keepalives go out only when the
 *    socket has room and nothing is pending.
 *  - stdout and stderr share the channel's window, and libssh2 keeps
 *    unread stderr: the remote's stderr (its log, the guest console) is
 *    drained at every turn, its last bytes kept for error messages.
 *
 * A reply that arrives while a write waits for the window is read ahead
 * into a small buffer, so that the end of the replies (the remote command
 * has ended) is seen and the write fails at once instead of waiting out
 * its timeout with the window shut.
 *
 * Threads: one at a time, for reading and writing alike.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <libssh2.h>

#include "transport-internal.h"

#define SSH_EXPECTED     "expected ssh://[USER@]HOST[:PORT]"
#define SSH_CHUNK        32700u      /* libssh2 sends at most this per call */
#define READ_AHEAD_CAP   (64u << 10) /* replies read while a write waits */
#define ERR_TAIL         2048u       /* last bytes of the remote's stderr */
#define EXIT_WAIT_MS     2000        /* for the exit status after EOF */
#define CLOSE_WAIT_MS    1000        /* graceful end of the session */

struct ssh_transport {
	struct vmig_transport base;
	LIBSSH2_SESSION *session;
	LIBSSH2_CHANNEL *channel;
	int sock;
	int event_fd;            /* readable: a reply or EOF has arrived */
	bool event_set;
	int sock_errno;          /* the last send/recv failure on sock */
	bool sock_eof;           /* the peer closed the TCP connection */
	bool broken;             /* failed: no graceful close */
	int broken_code;
	bool eof_sent;
	char host[300];          /* "HOST" or "[HOST]:PORT", for messages */
	char command[4200];      /* the remote command, for messages */
	uint8_t *ahead;          /* replies read ahead; [ahead_start, ahead_end) */
	size_t ahead_start, ahead_end;
	char errtail[ERR_TAIL];  /* ring of the remote's stderr */
	size_t errtail_len;      /* bytes ever written to errtail */
	char line[256];          /* the remote stderr line being assembled */
	size_t line_len;
	int64_t eof_since_ms;    /* remote EOF seen while a write waited */
};

static struct ssh_transport *to_ssh(struct vmig_transport *t)
{
	return (struct ssh_transport *)t;
}

static pthread_once_t ssh_once = PTHREAD_ONCE_INIT;
static int ssh_init_ret;

static void ssh_global_init(void)
{
	ssh_init_ret = libssh2_init(0);
}

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Milliseconds left until @deadline (-1: none, returns -1), at least 0. */
static int remaining_ms(int64_t deadline)
{
	int64_t left;

	if (deadline < 0)
		return -1;
	left = deadline - now_ms();
	if (left < 0)
		return 0;
	return left > INT_MAX ? INT_MAX : (int)left;
}

/* ------------------------------------------------------------------------
 * URIs
 */

int vmig__ssh_parse_uri(const char *rest, const char *uri, struct vmig_uri *out,
			struct vmig_err *err)
{
	const char *p, *at, *host, *host_end, *port = NULL, *end;
	size_t ulen = 0, hlen;

	if (strncmp(rest, "//", 2) != 0) {
		vmig_err_set(err, -EINVAL, "bad address '%s' (" SSH_EXPECTED ")", uri);
		return -EINVAL;
	}
	p = rest + 2;
	end = p + strlen(p);
	if (end > p && end[-1] == '/')
		end--;                     /* ssh://host/ is ssh://host */
	if (memchr(p, '/', (size_t)(end - p))) {
		vmig_err_set(err, -EINVAL, "unexpected path in '%s' (" SSH_EXPECTED ")", uri);
		return -EINVAL;
	}
	at = memchr(p, '@', (size_t)(end - p));
	if (at) {
		ulen = (size_t)(at - p);
		if (ulen == 0 || ulen >= sizeof(out->user)) {
			vmig_err_set(err, -EINVAL, "%s user name in '%s' (" SSH_EXPECTED ")",
				     ulen ? "too long a" : "empty", uri);
			return -EINVAL;
		}
		for (size_t i = 0; i < ulen; i++) {
			unsigned char c = (unsigned char)p[i];

			if (c <= ' ' || c >= 0x7f || c == ':' || c == '[' || c == ']') {
				vmig_err_set(err, -EINVAL, "bad character in the user of '%s'", uri);
				return -EINVAL;
			}
		}
		memcpy(out->user, p, ulen);
		out->user[ulen] = '\0';
		host = at + 1;
	} else {
		host = p;
	}
	if (*host == '[') {
		host++;
		host_end = memchr(host, ']', (size_t)(end - host));
		if (!host_end) {
			vmig_err_set(err, -EINVAL, "missing ']' after the IPv6 address in '%s'", uri);
			return -EINVAL;
		}
		if (host_end + 1 < end) {
			if (host_end[1] != ':') {
				vmig_err_set(err, -EINVAL, "bad address '%s' (" SSH_EXPECTED ")", uri);
				return -EINVAL;
			}
			port = host_end + 2;
		}
	} else {
		const char *c = memchr(host, ':', (size_t)(end - host));

		host_end = c ? c : end;
		if (c) {
			port = c + 1;
			if (memchr(port, ':', (size_t)(end - port))) {
				vmig_err_set(err, -EINVAL,
					     "an IPv6 address must be written in brackets, as in ssh://[::1]:22 (got '%s')",
					     uri);
				return -EINVAL;
			}
		}
	}
	hlen = (size_t)(host_end - host);
	if (hlen == 0) {
		vmig_err_set(err, -EINVAL, "missing host in '%s' (" SSH_EXPECTED ")", uri);
		return -EINVAL;
	}
	if (hlen >= sizeof(out->host)) {
		vmig_err_set(err, -ENAMETOOLONG, "host name in '%s' is too long", uri);
		return -ENAMETOOLONG;
	}
	for (size_t i = 0; i < hlen; i++) {
		unsigned char c = (unsigned char)host[i];

		if (c <= ' ' || c >= 0x7f || c == '/' || c == '@' || c == '[' || c == ']') {
			vmig_err_set(err, -EINVAL, "bad character in the host of '%s'", uri);
			return -EINVAL;
		}
	}
	out->kind = VMIG_URI_SSH;
	memcpy(out->host, host, hlen);
	out->host[hlen] = '\0';
	out->port = 22;
	if (port) {
		unsigned long v = 0;
		const char *q;

		if (port == end) {
			vmig_err_set(err, -EINVAL, "missing port after ':' in '%s' (" SSH_EXPECTED ")",
				     uri);
			return -EINVAL;
		}
		for (q = port; q < end; q++) {
			if (*q < '0' || *q > '9' || q - port >= 5) {
				vmig_err_set(err, -EINVAL,
					     "bad port '%.*s' in '%s' (expected a number from 1 to 65535)",
					     (int)(end - port), port, uri);
				return -EINVAL;
			}
			v = v * 10 + (unsigned long)(*q - '0');
		}
		if (v == 0 || v > 65535) {
			vmig_err_set(err, -EINVAL, "port %lu in '%s' is out of range (1 to 65535)",
				     v, uri);
			return -EINVAL;
		}
		out->port = (uint16_t)v;
	}
	return 0;
}

/* ------------------------------------------------------------------------
 * Options
 */

struct vmig_ssh_options *vmig_ssh_options_dup(const struct vmig_ssh_options *in)
{
	static const struct vmig_ssh_options none;
	const char *const *src[6];
	const char **dst[6];
	struct vmig_ssh_options *o;
	size_t size = sizeof(*o);
	char *p;
	int i;

	if (!in)
		in = &none;
	src[0] = &in->remote_vmig;
	src[1] = &in->dest_name;
	src[2] = &in->known_hosts;
	src[3] = &in->identity;
	src[4] = &in->agent_socket;
	src[5] = &in->remote_args;
	for (i = 0; i < 6; i++)
		if (*src[i])
			size += strlen(*src[i]) + 1;
	o = calloc(1, size);
	if (!o)
		return NULL;
	o->accept_new_host_key = in->accept_new_host_key;
	dst[0] = &o->remote_vmig;
	dst[1] = &o->dest_name;
	dst[2] = &o->known_hosts;
	dst[3] = &o->identity;
	dst[4] = &o->agent_socket;
	dst[5] = &o->remote_args;
	p = (char *)(o + 1);
	for (i = 0; i < 6; i++) {
		if (!*src[i])
			continue;
		size = strlen(*src[i]) + 1;
		memcpy(p, *src[i], size);
		*dst[i] = p;
		p += size;
	}
	return o;
}

/* Append @s to @buf in single quotes for a POSIX shell. */
static int shell_quote(char *buf, size_t len, size_t *pos, const char *s)
{
	size_t n = *pos;

#define PUT(c) do { if (n + 1 >= len) return -ENOSPC; buf[n++] = (c); } while (0)
	PUT('\'');
	for (; *s; s++) {
		if (*s == '\'') {
			PUT('\'');
			PUT('\\');
			PUT('\'');
		}
		PUT(*s);
	}
	PUT('\'');
#undef PUT
	buf[n] = '\0';
	*pos = n;
	return 0;
}

int vmig_ssh_remote_command(const struct vmig_ssh_options *o, char *buf, size_t len)
{
	const char *vmig = o && o->remote_vmig && o->remote_vmig[0] ? o->remote_vmig : "vmig";
	size_t pos;
	int n;

	if (o && o->remote_args) {
		n = snprintf(buf, len, "%s %s", vmig, o->remote_args);
		return n < 0 || (size_t)n >= len ? -ENOSPC : 0;
	}
	n = snprintf(buf, len, "%s incoming --stdio", vmig);
	if (n < 0 || (size_t)n >= len)
		return -ENOSPC;
	pos = (size_t)n;
	if (o && o->dest_name && o->dest_name[0]) {
		n = snprintf(buf + pos, len - pos, " --name ");
		if (n < 0 || (size_t)n >= len - pos)
			return -ENOSPC;
		pos += (size_t)n;
		return shell_quote(buf, len, &pos, o->dest_name);
	}
	return 0;
}

/* ------------------------------------------------------------------------
 * Socket and libssh2 plumbing
 */

static void setsockopt_int(int fd, int level, int name, int value)
{
	if (setsockopt(fd, level, name, &value, sizeof(value)) < 0)
		vmig_log(VMIG_LOG_DEBUG, "ssh: setsockopt %d/%d: %s", level, name,
			 strerror(errno));
}

/* As for tcp:// (transport.h): a dead peer is noticed in about 10 s. */
static void tcp_tune(int fd)
{
	int size = VMIG_SOCKET_BUFFER;

	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size)) == 0)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size));
	setsockopt_int(fd, IPPROTO_TCP, TCP_NODELAY, 1);
	setsockopt_int(fd, SOL_SOCKET, SO_KEEPALIVE, 1);
	setsockopt_int(fd, IPPROTO_TCP, TCP_KEEPIDLE, VMIG_TCP_KEEPIDLE_S);
	setsockopt_int(fd, IPPROTO_TCP, TCP_KEEPINTVL, VMIG_TCP_KEEPINTVL_S);
	setsockopt_int(fd, IPPROTO_TCP, TCP_KEEPCNT, VMIG_TCP_KEEPCNT);
	setsockopt_int(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, VMIG_TCP_USER_TIMEOUT_MS);
}

/* libssh2's socket I/O, through us: MSG_NOSIGNAL, and the errno kept. */
static LIBSSH2_SEND_FUNC(ssh_send_cb)
{
	struct ssh_transport *s = *abstract;
	ssize_t n;

	do
		n = send(socket, buffer, length, flags | MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0) {
		if (errno != EAGAIN && errno != EWOULDBLOCK && socket == s->sock)
			s->sock_errno = errno;
		return -errno;
	}
	return n;
}

static LIBSSH2_RECV_FUNC(ssh_recv_cb)
{
	struct ssh_transport *s = *abstract;
	ssize_t n;

	do
		n = recv(socket, buffer, length, flags);
	while (n < 0 && errno == EINTR);
	if (n < 0) {
		if (errno != EAGAIN && errno != EWOULDBLOCK && socket == s->sock)
			s->sock_errno = errno;
		return -errno;
	}
	if (n == 0 && socket == s->sock)
		s->sock_eof = true;
	return n;
}

static const char *ssh_last_error(struct ssh_transport *s)
{
	char *msg = NULL;

	libssh2_session_last_error(s->session, &msg, NULL, 0);
	return msg && *msg ? msg : "unknown libssh2 error";
}

/*
 * Describe libssh2 failure @rc as -errno, with a message in @buf: socket
 * failures name the socket's errno, the rest libssh2's words.
 */
static int describe(struct ssh_transport *s, int rc, char *buf, size_t len)
{
	switch (rc) {
	case LIBSSH2_ERROR_SOCKET_SEND:
	case LIBSSH2_ERROR_SOCKET_RECV:
	case LIBSSH2_ERROR_SOCKET_DISCONNECT:
		if (s->sock_errno) {
			snprintf(buf, len, "connection to %s lost: %s%s", s->host,
				 strerror(s->sock_errno),
				 s->sock_errno == ETIMEDOUT ?
				 " (the host stopped answering: down, or the link cut?)" : "");
			return -s->sock_errno;
		}
		snprintf(buf, len, "%s closed the connection (sshd gone, or it dropped the session)",
			 s->host);
		return -ECONNRESET;
	case LIBSSH2_ERROR_TIMEOUT:
		snprintf(buf, len, "%s did not answer in time", s->host);
		return -ETIMEDOUT;
	case LIBSSH2_ERROR_ALLOC:
		snprintf(buf, len, "out of memory");
		return -ENOMEM;
	case LIBSSH2_ERROR_CHANNEL_CLOSED:
	case LIBSSH2_ERROR_CHANNEL_EOF_SENT:
		snprintf(buf, len, "the SSH channel is closed");
		return -EPIPE;
	default:
		snprintf(buf, len, "SSH error: %s", ssh_last_error(s));
		return -EPROTO;
	}
}

/* Record libssh2 failure @rc during @what; the transport is broken. */
static int fail_rc(struct ssh_transport *s, int rc, const char *what)
{
	char msg[512];
	int code = describe(s, rc, msg, sizeof(msg));

	vmig__transport_fail(&s->base, code, "%s: %s", what, msg);
	s->broken = true;
	s->broken_code = code;
	return code;
}

static int fail_code(struct ssh_transport *s, int code, const char *fmt, ...)
	VMIG_PRINTF(3, 4);

static int fail_code(struct ssh_transport *s, int code, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	vmig__transport_fail(&s->base, code, "%s", msg);
	s->broken = true;
	s->broken_code = code;
	return code;
}

static bool pending_out(struct ssh_transport *s)
{
	return libssh2_session_block_directions(s->session) & LIBSSH2_SESSION_BLOCK_OUTBOUND;
}

/*
 * Wait for the socket in the direction libssh2 asked for (@fallback if
 * none), at most until @deadline and at most @cap_ms (-1: no cap).
 * 0 when ready or when @cap_ms passed, -ETIMEDOUT at the deadline.
 */
static int wait_socket(struct ssh_transport *s, short fallback, int64_t deadline, int cap_ms)
{
	int dirs = libssh2_session_block_directions(s->session);
	struct pollfd p = { .fd = s->sock };
	int left = remaining_ms(deadline), ms, n;

	if (dirs & LIBSSH2_SESSION_BLOCK_INBOUND)
		p.events |= POLLIN;
	if (dirs & LIBSSH2_SESSION_BLOCK_OUTBOUND)
		p.events |= POLLOUT;
	if (!p.events)
		p.events = fallback;
	if (left == 0)
		return -ETIMEDOUT;
	ms = left;
	if (cap_ms >= 0 && (ms < 0 || cap_ms < ms))
		ms = cap_ms;
	do
		n = poll(&p, 1, ms);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	if (n == 0 && ms == left)
		return -ETIMEDOUT;
	return 0;
}

/*
 * An SSH keepalive when one is due, only if nothing is half-sent and the
 * socket has room (see the design comment).  Returns the milliseconds to
 * the next one, for the caller's poll.
 */
static int keepalive(struct ssh_transport *s)
{
	struct pollfd p = { .fd = s->sock, .events = POLLOUT };
	int next = VMIG_SSH_KEEPALIVE_S;

	if (pending_out(s) || poll(&p, 1, 0) != 1 || !(p.revents & POLLOUT))
		return 1000;
	if (libssh2_keepalive_send(s->session, &next) < 0)
		vmig_log(VMIG_LOG_DEBUG, "ssh: keepalive to %s: %s", s->host, ssh_last_error(s));
	return (next > 0 ? next : 1) * 1000;
}

/* Keep @len bytes of the remote's stderr: the tail, and lines in the log. */
static void take_stderr(struct ssh_transport *s, const char *buf, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		char c = buf[i];

		s->errtail[s->errtail_len++ % ERR_TAIL] = c;
		if (c == '\n' || s->line_len == sizeof(s->line) - 1) {
			s->line[s->line_len] = '\0';
			if (s->line_len)
				vmig_log(VMIG_LOG_DEBUG, "%s: %s", s->host, s->line);
			s->line_len = 0;
		} else if (c != '\r') {
			s->line[s->line_len++] = c;
		}
	}
}

/*
 * The last non-empty line the remote wrote to stderr, in @buf ("" if
 * none).
 */
static void stderr_last_line(struct ssh_transport *s, char *buf, size_t len)
{
	size_t have = s->errtail_len < ERR_TAIL ? s->errtail_len : ERR_TAIL;
	size_t start = s->errtail_len - have, end = s->errtail_len, i, n = 0;

	buf[0] = '\0';
	while (end > start && (s->errtail[(end - 1) % ERR_TAIL] == '\n' ||
			       s->errtail[(end - 1) % ERR_TAIL] == '\r' ||
			       s->errtail[(end - 1) % ERR_TAIL] == ' '))
		end--;
	for (i = end; i > start && s->errtail[(i - 1) % ERR_TAIL] != '\n'; i--)
		;
	for (; i < end && n + 1 < len; i++) {
		char c = s->errtail[i % ERR_TAIL];

		buf[n++] = (c >= ' ' && c != 0x7f) || c == '\t' ? c : '?';
	}
	buf[n] = '\0';
}

/*
 * Read all the stderr that has arrived.  0, or -errno (recorded) if the
 * session failed.  Finishes a half-sent window adjustment before
 * returning (see the design comment).
 */
static int drain_stderr(struct ssh_transport *s, int64_t deadline)
{
	char buf[4096];

	for (;;) {
		ssize_t n = libssh2_channel_read_stderr(s->channel, buf, sizeof(buf));

		if (n > 0) {
			take_stderr(s, buf, (size_t)n);
			continue;
		}
		if (n == 0)
			return 0;
		if (n != LIBSSH2_ERROR_EAGAIN)
			return fail_rc(s, (int)n, "reading the remote's stderr");
		if (!pending_out(s))
			return 0;
		n = wait_socket(s, POLLOUT, deadline, -1);
		if (n < 0)
			return fail_code(s, (int)n, "%s stopped taking data (no progress within %d ms)",
					 s->host, s->base.timeout_ms);
	}
}

static int64_t op_deadline(struct ssh_transport *s)
{
	return s->base.timeout_ms < 0 ? -1 : now_ms() + s->base.timeout_ms;
}

/*
 * Make the eventfd readable when libssh2 holds reply data for us (or the
 * replies ended).  stderr is drained first, so that what is queued is
 * stdout.  (Not libssh2_poll_channel_read(): it fails on any queued packet
 * shorter than 5 bytes, such as the server's answer to a keepalive.)
 */
static void update_event(struct ssh_transport *s)
{
	unsigned long queued = 0;
	bool ready;
	uint64_t v = 1;

	if (!s->broken && !pending_out(s))
		drain_stderr(s, op_deadline(s));
	libssh2_channel_window_read_ex(s->channel, &queued, NULL);
	ready = s->ahead_end > s->ahead_start || s->broken || queued > 0 ||
		libssh2_channel_eof(s->channel) > 0;

	if (ready == s->event_set)
		return;
	if (ready) {
		if (write(s->event_fd, &v, sizeof(v)) != sizeof(v))
			return;
	} else if (read(s->event_fd, &v, sizeof(v)) != sizeof(v)) {
		return;
	}
	s->event_set = ready;
}

/*
 * The remote command's stdout ended.  Wait a little for its exit status
 * (it comes just before the channel closes) and judge: 0 for a clean end,
 * or -errno recorded with the status and its last stderr line.
 */
static int remote_ended(struct ssh_transport *s, int64_t deadline)
{
	int64_t until = now_ms() + EXIT_WAIT_MS;
	char *sig = NULL, last[512];
	int status, code;

	if (deadline >= 0 && deadline < until)
		until = deadline;
	for (;;) {
		int rc = libssh2_channel_wait_closed(s->channel);

		if (rc == 0)
			break;
		if (rc != LIBSSH2_ERROR_EAGAIN)
			break;     /* a broken session: judge on what we have */
		if (wait_socket(s, POLLIN, until, -1) < 0)
			break;
	}
	drain_stderr(s, deadline);
	status = libssh2_channel_get_exit_status(s->channel);
	libssh2_channel_get_exit_signal(s->channel, &sig, NULL, NULL, NULL, NULL, NULL);
	stderr_last_line(s, last, sizeof(last));
	if (sig) {
		code = fail_code(s, -EPIPE, "'%s' on %s was killed by signal %s%s%s", s->command,
				 s->host, sig, last[0] ? ": " : "", last);
		libssh2_free(s->session, sig);
		return code;
	}
	if (status == 0)
		return 0;         /* or no status came: an end of stream */
	if (status == 127)
		return fail_code(s, -ENOENT, "'%s' on %s: command not found%s%s (is vmig installed "
				 "there? give its path with --remote-vmig)", s->command, s->host,
				 last[0] ? ": " : "", last);
	if (status == 126)
		return fail_code(s, -EACCES, "'%s' on %s cannot run%s%s (check --remote-vmig)",
				 s->command, s->host, last[0] ? ": " : "", last);
	return fail_code(s, -EPIPE, "'%s' on %s exited with status %d%s%s", s->command, s->host,
			 status, last[0] ? ": " : "", last);
}

/*
 * While a write waits for the window: take in replies (into the
 * read-ahead buffer) and stderr, so that the end of the remote command
 * shows.  0 to keep waiting; -errno, recorded, when the remote command
 * has ended or the session failed.
 */
static int check_remote(struct ssh_transport *s, int64_t deadline)
{
	int ret = drain_stderr(s, deadline);

	if (ret)
		return ret;
	if (s->ahead_start) {
		memmove(s->ahead, s->ahead + s->ahead_start, s->ahead_end - s->ahead_start);
		s->ahead_end -= s->ahead_start;
		s->ahead_start = 0;
	}
	while (s->ahead_end < READ_AHEAD_CAP) {
		ssize_t n;

		if (!s->ahead) {
			s->ahead = malloc(READ_AHEAD_CAP);
			if (!s->ahead)
				return 0;
		}
		n = libssh2_channel_read(s->channel, (char *)s->ahead + s->ahead_end,
					 READ_AHEAD_CAP - s->ahead_end);
		if (n > 0) {
			s->ahead_end += (size_t)n;
			continue;
		}
		if (n == 0 || (n == LIBSSH2_ERROR_EAGAIN && !pending_out(s)))
			break;
		if (n != LIBSSH2_ERROR_EAGAIN)
			return fail_rc(s, (int)n, "reading from the remote command");
		ret = wait_socket(s, POLLOUT, deadline, -1);
		if (ret)
			return fail_code(s, ret, "%s stopped taking data (no progress within %d ms)",
					 s->host, s->base.timeout_ms);
	}
	if (libssh2_channel_eof(s->channel) <= 0) {
		s->eof_since_ms = 0;
		return 0;
	}
	/*
	 * The remote's stdout is closed: vmig incoming does that only when it
	 * ends.  It is gone for sure once the channel closes; an exit status
	 * or a grace period settles it otherwise.
	 */
	if (!s->eof_since_ms)
		s->eof_since_ms = now_ms();
	if (libssh2_channel_wait_closed(s->channel) == 0 ||
	    libssh2_channel_get_exit_status(s->channel) != 0 ||
	    now_ms() - s->eof_since_ms >= EXIT_WAIT_MS) {
		ret = remote_ended(s, deadline);
		if (!ret)
			ret = fail_code(s, -EPIPE, "'%s' on %s stopped reading", s->command,
					s->host);
		return ret;
	}
	return 0;
}

/* ------------------------------------------------------------------------
 * Operations
 */

static ssize_t ssh_read(struct vmig_transport *t, void *buf, size_t len)
{
	struct ssh_transport *s = to_ssh(t);
	int64_t deadline = op_deadline(s);
	int ret;

	if (s->broken)
		return s->broken_code;
	for (;;) {
		ssize_t n;

		if (s->ahead_end > s->ahead_start) {
			n = (ssize_t)(s->ahead_end - s->ahead_start);
			if ((size_t)n > len)
				n = (ssize_t)len;
			memcpy(buf, s->ahead + s->ahead_start, (size_t)n);
			s->ahead_start += (size_t)n;
			if (s->ahead_start == s->ahead_end)
				s->ahead_start = s->ahead_end = 0;
			update_event(s);
			return n;
		}
		n = libssh2_channel_read(s->channel, buf, len);
		if (n > 0) {
			ret = drain_stderr(s, deadline);
			update_event(s);
			return ret ? ret : n;
		}
		if (n == LIBSSH2_ERROR_EAGAIN && pending_out(s)) {
			/* A window adjustment is half-sent: finish it first. */
			ret = wait_socket(s, POLLOUT, deadline, -1);
			if (ret)
				goto timeout;
			continue;
		}
		if (n < 0 && n != LIBSSH2_ERROR_EAGAIN)
			return fail_rc(s, (int)n, "reading");
		ret = drain_stderr(s, deadline);
		if (ret)
			return ret;
		if (libssh2_channel_eof(s->channel) > 0) {
			ret = remote_ended(s, deadline);
			update_event(s);
			return ret;
		}
		ret = wait_socket(s, POLLIN, deadline, keepalive(s));
		if (ret)
			goto timeout;
	}
timeout:
	if (ret == -ETIMEDOUT)
		return fail_code(s, ret, "nothing came from %s within %d ms (the remote vmig or "
				 "sshd hangs, or the link is down)", s->host, s->base.timeout_ms);
	return fail_code(s, ret, "poll: %s", strerror(-ret));
}

static ssize_t ssh_write(struct vmig_transport *t, const void *buf, size_t len)
{
	struct ssh_transport *s = to_ssh(t);
	int64_t deadline = op_deadline(s);
	int ret;

	if (s->broken)
		return s->broken_code;
	if (len > SSH_CHUNK)
		len = SSH_CHUNK;
	for (;;) {
		ssize_t n = libssh2_channel_write(s->channel, buf, len);

		if (n > 0) {
			s->eof_since_ms = 0;
			return n;
		}
		if (n < 0 && n != LIBSSH2_ERROR_EAGAIN)
			return fail_rc(s, (int)n, "writing");
		if (pending_out(s)) {
			/* Part of a packet is out: only this same call may follow. */
			ret = wait_socket(s, POLLOUT, deadline, -1);
		} else {
			/* The window is shut: look at what the remote is doing. */
			ret = check_remote(s, deadline);
			update_event(s);
			if (ret)
				return ret;
			ret = wait_socket(s, POLLIN, deadline, keepalive(s));
		}
		if (ret == -ETIMEDOUT)
			return fail_code(s, ret, "%s took no data for %d ms (the remote vmig or sshd "
					 "hangs, or the link is down)", s->host, s->base.timeout_ms);
		if (ret)
			return fail_code(s, ret, "poll: %s", strerror(-ret));
	}
}

/*
 * Small pieces go out gathered into one SSH packet; a piece of a packet's
 * size or more goes out straight from the caller's buffer.
 */
static ssize_t ssh_writev(struct vmig_transport *t, const struct iovec *iov, int iovcnt)
{
	uint8_t gather[SSH_CHUNK];
	size_t n = 0;
	int i;

	if (iovcnt <= 0)
		return 0;
	if (iov[0].iov_len >= SSH_CHUNK || iovcnt == 1)
		return ssh_write(t, iov[0].iov_base, iov[0].iov_len);
	for (i = 0; i < iovcnt && n < sizeof(gather); i++) {
		size_t k = iov[i].iov_len;

		if (k > sizeof(gather) - n)
			k = sizeof(gather) - n;
		memcpy(gather + n, iov[i].iov_base, k);
		n += k;
	}
	return ssh_write(t, gather, n);
}

static int ssh_shutdown_write(struct vmig_transport *t)
{
	struct ssh_transport *s = to_ssh(t);
	int64_t deadline = op_deadline(s);

	if (s->broken)
		return s->broken_code;
	if (s->eof_sent)
		return 0;
	for (;;) {
		int rc = libssh2_channel_send_eof(s->channel);

		if (rc == 0)
			break;
		if (rc != LIBSSH2_ERROR_EAGAIN)
			return fail_rc(s, rc, "sending EOF");
		rc = wait_socket(s, POLLOUT, deadline, -1);
		if (rc)
			return fail_code(s, rc, "sending EOF to %s: no progress within %d ms",
					 s->host, s->base.timeout_ms);
	}
	s->eof_sent = true;
	return 0;
}

static int ssh_set_timeout(struct vmig_transport *t)
{
	return 0;   /* every wait polls with t->timeout_ms */
}

static int ssh_fd(struct vmig_transport *t)
{
	struct ssh_transport *s = to_ssh(t);

	/* Take in what has arrived, so that a poll right after sees it. */
	update_event(s);
	return s->event_fd;
}

/* Wait for a non-blocking libssh2 call to stop saying EAGAIN. */
#define SSH_UNTIL_DONE(s, rc, call, deadline)					\
	do {									\
		(rc) = (call);							\
		if ((rc) != LIBSSH2_ERROR_EAGAIN ||				\
		    wait_socket((s), POLLIN | POLLOUT, (deadline), -1) < 0)	\
			break;							\
	} while (1)

static void ssh_close(struct vmig_transport *t)
{
	struct ssh_transport *s = to_ssh(t);
	int64_t deadline = now_ms() + CLOSE_WAIT_MS;
	int rc;

	if (s->session && s->sock >= 0 && !s->broken && !pending_out(s)) {
		/*
		 * The remote command lives on (it has become the VM's VMM): do
		 * not wait for its channel to close, just say goodbye.
		 */
		libssh2_session_set_blocking(s->session, 0);
		if (s->channel && !s->eof_sent)
			SSH_UNTIL_DONE(s, rc, libssh2_channel_send_eof(s->channel), deadline);
		SSH_UNTIL_DONE(s, rc, libssh2_session_disconnect(s->session, "vmig: done"),
			       deadline);
		(void)rc;
	}
	if (s->sock >= 0) {
		char sink[4096];

		/* Let what we sent arrive: close() with unread data would reset. */
		shutdown(s->sock, SHUT_WR);
		while (remaining_ms(deadline) > 0 &&
		       poll(&(struct pollfd){ .fd = s->sock, .events = POLLIN }, 1,
			    remaining_ms(deadline)) == 1 &&
		       recv(s->sock, sink, sizeof(sink), MSG_DONTWAIT) > 0)
			;
		shutdown(s->sock, SHUT_RDWR);
	}
	if (s->session) {
		/* Blocking, so that the frees never say EAGAIN; sends now fail. */
		libssh2_session_set_blocking(s->session, 1);
		libssh2_session_set_timeout(s->session, CLOSE_WAIT_MS);
		if (s->channel)
			libssh2_channel_free(s->channel);
		libssh2_session_free(s->session);
	}
	if (s->sock >= 0)
		close(s->sock);
	if (s->event_fd >= 0)
		close(s->event_fd);
	free(s->ahead);
	free(s);
}

static const struct vmig_transport_ops ssh_ops = {
	.kind = "ssh",
	.read = ssh_read,
	.write = ssh_write,
	.writev = ssh_writev,
	.shutdown_write = ssh_shutdown_write,
	.set_timeout = ssh_set_timeout,
	.close = ssh_close,
	.fd = ssh_fd,
};

uint64_t vmig_transport_ssh_rtt_ns(struct vmig_transport *t)
{
	struct tcp_info ti;
	socklen_t len = sizeof(ti);

	if (!t || t->ops != &ssh_ops ||
	    getsockopt(to_ssh(t)->sock, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0)
		return 0;
	return (uint64_t)ti.tcpi_rtt * 1000;
}

/* ------------------------------------------------------------------------
 * Connect: TCP
 */

static int tcp_connect(struct ssh_transport *s, const struct vmig_uri *u, int64_t deadline,
		       struct vmig_err *err)
{
	struct addrinfo hints = {
		.ai_family = AF_UNSPEC,
		.ai_socktype = SOCK_STREAM,
		.ai_flags = AI_NUMERICSERV,
	};
	struct addrinfo *res, *ai;
	char port[8];
	int ret = -EHOSTUNREACH, gai;

	snprintf(port, sizeof(port), "%u", u->port);
	gai = getaddrinfo(u->host, port, &hints, &res);
	if (gai != 0) {
		ret = gai == EAI_SYSTEM ? -errno : -EHOSTUNREACH;
		vmig_err_set(err, ret, "cannot connect to %s: cannot resolve '%s': %s", s->base.desc,
			     u->host, gai == EAI_SYSTEM ? strerror(-ret) : gai_strerror(gai));
		return ret;
	}
	for (ai = res; ai; ai = ai->ai_next) {
		int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
				ai->ai_protocol);
		socklen_t len = sizeof(ret);

		if (fd < 0) {
			ret = -errno;
			continue;
		}
		tcp_tune(fd);
		if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
			if (errno != EINPROGRESS) {
				ret = -errno;
				close(fd);
				continue;
			}
			ret = vmig__poll_one(fd, POLLOUT, remaining_ms(deadline));
			if (!ret && getsockopt(fd, SOL_SOCKET, SO_ERROR, &ret, &len) < 0)
				ret = errno;
			if (ret > 0)
				ret = -ret;
			if (ret) {
				close(fd);
				if (ret == -ETIMEDOUT)
					break;
				continue;
			}
		}
		s->sock = fd;
		freeaddrinfo(res);
		return 0;
	}
	freeaddrinfo(res);
	if (ret == -ETIMEDOUT)
		vmig_err_set(err, ret, "cannot connect to %s: no answer in time (check the "
			     "address, the network and firewalls)", s->base.desc);
	else
		vmig_err_set(err, ret, "cannot connect to %s: %s%s", s->base.desc, strerror(-ret),
			     ret == -ECONNREFUSED ? " (is sshd running there, on that port?)" :
			     ret == -EHOSTUNREACH || ret == -ENETUNREACH ?
			     " (check the address and the network route)" : "");
	return ret;
}

/* ------------------------------------------------------------------------
 * Connect: host key
 */

struct key_kind {
	int hostkey_type;        /* LIBSSH2_HOSTKEY_TYPE_* */
	int knownhost_bit;       /* LIBSSH2_KNOWNHOST_KEY_* */
	const char *method;      /* host key algorithm */
	const char *name;        /* as OpenSSH prints it */
	const char *file;        /* the host's key file, for the advice */
};

/* In OpenSSH's order of preference. */
static const struct key_kind key_kinds[] = {
#ifdef LIBSSH2_HOSTKEY_TYPE_ED25519
	{ LIBSSH2_HOSTKEY_TYPE_ED25519, LIBSSH2_KNOWNHOST_KEY_ED25519, "ssh-ed25519",
	  "ED25519", "ssh_host_ed25519_key" },
#endif
#ifdef LIBSSH2_HOSTKEY_TYPE_ECDSA_256
	{ LIBSSH2_HOSTKEY_TYPE_ECDSA_256, LIBSSH2_KNOWNHOST_KEY_ECDSA_256,
	  "ecdsa-sha2-nistp256", "ECDSA", "ssh_host_ecdsa_key" },
	{ LIBSSH2_HOSTKEY_TYPE_ECDSA_384, LIBSSH2_KNOWNHOST_KEY_ECDSA_384,
	  "ecdsa-sha2-nistp384", "ECDSA", "ssh_host_ecdsa_key" },
	{ LIBSSH2_HOSTKEY_TYPE_ECDSA_521, LIBSSH2_KNOWNHOST_KEY_ECDSA_521,
	  "ecdsa-sha2-nistp521", "ECDSA", "ssh_host_ecdsa_key" },
#endif
	{ LIBSSH2_HOSTKEY_TYPE_RSA, LIBSSH2_KNOWNHOST_KEY_SSHRSA, "rsa-sha2-512,rsa-sha2-256,ssh-rsa",
	  "RSA", "ssh_host_rsa_key" },
	{ LIBSSH2_HOSTKEY_TYPE_DSS, LIBSSH2_KNOWNHOST_KEY_SSHDSS, "ssh-dss", "DSA",
	  "ssh_host_dsa_key" },
};

#define NR_KEY_KINDS (sizeof(key_kinds) / sizeof(key_kinds[0]))

static const struct key_kind *key_kind_of(int hostkey_type)
{
	for (size_t i = 0; i < NR_KEY_KINDS; i++)
		if (key_kinds[i].hostkey_type == hostkey_type)
			return &key_kinds[i];
	return NULL;
}

/* The user's home directory. */
static const char *home_dir(void)
{
	const char *h = getenv("HOME");
	struct passwd *pw;

	if (h && *h)
		return h;
	pw = getpwuid(geteuid());
	return pw && pw->pw_dir ? pw->pw_dir : NULL;
}

/*
 * Load @path into @kh line by line: a line libssh2 cannot parse (a key
 * type it does not know, a @revoked marker) is skipped instead of ending
 * the file there.  A missing file is an empty one.  0 or -errno.
 */
static int known_hosts_load(LIBSSH2_KNOWNHOSTS *kh, const char *path, int *skipped)
{
	char line[16384];
	FILE *f = fopen(path, "re");

	*skipped = 0;
	if (!f)
		return errno == ENOENT ? 0 : -errno;
	while (fgets(line, sizeof(line), f)) {
		size_t len = strlen(line);
		const char *p = line;

		while (*p == ' ' || *p == '\t')
			p++;
		if (*p == '#' || *p == '\n' || *p == '\0')
			continue;
		if (libssh2_knownhost_readline(kh, line, len, LIBSSH2_KNOWNHOST_FILE_OPENSSH))
			(*skipped)++;
	}
	fclose(f);
	return 0;
}

/*
 * Which host key algorithms does known_hosts hold for @name?  A check
 * with a key that cannot match says MISMATCH exactly when an entry of
 * that type exists for the name (plain or hashed).
 */
static void known_types(LIBSSH2_KNOWNHOSTS *kh, const char *name, bool known[NR_KEY_KINDS])
{
	static const char probe[] = "\x00";

	for (size_t i = 0; i < NR_KEY_KINDS; i++)
		known[i] = libssh2_knownhost_check(kh, name, probe, 1,
						   LIBSSH2_KNOWNHOST_TYPE_PLAIN |
						   LIBSSH2_KNOWNHOST_KEYENC_RAW |
						   key_kinds[i].knownhost_bit, NULL) ==
			LIBSSH2_KNOWNHOST_CHECK_MISMATCH;
}

/* Host key algorithms, those on record for the host first. */
static void hostkey_prefs(const bool known[NR_KEY_KINDS], char *buf, size_t len)
{
	size_t n = 0;

	buf[0] = '\0';
	for (int pass = 0; pass < 2; pass++)
		for (size_t i = 0; i < NR_KEY_KINDS; i++)
			if (known[i] == (pass == 0) && n + strlen(key_kinds[i].method) + 2 < len)
				n += (size_t)snprintf(buf + n, len - n, "%s%s", n ? "," : "",
						      key_kinds[i].method);
}

/* SHA256:base64 without padding, as OpenSSH prints fingerprints. */
static void fingerprint(LIBSSH2_SESSION *session, char *buf, size_t len)
{
	static const char b64[] =
		"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	const unsigned char *h = (const unsigned char *)
		libssh2_hostkey_hash(session, LIBSSH2_HOSTKEY_HASH_SHA256);
	size_t n;
	int i;

	if (!h) {
		snprintf(buf, len, "(no SHA256 fingerprint)");
		return;
	}
	n = (size_t)snprintf(buf, len, "SHA256:");
	for (i = 0; i < 32 && n + 5 < len; i += 3) {
		uint32_t v = (uint32_t)h[i] << 16 | (i + 1 < 32 ? (uint32_t)h[i + 1] << 8 : 0) |
			(i + 2 < 32 ? h[i + 2] : 0);

		buf[n++] = b64[v >> 18 & 63];
		buf[n++] = b64[v >> 12 & 63];
		if (i + 1 < 32)
			buf[n++] = b64[v >> 6 & 63];
		if (i + 2 < 32)
			buf[n++] = b64[v & 63];
	}
	buf[n] = '\0';
}

/* Create the directory of @path (mode 0700) if it is missing. */
static void make_parent_dir(const char *path)
{
	char dir[4200];
	char *slash;

	snprintf(dir, sizeof(dir), "%s", path);
	slash = strrchr(dir, '/');
	if (!slash || slash == dir)
		return;
	*slash = '\0';
	if (mkdir(dir, 0700) < 0 && errno != EEXIST)
		vmig_log(VMIG_LOG_DEBUG, "ssh: mkdir %s: %s", dir, strerror(errno));
}

/* Append the host key as one OpenSSH line to @path.  0 or -errno. */
static int known_hosts_add(LIBSSH2_KNOWNHOSTS *kh, const char *path, const char *name,
			   const char *key, size_t key_len, int bit)
{
	struct libssh2_knownhost *node = NULL;
	char line[16384];
	size_t len = 0;
	int fd, ret = 0;
	char last = '\n';
	struct stat st;

	if (libssh2_knownhost_addc(kh, name, NULL, key, key_len, NULL, 0,
				   LIBSSH2_KNOWNHOST_TYPE_PLAIN | LIBSSH2_KNOWNHOST_KEYENC_RAW | bit,
				   &node) || !node ||
	    libssh2_knownhost_writeline(kh, node, line, sizeof(line), &len,
					LIBSSH2_KNOWNHOST_FILE_OPENSSH))
		return -EINVAL;
	make_parent_dir(path);
	fd = open(path, O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
	if (fd < 0)
		return -errno;
	/* A last line without its newline would swallow ours. */
	if (fstat(fd, &st) == 0 && st.st_size > 0 && pread(fd, &last, 1, st.st_size - 1) != 1)
		last = '\n';
	if ((last != '\n' && write(fd, "\n", 1) != 1) ||
	    write(fd, line, len) != (ssize_t)len)
		ret = -errno ? -errno : -EIO;
	if (close(fd) < 0 && !ret)
		ret = -errno;
	return ret;
}

/*
 * Check the host key the server showed against known_hosts; record it if
 * new and allowed.  0, or -errno with the message in @err.
 */
static int check_host_key(struct ssh_transport *s, LIBSSH2_KNOWNHOSTS *kh, const char *kh_path,
			  const struct vmig_ssh_options *o, struct vmig_err *err)
{
	const struct key_kind *kind;
	char fp[64];
	const char *key;
	size_t key_len;
	int type, rc;

	key = libssh2_session_hostkey(s->session, &key_len, &type);
	kind = key ? key_kind_of(type) : NULL;
	if (!kind) {
		vmig_err_set(err, -EPROTO, "cannot connect to %s: the server showed %s host key",
			     s->base.desc, key ? "an unsupported kind of" : "no");
		return -EPROTO;
	}
	fingerprint(s->session, fp, sizeof(fp));
	rc = libssh2_knownhost_check(kh, s->host, key, key_len,
				     LIBSSH2_KNOWNHOST_TYPE_PLAIN | LIBSSH2_KNOWNHOST_KEYENC_RAW |
				     kind->knownhost_bit, NULL);
	switch (rc) {
	case LIBSSH2_KNOWNHOST_CHECK_MATCH:
		vmig_log(VMIG_LOG_DEBUG, "ssh: %s key of %s matches %s (%s)", kind->name, s->host,
			 kh_path, fp);
		return 0;
	case LIBSSH2_KNOWNHOST_CHECK_MISMATCH:
		vmig_err_set(err, -EKEYREJECTED,
			     "cannot connect to %s: the host key of %s has CHANGED (now %s %s, not "
			     "the key in %s): someone may be intercepting the connection, or the host "
			     "got new keys. If 'ssh-keygen -lf /etc/ssh/%s.pub' on the host shows "
			     "that key, remove the old one: ssh-keygen -f '%s' -R '%s' "
			     "(--accept-new-host-key never replaces a key)",
			     s->base.desc, s->host, kind->name, fp, kh_path, kind->file, kh_path,
			     s->host);
		return -EKEYREJECTED;
	case LIBSSH2_KNOWNHOST_CHECK_NOTFOUND:
		break;
	default:
		vmig_err_set(err, -EIO, "cannot connect to %s: cannot check the host key against "
			     "%s: %s", s->base.desc, kh_path, ssh_last_error(s));
		return -EIO;
	}
	if (!o->accept_new_host_key) {
		vmig_err_set(err, -ENOKEY,
			     "cannot connect to %s: the host key of %s is not known (%s key "
			     "fingerprint %s, not in %s). Compare it with 'ssh-keygen -lf "
			     "/etc/ssh/%s.pub' on the host, then record it: connect once with ssh, "
			     "or migrate with --accept-new-host-key",
			     s->base.desc, s->host, kind->name, fp, kh_path, kind->file);
		return -ENOKEY;
	}
	rc = known_hosts_add(kh, kh_path, s->host, key, key_len, kind->knownhost_bit);
	if (rc) {
		vmig_err_set(err, rc, "cannot connect to %s: cannot record the host key of %s "
			     "in %s: %s", s->base.desc, s->host, kh_path, strerror(-rc));
		return rc;
	}
	vmig_log(VMIG_LOG_INFO, "ssh: recorded the %s key of %s (%s) in %s", kind->name, s->host,
		 fp, kh_path);
	return 0;
}

/* ------------------------------------------------------------------------
 * Connect: authentication
 */

/* Try the agent's keys.  0 when one was accepted; a note in @tried. */
static int auth_agent(struct ssh_transport *s, const char *user, const char *sock,
		      char *tried, size_t tlen)
{
	struct libssh2_agent_publickey *id = NULL, *prev = NULL;
	LIBSSH2_AGENT *agent;
	int keys = 0, ret = -EACCES;
	size_t n = strlen(tried);

	if (!sock || !*sock) {
		snprintf(tried + n, tlen - n, "%sno ssh-agent", n ? "; " : "");
		return -EACCES;
	}
	agent = libssh2_agent_init(s->session);
	if (!agent)
		return -ENOMEM;
	libssh2_agent_set_identity_path(agent, sock);
	if (libssh2_agent_connect(agent)) {
		snprintf(tried + n, tlen - n, "%scannot reach the ssh-agent at %s", n ? "; " : "",
			 sock);
		libssh2_agent_free(agent);
		return -EACCES;
	}
	if (libssh2_agent_list_identities(agent) == 0) {
		while (libssh2_agent_get_identity(agent, &id, prev) == 0) {
			keys++;
			if (libssh2_agent_userauth(agent, user, id) == 0) {
				ret = 0;
				break;
			}
			prev = id;
		}
	}
	if (ret)
		snprintf(tried + n, tlen - n, "%s%d key%s of the ssh-agent", n ? "; " : "", keys,
			 keys == 1 ? "" : "s");
	libssh2_agent_disconnect(agent);
	libssh2_agent_free(agent);
	return ret;
}

/* Try one private key file.  0 when accepted; a note in @tried. */
static int auth_file(struct ssh_transport *s, const char *user, const char *path,
		     char *tried, size_t tlen)
{
	size_t n = strlen(tried);
	int rc;

	if (access(path, R_OK) < 0) {
		snprintf(tried + n, tlen - n, "%s%s (%s)", n ? "; " : "", path, strerror(errno));
		return -errno;
	}
	rc = libssh2_userauth_publickey_fromfile_ex(s->session, user, (unsigned int)strlen(user),
						    NULL, path, NULL);
	if (rc == 0)
		return 0;
	snprintf(tried + n, tlen - n, "%s%s (%s)", n ? "; " : "", path,
		 rc == LIBSSH2_ERROR_FILE ?
		 "cannot use it: encrypted, or a format libssh2 cannot read; load it into ssh-agent" :
		 rc == LIBSSH2_ERROR_AUTHENTICATION_FAILED ||
		 rc == LIBSSH2_ERROR_PUBLICKEY_UNVERIFIED ? "refused" : ssh_last_error(s));
	return rc == LIBSSH2_ERROR_TIMEOUT ? -ETIMEDOUT : -EACCES;
}

static int authenticate(struct ssh_transport *s, const char *user,
			const struct vmig_ssh_options *o, struct vmig_err *err)
{
	static const char *const defaults[] = { "id_ed25519", "id_ecdsa", "id_rsa" };
	const char *agent_sock = o->agent_socket ? o->agent_socket : getenv("SSH_AUTH_SOCK");
	const char *methods, *home;
	char tried[2048] = "", path[4200];
	bool any_file = false;
	int ret;

	methods = libssh2_userauth_list(s->session, user, (unsigned int)strlen(user));
	if (!methods) {
		if (libssh2_userauth_authenticated(s->session))
			return 0;
		ret = libssh2_session_last_errno(s->session) == LIBSSH2_ERROR_TIMEOUT ?
			-ETIMEDOUT : -EPROTO;
		vmig_err_set(err, ret, "cannot connect to %s: asking for the authentication "
			     "methods: %s", s->base.desc, ssh_last_error(s));
		return ret;
	}
	if (!strstr(methods, "publickey")) {
		vmig_err_set(err, -EACCES, "cannot log in to %s as %s: the server offers only %s; "
			     "vmig never prompts: set up key authentication (authorized_keys)",
			     s->base.desc, user, methods);
		return -EACCES;
	}
	if (auth_agent(s, user, agent_sock, tried, sizeof(tried)) == 0)
		return 0;
	if (o->identity) {
		ret = auth_file(s, user, o->identity, tried, sizeof(tried));
		if (ret == 0)
			return 0;
		any_file = true;
	} else if ((home = home_dir())) {
		for (size_t i = 0; i < sizeof(defaults) / sizeof(defaults[0]); i++) {
			snprintf(path, sizeof(path), "%s/.ssh/%s", home, defaults[i]);
			if (access(path, F_OK) < 0)
				continue;
			any_file = true;
			if (auth_file(s, user, path, tried, sizeof(tried)) == 0)
				return 0;
		}
	}
	if (!any_file) {
		size_t n = strlen(tried);

		snprintf(tried + n, sizeof(tried) - n, "%sno key file in ~/.ssh", n ? "; " : "");
	}
	vmig_err_set(err, -EACCES, "cannot log in to %s as %s: no key was accepted (tried: %s). "
		     "Add your public key to ~%s/.ssh/authorized_keys there, or name the private "
		     "key with --identity FILE (RSA keys need libssh2 1.11 for rsa-sha2: prefer "
		     "ed25519)", s->base.desc, user, tried, user);
	return -EACCES;
}

/* ------------------------------------------------------------------------
 * Connect
 */

/* Ciphers and MACs, fastest first; names this libssh2 lacks are dropped. */
#define PREF_CIPHERS "aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes256-ctr," \
	"chacha20-poly1305@openssh.com,aes192-ctr"
#define PREF_MACS    "hmac-sha2-256-etm@openssh.com,hmac-sha2-256,hmac-sha1,hmac-sha2-512"

/*
 * Set the preference for @method to the names of @wanted (a comma list,
 * in order) that this libssh2 supports.  Filtered here because libssh2
 * 1.10 strips unknown names with an overlapping memcpy.
 */
static void set_prefs(LIBSSH2_SESSION *session, int method, const char *wanted)
{
	const char **algs = NULL;
	char buf[1024], name[128];
	size_t n = 0;
	int count = libssh2_session_supported_algs(session, method, &algs);

	buf[0] = '\0';
	while (*wanted) {
		size_t len = strcspn(wanted, ",");

		if (len < sizeof(name)) {
			memcpy(name, wanted, len);
			name[len] = '\0';
			for (int i = 0; i < count; i++)
				if (!strcmp(algs[i], name) && n + len + 2 < sizeof(buf)) {
					n += (size_t)snprintf(buf + n, sizeof(buf) - n, "%s%s",
							      n ? "," : "", name);
					break;
				}
		}
		wanted += len;
		if (*wanted == ',')
			wanted++;
	}
	if (count > 0)
		libssh2_free(session, algs);
	if (n && libssh2_session_method_pref(session, method, buf))
		vmig_log(VMIG_LOG_DEBUG, "ssh: preferences '%s' refused", buf);
}

static int handshake_error(struct ssh_transport *s, int rc, struct vmig_err *err)
{
	char msg[512];
	int code = describe(s, rc, msg, sizeof(msg));

	if (rc == LIBSSH2_ERROR_KEX_FAILURE || rc == LIBSSH2_ERROR_BANNER_RECV ||
	    rc == LIBSSH2_ERROR_SOCKET_DISCONNECT || code == -ECONNRESET)
		vmig_err_set(err, code, "cannot connect to %s: SSH handshake failed: %s (is an SSH "
			     "server listening there? it needs an ed25519 or ECDSA host key)",
			     s->base.desc, msg);
	else
		vmig_err_set(err, code, "cannot connect to %s: SSH handshake failed: %s",
			     s->base.desc, msg);
	return code;
}

/* The session: handshake, host key, authentication, exec.  Blocking. */
static int ssh_setup(struct ssh_transport *s, const struct vmig_uri *u,
		     const struct vmig_ssh_options *o, int64_t deadline, struct vmig_err *err)
{
	LIBSSH2_KNOWNHOSTS *kh = NULL;
	bool known[NR_KEY_KINDS];
	char prefs[512], kh_path[4200], user[256];
	const char *home = home_dir();
	int rc, ret, skipped = 0;

#define BOUND() libssh2_session_set_timeout(s->session, deadline < 0 ? 0 : \
					     (long)(remaining_ms(deadline) ? remaining_ms(deadline) : 1))
	if (u->user[0]) {
		snprintf(user, sizeof(user), "%s", u->user);
	} else {
		struct passwd *pw = getpwuid(geteuid());

		if (!pw) {
			vmig_err_set(err, -ENOENT, "cannot connect to %s: no user name for uid %u: "
				     "give one, as in ssh://USER@HOST", s->base.desc,
				     (unsigned int)geteuid());
			return -ENOENT;
		}
		snprintf(user, sizeof(user), "%s", pw->pw_name);
	}
	if (o->known_hosts)
		snprintf(kh_path, sizeof(kh_path), "%s", o->known_hosts);
	else if (home)
		snprintf(kh_path, sizeof(kh_path), "%s/.ssh/known_hosts", home);
	else {
		vmig_err_set(err, -ENOENT, "cannot connect to %s: no home directory for "
			     "~/.ssh/known_hosts: name the file with --known-hosts", s->base.desc);
		return -ENOENT;
	}

	s->session = libssh2_session_init_ex(NULL, NULL, NULL, s);
	if (!s->session) {
		vmig_err_set(err, -ENOMEM, "cannot connect to %s: out of memory", s->base.desc);
		return -ENOMEM;
	}
	libssh2_session_callback_set(s->session, LIBSSH2_CALLBACK_SEND, (void *)ssh_send_cb);
	libssh2_session_callback_set(s->session, LIBSSH2_CALLBACK_RECV, (void *)ssh_recv_cb);
	libssh2_session_set_blocking(s->session, 1);

	kh = libssh2_knownhost_init(s->session);
	if (!kh) {
		vmig_err_set(err, -ENOMEM, "cannot connect to %s: out of memory", s->base.desc);
		return -ENOMEM;
	}
	ret = known_hosts_load(kh, kh_path, &skipped);
	if (ret) {
		vmig_err_set(err, ret, "cannot connect to %s: cannot read %s: %s", s->base.desc,
			     kh_path, strerror(-ret));
		goto out;
	}
	if (skipped)
		vmig_log(VMIG_LOG_DEBUG, "ssh: %d line%s of %s skipped (not understood)", skipped,
			 skipped == 1 ? "" : "s", kh_path);
	known_types(kh, s->host, known);
	hostkey_prefs(known, prefs, sizeof(prefs));
	set_prefs(s->session, LIBSSH2_METHOD_HOSTKEY, prefs);
	set_prefs(s->session, LIBSSH2_METHOD_CRYPT_CS, PREF_CIPHERS);
	set_prefs(s->session, LIBSSH2_METHOD_CRYPT_SC, PREF_CIPHERS);
	set_prefs(s->session, LIBSSH2_METHOD_MAC_CS, PREF_MACS);
	set_prefs(s->session, LIBSSH2_METHOD_MAC_SC, PREF_MACS);

	BOUND();
	rc = libssh2_session_handshake(s->session, s->sock);
	if (rc) {
		ret = handshake_error(s, rc, err);
		goto out;
	}
	vmig_log(VMIG_LOG_DEBUG, "ssh: %s: %s, %s", s->host,
		 libssh2_session_methods(s->session, LIBSSH2_METHOD_CRYPT_CS),
		 libssh2_session_methods(s->session, LIBSSH2_METHOD_MAC_CS));
	ret = check_host_key(s, kh, kh_path, o, err);
	if (ret)
		goto out;

	BOUND();
	ret = authenticate(s, user, o, err);
	if (ret)
		goto out;

	BOUND();
	s->channel = libssh2_channel_open_ex(s->session, "session", sizeof("session") - 1,
					     VMIG_SSH_WINDOW, VMIG_SSH_PACKET, NULL, 0);
	if (!s->channel) {
		rc = libssh2_session_last_errno(s->session);
		ret = rc == LIBSSH2_ERROR_TIMEOUT ? -ETIMEDOUT : -EPROTO;
		vmig_err_set(err, ret, "cannot connect to %s: cannot open a session channel: %s",
			     s->base.desc, ssh_last_error(s));
		goto out;
	}
	BOUND();
	rc = libssh2_channel_exec(s->channel, s->command);
	if (rc) {
		ret = rc == LIBSSH2_ERROR_TIMEOUT ? -ETIMEDOUT : -EPROTO;
		vmig_err_set(err, ret, "cannot connect to %s: the server refused to run '%s': %s",
			     s->base.desc, s->command, ssh_last_error(s));
		goto out;
	}
	/* Not earlier: a keepalive configured during the handshake breaks it. */
	libssh2_keepalive_config(s->session, 1, VMIG_SSH_KEEPALIVE_S);
	libssh2_session_set_blocking(s->session, 0);
	ret = 0;
out:
	libssh2_knownhost_free(kh);
	return ret;
#undef BOUND
}

int vmig_transport_connect_ssh(const char *uri, const struct vmig_ssh_options *opts,
			       int timeout_ms, struct vmig_transport **out,
			       struct vmig_err *err)
{
	static const struct vmig_ssh_options defaults;
	int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	struct ssh_transport *s;
	struct vmig_uri *u;
	char desc[sizeof(((struct vmig_transport *)0)->desc)];
	int ret;

	*out = NULL;
	if (!opts)
		opts = &defaults;
	pthread_once(&ssh_once, ssh_global_init);
	if (ssh_init_ret) {
		vmig_err_set(err, -EIO, "cannot initialise libssh2 (%d)", ssh_init_ret);
		return -EIO;
	}
	u = calloc(1, sizeof(*u));
	s = calloc(1, sizeof(*s));
	if (!u || !s) {
		free(u);
		free(s);
		vmig_err_set(err, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	s->sock = -1;
	s->event_fd = -1;
	ret = vmig_transport_parse_uri(uri, u, err);
	if (!ret && u->kind != VMIG_URI_SSH) {
		vmig_err_set(err, -EINVAL, "'%s' is not an ssh:// address", uri);
		ret = -EINVAL;
	}
	if (ret)
		goto fail;
	vmig_uri_format(u, desc, sizeof(desc));
	vmig_transport_init(&s->base, &ssh_ops, desc);
	/* Names in known_hosts: HOST on port 22, [HOST]:PORT elsewhere. */
	if (u->port == 22)
		snprintf(s->host, sizeof(s->host), "%s", u->host);
	else
		snprintf(s->host, sizeof(s->host), "[%s]:%u", u->host, u->port);
	ret = vmig_ssh_remote_command(opts, s->command, sizeof(s->command));
	if (ret) {
		vmig_err_set(err, ret, "cannot connect to %s: the remote command is too long",
			     desc);
		goto fail;
	}
	s->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (s->event_fd < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot connect to %s: eventfd: %s", desc, strerror(-ret));
		goto fail;
	}
	ret = tcp_connect(s, u, deadline, err);
	if (!ret)
		ret = ssh_setup(s, u, opts, deadline, err);
	if (ret)
		goto fail;
	vmig_log(VMIG_LOG_DEBUG, "ssh: %s runs '%s'", desc, s->command);
	free(u);
	*out = &s->base;
	return 0;
fail:
	free(u);
	s->broken = true;
	if (s->base.ops)
		ssh_close(&s->base);
	else
		free(s);
	return ret;
}
