/*
 * vCPU threads.
 *
 * Each vCPU has one thread that loops on KVM_RUN and handles exits to user
 * space (port I/O for the serial port and the power-off port; MMIO reads
 * as zero).  Everything else the guest does stays in the kernel: the
 * in-kernel LAPIC/IOAPIC/PIC and PIT, and HLT.
 *
 * Pausing.  The owner sets pause_req under vm->lock, sets
 * run->immediate_exit = 1 and sends SIGVMIG_KICK to the thread.  Whatever
 * point the thread is at, it comes back to the top of its loop: if it is in
 * KVM_RUN the signal makes KVM_RUN return -EINTR; if it is just about to
 * enter, immediate_exit makes KVM_RUN return -EINTR at once.  The thread
 * clears immediate_exit only under vm->lock and only when no request is
 * pending, so a request can never be lost between the check and KVM_RUN.
 *
 * Before reporting itself paused, a thread whose last exit was port I/O or
 * MMIO runs KVM_RUN once more with immediate_exit = 1: KVM then completes
 * the instruction (the data of an IN goes into the guest register) and
 * returns without running guest code, so the saved state is consistent.
 */
#include "config.h"

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <asm/kvm_para.h>

#include "vmig/guest-abi.h"
#include "vmm-internal.h"

#define SIGVMIG_KICK VMIG__SIGKICK

static void kick_handler(int sig)
{
	(void)sig;
}

int vmig__vcpu_setup_signals(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = kick_handler;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0;        /* no SA_RESTART: KVM_RUN must return -EINTR */
	if (sigaction(SIGVMIG_KICK, &sa, NULL) < 0)
		return -errno;
	return 0;
}

void vmig__vm_stop_self(struct vmig_vm *vm, int exit_code, const char *fmt, ...)
{
	va_list ap;
	uint64_t one = 1;
	bool first;

	pthread_mutex_lock(&vm->lock);
	first = !vm->stop_reason[0];
	if (first) {
		va_start(ap, fmt);
		vsnprintf(vm->stop_reason, sizeof(vm->stop_reason), fmt, ap);
		va_end(ap);
		vm->exit_code = exit_code;
	}
	atomic_store(&vm->stopping, true);
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
	if (first && write(vm->event_fd, &one, sizeof(one)) < 0)
		vmig_log(VMIG_LOG_WARN, "cannot signal the VM event fd: %s", strerror(errno));
}

