/*
 * The fd backend: TCP and unix stream sockets, pipes and other plain file
 * descriptors, and the listeners that produce sockets.
 *
 * Blocking I/O.  With a timeout set, every read or write first polls for
 * at most that long and then does a non-blocking call, so a peer that stops
 * reading or writing costs -ETIMEDOUT instead of a hang.  TCP relies on
 * keepalive and TCP_USER_TIMEOUT (see transport.h) to notice a dead peer
 * even without one.
 *
 * SIGPIPE: sockets use MSG_NOSIGNAL.  A pipe has no such flag, so a write
 * to a pipe blocks SIGPIPE in the calling thread and, if the write failed
 * with EPIPE, consumes the signal it raised before unblocking; the
 * process-wide disposition is never touched (the CLI owns it).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "transport-internal.h"
#include "rdma-internal.h"

struct fd_transport {
	struct vmig_transport base;
	int rfd, wfd;            /* equal for sockets; wfd -1 after shutdown */
	bool rsock, wsock;       /* recv()/send() rather than read()/write() */
	bool wfifo;              /* a pipe: guard against SIGPIPE */
	bool write_shut;
};

struct vmig_listener {
	int fd;
	bool is_unix;
	struct vmig__rdma_listener *rdma;   /* rdma://: all of it is there */
	char uri[4200];
	/* unix: the socket file we created, removed on close if still ours */
	char path[VMIG_UNIX_PATH_MAX + 1];
	dev_t dev;
	ino_t ino;
};

static struct fd_transport *to_fd(struct vmig_transport *t)
{
	return (struct fd_transport *)t;
}

/* ------------------------------------------------------------------------
 * I/O
 */

static ssize_t fd_readv(struct vmig_transport *t, const struct iovec *iov, int iovcnt)
{
	struct fd_transport *f = to_fd(t);
	struct msghdr mh = {
		.msg_iov = (struct iovec *)iov,
		.msg_iovlen = (size_t)iovcnt,
	};

	for (;;) {
		ssize_t n;
		int ret;

		if (t->timeout_ms >= 0) {
			ret = vmig__poll_one(f->rfd, POLLIN, t->timeout_ms);
			if (ret == -ETIMEDOUT) {
				vmig__transport_fail(t, ret,
						     "no data for %d ms (the peer stopped sending: dead host or cut link?)",
						     t->timeout_ms);
				return ret;
			}
			if (ret < 0)
				goto fail;
		}
		if (f->rsock)
			n = recvmsg(f->rfd, &mh, t->timeout_ms >= 0 ? MSG_DONTWAIT : 0);
		else
			n = readv(f->rfd, iov, iovcnt);
		if (n >= 0)
			return n;
		ret = -errno;
		if (ret == -EINTR)
			continue;
		if (ret == -EAGAIN || ret == -EWOULDBLOCK) {
			/* Spurious wake-up, or an fd that came non-blocking. */
			if (t->timeout_ms < 0) {
				ret = vmig__poll_one(f->rfd, POLLIN, -1);
				if (ret < 0)
					goto fail;
			}
			continue;
		}
fail:
		vmig__transport_fail(t, ret, "read failed: %s%s", strerror(-ret),
				     vmig__transport_hint(ret));
		return ret;
	}
}

static ssize_t fd_read(struct vmig_transport *t, void *buf, size_t len)
{
	struct iovec iov = { buf, len };

	return fd_readv(t, &iov, 1);
}

