/*
 * A KVM virtual machine: creation in dependency order, the run state
 * machine (CREATED -> RUNNING <-> PAUSED -> STOPPED) and teardown.
 *
 * Threads: every public function runs on the owner thread.  vCPU threads
 * only take vm->lock to report pause/exit and call vmig__vm_stop_self()
 * to stop the VM when the guest ends (power-off, triple fault, error).
 *
 * Invariant: vmig_vm_destroy() works on a VM in any state, including one
 * half built by a failed vmig_vm_create(): every fd starts at -1, every
 * pointer at NULL, and each piece is torn down only if it was built.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "vmig/guest-abi.h"
#include "vmm-internal.h"

#define MIN_MEM   (16ull << 20)
#define MEM_ALIGN (2ull << 20)

/* Addresses KVM needs for its own use on Intel; inside the MMIO hole. */
#define KVM_TSS_GPA          0xfffbd000u
#define KVM_IDENTITY_MAP_GPA 0xfffbc000u

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static int check_config(const struct vmig_vm_config *cfg, bool have_boot,
			struct vmig_err *err)
{
	char sz[32];

	if (!cfg->name || vmig_vm_name_valid(cfg->name) < 0) {
		vmig_err_set(err, -EINVAL, "bad VM name '%s': use 1-64 letters, digits, "
			     "'.', '_' or '-', not starting with '.' or '-'",
			     cfg->name ? cfg->name : "");
		return -EINVAL;
	}
	if (cfg->nr_vcpus < 1 || cfg->nr_vcpus > VMIG_VM_MAX_VCPUS) {
		vmig_err_set(err, -EINVAL, "bad vCPU count %u: vmig runs 1 to %u vCPUs",
			     cfg->nr_vcpus, VMIG_VM_MAX_VCPUS);
		return -EINVAL;
	}
	if (cfg->mem_size < MIN_MEM || cfg->mem_size % MEM_ALIGN) {
		vmig_size_format(cfg->mem_size, sz, sizeof(sz));
		vmig_err_set(err, -EINVAL, "bad memory size %s: it must be at least 16 MiB "
			     "and a multiple of 2 MiB", sz);
		return -EINVAL;
	}
	if (cfg->incoming)
		return 0;
	if (cfg->kernel || have_boot) {
		if (cfg->workload) {
			vmig_err_set(err, -EINVAL, "a VM boots either a Linux --kernel or the "
				     "built-in guest's --workload, not both");
			return -EINVAL;
		}
		return 0;
	}
	if (cfg->initrd || cfg->cmdline) {
		vmig_err_set(err, -EINVAL, "an initrd or a kernel command line needs a --kernel");
		return -EINVAL;
	}
	return vmig_guest_workload_check(cfg->workload, cfg->mem_size, cfg->nr_vcpus, err);
}

/* The dirty ring must be enabled before any vCPU exists. */
static int enable_dirty_ring(struct vmig_vm *vm, struct vmig_err *err)
{
	uint32_t n = vm->cfg.dirty_ring_entries;
	struct kvm_enable_cap cap = { 0 };
	int max, ret;

	if (n & (n - 1)) {
		vmig_err_set(err, -EINVAL, "bad dirty ring size %u: use a power of two", n);
		return -EINVAL;
	}
	max = ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
	if (max > 0) {
		cap.cap = KVM_CAP_DIRTY_LOG_RING_ACQ_REL;
		vm->ring_acq_rel = true;
	} else {
		max = ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING);
		cap.cap = KVM_CAP_DIRTY_LOG_RING;
	}
	if (max <= 0) {
		vmig_err_set(err, -ENOTSUP, "this host's KVM has no dirty ring "
			     "(KVM_CAP_DIRTY_LOG_RING)");
		return -ENOTSUP;
	}
	if ((uint64_t)n * sizeof(struct kvm_dirty_gfn) > (uint64_t)max) {
		vmig_err_set(err, -EINVAL, "dirty ring of %u entries is larger than this "
			     "host's KVM allows (%zu)", n, (size_t)max / sizeof(struct kvm_dirty_gfn));
		return -EINVAL;
	}
	cap.args[0] = (uint64_t)n * sizeof(struct kvm_dirty_gfn);
	if (ioctl(vm->vm_fd, KVM_ENABLE_CAP, &cap) < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot enable a dirty ring of %u entries: %s", n,
			     strerror(-ret));
		return ret;
	}
	return 0;
}

