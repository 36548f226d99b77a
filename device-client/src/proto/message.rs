//! Every message of both directions (PROTOCOL.md §5).
//!
//! Each direction is one enum; the variant index is the first byte of a frame body.
//! Variant order and field order *are* the wire format: never reorder, only append in a
//! new protocol version.

use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

use super::limits::{MAX_CHUNK_LEN, MAX_FIRMWARE_LEN, MAX_READINGS};
use super::text::{Blob, Fixed, Name, Text};
use super::value::{Reading, Readings};

/// A device's telemetry sequence number. Numbers start at 1 for each boot id and grow by
/// one per record.
pub type Seq = u32;

/// A command id, chosen by the gateway and unique per device.
pub type CommandId = u32;

/// A firmware transfer's id (version 3), chosen by the gateway: one per image offered
/// to a device, the same across its sessions, so a transfer resumes under its id.
pub type FirmwareId = u32;

// ----------------------------------------------------------------------------------------
// Device → gateway

/// Everything a device sends.
// A decoded message lives on the stack for one frame; boxing would need an allocator.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, MaxSize)]
pub enum Uplink<'a> {
    /// `0`: opens a session. Always variant 0 with the version as its first byte, in
    /// every protocol version.
    #[serde(borrow)]
    Hello(Hello<'a>),
    /// `1`: one telemetry record.
    #[serde(borrow)]
    Telemetry(Telemetry<'a>),
    /// `2`: the outcome of a command.
    #[serde(borrow)]
    CommandResult(CommandResult<'a>),
    /// `3`: a heartbeat; the gateway answers with [`Pong`].
    Ping(Ping),
    /// `4`, version 2: the device's state, and the desired version it has applied.
    #[serde(borrow)]
    Reported(Reported<'a>),
    /// `5`, version 3: asks for the next piece of an offered firmware image.
    FirmwareRequest(FirmwareRequest),
    /// `6`, version 3: how an offered firmware transfer ended on the device.
    FirmwareStatus(FirmwareStatus),
}

/// The first message of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, MaxSize)]
pub struct Hello<'a> {
    /// The highest protocol version the device speaks.
    pub version: u8,
    /// Random per boot (or a persistent counter): telemetry is keyed by
    /// (device, boot id, seq), so a new boot id starts a new sequence.
    pub boot_id: u64,
    /// The firmware version, for the operator.
    #[serde(borrow)]
    pub firmware: Text<'a, MAX_FIRMWARE_LEN>,
    /// The largest frame (header included) the device can receive.
    pub max_frame: u16,
}

/// One telemetry record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, MaxSize)]
pub struct Telemetry<'a> {
    /// Sequence number within the boot id, starting at 1.
    pub seq: Seq,
    /// When the values were taken, in milliseconds since the Unix epoch, if the device
    /// knows the time; otherwise the gateway stamps the record on arrival.
    pub time_ms: Option<u64>,
    /// The values.
    #[serde(borrow)]
    pub readings: Readings<'a>,
}

/// The outcome of a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, MaxSize)]
pub struct CommandResult<'a> {
    /// The command's id.
    pub id: CommandId,
    /// How it ended.
    pub status: CommandStatus,
    /// Result values (may be empty).
    #[serde(borrow)]
    pub values: Readings<'a>,
}

/// How a command ended on the device.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub enum CommandStatus {
    /// `0`: it ran and succeeded.
    Succeeded,
    /// `1`: it ran and failed.
    Failed,
    /// `2`: the device does not know the command's name.
    UnknownCommand,
    /// `3`: the arguments were missing or of the wrong type.
    InvalidArguments,
    /// `4`: its time to live ran out before the device could run it.
    Expired,
}

/// The device's reported state (version 2, PROTOCOL.md §5.3): values merged by name
/// into what the gateway shows as reported, and the desired document version the
/// device has applied. A device sends one right after `Welcome` (its values may be
/// empty): until it does, the gateway sends it no [`Desired`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, MaxSize)]
pub struct Reported<'a> {
    /// The version of the last [`Desired`] the device applied; 0 if none.
    pub desired_version: u32,
    /// Reported values (0 to 16), each replacing the one of the same name.
    #[serde(borrow)]
    pub values: Readings<'a>,
}

/// Asks for `len` bytes of image `id` from `offset` (version 3, PROTOCOL.md §5.4). A
/// device keeps one request outstanding: the next goes out once the chunk is written.
/// That is the transfer's flow control: at most one chunk is ever queued ahead of an
/// ack or a command. Resuming after a reconnect is asking from the offset it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
pub struct FirmwareRequest {
    /// The offer's id.
    pub id: FirmwareId,
    /// The first byte wanted.
    pub offset: u32,
    /// How many bytes, 1 to [`MAX_CHUNK_LEN`]; the gateway sends fewer only at the end
    /// of the image.
    pub len: u16,
}

/// The end of a firmware transfer on the device (version 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
pub struct FirmwareStatus {
    /// The offer's id.
    pub id: FirmwareId,
    /// How it ended.
    pub outcome: FirmwareOutcome,
}

