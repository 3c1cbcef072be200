//! kata-virtiofsd: serves a pod's shared directory to its guest as virtio-fs
//! (a vhost-user-fs backend), or mounts it on the host through /dev/fuse with
//! the same filesystem core. See docs/virtiofsd.md.
//!
//! Two processes: the one started (the supervisor) binds the sockets (and, in
//! FUSE mode, mounts), forks the server, prints `READY` once the server is
//! sandboxed and serving, and then only waits: for the server to end (the
//! frontend disconnected, the filesystem was unmounted) or for SIGTERM/SIGINT
//! (which it passes on, or answers by unmounting). Either way it removes the
//! sockets, unmounts, and exits 0 after a clean end. The server sandboxes
//! itself (its own mount namespace with the shared directory as `/`, reduced
//! capabilities, a seccomp allow-list) before it reads a single request: it
//! could not remove a socket outside the shared directory or unmount the
//! host's mount point, which is why the supervisor exists.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, ValueEnum};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config};
use fuse_backend_rs::transport::FuseSession;
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use kata_virtiofsd::control::{self, State};
use kata_virtiofsd::device;
use kata_virtiofsd::fs::{GuardedFs, Limits, Policy, DEFAULT_MAX_HANDLES, DEFAULT_MAX_INODES};
use kata_virtiofsd::metrics::Metrics;
use kata_virtiofsd::residency;
use kata_virtiofsd::sandbox::{self, SeccompMode};

const NAME: &str = "kata-virtiofsd";

/// Cache policy offered to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Cache {
    /// No caching: every access goes to the daemon (shared with other writers).
    None,
    /// Close-to-open consistency, metadata cached 1 s.
    Auto,
    /// Cache everything (the guest owns the directory).
    Always,
}

impl Cache {
    fn as_str(self) -> &'static str {
        match self {
            Cache::None => "none",
            Cache::Auto => "auto",
            Cache::Always => "always",
        }
    }
}

/// How the server process is confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SandboxKind {
    /// Own mount namespace, the shared directory as `/` (default).
    Namespace,
    /// No namespace (debugging); capabilities and seccomp still apply.
    None,
}

#[derive(Debug, Parser)]
#[command(name = NAME, version, about = "kata-rs vhost-user-fs daemon")]
struct Cli {
    /// vhost-user socket to listen on (vhost-user mode).
    #[arg(
        long,
        required_unless_present = "fuse_mount",
        conflicts_with = "fuse_mount"
    )]
    socket_path: Option<PathBuf>,
    /// Mount the share here through /dev/fuse instead (host FUSE mode).
    #[arg(long)]
    fuse_mount: Option<PathBuf>,
    /// The directory to serve.
    #[arg(long)]
    shared_dir: PathBuf,
    /// Guest caching.
    #[arg(long, value_enum, default_value = "auto")]
    cache: Cache,
    /// Worker threads (0: requests are served by the queue thread).
    #[arg(long, default_value_t = 0)]
    thread_pool_size: usize,
    /// Serve extended attributes (the `user.` namespace only).
    #[arg(long)]
    xattr: bool,
    /// Flag directories on another filesystem as submounts.
    #[arg(long)]
    announce_submounts: bool,
    /// Refuse every change (EROFS).
    #[arg(long)]
    readonly: bool,
    /// Keep setuid/setgid bits the guest sets (default: cleared).
    #[arg(long)]
    allow_setid: bool,
    /// Let the guest create device nodes (default: EPERM).
    #[arg(long)]
    allow_devices: bool,
    /// Most open file and directory handles the guest may hold (one host fd
    /// each); beyond it OPEN, CREATE and OPENDIR are EMFILE.
    #[arg(long, default_value_t = DEFAULT_MAX_HANDLES)]
    max_handles: usize,
    /// Most inodes the guest may hold (one host fd each); beyond it a lookup
    /// of a new one is ENFILE.
    #[arg(long, default_value_t = DEFAULT_MAX_INODES)]
    max_inodes: usize,
    /// Sandbox id for the logs and Status.
    #[arg(long)]
    sandbox_id: Option<String>,
    /// gRPC control endpoint (virtiofsd.proto).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Server confinement.
    #[arg(long, value_enum, default_value = "namespace")]
    sandbox: SandboxKind,
    /// What an unlisted system call does.
    #[arg(long, value_enum, default_value = "kill")]
    seccomp: SeccompMode,
}

