//! The host end of the VM's vsock: a vhost-user vsock device backend serving
//! hybrid vsock (the Firecracker / Cloud Hypervisor convention).
//!
//! * QEMU connects to [`VsockConfig::vhost_socket`]
//!   (`-chardev socket,id=vs,path=...` + `-device vhost-user-vsock-pci,chardev=vs`,
//!   guest RAM shared: `memory-backend-memfd,share=on`).
//! * A host program reaches guest port P by connecting to
//!   [`VsockConfig::uds_path`], writing `CONNECT P\n` and reading `OK <n>\n`;
//!   then the stream is raw. A `CONNECT` made before the guest driver is up is
//!   held until it is. If nothing listens on P, the client sees EOF before `OK`.
//! * A guest connection to host port P is forwarded to the unix socket
//!   `<uds_path>_P` ([`kata_proto::paths::hybrid_listener_path`]); if that
//!   does not exist, the guest gets a reset.
//!
//! Half-close works both ways (`shutdown(SHUT_WR)` becomes a vsock
//! SHUTDOWN(SEND) and back), credit is accounted both ways, and every guest
//! input is validated. Layout: [`packet`] (pure header and `CONNECT` line
//! parsing), `conn` (connection state machine), `device` (vhost-user glue).

mod conn;
mod device;
pub mod packet;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::{debug, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use conn::Muxer;
pub(crate) use conn::{Stats, Usage, MAX_CONNS, MAX_GUEST_CONNS};
use device::{lock, VsockDevice, HOST_EVENT};

/// Where the backend listens.
#[derive(Debug, Clone)]
pub(crate) struct VsockConfig {
    /// vhost-user socket QEMU connects to (we listen; QEMU is the frontend:
    /// `-chardev socket,id=vs,path=...` + `-device vhost-user-vsock-pci,chardev=vs`).
    pub(crate) vhost_socket: PathBuf,
    /// Host unix socket for host-initiated connections: the client writes
    /// `CONNECT <port>\n`, we answer `OK <host_port>\n` once the guest
    /// accepted, then the stream is raw. Guest-initiated connections to host
    /// port P are forwarded to the unix socket `<uds_path>_P`.
    pub(crate) uds_path: PathBuf,
    /// The guest's CID (3 with hybrid vsock).
    pub(crate) guest_cid: u64,
}

/// Why the backend could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VsockError {
    /// The guest CID is reserved or too large.
    #[error("invalid guest CID {0}: must be between 3 and 4294967294")]
    InvalidCid(u64),
    /// Something that is not a socket is in the way.
    #[error("vsock socket path {}: {problem}", path.display())]
    Path {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// `bind(2)` failed.
    #[error("cannot listen on vsock socket {}: {source}", path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// epoll, timerfd, eventfd or thread creation failed.
    #[error("vsock backend for {}: {what}: {source}", path.display())]
    Setup {
        /// The vhost-user socket of the backend.
        path: PathBuf,
        /// What was being set up.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The vhost-user daemon could not be created.
    #[error("vhost-user vsock daemon for {}: {reason}", path.display())]
    Daemon {
        /// The vhost-user socket.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

struct Running {
    thread: JoinHandle<()>,
    stop: Arc<AtomicBool>,
    stop_evt: EventNotifier,
    session: Arc<Mutex<Option<ShutdownHandle>>>,
}

/// A running vsock backend. Dropping it stops it.
pub(crate) struct VsockBackend {
    cfg: VsockConfig,
    muxer: Arc<Mutex<Muxer>>,
    active: Arc<AtomicBool>,
    running: Option<Running>,
}

impl std::fmt::Debug for VsockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockBackend")
            .field("cfg", &self.cfg)
            .field("active", &self.is_active())
            .finish()
    }
}

/// Removes a stale socket file at `path`; refuses to remove anything else.
fn clear_stale_socket(path: &Path) -> Result<(), VsockError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| VsockError::Path {
                path: path.to_path_buf(),
                problem: format!("cannot remove the stale socket: {e}"),
            })
        }
        Ok(_) => Err(VsockError::Path {
            path: path.to_path_buf(),
            problem: "exists and is not a socket".into(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VsockError::Path {
            path: path.to_path_buf(),
            problem: e.to_string(),
        }),
    }
}

