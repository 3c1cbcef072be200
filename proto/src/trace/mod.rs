//! Tracing of every kata-rs program: `tracing` spans bridged to OpenTelemetry
//! (tracing-opentelemetry, the OpenTelemetry SDK), exported by a thread of
//! their own so that no request ever waits on a span.
//!
//! * [`layer`] is part of every program's subscriber ([`crate::logging`]); it
//!   records nothing until [`start`] is called, so tracing off costs one
//!   atomic load per span.
//! * [`start`] picks where finished spans go: an OTLP/gRPC collector
//!   ([`Sink::Otlp`], the host programs) or a span stream to
//!   kata-trace-forwarder ([`Sink::Stream`], the guest agent, [`wire`]).
//!   Spans wait in a bounded queue ([`QUEUE`]); when it is full they are
//!   dropped and counted ([`dropped`]).
//! * A trace crosses programs with W3C `traceparent`: [`Propagate`] puts the
//!   current span's in the metadata of every gRPC call a client makes,
//!   [`server_span`] makes each served call a child of it, and
//!   [`child_env`] / [`parent_from_env`] carry it to a helper process.

pub mod otlp;
pub mod wire;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanProcessor};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::dynamic_filter_fn;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::dialer::Address;

/// Spans waiting for the exporter; more are dropped (and counted).
pub const QUEUE: usize = 2048;
/// Most spans in one export.
pub const BATCH: usize = 256;
/// How long the exporter gathers spans before it sends what it has.
pub const BATCH_DELAY: Duration = Duration::from_millis(100);
/// How long a write to the span stream may block before the stream is
/// given up (the spans of that batch are dropped and counted).
pub const STREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The environment variable a helper reads its collector endpoint from
/// (set by [`child_env`]).
pub const ENDPOINT_ENV: &str = "KATA_TRACE_ENDPOINT";
/// The W3C variable carrying the parent span to a child process.
pub const TRACEPARENT_ENV: &str = "TRACEPARENT";

static ENABLED: AtomicBool = AtomicBool::new(false);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static EXPORTED: AtomicU64 = AtomicU64::new(0);
/// Of [`DROPPED`], what a span stream already reported to the forwarder.
static REPORTED: AtomicU64 = AtomicU64::new(0);
static QUEUE_TX: OnceLock<mpsc::Sender<Msg>> = OnceLock::new();
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
static SERVICE: OnceLock<&'static str> = OnceLock::new();
static ENDPOINT: OnceLock<String> = OnceLock::new();

/// Where finished spans go.
#[derive(Debug)]
pub enum Sink {
    /// An OTLP/gRPC collector.
    Otlp(otlp::Exporter),
    /// A kata-rs span stream ([`wire`]) to kata-trace-forwarder: vsock port
    /// 10240 of the host from the guest, a unix socket in host mode.
    Stream(Address),
}

enum Msg {
    Span(Box<wire::Span>),
    Flush(std::sync::mpsc::Sender<()>),
}

/// Whether [`start`] was called.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Spans dropped so far (queue full, export failed, stream down).
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Spans handed to the sink so far.
pub fn exported() -> u64 {
    EXPORTED.load(Ordering::Relaxed)
}

/// The layer of [`crate::logging`]'s subscriber: kata-rs's own spans (targets
/// `kata*`, level info or above) to OpenTelemetry once [`start`] was called,
/// with the warnings and errors logged inside them as span events.
pub fn layer<S>(component: &'static str) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let _ = SERVICE.set(component);
    let provider = PROVIDER.get_or_init(|| {
        SdkTracerProvider::builder()
            .with_span_processor(Forward)
            .build()
    });
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("kata-rs"))
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        // a dynamic filter: its answer changes when tracing starts, so no
        // callsite may cache it
        .with_filter(dynamic_filter_fn(|meta, _| {
            enabled()
                && meta.target().starts_with("kata")
                && if meta.is_span() {
                    *meta.level() <= tracing::Level::INFO
                } else {
                    *meta.level() <= tracing::Level::WARN
                }
        }))
}

