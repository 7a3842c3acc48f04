/*
 * dirtylog/ against real KVM, table-driven over the three modes.
 *
 * The built-in guest stamps each page it writes with the host's current
 * iteration (vmig_guest_set_iteration()).  Per iteration i the host sets
 * i, resumes the guest, syncs several times while it runs (clearing what
 * it got, as a sender would: that matters in bitmap-clear mode), then
 * pauses it and syncs once more.  With the guest paused, both directions
 * are checked:
 *   - no page lost: every work page whose stamp says iteration i, or whose
 *     generation changed since the previous check, is in the dirty set
 *     collected for i;
 *   - nothing spurious: every work page in that set holds a stamp of
 *     iteration i.  Stricter than "i or i-1": the pause at the end of
 *     i-1 was followed by a sync and a clear of everything, so nothing
 *     written before i may come back.  The exceptions are exactly the page
 *     each vCPU was in the middle of writing at the previous pause (stamp
 *     i-1) and at this one (any content): see verify().  Pages below
 *     VMIG_GUEST_WS_START (the status page at 0x8000, written all the
 *     time, guest stacks, page tables) are not work pages and are left out
 *     of this direction; work pages outside every working set are never
 *     written and hold a zero stamp, so they must never be reported.
 * An iteration runs until each vCPU has written about a third of its
 * working set, so in every iteration most work pages are NOT written and
 * the second direction has something to catch.  The checker itself is
 * tested: dropping one reported page, or adding one, must be caught.
 *
 * Also: several vCPUs, a ring small enough to fill (ring-full exits, no
 * syncs while running), start/stop/start and a second dirty log on the
 * same VM, destroying a log while its rings fill, marks and page
 * numbering over two slots, INITIALLY_SET over both slots, and a guest
 * writing above 4 GiB (see two_slots_lose_nothing for its cost).
 * KVM only takes RAM in 2 MiB multiples, so a slot whose page count is
 * not a multiple of 64 cannot exist here: KVM_CLEAR_DIRTY_LOG's 64-page
 * rules are tested on the unit level (vmig__dl_clear_slot() with odd slot
 * sizes against a fake KVM that enforces them), as is the ring's harvest
 * over a fake ring (wrap-around, two slots, bad entries, a second reader).
 */
#include "config.h"

#include <inttypes.h>
#include <sys/mman.h>

#include "../../dirtylog/dirtylog-internal.h"
#include "vmig/dirtylog.h"
#include "vmig/guest-abi.h"
#include "vmig/vm.h"
#include "kvm-test.h"

#define PAGE VMIG_GUEST_PAGE_SIZE

static const enum vmig_dirtylog_mode modes[] = {
	VMIG_DIRTYLOG_BITMAP, VMIG_DIRTYLOG_BITMAP_CLEAR, VMIG_DIRTYLOG_RING,
};
#define NR_MODES (sizeof(modes) / sizeof(modes[0]))

/* ------------------------------------------------------------------ */
/* Unit level: KVM_CLEAR_DIRTY_LOG requests (no KVM). */

struct clear_rec {
	unsigned int calls;
	uint64_t npages;                /* the fake slot's size */
	unsigned long cleared[64];      /* union of bits KVM was asked to clear */
	bool fail;
};

/* A fake KVM that enforces KVM's rules and records the request. */
static int fake_clear(void *arg, uint32_t slot, uint64_t first, uint32_t num,
		      const unsigned long *bits)
{
	struct clear_rec *r = arg;
	uint64_t i;

	(void)slot;
	r->calls++;
	if (first % 64)
		ck_abort_msg("first_page %" PRIu64 " not a multiple of 64", first);
	if (first + num > r->npages)
		ck_abort_msg("request %" PRIu64 "+%u past slot end %" PRIu64, first, num,
			     r->npages);
	if (num % 64 && first + num != r->npages)
		ck_abort_msg("num_pages %u not a multiple of 64 and not reaching the slot "
			     "end (first %" PRIu64 ", slot %" PRIu64 ")", num, first, r->npages);
	for (i = 0; i < num; i++)
		if (bits[i / 64] & (1ul << (i % 64)))
			r->cleared[(first + i) / 64] |= 1ul << ((first + i) % 64);
	return r->fail ? -EIO : 0;
}

START_TEST(unit_clear_alignment)
{
	/* Odd sizes: 1000 pages (not a multiple of 64), 64, 65, 4095. */
	static const uint64_t sizes[] = { 1000, 64, 65, 4095, 130 };
	unsigned int si;

	for (si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
		uint64_t np = sizes[si], first, n, i;
		unsigned long bmap[64], scratch[64], orig[64];
		struct vmig__dl_slot s = { .id = 1, .npages = np, .bmap = bmap, .scratch = scratch };

		for (first = 0; first < np; first += 7) {
			for (n = 0; first + n <= np; n += 1 + n / 3) {
				struct clear_rec rec = { .npages = np };
				uint64_t cleared = 0, calls = 0, want = 0;
				int ret;

				/* Every third page "reported": a pattern across words. */
				memset(bmap, 0, sizeof(bmap));
				for (i = 0; i < np; i++)
					if (i % 3 == 0 || (i > 60 && i < 70))
						bmap[i / 64] |= 1ul << (i % 64);
				memcpy(orig, bmap, sizeof(orig));
				ret = vmig__dl_clear_slot(&s, first, n, fake_clear, &rec,
							  &cleared, &calls);
				if (ret)
					ck_abort_msg("clear %" PRIu64 "+%" PRIu64 ": %d", first, n, ret);
				/* Plain ifs: Check records every passing ck_assert (slow). */
				for (i = 0; i < np; i++) {
					bool was = orig[i / 64] & (1ul << (i % 64));
					bool in = i >= first && i < first + n;
					bool asked = rec.cleared[i / 64] & (1ul << (i % 64));
					bool left = bmap[i / 64] & (1ul << (i % 64));

					if (asked != (was && in))
						ck_abort_msg("slot of %" PRIu64 " pages, clear %" PRIu64
							     "+%" PRIu64 ": page %" PRIu64 " reported %d, "
							     "in range %d, but sent to KVM %d",
							     np, first, n, i, was, in, asked);
					if (left != (was && !in))
						ck_abort_msg("slot of %" PRIu64 " pages, clear %" PRIu64
							     "+%" PRIu64 ": page %" PRIu64 " left %d",
							     np, first, n, i, left);
					want += was && in;
				}
				if (cleared != want || calls != rec.calls || rec.calls > 1)
					ck_abort_msg("slot %" PRIu64 ", clear %" PRIu64 "+%" PRIu64
						     ": %" PRIu64 " cleared (want %" PRIu64 "), %"
						     PRIu64 " calls (KVM saw %u, want <= 1)", np, first,
						     n, cleared, want, calls, rec.calls);
				/* Cleared again before a new sync: nothing left to ask. */
				rec.calls = 0;
				ret = vmig__dl_clear_slot(&s, first, n, fake_clear, &rec,
							  &cleared, &calls);
				if (ret || rec.calls)
					ck_abort_msg("second clear %" PRIu64 "+%" PRIu64 ": %d, %u "
						     "calls", first, n, ret, rec.calls);
			}
		}
	}
}
END_TEST

