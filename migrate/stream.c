/*
 * The migration stream codec, format v1 (vmig-stream(5)).
 *
 * Writer.  Records are assembled in an output buffer; one that does not
 * fit goes out with a single writev of the buffered bytes, its header, its
 * body pieces and its trailer, so a 4 MiB page batch is never copied a
 * second time.  The CRC is computed over the pieces as they are.  Pages are
 * copied into the batch when added (the guest may keep writing the
 * original; the dirty log sends it again), and compressed from that copy,
 * so what is checksummed is exactly what is sent.
 *
 * Reader.  Reads into one buffer with a small read-ahead; a record is
 * complete in the buffer before anything in it is interpreted, its body
 * 8-byte aligned (records start at 8-byte aligned stream offsets and the
 * buffer is only ever compacted to a record start).  The buffer grows only
 * as bytes arrive, up to VMIG_STREAM_MAX_RECORD plus the framing, so a
 * forged length cannot make it allocate ahead of the data.  The checksum is
 * verified before any field of the body is looked at; then every length,
 * count and encoding is checked against the limits and against the rest
 * of the body.  Any error is final for the reader.
 *
 * Nothing here knows about sockets (transport/) or KVM (vmm/).
 */
#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/uio.h>

#include <json-c/json.h>
#include <lz4.h>

#include "vmig/crc32c.h"
#include "vmig/stream.h"
#include "vmig/transport.h"
#include "vmig/vm.h"

#define OUT_CAP        (256u << 10)   /* writer's buffer for small records */
#define READ_INITIAL   (256u << 10)   /* reader's first buffer */
#define READ_AHEAD     (64u << 10)    /* read past the record at most this */
#define PAGE_ENC_MASK  (VMIG_STREAM_PAGE_SIZE - 1)
#define LZ4_ACCEL      1

static const uint8_t zeros[8];

/* ------------------------------------------------------------------------
 * Little-endian fields
 */

static void put_le16(uint8_t *p, uint16_t v)
{
	v = htole16(v);
	memcpy(p, &v, 2);
}

static void put_le32(uint8_t *p, uint32_t v)
{
	v = htole32(v);
	memcpy(p, &v, 4);
}

static void put_le64(uint8_t *p, uint64_t v)
{
	v = htole64(v);
	memcpy(p, &v, 8);
}

static uint16_t get_le16(const uint8_t *p)
{
	uint16_t v;

	memcpy(&v, p, 2);
	return le16toh(v);
}

static uint32_t get_le32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, 4);
	return le32toh(v);
}

static uint64_t get_le64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return le64toh(v);
}

static size_t pad8(size_t len)
{
	return (8 - (len & 7)) & 7;
}

/* ------------------------------------------------------------------------
 * Record types
 */

const char *vmig_stream_rec_name(uint32_t type)
{
	switch (type) {
	case VMIG_REC_CONFIG: return "CONFIG";
	case VMIG_REC_PAGES: return "PAGES";
	case VMIG_REC_ITER_END: return "ITER_END";
	case VMIG_REC_STATE: return "STATE";
	case VMIG_REC_SWITCHOVER: return "SWITCHOVER";
	case VMIG_REC_COMMIT: return "COMMIT";
	case VMIG_REC_END: return "END";
	case VMIG_REC_ERROR: return "ERROR";
	case VMIG_REC_EXTENTS: return "EXTENTS";
	case VMIG_REC_CHANNEL: return "CHANNEL";
	case VMIG_REC_LIVE_PAGES: return "LIVE_PAGES";
	case VMIG_REC_READY: return "READY";
	case VMIG_REC_RUNNING: return "RUNNING";
	case VMIG_REC_NACK: return "NACK";
	case VMIG_REC_ITER_DONE: return "ITER_DONE";
	default: return NULL;
	}
}

/* "PAGES (0x2)" or "type 0x1234", for messages. */
static const char *type_str(uint32_t type, char *buf, size_t len)
{
	const char *name = vmig_stream_rec_name(type);

	if (name)
		snprintf(buf, len, "%s (0x%x)", name, type);
	else
		snprintf(buf, len, "type 0x%x", type);
	return buf;
}

static bool type_forward(uint32_t type)
{
	return type >= VMIG_REC_CONFIG && type <= VMIG_REC_LIVE_PAGES;
}

static bool type_reverse(uint32_t type)
{
	return type >= VMIG_REC_READY && type <= VMIG_REC_ITER_DONE;
}

static const char *dir_name(enum vmig_stream_dir dir)
{
	return dir == VMIG_STREAM_FORWARD ? "source->destination"
					  : "destination->source";
}

static bool type_allowed(enum vmig_stream_dir dir, uint32_t type)
{
	return dir == VMIG_STREAM_FORWARD ? type_forward(type) : type_reverse(type);
}

/* The largest body a known type may have (0 for the empty ones). */
static uint64_t type_max_len(uint32_t type)
{
	switch (type) {
	case VMIG_REC_CONFIG: return VMIG_STREAM_MAX_CONFIG;
	case VMIG_REC_PAGES:
	case VMIG_REC_LIVE_PAGES: return VMIG_STREAM_MAX_PAGES_BODY;
	case VMIG_REC_ITER_END:
	case VMIG_REC_ITER_DONE:
	case VMIG_REC_CHANNEL: return 16;
	case VMIG_REC_EXTENTS: return 8 + 16ull * VMIG_STREAM_MAX_EXTENTS;
	case VMIG_REC_ERROR:
	case VMIG_REC_NACK: return 4 + VMIG_STREAM_MAX_MESSAGE;
	case VMIG_REC_SWITCHOVER:
	case VMIG_REC_COMMIT:
	case VMIG_REC_END:
	case VMIG_REC_READY:
	case VMIG_REC_RUNNING: return 0;
	default: return VMIG_STREAM_MAX_RECORD;
	}
}

/* ------------------------------------------------------------------------
 * UTF-8
 */

