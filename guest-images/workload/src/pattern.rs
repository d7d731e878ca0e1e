//! The data pattern: every 8-byte word depends on its guest physical address, the page's
//! generation number and the seed, so a lost, stale, misplaced or corrupted page is caught.

use crate::layout::PAGE;

const WORDS: usize = (PAGE / 8) as usize;
const K: u64 = 0x9E37_79B9_7F4A_7C15;

/// A 64-bit mixer (splitmix64's finalizer).
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Value of the word at `gpa` within a page of generation `gen`.
#[inline]
pub fn word(page_base: u64, gpa: u64) -> u64 {
    page_base ^ gpa.wrapping_mul(K)
}

/// Per-page constant of the pattern.
#[inline]
pub fn page_base(page_gpa: u64, gen: u32, seed: u64) -> u64 {
    mix64(page_gpa ^ mix64(u64::from(gen) ^ seed.rotate_left(32)))
}

/// The page at `gpa` as words.
///
/// # Safety
/// `gpa` is a page-aligned span page, identity-mapped, accessed by this vCPU only.
#[inline]
unsafe fn page<'a>(gpa: u64) -> &'a mut [u64; WORDS] {
    // SAFETY: per the caller's contract.
    unsafe { &mut *(gpa as *mut [u64; WORDS]) }
}

/// Writes words 1.. of the page (word 0 is written by the timed first access).
///
/// # Safety
/// As for [`page`].
pub unsafe fn fill_rest(gpa: u64, base: u64) {
    // SAFETY: per the caller's contract.
    let p = unsafe { page(gpa) };
    let mut m = (gpa + 8).wrapping_mul(K);
    for w in p.iter_mut().skip(1) {
        *w = base ^ m;
        m = m.wrapping_add(8u64.wrapping_mul(K));
    }
}

/// Checks the whole page; returns the first wrong word as (gpa, expected, found).
///
/// # Safety
/// As for [`page`].
pub unsafe fn check(gpa: u64, base: u64) -> Option<(u64, u64, u64)> {
    // SAFETY: per the caller's contract.
    let p = unsafe { page(gpa) };
    let mut m = gpa.wrapping_mul(K);
    let mut bad = false;
    for w in p.iter() {
        bad |= *w != base ^ m;
        m = m.wrapping_add(8u64.wrapping_mul(K));
    }
    if !bad {
        return None;
    }
    for (i, w) in p.iter().enumerate() {
        let a = gpa + 8 * i as u64;
        let e = word(base, a);
        if *w != e {
            return Some((a, e, *w));
        }
    }
    None
}

/// Writes word 0 of the page (volatile: this is the timed access).
///
/// # Safety
/// As for [`page`].
#[inline(always)]
pub unsafe fn write_first(gpa: u64, base: u64) {
    // SAFETY: per the caller's contract.
    unsafe { core::ptr::write_volatile(gpa as *mut u64, word(base, gpa)) }
}

/// Reads word 0 of the page (volatile: this is the timed access).
///
/// # Safety
/// As for [`page`].
#[inline(always)]
pub unsafe fn read_first(gpa: u64) -> u64 {
    // SAFETY: per the caller's contract.
    unsafe { core::ptr::read_volatile(gpa as *const u64) }
}
