//! What the agent does as PID 1 of the guest before it serves: the early mounts,
//! the kernel modules the image carries, and the final power-off (reaping is
//! [`crate::reaper`]).
//!
//! None of this runs in host mode (`--listen unix://...`), where the host's init
//! already did it.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;
use tracing::{debug, info, warn};

/// Lists the modules to load, one path per line relative to
/// `/lib/modules/<kernel release>/`, dependencies first (written by
/// `kata-ctl image build`).
pub const MODULE_LIST: &str = "/etc/kata-modules";

/// Why early set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A mount failed.
    #[error("mounting {fstype} on {target}: {source}")]
    Mount {
        /// Filesystem type.
        fstype: &'static str,
        /// Where.
        target: &'static str,
        /// Why.
        source: nix::Error,
    },
    /// A module could not be loaded.
    #[error("loading kernel module {path}: {source}")]
    Module {
        /// Which module.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

struct EarlyMount {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

const EARLY_MOUNTS: &[EarlyMount] = &[
    EarlyMount {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    EarlyMount {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    EarlyMount {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    EarlyMount {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    EarlyMount {
        fstype: "tmpfs",
        target: "/tmp",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    EarlyMount {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    EarlyMount {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    // cgroup v2 only: the guest kernel is ours, so there is no v1 legacy to keep.
    EarlyMount {
        fstype: "cgroup2",
        target: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
];

/// The guest's uptime in milliseconds (`/proc/uptime`; 0 before /proc is
/// mounted): the log's boot timeline, comparable with the kernel's own
/// timestamps.
pub fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .map_or(0, |s| (crate::guest::uptime_seconds(&s) * 1000.0) as u64)
}

/// Makes the root a bind mount of the initramfs instead of the initramfs
/// itself. The kernel refuses pivot_root away from the initramfs root, and
/// containers are set up with pivot_root; a root that is a mount with a
/// parent is fine. Nothing is copied.
pub fn leave_initramfs() -> Result<(), InitError> {
    const TMP: &str = "/.kata-root";
    let err = |target: &'static str| {
        move |source| InitError::Mount {
            fstype: "bind",
            target,
            source,
        }
    };
    let _ = nix::unistd::mkdir(TMP, Mode::from_bits_truncate(0o755));
    mount(
        Some("/"),
        TMP,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err(TMP))?;
    nix::unistd::chdir(TMP).map_err(err(TMP))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(err("/"))?;
    nix::unistd::chroot(".").map_err(err("/"))?;
    nix::unistd::chdir("/").map_err(err("/"))?;
    let _ = std::fs::remove_dir(TMP);
    Ok(())
}

/// Makes the guest's root filesystem (the agent binary, busybox, the kernel
/// modules) read-only once the modules are loaded. A container process that
/// reaches an agent binary through `/proc/<pid>/exe` (runc's CVE-2019-5736)
/// gets EROFS when it opens it for writing; the agent writes only below
/// /run, /tmp and the shared directory, which are mounts of their own.
pub fn seal_root() -> Result<(), InitError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|source| InitError::Mount {
        fstype: "bind",
        target: "/",
        source,
    })
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run, /tmp and the cgroup v2
/// hierarchy. A mount point that is already mounted (the kernel mounts devtmpfs
/// itself with `CONFIG_DEVTMPFS_MOUNT`) is left as it is.
pub fn early_mounts() -> Result<(), InitError> {
    for m in EARLY_MOUNTS {
        let _ = nix::unistd::mkdir(m.target, Mode::from_bits_truncate(0o755));
        match mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, m.data) {
            Ok(()) => debug!(target = m.target, "mounted {}", m.fstype),
            Err(nix::Error::EBUSY) => debug!(target = m.target, "already mounted"),
            Err(source) => {
                return Err(InitError::Mount {
                    fstype: m.fstype,
                    target: m.target,
                    source,
                })
            }
        }
    }
    // /dev/ptmx must point at the new devpts instance.
    let _ = std::fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    Ok(())
}

/// Loads the modules listed in [`MODULE_LIST`], in order. A module the kernel
/// already has (built in, or loaded) is fine. Returns how many were loaded.
pub fn load_modules() -> Result<usize, InitError> {
    let Ok(list) = std::fs::read_to_string(MODULE_LIST) else {
        info!("no {MODULE_LIST}: no kernel modules to load");
        return Ok(0);
    };
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = Path::new("/lib/modules").join(&release);
    let mut loaded = 0;
    for rel in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let path = base.join(rel);
        let err = |source| InitError::Module {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(&path).map_err(err)?;
        let params = CString::default();
        // SAFETY: finit_module reads the module from a valid open fd and a
        // NUL-terminated parameter string that both outlive the call.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                debug!(module = rel, "already loaded");
                continue;
            }
            return Err(err(e));
        }
        debug!(module = rel, "loaded");
        loaded += 1;
    }
    Ok(loaded)
}

/// Ends the guest: flushes the filesystems, asks every process to stop, then
/// powers the VM off (QEMU exits).
pub fn power_off() -> ! {
    info!("powering off");
    nix::unistd::sync();
    // SAFETY: kill(-1, SIGKILL) from PID 1 signals every other process; it
    // takes no pointers.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    nix::unistd::sync();
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Only reached if the kernel refused; PID 1 must never return.
    warn!(?e, "power-off failed; halting");
    loop {
        std::thread::park();
    }
}

/// Reads `agent.<key>=value` (or a bare `agent.<key>`) from the kernel command
/// line, Kata's convention for agent options.
pub fn cmdline_option(cmdline: &str, key: &str) -> Option<String> {
    let want = format!("agent.{key}");
    cmdline
        .split_whitespace()
        .find_map(|w| match w.split_once('=') {
            Some((k, v)) if k == want => Some(v.to_string()),
            None if w == want => Some(String::new()),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline() {
        let c = "console=ttyS0 agent.log=debug agent.debug_console quiet";
        assert_eq!(cmdline_option(c, "log").as_deref(), Some("debug"));
        assert_eq!(cmdline_option(c, "debug_console").as_deref(), Some(""));
        assert_eq!(cmdline_option(c, "trace"), None);
        assert_eq!(cmdline_option("xagent.log=1", "log"), None);
    }
}
