//! Device client for the IoT gateway.
#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "std")]
extern crate std;

#[cfg(feature = "x509")]
mod der;
pub mod driver;
pub mod machine;
pub mod proto;
#[cfg(feature = "sim")]
pub mod sim;
#[cfg(feature = "x509")]
pub mod x509;
