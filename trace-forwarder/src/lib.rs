//! kata-trace-forwarder: receives the guest agent's span stream
//! ([`kata_proto::trace::wire`]) on the pod's vsock and sends the spans to an
//! OTLP/gRPC collector, or writes them as JSON lines (`--dump-only`).
//!
//! The guest is not trusted: every frame is bounded and checked, a stream
//! that breaks the schema is closed (the forwarder keeps serving), at most
//! [`MAX_STREAMS`] streams are open at once, and spans wait in a bounded
//! queue: when the collector is slow or away they are dropped and counted,
//! never buffered without end. A collector that cannot be reached is logged,
//! and the pod runs on.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kata_proto::trace::otlp::Exporter;
use kata_proto::trace::wire::{self, frame::Body, Decoder, Record};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};

/// Spans waiting for the collector; more are dropped.
pub const QUEUE: usize = 4096;
/// Most spans per export.
pub const BATCH: usize = 512;
/// How long spans gather before an export.
pub const BATCH_DELAY: Duration = Duration::from_millis(200);
/// Most span streams open at once (the agent opens one).
pub const MAX_STREAMS: usize = 4;
/// Bytes read at once from a stream.
const READ_CHUNK: usize = 16 << 10;

/// Where the spans go.
pub enum Output {
    /// An OTLP/gRPC collector.
    Otlp(Exporter),
    /// JSON lines ([`Record`]) to a writer.
    Dump(Box<dyn Write + Send>),
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Output::Otlp(e) => write!(f, "Otlp({})", e.endpoint()),
            Output::Dump(_) => f.write_str("Dump"),
        }
    }
}

/// What the forwarder counted.
#[derive(Debug, Default)]
pub struct Counters {
    /// Spans received and valid.
    pub received: AtomicU64,
    /// Spans sent to the collector or written.
    pub forwarded: AtomicU64,
    /// Spans dropped here (queue full, collector unreachable).
    pub dropped: AtomicU64,
    /// Spans the agent reports it dropped.
    pub dropped_by_sender: AtomicU64,
    /// Streams closed for breaking the schema.
    pub refused_streams: AtomicU64,
}

impl Counters {
    /// One line for the log.
    pub fn summary(&self) -> String {
        format!(
            "received {} spans, forwarded {}, dropped {} here and {} by the agent; {} streams refused",
            self.received.load(Ordering::Relaxed),
            self.forwarded.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.dropped_by_sender.load(Ordering::Relaxed),
            self.refused_streams.load(Ordering::Relaxed),
        )
    }
}

/// The forwarder: hand it connections with [`Forwarder::serve_stream`];
/// [`Forwarder::run_output`] drains the queue to the output.
#[derive(Debug, Clone)]
pub struct Forwarder {
    tx: mpsc::Sender<wire::Span>,
    streams: Arc<Semaphore>,
    /// The counts so far.
    pub counters: Arc<Counters>,
}

