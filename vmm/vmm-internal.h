/* Private cross-file declarations of vmm/. */
#ifndef VMIG_VMM_INTERNAL_H
#define VMIG_VMM_INTERNAL_H

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>
#include <linux/kvm.h>

#include "vmig/vm.h"

/* 16550A UART at COM1 with receive and IRQ 4 (serial.c). */
#define VMIG__SERIAL_RX_SIZE 4096u

struct vmig__serial {
	pthread_mutex_t lock;
	int out_fd;
	int tap_fd;                  /* an attached console client, or -1 */
	int vm_fd;                   /* for KVM_IRQ_LINE, or -1: no interrupts */
	uint8_t ier, lcr, mcr, scr, dll, dlm, fcr;
	bool thr_ipending;
	bool irq_level;
	unsigned int rx_head, rx_count;
	uint8_t rx[VMIG__SERIAL_RX_SIZE];
};

/* The UART's register state, as migrated (section "serial", version 1). */
struct vmig__serial_state {
	uint8_t ier, lcr, mcr, scr, dll, dlm, fcr, reserved;
};

/* The rest of it (section "serial.ext", version 1; optional on load). */
struct vmig__serial_ext_state {
	uint8_t thr_ipending, irq_level, reserved[2];
	uint32_t rx_count;
	uint8_t rx[VMIG__SERIAL_RX_SIZE];
};

void vmig__serial_save(struct vmig__serial *s, struct vmig__serial_state *out,
		       struct vmig__serial_ext_state *ext);
/* @ext NULL: a source without it.  Call after the irqchip is loaded. */
void vmig__serial_load(struct vmig__serial *s, const struct vmig__serial_state *in,
		       const struct vmig__serial_ext_state *ext);
void vmig__serial_init(struct vmig__serial *s, int out_fd);
void vmig__serial_fini(struct vmig__serial *s);
/* Raise IRQ 4 through this VM fd from now on. */
void vmig__serial_set_irq(struct vmig__serial *s, int vm_fd);
/* Port access at offset 0..7 from the base; @data is 1 byte. */
void vmig__serial_io(struct vmig__serial *s, unsigned int off, bool is_write,
		     uint8_t *data);
/* Bytes typed at the console; returns how many fit (the rest is refused). */
size_t vmig__serial_input(struct vmig__serial *s, const uint8_t *buf, size_t len);
/* Copy output to @fd too (-1: stop); returns the previous tap fd. */
int vmig__serial_set_tap(struct vmig__serial *s, int fd);

/* CMOS RTC and NVRAM at 0x70/0x71 (platform.c). */
struct vmig__cmos {
	pthread_mutex_t lock;
	uint8_t index;
	int64_t offset_s;            /* guest-set time minus host time */
	uint8_t ram[128];
};

/* As migrated (section "cmos", version 1; optional on load). */
struct vmig__cmos_state {
	uint8_t index, reserved[7];
	int64_t offset_s;
	uint8_t ram[128];
};

void vmig__cmos_init(struct vmig__cmos *c, uint64_t low_mem, uint64_t high_mem);
void vmig__cmos_fini(struct vmig__cmos *c);
void vmig__cmos_io(struct vmig__cmos *c, unsigned int off, bool is_write, uint8_t *data);
void vmig__cmos_save(struct vmig__cmos *c, struct vmig__cmos_state *out);
void vmig__cmos_load(struct vmig__cmos *c, const struct vmig__cmos_state *in);

/* ACPI tables and the PM1a registers (acpi.c). */
#define VMIG__IOAPIC_GPA     0xfec00000u
#define VMIG__LAPIC_GPA      0xfee00000u
#define VMIG__ACPI_SIZE      4096u   /* what vmig__acpi_write() may write */

struct vmig__acpi_pm {
	pthread_mutex_t lock;
	uint16_t sts, en, cnt;       /* PM1_STS, PM1_EN, PM1_CNT */
};

/* As migrated (section "acpi.pm", version 1; optional on load). */
struct vmig__acpi_pm_state {
	uint16_t sts, en, cnt, reserved;
};

/*
 * Write RSDP, RSDT, XSDT, FADT, FACS, DSDT and MADT for @nr_vcpus at
 * @base, which the guest sees at @gpa (16-byte aligned, below 1 MiB so
 * the kernel's RSDP scan finds it too).  Returns the bytes used.
 */
size_t vmig__acpi_write(uint8_t *base, uint32_t gpa, unsigned int nr_vcpus);
void vmig__acpi_pm_init(struct vmig__acpi_pm *pm);
void vmig__acpi_pm_fini(struct vmig__acpi_pm *pm);
/* Ports 0x600-0x605; true if it took the port.  May stop the VM (S5). */
bool vmig__acpi_pm_io(struct vmig_vm *vm, uint16_t port, bool is_write, uint8_t *data,
		      unsigned int size);
void vmig__acpi_pm_save(struct vmig__acpi_pm *pm, struct vmig__acpi_pm_state *out);
/* Call after the irqchip is loaded: it raises the SCI again if pending. */
void vmig__acpi_pm_load(struct vmig_vm *vm, const struct vmig__acpi_pm_state *in);
/*
 * Press the power button: PWRBTN_STS, and the SCI held high until the
 * guest clears it.  -EAGAIN if the guest has not enabled the button.
 */
int vmig__acpi_power_button(struct vmig_vm *vm);

