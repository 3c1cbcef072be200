//! One VM: create (jailed QEMU, paused, vsock backend listening), start, pause,
//! resume, stop, wait, and a teardown that always happens.
//!
//! The launcher owns exactly one VM. Its state lives behind one async mutex
//! (commands are applied one at a time); the VM's exit is published on a watch
//! channel so `WaitVm` never holds the lock.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kata_proto::launcher::{Accelerator, VmExit, VmSpec};
use kata_proto::paths::{self, ports, SandboxPaths};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{watch, Mutex};
use tracing::{debug, info, warn};

use crate::console::{self, BoundedLog, ConsoleStats, CONSOLE_CAP};
use crate::files::{self, DIR_MODE, FILE_MODE};
use crate::jail::{Jail, JailSpec};
use crate::leftovers::{remove_sandbox_files, State};
use crate::qemu::{self, QemuArgs};
use crate::qmp::Qmp;
use crate::uids::{UidAllocator, UidLease};
use crate::vsock::{VsockBackend, VsockConfig};
use crate::{cgroup, LauncherError};
use kata_proto::process::start_time;

/// Deadline of one QMP command.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long QEMU may take to create its QMP socket.
const QMP_SOCKET_WAIT: Duration = Duration::from_secs(10);
/// How long StopVm waits for QEMU to quit before SIGKILL, by default.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Readiness connections read at once (twice what the vsock backend lets
/// the guest open); past it new ones are closed unread.
const READY_PENDING_MAX: usize = 2 * crate::vsock::MAX_GUEST_CONNS;
/// How long a readiness connection may take to say `READY`.
const READY_LINE_DEADLINE: Duration = Duration::from_secs(2);
/// How long the exit report waits for the console's last bytes.
const CONSOLE_DRAIN_WAIT: Duration = Duration::from_secs(2);

/// The VM's running parts.
struct Running {
    pid: u32,
    qmp: Arc<Qmp>,
    vsock: Option<VsockBackend>,
    vsock_uds: PathBuf,
    paused: bool,
    started: bool,
    hypervisor_start: Duration,
}

/// The launcher's one VM.
pub(crate) struct Vm {
    sandbox_id: String,
    paths: SandboxPaths,
    inner: Mutex<Option<Running>>,
    state: Mutex<State>,
    exit: watch::Sender<Option<VmExit>>,
    ready: watch::Sender<Option<Instant>>,
    stop_requested: Arc<AtomicBool>,
    console: std::sync::Mutex<PathBuf>,
    uids: std::sync::Mutex<Option<UidAllocator>>,
    uid_lease: std::sync::Mutex<Option<UidLease>>,
}

impl Vm {
    /// A launcher for `sandbox_id` in `paths`, nothing created yet.
    pub(crate) fn new(sandbox_id: &str, paths: SandboxPaths) -> Vm {
        Vm {
            sandbox_id: sandbox_id.into(),
            inner: Mutex::new(None),
            state: Mutex::new(State {
                launcher_pid: std::process::id(),
                ..Default::default()
            }),
            exit: watch::channel(None).0,
            ready: watch::channel(None).0,
            stop_requested: Arc::new(AtomicBool::new(false)),
            console: std::sync::Mutex::new(paths.console_log()),
            uids: std::sync::Mutex::new(None),
            uid_lease: std::sync::Mutex::new(None),
            paths,
        }
    }

    /// The uid the hypervisor gets: the spec's, or a free one of the range.
    async fn hypervisor_uid(&self, spec: &VmSpec) -> Result<u32, LauncherError> {
        if spec.jail_uid != 0 {
            return Ok(spec.jail_uid);
        }
        let lease = {
            let mut a = lock(&self.uids);
            if a.is_none() {
                *a = Some(UidAllocator::host()?);
            }
            a.as_ref()
                .map(|a| a.allocate(&self.sandbox_id))
                .transpose()?
        };
        let Some(lease) = lease else {
            return Err(LauncherError::State("no uid allocator".into()));
        };
        let uid = lease.uid();
        {
            let mut st = self.state.lock().await;
            st.uid_lock = Some(lease.path().to_path_buf());
            let _ = st.save(&self.paths);
        }
        *lock(&self.uid_lease) = Some(lease);
        info!(uid, "hypervisor uid allocated");
        Ok(uid)
    }