/* write() to a pipe without letting SIGPIPE kill the process. */
static ssize_t write_nosigpipe(int fd, const void *buf, size_t len)
{
	sigset_t pipe_set, old, pending;
	bool was_pending;
	ssize_t n;
	int saved;

	sigemptyset(&pipe_set);
	sigaddset(&pipe_set, SIGPIPE);
	pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
	sigpending(&pending);
	was_pending = sigismember(&pending, SIGPIPE);

	n = write(fd, buf, len);
	saved = errno;
	if (n < 0 && saved == EPIPE && !was_pending) {
		static const struct timespec zero;

		while (sigtimedwait(&pipe_set, NULL, &zero) < 0 && errno == EINTR)
			;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	errno = saved;
	return n;
}

static int wait_writable(struct vmig_transport *t, int fd)
{
	int ret = vmig__poll_one(fd, POLLOUT, t->timeout_ms);

	if (ret == -ETIMEDOUT)
		vmig__transport_fail(t, ret,
				     "could not write for %d ms (the peer stopped reading: dead host or cut link?)",
				     t->timeout_ms);
	else if (ret < 0)
		vmig__transport_fail(t, ret, "poll failed: %s", strerror(-ret));
	return ret;
}

static int write_failed(struct vmig_transport *t, int ret)
{
	if (ret == -EPIPE)
		vmig__transport_fail(t, ret, "the peer closed the connection");
	else if (ret == -ECONNRESET)
		vmig__transport_fail(t, ret,
				     "connection reset by peer (the other side failed or gave up)");
	else
		vmig__transport_fail(t, ret, "write failed: %s%s", strerror(-ret),
				     vmig__transport_hint(ret));
	return ret;
}

static ssize_t fd_write(struct vmig_transport *t, const void *buf, size_t len)
{
	struct fd_transport *f = to_fd(t);

	if (f->write_shut) {
		vmig__transport_fail(t, -EPIPE, "write after shutdown");
		return -EPIPE;
	}
	for (;;) {
		ssize_t n;
		int ret;

		if (t->timeout_ms >= 0) {
			ret = wait_writable(t, f->wfd);
			if (ret < 0)
				return ret;
		}
		if (f->wsock) {
			n = send(f->wfd, buf, len, MSG_NOSIGNAL |
				 (t->timeout_ms >= 0 ? MSG_DONTWAIT : 0));
		} else {
			size_t chunk = len;

			/*
			 * After POLLOUT a pipe takes PIPE_BUF bytes without
			 * blocking; more might block past the timeout.
			 */
			if (t->timeout_ms >= 0 && chunk > PIPE_BUF)
				chunk = PIPE_BUF;
			n = f->wfifo ? write_nosigpipe(f->wfd, buf, chunk)
				     : write(f->wfd, buf, chunk);
		}
		if (n >= 0)
			return n;
		ret = -errno;
		if (ret == -EINTR)
			continue;
		if (ret == -EAGAIN || ret == -EWOULDBLOCK) {
			if (t->timeout_ms < 0) {
				ret = vmig__poll_one(f->wfd, POLLOUT, -1);
				if (ret < 0)
					return write_failed(t, ret);
			}
			continue;
		}
		return write_failed(t, ret);
	}
}

static ssize_t fd_writev(struct vmig_transport *t, const struct iovec *iov,
			 int iovcnt)
{
	struct fd_transport *f = to_fd(t);
	struct msghdr mh = {
		.msg_iov = (struct iovec *)iov,
		.msg_iovlen = (size_t)iovcnt,
	};

	if (!f->wsock || f->write_shut)
		return fd_write(t, iov[0].iov_base, iov[0].iov_len);
	for (;;) {
		ssize_t n;
		int ret;

		if (t->timeout_ms >= 0) {
			ret = wait_writable(t, f->wfd);
			if (ret < 0)
				return ret;
		}
		n = sendmsg(f->wfd, &mh, MSG_NOSIGNAL |
			    (t->timeout_ms >= 0 ? MSG_DONTWAIT : 0));
		if (n >= 0)
			return n;
		ret = -errno;
		if (ret == -EINTR)
			continue;
		if (ret == -EAGAIN || ret == -EWOULDBLOCK) {
			if (t->timeout_ms < 0) {
				ret = vmig__poll_one(f->wfd, POLLOUT, -1);
				if (ret < 0)
					return write_failed(t, ret);
			}
			continue;
		}
		return write_failed(t, ret);
	}
}

static int fd_shutdown_write(struct vmig_transport *t)
{
	struct fd_transport *f = to_fd(t);

	if (f->write_shut)
		return 0;
	f->write_shut = true;
	if (f->wsock) {
		if (shutdown(f->wfd, SHUT_WR) < 0 && errno != ENOTCONN) {
			int ret = -errno;

			vmig__transport_fail(t, ret, "shutdown failed: %s", strerror(-ret));
			return ret;
		}
	} else if (f->wfd != f->rfd) {
		/* The peer sees EOF once every copy of the pipe end is closed. */
		close(f->wfd);
		f->wfd = -1;
	}
	return 0;
}

static int fd_set_timeout(struct vmig_transport *t)
{
	return 0;   /* every wait polls with t->timeout_ms */
}

static int fd_fd(struct vmig_transport *t)
{
	return to_fd(t)->rfd;
}

static void fd_close(struct vmig_transport *t)
{
	struct fd_transport *f = to_fd(t);

	if (f->wfd >= 0 && f->wfd != f->rfd)
		close(f->wfd);
	if (f->rfd >= 0)
		close(f->rfd);
	free(f);
}

/* fd, tcp and unix differ only in the name they give. */
#define FD_OPS(name, k) static const struct vmig_transport_ops name = {	\
	.kind = k,							\
	.read = fd_read,						\
	.readv = fd_readv,						\
	.write = fd_write,						\
	.writev = fd_writev,						\
	.shutdown_write = fd_shutdown_write,				\
	.set_timeout = fd_set_timeout,					\
	.close = fd_close,						\
	.fd = fd_fd,							\
}
FD_OPS(fd_ops, "fd");
FD_OPS(tcp_ops, "tcp");
FD_OPS(unix_ops, "unix");

