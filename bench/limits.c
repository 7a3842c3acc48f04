/*
 * The machine's limits that bound a migration on one host, measured the
 * same way every time so that bench/migrate can put its figures next to
 * them: memcpy between warm buffers, the first touch of fresh ("cold")
 * anonymous memory, and one loopback TCP stream.  Prints one JSON object.
 *
 * Usage: migrate-limits [--size MIB] [--tcp-mib MIB]
 *
 * The TCP figure is what one sender thread and one receiver thread move
 * through 127.0.0.1 with 1 MiB writes and reads: the ceiling of a
 * single-stream migration, before any page handling.  Each figure is the
 * best of a few rounds (a shared machine only ever makes things slower).
 */
#include "config.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MIB        ((size_t)1 << 20)
#define CHUNK      (1u << 20)
#define ROUNDS     3

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void *map_fresh(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return p == MAP_FAILED ? NULL : p;
}

/* GB/s of memcpy between two warm buffers of @len bytes. */
static double memcpy_rate(size_t len)
{
	char *a = map_fresh(len), *b = map_fresh(len);
	double best = 0, t;
	int r;

	if (!a || !b)
		return -1;
	memset(a, 0x5a, len);
	memset(b, 0xa5, len);
	for (r = 0; r < ROUNDS; r++) {
		t = now_s();
		memcpy(b, a, len);
		__asm__ __volatile__("" : : "r"(b) : "memory");
		t = now_s() - t;
		if (t > 0 && len / t / 1e9 > best)
			best = len / t / 1e9;
	}
	munmap(a, len);
	munmap(b, len);
	return best;
}

/* GB/s of the first write to fresh anonymous memory (page faults included). */
static double cold_touch_rate(size_t len)
{
	double best = 0, t;
	char *a;
	int r;

	for (r = 0; r < ROUNDS; r++) {
		a = map_fresh(len);
		if (!a)
			return -1;
		t = now_s();
		memset(a, 1, len);
		__asm__ __volatile__("" : : "r"(a) : "memory");
		t = now_s() - t;
		munmap(a, len);
		if (t > 0 && len / t / 1e9 > best)
			best = len / t / 1e9;
	}
	return best;
}

struct sender {
	int fd;
	size_t total;
	int err;
};

static void *send_main(void *arg)
{
	struct sender *s = arg;
	char *buf = malloc(CHUNK);
	size_t left = s->total;
	ssize_t n;

	if (!buf) {
		s->err = ENOMEM;
		return NULL;
	}
	memset(buf, 0x3c, CHUNK);
	while (left) {
		n = send(s->fd, buf, left < CHUNK ? left : CHUNK, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			s->err = n < 0 ? errno : EPIPE;
			break;
		}
		left -= (size_t)n;
	}
	shutdown(s->fd, SHUT_WR);
	free(buf);
	return NULL;
}

/* GB/s through one loopback TCP connection, measured at the receiver. */
static double tcp_rate(size_t total)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	socklen_t salen = sizeof(sa);
	int lfd = -1, cfd = -1, afd = -1, one = 1;
	struct sender snd = { 0 };
	pthread_t th;
	size_t got = 0;
	double t, rate = -1;
	char *buf = NULL;
	ssize_t n;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    listen(lfd, 1) < 0 || getsockname(lfd, (struct sockaddr *)&sa, &salen) < 0)
		goto out;
	cfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (cfd < 0 || connect(cfd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		goto out;
	afd = accept(lfd, NULL, NULL);
	buf = malloc(CHUNK);
	if (afd < 0 || !buf)
		goto out;
	setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	snd.fd = cfd;
	snd.total = total;
	t = now_s();
	if (pthread_create(&th, NULL, send_main, &snd))
		goto out;
	for (;;) {
		n = recv(afd, buf, CHUNK, MSG_WAITALL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got += (size_t)n;
	}
	t = now_s() - t;
	pthread_join(th, NULL);
	if (!snd.err && got == total && t > 0)
		rate = total / t / 1e9;
out:
	free(buf);
	if (afd >= 0)
		close(afd);
	if (cfd >= 0)
		close(cfd);
	if (lfd >= 0)
		close(lfd);
	return rate;
}

int main(int argc, char **argv)
{
	size_t size = 256 * MIB, tcp = 2048 * MIB;
	double best_tcp = -1, r;
	int i;

	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--size") && i + 1 < argc) {
			size = strtoull(argv[++i], NULL, 10) * MIB;
		} else if (!strcmp(argv[i], "--tcp-mib") && i + 1 < argc) {
			tcp = strtoull(argv[++i], NULL, 10) * MIB;
		} else {
			fprintf(stderr, "usage: %s [--size MIB] [--tcp-mib MIB]\n", argv[0]);
			return 2;
		}
	}
	if (!size || !tcp) {
		fprintf(stderr, "%s: sizes must be at least 1 MiB\n", argv[0]);
		return 2;
	}
	for (i = 0; i < ROUNDS; i++) {
		r = tcp_rate(tcp);
		if (r > best_tcp)
			best_tcp = r;
	}
	printf("{\"memcpy_gbps\":%.2f,\"cold_touch_gbps\":%.2f,\"loopback_tcp_gbps\":%.2f,"
	       "\"buffer_mib\":%zu,\"tcp_mib\":%zu,\"rounds\":%d}\n",
	       memcpy_rate(size), cold_touch_rate(size), best_tcp,
	       size / MIB, tcp / MIB, ROUNDS);
	return 0;
}
