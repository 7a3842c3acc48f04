/*
 * The dirty ring: one ring of struct kvm_dirty_gfn per vCPU, shared with
 * KVM through a mapping of the vCPU fd (made by vmm/).
 *
 * The handshake is the entry's flags word, nothing else:
 *   0      empty: KVM may push here (it pushes at its private dirty_index)
 *   DIRTY  KVM pushed {slot, offset}: the page at that gfn was written
 *          while write-protected; KVM made it writable again, so further
 *          writes to it are not logged until the entry is reset
 *   RESET  we harvested it; KVM_RESET_DIRTY_RINGS will re-protect the
 *          page and set the flags back to 0
 *
 * Ordering.  KVM writes slot and offset, then the flags (a release store,
 * or smp_wmb + store).  We read the flags with acquire, then slot and
 * offset, then store RESET with release, so KVM never sees RESET before
 * we are done reading the entry.  x86 is TSO, but the compiler is not,
 * and KVM_CAP_DIRTY_LOG_RING_ACQ_REL documents exactly this protocol.
 *
 * Why no page is lost.  A sync harvests every ring up to its first
 * non-dirty entry, then calls KVM_RESET_DIRTY_RINGS, then returns; the
 * caller reads page contents only after that.  A write that happens
 * between harvest and reset goes to a page that is still writable, so it
 * is not logged, but the caller's later read sees it; a write after the
 * reset faults on the re-protected page and pushes a new entry.  An entry
 * pushed while we harvest is either collected now or found by the next
 * harvest, which starts at our fetch index.  A sync after vmig_vm_pause()
 * also sees entries KVM had buffered (Intel PML) since every vCPU left
 * guest mode.
 *
 * Ring full.  When a ring reaches its soft limit, KVM stops the vCPU with
 * KVM_EXIT_DIRTY_RING_FULL; vmm/ calls our handler on that vCPU's thread,
 * which harvests all rings into dl->pending and resets them, under
 * dl->lock like a sync.  The next sync hands the pages over.  The entries
 * are in the ring until then, so nothing is dropped while the vCPU waits.
 *
 * The reset count.  KVM_RESET_DIRTY_RINGS returns how many RESET entries
 * it processed; since harvest and reset are serialised by dl->lock, that
 * must be what we harvested.
 *
 * Signals.  Since Linux 6.16 the reset stops when a signal is pending, and
 * it does so after it set a batch of entries back to empty (and counted
 * them) but before it re-protected their pages: those pages stay writable,
 * so their next writes are never logged.  vCPU threads, where the
 * ring-full handler runs, are kicked with a signal on every pause, and the
 * test suite lost pages that way.  So every signal is blocked on the
 * calling thread around the ioctl: signal_pending() ignores blocked
 * signals, and a kick that arrives meanwhile is delivered right after
 * (vmm/ also sets immediate_exit, so it is not needed to stop KVM_RUN).
 * Should a reset still come back short, the log reports -EIO rather than
 * go on with pages it may no longer track.
 *
 * Where KVM pushes next is private to KVM.  A fresh VM starts at 0, but a
 * dirty log made for a VM whose rings were used before (an earlier dirty
 * log, say for a migration that was cancelled) cannot know it.  So each
 * ring starts "unsynced": its first harvest looks for the oldest dirty
 * entry, the one whose predecessor is not dirty.  KVM never fills a ring
 * completely (it stops the vCPU at a soft limit below the size), so that
 * entry is unique.  The successor is read first: if the predecessor is
 * not dirty after that, it was not pushed before it, because KVM pushes
 * in index order.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>

#include "dirtylog-internal.h"

#define BPL VMIG_BITS_PER_LONG
#define F_MASK (KVM_DIRTY_GFN_F_DIRTY | KVM_DIRTY_GFN_F_RESET)

/* Tries of KVM_RESET_DIRTY_RINGS that make no progress before giving up. */
#define RESET_MAX_IDLE 1000

static bool entry_dirty(struct kvm_dirty_gfn *e)
{
	return (__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & F_MASK) ==
		KVM_DIRTY_GFN_F_DIRTY;
}

/* Find the oldest dirty entry of an unsynced ring.  False if none. */
static bool find_oldest(struct vmig__ring *r)
{
	uint32_t mask = r->size - 1, i;

	for (i = 0; i < r->size; i++) {
		if (!entry_dirty(&r->gfns[i]))
			continue;
		if (entry_dirty(&r->gfns[(i - 1) & mask]))
			continue;
		r->fetch = i;
		r->synced = true;
		return true;
	}
	return false;
}

