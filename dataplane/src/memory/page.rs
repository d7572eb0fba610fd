//! The page, the unit ramjet moves guest memory in.

/// Bytes per guest page. ramjet moves 4 KiB pages; larger host pages still hold 4 KiB guest
/// pages.
pub const PAGE_SIZE: usize = 4096;
/// [`PAGE_SIZE`] for offset arithmetic.
pub(super) const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;
