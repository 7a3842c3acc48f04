/*
 * Linux x86 boot protocol: a bzImage through its 64-bit entry point, or an
 * uncompressed ELF vmlinux through startup_64, with an optional initrd.
 *
 * vmig plays the boot loader and the firmware at once: it writes the
 * "zero page" (struct boot_params: the setup header, an e820 map matching
 * vmig's RAM layout, the command line and initrd), a GDT, identity page
 * tables for the first 4 GiB, ACPI tables (acpi.c) and an MP table for the
 * vCPUs, IOAPIC and ISA interrupts, then puts the boot vCPU straight into 64-bit long
 * mode as Documentation/x86/boot.rst's "64-bit boot protocol" asks:
 * CS = __BOOT_CS (0x10), the data segments __BOOT_DS (0x18), RSI = the
 * zero page, interrupts off.  Nothing runs in real or 32-bit mode, which
 * the emulator of a KVM without hardware virtualization handles badly.
 * Other vCPUs wait for INIT/SIPI in the in-kernel LAPIC, as on hardware;
 * the kernel's trampoline brings them up.
 *
 * Guest-physical layout of what vmig writes (all in e820 RAM the kernel
 * reclaims, except the MP and ACPI tables, which are in reserved ranges):
 *   0x00500  GDT                     0x07000  boot_params
 *   0x09000  PML4, PDPT, 4 PDs       0x20000  command line
 *   0x9fc00  MP floating pointer and configuration table
 *   0xe0000  ACPI: RSDP, RSDT, XSDT, FADT, FACS, DSDT, MADT
 *   kernel at its preferred address (16 MiB), initrd at the top of low RAM.
 *
 * Images are trusted no more than any file: every offset, size and
 * address is checked against the file and against guest RAM.
 */
#include "config.h"

#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vmm-internal.h"

#define GDT_GPA          0x500ull
#define BOOT_STACK_GPA   0x6ff0ull
#define ZERO_PAGE_GPA    0x7000ull
#define PML4_GPA         0x9000ull
#define PDPT_GPA         0xa000ull
#define PD_GPA           0xb000ull     /* four of them: 4 GiB in 2 MiB pages */
#define CMDLINE_GPA      0x20000ull
#define CMDLINE_MAX      0x10000u
#define LOW_MEM_END      0x9fc00ull    /* then the MP table, "EBDA" */
#define MPTABLE_GPA      LOW_MEM_END
#define ACPI_GPA         0xe0000ull    /* the BIOS area, where Linux scans too */
#define BIOS_START       ACPI_GPA
#define KERNEL_MIN_GPA   0x100000ull

/* Offsets in struct boot_params and its setup header (boot.rst). */
#define BP_ACPI_RSDP_ADDR    0x070
#define BP_EXT_RAMDISK_IMAGE 0x0c0
#define BP_EXT_RAMDISK_SIZE  0x0c4
#define BP_EXT_CMD_LINE_PTR  0x0c8
#define BP_E820_ENTRIES      0x1e8
#define BP_HDR               0x1f1
#define HDR_SETUP_SECTS      0x1f1
#define HDR_BOOT_FLAG        0x1fe
#define HDR_JUMP             0x200
#define HDR_MAGIC            0x202
#define HDR_VERSION          0x206
#define HDR_TYPE_OF_LOADER   0x210
#define HDR_LOADFLAGS        0x211
#define HDR_RAMDISK_IMAGE    0x218
#define HDR_RAMDISK_SIZE     0x21c
#define HDR_HEAP_END_PTR     0x224
#define HDR_CMD_LINE_PTR     0x228
#define HDR_INITRD_ADDR_MAX  0x22c
#define HDR_KERNEL_ALIGNMENT 0x230
#define HDR_RELOCATABLE      0x234
#define HDR_XLOADFLAGS       0x236
#define HDR_CMDLINE_SIZE     0x238
#define HDR_PREF_ADDRESS     0x258
#define HDR_INIT_SIZE        0x260
#define HDR_END_MAX          0x290     /* past the last field vmig knows */
#define BP_E820_TABLE        0x2d0
#define BP_E820_MAX          128u

