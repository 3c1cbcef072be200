//! containerd-shim-kata-v2: containerd's shim v2 task API over one pod VM.
//!
//! containerd starts the binary once per pod (`start`); the serving process
//! owns the pod: it starts kata-virtiofsd and kata-vmm-launcher from the
//! sandbox directory (`/run/kata/<sandbox id>/`), talks to the agent in the
//! guest, joins containerd's FIFOs to the agent's stdio streams and
//! publishes the task events. `delete` cleans a pod whose shim died.

pub mod agent;
pub mod cgroups;
pub mod error;
pub mod guest_events;
pub mod io;
pub mod monitor;
pub mod mounts;
pub mod network;
pub mod options;
pub mod pod;
pub mod resize;
pub mod service;
pub mod shim;
pub mod spec;
pub mod stats;

/// containerd's task API types and the ttrpc context, for tests that drive
/// [`service::Service`] directly.
pub use containerd_shim::protos::shim_async::Task;
pub use containerd_shim::{api, protos};
