//! The hypervisor's uid: one of a reserved range, allocated, never shared.
//!
//! The default range starts at 0x7000_0000 (1879048192): above every range
//! `useradd` hands out for `/etc/subuid` and `/etc/subgid` (Debian's
//! `SUB_UID_MAX` is 600100000), above systemd-nspawn's container ranges, and
//! below 2^31 (tools that keep a uid in a signed int). `KATA_JAIL_UID_RANGE`
//! (`FIRST:COUNT`) moves it. Whatever the range, a uid that falls in a
//! subordinate range of `/etc/subuid` or `/etc/subgid`, names a user or group
//! in `/etc/passwd` or `/etc/group`, or is the uid or gid of a running
//! process is skipped.
//!
//! A uid is taken by holding an exclusive `flock` on `<lock dir>/<uid>`
//! (`/run/kata/.uids/`, root only) for the launcher's life. The lock goes with
//! the launcher, even if it is killed; the file records the launcher's and
//! the hypervisor's pid and start time, so a hypervisor that outlived its
//! launcher keeps its uid. The search starts at a hash of the sandbox id, so
//! a sandbox usually gets the same uid again.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::files;
use kata_proto::process::start_time;

/// First uid of the default range.
pub(crate) const DEFAULT_FIRST: u32 = 0x7000_0000;
/// Size of the default range.
pub(crate) const DEFAULT_COUNT: u32 = 65_536;
/// The environment variable that moves the range: `FIRST:COUNT`.
pub(crate) const RANGE_ENV: &str = "KATA_JAIL_UID_RANGE";

/// Why no uid could be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UidError {
    /// The configured range is unusable.
    #[error("{RANGE_ENV}={0:?}: {1}")]
    Range(String, String),
    /// The lock directory could not be used.
    #[error("uid lock directory {}: {source}", path.display())]
    LockDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Every uid of the range is taken or excluded.
    #[error("no free hypervisor uid in {first}..{end} (each is in use, locked, or in a subordinate id range)")]
    Exhausted {
        /// First uid of the range.
        first: u32,
        /// One past the last.
        end: u64,
    },
}

/// A range of uids (used as gids too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UidRange {
    /// The first uid.
    pub(crate) first: u32,
    /// How many.
    pub(crate) count: u32,
}

impl Default for UidRange {
    fn default() -> Self {
        UidRange {
            first: DEFAULT_FIRST,
            count: DEFAULT_COUNT,
        }
    }
}

impl UidRange {
    /// Parses `FIRST:COUNT`. Root's ids (0) and `(uid_t)-1` are refused.
    pub(crate) fn parse(s: &str) -> Result<UidRange, UidError> {
        let bad = |why: &str| UidError::Range(s.into(), why.into());
        let (a, b) = s
            .trim()
            .split_once(':')
            .ok_or_else(|| bad("expected FIRST:COUNT"))?;
        let first: u32 = a.trim().parse().map_err(|_| bad("FIRST is not a number"))?;
        let count: u32 = b.trim().parse().map_err(|_| bad("COUNT is not a number"))?;
        if first == 0 || count == 0 {
            return Err(bad("FIRST and COUNT must be positive"));
        }
        if u64::from(first) + u64::from(count) > u64::from(u32::MAX) {
            return Err(bad("the range must end below 4294967295"));
        }
        Ok(UidRange { first, count })
    }

    /// The range from [`RANGE_ENV`], else the default.
    pub(crate) fn from_env() -> Result<UidRange, UidError> {
        match std::env::var(RANGE_ENV) {
            Ok(s) if !s.trim().is_empty() => UidRange::parse(&s),
            _ => Ok(UidRange::default()),
        }
    }

    fn end(&self) -> u64 {
        u64::from(self.first) + u64::from(self.count)
    }
}

/// Ids the allocator never hands out: subordinate ranges and named users
/// and groups of the host. Half-open intervals.
#[derive(Debug, Clone, Default)]
pub(crate) struct Excluded(Vec<(u64, u64)>);

impl Excluded {
    /// What `/etc/subuid`, `/etc/subgid`, `/etc/passwd` and `/etc/group` of
    /// this host exclude (a missing file excludes nothing).
    pub(crate) fn host() -> Excluded {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let mut e = Excluded::default();
        e.add_subids(&read("/etc/subuid"));
        e.add_subids(&read("/etc/subgid"));
        e.add_ids(&read("/etc/passwd"), &[2, 3]);
        e.add_ids(&read("/etc/group"), &[2]);
        e
    }