/// How a firmware transfer ended on the device. Only `Verified` is a success: the
/// gateway counts the update installed when the device next says `Hello` with the
/// offered version (a bootloader that rolled back brings the old one).
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
pub enum FirmwareOutcome {
    /// `0`: the whole image is written, its SHA-256 and signature check out, and it is
    /// marked for the bootloader; the device restarts into it.
    Verified,
    /// `1`: the device does not take this offer (no room, a version it will not run).
    Declined,
    /// `2`: the image received is not `size` bytes long.
    SizeMismatch,
    /// `3`: the image's SHA-256 is not the offered one.
    HashMismatch,
    /// `4`: the release signature does not verify.
    BadSignature,
    /// `5`: writing or erasing the update partition failed.
    StorageError,
}

impl FirmwareOutcome {
    /// A short lowercase name for logs, the API and the store.
    pub const fn as_str(&self) -> &'static str {
        match self {
            FirmwareOutcome::Verified => "verified",
            FirmwareOutcome::Declined => "declined",
            FirmwareOutcome::SizeMismatch => "size_mismatch",
            FirmwareOutcome::HashMismatch => "hash_mismatch",
            FirmwareOutcome::BadSignature => "bad_signature",
            FirmwareOutcome::StorageError => "storage_error",
        }
    }
}

/// A heartbeat from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
pub struct Ping {
    /// Echoed in the [`Pong`], so the device can measure the round trip.
    pub nonce: u32,
}

// ----------------------------------------------------------------------------------------
// Gateway → device

/// Everything the gateway sends.
// A decoded message lives on the stack for one frame; boxing would need an allocator.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, MaxSize)]
pub enum Downlink<'a> {
    /// `0`: accepts a `Hello`. Always variant 0 with the version as its first byte.
    Welcome(Welcome),
    /// `1`: cumulative acknowledgement of durable telemetry.
    Ack(Ack),
    /// `2`: a command for the device to run.
    #[serde(borrow)]
    Command(Command<'a>),
    /// `3`: answers a [`Ping`].
    Pong(Pong),
    /// `4`: the gateway is closing the session.
    Goodbye(Goodbye),
    /// `5`, version 2: changes to the device's desired settings.
    #[serde(borrow)]
    Desired(Desired<'a>),
    /// `6`, version 3: a firmware image for the device to fetch.
    #[serde(borrow)]
    FirmwareOffer(FirmwareOffer<'a>),
    /// `7`, version 3: a piece of an image, answering a [`FirmwareRequest`].
    #[serde(borrow)]
    FirmwareChunk(FirmwareChunk<'a>),
    /// `8`, version 3: an offered image is withdrawn; drop what was received of it.
    FirmwareCancel(FirmwareCancel),
}

/// The gateway's answer to `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
pub struct Welcome {
    /// The protocol version of this session (at most `Hello::version`).
    pub version: u8,
    /// The device sends a `Ping` when it has sent nothing for this many seconds; the
    /// gateway closes a session that is silent for 3 intervals.
    pub heartbeat_s: u16,
    /// The highest seq the gateway holds durably for this boot id, if any: the device
    /// replays what it still holds after it.
    pub last_acked: Option<Seq>,
    /// The gateway's clock, milliseconds since the Unix epoch.
    pub server_time_ms: u64,
    /// The largest frame (header included) the gateway accepts.
    pub max_frame: u16,
}

/// All telemetry of this boot id up to and including `seq` is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
pub struct Ack {
    /// The highest seq now durable.
    pub seq: Seq,
}

/// A command for the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, MaxSize)]
pub struct Command<'a> {
    /// Unique per device; a device that sees an id again re-sends its result instead of
    /// running the command twice.
    pub id: CommandId,
    /// What to do (`reboot`, `set_interval` ...).
    #[serde(borrow)]
    pub name: Name<'a>,
    /// Arguments (may be empty).
    #[serde(borrow)]
    pub args: Readings<'a>,
    /// Milliseconds the command stays valid from the moment the device receives it; a
    /// device that cannot run it in time answers `Expired`.
    pub ttl_ms: u32,
}

/// Changes to the desired state document (version 2, PROTOCOL.md §5.3).
///
/// `base` 0 means the whole document: settings not listed are unset. Otherwise the
/// changes apply on top of document version `base`, which is what the device last
/// reported or was last sent; a device holding another version ignores the message
/// and reports its own version, and the gateway answers with the whole document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, MaxSize)]
pub struct Desired<'a> {
    /// The document version after these changes (at least 1).
    pub version: u32,
    /// The version the changes apply to; 0: this is the whole document.
    pub base: u32,
    /// What changed (0 to 16).
    #[serde(borrow)]
    pub changes: Changes<'a>,
}

/// One change of a desired setting.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, MaxSize)]
pub enum Change<'a> {
    /// `0`: the setting now has this value.
    #[serde(borrow)]
    Set(Reading<'a>),
    /// `1`: the setting is no longer desired (the device goes back to its default).
    #[serde(borrow)]
    Unset(Name<'a>),
}

impl<'a> Change<'a> {
    /// The setting's name.
    pub fn name(&self) -> Name<'a> {
        match self {
            Change::Set(r) => r.name,
            Change::Unset(n) => *n,
        }
    }
}

/// Up to [`MAX_READINGS`] changes: a desired document holds at most that many
/// settings, so the whole document always fits one message.
pub type Changes<'a> = heapless::Vec<Change<'a>, MAX_READINGS>;

/// A firmware image for the device (version 3, PROTOCOL.md §5.4), sent after `Welcome`
/// while the device is part of a rollout. The device answers with a
/// [`FirmwareRequest`] (from 0, or from what it holds of the same `id`) or a
/// [`FirmwareStatus`] that declines it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, MaxSize)]
pub struct FirmwareOffer<'a> {
    /// The transfer's id.
    pub id: FirmwareId,
    /// The image's firmware version, as the device will say it in `Hello`.
    #[serde(borrow)]
    pub version: Text<'a, MAX_FIRMWARE_LEN>,
    /// The image's length in bytes.
    pub size: u32,
    /// The image's SHA-256.
    pub sha256: Fixed<32>,
    /// The release key's ECDSA P-256 signature (`r‖s`) of the manifest: the magic
    /// `"iot-gateway firmware\0"`, the version's length and bytes, the size (big-endian
    /// `u32`) and the SHA-256.
    pub signature: Fixed<64>,
}

