/*
 * Unit tests for the migration stream codec (migrate/stream.c) and
 * CRC-32C (util/crc32c.c): round trips of every record type through
 * memory, a socketpair and a file; page batches decoded byte for byte;
 * every truncation and every single-bit flip of a small stream rejected
 * without a crash or a write outside guest memory (guard pages around it);
 * and one hand-made malformed stream per rule of vmig-stream(5).  No KVM.
 */
#define _GNU_SOURCE 1

#include <check.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>
#include <lz4.h>

#include "vmig/crc32c.h"
#include "vmig/stream.h"
#include "vmig/transport.h"
#include "vmig/vm.h"

#define PAGE 4096u

/* ------------------------------------------------------------------------
 * Helpers: random data, an in-memory transport, guarded guest memory
 */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545f4914f6cdd1dull;
}

static void fill_random(void *p, size_t len)
{
	uint8_t *b = p;

	for (size_t i = 0; i < len; i += 8) {
		uint64_t v = rng();

		memcpy(b + i, &v, len - i < 8 ? len - i : 8);
	}
}

/* Compressible but not trivial: a stamped, repetitive page. */
static void fill_compressible(void *p, uint64_t stamp)
{
	uint8_t *b = p;

	for (size_t i = 0; i < PAGE; i += 16) {
		uint64_t v[2] = { stamp, i / 256 };

		memcpy(b + i, v, 16);
	}
}

/*
 * Read as the destination does (vmig_stream_reader_set_memory: PAGES
 * applied by the reader, raw payloads read straight into guest memory)
 * rather than with vmig_stream_pages_apply.  The loop tests run both ways.
 */
static bool direct;
/* Write as a live source does (vmig_stream_writer_set_live: LIVE_PAGES). */
static bool live;

#define assert_err_has(e, s) \
	ck_assert_msg(strstr((e)->msg, (s)), "message \"%s\" lacks \"%s\"", (e)->msg, (s))

/* An in-memory transport: reads from a buffer (in pieces of at most
 * @chunk bytes if set), writes append to a growing buffer. */
struct mem_transport {
	struct vmig_transport base;
	uint8_t *data;
	size_t len, cap, pos, chunk;
	bool owned;
	bool discard;             /* writes vanish (long streams) */
	unsigned int ns_per_byte; /* a link this slow (with discard) */
};

static ssize_t mem_read(struct vmig_transport *t, void *buf, size_t len)
{
	struct mem_transport *m = (struct mem_transport *)t;
	size_t n = m->len - m->pos;

	if (n > len)
		n = len;
	if (m->chunk && n > m->chunk)
		n = m->chunk;
	memcpy(buf, m->data + m->pos, n);
	m->pos += n;
	return (ssize_t)n;
}

static ssize_t mem_write(struct vmig_transport *t, const void *buf, size_t len)
{
	struct mem_transport *m = (struct mem_transport *)t;

	if (m->discard) {
		if (m->ns_per_byte) {
			uint64_t ns = (uint64_t)len * m->ns_per_byte;
			struct timespec ts = { (time_t)(ns / 1000000000u), (long)(ns % 1000000000u) };

			nanosleep(&ts, NULL);
		}
		return (ssize_t)len;
	}
	if (m->len + len > m->cap) {
		size_t ncap = (m->cap ? m->cap * 2 : 65536);

		while (ncap < m->len + len)
			ncap *= 2;
		m->data = realloc(m->data, ncap);
		ck_assert(m->data);
		m->cap = ncap;
	}
	memcpy(m->data + m->len, buf, len);
	m->len += len;
	return (ssize_t)len;
}

static void mem_close(struct vmig_transport *t)
{
	struct mem_transport *m = (struct mem_transport *)t;

	if (m->owned)
		free(m->data);
	free(m);
}

static const struct vmig_transport_ops mem_ops = {
	.kind = "mem",
	.read = mem_read,
	.write = mem_write,
	.close = mem_close,
};

static struct mem_transport *mem_new(const void *data, size_t len, size_t chunk)
{
	struct mem_transport *m = calloc(1, sizeof(*m));

	ck_assert(m);
	vmig_transport_init(&m->base, &mem_ops, "mem:test");
	m->data = (uint8_t *)data;
	m->len = len;
	m->chunk = chunk;
	m->owned = data == NULL;
	return m;
}

/* Guest memory: @npages pages at @gpa, between two PROT_NONE guard pages. */
struct guest {
	uint8_t *map;
	size_t map_len;
	struct vmig_mem_region region;
};

