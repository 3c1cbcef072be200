//! A process's stdio: containerd's FIFOs joined to the agent's per-process
//! streams (one raw connection per stream on the stdio port).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use kata_proto::dialer::Address;
use kata_proto::stdio::{attach, AttachError, Which};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// The FIFO paths containerd gave for one process (empty: none).
#[derive(Debug, Clone, Default)]
pub struct Paths {
    /// stdin FIFO.
    pub stdin: String,
    /// stdout FIFO.
    pub stdout: String,
    /// stderr FIFO (unused with a terminal).
    pub stderr: String,
    /// A terminal: one output stream.
    pub terminal: bool,
}

/// The copy tasks of one process.
#[derive(Debug, Default)]
pub struct Copies {
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<JoinHandle<()>>,
    stdin_path: Option<PathBuf>,
    /// Tells the stdin copy that containerd is done writing (CloseIO).
    stdin_done: Option<tokio::sync::oneshot::Sender<()>>,
}

const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an output waits for containerd to open its FIFO's reading end.
const OUTPUT_READER_WAIT: Duration = Duration::from_secs(5);
/// How long CloseIO lets the stdin copy deliver what the FIFO still holds.
const STDIN_DRAIN: Duration = Duration::from_secs(10);
const BUF: usize = 128 * 1024;
/// The output FIFOs' pipe buffer (Linux's default is 64 KiB; 1 MiB is the
/// default most a process may set, /proc/sys/fs/pipe-max-size): fewer
/// wake-ups of the shim and of the reader for bulk output.
const FIFO_SIZE: i32 = 1 << 20;

/// Attaches the outputs (before the process starts, so no byte is lost).
pub async fn attach_outputs(
    agent: &Address,
    cid: &str,
    exec_id: &str,
    p: &Paths,
) -> Result<Copies> {
    let mut copies = Copies::default();
    let mut outs = vec![(Which::Stdout, p.stdout.clone())];
    if !p.terminal {
        outs.push((Which::Stderr, p.stderr.clone()));
    }
    for (which, path) in outs {
        let stream = match attach(agent, which, cid, exec_id, ATTACH_TIMEOUT).await {
            Ok(s) => Some(s),
            // The agent policy refuses this output (ReadStreamRequest): the
            // process runs, its FIFO gets no byte and its end at once.
            Err(AttachError::Refused { code, message, .. }) if code == "PermissionDenied" => {
                warn!(container = cid, exec_id, "{}: {message}", which.as_str());
                None
            }
            Err(e) => {
                return Err(e).with_context(|| format!("attaching {} of {cid}", which.as_str()))
            }
        };
        if !path.is_empty() {
            use std::os::unix::fs::FileTypeExt;
            let meta = std::fs::metadata(&path)
                .with_context(|| format!("the {} FIFO {path}", which.as_str()))?;
            if !meta.file_type().is_fifo() {
                anyhow::bail!("the {} FIFO {path}: not a FIFO", which.as_str());
            }
        }
        copies.outputs.push(tokio::spawn(copy_out(stream, path)));
    }
    Ok(copies)
}

/// Grows the pipe buffer of an output FIFO to [`FIFO_SIZE`] (or as far as
/// the system allows); a FIFO that cannot grow still works.
fn grow_pipe(fifo: &impl std::os::fd::AsFd, path: &str) {
    use nix::fcntl::{fcntl, FcntlArg};
    if let Err(e) = fcntl(fifo, FcntlArg::F_SETPIPE_SZ(FIFO_SIZE)) {
        debug!("{path}: keeping the default pipe size: {e}");
    }
}

/// Opens output FIFO `path` for writing once its reader has it open.
/// containerd opens its end asynchronously, and what is written into a FIFO
/// before any reader opened it is lost when the writer closes it (a short
/// process's whole output). The process's output waits meanwhile (the
/// stream is not read). No reader within [`OUTPUT_READER_WAIT`]: `None`,
/// the output is discarded.
async fn open_output(path: &str) -> Option<tokio::net::unix::pipe::Sender> {
    let deadline = tokio::time::Instant::now() + OUTPUT_READER_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        // write-only and non-blocking: ENXIO until a reader is there
        match tokio::net::unix::pipe::OpenOptions::new().open_sender(path) {
            Ok(fifo) => {
                grow_pipe(&fifo, path);
                return Some(fifo);
            }
            Err(e)
                if e.raw_os_error() == Some(libc::ENXIO)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => {
                warn!("output FIFO {path}: {e}; discarding this output");
                return None;
            }
        }
    }
}

