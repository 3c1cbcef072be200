//! The cgroup of one OCI container: creation, resource limits, process
//! attachment, statistics, freezing, OOM notification and removal, on cgroup v1
//! or v2, whichever the machine offers.
//!
//! * v2 (the guest: the agent mounts cgroup2 at `/sys/fs/cgroup`) is detected by
//!   `/sys/fs/cgroup/cgroup.controllers` existing. The container's cgroup is one
//!   directory; the controllers it needs are enabled in `cgroup.subtree_control`
//!   of every ancestor from the root down.
//! * v1 otherwise: each controller hierarchy is found in `/proc/self/mountinfo`
//!   (co-mounted ones such as `cpu,cpuacct` share a directory) and the cgroup is
//!   one directory in each hierarchy. A controller that is not mounted is
//!   skipped, unless the resources ask for it.
//!
//! # What comes from `cgroups-rs` and what is written by hand
//!
//! `cgroups-rs` 0.3.4 (the crate Kata's agent used) provides here: the v1
//! hierarchy discovery (its mountinfo parser, `hierarchies::V1`), the v1 freezer
//! (`FreezerController`: write `FROZEN`/`THAWED`, read `freezer.state`) and the
//! `pids` controller (`PidController`, both versions). The rest is plain file
//! reads and writes, because the crate is unfit for it:
//! * applying resources: `MemController::apply` drops write errors (a memory
//!   limit the kernel refused would go unnoticed), writes OCI's memory+swap
//!   total unchanged into v2 `memory.swap.max` (swap alone) and swappiness into
//!   `memory.swap.max`, and orders neither `memory.limit_in_bytes` against
//!   `memory.memsw.limit_in_bytes` nor `cpu.cfs_period_us` against the quota;
//! * creating: v1 `Controller::create` panics on a bad path and only logs a
//!   failed `mkdir`, its cpuset set-up runs for the leaf only; v2 creation
//!   enables every controller and ignores `cgroup.subtree_control` errors;
//! * statistics: read errors become 0, v1 blkio reads the CFQ files that modern
//!   kernels lack (no fallback to `blkio.throttle.*`), and the v2 swap statistics
//!   panic (`unwrap`) when `memory.swap.events` is missing (a kernel without
//!   swap) - in the agent, PID 1;
//! * the v2 freezer state is read from `cgroup.freeze` (the request) instead of
//!   `cgroup.events` (whether the cgroup is frozen);
//! * OOM events come on a thread and a std channel, not an async source.
//!
//! Every call here is synchronous; `freeze`, `thaw` and `destroy` may sleep for
//! a bounded time (see [`FREEZE_TIMEOUT`], [`DESTROY_TIMEOUT`]), so call them
//! from `tokio::task::spawn_blocking` in async code.

mod apply;
mod error;
mod files;
mod freezer;
mod kill;
mod layout;
mod oom;
mod resources;
mod stats;
#[cfg(test)]
mod tests;

pub use error::CgroupError;
pub use files::{parse_blkio_v1, parse_flat_keyed, parse_io_stat};
pub use layout::{remove_empty, resolve_path};
pub use oom::OomWatch;
pub use resources::shares_to_weight;

use files::{init_cpuset, procs_in_tree, read_string, write_value};
use layout::{enable_v2_controllers, Layout};
use resources::{check_resources, Need};

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use oci_spec::runtime::LinuxResources;

/// Where cgroup v2 is mounted, and where v1 hierarchies usually are.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Parent of the cgroups whose OCI `cgroupsPath` is relative.
pub const RELATIVE_PARENT: &str = "kata-rs";
/// How long [`ContainerCgroup::freeze`] waits for the cgroup to be frozen.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`ContainerCgroup::destroy`] waits for the killed processes to go.
pub const DESTROY_TIMEOUT: Duration = Duration::from_secs(5);

/// The cgroup of one container (a directory in every v1 hierarchy, or one v2
/// directory).
#[derive(Debug, Clone)]
pub struct ContainerCgroup {
    /// Relative to each hierarchy root, e.g. `kata/abc`.
    rel: PathBuf,
    layout: Layout,
}

impl ContainerCgroup {
    /// Creates (or adopts, if it exists and is empty) the cgroup at `path` (an
    /// OCI cgroupsPath: absolute like "/kata/abc" relative to each hierarchy
    /// root, or relative which is put under "kata-rs/") and applies
    /// `resources`. Invalid values give [`CgroupError::InvalidArgument`] naming
    /// the field, before anything is created. On an error, the directories
    /// this call made are removed again.
    pub fn create(path: &str, resources: Option<&LinuxResources>) -> Result<Self, CgroupError> {
        let rel = resolve_path(path)?;
        Self::create_in(Layout::detect()?, rel, resources)
    }