/* Takes ownership of the fds, also on failure. */
static int fd_transport_new(int rfd, int wfd,
			    const struct vmig_transport_ops *ops,
			    const char *desc, struct vmig_transport **out)
{
	struct fd_transport *f;
	struct stat rst, wst;

	if (fstat(rfd, &rst) < 0 || fstat(wfd, &wst) < 0) {
		int ret = -errno;

		close(rfd);
		if (wfd != rfd)
			close(wfd);
		return ret;
	}
	f = calloc(1, sizeof(*f));
	if (!f) {
		close(rfd);
		if (wfd != rfd)
			close(wfd);
		return -ENOMEM;
	}
	vmig_transport_init(&f->base, ops, desc);
	f->rfd = rfd;
	f->wfd = wfd;
	f->rsock = S_ISSOCK(rst.st_mode);
	f->wsock = S_ISSOCK(wst.st_mode);
	f->wfifo = S_ISFIFO(wst.st_mode);
	*out = &f->base;
	return 0;
}

int vmig_transport_from_fds(int rfd, int wfd, struct vmig_transport **out)
{
	char desc[64];

	*out = NULL;
	if (rfd < 0 || wfd < 0 || fcntl(rfd, F_GETFD) < 0 ||
	    fcntl(wfd, F_GETFD) < 0) {
		if (rfd >= 0)
			close(rfd);
		if (wfd >= 0 && wfd != rfd)
			close(wfd);
		return -EBADF;
	}
	if (rfd == wfd)
		snprintf(desc, sizeof(desc), "fd:%d", rfd);
	else
		snprintf(desc, sizeof(desc), "fd:%d,%d", rfd, wfd);
	return fd_transport_new(rfd, wfd, &fd_ops, desc, out);
}

/* ------------------------------------------------------------------------
 * Socket set-up
 */

static void setsockopt_int(int fd, int level, int name, int value,
			   const char *what)
{
	if (setsockopt(fd, level, name, &value, sizeof(value)) < 0)
		vmig_log(VMIG_LOG_DEBUG, "setsockopt %s=%d: %s", what, value,
			 strerror(errno));
}

