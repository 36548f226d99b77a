//! The device protocol (docs/PROTOCOL.md): messages, framing, limits, version.
//!
//! This is the only codec for these messages; the gateway uses it too.

pub mod identity;

pub use identity::{DeviceId, InvalidDeviceId, MAX_DEVICE_ID_LEN};
