//! `ramjet send --qmp`: the source's monitor. The guest (the mapped image, with a vCPU when
//! `--live-dirty-rate` is given) waits for `migrate`; each migration runs on a thread of its
//! own while the monitor keeps answering, and a failed or cancelled one leaves the guest here,
//! to be migrated again. Once the guest was handed over it never runs here again: `cont` and
//! another `migrate` are refused.

use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::bail;
use ramjet_control::{Fact, Options, Side, Status, Trigger};
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::transport::{Uring, ZeroCopy};
use ramjet_dataplane::{
    CancelHandle, Compression, Counters, Guest, LiveHandle, LiveOptions, SendOptions,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::protocol::{Outcome, QmpError, arguments};
use super::server::{Address, Broadcast, Commands, Server, no_arguments};
use super::settings::{self, Capabilities, Parameters, Settings};
use super::{is_running, not_in_state, query, status_info, step};
use crate::cli::{Target, TransportKind, parse_target, tls_client};
use crate::events::Events;
use crate::send::{self, Config, Job, Vcpu};
use crate::signals;
use crate::units::Rate;

/// Serves QMP on `address` for the guest `args` describe, until `quit`.
pub fn run(args: &send::Args, address: &Address) -> anyhow::Result<ExitCode> {
    if args.tls_creds.is_some() || args.tls_hostname.is_some() {
        bail!(
            "with --qmp, TLS is set up as for QEMU: object-add a tls-creds-x509 and name it in \
             migrate-set-parameters' tls-creds"
        );
    }
    if args.query {
        bail!("with --qmp, ask query-migrate");
    }
    let (send, live) = <(SendOptions, LiveOptions)>::try_from(&args.migration)?;
    let memory = send::load(&args.image, args.share)?;
    let server = Server::bind(address)?;
    let broadcast = server.broadcast();
    let events = Events::new(Side::Source, Options::new(), args.migration.events, false)
        .with_qmp(broadcast.clone());
    let settings = Settings::new(
        Capabilities {
            events: false,
            pause_before_switchover: args.pause_before_switchover,
            multifd: true,
            postcopy_ram: args.migration.postcopy.is_some(),
            zero_copy_send: false,
        },
        Parameters {
            multifd_channels: args.migration.channels,
            max_bandwidth: args.migration.max_bandwidth.map_or(0, |Rate(r)| r),
            downtime_limit: u64::try_from(args.migration.downtime_limit.as_millis())
                .unwrap_or(u64::MAX),
            multifd_compression: args.migration.compress,
            tls_creds: String::new(),
            tls_hostname: String::new(),
            tls_authz: String::new(),
        },
        false,
    );
    let vcpu = args.live_dirty_rate.map(|rate| Vcpu::start(&memory, rate));
    let source = Source(Arc::new(Shared {
        memory,
        events,
        broadcast: broadcast.clone(),
        send,
        live,
        transport: args.migration.transport,
        state: Mutex::new(State {
            settings,
            has_vcpu: vcpu.is_some(),
            vcpu,
            stopped: false,
            handed_over: false,
            migration: None,
        }),
    }));
    let served = server.serve(Arc::new(source.clone()))?;
    eprintln!("ramjet: QMP on {}, waiting for commands", served.address);
    let quit = broadcast.clone();
    signals::cancel_on_interrupt(CancelHandle::new(), move || quit.quit())?;
    served.wait_quit();
    // As QEMU on quit: a migration still running stops with the process (after the handover
    // the guest never runs here again either way).
    source.0.cancel_running();
    Ok(ExitCode::SUCCESS)
}

/// The source's monitor; clones share it.
#[derive(Clone)]
struct Source(Arc<Shared>);

struct Shared {
    memory: Arc<GuestMemory>,
    events: Events,
    broadcast: Broadcast,
    /// The flags' options, which the settings then change.
    send: SendOptions,
    live: LiveOptions,
    transport: Option<TransportKind>,
    state: Mutex<State>,
}

struct State {
    settings: Settings,
    /// The vCPU, when it is here (not lent to a live migration).
    vcpu: Option<Vcpu>,
    /// Whether the guest has a vCPU at all (an image alone does not run).
    has_vcpu: bool,
    /// `stop` paused the vCPU.
    stopped: bool,
    /// A migration handed the guest over: it must never run here again.
    handed_over: bool,
    /// The migration under way.
    migration: Option<Migration>,
}

struct Migration {
    cancel: CancelHandle,
    /// The session's handle and counters, once connected.
    session: Option<(LiveHandle, Arc<Counters>)>,
    started: Instant,
    /// `migrate-start-postcopy` came before the session was connected.
    start_postcopy: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateArgs {
    uri: String,
    /// Deprecated in QEMU and always true: the command returns at once.
    #[serde(default)]
    #[allow(dead_code)]
    detach: Option<bool>,
    #[serde(default)]
    resume: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContinueArgs {
    state: String,
}

const NAMES: [&str; 11] = [
    "migrate",
    "migrate_cancel",
    "migrate-continue",
    "migrate-start-postcopy",
    "migrate-pause",
    "migrate-recover",
    "migrate-incoming",
    "query-migrate",
    "query-status",
    "stop",
    "cont",
];

impl Commands for Source {
    fn names(&self) -> Vec<&'static str> {
        NAMES.into_iter().chain(settings::COMMANDS).collect()
    }

    fn execute(&self, name: &str, args: Map<String, Value>) -> Option<Outcome> {
        let s = &self.0;
        Some(match name {
            "migrate" => arguments(args).and_then(|a| self.migrate(&a)),
            "migrate_cancel" => no_arguments(&args).and_then(|()| s.cancel()),
            "migrate-continue" => arguments(args).and_then(|a| s.proceed(&a)),
            "migrate-start-postcopy" => no_arguments(&args).and_then(|()| s.start_postcopy()),
            "migrate-pause" => no_arguments(&args).and_then(|()| s.pause()),
            "migrate-recover" => Err(QmpError::generic(
                "migrate-recover is for the destination; the source resumes a paused \
                 postcopy with migrate and \"resume\": true",
            )),
            "migrate-incoming" => Err(QmpError::generic(
                "this is a source (ramjet send): it migrates with migrate; ramjet recv takes \
                 migrate-incoming",
            )),
            "query-migrate" => no_arguments(&args).map(|()| s.query()),
            "query-status" => no_arguments(&args).map(|()| s.status()),
            "stop" => no_arguments(&args).and_then(|()| s.stop()),
            "cont" => no_arguments(&args).and_then(|()| s.cont()),
            _ => {
                let mut state = s.lock();
                let running = state.migration.is_some();
                return state
                    .settings
                    .execute_publishing(name, args, running, &s.broadcast);
            }
        })
    }
}

impl Source {
    fn migrate(&self, args: &MigrateArgs) -> Outcome {
        let s = &self.0;
        let target = parse_target(&args.uri).map_err(QmpError::generic)?;
        if args.resume {
            return s.resume(target);
        }
        let mut state = s.lock();
        if state.migration.is_some() {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        if state.handed_over {
            return Err(QmpError::generic(
                "the guest was handed over to a destination: it must not run here, nor be \
                 migrated from here again",
            ));
        }
        let config = s.config(&state.settings, &target)?;
        s.events
            .with(|m| m.set_options(config.control))
            .and_then(|()| s.events.try_step(Trigger::Migrate))
            .map_err(|e| QmpError::generic(e.to_string()))?;
        // A running vCPU goes with the migration (paused and resumed by it); a stopped one or
        // an image is migrated as a paused guest.
        let vcpu = if state.stopped {
            None
        } else {
            state.vcpu.take()
        };
        state.migration = Some(Migration {
            cancel: config.send.cancel.clone(),
            session: None,
            started: Instant::now(),
            start_postcopy: false,
        });
        drop(state);
        let me = self.clone();
        let spawned = thread::Builder::new()
            .name("ramjet-migrate".into())
            .spawn(move || me.run_migration(&config, &target, vcpu));
        if let Err(e) = spawned {
            s.lock().migration = None;
            s.events.step(Fact::Failed(format!(
                "cannot start the migration thread: {e}"
            )));
            s.events.step(Fact::Drained);
            return Err(QmpError::generic(format!(
                "cannot start the migration thread: {e}"
            )));
        }
        Ok(json!({}))
    }

    /// The migration thread: migrates, then takes the vCPU back and says how it ended.
    fn run_migration(&self, config: &Config, target: &Target, mut vcpu: Option<Vcpu>) {
        let s = &self.0;
        let started = Instant::now();
        // The data plane's `drained` (which shows the final status) waits until this thread
        // has taken the vCPU back: once management sees the end, the next command finds the
        // guest where the end says it is.
        let (sink, drain) = Events::holding_drained(s.events.sink());
        let outcome = send::migrate(Job {
            memory: &s.memory,
            to: &target.endpoint,
            config,
            events: &s.events,
            sink,
            vcpu: vcpu.as_mut(),
            interactive: false,
            postcopy_at_once: false,
            connected: &|handle, counters| s.connected(handle, counters),
        });
        let handed_over = outcome.is_ok();
        send::report(outcome, &s.memory, started);
        let mut state = s.lock();
        if let Some(vcpu) = vcpu {
            state.vcpu = Some(vcpu);
        }
        state.handed_over |= handed_over;
        state.migration = None;
        drop(state);
        drain.release(&s.events);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The options of a migration to `target` with these settings.
    fn config(&self, settings: &Settings, target: &Target) -> Result<Config, QmpError> {
        let caps = settings.capabilities;
        let p = &settings.parameters;
        let generic = |e: anyhow::Error| QmpError::generic(format!("{e:#}"));
        let tls = match settings.tls_dir()? {
            None => None,
            Some(dir) => {
                let hostname = (!p.tls_hostname.is_empty()).then_some(p.tls_hostname.as_str());
                tls_client(Some(&dir), hostname, Some(target)).map_err(generic)?
            }
        };
        let mut transport = Arc::clone(&self.send.transport);
        if caps.zero_copy_send {
            if !caps.multifd {
                return Err(QmpError::generic(
                    "Zero copy only available with multifd enabled",
                ));
            }
            if p.multifd_compression != Compression::Off || tls.is_some() {
                return Err(QmpError::generic(
                    "Zero copy only available for non-compressed non-TLS multifd migration",
                ));
            }
            if self.transport == Some(TransportKind::Blocking) {
                return Err(QmpError::generic(
                    "zero-copy-send needs the io_uring transport (not --transport blocking)",
                ));
            }
            Uring::probe().map_err(|e| generic(e.into()))?;
            transport = Arc::new(Uring {
                zero_copy: ZeroCopy::On,
            });
        }
        let send = SendOptions {
            channels: if caps.multifd { p.multifd_channels } else { 1 },
            compression: p.multifd_compression,
            transport,
            cancel: CancelHandle::new(),
            max_bandwidth: (p.max_bandwidth > 0).then_some(p.max_bandwidth),
            tls,
            postcopy: caps.postcopy_ram,
            // Paused, a postcopy waits for management's `migrate` with `resume`, as QEMU's.
            recover_wait: None,
            ..self.send.clone()
        };
        let live = LiveOptions {
            downtime_limit: Duration::from_millis(p.downtime_limit),
            pause_before_switchover: caps.pause_before_switchover,
            postcopy_after_first_round: false,
            ..self.live.clone()
        };
        let control = Options::new()
            .pause_before_switchover(caps.pause_before_switchover)
            .postcopy_ram(caps.postcopy_ram);
        Ok(Config {
            send,
            live,
            control,
        })
    }

    /// The session is connected: `migrate-start-postcopy` may reach it now.
    fn connected(&self, handle: &LiveHandle, counters: &Arc<Counters>) {
        let mut state = self.lock();
        if let Some(migration) = state.migration.as_mut() {
            if migration.start_postcopy {
                handle.start_postcopy();
            }
            migration.session = Some((handle.clone(), Arc::clone(counters)));
        }
    }

    /// The handle of the migration under way, if it is connected.
    fn session(&self) -> Option<LiveHandle> {
        let state = self.lock();
        state
            .migration
            .as_ref()
            .and_then(|m| m.session.as_ref())
            .map(|(handle, _)| handle.clone())
    }

    fn status_now(&self) -> Status {
        self.events.with(|m| m.status())
    }

    fn cancel(&self) -> Outcome {
        let cancel = self.lock().migration.as_ref().map(|m| m.cancel.clone());
        // Refused in postcopy (the guest runs on the destination: pause and recover are the
        // way out); accepted, and nothing, when no migration runs.
        step(&self.events, Trigger::Cancel)?;
        if let Some(cancel) = cancel {
            cancel.cancel();
        }
        Ok(json!({}))
    }

    fn cancel_running(&self) {
        if self.lock().migration.is_some() && !self.status_now().is_postcopy() {
            let _ = self.cancel();
        }
    }

    fn proceed(&self, args: &ContinueArgs) -> Outcome {
        let status = self.status_now();
        if status != Status::PreSwitchover || args.state != status.as_str() {
            return Err(not_in_state(status));
        }
        let handle = self.session().ok_or_else(|| not_in_state(status))?;
        step(&self.events, Trigger::Continue)?;
        handle.proceed();
        Ok(json!({}))
    }

    fn start_postcopy(&self) -> Outcome {
        if !self.lock().settings.capabilities.postcopy_ram {
            return Err(QmpError::generic(
                "Enable postcopy with migrate_set_capability before the start of migration",
            ));
        }
        let status = self.status_now();
        if !is_running(status) || self.lock().migration.is_none() {
            return Err(QmpError::generic(
                "Postcopy must be started after migration has been started",
            ));
        }
        step(&self.events, Trigger::StartPostcopy)?;
        let mut state = self.lock();
        if let Some(migration) = state.migration.as_mut() {
            match &migration.session {
                Some((handle, _)) => handle.start_postcopy(),
                None => migration.start_postcopy = true,
            }
        }
        Ok(json!({}))
    }

    fn pause(&self) -> Outcome {
        let status = self.status_now();
        if !matches!(status, Status::PostcopyActive | Status::PostcopyRecover) {
            return Err(QmpError::generic(format!(
                "migrate-pause is only supported in postcopy-active or postcopy-recover \
                 state, not {status}"
            )));
        }
        let handle = self.session().ok_or_else(|| not_in_state(status))?;
        step(&self.events, Trigger::Pause)?;
        handle.pause();
        Ok(json!({}))
    }

    /// `migrate` with `resume`: a paused postcopy reconnects to `target`.
    fn resume(&self, target: Target) -> Outcome {
        let status = self.status_now();
        if status != Status::PostcopyPaused {
            return Err(QmpError::generic(format!(
                "Cannot resume if there is no paused migration (the status is {status})"
            )));
        }
        let handle = self.session().ok_or_else(|| not_in_state(status))?;
        step(&self.events, Trigger::Recover)?;
        handle.recover(Some(target.endpoint));
        Ok(json!({}))
    }

    fn query(&self) -> Value {
        // The live loop publishes its figures through the progress sampler; a paused guest's
        // migration is read from its counters here.
        let running = {
            let state = self.lock();
            state.migration.as_ref().and_then(|m| {
                m.session
                    .as_ref()
                    .map(|(h, c)| (h.clone(), Arc::clone(c), m.started))
            })
        };
        if let Some((handle, counters, started)) = running {
            let stats = handle.ram_stats().unwrap_or_else(|| {
                counters
                    .snapshot()
                    .ram_stats(self.memory.total_bytes(), started.elapsed())
            });
            self.events.with(|m| m.set_ram_stats(stats));
        }
        query(&self.events)
    }

    fn status(&self) -> Value {
        let state = self.lock();
        let status = self.status_now();
        status_info(if state.handed_over || status.is_postcopy() {
            "postmigrate"
        } else if state
            .migration
            .as_ref()
            .and_then(|m| m.session.as_ref())
            .is_some_and(|(h, _)| h.progress().paused)
        {
            "finish-migrate"
        } else if state.has_vcpu && !state.stopped {
            "running"
        } else {
            "paused"
        })
    }

    fn stop(&self) -> Outcome {
        let mut state = self.lock();
        if state.migration.is_some() {
            return Err(QmpError::generic(
                "a migration is under way: it pauses the guest itself at switchover",
            ));
        }
        if !state.stopped
            && let Some(vcpu) = state.vcpu.as_mut()
        {
            vcpu.guest
                .pause()
                .map_err(|e| QmpError::generic(format!("cannot pause the guest: {e}")))?;
            state.stopped = true;
            self.broadcast.event("STOP", &json!({}));
        }
        Ok(json!({}))
    }

    fn cont(&self) -> Outcome {
        let mut state = self.lock();
        if state.handed_over {
            return Err(QmpError::generic(
                "the guest was handed over to a destination: it must not run here again",
            ));
        }
        if state.migration.is_some() {
            return Err(QmpError::generic(
                "a migration is under way: it resumes the guest itself if it fails",
            ));
        }
        if !state.has_vcpu {
            return Err(QmpError::generic(
                "this guest is an image with no vCPU to run (ramjet send --live-dirty-rate \
                 gives it one)",
            ));
        }
        if state.stopped
            && let Some(vcpu) = state.vcpu.as_mut()
        {
            vcpu.guest.resume();
            state.stopped = false;
            self.broadcast.event("RESUME", &json!({}));
        }
        Ok(json!({}))
    }
}
