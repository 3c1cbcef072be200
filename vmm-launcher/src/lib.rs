//! kata-vmm-launcher: runs one VM. It jails the hypervisor (QEMU), drives it over
//! QMP, and serves the host end of the VM's vsock. The shim (or kata-ctl) talks
//! to it over gRPC on `/run/kata/<sandbox>/launcher.sock`.
//!
//! Public: [`client`] (what the launcher's callers use), [`run`] with its
//! error (what `main` calls), and `vsock::packet` (the fuzzing entry
//! points). Everything else is the crate's own.

mod cgroup;
pub mod client;
mod console;
mod error;
mod files;
mod jail;
mod leftovers;
mod qemu;
mod qmp;
mod server;
mod spec;
mod uids;
mod vm;
pub mod vsock;

use std::sync::Arc;
use std::time::Duration;

use kata_proto::launcher::launcher_server::LauncherServer;
use kata_proto::paths::SandboxPaths;
use tokio::sync::Notify;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

pub(crate) use crate::error::LauncherError;

/// Why [`run`] failed.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct RunError(#[from] LauncherError);

/// Open files the launcher needs: every vsock connection it may hold
/// ([`vsock::MAX_CONNS`]) plus its own sockets, the hypervisor's and the
/// runtime's (QEMU inherits the limit and needs far fewer).
pub(crate) const NOFILE_LIMIT: u64 = vsock::MAX_CONNS as u64 + 512;

/// Sets the soft RLIMIT_NOFILE to [`NOFILE_LIMIT`], within the hard limit
/// (raising the hard limit needs CAP_SYS_RESOURCE). Returns the soft limit set.
pub(crate) fn set_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2)/setrlimit(2) with a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let soft = NOFILE_LIMIT.min(lim.rlim_max);
    lim.rlim_cur = soft;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if soft < NOFILE_LIMIT {
        warn!(
            soft,
            want = NOFILE_LIMIT,
            "the hard RLIMIT_NOFILE is below what the vsock caps need: connections past it are refused"
        );
    }
    Ok(soft)
}

/// Serves the launcher API for `sandbox_id` until `Shutdown`, SIGTERM or SIGINT
/// (both of which also tear the VM down). Leftovers of a dead launcher of the
/// same sandbox are removed first. `on_listening` runs once the socket accepts.
pub async fn run(
    sandbox_id: &str,
    paths: SandboxPaths,
    on_listening: impl FnOnce(),
) -> Result<(), RunError> {
    // what the launcher creates is root's alone: explicit modes below, and
    // this mask for the moment between a bind(2) and its chmod
    // SAFETY: umask(2) only changes this process's file mode mask.
    unsafe { libc::umask(0o077) };
    let io = |what: String| move |e| RunError(LauncherError::Io(what, e));
    set_nofile_limit().map_err(io("setting RLIMIT_NOFILE".into()))?;
    if leftovers::State::load(&paths).is_some() {
        warn!("removing the leftovers of a previous launcher of this sandbox");
        leftovers::cleanup(&paths, leftovers::LiveLauncher::Refuse).map_err(LauncherError::from)?;
    }
    files::private_dir(&paths.dir, files::DIR_MODE, None)
        .map_err(io(format!("creating {}", paths.dir.display())))?;
    let sock = paths.launcher_socket();
    let _ = std::fs::remove_file(&sock);
    let listener =
        tokio::net::UnixListener::bind(&sock).map_err(io(format!("binding {}", sock.display())))?;
    files::chmod_nofollow(&sock, files::FILE_MODE)
        .map_err(io(format!("chmod {}", sock.display())))?;
    let vm = vm::Vm::spawn(sandbox_id, paths.clone());
    let done = Arc::new(Notify::new());
    let svc = server::LauncherService {
        vm: vm.clone(),
        done: done.clone(),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("SIGTERM handler".into()))?;
    let stop = {
        let vm = vm.clone();
        async move {
            tokio::select! {
                _ = done.notified() => {}
                _ = term.recv() => { info!("SIGTERM: tearing the VM down"); vm.teardown().await; }
                _ = tokio::signal::ctrl_c() => { info!("SIGINT: tearing the VM down"); vm.teardown().await; }
            }
            // let the Shutdown reply leave
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    info!(socket = %sock.display(), "launcher listening");
    on_listening();
    let served = tonic::transport::Server::builder()
        .trace_fn(kata_proto::trace::server_span)
        .add_service(LauncherServer::new(svc))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop)
        .await;
    if let Err(e) = served {
        warn!("launcher API server: {e}");
        vm.teardown().await;
    }
    leftovers::remove_sandbox_files(&paths);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn nofile_limit_fits_the_caps() {
        let soft = super::set_nofile_limit().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit(2) into a valid struct.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, soft);
        assert_eq!(soft, crate::NOFILE_LIMIT.min(lim.rlim_max));
        assert!(crate::NOFILE_LIMIT as usize > crate::vsock::MAX_CONNS);
    }
}
