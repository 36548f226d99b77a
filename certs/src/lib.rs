//! PKI for the gateway (work in progress).
