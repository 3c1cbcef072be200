//! kata-agent: PID 1 of the pod VM. It mounts the early filesystems, loads the
//! kernel modules the guest image carries, serves the agent API (Kata's
//! `agent.proto` names and meaning) over vsock port 1024, tells the host it is
//! ready by dialing host port 1028, and powers the VM off on `DestroySandbox`.
//!
//! `kata-agent --listen unix:///path --root DIR` runs the same services on the
//! host (host mode), for fast tests without a VM: the stdio port is then the
//! unix socket `<path>_1027`.

/// The OCI runtime-spec types the agent speaks (oci-spec), for its callers.
pub use oci_spec::runtime as oci;

pub mod beneath;
pub mod cgroup;
pub mod childinit;
pub mod console;
pub mod container;
pub mod guest;
pub mod init;
pub mod mounts;
pub mod network;
pub mod policy;
pub mod reaper;
pub mod rpc;
pub mod sandbox;
pub mod seccomp;
pub mod stdio;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kata_proto::agent::agent_service_server::AgentServiceServer;
use kata_proto::agent::health_server::HealthServer;
use kata_proto::dialer::Stream;
use kata_proto::paths::ports;
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::SignalKind;
use tokio::sync::Notify;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY, VMADDR_CID_HOST};
use tracing::{debug, info, warn};

use crate::rpc::{Agent, AgentRpc, HealthService};

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// AF_VSOCK, any CID, this port (the guest).
    Vsock(u32),
    /// A unix socket (host mode).
    Unix(PathBuf),
}

/// What `run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to serve the API.
    pub listen: Listen,
    /// PID 1 of a guest: power off when done.
    pub init: bool,
    /// Host vsock port to dial once listening (guest only).
    pub announce_port: Option<u32>,
    /// The agent's state directory.
    pub root: PathBuf,
    /// The agent policy (built with `agent-policy`: the policy file read at
    /// start-up, and whether to log every decision).
    pub policy: PolicyConfig,
}

/// Where the agent's policy comes from.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// The policy file (default [`policy::DEFAULT_POLICY_FILE`]).
    pub file: PathBuf,
    /// The policy debug log (Kata's AGENT_POLICY_DEBUG): every checked
    /// request's input and decision as one line on stderr.
    pub debug: bool,
}

impl Default for PolicyConfig {
    fn default() -> PolicyConfig {
        PolicyConfig {
            file: policy::DEFAULT_POLICY_FILE.into(),
            debug: false,
        }
    }
}

impl PolicyConfig {
    /// The gate this configuration gives.
    #[cfg(feature = "agent-policy")]
    fn gate(&self) -> policy::Gate {
        policy::Gate::load(&self.file, self.debug)
    }

    /// The gate this configuration gives: without policy support, all allowed.
    #[cfg(not(feature = "agent-policy"))]
    fn gate(&self) -> policy::Gate {
        policy::Gate
    }
}

/// The largest request the agent decodes: room for the largest policy
/// (`SetPolicy`, 8 MiB) and a CopyFile chunk, above tonic's 4 MiB default.
pub const MAX_REQUEST: usize = 16 << 20;

