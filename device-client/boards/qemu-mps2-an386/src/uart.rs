//! UART0 of the mps2-an386: an ARM CMSDK APB UART at 0x4000_4000, as an
//! `embedded-io-async` byte stream. Under QEMU with `-serial tcp:HOST:PORT` its byte
//! stream *is* a TCP connection to the gateway.
//!
//! Registers: DATA +0x00, STATE +0x04 (bit 0 TX full, bit 1 RX full), CTRL +0x08 (bit 0
//! TX enable, bit 1 RX enable), BAUDDIV +0x10 (at least 16). One byte of buffering each
//! way; QEMU holds the socket back while RX is full, so no byte is lost.

use core::convert::Infallible;
use core::future::poll_fn;
use core::ptr::{read_volatile, write_volatile};
use core::task::Poll;

use device_client::driver::Clock;
use device_client::driver::embedded_tls::Transport;
use device_client::machine::Millis;
use embedded_io_async::{ErrorType, Read, Write};

use crate::clock::SysTickClock;

const BASE: usize = 0x4000_4000;
const DATA: *mut u32 = BASE as *mut u32;
const STATE: *mut u32 = (BASE + 0x04) as *mut u32;
const CTRL: *mut u32 = (BASE + 0x08) as *mut u32;
const BAUDDIV: *mut u32 = (BASE + 0x10) as *mut u32;

const TX_FULL: u32 = 1 << 0;
const RX_FULL: u32 = 1 << 1;
const TX_ENABLE: u32 = 1 << 0;
const RX_ENABLE: u32 = 1 << 1;

/// UART0. A handle to memory-mapped registers, so it is `Copy`: embedded-tls's reader
/// and writer halves each hold one, one only reads and the other only writes.
#[derive(Debug, Clone, Copy)]
pub struct Uart(());

impl Uart {
    /// Enables transmit and receive.
    pub fn init() -> Self {
        // SAFETY: UART0's registers exist on this board at these addresses; only this
        // module touches them.
        unsafe {
            write_volatile(BAUDDIV, 16);
            write_volatile(CTRL, TX_ENABLE | RX_ENABLE);
        }
        Uart(())
    }

    fn state() -> u32 {
        // SAFETY: as in `init`; reading STATE has no side effect.
        unsafe { read_volatile(STATE) }
    }

    /// The received byte, if there is one.
    fn try_read_byte() -> Option<u8> {
        if Self::state() & RX_FULL == 0 {
            return None;
        }
        // SAFETY: as in `init`; reading DATA takes the byte and frees the receiver.
        Some(unsafe { read_volatile(DATA) } as u8)
    }
}

impl ErrorType for Uart {
    type Error = Infallible;
}

impl Read for Uart {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Infallible> {
        let Some(first) = buf.first_mut() else {
            return Ok(0);
        };
        // The executor polls again without a wake-up (main.rs), so no waker is kept.
        *first = poll_fn(|_| match Uart::try_read_byte() {
            Some(b) => Poll::Ready(b),
            None => Poll::Pending,
        })
        .await;
        let mut n = 1;
        // Whatever else has already arrived, without waiting.
        while let Some(slot) = buf.get_mut(n) {
            let Some(b) = Uart::try_read_byte() else {
                break;
            };
            *slot = b;
            n += 1;
        }
        Ok(n)
    }
}

impl Write for Uart {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Infallible> {
        for &b in buf {
            poll_fn(|_| {
                if Uart::state() & TX_FULL == 0 {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
            // SAFETY: as in `init`; the transmitter has room.
            unsafe { write_volatile(DATA, u32::from(b)) };
        }
        Ok(buf.len())
    }

    async fn flush(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
}

/// The line must stay quiet this long before a new connection starts on it.
const QUIET_MS: Millis = 50;

/// How long to wait after draining the remains of an earlier connection. Under QEMU
/// the line is a TCP connection: QEMU stops reading its socket while the UART holds an
/// unread byte, so it only sees the gateway's close once the remains are drained, and
/// dials again one second later (`-serial tcp:...,reconnect=1`). Bytes sent before
/// that are lost. A modem on a real serial line has a signal (DCD) or a reply for this.
const LINK_RESET_MS: Millis = 1_500;

/// UART0 as the transport under TLS. A serial line has no connections: "opening" it
/// discards whatever an earlier connection left on it (the gateway's last records after
/// a `Goodbye`) until it has been quiet for [`QUIET_MS`], and then, if there was
/// something to discard, waits [`LINK_RESET_MS`] for the line to be connected again.
pub struct UartLink<'c> {
    uart: Uart,
    clock: &'c SysTickClock,
}

impl<'c> UartLink<'c> {
    /// The link over `uart`, timed by `clock`.
    pub fn new(uart: Uart, clock: &'c SysTickClock) -> Self {
        Self { uart, clock }
    }
}

impl Transport for UartLink<'_> {
    type Error = Infallible;
    type Stream = Uart;

    async fn open(&mut self) -> Result<Uart, Infallible> {
        let mut quiet_since = self.clock.now();
        let mut drained = false;
        poll_fn(|_| {
            while Uart::try_read_byte().is_some() {
                drained = true;
                quiet_since = self.clock.now();
            }
            if self.clock.now() >= quiet_since + QUIET_MS {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        if drained {
            self.clock
                .sleep_until(self.clock.now() + LINK_RESET_MS)
                .await;
        }
        Ok(self.uart)
    }
}
