//! The container set-up helper: the agent re-executes itself
//! (`/proc/self/exe __kata_container_init`) for every container and exec
//! process, with the process's stdio as fds 0-2 and a socket to the agent as
//! fd 3. Being a fresh single-threaded process, it can unshare, fork, mount and
//! drop privileges safely (the agent itself is multi-threaded), exactly like
//! `runc init`.
//!
//! Protocol on fd 3 (both ways: a u32 big-endian length, then JSON):
//! agent → helper: [`ChildRequest`]; helper → agent: [`ChildMsg::Pid`] (the
//! container process, as the agent sees it), then for a container
//! [`ChildMsg::Ready`] once the rootfs is in place; the agent then writes one
//! byte to start it. A [`ChildMsg::Error`] may come at any point. The socket is
//! close-on-exec, so end of file after the last message means `execve` worked.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chdir, fork, sethostname, ForkResult, Gid, Uid};
use oci_spec::runtime::{
    LinuxDeviceType, LinuxNamespaceType, Mount, PosixRlimitType, Process, Spec,
};

use crate::mounts::{parse_options, resolve_in_root};
use crate::seccomp;

mod wire;

pub use wire::*;

/// argv[1] that makes `kata-agent` run [`child_main`].
pub const CHILD_ARG: &str = "__kata_container_init";
/// The fd of the socket to the agent in the helper.
pub const SYNC_FD: i32 = 3;
/// Where the helper looks for programs when the process has no PATH.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A set-up failure: its code and a message.
#[derive(Debug)]
struct Fail {
    code: SetupCode,
    message: String,
}

type R<T> = Result<T, Fail>;

fn fail(code: SetupCode, message: impl Into<String>) -> Fail {
    Fail {
        code,
        message: message.into(),
    }
}

fn invalid(message: impl Into<String>) -> Fail {
    fail(SetupCode::InvalidArgument, message)
}

fn internal(message: impl Into<String>) -> Fail {
    fail(SetupCode::Internal, message)
}

/// The helper's entry point; never returns.
pub fn child_main() -> ! {
    // Not dumpable until the exec of the container's program (which resets
    // it): processes of the container cannot open this helper's
    // /proc/<pid>/exe, mem or fds while it joins their namespaces.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // SAFETY: fd 3 was set up by the agent for this process (dup2 in pre_exec)
    // and nothing else in this fresh process owns it.
    let mut sync = unsafe { UnixStream::from_raw_fd(SYNC_FD) };
    // dup2 cleared close-on-exec: set it again, so that the container process
    // does not inherit the socket and its closing tells the agent exec worked.
    let _ = nix::fcntl::fcntl(
        &sync,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let req: ChildRequest = match recv(&mut sync) {
        Ok(Some(r)) => r,
        _ => std::process::exit(2),
    };
    let result = match &req.mode {
        ChildMode::Create { rootfs } => create(&req, rootfs, &mut sync),
        ChildMode::Exec { target_pid } => exec(&req, *target_pid, &mut sync),
    };
    if let Err(f) = result {
        let _ = send(
            &mut sync,
            &ChildMsg::Error {
                code: f.code,
                message: f.message,
            },
        );
    }
    std::process::exit(1)
}

fn ns_flag(t: LinuxNamespaceType) -> CloneFlags {
    match t {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::Time => CloneFlags::empty(),
    }
}

/// Forks; the parent reports the child's pid and exits, the child returns
/// once the parent is gone. Both write to the one socket: without the wait a
/// quick child could say `Ready` before its parent said `Pid`.
fn fork_and_report(sync: &mut UnixStream) -> R<()> {
    let (gate_r, gate_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| internal(format!("pipe: {e}")))?;
    // SAFETY: the helper is single-threaded, so the child may run any code.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(gate_w);
            // end of file: the parent reported the pid and exited
            let mut b = [0u8; 1];
            let _ = File::from(gate_r).read(&mut b);
            Ok(())
        }
        Ok(ForkResult::Parent { child }) => {
            drop(gate_r);
            let code = match send(sync, &ChildMsg::Pid(child.as_raw())) {
                Ok(()) => 0,
                Err(_) => 1,
            };
            drop(gate_w);
            std::process::exit(code)
        }
        Err(e) => Err(internal(format!("fork: {e}"))),
    }
}