#define LOADED_HIGH          0x01
#define KEEP_SEGMENTS        0x40
#define CAN_USE_HEAP         0x80
#define XLF_KERNEL_64        0x01
#define MIN_PROTOCOL         0x020c    /* 2.12: xloadflags, the 64-bit entry */

#define E820_RAM             1
#define E820_RESERVED        2

/* KVM's TSS and identity map pages, see vm.c. */
#define KVM_PRIVATE_GPA      0xfffbc000ull

struct e820_entry {
	uint64_t addr, size;
	uint32_t type;
} __attribute__((packed));

struct kernel_image {
	uint64_t load_gpa;      /* lowest byte loaded */
	uint64_t end_gpa;       /* first byte past what the kernel may use */
	uint64_t entry_gpa;     /* 64-bit entry point */
	uint32_t initrd_max;    /* highest address the initrd may end at */
	uint32_t cmdline_max;   /* longest command line, without the NUL */
};

static inline void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static uint64_t low_ram_end(const struct vmig_vm *vm)
{
	return vm->regions[0].size;
}

/* ---- bzImage ---- */

bool vmig__linux_is_bzimage(const uint8_t *image, size_t size)
{
	return size >= 0x240 && !memcmp(image + HDR_MAGIC, "HdrS", 4) &&
	       get16(image + HDR_BOOT_FLAG) == 0xaa55;
}

static int load_bzimage(struct vmig_vm *vm, const uint8_t *image, size_t size,
			uint8_t *zp, struct kernel_image *k, struct vmig_err *err)
{
	uint16_t version = get16(image + HDR_VERSION);
	unsigned int setup_sects = image[HDR_SETUP_SECTS] ? image[HDR_SETUP_SECTS] : 4;
	size_t setup_size = (size_t)(setup_sects + 1) * 512, hdr_end;
	uint64_t pref, init_size, kernel_size;
	uint8_t *dst;

	if (version < MIN_PROTOCOL) {
		vmig_err_set(err, -ENOEXEC, "the kernel speaks boot protocol %u.%02u; vmig "
			     "needs 2.12 or later (Linux 3.8 or later) for the 64-bit entry",
			     version >> 8, version & 0xff);
		return -ENOEXEC;
	}
	if (!(image[HDR_XLOADFLAGS] & XLF_KERNEL_64)) {
		vmig_err_set(err, -ENOEXEC, "the kernel has no 64-bit entry point "
			     "(a 32-bit kernel?); vmig boots 64-bit x86 kernels");
		return -ENOEXEC;
	}
	if (setup_size >= size) {
		vmig_err_set(err, -ENOEXEC, "the kernel image is truncated (%zu bytes, its "
			     "setup code alone is %zu)", size, setup_size);
		return -ENOEXEC;
	}
	kernel_size = size - setup_size;
	pref = get64(image + HDR_PREF_ADDRESS);
	init_size = get32(image + HDR_INIT_SIZE);
	if (pref < KERNEL_MIN_GPA)
		pref = KERNEL_MIN_GPA;
	if (init_size < kernel_size)
		init_size = kernel_size;
	/*
	 * A relocatable kernel could go elsewhere, but its preferred address
	 * is where it runs without relocating itself; vmig always uses it.
	 */
	dst = vmig_vm_gpa_to_hva(vm, pref, init_size);
	if (!dst || pref + init_size > low_ram_end(vm)) {
		vmig_err_set(err, -ENOMEM, "the kernel needs RAM from 0x%" PRIx64 " to 0x%" PRIx64
			     " and the VM's RAM below 3 GiB ends at 0x%" PRIx64 ": give it more "
			     "--memory", pref, pref + init_size, low_ram_end(vm));
		return -ENOMEM;
	}
	memcpy(dst, image + setup_size, kernel_size);

	/* The setup header goes into the zero page as the loader found it. */
	hdr_end = 0x202 + image[HDR_JUMP + 1];
	if (hdr_end > HDR_END_MAX)
		hdr_end = HDR_END_MAX;
	memcpy(zp + BP_HDR, image + BP_HDR, hdr_end - BP_HDR);

	k->load_gpa = pref;
	k->end_gpa = pref + init_size;
	k->entry_gpa = pref + 0x200;         /* startup_64 of the decompressor */
	k->initrd_max = get32(image + HDR_INITRD_ADDR_MAX);
	k->cmdline_max = version >= 0x0206 ? get32(image + HDR_CMDLINE_SIZE) : 255;
	return 0;
}

