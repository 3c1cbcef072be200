//! The one place the agent waits for children.
//!
//! As PID 1 (or, in host mode, as a child subreaper) the agent inherits every
//! container process: container inits are grandchildren whose parent (the
//! set-up helper) exits at once. A single SIGCHLD loop reaps with
//! `waitpid(-1)` and hands each status to whoever registered for that pid; a
//! status that nobody asked for yet is kept (bounded) for a registration that
//! comes a moment later. Nothing else in the agent may call `wait*`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// How many unclaimed statuses are kept (orphans reparented to PID 1 that no
/// one will ever ask about end up here and age out).
const UNCLAIMED_MAX: usize = 1024;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called exit with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
}

impl ExitStatus {
    /// The shell's convention: the exit code, or 128 + the signal number.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(c) => c,
            ExitStatus::Signaled(s) => 128 + s,
        }
    }

    /// The signal that ended it, 0 if it exited.
    pub fn signal(self) -> i32 {
        match self {
            ExitStatus::Exited(_) => 0,
            ExitStatus::Signaled(s) => s,
        }
    }
}

#[derive(Default)]
struct State {
    waiters: HashMap<i32, oneshot::Sender<ExitStatus>>,
    unclaimed: HashMap<i32, ExitStatus>,
    order: VecDeque<i32>,
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

fn state() -> &'static Mutex<State> {
    STATE.get_or_init(Default::default)
}

/// Returns a receiver that gets `pid`'s exit status. Register as soon as the
/// pid is known; a status reaped before that is kept for you.
pub fn watch(pid: i32) -> oneshot::Receiver<ExitStatus> {
    let (tx, rx) = oneshot::channel();
    let mut st = state().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(status) = st.unclaimed.remove(&pid) {
        st.order.retain(|p| *p != pid);
        let _ = tx.send(status);
    } else {
        st.waiters.insert(pid, tx);
    }
    rx
}

/// Forgets a registration (the process will be reaped and dropped).
pub fn forget(pid: i32) {
    let mut st = state().lock().unwrap_or_else(|e| e.into_inner());
    st.waiters.remove(&pid);
    if st.unclaimed.remove(&pid).is_some() {
        st.order.retain(|p| *p != pid);
    }
}

fn deliver(pid: i32, status: ExitStatus) {
    let mut st = state().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(tx) = st.waiters.remove(&pid) {
        let _ = tx.send(status);
        return;
    }
    debug!(pid, ?status, "reaped a process nobody waits for (yet)");
    if st.unclaimed.insert(pid, status).is_none() {
        st.order.push_back(pid);
    }
    while st.order.len() > UNCLAIMED_MAX {
        if let Some(old) = st.order.pop_front() {
            st.unclaimed.remove(&old);
        }
    }
}

/// Reaps every child that has ended, without blocking.
pub fn reap_now() {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => deliver(pid.as_raw(), ExitStatus::Exited(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                deliver(pid.as_raw(), ExitStatus::Signaled(sig as i32))
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Starts the SIGCHLD loop; call once, inside the runtime, before the first
/// child is made. Outside PID 1 it makes the agent a child subreaper so that
/// container processes are re-parented to it.
pub fn start(pid1: bool) {
    if !pid1 {
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if rc != 0 {
            warn!(
                error = %std::io::Error::last_os_error(),
                "cannot become a child subreaper: container exits may be missed"
            );
        }
    }
    let mut sig = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot watch SIGCHLD: processes will not be reaped");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            reap_now();
            if sig.recv().await.is_none() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(ExitStatus::Exited(3).code(), 3);
        assert_eq!(ExitStatus::Signaled(9).code(), 137);
        assert_eq!(ExitStatus::Signaled(9).signal(), 9);
        assert_eq!(ExitStatus::Exited(0).signal(), 0);
    }

    #[test]
    fn early_status_is_kept_for_a_late_watcher() {
        deliver(999_999, ExitStatus::Exited(7));
        let mut rx = watch(999_999);
        assert_eq!(rx.try_recv().unwrap(), ExitStatus::Exited(7));
        // delivered once only
        let mut rx = watch(999_999);
        assert!(rx.try_recv().is_err());
        forget(999_999);
    }

    #[test]
    fn unclaimed_is_bounded() {
        for p in 0..(UNCLAIMED_MAX as i32 + 10) {
            deliver(2_000_000 + p, ExitStatus::Exited(0));
        }
        let st = state().lock().unwrap();
        assert!(st.unclaimed.len() <= UNCLAIMED_MAX);
        assert_eq!(st.unclaimed.len(), st.order.len());
    }
}