fn create(req: &ChildRequest, rootfs: &Path, sync: &mut UnixStream) -> R<()> {
    let spec = &req.spec;
    let linux = spec.linux().clone().unwrap_or_default();
    let mut unshare_flags = CloneFlags::empty();
    let mut join = Vec::new();
    for ns in linux.namespaces().clone().unwrap_or_default() {
        match ns.typ() {
            // The pod's network is the VM's: a container joins it.
            LinuxNamespaceType::Network => continue,
            LinuxNamespaceType::User => {
                return Err(invalid(
                    "user namespaces are not supported by kata-agent; remove the `user` namespace from linux.namespaces",
                ))
            }
            LinuxNamespaceType::Time => {
                return Err(invalid(
                    "time namespaces are not supported by kata-agent; remove the `time` namespace from linux.namespaces",
                ))
            }
            t => match ns.path() {
                Some(p) => {
                    let f = File::open(p).map_err(|e| {
                        invalid(format!("namespace {t} path {}: {e}", p.display()))
                    })?;
                    join.push((f, ns_flag(t), t));
                }
                None => unshare_flags |= ns_flag(t),
            },
        }
    }
    for (f, flag, t) in &join {
        setns(f, *flag).map_err(|e| invalid(format!("joining the {t} namespace: {e}")))?;
    }
    unshare(unshare_flags).map_err(|e| internal(format!("unshare {unshare_flags:?}: {e}")))?;
    fork_and_report(sync)?;

    // The container's first process from here on.
    new_session(&req.process)?;
    let new_mnt = unshare_flags.contains(CloneFlags::CLONE_NEWNS);
    if new_mnt {
        setup_rootfs(spec, rootfs, req.process.terminal().unwrap_or(false))?;
    } else {
        return Err(invalid(
            "a container needs its own mount namespace: add `mount` to linux.namespaces",
        ));
    }
    if unshare_flags.contains(CloneFlags::CLONE_NEWUTS) {
        if let Some(h) = spec.hostname() {
            sethostname(h).map_err(|e| invalid(format!("hostname {h:?}: {e}")))?;
        }
    }
    process_limits(&req.process)?;
    // A missing program is a create-time error, as with runc.
    check_program(&req.process)?;
    // Set up: wait for StartContainer.
    send(sync, &ChildMsg::Ready).map_err(|e| internal(format!("reporting ready: {e}")))?;
    let mut b = [0u8; 1];
    match sync.read(&mut b) {
        Ok(1) => {}
        _ => std::process::exit(1),
    }
    finish_and_exec(req)
}

fn exec(req: &ChildRequest, target: i32, sync: &mut UnixStream) -> R<()> {
    // Open every namespace first: after joining the mount namespace, /proc is
    // the container's.
    let mut fds = Vec::new();
    for (name, flag) in [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ] {
        let p = format!("/proc/{target}/ns/{name}");
        let f = File::open(&p).map_err(|e| {
            fail(
                SetupCode::FailedPrecondition,
                format!("the container's process {target} is gone ({p}: {e})"),
            )
        })?;
        fds.push((f, flag, name));
    }
    for (f, flag, name) in &fds {
        setns(f, *flag).map_err(|e| internal(format!("joining the {name} namespace: {e}")))?;
    }
    drop(fds);
    fork_and_report(sync)?;
    new_session(&req.process)?;
    process_limits(&req.process)?;
    finish_and_exec(req)
}