/* ---- ELF vmlinux ---- */

static int load_vmlinux(struct vmig_vm *vm, const uint8_t *image, size_t size,
			uint8_t *zp, struct kernel_image *k, struct vmig_err *err)
{
	Elf64_Ehdr eh;
	unsigned int i, loaded = 0;
	uint64_t lo = UINT64_MAX, hi = 0;
	bool entry_found = false;

	if (size < sizeof(eh) || image[EI_CLASS] != ELFCLASS64) {
		vmig_err_set(err, -ENOEXEC, "the kernel is an ELF file but not a 64-bit one; "
			     "vmig boots 64-bit x86 kernels");
		return -ENOEXEC;
	}
	memcpy(&eh, image, sizeof(eh));
	if (eh.e_machine != EM_X86_64 || eh.e_type != ET_EXEC) {
		vmig_err_set(err, -ENOEXEC, "the ELF file is not an x86-64 executable "
			     "(machine %u, type %u)", eh.e_machine, eh.e_type);
		return -ENOEXEC;
	}
	if (eh.e_phentsize != sizeof(Elf64_Phdr) || eh.e_phoff > size ||
	    eh.e_phnum > (size - eh.e_phoff) / sizeof(Elf64_Phdr)) {
		vmig_err_set(err, -ENOEXEC, "the kernel's ELF program headers are damaged");
		return -ENOEXEC;
	}
	for (i = 0; i < eh.e_phnum; i++) {
		Elf64_Phdr ph;
		uint8_t *dst;

		memcpy(&ph, image + eh.e_phoff + (size_t)i * sizeof(ph), sizeof(ph));
		if (ph.p_type != PT_LOAD || !ph.p_memsz)
			continue;
		if (ph.p_filesz > ph.p_memsz || ph.p_offset > size ||
		    ph.p_filesz > size - ph.p_offset) {
			vmig_err_set(err, -ENOEXEC, "a segment of the kernel lies outside "
				     "the file (truncated?)");
			return -ENOEXEC;
		}
		dst = vmig_vm_gpa_to_hva(vm, ph.p_paddr, ph.p_memsz);
		if (!dst || ph.p_paddr < KERNEL_MIN_GPA ||
		    ph.p_paddr + ph.p_memsz > low_ram_end(vm)) {
			vmig_err_set(err, -ENOMEM, "the kernel segment at 0x%" PRIx64 " (%" PRIu64
				     " bytes) does not fit the VM's RAM between 1 MiB and 0x%"
				     PRIx64 ": give it more --memory", ph.p_paddr, ph.p_memsz,
				     low_ram_end(vm));
			return -ENOMEM;
		}
		memcpy(dst, image + ph.p_offset, ph.p_filesz);
		memset(dst + ph.p_filesz, 0, ph.p_memsz - ph.p_filesz);
		/* Linux's vmlinux gives the physical entry; other ELF kernels a virtual one. */
		if (eh.e_entry >= ph.p_paddr && eh.e_entry - ph.p_paddr < ph.p_memsz) {
			k->entry_gpa = eh.e_entry;
			entry_found = true;
		} else if (!entry_found && eh.e_entry >= ph.p_vaddr &&
			   eh.e_entry - ph.p_vaddr < ph.p_memsz) {
			k->entry_gpa = ph.p_paddr + (eh.e_entry - ph.p_vaddr);
			entry_found = true;
		}
		if (ph.p_paddr < lo)
			lo = ph.p_paddr;
		if (ph.p_paddr + ph.p_memsz > hi)
			hi = ph.p_paddr + ph.p_memsz;
		loaded++;
	}
	if (!loaded || !entry_found) {
		vmig_err_set(err, -ENOEXEC, "the ELF file has %s", loaded ?
			     "its entry point outside every loaded segment" : "nothing to load");
		return -ENOEXEC;
	}

	/* No setup header in an ELF file: write the fields the kernel reads. */
	zp[HDR_SETUP_SECTS] = 0;
	put16(zp + HDR_BOOT_FLAG, 0xaa55);
	memcpy(zp + HDR_MAGIC, "HdrS", 4);
	put16(zp + HDR_VERSION, MIN_PROTOCOL);
	put32(zp + HDR_KERNEL_ALIGNMENT, 0x200000);
	zp[HDR_LOADFLAGS] = LOADED_HIGH;
	k->load_gpa = lo;
	k->end_gpa = (hi + 0x1fffff) & ~0x1fffffull;
	k->initrd_max = 0x7fffffff;
	k->cmdline_max = 2047;
	return 0;
}