/*
 * Big buffers keep a fast link busy while the sender compresses the next
 * batch.  Called before connect()/listen() so TCP's window scale is
 * negotiated for them.
 */
static void socket_buffers(int fd, bool is_tcp)
{
	int size = VMIG_SOCKET_BUFFER;

	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size)) == 0 &&
	    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) == 0)
		return;
	if (!is_tcp)
		setsockopt_int(fd, SOL_SOCKET, SO_SNDBUF, size, "SO_SNDBUF");
	/* TCP without CAP_NET_ADMIN: autotuning beats a capped SO_SNDBUF. */
}

static void tcp_tune(int fd)
{
	setsockopt_int(fd, IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY");
	setsockopt_int(fd, SOL_SOCKET, SO_KEEPALIVE, 1, "SO_KEEPALIVE");
	setsockopt_int(fd, IPPROTO_TCP, TCP_KEEPIDLE, VMIG_TCP_KEEPIDLE_S,
		       "TCP_KEEPIDLE");
	setsockopt_int(fd, IPPROTO_TCP, TCP_KEEPINTVL, VMIG_TCP_KEEPINTVL_S,
		       "TCP_KEEPINTVL");
	setsockopt_int(fd, IPPROTO_TCP, TCP_KEEPCNT, VMIG_TCP_KEEPCNT,
		       "TCP_KEEPCNT");
	setsockopt_int(fd, IPPROTO_TCP, TCP_USER_TIMEOUT,
		       VMIG_TCP_USER_TIMEOUT_MS, "TCP_USER_TIMEOUT");
}

static int set_blocking(int fd, bool blocking)
{
	int fl = fcntl(fd, F_GETFL);

	if (fl < 0)
		return -errno;
	fl = blocking ? fl & ~O_NONBLOCK : fl | O_NONBLOCK;
	return fcntl(fd, F_SETFL, fl) < 0 ? -errno : 0;
}

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Milliseconds left until @deadline (-1: none), at least 0. */
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

static void format_sockaddr(const struct sockaddr *sa, socklen_t len,
			    char *buf, size_t size)
{
	char host[NI_MAXHOST], serv[NI_MAXSERV];

	if (sa->sa_family == AF_UNIX) {
		const struct sockaddr_un *su = (const struct sockaddr_un *)sa;

		snprintf(buf, size, "unix:%.*s", (int)sizeof(su->sun_path),
			 su->sun_path);
		return;
	}
	if (getnameinfo(sa, len, host, sizeof(host), serv, sizeof(serv),
			NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
		snprintf(buf, size, "tcp://(unknown)");
		return;
	}
	snprintf(buf, size, sa->sa_family == AF_INET6 ? "tcp://[%s]:%s" : "tcp://%s:%s",
		 host, serv);
}

/* ------------------------------------------------------------------------
 * Connect
 */

/* One non-blocking connect, bounded by @deadline.  The fd or -errno. */
static int tcp_connect_one(const struct addrinfo *ai, int64_t deadline)
{
	int fd, ret;

	fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
		    ai->ai_protocol);
	if (fd < 0)
		return -errno;
	socket_buffers(fd, true);
	tcp_tune(fd);
	if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
		socklen_t len = sizeof(ret);

		if (errno != EINPROGRESS) {
			ret = -errno;
			goto fail;
		}
		ret = vmig__poll_one(fd, POLLOUT, remaining_ms(deadline));
		if (ret < 0)
			goto fail;
		if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &ret, &len) < 0) {
			ret = -errno;
			goto fail;
		}
		if (ret) {
			ret = -ret;
			goto fail;
		}
	}
	ret = set_blocking(fd, true);
	if (ret < 0)
		goto fail;
	return fd;
fail:
	close(fd);
	return ret;
}

