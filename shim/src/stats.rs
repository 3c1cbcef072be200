//! The agent's container stats as the cgroup v1 `Metrics` containerd (and
//! `ctr task metrics`) decode.

use containerd_shim::protos::cgroups::metrics::{
    BlkIOEntry, BlkIOStat, CPUStat, CPUUsage, HugetlbStat, MemoryEntry, MemoryStat, Metrics,
    NetworkStat, PidsStat, Throttle,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use kata_proto::agent::{MemoryData, StatsContainerResponse};

fn entry(d: Option<&MemoryData>) -> MessageField<MemoryEntry> {
    let d = d.cloned().unwrap_or_default();
    MessageField::some(MemoryEntry {
        limit: d.limit,
        usage: d.usage,
        max: d.max_usage,
        failcnt: d.failcnt,
        ..Default::default()
    })
}

/// Converts the agent's answer.
pub fn metrics(r: &StatsContainerResponse) -> Metrics {
    let mut m = Metrics::new();
    if let Some(cg) = &r.cgroup_stats {
        if let Some(cpu) = &cg.cpu_stats {
            let u = cpu.cpu_usage.clone().unwrap_or_default();
            let t = cpu.throttling_data.unwrap_or_default();
            m.cpu = MessageField::some(CPUStat {
                usage: MessageField::some(CPUUsage {
                    total: u.total_usage,
                    kernel: u.usage_in_kernelmode,
                    user: u.usage_in_usermode,
                    per_cpu: u.percpu_usage,
                    ..Default::default()
                }),
                throttling: MessageField::some(Throttle {
                    periods: t.periods,
                    throttled_periods: t.throttled_periods,
                    throttled_time: t.throttled_time,
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        if let Some(mem) = &cg.memory_stats {
            let get = |k: &str| mem.stats.get(k).copied().unwrap_or(0);
            m.memory = MessageField::some(MemoryStat {
                cache: mem.cache,
                rss: get("rss").max(get("anon")),
                mapped_file: get("mapped_file").max(get("file_mapped")),
                inactive_file: get("inactive_file"),
                active_file: get("active_file"),
                total_inactive_file: get("total_inactive_file").max(get("inactive_file")),
                usage: entry(mem.usage.as_ref()),
                swap: entry(mem.swap_usage.as_ref()),
                kernel: entry(mem.kernel_usage.as_ref()),
                ..Default::default()
            });
        }
        if let Some(p) = &cg.pids_stats {
            m.pids = MessageField::some(PidsStat {
                current: p.current,
                limit: p.limit,
                ..Default::default()
            });
        }
        if let Some(b) = &cg.blkio_stats {
            let conv = |v: &Vec<kata_proto::agent::BlkioStatsEntry>| {
                v.iter()
                    .map(|e| BlkIOEntry {
                        op: e.op.clone(),
                        major: e.major,
                        minor: e.minor,
                        value: e.value,
                        ..Default::default()
                    })
                    .collect()
            };
            m.blkio = MessageField::some(BlkIOStat {
                io_service_bytes_recursive: conv(&b.io_service_bytes_recursive),
                io_serviced_recursive: conv(&b.io_serviced_recursive),
                ..Default::default()
            });
        }
        m.hugetlb = cg
            .hugetlb_stats
            .iter()
            .map(|(size, h)| HugetlbStat {
                usage: h.usage,
                max: h.max_usage,
                failcnt: h.failcnt,
                pagesize: size.clone(),
                ..Default::default()
            })
            .collect();
    }
    m.network = r
        .network_stats
        .iter()
        .map(|n| NetworkStat {
            name: n.name.clone(),
            rx_bytes: n.rx_bytes,
            rx_packets: n.rx_packets,
            rx_errors: n.rx_errors,
            rx_dropped: n.rx_dropped,
            tx_bytes: n.tx_bytes,
            tx_packets: n.tx_packets,
            tx_errors: n.tx_errors,
            tx_dropped: n.tx_dropped,
            ..Default::default()
        })
        .collect();
    m
}

/// The metrics packed as containerd expects (type `io.containerd.cgroups.v1.Metrics`).
pub fn to_any(r: &StatsContainerResponse) -> Result<Any, String> {
    let m = metrics(r);
    Ok(Any {
        type_url: "io.containerd.cgroups.v1.Metrics".into(),
        value: m.write_to_bytes().map_err(|e| e.to_string())?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kata_proto::agent::{
        CgroupStats, CpuStats, CpuUsage, MemoryStats, NetworkStats, PidsStats,
    };

    #[test]
    fn agent_stats_become_containerd_metrics() {
        let r = StatsContainerResponse {
            cgroup_stats: Some(CgroupStats {
                cpu_stats: Some(CpuStats {
                    cpu_usage: Some(CpuUsage {
                        total_usage: 42,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                memory_stats: Some(MemoryStats {
                    usage: Some(MemoryData {
                        usage: 1 << 20,
                        limit: 1 << 30,
                        ..Default::default()
                    }),
                    stats: [("anon".to_string(), 7u64)].into_iter().collect(),
                    ..Default::default()
                }),
                pids_stats: Some(PidsStats {
                    current: 3,
                    limit: 10,
                }),
                ..Default::default()
            }),
            network_stats: vec![NetworkStats {
                name: "eth0".into(),
                rx_bytes: 5,
                ..Default::default()
            }],
        };
        let any = to_any(&r).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v1.Metrics");
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.cpu.usage.total, 42);
        assert_eq!(m.memory.usage.usage, 1 << 20);
        assert_eq!(m.memory.usage.limit, 1 << 30);
        assert_eq!(m.memory.rss, 7);
        assert_eq!((m.pids.current, m.pids.limit), (3, 10));
        assert_eq!(m.network[0].name, "eth0");
        assert_eq!(m.network[0].rx_bytes, 5);
        // an empty answer (a hostile or broken guest) still converts
        assert!(to_any(&StatsContainerResponse::default()).is_ok());
    }
}
