//! Entry points.
//!
//! `_start` is the ring-3 entry. godwit starts every vCPU there directly (CPL 3, long mode,
//! identity-mapped user pages) with `rdi` = boot-info address, `rsi` = vCPU index and
//! `rdx` = 0. Under QEMU the PVH entry below runs first, in ring 0: it builds what godwit
//! would have built (long mode, GDT, TSS with an I/O bitmap, IDT) and drops to ring 3 at
//! `_start` with `rdi` = hvm_start_info, `rdx` = 1. Ring-0 code is emulated instruction by
//! instruction under PVM, so this path is kept to a few hundred instructions.

use core::arch::global_asm;

/// Per-vCPU ring-3 stacks live in .bss so that neither VMM has to know about them.
pub const STACK_SIZE: usize = 64 * 1024;
pub const MAX_VCPUS: usize = 8;

global_asm!(
    r#"
    .section .text.start, "ax"
    .global _start
    .code64
_start:
    /* rsp = __stacks_top - rsi * STACK_SIZE */
    lea rsp, [rip + __stacks_top]
    mov rax, rsi
    shl rax, 16
    sub rsp, rax
    xor ebp, ebp
    call {rust_start}
2:  jmp 2b

    .section .bss.stacks, "aw", @nobits
    .balign 4096
__stacks_bottom:
    .skip {stacks_bytes}
__stacks_top:
"#,
    rust_start = sym crate::rust_start,
    stacks_bytes = const STACK_SIZE * MAX_VCPUS,
);

// The PVH path (QEMU `-kernel`): 32-bit protected mode, paging off, ebx = hvm_start_info.
global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18                       /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start32

    .section .text.pvh, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    mov esi, ebx
    lgdt [pvh_gdt_ptr]
    mov eax, cr4
    or eax, 0x620                  /* PAE | OSFXSR | OSXMMEXCPT */
    mov cr4, eax
    lea eax, [pvh_pml4]
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100                  /* EFER.LME */
    wrmsr
    mov eax, cr0
    and eax, 0xFFFFFFFB            /* clear EM */
    or eax, 0x80010023             /* PG | WP | NE | MP | PE */
    mov cr0, eax
    .byte 0xEA                     /* ljmp 0x08:pvh_start64 */
    .long pvh_start64
    .word 0x08

    .code64
pvh_start64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    lea rsp, [rip + pvh_stack0_top]
    /* TSS descriptor base */
    lea rax, [rip + pvh_tss]
    lea rdi, [rip + pvh_gdt]
    mov [rdi + 0x28 + 2], ax
    shr rax, 16
    mov [rdi + 0x28 + 4], al
    mov [rdi + 0x28 + 7], ah
    shr rax, 16
    mov [rdi + 0x28 + 8], eax
    lea rax, [rip + pvh_stack0_top]
    lea rdi, [rip + pvh_tss]
    mov [rdi + 4], rax            /* rsp0 */
    mov ax, 0x28
    ltr ax
    /* IDT: gate i -> pvh_stubs + 16 * i */
    lea rdi, [rip + pvh_idt]
    lea rax, [rip + pvh_stubs]
    xor ecx, ecx
3:  mov rdx, rax
    mov [rdi], dx
    mov word ptr [rdi + 2], 0x08
    mov word ptr [rdi + 4], 0x8E00
    shr rdx, 16
    mov [rdi + 6], dx
    shr rdx, 16
    mov [rdi + 8], edx
    add rdi, 16
    add rax, 16
    inc ecx
    cmp ecx, 32
    jne 3b
    lidt [rip + pvh_idt_ptr]
    /* iretq to ring 3 at _start */
    mov edi, esi
    xor esi, esi
    mov edx, 1
    push 0x1b
    push 0
    push 0x2
    push 0x23
    lea rax, [rip + _start]
    push rax
    iretq

    /* Exception stubs under QEMU: report the vector through isa-debug-exit and stop. */
    .balign 16
pvh_stubs:
    .set vec, 0
    .rept 32
    .balign 16
    mov al, 0x80 + vec
    out 0xf4, al
    4: jmp 4b
    .set vec, vec + 1
    .endr

    .section .data.pvh, "aw"
    .balign 16
pvh_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF       /* 0x08 kernel code64 */
    .quad 0x00CF92000000FFFF       /* 0x10 kernel data */
    .quad 0x00CFF2000000FFFF       /* 0x18 user data (DPL3) */
    .quad 0x00AFFA000000FFFF       /* 0x20 user code64 (DPL3) */
    .quad 0x0000890000000468       /* 0x28 TSS (base patched), limit 104 + 1024 */
    .quad 0
pvh_gdt_end:
    .balign 8
pvh_gdt_ptr:
    .word pvh_gdt_end - pvh_gdt - 1
    .long pvh_gdt
    .balign 8
pvh_idt_ptr:
    .word 32 * 16 - 1
    .quad pvh_idt

    .balign 16
pvh_tss:
    .long 0
    .quad 0                        /* rsp0 */
    .fill 88, 1, 0
    .word 0
    .word 104                      /* I/O bitmap offset */
pvh_iobitmap:
    /* Ports allowed from ring 3: 0x40-0x43 and 0x61 (PIT, TSC calibration), 0xf4
       (isa-debug-exit), 0x3f8-0x3ff (COM1), 0xcf8-0xcff (PCI config). A clear bit allows. */
    .fill 8, 1, 0xff
    .byte 0xf0                     /* 0x40-0x43 */
    .fill 3, 1, 0xff
    .byte 0xfd                     /* 0x61 */
    .fill 17, 1, 0xff
    .byte 0xef                     /* 0xf4 */
    .fill 96, 1, 0xff
    .byte 0x00                     /* 0x3f8-0x3ff */
    .fill 287, 1, 0xff
    .byte 0x00                     /* 0xcf8-0xcff */
    .fill 608, 1, 0xff
    .byte 0xff

    .section .bss.pvh, "aw", @nobits
    .balign 4096
pvh_idt:
    .skip 32 * 16
    .balign 16
    .skip 4096
pvh_stack0_top:

    /* Identity map of the first 16 GiB with 2 MiB user pages. */
    .section .data.pvh_pt, "aw"
    .balign 4096
pvh_pml4:
    .quad pvh_pdpt + 0x7
    .fill 511, 8, 0
pvh_pdpt:
    .set i, 0
    .rept 16
    .quad pvh_pd + i * 4096 + 0x7
    .set i, i + 1
    .endr
    .fill 496, 8, 0
pvh_pd:
    .set i, 0
    .rept 16 * 512
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr
"#
);
