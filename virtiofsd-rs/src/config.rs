//! The daemon's typed configuration: what src/main.rs parses from the command
//! line and hands to [`crate::run`].

use std::path::PathBuf;

use crate::sandbox::SeccompMode;

/// The program's name (the vhost-user daemon's and the FUSE mount's).
pub const NAME: &str = "kata-virtiofsd";

/// Most worker threads accepted.
pub const MAX_THREADS: usize = 64;

/// Cache policy offered to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Cache {
    /// No caching: every access goes to the daemon (shared with other writers).
    None,
    /// Close-to-open consistency, metadata cached 1 s.
    Auto,
    /// Cache everything (the guest owns the directory).
    Always,
}

impl Cache {
    pub fn as_str(self) -> &'static str {
        match self {
            Cache::None => "none",
            Cache::Auto => "auto",
            Cache::Always => "always",
        }
    }
}

/// How the server process is confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxKind {
    /// Own mount namespace, the shared directory as `/` (default).
    Namespace,
    /// No namespace (debugging); capabilities and seccomp still apply.
    None,
}

/// How the share reaches its reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A vhost-user-fs backend listening on this socket (the guest's).
    VhostUser(PathBuf),
    /// A FUSE mount at this point through /dev/fuse (the host's).
    Fuse(PathBuf),
}

/// Everything the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub transport: Transport,
    /// The directory to serve.
    pub shared_dir: PathBuf,
    pub cache: Cache,
    /// Worker threads (0: requests are served by the queue thread).
    pub thread_pool_size: usize,
    /// Serve extended attributes (the `user.` namespace only).
    pub xattr: bool,
    /// Flag directories on another filesystem as submounts.
    pub announce_submounts: bool,
    /// Refuse every change (EROFS).
    pub readonly: bool,
    /// Keep setuid/setgid bits the guest sets.
    pub allow_setid: bool,
    /// Let the guest create device nodes.
    pub allow_devices: bool,
    /// Most open file and directory handles the guest may hold.
    pub max_handles: usize,
    /// Most inodes the guest may hold.
    pub max_inodes: usize,
    /// Sandbox id for the logs and Status.
    pub sandbox_id: Option<String>,
    /// gRPC control endpoint (virtiofsd.proto).
    pub control_socket: Option<PathBuf>,
    pub sandbox: SandboxKind,
    pub seccomp: SeccompMode,
}

impl Config {
    /// The vhost-user socket, if that is the transport.
    pub fn socket_path(&self) -> Option<&PathBuf> {
        match &self.transport {
            Transport::VhostUser(p) => Some(p),
            Transport::Fuse(_) => None,
        }
    }
}
