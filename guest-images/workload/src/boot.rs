//! The ring-0 stub: everything the guest runs in ring 0, in assembly.
//!
//! Under PVM, ring-0 code runs in KVM's instruction emulator (~1M instructions/s), so this
//! stub does as little as it can and touches no SSE:
//!
//! 1. every vCPU: enable SSE (CR0.MP, clear CR0.EM, CR4.OSFXSR|OSXMMEXCPT), clear
//!    CR4.SMEP/SMAP, take its own ring-0 stack;
//! 2. vCPU 0: build identity page tables with U/S=1 over all e820 RAM (at least 4 GiB, so
//!    the MMIO debug page at 0xD000_0000 is mapped), 1 GiB pages if CPUID says pdpe1gb
//!    and a probe read through a 1 GiB page works, else 2 MiB pages in page directories
//!    placed right after the image (the IDT is filled and loaded first, so the probe's
//!    fault is caught); then release the other vCPUs;
//! 3. every vCPU: load CR3, the GDT (with its own TSS descriptor, rsp0 = its ring-0 stack),
//!    the task register and the IDT, then `iretq` to ring 3 at [`crate::workload_entry`]
//!    with rdi = vCPU index, rsi = boot_params, rdx = vCPU count.
//!
//! Under QEMU the guest enters through the PVH entry instead ([`pvh`](#pvh-entry) below:
//! `XEN_ELFNOTE_PHYS32_ENTRY`, 32-bit protected mode, paging off, ebx = `hvm_start_info`).
//! It turns the start info's memory map and command line into a boot_params page of its own,
//! enters long mode on temporary page tables and joins `_start` as vCPU 0 of 1 (QEMU starts
//! only the bootstrap processor; the harness runs QEMU with one vCPU, as it runs ours).
//! [`BOOT_PVH`] records the path taken. Ring 3 cannot do port I/O under PVM and QEMU has no
//! MMIO debug device, so on the PVH path ring 3 still writes its port I/O (`rep outsb` of a
//! line to the UART at 0x3f8, `out dx, al` of the exit code to port 0xf4, QEMU's
//! `isa-debug-exit`) and the stub's #GP handler performs it: a #GP from ring 3 at one of
//! those two instructions is carried out in ring 0 and the guest resumes after it. (`int n`
//! from ring 3 raises #UD here, and a `syscall` handler does not run with I/O privilege.)
//!
//! Exceptions (vectors 0-31) print one line on the UART
//! (`WORKLOAD EXCEPTION vector=.. error=.. rip=.. cr2=.. rsp=.. vcpu=..`) and end the VM
//! with exit code [`EXCEPTION_EXIT_CODE`] (exit port 0xf4, then the MMIO exit register).

use core::sync::atomic::AtomicU64;

/// Most vCPUs the guest supports (GDT, TSS and stack slots are sized for this).
pub const MAX_VCPUS: u64 = 64;
/// Exit code after a CPU exception.
pub const EXCEPTION_EXIT_CODE: u8 = 3;
/// Exit code when the guest is started with more vCPUs than [`MAX_VCPUS`].
pub const TOO_MANY_VCPUS_EXIT_CODE: u8 = 4;
/// Ring-3 stack size per vCPU.
pub const USER_STACK_SIZE: u64 = 64 * 1024;
/// Ring-0 stack size per vCPU (exception handler only).
pub const KERNEL_STACK_SIZE: u64 = 4096;

/// First guest physical address after the image and the page tables (written by vCPU 0's
/// ring-0 stub before any vCPU enters ring 3).
pub static FREE_START: AtomicU64 = AtomicU64::new(0);
/// End of the identity map built by the stub (guest physical address, exclusive).
pub static MAPPED_LIMIT: AtomicU64 = AtomicU64::new(0);
/// 1 when the stub used 1 GiB pages, 0 for 2 MiB pages.
pub static USED_1G_PAGES: AtomicU64 = AtomicU64::new(0);
/// 1 when the guest entered through the PVH entry (QEMU), 0 through the 64-bit entry (our
/// VMM). Written by the 32-bit entry code before anything else runs.
pub static BOOT_PVH: AtomicU64 = AtomicU64::new(0);
/// `hvm_start_info.magic`.
pub const PVH_MAGIC: u32 = 0x336e_c578;
/// Exit code when the PVH entry finds no valid `hvm_start_info` (ebx) or no memory map.
pub const BAD_START_INFO_EXIT_CODE: u8 = 5;
/// IDT entries: the 32 exception vectors.
const IDT_ENTRIES: u64 = 32;

