//! The server process: sandboxes itself (its own mount namespace with the
//! shared directory as `/`, reduced capabilities, a seccomp allow-list) before
//! it reads a single request, then serves the guest over vhost-user or the
//! host over /dev/fuse until the frontend or the mount goes.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config as PassthroughConfig};
use fuse_backend_rs::transport::FuseSession;
use nix::unistd::Pid;

use crate::config::{Cache, SandboxKind, MAX_THREADS, NAME};
use crate::control::{self, State};
use crate::device;
use crate::fs::{GuardedFs, Limits, Policy};
use crate::metrics::Metrics;
use crate::sandbox;
use crate::supervisor::Prepared;
use kata_proto::residency;

/// The server's exit code (and so the supervisor's) when the guest broke a
/// virtio-fs queue: the device cannot serve any more (see src/device.rs).
pub const EXIT_DEVICE_BROKEN: i32 = 3;

/// The server process: sandbox, then serve until the frontend or the mount goes.
pub(crate) fn server(p: Prepared, ready: OwnedFd, parent: Pid) -> Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes no pointers.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if nix::unistd::getppid() != parent {
        bail!("the supervisor is gone");
    }
    let config = &p.config;
    let namespace = config.sandbox == SandboxKind::Namespace;
    if namespace {
        sandbox::prepare_namespace()?;
    }
    let (cache_policy, timeout) = match config.cache {
        Cache::None => (CachePolicy::Never, Duration::ZERO),
        Cache::Auto => (CachePolicy::Auto, Duration::from_secs(1)),
        Cache::Always => (CachePolicy::Always, Duration::from_secs(86400)),
    };
    let root_dir = if namespace {
        "/".to_string()
    } else {
        p.shared_dir.to_string_lossy().into_owned()
    };
    let cfg = PassthroughConfig {
        root_dir,
        cache_policy,
        attr_timeout: timeout,
        entry_timeout: timeout,
        do_import: true,
        xattr: false,
        inode_file_handles: false,
        writeback: false,
        ..Default::default()
    };
    let (limits, nofile) = sandbox::fit_fd_limit(Limits {
        handles: config.max_handles,
        inodes: config.max_inodes,
    })?;
    tracing::info!(
        "caps: {} handles, {} inodes; RLIMIT_NOFILE {nofile}",
        limits.handles,
        limits.inodes
    );
    let metrics = Arc::new(Metrics::default());
    let guard = Policy {
        readonly: config.readonly,
        xattr: config.xattr,
        allow_setid: config.allow_setid,
        allow_devices: config.allow_devices,
        announce_submounts: config.announce_submounts,
        limits,
    };
    let fs = Arc::new(GuardedFs::new(cfg, guard, metrics.clone()).context("passthrough fs")?);
    if namespace {
        sandbox::pivot_into(&p.shared_dir)?;
    }
    if let Some(c) = &p.control {
        c.set_nonblocking(true)?;
    }
    sandbox::drop_capabilities(config.allow_setid)?;
    sandbox::install_seccomp(config.seccomp)?;

    let state = Arc::new(State {
        sandbox_id: config.sandbox_id.clone().unwrap_or_default(),
        shared_dir: p.shared_dir.to_string_lossy().into_owned(),
        cache: config.cache.as_str().to_string(),
        readonly: config.readonly,
        transport: if p.fuse.is_some() {
            "fuse"
        } else {
            "vhost-user"
        },
        connected: Default::default(),
        started: Instant::now(),
        metrics: metrics.clone(),
    });
    let Prepared {
        config,
        vhost,
        control,
        fuse,
        image,
        ..
    } = p;
    if let Some(c) = control {
        control::spawn(c, state.clone())?;
    }
    // start-up is over: keep mapped only the code that serving uses
    if let Some(r) = &image {
        residency::drop_image_pages(r);
    }
    let threads = config.thread_pool_size.min(MAX_THREADS);
    let mut ready = File::from(ready);
    if let Some((dev, mut session)) = fuse {
        session.set_fuse_file(dev);
        state.connected.store(true, Ordering::Relaxed);
        ready.write_all(b"1")?;
        drop(ready);
        tracing::info!(
            "serving {} on {} (cache={}, readonly={})",
            state.shared_dir,
            session.mountpoint().display(),
            config.cache.as_str(),
            config.readonly
        );
        let r = serve_fuse(&session, fs, &metrics, threads.max(1));
        // the supervisor unmounts; the session's own Drop must not
        std::mem::forget(session);
        return r;
    }
    let listener = vhost.context("no vhost-user socket")?;
    ready.write_all(b"1")?;
    drop(ready);
    serve_vhost(listener, fs, metrics, threads, &state)
}

