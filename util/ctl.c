/*
 * The control protocol: one JSON object per line over a unix stream socket.
 *
 * A line is the unit of framing.  JSON_C_TO_STRING_PLAIN escapes newlines
 * inside strings, so a serialised object never contains a raw '\n'.  The
 * reader keeps whatever follows a line buffered for the next call, so a
 * peer may send several messages in one write or one message in several;
 * a line longer than VMIG_CTL_MAX_LINE ends the conversation, which bounds
 * the memory an untrusted peer can make us allocate.
 *
 * Sockets are created close-on-exec, and sends use MSG_NOSIGNAL, so a
 * client that goes away costs the server an -EPIPE, never a SIGPIPE.
 * Nothing here keeps global state except the umask flip around bind().
 */
#define _GNU_SOURCE 1

#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <json-c/json.h>

#include "vmig/util.h"

#define READ_CHUNK_MIN 4096

static bool is_blank(char c)
{
	return c == ' ' || c == '\t' || c == '\r';
}

int vmig_ctl_send(int fd, struct json_object *msg)
{
	struct iovec iov[2];
	struct msghdr mh = { .msg_iov = iov, .msg_iovlen = 2 };
	const char *s;
	size_t slen;

	if (!json_object_is_type(msg, json_type_object))
		return -EINVAL;
	s = json_object_to_json_string_length(msg, JSON_C_TO_STRING_PLAIN,
					      &slen);
	if (!s)
		return -ENOMEM;
	if (slen > VMIG_CTL_MAX_LINE)
		return -EMSGSIZE;

	iov[0].iov_base = (void *)s;
	iov[0].iov_len = slen;
	iov[1].iov_base = "\n";
	iov[1].iov_len = 1;

	while (mh.msg_iovlen) {
		ssize_t n = sendmsg(fd, &mh, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		/* Skip what went out; a short send can end mid-iovec. */
		while (mh.msg_iovlen && (size_t)n >= mh.msg_iov->iov_len) {
			n -= (ssize_t)mh.msg_iov->iov_len;
			mh.msg_iov++;
			mh.msg_iovlen--;
		}
		if (mh.msg_iovlen) {
			mh.msg_iov->iov_base = (char *)mh.msg_iov->iov_base + n;
			mh.msg_iov->iov_len -= (size_t)n;
		}
	}
	return 0;
}

void vmig_ctl_reader_init(struct vmig_ctl_reader *r, int fd)
{
	r->fd = fd;
	r->buf = NULL;
	r->len = 0;
	r->cap = 0;
}

void vmig_ctl_reader_fini(struct vmig_ctl_reader *r)
{
	if (!r)
		return;
	free(r->buf);
	r->buf = NULL;
	r->len = 0;
	r->cap = 0;
}

int vmig_ctl_parse_line(const char *line, size_t len,
			struct json_object **out)
{
	struct json_tokener *tok;
	struct json_object *obj;
	int err = 0;

	*out = NULL;
	if (len > VMIG_CTL_MAX_LINE)
		return -EMSGSIZE;
	while (len && is_blank(line[len - 1]))
		len--;
	while (len && is_blank(*line)) {
		line++;
		len--;
	}
	/* json-c would stop at a NUL and report success for the prefix. */
	if (!len || memchr(line, '\0', len))
		return -EPROTO;

	tok = json_tokener_new_ex(JSON_TOKENER_DEFAULT_DEPTH);
	if (!tok)
		return -ENOMEM;
	json_tokener_set_flags(tok, JSON_TOKENER_STRICT |
			       JSON_TOKENER_VALIDATE_UTF8);
	/* len <= VMIG_CTL_MAX_LINE, so it fits json-c's int length. */
	obj = json_tokener_parse_ex(tok, line, (int)len);
	if (!obj || json_tokener_get_error(tok) != json_tokener_success ||
	    json_tokener_get_parse_end(tok) != len ||
	    !json_object_is_type(obj, json_type_object))
		err = -EPROTO;
	json_tokener_free(tok);

	if (err) {
		json_object_put(obj);
		return err;
	}
	*out = obj;
	return 0;
}

/* Drop the first @n bytes of the buffer. */
static void reader_consume(struct vmig_ctl_reader *r, size_t n)
{
	memmove(r->buf, r->buf + n, r->len - n);
	r->len -= n;
}

static bool line_is_blank(const char *s, size_t len)
{
	size_t i;

	for (i = 0; i < len; i++)
		if (!is_blank(s[i]))
			return false;
	return true;
}

int vmig_ctl_recv(struct vmig_ctl_reader *r, struct json_object **out)
{
	size_t scanned = 0;

	*out = NULL;
	for (;;) {
		char *nl = NULL;
		ssize_t n;

		if (r->len > scanned)
			nl = memchr(r->buf + scanned, '\n', r->len - scanned);
		if (nl) {
			size_t linelen = (size_t)(nl - r->buf);
			int err;

			if (line_is_blank(r->buf, linelen)) {
				reader_consume(r, linelen + 1);
				scanned = 0;
				continue;
			}
			err = vmig_ctl_parse_line(r->buf, linelen, out);
			reader_consume(r, linelen + 1);
			return err;
		}
		scanned = r->len;

		/* cap never exceeds VMIG_CTL_MAX_LINE + 1: a full buffer
		 * without a newline is a line that is too long. */
		if (r->len > VMIG_CTL_MAX_LINE)
			return -EMSGSIZE;
		if (r->len == r->cap) {
			size_t cap = r->cap ? 2 * r->cap : READ_CHUNK_MIN;
			char *buf;

			if (cap > VMIG_CTL_MAX_LINE + 1)
				cap = VMIG_CTL_MAX_LINE + 1;
			buf = realloc(r->buf, cap);
			if (!buf)
				return -ENOMEM;
			r->buf = buf;
			r->cap = cap;
		}

		n = read(r->fd, r->buf + r->len, r->cap - r->len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EPIPE;
		r->len += (size_t)n;
	}
}

static int unix_addr(const char *path, struct sockaddr_un *sa,
		     socklen_t *salen)
{
	size_t n;

	if (!path || !*path)
		return -EINVAL;
	n = strlen(path);
	if (n >= sizeof(sa->sun_path))
		return -ENAMETOOLONG;
	memset(sa, 0, sizeof(*sa));
	sa->sun_family = AF_UNIX;
	memcpy(sa->sun_path, path, n + 1);
	*salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
	return 0;
}

/*
 * connect() that survives EINTR: an interrupted connect goes on in the
 * background and calling connect() again would fail with EALREADY, so
 * wait for it to finish and fetch its result instead.
 */
static int connect_retry(int fd, const struct sockaddr_un *sa,
			 socklen_t salen)
{
	struct pollfd pfd = { .fd = fd, .events = POLLOUT };
	socklen_t optlen = sizeof(int);
	int soerr = 0;

	if (connect(fd, (const struct sockaddr *)sa, salen) == 0)
		return 0;
	if (errno != EINTR)
		return -errno;
	while (poll(&pfd, 1, -1) < 0)
		if (errno != EINTR)
			return -errno;
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &optlen) < 0)
		return -errno;
	return -soerr;
}

