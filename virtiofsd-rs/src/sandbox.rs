//! The server process's sandbox (docs/virtiofsd.md has the reasoning).
//!
//! 1. [`prepare_namespace`]: a new mount namespace whose mounts are slaves of
//!    the host's (nothing we mount leaks out; mounts the host adds below the
//!    shared directory later still show up, as Kata needs for container
//!    rootfs bind mounts); `/proc` replaced by a tiny tmpfs holding only
//!    `self/fd` (a bind of this process's fd directory, so `..` from it reaches
//!    nothing of procfs) and an empty `self/mountinfo`: the two paths
//!    fuse-backend-rs's passthrough opens when it is created.
//! 2. The filesystem is created (it opens `/proc/self/fd`).
//! 3. [`pivot_into`]: the shared directory bind-mounted onto itself becomes `/`
//!    (pivot_root), the old root is detached: from then on the process sees
//!    nothing but the shared directory, and `..` at `/` stays at `/` in the
//!    kernel's own path walk.
//! 4. [`fit_fd_limit`]: `RLIMIT_NOFILE` set to what the caps on handles and
//!    inodes need (lowered if more was inherited; the caps lowered if the hard
//!    limit cannot be raised). [`drop_capabilities`]: bounding, permitted,
//!    effective sets reduced to what a passthrough server needs (no
//!    `CAP_FSETID`: the host kernel then clears setuid/setgid on every write
//!    and truncation from the guest); inheritable and ambient emptied.
//! 5. [`install_seccomp`]: an allow-list of the system calls the daemon makes,
//!    on every thread; anything else kills the process (or fails with ENOSYS,
//!    or is only logged, for debugging).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::fs::Limits;
use anyhow::{anyhow, bail, Context as _, Result};
use caps::{CapSet, Capability, CapsHashSet};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

// open_tree(2) / move_mount(2) flags (linux/mount.h)
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| anyhow!("{} has a NUL byte", p.display()))
}

/// Steps 1: own mount namespace, `/proc` reduced to `self/fd` + `self/mountinfo`.
pub fn prepare_namespace() -> Result<()> {
    unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .context("making / a slave mount")?;

    // a detached bind of /proc/self/fd, taken before /proc is covered
    let src = CString::new("/proc/self/fd").expect("no NUL");
    // SAFETY: open_tree with a NUL-terminated path; the result is checked and owned.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if tree < 0 {
        return Err(io::Error::last_os_error()).context("open_tree(/proc/self/fd)");
    }
    // SAFETY: a new fd returned by open_tree, owned by nobody else.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };

    mount(
        Some("tmpfs"),
        "/proc",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=16k,nr_inodes=16,mode=0555"),
    )
    .context("tmpfs on /proc")?;
    std::fs::create_dir_all("/proc/self/fd").context("mkdir /proc/self/fd")?;
    // fuse-backend-rs opens it when created; it only reads it for file-handle
    // inodes, which are off
    File::create("/proc/self/mountinfo").context("creating /proc/self/mountinfo")?;
    let empty = CString::new("").expect("no NUL");
    let dst = CString::new("/proc/self/fd").expect("no NUL");
    // SAFETY: move_mount of the detached tree onto an existing directory; both
    // strings are NUL-terminated; the result is checked.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context("move_mount onto /proc/self/fd");
    }
    Ok(())
}

/// Step 3: `dir` becomes `/`, the old root is detached.
pub fn pivot_into(dir: &Path) -> Result<()> {
    mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("bind-mounting {} onto itself", dir.display()))?;
    let old_root = File::open("/").context("opening /")?;
    let new_root = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    nix::unistd::fchdir(&new_root).context("fchdir(new root)")?;
    let dot = cstr(Path::new("."))?;
    // SAFETY: pivot_root(".", ".") with NUL-terminated paths; checked.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("pivot_root");
    }
    // the old root is now stacked under the new one: detach it
    nix::unistd::fchdir(&old_root).context("fchdir(old root)")?;
    mount(
        None::<&str>,
        ".",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .context("making the old root a slave")?;
    umount2(".", MntFlags::MNT_DETACH).context("detaching the old root")?;
    drop(old_root);
    nix::unistd::fchdir(&new_root).context("fchdir(new root)")?;
    nix::unistd::chdir("/").context("chdir /")?;
    Ok(())
}

