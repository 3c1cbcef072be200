//! kata-vmm-launcher: argument parsing only; see the library.

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kata_proto::ids::SandboxId;
use kata_proto::paths::SandboxPaths;
use kata_vmm_launcher::client::LiveLauncher;

/// Runs one pod VM: jailed QEMU, QMP, and the host end of its vsock.
#[derive(Debug, Parser)]
#[command(version = kata_proto::VERSION)]
struct Args {
    /// The sandbox (pod) id.
    #[arg(long)]
    sandbox_id: String,
    /// The sandbox directory; default: /run/kata/<sandbox-id> ($KATA_RUN_DIR).
    #[arg(long)]
    sandbox_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the launcher API on <sandbox-dir>/launcher.sock (the default). Prints
    /// "READY" on stdout once the socket accepts.
    Serve,
    /// Remove what a dead launcher of this sandbox left: its hypervisor, cgroups,
    /// sockets and directory.
    Cleanup,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Err(e) = SandboxId::new(args.sandbox_id.as_str()) {
        eprintln!("kata-vmm-launcher: {e}");
        return std::process::ExitCode::from(2);
    }
    kata_proto::logging::init("kata-vmm-launcher", Some(&args.sandbox_id));
    // a traced shim passes its collector: the launcher's spans join its trace
    if let Err(e) = kata_proto::trace::start_from_env() {
        tracing::warn!("tracing: {e}; the launcher is not traced");
    }
    let paths = match &args.sandbox_dir {
        Some(d) => SandboxPaths::in_dir(d),
        None => SandboxPaths::new(&args.sandbox_id),
    };
    let result = match args.cmd.unwrap_or(Cmd::Serve) {
        Cmd::Cleanup => kata_vmm_launcher::client::cleanup(&paths, LiveLauncher::Refuse)
            .map_err(|e| e.to_string()),
        Cmd::Serve => {
            let rt = match kata_proto::runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("kata-vmm-launcher: cannot start the async runtime: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            rt.block_on(kata_vmm_launcher::run(&args.sandbox_id, paths, || {
                let mut out = std::io::stdout();
                let _ = writeln!(out, "READY");
                let _ = out.flush();
            }))
            .map_err(|e| e.to_string())
        }
    };
    kata_proto::trace::flush(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}