int vmig_ctl_connect(const char *path, int *fd_out)
{
	struct sockaddr_un sa;
	socklen_t salen;
	int fd, err;

	err = unix_addr(path, &sa, &salen);
	if (err)
		return err;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	err = connect_retry(fd, &sa, salen);
	if (err) {
		close(fd);
		return err;
	}
	*fd_out = fd;
	return 0;
}

/* bind() with a umask that leaves the socket file mode 0600. */
static int bind_private(int fd, const struct sockaddr_un *sa,
			socklen_t salen)
{
	mode_t old = umask(0177);
	int err = 0;

	if (bind(fd, (const struct sockaddr *)sa, salen) < 0)
		err = -errno;
	umask(old);
	return err;
}

/*
 * Something is bound at @path.  If it is a socket nobody listens on (its
 * server died without unlinking it), remove it and return 0 so the caller
 * can bind again.  -EADDRINUSE if a server answers, -EEXIST if @path is
 * not a socket at all.
 */
static int remove_stale(const char *path)
{
	struct stat st;
	int fd, err;

	if (lstat(path, &st) < 0)
		return errno == ENOENT ? 0 : -errno;
	if (!S_ISSOCK(st.st_mode))
		return -EEXIST;

	err = vmig_ctl_connect(path, &fd);
	if (!err) {
		close(fd);
		return -EADDRINUSE;
	}
	if (err == -ENOENT)
		return 0;
	if (err != -ECONNREFUSED)
		return err;
	if (unlink(path) < 0 && errno != ENOENT)
		return -errno;
	return 0;
}