static void guest_init(struct guest *g, uint64_t gpa, size_t npages)
{
	g->map_len = (npages + 2) * PAGE;
	g->map = mmap(NULL, g->map_len, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ck_assert(g->map != MAP_FAILED);
	ck_assert_int_eq(mprotect(g->map, PAGE, PROT_NONE), 0);
	ck_assert_int_eq(mprotect(g->map + (npages + 1) * PAGE, PAGE, PROT_NONE), 0);
	g->region = (struct vmig_mem_region){
		.gpa = gpa, .size = npages * PAGE, .hva = g->map + PAGE,
	};
}

static void guest_fini(struct guest *g)
{
	munmap(g->map, g->map_len);
}

/* A page_dst callback that also counts calls and checks its own answer. */
struct dst_ctx {
	const struct vmig_mem_region *r;
	unsigned int n;
	unsigned long calls;
};

static int dst_cb(void *arg, uint64_t gpa, void **dst)
{
	struct dst_ctx *c = arg;

	c->calls++;
	for (unsigned int i = 0; i < c->n; i++) {
		const struct vmig_mem_region *r = &c->r[i];

		if (gpa >= r->gpa && gpa - r->gpa + PAGE <= r->size) {
			*dst = r->hva + (gpa - r->gpa);
			return 0;
		}
	}
	return -ERANGE;
}

/* Little-endian field writers for hand-made records. */
static void le16(uint8_t *p, uint16_t v) { v = htole16(v); memcpy(p, &v, 2); }
static void le32(uint8_t *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static void le64(uint8_t *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }

static size_t put_header(uint8_t *p, uint32_t version)
{
	memcpy(p, VMIG_STREAM_MAGIC, 8);
	le32(p + 8, version);
	le32(p + 12, 32);
	le64(p + 16, 0);
	le64(p + 24, 0);
	return 32;
}

/*
 * A record with @len_field in its length field but @body_len bytes of
 * body (normally equal), @padbyte in the padding, a correct CRC unless
 * @crc_xor, and @trailer_word after it.
 */
static size_t put_record_ex(uint8_t *p, uint32_t type, uint32_t flags,
			    uint64_t len_field, const void *body, size_t body_len,
			    uint8_t padbyte, uint32_t crc_xor, uint32_t trailer_word)
{
	size_t pad = (8 - body_len % 8) % 8, n = 16;
	uint32_t crc;

	le32(p, type);
	le32(p + 4, flags);
	le64(p + 8, len_field);
	if (body_len)
		memcpy(p + n, body, body_len);
	n += body_len;
	memset(p + n, padbyte, pad);
	n += pad;
	crc = vmig_crc32c(0, p, n) ^ crc_xor;
	le32(p + n, crc);
	le32(p + n + 4, trailer_word);
	return n + 8;
}

static size_t put_record(uint8_t *p, uint32_t type, uint32_t flags,
			 const void *body, size_t len)
{
	return put_record_ex(p, type, flags, len, body, len, 0, 0, 0);
}

/*
 * Decode a whole forward stream into @g (callback path) the way the
 * destination would: header, records until END, then EOF.  Returns 0 or
 * the first error, with its message in @err.
 */
static int decode_all(const void *data, size_t len, size_t chunk, struct guest *g,
		      unsigned int ng, struct vmig_err *err)
{
	struct mem_transport *m = mem_new(data, len, chunk);
	struct vmig_stream_reader *r;
	struct vmig_mem_region regions[4];
	struct dst_ctx ctx = { .r = regions, .n = ng };
	struct vmig_record rec;
	int ret;

	for (unsigned int i = 0; i < ng; i++)
		regions[i] = g[i].region;
	ck_assert_int_eq(vmig_stream_reader_create(&m->base, VMIG_STREAM_FORWARD, &r), 0);
	if (direct)
		ck_assert_int_eq(vmig_stream_reader_set_memory(r, regions, ng), 0);
	ret = vmig_stream_read_header(r, err);
	while (ret == 0) {
		ret = vmig_stream_read_record(r, &rec, err);
		if (ret < 0)
			break;
		switch (rec.type) {
		case VMIG_REC_CONFIG: {
			struct json_object *o;

			ret = vmig_stream_parse_config(&rec, &o, err);
			json_object_put(o);
			break;
		}
		case VMIG_REC_PAGES:
		case VMIG_REC_LIVE_PAGES:
			if (direct)
				ck_assert(rec.body == NULL && rec.len > 0);
			else
				ret = vmig_stream_pages_apply(&rec, dst_cb, &ctx, err);
			break;
		case VMIG_REC_STATE: {
			struct vmig_stream_state st;

			ret = vmig_stream_parse_state(&rec, &st, err);
			break;
		}
		case VMIG_REC_ITER_END: {
			uint64_t it, pg;

			ret = vmig_stream_parse_iter_end(&rec, &it, &pg, err);
			break;
		}
		case VMIG_REC_ERROR: {
			int e;
			char msg[128];

			ret = vmig_stream_parse_error(&rec, &e, msg, sizeof(msg), err);
			if (ret == 0) {
				vmig_err_set(err, e, "sender failed: %s", msg);
				ret = e;
			}
			break;
		}
		case VMIG_REC_END:
			ret = vmig_stream_expect_eof(r, err);
			if (ret == 0 && direct) {
				uint64_t gpa, n = vmig_stream_reader_torn(r, &gpa);

				/* As the destination: pages torn and never sent again. */
				if (n) {
					vmig_err_set(err, -EBADMSG, "%llu torn pages, one at gpa 0x%llx",
						     (unsigned long long)n, (unsigned long long)gpa);
					ret = -EBADMSG;
				}
			}
			goto out;
		default:
			break;
		}
	}
out:
	vmig_stream_reader_destroy(r);
	vmig_transport_close(&m->base);
	return ret;
}

/* ------------------------------------------------------------------------
 * CRC-32C
 */

START_TEST(test_crc32c)
{
	static const uint8_t zeros[32];
	uint8_t ones[32], buf[12000];

	memset(ones, 0xff, sizeof(ones));
	/* Known values (RFC 3720 B.4 and the usual check value). */
	ck_assert_uint_eq(vmig_crc32c(0, "123456789", 9), 0xE3069283u);
	ck_assert_uint_eq(vmig__crc32c_sw(0, "123456789", 9), 0xE3069283u);
	ck_assert_uint_eq(vmig_crc32c(0, zeros, 32), 0x8A9136AAu);
	ck_assert_uint_eq(vmig_crc32c(0, ones, 32), 0x62A8AB43u);
	ck_assert_uint_eq(vmig_crc32c(0, NULL, 0), 0);

	/* Hardware and table agree at every length and alignment; pieces
	 * chain. */
	fill_random(buf, sizeof(buf));
	for (size_t off = 0; off < 9; off++) {
		for (size_t len = 0; len + off <= sizeof(buf); len += len < 80 ? 1 : 397) {
			uint32_t hw = vmig_crc32c(0, buf + off, len);
			uint32_t sw = vmig__crc32c_sw(0, buf + off, len);
			size_t cut = len / 3;
			uint32_t chained = vmig_crc32c(vmig_crc32c(0, buf + off, cut),
						       buf + off + cut, len - cut);

			ck_assert_msg(hw == sw, "off %zu len %zu: hw 0x%08x sw 0x%08x",
				      off, len, hw, sw);
			ck_assert_msg(chained == hw, "off %zu len %zu: chained 0x%08x whole 0x%08x",
				      off, len, chained, hw);
		}
		/* A whole page: three lanes of 1360 bytes and a tail (aligned
		 * at off 0 and 8), or the general path. */
		for (size_t k = 0; k + 4096 + off <= sizeof(buf); k += 4096) {
			uint32_t hw = vmig_crc32c(0, buf + k + off, 4096);
			uint32_t sw = vmig__crc32c_sw(0, buf + k + off, 4096);
			uint32_t two = vmig_crc32c(vmig_crc32c(7, buf + off, 4096), buf + off + 4096 - k,
						   4096);

			ck_assert_msg(hw == sw, "page at %zu: hw 0x%08x sw 0x%08x", k + off, hw, sw);
			ck_assert_uint_eq(two, vmig__crc32c_sw(vmig__crc32c_sw(7, buf + off, 4096),
							       buf + off + 4096 - k, 4096));
		}
		/* Around the 3 x 512-byte rounds of the interleaved path. */
		for (size_t len = 1530; len + off <= sizeof(buf); len += len % 1536 < 8 ? 1 : 1527) {
			uint32_t hw = vmig_crc32c(0, buf + off, len);
			uint32_t sw = vmig__crc32c_sw(0, buf + off, len);

			ck_assert_msg(hw == sw, "off %zu len %zu: hw 0x%08x sw 0x%08x",
				      off, len, hw, sw);
		}
	}
}
END_TEST

/* ------------------------------------------------------------------------
 * Round trips
 */

/* The example in vmig-stream(5), byte for byte. */
START_TEST(test_manpage_example)
{
	static const uint8_t expected[56] = {
		0x56, 0x4d, 0x49, 0x47, 0x53, 0x54, 0x52, 0x4d, 0x01, 0, 0, 0, 0x20, 0, 0, 0,
		0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
		0x07, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
		0xf2, 0x56, 0x8c, 0x97, 0, 0, 0, 0,
	};
	struct mem_transport *out = mem_new(NULL, 0, 0);
	struct vmig_stream_writer *w;
	struct guest g;
	struct vmig_err err = { 0 };

	ck_assert_int_eq(vmig_stream_writer_create(&out->base, VMIG_STREAM_FORWARD, &w), 0);
	ck_assert_int_eq(vmig_stream_write_header(w), 0);
	ck_assert_int_eq(vmig_stream_finish(w), 0);
	vmig_stream_writer_destroy(w);
	ck_assert_uint_eq(out->len, sizeof(expected));
	ck_assert_msg(memcmp(out->data, expected, sizeof(expected)) == 0,
		      "the writer's minimal stream differs from the man page's example");
	guest_init(&g, 0, 1);
	ck_assert_int_eq(decode_all(expected, sizeof(expected), 0, &g, 1, &err), 0);
	guest_fini(&g);
	vmig_transport_close(&out->base);
}
END_TEST

START_TEST(test_rec_names)
{
	ck_assert_str_eq(vmig_stream_rec_name(VMIG_REC_PAGES), "PAGES");
	ck_assert_str_eq(vmig_stream_rec_name(VMIG_REC_NACK), "NACK");
	ck_assert_ptr_null(vmig_stream_rec_name(0));
	ck_assert_str_eq(vmig_stream_rec_name(VMIG_REC_EXTENTS), "EXTENTS");
	ck_assert_str_eq(vmig_stream_rec_name(VMIG_REC_CHANNEL), "CHANNEL");
	ck_assert_str_eq(vmig_stream_rec_name(VMIG_REC_LIVE_PAGES), "LIVE_PAGES");
	ck_assert_ptr_null(vmig_stream_rec_name(12));
	ck_assert_str_eq(vmig_stream_rec_name(VMIG_REC_ITER_DONE), "ITER_DONE");
	ck_assert_ptr_null(vmig_stream_rec_name(0x14));
}
END_TEST

START_TEST(test_roundtrip_all_types)
{
	struct mem_transport *out = mem_new(NULL, 0, 0), *in;
	struct vmig_stream_writer *w;
	struct vmig_stream_reader *r;
	struct vmig_record rec;
	struct vmig_err err = { 0 };
	struct json_object *cfg = json_tokener_parse(
		"{\"vcpus\":2,\"memory\":[{\"gpa\":0,\"size\":1048576}],\"name\":\"vm\\u00e9\"}");
	struct json_object *got;
	struct vmig_stream_state st;
	struct vmig_stream_stats stats;
	uint8_t state[100], page[PAGE];
	uint64_t it, pg;
	char msg[256];
	int e;

	fill_random(state, sizeof(state));
	fill_random(page, sizeof(page));
	ck_assert_int_eq(vmig_stream_writer_create(&out->base, VMIG_STREAM_FORWARD, &w), 0);
	ck_assert_int_eq(vmig_stream_write_header(w), 0);
	ck_assert_int_eq(vmig_stream_write_config(w, cfg), 0);
	ck_assert_int_eq(vmig_stream_add_page(w, 0x1000, page, VMIG_COMPRESS_NONE), 0);
	ck_assert_int_eq(vmig_stream_write_iter_end(w, 7, 1), 0);
	ck_assert_int_eq(vmig_stream_write_state(w, "vcpu0/regs", 3, 1, state, sizeof(state)), 0);
	ck_assert_int_eq(vmig_stream_write_state(w, "pit", 1, 0, NULL, 0), 0);
	ck_assert_int_eq(vmig_stream_write_record(w, VMIG_REC_SWITCHOVER, 0, NULL, 0), 0);
	ck_assert_int_eq(vmig_stream_write_record(w, VMIG_REC_COMMIT, 0, NULL, 0), 0);
	ck_assert_int_eq(vmig_stream_write_error(w, VMIG_REC_ERROR, -ENOSPC,
						 "disk full on %s", "host-a"), 0);
	ck_assert_int_eq(vmig_stream_write_record(w, 0x4242, VMIG_REC_OPTIONAL, "xyz", 3), 0);
	ck_assert_int_eq(vmig_stream_finish(w), 0);
	vmig_stream_writer_stats(w, &stats);
	ck_assert_uint_eq(stats.bytes, out->len);
	ck_assert_uint_eq(stats.pending, 0);
	ck_assert_uint_eq(stats.records, 10);
	ck_assert_uint_eq(stats.pages_raw, 1);
	ck_assert_uint_eq(out->len % 8, 0);
	/* After END nothing more can be written. */
	ck_assert_int_eq(vmig_stream_write_record(w, VMIG_REC_COMMIT, 0, NULL, 0), -EINVAL);
	vmig_stream_writer_destroy(w);

	in = mem_new(out->data, out->len, 0);
	ck_assert_int_eq(vmig_stream_reader_create(&in->base, VMIG_STREAM_FORWARD, &r), 0);
	ck_assert_int_eq(vmig_stream_read_header(r, &err), 0);

	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), 0);
	ck_assert_uint_eq(rec.type, VMIG_REC_CONFIG);
	ck_assert_uint_eq(rec.offset, 32);
	ck_assert_int_eq(vmig_stream_parse_config(&rec, &got, &err), 0);
	ck_assert_msg(json_object_equal(cfg, got), "CONFIG differs: %s",
		      json_object_to_json_string(got));
	json_object_put(got);

	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), 0);
	ck_assert_uint_eq(rec.type, VMIG_REC_PAGES);
	{
		uint8_t dst[PAGE];
		struct vmig_mem_region reg = { .gpa = 0x1000, .size = PAGE, .hva = dst };

		ck_assert_int_eq(vmig_stream_pages_apply_regions(&rec, &reg, 1, &err), 0);
		ck_assert(memcmp(dst, page, PAGE) == 0);
	}

	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), 0);
	ck_assert_int_eq(vmig_stream_parse_iter_end(&rec, &it, &pg, &err), 0);
	ck_assert_uint_eq(it, 7);
	ck_assert_uint_eq(pg, 1);

	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), 0);
	ck_assert_int_eq(vmig_stream_parse_state(&rec, &st, &err), 0);
	ck_assert_str_eq(st.name, "vcpu0/regs");
	ck_assert_uint_eq(st.version, 3);
	ck_assert_uint_eq(st.instance, 1);
	ck_assert_uint_eq(st.len, sizeof(state));
	ck_assert(memcmp(st.data, state, sizeof(state)) == 0);
	ck_assert_uint_eq((uintptr_t)st.data % 8, 0);
	ck_assert_uint_eq((uintptr_t)rec.body % 8, 0);

	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), 0);
	ck_assert_int_eq(vmig_stream_parse_state(&rec, &st, &err), 0);
	ck_assert_str_eq(st.name, "pit");
	ck_assert_uint_eq(st.len, 0);

	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), 0);
	ck_assert_uint_eq(rec.type, VMIG_REC_SWITCHOVER);
	ck_assert_uint_eq(rec.len, 0);
	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), 0);
	ck_assert_uint_eq(rec.type, VMIG_REC_COMMIT);

	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), 0);
	ck_assert_uint_eq(rec.type, VMIG_REC_ERROR);
	ck_assert_int_eq(vmig_stream_parse_error(&rec, &e, msg, sizeof(msg), &err), 0);
	ck_assert_int_eq(e, -ENOSPC);
	ck_assert_str_eq(msg, "disk full on host-a");

	/* The optional record 0x4242 is skipped; END comes next. */
	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), 0);
	ck_assert_uint_eq(rec.type, VMIG_REC_END);
	ck_assert_int_eq(vmig_stream_expect_eof(r, &err), 0);
	vmig_stream_reader_stats(r, &stats);
	ck_assert_uint_eq(stats.records, 9);
	ck_assert_uint_eq(stats.records_skipped, 1);
	ck_assert_uint_eq(stats.pages_raw, 1);
	ck_assert_uint_eq(stats.bytes, out->len);
	ck_assert_int_eq(err.code, 0);

	/* Reading past END fails. */
	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), -EPIPE);
	assert_err_has(&err, "already ended with END");

	vmig_stream_reader_destroy(r);
	vmig_transport_close(&in->base);
	vmig_transport_close(&out->base);
	json_object_put(cfg);
}
END_TEST

