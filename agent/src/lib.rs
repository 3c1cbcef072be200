//! kata-agent: PID 1 of the pod VM. It mounts the early filesystems, loads the
//! kernel modules the guest image carries, serves the agent API (Kata's
//! `agent.proto` names and meaning) over vsock port 1024, tells the host it is
//! ready by dialing host port 1028, and powers the VM off on `DestroySandbox`.
//!
//! `kata-agent --listen unix:///path` runs the same services on the host (host
//! mode), for fast tests without a VM.

pub mod console;
pub mod guest;
pub mod init;
pub mod rpc;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kata_proto::agent::agent_service_server::AgentServiceServer;
use kata_proto::agent::health_server::HealthServer;
use tokio::io::AsyncWriteExt;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY, VMADDR_CID_HOST};
use tracing::{info, warn};

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
}

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
    let agent = Arc::new(Agent {
        init: cfg.init,
        ..Default::default()
    });
    let router = tonic::transport::Server::builder()
        .add_service(HealthServer::new(HealthService(agent.clone())))
        .add_service(AgentServiceServer::new(AgentRpc(agent.clone())));
    let shutdown = {
        let agent = agent.clone();
        async move {
            agent.shutdown.notified().await;
            // let the DestroySandbox reply leave before the server stops
            tokio::time::sleep(Duration::from_millis(50)).await;
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
                info!(port, "agent API listening on vsock");
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
                router
                    .serve_with_incoming_shutdown(UnixListenerStream::new(l), shutdown)
                    .await?;
                let _ = std::fs::remove_file(path);
            }
        }
        Ok::<(), AgentError>(())
    };
    serve.await
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
                    info!(port, "announced readiness to the host");
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
