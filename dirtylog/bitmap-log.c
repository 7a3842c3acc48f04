/*
 * The two bitmap mechanisms: KVM_GET_DIRTY_LOG alone ("bitmap"), and with
 * manual re-protection through KVM_CLEAR_DIRTY_LOG ("bitmap-clear").
 *
 * bitmap.  KVM_GET_DIRTY_LOG atomically takes each dirty bit, write-
 * protects the page and flushes TLBs before it returns.  A guest write
 * racing with it either lands before the protection (the caller reads
 * the page after sync returns, so it sees the write) or faults and sets
 * the bit again for the next sync.  With Intel PML, KVM only kicks the
 * vCPUs before copying: GPAs still in a PML buffer reach the bitmap on
 * the vCPU's next exit, hence in a later sync, and at the latest in the
 * sync after a pause.
 *
 * bitmap-clear.  With KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, GET_DIRTY_LOG
 * only copies the bitmap: the bits stay set in KVM and the pages stay
 * writable until KVM_CLEAR_DIRTY_LOG clears the bits and re-protects the
 * pages.  The sender clears a range just before it reads the pages in it,
 * so a write that lands between the clear and the read is in what it
 * sends, and a write after the clear sets the bit again.  Only bits that a
 * sync reported (slot->bmap, KVM's bitmap as last fetched, minus what was
 * cleared since) are passed to KVM: a page dirtied after the last sync is
 * not in the caller's bitmap, so clearing it would lose it.
 * With KVM_DIRTY_LOG_INITIALLY_SET, turning logging on write-protects
 * nothing and sets every bit: the first sync reports all pages, and the
 * sender's clears protect them piecemeal as the first pass goes.
 *
 * KVM_CLEAR_DIRTY_LOG wants first_page % 64 == 0 and num_pages % 64 == 0
 * unless the range runs to the end of the slot.  A range that does not
 * fit is widened, and the bits of the widening are zero in the request,
 * so pages outside the caller's range keep their bits.
 */
#include "config.h"

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "dirtylog-internal.h"

#define BPL VMIG_BITS_PER_LONG

/* Pages per KVM_CLEAR_DIRTY_LOG: num_pages is 32 bits; a multiple of 64. */
#define CLEAR_CHUNK (1ull << 30)

static uint64_t popcount_words(const unsigned long *w, uint64_t n)
{
	uint64_t c = 0, i;

	for (i = 0; i < n; i++)
		c += (uint64_t)__builtin_popcountl(w[i]);
	return c;
}

static int alloc_bmaps(struct vmig_dirtylog *dl, bool scratch, struct vmig_err *err)
{
	unsigned int i;

	for (i = 0; i < dl->nr_slots; i++) {
		struct vmig__dl_slot *s = &dl->slots[i];
		uint64_t words = vmig_bitmap_words(s->npages);

		s->bmap = calloc(words ? words : 1, sizeof(unsigned long));
		if (s->bmap && scratch)
			s->scratch = calloc(words ? words : 1, sizeof(unsigned long));
		if (!s->bmap || (scratch && !s->scratch)) {
			vmig_err_set(err, -ENOMEM, "out of memory for the dirty bitmap of "
				     "slot %u (%" PRIu64 " pages)", s->id, s->npages);
			return -ENOMEM;
		}
	}
	return 0;
}

static void free_bmaps(struct vmig_dirtylog *dl)
{
	unsigned int i;

	for (i = 0; i < dl->nr_slots; i++) {
		free(dl->slots[i].bmap);
		free(dl->slots[i].scratch);
		dl->slots[i].bmap = dl->slots[i].scratch = NULL;
	}
}

static void zero_bmaps(struct vmig_dirtylog *dl)
{
	unsigned int i;

	for (i = 0; i < dl->nr_slots; i++)
		memset(dl->slots[i].bmap, 0,
		       vmig_bitmap_words(dl->slots[i].npages) * sizeof(unsigned long));
}

