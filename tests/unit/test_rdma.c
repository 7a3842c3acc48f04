/*
 * Unit tests for the RDMA transport (transport/rdma.c).
 *
 * Everywhere: rdma:// URI parsing and formatting, the errors for port 0,
 * for a host without an RDMA device (naming the cause and what to load),
 * or for a vmig built without --with-rdma, and -EOPNOTSUPP from the
 * direct placement calls on other transports.
 *
 * With an RDMA device (a NIC, or soft-RoCE: see docs/rdma.md), also the
 * real thing over a loopback connection: the byte stream both ways at
 * once with end of stream, direct placement of "guest memory" with the
 * ordering and fence rules, a declined placement, read timeouts and a
 * peer that dies.  Without a device those cases are not run, and the
 * binary says so with the reason.  VMIG_TEST_RDMA_ADDR names the address
 * to use (default 127.0.0.1; with rdma_rxe on an interface, its address).
 */
#define _GNU_SOURCE 1

#include "config.h"

#include <check.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#ifdef HAVE_RDMA
#include <infiniband/verbs.h>
#endif

#include "vmig/transport.h"

#define assert_err_has(e, s) \
	ck_assert_msg(strstr((e)->msg, (s)), "message \"%s\" lacks \"%s\"", (e)->msg, (s))

/* ------------------------------------------------------------------------
 * URIs
 */

START_TEST(test_uri_good)
{
	static const struct {
		const char *in, *host, *canon;
		unsigned int port;
	} cases[] = {
		{ "rdma://127.0.0.1:4444", "127.0.0.1", "rdma://127.0.0.1:4444", 4444 },
		{ "rdma://[::1]:4444", "::1", "rdma://[::1]:4444", 4444 },
		{ "rdma://[fe80::1%eth0]:1", "fe80::1%eth0", "rdma://[fe80::1%eth0]:1", 1 },
		{ "rdma://node-7.fabric.example:65535", "node-7.fabric.example",
		  "rdma://node-7.fabric.example:65535", 65535 },
		{ "RDMA://Host:9", "Host", "rdma://Host:9", 9 },
		{ "rdma://0.0.0.0:0", "0.0.0.0", "rdma://0.0.0.0:0", 0 },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct vmig_uri u;
		struct vmig_err err = { 0 };
		char buf[300];

		ck_assert_msg(vmig_transport_parse_uri(cases[i].in, &u, &err) == 0,
			      "'%s': %s", cases[i].in, err.msg);
		ck_assert_int_eq(u.kind, VMIG_URI_RDMA);
		ck_assert_str_eq(u.host, cases[i].host);
		ck_assert_uint_eq(u.port, cases[i].port);
		ck_assert_int_eq(vmig_uri_format(&u, buf, sizeof(buf)), 0);
		ck_assert_str_eq(buf, cases[i].canon);
	}
}
END_TEST