    fn release_uid(&self) {
        drop(lock(&self.uid_lease).take());
    }

    /// Prepares the jailed, paused hypervisor with the vsock backend listening.
    /// Creates the VM, paused; returns the hypervisor's pid, the hybrid vsock
    /// socket, the accelerator and how long the hypervisor took to start.
    pub(crate) async fn create(
        &self,
        spec: VmSpec,
    ) -> Result<(u32, PathBuf, Accelerator, Duration), LauncherError> {
        let mut inner = self.inner.lock().await;
        if inner.is_some() || self.exit.borrow().is_some() {
            return Err(LauncherError::State(
                "the VM was already created (one VM per launcher)".into(),
            ));
        }
        let spec = validate(spec, &self.paths)?;
        let accel = resolve_accel(spec.accelerator())?;
        let vm_dir = self.paths.vm_dir();
        let mut cgroups = vec![];
        let result = match self.hypervisor_uid(&spec).await {
            Ok(uid) => self.spawn(&spec, accel, &vm_dir, uid, &mut cgroups).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(r) => {
                let out = (r.pid, r.vsock_uds.clone(), accel, r.hypervisor_start);
                if let Some(l) = lock(&self.uid_lease).as_mut() {
                    if let Err(e) = l.record(r.pid, start_time(r.pid).unwrap_or(0)) {
                        warn!("recording the hypervisor in its uid lock: {e}");
                    }
                }
                *inner = Some(r);
                Ok(out)
            }
            Err(e) => {
                // nothing of a failed create stays behind
                self.release_uid();
                cgroup::remove(&cgroups);
                let _ = std::fs::remove_dir_all(&vm_dir);
                let _ = std::fs::remove_dir(self.paths.jail_root());
                for p in [
                    self.paths.vsock_uds(),
                    paths::hybrid_listener_path(&self.paths.vsock_uds(), ports::READY),
                ] {
                    let _ = std::fs::remove_file(p);
                }
                let mut st = self.state.lock().await;
                st.cgroups.clear();
                st.uid_lock = None;
                let _ = st.save(&self.paths);
                Err(e)
            }
        }
    }

