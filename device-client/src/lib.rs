//! The device side of the IoT gateway's protocol: `no_std`, no allocator, no `unsafe`;
//! the same code runs on a microcontroller and in simulated devices on a laptop.
//!
//! ```text
//!  application ──send_telemetry / complete_command / report_state──► machine::Client
//!              ◄── events, commands, desired settings (App::on_desired, protocol v2),
//!                  firmware offers and chunks (App::on_firmware, protocol v3)
//!  driver::run(client, connector, clock, app, rx, tx)      the only code that awaits
//!    ├─ driver::tokio         tokio-rustls connector, clock          (feature tokio)
//!    └─ driver::embedded_tls  embedded-tls provider + connector      (feature embedded-tls)
//!         └─ x509             the gateway's certificate vs the CA    (feature x509)
//!  machine  sans-IO state machine: ring of unacked telemetry, outbox of results
//!  proto    messages, framing, limits: the one codec (the gateway uses it too)
//!  sim      simulated devices on tokio                               (feature sim)
//!  firmware signed images: SHA-256 as it arrives, the release key's
//!           signature over the manifest; Updater: an offered image into
//!           an embedded-storage NorFlash partition, checked, resumable (feature firmware)
//! ```
//!
//! The crate's README has the details, the buffer sizes and the footprint.
#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "std")]
extern crate std;

#[cfg(feature = "x509")]
mod der;
pub mod driver;
#[cfg(feature = "firmware")]
pub mod firmware;
pub mod layout;
pub mod machine;
pub mod proto;
#[cfg(feature = "sim")]
pub mod sim;
#[cfg(feature = "x509")]
pub mod x509;
