//! The device state document (protocol version 2, PROTOCOL.md §5.3) without I/O: the
//! desired settings an operator sets, versioned, and the changes a device needs to
//! catch up from the version it holds.
//!
//! ```text
//!  PUT .../state {"desired": {"interval_s": 10, "led": null}}
//!        │  DesiredDoc::apply: validate every value, merge (null unsets), version += 1
//!        ▼
//!  DesiredDoc { version 7, settings {name: (value, set at)}, removed {name: at} }
//!        │  DesiredDoc::changes_since(base the device holds)
//!        ▼
//!  Delta { version 7, base 5, changes [Set interval_s 10, Unset led] }  ─► Desired frame
//!        (base 0: the whole document, when the changes since `base` are not known
//!         or would not fit one message)
//! ```
//!
//! The document is kept as JSON in the store (`device_state.desired`); values use the
//! JSON mapping of `values.rs`, so a stored document always encodes (every value was
//! checked against the protocol's bounds when it was set).

use std::collections::BTreeMap;

use device_client::proto::{self, Change, Changes, Desired, Name};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::values::{self, ArgsError, OwnedValue};

/// Settings in one device's desired document (the whole document fits one message).
pub const MAX_SETTINGS: usize = proto::MAX_READINGS;

/// Removed settings remembered, so that a device holding an older version is told to
/// unset them; beyond this, a device that far behind gets the whole document.
const MAX_REMOVED: usize = 32;

/// Why a change of the desired state was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The body's `desired` is not a JSON object.
    #[error("\"desired\" must be an object of setting names to values (null unsets one)")]
    NotAnObject,
    /// A name or value breaks the protocol's bounds.
    #[error("{0}")]
    Invalid(#[from] ArgsError),
    /// The document would hold more settings than one message carries.
    #[error("a desired document holds at most {MAX_SETTINGS} settings; this change makes {0}")]
    TooMany(usize),
}

/// One device's desired document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DesiredDoc {
    /// Grows by one with every change; 0: never set.
    pub version: u32,
    /// Changes since a version below this are not known (removals were forgotten).
    #[serde(default)]
    pub history_from: u32,
    /// Setting name → its value (JSON mapping of `values.rs`) and the version that set it.
    pub settings: BTreeMap<String, (Json, u32)>,
    /// Removed setting → the version that removed it.
    #[serde(default)]
    pub removed: BTreeMap<String, u32>,
}

/// What a device must apply to reach the document's version.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    /// The version reached.
    pub version: u32,
    /// The version the changes apply to; 0: the whole document.
    pub base: u32,
    /// Settings to set, in name order.
    pub set: values::OwnedReadings,
    /// Settings to unset.
    pub unset: Vec<String>,
}

impl Delta {
    /// The protocol message, borrowing from `self`.
    pub fn message(&self) -> Result<Desired<'_>, proto::TextError> {
        let mut changes = Changes::new();
        let too_many = proto::TextError::TooLong {
            len: self.set.len() + self.unset.len(),
            max: MAX_SETTINGS,
        };
        for r in values::borrow_readings(&self.set)? {
            changes.push(Change::Set(r)).map_err(|_| too_many)?;
        }
        for n in &self.unset {
            changes
                .push(Change::Unset(Name::new(n)?))
                .map_err(|_| too_many)?;
        }
        Ok(Desired {
            version: self.version,
            base: self.base,
            changes,
        })
    }
}

impl DesiredDoc {
    /// The document as stored; an unreadable one counts as empty (it is only ever
    /// written by [`to_json`](Self::to_json)).
    pub fn from_stored(text: Option<&str>) -> Self {
        text.and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default()
    }

    /// The document for the store.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The desired settings as a JSON object of name → value.
    pub fn values(&self) -> Map<String, Json> {
        self.settings
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    }