/* ---- the zero page ---- */

static unsigned int build_e820(const struct vmig_vm *vm, struct e820_entry *e)
{
	unsigned int n = 0;

	e[n++] = (struct e820_entry){ 0, LOW_MEM_END, E820_RAM };
	e[n++] = (struct e820_entry){ LOW_MEM_END, 0xa0000 - LOW_MEM_END, E820_RESERVED };
	e[n++] = (struct e820_entry){ BIOS_START, 0x100000 - BIOS_START, E820_RESERVED };
	e[n++] = (struct e820_entry){ 0x100000, low_ram_end(vm) - 0x100000, E820_RAM };
	e[n++] = (struct e820_entry){ KVM_PRIVATE_GPA, VMIG_VM_HIGH_RAM_START - KVM_PRIVATE_GPA,
				      E820_RESERVED };
	if (vm->nr_regions > 1)
		e[n++] = (struct e820_entry){ vm->regions[1].gpa, vm->regions[1].size, E820_RAM };
	return n;
}

static int place_initrd(struct vmig_vm *vm, uint8_t *zp, const struct kernel_image *k,
			const uint8_t *initrd, size_t initrd_size, struct vmig_err *err)
{
	uint64_t top = low_ram_end(vm), gpa;
	uint8_t *dst;

	if (!initrd)
		return 0;
	if (k->initrd_max && (uint64_t)k->initrd_max + 1 < top)
		top = (uint64_t)k->initrd_max + 1;
	gpa = initrd_size <= top ? (top - initrd_size) & ~0xfffull : 0;
	if (gpa < k->end_gpa) {
		vmig_err_set(err, -ENOMEM, "the initrd (%zu bytes) does not fit between the "
			     "kernel's end (0x%" PRIx64 ") and 0x%" PRIx64 ": give the VM more "
			     "--memory", initrd_size, k->end_gpa, top);
		return -ENOMEM;
	}
	dst = vmig_vm_gpa_to_hva(vm, gpa, initrd_size);
	if (!dst) {
		vmig_err_set(err, -ENOMEM, "the initrd does not fit the VM's RAM");
		return -ENOMEM;
	}
	memcpy(dst, initrd, initrd_size);
	put32(zp + HDR_RAMDISK_IMAGE, (uint32_t)gpa);
	put32(zp + HDR_RAMDISK_SIZE, (uint32_t)initrd_size);
	put32(zp + BP_EXT_RAMDISK_IMAGE, (uint32_t)(gpa >> 32));
	put32(zp + BP_EXT_RAMDISK_SIZE, (uint32_t)((uint64_t)initrd_size >> 32));
	return 0;
}

static int write_zero_page(struct vmig_vm *vm, uint8_t *zp, const struct kernel_image *k,
			   const char *cmdline, struct vmig_err *err)
{
	struct e820_entry e820[8];
	size_t len = cmdline ? strlen(cmdline) : 0;
	unsigned int n;
	char *cl;

	if (len > k->cmdline_max || len >= CMDLINE_MAX) {
		vmig_err_set(err, -E2BIG, "the kernel command line is %zu bytes; this kernel "
			     "takes at most %u", len, k->cmdline_max < CMDLINE_MAX - 1 ?
			     k->cmdline_max : CMDLINE_MAX - 1);
		return -E2BIG;
	}
	cl = vmig_vm_gpa_to_hva(vm, CMDLINE_GPA, len + 1);
	memcpy(cl, cmdline ? cmdline : "", len);
	cl[len] = 0;

	zp[HDR_TYPE_OF_LOADER] = 0xff;                 /* "undefined" boot loader */
	zp[HDR_LOADFLAGS] = (zp[HDR_LOADFLAGS] | CAN_USE_HEAP | LOADED_HIGH) & ~KEEP_SEGMENTS;
	put16(zp + HDR_HEAP_END_PTR, 0xfe00);
	put32(zp + HDR_CMD_LINE_PTR, (uint32_t)CMDLINE_GPA);
	put32(zp + BP_EXT_CMD_LINE_PTR, 0);
	put64(zp + BP_ACPI_RSDP_ADDR, ACPI_GPA);

	n = build_e820(vm, e820);
	zp[BP_E820_ENTRIES] = (uint8_t)n;
	memcpy(zp + BP_E820_TABLE, e820, n * sizeof(e820[0]));
	return 0;
}