/// Starts exporting to `sink`, from a thread of its own. Only the first call
/// counts.
pub fn start(sink: Sink) -> Result<(), String> {
    if QUEUE_TX.get().is_some() {
        return Ok(());
    }
    if let Sink::Otlp(e) = &sink {
        let _ = ENDPOINT.set(e.endpoint().to_string());
    }
    let (tx, rx) = mpsc::channel(QUEUE);
    std::thread::Builder::new()
        .name("kata-trace".into())
        .spawn(move || export_thread(rx, sink))
        .map_err(|e| format!("starting the trace exporter thread: {e}"))?;
    let _ = QUEUE_TX.set(tx);
    ENABLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Starts exporting to the collector named by [`ENDPOINT_ENV`], if set (a
/// helper whose parent traces; [`parent_from_env`] then links its first
/// span to the parent's).
pub fn start_from_env() -> Result<(), String> {
    match std::env::var(ENDPOINT_ENV) {
        Ok(endpoint) if !endpoint.is_empty() => {
            start(Sink::Otlp(otlp::Exporter::new(&endpoint, None)?))
        }
        _ => Ok(()),
    }
}

/// The environment a helper process needs to trace as a child of the
/// current span: empty when tracing is off or the sink is not a collector.
pub fn child_env() -> Vec<(&'static str, String)> {
    let Some(endpoint) = ENDPOINT.get().filter(|_| enabled()) else {
        return Vec::new();
    };
    let mut env = vec![(ENDPOINT_ENV, endpoint.clone())];
    if let Some(tp) = traceparent(&tracing::Span::current()) {
        env.push((TRACEPARENT_ENV, tp));
    }
    env
}

/// Makes `span` a child of the span in [`TRACEPARENT_ENV`], if any.
pub fn parent_from_env(span: &tracing::Span) {
    if let Ok(tp) = std::env::var(TRACEPARENT_ENV) {
        set_parent(span, &tp);
    }
}

static STARTED: OnceLock<SystemTime> = OnceLock::new();

/// Notes when the program started, for [`record_startup`]; first thing in
/// `main`.
pub fn mark_start() {
    let _ = STARTED.set(SystemTime::now());
}

/// Records one span `name` from [`mark_start`] until now, a child of
/// [`TRACEPARENT_ENV`]'s span: the start-up of a helper that cannot trace
/// while it starts (kata-virtiofsd forks, so it starts its exporter thread
/// only afterwards).
pub fn record_startup(name: &'static str) {
    use opentelemetry::trace::{Span as _, Tracer as _};
    let (Some(provider), true) = (PROVIDER.get(), enabled()) else {
        return;
    };
    let tracer = provider.tracer("kata-rs");
    let parent = match std::env::var(TRACEPARENT_ENV) {
        Ok(tp) => {
            let carrier = Carrier(vec![("traceparent".into(), tp)]);
            TraceContextPropagator::new().extract(&carrier)
        }
        Err(_) => opentelemetry::Context::new(),
    };
    let start = STARTED.get().copied().unwrap_or_else(SystemTime::now);
    let mut span = tracer
        .span_builder(name)
        .with_start_time(start)
        .start_with_context(&tracer, &parent);
    span.end();
}

/// Sends the spans finished so far, waiting at most `timeout` (before a
/// program exits).
pub fn flush(timeout: Duration) {
    let Some(tx) = QUEUE_TX.get() else { return };
    let (done, wait) = std::sync::mpsc::channel();
    if tx.try_send(Msg::Flush(done)).is_ok() {
        let _ = wait.recv_timeout(timeout);
    }
}

/// `span`'s W3C traceparent, if it is traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let mut carrier = Carrier::default();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier
        .0
        .into_iter()
        .find(|(k, _)| k == "traceparent")
        .map(|(_, v)| v)
}

/// Makes `span` (not yet entered) a child of the remote span `traceparent`;
/// nothing if that is not a valid traceparent.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if !enabled() {
        return;
    }
    let carrier = Carrier(vec![("traceparent".into(), traceparent.into())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

#[derive(Default)]
struct Carrier(Vec<(String, String)>);

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.into(), value));
    }
}

impl Extractor for Carrier {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// A gRPC client interceptor: the current span's traceparent in the
/// metadata of every call (nothing when tracing is off).
#[derive(Debug, Clone, Copy, Default)]
pub struct Propagate;

impl tonic::service::Interceptor for Propagate {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(tp) = traceparent(&tracing::Span::current()) {
            if let Ok(v) = tp.parse() {
                req.metadata_mut().insert("traceparent", v);
            }
        }
        Ok(req)
    }
}

/// A gRPC channel whose calls carry the traceparent.
pub type Traced =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Propagate>;

/// `channel` with [`Propagate`].
pub fn traced(channel: tonic::transport::Channel) -> Traced {
    tonic::service::interceptor::InterceptedService::new(channel, Propagate)
}

/// The span of one served gRPC call (tonic's `Server::trace_fn`): named
/// after the method, a child of the caller's traceparent when it sent one;
/// no span when tracing is off.
pub fn server_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let path = req.uri().path();
    let method = path.rsplit('/').next().unwrap_or(path);
    let span = tracing::info_span!(
        "rpc",
        otel.name = method,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = method
    );
    if let Some(tp) = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
    {
        set_parent(&span, tp);
    }
    span
}

/// The SDK's span processor: each finished span, converted to the wire
/// form, into the exporter's queue (or counted as dropped).
#[derive(Debug)]
struct Forward;

