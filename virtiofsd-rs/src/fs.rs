//! The filesystem the daemon serves: fuse-backend-rs's passthrough filesystem
//! behind a guard that enforces kata-virtiofsd's policy.
//!
//! The passthrough keeps an `O_PATH` file descriptor per inode and does every
//! operation relative to those descriptors with `*at()` calls and `O_NOFOLLOW`;
//! names with a `/`, and `.`/`..` outside LOOKUP, are refused, and `..` looked up
//! in the root is the root. The inode numbers the guest sees index a table of
//! those descriptors: a number the guest makes up is `EBADF`/`ENOENT`, never a
//! host file. File handles (`open_by_handle_at`) are not used
//! (`inode_file_handles = false`), so there is nothing the guest could forge.
//!
//! The guard adds, on top:
//! * `--readonly`: every request that would change the tree or a file is
//!   refused with `EROFS` (opens for writing or truncation included);
//! * no setuid, and no setgid on non-directories, from the guest: the bits are
//!   cleared from the mode of CREATE, MKNOD, MKDIR and SETATTR unless
//!   `allow_setid` is set. Whether the target is a directory is taken from the
//!   inode (an `fstat` of the held fd), never from the mode the guest sends.
//!   Bits a file already has (an image's `su`) are reported as they are; the
//!   server runs without `CAP_FSETID` (see [`crate::sandbox`]), so the host
//!   kernel itself clears them on every WRITE, truncation and `O_TRUNC` open
//!   from the guest. A setgid directory of a group the server is not in keeps
//!   its bit: its mode change runs with that group as the thread's egid;
//! * no device nodes from the guest: MKNOD of a character or block device is
//!   `EPERM` unless `allow_devices` is set, except the 0:0 character device
//!   overlayfs uses as a whiteout (it reaches no driver);
//! * extended attributes (`--xattr`) only in the `user.` namespace: `security.`,
//!   `trusted.` and `system.` (POSIX ACLs, ...) names are refused (`EPERM` to
//!   set or remove, `ENODATA` to read) and left out of listings, so the guest can
//!   neither plant file capabilities or SELinux labels on host files nor read
//!   the host's;
//! * caps on what the guest makes the daemon hold ([`Limits`]): open file and
//!   directory handles (one fd each; past the cap OPEN, CREATE and OPENDIR are
//!   `EMFILE`) and inodes (one `O_PATH` fd each; past the cap a lookup that
//!   would add one is `ENFILE`), refusals counted in [`crate::metrics`];
//! * host files are never opened `O_DIRECT` (see [`host_open_flags`]);
//! * the submount flag on entries that sit on another filesystem than their
//!   parent (`--announce-submounts`);
//! * the error marks and byte counts of [`crate::metrics`].

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid, ATTR_SUBMOUNT,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::{Config, PassthroughFs};

use crate::metrics::{self, Metrics};

/// What the guest may do beyond plain file access.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Refuse every change (`EROFS`).
    pub readonly: bool,
    /// Serve extended attributes (the `user.` namespace only).
    pub xattr: bool,
    /// Keep setuid/setgid bits the guest asks for.
    pub allow_setid: bool,
    /// Let the guest create character and block devices.
    pub allow_devices: bool,
    /// Flag entries on another filesystem than their parent as submounts.
    pub announce_submounts: bool,
    /// Caps on what the guest makes the daemon hold.
    pub limits: Limits,
}

/// Default cap on open file and directory handles ([`Limits::handles`]).
pub const DEFAULT_MAX_HANDLES: usize = 65_536;
/// Default cap on inodes held ([`Limits::inodes`]).
pub const DEFAULT_MAX_INODES: usize = 262_144;

/// Per-VM caps on what the guest can make the daemon hold. Each handle and
/// each inode is one host fd (and a few hundred bytes of tables); the guest
/// gives them back with RELEASE/RELEASEDIR and FORGET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open file and directory handles (OPEN, CREATE, OPENDIR beyond it:
    /// `EMFILE`).
    pub handles: usize,
    /// Inodes held, the root included (a lookup that would add one beyond it:
    /// `ENFILE`; lookups of inodes already held still work).
    pub inodes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handles: DEFAULT_MAX_HANDLES,
            inodes: DEFAULT_MAX_INODES,
        }
    }
}

/// Inode numbers the passthrough uses.
pub type Inode = u64;
/// File handle numbers the passthrough uses.
pub type Handle = u64;

/// The largest extended attribute value or list Linux handles (XATTR_SIZE_MAX).
const XATTR_SIZE_MAX: usize = 65536;