    /// Adds the ranges of a subuid/subgid file (`name:first:count` lines).
    pub(crate) fn add_subids(&mut self, text: &str) {
        for l in text.lines() {
            let f: Vec<&str> = l.trim().split(':').collect();
            if let [_, first, count] = f[..] {
                if let (Ok(a), Ok(n)) = (first.parse::<u64>(), count.parse::<u64>()) {
                    self.0.push((a, a + n));
                }
            }
        }
    }

    /// Adds the ids in the colon-separated `fields` of each line.
    pub(crate) fn add_ids(&mut self, text: &str, fields: &[usize]) {
        for l in text.lines() {
            let f: Vec<&str> = l.split(':').collect();
            for &i in fields {
                if let Some(Ok(id)) = f.get(i).map(|s| s.parse::<u64>()) {
                    self.0.push((id, id + 1));
                }
            }
        }
    }

    /// Whether `id` is excluded.
    pub(crate) fn contains(&self, id: u32) -> bool {
        let id = u64::from(id);
        self.0.iter().any(|&(a, b)| a <= id && id < b)
    }
}

/// Whether any process runs with `id` as one of its uids or gids.
pub(crate) fn id_in_use(id: u32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    let want = id.to_string();
    for e in dir.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        for l in status.lines() {
            if let Some(rest) = l.strip_prefix("Uid:").or_else(|| l.strip_prefix("Gid:")) {
                if rest.split_whitespace().any(|v| v == want) {
                    return true;
                }
            }
        }
    }
    false
}

/// Hands out uids of a range.
pub(crate) struct UidAllocator {
    range: UidRange,
    lock_dir: PathBuf,
    excluded: Excluded,
    in_use: Box<dyn Fn(u32) -> bool + Send + Sync>,
}

impl std::fmt::Debug for UidAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UidAllocator")
            .field("range", &self.range)
            .field("lock_dir", &self.lock_dir)
            .finish()
    }
}

/// The default lock directory: `<run dir>/.uids` (a sandbox id never starts
/// with a dot, so this is no sandbox's directory).
pub(crate) fn default_lock_dir() -> PathBuf {
    kata_proto::paths::run_dir().join(".uids")
}

impl UidAllocator {
    /// An allocator over `range`, its locks in `lock_dir`.
    pub(crate) fn new(
        range: UidRange,
        lock_dir: PathBuf,
        excluded: Excluded,
        in_use: impl Fn(u32) -> bool + Send + Sync + 'static,
    ) -> UidAllocator {
        UidAllocator {
            range,
            lock_dir,
            excluded,
            in_use: Box::new(in_use),
        }
    }

    /// This host's allocator: the range from the environment, the host's
    /// exclusions, the default lock directory, running processes checked.
    pub(crate) fn host() -> Result<UidAllocator, UidError> {
        Ok(UidAllocator::new(
            UidRange::from_env()?,
            default_lock_dir(),
            Excluded::host(),
            id_in_use,
        ))
    }

    /// Takes a free uid, starting the search at a hash of `sandbox_id`.
    pub(crate) fn allocate(&self, sandbox_id: &str) -> Result<UidLease, UidError> {
        files::private_dir(&self.lock_dir, files::DIR_MODE, None).map_err(|source| {
            UidError::LockDir {
                path: self.lock_dir.clone(),
                source,
            }
        })?;
        let start = fnv1a(sandbox_id) % self.range.count;
        for i in 0..self.range.count {
            let uid = self.range.first + (start + i) % self.range.count;
            if self.excluded.contains(uid) {
                continue;
            }
            match self.try_take(uid) {
                Ok(Some(lease)) => {
                    if (self.in_use)(uid) {
                        debug!(uid, "uid in use by a running process, skipping it");
                        drop(lease);
                        continue;
                    }
                    return Ok(lease);
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(UidError::LockDir {
                        path: self.lock_dir.join(uid.to_string()),
                        source: e,
                    })
                }
            }
        }
        Err(UidError::Exhausted {
            first: self.range.first,
            end: self.range.end(),
        })
    }

