//! The IoT device gateway (work in progress).
