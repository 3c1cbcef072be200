//! The logging set-up of every kata-rs program: `tracing` to stderr, the level
//! from `KATA_LOG` (else `RUST_LOG`, else `info`), plain text or JSON
//! (`KATA_LOG_FORMAT=json`), the component and the sandbox id on every line:
//!
//! ```text
//! kata-virtiofsd sandbox=pod1 2025-01-01T00:00:00.000000Z  INFO kata_virtiofsd::server: frontend connected
//! {"component":"kata-virtiofsd","sandbox_id":"pod1","timestamp":"2025-01-01T00:00:00.000000Z","level":"INFO","fields":{"message":"frontend connected"},"target":"kata_virtiofsd::server"}
//! ```
//!
//! (`sandbox=`/`"sandbox_id"` only once the id is known.)
//!
//! Level policy: `error` = the operation failed and the user sees it; `warn` =
//! something unexpected that kata-rs recovered from; `info` = lifecycle steps (one
//! line each); `debug` = per-request detail; `trace` = per-packet detail. Anything
//! a guest can trigger at will is logged at `debug` or below, or rate-limited
//! ([`RateLimit`], [`warn_limited!`](crate::warn_limited) and its siblings).

use std::fmt::{self, Write as _};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

static SANDBOX: OnceLock<String> = OnceLock::new();

/// One line: `<component> [sandbox=<id>] <tracing's default format>` in text,
/// tracing's JSON object with `component` and `sandbox_id` first in JSON.
struct Line {
    component: &'static str,
    format: LineFormat,
}

enum LineFormat {
    Text(Format),
    Json(Format<Json>),
}

/// `s` as a JSON string.
fn json_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let json = match &self.format {
            LineFormat::Text(text) => {
                write!(writer, "{} ", self.component)?;
                if let Some(id) = SANDBOX.get() {
                    write!(writer, "sandbox={id} ")?;
                }
                return text.format_event(ctx, writer, event);
            }
            LineFormat::Json(json) => json,
        };
        let mut line = String::new();
        json.format_event(ctx, Writer::new(&mut line), event)?;
        let Some(rest) = line.strip_prefix('{') else {
            return writer.write_str(&line);
        };
        let mut ours = format!("{{\"component\":{}", json_str(self.component));
        if let Some(id) = SANDBOX.get() {
            write!(ours, ",\"sandbox_id\":{}", json_str(id))?;
        }
        writer.write_str(&ours)?;
        if !rest.starts_with('}') {
            writer.write_char(',')?;
        }
        writer.write_str(rest)
    }
}

fn filter(default_level: &str) -> EnvFilter {
    let spec = std::env::var("KATA_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default_level.to_string());
    let f = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new(default_level));
    // netlink-proto warns with whole messages about multicast events nobody
    // asked for: only its errors are worth a line
    match "netlink_proto=error".parse() {
        Ok(d) => f.add_directive(d),
        Err(_) => f,
    }
}

/// The line-writing layer of every program: text or JSON lines to `writer`,
/// filtered by `KATA_LOG`.
fn lines<S, W>(component: &'static str, writer: W, json: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    if json {
        let format = LineFormat::Json(Format::default().json());
        layer
            .fmt_fields(JsonFields::new())
            .event_format(Line { component, format })
            .with_filter(filter("info"))
            .boxed()
    } else {
        let format = LineFormat::Text(Format::default().with_ansi(false));
        layer
            .event_format(Line { component, format })
            .with_filter(filter("info"))
            .boxed()
    }
}

/// The subscriber of every program: log lines, and the spans for
/// [`crate::trace`] (which records nothing until tracing is started).
fn subscriber<W>(component: &'static str, writer: W, json: bool) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::registry()
        .with(lines(component, writer, json))
        .with(crate::trace::layer(component))
}

/// Installs the global subscriber. `sandbox_id` is printed on every line (it can
/// also be set later, once, with [`set_sandbox_id`]). Calling it twice is harmless.
pub fn init(component: &'static str, sandbox_id: Option<&str>) {
    init_with_writer(component, sandbox_id, std::io::stderr);
}

/// Like [`init`], writing to `writer` instead of stderr (the shim writes to the
/// log FIFO containerd reads).
pub fn init_with_writer<W>(component: &'static str, sandbox_id: Option<&str>, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    if let Some(id) = sandbox_id {
        set_sandbox_id(id);
    }
    let json = std::env::var("KATA_LOG_FORMAT").is_ok_and(|v| v == "json");
    // A second init in the same process (tests) keeps the first subscriber.
    let _ = tracing::subscriber::set_global_default(subscriber(component, writer, json));
}

/// The sandbox id set with [`set_sandbox_id`] (or [`init`]).
pub fn sandbox_id() -> Option<&'static str> {
    SANDBOX.get().map(String::as_str)
}

/// Sets the sandbox id printed on every line; only the first call counts.
pub fn set_sandbox_id(id: &str) {
    let _ = SANDBOX.set(id.to_string());
}

/// Lines a rate-limited call site logs per period before it goes quiet
/// ([`warn_limited!`](crate::warn_limited) and its siblings).
pub const LIMITED_BURST: u32 = 10;
/// The period of those call sites: after a quiet spell, the first line of the
/// next period carries `suppressed = <lines dropped>`.
pub const LIMITED_PERIOD: Duration = Duration::from_secs(60);

