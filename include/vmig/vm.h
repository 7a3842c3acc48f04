/*
 * vmig VMM: one KVM virtual machine owned by this process.
 *
 * A struct vmig_vm owns the /dev/kvm fds, guest RAM (memfd-backed, mapped
 * into KVM memory slots), one thread per vCPU, the in-kernel irqchip and
 * PIT, and the emulated devices (16550 serial, the power-off port).
 * Other layers borrow guest RAM through vmig_vm_regions(); they never
 * issue KVM ioctls on the VM themselves except through vmm/ interfaces.
 *
 * Threads: the owner thread calls every function here; vCPU threads are
 * private.  Pause/resume/stop are synchronous: they return once every vCPU
 * has left KVM_RUN (pause, stop) or was released (resume).
 */
#ifndef VMIG_VM_H
#define VMIG_VM_H

#include <stdbool.h>
#include <stdint.h>

#include "vmig/util.h"

#define VMIG_VM_MAX_VCPUS        32u
#define VMIG_VM_MAX_REGIONS      2u

/* Guest-physical layout: RAM below the PCI hole, the rest above 4 GiB. */
#define VMIG_VM_LOW_RAM_END      0xC0000000ull   /* 3 GiB */
#define VMIG_VM_HIGH_RAM_START   0x100000000ull  /* 4 GiB */

struct vmig_vm;

/*
 * Guest RAM allocated and faulted in before a VM needs it, so that a
 * migration's destination does not pay first touch while the pages
 * arrive (vmig incoming --prealloc, like QEMU's -mem-prealloc).  A VM
 * created with it takes it over if it is large enough (the rest is freed);
 * otherwise it is left alone.
 */
struct vmig_prealloc {
	int fd;                  /* memfd, or -1 once taken */
	uint8_t *mem;
	uint64_t size;
	bool used;               /* a VM took it */
};
/* Allocate and populate @size bytes (a multiple of 2 MiB).  0 or -errno. */
int vmig_prealloc_create(uint64_t size, struct vmig_prealloc **out, struct vmig_err *err);
/* Free what no VM took.  NULL-safe. */
void vmig_prealloc_destroy(struct vmig_prealloc *pa);

struct vmig_vm_config {
	const char *name;        /* VM name, for messages and the memfd */
	uint64_t mem_size;       /* bytes, multiple of 2 MiB, >= 16 MiB */
	unsigned int nr_vcpus;   /* 1..VMIG_VM_MAX_VCPUS */
	const char *workload;    /* built-in guest spec "rate=..,wss=..", or NULL */
	int console_fd;          /* serial output; -1 discards it */
	uint32_t dirty_ring_entries; /* per-vCPU KVM dirty ring, power of 2; 0 = none */
	bool incoming;           /* empty machine awaiting migrated state: no guest loaded */
	/*
	 * Boot a Linux kernel (bzImage or ELF vmlinux) instead of the built-in
	 * guest; @workload must then be NULL.  Read during vmig_vm_create().
	 */
	const char *kernel;      /* path, or NULL */
	const char *initrd;      /* path, or NULL */
	const char *cmdline;     /* kernel command line, or NULL */
	struct vmig_prealloc *prealloc;  /* RAM to take over, or NULL (borrowed) */
};

enum vmig_vm_state {
	VMIG_VM_CREATED,         /* built, vCPUs not started */
	VMIG_VM_RUNNING,
	VMIG_VM_PAUSED,
	VMIG_VM_STOPPED,         /* stopped for good (guest power-off, stop, error) */
};

/* One contiguous piece of guest RAM, borrowed from the VM. */
struct vmig_mem_region {
	uint64_t gpa;            /* guest-physical start */
	uint64_t size;           /* bytes, page multiple */
	uint8_t *hva;            /* host mapping of it */
	uint32_t slot;           /* KVM memory slot id */
	uint64_t offset;         /* where it starts in the RAM memfd */
};

/*
 * Build a VM: open /dev/kvm, create the VM, RAM, irqchip, PIT, vCPUs and
 * load the built-in guest.  Nothing runs until vmig_vm_start().
 * Returns 0, or -errno with a message for the user in @err.
 */
int vmig_vm_create(const struct vmig_vm_config *cfg, struct vmig_vm **out,
		   struct vmig_err *err);

/* Join every thread, close every fd, unmap RAM.  NULL-safe. */
void vmig_vm_destroy(struct vmig_vm *vm);

/* Start the vCPU threads (CREATED -> RUNNING).  0 or -errno. */
int vmig_vm_start(struct vmig_vm *vm, struct vmig_err *err);

/* Start the vCPU threads paused (CREATED -> PAUSED): no guest code runs. */
int vmig_vm_start_paused(struct vmig_vm *vm, struct vmig_err *err);

/*
 * Pause: returns once every vCPU is out of KVM_RUN with any pending I/O
 * exit completed, so vCPU state and guest RAM are stable.  Idempotent.
 * -ESHUTDOWN if the VM has stopped.
 */
int vmig_vm_pause(struct vmig_vm *vm);
int vmig_vm_resume(struct vmig_vm *vm);