static int tcp_connect(const struct vmig_uri *u, const char *desc,
		       int timeout_ms, int *fd_out, struct vmig_err *err)
{
	struct addrinfo hints = {
		.ai_family = AF_UNSPEC,
		.ai_socktype = SOCK_STREAM,
		.ai_flags = AI_NUMERICSERV,
	};
	struct addrinfo *res, *ai;
	int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	char port[8], addr[128];
	int ret, gai;

	snprintf(port, sizeof(port), "%u", u->port);
	gai = getaddrinfo(u->host, port, &hints, &res);
	if (gai != 0) {
		ret = gai == EAI_SYSTEM ? -errno : -EHOSTUNREACH;
		vmig_err_set(err, ret, "cannot resolve '%s' in %s: %s", u->host,
			     desc, gai == EAI_SYSTEM ? strerror(-ret) : gai_strerror(gai));
		return ret;
	}
	ret = -EHOSTUNREACH;
	addr[0] = '\0';
	for (ai = res; ai; ai = ai->ai_next) {
		int fd = tcp_connect_one(ai, deadline);

		if (fd >= 0) {
			*fd_out = fd;
			freeaddrinfo(res);
			return 0;
		}
		ret = fd;
		format_sockaddr(ai->ai_addr, ai->ai_addrlen, addr, sizeof(addr));
		if (ret == -ETIMEDOUT)
			break;
	}
	freeaddrinfo(res);

	/* Name the address that failed when HOST was a name. */
	if (ret == -ETIMEDOUT)
		vmig_err_set(err, ret,
			     "cannot connect to %s%s%s: no answer within %d ms (check the address, the network and firewalls)",
			     desc, strcmp(addr, desc) ? " at " : "",
			     strcmp(addr, desc) ? addr : "", timeout_ms);
	else
		vmig_err_set(err, ret, "cannot connect to %s%s%s: %s%s", desc,
			     strcmp(addr, desc) ? " at " : "",
			     strcmp(addr, desc) ? addr : "", strerror(-ret),
			     vmig__transport_hint(ret));
	return ret;
}

static int unix_address(const char *path, struct sockaddr_un *sa)
{
	size_t len = strlen(path);

	if (len > VMIG_UNIX_PATH_MAX)
		return -ENAMETOOLONG;
	memset(sa, 0, sizeof(*sa));
	sa->sun_family = AF_UNIX;
	memcpy(sa->sun_path, path, len + 1);
	return 0;
}

static int unix_connect(const struct vmig_uri *u, const char *desc,
			int timeout_ms, int *fd_out, struct vmig_err *err)
{
	struct sockaddr_un sa;
	int fd, ret;

	ret = unix_address(u->path, &sa);
	if (ret < 0)
		goto fail;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		ret = -errno;
		goto fail;
	}
	/* A unix connect blocks only while the listener's backlog is full;
	 * SO_SNDTIMEO bounds that wait. */
	if (timeout_ms >= 0) {
		struct timeval tv = {
			.tv_sec = timeout_ms / 1000,
			.tv_usec = (timeout_ms % 1000) * 1000,
		};

		setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	}
	while (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		if (errno == EINTR)
			continue;
		ret = errno == EAGAIN ? -ETIMEDOUT : -errno;
		close(fd);
		goto fail;
	}
	if (timeout_ms >= 0) {
		struct timeval zero = { 0 };

		setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &zero, sizeof(zero));
	}
	socket_buffers(fd, false);
	*fd_out = fd;
	return 0;
fail:
	if (ret == -ETIMEDOUT)
		vmig_err_set(err, ret, "cannot connect to %s: not accepted within %d ms",
			     desc, timeout_ms);
	else
		vmig_err_set(err, ret, "cannot connect to %s: %s%s", desc, strerror(-ret),
			     vmig__transport_hint(ret));
	return ret;
}

int vmig__fd_connect(const struct vmig_uri *u, const char *desc,
		     int timeout_ms, struct vmig_transport **out,
		     struct vmig_err *err)
{
	int fd = -1, ret;

