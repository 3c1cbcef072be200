//! Process stdio: pipes or a terminal per process, and the stdio port where
//! the host attaches one raw byte stream per stdin/stdout/stderr.
//!
//! The protocol is in [`kata_proto::stdio`].

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kata_proto::dialer::Stream;
use kata_proto::stdio::{parse_header, Header, Which, MAX_LINE};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify};
use tonic::Status;
use tracing::{debug, warn};

use crate::childinit::{grow_pipe, pipe};

/// How long a client has to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The copy buffer: large, so bulk output costs few system calls.
const COPY_BUF: usize = 256 * 1024;

/// The agent's side of one process's stdio.
#[derive(Debug)]
pub struct Stdio {
    /// The process has a terminal.
    pub terminal: bool,
    stdin: Mutex<Option<OwnedFd>>,
    stdout: Mutex<Option<OwnedFd>>,
    stderr: Mutex<Option<OwnedFd>>,
    master: Option<OwnedFd>,
    stdin_closed: Notify,
    copying: watch::Sender<u32>,
}

fn cloexec(fd: &OwnedFd) -> std::io::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

impl Stdio {
    /// Makes the pipes (or the terminal) of a new process; returns the agent's
    /// side and the process's fds 0, 1 and 2.
    pub fn new(terminal: bool) -> std::io::Result<(Arc<Stdio>, [OwnedFd; 3])> {
        let (copying, _) = watch::channel(0);
        if terminal {
            let pty = nix::pty::openpty(None, None)?;
            cloexec(&pty.master)?;
            cloexec(&pty.slave)?;
            let child = [pty.slave.try_clone()?, pty.slave.try_clone()?, pty.slave];
            let s = Stdio {
                terminal,
                stdin: Mutex::new(Some(pty.master.try_clone()?)),
                stdout: Mutex::new(Some(pty.master.try_clone()?)),
                stderr: Mutex::new(None),
                master: Some(pty.master),
                stdin_closed: Notify::new(),
                copying,
            };
            return Ok((Arc::new(s), child));
        }
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        grow_pipe(&out_w);
        grow_pipe(&in_w);
        let s = Stdio {
            terminal,
            stdin: Mutex::new(Some(in_w)),
            stdout: Mutex::new(Some(out_r)),
            stderr: Mutex::new(Some(err_r)),
            master: None,
            stdin_closed: Notify::new(),
            copying,
        };
        Ok((Arc::new(s), [in_r, out_w, err_w]))
    }

