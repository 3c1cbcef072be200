//! The debug console: a shell on vsock port 1026 (Kata's port), started only when
//! the kernel command line carries `agent.debug_console`. Each connection gets
//! its own `/bin/sh`, with the connection as its stdin, stdout and stderr.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

use nix::sys::socket::{
    accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use tracing::{info, warn};

/// The shell the console runs.
pub const SHELL: &str = "/bin/sh";

/// Listens on `port` in a thread of its own; returns at once.
pub fn spawn(port: u32) -> std::io::Result<()> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    listen(&fd, Backlog::new(8).map_err(std::io::Error::from)?)?;
    info!(port, "debug console listening");
    std::thread::Builder::new()
        .name("debug-console".into())
        .spawn(move || loop {
            let conn = match accept(fd.as_raw_fd()) {
                // SAFETY: accept returned a new fd that nothing else owns.
                Ok(raw) => unsafe { OwnedFd::from_raw_fd(raw) },
                Err(e) => {
                    warn!(error = %e, "debug console accept failed");
                    continue;
                }
            };
            let spawned = (|| {
                Command::new(SHELL)
                    .arg("-i")
                    .env("PS1", "kata# ")
                    .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
                    .stdin(Stdio::from(conn.try_clone()?))
                    .stdout(Stdio::from(conn.try_clone()?))
                    .stderr(Stdio::from(conn))
                    .spawn()
            })();
            match spawned {
                Ok(child) => info!(pid = child.id(), "debug console session started"),
                Err(e) => warn!(error = %e, "cannot start {SHELL} for the debug console"),
            }
        })?;
    Ok(())
}
