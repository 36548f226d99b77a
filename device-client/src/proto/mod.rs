//! The device protocol, versions 1 to 3: messages, framing, limits (docs/PROTOCOL.md).
//!
//! This is the only codec for these messages; the gateway uses it too. Everything here
//! is `no_std`, allocation-free and panic-free on any input: encoding writes into a
//! caller's buffer, decoding borrows strings and bytes from the receive buffer.
//!
//! ```text
//!  device                                   gateway
//!    | Hello{version, boot_id, fw, max_frame} |
//!    |--------------------------------------->|
//!    |  Welcome{version, heartbeat, last_acked, time, max_frame}
//!    |<---------------------------------------|
//!    | Telemetry{seq, time, readings} ...     |
//!    |--------------------------------------->|  store, commit
//!    |                       Ack{seq} (cumulative)
//!    |<---------------------------------------|
//!    |                Command{id, name, args, ttl}
//!    |<---------------------------------------|
//!    | CommandResult{id, status, values}      |
//!    |--------------------------------------->|
//!    | Ping{nonce} / Pong{nonce}              |
//!    |<-------------------------------------->|
//!    |                Goodbye{reason, retry_after}
//!    |<---------------------------------------|
//!    | version 2: Reported{desired_version, values}
//!    |--------------------------------------->|
//!    |          Desired{version, base, changes}
//!    |<---------------------------------------|
//!    |  version 3: FirmwareOffer{id, version, size, sha256, signature}
//!    |<---------------------------------------|
//!    | FirmwareRequest{id, offset, len}       |
//!    |--------------------------------------->|  one outstanding
//!    |           FirmwareChunk{id, offset, data}
//!    |<---------------------------------------|
//!    | FirmwareStatus{id, outcome}            |
//!    |--------------------------------------->|
//! ```

pub mod frame;
pub mod identity;
pub mod limits;
pub mod message;
#[cfg(feature = "std")]
pub mod owned;
pub mod text;
pub mod value;

pub use frame::{
    DecodeError, EncodeError, Frame, FrameError, MAX_DOWNLINK_FRAME, MAX_UPLINK_FRAME, decode,
    decode_downlink, decode_uplink, encode, frame_header, peek_version, split_frame,
};
pub use identity::{DeviceId, InvalidDeviceId, MAX_DEVICE_ID_LEN};
pub use limits::*;
pub use message::{
    Ack, Change, Changes, Command, CommandId, CommandResult, CommandStatus, Desired, Downlink,
    FirmwareCancel, FirmwareChunk, FirmwareId, FirmwareOffer, FirmwareOutcome, FirmwareRequest,
    FirmwareStatus, Goodbye, GoodbyeReason, Hello, Message, Ping, Pong, Reported, Seq, Telemetry,
    Uplink, Welcome,
};
pub use text::{Blob, Fixed, Name, Text, TextError};
pub use value::{Reading, Readings, Value, find};