START_TEST(unit_clear_failure_keeps_bits)
{
	unsigned long bmap[2] = { ~0ul, 0x5ul }, scratch[2];
	struct vmig__dl_slot s = { .id = 0, .npages = 100, .bmap = bmap, .scratch = scratch };
	struct clear_rec rec = { .npages = 100, .fail = true };
	uint64_t cleared = 0, calls = 0;

	ck_assert_int_eq(vmig__dl_clear_slot(&s, 3, 90, fake_clear, &rec, &cleared, &calls),
			 -EIO);
	ck_assert_msg(bmap[0] == ~0ul && bmap[1] == 0x5ul, "a failed clear dropped bits");
	ck_assert_uint_eq(cleared, 0);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Unit level: ring harvest over a fake ring (no KVM). */

struct fake_ring {
	struct kvm_dirty_gfn e[256];
	uint32_t push;      /* KVM's dirty_index */
	uint32_t reset;     /* KVM's reset_index */
};

static void fr_push(struct fake_ring *f, uint32_t slot, uint64_t off)
{
	struct kvm_dirty_gfn *e = &f->e[f->push++ & 255];

	ck_assert_msg(e->flags == 0, "fake KVM would overwrite a live entry");
	e->slot = slot;
	e->offset = off;
	__atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_DIRTY, __ATOMIC_RELEASE);
}

/* What KVM_RESET_DIRTY_RINGS does: entries marked RESET back to 0. */
static uint32_t fr_reset(struct fake_ring *f)
{
	uint32_t n = 0;

	while (f->reset != f->push && (f->e[f->reset & 255].flags & KVM_DIRTY_GFN_F_RESET)) {
		f->e[f->reset++ & 255].flags = 0;
		n++;
	}
	return n;
}

START_TEST(unit_ring_harvest)
{
	static struct fake_ring f;
	/* Two slots as vmig lays them out: slot 0 then slot 1 above 4 GiB. */
	struct vmig__dl_slot slots[2] = {
		{ .id = 0, .gpa = 0, .npages = 1000, .first_page = 0 },
		{ .id = 1, .gpa = 1ull << 32, .npages = 300, .first_page = 1000 },
	};
	struct vmig_bitmap b;
	struct vmig__ring r = { .gfns = f.e, .size = 256 };
	struct vmig__harvest h = { .slots = slots, .nr_slots = 2 };
	unsigned int round, i;
	uint32_t got;

	ck_assert_int_eq(vmig_bitmap_init(&b, 1300), 0);
	h.words = b.words;

	/* Empty, unsynced ring: nothing, still unsynced. */
	ck_assert_uint_eq(vmig__ring_harvest(&r, &h), 0);
	ck_assert(!r.synced);

	/*
	 * KVM's index starts at 200, not 0 (an earlier user of the ring):
	 * the first harvest must find the oldest entry, then follow KVM
	 * around the wrap many times.
	 */
	f.push = f.reset = 200;
	for (round = 0; round < 40; round++) {
		unsigned int n = 1 + (round * 37) % 180;   /* below the soft limit */

		vmig_bitmap_clear_all(&b);
		for (i = 0; i < n; i++) {
			if (i % 2)
				fr_push(&f, 1, (round * 7 + i) % 300);   /* slot 1 */
			else
				fr_push(&f, 0, (round * 13 + i) % 1000);
		}
		got = vmig__ring_harvest(&r, &h);
		ck_assert_msg(got == n, "round %u: harvested %u of %u", round, got, n);
		ck_assert_uint_eq(fr_reset(&f), n);
		for (i = 0; i < n; i++) {
			uint64_t p = i % 2 ? 1000 + (round * 7 + i) % 300 : (round * 13 + i) % 1000;

			ck_assert_msg(vmig_bitmap_test(&b, p), "round %u: page %" PRIu64
				      " (entry %u) not set", round, p, i);
		}
		ck_assert_uint_le(vmig_bitmap_count(&b), n);
		ck_assert_uint_eq(h.bad, 0);
	}
	ck_assert(r.synced);

	/* Entries outside RAM are counted, not set, and still released. */
	fr_push(&f, 1, 300);              /* one past slot 1's end */
	fr_push(&f, 7, 0);                /* no such slot */
	fr_push(&f, (1u << 16) | 0, 5);   /* address space 1 */
	fr_push(&f, 0, 999);
	vmig_bitmap_clear_all(&b);
	ck_assert_uint_eq(vmig__ring_harvest(&r, &h), 4);
	ck_assert_uint_eq(h.bad, 3);
	ck_assert_uint_eq(h.bad_slot, 1);
	ck_assert_uint_eq(h.bad_offset, 300);
	ck_assert_uint_eq(vmig_bitmap_count(&b), 1);
	ck_assert(vmig_bitmap_test(&b, 999));
	ck_assert_uint_eq(fr_reset(&f), 4);

	/* A new reader (a second dirty log) finds its place again. */
	{
		struct vmig__ring r2 = { .gfns = f.e, .size = 256 };

		h.bad = 0;
		for (i = 0; i < 10; i++)
			fr_push(&f, 0, i);
		vmig_bitmap_clear_all(&b);
		ck_assert_uint_eq(vmig__ring_harvest(&r2, &h), 10);
		ck_assert_uint_eq(vmig_bitmap_count(&b), 10);
		ck_assert_uint_eq(r2.fetch & 255, f.push & 255);
		ck_assert_uint_eq(fr_reset(&f), 10);
	}
	vmig_bitmap_fini(&b);
}
END_TEST

START_TEST(unit_mode_names)
{
	enum vmig_dirtylog_mode m;
	unsigned int i;

	for (i = 0; i < NR_MODES; i++) {
		ck_assert_int_eq(vmig_dirtylog_mode_parse(vmig_dirtylog_mode_name(modes[i]), &m), 0);
		ck_assert_int_eq(m, modes[i]);
	}
	ck_assert_int_eq(vmig_dirtylog_mode_parse("auto", &m), 0);
	ck_assert_int_eq(m, VMIG_DIRTYLOG_AUTO);
	ck_assert_int_eq(vmig_dirtylog_mode_parse("Ring", &m), -EINVAL);
	ck_assert_int_eq(vmig_dirtylog_mode_parse("", &m), -EINVAL);
	ck_assert_int_eq(vmig_dirtylog_mode_parse(NULL, &m), -EINVAL);
	ck_assert_str_eq(vmig_dirtylog_mode_name(VMIG_DIRTYLOG_BITMAP_CLEAR), "bitmap-clear");
}
END_TEST

/* ------------------------------------------------------------------ */
/* KVM helpers */

static bool have_kvm;

/*
 * Plan a VM for @mode; false (after printing SKIP with the reason) if
 * this host cannot do it.  @ring: wanted ring size, 0 = default.
 */
static bool plan_mode(enum vmig_dirtylog_mode mode, uint32_t ring,
		      struct vmig_dirtylog_plan *plan)
{
	struct vmig_err err = { 0 };
	int ret;

	if (!have_kvm) {
		printf("SKIP: %s: cannot open /dev/kvm\n", vmig_dirtylog_mode_name(mode));
		return false;
	}
	ret = vmig_dirtylog_probe(mode, ring, plan, &err);
	if (ret == -ENOTSUP) {
		printf("SKIP: mode %s: %s\n", vmig_dirtylog_mode_name(mode), err.msg);
		return false;
	}
	ck_assert_msg(ret == 0, "probe(%s): %d: %s", vmig_dirtylog_mode_name(mode), ret, err.msg);
	ck_assert_int_eq(plan->mode, mode);
	return true;
}

