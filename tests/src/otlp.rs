//! An OTLP/gRPC trace receiver for the tests: what Jaeger or the
//! OpenTelemetry Collector would get (the ecosystem's protobuf definitions
//! and tonic service from `opentelemetry-proto`), kept in memory as the
//! JSON records `kata-ctl trace report` reads.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kata_proto::trace::otlp::records;
use kata_proto::trace::wire::Record;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Clone, Default)]
struct Store(Arc<Mutex<Vec<Record>>>);

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let recs = records(req.get_ref());
        self.0.lock().unwrap().extend(recs);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A receiver on a loopback port, stopped on drop.
pub struct Receiver {
    addr: SocketAddr,
    store: Store,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Listens on a free loopback port.
    pub fn start() -> Receiver {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let store = Store::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let svc = store.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(std_listener).unwrap();
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
                let _ = tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(svc))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        Receiver {
            addr,
            store,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Record> {
        self.store.0.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the spans received, at most `timeout`;
    /// returns them either way.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&[Record]) -> bool) -> Vec<Record> {
        let t0 = Instant::now();
        loop {
            let spans = self.spans();
            if done(&spans) || t0.elapsed() > timeout {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The spans as JSON lines.
pub fn jsonl(spans: &[Record]) -> String {
    spans
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect()
}