/* A Linux guest's boot images, kept for its reboots and sent with its state. */
struct vmig__boot {
	uint8_t *kernel;             /* NULL: not a Linux guest */
	size_t kernel_len;
	uint8_t *initrd;             /* NULL: none */
	size_t initrd_len;
	char *cmdline;               /* never NULL when kernel is set */
};

void vmig__boot_free(struct vmig__boot *b);

/*
 * The rest of the PC's ports: i8042 (a reset through 0xfe, for reboot=k)
 * and the reset control register 0xcf9.  Returns true if it took the port.
 */
bool vmig__platform_io(struct vmig_vm *vm, uint16_t port, bool is_write, uint8_t *data,
		       unsigned int size);

struct vmig__vcpu {
	struct vmig_vm *vm;
	unsigned int id;
	int fd;
	struct kvm_run *run;
	size_t run_size;
	struct kvm_dirty_gfn *ring;   /* dirty ring mapping, or NULL */
	size_t ring_bytes;
	pthread_t thread;
	bool thread_started;
	uint64_t unemulated;          /* INT3/FWAIT finished by vcpu.c */
	/* Throttling (throttle.c); the vCPU thread only. */
	timer_t throttle_timer;
	bool throttle_armed;
	uint64_t throttle_next_ns;
	/* Protected by vm->lock. */
	bool pause_req;
	bool paused;
	bool exited;
};

struct vmig_vm {
	struct vmig_vm_config cfg;
	char *name;
	char *workload;
	int kvm_fd;
	int vm_fd;
	int event_fd;
	int mem_fd;
	uint8_t *mem;
	uint64_t mem_size;
	unsigned int nr_regions;
	struct vmig_mem_region regions[VMIG_VM_MAX_REGIONS];
	struct kvm_cpuid2 *cpuid;
	uint32_t tsc_khz;
	bool ring_acq_rel;
	bool dirty_logging;
	vmig_vm_ring_full_fn *ring_full_fn;   /* under lock */
	void *ring_full_arg;
	struct vmig__vcpu vcpus[VMIG_VM_MAX_VCPUS];
	struct vmig__serial serial;
	struct vmig__cmos cmos;
	char *kernel;             /* --kernel image path, or NULL: built-in guest */
	char *initrd;
	char *cmdline;
	struct vmig__boot boot;   /* a Linux guest's images (owner thread) */
	struct vmig__acpi_pm acpi_pm;
	bool reboot;              /* the guest asked for a reset (under lock) */

	pthread_mutex_t lock;
	pthread_cond_t cond;      /* vCPU paused/exited, or request changed */
	enum vmig_vm_state state;
	atomic_bool stopping;
	atomic_uint throttle_pct;     /* throttle.c; any thread */
	char stop_reason[256];
	int exit_code;
	uint64_t start_ns;
};

/* kvm.c */
int vmig__kvm_open(int *fd_out, struct vmig_err *err);
int vmig__kvm_check_caps(int kvm_fd, struct vmig_err *err);
int vmig__kvm_supported_cpuid(int kvm_fd, struct kvm_cpuid2 **out);

/* memory.c */
int vmig__mem_create(struct vmig_vm *vm, struct vmig_err *err);
void vmig__mem_destroy(struct vmig_vm *vm);
int vmig__mem_host_limit(uint64_t *bytes);

/* vcpu.c */
int vmig__vcpu_create(struct vmig_vm *vm, unsigned int id, struct vmig_err *err);
void vmig__vcpu_destroy(struct vmig__vcpu *vcpu);
int vmig__vcpu_thread_start(struct vmig__vcpu *vcpu);
void vmig__vcpu_kick(struct vmig__vcpu *vcpu);

/* The signal that makes a vCPU thread leave KVM_RUN (vcpu.c). */
#define VMIG__SIGKICK SIGUSR1
/* throttle.c: the vCPU thread calls these after KVM_RUN / before exiting. */
void vmig__vcpu_throttle_point(struct vmig__vcpu *vcpu);
void vmig__vcpu_throttle_fini(struct vmig__vcpu *vcpu);
int vmig__vcpu_setup_signals(void);
/* Stop the VM from a vCPU thread, with a reason (first reason wins). */
void vmig__vm_stop_self(struct vmig_vm *vm, int exit_code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* multiboot.c */
int vmig__multiboot_load(struct vmig_vm *vm, const uint8_t *image, size_t size,
			 const char *cmdline, struct vmig_err *err);

/* linux.c */
bool vmig__linux_is_bzimage(const uint8_t *image, size_t size);
/* Load a bzImage or ELF vmlinux, initrd and command line; BSP in long mode. */
int vmig__linux_load(struct vmig_vm *vm, const uint8_t *image, size_t size,
		     const uint8_t *initrd, size_t initrd_size, const char *cmdline,
		     struct vmig_err *err);
/*
 * Boot vm->boot's images, first reading them from cfg.kernel/initrd into
 * vm->boot if it has none yet.
 */
int vmig__linux_boot(struct vmig_vm *vm, struct vmig_err *err);
/* Write an MP floating pointer and table for @nr_vcpus at @base (1 KiB). */
size_t vmig__mptable_write(uint8_t *base, uint32_t gpa, unsigned int nr_vcpus);

/* guest-blob.S: the built-in test guest */
extern const uint8_t vmig__guest_image[];
extern const uint8_t vmig__guest_image_end[];

#endif
