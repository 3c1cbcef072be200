//! Process stdio: pipes or a terminal per process, and the stdio port where
//! the host attaches one raw byte stream per stdin/stdout/stderr.
//!
//! The protocol is in [`kata_proto::stdio`].

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kata_proto::dialer::Stream;
use kata_proto::stdio::{parse_header, splice_sends_pages, Header, Which, MAX_LINE};
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
    pub async fn run<S: AsyncRead + AsyncWrite + AsFd + Unpin>(self, sock: S) {
        self.run_splicing(sock, *SPLICE_OUTPUT).await
    }

    /// [`Attached::run`], output pipes spliced or not.
    async fn run_splicing<S: AsyncRead + AsyncWrite + AsFd + Unpin>(self, sock: S, splice: bool) {
        let which = self.which;
        let stdio = self.stdio.clone();
        let r = match which {
            Which::Stdin => copy_in(self.fd, sock, &stdio).await,
            _ => copy_out_with(self.fd, sock, splice).await,
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
/// end, then shuts `sock` down.
///
/// On the kata-rs guest kernel a pipe's bytes move with splice(2): its
/// vsock sends the pipe's pages to the device by reference, up to 64 KiB
/// per packet (bins/kernel-patches/vsock-splice-pages.patch), so the
/// process's write into the pipe is the only copy in the guest. Elsewhere
/// the copy is read(2) and write(2) through a large buffer: a stock 6.1
/// vsock has no sendpage, and splice would copy each page into a packet of
/// its own, 4 KiB, which costs more than the second copy
/// (docs/benchmarks.md).
pub async fn copy_out<S: AsyncWrite + AsFd + Unpin>(fd: OwnedFd, sock: S) -> std::io::Result<()> {
    copy_out_with(fd, sock, *SPLICE_OUTPUT).await
}

/// [`copy_out`], a pipe spliced or not.
async fn copy_out_with<S: AsyncWrite + AsFd + Unpin>(
    fd: OwnedFd,
    mut sock: S,
    splice: bool,
) -> std::io::Result<()> {
    // a terminal is never spliced
    let splice = splice
        && nix::sys::stat::fstat(&fd).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO);
    let afd = nonblocking(fd)?;
    if splice {
        splice_out(&afd, &sock).await?;
        return sock.shutdown().await;
    }
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

/// Whether output pipes are spliced: decided once, from the running kernel.
static SPLICE_OUTPUT: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
    nix::sys::utsname::uname().is_ok_and(|u| splice_sends_pages(&u.release().to_string_lossy()))
});

/// Moves everything from `pipe` to `sock` with splice(2), until the pipe's
/// end. The socket's writability is watched through a duplicate of its fd
/// (epoll keys on the fd, so the stream's own registration stays as it is).
async fn splice_out(pipe: &AsyncFd<Fd>, sock: &impl AsFd) -> std::io::Result<()> {
    let dup = Fd(sock.as_fd().try_clone_to_owned()?);
    // SAFETY: the duplicate is owned by the wrapper the AsyncFd owns: it
    // stays open, and is not reused, until the AsyncFd is dropped.
    let out = unsafe { AsyncFd::register_with_interest(dup, tokio::io::Interest::WRITABLE) }
        .map_err(|e| e.into_parts().1)?;
    loop {
        let mut can_write = out.writable().await?;
        let mut can_read = pipe.readable().await?;
        // SAFETY: splice between two open fds with null offsets (a pipe and
        // a socket have none); the kernel checks the rest.
        let n = unsafe {
            libc::splice(
                pipe.as_raw_fd(),
                std::ptr::null_mut(),
                out.as_raw_fd(),
                std::ptr::null_mut(),
                SPLICE_CHUNK,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        match n {
            0 => return Ok(()),
            1.. => continue,
            _ => {}
        }
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(e);
        }
        // Which side would block? Only a side that is not ready now loses
        // its readiness; an event after this look sets it again (tokio
        // clears only the readiness this guard saw).
        let (readable, writable) = ready_now(pipe.as_raw_fd(), out.as_raw_fd());
        if !readable {
            can_read.clear_ready();
        }
        if !writable {
            can_write.clear_ready();
        }
    }
}

/// The most one splice(2) call moves: the whole of a grown pipe.
const SPLICE_CHUNK: usize = 1 << 20;

/// Whether `input` can be read and `output` written now (poll(2), no wait).
/// A hung-up or failed side counts as ready: the next call reports it.
fn ready_now(input: std::os::fd::RawFd, output: std::os::fd::RawFd) -> (bool, bool) {
    let mut fds = [
        libc::pollfd {
            fd: input,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: output,
            events: libc::POLLOUT,
            revents: 0,
        },
    ];
    // SAFETY: two pollfds we own, no wait.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 0) };
    if n < 0 {
        return (true, true);
    }
    (fds[0].revents != 0, fds[1].revents != 0)
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
        for splice in [false, true] {
            pipe_output_reaches_the_client(splice).await;
        }
    }

    async fn pipe_output_reaches_the_client(splice: bool) {
        let (stdio, child) = Stdio::new(false).unwrap();
        let [_i, o, _e] = child;
        let out = stdio.attach(Which::Stdout).unwrap();
        assert!(stdio.attach(Which::Stdout).is_err());
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let task = tokio::spawn(out.run_splicing(a, splice));
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
        for splice in [false, true] {
            output_survives_pauses(splice).await;
        }
    }

    async fn output_survives_pauses(splice: bool) {
        let (stdio, child) = Stdio::new(false).unwrap();
        let [_i, o, _e] = child;
        let out = stdio.attach(Which::Stdout).unwrap();
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let task = tokio::spawn(out.run_splicing(a, splice));
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
        assert_eq!(got.len(), 64 * 64 * 1024, "splice: {splice}");
        for (i, chunk) in got.chunks(64 * 1024).enumerate() {
            assert!(
                chunk.iter().enumerate().all(|(j, &v)| v == (i + j) as u8),
                "chunk {i} arrived whole and in order (splice: {splice})"
            );
        }
    }

    #[test]
    fn only_the_kata_rs_kernel_splices_output() {
        assert!(splice_sends_pages("6.1.192-kata-rs"));
        assert!(!splice_sends_pages("6.1.0-57-cloud-amd64"));
        assert!(!splice_sends_pages("6.1.192-kata-rs-old"));
    }
}
