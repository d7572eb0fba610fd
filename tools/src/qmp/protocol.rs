//! The QMP wire protocol as QEMU documents it (docs/interop/qmp-spec): the greeting, commands
//! (`{"execute": NAME, "arguments": {...}, "id": ANY}`), their `return` or `error` replies, and
//! the framing of the input stream into JSON values.
//!
//! serde parses and prints every JSON value; what is here is what QEMU's monitor adds around
//! it: splitting the byte stream into top-level values with a size bound (QEMU's json-streamer
//! does the same, so that a client cannot make it buffer without end), checking the members of
//! a command object, and the error classes and messages QEMU uses for each kind of bad input.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// The largest input value accepted: commands are a few hundred bytes; a larger value is
/// refused with one error and skipped to its end (QEMU's limit, 64 MiB, is for its general
/// JSON parser; nothing a migration monitor takes comes near this one).
pub const MAX_INPUT: usize = 1 << 20;

/// QEMU's `QapiErrorClass`: the class of an `error` reply. Management software matches on
/// the class, never on the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    /// Every error without a class of its own.
    GenericError,
    /// The command does not exist (or not in this mode: before `qmp_capabilities`).
    CommandNotFound,
}

/// An `error` reply's class and description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// A `CommandNotFound`.
    pub fn not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

/// What a command returns: its `return` value, or an error.
pub type Outcome = Result<Value, QmpError>;

/// The reply to one command, as sent: `{"return": ..., "id": ...}` or
/// `{"error": {"class": ..., "desc": ...}, "id": ...}`, the `id` echoed when the command had
/// one.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Return {
        #[serde(rename = "return")]
        value: Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    Error {
        error: QmpError,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
}

impl Reply {
    pub fn new(outcome: Outcome, id: Option<Value>) -> Reply {
        match outcome {
            Ok(value) => Reply::Return { value, id },
            Err(error) => Reply::Error { error, id },
        }
    }
}

/// The version a greeting and `query-version` show: the QEMU release whose migration
/// interface (commands, statuses, events) ramjet reproduces, with ramjet's own version as the
/// package.
pub fn version() -> Value {
    serde_json::json!({
        "qemu": {"major": 10, "minor": 0, "micro": 0},
        "package": concat!("ramjet ", env!("CARGO_PKG_VERSION")),
    })
}

/// The greeting sent on connection: no capabilities are offered (ramjet has no out-of-band
/// execution), so `qmp_capabilities` takes none.
pub fn greeting() -> Value {
    serde_json::json!({"QMP": {"version": version(), "capabilities": []}})
}

/// One command read from a client.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub name: String,
    pub arguments: Map<String, Value>,
    pub id: Option<Value>,
}

/// Reads one top-level input value as a command, with QEMU's error for each way it can be
/// wrong. The error comes with the command's `id`, when it had a readable one.
pub fn parse_request(text: &[u8]) -> Result<Request, (QmpError, Option<Value>)> {
    let value: Value = serde_json::from_slice(text)
        .map_err(|e| (QmpError::generic(format!("JSON parse error, {e}")), None))?;
    let Value::Object(mut object) = value else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = object.remove("id");
    let fail = |desc: String| Err((QmpError::generic(desc), id.clone()));
    if object.contains_key("exec-oob") {
        return fail(
            "QMP input member 'exec-oob' requires the capability 'oob', which this \
                     monitor does not offer"
                .into(),
        );
    }
    let name = match object.remove("execute") {
        Some(Value::String(name)) => name,
        Some(_) => return fail("QMP input member 'execute' must be a string".into()),
        None => return fail("QMP input lacks member 'execute'".into()),
    };
    let arguments = match object.remove("arguments") {
        Some(Value::Object(arguments)) => arguments,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into()),
        None => Map::new(),
    };
    if let Some(extra) = object.keys().next() {
        return fail(format!("QMP input member '{extra}' is unexpected"));
    }
    Ok(Request {
        name,
        arguments,
        id,
    })
}

