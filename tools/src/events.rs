//! A control machine per side, fed with the data plane's facts and the user's triggers, printing
//! every event it emits: as text, or as QMP-shaped JSON lines.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use ramjet_control::{Input, Machine, Options, Profile, Query, Side, Timestamp};
use ramjet_dataplane::{Fact, FactSink};

use crate::qmp::Broadcast;

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
    /// The QMP monitor that also gets every event.
    qmp: Option<Broadcast>,
}

impl Events {
    pub fn new(side: Side, options: Options, format: Format, label: bool) -> Self {
        Events {
            machine: Arc::new(Mutex::new(Machine::new(side, Profile::Qemu10, options))),
            side,
            format,
            label,
            qmp: None,
        }
    }

    /// Also sends every event to a QMP monitor's client (with the `events` capability on).
    pub fn with_qmp(mut self, broadcast: Broadcast) -> Self {
        self.qmp = Some(broadcast);
        self
    }

    /// Steps the machine and prints what it emits; a refused input is reported on stderr (it
    /// would be a bug in ramjet, and the migration goes on).
    pub fn step(&self, input: impl Into<Input>) {
        if let Err(e) = self.try_step(input) {
            crate::console::err(&format!(
                "ramjet: the {:?} status machine refused an input: {e}",
                self.side
            ));
        }
    }

    /// Steps the machine and prints what it emits, or says why it refused the input (a user's
    /// command that makes no sense now, say).
    pub fn try_step(&self, input: impl Into<Input>) -> Result<(), ramjet_control::StepError> {
        let now = Timestamp::from(SystemTime::now());
        let mut machine = self.machine.lock().unwrap_or_else(PoisonError::into_inner);
        match machine.step(input, now) {
            Ok(Some(event)) => {
                if let Some(qmp) = &self.qmp {
                    qmp.migration_event(&event);
                }
                let line = match self.format {
                    Format::Json => serde_json::to_string(&event).unwrap_or_default(),
                    Format::Text if self.label => {
                        format!("{:<11} {event}", format!("{:?}", self.side).to_lowercase())
                    }
                    Format::Text => event.to_string(),
                };
                crate::console::out(&line);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
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

    /// A fact sink that passes every fact to `inner` but `drained`, which it keeps until
    /// [`Drain::release`]: the final status (which `drained` shows) then waits for the
    /// caller's own clean-up (writing `--out`, taking the vCPU back), so that whoever reacts
    /// to it finds that done.
    pub fn holding_drained(inner: Arc<dyn FactSink>) -> (Arc<dyn FactSink>, Drain) {
        let held = Arc::new(AtomicBool::new(false));
        let drain = Drain(Arc::clone(&held));
        let sink = move |fact: Fact| {
            if fact == Fact::Drained {
                held.store(true, Ordering::SeqCst);
            } else {
                inner.fact(fact);
            }
        };
        (Arc::new(sink), drain)
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

/// A `drained` held back by [`Events::holding_drained`].
pub struct Drain(Arc<AtomicBool>);

impl Drain {
    /// Steps `events` with the `drained` the data plane reported, if it did.
    pub fn release(self, events: &Events) {
        if self.0.load(Ordering::SeqCst) {
            events.step(Fact::Drained);
        }
    }
}
