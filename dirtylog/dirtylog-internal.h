/* Private cross-file declarations of dirtylog/. */
#ifndef VMIG_DIRTYLOG_INTERNAL_H
#define VMIG_DIRTYLOG_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <linux/kvm.h>

#include "vmig/dirtylog.h"
#include "vmig/vm.h"

/* One KVM memory slot, as the dirty log sees it. */
struct vmig__dl_slot {
	uint32_t id;              /* KVM slot id (address space 0) */
	uint64_t gpa;
	uint64_t npages;
	uint64_t first_page;      /* its page 0 in the log's numbering */
	/*
	 * Bitmap modes: the buffer KVM_GET_DIRTY_LOG fills.  In bitmap-clear
	 * mode it is also the record of "reported but not yet cleared": only
	 * those bits may be passed to KVM_CLEAR_DIRTY_LOG.
	 */
	unsigned long *bmap;
	unsigned long *scratch;   /* bitmap-clear: the bits of one clear request */
};

/* One vCPU's dirty ring, as mapped by vmm/. */
struct vmig__ring {
	struct kvm_dirty_gfn *gfns;
	uint32_t size;            /* entries, a power of two */
	uint32_t fetch;           /* free-running index of the next entry to read */
	bool synced;              /* fetch is known to follow KVM's push index */
};

/* Where harvested ring entries go. */
struct vmig__harvest {
	const struct vmig__dl_slot *slots;
	unsigned int nr_slots;
	unsigned long *words;     /* page-numbered bitmap */
	bool atomic;              /* @words is shared: set bits atomically */
	uint64_t bad;             /* entries outside every slot */
	uint32_t bad_slot;        /* the first of them */
	uint64_t bad_offset;
};

struct vmig_dirtylog;

/* A tracking mechanism.  Every hook but init/fini runs with dl->lock held. */
struct vmig__dl_ops {
	enum vmig_dirtylog_mode mode;
	/* At create, after the slots are known. */
	int (*init)(struct vmig_dirtylog *dl, struct vmig_err *err);
	/* Just before KVM_MEM_LOG_DIRTY_PAGES goes on. */
	int (*start)(struct vmig_dirtylog *dl, struct vmig_err *err);
	int (*sync)(struct vmig_dirtylog *dl, struct vmig_bitmap *dirty,
		    struct vmig_err *err);
	/* NULL: clearing is a no-op. */
	int (*clear)(struct vmig_dirtylog *dl, uint64_t first, uint64_t n,
		     struct vmig_err *err);
	/* Just after KVM_MEM_LOG_DIRTY_PAGES went off. */
	void (*stop)(struct vmig_dirtylog *dl);
	/* At destroy, stopped; undoes init.  Also on a half-built log. */
	void (*fini)(struct vmig_dirtylog *dl);
};

struct vmig_dirtylog {
	struct vmig_vm *vm;
	int vm_fd;
	const struct vmig__dl_ops *ops;
	unsigned int nr_slots;
	struct vmig__dl_slot slots[VMIG_VM_MAX_REGIONS];
	uint64_t nr_pages;

	/*
	 * Serialises everything that talks to KVM's log: sync, clear,
	 * start/stop, and ring harvest + reset, whether from the owner, the
	 * migration thread or a vCPU thread in the ring-full handler.  Never
	 * held while waiting for a vCPU thread.
	 */
	pthread_mutex_t lock;
	bool started;             /* under lock */
	struct vmig_err async_err;   /* first error of a ring-full handler, under lock */

	/*
	 * Pages waiting for the next sync: marks, and ring entries harvested
	 * on vCPU threads.  Bits are set with atomic OR, then pending_any is
	 * set (release); sync exchanges pending_any to 0 (acquire) before
	 * exchanging the words to 0, so a bit set after that is seen by the
	 * next sync, never dropped.
	 */
	unsigned long *pending;
	uint64_t pending_words;
	atomic_bool pending_any;

	/* bitmap-clear */
	bool initially_set;

	/* ring */
	unsigned int nr_rings;
	struct vmig__ring rings[VMIG_VM_MAX_VCPUS];
	bool handler_installed;

	struct vmig_dirtylog_stats stats;   /* under lock, except marks */
	atomic_uint_fast64_t marks;
};

extern const struct vmig__dl_ops vmig__dl_bitmap_ops;
extern const struct vmig__dl_ops vmig__dl_bitmap_clear_ops;
extern const struct vmig__dl_ops vmig__dl_ring_ops;

/* dirtylog.c */
uint64_t vmig__dl_now_ns(void);
/* OR the pending pages into @words (plain stores, caller owns @words). */
void vmig__dl_take_pending(struct vmig_dirtylog *dl, unsigned long *words);
void vmig__dl_drop_pending(struct vmig_dirtylog *dl);
void vmig__dl_set_pending_any(struct vmig_dirtylog *dl);

/* bitmap-log.c */

/*
 * Issue the KVM_CLEAR_DIRTY_LOG requests that re-arm the pages of
 * [first, first + n) of @s that are set in s->bmap, and clear those bits.
 * KVM wants first_page a multiple of 64 and num_pages a multiple of 64
 * unless the range ends at the slot's end: the request is widened to that
 * but only carries bits of the asked range.  @fn does the ioctl (tests
 * pass a fake).  Adds the pages re-armed to *cleared and the calls made to
 * *calls.  0 or @fn's -errno (the bits of a failed request stay set).
 */
typedef int vmig__dl_clear_fn(void *arg, uint32_t slot, uint64_t first_page,
			      uint32_t num_pages, const unsigned long *bits);
int vmig__dl_clear_slot(struct vmig__dl_slot *s, uint64_t first, uint64_t n,
			vmig__dl_clear_fn *fn, void *arg, uint64_t *cleared,
			uint64_t *calls);

/* ring.c */

/*
 * Collect the dirty entries of one ring into @h, marking each harvested
 * (RESET) for KVM_RESET_DIRTY_RINGS.  Returns the number collected.  An
 * unsynced ring is first searched for the oldest dirty entry.
 */
uint32_t vmig__ring_harvest(struct vmig__ring *r, struct vmig__harvest *h);

#endif /* VMIG_DIRTYLOG_INTERNAL_H */