/// Most worker threads accepted.
const MAX_THREADS: usize = 64;

/// The server's exit code (and so the supervisor's) when the guest broke a
/// virtio-fs queue: the device cannot serve any more (see src/device.rs).
const EXIT_DEVICE_BROKEN: i32 = 3;

/// Everything the supervisor prepared for the server.
struct Prepared {
    cli: Cli,
    shared_dir: PathBuf,
    vhost: Option<UnixListener>,
    control: Option<UnixListener>,
    fuse: Option<(File, FuseSession)>,
    /// The read-only part of the binary's image (found while `/proc` is
    /// there), unmapped once start-up is over: see [`residency`].
    image: Option<std::ops::Range<usize>>,
}

fn main() {
    let cli = Cli::parse();
    if std::env::var_os("KATA_LOG").is_none() && std::env::var_os("RUST_LOG").is_none() {
        // fuse-backend-rs logs guest-triggered failures at error level
        std::env::set_var("KATA_LOG", "info,fuse_backend_rs=off");
    }
    kata_proto::logging::init(NAME, cli.sandbox_id.as_deref());
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::exit(1);
        }
    }
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

fn run(cli: Cli) -> Result<i32> {
    let shared_dir = std::fs::canonicalize(&cli.shared_dir)
        .with_context(|| format!("shared dir {}", cli.shared_dir.display()))?;
    if !shared_dir.is_dir() {
        bail!("{} is not a directory", shared_dir.display());
    }
    let vhost = match &cli.socket_path {
        Some(p) => Some(bind(p)?),
        None => None,
    };
    let control = match &cli.control_socket {
        Some(p) => Some(bind(p)?),
        None => None,
    };
    let fuse = match &cli.fuse_mount {
        Some(m) => Some(fuse_mount(m, &shared_dir)?),
        None => None,
    };
    let prepared = Prepared {
        cli,
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
                cli,
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
                sockets: [cli.socket_path.clone(), cli.control_socket.clone()]
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

/// The server process: sandbox, then serve until the frontend or the mount goes.
fn server(p: Prepared, ready: OwnedFd, parent: Pid) -> Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes no pointers.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if nix::unistd::getppid() != parent {
        bail!("the supervisor is gone");
    }
    let cli = &p.cli;
    let namespace = cli.sandbox == SandboxKind::Namespace;
    if namespace {
        sandbox::prepare_namespace()?;
    }
    let (cache_policy, timeout) = match cli.cache {
        Cache::None => (CachePolicy::Never, Duration::ZERO),
        Cache::Auto => (CachePolicy::Auto, Duration::from_secs(1)),
        Cache::Always => (CachePolicy::Always, Duration::from_secs(86400)),
    };
    let root_dir = if namespace {
        "/".to_string()
    } else {
        p.shared_dir.to_string_lossy().into_owned()
    };
    let cfg = Config {
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
        handles: cli.max_handles,
        inodes: cli.max_inodes,
    })?;
    tracing::info!(
        "caps: {} handles, {} inodes; RLIMIT_NOFILE {nofile}",
        limits.handles,
        limits.inodes
    );
    let metrics = Arc::new(Metrics::default());
    let guard = Policy {
        readonly: cli.readonly,
        xattr: cli.xattr,
        allow_setid: cli.allow_setid,
        allow_devices: cli.allow_devices,
        announce_submounts: cli.announce_submounts,
        limits,
    };
    let fs = Arc::new(GuardedFs::new(cfg, guard, metrics.clone()).context("passthrough fs")?);
    if namespace {
        sandbox::pivot_into(&p.shared_dir)?;
    }
    if let Some(c) = &p.control {
        c.set_nonblocking(true)?;
    }
    sandbox::drop_capabilities(cli.allow_setid)?;
    sandbox::install_seccomp(cli.seccomp)?;

    let state = Arc::new(State {
        sandbox_id: cli.sandbox_id.clone().unwrap_or_default(),
        shared_dir: p.shared_dir.to_string_lossy().into_owned(),
        cache: cli.cache.as_str().to_string(),
        readonly: cli.readonly,
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
        cli,
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
    let threads = cli.thread_pool_size.min(MAX_THREADS);
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
            cli.cache.as_str(),
            cli.readonly
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
                                        tracing::debug!("bad FUSE request: {e}");
                                    }
                                }
                                Err(_) => {
                                    metrics.finish(true);
                                    tracing::warn!("a FUSE request panicked; dropped");
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
