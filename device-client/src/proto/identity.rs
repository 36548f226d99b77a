//! Device identity: the subject CN of the device's client certificate.
//!
//! PROTOCOL.md §2.4: a device id is 1 to 64 bytes from `[A-Za-z0-9._-]`, and neither
//! `.` nor `..` (they would name directories when an id is used in a path). The gateway
//! refuses a certificate whose CN breaks this rule, and the certs tool never mints one.
//! The rule keeps ids safe to use verbatim in file names, URLs, SQL, log lines and
//! MQTT topics.

use core::fmt;

/// Longest device id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// A validated device id, borrowed. Construct it with [`DeviceId::new`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId<'a>(&'a str);

/// Why a string is not a device id.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidDeviceId {
    /// The id is empty.
    #[error("device id is empty")]
    Empty,
    /// The id is longer than [`MAX_DEVICE_ID_LEN`] bytes.
    #[error("device id is {len} bytes long, the limit is 64")]
    TooLong {
        /// Length of the rejected id, in bytes.
        len: usize,
    },
    /// The id is `.` or `..`.
    #[error("device id must not be . or ..")]
    DotName,
    /// The id holds a byte outside `[A-Za-z0-9._-]`.
    #[error("device id has a character outside [A-Za-z0-9._-] at byte {at}")]
    BadCharacter {
        /// Offset of the first bad byte.
        at: usize,
    },
}

impl<'a> DeviceId<'a> {
    /// Checks `s` against the identity rule.
    pub fn new(s: &'a str) -> Result<Self, InvalidDeviceId> {
        if s.is_empty() {
            return Err(InvalidDeviceId::Empty);
        }
        if s.len() > MAX_DEVICE_ID_LEN {
            return Err(InvalidDeviceId::TooLong { len: s.len() });
        }
        if let Some(at) = s.bytes().position(|b| !is_id_byte(b)) {
            return Err(InvalidDeviceId::BadCharacter { at });
        }
        if s == "." || s == ".." {
            return Err(InvalidDeviceId::DotName);
        }
        Ok(Self(s))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &'a str {
        self.0
    }
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

impl fmt::Display for DeviceId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for DeviceId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({:?})", self.0)
    }
}

impl AsRef<str> for DeviceId<'_> {
    fn as_ref(&self) -> &str {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_rule() {
        for ok in ["a", "sensor-01", "A.b_c-9", &"x".repeat(64)] {
            assert_eq!(DeviceId::new(ok).map(|d| d.as_str()), Ok(ok));
        }
    }

    #[test]
    fn refuses_the_rest() {
        assert_eq!(DeviceId::new(""), Err(InvalidDeviceId::Empty));
        assert_eq!(
            DeviceId::new(&"x".repeat(65)),
            Err(InvalidDeviceId::TooLong { len: 65 })
        );
        assert_eq!(
            DeviceId::new("a b"),
            Err(InvalidDeviceId::BadCharacter { at: 1 })
        );
        assert_eq!(
            DeviceId::new("a/b"),
            Err(InvalidDeviceId::BadCharacter { at: 1 })
        );
        assert_eq!(
            DeviceId::new("é"),
            Err(InvalidDeviceId::BadCharacter { at: 0 })
        );
        assert_eq!(
            DeviceId::new("a\0"),
            Err(InvalidDeviceId::BadCharacter { at: 1 })
        );
        assert_eq!(DeviceId::new("."), Err(InvalidDeviceId::DotName));
        assert_eq!(DeviceId::new(".."), Err(InvalidDeviceId::DotName));
        assert!(DeviceId::new("...").is_ok());
    }
}