START_TEST(test_uri_bad)
{
	static const struct {
		const char *in;
		const char *msg;
	} cases[] = {
		{ "rdma:host:1", "bad address 'rdma:host:1' (expected rdma://HOST:PORT)" },
		{ "rdma://", "missing port in 'rdma://' (expected rdma://HOST:PORT)" },
		{ "rdma://host", "missing port in 'rdma://host' (expected rdma://HOST:PORT)" },
		{ "rdma://host:", "missing port" },
		{ "rdma://host:65536", "port 65536 in 'rdma://host:65536' is out of range" },
		{ "rdma://host:x", "bad port 'x'" },
		{ "rdma://host:1/x", "bad port '1/x'" },
		{ "rdma://::1:4444", "brackets, as in rdma://[::1]:4444" },
		{ "rdma://[::1:4444", "missing ']'" },
		{ "rdma://[::1]", "missing port in 'rdma://[::1]' (expected rdma://[ADDRESS]:PORT)" },
		{ "rdma://:4444", "missing host in 'rdma://:4444' (expected rdma://HOST:PORT" },
		{ "rdma://a b:1", "bad character" },
		{ "rdma://u@h:1", "bad character" },
		{ "rdmax://h:1", "unsupported URI scheme 'rdmax'" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct vmig_uri u;
		struct vmig_err err = { 0 };
		int ret = vmig_transport_parse_uri(cases[i].in, &u, &err);

		ck_assert_msg(ret == -EINVAL, "'%s': got %d (%s)", cases[i].in, ret, err.msg);
		ck_assert_int_eq(err.code, ret);
		assert_err_has(&err, cases[i].msg);
	}
}
END_TEST

START_TEST(test_connect_port_zero)
{
	struct vmig_transport *t = (void *)1;
	struct vmig_err err = { 0 };

	ck_assert_int_eq(vmig_transport_connect("rdma://127.0.0.1:0", 1000, &t, &err), -EINVAL);
	ck_assert_ptr_null(t);
	assert_err_has(&err, "cannot connect to port 0 in 'rdma://127.0.0.1:0'");
}
END_TEST

/* ------------------------------------------------------------------------
 * Without a device, or without RDMA support built in
 */

static bool have_device(char *why, size_t len)
{
	struct vmig_err err = { 0 };

	if (vmig_transport_rdma_check(&err) == 0)
		return true;
	snprintf(why, len, "%.240s", err.msg);   /* a SKIP line */
	return false;
}

START_TEST(test_no_device_or_support)
{
	static const char *const uris[] = {
		"rdma://127.0.0.1:4444", "rdma://[::1]:4444", "rdma://localhost:4444",
	};
	char why[256];

	if (have_device(why, sizeof(why)))
		return;   /* the device cases below cover this host */
	for (size_t i = 0; i < sizeof(uris) / sizeof(uris[0]); i++) {
		struct vmig_transport *t = (void *)1;
		struct vmig_listener *l = (void *)1;
		struct vmig_err err = { 0 };
		char want[300];

		ck_assert_int_ne(vmig_transport_connect(uris[i], 2000, &t, &err), 0);
		ck_assert_ptr_null(t);
		snprintf(want, sizeof(want), "cannot connect to %s: ", uris[i]);
		assert_err_has(&err, want);
#ifdef HAVE_RDMA
		ck_assert_int_eq(err.code, -ENODEV);
		assert_err_has(&err, "no RDMA device (ibv_get_device_list found none");
		assert_err_has(&err, "modprobe rdma_rxe; rdma link add rxe0 type rxe netdev");
#else
		ck_assert_int_eq(err.code, -EPROTONOSUPPORT);
		assert_err_has(&err, "vmig was built without RDMA support (configure --with-rdma)");
#endif
		vmig_err_clear(&err);
		ck_assert_int_ne(vmig_transport_listen(uris[i], &l, &err), 0);
		ck_assert_ptr_null(l);
		snprintf(want, sizeof(want), "cannot listen on %s: ", uris[i]);
		assert_err_has(&err, want);
#ifdef HAVE_RDMA
		ck_assert_int_eq(err.code, -ENODEV);
		assert_err_has(&err, "no RDMA device (ibv_get_device_list found none");
#else
		ck_assert_int_eq(err.code, -EPROTONOSUPPORT);
		assert_err_has(&err, "vmig was built without RDMA support (configure --with-rdma)");
#endif
	}
}
END_TEST

/* Direct placement is RDMA only; the others say so and change nothing. */
START_TEST(test_mem_ops_unsupported)
{
	struct vmig_transport *t;
	int sv[2];
	char page[4096] __attribute__((aligned(4096))) = { 0 };

	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	ck_assert_int_eq(vmig_transport_from_fds(sv[0], sv[0], &t), 0);
	ck_assert_int_eq(vmig_transport_expose_memory(t, page, sizeof(page), 0), -EOPNOTSUPP);
	ck_assert_int_eq(vmig_transport_expose_done(t, 0), -EOPNOTSUPP);
	ck_assert_int_eq(vmig_transport_unexpose_memory(t), -EOPNOTSUPP);
	ck_assert_int_eq(vmig_transport_peer_memory(t, 0), -EOPNOTSUPP);
	ck_assert_int_eq(vmig_transport_write_mem(t, 0, page, sizeof(page)), -EOPNOTSUPP);
	ck_assert_int_eq(vmig_transport_mem_fence(t), -EOPNOTSUPP);
	ck_assert_uint_eq(t->bytes_written, 0);
	vmig_transport_close(t);
	close(sv[1]);
}
END_TEST

/* ------------------------------------------------------------------------
 * With a device: a real connection over loopback
 */

#ifdef HAVE_RDMA
static char addr_uri[300];

static const char *test_addr(void)
{
	const char *a = getenv("VMIG_TEST_RDMA_ADDR");

	return a && *a ? a : "127.0.0.1";
}

static uint8_t *pattern(size_t len, uint64_t seed)
{
	uint8_t *p = malloc(len);
	uint64_t x = seed | 1;

	ck_assert(p);
	for (size_t i = 0; i < len; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		p[i] = (uint8_t)x;
	}
	return p;
}

/* A connected pair: *c connected to *a, accepted from a listener. */
struct pair_arg {
	const char *uri;
	struct vmig_transport *t;
	struct vmig_err err;
	int ret;
};

static void *connect_thread(void *p)
{
	struct pair_arg *a = p;

	a->ret = vmig_transport_connect(a->uri, 10000, &a->t, &a->err);
	return NULL;
}

static void make_pair(struct vmig_transport **c, struct vmig_transport **a)
{
	struct vmig_listener *l;
	struct vmig_err err = { 0 };
	struct pair_arg pa = { 0 };
	pthread_t th;

	snprintf(addr_uri, sizeof(addr_uri), strchr(test_addr(), ':') ? "rdma://[%s]:0" :
		 "rdma://%s:0", test_addr());
	ck_assert_msg(vmig_transport_listen(addr_uri, &l, &err) == 0, "%s", err.msg);
	ck_assert_ptr_nonnull(strstr(vmig_listener_uri(l), "rdma://"));
	ck_assert_ptr_null(strstr(vmig_listener_uri(l), ":0"));
	ck_assert_int_ge(vmig_listener_fd(l), 0);
	pa.uri = vmig_listener_uri(l);
	ck_assert_int_eq(pthread_create(&th, NULL, connect_thread, &pa), 0);
	ck_assert_msg(vmig_transport_accept(l, 10000, a, &err) == 0, "%s", err.msg);
	pthread_join(th, NULL);
	ck_assert_msg(pa.ret == 0, "%s", pa.err.msg);
	*c = pa.t;
	vmig_listener_close(l);
	vmig_transport_set_timeout(*c, 10000);
	vmig_transport_set_timeout(*a, 10000);
}

struct xfer {
	struct vmig_transport *t;
	const uint8_t *data;
	size_t len;
	int ret;
};

/* Writes of every size from 1 byte to 1 MiB, then the end of stream. */
static void *writer(void *p)
{
	struct xfer *x = p;
	size_t off = 0, step = 1;

	while (off < x->len) {
		size_t n = step < x->len - off ? step : x->len - off;

		x->ret = vmig_transport_write_full(x->t, x->data + off, n);
		if (x->ret)
			return NULL;
		off += n;
		step = step >= (1u << 20) ? 1 : step * 3 + 1;
	}
	x->ret = vmig_transport_shutdown_write(x->t);
	return NULL;
}

/* Read to the end of stream, check every byte. */
static void read_and_check(struct vmig_transport *t, const uint8_t *want, size_t len)
{
	uint8_t *buf = malloc(1u << 20);
	size_t off = 0;

	ck_assert(buf);
	for (;;) {
		ssize_t n = vmig_transport_read(t, buf, 1u << 20);

		ck_assert_msg(n >= 0, "read at %zu: %zd (%s)", off, n,
			      vmig_transport_err(t)->msg);
		if (n == 0)
			break;
		ck_assert_msg(off + (size_t)n <= len, "%zu bytes past the end", off + n - len);
		ck_assert_msg(!memcmp(buf, want + off, (size_t)n), "data differs in [%zu, %zu)",
			      off, off + (size_t)n);
		off += (size_t)n;
	}
	ck_assert_uint_eq(off, len);
	free(buf);
}

START_TEST(test_stream_both_ways)
{
	struct vmig_transport *c, *a;
	size_t big = 48u << 20, small = 3u << 20;
	uint8_t *d1 = pattern(big, 1), *d2 = pattern(small, 2);
	struct xfer x1, x2;
	pthread_t t1, t2;

	make_pair(&c, &a);
	ck_assert_str_eq(c->ops->kind, "rdma");
	x1 = (struct xfer){ .t = c, .data = d1, .len = big };
	x2 = (struct xfer){ .t = a, .data = d2, .len = small };
	/* Each side writes from one thread and reads from another at once. */
	ck_assert_int_eq(pthread_create(&t1, NULL, writer, &x1), 0);
	ck_assert_int_eq(pthread_create(&t2, NULL, writer, &x2), 0);
	read_and_check(a, d1, big);
	read_and_check(c, d2, small);
	pthread_join(t1, NULL);
	pthread_join(t2, NULL);
	ck_assert_msg(x1.ret == 0, "%s", vmig_transport_err(c)->msg);
	ck_assert_msg(x2.ret == 0, "%s", vmig_transport_err(a)->msg);
	ck_assert_uint_eq(c->bytes_written, big);
	ck_assert_uint_eq(a->bytes_read, big);
	vmig_transport_close(c);
	vmig_transport_close(a);
	free(d1);
	free(d2);
}
END_TEST

START_TEST(test_read_timeout_and_fd)
{
	struct vmig_transport *c, *a;
	struct pollfd p;
	char b = 0;

	make_pair(&c, &a);
	vmig_transport_set_timeout(a, 200);
	ck_assert_int_eq(vmig_transport_read(a, &b, 1), -ETIMEDOUT);
	assert_err_has(vmig_transport_err(a), "no data for 200 ms");
	p = (struct pollfd){ .fd = vmig_transport_fd(a), .events = POLLIN };
	ck_assert_int_eq(poll(&p, 1, 0), 0);
	ck_assert_int_eq(vmig_transport_write_full(c, "x", 1), 0);
	/* The fd tells once the byte is in (the fd call takes it in). */
	for (int i = 0; i < 100; i++) {
		p.fd = vmig_transport_fd(a);
		if (poll(&p, 1, 0) == 1)
			break;
		usleep(10000);
	}
	ck_assert_int_eq(poll(&p, 1, 0), 1);
	ck_assert_int_eq(vmig_transport_read(a, &b, 1), 1);
	ck_assert_int_eq(b, 'x');
	vmig_transport_close(c);
	vmig_transport_close(a);
}
END_TEST

#define REGION_A (1u << 20)
#define REGION_B (2u << 20)
#define GPA_B    0x100000000ull

START_TEST(test_direct_placement)
{
	struct vmig_transport *src, *dst;
	uint8_t *ra, *rb, *pa = pattern(REGION_A, 3), *pb = pattern(REGION_B, 4);
	uint8_t page[4096];
	char rec[8] = { 0 };

	make_pair(&src, &dst);
	ra = mmap(NULL, REGION_A, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	rb = mmap(NULL, REGION_B, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	ck_assert(ra != MAP_FAILED && rb != MAP_FAILED);

	/* Destination: expose both regions, then say the list is complete. */
	ck_assert_int_eq(vmig_transport_expose_memory(dst, ra + 1, 4096, 0), -EINVAL);
	ck_assert_msg(vmig_transport_expose_memory(dst, ra, REGION_A, 0) == 0, "%s",
		      vmig_transport_err(dst)->msg);
	ck_assert_msg(vmig_transport_expose_memory(dst, rb, REGION_B, GPA_B) == 0, "%s",
		      vmig_transport_err(dst)->msg);
	ck_assert_int_eq(vmig_transport_expose_done(dst, 0), 0);

	/* Source: wait for the answer, then write pages straight in. */
	ck_assert_msg(vmig_transport_peer_memory(src, 5000) == 0, "%s",
		      vmig_transport_err(src)->msg);
	ck_assert_int_eq(vmig_transport_write_mem(src, 0, pa, REGION_A), 0);
	/* Page by page into B, and a later copy of page 5 that must win. */
	for (size_t off = 0; off < REGION_B; off += 4096)
		ck_assert_int_eq(vmig_transport_write_mem(src, GPA_B + off, pb + off, 4096), 0);
	memset(page, 0xa5, sizeof(page));
	ck_assert_int_eq(vmig_transport_write_mem(src, GPA_B + 5 * 4096, page, 4096), 0);
	memset(pb + 5 * 4096, 0xa5, 4096);
	ck_assert_uint_eq(src->bytes_written, REGION_A + REGION_B + 4096);
	/* Outside: refused, nothing sent. */
	ck_assert_int_eq(vmig_transport_write_mem(src, REGION_A - 4096, page, 8192), -ERANGE);
	ck_assert_int_eq(vmig_transport_write_mem(src, GPA_B + REGION_B, page, 4096), -ERANGE);

	/* The fence, then a "barrier record" on the stream. */
	ck_assert_int_eq(vmig_transport_mem_fence(src), 0);
	ck_assert_int_eq(vmig_transport_write_full(src, "ITER_END", 8), 0);
	ck_assert_int_eq(vmig_transport_read_full(dst, rec, 8), 0);
	ck_assert(!memcmp(rec, "ITER_END", 8));
	for (size_t off = 0; off < REGION_A; off += 4096)
		ck_assert_msg(!memcmp(ra + off, pa + off, 4096), "region A page %zu differs",
			      off / 4096);
	for (size_t off = 0; off < REGION_B; off += 4096)
		ck_assert_msg(!memcmp(rb + off, pb + off, 4096), "region B page %zu differs",
			      off / 4096);

	/* After unexpose, a write is a remote access error: the link dies. */
	ck_assert_int_eq(vmig_transport_unexpose_memory(dst), 0);
	ck_assert_int_eq(vmig_transport_write_mem(src, 0, page, 4096), 0);
	ck_assert_int_eq(vmig_transport_mem_fence(src), -ECONNRESET);
	assert_err_has(vmig_transport_err(src), "guest memory write failed");

	vmig_transport_close(src);
	vmig_transport_close(dst);
	munmap(ra, REGION_A);
	munmap(rb, REGION_B);
	free(pa);
	free(pb);
}
END_TEST

START_TEST(test_direct_placement_declined)
{
	struct vmig_transport *src, *dst;
	uint8_t page[4096] = { 0 };

	make_pair(&src, &dst);
	ck_assert_int_eq(vmig_transport_expose_done(dst, -ENOMEM), 0);
	ck_assert_int_eq(vmig_transport_peer_memory(src, 5000), -EOPNOTSUPP);
	ck_assert_int_eq(vmig_transport_write_mem(src, 0, page, 4096), -EOPNOTSUPP);
	/* The stream is unharmed. */
	ck_assert_int_eq(vmig_transport_write_full(src, "ok", 2), 0);
	ck_assert_int_eq(vmig_transport_read_full(dst, page, 2), 0);
	ck_assert(!memcmp(page, "ok", 2));
	vmig_transport_close(src);
	vmig_transport_close(dst);
}
END_TEST

/* The peer process dies: what it sent is still read, then -ECONNRESET. */
START_TEST(test_dead_peer)
{
	struct vmig_listener *l;
	struct vmig_transport *a;
	struct vmig_err err = { 0 };
	char buf[16];
	pid_t child;
	int status;

	snprintf(addr_uri, sizeof(addr_uri), strchr(test_addr(), ':') ? "rdma://[%s]:0" :
		 "rdma://%s:0", test_addr());
	ck_assert_msg(vmig_transport_listen(addr_uri, &l, &err) == 0, "%s", err.msg);
	/* A process of its own (verbs contexts do not survive a fork). */
	child = fork();
	ck_assert_int_ge(child, 0);
	if (child == 0) {
		execl("/proc/self/exe", "test_rdma", "--peer-dies", vmig_listener_uri(l),
		      (char *)NULL);
		_exit(127);
	}
	ck_assert_msg(vmig_transport_accept(l, 10000, &a, &err) == 0, "%s", err.msg);
	vmig_transport_set_timeout(a, 20000);
	ck_assert_int_eq(vmig_transport_read_full(a, buf, 10), 0);
	ck_assert(!memcmp(buf, "last words", 10));
	ck_assert_int_eq(vmig_transport_read(a, buf, 1), -ECONNRESET);
	assert_err_has(vmig_transport_err(a), "disconnected");
	ck_assert_int_eq(vmig_transport_write_full(a, "x", 1), -ECONNRESET);
	ck_assert_int_eq(waitpid(child, &status, 0), child);
	ck_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
	vmig_transport_close(a);
	vmig_listener_close(l);
}
END_TEST

START_TEST(test_connect_nobody_listening)
{
	struct vmig_transport *t;
	struct vmig_err err = { 0 };
	char uri[300];

	/* A port nobody listens on: rejected, with the usual hint. */
	snprintf(uri, sizeof(uri), strchr(test_addr(), ':') ? "rdma://[%s]:9" : "rdma://%s:9",
		 test_addr());
	ck_assert_int_ne(vmig_transport_connect(uri, 5000, &t, &err), 0);
	assert_err_has(&err, "cannot connect to rdma://");
	ck_assert_msg(err.code == -ECONNREFUSED || err.code == -EHOSTUNREACH ||
		      err.code == -ETIMEDOUT, "%d: %s", err.code, err.msg);
}
END_TEST
#endif /* HAVE_RDMA */

static Suite *rdma_suite(bool device)
{
	Suite *s = suite_create("rdma");
	TCase *tc = tcase_create("no device needed");

	tcase_add_test(tc, test_uri_good);
	tcase_add_test(tc, test_uri_bad);
	tcase_add_test(tc, test_connect_port_zero);
	tcase_add_test(tc, test_no_device_or_support);
	tcase_add_test(tc, test_mem_ops_unsupported);
	suite_add_tcase(s, tc);
#ifdef HAVE_RDMA
	if (device) {
		tc = tcase_create("device");
		tcase_set_timeout(tc, 60);
		tcase_add_test(tc, test_stream_both_ways);
		tcase_add_test(tc, test_read_timeout_and_fd);
		tcase_add_test(tc, test_direct_placement);
		tcase_add_test(tc, test_direct_placement_declined);
		tcase_add_test(tc, test_dead_peer);
		tcase_add_test(tc, test_connect_nobody_listening);
		suite_add_tcase(s, tc);
	}
#endif
	return s;
}

#ifdef HAVE_RDMA
/* test_dead_peer's peer: connect, write, let it arrive, die unannounced. */
static int peer_dies(const char *uri)
{
	struct vmig_transport *c;
	struct vmig_err err = { 0 };

	if (vmig_transport_connect(uri, 10000, &c, &err) ||
	    vmig_transport_write_full(c, "last words", 10)) {
		fprintf(stderr, "peer: %s\n", err.msg[0] ? err.msg : vmig_transport_err(c)->msg);
		return 1;
	}
	sleep(1);
	kill(getpid(), SIGKILL);
	return 2;
}
#endif

int main(int argc, char **argv)
{
	char why[256];
	bool device;
	SRunner *sr;
	int failed;

#ifdef HAVE_RDMA
	if (argc == 3 && !strcmp(argv[1], "--peer-dies"))
		return peer_dies(argv[2]);
#endif
	device = have_device(why, sizeof(why));
	sr = srunner_create(rdma_suite(device));

	if (!device)
		printf("SKIP: the RDMA device cases (stream, direct placement, dead peer): %s "
		       "(see docs/rdma.md to run them with rdma_rxe)\n", why);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
