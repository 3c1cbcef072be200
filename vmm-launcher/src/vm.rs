//! One VM: create (jailed QEMU, paused, vsock backend listening), start, pause,
//! resume, stop, wait, and a teardown that always happens.
//!
//! The launcher owns exactly one VM. Its state lives behind one async mutex
//! (commands are applied one at a time); the VM's exit is published on a watch
//! channel so `WaitVm` never holds the lock.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kata_proto::launcher::{Accelerator, VmExit, VmSpec};
use kata_proto::paths::{self, ports, SandboxPaths};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{watch, Mutex};
use tracing::{debug, info, warn};

use crate::jail::{self, Jail, JailSpec};
use crate::qemu::{self, QemuArgs};
use crate::qmp::Qmp;
use crate::vsock::{VsockBackend, VsockConfig};
use crate::{cgroup, LauncherError};

/// Deadline of one QMP command.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long QEMU may take to create its QMP socket.
const QMP_SOCKET_WAIT: Duration = Duration::from_secs(10);
/// Default graceful stop timeout.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What the launcher writes to `launcher.json`, so `cleanup` can undo a VM whose
/// launcher died.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    /// The launcher's pid.
    pub launcher_pid: u32,
    /// The hypervisor's pid, 0 before it runs.
    pub hypervisor_pid: u32,
    /// The hypervisor's start time (field 22 of /proc/PID/stat), to tell a
    /// reused pid from ours.
    pub hypervisor_start: u64,
    /// cgroup directories the launcher created.
    pub cgroups: Vec<PathBuf>,
}