    /// Sets the terminal's window size.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), Status> {
        let Some(m) = &self.master else {
            return Err(Status::failed_precondition(
                "the process has no terminal: only a process started with terminal=true can be resized",
            ));
        };
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a valid winsize struct; the fd is open.
        if unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(Status::internal(format!(
                "resizing the terminal: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Closes the process's stdin (end of input), whether or not a stream is
    /// attached to it.
    pub fn close_stdin(&self) {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.stdin_closed.notify_waiters();
        self.stdin_closed.notify_one();
    }

    /// After the process exited: waits until every attached output stream has
    /// delivered its last byte, or `grace` passed (some other process may
    /// still hold the output open).
    pub async fn drained(&self, grace: Duration) {
        let mut rx = self.copying.subscribe();
        if tokio::time::timeout(grace, rx.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            debug!("output still open {grace:?} after exit; reporting the exit anyway");
        }
    }

    fn take(&self, which: Which) -> Result<OwnedFd, Status> {
        let slot = match which {
            Which::Stdin => &self.stdin,
            Which::Stdout => &self.stdout,
            Which::Stderr => &self.stderr,
        };
        if which == Which::Stderr && self.terminal {
            return Err(Status::invalid_argument(
                "a process with a terminal has no separate stderr: read STDOUT",
            ));
        }
        slot.lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                Status::already_exists(format!(
                    "{which:?} of this process is already attached (or closed)"
                ))
            })
    }

    /// Attaches a client stream; the copy runs until end of stream.
    pub fn attach(self: &Arc<Self>, which: Which) -> Result<Attached, Status> {
        let fd = self.take(which)?;
        if which != Which::Stdin {
            self.copying.send_modify(|n| *n += 1);
        }
        Ok(Attached {
            stdio: self.clone(),
            which,
            fd,
        })
    }
}

/// A stream taken from a process, to be copied.
#[derive(Debug)]
pub struct Attached {
    stdio: Arc<Stdio>,
    which: Which,
    fd: OwnedFd,
}

struct Fd(OwnedFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

fn nonblocking(fd: OwnedFd) -> std::io::Result<AsyncFd<Fd>> {
    let fl = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
    fcntl(&fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
    // SAFETY: the fd is owned by the wrapper, which the AsyncFd owns: it stays
    // open, and is not reused, until the AsyncFd is dropped.
    unsafe { AsyncFd::register(Fd(fd)) }.map_err(|e| e.into_parts().1)
}

impl Attached {
    /// Copies between the process and `sock` until either side ends.
    pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(self, sock: S) {
        let which = self.which;
        let stdio = self.stdio.clone();
        let r = match which {
            Which::Stdin => copy_in(self.fd, sock, &stdio).await,
            _ => copy_out(self.fd, sock).await,
        };
        if let Err(e) = r {
            debug!(?which, error = %e, "stdio stream ended");
        }
        if which == Which::Stdin {
            stdio.close_stdin();
        } else {
            stdio.copying.send_modify(|n| *n = n.saturating_sub(1));
        }
    }
}

/// Copies a process's output `fd` (a pipe or a terminal) to `sock` until its
/// end, then shuts `sock` down. The copy is read(2) and write(2) through a
/// large buffer rather than splice(2): splice into a vsock stream sends one
/// packet per pipe page (4 KiB; vsock has no sendpage), a write of the
/// buffer sends 64 KiB packets, sixteen times fewer for the guest and the
/// host's vsock backend to handle. Measured under TCG, the write path moves
/// bulk output as fast or faster (docs/benchmarks.md).
pub async fn copy_out<S: AsyncWrite + Unpin>(fd: OwnedFd, mut sock: S) -> std::io::Result<()> {
    let afd = nonblocking(fd)?;
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let mut guard = afd.readable().await?;
        match guard.try_io(|f| {
            // SAFETY: reads into a buffer we own, of its length, from an open fd.
            let n = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => sock.write_all(&buf[..n]).await?,
            // A terminal whose last writer closed reads EIO: the end.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => break,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    sock.shutdown().await
}

async fn copy_in<S: AsyncRead + Unpin>(
    fd: OwnedFd,
    mut sock: S,
    stdio: &Stdio,
) -> std::io::Result<()> {
    let afd = nonblocking(fd)?;
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = tokio::select! {
            r = sock.read(&mut buf) => r?,
            _ = stdio.stdin_closed.notified() => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        let mut off = 0;
        while off < n {
            let mut guard = afd.writable().await?;
            match guard.try_io(|f| {
                // SAFETY: writes from a buffer we own, within its bounds.
                let w = unsafe { libc::write(f.as_raw_fd(), buf[off..n].as_ptr().cast(), n - off) };
                if w < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(w as usize)
                }
            }) {
                Ok(Ok(w)) => off += w,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

async fn read_header(s: &mut Stream) -> Result<String, Status> {
    let mut line = Vec::with_capacity(64);
    let read = async {
        loop {
            let mut b = [0u8; 1];
            match s.read(&mut b).await {
                Ok(0) => return Err(Status::invalid_argument("stdio header: end of stream")),
                Ok(_) if b[0] == b'\n' => return Ok(()),
                Ok(_) if line.len() < MAX_LINE => line.push(b[0]),
                Ok(_) => {
                    return Err(Status::invalid_argument(format!(
                        "stdio header longer than {MAX_LINE} bytes"
                    )))
                }
                Err(e) => return Err(Status::unavailable(format!("stdio header: {e}"))),
            }
        }
    };
    tokio::time::timeout(HEADER_TIMEOUT, read)
        .await
        .map_err(|_| Status::deadline_exceeded("no stdio header within 10 s"))??;
    String::from_utf8(line).map_err(|_| Status::invalid_argument("stdio header is not UTF-8"))
}

/// Serves one stdio connection: header, lookup, copy.
pub async fn handle(mut s: Stream, lookup: impl Fn(&Header) -> Result<Arc<Stdio>, Status>) {
    let attached = match read_header(&mut s).await.and_then(|l| {
        let h = parse_header(&l).map_err(Status::invalid_argument)?;
        let stdio = lookup(&h)?;
        stdio.attach(h.which)
    }) {
        Ok(a) => a,
        Err(st) => {
            let msg = format!("ERR {:?} {}\n", st.code(), st.message().replace('\n', " "));
            let _ = s.write_all(msg.as_bytes()).await;
            let _ = s.shutdown().await;
            // Read what the client still sends for a moment, so that closing
            // does not reset the connection before it read the reply.
            let mut sink = [0u8; 4096];
            let drain = async {
                let mut total = 0usize;
                while total < 1 << 16 {
                    match s.read(&mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n,
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
            return;
        }
    };
    if let Err(e) = s.write_all(b"OK\n").await {
        warn!(error = %e, "stdio client went away before the reply");
    }
    attached.run(s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pipe_output_reaches_the_client_then_eof() {
        let (stdio, child) = Stdio::new(false).unwrap();
        let [_i, o, _e] = child;
        let out = stdio.attach(Which::Stdout).unwrap();
        assert!(stdio.attach(Which::Stdout).is_err());
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let task = tokio::spawn(out.run(a));
        let data = vec![7u8; 3 << 20];
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::File::from(o);
            f.write_all(&data).unwrap();
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.join().unwrap();
        task.await.unwrap();
        assert_eq!(got.len(), 3 << 20);
        stdio.drained(Duration::from_secs(1)).await;
        assert_eq!(*stdio.copying.borrow(), 0);
    }

    /// The copy waits on the right side: a writer that pauses (the pipe
    /// runs empty) and a reader that pauses (the socket fills) lose no
    /// byte, reorder none and never hang.
    #[tokio::test]
    async fn output_survives_an_empty_pipe_and_a_full_socket() {
        let (stdio, child) = Stdio::new(false).unwrap();
        let [_i, o, _e] = child;
        let out = stdio.attach(Which::Stdout).unwrap();
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let task = tokio::spawn(out.run(a));
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::File::from(o);
            for i in 0..64u32 {
                let chunk: Vec<u8> = (0..64 * 1024).map(|j| (i as usize + j) as u8).collect();
                f.write_all(&chunk).unwrap();
                if i % 8 == 0 {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        // nothing read for a while: pipe and socket fill up
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), b.read_to_end(&mut got));
        read.await.expect("the copy ended").unwrap();
        writer.join().unwrap();
        task.await.unwrap();
        assert_eq!(got.len(), 64 * 64 * 1024);
        for (i, chunk) in got.chunks(64 * 1024).enumerate() {
            assert!(
                chunk.iter().enumerate().all(|(j, &v)| v == (i + j) as u8),
                "chunk {i} arrived whole and in order"
            );
        }
    }
}
