//! The debug console: sessions on vsock port 1026 (Kata's port), started only
//! when the kernel command line carries `agent.debug_console`. The session
//! protocol is [`kata_proto::console`]: a shell on a pseudo-terminal (of the
//! client's size, or 80x24 for a client that sends no header), or one
//! command with its stdout, stderr and exit status framed back. Each session
//! has threads of its own; the agent's requests never wait on one.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use kata_proto::console::{Frame, Request, HEADER_WAIT, MAGIC, MAX_HEADER};
use nix::sys::socket::{
    accept, bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    VsockAddr,
};
use nix::sys::time::TimeVal;
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
            let started = std::thread::Builder::new()
                .name("console-session".into())
                .spawn(move || session(File::from(conn)));
            if let Err(e) = started {
                warn!(error = %e, "cannot start a debug console session");
            }
        })?;
    Ok(())
}

/// Reads the header, if the client sends one within [`HEADER_WAIT`]: the
/// request, and the bytes already read that are the session's input; `None`
/// for a header that does not parse (the reason is written to the client).
fn header(sock: &File) -> Option<(Request, Vec<u8>)> {
    let plain = |bytes| Some((Request::Tty { rows: 24, cols: 80 }, bytes));
    let tv = TimeVal::new(0, HEADER_WAIT.as_micros() as i64);
    let _ = setsockopt(&sock.as_fd(), sockopt::ReceiveTimeout, &tv);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut s = sock;
    loop {
        let is_header = got.len() < MAGIC.len() && MAGIC.as_bytes().starts_with(&got)
            || got.starts_with(MAGIC.as_bytes());
        if !is_header || got.len() > MAX_HEADER {
            break;
        }
        if let Some(nl) = got.iter().position(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(&got[..nl]).into_owned();
            let rest = got[nl + 1..].to_vec();
            let _ = setsockopt(&sock.as_fd(), sockopt::ReceiveTimeout, &TimeVal::new(0, 0));
            return match Request::parse(&line) {
                Ok(r) => Some((r, rest)),
                Err(e) => {
                    let _ = s.write_all(format!("kata-agent: {e}\n").as_bytes());
                    None
                }
            };
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let _ = setsockopt(&sock.as_fd(), sockopt::ReceiveTimeout, &TimeVal::new(0, 0));
    plain(got)
}

fn session(sock: File) {
    match header(&sock) {
        Some((Request::Tty { rows, cols }, pending)) => {
            if let Err(e) = tty_session(sock, rows, cols, pending) {
                warn!(error = %e, "debug console: shell session failed");
            }
        }
        Some((Request::Exec { argv }, pending)) => exec_session(sock, argv, pending),
        // a bad header: said on the socket already
        None => {}
    }
}

/// A shell on a new pseudo-terminal of `rows` x `cols`, relayed to `sock`.
fn tty_session(sock: File, rows: u16, cols: u16, pending: Vec<u8>) -> std::io::Result<()> {
    let size = nix::pty::Winsize {
        ws_row: rows.max(1),
        ws_col: cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).map_err(std::io::Error::from)?;
    let slave = pty.slave;
    let mut cmd = Command::new(SHELL);
    cmd.arg("-i")
        .env("PS1", "kata# ")
        .env("TERM", "xterm")
        .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave));
    // SAFETY: setsid and ioctl are async-signal-safe; no allocation.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid = child.id() as i32;
    // (the reaper collects it; nobody asks for the status)
    info!(pid, rows, cols, "debug console shell started");
    let master = File::from(pty.master);
    let mut to_pty = master.try_clone()?;
    let mut from_pty = master;
    let mut from_sock = sock.try_clone()?;
    let mut to_sock = sock;
    let input = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            if to_pty.write_all(&pending).is_ok() {
                let _ = std::io::copy(&mut from_sock, &mut to_pty);
            }
            // the client left: the shell's session is hung up
            // SAFETY: kill takes no pointers.
            unsafe {
                libc::kill(-pid, libc::SIGHUP);
            }
        })?;
    // until the shell (and whatever holds the terminal) ends: EIO
    let _ = std::io::copy(&mut from_pty, &mut to_sock);
    let _ = nix::sys::socket::shutdown(to_sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    let _ = input.join();
    info!(pid, "debug console shell ended");
    Ok(())
}

/// One command: `sock`'s bytes its stdin, its output and status framed back.
fn exec_session(sock: File, argv: Vec<String>, pending: Vec<u8>) {
    let spawned = Command::new(&argv[0])
        .args(&argv[1..])
        .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let out = Arc::new(Mutex::new(sock.try_clone()));
    let send = {
        let out = out.clone();
        move |f: Frame| -> bool {
            let mut g = out.lock().unwrap_or_else(|e| e.into_inner());
            match g.as_mut() {
                Ok(s) => s.write_all(&f.encode()).is_ok(),
                Err(_) => false,
            }
        }
    };
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            send(Frame::Stderr(
                format!("kata-agent: cannot run {}: {e}\n", argv[0]).into_bytes(),
            ));
            send(Frame::Exit(127));
            return;
        }
    };
    let pid = child.id() as i32;
    let status = crate::reaper::watch(pid);
    if let Some(mut stdin) = child.stdin.take() {
        let mut from_sock = sock;
        let _ = std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || {
                if stdin.write_all(&pending).is_ok() {
                    let _ = std::io::copy(&mut from_sock, &mut stdin);
                }
            });
    }
    let relay = |r: Option<Box<dyn Read + Send>>, stdout: bool| {
        let send = send.clone();
        std::thread::spawn(move || {
            let Some(mut r) = r else { return };
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let d = buf[..n].to_vec();
                        let f = if stdout {
                            Frame::Stdout(d)
                        } else {
                            Frame::Stderr(d)
                        };
                        if !send(f) {
                            return;
                        }
                    }
                }
            }
        })
    };
    let o = relay(child.stdout.take().map(|r| Box::new(r) as _), true);
    let e = relay(child.stderr.take().map(|r| Box::new(r) as _), false);
    let _ = o.join();
    let _ = e.join();
    let code = status.blocking_recv().map(|s| s.code()).unwrap_or(255);
    send(Frame::Exit(code));
    if let Ok(s) = out.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        let _ = nix::sys::socket::shutdown(s.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
    info!(pid, code, "debug console command ended");
}
