/*
 * Unit tests for util/: sizes and durations, bitmaps, the control protocol
 * (over real socketpairs and unix sockets in a temporary directory), the
 * run directory, VM names, error contexts and logging.  No KVM needed.
 */
#define _GNU_SOURCE 1

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <json-c/json.h>

#include "vmig/util.h"

/* ------------------------------------------------------------------------
 * Helpers
 */

/* xorshift64*: deterministic random data, independent of libc's rand(). */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545f4914f6cdd1dull;
}

/* Uniform-ish value in [0, n]. */
static uint64_t rng_upto(uint64_t n)
{
	return n == UINT64_MAX ? rng() : rng() % (n + 1);
}

static int send_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);

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

static void send_str(int fd, const char *s)
{
	int err = send_all(fd, s, strlen(s));

	ck_assert_msg(err == 0, "send \"%s\": %s", s, strerror(-err));
}

static void make_socketpair(int sv[2])
{
	ck_assert_msg(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0,
				 sv) == 0, "socketpair: %s", strerror(errno));
}

static void set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	ck_assert_int_ge(fl, 0);
	ck_assert_int_eq(fcntl(fd, F_SETFL, fl | O_NONBLOCK), 0);
}

static const char *get_str(struct json_object *o, const char *key)
{
	struct json_object *v;

	if (!json_object_object_get_ex(o, key, &v))
		return NULL;
	return json_object_get_string(v);
}

static int64_t get_int(struct json_object *o, const char *key)
{
	struct json_object *v;

	if (!json_object_object_get_ex(o, key, &v))
		return INT64_MIN;
	return json_object_get_int64(v);
}

/* Receive one message and check that @key holds string @want. */
static void recv_expect_str(struct vmig_ctl_reader *r, const char *key,
			    const char *want)
{
	struct json_object *o = NULL;
	int err = vmig_ctl_recv(r, &o);

	ck_assert_msg(err == 0, "recv: %d (%s), expected %s=%s", err,
		      strerror(-err), key, want);
	ck_assert_ptr_nonnull(o);
	ck_assert_msg(get_str(o, key) && !strcmp(get_str(o, key), want),
		      "%s: got %s, expected %s", key,
		      json_object_to_json_string(o), want);
	json_object_put(o);
}

static void recv_expect_int(struct vmig_ctl_reader *r, const char *key,
			    int64_t want)
{
	struct json_object *o = NULL;
	int err = vmig_ctl_recv(r, &o);

	ck_assert_msg(err == 0, "recv: %d (%s), expected %s=%lld", err,
		      strerror(-err), key, (long long)want);
	ck_assert_msg(get_int(o, key) == want, "%s: got %s, expected %lld",
		      key, json_object_to_json_string(o), (long long)want);
	json_object_put(o);
}

static void recv_expect_err(struct vmig_ctl_reader *r, int want)
{
	struct json_object *o = NULL;
	int err = vmig_ctl_recv(r, &o);

	ck_assert_msg(err == want, "recv: got %d (%s), expected %d (%s)",
		      err, strerror(-err), want, strerror(-want));
	ck_assert_ptr_null(o);
}

static char *make_tmpdir(void)
{
	char tmpl[] = "/tmp/vmig-test-XXXXXX";
	char *dir = mkdtemp(tmpl);

	ck_assert_msg(dir != NULL, "mkdtemp: %s", strerror(errno));
	return strdup(dir);
}

/* ------------------------------------------------------------------------
 * Sizes and durations
 */

START_TEST(test_size_parse_good)
{
	static const struct {
		const char *in;
		uint64_t want;
	} cases[] = {
		{ "0", 0 },
		{ "512", 512 },
		{ "007", 7 },
		{ "4K", 4096 },
		{ "4k", 4096 },
		{ "64M", 64ull << 20 },
		{ "1G", 1ull << 30 },
		{ "1T", 1ull << 40 },
		{ "1P", 1ull << 50 },
		{ "15E", 15ull << 60 },
		{ "1.5G", 3ull << 29 },
		{ "1.25m", 1310720 },
		{ "0.5K", 512 },
		{ "0.1K", 102 },                /* truncated to whole bytes */
		{ "4KiB", 4096 },
		{ "4kib", 4096 },
		{ "4KIB", 4096 },
		{ "2MB", 2ull << 20 },
		{ "2mb", 2ull << 20 },
		{ "512B", 512 },
		{ "512 B", 512 },
		{ "4.0 KiB", 4096 },            /* vmig_size_format() output */
		{ "1.5 GiB", 3ull << 29 },
		{ "1.000000000000000000000001G", 1ull << 30 },
		{ "15.5E", (15ull << 60) + (1ull << 59) },
		{ "18446744073709551615", UINT64_MAX },
		{ "17179869183G", 17179869183ull << 30 },
	};
	size_t i;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		uint64_t v = 12345;
		int err = vmig_size_parse(cases[i].in, &v);

		ck_assert_msg(err == 0, "\"%s\": error %d", cases[i].in, err);
		ck_assert_msg(v == cases[i].want,
			      "\"%s\": got %llu, expected %llu", cases[i].in,
			      (unsigned long long)v,
			      (unsigned long long)cases[i].want);
	}
}
END_TEST

START_TEST(test_size_parse_bad)
{
	static const struct {
		const char *in;
		int want;
	} cases[] = {
		{ "", -EINVAL },
		{ " 1", -EINVAL },
		{ "1 ", -EINVAL },
		{ "-1", -EINVAL },
		{ "-1K", -EINVAL },
		{ "+1", -EINVAL },
		{ "abc", -EINVAL },
		{ "K", -EINVAL },
		{ "1X", -EINVAL },
		{ "1KK", -EINVAL },
		{ "1Ki", -EINVAL },
		{ "1KiBx", -EINVAL },
		{ "1KBB", -EINVAL },
		{ "1BB", -EINVAL },
		{ "1.5", -EINVAL },             /* a fraction of a byte */
		{ "1.5B", -EINVAL },
		{ "1.", -EINVAL },
		{ "1.G", -EINVAL },
		{ ".5G", -EINVAL },
		{ "1..5G", -EINVAL },
		{ "1.5.G", -EINVAL },
		{ "1e3", -EINVAL },
		{ "0x10", -EINVAL },
		{ "1 2", -EINVAL },
		{ "1 K ", -EINVAL },
		{ "1\tK", -EINVAL },
		{ "18446744073709551616", -ERANGE },
		{ "99999999999999999999999", -ERANGE },
		{ "16E", -ERANGE },
		{ "16.0E", -ERANGE },
		{ "16384P", -ERANGE },
		{ "17179869184G", -ERANGE },
		{ "18446744073709551615K", -ERANGE },
	};
	size_t i;
	uint64_t v;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		int err;

		v = 777;
		err = vmig_size_parse(cases[i].in, &v);
		ck_assert_msg(err == cases[i].want,
			      "\"%s\": got %d (value %llu), expected %d",
			      cases[i].in, err, (unsigned long long)v,
			      cases[i].want);
		ck_assert_msg(v == 777, "\"%s\": output written on error",
			      cases[i].in);
	}
	ck_assert_int_eq(vmig_size_parse(NULL, &v), -EINVAL);
}
END_TEST

