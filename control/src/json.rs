//! QMP-shaped JSON (feature `serde`): events as QMP sends them, the query as `query-migrate`
//! returns it.
//!
//! ```
//! use ramjet_control::{Machine, Options, Profile, Side, Timestamp, Trigger};
//! let mut machine = Machine::new(Side::Source, Profile::Qemu10, Options::new());
//! let at = Timestamp::from_unix_micros(1_767_225_600_000_042);
//! let event = machine.step(Trigger::Migrate, at)?.expect("an event");
//! assert_eq!(
//!     serde_json::to_string(&event)?,
//!     r#"{"timestamp":{"seconds":1767225600,"microseconds":42},"event":"MIGRATION","data":{"status":"setup"}}"#
//! );
//! let query = serde_json::to_value(machine.query(at))?;
//! assert_eq!(query["status"], "setup");
//! assert_eq!(query["total-time"], 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::time::Duration;

use serde::ser::{Serialize, SerializeMap, SerializeStruct, Serializer};

use crate::{Event, EventKind, Query, Status, Timestamp};

impl Serialize for Status {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl Serialize for Timestamp {
    /// `{"seconds": S, "microseconds": US}`, as in every QMP event.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Timestamp", 2)?;
        s.serialize_field("seconds", &self.seconds())?;
        s.serialize_field("microseconds", &self.subsec_micros())?;
        s.end()
    }
}

/// The `data` member of an event.
struct EventData(EventKind);

impl Serialize for EventData {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1))?;
        match self.0 {
            EventKind::Migration { status } => map.serialize_entry("status", &status)?,
            EventKind::MigrationPass { pass } => map.serialize_entry("pass", &pass)?,
        }
        map.end()
    }
}

impl Serialize for Event {
    /// `{"timestamp": {...}, "event": "MIGRATION", "data": {"status": "active"}}` or
    /// `{"timestamp": {...}, "event": "MIGRATION_PASS", "data": {"pass": 2}}`.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Event", 3)?;
        s.serialize_field("timestamp", &self.timestamp())?;
        s.serialize_field("event", self.kind().name())?;
        s.serialize_field("data", &EventData(self.kind()))?;
        s.end()
    }
}

/// QMP reports durations as whole milliseconds.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Serialize for Query {
    /// The `MigrationInfo` object `query-migrate` returns: `status`, then each optional member
    /// only when present. The error history is not part of QMP and is left out.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("status", &self.status)?;
        if let Some(ram) = &self.ram {
            map.serialize_entry("ram", ram)?;
        }
        let times = [
            ("total-time", self.total_time),
            ("expected-downtime", self.expected_downtime),
            ("downtime", self.downtime),
            ("setup-time", self.setup_time),
        ];
        for (name, value) in times {
            if let Some(value) = value {
                map.serialize_entry(name, &millis(value))?;
            }
        }
        if let Some(error) = &self.error_desc {
            map.serialize_entry("error-desc", error)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use crate::{Fact, Machine, Options, Profile, RamStats, Side, Timestamp, Trigger};

    const T0: Timestamp = Timestamp::from_unix_micros(1_767_225_600_000_000);

    #[test]
    fn pass_event_shape() {
        let mut m = Machine::new(Side::Source, Profile::Qemu10, Options::new());
        m.step(Trigger::Migrate, T0).unwrap();
        let event = m.step(Fact::Pass(1), T0).unwrap().unwrap();
        assert_eq!(
            serde_json::to_value(event).unwrap(),
            json!({
                "timestamp": {"seconds": 1_767_225_600_u64, "microseconds": 0},
                "event": "MIGRATION_PASS",
                "data": {"pass": 1}
            })
        );
    }

    #[test]
    fn query_shape_after_failure() {
        let mut m = Machine::new(Side::Source, Profile::Qemu10, Options::new());
        assert_eq!(
            serde_json::to_value(m.query(T0)).unwrap(),
            json!({"status": "none"})
        );
        m.step(Trigger::Migrate, T0).unwrap();
        m.set_ram_stats(RamStats {
            transferred: 8192,
            page_size: 4096,
            mbps: 12.5,
            ..RamStats::default()
        });
        m.step(Fact::Failed("connection reset by peer".into()), T0)
            .unwrap();
        m.step(
            Fact::Drained,
            T0.saturating_add(std::time::Duration::from_millis(7)),
        )
        .unwrap();
        let v: Value = serde_json::to_value(m.query(T0)).unwrap();
        assert_eq!(v["status"], "failed");
        assert_eq!(v["error-desc"], "connection reset by peer");
        assert_eq!(v["total-time"], 7);
        assert!(v.get("setup-time").is_none() && v.get("downtime").is_none());
        let ram = &v["ram"];
        assert_eq!(ram["transferred"], 8192);
        assert_eq!(ram["page-size"], 4096);
        assert_eq!(ram["mbps"], 12.5);
        // Every MigrationStats member is present: QAPI makes them mandatory.
        let names = [
            "transferred",
            "remaining",
            "total",
            "duplicate",
            "normal",
            "normal-bytes",
            "dirty-pages-rate",
            "mbps",
            "dirty-sync-count",
            "postcopy-requests",
            "page-size",
            "multifd-bytes",
            "pages-per-second",
            "precopy-bytes",
            "downtime-bytes",
            "postcopy-bytes",
            "dirty-sync-missed-zero-copy",
        ];
        let object = ram.as_object().unwrap();
        assert_eq!(object.len(), names.len());
        for name in names {
            assert!(object.contains_key(name), "{name}");
        }
    }
}
