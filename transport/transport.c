/*
 * Transports: URI parsing, the generic read/write loops over a backend's
 * ops, and the dispatch from a URI to a backend.
 *
 * A backend's read and write may move fewer bytes than asked (sockets,
 * pipes); the *_full helpers here loop, retry on EINTR inside the backends,
 * and count bytes.  Errors carry on as -errno; the first one is also
 * recorded in t->err with the address in the message, so the stream layer
 * can say where a migration broke without knowing what a socket is.
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "config.h"
#include "transport-internal.h"
#include "rdma-internal.h"

#define EXPECTED "expected tcp://HOST:PORT, unix:PATH or file:PATH"

/* ------------------------------------------------------------------------
 * URIs
 */

static bool scheme_char(char c, bool first)
{
	if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
		return true;
	return !first && ((c >= '0' && c <= '9') || c == '+' || c == '-' ||
			  c == '.');
}

static int parse_port(const char *s, const char *uri, const char *scheme,
		      uint16_t *out, struct vmig_err *err)
{
	unsigned long v = 0;
	const char *p = s;

	if (!*p) {
		vmig_err_set(err, -EINVAL, "missing port in '%s' (expected %s://HOST:PORT)",
			     uri, scheme);
		return -EINVAL;
	}
	for (; *p; p++) {
		if (*p < '0' || *p > '9' || p - s >= 5) {
			vmig_err_set(err, -EINVAL,
				     "bad port '%s' in '%s' (expected a number from 0 to 65535)",
				     s, uri);
			return -EINVAL;
		}
		v = v * 10 + (unsigned long)(*p - '0');
	}
	if (v > 65535) {
		vmig_err_set(err, -EINVAL, "port %lu in '%s' is out of range (0 to 65535)",
			     v, uri);
		return -EINVAL;
	}
	*out = (uint16_t)v;
	return 0;
}

/* tcp://HOST:PORT and rdma://HOST:PORT (@scheme, in lower case). */
static int parse_tcp(const char *rest, const char *uri, const char *scheme,
		     struct vmig_uri *out, struct vmig_err *err)
{
	const char *host, *host_end, *port;
	size_t hlen;

	if (strncmp(rest, "//", 2) != 0) {
		vmig_err_set(err, -EINVAL, "bad address '%s' (expected %s://HOST:PORT)", uri,
			     scheme);
		return -EINVAL;
	}
	host = rest + 2;
	if (*host == '[') {
		host++;
		host_end = strchr(host, ']');
		if (!host_end) {
			vmig_err_set(err, -EINVAL, "missing ']' after the IPv6 address in '%s'",
				     uri);
			return -EINVAL;
		}
		if (host_end[1] != ':') {
			vmig_err_set(err, -EINVAL, "missing port in '%s' (expected %s://[ADDRESS]:PORT)",
				     uri, scheme);
			return -EINVAL;
		}
		port = host_end + 2;
	} else {
		const char *c = strrchr(host, ':');

		if (!c) {
			vmig_err_set(err, -EINVAL, "missing port in '%s' (expected %s://HOST:PORT)",
				     uri, scheme);
			return -EINVAL;
		}
		host_end = c;
		port = c + 1;
		if (memchr(host, ':', (size_t)(host_end - host))) {
			vmig_err_set(err, -EINVAL,
				     "an IPv6 address must be written in brackets, as in %s://[::1]:4444 (got '%s')",
				     scheme, uri);
			return -EINVAL;
		}
	}
	hlen = (size_t)(host_end - host);
	if (hlen == 0) {
		vmig_err_set(err, -EINVAL,
			     "missing host in '%s' (expected %s://HOST:PORT; 0.0.0.0 or [::] listens on all addresses)",
			     uri, scheme);
		return -EINVAL;
	}
	if (hlen >= sizeof(out->host)) {
		vmig_err_set(err, -ENAMETOOLONG, "host name in '%s' is too long", uri);
		return -ENAMETOOLONG;
	}
	for (size_t i = 0; i < hlen; i++) {
		unsigned char c = (unsigned char)host[i];

		if (c <= ' ' || c >= 0x7f || c == '/' || c == '@' || c == '[' ||
		    c == ']') {
			vmig_err_set(err, -EINVAL, "bad character in the host of '%s'", uri);
			return -EINVAL;
		}
	}
	out->kind = strcmp(scheme, "rdma") ? VMIG_URI_TCP : VMIG_URI_RDMA;
	memcpy(out->host, host, hlen);
	out->host[hlen] = '\0';
	return parse_port(port, uri, scheme, &out->port, err);
}