START_TEST(test_size_format)
{
	static const struct {
		uint64_t in;
		const char *want;
	} cases[] = {
		{ 0, "0 B" },
		{ 1, "1 B" },
		{ 512, "512 B" },
		{ 1023, "1023 B" },
		{ 1024, "1.0 KiB" },
		{ 1536, "1.5 KiB" },
		{ 4096, "4.0 KiB" },
		{ (1ull << 20) - 1, "1.0 MiB" },   /* not "1024.0 KiB" */
		{ 64ull << 20, "64.0 MiB" },
		{ 3ull << 29, "1.5 GiB" },
		{ 1ull << 40, "1.0 TiB" },
		{ 1ull << 50, "1.0 PiB" },
		{ 3ull << 59, "1.5 EiB" },
		{ UINT64_MAX, "16.0 EiB" },
	};
	char buf[32];
	size_t i;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		int err = vmig_size_format(cases[i].in, buf, sizeof(buf));

		ck_assert_msg(err == 0, "%llu: error %d",
			      (unsigned long long)cases[i].in, err);
		ck_assert_msg(!strcmp(buf, cases[i].want),
			      "%llu: got \"%s\", expected \"%s\"",
			      (unsigned long long)cases[i].in, buf,
			      cases[i].want);
	}

	/* Exactly enough room, then one byte short. */
	ck_assert_int_eq(vmig_size_format(3ull << 29, buf, 8), 0);
	ck_assert_str_eq(buf, "1.5 GiB");
	ck_assert_int_eq(vmig_size_format(3ull << 29, buf, 7), -ENOSPC);
	ck_assert_int_eq(vmig_size_format(512, buf, 5), -ENOSPC);
}
END_TEST

START_TEST(test_size_roundtrip)
{
	char buf[32];
	uint64_t v;
	int i;

	/* Whatever format prints at the unit's precision, parse reads back. */
	for (i = 0; i < 60; i += 10) {
		uint64_t in = 3ull << (i + 9);

		ck_assert_int_eq(vmig_size_format(in, buf, sizeof(buf)), 0);
		ck_assert_int_eq(vmig_size_parse(buf, &v), 0);
		ck_assert_msg(v == in, "\"%s\": got %llu, expected %llu", buf,
			      (unsigned long long)v, (unsigned long long)in);
	}
}
END_TEST

START_TEST(test_duration_format)
{
	static const struct {
		uint64_t ms;
		const char *want;
	} cases[] = {
		{ 0, "0 ms" },
		{ 850, "850 ms" },
		{ 999, "999 ms" },
		{ 1000, "1.0 s" },
		{ 1049, "1.0 s" },
		{ 1050, "1.1 s" },
		{ 12345, "12.3 s" },
		{ 59949, "59.9 s" },
		{ 59950, "1m00s" },
		{ 245000, "4m05s" },
		{ 245499, "4m05s" },
		{ 245500, "4m06s" },
		{ 3599499, "59m59s" },
		{ 3599500, "1h00m" },
		{ 3720000, "1h02m" },
		{ 90000000, "25h00m" },
		{ UINT64_MAX, "5124095576030h26m" },
	};
	char buf[32];
	size_t i;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		int err = vmig_duration_format(cases[i].ms, buf, sizeof(buf));

		ck_assert_msg(err == 0, "%llu ms: error %d",
			      (unsigned long long)cases[i].ms, err);
		ck_assert_msg(!strcmp(buf, cases[i].want),
			      "%llu ms: got \"%s\", expected \"%s\"",
			      (unsigned long long)cases[i].ms, buf,
			      cases[i].want);
	}
	ck_assert_int_eq(vmig_duration_format(245000, buf, 6), 0);
	ck_assert_int_eq(vmig_duration_format(245000, buf, 5), -ENOSPC);
}
END_TEST

/* ------------------------------------------------------------------------
 * Bitmaps
 */

static const uint64_t bitmap_sizes[] = {
	1, 2, 63, 64, 65, 127, 128, 129, 1000, 4097,
};

/* Bits past nbits in the last word must stay zero. */
static void assert_tail_clear(const struct vmig_bitmap *b)
{
	uint64_t nwords = vmig_bitmap_words(b->nbits);
	unsigned rem = b->nbits % VMIG_BITS_PER_LONG;

	if (!rem)
		return;
	ck_assert_msg((b->words[nwords - 1] >> rem) == 0,
		      "nbits %llu: bits past the end set in last word %#lx",
		      (unsigned long long)b->nbits, b->words[nwords - 1]);
}

static void assert_bitmap_eq(const struct vmig_bitmap *b, const bool *ref,
			     const char *what)
{
	uint64_t i, n = 0;

	/* Assert only on a mismatch: every Check assertion costs a write. */
	for (i = 0; i < b->nbits; i++) {
		if (vmig_bitmap_test(b, i) != ref[i])
			ck_abort_msg("%s: nbits %llu bit %llu: got %d, "
				     "expected %d", what,
				     (unsigned long long)b->nbits,
				     (unsigned long long)i,
				     vmig_bitmap_test(b, i), ref[i]);
		n += ref[i];
	}
	ck_assert_msg(vmig_bitmap_count(b) == n,
		      "%s: count %llu, expected %llu", what,
		      (unsigned long long)vmig_bitmap_count(b),
		      (unsigned long long)n);
	assert_tail_clear(b);
}

START_TEST(test_bitmap_basic)
{
	size_t k;

	for (k = 0; k < sizeof(bitmap_sizes) / sizeof(bitmap_sizes[0]); k++) {
		uint64_t n = bitmap_sizes[k], mid = n / 2;
		struct vmig_bitmap b;

		ck_assert_int_eq(vmig_bitmap_init(&b, n), 0);
		ck_assert_uint_eq(b.nbits, n);
		ck_assert_uint_eq(vmig_bitmap_count(&b), 0);
		ck_assert_uint_eq(vmig_bitmap_next_set(&b, 0), n);

		vmig_bitmap_set(&b, n - 1);
		ck_assert_msg(vmig_bitmap_test(&b, n - 1), "n %llu: last bit",
			      (unsigned long long)n);
		ck_assert_uint_eq(vmig_bitmap_next_set(&b, 0), n - 1);
		ck_assert_uint_eq(vmig_bitmap_next_set(&b, n - 1), n - 1);
		vmig_bitmap_set(&b, 0);
		vmig_bitmap_set(&b, mid);
		vmig_bitmap_set(&b, mid);       /* idempotent */
		ck_assert_uint_eq(vmig_bitmap_count(&b), n >= 3 ? 3 : n);
		ck_assert_uint_eq(vmig_bitmap_next_set(&b, 0), 0);
		if (n >= 3) {
			ck_assert_uint_eq(vmig_bitmap_next_set(&b, 1), mid);
			ck_assert_uint_eq(vmig_bitmap_next_set(&b, mid + 1),
					  n - 1);
			ck_assert(!vmig_bitmap_test(&b, 1));
		}
		assert_tail_clear(&b);

		vmig_bitmap_clear(&b, 0);
		ck_assert(!vmig_bitmap_test(&b, 0));
		vmig_bitmap_clear(&b, 0);
		ck_assert_uint_eq(vmig_bitmap_next_set(&b, 0),
				  n == 1 ? 1 : mid ? mid : n - 1);

		vmig_bitmap_clear_all(&b);
		ck_assert_uint_eq(vmig_bitmap_count(&b), 0);
		ck_assert_uint_eq(vmig_bitmap_next_set(&b, 0), n);
		ck_assert_uint_eq(vmig_bitmap_next_set(&b, n), n);
		ck_assert_uint_eq(vmig_bitmap_next_set(&b, n + 100), n);

		vmig_bitmap_fini(&b);
		ck_assert_ptr_null(b.words);
		vmig_bitmap_fini(&b);           /* idempotent */
	}
	vmig_bitmap_fini(NULL);
}
END_TEST

