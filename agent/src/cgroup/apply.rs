//! Writing resource limits.

use std::io;
use std::path::PathBuf;

use cgroups_rs::pid::PidController;
use cgroups_rs::MaxValue;
use oci_spec::runtime::LinuxResources;
use tracing::{debug, warn};

use super::files::*;
use super::resources::*;
use super::{CgroupError, ContainerCgroup};

impl ContainerCgroup {
    /// Applies new limits. Fields left out (or zero, see
    /// [`ContainerCgroup::create`]) keep their values.
    pub fn update(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        let needs = check_resources(resources, self.is_v2())?;
        self.ensure_controllers(&needs)?;
        self.apply(resources)
    }

    /// Writes the (checked) resources.
    pub(super) fn apply(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        if let Some(c) = r.cpu() {
            self.apply_cpuset(c)?;
        }
        if let Some(m) = r.memory() {
            if self.is_v2() {
                self.apply_memory_v2(m)?;
            } else {
                self.apply_memory_v1(m)?;
            }
        }
        if let Some(c) = r.cpu() {
            if self.is_v2() {
                self.apply_cpu_v2(c)?;
            } else {
                self.apply_cpu_v1(c)?;
            }
        }
        if let Some(p) = r.pids() {
            if p.limit() != 0 {
                let dir = self.need_dir("pids", "pids.limit")?;
                let v = if p.limit() < 0 {
                    MaxValue::Max
                } else {
                    MaxValue::Value(p.limit())
                };
                PidController::new(dir.clone(), self.is_v2())
                    .set_pid_max(v)
                    .map_err(|source| CgroupError::Controller {
                        action: "set pids.max",
                        path: dir,
                        source,
                    })?;
            }
        }
        if let Some(b) = r.block_io() {
            self.apply_blkio(b)?;
        }
        if let Some(h) = r.hugepage_limits() {
            for l in h {
                let dir = self.need_dir("hugetlb", "hugepageLimits")?;
                let (file, v) = if self.is_v2() {
                    let v = if l.limit() < 0 {
                        "max".to_string()
                    } else {
                        l.limit().to_string()
                    };
                    (format!("hugetlb.{}.max", l.page_size()), v)
                } else {
                    (
                        format!("hugetlb.{}.limit_in_bytes", l.page_size()),
                        l.limit().to_string(),
                    )
                };
                write_value(&dir.join(file), &v)?;
            }
        }
        if let Some(n) = r.network() {
            if self.is_v2() {
                debug!("linux.resources.network has no cgroup v2 equivalent; ignored");
            } else {
                if let Some(id) = n.class_id() {
                    let dir = self.need_dir("net_cls", "network.classID")?;
                    write_value(&dir.join("net_cls.classid"), &id.to_string())?;
                }
                for p in n.priorities().iter().flatten() {
                    let dir = self.need_dir("net_prio", "network.priorities")?;
                    write_value(
                        &dir.join("net_prio.ifpriomap"),
                        &format!("{} {}", p.name(), p.priority()),
                    )?;
                }
            }
        }
        if let Some(rdma) = r.rdma() {
            for (dev, l) in rdma {
                let mut line = dev.clone();
                if let Some(h) = l.hca_handles() {
                    line.push_str(&format!(" hca_handle={h}"));
                }
                if let Some(o) = l.hca_objects() {
                    line.push_str(&format!(" hca_object={o}"));
                }
                if line.len() > dev.len() {
                    let dir = self.need_dir("rdma", "rdma")?;
                    write_value(&dir.join("rdma.max"), &line)?;
                }
            }
        }
        if let Some(u) = r.unified() {
            let leaf = self.leaf();
            for (k, v) in u {
                write_value(&leaf.join(k), v)?;
            }
        }
        Ok(())
    }

    fn need_dir(&self, controller: &str, field: &str) -> Result<PathBuf, CgroupError> {
        self.ctl_dir(controller)
            .ok_or_else(|| CgroupError::ControllerMissing {
                controller: controller.into(),
                field: field.into(),
                detail: "no cgroup v1 hierarchy with it is mounted (see /proc/self/mountinfo)"
                    .into(),
            })
    }