async fn copy_out(from: Option<kata_proto::dialer::Stream>, path: String) {
    let Some(mut from) = from else {
        return;
    };
    let mut to = if path.is_empty() {
        None
    } else {
        open_output(&path).await
    };
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(w) = to.as_mut() {
            if let Err(e) = w.write_all(&buf[..n]).await {
                debug!("output FIFO: {e}; discarding the rest");
                to = None;
            }
        }
    }
}

/// Attaches stdin: containerd's FIFO to the agent, closing the process's
/// stdin when the writer closes.
pub async fn attach_stdin(
    copies: &mut Copies,
    agent: &Address,
    cid: &str,
    exec_id: &str,
    p: &Paths,
) -> Result<()> {
    if p.stdin.is_empty() {
        return Ok(());
    }
    let stream = match attach(agent, Which::Stdin, cid, exec_id, ATTACH_TIMEOUT).await {
        Ok(s) => s,
        // The agent policy refuses stdin (WriteStreamRequest): the process
        // runs without input; containerd's writer is never read.
        Err(AttachError::Refused { code, message, .. }) if code == "PermissionDenied" => {
            warn!(container = cid, exec_id, "STDIN: {message}");
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("attaching STDIN of {cid}")),
    };
    let path = PathBuf::from(&p.stdin);
    copies.stdin_path = Some(path.clone());
    let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
    copies.stdin_done = Some(done_tx);
    copies.stdin = Some(tokio::spawn(copy_stdin(path, stream, done)));
    Ok(())
}

/// Copies stdin FIFO `path` to the agent's `stream` until the FIFO's end or,
/// once `done` fires (CloseIO), until what the FIFO holds then; then ends
/// the process's stdin (half-closes the stream).
async fn copy_stdin<W: AsyncWrite + Unpin>(
    path: PathBuf,
    mut stream: W,
    mut done: tokio::sync::oneshot::Receiver<()>,
) {
    // a blocking open waits for containerd's writer; an early read-only
    // non-blocking open would read EOF before the writer came
    let file = match tokio::task::spawn_blocking(move || std::fs::File::open(path)).await {
        Ok(Ok(f)) => f,
        _ => return,
    };
    // the same open FIFO, for reading it directly at CloseIO (below)
    let Ok(mut rest) = file.try_clone() else {
        return;
    };
    let Ok(mut fifo) = tokio::net::unix::pipe::Receiver::from_file(file) else {
        return;
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            biased;
            r = fifo.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            },
            // CloseIO: containerd wrote its last byte but may still
            // hold the FIFO open (ctr closes it only after CloseIO
            // returns): what the FIFO holds now is the rest. It is
            // read with read(2) itself (non-blocking: from_file set
            // O_NONBLOCK), not try_read: for a FIFO registered a moment
            // ago tokio may not know it is readable yet, and try_read
            // then answers WouldBlock without reading (found by the
            // soak: about 1 exec in 100 fed on stdin under load got
            // none of it).
            _ = &mut done => {
                use std::io::Read;
                while let Ok(n) = rest.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                break;
            }
        }
    }
    let _ = stream.shutdown().await;
}

impl Copies {
    /// Waits (bounded) until the outputs delivered their last byte, then
    /// ends the stdin copy.
    pub async fn finish(&mut self, timeout: Duration) {
        let outs = std::mem::take(&mut self.outputs);
        let _ = tokio::time::timeout(timeout, futures_join_all(outs)).await;
        self.close_stdin();
    }

    /// Stops copying stdin (and unblocks a FIFO open still waiting for a writer).
    pub fn close_stdin(&mut self) {
        if let Some(h) = self.stdin.take() {
            if !h.is_finished() {
                self.unblock_stdin_open();
                h.abort();
            }
        }
    }

