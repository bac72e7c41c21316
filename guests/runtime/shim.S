/*
 * The vmft ring-0 shim: entry, IDT, interrupt stubs, the crash gate. Nothing else runs in ring 0.
 *
 * On kvm_pvm every ring-0 instruction is emulated (about a thousand times slower than ring 3) and the
 * emulator rejects int3, xrstor, popcnt, fwait, ... so this file uses few, plain instructions:
 * the device stubs are two or three instructions and touch no register; the IDT is built at link
 * time (no loop at boot). `make check-insns` scans this object for instructions the emulator rejects.
 *
 * Entry (docs/platform.md): long mode, CS = 0x08, RFLAGS = 0x2, RDI = boot info (0x1000).
 */

/* vmft_abi.h includes <stdint.h>, which is C only: claim it is already included. */
#define _GCC_WRAP_STDINT_H 1
#define _STDINT_H 1
#include "vmft_abi.h"

#define BOOT_IRQ_PENDING (VMFT_BOOT_INFO_ADDR + VMFT_BOOT_INFO_IRQ_PENDING_OFFSET)
#define BOOT_TICKS (VMFT_BOOT_INFO_ADDR + VMFT_BOOT_INFO_TICKS_OFFSET)
#define IMAGE_BASE 0x100000
#define GATE_INTR 0x8E        /* present, DPL 0, 64-bit interrupt gate (clears IF) */
#define GATE_INTR_USER 0xEE   /* present, DPL 3: reachable with `int` from ring 3 */

/* Request-block field offsets (struct vmft_req). */
#define REQ_ADDR 0
#define REQ_LEN 8
#define REQ_ARG 12
#define REQ_ARG64 16

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    mov $kstack_top, %rsp
    mov VMFT_BOOT_INFO_TSS_ADDR_OFFSET(%rdi), %rax
    mov %rsp, VMFT_TSS_RSP0_OFFSET(%rax)
    lidt idt_desc
    pushq $VMFT_SEL_USER_DATA          /* SS */
    pushq $ustack_top                  /* RSP */
    pushq $0x3202                      /* RFLAGS: IOPL 3, IF */
    pushq $VMFT_SEL_USER_CODE          /* CS */
    pushq $vmft_ring3_entry            /* RIP; RDI still holds the boot info address */
    iretq

/* Exceptions 0..31: push a uniform frame (error code or 0, then the vector) and report a panic. */
.macro EXC vec
exc_\vec:
    .if (\vec == 8) || ((\vec >= 10) && (\vec <= 14)) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
    .else
    pushq $0
    .endif
    pushq $\vec
    jmp exc_common
.endm

    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    EXC \v
    .endr

/* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. The VM stops at POWER_PANIC; if the monitor
 * lets it run on, halt with interrupts off. */
exc_common:
    /* kvm_pvm raises #UD for `int n` in ring 3 (measured): a #UD at the crash gate's own `int $0x80`
     * with rax = VMFT_SYS_CRASH is that request, so take the crash path (on other KVMs the gate runs). */
    cmpq $6, (%rsp)
    jne 4f
    cmpq $vmft_sys_crash_int, 16(%rsp)
    jne 4f
    cmp $VMFT_SYS_CRASH, %rax
    je crash
4:  mov $exc_req, %rdi
    mov (%rsp), %eax                   /* vector */
    mov %eax, REQ_ARG(%rdi)
    mov 16(%rsp), %rdx                 /* faulting RIP */
    mov %rdx, REQ_ARG64(%rdi)
    cmp $10, %eax
    jb 1f
    xor %edx, %edx
    mov $10, %ecx
    div %ecx                           /* eax = tens, edx = ones */
    add $'0', %eax
    mov %al, exc_msg_digits
    add $'0', %edx
    mov %dl, exc_msg_digits + 1
    movl $exc_msg_digits + 2 - exc_msg, REQ_LEN(%rdi)
    jmp 2f
1:  add $'0', %eax
    mov %al, exc_msg_digits
    movl $exc_msg_digits + 1 - exc_msg, REQ_LEN(%rdi)
