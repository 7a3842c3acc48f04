/*
 * Unit tests for transport/: URI parsing, TCP on 127.0.0.1 and ::1 with
 * ephemeral ports, unix sockets in a temporary directory, pipes, and the
 * file backend (including /dev/full).  Real sockets, no KVM, no traffic
 * anywhere but loopback.
 */
#define _GNU_SOURCE 1

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "vmig/transport.h"

/* ------------------------------------------------------------------------
 * Helpers
 */

static char tmpdir[64];

/* Room for tmpdir plus a file name. */
#define PATH_LEN 256

static void tmpdir_setup(void)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/vmig-test-transport.XXXXXX");
	ck_assert_msg(mkdtemp(tmpdir), "mkdtemp: %s", strerror(errno));
}

static void tmpdir_teardown(void)
{
	char cmd[128];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
	if (system(cmd) != 0)
		fprintf(stderr, "cannot remove %s\n", tmpdir);
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545f4914f6cdd1dull;
}

static uint8_t *pattern(size_t len, uint64_t seed)
{
	uint8_t *p = malloc(len);

	ck_assert(p);
	rng_state = seed;
	for (size_t i = 0; i < len; i += 8) {
		uint64_t v = rng();

		memcpy(p + i, &v, len - i < 8 ? len - i : 8);
	}
	return p;
}

#define assert_err_has(e, s) \
	ck_assert_msg(strstr((e)->msg, (s)), "message \"%s\" lacks \"%s\"", (e)->msg, (s))

struct xfer {
	struct vmig_transport *t;
	const uint8_t *data;
	size_t len;
	size_t chunk;            /* writes of this size (0: all at once) */
	int ret;
};

static void *writer_thread(void *arg)
{
	struct xfer *x = arg;
	size_t off = 0;

	x->ret = 0;
	while (off < x->len && !x->ret) {
		size_t n = x->chunk ? x->chunk : x->len;

		if (n > x->len - off)
			n = x->len - off;
		x->ret = vmig_transport_write_full(x->t, x->data + off, n);
		off += n;
	}
	return NULL;
}

/* Send @len bytes from @a to @b (in a thread) and check they arrive. */
static void transfer(struct vmig_transport *a, struct vmig_transport *b,
		     size_t len, uint64_t seed)
{
	uint8_t *data = pattern(len, seed), *got = malloc(len);
	struct xfer x = { .t = a, .data = data, .len = len, .chunk = 100003 };
	pthread_t th;
	int ret;

	ck_assert(got);
	ck_assert_int_eq(pthread_create(&th, NULL, writer_thread, &x), 0);
	ret = vmig_transport_read_full(b, got, len);
	pthread_join(th, NULL);
	ck_assert_msg(ret == 0, "read_full: %s (%s)", strerror(-ret),
		      vmig_transport_err(b)->msg);
	ck_assert_msg(x.ret == 0, "write_full: %s", strerror(-x.ret));
	for (size_t i = 0; i < len; i++)
		if (got[i] != data[i])
			ck_abort_msg("byte %zu of %zu differs: sent 0x%02x, got 0x%02x",
				     i, len, data[i], got[i]);
	free(data);
	free(got);
}

/* Both directions, a few MiB each, then the peer closes. */
static void exercise_pair(struct vmig_transport *client, struct vmig_transport *server)
{
	uint8_t b[16];
	int ret, i;

	transfer(client, server, 5u << 20, 1);
	transfer(server, client, 3u << 20, 2);

	/* shutdown_write: the other side reads EOF, the reverse still works. */
	ck_assert_int_eq(vmig_transport_shutdown_write(client), 0);
	ret = vmig_transport_read_full(server, b, 1);
	ck_assert_msg(ret == -EPIPE, "read after peer shutdown: %d", ret);
	transfer(server, client, 4096, 3);

	/* The server goes away: the client's reads see EOF (-EPIPE)... */
	vmig_transport_close(server);
	ret = vmig_transport_read_full(client, b, sizeof(b));
	ck_assert_msg(ret == -EPIPE, "read after peer close: %d (%s)", ret, strerror(-ret));

	/* ...and writes fail without SIGPIPE.  (The first may still be buffered.) */
	ck_assert_int_eq(vmig_transport_set_timeout(client, 2000), 0);
	for (i = 0, ret = 0; i < 100 && ret == 0; i++)
		ret = vmig_transport_write_full(client, b, sizeof(b));
	ck_assert_msg(ret == -EPIPE || ret == -ECONNRESET,
		      "write after peer close: %d (%s)", ret, strerror(-ret));
	ck_assert_msg(vmig_transport_err(client)->code == ret, "error not recorded");
	ck_assert_msg(strstr(vmig_transport_err(client)->msg, vmig_transport_desc(client)),
		      "message \"%s\" does not name %s", vmig_transport_err(client)->msg,
		      vmig_transport_desc(client));
	vmig_transport_close(client);
}