/// The capabilities a passthrough server needs: changing owners and modes of
/// any file, reading and writing regardless of permission bits (the guest
/// kernel checks permissions), acting as the requesting uid/gid, creating
/// nodes, setting file capabilities (`user.` xattrs only reach the disk, but
/// chown must keep working on files with capabilities).
///
/// Not `CAP_FSETID` (unless `allow_setid`): without it the host kernel clears
/// setuid (and group-executable setgid) from a regular file on every write,
/// truncation, `O_TRUNC` open and fallocate the server does for the guest,
/// whatever the guest asked (`WRITE_KILL_PRIV` or not; a guest writer with
/// its own `CAP_FSETID` never asks), atomically with the change, on every
/// path the passthrough has to a file's data. It also clears a setgid bit
/// from a chmod by a caller outside the file's group; for directories, where
/// setgid means group inheritance, the guard makes that chmod with the
/// directory's group as the thread's egid (`crate::fs`).
pub fn server_capabilities(allow_setid: bool) -> CapsHashSet {
    let mut caps: CapsHashSet = [
        Capability::CAP_CHOWN,
        Capability::CAP_DAC_OVERRIDE,
        Capability::CAP_FOWNER,
        Capability::CAP_SETGID,
        Capability::CAP_SETUID,
        Capability::CAP_MKNOD,
        Capability::CAP_SETFCAP,
    ]
    .into_iter()
    .collect();
    if allow_setid {
        caps.insert(Capability::CAP_FSETID);
    }
    caps
}

/// File descriptors the server needs besides one per handle and one per
/// inode: the sockets and the vhost-user connection (eventfds, guest memory
/// regions), epoll and eventfds of the vring, FUSE channel and control
/// threads, `/proc/self/fd`, the root.
pub const FD_RESERVE: usize = 512;

/// The caps that fit `nofile` descriptors: `want` if both fit with
/// [`FD_RESERVE`] to spare; otherwise a quarter of what is left goes to
/// handles and the rest to inodes (neither above what was asked).
pub fn clamp_limits(want: Limits, nofile: u64) -> Limits {
    let budget = usize::try_from(nofile)
        .unwrap_or(usize::MAX)
        .saturating_sub(FD_RESERVE);
    if want.handles.saturating_add(want.inodes) <= budget {
        return want;
    }
    let handles = want.handles.min(budget / 4);
    let inodes = want.inodes.min(budget - handles);
    Limits { handles, inodes }
}

fn getrlimit_nofile() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `r`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

fn setrlimit_nofile(soft: u64, hard: u64) -> io::Result<()> {
    let r = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads `r`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Step 4a: sets `RLIMIT_NOFILE` (soft and hard) to exactly what `want`
/// needs (handles + inodes + [`FD_RESERVE`]): lowered when more was
/// inherited, raised when the hard limit allows it. Raising the hard limit
/// needs `CAP_SYS_RESOURCE` (and stays under `fs.nr_open`): when that fails
/// (`EPERM`, `EINVAL`) the limit is set to the current hard limit and the caps
/// are lowered to fit ([`clamp_limits`]). Returns the caps in force and the
/// limit. Call it before seccomp (which does not allow `setrlimit`).
pub fn fit_fd_limit(want: Limits) -> Result<(Limits, u64)> {
    let need = want
        .handles
        .saturating_add(want.inodes)
        .saturating_add(FD_RESERVE) as u64;
    let (_, hard) = getrlimit_nofile().context("getrlimit(RLIMIT_NOFILE)")?;
    match setrlimit_nofile(need, need) {
        Ok(()) => return Ok((want, need)),
        Err(e) if need > hard => {
            tracing::debug!("raising RLIMIT_NOFILE to {need}: {e}");
        }
        Err(e) => return Err(e).context(format!("setrlimit(RLIMIT_NOFILE, {need})")),
    }
    let got = clamp_limits(want, hard);
    if got.inodes < 2 {
        bail!("RLIMIT_NOFILE {hard} leaves no file descriptors to serve with");
    }
    setrlimit_nofile(hard, hard).context(format!("setrlimit(RLIMIT_NOFILE, {hard})"))?;
    tracing::warn!(
        "RLIMIT_NOFILE cannot be raised to {need} (hard limit {hard}): caps lowered to {} handles, {} inodes",
        got.handles,
        got.inodes
    );
    Ok((got, hard))
}

/// Step 4, on the calling thread (call it before any other thread exists).
pub fn drop_capabilities(allow_setid: bool) -> Result<()> {
    let keep = server_capabilities(allow_setid);
    for c in caps::all() {
        if !keep.contains(&c) {
            // a capability the kernel does not know is not in the set anyway
            let _ = caps::drop(None, CapSet::Bounding, c);
        }
    }
    caps::clear(None, CapSet::Ambient).context("clearing ambient capabilities")?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())
        .context("clearing inheritable capabilities")?;
    caps::set(None, CapSet::Effective, &keep).context("setting effective capabilities")?;
    caps::set(None, CapSet::Permitted, &keep).context("setting permitted capabilities")?;
    Ok(())
}