START_TEST(test_roundtrip_reverse)
{
	struct mem_transport *out = mem_new(NULL, 0, 0), *in;
	struct vmig_stream_writer *w;
	struct vmig_stream_reader *r;
	struct vmig_record rec;
	struct vmig_err err = { 0 };
	char msg[64];
	int e;

	ck_assert_int_eq(vmig_stream_writer_create(&out->base, VMIG_STREAM_REVERSE, &w), 0);
	ck_assert_int_eq(vmig_stream_write_header(w), 0);
	ck_assert_int_eq(vmig_stream_write_record(w, VMIG_REC_READY, 0, NULL, 0), 0);
	ck_assert_int_eq(vmig_stream_write_record(w, VMIG_REC_RUNNING, 0, NULL, 0), 0);
	ck_assert_int_eq(vmig_stream_write_error(w, VMIG_REC_NACK, EINVAL,
						 "refused state: %s", "vcpu1/msrs"), 0);
	/* Forward records and pages do not belong here. */
	ck_assert_int_eq(vmig_stream_write_record(w, VMIG_REC_COMMIT, 0, NULL, 0), -EINVAL);
	ck_assert_int_eq(vmig_stream_write_error(w, VMIG_REC_ERROR, EIO, "x"), -EINVAL);
	ck_assert_int_eq(vmig_stream_add_page(w, 0, msg, VMIG_COMPRESS_NONE), -EINVAL);
	ck_assert_int_eq(vmig_stream_flush(w), 0);
	vmig_stream_writer_destroy(w);

	in = mem_new(out->data, out->len, 0);
	ck_assert_int_eq(vmig_stream_reader_create(&in->base, VMIG_STREAM_REVERSE, &r), 0);
	ck_assert_int_eq(vmig_stream_read_header(r, &err), 0);
	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), 0);
	ck_assert_uint_eq(rec.type, VMIG_REC_READY);
	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), 0);
	ck_assert_uint_eq(rec.type, VMIG_REC_RUNNING);
	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), 0);
	ck_assert_uint_eq(rec.type, VMIG_REC_NACK);
	ck_assert_int_eq(vmig_stream_parse_error(&rec, &e, msg, sizeof(msg), &err), 0);
	ck_assert_int_eq(e, -EINVAL);
	ck_assert_str_eq(msg, "refused state: vcpu1/msrs");
	/* No END in this direction: EOF at a record boundary is reported. */
	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), -EPIPE);
	assert_err_has(&err, "without an END record");
	vmig_stream_reader_destroy(r);
	vmig_transport_close(&in->base);

	/* The same bytes read as a forward stream: READY is out of place. */
	in = mem_new(out->data, out->len, 0);
	ck_assert_int_eq(vmig_stream_reader_create(&in->base, VMIG_STREAM_FORWARD, &r), 0);
	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_stream_read_header(r, &err), 0);
	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), -EPROTO);
	assert_err_has(&err, "READY (0x10) record at stream offset 32 does not belong in the source->destination direction");
	vmig_stream_reader_destroy(r);
	vmig_transport_close(&in->base);
	vmig_transport_close(&out->base);
}
END_TEST

/* Source memory for the page tests: zero, random and compressible pages. */
static void make_source(struct guest *g, size_t npages, uint64_t seed,
			uint64_t *nzero, uint64_t *nraw, uint64_t *nlz4)
{
	rng_state = seed;
	for (size_t i = 0; i < npages; i++) {
		uint8_t *p = g->region.hva + i * PAGE;

		switch (rng() % 3) {
		case 0:
			memset(p, 0, PAGE);
			(*nzero)++;
			break;
		case 1:
			fill_random(p, PAGE);
			(*nraw)++;
			break;
		default:
			fill_compressible(p, rng());
			(*nlz4)++;
			break;
		}
	}
	/* One page zero except its last byte: not a zero page. */
	memset(g->region.hva, 0, PAGE);
	g->region.hva[PAGE - 1] = 1;
}

/* Write every page of @src (and a few records) to @t. */
static void write_pages(struct vmig_transport *t, struct guest *src, unsigned int n,
			enum vmig_compress mode, struct vmig_stream_stats *stats)
{
	struct vmig_stream_writer *w;
	uint64_t total = 0;
	int ret;

	ck_assert_int_eq(vmig_stream_writer_create(t, VMIG_STREAM_FORWARD, &w), 0);
	vmig_stream_writer_set_live(w, live);
	ck_assert_int_eq(vmig_stream_write_header(w), 0);
	for (unsigned int k = 0; k < n; k++) {
		for (uint64_t off = 0; off < src[k].region.size; off += PAGE) {
			ret = vmig_stream_add_page(w, src[k].region.gpa + off,
						   src[k].region.hva + off, mode);
			ck_assert_msg(ret == 0, "add_page: %s", vmig_stream_writer_err(w)->msg);
			total++;
		}
	}
	ck_assert_int_eq(vmig_stream_write_iter_end(w, 0, total), 0);
	ret = vmig_stream_finish(w);
	ck_assert_msg(ret == 0, "finish: %s", vmig_stream_writer_err(w)->msg);
	vmig_stream_writer_stats(w, stats);
	vmig_stream_writer_destroy(w);
}

/* Read it back into @dst (regions helper) and compare with @src. */
static void read_pages(struct vmig_transport *t, struct guest *src, struct guest *dst,
		       unsigned int n, struct vmig_stream_stats *stats)
{
	struct vmig_stream_reader *r;
	struct vmig_mem_region regions[4];
	struct vmig_record rec;
	struct vmig_err err = { 0 };
	int ret;

	for (unsigned int k = 0; k < n; k++) {
		regions[k] = dst[k].region;
		memset(dst[k].region.hva, 0xAA, dst[k].region.size);
	}
	ck_assert_int_eq(vmig_stream_reader_create(t, VMIG_STREAM_FORWARD, &r), 0);
	if (direct)
		ck_assert_int_eq(vmig_stream_reader_set_memory(r, regions, n), 0);
	ck_assert_int_eq(vmig_stream_read_header(r, &err), 0);
	for (;;) {
		ret = vmig_stream_read_record(r, &rec, &err);
		ck_assert_msg(ret == 0, "read_record: %s", err.msg);
		if (rec.type == VMIG_REC_END)
			break;
		if ((rec.type == VMIG_REC_PAGES || rec.type == VMIG_REC_LIVE_PAGES) && !direct) {
			/* Regions given in reverse order: any order works. */
			struct vmig_mem_region rev[4];

			for (unsigned int k = 0; k < n; k++)
				rev[k] = regions[n - 1 - k];
			ret = vmig_stream_pages_apply_regions(&rec, rev, n, &err);
			ck_assert_msg(ret == 0, "apply: %s", err.msg);
		}
	}
	ck_assert_int_eq(vmig_stream_expect_eof(r, &err), 0);
	vmig_stream_reader_stats(r, stats);
	vmig_stream_reader_destroy(r);

	for (unsigned int k = 0; k < n; k++)
		for (uint64_t off = 0; off < src[k].region.size; off += PAGE)
			if (memcmp(src[k].region.hva + off, dst[k].region.hva + off, PAGE))
				ck_abort_msg("page at gpa 0x%llx differs after decoding",
					     (unsigned long long)(src[k].region.gpa + off));
}

struct writer_job {
	struct vmig_transport *t;
	struct guest *src;
	unsigned int n;
	enum vmig_compress mode;
	struct vmig_stream_stats stats;
};

static void *writer_main(void *arg)
{
	struct writer_job *j = arg;

	write_pages(j->t, j->src, j->n, j->mode, &j->stats);
	return NULL;
}

START_TEST(test_pages_socketpair)
{
	struct guest src[2], dst[2];
	uint64_t nzero = 0, nraw = 0, nlz4 = 0;
	struct vmig_transport *a, *b;
	struct writer_job job;
	struct vmig_stream_stats rs;
	pthread_t th;
	int sv[2];

	direct = _i & 1;
	live = _i >> 1;
	/* Two regions, 2600 pages: crosses batch boundaries (1024). */
	guest_init(&src[0], 0, 1024);
	guest_init(&src[1], 0x100000000ull, 1576);
	guest_init(&dst[0], 0, 1024);
	guest_init(&dst[1], 0x100000000ull, 1576);
	make_source(&src[0], 1024, 11, &nzero, &nraw, &nlz4);
	make_source(&src[1], 1576, 12, &nzero, &nraw, &nlz4);
	/* (make_source turned one zero page of each region into a raw one,
	 * or left it: count from the data instead.) */
	nzero = nraw = nlz4 = 0;
	for (int k = 0; k < 2; k++)
		for (uint64_t off = 0; off < src[k].region.size; off += PAGE) {
			uint8_t *p = src[k].region.hva + off, zero[PAGE] = { 0 };
			char tmp[PAGE];

			if (!memcmp(p, zero, PAGE))
				nzero++;
			else if (LZ4_compress_default((char *)p, tmp, PAGE, PAGE - 1) > 0)
				nlz4++;
			else
				nraw++;
		}

	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	ck_assert_int_eq(vmig_transport_from_fds(sv[0], sv[0], &a), 0);
	ck_assert_int_eq(vmig_transport_from_fds(sv[1], sv[1], &b), 0);
	job = (struct writer_job){ .t = a, .src = src, .n = 2, .mode = VMIG_COMPRESS_LZ4 };
	ck_assert_int_eq(pthread_create(&th, NULL, writer_main, &job), 0);
	read_pages(b, src, dst, 2, &rs);
	pthread_join(th, NULL);

	ck_assert_uint_eq(job.stats.pages_zero, nzero);
	ck_assert_uint_eq(job.stats.pages_raw, nraw);
	ck_assert_uint_eq(job.stats.pages_lz4, nlz4);
	ck_assert_uint_eq(rs.pages_zero, nzero);
	ck_assert_uint_eq(rs.pages_raw, nraw);
	ck_assert_uint_eq(rs.pages_lz4, nlz4);
	ck_assert_msg(nzero > 500 && nraw > 500 && nlz4 > 500,
		      "mix: %llu zero, %llu raw, %llu lz4", (unsigned long long)nzero,
		      (unsigned long long)nraw, (unsigned long long)nlz4);
	/* 3 batches of pages + header, ITER_END, END; live: 256 KiB batches. */
	if (live)
		ck_assert_uint_gt(job.stats.records, 5);
	else
		ck_assert_uint_eq(job.stats.records, 5);
	ck_assert_uint_eq(job.stats.bytes, rs.bytes);
	vmig_transport_close(a);
	vmig_transport_close(b);
	for (int k = 0; k < 2; k++) {
		guest_fini(&src[k]);
		guest_fini(&dst[k]);
	}
}
END_TEST

