//! ioctl request numbers (include/uapi/asm-generic/ioctl.h) and the request types ("magic"
//! bytes, bits 8..16 of a request) of the devices the VMM talks to.

use libc::c_ulong;

const NRBITS: u32 = 8;
const TYPEBITS: u32 = 8;
const SIZEBITS: u32 = 14;
const TYPESHIFT: u32 = NRBITS;
const SIZESHIFT: u32 = TYPESHIFT + TYPEBITS;
const DIRSHIFT: u32 = SIZESHIFT + SIZEBITS;
const WRITE: c_ulong = 1;
const READ: c_ulong = 2;

/// `_IOC(dir, type, nr, size)`.
const fn ioc(dir: c_ulong, ty: u8, nr: u8, size: usize) -> c_ulong {
    (dir << DIRSHIFT)
        | ((size as c_ulong) << SIZESHIFT)
        | ((ty as c_ulong) << TYPESHIFT)
        | nr as c_ulong
}

/// `_IO(type, nr)`: a request without an argument struct.
pub const fn io(ty: u8, nr: u8) -> c_ulong {
    ioc(0, ty, nr, 0)
}

/// `_IOWR(type, nr, T)`: a request that reads and writes a `size`-byte struct.
pub const fn iowr(ty: u8, nr: u8, size: usize) -> c_ulong {
    ioc(READ | WRITE, ty, nr, size)
}

/// The request type of a request number (`_IOC_TYPE`).
pub const fn request_type(request: c_ulong) -> u8 {
    ((request >> TYPESHIFT) & ((1 << TYPEBITS) - 1)) as u8
}

/// `KVMIO` (include/uapi/linux/kvm.h): every KVM ioctl.
pub const TYPE_KVM: u8 = 0xAE;
/// `UFFDIO` (include/uapi/linux/userfaultfd.h): every userfaultfd ioctl.
pub const TYPE_UFFD: u8 = 0xAA;
/// `'T'` (include/uapi/asm-generic/ioctls.h): terminal and socket ioctls (TCGETS, TIOCGWINSZ,
/// FIONBIO, FIONREAD: 0x54xx).
pub const TYPE_TTY: u8 = b'T';

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernel() {
        // UFFDIO_CONTINUE = _IOWR(UFFDIO, 0x07, struct uffdio_continue) (32 bytes), as
        // userfaultfd-sys has it: 0xc020aa07.
        assert_eq!(iowr(TYPE_UFFD, 0x07, 32), 0xc020_aa07);
        assert_eq!(io(TYPE_UFFD, 0x00), 0xaa00);
        assert_eq!(request_type(0xc020_aa07), TYPE_UFFD);
        // KVM_RUN = _IO(KVMIO, 0x80).
        assert_eq!(io(TYPE_KVM, 0x80), 0xae80);
    }
}
