/*
 * The contract between vmig and its built-in test guest.
 *
 * The guest (tests/guest/) is a multiboot v1 ELF that vmig and QEMU both
 * boot.  It does a minimal set-up in ring 0, then each vCPU runs a ring-3
 * loop that stamps the pages of its own share of RAM with a generation
 * counter and publishes its progress in the status page below.  The loop
 * causes no VM exits: the host reads progress straight from guest memory.
 *
 * This header is included by both sides: the guest (freestanding, no libc)
 * and the host.  Keep it plain C99 with fixed-width types only.
 *
 * Page numbering.  The guest uses RAM from VMIG_GUEST_WS_START upwards, as
 * a linear sequence of "work pages": first the RAM below 4 GiB
 * [VMIG_GUEST_WS_START, low_end), then the RAM above 4 GiB
 * [4 GiB, high_end).  vCPU i owns work pages
 * [vcpu[i].first_page, vcpu[i].first_page + vcpu[i].nr_pages).
 * vmig_guest_page_gpa() maps a work page index to its guest-physical address.
 *
 * Stamps.  Each pass over its pages is one generation (1, 2, ...).  Writing
 * work page k in generation g and host iteration it stores a
 * struct vmig_guest_stamp at offset 0 of the page and its 'generation' word
 * again in the last 8 bytes of the page (VMIG_GUEST_TAIL_OFFSET), then
 * updates the vCPU's counters (cursor, pages_written, checksum) in that
 * order.  A page never written holds zeroes.
 *
 * The pair (generation, cursor) changes together: the wrap from (G, n) to
 * (G + 1, 0) is one 16-byte store, so a stopped vCPU never shows half of it.
 * While a vCPU is BOOTING it clears its working set (firmware may have
 * left data there); verify only once every vCPU is RUNNING or DONE.  The
 * guest zeroes the status page at boot: write host_iteration only after
 * magic has appeared.
 *
 * Verifying a paused guest, per vCPU with generation G >= 1 and cursor c:
 *   - work pages [0, c) hold generation G, pages (c, n) hold G - 1 (0 means
 *     never written: all-zero stamp);
 *   - page c holds G - 1, or G, or is half-written (the stores go magic,
 *     generation, iteration, vcpu, tail): the vCPU may have stopped between
 *     the page write and the counter update, or inside the page write;
 *   - checksum == sum over the vCPU's pages of vmig_guest_stamp_hash(),
 *     except that the last page written (at c, or c - 1 if the cursor moved
 *     but the checksum store had not happened) may be ahead of it by that
 *     page's change.
 */
#ifndef VMIG_GUEST_ABI_H
#define VMIG_GUEST_ABI_H

#include <stdint.h>

#define VMIG_GUEST_PAGE_SIZE     4096u

/* Fixed guest-physical address of the status page. */
#define VMIG_GUEST_STATUS_GPA    0x8000u

/* Work pages start here (below it: low memory and the guest image). */
#define VMIG_GUEST_WS_START      0x400000u          /* 4 MiB */
#define VMIG_GUEST_HIGH_START    0x100000000ull      /* 4 GiB */

#define VMIG_GUEST_STATUS_MAGIC  0x5355544147494d56ull /* "VMIGSTAT" */
#define VMIG_GUEST_STAMP_MAGIC   0x504d545347494d56ull /* "VMIGSTMP" */
#define VMIG_GUEST_ABI_VERSION   1u
#define VMIG_GUEST_MAX_VCPUS     32u

#define VMIG_GUEST_TAIL_OFFSET   (VMIG_GUEST_PAGE_SIZE - 8u)

/* Port the guest writes to power off (QEMU: isa-debug-exit, iobase=0x501). */
#define VMIG_GUEST_EXIT_PORT     0x501u
/* Values written there: done, a self-check found bad memory, fatal error. */
#define VMIG_GUEST_EXIT_OK       0x00u
#define VMIG_GUEST_EXIT_BAD_DATA 0xfeu
#define VMIG_GUEST_EXIT_FATAL    0xffu

/*
 * Page body (bytes 32 to 4087, between the stamp and the tail word) on
 * every page write: STAMP leaves it alone (zero unless the firmware wrote
 * it), RANDOM fills it with pseudo-random bytes that no compressor
 * shrinks, TEXT with data lz4 shrinks about 3x (2 random words in every
 * 8, the rest a fixed text).  Both depend on the page's gpa and generation.
 */
