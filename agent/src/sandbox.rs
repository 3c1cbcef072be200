//! Sandbox-wide state: identity, DNS, hostname, and the storages (the shared
//! directory, scratch space) that containers' root filesystems and volumes
//! come from.

use std::path::{Path, PathBuf};

use kata_proto::agent::Storage;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tonic::Status;
use tracing::{debug, info};

use crate::beneath::{self, BeneathError};
use crate::mounts::{check_container_path, parse_options};

/// The storage drivers this agent mounts.
pub const STORAGE_DRIVERS: &[&str] = &["virtio-fs", "ephemeral", "local", "bind"];

/// What CreateSandbox set.
#[derive(Debug, Default, Clone)]
pub struct SandboxInfo {
    /// The sandbox id (also the default cgroup parent).
    pub id: String,
    /// Whether CreateSandbox ran.
    pub created: bool,
    /// `disable_guest_seccomp`.
    pub disable_seccomp: bool,
    /// Sandbox storages, unmounted by DestroySandbox.
    pub storages: Vec<PathBuf>,
}

/// Where the host may place storages (and take bind sources from): Kata's
/// `/run/kata-containers`, and the agent's own state directory.
pub fn storage_bases(root: &Path) -> [PathBuf; 2] {
    [PathBuf::from(STORAGE_BASE), root.to_path_buf()]
}

/// Kata's directory for sandbox storages in the guest.
pub const STORAGE_BASE: &str = "/run/kata-containers";

/// The base in `bases` that `p` is strictly below.
fn base_of<'a>(p: &Path, bases: &'a [PathBuf]) -> Option<&'a Path> {
    bases
        .iter()
        .map(PathBuf::as_path)
        .find(|b| p.starts_with(b) && p != *b)
}