START_TEST(test_bitmap_empty)
{
	struct vmig_bitmap b;

	ck_assert_int_eq(vmig_bitmap_init(&b, 0), 0);
	ck_assert_uint_eq(vmig_bitmap_count(&b), 0);
	ck_assert_uint_eq(vmig_bitmap_next_set(&b, 0), 0);
	vmig_bitmap_set_range(&b, 0, 0);
	vmig_bitmap_clear_all(&b);
	vmig_bitmap_fini(&b);
}
END_TEST

START_TEST(test_bitmap_next_set_words)
{
	static const uint64_t bits[] = { 5, 63, 64, 65, 300, 512, 999 };
	const size_t nb = sizeof(bits) / sizeof(bits[0]);
	struct vmig_bitmap b;
	uint64_t i;
	size_t k;

	ck_assert_int_eq(vmig_bitmap_init(&b, 1000), 0);
	for (k = 0; k < nb; k++)
		vmig_bitmap_set(&b, bits[k]);

	/* Walk the set bits the way the migration loop does. */
	for (i = vmig_bitmap_next_set(&b, 0), k = 0; i < b.nbits;
	     i = vmig_bitmap_next_set(&b, i + 1), k++) {
		ck_assert_msg(k < nb, "extra bit %llu", (unsigned long long)i);
		ck_assert_msg(i == bits[k], "bit #%zu: got %llu, expected %llu",
			      k, (unsigned long long)i,
			      (unsigned long long)bits[k]);
	}
	ck_assert_uint_eq(k, nb);

	/* From every position, the answer is the next listed bit. */
	for (i = 0, k = 0; i <= b.nbits; i++) {
		uint64_t want;

		while (k < nb && bits[k] < i)
			k++;
		want = k < nb ? bits[k] : b.nbits;
		if (vmig_bitmap_next_set(&b, i) != want)
			ck_abort_msg("next_set(%llu): got %llu, expected %llu",
				     (unsigned long long)i,
				     (unsigned long long)
				     vmig_bitmap_next_set(&b, i),
				     (unsigned long long)want);
	}
	ck_assert_uint_eq(vmig_bitmap_count(&b), nb);
	vmig_bitmap_fini(&b);
}
END_TEST

START_TEST(test_bitmap_set_range)
{
	static const uint64_t sizes[] = { 1, 64, 65, 200 };
	size_t k;

	for (k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
		uint64_t n = sizes[k], start, len, i;
		struct vmig_bitmap b;
		bool *ref = calloc(n, sizeof(*ref));

		ck_assert_ptr_nonnull(ref);
		ck_assert_int_eq(vmig_bitmap_init(&b, n), 0);
		for (start = 0; start <= n; start++) {
			for (len = 0; len <= n - start; len++) {
				char what[64];

				vmig_bitmap_clear_all(&b);
				memset(ref, 0, n * sizeof(*ref));
				/* A bit set before must survive. */
				if (start > 0) {
					vmig_bitmap_set(&b, 0);
					ref[0] = true;
				}
				vmig_bitmap_set_range(&b, start, len);
				for (i = start; i < start + len; i++)
					ref[i] = true;
				snprintf(what, sizeof(what),
					 "set_range(%llu, %llu)",
					 (unsigned long long)start,
					 (unsigned long long)len);
				assert_bitmap_eq(&b, ref, what);
			}
		}
		vmig_bitmap_fini(&b);
		free(ref);
	}
}
END_TEST

START_TEST(test_bitmap_or_words_random)
{
	int trial;

	rng_state = 0x1234567887654321ull;
	for (trial = 0; trial < 2000; trial++) {
		uint64_t n = 1 + rng_upto(700), first, nsrc, nwords, i;
		struct vmig_bitmap b;
		unsigned long *src;
		bool *ref;
		char what[96];

		/* Bias towards word boundaries, where off-by-ones live. */
		first = rng_upto(n);
		if (trial % 4 == 0)
			first -= first % VMIG_BITS_PER_LONG;
		nsrc = rng_upto(n - first);
		nwords = vmig_bitmap_words(nsrc);

		ck_assert_int_eq(vmig_bitmap_init(&b, n), 0);
		ref = calloc(n, sizeof(*ref));
		/* Random words, including junk past nsrc that must be
		 * ignored. */
		src = calloc(nwords ? nwords : 1, sizeof(*src));
		ck_assert(ref && src);
		for (i = 0; i < nwords; i++)
			src[i] = (unsigned long)rng();
		if (trial % 8 == 1)
			memset(src, 0xff, nwords * sizeof(*src));

		/* Sparse pre-existing bits must be kept. */
		for (i = 0; i < n; i++) {
			if (rng() % 16 == 0) {
				vmig_bitmap_set(&b, i);
				ref[i] = true;
			}
		}
		for (i = 0; i < nsrc; i++)
			if ((src[i / VMIG_BITS_PER_LONG] >>
			     (i % VMIG_BITS_PER_LONG)) & 1)
				ref[first + i] = true;

		vmig_bitmap_or_words(&b, first, src, nsrc);
		snprintf(what, sizeof(what),
			 "trial %d: or_words(nbits %llu, first %llu, n %llu)",
			 trial, (unsigned long long)n,
			 (unsigned long long)first, (unsigned long long)nsrc);
		assert_bitmap_eq(&b, ref, what);

		vmig_bitmap_fini(&b);
		free(src);
		free(ref);
	}
}
END_TEST

/* ------------------------------------------------------------------------
 * Control messages: parsing
 */

START_TEST(test_ctl_parse_good)
{
	static const char *const lines[] = {
		"{\"cmd\":\"status\"}",
		"  {\"cmd\" : \"status\", \"x\": [1, 2, {\"y\": null}]}  ",
		"{\"cmd\":\"status\"}\r",
		"\t{\"cmd\":\"status\",\"s\":\"caf\xc3\xa9\"}",
	};
	size_t i;

	for (i = 0; i < sizeof(lines) / sizeof(lines[0]); i++) {
		struct json_object *o = NULL;
		int err = vmig_ctl_parse_line(lines[i], strlen(lines[i]), &o);

		ck_assert_msg(err == 0, "'%s': error %d", lines[i], err);
		ck_assert_msg(get_str(o, "cmd") &&
			      !strcmp(get_str(o, "cmd"), "status"),
			      "'%s': parsed as %s", lines[i],
			      json_object_to_json_string(o));
		json_object_put(o);
	}
}
END_TEST