static int parse_path(const char *rest, const char *uri, const char *scheme,
		      size_t max, struct vmig_uri *out, struct vmig_err *err)
{
	size_t len = strlen(rest);

	if (len == 0) {
		vmig_err_set(err, -EINVAL, "missing path in '%s' (expected %s:PATH)",
			     uri, scheme);
		return -EINVAL;
	}
	if (len > max) {
		vmig_err_set(err, -ENAMETOOLONG,
			     "path in '%s' is %zu bytes long, more than the %zu a %s address holds",
			     uri, len, max,
			     max == VMIG_UNIX_PATH_MAX ? "unix socket" : "file");
		return -ENAMETOOLONG;
	}
	memcpy(out->path, rest, len + 1);
	return 0;
}

static int parse_fd(const char *rest, const char *uri, struct vmig_uri *out,
		    struct vmig_err *err)
{
	long v = 0;

	if (!*rest)
		goto bad;
	for (const char *p = rest; *p; p++) {
		if (*p < '0' || *p > '9')
			goto bad;
		v = v * 10 + (*p - '0');
		if (v > INT_MAX)
			goto bad;
	}
	out->kind = VMIG_URI_FD;
	out->fd = (int)v;
	return 0;
bad:
	vmig_err_set(err, -EINVAL, "bad file descriptor in '%s' (expected fd:N)", uri);
	return -EINVAL;
}

int vmig_transport_parse_uri(const char *uri, struct vmig_uri *out,
			     struct vmig_err *err)
{
	size_t slen = 0;
	char scheme[16];

	memset(out, 0, sizeof(*out));
	out->fd = -1;
	if (!uri || !*uri) {
		vmig_err_set(err, -EINVAL, "empty address (" EXPECTED ")");
		return -EINVAL;
	}
	while (uri[slen] && scheme_char(uri[slen], slen == 0))
		slen++;
	if (slen == 0 || uri[slen] != ':') {
		vmig_err_set(err, -EINVAL, "'%s' has no URI scheme (" EXPECTED ")", uri);
		return -EINVAL;
	}
	if (slen >= sizeof(scheme)) {
		vmig_err_set(err, -EINVAL, "unsupported URI scheme '%.*s' (" EXPECTED ")",
			     (int)slen, uri);
		return -EINVAL;
	}
	memcpy(scheme, uri, slen);
	scheme[slen] = '\0';

	if (!strcasecmp(scheme, "tcp"))
		return parse_tcp(uri + slen + 1, uri, "tcp", out, err);
	if (!strcasecmp(scheme, "rdma"))
		return parse_tcp(uri + slen + 1, uri, "rdma", out, err);
	if (!strcasecmp(scheme, "unix")) {
		out->kind = VMIG_URI_UNIX;
		return parse_path(uri + slen + 1, uri, "unix", VMIG_UNIX_PATH_MAX,
				  out, err);
	}
	if (!strcasecmp(scheme, "file")) {
		out->kind = VMIG_URI_FILE;
		return parse_path(uri + slen + 1, uri, "file",
				  sizeof(out->path) - 1, out, err);
	}
	if (!strcasecmp(scheme, "fd"))
		return parse_fd(uri + slen + 1, uri, out, err);
	if (!strcasecmp(scheme, "ssh"))
		return vmig__ssh_parse_uri(uri + slen + 1, uri, out, err);
	vmig_err_set(err, -EINVAL, "unsupported URI scheme '%s' (" EXPECTED ")", scheme);
	return -EINVAL;
}

