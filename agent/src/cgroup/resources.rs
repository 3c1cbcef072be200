//! Checking OCI `linux.resources` before anything is written, and the
//! conversions between v1 and v2 values.

use oci_spec::runtime::LinuxResources;
use tracing::debug;

use super::CgroupError;

/// cgroup v1 `cpu.shares` → v2 `cpu.weight`, as runc and crun convert:
/// `1 + ((shares - 2) * 9999) / 262142`, shares clamped to the kernel's
/// 2..=262144, so 2 → 1, 1024 → 39, 262144 → 10000.
pub fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(2, 262_144);
    1 + ((s - 2) * 9999) / 262_142
}

/// OCI blkio weight (10..=1000) → v2 `io.weight` (1..=10000), as runc does.
pub(super) fn blkio_weight_to_io_weight(w: u16) -> u64 {
    let w = u64::from(w.clamp(10, 1000));
    1 + ((w - 10) * 9999) / 990
}

/// The `cpu.max` line for an OCI quota/period; `current` is the file's present
/// content, whose quota is kept when only the period changes. `None`: nothing
/// to write. Quota 0 and period 0 mean "unset", a negative quota "no limit".
pub(super) fn cpu_max_line(
    quota: Option<i64>,
    period: Option<u64>,
    current: &str,
) -> Option<String> {
    let quota = quota.filter(|&q| q != 0);
    let period = period.filter(|&p| p != 0);
    let q = match quota {
        Some(q) if q < 0 => "max".to_string(),
        Some(q) => q.to_string(),
        None => {
            let p = period?;
            let cur = current.split_whitespace().next().unwrap_or("max");
            return Some(format!("{cur} {p}"));
        }
    };
    Some(match period {
        Some(p) => format!("{q} {p}"),
        None => q,
    })
}

/// v2 `memory.swap.max` for OCI's memory+swap `swap` and memory `limit`
/// (-1 → `max`; else swap alone, `swap - limit`).
pub(super) fn swap_v2_value(swap: i64, limit: Option<i64>) -> Result<String, CgroupError> {
    if swap < 0 {
        return Ok("max".into());
    }
    match limit {
        Some(l) if l > 0 => {
            if swap < l {
                return Err(CgroupError::InvalidArgument {
                    field: "memory.swap".into(),
                    reason: format!(
                        "{swap} is below memory.limit {l}; memory.swap is the memory+swap total and must be >= memory.limit"
                    ),
                });
            }
            Ok((swap - l).to_string())
        }
        _ => Err(CgroupError::InvalidArgument {
            field: "memory.swap".into(),
            reason: "a memory+swap limit needs a memory limit (memory.limit) on cgroup v2".into(),
        }),
    }
}

/// Whether `s` looks like a cpuset list such as `0-3,6`.
pub(super) fn valid_cpu_list(s: &str) -> bool {
    !s.is_empty()
        && s.split(',').all(|part| {
            let mut it = part.splitn(2, '-');
            let ok = |x: Option<&str>| {
                x.is_some_and(|x| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit()))
            };
            match (it.next(), it.next()) {
                (a, None) => ok(a),
                (a, b) => ok(a) && ok(b),
            }
        })
}

/// Whether `s` is a hugetlb page size as the cgroup files spell it: `2MB`,
/// `1GB`, `64KB`.
pub(super) fn valid_page_size(s: &str) -> bool {
    let Some(num) = ["KB", "MB", "GB", "TB"]
        .iter()
        .find_map(|u| s.strip_suffix(u))
    else {
        return false;
    };
    !num.is_empty() && !num.starts_with('0') && num.bytes().all(|b| b.is_ascii_digit())
}

/// One controller the resources need, and the field asking for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Need {
    pub(super) controller: String,
    pub(super) field: String,
}

