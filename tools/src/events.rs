//! A control machine per side, fed with the data plane's facts and the user's triggers, printing
//! every event it emits: as text, or as QMP-shaped JSON lines.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use ramjet_control::{Input, Machine, Options, Profile, Query, Side, Timestamp};
use ramjet_dataplane::{Fact, FactSink};

/// How events are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `source      MIGRATION active`.
    Text,
    /// One QMP event object per line.
    Json,
}

/// One side's machine; clones share it.
#[derive(Clone)]
pub struct Events {
    machine: Arc<Mutex<Machine>>,
    side: Side,
    format: Format,
    /// Whether to print the side's name (when two sides share one output).
    label: bool,
}

impl Events {
    pub fn new(side: Side, options: Options, format: Format, label: bool) -> Self {
        Events {
            machine: Arc::new(Mutex::new(Machine::new(side, Profile::Qemu10, options))),
            side,
            format,
            label,
        }
    }

    /// Steps the machine and prints what it emits; a refused input is reported on stderr (it
    /// would be a bug in ramjet, and the migration goes on).
    pub fn step(&self, input: impl Into<Input>) {
        let now = Timestamp::from(SystemTime::now());
        let mut machine = self.machine.lock().unwrap_or_else(PoisonError::into_inner);
        match machine.step(input, now) {
            Ok(Some(event)) => {
                let line = match self.format {
                    Format::Json => serde_json::to_string(&event).unwrap_or_default(),
                    Format::Text if self.label => {
                        format!("{:<11} {event}", format!("{:?}", self.side).to_lowercase())
                    }
                    Format::Text => event.to_string(),
                };
                let _ = writeln!(io::stdout().lock(), "{line}");
            }
            Ok(None) => {}
            Err(e) => eprintln!(
                "ramjet: the {:?} status machine refused an input: {e}",
                self.side
            ),
        }
    }

    /// A fact sink that steps this machine.
    pub fn sink(&self) -> Arc<dyn FactSink> {
        let events = self.clone();
        Arc::new(move |fact: Fact| events.step(fact))
    }

    /// A destination's fact sink that, when postcopy pauses, also says `migrate-recover`: the
    /// receiver waits for the source on the address it listens on.
    pub fn recovering_sink(&self) -> Arc<dyn FactSink> {
        let events = self.clone();
        Arc::new(move |fact: Fact| {
            let lost = fact == Fact::ChannelLost;
            events.step(fact);
            if lost {
                events.step(ramjet_control::Trigger::Recover);
            }
        })
    }

    /// `query-migrate` now.
    pub fn query(&self) -> Query {
        self.with(|m| m.query(Timestamp::from(SystemTime::now())))
    }

    /// Runs `f` on the machine (to set its figures, say).
    pub fn with<T>(&self, f: impl FnOnce(&mut Machine) -> T) -> T {
        f(&mut self.machine.lock().unwrap_or_else(PoisonError::into_inner))
    }
}
