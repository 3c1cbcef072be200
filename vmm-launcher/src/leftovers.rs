//! What a launcher leaves on the host, and removing it after a launcher that
//! died: the state file `launcher.json` (pids, cgroups, the uid lock) and
//! the files of the sandbox directory. [`cleanup`] is the one way to undo a
//! VM: the launcher's `cleanup` subcommand, a launcher starting over the
//! leftovers of a previous one, and the shim all call it (the shim through
//! [`crate::client::cleanup`]).

use std::path::PathBuf;

use kata_proto::paths::{self, ports, SandboxPaths};
use kata_proto::process::{kill_if_same, runs_program, start_time};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{cgroup, console, files, uids};

/// The launcher's program name, as its command line shows it.
const PROGRAM: &str = "kata-vmm-launcher";

/// What the launcher writes to `launcher.json`, so `cleanup` can undo a VM whose
/// launcher died.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct State {
    /// The launcher's pid.
    pub(crate) launcher_pid: u32,
    /// The hypervisor's pid, 0 before it runs.
    pub(crate) hypervisor_pid: u32,
    /// The hypervisor's start time (see [`kata_proto::process::start_time`]),
    /// to tell a reused pid from ours.
    pub(crate) hypervisor_start: u64,
    /// cgroup directories the launcher created.
    pub(crate) cgroups: Vec<PathBuf>,
    /// The lock file of the hypervisor's uid (see [`crate::uids`]), if one
    /// was allocated.
    #[serde(default)]
    pub(crate) uid_lock: Option<PathBuf>,
}

impl State {
    /// Reads the state file of `paths`, if any.
    pub(crate) fn load(paths: &SandboxPaths) -> Option<State> {
        let text = std::fs::read_to_string(paths.launcher_state()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes the state file (a rename: a reader sees the old or the new).
    pub(crate) fn save(&self, paths: &SandboxPaths) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = paths.dir.join(".launcher.json.tmp");
        let mut f = files::private_file(&tmp, false, true)?;
        f.write_all(&serde_json::to_vec(self).unwrap_or_default())?;
        drop(f);
        std::fs::rename(tmp, paths.launcher_state())
    }
}

/// What [`cleanup`] does about a launcher of the sandbox that still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveLauncher {
    /// Refuse: the launcher is in charge (use its Shutdown call). The
    /// launcher's `cleanup` subcommand.
    Refuse,
    /// SIGKILL it first: its owner (a shim) is dead.
    Kill,
}

/// Why [`cleanup`] did nothing.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// The sandbox's launcher still runs and [`LiveLauncher::Refuse`] was asked.
    #[error("the launcher (pid {0}) of this sandbox still runs: use its Shutdown call")]
    LauncherRuns(u32),
}

/// Undoes what a dead launcher left: kills its hypervisor (if the pid is still
/// ours), removes its cgroups, frees the hypervisor's uid and removes its
/// files. A launcher that still runs is refused or killed, as `live` says.
pub fn cleanup(p: &SandboxPaths, live: LiveLauncher) -> Result<(), CleanupError> {
    if let Some(st) = State::load(p) {
        // the state file records no start time of the launcher: a live pid
        // is the launcher only if it still runs kata-vmm-launcher
        let pid = st.launcher_pid;
        if pid != std::process::id() && runs_program(pid, PROGRAM) {
            if let Some(start) = start_time(pid) {
                match live {
                    LiveLauncher::Refuse => return Err(CleanupError::LauncherRuns(pid)),
                    LiveLauncher::Kill => {
                        info!(pid, "killing the launcher of a dead owner");
                        kill_if_same(pid, start);
                    }
                }
            }
        }
        if st.hypervisor_pid != 0 && start_time(st.hypervisor_pid) == Some(st.hypervisor_start) {
            info!(
                pid = st.hypervisor_pid,
                "killing the hypervisor of a dead launcher"
            );
            kill_if_same(st.hypervisor_pid, st.hypervisor_start);
        }
        for (d, e) in cgroup::remove(&st.cgroups) {
            warn!("cannot remove cgroup {}: {e}", d.display());
        }
        if let Some(l) = &st.uid_lock {
            // only a file of the lock directory, and only if nobody holds it
            if l.parent() == Some(uids::default_lock_dir().as_path()) {
                uids::release_stale(l);
            }
        }
    }
    remove_sandbox_files(p);
    Ok(())
}

/// Removes what a launcher puts in the sandbox directory, then the directory if
/// it is empty (the shim may keep files of its own there).
pub(crate) fn remove_sandbox_files(p: &SandboxPaths) {
    let _ = std::fs::remove_dir_all(p.vm_dir());
    let _ = std::fs::remove_dir(p.jail_root());
    for f in [
        p.vsock_uds(),
        paths::hybrid_listener_path(&p.vsock_uds(), ports::READY),
        p.launcher_socket(),
        p.launcher_state(),
        p.console_log(),
        console::rotated_path(&p.console_log()),
        p.dir.join(".launcher.json.tmp"),
    ] {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_dir(&p.dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let p = SandboxPaths::in_dir(d.path());
        let s = State {
            launcher_pid: 1,
            hypervisor_pid: 2,
            hypervisor_start: 3,
            cgroups: vec!["/x".into()],
            uid_lock: Some("/run/kata/.uids/1879048192".into()),
        };
        s.save(&p).unwrap();
        assert_eq!(State::load(&p), Some(s));
    }

    #[test]
    fn cleanup_refuses_a_live_launcher_and_removes_the_files() {
        let d = tempfile::tempdir().unwrap();
        let p = SandboxPaths::in_dir(d.path().join("sb"));
        std::fs::create_dir(&p.dir).unwrap();
        std::fs::write(p.console_log(), "x").unwrap();
        // a process whose command line names the launcher: refused
        use std::os::unix::process::CommandExt;
        let mut live = std::process::Command::new("sleep")
            .arg0(PROGRAM)
            .arg("30")
            .spawn()
            .unwrap();
        // until the child has exec'd, its command line is the test binary's
        for _ in 0..200 {
            if runs_program(live.id(), PROGRAM) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let st = State {
            launcher_pid: live.id(),
            ..Default::default()
        };
        st.save(&p).unwrap();
        let e = cleanup(&p, LiveLauncher::Refuse).unwrap_err();
        assert!(matches!(e, CleanupError::LauncherRuns(pid) if pid == live.id()));
        assert!(p.console_log().exists());
        // its owner is dead: killed, and the files go
        cleanup(&p, LiveLauncher::Kill).unwrap();
        assert!(live.try_wait().unwrap().is_some());
        assert!(!p.dir.exists());
    }
}