static struct vmig_vm *make_vm(uint64_t mem, unsigned int vcpus, const char *workload,
			       uint32_t ring_entries, bool start)
{
	struct vmig_vm_config cfg = {
		.name = "dirtylog",
		.mem_size = mem,
		.nr_vcpus = vcpus,
		.workload = workload,
		.console_fd = -1,
		.dirty_ring_entries = ring_entries,
	};
	struct vmig_err err = { 0 };
	struct vmig_vm *vm = NULL;
	int ret;

	ret = vmig_vm_create(&cfg, &vm, &err);
	ck_assert_msg(ret == 0, "vmig_vm_create: %d: %s", ret, err.msg);
	if (start) {
		ret = vmig_vm_start(vm, &err);
		ck_assert_msg(ret == 0, "vmig_vm_start: %d: %s", ret, err.msg);
	}
	return vm;
}

static struct vmig_dirtylog *make_dl(struct vmig_vm *vm, enum vmig_dirtylog_mode mode)
{
	struct vmig_err err = { 0 };
	struct vmig_dirtylog *dl = NULL;
	int ret = vmig_dirtylog_create(vm, mode, &dl, &err);

	ck_assert_msg(ret == 0, "vmig_dirtylog_create(%s): %d: %s",
		      vmig_dirtylog_mode_name(mode), ret, err.msg);
	ck_assert_int_eq(vmig_dirtylog_mode(dl), mode);
	return dl;
}

static void dl_start(struct vmig_dirtylog *dl)
{
	struct vmig_err err = { 0 };
	int ret = vmig_dirtylog_start(dl, &err);

	ck_assert_msg(ret == 0, "vmig_dirtylog_start: %d: %s", ret, err.msg);
}

static void dl_sync(struct vmig_dirtylog *dl, struct vmig_bitmap *b)
{
	struct vmig_err err = { 0 };
	int ret = vmig_dirtylog_sync(dl, b, &err);

	ck_assert_msg(ret == 0, "vmig_dirtylog_sync: %d: %s", ret, err.msg);
}

static void dl_clear_all(struct vmig_dirtylog *dl)
{
	struct vmig_err err = { 0 };
	int ret = vmig_dirtylog_clear(dl, 0, vmig_dirtylog_nr_pages(dl), &err);

	ck_assert_msg(ret == 0, "vmig_dirtylog_clear: %d: %s", ret, err.msg);
}

static const volatile struct vmig_guest_status *status(struct vmig_vm *vm)
{
	return vmig_vm_gpa_to_hva(vm, VMIG_GUEST_STATUS_GPA, sizeof(struct vmig_guest_status));
}

static void wait_running(struct vmig_vm *vm, unsigned int vcpus, unsigned int timeout_ms)
{
	const volatile struct vmig_guest_status *st = status(vm);
	uint64_t end = kvm_test_now_ms() + timeout_ms;
	unsigned int i, running;

	for (;;) {
		running = 0;
		if (st->magic == VMIG_GUEST_STATUS_MAGIC)
			for (i = 0; i < st->nr_vcpus && i < VMIG_GUEST_MAX_VCPUS; i++)
				running += st->vcpu[i].pages_written > 0;
		if (running == vcpus)
			return;
		ck_assert_msg(kvm_test_now_ms() < end, "guest not running after %u ms "
			      "(%u of %u vCPUs writing); stop reason '%s'", timeout_ms,
			      running, vcpus, vmig_vm_stop_reason(vm));
		kvm_test_sleep_ms(5);
	}
}

/* ------------------------------------------------------------------ */
/* The iteration harness and its two-way check. */

struct harness {
	struct vmig_vm *vm;
	struct vmig_dirtylog *dl;
	enum vmig_dirtylog_mode mode;
	unsigned int vcpus;
	uint64_t low_end;
	uint64_t nr_pages;
	struct vmig_bitmap dirty;         /* collected for the current iteration */
	/* Per vCPU: the work pages it owns and their generation last check. */
	uint64_t first[VMIG_GUEST_MAX_VCPUS], n[VMIG_GUEST_MAX_VCPUS];
	uint64_t *prev_gen[VMIG_GUEST_MAX_VCPUS];
	uint64_t iteration;
	unsigned int running_syncs;       /* syncs while the guest ran, in all */
	uint64_t slot1_dirty;             /* work pages above 4 GiB reported, in all */
	uint64_t unwritten_checked;       /* work pages not written in their iteration */
	uint64_t late;                    /* pages written across a pause (stamp i - 1) */
	uint64_t in_progress[VMIG_GUEST_MAX_VCPUS];   /* work page at the last pause */
};

struct verdict {
	uint64_t lost, spurious, written, reported;
	uint64_t late;                    /* written in i with stamp i - 1 */
	uint64_t boundary;                /* reported with a stamp other than i */
	char first_bad[512];
};

static const struct vmig_guest_stamp *stamp_at(struct harness *h, uint64_t gpa)
{
	const struct vmig_guest_stamp *s = vmig_vm_gpa_to_hva(h->vm, gpa, PAGE);

	if (!s)
		ck_abort_msg("work page gpa 0x%" PRIx64 " outside RAM", gpa);
	return s;
}

/* Work pages of vCPU v that may have been written: generation 1 stops at the cursor. */
static uint64_t written_span(struct harness *h, unsigned int v)
{
	const volatile struct vmig_guest_status *st = status(h->vm);
	uint64_t gen = st->vcpu[v].generation, cur = st->vcpu[v].cursor;

	if (gen <= 1)
		return cur + 1 < h->n[v] ? cur + 1 : h->n[v];
	return h->n[v];
}

/* Work page index of @gpa, or UINT64_MAX below the work pages. */
static uint64_t work_index(struct harness *h, uint64_t gpa)
{
	uint64_t nr_low = (h->low_end - VMIG_GUEST_WS_START) / PAGE;

	if (gpa < VMIG_GUEST_WS_START)
		return UINT64_MAX;
	if (gpa < h->low_end)
		return (gpa - VMIG_GUEST_WS_START) / PAGE;
	return nr_low + (gpa - VMIG_GUEST_HIGH_START) / PAGE;
}

/* The work page vCPU @v is writing or about to write (guest paused). */
static uint64_t cursor_page(struct harness *h, unsigned int v)
{
	uint64_t c = status(h->vm)->vcpu[v].cursor;

	return c < h->n[v] ? h->first[v] + c : UINT64_MAX;
}

/* Was work page @w being written by some vCPU when it was last paused? */
static bool was_in_progress(struct harness *h, uint64_t w)
{
	unsigned int v;

	for (v = 0; v < h->vcpus; v++)
		if (w == h->in_progress[v])
			return true;
	return false;
}

/* Is work page @w being written by some vCPU now (guest paused)? */
static bool is_in_progress(struct harness *h, uint64_t w)
{
	unsigned int v;

	for (v = 0; v < h->vcpus; v++)
		if (w == cursor_page(h, v))
			return true;
	return false;
}

static void note_in_progress(struct harness *h)
{
	unsigned int v;

	for (v = 0; v < h->vcpus; v++)
		h->in_progress[v] = cursor_page(h, v);
}