/* Listen on @uri, connect, accept; returns the listener. */
static struct vmig_listener *connect_pair(const char *uri, struct vmig_transport **client,
					  struct vmig_transport **server)
{
	struct vmig_listener *l;
	struct vmig_err err = { 0 };
	int ret;

	ret = vmig_transport_listen(uri, &l, &err);
	ck_assert_msg(ret == 0, "listen %s: %s", uri, err.msg);
	ret = vmig_transport_connect(vmig_listener_uri(l), 2000, client, &err);
	ck_assert_msg(ret == 0, "connect %s: %s", vmig_listener_uri(l), err.msg);
	ret = vmig_transport_accept(l, 2000, server, &err);
	ck_assert_msg(ret == 0, "accept: %s", err.msg);
	return l;
}

/* ------------------------------------------------------------------------
 * URIs
 */

START_TEST(test_uri_good)
{
	static const struct {
		const char *in, *canon;
		enum vmig_uri_kind kind;
		const char *host;
		unsigned port;
		const char *path;
		int fd;
	} cases[] = {
		{ "tcp://127.0.0.1:4444", NULL, VMIG_URI_TCP, "127.0.0.1", 4444, NULL, -1 },
		{ "tcp://[::1]:0", NULL, VMIG_URI_TCP, "::1", 0, NULL, -1 },
		{ "TCP://host-a.example:65535", "tcp://host-a.example:65535", VMIG_URI_TCP,
		  "host-a.example", 65535, NULL, -1 },
		{ "tcp://[fe80::1%eth0]:22", NULL, VMIG_URI_TCP, "fe80::1%eth0", 22, NULL, -1 },
		{ "unix:/run/vmig/m.sock", NULL, VMIG_URI_UNIX, NULL, 0, "/run/vmig/m.sock", -1 },
		{ "unix:rel.sock", NULL, VMIG_URI_UNIX, NULL, 0, "rel.sock", -1 },
		{ "file:/var/tmp/vm.img", NULL, VMIG_URI_FILE, NULL, 0, "/var/tmp/vm.img", -1 },
		{ "File:x:y", "file:x:y", VMIG_URI_FILE, NULL, 0, "x:y", -1 },
		{ "fd:3", NULL, VMIG_URI_FD, NULL, 0, NULL, 3 },
		{ "ssh://host", "ssh://host:22", VMIG_URI_SSH, "host", 22, NULL, -1 },
		{ "ssh://root@10.0.0.2:2222", NULL, VMIG_URI_SSH, "10.0.0.2", 2222, NULL, -1 },
		{ "SSH://u@[::1]/", "ssh://u@[::1]:22", VMIG_URI_SSH, "::1", 22, NULL, -1 },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct vmig_uri u;
		struct vmig_err err = { 0 };
		char buf[4200];
		int ret = vmig_transport_parse_uri(cases[i].in, &u, &err);

		ck_assert_msg(ret == 0, "%s: %d %s", cases[i].in, ret, err.msg);
		ck_assert_int_eq(u.kind, cases[i].kind);
		if (cases[i].host) {
			ck_assert_str_eq(u.host, cases[i].host);
			ck_assert_uint_eq(u.port, cases[i].port);
		}
		if (cases[i].path)
			ck_assert_str_eq(u.path, cases[i].path);
		if (cases[i].fd >= 0)
			ck_assert_int_eq(u.fd, cases[i].fd);
		ck_assert_int_eq(vmig_uri_format(&u, buf, sizeof(buf)), 0);
		ck_assert_str_eq(buf, cases[i].canon ? cases[i].canon : cases[i].in);
		ck_assert_int_eq(vmig_uri_format(&u, buf, 4), -ENOSPC);
	}
}
END_TEST