core::arch::global_asm!(
    r#"
    .section .note.vmm, "a", @note
    .balign 4
    .long 13
    .long 4
    .long 1
    .asciz "VMM-WORKLOAD"
    .balign 4
    .long 1
    .balign 4
    # XEN_ELFNOTE_PHYS32_ENTRY (18): the 32-bit PVH entry QEMU's -kernel jumps to. QEMU reads
    # the descriptor as a native-size word, so it is 8 bytes (the address fits in 32 bits).
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start
    .balign 4

    .section .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4:
    .space 4096
boot_pdpt:
    .space 4096
boot_idt:
    .space {idt_entries} * 16
    .balign 64
boot_tss:
    .space {max_vcpus} * 128
    .balign 4096
boot_kernel_stacks:
    .space {max_vcpus} * {kstack}
    .balign 4096
boot_user_stacks:
    .space {max_vcpus} * {ustack}
boot_ready:
    .quad 0
boot_probing:
    .quad 0
    # The PVH entry's boot_params page and its temporary page tables (first 1 GiB, 2 MiB
    # pages; PDPT slot 1 left empty for boot_probe_1g).
    .balign 4096
pvh_zero_page:
    .space 4096
pvh_pml4:
    .space 4096
pvh_pdpt:
    .space 4096
pvh_pd:
    .space 4096

    .section .data.boot, "aw"
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00cf92000000ffff
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x00affa000000ffff
    .space {max_vcpus} * 16
boot_gdt_end:
    .balign 16
    .word 0
    .word 0
    .word 0
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt
    .balign 16
    .word 0
    .word 0
    .word 0
boot_idt_ptr:
    .word {idt_entries} * 16 - 1
    .quad boot_idt
boot_exc_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad boot_exc_\v
    .endr

    .section .rodata.boot, "a"
    .balign 8
boot_probe_magic:
    .quad 0x5a4d4f52504b4c57
boot_msg_exc:
    .asciz "WORKLOAD EXCEPTION vector="
boot_msg_err:
    .asciz " error="
boot_msg_rip:
    .asciz " rip="
boot_msg_cr2:
    .asciz " cr2="
boot_msg_rsp:
    .asciz " rsp="
boot_msg_vcpu:
    .asciz " vcpu="
boot_msg_many:
    .asciz "WORKLOAD ERROR vcpu index too large, max vcpus=64\n"
boot_msg_pvh:
    .asciz "WORKLOAD ERROR PVH entry without a valid hvm_start_info memory map\n"

    .section .text.boot, "ax"
    .code64
    .global _start
_start:
    cli
    cld
    mov rax, cr0
    and rax, -5
    or rax, 2
    mov cr0, rax
    mov rax, cr4
    or rax, 0x600
    and rax, -0x300001
    mov cr4, rax

    mov r12, rdi
    mov r13, rsi
    mov r14, rdx
    cmp rdi, {max_vcpus}
    jae boot_too_many

    lea rsp, [rip + boot_kernel_stacks]
    mov rax, rdi
    inc rax
    imul rax, rax, {kstack}
    add rsp, rax

    test r12, r12
    jnz 2f
    call boot_build_idt
    lidt [rip + boot_idt_ptr]
    call boot_build_page_tables
    mov qword ptr [rip + boot_ready], 1
    jmp 3f
2:
    pause
    cmp qword ptr [rip + boot_ready], 1
    jne 2b
3:
    lea rax, [rip + boot_pml4]
    mov cr3, rax

    mov rbx, r12
    shl rbx, 7
    lea rax, [rip + boot_tss]
    add rbx, rax
    mov [rbx + 4], rsp
    mov word ptr [rbx + 102], 104

    mov rax, rbx
    and eax, 0xffff
    shl rax, 16
    or rax, 103
    mov rdx, rbx
    shr rdx, 16
    and edx, 0xff
    shl rdx, 32
    or rax, rdx
    mov rdx, 0x89
    shl rdx, 40
    or rax, rdx
    mov rdx, rbx
    shr rdx, 24
    and edx, 0xff
    shl rdx, 56
    or rax, rdx
    lea rdx, [rip + boot_gdt]
    mov rcx, r12
    shl rcx, 4
    add rdx, rcx
    mov [rdx + 0x30], rax
    mov rax, rbx
    shr rax, 32
    mov [rdx + 0x38], rax

    lgdt [rip + boot_gdt_ptr]
    mov ax, 0x18
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov rax, r12
    shl rax, 4
    add rax, 0x30
    ltr ax
    lidt [rip + boot_idt_ptr]

    mov rax, r12
    inc rax
    imul rax, rax, {ustack}
    lea rcx, [rip + boot_user_stacks]
    add rax, rcx
    sub rax, 8
    push 0x23
    push rax
    push 0x2
    push 0x2b
    lea rax, [rip + {entry}]
    push rax
    mov rdi, r12
    mov rsi, r13
    mov rdx, r14
    xor eax, eax
    xor ebx, ebx
    xor ecx, ecx
    xor ebp, ebp
    iretq

boot_too_many:
    lea rsi, [rip + boot_msg_many]
    call boot_puts
    mov al, {too_many}
    out 0xf4, al
4:
    cli
    hlt
    jmp 4b

# PVH entry (QEMU): 32-bit protected mode, paging off, flat segments, ebx = hvm_start_info.
# Builds pvh_zero_page (e820 table at 0x2d0 and its count at 0x1e8, cmd_line_ptr at 0x228,
# cmdline_size at 0x238) from the start info, enters long mode on pvh_pml4 and continues at
# _start as vCPU 0 of 1 with rsi = pvh_zero_page.
    .code32
    .global pvh_start
pvh_start:
    cli
    cld
    lea esp, [boot_kernel_stacks + {kstack}]
    mov dword ptr [{boot_pvh}], 1
    cmp dword ptr [ebx], {pvh_magic}
    jne 36f
    # memmap needs start info version >= 1 and at least one entry.
    cmp dword ptr [ebx + 4], 1
    jb 36f
    mov ecx, dword ptr [ebx + 48]
    test ecx, ecx
    jz 36f
    cmp ecx, 128
    jbe 30f
    mov ecx, 128
30:
    mov byte ptr [pvh_zero_page + 0x1e8], cl
    mov esi, dword ptr [ebx + 40]
    lea edi, [pvh_zero_page + 0x2d0]
31:
    # hvm_memmap_table_entry {{ u64 addr, u64 size, u32 type, u32 reserved }} -> e820 (20 bytes)
    mov eax, dword ptr [esi]
    mov dword ptr [edi], eax
    mov eax, dword ptr [esi + 4]
    mov dword ptr [edi + 4], eax
    mov eax, dword ptr [esi + 8]
    mov dword ptr [edi + 8], eax
    mov eax, dword ptr [esi + 12]
    mov dword ptr [edi + 12], eax
    mov eax, dword ptr [esi + 16]
    mov dword ptr [edi + 16], eax
    add esi, 24
    add edi, 20
    dec ecx
    jnz 31b
    # Command line (its low 32 bits: QEMU puts it below 4 GiB), size = length + NUL.
    mov esi, dword ptr [ebx + 24]
    mov dword ptr [pvh_zero_page + 0x228], esi
    xor ecx, ecx
    test esi, esi
    jz 33f
32:
    cmp byte ptr [esi + ecx], 0
    je 34f
    inc ecx
    cmp ecx, 4095
    jb 32b
34:
    inc ecx
33:
    mov dword ptr [pvh_zero_page + 0x238], ecx
    # Temporary page tables: PML4[0] -> PDPT[0] -> PD, 512 x 2 MiB = the first 1 GiB.
    lea eax, [pvh_pdpt + 3]
    mov dword ptr [pvh_pml4], eax
    lea eax, [pvh_pd + 3]
    mov dword ptr [pvh_pdpt], eax
    lea edi, [pvh_pd]
    xor ecx, ecx
    mov eax, 0x83
35:
    mov dword ptr [edi + ecx * 8], eax
    mov dword ptr [edi + ecx * 8 + 4], 0
    add eax, 0x200000
    inc ecx
    cmp ecx, 512
    jb 35b
    # PAE, CR3, EFER.LME, paging; then a far return into the 64-bit code segment.
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    lea eax, [pvh_pml4]
    mov cr3, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000001
    mov cr0, eax
    lgdt [boot_gdt_ptr]
    push 0x10
    lea eax, [pvh_long]
    push eax
    retf
36:
    lea esi, [boot_msg_pvh]
    mov dx, 0x3f8
37:
    mov al, byte ptr [esi]
    test al, al
    jz 38f
    out dx, al
    inc esi
    jmp 37b
38:
    mov al, {bad_start_info}
    out 0xf4, al
39:
    cli
    hlt
    jmp 39b

    .code64
pvh_long:
    mov ax, 0x18
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor edi, edi
    lea rsi, [rip + pvh_zero_page]
    mov edx, 1
    jmp _start


# vCPU 0 only. In: r13 = boot_params. Clobbers rax, rbx, rcx, rdx, rsi, rdi, r8-r11.
boot_build_page_tables:
    movzx ecx, byte ptr [r13 + 0x1e8]
    lea rsi, [r13 + 0x2d0]
    xor r8d, r8d
5:
    test ecx, ecx
    jz 6f
    cmp dword ptr [rsi + 16], 1
    jne 7f
    mov rax, [rsi]
    add rax, [rsi + 8]
    cmp rax, r8
    jbe 7f
    mov r8, rax
7:
    add rsi, 20
    dec ecx
    jmp 5b
6:
    mov rax, 0x3fffffff
    add r8, rax
    shr r8, 30
    cmp r8, 4
    jae 8f
    mov r8, 4
8:
    cmp r8, 512
    jbe 9f
    mov r8, 512
9:
    mov r9, r8
    mov rax, r9
    shl rax, 30
    mov [rip + {mapped_limit}], rax

    lea rax, [rip + boot_pdpt]
    or rax, 7
    mov [rip + boot_pml4], rax

    # r11 = first free byte: after the image and after the command line, should the VMM
    # have put it above the image (e.g. at the loader's kernel_end).
    lea r11, [rip + __image_end]
    mov eax, dword ptr [r13 + 0x228]
    lea rcx, [rip + __image_start]
    cmp rax, rcx
    jb 25f
    mov ecx, dword ptr [r13 + 0x238]
    lea rax, [rax + rcx + 4095]
    and rax, -4096
    cmp rax, r11
    jbe 25f
    mov r11, rax
25:

    mov eax, 0x80000001
    cpuid
    bt edx, 26
    jnc 12f
    call boot_probe_1g
    test eax, eax
    jz 12f

    mov qword ptr [rip + {used_1g}], 1
    lea rdi, [rip + boot_pdpt]
    xor ecx, ecx
10:
    mov rax, rcx
    shl rax, 30
    or rax, 0x87
    mov [rdi + rcx * 8], rax
    inc rcx
    cmp rcx, r9
    jb 10b
    mov [rip + {free_start}], r11
    ret

12:
    mov rdi, r11
    lea rsi, [rip + boot_pdpt]
    xor ecx, ecx
13:
    mov rax, rcx
    shl rax, 12
    add rax, rdi
    or rax, 7
    mov [rsi + rcx * 8], rax
    inc rcx
    cmp rcx, r9
    jb 13b
    mov r10, r9
    shl r10, 9
    xor ecx, ecx
    mov rax, 0x87
    mov rdx, 0x200000
14:
    mov [rdi + rcx * 8], rax
    add rax, rdx
    inc rcx
    cmp rcx, r10
    jb 14b
    mov rax, r9
    shl rax, 12
    add rax, rdi
    mov [rip + {free_start}], rax
    ret

# vCPU 0 only, with the IDT loaded and the VMM's page tables still in CR3: checks that a
# 1 GiB page really works (a VMM may advertise pdpe1gb that KVM does not honour, and then
# the first instruction after `mov cr3` would triple-fault). Maps [0, 1 GiB) a second time
# at virtual 1 GiB through an unused slot of the VMM's PDPT and reads a known value through
# it; a fault there returns to the fallback. Out: eax = 1 if 1 GiB pages work.
# Clobbers rax, rcx, rdx, rsi.
boot_probe_1g:
    mov rsi, cr3
    and rsi, -4096
    mov rsi, [rsi]
    test esi, 1
    jz 23f
    and rsi, -4096
    mov rax, 0x000ffffffffff000
    and rsi, rax
    cmp qword ptr [rsi + 8], 0
    jne 23f
    mov qword ptr [rsi + 8], 0x83
    lea rcx, [rip + boot_probe_magic]
    mov rax, 0x40000000
    add rcx, rax
    invlpg [rcx]
    mov qword ptr [rip + boot_probing], 1
    mov rax, [rcx]
    mov qword ptr [rip + boot_probing], 0
    mov rdx, [rip + boot_probe_magic]
    cmp rax, rdx
    jne 22f
    mov qword ptr [rsi + 8], 0
    invlpg [rcx]
    mov eax, 1
    ret
# A fault during the probe resumes here (see boot_exc_common).
boot_probe_fault:
22:
    mov qword ptr [rsi + 8], 0
    invlpg [rcx]
23:
    xor eax, eax
    ret

# vCPU 0 only: 32 interrupt gates, selector 0x10, DPL 0, IST 0.
boot_build_idt:
    lea rdi, [rip + boot_idt]
    lea rsi, [rip + boot_exc_table]
    xor ecx, ecx
15:
    mov rax, [rsi + rcx * 8]
    mov rdx, rax
    and edx, 0xffff
    mov r8, 0x8e0000100000
    or rdx, r8
    mov r8, rax
    shr r8, 16
    and r8d, 0xffff
    shl r8, 48
    or rdx, r8
    mov r8, rcx
    shl r8, 4
    mov [rdi + r8], rdx
    shr rax, 32
    mov [rdi + r8 + 8], rax
    inc ecx
    cmp ecx, 32
    jb 15b
    ret

# Exception entry points: each pushes (a dummy error code and) its vector.
    .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    .balign 16
boot_exc_\v:
    push 0
    push \v
    jmp boot_exc_common
    .endr
    .irp v, 8,10,11,12,13,14,17,21,29,30
    .balign 16
boot_exc_\v:
    push \v
    jmp boot_exc_common
    .endr

# Stack: vector, error, rip, cs, rflags, rsp, ss.
boot_exc_common:
    cmp qword ptr [rip + boot_probing], 0
    je 24f
    mov qword ptr [rip + boot_probing], 0
    add rsp, 16
    lea rax, [rip + boot_probe_fault]
    mov [rsp], rax
    iretq
24:
    # PVH path: a #GP from ring 3 at `out dx, al` or `rep outsb` is ring 3 asking for port
    # I/O (see the module doc): do it here and resume after the instruction.
    cmp qword ptr [rsp], 13
    jne 26f
    cmp qword ptr [rip + {boot_pvh}], 1
    jne 26f
    test qword ptr [rsp + 24], 3
    jz 26f
    push rax
    push rcx
    push rdx
    push rsi
    # Now: rsi [rsp], rdx [rsp+8], rcx [rsp+16], rax [rsp+24], vector [rsp+32],
    # error [rsp+40], rip [rsp+48].
    mov rax, [rsp + 48]
    cmp byte ptr [rax], 0xee
    je 27f
    cmp word ptr [rax], 0x6ef3
    jne 28f
    mov rsi, [rsp]
    mov rcx, [rsp + 16]
    mov rdx, [rsp + 8]
29:
    test rcx, rcx
    jz 30f
    mov al, byte ptr [rsi]
    out dx, al
    inc rsi
    dec rcx
    jmp 29b
30:
    mov [rsp], rsi
    mov [rsp + 16], rcx
    add qword ptr [rsp + 48], 2
    jmp 31f
27:
    mov rax, [rsp + 24]
    mov rdx, [rsp + 8]
    out dx, al
    add qword ptr [rsp + 48], 1
31:
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 16
    iretq
28:
    pop rsi
    pop rdx
    pop rcx
    pop rax
26:
    mov r15, rsp
    lea rsi, [rip + boot_msg_exc]
    call boot_puts
    mov rax, [r15]
    call boot_puthex
    lea rsi, [rip + boot_msg_err]
    call boot_puts
    mov rax, [r15 + 8]
    call boot_puthex
    lea rsi, [rip + boot_msg_rip]
    call boot_puts
    mov rax, [r15 + 16]
    call boot_puthex
    lea rsi, [rip + boot_msg_cr2]
    call boot_puts
    mov rax, cr2
    call boot_puthex
    lea rsi, [rip + boot_msg_rsp]
    call boot_puts
    mov rax, [r15 + 40]
    call boot_puthex
    lea rsi, [rip + boot_msg_vcpu]
    call boot_puts
    mov rax, r15
    lea rcx, [rip + boot_kernel_stacks]
    sub rax, rcx
    shr rax, 12
    call boot_puthex
    mov al, 10
    mov dx, 0x3f8
    out dx, al
    mov al, {exc_code}
    out 0xf4, al
    mov eax, 0xd0000008
    mov dword ptr [rax], {exc_code}
16:
    cli
    hlt
    jmp 16b

# In: rsi = NUL-terminated string. Clobbers rax, rdx, rsi.
boot_puts:
    mov dx, 0x3f8
17:
    mov al, [rsi]
    test al, al
    jz 18f
    out dx, al
    inc rsi
    jmp 17b
18:
    ret

# In: rax = value; prints 0x and the hex digits without leading zeros. Clobbers rax, rcx, rdx, rdi.
boot_puthex:
    mov rdi, rax
    mov dx, 0x3f8
    mov al, 0x30
    out dx, al
    mov al, 0x78
    out dx, al
    mov ecx, 60
19:
    cmp ecx, 0
    je 20f
    mov rax, rdi
    shr rax, cl
    test rax, rax
    jnz 20f
    sub ecx, 4
    jmp 19b
20:
    mov rax, rdi
    shr rax, cl
    and eax, 15
    cmp eax, 10
    jb 21f
    add eax, 0x27
21:
    add eax, 0x30
    out dx, al
    sub ecx, 4
    jns 20b
    ret
"#,
    max_vcpus = const MAX_VCPUS,
    kstack = const KERNEL_STACK_SIZE,
    ustack = const USER_STACK_SIZE,
    too_many = const TOO_MANY_VCPUS_EXIT_CODE,
    exc_code = const EXCEPTION_EXIT_CODE,
    entry = sym crate::workload_entry,
    free_start = sym FREE_START,
    mapped_limit = sym MAPPED_LIMIT,
    used_1g = sym USED_1G_PAGES,
    boot_pvh = sym BOOT_PVH,
    pvh_magic = const PVH_MAGIC,
    bad_start_info = const BAD_START_INFO_EXIT_CODE,
    idt_entries = const IDT_ENTRIES,
);

/// True when the guest entered through the PVH entry, i.e. runs under QEMU.
pub fn on_qemu() -> bool {
    BOOT_PVH.load(core::sync::atomic::Ordering::Relaxed) == 1
}