int vmig__vcpu_create(struct vmig_vm *vm, unsigned int id, struct vmig_err *err)
{
	struct vmig__vcpu *vcpu = &vm->vcpus[id];
	struct kvm_cpuid2 *cpuid;
	size_t sz;
	int mmap_size, ret;
	uint32_t i;

	vcpu->vm = vm;
	vcpu->id = id;
	vcpu->fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, id);
	if (vcpu->fd < 0) {
		ret = -errno;
		vmig_err_set(err, ret, "cannot create vCPU %u: %s", id, strerror(-ret));
		return ret;
	}
	mmap_size = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (mmap_size < (int)sizeof(struct kvm_run)) {
		ret = mmap_size < 0 ? -errno : -EINVAL;
		vmig_err_set(err, ret, "KVM_GET_VCPU_MMAP_SIZE failed");
		return ret;
	}
	vcpu->run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu->fd, 0);
	if (vcpu->run == MAP_FAILED) {
		ret = -errno;
		vcpu->run = NULL;
		vmig_err_set(err, ret, "cannot map vCPU %u's run area: %s", id, strerror(-ret));
		return ret;
	}
	vcpu->run_size = mmap_size;

	if (vm->cfg.dirty_ring_entries) {
		vcpu->ring_bytes = (size_t)vm->cfg.dirty_ring_entries * sizeof(struct kvm_dirty_gfn);
		vcpu->ring = mmap(NULL, vcpu->ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED,
				  vcpu->fd, KVM_DIRTY_LOG_PAGE_OFFSET * sysconf(_SC_PAGESIZE));
		if (vcpu->ring == MAP_FAILED) {
			ret = -errno;
			vcpu->ring = NULL;
			vmig_err_set(err, ret, "cannot map vCPU %u's dirty ring: %s", id,
				     strerror(-ret));
			return ret;
		}
	}

	/* The host's CPUID with this vCPU's APIC ID filled in. */
	sz = sizeof(*cpuid) + vm->cpuid->nent * sizeof(cpuid->entries[0]);
	cpuid = malloc(sz);
	if (!cpuid) {
		vmig_err_set(err, -ENOMEM, "out of memory");
		return -ENOMEM;
	}
	memcpy(cpuid, vm->cpuid, sz);
	for (i = 0; i < cpuid->nent; i++) {
		struct kvm_cpuid_entry2 *e = &cpuid->entries[i];

		if (e->function == 1) {
			e->ebx = (e->ebx & 0x0000ffffu) | (id << 24) |
				 (vm->cfg.nr_vcpus << 16);
			e->edx |= 1u << 28;            /* HTT: more than one logical CPU */
		} else if (e->function == 0xb || e->function == 0x1f) {
			e->edx = id;
		} else if (e->function == KVM_CPUID_FEATURES) {
			/*
			 * No paravirtual features that work by hypercall (PV IPIs,
			 * sched yield, PV unhalt): a KVM that emulates guest ring
			 * 0 may not complete VMCALL/VMMCALL, and the guest then
			 * spins on it.  Nor asynchronous page faults, whose
			 * host-side state does not migrate.  kvmclock stays.
			 */
			e->eax &= ~((1u << KVM_FEATURE_PV_SEND_IPI) |
				    (1u << KVM_FEATURE_PV_SCHED_YIELD) |
				    (1u << KVM_FEATURE_PV_UNHALT) |
				    (1u << KVM_FEATURE_ASYNC_PF) |
				    (1u << KVM_FEATURE_ASYNC_PF_INT) |
				    (1u << KVM_FEATURE_ASYNC_PF_VMEXIT) |
				    (1u << KVM_FEATURE_POLL_CONTROL));
		}
	}
	ret = ioctl(vcpu->fd, KVM_SET_CPUID2, cpuid) < 0 ? -errno : 0;
	free(cpuid);
	if (ret) {
		vmig_err_set(err, ret, "cannot set vCPU %u's CPUID: %s", id, strerror(-ret));
		return ret;
	}
	if (id == 0) {
		ret = ioctl(vcpu->fd, KVM_GET_TSC_KHZ, 0);
		vm->tsc_khz = ret > 0 ? (uint32_t)ret : 0;
	}
	return 0;
}

void vmig__vcpu_destroy(struct vmig__vcpu *vcpu)
{
	if (vcpu->ring)
		munmap(vcpu->ring, vcpu->ring_bytes);
	vcpu->ring = NULL;
	if (vcpu->run)
		munmap(vcpu->run, vcpu->run_size);
	vcpu->run = NULL;
	if (vcpu->fd >= 0)
		close(vcpu->fd);
	vcpu->fd = -1;
}

void vmig__vcpu_kick(struct vmig__vcpu *vcpu)
{
	/* Caller holds vm->lock and has set pause_req, stopping or the throttle. */
	if (vcpu->run)
		vcpu->run->immediate_exit = 1;
	if (vcpu->thread_started && !vcpu->exited)
		pthread_kill(vcpu->thread, SIGVMIG_KICK);
}