/// The default state directory in the guest.
pub const DEFAULT_ROOT: &str = "/run/kata-agent";

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The listening socket could not be made.
    #[error("cannot listen on {what}: {source}")]
    Listen {
        /// Where.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("agent API server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Serves the agent API until `DestroySandbox` (or a server error).
pub async fn run(cfg: Config) -> Result<(), AgentError> {
    std::fs::create_dir_all(&cfg.root).map_err(|source| AgentError::Listen {
        what: format!("state directory {}", cfg.root.display()),
        source,
    })?;
    let agent = Arc::new(Agent::new(cfg.init, cfg.root.clone(), cfg.policy.gate()));
    let router = tonic::transport::Server::builder()
        .trace_fn(kata_proto::trace::server_span)
        .add_service(HealthServer::new(HealthService(agent.clone())))
        .add_service(
            AgentServiceServer::new(AgentRpc(agent.clone())).max_decoding_message_size(MAX_REQUEST),
        );
    // Set once the server is asked to stop: clients get a few seconds to
    // leave, then the serve loop is dropped.
    let stopping = Arc::new(Notify::new());
    let shutdown = {
        let agent = agent.clone();
        let host_mode = !cfg.init;
        let stopping = stopping.clone();
        async move {
            let _notify = NotifyOnDrop(stopping);
            let mut term = tokio::signal::unix::signal(SignalKind::terminate()).ok();
            tokio::select! {
                _ = agent.shutdown.notified() => {
                    // let the DestroySandbox reply leave before the server stops
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ = async { term.as_mut()?.recv().await }, if host_mode => {
                    info!("SIGTERM: ending every container");
                    agent.destroy_all().await;
                }
            }
        }
    };
    let serve = async {
        match &cfg.listen {
            Listen::Vsock(port) => {
                let l = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, *port)).map_err(
                    |source| AgentError::Listen {
                        what: format!("vsock port {port}"),
                        source,
                    },
                )?;
                info!(
                    port,
                    uptime_ms = crate::init::uptime_ms(),
                    "agent API listening on vsock"
                );
                let io = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, ports::STDIO))
                    .map_err(|source| AgentError::Listen {
                        what: format!("vsock port {}", ports::STDIO),
                        source,
                    })?;
                tokio::spawn(serve_stdio(
                    io.incoming().map(|r| r.map(Stream::Vsock)),
                    agent.clone(),
                ));
                if let Some(p) = cfg.announce_port {
                    tokio::spawn(announce(p));
                }
                router
                    .serve_with_incoming_shutdown(l.incoming(), shutdown)
                    .await?;
            }
            Listen::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let l =
                    tokio::net::UnixListener::bind(path).map_err(|source| AgentError::Listen {
                        what: path.display().to_string(),
                        source,
                    })?;
                info!(path = %path.display(), "agent API listening on a unix socket (host mode)");
                let io_path = kata_proto::paths::hybrid_listener_path(path, ports::STDIO);
                let _ = std::fs::remove_file(&io_path);
                let io = tokio::net::UnixListener::bind(&io_path).map_err(|source| {
                    AgentError::Listen {
                        what: io_path.display().to_string(),
                        source,
                    }
                })?;
                tokio::spawn(serve_stdio(
                    UnixListenerStream::new(io).map(|r| r.map(Stream::Unix)),
                    agent.clone(),
                ));
                router
                    .serve_with_incoming_shutdown(UnixListenerStream::new(l), shutdown)
                    .await?;
                let _ = std::fs::remove_file(path);
                let _ = std::fs::remove_file(&io_path);
            }
        }
        Ok::<(), AgentError>(())
    };
    tokio::select! {
        r = serve => r,
        _ = async {
            stopping.notified().await;
            tokio::time::sleep(GRACE).await;
        } => {
            debug!("clients still connected {GRACE:?} after shutdown; ending anyway");
            Ok(())
        }
    }
}

/// How long clients get to disconnect after the agent was asked to stop.
/// The shim always has a call waiting (GetOOMEvent, and WaitProcess for a
/// live process): those never end by themselves, so every teardown waited
/// the whole grace (a pod's Delete spent 1.1 s in WaitVm, seen in its trace).
/// The DestroySandbox reply has left by then (the shutdown waits 50 ms).
const GRACE: Duration = Duration::from_millis(100);

struct NotifyOnDrop(Arc<Notify>);

impl Drop for NotifyOnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// Serves the stdio port: one task per connection.
async fn serve_stdio(
    mut incoming: impl tokio_stream::Stream<Item = std::io::Result<Stream>> + Unpin,
    agent: Arc<Agent>,
) {
    while let Some(conn) = incoming.next().await {
        match conn {
            Ok(s) => {
                let agent = agent.clone();
                tokio::spawn(stdio::handle(s, move |h| agent.stdio_of(h)));
            }
            Err(e) => {
                warn!(error = %e, "stdio port accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Tells the host the agent listens: a guest-initiated connection to host port
/// `port` carrying one line. The host never polls `CONNECT` during boot.
pub async fn announce(port: u32) {
    let line = format!("READY kata-agent {}\n", kata_proto::VERSION);
    for attempt in 1..=20u32 {
        match VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, port)).await {
            Ok(mut s) => {
                if s.write_all(line.as_bytes()).await.is_ok() {
                    let _ = AsyncWriteExt::shutdown(&mut s).await;
                    info!(
                        port,
                        uptime_ms = crate::init::uptime_ms(),
                        "announced readiness to the host"
                    );
                    return;
                }
            }
            Err(e) if attempt == 20 => {
                warn!(port, error = %e, "could not announce readiness to the host; it will have to poll")
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
    }
}