impl VsockBackend {
    /// Binds both sockets (so QEMU can be started right after this returns),
    /// spawns the worker thread(s), returns.
    pub(crate) fn start(cfg: VsockConfig) -> Result<VsockBackend, VsockError> {
        if cfg.guest_cid < 3 || cfg.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(cfg.guest_cid));
        }
        let setup = |what| {
            let path = cfg.vhost_socket.clone();
            move |source| VsockError::Setup { path, what, source }
        };
        clear_stale_socket(&cfg.uds_path)?;
        let uds = UnixListener::bind(&cfg.uds_path).map_err(|source| VsockError::Bind {
            path: cfg.uds_path.clone(),
            source,
        })?;
        if let Err(source) = crate::files::chmod_nofollow(&cfg.uds_path, crate::files::FILE_MODE) {
            let _ = std::fs::remove_file(&cfg.uds_path);
            return Err(VsockError::Bind {
                path: cfg.uds_path.clone(),
                source,
            });
        }
        let muxer = match Muxer::new(uds, &cfg.uds_path, cfg.guest_cid) {
            Ok(m) => Arc::new(Mutex::new(m)),
            Err(e) => {
                let _ = std::fs::remove_file(&cfg.uds_path);
                return Err(setup("epoll/timerfd")(e));
            }
        };
        let cleanup_uds = |e| {
            let _ = std::fs::remove_file(&cfg.uds_path);
            e
        };
        clear_stale_socket(&cfg.vhost_socket).map_err(cleanup_uds)?;
        let listener = Listener::new(&cfg.vhost_socket, false)
            .map_err(|e| VsockError::Bind {
                path: cfg.vhost_socket.clone(),
                source: io::Error::other(e.to_string()),
            })
            .map_err(cleanup_uds)?;
        crate::files::chmod_nofollow(&cfg.vhost_socket, crate::files::FILE_MODE)
            .map_err(|source| VsockError::Bind {
                path: cfg.vhost_socket.clone(),
                source,
            })
            .map_err(cleanup_uds)?;
        let (stop_rx, stop_evt) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
                .map_err(setup("eventfd"))
                .map_err(cleanup_uds)?;
        let active = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let session = Arc::new(Mutex::new(None));
        let ctx = ServeCtx {
            listener,
            muxer: muxer.clone(),
            guest_cid: cfg.guest_cid,
            path: cfg.vhost_socket.clone(),
            active: active.clone(),
            stop: stop.clone(),
            stop_rx,
            session: session.clone(),
        };
        // Create the first daemon here so a failure is reported to the caller.
        let first = ctx.new_daemon().map_err(cleanup_uds)?;
        let thread = std::thread::Builder::new()
            .name("vsock-vhost".into())
            .spawn(move || ctx.serve(first))
            .map_err(setup("spawning the vhost-user thread"))
            .map_err(cleanup_uds)?;
        info!(vhost = %cfg.vhost_socket.display(), uds = %cfg.uds_path.display(), "vsock backend listening");
        Ok(VsockBackend {
            cfg,
            muxer,
            active,
            running: Some(Running {
                thread,
                stop,
                stop_evt,
                session,
            }),
        })
    }

    /// Stops the threads, removes both socket files. Also done on Drop.
    pub(crate) fn shutdown(mut self) {
        self.stop();
    }

    /// True once QEMU connected and the device was activated (vrings enabled).
    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Connections and buffered bytes now, and the counters (refusals,
    /// resets, bad input).
    pub(crate) fn usage(&self) -> (Usage, Stats) {
        let m = lock(&self.muxer);
        (m.usage(), m.stats)
    }

    fn stop(&mut self) {
        let Some(r) = self.running.take() else { return };
        let (usage, stats) = self.usage();
        if stats.refused_guest_conns + stats.buffer_resets + stats.bad_packets > 0 {
            info!(
                refused_guest_conns = stats.refused_guest_conns,
                buffer_resets = stats.buffer_resets,
                bad_packets = stats.bad_packets,
                buffered_peak = usage.buffered_peak,
                "vsock backend: the guest hit its caps"
            );
        }
        r.stop.store(true, Ordering::Release);
        let _ = r.stop_evt.notify();
        if let Some(h) = lock(&r.session).as_ref() {
            h.shutdown();
        }
        if r.thread.join().is_err() {
            warn!("vsock backend thread panicked");
        }
        self.active.store(false, Ordering::Release);
        for p in [&self.cfg.uds_path, &self.cfg.vhost_socket] {
            if let Err(e) = std::fs::remove_file(p) {
                if e.kind() != io::ErrorKind::NotFound {
                    debug!(path = %p.display(), "removing vsock socket: {e}");
                }
            }
        }
        debug!(vhost = %self.cfg.vhost_socket.display(), "vsock backend stopped");
    }
}

