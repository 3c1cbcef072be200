//! Starting a launcher process and talking to it: what the shim, kata-ctl and the
//! tests all do, written once.

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
    pub client: LauncherClient<tonic::transport::Channel>,
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

/// Makes the child get SIGKILL when the thread that spawned it dies: a helper
/// never outlives its owner (the shim, kata-ctl, a test). Spawn from a thread
/// that lives as long as the owner (a tokio worker does).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

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
            client: LauncherClient::new(ch),
        })
    }
}
