//! `kata-ctl exec ID`: a shell in a pod's guest through the agent's debug
//! console (vsock port 1026, Kata's `kata-runtime exec`). The pod needs
//! `debug_console_enabled = true` in `[agent.kata]` (or the annotation
//! `io.katacontainers.config.agent.debug_console_enabled`).
//!
//! `ID` may be a prefix of the pod's id if it names one pod only. The
//! console's address is the agent's the shim gives on its management socket
//! (`/agent-url`), port 1026; the session protocol is
//! [`kata_proto::console`].
//!
//! With a terminal on stdin: a shell on a guest terminal of the same size,
//! the local terminal in raw mode (restored after), Ctrl-] to leave. Without
//! one, stdin is a script for the guest's shell; `kata-ctl exec ID -- CMD
//! ARGS` runs one command. Both exit with the guest's exit status.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kata_proto::console::{Frame, FrameReader, Request};
use kata_proto::dialer::{dial, Address};
use kata_proto::paths::{ports, SandboxPaths};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `kata-ctl exec` arguments.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The pod (sandbox) id, or a prefix that names one pod of this host.
    id: String,
    /// The pod's directory (default: $KATA_RUN_DIR/<ID>, else /run/kata/<ID>).
    #[arg(long, value_name = "DIR")]
    sandbox_dir: Option<PathBuf>,
    /// A command to run instead of a shell (after `--`); kata-ctl exits
    /// with its status.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// The key that leaves an interactive session (Ctrl-], as telnet's).
const LEAVE: u8 = 0x1d;

/// The pod `id` names: itself, or the one pod whose id begins with it.
fn resolve(id: &str) -> Result<String> {
    let run = kata_proto::paths::run_dir();
    if run.join(id).is_dir() {
        return Ok(id.to_string());
    }
    let mut found: Vec<String> = std::fs::read_dir(&run)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(id))
        .collect();
    found.sort();
    match found.len() {
        0 => bail!(
            "no pod {id} on this host (no {}/{id}*): `ctr task ls` lists the running ones",
            run.display()
        ),
        1 => Ok(found.remove(0)),
        n => bail!(
            "{id} is ambiguous: {n} pods begin with it ({}); give more of the id",
            found.join(", ")
        ),
    }
}

/// The address of the pod's debug console: the agent's address the shim
/// gives on its management socket, port 1026.
async fn console_address(paths: &SandboxPaths) -> Address {
    let fallback = Address::Hybrid {
        path: paths.vsock_uds(),
        port: ports::DEBUG_CONSOLE,
    };
    match kata_proto::http::get_unix(
        &paths.shim_monitor_socket(),
        "/agent-url",
        Duration::from_secs(3),
        4096,
    )
    .await
    {
        Ok(url) => url
            .trim()
            .parse::<Address>()
            .map(|a| a.with_port(ports::DEBUG_CONSOLE))
            .unwrap_or(fallback),
        Err(_) => fallback,
    }
}

fn window_size() -> (u16, u16) {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`.
    let ok = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_row > 0 && ws.ws_col > 0 {
        (ws.ws_row, ws.ws_col)
    } else {
        (24, 80)
    }
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
    let paths = match args.sandbox_dir {
        Some(d) => SandboxPaths::in_dir(d),
        None => {
            kata_proto::ids::check("ID", &args.id)?;
            SandboxPaths::new(&resolve(&args.id)?)
        }
    };
    let id = paths
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tty = args.command.is_empty() && nix::unistd::isatty(std::io::stdin()).unwrap_or(false);
    let request = if tty {
        let (rows, cols) = window_size();
        Request::Tty { rows, cols }
    } else if args.command.is_empty() {
        // a script on stdin, run by the guest's shell
        Request::Exec {
            argv: vec!["/bin/sh".into()],
        }
    } else {
        Request::Exec {
            argv: args.command.clone(),
        }
    };
    let rt = kata_proto::runtime()?;
    rt.block_on(async {
        let addr = console_address(&paths).await;
        let mut s = dial(&addr, Duration::from_secs(10))
            .await
            .with_context(|| {
                format!(
                    "the debug console of pod {id} does not answer: is the pod running here, with \
                 debug_console_enabled = true in [agent.kata] (or the annotation \
                 io.katacontainers.config.agent.debug_console_enabled=true)?"
                )
            })?;
        s.write_all(request.header().as_bytes()).await?;
        if tty {
            interactive(s).await
        } else {
            command(s).await
        }
    })
}

/// A shell on the guest's terminal: raw keys in, bytes out, Ctrl-] leaves.
async fn interactive(s: kata_proto::dialer::Stream) -> Result<ExitCode> {
    let raw = Raw::enter();
    let (mut from, mut to) = tokio::io::split(s);
    let (left_tx, mut left) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 4096];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let chunk = &buf[..n];
                    if let Some(i) = chunk.iter().position(|b| *b == LEAVE) {
                        let _ = to.write_all(&chunk[..i]).await;
                        let _ = left_tx.send(());
                        return;
                    }
                    if to.write_all(chunk).await.is_err() {
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
        tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.write_all(&buf[..n]).await?;
                    out.flush().await?;
                }
            },
            _ = &mut left => break,
        }
    }
    drop(raw);
    eprintln!("\r\n[kata-ctl exec: left the console]");
    Ok(ExitCode::SUCCESS)
}

/// One command (or a script for the guest's shell): stdin in, its output
/// out, its exit status ours.
async fn command(s: kata_proto::dialer::Stream) -> Result<ExitCode> {
    let (mut from, mut to) = tokio::io::split(s);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let _ = tokio::io::copy(&mut stdin, &mut to).await;
        let _ = to.shutdown().await;
    });
    let mut frames = FrameReader::default();
    let mut out = tokio::io::stdout();
    let mut err = tokio::io::stderr();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            bail!("the guest ended the session without the command's exit status");
        }
        frames.feed(&buf[..n]);
        while let Some(f) = frames.next_frame().map_err(anyhow::Error::msg)? {
            match f {
                Frame::Stdout(d) => {
                    out.write_all(&d).await?;
                    out.flush().await?;
                }
                Frame::Stderr(d) => {
                    err.write_all(&d).await?;
                    err.flush().await?;
                }
                Frame::Exit(code) => return Ok(ExitCode::from(code.clamp(0, 255) as u8)),
            }
        }
    }
}