static int create_machine(struct vmig_vm *vm, struct vmig_err *err)
{
	struct kvm_pit_config pit = { .flags = 0 };
	int ret;

	vm->vm_fd = ioctl(vm->kvm_fd, KVM_CREATE_VM, 0);
	if (vm->vm_fd < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot create a KVM VM: %s", strerror(-ret));
		return ret;
	}
	/* Only VMX needs these two; other KVMs may refuse them harmlessly. */
	if (ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, KVM_TSS_GPA) < 0)
		vmig_log(VMIG_LOG_DEBUG, "KVM_SET_TSS_ADDR: %s", strerror(errno));
	if (ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SET_IDENTITY_MAP_ADDR) > 0) {
		uint64_t addr = KVM_IDENTITY_MAP_GPA;

		if (ioctl(vm->vm_fd, KVM_SET_IDENTITY_MAP_ADDR, &addr) < 0)
			vmig_log(VMIG_LOG_DEBUG, "KVM_SET_IDENTITY_MAP_ADDR: %s", strerror(errno));
	}
	if (vm->cfg.dirty_ring_entries) {
		ret = enable_dirty_ring(vm, err);
		if (ret)
			return ret;
	}
	if (ioctl(vm->vm_fd, KVM_CREATE_IRQCHIP, 0) < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot create the in-kernel interrupt controller: %s",
			     strerror(-ret));
		return ret;
	}
	if (ioctl(vm->vm_fd, KVM_CREATE_PIT2, &pit) < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot create the in-kernel PIT: %s", strerror(-ret));
		return ret;
	}
	vmig__serial_set_irq(&vm->serial, vm->vm_fd);
	return 0;
}

static int load_guest(struct vmig_vm *vm, struct vmig_err *err)
{
	char cmdline[1024];
	int n;

	if (vm->kernel || vm->boot.kernel)
		return vmig__linux_boot(vm, err);
	n = snprintf(cmdline, sizeof(cmdline), "vcpus=%u tsc_khz=%u %s",
		     vm->cfg.nr_vcpus, vm->tsc_khz, vm->workload ? vm->workload : "");
	if (n < 0 || (size_t)n >= sizeof(cmdline)) {
		vmig_err_set(err, -E2BIG, "the --workload specification is too long");
		return -E2BIG;
	}
	return vmig__multiboot_load(vm, vmig__guest_image,
				    (size_t)(vmig__guest_image_end - vmig__guest_image),
				    cmdline, err);
}

/* Build a VM; @boot (NULL: none) is taken over, whatever the outcome. */
static int create(const struct vmig_vm_config *cfg, struct vmig__boot *boot,
		  struct vmig_vm **out, struct vmig_err *err)
{
	struct vmig_vm *vm;
	unsigned int i;
	int ret;

	*out = NULL;
	ret = check_config(cfg, boot && boot->kernel, err);
	if (!ret) {
		ret = vmig__vcpu_setup_signals();
		if (ret)
			vmig_err_set(err, ret, "cannot install the vCPU signal handler: %s",
				     strerror(-ret));
	}
	vm = ret ? NULL : calloc(1, sizeof(*vm));
	if (!vm) {
		if (!ret) {
			ret = -ENOMEM;
			vmig_err_set(err, ret, "out of memory");
		}
		if (boot)
			vmig__boot_free(boot);
		return ret;
	}
	if (boot) {
		vm->boot = *boot;
		memset(boot, 0, sizeof(*boot));
	}
	vmig__acpi_pm_init(&vm->acpi_pm);
	vm->kvm_fd = vm->vm_fd = vm->event_fd = vm->mem_fd = -1;
	for (i = 0; i < VMIG_VM_MAX_VCPUS; i++)
		vm->vcpus[i].fd = -1;
	pthread_mutex_init(&vm->lock, NULL);
	pthread_cond_init(&vm->cond, NULL);
	vm->cfg = *cfg;
	vm->name = strdup(cfg->name);
	vm->workload = cfg->workload ? strdup(cfg->workload) : NULL;
	vm->kernel = cfg->kernel && !cfg->incoming ? strdup(cfg->kernel) : NULL;
	vm->initrd = cfg->initrd && !cfg->incoming ? strdup(cfg->initrd) : NULL;
	vm->cmdline = cfg->cmdline && !cfg->incoming ? strdup(cfg->cmdline) : NULL;
	if (!vm->name || (cfg->workload && !vm->workload) ||
	    (cfg->kernel && !cfg->incoming && !vm->kernel) ||
	    (cfg->initrd && !cfg->incoming && !vm->initrd) ||
	    (cfg->cmdline && !cfg->incoming && !vm->cmdline)) {
		ret = -ENOMEM;
		vmig_err_set(err, ret, "out of memory");
		goto fail;
	}
	vm->cfg.name = vm->name;
	vm->cfg.workload = vm->workload;
	vm->cfg.kernel = vm->kernel;
	vm->cfg.initrd = vm->initrd;
	vm->cfg.cmdline = vm->cmdline;
	vmig__serial_init(&vm->serial, cfg->console_fd);
	vmig__cmos_init(&vm->cmos, cfg->mem_size < VMIG_VM_LOW_RAM_END ? cfg->mem_size :
			VMIG_VM_LOW_RAM_END, cfg->mem_size > VMIG_VM_LOW_RAM_END ?
			cfg->mem_size - VMIG_VM_LOW_RAM_END : 0);