fn new_session(p: &Process) -> R<()> {
    nix::unistd::setsid().map_err(|e| internal(format!("setsid: {e}")))?;
    if p.terminal().unwrap_or(false) {
        // SAFETY: TIOCSCTTY on fd 0 (the terminal's secondary side) with an
        // integer argument.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
            return Err(internal(format!(
                "making the terminal the controlling terminal: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

fn process_limits(p: &Process) -> R<()> {
    for rl in p.rlimits().clone().unwrap_or_default() {
        let res = rlimit_resource(rl.typ());
        let lim = libc::rlimit {
            rlim_cur: rl.soft(),
            rlim_max: rl.hard(),
        };
        // SAFETY: setrlimit reads a valid rlimit struct.
        if unsafe { libc::setrlimit(res, &lim) } != 0 {
            return Err(invalid(format!(
                "rlimit {:?} soft {} hard {}: {}",
                rl.typ(),
                rl.soft(),
                rl.hard(),
                std::io::Error::last_os_error()
            )));
        }
    }
    if let Some(adj) = p.oom_score_adj() {
        if !(-1000..=1000).contains(&adj) {
            return Err(invalid(format!(
                "oomScoreAdj {adj} is outside -1000..=1000"
            )));
        }
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| internal(format!("oom_score_adj {adj}: {e}")))?;
    }
    Ok(())
}

fn rlimit_resource(t: PosixRlimitType) -> libc::__rlimit_resource_t {
    match t {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

fn mnt(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> nix::Result<()> {
    mount(src, dst, fstype, flags, data)
}

fn setup_rootfs(spec: &Spec, rootfs: &Path, terminal: bool) -> R<()> {
    let linux = spec.linux().clone().unwrap_or_default();
    let prop = match linux.rootfs_propagation().as_deref() {
        None | Some("") | Some("rslave") | Some("slave") => MsFlags::MS_SLAVE,
        Some("rprivate") | Some("private") => MsFlags::MS_PRIVATE,
        Some("rshared") | Some("shared") => MsFlags::MS_SHARED,
        Some("runbindable") | Some("unbindable") => MsFlags::MS_UNBINDABLE,
        Some(other) => {
            return Err(invalid(format!(
                "linux.rootfsPropagation {other:?} is not one of shared, slave, private, unbindable"
            )))
        }
    };
    mnt(None, Path::new("/"), None, MsFlags::MS_REC | prop, None)
        .map_err(|e| internal(format!("making / {prop:?}: {e}")))?;
    mnt(
        Some(rootfs),
        rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
    .map_err(|e| {
        invalid(format!(
            "bind-mounting the rootfs {}: {e}",
            rootfs.display()
        ))
    })?;

    let mut dev_is_tmpfs = false;
    for m in spec.mounts().clone().unwrap_or_default() {
        if m.destination() == Path::new("/dev") && m.typ().as_deref() == Some("tmpfs") {
            dev_is_tmpfs = true;
        }
        mount_one(rootfs, &m)?;
    }
    if dev_is_tmpfs {
        default_devices(rootfs)?;
    }
    for d in linux.devices().clone().unwrap_or_default() {
        let path = resolve_in_root(rootfs, d.path()).map_err(|e| invalid(e.to_string()))?;
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let kind = match d.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            LinuxDeviceType::A => {
                return Err(invalid(format!(
                    "device {}: type `a` is only valid in cgroup rules",
                    d.path().display()
                )))
            }
        };
        let mode = Mode::from_bits_truncate(d.file_mode().unwrap_or(0o666));
        let _ = std::fs::remove_file(&path);
        mknod(
            &path,
            kind,
            mode,
            makedev(d.major() as u64, d.minor() as u64),
        )
        .map_err(|e| invalid(format!("device {}: {e}", d.path().display())))?;
        let uid = d.uid().map(Uid::from_raw);
        let gid = d.gid().map(Gid::from_raw);
        nix::unistd::chown(&path, uid, gid)
            .map_err(|e| invalid(format!("device {}: chown: {e}", d.path().display())))?;
    }
    if terminal {
        // /dev/console is the container's terminal, as runc does.
        if let Ok(tty) = std::fs::read_link("/proc/self/fd/0") {
            let console = rootfs.join("dev/console");
            if rootfs.join("dev").is_dir() {
                let _ = File::create(&console);
                let _ = mnt(Some(&tty), &console, None, MsFlags::MS_BIND, None);
            }
        }
    }

    // pivot_root into the rootfs; from an initramfs root (which cannot be
    // pivoted away from) fall back to moving the rootfs over / and chroot.
    chdir(rootfs).map_err(|e| internal(format!("chdir {}: {e}", rootfs.display())))?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            mnt(
                None,
                Path::new("."),
                None,
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
                None,
            )
            .map_err(|e| internal(format!("making the old root a slave: {e}")))?;
            umount2(".", MntFlags::MNT_DETACH)
                .map_err(|e| internal(format!("detaching the old root: {e}")))?;
        }
        Err(nix::Error::EINVAL) => {
            mnt(
                Some(Path::new(".")),
                Path::new("/"),
                None,
                MsFlags::MS_MOVE,
                None,
            )
            .map_err(|e| internal(format!("moving the rootfs to /: {e}")))?;
            nix::unistd::chroot(".").map_err(|e| internal(format!("chroot: {e}")))?;
        }
        Err(e) => return Err(internal(format!("pivot_root: {e}"))),
    }
    chdir("/").map_err(|e| internal(format!("chdir /: {e}")))?;

    // sysctls go through the container's /proc, before /proc/sys turns read-only
    if let Some(sysctl) = linux.sysctl() {
        for (k, v) in sysctl {
            if k.contains('/') || k.split('.').any(|p| p.is_empty() || p == "..") {
                return Err(invalid(format!("sysctl {k:?} is not a sysctl name")));
            }
            let path = Path::new("/proc/sys").join(k.replace('.', "/"));
            std::fs::write(&path, v).map_err(|e| invalid(format!("sysctl {k}={v}: {e}")))?;
        }
    }
    for p in linux.masked_paths().clone().unwrap_or_default() {
        mask_path(Path::new(&p))?;
    }
    for p in linux.readonly_paths().clone().unwrap_or_default() {
        readonly_path(Path::new(&p))?;
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        mnt(
            None,
            Path::new("/"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )
        .map_err(|e| internal(format!("making the rootfs read-only: {e}")))?;
    }
    Ok(())
}

fn mount_one(rootfs: &Path, m: &Mount) -> R<()> {
    let dest_in = m.destination();
    let dest = resolve_in_root(rootfs, dest_in).map_err(|e| invalid(e.to_string()))?;
    let typ = m.typ().clone().unwrap_or_default();
    let opts = parse_options(m.options().as_deref().unwrap_or(&[]));
    let what = |e: nix::Error| {
        invalid(format!(
            "mount {typ:?} {} on {}: {e}",
            m.source()
                .as_ref()
                .map(|s| s.display().to_string())
                .unwrap_or_default(),
            dest_in.display()
        ))
    };
    if typ == "bind" || opts.bind {
        let src = m
            .source()
            .clone()
            .ok_or_else(|| invalid(format!("bind mount on {} has no source", dest_in.display())))?;
        let meta = std::fs::metadata(&src).map_err(|e| {
            invalid(format!(
                "bind mount source {} for {}: {e}",
                src.display(),
                dest_in.display()
            ))
        })?;
        make_target(&dest, meta.is_dir())?;
        let rec = opts.flags & MsFlags::MS_REC;
        mnt(Some(&src), &dest, None, MsFlags::MS_BIND | rec, None).map_err(what)?;
        let extra = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            remount_bind(&dest, extra).map_err(what)?;
        }
    } else if typ == "cgroup" || typ == "cgroup2" {
        make_target(&dest, true)?;
        if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            mnt(
                Some(Path::new("cgroup2")),
                &dest,
                Some("cgroup2"),
                opts.flags,
                None,
            )
            .map_err(what)?;
        } else {
            // cgroup v1 (host mode only: the guest is v2): the host's tree, read-only.
            mnt(
                Some(Path::new("/sys/fs/cgroup")),
                &dest,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )
            .map_err(what)?;
            remount_bind(&dest, opts.flags | MsFlags::MS_RDONLY).map_err(what)?;
        }
    } else {
        make_target(&dest, true)?;
        let src = m.source().clone().unwrap_or_else(|| PathBuf::from(&typ));
        let data = (!opts.data.is_empty()).then_some(opts.data.as_str());
        let r = mnt(Some(&src), &dest, Some(&typ), opts.flags, data);
        match (r, typ.as_str()) {
            (Ok(()), _) => {}
            // sysfs cannot be mounted by a process that shares the network
            // namespace with others in some kernels' eyes; bind the agent's.
            (Err(nix::Error::EPERM), "sysfs") => {
                mnt(
                    Some(Path::new("/sys")),
                    &dest,
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None,
                )
                .map_err(what)?;
                remount_bind(&dest, opts.flags).map_err(what)?;
            }
            (Err(e), _) => return Err(what(e)),
        }
    }
    if !opts.propagation.is_empty() {
        mnt(None, &dest, None, opts.propagation, None).map_err(what)?;
    }
    Ok(())
}

fn make_target(dest: &Path, dir: bool) -> R<()> {
    let err = |e: std::io::Error| invalid(format!("creating mount point {}: {e}", dest.display()));
    if dir {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dest)
            .map_err(err)
    } else {
        if let Some(p) = dest.parent() {
            std::fs::create_dir_all(p).map_err(err)?;
        }
        if !dest.exists() {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o644)
                .open(dest)
                .map_err(err)?;
        }
        Ok(())
    }
}

/// Applies flags to a bind mount. The kernel refuses to clear flags the
/// source mount has locked (nosuid, nodev, noexec, ...), so those are kept.
fn remount_bind(dest: &Path, flags: MsFlags) -> nix::Result<()> {
    let base = MsFlags::MS_BIND | MsFlags::MS_REMOUNT;
    match mnt(None, dest, None, base | flags, None) {
        Err(nix::Error::EPERM) => {
            let st = nix::sys::statvfs::statvfs(dest)?;
            let f = st.flags();
            let mut locked = MsFlags::empty();
            use nix::sys::statvfs::FsFlags;
            for (s, m) in [
                (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
                (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
                (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
                (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
                (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
                (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
                (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
            ] {
                if f.contains(s) {
                    locked |= m;
                }
            }
            mnt(None, dest, None, base | flags | locked, None)
        }
        r => r,
    }
}

fn default_devices(rootfs: &Path) -> R<()> {
    let dev = rootfs.join("dev");
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let p = dev.join(name);
        let made = mknod(
            &p,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        );
        if made.is_err() {
            // No mknod here: bind the agent's device node instead.
            make_target(&p, false)?;
            mnt(
                Some(&Path::new("/dev").join(name)),
                &p,
                None,
                MsFlags::MS_BIND,
                None,
            )
            .map_err(|e| internal(format!("/dev/{name}: {e}")))?;
        } else {
            // mknod obeys the umask.
            let _ = nix::sys::stat::fchmodat(
                nix::fcntl::AT_FDCWD,
                &p,
                Mode::from_bits_truncate(0o666),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            );
        }
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, dev.join(link));
    }
    if dev.join("pts/ptmx").exists() || dev.join("pts").is_dir() {
        let _ = std::fs::remove_file(dev.join("ptmx"));
        let _ = std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx"));
    }
    Ok(())
}

fn mask_path(p: &Path) -> R<()> {
    let meta = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    let r = if meta.is_dir() {
        mnt(
            Some(Path::new("tmpfs")),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            Some("size=0"),
        )
    } else {
        mnt(
            Some(Path::new("/dev/null")),
            p,
            None,
            MsFlags::MS_BIND,
            None,
        )
    };
    r.map_err(|e| invalid(format!("masking {}: {e}", p.display())))
}

fn readonly_path(p: &Path) -> R<()> {
    if std::fs::symlink_metadata(p).is_err() {
        return Ok(());
    }
    let err = |e: nix::Error| invalid(format!("making {} read-only: {e}", p.display()));
    mnt(Some(p), p, None, MsFlags::MS_BIND | MsFlags::MS_REC, None).map_err(err)?;
    remount_bind(
        p,
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    )
    .map_err(err)
}

fn cstring(s: &str, what: &str) -> R<CString> {
    CString::new(s).map_err(|_| invalid(format!("{what} {s:?} contains a NUL byte")))
}

fn lookup_path(cmd: &str, env: &[String]) -> R<PathBuf> {
    if cmd.contains('/') {
        return Ok(PathBuf::from(cmd));
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let cand = Path::new(dir).join(cmd);
        if let Ok(m) = std::fs::metadata(&cand) {
            use std::os::unix::fs::PermissionsExt;
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(cand);
            }
        }
    }
    Err(fail(
        SetupCode::NotFound,
        format!("executable file {cmd:?} not found in $PATH ({path})"),
    ))
}

/// Fails with NotFound if the process's program is not in the rootfs (an
/// absolute path that does not exist, or a name not found in its PATH).
fn check_program(p: &oci_spec::runtime::Process) -> R<()> {
    let args = p.args().clone().unwrap_or_default();
    let Some(cmd) = args.first() else {
        return Ok(());
    };
    if cmd.starts_with('/') {
        return match std::fs::metadata(cmd) {
            Ok(_) => Ok(()),
            Err(e) => Err(fail(
                SetupCode::NotFound,
                format!("executable file {cmd:?} in the container: {e}"),
            )),
        };
    }
    if cmd.contains('/') {
        // relative to the working directory, which is entered at start
        return Ok(());
    }
    lookup_path(cmd, &p.env().clone().unwrap_or_default()).map(|_| ())
}

fn home_of(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 6 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[5].to_string())
    })
}

fn to_caps(set: &Option<HashSet<oci_spec::runtime::Capability>>) -> R<Option<caps::CapsHashSet>> {
    let Some(set) = set else { return Ok(None) };
    let mut out = caps::CapsHashSet::new();
    for c in set {
        let name = serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        match caps::Capability::from_str(&name) {
            Ok(c) => {
                out.insert(c);
            }
            // A capability this kernel/crate does not know cannot be granted anyway.
            Err(_) => continue,
        }
    }
    Ok(Some(out))
}

/// Drops privileges as the process asks and executes it. Everything that
/// allocates happens before the seccomp filter is installed.
fn finish_and_exec(req: &ChildRequest) -> R<()> {
    let p = &req.process;
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(invalid("process.args is empty: give the program to run"));
    }
    let user = p.user();
    let (uid, gid) = (user.uid(), user.gid());
    let mut env = p.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!(
            "HOME={}",
            home_of(uid).unwrap_or_else(|| "/".into())
        ));
    }
    let exe = lookup_path(&args[0], &env)?;
    let c_exe = cstring(&exe.to_string_lossy(), "program")?;
    let c_args = args
        .iter()
        .map(|a| cstring(a, "argument"))
        .collect::<R<Vec<_>>>()?;
    let c_env = env
        .iter()
        .map(|e| cstring(e, "environment variable"))
        .collect::<R<Vec<_>>>()?;
    let caps_spec = p.capabilities().clone();
    let bounding = to_caps(&caps_spec.as_ref().and_then(|c| c.bounding().clone()))?;
    let effective = to_caps(&caps_spec.as_ref().and_then(|c| c.effective().clone()))?;
    let permitted = to_caps(&caps_spec.as_ref().and_then(|c| c.permitted().clone()))?;
    let inheritable = to_caps(&caps_spec.as_ref().and_then(|c| c.inheritable().clone()))?;
    let ambient = to_caps(&caps_spec.as_ref().and_then(|c| c.ambient().clone()))?;
    let nnp = p.no_new_privileges().unwrap_or(false);
    let filters = match (
        req.seccomp,
        req.spec.linux().as_ref().and_then(|l| l.seccomp().clone()),
    ) {
        (true, Some(s)) => {
            Some(seccomp::compile(&s).map_err(|e| invalid(format!("linux.seccomp: {e}")))?)
        }
        _ => None,
    };
    let cwd = p.cwd().clone();
    let groups: Vec<Gid> = user
        .additional_gids()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(Gid::from_raw)
        .collect();

    // Without no_new_privs, installing a filter needs CAP_SYS_ADMIN: do it
    // while still privileged (the profile must then allow what follows).
    if let (Some(f), false) = (&filters, nnp) {
        f.install()
            .map_err(|e| invalid(format!("installing seccomp: {e}")))?;
    }
    if let Some(b) = &bounding {
        for c in caps::all() {
            if !b.contains(&c) {
                // EINVAL: the running kernel does not know this capability.
                let _ = caps::drop(None, caps::CapSet::Bounding, c);
            }
        }
    }
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    nix::unistd::setgroups(&groups)
        .map_err(|e| invalid(format!("additional gids {groups:?}: {e}")))?;
    let g = Gid::from_raw(gid);
    nix::unistd::setresgid(g, g, g).map_err(|e| invalid(format!("gid {gid}: {e}")))?;
    let u = Uid::from_raw(uid);
    nix::unistd::setresuid(u, u, u).map_err(|e| invalid(format!("uid {uid}: {e}")))?;
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    if caps_spec.is_some() {
        let empty = caps::CapsHashSet::new();
        caps::set(
            None,
            caps::CapSet::Effective,
            effective.as_ref().unwrap_or(&empty),
        )
        .map_err(|e| invalid(format!("effective capabilities: {e}")))?;
        caps::set(
            None,
            caps::CapSet::Inheritable,
            inheritable.as_ref().unwrap_or(&empty),
        )
        .map_err(|e| invalid(format!("inheritable capabilities: {e}")))?;
        caps::set(
            None,
            caps::CapSet::Permitted,
            permitted.as_ref().unwrap_or(&empty),
        )
        .map_err(|e| invalid(format!("permitted capabilities: {e}")))?;
        let _ = caps::clear(None, caps::CapSet::Ambient);
        for c in ambient.unwrap_or_default() {
            caps::raise(None, caps::CapSet::Ambient, c)
                .map_err(|e| invalid(format!("ambient capability {c}: {e}")))?;
        }
    }
    chdir(&cwd).map_err(|e| {
        fail(
            SetupCode::FailedPrecondition,
            format!("working directory {}: {e}", cwd.display()),
        )
    })?;
    nix::sys::stat::umask(Mode::from_bits_truncate(user.umask().unwrap_or(0o022)));
    if nnp {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(internal(format!(
                "no_new_privs: {}",
                std::io::Error::last_os_error()
            )));
        }
        if let Some(f) = &filters {
            f.install()
                .map_err(|e| invalid(format!("installing seccomp: {e}")))?;
        }
    }
    let e = nix::unistd::execve(&c_exe, &c_args, &c_env).unwrap_err();
    let code = match e {
        nix::Error::ENOENT => SetupCode::NotFound,
        nix::Error::EACCES | nix::Error::EPERM => SetupCode::PermissionDenied,
        _ => SetupCode::FailedPrecondition,
    };
    Err(fail(code, format!("executing {}: {e}", exe.display())))
}

/// Makes a pipe whose ends are close-on-exec.
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

/// Grows a pipe's buffer (fewer wake-ups for bulk output); best effort.
pub fn grow_pipe(fd: &OwnedFd) {
    // 1 MiB is /proc/sys/fs/pipe-max-size's default.
    // SAFETY: fcntl(F_SETPIPE_SZ) with an integer argument on a valid fd.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
}