/// Mounts one storage at its mount point; returns the mount point.
///
/// The mount point (and a bind source) must lie below one of `bases`; it is
/// resolved by descriptor without following any symlink, missing directories
/// are created, and the mount is made onto the resolved directory itself
/// (`/proc/self/fd/N`), so a symlink swapped in on the way cannot move it.
pub fn mount_storage(s: &Storage, bases: &[PathBuf]) -> Result<PathBuf, Status> {
    check_container_path(&s.mount_point)
        .map_err(|e| Status::invalid_argument(format!("storage mount_point: {e}")))?;
    let target = PathBuf::from(&s.mount_point);
    let allowed = || {
        bases
            .iter()
            .map(|b| b.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    };
    let Some(base) = base_of(&target, bases) else {
        return Err(Status::permission_denied(format!(
            "storage mount_point {}: storages are mounted only below {}",
            target.display(),
            allowed()
        )));
    };
    let opts = parse_options(&s.options);
    let data = (!opts.data.is_empty()).then_some(opts.data.as_str());
    let denied = |what: &str, e: BeneathError| match e {
        BeneathError::Sys { .. } => Status::internal(format!("{what}: {e}")),
        _ => Status::permission_denied(format!("{what}: {e}")),
    };
    // the bases are the agent's own (/run is its tmpfs): made if missing
    std::fs::create_dir_all(base)
        .map_err(|e| Status::internal(format!("creating {}: {e}", base.display())))?;
    let point = beneath::open_dir(base, &target, Some(0o755))
        .map_err(|e| denied("storage mount_point", e))?;
    let on = beneath::proc_path(&point);
    let err = |e: nix::Error| {
        Status::invalid_argument(format!(
            "mounting storage {} ({}) on {}: {e}",
            s.source,
            s.driver,
            target.display()
        ))
    };
    match s.driver.as_str() {
        "virtio-fs" | "virtiofs" => {
            mount(
                Some(s.source.as_str()),
                &on,
                Some("virtiofs"),
                opts.flags,
                data,
            )
            .map_err(err)?;
        }
        "ephemeral" | "local" => {
            mount(Some("tmpfs"), &on, Some("tmpfs"), opts.flags, data).map_err(err)?;
        }
        "bind" => {
            let src = Path::new(&s.source);
            check_container_path(&s.source)
                .map_err(|e| Status::invalid_argument(format!("bind storage source: {e}")))?;
            let Some(src_base) = base_of(src, bases) else {
                return Err(Status::permission_denied(format!(
                    "bind storage source {}: sources are taken only from below {}",
                    src.display(),
                    allowed()
                )));
            };
            let from = beneath::open_dir(src_base, src, None)
                .map_err(|e| denied("bind storage source", e))?;
            mount(
                Some(&beneath::proc_path(&from)),
                &on,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(err)?;
            let extra = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
            if !extra.is_empty() {
                // the new mount, reached again by descriptor
                let top = beneath::open_dir(base, &target, None)
                    .map_err(|e| denied("storage mount_point", e))?;
                mount(
                    None::<&str>,
                    &beneath::proc_path(&top),
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                    None::<&str>,
                )
                .map_err(err)?;
            }
        }
        other => {
            return Err(Status::invalid_argument(format!(
                "storage driver {other:?} is not supported; this agent mounts {}",
                STORAGE_DRIVERS.join(", ")
            )))
        }
    }
    info!(driver = %s.driver, mount_point = %target.display(), "storage mounted");
    Ok(target)
}

/// Unmounts storages (newest first); best effort.
pub fn unmount_storages(points: &[PathBuf]) {
    for p in points.iter().rev() {
        match umount2(p, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => debug!(mount_point = %p.display(), "storage unmounted"),
            Err(e) => debug!(mount_point = %p.display(), error = %e, "storage unmount"),
        }
        let _ = std::fs::remove_dir(p);
    }
}

/// Mounts several storages; on failure unmounts those already mounted.
pub fn mount_storages(storages: &[Storage], bases: &[PathBuf]) -> Result<Vec<PathBuf>, Status> {
    let mut done = Vec::new();
    for s in storages {
        match mount_storage(s, bases) {
            Ok(p) => done.push(p),
            Err(e) => {
                unmount_storages(&done);
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Writes the sandbox's resolv.conf (the runtime bind-mounts it into
/// containers) from CreateSandbox's `dns` lines.
pub fn write_dns(root: &Path, dns: &[String]) -> Result<(), Status> {
    if dns.is_empty() {
        return Ok(());
    }
    for l in dns {
        if l.contains('\n') {
            return Err(Status::invalid_argument(format!(
                "dns line {l:?} contains a newline"
            )));
        }
    }
    let dir = root.join("sandbox");
    std::fs::create_dir_all(&dir)
        .and_then(|_| std::fs::write(dir.join("resolv.conf"), dns.join("\n") + "\n"))
        .map_err(|e| Status::internal(format!("writing resolv.conf: {e}")))
}

/// The largest file CopyFile accepts.
pub const COPY_FILE_MAX: i64 = 256 << 20;

/// Kata's CopyFile: writes one chunk of a file (or makes a directory or a
/// symlink) below `<root>/shared/`, the only place the host may write to.
pub fn copy_file(root: &Path, r: &kata_proto::agent::CopyFileRequest) -> Result<(), Status> {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::fd::OwnedFd;

    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::Mode;
    use nix::unistd::{fchownat, symlinkat, unlinkat, UnlinkatFlags};
    check_container_path(&r.path).map_err(|e| Status::invalid_argument(format!("path: {e}")))?;
    let base = root.join("shared");
    let target = PathBuf::from(&r.path);
    if !target.starts_with(&base) || target == base {
        return Err(Status::permission_denied(format!(
            "CopyFile writes only below {}; {} is outside",
            base.display(),
            target.display()
        )));
    }
    if r.file_size < 0 || r.file_size > COPY_FILE_MAX || r.offset < 0 {
        return Err(Status::invalid_argument(format!(
            "file_size {} / offset {}: sizes are 0..={COPY_FILE_MAX}",
            r.file_size, r.offset
        )));
    }
    let end = r.offset.saturating_add(r.data.len() as i64);
    if end > r.file_size.max(r.data.len() as i64) && (r.file_mode & libc::S_IFMT) == libc::S_IFREG {
        return Err(Status::invalid_argument(format!(
            "chunk at {} of {} bytes goes past file_size {}",
            r.offset,
            r.data.len(),
            r.file_size
        )));
    }
    // Resolved once, by descriptor: no symlink on the way is followed, and
    // every later call (create, write, chmod, chown) acts on what was opened.
    let denied = |e: BeneathError| match e {
        BeneathError::Sys { .. } => Status::internal(e.to_string()),
        _ => Status::permission_denied(format!("CopyFile: {e}")),
    };
    let dir_mode = if r.dir_mode == 0 {
        0o755
    } else {
        r.dir_mode & 0o7777
    };
    // the base is the agent's own directory (made here on the first call);
    // below it nothing is trusted
    std::fs::create_dir_all(&base)
        .map_err(|e| Status::internal(format!("CopyFile: creating {}: {e}", base.display())))?;
    let (parent, name) = beneath::open_parent(&base, &target, Some(dir_mode)).map_err(denied)?;
    let io = |what: &str, e: nix::Error| {
        Status::internal(format!("CopyFile: {what} {}: {e}", target.display()))
    };
    let uid = Some(nix::unistd::Uid::from_raw(r.uid));
    let gid = Some(nix::unistd::Gid::from_raw(r.gid));
    let mode = Mode::from_bits_truncate(r.file_mode & 0o7777);
    let owned: OwnedFd = match r.file_mode & libc::S_IFMT {
        libc::S_IFDIR => {
            let d = beneath::open_dir_at(&parent, name, Some(r.file_mode & 0o7777), &target)
                .map_err(denied)?;
            // an O_PATH descriptor cannot be chmod-ed: reopen it for reading
            nix::fcntl::openat(
                &d,
                ".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| io("opening", e))?
        }
        libc::S_IFLNK => {
            let link = String::from_utf8(r.data.clone())
                .map_err(|_| Status::invalid_argument("symlink target is not UTF-8"))?;
            match unlinkat(&parent, name, UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(nix::Error::ENOENT) => {}
                Err(e) => return Err(io("replacing", e)),
            }
            symlinkat(link.as_str(), &parent, name).map_err(|e| io("symlinking", e))?;
            fchownat(&parent, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| io("chown", e))?;
            return Ok(());
        }
        0 | libc::S_IFREG => {
            let fd = nix::fcntl::openat(
                &parent,
                name,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                mode,
            )
            .map_err(|e| match e {
                nix::Error::ELOOP => Status::permission_denied(format!(
                    "CopyFile: {} is a symlink: CopyFile does not write through symlinks",
                    target.display()
                )),
                e => io("opening", e),
            })?;
            let mut f = std::fs::File::from(fd);
            f.seek(SeekFrom::Start(r.offset as u64))
                .and_then(|_| f.write_all(&r.data))
                .and_then(|_| f.set_len(r.file_size.max(end) as u64))
                .map_err(|e| {
                    Status::internal(format!("CopyFile: writing {}: {e}", target.display()))
                })?;
            OwnedFd::from(f)
        }
        other => {
            return Err(Status::invalid_argument(format!(
                "file_mode type {other:o}: only regular files, directories and symlinks"
            )))
        }
    };
    // owner first: chown clears setuid/setgid, the mode then sets them as asked
    nix::unistd::fchown(&owned, uid, gid).map_err(|e| io("chown", e))?;
    nix::sys::stat::fchmod(&owned, mode).map_err(|e| io("chmod", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use kata_proto::agent::CopyFileRequest;

    use super::*;

    /// The first CopyFile of a fresh agent makes its `shared` directory; a
    /// path outside it is refused.
    #[test]
    fn copy_file_into_a_fresh_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("agent");
        std::fs::create_dir(&root).unwrap();
        let target = root.join("shared/rootfs/etc/hostname");
        let data = b"guest\n".to_vec();
        copy_file(
            &root,
            &CopyFileRequest {
                path: target.display().to_string(),
                file_size: data.len() as i64,
                file_mode: libc::S_IFREG | 0o644,
                dir_mode: 0o755,
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
                data,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"guest\n");
        let e = copy_file(
            &root,
            &CopyFileRequest {
                path: root.join("elsewhere").display().to_string(),
                file_mode: libc::S_IFREG | 0o644,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    }
}