    /// Merges `patch` (name → value; `null` unsets): every value is checked first, so
    /// a refused patch changes nothing. Returns whether anything changed (the version
    /// grows only then).
    pub fn apply(&mut self, patch: &Json) -> Result<bool, StateError> {
        let Json::Object(patch) = patch else {
            return Err(StateError::NotAnObject);
        };
        // Check the values as command arguments are checked: same bounds, same mapping.
        let to_set: Map<String, Json> = patch
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let checked = values::args_from_json(&Json::Object(to_set))?;
        for name in patch.keys() {
            Name::new(name).map_err(|reason| ArgsError::BadName {
                name: name.clone(),
                reason,
            })?;
        }
        let mut next = self.settings.clone();
        let mut unset = Vec::new();
        for (name, v) in patch {
            if v.is_null() && next.remove(name).is_some() {
                unset.push(name.clone());
            }
        }
        let version = self.version.wrapping_add(1).max(1);
        let mut changed = !unset.is_empty();
        for (name, value) in &checked {
            // Stored in its canonical JSON form (a number stays the number given).
            let json = canonical(value);
            if next.get(name).is_none_or(|(old, _)| *old != json) {
                next.insert(name.clone(), (json, version));
                changed = true;
            }
        }
        if next.len() > MAX_SETTINGS {
            return Err(StateError::TooMany(next.len()));
        }
        if !changed {
            return Ok(false);
        }
        for (name, _) in &checked {
            self.removed.remove(name);
        }
        for name in unset {
            self.removed.insert(name, version);
        }
        while self.removed.len() > MAX_REMOVED {
            // Forget the oldest removal; a device behind it gets the whole document.
            let Some((name, at)) = self
                .removed
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(n, a)| (n.clone(), *a))
            else {
                break;
            };
            self.removed.remove(&name);
            self.history_from = self.history_from.max(at);
        }
        self.settings = next;
        self.version = version;
        Ok(true)
    }

    /// What a device holding version `base` needs; `None` if it is up to date, or if
    /// nothing was ever set here (a device's own settings are then left alone, and the
    /// API shows it out of sync).
    pub fn changes_since(&self, base: u32) -> Option<Delta> {
        if base == self.version || self.version == 0 {
            return None;
        }
        let known = base != 0 && base < self.version && base >= self.history_from;
        if known {
            let set: values::OwnedReadings = self
                .settings
                .iter()
                .filter(|(_, (_, at))| *at > base)
                .filter_map(|(k, (v, _))| Some((k.clone(), owned(v)?)))
                .collect();
            let unset: Vec<String> = self
                .removed
                .iter()
                .filter(|(_, at)| **at > base)
                .map(|(k, _)| k.clone())
                .collect();
            if set.len() + unset.len() <= MAX_SETTINGS {
                return Some(Delta {
                    version: self.version,
                    base,
                    set,
                    unset,
                });
            }
        }
        Some(self.whole())
    }

    /// The whole document (`base` 0).
    pub fn whole(&self) -> Delta {
        Delta {
            version: self.version,
            base: 0,
            set: self
                .settings
                .iter()
                .filter_map(|(k, (v, _))| Some((k.clone(), owned(v)?)))
                .collect(),
            unset: Vec::new(),
        }
    }
}

/// A checked value in the JSON form the store keeps.
fn canonical(v: &OwnedValue) -> Json {
    values::owned_to_json(&vec![(String::new(), v.clone())])
        .as_object()
        .and_then(|m| m.values().next().cloned())
        .unwrap_or(Json::Null)
}

