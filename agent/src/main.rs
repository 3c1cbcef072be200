//! kata-agent: argument parsing only; see the library.

use std::path::PathBuf;

use clap::Parser;
use kata_agent::{init, Config, Listen};
use kata_proto::paths::ports;

/// kata-rs guest agent. As PID 1 of the guest it needs no arguments.
#[derive(Debug, Parser)]
#[command(version = kata_proto::VERSION)]
struct Args {
    /// Serve on this address instead of vsock port 1024: `unix:///path` (host mode).
    #[arg(long)]
    listen: Option<String>,
    /// The agent's state directory.
    #[arg(long, default_value = kata_agent::DEFAULT_ROOT)]
    root: PathBuf,
    /// The agent policy file (an agent built with the agent-policy feature;
    /// in the guest the image's /etc/kata-opa/default-policy.rego).
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Log every checked request and its decision on stderr (in the guest:
    /// `agent.policy_debug` on the kernel command line).
    #[arg(long)]
    policy_debug: bool,
    /// Send trace spans to kata-trace-forwarder on this unix socket (host
    /// mode; in the guest: `agent.trace` on the kernel command line sends
    /// them to host vsock port 10240).
    #[arg(long, value_name = "PATH")]
    trace_socket: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    if std::env::args_os().nth(1).as_deref() == Some(kata_agent::childinit::CHILD_ARG.as_ref()) {
        kata_agent::childinit::child_main();
    }
    let pid1 = std::process::id() == 1;
    // As PID 1 the kernel hands init every command-line word it does not know
    // (`nomodeset`, ...): those are not ours to reject.
    let args = if pid1 {
        Args::try_parse().unwrap_or(Args {
            listen: None,
            root: kata_agent::DEFAULT_ROOT.into(),
            policy: None,
            policy_debug: false,
            trace_socket: None,
        })
    } else {
        Args::parse()
    };
    let listen = match args.listen.as_deref() {
        None => Listen::Vsock(ports::AGENT),
        Some(a) => match a.strip_prefix("unix://") {
            Some(p) if p.starts_with('/') => Listen::Unix(PathBuf::from(p)),
            _ => {
                eprintln!("kata-agent: --listen {a:?}: expected unix:///absolute/path");
                return std::process::ExitCode::from(2);
            }
        },
    };
    if args.policy.is_some() && !cfg!(feature = "agent-policy") {
        eprintln!("kata-agent: --policy: this agent was built without policy support (feature agent-policy)");
        return std::process::ExitCode::from(2);
    }
    let mut policy = kata_agent::PolicyConfig {
        debug: args.policy_debug,
        ..Default::default()
    };
    if let Some(f) = args.policy {
        policy.file = f;
    }
    let mut debug_console = false;
    let mut sandbox_id = None;
    let mut trace_to = args
        .trace_socket
        .clone()
        .map(kata_proto::dialer::Address::Unix);
    if pid1 {
        if let Err(e) = init::leave_initramfs().and_then(|_| init::early_mounts()) {
            eprintln!("kata-agent: {e}");
            init::power_off();
        }
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        if let Some(level) = init::cmdline_option(&cmdline, "log") {
            // SAFETY (not an unsafe block in edition 2021): no other thread runs yet.
            std::env::set_var("KATA_LOG", level);
        }
        debug_console = init::cmdline_option(&cmdline, "debug_console").is_some();
        sandbox_id = init::cmdline_option(&cmdline, "sandbox_id");
        policy.debug |= init::cmdline_option(&cmdline, "policy_debug").is_some();
        if init::cmdline_option(&cmdline, "trace").is_some() {
            trace_to = Some(kata_proto::dialer::Address::Vsock {
                cid: tokio_vsock::VMADDR_CID_HOST,
                port: ports::TRACING,
            });
        }
    }
    kata_proto::logging::init("kata-agent", sandbox_id.as_deref());
    if pid1 {
        tracing::debug!(uptime_ms = init::uptime_ms(), "init: early mounts done");
    }
    if let Some(to) = trace_to {
        // spans leave from a thread of their own, through a bounded queue:
        // no request waits on tracing
        if let Err(e) = kata_proto::trace::start(kata_proto::trace::Sink::Stream(to)) {
            tracing::error!("tracing: {e}");
        }
    }
    let rt = match kata_proto::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kata-agent: cannot start the async runtime: {e}");
            if pid1 {
                init::power_off();
            }
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        kata_agent::reaper::start(pid1);
        if pid1 {
            match init::load_modules() {
                Ok(n) => tracing::info!(modules = n, "kernel modules loaded"),
                Err(e) => tracing::error!("{e}"),
            }
            match init::seal_root() {
                Ok(()) => tracing::debug!("root filesystem is read-only"),
                Err(e) => tracing::error!("{e}"),
            }
            // the containers share the guest's network namespace: lo is theirs
            if let Err(e) = kata_agent::network::loopback_up() {
                tracing::error!("bringing lo up: {}", e.message());
            }
            tracing::debug!(uptime_ms = init::uptime_ms(), "init: lo is up");
            if debug_console {
                if let Err(e) = kata_agent::console::spawn(ports::DEBUG_CONSOLE) {
                    tracing::error!("debug console: {e}");
                }
            }
        }
        let announce_port = matches!(listen, Listen::Vsock(_)).then_some(ports::READY);
        kata_agent::run(Config {
            listen,
            init: pid1,
            announce_port,
            root: args.root,
            policy,
        })
        .await
    });
    if let Err(e) = &result {
        tracing::error!("{e}");
    }
    // the last spans (DestroySandbox's) leave before the guest powers off
    kata_proto::trace::flush(std::time::Duration::from_secs(1));
    if pid1 {
        init::power_off();
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) => std::process::ExitCode::FAILURE,
    }
}
