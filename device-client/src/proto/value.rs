//! Typed values and named readings (PROTOCOL.md §4.3).

use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

use super::limits::{MAX_BYTES_LEN, MAX_READINGS, MAX_TEXT_LEN};
use super::text::{Blob, Name, Text, TextError};

/// One typed value. The variant order is the wire's discriminant order: never reorder.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, MaxSize)]
pub enum Value<'a> {
    /// `0`: a boolean, one byte `00` or `01`.
    Bool(bool),
    /// `1`: a signed integer, zigzag varint.
    I64(i64),
    /// `2`: an unsigned integer, varint.
    U64(u64),
    /// `3`: an IEEE 754 single, 4 bytes little-endian.
    F32(f32),
    /// `4`: an IEEE 754 double, 8 bytes little-endian.
    F64(f64),
    /// `5`: UTF-8 text of at most [`MAX_TEXT_LEN`] bytes.
    #[serde(borrow)]
    Str(Text<'a, MAX_TEXT_LEN>),
    /// `6`: opaque bytes, at most [`MAX_BYTES_LEN`].
    #[serde(borrow)]
    Bytes(Blob<'a, MAX_BYTES_LEN>),
}

impl<'a> Value<'a> {
    /// A string value, if `s` fits in [`MAX_TEXT_LEN`] bytes.
    pub const fn str(s: &'a str) -> Result<Self, TextError> {
        match Text::new(s) {
            Ok(t) => Ok(Value::Str(t)),
            Err(e) => Err(e),
        }
    }

    /// A bytes value, if `b` fits in [`MAX_BYTES_LEN`] bytes.
    pub const fn bytes(b: &'a [u8]) -> Result<Self, TextError> {
        match Blob::new(b) {
            Ok(b) => Ok(Value::Bytes(b)),
            Err(e) => Err(e),
        }
    }

    /// The value as an `f64`, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::I64(v) => Some(v as f64),
            Value::U64(v) => Some(v as f64),
            Value::F32(v) => Some(f64::from(v)),
            Value::F64(v) => Some(v),
            Value::Bool(_) | Value::Str(_) | Value::Bytes(_) => None,
        }
    }

    /// The value as a `u64`, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a string slice, if it is text.
    pub fn as_str(&self) -> Option<&'a str> {
        match self {
            Value::Str(t) => Some(t.as_str()),
            _ => None,
        }
    }
}

/// A named value: one reading of telemetry, one argument of a command, or one value of
/// a command's result.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, MaxSize)]
pub struct Reading<'a> {
    /// What the value is (`temp_c`, `interval_s` ...).
    #[serde(borrow)]
    pub name: Name<'a>,
    /// The value.
    #[serde(borrow)]
    pub value: Value<'a>,
}

impl<'a> Reading<'a> {
    /// A reading from a valid name and a value.
    pub const fn new(name: Name<'a>, value: Value<'a>) -> Self {
        Self { name, value }
    }
}

/// Up to [`MAX_READINGS`] readings. Decoding more is an error, never a truncation.
pub type Readings<'a> = heapless::Vec<Reading<'a>, MAX_READINGS>;

/// Looks up a reading by name (first match).
pub fn find<'a, 'r>(readings: &'r [Reading<'a>], name: &str) -> Option<&'r Value<'a>> {
    readings
        .iter()
        .find(|r| r.name.as_str() == name)
        .map(|r| &r.value)
}
