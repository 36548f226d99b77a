//! The pair cases of the firmware transfer (protocol version 3, PROTOCOL.md §5.4,
//! §8.7): the real client and the real gateway machine, the rollout logic between.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use super::*;
use crate::firmware::Image;
use crate::firmware::rollout::DeviceState;
use proto::FirmwareOutcome;

const ROLLOUT: i64 = 7;

/// An image of `len` bytes (not all alike, so a misplaced chunk changes the hash).
fn image(len: usize) -> Arc<Image> {
    let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let mut h = device_client::firmware::ImageHasher::new();
    h.update(&bytes);
    Arc::new(Image {
        id: 1,
        version: "fw-2".into(),
        sha256: h.finish().sha256,
        signature: [0; 64],
        bytes: bytes.into(),
    })
}

impl Pair {
    /// A rollout of `img` to this device alone.
    fn rollout(&mut self, img: Arc<Image>) {
        let fx = self.rollouts.create(
            ROLLOUT,
            img,
            &[DEVICE.to_string()],
            crate::firmware::Settings::new(1.0, 1),
            self.now().wall_ms,
            |_| self.link.is_some(),
        );
        self.firmware_effects(fx);
        self.pump();
    }

    fn fw_state(&self) -> DeviceState {
        self.rollouts.view(ROLLOUT, true).unwrap().devices.unwrap()[0].state
    }
}

/// An online device is offered the image, fetches it a chunk at a time within its
/// frame limit, verifies it and says so; it restarts into it and the gateway counts
/// it installed.
#[test]
fn an_image_reaches_an_online_device_and_is_installed_after_its_restart() {
    let mut p = Pair::new();
    p.connect();
    assert!(matches!(p.events[0], Event::Connected { version: 3, .. }));
    let img = image(5_000);
    p.rollout(img.clone());
    assert_eq!(p.fw.data, &img.bytes[..], "the whole image arrived");
    assert_eq!(
        p.fw.outcomes,
        vec![(ROLLOUT as u32, FirmwareOutcome::Verified)]
    );
    // 512-byte frames: 497 bytes a chunk, so 11 chunks, each asked for once.
    assert_eq!(p.fw.chunks.len(), 11);
    assert_eq!(p.fw.chunks[1], 497);
    assert_eq!(p.fw_state(), DeviceState::Verified);
    assert_eq!(p.downlink_log.first(), Some(&"offer"));

    // The restart: a new boot of firmware "fw-2".
    p.dev = Client::new(Config::new(0xb008, "fw-2"));
    p.connect();
    assert_eq!(p.fw_state(), DeviceState::Installed);
    assert_eq!(
        p.rollouts.view(ROLLOUT, false).unwrap().state,
        crate::firmware::rollout::RolloutState::Completed
    );
}

/// A transfer cut by a reconnect resumes where the device is: the gateway offers
/// again, and the device asks from the offset it holds; no byte is sent twice except
/// the chunk in flight when the link broke.
#[test]
fn a_transfer_cut_by_a_reconnect_resumes_from_the_device_offset() {
    let mut p = Pair::new();
    p.connect();
    // The link breaks after the device's third request is on the wire (the gateway
    // never reads the rest).
    let img = image(4_000);
    let fx = p.rollouts.create(
        ROLLOUT,
        img.clone(),
        &[DEVICE.into()],
        crate::firmware::Settings::new(1.0, 1),
        0,
        |_| true,
    );
    p.firmware_effects(fx);
    let request = 12; // FirmwareRequest frames are 9 to 12 bytes
    p.pump_limited(request * 3);
    let held = p.fw.data.len();
    assert!(held > 0 && held < 4_000, "cut mid-transfer ({held} bytes)");
    assert_eq!(p.fw_state(), DeviceState::Downloading);

    p.connect();
    assert_eq!(p.fw.data, &img.bytes[..]);
    let mut offsets = p.fw.chunks.clone();
    offsets.dedup();
    assert_eq!(offsets, p.fw.chunks, "no chunk was received twice");
    assert_eq!(p.fw.chunks[0], 0);
    assert_eq!(
        p.firmware.iter().filter(|m| m.starts_with("Offer")).count(),
        2,
        "offered once per session"
    );
    assert_eq!(p.fw_state(), DeviceState::Verified);
}

