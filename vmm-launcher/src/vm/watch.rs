//! The two watchers of a running VM: the agent's readiness announcement
//! (guest port 1028) and the hypervisor's exit (with QMP's SHUTDOWN reason).
//! Each publishes on a watch channel the VM's owner task listens to.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kata_proto::launcher::VmExit;
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::console::ConsoleStats;
use crate::qmp::Qmp;

/// Readiness connections read at once (twice what the vsock backend lets
/// the guest open); past it new ones are closed unread.
const READY_PENDING_MAX: usize = 2 * crate::vsock::MAX_GUEST_CONNS;
/// How long a readiness connection may take to say `READY`.
const READY_LINE_DEADLINE: Duration = Duration::from_secs(2);
/// How long the exit report waits for the console's last bytes.
pub(super) const CONSOLE_DRAIN_WAIT: Duration = Duration::from_secs(2);

/// Accepts the agent's readiness connection(s) on `<uds>_1028` and keeps
/// the time of the first that says `READY`. Every connection is read on
/// its own task, for at most [`READY_LINE_DEADLINE`], so connections that
/// never speak delay nobody; at most [`READY_PENDING_MAX`] are read at once
/// (the vsock backend's cap on guest connections keeps the guest below it),
/// past it new ones are closed unread and counted. Once ready, new
/// connections are closed unread.
pub(super) async fn watch_ready(
    l: tokio::net::UnixListener,
    ready: watch::Sender<Option<Instant>>,
) {
    let pending = Arc::new(tokio::sync::Semaphore::new(READY_PENDING_MAX));
    let mut refused = 0u64;
    loop {
        let Ok((s, _)) = l.accept().await else {
            return;
        };
        if ready.borrow().is_some() {
            continue;
        }
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            drop(s);
            refused += 1;
            if refused.is_power_of_two() {
                warn!(
                    refused,
                    "readiness port: {READY_PENDING_MAX} connections are waiting to speak; closing new ones"
                );
            }
            continue;
        };
        let ready = ready.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let at = Instant::now();
            let mut line = String::new();
            let mut r = tokio::io::BufReader::new(s);
            let read =
                tokio::time::timeout(READY_LINE_DEADLINE, (&mut r).take(256).read_line(&mut line))
                    .await;
            if matches!(read, Ok(Ok(_))) && line.starts_with("READY") {
                info!(announce = %line.trim().escape_debug(), "agent announced itself");
                ready.send_if_modified(|v| {
                    let first = v.is_none();
                    if first {
                        *v = Some(at);
                    }
                    first
                });
            } else {
                debug!("ignoring a connection on the readiness port that did not say READY");
            }
        });
    }
}

/// Waits for QEMU to exit and publishes why.
pub(super) async fn watch_exit(
    mut child: tokio::process::Child,
    qmp: Arc<Qmp>,
    exit: watch::Sender<Option<VmExit>>,
    stop_requested: Arc<AtomicBool>,
    console_done: tokio::sync::oneshot::Receiver<ConsoleStats>,
) {
    let mut events = qmp.events();
    let shutdown_reason = Arc::new(std::sync::Mutex::new(None::<String>));
    let sr = shutdown_reason.clone();
    let collector = tokio::spawn(async move {
        while let Ok(ev) = events.recv().await {
            if ev.name == "SHUTDOWN" {
                let reason = ev.data["reason"].as_str().unwrap_or("").to_string();
                *sr.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
            }
        }
    });
    let status = child.wait().await;
    // the console's last bytes are on disk before anyone hears of the exit
    let _ = tokio::time::timeout(CONSOLE_DRAIN_WAIT, console_done).await;
    // give the reader a moment to deliver the SHUTDOWN event that preceded the exit
    tokio::time::sleep(Duration::from_millis(20)).await;
    collector.abort();
    let reason = shutdown_reason
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut e = VmExit::default();
    if let Ok(st) = &status {
        use std::os::unix::process::ExitStatusExt;
        e.exit_code = st.code().unwrap_or(-1);
        e.signal = st.signal().unwrap_or(0);
    }
    e.reason = match reason.as_deref() {
        Some("guest-shutdown") => "poweroff",
        Some("guest-reset") | Some("guest-panic") => "guest-reset",
        _ if stop_requested.load(Ordering::SeqCst) => "stopped",
        _ if e.signal != 0 => "killed",
        _ => "crashed",
    }
    .into();
    info!(
        reason = e.reason,
        code = e.exit_code,
        signal = e.signal,
        "hypervisor exited"
    );
    let _ = exit.send(Some(e));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hostile guest opens many connections to the readiness port that
    /// never speak: the agent's READY behind them is still seen at once
    /// (one connection at a time, 2 s each, would take minutes), and after
    /// it new connections are closed unread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readiness_port_is_not_blocked_by_silent_connections() {
        use tokio::io::AsyncWriteExt;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("vsock.sock_1028");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        let (tx, mut rx) = watch::channel(None);
        tokio::spawn(watch_ready(l, tx));
        let mut silent = vec![];
        for _ in 0..300 {
            silent.push(tokio::net::UnixStream::connect(&path).await.unwrap());
        }
        let t0 = Instant::now();
        let mut agent = tokio::net::UnixStream::connect(&path).await.unwrap();
        agent.write_all(b"READY kata-agent test\n").await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
            .await
            .expect("READY seen despite 300 silent connections")
            .unwrap();
        let took = t0.elapsed();
        assert!(took < READY_LINE_DEADLINE, "{took:?}");
        // a garbage connection after READY changes nothing and is closed
        let mut late = tokio::net::UnixStream::connect(&path).await.unwrap();
        let _ = late.write_all(b"READY again\n").await;
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), late.read(&mut b))
            .await
            .expect("closed unread")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(rx.borrow().unwrap() <= t0 + took);
        drop(silent);
    }
}