/*
 * The guest is paused.  Compare h->dirty with the stamps.
 *
 * Per page the guest reads the old stamp and host_iteration, stores the
 * stamp's words (magic first: the same value every generation), then
 * moves its cursor.  A pause can fall anywhere in that sequence, so two
 * pages per vCPU have a stamp that does not tell when they were written:
 *   - the page it was writing at the previous pause: the stores left
 *     landed in iteration i with the iteration read before the pause, so
 *     it may say i - 1, even with the generation it had at that pause;
 *   - the page it is writing now: the magic may already be stored again
 *     (a real write, so KVM reports it) with the rest still old, any
 *     iteration; or its first store faulted, and KVM logs the page in
 *     the write fault, before the store retires, so even a page never
 *     written (all zero) may be reported.
 * Those pages, and only they, are exempt from "stamp says i".
 */
static void verify(struct harness *h, struct verdict *vd, bool update)
{
	uint64_t i = h->iteration, k, p;
	unsigned int v;

	memset(vd, 0, sizeof(*vd));
	/* Nothing spurious, over all work pages (before prev_gen moves on). */
	for (p = vmig_bitmap_next_set(&h->dirty, 0); p < h->nr_pages;
	     p = vmig_bitmap_next_set(&h->dirty, p + 1)) {
		uint64_t gpa = vmig_dirtylog_page_gpa(h->dl, p);
		const struct vmig_guest_stamp *s;
		bool ok;

		if (gpa == UINT64_MAX)
			ck_abort_msg("page %" PRIu64 " reported but has no gpa", p);
		if (gpa < VMIG_GUEST_WS_START)
			continue;
		vd->reported++;
		if (gpa >= VMIG_VM_HIGH_RAM_START)
			h->slot1_dirty++;
		s = stamp_at(h, gpa);
		ok = (s->magic == (VMIG_GUEST_STAMP_MAGIC ^ gpa) &&
		      (s->iteration == i ||
		       (s->iteration + 1 == i && was_in_progress(h, work_index(h, gpa))))) ||
			is_in_progress(h, work_index(h, gpa));
		if (ok && s->iteration != i)
			vd->boundary++;
		if (!ok && !vd->spurious++)
			snprintf(vd->first_bad, sizeof(vd->first_bad),
				 "SPURIOUS: iteration %" PRIu64 ": page %" PRIu64 " (gpa 0x%"
				 PRIx64 ", work page %" PRIu64 ") reported dirty but its stamp "
				 "says iteration %" PRIu64 ", generation %" PRIu64 ", magic %s "
				 "(pages being written at the last pause: %" PRId64 " %" PRId64
				 " %" PRId64 " %" PRId64 ")",
				 i, p, gpa, work_index(h, gpa), (uint64_t)s->iteration,
				 (uint64_t)s->generation,
				 s->magic == (VMIG_GUEST_STAMP_MAGIC ^ gpa) ? "ok" : "none",
				 (int64_t)h->in_progress[0], (int64_t)h->in_progress[1],
				 (int64_t)h->in_progress[2], (int64_t)h->in_progress[3]);
	}
	/* No page lost. */
	for (v = 0; v < h->vcpus; v++) {
		uint64_t span = written_span(h, v);

		for (k = 0; k < span; k++) {
			uint64_t gpa = vmig_guest_page_gpa(h->low_end, h->first[v] + k);
			const struct vmig_guest_stamp *s = stamp_at(h, gpa);
			uint64_t gen = s->generation, it = s->iteration;
			bool changed = gen != h->prev_gen[v][k];

			p = vmig_dirtylog_gpa_page(h->dl, gpa);
			if (p == UINT64_MAX)
				ck_abort_msg("work page gpa 0x%" PRIx64 " has no page number", gpa);
			if (it == i || changed) {
				vd->written++;
				if (it != i)
					vd->late++;
				if (!vmig_bitmap_test(&h->dirty, p) && !vd->lost++)
					snprintf(vd->first_bad, sizeof(vd->first_bad),
						 "LOST: iteration %" PRIu64 ": vCPU %u work page %"
						 PRIu64 " (gpa 0x%" PRIx64 ", page %" PRIu64
						 ") has stamp iteration %" PRIu64 ", generation %"
						 PRIu64 " (was %" PRIu64 ") but is not in the dirty set",
						 i, v, k, gpa, p, it, gen, h->prev_gen[v][k]);
				if (it != i && !(it + 1 == i &&
						 was_in_progress(h, h->first[v] + k)) && !vd->lost++)
					snprintf(vd->first_bad, sizeof(vd->first_bad),
						 "iteration %" PRIu64 ": vCPU %u work page %" PRIu64
						 " (gpa 0x%" PRIx64 ") changed generation %" PRIu64
						 " -> %" PRIu64 " but holds iteration %" PRIu64
						 " (vCPU at generation %" PRIu64 ", cursor %" PRIu64
						 "; page being written at the last pause %" PRId64 ")",
						 i, v, k, gpa, h->prev_gen[v][k], gen, it,
						 (uint64_t)status(h->vm)->vcpu[v].generation,
						 (uint64_t)status(h->vm)->vcpu[v].cursor,
						 (int64_t)h->in_progress[v] - (int64_t)h->first[v]);
			} else {
				h->unwritten_checked++;
			}
			if (update)
				h->prev_gen[v][k] = gen;
		}
	}
	if (update) {
		note_in_progress(h);
		h->late += vd->late;
	}
}

static void h_init(struct harness *h, struct vmig_vm *vm, enum vmig_dirtylog_mode mode,
		   unsigned int vcpus)
{
	const volatile struct vmig_guest_status *st = status(vm);
	unsigned int v;

	memset(h, 0, sizeof(*h));
	h->vm = vm;
	h->mode = mode;
	h->vcpus = vcpus;
	wait_running(vm, vcpus, 120000);   /* the guest clears its working set first */
	h->low_end = st->low_end;
	for (v = 0; v < vcpus; v++) {
		h->first[v] = st->vcpu[v].first_page;
		h->n[v] = st->vcpu[v].nr_pages;
		h->prev_gen[v] = calloc(h->n[v] ? h->n[v] : 1, sizeof(uint64_t));
		ck_assert_ptr_nonnull(h->prev_gen[v]);
	}
	h->dl = make_dl(vm, mode);
	h->nr_pages = vmig_dirtylog_nr_pages(h->dl);
	ck_assert_int_eq(vmig_bitmap_init(&h->dirty, h->nr_pages), 0);
}

static void h_fini(struct harness *h)
{
	unsigned int v;

	vmig_dirtylog_destroy(h->dl);
	vmig_vm_destroy(h->vm);
	vmig_bitmap_fini(&h->dirty);
	for (v = 0; v < h->vcpus; v++)
		free(h->prev_gen[v]);
}

/* Record every work page's generation (guest paused). */
static void snapshot(struct harness *h)
{
	unsigned int v;
	uint64_t k;

	for (v = 0; v < h->vcpus; v++) {
		uint64_t span = written_span(h, v);

		for (k = 0; k < span; k++)
			h->prev_gen[v][k] = stamp_at(h, vmig_guest_page_gpa(h->low_end,
									h->first[v] + k))->generation;
	}
	note_in_progress(h);
}

/*
 * Guest running.  Pause, start tracking, take the first sync: nothing
 * was written since start, so only bitmap-clear with INITIALLY_SET may
 * report anything, and then it reports every page.  Send it all
 * (clear).  The guest stays paused.
 */
