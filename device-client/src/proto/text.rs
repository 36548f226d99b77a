//! Bounded, borrowed strings and byte strings: the only variable-length leaves of the
//! protocol.
//!
//! Each type checks its bound (and, for [`Name`], its character set) when it is built
//! and when it is decoded, so a value that exists is valid (parse, don't validate).
//! They borrow from the receive buffer, so decoding copies nothing. Their
//! [`MaxSize`] is exact: a varint length prefix plus the bound.

use core::fmt;
use core::ops::Deref;

use postcard::experimental::max_size::MaxSize;
use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde::ser::{Serialize, Serializer};

use super::limits::MAX_NAME_LEN;

/// Number of bytes postcard's varint encoding takes for `n` (7 bits a byte).
pub const fn varint_len(n: usize) -> usize {
    let mut len = 1;
    let mut rest = n >> 7;
    while rest != 0 {
        len += 1;
        rest >>= 7;
    }
    len
}

/// Why a string or byte string was refused.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TextError {
    /// Longer than the field's bound.
    #[error("{len} bytes is over the limit of {max}")]
    TooLong {
        /// Length given, in bytes.
        len: usize,
        /// The field's bound, in bytes.
        max: usize,
    },
    /// A name must not be empty.
    #[error("a name must not be empty")]
    Empty,
    /// A name holds a byte outside `[A-Za-z0-9._-]`.
    #[error("a name may only hold [A-Za-z0-9._-]; byte {at} is not")]
    BadCharacter {
        /// Offset of the first bad byte.
        at: usize,
    },
}

// ---------------------------------------------------------------------------------------

/// The name of a reading, a command or an argument: 1 to [`MAX_NAME_LEN`] bytes of
/// `[A-Za-z0-9._-]` (PROTOCOL.md §4.2), the same alphabet as device ids, so a name is
/// safe as a JSON key, a metric label or an MQTT topic level.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name<'a>(&'a str);

impl<'a> Name<'a> {
    /// Checks `s` against the name rule.
    pub const fn new(s: &'a str) -> Result<Self, TextError> {
        let bytes = s.as_bytes();
        if bytes.is_empty() {
            return Err(TextError::Empty);
        }
        if bytes.len() > MAX_NAME_LEN {
            return Err(TextError::TooLong {
                len: bytes.len(),
                max: MAX_NAME_LEN,
            });
        }
        let mut at = 0;
        while at < bytes.len() {
            let b = bytes[at];
            if !(b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
                return Err(TextError::BadCharacter { at });
            }
            at += 1;
        }
        Ok(Self(s))
    }

    /// A name from a literal; fails to compile (in a const context) or panics if the
    /// literal breaks the rule. For names written in source code.
    pub const fn from_static(s: &'static str) -> Name<'static> {
        match Name::new(s) {
            Ok(n) => n,
            // A programming error in a literal, not input: see the doc comment above.
            Err(_) => panic!("invalid protocol name literal"),
        }
    }

    /// The name as a string slice, borrowed for as long as the buffer it came from.
    pub const fn as_str(&self) -> &'a str {
        self.0
    }
}

impl Deref for Name<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        self.0
    }
}

impl fmt::Debug for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

impl fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl Serialize for Name<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Name<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = d.deserialize_str(BorrowedStr)?;
        Name::new(s).map_err(|_| de::Error::invalid_value(de::Unexpected::Str(s), &"a name"))
    }
}

impl MaxSize for Name<'_> {
    const POSTCARD_MAX_SIZE: usize = varint_len(MAX_NAME_LEN) + MAX_NAME_LEN;
}

// ---------------------------------------------------------------------------------------

/// UTF-8 text of at most `N` bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Text<'a, const N: usize>(&'a str);

impl<'a, const N: usize> Text<'a, N> {
    /// Checks that `s` fits in `N` bytes.
    pub const fn new(s: &'a str) -> Result<Self, TextError> {
        if s.len() > N {
            return Err(TextError::TooLong {
                len: s.len(),
                max: N,
            });
        }
        Ok(Self(s))
    }

    /// The longest prefix of `s` that fits in `N` bytes and ends on a character
    /// boundary. For text that may be cut, such as a firmware version string.
    pub fn truncating(s: &'a str) -> Self {
        let mut end = s.len().min(N);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        Self(s.get(..end).unwrap_or(""))
    }

    /// The text as a string slice.
    pub const fn as_str(&self) -> &'a str {
        self.0
    }
}

impl<const N: usize> Deref for Text<'_, N> {
    type Target = str;
    fn deref(&self) -> &str {
        self.0
    }
}

impl<const N: usize> fmt::Debug for Text<'_, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

impl<const N: usize> Serialize for Text<'_, N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

impl<'de: 'a, 'a, const N: usize> Deserialize<'de> for Text<'a, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = d.deserialize_str(BorrowedStr)?;
        Text::new(s).map_err(|_| de::Error::invalid_length(s.len(), &"text within its bound"))
    }
}

