/*
 * Multiboot (v1) loader for ELF kernels, such as the built-in test guest.
 *
 * Loads PT_LOAD segments at their physical addresses, writes a multiboot
 * information structure (memory sizes, a memory map, the command line)
 * below 640 KiB and puts the boot vCPU in the machine state the
 * specification promises: 32-bit protected mode, flat segments, paging
 * and interrupts off, EAX = 0x2BADB002, EBX = the information's address.
 * Other vCPUs wait for INIT/SIPI in the in-kernel LAPIC, as on hardware.
 *
 * The image is trusted no more than a file off disk: every offset and
 * size is checked against the image and against guest RAM.
 */
#include "config.h"

#include <elf.h>
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/ioctl.h>

#include "vmm-internal.h"

#define MB_HEADER_MAGIC      0x1BADB002u
#define MB_BOOT_MAGIC        0x2BADB002u
#define MB_SEARCH_LEN        8192u
#define MB_FLAG_AOUT_KLUDGE  (1u << 16)

#define MB_INFO_MEM          (1u << 0)
#define MB_INFO_CMDLINE      (1u << 2)
#define MB_INFO_MMAP         (1u << 6)

/* Where vmig puts the information structure, map and command line. */
#define MB_INFO_GPA          0x90000u
#define MB_MMAP_GPA          0x90100u
#define MB_CMDLINE_GPA       0x91000u
#define MB_CMDLINE_MAX       4096u
#define LOW_MEM_END          0x9fc00u   /* 639 KiB usable, then EBDA */

struct mb_info {
	uint32_t flags;
	uint32_t mem_lower, mem_upper;
	uint32_t boot_device;
	uint32_t cmdline;
	uint32_t mods_count, mods_addr;
	uint32_t syms[4];
	uint32_t mmap_length, mmap_addr;
} __attribute__((packed));

struct mb_mmap_entry {
	uint32_t size;                 /* of the rest of the entry: 20 */
	uint64_t addr, len;
	uint32_t type;                 /* 1 = RAM, 2 = reserved */
} __attribute__((packed));

struct segment {
	uint64_t paddr, offset, filesz, memsz;
};

static int load_segment(struct vmig_vm *vm, const uint8_t *image, size_t size,
			const struct segment *s, struct vmig_err *err)
{
	uint8_t *dst;

	if (s->filesz > s->memsz || s->offset > size || s->filesz > size - s->offset) {
		vmig_err_set(err, -ENOEXEC, "bad guest kernel: a segment lies outside the file");
		return -ENOEXEC;
	}
	dst = vmig_vm_gpa_to_hva(vm, s->paddr, s->memsz);
	if (!dst || s->paddr < 0x100000) {
		vmig_err_set(err, -ENOEXEC, "guest kernel segment at 0x%" PRIx64 " (+%" PRIu64
			     " bytes) does not fit the guest's RAM above 1 MiB",
			     s->paddr, s->memsz);
		return -ENOEXEC;
	}
	memcpy(dst, image + s->offset, s->filesz);
	memset(dst + s->filesz, 0, s->memsz - s->filesz);
	return 0;
}

static int load_elf(struct vmig_vm *vm, const uint8_t *image, size_t size,
		    uint64_t *entry, struct vmig_err *err)
{
	unsigned int i, phnum, loaded = 0;
	uint64_t phoff, phentsize;
	int ret;

	if (size < EI_NIDENT || memcmp(image, ELFMAG, SELFMAG) != 0) {
		vmig_err_set(err, -ENOEXEC, "guest kernel is not an ELF file");
		return -ENOEXEC;
	}
	if (image[EI_CLASS] == ELFCLASS32) {
		Elf32_Ehdr eh;

		if (size < sizeof(eh))
			goto truncated;
		memcpy(&eh, image, sizeof(eh));
		phoff = eh.e_phoff;
		phnum = eh.e_phnum;
		phentsize = eh.e_phentsize;
		*entry = eh.e_entry;
		if (phentsize != sizeof(Elf32_Phdr))
			goto bad;
	} else if (image[EI_CLASS] == ELFCLASS64) {
		Elf64_Ehdr eh;

		if (size < sizeof(eh))
			goto truncated;
		memcpy(&eh, image, sizeof(eh));
		phoff = eh.e_phoff;
		phnum = eh.e_phnum;
		phentsize = eh.e_phentsize;
		*entry = eh.e_entry;
		if (phentsize != sizeof(Elf64_Phdr))
			goto bad;
	} else {
		goto bad;
	}
	if (phoff > size || phnum > (size - phoff) / phentsize)
		goto truncated;

	for (i = 0; i < phnum; i++) {
		const uint8_t *p = image + phoff + i * phentsize;
		struct segment s;

		if (image[EI_CLASS] == ELFCLASS32) {
			Elf32_Phdr ph;

			memcpy(&ph, p, sizeof(ph));
			if (ph.p_type != PT_LOAD)
				continue;
			s = (struct segment){ ph.p_paddr, ph.p_offset, ph.p_filesz, ph.p_memsz };
		} else {
			Elf64_Phdr ph;

			memcpy(&ph, p, sizeof(ph));
			if (ph.p_type != PT_LOAD)
				continue;
			s = (struct segment){ ph.p_paddr, ph.p_offset, ph.p_filesz, ph.p_memsz };
		}
		ret = load_segment(vm, image, size, &s, err);
		if (ret)
			return ret;
		loaded++;
	}
	if (!loaded)
		goto bad;
	return 0;
truncated:
	vmig_err_set(err, -ENOEXEC, "guest kernel ELF file is truncated");
	return -ENOEXEC;
bad:
	vmig_err_set(err, -ENOEXEC, "guest kernel is not a loadable x86 ELF file");
	return -ENOEXEC;
}