2:  mov %edi, %eax
    mov $VMFT_PORT_POWER_PANIC, %edx
    out %eax, %dx
3:  hlt
    jmp 3b

/* Device interrupts: record the event bit for ring 3 (which takes the word with xchg) and return.
 * No EOI: there is no APIC, the monitor injects with KVM_INTERRUPT. */
irq_timer:
    orl $VMFT_EV_TIMER, BOOT_IRQ_PENDING
    incl BOOT_TICKS
    iretq
irq_net_rx:
    orl $VMFT_EV_NET_RX, BOOT_IRQ_PENDING
    iretq
irq_block:
    orl $VMFT_EV_BLOCK, BOOT_IRQ_PENDING
    iretq
irq_console_in:
    orl $VMFT_EV_CONSOLE_IN, BOOT_IRQ_PENDING
    iretq

/* int $0x80 from ring 3. rax = VMFT_SYS_CRASH: load an empty IDT and fault on a non-canonical
 * address; the #GP cannot be delivered, nor the #DF after it: a triple fault (KVM_EXIT_SHUTDOWN).
 * Other functions return at once. */
sys_gate:
    cmp $VMFT_SYS_CRASH, %rax
    jne 1f
crash:
    lidt null_idt_desc
    movabs $0x8000000000000000, %rax
    mov (%rax), %rax
1:  iretq

    .globl __shim_stubs_end
__shim_stubs_end:

/* Ring 3 from here on (runs natively): call the C runtime with a standard stack alignment. */
    .text
    .globl vmft_ring3_entry
vmft_ring3_entry:
    call vmft_runtime_start
1:  jmp 1b

/* void vmft_sys_crash(void): the crash request (see exc_common for why its address matters). */
    .globl vmft_sys_crash
vmft_sys_crash:
    mov $VMFT_SYS_CRASH, %eax
vmft_sys_crash_int:
    int $0x80
    jmp vmft_sys_crash

/* The IDT, built by the linker: every stub lies in [1 MiB, 1 MiB + 64 KiB) (guest.ld asserts it),
 * so offset 31:16 is 0x0010 and offset 15:0 is a 16-bit relocation the linker range-checks. */
.macro GATE handler, type
    .word \handler - IMAGE_BASE
    .word VMFT_SEL_KERNEL_CODE
    .byte 0, \type
    .word IMAGE_BASE >> 16
    .long 0
    .long 0
.endm

    .data
    .balign 16
idt:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    GATE exc_\v, GATE_INTR
    .endr
    GATE irq_timer, GATE_INTR          /* 0x20 VMFT_VEC_TIMER */
    GATE irq_net_rx, GATE_INTR         /* 0x21 VMFT_VEC_NET_RX */
    GATE irq_block, GATE_INTR          /* 0x22 VMFT_VEC_BLOCK */
    GATE irq_console_in, GATE_INTR     /* 0x23 VMFT_VEC_CONSOLE_IN */
    .fill (VMFT_VEC_SYSCALL - VMFT_VEC_CONSOLE_IN - 1) * 16, 1, 0
    GATE sys_gate, GATE_INTR_USER      /* 0x80 VMFT_VEC_SYSCALL */
idt_end:

    .balign 8
    .word 0, 0, 0
idt_desc:
    .word idt_end - idt - 1
    .quad idt
    .word 0, 0, 0
null_idt_desc:
    .word 0
    .quad 0

    .balign 8
exc_req:                               /* struct vmft_req for POWER_PANIC */
    .quad exc_msg                      /* addr */
    .long 0                            /* len */
    .long 0                            /* arg: vector */
    .quad 0                            /* arg64: faulting RIP */
    .long 0                            /* status */
    .long 0                            /* result */
exc_msg:
    .ascii "exception "
exc_msg_digits:
    .ascii "  "

    .bss
    .balign 16
kstack:
    .skip 8192
kstack_top:
    .balign 16
ustack:
    .skip 256 * 1024
ustack_top:

    .section .note.GNU-stack, "", @progbits
