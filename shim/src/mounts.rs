//! Host mounts of a pod: the shared directory (a mount point of its own with
//! shared propagation, so mounts made under it after kata-virtiofsd started
//! reach the daemon's mount namespace), container rootfs and bind mounts in
//! it, and their removal.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Makes `dir` a mount point of its own with shared propagation.
pub fn make_shared_mountpoint(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .with_context(|| format!("bind-mounting {} onto itself", dir.display()))?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .with_context(|| format!("making {} a shared mount", dir.display()))?;
    Ok(())
}

/// Bind-mounts `source` (file or directory) at `target`, read-only if asked.
/// A read-only bind is made read-only in a private staging mount first and
/// then bound into place: mount flags are copied when a mount propagates,
/// a later remount is not, so kata-virtiofsd's copy is read-only too.
pub fn bind(source: &Path, target: &Path, readonly: bool, staging: &Path) -> Result<()> {
    let meta = fs::metadata(source)
        .with_context(|| format!("bind source {}: cannot stat it", source.display()))?;
    let make_point = |p: &Path| -> Result<()> {
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        if meta.is_dir() {
            fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))
        } else {
            fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(p)
                .map(|_| ())
                .with_context(|| format!("creating {}", p.display()))
        }
    };
    make_point(target)?;
    let rec = MsFlags::MS_BIND | MsFlags::MS_REC;
    if !readonly {
        return mount(Some(source), target, None::<&str>, rec, None::<&str>).with_context(|| {
            format!("bind-mounting {} at {}", source.display(), target.display())
        });
    }
    make_point(staging)?;
    mount(Some(source), staging, None::<&str>, rec, None::<&str>).with_context(|| {
        format!(
            "bind-mounting {} at {}",
            source.display(),
            staging.display()
        )
    })?;
    let res = mount(
        None::<&str>,
        staging,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .and_then(|_| {
        mount(
            None::<&str>,
            staging,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
    })
    .with_context(|| format!("making {} read-only", staging.display()))
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
    let _ = umount2(staging, MntFlags::MNT_DETACH);
    let _ = if meta.is_dir() {
        fs::remove_dir(staging)
    } else {
        fs::remove_file(staging)
    };
    res
}

/// Mounts the rootfs containerd passed in Create (usually one overlay) at
/// `target`.
pub fn mount_rootfs(m: &containerd_shim::protos::types::mount::Mount, target: &Path) -> Result<()> {
    fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    containerd_shim::mount::mount_rootfs(
        Some(m.type_.as_str()),
        Some(m.source.as_str()),
        &m.options,
        target,
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "mounting the {} rootfs at {}: {e}",
            m.type_,
            target.display()
        )
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
            if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
                tracing::warn!("cannot unmount {}: {e}", m.display());
            }
        }
    }
    let left = mounts_below(dir);
    if !left.is_empty() {
        bail!(
            "{} is still mounted; not removing {}",
            left[0].display(),
            dir.display()
        );
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