static int find_header(const uint8_t *image, size_t size, struct vmig_err *err)
{
	size_t off, end = size < MB_SEARCH_LEN ? size : MB_SEARCH_LEN;

	for (off = 0; off + 12 <= end; off += 4) {
		uint32_t h[3];

		memcpy(h, image + off, sizeof(h));
		if (h[0] == MB_HEADER_MAGIC && (uint32_t)(h[0] + h[1] + h[2]) == 0) {
			if ((h[1] & 0xffff) & ~0x3u) {
				vmig_err_set(err, -ENOEXEC, "guest kernel asks for multiboot "
					     "features vmig does not offer (flags 0x%x)", h[1]);
				return -ENOEXEC;
			}
			return 0;
		}
	}
	vmig_err_set(err, -ENOEXEC, "guest kernel has no multiboot header in its first 8 KiB");
	return -ENOEXEC;
}

static void write_info(struct vmig_vm *vm, const char *cmdline)
{
	struct mb_info *info = vmig_vm_gpa_to_hva(vm, MB_INFO_GPA, sizeof(*info));
	struct mb_mmap_entry map[5];
	uint64_t low_end = vm->regions[0].size;
	unsigned int n = 0;
	size_t len = strlen(cmdline);

	map[n++] = (struct mb_mmap_entry){ 20, 0, LOW_MEM_END, 1 };
	map[n++] = (struct mb_mmap_entry){ 20, LOW_MEM_END, 0x100000 - LOW_MEM_END, 2 };
	map[n++] = (struct mb_mmap_entry){ 20, 0x100000, low_end - 0x100000, 1 };
	if (vm->nr_regions > 1)
		map[n++] = (struct mb_mmap_entry){ 20, vm->regions[1].gpa,
						   vm->regions[1].size, 1 };
	memcpy(vmig_vm_gpa_to_hva(vm, MB_MMAP_GPA, sizeof(map)), map, n * sizeof(map[0]));

	if (len >= MB_CMDLINE_MAX)
		len = MB_CMDLINE_MAX - 1;
	memcpy(vmig_vm_gpa_to_hva(vm, MB_CMDLINE_GPA, MB_CMDLINE_MAX), cmdline, len);
	((char *)vmig_vm_gpa_to_hva(vm, MB_CMDLINE_GPA, MB_CMDLINE_MAX))[len] = 0;

	memset(info, 0, sizeof(*info));
	info->flags = MB_INFO_MEM | MB_INFO_CMDLINE | MB_INFO_MMAP;
	info->mem_lower = LOW_MEM_END / 1024;
	info->mem_upper = (uint32_t)((low_end - 0x100000) / 1024);
	info->cmdline = MB_CMDLINE_GPA;
	info->mmap_addr = MB_MMAP_GPA;
	info->mmap_length = n * sizeof(map[0]);
}

static void flat_segment(struct kvm_segment *s, uint16_t sel, uint8_t type)
{
	memset(s, 0, sizeof(*s));
	s->base = 0;
	s->limit = 0xffffffff;
	s->selector = sel;
	s->type = type;
	s->present = 1;
	s->dpl = 0;
	s->db = 1;
	s->s = 1;
	s->g = 1;
}

static int enter_protected_mode(struct vmig__vcpu *bsp, uint64_t entry,
				struct vmig_err *err)
{
	struct kvm_sregs sregs;
	struct kvm_regs regs;

	if (ioctl(bsp->fd, KVM_GET_SREGS, &sregs) < 0)
		goto fail;
	flat_segment(&sregs.cs, 0x08, 0xb);           /* code, execute/read, accessed */
	flat_segment(&sregs.ds, 0x10, 0x3);           /* data, read/write, accessed */
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	sregs.cr0 = 0x11;                             /* PE | ET */
	sregs.cr3 = 0;
	sregs.cr4 = 0;
	sregs.efer = 0;
	if (ioctl(bsp->fd, KVM_SET_SREGS, &sregs) < 0)
		goto fail;

	memset(&regs, 0, sizeof(regs));
	regs.rflags = 0x2;
	regs.rip = entry;
	regs.rax = MB_BOOT_MAGIC;
	regs.rbx = MB_INFO_GPA;
	if (ioctl(bsp->fd, KVM_SET_REGS, &regs) < 0)
		goto fail;
	return 0;
fail:
	vmig_err_set(err, -errno, "cannot set the boot vCPU's registers: %s", strerror(errno));
	return -errno;
}

int vmig__multiboot_load(struct vmig_vm *vm, const uint8_t *image, size_t size,
			 const char *cmdline, struct vmig_err *err)
{
	uint64_t entry;
	int ret;

	ret = find_header(image, size, err);
	if (ret)
		return ret;
	ret = load_elf(vm, image, size, &entry, err);
	if (ret)
		return ret;
	if (entry < 0x100000 || entry >= vm->regions[0].size) {
		vmig_err_set(err, -ENOEXEC, "guest kernel entry point 0x%" PRIx64
			     " is outside its RAM", entry);
		return -ENOEXEC;
	}
	write_info(vm, cmdline);
	return enter_protected_mode(&vm->vcpus[0], entry, err);
}