/// What an unlisted system call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Kill the process (default).
    Kill,
    /// Fail with ENOSYS (to find what is missing).
    Errno,
    /// Allow, but log to the audit log.
    Log,
    /// No filter.
    None,
}

/// The system calls the server process makes once sandboxed (x86_64).
pub const ALLOWED_SYSCALLS: &[i64] = &[
    // memory
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    // threads, signals, time
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_restart_syscall,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    // event loops (vhost-user-backend, mio/tokio, the FUSE channel)
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // sockets: the vhost-user connection (with fds), the control endpoint
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // tokio's signal driver wakes itself through a socket pair
    libc::SYS_socketpair,
    // file I/O
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_syncfs,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_copy_file_range,
    // the passthrough's tree operations, all fd-relative
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_umask,
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    // acting as the requesting user, per thread; CAP_FSETID around writes
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_capget,
    libc::SYS_capset,
];

/// Builds the filter for `mode` (None for [`SeccompMode::None`]).
pub fn build_seccomp(mode: SeccompMode) -> Result<Option<BpfProgram>> {
    let mismatch = match mode {
        SeccompMode::None => return Ok(None),
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Errno => SeccompAction::Errno(libc::ENOSYS as u32),
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED_SYSCALLS.iter().map(|&n| (n, vec![])).collect();
    // prctl only to name threads (std, tokio)
    let prctl = [libc::PR_SET_NAME, libc::PR_GET_NAME]
        .into_iter()
        .map(|op| {
            let c = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, op as u64)?;
            SeccompRule::new(vec![c])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("seccomp prctl rule: {e}"))?;
    rules.insert(libc::SYS_prctl, prctl);
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| anyhow!("seccomp filter: {e}"))?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|e| anyhow!("compiling the seccomp filter: {e:?}"))?;
    Ok(Some(prog))
}

/// Step 5: no_new_privs and the filter, on every thread of the process.
pub fn install_seccomp(mode: SeccompMode) -> Result<()> {
    let Some(prog) = build_seccomp(mode)? else {
        return Ok(());
    };
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1) takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error()).context("PR_SET_NO_NEW_PRIVS");
    }
    seccompiler::apply_filter_all_threads(&prog).map_err(|e| anyhow!("installing seccomp: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_compiles_and_lists_no_mount_calls() {
        for mode in [SeccompMode::Kill, SeccompMode::Errno, SeccompMode::Log] {
            assert!(build_seccomp(mode).unwrap().is_some());
        }
        assert!(build_seccomp(SeccompMode::None).unwrap().is_none());
        for forbidden in [
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_open_by_handle_at,
            libc::SYS_name_to_handle_at,
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_ioctl,
            libc::SYS_chdir,
            libc::SYS_fchdir,
            libc::SYS_prctl,
        ] {
            assert!(!ALLOWED_SYSCALLS.contains(&forbidden), "{forbidden}");
        }
    }

    #[test]
    fn capability_set() {
        let c = server_capabilities(false);
        assert!(c.contains(&Capability::CAP_DAC_OVERRIDE));
        assert!(!c.contains(&Capability::CAP_SYS_ADMIN));
        assert!(!c.contains(&Capability::CAP_DAC_READ_SEARCH));
        assert!(!c.contains(&Capability::CAP_SYS_RESOURCE));
        // the host kernel clears setuid/setgid on the guest's writes only
        // when the server lacks it
        assert!(!c.contains(&Capability::CAP_FSETID));
        assert_eq!(c.len(), 7);
        let c = server_capabilities(true);
        assert!(c.contains(&Capability::CAP_FSETID));
        assert_eq!(c.len(), 8);
    }

    #[test]
    fn caps_fit_the_fd_limit() {
        let want = Limits {
            handles: 65_536,
            inodes: 262_144,
        };
        // room for both
        assert_eq!(clamp_limits(want, 1 << 20), want);
        assert_eq!(clamp_limits(want, u64::MAX), want);
        assert_eq!(
            clamp_limits(want, (65_536 + 262_144 + FD_RESERVE) as u64),
            want
        );
        // this machine's hard limit: a quarter to handles, the rest to inodes
        let l = clamp_limits(want, 20_000);
        assert_eq!(l.handles, (20_000 - FD_RESERVE) / 4);
        assert_eq!(l.handles + l.inodes + FD_RESERVE, 20_000);
        // never more than asked
        let small = Limits {
            handles: 100,
            inodes: 1_000_000,
        };
        let l = clamp_limits(small, 20_000);
        assert_eq!(l.handles, 100);
        assert_eq!(l.inodes, 20_000 - FD_RESERVE - 100);
        // nothing left
        assert_eq!(
            clamp_limits(want, 100),
            Limits {
                handles: 0,
                inodes: 0
            }
        );
    }
}