/*
 * @npages pages of make_source(@seed) through a file written with @mode
 * and read back (write_pages/read_pages compare every page); the writer's
 * and the reader's counts in @ws, @rs.
 */
static void file_round_trip(size_t npages, uint64_t seed, enum vmig_compress mode,
			    struct vmig_stream_stats *ws, struct vmig_stream_stats *rs)
{
	struct guest src, dst;
	uint64_t z = 0, rw = 0, l = 0;
	struct vmig_transport *t;
	struct vmig_err err = { 0 };
	char path[] = "/tmp/vmig-test-stream.XXXXXX";
	int fd = mkstemp(path);

	ck_assert_int_ge(fd, 0);
	close(fd);
	guest_init(&src, 0x200000, npages);
	guest_init(&dst, 0x200000, npages);
	make_source(&src, npages, seed, &z, &rw, &l);
	ck_assert_msg(vmig_transport_open_file(path, true, &t, &err) == 0, "%s", err.msg);
	write_pages(t, &src, 1, mode, ws);
	vmig_transport_close(t);
	ck_assert_int_eq(vmig_transport_open_file(path, false, &t, &err), 0);
	read_pages(t, &src, &dst, 1, rs);
	vmig_transport_close(t);
	unlink(path);
	guest_fini(&src);
	guest_fini(&dst);
}

START_TEST(test_pages_file_nocompress)
{
	struct vmig_stream_stats ws, rs;

	direct = _i & 1;
	live = _i >> 1;
	file_round_trip(700, 21, VMIG_COMPRESS_NONE, &ws, &rs);
	ck_assert_uint_eq(ws.pages_lz4, 0);
	ck_assert_uint_eq(ws.pages_zero + ws.pages_raw, 700);
	ck_assert_uint_eq(rs.pages_raw, ws.pages_raw);
	ck_assert_uint_eq(rs.pages_zero, ws.pages_zero);
}
END_TEST

static int decode_records(const uint8_t *recs, size_t rlen, bool no_end,
			  struct guest *g, struct vmig_err *err);

/* --compress auto: every page arrives intact whichever way each batch went. */
START_TEST(test_pages_file_auto)
{
	struct vmig_stream_stats ws, rs;

	direct = _i & 1;
	live = _i >> 1;
	file_round_trip(5000, 33, VMIG_COMPRESS_AUTO, &ws, &rs);
	ck_assert_uint_eq(ws.pages_zero + ws.pages_raw + ws.pages_lz4, 5000);
	ck_assert_uint_eq(rs.pages_raw, ws.pages_raw);
	ck_assert_uint_eq(rs.pages_lz4, ws.pages_lz4);
}
END_TEST

/* --compress auto on pages that do not shrink: they all go raw. */
/*
 * After a long stretch of random data (lz4 failing try after try, each
 * failure waiting longer), compressible data is noticed again within the
 * longest wait (128 batches).
 */
START_TEST(test_auto_comes_back)
{
	struct mem_transport *out = mem_new(NULL, 0, 0);
	struct vmig_stream_writer *w;
	struct vmig_stream_stats ws;
	static uint8_t page[PAGE];
	uint64_t i;

	out->discard = true;
	ck_assert_int_eq(vmig_stream_writer_create(&out->base, VMIG_STREAM_FORWARD, &w), 0);
	ck_assert_int_eq(vmig_stream_write_header(w), 0);
	/* Shrinks by ~3 %: lz4 pages, but batches that do not pay (1/16). */
	fill_random(page, PAGE - 128);
	memset(page + PAGE - 128, 0, 128);
	for (i = 0; i < 200 * 1024; i++)
		ck_assert_int_eq(vmig_stream_add_page(w, i * PAGE, page, VMIG_COMPRESS_AUTO), 0);
	vmig_stream_writer_stats(w, &ws);
	/*
	 * Tries at batches 0, 17, 50 and 115 (waits of 16, 32, 64): four
	 * batches of lz4 pages, where a fixed wait of 16 would try 12 times.
	 */
	ck_assert_uint_eq(ws.pages_lz4, 4 * 1024);
	/* A link at 500 MB/s, where lz4 on this page pays several times over. */
	out->ns_per_byte = 2;
	fill_compressible(page, 7);
	for (; i < 500 * 1024; i++)
		ck_assert_int_eq(vmig_stream_add_page(w, i * PAGE, page, VMIG_COMPRESS_AUTO), 0);
	ck_assert_int_eq(vmig_stream_finish(w), 0);
	vmig_stream_writer_stats(w, &ws);
	/* Back to lz4 within the longest wait (128 batches) of the 300. */
	ck_assert_uint_ge(ws.pages_lz4, (4 + 300 - 129) * 1024);
	vmig_stream_writer_destroy(w);
	vmig_transport_close(&out->base);
}
END_TEST

START_TEST(test_auto_random_goes_raw)
{
	struct mem_transport *out = mem_new(NULL, 0, 0);
	struct vmig_stream_writer *w;
	struct vmig_stream_stats ws;
	static uint8_t page[PAGE];

	ck_assert_int_eq(vmig_stream_writer_create(&out->base, VMIG_STREAM_FORWARD, &w), 0);
	ck_assert_int_eq(vmig_stream_write_header(w), 0);
	for (uint64_t i = 0; i < 20000; i++) {
		fill_random(page, sizeof(page));
		ck_assert_int_eq(vmig_stream_add_page(w, i * PAGE, page, VMIG_COMPRESS_AUTO), 0);
	}
	ck_assert_int_eq(vmig_stream_finish(w), 0);
	vmig_stream_writer_stats(w, &ws);
	ck_assert_uint_eq(ws.pages_raw, 20000);
	ck_assert_uint_eq(ws.pages_lz4, 0);
	vmig_stream_writer_destroy(w);
	vmig_transport_close(&out->base);
}
END_TEST

/* EXTENTS: written, read back, and its rules enforced on both sides. */
START_TEST(test_extents)
{
	struct mem_transport *out = mem_new(NULL, 0, 0), *in;
	struct vmig_stream_writer *w;
	struct vmig_stream_reader *r;
	struct vmig_record rec;
	struct vmig_err err = { 0 };
	struct vmig_stream_extent e[3] = {
		{ 0x0, 0x3000 }, { 0x10000, 0x1000 }, { 0x100000000ull, 0x200000 },
	}, got[3], bad[2];
	struct guest g;
	uint8_t recs[256], body[64];
	uint32_t n;
	size_t len;

	ck_assert_int_eq(vmig_stream_writer_create(&out->base, VMIG_STREAM_FORWARD, &w), 0);
	ck_assert_int_eq(vmig_stream_write_header(w), 0);
	ck_assert_int_eq(vmig_stream_write_extents(w, e, 3), 0);
	/* Writer rules: none, unordered, overlapping, unaligned, empty. */
	ck_assert_int_eq(vmig_stream_write_extents(w, e, 0), -EINVAL);
	bad[0] = e[1];
	bad[1] = e[0];
	ck_assert_int_eq(vmig_stream_write_extents(w, bad, 2), -EINVAL);
	bad[0] = (struct vmig_stream_extent){ 0, 0x2000 };
	bad[1] = (struct vmig_stream_extent){ 0x1000, 0x1000 };
	ck_assert_int_eq(vmig_stream_write_extents(w, bad, 2), -EINVAL);
	bad[0] = (struct vmig_stream_extent){ 0x800, 0x1000 };
	ck_assert_int_eq(vmig_stream_write_extents(w, bad, 1), -EINVAL);
	bad[0] = (struct vmig_stream_extent){ 0x1000, 0 };
	ck_assert_int_eq(vmig_stream_write_extents(w, bad, 1), -EINVAL);
	ck_assert_int_eq(vmig_stream_finish(w), 0);
	vmig_stream_writer_destroy(w);

	in = mem_new(out->data, out->len, 7);
	ck_assert_int_eq(vmig_stream_reader_create(&in->base, VMIG_STREAM_FORWARD, &r), 0);
	ck_assert_int_eq(vmig_stream_read_header(r, &err), 0);
	ck_assert_msg(vmig_stream_read_record(r, &rec, &err) == 0, "%s", err.msg);
	ck_assert_uint_eq(rec.type, VMIG_REC_EXTENTS);
	ck_assert_uint_eq(rec.flags, VMIG_REC_OPTIONAL);
	/* Room for fewer than it holds: refused, not overrun. */
	ck_assert_int_eq(vmig_stream_parse_extents(&rec, got, 2, &n, &err), -EPROTO);
	assert_err_has(&err, "3 extents, more than the 2");
	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_stream_parse_extents(&rec, got, 3, &n, &err), 0);
	ck_assert_uint_eq(n, 3);
	for (unsigned int i = 0; i < 3; i++) {
		ck_assert_uint_eq(got[i].gpa, e[i].gpa);
		ck_assert_uint_eq(got[i].len, e[i].len);
	}
	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), 0);
	ck_assert_uint_eq(rec.type, VMIG_REC_END);
	vmig_stream_reader_destroy(r);
	vmig_transport_close(&in->base);
	vmig_transport_close(&out->base);

	/* Reader rules, on hostile bodies. */
	guest_init(&g, 0, 1);
	memset(body, 0, sizeof(body));
	len = put_record(recs, VMIG_REC_EXTENTS, VMIG_REC_OPTIONAL, body, 8);
	ck_assert_int_eq(decode_records(recs, len, false, &g, &err), -EPROTO);
	assert_err_has(&err, "extent count 0 is out of range");
	le32(body, 2);
	len = put_record(recs, VMIG_REC_EXTENTS, VMIG_REC_OPTIONAL, body, 24);
	ck_assert_int_eq(decode_records(recs, len, false, &g, &err), -EPROTO);
	assert_err_has(&err, "but 2 extents need 40");
	le64(body + 8, 0x2000);
	le64(body + 16, 0x2000);
	le64(body + 24, 0x3000);
	le64(body + 32, 0x1000);
	len = put_record(recs, VMIG_REC_EXTENTS, VMIG_REC_OPTIONAL, body, 40);
	ck_assert_int_eq(decode_records(recs, len, false, &g, &err), -EPROTO);
	assert_err_has(&err, "extent 1 at 0x3000 overlaps");
	le64(body + 24, 0x4000);
	le64(body + 32, 0x10);
	len = put_record(recs, VMIG_REC_EXTENTS, VMIG_REC_OPTIONAL, body, 40);
	ck_assert_int_eq(decode_records(recs, len, false, &g, &err), -EPROTO);
	assert_err_has(&err, "is not a non-empty page-aligned range");
	le64(body + 32, 0x1000);
	len = put_record(recs, VMIG_REC_EXTENTS, VMIG_REC_OPTIONAL, body, 40);
	ck_assert_msg(decode_records(recs, len, false, &g, &err) == 0, "%s", err.msg);
	guest_fini(&g);
}
END_TEST

