//! Usage statistics.

use std::collections::HashMap;
use std::fs;
use std::io::{self};

use cgroups_rs::pid::PidController;
use cgroups_rs::MaxValue;
use kata_proto::agent::{
    BlkioStats, BlkioStatsEntry, CgroupStats, CpuStats, CpuUsage, HugetlbStats, MemoryData,
    MemoryStats, PidsStats, ThrottlingData,
};

use super::files::*;
use super::{CgroupError, ContainerCgroup};

impl ContainerCgroup {
    /// Usage statistics: CPU, memory, pids, block I/O and hugetlb, each `None`
    /// (or empty) when its controller is not there.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        let leaf = self.leaf();
        if !leaf.exists() {
            return Err(CgroupError::Gone { path: leaf });
        }
        Ok(CgroupStats {
            cpu_stats: self.cpu_stats()?,
            memory_stats: self.memory_stats()?,
            pids_stats: self.pids_stats()?,
            blkio_stats: self.blkio_stats()?,
            hugetlb_stats: self.hugetlb_stats()?,
        })
    }

    fn cpu_stats(&self) -> Result<Option<CpuStats>, CgroupError> {
        if self.is_v2() {
            let p = self.leaf().join("cpu.stat");
            let Some(text) = read_opt(&p)? else {
                return Ok(None);
            };
            let s = parse_flat_keyed(&text);
            let us = |k: &str| s.get(k).copied().unwrap_or(0).saturating_mul(1000);
            let throttling = s.contains_key("nr_periods").then(|| ThrottlingData {
                periods: s["nr_periods"],
                throttled_periods: s.get("nr_throttled").copied().unwrap_or(0),
                throttled_time: us("throttled_usec"),
            });
            return Ok(Some(CpuStats {
                cpu_usage: Some(CpuUsage {
                    total_usage: us("usage_usec"),
                    percpu_usage: Vec::new(),
                    usage_in_kernelmode: us("system_usec"),
                    usage_in_usermode: us("user_usec"),
                }),
                throttling_data: throttling,
            }));
        }
        let acct = self.ctl_dir("cpuacct");
        let cpu = self.ctl_dir("cpu");
        if acct.is_none() && cpu.is_none() {
            return Ok(None);
        }
        let mut usage = None;
        if let Some(d) = acct {
            let mut u = CpuUsage {
                total_usage: read_u64(&d.join("cpuacct.usage"))?,
                percpu_usage: read_opt(&d.join("cpuacct.usage_percpu"))?
                    .map(|t| parse_u64_list(&t))
                    .unwrap_or_default(),
                ..Default::default()
            };
            match (
                read_u64_opt(&d.join("cpuacct.usage_user"))?,
                read_u64_opt(&d.join("cpuacct.usage_sys"))?,
            ) {
                (Some(user), Some(sys)) => {
                    u.usage_in_usermode = user;
                    u.usage_in_kernelmode = sys;
                }
                _ => {
                    // cpuacct.stat counts USER_HZ ticks
                    let st = parse_flat_keyed(&read_string(&d.join("cpuacct.stat"))?);
                    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
                        .ok()
                        .flatten()
                        .and_then(|v| u64::try_from(v).ok())
                        .filter(|&v| v > 0)
                        .unwrap_or(100);
                    let ns = |k: &str| {
                        st.get(k)
                            .copied()
                            .unwrap_or(0)
                            .saturating_mul(1_000_000_000 / hz)
                    };
                    u.usage_in_usermode = ns("user");
                    u.usage_in_kernelmode = ns("system");
                }
            }
            usage = Some(u);
        }
        let mut throttling = None;
        if let Some(d) = cpu {
            if let Some(t) = read_opt(&d.join("cpu.stat"))? {
                let s = parse_flat_keyed(&t);
                throttling = Some(ThrottlingData {
                    periods: s.get("nr_periods").copied().unwrap_or(0),
                    throttled_periods: s.get("nr_throttled").copied().unwrap_or(0),
                    throttled_time: s.get("throttled_time").copied().unwrap_or(0),
                });
            }
        }
        Ok(Some(CpuStats {
            cpu_usage: usage,
            throttling_data: throttling,
        }))
    }

    fn memory_stats(&self) -> Result<Option<MemoryStats>, CgroupError> {
        let Some(d) = self.ctl_dir("memory") else {
            return Ok(None);
        };
        if self.is_v2() {
            let current = d.join("memory.current");
            if !current.exists() {
                return Ok(None);
            }
            let stats = parse_flat_keyed(&read_string(&d.join("memory.stat"))?);
            let events = |f: &str| -> Result<HashMap<String, u64>, CgroupError> {
                Ok(read_opt(&d.join(f))?
                    .map(|t| parse_flat_keyed(&t))
                    .unwrap_or_default())
            };
            let usage = MemoryData {
                usage: read_u64(&current)?,
                max_usage: read_u64_opt(&d.join("memory.peak"))?.unwrap_or(0),
                failcnt: events("memory.events")?.get("max").copied().unwrap_or(0),
                limit: read_limit_opt(&d.join("memory.max"))?
                    .flatten()
                    .unwrap_or(u64::MAX),
            };
            let swap_usage = match read_u64_opt(&d.join("memory.swap.current"))? {
                None => None,
                Some(u) => Some(MemoryData {
                    usage: u,
                    max_usage: read_u64_opt(&d.join("memory.swap.peak"))?.unwrap_or(0),
                    failcnt: events("memory.swap.events")?
                        .get("fail")
                        .copied()
                        .unwrap_or(0),
                    limit: read_limit_opt(&d.join("memory.swap.max"))?
                        .flatten()
                        .unwrap_or(u64::MAX),
                }),
            };
            return Ok(Some(MemoryStats {
                cache: stats.get("file").copied().unwrap_or(0),
                usage: Some(usage),
                swap_usage,
                kernel_usage: stats.get("kernel").map(|&k| MemoryData {
                    usage: k,
                    ..Default::default()
                }),
                use_hierarchy: true,
                stats,
            }));
        }
        let stats = parse_flat_keyed(&read_string(&d.join("memory.stat"))?);
        let data = |prefix: &str| -> Result<Option<MemoryData>, CgroupError> {
            let Some(usage) = read_u64_opt(&d.join(format!("{prefix}usage_in_bytes")))? else {
                return Ok(None);
            };
            Ok(Some(MemoryData {
                usage,
                max_usage: read_u64_opt(&d.join(format!("{prefix}max_usage_in_bytes")))?
                    .unwrap_or(0),
                failcnt: read_u64_opt(&d.join(format!("{prefix}failcnt")))?.unwrap_or(0),
                limit: read_u64_opt(&d.join(format!("{prefix}limit_in_bytes")))?.unwrap_or(0),
            }))
        };
        let usage = match data("memory.")? {
            Some(u) => u,
            None => {
                return Err(CgroupError::Read {
                    path: d.join("memory.usage_in_bytes"),
                    source: io::Error::from(io::ErrorKind::NotFound),
                })
            }
        };
        Ok(Some(MemoryStats {
            cache: stats
                .get("total_cache")
                .or_else(|| stats.get("cache"))
                .copied()
                .unwrap_or(0),
            usage: Some(usage),
            swap_usage: data("memory.memsw.")?,
            kernel_usage: data("memory.kmem.")?,
            use_hierarchy: read_u64_opt(&d.join("memory.use_hierarchy"))? == Some(1),
            stats,
        }))
    }

    fn pids_stats(&self) -> Result<Option<PidsStats>, CgroupError> {
        let Some(d) = self.ctl_dir("pids") else {
            return Ok(None);
        };
        if !d.join("pids.current").exists() {
            return Ok(None);
        }
        let pc = PidController::new(d.clone(), self.is_v2());
        let err = |action| {
            let path = d.clone();
            move |source| CgroupError::Controller {
                action,
                path,
                source,
            }
        };
        let current = pc.get_pid_current().map_err(err("read pids.current"))?;
        let limit = match pc.get_pid_max().map_err(err("read pids.max"))? {
            MaxValue::Max => 0,
            MaxValue::Value(v) => u64::try_from(v).unwrap_or(0),
        };
        Ok(Some(PidsStats { current, limit }))
    }

    fn blkio_stats(&self) -> Result<Option<BlkioStats>, CgroupError> {
        if self.is_v2() {
            return Ok(read_opt(&self.leaf().join("io.stat"))?.map(|t| parse_io_stat(&t)));
        }
        let Some(d) = self.ctl_dir("blkio") else {
            return Ok(None);
        };
        // CFQ's files, else (kernels without CFQ) the throttle policy's, which
        // count all I/O
        let pick = |names: [&str; 2]| -> Result<Vec<BlkioStatsEntry>, CgroupError> {
            for n in names {
                if let Some(t) = read_opt(&d.join(n))? {
                    let e = parse_blkio_v1(&t);
                    if !e.is_empty() {
                        return Ok(e);
                    }
                }
            }
            Ok(Vec::new())
        };
        Ok(Some(BlkioStats {
            io_service_bytes_recursive: pick([
                "blkio.io_service_bytes_recursive",
                "blkio.throttle.io_service_bytes_recursive",
            ])?,
            io_serviced_recursive: pick([
                "blkio.io_serviced_recursive",
                "blkio.throttle.io_serviced_recursive",
            ])?,
        }))
    }

    fn hugetlb_stats(&self) -> Result<HashMap<String, HugetlbStats>, CgroupError> {
        let mut out = HashMap::new();
        let Some(d) = self.ctl_dir("hugetlb") else {
            return Ok(out);
        };
        let suffix = if self.is_v2() {
            "max"
        } else {
            "limit_in_bytes"
        };
        let entries = match fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(source) => return Err(CgroupError::Read { path: d, source }),
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let parts: Vec<&str> = name.split('.').collect();
            if parts.len() != 3 || parts[0] != "hugetlb" || parts[2] != suffix {
                continue;
            }
            let size = parts[1];
            let st = if self.is_v2() {
                HugetlbStats {
                    usage: read_u64_opt(&d.join(format!("hugetlb.{size}.current")))?.unwrap_or(0),
                    max_usage: 0,
                    failcnt: read_opt(&d.join(format!("hugetlb.{size}.events")))?
                        .map(|t| parse_flat_keyed(&t).get("max").copied().unwrap_or(0))
                        .unwrap_or(0),
                }
            } else {
                HugetlbStats {
                    usage: read_u64_opt(&d.join(format!("hugetlb.{size}.usage_in_bytes")))?
                        .unwrap_or(0),
                    max_usage: read_u64_opt(&d.join(format!("hugetlb.{size}.max_usage_in_bytes")))?
                        .unwrap_or(0),
                    failcnt: read_u64_opt(&d.join(format!("hugetlb.{size}.failcnt")))?.unwrap_or(0),
                }
            };
            out.insert(size.to_string(), st);
        }
        Ok(out)
    }
}
