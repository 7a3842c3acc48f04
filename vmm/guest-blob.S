/* The built-in test guest (tests/guest/), embedded at build time. */
	.section .rodata
	.balign 64
	.globl vmig__guest_image
	.globl vmig__guest_image_end
vmig__guest_image:
	.incbin VMIG_GUEST_ELF
vmig__guest_image_end:
	.section .note.GNU-stack,"",@progbits