START_TEST(test_ctl_parse_bad)
{
	static const char *const lines[] = {
		"",
		"   ",
		"\r",
		"[1]",
		"\"status\"",
		"123",
		"null",
		"true",
		"{",
		"}",
		"{\"cmd\":",
		"{\"cmd\":\"status\"} x",
		"{} {}",
		"{}{}",
		"{'cmd':'status'}",
		"{\"a\":1,}",
		"{cmd:1}",
		"{\"s\":\"\xff\xfe\"}",         /* not UTF-8 */
	};
	static const char with_nul[] = "{\"a\":1}\0{\"b\":2}";
	struct json_object *o;
	size_t i;

	for (i = 0; i < sizeof(lines) / sizeof(lines[0]); i++) {
		int err;

		o = (struct json_object *)&o;   /* must be reset to NULL */
		err = vmig_ctl_parse_line(lines[i], strlen(lines[i]), &o);
		ck_assert_msg(err == -EPROTO, "'%s': got %d, expected %d",
			      lines[i], err, -EPROTO);
		ck_assert_ptr_null(o);
	}
	ck_assert_int_eq(vmig_ctl_parse_line(with_nul, sizeof(with_nul) - 1,
					     &o), -EPROTO);
	ck_assert_int_eq(vmig_ctl_parse_line(with_nul, 7, &o), 0);
	json_object_put(o);
}
END_TEST

/* "{"k":"aaa..."}" of exactly @len bytes (len >= 8), malloc'ed. */
static char *make_line(size_t len)
{
	char *s = malloc(len + 2);

	ck_assert_ptr_nonnull(s);
	memcpy(s, "{\"k\":\"", 6);
	memset(s + 6, 'a', len - 8);
	memcpy(s + len - 2, "\"}", 2);
	s[len] = '\0';
	return s;
}

START_TEST(test_ctl_parse_too_long)
{
	char *s = make_line(VMIG_CTL_MAX_LINE + 1);
	struct json_object *o;

	ck_assert_int_eq(vmig_ctl_parse_line(s, VMIG_CTL_MAX_LINE + 1, &o),
			 -EMSGSIZE);
	ck_assert_ptr_null(o);
	free(s);

	s = make_line(VMIG_CTL_MAX_LINE);
	ck_assert_int_eq(vmig_ctl_parse_line(s, VMIG_CTL_MAX_LINE, &o), 0);
	ck_assert_uint_eq(strlen(get_str(o, "k")), VMIG_CTL_MAX_LINE - 8);
	json_object_put(o);
	free(s);
}
END_TEST

START_TEST(test_ctl_helpers)
{
	struct json_object *o;
	const char *msg = "unset";

	o = vmig_ctl_request("status");
	ck_assert_str_eq(json_object_to_json_string_ext(o,
			 JSON_C_TO_STRING_PLAIN), "{\"cmd\":\"status\"}");
	json_object_put(o);

	o = vmig_ctl_reply_ok();
	ck_assert_str_eq(json_object_to_json_string_ext(o,
			 JSON_C_TO_STRING_PLAIN), "{\"ok\":true}");
	ck_assert_int_eq(vmig_ctl_reply_status(o, &msg), 0);
	ck_assert_ptr_null(msg);
	json_object_put(o);

	o = vmig_ctl_reply_error(-ENOENT, "no such VM: %s", "vm1");
	ck_assert_str_eq(json_object_to_json_string_ext(o,
			 JSON_C_TO_STRING_PLAIN),
			 "{\"ok\":false,\"error\":\"no such VM: vm1\","
			 "\"errno\":2}");
	ck_assert_int_eq(vmig_ctl_reply_status(o, &msg), -ENOENT);
	ck_assert_str_eq(msg, "no such VM: vm1");
	json_object_put(o);

	o = vmig_ctl_reply_error(EACCES, NULL);
	ck_assert_int_eq(get_int(o, "errno"), EACCES);
	ck_assert_str_eq(get_str(o, "error"), strerror(EACCES));
	ck_assert_int_eq(vmig_ctl_reply_status(o, NULL), -EACCES);
	json_object_put(o);

	o = vmig_ctl_reply_error(0, "odd");
	ck_assert_int_eq(get_int(o, "errno"), EIO);
	json_object_put(o);
}
END_TEST

START_TEST(test_ctl_reply_status_bad)
{
	static const struct {
		const char *json;
		int want;
	} cases[] = {
		{ "{}", -EPROTO },
		{ "{\"ok\":1}", -EPROTO },
		{ "{\"ok\":\"true\"}", -EPROTO },
		{ "{\"ok\":false}", -EIO },
		{ "{\"ok\":false,\"errno\":\"2\"}", -EIO },
		{ "{\"ok\":false,\"errno\":0}", -EIO },
		{ "{\"ok\":false,\"errno\":-2}", -EIO },
		{ "{\"ok\":false,\"errno\":99999}", -EIO },
		{ "{\"ok\":false,\"errno\":13,\"error\":7}", -EACCES },
		{ "{\"ok\":true,\"errno\":13}", 0 },
	};
	size_t i;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct json_object *o;
		const char *msg = "unset";
		int err;

		ck_assert_int_eq(vmig_ctl_parse_line(cases[i].json,
				 strlen(cases[i].json), &o), 0);
		err = vmig_ctl_reply_status(o, &msg);
		ck_assert_msg(err == cases[i].want, "%s: got %d, expected %d",
			      cases[i].json, err, cases[i].want);
		ck_assert_msg(msg == NULL, "%s: msg %s", cases[i].json, msg);
		json_object_put(o);
	}
	ck_assert_int_eq(vmig_ctl_reply_status(NULL, NULL), -EPROTO);
}
END_TEST

/* ------------------------------------------------------------------------
 * Control messages: send and receive over socketpairs
 */

START_TEST(test_ctl_roundtrip)
{
	struct vmig_ctl_reader r;
	struct json_object *req, *reply, *got = NULL;
	int sv[2];

	make_socketpair(sv);
	vmig_ctl_reader_init(&r, sv[1]);

	req = vmig_ctl_request("status");
	/* A newline inside a string must not split the line. */
	json_object_object_add(req, "note",
			       json_object_new_string("two\nlines\t\"q\""));
	ck_assert_int_eq(vmig_ctl_send(sv[0], req), 0);
	reply = vmig_ctl_reply_error(-EBUSY, "busy");
	ck_assert_int_eq(vmig_ctl_send(sv[0], reply), 0);

	ck_assert_int_eq(vmig_ctl_recv(&r, &got), 0);
	ck_assert_msg(json_object_equal(req, got), "sent %s, received %s",
		      json_object_to_json_string(req),
		      json_object_to_json_string(got));
	json_object_put(got);
	ck_assert_int_eq(vmig_ctl_recv(&r, &got), 0);
	ck_assert_msg(json_object_equal(reply, got), "sent %s, received %s",
		      json_object_to_json_string(reply),
		      json_object_to_json_string(got));
	ck_assert_int_eq(vmig_ctl_reply_status(got, NULL), -EBUSY);
	json_object_put(got);
	json_object_put(req);
	json_object_put(reply);

	close(sv[0]);
	recv_expect_err(&r, -EPIPE);
	recv_expect_err(&r, -EPIPE);    /* and stays at EOF */
	vmig_ctl_reader_fini(&r);
	vmig_ctl_reader_fini(&r);
	vmig_ctl_reader_fini(NULL);
	close(sv[1]);
}
END_TEST

START_TEST(test_ctl_two_in_one_write)
{
	struct vmig_ctl_reader r;
	int sv[2];

	make_socketpair(sv);
	vmig_ctl_reader_init(&r, sv[1]);
	send_str(sv[0], "{\"n\":1}\n\n \r\n{\"n\":2}\r\n[3]\n{\"n\":4}\n");
	recv_expect_int(&r, "n", 1);
	recv_expect_int(&r, "n", 2);     /* blank lines skipped */
	recv_expect_err(&r, -EPROTO);    /* a bad line is consumed... */
	recv_expect_int(&r, "n", 4);     /* ...and the next one is fine */

	set_nonblock(sv[1]);
	recv_expect_err(&r, -EAGAIN);
	close(sv[0]);
	recv_expect_err(&r, -EPIPE);
	vmig_ctl_reader_fini(&r);
	close(sv[1]);
}
END_TEST

