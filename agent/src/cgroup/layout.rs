//! The cgroup hierarchies of the machine (v1 or v2) and where a container's
//! cgroup goes in them.

use std::fs;
use std::path::{Path, PathBuf};

use cgroups_rs::Controllers;
use tracing::debug;

use super::files::write_value;
use super::{CgroupError, CGROUP_ROOT, RELATIVE_PARENT};

/// The v2 controllers enabled for container cgroups (those of them that the
/// kernel offers).
pub(super) const V2_CONTROLLERS: &[&str] = &[
    "cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc",
];

/// The v1 hierarchies a container cgroup gets a directory in, in the order
/// processes are attached: blkio before memory, for cgroup writeback (as
/// cgroups-rs and runc do).
pub(super) fn v1_controllers() -> [(Controllers, &'static str); 14] {
    [
        (Controllers::BlkIo, "blkio"),
        (Controllers::Mem, "memory"),
        (Controllers::Pids, "pids"),
        (Controllers::CpuSet, "cpuset"),
        (Controllers::CpuAcct, "cpuacct"),
        (Controllers::Cpu, "cpu"),
        (Controllers::Devices, "devices"),
        (Controllers::Freezer, "freezer"),
        (Controllers::NetCls, "net_cls"),
        (Controllers::NetPrio, "net_prio"),
        (Controllers::PerfEvent, "perf_event"),
        (Controllers::HugeTlb, "hugetlb"),
        (Controllers::Rdma, "rdma"),
        (Controllers::Systemd, "name=systemd"),
    ]
}

/// The cgroup hierarchies of this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Layout {
    /// cgroup v1: controller name → mount point, in attach order.
    V1 {
        mounts: Vec<(&'static str, PathBuf)>,
    },
    /// cgroup v2 (unified) mounted at `root`.
    V2 { root: PathBuf },
}

impl Layout {
    /// v2 if `/sys/fs/cgroup/cgroup.controllers` exists, else the v1
    /// hierarchies of `/proc/self/mountinfo`.
    pub(super) fn detect() -> Result<Layout, CgroupError> {
        let root = Path::new(CGROUP_ROOT);
        if root.join("cgroup.controllers").exists() {
            return Ok(Layout::V2 {
                root: root.to_path_buf(),
            });
        }
        let v1 = cgroups_rs::hierarchies::V1::new();
        let mut mounts = Vec::new();
        for (c, name) in v1_controllers() {
            match v1.get_mount_point(c) {
                Some(m) => mounts.push((name, m)),
                None => debug!(
                    controller = name,
                    "cgroup v1 controller not mounted; skipping it"
                ),
            }
        }
        if mounts.is_empty() {
            return Err(CgroupError::NoHierarchy(format!(
                "neither {CGROUP_ROOT}/cgroup.controllers (cgroup v2) nor any cgroup v1 mount in /proc/self/mountinfo; mount cgroup2 at {CGROUP_ROOT}"
            )));
        }
        Ok(Layout::V1 { mounts })
    }

    pub(super) fn is_v2(&self) -> bool {
        matches!(self, Layout::V2 { .. })
    }

    /// The distinct hierarchy roots.
    pub(super) fn roots(&self) -> Vec<&Path> {
        match self {
            Layout::V2 { root } => vec![root.as_path()],
            Layout::V1 { mounts } => {
                let mut out: Vec<&Path> = Vec::new();
                for (_, m) in mounts {
                    if !out.contains(&m.as_path()) {
                        out.push(m);
                    }
                }
                out
            }
        }
    }

    pub(super) fn v1_mount(&self, controller: &str) -> Option<&Path> {
        match self {
            Layout::V1 { mounts } => mounts
                .iter()
                .find(|(c, _)| *c == controller)
                .map(|(_, m)| m.as_path()),
            Layout::V2 { .. } => None,
        }
    }
}

/// Removes the (empty) cgroup `rel` from every hierarchy, e.g. a sandbox's
/// parent cgroup once its containers are gone. Best effort: a cgroup that is
/// not empty stays.
pub fn remove_empty(rel: &str) {
    let Ok(layout) = Layout::detect() else { return };
    for root in layout.roots() {
        let p = root.join(rel.trim_start_matches('/'));
        if let Err(e) = std::fs::remove_dir(&p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                debug!(path = %p.display(), error = %e, "cgroup left in place");
            }
        }
    }
}

/// Turns an OCI `cgroupsPath` into a path relative to each hierarchy root:
/// `/kata/abc` → `kata/abc`, `abc` → `kata-rs/abc`. Empty components are
/// dropped; `.`, `..`, the root itself and systemd's `slice:prefix:name` form
/// are refused.
pub fn resolve_path(path: &str) -> Result<PathBuf, CgroupError> {
    let invalid = |reason: &str| CgroupError::InvalidPath {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    if path.trim().is_empty() {
        return Err(invalid(
            "it is empty; give an absolute path such as /kata/<container-id>, or a name",
        ));
    }
    if path.contains(['\0', '\n']) {
        return Err(invalid("it contains a NUL or newline character"));
    }
    if !path.starts_with('/') && !path.contains('/') && path.matches(':').count() == 2 {
        return Err(invalid(
            "this is systemd's slice:prefix:name form; the agent manages cgroupfs paths only",
        ));
    }
    let mut rel = PathBuf::new();
    if !path.starts_with('/') {
        rel.push(RELATIVE_PARENT);
    }
    for comp in path.split('/') {
        match comp {
            "" => {}
            "." | ".." => return Err(invalid("'.' and '..' components are not allowed")),
            c => rel.push(c),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(invalid(
            "it names the root cgroup, which is not handed to a container",
        ));
    }
    Ok(rel)
}

/// Turns on, in `dir`'s `cgroup.subtree_control`, the container controllers
/// that `dir`'s `cgroup.controllers` offers. A refusal is only logged: it
/// matters when the resources need that controller, which
/// `ensure_controllers` then reports.
pub(super) fn enable_v2_controllers(dir: &Path) {
    let (Ok(avail), Ok(on)) = (
        fs::read_to_string(dir.join("cgroup.controllers")),
        fs::read_to_string(dir.join("cgroup.subtree_control")),
    ) else {
        return;
    };
    let avail: Vec<&str> = avail.split_whitespace().collect();
    let on: Vec<&str> = on.split_whitespace().collect();
    let file = dir.join("cgroup.subtree_control");
    for c in V2_CONTROLLERS {
        if avail.contains(c) && !on.contains(c) {
            if let Err(e) = write_value(&file, &format!("+{c}")) {
                debug!(error = %e, "could not enable a cgroup v2 controller");
            }
        }
    }
}