/// The passthrough filesystem with kata-virtiofsd's policy.
pub struct GuardedFs {
    inner: PassthroughFs<()>,
    policy: Policy,
    metrics: Arc<Metrics>,
    /// `/proc/self/fd` (opened with the passthrough's, before any pivot).
    proc_fd: File,
    /// Where the root directory is, as `/proc/self/fd` links show paths.
    root_dir: PathBuf,
    /// The root directory, opened at INIT (after the sandbox is set up).
    root: OnceLock<File>,
    /// Handles given out and not released (counted against `limits.handles`).
    handles: AtomicUsize,
}

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

fn erofs<T>() -> io::Result<T> {
    Err(err(libc::EROFS))
}

/// Whether an xattr name is in a namespace the guest may use.
pub fn xattr_name_allowed(name: &[u8]) -> bool {
    name.starts_with(b"user.") && name.len() > b"user.".len()
}

/// Keeps only the allowed names of a NUL-separated xattr name list.
pub fn filter_xattr_list(list: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(list.len());
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if xattr_name_allowed(name) {
            out.extend_from_slice(name);
            out.push(0);
        }
    }
    out
}

/// The mode the guest asked for, without the setuid bit and (but on
/// directories) the setgid bit.
pub fn strip_setid(mode: u32, is_dir: bool) -> u32 {
    let mut m = mode & !libc::S_ISUID;
    if !is_dir {
        m &= !libc::S_ISGID;
    }
    m
}

/// Sets the calling thread's effective (and filesystem) gid for as long as it
/// lives, then puts the previous one back. A raw `setresgid`: glibc's wrapper
/// would change every thread of the process.
struct ScopedEgid(libc::gid_t);

impl ScopedEgid {
    fn new(gid: libc::gid_t) -> io::Result<ScopedEgid> {
        // SAFETY: getegid takes no arguments and cannot fail.
        let old = unsafe { libc::getegid() };
        // SAFETY: setresgid with -1 (unchanged) for the real and saved ids.
        let rc = unsafe { libc::syscall(libc::SYS_setresgid, -1i64, gid as i64, -1i64) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ScopedEgid(old))
    }
}

impl Drop for ScopedEgid {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        let rc = unsafe { libc::syscall(libc::SYS_setresgid, -1i64, self.0 as i64, -1i64) };
        if rc != 0 {
            kata_proto::error_limited!(
                "restoring the thread's egid {}: {}",
                self.0,
                io::Error::last_os_error()
            );
        }
    }
}

/// Whether MKNOD of `mode`/`rdev` creates a device the policy refuses.
pub fn mknod_refused(mode: u32, rdev: u32, allow_devices: bool) -> bool {
    let kind = mode & libc::S_IFMT;
    let device = kind == libc::S_IFCHR || kind == libc::S_IFBLK;
    // 0:0 character device: overlayfs's whiteout, no driver behind it
    let whiteout = kind == libc::S_IFCHR && rdev == 0;
    device && !whiteout && !allow_devices
}

/// The open flags the host file is opened (or, by the passthrough's
/// `F_SETFL` on READ/WRITE, reset) with: the guest's, without `O_DIRECT`.
/// The passthrough's READ/WRITE buffers (a `/dev/fuse` message, a guest
/// memory region) carry no alignment guarantee, so an `O_DIRECT` host fd turns
/// a guest's perfectly aligned direct write into `EINVAL`; the guest kernel
/// still bypasses its own page cache. Upstream virtiofsd also ignores
/// `O_DIRECT` unless `--allow-direct-io`.
pub fn host_open_flags(flags: u32) -> u32 {
    flags & !(libc::O_DIRECT as u32)
}

/// Whether OPEN `flags` would change the file.
fn open_writes(flags: u32) -> bool {
    let f = flags as i32;
    f & libc::O_ACCMODE != libc::O_RDONLY || f & libc::O_TRUNC != 0
}

/// An fd to do xattr calls on.
enum XattrTarget {
    /// A regular file or directory, opened for reading.
    Open(File),
    /// A symlink, device, FIFO or socket: only namespaces we refuse apply.
    Special,
}

