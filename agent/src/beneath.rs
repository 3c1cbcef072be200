//! Paths the host names, resolved inside a base directory by file
//! descriptor: one component at a time with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`, creating missing directories with `mkdirat`, so a
//! symlink swapped in by whoever else writes there (the host, under agent
//! policy) can never redirect a create, a write, a chown or a mount.
//!
//! Callers act on the returned descriptors (`fchown`, `fchmod`, `*at`
//! calls, or a mount onto `/proc/self/fd/N`), never on the path again.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

/// Why a path could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum BeneathError {
    /// The path is not below the base directory.
    #[error("{path} is not below {base}")]
    Outside {
        /// The path.
        path: PathBuf,
        /// The base.
        base: PathBuf,
    },
    /// A component is a symlink (never followed) or `..`.
    #[error("{path}: {component:?} is a symlink or leaves the base; it is not followed")]
    Link {
        /// The path.
        path: PathBuf,
        /// The component.
        component: String,
    },
    /// A system call failed.
    #[error("{what} {path}: {errno}")]
    Sys {
        /// What was done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        errno: Errno,
    },
}

const RESOLVE: ResolveFlag = ResolveFlag::RESOLVE_BENEATH
    .union(ResolveFlag::RESOLVE_NO_SYMLINKS)
    .union(ResolveFlag::RESOLVE_NO_MAGICLINKS);

/// Opens the directory `base` itself (it must not be a symlink).
pub fn open_base(base: &Path) -> Result<OwnedFd, BeneathError> {
    nix::fcntl::open(
        base,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| BeneathError::Sys {
        what: "opening",
        path: base.to_path_buf(),
        errno,
    })
}

/// `path` relative to `base`, as plain names (no `..`, no `.`).
pub fn names_below<'a>(base: &Path, path: &'a Path) -> Result<Vec<&'a OsStr>, BeneathError> {
    let rel = path.strip_prefix(base).map_err(|_| BeneathError::Outside {
        path: path.to_path_buf(),
        base: base.to_path_buf(),
    })?;
    rel.components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            other => Err(BeneathError::Link {
                path: path.to_path_buf(),
                component: other.as_os_str().to_string_lossy().into_owned(),
            }),
        })
        .collect()
}

/// Opens the directory `name` in `dir` (O_PATH), creating it with `mode` if
/// `create` and it is missing. A symlink is refused.
pub fn open_dir_at(
    dir: &impl AsFd,
    name: &OsStr,
    create: Option<u32>,
    full: &Path,
) -> Result<OwnedFd, BeneathError> {
    let how = || {
        OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(RESOLVE)
    };
    let is_link = || {
        nix::sys::stat::fstatat(dir.as_fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
    };
    let sys = |what, errno| match errno {
        // O_NOFOLLOW | O_DIRECTORY on a symlink gives ENOTDIR
        Errno::ELOOP | Errno::EXDEV | Errno::ENOTDIR if errno != Errno::ENOTDIR || is_link() => {
            BeneathError::Link {
                path: full.to_path_buf(),
                component: name.to_string_lossy().into_owned(),
            }
        }
        errno => BeneathError::Sys {
            what,
            path: full.to_path_buf(),
            errno,
        },
    };
    match openat2(dir.as_fd(), name, how()) {
        Ok(fd) => Ok(fd),
        Err(Errno::ENOENT) if create.is_some() => {
            let mode = Mode::from_bits_truncate(create.unwrap_or(0o755) & 0o7777);
            match nix::sys::stat::mkdirat(dir.as_fd(), name, mode) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(sys("creating a directory in", e)),
            }
            openat2(dir.as_fd(), name, how()).map_err(|e| sys("opening", e))
        }
        Err(e) => Err(sys("opening", e)),
    }
}

/// Opens the directory `path` below `base`, creating missing directories
/// with `create` mode if given. Returns an O_PATH descriptor.
pub fn open_dir(base: &Path, path: &Path, create: Option<u32>) -> Result<OwnedFd, BeneathError> {
    let mut cur = open_base(base)?;
    for name in names_below(base, path)? {
        cur = open_dir_at(&cur, name, create, path)?;
    }
    Ok(cur)
}

/// The parent directory of `path` below `base` (created if `create`), and
/// the last name. `path` must be strictly below `base`.
pub fn open_parent<'a>(
    base: &Path,
    path: &'a Path,
    create: Option<u32>,
) -> Result<(OwnedFd, &'a OsStr), BeneathError> {
    let names = names_below(base, path)?;
    let Some((last, parents)) = names.split_last() else {
        return Err(BeneathError::Outside {
            path: path.to_path_buf(),
            base: base.to_path_buf(),
        });
    };
    let mut cur = open_base(base)?;
    for name in parents {
        cur = open_dir_at(&cur, name, create, path)?;
    }
    Ok((cur, last))
}

/// The `/proc/self/fd/N` path of a descriptor: what `mount(2)` takes to act
/// on exactly the resolved directory.
pub fn proc_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_below_and_refuses_symlinks_and_dotdot() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base");
        std::fs::create_dir(&base).unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, base.join("link")).unwrap();

        open_dir(&base, &base.join("a/b/c"), Some(0o700)).unwrap();
        assert!(base.join("a/b/c").is_dir());

        let e = open_dir(&base, &base.join("link/x"), Some(0o700)).unwrap_err();
        assert!(matches!(e, BeneathError::Link { .. }), "{e}");
        assert!(
            !outside.join("x").exists(),
            "nothing created through the link"
        );

        let e = open_dir(&base, &base.join("a/../../outside"), Some(0o700)).unwrap_err();
        assert!(matches!(e, BeneathError::Link { .. }), "{e}");
        let e = open_dir(&base, &outside, None).unwrap_err();
        assert!(matches!(e, BeneathError::Outside { .. }), "{e}");

        // a base that is itself a symlink is refused
        let e = open_base(&base.join("link")).unwrap_err();
        assert!(matches!(e, BeneathError::Sys { .. }), "{e}");

        let new = base.join("a/new");
        let (parent, name) = open_parent(&base, &new, None).unwrap();
        assert_eq!(name, "new");
        let p = std::fs::read_link(proc_path(&parent)).unwrap();
        assert_eq!(p, base.join("a"));
    }
}
