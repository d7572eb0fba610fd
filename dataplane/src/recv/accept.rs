//! Accepting a migration's channels: every connection must greet with a hello for this
//! memory's layout, and all of them must belong to one migration.

use crate::error::Error;
use crate::memory::{GuestMemory, RegionLayout};
use crate::session::{self, Stop};
use crate::transport::{Listener, Stream};

use super::options::ReceiveOptions;

/// Accepts every channel of one migration and answers its hello; returns the channels in
/// order and the migration's session id.
pub(super) fn accept_channels(
    listener: &Listener,
    memory: &GuestMemory,
    options: &ReceiveOptions,
    stop: &Stop,
) -> Result<(Vec<Stream>, [u8; 16]), Error> {
    let mut slots: Vec<Option<Stream>> = Vec::new();
    let mut migration = None;
    let mut accepted = 0usize;
    loop {
        let first = migration.is_none();
        let (timeout, op) = if first {
            (options.accept_timeout, "waiting for the sender to connect")
        } else {
            (
                Some(options.timeout),
                "waiting for the other channels to connect",
            )
        };
        let channel = u16::try_from(accepted).unwrap_or(u16::MAX);
        let mut stream = listener
            .accept(timeout, &|| stop.is_stopped())
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::Interrupted => Error::Cancelled,
                std::io::ErrorKind::TimedOut => Error::Timeout {
                    channel,
                    op,
                    timeout: timeout.unwrap_or_default(),
                },
                _ => Error::Listen {
                    endpoint: listener.endpoint().to_string(),
                    source: e,
                },
            })?;
        stop.register(&stream)
            .map_err(|e| Error::io(channel, "duplicating the socket", options.timeout, e))?;
        stream
            .set_read_timeout(Some(options.timeout))
            .and_then(|()| stream.set_write_timeout(Some(options.timeout)))
            .map_err(|e| Error::io(channel, "setting socket timeouts", options.timeout, e))?;
        let hello = session::read_hello(&mut stream, channel, options.timeout)?;
        let channel = hello.channel;
        let problem = match migration {
            _ if hello.regions != memory.layout() => {
                Some(layout_mismatch(&hello.regions, &memory.layout()))
            }
            Some((id, count)) if hello.session != id || hello.channels != count => Some(format!(
                "channel {channel} belongs to another migration (session or channel count differs)"
            )),
            Some(_) if slots[usize::from(channel)].is_some() => {
                Some(format!("channel {channel} is already connected"))
            }
            _ => None,
        };
        if let Some(problem) = problem {
            session::refuse(&mut stream, &problem);
            return Err(Error::Refused {
                channel,
                reason: problem,
            });
        }
        session::accept_hello(&mut stream, channel, options.timeout)?;
        if first {
            migration = Some((hello.session, hello.channels));
            slots.resize_with(usize::from(hello.channels), || None);
        }
        slots[usize::from(channel)] = Some(stream);
        accepted += 1;
        if accepted == slots.len() {
            return Ok((slots.into_iter().flatten().collect(), hello.session));
        }
    }
}

fn layout_mismatch(theirs: &[RegionLayout], ours: &[RegionLayout]) -> String {
    let show = |layout: &[RegionLayout]| {
        layout
            .iter()
            .map(|r| {
                format!(
                    "id {} at {:#x}, {} bytes",
                    r.id(),
                    r.guest_base().0,
                    r.len()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    format!(
        "the memory layouts differ: the sender has [{}], this receiver [{}]",
        show(theirs),
        show(ours)
    )
}
