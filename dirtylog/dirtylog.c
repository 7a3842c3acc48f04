/*
 * Dirty page tracking over KVM: the mode-independent half.
 *
 * A struct vmig_dirtylog borrows a VM's memory slots and turns
 * KVM_MEM_LOG_DIRTY_PAGES on and off through vmm/.  The mechanisms live in
 * bitmap-log.c (bitmap, bitmap-clear) and ring.c (dirty ring), behind
 * struct vmig__dl_ops; this file owns what they share: page numbering over
 * all slots, the start/stop state, the lock, the "pending" bitmap that
 * carries marks and ring-full harvests to the next sync, and statistics.
 *
 * Threads (see include/vmig/dirtylog.h): owner thread for create, start,
 * stop, destroy; one thread at a time for sync and clear; any thread for
 * mark; vCPU threads for the ring-full handler.  dl->lock serialises all
 * but mark.  It is never held while waiting for a vCPU thread (pause,
 * join), since a vCPU thread may itself be waiting for it in the ring-full
 * handler.
 *
 * Invariant: a page dirtied while tracking is on is, at every moment, in
 * at least one of: KVM's log (bitmap, or a ring entry not yet harvested),
 * dl->pending, or a bitmap a sync already returned.  Every transfer
 * between them copies before it removes, under dl->lock or with atomics.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "dirtylog-internal.h"

#define BPL VMIG_BITS_PER_LONG

uint64_t vmig__dl_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static const struct {
	const char *name;
	enum vmig_dirtylog_mode mode;
} mode_names[] = {
	{ "auto", VMIG_DIRTYLOG_AUTO },
	{ "bitmap", VMIG_DIRTYLOG_BITMAP },
	{ "bitmap-clear", VMIG_DIRTYLOG_BITMAP_CLEAR },
	{ "ring", VMIG_DIRTYLOG_RING },
};

int vmig_dirtylog_mode_parse(const char *name, enum vmig_dirtylog_mode *out)
{
	size_t i;

	for (i = 0; name && i < sizeof(mode_names) / sizeof(mode_names[0]); i++) {
		if (!strcmp(name, mode_names[i].name)) {
			*out = mode_names[i].mode;
			return 0;
		}
	}
	return -EINVAL;
}

const char *vmig_dirtylog_mode_name(enum vmig_dirtylog_mode mode)
{
	size_t i;

	for (i = 0; i < sizeof(mode_names) / sizeof(mode_names[0]); i++)
		if (mode_names[i].mode == mode)
			return mode_names[i].name;
	return "unknown";
}

/* ---- choosing a mode before the VM exists ---- */

/* Smallest ring KVM takes: one page of entries (more with Intel PML). */
#define RING_MIN_ENTRIES (4096u / sizeof(struct kvm_dirty_gfn))

int vmig_dirtylog_probe(enum vmig_dirtylog_mode want, uint32_t ring_entries,
			struct vmig_dirtylog_plan *plan, struct vmig_err *err)
{
	int fd, ret, max_bytes;
	uint32_t n;

	memset(plan, 0, sizeof(*plan));
	if (want > VMIG_DIRTYLOG_RING) {
		vmig_err_set(err, -EINVAL, "unknown dirty log mode %d", (int)want);
		return -EINVAL;
	}
	fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot open /dev/kvm: %s%s", strerror(-ret),
			     ret == -EACCES ? " (is the user in group kvm?)" : "");
		return ret;
	}
	ret = ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
	plan->clear_available = ret > 0;
	plan->initially_set = ret > 0 && (ret & KVM_DIRTY_LOG_INITIALLY_SET);
	max_bytes = ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
	plan->ring_acq_rel = max_bytes > 0;
	if (max_bytes <= 0)
		max_bytes = ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING);
	close(fd);
	if (max_bytes > 0 && (uint32_t)max_bytes / sizeof(struct kvm_dirty_gfn) >= RING_MIN_ENTRIES) {
		plan->ring_available = true;
		plan->ring_max_entries = (uint32_t)max_bytes / sizeof(struct kvm_dirty_gfn);
	}

	switch (want) {
	case VMIG_DIRTYLOG_AUTO:
		plan->mode = plan->ring_available ? VMIG_DIRTYLOG_RING :
			plan->clear_available ? VMIG_DIRTYLOG_BITMAP_CLEAR : VMIG_DIRTYLOG_BITMAP;
		break;
	case VMIG_DIRTYLOG_RING:
		if (!plan->ring_available) {
			vmig_err_set(err, -ENOTSUP, "dirty log mode 'ring' is not available: this "
				     "host's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING, Linux "
				     "5.11 or later); use 'bitmap-clear' or 'bitmap'");
			return -ENOTSUP;
		}
		plan->mode = want;
		break;
	case VMIG_DIRTYLOG_BITMAP_CLEAR:
		if (!plan->clear_available) {
			vmig_err_set(err, -ENOTSUP, "dirty log mode 'bitmap-clear' is not available: "
				     "this host's KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 "
				     "(Linux 5.3 or later); use 'bitmap'");
			return -ENOTSUP;
		}
		plan->mode = want;
		break;
	default:
		plan->mode = want;
		break;
	}

	if (plan->mode == VMIG_DIRTYLOG_RING) {
		n = ring_entries ? ring_entries : VMIG_DIRTYLOG_RING_DEFAULT;
		if (n > plan->ring_max_entries)
			n = plan->ring_max_entries;
		if (n < RING_MIN_ENTRIES)
			n = RING_MIN_ENTRIES;
		while (n & (n - 1))        /* round down to a power of two */
			n &= n - 1;
		plan->ring_entries = n;
	}
	return 0;
}

