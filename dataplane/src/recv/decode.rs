//! The decode workers: they expand the compressed (lz4 and zstd) pages of a channel's frames
//! into guest memory while the channel's reader goes on reading.

use crossbeam_channel::{self as channels, Receiver};

use super::shared::Shared;
use crate::codec::Decoder;
use crate::error::Error;
use crate::wire::Encoding;

/// A buffer of compressed page data and the pages in it: (page, start, length, encoding).
#[derive(Debug, Default)]
pub(super) struct LzBuf {
    pub(super) data: Vec<u8>,
    pub(super) pages: Vec<(u64, usize, usize, Encoding)>,
}

/// Pages of one frame for a decode worker.
pub(super) struct DecodeJob {
    pub(super) channel: u16,
    pub(super) region: usize,
    pub(super) buf: LzBuf,
    pub(super) done: channels::Sender<Result<(), Error>>,
}

/// Expands compressed pages into guest memory until the job queue closes.
pub(super) fn run(shared: &Shared, jobs: &Receiver<DecodeJob>) {
    let mut decoder = Decoder::new();
    while let Ok(job) = jobs.recv() {
        let mut result = Ok(());
        if !shared.stop.is_stopped() {
            for &(page, start, len, encoding) in &job.buf.pages {
                // SAFETY: the channel reader handed this page to this job alone (see the module
                // docs) and waits for the job before it touches the page again.
                let dst = match unsafe { shared.lease.page_mut(job.region, page) } {
                    Ok(dst) => dst,
                    Err(source) => {
                        result = Err(Error::Memory {
                            channel: job.channel,
                            source,
                        });
                        break;
                    }
                };
                if let Err(problem) =
                    decoder.decode(encoding, &job.buf.data[start..start + len], dst)
                {
                    result = Err(Error::protocol(
                        job.channel,
                        format!("region index {} page {page}: {problem}", job.region),
                    ));
                    break;
                }
            }
        }
        shared.pool.give(job.buf);
        let _ = job.done.send(result);
    }
}
