//! The guest console on the host, bounded.
//!
//! QEMU's serial console (its stdout) and its stderr go into a pipe whose
//! write end is non-blocking: when the pipe is full QEMU's 16550 model retries
//! a few times and then drops the byte, so a slow reader never stalls the
//! guest. A launcher thread reads the pipe and appends to the console log,
//! which never holds more than its cap on disk: `console.log` grows to half
//! the cap, then becomes `console.log.1` (replacing the older half, whose
//! bytes are counted as dropped) and a new `console.log` starts with a line
//! saying how much was dropped so far. Reading a log back for an error
//! message ([`tail`]) reads only its last few KiB.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::files;

/// Most console bytes on disk per VM, `console.log` and `console.log.1` together.
pub(crate) const CONSOLE_CAP: u64 = 1 << 20;
/// How much of the end of a log [`tail`] reads.
pub(crate) const TAIL_BYTES: u64 = 8 * 1024;
/// Lines [`tail`] returns.
const TAIL_LINES: usize = 8;

/// Counters of a console log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ConsoleStats {
    /// Bytes received from the hypervisor.
    pub(crate) received: u64,
    /// Bytes rotated away (no longer on disk).
    pub(crate) dropped: u64,
    /// Rotations.
    pub(crate) rotations: u64,
}

/// An append-only log that keeps at most `cap` bytes on disk (two halves).
#[derive(Debug)]
pub(crate) struct BoundedLog {
    path: PathBuf,
    older: PathBuf,
    half: u64,
    file: File,
    size: u64,
    older_size: u64,
    /// Counters.
    pub(crate) stats: ConsoleStats,
}

/// `<path>.1`, the older half of a console log.
pub(crate) fn rotated_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

impl BoundedLog {
    /// Opens `path` for appending (created 0600 if missing, never through a
    /// symlink); what is already there counts toward the cap.
    pub(crate) fn open(path: &Path, cap: u64) -> io::Result<BoundedLog> {
        let cap = cap.max(8 * 1024);
        let file = files::private_file(path, true, false)?;
        let size = file.metadata()?.len();
        let older = rotated_path(path);
        let older_size = std::fs::symlink_metadata(&older)
            .map(|m| m.len())
            .unwrap_or(0);
        Ok(BoundedLog {
            path: path.into(),
            older,
            half: cap / 2,
            file,
            size,
            older_size,
            stats: ConsoleStats::default(),
        })
    }

    /// Appends `buf`, rotating as often as needed so that at most the cap is
    /// on disk.
    pub(crate) fn write(&mut self, mut buf: &[u8]) -> io::Result<()> {
        self.stats.received += buf.len() as u64;
        while !buf.is_empty() {
            let room = self.half.saturating_sub(self.size);
            if room == 0 {
                self.rotate()?;
                continue;
            }
            // more than a whole half in one go: only its end can stay on disk
            if buf.len() as u64 > 2 * self.half {
                let skip = buf.len() - (2 * self.half) as usize;
                self.stats.dropped += skip as u64;
                buf = &buf[skip..];
                continue;
            }
            let n = (room as usize).min(buf.len());
            self.file.write_all(&buf[..n])?;
            self.size += n as u64;
            buf = &buf[n..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.stats.rotations == 0 {
            warn!(
                path = %self.path.display(),
                cap = 2 * self.half,
                "guest console output reached its cap: rotating, older output is dropped"
            );
        }
        self.stats.rotations += 1;
        self.stats.dropped += self.older_size;
        std::fs::rename(&self.path, &self.older)?;
        self.older_size = self.size;
        self.file = files::private_file(&self.path, false, true)?;
        self.size = 0;
        let note = format!(
            "[kata-vmm-launcher: console log rotated (cap {} bytes); {} bytes dropped so far]\n",
            2 * self.half,
            self.stats.dropped
        );
        self.file.write_all(note.as_bytes())?;
        self.size = note.len() as u64;
        Ok(())
    }

    /// The path of the log.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// A pipe for the hypervisor's console: (read end, blocking; write end,
/// non-blocking). Both close on exec.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2(2) fills the two-element array; the result is checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(w.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(w.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((r, w))
}

/// Copies everything from `from` into `log` until end of file (the last
/// writer closed), on a thread of its own. The receiver gets the final
/// counters once every byte was written.
pub(crate) fn spawn_reader(
    from: OwnedFd,
    mut log: BoundedLog,
) -> io::Result<tokio::sync::oneshot::Receiver<ConsoleStats>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            let mut from = File::from(from);
            let mut buf = vec![0u8; 64 * 1024];
            let mut failed = false;
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        warn!("reading the guest console: {e}");
                        break;
                    }
                };
                // a failing disk must not stall the guest: keep draining
                if let Err(e) = log.write(&buf[..n]) {
                    if !failed {
                        warn!(path = %log.path().display(), "writing the console log: {e}; dropping console output");
                        failed = true;
                    }
                }
            }
            if log.stats.dropped > 0 {
                info!(
                    received = log.stats.received,
                    dropped = log.stats.dropped,
                    rotations = log.stats.rotations,
                    "guest console closed; output beyond the cap was dropped"
                );
            }
            let _ = tx.send(log.stats);
        })?;
    Ok(rx)
}

