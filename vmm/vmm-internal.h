/* Private cross-file declarations of vmm/. */
#ifndef VMIG_VMM_INTERNAL_H
#define VMIG_VMM_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <linux/kvm.h>

#include "vmig/vm.h"

/* 16550 UART, transmit side plus the registers a driver probes. */
struct vmig__serial {
	pthread_mutex_t lock;
	int out_fd;
	uint8_t ier, lcr, mcr, scr, dll, dlm, fcr;
};

/* The UART's register state, as migrated (section "serial", version 1). */
struct vmig__serial_state {
	uint8_t ier, lcr, mcr, scr, dll, dlm, fcr, reserved;
};

void vmig__serial_save(struct vmig__serial *s, struct vmig__serial_state *out);
void vmig__serial_load(struct vmig__serial *s, const struct vmig__serial_state *in);
void vmig__serial_init(struct vmig__serial *s, int out_fd);
void vmig__serial_fini(struct vmig__serial *s);
/* Port access at offset 0..7 from the base; @data is 1 byte. */
void vmig__serial_io(struct vmig__serial *s, unsigned int off, bool is_write,
		     uint8_t *data);

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

	pthread_mutex_t lock;
	pthread_cond_t cond;      /* vCPU paused/exited, or request changed */
	enum vmig_vm_state state;
	atomic_bool stopping;
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
int vmig__vcpu_setup_signals(void);
/* Stop the VM from a vCPU thread, with a reason (first reason wins). */
void vmig__vm_stop_self(struct vmig_vm *vm, int exit_code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* multiboot.c */
int vmig__multiboot_load(struct vmig_vm *vm, const uint8_t *image, size_t size,
			 const char *cmdline, struct vmig_err *err);

/* guest-blob.S: the built-in test guest */
extern const uint8_t vmig__guest_image[];
extern const uint8_t vmig__guest_image_end[];

#endif
