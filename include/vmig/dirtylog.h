/*
 * vmig dirty page tracking: which guest pages changed since the last look.
 *
 * One interface over three KVM mechanisms:
 *
 *   bitmap        KVM_MEM_LOG_DIRTY_PAGES + KVM_GET_DIRTY_LOG.  Each sync
 *                 fetches and clears every slot's bitmap and re-protects
 *                 the dirty pages, in one ioctl per slot.  Cost grows with
 *                 guest size.
 *   bitmap-clear  KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (+ INITIALLY_SET where
 *                 offered).  A sync only copies the bitmaps; pages are
 *                 re-protected by vmig_dirtylog_clear(), which the sender
 *                 calls just before it reads a range.  A page rewritten
 *                 between sync and send then costs no second transfer.
 *   ring          a per-vCPU dirty ring (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]).
 *                 Cost grows with the number of dirty pages, not with guest
 *                 size.  KVM can only do it for a VM created with a ring,
 *                 and a VM with a ring has no dirty bitmap: the mode is
 *                 chosen before the VM exists (vmig_dirtylog_probe()).
 *
 * Page numbering.  A dirty log numbers the pages of all RAM regions in
 * order: region 0's pages first, then region 1's (see vmig_vm_regions()).
 * Bitmaps passed to vmig_dirtylog_sync() use that numbering;
 * vmig_dirtylog_page_gpa() and vmig_dirtylog_gpa_page() convert.
 *
 * The contract that no page is ever lost:
 *   1. sync() returns only after KVM has re-armed tracking of every page
 *      it reports (bitmap: GET_DIRTY_LOG write-protects; ring: entries
 *      harvested, then KVM_RESET_DIRTY_RINGS), except in bitmap-clear mode,
 *      where clear() does it;
 *   2. so the caller reads a reported page's contents only after sync()
 *      returned (bitmap-clear: after clear() of its range returned).  A
 *      guest write after that is reported by a later sync;
 *   3. a sync() while vCPUs run may miss writes still buffered in the CPU
 *      (Intel PML) or in flight; they show up in a later sync.  A sync()
 *      after vmig_vm_pause() returned sees everything: pausing takes every
 *      vCPU out of guest mode, which flushes those buffers.  The final
 *      pass of a migration therefore pauses, syncs, then sends.
 *   4. the VMM's own devices that write guest memory call
 *      vmig_dirtylog_mark() after the write.
 *
 * Threads.  create, start, stop and destroy run on the VM's owner thread.
 * sync and clear may run on any one thread (the migration thread); they are
 * serialised internally with each other, with start/stop and with the
 * ring-full handler, which runs on vCPU threads.  mark is lock-free and
 * safe from any thread.  One dirty log per VM at a time.
 */
#ifndef VMIG_DIRTYLOG_H
#define VMIG_DIRTYLOG_H

#include <stdbool.h>
#include <stdint.h>

#include "vmig/util.h"

struct vmig_vm;
struct vmig_dirtylog;

#define VMIG_DIRTYLOG_PAGE_SIZE     4096u

/* Default per-vCPU dirty ring size, in entries (64 KiB of ring per vCPU). */
#define VMIG_DIRTYLOG_RING_DEFAULT  4096u

enum vmig_dirtylog_mode {
	VMIG_DIRTYLOG_AUTO,            /* the best the VM offers */
	VMIG_DIRTYLOG_BITMAP,
	VMIG_DIRTYLOG_BITMAP_CLEAR,
	VMIG_DIRTYLOG_RING,
};

/* "auto", "bitmap", "bitmap-clear", "ring" -> mode.  0 or -EINVAL. */
int vmig_dirtylog_mode_parse(const char *name, enum vmig_dirtylog_mode *out);
/* The name vmig_dirtylog_mode_parse() takes; "unknown" for bad values. */
const char *vmig_dirtylog_mode_name(enum vmig_dirtylog_mode mode);

/* What this host's KVM offers, and the mode to build a VM for. */
struct vmig_dirtylog_plan {
	enum vmig_dirtylog_mode mode;  /* resolved: never AUTO */
	uint32_t ring_entries;         /* for vmig_vm_config.dirty_ring_entries:
	                                  0 unless mode is ring */
	bool clear_available;          /* KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 */
	bool initially_set;            /* ... with KVM_DIRTY_LOG_INITIALLY_SET */
	bool ring_available;           /* KVM_CAP_DIRTY_LOG_RING[_ACQ_REL] */
	bool ring_acq_rel;
	uint32_t ring_max_entries;     /* per vCPU; 0 without a ring */
};

/*
 * Decide, before creating a VM, which mode its dirty log will use: AUTO
 * picks ring, then bitmap-clear, then bitmap, whichever this host's KVM
 * offers first.  @ring_entries is the wanted ring size (0 = the default),
 * rounded down to a power of two and clamped to what KVM allows.  Opens
 * /dev/kvm itself.  Any thread.
 * Returns 0; -ENOTSUP with the reason in @err if @want is not available;
 * -EINVAL for a bad @want; the -errno of opening /dev/kvm.
 */
int vmig_dirtylog_probe(enum vmig_dirtylog_mode want, uint32_t ring_entries,
			struct vmig_dirtylog_plan *plan, struct vmig_err *err);