START_TEST(test_uri_bad)
{
	static const struct {
		const char *in;
		int code;
		const char *msg;
	} cases[] = {
		{ "", -EINVAL, "empty address (expected tcp://HOST:PORT, unix:PATH or file:PATH)" },
		{ "ftp://h/x", -EINVAL,
		  "unsupported URI scheme 'ftp' (expected tcp://HOST:PORT, unix:PATH or file:PATH)" },
		{ "sftp://host", -EINVAL, "unsupported URI scheme 'sftp'" },
		{ "ssh:host", -EINVAL, "expected ssh://[USER@]HOST[:PORT]" },
		{ "ssh://", -EINVAL, "missing host" },
		{ "ssh://u@", -EINVAL, "missing host" },
		{ "ssh://@h", -EINVAL, "empty user name" },
		{ "ssh://h:", -EINVAL, "missing port" },
		{ "ssh://h:0", -EINVAL, "out of range" },
		{ "ssh://h:x", -EINVAL, "bad port 'x'" },
		{ "ssh://h/vm", -EINVAL, "unexpected path" },
		{ "ssh://::1", -EINVAL, "IPv6 address must be written in brackets" },
		{ "ssh://[::1", -EINVAL, "missing ']'" },
		{ "ssh://a b", -EINVAL, "bad character" },
		{ "/tmp/sock", -EINVAL, "'/tmp/sock' has no URI scheme" },
		{ "localhost:4444", -EINVAL, "unsupported URI scheme 'localhost'" },
		{ "1.2.3.4:5", -EINVAL, "has no URI scheme" },
		{ "tcp:host:1", -EINVAL, "expected tcp://HOST:PORT" },
		{ "tcp://host", -EINVAL, "missing port in 'tcp://host'" },
		{ "tcp://host:", -EINVAL, "missing port" },
		{ "tcp://host:65536", -EINVAL, "port 65536 in 'tcp://host:65536' is out of range" },
		{ "tcp://host:-1", -EINVAL, "bad port '-1'" },
		{ "tcp://host:12a", -EINVAL, "bad port '12a'" },
		{ "tcp://host:1234567", -EINVAL, "bad port" },
		{ "tcp://host:80/path", -EINVAL, "bad port '80/path'" },
		{ "tcp://::1:4444", -EINVAL, "IPv6 address must be written in brackets" },
		{ "tcp://[::1:4444", -EINVAL, "missing ']'" },
		{ "tcp://[::1]", -EINVAL, "missing port" },
		{ "tcp://[::1]4444", -EINVAL, "missing port" },
		{ "tcp://:4444", -EINVAL, "missing host" },
		{ "tcp://a b:1", -EINVAL, "bad character" },
		{ "tcp://user@h:1", -EINVAL, "bad character" },
		{ "unix:", -EINVAL, "missing path in 'unix:'" },
		{ "file:", -EINVAL, "missing path in 'file:'" },
		{ "fd:", -EINVAL, "bad file descriptor" },
		{ "fd:x", -EINVAL, "bad file descriptor in 'fd:x'" },
		{ "fd:-1", -EINVAL, "bad file descriptor" },
		{ "fd:99999999999", -EINVAL, "bad file descriptor" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct vmig_uri u;
		struct vmig_err err = { 0 };
		int ret = vmig_transport_parse_uri(cases[i].in, &u, &err);

		ck_assert_msg(ret == cases[i].code, "'%s': got %d, expected %d (%s)",
			      cases[i].in, ret, cases[i].code, err.msg);
		ck_assert_int_eq(err.code, ret);
		assert_err_has(&err, cases[i].msg);
	}
}
END_TEST

START_TEST(test_uri_unix_too_long)
{
	char uri[300] = "unix:/";
	struct vmig_uri u;
	struct vmig_err err = { 0 };

	memset(uri + 6, 'a', 101);    /* path of 102 bytes: fits */
	ck_assert_int_eq(vmig_transport_parse_uri(uri, &u, &err), 0);
	memset(uri + 6, 'a', 107);    /* 108: one too many */
	ck_assert_int_eq(vmig_transport_parse_uri(uri, &u, &err), -ENAMETOOLONG);
	assert_err_has(&err, "108 bytes long, more than the 107 a unix socket address holds");
}
END_TEST

/* ------------------------------------------------------------------------
 * Sockets
 */

START_TEST(test_tcp_v4)
{
	struct vmig_transport *c, *s;
	struct vmig_listener *l = connect_pair("tcp://127.0.0.1:0", &c, &s);

	ck_assert_msg(strncmp(vmig_listener_uri(l), "tcp://127.0.0.1:", 16) == 0 &&
		      strcmp(vmig_listener_uri(l), "tcp://127.0.0.1:0") != 0,
		      "listener uri %s", vmig_listener_uri(l));
	ck_assert_msg(strncmp(vmig_transport_desc(s), "tcp://127.0.0.1:", 16) == 0,
		      "accepted desc %s", vmig_transport_desc(s));
	ck_assert_str_eq(vmig_transport_desc(c), vmig_listener_uri(l));
	ck_assert_int_ge(vmig_transport_fd(c), 0);
	ck_assert_int_ge(vmig_listener_fd(l), 0);
	exercise_pair(c, s);
	vmig_listener_close(l);
}
END_TEST

START_TEST(test_tcp_v6)
{
	struct vmig_listener *l;
	struct vmig_err err = { 0 };
	struct vmig_transport *c, *s;

	if (vmig_transport_listen("tcp://[::1]:0", &l, &err) < 0) {
		fprintf(stderr, "skipping the IPv6 case: %s\n", err.msg);
		return;
	}
	vmig_listener_close(l);
	l = connect_pair("tcp://[::1]:0", &c, &s);
	ck_assert_msg(strncmp(vmig_listener_uri(l), "tcp://[::1]:", 12) == 0,
		      "listener uri %s", vmig_listener_uri(l));
	exercise_pair(c, s);
	vmig_listener_close(l);
}
END_TEST

START_TEST(test_tcp_localhost_name)
{
	struct vmig_listener *l;
	struct vmig_transport *c, *s;
	struct vmig_err err = { 0 };
	char uri[64];
	const char *port;

	ck_assert_int_eq(vmig_transport_listen("tcp://127.0.0.1:0", &l, &err), 0);
	port = strrchr(vmig_listener_uri(l), ':') + 1;
	snprintf(uri, sizeof(uri), "tcp://localhost:%s", port);
	ck_assert_msg(vmig_transport_connect(uri, 2000, &c, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(vmig_transport_accept(l, 2000, &s, &err), 0);
	transfer(c, s, 65536, 9);
	vmig_transport_close(c);
	vmig_transport_close(s);
	vmig_listener_close(l);
}
END_TEST

START_TEST(test_unix)
{
	char uri[PATH_LEN + 8], path[PATH_LEN];
	struct vmig_transport *c, *s;
	struct vmig_listener *l;
	struct stat st;

	snprintf(path, sizeof(path), "%s/mig.sock", tmpdir);
	snprintf(uri, sizeof(uri), "unix:%s", path);
	l = connect_pair(uri, &c, &s);
	ck_assert_str_eq(vmig_listener_uri(l), uri);
	ck_assert_str_eq(vmig_transport_desc(s), uri);
	ck_assert_int_eq(stat(path, &st), 0);
	ck_assert_msg((st.st_mode & 0777) == 0600, "socket mode %o", st.st_mode & 0777);
	exercise_pair(c, s);
	vmig_listener_close(l);
	ck_assert_msg(stat(path, &st) < 0 && errno == ENOENT,
		      "listener_close left %s behind", path);
}
END_TEST

START_TEST(test_unix_stale_and_busy)
{
	char uri[PATH_LEN + 8], path[PATH_LEN];
	struct vmig_listener *l, *l2;
	struct vmig_err err = { 0 };
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd;

	snprintf(path, sizeof(path), "%s/stale.sock", tmpdir);
	snprintf(uri, sizeof(uri), "unix:%s", path);

	/* A socket file nobody listens on (its server died): replaced. */
	ck_assert_uint_lt(strlen(path), sizeof(sa.sun_path));
	memcpy(sa.sun_path, path, strlen(path) + 1);
	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	close(fd);
	ck_assert_msg(vmig_transport_listen(uri, &l, &err) == 0, "%s", err.msg);

	/* A live listener: a second one is refused. */
	ck_assert_int_eq(vmig_transport_listen(uri, &l2, &err), -EADDRINUSE);
	assert_err_has(&err, "cannot listen on ");
	assert_err_has(&err, path);
	assert_err_has(&err, "another process listens there");
	vmig_listener_close(l);

	/* A regular file in the way is not replaced. */
	fd = open(path, O_CREAT | O_WRONLY, 0600);
	ck_assert_int_ge(fd, 0);
	close(fd);
	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_transport_listen(uri, &l2, &err), -EEXIST);
	assert_err_has(&err, "not a socket");
}
END_TEST

START_TEST(test_connect_refused)
{
	struct vmig_listener *l;
	struct vmig_transport *c;
	struct vmig_err err = { 0 };
	char uri[64], path[PATH_LEN];
	int ret;

	/* A port that was just free: nobody listens there now. */
	ck_assert_int_eq(vmig_transport_listen("tcp://127.0.0.1:0", &l, &err), 0);
	snprintf(uri, sizeof(uri), "%s", vmig_listener_uri(l));
	vmig_listener_close(l);
	ret = vmig_transport_connect(uri, 2000, &c, &err);
	ck_assert_msg(ret == -ECONNREFUSED, "got %d: %s", ret, err.msg);
	ck_assert_ptr_null(c);
	assert_err_has(&err, "cannot connect to ");
	assert_err_has(&err, uri);
	assert_err_has(&err, "Connection refused");
	assert_err_has(&err, "is vmig incoming listening there?");

	snprintf(path, sizeof(path), "unix:%s/nobody.sock", tmpdir);
	vmig_err_clear(&err);
	ret = vmig_transport_connect(path, 2000, &c, &err);
	ck_assert_msg(ret == -ENOENT, "got %d: %s", ret, err.msg);
	assert_err_has(&err, path);

	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_transport_connect("tcp://127.0.0.1:0", 100, &c, &err), -EINVAL);
	assert_err_has(&err, "port 0");

	vmig_err_clear(&err);
	ret = vmig_transport_connect("tcp://no-such-host.invalid:1", 2000, &c, &err);
	ck_assert_int_lt(ret, 0);
	assert_err_has(&err, "cannot resolve 'no-such-host.invalid'");
}
END_TEST

START_TEST(test_listen_errors)
{
	struct vmig_listener *l, *l2;
	struct vmig_err err = { 0 };
	char uri[64];

	ck_assert_int_eq(vmig_transport_listen("file:/tmp/x", &l, &err), -EINVAL);
	assert_err_has(&err, "use vmig restore");
	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_transport_listen("fd:0", &l, &err), -EINVAL);
	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_transport_listen("nope", &l, &err), -EINVAL);

	ck_assert_int_eq(vmig_transport_listen("tcp://127.0.0.1:0", &l, &err), 0);
	snprintf(uri, sizeof(uri), "%s", vmig_listener_uri(l));
	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_transport_listen(uri, &l2, &err), -EADDRINUSE);
	assert_err_has(&err, uri);
	assert_err_has(&err, "another process listens there");
	vmig_listener_close(l);

	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_transport_listen("unix:/nonexistent-dir/x.sock", &l, &err), -ENOENT);
	assert_err_has(&err, "/nonexistent-dir/x.sock");
	vmig_listener_close(NULL);
}
END_TEST

