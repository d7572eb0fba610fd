//! `ramjet recv --qmp`: the destination's monitor, as QEMU started with `-incoming defer`:
//! guest RAM is ready, and `migrate-incoming` starts listening. One incoming migration per
//! process, as in QEMU; `--out` is written before `completed` shows. A failed migration ends
//! the process (exit status 1) unless `migrate-incoming` said `"exit-on-error": false`, as
//! QEMU 9.1 and later do.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;

use anyhow::bail;
use ramjet_control::{Options, Side, Status, Trigger};
use ramjet_dataplane::memory::GuestMemory;
use ramjet_dataplane::transport::{Endpoint, Listener};
use ramjet_dataplane::{CancelHandle, Operator, ReceiveOptions};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::protocol::{Outcome, QmpError, arguments};
use super::server::{Address, Broadcast, Commands, Server, no_arguments};
use super::settings::{self, Settings};
use super::{not_in_state, query, status_info, step};
use crate::cli::tls_server;
use crate::events::Events;
use crate::recv;
use crate::signals;

/// Serves QMP on `address` for the guest memory `args` describe, until `quit` (or a failed
/// migration, with `exit-on-error`).
pub fn run(args: &recv::Args, address: &Address) -> anyhow::Result<ExitCode> {
    if args.tls_creds.is_some() || !args.tls_authz.is_empty() {
        bail!(
            "with --qmp, TLS is set up as for QEMU: object-add a tls-creds-x509 (and an \
             authz-simple) and name them in migrate-set-parameters' tls-creds (and tls-authz)"
        );
    }
    if args.operator_stdin {
        bail!("with --qmp, the operator's word is migrate-continue or migrate_cancel");
    }
    if args.query {
        bail!("with --qmp, ask query-migrate");
    }
    // The flags' options, less what the monitor's settings decide.
    let base = ReceiveOptions::try_from(args)?;
    let memory = recv::guest_memory(args.memory, args.same_host)?;
    let server = Server::bind(address)?;
    let broadcast = server.broadcast();
    let events = Events::new(Side::Destination, Options::new(), args.events, false)
        .with_qmp(broadcast.clone());
    let settings = Settings::destination();
    let destination = Destination(Arc::new(Shared {
        memory,
        events,
        broadcast: broadcast.clone(),
        base,
        out: args.out.clone(),
        exit: AtomicU8::new(0),
        state: Mutex::new(State {
            settings,
            incoming: None,
        }),
    }));
    let served = server.serve(Arc::new(destination.clone()))?;
    eprintln!("ramjet: QMP on {}, waiting for commands", served.address);
    if let Some(listen) = &args.listen {
        // As QEMU's -incoming URI: listening at once, the monitor beside it.
        destination
            .incoming(listen, true)
            .map_err(|e| anyhow::anyhow!("{}", e.desc))?;
    }
    let quit = broadcast.clone();
    let me = destination.clone();
    signals::cancel_on_interrupt(CancelHandle::new(), move || {
        me.0.interrupt();
        quit.quit();
    })?;
    served.wait_quit();
    Ok(ExitCode::from(destination.0.exit.load(Ordering::SeqCst)))
}

/// The destination's monitor; clones share it.
#[derive(Clone)]
struct Destination(Arc<Shared>);

struct Shared {
    memory: Arc<GuestMemory>,
    events: Events,
    broadcast: Broadcast,
    base: ReceiveOptions,
    out: Option<PathBuf>,
    /// The process's exit status once it quits.
    exit: AtomicU8,
    state: Mutex<State>,
}

struct State {
    settings: Settings,
    /// The incoming migration, once started (there is one per process).
    incoming: Option<Incoming>,
}

