//! The logging set-up of every kata-rs program: `tracing` to stderr, the level
//! from `KATA_LOG` (else `RUST_LOG`, else `info`), plain text or JSON
//! (`KATA_LOG_FORMAT=json`), and the sandbox id on every line.
//!
//! Level policy: `error` = the operation failed and the user sees it; `warn` =
//! something unexpected that kata-rs recovered from; `info` = lifecycle steps (one
//! line each); `debug` = per-request detail; `trace` = per-packet detail. Anything
//! a guest can trigger at will is logged at `debug` or below, or rate-limited.

use std::fmt;
use std::sync::OnceLock;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

static SANDBOX: OnceLock<String> = OnceLock::new();

struct WithSandbox {
    component: &'static str,
    inner: Format,
}

impl<S, N> FormatEvent<S, N> for WithSandbox
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
        write!(writer, "{} ", self.component)?;
        if let Some(id) = SANDBOX.get() {
            write!(writer, "sandbox={id} ")?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

fn filter(default_level: &str) -> EnvFilter {
    let spec = std::env::var("KATA_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default_level.to_string());
    EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new(default_level))
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
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    if let Some(id) = sandbox_id {
        set_sandbox_id(id);
    }
    let json = std::env::var("KATA_LOG_FORMAT").is_ok_and(|v| v == "json");
    // A second init in the same process (tests) keeps the first subscriber.
    let _ = if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter("info"))
            .with_writer(writer)
            .try_init()
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter("info"))
            .with_writer(writer)
            .event_format(WithSandbox {
                component,
                inner: Format::default().with_ansi(false),
            })
            .try_init()
    };
}

/// Sets the sandbox id printed on every line; only the first call counts.
pub fn set_sandbox_id(id: &str) {
    let _ = SANDBOX.set(id.to_string());
}
