//! kata-proto: everything the kata-rs programs share.
//!
//! * [`agent`] and [`launcher`]: the internal gRPC APIs, generated at build time
//!   from `protos/*.proto` (tonic + prost, compiled by protox: no protoc needed);
//! * [`dialer`]: the one way to reach a guest port (AF_VSOCK, hybrid vsock) or a
//!   host-mode agent (unix socket), also as a tonic channel;
//! * [`config`], [`paths`], [`logging`]: configuration, well-known paths and ports,
//!   and the tracing set-up every program uses;
//! * [`process`]: telling one host process from a later one with its pid.

pub mod boot_slots;
pub mod cgroups;
pub mod config;
pub mod console;
pub mod dialer;
pub mod host;
pub mod http;
pub mod ids;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod paths;
pub mod process;
pub mod residency;
pub mod stdio;
pub mod tap;
pub mod trace;

/// The agent API (Kata's agent.proto names and meaning).
#[allow(clippy::all, missing_docs, clippy::undocumented_unsafe_blocks)]
pub mod agent {
    tonic::include_proto!("kata.agent.v1");
}

/// The VMM launcher API.
#[allow(clippy::all, missing_docs, clippy::undocumented_unsafe_blocks)]
pub mod launcher {
    tonic::include_proto!("kata.launcher.v1");
}

/// kata-virtiofsd's control API.
#[allow(clippy::all, missing_docs, clippy::undocumented_unsafe_blocks)]
pub mod virtiofsd {
    tonic::include_proto!("kata.virtiofsd.v1");
}

/// The agent's span stream to kata-trace-forwarder (protos/trace.proto; see
/// [`trace::wire`]).
#[allow(clippy::all, missing_docs)]
pub mod tracepb {
    tonic::include_proto!("kata.trace.v1");
}

/// kata-netmon's API (protos/netmon.proto).
#[allow(clippy::all, missing_docs, clippy::undocumented_unsafe_blocks)]
pub mod netmon {
    include!(concat!(env!("OUT_DIR"), "/netmon/kata.netmon.v1.rs"));
}

/// A one-thread runtime (I/O and time) for a side endpoint of a data-plane
/// daemon, e.g. kata-virtiofsd's control socket: its own thread, no workers.
pub fn runtime_current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Version of the kata-rs programs, reported by the agent and the tools.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The async runtime every kata-rs program runs on: two worker threads (these
/// programs are small; a pod must not cost a thread per host CPU), I/O and time.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Waits until a helper process prints `READY` as its first stdout line (how
/// kata-vmm-launcher and kata-virtiofsd say they serve); an error if it says
/// something else, closes stdout or is silent for `timeout`.
pub async fn wait_ready_line<R>(out: R, timeout: std::time::Duration) -> Result<(), String>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(out).lines();
    match tokio::time::timeout(timeout, lines.next_line()).await {
        Ok(Ok(Some(l))) if l.trim() == "READY" => Ok(()),
        Ok(Ok(Some(l))) => Err(format!("printed {l:?} instead of READY")),
        Ok(Ok(None)) => Err("exited before it was ready".into()),
        Ok(Err(e)) => Err(format!("reading its stdout: {e}")),
        Err(_) => Err(format!("not ready within {timeout:?}")),
    }
}
