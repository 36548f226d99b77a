//! Protocol values as JSON, both ways (the store, the API and live events speak JSON).
//!
//! | protocol | JSON |
//! |---|---|
//! | `Bool` | `true` / `false` |
//! | `I64`, `U64` | a number |
//! | `F32`, `F64` | a number (`null` if not finite) |
//! | `Str` | a string |
//! | `Bytes` | `{"base64": "..."}` |
//!
//! Readings become an object keyed by name (the first of a repeated name wins).

use device_client::proto::{self, Name, Reading, Value};
use serde_json::{Map, Number, Value as Json};

/// A JSON object of readings.
pub fn readings_to_json(readings: &[Reading<'_>]) -> Map<String, Json> {
    let mut map = Map::with_capacity(readings.len());
    for r in readings {
        map.entry(r.name.as_str())
            .or_insert_with(|| value_to_json(&r.value));
    }
    map
}

/// One value as JSON.
pub fn value_to_json(v: &Value<'_>) -> Json {
    match *v {
        Value::Bool(b) => Json::Bool(b),
        Value::I64(i) => Json::Number(i.into()),
        Value::U64(u) => Json::Number(u.into()),
        Value::F32(f) => Number::from_f64(f64::from(f)).map_or(Json::Null, Json::Number),
        Value::F64(f) => Number::from_f64(f).map_or(Json::Null, Json::Number),
        Value::Str(s) => Json::String(s.as_str().to_owned()),
        Value::Bytes(b) => {
            let mut m = Map::new();
            m.insert("base64".into(), Json::String(base64_encode(b.as_bytes())));
            Json::Object(m)
        }
    }
}

/// Why a JSON object cannot become protocol readings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArgsError {
    /// Arguments must be a JSON object.
    #[error("arguments must be a JSON object of name: value")]
    NotAnObject,
    /// More than the protocol allows.
    #[error("{count} arguments; at most {max} are allowed")]
    TooMany {
        /// How many were given.
        count: usize,
        /// The protocol's limit.
        max: usize,
    },
    /// A name breaks the name rule.
    #[error("argument name {name:?}: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        reason: proto::TextError,
    },
    /// A value has no protocol equivalent or breaks a bound.
    #[error("argument {name:?}: {reason}")]
    BadValue {
        /// The argument's name.
        name: String,
        /// Why.
        reason: String,
    },
}

pub use device_client::proto::owned::{OwnedReadings, OwnedValue, borrow_readings};

/// Parses a JSON object into command arguments, checking every protocol bound, so that
/// a command accepted into the queue can always be encoded.
pub fn args_from_json(args: &Json) -> Result<OwnedReadings, ArgsError> {
    let obj = match args {
        Json::Object(o) => o,
        Json::Null => return Ok(Vec::new()),
        _ => return Err(ArgsError::NotAnObject),
    };
    if obj.len() > proto::MAX_READINGS {
        return Err(ArgsError::TooMany {
            count: obj.len(),
            max: proto::MAX_READINGS,
        });
    }
    let mut out = Vec::with_capacity(obj.len());
    for (name, v) in obj {
        Name::new(name).map_err(|reason| ArgsError::BadName {
            name: name.clone(),
            reason,
        })?;
        let bad = |reason: String| ArgsError::BadValue {
            name: name.clone(),
            reason,
        };
        let value = match v {
            Json::Bool(b) => OwnedValue::Bool(*b),
            Json::Number(n) => {
                if let Some(u) = n.as_u64() {
                    OwnedValue::U64(u)
                } else if let Some(i) = n.as_i64() {
                    OwnedValue::I64(i)
                } else {
                    OwnedValue::F64(n.as_f64().ok_or_else(|| bad("not a number".into()))?)
                }
            }
            Json::String(s) => OwnedValue::Str(s.clone()),
            Json::Object(o) if o.len() == 1 && o.contains_key("base64") => {
                let text = o.get("base64").and_then(Json::as_str).unwrap_or_default();
                OwnedValue::Bytes(base64_decode(text).ok_or_else(|| bad("invalid base64".into()))?)
            }
            Json::Null | Json::Array(_) | Json::Object(_) => {
                return Err(bad(
                    "values are booleans, numbers, strings or {\"base64\": \"...\"}".into(),
                ));
            }
        };
        value.as_value().map_err(|e| bad(e.to_string()))?;
        out.push((name.clone(), value));
    }
    Ok(out)
}

/// The owned arguments as JSON (for the store and the API).
pub fn owned_to_json(args: &OwnedReadings) -> Json {
    let mut map = Map::new();
    for (name, value) in args {
        let v = match value.as_value() {
            Ok(v) => value_to_json(&v),
            Err(_) => Json::Null,
        };
        map.entry(name.as_str()).or_insert(v);
    }
    Json::Object(map)
}

/// Serializes a `u64` as a decimal string: JSON readers in JavaScript round integers
/// above 2^53, and boot ids are random 64-bit numbers.
pub fn u64_as_string<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// [`u64_as_string`] for an optional value (`null` when absent).
pub fn opt_u64_as_string<S: serde::Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes standard base64; `None` if invalid.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base64_round_trips() {
        for (raw, enc) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"\xde\xad\xbe\xef", "3q2+7w=="),
        ] {
            assert_eq!(base64_encode(raw), enc);
            assert_eq!(base64_decode(enc).as_deref(), Some(raw));
        }
        assert_eq!(base64_decode("Z"), None);
        assert_eq!(base64_decode("!!!!"), None);
    }

    #[test]
    fn json_args_become_bounded_readings() {
        let args = args_from_json(&json!({
            "interval_s": 5, "delta": -2, "gain": 0.5, "on": true, "label": "x",
            "blob": {"base64": "3q2+7w=="}
        }))
        .unwrap();
        let readings = borrow_readings(&args).unwrap();
        assert_eq!(readings.len(), 6);
        assert_eq!(proto::find(&readings, "interval_s"), Some(&Value::U64(5)));
        assert_eq!(proto::find(&readings, "delta"), Some(&Value::I64(-2)));
        let back = Json::Object(readings_to_json(&readings));
        assert_eq!(back["blob"], json!({"base64": "3q2+7w=="}));
        assert_eq!(back["gain"], json!(0.5));
    }

    #[test]
    fn bad_args_say_why() {
        assert_eq!(args_from_json(&json!([1])), Err(ArgsError::NotAnObject));
        assert!(matches!(
            args_from_json(&json!({"bad name": 1})),
            Err(ArgsError::BadName { .. })
        ));
        assert!(matches!(
            args_from_json(&json!({"x": [1]})),
            Err(ArgsError::BadValue { .. })
        ));
        let long = "y".repeat(200);
        assert!(matches!(
            args_from_json(&json!({"x": long})),
            Err(ArgsError::BadValue { .. })
        ));
        let many: serde_json::Map<String, Json> =
            (0..17).map(|i| (format!("a{i}"), json!(i))).collect();
        assert!(matches!(
            args_from_json(&Json::Object(many)),
            Err(ArgsError::TooMany { count: 17, .. })
        ));
    }
}
