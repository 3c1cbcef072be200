//! Freezing and thawing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cgroups_rs::freezer::{FreezerController, FreezerState};

use super::files::*;
use super::layout::Layout;
use super::{CgroupError, ContainerCgroup, FREEZE_TIMEOUT};

impl ContainerCgroup {
    /// Freezes every process of the cgroup and waits (at most
    /// [`FREEZE_TIMEOUT`]) until the kernel reports the cgroup frozen; on a
    /// timeout it thaws it again and fails.
    pub fn freeze(&self) -> Result<(), CgroupError> {
        self.freeze_within(FREEZE_TIMEOUT)
    }

    pub(super) fn freeze_within(&self, timeout: Duration) -> Result<(), CgroupError> {
        self.set_frozen(true, timeout)
    }

    /// Asks for the frozen (or thawed) state and waits, bounded, until the
    /// kernel reports it. A freeze that times out is undone.
    fn set_frozen(&self, frozen: bool, timeout: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(1);
        let (path, what): (PathBuf, String);
        // One step: (re)request the state; whether the kernel reached it.
        let mut step: Box<dyn FnMut() -> Result<bool, CgroupError> + '_> = match &self.layout {
            Layout::V2 { .. } => {
                let leaf = self.leaf();
                write_value(&leaf.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
                what = format!("cgroup.events to report frozen {}", u8::from(frozen));
                path = leaf;
                Box::new(move || Ok(self.v2_event("frozen")? == u64::from(frozen)))
            }
            Layout::V1 { .. } => {
                let (fc, dir) = self.v1_freezer(if frozen { "freeze" } else { "thaw" })?;
                what = format!(
                    "freezer.state to become {}",
                    if frozen { "FROZEN" } else { "THAWED" }
                );
                path = dir.clone();
                let err = move |action| {
                    let path = dir.clone();
                    move |source| CgroupError::Controller {
                        action,
                        path,
                        source,
                    }
                };
                Box::new(move || {
                    // writing FROZEN again moves on a freeze that raced with forks
                    if frozen {
                        fc.freeze().map_err(err("freeze (write freezer.state)"))?;
                    } else {
                        fc.thaw().map_err(err("thaw (write freezer.state)"))?;
                    }
                    let state = fc.state().map_err(err("read freezer.state"))?;
                    Ok(matches!(
                        (state, frozen),
                        (FreezerState::Frozen, true) | (FreezerState::Thawed, false)
                    ))
                })
            }
        };
        loop {
            if step()? {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                drop(step);
                let hint = if frozen {
                    let _ = self.set_frozen(false, Duration::ZERO);
                    "a process may be stuck in the kernel (state D); the cgroup was thawed again"
                } else {
                    "a parent cgroup may be frozen"
                };
                return Err(CgroupError::Timeout {
                    what,
                    path,
                    waited: start.elapsed(),
                    hint,
                });
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// Thaws the cgroup and waits (bounded) until the kernel reports it so.
    pub fn thaw(&self) -> Result<(), CgroupError> {
        self.set_frozen(false, FREEZE_TIMEOUT)
    }

    /// Whether the kernel reports the cgroup frozen (v1 `freezer.state` is
    /// `FROZEN`, v2 `cgroup.events` has `frozen 1`).
    pub fn is_frozen(&self) -> Result<bool, CgroupError> {
        match &self.layout {
            Layout::V2 { .. } => Ok(self.v2_event("frozen")? == 1),
            Layout::V1 { .. } => {
                let (fc, dir) = self.v1_freezer("read the freezer state")?;
                let st = fc.state().map_err(|source| CgroupError::Controller {
                    action: "read freezer.state",
                    path: dir,
                    source,
                })?;
                Ok(matches!(st, FreezerState::Frozen))
            }
        }
    }

    fn v1_freezer(&self, op: &str) -> Result<(FreezerController, PathBuf), CgroupError> {
        let dir = self
            .ctl_dir("freezer")
            .ok_or_else(|| CgroupError::ControllerMissing {
                controller: "freezer".into(),
                field: op.into(),
                detail: "no cgroup v1 freezer hierarchy is mounted (see /proc/self/mountinfo)"
                    .into(),
            })?;
        if !dir.exists() {
            return Err(CgroupError::Gone { path: dir });
        }
        Ok((FreezerController::new(dir.clone(), false), dir))
    }

    /// A field of the v2 `cgroup.events`.
    fn v2_event(&self, key: &str) -> Result<u64, CgroupError> {
        let p = self.leaf().join("cgroup.events");
        let ev = parse_flat_keyed(&read_string(&p)?);
        ev.get(key).copied().ok_or_else(|| CgroupError::Parse {
            path: p,
            reason: format!("no {key:?} field (cgroup.freeze needs Linux 5.2 or later)"),
        })
    }
}