/*
 * Make a dirty log for @vm, not yet tracking.  AUTO means ring if the VM
 * has a dirty ring, else bitmap-clear if KVM offers it, else bitmap.
 * In ring mode it installs the VM's ring-full handler.  Owner thread.
 * Returns 0; -ENOTSUP with the reason (ring asked for but the VM has no
 * ring; a bitmap mode on a VM with a ring; no manual clear in this KVM);
 * -ENOMEM.
 */
int vmig_dirtylog_create(struct vmig_vm *vm, enum vmig_dirtylog_mode mode,
			 struct vmig_dirtylog **out, struct vmig_err *err);

/*
 * Stop if needed and free.  NULL-safe.  Owner thread.  In ring mode, a
 * running VM is paused for a moment so that no vCPU thread is inside the
 * ring-full handler when it is removed; a VM that stopped on its own has
 * its vCPU threads joined (vmig_vm_stop()).
 */
void vmig_dirtylog_destroy(struct vmig_dirtylog *dl);

/*
 * Turn tracking on for every memory slot, running VM or not.  Pages dirty
 * before this call are not reported (except in bitmap-clear mode with
 * INITIALLY_SET, where the first sync reports every page: the first pass
 * of a migration sends everything anyway).  Marks made before start are
 * dropped.  Owner thread.  0, -EALREADY, or KVM's -errno with @err.
 */
int vmig_dirtylog_start(struct vmig_dirtylog *dl, struct vmig_err *err);

/*
 * Turn tracking off.  Pages not yet synced are dropped: sync first (after
 * pausing) if they matter.  Idempotent.  Owner thread.  0 or -errno.
 */
int vmig_dirtylog_stop(struct vmig_dirtylog *dl, struct vmig_err *err);

/*
 * OR every page dirtied since the previous sync (or start) into @dirty,
 * which must have at least vmig_dirtylog_nr_pages() bits.  See the
 * contract above for when page contents may be read.  Any one thread.
 * Returns 0; -EINVAL if not started or @dirty is too small; -EIO if KVM's
 * ring held an entry outside guest RAM or its reset count disagrees with
 * what was harvested; KVM's -errno.  An error met earlier by the
 * ring-full handler on a vCPU thread is returned here.
 */
int vmig_dirtylog_sync(struct vmig_dirtylog *dl, struct vmig_bitmap *dirty,
		       struct vmig_err *err);

/*
 * bitmap-clear mode: re-arm tracking of the pages in
 * [first_page, first_page + npages) that an earlier sync reported and that
 * were not cleared since, so that a guest write from now on is reported by
 * the next sync.  Call it just before reading those pages to send them:
 * every reported page in the range must be read after this returns (or
 * stay dirty in the caller's bitmap).  Pages in the range dirtied after
 * the last sync are not touched: they were not reported, so clearing them
 * would lose them.  Ranges need no alignment (KVM's 64-page rule is
 * handled here); clearing large ranges (e.g. 1 GiB) saves ioctls.
 * Other modes: no-op.  Any one thread.  0, -EINVAL, or KVM's -errno.
 */
int vmig_dirtylog_clear(struct vmig_dirtylog *dl, uint64_t first_page,
			uint64_t npages, struct vmig_err *err);

/*
 * Record that the VMM itself wrote guest memory [gpa, gpa + len) (device
 * emulation, DMA): the next sync reports those pages.  Call it after the
 * write, so that a sync that sees the mark also sees the data.  Parts
 * outside guest RAM are ignored.  Lock-free; any thread; cheap.
 */
void vmig_dirtylog_mark(struct vmig_dirtylog *dl, uint64_t gpa, uint64_t len);

/* Resolved mode (never AUTO). */
enum vmig_dirtylog_mode vmig_dirtylog_mode(const struct vmig_dirtylog *dl);

/* Pages in the log's numbering (all RAM regions). */
uint64_t vmig_dirtylog_nr_pages(const struct vmig_dirtylog *dl);
/* Guest-physical address of @page, or UINT64_MAX if @page is out of range. */
uint64_t vmig_dirtylog_page_gpa(const struct vmig_dirtylog *dl, uint64_t page);
/* Page number of @gpa, or UINT64_MAX if @gpa is not guest RAM. */
uint64_t vmig_dirtylog_gpa_page(const struct vmig_dirtylog *dl, uint64_t gpa);

/* Counters since create. */
struct vmig_dirtylog_stats {
	uint64_t syncs;
	uint64_t pages_reported;   /* dirty pages KVM reported, summed over syncs */
	uint64_t sync_ns;          /* time spent in sync */
	uint64_t clears;           /* KVM_CLEAR_DIRTY_LOG calls */
	uint64_t pages_cleared;    /* pages re-armed through them */
	uint64_t clear_ns;         /* time spent in clear */
	uint64_t ring_harvested;   /* ring entries collected */
	uint64_t ring_resets;      /* KVM_RESET_DIRTY_RINGS calls */
	uint64_t ring_short_resets;   /* ... that reset fewer entries than
	                                 harvested (then called again) */
	uint64_t ring_full;        /* KVM_EXIT_DIRTY_RING_FULL exits handled */
	uint64_t ring_full_ns;     /* time vCPU threads spent harvesting for them */
	uint64_t marks;            /* vmig_dirtylog_mark() calls */
};

/* Snapshot of the counters.  Any thread. */
void vmig_dirtylog_get_stats(struct vmig_dirtylog *dl, struct vmig_dirtylog_stats *out);

#endif /* VMIG_DIRTYLOG_H */
