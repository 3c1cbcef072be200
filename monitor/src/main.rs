//! kata-monitor: one Prometheus endpoint for every kata-rs pod of the node
//! (Kata's kata-monitor, `--listen 127.0.0.1:8090` by default).
//!
//! Pods are found in the runtime directory (/run/kata): each live pod's shim
//! serves its management socket `<dir>/<id>/shim-monitor.sock`. The directory
//! is read at every request, so a monitor started before the pods, or
//! restarted while they run, finds them all; a socket nothing listens on (a
//! killed shim's) is skipped.
//!
//! - `GET /metrics`: every pod's metrics, each series labelled `sandbox_id`,
//!   scraped concurrently with a deadline per pod (a hung shim costs its own
//!   part only and is counted), plus kata-monitor's own;
//! - `GET /sandboxes`: the live pods, one per line (`?format=json`: a JSON list);
//! - `GET /agent-url?sandbox=ID`: that pod's agent address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hyper::{Request, StatusCode};
use kata_proto::http::{self, get_unix, reply, GetError};
use kata_proto::metrics::{self as km, Metrics};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::{info, warn};

/// The management socket's name in a pod's directory.
const SOCKET: &str = kata_proto::paths::SHIM_MONITOR_SOCKET;

/// Bucket bounds (milliseconds) of the scrape duration histogram.
const SCRAPE_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 3000.0,
];

/// kata-monitor: the metrics of every kata-rs pod of this node in one
/// Prometheus endpoint.
#[derive(Debug, Parser)]
#[command(version = kata_proto::VERSION, after_help = AFTER_HELP)]
struct Args {
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// The runtime directory holding one directory per pod (default:
    /// $KATA_RUN_DIR, else /run/kata).
    #[arg(long, value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// Seconds one pod's shim gets to answer a scrape.
    #[arg(long, value_name = "SECS", default_value_t = 3.0)]
    scrape_timeout: f64,
}

const AFTER_HELP: &str = "Endpoints:
  GET /metrics                  every pod's metrics (label sandbox_id) and kata-monitor's own
  GET /sandboxes[?format=json]  the pods whose shim answers, one per line or as JSON
  GET /agent-url?sandbox=ID     the agent address of pod ID (for kata-ctl agent --addr)

Logs: KATA_LOG (level), KATA_LOG_FORMAT=json.";

struct Monitor {
    dir: PathBuf,
    timeout: Duration,
    own: PrometheusHandle,
}

/// Most bytes of one pod's metrics.
const MAX_POD_METRICS: usize = km::MAX_TEXT;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    kata_proto::logging::init("kata-monitor", None);
    if !(args.scrape_timeout > 0.0 && args.scrape_timeout <= 60.0) {
        anyhow::bail!(
            "--scrape-timeout {}: give seconds between 0 and 60",
            args.scrape_timeout
        );
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets(SCRAPE_BUCKETS)?
        .build_recorder();
    let own = recorder.handle();
    metrics::set_global_recorder(recorder)?;
    let dir = args.runtime_dir.unwrap_or_else(kata_proto::paths::run_dir);
    let m = Arc::new(Monitor {
        dir,
        timeout: Duration::from_secs_f64(args.scrape_timeout),
        own,
    });
    // one thread: the scrapes are I/O bound, and one malloc arena stays small
    let rt = kata_proto::runtime_current_thread()?;
    rt.block_on(serve(args.listen, m, kata_proto::residency::image_range()))
}

async fn serve(
    addr: SocketAddr,
    m: Arc<Monitor>,
    image: Option<std::ops::Range<usize>>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {addr}: {e}"))?;
    info!(%addr, dir = %m.dir.display(), "serving /metrics, /sandboxes, /agent-url");
    if let Some(r) = image {
        kata_proto::residency::drop_image_pages(&r);
    }
    http::serve(
        || async { listener.accept().await.map(|(s, _)| s) },
        move |req| {
            let m = m.clone();
            async move { handle(&m, req).await }
        },
        Duration::from_secs(60),
    )
    .await;
    Ok(())
}