/// A rate limit for log lines a guest (or any outside party) can trigger at
/// will: the first `burst` lines of each `period` pass; the rest are counted,
/// and the first line let through afterwards reports how many were dropped.
/// One per call site (the `*_limited!` macros make a `static` one each) or one
/// per kind of event shared by several call sites.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    period: Duration,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    passed: u32,
    suppressed: u64,
}

impl RateLimit {
    /// `burst` lines per `period`.
    pub const fn new(burst: u32, period: Duration) -> Self {
        Self {
            burst,
            period,
            window: Mutex::new(Window {
                start: None,
                passed: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be logged now: `Some(n)` with the lines dropped
    /// since the last one let through (0 usually), `None` to drop this one.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Option<u64> {
        // a poisoned lock only means a panic elsewhere mid-update: go on
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.start
            .is_none_or(|s| now.saturating_duration_since(s) >= self.period)
        {
            w.start = Some(now);
            w.passed = 0;
        }
        if w.passed < self.burst {
            w.passed += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

/// Re-exported for the `*_limited!` macros, so that their users need not
/// name `tracing` themselves.
#[doc(hidden)]
pub use tracing as __tracing;

/// Logs at `level` through a rate limit of this call site's own
/// ([`LIMITED_BURST`] lines per [`LIMITED_PERIOD`]); a line let through after
/// dropped ones carries `suppressed = <count>`. Lines below the enabled level
/// are neither logged nor counted. Use it (or [`warn_limited!`](crate::warn_limited),
/// ...) for every line a guest can trigger.
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        if $crate::logging::__tracing::enabled!($level) {
            static LIMIT: $crate::logging::RateLimit = $crate::logging::RateLimit::new(
                $crate::logging::LIMITED_BURST,
                $crate::logging::LIMITED_PERIOD,
            );
            match LIMIT.check() {
                Some(0) => $crate::logging::__tracing::event!($level, $($arg)+),
                Some(suppressed) => {
                    $crate::logging::__tracing::event!($level, suppressed, $($arg)+)
                }
                None => {}
            }
        }
    }};
}

/// [`log_limited!`](crate::log_limited) at `error` level.
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::logging::__tracing::Level::ERROR, $($arg)+) };
}

/// [`log_limited!`](crate::log_limited) at `warn` level.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::logging::__tracing::Level::WARN, $($arg)+) };
}

/// [`log_limited!`](crate::log_limited) at `info` level.
#[macro_export]
macro_rules! info_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::logging::__tracing::Level::INFO, $($arg)+) };
}

/// [`log_limited!`](crate::log_limited) at `debug` level.
#[macro_export]
macro_rules! debug_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::logging::__tracing::Level::DEBUG, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use super::*;

    /// A writer into memory for a subscriber under test.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    /// Makes this thread's subscriber write to memory; returns what was
    /// written so far, and the guard that keeps the subscriber.
    fn capture(json_lines: bool) -> (impl Fn() -> String, tracing::subscriber::DefaultGuard) {
        let buf = Buf::default();
        let guard =
            tracing::subscriber::set_default(subscriber("test-component", buf.clone(), json_lines));
        let lines = move || String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        (lines, guard)
    }

    #[test]
    fn first_burst_then_quiet_then_the_count() {
        let l = RateLimit::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.check_at(t0), Some(0));
        }
        for i in 1..=5 {
            assert_eq!(l.check_at(t0 + Duration::from_secs(i)), None);
        }
        // a new period: the first line reports the 5 dropped, then none
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(l.check_at(t1), Some(5));
        assert_eq!(l.check_at(t1), Some(0));
        assert_eq!(l.check_at(t1), Some(0));
        assert_eq!(l.check_at(t1), None);
        assert_eq!(l.check_at(t1 + Duration::from_secs(30)), Some(1));
    }

    #[test]
    fn the_macros_log_the_burst_and_the_count() {
        let (lines, _guard) = capture(false);
        for i in 0..(LIMITED_BURST + 7) {
            crate::warn_limited!("guest did {i}");
        }
        let out = lines();
        assert_eq!(
            out.matches("guest did").count(),
            LIMITED_BURST as usize,
            "{out}"
        );
        assert!(!out.contains("suppressed"), "{out}");
    }

    #[test]
    fn every_line_has_the_component_and_the_sandbox_id() {
        set_sandbox_id("pod-\"1\"");
        let (json_out, guard) = capture(true);
        tracing::info!(answer = 42, "a \"quoted\" message");
        tracing::warn!("second");
        drop(guard);
        let out = json_out();
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        for l in &lines {
            assert_eq!(l["component"], "test-component", "{l}");
            assert_eq!(l["sandbox_id"], "pod-\"1\"", "{l}");
            assert!(l["timestamp"].is_string(), "{l}");
        }
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[0]["fields"]["message"], "a \"quoted\" message");
        assert_eq!(lines[0]["fields"]["answer"], 42);
        assert_eq!(lines[1]["level"], "WARN");

        let (text_out, guard) = capture(false);
        tracing::info!("in text");
        drop(guard);
        let out = text_out();
        assert!(
            out.starts_with("test-component sandbox=pod-\"1\" "),
            "{out}"
        );
        assert!(out.contains("INFO") && out.contains("in text"), "{out}");
    }
}