static int manual_protect(struct vmig_dirtylog *dl, uint64_t flags, struct vmig_err *err)
{
	struct kvm_enable_cap cap;
	int ret;

	memset(&cap, 0, sizeof(cap));
	cap.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
	cap.args[0] = flags;
	if (ioctl(dl->vm_fd, KVM_ENABLE_CAP, &cap) < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot %s KVM's manual dirty log protection: %s",
			     flags ? "enable" : "disable", strerror(-ret));
		return ret;
	}
	return 0;
}

/* Fetch one slot's log into s->bmap and OR it into @dirty. */
static int fetch_slot(struct vmig_dirtylog *dl, struct vmig__dl_slot *s,
		      struct vmig_bitmap *dirty, struct vmig_err *err)
{
	struct kvm_dirty_log log;
	int ret;

	memset(&log, 0, sizeof(log));
	log.slot = s->id;
	log.dirty_bitmap = s->bmap;
	if (ioctl(dl->vm_fd, KVM_GET_DIRTY_LOG, &log) < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot read KVM's dirty log of memory slot %u: %s",
			     s->id, strerror(-ret));
		return ret;
	}
	dl->stats.pages_reported += popcount_words(s->bmap, vmig_bitmap_words(s->npages));
	vmig_bitmap_or_words(dirty, s->first_page, s->bmap, s->npages);
	return 0;
}

static int bitmap_sync(struct vmig_dirtylog *dl, struct vmig_bitmap *dirty,
		       struct vmig_err *err)
{
	unsigned int i;
	int ret;

	for (i = 0; i < dl->nr_slots; i++) {
		ret = fetch_slot(dl, &dl->slots[i], dirty, err);
		if (ret)
			return ret;
	}
	return 0;
}

/* ---- bitmap ---- */

static int bitmap_init(struct vmig_dirtylog *dl, struct vmig_err *err)
{
	return alloc_bmaps(dl, false, err);
}

static int bitmap_start(struct vmig_dirtylog *dl, struct vmig_err *err)
{
	/*
	 * Manual protection is a VM-wide switch: make sure an earlier
	 * bitmap-clear log (or anyone else) did not leave it on, or
	 * GET_DIRTY_LOG would stop re-protecting pages and every page would
	 * be reported forever after its first write.
	 */
	if (ioctl(dl->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) > 0)
		return manual_protect(dl, 0, err);
	return 0;
}

static void bitmap_stop(struct vmig_dirtylog *dl)
{
	(void)dl;
}

const struct vmig__dl_ops vmig__dl_bitmap_ops = {
	.mode = VMIG_DIRTYLOG_BITMAP,
	.init = bitmap_init,
	.start = bitmap_start,
	.sync = bitmap_sync,
	.clear = NULL,
	.stop = bitmap_stop,
	.fini = free_bmaps,
};

/* ---- bitmap-clear ---- */

static int clear_init(struct vmig_dirtylog *dl, struct vmig_err *err)
{
	return alloc_bmaps(dl, true, err);
}

static int clear_start(struct vmig_dirtylog *dl, struct vmig_err *err)
{
	/* Before logging goes on: KVM decides then whether to write-protect. */
	zero_bmaps(dl);
	return manual_protect(dl, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE |
			      (dl->initially_set ? KVM_DIRTY_LOG_INITIALLY_SET : 0), err);
}

static void clear_stop(struct vmig_dirtylog *dl)
{
	/* KVM dropped its bitmaps with logging: what we cached is void. */
	zero_bmaps(dl);
	manual_protect(dl, 0, NULL);
}

static uint64_t min_u64(uint64_t a, uint64_t b)
{
	return a < b ? a : b;
}

static uint64_t max_u64(uint64_t a, uint64_t b)
{
	return a > b ? a : b;
}

/* Bits of word @k (bits k*64 .. k*64+63) that lie in [lo, hi). */
static unsigned long word_mask(uint64_t k, uint64_t lo, uint64_t hi)
{
	uint64_t wlo = k * BPL, whi = wlo + BPL;
	unsigned long m = ~0ul;

	if (hi <= wlo || lo >= whi)
		return 0;
	if (lo > wlo)
		m &= ~0ul << (lo - wlo);
	if (hi < whi)
		m &= ~0ul >> (whi - hi);
	return m;
}