/* ---- MP table (Intel MultiProcessor Specification 1.4) ---- */

static uint8_t checksum(const uint8_t *p, size_t len)
{
	uint8_t sum = 0;

	while (len--)
		sum += *p++;
	return (uint8_t)-sum;
}

size_t vmig__mptable_write(uint8_t *base, uint32_t gpa, unsigned int nr_vcpus)
{
	uint8_t *mpf = base, *mpc = base + 16, *p = mpc + 44;
	unsigned int i, entries = 0, ioapic_id = nr_vcpus;

	memset(base, 0, 1024);
	/* Processors: LAPIC ID = vCPU id, vCPU 0 boots. */
	for (i = 0; i < nr_vcpus; i++, p += 20, entries++) {
		p[0] = 0;
		p[1] = (uint8_t)i;
		p[2] = 0x14;                              /* LAPIC version */
		p[3] = 0x01 | (i == 0 ? 0x02 : 0);        /* enabled, BSP */
		put32(p + 4, 0x600);                      /* family 6 */
		put32(p + 8, 0x201);                      /* FPU, APIC */
	}
	/* Bus 0: ISA. */
	p[0] = 1;
	p[1] = 0;
	memcpy(p + 2, "ISA   ", 6);
	p += 8, entries++;
	/* The IOAPIC. */
	p[0] = 2;
	p[1] = (uint8_t)ioapic_id;
	p[2] = 0x11;
	p[3] = 0x01;
	put32(p + 4, VMIG__IOAPIC_GPA);
	p += 8, entries++;
	/*
	 * ISA IRQ n on IOAPIC pin n, including the PIT's IRQ 0: that is how
	 * KVM's default GSI routing wires its in-kernel PIT and KVM_IRQ_LINE.
	 * IRQ 2 is the PICs' cascade and has no pin of its own.
	 */
	for (i = 0; i < 16; i++) {
		if (i == 2)
			continue;
		p[0] = 3;
		p[1] = 0;                                 /* INT */
		put16(p + 2, 0);                          /* bus defaults: edge, high */
		p[4] = 0;
		p[5] = (uint8_t)i;
		p[6] = (uint8_t)ioapic_id;
		p[7] = (uint8_t)i;
		p += 8, entries++;
	}
	/* LINT0: ExtINT (the PIC, virtual wire mode); LINT1: NMI; all LAPICs. */
	for (i = 0; i < 2; i++) {
		p[0] = 4;
		p[1] = i ? 1 : 3;
		put16(p + 2, 0);
		p[4] = 0;
		p[5] = 0;
		p[6] = 0xff;
		p[7] = (uint8_t)i;
		p += 8, entries++;
	}

	memcpy(mpc, "PCMP", 4);
	put16(mpc + 4, (uint16_t)(p - mpc));
	mpc[6] = 4;                                       /* spec 1.4 */
	memcpy(mpc + 8, "VMIG    ", 8);
	memcpy(mpc + 16, "KVM VM      ", 12);
	put16(mpc + 34, (uint16_t)entries);
	put32(mpc + 36, VMIG__LAPIC_GPA);
	mpc[7] = checksum(mpc, (size_t)(p - mpc));

	memcpy(mpf, "_MP_", 4);
	put32(mpf + 4, gpa + 16);
	mpf[8] = 1;                                       /* 16-byte units */
	mpf[9] = 4;
	mpf[10] = checksum(mpf, 16);
	return (size_t)(p - base);
}