/// A command's arguments as `T`, which says their names and types (with
/// `#[serde(deny_unknown_fields)]`): a missing, unexpected or mistyped argument is a
/// `GenericError` naming it.
pub fn arguments<T: DeserializeOwned>(arguments: Map<String, Value>) -> Result<T, QmpError> {
    serde_path_to_error::deserialize(Value::Object(arguments)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            QmpError::generic(format!("Invalid arguments: {inner}"))
        } else {
            QmpError::generic(format!("Invalid parameter '{path}': {inner}"))
        }
    })
}

/// What the input stream holds next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// The bytes of one complete top-level JSON value (or of what looks like one: serde
    /// judges it).
    Value(Vec<u8>),
    /// A value longer than [`MAX_INPUT`], skipped to its end.
    TooLarge,
}

/// Splits a byte stream into top-level JSON values by tracking brackets and strings, as
/// QEMU's json-streamer does, so that each value is parsed on its own: a malformed one costs an
/// error reply, not the connection, and one too large is dropped without being buffered.
#[derive(Debug)]
pub struct Splitter {
    buf: Vec<u8>,
    /// Open brackets and braces of the value in progress.
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// The value in progress outgrew the limit: its bytes are dropped until it ends.
    oversized: bool,
    limit: usize,
}

impl Default for Splitter {
    fn default() -> Self {
        Splitter::new(MAX_INPUT)
    }
}

impl Splitter {
    pub fn new(limit: usize) -> Self {
        Splitter {
            buf: Vec::new(),
            depth: 0,
            in_string: false,
            escaped: false,
            oversized: false,
            limit,
        }
    }

