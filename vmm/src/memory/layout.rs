//! Guest physical layout of RAM: where RAM goes around the 32-bit PCI hole.
//!
//! RAM up to [`MMIO_HOLE_START`] (3 GiB) lives at guest address 0; whatever is left lives at
//! [`MMIO_HOLE_END`] (4 GiB) and above. The hole stays unbacked so that guest accesses to it exit
//! to the VMM as MMIO.

/// First byte of the 32-bit MMIO (PCI) hole: 3 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// First byte after the 32-bit MMIO hole: 4 GiB.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Size of the 32-bit MMIO hole (1 GiB).
pub const MMIO_HOLE_SIZE: u64 = MMIO_HOLE_END - MMIO_HOLE_START;

/// Splits `size` bytes of RAM into `(guest_addr, len)` ranges around the MMIO hole.
///
/// One range if `size <= 3 GiB`, else two: `(0, 3 GiB)` and `(4 GiB, size - 3 GiB)`.
/// `size == 0` gives no range.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size == 0 {
        Vec::new()
    } else if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_the_hole_is_one_range() {
        assert_eq!(ram_ranges(0), vec![]);
        assert_eq!(ram_ranges(1 << 20), vec![(0, 1 << 20)]);
        assert_eq!(ram_ranges(MMIO_HOLE_START), vec![(0, MMIO_HOLE_START)]);
    }

    #[test]
    fn above_the_hole_is_split() {
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(
            ram_ranges(MMIO_HOLE_START + 4096),
            vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, 4096)]
        );
    }
}
