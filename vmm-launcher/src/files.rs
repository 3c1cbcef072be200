//! Explicit modes and owners for what the launcher creates on the host.
//!
//! Nothing here depends on the umask, and nothing follows a symlink: a mode
//! or an owner is set through a file descriptor of the object itself
//! (`O_PATH | O_NOFOLLOW`, then `fchownat(fd, "", AT_EMPTY_PATH)` or a chmod
//! through `/proc/self/fd/N`, which refuses a symlink), never through a path
//! that another process could swap for a symlink in between.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of the launcher's directories.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of the launcher's sockets and state files.
pub(crate) const FILE_MODE: u32 = 0o600;

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// An `O_PATH` descriptor of `path` itself (a final symlink is not followed;
/// it is refused with `ELOOP`).
pub(crate) fn open_nofollow(path: &Path) -> io::Result<OwnedFd> {
    let c = cpath(path)?;
    // SAFETY: open(2) on a NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fstat(2) into a zeroed stat buffer; the result is checked.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above, `fd` is valid for the whole call.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
        return Err(io::Error::from_raw_os_error(libc::ELOOP));
    }
    Ok(fd)
}

/// Sets the owner of the object `fd` refers to (any type, `O_PATH` included).
pub(crate) fn fchown_fd(fd: &OwnedFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: fchownat(2) with an empty path on a descriptor we own.
    let rc = unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the mode of the object `fd` refers to. Works for an `O_PATH`
/// descriptor of a socket (where `fchmod` does not): the chmod goes through
/// `/proc/self/fd/N`, which names the object itself, not a path.
pub(crate) fn fchmod_fd(fd: &OwnedFd, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        std::fs::Permissions::from_mode(mode),
    )
}

/// Sets the mode of `path` (never through a symlink).
pub(crate) fn chmod_nofollow(path: &Path, mode: u32) -> io::Result<()> {
    fchmod_fd(&open_nofollow(path)?, mode)
}

/// Sets the owner of `path` (never through a symlink).
pub(crate) fn chown_nofollow(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    fchown_fd(&open_nofollow(path)?, uid, gid)
}

/// Creates the directory `path` if missing (its parents with
/// [`DIR_MODE`] too), refuses a symlink, then sets its mode to `mode` and,
/// if asked, its owner, through a descriptor of the directory.
pub(crate) fn private_dir(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&dir, Some(uid), Some(gid))?;
    }
    dir.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Creates (or opens for appending) the regular file `path` with mode
/// [`FILE_MODE`], never through a symlink, and sets the mode explicitly.
pub(crate) fn private_file(path: &Path, append: bool, truncate: bool) -> io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .append(append)
        .truncate(truncate && !append)
        .create(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn modes_are_explicit_whatever_the_umask() {
        let d = tempfile::tempdir().unwrap();
        // a permissive umask must not widen anything
        // SAFETY: umask(2) only changes this process's file mode mask.
        let old = unsafe { libc::umask(0) };
        let dir = d.path().join("a/b");
        private_dir(&dir, DIR_MODE, None).unwrap();
        let f = dir.join("state.json");
        drop(private_file(&f, false, true).unwrap());
        let sock = dir.join("x.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        assert_eq!(
            mode(&sock) & 0o777,
            0o777,
            "a socket gets its mode from the umask"
        );
        chmod_nofollow(&sock, FILE_MODE).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&d.path().join("a")), 0o700);
        assert_eq!(mode(&f), 0o600);
        assert_eq!(mode(&sock), 0o600);
    }

    #[test]
    fn symlinks_are_never_followed() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        std::fs::write(&target, b"x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(chmod_nofollow(&link, 0o600).is_err());
        assert!(chown_nofollow(&link, 12345, 12345).is_err());
        assert!(private_file(&link, true, false).is_err());
        let dlink = d.path().join("dlink");
        std::os::unix::fs::symlink(d.path(), &dlink).unwrap();
        assert!(private_dir(&dlink, DIR_MODE, None).is_err());
        let m = std::fs::metadata(&target).unwrap();
        assert_eq!(
            (m.mode() & 0o777, m.uid()),
            (0o644, nix::unistd::getuid().as_raw())
        );
    }

    #[test]
    fn owner_through_the_descriptor() {
        // as root (CI) a foreign owner; unprivileged, our own ids (the same calls)
        let (uid, gid) = if nix::unistd::geteuid().is_root() {
            (4242, 4343)
        } else {
            (
                nix::unistd::getuid().as_raw(),
                nix::unistd::getgid().as_raw(),
            )
        };
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        chown_nofollow(&sock, uid, gid).unwrap();
        let m = std::fs::symlink_metadata(&sock).unwrap();
        assert_eq!((m.uid(), m.gid()), (uid, gid));
        let dir = d.path().join("vm");
        private_dir(&dir, 0o700, Some((uid, gid))).unwrap();
        let m = std::fs::metadata(&dir).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (uid, gid, 0o700));
    }
}
