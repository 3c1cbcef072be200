//! Node-wide boot slots: at most N guests of this node boot at the same
//! time. A guest boot under TCG is pure CPU work; ten pods started together
//! on two cores otherwise share the CPUs ten ways, every boot slows to a
//! tenth, none is ready before nearly all are, and the interleaving itself
//! costs CPU (docs/benchmarks.md). With slots the boots run a few at a time
//! at full speed, the first pods are ready early, the last no later.
//!
//! A slot is an advisory lock (flock(2)) on one of N files in a directory
//! shared by every shim of the node. The kernel drops it when its holder
//! closes the file or dies, so a crashed shim never keeps a slot. A caller
//! that finds no free slot within its deadline boots without one: a slot
//! shapes start-up, it never fails a pod.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a waiting boot looks for a free slot.
const POLL: Duration = Duration::from_millis(10);

/// The directory of the slot files under the run directory. Its name
/// starts with a dot, which no sandbox id may: it is never a pod's.
pub fn dir() -> PathBuf {
    crate::paths::run_dir().join(".boot-slots")
}

/// How many guests may boot at once for `configured` (the configuration's
/// `max_concurrent_boots`: -1 chooses, 0 is no limit) on an accelerator.
/// -1 under TCG: the host CPUs this process may run on (each boot keeps a
/// CPU busy); with KVM a boot is short and waits on I/O too: no limit.
pub fn count(configured: i32, tcg: bool) -> usize {
    match configured {
        n if n > 0 => n as usize,
        0 => 0,
        _ if tcg => std::thread::available_parallelism().map_or(1, |n| n.get()),
        _ => 0,
    }
}

/// A held slot; dropping it lets the next boot go.
#[derive(Debug)]
pub struct Slot {
    _file: File,
    /// Which slot (0-based).
    pub index: usize,
}

/// What [`acquire`] got.
#[derive(Debug)]
pub enum Acquired {
    /// A slot, after waiting this long.
    Slot(Slot, Duration),
    /// No limit is configured.
    Unlimited,
    /// Every slot stayed taken until the deadline: boot without one.
    TimedOut(Duration),
}

fn try_lock(dir: &Path, index: usize) -> std::io::Result<Option<Slot>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("slot-{index}")))?;
    // SAFETY: flock on an fd we own; LOCK_NB never blocks.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(Slot { _file: file, index }));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Takes one of `n` slots in `dir` (0: no limit), waiting up to `deadline`.
/// `waiting` is called once if the first look finds every slot taken.
/// Errors are the slot directory's (it cannot be made or opened).
pub async fn acquire(
    dir: &Path,
    n: usize,
    deadline: Duration,
    waiting: impl FnOnce(),
) -> std::io::Result<Acquired> {
    if n == 0 {
        return Ok(Acquired::Unlimited);
    }
    std::fs::create_dir_all(dir)?;
    let start = tokio::time::Instant::now();
    let mut waiting = Some(waiting);
    // start at a different slot per caller, so waiters do not all try slot 0
    let first = std::process::id() as usize;
    loop {
        for i in 0..n {
            if let Some(slot) = try_lock(dir, (first + i) % n)? {
                return Ok(Acquired::Slot(slot, start.elapsed()));
            }
        }
        if let Some(w) = waiting.take() {
            w();
        }
        if start.elapsed() >= deadline {
            return Ok(Acquired::TimedOut(start.elapsed()));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_follows_the_configuration_and_the_accelerator() {
        assert_eq!(count(3, false), 3);
        assert_eq!(count(3, true), 3);
        assert_eq!(count(0, true), 0);
        assert_eq!(count(-1, false), 0);
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(count(-1, true), cpus);
    }

    #[tokio::test]
    async fn at_most_n_holders_and_a_dropped_slot_frees_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let long = Duration::from_secs(5);
        let a = acquire(d, 2, long, || {}).await.unwrap();
        let b = acquire(d, 2, long, || {}).await.unwrap();
        let (Acquired::Slot(a, _), Acquired::Slot(b, _)) = (a, b) else {
            panic!("two free slots")
        };
        assert_ne!(a.index, b.index);
        // both taken: the third waits, says so, and times out
        let mut said = false;
        let c = acquire(d, 2, Duration::from_millis(50), || said = true)
            .await
            .unwrap();
        assert!(said, "the caller heard that it waits");
        assert!(matches!(c, Acquired::TimedOut(t) if t >= Duration::from_millis(50)));
        // a waiter gets the slot that is given back
        let freed = a.index;
        let waiter = tokio::spawn({
            let d = d.to_path_buf();
            async move { acquire(&d, 2, long, || {}).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(40)).await;
        drop(a);
        match waiter.await.unwrap() {
            Acquired::Slot(s, waited) => {
                assert_eq!(s.index, freed);
                assert!(waited >= Duration::from_millis(30), "{waited:?}");
            }
            other => panic!("{other:?}"),
        }
        drop(b);
    }

    #[tokio::test]
    async fn no_limit_takes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let got = acquire(&dir.path().join("never-made"), 0, Duration::ZERO, || {})
            .await
            .unwrap();
        assert!(matches!(got, Acquired::Unlimited));
        assert!(!dir.path().join("never-made").exists());
    }
}