START_TEST(test_accept_timeout)
{
	struct vmig_listener *l;
	struct vmig_transport *s;
	struct vmig_err err = { 0 };
	int ret;

	ck_assert_int_eq(vmig_transport_listen("tcp://127.0.0.1:0", &l, &err), 0);
	ret = vmig_transport_accept(l, 100, &s, &err);
	ck_assert_int_eq(ret, -ETIMEDOUT);
	ck_assert_ptr_null(s);
	assert_err_has(&err, "no connection on tcp://127.0.0.1:");
	assert_err_has(&err, "within 100 ms");
	vmig_listener_close(l);
}
END_TEST

START_TEST(test_io_timeout)
{
	struct vmig_transport *a, *b;
	int sv[2], ret;
	char buf[4096] = { 0 };

	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	ck_assert_int_eq(vmig_transport_from_fds(sv[0], sv[0], &a), 0);
	ck_assert_int_eq(vmig_transport_from_fds(sv[1], sv[1], &b), 0);
	{
		char d[32];

		snprintf(d, sizeof(d), "fd:%d", sv[0]);
		ck_assert_str_eq(vmig_transport_desc(a), d);
	}

	/* Nothing to read: -ETIMEDOUT, recorded with a message. */
	ck_assert_int_eq(vmig_transport_set_timeout(a, 100), 0);
	ret = vmig_transport_read_full(a, buf, 1);
	ck_assert_int_eq(ret, -ETIMEDOUT);
	ck_assert_int_eq(vmig_transport_err(a)->code, -ETIMEDOUT);
	ck_assert_msg(strstr(vmig_transport_err(a)->msg, "no data for 100 ms"),
		      "%s", vmig_transport_err(a)->msg);

	/* Nobody reads: writes stall and time out instead of blocking forever. */
	ck_assert_int_eq(vmig_transport_set_timeout(b, 100), 0);
	ret = 0;
	for (int i = 0; i < 100000 && ret != -ETIMEDOUT; i++)
		ret = vmig_transport_write_full(b, buf, sizeof(buf));
	ck_assert_int_eq(ret, -ETIMEDOUT);
	ck_assert_msg(strstr(vmig_transport_err(b)->msg, "could not write for 100 ms"),
		      "%s", vmig_transport_err(b)->msg);
	ck_assert_int_eq(vmig_transport_set_timeout(b, -5), -EINVAL);
	vmig_transport_close(a);
	vmig_transport_close(b);
}
END_TEST

