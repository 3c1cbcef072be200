//! Sandbox-wide state: identity, DNS, hostname, and the storages (the shared
//! directory, scratch space) that containers' root filesystems and volumes
//! come from.

use std::path::{Path, PathBuf};

use kata_proto::agent::Storage;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tonic::Status;
use tracing::{debug, info};

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

/// Mounts one storage at its mount point; returns the mount point.
pub fn mount_storage(s: &Storage) -> Result<PathBuf, Status> {
    check_container_path(&s.mount_point)
        .map_err(|e| Status::invalid_argument(format!("storage mount_point: {e}")))?;
    let target = PathBuf::from(&s.mount_point);
    let opts = parse_options(&s.options);
    let data = (!opts.data.is_empty()).then_some(opts.data.as_str());
    std::fs::create_dir_all(&target).map_err(|e| {
        Status::internal(format!(
            "creating storage mount point {}: {e}",
            target.display()
        ))
    })?;
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
                &target,
                Some("virtiofs"),
                opts.flags,
                data,
            )
            .map_err(err)?;
        }
        "ephemeral" | "local" => {
            mount(Some("tmpfs"), &target, Some("tmpfs"), opts.flags, data).map_err(err)?;
        }
        "bind" => {
            if !Path::new(&s.source).is_absolute() {
                return Err(Status::invalid_argument(format!(
                    "bind storage source {:?} must be absolute",
                    s.source
                )));
            }
            mount(
                Some(s.source.as_str()),
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(err)?;
            let extra = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
            if !extra.is_empty() {
                mount(
                    None::<&str>,
                    &target,
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
        match umount2(p, MntFlags::MNT_DETACH) {
            Ok(()) => debug!(mount_point = %p.display(), "storage unmounted"),
            Err(e) => debug!(mount_point = %p.display(), error = %e, "storage unmount"),
        }
        let _ = std::fs::remove_dir(p);
    }
}

/// Mounts several storages; on failure unmounts those already mounted.
pub fn mount_storages(storages: &[Storage]) -> Result<Vec<PathBuf>, Status> {
    let mut done = Vec::new();
    for s in storages {
        match mount_storage(s) {
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
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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
    // No symlink on the way may lead out of the shared directory.
    let mut walk = base.clone();
    for c in target
        .strip_prefix(&base)
        .unwrap_or(&target)
        .parent()
        .into_iter()
        .flat_map(|p| p.components())
    {
        walk.push(c);
        if std::fs::symlink_metadata(&walk).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Status::permission_denied(format!(
                "{} is a symlink: CopyFile does not write through symlinks",
                walk.display()
            )));
        }
    }
    let io = |what: &str, e: std::io::Error| {
        Status::internal(format!("{what} {}: {e}", target.display()))
    };
    if let Some(parent) = target.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(if r.dir_mode == 0 {
                0o755
            } else {
                r.dir_mode & 0o7777
            })
            .create(parent)
            .map_err(|e| io("creating the parent of", e))?;
    }
    use std::os::unix::fs::DirBuilderExt;
    match r.file_mode & libc::S_IFMT {
        libc::S_IFDIR => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(r.file_mode & 0o7777)
                .create(&target)
                .map_err(|e| io("creating", e))?;
        }
        libc::S_IFLNK => {
            let link = String::from_utf8(r.data.clone())
                .map_err(|_| Status::invalid_argument("symlink target is not UTF-8"))?;
            let _ = std::fs::remove_file(&target);
            std::os::unix::fs::symlink(&link, &target).map_err(|e| io("symlinking", e))?;
            return Ok(());
        }
        0 | libc::S_IFREG => {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(r.file_mode & 0o7777)
                .open(&target)
                .map_err(|e| io("opening", e))?;
            f.seek(SeekFrom::Start(r.offset as u64))
                .and_then(|_| f.write_all(&r.data))
                .and_then(|_| f.set_len(r.file_size.max(end) as u64))
                .map_err(|e| io("writing", e))?;
            f.set_permissions(std::fs::Permissions::from_mode(r.file_mode & 0o7777))
                .map_err(|e| io("chmod", e))?;
        }
        other => {
            return Err(Status::invalid_argument(format!(
                "file_mode type {other:o}: only regular files, directories and symlinks"
            )))
        }
    }
    nix::unistd::chown(
        &target,
        Some(nix::unistd::Uid::from_raw(r.uid)),
        Some(nix::unistd::Gid::from_raw(r.gid)),
    )
    .map_err(|e| Status::internal(format!("chown {}: {e}", target.display())))?;
    Ok(())
}