static void handle_io(struct vmig__vcpu *vcpu)
{
	struct vmig_vm *vm = vcpu->vm;
	struct kvm_run *run = vcpu->run;
	uint8_t *data = (uint8_t *)run + run->io.data_offset;
	uint32_t i, j;

	for (i = 0; i < run->io.count; i++, data += run->io.size) {
		uint16_t port = run->io.port;
		bool wr = run->io.direction == KVM_EXIT_IO_OUT;

		if (port >= 0x3f8 && port < 0x400 && run->io.size == 1) {
			vmig__serial_io(&vm->serial, port - 0x3f8, wr, data);
		} else if (vmig__platform_io(vm, port, wr, data, run->io.size)) {
			continue;
		} else if (port == VMIG_GUEST_EXIT_PORT && wr) {
			if (data[0] == 0)
				vmig__vm_stop_self(vm, 0, "the guest powered off");
			else if (data[0] == VMIG_GUEST_EXIT_BAD_DATA)
				vmig__vm_stop_self(vm, data[0], "the guest found corrupted memory "
						   "and stopped (see its console for the page)");
			else if (data[0] == VMIG_GUEST_EXIT_FATAL)
				vmig__vm_stop_self(vm, data[0], "the guest hit a fatal error "
						   "and stopped (see its console)");
			else
				vmig__vm_stop_self(vm, data[0],
						   "the guest powered off with status %u", data[0]);
		} else if (!wr) {
			/* Nothing there: reads float high, like an empty ISA bus. */
			for (j = 0; j < run->io.size; j++)
				data[j] = 0xff;
		}
	}
}

/*
 * The bytes of the instruction at RIP, for an emulation failure: from KVM's
 * report if it has them, else read through the guest's page tables.
 * Returns how many bytes were found (0..15).
 */
static unsigned int insn_bytes(struct vmig__vcpu *vcpu, uint64_t rip, uint8_t *out)
{
	struct kvm_run *run = vcpu->run;
	struct kvm_sregs sregs;
	uint64_t linear = rip;
	unsigned int n = 0;
	uint8_t *p;

	if (run->emulation_failure.suberror == KVM_INTERNAL_ERROR_EMULATION &&
	    run->emulation_failure.ndata >= 3 &&
	    (run->emulation_failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) &&
	    run->emulation_failure.insn_size) {
		n = run->emulation_failure.insn_size;
		if (n > 15)
			n = 15;
		memcpy(out, run->emulation_failure.insn_bytes, n);
		return n;
	}
	if (ioctl(vcpu->fd, KVM_GET_SREGS, &sregs) == 0)
		linear += sregs.cs.base;
	/* Byte by byte: the instruction may cross into an unmapped page. */
	for (n = 0; n < 15; n++) {
		struct kvm_translation t = { .linear_address = linear + n };

		if (ioctl(vcpu->fd, KVM_TRANSLATE, &t) < 0 || !t.valid)
			break;
		p = vmig_vm_gpa_to_hva(vcpu->vm, t.physical_address, 1);
		if (!p)
			break;
		out[n] = *p;
	}
	return n;
}

/*
 * Some KVMs run guest ring 0 in KVM's instruction emulator (no hardware
 * virtualization, e.g. kvm_pvm), which gives up on a few instructions a
 * kernel does use.  Two are simple enough to finish here: INT3 (a #BP
 * trap: RIP moves past it, then the exception is injected, which is what
 * the CPU does) and WAIT/FWAIT (nothing to wait for: vmig's guests have no
 * pending x87 exceptions).  Linux runs one INT3 at boot, its alternatives
 * self-test, and more whenever it patches live code.  Returns true if the
 * instruction was completed and the vCPU may go on.
 */
