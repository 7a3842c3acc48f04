/*
 * Guest RAM: one memfd holds all of it; it is mapped once and registered
 * as up to two KVM memory slots, RAM below VMIG_VM_LOW_RAM_END at gpa 0 and
 * the rest at 4 GiB, leaving the usual hole for MMIO (LAPIC, IOAPIC).
 *
 * The mapping is MAP_NORESERVE and the memfd sparse: a large, mostly
 * untouched guest costs only what it touches.  The memfd (rather than
 * anonymous memory) is what later lets a destination or a restarted VMM
 * share or hand over the RAM.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vmm-internal.h"

/* RAM + swap: more than this the host cannot give, however sparse. */
int vmig__mem_host_limit(uint64_t *bytes)
{
	FILE *f = fopen("/proc/meminfo", "re");
	char line[256];
	uint64_t total = 0, swap = 0, v;

	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "MemTotal: %" SCNu64 " kB", &v) == 1)
			total = v * 1024;
		else if (sscanf(line, "SwapTotal: %" SCNu64 " kB", &v) == 1)
			swap = v * 1024;
	}
	fclose(f);
	if (!total)
		return -EIO;
	*bytes = total + swap;
	return 0;
}

static int add_slot(struct vmig_vm *vm, uint64_t gpa, uint64_t size,
		    uint64_t offset, struct vmig_err *err)
{
	struct vmig_mem_region *r = &vm->regions[vm->nr_regions];
	struct kvm_userspace_memory_region kr = {
		.slot = vm->nr_regions,
		.flags = 0,
		.guest_phys_addr = gpa,
		.memory_size = size,
		.userspace_addr = (uintptr_t)(vm->mem + offset),
	};

	if (ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &kr) < 0) {
		int ret = -errno;

		vmig_err_set(err, ret, "cannot register guest RAM at 0x%" PRIx64
			     " (%" PRIu64 " MiB) with KVM: %s", gpa, size >> 20,
			     strerror(-ret));
		return ret;
	}
	r->gpa = gpa;
	r->size = size;
	r->hva = vm->mem + offset;
	r->slot = kr.slot;
	r->offset = offset;
	vm->nr_regions++;
	return 0;
}

int vmig__mem_create(struct vmig_vm *vm, struct vmig_err *err)
{
	uint64_t size = vm->cfg.mem_size, limit, low;
	char memfd_name[96];
	int ret;

	ret = vmig__mem_host_limit(&limit);
	if (ret == 0 && size > limit) {
		char want[32], have[32];

		vmig_size_format(size, want, sizeof(want));
		vmig_size_format(limit, have, sizeof(have));
		vmig_err_set(err, -ENOMEM, "cannot give the guest %s of RAM: this host "
			     "has %s of RAM and swap in all", want, have);
		return -ENOMEM;
	}

	if (vm->cfg.prealloc && vm->cfg.prealloc->size >= size && vm->cfg.prealloc->fd >= 0) {
		struct vmig_prealloc *pa = vm->cfg.prealloc;

		/* Take it over; give back what this VM does not need. */
		if (ftruncate(pa->fd, (off_t)size) == 0) {
			if (pa->size > size)
				munmap(pa->mem + size, pa->size - size);
			vm->mem_fd = pa->fd;
			vm->mem = pa->mem;
			pa->fd = -1;
			pa->mem = NULL;
			pa->size = 0;
			pa->used = true;
			goto mapped;
		}
	}

	snprintf(memfd_name, sizeof(memfd_name), "vmig-ram:%s", vm->name);
	vm->mem_fd = memfd_create(memfd_name, MFD_CLOEXEC);
	if (vm->mem_fd < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot create guest RAM: memfd_create: %s",
			     strerror(-ret));
		return ret;
	}
	if (ftruncate(vm->mem_fd, (off_t)size) < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot size guest RAM to %" PRIu64 " MiB: %s",
			     size >> 20, strerror(-ret));
		return ret;
	}
	vm->mem = mmap(NULL, size, PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_NORESERVE, vm->mem_fd, 0);
	if (vm->mem == MAP_FAILED) {
		ret = -errno;
		vm->mem = NULL;
		vmig_err_set(err, ret, "cannot map %" PRIu64 " MiB of guest RAM: %s",
			     size >> 20, strerror(-ret));
		return ret;
	}