fn serve_fuse(
    session: &FuseSession,
    fs: Arc<GuardedFs>,
    metrics: &Arc<Metrics>,
    threads: usize,
) -> Result<()> {
    let fuse_fd = session
        .get_fuse_file()
        .map(|f| f.as_raw_fd())
        .context("no /dev/fuse connection")?;
    let server = Arc::new(Server::new(fs));
    let mut channels = Vec::new();
    for _ in 0..threads {
        channels.push(
            session
                .new_channel()
                .map_err(|e| anyhow::anyhow!("fuse channel: {e}"))?,
        );
    }
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for mut ch in channels {
            let ch_fd = fuse_fd;
            let server = server.clone();
            let metrics = metrics.clone();
            handles.push(s.spawn(move || -> Result<()> {
                let hook = metrics.hook();
                loop {
                    match ch.get_request() {
                        Ok(Some((reader, writer))) => {
                            // a panic in the FUSE code drops the request, not the daemon
                            let res =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    server.handle_message(reader, writer.into(), None, Some(&hook))
                                }));
                            match res {
                                Ok(res) => {
                                    metrics.finish(res.is_err());
                                    if let Err(e) = res {
                                        kata_proto::debug_limited!("bad FUSE request: {e}");
                                    }
                                }
                                Err(_) => {
                                    metrics.finish(true);
                                    kata_proto::warn_limited!("a FUSE request panicked; dropped");
                                }
                            }
                        }
                        Ok(None) => return Ok(()),
                        // an unmount shows as an error event on the fd
                        Err(_) if connection_gone(ch_fd) => return Ok(()),
                        Err(e) => anyhow::bail!("reading /dev/fuse: {e}"),
                    }
                }
            }));
        }
        let mut res = Ok(());
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => res = Err(e),
                Err(_) => res = Err(anyhow::anyhow!("a FUSE thread panicked")),
            }
        }
        if res.is_ok() {
            tracing::info!("unmounted: exiting");
        }
        res
    })
}

/// Whether the /dev/fuse connection `fd` is closed (unmounted or aborted).
fn connection_gone(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd with no timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLERR != 0
}

fn serve_vhost(
    listener: UnixListener,
    fs: Arc<GuardedFs>,
    metrics: Arc<Metrics>,
    threads: usize,
    state: &State,
) -> Result<()> {
    use vhost::vhost_user::Error as VuError;
    use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};

    let on_broken: device::OnBroken = Box::new(|what| {
        // nothing to flush: a reply either reached the guest or never will
        tracing::error!(
            "exiting with {EXIT_DEVICE_BROKEN}: the guest broke its virtio-fs queue ({what})"
        );
        std::process::exit(EXIT_DEVICE_BROKEN);
    });
    let backend = Arc::new(device::FsBackend::new(fs, metrics, threads, on_broken)?);
    let mem = vm_memory::GuestMemoryAtomic::new(vm_memory::GuestMemoryMmap::<()>::new());
    let mut daemon = VhostUserDaemon::new(NAME.to_string(), backend, mem)
        .map_err(|e| anyhow::anyhow!("vhost-user daemon: {e}"))?;
    // never dropped: a Listener made from a path unlinks it on drop, and after
    // the pivot that path would name a file inside the shared directory
    let mut listener = std::mem::ManuallyDrop::new(vhost::vhost_user::Listener::from(listener));
    tracing::info!("serving {} (cache={})", state.shared_dir, state.cache);
    daemon
        .start(&mut listener)
        .map_err(|e| anyhow::anyhow!("accepting the frontend: {e}"))?;
    state.connected.store(true, Ordering::Relaxed);
    tracing::info!("frontend connected");
    let res = daemon.wait();
    state.connected.store(false, Ordering::Relaxed);
    match res {
        Ok(())
        | Err(DaemonError::HandleRequest(VuError::Disconnected))
        | Err(DaemonError::HandleRequest(VuError::PartialMessage)) => {
            tracing::info!("frontend disconnected: exiting");
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("vhost-user: {e}")),
    }
}