	vm->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (vm->event_fd < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "eventfd: %s", strerror(-ret));
		goto fail;
	}
	ret = vmig__kvm_open(&vm->kvm_fd, err);
	if (ret)
		goto fail;
	ret = vmig__kvm_check_caps(vm->kvm_fd, err);
	if (ret)
		goto fail;
	ret = vmig__kvm_supported_cpuid(vm->kvm_fd, &vm->cpuid);
	if (ret) {
		vmig_err_set(err, ret, "cannot read the host's supported CPUID: %s", strerror(-ret));
		goto fail;
	}
	ret = create_machine(vm, err);
	if (ret)
		goto fail;
	ret = vmig__mem_create(vm, err);
	vm->cfg.prealloc = NULL;          /* borrowed for vmig__mem_create() only */
	if (ret)
		goto fail;
	for (i = 0; i < cfg->nr_vcpus; i++) {
		ret = vmig__vcpu_create(vm, i, err);
		if (ret)
			goto fail;
	}
	if (!cfg->incoming) {
		ret = load_guest(vm, err);
		if (ret)
			goto fail;
	}
	vm->state = VMIG_VM_CREATED;
	*out = vm;
	return 0;
fail:
	vmig_vm_destroy(vm);
	return ret;
}

int vmig_vm_create(const struct vmig_vm_config *cfg, struct vmig_vm **out,
		   struct vmig_err *err)
{
	return create(cfg, NULL, out, err);
}

bool vmig_vm_can_reboot(const struct vmig_vm *vm)
{
	return vm->boot.kernel != NULL;
}

int vmig_vm_recreate(struct vmig_vm **vmp, struct vmig_err *err)
{
	struct vmig_vm *old = *vmp;
	struct vmig_vm_config cfg = old->cfg;
	struct vmig__boot boot = old->boot;
	char *strs[5] = { old->name, old->workload, old->kernel, old->initrd, old->cmdline };
	unsigned int i;
	int ret;

	/* cfg keeps pointing at the old VM's strings, which it no longer frees. */
	memset(&old->boot, 0, sizeof(old->boot));
	old->name = old->workload = old->kernel = old->initrd = old->cmdline = NULL;
	vmig_vm_destroy(old);
	*vmp = NULL;
	cfg.incoming = false;
	ret = create(&cfg, boot.kernel ? &boot : NULL, vmp, err);
	for (i = 0; i < 5; i++)
		free(strs[i]);
	return ret;
}

static bool all_paused_locked(struct vmig_vm *vm)
{
	unsigned int i;

	for (i = 0; i < vm->cfg.nr_vcpus; i++) {
		struct vmig__vcpu *v = &vm->vcpus[i];

		if (v->thread_started && !v->paused && !v->exited)
			return false;
	}
	return true;
}

