//! `kata-ctl exec ID`: a shell in a pod's guest through the agent's debug
//! console (vsock port 1026, Kata's `kata-runtime exec`). The pod needs
//! `debug_console_enabled = true` in `[agent.kata]` (or the annotation
//! `io.katacontainers.config.agent.debug_console_enabled`).
//!
//! With a terminal on stdin it is put in raw mode (and restored), so keys
//! reach the guest's shell as typed; otherwise stdin is copied as it is, so
//! a script can be piped in. It ends when the shell ends.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use kata_proto::dialer::{dial, Address};
use kata_proto::paths::{ports, SandboxPaths};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `kata-ctl exec` arguments.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The pod (sandbox) id.
    id: String,
    /// The pod's directory (default: $KATA_RUN_DIR/<ID>, else /run/kata/<ID>).
    #[arg(long, value_name = "DIR")]
    sandbox_dir: Option<PathBuf>,
}

/// The terminal's settings, put back on drop.
struct Raw(Option<nix::sys::termios::Termios>);

impl Raw {
    fn enter() -> Raw {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return Raw(None);
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            return Raw(None);
        }
        Raw(Some(saved))
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                t,
            );
        }
    }
}

/// Runs `kata-ctl exec`.
pub fn run(args: ExecArgs) -> Result<ExitCode> {
    kata_proto::ids::check("ID", &args.id)?;
    let paths = match args.sandbox_dir {
        Some(d) => SandboxPaths::in_dir(d),
        None => SandboxPaths::new(&args.id),
    };
    let addr = Address::Hybrid {
        path: paths.vsock_uds(),
        port: ports::DEBUG_CONSOLE,
    };
    let rt = kata_proto::runtime()?;
    rt.block_on(async {
        let s = dial(&addr, Duration::from_secs(10))
            .await
            .with_context(|| {
                format!(
                    "the debug console of pod {} does not answer: is the pod running here, with \
                 debug_console_enabled = true in [agent.kata] (or the annotation \
                 io.katacontainers.config.agent.debug_console_enabled=true)?",
                    args.id
                )
            })?;
        let _raw = nix::unistd::isatty(std::io::stdin())
            .unwrap_or(false)
            .then(Raw::enter);
        let (mut from, mut to) = tokio::io::split(s);
        // stdin to the shell; at its end the shell's input ends too
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 4096];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = to.shutdown().await;
        });
        let mut out = tokio::io::stdout();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.write_all(&buf[..n]).await?;
                    out.flush().await?;
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
