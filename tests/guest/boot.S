/*
 * vmig test guest: entry, long-mode set-up, descriptor tables, exception
 * entry points and the AP start-up trampoline.
 *
 * Everything here runs in ring 0, which kvm_pvm executes in its instruction
 * emulator (~1-2 M instructions/s): keep it short.  The BSP arrives from a
 * multiboot v1 loader in 32-bit protected mode with paging off; it builds
 * an identity map of [0, 4 GiB) with 2 MiB pages (guest.c extends it above
 * 4 GiB), enables PAE + EFER.LME and then CR0.PG in one step (paging without
 * long mode is not available here) and jumps to 64-bit code.  APs come in
 * through the real-mode trampoline at GUEST_TRAMPOLINE, switch to 32-bit
 * protected mode and take the same path with the BSP's page tables.
 *
 * All page-table entries have U/S set: ring 3 touches everything.
 */
#include "guest.h"

#define MB_MAGIC        0x1badb002
#define MB_FLAGS        0x00000003      /* page-align modules, want mem info */

#define CR0_PE          0x00000001
#define CR0_MP          0x00000002
#define CR0_EM          0x00000004
#define CR0_TS          0x00000008
#define CR0_NE          0x00000020
#define CR0_NW          0x20000000
#define CR0_CD          0x40000000
#define CR0_PG          0x80000000
#define CR4_PAE         0x00000020
#define CR4_OSFXSR      0x00000200      /* ring 3 uses one SSE store */
#define CR4_OSXMMEXCPT  0x00000400
#define MSR_EFER        0xc0000080
#define EFER_LME        0x00000100

#define PTE_P           0x001
#define PTE_W           0x002
#define PTE_U           0x004
#define PTE_PS          0x080

	.section .multiboot, "a"
	.balign 4
mb_header:
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

/*
 * Switch a CPU in 32-bit protected mode (flat segments, paging off) to long
 * mode with the page tables at pml4, then far-jump to \target (64-bit).
 */
.macro ENTER_LONG_MODE target
	movl $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	andl $~(CR0_EM | CR0_TS | CR0_NW | CR0_CD), %eax
	orl $(CR0_PG | CR0_PE | CR0_MP | CR0_NE), %eax
	movl %eax, %cr0
	ljmp $GUEST_SEL_KCODE, $\target
.endm

	.text
	.code32
	.globl _start
_start:
	cli
	cld
	movl %eax, mb_magic
	movl %ebx, mb_info
	movl $(kstacks + GUEST_KSTACK_SIZE), %esp
	pushl $2                        /* IOPL 0, IF 0, DF 0 */
	popfl
	lgdt gdt_ptr
	ljmp $GUEST_SEL_KCODE32, $1f
1:	movl $GUEST_SEL_KDATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs

	/*
	 * 4 page directories: [0, 4 GiB) in 2 MiB pages.  The tables are in
	 * .bss, which the loader zeroes (ELF p_memsz > p_filesz), so only the
	 * low halves of the entries are written; 4 per turn, as every
	 * instruction is emulated here.
	 */
	movl $pd_low, %edi
	movl $(PTE_P | PTE_W | PTE_U | PTE_PS), %eax
	movl $512, %ecx
2:	movl %eax, (%edi)
	addl $0x200000, %eax
	movl %eax, 8(%edi)
	addl $0x200000, %eax
	movl %eax, 16(%edi)
	addl $0x200000, %eax
	movl %eax, 24(%edi)
	addl $0x200000, %eax
	addl $32, %edi
	loop 2b
	movl $(pd_low + (PTE_P | PTE_W | PTE_U)), %eax
	movl $pdpt, %edi
	movl $4, %ecx
3:	movl %eax, (%edi)
	addl $4096, %eax
	addl $8, %edi
	loop 3b
	movl $(pdpt + (PTE_P | PTE_W | PTE_U)), pml4

	ENTER_LONG_MODE bsp_entry64

	.code64
bsp_entry64:
	movl $GUEST_SEL_KDATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movq $(kstacks + GUEST_KSTACK_SIZE), %rsp
	movl mb_magic(%rip), %edi
	movl mb_info(%rip), %esi
	call bsp_main
4:	cli
	hlt
	jmp 4b

/*
 * AP trampoline: copied to GUEST_TRAMPOLINE and entered by SIPI in real
 * mode with CS = GUEST_TRAMPOLINE >> 4, IP = 0.  Position-independent
 * (CS-relative) up to the far jump into the image.
 */
	.code16
	.globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
	cli
	cld
	movw %cs, %ax
	movw %ax, %ds
	lgdtl ap_tramp_gdtr - ap_tramp_start
	movl %cr0, %eax
	orl $CR0_PE, %eax
	movl %eax, %cr0
	ljmpl $GUEST_SEL_KCODE32, $ap_entry32
	.balign 8
ap_tramp_gdtr:
	.word GUEST_GDT_ENTRIES * 8 - 1
	.long gdt
ap_tramp_end:

	.code32
ap_entry32:
	movl $GUEST_SEL_KDATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	ENTER_LONG_MODE ap_entry64

	.code64
