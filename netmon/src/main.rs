//! kata-netmon: argument parsing and entering the pod's network namespace;
//! see the library.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kata_netmon::{Model, Options};
use kata_proto::ids::SandboxId;

/// Plumbs a pod's network namespace into its VM and follows its changes.
#[derive(Debug, Parser)]
#[command(version = kata_proto::VERSION)]
struct Args {
    /// The sandbox (pod) id.
    #[arg(long)]
    sandbox_id: String,
    /// The pod's network namespace (/var/run/netns/NAME, /proc/PID/ns/net).
    #[arg(long)]
    netns: PathBuf,
    /// The API socket (the shim's: <sandbox-dir>/netmon.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// How the pod's interfaces reach the VM.
    #[arg(long, value_enum, default_value = "tcfilter")]
    model: Model,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Plumb and serve (the default); prints "READY" on stdout once the
    /// first network is plumbed and the socket accepts.
    Serve,
    /// Remove what a killed netmon left in the netns: its `*_kata` links
    /// and the ingress qdiscs of the others.
    Cleanup,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Err(e) = SandboxId::new(args.sandbox_id.as_str()) {
        eprintln!("kata-netmon: {e}");
        return std::process::ExitCode::from(2);
    }
    kata_proto::logging::init("kata-netmon", Some(&args.sandbox_id));
    // Enter the pod's netns before any other thread exists: every thread of
    // the runtime then lives there.
    let ns = match std::fs::File::open(&args.netns) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "kata-netmon: cannot open the network namespace {}: {e}",
                args.netns.display()
            );
            return std::process::ExitCode::from(2);
        }
    };
    if let Err(e) = nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET) {
        eprintln!(
            "kata-netmon: cannot enter the network namespace {}: {e} (needs root)",
            args.netns.display()
        );
        return std::process::ExitCode::from(2);
    }
    drop(ns);
    if args.model == Model::Macvtap {
        // sysfs shows the links of the netns of whoever mounted it: a
        // private mount of it here names the macvtaps' character devices
        if let Err(e) = mount_netns_sysfs() {
            eprintln!("kata-netmon: mounting sysfs for the pod's netns: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    // read now: /proc/self/maps names the executable (see kata_proto::residency)
    let image = kata_proto::residency::image_range();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kata-netmon: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match args.cmd.unwrap_or(Cmd::Serve) {
        Cmd::Serve => {
            let Some(socket) = args.socket else {
                eprintln!("kata-netmon: --socket is needed to serve");
                return std::process::ExitCode::from(2);
            };
            let opts = Options {
                sandbox_id: args.sandbox_id,
                socket,
                model: args.model,
            };
            rt.block_on(kata_netmon::run(opts, || {
                let mut out = std::io::stdout();
                let _ = writeln!(out, "READY");
                let _ = out.flush();
                // start-up is over: only the code that serves stays mapped
                if let Some(r) = &image {
                    kata_proto::residency::drop_image_pages(r);
                }
            }))
        }
        Cmd::Cleanup => rt.block_on(kata_netmon::cleanup()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("kata-netmon: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A mount namespace of its own with a sysfs of the pod's netns on /sys.
fn mount_netns_sysfs() -> nix::Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )?;
    mount(
        Some("sysfs"),
        "/sys",
        Some("sysfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
}
