//! The pod's management socket (Kata runtime-rs's `shim-monitor.sock`, in
//! the pod directory, root only): HTTP/1.1 over a unix socket.
//!
//! - `GET /metrics`: the pod's metrics, collected when asked: the shim
//!   (process and task API calls), the hypervisor, the launcher,
//!   kata-virtiofsd (process and its FUSE counters), kata-netmon, and the
//!   agent and guest from the agent's GetMetrics;
//! - `GET /agent-url`: the address a host tool dials to reach the agent
//!   (`hvsock:///<dir>/vsock.sock:1024`, what `kata-ctl agent --addr` takes).
//!
//! The guest is not trusted: GetMetrics has a deadline and a size limit, its
//! text is parsed strictly and only `kata_agent_*` and `kata_guest_*`
//! families are kept; a failure costs the guest part of the scrape only and
//! is counted (`kata_shim_agent_metrics_failures_total{reason}`).

use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use hyper::{Request, StatusCode};
use kata_proto::http::{self, reply};
use kata_proto::metrics::{self as km, Metrics};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::UnixListener;
use tracing::{debug, warn};

use crate::pod::Pod;

/// How long the agent gets to answer GetMetrics.
const AGENT_DEADLINE: Duration = Duration::from_secs(1);

/// Bucket bounds (seconds) of the task API call latency histogram.
const CALL_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// This executable's read-only image, read at start-up (see
/// kata_proto::residency).
static IMAGE: OnceLock<Option<std::ops::Range<usize>>> = OnceLock::new();

/// Once the pod is up, the pages only start-up used (configuration parsing,
/// helper launches, the VM's creation) stop counting in the shim's PSS:
/// the image's read-only pages are dropped and fault back in as used, and
/// the heap is trimmed.
pub fn settle() {
    if let Some(Some(image)) = IMAGE.get() {
        kata_proto::residency::drop_image_pages(image);
    }
    kata_proto::residency::trim_heap();
}

/// Installs the shim's metrics recorder (once per process): the task API
/// counters and histogram are kept from then on.
pub fn install_recorder() {
    IMAGE.get_or_init(kata_proto::residency::image_range);
    RECORDER.get_or_init(|| {
        let builder = PrometheusBuilder::new().set_buckets(CALL_BUCKETS).ok()?;
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        match metrics::set_global_recorder(recorder) {
            Ok(()) => Some(handle),
            Err(e) => {
                warn!("metrics recorder: {e}");
                None
            }
        }
    });
}

/// Counts one task API call of `method` that ended with `code` after `took`.
pub fn record_call(method: &'static str, code: &str, took: Duration) {
    metrics::counter!("kata_shim_task_calls_total", "method" => method, "code" => code.to_string())
        .increment(1);
    metrics::histogram!("kata_shim_task_call_duration_seconds", "method" => method)
        .record(took.as_secs_f64());
}

fn recorded() -> Metrics {
    let Some(Some(h)) = RECORDER.get() else {
        return Metrics::new();
    };
    Metrics::parse(&h.render()).unwrap_or_else(|e| {
        warn!("the shim's own metrics do not parse: {e}");
        Metrics::new()
    })
}

/// Serves the management socket of `pod` at `path` until the task is aborted.
pub fn spawn(
    path: std::path::PathBuf,
    pod: Weak<Pod>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    // root only: the agent's address and the pod's figures are the node's
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let listener = Arc::new(listener);
    Ok(tokio::spawn(http::serve(
        move || {
            let l = listener.clone();
            async move { l.accept().await.map(|(s, _)| s) }
        },
        move |req| handle(req, pod.clone()),
        Duration::from_secs(30),
    )))
}

async fn handle(req: Request<hyper::body::Incoming>, pod: Weak<Pod>) -> http::Reply {
    let Some(pod) = pod.upgrade() else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the pod is gone\n".into(),
        );
    };
    if req.method() != hyper::Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            km::CONTENT_TYPE,
            collect(&pod).await.render(),
        ),
        "/agent-url" => reply(
            StatusCode::OK,
            "text/plain",
            format!("{}\n", pod.agent_addr),
        ),
        p => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("{p}: no such path (/metrics, /agent-url)\n"),
        ),
    }
}

/// Everything `/metrics` holds for `pod`, read now.
pub async fn collect(pod: &Arc<Pod>) -> Metrics {
    let mut m = recorded();
    km::add_process(&mut m, "kata_shim", "self");
    for (prefix, pid) in pod.process_pids().await {
        km::add_process(&mut m, prefix, &pid.to_string());
        if prefix == "kata_hypervisor" {
            // its network namespace is the pod's
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/dev")) {
                km::add_netdev(
                    &mut m,
                    "kata_hypervisor_netdev",
                    "Network devices of the pod's network namespace, as the hypervisor sees them.",
                    &text,
                );
            }
        }
    }
    add_virtiofsd(&mut m, &pod.paths.virtiofsd_control()).await;
    m.merge(guest(pod).await, &[]);
    m
}