int vmig__dl_clear_slot(struct vmig__dl_slot *s, uint64_t first, uint64_t n,
			vmig__dl_clear_fn *fn, void *arg, uint64_t *cleared,
			uint64_t *calls)
{
	uint64_t end = first + n, as, ae, cs, ce;
	int ret;

	assert(first <= s->npages && n <= s->npages - first);
	if (!n)
		return 0;
	as = first & ~(uint64_t)(BPL - 1);
	ae = min_u64((end + BPL - 1) & ~(uint64_t)(BPL - 1), s->npages);

	for (cs = as; cs < ae; cs = ce) {
		uint64_t lo, hi, w0, nw, k;
		const unsigned long *bits;
		unsigned long any = 0;

		ce = ae - cs > CLEAR_CHUNK ? cs + CLEAR_CHUNK : ae;
		lo = max_u64(cs, first);
		hi = min_u64(ce, end);
		w0 = cs / BPL;
		nw = vmig_bitmap_words(ce - cs);
		if (lo == cs && hi == ce && (ce - cs) % BPL == 0) {
			/* Aligned both ends: hand KVM the record as it is. */
			bits = s->bmap + w0;
			for (k = 0; k < nw; k++)
				any |= bits[k];
		} else {
			for (k = 0; k < nw; k++) {
				s->scratch[k] = s->bmap[w0 + k] & word_mask(k, lo - cs, hi - cs);
				any |= s->scratch[k];
			}
			bits = s->scratch;
		}
		if (!any)
			continue;         /* nothing reported here: nothing to re-arm */
		ret = fn(arg, s->id, cs, (uint32_t)(ce - cs), bits);
		if (ret)
			return ret;
		/*
		 * KVM has re-armed them; forget them, so that a second clear of
		 * the same range (before the next sync) does not re-protect a
		 * page dirtied since, which nobody has reported yet.
		 */
		for (k = 0; k < nw; k++) {
			unsigned long b = bits[k];

			*cleared += (uint64_t)__builtin_popcountl(b);
			s->bmap[w0 + k] &= ~b;
		}
		(*calls)++;
	}
	return 0;
}

struct kvm_clear_ctx {
	struct vmig_dirtylog *dl;
	struct vmig_err *err;
};

static int kvm_clear(void *arg, uint32_t slot, uint64_t first_page, uint32_t num_pages,
		     const unsigned long *bits)
{
	struct kvm_clear_ctx *c = arg;
	struct kvm_clear_dirty_log cl;
	int ret;

	memset(&cl, 0, sizeof(cl));
	cl.slot = slot;
	cl.first_page = first_page;
	cl.num_pages = num_pages;
	cl.dirty_bitmap = (void *)bits;
	if (ioctl(c->dl->vm_fd, KVM_CLEAR_DIRTY_LOG, &cl) < 0) {
		ret = -errno;
		vmig_err_set(c->err, ret, "cannot re-protect pages %" PRIu64 "+%u of memory "
			     "slot %u (KVM_CLEAR_DIRTY_LOG): %s", first_page, num_pages, slot,
			     strerror(-ret));
		return ret;
	}
	return 0;
}

static int clear_clear(struct vmig_dirtylog *dl, uint64_t first, uint64_t n,
		       struct vmig_err *err)
{
	struct kvm_clear_ctx ctx = { dl, err };
	uint64_t end = first + n;
	unsigned int i;
	int ret;

	for (i = 0; i < dl->nr_slots; i++) {
		struct vmig__dl_slot *s = &dl->slots[i];
		uint64_t lo = max_u64(first, s->first_page);
		uint64_t hi = min_u64(end, s->first_page + s->npages);

		if (lo >= hi)
			continue;
		ret = vmig__dl_clear_slot(s, lo - s->first_page, hi - lo, kvm_clear, &ctx,
					  &dl->stats.pages_cleared, &dl->stats.clears);
		if (ret)
			return ret;
	}
	return 0;
}

const struct vmig__dl_ops vmig__dl_bitmap_clear_ops = {
	.mode = VMIG_DIRTYLOG_BITMAP_CLEAR,
	.init = clear_init,
	.start = clear_start,
	.sync = bitmap_sync,
	.clear = clear_clear,
	.stop = clear_stop,
	.fini = free_bmaps,
};