    async fn spawn(
        &self,
        spec: &VmSpec,
        accel: Accelerator,
        vm_dir: &Path,
        uid: u32,
        cgroups: &mut Vec<PathBuf>,
    ) -> Result<Running, LauncherError> {
        let io = |what: &str, p: &Path| {
            let what = format!("{what} {}", p.display());
            move |e: std::io::Error| LauncherError::Io(what, e)
        };
        // vm/ is the one host directory the jailed hypervisor reaches (its
        // QMP socket, the vhost-user sockets): its own, 0700
        files::private_dir(vm_dir, DIR_MODE, Some((uid, uid))).map_err(io("creating", vm_dir))?;
        files::private_dir(&self.paths.jail_root(), DIR_MODE, None)
            .map_err(io("creating", &self.paths.jail_root()))?;

        let cgroup_procs = if spec.cgroup_path.is_empty() {
            vec![]
        } else {
            *cgroups = cgroup::create(&spec.cgroup_path)?;
            let mut st = self.state.lock().await;
            st.cgroups = cgroups.clone();
            st.save(&self.paths)
                .map_err(io("writing", &self.paths.launcher_state()))?;
            cgroup::procs_files(&spec.cgroup_path)
        };

        // the readiness listener and the vsock backend listen before QEMU runs
        let vsock_uds = self.paths.vsock_uds();
        let ready_path = paths::hybrid_listener_path(&vsock_uds, ports::READY);
        let _ = std::fs::remove_file(&ready_path);
        let ready_listener =
            tokio::net::UnixListener::bind(&ready_path).map_err(io("binding", &ready_path))?;
        files::chmod_nofollow(&ready_path, FILE_MODE).map_err(io("chmod", &ready_path))?;
        let vhost_vsock = kata_proto::host::vhost_vsock_available();
        let vsock = if vhost_vsock {
            None
        } else {
            let vhost_socket = vm_dir.join("vhost-vsock.sock");
            let b = VsockBackend::start(VsockConfig {
                vhost_socket: vhost_socket.clone(),
                uds_path: vsock_uds.clone(),
                guest_cid: u64::from(paths::HYBRID_GUEST_CID),
            })?;
            files::chown_nofollow(&vhost_socket, uid, uid).map_err(io("chown", &vhost_socket))?;
            Some(b)
        };

        if !spec.virtiofs_socket.is_empty() {
            // the jailed hypervisor runs as `uid`: it must be able to connect
            let fs = Path::new(&spec.virtiofs_socket);
            let fd = files::open_nofollow(fs).map_err(io("opening", fs))?;
            files::fchown_fd(&fd, uid, uid).map_err(io("chown", fs))?;
            files::fchmod_fd(&fd, FILE_MODE).map_err(io("chmod", fs))?;
        }
        let jail = Jail::prepare(&JailSpec {
            root: self.paths.jail_root(),
            vm_dir: vm_dir.into(),
            kernel: spec.kernel_path.clone().into(),
            initrd: spec.initrd_path.clone().into(),
            netns: (!spec.netns_path.is_empty()).then(|| spec.netns_path.clone().into()),
            cgroup_procs,
            uid,
            kvm: accel == Accelerator::Kvm,
        })?;
        let args = qemu::command_line(&QemuArgs {
            sandbox_id: self.sandbox_id.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            machine_type: spec.machine_type.clone(),
            accelerator: accel,
            kernel_params: spec.kernel_params.clone(),
            vhost_vsock_cid: vhost_vsock.then_some(paths::HYBRID_GUEST_CID),
            tsc_khz: host_tsc_khz(),
            virtiofs_tag: (!spec.virtiofs_socket.is_empty()).then(|| spec.virtiofs_tag.clone()),
        });
        let console = if spec.console_log_path.is_empty() {
            self.paths.console_log()
        } else {
            spec.console_log_path.clone().into()
        };
        // the console (QEMU's stdout and stderr) goes through a pipe QEMU
        // never blocks on, to a log that never exceeds its cap
        let log = BoundedLog::open(&console, CONSOLE_CAP)
            .map_err(io("opening the console log", &console))?;
        *self.console.lock().unwrap_or_else(|p| p.into_inner()) = console.clone();
        let (from_qemu, to_log) = console::pipe().map_err(io("console pipe for", &console))?;
        let to_log2 = to_log
            .try_clone()
            .map_err(io("console pipe for", &console))?;
        let console_done =
            console::spawn_reader(from_qemu, log).map_err(io("console reader for", &console))?;
        let mut cmd = tokio::process::Command::new(&spec.hypervisor_path);
        cmd.args(&args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::from(to_log))
            .stderr(Stdio::from(to_log2))
            .kill_on_drop(true);
        // SAFETY: Jail::enter only makes system calls on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || jail.enter());
        }
        debug!(?args, "starting {}", spec.hypervisor_path);
        let t_spawn = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| LauncherError::Spawn(spec.hypervisor_path.clone(), e))?;
        // our copies of the pipe's write end: the console reader sees end of
        // file when QEMU is gone
        drop(cmd);
        let pid = child.id().unwrap_or(0);
        {
            let mut st = self.state.lock().await;
            st.hypervisor_pid = pid;
            st.hypervisor_start = start_time(pid).unwrap_or(0);
            st.save(&self.paths)
                .map_err(io("writing", &self.paths.launcher_state()))?;
        }
        let qmp = match connect_qmp(&vm_dir.join("qmp.sock"), &mut child).await {
            Ok(q) => Arc::new(q),
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                let _ = tokio::time::timeout(CONSOLE_DRAIN_WAIT, console_done).await;
                return Err(LauncherError::Hypervisor(format!(
                    "{e}; console log {}: {}",
                    console.display(),
                    tail(&console)
                )));
            }
        };
        let hypervisor_start = t_spawn.elapsed();
        // QEMU made it (under a private umask); the guest has not run yet
        let qmp_sock = vm_dir.join("qmp.sock");
        if let Err(e) = files::chmod_nofollow(&qmp_sock, FILE_MODE) {
            warn!("chmod {}: {e}", qmp_sock.display());
        }
        info!(pid, ?accel, "hypervisor created (paused)");
        tokio::spawn(watch_ready(ready_listener, self.ready.clone()));
        tokio::spawn(watch_exit(
            child,
            qmp.clone(),
            self.exit.clone(),
            self.stop_requested.clone(),
            console_done,
        ));
        Ok(Running {
            pid,
            qmp,
            vsock,
            vsock_uds,
            paused: true,
            started: false,
            hypervisor_start,
        })
    }

    /// Lets the vCPUs run; waits up to `ready_timeout` for the agent's announcement.
    pub(crate) async fn start(&self, ready_timeout: Duration) -> Result<u64, LauncherError> {
        let t0 = Instant::now();
        {
            let mut inner = self.inner.lock().await;
            let r = inner
                .as_mut()
                .ok_or_else(|| LauncherError::State("no VM: call CreateVm first".into()))?;
            if r.started {
                return Err(LauncherError::State("the VM was already started".into()));
            }
            r.qmp.execute("cont", None).await?;
            r.started = true;
            r.paused = false;
        }
        info!("VM started");
        if ready_timeout.is_zero() {
            return Ok(0);
        }
        let mut ready = self.ready.subscribe();
        let mut exit = self.exit.subscribe();
        let wait = async {
            loop {
                if ready.borrow().is_some() {
                    return Ok(());
                }
                if let Some(e) = exit.borrow().clone() {
                    return Err(LauncherError::State(format!(
                        "the VM exited ({}) before the agent was ready; console log {}: {}",
                        e.reason,
                        self.console_path().display(),
                        tail(&self.console_path())
                    )));
                }
                tokio::select! {
                    _ = ready.changed() => {}
                    _ = exit.changed() => {}
                }
            }
        };
        match tokio::time::timeout(ready_timeout, wait).await {
            Ok(Ok(())) => {
                let at = self.ready.borrow().unwrap_or(t0);
                let us = at.saturating_duration_since(t0).as_micros() as u64;
                info!(ready_ms = us / 1000, "agent ready");
                Ok(us)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(LauncherError::Timeout(format!(
                "the agent did not announce itself within {ready_timeout:?}; console log {}: {}",
                self.console_path().display(),
                tail(&self.console_path())
            ))),
        }
    }

    fn console_path(&self) -> PathBuf {
        self.console
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Pauses (`pause = true`) or resumes the vCPUs.
    pub(crate) async fn set_paused(&self, pause: bool) -> Result<(), LauncherError> {
        let mut inner = self.inner.lock().await;
        let r = inner
            .as_mut()
            .ok_or_else(|| LauncherError::State("no VM: call CreateVm first".into()))?;
        if !r.started {
            return Err(LauncherError::State("the VM is not started".into()));
        }
        r.qmp
            .execute(if pause { "stop" } else { "cont" }, None)
            .await?;
        r.paused = pause;
        Ok(())
    }

    /// QMP `quit` (QEMU's orderly exit), then SIGKILL after `timeout` (0: the
    /// default). The guest is not asked: ending the sandbox in the guest is
    /// the shim's (the agent's `DestroySandbox`).
    pub(crate) async fn stop(&self, timeout: Duration) -> Result<VmExit, LauncherError> {
        let timeout = if timeout.is_zero() {
            STOP_TIMEOUT
        } else {
            timeout
        };
        let (pid, qmp) = {
            let inner = self.inner.lock().await;
            match inner.as_ref() {
                Some(r) => (r.pid, r.qmp.clone()),
                None => return Err(LauncherError::State("no VM: call CreateVm first".into())),
            }
        };
        if let Some(e) = self.exit.borrow().clone() {
            return Ok(e);
        }
        self.stop_requested.store(true, Ordering::SeqCst);
        let mut exit = self.exit.subscribe();
        // QEMU's own orderly exit; the guest is not asked (the shim ends the
        // sandbox in the guest before it stops the VM)
        let _ = qmp.execute("quit", None).await;
        if tokio::time::timeout(timeout, exit.wait_for(Option::is_some))
            .await
            .is_err()
        {
            warn!(pid, "QEMU did not quit within {timeout:?}; killing it");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = exit.wait_for(Option::is_some).await;
        }
        Ok(self.exit.borrow().clone().unwrap_or_default())
    }

    /// Waits for the VM to exit.
    pub(crate) async fn wait(&self) -> Result<VmExit, LauncherError> {
        if self.inner.lock().await.is_none() && self.exit.borrow().is_none() {
            return Err(LauncherError::State("no VM: call CreateVm first".into()));
        }
        let mut rx = self.exit.subscribe();
        let e = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| LauncherError::State("launcher shutting down".into()))?;
        Ok(e.clone().unwrap_or_default())
    }

    /// "created", "running", "paused" or "exited", the pid, the vsock socket, readiness.
    pub(crate) async fn status(&self) -> (String, u32, String, bool) {
        let inner = self.inner.lock().await;
        let ready = self.ready.borrow().is_some();
        if self.exit.borrow().is_some() {
            let uds = inner
                .as_ref()
                .map(|r| r.vsock_uds.display().to_string())
                .unwrap_or_default();
            return ("exited".into(), 0, uds, ready);
        }
        match inner.as_ref() {
            None => ("none".into(), 0, String::new(), false),
            Some(r) => {
                let s = if !r.started {
                    "created"
                } else if r.paused {
                    "paused"
                } else {
                    "running"
                };
                (s.into(), r.pid, r.vsock_uds.display().to_string(), ready)
            }
        }
    }

    /// Stops the VM if it runs and removes every resource of the sandbox.
    pub(crate) async fn teardown(&self) {
        let has_vm = self.inner.lock().await.is_some();
        if has_vm && self.exit.borrow().is_none() {
            let _ = self.stop(Duration::from_secs(3)).await;
        }
        if let Some(r) = self.inner.lock().await.as_mut() {
            if let Some(v) = r.vsock.take() {
                v.shutdown();
            }
        }
        let st = self.state.lock().await.clone();
        for (d, e) in cgroup::remove(&st.cgroups) {
            warn!("cannot remove cgroup {}: {e}", d.display());
        }
        // the hypervisor is gone (or was never there): its uid is free again
        if self.exit.borrow().is_some() || !has_vm {
            self.release_uid();
        }
        remove_sandbox_files(&self.paths);
        info!("sandbox resources removed");
    }
}