static void set_page(struct vmig__harvest *h, uint32_t slot, uint64_t offset)
{
	unsigned int i;

	/* slot is (address space << 16) | slot id; vmig uses space 0 only. */
	for (i = 0; i < h->nr_slots; i++) {
		const struct vmig__dl_slot *s = &h->slots[i];
		uint64_t p;

		if (slot != s->id || offset >= s->npages)
			continue;
		p = s->first_page + offset;
		if (h->atomic)
			__atomic_fetch_or(&h->words[p / BPL], 1ul << (p % BPL), __ATOMIC_RELAXED);
		else
			h->words[p / BPL] |= 1ul << (p % BPL);
		return;
	}
	if (!h->bad++) {
		h->bad_slot = slot;
		h->bad_offset = offset;
	}
}

uint32_t vmig__ring_harvest(struct vmig__ring *r, struct vmig__harvest *h)
{
	uint32_t mask = r->size - 1, count = 0;

	if (!r->synced && !find_oldest(r))
		return 0;
	/*
	 * KVM reuses no entry before KVM_RESET_DIRTY_RINGS, which we
	 * serialise with this, so one pass sees at most r->size entries.
	 */
	while (count < r->size) {
		struct kvm_dirty_gfn *e = &r->gfns[r->fetch & mask];

		if (!entry_dirty(e))
			break;
		set_page(h, e->slot, e->offset);
		__atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
		r->fetch++;
		count++;
	}
	return count;
}

/*
 * KVM_RESET_DIRTY_RINGS until it has reset the @want entries harvested,
 * with signals blocked (see "Signals" above).
 */