impl State {
    /// Reads the state file of `paths`, if any.
    pub fn load(paths: &SandboxPaths) -> Option<State> {
        let text = std::fs::read_to_string(paths.launcher_state()).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn save(&self, paths: &SandboxPaths) -> std::io::Result<()> {
        let tmp = paths.dir.join(".launcher.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(self).unwrap_or_default())?;
        std::fs::rename(tmp, paths.launcher_state())
    }
}

/// Start time of `pid` (clock ticks since boot), if it runs.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name may hold spaces and parentheses: fields start after the last ')'
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The VM's running parts.
struct Running {
    pid: u32,
    qmp: Arc<Qmp>,
    vsock: Option<VsockBackend>,
    accel: Accelerator,
    vsock_uds: PathBuf,
    paused: bool,
    started: bool,
    hypervisor_start: Duration,
}

/// The launcher's one VM.
pub struct Vm {
    sandbox_id: String,
    paths: SandboxPaths,
    inner: Mutex<Option<Running>>,
    state: Mutex<State>,
    exit: watch::Sender<Option<VmExit>>,
    ready: watch::Sender<Option<Instant>>,
    stop_requested: Arc<AtomicBool>,
    console: std::sync::Mutex<PathBuf>,
}

impl Vm {
    /// A launcher for `sandbox_id` in `paths`, nothing created yet.
    pub fn new(sandbox_id: &str, paths: SandboxPaths) -> Vm {
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
            paths,
        }
    }

    /// Prepares the jailed, paused hypervisor with the vsock backend listening.
    /// Creates the VM, paused; returns the hypervisor's pid, the hybrid vsock
    /// socket, the accelerator and how long the hypervisor took to start.
    pub async fn create(
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
        let uid = if spec.jail_uid == 0 {
            jail::uid_for(&self.sandbox_id)
        } else {
            spec.jail_uid
        };
        let mut cgroups = vec![];
        let result = self.spawn(&spec, accel, &vm_dir, uid, &mut cgroups).await;
        match result {
            Ok(r) => {
                let out = (r.pid, r.vsock_uds.clone(), accel, r.hypervisor_start);
                *inner = Some(r);
                Ok(out)
            }
            Err(e) => {
                // nothing of a failed create stays behind
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
        std::fs::create_dir_all(vm_dir).map_err(io("creating", vm_dir))?;
        std::fs::create_dir_all(self.paths.jail_root())
            .map_err(io("creating", &self.paths.jail_root()))?;
        std::fs::set_permissions(vm_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("chmod", vm_dir))?;
        nix::unistd::chown(vm_dir, Some(uid.into()), Some(uid.into()))
            .map_err(|e| LauncherError::Io(format!("chown {}", vm_dir.display()), e.into()))?;

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
            nix::unistd::chown(&vhost_socket, Some(uid.into()), Some(uid.into())).map_err(|e| {
                LauncherError::Io(format!("chown {}", vhost_socket.display()), e.into())
            })?;
            Some(b)
        };

        if !spec.virtiofs_socket.is_empty() {
            // the jailed hypervisor runs as `uid`: it must be able to connect
            let fs = Path::new(&spec.virtiofs_socket);
            nix::unistd::chown(fs, Some(uid.into()), Some(uid.into()))
                .map_err(|e| LauncherError::Io(format!("chown {}", fs.display()), e.into()))?;
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
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console)
            .map_err(io("opening the console log", &console))?;
        *self.console.lock().unwrap_or_else(|p| p.into_inner()) = console.clone();
        let log2 = log
            .try_clone()
            .map_err(io("opening the console log", &console))?;
        let mut cmd = tokio::process::Command::new(&spec.hypervisor_path);
        cmd.args(&args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
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
                return Err(LauncherError::Hypervisor(format!(
                    "{e}; console log {}: {}",
                    console.display(),
                    tail(&console)
                )));
            }
        };
        let hypervisor_start = t_spawn.elapsed();
        info!(pid, ?accel, "hypervisor created (paused)");
        tokio::spawn(watch_ready(ready_listener, self.ready.clone()));
        tokio::spawn(watch_exit(
            child,
            qmp.clone(),
            self.exit.clone(),
            self.stop_requested.clone(),
        ));
        Ok(Running {
            pid,
            qmp,
            vsock,
            accel,
            vsock_uds,
            paused: true,
            started: false,
            hypervisor_start,
        })
    }

    /// Lets the vCPUs run; waits up to `ready_timeout` for the agent's announcement.
    pub async fn start(&self, ready_timeout: Duration) -> Result<u64, LauncherError> {
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
    pub async fn set_paused(&self, pause: bool) -> Result<(), LauncherError> {
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

    /// Graceful stop (the agent's `DestroySandbox`), then `quit`, then SIGKILL.
    pub async fn stop(&self, timeout: Duration) -> Result<VmExit, LauncherError> {
        let timeout = if timeout.is_zero() {
            STOP_TIMEOUT
        } else {
            timeout
        };
        let (pid, qmp, uds, started) = {
            let inner = self.inner.lock().await;
            match inner.as_ref() {
                Some(r) => (
                    r.pid,
                    r.qmp.clone(),
                    r.vsock_uds.clone(),
                    r.started && !r.paused,
                ),
                None => return Err(LauncherError::State("no VM: call CreateVm first".into())),
            }
        };
        if let Some(e) = self.exit.borrow().clone() {
            return Ok(e);
        }
        self.stop_requested.store(true, Ordering::SeqCst);
        let mut exit = self.exit.subscribe();
        let exited = |rx: &mut watch::Receiver<Option<VmExit>>, d: Duration| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(d, rx.wait_for(Option::is_some))
                    .await
                    .is_ok()
            }
        };
        if started && self.ready.borrow().is_some() {
            if let Err(e) = destroy_sandbox(&uds, timeout).await {
                debug!("graceful stop through the agent failed: {e}");
            }
            if exited(&mut exit, timeout).await {
                return Ok(self.exit.borrow().clone().unwrap_or_default());
            }
            warn!("the guest did not power off within {timeout:?}; quitting QEMU");
        }
        let _ = qmp.execute("quit", None).await;
        if !exited(&mut exit, Duration::from_secs(3)).await {
            warn!(pid, "QEMU did not quit; killing it");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = exit.wait_for(Option::is_some).await;
        }
        Ok(self.exit.borrow().clone().unwrap_or_default())
    }

    /// Waits for the VM to exit.
    pub async fn wait(&self) -> Result<VmExit, LauncherError> {
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
    pub async fn status(&self) -> (String, u32, String, bool) {
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

    /// The accelerator in use.
    pub async fn accelerator(&self) -> Option<Accelerator> {
        self.inner.lock().await.as_ref().map(|r| r.accel)
    }

    /// Stops the VM if it runs and removes every resource of the sandbox.
    pub async fn teardown(&self) {
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
        remove_sandbox_files(&self.paths);
        info!("sandbox resources removed");
    }
}

/// Removes what a launcher puts in the sandbox directory, then the directory if
/// it is empty (the shim may keep files of its own there).
pub fn remove_sandbox_files(p: &SandboxPaths) {
    let _ = std::fs::remove_dir_all(p.vm_dir());
    let _ = std::fs::remove_dir(p.jail_root());
    for f in [
        p.vsock_uds(),
        paths::hybrid_listener_path(&p.vsock_uds(), ports::READY),
        p.launcher_socket(),
        p.launcher_state(),
        p.console_log(),
    ] {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_dir(&p.dir);
}

/// Undoes what a dead launcher left: kills its hypervisor (if the pid is still
/// ours), removes its cgroups and files. Refuses while the launcher runs.
pub fn cleanup(p: &SandboxPaths) -> Result<(), LauncherError> {
    if let Some(st) = State::load(p) {
        if st.launcher_pid != std::process::id()
            && start_time(st.launcher_pid).is_some()
            && is_launcher(st.launcher_pid)
        {
            return Err(LauncherError::State(format!(
                "the launcher (pid {}) of this sandbox still runs: use its Shutdown call",
                st.launcher_pid
            )));
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
    }
    remove_sandbox_files(p);
    Ok(())
}

/// SIGKILLs `pid` if it is still the process that started at `start` (clock
/// ticks since boot; a reused pid is left alone), and waits up to 2 s for it
/// to be gone.
pub fn kill_if_same(pid: u32, start: u64) {
    if pid == 0 || start_time(pid) != Some(start) {
        return;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    for _ in 0..100 {
        if start_time(pid) != Some(start) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` runs kata-vmm-launcher (its command line names it).
pub fn is_launcher(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("kata-vmm-launcher"))
        .unwrap_or(false)
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

/// Accepts the agent's readiness connection(s) on `<uds>_1028`.
async fn watch_ready(l: tokio::net::UnixListener, ready: watch::Sender<Option<Instant>>) {
    while let Ok((s, _)) = l.accept().await {
        let at = Instant::now();
        let mut line = String::new();
        let mut r = tokio::io::BufReader::new(s);
        let read = tokio::time::timeout(
            Duration::from_secs(2),
            (&mut r).take(256).read_line(&mut line),
        )
        .await;
        if matches!(read, Ok(Ok(_))) && line.starts_with("READY") {
            info!(announce = line.trim(), "agent announced itself");
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
    }
}

use tokio::io::AsyncReadExt as _;

/// Waits for QEMU to exit and publishes why.
async fn watch_exit(
    mut child: tokio::process::Child,
    qmp: Arc<Qmp>,
    exit: watch::Sender<Option<VmExit>>,
    stop_requested: Arc<AtomicBool>,
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

/// Asks the agent to end the sandbox (it powers the guest off).
async fn destroy_sandbox(uds: &Path, timeout: Duration) -> Result<(), String> {
    let addr = kata_proto::dialer::Address::Hybrid {
        path: uds.into(),
        port: ports::AGENT,
    };
    let ch = kata_proto::dialer::channel(&addr, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let mut c = kata_proto::agent::agent_service_client::AgentServiceClient::new(ch);
    tokio::time::timeout(
        timeout,
        c.destroy_sandbox(kata_proto::agent::DestroySandboxRequest {}),
    )
    .await
    .map_err(|_| "DestroySandbox timed out".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// The last lines of a log, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(8);
    if lines.is_empty() {
        "(empty)".into()
    } else {
        lines[start..].join(" | ")
    }
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

    #[test]
    fn stat_start_time() {
        assert!(start_time(std::process::id()).is_some());
        assert!(start_time(u32::MAX).is_none());
    }

    #[test]
    fn state_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let p = SandboxPaths::in_dir(d.path());
        let s = State {
            launcher_pid: 1,
            hypervisor_pid: 2,
            hypervisor_start: 3,
            cgroups: vec!["/x".into()],
        };
        s.save(&p).unwrap();
        assert_eq!(State::load(&p), Some(s));
    }
}