int vmig_uri_format(const struct vmig_uri *u, char *buf, size_t len)
{
	int n;

	switch (u->kind) {
	case VMIG_URI_TCP:
		n = snprintf(buf, len, strchr(u->host, ':') ? "tcp://[%s]:%u" : "tcp://%s:%u",
			     u->host, u->port);
		break;
	case VMIG_URI_UNIX:
		n = snprintf(buf, len, "unix:%s", u->path);
		break;
	case VMIG_URI_FILE:
		n = snprintf(buf, len, "file:%s", u->path);
		break;
	case VMIG_URI_FD:
		n = snprintf(buf, len, "fd:%d", u->fd);
		break;
	case VMIG_URI_SSH:
		n = snprintf(buf, len, strchr(u->host, ':') ? "ssh://%s%s[%s]:%u" : "ssh://%s%s%s:%u",
			     u->user, u->user[0] ? "@" : "", u->host, u->port);
		break;
	case VMIG_URI_RDMA:
		n = snprintf(buf, len, strchr(u->host, ':') ? "rdma://[%s]:%u" : "rdma://%s:%u",
			     u->host, u->port);
		break;
	default:
		n = snprintf(buf, len, "(bad URI)");
		break;
	}
	return n < 0 || (size_t)n >= len ? -ENOSPC : 0;
}

/* ------------------------------------------------------------------------
 * Common helpers for the backends
 */

void vmig_transport_init(struct vmig_transport *t,
			 const struct vmig_transport_ops *ops, const char *desc)
{
	t->ops = ops;
	snprintf(t->desc, sizeof(t->desc), "%s", desc);
	t->timeout_ms = -1;
	t->bytes_read = t->bytes_written = 0;
	vmig_err_clear(&t->err);
	t->err_claimed = 0;
}

void vmig__transport_fail(struct vmig_transport *t, int code,
			  const char *fmt, ...)
{
	char msg[sizeof(t->err.msg)];
	int saved = errno;
	va_list ap;

	/* First error wins, also between the reading and the writing thread. */
	if (__atomic_exchange_n(&t->err_claimed, 1, __ATOMIC_ACQ_REL))
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	vmig_err_set(&t->err, code, "%s: %s", t->desc, msg);
	errno = saved;
}

const char *vmig__transport_hint(int code)
{
	switch (code) {
	case -ECONNREFUSED:
		return " (is vmig incoming listening there?)";
	case -ENOENT:
		return " (no socket there: is vmig incoming listening?)";
	case -EHOSTUNREACH:
	case -ENETUNREACH:
		return " (check the address and the network route)";
	case -ETIMEDOUT:
		return " (the peer stopped answering: dead host or cut link?)";
	case -ENOSPC:
		return " (the file system is full)";
	case -EDQUOT:
		return " (the disk quota is exhausted)";
	case -EACCES:
	case -EPERM:
		return " (permission denied: check the file mode and owner)";
	default:
		return "";
	}
}

int vmig__poll_one(int fd, short events, int timeout_ms)
{
	struct pollfd p = { .fd = fd, .events = events };

	for (;;) {
		int n = poll(&p, 1, timeout_ms);

		if (n > 0)
			return 0;
		if (n == 0)
			return -ETIMEDOUT;
		if (errno != EINTR)
			return -errno;
		/*
		 * A signal cut the wait short; waiting the full timeout again
		 * errs on the side of patience, which is what a timeout for
		 * dead peers wants.
		 */
	}
}

/* ------------------------------------------------------------------------
 * Generic operations
 */

ssize_t vmig_transport_read(struct vmig_transport *t, void *buf, size_t len)
{
	ssize_t n;

	if (len == 0)
		return 0;
	n = t->ops->read(t, buf, len);
	if (n > 0)
		t->bytes_read += (uint64_t)n;
	return n;
}

