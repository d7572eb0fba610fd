//! Wire format, version 3. This module alone knows the byte layout (the sender builds pages
//! frames with [`PagesFrameWriter`], the receiver reads them through [`PageTable`]); everything is
//! little-endian, every length is checked against a fixed limit before anything is allocated,
//! and crc32 (IEEE, as `crc32fast` computes it) covers every header and payload as sent.
//!
//! # Connection
//!
//! A migration uses one or more channels, each a stream socket (TCP or Unix). Each channel
//! opens with a [`Hello`] from the sender, answered by a [`HelloReply`] from the receiver. Then
//! the sender sends frames; the receiver sends frames back on the same socket (the return path):
//! a [`FrameKind::Error`] on any channel when it fails, and the handover on channel 0.
//!
//! With TLS ([`tls`](crate::tls)), each connection is a TLS 1.3 session first, and every byte
//! described here, the hello included, travels inside its records; the layout is the same.
//!
//! ## Handover
//!
//! The source decides who runs the guest, and the destination never runs it before it knows:
//!
//! ```text
//!  sender                                   receiver
//!  ... device state, end of stream ──────>  verifies everything
//!                                  <──────  ready (pages, device-state length)
//!  checks the counts; commits: from
//!  here it never resumes the guest
//!  decision go ──────────────────────────>  may run the guest
//!                                  <──────  decided go
//! ```
//!
//! A sender that fails before it commits sends an error (or decision abort) instead; a receiver
//! that sent *ready* and then loses channel 0 is *in doubt*: it keeps the complete state, does
//! not run it, and accepts new connections that greet with the same session's hello and send
//! one decision frame, which it answers with *decided*. Version 1 had no handover (its receiver
//! ran the guest on its own word), and version 2 had no postcopy; this build speaks only
//! version 3.
//!
//! ## Postcopy
//!
//! A migration that may switch to postcopy says so in every hello (flag `postcopy`) and opens one
//! more connection, the *fault channel* (flag `fault`, index = the data channel count), which
//! stays idle until postcopy starts. The switch replaces the final round:
//!
//! ```text
//!  sender (guest paused, memory frozen)          receiver
//!  discard bitmaps (channel 0) ────────────────>  pages dirtied since they were sent
//!  device state (channel 0) ───────────────────>
//!  postcopy marker (every data channel) ───────>  pre-copy over; makes the wanted pages
//!                                                 absent and registers userfaultfd
//!                                   <──────────  ready (pre-copy pages, device-state length)
//!  commits; decision go ───────────────────────>  runs the guest
//!                                   <──────────  decided go
//!  pushes the wanted pages (data channels)  ───>  places them (UFFDIO_COPY)
//!                                   <──────────  request (fault channel), for a page a
//!                                                 thread faulted on
//!  the requested pages (fault channel) ────────>  places them, waking the thread
//!  end of stream (every data channel) ─────────>
//!                                   <──────────  done (channel 0): every page is here
//! ```
//!
//! The wanted pages are exactly the discarded ones; every other page must have arrived in
//! pre-copy. The sender sends only wanted pages, each with the content of the frozen memory, so
//! a page that arrives twice (pushed and requested) carries the same bytes; the first placement
//! wins. A page pushed on a data channel keeps its fixed channel; the fault channel carries
//! any. On a broken connection both sides pause (nothing is lost: the source keeps its memory,
//! the destination what it placed); the source reconnects every channel with flag `resume`,
//! the receiver answers on channel 0 with the bitmaps of the pages it holds (*received*) and
//! *resume*, and sends its outstanding requests again on the new fault channel; the source then
//! pushes every wanted page not received.
//!
//! ## Same host
//!
//! Over a Unix socket, a sender whose guest memory is shareable (every region a memfd or a
//! shared file mapping) may hand it over instead of copying it. Its channel 0 hello says so
//! (flag `share`) and is followed at once by a [`MemoryFds`] message carrying one descriptor
//! per region (`SCM_RIGHTS`). The receiver checks them (regular files of exactly each region's
//! length, open for writing, not sealed against writes) and answers *shared* (it maps them in
//! place of its own memory), *copying* with the reason it would not (then pages flow as
//! usual), or refuses. A shared migration sends no page: its rounds are empty, and the end of
//! stream, the device state and the handover are as above. From its commit on, the source
//! refuses every access to the memory and makes its mappings inaccessible; a receiver that
//! does not keep the guest maps its own memory again in place of the sender's.
//!
//! ```text
//!  sender                                   receiver
//!  hello (share) + memory fds ───────────>  checks and maps them
//!                                  <──────  hello reply: shared
//!  end of round (0 pages), device state,
//!  end of stream (0 pages) ──────────────>
//!  ... the handover, as above
//! ```
//!
//! ## Hello (sender → receiver), 48 bytes + 24 per region
//!
//! ```text
//! offset size field
//!      0    8 magic "RAMJET\r\n"
//!      8    2 version (3); magic and version stay at these offsets in every version
//!     10    2 flags: bit 0 postcopy (the migration may switch to postcopy, and has a fault
//!             channel), bit 1 fault (this is the fault channel), bit 2 resume (a reconnection
//!             of a paused postcopy), bit 3 share (memory descriptors follow; channel 0
//!             only, never with postcopy), bits 8-15 the reconnection attempt (1 to 255,
//!             wrapping; non-zero exactly with resume); fault and resume need postcopy, other
//!             bits are 0
//!     12    4 page size (4096)
//!     16   16 session id, the same on every channel of a migration
//!     32    2 channel index, below the channel count (the fault channel's: equal to it)
//!     34    2 channel count, 1..=64
//!     36    4 region count, 1..=256
//!     40    4 crc32 of bytes 0..40, checked before any count in them is used
//!     44    4 crc32 of bytes 0..48 (this field zero) and the region table
//!     48 24*n region table, per region:
//!             0 4 region id
//!             4 4 reserved, 0
//!             8 8 guest base address
//!            16 8 length in bytes, a non-zero multiple of the page size
//! ```
//!
//! ## Hello reply (receiver → sender), 24 bytes + reason
//!
//! ```text
//!      0    8 magic "RAMJET\r\n"
//!      8    2 version (3)
//!     10    2 verdict: 1 accept, 2 refuse, 3 shared (accepted; the memory was taken), 4
//!             copying (accepted; the memory was not taken, the reason says why); 3 and 4
//!             answer only a hello with flag share
//!     12    4 reason length, at most 1024 (0 for 1 and 3)
//!     16    4 crc32 of bytes 0..24 (this field zero) and the reason
//!     20    4 crc32 of bytes 0..16, checked before the reason length is used
//!     24    n reason, UTF-8
//! ```
//!
//! ## Memory descriptors (sender → receiver, after a hello with flag share), 24 bytes
//!
//! ```text
//!      0    8 magic "RAMJET\r\n"
//!      8    2 version (3)
//!     10    2 kind: 1 (memory descriptors)
//!     12    4 descriptor count: the hello's region count; the descriptors ride with the
//!             first byte (SCM_RIGHTS), in region order
//!     16    4 reserved, 0
//!     20    4 crc32 of bytes 0..20
//! ```
//!
//! ## Frame header, 32 bytes, then `payload length` bytes
//!
//! ```text
//!      0    2 kind (see below); 0 is invalid, so a zeroed header means nothing
//!      2    2 flags, 0
//!      4    4 region index (pages, discard, request, received), else 0
//!      8    8 value: first page (pages, request), page count (end-of-round, end-of-stream,
//!             ready, postcopy, done, resume), the decision (decision, decided: 1 go, 0
//!             abort), byte offset (device state), first bitmap word (discard, received)
//!     16    4 round, from 1 (pages; the last pre-copy round in end markers and postcopy
//!             markers), else 0
//!     20    4 page count (pages, request: 1..=1024), else 0
//!     24    4 payload length (limits per kind below)
//!     28    4 crc32 of the header (this field zero) followed by the payload as sent
//! ```
//!
//! | kind | name | direction | payload |
//! |---|---|---|---|
//! | 1 | pages | → | page table, then page data |
//! | 2 | end of round | → | none; value = pages this channel sent in the round |
//! | 3 | device state | → | a piece of the device-state blob (≤ 8 MiB); value = its offset |
//! | 4 | end of stream | → | none; value = pages this channel sent in all rounds |
//! | 5 | error | ↔ | UTF-8 message, ≤ 1024 bytes |
//! | 6 | ready | ← | 8 bytes: device-state length; value = pages received on all channels |
//! | 7 | decision | → | none; value 1 go (handed over), 0 abort (the source resumes) |
//! | 8 | decided | ← | none; value = the decision received |
//! | 9 | discard | → | bitmap words (little-endian u64, bit n = page 64·word + n), ≤ 8 MiB: pages to drop |
//! | 10 | postcopy | → | none; value = pages this channel sent in pre-copy |
//! | 11 | request | ← | none, on the fault channel; `count` pages of `region` from page `value` |
//! | 12 | done | ← | 216 bytes: the fault-latency distribution ([`DONE_WORDS`]); value = pages placed in postcopy |
//! | 13 | received | ← | bitmap words, as discard: pages the receiver holds (recovery) |
//! | 14 | resume | ← | none; value = pages the receiver holds; the bitmaps are complete |
//!
//! In postcopy, pages frames carry round = the last pre-copy round + 1, and end of stream its
//! count of pushed pages.
//!
//! A pages frame's payload is a table of `page count` entries of 8 bytes, then the data of each
//! page in table order:
//!
//! ```text
//!      0    4 page offset from the frame's first page; strictly increasing
//!      4    4 encoding << 24 | data length: 0 zero page (length 0), 1 raw (length 4096),
//!             2 lz4 block (0 < length < 4096, decoding to exactly 4096 bytes),
//!             3 zstd frame (0 < length < 4096, decoding to exactly 4096 bytes)
//! ```
//!
//! A receiver decodes every encoding whatever the sender chose; a receiver from before zstd
//! (encoding 3) refuses such a page as an invalid encoding, and the migration fails there.
//!
//! The data lengths must add up to the payload length minus the table. A pages frame is at most
//! 8 MiB; the device state at most 1 GiB in all.
//!
//! # Channels and ordering
//!
//! Every page has a fixed channel: page `p` of any region travels on channel
//! `(p / 64) % channel count` ([`channel_of`]), and a receiver refuses a page on another
//! channel. Within a round a page is sent at most once. A channel is one ordered stream, so a
//! page re-sent in round N+1 always arrives after its round-N copy: a stale copy can never
//! overwrite a newer one, however many channels there are.

mod error;
mod frame;
mod hello;
mod le;
mod limits;
mod pages;

pub use error::DecodeError;
pub use frame::{DONE_WORDS, FrameHeader, FrameKind, seal, seal_split};
pub use hello::{Hello, HelloFlags, HelloReply, MemoryFds, Verdict};
pub use limits::{
    CHUNK_PAGES, MAGIC, MAX_CHANNELS, MAX_DEVICE_STATE, MAX_MESSAGE, MAX_PAGES_PER_FRAME,
    MAX_PAYLOAD, MAX_REGIONS, VERSION, WIRE_PAGE_SIZE, channel_of,
};
pub use pages::{Encoding, PageEntry, PageTable, PagesFrameWriter, Piece, frame_capacity};
