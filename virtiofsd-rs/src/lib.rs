//! kata-virtiofsd's library: serves a pod's shared directory to its guest as
//! virtio-fs (a vhost-user-fs backend), or mounts it on the host through
//! /dev/fuse with the same filesystem core. [`run`] takes a typed
//! [`config::Config`] (src/main.rs only parses the command line into one);
//! [`supervisor`] is the process started, [`server`] the sandboxed one it
//! forks; [`fs`] is the policy guard over fuse-backend-rs's passthrough
//! filesystem, [`device`] the vhost-user-fs device, [`sandbox`] the server's
//! confinement; [`metrics`] and [`control`] the control endpoint; the fuzz
//! target drives [`harness`]. See docs/virtiofsd.md.

pub mod config;
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
pub mod sandbox;
pub mod server;
pub mod supervisor;

pub use config::Config;
pub use supervisor::run;