mapped:
	vm->mem_size = size;
	/* Guest RAM is not worth a core dump of many GiB. */
	madvise(vm->mem, size, MADV_DONTDUMP);

	low = size < VMIG_VM_LOW_RAM_END ? size : VMIG_VM_LOW_RAM_END;
	ret = add_slot(vm, 0, low, 0, err);
	if (ret)
		return ret;
	if (size > low)
		ret = add_slot(vm, VMIG_VM_HIGH_RAM_START, size - low, low, err);
	return ret;
}

int vmig_vm_set_dirty_logging(struct vmig_vm *vm, bool on, struct vmig_err *err)
{
	unsigned int i;
	int ret;

	for (i = 0; i < vm->nr_regions; i++) {
		const struct vmig_mem_region *r = &vm->regions[i];
		struct kvm_userspace_memory_region kr = {
			.slot = r->slot,
			.flags = on ? KVM_MEM_LOG_DIRTY_PAGES : 0,
			.guest_phys_addr = r->gpa,
			.memory_size = r->size,
			.userspace_addr = (uintptr_t)r->hva,
		};

		if (ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &kr) < 0) {
			ret = -errno;
			vmig_err_set(err, ret, "cannot turn dirty logging %s on slot %u: %s",
				     on ? "on" : "off", r->slot, strerror(-ret));
			/* Leave every slot as it was. */
			while (i-- > 0) {
				kr = (struct kvm_userspace_memory_region){
					.slot = vm->regions[i].slot,
					.flags = on ? 0 : KVM_MEM_LOG_DIRTY_PAGES,
					.guest_phys_addr = vm->regions[i].gpa,
					.memory_size = vm->regions[i].size,
					.userspace_addr = (uintptr_t)vm->regions[i].hva,
				};
				ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &kr);
			}
			return ret;
		}
	}
	vm->dirty_logging = on;
	return 0;
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23        /* Linux 5.14 */
#endif

int vmig_prealloc_create(uint64_t size, struct vmig_prealloc **out, struct vmig_err *err)
{
	struct vmig_prealloc *pa;
	uint64_t limit;
	int ret;

	*out = NULL;
	if (!size || size % (2ull << 20)) {
		vmig_err_set(err, -EINVAL, "cannot preallocate %" PRIu64 " bytes: a multiple "
			     "of 2 MiB is needed", size);
		return -EINVAL;
	}
	if (vmig__mem_host_limit(&limit) == 0 && size > limit) {
		vmig_err_set(err, -ENOMEM, "cannot preallocate %" PRIu64 " MiB: this host has "
			     "%" PRIu64 " MiB of RAM and swap in all", size >> 20, limit >> 20);
		return -ENOMEM;
	}
	pa = calloc(1, sizeof(*pa));
	if (!pa)
		return -ENOMEM;
	pa->fd = memfd_create("vmig-ram:prealloc", MFD_CLOEXEC);
	if (pa->fd < 0 || ftruncate(pa->fd, (off_t)size) < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot create %" PRIu64 " MiB of RAM: %s", size >> 20,
			     strerror(-ret));
		goto fail;
	}
	pa->mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
		       pa->fd, 0);
	if (pa->mem == MAP_FAILED) {
		ret = -errno;
		pa->mem = NULL;
		vmig_err_set(err, ret, "cannot map %" PRIu64 " MiB of RAM: %s", size >> 20,
			     strerror(-ret));
		goto fail;
	}
	pa->size = size;
	/* Allocate and map every page now, writable, without writing it. */
	if (madvise(pa->mem, size, MADV_POPULATE_WRITE) < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot preallocate %" PRIu64 " MiB of RAM: %s%s",
			     size >> 20, strerror(-ret), ret == -EINVAL ?
			     " (MADV_POPULATE_WRITE needs Linux 5.14)" : "");
		goto fail;
	}
	*out = pa;
	return 0;
fail:
	vmig_prealloc_destroy(pa);
	return ret;
}

void vmig_prealloc_destroy(struct vmig_prealloc *pa)
{
	if (!pa)
		return;
	if (pa->mem)
		munmap(pa->mem, pa->size);
	if (pa->fd >= 0)
		close(pa->fd);
	free(pa);
}

void vmig__mem_destroy(struct vmig_vm *vm)
{
	if (vm->mem)
		munmap(vm->mem, vm->mem_size);
	vm->mem = NULL;
	if (vm->mem_fd >= 0)
		close(vm->mem_fd);
	vm->mem_fd = -1;
	vm->nr_regions = 0;
}
