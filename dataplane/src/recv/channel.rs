//! One channel of a receive session: the reader that checks and applies its frames, handing
//! lz4 pages to the decode workers (`decode.rs`). Why their writes to guest memory never overlap
//! is explained in the [parent module](super).

use std::io::IoSliceMut;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use crossbeam_channel::{self as channels, Receiver};
use ramjet_control::Fact;

use super::decode::{DecodeJob, LzBuf};
use super::shared::{LINGER, Shared};
use crate::codec::BatchCounts;
use crate::dirty::DirtySet;
use crate::error::Error;
use crate::memory::{ReceiveLease, RegionLayout};
use crate::pool::recycle;
use crate::transport::LinkReader;
use crate::wire::{
    DecodeError, Encoding, FrameHeader, FrameKind, MAX_DEVICE_STATE, MAX_PAGES_PER_FRAME,
    PageTable, channel_of,
};

/// What one channel delivered.
pub(super) struct ChannelDone {
    pub(super) pages: u64,
    pub(super) rounds: u32,
    pub(super) device_state: Vec<u8>,
    /// Channel 0's link, which carries the handover next; in postcopy every channel's, which
    /// carries the postcopy pages.
    pub(super) link: Option<Box<dyn LinkReader>>,
    /// The channel ended pre-copy for postcopy (a postcopy marker, not the end of stream).
    pub(super) postcopy: bool,
    /// Channel 0, postcopy: the pages to drop, from the sender's discard bitmaps.
    pub(super) discard: Option<DirtySet>,
}

/// Reads and applies one channel's frames.
pub(super) struct ChannelReader {
    channel: u16,
    link: Box<dyn LinkReader>,
    shared: Arc<Shared>,
    decode: channels::Sender<DecodeJob>,
    done_tx: channels::Sender<Result<(), Error>>,
    done_rx: Receiver<Result<(), Error>>,
    /// Decode jobs sent and not yet finished.
    outstanding: usize,
    /// The last round this channel finished.
    round: u32,
    round_pages: u64,
    total_pages: u64,
    table: PageTable,
    table_bytes: Vec<u8>,
    /// Reused allocation for the vectored read's buffer list.
    iov: Vec<IoSliceMut<'static>>,
    /// The next frame's header, read together with a pages frame's data (a pages frame is
    /// always followed by another frame), which saves a read per frame.
    next_header: [u8; FrameHeader::LEN],
    have_next_header: bool,
    device_state: Vec<u8>,
    /// Channel 0, postcopy: the discard bitmaps so far.
    discard: Option<DirtySet>,
}

impl ChannelReader {
    pub(super) fn new(
        channel: u16,
        link: Box<dyn LinkReader>,
        shared: Arc<Shared>,
        decode: channels::Sender<DecodeJob>,
    ) -> Self {
        // Unbounded, but it holds at most one result per decode job this reader has sent and
        // not yet waited for: it waits for all of them at every end of round.
        let (done_tx, done_rx) = channels::unbounded();
        ChannelReader {
            channel,
            link,
            shared,
            decode,
            done_tx,
            done_rx,
            outstanding: 0,
            round: 0,
            round_pages: 0,
            total_pages: 0,
            table: PageTable::new(),
            table_bytes: Vec::with_capacity(MAX_PAGES_PER_FRAME as usize * 8),
            iov: Vec::with_capacity(MAX_PAGES_PER_FRAME as usize + 1),
            next_header: [0; FrameHeader::LEN],
            have_next_header: false,
            device_state: Vec::new(),
            discard: None,
        }
    }

    pub(super) fn run(mut self) -> Result<ChannelDone, Error> {
        let result = self.read_frames();
        // No decode job of this channel may outlive the reader.
        let waited = self.wait_decodes();
        let mut done = result?;
        waited?;
        if self.channel == 0 || done.postcopy {
            done.link = Some(self.link);
        }
        Ok(done)
    }

    fn io(&self, op: &'static str, e: std::io::Error) -> Error {
        Error::io(self.channel, op, self.shared.timeout, e)
    }

    fn protocol(&self, problem: String) -> Error {
        Error::protocol(self.channel, problem)
    }

    fn decode_error(&self, source: DecodeError) -> Error {
        Error::Decode {
            channel: self.channel,
            source,
        }
    }