    /// The lease of `uid` if nobody holds it.
    fn try_take(&self, uid: u32) -> io::Result<Option<UidLease>> {
        let path = self.lock_dir.join(uid.to_string());
        // the file may vanish between open and lock (its holder released
        // it): then try again on the new file
        for _ in 0..3 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(files::FILE_MODE)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)?;
            // SAFETY: flock(2) on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Ok(None);
                }
                return Err(e);
            }
            let same = match std::fs::symlink_metadata(&path) {
                Ok(m) => {
                    let f = file.metadata()?;
                    m.ino() == f.ino() && m.dev() == f.dev()
                }
                Err(_) => false,
            };
            if !same {
                continue;
            }
            let mut old = String::new();
            let _ = file.read_to_string(&mut old);
            if let Some((pid, start)) = recorded_hypervisor(&old) {
                if start_time(pid) == Some(start) {
                    warn!(
                        uid,
                        pid,
                        "the hypervisor of a dead launcher still runs with this uid; skipping it"
                    );
                    return Ok(None);
                }
            }
            let mut lease = UidLease { uid, file, path };
            lease.record(0, 0)?;
            return Ok(Some(lease));
        }
        Ok(None)
    }
}

/// FNV-1a: stable across builds and runs (unlike std's hasher).
fn fnv1a(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// `launcher <pid> <start> hypervisor <pid> <start>`: the hypervisor's part.
fn recorded_hypervisor(text: &str) -> Option<(u32, u64)> {
    let w: Vec<&str> = text.split_whitespace().collect();
    let i = w.iter().position(|&x| x == "hypervisor")?;
    let pid = w.get(i + 1)?.parse().ok()?;
    let start = w.get(i + 2)?.parse().ok()?;
    (pid != 0).then_some((pid, start))
}

/// A uid held for one VM; released (its lock file removed) when dropped.
#[derive(Debug)]
pub(crate) struct UidLease {
    uid: u32,
    file: File,
    path: PathBuf,
}

impl UidLease {
    /// The uid (and gid).
    pub(crate) fn uid(&self) -> u32 {
        self.uid
    }

    /// The lock file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Records the hypervisor running with this uid (0: none yet).
    pub(crate) fn record(&mut self, hypervisor_pid: u32, hypervisor_start: u64) -> io::Result<()> {
        let me = std::process::id();
        let text = format!(
            "launcher {me} {} hypervisor {hypervisor_pid} {hypervisor_start}\n",
            start_time(me).unwrap_or(0)
        );
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(text.as_bytes())
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        // removed while still locked: a waiter that opened the old file
        // notices (its inode is no longer the path's) and opens again
        if let Err(e) = std::fs::remove_file(&self.path) {
            debug!(path = %self.path.display(), "removing the uid lock: {e}");
        }
    }
}

/// Removes the lock file `path` of a dead launcher unless someone holds it
/// or the hypervisor it records still runs.
pub(crate) fn release_stale(path: &Path) {
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    else {
        return;
    };
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
        return;
    }
    let mut text = String::new();
    let _ = f.read_to_string(&mut text);
    if let Some((pid, start)) = recorded_hypervisor(&text) {
        if start_time(pid) == Some(start) {
            return;
        }
    }
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(dir: &Path, range: UidRange, excluded: Excluded) -> UidAllocator {
        UidAllocator::new(range, dir.into(), excluded, |_| false)
    }

    #[test]
    fn two_sandboxes_never_share_a_uid() {
        let d = tempfile::tempdir().unwrap();
        // a range of 4: a hash collision is certain among 4 sandboxes
        let a = alloc(
            d.path(),
            UidRange {
                first: 5000,
                count: 4,
            },
            Excluded::default(),
        );
        let leases: Vec<_> = (0..4)
            .map(|i| a.allocate(&format!("pod-{i}")).unwrap())
            .collect();
        let mut uids: Vec<u32> = leases.iter().map(UidLease::uid).collect();
        uids.sort();
        assert_eq!(uids, [5000, 5001, 5002, 5003]);
        // all four taken: nothing is shared, the fifth is refused
        let e = a.allocate("pod-0").unwrap_err();
        assert!(matches!(e, UidError::Exhausted { .. }), "{e}");
        // a second allocator (another launcher) sees the same locks
        let b = alloc(
            d.path(),
            UidRange {
                first: 5000,
                count: 4,
            },
            Excluded::default(),
        );
        assert!(b.allocate("other").is_err());
        for l in &leases {
            let m = std::fs::metadata(l.path()).unwrap();
            assert_eq!(m.mode() & 0o777, 0o600);
        }
        assert_eq!(std::fs::metadata(d.path()).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn a_released_uid_is_reused() {
        let d = tempfile::tempdir().unwrap();
        let a = alloc(
            d.path(),
            UidRange {
                first: 7000,
                count: 2,
            },
            Excluded::default(),
        );
        let l1 = a.allocate("x").unwrap();
        let l2 = a.allocate("y").unwrap();
        let freed = l1.uid();
        drop(l1);
        assert!(
            !d.path().join(freed.to_string()).exists(),
            "the lock file goes"
        );
        let l3 = a.allocate("z").unwrap();
        assert_eq!(l3.uid(), freed);
        assert_ne!(l3.uid(), l2.uid());
        // same id, same uid when free: stable across restarts
        drop(l3);
        let again = a.allocate("x").unwrap().uid();
        drop(l2);
        assert_eq!(a.allocate("x").unwrap().uid(), again);
    }

    #[test]
    fn a_crashed_launcher_leaves_no_lock_but_its_live_hypervisor_keeps_the_uid() {
        let d = tempfile::tempdir().unwrap();
        let a = alloc(
            d.path(),
            UidRange {
                first: 9000,
                count: 1,
            },
            Excluded::default(),
        );
        // a dead launcher's file, nobody holding the lock: taken again
        std::fs::write(d.path().join("9000"), "launcher 1 1 hypervisor 0 0\n").unwrap();
        assert_eq!(a.allocate("p").unwrap().uid(), 9000);
        // a dead launcher whose hypervisor (here: this process) still runs
        let me = std::process::id();
        let rec = format!("launcher 1 1 hypervisor {me} {}\n", start_time(me).unwrap());
        std::fs::write(d.path().join("9000"), &rec).unwrap();
        assert!(a.allocate("p").is_err());
        release_stale(&d.path().join("9000"));
        assert!(
            d.path().join("9000").exists(),
            "kept while its hypervisor runs"
        );
        // a pid that was reused (other start time) does not count
        std::fs::write(
            d.path().join("9000"),
            format!("launcher 1 1 hypervisor {me} 1\n"),
        )
        .unwrap();
        let mut l = a.allocate("p").unwrap();
        l.record(me, 42).unwrap();
        let text = std::fs::read_to_string(l.path()).unwrap();
        assert!(
            text.contains(&format!("launcher {me} "))
                && text.contains(&format!("hypervisor {me} 42")),
            "{text}"
        );
    }

    #[test]
    fn subordinate_ranges_and_named_ids_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let mut ex = Excluded::default();
        ex.add_subids("alice:100000:65536\nbob:165536:65536\n# junk\nbad:line\n");
        ex.add_ids(
            "root:x:0:0::/root:/bin/sh\nsvc:x:231072:231073::/:/bin/false\n",
            &[2, 3],
        );
        assert!(
            ex.contains(100000)
                && ex.contains(231071)
                && ex.contains(231072)
                && ex.contains(231073)
        );
        assert!(!ex.contains(99999) && !ex.contains(231074));
        // a range that starts inside alice's and bob's subordinate ids
        let a = alloc(
            d.path(),
            UidRange {
                first: 200000,
                count: 40000,
            },
            ex.clone(),
        );
        for i in 0..50 {
            let l = a.allocate(&format!("pod-{i}")).unwrap();
            assert!(!ex.contains(l.uid()), "{} is excluded", l.uid());
            assert!(l.uid() >= 231074, "{}", l.uid());
            std::mem::forget(l); // keep it taken
        }
        // a process using a uid: skipped too
        let busy = UidAllocator::new(
            UidRange {
                first: 300,
                count: 2,
            },
            d.path().into(),
            Excluded::default(),
            |u| u == 300,
        );
        assert_eq!(busy.allocate("a").unwrap().uid(), 301);
    }

    #[test]
    fn the_default_range_avoids_this_hosts_subordinate_ids() {
        let r = UidRange::default();
        let ex = Excluded::host();
        // sampled: a subordinate range is 65536 long by default
        let mut u = u64::from(r.first);
        while u < r.end() {
            assert!(
                !ex.contains(u as u32),
                "{u} is in a subordinate range of this host"
            );
            u += 4096;
        }
        assert!(r.first > 600_100_000 && r.end() <= 1 << 31);
    }

    #[test]
    fn range_parsing() {
        assert_eq!(
            UidRange::parse("2000000000:1000").unwrap(),
            UidRange {
                first: 2_000_000_000,
                count: 1000
            }
        );
        for bad in ["", "5", "0:10", "10:0", "a:b", "4294967200:1000"] {
            assert!(UidRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn processes_are_seen() {
        assert!(id_in_use(nix::unistd::getuid().as_raw()));
        assert!(!id_in_use(4_000_000_000));
    }
}