START_TEST(test_page_twice_later_wins)
{
	struct mem_transport *out = mem_new(NULL, 0, 0);
	struct vmig_stream_writer *w;
	uint8_t a[PAGE], b[PAGE];
	struct guest g;
	struct vmig_err err = { 0 };

	direct = _i & 1;
	live = _i >> 1;
	fill_random(a, PAGE);
	fill_compressible(b, 5);
	guest_init(&g, 0, 4);
	ck_assert_int_eq(vmig_stream_writer_create(&out->base, VMIG_STREAM_FORWARD, &w), 0);
	ck_assert_int_eq(vmig_stream_write_header(w), 0);
	ck_assert_int_eq(vmig_stream_add_page(w, 0x2000, a, VMIG_COMPRESS_LZ4), 0);
	ck_assert_int_eq(vmig_stream_add_page(w, 0x2000, b, VMIG_COMPRESS_LZ4), 0);
	/* Unaligned addresses are refused, and do not break the writer. */
	ck_assert_int_eq(vmig_stream_add_page(w, 0x2001, b, VMIG_COMPRESS_LZ4), -EINVAL);
	ck_assert_int_eq(vmig_stream_finish(w), 0);
	vmig_stream_writer_destroy(w);
	ck_assert_int_eq(decode_all(out->data, out->len, 0, &g, 1, &err), 0);
	ck_assert(memcmp(g.region.hva + 0x2000, b, PAGE) == 0);
	guest_fini(&g);
	vmig_transport_close(&out->base);
}
END_TEST

/*
 * LIVE_PAGES: a page the "guest" writes between add_page and the flush
 * arrives torn; the reader does not fail, counts it, and a later copy
 * clears it.  Both read paths: direct (ascending batch) and whole-record
 * (a batch that names a page twice).
 */
static uint64_t read_torn(const uint8_t *data, size_t len, struct guest *g,
			  uint64_t *torn_gpa, uint64_t *torn_seen)
{
	struct mem_transport *m = mem_new(data, len, 0);
	struct vmig_stream_reader *r;
	struct vmig_stream_stats rs;
	struct vmig_record rec;
	struct vmig_err err = { 0 };
	uint64_t n;

	ck_assert_int_eq(vmig_stream_reader_create(&m->base, VMIG_STREAM_FORWARD, &r), 0);
	ck_assert_int_eq(vmig_stream_reader_set_memory(r, &g->region, 1), 0);
	ck_assert_int_eq(vmig_stream_read_header(r, &err), 0);
	do {
		ck_assert_msg(vmig_stream_read_record(r, &rec, &err) == 0, "%s", err.msg);
	} while (rec.type != VMIG_REC_END);
	n = vmig_stream_reader_torn(r, torn_gpa);
	vmig_stream_reader_stats(r, &rs);
	*torn_seen = rs.pages_torn;
	vmig_stream_reader_destroy(r);
	vmig_transport_close(&m->base);
	return n;
}

START_TEST(test_live_torn_pages)
{
	struct guest src, dst;
	struct mem_transport *out;
	struct vmig_stream_writer *w;
	struct vmig_err err = { 0 };
	uint64_t gpa, seen, i;
	uint8_t before[PAGE];
	bool twice = _i;

	guest_init(&src, 0x100000, 16);
	guest_init(&dst, 0x100000, 16);
	fill_random(src.region.hva, 16 * PAGE);

	/* Pass 1: page 5 changes after its checksum, before it is sent. */
	out = mem_new(NULL, 0, 0);
	ck_assert_int_eq(vmig_stream_writer_create(&out->base, VMIG_STREAM_FORWARD, &w), 0);
	vmig_stream_writer_set_live(w, true);
	ck_assert_int_eq(vmig_stream_write_header(w), 0);
	for (i = 0; i < 16; i++)
		ck_assert_int_eq(vmig_stream_add_page(w, 0x100000 + i * PAGE,
						      src.region.hva + i * PAGE,
						      VMIG_COMPRESS_NONE), 0);
	if (twice)   /* page 2 again: not ascending, read whole */
		ck_assert_int_eq(vmig_stream_add_page(w, 0x102000, src.region.hva + 2 * PAGE,
						      VMIG_COMPRESS_NONE), 0);
	memcpy(before, src.region.hva + 5 * PAGE, PAGE);
	src.region.hva[5 * PAGE + 100] ^= 0xff;
	ck_assert_int_eq(vmig_stream_flush_pages(w), 0);
	ck_assert_int_eq(vmig_stream_write_iter_end(w, 0, 16), 0);
	/* The stream so far ends here for the first read. */
	ck_assert_int_eq(vmig_stream_flush(w), 0);
	{
		size_t cut = out->len;
		uint8_t *copy = malloc(cut + 24);
		size_t k;

		ck_assert(copy);
		memcpy(copy, out->data, cut);
		/* An END record so the reader can stop. */
		k = cut + put_record(copy + cut, VMIG_REC_END, 0, NULL, 0);
		ck_assert_uint_eq(read_torn(copy, k, &dst, &gpa, &seen), 1);
		ck_assert_uint_eq(gpa, 0x105000);
		ck_assert_uint_eq(seen, 1);
		for (i = 0; i < 16; i++)
			if (i != 5)
				ck_assert_msg(!memcmp(dst.region.hva + i * PAGE,
						      src.region.hva + i * PAGE, PAGE),
					      "page %llu differs", (unsigned long long)i);
		free(copy);
	}
	/* Without the reader's tracking, a torn page is an error. */
	direct = false;
	{
		size_t cut = out->len;
		uint8_t *copy = malloc(cut + 24);

		ck_assert(copy);
		memcpy(copy, out->data, cut);
		cut += put_record(copy + cut, VMIG_REC_END, 0, NULL, 0);
		ck_assert_int_eq(decode_all(copy, cut, 0, &dst, 1, &err), -EBADMSG);
		assert_err_has(&err, "at gpa 0x105000: its payload does not match its checksum");
		free(copy);
	}

	/* Pass 2: the dirty log sends page 5 again; nothing is torn any more. */
	ck_assert_int_eq(vmig_stream_add_page(w, 0x105000, src.region.hva + 5 * PAGE,
					      VMIG_COMPRESS_NONE), 0);
	ck_assert_int_eq(vmig_stream_write_iter_end(w, 1, 1), 0);
	ck_assert_int_eq(vmig_stream_finish(w), 0);
	vmig_stream_writer_destroy(w);
	memset(dst.region.hva, 0, 16 * PAGE);
	ck_assert_uint_eq(read_torn(out->data, out->len, &dst, &gpa, &seen), 0);
	ck_assert_uint_eq(seen, 1);
	ck_assert(!memcmp(dst.region.hva, src.region.hva, 16 * PAGE));
	ck_assert(memcmp(before, src.region.hva + 5 * PAGE, PAGE));
	vmig_transport_close(&out->base);
	guest_fini(&src);
	guest_fini(&dst);
}
END_TEST

START_TEST(test_big_records)
{
	struct mem_transport *out = mem_new(NULL, 0, 0), *in;
	struct vmig_stream_writer *w;
	struct vmig_stream_reader *r;
	struct vmig_record rec;
	struct vmig_stream_state st;
	struct vmig_err err = { 0 };
	size_t big = (3u << 20) + 5;
	uint8_t *data = malloc(big);

	ck_assert(data);
	fill_random(data, big);
	ck_assert_int_eq(vmig_stream_writer_create(&out->base, VMIG_STREAM_FORWARD, &w), 0);
	ck_assert_int_eq(vmig_stream_write_header(w), 0);
	ck_assert_int_eq(vmig_stream_write_state(w, "big", 1, 0, data, big), 0);
	ck_assert_int_eq(vmig_stream_write_record(w, 0x7777, VMIG_REC_OPTIONAL, data, big), 0);
	ck_assert_int_eq(vmig_stream_write_state(w, "small", 1, 0, data, 10), 0);
	ck_assert_int_eq(vmig_stream_write_record(w, VMIG_REC_END, 0, NULL, 0), 0);
	ck_assert_int_eq(vmig_stream_flush(w), 0);
	vmig_stream_writer_destroy(w);

	/* Read back in odd-sized pieces, so records straddle reads. */
	in = mem_new(out->data, out->len, 7919);
	ck_assert_int_eq(vmig_stream_reader_create(&in->base, VMIG_STREAM_FORWARD, &r), 0);
	ck_assert_int_eq(vmig_stream_read_header(r, &err), 0);
	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), 0);
	ck_assert_int_eq(vmig_stream_parse_state(&rec, &st, &err), 0);
	ck_assert_str_eq(st.name, "big");
	ck_assert_uint_eq(st.len, big);
	ck_assert(memcmp(st.data, data, big) == 0);
	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), 0);
	ck_assert_int_eq(vmig_stream_parse_state(&rec, &st, &err), 0);
	ck_assert_str_eq(st.name, "small");
	ck_assert(memcmp(st.data, data, 10) == 0);
	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), 0);
	ck_assert_uint_eq(rec.type, VMIG_REC_END);
	ck_assert_int_eq(vmig_stream_expect_eof(r, &err), 0);
	vmig_stream_reader_destroy(r);
	vmig_transport_close(&in->base);
	vmig_transport_close(&out->base);
	free(data);
}
END_TEST

/* ------------------------------------------------------------------------
 * A small stream, truncated at every byte and with every bit flipped
 */

static uint8_t *small_stream(size_t *len)
{
	struct mem_transport *out = mem_new(NULL, 0, 0);
	struct vmig_stream_writer *w;
	struct json_object *cfg = json_tokener_parse("{\"vcpus\":1}");
	uint8_t page[PAGE], zero[PAGE] = { 0 }, state[24];
	uint8_t *data;

	rng_state = 99;
	fill_random(page, PAGE);
	fill_random(state, sizeof(state));
	ck_assert_int_eq(vmig_stream_writer_create(&out->base, VMIG_STREAM_FORWARD, &w), 0);
	vmig_stream_writer_set_live(w, live);
	ck_assert_int_eq(vmig_stream_write_header(w), 0);
	ck_assert_int_eq(vmig_stream_write_config(w, cfg), 0);
	ck_assert_int_eq(vmig_stream_add_page(w, 0x0000, zero, VMIG_COMPRESS_LZ4), 0);
	ck_assert_int_eq(vmig_stream_add_page(w, 0x1000, page, VMIG_COMPRESS_LZ4), 0);
	fill_compressible(page, 3);
	ck_assert_int_eq(vmig_stream_add_page(w, 0x3000, page, VMIG_COMPRESS_LZ4), 0);
	ck_assert_int_eq(vmig_stream_write_iter_end(w, 0, 3), 0);
	ck_assert_int_eq(vmig_stream_write_state(w, "pit", 1, 0, state, sizeof(state)), 0);
	ck_assert_int_eq(vmig_stream_finish(w), 0);
	vmig_stream_writer_destroy(w);
	json_object_put(cfg);
	data = out->data;
	*len = out->len;
	out->owned = false;
	vmig_transport_close(&out->base);
	return data;
}