#define VMIG_GUEST_FILL_STAMP    0u
#define VMIG_GUEST_FILL_RANDOM   1u
#define VMIG_GUEST_FILL_TEXT     2u

/* vcpu state values */
#define VMIG_GUEST_VCPU_OFF      0u   /* not started */
#define VMIG_GUEST_VCPU_BOOTING  1u   /* in ring 0 set-up */
#define VMIG_GUEST_VCPU_RUNNING  2u   /* ring-3 loop running */
#define VMIG_GUEST_VCPU_DONE     3u   /* finished its gens= passes */

/* Written at offset 0 of every work page. */
struct vmig_guest_stamp {
	uint64_t magic;          /* VMIG_GUEST_STAMP_MAGIC ^ gpa */
	uint64_t generation;     /* pass number, from 1 */
	uint64_t iteration;      /* host_iteration read just before the write */
	uint64_t vcpu;           /* index of the writing vCPU */
};

/* Per-vCPU progress: 64 bytes, written only by its vCPU (ring 3). */
struct vmig_guest_vcpu {
	uint64_t state;          /* VMIG_GUEST_VCPU_* */
	uint64_t first_page;     /* first work page index owned by this vCPU */
	uint64_t nr_pages;       /* working-set size in pages */
	uint64_t generation;     /* current pass, from 1 */
	uint64_t cursor;         /* next page (0..nr_pages) to write in it */
	uint64_t pages_written;  /* total page writes since boot */
	uint64_t checksum;       /* sum of stamp hashes of its pages */
	uint64_t heartbeat;      /* incremented by every loop turn, even idle */
};

/* At VMIG_GUEST_STATUS_GPA.  Guest writes all fields except host_*. */
struct vmig_guest_status {
	uint64_t magic;          /* VMIG_GUEST_STATUS_MAGIC once set up */
	uint32_t abi_version;    /* VMIG_GUEST_ABI_VERSION */
	uint32_t nr_vcpus;       /* vCPUs the guest started */
	uint64_t low_end;        /* end of usable RAM below 4 GiB */
	uint64_t high_end;       /* end of RAM above 4 GiB, or 0 */
	uint64_t rate;           /* pages per second per vCPU, 0 = max */
	uint64_t tsc_khz;        /* TSC frequency used for pacing */
	uint64_t gens;           /* passes before power-off, 0 = forever */
	uint64_t boot_tsc;       /* TSC at start of ring-3 work */
	/* Written by the host, read by the guest before each page write. */
	uint64_t host_iteration;
	uint64_t fill;           /* VMIG_GUEST_FILL_*: what a page write puts in the body */
	uint64_t idle_after;     /* passes before the vCPUs stop writing, 0 = never */
	/* Written by the host: non-zero asks vCPU 0 to power the guest off
	 * (exit port, status OK) at its next loop turn: vmig shutdown. */
	uint64_t host_shutdown;
	uint64_t reserved[4];
	struct vmig_guest_vcpu vcpu[VMIG_GUEST_MAX_VCPUS];
};

/* Hash of a page's stamp, for the checksum.  0 for an all-zero stamp. */
static inline uint64_t vmig_guest_stamp_hash(const struct vmig_guest_stamp *s)
{
	uint64_t h;

	if (!s->magic && !s->generation && !s->iteration && !s->vcpu)
		return 0;
	h = s->magic * 0x9e3779b97f4a7c15ull;
	h ^= s->generation + 0x7f4a7c159e3779b9ull + (h << 6) + (h >> 2);
	h ^= s->vcpu + 0x94d049bb133111ebull + (h << 6) + (h >> 2);
	return h;   /* iteration is diagnostic only: not hashed */
}

/* Guest-physical address of work page @idx for a given RAM layout. */
static inline uint64_t vmig_guest_page_gpa(uint64_t low_end, uint64_t idx)
{
	uint64_t nr_low = low_end > VMIG_GUEST_WS_START ?
		(low_end - VMIG_GUEST_WS_START) / VMIG_GUEST_PAGE_SIZE : 0;

	if (idx < nr_low)
		return VMIG_GUEST_WS_START + idx * VMIG_GUEST_PAGE_SIZE;
	return VMIG_GUEST_HIGH_START + (idx - nr_low) * VMIG_GUEST_PAGE_SIZE;
}

#endif /* VMIG_GUEST_ABI_H */
