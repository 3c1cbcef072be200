//! Helpers of the tests of host cgroups and live resizes: where a pod's
//! processes and threads are, the limits of a cgroup, what the guest shows.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::containerd::Containerd;
use crate::shim::pod_processes;

/// The cgroup of `pid`'s thread `tid` in the hierarchy holding `controller`
/// (v1), or the unified one.
pub fn cgroup_of(pid: u32, tid: u32, controller: &str) -> String {
    try_cgroup_of(pid, tid, controller).unwrap_or_else(|e| panic!("cgroup of {pid}/{tid}: {e}"))
}

/// [`cgroup_of`], or why /proc could not tell (the thread ended).
fn try_cgroup_of(pid: u32, tid: u32, controller: &str) -> std::io::Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup"))?;
    let mut unified = None;
    for l in text.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        if ctrls.split(',').any(|c| c == controller) {
            return Ok(path.to_string());
        }
        if ctrls.is_empty() {
            unified = Some(path.to_string());
        }
    }
    Ok(unified.unwrap_or_default())
}

/// The directory of cgroup `rel` for `controller`: v1's hierarchy of it if
/// the host has one, else the v2 tree.
pub fn cgroup_dir(controller: &str, rel: &str) -> PathBuf {
    let v1 = Path::new("/sys/fs/cgroup").join(controller);
    let root = if v1.is_dir() {
        v1
    } else {
        PathBuf::from("/sys/fs/cgroup")
    };
    root.join(rel.trim_start_matches('/'))
}

/// A cgroup file's value, trimmed.
pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

/// The sandbox cgroup's CPU quota (µs per 100 ms; -1: none) and memory
/// limit (bytes; None: none).
pub fn limits(rel: &str) -> (i64, Option<u64>) {
    let cpu = cgroup_dir("cpu", rel);
    let quota = if cpu.join("cpu.cfs_quota_us").exists() {
        read(&cpu.join("cpu.cfs_quota_us")).parse().unwrap()
    } else {
        match read(&cpu.join("cpu.max")).split_whitespace().next() {
            Some("max") => -1,
            Some(q) => q.parse().unwrap(),
            None => panic!("cpu.max"),
        }
    };
    let mem = cgroup_dir("memory", rel);
    let limit = if mem.join("memory.limit_in_bytes").exists() {
        let v: u64 = read(&mem.join("memory.limit_in_bytes")).parse().unwrap();
        (v < 1 << 62).then_some(v)
    } else {
        read(&mem.join("memory.max")).parse().ok()
    };
    (quota, limit)
}

/// The threads of `pid`: tid and name.
pub fn tids(pid: u32) -> Vec<(u32, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("QEMU's threads")
        .flatten()
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            Some((tid, comm.trim().to_string()))
        })
        .collect()
}

/// QEMU's vCPU threads (named `CPU <n>/<accel>`).
pub fn vcpu_tids(pid: u32) -> Vec<u32> {
    tids(pid)
        .into_iter()
        .filter(|(_, c)| c.starts_with("CPU "))
        .map(|(t, _)| t)
        .collect()
}

/// The shim of pod `id`.
pub fn shim_pid(id: &str) -> u32 {
    pod_processes(id)
        .into_iter()
        .find(|(_, cmd)| cmd.contains("containerd-shim-kata-v2"))
        .unwrap_or_else(|| panic!("no shim for {id}: {:?}", pod_processes(id)))
        .0
}

/// `sh -c script` in container `id` (exec ids `e<n>`, `n` counting up).
pub fn exec(c: &Containerd, id: &str, n: &mut u32, script: &str) -> String {
    *n += 1;
    c.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        &format!("e{n}"),
        id,
        "sh",
        "-c",
        script,
    ])
}

/// The guest's CPUs as a container sees them: `nproc` and the online list.
pub fn cpus(c: &Containerd, id: &str, n: &mut u32) -> (u32, String) {
    let out = exec(c, id, n, "nproc; cat /sys/devices/system/cpu/online");
    let mut l = out.lines();
    (
        l.next().unwrap_or("").trim().parse().unwrap_or(0),
        l.next().unwrap_or("").trim().to_string(),
    )
}

/// The guest's MemTotal as container `id` sees it, MiB.
pub fn mem_total_mib(c: &Containerd, id: &str, n: &mut u32) -> u64 {
    let out = exec(c, id, n, "grep MemTotal /proc/meminfo");
    out.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

/// Polls (up to 5 s) until the container sees `want` CPUs.
pub fn wait_cpus(c: &Containerd, id: &str, n: &mut u32, want: (u32, &str)) {
    let t0 = Instant::now();
    loop {
        let got = cpus(c, id, n);
        if got.0 == want.0 && got.1 == want.1 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the guest shows {got:?}, {want:?} wanted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// OCI LinuxResources of `cpus` CPUs (a 100 ms period) and `memory_mib` MiB.
pub fn resources(cpus: i64, memory_mib: i64) -> serde_json::Value {
    json!({
        "cpu": { "quota": cpus * 100_000, "period": 100_000 },
        "memory": { "limit": memory_mib << 20 }
    })
}

/// QEMU of pod `id`, by its `-name sandbox-<id>`: its pid here even when it
/// runs in another PID namespace (the launcher's state has that one's).
pub fn qemu_of(id: &str) -> Option<u32> {
    let needle = format!("\0sandbox-{id},");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmd)
            .contains(&needle)
            .then_some(pid)
    })
}

/// Asserts that every process of pod `id` but `except` is in cgroup `want`
/// (of `controller`'s hierarchy). A process that ends meanwhile (the shim's
/// `start` process, a helper's launcher-side fork) does not count.
pub fn assert_pod_processes_in(id: &str, controller: &str, want: &str, except: u32) {
    let misplaced = || -> Vec<(u32, String, String)> {
        pod_processes(id)
            .into_iter()
            .filter(|(pid, _)| *pid != except)
            // (a process that ended: no cgroup, and not alive below)
            .map(|(pid, cmd)| {
                (
                    pid,
                    cmd,
                    try_cgroup_of(pid, pid, controller).unwrap_or_default(),
                )
            })
            .filter(|(pid, _, cg)| cg != want && crate::alive(*pid))
            .collect()
    };
    let first = misplaced();
    if first.is_empty() {
        return;
    }
    std::thread::sleep(Duration::from_millis(500));
    let left = misplaced();
    assert!(left.is_empty(), "not in {want}: {left:?}");
}