    /// Takes `bytes` and appends every value they complete to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Piece>) {
        for &b in bytes {
            self.byte(b, out);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Piece>) {
        if self.in_string {
            self.keep(b);
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    self.emit(out);
                }
            }
            return;
        }
        match b {
            b'"' => {
                self.keep(b);
                self.in_string = true;
            }
            b'{' | b'[' => {
                if self.depth == 0 {
                    // A bare word before it ends there.
                    self.emit(out);
                }
                self.keep(b);
                self.depth += 1;
            }
            b'}' | b']' => {
                self.keep(b);
                if self.depth <= 1 {
                    // The value ends, or a stray closer is one (malformed) value by itself.
                    self.depth = 0;
                    self.emit(out);
                } else {
                    self.depth -= 1;
                }
            }
            b' ' | b'\t' | b'\r' | b'\n' if self.depth == 0 => self.emit(out),
            _ => self.keep(b),
        }
    }

    fn keep(&mut self, b: u8) {
        if self.oversized {
            return;
        }
        if self.buf.len() >= self.limit {
            self.oversized = true;
            self.buf = Vec::new();
            return;
        }
        self.buf.push(b);
    }

    /// Ends the value in progress, if any.
    fn emit(&mut self, out: &mut Vec<Piece>) {
        if self.oversized {
            out.push(Piece::TooLarge);
        } else if !self.buf.is_empty() {
            out.push(Piece::Value(std::mem::take(&mut self.buf)));
        }
        self.oversized = false;
        self.buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn split(limit: usize, chunks: &[&[u8]]) -> Vec<Piece> {
        let mut splitter = Splitter::new(limit);
        let mut out = Vec::new();
        for chunk in chunks {
            splitter.push(chunk, &mut out);
        }
        out
    }

    fn value(s: &str) -> Piece {
        Piece::Value(s.as_bytes().to_vec())
    }

    #[test]
    fn values_split_wherever_the_reads_break() {
        let input = br#"{"execute": "a"}{"execute":"b", "arguments": {"x": [1, {"y": "}]\""}]}}
            [1,2] "str" 42 true"#;
        let whole = split(MAX_INPUT, &[input]);
        assert_eq!(
            whole,
            [
                value(r#"{"execute": "a"}"#),
                value(r#"{"execute":"b", "arguments": {"x": [1, {"y": "}]\""}]}}"#),
                value("[1,2]"),
                value(r#""str""#),
                value("42"),
            ]
        );
        // Byte by byte, the same values (the last word waits for what follows it).
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(split(MAX_INPUT, &bytes), whole);
    }

    #[test]
    fn a_value_too_large_is_skipped_to_its_end() {
        let big = format!(
            r#"{{"execute": "x", "arguments": {{"pad": "{}"}}}}"#,
            "{".repeat(100)
        );
        let input = format!("{big}{{\"execute\": \"after\"}}");
        assert_eq!(
            split(64, &[input.as_bytes()]),
            [Piece::TooLarge, value(r#"{"execute": "after"}"#)]
        );
        // A bare word too long ends at white space.
        assert_eq!(split(4, &[b"abcdefgh {}"]), [Piece::TooLarge, value("{}")]);
    }

    #[test]
    fn stray_closers_and_garbage_are_values_of_their_own() {
        assert_eq!(
            split(MAX_INPUT, &[b"} ]{\"a\":1}"]),
            [value("}"), value("]"), value(r#"{"a":1}"#)]
        );
        assert_eq!(
            split(MAX_INPUT, &[b"nonsense{}"]),
            [value("nonsense"), value("{}")]
        );
    }

    #[test]
    fn commands_are_checked_as_qemu_checks_them() {
        let ok =
            parse_request(br#"{"execute": "migrate", "arguments": {"uri": "tcp:x:1"}, "id": 7}"#)
                .unwrap();
        assert_eq!(ok.name, "migrate");
        assert_eq!(ok.arguments["uri"], "tcp:x:1");
        assert_eq!(ok.id, Some(json!(7)));
        let bad = |text: &str| parse_request(text.as_bytes()).unwrap_err();
        let (e, id) = bad("[1]");
        assert_eq!(
            (e.desc.as_str(), id),
            ("QMP input must be a JSON object", None)
        );
        let (e, id) = bad(r#"{"arguments": {}, "id": "x"}"#);
        assert_eq!(e.desc, "QMP input lacks member 'execute'");
        assert_eq!(id, Some(json!("x")));
        assert_eq!(
            bad(r#"{"execute": 1}"#).0.desc,
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            bad(r#"{"execute": "a", "arguments": []}"#).0.desc,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            bad(r#"{"execute": "a", "bogus": 1}"#).0.desc,
            "QMP input member 'bogus' is unexpected"
        );
        let (e, _) = bad(r#"{"execute": "a",}"#);
        assert_eq!(e.class, ErrorClass::GenericError);
        assert!(e.desc.starts_with("JSON parse error, "), "{}", e.desc);
    }

    #[test]
    fn arguments_name_what_is_wrong() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Args {
            uri: String,
            #[serde(default)]
            resume: bool,
        }
        let map = |v: Value| match v {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        assert!(arguments::<Args>(map(json!({"uri": "unix:/x"}))).is_ok());
        let e = arguments::<Args>(map(json!({"uri": 5}))).unwrap_err();
        assert!(
            e.desc.contains("'uri'") && e.desc.contains("expected a string"),
            "{}",
            e.desc
        );
        let e = arguments::<Args>(map(json!({}))).unwrap_err();
        assert!(e.desc.contains("missing field `uri`"), "{}", e.desc);
        let e = arguments::<Args>(map(json!({"uri": "x", "speed": 1}))).unwrap_err();
        assert!(e.desc.contains("unknown field `speed`"), "{}", e.desc);
    }

    #[test]
    fn replies_echo_the_id_and_carry_the_class() {
        let r = Reply::new(Ok(json!({})), Some(json!("a")));
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"return": {}, "id": "a"})
        );
        let r = Reply::new(
            Err(QmpError::not_found("The command x has not been found")),
            None,
        );
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"error": {"class": "CommandNotFound", "desc": "The command x has not been found"}})
        );
        assert_eq!(greeting()["QMP"]["capabilities"], json!([]));
        assert_eq!(greeting()["QMP"]["version"]["qemu"]["major"], 10);
    }
}