START_TEST(test_truncated_everywhere)
{
	size_t len;
	uint8_t *data = small_stream(&len);
	struct guest g;
	struct vmig_err err = { 0 };
	int ret;

	direct = _i & 1;
	live = _i >> 1;
	guest_init(&g, 0, 4);
	ret = decode_all(data, len, 0, &g, 1, &err);
	ck_assert_msg(ret == 0, "full stream: %s", err.msg);
	/* Also when the transport hands out one byte at a time. */
	ck_assert_int_eq(decode_all(data, len, 1, &g, 1, &err), 0);

	for (size_t cut = 0; cut < len; cut++) {
		vmig_err_clear(&err);
		ret = decode_all(data, cut, cut % 2 ? 13 : 0, &g, 1, &err);
		ck_assert_msg(ret == -EPIPE, "cut at %zu of %zu: got %d (%s)", cut, len, ret,
			      err.msg);
		ck_assert_msg(err.code == ret && err.msg[0], "cut at %zu: no message", cut);
		if (cut > 32 && cut < len - 24)
			ck_assert_msg(strstr(err.msg, "truncated") || strstr(err.msg, "without an END"),
				      "cut at %zu: %s", cut, err.msg);
	}
	/* Spot-check the wording at a few places. */
	decode_all(data, 0, 0, &g, 1, &err);
	vmig_err_clear(&err);
	decode_all(data, 0, 0, &g, 1, &err);
	assert_err_has(&err, "sent no data");
	vmig_err_clear(&err);
	decode_all(data, 20, 0, &g, 1, &err);
	assert_err_has(&err, "the stream ended after 20 bytes, inside its 32-byte header");
	vmig_err_clear(&err);
	decode_all(data, 40, 0, &g, 1, &err);
	assert_err_has(&err, "truncated at offset 40, inside the header of the record at offset 32 (8 of 16 bytes)");
	vmig_err_clear(&err);
	decode_all(data, 50, 0, &g, 1, &err);
	assert_err_has(&err, "truncated at offset 50, inside the CONFIG (0x1) record at offset 32");
	vmig_err_clear(&err);
	decode_all(data, len - 24, 0, &g, 1, &err);
	assert_err_has(&err, "without an END record");
	guest_fini(&g);
	free(data);
}
END_TEST

START_TEST(test_bitflips_everywhere)
{
	size_t len;
	uint8_t *data = small_stream(&len), *copy = malloc(len);
	struct guest g;
	struct vmig_err err = { 0 };
	unsigned long crc_errors = 0, other = 0;

	direct = _i & 1;
	live = _i >> 1;
	ck_assert(copy);
	guest_init(&g, 0, 4);
	for (size_t bit = 0; bit < len * 8; bit++) {
		int ret;

		memcpy(copy, data, len);
		copy[bit / 8] ^= (uint8_t)(1u << (bit % 8));
		vmig_err_clear(&err);
		ret = decode_all(copy, len, 0, &g, 1, &err);
		ck_assert_msg(ret < 0, "bit %zu (byte %zu) flipped: accepted", bit, bit / 8);
		ck_assert_msg(err.code == ret && err.msg[0], "bit %zu: no message", bit);
		if (ret == -EBADMSG)
			crc_errors++;
		else
			other++;
	}
	/* Most flips land in record bodies and are caught by the checksum. */
	fprintf(stderr, "bit flips: %zu bits, %lu checksum errors, %lu others\n",
		len * 8, crc_errors, other);
	ck_assert_msg(crc_errors > len * 8 * 3 / 4, "%lu checksum errors, %lu others",
		      crc_errors, other);
	guest_fini(&g);
	free(data);
	free(copy);
}
END_TEST

/* ------------------------------------------------------------------------
 * Hand-made bad streams
 */

/* Header + the given records (+ END unless @no_end), decoded into @g. */
static int decode_records(const uint8_t *recs, size_t rlen, bool no_end,
			  struct guest *g, struct vmig_err *err)
{
	uint8_t *buf = malloc(32 + rlen + 24);
	size_t n;
	int ret;

	ck_assert(buf);
	n = put_header(buf, 1);
	memcpy(buf + n, recs, rlen);
	n += rlen;
	if (!no_end)
		n += put_record(buf + n, VMIG_REC_END, 0, NULL, 0);
	vmig_err_clear(err);
	ret = decode_all(buf, n, 0, g, 1, err);
	free(buf);
	return ret;
}

START_TEST(test_bad_header)
{
	uint8_t buf[128];
	struct guest g;
	struct vmig_err err = { 0 };

	guest_init(&g, 0, 1);
	put_header(buf, 1);
	memcpy(buf, "GARBAGE!", 8);
	put_record(buf + 32, VMIG_REC_END, 0, NULL, 0);
	ck_assert_int_eq(decode_all(buf, 56, 0, &g, 1, &err), -EPROTO);
	assert_err_has(&err, "not a vmig stream (it starts with \"GARBAGE!\", expected \"VMIGSTRM\")");

	/* Short and not vmig: still "not a vmig stream". */
	vmig_err_clear(&err);
	ck_assert_int_eq(decode_all("SSH-2.0-OpenSSH_9.2\r\n", 21, 0, &g, 1, &err), -EPROTO);
	assert_err_has(&err, "not a vmig stream (it starts with \"SSH-2.0-\"");

	put_header(buf, 3);
	vmig_err_clear(&err);
	ck_assert_int_eq(decode_all(buf, 56, 0, &g, 1, &err), -EPROTONOSUPPORT);
	assert_err_has(&err, "stream version 3 is not supported by this vmig (supports 1 to 2)");
	put_header(buf, 0);
	vmig_err_clear(&err);
	ck_assert_int_eq(decode_all(buf, 56, 0, &g, 1, &err), -EPROTONOSUPPORT);
	/* Version 2 (LIVE_PAGES) is read; LIVE_PAGES in a version-1 stream is not. */
	put_header(buf, 2);
	vmig_err_clear(&err);
	ck_assert_int_eq(decode_all(buf, 56, 0, &g, 1, &err), 0);

	put_header(buf, 1);
	le32(buf + 12, 40);
	vmig_err_clear(&err);
	ck_assert_int_eq(decode_all(buf, 56, 0, &g, 1, &err), -EPROTO);
	assert_err_has(&err, "stream header size is 40 (expected 32 for version 1)");

	put_header(buf, 1);
	le64(buf + 16, 4);
	vmig_err_clear(&err);
	ck_assert_int_eq(decode_all(buf, 56, 0, &g, 1, &err), -EPROTO);
	assert_err_has(&err, "stream header flags are 0x4");

	put_header(buf, 1);
	buf[31] = 1;
	vmig_err_clear(&err);
	ck_assert_int_eq(decode_all(buf, 56, 0, &g, 1, &err), -EPROTO);
	assert_err_has(&err, "reserved field");
	{
		uint8_t body[8 + 16];
		size_t k = put_header(buf, 1);

		memset(body, 0, sizeof(body));
		le32(body, 1);
		le64(body + 8, 0);             /* one ZERO page */
		k += put_record(buf + k, VMIG_REC_LIVE_PAGES, 0, body, sizeof(body));
		k += put_record(buf + k, VMIG_REC_END, 0, NULL, 0);
		vmig_err_clear(&err);
		ck_assert_int_eq(decode_all(buf, k, 0, &g, 1, &err), -EPROTO);
		assert_err_has(&err, "LIVE_PAGES (0xb) record at stream offset 32 in a version-1 stream (it needs version 2)");
		le32(buf + 8, 2);
		vmig_err_clear(&err);
		ck_assert_msg(decode_all(buf, k, 0, &g, 1, &err) == 0, "%s", err.msg);
	}
	guest_fini(&g);
}
END_TEST

START_TEST(test_bad_framing)
{
	uint8_t recs[256], body[32] = { 0 };
	struct guest g;
	struct vmig_err err = { 0 };
	size_t n;

	direct = _i & 1;
	live = _i >> 1;
	guest_init(&g, 0, 1);

	/* A length over the limit: refused before reading (or allocating) it. */
	n = put_record_ex(recs, VMIG_REC_STATE, 0, VMIG_STREAM_MAX_RECORD + 1ull, NULL, 0, 0, 0, 0);
	ck_assert_int_eq(decode_records(recs, n, true, &g, &err), -EMSGSIZE);
	assert_err_has(&err, "STATE (0x4) record at stream offset 32 claims a 67108865-byte body, more than the 67108864-byte maximum");
	n = put_record_ex(recs, VMIG_REC_PAGES, 0, UINT64_MAX, NULL, 0, 0, 0, 0);
	ck_assert_int_eq(decode_records(recs, n, true, &g, &err), -EMSGSIZE);

	/* A plausible length with the body missing: truncated, not a hang. */
	n = put_record_ex(recs, VMIG_REC_STATE, 0, 60u << 20, NULL, 0, 0, 0, 0);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPIPE);
	assert_err_has(&err, "truncated");

	n = put_record_ex(recs, VMIG_REC_COMMIT, 0, 0, NULL, 0, 0, 0x10, 0);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EBADMSG);
	assert_err_has(&err, "checksum mismatch in the COMMIT (0x6) record at stream offset 32");

	n = put_record_ex(recs, VMIG_REC_ITER_END, 0, 13, body, 13, 0xee, 0, 0);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "padding byte 0 is 0xee");

	n = put_record_ex(recs, VMIG_REC_COMMIT, 0, 0, NULL, 0, 0, 0, 7);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "trailer word after the checksum is 0x7");

	n = put_record(recs, VMIG_REC_COMMIT, 0x2, NULL, 0);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "COMMIT (0x6) record at stream offset 32 has unknown flags 0x2");

	n = put_record(recs, 0x99, 0, "abc", 3);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "unknown mandatory record type 0x99 at stream offset 32");

	/* Unknown and optional: skipped, the stream goes on. */
	n = put_record(recs, 0x99, VMIG_REC_OPTIONAL, "abc", 3);
	n += put_record(recs + n, 0x12345678, VMIG_REC_OPTIONAL, NULL, 0);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), 0);

	/* A known type is never skipped, optional or not. */
	n = put_record(recs, VMIG_REC_ITER_END, VMIG_REC_OPTIONAL, body, 8);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "ITER_END (0x3) record at stream offset 32: body is 8 bytes (expected 16)");

	n = put_record(recs, VMIG_REC_ITER_END, 0, body, 24);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EMSGSIZE);
	assert_err_has(&err, "has a 24-byte body (at most 16)");

	n = put_record(recs, VMIG_REC_SWITCHOVER, 0, body, 8);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EMSGSIZE);

	n = put_record(recs, VMIG_REC_RUNNING, 0, NULL, 0);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "does not belong in the source->destination direction");

	/* Anything after END is an error. */
	n = put_record(recs, VMIG_REC_END, 0, NULL, 0);
	n += put_record(recs + n, VMIG_REC_COMMIT, 0, NULL, 0);
	ck_assert_int_eq(decode_records(recs, n, true, &g, &err), -EPROTO);
	assert_err_has(&err, "data follows the END record at stream offset 56");
	n = put_record(recs, VMIG_REC_END, 0, NULL, 0);
	recs[n++] = 0;
	ck_assert_int_eq(decode_records(recs, n, true, &g, &err), -EPROTO);

	/* An ERROR record from the sender surfaces with its reason. */
	n = put_record(recs, VMIG_REC_ERROR, 0, "\x1c\0\0\0disk full", 13);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -ENOSPC);
	assert_err_has(&err, "sender failed: disk full");
	guest_fini(&g);
}
END_TEST

