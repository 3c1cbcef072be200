//! Mount helpers shared by container set-up and sandbox storages: the
//! translation of fstab-style options into mount flags, and path resolution
//! that never leaves a root directory (symlinks included).

use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;

/// Mount options split into flags, propagation and filesystem data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Flags for mount(2).
    pub flags: MsFlags,
    /// Flags to clear (e.g. `rw`, `suid`), for remounts.
    pub clear: MsFlags,
    /// Propagation to set after mounting (MS_SHARED, MS_SLAVE, ...).
    pub propagation: MsFlags,
    /// Everything else, comma-joined, for the filesystem (`mode=755`, `size=64k`).
    pub data: String,
    /// Whether `bind` or `rbind` was asked.
    pub bind: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            flags: MsFlags::empty(),
            clear: MsFlags::empty(),
            propagation: MsFlags::empty(),
            data: String::new(),
            bind: false,
        }
    }
}

/// Parses an OCI/fstab option list.
pub fn parse_options<S: AsRef<str>>(options: &[S]) -> MountOptions {
    let mut o = MountOptions::default();
    let mut data = Vec::new();
    for opt in options {
        let opt = opt.as_ref();
        let (set, clear) = match opt {
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "bind" => {
                o.bind = true;
                (MsFlags::MS_BIND, MsFlags::empty())
            }
            "rbind" => {
                o.bind = true;
                (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty())
            }
            "private" => {
                o.propagation |= MsFlags::MS_PRIVATE;
                continue;
            }
            "rprivate" => {
                o.propagation |= MsFlags::MS_PRIVATE | MsFlags::MS_REC;
                continue;
            }
            "shared" => {
                o.propagation |= MsFlags::MS_SHARED;
                continue;
            }
            "rshared" => {
                o.propagation |= MsFlags::MS_SHARED | MsFlags::MS_REC;
                continue;
            }
            "slave" => {
                o.propagation |= MsFlags::MS_SLAVE;
                continue;
            }
            "rslave" => {
                o.propagation |= MsFlags::MS_SLAVE | MsFlags::MS_REC;
                continue;
            }
            "unbindable" => {
                o.propagation |= MsFlags::MS_UNBINDABLE;
                continue;
            }
            "runbindable" => {
                o.propagation |= MsFlags::MS_UNBINDABLE | MsFlags::MS_REC;
                continue;
            }
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        o.flags = (o.flags & !clear) | set;
        o.clear = (o.clear & !set) | clear;
    }
    o.data = data.join(",");
    o
}

/// Why a path was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// Not absolute.
    #[error("{0:?} is not an absolute path")]
    NotAbsolute(String),
    /// Has `..` components.
    #[error("{0:?} contains `..`; give a path without parent references")]
    ParentRef(String),
    /// Too many symlinks.
    #[error("{0:?}: too many levels of symbolic links")]
    Loop(String),
}

/// Checks a container path given in a spec: absolute, and without `..`.
pub fn check_container_path(p: &str) -> Result<(), PathError> {
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(PathError::NotAbsolute(p.to_string()));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(PathError::ParentRef(p.to_string()));
    }
    Ok(())
}

/// Resolves `path` (as seen inside the container) to a host path below `root`,
/// following symlinks as the container would see them: an absolute link target
/// is taken relative to `root`, and `..` never climbs above it. Components that
/// do not exist yet are appended as they are.
pub fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf, PathError> {
    let mut todo: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut parts: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            parts.pop();
            continue;
        }
        let mut cand = root.to_path_buf();
        cand.extend(&parts);
        cand.push(&c);
        match std::fs::read_link(&cand) {
            Ok(target) => {
                links += 1;
                if links > 40 {
                    return Err(PathError::Loop(path.display().to_string()));
                }
                if target.is_absolute() {
                    parts.clear();
                }
                for t in target.components().rev() {
                    match t {
                        Component::Normal(s) => todo.push(s.to_os_string()),
                        Component::ParentDir => todo.push("..".into()),
                        _ => {}
                    }
                }
            }
            Err(_) => parts.push(c),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&parts);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let o = parse_options(&["nosuid", "noexec", "nodev", "mode=755", "size=65536k", "ro"]);
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        );
        assert_eq!(o.data, "mode=755,size=65536k");
        let o = parse_options(&["rbind", "rprivate", "ro", "rw"]);
        assert!(o.bind);
        assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert_eq!(o.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert_eq!(o.clear, MsFlags::MS_RDONLY);
    }

    #[test]
    fn container_paths() {
        assert!(check_container_path("/proc").is_ok());
        assert_eq!(
            check_container_path("../../etc"),
            Err(PathError::NotAbsolute("../../etc".into()))
        );
        assert_eq!(
            check_container_path("/a/../../etc"),
            Err(PathError::ParentRef("/a/../../etc".into()))
        );
    }

    #[test]
    fn resolve_stays_in_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../etc", root.join("up")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert_eq!(
            resolve_in_root(root, Path::new("/abs/passwd")).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("/up/x")).unwrap(),
            root.join("etc/x")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("/new/dir")).unwrap(),
            root.join("new/dir")
        );
        assert!(resolve_in_root(root, Path::new("/loop")).is_err());
    }
}
