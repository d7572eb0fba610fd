//! The constants of version 3 and the fixed page → channel assignment.

/// The first eight bytes of every hello and hello reply.
pub const MAGIC: [u8; 8] = *b"RAMJET\r\n";
/// The protocol version this build speaks.
pub const VERSION: u16 = 3;
/// The only page size version 3 supports.
pub const WIRE_PAGE_SIZE: u32 = 4096;
/// Most regions a hello may describe.
pub const MAX_REGIONS: u32 = 256;
/// Most channels a migration may use.
pub const MAX_CHANNELS: u16 = 64;
/// Most pages in one pages frame.
pub const MAX_PAGES_PER_FRAME: u32 = 1024;
/// Largest payload of any frame.
pub const MAX_PAYLOAD: u32 = 8 << 20;
/// Longest refusal reason or error message, in bytes.
pub const MAX_MESSAGE: u32 = 1024;
/// Largest device-state blob.
pub const MAX_DEVICE_STATE: u64 = 1 << 30;
/// Bytes per page table entry of a pages frame.
pub(super) const PAGE_ENTRY_LEN: u32 = 8;
/// Pages per channel-assignment chunk.
pub const CHUNK_PAGES: u64 = 64;

/// The channel that carries page `page` when there are `channels` channels (at least 1).
pub fn channel_of(page: u64, channels: u16) -> u16 {
    let channels = u64::from(channels.max(1));
    // The remainder is below `channels`, a u16.
    u16::try_from((page / CHUNK_PAGES) % channels).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_assignment_is_by_chunk() {
        assert_eq!(channel_of(0, 4), 0);
        assert_eq!(channel_of(63, 4), 0);
        assert_eq!(channel_of(64, 4), 1);
        assert_eq!(channel_of(64 * 5, 4), 1);
        assert_eq!(channel_of(u64::MAX, 64), ((u64::MAX / 64) % 64) as u16);
        assert_eq!(channel_of(1000, 1), 0);
        assert_eq!(channel_of(1000, 0), 0);
    }
}
