/*
 * The vmig migration stream, format version 1: encoder and decoder.
 *
 * The format is specified in vmig-stream(5) (man/vmig-stream.5); this
 * header and migrate/stream.c follow it exactly.  In short: a 32-byte
 * header, then records, each 8-byte aligned:
 *
 *   u32 type | u32 flags | u64 length | body | zero padding to 8 |
 *   u32 CRC-32C of (header, body, padding) | u32 0
 *
 * all little-endian.  The source writes the forward direction (CONFIG,
 * PAGES, ITER_END, STATE, SWITCHOVER, COMMIT, END, ERROR); the destination
 * answers on the same connection in the reverse direction (its own header,
 * then READY, RUNNING, NACK).
 *
 * The reader trusts nothing: every length, count, address and encoding is
 * checked before it is used, and every failure comes back as -errno with a
 * message that names the record type, its offset in the stream and what
 * was expected.  No input makes it allocate more than
 * VMIG_STREAM_MAX_RECORD plus a small read-ahead, and the buffer grows
 * only as bytes really arrive.
 *
 * Threads: a writer or reader belongs to one thread at a time; neither
 * locks.  The record parsing helpers (vmig_stream_parse_*,
 * vmig_stream_pages_apply*) touch only their arguments and may run in
 * several threads at once on different records.
 */
#ifndef VMIG_STREAM_H
#define VMIG_STREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vmig/util.h"

struct json_object;
struct vmig_transport;
struct vmig_mem_region;

/* ------------------------------------------------------------------------
 * Format constants (vmig-stream(5))
 */

#define VMIG_STREAM_MAGIC        "VMIGSTRM"   /* 8 bytes, no NUL */
#define VMIG_STREAM_VERSION      2u           /* the newest this vmig reads */
#define VMIG_STREAM_VERSION_MIN  1u           /* the oldest */
#define VMIG_STREAM_HEADER_SIZE  32u

#define VMIG_STREAM_REC_HEADER   16u          /* type, flags, length */
#define VMIG_STREAM_REC_TRAILER  8u           /* crc, zero */
#define VMIG_STREAM_MAX_RECORD   (64u << 20)  /* longest body */

#define VMIG_STREAM_PAGE_SIZE    4096u
#define VMIG_STREAM_MAX_BATCH    1024u        /* pages in one PAGES record */
#define VMIG_STREAM_PAGE_DESC    16u          /* u64 gpa|enc, u32 len, u32 0 */
/* Longest PAGES body: count header, descriptors, raw payloads. */
#define VMIG_STREAM_MAX_PAGES_BODY \
	(8u + VMIG_STREAM_MAX_BATCH * (VMIG_STREAM_PAGE_DESC + VMIG_STREAM_PAGE_SIZE))

#define VMIG_STREAM_MAX_CONFIG   (1u << 20)   /* CONFIG body (JSON) */
#define VMIG_STREAM_MAX_MESSAGE  4096u        /* ERROR/NACK message bytes */
#define VMIG_STREAM_STATE_NAME_MAX 64u        /* STATE section name bytes */
#define VMIG_STREAM_MAX_EXTENTS  65536u       /* ranges in one EXTENTS record */

/* Record types. */
enum vmig_rec_type {
	/* forward: source -> destination */
	VMIG_REC_CONFIG = 1,
	VMIG_REC_PAGES = 2,
	VMIG_REC_ITER_END = 3,
	VMIG_REC_STATE = 4,
	VMIG_REC_SWITCHOVER = 5,
	VMIG_REC_COMMIT = 6,
	VMIG_REC_END = 7,
	VMIG_REC_ERROR = 8,
	VMIG_REC_EXTENTS = 9,        /* optional: RAM the first pass will fill */
	VMIG_REC_CHANNEL = 10,       /* first record of an extra connection */
	VMIG_REC_LIVE_PAGES = 11,    /* PAGES with a checksum per payload */
	/* reverse: destination -> source */
	VMIG_REC_READY = 0x10,
	VMIG_REC_RUNNING = 0x11,
	VMIG_REC_NACK = 0x12,
	VMIG_REC_ITER_DONE = 0x13,   /* optional: an iteration is applied */
};

/* Record flags.  Bits other than these must be zero. */
#define VMIG_REC_OPTIONAL 0x1u   /* a reader that does not know the type skips it */

/* Page encodings, in the low 12 bits of a descriptor's gpa. */
enum vmig_page_enc {
	VMIG_PAGE_ZERO = 0,      /* all zero; no payload */
	VMIG_PAGE_RAW = 1,       /* 4096 bytes */
	VMIG_PAGE_LZ4 = 2,       /* an LZ4 block that decodes to 4096 bytes */
};