static int start(struct vmig_vm *vm, bool paused, struct vmig_err *err)
{
	unsigned int i;
	int ret;

	if (vm->state != VMIG_VM_CREATED) {
		vmig_err_set(err, -EALREADY, "the VM was already started");
		return -EALREADY;
	}
	vm->start_ns = now_ns();
	if (paused) {
		/* The threads see the request before their first KVM_RUN. */
		pthread_mutex_lock(&vm->lock);
		for (i = 0; i < vm->cfg.nr_vcpus; i++)
			vm->vcpus[i].pause_req = true;
		pthread_mutex_unlock(&vm->lock);
	}
	for (i = 0; i < vm->cfg.nr_vcpus; i++) {
		ret = vmig__vcpu_thread_start(&vm->vcpus[i]);
		if (ret) {
			vmig_err_set(err, ret, "cannot start the thread of vCPU %u: %s",
				     i, strerror(-ret));
			vmig_vm_stop(vm);
			return ret;
		}
	}
	pthread_mutex_lock(&vm->lock);
	if (vm->state == VMIG_VM_CREATED)
		vm->state = paused ? VMIG_VM_PAUSED : VMIG_VM_RUNNING;
	if (paused)
		while (!all_paused_locked(vm))
			pthread_cond_wait(&vm->cond, &vm->lock);
	pthread_mutex_unlock(&vm->lock);
	return 0;
}

int vmig_vm_start(struct vmig_vm *vm, struct vmig_err *err)
{
	return start(vm, false, err);
}

int vmig_vm_start_paused(struct vmig_vm *vm, struct vmig_err *err)
{
	return start(vm, true, err);
}

int vmig_vm_pause(struct vmig_vm *vm)
{
	unsigned int i;
	int ret = 0;

	pthread_mutex_lock(&vm->lock);
	if (atomic_load(&vm->stopping) || vm->state == VMIG_VM_STOPPED) {
		ret = -ESHUTDOWN;
		goto out;
	}
	if (vm->state == VMIG_VM_PAUSED)
		goto out;
	for (i = 0; i < vm->cfg.nr_vcpus; i++) {
		vm->vcpus[i].pause_req = true;
		vmig__vcpu_kick(&vm->vcpus[i]);
	}
	pthread_cond_broadcast(&vm->cond);    /* a throttled vCPU sleeps on it */
	while (!all_paused_locked(vm))
		pthread_cond_wait(&vm->cond, &vm->lock);
	if (atomic_load(&vm->stopping))
		ret = -ESHUTDOWN;
	else
		vm->state = VMIG_VM_PAUSED;
out:
	pthread_mutex_unlock(&vm->lock);
	return ret;
}

int vmig_vm_resume(struct vmig_vm *vm)
{
	unsigned int i;
	int ret = 0;

	pthread_mutex_lock(&vm->lock);
	if (atomic_load(&vm->stopping) || vm->state == VMIG_VM_STOPPED) {
		ret = -ESHUTDOWN;
	} else if (vm->state == VMIG_VM_PAUSED) {
		for (i = 0; i < vm->cfg.nr_vcpus; i++)
			vm->vcpus[i].pause_req = false;
		vm->state = VMIG_VM_RUNNING;
		pthread_cond_broadcast(&vm->cond);
	}
	pthread_mutex_unlock(&vm->lock);
	return ret;
}

void vmig_vm_stop(struct vmig_vm *vm)
{
	unsigned int i;

	pthread_mutex_lock(&vm->lock);
	if (!vm->stop_reason[0])
		snprintf(vm->stop_reason, sizeof(vm->stop_reason), "stopped by request");
	atomic_store(&vm->stopping, true);
	for (i = 0; i < vm->cfg.nr_vcpus; i++)
		vmig__vcpu_kick(&vm->vcpus[i]);
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);

	for (i = 0; i < vm->cfg.nr_vcpus; i++) {
		if (vm->vcpus[i].thread_started) {
			pthread_join(vm->vcpus[i].thread, NULL);
			vm->vcpus[i].thread_started = false;
		}
	}
	pthread_mutex_lock(&vm->lock);
	vm->state = VMIG_VM_STOPPED;
	pthread_mutex_unlock(&vm->lock);
}

void vmig_vm_destroy(struct vmig_vm *vm)
{
	unsigned int i;

	if (!vm)
		return;
	vmig_vm_stop(vm);
	for (i = 0; i < VMIG_VM_MAX_VCPUS; i++)
		vmig__vcpu_destroy(&vm->vcpus[i]);
	vmig__mem_destroy(vm);
	if (vm->vm_fd >= 0)
		close(vm->vm_fd);
	if (vm->kvm_fd >= 0)
		close(vm->kvm_fd);
	if (vm->event_fd >= 0)
		close(vm->event_fd);
	free(vm->cpuid);
	vmig__serial_fini(&vm->serial);
	vmig__cmos_fini(&vm->cmos);
	vmig__acpi_pm_fini(&vm->acpi_pm);
	vmig__boot_free(&vm->boot);
	pthread_cond_destroy(&vm->cond);
	pthread_mutex_destroy(&vm->lock);
	free(vm->name);
	free(vm->workload);
	free(vm->kernel);
	free(vm->initrd);
	free(vm->cmdline);
	free(vm);
}