impl GuardedFs {
    /// Creates the filesystem. Opens `/proc/self/fd` (the passthrough does the
    /// same): call it before the sandbox hides `/proc`. `cfg.root_dir` is opened
    /// at INIT.
    pub fn new(cfg: Config, policy: Policy, metrics: Arc<Metrics>) -> io::Result<GuardedFs> {
        let root_dir = PathBuf::from(&cfg.root_dir);
        let inner = PassthroughFs::<()>::new(Config {
            // xattrs are served by the guard (the passthrough's xattr calls use
            // absolute /proc/self/fd paths, which do not exist in the sandbox)
            xattr: false,
            ..cfg
        })?;
        inner.set_inode_limit(policy.limits.inodes, metrics.refused_inodes_counter());
        let proc_fd = File::open("/proc/self/fd")?;
        Ok(GuardedFs {
            inner,
            policy,
            metrics,
            proc_fd,
            root_dir,
            root: OnceLock::new(),
            handles: AtomicUsize::new(0),
        })
    }

    /// Inodes held now (the root included), and the entries of the
    /// passthrough's (inode, device, mount id) table.
    pub fn inode_counts(&self) -> (usize, usize) {
        self.inner.inode_counts()
    }

    /// Handles held now: as the guard counts them, and as the passthrough's
    /// table holds them (the two agree between requests).
    pub fn handle_counts(&self) -> (usize, usize) {
        (
            self.handles.load(Ordering::Acquire),
            self.inner.handle_count(),
        )
    }