    fn apply_cpuset(&self, c: &oci_spec::runtime::LinuxCpu) -> Result<(), CgroupError> {
        for (file, field, v) in [
            ("cpuset.cpus", "cpu.cpus", c.cpus()),
            ("cpuset.mems", "cpu.mems", c.mems()),
        ] {
            if let Some(v) = v.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
                let dir = self.need_dir("cpuset", field)?;
                write_value(&dir.join(file), v)?;
            }
        }
        Ok(())
    }

    fn apply_memory_v1(&self, m: &oci_spec::runtime::LinuxMemory) -> Result<(), CgroupError> {
        let limit = m.limit().filter(|&v| v != 0);
        let mut swap = m.swap().filter(|&v| v != 0);
        let touches = limit.is_some()
            || swap.is_some()
            || [m.reservation(), m.kernel(), m.kernel_tcp()]
                .iter()
                .any(|v| v.is_some_and(|v| v != 0))
            || m.swappiness().is_some()
            || m.disable_oom_killer().is_some();
        if m.use_hierarchy().is_some() {
            debug!("memory.useHierarchy ignored: the kernel always uses the hierarchy");
        }
        if !touches {
            return Ok(());
        }
        let dir = self.need_dir("memory", "memory")?;
        let mem_file = dir.join("memory.limit_in_bytes");
        let sw_file = dir.join("memory.memsw.limit_in_bytes");
        let swap_supported = sw_file.exists();
        // memory+swap must stay >= memory: lifting the memory limit lifts swap too (runc)
        if limit == Some(-1) && swap.is_none() && swap_supported {
            swap = Some(-1);
        }
        if swap.is_some() && !swap_supported {
            warn!(file = %sw_file.display(), "memory.swap not applied: this kernel has no swap accounting");
            swap = None;
        }
        match (limit, swap) {
            (Some(l), Some(s)) => {
                // write in the order that keeps memsw >= memory at every step
                let cur = read_u64(&mem_file)?;
                if s == -1 || u64::try_from(s).is_ok_and(|s| cur < s) {
                    write_value(&sw_file, &s.to_string())?;
                    write_value(&mem_file, &l.to_string())?;
                } else {
                    write_value(&mem_file, &l.to_string())?;
                    write_value(&sw_file, &s.to_string())?;
                }
            }
            (Some(l), None) => write_value(&mem_file, &l.to_string())?,
            (None, Some(s)) => write_value(&sw_file, &s.to_string())?,
            (None, None) => {}
        }
        if let Some(r) = m.reservation().filter(|&v| v != 0) {
            write_value(&dir.join("memory.soft_limit_in_bytes"), &r.to_string())?;
        }
        for (file, v) in [
            ("memory.kmem.limit_in_bytes", m.kernel()),
            ("memory.kmem.tcp.limit_in_bytes", m.kernel_tcp()),
        ] {
            if let Some(v) = v.filter(|&v| v != 0) {
                let p = dir.join(file);
                match write_value(&p, &v.to_string()) {
                    Err(CgroupError::Write { source, .. })
                        if source.kind() == io::ErrorKind::NotFound
                            || source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
                    {
                        debug!(file = %p.display(), "kernel memory limits are gone from this kernel; ignored");
                    }
                    r => r?,
                }
            }
        }
        if let Some(s) = m.swappiness() {
            write_value(&dir.join("memory.swappiness"), &s.to_string())?;
        }
        if let Some(d) = m.disable_oom_killer() {
            write_value(&dir.join("memory.oom_control"), if d { "1" } else { "0" })?;
        }
        Ok(())
    }

    fn apply_memory_v2(&self, m: &oci_spec::runtime::LinuxMemory) -> Result<(), CgroupError> {
        let leaf = self.leaf();
        let limit = m.limit().filter(|&v| v != 0);
        if let Some(l) = limit {
            let v = if l < 0 {
                "max".to_string()
            } else {
                l.to_string()
            };
            write_value(&leaf.join("memory.max"), &v)?;
        }
        if let Some(s) = m.swap().filter(|&v| v != 0) {
            let file = leaf.join("memory.swap.max");
            if !file.exists() {
                warn!(file = %file.display(), "memory.swap not applied: this kernel has no swap accounting");
            } else {
                let current_limit = match limit {
                    Some(l) => Some(l),
                    None => read_limit_opt(&leaf.join("memory.max"))?
                        .flatten()
                        .and_then(|v| i64::try_from(v).ok()),
                };
                write_value(&file, &swap_v2_value(s, current_limit)?)?;
            }
        }
        if let Some(r) = m.reservation().filter(|&v| v != 0) {
            let v = if r < 0 {
                "max".to_string()
            } else {
                r.to_string()
            };
            write_value(&leaf.join("memory.low"), &v)?;
        }
        if m.kernel().is_some_and(|v| v != 0) || m.kernel_tcp().is_some_and(|v| v != 0) {
            debug!("memory.kernel/kernelTCP have no cgroup v2 equivalent; ignored");
        }
        if m.swappiness().is_some()
            || m.disable_oom_killer().is_some()
            || m.use_hierarchy().is_some()
        {
            debug!("memory.swappiness/disableOOMKiller/useHierarchy have no cgroup v2 equivalent; ignored");
        }
        Ok(())
    }

    fn apply_cpu_v1(&self, c: &oci_spec::runtime::LinuxCpu) -> Result<(), CgroupError> {
        let shares = c.shares().filter(|&v| v != 0);
        let quota = c.quota().filter(|&v| v != 0);
        let period = c.period().filter(|&v| v != 0);
        let burst = c.burst().filter(|&v| v != 0);
        let rt_runtime = c.realtime_runtime().filter(|&v| v != 0);
        let rt_period = c.realtime_period().filter(|&v| v != 0);
        if [
            shares.is_some(),
            quota.is_some(),
            period.is_some(),
            burst.is_some(),
            c.idle().is_some(),
            rt_runtime.is_some(),
            rt_period.is_some(),
        ]
        .iter()
        .all(|x| !x)
        {
            return Ok(());
        }
        let dir = self.need_dir("cpu", "cpu")?;
        if let Some(s) = shares {
            write_value(&dir.join("cpu.shares"), &s.to_string())?;
        }
        // A period below the current one can be refused (EINVAL) while the old
        // quota is in place: then write it again after the quota (runc).
        let mut period_pending = None;
        if let Some(p) = period {
            match write_value(&dir.join("cpu.cfs_period_us"), &p.to_string()) {
                Err(CgroupError::Write { source, .. })
                    if source.raw_os_error() == Some(libc::EINVAL) && quota.is_some() =>
                {
                    period_pending = Some(p)
                }
                r => r?,
            }
        }
        if let Some(q) = quota {
            write_value(&dir.join("cpu.cfs_quota_us"), &q.to_string())?;
            if let Some(p) = period_pending {
                write_value(&dir.join("cpu.cfs_period_us"), &p.to_string())?;
            }
        }
        if let Some(b) = burst {
            write_value(&dir.join("cpu.cfs_burst_us"), &b.to_string())?;
        }
        if let Some(i) = c.idle() {
            write_value(&dir.join("cpu.idle"), &i.to_string())?;
        }
        if let Some(p) = rt_period {
            write_value(&dir.join("cpu.rt_period_us"), &p.to_string())?;
        }
        if let Some(r) = rt_runtime {
            write_value(&dir.join("cpu.rt_runtime_us"), &r.to_string())?;
        }
        Ok(())
    }

    fn apply_cpu_v2(&self, c: &oci_spec::runtime::LinuxCpu) -> Result<(), CgroupError> {
        let leaf = self.leaf();
        if let Some(s) = c.shares().filter(|&v| v != 0) {
            write_value(&leaf.join("cpu.weight"), &shares_to_weight(s).to_string())?;
        }
        if c.quota().is_some_and(|v| v != 0) || c.period().is_some_and(|v| v != 0) {
            let file = leaf.join("cpu.max");
            let current = read_string(&file)?;
            if let Some(line) = cpu_max_line(c.quota(), c.period(), &current) {
                write_value(&file, &line)?;
            }
        }
        if let Some(b) = c.burst().filter(|&v| v != 0) {
            write_value(&leaf.join("cpu.max.burst"), &b.to_string())?;
        }
        if let Some(i) = c.idle() {
            write_value(&leaf.join("cpu.idle"), &i.to_string())?;
        }
        Ok(())
    }

    fn apply_blkio(&self, b: &oci_spec::runtime::LinuxBlockIo) -> Result<(), CgroupError> {
        let v2 = self.is_v2();
        let ctl = if v2 { "io" } else { "blkio" };
        let Some(dir) = self.ctl_dir(ctl) else {
            // check_resources/ensure_controllers already refused a needed one
            return Ok(());
        };
        let weight = b.weight().filter(|&w| w != 0);
        let devices: Vec<_> = b.weight_device().iter().flatten().collect();
        if weight.is_some() || !devices.is_empty() {
            // CFQ's blkio.weight, else BFQ's; v2: io.bfq.weight (1..1000), else io.weight
            let candidates: &[(&str, &str, bool)] = if v2 {
                &[
                    ("io.bfq.weight", "io.bfq.weight", false),
                    ("io.weight", "io.weight", true),
                ]
            } else {
                &[
                    ("blkio.weight", "blkio.weight_device", false),
                    ("blkio.bfq.weight", "blkio.bfq.weight_device", false),
                ]
            };
            match candidates.iter().find(|(f, _, _)| dir.join(f).exists()) {
                None => {
                    warn!(dir = %dir.display(), "blockIO weights not applied: no weight-based I/O scheduler (CFQ/BFQ) here")
                }
                Some(&(wfile, dfile, convert)) => {
                    let conv = |w: u16| {
                        if convert {
                            blkio_weight_to_io_weight(w)
                        } else {
                            u64::from(w)
                        }
                    };
                    if let Some(w) = weight {
                        write_value(&dir.join(wfile), &conv(w).to_string())?;
                    }
                    for d in &devices {
                        if let Some(w) = d.weight().filter(|&w| w != 0) {
                            write_value(
                                &dir.join(dfile),
                                &format!("{}:{} {}", d.major(), d.minor(), conv(w)),
                            )?;
                        }
                    }
                }
            }
        }
        let leaf_weights = b.leaf_weight().is_some_and(|w| w != 0)
            || devices
                .iter()
                .any(|d| d.leaf_weight().is_some_and(|w| w != 0));
        if leaf_weights {
            if !v2 && dir.join("blkio.leaf_weight").exists() {
                if let Some(w) = b.leaf_weight().filter(|&w| w != 0) {
                    write_value(&dir.join("blkio.leaf_weight"), &w.to_string())?;
                }
                for d in &devices {
                    if let Some(w) = d.leaf_weight().filter(|&w| w != 0) {
                        write_value(
                            &dir.join("blkio.leaf_weight_device"),
                            &format!("{}:{} {w}", d.major(), d.minor()),
                        )?;
                    }
                }
            } else {
                warn!("blockIO leaf weights not applied: only CFQ on cgroup v1 has them");
            }
        }
        for (v1file, v2key, list) in [
            (
                "blkio.throttle.read_bps_device",
                "rbps",
                b.throttle_read_bps_device(),
            ),
            (
                "blkio.throttle.write_bps_device",
                "wbps",
                b.throttle_write_bps_device(),
            ),
            (
                "blkio.throttle.read_iops_device",
                "riops",
                b.throttle_read_iops_device(),
            ),
            (
                "blkio.throttle.write_iops_device",
                "wiops",
                b.throttle_write_iops_device(),
            ),
        ] {
            for d in list.iter().flatten() {
                if v2 {
                    let rate = if d.rate() == 0 {
                        "max".to_string()
                    } else {
                        d.rate().to_string()
                    };
                    write_value(
                        &dir.join("io.max"),
                        &format!("{}:{} {v2key}={rate}", d.major(), d.minor()),
                    )?;
                } else {
                    write_value(
                        &dir.join(v1file),
                        &format!("{}:{} {}", d.major(), d.minor(), d.rate()),
                    )?;
                }
            }
        }
        Ok(())
    }
}
