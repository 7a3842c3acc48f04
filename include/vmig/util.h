/*
 * vmig utilities: sizes and durations, page bitmaps, the control protocol,
 * the run directory, first-error-wins error contexts and logging.
 *
 * Everything here is plain C11 + POSIX and knows nothing about KVM.
 * Functions that can fail return 0 or a negative errno value.  Unless a
 * comment says otherwise, a function touches only the objects passed to it,
 * so it is thread-safe as long as no two threads use the same object.
 */
#ifndef VMIG_UTIL_H
#define VMIG_UTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct json_object;

#define VMIG_PRINTF(fmt_idx, arg_idx) \
	__attribute__((format(printf, fmt_idx, arg_idx)))

/* ------------------------------------------------------------------------
 * Sizes and durations (size.c)
 */

/*
 * Parse a byte count: digits, an optional fraction and an optional binary
 * unit K, M, G, T, P or E (case-insensitive), optionally followed by "B" or
 * "iB" and optionally separated from the number by spaces.  All units are
 * powers of 1024 ("2MB" is 2 MiB).  "512", "4K", "1.5G", "4KiB" and the
 * output of vmig_size_format() are accepted.  A fraction needs a unit and
 * is truncated to whole bytes ("0.1K" is 102).
 *
 * Returns 0 and stores the value in *out, -EINVAL for anything else (empty,
 * signs, trailing junk, leading blanks), -ERANGE if the value does not fit
 * in 64 bits.  *out is untouched on error.
 */
int vmig_size_parse(const char *s, uint64_t *out);

/*
 * Format a byte count for humans: "512 B", "4.0 KiB", "1.5 GiB".
 * Returns 0, or -ENOSPC if @buf is too small (then it holds a truncated,
 * NUL-terminated string when @len > 0).
 */
int vmig_size_format(uint64_t bytes, char *buf, size_t len);

/*
 * Format a duration in milliseconds, rounded to the shown precision:
 * "850 ms", "12.3 s", "4m05s", "1h02m".  Returns 0 or -ENOSPC.
 */
int vmig_duration_format(uint64_t ms, char *buf, size_t len);

/* ------------------------------------------------------------------------
 * Bitmaps (bitmap.c)
 *
 * Bit i is bit (i % BITS_PER_LONG) of words[i / BITS_PER_LONG], the layout
 * of KVM's dirty bitmaps.  Bits past nbits in the last word are always
 * zero.  Indexes must be below nbits (checked with assert()).  No locking:
 * the owner serialises access.
 */
struct vmig_bitmap {
	unsigned long *words;
	uint64_t nbits;
};

#define VMIG_BITS_PER_LONG (8 * sizeof(unsigned long))

/* Number of words that hold @nbits bits. */
static inline uint64_t vmig_bitmap_words(uint64_t nbits)
{
	return nbits / VMIG_BITS_PER_LONG + (nbits % VMIG_BITS_PER_LONG != 0);
}

/* Allocate a zeroed bitmap of @nbits bits (0 allowed).  0 or -ENOMEM. */
int vmig_bitmap_init(struct vmig_bitmap *b, uint64_t nbits);
/* Free the words.  NULL-safe and idempotent. */
void vmig_bitmap_fini(struct vmig_bitmap *b);

void vmig_bitmap_set(struct vmig_bitmap *b, uint64_t i);
void vmig_bitmap_clear(struct vmig_bitmap *b, uint64_t i);
bool vmig_bitmap_test(const struct vmig_bitmap *b, uint64_t i);
/* Set bits [start, start + len). */
void vmig_bitmap_set_range(struct vmig_bitmap *b, uint64_t start,
			   uint64_t len);
void vmig_bitmap_clear_all(struct vmig_bitmap *b);

/*
 * OR the first @nbits bits of @src into @b, src bit 0 landing on bit
 * @first_bit; @first_bit need not be word-aligned.  Bits of @src past
 * @nbits are ignored.  This is how a memory slot's dirty log is merged into
 * a bitmap that spans all of guest RAM.
 */
void vmig_bitmap_or_words(struct vmig_bitmap *b, uint64_t first_bit,
			  const unsigned long *src, uint64_t nbits);

/* Number of set bits. */
uint64_t vmig_bitmap_count(const struct vmig_bitmap *b);

/* First set bit at or after @from, or b->nbits if there is none. */
uint64_t vmig_bitmap_next_set(const struct vmig_bitmap *b, uint64_t from);