/// The last few lines of a log (read from its last [`TAIL_BYTES`], and from
/// the end of `<path>.1` if the log itself is shorter), for error messages.
/// Control characters are replaced: the guest wrote them.
pub(crate) fn tail(path: &Path) -> String {
    fn last(path: &Path, n: u64) -> Vec<u8> {
        let Ok(mut f) = File::open(path) else {
            return vec![];
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let from = len.saturating_sub(n);
        if f.seek(SeekFrom::Start(from)).is_err() {
            return vec![];
        }
        let mut v = Vec::with_capacity((len - from) as usize);
        let _ = f.take(n).read_to_end(&mut v);
        v
    }
    let mut bytes = last(path, TAIL_BYTES);
    if (bytes.len() as u64) < TAIL_BYTES {
        let mut older = last(&rotated_path(path), TAIL_BYTES - bytes.len() as u64);
        older.extend_from_slice(&bytes);
        bytes = older;
    }
    let text: String = String::from_utf8_lossy(&bytes)
        .chars()
        .map(|c| if c == '\n' || !c.is_control() { c } else { ' ' })
        .collect();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "(empty)".into();
    }
    lines[lines.len().saturating_sub(TAIL_LINES)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn on_disk(p: &Path) -> u64 {
        [p.to_path_buf(), rotated_path(p)]
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    /// 200 MiB through the same pipe and reader the hypervisor's console uses
    /// leave at most the cap on disk, and the end of the output is kept.
    #[test]
    fn console_flood_stays_within_the_cap() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("console.log");
        let log = BoundedLog::open(&path, CONSOLE_CAP).unwrap();
        let (r, w) = pipe().unwrap();
        let done = spawn_reader(r, log).unwrap();
        const TOTAL: u64 = 200 << 20;
        let mut w = File::from(w);
        let line: Vec<u8> =
            b"guest console flood 0123456789abcdefghijklmnopqrstuvwxyz\n".repeat(1024);
        let mut sent = 0u64;
        let mut full = 0u64;
        let mut max_seen = 0u64;
        let wait_writable = |w: &File| {
            let mut p = libc::pollfd {
                fd: w.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 1000) };
        };
        let t0 = std::time::Instant::now();
        while sent < TOTAL {
            // the writer's end is non-blocking, as QEMU's: a full pipe says
            // so at once (QEMU then drops); here the test waits and retries
            // so that all 200 MiB go through the reader
            match w.write(&line) {
                Ok(n) => sent += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    full += 1;
                    wait_writable(&w);
                }
                Err(e) => panic!("{e}"),
            }
            if sent % (16 << 20) < line.len() as u64 {
                max_seen = max_seen.max(on_disk(&path));
            }
        }
        loop {
            match w.write(b"the last line\n") {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(&w),
                Err(e) => panic!("{e}"),
            }
        }
        drop(w);
        let stats = done.blocking_recv().unwrap();
        let elapsed = t0.elapsed();
        eprintln!(
            "console: {} MiB through the pipe in {elapsed:?} (pipe full {full} times), {} bytes on disk, {} rotations",
            stats.received >> 20,
            on_disk(&path),
            stats.rotations
        );
        assert_eq!(stats.received, sent + b"the last line\n".len() as u64);
        assert!(full > 0, "a full pipe never blocks the writer");
        // on disk: the newest output (plus one note line per file)
        assert!(
            stats.dropped + on_disk(&path) >= stats.received,
            "{stats:?}"
        );
        assert!(on_disk(&path) <= CONSOLE_CAP, "{}", on_disk(&path));
        assert!(max_seen <= CONSOLE_CAP, "{max_seen}");
        for p in [path.clone(), rotated_path(&path)] {
            assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        }
        assert!(tail(&path).ends_with("the last line"), "{}", tail(&path));
        let head = std::fs::read_to_string(&path).unwrap();
        assert!(
            head.starts_with("[kata-vmm-launcher: console log rotated"),
            "{}",
            &head[..100]
        );
    }

    #[test]
    fn tail_reads_only_the_end() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("c.log");
        assert_eq!(tail(&path), "(empty)");
        let mut log = BoundedLog::open(&path, 64 * 1024).unwrap();
        for i in 0..10_000 {
            log.write(format!("line {i}\n").as_bytes()).unwrap();
        }
        log.write(b"\x1b[31mred\x07\n").unwrap();
        let t = tail(&path);
        assert!(t.ends_with("line 9999 |  [31mred "), "{t}");
        assert_eq!(t.split(" | ").count(), TAIL_LINES);
        // a huge last line: still only the last TAIL_BYTES are read
        log.write(&vec![b'x'; 40_000]).unwrap();
        // (" | " joins the lines: 2 more bytes per line break)
        assert!(tail(&path).len() <= TAIL_BYTES as usize + 2 * TAIL_LINES);
        // just after a rotation the older half supplies the lines
        let mut log = BoundedLog::open(&d.path().join("r.log"), 16 * 1024).unwrap();
        for i in 0..3000 {
            log.write(format!("l{i}\n").as_bytes()).unwrap();
        }
        assert!(log.stats.rotations > 0);
        let t = tail(log.path());
        assert!(t.ends_with("l2999"), "{t}");
    }

    #[test]
    fn reopening_counts_what_is_there() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("c.log");
        std::fs::write(&path, vec![b'a'; 10_000]).unwrap();
        let mut log = BoundedLog::open(&path, 16 * 1024).unwrap();
        log.write(&[b'b'; 10_000]).unwrap();
        assert!(on_disk(&path) <= 16 * 1024);
        assert!(log.stats.rotations >= 1);
    }
}
