/*
 * Constants shared by boot.S and guest.c (the built-in test guest).
 * Assembler-safe: C-only parts are under #ifndef __ASSEMBLER__.
 */
#ifndef VMIG_TESTS_GUEST_GUEST_H
#define VMIG_TESTS_GUEST_GUEST_H

/* guest-abi.h is C only (and its constants carry C suffixes): boot.S gets
 * the few numbers it needs from here, checked against it in guest.c. */
#define GUEST_MAX_VCPUS      32      /* == VMIG_GUEST_MAX_VCPUS */

/*
 * GDT layout.  IA32_SYSENTER_CS = GUEST_SEL_KCODE; a 64-bit sysexit loads
 * CS = SYSENTER_CS + 32 and SS = SYSENTER_CS + 40 (both with RPL 3).  The
 * slots at +16/+24 would be a 32-bit sysexit's user CS/SS, which the guest
 * never does; +16 holds the flat 32-bit kernel code segment that the BSP
 * entry and the AP trampoline use on their way to long mode.
 */
#define GUEST_SEL_KCODE      0x08    /* 64-bit ring-0 code */
#define GUEST_SEL_KDATA      0x10    /* flat data, also used in 32-bit mode */
#define GUEST_SEL_KCODE32    0x18    /* flat 32-bit ring-0 code */
#define GUEST_SEL_UDATA32    0x20    /* unused (32-bit sysexit SS) */
#define GUEST_SEL_UCODE      0x28    /* 64-bit ring-3 code = KCODE + 32 */
#define GUEST_SEL_UDATA      0x30    /* ring-3 data = KCODE + 40 */
#define GUEST_SEL_TSS        0x38    /* + 16 * cpu: one 16-byte TSS slot each */
#define GUEST_GDT_ENTRIES    (7 + 2 * GUEST_MAX_VCPUS)

#define GUEST_KSTACK_SIZE    8192    /* ring-0 stack per vCPU (also RSP0) */
#define GUEST_USTACK_SIZE    8192    /* ring-3 stack per vCPU */

/*
 * Real-mode AP start-up trampoline, copied here by the BSP (SIPI vector =
 * page number).  One page, below the status page at 0x8000; the multiboot
 * information has been consumed by then, so it may have lived anywhere.
 */
#define GUEST_TRAMPOLINE     0x7000

#define GUEST_NR_EXC         32      /* IDT entries: the exceptions */
#define GUEST_VEC_SYSENTER   254     /* pseudo vector: stray SYSENTER */

#define GUEST_COM1           0x3f8

/* Exit port values (VMIG_GUEST_EXIT_PORT). */
#define GUEST_EXIT_OK        0x00    /* all gens= passes done, self-check ok */
#define GUEST_EXIT_BADDATA   0xfe    /* self-check found a bad page/checksum */
#define GUEST_EXIT_FATAL     0xff    /* unexpected exception or set-up error */

#ifndef __ASSEMBLER__
#include <stdint.h>

#include "vmig/guest-abi.h"

_Static_assert(GUEST_MAX_VCPUS == VMIG_GUEST_MAX_VCPUS, "GUEST_MAX_VCPUS");

/* Saved by isr_common in boot.S, lowest address first. */
struct trap_frame {
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
	uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vector, error;
	uint64_t rip, cs, rflags, rsp, ss;   /* pushed by the CPU */
};

/* boot.S */
extern char ap_tramp_start[], ap_tramp_end[];
extern uint64_t gdt[GUEST_GDT_ENTRIES];
extern uint64_t pml4[512], pdpt[512];
extern uint64_t isr_table[GUEST_NR_EXC];
extern char sysenter_trap[];
extern uint8_t uart_poll;
extern char kstacks[GUEST_MAX_VCPUS][GUEST_KSTACK_SIZE];
extern char _end[];

/* guest.c, called from boot.S */
void bsp_main(uint32_t mb_magic, uint32_t mb_info);
void ap_main(uint32_t cpu);
void trap_fatal(struct trap_frame *f);
#endif

#endif /* VMIG_TESTS_GUEST_GUEST_H */