static void h_start(struct harness *h)
{
	struct vmig_dirtylog_plan plan;
	uint64_t cnt;

	ck_assert_int_eq(vmig_vm_pause(h->vm), 0);
	snapshot(h);
	dl_start(h->dl);
	vmig_bitmap_clear_all(&h->dirty);
	dl_sync(h->dl, &h->dirty);
	cnt = vmig_bitmap_count(&h->dirty);
	ck_assert_int_eq(vmig_dirtylog_probe(h->mode, 0, &plan, NULL), 0);
	if (h->mode == VMIG_DIRTYLOG_BITMAP_CLEAR && plan.initially_set)
		ck_assert_msg(cnt == h->nr_pages, "INITIALLY_SET: first sync reported %" PRIu64
			      " of %" PRIu64 " pages", cnt, h->nr_pages);
	else
		ck_assert_msg(cnt == 0, "paused guest: first sync after start reported %"
			      PRIu64 " pages", cnt);
	dl_clear_all(h->dl);
	vmig_bitmap_clear_all(&h->dirty);
}

/* Pages each vCPU wrote in all. */
static void pages_written(struct harness *h, uint64_t *out)
{
	const volatile struct vmig_guest_status *st = status(h->vm);
	unsigned int v;

	for (v = 0; v < h->vcpus; v++)
		out[v] = st->vcpu[v].pages_written;
}

/*
 * One iteration, from paused to paused: set it, resume, sync every
 * @sync_ms while running until every vCPU wrote @target pages (or
 * @max_ms passed), pause, final sync, verify.
 */
static void h_iterate(struct harness *h, uint64_t target, unsigned int sync_ms,
		      unsigned int max_ms)
{
	uint64_t start[VMIG_GUEST_MAX_VCPUS], now[VMIG_GUEST_MAX_VCPUS];
	uint64_t t0, last_sync;
	struct verdict vd;
	unsigned int v;
	bool done;

	h->iteration++;
	ck_assert_int_eq(vmig_guest_set_iteration(h->vm, h->iteration), 0);
	pages_written(h, start);
	ck_assert_int_eq(vmig_vm_resume(h->vm), 0);
	t0 = last_sync = kvm_test_now_ms();
	do {
		kvm_test_sleep_ms(1);
		pages_written(h, now);
		done = true;
		for (v = 0; v < h->vcpus; v++)
			done = done && now[v] - start[v] >= target;
		if (sync_ms && kvm_test_now_ms() - last_sync >= sync_ms) {
			dl_sync(h->dl, &h->dirty);
			/* A sender would now clear and send what it got. */
			dl_clear_all(h->dl);
			h->running_syncs++;
			last_sync = kvm_test_now_ms();
		}
	} while (!done && kvm_test_now_ms() - t0 < max_ms);
	ck_assert_int_eq(vmig_vm_pause(h->vm), 0);
	ck_assert_msg(vmig_vm_state(h->vm) == VMIG_VM_PAUSED, "VM stopped: %s",
		      vmig_vm_stop_reason(h->vm));
	dl_sync(h->dl, &h->dirty);

	verify(h, &vd, true);
	if (vd.lost || vd.spurious) {
		struct vmig_dirtylog_stats st;

		vmig_dirtylog_get_stats(h->dl, &st);
		ck_abort_msg("mode %s: %" PRIu64 " lost, %" PRIu64 " spurious of %" PRIu64
			     " written / %" PRIu64 " reported; %s [log: %" PRIu64 " syncs, %"
			     PRIu64 " ring-full, %" PRIu64 " resets, %" PRIu64 " short]",
			     vmig_dirtylog_mode_name(h->mode), vd.lost, vd.spurious, vd.written,
			     vd.reported, vd.first_bad, st.syncs, st.ring_full, st.ring_resets,
			     st.ring_short_resets);
	}
	ck_assert_msg(vd.written > 0, "iteration %" PRIu64 ": the guest wrote nothing",
		      h->iteration);

	dl_clear_all(h->dl);
	vmig_bitmap_clear_all(&h->dirty);
}

/* The checker catches a dropped page and a spurious one. */
static void h_check_the_checker(struct harness *h)
{
	uint64_t p, q, gpa;
	struct verdict vd;

	uint64_t start[VMIG_GUEST_MAX_VCPUS], now[VMIG_GUEST_MAX_VCPUS], t0;
	unsigned int v;
	bool done;

	/* Same as h_iterate up to verify (no syncs while running), then tamper. */
	h->iteration++;
	vmig_guest_set_iteration(h->vm, h->iteration);
	pages_written(h, start);
	ck_assert_int_eq(vmig_vm_resume(h->vm), 0);
	t0 = kvm_test_now_ms();
	do {
		kvm_test_sleep_ms(2);
		pages_written(h, now);
		for (done = true, v = 0; v < h->vcpus; v++)
			done = done && now[v] - start[v] >= 64;
	} while (!done && kvm_test_now_ms() - t0 < 10000);
	ck_assert_int_eq(vmig_vm_pause(h->vm), 0);
	dl_sync(h->dl, &h->dirty);
	verify(h, &vd, false);
	ck_assert_msg(vd.lost == 0 && vd.spurious == 0, "%s", vd.first_bad);

	/*
	 * Drop a reported work page the guest wrote in this iteration: the
	 * checker must call it lost.  (A reported page may also be one the
	 * log reports again without a new write -- harmless, and dropping it
	 * loses nothing -- so try the reported ones until one was written.)
	 */
	q = 0;
	for (p = vmig_bitmap_next_set(&h->dirty, 0); p < h->nr_pages;
	     p = vmig_bitmap_next_set(&h->dirty, p + 1)) {
		if (vmig_dirtylog_page_gpa(h->dl, p) < VMIG_GUEST_WS_START)
			continue;
		q++;
		vmig_bitmap_clear(&h->dirty, p);
		verify(h, &vd, false);
		vmig_bitmap_set(&h->dirty, p);
		ck_assert_msg(vd.spurious == 0 && vd.lost <= 1, "dropping page %" PRIu64 ": %"
			      PRIu64 " lost, %" PRIu64 " spurious", p, vd.lost, vd.spurious);
		if (vd.lost == 1)
			break;
	}
	ck_assert_msg(q > 0, "no work page reported at all");
	ck_assert_msg(p < h->nr_pages, "dropping each of the %" PRIu64 " reported work pages "
		      "went unnoticed", q);

	/* The last page of RAM: never a work page anyone writes here. */
	q = h->nr_pages - 1;
	gpa = vmig_dirtylog_page_gpa(h->dl, q);
	ck_assert_uint_ge(gpa, VMIG_GUEST_WS_START);
	vmig_bitmap_set(&h->dirty, q);
	verify(h, &vd, false);
	ck_assert_msg(vd.lost == 0 && vd.spurious == 1, "adding page %" PRIu64 ": %" PRIu64
		      " lost, %" PRIu64 " spurious", q, vd.lost, vd.spurious);
	vmig_bitmap_clear(&h->dirty, q);

	verify(h, &vd, true);    /* take this iteration as done */
	dl_clear_all(h->dl);
	vmig_bitmap_clear_all(&h->dirty);
}

/* ------------------------------------------------------------------ */
/* KVM cases, each run once per mode (_i is the mode's index). */