/// A piece of an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, MaxSize)]
pub struct FirmwareChunk<'a> {
    /// The offer's id.
    pub id: FirmwareId,
    /// Where `data` starts in the image.
    pub offset: u32,
    /// The bytes; empty if `offset` is at or past the end.
    #[serde(borrow)]
    pub data: Blob<'a, MAX_CHUNK_LEN>,
}

/// An offer withdrawn (its rollout was cancelled or stopped, or the device asked for an
/// id the gateway does not offer it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
pub struct FirmwareCancel {
    /// The offer's id.
    pub id: FirmwareId,
}

/// Answers a [`Ping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
pub struct Pong {
    /// The ping's nonce.
    pub nonce: u32,
}

/// The gateway is closing the session; the device should wait `retry_after_s` seconds
/// (plus jitter) before it reconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
pub struct Goodbye {
    /// Why.
    pub reason: GoodbyeReason,
    /// Seconds to wait before reconnecting; 0 means "whenever you like".
    pub retry_after_s: u16,
}

/// Why the gateway closes a session.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
#[non_exhaustive]
pub enum GoodbyeReason {
    /// `0`: the gateway is shutting down or restarting.
    Shutdown,
    /// `1`: the gateway has too many connections or too much work.
    Overload,
    /// `2`: the same device connected again; this older session is replaced.
    Replaced,
    /// `3`: nothing arrived for 3 heartbeat intervals.
    IdleTimeout,
    /// `4`: the device broke the protocol (bad frame, bad message, wrong order).
    ProtocolViolation,
    /// `5`: the gateway does not speak the version in `Hello`.
    UnsupportedVersion,
    /// `6`: the device's certificate has been revoked. Do not retry.
    Revoked,
    /// `7`: the gateway failed internally (storage). Retry later.
    ServerError,
}

impl GoodbyeReason {
    /// A short lowercase name for logs and metrics.
    pub const fn as_str(&self) -> &'static str {
        match self {
            GoodbyeReason::Shutdown => "shutdown",
            GoodbyeReason::Overload => "overload",
            GoodbyeReason::Replaced => "replaced",
            GoodbyeReason::IdleTimeout => "idle_timeout",
            GoodbyeReason::ProtocolViolation => "protocol_violation",
            GoodbyeReason::UnsupportedVersion => "unsupported_version",
            GoodbyeReason::Revoked => "revoked",
            GoodbyeReason::ServerError => "server_error",
        }
    }
}

impl Uplink<'_> {
    /// The first protocol version that has this message.
    pub const fn since_version(&self) -> u8 {
        match self {
            Uplink::Reported(_) => 2,
            Uplink::FirmwareRequest(_) | Uplink::FirmwareStatus(_) => 3,
            _ => 1,
        }
    }
}

impl Downlink<'_> {
    /// The first protocol version that has this message.
    pub const fn since_version(&self) -> u8 {
        match self {
            Downlink::Desired(_) => 2,
            Downlink::FirmwareOffer(_)
            | Downlink::FirmwareChunk(_)
            | Downlink::FirmwareCancel(_) => 3,
            _ => 1,
        }
    }
}

impl CommandStatus {
    /// A short lowercase name for logs, the API and the store.
    pub const fn as_str(&self) -> &'static str {
        match self {
            CommandStatus::Succeeded => "succeeded",
            CommandStatus::Failed => "failed",
            CommandStatus::UnknownCommand => "unknown_command",
            CommandStatus::InvalidArguments => "invalid_arguments",
            CommandStatus::Expired => "expired",
        }
    }
}

/// Lets frame code reject the wrong direction at compile time.
pub trait Message<'a>: Serialize + Deserialize<'a> + MaxSize + sealed::Sealed {}
impl<'a> Message<'a> for Uplink<'a> {}
impl<'a> Message<'a> for Downlink<'a> {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Uplink<'_> {}
    impl Sealed for super::Downlink<'_> {}
}