/// What kata-virtiofsd's control endpoint counts: requests, errors and
/// latency by FUSE opcode, bytes, malformed requests.
async fn add_virtiofsd(m: &mut Metrics, control: &std::path::Path) {
    use kata_proto::virtiofsd::virtiofsd_client::VirtiofsdClient;
    if !control.exists() {
        return;
    }
    let addr = kata_proto::dialer::Address::Unix(control.to_path_buf());
    let work = async {
        let ch = kata_proto::dialer::channel(&addr, AGENT_DEADLINE)
            .await
            .ok()?;
        VirtiofsdClient::new(ch)
            .metrics(())
            .await
            .ok()
            .map(|r| r.into_inner())
    };
    let Ok(Some(r)) = tokio::time::timeout(AGENT_DEADLINE, work).await else {
        return;
    };
    for op in &r.ops {
        let l = [("op", op.op.as_str())];
        m.counter(
            "kata_virtiofsd_requests_total",
            "FUSE requests served, by opcode.",
            &l,
            op.count as f64,
        );
        m.counter(
            "kata_virtiofsd_errors_total",
            "FUSE requests answered with an error, by opcode.",
            &l,
            op.errors as f64,
        );
        let n = op.latency_bounds_us.len();
        let buckets: Vec<(f64, u64)> = op
            .latency_bounds_us
            .iter()
            .zip(&op.latency_counts)
            .map(|(b, c)| (*b as f64 / 1e6, *c))
            .collect();
        let above = op.latency_counts.get(n).copied().unwrap_or(0);
        m.histogram(
            "kata_virtiofsd_request_duration_seconds",
            "Time to serve a FUSE request, by opcode.",
            &l,
            &buckets,
            above,
            op.latency_sum_us as f64 / 1e6,
        );
    }
    m.counter(
        "kata_virtiofsd_read_bytes_total",
        "Bytes read by the guest through virtio-fs.",
        &[],
        r.bytes_read as f64,
    );
    m.counter(
        "kata_virtiofsd_write_bytes_total",
        "Bytes written by the guest through virtio-fs.",
        &[],
        r.bytes_written as f64,
    );
    m.counter(
        "kata_virtiofsd_malformed_total",
        "FUSE requests that could not be decoded.",
        &[],
        r.malformed as f64,
    );
}

/// A guest's GetMetrics text as the shim keeps it: parsed strictly (size,
/// series, names, labels, numbers) and cut to the `kata_agent_*` and
/// `kata_guest_*` families; `true` if the guest sent others (dropped).
fn checked_guest_text(text: &str) -> Result<(Metrics, bool), String> {
    let mut g = Metrics::parse(text)?;
    let before = g.names().count();
    g.retain(|n| n.starts_with("kata_agent_") || n.starts_with("kata_guest_"));
    let foreign = g.names().count() != before;
    Ok((g, foreign))
}

/// The agent's and guest's metrics (GetMetrics), bounded and checked.
async fn guest(pod: &Arc<Pod>) -> Metrics {
    let t = Instant::now();
    let fail = |reason: &'static str| {
        metrics::counter!("kata_shim_agent_metrics_failures_total", "reason" => reason)
            .increment(1);
    };
    let reply = pod
        .agent
        .with_deadline(AGENT_DEADLINE)
        .get_metrics(kata_proto::agent::GetMetricsRequest {})
        .await;
    metrics::histogram!("kata_shim_agent_metrics_duration_seconds")
        .record(t.elapsed().as_secs_f64());
    let text = match reply {
        Ok(r) => r.metrics,
        Err(e) => {
            debug!("GetMetrics: {e}");
            fail(if matches!(e, crate::agent::AgentError::Timeout { .. }) {
                "timeout"
            } else {
                "error"
            });
            return Metrics::new();
        }
    };
    match checked_guest_text(&text) {
        Ok((g, foreign)) => {
            if foreign {
                fail("foreign_family");
            }
            g
        }
        Err(e) => {
            debug!("GetMetrics: {e}");
            fail("malformed");
            Metrics::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_cannot_pose_as_the_host_or_flood_the_scrape() {
        let text =
            "kata_guest_load{item=\"load1\"} 0.5\nkata_shim_fds 99999\nkata_hypervisor_threads 1\n";
        let (m, foreign) = checked_guest_text(text).unwrap();
        assert!(foreign);
        assert_eq!(m.names().collect::<Vec<_>>(), vec!["kata_guest_load"]);
        assert!(checked_guest_text("kata_guest_load{item=\"x} 1").is_err());
        assert!(checked_guest_text("kata_guest_load NaNa").is_err());
        let flood = "kata_guest_x 1\n".repeat(km::MAX_SERIES + 1);
        assert!(checked_guest_text(&flood).is_err());
        let (m, foreign) =
            checked_guest_text("# TYPE kata_agent_fds gauge\nkata_agent_fds 7\n").unwrap();
        assert!(!foreign);
        assert_eq!(m.len(), 1);
    }
}