/* ------------------------------------------------------------------------
 * Control protocol (ctl.c)
 *
 * One JSON object per line over a unix stream socket.  Requests carry
 * "cmd" ({"cmd":"status"}); replies carry "ok" and, when it is false,
 * "error" (a message for humans) and "errno" (a positive errno value):
 * {"ok":false,"error":"no such VM","errno":2}.
 */

/* Longest line accepted, excluding the '\n'. */
#define VMIG_CTL_MAX_LINE (1u << 20)

/*
 * Write @msg as one line (plain JSON + '\n') to the stream socket @fd,
 * retrying on EINTR and short writes; never raises SIGPIPE.  Does not take
 * ownership of @msg.  Returns 0, -EMSGSIZE if the line would exceed
 * VMIG_CTL_MAX_LINE, -ENOMEM, or the -errno of the failed send (-EPIPE
 * when the peer has gone; -EAGAIN on a non-blocking socket that is full,
 * after which the stream is out of step and must be closed).
 * Concurrent senders on one fd must be serialised by the caller.
 */
int vmig_ctl_send(int fd, struct json_object *msg);

/* Buffered line reader for one connection; one thread at a time. */
struct vmig_ctl_reader {
	int fd;
	char *buf;
	size_t len, cap;
};

/* Start reading from @fd.  Does not take ownership of @fd. */
void vmig_ctl_reader_init(struct vmig_ctl_reader *r, int fd);
/* Free the buffer (not the fd).  NULL-safe and idempotent. */
void vmig_ctl_reader_fini(struct vmig_ctl_reader *r);

/*
 * Read one message.  Bytes past the line stay buffered for the next call;
 * empty lines are skipped.  On a non-blocking fd, returns -EAGAIN when no
 * complete line is available yet (partial input stays buffered: call again
 * when the fd is readable).
 *
 * Returns 0 and a new reference in *out; -EPIPE on end of stream
 * (including in the middle of a line); -EPROTO if a line is not a JSON
 * object (the line is consumed, the next call reads the next one);
 * -EMSGSIZE if a line exceeds VMIG_CTL_MAX_LINE (the stream is out of step:
 * close it); -ENOMEM; or the -errno of read().
 */
int vmig_ctl_recv(struct vmig_ctl_reader *r, struct json_object **out);

/*
 * Parse one line (without its '\n'; a trailing '\r' and blanks around the
 * object are tolerated).  Returns 0 and a new reference in *out, -EPROTO
 * if it is not exactly one well-formed JSON object in valid UTF-8,
 * -EMSGSIZE if @len exceeds VMIG_CTL_MAX_LINE, -ENOMEM.
 */
int vmig_ctl_parse_line(const char *line, size_t len,
			struct json_object **out);

/*
 * Connect to the unix socket at @path (blocking, close-on-exec).
 * Returns 0 and the fd in *fd_out; -ENOENT if nothing is there,
 * -ECONNREFUSED if nobody listens (a stale socket), -ENAMETOOLONG, or
 * another -errno from socket()/connect().
 */
int vmig_ctl_connect(const char *path, int *fd_out);

/*
 * Create a listening unix socket at @path, mode 0600, close-on-exec.
 * A stale socket file (connecting to it is refused) is replaced; if a live
 * server answers there, returns -EADDRINUSE; if @path exists and is not a
 * socket, -EEXIST.  Other errors: -ENAMETOOLONG or the -errno of the failed
 * call.
 *
 * Sets the process umask around bind(): call it before starting threads
 * that create files.  Two processes that may race for the same @path must
 * be serialised by the caller (e.g. a lock file), since replacing a stale
 * socket is not atomic.
 */
int vmig_ctl_listen(const char *path, int *fd_out);

/* {"cmd":cmd}; NULL on allocation failure. */
struct json_object *vmig_ctl_request(const char *cmd);
/* {"ok":true}; NULL on allocation failure. */
struct json_object *vmig_ctl_reply_ok(void);
/*
 * {"ok":false,"error":message,"errno":N}.  @err may be -errno or errno;
 * N is positive.  A NULL @fmt uses strerror(N).  NULL on allocation
 * failure.
 */
struct json_object *vmig_ctl_reply_error(int err, const char *fmt, ...)
	VMIG_PRINTF(2, 3);

/*
 * Decode a reply: 0 if "ok" is true; -errno from "errno" if it is false,
 * with *msg (if @msg is not NULL) pointing at "error" (owned by @reply,
 * NULL if absent); -EPROTO if @reply is not a well-formed reply.
 */
int vmig_ctl_reply_status(struct json_object *reply, const char **msg);