    fn read_frames(&mut self) -> Result<ChannelDone, Error> {
        loop {
            if self.shared.stop.is_stopped() {
                self.drain();
                return Err(Error::Cancelled);
            }
            let mut fixed = [0u8; FrameHeader::LEN];
            if std::mem::take(&mut self.have_next_header) {
                fixed = self.next_header;
            } else {
                self.link
                    .recv(&mut fixed)
                    .map_err(|e| self.io("receiving a frame header", e))?;
            }
            let header = FrameHeader::decode(&fixed).map_err(|e| self.decode_error(e))?;
            self.shared
                .counters
                .add_wire_bytes(FrameHeader::LEN as u64 + u64::from(header.len));
            match header.kind {
                FrameKind::Pages if self.shared.shared_memory => {
                    let problem = self.protocol(
                        "a pages frame, after the sender handed its memory over by descriptor"
                            .into(),
                    );
                    return Err(self.unverified(&header, false, problem));
                }
                FrameKind::Pages => self.pages(&header)?,
                FrameKind::EndOfRound => self.end_of_round(&header)?,
                FrameKind::DeviceState => self.device_state_piece(&header)?,
                FrameKind::EndOfStream => return self.end_of_stream(&header),
                FrameKind::Discard if self.channel == 0 && self.shared.postcopy => {
                    self.discard_piece(&header)?;
                }
                FrameKind::Postcopy if self.shared.postcopy => {
                    return self.end_of_precopy(&header);
                }
                FrameKind::Error => return Err(self.peer_error(&header)),
                kind @ (FrameKind::Ready
                | FrameKind::Decision
                | FrameKind::Decided
                | FrameKind::Discard
                | FrameKind::Postcopy
                | FrameKind::Request
                | FrameKind::Done
                | FrameKind::Received
                | FrameKind::Resume) => {
                    let problem = self.protocol(format!(
                        "unexpected {kind:?} frame before the end of stream"
                    ));
                    return Err(self.unverified(&header, false, problem));
                }
            }
        }
    }

    /// Reads and discards until the sender closes, for at most [`LINGER`].
    fn drain(&mut self) {
        let deadline = Instant::now() + LINGER;
        let mut scratch = [0u8; 4096];
        while Instant::now() < deadline && self.link.recv(&mut scratch).is_ok() {}
    }

    /// A frame failed a check before its crc could be verified (the crc covers the payload,
    /// which is not read yet): reads the rest of the frame and, if the crc does not match
    /// either, reports the corruption instead of what the corrupted bytes seemed to say. With
    /// `table`, the page table (already read) is part of the payload.
    fn unverified(&mut self, header: &FrameHeader, table: bool, problem: Error) -> Error {
        let mut hasher = header.hasher();
        let mut rest = header.len as usize;
        if table {
            hasher.update(&self.table_bytes);
            rest = rest.saturating_sub(self.table_bytes.len());
        }
        // The payload length passed the header's limits (at most 8 MiB).
        let mut scratch = vec![0u8; rest.min(64 << 10)];
        while rest > 0 {
            let n = rest.min(scratch.len());
            if self.link.recv(&mut scratch[..n]).is_err() {
                return problem;
            }
            hasher.update(&scratch[..n]);
            rest -= n;
        }
        match header.verify(hasher) {
            Err(corrupt) => self.decode_error(corrupt),
            Ok(()) => problem,
        }
    }

    fn verify(&self, header: &FrameHeader, payload: &[u8]) -> Result<(), Error> {
        let mut hasher = header.hasher();
        hasher.update(payload);
        header.verify(hasher).map_err(|e| self.decode_error(e))
    }

    /// A pages frame, in three steps: its page table is read and every page in it checked
    /// before any byte of page data is touched; then the data is received (raw pages straight
    /// into guest memory); then the crc is verified and the pages applied.
    fn pages(&mut self, header: &FrameHeader) -> Result<(), Error> {
        let region = self.check_pages(header)?;
        let compressed = self.table.compressed_bytes();
        let mut lz = match compressed {
            0 => None,
            n => {
                let mut buf = self.shared.pool.take().ok_or(Error::Internal {
                    channel: self.channel,
                    what: "the compressed-page buffer pool broke",
                })?;
                buf.data.resize(n, 0);
                buf.pages.clear();
                Some(buf)
            }
        };
        let shared = Arc::clone(&self.shared);
        let received = self.receive_data(&shared.lease, region, lz.as_mut());
        let applied =
            received.and_then(|()| self.verify_and_apply(header, &shared, region, lz.as_mut()));
        if let Err(e) = applied {
            if let Some(buf) = lz {
                shared.pool.give(buf);
            }
            return Err(e);
        }
        if let Some(buf) = lz {
            self.send_decode(region, buf)?;
        }
        Ok(())
    }