fn validate(mut spec: VmSpec, paths: &SandboxPaths) -> Result<VmSpec, LauncherError> {
    let bad = |m: String| Err(LauncherError::InvalidSpec(m));
    if spec.vcpus == 0 {
        spec.vcpus = 1;
    }
    if spec.vcpus > 255 {
        return bad(format!("vcpus = {}: at most 255", spec.vcpus));
    }
    if spec.memory_mib == 0 {
        spec.memory_mib = 512;
    }
    if spec.memory_mib < 64 || spec.memory_mib > 1 << 20 {
        return bad(format!(
            "memory_mib = {}: must be between 64 and 1048576",
            spec.memory_mib
        ));
    }
    for (name, p) in [
        ("kernel_path", &spec.kernel_path),
        ("initrd_path", &spec.initrd_path),
    ] {
        if p.is_empty() || !p.starts_with('/') {
            return bad(format!("{name} = {p:?}: an absolute path is required (build one with `kata-ctl image build`)"));
        }
    }
    if spec.machine_type.is_empty() {
        spec.machine_type = "q35".into();
    }
    if !matches!(spec.machine_type.as_str(), "q35" | "pc" | "microvm") {
        return bad(format!(
            "machine_type = {:?}: must be q35, pc or microvm",
            spec.machine_type
        ));
    }
    if spec.hypervisor_path.is_empty() {
        spec.hypervisor_path = kata_proto::config::Qemu::default()
            .path
            .display()
            .to_string();
    }
    if !spec.hypervisor_path.starts_with("/usr/") {
        return bad(format!(
            "hypervisor_path = {:?}: must be under /usr (the jail exposes /usr read-only)",
            spec.hypervisor_path
        ));
    }
    if !spec.cgroup_path.is_empty() {
        cgroup::validate(&spec.cgroup_path)?;
    }
    if !spec.virtiofs_socket.is_empty() {
        use std::os::unix::fs::FileTypeExt;
        let want = paths.virtiofsd_socket();
        if Path::new(&spec.virtiofs_socket) != want {
            return bad(format!(
                "virtiofs_socket = {:?}: kata-virtiofsd must listen on {} (the one place the jailed hypervisor reaches)",
                spec.virtiofs_socket,
                want.display()
            ));
        }
        if !std::fs::metadata(&want).is_ok_and(|m| m.file_type().is_socket()) {
            return bad(format!(
                "virtiofs_socket = {:?}: nothing listens there; start kata-virtiofsd --socket-path {} first",
                spec.virtiofs_socket,
                want.display()
            ));
        }
        if spec.virtiofs_tag.is_empty() {
            spec.virtiofs_tag = "kataShared".into();
        }
        if spec.virtiofs_tag.len() > 36
            || !spec
                .virtiofs_tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!(
                "virtiofs_tag = {:?}: 1-36 characters from [A-Za-z0-9_-]",
                spec.virtiofs_tag
            ));
        }
    }
    if !spec.netns_path.is_empty() && !Path::new(&spec.netns_path).exists() {
        return bad(format!("netns_path = {:?} does not exist", spec.netns_path));
    }
    Ok(spec)
}