/* Stop for good: vCPU threads exit.  Idempotent. */
void vmig_vm_stop(struct vmig_vm *vm);

/*
 * Throttle the vCPUs to (100 - @pct) % of their time, 0 to
 * VMIG_VM_MAX_THROTTLE; 0 ends throttling.  For a migration that does not
 * converge.  Any thread; takes effect within a 10 ms slice.  -EINVAL for a
 * value out of range.
 */
#define VMIG_VM_MAX_THROTTLE 99u
int vmig_vm_set_throttle(struct vmig_vm *vm, unsigned int pct);
unsigned int vmig_vm_throttle(const struct vmig_vm *vm);

enum vmig_vm_state vmig_vm_state(const struct vmig_vm *vm);
const char *vmig_vm_state_name(enum vmig_vm_state state);

/*
 * An eventfd that becomes readable when the VM stopped on its own (guest
 * power-off, triple fault, emulation failure).  The reason is then in
 * vmig_vm_stop_reason(); vmig_vm_exit_code() is the guest's power-off
 * value (0 for a clean power-off) or -1 for a failure.
 */
int vmig_vm_event_fd(const struct vmig_vm *vm);
const char *vmig_vm_stop_reason(const struct vmig_vm *vm);
int vmig_vm_exit_code(const struct vmig_vm *vm);

/*
 * True once the VM stopped because the guest asked for a reset (i8042
 * 0xfe, port 0xcf9): the caller may build the VM afresh to reboot it.
 */
bool vmig_vm_reboot_requested(const struct vmig_vm *vm);

/*
 * Whether the VM can boot again after its guest reset it: a Linux guest,
 * whose kernel, initrd and command line the VM keeps in memory from its
 * boot, or received with its state (section linux.boot) when it arrived by
 * migration or restore.
 */
bool vmig_vm_can_reboot(const struct vmig_vm *vm);

/*
 * The guest's reboot: destroy *@vm (stopped) and build, in its place, a
 * fresh VM with the same configuration that boots the same images; not
 * started.  Owner thread.  0, or -errno with @err and *@vm NULL.
 */
int vmig_vm_recreate(struct vmig_vm **vm, struct vmig_err *err);

/*
 * The serial console's input side: bytes typed at the console go to the
 * guest's UART.  Returns how many bytes were taken (the UART's buffer may
 * be full: retry the rest later).  Any thread.
 */
size_t vmig_vm_console_input(struct vmig_vm *vm, const void *buf, size_t len);

/*
 * Copy the console's output to @fd as well (an attached `vmig console`),
 * or stop with -1.  Writes to it must not block the guest: pass a
 * non-blocking fd.  Returns the fd attached before, or -1.  Any thread.
 */
int vmig_vm_console_tap(struct vmig_vm *vm, int fd);

const struct vmig_vm_config *vmig_vm_config(const struct vmig_vm *vm);
uint64_t vmig_vm_uptime_ms(const struct vmig_vm *vm);

/* The RAM regions, in ascending gpa order.  Valid until destroy. */
unsigned int vmig_vm_regions(const struct vmig_vm *vm,
			     const struct vmig_mem_region **regions);

/*
 * The memfd behind all regions (see vmig_mem_region.offset).  Borrowed:
 * lseek(SEEK_DATA/SEEK_HOLE) on it tells which RAM was never written, so
 * a migration need not read (and fault in) a sparse guest's holes.
 */
int vmig_vm_mem_fd(const struct vmig_vm *vm);

/* Host pointer for [gpa, gpa+len) if it lies inside one region, else NULL. */
void *vmig_vm_gpa_to_hva(const struct vmig_vm *vm, uint64_t gpa, uint64_t len);

/* ---- machine state as named sections (vmm/state.c) ---- */

struct vmig_state_section {
	const char *name;        /* e.g. "cpu.regs", "pit" */
	uint16_t version;        /* of the section's layout, 1 */
	uint32_t instance;       /* vCPU id, or 0 */
	const void *data;
	size_t len;
};

/* Receives each section in turn; 0 to go on, -errno to stop the save. */
typedef int vmig_vm_state_emit_fn(void *arg, const char *name, uint16_t version,
				  uint32_t instance, const void *data, size_t len);

/*
 * Save every vCPU's and the VM's state (CPU registers, FPU/XSAVE, MSRs,
 * LAPIC, events, irqchip, PIT, clock, serial, CMOS, ACPI PM, and a Linux
 * guest's boot images for its reboots) of a paused VM.  Owner
 * thread.  0, -EBUSY if the VM runs, or the emitter's or KVM's -errno.
 */
int vmig_vm_state_save(struct vmig_vm *vm, vmig_vm_state_emit_fn *emit, void *arg,
		       struct vmig_err *err);

/* Parts of the state, for vmig_vm_state_save_parts(). */
#define VMIG_STATE_BOOT    0x1u   /* boot images: fixed for the VM's life */
#define VMIG_STATE_MACHINE 0x2u   /* everything else */
/*
 * vmig_vm_state_save() of some @parts only.  VMIG_STATE_BOOT alone does
 * not need the VM paused: a migration sends it before its first pass, so
 * a Linux guest's kernel and initrd (megabytes) are not sent during the
 * pause.  Owner thread.
 */