START_TEST(test_fds_socketpair)
{
	struct vmig_transport *a, *b;
	int sv[2];

	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	ck_assert_int_eq(vmig_transport_from_fds(sv[0], sv[0], &a), 0);
	ck_assert_int_eq(vmig_transport_from_fds(sv[1], sv[1], &b), 0);
	ck_assert_str_eq(a->ops->kind, "fd");
	exercise_pair(a, b);
}
END_TEST

START_TEST(test_fds_pipes)
{
	struct vmig_transport *a, *b;
	int p1[2], p2[2], ret;
	char c = 0;

	/* a writes p1 and reads p2; b the other way round, like --stdio. */
	ck_assert_int_eq(pipe2(p1, O_CLOEXEC), 0);
	ck_assert_int_eq(pipe2(p2, O_CLOEXEC), 0);
	ck_assert_int_eq(vmig_transport_from_fds(p2[0], p1[1], &a), 0);
	ck_assert_int_eq(vmig_transport_from_fds(p1[0], p2[1], &b), 0);
	{
		char d[32];

		snprintf(d, sizeof(d), "fd:%d,%d", p2[0], p1[1]);
		ck_assert_str_eq(vmig_transport_desc(a), d);
	}
	transfer(a, b, 3u << 20, 4);
	transfer(b, a, 1u << 20, 5);

	/* Pipes with a timeout go in PIPE_BUF pieces; still all of it. */
	ck_assert_int_eq(vmig_transport_set_timeout(a, 2000), 0);
	ck_assert_int_eq(vmig_transport_set_timeout(b, 2000), 0);
	transfer(a, b, 1u << 20, 6);

	/* Closing the write end is EOF for the reader. */
	ck_assert_int_eq(vmig_transport_shutdown_write(a), 0);
	ck_assert_int_eq(vmig_transport_read_full(b, &c, 1), -EPIPE);

	/* b's reader (a) goes away: -EPIPE, and SIGPIPE does not kill us. */
	vmig_transport_close(a);
	ret = vmig_transport_write_full(b, "x", 1);
	ck_assert_int_eq(ret, -EPIPE);
	assert_err_has(vmig_transport_err(b), "the peer closed the connection");
	{
		sigset_t pending;

		sigpending(&pending);
		ck_assert_msg(!sigismember(&pending, SIGPIPE), "SIGPIPE left pending");
	}
	vmig_transport_close(b);
}
END_TEST