/* Several vCPUs, several iterations with syncs while running. */
START_TEST(iterations_lose_nothing)
{
	enum vmig_dirtylog_mode mode = modes[_i];
	struct vmig_dirtylog_plan plan;
	struct harness h;
	unsigned int it;

	if (!plan_mode(mode, 0, &plan))
		return;
	/* 4 vCPUs x 32 MiB: a third of a working set is ~2700 pages. */
	h_init(&h, make_vm(256 << 20, 4, "rate=max,wss=32M,quiet", plan.ring_entries, true),
	       mode, 4);
	h_start(&h);
	h_check_the_checker(&h);
	for (it = 0; it < 8; it++)
		h_iterate(&h, h.n[0] / 3, 4, 5000);
	ck_assert_msg(h.running_syncs >= 8, "only %u syncs while running", h.running_syncs);
	ck_assert_msg(h.unwritten_checked > 0, "every work page was written in every "
		      "iteration: the spurious check had nothing to catch");
	printf("%s: %" PRIu64 " iterations, %u syncs while running, %" PRIu64
	       " unwritten page checks, %" PRIu64 " writes across a pause\n",
	       vmig_dirtylog_mode_name(mode), h.iteration, h.running_syncs,
	       h.unwritten_checked, h.late);
	h_fini(&h);
}
END_TEST

/* A ring of the smallest size KVM takes: it fills again and again. */
START_TEST(ring_full_loses_nothing)
{
	static const uint32_t sizes[] = { 256, 512, 1024, 2048 };
	struct vmig_dirtylog_stats stats;
	struct vmig_dirtylog_plan plan;
	struct vmig_vm_config cfg = {
		.name = "ringfull", .mem_size = 64 << 20, .nr_vcpus = 2,
		.workload = "rate=max,wss=8M,quiet", .console_fd = -1,
	};
	struct vmig_err err = { 0 };
	struct vmig_vm *vm = NULL;
	struct harness h;
	unsigned int i, it;
	int ret = -1;

	if (!plan_mode(VMIG_DIRTYLOG_RING, 0, &plan))
		return;
	/* Below 1024 entries KVM refuses a ring on hosts with Intel PML. */
	for (i = 0; i < sizeof(sizes) / sizeof(sizes[0]) && ret; i++) {
		cfg.dirty_ring_entries = sizes[i];
		vmig_err_clear(&err);
		ret = vmig_vm_create(&cfg, &vm, &err);
	}
	ck_assert_msg(ret == 0, "no small ring: %s", err.msg);
	ck_assert_int_eq(vmig_vm_start(vm, &err), 0);
	h_init(&h, vm, VMIG_DIRTYLOG_RING, 2);
	h_start(&h);
	/* No syncs while running: only the ring-full handler empties them. */
	for (it = 0; it < 5; it++)
		h_iterate(&h, h.n[0] / 3, 0, 5000);
	vmig_dirtylog_get_stats(h.dl, &stats);
	printf("ring of %u entries: %" PRIu64 " ring-full exits, %" PRIu64 " entries, %"
	       PRIu64 " short resets\n", cfg.dirty_ring_entries, stats.ring_full,
	       stats.ring_harvested, stats.ring_short_resets);
	ck_assert_msg(stats.ring_full > 0, "a ring of %u entries never filled (%" PRIu64
		      " entries harvested)", cfg.dirty_ring_entries, stats.ring_harvested);
	/* And with syncs racing the handler. */
	for (it = 0; it < 3; it++)
		h_iterate(&h, h.n[0] / 3, 2, 5000);
	/*
	 * A reset cut short leaves pages unprotected (Linux >= 6.16 on a
	 * pending signal): the pause kicks hit handlers, so this would happen
	 * without the signal blocking in ring.c.
	 */
	vmig_dirtylog_get_stats(h.dl, &stats);
	ck_assert_msg(stats.ring_short_resets == 0, "%" PRIu64 " of %" PRIu64 " resets came "
		      "back short", stats.ring_short_resets, stats.ring_resets);
	h_fini(&h);
}
END_TEST

/*
 * Two slots, with the guest writing in both: 3 GiB below the PCI hole and
 * 64 MiB above 4 GiB.  The guest's work pages run linearly over both and
 * vCPU k's working set starts at k * wss, so the cheapest layout that has
 * the guest write above 4 GiB is 2 vCPUs each owning half: vCPU 1's set
 * ends above 4 GiB.  The guest clears its whole working set at boot, so
 * this costs touching ~3 GiB (10-30 s here): it runs for the mode AUTO
 * picks on this host, and for all three with VMIG_TEST_SLOW=1.  The other
 * modes' slot-1 arithmetic is checked more cheaply: bitmap-clear's
 * INITIALLY_SET report of both slots in marks_and_numbering (the same
 * GET_DIRTY_LOG path as bitmap), and the ring's in unit_ring_harvest.
 */
START_TEST(two_slots_lose_nothing)
{
	enum vmig_dirtylog_mode mode = modes[_i];
	struct vmig_dirtylog_plan plan, best;
	struct harness h;
	uint64_t t0, mem = (3ull << 30) + (64ull << 20), nr_low;
	/* Work pages: 3 GiB - 4 MiB low + 64 MiB high; half each, 2 MiB aligned. */
	uint64_t wss = (mem - VMIG_GUEST_WS_START) / 2 & ~((2ull << 20) - 1);
	const struct vmig_mem_region *r;
	const char *slow = getenv("VMIG_TEST_SLOW");
	char workload[64];

	if (!plan_mode(mode, 0, &plan))
		return;
	ck_assert_int_eq(vmig_dirtylog_probe(VMIG_DIRTYLOG_AUTO, 0, &best, NULL), 0);
	if (mode != best.mode && !(slow && *slow && strcmp(slow, "0"))) {
		printf("SKIP: two slots, mode %s: touches 3 GiB; run for %s (auto) only "
		       "unless VMIG_TEST_SLOW=1\n", vmig_dirtylog_mode_name(mode),
		       vmig_dirtylog_mode_name(best.mode));
		return;
	}
	snprintf(workload, sizeof(workload), "rate=max,wss=%" PRIu64 "M,quiet", wss >> 20);
	h_init(&h, make_vm(mem, 2, workload, plan.ring_entries, true), mode, 2);
	ck_assert_uint_eq(vmig_vm_regions(h.vm, &r), 2);
	ck_assert_uint_eq(h.nr_pages, mem / PAGE);
	ck_assert_uint_eq(vmig_dirtylog_gpa_page(h.dl, VMIG_VM_HIGH_RAM_START),
			  VMIG_VM_LOW_RAM_END / PAGE);
	nr_low = (h.low_end - VMIG_GUEST_WS_START) / PAGE;
	ck_assert_msg(h.first[1] + h.n[1] > nr_low + 8192, "vCPU 1's working set should "
		      "reach 32 MiB above 4 GiB: work pages %" PRIu64 "+%" PRIu64 ", %" PRIu64
		      " below 4 GiB", h.first[1], h.n[1], nr_low);
	h_start(&h);
	/* Until vCPU 1 wrote well above 4 GiB, and one iteration more. */
	t0 = kvm_test_now_ms();
	while (h.slot1_dirty < 8192 || h.iteration < 3) {
		h_iterate(&h, h.n[1] / 4, 20, 20000);
		ck_assert_msg(kvm_test_now_ms() - t0 < 120000, "vCPU 1 did not get above "
			      "4 GiB in 120 s (cursor %" PRIu64 " of %" PRIu64 ")",
			      (uint64_t)status(h.vm)->vcpu[1].cursor, h.n[1]);
	}
	h_iterate(&h, 8192, 20, 20000);
	printf("%s: two slots: %" PRIu64 " iterations, %" PRIu64 " reports above 4 GiB, "
	       "%.1f s\n", vmig_dirtylog_mode_name(mode), h.iteration, h.slot1_dirty,
	       (kvm_test_now_ms() - t0) / 1000.0);
	h_fini(&h);
}
END_TEST

