//! Facts about the machine the agent runs on, for `GetGuestDetails`.

use std::io;

/// What `GetGuestDetails` reports about the kernel and the machine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Details {
    /// `uname -r`
    pub kernel_release: String,
    /// `uname -v`
    pub kernel_version: String,
    /// MemTotal
    pub mem_total_bytes: u64,
    /// MemAvailable
    pub mem_available_bytes: u64,
    /// Online CPUs.
    pub online_vcpus: u32,
    /// Seconds since boot.
    pub uptime_seconds: f64,
}

/// Reads the details from uname, /proc/meminfo, /proc/uptime and sysconf.
pub fn details() -> io::Result<Details> {
    let u = nix::sys::utsname::uname().map_err(io::Error::from)?;
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let uptime = std::fs::read_to_string("/proc/uptime")?;
    // SAFETY: sysconf takes no pointers.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    Ok(Details {
        kernel_release: u.release().to_string_lossy().into_owned(),
        kernel_version: u.version().to_string_lossy().into_owned(),
        mem_total_bytes: meminfo_kib(&meminfo, "MemTotal").unwrap_or(0) * 1024,
        mem_available_bytes: meminfo_kib(&meminfo, "MemAvailable").unwrap_or(0) * 1024,
        online_vcpus: u32::try_from(cpus).unwrap_or(0),
        uptime_seconds: uptime_seconds(&uptime),
    })
}

/// The seconds since boot in the text of `/proc/uptime` (0 if unreadable).
pub fn uptime_seconds(proc_uptime: &str) -> f64 {
    proc_uptime
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

/// The memory hot-plug block size, 0 when the kernel does not say.
pub fn mem_block_size() -> u64 {
    std::fs::read_to_string("/sys/devices/system/memory/block_size_bytes")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0)
}

/// What [`online_cpu_mem`] brought online.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Onlined {
    /// CPUs online afterwards.
    pub cpus_online: u32,
    /// Memory blocks onlined by this call.
    pub memory_blocks: u32,
}

/// Why [`online_cpu_mem`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OnlineError {
    /// Writing a sysfs file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The hot-plugged CPUs did not all appear in time.
    #[error("{online} CPUs online after {waited:?}, {wanted} wanted (the hot-plugged ones did not appear)")]
    Timeout {
        /// CPUs online.
        online: u32,
        /// CPUs asked for.
        wanted: u32,
        /// How long it waited.
        waited: std::time::Duration,
    },
    /// The hot-plugged memory blocks did not all appear in time.
    #[error("{present} offline memory blocks after {waited:?}, {wanted} hot-plugged")]
    MemoryTimeout {
        /// Offline blocks present.
        present: u32,
        /// Blocks hot-plugged.
        wanted: u32,
        /// How long it waited.
        waited: std::time::Duration,
    },
}

