//! How big a pod's VM is, as Kata sizes it: the configured defaults plus the
//! workload's limits.
//!
//! * memory: `default_memory` + the memory limits (bytes, summed, rounded up
//!   to MiB); no limit or a negative one adds nothing;
//! * vCPUs: `default_vcpus` + the CPU limits (`quota / period`, summed, rounded
//!   up); a quota of 0 or less, or a period of 0, adds nothing; the total is
//!   clamped to `default_maxvcpus`, or to the host CPUs when that is 0.
//!
//! A CRI pod's sandbox container carries the whole pod's limits in the
//! `io.kubernetes.cri.sandbox-*` annotations (containerd 1.6 and later):
//! [`Workload::of_sandbox`] prefers them to the sandbox container's own
//! resources.

use std::collections::HashMap;
use std::ops::{Add, AddAssign};

use oci_spec::runtime::{LinuxResources, Spec};

use super::Config;

/// containerd's annotation: the pod's CPU quota (µs per period).
pub const SANDBOX_CPU_QUOTA_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// containerd's annotation: the pod's CPU period (µs).
pub const SANDBOX_CPU_PERIOD_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// containerd's annotation: the pod's memory limit (bytes).
pub const SANDBOX_MEMORY_ANNOTATION: &str = "io.kubernetes.cri.sandbox-memory";

const MIB: u64 = 1024 * 1024;

/// The resources a workload asks for, to be added to the VM's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Workload {
    /// CPU limit in thousandths of a CPU (each container's rounded up).
    pub millicpus: u64,
    /// Memory limit in bytes.
    pub memory_bytes: u64,
}

impl Workload {
    /// A workload of a CPU quota and period (µs) and a memory limit (bytes),
    /// as the OCI spec gives them: non-positive or missing values add nothing.
    pub fn from_limits(quota: Option<i64>, period: Option<u64>, memory: Option<i64>) -> Self {
        let millicpus = match (quota, period) {
            (Some(q), Some(p)) if q > 0 && p > 0 => {
                let m = (u128::from(q.unsigned_abs()) * 1000).div_ceil(u128::from(p));
                u64::try_from(m).unwrap_or(u64::MAX)
            }
            _ => 0,
        };
        let memory_bytes = memory.filter(|m| *m > 0).map_or(0, i64::unsigned_abs);
        Self {
            millicpus,
            memory_bytes,
        }
    }

    /// A container's `linux.resources` (CPU quota/period, memory limit).
    pub fn from_resources(resources: Option<&LinuxResources>) -> Self {
        let Some(r) = resources else {
            return Self::default();
        };
        let cpu = r.cpu().as_ref();
        Self::from_limits(
            cpu.and_then(|c| c.quota()),
            cpu.and_then(|c| c.period()),
            r.memory().as_ref().and_then(|m| m.limit()),
        )
    }

    /// The pod's limits from containerd's `io.kubernetes.cri.sandbox-*`
    /// annotations; `None` if none of them is present. A value that does not
    /// parse counts as absent (logged), as in Kata.
    pub fn from_sandbox_annotations(annotations: &HashMap<String, String>) -> Option<Self> {
        fn get<T: std::str::FromStr>(a: &HashMap<String, String>, key: &str) -> Option<T> {
            let v = a.get(key)?;
            let parsed = v.trim().parse().ok();
            if parsed.is_none() {
                tracing::warn!(annotation = key, value = %v, "ignored: not a number");
            }
            parsed
        }
        let keys = [
            SANDBOX_CPU_QUOTA_ANNOTATION,
            SANDBOX_CPU_PERIOD_ANNOTATION,
            SANDBOX_MEMORY_ANNOTATION,
        ];
        if !keys.iter().any(|k| annotations.contains_key(*k)) {
            return None;
        }
        Some(Self::from_limits(
            get(annotations, SANDBOX_CPU_QUOTA_ANNOTATION),
            get(annotations, SANDBOX_CPU_PERIOD_ANNOTATION),
            get(annotations, SANDBOX_MEMORY_ANNOTATION),
        ))
    }