static bool finish_unemulated(struct vmig__vcpu *vcpu)
{
	struct kvm_run *run = vcpu->run;
	struct kvm_vcpu_events ev;
	struct kvm_regs regs;
	uint8_t insn[15];

	if (run->internal.suberror != KVM_INTERNAL_ERROR_EMULATION)
		return false;
	if (ioctl(vcpu->fd, KVM_GET_REGS, &regs) < 0 || insn_bytes(vcpu, regs.rip, insn) < 1)
		return false;
	if (insn[0] != 0xcc && insn[0] != 0x9b)
		return false;
	if (insn[0] == 0xcc) {
		if (ioctl(vcpu->fd, KVM_GET_VCPU_EVENTS, &ev) < 0 || ev.exception.injected ||
		    ev.interrupt.injected || ev.nmi.injected)
			return false;
	}
	regs.rip++;
	if (ioctl(vcpu->fd, KVM_SET_REGS, &regs) < 0)
		return false;
	if (insn[0] == 0xcc) {
		ev.exception.injected = 1;
		ev.exception.nr = 3;                  /* #BP */
		ev.exception.has_error_code = 0;
		ev.exception.error_code = 0;
		ev.flags = 0;
		if (ioctl(vcpu->fd, KVM_SET_VCPU_EVENTS, &ev) < 0) {
			vmig_log(VMIG_LOG_WARN, "vCPU %u: cannot inject #BP: %s", vcpu->id,
				 strerror(errno));
			return false;
		}
	}
	vcpu->unemulated++;
	vmig_log(VMIG_LOG_DEBUG, "vCPU %u: finished %s at rip 0x%llx for KVM's emulator",
		 vcpu->id, insn[0] == 0xcc ? "INT3" : "FWAIT", (unsigned long long)regs.rip - 1);
	return true;
}

static void report_internal_error(struct vmig__vcpu *vcpu)
{
	struct kvm_run *run = vcpu->run;
	struct kvm_regs regs;
	unsigned long long rip = 0;
	char extra[160] = "", bytes[64] = "";
	uint8_t insn[15];
	size_t len = 0, blen = 0;
	unsigned int i, n = 0;

	if (ioctl(vcpu->fd, KVM_GET_REGS, &regs) == 0) {
		rip = regs.rip;
		n = insn_bytes(vcpu, rip, insn);
	}
	for (i = 0; i < n && blen < sizeof(bytes); i++)
		blen += snprintf(bytes + blen, sizeof(bytes) - blen, "%s%02x", i ? " " : "", insn[i]);
	for (i = 0; i < run->internal.ndata && i < 4 && len < sizeof(extra); i++)
		len += snprintf(extra + len, sizeof(extra) - len, " 0x%llx",
				(unsigned long long)run->internal.data[i]);
	vmig__vm_stop_self(vcpu->vm, -1,
			   "vCPU %u stopped: KVM internal error, suberror %u%s at rip 0x%llx"
			   "%s%s%s%s%s",
			   vcpu->id, run->internal.suberror,
			   run->internal.suberror == KVM_INTERNAL_ERROR_EMULATION ?
			   " (KVM cannot emulate this instruction)" : "", rip,
			   n ? ", instruction bytes " : "", bytes,
			   n ? "" : " (instruction bytes unreadable)",
			   len ? ", data" : "", extra);
}

