//! kata-trace-forwarder: see the library.

use std::path::PathBuf;

use clap::Parser;
use kata_proto::trace::otlp::{Exporter, DEFAULT_ENDPOINT};
use kata_trace_forwarder::{Forwarder, Output};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

/// kata-trace-forwarder: the guest agent's trace spans from the pod's vsock
/// to an OTLP/gRPC collector (Jaeger >= 1.35, the OpenTelemetry Collector,
/// Tempo). The shim starts one per pod when `[agent.kata] enable_tracing`.
#[derive(Debug, Parser)]
#[command(version = kata_proto::VERSION, after_help = AFTER_HELP)]
struct Args {
    /// Listen on this unix socket: the hybrid vsock listener of host port
    /// 10240, `<the VM's vsock socket>_10240` (e.g.
    /// /run/kata/<id>/vsock.sock_10240).
    #[arg(long, value_name = "PATH", conflicts_with = "vsock_port")]
    socket_path: Option<PathBuf>,
    /// Listen on this AF_VSOCK port instead (a host with vhost-vsock).
    #[arg(long, value_name = "PORT")]
    vsock_port: Option<u32>,
    /// The OTLP/gRPC endpoint.
    #[arg(long, value_name = "URL", default_value = DEFAULT_ENDPOINT)]
    otlp_endpoint: String,
    /// Basic authentication user for the collector (Kata's jaeger_user);
    /// the password is read from $KATA_TRACE_PASSWORD.
    #[arg(long, value_name = "USER")]
    otlp_user: Option<String>,
    /// Write the spans as JSON lines instead of sending them.
    #[arg(long)]
    dump_only: bool,
    /// Where `--dump-only` writes (default: stdout).
    #[arg(long, value_name = "FILE", requires = "dump_only")]
    dump_file: Option<PathBuf>,
    /// The pod, on every span (resource attribute kata.sandbox_id) and log line.
    #[arg(long, value_name = "ID")]
    sandbox_id: Option<String>,
}

const AFTER_HELP: &str =
    "Prints READY on stdout once it listens. SIGTERM or SIGINT: sends what it holds, \
logs what it counted, exits.

Logs: KATA_LOG (level), KATA_LOG_FORMAT=json.";

enum Listener {
    Unix(tokio::net::UnixListener, PathBuf),
    Vsock(tokio_vsock::VsockListener),
}

fn main() {
    let args = Args::parse();
    kata_proto::logging::init("kata-trace-forwarder", args.sandbox_id.as_deref());
    let image = kata_proto::residency::image_range();
    let rt = match kata_proto::runtime_current_thread() {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args, image)) {
        error!("{e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args, image: Option<std::ops::Range<usize>>) -> anyhow::Result<()> {
    let out = if args.dump_only {
        match &args.dump_file {
            Some(p) => Output::Dump(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| anyhow::anyhow!("opening {}: {e}", p.display()))?,
            )),
            None => Output::Dump(Box::new(std::io::stdout())),
        }
    } else {
        let password = std::env::var("KATA_TRACE_PASSWORD").unwrap_or_default();
        let auth = args.otlp_user.as_deref().map(|u| (u, password.as_str()));
        Output::Otlp(Exporter::new(&args.otlp_endpoint, auth).map_err(anyhow::Error::msg)?)
    };
    let listener = match (&args.socket_path, args.vsock_port) {
        (Some(p), _) => {
            let _ = std::fs::remove_file(p);
            let l = tokio::net::UnixListener::bind(p)
                .map_err(|e| anyhow::anyhow!("listening on {}: {e}", p.display()))?;
            Listener::Unix(l, p.clone())
        }
        (None, port) => {
            let port = port.unwrap_or(kata_proto::paths::ports::TRACING);
            let l = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                tokio_vsock::VMADDR_CID_ANY,
                port,
            ))
            .map_err(|e| anyhow::anyhow!("listening on vsock port {port}: {e}"))?;
            Listener::Vsock(l)
        }
    };
    let where_to = if args.dump_only {
        "JSON lines".to_string()
    } else {
        args.otlp_endpoint.clone()
    };
    info!(to = %where_to, "forwarding the agent's spans");
    println!("READY");
    let (fw, rx) = Forwarder::new();
    let counters = fw.counters.clone();
    let output = tokio::spawn(Forwarder::run_output(
        counters.clone(),
        rx,
        out,
        args.sandbox_id.clone().unwrap_or_default(),
    ));
    // start-up is over: only the code that serves stays mapped
    if let Some(r) = &image {
        kata_proto::residency::drop_image_pages(r);
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let accept = async {
        loop {
            let fw = fw.clone();
            match &listener {
                Listener::Unix(l, _) => match l.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(async move { fw.serve_stream(s).await });
                    }
                    Err(e) => kata_proto::warn_limited!("accept: {e}"),
                },
                Listener::Vsock(l) => match l.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(async move { fw.serve_stream(s).await });
                    }
                    Err(e) => kata_proto::warn_limited!("accept: {e}"),
                },
            }
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    if let Listener::Unix(_, p) = &listener {
        let _ = std::fs::remove_file(p);
    }
    // what was received is sent (bounded by the export timeout), then exit
    drop(fw);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), output).await;
    info!("{}", counters.summary());
    Ok(())
}