/* What the writer may do with a non-zero page. */
enum vmig_compress {
	VMIG_COMPRESS_NONE = 0,  /* RAW */
	VMIG_COMPRESS_LZ4 = 1,   /* LZ4 when it saves space, else RAW */
	/*
	 * LZ4 while it pays: a batch that does not shrink by 1/16, or whose
	 * compression took longer than the link needs for the bytes it saved
	 * (both measured by the writer), sends the next 16 batches RAW, then
	 * tries again; each failure in a row doubles the wait, up to 128
	 * batches.
	 */
	VMIG_COMPRESS_AUTO = 2,
};

/* Which way a stream flows; decides which record types it may carry. */
enum vmig_stream_dir {
	VMIG_STREAM_FORWARD = 0, /* source -> destination (also save files) */
	VMIG_STREAM_REVERSE = 1, /* destination -> source replies */
};

struct vmig_stream_stats {
	uint64_t bytes;          /* writer: handed to the transport; reader: consumed */
	uint64_t pending;        /* writer: produced, still buffered (reader: 0) */
	uint64_t records;        /* records written / returned (not skipped ones) */
	uint64_t records_skipped;/* reader: unknown optional records skipped */
	uint64_t pages_zero, pages_raw, pages_lz4;
	uint64_t pages_torn;     /* reader: pages that changed while sent (LIVE_PAGES) */
};

/* "PAGES", "READY", ...; NULL for a type this vmig does not know. */
const char *vmig_stream_rec_name(uint32_t type);

/* ------------------------------------------------------------------------
 * Writer
 *
 * Records are assembled in a buffer and go to the transport when it fills,
 * on vmig_stream_flush(), or at once when they are large (a full page
 * batch goes out with one writev, its pages not copied again).  Writing
 * any record first closes the open page batch, so records stay in the
 * order they were written.
 *
 * Errors: the first transport failure is sticky: that call and every later
 * one return its -errno, and vmig_stream_writer_err() has the message
 * (the transport's, with the stream offset).  -EINVAL for misuse (a record
 * before the header, after END, of the other direction, bad flags, too
 * long, an unaligned gpa) is not sticky and has no message.
 */
struct vmig_stream_writer;

/* A writer on @t, which it borrows.  0 or -ENOMEM. */
int vmig_stream_writer_create(struct vmig_transport *t, enum vmig_stream_dir dir,
			      struct vmig_stream_writer **out);
/* Free; unflushed data is dropped.  NULL-safe.  Does not close @t. */
void vmig_stream_writer_destroy(struct vmig_stream_writer *w);

/* The 32-byte header.  Must come first, once. */
int vmig_stream_write_header(struct vmig_stream_writer *w);

/*
 * A record with @len bytes of @body (NULL if @len is 0).  @flags may hold
 * VMIG_REC_OPTIONAL.  The body is not interpreted: prefer the typed
 * helpers below, which build valid bodies.
 */
int vmig_stream_write_record(struct vmig_stream_writer *w, uint32_t type,
			     uint32_t flags, const void *body, size_t len);

/* CONFIG: @cfg serialised as plain JSON.  -EINVAL if not an object. */
int vmig_stream_write_config(struct vmig_stream_writer *w,
			     struct json_object *cfg);
/* ITER_END: iteration @iter ended after @pages pages. */
int vmig_stream_write_iter_end(struct vmig_stream_writer *w, uint64_t iter,
			       uint64_t pages);

/*
 * CHANNEL: this connection is channel @index (1..@count-1) of the
 * migration whose CONFIG named @session and @count channels.
 */
int vmig_stream_write_channel(struct vmig_stream_writer *w, uint64_t session,
			      uint32_t index, uint32_t count);

/* A range of guest-physical RAM, page aligned. */
struct vmig_stream_extent {
	uint64_t gpa;
	uint64_t len;
};
/*
 * EXTENTS (optional): the @n (1..VMIG_STREAM_MAX_EXTENTS) ranges, in
 * ascending order and not overlapping, that the first pass will write.
 * A hint: the destination may fault that RAM in ahead of the pages.
 * -EINVAL for ranges that break those rules.
 */
int vmig_stream_write_extents(struct vmig_stream_writer *w,
			      const struct vmig_stream_extent *e, uint32_t n);
/*
 * STATE: section @name (1..VMIG_STREAM_STATE_NAME_MAX printable ASCII
 * bytes, no spaces), layout @version, @instance (vCPU index or 0), @len
 * bytes of @data.
 */
int vmig_stream_write_state(struct vmig_stream_writer *w, const char *name,
			    uint16_t version, uint32_t instance,
			    const void *data, size_t len);