	switch (u->kind) {
	case VMIG_URI_TCP:
		ret = tcp_connect(u, desc, timeout_ms, &fd, err);
		break;
	case VMIG_URI_UNIX:
		ret = unix_connect(u, desc, timeout_ms, &fd, err);
		break;
	case VMIG_URI_FD:
		ret = vmig_transport_from_fds(u->fd, u->fd, out);
		if (ret < 0)
			vmig_err_set(err, ret, "cannot use %s: %s", desc,
				     ret == -EBADF ? "no such open file descriptor"
						   : strerror(-ret));
		return ret;
	default:
		vmig_err_set(err, -EINVAL, "cannot connect to %s", desc);
		return -EINVAL;
	}
	if (ret < 0)
		return ret;
	ret = fd_transport_new(fd, fd, u->kind == VMIG_URI_TCP ? &tcp_ops : &unix_ops,
			       desc, out);
	if (ret < 0)
		vmig_err_set(err, ret, "cannot connect to %s: %s", desc, strerror(-ret));
	return ret;
}

/* ------------------------------------------------------------------------
 * Listen and accept
 */

static int tcp_listen(struct vmig_listener *l, const struct vmig_uri *u,
		      const char *desc, struct vmig_err *err)
{
	struct addrinfo hints = {
		.ai_family = AF_UNSPEC,
		.ai_socktype = SOCK_STREAM,
		.ai_flags = AI_NUMERICSERV | AI_PASSIVE,
	};
	struct addrinfo *res, *ai;
	struct sockaddr_storage ss;
	socklen_t sslen = sizeof(ss);
	char port[8];
	int ret = -EADDRNOTAVAIL, gai, fd = -1;

	snprintf(port, sizeof(port), "%u", u->port);
	gai = getaddrinfo(u->host, port, &hints, &res);
	if (gai != 0) {
		ret = gai == EAI_SYSTEM ? -errno : -EADDRNOTAVAIL;
		vmig_err_set(err, ret, "cannot resolve '%s' in %s: %s", u->host,
			     desc, gai == EAI_SYSTEM ? strerror(-ret) : gai_strerror(gai));
		return ret;
	}
	for (ai = res; ai; ai = ai->ai_next) {
		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
			    ai->ai_protocol);
		if (fd < 0) {
			ret = -errno;
			continue;
		}
		setsockopt_int(fd, SOL_SOCKET, SO_REUSEADDR, 1, "SO_REUSEADDR");
		socket_buffers(fd, true);
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 16) == 0)
			break;
		ret = -errno;
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0) {
		vmig_err_set(err, ret, "cannot listen on %s: %s%s", desc, strerror(-ret),
			     ret == -EADDRINUSE ? " (another process listens there)" :
			     ret == -EADDRNOTAVAIL ? " (not an address of this host)" :
			     ret == -EACCES ? " (ports below 1024 need privileges)" : "");
		return ret;
	}
	l->fd = fd;
	if (getsockname(fd, (struct sockaddr *)&ss, &sslen) == 0)
		format_sockaddr((struct sockaddr *)&ss, sslen, l->uri, sizeof(l->uri));
	else
		snprintf(l->uri, sizeof(l->uri), "%s", desc);
	return 0;
}

static int unix_listen(struct vmig_listener *l, const struct vmig_uri *u,
		       const char *desc, struct vmig_err *err)
{
	struct stat st;
	int fd, ret;

	ret = vmig_ctl_listen(u->path, &fd);
	if (ret < 0) {
		vmig_err_set(err, ret, "cannot listen on %s: %s%s", desc, strerror(-ret),
			     ret == -EADDRINUSE ? " (another process listens there)" :
			     ret == -EEXIST ? " (a file that is not a socket is in the way)" :
			     ret == -ENOENT ? " (does the directory exist?)" : "");
		return ret;
	}
	ret = set_blocking(fd, false);
	if (ret < 0 || stat(u->path, &st) < 0) {
		if (!ret)
			ret = -errno;
		vmig_err_set(err, ret, "cannot listen on %s: %s", desc, strerror(-ret));
		unlink(u->path);
		close(fd);
		return ret;
	}
	l->fd = fd;
	l->is_unix = true;
	l->dev = st.st_dev;
	l->ino = st.st_ino;
	memcpy(l->path, u->path, strnlen(u->path, VMIG_UNIX_PATH_MAX));
	snprintf(l->uri, sizeof(l->uri), "%s", desc);
	return 0;
}