    /// Reads a pages frame's table and checks every page it names; returns the region index.
    /// A failed check reads the rest of the frame to tell corruption from a bad peer.
    fn check_pages(&mut self, header: &FrameHeader) -> Result<usize, Error> {
        let due = self.round + 1;
        if header.round != due {
            let problem = self.protocol(format!(
                "pages of round {} arrived while round {due} was due",
                header.round
            ));
            return Err(self.unverified(header, false, problem));
        }
        let region = header.region as usize;
        let memory = self.shared.lease.memory();
        let Some(layout) = memory.regions().get(region).map(|r| r.layout()) else {
            let problem = self.protocol(format!(
                "region index {region} does not exist (the guest has {} regions)",
                memory.regions().len()
            ));
            return Err(self.unverified(header, false, problem));
        };
        self.table_bytes.resize(PageTable::len_for(header), 0);
        let received = self.link.recv(&mut self.table_bytes);
        received.map_err(|e| self.io("receiving a page table", e))?;
        if let Err(e) = self.table.decode(header, &self.table_bytes) {
            let problem = self.decode_error(e);
            return Err(self.unverified(header, true, problem));
        }
        let stamps = &self.shared.stamps[region];
        let checked = self
            .table
            .pages()
            .try_for_each(|(page, _)| self.check_page(&layout, page, stamps));
        if let Err(problem) = checked {
            return Err(self.unverified(header, true, problem));
        }
        Ok(region)
    }

    /// Receives the page data of the frame whose table was checked, in wire order, with one
    /// vectored read: raw pages straight into guest memory, lz4 blocks into `lz`; and the next
    /// frame's header with it.
    fn receive_data(
        &mut self,
        lease: &ReceiveLease,
        region: usize,
        lz: Option<&mut LzBuf>,
    ) -> Result<(), Error> {
        let mut iov = recycle(std::mem::take(&mut self.iov));
        let mut lz_rest: &mut [u8] = lz.map_or(&mut [], |lz| &mut lz.data[..]);
        for (page, entry) in self.table.pages() {
            match entry.encoding {
                Encoding::Zero => {}
                Encoding::Raw => {
                    // SAFETY: `check_page` passed for this page in this frame.
                    iov.push(IoSliceMut::new(unsafe { self.page(lease, region, page) }?));
                }
                Encoding::Lz4 | Encoding::Zstd => {
                    let (part, rest) =
                        std::mem::take(&mut lz_rest).split_at_mut(entry.len as usize);
                    lz_rest = rest;
                    iov.push(IoSliceMut::new(part));
                }
            }
        }
        iov.push(IoSliceMut::new(&mut self.next_header));
        let received = self.link.recv_vectored(&mut iov);
        self.iov = recycle(iov);
        received.map_err(|e| self.io("receiving page data and the next header", e))?;
        self.have_next_header = true;
        Ok(())
    }

    /// Checks the crc of the frame just received (header, table and data in the order sent),
    /// then applies it: zero pages are written (unless the memory is known to be zero), every
    /// page is stamped with the round, and the lz4 pages are listed in `lz` for a decode job.
    fn verify_and_apply(
        &mut self,
        header: &FrameHeader,
        shared: &Shared,
        region: usize,
        mut lz: Option<&mut LzBuf>,
    ) -> Result<(), Error> {
        let mut hasher = header.hasher();
        hasher.update(&self.table_bytes);
        let mut lz_at = 0usize;
        for (page, entry) in self.table.pages() {
            let len = entry.len as usize;
            match (entry.encoding, lz.as_deref()) {
                (Encoding::Raw, _) => {
                    // SAFETY: `check_page` passed for this page in this frame.
                    hasher.update(unsafe { self.page(&shared.lease, region, page) }?);
                }
                (Encoding::Lz4 | Encoding::Zstd, Some(lz)) => {
                    hasher.update(&lz.data[lz_at..lz_at + len]);
                }
                _ => {}
            }
            if entry.encoding.is_compressed() {
                lz_at += len;
            }
        }
        header.verify(hasher).map_err(|e| self.decode_error(e))?;

        let mut counts = BatchCounts::default();
        let known_zero = shared.known_zero[region];
        let stamps = &shared.stamps[region];
        let mut lz_at = 0usize;
        for (page, entry) in self.table.pages() {
            let Some(stamp) = stamp_of(stamps, page) else {
                continue;
            };
            match entry.encoding {
                Encoding::Zero => {
                    counts.zero += 1;
                    // Memory that is known to be zero needs no write.
                    if !(known_zero && stamp.load(Ordering::Relaxed) == 0) {
                        // SAFETY: `check_page` passed for this page in this frame.
                        unsafe { self.page(&shared.lease, region, page) }?.fill(0);
                    }
                }
                Encoding::Raw => counts.raw += 1,
                encoding @ (Encoding::Lz4 | Encoding::Zstd) => {
                    counts.add(encoding);
                    let len = entry.len as usize;
                    if let Some(lz) = lz.as_deref_mut() {
                        lz.pages.push((page, lz_at, len, encoding));
                    }
                    lz_at += len;
                }
            }
            stamp.store(header.round, Ordering::Relaxed);
        }
        shared.counters.add_pages(counts);
        self.round_pages += counts.pages();
        Ok(())
    }