int vmig_transport_read_full(struct vmig_transport *t, void *buf, size_t len)
{
	char *p = buf;

	while (len) {
		ssize_t n = vmig_transport_read(t, p, len);

		if (n < 0)
			return (int)n;
		if (n == 0)
			return -EPIPE;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

#define IOV_BATCH 64

int vmig_transport_write_full(struct vmig_transport *t, const void *buf,
			      size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = t->ops->write(t, p, len);

		if (n < 0)
			return (int)n;
		if (n == 0) {
			vmig__transport_fail(t, -EIO, "write made no progress");
			return -EIO;
		}
		t->bytes_written += (uint64_t)n;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/*
 * readv/writev until all of @iov is done, on a copy of the array (the
 * caller's stays intact), in batches; per buffer if the backend has no
 * vectored op.
 */
static int iov_full(struct vmig_transport *t, const struct iovec *iov, int iovcnt,
		    bool write)
{
	ssize_t (*op)(struct vmig_transport *, const struct iovec *, int) =
		write ? t->ops->writev : t->ops->readv;
	struct iovec local[IOV_BATCH];

	if (!op) {
		for (int i = 0; i < iovcnt; i++) {
			int ret = write ? vmig_transport_write_full(t, iov[i].iov_base,
								    iov[i].iov_len) :
					  vmig_transport_read_full(t, iov[i].iov_base,
								   iov[i].iov_len);

			if (ret < 0)
				return ret;
		}
		return 0;
	}
	while (iovcnt > 0) {
		int cnt = 0;

		while (cnt < IOV_BATCH && iovcnt > 0) {
			if (iov->iov_len)
				local[cnt++] = *iov;
			iov++;
			iovcnt--;
		}
		for (int i = 0; i < cnt;) {
			ssize_t n = op(t, local + i, cnt - i);

			if (n < 0)
				return (int)n;
			if (n == 0 && !write)
				return -EPIPE;
			if (n == 0) {
				vmig__transport_fail(t, -EIO, "write made no progress");
				return -EIO;
			}
			if (write)
				t->bytes_written += (uint64_t)n;
			else
				t->bytes_read += (uint64_t)n;
			while (i < cnt && (size_t)n >= local[i].iov_len) {
				n -= (ssize_t)local[i].iov_len;
				i++;
			}
			if (i < cnt) {
				local[i].iov_base = (char *)local[i].iov_base + n;
				local[i].iov_len -= (size_t)n;
			}
		}
	}
	return 0;
}

int vmig_transport_writev_full(struct vmig_transport *t,
			       const struct iovec *iov, int iovcnt)
{
	return iov_full(t, iov, iovcnt, true);
}

int vmig_transport_readv_full(struct vmig_transport *t, const struct iovec *iov,
			      int iovcnt)
{
	return iov_full(t, iov, iovcnt, false);
}

int vmig_transport_shutdown_write(struct vmig_transport *t)
{
	return t->ops->shutdown_write ? t->ops->shutdown_write(t) : 0;
}

int vmig_transport_set_timeout(struct vmig_transport *t, int timeout_ms)
{
	int old = t->timeout_ms, ret;

	if (timeout_ms < -1)
		return -EINVAL;
	if (!t->ops->set_timeout)
		return timeout_ms == -1 ? 0 : -EOPNOTSUPP;
	t->timeout_ms = timeout_ms;
	ret = t->ops->set_timeout(t);
	if (ret < 0)
		t->timeout_ms = old;
	return ret;
}

int vmig_transport_fd(struct vmig_transport *t)
{
	return t->ops->fd ? t->ops->fd(t) : -1;
}

/* Direct placement: only backends with mem ops (rdma) have it. */
#define MEM_OP(t, op, ...) \
	((t)->ops->mem && (t)->ops->mem->op ? (t)->ops->mem->op((t), ##__VA_ARGS__) \
					     : -EOPNOTSUPP)

int vmig_transport_expose_memory(struct vmig_transport *t, void *hva, size_t len,
				 uint64_t gpa)
{
	return MEM_OP(t, expose, hva, len, gpa);
}

int vmig_transport_expose_done(struct vmig_transport *t, int status)
{
	return MEM_OP(t, expose_done, status);
}

int vmig_transport_unexpose_memory(struct vmig_transport *t)
{
	return MEM_OP(t, unexpose);
}

int vmig_transport_peer_memory(struct vmig_transport *t, int timeout_ms)
{
	return MEM_OP(t, peer_memory, timeout_ms);
}

int vmig_transport_write_mem(struct vmig_transport *t, uint64_t gpa,
			     const void *src, size_t len)
{
	int ret = MEM_OP(t, write_mem, gpa, src, len);

	if (!ret)
		t->bytes_written += len;
	return ret;
}

int vmig_transport_mem_fence(struct vmig_transport *t)
{
	return MEM_OP(t, fence);
}

const char *vmig_transport_desc(const struct vmig_transport *t)
{
	return t->desc;
}

const struct vmig_err *vmig_transport_err(const struct vmig_transport *t)
{
	return &t->err;
}

void vmig_transport_close(struct vmig_transport *t)
{
	if (t)
		t->ops->close(t);
}

/* ------------------------------------------------------------------------
 * Dispatch
 */

int vmig_transport_connect(const char *uri, int timeout_ms,
			   struct vmig_transport **out, struct vmig_err *err)
{
	struct vmig_uri *u;
	char desc[sizeof(((struct vmig_transport *)0)->desc)];
	int ret;

	*out = NULL;
	u = malloc(sizeof(*u));
	if (!u) {
		vmig_err_set(err, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	ret = vmig_transport_parse_uri(uri, u, err);
	if (ret < 0)
		goto out;
	if (u->kind == VMIG_URI_FILE) {
		ret = vmig_transport_open_file(u->path, true, out, err);
		goto out;
	}
	if (u->kind == VMIG_URI_SSH) {
		ret = vmig_transport_connect_ssh(uri, NULL, timeout_ms, out, err);
		goto out;
	}
	if ((u->kind == VMIG_URI_TCP || u->kind == VMIG_URI_RDMA) && u->port == 0) {
		vmig_err_set(err, -EINVAL, "cannot connect to port 0 in '%s'", uri);
		ret = -EINVAL;
		goto out;
	}
	vmig_uri_format(u, desc, sizeof(desc));
	if (u->kind == VMIG_URI_RDMA)
		ret = vmig__rdma_connect(u, desc, timeout_ms, out, err);
	else
		ret = vmig__fd_connect(u, desc, timeout_ms, out, err);
out:
	free(u);
	return ret;
}

int vmig_transport_listen(const char *uri, struct vmig_listener **out,
			  struct vmig_err *err)
{
	struct vmig_uri *u;
	char desc[sizeof(((struct vmig_transport *)0)->desc)];
	int ret;

	*out = NULL;
	u = malloc(sizeof(*u));
	if (!u) {
		vmig_err_set(err, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	ret = vmig_transport_parse_uri(uri, u, err);
	if (ret < 0)
		goto out;
	if (u->kind != VMIG_URI_TCP && u->kind != VMIG_URI_UNIX && u->kind != VMIG_URI_RDMA) {
		vmig_err_set(err, -EINVAL,
			     "cannot listen on '%s': only tcp://HOST:PORT, rdma://HOST:PORT and unix:PATH listen%s",
			     uri, u->kind == VMIG_URI_FILE ?
			     " (to load a saved file, use vmig restore)" :
			     u->kind == VMIG_URI_SSH ?
			     " (ssh:// is for vmig migrate, which starts 'vmig incoming --stdio' itself)" : "");
		ret = -EINVAL;
		goto out;
	}
	vmig_uri_format(u, desc, sizeof(desc));
	ret = vmig__fd_listen(u, desc, out, err);
out:
	free(u);
	return ret;
}

#ifndef HAVE_RDMA
/* ------------------------------------------------------------------------
 * Built without --with-rdma: rdma:// parses, but cannot be used.
 */

int vmig__rdma_connect(const struct vmig_uri *u, const char *desc, int timeout_ms,
		       struct vmig_transport **out, struct vmig_err *err)
{
	*out = NULL;
	vmig_err_set(err, -EPROTONOSUPPORT, "cannot connect to %s: " VMIG_RDMA_UNBUILT_MSG,
		     desc);
	return -EPROTONOSUPPORT;
}

int vmig__rdma_listen(const struct vmig_uri *u, const char *desc,
		      struct vmig__rdma_listener **out, int *fd, char *uri,
		      size_t uri_len, struct vmig_err *err)
{
	*out = NULL;
	vmig_err_set(err, -EPROTONOSUPPORT, "cannot listen on %s: " VMIG_RDMA_UNBUILT_MSG,
		     desc);
	return -EPROTONOSUPPORT;
}

int vmig__rdma_accept(struct vmig__rdma_listener *l, int timeout_ms,
		      struct vmig_transport **out, struct vmig_err *err)
{
	*out = NULL;
	vmig_err_set(err, -EPROTONOSUPPORT, VMIG_RDMA_UNBUILT_MSG);
	return -EPROTONOSUPPORT;
}

void vmig__rdma_listener_close(struct vmig__rdma_listener *l)
{
}

int vmig_transport_rdma_check(struct vmig_err *err)
{
	vmig_err_set(err, -EPROTONOSUPPORT, VMIG_RDMA_UNBUILT_MSG);
	return -EPROTONOSUPPORT;
}
#endif