/*
 * ERROR (forward) or NACK (reverse): @errnum (positive or negative errno,
 * sent positive) and a message.  The message is cut at
 * VMIG_STREAM_MAX_MESSAGE bytes and bytes that are not UTF-8 become '?'.
 */
int vmig_stream_write_error(struct vmig_stream_writer *w, uint32_t type,
			    int errnum, const char *fmt, ...) VMIG_PRINTF(4, 5);

/*
 * Add one 4 KiB page at guest-physical @gpa (page aligned) read from
 * @page.  Zero pages travel as a descriptor only; others are copied into
 * the batch at once (so the guest may change @page as soon as this
 * returns: the dirty log will send it again), then LZ4-compressed if
 * @mode asks and it saves space.  The batch becomes a PAGES record at
 * VMIG_STREAM_MAX_BATCH pages, at vmig_stream_flush_pages(), or before
 * any other record.  A page may appear twice; the later copy wins.
 */
int vmig_stream_add_page(struct vmig_stream_writer *w, uint64_t gpa,
			 const void *page, enum vmig_compress mode);
/*
 * Live mode (for a running guest; before the header, which then says
 * version 2, the first with LIVE_PAGES; -EINVAL after it): pages go
 * out as LIVE_PAGES records, raw ones straight from @page with a checksum
 * of their own, without a copy.  @page must then stay mapped until the
 * batch is flushed, and the guest may write it meanwhile: the receiver
 * sees the page torn and waits for the next copy, which the dirty log
 * guarantees.  Batches are also cut at 256 KiB of payload, so pages are
 * still in the cache when the kernel copies them.
 */
int vmig_stream_writer_set_live(struct vmig_stream_writer *w, bool live);
/* Close the open page batch (if any) into a PAGES (LIVE_PAGES) record. */
int vmig_stream_flush_pages(struct vmig_stream_writer *w);
/* Close the batch and hand everything buffered to the transport. */
int vmig_stream_flush(struct vmig_stream_writer *w);
/*
 * END, flush, then shut down the transport's write side (a file is
 * fsynced there, so a full disk is reported here at the latest).
 */
int vmig_stream_finish(struct vmig_stream_writer *w);

void vmig_stream_writer_stats(const struct vmig_stream_writer *w,
			      struct vmig_stream_stats *out);
/* The sticky error (code 0 if none). */
const struct vmig_err *vmig_stream_writer_err(const struct vmig_stream_writer *w);

/* ------------------------------------------------------------------------
 * Reader
 */

/* A record as read.  @body is 8-byte aligned and valid until the next read. */
struct vmig_record {
	uint32_t type;
	uint32_t flags;
	uint64_t offset;         /* stream offset of the record's header */
	const void *body;
	size_t len;
};

struct vmig_stream_reader;

/* A reader on @t, which it borrows.  0 or -ENOMEM. */
int vmig_stream_reader_create(struct vmig_transport *t, enum vmig_stream_dir dir,
			      struct vmig_stream_reader **out);
/* NULL-safe.  Does not close @t. */
void vmig_stream_reader_destroy(struct vmig_stream_reader *r);

/*
 * Read and check the header.  -EPROTO "not a vmig stream" (wrong magic),
 * -EPROTONOSUPPORT "stream version N is not supported by this vmig
 * (supports 1)", -EPROTO for a bad size, flags or reserved field, -EPIPE
 * if the stream ends inside it, or the transport's -errno.
 */
int vmig_stream_read_header(struct vmig_stream_reader *r, struct vmig_err *err);

/*
 * Read the next record and check its framing (length bound, checksum,
 * padding, trailer, flags), its type (known and of this direction, or
 * unknown with VMIG_REC_OPTIONAL, which is skipped and never returned)
 * and, for known types, the body's structure: fixed sizes, PAGES
 * descriptors (count, encodings, payload lengths; not the addresses:
 * vmig_stream_pages_apply does that), STATE names, ERROR/NACK messages.
 * CONFIG's JSON is checked by vmig_stream_parse_config().
 *
 * Returns 0 and the record in @rec; after END, the next call fails.
 * Errors: -EPIPE if the stream ends (before END, or mid-record:
 * "truncated"), -EBADMSG for a checksum mismatch, -EPROTO for anything
 * malformed, -EMSGSIZE for a length over the limits, the transport's
 * -errno.  Any error is final: later calls return it again.
 */
int vmig_stream_read_record(struct vmig_stream_reader *r, struct vmig_record *rec,
			    struct vmig_err *err);