/* Start, stop, start again; then a second dirty log on the same VM. */
START_TEST(start_stop_start)
{
	enum vmig_dirtylog_mode mode = modes[_i];
	struct vmig_dirtylog_plan plan;
	struct vmig_err err = { 0 };
	struct harness h;
	int round;

	if (!plan_mode(mode, 0, &plan))
		return;
	h_init(&h, make_vm(64 << 20, 2, "rate=max,wss=8M,quiet", plan.ring_entries, true),
	       mode, 2);
	for (round = 0; round < 3; round++) {
		h_start(&h);
		h_iterate(&h, h.n[0] / 3, 3, 5000);
		h_iterate(&h, h.n[0] / 3, 3, 5000);
		ck_assert_int_eq(vmig_dirtylog_start(h.dl, &err), -EALREADY);
		/* Stop while the guest runs and writes. */
		ck_assert_int_eq(vmig_vm_resume(h.vm), 0);
		kvm_test_sleep_ms(10);
		vmig_err_clear(&err);
		ck_assert_msg(vmig_dirtylog_stop(h.dl, &err) == 0, "stop: %s", err.msg);
		ck_assert_int_eq(vmig_dirtylog_stop(h.dl, &err), 0);   /* idempotent */
		vmig_err_clear(&err);
		ck_assert_int_eq(vmig_dirtylog_sync(h.dl, &h.dirty, &err), -EINVAL);
		ck_assert_msg(strstr(err.msg, "not on"), "%s", err.msg);
		kvm_test_sleep_ms(30);     /* untracked writes: must not show up later */
		if (round == 1) {
			/* A new dirty log on the same VM: a cancelled migration retried. */
			vmig_dirtylog_destroy(h.dl);
			ck_assert_int_eq(vmig_vm_state(h.vm), VMIG_VM_RUNNING);
			h.dl = make_dl(h.vm, mode);
		}
	}
	h_fini(&h);
}
END_TEST

/*
 * A 5 GiB VM that never runs: modes refused with their reason, marks
 * over both slots, page numbering, and for bitmap-clear the INITIALLY_SET
 * report of every page of both slots.
 */
START_TEST(marks_and_numbering)
{
	enum vmig_dirtylog_mode mode = modes[_i], other;
	struct vmig_dirtylog_plan plan;
	struct vmig_dirtylog_stats stats;
	struct vmig_dirtylog *dl, *bad = NULL;
	struct vmig_err err = { 0 };
	const struct vmig_mem_region *r;
	struct vmig_bitmap b;
	struct vmig_vm *vm;
	uint64_t np, p, low_pages = VMIG_VM_LOW_RAM_END / PAGE, want;
	unsigned int i;

	if (!plan_mode(mode, 0, &plan))
		return;
	vm = make_vm(5ull << 30, 1, "rate=max,wss=1M,quiet", plan.ring_entries, false);
	ck_assert_uint_eq(vmig_vm_regions(vm, &r), 2);

	/* The other kind of VM is refused, with the reason. */
	other = mode == VMIG_DIRTYLOG_RING ? VMIG_DIRTYLOG_BITMAP : VMIG_DIRTYLOG_RING;
	ck_assert_int_eq(vmig_dirtylog_create(vm, other, &bad, &err), -ENOTSUP);
	ck_assert_ptr_null(bad);
	ck_assert_msg(strstr(err.msg, "ring"), "reason: %s", err.msg);

	dl = make_dl(vm, mode);
	np = vmig_dirtylog_nr_pages(dl);
	ck_assert_uint_eq(np, (5ull << 30) / PAGE);
	for (p = 0; p < np; p += 4099) {
		uint64_t gpa = vmig_dirtylog_page_gpa(dl, p);
		uint64_t expect = p < low_pages ? p * PAGE :
			VMIG_VM_HIGH_RAM_START + (p - low_pages) * PAGE;

		ck_assert_msg(gpa == expect, "page %" PRIu64 ": gpa 0x%" PRIx64 ", want 0x%"
			      PRIx64, p, gpa, expect);
		ck_assert_uint_eq(vmig_dirtylog_gpa_page(dl, gpa + 123), p);
	}
	ck_assert_uint_eq(vmig_dirtylog_page_gpa(dl, np), UINT64_MAX);
	ck_assert_uint_eq(vmig_dirtylog_page_gpa(dl, low_pages), VMIG_VM_HIGH_RAM_START);
	ck_assert_uint_eq(vmig_dirtylog_gpa_page(dl, VMIG_VM_LOW_RAM_END), UINT64_MAX);
	ck_assert_uint_eq(vmig_dirtylog_gpa_page(dl, VMIG_VM_HIGH_RAM_START - 1), UINT64_MAX);
	ck_assert_uint_eq(vmig_dirtylog_gpa_page(dl, (5ull << 30) + (1ull << 30)), UINT64_MAX);

	ck_assert_int_eq(vmig_bitmap_init(&b, np), 0);
	ck_assert_int_eq(vmig_dirtylog_sync(dl, &b, &err), -EINVAL);   /* not started */
	vmig_dirtylog_mark(dl, 0x200000, PAGE);     /* before start: dropped */
	dl_start(dl);
	dl_sync(dl, &b);
	if (mode == VMIG_DIRTYLOG_BITMAP_CLEAR && plan.initially_set) {
		/* KVM's all-ones bitmaps, both slots, land on every page. */
		ck_assert_uint_eq(vmig_bitmap_count(&b), np);
		/* Clear all but a few pages at odd places, then see them again. */
		ck_assert_int_eq(vmig_dirtylog_clear(dl, 0, 777, &err), 0);
		ck_assert_int_eq(vmig_dirtylog_clear(dl, 780, low_pages + 5 - 780, &err), 0);
		ck_assert_int_eq(vmig_dirtylog_clear(dl, low_pages + 6, np - low_pages - 7, &err), 0);
		vmig_bitmap_clear_all(&b);
		dl_sync(dl, &b);
		ck_assert_uint_eq(vmig_bitmap_count(&b), 5);
		ck_assert(vmig_bitmap_test(&b, 777) && vmig_bitmap_test(&b, 778) &&
			  vmig_bitmap_test(&b, 779) && vmig_bitmap_test(&b, low_pages + 5) &&
			  vmig_bitmap_test(&b, np - 1));
		dl_clear_all(dl);
		vmig_dirtylog_get_stats(dl, &stats);
		ck_assert_uint_eq(stats.pages_cleared, np);
		vmig_bitmap_clear_all(&b);
		dl_sync(dl, &b);
	}
	ck_assert_uint_eq(vmig_bitmap_count(&b), 0);

	/* Marks: across the slot boundary, partial pages, the hole, the end. */
	vmig_dirtylog_mark(dl, VMIG_VM_LOW_RAM_END - PAGE - 1, 2);             /* 2 pages */
	vmig_dirtylog_mark(dl, VMIG_VM_LOW_RAM_END - 10, VMIG_VM_HIGH_RAM_START -
			   VMIG_VM_LOW_RAM_END + 20);    /* last low page, hole, first high */
	vmig_dirtylog_mark(dl, (5ull << 30) + VMIG_VM_HIGH_RAM_START - VMIG_VM_LOW_RAM_END - 1,
			   UINT64_MAX);                  /* last page, then past the end */
	vmig_dirtylog_mark(dl, 0xd0000000, PAGE);    /* MMIO hole only */
	vmig_dirtylog_mark(dl, 5 * PAGE, 0);         /* nothing */
	vmig_dirtylog_mark(dl, 7 * PAGE + 100, 3 * PAGE);   /* pages 7..10 */
	dl_sync(dl, &b);
	want = 0;
	{
		const uint64_t expect[] = { low_pages - 2, low_pages - 1, low_pages, np - 1,
					    7, 8, 9, 10 };

		for (i = 0; i < sizeof(expect) / sizeof(expect[0]); i++)
			ck_assert_msg(vmig_bitmap_test(&b, expect[i]), "page %" PRIu64
				      " not marked", expect[i]);
		want = sizeof(expect) / sizeof(expect[0]);
	}
	ck_assert_uint_eq(vmig_bitmap_count(&b), want);
	vmig_bitmap_clear_all(&b);
	dl_sync(dl, &b);
	ck_assert_uint_eq(vmig_bitmap_count(&b), 0);   /* handed over once */
	vmig_dirtylog_get_stats(dl, &stats);
	ck_assert_uint_eq(stats.marks, 6);   /* the empty one is not counted */

	/* A bitmap too small for RAM. */
	{
		struct vmig_bitmap small;

		ck_assert_int_eq(vmig_bitmap_init(&small, np - 1), 0);
		ck_assert_int_eq(vmig_dirtylog_sync(dl, &small, &err), -EINVAL);
		vmig_bitmap_fini(&small);
	}
	ck_assert_int_eq(vmig_dirtylog_clear(dl, np, 1, &err), -EINVAL);
	vmig_bitmap_fini(&b);
	vmig_dirtylog_destroy(dl);
	vmig_dirtylog_destroy(NULL);
	vmig_vm_destroy(vm);
}
END_TEST

