//! The hypervisor's jail, in the spirit of Firecracker's jailer.
//!
//! Everything is prepared in the launcher ([`Jail::prepare`]: paths as C
//! strings, file descriptors of the network namespace and the cgroups, the
//! seccomp program), so the child between `fork` and `exec` ([`Jail::enter`])
//! only makes system calls and never allocates. In order, the child:
//!
//! 1. starts a session of its own;
//! 2. joins the pod's network namespace and moves itself into the VM's cgroups;
//! 3. enters a mount namespace of its own and builds a root on a small tmpfs
//!    holding only: `/usr` (read-only: QEMU, its libraries and firmware),
//!    `/etc/ld.so.cache`, the kernel and initrd at `/boot` (read-only), the
//!    sandbox's `vm/` directory at `/vm` (sockets), and `/dev/{null,zero,random,urandom}`
//!    (+ `/dev/kvm` with KVM); then `pivot_root`s into it and makes it read-only;
//! 4. drops every capability from the bounding set, becomes an unprivileged
//!    uid/gid of its own (so the permitted and effective sets are emptied), clears
//!    the ambient set, asks for SIGKILL when the launcher dies (`PR_SET_PDEATHSIG`,
//!    after the uid change, which would clear it), sets `no_new_privs`;
//! 5. installs a seccomp filter that denies the system calls a VMM never needs
//!    (mount, module loading, kexec, ptrace, bpf, keyrings, namespaces,
//!    io_uring, `clone` with a `CLONE_NEW*` flag, ...) and makes `clone3`
//!    fail with ENOSYS (its flags are out of a filter's reach; glibc then
//!    falls back to `clone`), and QEMU adds its own (`-sandbox on`).
//!
//! The jail's mounts live only in the child's mount namespace: when QEMU exits,
//! they are gone, nothing to unmount on the host.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Why the jail could not be prepared.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JailError {
    /// A file the jail needs could not be opened.
    #[error("jail: {what} {path}: {source}")]
    Open {
        /// What it is.
        what: &'static str,
        /// Which file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The seccomp program could not be built.
    #[error("jail: seccomp filter: {0}")]
    Seccomp(String),
}

/// What goes into the jail.
#[derive(Debug, Clone)]
pub(crate) struct JailSpec {
    /// Empty directory on the host used as the mount point of the jail's root.
    pub(crate) root: PathBuf,
    /// The sandbox's vm/ directory (bind-mounted read-write at /vm).
    pub(crate) vm_dir: PathBuf,
    /// Guest kernel (read-only at /boot/vmlinuz).
    pub(crate) kernel: PathBuf,
    /// Guest initrd (read-only at /boot/initrd.img).
    pub(crate) initrd: PathBuf,
    /// Network namespace to join.
    pub(crate) netns: Option<PathBuf>,
    /// `cgroup.procs` files to write the child into.
    pub(crate) cgroup_procs: Vec<PathBuf>,
    /// uid and gid of the hypervisor.
    pub(crate) uid: u32,
    /// Expose /dev/kvm (and add its group).
    pub(crate) kvm: bool,
}