/*
 * From now on apply PAGES records to guest memory (@n regions, which must
 * stay mapped while the reader reads) as they are read, and return them
 * with a NULL @body (their @len as sent).  RAW payloads go from the
 * transport straight into their pages, so a page is copied once; see
 * vmig_stream_pages_apply_regions() for the checks (a bad address writes
 * nothing).  One difference: the record's checksum can only be verified
 * at its end, so on -EBADMSG raw pages of that record may hold what came;
 * the caller discards the VM on any error.  0 or -ENOMEM.
 */
int vmig_stream_reader_set_memory(struct vmig_stream_reader *r,
				  const struct vmig_mem_region *regions, unsigned int n);

/*
 * With set_memory: a LIVE_PAGES page whose payload does not match its
 * checksum is "torn" (the guest wrote it while it was sent) and is not
 * an error by itself; it must come again, and any later copy of it
 * clears it.  Returns how many pages are torn now, and the gpa of one in
 * *@gpa.  Once the source has sent its last pass this must be 0:
 * otherwise the stream lost pages (dst.c fails the migration).
 */
uint64_t vmig_stream_reader_torn(const struct vmig_stream_reader *r, uint64_t *gpa);

/*
 * After END: 0 if the stream ends there, -EPROTO if more bytes follow.
 * Blocks until the peer closes (or the transport's timeout).
 */
int vmig_stream_expect_eof(struct vmig_stream_reader *r, struct vmig_err *err);

/*
 * Bytes already read from the transport but not yet returned as records:
 * poll() on the transport's fd does not see them, so a caller polling for
 * the next record checks this first.
 */
size_t vmig_stream_reader_buffered(const struct vmig_stream_reader *r);

void vmig_stream_reader_stats(const struct vmig_stream_reader *r,
			      struct vmig_stream_stats *out);

/* ------------------------------------------------------------------------
 * Record bodies (pure functions of a record; messages name its offset)
 */

/* CONFIG -> a new reference to a JSON object.  -EPROTO if not one. */
int vmig_stream_parse_config(const struct vmig_record *rec,
			     struct json_object **out, struct vmig_err *err);

int vmig_stream_parse_iter_end(const struct vmig_record *rec, uint64_t *iter,
			       uint64_t *pages, struct vmig_err *err);
int vmig_stream_parse_channel(const struct vmig_record *rec, uint64_t *session,
			      uint32_t *index, uint32_t *count, struct vmig_err *err);

/*
 * EXTENTS -> up to @max ranges in @out (the record's count in *@n; -EPROTO
 * if it holds more than @max, or ranges that are unaligned, empty,
 * overlapping or out of order).
 */
int vmig_stream_parse_extents(const struct vmig_record *rec,
			      struct vmig_stream_extent *out, uint32_t max,
			      uint32_t *n, struct vmig_err *err);

struct vmig_stream_state {
	char name[VMIG_STREAM_STATE_NAME_MAX + 1];
	uint16_t version;
	uint32_t instance;
	const void *data;        /* inside the record's body, 8-byte aligned */
	size_t len;
};
int vmig_stream_parse_state(const struct vmig_record *rec,
			    struct vmig_stream_state *out, struct vmig_err *err);

/*
 * ERROR or NACK -> *errnum (negative errno) and the message, NUL-terminated
 * in @msg (cut to fit), control characters replaced by '?' so it is safe
 * to print.
 */
int vmig_stream_parse_error(const struct vmig_record *rec, int *errnum,
			    char *msg, size_t msglen, struct vmig_err *err);

/*
 * Where a page goes: store the 4 KiB destination for @gpa in *dst and
 * return 0, or return -ERANGE if @gpa is not guest memory (any other
 * -errno is passed on).
 */
typedef int vmig_stream_page_dst_fn(void *arg, uint64_t gpa, void **dst);

/*
 * Decode a PAGES record into guest memory.  Checks the whole record and
 * every page's destination first ("page at gpa 0x... lies outside guest
 * memory" -> -ERANGE), so a bad address writes nothing; then decodes.  An
 * LZ4 page that does not decode to exactly 4096 bytes fails with -EPROTO;
 * pages before it in the batch have been written by then (the caller
 * discards the VM on any error anyway).  Never writes outside the
 * destinations @page_dst returns.
 */
int vmig_stream_pages_apply(const struct vmig_record *rec,
			    vmig_stream_page_dst_fn *page_dst, void *arg,
			    struct vmig_err *err);

/* The same with guest memory given as @n regions (any order). */
int vmig_stream_pages_apply_regions(const struct vmig_record *rec,
				    const struct vmig_mem_region *regions,
				    unsigned int n, struct vmig_err *err);

#endif /* VMIG_STREAM_H */
