//! The VM's cgroup: the same relative path created in every mounted cgroup
//! hierarchy (v1 controllers and the v2 tree, whichever the host has), joined by
//! the hypervisor before it runs, removed at teardown.

use std::io;
use std::path::{Path, PathBuf};

use tracing::debug;

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CgroupError {
    /// The path is not a plain relative path.
    #[error("cgroup path {0:?} must be relative, without '..' (e.g. \"kata-rs/<sandbox>\")")]
    BadPath(String),
    /// A directory could not be made or set up.
    #[error("cgroup {path}: {source}")]
    Io {
        /// Which directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The cgroup hierarchy mount points of this host, from /proc/self/mountinfo.
pub(crate) fn hierarchies() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return vec![];
    };
    parse_hierarchies(&info)
}

fn parse_hierarchies(mountinfo: &str) -> Vec<PathBuf> {
    let mut v = vec![];
    for line in mountinfo.lines() {
        // ... mount_point ... - fstype source options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = right.split_whitespace().next().unwrap_or("");
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        if let Some(mp) = left.split_whitespace().nth(4) {
            v.push(PathBuf::from(mp.replace("\\040", " ")));
        }
    }
    v
}

/// Checks the relative path.
pub(crate) fn validate(rel: &str) -> Result<(), CgroupError> {
    let p = Path::new(rel);
    if rel.is_empty()
        || p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(CgroupError::BadPath(rel.into()));
    }
    Ok(())
}

/// Creates `rel` under every hierarchy; returns the directories it created (the
/// ones to remove at teardown), deepest last. Existing directories are reused
/// and not returned.
pub(crate) fn create(rel: &str) -> Result<Vec<PathBuf>, CgroupError> {
    validate(rel)?;
    let mut created = vec![];
    for root in hierarchies() {
        let mut cur = root.clone();
        for comp in Path::new(rel).components() {
            let parent = cur.clone();
            cur.push(comp);
            match std::fs::create_dir(&cur) {
                Ok(()) => {
                    created.push(cur.clone());
                    // a new v1 cpuset cgroup starts empty and refuses tasks
                    for f in ["cpuset.cpus", "cpuset.mems"] {
                        if let Ok(v) = std::fs::read_to_string(parent.join(f)) {
                            let _ = std::fs::write(cur.join(f), v.trim());
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    remove(&created);
                    return Err(CgroupError::Io { path: cur, source });
                }
            }
        }
    }
    debug!(?created, "cgroups created");
    Ok(created)
}

/// The `cgroup.procs` files of `rel` in every hierarchy.
pub(crate) fn procs_files(rel: &str) -> Vec<PathBuf> {
    hierarchies()
        .into_iter()
        .map(|h| h.join(rel).join("cgroup.procs"))
        .collect()
}

/// Removes the directories (deepest first). Missing ones are fine; a cgroup that
/// still has processes stays, and is reported.
pub(crate) fn remove(dirs: &[PathBuf]) -> Vec<(PathBuf, io::Error)> {
    let mut failed = vec![];
    for d in dirs.iter().rev() {
        // A process that has just exited may still hold its cgroup for a
        // moment (EBUSY): retry for up to 2 s.
        let mut tries = 0;
        loop {
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 200 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => {
                    failed.push((d.clone(), e));
                    break;
                }
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let m = "25 1 0:23 / /sys/fs/cgroup ro - tmpfs tmpfs rw\n\
                 26 25 0:24 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                 27 25 0:25 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                 30 1 0:26 / /proc rw - proc proc rw\n";
        assert_eq!(
            parse_hierarchies(m),
            vec![
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/sys/fs/cgroup/memory")
            ]
        );
    }

    #[test]
    fn paths() {
        assert!(validate("kata-rs/abc").is_ok());
        for bad in ["", "/abs", "../up", "a/../../b", "./x"] {
            assert!(validate(bad).is_err(), "{bad}");
        }
    }
}
