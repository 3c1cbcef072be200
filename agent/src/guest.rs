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
        uptime_seconds: uptime
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0),
    })
}

/// The memory hot-plug block size, 0 when the kernel does not say.
pub fn mem_block_size() -> u64 {
    std::fs::read_to_string("/sys/devices/system/memory/block_size_bytes")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0)
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