/// Brings hot-plugged CPUs and memory online (Kata's OnlineCPUMem), under
/// the sysfs root `sys` (`/sys`):
///
/// * CPUs: offline ones (`cpuN/online` = 0) are onlined until `cpus` are
///   online, waiting up to `wait` for hot-plugged ones to appear (ACPI
///   delivers them after QEMU's device_add returns). With more than `cpus`
///   online, the highest-numbered go offline, so that their vCPUs can be
///   unplugged next.
/// * memory, unless `cpu_only`: once `memory_blocks` offline blocks are
///   present (waiting up to `wait` for the hot-plugged ones), every offline
///   block (`memoryN/state`).
pub fn online_cpu_mem(
    sys: &std::path::Path,
    cpus: u32,
    cpu_only: bool,
    memory_blocks: u32,
    wait: std::time::Duration,
) -> Result<Onlined, OnlineError> {
    let t0 = std::time::Instant::now();
    let io = |path: &std::path::Path| {
        let path = path.display().to_string();
        move |source| OnlineError::Io { path, source }
    };
    let cpu_dir = sys.join("devices/system/cpu");
    let online = loop {
        let mut online = 0u32;
        let mut offline = vec![];
        let mut can_go = vec![];
        for (_, dir) in numbered(&cpu_dir, "cpu") {
            match std::fs::read_to_string(dir.join("online")) {
                // cpu0 has no `online` file: it cannot go offline
                Err(e) if e.kind() == io::ErrorKind::NotFound => online += 1,
                Err(e) => return Err(io(&dir.join("online"))(e)),
                Ok(v) if v.trim() == "1" => {
                    online += 1;
                    can_go.push(dir);
                }
                Ok(_) => offline.push(dir),
            }
        }
        // more online than wanted: the highest go offline (before their
        // vCPUs are unplugged, which the guest then ejects at once)
        while online > cpus.max(1) {
            let Some(dir) = can_go.pop() else {
                break;
            };
            let f = dir.join("online");
            std::fs::write(&f, "0").map_err(io(&f))?;
            online -= 1;
        }
        for dir in offline {
            if online >= cpus {
                break;
            }
            let f = dir.join("online");
            std::fs::write(&f, "1").map_err(io(&f))?;
            online += 1;
        }
        if online >= cpus {
            break online;
        }
        if t0.elapsed() >= wait {
            return Err(OnlineError::Timeout {
                online,
                wanted: cpus,
                waited: t0.elapsed(),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut onlined = 0;
    if !cpu_only {
        let offline = || {
            numbered(&sys.join("devices/system/memory"), "memory")
                .into_iter()
                .map(|(_, dir)| dir.join("state"))
                .filter(|f| std::fs::read_to_string(f).is_ok_and(|s| s.trim() == "offline"))
                .collect::<Vec<_>>()
        };
        let mut blocks = offline();
        while (blocks.len() as u32) < memory_blocks {
            if t0.elapsed() >= wait {
                return Err(OnlineError::MemoryTimeout {
                    present: blocks.len() as u32,
                    wanted: memory_blocks,
                    waited: t0.elapsed(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            blocks = offline();
        }
        for f in blocks {
            std::fs::write(&f, "online").map_err(io(&f))?;
            onlined += 1;
        }
    }
    Ok(Onlined {
        cpus_online: online,
        memory_blocks: onlined,
    })
}

/// The `<prefix>N` entries of `dir`, by N.
fn numbered(dir: &std::path::Path, prefix: &str) -> Vec<(u32, std::path::PathBuf)> {
    let mut v: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.strip_prefix(prefix)?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// A `Key:   123 kB` line of /proc/meminfo, in KiB.
fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.split_whitespace().next()?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    fn fake_sys(cpus: &[Option<&str>], mem: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (i, c) in cpus.iter().enumerate() {
            let dir = d.path().join(format!("devices/system/cpu/cpu{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            if let Some(v) = c {
                std::fs::write(dir.join("online"), v).unwrap();
            }
        }
        std::fs::create_dir_all(d.path().join("devices/system/cpu/cpufreq")).unwrap();
        for (i, m) in mem.iter().enumerate() {
            let dir = d.path().join(format!("devices/system/memory/memory{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("state"), m).unwrap();
        }
        d
    }

    fn read(d: &tempfile::TempDir, f: &str) -> String {
        std::fs::read_to_string(d.path().join(f)).unwrap()
    }

    #[test]
    fn hot_plugged_cpus_and_memory_are_onlined() {
        let d = fake_sys(
            &[None, Some("1\n"), Some("0\n"), Some("0\n")],
            &["online\n", "offline\n", "offline\n"],
        );
        let wait = std::time::Duration::ZERO;
        let got = online_cpu_mem(d.path(), 3, false, 2, wait).unwrap();
        assert_eq!(
            got,
            Onlined {
                cpus_online: 3,
                memory_blocks: 2
            }
        );
        assert_eq!(read(&d, "devices/system/cpu/cpu2/online"), "1");
        assert_eq!(
            read(&d, "devices/system/cpu/cpu3/online"),
            "0\n",
            "beyond the target"
        );
        assert_eq!(read(&d, "devices/system/memory/memory2/state"), "online");
        let d = fake_sys(&[None, Some("1"), Some("1"), Some("1")], &[]);
        let got = online_cpu_mem(d.path(), 2, true, 0, wait).unwrap();
        assert_eq!(got.cpus_online, 2);
        assert_eq!(read(&d, "devices/system/cpu/cpu3/online"), "0");
        assert_eq!(read(&d, "devices/system/cpu/cpu2/online"), "0");
        assert_eq!(read(&d, "devices/system/cpu/cpu1/online"), "1");
        let cpu_only = fake_sys(&[None, Some("0")], &["offline"]);
        let got = online_cpu_mem(cpu_only.path(), 2, true, 0, wait).unwrap();
        assert_eq!(got.memory_blocks, 0);
        assert_eq!(
            read(&cpu_only, "devices/system/memory/memory0/state"),
            "offline"
        );
    }

    #[test]
    fn cpus_that_never_appear_are_a_timeout() {
        let d = fake_sys(&[None, Some("0")], &[]);
        let e =
            online_cpu_mem(d.path(), 4, true, 0, std::time::Duration::from_millis(50)).unwrap_err();
        assert!(
            matches!(
                e,
                OnlineError::Timeout {
                    online: 2,
                    wanted: 4,
                    ..
                }
            ),
            "{e}"
        );
        let d = fake_sys(&[None], &["online", "offline"]);
        let e = online_cpu_mem(d.path(), 1, false, 3, std::time::Duration::from_millis(50))
            .unwrap_err();
        assert!(
            matches!(
                e,
                OnlineError::MemoryTimeout {
                    present: 1,
                    wanted: 3,
                    ..
                }
            ),
            "{e}"
        );
    }

    use super::*;

    #[test]
    fn meminfo() {
        let m = "MemTotal:         501448 kB\nMemFree:  1 kB\nMemAvailable:     450000 kB\n";
        assert_eq!(meminfo_kib(m, "MemTotal"), Some(501448));
        assert_eq!(meminfo_kib(m, "MemAvailable"), Some(450000));
        assert_eq!(meminfo_kib(m, "Mem"), None);
    }

    #[test]
    fn reads_this_machine() {
        let d = details().unwrap();
        assert!(!d.kernel_release.is_empty());
        assert!(d.mem_total_bytes > 0 && d.online_vcpus > 0);
    }
}