/* Returns false when the vCPU must stop running. */
static bool handle_exit(struct vmig__vcpu *vcpu)
{
	struct kvm_run *run = vcpu->run;

	switch (run->exit_reason) {
	case KVM_EXIT_IO:
		handle_io(vcpu);
		return true;
	case KVM_EXIT_MMIO:
		if (!run->mmio.is_write)
			memset(run->mmio.data, 0, sizeof(run->mmio.data));
		return true;
	case KVM_EXIT_INTR:
		return true;
	case KVM_EXIT_DIRTY_RING_FULL: {
		struct vmig_vm *vm = vcpu->vm;
		vmig_vm_ring_full_fn *fn;
		void *arg;

		pthread_mutex_lock(&vm->lock);
		fn = vm->ring_full_fn;
		arg = vm->ring_full_arg;
		pthread_mutex_unlock(&vm->lock);
		if (!fn) {
			vmig__vm_stop_self(vm, -1, "vCPU %u: dirty ring full and nobody "
					   "collects it", vcpu->id);
			return false;
		}
		fn(arg, vcpu->id);
		return true;
	}
	case KVM_EXIT_HLT:
		vmig__vm_stop_self(vcpu->vm, 0, "the guest halted");
		return false;
	case KVM_EXIT_SHUTDOWN:
		vmig__vm_stop_self(vcpu->vm, -1, "vCPU %u: the guest shut down (triple fault)",
				   vcpu->id);
		return false;
	case KVM_EXIT_SYSTEM_EVENT:
		if (run->system_event.type == KVM_SYSTEM_EVENT_SHUTDOWN)
			vmig__vm_stop_self(vcpu->vm, 0, "the guest powered off");
		else
			vmig__vm_stop_self(vcpu->vm, -1, "vCPU %u: guest system event %u",
					   vcpu->id, run->system_event.type);
		return false;
	case KVM_EXIT_INTERNAL_ERROR:
		if (finish_unemulated(vcpu))
			return true;
		report_internal_error(vcpu);
		return false;
	case KVM_EXIT_FAIL_ENTRY:
		vmig__vm_stop_self(vcpu->vm, -1, "vCPU %u: KVM could not enter the guest "
				   "(hardware reason 0x%llx)", vcpu->id,
				   (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
		return false;
	default:
		vmig__vm_stop_self(vcpu->vm, -1, "vCPU %u: unexpected KVM exit reason %u",
				   vcpu->id, run->exit_reason);
		return false;
	}
}

/* Let KVM finish an I/O instruction without running further guest code. */
static void complete_pending_io(struct vmig__vcpu *vcpu)
{
	uint32_t reason = vcpu->run->exit_reason;

	if (reason != KVM_EXIT_IO && reason != KVM_EXIT_MMIO)
		return;
	vcpu->run->immediate_exit = 1;
	if (ioctl(vcpu->fd, KVM_RUN, 0) == 0 || errno != EINTR)
		vmig_log(VMIG_LOG_WARN, "vCPU %u: completing an I/O exit did not return EINTR",
			 vcpu->id);
	vcpu->run->exit_reason = KVM_EXIT_INTR;
}

static void *vcpu_thread(void *arg)
{
	struct vmig__vcpu *vcpu = arg;
	struct vmig_vm *vm = vcpu->vm;
	char name[16];
	sigset_t set;

	snprintf(name, sizeof(name), "vcpu%u", vcpu->id);
	pthread_setname_np(pthread_self(), name);
	sigemptyset(&set);
	sigaddset(&set, SIGVMIG_KICK);
	pthread_sigmask(SIG_UNBLOCK, &set, NULL);

	for (;;) {
		pthread_mutex_lock(&vm->lock);
		if (vcpu->pause_req && !atomic_load(&vm->stopping)) {
			pthread_mutex_unlock(&vm->lock);
			complete_pending_io(vcpu);
			pthread_mutex_lock(&vm->lock);
		}
		while (vcpu->pause_req && !atomic_load(&vm->stopping)) {
			if (!vcpu->paused) {
				vcpu->paused = true;
				pthread_cond_broadcast(&vm->cond);
			}
			pthread_cond_wait(&vm->cond, &vm->lock);
		}
		vcpu->paused = false;
		if (atomic_load(&vm->stopping)) {
			pthread_mutex_unlock(&vm->lock);
			break;
		}
		vcpu->run->immediate_exit = 0;
		pthread_mutex_unlock(&vm->lock);

		if (ioctl(vcpu->fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN) {
				vcpu->run->exit_reason = KVM_EXIT_INTR;
				vmig__vcpu_throttle_point(vcpu);
				continue;
			}
			vmig__vm_stop_self(vm, -1, "vCPU %u: KVM_RUN failed: %s", vcpu->id,
					   strerror(errno));
			break;
		}
		if (!handle_exit(vcpu))
			break;
	}

	vmig__vcpu_throttle_fini(vcpu);
	pthread_mutex_lock(&vm->lock);
	vcpu->exited = true;
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
	return NULL;
}

int vmig__vcpu_thread_start(struct vmig__vcpu *vcpu)
{
	sigset_t set, old;
	int ret;

	/* Start with the kick signal blocked; the thread unblocks it itself. */
	sigemptyset(&set);
	sigaddset(&set, SIGVMIG_KICK);
	pthread_sigmask(SIG_BLOCK, &set, &old);
	ret = -pthread_create(&vcpu->thread, NULL, vcpu_thread, vcpu);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (ret == 0)
		vcpu->thread_started = true;
	return ret;
}