impl Forwarder {
    /// A forwarder and the receiving end of its queue (for
    /// [`Forwarder::run_output`]).
    pub fn new() -> (Self, mpsc::Receiver<wire::Span>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Self {
                tx,
                streams: Arc::new(Semaphore::new(MAX_STREAMS)),
                counters: Arc::new(Counters::default()),
            },
            rx,
        )
    }

    /// Reads one span stream to its end; closes it at the first frame that
    /// breaks the schema. Beyond [`MAX_STREAMS`] open streams, a new one is
    /// closed at once.
    pub async fn serve_stream<S: AsyncRead + Unpin>(&self, mut s: S) {
        let Ok(_slot) = self.streams.clone().try_acquire_owned() else {
            kata_proto::warn_limited!(
                "{MAX_STREAMS} span streams are open already: closing a new one"
            );
            return;
        };
        let mut d = Decoder::new();
        let mut buf = vec![0u8; READ_CHUNK];
        // this host's clock minus the sender's (its Clock frames)
        let mut offset: Option<i64> = None;
        loop {
            let n = match s.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) => {
                    debug!("span stream: {e}");
                    return;
                }
            };
            d.feed(&buf[..n]);
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => self.take(f, &mut offset),
                    Ok(None) => break,
                    Err(e) => {
                        self.counters
                            .refused_streams
                            .fetch_add(1, Ordering::Relaxed);
                        kata_proto::warn_limited!("closing a span stream from the guest: {e}");
                        return;
                    }
                }
            }
        }
    }

    fn take(&self, f: wire::Frame, offset: &mut Option<i64>) {
        match f.body {
            Some(Body::Clock(c)) => {
                let now = kata_proto::trace::now_unix_nano() as i128;
                let o =
                    (now - c.unix_nano as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64;
                if offset.is_none() {
                    info!(
                        offset_ms = o / 1_000_000,
                        "the sender's clock differs from this host's: its span times are moved by the offset"
                    );
                }
                *offset = Some(o);
            }
            Some(Body::Hello(h)) => {
                info!(service = %h.service, version = %h.version, "span stream opened");
            }
            Some(Body::Dropped(d)) => {
                self.counters
                    .dropped_by_sender
                    .fetch_add(d.count, Ordering::Relaxed);
                kata_proto::info_limited!(count = d.count, "the agent dropped spans");
            }
            Some(Body::Span(mut s)) => {
                if let Some(o) = *offset {
                    wire::shift(&mut s, o);
                }
                self.counters.received.fetch_add(1, Ordering::Relaxed);
                if self.tx.try_send(s).is_err() {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {}
        }
    }

    /// Sends what the queue holds to `out`, batch by batch, until every
    /// [`Forwarder`] clone is gone and the queue is empty.
    pub async fn run_output(
        counters: Arc<Counters>,
        mut rx: mpsc::Receiver<wire::Span>,
        mut out: Output,
        sandbox_id: String,
    ) {
        let mut batch = Vec::new();
        let mut reachable = true;
        while let Some(first) = rx.recv().await {
            batch.push(first);
            let deadline = tokio::time::sleep(BATCH_DELAY);
            tokio::pin!(deadline);
            while batch.len() < BATCH {
                tokio::select! {
                    s = rx.recv() => match s {
                        Some(s) => batch.push(s),
                        None => break,
                    },
                    _ = &mut deadline => break,
                }
            }
            let n = batch.len() as u64;
            let sent = match &mut out {
                Output::Otlp(e) => e.export(&batch, &sandbox_id).await,
                Output::Dump(w) => dump(w.as_mut(), &batch, &sandbox_id),
            };
            match sent {
                Ok(()) => {
                    counters.forwarded.fetch_add(n, Ordering::Relaxed);
                    if !reachable {
                        info!("the collector answers again");
                        reachable = true;
                    }
                }
                Err(e) => {
                    counters.dropped.fetch_add(n, Ordering::Relaxed);
                    if reachable {
                        warn!(
                            dropped = n,
                            "cannot send spans: {e}; they are dropped until it answers (the pod is not affected)"
                        );
                        reachable = false;
                    } else {
                        kata_proto::debug_limited!(dropped = n, "still cannot send spans: {e}");
                    }
                }
            }
            batch.clear();
        }
    }
}

fn dump(w: &mut dyn Write, spans: &[wire::Span], sandbox_id: &str) -> Result<(), String> {
    let mut text = String::new();
    for s in spans {
        let line = serde_json::to_string(&Record::of(s, sandbox_id)).map_err(|e| e.to_string())?;
        text.push_str(&line);
        text.push('\n');
    }
    w.write_all(text.as_bytes())
        .and_then(|()| w.flush())
        .map_err(|e| format!("writing the dump: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::AsyncWriteExt;

    #[derive(Clone, Default)]
    struct Mem(Arc<Mutex<Vec<u8>>>);

    impl Write for Mem {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn span(i: u8) -> wire::Span {
        wire::Span {
            trace_id: vec![1; 16],
            span_id: vec![i.max(1); 8],
            name: format!("span{i}"),
            start_unix_nano: 1,
            end_unix_nano: 2,
            service: "kata-agent".into(),
            ..Default::default()
        }
    }

    fn stream_of(spans: &[wire::Span]) -> Vec<u8> {
        let mut b = wire::PREAMBLE.to_vec();
        for s in spans {
            let f = wire::Frame {
                body: Some(Body::Span(s.clone())),
            };
            wire::encode_frame(&f, &mut b).unwrap();
        }
        b
    }

    #[tokio::test]
    async fn good_streams_are_dumped_bad_ones_closed() {
        let (fw, rx) = Forwarder::new();
        let mem = Mem::default();
        let out = tokio::spawn(Forwarder::run_output(
            fw.counters.clone(),
            rx,
            Output::Dump(Box::new(mem.clone())),
            "pod1".into(),
        ));
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(&stream_of(&[span(1), span(2)])).await.unwrap();
        drop(a);
        fw.serve_stream(b).await;
        // garbage after a good span: the good one is kept, the stream closed
        let mut bad = stream_of(&[span(3)]);
        bad.extend_from_slice(&[0xff; 64]);
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(&bad).await.unwrap();
        drop(a);
        fw.serve_stream(b).await;
        let counters = fw.counters.clone();
        drop(fw);
        out.await.unwrap();
        let text = String::from_utf8(mem.0.lock().unwrap().clone()).unwrap();
        let names: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Record>(l).unwrap().name)
            .collect();
        assert_eq!(names, ["span1", "span2", "span3"]);
        assert!(text.contains("\"sandbox_id\":\"pod1\""), "{text}");
        assert_eq!(counters.refused_streams.load(Ordering::Relaxed), 1);
        assert_eq!(counters.received.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn span_times_move_by_the_senders_clock_offset() {
        let (fw, mut rx) = Forwarder::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        // the sender's clock is 2 s behind this host's
        let mut b = wire::PREAMBLE.to_vec();
        let clock = wire::Frame {
            body: Some(Body::Clock(wire::Clock {
                unix_nano: now - 2_000_000_000,
            })),
        };
        wire::encode_frame(&clock, &mut b).unwrap();
        let mut s = span(1);
        s.start_unix_nano = now - 2_000_000_000;
        s.end_unix_nano = now - 1_000_000_000;
        wire::encode_frame(
            &wire::Frame {
                body: Some(Body::Span(s)),
            },
            &mut b,
        )
        .unwrap();
        let (mut a, r) = tokio::io::duplex(1 << 16);
        a.write_all(&b).await.unwrap();
        drop(a);
        fw.serve_stream(r).await;
        let got = rx.recv().await.unwrap();
        let moved = got.start_unix_nano as i128 - now as i128;
        // moved to about now (what the 2 s offset says), give or take the test's own time
        assert!(moved.abs() < 500_000_000, "moved {moved} ns from now");
        assert_eq!(got.end_unix_nano - got.start_unix_nano, 1_000_000_000);
    }
}