START_TEST(test_fds_bad)
{
	struct vmig_transport *t;
	struct vmig_err err = { 0 };
	int fd = dup(0);

	ck_assert_int_ge(fd, 0);
	close(fd);
	ck_assert_int_eq(vmig_transport_from_fds(fd, fd, &t), -EBADF);
	ck_assert_ptr_null(t);
	/* Ownership is taken even on failure: the valid one is closed. */
	fd = dup(1);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(vmig_transport_from_fds(-1, fd, &t), -EBADF);
	ck_assert_int_eq(fcntl(fd, F_GETFD), -1);

	ck_assert_int_eq(vmig_transport_connect("fd:1000000", 0, &t, &err), -EBADF);
	assert_err_has(&err, "fd:1000000");
}
END_TEST

START_TEST(test_fd_uri)
{
	struct vmig_transport *a, *b;
	struct vmig_err err = { 0 };
	char uri[32];
	int sv[2];

	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	snprintf(uri, sizeof(uri), "fd:%d", sv[0]);
	ck_assert_msg(vmig_transport_connect(uri, -1, &a, &err) == 0, "%s", err.msg);
	ck_assert_str_eq(vmig_transport_desc(a), uri);
	ck_assert_int_eq(vmig_transport_from_fds(sv[1], sv[1], &b), 0);
	transfer(a, b, 300000, 7);
	vmig_transport_close(a);
	vmig_transport_close(b);
	vmig_transport_close(NULL);
}
END_TEST

