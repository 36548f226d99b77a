//! The little DER (X.690) a device needs: reading certificates and keys, and ECDSA
//! signatures both ways. One-byte tags, definite lengths up to 65,535 in their shortest
//! form; everything else is refused as malformed.
//!
//! Hand-written rather than the `der` crate because of flash: through `sec1` and `ecdsa`
//! it cost the firmware about 5 KB, through embedded-tls's `rustpki` about 31 KB.

/// The input is not the DER expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

pub(crate) type Result<T> = core::result::Result<T, Malformed>;

pub(crate) const BOOLEAN: u8 = 0x01;
pub(crate) const INTEGER: u8 = 0x02;
pub(crate) const BIT_STRING: u8 = 0x03;
pub(crate) const OCTET_STRING: u8 = 0x04;
pub(crate) const OID: u8 = 0x06;
pub(crate) const SEQUENCE: u8 = 0x30;

/// 1.2.840.10045.3.1.7 prime256v1 (secp256r1), contents only.
pub(crate) const PRIME256V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// One DER element.
#[derive(Clone, Copy)]
pub(crate) struct Tlv<'a> {
    pub tag: u8,
    /// The contents.
    pub value: &'a [u8],
    /// Tag, length and contents: what a signature covers.
    pub whole: &'a [u8],
}

/// Reads DER elements one after another.
#[derive(Clone, Copy)]
pub(crate) struct Der<'a>(pub &'a [u8]);

impl<'a> Der<'a> {
    pub fn next(&mut self) -> Result<Tlv<'a>> {
        let input = self.0;
        let [tag, first, rest @ ..] = input else {
            return Err(Malformed);
        };
        // 0x1f: a multi-byte tag, which nothing here needs.
        if tag & 0x1f == 0x1f {
            return Err(Malformed);
        }
        let (len, rest) = match (*first, rest) {
            (n @ 0..=0x7f, rest) => (usize::from(n), rest),
            (0x81, [n @ 0x80..=0xff, rest @ ..]) => (usize::from(*n), rest),
            (0x82, [hi, lo, rest @ ..]) if *hi != 0 => {
                (usize::from(u16::from_be_bytes([*hi, *lo])), rest)
            }
            // Indefinite, not minimal, or longer than anything we read.
            _ => return Err(Malformed),
        };
        let (value, after) = rest.split_at_checked(len).ok_or(Malformed)?;
        let whole = input.get(..input.len() - after.len()).ok_or(Malformed)?;
        self.0 = after;
        Ok(Tlv {
            tag: *tag,
            value,
            whole,
        })
    }

    /// The next element, which must have `tag`.
    pub fn expect(&mut self, tag: u8) -> Result<Tlv<'a>> {
        let tlv = self.next()?;
        if tlv.tag == tag {
            Ok(tlv)
        } else {
            Err(Malformed)
        }
    }

    /// The next element if it has `tag`.
    pub fn optional(&mut self, tag: u8) -> Result<Option<Tlv<'a>>> {
        match self.0.first() {
            Some(t) if *t == tag => self.next().map(Some),
            _ => Ok(None),
        }
    }

    /// The contents of the next element, a SEQUENCE, to read on.
    pub fn sequence(&mut self) -> Result<Der<'a>> {
        Ok(Der(self.expect(SEQUENCE)?.value))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Nothing may follow the last field.
    pub fn end(&self) -> Result<()> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(Malformed)
        }
    }
}

/// The contents of a BIT STRING that must be whole bytes.
pub(crate) fn bit_string_bytes(tlv: Tlv<'_>) -> Result<&[u8]> {
    match tlv.value {
        [0, bytes @ ..] => Ok(bytes),
        _ => Err(Malformed),
    }
}

/// A positive DER INTEGER of at most 32 bytes, left-padded to 32.
fn scalar_bytes(int: &[u8]) -> Result<[u8; 32]> {
    let digits = match int {
        // A leading zero only where the next byte would read as negative (X.690 §8.3.2).
        [0, next, ..] if *next >= 0x80 => int.get(1..).unwrap_or_default(),
        [0, _, ..] | [] => return Err(Malformed),
        [first, ..] if *first >= 0x80 => return Err(Malformed),
        _ => int,
    };
    let mut out = [0u8; 32];
    let start = 32usize.checked_sub(digits.len()).ok_or(Malformed)?;
    out.get_mut(start..)
        .ok_or(Malformed)?
        .copy_from_slice(digits);
    Ok(out)
}

/// An ECDSA-Sig-Value (RFC 3279 §2.2.3): two DER INTEGERs.
pub(crate) fn ecdsa_signature(der: &[u8]) -> Result<p256::ecdsa::Signature> {
    let mut outer = Der(der);
    let mut seq = outer.sequence()?;
    outer.end()?;
    let r = scalar_bytes(seq.expect(INTEGER)?.value)?;
    let s = scalar_bytes(seq.expect(INTEGER)?.value)?;
    seq.end()?;
    // from_scalars refuses 0 and values ≥ n.
    p256::ecdsa::Signature::from_scalars(r, s).map_err(|_| Malformed)
}

#[cfg(feature = "embedded-tls")]
/// The largest ECDSA-Sig-Value for P-256: two 33-byte INTEGERs with their headers in a
/// SEQUENCE.
pub(crate) const MAX_ECDSA_DER: usize = 2 + 2 * (2 + 33);