struct Incoming {
    endpoint: Endpoint,
    cancel: CancelHandle,
    operator: Operator,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct IncomingArgs {
    uri: String,
    #[serde(default = "yes")]
    exit_on_error: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecoverArgs {
    uri: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContinueArgs {
    state: String,
}

const NAMES: [&str; 11] = [
    "migrate-incoming",
    "migrate_cancel",
    "migrate-continue",
    "migrate-recover",
    "migrate-pause",
    "migrate-start-postcopy",
    "migrate",
    "query-migrate",
    "query-status",
    "stop",
    "cont",
];

impl Commands for Destination {
    fn names(&self) -> Vec<&'static str> {
        NAMES.into_iter().chain(settings::COMMANDS).collect()
    }

    fn execute(&self, name: &str, args: Map<String, Value>) -> Option<Outcome> {
        let s = &self.0;
        Some(match name {
            "migrate-incoming" => arguments(args).and_then(|a: IncomingArgs| {
                let endpoint = a.uri.parse().map_err(QmpError::generic)?;
                self.incoming(&endpoint, a.exit_on_error)
            }),
            "migrate_cancel" => no_arguments(&args).and_then(|()| s.cancel()),
            "migrate-continue" => arguments(args).and_then(|a| s.proceed(&a)),
            "migrate-recover" => arguments(args).and_then(|a| s.recover(&a)),
            "migrate-pause" => Err(QmpError::generic(
                "ramjet pauses a postcopy from the source: migrate-pause there (the \
                 destination then waits for the source to reconnect)",
            )),
            "migrate-start-postcopy" => Err(QmpError::generic(
                "migrate-start-postcopy is for the source",
            )),
            "migrate" => Err(QmpError::generic(
                "this is a destination (ramjet recv): it takes migrate-incoming; ramjet send \
                 takes migrate",
            )),
            "query-migrate" => no_arguments(&args).map(|()| query(&s.events)),
            "query-status" => no_arguments(&args).map(|()| s.status()),
            // Nothing runs here before the guest arrives, nor after (it is memory only).
            "stop" => no_arguments(&args).map(|()| json!({})),
            "cont" => no_arguments(&args).and_then(|()| {
                Err(QmpError::generic(
                    "ramjet recv receives guest memory and runs no vCPU: the guest's RAM is \
                     in --out once the migration completed",
                ))
            }),
            _ => {
                let mut state = s.lock();
                let running = state.incoming.is_some();
                return state
                    .settings
                    .execute_publishing(name, args, running, &s.broadcast);
            }
        })
    }
}

impl Destination {
    /// `migrate-incoming`: listens on `endpoint` and receives there, on a thread of its own.
    fn incoming(&self, endpoint: &Endpoint, exit_on_error: bool) -> Outcome {
        let s = &self.0;
        let mut state = s.lock();
        if state.incoming.is_some() {
            return Err(QmpError::generic(
                "The incoming migration has already been started",
            ));
        }
        let options = s.options(&state.settings)?;
        let listener = Listener::bind(endpoint)
            .map_err(|e| QmpError::generic(format!("cannot listen on {endpoint}: {e}")))?;
        let control = Options::new().postcopy_ram(state.settings.capabilities.postcopy_ram);
        s.events
            .with(|m| m.set_options(control))
            .and_then(|()| s.events.try_step(Trigger::Migrate))
            .map_err(|e| QmpError::generic(e.to_string()))?;
        state.incoming = Some(Incoming {
            endpoint: listener.endpoint().clone(),
            cancel: options.cancel.clone(),
            operator: options.operator.clone(),
        });
        drop(state);
        eprintln!("ramjet: listening on {}", listener.endpoint());
        let me = self.clone();
        thread::Builder::new()
            .name("ramjet-incoming".into())
            .spawn(move || {
                let s = &me.0;
                let landed =
                    recv::land(&listener, &s.memory, &options, &s.events, s.out.as_deref());
                let failed = landed.result.is_err() || landed.written.is_err();
                let code = recv::report(landed, s.out.as_deref());
                if failed && exit_on_error {
                    // As QEMU: a destination whose incoming migration failed exits.
                    s.exit.store(1, Ordering::SeqCst);
                    s.broadcast.quit();
                } else if code != ExitCode::SUCCESS {
                    eprintln!("ramjet: still serving QMP (exit-on-error is off)");
                }
            })
            .map_err(|e| QmpError::generic(format!("cannot start the receiving thread: {e}")))?;
        Ok(json!({}))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The receive options for these settings.
    fn options(&self, settings: &Settings) -> Result<ReceiveOptions, QmpError> {
        let tls = match settings.tls_dir()? {
            None => None,
            Some(dir) => tls_server(Some(&dir), &settings.tls_subjects()?)
                .map_err(|e| QmpError::generic(format!("{e:#}")))?,
        };
        Ok(ReceiveOptions {
            cancel: CancelHandle::new(),
            operator: Operator::new(),
            tls,
            postcopy: settings.capabilities.postcopy_ram.then(recv::postcopy_run),
            // Paused, a postcopy waits for the source for as long as it takes, as QEMU's.
            recover_wait: None,
            ..self.base.clone()
        })
    }

    fn status_now(&self) -> Status {
        self.events.with(|m| m.status())
    }

    /// `migrate_cancel`: stops the incoming migration; in doubt, the operator's word that
    /// the source kept the guest, so the copy is discarded.
    fn cancel(&self) -> Outcome {
        let Some((cancel, operator)) = self
            .lock()
            .incoming
            .as_ref()
            .map(|i| (i.cancel.clone(), i.operator.clone()))
        else {
            return Ok(json!({}));
        };
        if operator.is_in_doubt() {
            step(&self.events, Trigger::Cancel)?;
            if !operator.discard() {
                return Err(QmpError::generic(
                    "the doubt ended before the cancel took effect",
                ));
            }
            return Ok(json!({}));
        }
        step(&self.events, Trigger::Cancel)?;
        cancel.cancel();
        Ok(json!({}))
    }

    /// Ctrl-C: stops a migration under way, but in doubt only stops the wait (the copy is
    /// kept), as `ramjet recv` without QMP.
    fn interrupt(&self) {
        let incoming = self
            .lock()
            .incoming
            .as_ref()
            .map(|i| (i.cancel.clone(), i.operator.clone()));
        if let Some((cancel, operator)) = incoming {
            if !operator.is_in_doubt() {
                self.events.step(Trigger::Cancel);
            }
            cancel.cancel();
        }
    }

    /// `migrate-continue` in doubt: the operator's word that the source handed over.
    fn proceed(&self, args: &ContinueArgs) -> Outcome {
        let status = self.status_now();
        let operator = self.lock().incoming.as_ref().map(|i| i.operator.clone());
        let Some(operator) = operator.filter(|o| o.is_in_doubt()) else {
            return Err(not_in_state(status));
        };
        if args.state != Status::PreSwitchover.as_str() {
            return Err(not_in_state(status));
        }
        step(&self.events, Trigger::Continue)?;
        if !operator.run_here() {
            return Err(QmpError::generic(
                "the doubt ended before the continue took effect",
            ));
        }
        Ok(json!({}))
    }

    /// `migrate-recover`: a paused postcopy waits for the source where it listens; another
    /// address is not supported.
    fn recover(&self, args: &RecoverArgs) -> Outcome {
        let status = self.status_now();
        if !matches!(status, Status::PostcopyPaused) {
            return Err(QmpError::generic(format!(
                "Migrate recover can only be run when postcopy is paused (the status is \
                 {status})"
            )));
        }
        let endpoint: Endpoint = args.uri.parse().map_err(QmpError::generic)?;
        let listening = self.lock().incoming.as_ref().map(|i| i.endpoint.clone());
        match listening {
            Some(listening) if listening == endpoint => Ok(json!({})),
            Some(listening) => Err(QmpError::generic(format!(
                "ramjet's destination waits for the source to reconnect where it listens, \
                 {listening}; recovering on another address is not supported"
            ))),
            None => Err(not_in_state(status)),
        }
    }

    fn status(&self) -> Value {
        status_info(match self.status_now() {
            Status::Completed => "paused",
            _ => "inmigrate",
        })
    }
}