impl SpanProcessor for Forward {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        let Some(tx) = QUEUE_TX.get() else { return };
        if tx.try_send(Msg::Span(Box::new(to_wire(&span)))).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

/// Now, in Unix nanoseconds (the span times' clock).
pub fn now_unix_nano() -> u64 {
    nanos(SystemTime::now())
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn attributes(kv: &[opentelemetry::KeyValue]) -> Vec<wire::Attribute> {
    use wire::attribute::Value as W;
    kv.iter()
        .take(wire::MAX_ATTRIBUTES)
        .map(|kv| wire::Attribute {
            key: wire::truncate(kv.key.as_str().to_string(), wire::MAX_NAME),
            value: Some(match &kv.value {
                opentelemetry::Value::Bool(b) => W::BoolValue(*b),
                opentelemetry::Value::I64(i) => W::IntValue(*i),
                opentelemetry::Value::F64(f) => W::DoubleValue(*f),
                other => W::StringValue(wire::truncate(other.to_string(), wire::MAX_VALUE)),
            }),
        })
        .collect()
}

/// An SDK span in the wire form, cut to the schema's bounds.
fn to_wire(s: &SpanData) -> wire::Span {
    let cx = &s.span_context;
    let parent = s.parent_span_id.to_bytes();
    wire::Span {
        trace_id: cx.trace_id().to_bytes().to_vec(),
        span_id: cx.span_id().to_bytes().to_vec(),
        parent_span_id: if parent == [0; 8] {
            Vec::new()
        } else {
            parent.to_vec()
        },
        parent_is_remote: s.parent_span_is_remote,
        name: wire::truncate(s.name.to_string(), wire::MAX_NAME),
        kind: match s.span_kind {
            SpanKind::Internal => 1,
            SpanKind::Server => 2,
            SpanKind::Client => 3,
            SpanKind::Producer => 4,
            SpanKind::Consumer => 5,
        },
        start_unix_nano: nanos(s.start_time),
        end_unix_nano: nanos(s.end_time).max(nanos(s.start_time)),
        attributes: attributes(&s.attributes),
        status_code: match s.status {
            Status::Unset => 0,
            Status::Ok => 1,
            Status::Error { .. } => 2,
        },
        status_message: match &s.status {
            Status::Error { description } => {
                wire::truncate(description.to_string(), wire::MAX_VALUE)
            }
            _ => String::new(),
        },
        events: s
            .events
            .iter()
            .take(wire::MAX_EVENTS)
            .map(|e| wire::Event {
                name: wire::truncate(e.name.to_string(), wire::MAX_NAME),
                time_unix_nano: nanos(e.timestamp),
                attributes: attributes(&e.attributes),
            })
            .collect(),
        service: SERVICE.get().copied().unwrap_or("kata-rs").to_string(),
    }
}

/// The exporter thread: batches from the queue to the sink.
fn export_thread(mut rx: mpsc::Receiver<Msg>, sink: Sink) {
    let rt = match crate::runtime_current_thread() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("trace exporter: no runtime: {e}; spans are dropped");
            return;
        }
    };
    rt.block_on(async move {
        let mut out = Output { sink, stream: None };
        let mut batch = Vec::new();
        let mut flushes = Vec::new();
        while let Some(first) = rx.recv().await {
            let deadline = tokio::time::sleep(BATCH_DELAY);
            tokio::pin!(deadline);
            let mut next = Some(first);
            loop {
                match next.take() {
                    Some(Msg::Span(s)) => batch.push(*s),
                    Some(Msg::Flush(done)) => {
                        flushes.push(done);
                        break;
                    }
                    None => {}
                }
                if batch.len() >= BATCH {
                    break;
                }
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) => next = Some(m),
                        None => break,
                    },
                    _ = &mut deadline => break,
                }
            }
            out.send(&mut batch).await;
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
    });
}

struct Output {
    sink: Sink,
    stream: Option<crate::dialer::Stream>,
}

impl Output {
    async fn send(&mut self, batch: &mut Vec<wire::Span>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let sent = match &mut self.sink {
            Sink::Otlp(e) => {
                e.export(batch, crate::logging::sandbox_id().unwrap_or(""))
                    .await
            }
            Sink::Stream(_) => self.send_stream(batch).await,
        };
        batch.clear();
        match sent {
            Ok(()) => {
                EXPORTED.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                DROPPED.fetch_add(n, Ordering::Relaxed);
                crate::warn_limited!(dropped = n, "trace export failed, spans dropped: {e}");
            }
        }
    }

