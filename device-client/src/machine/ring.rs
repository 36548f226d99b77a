//! The ring of unacknowledged telemetry (PROTOCOL.md §8.2), in caller-sized storage.
//!
//! Each record is stored as its sequence number (4 bytes, little-endian) followed by the
//! whole frame as it goes on the wire (2-byte header + body). Records are encoded
//! straight into the ring by a postcard flavor that wraps around the end, so no scratch
//! buffer is needed, and a replay is a copy.
//!
//! ```text
//!  buf: [.. | seq|len|body.. | seq|len|body.. | free ........ | ..]
//!           ^head (oldest)     ^cursor (next to send)           ^head+used
//! ```

use postcard::ser_flavors::Flavor;
use serde::Serialize;

use crate::proto::{self, HEADER_LEN, Seq};

const SEQ_LEN: usize = 4;
const REC_HEADER: usize = SEQ_LEN + HEADER_LEN;

/// A record could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushError {
    /// Not enough free space.
    Full,
    /// Larger than `max_frame`.
    TooLarge,
}

pub(crate) struct Ring<const N: usize> {
    buf: [u8; N],
    /// Offset of the oldest record.
    head: usize,
    /// Bytes in use.
    used: usize,
    /// Records held.
    len: usize,
    /// Bytes from `head` to the next record to transmit on this connection.
    cursor: usize,
}

impl<const N: usize> Ring<N> {
    pub(crate) const fn new() -> Self {
        Self {
            buf: [0; N],
            head: 0,
            used: 0,
            len: 0,
            cursor: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn used_bytes(&self) -> usize {
        self.used
    }

    /// Encodes `msg` as a frame of at most `max_frame` bytes and appends it with `seq`.
    pub(crate) fn push<T: Serialize>(
        &mut self,
        seq: Seq,
        msg: &T,
        max_frame: usize,
    ) -> Result<(), PushError> {
        let free = N - self.used;
        if free < REC_HEADER + 1 {
            return Err(PushError::Full);
        }
        let start = (self.head + self.used) % N;
        let body_start = (start + REC_HEADER) % N;
        let room = (free - REC_HEADER).min(max_frame.saturating_sub(HEADER_LEN));
        let flavor = RingFlavor {
            buf: &mut self.buf,
            at: body_start,
            written: 0,
            limit: room,
        };
        let body_len = match postcard::serialize_with_flavor(msg, flavor) {
            Ok(n) => n,
            Err(_) if room < free - REC_HEADER => return Err(PushError::TooLarge),
            Err(_) => return Err(PushError::Full),
        };
        let Some(header) = proto::frame_header(body_len) else {
            return Err(PushError::TooLarge);
        };
        let seq_bytes = seq.to_le_bytes();
        self.write_at(start, &seq_bytes);
        self.write_at((start + SEQ_LEN) % N, &header);
        self.used += REC_HEADER + body_len;
        self.len += 1;
        Ok(())
    }

    fn write_at(&mut self, at: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            if let Some(slot) = self.buf.get_mut((at + i) % N) {
                *slot = *b;
            }
        }
    }

    fn read_at(&self, at: usize, out: &mut [u8]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.buf.get((at + i) % N).copied().unwrap_or(0);
        }
    }

    /// (seq, frame length) of the record `offset` bytes after `head`.
    fn record_at(&self, offset: usize) -> (Seq, usize) {
        let mut h = [0u8; REC_HEADER];
        self.read_at((self.head + offset) % N, &mut h);
        let [s0, s1, s2, s3, l0, l1] = h;
        let seq = Seq::from_le_bytes([s0, s1, s2, s3]);
        let frame = HEADER_LEN + usize::from(u16::from_be_bytes([l0, l1]));
        (seq, frame)
    }

    /// Drops every record with a seq at or below `acked`; returns how many.
    pub(crate) fn ack(&mut self, acked: Seq) -> usize {
        let mut dropped = 0;
        while self.len > 0 {
            let (seq, frame) = self.record_at(0);
            if seq > acked {
                break;
            }
            let total = SEQ_LEN + frame;
            self.head = (self.head + total) % N;
            self.used -= total;
            self.cursor = self.cursor.saturating_sub(total);
            self.len -= 1;
            dropped += 1;
        }
        if self.len == 0 {
            // Start again at the front: keeps records contiguous more often.
            self.head = 0;
            self.cursor = 0;
        }
        dropped
    }