    /// Takes one handle from the budget; `EMFILE` (counted) when none is left.
    fn take_handle(&self) -> io::Result<()> {
        let max = self.policy.limits.handles;
        match self
            .handles
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            }) {
            Ok(_) => Ok(()),
            Err(_) => {
                self.metrics.refuse_handle();
                kata_proto::warn_limited!("the guest holds {max} handles (the cap): EMFILE");
                self.refuse(libc::EMFILE)
            }
        }
    }

    /// Gives one handle back to the budget.
    fn put_handle(&self) {
        let _ = self
            .handles
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Runs `open`, which uses one handle of the budget if it returns one.
    fn with_handle<T>(
        &self,
        open: impl FnOnce() -> io::Result<T>,
        got: impl Fn(&T) -> bool,
    ) -> io::Result<T> {
        self.take_handle()?;
        let r = open();
        if !matches!(&r, Ok(v) if got(v)) {
            self.put_handle();
        }
        self.track(r)
    }

    /// `ENFILE` (counted) when no new inode may be held: checked before a
    /// CREATE, MKNOD, MKDIR or SYMLINK makes anything on the host (the
    /// passthrough's own check, at the lookup that follows, is the exact one).
    fn check_inode_room(&self) -> io::Result<()> {
        if self.inner.inode_counts().0 >= self.policy.limits.inodes {
            self.metrics.refuse_inode();
            kata_proto::warn_limited!(
                "the guest holds {} inodes (the cap): ENFILE",
                self.policy.limits.inodes
            );
            return self.refuse(libc::ENFILE);
        }
        Ok(())
    }

    /// SETATTR's mode change as the policy allows it.
    fn guarded_setattr(
        &self,
        ctx: &Context,
        inode: Inode,
        mut attr: stat64,
        handle: Option<Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        if !valid.contains(SetattrValid::MODE) || self.policy.allow_setid {
            return self.inner.setattr(ctx, inode, attr, handle, valid);
        }
        // the file type is the inode's (fstat of the held fd), never the one
        // in the mode the guest sent
        let (cur, _) = self.inner.getattr(ctx, inode, None)?;
        let is_dir = cur.st_mode & libc::S_IFMT == libc::S_IFDIR;
        attr.st_mode = strip_setid(attr.st_mode, is_dir);
        // SAFETY: getegid takes no arguments and cannot fail.
        let egid = unsafe { libc::getegid() };
        if !(is_dir && attr.st_mode & libc::S_ISGID != 0 && cur.st_gid != egid) {
            return self.inner.setattr(ctx, inode, attr, handle, valid);
        }
        // Without CAP_FSETID the host kernel drops S_ISGID from a chmod by a
        // caller outside the file's group; a setgid directory's bit is the
        // guest's to set (group inheritance), so its mode changes with the
        // directory's group as this thread's egid. Then the rest, as root.
        {
            let _gid = ScopedEgid::new(cur.st_gid)?;
            self.inner
                .setattr(ctx, inode, attr, handle, SetattrValid::MODE)?;
        }
        let rest = valid - SetattrValid::MODE;
        if rest.is_empty() {
            return self.inner.getattr(ctx, inode, handle);
        }
        self.inner.setattr(ctx, inode, attr, handle, rest)
    }

    fn track<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if r.is_err() {
            metrics::mark_error();
        }
        r
    }

    fn refuse<T>(&self, errno: i32) -> io::Result<T> {
        self.track(Err(err(errno)))
    }

    fn st_dev(&self, ctx: &Context, inode: Inode) -> Option<u64> {
        self.inner
            .getattr(ctx, inode, None)
            .ok()
            .map(|(st, _)| st.st_dev)
    }

    fn flag_submount(&self, parent_dev: Option<u64>, entry: &mut Entry) {
        if let Some(dev) = parent_dev {
            if entry.inode != 0 && entry.attr.st_dev != dev {
                entry.attr_flags |= ATTR_SUBMOUNT;
            }
        }
    }

    /// Opens the file behind `inode` for an xattr call. The passthrough holds an
    /// `O_PATH` descriptor, on which xattr calls fail; its `/proc/self/fd` link
    /// gives the path, which is resolved again inside the root (no symlinks, no
    /// escape: `RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS`) and accepted only if it
    /// is the same inode (device and inode number). A file renamed meanwhile
    /// or deleted gives `ENOENT`.
    fn xattr_target(&self, ctx: &Context, inode: Inode) -> io::Result<XattrTarget> {
        let root = self.root.get().ok_or_else(|| err(libc::EIO))?;
        let (want, _) = self.inner.getattr(ctx, inode, None)?;
        let kind = want.st_mode & libc::S_IFMT;
        if kind != libc::S_IFREG && kind != libc::S_IFDIR {
            return Ok(XattrTarget::Special);
        }
        let path = self.inner.readlinkat_proc_file(inode)?;
        let rel = path
            .strip_prefix(&self.root_dir)
            .map_err(|_| err(libc::ENOENT))?;
        let rel = if rel.as_os_str().is_empty() {
            CString::new(".").expect("no NUL")
        } else {
            CString::new(rel.as_os_str().as_bytes()).map_err(|_| err(libc::ENOENT))?
        };
        let path_fd = openat2_beneath(root, &rel)?;
        let mut st = std::mem::MaybeUninit::<libc::stat64>::zeroed();
        // SAFETY: fstat64 writes into `st`, which is large enough; the fd is ours.
        let rc = unsafe { libc::fstat64(path_fd.as_raw_fd(), st.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstat64 succeeded and filled `st`.
        let st = unsafe { st.assume_init() };
        if st.st_dev != want.st_dev || st.st_ino != want.st_ino {
            return Err(err(libc::ENOENT));
        }
        // reopen for reading through /proc/self/fd: no path walk, same inode
        let name = CString::new(path_fd.as_raw_fd().to_string()).expect("no NUL");
        let mut flags = libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY;
        if kind == libc::S_IFDIR {
            flags |= libc::O_DIRECTORY;
        }
        // SAFETY: openat with a valid dirfd and NUL-terminated name; the result
        // is checked and owned below.
        let fd = unsafe { libc::openat(self.proc_fd.as_raw_fd(), name.as_ptr(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by openat and nothing else owns it.
        Ok(XattrTarget::Open(unsafe { File::from_raw_fd(fd) }))
    }

    fn do_getxattr(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        if !self.policy.xattr {
            return Err(err(libc::ENOSYS));
        }
        if !xattr_name_allowed(name.to_bytes()) {
            return Err(err(libc::ENODATA));
        }
        let XattrTarget::Open(f) = self.xattr_target(ctx, inode)? else {
            return Err(err(libc::ENODATA));
        };
        let cap = (size as usize).min(XATTR_SIZE_MAX);
        let mut buf = vec![0u8; cap];
        // SAFETY: the kernel writes at most `cap` bytes into `buf`.
        let n =
            unsafe { libc::fgetxattr(f.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), cap) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if size == 0 {
            Ok(GetxattrReply::Count(n as u32))
        } else {
            buf.truncate(n as usize);
            Ok(GetxattrReply::Value(buf))
        }
    }

    fn do_listxattr(&self, ctx: &Context, inode: Inode, size: u32) -> io::Result<ListxattrReply> {
        if !self.policy.xattr {
            return Err(err(libc::ENOSYS));
        }
        let names = match self.xattr_target(ctx, inode)? {
            XattrTarget::Special => Vec::new(),
            XattrTarget::Open(f) => {
                let mut buf = vec![0u8; XATTR_SIZE_MAX];
                // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
                let n =
                    unsafe { libc::flistxattr(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                filter_xattr_list(&buf[..n as usize])
            }
        };
        if size == 0 {
            Ok(ListxattrReply::Count(names.len() as u32))
        } else if names.len() > size as usize {
            Err(err(libc::ERANGE))
        } else {
            Ok(ListxattrReply::Names(names))
        }
    }

    fn do_setxattr(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        if !self.policy.xattr {
            return Err(err(libc::ENOSYS));
        }
        if self.policy.readonly {
            return erofs();
        }
        if !xattr_name_allowed(name.to_bytes()) {
            return Err(err(libc::EPERM));
        }
        let XattrTarget::Open(f) = self.xattr_target(ctx, inode)? else {
            return Err(err(libc::EPERM));
        };
        // SAFETY: name is NUL-terminated, value is a valid slice.
        let rc = unsafe {
            libc::fsetxattr(
                f.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags as i32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn do_removexattr(&self, ctx: &Context, inode: Inode, name: &CStr) -> io::Result<()> {
        if !self.policy.xattr {
            return Err(err(libc::ENOSYS));
        }
        if self.policy.readonly {
            return erofs();
        }
        if !xattr_name_allowed(name.to_bytes()) {
            return Err(err(libc::EPERM));
        }
        let XattrTarget::Open(f) = self.xattr_target(ctx, inode)? else {
            return Err(err(libc::ENODATA));
        };
        // SAFETY: name is NUL-terminated.
        let rc = unsafe { libc::fremovexattr(f.as_raw_fd(), name.as_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(dir, path, O_PATH | O_NOFOLLOW)` resolved inside `dir` without
/// following any symlink.
fn openat2_beneath(dir: &File, path: &CStr) -> io::Result<File> {
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 with a valid dirfd, a NUL-terminated path and an open_how
    // of the size passed; the result is checked and owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

#[path = "fs_ops.rs"]
mod ops;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattr_namespaces() {
        assert!(xattr_name_allowed(b"user.foo"));
        for n in [
            &b"security.capability"[..],
            b"security.selinux",
            b"trusted.overlay.opaque",
            b"system.posix_acl_access",
            b"system.posix_acl_default",
            b"user.",
            b"user",
            b"",
            b"USER.x",
        ] {
            assert!(!xattr_name_allowed(n), "{}", String::from_utf8_lossy(n));
        }
        let list = b"user.a\0security.selinux\0trusted.x\0user.b\0system.posix_acl_access\0";
        assert_eq!(filter_xattr_list(list), b"user.a\0user.b\0");
        assert_eq!(filter_xattr_list(b""), b"");
    }

    #[test]
    fn setid_bits() {
        assert_eq!(strip_setid(0o104755, false), 0o100755);
        assert_eq!(strip_setid(0o102755, false), 0o100755);
        assert_eq!(strip_setid(0o106755, false), 0o100755);
        // setgid directories keep their group inheritance
        assert_eq!(strip_setid(0o042775, true), 0o042775);
        assert_eq!(strip_setid(0o046775, true), 0o042775);
        assert_eq!(strip_setid(0o1777, false), 0o1777);
    }

    #[test]
    fn devices() {
        let chr = libc::S_IFCHR | 0o600;
        let blk = libc::S_IFBLK | 0o600;
        let makedev = |ma: u32, mi: u32| (ma << 8) | mi;
        assert!(mknod_refused(chr, makedev(1, 3), false));
        assert!(mknod_refused(blk, makedev(8, 0), false));
        assert!(mknod_refused(blk, 0, false));
        assert!(!mknod_refused(chr, 0, false), "whiteout");
        assert!(!mknod_refused(chr, makedev(1, 3), true));
        assert!(!mknod_refused(libc::S_IFIFO | 0o600, 0, false));
        assert!(!mknod_refused(libc::S_IFSOCK | 0o600, 0, false));
        assert!(!mknod_refused(libc::S_IFREG | 0o600, 0, false));
    }

    #[test]
    fn no_direct_io_on_the_host() {
        let d = libc::O_DIRECT as u32;
        let rw = libc::O_RDWR as u32;
        assert_eq!(host_open_flags(rw | d), rw);
        assert_eq!(
            host_open_flags(rw | d | libc::O_APPEND as u32),
            rw | libc::O_APPEND as u32
        );
        assert_eq!(
            host_open_flags(libc::O_WRONLY as u32),
            libc::O_WRONLY as u32
        );
    }

    #[test]
    fn write_opens() {
        assert!(!open_writes(libc::O_RDONLY as u32));
        assert!(open_writes(libc::O_WRONLY as u32));
        assert!(open_writes(libc::O_RDWR as u32));
        assert!(open_writes((libc::O_RDONLY | libc::O_TRUNC) as u32));
    }
}
