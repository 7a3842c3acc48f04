/*
 * Byte counts and durations, parsed from and formatted for humans.
 *
 * Parsing uses integer arithmetic only, so "1.5G" is exactly 1.5 GiB and
 * every overflow is caught; formatting uses double, which is precise
 * enough for one decimal.  Pure functions: thread-safe.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "vmig/util.h"

#define MAX_FRAC_DIGITS 18          /* 10^18 < 2^63: no overflow below */

static bool is_digit(char c)
{
	return c >= '0' && c <= '9';
}

static char lower(char c)
{
	return c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c;
}

/* Power of 1024 named by unit letter @c (any case), or -1. */
static int unit_shift(char c)
{
	static const char units[] = "kmgtpe";
	const char *p;

	if (c == '\0')
		return -1;
	p = strchr(units, lower(c));
	return p ? 10 * (int)(p - units + 1) : -1;
}

/*
 * floor(frac / den * 2^shift) for frac < den < 2^62, by binary long
 * division, so that the product never has to fit in 64 bits.
 */
static uint64_t frac_scale(uint64_t frac, uint64_t den, int shift)
{
	uint64_t q = 0, r = frac;
	int i;

	for (i = 0; i < shift; i++) {
		r <<= 1;
		q <<= 1;
		if (r >= den) {
			r -= den;
			q |= 1;
		}
	}
	return q;
}

int vmig_size_parse(const char *s, uint64_t *out)
{
	uint64_t whole = 0, frac = 0, den = 1, val;
	bool has_frac = false;
	int shift = 0;

	if (!s || !is_digit(*s))
		return -EINVAL;

	for (; is_digit(*s); s++) {
		unsigned d = (unsigned)(*s - '0');

		if (whole > (UINT64_MAX - d) / 10)
			return -ERANGE;
		whole = whole * 10 + d;
	}

	if (*s == '.') {
		int ndigits = 0;

		s++;
		if (!is_digit(*s))
			return -EINVAL;
		has_frac = true;
		/* Digits past MAX_FRAC_DIGITS are below a byte even for E. */
		for (; is_digit(*s); s++, ndigits++) {
			if (ndigits < MAX_FRAC_DIGITS) {
				frac = frac * 10 + (uint64_t)(*s - '0');
				den *= 10;
			}
		}
	}

	while (*s == ' ')
		s++;
	if (*s) {
		shift = unit_shift(*s);
		if (shift > 0) {
			s++;
			if (lower(*s) == 'i' && lower(s[1]) == 'b')
				s += 2;
			else if (lower(*s) == 'b')
				s++;
		} else if (lower(*s) == 'b') {
			shift = 0;
			s++;
		} else {
			return -EINVAL;
		}
		if (*s)
			return -EINVAL;
	} else if (s[-1] == ' ') {
		return -EINVAL;
	}

	/* A fraction of a byte is almost certainly a mistake. */
	if (has_frac && shift == 0)
		return -EINVAL;

	if (shift && whole > UINT64_MAX >> shift)
		return -ERANGE;
	val = whole << shift;
	if (has_frac) {
		uint64_t part = frac_scale(frac, den, shift);

		if (val > UINT64_MAX - part)
			return -ERANGE;
		val += part;
	}
	*out = val;
	return 0;
}

/* snprintf() into @buf, mapping truncation to -ENOSPC. */
static int format_result(int n, size_t len)
{
	if (n < 0)
		return -EINVAL;
	return (size_t)n < len ? 0 : -ENOSPC;
}

int vmig_size_format(uint64_t bytes, char *buf, size_t len)
{
	static const char *const units[] = {
		"KiB", "MiB", "GiB", "TiB", "PiB", "EiB",
	};
	const int nunits = (int)(sizeof(units) / sizeof(units[0]));
	double v;
	int i;

	if (bytes < 1024)
		return format_result(snprintf(buf, len, "%u B",
					      (unsigned)bytes), len);

	/* Largest unit that keeps the value >= 1, moving up once more if
	 * rounding to one decimal would print 1024.0. */
	for (i = 0; i + 1 < nunits && bytes >> (10 * (i + 2)); i++)
		;
	v = (double)bytes / (double)(1ull << (10 * (i + 1)));
	if (v >= 1023.95 && i + 1 < nunits) {
		i++;
		v /= 1024.0;
	}
	return format_result(snprintf(buf, len, "%.1f %s", v, units[i]),
			     len);
}

int vmig_duration_format(uint64_t ms, char *buf, size_t len)
{
	uint64_t tenths, secs, mins;
	int n;

	if (ms < 1000)
		return format_result(snprintf(buf, len, "%u ms",
					      (unsigned)ms), len);

	tenths = ms / 100 + (ms % 100 >= 50);
	if (tenths < 600) {
		n = snprintf(buf, len, "%u.%u s", (unsigned)(tenths / 10),
			     (unsigned)(tenths % 10));
		return format_result(n, len);
	}

	secs = ms / 1000 + (ms % 1000 >= 500);
	if (secs < 3600) {
		n = snprintf(buf, len, "%um%02us", (unsigned)(secs / 60),
			     (unsigned)(secs % 60));
		return format_result(n, len);
	}

	mins = ms / 60000 + (ms % 60000 >= 30000);
	n = snprintf(buf, len, "%lluh%02um",
		     (unsigned long long)(mins / 60), (unsigned)(mins % 60));
	return format_result(n, len);
}
