//! The control endpoint: `virtiofsd.proto`'s Status and Metrics over gRPC on a
//! unix socket, served by a small tokio runtime on its own thread while the
//! FUSE work runs on the vhost-user (or /dev/fuse) threads.

use std::os::unix::net::UnixListener as StdUnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kata_proto::virtiofsd::virtiofsd_server::{Virtiofsd, VirtiofsdServer};
use kata_proto::virtiofsd::{MetricsResponse, StatusResponse};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;

/// What Status reports.
pub struct State {
    /// The sandbox id (may be empty).
    pub sandbox_id: String,
    /// The shared directory, as the host sees it.
    pub shared_dir: String,
    /// "none", "auto" or "always".
    pub cache: String,
    /// Read-only share.
    pub readonly: bool,
    /// "vhost-user" or "fuse".
    pub transport: &'static str,
    /// A frontend is connected (vhost-user) / the mount is up (fuse).
    pub connected: AtomicBool,
    /// When the daemon started.
    pub started: Instant,
    /// The counters.
    pub metrics: Arc<Metrics>,
}

struct Service(Arc<State>);

#[tonic::async_trait]
impl Virtiofsd for Service {
    async fn status(&self, _: Request<()>) -> Result<Response<StatusResponse>, Status> {
        let s = &self.0;
        Ok(Response::new(StatusResponse {
            version: kata_proto::VERSION.to_string(),
            sandbox_id: s.sandbox_id.clone(),
            shared_dir: s.shared_dir.clone(),
            cache: s.cache.clone(),
            readonly: s.readonly,
            connected: s.connected.load(Ordering::Relaxed),
            transport: s.transport.to_string(),
            uptime_ms: s.started.elapsed().as_millis() as u64,
        }))
    }

    async fn metrics(&self, _: Request<()>) -> Result<Response<MetricsResponse>, Status> {
        Ok(Response::new(self.0.metrics.snapshot()))
    }
}

/// Serves the endpoint on `listener` (bound, non-blocking) from a new thread
/// with its own runtime. Runs until the process exits.
pub fn spawn(listener: StdUnixListener, state: Arc<State>) -> anyhow::Result<()> {
    let rt = kata_proto::runtime_current_thread()?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("control socket: {e}");
                        return;
                    }
                };
                let res = tonic::transport::Server::builder()
                    .add_service(VirtiofsdServer::new(Service(state)))
                    .serve_with_incoming(UnixListenerStream::new(listener))
                    .await;
                if let Err(e) = res {
                    tracing::error!("control endpoint stopped: {e}");
                }
            })
        })?;
    Ok(())
}