/*
 * Connect to @path, send @req, read one reply and close.  Always consumes
 * @req (even on error).  Returns 0 with a new reference in *reply (which
 * may itself say "ok":false: see vmig_ctl_reply_status()), or an error of
 * vmig_ctl_connect(), vmig_ctl_send() or vmig_ctl_recv(); -EINVAL if @req
 * is NULL.
 */
int vmig_ctl_call(const char *path, struct json_object *req,
		  struct json_object **reply);

/* Member @key of object @o (NULL-safe) as a string (@dflt if absent) / a u64 (0). */
const char *vmig_json_str(struct json_object *o, const char *key, const char *dflt);
uint64_t vmig_json_u64(struct json_object *o, const char *key);

/* ------------------------------------------------------------------------
 * Run directory and VM names (rundir.c)
 */

/*
 * The directory holding the VMs' sockets and logs: $VMIG_RUN_DIR if set
 * and not empty (it must be absolute), else /run/vmig when the effective
 * uid is 0, else $XDG_RUNTIME_DIR/vmig (an absolute $XDG_RUNTIME_DIR).
 * Returns 0; -EINVAL for a relative $VMIG_RUN_DIR; -ENOENT if nothing
 * usable is set; -ENAMETOOLONG if @buf is too small.  Reads the
 * environment: not safe against a concurrent setenv().
 */
int vmig_rundir_get(char *buf, size_t len);

/*
 * mkdir -p @dir; components it creates get mode 0700 (less the umask).
 * Returns 0 (also if it already exists), -ENOTDIR if @dir or a parent
 * exists but is not a directory, -ENAMETOOLONG, or the -errno of mkdir().
 */
int vmig_rundir_ensure(const char *dir);

/* 0 if @name is 1-64 chars of [A-Za-z0-9._-] not starting with '.' or
 * '-', else -EINVAL. */
int vmig_vm_name_valid(const char *name);

/*
 * Write "@dir/@name.@suffix" to @buf ("@dir/@name" when @suffix is NULL or
 * empty).  Returns 0 or -ENAMETOOLONG.  Does not validate @name.
 */
int vmig_rundir_path(const char *dir, const char *name, const char *suffix,
		     char *buf, size_t len);

/*
 * Wait until the VMM of @name in @dir has exited: its pid file's lock is
 * free (or there is no pid file).  0, -ETIMEDOUT after @timeout_ms, or
 * -errno.
 */
int vmig_rundir_wait_gone(const char *dir, const char *name, int timeout_ms);

/* ------------------------------------------------------------------------
 * Error context (log.c)
 *
 * The layer that detects a failure records it once; later failures (often
 * consequences of the first) do not overwrite it.
 */
struct vmig_err {
	int code;        /* -errno; 0 = no error */
	char msg[512];
};

/*
 * Record @code (-errno; a positive value is negated, 0 becomes -EIO) and
 * a message, if @e is not NULL and holds no error yet.  Preserves errno.
 * No locking: share one context between threads only under a lock.
 */
void vmig_err_set(struct vmig_err *e, int code, const char *fmt, ...)
	VMIG_PRINTF(3, 4);
void vmig_err_setv(struct vmig_err *e, int code, const char *fmt,
		   va_list ap) VMIG_PRINTF(3, 0);
/* Reset to "no error".  NULL-safe. */
void vmig_err_clear(struct vmig_err *e);

/* ------------------------------------------------------------------------
 * Logging (log.c)
 *
 * "vmig[PID]: LEVEL: message\n" on stderr, one write() per line so lines
 * from threads and processes sharing stderr do not interleave.  Messages
 * longer than about 4 KiB are cut.  The threshold comes from $VMIG_LOG
 * (error, warn, info, debug or 0-3; default warn), read at the first use,
 * unless vmig_log_set_level() was called.  All functions are thread-safe
 * and preserve errno.
 */
enum {
	VMIG_LOG_ERROR = 0,
	VMIG_LOG_WARN = 1,
	VMIG_LOG_INFO = 2,
	VMIG_LOG_DEBUG = 3,
};

void vmig_log(int level, const char *fmt, ...) VMIG_PRINTF(2, 3);
void vmig_vlog(int level, const char *fmt, va_list ap) VMIG_PRINTF(2, 0);
/* Set the threshold (clamped to ERROR..DEBUG); overrides $VMIG_LOG. */
void vmig_log_set_level(int level);
int vmig_log_get_level(void);
/* True if a message at @level would be written. */
bool vmig_log_enabled(int level);
/* "error", "warn", "info", "debug" (any case) or "0".."3" -> level;
 * -EINVAL otherwise. */
int vmig_log_level_parse(const char *s);

#endif /* VMIG_UTIL_H */
