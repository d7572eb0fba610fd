//! What both monitors keep between migrations, with QEMU's commands for it: migration
//! capabilities (`migrate-set-capabilities`, `query-migrate-capabilities`), parameters
//! (`migrate-set-parameters`, `query-migrate-parameters`), and the objects TLS needs
//! (`object-add` of a `tls-creds-x509` or an `authz-simple`, `object-del`), which the
//! `tls-creds` and `tls-authz` parameters name as libvirt's migration TLS does.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ramjet_dataplane::Compression;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::protocol::{Outcome, QmpError, arguments};

/// The capabilities ramjet has, by QMP name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `events`: `MIGRATION` and `MIGRATION_PASS` events are sent (off, as in QEMU).
    pub events: bool,
    /// `pause-before-switchover`: stop in `pre-switchover` until `migrate-continue`.
    pub pause_before_switchover: bool,
    /// `multifd`: `multifd-channels` sockets instead of one.
    pub multifd: bool,
    /// `postcopy-ram`: `migrate-start-postcopy` may switch to postcopy.
    pub postcopy_ram: bool,
    /// `zero-copy-send`: every send is zero-copy (needs multifd, no compression, no TLS).
    pub zero_copy_send: bool,
}

impl Capabilities {
    const NAMES: [&'static str; 5] = [
        "events",
        "pause-before-switchover",
        "multifd",
        "postcopy-ram",
        "zero-copy-send",
    ];

    fn get_mut(&mut self, name: &str) -> Option<&mut bool> {
        Some(match name {
            "events" => &mut self.events,
            "pause-before-switchover" => &mut self.pause_before_switchover,
            "multifd" => &mut self.multifd,
            "postcopy-ram" => &mut self.postcopy_ram,
            "zero-copy-send" => &mut self.zero_copy_send,
            _ => return None,
        })
    }

    fn list(mut self) -> Value {
        Value::Array(
            Self::NAMES
                .iter()
                .map(|name| {
                    let state = self.get_mut(name).is_some_and(|s| *s);
                    json!({"capability": name, "state": state})
                })
                .collect(),
        )
    }
}

/// QEMU 10's capabilities that ramjet does not have: they may be set off (a no-op), not on.
const QEMU_ONLY: [&str; 17] = [
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "x-colo",
    "release-ram",
    "return-path",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
];

/// The migration parameters ramjet has, by QMP name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameters {
    /// `multifd-channels` (1 to 64), used when `multifd` is on.
    pub multifd_channels: u16,
    /// `max-bandwidth` in bytes a second; 0: no limit.
    pub max_bandwidth: u64,
    /// `downtime-limit` in milliseconds.
    pub downtime_limit: u64,
    /// `multifd-compression`: `none`, `lz4`, `zstd` (QEMU's names) or `auto` (ramjet's).
    pub multifd_compression: Compression,
    /// `tls-creds`: the id of a `tls-creds-x509` object; empty: no TLS.
    pub tls_creds: String,
    /// `tls-hostname`: the name the destination's certificate must be for; empty: the host
    /// of the `migrate` URI.
    pub tls_hostname: String,
    /// `tls-authz`: the id of an `authz-simple` object the source's certificate subject must
    /// match; empty: any certificate the CA signed.
    pub tls_authz: String,
}

/// `migrate-set-parameters`' arguments: each one optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct SetParameters {
    multifd_channels: Option<u16>,
    max_bandwidth: Option<u64>,
    downtime_limit: Option<u64>,
    multifd_compression: Option<String>,
    tls_creds: Option<String>,
    tls_hostname: Option<String>,
    tls_authz: Option<String>,
}

/// QEMU's largest downtime limit, in milliseconds (2000 seconds).
const MAX_DOWNTIME_LIMIT: u64 = 2_000_000;

/// An object made with `object-add`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// `tls-creds-x509`: a directory in QEMU's layout, for one end.
    TlsCreds { dir: PathBuf, server: bool },
    /// `authz-simple`: one certificate subject allowed.
    Authz { identity: String },
}

