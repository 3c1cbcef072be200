//! kata-virtiofsd's library: the policy guard over fuse-backend-rs's
//! passthrough filesystem, the vhost-user-fs device, the sandbox, metrics and
//! the control endpoint. The binary (src/main.rs) wires them; the fuzz target
//! drives [`harness`]. See docs/virtiofsd.md.

pub mod control;
pub mod device;
pub mod fs;
pub mod harness;
#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod lookup_tests;
#[cfg(test)]
mod malformed_tests;
pub mod metrics;
pub mod residency;
pub mod sandbox;