/* A PAGES body of @count descriptors (gpa|enc, len), then @payload. */
static size_t pages_body(uint8_t *b, uint32_t count, const uint64_t *words,
			 const uint32_t *lens, const void *payload, size_t plen)
{
	le32(b, count);
	le32(b + 4, 0);
	for (uint32_t i = 0; i < count; i++) {
		le64(b + 8 + 16 * i, words[i]);
		le32(b + 16 + 16 * i, lens[i]);
		le32(b + 20 + 16 * i, 0);
	}
	memcpy(b + 8 + 16 * count, payload, plen);
	return 8 + 16 * count + plen;
}

START_TEST(test_bad_pages)
{
	static uint8_t recs[2 * PAGE + 20000], body[2 * PAGE + 20000];
	uint8_t page[PAGE], lz4[PAGE], half[PAGE];
	uint64_t words[2];
	uint32_t lens[2];
	struct guest g;
	struct vmig_err err = { 0 };
	size_t n, blen;
	int clen, chalf;

	direct = _i & 1;
	live = _i >> 1;
	guest_init(&g, 0x10000, 4);   /* gpa 0x10000 .. 0x14000 */
	fill_random(page, PAGE);
	fill_compressible(half, 9);
	clen = LZ4_compress_default((char *)half, (char *)lz4, PAGE, PAGE);
	ck_assert_int_gt(clen, 0);

	/* Sanity: a good one. */
	words[0] = 0x11000 | VMIG_PAGE_RAW;
	lens[0] = PAGE;
	blen = pages_body(body, 1, words, lens, page, PAGE);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), 0);
	ck_assert(memcmp(g.region.hva + 0x1000, page, PAGE) == 0);

	/* Count 0 and 1025. */
	le32(body, 0);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "PAGES (0x2) record at stream offset 32: page count 0 is out of range (1 to 1024)");
	le32(body, 1025);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "page count 1025 is out of range");
	/* Count larger than the descriptors present. */
	le32(body, 300);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "too short for 300 page descriptors");
	n = put_record(recs, VMIG_REC_PAGES, 0, body, 4);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "too short for the 8-byte page count header");

	/* Reserved words. */
	blen = pages_body(body, 1, words, lens, page, PAGE);
	le32(body + 4, 1);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "reserved word after the count is 0x1");
	blen = pages_body(body, 1, words, lens, page, PAGE);
	le32(body + 20, 5);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "page 0 of 1 (gpa 0x11000): reserved word is 0x5");

	/* Unknown encoding; lengths that do not match the encoding. */
	words[0] = 0x11000 | 3;
	blen = pages_body(body, 1, words, lens, page, PAGE);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "page 0 of 1 (gpa 0x11000) has unknown encoding 3 (expected 0 ZERO, 1 RAW or 2 LZ4)");
	words[0] = 0x11000 | 0xfff;
	blen = pages_body(body, 1, words, lens, page, PAGE);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "unknown encoding 4095");

	words[0] = 0x11000 | VMIG_PAGE_ZERO;
	lens[0] = 8;
	blen = pages_body(body, 1, words, lens, page, 8);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "(gpa 0x11000, ZERO) has payload length 8 (expected 0)");

	words[0] = 0x11000 | VMIG_PAGE_RAW;
	lens[0] = PAGE - 1;
	blen = pages_body(body, 1, words, lens, page, PAGE - 1);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "RAW) has payload length 4095 (expected 4096)");

	words[0] = 0x11000 | VMIG_PAGE_LZ4;
	lens[0] = PAGE;
	blen = pages_body(body, 1, words, lens, page, PAGE);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "LZ4) has payload length 4096 (expected 1 to 4095)");
	lens[0] = 0;
	blen = pages_body(body, 1, words, lens, page, 0);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);

	/* Payload lengths must add up to exactly what follows. */
	words[0] = 0x11000 | VMIG_PAGE_RAW;
	lens[0] = PAGE;
	blen = pages_body(body, 1, words, lens, page, PAGE);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen + 1);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "payload lengths of the 1 pages add up to 4096 bytes, but 4097 bytes follow the descriptors");
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen - 1);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "but 4095 bytes follow");

	/* Outside guest memory: nothing of the batch is written. */
	memset(g.region.hva, 0x55, 4 * PAGE);
	words[0] = 0x12000 | VMIG_PAGE_ZERO;
	lens[0] = 0;
	words[1] = 0x14000 | VMIG_PAGE_RAW;   /* one past the end */
	lens[1] = PAGE;
	blen = pages_body(body, 2, words, lens, page, PAGE);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -ERANGE);
	assert_err_has(&err, "page 1 of 2 at gpa 0x14000 lies outside guest memory");
	for (size_t i = 0; i < 4 * PAGE; i++)
		ck_assert_msg(g.region.hva[i] == 0x55, "byte %zu written", i);
	words[1] = 0xf000 | VMIG_PAGE_RAW;    /* one before the start */
	blen = pages_body(body, 2, words, lens, page, PAGE);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -ERANGE);
	assert_err_has(&err, "gpa 0xf000 lies outside guest memory");
	words[1] = 0xfffffffffffff000ull | VMIG_PAGE_RAW;
	blen = pages_body(body, 2, words, lens, page, PAGE);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -ERANGE);

	/* LZ4 that decodes to fewer than 4096 bytes, and garbage LZ4. */
	chalf = LZ4_compress_default((char *)half, (char *)lz4, PAGE / 2, PAGE);
	ck_assert_int_gt(chalf, 0);
	words[0] = 0x11000 | VMIG_PAGE_LZ4;
	lens[0] = (uint32_t)chalf;
	blen = pages_body(body, 1, words, lens, lz4, (size_t)chalf);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "page 0 of 1 at gpa 0x11000: its LZ4 payload decodes to 2048 bytes (expected 4096)");
	memset(lz4, 0xff, 100);
	lens[0] = 100;
	blen = pages_body(body, 1, words, lens, lz4, 100);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "LZ4 payload is corrupt");

	/* A good LZ4 page for contrast. */
	clen = LZ4_compress_default((char *)half, (char *)lz4, PAGE, PAGE);
	lens[0] = (uint32_t)clen;
	blen = pages_body(body, 1, words, lens, lz4, (size_t)clen);
	n = put_record(recs, VMIG_REC_PAGES, 0, body, blen);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), 0);
	ck_assert(memcmp(g.region.hva + 0x1000, half, PAGE) == 0);
	guest_fini(&g);
}
END_TEST

START_TEST(test_bad_state_error_config)
{
	uint8_t recs[512], body[256];
	struct guest g;
	struct vmig_err err = { 0 };
	size_t n;

	guest_init(&g, 0, 1);

	/* STATE: u16 name length, u16 version, u32 instance, name, pad. */
	memset(body, 0, sizeof(body));
	le16(body, 0);
	n = put_record(recs, VMIG_REC_STATE, 0, body, 16);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "section name length 0 is out of range (1 to 64)");
	le16(body, 65);
	n = put_record(recs, VMIG_REC_STATE, 0, body, 200);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "section name length 65");
	le16(body, 20);
	n = put_record(recs, VMIG_REC_STATE, 0, body, 16);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "too short for a 20-byte section name");
	le16(body, 3);
	memcpy(body + 8, "p\nt", 3);
	n = put_record(recs, VMIG_REC_STATE, 0, body, 16);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "section name has byte 0x0a at 1");
	memcpy(body + 8, "pit", 3);
	body[12] = 1;
	n = put_record(recs, VMIG_REC_STATE, 0, body, 16);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "padding after the section name 'pit' is not zero");
	n = put_record(recs, VMIG_REC_STATE, 0, body, 6);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "shorter than the 8-byte section header");

	/* ERROR: errno range, UTF-8. */
	n = put_record(recs, VMIG_REC_ERROR, 0, "\0\0\0\0oops", 8);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "errno 0 is out of range");
	n = put_record(recs, VMIG_REC_ERROR, 0, "\x05\0\0\0bad \xff byte", 14);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "message is not UTF-8 text (bad byte 0xff at 4)");
	n = put_record(recs, VMIG_REC_ERROR, 0, "\x05\0\0\0\xed\xa0\x80", 7);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	n = put_record(recs, VMIG_REC_ERROR, 0, "\x05\0", 2);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);

	/* CONFIG: JSON object only. */
	n = put_record(recs, VMIG_REC_CONFIG, 0, "[1,2]", 5);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "CONFIG (0x1) record at stream offset 32: body is a JSON array, not an object");
	n = put_record(recs, VMIG_REC_CONFIG, 0, "{\"a\":", 5);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "not valid JSON");
	n = put_record(recs, VMIG_REC_CONFIG, 0, "{} {}", 5);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "not valid JSON: unexpected character (at byte 3)");
	n = put_record(recs, VMIG_REC_CONFIG, 0, "\"a\"", 3);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "body is a JSON string, not an object");
	n = put_record(recs, VMIG_REC_CONFIG, 0, "1", 1);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "not valid JSON: unexpected end");
	n = put_record(recs, VMIG_REC_CONFIG, 0, " {}\n", 4);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), 0);
	n = put_record(recs, VMIG_REC_CONFIG, 0, "{\"a\":\"\xc3\x28\"}", 10);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	n = put_record(recs, VMIG_REC_CONFIG, 0, NULL, 0);
	ck_assert_int_eq(decode_records(recs, n, false, &g, &err), -EPROTO);
	assert_err_has(&err, "body is empty");
	guest_fini(&g);
}
END_TEST