/* A ring VM destroyed while its guest fills the ring: no crash, no leak of threads. */
START_TEST(destroy_while_filling)
{
	const volatile struct vmig_guest_status *st;
	struct vmig_dirtylog_plan plan;
	struct vmig_bitmap b;
	struct vmig_dirtylog *dl;
	struct vmig_vm *vm;
	uint64_t t0, w0;
	int round;

	if (!plan_mode(VMIG_DIRTYLOG_RING, 1024, &plan))
		return;
	vm = make_vm(64 << 20, 2, "rate=max,wss=16M,quiet", plan.ring_entries, true);
	wait_running(vm, 2, 60000);
	st = status(vm);
	for (round = 0; round < 5; round++) {
		dl = make_dl(vm, VMIG_DIRTYLOG_RING);
		ck_assert_int_eq(vmig_bitmap_init(&b, vmig_dirtylog_nr_pages(dl)), 0);
		dl_start(dl);
		/* Until the guest wrote something tracked, however loaded the host. */
		for (t0 = kvm_test_now_ms(), w0 = st->vcpu[0].pages_written;
		     st->vcpu[0].pages_written - w0 < 256 && kvm_test_now_ms() - t0 < 10000;)
			kvm_test_sleep_ms(2);
		dl_sync(dl, &b);
		kvm_test_sleep_ms(20);
		ck_assert_msg(vmig_bitmap_count(&b) > 0, "round %d: nothing dirty", round);
		vmig_dirtylog_destroy(dl);      /* tracking on, rings filling */
		vmig_bitmap_fini(&b);
		ck_assert_msg(vmig_vm_state(vm) == VMIG_VM_RUNNING, "round %d: VM %s: %s", round,
			      vmig_vm_state_name(vmig_vm_state(vm)), vmig_vm_stop_reason(vm));
	}
	vmig_vm_destroy(vm);
}
END_TEST

START_TEST(probe_plans)
{
	struct vmig_dirtylog_plan plan, p2;
	struct vmig_err err = { 0 };

	if (!have_kvm) {
		printf("SKIP: cannot open /dev/kvm\n");
		return;
	}
	ck_assert_int_eq(vmig_dirtylog_probe(VMIG_DIRTYLOG_AUTO, 0, &plan, &err), 0);
	ck_assert_int_ne(plan.mode, VMIG_DIRTYLOG_AUTO);
	printf("this host: auto = %s, clear %d (initially set %d), ring %d (acq_rel %d, max %u)\n",
	       vmig_dirtylog_mode_name(plan.mode), plan.clear_available, plan.initially_set,
	       plan.ring_available, plan.ring_acq_rel, plan.ring_max_entries);
	if (plan.ring_available) {
		ck_assert_int_eq(plan.mode, VMIG_DIRTYLOG_RING);
		ck_assert_uint_eq(plan.ring_entries, VMIG_DIRTYLOG_RING_DEFAULT <= plan.ring_max_entries ?
				  VMIG_DIRTYLOG_RING_DEFAULT : plan.ring_max_entries);
		ck_assert_int_eq(vmig_dirtylog_probe(VMIG_DIRTYLOG_RING, 3000, &p2, &err), 0);
		ck_assert_uint_eq(p2.ring_entries, 2048);
		ck_assert_int_eq(vmig_dirtylog_probe(VMIG_DIRTYLOG_RING, UINT32_MAX, &p2, &err), 0);
		ck_assert_uint_eq(p2.ring_entries, plan.ring_max_entries);
	}
	ck_assert_int_eq(vmig_dirtylog_probe(VMIG_DIRTYLOG_BITMAP, 0, &p2, &err), 0);
	ck_assert_uint_eq(p2.ring_entries, 0);
	ck_assert_int_eq(vmig_dirtylog_probe((enum vmig_dirtylog_mode)9, 0, &p2, &err), -EINVAL);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("dirtylog");
	TCase *unit = tcase_create("unit");
	TCase *iter = tcase_create("iterations");
	TCase *big = tcase_create("two-slots");
	TCase *life = tcase_create("lifecycle");
	int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC), ret;

	have_kvm = fd >= 0;
	if (fd >= 0)
		close(fd);

	/* KVM-free: the clear and ring arithmetic, mode names, the probe. */
	tcase_set_timeout(unit, 60);
	tcase_add_test(unit, unit_clear_alignment);
	tcase_add_test(unit, unit_clear_failure_keeps_bits);
	tcase_add_test(unit, unit_ring_harvest);
	tcase_add_test(unit, unit_mode_names);
	tcase_add_test(unit, probe_plans);
	suite_add_tcase(s, unit);
	if (!have_kvm) {
		printf("SKIP: cannot open /dev/kvm (%s): only the unit cases ran\n",
		       strerror(errno));
		ret = kvm_test_run(s);
		return ret == EXIT_SUCCESS ? SKIP_EXIT : ret;
	}

	tcase_set_timeout(iter, 90);
	tcase_add_loop_test(iter, iterations_lose_nothing, 0, NR_MODES);
	tcase_add_test(iter, ring_full_loses_nothing);
	suite_add_tcase(s, iter);

	tcase_set_timeout(big, 240);
	tcase_add_loop_test(big, two_slots_lose_nothing, 0, NR_MODES);
	suite_add_tcase(s, big);

	tcase_set_timeout(life, 90);
	tcase_add_loop_test(life, start_stop_start, 0, NR_MODES);
	tcase_add_loop_test(life, marks_and_numbering, 0, NR_MODES);
	tcase_add_test(life, destroy_while_filling);
	suite_add_tcase(s, life);
	return kvm_test_run(s);
}