static int reset_rings(struct vmig_dirtylog *dl, uint64_t want, struct vmig_err *err)
{
	uint64_t done = 0;
	unsigned int idle = 0, shorts = 0;
	sigset_t all, old;
	int r, ret = 0;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	while (done < want && idle < RESET_MAX_IDLE) {
		r = ioctl(dl->vm_fd, KVM_RESET_DIRTY_RINGS, 0);
		if (r < 0) {
			ret = -errno;
			if (ret == -EINTR) {
				ret = 0;
				idle++;
				continue;
			}
			vmig_err_set(err, ret, "KVM_RESET_DIRTY_RINGS failed: %s", strerror(-ret));
			break;
		}
		dl->stats.ring_resets++;
		if ((uint64_t)r < want - done) {
			dl->stats.ring_short_resets++;
			shorts++;
		}
		if (r == 0)
			idle++;
		done += (uint64_t)r;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (ret)
		return ret;
	if (done != want) {
		vmig_err_set(err, -EIO, "KVM_RESET_DIRTY_RINGS reset %" PRIu64 " dirty ring "
			     "entries but %" PRIu64 " were harvested: is something else "
			     "collecting this VM's dirty rings?", done, want);
		return -EIO;
	}
	if (shorts) {
		/* Cannot happen with signals blocked; if it does, do not trust it. */
		vmig_err_set(err, -EIO, "KVM_RESET_DIRTY_RINGS stopped early %u time(s): it "
			     "may have left pages writable whose next writes are not logged, "
			     "so this dirty log can no longer be trusted", shorts);
		return -EIO;
	}
	return 0;
}

/* Harvest every ring into @words, then reset.  dl->lock held. */
static int harvest_all(struct vmig_dirtylog *dl, unsigned long *words, bool atomic,
		       uint64_t *harvested, struct vmig_err *err)
{
	struct vmig__harvest h;
	uint64_t total = 0;
	unsigned int i;
	int ret;

	memset(&h, 0, sizeof(h));
	h.slots = dl->slots;
	h.nr_slots = dl->nr_slots;
	h.words = words;
	h.atomic = atomic;
	for (i = 0; i < dl->nr_rings; i++)
		total += vmig__ring_harvest(&dl->rings[i], &h);
	dl->stats.ring_harvested += total;
	*harvested = total;
	ret = reset_rings(dl, total, err);
	if (ret)
		return ret;
	if (h.bad) {
		vmig_err_set(err, -EIO, "KVM's dirty ring reported %" PRIu64 " page(s) outside "
			     "guest RAM (the first: slot 0x%x, page %" PRIu64 ")", h.bad,
			     h.bad_slot, h.bad_offset);
		return -EIO;
	}
	return 0;
}

/* vCPU thread: KVM stopped it with KVM_EXIT_DIRTY_RING_FULL. */
static void ring_full(void *arg, unsigned int vcpu)
{
	struct vmig_dirtylog *dl = arg;
	uint64_t t0 = vmig__dl_now_ns(), n = 0;
	struct vmig_err e = { 0 };
	int ret;

	(void)vcpu;
	pthread_mutex_lock(&dl->lock);
	/* All rings, not just this vCPU's: one reset serves them all. */
	ret = harvest_all(dl, dl->pending, true, &n, &e);
	if (ret)
		vmig_err_set(&dl->async_err, ret, "%s", e.msg);
	/* Inside the lock: a sync that follows this harvest sees the flag. */
	if (n)
		vmig__dl_set_pending_any(dl);
	dl->stats.ring_full++;
	dl->stats.ring_full_ns += vmig__dl_now_ns() - t0;
	pthread_mutex_unlock(&dl->lock);
}

static int ring_init(struct vmig_dirtylog *dl, struct vmig_err *err)
{
	unsigned int i, n = vmig_vm_nr_vcpus(dl->vm);

	for (i = 0; i < n && i < VMIG_VM_MAX_VCPUS; i++) {
		struct vmig__ring *r = &dl->rings[i];

		r->gfns = vmig_vm_dirty_ring(dl->vm, i, &r->size, NULL);
		if (!r->gfns || !r->size || (r->size & (r->size - 1))) {
			vmig_err_set(err, -ENOTSUP, "vCPU %u has no usable dirty ring", i);
			return -ENOTSUP;
		}
		r->fetch = 0;
		r->synced = false;
		dl->nr_rings++;
	}
	/* Before logging can go on: a ring may fill as soon as it does. */
	vmig_vm_set_ring_full_handler(dl->vm, ring_full, dl);
	dl->handler_installed = true;
	return 0;
}

/* Empty the rings, keeping the pages in pending (the caller drops them). */
static int drain(struct vmig_dirtylog *dl, struct vmig_err *err)
{
	uint64_t n;
	int ret = harvest_all(dl, dl->pending, true, &n, err);

	if (n)
		vmig__dl_set_pending_any(dl);
	return ret;
}

static int ring_start(struct vmig_dirtylog *dl, struct vmig_err *err)
{
	/* Left-overs from before would be reported as new: drain them. */
	return drain(dl, err);
}

static int ring_sync(struct vmig_dirtylog *dl, struct vmig_bitmap *dirty,
		     struct vmig_err *err)
{
	uint64_t n;
	int ret;

	/* Straight into the caller's bitmap: we own it until we return. */
	ret = harvest_all(dl, dirty->words, false, &n, err);
	dl->stats.pages_reported += n;
	return ret;
}

static void ring_stop(struct vmig_dirtylog *dl)
{
	struct vmig_err e = { 0 };

	/* Logging is off: after this the rings stay empty. */
	if (drain(dl, &e))
		vmig_log(VMIG_LOG_WARN, "stopping dirty logging: %s", e.msg);
}

static void ring_fini(struct vmig_dirtylog *dl)
{
	struct vmig_vm *vm = dl->vm;

	if (!dl->handler_installed)
		return;
	/*
	 * A vCPU thread reads the handler under the VM's lock but calls it
	 * after dropping it, so removing the handler does not wait for a
	 * call in progress, which would then run on freed memory.  A paused
	 * VM has no vCPU thread in the handler (pause waits for every vCPU
	 * to finish its exit and come back to its loop), a VM never started
	 * has no vCPU threads, and one that stopped has them joined here.
	 */
	switch (vmig_vm_state(vm)) {
	case VMIG_VM_CREATED:
	case VMIG_VM_PAUSED:
		vmig_vm_set_ring_full_handler(vm, NULL, NULL);
		break;
	case VMIG_VM_RUNNING:
		if (vmig_vm_pause(vm) == 0) {
			vmig_vm_set_ring_full_handler(vm, NULL, NULL);
			vmig_vm_resume(vm);
			break;
		}
		/* It stopped meanwhile. */
		/* fall through */
	case VMIG_VM_STOPPED:
		vmig_vm_stop(vm);
		vmig_vm_set_ring_full_handler(vm, NULL, NULL);
		break;
	}
	dl->handler_installed = false;
}

const struct vmig__dl_ops vmig__dl_ring_ops = {
	.mode = VMIG_DIRTYLOG_RING,
	.init = ring_init,
	.start = ring_start,
	.sync = ring_sync,
	.clear = NULL,
	.stop = ring_stop,
	.fini = ring_fini,
};