    /// What the VM of a sandbox container must hold: the pod's limits from
    /// the CRI sandbox annotations if present, else the container's own
    /// `linux.resources` (a single container run with `ctr run`).
    pub fn of_sandbox(spec: &Spec) -> Self {
        spec.annotations()
            .as_ref()
            .and_then(Self::from_sandbox_annotations)
            .unwrap_or_else(|| {
                Self::from_resources(spec.linux().as_ref().and_then(|l| l.resources().as_ref()))
            })
    }

    /// Whole vCPUs this workload needs (rounded up).
    pub fn vcpus(&self) -> u64 {
        self.millicpus.div_ceil(1000)
    }

    /// MiB this workload needs (rounded up).
    pub fn memory_mib(&self) -> u64 {
        self.memory_bytes.div_ceil(MIB)
    }
}

impl Add for Workload {
    type Output = Workload;
    fn add(self, o: Workload) -> Workload {
        Workload {
            millicpus: self.millicpus.saturating_add(o.millicpus),
            memory_bytes: self.memory_bytes.saturating_add(o.memory_bytes),
        }
    }
}

impl AddAssign for Workload {
    fn add_assign(&mut self, o: Workload) {
        *self = *self + o;
    }
}

/// The size of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    /// vCPUs at boot.
    pub vcpus: u32,
    /// Most vCPUs the VM may ever have (equal to `vcpus` with
    /// `static_sandbox_resource_mgmt`).
    pub max_vcpus: u32,
    /// Memory at boot, MiB.
    pub memory_mib: u64,
    /// Most memory the VM may ever have, MiB (equal to `memory_mib` with
    /// `static_sandbox_resource_mgmt` or no `memory_slots`).
    pub max_memory_mib: u64,
}

/// The host's CPUs and memory (MiB), the bounds of `default_maxvcpus = 0`
/// and `default_maxmemory = 0`.
fn host() -> (u32, u64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: sysconf takes no pointers.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let mem = u64::try_from(pages).unwrap_or(0) * u64::try_from(page).unwrap_or(0) / MIB;
    (u32::try_from(cpus).unwrap_or(u32::MAX), mem)
}

impl Config {
    /// The VM of a pod whose workload is one container's `linux.resources`
    /// (see the module documentation).
    pub fn vm_size(&self, linux_resources: Option<&LinuxResources>) -> VmSize {
        self.vm_size_for(Workload::from_resources(linux_resources))
    }

    /// The VM of a pod running `workload` (e.g. [`Workload::of_sandbox`], or
    /// a sum over containers).
    pub fn vm_size_for(&self, workload: Workload) -> VmSize {
        let (cpus, mem) = host();
        self.size_on(workload, cpus, mem)
    }

    /// The VM a running pod's containers need (`workload`: their limits
    /// summed), for a resize; an error naming the bound when it exceeds
    /// `default_maxvcpus` or `default_maxmemory` (nothing is clamped: the
    /// caller leaves the pod as it was).
    pub fn resize_for(&self, workload: Workload) -> Result<VmSize, String> {
        let (cpus, mem) = host();
        let size = self.size_on(workload, cpus, mem);
        let wanted = u64::from(self.hypervisor.qemu.default_vcpus).saturating_add(workload.vcpus());
        if wanted > u64::from(size.max_vcpus) {
            return Err(format!(
                "the containers' CPU limits need {wanted} vCPUs (default_vcpus {} + {}), more than default_maxvcpus allows ({})",
                self.hypervisor.qemu.default_vcpus,
                workload.vcpus(),
                size.max_vcpus
            ));
        }
        if size.memory_mib > size.max_memory_mib {
            return Err(format!(
                "the containers' memory limits need {} MiB (default_memory {} + {}), more than default_maxmemory allows ({} MiB)",
                size.memory_mib,
                self.hypervisor.qemu.default_memory,
                workload.memory_mib(),
                size.max_memory_mib
            ));
        }
        Ok(size)
    }