/* ---- CPU state: long mode with identity paging ---- */

static void write_tables(struct vmig_vm *vm)
{
	uint64_t *gdt = vmig_vm_gpa_to_hva(vm, GDT_GPA, 4 * 8);
	uint64_t *pml4 = vmig_vm_gpa_to_hva(vm, PML4_GPA, 4096);
	uint64_t *pdpt = vmig_vm_gpa_to_hva(vm, PDPT_GPA, 4096);
	uint64_t *pd = vmig_vm_gpa_to_hva(vm, PD_GPA, 4 * 4096);
	unsigned int i;

	gdt[0] = 0;
	gdt[1] = 0;
	gdt[2] = 0x00af9b000000ffffull;   /* 0x10: 64-bit code, DPL 0 */
	gdt[3] = 0x00cf93000000ffffull;   /* 0x18: data, 4 GiB */

	memset(pml4, 0, 4096);
	memset(pdpt, 0, 4096);
	pml4[0] = PDPT_GPA | 0x3;                         /* present, writable */
	for (i = 0; i < 4; i++)
		pdpt[i] = (PD_GPA + i * 4096ull) | 0x3;
	for (i = 0; i < 4 * 512; i++)
		pd[i] = ((uint64_t)i << 21) | 0x83;       /* present, writable, 2 MiB */
}

static void segment(struct kvm_segment *s, uint16_t sel, uint8_t type, bool code64)
{
	memset(s, 0, sizeof(*s));
	s->limit = 0xffffffff;
	s->selector = sel;
	s->type = type;
	s->present = 1;
	s->s = 1;
	s->g = 1;
	s->l = code64;
	s->db = !code64;
}

static int enter_long_mode(struct vmig__vcpu *bsp, uint64_t entry, struct vmig_err *err)
{
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	int ret;

	if (ioctl(bsp->fd, KVM_GET_SREGS, &sregs) < 0)
		goto fail;
	segment(&sregs.cs, 0x10, 0xb, true);
	segment(&sregs.ds, 0x18, 0x3, false);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	sregs.gdt.base = GDT_GPA;
	sregs.gdt.limit = 4 * 8 - 1;
	sregs.idt.base = 0;
	sregs.idt.limit = 0;
	sregs.cr3 = PML4_GPA;
	sregs.cr4 = 0x20;                                 /* PAE */
	sregs.cr0 = 0x80000031;                           /* PG | NE | ET | PE */
	sregs.efer = 0x500;                               /* LMA | LME */
	if (ioctl(bsp->fd, KVM_SET_SREGS, &sregs) < 0)
		goto fail;

	memset(&regs, 0, sizeof(regs));
	regs.rflags = 0x2;
	regs.rip = entry;
	regs.rsi = ZERO_PAGE_GPA;
	regs.rsp = BOOT_STACK_GPA;
	if (ioctl(bsp->fd, KVM_SET_REGS, &regs) < 0)
		goto fail;
	return 0;
fail:
	ret = -errno;
	vmig_err_set(err, ret, "cannot put the boot vCPU in long mode: %s", strerror(-ret));
	return ret;
}

int vmig__linux_load(struct vmig_vm *vm, const uint8_t *image, size_t size,
		     const uint8_t *initrd, size_t initrd_size, const char *cmdline,
		     struct vmig_err *err)
{
	struct kernel_image k = { 0 };
	uint8_t *zp, *mp, *acpi;
	int ret;

	if (low_ram_end(vm) < (32ull << 20)) {
		vmig_err_set(err, -ENOMEM, "a Linux guest needs at least 32 MiB of --memory");
		return -ENOMEM;
	}
	zp = vmig_vm_gpa_to_hva(vm, ZERO_PAGE_GPA, 4096);
	mp = vmig_vm_gpa_to_hva(vm, MPTABLE_GPA, 1024);
	acpi = vmig_vm_gpa_to_hva(vm, ACPI_GPA, VMIG__ACPI_SIZE);
	memset(zp, 0, 4096);