/* Length of the valid UTF-8 sequence at @s (at most @len bytes), 0 if invalid. */
static size_t utf8_seq(const uint8_t *s, size_t len)
{
	uint32_t cp;
	size_t n, i;

	if (s[0] < 0x80)
		return 1;
	if (s[0] >= 0xc2 && s[0] <= 0xdf) {
		n = 2;
		cp = s[0] & 0x1f;
	} else if (s[0] >= 0xe0 && s[0] <= 0xef) {
		n = 3;
		cp = s[0] & 0x0f;
	} else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
		n = 4;
		cp = s[0] & 0x07;
	} else {
		return 0;
	}
	if (len < n)
		return 0;
	for (i = 1; i < n; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = (cp << 6) | (s[i] & 0x3f);
	}
	if ((n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) || cp > 0x10ffff ||
	    (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return n;
}

/* Offset of the first byte that is not UTF-8 or is NUL, or @len. */
static size_t utf8_check(const uint8_t *s, size_t len)
{
	size_t i = 0;

	while (i < len) {
		size_t n = s[i] ? utf8_seq(s + i, len - i) : 0;

		if (!n)
			return i;
		i += n;
	}
	return len;
}

/* ------------------------------------------------------------------------
 * Writer
 */

struct vmig_stream_writer {
	struct vmig_transport *t;
	enum vmig_stream_dir dir;
	bool header_done, ended;
	int error;                /* sticky transport failure */
	struct vmig_err err;

	uint8_t *out;             /* OUT_CAP bytes */
	size_t out_len;
	uint64_t offset;          /* stream bytes produced so far */

	/* The open page batch: count header + descriptors, and payloads. */
	uint8_t *batch;           /* 8 + 16 * MAX_BATCH */
	uint8_t *payload;         /* MAX_BATCH * PAGE_SIZE */
	uint32_t npages;
	size_t payload_len;       /* bytes used in payload */
	size_t body_payload;      /* the batch's payload bytes (live: with guest pages) */
	void *lz4_state;
	uint8_t *scratch;         /* PAGE_SIZE, compressor output */

	/*
	 * Live mode (vmig_stream_writer_set_live): LIVE_PAGES, raw pages sent
	 * from where they are.  The payloads are these pieces: guest memory
	 * for raw pages (neighbours merged), w->payload for compressed ones.
	 */
	bool live;
	struct iovec *piece;      /* PIECE_BASE + MAX_BATCH + 1 */
	int npieces;

	/* VMIG_COMPRESS_AUTO's measurements (see auto_judge). */
	bool auto_raw;            /* the open batch goes raw */
	uint32_t auto_skip;       /* raw batches left before trying lz4 again */
	uint32_t auto_backoff;    /* the next skip: doubles while lz4 keeps failing */
	uint64_t comp_ns, comp_in, comp_out;   /* the open batch's lz4 work */
	uint64_t link_ns, link_bytes;          /* time blocked writing; decayed */

	struct vmig_stream_stats stats;
};

/*
 * Live mode: a batch goes out once it holds this much payload, so its
 * pages are still in the cache when the kernel copies them (they were
 * read once for their checksums).  Records at most this long are copied
 * into the output buffer instead (a few scattered pages: one system call
 * for many records).
 */
#define LIVE_BATCH_BYTES (256u << 10)
#define LIVE_COPY_MAX    (32u << 10)
#define PIECE_BASE       3          /* piece[] slots for buffer, header, descriptors */

#define AUTO_SKIP_BATCHES 16u
#define AUTO_SKIP_MAX     128u    /* 512 MiB of raw pages between tries */

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Account @bytes written in @ns to the link rate (recent data counts most). */
static void link_note(struct vmig_stream_writer *w, uint64_t bytes, uint64_t ns)
{
	w->link_bytes += bytes;
	w->link_ns += ns;
	if (w->link_bytes > (64u << 20)) {
		w->link_bytes /= 2;
		w->link_ns /= 2;
	}
}

/*
 * --compress auto, at the end of a batch.  Compressing pays when it saves
 * bytes and the link would take longer to carry the bytes saved than the
 * compressor took to save them: the one sender thread does both in turn.
 */
static void auto_judge(struct vmig_stream_writer *w)
{
	if (w->auto_raw) {
		if (w->auto_skip && --w->auto_skip == 0)
			w->auto_raw = false;        /* try lz4 on the next batch */
		return;
	}
	if (w->comp_in) {
		uint64_t saved = w->comp_in > w->comp_out ? w->comp_in - w->comp_out : 0;
		bool pays = saved >= w->comp_in / 16;

		/* Below 1 MiB of writes the link rate is not known yet. */
		if (pays && w->link_bytes >= (1u << 20))
			pays = (double)w->comp_ns <
			       (double)saved * (double)w->link_ns / (double)w->link_bytes;
		if (!pays) {
			/*
			 * Each try costs a batch's compression; data that did
			 * not compress last time seldom does the next, so try
			 * less often while it keeps failing.
			 */
			if (w->auto_backoff < AUTO_SKIP_BATCHES)
				w->auto_backoff = AUTO_SKIP_BATCHES;
			w->auto_raw = true;
			w->auto_skip = w->auto_backoff;
			if (w->auto_backoff < AUTO_SKIP_MAX)
				w->auto_backoff *= 2;
		} else {
			w->auto_backoff = AUTO_SKIP_BATCHES;
		}
	}
	w->comp_ns = w->comp_in = w->comp_out = 0;
}

int vmig_stream_writer_create(struct vmig_transport *t, enum vmig_stream_dir dir,
			      struct vmig_stream_writer **out)
{
	struct vmig_stream_writer *w = calloc(1, sizeof(*w));

	*out = NULL;
	if (!w)
		return -ENOMEM;
	w->t = t;
	w->dir = dir;
	w->out = malloc(OUT_CAP);
	if (dir == VMIG_STREAM_FORWARD) {
		w->batch = malloc(8 + VMIG_STREAM_MAX_BATCH * VMIG_STREAM_PAGE_DESC);
		w->payload = malloc((size_t)VMIG_STREAM_MAX_BATCH * VMIG_STREAM_PAGE_SIZE);
		w->lz4_state = malloc((size_t)LZ4_sizeofState());
		w->scratch = malloc(VMIG_STREAM_PAGE_SIZE);
		w->piece = malloc((PIECE_BASE + VMIG_STREAM_MAX_BATCH + 1) * sizeof(*w->piece));
	}
	if (!w->out || (dir == VMIG_STREAM_FORWARD &&
			(!w->batch || !w->payload || !w->lz4_state || !w->scratch ||
			 !w->piece))) {
		vmig_stream_writer_destroy(w);
		return -ENOMEM;
	}
	*out = w;
	return 0;
}

void vmig_stream_writer_destroy(struct vmig_stream_writer *w)
{
	if (!w)
		return;
	free(w->out);
	free(w->batch);
	free(w->payload);
	free(w->lz4_state);
	free(w->scratch);
	free(w->piece);
	free(w);
}

/* Record a transport failure; it sticks. */
static int writer_fail(struct vmig_stream_writer *w, int ret)
{
	const struct vmig_err *te = vmig_transport_err(w->t);

	w->error = ret;
	if (te->code)
		vmig_err_set(&w->err, ret, "%s (at stream offset %llu)", te->msg,
			     (unsigned long long)w->stats.bytes);
	else
		vmig_err_set(&w->err, ret, "writing to %s at stream offset %llu: %s",
			     vmig_transport_desc(w->t),
			     (unsigned long long)w->stats.bytes, strerror(-ret));
	return ret;
}

static int out_flush(struct vmig_stream_writer *w)
{
	int ret;

	uint64_t t0;

	if (!w->out_len)
		return 0;
	t0 = mono_ns();
	ret = vmig_transport_write_full(w->t, w->out, w->out_len);
	if (ret < 0)
		return writer_fail(w, ret);
	link_note(w, w->out_len, mono_ns() - t0);
	w->stats.bytes += w->out_len;
	w->out_len = 0;
	return 0;
}

static int out_append(struct vmig_stream_writer *w, const void *p, size_t len)
{
	memcpy(w->out + w->out_len, p, len);
	w->out_len += len;
	return 0;
}

/*
 * Send @iov (what is buffered, then a record of @total bytes) with one
 * writev, timing it for the link rate.
 */
static int send_now(struct vmig_stream_writer *w, const struct iovec *iov, int n,
		    size_t total)
{
	uint64_t t0 = mono_ns();
	int ret = vmig_transport_writev_full(w->t, iov, n);

	if (ret < 0)
		return writer_fail(w, ret);
	link_note(w, w->out_len + total, mono_ns() - t0);
	w->stats.bytes += w->out_len + total;
	w->out_len = 0;
	return 0;
}

/*
 * Frame a record whose body is the @n pieces of @body, and buffer or send
 * it.  The caller has checked type, flags and length.
 */
static int emit(struct vmig_stream_writer *w, uint32_t type, uint32_t flags,
		const struct iovec *body, int n)
{
	uint8_t hdr[VMIG_STREAM_REC_HEADER], tail[8 + VMIG_STREAM_REC_TRAILER];
	struct iovec iov[8];
	size_t len = 0, pad, total;
	uint32_t crc;
	int i, k = 0, ret;

	for (i = 0; i < n; i++)
		len += body[i].iov_len;
	pad = pad8(len);
	total = VMIG_STREAM_REC_HEADER + len + pad + VMIG_STREAM_REC_TRAILER;

	put_le32(hdr, type);
	put_le32(hdr + 4, flags);
	put_le64(hdr + 8, len);
	crc = vmig_crc32c(0, hdr, sizeof(hdr));
	for (i = 0; i < n; i++)
		crc = vmig_crc32c(crc, body[i].iov_base, body[i].iov_len);
	crc = vmig_crc32c(crc, zeros, pad);
	memset(tail, 0, pad);
	put_le32(tail + pad, crc);
	put_le32(tail + pad + 4, 0);

	if (total > OUT_CAP - w->out_len && total <= OUT_CAP) {
		ret = out_flush(w);
		if (ret < 0)
			return ret;
	}
	if (total <= OUT_CAP - w->out_len) {
		out_append(w, hdr, sizeof(hdr));
		for (i = 0; i < n; i++)
			if (body[i].iov_len)
				out_append(w, body[i].iov_base, body[i].iov_len);
		out_append(w, tail, pad + VMIG_STREAM_REC_TRAILER);
	} else {
		/* Too big to buffer: send what is buffered and the record at once. */
		if (w->out_len)
			iov[k++] = (struct iovec){ w->out, w->out_len };
		iov[k++] = (struct iovec){ hdr, sizeof(hdr) };
		for (i = 0; i < n; i++)
			iov[k++] = body[i];
		iov[k++] = (struct iovec){ tail, pad + VMIG_STREAM_REC_TRAILER };
		ret = send_now(w, iov, k, total);
		if (ret < 0)
			return ret;
	}
	w->offset += total;
	w->stats.records++;
	return 0;
}

int vmig_stream_write_header(struct vmig_stream_writer *w)
{
	uint8_t h[VMIG_STREAM_HEADER_SIZE] = { 0 };

	if (w->error)
		return w->error;
	if (w->header_done)
		return -EINVAL;
	memcpy(h, VMIG_STREAM_MAGIC, 8);
	/* Version 1 unless LIVE_PAGES will be used: older readers take it. */
	put_le32(h + 8, w->live ? 2 : 1);
	put_le32(h + 12, VMIG_STREAM_HEADER_SIZE);
	put_le64(h + 16, 0);      /* flags */
	put_le64(h + 24, 0);      /* reserved */
	out_append(w, h, sizeof(h));
	w->offset += sizeof(h);
	w->header_done = true;
	return 0;
}

/* Common checks for every record; closes the open page batch. */
static int record_begin(struct vmig_stream_writer *w, uint32_t type,
			uint32_t flags, size_t len)
{
	if (w->error)
		return w->error;
	if (!w->header_done || w->ended || (flags & ~VMIG_REC_OPTIONAL) ||
	    len > VMIG_STREAM_MAX_RECORD)
		return -EINVAL;
	if (vmig_stream_rec_name(type) && !type_allowed(w->dir, type))
		return -EINVAL;
	return vmig_stream_flush_pages(w);
}

static int write_pieces(struct vmig_stream_writer *w, uint32_t type,
			uint32_t flags, const struct iovec *body, int n)
{
	size_t len = 0;
	int ret;

	for (int i = 0; i < n; i++)
		len += body[i].iov_len;
	ret = record_begin(w, type, flags, len);
	if (ret < 0)
		return ret;
	ret = emit(w, type, flags, body, n);
	if (ret == 0 && type == VMIG_REC_END)
		w->ended = true;
	return ret;
}

int vmig_stream_write_record(struct vmig_stream_writer *w, uint32_t type,
			     uint32_t flags, const void *body, size_t len)
{
	struct iovec iov = { (void *)body, len };

	if (len && !body)
		return -EINVAL;
	return write_pieces(w, type, flags, &iov, 1);
}

int vmig_stream_write_config(struct vmig_stream_writer *w,
			     struct json_object *cfg)
{
	const char *s;
	size_t len;

	if (!json_object_is_type(cfg, json_type_object))
		return -EINVAL;
	s = json_object_to_json_string_length(cfg, JSON_C_TO_STRING_PLAIN, &len);
	if (!s)
		return -ENOMEM;
	if (len > VMIG_STREAM_MAX_CONFIG)
		return -EMSGSIZE;
	return vmig_stream_write_record(w, VMIG_REC_CONFIG, 0, s, len);
}

int vmig_stream_write_iter_end(struct vmig_stream_writer *w, uint64_t iter,
			       uint64_t pages)
{
	uint8_t b[16];

	put_le64(b, iter);
	put_le64(b + 8, pages);
	return vmig_stream_write_record(w, VMIG_REC_ITER_END, 0, b, sizeof(b));
}

int vmig_stream_write_channel(struct vmig_stream_writer *w, uint64_t session,
			      uint32_t index, uint32_t count)
{
	uint8_t b[16];

	if (index < 1 || index >= count)
		return -EINVAL;
	put_le64(b, session);
	put_le32(b + 8, index);
	put_le32(b + 12, count);
	return vmig_stream_write_record(w, VMIG_REC_CHANNEL, 0, b, sizeof(b));
}

int vmig_stream_write_extents(struct vmig_stream_writer *w,
			      const struct vmig_stream_extent *e, uint32_t n)
{
	uint8_t head[8];
	struct iovec iov[2];
	uint8_t *body;
	uint64_t prev_end = 0;
	int ret;

	if (!n || n > VMIG_STREAM_MAX_EXTENTS || !e)
		return -EINVAL;
	body = malloc(16 * (size_t)n);
	if (!body)
		return -ENOMEM;
	for (uint32_t i = 0; i < n; i++) {
		if ((e[i].gpa | e[i].len) & (VMIG_STREAM_PAGE_SIZE - 1) || !e[i].len ||
		    e[i].gpa + e[i].len < e[i].gpa || (i && e[i].gpa < prev_end)) {
			free(body);
			return -EINVAL;
		}
		prev_end = e[i].gpa + e[i].len;
		put_le64(body + 16 * (size_t)i, e[i].gpa);
		put_le64(body + 16 * (size_t)i + 8, e[i].len);
	}
	put_le32(head, n);
	put_le32(head + 4, 0);
	iov[0] = (struct iovec){ head, sizeof(head) };
	iov[1] = (struct iovec){ body, 16 * (size_t)n };
	ret = write_pieces(w, VMIG_REC_EXTENTS, VMIG_REC_OPTIONAL, iov, 2);
	free(body);
	return ret;
}

static bool name_char_ok(unsigned char c)
{
	return c > ' ' && c < 0x7f;
}

int vmig_stream_write_state(struct vmig_stream_writer *w, const char *name,
			    uint16_t version, uint32_t instance,
			    const void *data, size_t len)
{
	uint8_t head[8 + VMIG_STREAM_STATE_NAME_MAX + 8] = { 0 };
	size_t nlen = name ? strlen(name) : 0;
	struct iovec iov[2];

	if (nlen == 0 || nlen > VMIG_STREAM_STATE_NAME_MAX || (len && !data))
		return -EINVAL;
	for (size_t i = 0; i < nlen; i++)
		if (!name_char_ok((unsigned char)name[i]))
			return -EINVAL;
	put_le16(head, (uint16_t)nlen);
	put_le16(head + 2, version);
	put_le32(head + 4, instance);
	memcpy(head + 8, name, nlen);
	iov[0] = (struct iovec){ head, 8 + nlen + pad8(nlen) };
	iov[1] = (struct iovec){ (void *)data, len };
	return write_pieces(w, VMIG_REC_STATE, 0, iov, 2);
}

int vmig_stream_write_error(struct vmig_stream_writer *w, uint32_t type,
			    int errnum, const char *fmt, ...)
{
	uint8_t body[4 + VMIG_STREAM_MAX_MESSAGE + 1];
	uint8_t *msg = body + 4;
	size_t len, i;
	va_list ap;
	int n;

	if (type != VMIG_REC_ERROR && type != VMIG_REC_NACK)
		return -EINVAL;
	if (errnum < 0)
		errnum = -errnum;
	if (errnum == 0 || errnum > 4095)
		errnum = EIO;
	put_le32(body, (uint32_t)errnum);
	va_start(ap, fmt);
	n = vsnprintf((char *)msg, VMIG_STREAM_MAX_MESSAGE + 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	len = (size_t)n > VMIG_STREAM_MAX_MESSAGE ? VMIG_STREAM_MAX_MESSAGE : (size_t)n;
	/* Not UTF-8 (a file name in Latin-1, a cut sequence): '?' instead. */
	for (i = 0; i < len;) {
		size_t k = msg[i] ? utf8_seq(msg + i, len - i) : 0;

		if (!k) {
			msg[i++] = '?';
			continue;
		}
		i += k;
	}
	return vmig_stream_write_record(w, type, 0, body, 4 + len);
}

/*
 * A zero page costs only a descriptor, and a mostly idle guest has many,
 * so this must run at memory speed: OR 256-byte blocks together in 16-byte
 * vectors (SSE2, which every x86-64 has; GCC's -O2 does not vectorise the
 * plain loop) and stop at the first block that is not zero.
 */
typedef uint64_t u64x2 __attribute__((vector_size(16)));

static bool page_is_zero(const void *page)
{
	const uint8_t *p = page;

	for (size_t off = 0; off < VMIG_STREAM_PAGE_SIZE; off += 256) {
		u64x2 acc0 = { 0, 0 }, acc1 = { 0, 0 };

		for (size_t i = 0; i < 256; i += 32) {
			u64x2 a, b;

			memcpy(&a, p + off + i, 16);
			memcpy(&b, p + off + i + 16, 16);
			acc0 |= a;
			acc1 |= b;
		}
		acc0 |= acc1;
		if (acc0[0] | acc0[1])
			return false;
	}
	return true;
}

int vmig_stream_writer_set_live(struct vmig_stream_writer *w, bool live)
{
	if (w->dir != VMIG_STREAM_FORWARD || w->header_done)
		return -EINVAL;
	w->live = live;
	return 0;
}

/* A payload of the open live batch; neighbours in memory merge. */
static void add_piece(struct vmig_stream_writer *w, const void *p, size_t len)
{
	struct iovec *last = &w->piece[PIECE_BASE + w->npieces - 1];

	if (w->npieces && (const uint8_t *)last->iov_base + last->iov_len == p)
		last->iov_len += len;
	else
		w->piece[PIECE_BASE + w->npieces++] = (struct iovec){ (void *)p, len };
}

int vmig_stream_add_page(struct vmig_stream_writer *w, uint64_t gpa,
			 const void *page, enum vmig_compress mode)
{
	uint8_t *desc, *slot;
	uint32_t enc, plen, crc = 0;
	bool lz4;

	if (w->error)
		return w->error;
	if ((gpa & PAGE_ENC_MASK) || !page || w->dir != VMIG_STREAM_FORWARD ||
	    !w->header_done || w->ended)
		return -EINVAL;

	slot = w->payload + w->payload_len;
	lz4 = mode == VMIG_COMPRESS_LZ4 || (mode == VMIG_COMPRESS_AUTO && !w->auto_raw);
	if (page_is_zero(page)) {
		enc = VMIG_PAGE_ZERO;
		plen = 0;
		w->stats.pages_zero++;
	} else if (w->live && !lz4) {
		/*
		 * Sent from where it is: checksummed now, copied by the kernel
		 * at the flush.  Should the guest write it in between, the
		 * receiver sees a torn page; the dirty log sends it again.
		 */
		enc = VMIG_PAGE_RAW;
		plen = VMIG_STREAM_PAGE_SIZE;
		crc = vmig_crc32c(0, page, VMIG_STREAM_PAGE_SIZE);
		add_piece(w, page, VMIG_STREAM_PAGE_SIZE);
		w->stats.pages_raw++;
	} else {
		/* Snapshot first: the checksum must cover what is sent. */
		memcpy(slot, page, VMIG_STREAM_PAGE_SIZE);
		enc = VMIG_PAGE_RAW;
		plen = VMIG_STREAM_PAGE_SIZE;
		if (lz4) {
			uint64_t t0 = mode == VMIG_COMPRESS_AUTO ? mono_ns() : 0;
			int c = LZ4_compress_fast_extState(w->lz4_state,
							   (const char *)slot,
							   (char *)w->scratch,
							   VMIG_STREAM_PAGE_SIZE,
							   VMIG_STREAM_PAGE_SIZE - 1,
							   LZ4_ACCEL);

			if (mode == VMIG_COMPRESS_AUTO) {
				w->comp_ns += mono_ns() - t0;
				w->comp_in += VMIG_STREAM_PAGE_SIZE;
				w->comp_out += c > 0 ? (uint64_t)c : VMIG_STREAM_PAGE_SIZE;
			}
			if (c > 0) {
				memcpy(slot, w->scratch, (size_t)c);
				enc = VMIG_PAGE_LZ4;
				plen = (uint32_t)c;
			}
		}
		if (enc == VMIG_PAGE_LZ4)
			w->stats.pages_lz4++;
		else
			w->stats.pages_raw++;
		if (w->live) {
			crc = vmig_crc32c(0, slot, plen);
			add_piece(w, slot, plen);
		}
		w->payload_len += plen;
	}
	desc = w->batch + 8 + (size_t)w->npages * VMIG_STREAM_PAGE_DESC;
	put_le64(desc, gpa | enc);
	put_le32(desc + 8, plen);
	put_le32(desc + 12, crc);
	w->body_payload += plen;
	w->npages++;
	if (w->npages == VMIG_STREAM_MAX_BATCH ||
	    (w->live && w->body_payload >= LIVE_BATCH_BYTES))
		return vmig_stream_flush_pages(w);
	return 0;
}

/*
 * The open live batch as a LIVE_PAGES record: its checksum covers the
 * header and descriptors, each payload has its own in its descriptor.
 */
static int flush_live(struct vmig_stream_writer *w)
{
	uint8_t hdr[VMIG_STREAM_REC_HEADER], tail[8 + VMIG_STREAM_REC_TRAILER];
	size_t head = 8 + (size_t)w->npages * VMIG_STREAM_PAGE_DESC;
	size_t len = head + w->body_payload, pad = pad8(len);
	size_t total = VMIG_STREAM_REC_HEADER + len + pad + VMIG_STREAM_REC_TRAILER;
	struct iovec *iov = w->piece;
	uint32_t crc;
	int i, k, ret;

	put_le32(hdr, VMIG_REC_LIVE_PAGES);
	put_le32(hdr + 4, 0);
	put_le64(hdr + 8, len);
	crc = vmig_crc32c(0, hdr, sizeof(hdr));
	crc = vmig_crc32c(crc, w->batch, head);
	crc = vmig_crc32c(crc, zeros, pad);
	memset(tail, 0, pad);
	put_le32(tail + pad, crc);
	put_le32(tail + pad + 4, 0);

	if (total <= LIVE_COPY_MAX) {
		if (total > OUT_CAP - w->out_len) {
			ret = out_flush(w);
			if (ret < 0)
				return ret;
		}
		out_append(w, hdr, sizeof(hdr));
		out_append(w, w->batch, head);
		for (i = 0; i < w->npieces; i++)
			out_append(w, iov[PIECE_BASE + i].iov_base, iov[PIECE_BASE + i].iov_len);
		out_append(w, tail, pad + VMIG_STREAM_REC_TRAILER);
	} else {
		/* The slots before the pieces are kept free for this. */
		k = PIECE_BASE;
		iov[--k] = (struct iovec){ w->batch, head };
		iov[--k] = (struct iovec){ hdr, sizeof(hdr) };
		if (w->out_len)
			iov[--k] = (struct iovec){ w->out, w->out_len };
		iov[PIECE_BASE + w->npieces] = (struct iovec){ tail, pad + VMIG_STREAM_REC_TRAILER };
		ret = send_now(w, iov + k, PIECE_BASE + w->npieces + 1 - k, total);
		if (ret < 0)
			return ret;
	}
	w->offset += total;
	w->stats.records++;
	return 0;
}

int vmig_stream_flush_pages(struct vmig_stream_writer *w)
{
	struct iovec iov[2];
	int ret;

	if (w->error)
		return w->error;
	if (!w->npages)
		return 0;
	put_le32(w->batch, w->npages);
	put_le32(w->batch + 4, 0);
	if (w->live) {
		ret = flush_live(w);
	} else {
		iov[0] = (struct iovec){ w->batch, 8 + (size_t)w->npages * VMIG_STREAM_PAGE_DESC };
		iov[1] = (struct iovec){ w->payload, w->payload_len };
		ret = emit(w, VMIG_REC_PAGES, 0, iov, 2);
	}
	w->npages = 0;
	w->npieces = 0;
	w->payload_len = 0;
	w->body_payload = 0;
	auto_judge(w);
	return ret;
}

int vmig_stream_flush(struct vmig_stream_writer *w)
{
	int ret;

	if (w->error)
		return w->error;
	ret = vmig_stream_flush_pages(w);
	if (ret < 0)
		return ret;
	return out_flush(w);
}

int vmig_stream_finish(struct vmig_stream_writer *w)
{
	int ret = vmig_stream_write_record(w, VMIG_REC_END, 0, NULL, 0);

	if (ret < 0)
		return ret;
	ret = vmig_stream_flush(w);
	if (ret < 0)
		return ret;
	ret = vmig_transport_shutdown_write(w->t);
	if (ret < 0)
		return writer_fail(w, ret);
	return 0;
}

void vmig_stream_writer_stats(const struct vmig_stream_writer *w,
			      struct vmig_stream_stats *out)
{
	*out = w->stats;
	out->pending = w->offset - w->stats.bytes;
	if (w->npages)  /* the open batch, roughly as it will be framed */
		out->pending += VMIG_STREAM_REC_HEADER + 8 +
				(uint64_t)w->npages * VMIG_STREAM_PAGE_DESC +
				w->body_payload + VMIG_STREAM_REC_TRAILER;
}

const struct vmig_err *vmig_stream_writer_err(const struct vmig_stream_writer *w)
{
	return &w->err;
}

/* ------------------------------------------------------------------------
 * Body checks, shared by the reader and the parse helpers
 */

static int bad(struct vmig_err *err, int code, const struct vmig_record *rec,
	       const char *fmt, ...) VMIG_PRINTF(4, 5);

/* "<TYPE> record at offset N: <message>" */
static int bad(struct vmig_err *err, int code, const struct vmig_record *rec,
	       const char *fmt, ...)
{
	char msg[400], ts[32];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	vmig_err_set(err, code, "%s record at stream offset %llu: %s",
		     type_str(rec->type, ts, sizeof(ts)),
		     (unsigned long long)rec->offset, msg);
	return code;
}

static int expect_type(const struct vmig_record *rec, uint32_t type,
		       struct vmig_err *err)
{
	char ts[32];

	if (rec->type == type)
		return 0;
	return bad(err, -EINVAL, rec, "expected a %s record",
		   type_str(type, ts, sizeof(ts)));
}

struct page_counts {
	uint64_t zero, raw, lz4;
};

/* Everything about a PAGES body except where the pages go. */
static int pages_check(const struct vmig_record *rec, struct page_counts *pc,
		       struct vmig_err *err)
{
	const uint8_t *b = rec->body;
	uint64_t sum = 0, room;
	uint32_t count, i;

	if (rec->len < 8)
		return bad(err, -EPROTO, rec,
			   "body is %zu bytes, too short for the 8-byte page count header",
			   rec->len);
	count = get_le32(b);
	if (count == 0 || count > VMIG_STREAM_MAX_BATCH)
		return bad(err, -EPROTO, rec, "page count %u is out of range (1 to %u)",
			   count, VMIG_STREAM_MAX_BATCH);
	if (get_le32(b + 4) != 0)
		return bad(err, -EPROTO, rec, "reserved word after the count is 0x%x (expected 0)",
			   get_le32(b + 4));
	if (rec->len < 8 + (uint64_t)count * VMIG_STREAM_PAGE_DESC)
		return bad(err, -EPROTO, rec,
			   "body is %zu bytes, too short for %u page descriptors (%llu bytes)",
			   rec->len, count,
			   (unsigned long long)(8 + (uint64_t)count * VMIG_STREAM_PAGE_DESC));
	room = rec->len - 8 - (uint64_t)count * VMIG_STREAM_PAGE_DESC;
	if (pc)
		memset(pc, 0, sizeof(*pc));
	for (i = 0; i < count; i++) {
		const uint8_t *d = b + 8 + (size_t)i * VMIG_STREAM_PAGE_DESC;
		uint64_t word = get_le64(d);
		uint64_t gpa = word & ~(uint64_t)PAGE_ENC_MASK;
		uint32_t enc = (uint32_t)(word & PAGE_ENC_MASK);
		uint32_t plen = get_le32(d + 8);
		bool ok;

		/* LIVE_PAGES: the payload's checksum (none for a ZERO page). */
		if (get_le32(d + 12) != 0 &&
		    (rec->type != VMIG_REC_LIVE_PAGES || enc == VMIG_PAGE_ZERO))
			return bad(err, -EPROTO, rec,
				   "page %u of %u (gpa 0x%llx): %s is 0x%x (expected 0)",
				   i, count, (unsigned long long)gpa,
				   rec->type == VMIG_REC_LIVE_PAGES ? "checksum of a ZERO page" :
				   "reserved word", get_le32(d + 12));
		switch (enc) {
		case VMIG_PAGE_ZERO:
			ok = plen == 0;
			break;
		case VMIG_PAGE_RAW:
			ok = plen == VMIG_STREAM_PAGE_SIZE;
			break;
		case VMIG_PAGE_LZ4:
			ok = plen > 0 && plen < VMIG_STREAM_PAGE_SIZE;
			break;
		default:
			return bad(err, -EPROTO, rec,
				   "page %u of %u (gpa 0x%llx) has unknown encoding %u (expected 0 ZERO, 1 RAW or 2 LZ4)",
				   i, count, (unsigned long long)gpa, enc);
		}
		if (!ok)
			return bad(err, -EPROTO, rec,
				   "page %u of %u (gpa 0x%llx, %s) has payload length %u (expected %s)",
				   i, count, (unsigned long long)gpa,
				   enc == VMIG_PAGE_ZERO ? "ZERO" : enc == VMIG_PAGE_RAW ? "RAW" : "LZ4",
				   plen,
				   enc == VMIG_PAGE_ZERO ? "0" : enc == VMIG_PAGE_RAW ? "4096" :
				   "1 to 4095");
		sum += plen;
		if (pc) {
			if (enc == VMIG_PAGE_ZERO)
				pc->zero++;
			else if (enc == VMIG_PAGE_RAW)
				pc->raw++;
			else
				pc->lz4++;
		}
	}
	if (sum != room)
		return bad(err, -EPROTO, rec,
			   "payload lengths of the %u pages add up to %llu bytes, but %llu bytes follow the descriptors",
			   count, (unsigned long long)sum, (unsigned long long)room);
	return 0;
}

static int state_check(const struct vmig_record *rec, struct vmig_stream_state *out,
		       struct vmig_err *err)
{
	const uint8_t *b = rec->body;
	size_t nlen, head;

	if (rec->len < 8)
		return bad(err, -EPROTO, rec, "body is %zu bytes, shorter than the 8-byte section header",
			   rec->len);
	nlen = get_le16(b);
	if (nlen == 0 || nlen > VMIG_STREAM_STATE_NAME_MAX)
		return bad(err, -EPROTO, rec, "section name length %zu is out of range (1 to %u)",
			   nlen, VMIG_STREAM_STATE_NAME_MAX);
	head = 8 + nlen + pad8(nlen);
	if (rec->len < head)
		return bad(err, -EPROTO, rec,
			   "body is %zu bytes, too short for a %zu-byte section name",
			   rec->len, nlen);
	for (size_t i = 0; i < nlen; i++)
		if (!name_char_ok(b[8 + i]))
			return bad(err, -EPROTO, rec,
				   "section name has byte 0x%02x at %zu (expected printable ASCII)",
				   b[8 + i], i);
	for (size_t i = 8 + nlen; i < head; i++)
		if (b[i])
			return bad(err, -EPROTO, rec, "padding after the section name '%.*s' is not zero",
				   (int)nlen, (const char *)b + 8);
	if (out) {
		memcpy(out->name, b + 8, nlen);
		out->name[nlen] = '\0';
		out->version = get_le16(b + 2);
		out->instance = get_le32(b + 4);
		out->data = b + head;
		out->len = rec->len - head;
	}
	return 0;
}

static int error_check(const struct vmig_record *rec, struct vmig_err *err)
{
	const uint8_t *b = rec->body;
	uint32_t e;
	size_t at;

	if (rec->len < 4)
		return bad(err, -EPROTO, rec, "body is %zu bytes, too short for the errno",
			   rec->len);
	if (rec->len > 4 + VMIG_STREAM_MAX_MESSAGE)
		return bad(err, -EMSGSIZE, rec, "message is %zu bytes, more than %u",
			   rec->len - 4, VMIG_STREAM_MAX_MESSAGE);
	e = get_le32(b);
	if (e == 0 || e > 4095)
		return bad(err, -EPROTO, rec, "errno %d is out of range (1 to 4095)", (int)e);
	at = utf8_check(b + 4, rec->len - 4);
	if (at != rec->len - 4)
		return bad(err, -EPROTO, rec, "message is not UTF-8 text (bad byte 0x%02x at %zu)",
			   b[4 + at], at);
	return 0;
}

/* An EXTENTS body: count, then that many ascending, disjoint ranges. */
static int extents_check(const struct vmig_record *rec, struct vmig_err *err)
{
	const uint8_t *b = rec->body;
	uint64_t count, prev_end = 0;

	if (rec->len < 8)
		return bad(err, -EPROTO, rec, "body is %zu bytes, too short for the count",
			   rec->len);
	count = get_le32(b);
	if (count == 0 || count > VMIG_STREAM_MAX_EXTENTS || get_le32(b + 4))
		return bad(err, -EPROTO, rec, "extent count %llu is out of range (1 to %u)",
			   (unsigned long long)count, VMIG_STREAM_MAX_EXTENTS);
	if (rec->len != 8 + 16 * count)
		return bad(err, -EPROTO, rec, "body is %zu bytes, but %llu extents need %llu",
			   rec->len, (unsigned long long)count,
			   (unsigned long long)(8 + 16 * count));
	for (uint64_t i = 0; i < count; i++) {
		uint64_t gpa = get_le64(b + 8 + 16 * i), len = get_le64(b + 16 + 16 * i);

		if ((gpa | len) & (VMIG_STREAM_PAGE_SIZE - 1) || !len || gpa + len < gpa)
			return bad(err, -EPROTO, rec, "extent %llu (0x%llx, %llu bytes) is not a "
				   "non-empty page-aligned range",
				   (unsigned long long)i, (unsigned long long)gpa,
				   (unsigned long long)len);
		if (i && gpa < prev_end)
			return bad(err, -EPROTO, rec, "extent %llu at 0x%llx overlaps or precedes "
				   "the one before it", (unsigned long long)i,
				   (unsigned long long)gpa);
		prev_end = gpa + len;
	}
	return 0;
}

/* Checks of a known type's body; the framing is already verified. */
static int body_check(const struct vmig_record *rec, struct page_counts *pc,
		      struct vmig_err *err)
{
	switch (rec->type) {
	case VMIG_REC_PAGES:
	case VMIG_REC_LIVE_PAGES:
		return pages_check(rec, pc, err);
	case VMIG_REC_STATE:
		return state_check(rec, NULL, err);
	case VMIG_REC_EXTENTS:
		return extents_check(rec, err);
	case VMIG_REC_ERROR:
	case VMIG_REC_NACK:
		return error_check(rec, err);
	case VMIG_REC_ITER_END:
	case VMIG_REC_ITER_DONE:
		if (rec->len != 16)
			return bad(err, -EPROTO, rec, "body is %zu bytes (expected 16)", rec->len);
		return 0;
	case VMIG_REC_CHANNEL: {
		const uint8_t *b = rec->body;

		if (rec->len != 16)
			return bad(err, -EPROTO, rec, "body is %zu bytes (expected 16)", rec->len);
		if (get_le32(b + 12) < 2 || get_le32(b + 8) < 1 ||
		    get_le32(b + 8) >= get_le32(b + 12))
			return bad(err, -EPROTO, rec, "channel %u of %u is out of range",
				   get_le32(b + 8), get_le32(b + 12));
		return 0;
	}
	case VMIG_REC_CONFIG:
		if (rec->len == 0)
			return bad(err, -EPROTO, rec, "body is empty (expected a JSON object)");
		return 0;
	default:
		if (rec->len != 0)
			return bad(err, -EPROTO, rec, "body is %zu bytes (expected none)",
				   rec->len);
		return 0;
	}
}

/* ------------------------------------------------------------------------
 * Reader
 */

struct vmig_stream_reader {
	struct vmig_transport *t;
	enum vmig_stream_dir dir;
	uint8_t *buf;
	size_t cap;
	size_t start, end;        /* unconsumed bytes are buf[start, end) */
	size_t consume;           /* size of the record last returned */
	uint64_t offset;          /* stream offset of buf[start] */
	bool header_done, ended;
	uint64_t end_offset;      /* of the END record */
	int error;                /* final error, once failed */
	struct vmig_err first;    /* its message, repeated on later calls */
	struct vmig_stream_stats stats;

	/* vmig_stream_reader_set_memory(): PAGES are applied as they are read. */
	const struct vmig_mem_region *mem;
	unsigned int nr_mem;
	struct iovec *iov;        /* MAX_BATCH: where the payloads go */
	uint8_t **dsts;           /* MAX_BATCH: each page's destination */
	uint8_t *lz4buf;          /* MAX_BATCH * PAGE_SIZE: LZ4 payloads */
	uint8_t *head;            /* the record's count and descriptors */
	uint64_t *torn;           /* a bit per page of mem: torn, not yet sent again */
	uint64_t torn_count;
	uint32_t version;         /* the stream's, from its header */
};

size_t vmig_stream_reader_buffered(const struct vmig_stream_reader *r)
{
	size_t have = r->end - r->start;

	return have > r->consume ? have - r->consume : 0;
}

int vmig_stream_reader_create(struct vmig_transport *t, enum vmig_stream_dir dir,
			      struct vmig_stream_reader **out)
{
	struct vmig_stream_reader *r = calloc(1, sizeof(*r));

	*out = NULL;
	if (!r)
		return -ENOMEM;
	r->t = t;
	r->dir = dir;
	r->cap = READ_INITIAL;
	r->buf = malloc(r->cap);
	if (!r->buf) {
		free(r);
		return -ENOMEM;
	}
	*out = r;
	return 0;
}

void vmig_stream_reader_destroy(struct vmig_stream_reader *r)
{
	if (!r)
		return;
	free(r->buf);
	free(r->iov);
	free(r->dsts);
	free(r->lz4buf);
	free(r->head);
	free(r->torn);
	free(r);
}

int vmig_stream_reader_set_memory(struct vmig_stream_reader *r,
				  const struct vmig_mem_region *regions, unsigned int n)
{
	if (!r->iov) {
		r->iov = calloc(VMIG_STREAM_MAX_BATCH, sizeof(*r->iov));
		r->dsts = calloc(VMIG_STREAM_MAX_BATCH, sizeof(*r->dsts));
		r->lz4buf = malloc((size_t)VMIG_STREAM_MAX_BATCH * VMIG_STREAM_PAGE_SIZE);
		r->head = malloc(8 + (size_t)VMIG_STREAM_MAX_BATCH * VMIG_STREAM_PAGE_DESC);
		if (!r->iov || !r->dsts || !r->lz4buf || !r->head)
			return -ENOMEM;
	}
	free(r->torn);
	r->torn = NULL;
	r->torn_count = 0;
	r->mem = regions;
	r->nr_mem = n;
	return 0;
}

/* Make the reader's failure final and copy its message to the caller. */
static int reader_fail(struct vmig_stream_reader *r, struct vmig_err *err,
		       int code, const char *fmt, ...) VMIG_PRINTF(4, 5);

static int reader_fail(struct vmig_stream_reader *r, struct vmig_err *err,
		       int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vmig_err_setv(&r->first, code, fmt, ap);
	va_end(ap);
	r->error = r->first.code;
	vmig_err_set(err, r->first.code, "%s", r->first.msg);
	return r->error;
}

/* The reader already failed: say so again. */
static int reader_failed(struct vmig_stream_reader *r, struct vmig_err *err)
{
	vmig_err_set(err, r->error, "%s", r->first.msg);
	return r->error;
}

/* A transport error while reading at @what. */
static int read_error(struct vmig_stream_reader *r, struct vmig_err *err, int ret,
		      const char *what)
{
	const struct vmig_err *te = vmig_transport_err(r->t);

	if (te->code)
		return reader_fail(r, err, ret, "reading %s at stream offset %llu: %s", what,
				   (unsigned long long)(r->offset + (r->end - r->start)),
				   te->msg);
	return reader_fail(r, err, ret, "reading %s at stream offset %llu from %s: %s", what,
			   (unsigned long long)(r->offset + (r->end - r->start)),
			   vmig_transport_desc(r->t), strerror(-ret));
}

/*
 * Have at least @need unconsumed bytes in the buffer.  0, -EPIPE at end
 * of stream (then buf[start, end) holds what came), or a transport -errno.
 */
static int fill(struct vmig_stream_reader *r, size_t need)
{
	while (r->end - r->start < need) {
		size_t have = r->end - r->start, want;
		ssize_t n;

		if (r->end == r->cap) {
			if (r->start) {
				/* Compact to the record start (8-aligned). */
				memmove(r->buf, r->buf + r->start, have);
				r->start = 0;
				r->end = have;
			} else {
				/* Grow only as data arrives, never ahead of it. */
				size_t ncap = r->cap * 2;
				uint8_t *nb;

				if (ncap > need + READ_AHEAD)
					ncap = need + READ_AHEAD;
				nb = realloc(r->buf, ncap);
				if (!nb)
					return -ENOMEM;
				r->buf = nb;
				r->cap = ncap;
			}
		}
		want = r->cap - r->end;
		if (want > need - have + READ_AHEAD)
			want = need - have + READ_AHEAD;
		n = vmig_transport_read(r->t, r->buf + r->end, want);
		if (n < 0)
			return (int)n;
		if (n == 0)
			return -EPIPE;
		r->end += (size_t)n;
	}
	return 0;
}

/* Drop the record returned last. */
static void consume(struct vmig_stream_reader *r)
{
	r->start += r->consume;
	r->offset += r->consume;
	r->stats.bytes += r->consume;
	r->consume = 0;
	if (r->start == r->end)
		r->start = r->end = 0;
}

int vmig_stream_read_header(struct vmig_stream_reader *r, struct vmig_err *err)
{
	const uint8_t *h;
	uint32_t version, size;
	int ret;

	if (r->error)
		return reader_failed(r, err);
	if (r->header_done)
		return reader_fail(r, err, -EINVAL, "the stream header was already read");
	ret = fill(r, VMIG_STREAM_HEADER_SIZE);
	if (ret == -EPIPE) {
		size_t have = r->end - r->start;

		if (have >= 8 && memcmp(r->buf, VMIG_STREAM_MAGIC, 8) != 0)
			goto not_vmig;
		if (have == 0)
			return reader_fail(r, err, -EPIPE,
					   "%s sent no data: the stream ended before its header",
					   vmig_transport_desc(r->t));
		return reader_fail(r, err, -EPIPE,
				   "the stream ended after %zu bytes, inside its %u-byte header (truncated, or not a vmig stream)",
				   have, VMIG_STREAM_HEADER_SIZE);
	}
	if (ret < 0)
		return read_error(r, err, ret, "the stream header");
	h = r->buf + r->start;
	if (memcmp(h, VMIG_STREAM_MAGIC, 8) != 0)
		goto not_vmig;
	version = get_le32(h + 8);
	if (version < VMIG_STREAM_VERSION_MIN || version > VMIG_STREAM_VERSION)
		return reader_fail(r, err, -EPROTONOSUPPORT,
				   "stream version %u is not supported by this vmig (supports %u to %u)",
				   version, VMIG_STREAM_VERSION_MIN, VMIG_STREAM_VERSION);
	size = get_le32(h + 12);
	if (size != VMIG_STREAM_HEADER_SIZE)
		return reader_fail(r, err, -EPROTO,
				   "stream header size is %u (expected %u for version %u)",
				   size, VMIG_STREAM_HEADER_SIZE, version);
	if (get_le64(h + 16) != 0)
		return reader_fail(r, err, -EPROTO,
				   "stream header flags are 0x%llx (version %u defines none)",
				   (unsigned long long)get_le64(h + 16), version);
	r->version = version;
	if (get_le64(h + 24) != 0)
		return reader_fail(r, err, -EPROTO,
				   "stream header reserved field is 0x%llx (expected 0)",
				   (unsigned long long)get_le64(h + 24));
	r->consume = VMIG_STREAM_HEADER_SIZE;
	consume(r);
	r->header_done = true;
	return 0;

not_vmig:
	{
		char shown[8 * 4 + 1], *p = shown;
		const uint8_t *m = r->buf + r->start;

		for (int i = 0; i < 8; i++) {
			if (m[i] >= 0x20 && m[i] < 0x7f && m[i] != '\\' && m[i] != '"')
				*p++ = (char)m[i];
			else
				p += sprintf(p, "\\x%02x", m[i]);
		}
		*p = '\0';
		return reader_fail(r, err, -EPROTO,
				   "not a vmig stream (it starts with \"%s\", expected \"%s\")",
				   shown, VMIG_STREAM_MAGIC);
	}
}

static int read_pages_direct(struct vmig_stream_reader *r, struct vmig_record *cur,
			     struct vmig_err *err);
static int reader_apply(struct vmig_stream_reader *r, const struct vmig_record *rec);

/*
 * The part of a LIVE_PAGES body its record checksum covers: the count
 * and the descriptors (all of it if the count is off: the checks that
 * follow reject it).
 */
static uint64_t live_head_len(const uint8_t *body, uint64_t len)
{
	uint64_t count, head;

	if (len < 8)
		return len;
	count = get_le32(body);
	head = 8 + count * VMIG_STREAM_PAGE_DESC;
	return count <= VMIG_STREAM_MAX_BATCH && head <= len ? head : len;
}

int vmig_stream_read_record(struct vmig_stream_reader *r, struct vmig_record *rec,
			    struct vmig_err *err)
{
	char ts[32];
	int ret;

	if (r->error)
		return reader_failed(r, err);
	if (!r->header_done)
		return reader_fail(r, err, -EINVAL, "the stream header must be read first");
	consume(r);

	for (;;) {
		const uint8_t *h;
		uint32_t type, flags, crc, stored;
		uint64_t len, total;
		struct page_counts pc;
		struct vmig_record cur;

		ret = fill(r, VMIG_STREAM_REC_HEADER);
		if (ret == -EPIPE) {
			size_t have = r->end - r->start;

			if (r->ended && have == 0)
				return reader_fail(r, err, -EPIPE,
						   "the stream already ended with END at stream offset %llu",
						   (unsigned long long)r->end_offset);
			if (have == 0)
				return reader_fail(r, err, -EPIPE,
						   "the stream ended at offset %llu without an END record (the sender stopped or the connection broke)",
						   (unsigned long long)r->offset);
			return reader_fail(r, err, -EPIPE,
					   "the stream is truncated at offset %llu, inside the header of the record at offset %llu (%zu of 16 bytes)",
					   (unsigned long long)(r->offset + have),
					   (unsigned long long)r->offset, have);
		}
		if (ret < 0)
			return read_error(r, err, ret, "a record header");
		if (r->ended)
			return reader_fail(r, err, -EPROTO,
					   "data follows the END record: another record starts at stream offset %llu",
					   (unsigned long long)r->offset);

		h = r->buf + r->start;
		type = get_le32(h);
		flags = get_le32(h + 4);
		len = get_le64(h + 8);
		cur = (struct vmig_record){ .type = type, .flags = flags,
					    .offset = r->offset, .len = (size_t)len };
		if (len > VMIG_STREAM_MAX_RECORD)
			return reader_fail(r, err, -EMSGSIZE,
					   "%s record at stream offset %llu claims a %llu-byte body, more than the %u-byte maximum (corrupted stream?)",
					   type_str(type, ts, sizeof(ts)),
					   (unsigned long long)r->offset,
					   (unsigned long long)len, VMIG_STREAM_MAX_RECORD);
		total = VMIG_STREAM_REC_HEADER + len + pad8(len) + VMIG_STREAM_REC_TRAILER;
		if (type == VMIG_REC_LIVE_PAGES && r->version < 2)
			return reader_fail(r, err, -EPROTO,
					   "%s record at stream offset %llu in a version-%u stream (it needs version 2)",
					   type_str(type, ts, sizeof(ts)),
					   (unsigned long long)r->offset, r->version);

		if (r->mem && (type == VMIG_REC_PAGES || type == VMIG_REC_LIVE_PAGES) && flags == 0 &&
		    r->dir == VMIG_STREAM_FORWARD && len <= VMIG_STREAM_MAX_PAGES_BODY) {
			ret = read_pages_direct(r, &cur, err);
			if (ret == 0)
				*rec = cur;
			if (ret <= 0)
				return ret;
			/* Not one for the direct path: read it whole. */
		}

		ret = fill(r, total);
		if (ret == -EPIPE)
			return reader_fail(r, err, -EPIPE,
					   "the stream is truncated at offset %llu, inside the %s record at offset %llu (it needs %llu bytes, %zu came)",
					   (unsigned long long)(r->offset + (r->end - r->start)),
					   type_str(type, ts, sizeof(ts)),
					   (unsigned long long)r->offset,
					   (unsigned long long)total, r->end - r->start);
		if (ret == -ENOMEM)
			return reader_fail(r, err, ret,
					   "out of memory for the %llu-byte %s record at stream offset %llu",
					   (unsigned long long)total, type_str(type, ts, sizeof(ts)),
					   (unsigned long long)r->offset);
		if (ret < 0)
			return read_error(r, err, ret, "a record");

		h = r->buf + r->start;
		if (type == VMIG_REC_LIVE_PAGES) {
			/* Not the payloads: each has its own checksum. */
			uint64_t head = live_head_len(h + VMIG_STREAM_REC_HEADER, len);

			crc = vmig_crc32c(0, h, VMIG_STREAM_REC_HEADER + head);
			crc = vmig_crc32c(crc, h + VMIG_STREAM_REC_HEADER + len, pad8(len));
		} else {
			crc = vmig_crc32c(0, h, total - VMIG_STREAM_REC_TRAILER);
		}
		stored = get_le32(h + total - 8);
		if (crc != stored)
			return reader_fail(r, err, -EBADMSG,
					   "checksum mismatch in the %s record at stream offset %llu (%llu-byte body): stored 0x%08x, computed 0x%08x (the stream is corrupted)",
					   type_str(type, ts, sizeof(ts)),
					   (unsigned long long)r->offset, (unsigned long long)len,
					   stored, crc);
		if (get_le32(h + total - 4) != 0)
			return reader_fail(r, err, -EPROTO,
					   "%s record at stream offset %llu: trailer word after the checksum is 0x%x (expected 0)",
					   type_str(type, ts, sizeof(ts)),
					   (unsigned long long)r->offset, get_le32(h + total - 4));
		for (size_t i = VMIG_STREAM_REC_HEADER + len; i < total - 8; i++)
			if (h[i])
				return reader_fail(r, err, -EPROTO,
						   "%s record at stream offset %llu: padding byte %zu is 0x%02x (expected 0)",
						   type_str(type, ts, sizeof(ts)),
						   (unsigned long long)r->offset,
						   i - VMIG_STREAM_REC_HEADER - (size_t)len, h[i]);
		if (flags & ~VMIG_REC_OPTIONAL)
			return reader_fail(r, err, -EPROTO,
					   "%s record at stream offset %llu has unknown flags 0x%x (this vmig knows only 0x1, optional)",
					   type_str(type, ts, sizeof(ts)),
					   (unsigned long long)r->offset, flags);

		r->consume = total;
		if (!vmig_stream_rec_name(type)) {
			if (flags & VMIG_REC_OPTIONAL) {
				vmig_log(VMIG_LOG_DEBUG,
					 "skipping optional record type 0x%x (%llu bytes) at stream offset %llu",
					 type, (unsigned long long)len,
					 (unsigned long long)r->offset);
				r->stats.records_skipped++;
				consume(r);
				continue;
			}
			return reader_fail(r, err, -EPROTO,
					   "unknown mandatory record type 0x%x at stream offset %llu (%llu-byte body; sent by a newer vmig?)",
					   type, (unsigned long long)r->offset,
					   (unsigned long long)len);
		}
		if (!type_allowed(r->dir, type))
			return reader_fail(r, err, -EPROTO,
					   "%s record at stream offset %llu does not belong in the %s direction",
					   type_str(type, ts, sizeof(ts)),
					   (unsigned long long)r->offset, dir_name(r->dir));
		if (len > type_max_len(type))
			return reader_fail(r, err, -EMSGSIZE,
					   "%s record at stream offset %llu has a %llu-byte body (at most %llu)",
					   type_str(type, ts, sizeof(ts)),
					   (unsigned long long)r->offset, (unsigned long long)len,
					   (unsigned long long)type_max_len(type));

		cur.body = h + VMIG_STREAM_REC_HEADER;
		ret = body_check(&cur, &pc, &r->first);
		if (ret < 0) {
			r->error = ret;
			vmig_err_set(err, ret, "%s", r->first.msg);
			return ret;
		}
		if ((type == VMIG_REC_PAGES || type == VMIG_REC_LIVE_PAGES) && r->mem) {
			ret = reader_apply(r, &cur);
			if (ret < 0) {
				r->error = ret;
				vmig_err_set(err, ret, "%s", r->first.msg);
				return ret;
			}
			cur.body = NULL;
		}
		if (type == VMIG_REC_PAGES || type == VMIG_REC_LIVE_PAGES) {
			r->stats.pages_zero += pc.zero;
			r->stats.pages_raw += pc.raw;
			r->stats.pages_lz4 += pc.lz4;
		}
		if (type == VMIG_REC_END) {
			r->ended = true;
			r->end_offset = r->offset;
		}
		r->stats.records++;
		*rec = cur;
		return 0;
	}
}

int vmig_stream_expect_eof(struct vmig_stream_reader *r, struct vmig_err *err)
{
	int ret;

	if (r->error)
		return reader_failed(r, err);
	if (!r->ended)
		return reader_fail(r, err, -EINVAL, "the END record has not been read yet");
	consume(r);
	ret = fill(r, 1);
	if (ret == -EPIPE)
		return 0;
	if (ret < 0)
		return read_error(r, err, ret, "past the END record");
	return reader_fail(r, err, -EPROTO,
			   "data follows the END record at stream offset %llu",
			   (unsigned long long)r->offset);
}

void vmig_stream_reader_stats(const struct vmig_stream_reader *r,
			      struct vmig_stream_stats *out)
{
	*out = r->stats;
	out->bytes += r->consume;
	out->pending = 0;
}

/* ------------------------------------------------------------------------
 * Record bodies
 */

int vmig_stream_parse_config(const struct vmig_record *rec,
			     struct json_object **out, struct vmig_err *err)
{
	struct json_tokener *tok;
	struct json_object *obj;
	enum json_tokener_error jerr;
	size_t end;
	int ret;

	*out = NULL;
	ret = expect_type(rec, VMIG_REC_CONFIG, err);
	if (ret < 0)
		return ret;
	if (rec->len == 0 || rec->len > VMIG_STREAM_MAX_CONFIG)
		return bad(err, -EPROTO, rec, "body is %zu bytes (expected 1 to %u)",
			   rec->len, VMIG_STREAM_MAX_CONFIG);
	tok = json_tokener_new_ex(JSON_TOKENER_DEFAULT_DEPTH);
	if (!tok)
		return bad(err, -ENOMEM, rec, "out of memory");
	json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8);
	obj = json_tokener_parse_ex(tok, rec->body, (int)rec->len);
	jerr = json_tokener_get_error(tok);
	end = json_tokener_get_parse_end(tok);
	json_tokener_free(tok);
	if (!obj || jerr != json_tokener_success) {
		json_object_put(obj);
		return bad(err, -EPROTO, rec, "body is not valid JSON: %s (at byte %zu)",
			   jerr == json_tokener_continue ? "unexpected end"
							 : json_tokener_error_desc(jerr),
			   end);
	}
	if (end != rec->len) {
		json_object_put(obj);
		return bad(err, -EPROTO, rec, "%zu bytes of junk follow the JSON value",
			   rec->len - end);
	}
	if (!json_object_is_type(obj, json_type_object)) {
		const char *type = json_type_to_name(json_object_get_type(obj));

		ret = bad(err, -EPROTO, rec, "body is a JSON %s, not an object", type);
		json_object_put(obj);
		return ret;
	}
	*out = obj;
	return 0;
}

/* @rec is a @type record with a body that passes its checks. */
static int typed_body(const struct vmig_record *rec, uint32_t type, struct vmig_err *err)
{
	int ret = expect_type(rec, type, err);

	return ret < 0 ? ret : body_check(rec, NULL, err);
}

int vmig_stream_parse_iter_end(const struct vmig_record *rec, uint64_t *iter,
			       uint64_t *pages, struct vmig_err *err)
{
	int ret = typed_body(rec, VMIG_REC_ITER_END, err);

	if (ret < 0)
		return ret;
	*iter = get_le64(rec->body);
	*pages = get_le64((const uint8_t *)rec->body + 8);
	return 0;
}

int vmig_stream_parse_channel(const struct vmig_record *rec, uint64_t *session,
			      uint32_t *index, uint32_t *count, struct vmig_err *err)
{
	const uint8_t *b = rec->body;
	int ret = typed_body(rec, VMIG_REC_CHANNEL, err);

	if (ret < 0)
		return ret;
	*session = get_le64(b);
	*index = get_le32(b + 8);
	*count = get_le32(b + 12);
	return 0;
}

int vmig_stream_parse_extents(const struct vmig_record *rec,
			      struct vmig_stream_extent *out, uint32_t max,
			      uint32_t *n, struct vmig_err *err)
{
	const uint8_t *b = rec->body;
	uint32_t count;
	int ret = typed_body(rec, VMIG_REC_EXTENTS, err);

	if (ret < 0)
		return ret;
	count = get_le32(b);
	if (count > max)
		return bad(err, -EPROTO, rec, "%u extents, more than the %u this side takes",
			   count, max);
	for (uint32_t i = 0; i < count; i++) {
		out[i].gpa = get_le64(b + 8 + 16 * (size_t)i);
		out[i].len = get_le64(b + 16 + 16 * (size_t)i);
	}
	*n = count;
	return 0;
}

int vmig_stream_parse_state(const struct vmig_record *rec,
			    struct vmig_stream_state *out, struct vmig_err *err)
{
	int ret = expect_type(rec, VMIG_REC_STATE, err);

	if (ret < 0)
		return ret;
	return state_check(rec, out, err);
}

int vmig_stream_parse_error(const struct vmig_record *rec, int *errnum,
			    char *msg, size_t msglen, struct vmig_err *err)
{
	const uint8_t *b = rec->body;
	size_t i, o = 0;
	int ret;

	if (rec->type != VMIG_REC_ERROR && rec->type != VMIG_REC_NACK)
		return bad(err, -EINVAL, rec, "expected an ERROR or NACK record");
	ret = error_check(rec, err);
	if (ret < 0)
		return ret;
	*errnum = -(int)get_le32(b);
	if (!msglen)
		return 0;
	/* Copy whole characters; control characters become '?'. */
	for (i = 4; i < rec->len;) {
		size_t n = utf8_seq(b + i, rec->len - i);
		uint32_t c0 = b[i], c1 = n == 2 ? b[i + 1] : 0;
		bool ctrl = n == 0 || c0 < 0x20 || c0 == 0x7f ||
			    (c0 == 0xc2 && c1 < 0xa0);

		if (n == 0)
			n = 1;
		if (o + (ctrl ? 1 : n) >= msglen)
			break;
		if (ctrl) {
			msg[o++] = '?';
		} else {
			memcpy(msg + o, b + i, n);
			o += n;
		}
		i += n;
	}
	msg[o] = '\0';
	return 0;
}

/*
 * A LIVE_PAGES page whose payload does not match its checksum: @torn
 * records it (0, or -errno), or without one it is an error.
 */
typedef int torn_fn(void *arg, uint64_t gpa);

static int pages_apply(const struct vmig_record *rec, vmig_stream_page_dst_fn *page_dst,
		       void *arg, torn_fn *torn, struct vmig_err *err)
{
	const uint8_t *b = rec->body, *payload;
	void *dsts[VMIG_STREAM_MAX_BATCH];
	uint32_t count, i;
	int ret;

	if (rec->type != VMIG_REC_LIVE_PAGES) {
		ret = expect_type(rec, VMIG_REC_PAGES, err);
		if (ret < 0)
			return ret;
	}
	ret = pages_check(rec, NULL, err);
	if (ret < 0)
		return ret;
	count = get_le32(b);

	/* Every destination first: a bad address must write nothing. */
	for (i = 0; i < count; i++) {
		uint64_t gpa = get_le64(b + 8 + (size_t)i * VMIG_STREAM_PAGE_DESC) &
			       ~(uint64_t)PAGE_ENC_MASK;

		dsts[i] = NULL;
		ret = page_dst(arg, gpa, &dsts[i]);
		if (ret == -ERANGE || (ret == 0 && !dsts[i]))
			return bad(err, -ERANGE, rec,
				   "page %u of %u at gpa 0x%llx lies outside guest memory",
				   i, count, (unsigned long long)gpa);
		if (ret < 0)
			return bad(err, ret, rec, "page %u of %u at gpa 0x%llx: %s",
				   i, count, (unsigned long long)gpa, strerror(-ret));
	}

	payload = b + 8 + (size_t)count * VMIG_STREAM_PAGE_DESC;
	for (i = 0; i < count; i++) {
		const uint8_t *d = b + 8 + (size_t)i * VMIG_STREAM_PAGE_DESC;
		uint64_t word = get_le64(d);
		uint32_t plen = get_le32(d + 8);
		int n;

		if (rec->type == VMIG_REC_LIVE_PAGES && plen &&
		    vmig_crc32c(0, payload, plen) != get_le32(d + 12)) {
			uint64_t gpa = word & ~(uint64_t)PAGE_ENC_MASK;

			if (!torn)
				return bad(err, -EBADMSG, rec,
					   "page %u of %u at gpa 0x%llx: its payload does not match its checksum",
					   i, count, (unsigned long long)gpa);
			ret = torn(arg, gpa);
			if (ret < 0)
				return bad(err, ret, rec, "page %u of %u at gpa 0x%llx: %s", i,
					   count, (unsigned long long)gpa, strerror(-ret));
			payload += plen;
			continue;
		}
		switch (word & PAGE_ENC_MASK) {
		case VMIG_PAGE_ZERO:
			memset(dsts[i], 0, VMIG_STREAM_PAGE_SIZE);
			break;
		case VMIG_PAGE_RAW:
			memcpy(dsts[i], payload, VMIG_STREAM_PAGE_SIZE);
			break;
		default: /* LZ4, by pages_check() */
			n = LZ4_decompress_safe((const char *)payload, dsts[i], (int)plen,
						VMIG_STREAM_PAGE_SIZE);
			if (n != (int)VMIG_STREAM_PAGE_SIZE) {
				if (n < 0)
					return bad(err, -EPROTO, rec,
						   "page %u of %u at gpa 0x%llx: its %u-byte LZ4 payload is corrupt",
						   i, count,
						   (unsigned long long)(word & ~(uint64_t)PAGE_ENC_MASK),
						   plen);
				return bad(err, -EPROTO, rec,
					   "page %u of %u at gpa 0x%llx: its LZ4 payload decodes to %d bytes (expected 4096)",
					   i, count,
					   (unsigned long long)(word & ~(uint64_t)PAGE_ENC_MASK), n);
			}
			break;
		}
		payload += plen;
	}
	return 0;
}

int vmig_stream_pages_apply(const struct vmig_record *rec,
			    vmig_stream_page_dst_fn *page_dst, void *arg,
			    struct vmig_err *err)
{
	return pages_apply(rec, page_dst, arg, NULL, err);
}

struct region_lookup {
	const struct vmig_mem_region *regions;
	unsigned int n;
	unsigned int last;        /* consecutive pages mostly share a region */
};

static bool region_has(const struct vmig_mem_region *r, uint64_t gpa)
{
	return r->size >= VMIG_STREAM_PAGE_SIZE && gpa >= r->gpa &&
	       gpa - r->gpa <= r->size - VMIG_STREAM_PAGE_SIZE;
}

static int region_dst(void *arg, uint64_t gpa, void **dst)
{
	struct region_lookup *l = arg;

	if (l->last < l->n && region_has(&l->regions[l->last], gpa))
		goto found;
	for (l->last = 0; l->last < l->n; l->last++)
		if (region_has(&l->regions[l->last], gpa))
			goto found;
	return -ERANGE;
found:
	*dst = l->regions[l->last].hva + (gpa - l->regions[l->last].gpa);
	return 0;
}

int vmig_stream_pages_apply_regions(const struct vmig_record *rec,
				    const struct vmig_mem_region *regions,
				    unsigned int n, struct vmig_err *err)
{
	struct region_lookup l = { .regions = regions, .n = n, .last = n };

	return vmig_stream_pages_apply(rec, region_dst, &l, err);
}

/* ------------------------------------------------------------------------
 * Torn pages (LIVE_PAGES)
 */

/* @gpa's bit in r->torn: pages are numbered through the regions in order. */
static bool torn_bit(const struct vmig_stream_reader *r, uint64_t gpa, uint64_t *bit)
{
	uint64_t base = 0;

	for (unsigned int k = 0; k < r->nr_mem; k++) {
		if (region_has(&r->mem[k], gpa)) {
			*bit = base + (gpa - r->mem[k].gpa) / VMIG_STREAM_PAGE_SIZE;
			return true;
		}
		base += r->mem[k].size / VMIG_STREAM_PAGE_SIZE;
	}
	return false;
}

static int torn_mark(void *arg, uint64_t gpa)
{
	struct vmig_stream_reader *r = arg;
	uint64_t bit, mask;

	if (!torn_bit(r, gpa, &bit))
		return 0;       /* never: destinations are checked first */
	if (!r->torn) {
		uint64_t pages = 0;

		for (unsigned int k = 0; k < r->nr_mem; k++)
			pages += r->mem[k].size / VMIG_STREAM_PAGE_SIZE;
		r->torn = calloc((pages + 63) / 64, sizeof(uint64_t));
		if (!r->torn)
			return -ENOMEM;
	}
	mask = 1ull << (bit % 64);
	if (!(r->torn[bit / 64] & mask)) {
		r->torn[bit / 64] |= mask;
		r->torn_count++;
	}
	r->stats.pages_torn++;
	return 0;
}

/* A new copy of @gpa is here. */
static void torn_clear(struct vmig_stream_reader *r, uint64_t gpa)
{
	uint64_t bit, mask;

	if (!r->torn_count || !torn_bit(r, gpa, &bit))
		return;
	mask = 1ull << (bit % 64);
	if (r->torn[bit / 64] & mask) {
		r->torn[bit / 64] &= ~mask;
		r->torn_count--;
	}
}

uint64_t vmig_stream_reader_torn(const struct vmig_stream_reader *r, uint64_t *gpa)
{
	uint64_t w = 0, bit, base = 0;

	*gpa = 0;
	if (!r->torn_count)
		return 0;
	while (!r->torn[w])
		w++;
	bit = w * 64 + (uint64_t)__builtin_ctzll(r->torn[w]);
	for (unsigned int k = 0; k < r->nr_mem; k++) {
		uint64_t pages = r->mem[k].size / VMIG_STREAM_PAGE_SIZE;

		if (bit < base + pages) {
			*gpa = r->mem[k].gpa + (bit - base) * VMIG_STREAM_PAGE_SIZE;
			break;
		}
		base += pages;
	}
	return r->torn_count;
}

/* The whole-record path: destinations by region, torn pages tracked. */
struct reader_lookup {
	struct region_lookup l;
	struct vmig_stream_reader *r;
};

static int reader_dst(void *arg, uint64_t gpa, void **dst)
{
	struct reader_lookup *rl = arg;
	int ret = region_dst(&rl->l, gpa, dst);

	if (!ret)
		torn_clear(rl->r, gpa);
	return ret;
}

static int reader_torn(void *arg, uint64_t gpa)
{
	return torn_mark(((struct reader_lookup *)arg)->r, gpa);
}

static int reader_apply(struct vmig_stream_reader *r, const struct vmig_record *rec)
{
	struct reader_lookup rl = {
		.l = { .regions = r->mem, .n = r->nr_mem, .last = r->nr_mem }, .r = r,
	};

	return pages_apply(rec, reader_dst, &rl, reader_torn, &r->first);
}

/* ------------------------------------------------------------------------
 * Direct placement of PAGES (vmig_stream_reader_set_memory)
 *
 * The record's header and descriptor table are read into the buffer and
 * checked; then every RAW payload is read by the transport straight into
 * its guest page, and LZ4 payloads into lz4buf, a chunk at a time, each
 * chunk checksummed while it is still in the cache.  So a page costs one
 * copy (the kernel's) instead of two, and no pass over a 4 MiB buffer that
 * no longer fits in it.  The checksum covers the whole record as always,
 * but is known only at its end: a corrupt payload has been written to its
 * page by then (never outside guest memory: every destination is checked
 * before the first payload byte is read), and the error that follows makes
 * the caller discard the VM.  LZ4 and ZERO pages are written only after
 * the checksum matched.
 */
#define DIRECT_CHUNK (256u << 10)

/* The record is not one this path takes: read it whole instead. */
#define NOT_DIRECT 1

/* Bytes for the payloads: what the buffer holds first, then the transport. */
static int direct_in(struct vmig_stream_reader *r, const struct iovec *iov, int n,
		     size_t bytes, const struct vmig_record *cur, uint32_t *crc,
		     struct vmig_err *err)
{
	char ts[32];
	int ret;

	if (r->start < r->end) {
		/* Read-ahead already in the buffer (always less than a chunk). */
		size_t at = r->start;

		for (int i = 0; i < n; i++) {
			memcpy(iov[i].iov_base, r->buf + at, iov[i].iov_len);
			at += iov[i].iov_len;
		}
		r->start = at;
		if (r->start == r->end)
			r->start = r->end = 0;
	} else {
		ret = vmig_transport_readv_full(r->t, iov, n);
		if (ret == -EPIPE)
			return reader_fail(r, err, -EPIPE,
					   "the stream is truncated inside the %s record at offset %llu (its %llu-byte body did not all come)",
					   type_str(cur->type, ts, sizeof(ts)),
					   (unsigned long long)cur->offset,
					   (unsigned long long)cur->len);
		if (ret < 0)
			return read_error(r, err, ret, "page data");
	}
	for (int i = 0; crc && i < n; i++)
		*crc = vmig_crc32c(*crc, iov[i].iov_base, iov[i].iov_len);
	r->offset += bytes;
	r->stats.bytes += bytes;
	return 0;
}

static int read_pages_direct(struct vmig_stream_reader *r, struct vmig_record *cur,
			     struct vmig_err *err)
{
	struct region_lookup l = { .regions = r->mem, .n = r->nr_mem, .last = r->nr_mem };
	struct iovec part[64];
	const uint8_t *b;
	uint64_t len = cur->len, head, sum = 0, done;
	uint32_t count, i, crc, stored;
	struct page_counts pc = { 0 };
	size_t lz4_len = 0, pad, k, np, have;
	bool live = cur->type == VMIG_REC_LIVE_PAGES;
	/* LIVE_PAGES: the next page to check, where its payload starts. */
	uint32_t vi = 0;
	uint64_t voff = 0, vlz4 = 0, got = 0;
	uint64_t torn[VMIG_STREAM_MAX_BATCH / 64] = { 0 };
	int n = 0, ret;
	char ts[32];

	ret = fill(r, VMIG_STREAM_REC_HEADER + 8);
	if (ret)
		return ret == -EPIPE ? NOT_DIRECT : read_error(r, err, ret, "a record");
	b = r->buf + r->start + VMIG_STREAM_REC_HEADER;
	count = get_le32(b);
	if (count == 0 || count > VMIG_STREAM_MAX_BATCH || get_le32(b + 4))
		return NOT_DIRECT;
	head = 8 + (uint64_t)count * VMIG_STREAM_PAGE_DESC;
	if (head > len)
		return NOT_DIRECT;
	ret = fill(r, VMIG_STREAM_REC_HEADER + head);
	if (ret)
		return ret == -EPIPE ? NOT_DIRECT : read_error(r, err, ret, "a record");
	b = r->buf + r->start + VMIG_STREAM_REC_HEADER;

	/* Every descriptor and destination before a byte of payload. */
	for (i = 0; i < count; i++) {
		const uint8_t *d = b + 8 + (size_t)i * VMIG_STREAM_PAGE_DESC;
		uint64_t word = get_le64(d);
		uint32_t enc = (uint32_t)(word & PAGE_ENC_MASK), plen = get_le32(d + 8);
		void *dst;

		if ((get_le32(d + 12) && (!live || enc == VMIG_PAGE_ZERO)) ||
		    !(enc == VMIG_PAGE_ZERO ? plen == 0 :
		      enc == VMIG_PAGE_RAW ? plen == VMIG_STREAM_PAGE_SIZE :
		      enc == VMIG_PAGE_LZ4 && plen > 0 && plen < VMIG_STREAM_PAGE_SIZE))
			return NOT_DIRECT;
		if (region_dst(&l, word & ~(uint64_t)PAGE_ENC_MASK, &dst))
			return NOT_DIRECT;
		/* In ascending order, so no page twice: order cannot matter. */
		if (i && (uint8_t *)dst <= r->dsts[i - 1])
			return NOT_DIRECT;
		r->dsts[i] = dst;
		torn_clear(r, word & ~(uint64_t)PAGE_ENC_MASK);
		sum += plen;
		if (plen == 0) {
			pc.zero++;
			continue;
		}
		if (enc == VMIG_PAGE_RAW) {
			pc.raw++;
			dst = r->dsts[i];
		} else {
			pc.lz4++;
			dst = r->lz4buf + lz4_len;
			lz4_len += plen;
		}
		if (n && (uint8_t *)r->iov[n - 1].iov_base + r->iov[n - 1].iov_len == dst)
			r->iov[n - 1].iov_len += plen;
		else
			r->iov[n++] = (struct iovec){ dst, plen };
	}
	if (sum != len - head)
		return NOT_DIRECT;

	/* Header and descriptors are checked: keep them, consume them. */
	memcpy(r->head, b, head);
	b = r->head;
	crc = vmig_crc32c(0, r->buf + r->start, VMIG_STREAM_REC_HEADER + head);
	r->start += VMIG_STREAM_REC_HEADER + head;
	r->offset += VMIG_STREAM_REC_HEADER + head;
	r->stats.bytes += VMIG_STREAM_REC_HEADER + head;
	if (r->start == r->end)
		r->start = r->end = 0;

	/*
	 * The payloads, a chunk of at most DIRECT_CHUNK bytes (or what is
	 * buffered) at a time: @k is the iovec and @done the bytes of it
	 * already filled.
	 */
	for (k = 0, done = 0; k < (size_t)n;) {
		size_t room = r->end - r->start, bytes = 0;

		if (room == 0)
			room = DIRECT_CHUNK;
		for (np = 0; k < (size_t)n && np < 64 && bytes < room; np++) {
			size_t take = r->iov[k].iov_len - done;

			if (take > room - bytes)
				take = room - bytes;
			part[np] = (struct iovec){ (uint8_t *)r->iov[k].iov_base + done, take };
			bytes += take;
			done += take;
			if (done == r->iov[k].iov_len) {
				k++;
				done = 0;
			}
		}
		ret = direct_in(r, part, (int)np, bytes, cur, live ? NULL : &crc, err);
		if (ret)
			return ret;
		/* LIVE_PAGES: check each page whose payload is complete, while hot. */
		got += bytes;
		for (; live && vi < count; vi++) {
			const uint8_t *d = b + 8 + (size_t)vi * VMIG_STREAM_PAGE_DESC;
			uint32_t plen = get_le32(d + 8);
			const uint8_t *data;

			if (voff + plen > got)
				break;
			if (!plen)
				continue;
			if ((get_le64(d) & PAGE_ENC_MASK) == VMIG_PAGE_RAW) {
				data = r->dsts[vi];
			} else {
				data = r->lz4buf + vlz4;
				vlz4 += plen;
			}
			if (vmig_crc32c(0, data, plen) != get_le32(d + 12))
				torn[vi / 64] |= 1ull << (vi % 64);
			voff += plen;
		}
	}

	/* Padding and trailer. */
	pad = pad8(len);
	ret = fill(r, pad + VMIG_STREAM_REC_TRAILER);
	if (ret == -EPIPE)
		return reader_fail(r, err, -EPIPE,
				   "the stream is truncated inside the %s record at offset %llu (its trailer did not come)",
				   type_str(cur->type, ts, sizeof(ts)),
				   (unsigned long long)cur->offset);
	if (ret)
		return read_error(r, err, ret, "a record trailer");
	have = r->start;
	crc = vmig_crc32c(crc, r->buf + have, pad);
	stored = get_le32(r->buf + have + pad);
	if (crc != stored)
		return reader_fail(r, err, -EBADMSG,
				   "checksum mismatch in the %s record at stream offset %llu (%llu-byte body): stored 0x%08x, computed 0x%08x (the stream is corrupted)",
				   type_str(cur->type, ts, sizeof(ts)),
				   (unsigned long long)cur->offset, (unsigned long long)len,
				   stored, crc);
	if (get_le32(r->buf + have + pad + 4) != 0)
		return reader_fail(r, err, -EPROTO,
				   "%s record at stream offset %llu: trailer word after the checksum is 0x%x (expected 0)",
				   type_str(cur->type, ts, sizeof(ts)),
				   (unsigned long long)cur->offset, get_le32(r->buf + have + pad + 4));
	for (i = 0; i < pad; i++)
		if (r->buf[have + i])
			return reader_fail(r, err, -EPROTO,
					   "%s record at stream offset %llu: padding byte %u is 0x%02x (expected 0)",
					   type_str(cur->type, ts, sizeof(ts)),
					   (unsigned long long)cur->offset, i, r->buf[have + i]);
	r->consume = pad + VMIG_STREAM_REC_TRAILER;

	/* Verified: the pages that are not raw, and the torn ones. */
	lz4_len = 0;
	for (i = 0; i < count && (pc.zero || pc.lz4 || live); i++) {
		const uint8_t *d = b + 8 + (size_t)i * VMIG_STREAM_PAGE_DESC;
		uint64_t word = get_le64(d);
		uint32_t plen = get_le32(d + 8);
		int dec;

		if (torn[i / 64] & (1ull << (i % 64))) {
			if ((word & PAGE_ENC_MASK) == VMIG_PAGE_LZ4)
				lz4_len += plen;
			ret = torn_mark(r, word & ~(uint64_t)PAGE_ENC_MASK);
			if (ret)
				return reader_fail(r, err, ret, "out of memory for the torn-page map");
			continue;
		}
		switch (word & PAGE_ENC_MASK) {
		case VMIG_PAGE_ZERO:
			memset(r->dsts[i], 0, VMIG_STREAM_PAGE_SIZE);
			break;
		case VMIG_PAGE_LZ4:
			dec = LZ4_decompress_safe((const char *)r->lz4buf + lz4_len,
						  (char *)r->dsts[i], (int)plen,
						  VMIG_STREAM_PAGE_SIZE);
			lz4_len += plen;
			if (dec < 0)
				return reader_fail(r, err, -EPROTO,
						   "PAGES record at stream offset %llu: page %u of %u at gpa 0x%llx: its %u-byte LZ4 payload is corrupt",
						   (unsigned long long)cur->offset, i, count,
						   (unsigned long long)(word & ~(uint64_t)PAGE_ENC_MASK),
						   plen);
			if (dec != (int)VMIG_STREAM_PAGE_SIZE)
				return reader_fail(r, err, -EPROTO,
						   "PAGES record at stream offset %llu: page %u of %u at gpa 0x%llx: its LZ4 payload decodes to %d bytes (expected 4096)",
						   (unsigned long long)cur->offset, i, count,
						   (unsigned long long)(word & ~(uint64_t)PAGE_ENC_MASK),
						   dec);
			break;
		default:
			break;
		}
	}
	r->stats.pages_zero += pc.zero;
	r->stats.pages_raw += pc.raw;
	r->stats.pages_lz4 += pc.lz4;
	r->stats.records++;
	cur->body = NULL;
	return 0;
}