enum vmig_vm_state vmig_vm_state(const struct vmig_vm *vm)
{
	struct vmig_vm *v = (struct vmig_vm *)vm;
	enum vmig_vm_state s;

	pthread_mutex_lock(&v->lock);
	s = atomic_load(&v->stopping) ? VMIG_VM_STOPPED : v->state;
	pthread_mutex_unlock(&v->lock);
	return s;
}

const char *vmig_vm_state_name(enum vmig_vm_state state)
{
	switch (state) {
	case VMIG_VM_CREATED: return "created";
	case VMIG_VM_RUNNING: return "running";
	case VMIG_VM_PAUSED:  return "paused";
	case VMIG_VM_STOPPED: return "stopped";
	}
	return "unknown";
}

int vmig_vm_event_fd(const struct vmig_vm *vm)
{
	return vm->event_fd;
}

const char *vmig_vm_stop_reason(const struct vmig_vm *vm)
{
	return vm->stop_reason;
}

int vmig_vm_exit_code(const struct vmig_vm *vm)
{
	return vm->exit_code;
}

bool vmig_vm_reboot_requested(const struct vmig_vm *vm)
{
	struct vmig_vm *v = (struct vmig_vm *)vm;
	bool r;

	pthread_mutex_lock(&v->lock);
	r = v->reboot;
	pthread_mutex_unlock(&v->lock);
	return r;
}

size_t vmig_vm_console_input(struct vmig_vm *vm, const void *buf, size_t len)
{
	return vmig__serial_input(&vm->serial, buf, len);
}

int vmig_vm_console_tap(struct vmig_vm *vm, int fd)
{
	return vmig__serial_set_tap(&vm->serial, fd);
}

const struct vmig_vm_config *vmig_vm_config(const struct vmig_vm *vm)
{
	return &vm->cfg;
}

uint64_t vmig_vm_uptime_ms(const struct vmig_vm *vm)
{
	return vm->start_ns ? (now_ns() - vm->start_ns) / 1000000 : 0;
}

int vmig_vm_kvm_fd(const struct vmig_vm *vm)
{
	return vm->kvm_fd;
}

int vmig_vm_mem_fd(const struct vmig_vm *vm)
{
	return vm->mem_fd;
}

int vmig_vm_fd(const struct vmig_vm *vm)
{
	return vm->vm_fd;
}

unsigned int vmig_vm_nr_vcpus(const struct vmig_vm *vm)
{
	return vm->cfg.nr_vcpus;
}

struct kvm_dirty_gfn *vmig_vm_dirty_ring(const struct vmig_vm *vm, unsigned int vcpu,
					 uint32_t *entries, bool *acq_rel)
{
	if (vcpu >= vm->cfg.nr_vcpus || !vm->vcpus[vcpu].ring)
		return NULL;
	if (entries)
		*entries = vm->cfg.dirty_ring_entries;
	if (acq_rel)
		*acq_rel = vm->ring_acq_rel;
	return vm->vcpus[vcpu].ring;
}

void vmig_vm_set_ring_full_handler(struct vmig_vm *vm, vmig_vm_ring_full_fn *fn,
				   void *arg)
{
	pthread_mutex_lock(&vm->lock);
	vm->ring_full_fn = fn;
	vm->ring_full_arg = arg;
	pthread_mutex_unlock(&vm->lock);
}

unsigned int vmig_vm_regions(const struct vmig_vm *vm,
			     const struct vmig_mem_region **regions)
{
	*regions = vm->regions;
	return vm->nr_regions;
}

void *vmig_vm_gpa_to_hva(const struct vmig_vm *vm, uint64_t gpa, uint64_t len)
{
	unsigned int i;

	for (i = 0; i < vm->nr_regions; i++) {
		const struct vmig_mem_region *r = &vm->regions[i];

		if (gpa >= r->gpa && gpa - r->gpa <= r->size && len <= r->size - (gpa - r->gpa))
			return r->hva + (gpa - r->gpa);
	}
	return NULL;
}