/// A stored value back as a protocol value.
fn owned(v: &Json) -> Option<OwnedValue> {
    let mut one = Map::new();
    one.insert("v".into(), v.clone());
    values::args_from_json(&Json::Object(one))
        .ok()?
        .pop()
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use serde_json::json;

    #[test]
    fn a_patch_merges_unsets_and_versions() {
        let mut d = DesiredDoc::default();
        assert!(d.apply(&json!({"interval_s": 10, "led": "on"})).unwrap());
        assert_eq!(d.version, 1);
        // The same values again: no change, no new version.
        assert!(!d.apply(&json!({"interval_s": 10})).unwrap());
        assert_eq!(d.version, 1);
        assert!(d.apply(&json!({"led": null, "mode": true})).unwrap());
        assert_eq!(d.version, 2);
        assert_eq!(
            Json::Object(d.values()),
            json!({"interval_s": 10, "mode": true})
        );
        // Unsetting what is not there changes nothing.
        assert!(!d.apply(&json!({"nope": null})).unwrap());
        // Stored and read back unchanged.
        assert_eq!(DesiredDoc::from_stored(Some(&d.to_json())), d);
    }

    #[test]
    fn a_refused_patch_changes_nothing() {
        let mut d = DesiredDoc::default();
        d.apply(&json!({"a": 1})).unwrap();
        let before = d.clone();
        assert!(matches!(
            d.apply(&json!({"b": 2, "bad name": 1})),
            Err(StateError::Invalid(_))
        ));
        assert!(matches!(
            d.apply(&json!({"b": [1]})),
            Err(StateError::Invalid(_))
        ));
        assert!(matches!(d.apply(&json!(3)), Err(StateError::NotAnObject)));
        let many: Map<String, Json> = (0..16).map(|i| (format!("k{i}"), json!(i))).collect();
        assert!(matches!(
            d.apply(&Json::Object(many)),
            Err(StateError::TooMany(17))
        ));
        assert_eq!(d, before);
    }

    #[test]
    fn changes_since_a_version_are_a_delta_or_the_whole_document() {
        let mut d = DesiredDoc::default();
        assert_eq!(d.changes_since(0), None);
        // A device that says it holds a version this gateway never made (its store was
        // replaced, say) is not told to drop everything: version 0 is no document.
        assert_eq!(d.changes_since(5), None);
        d.apply(&json!({"a": 1, "b": 2})).unwrap(); // v1
        d.apply(&json!({"b": 3, "c": "x"})).unwrap(); // v2
        d.apply(&json!({"a": null})).unwrap(); // v3
        assert_eq!(d.changes_since(3), None);
        let from1 = d.changes_since(1).unwrap();
        assert_eq!((from1.version, from1.base), (3, 1));
        assert_eq!(
            from1.set,
            vec![
                ("b".into(), OwnedValue::U64(3)),
                ("c".into(), OwnedValue::Str("x".into()))
            ]
        );
        assert_eq!(from1.unset, vec!["a".to_string()]);
        let from2 = d.changes_since(2).unwrap();
        assert!(from2.set.is_empty());
        assert_eq!(from2.unset, vec!["a".to_string()]);
        // A device with nothing, or claiming a version the gateway never made: all.
        for base in [0, 9] {
            let all = d.changes_since(base).unwrap();
            assert_eq!((all.version, all.base), (3, 0));
            assert_eq!(all.set.len(), 2);
            assert!(all.unset.is_empty());
        }
        // Every delta encodes as one message.
        let msg = from1.message().unwrap();
        assert_eq!(msg.changes.len(), 3);
    }

    #[test]
    fn forgotten_removals_send_the_whole_document() {
        let mut d = DesiredDoc::default();
        for i in 0..40 {
            d.apply(&json!({ format!("k{i}"): 1 })).unwrap();
            d.apply(&json!({ format!("k{i}"): null })).unwrap();
        }
        assert_eq!(d.removed.len(), MAX_REMOVED);
        assert!(d.history_from > 0);
        let old = d.changes_since(2).unwrap();
        assert_eq!(old.base, 0, "removals before history_from are unknown");
        let recent = d.changes_since(d.version - 1).unwrap();
        assert_eq!(recent.base, d.version - 1);
        assert_eq!(recent.unset.len(), 1);
    }

    #[test]
    fn more_changes_than_one_message_holds_send_the_whole_document() {
        let mut d = DesiredDoc::default();
        let many: Map<String, Json> = (0..16).map(|i| (format!("k{i}"), json!(i))).collect();
        d.apply(&Json::Object(many)).unwrap(); // v1
        let unset: Map<String, Json> = (0..8).map(|i| (format!("k{i}"), Json::Null)).collect();
        d.apply(&Json::Object(unset)).unwrap(); // v2: 8 left
        let set: Map<String, Json> = (0..12).map(|i| (format!("n{i}"), json!(i))).collect();
        let e = d.apply(&Json::Object(set)).unwrap_err();
        assert!(matches!(e, StateError::TooMany(20)));
        let set: Map<String, Json> = (0..8).map(|i| (format!("n{i}"), json!(i))).collect();
        d.apply(&Json::Object(set)).unwrap(); // v3: 16 settings
        // From v2: 8 set; from v1: 8 set + 8 unset = 16, still one message.
        assert_eq!(d.changes_since(1).unwrap().base, 1);
        let e = d.changes_since(1).unwrap();
        assert_eq!(e.set.len() + e.unset.len(), 16);
        e.message().unwrap();
        d.apply(&json!({"k8": 100})).unwrap(); // v4: from v1, 17 changes
        let from1 = d.changes_since(1).unwrap();
        assert_eq!(from1.base, 0);
        assert_eq!(from1.set.len(), 16);
        from1.message().unwrap();
    }
}