    fn create_in(
        layout: Layout,
        rel: PathBuf,
        resources: Option<&LinuxResources>,
    ) -> Result<Self, CgroupError> {
        let cg = ContainerCgroup { rel, layout };
        let needs = match resources {
            Some(r) => check_resources(r, cg.is_v2())?,
            None => Vec::new(),
        };
        if !cg.is_v2() {
            cg.ensure_controllers(&needs)?;
        }
        // adopt only an empty cgroup
        for d in cg.paths() {
            if d.exists() {
                let mut pids = BTreeSet::new();
                procs_in_tree(&d, &mut pids)?;
                if !pids.is_empty() {
                    return Err(CgroupError::NotEmpty {
                        path: d,
                        pids: pids.into_iter().collect(),
                    });
                }
            }
        }
        let mut created = Vec::new();
        let res = cg.make_dirs(&mut created).and_then(|()| {
            if cg.is_v2() {
                cg.ensure_controllers(&needs)?;
            }
            match resources {
                Some(r) => cg.apply(r),
                None => Ok(()),
            }
        });
        if let Err(e) = res {
            for d in created.iter().rev() {
                let _ = fs::remove_dir(d);
            }
            return Err(e);
        }
        Ok(cg)
    }

    /// Makes the directories from each hierarchy root down to the cgroup; on
    /// v2 enables the controllers on the way, on v1 sets up cpusets.
    fn make_dirs(&self, created: &mut Vec<PathBuf>) -> Result<(), CgroupError> {
        let cpuset_root = self.layout.v1_mount("cpuset");
        for root in self.layout.roots() {
            let mut dir = root.to_path_buf();
            for comp in self.rel.components() {
                if self.is_v2() {
                    enable_v2_controllers(&dir);
                }
                dir.push(comp);
                match fs::create_dir(&dir) {
                    Ok(()) => created.push(dir.clone()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(source) => return Err(CgroupError::Create { path: dir, source }),
                }
                if Some(root) == cpuset_root {
                    init_cpuset(&dir)?;
                }
            }
        }
        Ok(())
    }

    /// Fails with [`CgroupError::ControllerMissing`] for the first need this
    /// cgroup cannot meet.
    fn ensure_controllers(&self, needs: &[Need]) -> Result<(), CgroupError> {
        let available: Option<(PathBuf, String)> = match &self.layout {
            Layout::V2 { .. } => {
                let p = self.leaf().join("cgroup.controllers");
                let list = read_string(&p)?;
                Some((p, list))
            }
            Layout::V1 { .. } => None,
        };
        for n in needs {
            let detail = match &available {
                Some((p, list)) => {
                    if list.split_whitespace().any(|c| c == n.controller) {
                        continue;
                    }
                    format!(
                        "{} lists only [{}]: the kernel must have it, and the parents' cgroup.subtree_control must enable it (which fails while a parent holds processes)",
                        p.display(),
                        list.trim()
                    )
                }
                None => {
                    if self.layout.v1_mount(&n.controller).is_some() {
                        continue;
                    }
                    "no cgroup v1 hierarchy with it is mounted (see /proc/self/mountinfo): mount it, or leave the field out".to_string()
                }
            };
            return Err(CgroupError::ControllerMissing {
                controller: n.controller.clone(),
                field: n.field.clone(),
                detail,
            });
        }
        Ok(())
    }

    /// Whether the cgroup is a v2 one.
    pub fn is_v2(&self) -> bool {
        self.layout.is_v2()
    }

    /// The cgroup path relative to each hierarchy root, e.g. `kata/abc`.
    pub fn relative_path(&self) -> &Path {
        &self.rel
    }

    /// The cgroup's directories: one per v1 hierarchy, or the v2 one.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.layout
            .roots()
            .into_iter()
            .map(|r| r.join(&self.rel))
            .collect()
    }

    fn leaf(&self) -> PathBuf {
        match &self.layout {
            Layout::V2 { root } => root.join(&self.rel),
            Layout::V1 { mounts } => mounts[0].1.join(&self.rel),
        }
    }

    /// The directory holding `controller`'s files (v2: the cgroup itself).
    fn ctl_dir(&self, controller: &str) -> Option<PathBuf> {
        match &self.layout {
            Layout::V2 { root } => Some(root.join(&self.rel)),
            Layout::V1 { .. } => self.layout.v1_mount(controller).map(|m| m.join(&self.rel)),
        }
    }

    /// Moves process `pid` (all its threads) into the cgroup, in every
    /// hierarchy.
    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        if pid <= 0 {
            return Err(CgroupError::InvalidArgument {
                field: "pid".into(),
                reason: format!("{pid} is not a process id"),
            });
        }
        for d in self.paths() {
            write_value(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Every process of the cgroup and of the cgroups below it (from
    /// `cgroup.procs`; on v1 the union over the hierarchies).
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let dirs: Vec<PathBuf> = self.paths().into_iter().filter(|d| d.exists()).collect();
        if dirs.is_empty() {
            return Err(CgroupError::Gone { path: self.leaf() });
        }
        let mut out = BTreeSet::new();
        for d in dirs {
            procs_in_tree(&d, &mut out)?;
        }
        Ok(out.into_iter().collect())
    }
}