fn resolve_accel(a: Accelerator) -> Result<Accelerator, LauncherError> {
    match a {
        Accelerator::Tcg => Ok(Accelerator::Tcg),
        Accelerator::Kvm => kata_proto::host::kvm_usable()
            .map(|_| Accelerator::Kvm)
            .map_err(|why| LauncherError::InvalidSpec(format!("accelerator kvm: {why}"))),
        Accelerator::Auto | Accelerator::Unspecified => {
            Ok(if kata_proto::host::kvm_usable().is_ok() {
                Accelerator::Kvm
            } else {
                Accelerator::Tcg
            })
        }
    }
}

fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

async fn connect_qmp(path: &Path, child: &mut tokio::process::Child) -> Result<Qmp, String> {
    let deadline = Instant::now() + QMP_SOCKET_WAIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("QEMU exited at start ({status})"));
        }
        if path.exists() {
            match Qmp::connect(path, QMP_TIMEOUT).await {
                Ok(q) => return Ok(q),
                // bound but not listening yet (bind creates the file first):
                // refused for a moment, so try again until the deadline
                Err(_) if Instant::now() < deadline => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "QEMU did not create {} within {QMP_SOCKET_WAIT:?}",
                path.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Accepts the agent's readiness connection(s) on `<uds>_1028` and keeps
/// the time of the first that says `READY`. Every connection is read on
/// its own task, for at most [`READY_LINE_DEADLINE`], so connections that
/// never speak delay nobody; at most [`READY_PENDING_MAX`] are read at once
/// (the vsock backend's cap on guest connections keeps the guest below it),
/// past it new ones are closed unread and counted. Once ready, new
/// connections are closed unread.
async fn watch_ready(l: tokio::net::UnixListener, ready: watch::Sender<Option<Instant>>) {
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

use tokio::io::AsyncReadExt as _;

/// Waits for QEMU to exit and publishes why.
async fn watch_exit(
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

/// The last lines of a log, for error messages (only its last few KiB are read).
pub(crate) fn tail(path: &Path) -> String {
    console::tail(path)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_validation() {
        let ok = VmSpec {
            kernel_path: "/k".into(),
            initrd_path: "/i".into(),
            ..Default::default()
        };
        let v = validate(ok.clone(), &SandboxPaths::in_dir("/nonexistent")).unwrap();
        assert_eq!(
            (v.vcpus, v.memory_mib, v.machine_type.as_str()),
            (1, 512, "q35")
        );
        for (spec, word) in [
            (
                VmSpec {
                    kernel_path: String::new(),
                    ..ok.clone()
                },
                "kernel_path",
            ),
            (
                VmSpec {
                    memory_mib: 10,
                    ..ok.clone()
                },
                "memory_mib",
            ),
            (
                VmSpec {
                    machine_type: "virt".into(),
                    ..ok.clone()
                },
                "machine_type",
            ),
            (
                VmSpec {
                    cgroup_path: "../x".into(),
                    ..ok.clone()
                },
                "../x",
            ),
            (
                VmSpec {
                    netns_path: "/nonexistent/ns".into(),
                    ..ok.clone()
                },
                "netns_path",
            ),
            (
                VmSpec {
                    hypervisor_path: "/opt/qemu".into(),
                    ..ok.clone()
                },
                "hypervisor_path",
            ),
            (
                VmSpec {
                    virtiofs_socket: "/tmp/elsewhere.sock".into(),
                    ..ok.clone()
                },
                "/nonexistent/vm/virtiofsd.sock",
            ),
            (
                VmSpec {
                    virtiofs_socket: "/nonexistent/vm/virtiofsd.sock".into(),
                    ..ok.clone()
                },
                "nothing listens there",
            ),
        ] {
            let e = validate(spec, &SandboxPaths::in_dir("/nonexistent"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(word), "{e}");
        }
    }

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

    #[test]
    fn nofile_limit_fits_the_caps() {
        let soft = crate::set_nofile_limit().unwrap();
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
