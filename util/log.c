/*
 * Logging to stderr and first-error-wins error contexts.
 *
 * A log line is formatted into a stack buffer and written with a single
 * write(), so lines from several threads (or processes sharing stderr)
 * never interleave, and no lock is needed.  The only shared state is the
 * threshold, an atomic int: -1 until the first use reads $VMIG_LOG.  Two
 * threads racing on that first read compute the same value, and an explicit
 * vmig_log_set_level() is never overwritten by it (compare-and-swap).
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "vmig/util.h"

#define LOG_LINE_MAX 4096

static atomic_int log_level = -1;

static const char *const level_names[] = {
	[VMIG_LOG_ERROR] = "error",
	[VMIG_LOG_WARN] = "warn",
	[VMIG_LOG_INFO] = "info",
	[VMIG_LOG_DEBUG] = "debug",
};

static int clamp_level(int level)
{
	if (level < VMIG_LOG_ERROR)
		return VMIG_LOG_ERROR;
	if (level > VMIG_LOG_DEBUG)
		return VMIG_LOG_DEBUG;
	return level;
}

int vmig_log_level_parse(const char *s)
{
	int i;

	if (!s)
		return -EINVAL;
	if (s[0] >= '0' && s[0] <= '3' && s[1] == '\0')
		return s[0] - '0';
	if (!strcasecmp(s, "warning"))
		return VMIG_LOG_WARN;
	for (i = VMIG_LOG_ERROR; i <= VMIG_LOG_DEBUG; i++)
		if (!strcasecmp(s, level_names[i]))
			return i;
	return -EINVAL;
}

int vmig_log_get_level(void)
{
	int level = atomic_load_explicit(&log_level, memory_order_relaxed);
	int expected = -1;

	if (level >= 0)
		return level;

	level = vmig_log_level_parse(getenv("VMIG_LOG"));
	if (level < 0)
		level = VMIG_LOG_WARN;
	if (!atomic_compare_exchange_strong(&log_level, &expected, level))
		level = expected;     /* set_level() won the race */
	return level;
}

void vmig_log_set_level(int level)
{
	atomic_store(&log_level, clamp_level(level));
}

bool vmig_log_enabled(int level)
{
	return level <= vmig_log_get_level();
}

void vmig_vlog(int level, const char *fmt, va_list ap)
{
	char line[LOG_LINE_MAX];
	size_t len, max = sizeof(line) - 1;   /* room for the '\n' */
	int saved_errno = errno;
	int n;

	if (!vmig_log_enabled(level))
		return;
	level = clamp_level(level);

	n = snprintf(line, max, "vmig[%ld]: %s: ", (long)getpid(),
		     level_names[level]);
	len = n < 0 ? 0 : (size_t)n;
	line[len] = '\0';
	n = vsnprintf(line + len, max - len, fmt, ap);
	if (n >= 0 && (size_t)n >= max - len)
		memcpy(line + max - 4, "...", 3);     /* mark the cut */
	len = strlen(line);
	while (len && line[len - 1] == '\n')   /* callers' own newline */
		len--;
	line[len++] = '\n';

	/* One write; a short write to stderr is not worth a retry loop that
	 * could interleave with other writers. */
	while (write(STDERR_FILENO, line, len) < 0 && errno == EINTR)
		;
	errno = saved_errno;
}

void vmig_log(int level, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vmig_vlog(level, fmt, ap);
	va_end(ap);
}

void vmig_err_setv(struct vmig_err *e, int code, const char *fmt,
		   va_list ap)
{
	int saved_errno = errno;

	if (!e || e->code)
		return;
	if (code > 0)
		code = -code;
	e->code = code ? code : -EIO;
	if (vsnprintf(e->msg, sizeof(e->msg), fmt, ap) < 0)
		e->msg[0] = '\0';
	errno = saved_errno;
}

void vmig_err_set(struct vmig_err *e, int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vmig_err_setv(e, code, fmt, ap);
	va_end(ap);
}

void vmig_err_clear(struct vmig_err *e)
{
	if (!e)
		return;
	e->code = 0;
	e->msg[0] = '\0';
}
