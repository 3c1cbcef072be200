//! kata-virtiofsd: serves a pod's shared directory to its guest as virtio-fs
//! (a vhost-user-fs backend), or mounts it on the host through /dev/fuse with
//! the same filesystem core. This file only parses the command line into a
//! [`Config`] and calls [`kata_virtiofsd::run`]: the supervisor and the
//! sandboxed server live in the library. See docs/virtiofsd.md.

use std::path::PathBuf;

use clap::Parser;

use kata_virtiofsd::config::{Cache, Config, SandboxKind, Transport, NAME};
use kata_virtiofsd::fs::{DEFAULT_MAX_HANDLES, DEFAULT_MAX_INODES};
use kata_virtiofsd::sandbox::SeccompMode;

#[derive(Debug, Parser)]
#[command(name = NAME, version, about = "kata-rs vhost-user-fs daemon")]
struct Cli {
    /// vhost-user socket to listen on (vhost-user mode).
    #[arg(
        long,
        required_unless_present = "fuse_mount",
        conflicts_with = "fuse_mount"
    )]
    socket_path: Option<PathBuf>,
    /// Mount the share here through /dev/fuse instead (host FUSE mode).
    #[arg(long)]
    fuse_mount: Option<PathBuf>,
    /// The directory to serve.
    #[arg(long)]
    shared_dir: PathBuf,
    /// Guest caching.
    #[arg(long, value_enum, default_value = "auto")]
    cache: Cache,
    /// Worker threads (0: requests are served by the queue thread).
    #[arg(long, default_value_t = 0)]
    thread_pool_size: usize,
    /// Serve extended attributes (the `user.` namespace only).
    #[arg(long)]
    xattr: bool,
    /// Flag directories on another filesystem as submounts.
    #[arg(long)]
    announce_submounts: bool,
    /// Refuse every change (EROFS).
    #[arg(long)]
    readonly: bool,
    /// Keep setuid/setgid bits the guest sets (default: cleared).
    #[arg(long)]
    allow_setid: bool,
    /// Let the guest create device nodes (default: EPERM).
    #[arg(long)]
    allow_devices: bool,
    /// Most open file and directory handles the guest may hold (one host fd
    /// each); beyond it OPEN, CREATE and OPENDIR are EMFILE.
    #[arg(long, default_value_t = DEFAULT_MAX_HANDLES)]
    max_handles: usize,
    /// Most inodes the guest may hold (one host fd each); beyond it a lookup
    /// of a new one is ENFILE.
    #[arg(long, default_value_t = DEFAULT_MAX_INODES)]
    max_inodes: usize,
    /// Sandbox id for the logs and Status.
    #[arg(long)]
    sandbox_id: Option<String>,
    /// gRPC control endpoint (virtiofsd.proto).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Server confinement.
    #[arg(long, value_enum, default_value = "namespace")]
    sandbox: SandboxKind,
    /// What an unlisted system call does.
    #[arg(long, value_enum, default_value = "kill")]
    seccomp: SeccompMode,
}

impl From<Cli> for Config {
    fn from(cli: Cli) -> Self {
        let transport = match (cli.socket_path, cli.fuse_mount) {
            (_, Some(m)) => Transport::Fuse(m),
            (Some(s), None) => Transport::VhostUser(s),
            // clap requires one of the two
            (None, None) => unreachable!("--socket-path or --fuse-mount"),
        };
        Config {
            transport,
            shared_dir: cli.shared_dir,
            cache: cli.cache,
            thread_pool_size: cli.thread_pool_size,
            xattr: cli.xattr,
            announce_submounts: cli.announce_submounts,
            readonly: cli.readonly,
            allow_setid: cli.allow_setid,
            allow_devices: cli.allow_devices,
            max_handles: cli.max_handles,
            max_inodes: cli.max_inodes,
            sandbox_id: cli.sandbox_id,
            control_socket: cli.control_socket,
            sandbox: cli.sandbox,
            seccomp: cli.seccomp,
        }
    }
}

fn main() {
    kata_proto::trace::mark_start();
    let config = Config::from(Cli::parse());
    if std::env::var_os("KATA_LOG").is_none() && std::env::var_os("RUST_LOG").is_none() {
        // fuse-backend-rs logs guest-triggered failures at error level
        std::env::set_var("KATA_LOG", "info,fuse_backend_rs=off");
    }
    kata_proto::logging::init(NAME, config.sandbox_id.as_deref());
    match kata_virtiofsd::run(config) {
        Ok(code) => {
            kata_proto::trace::flush(std::time::Duration::from_secs(1));
            std::process::exit(code)
        }
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::exit(1);
        }
    }
}
