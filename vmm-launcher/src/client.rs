//! The launcher crate's public face: starting a launcher process and
//! talking to it, cleaning up after a dead one ([`cleanup`]), and reading
//! what a launcher records on the host (its state file, the console cap,
//! the hypervisors' uids, the cgroup hierarchies). What the shim, kata-ctl
//! and the tests all do, written once; nothing else of the crate is public
//! but the fuzzing entry points (`vsock::packet`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kata_proto::dialer::Address;
use kata_proto::launcher::launcher_client::LauncherClient;
use kata_proto::paths::SandboxPaths;
use tokio::process::{Child, Command};

/// A running `kata-vmm-launcher` process and a client to it.
#[derive(Debug)]
pub struct LauncherProcess {
    /// The process (killed if dropped while running).
    pub child: Child,
    /// The sandbox's paths.
    pub paths: SandboxPaths,
    /// The gRPC client.
    pub client: LauncherClient<kata_proto::trace::Traced>,
}

/// Why the launcher could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The binary could not be run.
    #[error("starting {binary}: {source}")]
    Spawn {
        /// Which binary.
        binary: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It exited or did not get ready in time.
    #[error("{binary} did not become ready within {timeout:?} (it exited or printed no READY)")]
    NotReady {
        /// Which binary.
        binary: PathBuf,
        /// The deadline.
        timeout: Duration,
    },
    /// Its socket could not be reached.
    #[error("connecting to the launcher: {0}")]
    Connect(#[from] tonic::transport::Error),
}

pub use kata_proto::process::die_with_parent;

impl LauncherProcess {
    /// Starts `binary` for `sandbox_id` with its sandbox directory in `dir`,
    /// waits until it serves, connects.
    pub async fn spawn(
        binary: &Path,
        sandbox_id: &str,
        dir: &Path,
        timeout: Duration,
    ) -> Result<LauncherProcess, ClientError> {
        let mut cmd = Command::new(binary);
        die_with_parent(&mut cmd);
        // a traced caller's launcher traces too, in the caller's trace
        cmd.envs(kata_proto::trace::child_env());
        let mut child = cmd
            .arg("--sandbox-id")
            .arg(sandbox_id)
            .arg("--sandbox-dir")
            .arg(dir)
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ClientError::Spawn {
                binary: binary.into(),
                source,
            })?;
        let not_ready = || ClientError::NotReady {
            binary: binary.into(),
            timeout,
        };
        let stdout = child.stdout.take().ok_or_else(not_ready)?;
        if kata_proto::wait_ready_line(stdout, timeout).await.is_err() {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(not_ready());
        }
        let paths = SandboxPaths::in_dir(dir);
        let ch =
            kata_proto::dialer::channel(&Address::Unix(paths.launcher_socket()), timeout).await?;
        Ok(LauncherProcess {
            child,
            paths,
            client: LauncherClient::new(kata_proto::trace::traced(ch)),
        })
    }
}

pub use crate::leftovers::{cleanup, CleanupError, LiveLauncher};

/// The hypervisor's pid a launcher recorded in the sandbox's state file
/// (0 before it ran), if there is such a file.
pub fn hypervisor_pid(paths: &SandboxPaths) -> Option<u32> {
    crate::leftovers::State::load(paths).map(|s| s.hypervisor_pid)
}

/// The lock file of the hypervisor's uid a launcher recorded, if it
/// allocated one from the reserved range.
pub fn hypervisor_uid_lock(paths: &SandboxPaths) -> Option<PathBuf> {
    crate::leftovers::State::load(paths).and_then(|s| s.uid_lock)
}

/// The uids the launcher gives hypervisors (`KATA_JAIL_UID_RANGE`, else
/// the default), their lock directory, and whether the host uses a uid
/// itself (a user, a group or a subordinate range: never handed out).
pub mod uids {
    use std::path::PathBuf;

    use crate::uids::{Excluded, UidRange};

    /// The reserved range, first to one past the last (the default if
    /// `KATA_JAIL_UID_RANGE` does not parse: a launcher then refuses to
    /// allocate).
    pub fn reserved_range() -> std::ops::Range<u64> {
        let r = UidRange::from_env().unwrap_or_default();
        u64::from(r.first)..u64::from(r.first) + u64::from(r.count)
    }

    /// Where the locks of the allocated uids are, one file per uid.
    pub fn lock_dir() -> PathBuf {
        crate::uids::default_lock_dir()
    }

    /// Whether the host itself uses `uid` (never given to a hypervisor).
    pub fn used_by_host(uid: u32) -> bool {
        Excluded::host().contains(uid)
    }
}

/// Most console bytes a launcher keeps on disk per VM (the console log and
/// its older half together).
pub const CONSOLE_CAP: u64 = crate::console::CONSOLE_CAP;

/// The older half of a console log, next to it.
pub fn console_rotated_path(console_log: &Path) -> PathBuf {
    crate::console::rotated_path(console_log)
}

/// The cgroup hierarchies of this host, where a launcher makes the VM's cgroup.
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    crate::cgroup::hierarchies()
}
