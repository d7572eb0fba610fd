//! Frames on their way from the codec workers to a channel's writer, and whole rounds on their
//! way to writers that encode them.

use std::sync::Arc;

use super::job::RoundWork;
use crate::arena::Slot;
use crate::codec::PageCompression;
use crate::memory::{Frozen, MemoryError};
use crate::wire::Piece;

/// Frames queued per channel before workers wait for its writer.
pub(super) const QUEUE_FRAMES: usize = 8;
/// A writer sends up to this many bytes in one vectored write.
pub(super) const WRITE_BATCH_BYTES: usize = 1 << 20;

/// A pool buffer for one pages frame: its bytes (a slot of the session's arena, which a
/// transport may register with the kernel) and, for a frame sent in place, its pieces.
#[derive(Debug)]
pub(super) struct FrameBuf {
    pub(super) data: Slot,
    pub(super) pieces: Vec<Piece>,
    /// What the frame holds, for `Compression::Auto`'s measurements.
    pub(super) holds: Holds,
}

/// The non-zero pages of a frame, and the codec they were encoded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Holds {
    pub(super) nonzero: u32,
    pub(super) codec: PageCompression,
}

/// A frame on its way to a writer.
pub(super) enum Outgoing {
    /// A pages frame: the first `len` bytes of a pool buffer.
    Pooled(FrameBuf, usize),
    /// A pages frame of the paused final round, `len` bytes on the wire: the buffer's pieces,
    /// and raw pages of region `region` straight from the frozen memory.
    InPlace {
        frame: FrameBuf,
        len: usize,
        region: usize,
        memory: Frozen,
    },
    /// A whole round, whose jobs of this channel its writer plans and encodes itself, right
    /// before it sends them: the pages are still in its cache when the kernel copies them, and
    /// no frame is handed from thread to thread (a job through a codec worker takes three
    /// hand-offs). Only where the workers would not compress (`off`), or may not
    /// (`auto`, which picks the writer's codec: see `writers_encode` in `mod.rs`).
    Round(Arc<RoundWork>),
    /// A control frame.
    Control(Vec<u8>),
    /// Our error message for the receiver: sent even while the session is stopping.
    Farewell(Vec<u8>),
}

impl Outgoing {
    /// Bytes on the wire (none for a round: its writer encodes it into frames first).
    pub(super) fn len(&self) -> usize {
        match self {
            Outgoing::Pooled(_, len) | Outgoing::InPlace { len, .. } => *len,
            Outgoing::Round(_) => 0,
            Outgoing::Control(frame) | Outgoing::Farewell(frame) => frame.len(),
        }
    }

    /// Appends the frame's bytes, in order, to `out` (nothing for a round: its writer encodes
    /// it into frames first).
    pub(super) fn slices<'a>(&'a self, out: &mut Vec<&'a [u8]>) -> Result<(), MemoryError> {
        match self {
            Outgoing::Round(_) => {}
            Outgoing::Pooled(frame, len) => out.push(&frame.data[..*len]),
            Outgoing::InPlace {
                frame,
                region,
                memory,
                ..
            } => {
                for piece in &frame.pieces {
                    out.push(match *piece {
                        Piece::Buffer { start, len } => &frame.data[start..start + len],
                        Piece::Page(page) => memory.page(*region, page)?,
                    });
                }
            }
            Outgoing::Control(frame) | Outgoing::Farewell(frame) => out.push(frame),
        }
        Ok(())
    }

    /// What the frame holds, if it is a pages frame.
    pub(super) fn holds(&self) -> Option<Holds> {
        match self {
            Outgoing::Pooled(frame, _) | Outgoing::InPlace { frame, .. } => Some(frame.holds),
            Outgoing::Round(_) | Outgoing::Control(_) | Outgoing::Farewell(_) => None,
        }
    }

    /// The pool buffer, if it has one.
    pub(super) fn into_buffer(self) -> Option<FrameBuf> {
        match self {
            Outgoing::Pooled(frame, _) | Outgoing::InPlace { frame, .. } => Some(frame),
            Outgoing::Round(_) | Outgoing::Control(_) | Outgoing::Farewell(_) => None,
        }
    }
}