/// Telemetry and commands are not held up by a transfer: the device asks for one
/// chunk at a time, so acks and commands go out between chunks.
#[test]
fn a_transfer_never_holds_up_acks_or_commands() {
    let mut p = Pair::new();
    p.connect();
    p.fw.request_len = 64; // many small chunks
    let fx = p.rollouts.create(
        ROLLOUT,
        image(3_000),
        &[DEVICE.into()],
        crate::firmware::Settings::new(1.0, 1),
        0,
        |_| true,
    );
    p.firmware_effects(fx);
    // Before any byte moves: telemetry and a command wait beside the transfer.
    p.send(3);
    let cmd = p.enqueue("blink");
    p.send_commands(false);
    p.pump();
    assert_eq!(p.stored(), vec![1, 2, 3]);
    assert_eq!(p.dev.unacked().records, 0, "every record acked");
    assert_eq!(p.commands.len(), 1);
    let at = p.downlink_log.iter().position(|k| *k == "command").unwrap();
    let chunks_before = p.downlink_log[..at]
        .iter()
        .filter(|k| **k == "chunk")
        .count();
    assert!(
        chunks_before <= 1,
        "the command waited behind {chunks_before} chunks"
    );
    assert_eq!(p.fw.chunks.len(), 3_000 / 64 + 1);
    let _ = cmd;
}

/// A cancelled rollout withdraws the offer: the device drops what it had and asks no
/// more; a request for a transfer the gateway does not serve is answered with a
/// cancel too.
#[test]
fn a_cancel_withdraws_the_transfer() {
    let mut p = Pair::new();
    p.connect();
    // The device takes three chunks, then is busy elsewhere.
    p.fw.stop_after = Some(3);
    let fx = p.rollouts.create(
        ROLLOUT,
        image(4_000),
        &[DEVICE.into()],
        crate::firmware::Settings::new(1.0, 1),
        0,
        |_| true,
    );
    p.firmware_effects(fx);
    p.pump();
    assert_eq!(p.fw.chunks.len(), 3);
    let fx = p.rollouts.cancel(ROLLOUT, 1).unwrap();
    p.firmware_effects(fx);
    p.pump();
    assert!(p.firmware.last().unwrap().starts_with("Cancel"));
    assert!(p.fw.offer.is_none() && p.fw.data.is_empty());
    assert_eq!(p.fw_state(), DeviceState::Cancelled);
    // A stray request for it now: answered with a cancel, nothing else.
    p.dev.request_firmware(ROLLOUT as u32, 0, 100);
    let n = p.firmware.len();
    p.pump();
    assert_eq!(p.firmware.len(), n + 1);
    assert!(p.firmware.last().unwrap().starts_with("Cancel"));
}

/// A device of protocol version 2 cannot take an image: it is never offered one, and
/// the rollout counts it failed with the reason.
#[test]
fn a_version_2_device_is_not_offered_firmware() {
    let mut p = Pair::new().gateway_version(2);
    p.connect();
    assert!(matches!(p.events[0], Event::Connected { version: 2, .. }));
    p.rollouts.create(
        ROLLOUT,
        image(100),
        &[DEVICE.into()],
        crate::firmware::Settings::new(1.0, 1),
        0,
        |_| false,
    );
    // Its next session says which version it speaks.
    p.dev.handle_closed(p.t);
    p.device_closed();
    p.connect();
    assert!(p.firmware.is_empty());
    let d = &p.rollouts.view(ROLLOUT, true).unwrap().devices.unwrap()[0];
    assert_eq!(d.state, DeviceState::Failed);
    assert!(d.reason.as_deref().unwrap().contains("version 2"));
}