int vmig__fd_listen(const struct vmig_uri *u, const char *desc,
		    struct vmig_listener **out, struct vmig_err *err)
{
	struct vmig_listener *l = calloc(1, sizeof(*l));
	int ret;

	if (!l) {
		vmig_err_set(err, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	l->fd = -1;
	if (u->kind == VMIG_URI_TCP)
		ret = tcp_listen(l, u, desc, err);
	else if (u->kind == VMIG_URI_RDMA)
		ret = vmig__rdma_listen(u, desc, &l->rdma, &l->fd, l->uri, sizeof(l->uri), err);
	else
		ret = unix_listen(l, u, desc, err);
	if (ret < 0) {
		free(l);
		return ret;
	}
	*out = l;
	return 0;
}

int vmig_transport_accept(struct vmig_listener *l, int timeout_ms,
			  struct vmig_transport **out, struct vmig_err *err)
{
	int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	struct sockaddr_storage ss;
	socklen_t len;
	char desc[4200];
	int fd, ret;

	*out = NULL;
	if (l->rdma)
		return vmig__rdma_accept(l->rdma, timeout_ms, out, err);
	for (;;) {
		len = sizeof(ss);
		ret = vmig__poll_one(l->fd, POLLIN, remaining_ms(deadline));
		if (ret == -ETIMEDOUT) {
			vmig_err_set(err, ret, "no connection on %s within %d ms",
				     l->uri, timeout_ms);
			return ret;
		}
		if (ret < 0)
			goto fail;
		fd = accept4(l->fd, (struct sockaddr *)&ss, &len, SOCK_CLOEXEC);
		if (fd >= 0)
			break;
		ret = -errno;
		/* Gone before we took it, or a signal: wait for the next. */
		if (ret == -EAGAIN || ret == -EWOULDBLOCK || ret == -EINTR ||
		    ret == -ECONNABORTED || ret == -EPROTO)
			continue;
		goto fail;
	}
	if (l->is_unix) {
		socket_buffers(fd, false);
		snprintf(desc, sizeof(desc), "%s", l->uri);
	} else {
		tcp_tune(fd);
		format_sockaddr((struct sockaddr *)&ss, len, desc, sizeof(desc));
	}
	ret = fd_transport_new(fd, fd, l->is_unix ? &unix_ops : &tcp_ops, desc, out);
	if (ret < 0)
		goto fail;
	return 0;
fail:
	vmig_err_set(err, ret, "cannot accept a connection on %s: %s", l->uri,
		     strerror(-ret));
	return ret;
}

const char *vmig_listener_uri(const struct vmig_listener *l)
{
	return l->uri;
}

int vmig_listener_fd(const struct vmig_listener *l)
{
	return l->fd;
}

void vmig_listener_close(struct vmig_listener *l)
{
	struct stat st;

	if (!l)
		return;
	if (l->rdma) {
		vmig__rdma_listener_close(l->rdma);   /* closes l->fd too */
		free(l);
		return;
	}
	/* Remove the socket file only if nobody replaced it meanwhile. */
	if (l->is_unix && stat(l->path, &st) == 0 && st.st_dev == l->dev &&
	    st.st_ino == l->ino)
		unlink(l->path);
	if (l->fd >= 0)
		close(l->fd);
	free(l);
}
