//! Host mounts of a pod, built so that nothing the guest writes can steer
//! them (the class of Kata's CVE-2020-2026).
//!
//! Two trees in the pod directory (which is root-only, 0700):
//! - `mounts/` is host-only. The shim creates directories and mounts the
//!   container rootfs and bind mounts here, below `mounts/<container>/`. It is
//!   a mount point of its own with shared propagation.
//! - `shared/` is what kata-virtiofsd exports to the guest: a recursive bind
//!   of `mounts/`, made a slave (mounts made in `mounts/` appear in it, never
//!   the other way), shared again so kata-virtiofsd's own mount namespace
//!   receives them, and read-only. The guest can write inside a container's
//!   rootfs or a read-write volume (mounts of their own), never in the
//!   directories the shim walks: it cannot plant a symlink where the shim
//!   mounts.
//!
//! Every mount the shim makes below `mounts/` is `nosuid,nodev`, so nothing in
//! a container's tree is a setuid program or a device on the host, and every
//! unmount is `UMOUNT_NOFOLLOW`.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a host mount step failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The tree is not as expected.
    #[error("{0}")]
    State(String),
}

type Result<T, E = MountError> = std::result::Result<T, E>;

/// `with_context` for any error that is an `io::Error` (nix's included).
trait Context<T> {
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<std::io::Error>> Context<T> for std::result::Result<T, E> {
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| MountError::Io {
            what: what(),
            source: e.into(),
        })
    }
}
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// The flags every mount below the host-only tree carries.
const SAFE: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

/// Creates `dir` (and missing parents) root-only: mode 0700 set explicitly,
/// whatever the umask. An existing directory gets 0700 too.
pub fn private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} root-only", dir.display()))
}

/// Makes `mounts` (host-only, shared propagation) and `shared` (its
/// read-only slave view, the tree kata-virtiofsd exports).
pub fn make_share(mounts: &Path, shared: &Path) -> Result<()> {
    let m = |src: Option<&Path>, dst: &Path, flags: MsFlags, what: &str| {
        mount(src, dst, None::<&str>, flags, None::<&str>)
            .with_context(|| format!("{what} ({})", dst.display()))
    };
    private_dir(mounts)?;
    private_dir(shared)?;
    m(
        Some(mounts),
        mounts,
        MsFlags::MS_BIND,
        "binding the host mount tree onto itself",
    )?;
    m(
        None,
        mounts,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | SAFE,
        "making the host mount tree nosuid,nodev",
    )?;
    m(
        None,
        mounts,
        MsFlags::MS_SHARED,
        "making the host mount tree shared",
    )?;
    m(
        Some(mounts),
        shared,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        "binding the host mount tree at the shared tree",
    )?;
    m(
        None,
        shared,
        MsFlags::MS_SLAVE,
        "making the shared tree a slave",
    )?;
    m(
        None,
        shared,
        MsFlags::MS_SHARED,
        "making the shared tree shared",
    )?;
    m(
        None,
        shared,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | SAFE,
        "making the shared tree read-only",
    )?;
    Ok(())
}

/// Creates the mount point `p` below the host-only tree: a directory, or an
/// empty file when the source is one. Never follows a symlink at `p`.
fn make_point(p: &Path, dir: bool) -> Result<()> {
    if let Some(parent) = p.parent() {
        private_dir(parent)?;
    }
    if dir {
        match fs::DirBuilder::new().mode(0o700).create(p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let meta =
                    fs::symlink_metadata(p).with_context(|| format!("checking {}", p.display()))?;
                if meta.is_dir() {
                    Ok(())
                } else {
                    Err(MountError::State(format!(
                        "{} exists and is not a directory",
                        p.display()
                    )))
                }
            }
            Err(e) => Err(e).with_context(|| format!("creating {}", p.display())),
        }
    } else {
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
            .map(|_| ())
            .with_context(|| format!("creating {}", p.display()))
    }
}

/// Bind-mounts `source` (file or directory) at `target`, nosuid and nodev,
/// read-only if asked. The flags are set in a private staging mount first and
/// the result is then bound into place: mount flags are copied when a mount
/// propagates, a later remount is not, so kata-virtiofsd's copy has them too.
pub fn bind(source: &Path, target: &Path, readonly: bool, staging: &Path) -> Result<()> {
    let meta = fs::metadata(source)
        .with_context(|| format!("bind source {}: cannot stat it", source.display()))?;
    make_point(target, meta.is_dir())?;
    make_point(staging, meta.is_dir())?;
    let rec = MsFlags::MS_BIND | MsFlags::MS_REC;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | SAFE;
    if readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    let res = mount(Some(source), staging, None::<&str>, rec, None::<&str>)
        .with_context(|| {
            format!(
                "bind-mounting {} at {}",
                source.display(),
                staging.display()
            )
        })
        .and_then(|_| {
            mount(
                None::<&str>,
                staging,
                None::<&str>,
                MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .and_then(|_| mount(None::<&str>, staging, None::<&str>, flags, None::<&str>))
            .with_context(|| format!("setting the flags of {}", staging.display()))
        })
        .and_then(|_| {
            mount(
                Some(staging),
                target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("bind-mounting {} at {}", source.display(), target.display()))
        });
    let _ = umount2(staging, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
    let _ = if meta.is_dir() {
        fs::remove_dir(staging)
    } else {
        fs::remove_file(staging)
    };
    res
}

/// Mounts the rootfs containerd passed in Create (usually one overlay) at
/// `target`.
/// `nosuid,nodev` are added last, so an option of containerd cannot undo them.
pub fn mount_rootfs(m: &containerd_shim::protos::types::mount::Mount, target: &Path) -> Result<()> {
    make_point(target, true)?;
    let mut options = m.options.clone();
    options.extend(["nosuid".to_string(), "nodev".to_string()]);
    containerd_shim::mount::mount_rootfs(
        Some(m.type_.as_str()),
        Some(m.source.as_str()),
        &options,
        target,
    )
    .map_err(|e| {
        MountError::State(format!(
            "mounting the {} rootfs at {}: {e}",
            m.type_,
            target.display()
        ))
    })
}

/// The mount points at or below `dir`, deepest first.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches every mount at or below `dir`, deepest first, then removes the
/// directory tree (which must then hold no mount: never crosses into one).
pub fn unmount_and_remove(dir: &Path) -> Result<()> {
    for _ in 0..3 {
        let ms = mounts_below(dir);
        if ms.is_empty() {
            break;
        }
        for m in ms {
            if let Err(e) = umount2(&m, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
                tracing::warn!("cannot unmount {}: {e}", m.display());
            }
        }
    }
    let left = mounts_below(dir);
    if !left.is_empty() {
        return Err(MountError::State(format!(
            "{} is still mounted; not removing {}",
            left[0].display(),
            dir.display()
        )));
    }
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\"), "/end\\");
    }
}
