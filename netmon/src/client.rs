//! What the shim (and the tests) use: start kata-netmon for a pod, talk to
//! it, stop it, and clean up after a killed one.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kata_proto::dialer::Address;
use kata_proto::netmon::netmon_client::NetmonClient;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::Model;

/// The most of netmon's stderr an error message quotes.
const STDERR_QUOTE: u64 = 2048;

/// A running kata-netmon.
pub struct NetmonProcess {
    /// The process (killed if dropped while running).
    pub child: Child,
    /// Its API socket.
    pub socket: PathBuf,
    /// The gRPC client.
    pub client: NetmonClient<Channel>,
}

/// Why netmon could not be started or stopped.
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
    /// It did not say READY.
    #[error("kata-netmon did not start: {why}")]
    NotReady {
        /// What it printed or why it stopped.
        why: String,
    },
    /// Its socket did not answer.
    #[error("connecting to kata-netmon: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// A call failed.
    #[error("kata-netmon: {0}")]
    Call(#[from] tonic::Status),
}

impl NetmonProcess {
    /// Starts `binary` in the network namespace `netns` for `sandbox_id`,
    /// serving on `socket`, and waits (up to `timeout`) until the pod's
    /// interfaces are plumbed and it serves. Its log lines go to the
    /// caller's stderr.
    pub async fn spawn(
        binary: &Path,
        sandbox_id: &str,
        netns: &Path,
        socket: &Path,
        model: Model,
        timeout: Duration,
    ) -> Result<NetmonProcess, ClientError> {
        let mut cmd = Command::new(binary);
        kata_proto::process::die_with_parent(&mut cmd);
        let mut child = cmd
            .arg("--sandbox-id")
            .arg(sandbox_id)
            .arg("--netns")
            .arg(netns)
            .arg("--socket")
            .arg(socket)
            .arg("--model")
            .arg(model.name())
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ClientError::Spawn {
                binary: binary.into(),
                source,
            })?;
        let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(ClientError::NotReady {
                why: "no stdout".into(),
            });
        };
        if let Err(why) = kata_proto::wait_ready_line(stdout, timeout).await {
            let _ = child.start_kill();
            let _ = child.wait().await;
            let mut said = String::new();
            let _ = (&mut stderr)
                .take(STDERR_QUOTE)
                .read_to_string(&mut said)
                .await;
            let last = said
                .lines()
                .rev()
                .find(|l| l.starts_with("kata-netmon: "))
                .map(|l| l.trim_start_matches("kata-netmon: ").to_string());
            return Err(ClientError::NotReady {
                why: last.unwrap_or(why),
            });
        }
        // from now on its log lines are the caller's
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                eprintln!("{l}");
            }
        });
        let ch = kata_proto::dialer::channel(&Address::Unix(socket.into()), timeout).await?;
        Ok(NetmonProcess {
            child,
            socket: socket.into(),
            client: NetmonClient::new(ch),
        })
    }

    /// Asks netmon to remove its plumbing and exit; kills it if it has not
    /// within `timeout`.
    pub async fn shutdown(mut self, timeout: Duration) -> Result<(), ClientError> {
        let asked = tokio::time::timeout(timeout, self.client.shutdown(())).await;
        if tokio::time::timeout(timeout, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        match asked {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) => Err(ClientError::Call(s)),
            Err(_) => Err(ClientError::Call(tonic::Status::deadline_exceeded(
                format!("Shutdown did not answer within {timeout:?}"),
            ))),
        }
    }
}

/// Removes what a killed netmon left in `netns` (its `*_kata` links and the
/// ingress qdiscs), by running `binary ... cleanup`. A netns that is gone
/// took everything with it: nothing to do.
pub async fn cleanup(binary: &Path, sandbox_id: &str, netns: &Path) -> Result<(), String> {
    if !netns.exists() {
        return Ok(());
    }
    let out = Command::new(binary)
        .arg("--sandbox-id")
        .arg(sandbox_id)
        .arg("--netns")
        .arg(netns)
        .arg("cleanup")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("starting {}: {e}", binary.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} cleanup: {}: {}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