    /// Makes every held record due for transmission again (a new connection).
    pub(crate) fn rewind(&mut self) {
        self.cursor = 0;
    }

    /// Whether a record waits for transmission.
    pub(crate) fn has_unsent(&self) -> bool {
        self.cursor < self.used
    }

    /// The next record to transmit, if it fits `out` and `peer_max`; advances the
    /// cursor. `Err(seq)` if the record can never be sent to this peer (too large).
    pub(crate) fn next_unsent(
        &mut self,
        out: &mut [u8],
        peer_max: usize,
    ) -> Option<Result<usize, Seq>> {
        if !self.has_unsent() {
            return None;
        }
        let (seq, frame) = self.record_at(self.cursor);
        self.cursor += SEQ_LEN + frame;
        if frame > peer_max || frame > out.len() {
            return Some(Err(seq));
        }
        let from = (self.head + self.cursor - frame) % N;
        if let Some(dst) = out.get_mut(..frame) {
            self.read_at(from, dst);
        }
        Some(Ok(frame))
    }
}

/// A postcard flavor writing into the ring, wrapping at the end.
struct RingFlavor<'a, const N: usize> {
    buf: &'a mut [u8; N],
    at: usize,
    written: usize,
    limit: usize,
}

impl<const N: usize> Flavor for RingFlavor<'_, N> {
    type Output = usize;

    // Out of line: inlined at every write site of the serializer it costs ~0.5 KB of
    // flash for no measurable speed on a microcontroller.
    #[inline(never)]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        if self.written >= self.limit {
            return Err(postcard::Error::SerializeBufferFull);
        }
        if let Some(slot) = self.buf.get_mut((self.at + self.written) % N) {
            *slot = data;
        }
        self.written += 1;
        Ok(())
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Ping, Uplink};

    fn ping(n: u32) -> Uplink<'static> {
        Uplink::Ping(Ping { nonce: n })
    }

    #[test]
    fn wraps_around_and_replays_exact_frames() {
        // Each record: 4 (seq) + 2 (header) + 1..=6 (body) bytes.
        let mut ring = Ring::<40>::new();
        let mut out = [0u8; 16];
        for round in 0..20u32 {
            ring.push(round + 1, &ping(0x0fff_ffff - round), 64)
                .unwrap();
            let n = ring.next_unsent(&mut out, 64).unwrap().unwrap();
            let f = proto::split_frame(&out[..n], 64).unwrap().unwrap();
            assert_eq!(
                proto::decode_uplink(f.body).unwrap(),
                ping(0x0fff_ffff - round)
            );
            assert_eq!(ring.ack(round + 1), 1);
            assert_eq!(ring.len(), 0);
        }
    }

    #[test]
    fn full_is_an_error_and_keeps_everything() {
        let mut ring = Ring::<32>::new();
        let mut n = 0;
        while ring.push(n + 1, &ping(n), 64).is_ok() {
            n += 1;
        }
        assert_eq!(ring.push(99, &ping(99), 64), Err(PushError::Full));
        assert_eq!(ring.len(), n as usize);
        // Rewind replays all of them, in order.
        let mut out = [0u8; 16];
        let mut seqs = 0;
        while let Some(Ok(len)) = ring.next_unsent(&mut out, 64) {
            assert!(len > 2);
            seqs += 1;
        }
        assert_eq!(seqs, n);
        ring.rewind();
        assert!(ring.has_unsent());
        ring.ack(1);
        assert_eq!(ring.len(), n as usize - 1);
    }

    #[test]
    fn too_large_for_max_frame() {
        let mut ring = Ring::<64>::new();
        assert_eq!(ring.push(1, &ping(u32::MAX), 4), Err(PushError::TooLarge));
        assert_eq!(ring.len(), 0);
        assert_eq!(ring.used_bytes(), 0);
    }
}