impl Drop for VsockBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

type Daemon = VhostUserDaemon<Arc<VsockDevice>>;

struct ServeCtx {
    listener: Listener,
    muxer: Arc<Mutex<Muxer>>,
    guest_cid: u64,
    path: PathBuf,
    active: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    stop_rx: EventConsumer,
    session: Arc<Mutex<Option<ShutdownHandle>>>,
}

impl ServeCtx {
    /// A daemon (with its vring worker thread already serving the host
    /// sockets) ready to accept a frontend.
    fn new_daemon(&self) -> Result<Daemon, VsockError> {
        let dev = Arc::new(VsockDevice::new(
            self.muxer.clone(),
            self.guest_cid,
            self.active.clone(),
        ));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let err = |reason: String| VsockError::Daemon {
            path: self.path.clone(),
            reason,
        };
        let daemon =
            VhostUserDaemon::new("vsock-vring".into(), dev, mem).map_err(|e| err(e.to_string()))?;
        let epoll_fd = lock(&self.muxer).epoll_fd();
        let handlers = daemon.get_epoll_handlers();
        let h = handlers
            .first()
            .ok_or_else(|| err("no vring worker".into()))?;
        h.register_listener(epoll_fd, EventSet::IN, u64::from(HOST_EVENT))
            .map_err(|e| err(format!("registering the host sockets: {e}")))?;
        Ok(daemon)
    }

    /// Waits until QEMU connects (true) or we are told to stop (false).
    fn wait_for_frontend(&self) -> bool {
        loop {
            if self.stop.load(Ordering::Acquire) {
                return false;
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop_rx.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd for the whole call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!(path = %self.path.display(), "vsock: poll failed: {e}");
                return false;
            }
            if fds[1].revents != 0 || self.stop.load(Ordering::Acquire) {
                return false;
            }
            if fds[0].revents != 0 {
                return true;
            }
        }
    }

    fn serve(mut self, first: Daemon) {
        let mut next = Some(first);
        loop {
            let mut daemon = match next.take() {
                Some(d) => d,
                None => match self.new_daemon() {
                    Ok(d) => d,
                    Err(e) => {
                        warn!("vsock backend stops: {e}");
                        return;
                    }
                },
            };
            if !self.wait_for_frontend() {
                return;
            }
            if let Err(e) = daemon.start(&mut self.listener) {
                warn!(path = %self.path.display(), "vsock: accepting the vhost-user frontend failed: {e}");
                continue;
            }
            {
                let mut s = lock(&self.session);
                *s = daemon.shutdown_handle();
                if self.stop.load(Ordering::Acquire) {
                    if let Some(h) = s.as_ref() {
                        h.shutdown();
                    }
                }
            }
            info!(path = %self.path.display(), "vsock: vhost-user frontend connected");
            let r = daemon.wait();
            *lock(&self.session) = None;
            self.active.store(false, Ordering::Release);
            lock(&self.muxer).set_active(false);
            match r {
                Ok(()) => {
                    info!(path = %self.path.display(), "vsock: vhost-user frontend disconnected")
                }
                Err(e) => {
                    info!(path = %self.path.display(), "vsock: vhost-user session ended: {e}")
                }
            }
            // dropping the daemon stops its vring worker (exit_event)
            drop(daemon);
            if self.stop.load(Ordering::Acquire) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