int vmig_ctl_listen(const char *path, int *fd_out)
{
	struct sockaddr_un sa;
	socklen_t salen;
	int fd, err;

	err = unix_addr(path, &sa, &salen);
	if (err)
		return err;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;

	err = bind_private(fd, &sa, salen);
	if (err == -EADDRINUSE) {
		err = remove_stale(path);
		if (!err)
			err = bind_private(fd, &sa, salen);
	}
	if (err)
		goto err_close;

	if (listen(fd, SOMAXCONN) < 0) {
		err = -errno;
		goto err_unlink;
	}
	*fd_out = fd;
	return 0;

err_unlink:
	unlink(path);
err_close:
	close(fd);
	return err;
}

struct json_object *vmig_ctl_request(const char *cmd)
{
	struct json_object *o = json_object_new_object();
	struct json_object *s;

	if (!o)
		return NULL;
	s = json_object_new_string(cmd);
	if (!s || json_object_object_add(o, "cmd", s) < 0) {
		json_object_put(s);
		json_object_put(o);
		return NULL;
	}
	return o;
}

struct json_object *vmig_ctl_reply_ok(void)
{
	struct json_object *o = json_object_new_object();
	struct json_object *b;

	if (!o)
		return NULL;
	b = json_object_new_boolean(1);
	if (!b || json_object_object_add(o, "ok", b) < 0) {
		json_object_put(b);
		json_object_put(o);
		return NULL;
	}
	return o;
}

/* Add @val to @o under @key; consumes @val, also on failure. */
static int add_field(struct json_object *o, const char *key,
		     struct json_object *val)
{
	if (!val)
		return -ENOMEM;
	if (json_object_object_add(o, key, val) < 0) {
		json_object_put(val);
		return -ENOMEM;
	}
	return 0;
}

struct json_object *vmig_ctl_reply_error(int err, const char *fmt, ...)
{
	struct json_object *o = NULL;
	char *msg = NULL;
	va_list ap;
	int n;

	if (err < 0)
		err = -err;
	if (!err)
		err = EIO;

	if (fmt) {
		va_start(ap, fmt);
		n = vsnprintf(NULL, 0, fmt, ap);
		va_end(ap);
		if (n < 0)
			return NULL;
		msg = malloc((size_t)n + 1);
		if (!msg)
			return NULL;
		va_start(ap, fmt);
		vsnprintf(msg, (size_t)n + 1, fmt, ap);
		va_end(ap);
	}

	o = json_object_new_object();
	if (!o ||
	    add_field(o, "ok", json_object_new_boolean(0)) ||
	    add_field(o, "error",
		      json_object_new_string(msg ? msg : strerror(err))) ||
	    add_field(o, "errno", json_object_new_int(err))) {
		json_object_put(o);
		o = NULL;
	}
	free(msg);
	return o;
}

int vmig_ctl_reply_status(struct json_object *reply, const char **msg)
{
	struct json_object *v;
	int64_t e;

	if (msg)
		*msg = NULL;
	if (!json_object_is_type(reply, json_type_object) ||
	    !json_object_object_get_ex(reply, "ok", &v) ||
	    !json_object_is_type(v, json_type_boolean))
		return -EPROTO;
	if (json_object_get_boolean(v))
		return 0;

	if (msg && json_object_object_get_ex(reply, "error", &v) &&
	    json_object_is_type(v, json_type_string))
		*msg = json_object_get_string(v);
	if (!json_object_object_get_ex(reply, "errno", &v) ||
	    !json_object_is_type(v, json_type_int))
		return -EIO;
	/* The peer is not trusted to send a sane errno value. */
	e = json_object_get_int64(v);
	return e > 0 && e < 4096 ? -(int)e : -EIO;
}

int vmig_ctl_call(const char *path, struct json_object *req,
		  struct json_object **reply)
{
	struct vmig_ctl_reader r;
	int fd, err;

	*reply = NULL;
	if (!req)
		return -EINVAL;
	err = vmig_ctl_connect(path, &fd);
	if (err)
		goto out_put;
	err = vmig_ctl_send(fd, req);
	if (err)
		goto out_close;
	vmig_ctl_reader_init(&r, fd);
	err = vmig_ctl_recv(&r, reply);
	vmig_ctl_reader_fini(&r);
out_close:
	close(fd);
out_put:
	json_object_put(req);
	return err;
}

const char *vmig_json_str(struct json_object *o, const char *key, const char *dflt)
{
	struct json_object *v;

	return o && json_object_object_get_ex(o, key, &v) ? json_object_get_string(v) : dflt;
}

uint64_t vmig_json_u64(struct json_object *o, const char *key)
{
	struct json_object *v;

	return o && json_object_object_get_ex(o, key, &v) ? json_object_get_uint64(v) : 0;
}
