//! Killing the processes of a cgroup and removing it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::{debug, warn};

use super::files::*;
use super::{CgroupError, ContainerCgroup, DESTROY_TIMEOUT};

impl ContainerCgroup {
    /// Kills every process left (freeze, SIGKILL all, thaw; on v2 with
    /// `cgroup.kill` when the kernel has it), waits at most
    /// [`DESTROY_TIMEOUT`] for the cgroup to empty and removes its directories
    /// (and child cgroups) in every hierarchy. The parents (e.g. `kata-rs/`)
    /// stay. Idempotent: a cgroup already gone is fine.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        let dirs: Vec<PathBuf> = self.paths().into_iter().filter(|d| d.exists()).collect();
        if dirs.is_empty() {
            return Ok(());
        }
        self.kill_all(DESTROY_TIMEOUT)?;
        for d in dirs {
            remove_tree(&d)?;
        }
        Ok(())
    }

    /// The processes of the cgroup tree, leaving out this process itself.
    fn victims(&self) -> Result<Vec<i32>, CgroupError> {
        let me = i32::try_from(std::process::id()).unwrap_or(-1);
        let mut out = BTreeSet::new();
        for d in self.paths() {
            procs_in_tree(&d, &mut out)?;
        }
        if out.remove(&me) {
            warn!(cgroup = %self.rel.display(), "the agent itself is in the cgroup being destroyed; not killing it");
        }
        Ok(out.into_iter().collect())
    }

    fn sigkill(&self, pids: &[i32]) -> Result<(), CgroupError> {
        for &pid in pids {
            match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                Ok(()) | Err(nix::Error::ESRCH) => {}
                Err(source) => {
                    return Err(CgroupError::Signal {
                        pid,
                        path: self.leaf(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    fn kill_all(&self, timeout: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        let cgroup_kill = self.is_v2() && self.leaf().join("cgroup.kill").exists();
        if cgroup_kill {
            write_value(&self.leaf().join("cgroup.kill"), "1")?;
        } else {
            let pids = self.victims()?;
            if !pids.is_empty() {
                // frozen processes cannot fork while being killed; the
                // SIGKILLs land when they are thawed
                let can_freeze = self.is_v2() || self.ctl_dir("freezer").is_some();
                let frozen = can_freeze
                    && match self.freeze_within(Duration::from_secs(1)) {
                        Ok(()) => true,
                        Err(e) => {
                            debug!(error = %e, "could not freeze before killing; killing anyway");
                            false
                        }
                    };
                let r = self.victims().and_then(|p| self.sigkill(&p));
                if frozen {
                    self.thaw()?;
                }
                r?;
            }
        }
        let mut delay = Duration::from_millis(2);
        loop {
            let left = self.victims()?;
            if left.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(CgroupError::Timeout {
                    what: format!("processes {left:?} to exit after SIGKILL"),
                    path: self.leaf(),
                    waited: start.elapsed(),
                    hint: "a process may be stuck in the kernel (state D in /proc/PID/stat)",
                });
            }
            if cgroup_kill {
                write_value(&self.leaf().join("cgroup.kill"), "1")?;
            } else {
                self.sigkill(&left)?;
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }
}
