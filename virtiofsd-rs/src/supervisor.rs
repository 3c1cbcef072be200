//! The supervisor: the process started binds the sockets (and, in FUSE mode,
//! mounts), forks the server (src/server.rs), prints `READY` once the server is
//! sandboxed and serving, and then only waits: for the server to end (the
//! frontend disconnected, the filesystem was unmounted) or for SIGTERM/SIGINT
//! (which it passes on, or answers by unmounting). Either way it removes the
//! sockets, unmounts, and exits 0 after a clean end. The server could not
//! remove a socket outside the shared directory or unmount the host's mount
//! point once sandboxed, which is why the supervisor exists.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use fuse_backend_rs::transport::FuseSession;
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::config::{Config, Transport, NAME};
use crate::server::server;
use kata_proto::residency;

/// Everything the supervisor prepared for the server.
pub(crate) struct Prepared {
    pub(crate) config: Config,
    pub(crate) shared_dir: PathBuf,
    pub(crate) vhost: Option<UnixListener>,
    pub(crate) control: Option<UnixListener>,
    pub(crate) fuse: Option<(File, FuseSession)>,
    /// The read-only part of the binary's image (found while `/proc` is
    /// there), unmapped once start-up is over: see [`residency`].
    pub(crate) image: Option<std::ops::Range<usize>>,
}

/// A unix listener at `path`, replacing a stale socket (never another file),
/// mode 0600 whatever the umask: bound under umask 0177 (no moment with a
/// wider mode; the process is single-threaded here), then chmod 0600
/// explicitly.
fn bind(path: &Path) -> Result<UnixListener> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let l = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let l = l.with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(l)
}

fn within(inner: &Path, outer: &Path) -> bool {
    inner.starts_with(outer)
}

/// Runs the daemon: prepares the sockets (or the mount), forks the sandboxed
/// server and supervises it; returns the exit code.
pub fn run(config: Config) -> Result<i32> {
    let shared_dir = std::fs::canonicalize(&config.shared_dir)
        .with_context(|| format!("shared dir {}", config.shared_dir.display()))?;
    if !shared_dir.is_dir() {
        bail!("{} is not a directory", shared_dir.display());
    }
    let vhost = match config.socket_path() {
        Some(p) => Some(bind(p)?),
        None => None,
    };
    let control = match &config.control_socket {
        Some(p) => Some(bind(p)?),
        None => None,
    };
    let fuse = match &config.transport {
        Transport::Fuse(m) => Some(fuse_mount(m, &shared_dir)?),
        Transport::VhostUser(_) => None,
    };
    let prepared = Prepared {
        config,
        shared_dir,
        vhost,
        control,
        fuse,
        image: residency::image_range(),
    };
    supervise(prepared)
}

/// Mounts a FUSE filesystem at `mountpoint` in the caller's mount namespace;
/// returns the /dev/fuse connection.
fn fuse_mount(mountpoint: &Path, shared_dir: &Path) -> Result<(File, FuseSession)> {
    let mnt = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("mount point {}", mountpoint.display()))?;
    if within(&mnt, shared_dir) || within(shared_dir, &mnt) {
        bail!(
            "the mount point {} and the shared dir {} must not contain each other",
            mnt.display(),
            shared_dir.display()
        );
    }
    let session = FuseSession::new(&mnt, NAME, "", false)
        .map_err(|e| anyhow::anyhow!("fuse session: {e}"))?;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .context("opening /dev/fuse")?;
    let opts = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other,max_read={}",
        dev.as_raw_fd(),
        session.bufsize()
    );
    // Not MS_RDONLY with --readonly: the daemon itself refuses every change, as
    // it must for a guest (whose virtio-fs mount it does not control), and the
    // host mount is how the tests see that refusal.
    let flags = nix::mount::MsFlags::MS_NOSUID
        | nix::mount::MsFlags::MS_NODEV
        | nix::mount::MsFlags::MS_NOATIME;
    nix::mount::mount(
        Some(NAME),
        &mnt,
        Some("fuse.kata-virtiofsd"),
        flags,
        Some(opts.as_str()),
    )
    .with_context(|| format!("mounting FUSE on {}", mnt.display()))?;
    // several channel threads poll the same connection: reads must not block
    nix::fcntl::fcntl(
        &dev,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .context("O_NONBLOCK on /dev/fuse")?;
    Ok((dev, session))
}

fn handled_signals() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGCHLD,
        Signal::SIGHUP,
    ] {
        s.add(sig);
    }
    s
}

