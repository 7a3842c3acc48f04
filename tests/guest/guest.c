/*
 * vmig built-in test guest: ring-0 set-up and the ring-3 workload.
 *
 * Contract with the host: include/vmig/guest-abi.h.  In short: each vCPU
 * owns a share of RAM ("work pages") and, in ring 3, stamps its pages one
 * after the other with the pass number ("generation"), publishing its
 * progress in the status page at VMIG_GUEST_STATUS_GPA.  The loop causes no
 * VM exits; the host reads progress straight from guest memory.
 *
 * Ring 0 (bsp_main/ap_main) runs in kvm_pvm's instruction emulator at about
 * 1-2 M instructions/s, so it does the minimum: multiboot information,
 * command line, identity map above 4 GiB, TSC calibration, status page,
 * descriptor tables, AP start-up, banner.  Ring 3 (user_main) runs natively.
 *
 * Ring 3 reaches the outside world only through "outb %al,%dx", which
 * faults (#GP, IOPL 0, no I/O bitmap) into a ring-0 stub in boot.S that
 * does the write and returns with sysexitq: used for console lines (vCPU 0
 * every ~2 s unless 'quiet', and error reports) and for power-off.
 *
 * Self-check, not required by the host: before stamping a page the guest
 * reads its old stamp (it needs it for the incremental checksum anyway) and
 * compares it with what it wrote one pass earlier; after its last pass
 * (gens=N) each vCPU re-reads all its pages and its checksum.  Any mismatch
 * is printed, and the final power-off writes GUEST_EXIT_BADDATA instead of
 * GUEST_EXIT_OK, so a QEMU or vmig migration test can also judge by the
 * exit code.
 *
 * Memory ownership: everything below VMIG_GUEST_WS_START belongs to the
 * guest image, its page tables, the status page and the trampoline; work
 * pages start at VMIG_GUEST_WS_START.  Each vCPU clears the stamp and tail
 * words of its work pages in ring 3 before it reports RUNNING, so that "a
 * page never written holds zeroes" holds even if the firmware used the RAM.
 */
#include <stddef.h>
#include <stdint.h>

#include "guest.h"

#define STATUS ((volatile struct vmig_guest_status *)(uintptr_t)VMIG_GUEST_STATUS_GPA)

#define GIB                 (1ull << 30)
#define MB_BOOT_MAGIC       0x2badb002u
#define MB_FLAG_MEM         (1u << 0)
#define MB_FLAG_CMDLINE     (1u << 2)
#define MB_FLAG_MMAP        (1u << 6)
#define MB_MEM_AVAILABLE    1u

#define PTE_FLAGS_2M        0x087ull   /* present, writable, user, 2 MiB */
#define PTE_FLAGS_TABLE     0x007ull   /* present, writable, user */
#define MAX_MAPPED          (512 * GIB)  /* one PDPT */

#define LAPIC_BASE          0xfee00000ull
#define LAPIC_SVR           0x0f0
#define LAPIC_ICR_LO        0x300
#define LAPIC_ICR_HI        0x310
#define ICR_BUSY            (1u << 12)
#define ICR_INIT            0x00004500u   /* INIT, level, assert */
#define ICR_SIPI            0x00004600u   /* start-up, assert */

#define MSR_SYSENTER_CS     0x174
#define MSR_SYSENTER_ESP    0x175
#define MSR_SYSENTER_EIP    0x176

#define PIT_HZ              1193182ull
#define PIT_CAL_TICKS       11932u        /* 10 ms */

#define MAX_BAD_REPORTS     8             /* per vCPU */

#define barrier()           __asm__ __volatile__("" ::: "memory")

/* ------------------------------------------------------------------ */
/* State shared between rings.  .bss: zero at load. */

struct guest_config {
	uint32_t vcpus;
	uint32_t quiet;
	uint64_t rate;          /* pages/s per vCPU, 0 = max */
	uint64_t wss;           /* bytes per vCPU */
	uint64_t gens;          /* 0 = forever */
	uint64_t fill;          /* VMIG_GUEST_FILL_* */
	uint64_t idle_after;    /* passes, then stop writing; 0 = never */
	uint64_t tsc_khz;       /* 0 = calibrate */
	uint64_t low_end, high_end;
	uint32_t tsc_source;    /* 0 given, 1 PIT, 2 fallback */
};

struct tss {
	uint32_t reserved0;
	uint64_t rsp0, rsp1, rsp2;
	uint64_t reserved1;
	uint64_t ist[7];
	uint64_t reserved2;
	uint16_t reserved3;
	uint16_t iomap_base;
} __attribute__((packed));

struct desc_ptr {
	uint16_t limit;
	uint64_t base;
} __attribute__((packed));

static struct guest_config cfg;
static char cmdline[1024];
static struct tss tss[VMIG_GUEST_MAX_VCPUS] __attribute__((aligned(16)));
static uint64_t idt[GUEST_NR_EXC * 2] __attribute__((aligned(16)));
static char ustacks[VMIG_GUEST_MAX_VCPUS][GUEST_USTACK_SIZE] __attribute__((aligned(16)));
static volatile uint32_t console_lock;
static volatile uint64_t bad_pages[VMIG_GUEST_MAX_VCPUS];

/* ------------------------------------------------------------------ */
/* Freestanding helpers (both rings). */

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);

/* Whole quadwords first: each iteration of a rep is emulated in ring 0. */
void *memset(void *d, int c, size_t n)
{
	uint64_t v = 0x0101010101010101ull * (uint8_t)c;
	size_t q = n / 8;
	void *r = d;

	n %= 8;
	__asm__ __volatile__("rep stosq" : "+D"(d), "+c"(q) : "a"(v) : "memory");
	__asm__ __volatile__("rep stosb" : "+D"(d), "+c"(n) : "a"(v) : "memory");
	return r;
}

