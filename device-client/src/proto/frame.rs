//! Framing (PROTOCOL.md §3): a 2-byte big-endian body length, then a postcard body.
//!
//! ```text
//!  0        1        2 ...                      2+len
//! +--------+--------+---------------------------+
//! |  len (u16, BE)  | body: postcard(Uplink|Downlink), len bytes, len >= 1
//! +--------+--------+---------------------------+
//! ```
//!
//! Reading is split in two steps so that the length is checked against the negotiated
//! maximum *before* any body byte is buffered: [`split_frame`] finds one complete frame
//! at the front of a buffer (or says how far it is), [`decode`] turns a body into a
//! message that borrows from it.

use postcard::experimental::max_size::MaxSize;

use super::limits::{HEADER_LEN, MAX_FRAME_ON_WIRE};
use super::message::{Downlink, Message, Uplink};

/// The largest uplink frame any valid message can make, header included: a buffer of
/// this size can hold every frame a device may send.
pub const MAX_UPLINK_FRAME: usize = HEADER_LEN + Uplink::POSTCARD_MAX_SIZE;

/// The largest downlink frame any valid message can make, header included.
pub const MAX_DOWNLINK_FRAME: usize = HEADER_LEN + Downlink::POSTCARD_MAX_SIZE;

// Both must be describable by the 2-byte header.
const _: () = assert!(MAX_UPLINK_FRAME <= MAX_FRAME_ON_WIRE);
const _: () = assert!(MAX_DOWNLINK_FRAME <= MAX_FRAME_ON_WIRE);

/// A frame that must not be read any further: the connection is broken.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The header announces an empty body; every message has at least its variant byte.
    #[error("frame with an empty body")]
    EmptyBody,
    /// The header announces a frame larger than the receiver accepts.
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// Announced frame length, header included.
        len: usize,
        /// The receiver's limit, header included.
        max: usize,
    },
}

/// A body that is not a valid message of the expected direction.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not a valid postcard encoding of a message: unknown variant,
    /// truncated field, bad UTF-8, a string or list over its bound, a name with a
    /// forbidden character ...
    #[error("malformed message: {0}")]
    Malformed(postcard::Error),
    /// The message ended before the body did.
    #[error("{extra} bytes after the end of the message")]
    TrailingBytes {
        /// Unread bytes.
        extra: usize,
    },
}

/// A message that could not be encoded.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The frame does not fit the buffer (or the limit the buffer was cut to).
    #[error("the frame does not fit in {available} bytes")]
    TooLarge {
        /// Bytes that were available, header included.
        available: usize,
    },
    /// The serializer failed for another reason (a bug).
    #[error("encoding failed: {0}")]
    Serialize(postcard::Error),
}

/// One complete frame found at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The body, ready for [`decode`].
    pub body: &'a [u8],
    /// Bytes the frame takes in the buffer, header included: drop them once the
    /// message is handled.
    pub len: usize,
}

/// Finds the frame at the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed. `max_frame` is the largest frame
/// (header included) the caller accepts; a larger announced length is an error as soon
/// as the header has arrived, before the body is read.
pub fn split_frame(buf: &[u8], max_frame: usize) -> Result<Option<Frame<'_>>, FrameError> {
    let Some(&[hi, lo]) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let body_len = usize::from(u16::from_be_bytes([hi, lo]));
    if body_len == 0 {
        return Err(FrameError::EmptyBody);
    }
    let len = HEADER_LEN + body_len;
    if len > max_frame {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame,
        });
    }
    Ok(buf.get(HEADER_LEN..len).map(|body| Frame { body, len }))
}

/// Decodes one message from a whole frame body; the message borrows from `body`.
pub fn decode<'a, M: Message<'a>>(body: &'a [u8]) -> Result<M, DecodeError> {
    let (msg, rest) = postcard::take_from_bytes::<M>(body).map_err(DecodeError::Malformed)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { extra: rest.len() });
    }
    Ok(msg)
}

/// Encodes `msg` as one frame at the front of `buf` and returns the frame's length.
///
/// To respect the peer's limit, pass a buffer cut to it:
/// `encode(&msg, &mut buf[..peer_max_frame.min(buf.len())])`.
pub fn encode<'a, M: Message<'a>>(msg: &M, buf: &mut [u8]) -> Result<usize, EncodeError> {
    let available = buf.len();
    let too_large = EncodeError::TooLarge { available };
    let (header, body) = buf
        .split_at_mut_checked(HEADER_LEN)
        .ok_or(too_large.clone())?;
    // The header can describe at most u16::MAX body bytes.
    let body_cap = body.len().min(usize::from(u16::MAX));
    let body = body.get_mut(..body_cap).ok_or(too_large.clone())?;
    let body_len = match postcard::to_slice(msg, body) {
        Ok(written) => written.len(),
        Err(postcard::Error::SerializeBufferFull) => return Err(too_large),
        Err(e) => return Err(EncodeError::Serialize(e)),
    };
    // `body` is at most u16::MAX bytes long (cut above), so this cannot fail.
    header.copy_from_slice(&frame_header(body_len).ok_or(too_large)?);
    Ok(HEADER_LEN + body_len)
}

/// The header of a frame whose body is `body_len` bytes; `None` if the header cannot
/// describe it (empty or over 65,535 bytes).
pub fn frame_header(body_len: usize) -> Option<[u8; HEADER_LEN]> {
    match u16::try_from(body_len) {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n.to_be_bytes()),
    }
}

/// Reads the protocol version from a `Hello` or `Welcome` body without decoding the rest,
/// so that a peer can refuse a version it does not speak with a proper `Goodbye`.
///
/// Every protocol version keeps both messages as variant 0 with the version as the first
/// field (one byte), so this works across versions.
///
/// It reads what the decoder reads: the variant index is a varint, written `00`, but a
/// decoder also takes 0 spelled longer, `80 00` up to `80 80 80 80 00` (the five bytes
/// of a `u32`, PROTOCOL.md §4). Reading only `00` here would let a `Hello` spelled so
/// past the gateway's version check (§10), and the decoder would then take it.
pub fn peek_version(body: &[u8]) -> Option<u8> {
    // At most four continuation bytes before the final `00` of a u32 varint.
    let continued = body.iter().take(4).take_while(|b| **b == 0x80).count();
    match body.get(continued..)? {
        [0, version, ..] => Some(*version),
        _ => None,
    }
}

/// Decodes an uplink body (gateway side).
pub fn decode_uplink(body: &[u8]) -> Result<Uplink<'_>, DecodeError> {
    decode(body)
}

/// Decodes a downlink body (device side).
pub fn decode_downlink(body: &[u8]) -> Result<Downlink<'_>, DecodeError> {
    decode(body)
}