/// Forks the server and waits; returns the exit code.
fn supervise(p: Prepared) -> Result<i32> {
    let signals = handled_signals();
    let mut old = SigSet::empty();
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&signals), Some(&mut old))
        .context("blocking signals")?;
    let (ready_rd, ready_wr) = nix::unistd::pipe().context("pipe")?;
    let parent = nix::unistd::getpid();
    // SAFETY: the process is single-threaded here (no runtime, no worker yet).
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            drop(ready_rd);
            let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
            let code = match server(p, ready_wr, parent) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("{e:#}");
                    1
                }
            };
            std::process::exit(code);
        }
        ForkResult::Parent { child } => {
            drop(ready_wr);
            let Prepared {
                config,
                vhost,
                control,
                fuse,
                image,
                ..
            } = p;
            // the server holds these now; the supervisor must not keep a
            // /dev/fuse connection alive past the server
            drop(vhost);
            drop(control);
            let mountpoint = fuse.map(|(dev, session)| {
                let mnt = session.mountpoint().to_path_buf();
                drop(dev);
                // its Drop would unmount at once; the supervisor unmounts itself
                std::mem::forget(session);
                mnt
            });
            let cleanup = Cleanup {
                sockets: [config.socket_path().cloned(), config.control_socket.clone()]
                    .into_iter()
                    .flatten()
                    .collect(),
                mountpoint,
            };
            // from here on the supervisor only waits
            if let Some(r) = &image {
                residency::drop_image_pages(r);
            }
            Ok(wait_server(child, ready_rd, &signals, cleanup))
        }
    }
}

/// What the supervisor removes when the server is gone.
struct Cleanup {
    sockets: Vec<PathBuf>,
    mountpoint: Option<PathBuf>,
}

impl Cleanup {
    fn unmount(&self) {
        if let Some(m) = &self.mountpoint {
            match nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) => tracing::info!("unmounted {}", m.display()),
                Err(nix::errno::Errno::EINVAL) => {} // already unmounted
                Err(e) => tracing::warn!("unmounting {}: {e}", m.display()),
            }
        }
    }

    fn run(&self) {
        self.unmount();
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

fn wait_server(child: Pid, ready: OwnedFd, signals: &SigSet, cleanup: Cleanup) -> i32 {
    let mut byte = [0u8; 1];
    let ready = File::from(ready).read(&mut byte).unwrap_or(0) == 1;
    if !ready {
        tracing::error!("the server process failed to start");
        let _ = waitpid(child, None);
        cleanup.run();
        return 1;
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "READY");
    let _ = out.flush();
    // past the fork: a traced shim's collector gets the start-up's span
    match kata_proto::trace::start_from_env() {
        Ok(()) => kata_proto::trace::record_startup("virtiofsd_startup"),
        Err(e) => tracing::warn!("tracing: {e}; kata-virtiofsd is not traced"),
    }

    let mut stopping: Option<Instant> = None;
    let mut killed = false;
    loop {
        let timeout = Duration::from_millis(500);
        let sig = sigtimedwait(signals, timeout);
        let stop = matches!(sig, Some(libc::SIGTERM | libc::SIGINT | libc::SIGHUP));
        if stop && stopping.is_none() {
            tracing::info!("signal {}: stopping", sig.unwrap_or_default());
            stopping = Some(Instant::now());
            // FUSE: the unmount ends the server's channel; vhost-user: the
            // server has nothing to flush, SIGTERM ends it
            if cleanup.mountpoint.is_some() {
                cleanup.unmount();
            } else {
                let _ = kill(child, Signal::SIGTERM);
            }
        }
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => {
                cleanup.run();
                if code != 0 {
                    tracing::error!("the server exited with {code}");
                }
                return if stopping.is_some() { 0 } else { code };
            }
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                cleanup.run();
                if stopping.is_some() {
                    return 0;
                }
                tracing::error!("the server was killed by {sig}");
                return 1;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!("waiting for the server: {e}");
                cleanup.run();
                return 1;
            }
        }
        // a busy lazily-unmounted FUSE mount keeps the server alive: bound it
        if let Some(t) = stopping {
            if !killed && t.elapsed() > Duration::from_secs(5) {
                tracing::warn!("the server did not stop within 5 s: killing it");
                let _ = kill(child, Signal::SIGKILL);
                killed = true;
            }
        }
    }
}

fn sigtimedwait(set: &SigSet, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    let raw: &libc::sigset_t = set.as_ref();
    // SAFETY: valid pointers to a sigset and a timespec; no siginfo wanted.
    let s = unsafe { libc::sigtimedwait(raw, std::ptr::null_mut(), &ts) };
    (s > 0).then_some(s)
}