	if (vmig__linux_is_bzimage(image, size)) {
		ret = load_bzimage(vm, image, size, zp, &k, err);
	} else if (size >= SELFMAG && !memcmp(image, ELFMAG, SELFMAG)) {
		ret = load_vmlinux(vm, image, size, zp, &k, err);
	} else {
		vmig_err_set(err, -ENOEXEC, "the file is not a Linux kernel: neither a bzImage "
			     "(no \"HdrS\" setup header at offset 0x202) nor an ELF vmlinux");
		ret = -ENOEXEC;
	}
	if (!ret)
		ret = place_initrd(vm, zp, &k, initrd, initrd_size, err);
	if (!ret)
		ret = write_zero_page(vm, zp, &k, cmdline, err);
	if (ret)
		return ret;
	vmig__mptable_write(mp, (uint32_t)MPTABLE_GPA, vm->cfg.nr_vcpus);
	vmig__acpi_write(acpi, (uint32_t)ACPI_GPA, vm->cfg.nr_vcpus);
	write_tables(vm);
	vmig_log(VMIG_LOG_DEBUG, "linux: kernel 0x%" PRIx64 "-0x%" PRIx64 ", entry 0x%" PRIx64
		 ", initrd %zu bytes", k.load_gpa, k.end_gpa, k.entry_gpa, initrd_size);
	return enter_long_mode(&vm->vcpus[0], k.entry_gpa, err);
}

/* The whole of a file, up to @max bytes; *out is malloc'd. */
static int read_file(const char *path, const char *what, size_t max, uint8_t **out,
		     size_t *len, struct vmig_err *err)
{
	struct stat st;
	uint8_t *buf = NULL;
	size_t got = 0;
	ssize_t n;
	int fd, ret;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot open the %s %s: %s", what, path, strerror(-ret));
		return ret;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		ret = S_ISREG(st.st_mode) ? -errno : -EINVAL;
		vmig_err_set(err, ret, "the %s %s is not a regular file", what, path);
		goto out;
	}
	if ((uint64_t)st.st_size > max || st.st_size == 0) {
		ret = -EFBIG;
		vmig_err_set(err, ret, "the %s %s is %s (%lld bytes)", what, path,
			     st.st_size ? "too large" : "empty", (long long)st.st_size);
		goto out;
	}
	buf = malloc((size_t)st.st_size);
	if (!buf) {
		ret = -ENOMEM;
		vmig_err_set(err, ret, "out of memory reading the %s", what);
		goto out;
	}
	while (got < (size_t)st.st_size) {
		n = read(fd, buf + got, (size_t)st.st_size - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			ret = n < 0 ? -errno : -EIO;
			vmig_err_set(err, ret, "cannot read the %s %s: %s", what, path,
				     n < 0 ? strerror(-ret) : "file shrank");
			goto out;
		}
		got += (size_t)n;
	}
	*out = buf;
	*len = got;
	buf = NULL;
	ret = 0;
out:
	free(buf);
	close(fd);
	return ret;
}

void vmig__boot_free(struct vmig__boot *b)
{
	free(b->kernel);
	free(b->initrd);
	free(b->cmdline);
	memset(b, 0, sizeof(*b));
}

/*
 * The images are read once and kept: a reboot boots the same kernel even
 * if its file changed or (after a migration) does not exist here, as
 * firmware that loaded it into memory would.
 */
int vmig__linux_boot(struct vmig_vm *vm, struct vmig_err *err)
{
	struct vmig__boot *b = &vm->boot;
	int ret;

	if (!b->kernel) {
		ret = read_file(vm->kernel, "kernel", 1ull << 30, &b->kernel, &b->kernel_len, err);
		if (!ret && vm->initrd)
			ret = read_file(vm->initrd, "initrd", 2ull << 30, &b->initrd,
					&b->initrd_len, err);
		if (!ret) {
			b->cmdline = strdup(vm->cmdline ? vm->cmdline : "");
			if (!b->cmdline) {
				ret = -ENOMEM;
				vmig_err_set(err, ret, "out of memory");
			}
		}
		if (ret) {
			vmig__boot_free(b);
			return ret;
		}
	}
	return vmig__linux_load(vm, b->kernel, b->kernel_len, b->initrd, b->initrd_len,
				b->cmdline, err);
}
