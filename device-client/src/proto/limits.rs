//! Protocol limits (PROTOCOL.md §6). Changing any of them is a new version.

/// The highest protocol version this crate speaks.
pub const PROTOCOL_VERSION: u8 = 3;

/// The lowest protocol version this crate speaks: version 1 peers still work, without
/// the messages versions 2 and 3 added.
pub const MIN_PROTOCOL_VERSION: u8 = 1;

/// Frame header length: the body length as a big-endian `u16`.
pub const HEADER_LEN: usize = 2;

/// Longest name of a reading, command or argument, in bytes.
pub const MAX_NAME_LEN: usize = 32;

/// Longest string value, in bytes of UTF-8.
pub const MAX_TEXT_LEN: usize = 128;

/// Longest bytes value.
pub const MAX_BYTES_LEN: usize = 128;

/// Most readings in one telemetry record, arguments in one command, or values in one
/// command result.
pub const MAX_READINGS: usize = 16;

/// Longest firmware version string in `Hello`, in bytes.
pub const MAX_FIRMWARE_LEN: usize = 32;

/// The smallest `max_frame` a peer may announce. Every control message (`Hello`,
/// `Welcome`, `Ack`, `Ping`, `Pong`, `Goodbye`) fits in it, so a session can always be
/// set up and torn down, whatever the peer's buffers.
pub const MIN_MAX_FRAME: u16 = 128;

/// The largest frame the header can describe: a 2-byte header plus a 65,535-byte body.
pub const MAX_FRAME_ON_WIRE: usize = HEADER_LEN + u16::MAX as usize;

/// Most image bytes in one `FirmwareChunk` (version 3). A device asks for less when its
/// receive buffer is smaller: see [`FIRMWARE_CHUNK_OVERHEAD`].
pub const MAX_CHUNK_LEN: usize = 4096;

/// Bytes a `FirmwareChunk` frame takes besides its data, at most: header 2, variant 1,
/// id and offset up to 5 each, data length up to 2. A device with a receive buffer of
/// `b` bytes asks for at most `b - FIRMWARE_CHUNK_OVERHEAD`.
pub const FIRMWARE_CHUNK_OVERHEAD: usize = 15;