int vmig_vm_state_save_parts(struct vmig_vm *vm, unsigned int parts,
			     vmig_vm_state_emit_fn *emit, void *arg, struct vmig_err *err);

/*
 * Load a complete set of sections into a VM created with cfg.incoming and
 * not yet started, in the order KVM needs whatever their order in @s.
 * Missing, extra-vCPU, wrong-version or wrong-size sections fail with a
 * message naming the section.
 */
int vmig_vm_state_load(struct vmig_vm *vm, const struct vmig_state_section *s, size_t n,
		       struct vmig_err *err);

/* ---- KVM dirty tracking access, for dirtylog/ (vmm/memory.c, vmm/vcpu.c) ---- */

struct kvm_dirty_gfn;

int vmig_vm_kvm_fd(const struct vmig_vm *vm);    /* /dev/kvm */
int vmig_vm_fd(const struct vmig_vm *vm);        /* the KVM VM */
unsigned int vmig_vm_nr_vcpus(const struct vmig_vm *vm);

/*
 * Turn KVM_MEM_LOG_DIRTY_PAGES on or off on every memory slot of a VM,
 * running or not.  Owner thread.  0 or -errno (with @err); on failure the
 * slots already switched are switched back.
 */
int vmig_vm_set_dirty_logging(struct vmig_vm *vm, bool on, struct vmig_err *err);

/*
 * vCPU @vcpu's dirty ring mapping and its entry count, or NULL if the VM
 * was created without one (cfg.dirty_ring_entries == 0).  *acq_rel tells
 * whether KVM_CAP_DIRTY_LOG_RING_ACQ_REL (not the plain ring) is in use.
 */
struct kvm_dirty_gfn *vmig_vm_dirty_ring(const struct vmig_vm *vm, unsigned int vcpu,
					 uint32_t *entries, bool *acq_rel);

/*
 * Called on vCPU @vcpu's thread when KVM stops it with
 * KVM_EXIT_DIRTY_RING_FULL; it must harvest and reset the rings (at least
 * this vCPU's) before returning, or the vCPU exits again at once.  Set it
 * before turning dirty logging on; NULL clears it.
 */
typedef void vmig_vm_ring_full_fn(void *arg, unsigned int vcpu);
void vmig_vm_set_ring_full_handler(struct vmig_vm *vm, vmig_vm_ring_full_fn *fn,
				   void *arg);

/* ---- the built-in test guest (vmm/testguest.c) ---- */

struct vmig_guest_progress {
	bool present;            /* the status page is set up */
	unsigned int nr_vcpus;
	uint64_t generation;     /* lowest generation over vCPUs */
	uint64_t pages_written;  /* sum over vCPUs */
	uint64_t heartbeat;      /* sum over vCPUs */
};

/* Read the guest's progress counters straight from its memory.  Any thread. */
int vmig_guest_progress(const struct vmig_vm *vm, struct vmig_guest_progress *p);

/*
 * Check every stamped page of a paused built-in guest against its progress
 * counters and checksums (see include/vmig/guest-abi.h).  0 if all hold;
 * -EBADMSG with the first bad page described in @err; -EAGAIN if the guest
 * has not set up its status page yet.
 */
int vmig_guest_verify(const struct vmig_vm *vm, struct vmig_err *err);

/*
 * Check a --workload specification ("rate=N|max,wss=SIZE,gens=N,quiet")
 * against the VM it is for.  0, or -EINVAL with the reason in @err.
 */
int vmig_guest_workload_check(const char *spec, uint64_t mem_size,
			      unsigned int nr_vcpus, struct vmig_err *err);

/* Set host_iteration in the status page (the guest stamps it into pages). */
int vmig_guest_set_iteration(const struct vmig_vm *vm, uint64_t iteration);

/*
 * Ask the built-in guest to power itself off (host_shutdown): vCPU 0 does
 * at its next loop turn, and the VM stops as on any guest power-off.
 * -EFAULT if the guest has not set up its status page (not the built-in
 * guest, or still booting).  Any thread.
 */
int vmig_guest_request_shutdown(const struct vmig_vm *vm);

/*
 * Ask the guest to power itself off (vmig shutdown, virsh shutdown): the
 * built-in guest as vmig_guest_request_shutdown() does; a Linux guest by
 * pressing its ACPI power button (vmm/acpi.c), after which what happens is
 * the guest's choice (a distribution, or vmig's test guest, powers off; the
 * VM then stops as on any ACPI power-off).  0 once asked; -EAGAIN, with the
 * reason in @err, if the guest cannot be asked now: the built-in guest
 * still booting, or a Linux guest that has not enabled its power button
 * (still booting, booted with acpi=off, no button driver).  Owner thread.
 */
int vmig_vm_request_poweroff(struct vmig_vm *vm, struct vmig_err *err);

#endif /* VMIG_VM_H */