struct writev_job {
	struct vmig_transport *t;
	const struct iovec *iov;
	int n, ret;
};

static void *writev_thread(void *arg)
{
	struct writev_job *j = arg;

	j->ret = vmig_transport_writev_full(j->t, j->iov, j->n);
	return NULL;
}

START_TEST(test_writev)
{
	enum { N = 200, MAX = 2u << 20 };
	struct vmig_transport *a, *b;
	struct iovec iov[N];
	uint8_t *data = pattern(MAX, 8), *got = malloc(MAX);
	struct writev_job job;
	size_t total = 0;
	pthread_t th;
	int sv[2];

	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	ck_assert_int_eq(vmig_transport_from_fds(sv[0], sv[0], &a), 0);
	ck_assert_int_eq(vmig_transport_from_fds(sv[1], sv[1], &b), 0);
	/* Pieces of varying size, some empty, more than one batch of 64,
	 * more than the socket buffer: short writes happen. */
	for (int i = 0; i < N; i++) {
		size_t len = (i % 7 == 3) ? 0 : 1000 + (size_t)(i % 5) * 4000;

		iov[i] = (struct iovec){ data + total, len };
		total += len;
	}
	ck_assert_uint_le(total, MAX);
	job = (struct writev_job){ .t = a, .iov = iov, .n = N };
	ck_assert_int_eq(pthread_create(&th, NULL, writev_thread, &job), 0);
	ck_assert_int_eq(vmig_transport_read_full(b, got, total), 0);
	pthread_join(th, NULL);
	ck_assert_msg(job.ret == 0, "writev_full: %s", strerror(-job.ret));
	ck_assert_msg(memcmp(got, data, total) == 0, "writev data differs");
	ck_assert_uint_eq(a->bytes_written, total);
	ck_assert_uint_eq(b->bytes_read, total);
	/* The caller's array is untouched. */
	ck_assert_ptr_eq(iov[0].iov_base, data);
	ck_assert_uint_eq(iov[0].iov_len, 1000);
	vmig_transport_close(a);
	vmig_transport_close(b);
	free(data);
	free(got);
}
END_TEST

/* ------------------------------------------------------------------------
 * Files
 */

START_TEST(test_file_roundtrip)
{
	char path[PATH_LEN], uri[PATH_LEN + 8];
	struct vmig_transport *t;
	struct vmig_err err = { 0 };
	size_t len = (3u << 20) + 123;
	uint8_t *data = pattern(len, 10), *got = malloc(len);
	struct stat st;
	char c;

	snprintf(path, sizeof(path), "%s/save.vmig", tmpdir);
	ck_assert_msg(vmig_transport_open_file(path, true, &t, &err) == 0, "%s", err.msg);
	ck_assert_str_eq(t->ops->kind, "file");
	ck_assert_int_eq(vmig_transport_write_full(t, data, len / 2), 0);
	{
		struct iovec iov[2] = {
			{ data + len / 2, 1000 },
			{ data + len / 2 + 1000, len - len / 2 - 1000 },
		};

		ck_assert_int_eq(vmig_transport_writev_full(t, iov, 2), 0);
	}
	ck_assert_int_eq(vmig_transport_shutdown_write(t), 0);
	ck_assert_uint_eq(t->bytes_written, len);
	ck_assert_int_eq(vmig_transport_set_timeout(t, 100), -EOPNOTSUPP);
	vmig_transport_close(t);

	ck_assert_int_eq(stat(path, &st), 0);
	ck_assert_msg((st.st_mode & 0777) == 0600, "file mode %o", st.st_mode & 0777);
	ck_assert_uint_eq((uint64_t)st.st_size, len);

	ck_assert_int_eq(vmig_transport_open_file(path, false, &t, &err), 0);
	ck_assert_int_eq(vmig_transport_read_full(t, got, len), 0);
	ck_assert_msg(memcmp(got, data, len) == 0, "file data differs");
	ck_assert_int_eq(vmig_transport_read_full(t, &c, 1), -EPIPE);
	/* Opened for reading: writing is refused with a message. */
	ck_assert_int_eq(vmig_transport_write_full(t, "x", 1), -EBADF);
	assert_err_has(vmig_transport_err(t), path);
	vmig_transport_close(t);

	/* file: URIs connect for writing (a save). */
	snprintf(uri, sizeof(uri), "file:%s", path);
	ck_assert_int_eq(vmig_transport_connect(uri, -1, &t, &err), 0);
	ck_assert_int_eq(vmig_transport_write_full(t, "abc", 3), 0);
	ck_assert_int_eq(vmig_transport_shutdown_write(t), 0);
	vmig_transport_close(t);
	ck_assert_int_eq(stat(path, &st), 0);
	ck_assert_uint_eq((uint64_t)st.st_size, 3);
	free(data);
	free(got);
}
END_TEST