#[cfg(feature = "embedded-tls")]
/// An ECDSA P-256 signature in DER, as TLS sends it.
#[derive(Clone, Copy)]
pub struct DerEcdsaSignature {
    bytes: [u8; MAX_ECDSA_DER],
    len: u8,
}

#[cfg(feature = "embedded-tls")]
impl DerEcdsaSignature {
    /// Encodes `signature` (r ‖ s) as an ECDSA-Sig-Value.
    pub fn new(signature: &p256::ecdsa::Signature) -> Self {
        let raw = signature.to_bytes();
        let (r, s) = raw.split_at(32);
        let mut bytes = [0u8; MAX_ECDSA_DER];
        let mut len = 2;
        for int in [r, s] {
            // Minimal: no leading zero bytes, but a zero before a high bit (positive).
            let start = int.iter().position(|b| *b != 0).unwrap_or(31);
            let digits = int.get(start..).unwrap_or_default();
            let pad = usize::from(digits.first().is_some_and(|b| *b >= 0x80));
            let int_len = pad + digits.len();
            if let Some(out) = bytes.get_mut(len..len + 2 + int_len) {
                let (header, body) = out.split_at_mut(2 + pad);
                header[0] = INTEGER;
                header[1] = int_len as u8; // ≤ 33
                body.copy_from_slice(digits);
            }
            len += 2 + int_len;
        }
        bytes[0] = SEQUENCE;
        bytes[1] = (len - 2) as u8; // ≤ 70
        Self {
            bytes,
            len: len as u8,
        }
    }
}

#[cfg(feature = "embedded-tls")]
impl AsRef<[u8]> for DerEcdsaSignature {
    fn as_ref(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or_default()
    }
}

#[cfg(feature = "embedded-tls")]
impl core::fmt::Debug for DerEcdsaSignature {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("DerEcdsaSignature")
            .field(&self.as_ref())
            .finish()
    }
}

/// The private key of a SEC1 `ECPrivateKey` (RFC 5915 §3) on P-256: version 1, a
/// 32-byte key, and if present the curve's name, which must be prime256v1.
#[cfg(feature = "embedded-tls")]
pub(crate) fn sec1_p256_private_key(der: &[u8]) -> Result<[u8; 32]> {
    let mut outer = Der(der);
    let mut key = outer.sequence()?;
    outer.end()?;
    if key.expect(INTEGER)?.value != [1] {
        return Err(Malformed);
    }
    let secret: [u8; 32] = key
        .expect(OCTET_STRING)?
        .value
        .try_into()
        .map_err(|_| Malformed)?;
    if let Some(params) = key.optional(0xa0)? {
        let mut params = Der(params.value);
        if params.expect(OID)?.value != PRIME256V1 {
            return Err(Malformed);
        }
        params.end()?;
    }
    // [1] publicKey: derived from the private key anyway.
    key.optional(0xa1)?;
    key.end()?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_must_be_minimal_and_in_bounds() {
        assert!(Der(&[0x04, 0x81, 0x05, 1, 2, 3, 4, 5]).next().is_err());
        assert!(
            Der(&[0x04, 0x82, 0x00, 0x05, 1, 2, 3, 4, 5])
                .next()
                .is_err()
        );
        assert!(Der(&[0x04, 0x80]).next().is_err());
        assert!(Der(&[0x04, 0x03, 1, 2]).next().is_err());
        assert!(Der(&[0x1f, 0x01, 0x00]).next().is_err());
        let mut der = Der(&[0x04, 0x02, 1, 2, 0x05, 0x00]);
        let first = der.next().unwrap();
        assert_eq!(
            (first.tag, first.value, first.whole),
            (0x04, &[1, 2][..], &[0x04, 0x02, 1, 2][..])
        );
        assert_eq!(der.next().unwrap().tag, 0x05);
        assert!(der.is_empty());
    }

    #[test]
    fn integers_must_be_positive_minimal_and_fit() {
        assert_eq!(scalar_bytes(&[1]).unwrap()[31], 1);
        assert_eq!(scalar_bytes(&[0, 0x80]).unwrap()[31], 0x80);
        assert!(scalar_bytes(&[0, 0x7f]).is_err());
        assert!(scalar_bytes(&[0x80]).is_err());
        assert!(scalar_bytes(&[]).is_err());
        assert!(scalar_bytes(&[1; 33]).is_err());
        assert!(scalar_bytes(&[1; 32]).is_ok());
    }

    #[cfg(feature = "embedded-tls")]
    #[test]
    fn signatures_encode_minimally_and_read_back() {
        // r with its high bit set (needs a zero), s with leading zero bytes (dropped).
        let mut raw = [0u8; 64];
        raw[0] = 0x80;
        raw[31] = 1;
        raw[32 + 3] = 0x42;
        raw[63] = 7;
        let sig = p256::ecdsa::Signature::from_slice(&raw).unwrap();
        let der = DerEcdsaSignature::new(&sig);
        let bytes = der.as_ref();
        assert_eq!(&bytes[..4], &[SEQUENCE, 33 + 2 + 29 + 2, INTEGER, 33]);
        assert_eq!(bytes[4], 0);
        assert_eq!(&bytes[4 + 33..4 + 33 + 2], &[INTEGER, 29]);
        assert_eq!(bytes.len(), 2 + 35 + 31);
        assert_eq!(ecdsa_signature(bytes), Ok(sig));
        // The ecdsa crate's own encoding agrees.
        assert_eq!(bytes, sig.to_der().as_bytes());
    }
}
