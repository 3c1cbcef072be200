//! The pod's cgroups on the host, as Kata's runtime-rs places them.
//!
//! * The **sandbox cgroup** is what the sandbox container's
//!   `linux.cgroupsPath` names (containerd and the kubelet set it; `kata_<id>`
//!   when it names none): `slice:prefix:name` is a systemd scope made over
//!   D-Bus (`SystemdManager`), a path is a cgroupfs directory below each
//!   hierarchy's root (`FsManager`). Both come from `cgroups-rs`.
//! * What goes there: with cgroup v1 and cgroupfs only QEMU's vCPU threads
//!   (found by their names, `CPU <n>/TCG` or `CPU <n>/KVM`: QEMU runs with
//!   `debug-threads=on`, in a PID namespace of its own, so QMP's thread ids
//!   are not the host's); in the three other combinations the whole QEMU
//!   process (systemd places processes, not threads; cgroup v2's threaded
//!   mode would make the pod's cgroup unable to hold the controllers the
//!   kubelet sets).
//! * With `sandbox_cgroup_only = true` the shim moves itself into the
//!   sandbox cgroup before it starts anything, so every process of the pod
//!   (launcher, kata-virtiofsd, kata-netmon, QEMU) starts there. With
//!   `false` it moves itself into the **overhead cgroup** (`kata_overhead/<id>`,
//!   or the scope `kata-rs-<id>.scope` in `kata_overhead.slice` with
//!   systemd), and only QEMU (or its vCPUs) goes to the sandbox cgroup.
//! * Limits: the sandbox cgroup's CPU quota is the sum of the containers'
//!   quotas plus `sandbox_cgroup_overhead_millicpus`, its memory limit the
//!   VM's memory plus `sandbox_cgroup_overhead_mib` (QEMU's own). A resource
//!   no container limits stays unlimited. They follow every resize.
//! * Teardown: the shim moves itself to the root cgroup (a systemd scope
//!   being stopped SIGTERMs what is in it), then both are removed. A dead
//!   shim's cleanup (`shim delete`) removes them from what it recorded.
//!
//! Every call here blocks (cgroupfs writes, D-Bus calls): async code runs
//! them on the blocking pool.

use std::path::Path;

use cgroups_05::manager::{FsManager, Manager, SystemdManager};
use cgroups_05::CgroupPid;
use kata_proto::cgroups::CgroupPath;
use kata_proto::config::Workload;
use oci_spec::runtime::{LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResources};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// The CPU period the sandbox cgroup's quota is given in (µs).
const PERIOD_US: u64 = 100_000;

/// Why a host cgroup operation failed.
#[derive(Debug, thiserror::Error)]
#[error("host cgroup {path}: {what}: {why}")]
pub struct CgroupError {
    /// The cgroup (its path or systemd name).
    pub path: String,
    /// What was being done.
    pub what: &'static str,
    /// The manager's error.
    pub why: String,
}

/// The pod's cgroups, recorded before they are made for a dead shim's
/// cleanup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// The sandbox cgroup (a cgroupfs path, or `slice:prefix:name`).
    pub sandbox: String,
    /// The overhead cgroup, when the helpers live apart from the sandbox.
    pub overhead: Option<String>,
}

impl Recorded {
    /// The cgroups of pod `id` in sandbox cgroup `sandbox`, with an overhead
    /// cgroup unless `sandbox_only`.
    pub fn new(id: &str, sandbox: &str, sandbox_only: bool) -> Recorded {
        Recorded {
            sandbox: sandbox.into(),
            overhead: (!sandbox_only).then(|| overhead_path(sandbox, id)),
        }
    }
}

/// Where QEMU goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// The shim (and everything it starts) is in the sandbox cgroup already.
    Inherited,
    /// Only the vCPU threads (cgroup v1 + cgroupfs).
    VcpuThreads,
    /// The whole QEMU process.
    Process,
}

/// A pod's host cgroups.
pub struct HostCgroups {
    recorded: Recorded,
    sandbox: Box<dyn Manager>,
    overhead: Option<Box<dyn Manager>>,
    placement: Placement,
}

impl std::fmt::Debug for HostCgroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCgroups")
            .field("recorded", &self.recorded)
            .field("placement", &self.placement)
            .finish()
    }
}

fn manager(path: &str) -> Result<Box<dyn Manager>, CgroupError> {
    let fail = |why: String| CgroupError {
        path: path.into(),
        what: "opening",
        why,
    };
    match CgroupPath::parse(path).map_err(|e| fail(e.to_string()))? {
        CgroupPath::Systemd { .. } => Ok(Box::new(
            SystemdManager::new(path).map_err(|e| fail(e.to_string()))?,
        )),
        CgroupPath::Fs(rel) => Ok(Box::new(
            FsManager::new(&rel.display().to_string()).map_err(|e| fail(e.to_string()))?,
        )),
    }
}

/// The overhead cgroup of pod `id`, in the sandbox cgroup's form.
fn overhead_path(sandbox: &str, id: &str) -> String {
    match CgroupPath::parse(sandbox) {
        Ok(CgroupPath::Systemd { .. }) => format!("kata_overhead.slice:kata-rs:{id}"),
        _ => format!("kata_overhead/{id}"),
    }
}