    /// The VM of `workload` on a host with `host_cpus` CPUs and
    /// `host_mib` MiB.
    fn size_on(&self, workload: Workload, host_cpus: u32, host_mib: u64) -> VmSize {
        let q = &self.hypervisor.qemu;
        let limit = match q.default_maxvcpus {
            0 => host_cpus,
            m => m,
        }
        .clamp(1, super::MAX_VCPUS);
        let wanted = u64::from(q.default_vcpus).saturating_add(workload.vcpus());
        let vcpus = u32::try_from(wanted).unwrap_or(u32::MAX).min(limit);
        let memory_mib = q.default_memory.saturating_add(workload.memory_mib());
        let dynamic = !self.runtime.static_sandbox_resource_mgmt;
        let max_memory_mib = match q.default_maxmemory {
            _ if !dynamic || q.memory_slots == 0 => memory_mib,
            0 => host_mib.max(memory_mib),
            m => m,
        };
        VmSize {
            vcpus,
            max_vcpus: if dynamic { limit } else { vcpus },
            memory_mib,
            max_memory_mib,
        }
    }
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxResources};

    use super::*;

    fn resources(quota: Option<i64>, period: Option<u64>, limit: Option<i64>) -> LinuxResources {
        let mut cpu = LinuxCpu::default();
        cpu.set_quota(quota);
        cpu.set_period(period);
        let mut mem = LinuxMemory::default();
        mem.set_limit(limit);
        let mut r = LinuxResources::default();
        r.set_cpu(Some(cpu));
        r.set_memory(Some(mem));
        r
    }

    fn cfg(vcpus: u32, max: u32, memory: u64) -> Config {
        let mut c = Config::default();
        c.hypervisor.qemu.default_vcpus = vcpus;
        c.hypervisor.qemu.default_maxvcpus = max;
        c.hypervisor.qemu.default_memory = memory;
        c
    }

    #[test]
    fn config_sizing_no_limits_is_the_defaults() {
        let c = cfg(1, 0, 512);
        let s = c.size_on(Workload::from_resources(None), 8, 4096);
        assert_eq!((s.vcpus, s.memory_mib), (1, 512));
        let r = resources(None, None, None);
        assert_eq!(
            c.size_on(Workload::from_resources(Some(&r)), 8, 4096).vcpus,
            1
        );
        assert_eq!(c.vm_size(None).memory_mib, 512);
    }

    #[test]
    fn config_sizing_adds_limits_rounding_up() {
        let c = cfg(1, 0, 512);
        // 1.5 CPUs -> 2 more; 100 MiB + 1 byte -> 101 MiB more.
        let r = resources(Some(150_000), Some(100_000), Some(100 * 1024 * 1024 + 1));
        let s = c.size_on(Workload::from_resources(Some(&r)), 8, 4096);
        assert_eq!((s.vcpus, s.memory_mib), (3, 613));
        // A tiny quota still costs a whole vCPU.
        let r = resources(Some(1), Some(100_000), Some(256 * 1024 * 1024));
        let s = c.size_on(Workload::from_resources(Some(&r)), 8, 4096);
        assert_eq!((s.vcpus, s.memory_mib), (2, 768));
    }

    #[test]
    fn config_sizing_ignores_unlimited_and_bad_values() {
        let c = cfg(2, 0, 256);
        for (q, p, m) in [
            (Some(-1), Some(100_000), Some(-1)),
            (Some(0), Some(100_000), Some(0)),
            (Some(50_000), Some(0), None),
            (Some(50_000), None, None),
        ] {
            let r = resources(q, p, m);
            let s = c.size_on(Workload::from_resources(Some(&r)), 8, 4096);
            assert_eq!((s.vcpus, s.memory_mib), (2, 256), "{q:?} {p:?} {m:?}");
        }
        // Huge values saturate instead of overflowing.
        let w = Workload::from_limits(Some(i64::MAX), Some(1), Some(i64::MAX));
        let s = c.size_on(w + w, 8, 4096);
        assert_eq!(s.vcpus, 8);
    }

    #[test]
    fn config_sizing_clamps_vcpus() {
        let r = resources(Some(800_000), Some(100_000), None);
        let w = Workload::from_resources(Some(&r));
        // default_maxvcpus wins when set.
        let s = cfg(1, 4, 512).size_on(w, 16, 4096);
        assert_eq!((s.vcpus, s.max_vcpus), (4, 4));
        // 0: the host's CPUs.
        let s = cfg(1, 0, 512).size_on(w, 2, 4096);
        assert_eq!(s.vcpus, 2);
        // Without static sizing the VM may grow to the limit later.
        let mut c = cfg(1, 0, 512);
        c.runtime.static_sandbox_resource_mgmt = false;
        let s = c.size_on(Workload::default(), 6, 4096);
        assert_eq!((s.vcpus, s.max_vcpus), (1, 6));
        assert_eq!(s.max_memory_mib, 4096, "default_maxmemory = 0: the host's");
        c.hypervisor.qemu.default_maxmemory = 2048;
        assert_eq!(c.size_on(Workload::default(), 6, 4096).max_memory_mib, 2048);
        c.hypervisor.qemu.memory_slots = 0;
        assert_eq!(c.size_on(Workload::default(), 6, 4096).max_memory_mib, 512);
        // With it the VM never grows.
        c.runtime.static_sandbox_resource_mgmt = true;
        c.hypervisor.qemu.memory_slots = 10;
        let s = c.size_on(Workload::default(), 6, 4096);
        assert_eq!((s.max_vcpus, s.max_memory_mib), (1, 512));
    }

    #[test]
    fn a_resize_beyond_the_bounds_is_an_error() {
        let mut c = cfg(1, 4, 512);
        c.runtime.static_sandbox_resource_mgmt = false;
        c.hypervisor.qemu.default_maxmemory = 2048;
        let w = |cpus: i64, mib: i64| {
            Workload::from_limits(Some(cpus * 100_000), Some(100_000), Some(mib << 20))
        };
        let s = c.resize_for(w(3, 1024)).unwrap();
        assert_eq!((s.vcpus, s.memory_mib), (4, 1536));
        let e = c.resize_for(w(4, 0)).unwrap_err();
        assert!(
            e.contains("5 vCPUs") && e.contains("default_maxvcpus allows (4)"),
            "{e}"
        );
        let e = c.resize_for(w(1, 2000)).unwrap_err();
        assert!(e.contains("default_maxmemory allows (2048 MiB)"), "{e}");
    }

    #[test]
    fn config_sizing_sums_containers() {
        // Two half-CPU containers fit in one extra vCPU.
        let half = Workload::from_limits(Some(50_000), Some(100_000), Some(64 * 1024 * 1024));
        let mut w = Workload::default();
        w += half;
        w += half;
        assert_eq!((w.vcpus(), w.memory_mib()), (1, 128));
        let s = cfg(1, 0, 512).size_on(w, 8, 4096);
        assert_eq!((s.vcpus, s.memory_mib), (2, 640));
    }

    #[test]
    fn config_sizing_from_cri_sandbox_annotations() {
        let mut a = HashMap::new();
        assert_eq!(Workload::from_sandbox_annotations(&a), None);
        a.insert(SANDBOX_CPU_QUOTA_ANNOTATION.into(), "220000".into());
        a.insert(SANDBOX_CPU_PERIOD_ANNOTATION.into(), "100000".into());
        a.insert(SANDBOX_MEMORY_ANNOTATION.into(), "1048576".into());
        let w = Workload::from_sandbox_annotations(&a).unwrap();
        assert_eq!((w.vcpus(), w.memory_mib()), (3, 1));
        a.insert(SANDBOX_MEMORY_ANNOTATION.into(), "lots".into());
        let w = Workload::from_sandbox_annotations(&a).unwrap();
        assert_eq!((w.vcpus(), w.memory_mib()), (3, 0));

        // The spec: annotations win over the sandbox container's resources.
        let mut spec = Spec::default();
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_resources(Some(resources(Some(100_000), Some(100_000), Some(1 << 30))));
        spec.set_linux(Some(linux));
        assert_eq!(Workload::of_sandbox(&spec).vcpus(), 1);
        assert_eq!(Workload::of_sandbox(&spec).memory_mib(), 1024);
        spec.set_annotations(Some(a));
        assert_eq!(Workload::of_sandbox(&spec).vcpus(), 3);
    }
}
