//! One whole migration of a paused guest, as the end-to-end benches measure it.

use std::sync::Arc;
use std::thread;

use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::transport::{Listener, Transport};
use ramjet_dataplane::{
    Compression, PreSwitchover, ReceiveOptions, Received, SendOptions, Sender, Summary, receive,
};

/// Migrates the image `src` into `dst` over `endpoint` (`tcp:127.0.0.1:0`, `unix:/path`) with
/// `channels` channels on `transport`, as of a paused guest: switchover, every page (sent in
/// place from the frozen memory), device state, confirmation. Checks that every page went and
/// that the receiver may run the guest.
///
/// # Panics
///
/// On any failure: a bench has nothing better to do.
pub fn migrate(
    src: &Arc<GuestMemory>,
    dst: &Arc<GuestMemory>,
    transport: &Arc<dyn Transport>,
    channels: u16,
    endpoint: &str,
) {
    let send = SendOptions {
        channels,
        compression: Compression::Auto,
        transport: Arc::clone(transport),
        ..SendOptions::default()
    };
    let receive = ReceiveOptions {
        transport: Arc::clone(transport),
        ..ReceiveOptions::default()
    };
    migrate_with(src, dst, endpoint, &send, receive);
}

/// [`migrate`] with the options of both ends given whole; returns what both ends reported.
///
/// # Panics
///
/// On any failure, or if a page did not go or the receiver may not run the guest.
pub fn migrate_with(
    src: &Arc<GuestMemory>,
    dst: &Arc<GuestMemory>,
    endpoint: &str,
    send: &SendOptions,
    receive_options: ReceiveOptions,
) -> (Summary, Received) {
    let listener = Listener::bind(&endpoint.parse().expect("endpoint")).expect("bind");
    let at = listener.endpoint().clone();
    let dst = Arc::clone(dst);
    // The listener goes with the receiver, which removes a Unix socket's path when it ends.
    let receiver = thread::spawn(move || {
        receive(&listener, dst, &receive_options, Arc::new(|_| {})).expect("receive")
    });
    let sender = Sender::connect(Arc::clone(src), &at, send, Arc::new(|_| {})).expect("connect");
    let summary = sender
        .migrate_paused(&[0u8; 4096], PreSwitchover::Skip)
        .expect("migrate");
    let received = receiver.join().expect("receiver thread");
    assert!(received.handover.may_run(), "{:?}", received.handover);
    assert_eq!(summary.stats.pages(), src.total_pages(), "every page sent");
    (summary, received)
}