START_TEST(test_file_dev_full)
{
	struct vmig_transport *t;
	struct vmig_err err = { 0 };
	char buf[8192] = { 1 };
	int ret;

	if (access("/dev/full", W_OK) < 0) {
		fprintf(stderr, "skipping: /dev/full: %s\n", strerror(errno));
		return;
	}
	ck_assert_msg(vmig_transport_open_file("/dev/full", true, &t, &err) == 0, "%s", err.msg);
	ret = vmig_transport_write_full(t, buf, sizeof(buf));
	ck_assert_int_eq(ret, -ENOSPC);
	ck_assert_int_eq(vmig_transport_err(t)->code, -ENOSPC);
	assert_err_has(vmig_transport_err(t), "file:/dev/full");
	assert_err_has(vmig_transport_err(t), "no space left on device");
	assert_err_has(vmig_transport_err(t), "file system is full");
	vmig_transport_close(t);
}
END_TEST

START_TEST(test_file_open_errors)
{
	struct vmig_transport *t;
	struct vmig_err err = { 0 };

	ck_assert_int_eq(vmig_transport_open_file("/nonexistent-dir/x", true, &t, &err), -ENOENT);
	assert_err_has(&err, "cannot create /nonexistent-dir/x");
	assert_err_has(&err, "does the directory exist?");
	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_transport_open_file("/nonexistent-file", false, &t, &err), -ENOENT);
	assert_err_has(&err, "cannot open /nonexistent-file");
	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_transport_open_file(tmpdir, false, &t, &err), -EISDIR);
	assert_err_has(&err, "is a directory");
	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_transport_open_file("", false, &t, &err), -EINVAL);
}
END_TEST

static Suite *transport_suite(void)
{
	Suite *s = suite_create("transport");
	TCase *tc;

	tc = tcase_create("uri");
	tcase_add_test(tc, test_uri_good);
	tcase_add_test(tc, test_uri_bad);
	tcase_add_test(tc, test_uri_unix_too_long);
	suite_add_tcase(s, tc);

	tc = tcase_create("sockets");
	tcase_add_checked_fixture(tc, tmpdir_setup, tmpdir_teardown);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_tcp_v4);
	tcase_add_test(tc, test_tcp_v6);
	tcase_add_test(tc, test_tcp_localhost_name);
	tcase_add_test(tc, test_unix);
	tcase_add_test(tc, test_unix_stale_and_busy);
	tcase_add_test(tc, test_connect_refused);
	tcase_add_test(tc, test_listen_errors);
	tcase_add_test(tc, test_accept_timeout);
	tcase_add_test(tc, test_io_timeout);
	tcase_add_test(tc, test_fds_socketpair);
	tcase_add_test(tc, test_fds_pipes);
	tcase_add_test(tc, test_fds_bad);
	tcase_add_test(tc, test_fd_uri);
	tcase_add_test(tc, test_writev);
	suite_add_tcase(s, tc);

	tc = tcase_create("file");
	tcase_add_checked_fixture(tc, tmpdir_setup, tmpdir_teardown);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_file_roundtrip);
	tcase_add_test(tc, test_file_dev_full);
	tcase_add_test(tc, test_file_open_errors);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(transport_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