START_TEST(test_error_message_sanitised)
{
	struct vmig_record rec = { .type = VMIG_REC_NACK, .offset = 100 };
	uint8_t body[64];
	char msg[64];
	struct vmig_err err = { 0 };
	int e;

	/* ESC, a C1 control, a newline: '?'; é stays. */
	memcpy(body, "\x16\0\0\0a\x1b[2Jb\xc2\x9b" "c\n\xc3\xa9", 16);
	rec.body = body;
	rec.len = 16;
	ck_assert_int_eq(vmig_stream_parse_error(&rec, &e, msg, sizeof(msg), &err), 0);
	ck_assert_int_eq(e, -EINVAL);
	ck_assert_str_eq(msg, "a?[2Jb?c?\xc3\xa9");
	/* Cut to fit, at a character boundary. */
	ck_assert_int_eq(vmig_stream_parse_error(&rec, &e, msg, 11, &err), 0);
	ck_assert_str_eq(msg, "a?[2Jb?c?");

	/* Parsers refuse records of another type. */
	rec.type = VMIG_REC_STATE;
	ck_assert_int_eq(vmig_stream_parse_error(&rec, &e, msg, sizeof(msg), &err), -EINVAL);
	assert_err_has(&err, "STATE (0x4) record at stream offset 100: expected an ERROR or NACK record");
}
END_TEST

START_TEST(test_writer_misuse)
{
	struct mem_transport *out = mem_new(NULL, 0, 0);
	struct vmig_stream_writer *w;
	uint8_t page[PAGE] = { 1 };
	char name[80];

	ck_assert_int_eq(vmig_stream_writer_create(&out->base, VMIG_STREAM_FORWARD, &w), 0);
	ck_assert_int_eq(vmig_stream_write_record(w, VMIG_REC_COMMIT, 0, NULL, 0), -EINVAL);
	ck_assert_int_eq(vmig_stream_add_page(w, 0, page, VMIG_COMPRESS_NONE), -EINVAL);
	ck_assert_int_eq(vmig_stream_write_header(w), 0);
	ck_assert_int_eq(vmig_stream_write_header(w), -EINVAL);
	ck_assert_int_eq(vmig_stream_write_record(w, VMIG_REC_COMMIT, 2, NULL, 0), -EINVAL);
	ck_assert_int_eq(vmig_stream_write_record(w, VMIG_REC_READY, 0, NULL, 0), -EINVAL);
	ck_assert_int_eq(vmig_stream_write_record(w, VMIG_REC_STATE, 0, NULL, 5), -EINVAL);
	ck_assert_int_eq(vmig_stream_write_record(w, 0x99, 0, page,
						  VMIG_STREAM_MAX_RECORD + 1ul), -EINVAL);
	ck_assert_int_eq(vmig_stream_write_state(w, "", 1, 0, NULL, 0), -EINVAL);
	ck_assert_int_eq(vmig_stream_write_state(w, "a b", 1, 0, NULL, 0), -EINVAL);
	memset(name, 'n', sizeof(name));
	name[65] = '\0';
	ck_assert_int_eq(vmig_stream_write_state(w, name, 1, 0, NULL, 0), -EINVAL);
	name[64] = '\0';
	ck_assert_int_eq(vmig_stream_write_state(w, name, 1, 0, NULL, 0), 0);
	ck_assert_int_eq(vmig_stream_write_error(w, VMIG_REC_COMMIT, 1, "x"), -EINVAL);
	{
		struct json_object *arr = json_object_new_array();

		ck_assert_int_eq(vmig_stream_write_config(w, arr), -EINVAL);
		json_object_put(arr);
	}
	/* None of that broke the stream. */
	ck_assert_int_eq(vmig_stream_writer_err(w)->code, 0);
	ck_assert_int_eq(vmig_stream_finish(w), 0);
	vmig_stream_writer_destroy(w);
	vmig_stream_writer_destroy(NULL);
	vmig_stream_reader_destroy(NULL);
	vmig_transport_close(&out->base);
}
END_TEST

START_TEST(test_writer_long_error_message)
{
	struct mem_transport *out = mem_new(NULL, 0, 0), *in;
	struct vmig_stream_writer *w;
	struct vmig_stream_reader *r;
	struct vmig_record rec;
	struct vmig_err err = { 0 };
	char *big = malloc(10000), msg[8192];
	int e;

	memset(big, 'x', 9999);
	big[9999] = '\0';
	big[0] = (char)0xff;   /* not UTF-8: becomes '?' */
	ck_assert_int_eq(vmig_stream_writer_create(&out->base, VMIG_STREAM_FORWARD, &w), 0);
	ck_assert_int_eq(vmig_stream_write_header(w), 0);
	ck_assert_int_eq(vmig_stream_write_error(w, VMIG_REC_ERROR, 0, "%s", big), 0);
	ck_assert_int_eq(vmig_stream_flush(w), 0);
	vmig_stream_writer_destroy(w);
	in = mem_new(out->data, out->len, 0);
	ck_assert_int_eq(vmig_stream_reader_create(&in->base, VMIG_STREAM_FORWARD, &r), 0);
	ck_assert_int_eq(vmig_stream_read_header(r, &err), 0);
	ck_assert_msg(vmig_stream_read_record(r, &rec, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(vmig_stream_parse_error(&rec, &e, msg, sizeof(msg), &err), 0);
	ck_assert_int_eq(e, -EIO);       /* errno 0 is sent as EIO */
	ck_assert_uint_eq(strlen(msg), VMIG_STREAM_MAX_MESSAGE);
	ck_assert_int_eq(msg[0], '?');
	vmig_stream_reader_destroy(r);
	vmig_transport_close(&in->base);
	vmig_transport_close(&out->base);
	free(big);
}
END_TEST

START_TEST(test_writer_enospc)
{
	struct vmig_transport *t;
	struct vmig_stream_writer *w;
	struct vmig_err err = { 0 };
	uint8_t page[PAGE];
	int ret = 0;

	if (access("/dev/full", W_OK) < 0) {
		fprintf(stderr, "skipping: /dev/full: %s\n", strerror(errno));
		return;
	}
	fill_random(page, PAGE);
	ck_assert_int_eq(vmig_transport_open_file("/dev/full", true, &t, &err), 0);
	ck_assert_int_eq(vmig_stream_writer_create(t, VMIG_STREAM_FORWARD, &w), 0);
	ck_assert_int_eq(vmig_stream_write_header(w), 0);
	for (int i = 0; i < 3000 && ret == 0; i++)
		ret = vmig_stream_add_page(w, (uint64_t)i * PAGE, page, VMIG_COMPRESS_NONE);
	/* The first full batch (1024 pages) went out and failed. */
	ck_assert_int_eq(ret, -ENOSPC);
	assert_err_has(vmig_stream_writer_err(w), "file:/dev/full");
	assert_err_has(vmig_stream_writer_err(w), "no space left on device");
	assert_err_has(vmig_stream_writer_err(w), "at stream offset 0");
	/* Sticky. */
	ck_assert_int_eq(vmig_stream_write_record(w, VMIG_REC_COMMIT, 0, NULL, 0), -ENOSPC);
	ck_assert_int_eq(vmig_stream_finish(w), -ENOSPC);
	vmig_stream_writer_destroy(w);
	vmig_transport_close(t);
}
END_TEST

START_TEST(test_reader_misuse_and_sticky)
{
	uint8_t buf[128];
	size_t n = put_header(buf, 1);
	struct mem_transport *in;
	struct vmig_stream_reader *r;
	struct vmig_record rec;
	struct vmig_err err = { 0 };

	n += put_record_ex(buf + n, VMIG_REC_COMMIT, 0, 0, NULL, 0, 0, 1, 0);
	in = mem_new(buf, n, 0);
	ck_assert_int_eq(vmig_stream_reader_create(&in->base, VMIG_STREAM_FORWARD, &r), 0);
	ck_assert_int_eq(vmig_stream_expect_eof(r, &err), -EINVAL);
	vmig_stream_reader_destroy(r);

	ck_assert_int_eq(vmig_stream_reader_create(&in->base, VMIG_STREAM_FORWARD, &r), 0);
	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), -EINVAL);
	assert_err_has(&err, "header must be read first");
	vmig_stream_reader_destroy(r);

	in->pos = 0;
	ck_assert_int_eq(vmig_stream_reader_create(&in->base, VMIG_STREAM_FORWARD, &r), 0);
	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_stream_read_header(r, &err), 0);
	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), -EBADMSG);
	/* The failure is final, and repeated with its message. */
	vmig_err_clear(&err);
	ck_assert_int_eq(vmig_stream_read_record(r, &rec, &err), -EBADMSG);
	assert_err_has(&err, "checksum mismatch");
	vmig_stream_reader_destroy(r);
	vmig_transport_close(&in->base);
}
END_TEST

static Suite *stream_suite(void)
{
	Suite *s = suite_create("stream");
	TCase *tc;

	tc = tcase_create("crc32c");
	tcase_add_test(tc, test_crc32c);
	suite_add_tcase(s, tc);

	tc = tcase_create("roundtrip");
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_rec_names);
	tcase_add_test(tc, test_manpage_example);
	tcase_add_test(tc, test_roundtrip_all_types);
	tcase_add_test(tc, test_roundtrip_reverse);
	tcase_add_loop_test(tc, test_pages_socketpair, 0, 4);
	tcase_add_loop_test(tc, test_pages_file_nocompress, 0, 4);
	tcase_add_loop_test(tc, test_pages_file_auto, 0, 4);
	tcase_add_test(tc, test_auto_random_goes_raw);
	tcase_add_test(tc, test_auto_comes_back);
	tcase_add_test(tc, test_extents);
	tcase_add_loop_test(tc, test_page_twice_later_wins, 0, 4);
	tcase_add_test(tc, test_big_records);
	tcase_add_loop_test(tc, test_live_torn_pages, 0, 2);
	suite_add_tcase(s, tc);

	tc = tcase_create("hostile");
	tcase_set_timeout(tc, 300);
	tcase_add_loop_test(tc, test_truncated_everywhere, 0, 4);
	tcase_add_loop_test(tc, test_bitflips_everywhere, 0, 4);
	tcase_add_test(tc, test_bad_header);
	tcase_add_loop_test(tc, test_bad_framing, 0, 2);
	tcase_add_loop_test(tc, test_bad_pages, 0, 2);
	tcase_add_test(tc, test_bad_state_error_config);
	tcase_add_test(tc, test_error_message_sanitised);
	tcase_add_test(tc, test_reader_misuse_and_sticky);
	suite_add_tcase(s, tc);

	tc = tcase_create("writer");
	tcase_add_test(tc, test_writer_misuse);
	tcase_add_test(tc, test_writer_long_error_message);
	tcase_add_test(tc, test_writer_enospc);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(stream_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
