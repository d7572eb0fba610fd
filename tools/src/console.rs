//! Lines for the user that must stay on screen: the events every side prints go through here,
//! so that progress drawn on the same terminal never covers or clears them.
//!
//! Every progress bar of the process lives in one [`MultiProgress`] ([`bars`]), drawn on stderr
//! when stderr is a terminal and hidden otherwise. A line printed through [`out`] or [`err`]
//! first takes the bars off the screen, is written where it belongs (stdout or stderr, never
//! indicatif's own target, so redirected output still gets every line), and the bars are drawn
//! again below it: the line stays, however the bars change or are cleared later. When stderr is
//! not a terminal the bars are hidden and the lines are written exactly as `println!` would.

use std::io::{self, IsTerminal, Write};
use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressDrawTarget};

/// The process's progress bars: add every bar here (`bars().add(bar)`), so that the lines of
/// [`out`] and [`err`] are printed above them.
pub fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(|| {
        MultiProgress::with_draw_target(if io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        })
    })
}

/// Prints `line` on stdout, above any progress bars.
pub fn out(line: &str) {
    bars().suspend(|| {
        let _ = writeln!(io::stdout().lock(), "{line}");
    });
}

/// Prints `line` on stderr, above any progress bars.
pub fn err(line: &str) {
    bars().suspend(|| {
        let _ = writeln!(io::stderr().lock(), "{line}");
    });
}