    /// containerd is done writing stdin (CloseIO): the copy delivers what
    /// the FIFO still holds, then ends the process's stdin. The returned
    /// future waits for that (at most [`STDIN_DRAIN`], then stops the copy).
    pub fn end_stdin(&mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        if let Some(done) = self.stdin_done.take() {
            let _ = done.send(());
        }
        let copy = self.stdin.take();
        if copy.as_ref().is_some_and(|h| !h.is_finished()) {
            // a copy still waiting in open(O_RDONLY) gets its writer (none
            // is coming) and reads the end at once
            self.unblock_stdin_open();
        }
        async move {
            if let Some(mut h) = copy {
                if tokio::time::timeout(STDIN_DRAIN, &mut h).await.is_err() {
                    warn!("stdin: the copy did not end {STDIN_DRAIN:?} after CloseIO; stopping it");
                    h.abort();
                }
            }
        }
    }

    /// A waiting open(O_RDONLY) of the stdin FIFO returns once a writer
    /// appears: opens one (and closes it at once).
    fn unblock_stdin_open(&self) {
        if let Some(p) = &self.stdin_path {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(p);
        }
    }
}

impl Drop for Copies {
    fn drop(&mut self) {
        self.close_stdin();
        for h in &self.outputs {
            h.abort();
        }
    }
}

async fn futures_join_all(hs: Vec<JoinHandle<()>>) {
    for h in hs {
        let _ = h.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output FIFO in a fresh directory, and the shim's end of an agent
    /// stream that delivered `output` and ended.
    async fn fifo_and_ended_stream(
        output: &[u8],
    ) -> (tempfile::TempDir, PathBuf, kata_proto::dialer::Stream) {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("stdout");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (mut guest, shim_end) = tokio::net::UnixStream::pair().unwrap();
        guest.write_all(output).await.unwrap();
        drop(guest);
        (dir, fifo, kata_proto::dialer::Stream::Unix(shim_end))
    }

    /// Found by the soak: a short process's whole output was written into
    /// the FIFO and the FIFO closed before containerd's reader had opened
    /// it (containerd opens it from a goroutine): the output was lost.
    #[tokio::test]
    async fn output_waits_for_a_late_reader() {
        let (_dir, fifo, stream) = fifo_and_ended_stream(b"the whole output\n").await;
        let copy = tokio::spawn(copy_out(Some(stream), fifo.display().to_string()));
        // the reader comes late, after the process's output ended
        tokio::time::sleep(Duration::from_millis(300)).await;
        let read = tokio::task::spawn_blocking(move || std::fs::read(fifo));
        copy.await.unwrap();
        assert_eq!(read.await.unwrap().unwrap(), b"the whole output\n");
    }

    /// Found by the soak: CloseIO came before the stdin copy had run once
    /// after opening the FIFO; tokio did not know yet that the FIFO was
    /// readable, the drain read nothing and the process got no stdin.
    #[tokio::test]
    async fn stdin_written_before_close_io_arrives_even_if_the_copy_starts_after_it() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdin");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // containerd's writer: the bytes, and the FIFO still open
        let p = path.clone();
        let writer = std::thread::spawn(move || {
            let mut w = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            w.write_all(b"stdin-ok\n").unwrap();
            std::thread::sleep(Duration::from_millis(500));
        });
        let (done_tx, done) = tokio::sync::oneshot::channel();
        done_tx.send(()).unwrap(); // CloseIO, before the copy ran
        let (shim_end, mut agent_end) = tokio::net::UnixStream::pair().unwrap();
        copy_stdin(path, shim_end, done).await;
        let mut got = Vec::new();
        agent_end.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"stdin-ok\n");
        writer.join().unwrap();
    }

    #[tokio::test]
    async fn an_output_nobody_reads_is_dropped_in_time() {
        let (_dir, fifo, stream) = fifo_and_ended_stream(b"nobody reads this").await;
        let t0 = std::time::Instant::now();
        copy_out(Some(stream), fifo.display().to_string()).await;
        assert!(t0.elapsed() >= OUTPUT_READER_WAIT);
    }
}