/// The sandbox cgroup of pod `id` whose spec names `spec_path` (already
/// checked by [`CgroupPath::parse`]).
pub fn sandbox_path(id: &str, spec_path: Option<&str>) -> String {
    match spec_path.filter(|p| !p.is_empty()) {
        Some(p) => p.to_string(),
        None => format!("kata_{id}"),
    }
}

fn own_pid() -> CgroupPid {
    CgroupPid::from(u64::from(std::process::id()))
}

impl HostCgroups {
    /// Makes the cgroups `recorded` names and moves the shim into the one
    /// its helpers belong to (see the module documentation).
    pub fn create(recorded: &Recorded) -> Result<Self, CgroupError> {
        let sandbox = manager(&recorded.sandbox)?;
        let placement = if recorded.overhead.is_none() {
            Placement::Inherited
        } else if !sandbox.systemd() && !sandbox.v2() {
            Placement::VcpuThreads
        } else {
            Placement::Process
        };
        let mut me = HostCgroups {
            sandbox,
            overhead: recorded.overhead.as_deref().map(manager).transpose()?,
            placement,
            recorded: recorded.clone(),
        };
        let (target, path) = match me.overhead.as_mut() {
            Some(o) => (o, me.recorded.overhead.clone().unwrap_or_default()),
            None => (&mut me.sandbox, me.recorded.sandbox.clone()),
        };
        if let Err(e) = target.add_proc(own_pid()) {
            let err = CgroupError {
                path,
                what: "moving the shim in",
                why: e.to_string(),
            };
            me.destroy();
            return Err(err);
        }
        if let Ok(CgroupPath::Systemd { prefix, name, .. }) = CgroupPath::parse(&path) {
            // systemd moves the shim when its StartTransientUnit job runs,
            // after the call returned: the helpers the shim starts next
            // must be born in the scope
            let unit = format!("{prefix}-{name}.scope");
            if !wait_moved(&unit, std::time::Duration::from_secs(3)) {
                warn!(unit, "the shim is not in its systemd scope after 3 s");
            }
        }
        info!(
            sandbox = %me.recorded.sandbox,
            overhead = ?me.recorded.overhead,
            placement = ?me.placement,
            systemd = me.sandbox.systemd(),
            v2 = me.sandbox.v2(),
            "host cgroups made"
        );
        Ok(me)
    }