void *memcpy(void *d, const void *s, size_t n)
{
	void *r = d;

	__asm__ __volatile__("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
	return r;
}

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
	__asm__ __volatile__("pause" ::: "memory");
}

static void lock_console(void)
{
	uint32_t v;

	for (;;) {
		v = 1;
		__asm__ __volatile__("xchgl %0, %1" : "+r"(v), "+m"(console_lock) : : "memory");
		if (!v)
			return;
		while (console_lock)
			cpu_relax();
	}
}

static void unlock_console(void)
{
	barrier();
	console_lock = 0;
}

/* A console line under construction. */
struct line {
	unsigned n;
	char s[240];
};

static void l_chr(struct line *l, char c)
{
	if (l->n < sizeof(l->s))
		l->s[l->n++] = c;
}

static void l_str(struct line *l, const char *s)
{
	while (*s)
		l_chr(l, *s++);
}

static void l_u64(struct line *l, uint64_t v)
{
	char b[20];
	int i = 0;

	do {
		b[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i)
		l_chr(l, b[--i]);
}

static void l_hex(struct line *l, uint64_t v)
{
	int i = 60;

	l_str(l, "0x");
	while (i > 0 && !(v >> i))
		i -= 4;
	for (; i >= 0; i -= 4)
		l_chr(l, "0123456789abcdef"[(v >> i) & 15]);
}

/* Byte count with the largest exact K/M/G suffix. */
static void l_size(struct line *l, uint64_t v)
{
	static const char suffix[] = "KMGT";
	int i = -1;

	while (i < 3 && v && !(v & 1023)) {
		v >>= 10;
		i++;
	}
	l_u64(l, v);
	if (i >= 0)
		l_chr(l, suffix[i]);
}

/* ------------------------------------------------------------------ */
/* Ring 0. */

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ __volatile__("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;

	__asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void wrmsr(uint32_t msr, uint64_t v)
{
	__asm__ __volatile__("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)));
}

static inline uint32_t cpuid_eax(uint32_t leaf, uint32_t *ebx, uint32_t *ecx)
{
	uint32_t a, b, c, d;

	__asm__ __volatile__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(0));
	if (ebx)
		*ebx = b;
	if (ecx)
		*ecx = c;
	return a;
}

static inline uint32_t lapic_read(uint32_t reg)
{
	return *(volatile uint32_t *)(uintptr_t)(LAPIC_BASE + reg);
}

static inline void lapic_write(uint32_t reg, uint32_t v)
{
	*(volatile uint32_t *)(uintptr_t)(LAPIC_BASE + reg) = v;
}

static void k_putc(char c)
{
	unsigned i;

	if (uart_poll) {
		for (i = 0; i < 2000 && !(inb(GUEST_COM1 + 5) & 0x20); i++)
			;
		if (i == 2000)
			uart_poll = 0;   /* no THRE: stop waiting for it */
	}
	outb(GUEST_COM1, (uint8_t)c);
}

static void k_putline(struct line *l)
{
	unsigned i;

	l_chr(l, '\n');
	lock_console();
	for (i = 0; i < l->n; i++)
		k_putc(l->s[i]);
	unlock_console();
}

static void serial_init(void)
{
	outb(GUEST_COM1 + 1, 0x00);     /* no interrupts */
	outb(GUEST_COM1 + 3, 0x80);     /* DLAB */
	outb(GUEST_COM1 + 0, 0x01);     /* 115200 baud */
	outb(GUEST_COM1 + 1, 0x00);
	outb(GUEST_COM1 + 3, 0x03);     /* 8N1 */
	outb(GUEST_COM1 + 2, 0xc7);     /* FIFO on, cleared */
	outb(GUEST_COM1 + 4, 0x03);     /* DTR, RTS */
}

static __attribute__((noreturn)) void k_halt(void)
{
	for (;;)
		__asm__ __volatile__("cli; hlt");
}

static __attribute__((noreturn)) void k_power_off(uint8_t code)
{
	outb(VMIG_GUEST_EXIT_PORT, code);
	k_halt();
}

static __attribute__((noreturn)) void k_fail(const char *what, uint64_t v)
{
	struct line l = { 0 };

	l_str(&l, "vmig-guest: error: ");
	l_str(&l, what);
	l_str(&l, " (");
	l_hex(&l, v);
	l_chr(&l, ')');
	k_putline(&l);
	k_power_off(GUEST_EXIT_FATAL);
}

/* Any exception but a ring-3 outb: report and power off. */
void trap_fatal(struct trap_frame *f)
{
	static const char *const names[GUEST_NR_EXC] = {
		"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM",
		"#DF", "#MF(9)", "#TS", "#NP", "#SS", "#GP", "#PF", "15",
		"#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "22", "23",
		"24", "25", "26", "27", "#HV", "#VC", "#SX", "31",
	};
	struct line l = { 0 };
	uint64_t cr2;
	uint32_t ebx;
	unsigned i;

	__asm__ __volatile__("mov %%cr2, %0" : "=r"(cr2));
	cpuid_eax(1, &ebx, NULL);
	l_str(&l, "vmig-guest: cpu ");
	l_u64(&l, ebx >> 24);
	l_str(&l, ": unexpected exception ");
	l_u64(&l, f->vector);
	if (f->vector < GUEST_NR_EXC) {
		l_chr(&l, ' ');
		l_str(&l, names[f->vector]);
	} else if (f->vector == GUEST_VEC_SYSENTER) {
		l_str(&l, " (sysenter)");
	}
	l_str(&l, " rip=");
	l_hex(&l, f->rip);
	l_str(&l, " err=");
	l_hex(&l, f->error);
	l_str(&l, " cs=");
	l_hex(&l, f->cs);
	l_str(&l, " rsp=");
	l_hex(&l, f->rsp);
	l_str(&l, " rflags=");
	l_hex(&l, f->rflags);
	if (f->vector == 14) {
		l_str(&l, " cr2=");
		l_hex(&l, cr2);
	}
	/* The lock holder may be the CPU that died: do not wait forever. */
	for (i = 0; i < 100000 && console_lock; i++)
		cpu_relax();
	console_lock = 0;
	k_putline(&l);
	k_power_off(GUEST_EXIT_FATAL);
}

/* ---- multiboot information and command line ---- */

static uint32_t rd32(uint64_t addr)
{
	return *(const volatile uint32_t *)(uintptr_t)addr;
}

static uint64_t rd64(uint64_t addr)
{
	return *(const volatile uint64_t *)(uintptr_t)addr;
}

/*
 * End of the usable RAM run that contains @start, following adjacent or
 * overlapping available entries; @start if no entry contains it.
 */
static uint64_t ram_run_end(uint64_t mmap, uint32_t len, uint64_t start, uint64_t limit)
{
	uint64_t end = start, off, base, size;
	int grew = 1;

	while (grew) {
		grew = 0;
		for (off = 0; off + 24 <= len; off += rd32(mmap + off) + 4) {
			base = rd64(mmap + off + 4);
			size = rd64(mmap + off + 12);
			if (rd32(mmap + off + 20) != MB_MEM_AVAILABLE)
				continue;
			if (base <= end && base + size > end) {
				end = base + size < limit ? base + size : limit;
				grew = end < limit;
			}
		}
	}
	return end;
}

static void read_multiboot(uint32_t mbi)
{
	uint32_t flags = rd32(mbi), len, i;
	uint64_t mmap, off, base, size;
	const volatile char *s;

	if (flags & MB_FLAG_CMDLINE) {
		s = (const volatile char *)(uintptr_t)rd32(mbi + 16);
		for (i = 0; i < sizeof(cmdline) - 1 && s[i]; i++)
			cmdline[i] = s[i];
		cmdline[i] = 0;
	}
	if (flags & MB_FLAG_MMAP) {
		len = rd32(mbi + 44);
		mmap = rd32(mbi + 48);
		cfg.low_end = ram_run_end(mmap, len, VMIG_GUEST_WS_START, VMIG_GUEST_HIGH_START);
		if (cfg.low_end == VMIG_GUEST_WS_START) {
			/* Tiny guest: no work pages below 4 GiB. */
			cfg.low_end = 0;
			for (off = 0; off + 24 <= len; off += rd32(mmap + off) + 4) {
				base = rd64(mmap + off + 4);
				size = rd64(mmap + off + 12);
				if (rd32(mmap + off + 20) == MB_MEM_AVAILABLE &&
				    base + size <= VMIG_GUEST_HIGH_START && base + size > cfg.low_end)
					cfg.low_end = base + size;
			}
		}
		cfg.high_end = ram_run_end(mmap, len, VMIG_GUEST_HIGH_START, MAX_MAPPED);
		if (cfg.high_end == VMIG_GUEST_HIGH_START)
			cfg.high_end = 0;
	} else if (flags & MB_FLAG_MEM) {
		cfg.low_end = 0x100000 + (uint64_t)rd32(mbi + 8) * 1024;
		if (cfg.low_end > VMIG_GUEST_HIGH_START)
			cfg.low_end = VMIG_GUEST_HIGH_START;
	} else {
		k_fail("no memory information from the boot loader", flags);
	}
	cfg.low_end &= ~(uint64_t)(VMIG_GUEST_PAGE_SIZE - 1);
	cfg.high_end &= ~(uint64_t)(VMIG_GUEST_PAGE_SIZE - 1);
}

static int key_is(const char *tok, unsigned len, const char *key)
{
	unsigned i;

	for (i = 0; i < len && key[i]; i++)
		if (tok[i] != key[i])
			return 0;
	return i == len && !key[i];
}

/* Decimal number with an optional K/M/G/T suffix (powers of 1024). */
static uint64_t parse_num(const char *s, unsigned len, int *ok)
{
	uint64_t v = 0;
	unsigned i = 0;

	*ok = len > 0;
	for (; i < len && s[i] >= '0' && s[i] <= '9'; i++)
		v = v * 10 + (uint64_t)(s[i] - '0');
	if (!i)
		*ok = 0;
	if (i < len) {
		switch (s[i] | 0x20) {
		case 'k': v <<= 10; break;
		case 'm': v <<= 20; break;
		case 'g': v <<= 30; break;
		case 't': v <<= 40; break;
		default: *ok = 0; break;
		}
		i++;
		if (i < len && (s[i] | 0x20) == 'i')    /* KiB, MiB... */
			i++;
		if (i < len && (s[i] | 0x20) == 'b')
			i++;
		if (i != len)
			*ok = 0;
	}
	return v;
}

static void parse_cmdline(void)
{
	const char *p = cmdline, *tok, *val;
	unsigned klen, vlen;
	uint64_t v;
	int ok;

	while (*p) {
		while (*p == ' ' || *p == ',' || *p == '\t')
			p++;
		tok = p;
		while (*p && *p != ' ' && *p != ',' && *p != '\t' && *p != '=')
			p++;
		klen = (unsigned)(p - tok);
		val = p;
		vlen = 0;
		if (*p == '=') {
			val = ++p;
			while (*p && *p != ' ' && *p != ',' && *p != '\t')
				p++;
			vlen = (unsigned)(p - val);
		}
		if (!klen)
			continue;
		if (key_is(tok, klen, "quiet")) {
			cfg.quiet = 1;
			continue;
		}
		if (key_is(tok, klen, "rate") && key_is(val, vlen, "max")) {
			cfg.rate = 0;
			continue;
		}
		if (key_is(tok, klen, "fill")) {
			if (key_is(val, vlen, "random"))
				cfg.fill = VMIG_GUEST_FILL_RANDOM;
			else if (key_is(val, vlen, "text"))
				cfg.fill = VMIG_GUEST_FILL_TEXT;
			else if (key_is(val, vlen, "stamp"))
				cfg.fill = VMIG_GUEST_FILL_STAMP;
			continue;
		}
		v = parse_num(val, vlen, &ok);
		if (!ok)
			continue;
		if (key_is(tok, klen, "vcpus"))
			cfg.vcpus = v < 1 ? 1 : v > VMIG_GUEST_MAX_VCPUS ? VMIG_GUEST_MAX_VCPUS : (uint32_t)v;
		else if (key_is(tok, klen, "rate"))
			cfg.rate = v;
		else if (key_is(tok, klen, "wss"))
			cfg.wss = v < VMIG_GUEST_PAGE_SIZE ? VMIG_GUEST_PAGE_SIZE : v;
		else if (key_is(tok, klen, "gens"))
			cfg.gens = v;
		else if (key_is(tok, klen, "idle_after"))
			cfg.idle_after = v;
		else if (key_is(tok, klen, "tsc_khz"))
			cfg.tsc_khz = v;
	}
}

/* ---- memory map, TSC, status page ---- */

/*
 * boot.S mapped [0, 4 GiB).  Map [4 GiB, high_end) too, with page
 * directories taken from the free space between the image and the work
 * pages (the multiboot information there has been consumed).
 */
static void map_high_ram(void)
{
	uint64_t pool = ((uint64_t)(uintptr_t)_end + 4095) & ~4095ull;
	uint64_t nr_gib = (cfg.high_end + GIB - 1) / GIB, g, i, *pd;

	for (g = 4; g < nr_gib; g++) {
		if (pool + 4096 > VMIG_GUEST_WS_START) {
			cfg.high_end = g * GIB;   /* out of room: cap the RAM used */
			break;
		}
		pd = (uint64_t *)(uintptr_t)pool;
		pool += 4096;
		for (i = 0; i < 512; i++)
			pd[i] = (g * GIB + (i << 21)) | PTE_FLAGS_2M;
		pdpt[g] = (uint64_t)(uintptr_t)pd | PTE_FLAGS_TABLE;
	}
	__asm__ __volatile__("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");
}

/*
 * TSC calibration against PIT channel 2.  Waiting for OUT2 is not good
 * enough here: every poll is an emulated port read, and the host sometimes
 * stalls a poll for milliseconds, always making the TSC look faster.  So
 * read the counter instead, each read bracketed by two rdtsc; of a few reads
 * keep the one with the narrowest bracket, at the start and after ~10 ms.
 * The brackets bound the error.
 */
struct pit_sample {
	uint64_t tsc;           /* middle of the bracket */
	uint64_t win;           /* bracket width, TSC ticks */
	uint16_t cnt;
};

static void pit_sample(struct pit_sample *s)
{
	uint64_t t1, t2;
	uint8_t lo, hi;

	t1 = rdtsc();
	outb(0x43, 0x80);                       /* latch channel 2 */
	lo = inb(0x42);
	hi = inb(0x42);
	t2 = rdtsc();
	s->tsc = t1 + (t2 - t1) / 2;
	s->win = t2 - t1;
	s->cnt = (uint16_t)(lo | hi << 8);
}

static void pit_best_sample(struct pit_sample *best)
{
	struct pit_sample s;
	int i;

	pit_sample(best);
	for (i = 0; i < 4; i++) {
		pit_sample(&s);
		if (s.win < best->win)
			*best = s;
	}
}

/* kHz, or 0 if the PIT does not count; *unc = summed bracket widths. */
static uint64_t pit_tsc_khz(uint64_t *unc)
{
	uint8_t port61 = inb(0x61);
	struct pit_sample a, b;
	uint64_t t0, ticks, khz = 0;

	outb(0x61, (uint8_t)((port61 & ~0x02) | 0x01));   /* gate on, speaker off */
	outb(0x43, 0xb0);                       /* ch 2, lo/hi, mode 0, binary */
	outb(0x42, 0xff);                       /* 0xffff: 55 ms to terminal count */
	outb(0x42, 0xff);
	pit_best_sample(&a);
	t0 = rdtsc();
	do {
		pit_sample(&b);
		ticks = (uint16_t)(a.cnt - b.cnt);
	} while (ticks < PIT_CAL_TICKS && rdtsc() - t0 < (1ull << 33));
	pit_best_sample(&b);
	ticks = (uint16_t)(a.cnt - b.cnt);
	/* OUT2 high: the count wrapped (a stall of > 55 ms); try again. */
	if (!(inb(0x61) & 0x20) && ticks >= PIT_CAL_TICKS / 2)
		khz = (b.tsc - a.tsc) * PIT_HZ / ticks / 1000;
	*unc = a.win + b.win;
	outb(0x61, port61);
	return khz;
}

static void set_tsc_khz(void)
{
	uint64_t khz, unc, best_unc = ~0ull;
	uint32_t ebx, ecx, eax;
	int i;

	if (cfg.tsc_khz)
		return;
	cfg.tsc_source = 1;
	for (i = 0; i < 3; i++) {
		khz = pit_tsc_khz(&unc);
		if (khz >= 100000 && khz <= 20000000 && unc < best_unc) {
			cfg.tsc_khz = khz;
			best_unc = unc;
		}
		/*
		 * Brackets under 100 us in all: no stall, done.  (Typical here:
		 * ~20 us, and the result is within ~0.01% of the host's TSC
		 * frequency; a stall shows as milliseconds.)
		 */
		if (cfg.tsc_khz && best_unc * 10 < cfg.tsc_khz)
			break;
	}
	if (cfg.tsc_khz)
		return;
	/* No usable PIT: CPUID 0x15 / 0x16, else a guess. */
	cfg.tsc_source = 2;
	if (cpuid_eax(0, NULL, NULL) >= 0x16) {
		eax = cpuid_eax(0x15, &ebx, &ecx);
		if (eax && ebx && ecx)
			cfg.tsc_khz = (uint64_t)ecx * ebx / eax / 1000;
		if (!cfg.tsc_khz)
			cfg.tsc_khz = (uint64_t)(cpuid_eax(0x16, NULL, NULL) & 0xffff) * 1000;
	}
	if (!cfg.tsc_khz)
		cfg.tsc_khz = 2000000;
}

static void delay_us(uint64_t us)
{
	uint64_t t0 = rdtsc(), ticks = us * cfg.tsc_khz / 1000;

	while (rdtsc() - t0 < ticks)
		;
}

/* Everything but magic, nr_vcpus and boot_tsc (bsp_main, at the end). */
static void set_up_status(void)
{
	volatile struct vmig_guest_status *st = STATUS;
	uint64_t nr_low, nr_high, total, wss_pages, first, nr;
	uint32_t i;

	memset((void *)(uintptr_t)VMIG_GUEST_STATUS_GPA, 0, VMIG_GUEST_PAGE_SIZE);
	nr_low = cfg.low_end > VMIG_GUEST_WS_START ?
		(cfg.low_end - VMIG_GUEST_WS_START) / VMIG_GUEST_PAGE_SIZE : 0;
	nr_high = cfg.high_end > VMIG_GUEST_HIGH_START ?
		(cfg.high_end - VMIG_GUEST_HIGH_START) / VMIG_GUEST_PAGE_SIZE : 0;
	total = nr_low + nr_high;
	wss_pages = cfg.wss / VMIG_GUEST_PAGE_SIZE;

	st->abi_version = VMIG_GUEST_ABI_VERSION;
	st->low_end = cfg.low_end;
	st->high_end = cfg.high_end;
	st->rate = cfg.rate;
	st->tsc_khz = cfg.tsc_khz;
	st->gens = cfg.gens;
	st->fill = cfg.fill;
	st->idle_after = cfg.idle_after;
	for (i = 0; i < cfg.vcpus; i++) {
		first = i * wss_pages < total ? i * wss_pages : total;
		nr = total - first < wss_pages ? total - first : wss_pages;
		st->vcpu[i].first_page = first;
		st->vcpu[i].nr_pages = nr;
		st->vcpu[i].state = VMIG_GUEST_VCPU_OFF;
	}
	st->vcpu[0].state = VMIG_GUEST_VCPU_BOOTING;
}

/* ---- descriptor tables, per-CPU set-up, ring 3 entry ---- */

static void set_up_idt(void)
{
	uint64_t off;
	unsigned v;

	for (v = 0; v < GUEST_NR_EXC; v++) {
		off = isr_table[v];
		idt[2 * v] = (off & 0xffff) | ((uint64_t)GUEST_SEL_KCODE << 16) |
			(0x8e00ull << 32) | (((off >> 16) & 0xffff) << 48);
		idt[2 * v + 1] = off >> 32;
	}
}

static void user_main(uint64_t cpu);

static __attribute__((noreturn)) void cpu_start(uint32_t cpu)
{
	uint64_t base = (uint64_t)(uintptr_t)&tss[cpu], limit = sizeof(struct tss) - 1;
	uint64_t ktop = (uint64_t)(uintptr_t)kstacks[cpu] + GUEST_KSTACK_SIZE;
	uint64_t utop = (uint64_t)(uintptr_t)ustacks[cpu] + GUEST_USTACK_SIZE;
	unsigned slot = (GUEST_SEL_TSS >> 3) + 2 * cpu;
	struct desc_ptr idtr = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };
	uint16_t sel = (uint16_t)(GUEST_SEL_TSS + 16 * cpu);

	tss[cpu].rsp0 = ktop;
	tss[cpu].iomap_base = sizeof(struct tss);   /* no I/O bitmap */
	gdt[slot] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ull << 40) |
		(((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
	gdt[slot + 1] = base >> 32;
	__asm__ __volatile__("ltr %0" : : "r"(sel));
	__asm__ __volatile__("lidt %0" : : "m"(idtr));
	wrmsr(MSR_SYSENTER_CS, GUEST_SEL_KCODE);
	wrmsr(MSR_SYSENTER_ESP, ktop);
	wrmsr(MSR_SYSENTER_EIP, (uint64_t)(uintptr_t)sysenter_trap);

	/* RFLAGS stays as it is in ring 0 (IF 0, IOPL 0). */
	__asm__ __volatile__("sysexitq"
			     : : "c"(utop - 8), "d"((uint64_t)(uintptr_t)user_main),
			       "D"((uint64_t)cpu)
			     : "memory");
	__builtin_unreachable();
}

static void banner(void)
{
	struct line l = { 0 };

	l_str(&l, "vmig-guest: ");
	l_u64(&l, cfg.vcpus);
	l_str(&l, " vcpus, wss=");
	l_size(&l, cfg.wss);
	l_str(&l, ", rate=");
	if (cfg.rate)
		l_u64(&l, cfg.rate);
	else
		l_str(&l, "max");
	l_str(&l, ", gens=");
	l_u64(&l, cfg.gens);
	if (cfg.fill) {
		l_str(&l, ", fill=");
		l_str(&l, cfg.fill == VMIG_GUEST_FILL_RANDOM ? "random" : "text");
	}
	if (cfg.idle_after) {
		l_str(&l, ", idle_after=");
		l_u64(&l, cfg.idle_after);
	}
	l_str(&l, ", tsc_khz=");
	l_u64(&l, cfg.tsc_khz);
	l_str(&l, cfg.tsc_source == 0 ? " (given)" :
	      cfg.tsc_source == 1 ? " (PIT)" : " (GUESSED: pass tsc_khz=)");
	l_str(&l, ", low_end=");
	l_hex(&l, cfg.low_end);
	l_str(&l, ", high_end=");
	l_hex(&l, cfg.high_end);
	k_putline(&l);
}

static void send_ipi(uint32_t apic_id, uint32_t icr)
{
	while (lapic_read(LAPIC_ICR_LO) & ICR_BUSY)
		cpu_relax();
	lapic_write(LAPIC_ICR_HI, apic_id << 24);
	lapic_write(LAPIC_ICR_LO, icr);
}

/*
 * First half of the AP start-up: INIT to APs 1..vcpus-1.  bsp_main then
 * calibrates the TSC, which is the 10 ms INIT-to-SIPI wait.
 */
static void init_aps(void)
{
	uint32_t i;

	lapic_write(LAPIC_SVR, 0x1ff);          /* software-enable, vector 0xff */
	for (i = 1; i < cfg.vcpus; i++)
		send_ipi(i, ICR_INIT);
}

/* Second half: SIPI, SIPI; the APs report in vcpu[i].state. */
static void start_aps(uint64_t init_tsc)
{
	volatile struct vmig_guest_status *st = STATUS;
	uint64_t t0;
	uint32_t i, round, missing;

	if (cfg.vcpus < 2)
		return;
	memcpy((void *)(uintptr_t)GUEST_TRAMPOLINE, ap_tramp_start,
	       (size_t)(ap_tramp_end - ap_tramp_start));
	while (rdtsc() - init_tsc < cfg.tsc_khz * 10)
		;
	for (round = 0; round < 2; round++) {
		for (i = 1; i < cfg.vcpus; i++)
			if (st->vcpu[i].state == VMIG_GUEST_VCPU_OFF)
				send_ipi(i, ICR_SIPI | (GUEST_TRAMPOLINE >> 12));
		delay_us(200);
	}
	t0 = rdtsc();
	do {
		missing = 0;
		for (i = 1; i < cfg.vcpus; i++)
			if (st->vcpu[i].state == VMIG_GUEST_VCPU_OFF)
				missing = i;
	} while (missing && rdtsc() - t0 < cfg.tsc_khz * 1000);
	if (missing)
		k_fail("vCPU did not start; does the VM have vcpus= vCPUs? highest missing", missing);
}

void ap_main(uint32_t cpu)
{
	volatile struct vmig_guest_status *st = STATUS;

	if (cpu >= cfg.vcpus || st->vcpu[cpu].state != VMIG_GUEST_VCPU_OFF)
		k_halt();
	st->vcpu[cpu].state = VMIG_GUEST_VCPU_BOOTING;
	cpu_start(cpu);
}

void bsp_main(uint32_t mb_magic, uint32_t mb_info)
{
	volatile struct vmig_guest_status *st = STATUS;
	uint64_t init_tsc;

	serial_init();
	if (mb_magic != MB_BOOT_MAGIC)
		k_fail("not started by a multiboot loader: eax", mb_magic);
	cfg.vcpus = 1;
	cfg.rate = 2000;
	cfg.wss = 4ull << 20;
	read_multiboot(mb_info);
	parse_cmdline();
	init_aps();
	init_tsc = rdtsc();
	map_high_ram();
	set_tsc_khz();
	set_up_status();
	set_up_idt();
	banner();
	start_aps(init_tsc);
	st->nr_vcpus = cfg.vcpus;
	st->boot_tsc = rdtsc();
	barrier();
	st->magic = VMIG_GUEST_STATUS_MAGIC;
	cpu_start(0);
}

/* ------------------------------------------------------------------ */
/* Ring 3.  Runs natively: no privileged instructions, no port I/O except
 * through u_outb (a deliberate #GP, see boot.S). */

static inline void u_outb(uint16_t port, uint8_t v)
{
	uint64_t dx = port;

	/* The ring-0 stub returns with sysexitq: RCX and RDX are clobbered. */
	__asm__ __volatile__("outb %%al, %%dx" : "+d"(dx) : "a"(v) : "rcx", "cc", "memory");
}

static void u_putline(struct line *l)
{
	unsigned i;

	l_chr(l, '\n');
	lock_console();
	for (i = 0; i < l->n; i++)
		u_outb(GUEST_COM1, (uint8_t)l->s[i]);
	unlock_console();
}

/*
 * Publish (generation, cursor) with one 16-byte store, so that a vCPU
 * stopped at any instruction boundary shows either the old pair or the new
 * one: the wrap from (G, nr_pages) to (G + 1, 0) is otherwise not valid
 * half-way under the verification rules of guest-abi.h.  Ring 3 only (SSE,
 * enabled by CR4.OSFXSR in boot.S).
 */
static inline void store_gen_cursor(volatile struct vmig_guest_vcpu *v, uint64_t gen, uint64_t cur)
{
	__asm__ __volatile__("movq %1, %%xmm0\n\t"
			     "movq %2, %%xmm1\n\t"
			     "punpcklqdq %%xmm1, %%xmm0\n\t"
			     "movups %%xmm0, %0"
			     : "=m"(*(volatile uint64_t (*)[2])&v->generation)
			     : "r"(gen), "r"(cur)
			     : "memory");
}

static void u_report_bad(uint64_t cpu, uint64_t page, uint64_t gpa, const char *what,
			 const struct vmig_guest_stamp *s, uint64_t tail, uint64_t want_gen)
{
	struct line l = { 0 };

	if (++bad_pages[cpu] > MAX_BAD_REPORTS)
		return;
	l_str(&l, "vmig-guest: BAD ");
	l_str(&l, what);
	l_str(&l, ": vcpu ");
	l_u64(&l, cpu);
	l_str(&l, " page ");
	l_u64(&l, page);
	l_str(&l, " gpa ");
	l_hex(&l, gpa);
	l_str(&l, ": magic=");
	l_hex(&l, s->magic);
	l_str(&l, " gen=");
	l_u64(&l, s->generation);
	l_str(&l, " iter=");
	l_u64(&l, s->iteration);
	l_str(&l, " vcpu=");
	l_u64(&l, s->vcpu);
	l_str(&l, " tail=");
	l_u64(&l, tail);
	l_str(&l, ", want gen=");
	l_u64(&l, want_gen);
	u_putline(&l);
}

/* Does the stamp at @gpa say it was written by @cpu in pass @gen? */
static int stamp_ok(const struct vmig_guest_stamp *s, uint64_t tail, uint64_t gpa,
		    uint64_t cpu, uint64_t gen)
{
	if (!gen)
		return !s->magic && !s->generation && !s->iteration && !s->vcpu && !tail;
	return s->magic == (VMIG_GUEST_STAMP_MAGIC ^ gpa) && s->generation == gen &&
		s->vcpu == cpu && tail == gen;
}

static inline void read_stamp(uint64_t gpa, struct vmig_guest_stamp *s, uint64_t *tail)
{
	const volatile uint64_t *p = (const volatile uint64_t *)(uintptr_t)gpa;

	s->magic = p[0];
	s->generation = p[1];
	s->iteration = p[2];
	s->vcpu = p[3];
	*tail = p[VMIG_GUEST_TAIL_OFFSET / 8];
}

/* After the last pass: every page holds @gen, and the checksum adds up. */
static void u_final_check(uint64_t cpu, uint64_t first, uint64_t n, uint64_t low_end,
			  uint64_t gen, uint64_t checksum)
{
	struct vmig_guest_stamp s;
	uint64_t k, gpa, tail, sum = 0;

	for (k = 0; k < n; k++) {
		gpa = vmig_guest_page_gpa(low_end, first + k);
		read_stamp(gpa, &s, &tail);
		if (!stamp_ok(&s, tail, gpa, cpu, gen))
			u_report_bad(cpu, k, gpa, "final page", &s, tail, gen);
		sum += vmig_guest_stamp_hash(&s);
	}
	if (sum != checksum) {
		s.magic = sum;
		s.generation = checksum;
		s.iteration = s.vcpu = 0;
		u_report_bad(cpu, n, 0, "checksum (magic=sum, gen=published)", &s, 0, gen);
	}
}

static void u_progress(volatile struct vmig_guest_status *st, const char *what)
{
	struct line l = { 0 };
	uint64_t pages = 0, bad = 0;
	uint32_t i;

	for (i = 0; i < st->nr_vcpus; i++) {
		pages += st->vcpu[i].pages_written;
		bad += bad_pages[i];
	}
	l_str(&l, "vmig-guest: ");
	l_str(&l, what);
	l_str(&l, "gen=");
	l_u64(&l, st->vcpu[0].generation);
	l_str(&l, " pages=");
	l_u64(&l, pages);
	l_str(&l, " iter=");
	l_u64(&l, st->host_iteration);
	if (bad) {
		l_str(&l, " BAD=");
		l_u64(&l, bad);
	}
	u_putline(&l);
}

/* vCPU 0, once it is done: power off when every vCPU is. */
static void u_maybe_power_off(volatile struct vmig_guest_status *st)
{
	uint64_t bad = 0;
	uint32_t i;

	for (i = 0; i < st->nr_vcpus; i++) {
		if (st->vcpu[i].state != VMIG_GUEST_VCPU_DONE)
			return;
		bad += bad_pages[i];
	}
	u_progress(st, "done: ");
	u_outb(VMIG_GUEST_EXIT_PORT, bad ? GUEST_EXIT_BADDATA : GUEST_EXIT_OK);
	for (;;)        /* no exit device: keep the heartbeat going */
		st->vcpu[0].heartbeat++;
}

/* splitmix64: a fast generator whose every output word is well mixed. */
static inline uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/*
 * The page body for fill=random|text (guest-abi.h): words 4 to 510, that
 * is, everything but the stamp and the tail word, which the caller writes
 * afterwards.  TEXT keeps two random words in each 64-byte line and a
 * fixed text in the other six, which lz4 finds as matches.
 */
static void fill_body(volatile uint64_t *page, uint64_t gpa, uint64_t gen, uint64_t fill)
{
	static const union {
		char c[48];
		uint64_t q[6];
	} text = { .c = "vmig test guest: compressible page, line after " };
	const uint64_t *t = text.q;
	uint64_t seed = gpa * 0x9e3779b97f4a7c15ull + gen, i;

	if (fill == VMIG_GUEST_FILL_RANDOM) {
		for (i = 4; i < VMIG_GUEST_TAIL_OFFSET / 8; i++)
			page[i] = mix64(seed + i);
		return;
	}
	for (i = 4; i < VMIG_GUEST_TAIL_OFFSET / 8; i++)
		page[i] = (i & 7) < 2 ? mix64(seed + i) : t[(i & 7) - 2];
}

/*
 * The workload of one vCPU.  Per page: pace, read the old stamp (checksum
 * and self-check), read host_iteration, write the body (fill=), the stamp
 * and its tail copy, then publish cursor, pages_written and checksum, in
 * that order.  After idle_after= passes the loop only beats its heartbeat.  Plain
 * stores under x86 TSO; barrier() only keeps the compiler from reordering.
 */
static void __attribute__((noreturn, used)) user_main(uint64_t cpu)
{
	volatile struct vmig_guest_status *st = STATUS;
	volatile struct vmig_guest_vcpu *v = &st->vcpu[cpu];
	volatile uint64_t *page;
	const uint64_t first = v->first_page, n = v->nr_pages;
	const uint64_t low_end = st->low_end, rate = st->rate, gens = st->gens;
	const uint64_t fill = st->fill, idle_after = st->idle_after;
	const uint64_t hz = st->tsc_khz * 1000;
	const uint64_t step = rate ? hz / rate : 0, frac = rate ? hz % rate : 0;
	const uint64_t max_lag = hz / 10;
	const int talk = cpu == 0 && !cfg.quiet;
	struct vmig_guest_stamp old, new;
	uint64_t gen = 1, cursor = 0, written = 0, csum = 0, hb = 0;
	uint64_t now, next, acc = 0, next_print, gpa, tail, k;
	int done = 0, idle = 0;

	if (cpu == 0) {
		struct line l = { 0 };

		l_str(&l, "vmig-guest: ring 3 running on ");
		l_u64(&l, st->nr_vcpus);
		l_str(&l, " vcpus");
		u_putline(&l);
	}
	/*
	 * "A page never written holds zeroes": RAM is not necessarily fresh
	 * (SeaBIOS, for one, leaves data near the top of low RAM that its e820
	 * calls usable), so clear the stamp and tail words of every owned page
	 * first.  This also takes the first-touch cost of the whole working set
	 * here, while the vCPU is still BOOTING.
	 */
	next_print = rdtsc() + 2 * hz;
	for (k = 0; k < n; k++) {
		page = (volatile uint64_t *)(uintptr_t)vmig_guest_page_gpa(low_end, first + k);
		page[0] = page[1] = page[2] = page[3] = 0;
		page[VMIG_GUEST_TAIL_OFFSET / 8] = 0;
		v->heartbeat = ++hb;
		if (talk && !(k & 1023) && (int64_t)(rdtsc() - next_print) >= 0) {
			struct line l = { 0 };

			l_str(&l, "vmig-guest: clearing the working set: ");
			l_u64(&l, k);
			l_chr(&l, '/');
			l_u64(&l, n);
			l_str(&l, " pages");
			u_putline(&l);
			next_print = rdtsc() + 2 * hz;
		}
	}
	v->pages_written = 0;
	v->checksum = 0;
	store_gen_cursor(v, 1, 0);
	barrier();
	v->state = VMIG_GUEST_VCPU_RUNNING;
	if (!n && gens) {
		v->state = VMIG_GUEST_VCPU_DONE;
		done = 1;
	}
	now = next = rdtsc();
	next_print = now + 2 * hz;

	for (;;) {
		v->heartbeat = ++hb;
		if (rate || talk)
			now = rdtsc();
		if (talk && (int64_t)(now - next_print) >= 0) {
			u_progress(st, "");
			next_print = rdtsc() + 2 * hz;
		}
		if (cpu == 0 && st->host_shutdown) {
			/* The host asks for a clean power-off (vmig shutdown). */
			u_progress(st, "shutdown: ");
			u_outb(VMIG_GUEST_EXIT_PORT, GUEST_EXIT_OK);
		}
		if (done) {
			if (cpu == 0)
				u_maybe_power_off(st);
			continue;
		}
		if (!n || idle)
			continue;
		if (rate) {
			if ((int64_t)(now - next) < 0)
				continue;
			next += step;
			acc += frac;
			if (acc >= rate) {
				acc -= rate;
				next++;
			}
			if ((int64_t)(now - next) > (int64_t)max_lag)
				next = now;   /* after a long stop: no catch-up burst */
		}

		if (cursor == n) {
			gen++;
			cursor = 0;
			store_gen_cursor(v, gen, cursor);
		}
		gpa = vmig_guest_page_gpa(low_end, first + cursor);
		page = (volatile uint64_t *)(uintptr_t)gpa;
		read_stamp(gpa, &old, &tail);
		if (!stamp_ok(&old, tail, gpa, cpu, gen - 1))
			u_report_bad(cpu, cursor, gpa, "stale page", &old, tail, gen - 1);
		new.magic = VMIG_GUEST_STAMP_MAGIC ^ gpa;
		new.generation = gen;
		new.iteration = st->host_iteration;
		new.vcpu = cpu;
		if (fill)
			fill_body(page, gpa, gen, fill);
		page[0] = new.magic;
		page[1] = new.generation;
		page[2] = new.iteration;
		page[3] = new.vcpu;
		page[VMIG_GUEST_TAIL_OFFSET / 8] = gen;
		barrier();
		v->cursor = ++cursor;
		barrier();
		v->pages_written = ++written;
		barrier();
		csum += vmig_guest_stamp_hash(&new) - vmig_guest_stamp_hash(&old);
		v->checksum = csum;

		if (cursor == n && gens && gen >= gens) {
			u_final_check(cpu, first, n, low_end, gen, csum);
			barrier();
			v->state = VMIG_GUEST_VCPU_DONE;
			done = 1;
		} else if (cursor == n && idle_after && gen >= idle_after) {
			idle = 1;   /* stays RUNNING, heartbeat only */
		}
	}
}