START_TEST(test_ctl_split_nonblocking)
{
	struct vmig_ctl_reader r;
	int sv[2];

	make_socketpair(sv);
	set_nonblock(sv[1]);
	vmig_ctl_reader_init(&r, sv[1]);

	recv_expect_err(&r, -EAGAIN);
	send_str(sv[0], "{\"cmd\":");
	recv_expect_err(&r, -EAGAIN);
	send_str(sv[0], "\"sta");
	recv_expect_err(&r, -EAGAIN);
	send_str(sv[0], "tus\"}\n{\"n\"");
	recv_expect_str(&r, "cmd", "status");
	recv_expect_err(&r, -EAGAIN);
	send_str(sv[0], ":42}");
	recv_expect_err(&r, -EAGAIN);
	send_str(sv[0], "\n");
	recv_expect_int(&r, "n", 42);

	/* EOF in the middle of a line. */
	send_str(sv[0], "{\"n\":");
	close(sv[0]);
	recv_expect_err(&r, -EPIPE);
	vmig_ctl_reader_fini(&r);
	close(sv[1]);
}
END_TEST

START_TEST(test_ctl_split_blocking)
{
	static const char msg[] = "{\"cmd\":\"status\",\"pad\":\"xyzzy\"}\n";
	struct vmig_ctl_reader r;
	int sv[2], status;
	pid_t pid;

	/* A child dribbles the message a byte at a time while the parent
	 * blocks in recv. */
	make_socketpair(sv);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		size_t i;

		close(sv[1]);
		for (i = 0; i < sizeof(msg) - 1; i++) {
			if (send_all(sv[0], &msg[i], 1) < 0)
				_exit(1);
			usleep(500);
		}
		_exit(0);
	}
	close(sv[0]);
	vmig_ctl_reader_init(&r, sv[1]);
	recv_expect_str(&r, "pad", "xyzzy");
	recv_expect_err(&r, -EPIPE);
	vmig_ctl_reader_fini(&r);
	close(sv[1]);
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		      "writer status %#x", status);
}
END_TEST

struct writer {
	int fd;
	const char *buf;
	size_t len;
	int err;
};

static void *writer_main(void *arg)
{
	struct writer *w = arg;

	w->err = send_all(w->fd, w->buf, w->len);
	return NULL;
}

START_TEST(test_ctl_recv_too_long)
{
	const size_t max = VMIG_CTL_MAX_LINE;
	struct vmig_ctl_reader r;
	struct json_object *o;
	struct writer w;
	pthread_t th;
	char *a, *b, *all;
	int sv[2];

	/* A line of exactly the maximum is fine; one byte more is not. */
	a = make_line(max);
	b = make_line(max + 1);
	all = malloc(2 * max + 3);
	ck_assert_ptr_nonnull(all);
	memcpy(all, a, max);
	all[max] = '\n';
	memcpy(all + max + 1, b, max + 1);
	all[2 * max + 2] = '\n';

	make_socketpair(sv);
	w = (struct writer){ .fd = sv[0], .buf = all, .len = 2 * max + 3 };
	ck_assert_int_eq(pthread_create(&th, NULL, writer_main, &w), 0);

	vmig_ctl_reader_init(&r, sv[1]);
	ck_assert_int_eq(vmig_ctl_recv(&r, &o), 0);
	ck_assert_uint_eq(strlen(get_str(o, "k")), max - 8);
	json_object_put(o);
	recv_expect_err(&r, -EMSGSIZE);
	ck_assert_msg(r.cap <= max + 1, "reader buffer grew to %zu", r.cap);
	recv_expect_err(&r, -EMSGSIZE);  /* out of step for good */

	/* Unblock the writer, which must see EPIPE (not SIGPIPE) or have
	 * finished. */
	close(sv[1]);
	ck_assert_int_eq(pthread_join(th, NULL), 0);
	ck_assert_msg(w.err == 0 || w.err == -EPIPE || w.err == -ECONNRESET,
		      "writer: %s", strerror(-w.err));
	vmig_ctl_reader_fini(&r);
	close(sv[0]);
	free(all);
	free(a);
	free(b);
}
END_TEST

START_TEST(test_ctl_send_errors)
{
	struct json_object *o, *arr;
	char *big;
	int sv[2];

	make_socketpair(sv);

	/* Too big to be received: refused before anything is written. */
	big = make_line(VMIG_CTL_MAX_LINE);
	o = json_object_new_object();
	json_object_object_add(o, "k", json_object_new_string(big));
	ck_assert_int_eq(vmig_ctl_send(sv[0], o), -EMSGSIZE);
	json_object_put(o);
	free(big);

	/* Only objects are messages. */
	arr = json_object_new_array();
	ck_assert_int_eq(vmig_ctl_send(sv[0], arr), -EINVAL);
	json_object_put(arr);
	ck_assert_int_eq(vmig_ctl_send(sv[0], NULL), -EINVAL);

	/* Peer gone: -EPIPE, and no SIGPIPE kills the test. */
	close(sv[1]);
	o = vmig_ctl_request("status");
	ck_assert_int_eq(vmig_ctl_send(sv[0], o), -EPIPE);
	json_object_put(o);
	close(sv[0]);

	o = vmig_ctl_request("status");
	ck_assert_int_eq(vmig_ctl_send(-1, o), -EBADF);
	json_object_put(o);
}
END_TEST

/* ------------------------------------------------------------------------
 * Unix sockets: listen, connect, call
 */

static void sock_path(char *buf, size_t len, const char *dir,
		      const char *name)
{
	ck_assert_int_eq(vmig_rundir_path(dir, name, "sock", buf, len), 0);
}

static void assert_sock_0600(const char *path)
{
	struct stat st;

	ck_assert_msg(lstat(path, &st) == 0, "lstat %s: %s", path,
		      strerror(errno));
	ck_assert_msg(S_ISSOCK(st.st_mode), "%s: mode %o is not a socket",
		      path, st.st_mode);
	ck_assert_msg((st.st_mode & 07777) == 0600, "%s: mode %o, expected 600",
		      path, st.st_mode & 07777);
}

