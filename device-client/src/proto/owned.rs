//! Owned copies of values and readings (feature `std`), for code that must keep them
//! beyond the receive buffer they were decoded from: the gateway's command queue, a
//! simulated device's pending result. The wire types stay borrowed and allocation-free.

use std::string::{String, ToString};
use std::vec::Vec;

use super::text::{Name, TextError};
use super::value::{Reading, Readings, Value};

/// A [`Value`] that owns its text and bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedValue {
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    I64(i64),
    /// An unsigned integer.
    U64(u64),
    /// A single-precision number.
    F32(f32),
    /// A double-precision number.
    F64(f64),
    /// Text.
    Str(String),
    /// Bytes.
    Bytes(Vec<u8>),
}

impl OwnedValue {
    /// Copies a borrowed value.
    pub fn from_value(v: &Value<'_>) -> Self {
        match *v {
            Value::Bool(b) => Self::Bool(b),
            Value::I64(x) => Self::I64(x),
            Value::U64(x) => Self::U64(x),
            Value::F32(x) => Self::F32(x),
            Value::F64(x) => Self::F64(x),
            Value::Str(t) => Self::Str(t.as_str().to_string()),
            Value::Bytes(b) => Self::Bytes(b.as_bytes().to_vec()),
        }
    }

    /// The protocol value, borrowing from `self`; fails if text or bytes are over
    /// their bound.
    pub fn as_value(&self) -> Result<Value<'_>, TextError> {
        Ok(match self {
            Self::Bool(b) => Value::Bool(*b),
            Self::I64(x) => Value::I64(*x),
            Self::U64(x) => Value::U64(*x),
            Self::F32(x) => Value::F32(*x),
            Self::F64(x) => Value::F64(*x),
            Self::Str(s) => Value::str(s)?,
            Self::Bytes(b) => Value::bytes(b)?,
        })
    }
}

/// Named owned values, in order.
pub type OwnedReadings = Vec<(String, OwnedValue)>;

/// Copies borrowed readings.
pub fn to_owned_readings(readings: &[Reading<'_>]) -> OwnedReadings {
    readings
        .iter()
        .map(|r| {
            (
                r.name.as_str().to_string(),
                OwnedValue::from_value(&r.value),
            )
        })
        .collect()
}

/// Borrows owned readings as protocol readings: fails on a bad name, a value over its
/// bound, or more than [`MAX_READINGS`](super::MAX_READINGS) of them.
pub fn borrow_readings(owned: &OwnedReadings) -> Result<Readings<'_>, TextError> {
    let mut out = Readings::new();
    for (name, value) in owned {
        let r = Reading::new(Name::new(name)?, value.as_value()?);
        out.push(r).map_err(|_| TextError::TooLong {
            len: owned.len(),
            max: super::MAX_READINGS,
        })?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_round_trips() {
        let vals = [
            Value::Bool(true),
            Value::I64(-5),
            Value::U64(7),
            Value::F32(1.5),
            Value::F64(2.25),
            Value::str("hi").unwrap(),
            Value::bytes(&[1, 2]).unwrap(),
        ];
        for v in vals {
            assert_eq!(OwnedValue::from_value(&v).as_value(), Ok(v));
        }
        let name = Name::new("n").unwrap();
        let owned = to_owned_readings(&[Reading::new(name, Value::U64(1))]);
        assert_eq!(borrow_readings(&owned).unwrap()[0].value, Value::U64(1));
        let too_many: OwnedReadings = (0..17)
            .map(|i| (std::format!("a{i}"), OwnedValue::U64(i)))
            .collect();
        assert!(borrow_readings(&too_many).is_err());
    }
}