ap_entry64:
	movl $GUEST_SEL_KDATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	/* cpu index = initial APIC ID (the host numbers them 0..N-1). */
	movl $1, %eax
	cpuid
	shrl $24, %ebx
	cmpl $GUEST_MAX_VCPUS, %ebx
	jae 4b
	movl %ebx, %edi
	leaq kstacks(%rip), %rsp
	movl %ebx, %eax
	incl %eax
	imull $GUEST_KSTACK_SIZE, %eax
	addq %rax, %rsp
	pushq $2                        /* IOPL 0, IF 0, DF 0 */
	popfq
	call ap_main
	jmp 4b

/*
 * Exception entry points, vectors 0-31.  Each pushes a dummy error code if
 * the CPU did not, then the vector, and jumps to isr_common, which reports
 * and powers off (trap_fatal never returns).
 */
.macro ISR vec
	.balign 16
isr\vec:
	.if (\vec == 8 || (\vec >= 10 && \vec <= 14) || \vec == 17 || \vec == 21 || \vec == 29 || \vec == 30) == 0
	pushq $0
	.endif
	pushq $\vec
	jmp isr_common
.endm

/*
 * #GP: the ring-3 port-output service.  Port I/O from ring 3 hangs on this
 * hypervisor and so does syscall, but "outb %al,%dx" with IOPL 0 and no I/O
 * bitmap raises #GP, which lands here.  If the faulting instruction is that
 * one byte (0xee) from ring 3, do the write and return to the next
 * instruction with sysexitq (iret to ring 3 is not available here).  The
 * ring-3 caller gets RCX (= its RSP) and RDX (= its RIP) clobbered, and the
 * flags; every other register is preserved.  Writes to COM1's THR wait for
 * THRE first (bounded; uart_poll is cleared if THRE never shows).
 */
	.balign 16
isr13:
	testb $3, 16(%rsp)              /* CS of the faulting code */
	jz 9f
	pushq %rax                      /* 0 rax, 8 err, 16 rip, 24 cs, 40 rsp */
	movq 16(%rsp), %rax
	cmpb $0xee, (%rax)
	jne 8f
	movq (%rsp), %rax
	cmpw $GUEST_COM1, %dx
	jne 3f
	cmpb $0, uart_poll(%rip)
	je 3f
	movl $2000, %ecx
	movw $(GUEST_COM1 + 5), %dx
1:	inb %dx, %al
	testb $0x20, %al
	jnz 2f
	decl %ecx
	jnz 1b
	movb $0, uart_poll(%rip)
2:	movw $GUEST_COM1, %dx
	movq (%rsp), %rax
3:	outb %al, %dx
	popq %rax                       /* 0 err, 8 rip, 16 cs, 32 rsp */
	movq 8(%rsp), %rdx
	incq %rdx
	movq 32(%rsp), %rcx
	sysexitq
8:	popq %rax
9:	pushq $13
	jmp isr_common

	ISR 0
	ISR 1
	ISR 2
	ISR 3
	ISR 4
	ISR 5
	ISR 6
	ISR 7
	ISR 8
	ISR 9
	ISR 10
	ISR 11
	ISR 12
	ISR 14
	ISR 15
	ISR 16
	ISR 17
	ISR 18
	ISR 19
	ISR 20
	ISR 21
	ISR 22
	ISR 23
	ISR 24
	ISR 25
	ISR 26
	ISR 27
	ISR 28
	ISR 29
	ISR 30
	ISR 31

/* IA32_SYSENTER_EIP: ring 3 never uses sysenter; report it if it does. */
	.balign 16
	.globl sysenter_trap
sysenter_trap:
	pushq $0                        /* ss, rsp, rflags, cs, rip: unknown */
	pushq $0
	pushq $0
	pushq $0
	pushq $0
	pushq $0                        /* error code */
	pushq $GUEST_VEC_SYSENTER
	jmp isr_common

isr_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, %rdi
	andq $-16, %rsp
	call trap_fatal
	jmp 4b

	.section .rodata
	.balign 8
	.globl isr_table
isr_table:
	.irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad isr\vec
	.endr

	.data
	.balign 16
	.globl gdt
gdt:
	.quad 0                         /* null */
	.quad 0x00af9a000000ffff        /* 0x08 64-bit ring-0 code */
	.quad 0x00cf92000000ffff        /* 0x10 flat ring-0 data */
	.quad 0x00cf9a000000ffff        /* 0x18 flat 32-bit ring-0 code */
	.quad 0x00cff2000000ffff        /* 0x20 unused: ring-3 data */
	.quad 0x00affa000000ffff        /* 0x28 64-bit ring-3 code */
	.quad 0x00cff2000000ffff        /* 0x30 ring-3 data */
	.fill 2 * GUEST_MAX_VCPUS, 8, 0    /* 0x38: TSS slots, guest.c */
gdt_end:
	.balign 8
	.word 0
gdt_ptr:
	.word gdt_end - gdt - 1
	.long gdt

	.globl uart_poll
uart_poll:
	.byte 1
	.balign 4
mb_magic:
	.long 0
mb_info:
	.long 0

	.bss
	.balign 4096
	.globl pml4, pdpt, kstacks
pml4:
	.skip 4096
pdpt:
	.skip 4096
pd_low:
	.skip 4 * 4096
kstacks:
	.skip GUEST_MAX_VCPUS * GUEST_KSTACK_SIZE

	.section .note.GNU-stack, "", @progbits