START_TEST(test_ctl_listen_connect)
{
	char *dir = make_tmpdir();
	char path[256], other[256];
	int lfd, lfd2, cfd, afd, err;
	mode_t old;

	sock_path(path, sizeof(path), dir, "vm1");
	sock_path(other, sizeof(other), dir, "nothing");

	old = umask(022);
	ck_assert_int_eq(vmig_ctl_listen(path, &lfd), 0);
	ck_assert_int_eq(umask(old), 022);      /* umask restored */
	assert_sock_0600(path);
	ck_assert_msg(fcntl(lfd, F_GETFD) & FD_CLOEXEC, "listener not CLOEXEC");

	ck_assert_int_eq(vmig_ctl_connect(path, &cfd), 0);
	ck_assert_msg(fcntl(cfd, F_GETFD) & FD_CLOEXEC, "client not CLOEXEC");
	afd = accept(lfd, NULL, NULL);
	ck_assert_msg(afd >= 0, "accept: %s", strerror(errno));
	close(afd);
	close(cfd);

	/* A live server keeps its socket. */
	err = vmig_ctl_listen(path, &lfd2);
	ck_assert_msg(err == -EADDRINUSE, "listen on a live socket: %d (%s)",
		      err, strerror(-err));
	assert_sock_0600(path);
	ck_assert_int_eq(vmig_ctl_connect(path, &cfd), 0);
	close(cfd);

	/* The server dies without unlinking: the file is stale. */
	close(lfd);
	err = vmig_ctl_connect(path, &cfd);
	ck_assert_msg(err == -ECONNREFUSED, "connect to stale: %d (%s)", err,
		      strerror(-err));
	err = vmig_ctl_listen(path, &lfd);
	ck_assert_msg(err == 0, "listen over stale: %d (%s)", err,
		      strerror(-err));
	assert_sock_0600(path);
	ck_assert_int_eq(vmig_ctl_connect(path, &cfd), 0);
	close(cfd);
	close(lfd);

	err = vmig_ctl_connect(other, &cfd);
	ck_assert_msg(err == -ENOENT, "connect to nothing: %d (%s)", err,
		      strerror(-err));

	ck_assert_int_eq(unlink(path), 0);
	ck_assert_int_eq(rmdir(dir), 0);
	free(dir);
}
END_TEST

START_TEST(test_ctl_listen_not_socket)
{
	char *dir = make_tmpdir();
	char path[256], longpath[200];
	struct stat st;
	int fd, err;

	sock_path(path, sizeof(path), dir, "vm1");
	fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, "keep", 4), 4);
	close(fd);

	/* Never unlink something that is not a socket. */
	err = vmig_ctl_listen(path, &fd);
	ck_assert_msg(err == -EEXIST, "listen over a file: %d (%s)", err,
		      strerror(-err));
	ck_assert_int_eq(stat(path, &st), 0);
	ck_assert_msg(S_ISREG(st.st_mode) && st.st_size == 4,
		      "file was replaced: mode %o size %lld", st.st_mode,
		      (long long)st.st_size);

	memset(longpath, 'x', sizeof(longpath) - 1);
	longpath[0] = '/';
	longpath[sizeof(longpath) - 1] = '\0';
	ck_assert_int_eq(vmig_ctl_listen(longpath, &fd), -ENAMETOOLONG);
	ck_assert_int_eq(vmig_ctl_connect(longpath, &fd), -ENAMETOOLONG);
	ck_assert_int_eq(vmig_ctl_connect("", &fd), -EINVAL);

	ck_assert_int_eq(unlink(path), 0);
	ck_assert_int_eq(rmdir(dir), 0);
	free(dir);
}
END_TEST

struct server {
	int lfd;
	int err;
	char cmd[64];
};

/* Answer one request the way a VMM does. */
static void *server_main(void *arg)
{
	struct server *s = arg;
	struct vmig_ctl_reader r;
	struct json_object *req = NULL, *reply;
	const char *cmd;
	int fd;

	fd = accept(s->lfd, NULL, NULL);
	if (fd < 0) {
		s->err = -errno;
		return NULL;
	}
	vmig_ctl_reader_init(&r, fd);
	s->err = vmig_ctl_recv(&r, &req);
	if (!s->err) {
		cmd = get_str(req, "cmd");
		snprintf(s->cmd, sizeof(s->cmd), "%s", cmd ? cmd : "");
		if (cmd && !strcmp(cmd, "status")) {
			reply = vmig_ctl_reply_ok();
			json_object_object_add(reply, "state",
					json_object_new_string("running"));
		} else {
			reply = vmig_ctl_reply_error(-EINVAL,
						     "unknown command");
		}
		s->err = vmig_ctl_send(fd, reply);
		json_object_put(reply);
	}
	json_object_put(req);
	vmig_ctl_reader_fini(&r);
	close(fd);
	return NULL;
}

static void call_once(const char *path, const char *cmd,
		      const char *want_state, int want_status)
{
	struct server s = { .err = 0 };
	struct json_object *reply = NULL;
	pthread_t th;
	int err;

	ck_assert_int_eq(vmig_ctl_listen(path, &s.lfd), 0);
	ck_assert_int_eq(pthread_create(&th, NULL, server_main, &s), 0);
	err = vmig_ctl_call(path, vmig_ctl_request(cmd), &reply);
	ck_assert_int_eq(pthread_join(th, NULL), 0);
	close(s.lfd);

	ck_assert_msg(err == 0, "call %s: %d (%s)", cmd, err, strerror(-err));
	ck_assert_msg(s.err == 0, "server: %d (%s)", s.err, strerror(-s.err));
	ck_assert_str_eq(s.cmd, cmd);
	ck_assert_int_eq(vmig_ctl_reply_status(reply, NULL), want_status);
	if (want_state)
		ck_assert_str_eq(get_str(reply, "state"), want_state);
	json_object_put(reply);
}

START_TEST(test_ctl_call)
{
	char *dir = make_tmpdir();
	struct json_object *reply = (struct json_object *)&reply;
	char path[256];
	int err;

	sock_path(path, sizeof(path), dir, "vm1");
	call_once(path, "status", "running", 0);
	call_once(path, "frobnicate", NULL, -EINVAL);   /* over stale */

	/* Nothing listens now; the request is consumed regardless (the
	 * sanitizer build checks for the leak). */
	err = vmig_ctl_call(path, vmig_ctl_request("status"), &reply);
	ck_assert_int_eq(err, -ECONNREFUSED);
	ck_assert_ptr_null(reply);
	ck_assert_int_eq(unlink(path), 0);
	err = vmig_ctl_call(path, vmig_ctl_request("status"), &reply);
	ck_assert_int_eq(err, -ENOENT);
	ck_assert_int_eq(vmig_ctl_call(path, NULL, &reply), -EINVAL);

	ck_assert_int_eq(rmdir(dir), 0);
	free(dir);
}
END_TEST

/* ------------------------------------------------------------------------
 * Run directory and names
 */

START_TEST(test_rundir_env)
{
	char buf[PATH_MAX];

	ck_assert_int_eq(setenv("VMIG_RUN_DIR", "/tmp/vmig-x", 1), 0);
	ck_assert_int_eq(setenv("XDG_RUNTIME_DIR", "/run/user/4242", 1), 0);
	ck_assert_int_eq(vmig_rundir_get(buf, sizeof(buf)), 0);
	ck_assert_str_eq(buf, "/tmp/vmig-x");       /* wins over all */

	ck_assert_int_eq(vmig_rundir_get(buf, 12), 0);
	ck_assert_int_eq(vmig_rundir_get(buf, 11), -ENAMETOOLONG);

	ck_assert_int_eq(setenv("VMIG_RUN_DIR", "relative/dir", 1), 0);
	ck_assert_int_eq(vmig_rundir_get(buf, sizeof(buf)), -EINVAL);
}
END_TEST

/*
 * Checks for an unprivileged user; returns 0 or the failing line, so it
 * can run in a child that dropped its euid.
 */
#define CHECK_OR_RETURN(cond) do {                                      \
	if (!(cond)) {                                                  \
		fprintf(stderr, "%s:%d: %s failed (buf \"%s\")\n",      \
			__FILE__, __LINE__, #cond, buf);                \
		return __LINE__;                                        \
	}                                                               \
} while (0)