/// A directory to create or a bind mount to make inside the new root.
#[derive(Debug)]
enum Step {
    Dir(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    Bind {
        src: CString,
        dst: CString,
        file: bool,
        readonly: bool,
    },
}

/// A prepared jail; [`Jail::enter`] runs in the child.
#[derive(Debug)]
pub(crate) struct Jail {
    root: CString,
    steps: Vec<Step>,
    netns: Option<OwnedFd>,
    cgroup_procs: Vec<File>,
    uid: u32,
    groups: Vec<libc::gid_t>,
    seccomp: Vec<BpfProgram>,
    /// Files the hypervisor inherits at their own fd numbers (the taps).
    inherit: Vec<File>,
}

fn cstr(p: &Path) -> CString {
    // Paths from the OS never hold NUL bytes.
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// The system calls the launcher's filter denies with EPERM.
pub(crate) const DENIED_SYSCALLS: &[i64] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_fsconfig,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_pidfd_getfd,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_lookup_dcookie,
    libc::SYS_userfaultfd,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_personality,
    libc::SYS_uselib,
    libc::SYS_vhangup,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// `clone` flags that create namespaces; `clone` with any of them is denied
/// with EPERM (`CLONE_NEWTIME` is only valid for `unshare` and `clone3`,
/// both denied as a whole).
pub(crate) const CLONE_NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
];

/// The launcher's seccomp programs for the hypervisor, to install in this
/// order: (1) the deny list and `clone` with a namespace flag, EPERM;
/// (2) `clone3`, ENOSYS, so glibc falls back to `clone`, whose flags (1)
/// can check.
pub(crate) fn seccomp_programs() -> Result<Vec<BpfProgram>, JailError> {
    let err = |e: seccompiler::BackendError| JailError::Seccomp(e.to_string());
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        DENIED_SYSCALLS.iter().map(|s| (*s, vec![])).collect();
    // x86_64 clone(flags, stack, parent_tid, child_tid, tls): flags is arg 0;
    // one rule per flag, rules of a system call match if any does
    let clone_rules = CLONE_NAMESPACE_FLAGS
        .iter()
        .map(|&f| {
            let f = f as u32 as u64;
            let c = seccompiler::SeccompCondition::new(
                0,
                seccompiler::SeccompCmpArgLen::Qword,
                seccompiler::SeccompCmpOp::MaskedEq(f),
                f,
            )?;
            seccompiler::SeccompRule::new(vec![c])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    rules.insert(libc::SYS_clone, clone_rules);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(err)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(err)?;
    [deny, clone3]
        .into_iter()
        .map(|f| BpfProgram::try_from(f).map_err(err))
        .collect()
}

/// Installs [`seccomp_programs`] on the calling thread (no allocation: the
/// programs were built before).
pub(crate) fn apply_seccomp(programs: &[BpfProgram]) -> io::Result<()> {
    for p in programs {
        seccompiler::apply_filter(p).map_err(|e| io::Error::other(e.to_string()))?;
    }
    Ok(())
}

impl Jail {
    /// Opens and computes everything the child needs.
    pub(crate) fn prepare(spec: &JailSpec) -> Result<Jail, JailError> {
        let open = |what, path: &Path, write: bool| {
            std::fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .open(path)
                .map_err(|source| JailError::Open {
                    what,
                    path: path.into(),
                    source,
                })
        };
        // fail early, with the launcher's view of the path, if an input is missing
        open("guest kernel", &spec.kernel, false)?;
        open("guest initrd", &spec.initrd, false)?;
        let netns = match &spec.netns {
            Some(p) => Some(OwnedFd::from(open("network namespace", p, false)?)),
            None => None,
        };
        let cgroup_procs = spec
            .cgroup_procs
            .iter()
            .map(|p| open("cgroup", p, true))
            .collect::<Result<Vec<_>, _>>()?;
        let r = |rel: &str| cstr(&spec.root.join(rel));
        let mut steps = vec![];
        for d in ["usr", "etc", "boot", "vm", "dev", "tmp"] {
            steps.push(Step::Dir(r(d)));
        }
        steps.push(Step::Bind {
            src: cstr(Path::new("/usr")),
            dst: r("usr"),
            file: false,
            readonly: true,
        });
        // merged-/usr hosts (Debian 12): /lib, /lib64, /bin are symlinks into /usr
        for top in ["lib", "lib64", "bin", "sbin"] {
            let host = Path::new("/").join(top);
            match std::fs::read_link(&host) {
                Ok(target) => steps.push(Step::Symlink {
                    target: cstr(&target),
                    link: r(top),
                }),
                Err(_) if host.is_dir() => {
                    steps.push(Step::Dir(r(top)));
                    steps.push(Step::Bind {
                        src: cstr(&host),
                        dst: r(top),
                        file: false,
                        readonly: true,
                    });
                }
                Err(_) => {}
            }
        }
        if Path::new("/etc/ld.so.cache").exists() {
            steps.push(Step::Bind {
                src: cstr(Path::new("/etc/ld.so.cache")),
                dst: r("etc/ld.so.cache"),
                file: true,
                readonly: true,
            });
        }
        steps.push(Step::Bind {
            src: cstr(&spec.kernel),
            dst: r("boot/vmlinuz"),
            file: true,
            readonly: true,
        });
        steps.push(Step::Bind {
            src: cstr(&spec.initrd),
            dst: r("boot/initrd.img"),
            file: true,
            readonly: true,
        });
        steps.push(Step::Bind {
            src: cstr(&spec.vm_dir),
            dst: r("vm"),
            file: false,
            readonly: false,
        });
        let mut devs = vec!["null", "zero", "random", "urandom"];
        let mut groups = vec![];
        if spec.kvm {
            devs.push("kvm");
            if let Ok(m) = std::fs::metadata("/dev/kvm") {
                groups.push(std::os::unix::fs::MetadataExt::gid(&m));
            }
        }
        for d in devs {
            steps.push(Step::Bind {
                src: cstr(&Path::new("/dev").join(d)),
                dst: r(&format!("dev/{d}")),
                file: true,
                readonly: false,
            });
        }
        Ok(Jail {
            root: cstr(&spec.root),
            steps,
            netns,
            cgroup_procs,
            uid: spec.uid,
            groups,
            seccomp: seccomp_programs()?,
            inherit: vec![],
        })
    }

    /// Hands `files` to the hypervisor, open at their current fd numbers.
    pub(crate) fn inherit(&mut self, files: Vec<File>) {
        self.inherit = files;
    }

    /// Runs in the child between fork and exec: only system calls, no
    /// allocation. Any failure aborts the spawn with that error.
    pub(crate) fn enter(&self) -> io::Result<()> {
        fn check(rc: libc::c_int) -> io::Result<()> {
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: (whole block) plain system calls on NUL-terminated strings and
        // file descriptors this struct owns; nothing is allocated or freed.
        unsafe {
            // the jail's directories get the modes written below, whatever
            // the launcher's umask; QEMU itself runs with a private one
            libc::umask(0o022);
            check(libc::setsid())?;
            // the taps: kept open across exec at the numbers QEMU is given
            for f in &self.inherit {
                check(libc::fcntl(f.as_raw_fd(), libc::F_SETFD, 0))?;
            }
            if let Some(ns) = &self.netns {
                check(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET))?;
            }
            for f in &self.cgroup_procs {
                let n = libc::write(f.as_raw_fd(), b"0\n".as_ptr().cast(), 2);
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID,
                c"mode=0755,size=1m".as_ptr().cast(),
            ))?;
            for s in &self.steps {
                match s {
                    Step::Dir(p) => check(libc::mkdir(p.as_ptr(), 0o755))?,
                    Step::Symlink { target, link } => {
                        check(libc::symlink(target.as_ptr(), link.as_ptr()))?
                    }
                    Step::Bind {
                        src,
                        dst,
                        file,
                        readonly,
                    } => {
                        if *file {
                            let fd = libc::open(
                                dst.as_ptr(),
                                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                                0o600,
                            );
                            check(fd)?;
                            libc::close(fd);
                        }
                        check(libc::mount(
                            src.as_ptr(),
                            dst.as_ptr(),
                            null,
                            libc::MS_BIND | libc::MS_REC,
                            std::ptr::null(),
                        ))?;
                        if *readonly {
                            check(libc::mount(
                                null,
                                dst.as_ptr(),
                                null,
                                libc::MS_BIND
                                    | libc::MS_REMOUNT
                                    | libc::MS_RDONLY
                                    | libc::MS_NOSUID,
                                std::ptr::null(),
                            ))?;
                        }
                    }
                }
            }
            check(libc::chdir(self.root.as_ptr()))?;
            check(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            )?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(c"/".as_ptr()))?;
            check(libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                std::ptr::null(),
            ))?;
            // capabilities: bounding set first (needs CAP_SETPCAP), then the ids
            for cap in 0..=63 {
                let rc = libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
                if rc < 0 && *libc::__errno_location() != libc::EINVAL {
                    return Err(io::Error::last_os_error());
                }
            }
            check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
            check(libc::setresgid(self.uid, self.uid, self.uid))?;
            check(libc::setresuid(self.uid, self.uid, self.uid))?;
            check(libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ))?;
            // after the uid change, which clears it
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            libc::umask(0o077);
        }
        apply_seccomp(&self.seccomp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a process under the hypervisor's seccomp filters gets back from
    /// `nr(args)`: the return value and errno, run in a forked child.
    fn under_filter(programs: &[BpfProgram], calls: &[(i64, [u64; 5])]) -> Vec<(i64, i32)> {
        let (r, w) = nix::unistd::pipe().unwrap();
        // SAFETY: the child only makes system calls (no allocation, no locks:
        // the programs were built before the fork) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: (whole block) system calls on memory owned by this frame.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                for p in programs {
                    let prog = libc::sock_fprog {
                        len: p.len() as u16,
                        filter: p.as_ptr() as *mut libc::sock_filter,
                    };
                    if libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER,
                        &prog as *const libc::sock_fprog,
                    ) != 0
                    {
                        libc::_exit(2);
                    }
                }
                for (nr, a) in calls {
                    let rc = libc::syscall(*nr, a[0], a[1], a[2], a[3], a[4]);
                    let errno = if rc < 0 { *libc::__errno_location() } else { 0 };
                    if rc == 0 && (*nr == libc::SYS_clone || *nr == libc::SYS_clone3) {
                        // a child of an allowed plain clone leaves at once
                        libc::_exit(0);
                    }
                    let out: [i64; 2] = [rc, i64::from(errno)];
                    libc::write(w.as_raw_fd(), out.as_ptr().cast(), 16);
                }
                libc::_exit(0);
            }
        }
        drop(w);
        let mut f = File::from(r);
        let mut bytes = vec![];
        std::io::Read::read_to_end(&mut f, &mut bytes).unwrap();
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status}"
        );
        bytes
            .chunks(16)
            .map(|c| {
                let rc = i64::from_ne_bytes(c[..8].try_into().unwrap());
                let e = i64::from_ne_bytes(c[8..].try_into().unwrap());
                (rc, e as i32)
            })
            .collect()
    }

    #[test]
    fn seccomp_denies_io_uring_namespaces_and_clone3() {
        let sigchld = libc::SIGCHLD as u64;
        let mut params = [0u8; 120]; // struct io_uring_params
        let mut clone3_args = [0u64; 11]; // struct clone_args
        clone3_args[4] = sigchld; // exit_signal
        let calls = [
            (
                libc::SYS_io_uring_setup,
                [1, params.as_mut_ptr() as u64, 0, 0, 0],
            ),
            (libc::SYS_io_uring_enter, [0, 0, 0, 0, 0]),
            (libc::SYS_io_uring_register, [0, 0, 0, 0, 0]),
            (
                libc::SYS_clone,
                [libc::CLONE_NEWUSER as u64 | sigchld, 0, 0, 0, 0],
            ),
            (
                libc::SYS_clone,
                [libc::CLONE_NEWNET as u64 | sigchld, 0, 0, 0, 0],
            ),
            (
                libc::SYS_clone3,
                [clone3_args.as_mut_ptr() as u64, 88, 0, 0, 0],
            ),
            (libc::SYS_unshare, [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0]),
            (libc::SYS_setns, [0, 0, 0, 0, 0]),
            (libc::SYS_getpid, [0; 5]),
            // an ordinary fork-like clone is still allowed (threads and
            // glibc's fallback from clone3 need it)
            (libc::SYS_clone, [sigchld, 0, 0, 0, 0]),
        ];
        // without the filter none of these fails with EPERM or ENOSYS (as
        // root the namespaces are created; the children leave at once)
        if nix::unistd::geteuid().is_root() {
            let free = under_filter(&[], &calls[..7]);
            assert!(free[0].0 >= 0, "io_uring_setup works here: {free:?}");
            assert!(
                free[1..]
                    .iter()
                    .all(|&(_, e)| e != libc::EPERM && e != libc::ENOSYS),
                "{free:?}"
            );
        }
        let got = under_filter(&seccomp_programs().unwrap(), &calls);
        let eperm = (-1, libc::EPERM);
        assert_eq!(got[..5], [eperm; 5], "{got:?}");
        assert_eq!(got[5], (-1, libc::ENOSYS), "clone3: {got:?}");
        assert_eq!(got[6..8], [eperm; 2], "unshare, setns: {got:?}");
        assert!(got[8].0 > 0, "getpid: {got:?}");
        assert!(got[9].0 > 0, "plain clone returns the child's pid: {got:?}");
    }

    #[test]
    fn seccomp_programs_build() {
        let p = seccomp_programs().unwrap();
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn missing_inputs_are_named() {
        let d = tempfile::tempdir().unwrap();
        let spec = JailSpec {
            root: d.path().join("root"),
            vm_dir: d.path().into(),
            kernel: d.path().join("no-kernel"),
            initrd: d.path().join("no-initrd"),
            netns: None,
            cgroup_procs: vec![],
            uid: 1,
            kvm: false,
        };
        let e = Jail::prepare(&spec).unwrap_err().to_string();
        assert!(e.contains("guest kernel") && e.contains("no-kernel"), "{e}");
    }
}