impl<const N: usize> MaxSize for Text<'_, N> {
    const POSTCARD_MAX_SIZE: usize = varint_len(N) + N;
}

// ---------------------------------------------------------------------------------------

/// Opaque bytes, at most `N` of them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Blob<'a, const N: usize>(&'a [u8]);

impl<'a, const N: usize> Blob<'a, N> {
    /// Checks that `b` holds at most `N` bytes.
    pub const fn new(b: &'a [u8]) -> Result<Self, TextError> {
        if b.len() > N {
            return Err(TextError::TooLong {
                len: b.len(),
                max: N,
            });
        }
        Ok(Self(b))
    }

    /// The bytes.
    pub const fn as_bytes(&self) -> &'a [u8] {
        self.0
    }
}

impl<const N: usize> Deref for Blob<'_, N> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0
    }
}

impl<const N: usize> fmt::Debug for Blob<'_, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

impl<const N: usize> Serialize for Blob<'_, N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl<'de: 'a, 'a, const N: usize> Deserialize<'de> for Blob<'a, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let b = d.deserialize_bytes(BorrowedBytes)?;
        Blob::new(b).map_err(|_| de::Error::invalid_length(b.len(), &"bytes within their bound"))
    }
}

impl<const N: usize> MaxSize for Blob<'_, N> {
    const POSTCARD_MAX_SIZE: usize = varint_len(N) + N;
}

// ---------------------------------------------------------------------------------------

/// Exactly `N` bytes (a SHA-256 digest, a signature): on the wire the bytes themselves,
/// with no length prefix, since the length is part of the message's definition.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fixed<const N: usize>(pub [u8; N]);

impl<const N: usize> fmt::Debug for Fixed<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl<const N: usize> Serialize for Fixed<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // A tuple, not bytes: postcard writes a tuple's elements back to back, and a
        // `u8` as itself.
        use serde::ser::SerializeTuple;
        let mut t = s.serialize_tuple(N)?;
        for b in &self.0 {
            t.serialize_element(b)?;
        }
        t.end()
    }
}

impl<'de, const N: usize> Deserialize<'de> for Fixed<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_tuple(N, FixedVisitor::<N>)
    }
}

impl<const N: usize> MaxSize for Fixed<N> {
    const POSTCARD_MAX_SIZE: usize = N;
}

struct FixedVisitor<const N: usize>;

impl<'de, const N: usize> Visitor<'de> for FixedVisitor<N> {
    type Value = Fixed<N>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{N} bytes")
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = [0u8; N];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = seq
                .next_element()?
                .ok_or_else(|| de::Error::invalid_length(i, &self))?;
        }
        Ok(Fixed(out))
    }
}

// ---------------------------------------------------------------------------------------
// Visitors that accept only borrowed data: an owned string would need an allocator, and
// postcard always hands out borrowed slices of its input.

struct BorrowedStr;

impl<'de> Visitor<'de> for BorrowedStr {
    type Value = &'de str;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a borrowed string")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(v)
    }
}

struct BorrowedBytes;

impl<'de> Visitor<'de> for BorrowedBytes {
    type Value = &'de [u8];
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("borrowed bytes")
    }
    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_len_matches_postcard() {
        for (n, len) in [
            (0, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (65_535, 3),
        ] {
            assert_eq!(varint_len(n), len, "n = {n}");
        }
    }

    #[test]
    fn names_follow_the_rule() {
        assert!(Name::new("temp_c").is_ok());
        assert!(Name::new("a.b-c_9").is_ok());
        assert_eq!(Name::new(""), Err(TextError::Empty));
        assert_eq!(Name::new("a b"), Err(TextError::BadCharacter { at: 1 }));
        assert_eq!(
            Name::new(&"n".repeat(33)),
            Err(TextError::TooLong { len: 33, max: 32 })
        );
    }

    #[test]
    fn fixed_bytes_are_written_as_themselves() {
        let f = Fixed([1u8, 2, 0xff]);
        let mut buf = [0u8; 8];
        let n = postcard::to_slice(&f, &mut buf).unwrap().len();
        assert_eq!(&buf[..n], &[1, 2, 0xff]);
        assert_eq!(postcard::from_bytes::<Fixed<3>>(&buf[..3]).unwrap(), f);
        assert!(postcard::from_bytes::<Fixed<3>>(&buf[..2]).is_err());
        assert_eq!(Fixed::<3>::POSTCARD_MAX_SIZE, 3);
    }

    #[test]
    fn truncating_text_respects_char_boundaries() {
        let t = Text::<4>::truncating("aéé"); // 1 + 2 + 2 bytes
        assert_eq!(t.as_str(), "aé");
        assert_eq!(Text::<4>::truncating("ab").as_str(), "ab");
    }
}