fn query<'a>(req: &'a Request<hyper::body::Incoming>, key: &str) -> Option<&'a str> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

async fn handle(m: &Monitor, req: Request<hyper::body::Incoming>) -> http::Reply {
    if req.method() != hyper::Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let text = m.metrics().await.render();
            let r = reply(StatusCode::OK, km::CONTENT_TYPE, text);
            kata_proto::residency::trim_heap();
            r
        }
        "/sandboxes" => {
            let pods = m.live_pods().await;
            if query(&req, "format") == Some("json") {
                reply(
                    StatusCode::OK,
                    "application/json",
                    serde_json::json!(pods).to_string() + "\n",
                )
            } else {
                reply(
                    StatusCode::OK,
                    "text/plain",
                    pods.iter().map(|p| format!("{p}\n")).collect(),
                )
            }
        }
        "/agent-url" => {
            let Some(id) = query(&req, "sandbox") else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "give the pod: /agent-url?sandbox=ID\n".into(),
                );
            };
            if kata_proto::ids::check("sandbox", id).is_err() {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    format!("{id:?} is not a sandbox id\n"),
                );
            }
            match get_unix(&m.dir.join(id).join(SOCKET), "/agent-url", m.timeout, 4096).await {
                Ok(url) => reply(StatusCode::OK, "text/plain", url),
                Err(GetError::Connect(..)) => reply(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    format!("no running kata-rs pod {id} on this node (see /sandboxes)\n"),
                ),
                Err(e) => reply(StatusCode::BAD_GATEWAY, "text/plain", format!("{e}\n")),
            }
        }
        p => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("{p}: no such path (/metrics, /sandboxes, /agent-url?sandbox=ID)\n"),
        ),
    }
}

impl Monitor {
    /// The pod directories with a management socket.
    fn candidates(&self) -> Vec<(String, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return vec![];
        };
        let mut out: Vec<(String, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let id = e.file_name().to_str()?.to_string();
                let sock = e.path().join(SOCKET);
                (kata_proto::ids::check("sandbox", &id).is_ok() && sock.exists())
                    .then_some((id, sock))
            })
            .collect();
        out.sort();
        out
    }

    /// The pods whose shim accepts a connection (a dead shim's stale socket
    /// refuses).
    async fn live_pods(&self) -> Vec<String> {
        let mut out = vec![];
        for (id, sock) in self.candidates() {
            if alive(&sock).await {
                out.push(id);
            }
        }
        out
    }

    async fn metrics(&self) -> Metrics {
        let t = Instant::now();
        let pods = self.candidates();
        let scrapes = pods.iter().map(|(id, sock)| async move {
            let r = get_unix(sock, "/metrics", self.timeout, MAX_POD_METRICS).await;
            (id.clone(), r)
        });
        let results = futures_util::future::join_all(scrapes).await;
        let mut all = Metrics::new();
        let mut running = 0u32;
        for (id, r) in results {
            let parsed = match r {
                // a stale socket: the shim is gone, not a failed scrape
                Err(GetError::Connect(..)) => continue,
                Err(e) => Err(e.to_string()),
                Ok(text) => Metrics::parse(&text),
            };
            running += 1;
            match parsed {
                Ok(pod) => all.merge(pod, &[("sandbox_id", &id)]),
                Err(e) => {
                    warn!(sandbox = %id, "scrape failed: {e}");
                    metrics::counter!("kata_monitor_scrape_failed_count").increment(1);
                }
            }
        }
        metrics::gauge!("kata_monitor_running_shim_count").set(running);
        metrics::counter!("kata_monitor_scrape_count").increment(1);
        metrics::histogram!("kata_monitor_scrape_durations_histogram_milliseconds")
            .record(t.elapsed().as_secs_f64() * 1e3);
        let mut own = Metrics::parse(&self.own.render()).unwrap_or_default();
        km::add_process(&mut own, "kata_monitor", "self");
        all.merge(own, &[]);
        all
    }
}

async fn alive(sock: &Path) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::UnixStream::connect(sock)
        )
        .await,
        Ok(Ok(_))
    )
}