static int check_rundir_user(void)
{
	char buf[PATH_MAX] = "";

	unsetenv("VMIG_RUN_DIR");
	setenv("XDG_RUNTIME_DIR", "/run/user/4242", 1);
	CHECK_OR_RETURN(vmig_rundir_get(buf, sizeof(buf)) == 0);
	CHECK_OR_RETURN(!strcmp(buf, "/run/user/4242/vmig"));

	setenv("VMIG_RUN_DIR", "", 1);          /* empty counts as unset */
	CHECK_OR_RETURN(vmig_rundir_get(buf, sizeof(buf)) == 0);
	CHECK_OR_RETURN(!strcmp(buf, "/run/user/4242/vmig"));

	setenv("XDG_RUNTIME_DIR", "run/user", 1);
	CHECK_OR_RETURN(vmig_rundir_get(buf, sizeof(buf)) == -ENOENT);
	unsetenv("XDG_RUNTIME_DIR");
	CHECK_OR_RETURN(vmig_rundir_get(buf, sizeof(buf)) == -ENOENT);
	return 0;
}

START_TEST(test_rundir_default)
{
	char buf[PATH_MAX];
	int status, line;
	pid_t pid;

	if (geteuid() != 0) {
		line = check_rundir_user();
		ck_assert_msg(line == 0, "user check at line %d failed", line);
		return;
	}

	unsetenv("VMIG_RUN_DIR");
	ck_assert_int_eq(setenv("XDG_RUNTIME_DIR", "/run/user/0", 1), 0);
	ck_assert_int_eq(vmig_rundir_get(buf, sizeof(buf)), 0);
	ck_assert_str_eq(buf, "/run/vmig");
	ck_assert_int_eq(vmig_rundir_get(buf, 10), 0);
	ck_assert_int_eq(vmig_rundir_get(buf, 9), -ENAMETOOLONG);

	/* As root, also check the unprivileged rules as "nobody". */
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		if (seteuid(65534) < 0)
			_exit(2);
		_exit(check_rundir_user() ? 1 : 0);
	}
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		      "unprivileged checks failed: status %#x (see stderr)",
		      status);
}
END_TEST

static void assert_mode(const char *path, mode_t want)
{
	struct stat st;

	ck_assert_msg(stat(path, &st) == 0, "stat %s: %s", path,
		      strerror(errno));
	ck_assert_msg(S_ISDIR(st.st_mode), "%s is not a directory", path);
	ck_assert_msg((st.st_mode & 07777) == want, "%s: mode %o, expected %o",
		      path, st.st_mode & 07777, want);
}

START_TEST(test_rundir_ensure)
{
	char *dir = make_tmpdir();
	char a[256], ab[256], abc[256], file[256], sub[256];
	int fd, err;

	snprintf(a, sizeof(a), "%s/a", dir);
	snprintf(ab, sizeof(ab), "%s/a//b", dir);
	snprintf(abc, sizeof(abc), "%s/a/b/c/", dir);
	snprintf(file, sizeof(file), "%s/f", dir);
	snprintf(sub, sizeof(sub), "%s/f/sub", dir);

	umask(022);
	ck_assert_int_eq(vmig_rundir_ensure(abc), 0);
	assert_mode(a, 0700);
	assert_mode(ab, 0700);
	assert_mode(abc, 0700);
	ck_assert_int_eq(vmig_rundir_ensure(abc), 0);   /* exists: fine */
	ck_assert_int_eq(vmig_rundir_ensure(dir), 0);
	assert_mode(dir, 0700);                           /* untouched */

	fd = open(file, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
	ck_assert_int_ge(fd, 0);
	close(fd);
	err = vmig_rundir_ensure(file);
	ck_assert_msg(err == -ENOTDIR, "ensure on a file: %d (%s)", err,
		      strerror(-err));
	err = vmig_rundir_ensure(sub);
	ck_assert_msg(err == -ENOTDIR, "ensure below a file: %d (%s)", err,
		      strerror(-err));
	ck_assert_int_eq(vmig_rundir_ensure(""), -EINVAL);
	ck_assert_int_eq(vmig_rundir_ensure("/"), 0);

	ck_assert_int_eq(unlink(file), 0);
	ck_assert_int_eq(rmdir(abc), 0);
	ck_assert_int_eq(rmdir(ab), 0);
	ck_assert_int_eq(rmdir(a), 0);
	ck_assert_int_eq(rmdir(dir), 0);
	free(dir);
}
END_TEST

START_TEST(test_rundir_path)
{
	char buf[64];

	ck_assert_int_eq(vmig_rundir_path("/run/vmig", "vm1", "sock", buf,
					  sizeof(buf)), 0);
	ck_assert_str_eq(buf, "/run/vmig/vm1.sock");
	ck_assert_int_eq(vmig_rundir_path("/run/vmig", "vm1", NULL, buf,
					  sizeof(buf)), 0);
	ck_assert_str_eq(buf, "/run/vmig/vm1");
	ck_assert_int_eq(vmig_rundir_path("/run/vmig", "vm1", "", buf,
					  sizeof(buf)), 0);
	ck_assert_str_eq(buf, "/run/vmig/vm1");

	/* strlen("/run/vmig/vm1.log") == 17 */
	ck_assert_int_eq(vmig_rundir_path("/run/vmig", "vm1", "log", buf, 18),
			 0);
	ck_assert_int_eq(vmig_rundir_path("/run/vmig", "vm1", "log", buf, 17),
			 -ENAMETOOLONG);
}
END_TEST

START_TEST(test_vm_name)
{
	static const char *const good[] = {
		"a", "0", "vm1", "My_VM-2.test", "a.", "a-", "_x",
		"0123456789012345678901234567890123456789012345678901234567890123",
	};
	static const char *const bad[] = {
		"", ".", "..", ".hidden", "-x", "--help", "a/b", "../x", "a b",
		"a\n", "vm\xc3\xa9", "a:b", "a*", "a~",
		"01234567890123456789012345678901234567890123456789012345678901234",
	};
	size_t i;

	for (i = 0; i < sizeof(good) / sizeof(good[0]); i++)
		ck_assert_msg(vmig_vm_name_valid(good[i]) == 0,
			      "\"%s\" (%zu chars) rejected", good[i],
			      strlen(good[i]));
	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		ck_assert_msg(vmig_vm_name_valid(bad[i]) == -EINVAL,
			      "\"%s\" (%zu chars) accepted", bad[i],
			      strlen(bad[i]));
	ck_assert_int_eq(vmig_vm_name_valid(NULL), -EINVAL);
}
END_TEST

/* ------------------------------------------------------------------------
 * Errors and logging
 */

START_TEST(test_err)
{
	struct vmig_err e = { 0 };
	char longarg[1000];

	vmig_err_set(NULL, -EIO, "ignored");
	vmig_err_clear(NULL);

	errno = EAGAIN;
	vmig_err_set(&e, -ENOENT, "cannot open %s", "/dev/kvm");
	ck_assert_int_eq(errno, EAGAIN);
	vmig_err_set(&e, -EPIPE, "later failure");
	ck_assert_int_eq(e.code, -ENOENT);
	ck_assert_str_eq(e.msg, "cannot open /dev/kvm");

	vmig_err_clear(&e);
	ck_assert_int_eq(e.code, 0);
	ck_assert_str_eq(e.msg, "");
	vmig_err_set(&e, EACCES, "positive");
	ck_assert_int_eq(e.code, -EACCES);

	vmig_err_clear(&e);
	vmig_err_set(&e, 0, "zero");
	ck_assert_int_eq(e.code, -EIO);

	vmig_err_clear(&e);
	memset(longarg, 'x', sizeof(longarg) - 1);
	longarg[sizeof(longarg) - 1] = '\0';
	vmig_err_set(&e, -E2BIG, "%s", longarg);
	ck_assert_uint_eq(strlen(e.msg), sizeof(e.msg) - 1);
}
END_TEST

START_TEST(test_log_level_parse)
{
	static const struct {
		const char *in;
		int want;
	} cases[] = {
		{ "error", VMIG_LOG_ERROR }, { "ERROR", VMIG_LOG_ERROR },
		{ "warn", VMIG_LOG_WARN }, { "Warning", VMIG_LOG_WARN },
		{ "info", VMIG_LOG_INFO }, { "debug", VMIG_LOG_DEBUG },
		{ "0", VMIG_LOG_ERROR }, { "3", VMIG_LOG_DEBUG },
		{ "", -EINVAL }, { "4", -EINVAL }, { "-1", -EINVAL },
		{ "verbose", -EINVAL }, { "debugx", -EINVAL }, { "03", -EINVAL },
	};
	size_t i;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		ck_assert_msg(vmig_log_level_parse(cases[i].in) == cases[i].want,
			      "\"%s\": got %d, expected %d", cases[i].in,
			      vmig_log_level_parse(cases[i].in), cases[i].want);
	ck_assert_int_eq(vmig_log_level_parse(NULL), -EINVAL);
}
END_TEST

START_TEST(test_log_env)
{
	int status;
	pid_t pid;

	/* The threshold is read once per process: look in fresh children. */
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		setenv("VMIG_LOG", "debug", 1);
		_exit(vmig_log_get_level() == VMIG_LOG_DEBUG &&
		      vmig_log_enabled(VMIG_LOG_DEBUG) ? 0 : 1);
	}
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert_msg(WIFEXITED(status) && !WEXITSTATUS(status),
		      "VMIG_LOG=debug: status %#x", status);

	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		setenv("VMIG_LOG", "bogus", 1);
		_exit(vmig_log_get_level() == VMIG_LOG_WARN &&
		      !vmig_log_enabled(VMIG_LOG_INFO) ? 0 : 1);
	}
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert_msg(WIFEXITED(status) && !WEXITSTATUS(status),
		      "VMIG_LOG=bogus: status %#x", status);

	vmig_log_set_level(99);
	ck_assert_int_eq(vmig_log_get_level(), VMIG_LOG_DEBUG);
	vmig_log_set_level(-5);
	ck_assert_int_eq(vmig_log_get_level(), VMIG_LOG_ERROR);
}
END_TEST