/// Checks every value of `r` and returns the controllers it needs. Zero means
/// "unset" for memory, CPU shares/quota/period, blkio weights and the pids
/// limit, as in runc.
pub(super) fn check_resources(r: &LinuxResources, v2: bool) -> Result<Vec<Need>, CgroupError> {
    fn inval<T>(field: &str, reason: String) -> Result<T, CgroupError> {
        Err(CgroupError::InvalidArgument {
            field: field.to_string(),
            reason,
        })
    }
    let mut needs = Vec::new();
    let mut need = |controller: &str, field: &str| {
        needs.push(Need {
            controller: controller.into(),
            field: field.into(),
        })
    };
    if let Some(m) = r.memory() {
        for (field, v) in [
            ("memory.limit", m.limit()),
            ("memory.swap", m.swap()),
            ("memory.reservation", m.reservation()),
            ("memory.kernel", m.kernel()),
            ("memory.kernelTCP", m.kernel_tcp()),
        ] {
            match v {
                Some(v) if v < -1 => {
                    return inval(
                        field,
                        format!("{v} is negative; give a byte count, or -1 for no limit"),
                    )
                }
                Some(0) | None => {}
                Some(_) => need("memory", field),
            }
        }
        if let (Some(l), Some(s)) = (m.limit(), m.swap()) {
            if l > 0 && s > 0 && s < l {
                return inval(
                    "memory.swap",
                    format!("{s} is below memory.limit {l}; memory.swap is the memory+swap total and must be >= memory.limit"),
                );
            }
            if v2 && l == -1 && s > 0 {
                return inval(
                    "memory.swap",
                    "a memory+swap limit with an unlimited memory.limit cannot be expressed on cgroup v2".into(),
                );
            }
        }
        if let Some(s) = m.swappiness() {
            if s > 100 {
                return inval("memory.swappiness", format!("{s} is above 100"));
            }
            need("memory", "memory.swappiness");
        }
        if m.disable_oom_killer().is_some() {
            need("memory", "memory.disableOOMKiller");
        }
    }
    if let Some(c) = r.cpu() {
        if c.shares().is_some_and(|s| s != 0) {
            need("cpu", "cpu.shares");
        }
        match c.quota() {
            Some(q) if q < -1 => {
                return inval(
                    "cpu.quota",
                    format!("{q}: give microseconds, or -1 for no limit"),
                )
            }
            Some(q) if q > 0 && q < 1000 => {
                return inval(
                    "cpu.quota",
                    format!("{q} µs is below the kernel's minimum of 1000 µs (1 ms)"),
                )
            }
            Some(0) | None => {}
            Some(_) => need("cpu", "cpu.quota"),
        }
        match c.period() {
            Some(p) if p != 0 && !(1000..=1_000_000).contains(&p) => {
                return inval(
                    "cpu.period",
                    format!("{p} µs is outside 1000..=1000000 µs (1 ms to 1 s)"),
                )
            }
            Some(0) | None => {}
            Some(_) => need("cpu", "cpu.period"),
        }
        if c.burst().is_some_and(|b| b != 0) {
            need("cpu", "cpu.burst");
        }
        match c.idle() {
            Some(i) if i != 0 && i != 1 => {
                return inval("cpu.idle", format!("{i}: only 0 and 1 are accepted"))
            }
            Some(_) => need("cpu", "cpu.idle"),
            None => {}
        }
        for (field, set) in [
            (
                "cpu.realtimeRuntime",
                c.realtime_runtime().is_some_and(|v| v != 0),
            ),
            (
                "cpu.realtimePeriod",
                c.realtime_period().is_some_and(|v| v != 0),
            ),
        ] {
            if set {
                if v2 {
                    return inval(
                        field,
                        "real-time CPU limits are not supported on cgroup v2".into(),
                    );
                }
                need("cpu", field);
            }
        }
        if c.realtime_runtime().is_some_and(|v| v < -1) {
            return inval(
                "cpu.realtimeRuntime",
                "give microseconds, or -1 for no limit".into(),
            );
        }
        for (field, v) in [("cpu.cpus", c.cpus()), ("cpu.mems", c.mems())] {
            if let Some(s) = v.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
                if !valid_cpu_list(s) {
                    return inval(field, format!("{s:?} is not a list such as \"0-3,6\""));
                }
                need("cpuset", field);
            }
        }
    }
    if let Some(p) = r.pids() {
        if p.limit() != 0 {
            need("pids", "pids.limit");
        }
    }
    if let Some(b) = r.block_io() {
        let ctl = if v2 { "io" } else { "blkio" };
        let weight_ok = |field: &str, w: Option<u16>| -> Result<bool, CgroupError> {
            match w {
                Some(0) | None => Ok(false),
                Some(w) if !(10..=1000).contains(&w) => {
                    inval(field, format!("{w} is outside 10..=1000"))
                }
                Some(_) => Ok(true),
            }
        };
        if weight_ok("blockIO.weight", b.weight())? {
            need(ctl, "blockIO.weight");
        }
        if weight_ok("blockIO.leafWeight", b.leaf_weight())? {
            need(ctl, "blockIO.leafWeight");
        }
        for d in b.weight_device().iter().flatten() {
            if d.major() < 0 || d.minor() < 0 {
                return inval(
                    "blockIO.weightDevice",
                    format!("device {}:{} is negative", d.major(), d.minor()),
                );
            }
            weight_ok("blockIO.weightDevice.weight", d.weight())?;
            weight_ok("blockIO.weightDevice.leafWeight", d.leaf_weight())?;
            need(ctl, "blockIO.weightDevice");
        }
        for (field, list) in [
            (
                "blockIO.throttleReadBpsDevice",
                b.throttle_read_bps_device(),
            ),
            (
                "blockIO.throttleWriteBpsDevice",
                b.throttle_write_bps_device(),
            ),
            (
                "blockIO.throttleReadIOPSDevice",
                b.throttle_read_iops_device(),
            ),
            (
                "blockIO.throttleWriteIOPSDevice",
                b.throttle_write_iops_device(),
            ),
        ] {
            for d in list.iter().flatten() {
                if d.major() < 0 || d.minor() < 0 {
                    return inval(
                        field,
                        format!("device {}:{} is negative", d.major(), d.minor()),
                    );
                }
                need(ctl, field);
            }
        }
    }
    for h in r.hugepage_limits().iter().flatten() {
        if !valid_page_size(h.page_size()) {
            return inval(
                "hugepageLimits.pageSize",
                format!(
                    "{:?} is not a size such as \"2MB\" or \"1GB\"",
                    h.page_size()
                ),
            );
        }
        if h.limit() < -1 {
            return inval("hugepageLimits.limit", format!("{} is negative", h.limit()));
        }
        need("hugetlb", "hugepageLimits");
    }
    if let Some(n) = r.network() {
        if !v2 {
            if n.class_id().is_some() {
                need("net_cls", "network.classID");
            }
            if n.priorities().as_ref().is_some_and(|p| !p.is_empty()) {
                need("net_prio", "network.priorities");
            }
        }
    }
    if r.rdma().as_ref().is_some_and(|m| !m.is_empty()) {
        need("rdma", "rdma");
    }
    if let Some(u) = r.unified().as_ref().filter(|u| !u.is_empty()) {
        if !v2 {
            return inval(
                "unified",
                "needs cgroup v2, and this machine uses cgroup v1".into(),
            );
        }
        for (k, v) in u {
            let ctl = k.split('.').next().unwrap_or("");
            if k.contains('/') || k.starts_with('.') || !k.contains('.') || ctl.is_empty() {
                return inval(
                    "unified",
                    format!("{k:?} is not a cgroup file name such as \"memory.high\""),
                );
            }
            if matches!(
                k.as_str(),
                "cgroup.procs"
                    | "cgroup.threads"
                    | "cgroup.subtree_control"
                    | "cgroup.kill"
                    | "cgroup.freeze"
            ) {
                return inval("unified", format!("{k:?} is managed by the agent itself"));
            }
            if v.contains('\0') {
                return inval("unified", format!("the value of {k:?} contains a NUL"));
            }
            if ctl != "cgroup" {
                needs.push(Need {
                    controller: ctl.to_string(),
                    field: format!("unified[{k}]"),
                });
            }
        }
    }
    if r.devices().as_ref().is_some_and(|d| !d.is_empty()) {
        debug!("linux.resources.devices is not applied by the cgroup module (device access is the VM's)");
    }
    Ok(needs)
}