#[derive(Debug, Deserialize)]
#[serde(tag = "qom-type", rename_all = "kebab-case")]
enum ObjectAdd {
    #[serde(rename = "tls-creds-x509")]
    TlsCredsX509(TlsCredsArgs),
    AuthzSimple(AuthzArgs),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct TlsCredsArgs {
    id: String,
    dir: PathBuf,
    #[serde(default = "client")]
    endpoint: String,
    #[serde(default = "yes")]
    verify_peer: bool,
}

fn client() -> String {
    "client".into()
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthzArgs {
    id: String,
    identity: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectDel {
    id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetCapabilities {
    capabilities: Vec<CapabilityState>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CapabilityState {
    capability: String,
    state: bool,
}

/// Capabilities, parameters and objects.
#[derive(Debug, Clone)]
pub struct Settings {
    pub capabilities: Capabilities,
    pub parameters: Parameters,
    objects: BTreeMap<String, Object>,
    /// Whether this is the destination (its TLS objects are servers).
    destination: bool,
}

/// The names of the commands [`Settings::execute`] knows.
pub const COMMANDS: [&str; 6] = [
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "object-add",
    "object-del",
];

impl Settings {
    /// A destination's: every capability off but `multifd` (which only the source reads),
    /// and the parameters at ramjet's defaults; TLS objects then name its credentials.
    pub fn destination() -> Self {
        Settings::new(
            Capabilities {
                events: false,
                pause_before_switchover: false,
                multifd: true,
                postcopy_ram: false,
                zero_copy_send: false,
            },
            Parameters {
                multifd_channels: 2,
                max_bandwidth: 0,
                downtime_limit: 300,
                multifd_compression: Compression::Auto,
                tls_creds: String::new(),
                tls_hostname: String::new(),
                tls_authz: String::new(),
            },
            true,
        )
    }

    /// Runs one of [`COMMANDS`] and turns the `events` capability's state into whether
    /// `broadcast` sends migration events.
    pub fn execute_publishing(
        &mut self,
        name: &str,
        args: Map<String, Value>,
        running: bool,
        broadcast: &super::Broadcast,
    ) -> Option<Outcome> {
        let outcome = self.execute(name, args, running);
        broadcast.set_migration_events(self.capabilities.events);
        outcome
    }

    pub fn new(capabilities: Capabilities, parameters: Parameters, destination: bool) -> Self {
        Settings {
            capabilities,
            parameters,
            objects: BTreeMap::new(),
            destination,
        }
    }

    /// Runs one of [`COMMANDS`]; `running`: a migration runs (capabilities and parameters
    /// then stay as they are: ramjet reads them when a migration starts).
    pub fn execute(
        &mut self,
        name: &str,
        args: Map<String, Value>,
        running: bool,
    ) -> Option<Outcome> {
        let in_progress = || {
            Err(QmpError::generic(
                "There's a migration process in progress; ramjet reads capabilities and \
                 parameters when a migration starts",
            ))
        };
        Some(match name {
            "query-migrate-capabilities" => {
                super::server::no_arguments(&args).map(|()| self.capabilities.list())
            }
            "query-migrate-parameters" => {
                super::server::no_arguments(&args).map(|()| self.parameters())
            }
            "migrate-set-capabilities" if running => in_progress(),
            "migrate-set-capabilities" => arguments(args).and_then(|a| self.set_capabilities(a)),
            "migrate-set-parameters" if running => in_progress(),
            "migrate-set-parameters" => arguments(args).and_then(|a| self.set_parameters(a)),
            "object-add" => arguments(args).and_then(|a| self.add(a)),
            "object-del" => arguments(args).and_then(|a| self.del(&a)),
            _ => return None,
        })
    }

    fn set_capabilities(&mut self, args: SetCapabilities) -> Outcome {
        let mut next = self.capabilities;
        for CapabilityState { capability, state } in args.capabilities {
            match next.get_mut(&capability) {
                Some(slot) => *slot = state,
                None if QEMU_ONLY.contains(&capability.as_str()) => {
                    if state {
                        return Err(QmpError::generic(format!(
                            "ramjet does not have the capability '{capability}'"
                        )));
                    }
                }
                None => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'capability' does not accept value '{capability}'"
                    )));
                }
            }
        }
        self.capabilities = next;
        Ok(json!({}))
    }

    fn set_parameters(&mut self, args: SetParameters) -> Outcome {
        let mut next = self.parameters.clone();
        if let Some(channels) = args.multifd_channels {
            if !(1..=64).contains(&channels) {
                return Err(QmpError::generic(
                    "Parameter 'multifd-channels' expects a value between 1 and 64",
                ));
            }
            next.multifd_channels = channels;
        }
        if let Some(limit) = args.downtime_limit {
            if limit > MAX_DOWNTIME_LIMIT {
                return Err(QmpError::generic(format!(
                    "Parameter 'downtime-limit' expects an integer in the range of 0 to \
                     {MAX_DOWNTIME_LIMIT} milliseconds"
                )));
            }
            next.downtime_limit = limit;
        }
        if let Some(bandwidth) = args.max_bandwidth {
            next.max_bandwidth = bandwidth;
        }
        if let Some(codec) = args.multifd_compression {
            next.multifd_compression = match codec.as_str() {
                "none" => Compression::Off,
                "lz4" => Compression::Lz4,
                "zstd" => Compression::Zstd,
                "auto" => Compression::Auto,
                other => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'multifd-compression' does not accept value '{other}': \
                         ramjet has none, lz4, zstd and auto"
                    )));
                }
            };
        }
        for (value, slot) in [
            (args.tls_creds, &mut next.tls_creds),
            (args.tls_hostname, &mut next.tls_hostname),
            (args.tls_authz, &mut next.tls_authz),
        ] {
            if let Some(value) = value {
                *slot = value;
            }
        }
        self.parameters = next;
        Ok(json!({}))
    }

    fn parameters(&self) -> Value {
        let p = &self.parameters;
        json!({
            "multifd-channels": p.multifd_channels,
            "max-bandwidth": p.max_bandwidth,
            "downtime-limit": p.downtime_limit,
            "multifd-compression": match p.multifd_compression {
                Compression::Off => "none",
                Compression::Lz4 => "lz4",
                Compression::Zstd => "zstd",
                Compression::Auto => "auto",
            },
            "tls-creds": p.tls_creds,
            "tls-hostname": p.tls_hostname,
            "tls-authz": p.tls_authz,
        })
    }

    fn add(&mut self, add: ObjectAdd) -> Outcome {
        let (id, object) = match add {
            ObjectAdd::TlsCredsX509(a) => {
                let server = match a.endpoint.as_str() {
                    "server" => true,
                    "client" => false,
                    other => {
                        return Err(QmpError::generic(format!(
                            "Parameter 'endpoint' does not accept value '{other}'"
                        )));
                    }
                };
                if !a.verify_peer {
                    return Err(QmpError::generic(
                        "ramjet always verifies the peer's certificate: verify-peer must be true",
                    ));
                }
                // Loaded now, as QEMU loads them when the object is made: a missing or bad
                // file is this command's error.
                let loaded = if server {
                    ramjet_dataplane::TlsServer::from_dir(&a.dir).map(drop)
                } else {
                    ramjet_dataplane::TlsClient::from_dir(&a.dir).map(drop)
                };
                loaded.map_err(|e| {
                    QmpError::generic(format!(
                        "cannot load the credentials in {}: {:#}",
                        a.dir.display(),
                        anyhow::Error::from(e)
                    ))
                })?;
                (a.id, Object::TlsCreds { dir: a.dir, server })
            }
            ObjectAdd::AuthzSimple(a) => (
                a.id,
                Object::Authz {
                    identity: a.identity,
                },
            ),
        };
        if self.objects.contains_key(&id) {
            return Err(QmpError::generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        self.objects.insert(id, object);
        Ok(json!({}))
    }

    fn del(&mut self, del: &ObjectDel) -> Outcome {
        let p = &self.parameters;
        if [&p.tls_creds, &p.tls_authz].contains(&&del.id) {
            return Err(QmpError::generic(format!(
                "object '{}' is in use by the migration parameters",
                del.id
            )));
        }
        match self.objects.remove(&del.id) {
            Some(_) => Ok(json!({})),
            None => Err(QmpError::generic(format!("object '{}' not found", del.id))),
        }
    }

    /// The credentials directory `tls-creds` names, checked to be for this end; `None`
    /// without TLS.
    pub fn tls_dir(&self) -> Result<Option<PathBuf>, QmpError> {
        let id = &self.parameters.tls_creds;
        if id.is_empty() {
            return Ok(None);
        }
        match self.objects.get(id) {
            Some(Object::TlsCreds { dir, server }) if *server == self.destination => {
                Ok(Some(dir.clone()))
            }
            Some(Object::TlsCreds { .. }) => Err(QmpError::generic(format!(
                "the TLS credentials '{id}' are for the {} end",
                if self.destination { "client" } else { "server" }
            ))),
            _ => Err(QmpError::generic(format!(
                "No TLS credentials with id '{id}'"
            ))),
        }
    }

    /// The subjects `tls-authz` allows (empty: any).
    pub fn tls_subjects(&self) -> Result<Vec<String>, QmpError> {
        let id = &self.parameters.tls_authz;
        if id.is_empty() {
            return Ok(Vec::new());
        }
        match self.objects.get(id) {
            Some(Object::Authz { identity }) => Ok(vec![identity.clone()]),
            _ => Err(QmpError::generic(format!(
                "No authorization object with id '{id}'"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            destination: false,
            ..Settings::destination()
        }
    }

    fn run(s: &mut Settings, name: &str, args: Value, running: bool) -> Outcome {
        let Value::Object(args) = args else {
            panic!("arguments are an object")
        };
        s.execute(name, args, running).expect("a settings command")
    }

    #[test]
    fn capabilities_set_and_query() {
        let mut s = settings();
        let caps = json!({"capabilities": [
            {"capability": "events", "state": true},
            {"capability": "xbzrle", "state": false},
        ]});
        assert_eq!(
            run(&mut s, "migrate-set-capabilities", caps, false),
            Ok(json!({}))
        );
        assert!(s.capabilities.events);
        let list = run(&mut s, "query-migrate-capabilities", json!({}), false).unwrap();
        assert_eq!(list[0], json!({"capability": "events", "state": true}));
        assert_eq!(list.as_array().map(Vec::len), Some(5));
        // One it does not have, on: refused, and nothing of the command is applied.
        let caps = json!({"capabilities": [
            {"capability": "events", "state": false},
            {"capability": "auto-converge", "state": true},
        ]});
        let e = run(&mut s, "migrate-set-capabilities", caps, false).unwrap_err();
        assert!(e.desc.contains("'auto-converge'"), "{}", e.desc);
        assert!(s.capabilities.events);
        let caps = json!({"capabilities": [{"capability": "warp", "state": false}]});
        let e = run(&mut s, "migrate-set-capabilities", caps, false).unwrap_err();
        assert!(
            e.desc.contains("does not accept value 'warp'"),
            "{}",
            e.desc
        );
        let caps = json!({"capabilities": [{"capability": "events", "state": "yes"}]});
        let e = run(&mut s, "migrate-set-capabilities", caps, false).unwrap_err();
        assert!(e.desc.contains("state"), "{}", e.desc);
        let caps = json!({"capabilities": [{"capability": "events", "state": false}]});
        let e = run(&mut s, "migrate-set-capabilities", caps, true).unwrap_err();
        assert!(e.desc.contains("in progress"), "{}", e.desc);
    }

    #[test]
    fn parameters_set_and_query() {
        let mut s = settings();
        let set = json!({"multifd-channels": 4, "max-bandwidth": 1_000_000, "downtime-limit": 50,
                         "multifd-compression": "none"});
        assert_eq!(
            run(&mut s, "migrate-set-parameters", set, false),
            Ok(json!({}))
        );
        let p = run(&mut s, "query-migrate-parameters", json!({}), false).unwrap();
        assert_eq!(p["multifd-channels"], 4);
        assert_eq!(p["max-bandwidth"], 1_000_000);
        assert_eq!(p["downtime-limit"], 50);
        assert_eq!(p["multifd-compression"], "none");
        assert_eq!(p["tls-creds"], "");
        for (bad, says) in [
            (json!({"multifd-channels": 0}), "between 1 and 64"),
            (json!({"multifd-channels": 65}), "between 1 and 64"),
            (json!({"downtime-limit": 2_000_001}), "range"),
            (json!({"multifd-compression": "zlib"}), "'zlib'"),
            (json!({"max-bandwidth": "fast"}), "'max-bandwidth'"),
            (json!({"xbzrle-cache-size": 1}), "xbzrle-cache-size"),
        ] {
            let e = run(&mut s, "migrate-set-parameters", bad.clone(), false).unwrap_err();
            assert!(e.desc.contains(says), "{bad}: {}", e.desc);
        }
        // What failed changed nothing.
        assert_eq!(s.parameters.multifd_channels, 4);
    }

    #[test]
    fn tls_objects_are_checked() {
        let mut s = settings();
        let e = run(
            &mut s,
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "tls0", "dir": "/nonexistent",
                   "endpoint": "client"}),
            false,
        )
        .unwrap_err();
        assert!(e.desc.contains("/nonexistent"), "{}", e.desc);
        let e = run(
            &mut s,
            "object-add",
            json!({"qom-type": "memory-backend-ram", "id": "m", "size": 4096}),
            false,
        )
        .unwrap_err();
        assert!(e.desc.contains("memory-backend-ram"), "{}", e.desc);
        let authz = json!({"qom-type": "authz-simple", "id": "a", "identity": "CN=src"});
        assert_eq!(
            run(&mut s, "object-add", authz.clone(), false),
            Ok(json!({}))
        );
        assert!(run(&mut s, "object-add", authz, false).is_err());
        run(
            &mut s,
            "migrate-set-parameters",
            json!({"tls-authz": "a"}),
            false,
        )
        .unwrap();
        assert_eq!(s.tls_subjects(), Ok(vec!["CN=src".to_owned()]));
        assert!(run(&mut s, "object-del", json!({"id": "a"}), false).is_err());
        run(
            &mut s,
            "migrate-set-parameters",
            json!({"tls-authz": "", "tls-creds": "x"}),
            false,
        )
        .unwrap();
        assert_eq!(
            run(&mut s, "object-del", json!({"id": "a"}), false),
            Ok(json!({}))
        );
        assert!(
            s.tls_dir()
                .unwrap_err()
                .desc
                .contains("No TLS credentials with id 'x'")
        );
    }
}