START_TEST(test_log_output)
{
	char buf[16384], want[256], longmsg[6000];
	int p[2], saved;
	ssize_t n;
	size_t got = 0;
	char *nl;

	ck_assert_int_eq(pipe(p), 0);
	saved = dup(STDERR_FILENO);
	ck_assert_int_ge(saved, 0);
	ck_assert_int_eq(dup2(p[1], STDERR_FILENO), STDERR_FILENO);
	close(p[1]);

	vmig_log_set_level(VMIG_LOG_INFO);
	errno = EXDEV;
	vmig_log(VMIG_LOG_INFO, "hello %d", 42);
	vmig_log(VMIG_LOG_DEBUG, "hidden");
	vmig_log(VMIG_LOG_WARN, "own newline\n");
	vmig_log(VMIG_LOG_ERROR, "bad %s", "thing");
	ck_assert_int_eq(errno, EXDEV);
	memset(longmsg, 'y', sizeof(longmsg) - 1);
	longmsg[sizeof(longmsg) - 1] = '\0';
	vmig_log(VMIG_LOG_ERROR, "%s", longmsg);

	ck_assert_int_eq(dup2(saved, STDERR_FILENO), STDERR_FILENO);
	close(saved);
	while ((n = read(p[0], buf + got, sizeof(buf) - 1 - got)) > 0)
		got += (size_t)n;
	close(p[0]);
	buf[got] = '\0';

	snprintf(want, sizeof(want),
		 "vmig[%d]: info: hello 42\n"
		 "vmig[%d]: warn: own newline\n"
		 "vmig[%d]: error: bad thing\n",
		 (int)getpid(), (int)getpid(), (int)getpid());
	ck_assert_msg(!strncmp(buf, want, strlen(want)),
		      "log output:\n%s\nexpected:\n%s", buf, want);

	/* The long line is cut, marked, and still one line. */
	nl = strchr(buf + strlen(want), '\n');
	ck_assert_ptr_nonnull(nl);
	ck_assert_ptr_eq(nl + 1, buf + got);
	ck_assert_msg(nl - (buf + strlen(want)) + 1 <= 4096,
		      "long line of %td bytes", nl - (buf + strlen(want)) + 1);
	ck_assert_msg(!strncmp(nl - 3, "...", 3), "cut not marked");
}
END_TEST

/* ------------------------------------------------------------------------ */

static Suite *util_suite(void)
{
	Suite *s = suite_create("util");
	TCase *tc;

	tc = tcase_create("size");
	tcase_add_test(tc, test_size_parse_good);
	tcase_add_test(tc, test_size_parse_bad);
	tcase_add_test(tc, test_size_format);
	tcase_add_test(tc, test_size_roundtrip);
	tcase_add_test(tc, test_duration_format);
	suite_add_tcase(s, tc);

	tc = tcase_create("bitmap");
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_bitmap_basic);
	tcase_add_test(tc, test_bitmap_empty);
	tcase_add_test(tc, test_bitmap_next_set_words);
	tcase_add_test(tc, test_bitmap_set_range);
	tcase_add_test(tc, test_bitmap_or_words_random);
	suite_add_tcase(s, tc);

	tc = tcase_create("ctl");
	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, test_ctl_parse_good);
	tcase_add_test(tc, test_ctl_parse_bad);
	tcase_add_test(tc, test_ctl_parse_too_long);
	tcase_add_test(tc, test_ctl_helpers);
	tcase_add_test(tc, test_ctl_reply_status_bad);
	tcase_add_test(tc, test_ctl_roundtrip);
	tcase_add_test(tc, test_ctl_two_in_one_write);
	tcase_add_test(tc, test_ctl_split_nonblocking);
	tcase_add_test(tc, test_ctl_split_blocking);
	tcase_add_test(tc, test_ctl_recv_too_long);
	tcase_add_test(tc, test_ctl_send_errors);
	tcase_add_test(tc, test_ctl_listen_connect);
	tcase_add_test(tc, test_ctl_listen_not_socket);
	tcase_add_test(tc, test_ctl_call);
	suite_add_tcase(s, tc);

	tc = tcase_create("rundir");
	tcase_add_test(tc, test_rundir_env);
	tcase_add_test(tc, test_rundir_default);
	tcase_add_test(tc, test_rundir_ensure);
	tcase_add_test(tc, test_rundir_path);
	tcase_add_test(tc, test_vm_name);
	suite_add_tcase(s, tc);

	tc = tcase_create("err-log");
	tcase_add_test(tc, test_err);
	tcase_add_test(tc, test_log_level_parse);
	tcase_add_test(tc, test_log_env);
	tcase_add_test(tc, test_log_output);
	suite_add_tcase(s, tc);

	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(util_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