    /// Writes `batch` (taken: the spans move into their frames) to the
    /// stream, dialling it first if it is down.
    async fn send_stream(&mut self, batch: &mut Vec<wire::Span>) -> Result<(), String> {
        let Sink::Stream(addr) = &self.sink else {
            return Err("not a stream sink".into());
        };
        let mut bytes = Vec::new();
        if self.stream.is_none() {
            let s = crate::dialer::dial(addr, Duration::from_secs(1))
                .await
                .map_err(|e| format!("connecting to kata-trace-forwarder: {e}"))?;
            self.stream = Some(s);
            bytes.extend_from_slice(&wire::PREAMBLE);
            let hello = wire::Frame {
                body: Some(wire::frame::Body::Hello(wire::Hello {
                    service: SERVICE.get().copied().unwrap_or("kata-rs").into(),
                    version: crate::VERSION.into(),
                })),
            };
            wire::encode_frame(&hello, &mut bytes).map_err(|e| e.to_string())?;
        }
        // the guest's clock, for the forwarder to line its times up
        let clock = wire::Frame {
            body: Some(wire::frame::Body::Clock(wire::Clock {
                unix_nano: now_unix_nano(),
            })),
        };
        wire::encode_frame(&clock, &mut bytes).map_err(|e| e.to_string())?;
        // the drops not yet told to the forwarder (the total stays for the
        // agent's metrics)
        let unreported = DROPPED
            .load(Ordering::Relaxed)
            .saturating_sub(REPORTED.load(Ordering::Relaxed));
        if unreported > 0 {
            let f = wire::Frame {
                body: Some(wire::frame::Body::Dropped(wire::Dropped {
                    count: unreported,
                })),
            };
            if wire::encode_frame(&f, &mut bytes).is_ok() {
                REPORTED.fetch_add(unreported, Ordering::Relaxed);
            }
        }
        for s in batch.drain(..) {
            let f = wire::Frame {
                body: Some(wire::frame::Body::Span(s)),
            };
            if wire::encode_frame(&f, &mut bytes).is_err() {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err("no stream".into());
        };
        let written = tokio::time::timeout(STREAM_WRITE_TIMEOUT, stream.write_all(&bytes)).await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.stream = None;
                Err(format!("writing to kata-trace-forwarder: {e}"))
            }
            Err(_) => {
                self.stream = None;
                Err(format!(
                    "kata-trace-forwarder read nothing for {STREAM_WRITE_TIMEOUT:?}"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// The whole path in one process: spans of a subscriber with [`layer`],
    /// a remote parent, the exporter thread, the span stream, the decoder.
    #[test]
    fn spans_reach_the_stream_with_their_parents() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("trace.sock");
        let rt = crate::runtime_current_thread().unwrap();
        let listener = rt
            .block_on(async { tokio::net::UnixListener::bind(&sock) })
            .unwrap();
        let subscriber = {
            use tracing_subscriber::layer::SubscriberExt;
            tracing_subscriber::registry().with(layer("kata-test"))
        };
        let _guard = tracing::subscriber::set_default(subscriber);
        start(Sink::Stream(Address::Unix(sock.clone()))).unwrap();
        let remote = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        {
            let outer = tracing::info_span!("outer", otel.name = "Create");
            set_parent(&outer, remote);
            let _o = outer.enter();
            let inner = tracing::info_span!("inner");
            let _i = inner.enter();
            // what a client call would carry: the inner span, same trace
            let tp = traceparent(&tracing::Span::current()).unwrap();
            assert!(
                tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
                "{tp}"
            );
            tracing::warn!("recorded as an event");
        }
        flush(Duration::from_secs(5));
        let frames = rt.block_on(async {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut d = wire::Decoder::new();
            let mut frames = Vec::new();
            let mut buf = [0u8; 4096];
            while frames.len() < 3 {
                let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0, "stream ended after {frames:?}");
                d.feed(&buf[..n]);
                while let Some(f) = d.next_frame().unwrap() {
                    frames.push(f);
                }
            }
            frames
        });
        // (the service is the first layer's of this process: another test's
        // subscriber may have come first)
        let Some(wire::frame::Body::Hello(hello)) = &frames[0].body else {
            panic!("the stream starts with a hello: {frames:?}");
        };
        assert!(!hello.service.is_empty());
        let spans: Vec<&wire::Span> = frames
            .iter()
            .filter_map(|f| match &f.body {
                Some(wire::frame::Body::Span(s)) => Some(s),
                _ => None,
            })
            .collect();
        let inner = spans.iter().find(|s| s.name == "inner").unwrap();
        let outer = spans.iter().find(|s| s.name == "Create").unwrap();
        assert_eq!(outer.trace_id, inner.trace_id);
        assert_eq!(
            wire::hex(&outer.trace_id),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(wire::hex(&outer.parent_span_id), "b7ad6b7169203331");
        assert!(outer.parent_is_remote);
        assert_eq!(inner.parent_span_id, outer.span_id);
        assert!(inner
            .events
            .iter()
            .any(|e| e.name == "recorded as an event"));
        assert_eq!(dropped(), 0);
    }
}