/* ---- pending pages: marks and vCPU-thread ring harvests ---- */

void vmig__dl_set_pending_any(struct vmig_dirtylog *dl)
{
	atomic_store_explicit(&dl->pending_any, true, memory_order_release);
}

void vmig__dl_take_pending(struct vmig_dirtylog *dl, unsigned long *words)
{
	uint64_t w;

	/*
	 * Exchange the flag first: a bit set after this point also sets the
	 * flag again, so the next sync looks for it.  A bit set before it is
	 * visible here (acquire pairs with the setter's release).
	 */
	if (!atomic_exchange_explicit(&dl->pending_any, false, memory_order_acquire))
		return;
	for (w = 0; w < dl->pending_words; w++) {
		unsigned long v;

		if (!__atomic_load_n(&dl->pending[w], __ATOMIC_RELAXED))
			continue;
		v = __atomic_exchange_n(&dl->pending[w], 0ul, __ATOMIC_ACQUIRE);
		words[w] |= v;
	}
}

void vmig__dl_drop_pending(struct vmig_dirtylog *dl)
{
	uint64_t w;

	atomic_store(&dl->pending_any, false);
	for (w = 0; w < dl->pending_words; w++)
		__atomic_store_n(&dl->pending[w], 0ul, __ATOMIC_RELAXED);
}

static void pending_set_range(struct vmig_dirtylog *dl, uint64_t first, uint64_t n)
{
	uint64_t end = first + n, w, last;
	unsigned long m;

	if (!n)
		return;
	w = first / BPL;
	last = (end - 1) / BPL;
	for (; w <= last; w++) {
		m = ~0ul;
		if (w == first / BPL)
			m &= ~0ul << (first % BPL);
		if (w == last && end % BPL)
			m &= ~0ul >> (BPL - end % BPL);
		__atomic_fetch_or(&dl->pending[w], m, __ATOMIC_RELAXED);
	}
}

void vmig_dirtylog_mark(struct vmig_dirtylog *dl, uint64_t gpa, uint64_t len)
{
	uint64_t end = len > UINT64_MAX - gpa ? UINT64_MAX : gpa + len;
	bool any = false;
	unsigned int i;

	if (!dl || !len)
		return;
	for (i = 0; i < dl->nr_slots; i++) {
		const struct vmig__dl_slot *s = &dl->slots[i];
		uint64_t s_end = s->gpa + s->npages * VMIG_DIRTYLOG_PAGE_SIZE;
		uint64_t lo = gpa > s->gpa ? gpa : s->gpa;
		uint64_t hi = end < s_end ? end : s_end;
		uint64_t p0, p1;

		if (lo >= hi)
			continue;
		p0 = (lo - s->gpa) / VMIG_DIRTYLOG_PAGE_SIZE;
		p1 = (hi - s->gpa + VMIG_DIRTYLOG_PAGE_SIZE - 1) / VMIG_DIRTYLOG_PAGE_SIZE;
		pending_set_range(dl, s->first_page + p0, p1 - p0);
		any = true;
	}
	atomic_fetch_add_explicit(&dl->marks, 1, memory_order_relaxed);
	/* After the bits: a sync that sees the flag sees the bits. */
	if (any)
		vmig__dl_set_pending_any(dl);
}

/* ---- life cycle ---- */

static const struct vmig__dl_ops *ops_for(enum vmig_dirtylog_mode mode)
{
	switch (mode) {
	case VMIG_DIRTYLOG_BITMAP:       return &vmig__dl_bitmap_ops;
	case VMIG_DIRTYLOG_BITMAP_CLEAR: return &vmig__dl_bitmap_clear_ops;
	case VMIG_DIRTYLOG_RING:         return &vmig__dl_ring_ops;
	default:                         return NULL;
	}
}

