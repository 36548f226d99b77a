//! Certificate serial numbers.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// Length of the serial numbers this crate mints, in bytes.
pub const SERIAL_LEN: usize = 16;

/// A certificate serial number: a non-negative integer, kept as its big-endian bytes
/// without leading zeros.
///
/// Revocation keys on it (RFC 5280 §5.1.2.6), so every certificate this crate mints gets
/// a fresh random one ([`Serial::random`]). Displayed as upper-case hex without
/// separators, the way `openssl x509 -serial` and `openssl crl -text` print it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// A random positive serial of exactly [`SERIAL_LEN`] bytes.
    ///
    /// The top bit of the first byte is clear, so the DER INTEGER is positive and needs
    /// no padding byte; the next bit is set, so the number always encodes in exactly
    /// 16 bytes and prints as 32 hex digits. That leaves 126 random bits.
    pub fn random() -> Result<Self, Error> {
        let mut bytes = vec![0u8; SERIAL_LEN];
        getrandom::fill(&mut bytes).map_err(Error::Random)?;
        if let Some(first) = bytes.first_mut() {
            *first = (*first & 0x3f) | 0x40;
        }
        Ok(Self(bytes))
    }

    /// A serial from big-endian magnitude bytes; leading zero bytes are dropped.
    pub fn from_be_bytes(bytes: &[u8]) -> Self {
        let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
        Self(bytes.get(start..).unwrap_or_default().to_vec())
    }

    /// Parses hex digits, upper or lower case, optionally separated by `:`
    /// (`4A:3B...` as x509-parser prints it, or `4A3B...` as openssl does).
    pub fn from_hex(input: &str) -> Result<Self, Error> {
        let bad = || Error::InvalidSerial {
            input: input.to_owned(),
        };
        let mut digits: String = input.chars().filter(|&c| c != ':').collect();
        if digits.is_empty() || digits.len() > 2 * 64 {
            return Err(bad());
        }
        // An odd count is a leading zero left out (`0` for zero).
        if digits.len() % 2 == 1 {
            digits.insert(0, '0');
        }
        let bytes = hex::decode(&digits).map_err(|_| bad())?;
        Ok(Self::from_be_bytes(&bytes))
    }

    /// Big-endian magnitude bytes, without leading zeros (empty for zero).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Upper-case hex without separators (`"00"` for zero).
    pub fn to_hex(&self) -> String {
        if self.0.is_empty() {
            return "00".to_owned();
        }
        hex::encode_upper(&self.0)
    }

    /// The serial as rcgen wants it: a positive DER INTEGER's magnitude.
    pub(crate) fn to_rcgen(&self) -> rcgen::SerialNumber {
        if self.0.is_empty() {
            rcgen::SerialNumber::from_slice(&[0])
        } else {
            rcgen::SerialNumber::from_slice(&self.0)
        }
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({})", self.to_hex())
    }
}

impl FromStr for Serial {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_hex(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_serials_are_positive_16_bytes_and_distinct() {
        let a = Serial::random().unwrap();
        let b = Serial::random().unwrap();
        assert_ne!(a, b);
        for s in [&a, &b] {
            assert_eq!(s.as_bytes().len(), SERIAL_LEN);
            assert_eq!(s.as_bytes()[0] & 0xc0, 0x40);
            assert_eq!(s.to_hex().len(), 32);
        }
    }

    #[test]
    fn hex_round_trip() {
        let s = Serial::random().unwrap();
        assert_eq!(Serial::from_hex(&s.to_hex()).unwrap(), s);
        assert_eq!(Serial::from_hex(&s.to_hex().to_lowercase()).unwrap(), s);
        assert_eq!(Serial::from_hex("0a:0B").unwrap().as_bytes(), &[0x0a, 0x0b]);
        assert_eq!(Serial::from_hex("abc").unwrap().as_bytes(), &[0x0a, 0xbc]);
        assert_eq!(Serial::from_hex("00ff").unwrap().as_bytes(), &[0xff]);
        assert_eq!(Serial::from_hex("0").unwrap().to_hex(), "00");
        for bad in ["", ":", "xyz", "12 34", "0x12"] {
            assert!(Serial::from_hex(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn leading_zeros_dropped() {
        assert_eq!(Serial::from_be_bytes(&[0, 0, 1, 2]).as_bytes(), &[1, 2]);
        assert_eq!(Serial::from_be_bytes(&[0, 0]).as_bytes(), &[] as &[u8]);
    }
}
