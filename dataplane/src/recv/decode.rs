//! The decode workers: they expand the lz4 pages of a channel's frames into guest memory while
//! the channel's reader goes on reading.

use crossbeam_channel::{self as channels, Receiver};

use super::shared::Shared;
use crate::codec::decode_lz4;
use crate::error::Error;

/// An lz4 payload buffer and the pages in it: (page, start, length).
#[derive(Debug, Default)]
pub(super) struct LzBuf {
    pub(super) data: Vec<u8>,
    pub(super) pages: Vec<(u64, usize, usize)>,
}

/// Pages of one frame for a decode worker.
pub(super) struct DecodeJob {
    pub(super) channel: u16,
    pub(super) region: usize,
    pub(super) buf: LzBuf,
    pub(super) done: channels::Sender<Result<(), Error>>,
}

/// Expands lz4 pages into guest memory until the job queue closes.
pub(super) fn run(shared: &Shared, jobs: &Receiver<DecodeJob>) {
    while let Ok(job) = jobs.recv() {
        let mut result = Ok(());
        if !shared.stop.is_stopped() {
            for &(page, start, len) in &job.buf.pages {
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
                if let Err(problem) = decode_lz4(&job.buf.data[start..start + len], dst) {
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