    fn fail(&self, what: &'static str) -> impl Fn(cgroups_05::manager::Error) -> CgroupError + '_ {
        move |e| CgroupError {
            path: self.recorded.sandbox.clone(),
            what,
            why: e.to_string(),
        }
    }

    /// Puts QEMU (pid `pid` on the host) where it belongs; called after it
    /// started (paused) and after every vCPU hot-plug (new vCPU threads start
    /// in QEMU's main cgroup). Returns how many threads or processes moved.
    pub fn place_hypervisor(&mut self, pid: u32) -> Result<usize, CgroupError> {
        match self.placement {
            Placement::Inherited => Ok(0),
            Placement::Process => {
                let r = self.sandbox.add_proc(CgroupPid::from(u64::from(pid)));
                r.map_err(self.fail("moving QEMU in"))?;
                Ok(1)
            }
            Placement::VcpuThreads => {
                let tids = vcpu_threads(Path::new("/proc"), pid);
                for tid in &tids {
                    let r = self.sandbox.add_thread(CgroupPid::from(u64::from(*tid)));
                    r.map_err(self.fail("moving a vCPU thread in"))?;
                }
                debug!(?tids, "vCPU threads in the sandbox cgroup");
                Ok(tids.len())
            }
        }
    }

    /// Sets the sandbox cgroup's limits for a pod whose containers ask for
    /// `containers` in a VM of `vm_memory_mib`.
    pub fn set_limits(
        &mut self,
        containers: Workload,
        vm_memory_mib: u64,
        overhead: Overhead,
    ) -> Result<(), CgroupError> {
        let r = limits(containers, vm_memory_mib, overhead);
        self.sandbox.set(&r).map_err(self.fail("setting limits"))
    }

    /// Moves the shim to the root cgroup, removes both cgroups. Errors are
    /// logged: the teardown goes on.
    pub fn destroy(&mut self) {
        match FsManager::new("") {
            Ok(mut root) => {
                if let Err(e) = root.add_proc(own_pid()) {
                    warn!("moving the shim to the root cgroup: {e}");
                }
            }
            Err(e) => warn!("the root cgroup: {e}"),
        }
        remove(&mut self.sandbox, &self.recorded.sandbox);
        if let (Some(o), Some(p)) = (self.overhead.as_mut(), self.recorded.overhead.as_ref()) {
            remove(o, p);
        }
    }
}

/// Waits until this process's cgroup is systemd unit `unit` in the
/// hierarchies systemd places it in (its own and the accounted controllers).
fn wait_moved(unit: &str, timeout: std::time::Duration) -> bool {
    let t0 = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let (mut v1, mut v2) = (vec![], vec![]);
        for l in text.lines() {
            let mut f = l.splitn(3, ':');
            let (Some(_), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            if ctrls.is_empty() {
                v2.push(path);
            } else if ctrls
                .split(',')
                .any(|c| matches!(c, "name=systemd" | "cpu" | "memory" | "pids"))
            {
                v1.push(path);
            }
        }
        // v1 (and hybrid): systemd's own and the accounted controllers; v2:
        // the one tree
        let lines = if v1.is_empty() { v2 } else { v1 };
        let placed = !lines.is_empty() && lines.iter().all(|path| path.ends_with(unit));
        if placed {
            return true;
        }
        if t0.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn remove(m: &mut Box<dyn Manager>, path: &str) {
    // a process that has just exited may hold its cgroup for a moment
    for _ in 0..100 {
        match m.destroy() {
            Ok(()) => {
                debug!(path, "host cgroup removed");
                return;
            }
            Err(e) => {
                debug!(path, "removing: {e}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
    if let Err(e) = m.destroy() {
        warn!(path, "cannot remove the host cgroup: {e}");
    }
}

/// Removes the cgroups a dead shim recorded.
pub fn cleanup(r: &Recorded) {
    for path in std::iter::once(&r.sandbox).chain(r.overhead.as_ref()) {
        match manager(path) {
            Ok(mut m) => remove(&mut m, path),
            Err(e) => warn!("{e}"),
        }
    }
}

/// The configured headroom of the sandbox cgroup over its containers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overhead {
    /// CPU, thousandths.
    pub millicpus: u64,
    /// Memory, MiB.
    pub memory_mib: u64,
}

/// The sandbox cgroup's resources (see the module documentation).
fn limits(containers: Workload, vm_memory_mib: u64, overhead: Overhead) -> LinuxResources {
    let mut r = LinuxResources::default();
    let quota = if containers.millicpus > 0 {
        let q = (containers.millicpus + overhead.millicpus) * PERIOD_US / 1000;
        i64::try_from(q).unwrap_or(i64::MAX)
    } else {
        -1
    };
    r.set_cpu(
        LinuxCpuBuilder::default()
            .quota(quota)
            .period(PERIOD_US)
            .build()
            .ok(),
    );
    let limit = if containers.memory_bytes > 0 {
        let mib = vm_memory_mib.saturating_add(overhead.memory_mib);
        i64::try_from(mib.saturating_mul(1 << 20)).unwrap_or(i64::MAX)
    } else {
        -1
    };
    r.set_memory(LinuxMemoryBuilder::default().limit(limit).build().ok());
    r
}

/// The host thread ids of QEMU's vCPU threads (named `CPU <n>/<accel>`).
fn vcpu_threads(proc: &Path, pid: u32) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir(proc.join(pid.to_string()).join("task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            let (cpu, _accel) = comm.trim().strip_prefix("CPU ")?.split_once('/')?;
            cpu.parse::<u32>().ok()?;
            Some(tid)
        })
        .collect();
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_threads_are_found_by_name() {
        let d = tempfile::tempdir().unwrap();
        for (tid, comm) in [
            (10, "qemu-system-x86"),
            (11, "CPU 0/TCG"),
            (12, "CPU 1/KVM"),
            (13, "IO mon_iothread"),
            (14, "CPU/x"),
        ] {
            let t = d.path().join(format!("10/task/{tid}"));
            std::fs::create_dir_all(&t).unwrap();
            std::fs::write(t.join("comm"), format!("{comm}\n")).unwrap();
        }
        assert_eq!(vcpu_threads(d.path(), 10), [11, 12]);
        assert!(vcpu_threads(d.path(), 99).is_empty());
    }

    #[test]
    fn limits_are_the_containers_plus_overhead() {
        let o = Overhead {
            millicpus: 250,
            memory_mib: 256,
        };
        let w = Workload {
            millicpus: 3000,
            memory_bytes: 512 << 20,
        };
        let r = limits(w, 1024 + 512, o);
        let cpu = r.cpu().as_ref().unwrap();
        assert_eq!((cpu.quota(), cpu.period()), (Some(325_000), Some(100_000)));
        let mem = r.memory().as_ref().unwrap();
        assert_eq!(mem.limit(), Some((1536 + 256) << 20));
        let none = limits(Workload::default(), 512, o);
        assert_eq!(none.cpu().as_ref().unwrap().quota(), Some(-1));
        assert_eq!(none.memory().as_ref().unwrap().limit(), Some(-1));
    }

    #[test]
    fn paths() {
        assert_eq!(sandbox_path("p1", None), "kata_p1");
        assert_eq!(sandbox_path("p1", Some("")), "kata_p1");
        assert_eq!(sandbox_path("p1", Some("/default/p1")), "/default/p1");
        assert_eq!(Recorded::new("p1", "/default/p1", true).overhead, None);
        assert_eq!(overhead_path("/default/p1", "p1"), "kata_overhead/p1");
        assert_eq!(
            overhead_path("kubepods.slice:cri-containerd:p1", "p1"),
            "kata_overhead.slice:kata-rs:p1"
        );
    }
}