    /// Hands the lz4 pages of a frame to the decode workers.
    fn send_decode(&mut self, region: usize, buf: LzBuf) -> Result<(), Error> {
        let job = DecodeJob {
            channel: self.channel,
            region,
            buf,
            done: self.done_tx.clone(),
        };
        if let Err(e) = self.decode.send(job) {
            self.shared.pool.give(e.into_inner().buf);
            return Err(Error::Internal {
                channel: self.channel,
                what: "the decode workers stopped unexpectedly",
            });
        }
        self.outstanding += 1;
        Ok(())
    }

    /// Destination page `page` of region `region`.
    ///
    /// # Safety
    ///
    /// [`ChannelReader::check_page`] must have passed for the page in the frame being read: the
    /// page is then this channel's, not yet written this round, and no decode job holds it
    /// (those of earlier rounds finished at their end of round, and a frame names each page
    /// once, its offsets strictly increasing), so this thread alone accesses it.
    #[expect(
        clippy::mut_from_ref,
        reason = "hands out guest memory, shared mutable memory behind raw pointers"
    )]
    unsafe fn page<'m>(
        &self,
        lease: &'m ReceiveLease,
        region: usize,
        page: u64,
    ) -> Result<&'m mut [u8], Error> {
        // SAFETY: exclusive access, as the caller guarantees.
        unsafe { lease.page_mut(region, page) }.map_err(|source| Error::Memory {
            channel: self.channel,
            source,
        })
    }

    /// Checks a page reference from the sender before any byte of it is touched.
    fn check_page(
        &self,
        layout: &RegionLayout,
        page: u64,
        stamps: &[AtomicU32],
    ) -> Result<(), Error> {
        if page >= layout.pages() {
            return Err(self.protocol(format!(
                "page {page} is outside region {} ({} pages)",
                layout.id(),
                layout.pages()
            )));
        }
        let owner = channel_of(page, self.shared.channels);
        if owner != self.channel {
            return Err(self.protocol(format!(
                "page {page} belongs on channel {owner}, not on channel {}",
                self.channel
            )));
        }
        let due = self.round + 1;
        if stamp_of(stamps, page).is_some_and(|s| s.load(Ordering::Relaxed) == due) {
            return Err(self.protocol(format!(
                "page {page} of region {} arrived twice in round {due}",
                layout.id()
            )));
        }
        Ok(())
    }

    /// Waits for every decode job this channel sent; returns the first error.
    fn wait_decodes(&mut self) -> Result<(), Error> {
        let mut first = Ok(());
        for _ in 0..std::mem::take(&mut self.outstanding) {
            let result = self.done_rx.recv().unwrap_or(Err(Error::Internal {
                channel: self.channel,
                what: "a decode worker stopped unexpectedly",
            }));
            if first.is_ok() {
                first = result;
            }
        }
        first
    }

    fn end_of_round(&mut self, header: &FrameHeader) -> Result<(), Error> {
        self.verify(header, &[])?;
        let due = self.round + 1;
        if header.round != due {
            return Err(self.protocol(format!(
                "end of round {} arrived while round {due} was due",
                header.round
            )));
        }
        self.wait_decodes()?;
        if header.value != self.round_pages {
            return Err(self.protocol(format!(
                "the sender sent {} pages in round {due} on this channel, {} arrived",
                header.value, self.round_pages
            )));
        }
        self.round = due;
        self.total_pages += self.round_pages;
        self.round_pages = 0;
        if self.channel == 0 {
            self.shared.counters.note_round(due);
            self.shared.sink.fact(Fact::Pass(u64::from(due)));
        }
        Ok(())
    }

    fn device_state_piece(&mut self, header: &FrameHeader) -> Result<(), Error> {
        if self.channel != 0 {
            let problem = self.protocol("device state arrived off channel 0".into());
            return Err(self.unverified(header, false, problem));
        }
        let start = self.device_state.len();
        if header.value != start as u64 {
            let problem = self.protocol(format!(
                "a device state piece for offset {} arrived after {start} bytes",
                header.value
            ));
            return Err(self.unverified(header, false, problem));
        }
        let end = start as u64 + u64::from(header.len);
        if end > MAX_DEVICE_STATE {
            let problem = self.decode_error(DecodeError::TooLarge {
                what: "device state",
                value: end,
                limit: MAX_DEVICE_STATE,
            });
            return Err(self.unverified(header, false, problem));
        }
        // The piece is at most 8 MiB (checked with the header), and the blob grows only by
        // what actually arrives.
        self.device_state.resize(start + header.len as usize, 0);
        let received = self.link.recv(&mut self.device_state[start..]);
        received.map_err(|e| self.io("receiving device state", e))?;
        self.verify(header, &self.device_state[start..])?;
        self.shared
            .counters
            .add_device_state_bytes(u64::from(header.len));
        Ok(())
    }

    fn end_of_stream(&mut self, header: &FrameHeader) -> Result<ChannelDone, Error> {
        self.end(header, "end of stream")
    }

    /// Postcopy: the end of this channel's pre-copy (checked like an end of stream).
    fn end_of_precopy(&mut self, header: &FrameHeader) -> Result<ChannelDone, Error> {
        let mut done = self.end(header, "postcopy marker")?;
        done.postcopy = true;
        done.discard = self.discard.take();
        Ok(done)
    }

    fn end(&mut self, header: &FrameHeader, what: &str) -> Result<ChannelDone, Error> {
        self.verify(header, &[])?;
        self.wait_decodes()?;
        if self.round_pages != 0 || header.round != self.round {
            return Err(self.protocol(format!(
                "{what} after round {} arrived in round {}",
                header.round,
                self.round + 1
            )));
        }
        if header.value != self.total_pages {
            return Err(self.protocol(format!(
                "the sender sent {} pages on this channel, {} arrived",
                header.value, self.total_pages
            )));
        }
        Ok(ChannelDone {
            pages: self.total_pages,
            rounds: self.round,
            device_state: std::mem::take(&mut self.device_state),
            link: None,
            postcopy: false,
            discard: None,
        })
    }

    /// Postcopy, channel 0: a piece of a region's discard bitmap.
    fn discard_piece(&mut self, header: &FrameHeader) -> Result<(), Error> {
        // At most 8 MiB, checked with the header.
        let mut words = vec![0u8; header.len as usize];
        let received = self.link.recv(&mut words);
        received.map_err(|e| self.io("receiving a discard bitmap", e))?;
        self.verify(header, &words)?;
        let memory = self.shared.lease.memory();
        let region = header.region as usize;
        let Some(pages) = memory.regions().get(region).map(|r| r.layout().pages()) else {
            return Err(self.protocol(format!(
                "a discard bitmap for region index {region}, which does not exist"
            )));
        };
        let first = header.value;
        let count = (words.len() / 8) as u64;
        if first.saturating_add(count) > pages.div_ceil(64) {
            return Err(self.protocol(format!(
                "a discard bitmap of {count} words from word {first} runs past region \
                 {region}'s {pages} pages"
            )));
        }
        let set = self.discard.get_or_insert_with(|| DirtySet::none(memory));
        for (i, word) in FrameHeader::bitmap_words(&words).enumerate() {
            let index = usize::try_from(first + i as u64).unwrap_or(usize::MAX);
            set.merge_word(region, index, word);
        }
        Ok(())
    }

    fn peer_error(&mut self, header: &FrameHeader) -> Error {
        let mut message = vec![0u8; header.len as usize];
        if let Err(e) = self.link.recv(&mut message) {
            return self.io("receiving the sender's error message", e);
        }
        if let Err(e) = self.verify(header, &message) {
            return e;
        }
        Error::PeerFailed {
            peer: "sender",
            message: String::from_utf8_lossy(&message).into_owned(),
        }
    }
}

/// The round stamp of `page` (which `check_page` has bounds-checked).
fn stamp_of(stamps: &[AtomicU32], page: u64) -> Option<&AtomicU32> {
    usize::try_from(page).ok().and_then(|i| stamps.get(i))
}