int vmig_dirtylog_create(struct vmig_vm *vm, enum vmig_dirtylog_mode mode,
			 struct vmig_dirtylog **out, struct vmig_err *err)
{
	const struct vmig_mem_region *r;
	struct vmig_dirtylog *dl;
	bool has_ring = vmig_vm_dirty_ring(vm, 0, NULL, NULL) != NULL;
	int clear_caps, ret;
	unsigned int n, i;

	*out = NULL;
	clear_caps = ioctl(vmig_vm_fd(vm), KVM_CHECK_EXTENSION,
			   KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
	if (clear_caps < 0)
		clear_caps = 0;
	if (mode == VMIG_DIRTYLOG_AUTO)
		mode = has_ring ? VMIG_DIRTYLOG_RING :
			clear_caps ? VMIG_DIRTYLOG_BITMAP_CLEAR : VMIG_DIRTYLOG_BITMAP;

	switch (mode) {
	case VMIG_DIRTYLOG_RING:
		if (!has_ring) {
			vmig_err_set(err, -ENOTSUP, "dirty log mode 'ring' is not available for "
				     "this VM: it was created without a dirty ring (set "
				     "dirty_ring_entries when creating it; see vmig_dirtylog_probe())");
			return -ENOTSUP;
		}
		break;
	case VMIG_DIRTYLOG_BITMAP:
	case VMIG_DIRTYLOG_BITMAP_CLEAR:
		if (has_ring) {
			vmig_err_set(err, -ENOTSUP, "dirty log mode '%s' is not available for this "
				     "VM: it uses KVM's dirty ring, and KVM keeps no dirty bitmap "
				     "for such a VM (use mode 'ring')", vmig_dirtylog_mode_name(mode));
			return -ENOTSUP;
		}
		if (mode == VMIG_DIRTYLOG_BITMAP_CLEAR && !clear_caps) {
			vmig_err_set(err, -ENOTSUP, "dirty log mode 'bitmap-clear' is not available: "
				     "this host's KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 "
				     "(Linux 5.3 or later); use 'bitmap'");
			return -ENOTSUP;
		}
		break;
	default:
		vmig_err_set(err, -EINVAL, "unknown dirty log mode %d", (int)mode);
		return -EINVAL;
	}

	dl = calloc(1, sizeof(*dl));
	if (!dl) {
		vmig_err_set(err, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	dl->vm = vm;
	dl->vm_fd = vmig_vm_fd(vm);
	dl->initially_set = (clear_caps & KVM_DIRTY_LOG_INITIALLY_SET) != 0;
	pthread_mutex_init(&dl->lock, NULL);

	n = vmig_vm_regions(vm, &r);
	for (i = 0; i < n && i < VMIG_VM_MAX_REGIONS; i++) {
		dl->slots[i].id = r[i].slot;
		dl->slots[i].gpa = r[i].gpa;
		dl->slots[i].npages = r[i].size / VMIG_DIRTYLOG_PAGE_SIZE;
		dl->slots[i].first_page = dl->nr_pages;
		dl->nr_pages += dl->slots[i].npages;
	}
	dl->nr_slots = i;
	dl->pending_words = vmig_bitmap_words(dl->nr_pages);
	dl->pending = calloc(dl->pending_words ? dl->pending_words : 1, sizeof(unsigned long));
	if (!dl->pending) {
		ret = -ENOMEM;
		vmig_err_set(err, ret, "out of memory");
		goto fail;
	}
	dl->ops = ops_for(mode);
	ret = dl->ops->init(dl, err);
	if (ret)
		goto fail;
	*out = dl;
	return 0;
fail:
	vmig_dirtylog_destroy(dl);
	return ret;
}

void vmig_dirtylog_destroy(struct vmig_dirtylog *dl)
{
	if (!dl)
		return;
	vmig_dirtylog_stop(dl, NULL);
	if (dl->ops)
		dl->ops->fini(dl);
	free(dl->pending);
	pthread_mutex_destroy(&dl->lock);
	free(dl);
}

int vmig_dirtylog_start(struct vmig_dirtylog *dl, struct vmig_err *err)
{
	int ret;

	pthread_mutex_lock(&dl->lock);
	if (dl->started) {
		ret = -EALREADY;
		vmig_err_set(err, ret, "dirty logging is already on");
		goto out;
	}
	ret = dl->ops->start(dl, err);
	if (ret)
		goto out;
	/* Marks made while not tracking describe nothing: drop them. */
	vmig__dl_drop_pending(dl);
	ret = vmig_vm_set_dirty_logging(dl->vm, true, err);
	if (ret) {
		dl->ops->stop(dl);
		goto out;
	}
	vmig_err_clear(&dl->async_err);
	dl->started = true;
out:
	pthread_mutex_unlock(&dl->lock);
	return ret;
}

int vmig_dirtylog_stop(struct vmig_dirtylog *dl, struct vmig_err *err)
{
	int ret = 0;

	pthread_mutex_lock(&dl->lock);
	if (!dl->started)
		goto out;
	ret = vmig_vm_set_dirty_logging(dl->vm, false, err);
	if (ret)
		goto out;       /* vmm/ put every slot back: still tracking */
	/* Logging is off: nothing new reaches KVM's log from here on. */
	dl->ops->stop(dl);
	vmig__dl_drop_pending(dl);
	dl->started = false;
out:
	pthread_mutex_unlock(&dl->lock);
	return ret;
}

int vmig_dirtylog_sync(struct vmig_dirtylog *dl, struct vmig_bitmap *dirty,
		       struct vmig_err *err)
{
	uint64_t t0 = vmig__dl_now_ns();
	int ret;

	if (!dirty || dirty->nbits < dl->nr_pages) {
		vmig_err_set(err, -EINVAL, "dirty bitmap of %" PRIu64 " bits is smaller than "
			     "guest RAM (%" PRIu64 " pages)", dirty ? dirty->nbits : 0,
			     dl->nr_pages);
		return -EINVAL;
	}
	pthread_mutex_lock(&dl->lock);
	if (!dl->started) {
		ret = -EINVAL;
		vmig_err_set(err, ret, "cannot sync the dirty log: dirty logging is not on");
	} else if (dl->async_err.code) {
		ret = dl->async_err.code;
		vmig_err_set(err, ret, "%s", dl->async_err.msg);
	} else {
		ret = dl->ops->sync(dl, dirty, err);
	}
	/* After KVM's part: a ring-full harvest before now is in pending. */
	if (!ret)
		vmig__dl_take_pending(dl, dirty->words);
	dl->stats.syncs++;
	dl->stats.sync_ns += vmig__dl_now_ns() - t0;
	pthread_mutex_unlock(&dl->lock);
	return ret;
}

int vmig_dirtylog_clear(struct vmig_dirtylog *dl, uint64_t first_page,
			uint64_t npages, struct vmig_err *err)
{
	uint64_t t0;
	int ret = 0;

	if (first_page > dl->nr_pages || npages > dl->nr_pages - first_page) {
		vmig_err_set(err, -EINVAL, "cannot clear pages %" PRIu64 "+%" PRIu64 " of the "
			     "dirty log: guest RAM has %" PRIu64 " pages", first_page, npages,
			     dl->nr_pages);
		return -EINVAL;
	}
	if (!dl->ops->clear || !npages)
		return 0;
	t0 = vmig__dl_now_ns();
	pthread_mutex_lock(&dl->lock);
	/* Not tracking: KVM keeps no log, and nothing is protected. */
	if (dl->started)
		ret = dl->ops->clear(dl, first_page, npages, err);
	dl->stats.clear_ns += vmig__dl_now_ns() - t0;
	pthread_mutex_unlock(&dl->lock);
	return ret;
}

/* ---- page numbering, statistics ---- */

enum vmig_dirtylog_mode vmig_dirtylog_mode(const struct vmig_dirtylog *dl)
{
	return dl->ops->mode;
}

uint64_t vmig_dirtylog_nr_pages(const struct vmig_dirtylog *dl)
{
	return dl->nr_pages;
}

uint64_t vmig_dirtylog_page_gpa(const struct vmig_dirtylog *dl, uint64_t page)
{
	unsigned int i;

	for (i = 0; i < dl->nr_slots; i++) {
		const struct vmig__dl_slot *s = &dl->slots[i];

		if (page >= s->first_page && page - s->first_page < s->npages)
			return s->gpa + (page - s->first_page) * VMIG_DIRTYLOG_PAGE_SIZE;
	}
	return UINT64_MAX;
}

uint64_t vmig_dirtylog_gpa_page(const struct vmig_dirtylog *dl, uint64_t gpa)
{
	unsigned int i;

	for (i = 0; i < dl->nr_slots; i++) {
		const struct vmig__dl_slot *s = &dl->slots[i];

		if (gpa >= s->gpa && (gpa - s->gpa) / VMIG_DIRTYLOG_PAGE_SIZE < s->npages)
			return s->first_page + (gpa - s->gpa) / VMIG_DIRTYLOG_PAGE_SIZE;
	}
	return UINT64_MAX;
}

void vmig_dirtylog_get_stats(struct vmig_dirtylog *dl, struct vmig_dirtylog_stats *out)
{
	pthread_mutex_lock(&dl->lock);
	*out = dl->stats;
	pthread_mutex_unlock(&dl->lock);
	out->marks = atomic_load_explicit(&dl->marks, memory_order_relaxed);
}
