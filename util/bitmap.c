/*
 * Page bitmaps in the word layout KVM uses for dirty logs, so a slot's log
 * can be merged with vmig_bitmap_or_words() without conversion.
 *
 * Invariant: bits past nbits in the last word are zero.  Every writer keeps
 * it (or_words masks the source's tail), so count() and next_set() can work
 * a word at a time without masking.  No locking: the owner serialises.
 */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "vmig/util.h"

#define BPL VMIG_BITS_PER_LONG

static inline unsigned long bit_mask(uint64_t i)
{
	return 1ul << (i % BPL);
}

/* Mask of the valid bits in the last word of an @nbits-bit map. */
static inline unsigned long tail_mask(uint64_t nbits)
{
	return nbits % BPL ? ~0ul >> (BPL - nbits % BPL) : ~0ul;
}

int vmig_bitmap_init(struct vmig_bitmap *b, uint64_t nbits)
{
	uint64_t nwords = vmig_bitmap_words(nbits);

	b->words = NULL;
	b->nbits = 0;
	if (nwords > SIZE_MAX / sizeof(unsigned long))
		return -ENOMEM;
	/* At least one word, so that words is never NULL after init. */
	b->words = calloc(nwords ? (size_t)nwords : 1, sizeof(unsigned long));
	if (!b->words)
		return -ENOMEM;
	b->nbits = nbits;
	return 0;
}

void vmig_bitmap_fini(struct vmig_bitmap *b)
{
	if (!b)
		return;
	free(b->words);
	b->words = NULL;
	b->nbits = 0;
}

void vmig_bitmap_set(struct vmig_bitmap *b, uint64_t i)
{
	assert(i < b->nbits);
	b->words[i / BPL] |= bit_mask(i);
}

void vmig_bitmap_clear(struct vmig_bitmap *b, uint64_t i)
{
	assert(i < b->nbits);
	b->words[i / BPL] &= ~bit_mask(i);
}

bool vmig_bitmap_test(const struct vmig_bitmap *b, uint64_t i)
{
	assert(i < b->nbits);
	return b->words[i / BPL] & bit_mask(i);
}

void vmig_bitmap_set_range(struct vmig_bitmap *b, uint64_t start,
			   uint64_t len)
{
	uint64_t end = start + len, w, last;
	unsigned long first_mask, last_mask;

	assert(start <= b->nbits && len <= b->nbits - start);
	if (!len)
		return;

	w = start / BPL;
	last = (end - 1) / BPL;
	first_mask = ~0ul << (start % BPL);
	last_mask = tail_mask(end);
	if (w == last) {
		b->words[w] |= first_mask & last_mask;
		return;
	}
	b->words[w++] |= first_mask;
	for (; w < last; w++)
		b->words[w] = ~0ul;
	b->words[last] |= last_mask;
}

void vmig_bitmap_clear_all(struct vmig_bitmap *b)
{
	if (b->nbits)
		memset(b->words, 0,
		       vmig_bitmap_words(b->nbits) * sizeof(unsigned long));
}

void vmig_bitmap_or_words(struct vmig_bitmap *b, uint64_t first_bit,
			  const unsigned long *src, uint64_t nbits)
{
	uint64_t nsrc = vmig_bitmap_words(nbits), k;
	uint64_t dw = first_bit / BPL;
	unsigned shift = first_bit % BPL;

	assert(first_bit <= b->nbits && nbits <= b->nbits - first_bit);

	for (k = 0; k < nsrc; k++) {
		unsigned long v = src[k];

		if (k == nsrc - 1)
			v &= tail_mask(nbits);
		if (!v)
			continue;
		if (!shift) {
			b->words[dw + k] |= v;
			continue;
		}
		/*
		 * Split the word over two destination words.  The high part
		 * is non-zero only if it holds bits below first_bit + nbits,
		 * so the second word is then inside the map.
		 */
		b->words[dw + k] |= v << shift;
		v >>= BPL - shift;
		if (v)
			b->words[dw + k + 1] |= v;
	}
}

uint64_t vmig_bitmap_count(const struct vmig_bitmap *b)
{
	uint64_t nwords = vmig_bitmap_words(b->nbits), n = 0, w;

	for (w = 0; w < nwords; w++)
		n += (uint64_t)__builtin_popcountl(b->words[w]);
	return n;
}

uint64_t vmig_bitmap_next_set(const struct vmig_bitmap *b, uint64_t from)
{
	uint64_t nwords = vmig_bitmap_words(b->nbits), w;
	unsigned long v;

	if (from >= b->nbits)
		return b->nbits;
	w = from / BPL;
	v = b->words[w] & (~0ul << (from % BPL));
	while (!v) {
		if (++w >= nwords)
			return b->nbits;
		v = b->words[w];
	}
	return w * BPL + (uint64_t)__builtin_ctzl(v);
}
