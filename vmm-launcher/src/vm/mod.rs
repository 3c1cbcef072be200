//! The launcher's one VM, owned by one task (Firecracker's API loop): the
//! gRPC server sends [`Command`]s over a channel and waits on a oneshot
//! reply; the task ([`Actor`]) applies them one at a time to a typed
//! [`VmState`], without locks. The VM's exit is published on a watch
//! channel, so `WaitVm` and `StopVm` wait outside the task, and the wait for
//! the agent's readiness after `StartVm` does too.
//!
//! ```text
//! Empty --Create--> Created --Start--> Running <--Pause/Resume--> Paused
//!                      \                  |                        /
//!                       +------ exit (StopVm, poweroff, crash) ---+--> Stopped
//! ```

mod hypervisor;
mod nic;
mod resize;
mod watch;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kata_proto::launcher::{
    Accelerator, NetDevice, ResizeVmRequest, ResizeVmResponse, VmExit, VmSpec, VmStatusResponse,
};
use kata_proto::paths::{self, ports, SandboxPaths};
use kata_proto::process::start_time;
use tokio::sync::{mpsc, oneshot, watch as wch};
use tracing::Instrument;
use tracing::{info, warn};

use crate::console;
use crate::leftovers::{remove_sandbox_files, State};
use crate::qmp::Qmp;
use crate::spec::{resolve_accel, validate};
use crate::uids::{UidAllocator, UidLease};
use crate::vsock::VsockBackend;
use crate::{cgroup, LauncherError};

/// How long StopVm waits for QEMU to quit before SIGKILL, by default.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the launcher's own teardown waits for QEMU to quit.
const TEARDOWN_STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// The reply channel of a command.
type Reply<T> = oneshot::Sender<Result<T, LauncherError>>;
/// The VM's exit, once known.
type ExitRx = wch::Receiver<Option<VmExit>>;

/// What the server asks of the VM's owner task.
pub(crate) enum Command {
    /// CreateVm: jail and start the hypervisor, paused.
    Create {
        spec: Box<VmSpec>,
        reply: Reply<Created>,
    },
    /// StartVm: let the vCPUs run.
    Start { reply: Reply<Starting> },
    /// PauseVm.
    Pause { reply: Reply<()> },
    /// ResumeVm.
    Resume { reply: Reply<()> },
    /// StopVm: QMP `quit`, SIGKILL after `timeout`; the reply is the exit to wait on.
    Stop {
        timeout: Duration,
        reply: Reply<ExitRx>,
    },
    /// WaitVm: the exit to wait on.
    Wait { reply: Reply<ExitRx> },
    /// VmStatus.
    Status { reply: Reply<VmStatusResponse> },
    /// AddNic: hot-plug a NIC.
    AddNic { dev: NetDevice, reply: Reply<()> },
    /// RemoveNic: unplug the hot-plugged NIC of a device.
    RemoveNic { tap: String, reply: Reply<()> },
    /// ResizeVm: hot-plug or unplug vCPUs, add memory.
    Resize {
        req: ResizeVmRequest,
        reply: Reply<ResizeVmResponse>,
    },
    /// Shutdown, SIGTERM, SIGINT: stop the VM and remove every resource.
    Shutdown { reply: Reply<()> },
}

/// CreateVm's result.
pub(crate) struct Created {
    /// The hypervisor's pid.
    pub(crate) pid: u32,
    /// The hybrid vsock socket.
    pub(crate) vsock_uds: PathBuf,
    /// The accelerator in use.
    pub(crate) accel: Accelerator,
    /// How long the hypervisor took to start (spawn to QMP answering).
    pub(crate) hypervisor_start: Duration,
}

/// StartVm's result: the vCPUs run; what to wait on for the agent.
pub(crate) struct Starting {
    ready: wch::Receiver<Option<Instant>>,
    exit: ExitRx,
    console: PathBuf,
}

/// The hypervisor's running parts.
struct Hypervisor {
    pid: u32,
    qmp: Arc<Qmp>,
    vsock: Option<VsockBackend>,
    vsock_uds: PathBuf,
    /// Spawn to QMP answering.
    start: Duration,
    /// The NICs, cold- and hot-plugged.
    nics: nic::Nics,
    /// vCPUs and memory, and their room to grow.
    resources: resize::Resources,
}

/// Where the VM is in its life.
enum VmState {
    /// No CreateVm yet.
    Empty,
    /// The hypervisor runs, the vCPUs have not.
    Created(Box<Hypervisor>),
    /// The vCPUs run.
    Running(Box<Hypervisor>),
    /// The vCPUs are paused (PauseVm).
    Paused(Box<Hypervisor>),
    /// The hypervisor exited; its parts wait for the teardown.
    Stopped { hv: Box<Hypervisor>, exit: VmExit },
}

impl VmState {
    fn hypervisor(&self) -> Option<&Hypervisor> {
        match self {
            VmState::Empty => None,
            VmState::Created(hv) | VmState::Running(hv) | VmState::Paused(hv) => Some(hv),
            VmState::Stopped { hv, .. } => Some(hv),
        }
    }

    /// The hypervisor of a VM that has not exited, or why there is none.
    fn live(&self) -> Result<&Hypervisor, LauncherError> {
        match self {
            VmState::Empty => Err(no_vm()),
            VmState::Stopped { exit, .. } => Err(exited(exit)),
            VmState::Created(hv) | VmState::Running(hv) | VmState::Paused(hv) => Ok(hv),
        }
    }
}

impl VmState {
    fn live_mut(&mut self) -> Result<&mut Hypervisor, LauncherError> {
        match self {
            VmState::Empty => Err(no_vm()),
            VmState::Stopped { exit, .. } => Err(exited(exit)),
            VmState::Created(hv) | VmState::Running(hv) | VmState::Paused(hv) => Ok(hv),
        }
    }
}

fn no_vm() -> LauncherError {
    LauncherError::State("no VM: call CreateVm first".into())
}

fn exited(e: &VmExit) -> LauncherError {
    LauncherError::State(format!("the VM has exited ({})", e.reason))
}

/// The handle the server holds: sends commands to the VM's owner task.
#[derive(Clone)]
pub(crate) struct Vm {
    /// Commands, each with the caller's span (the actor works in it).
    tx: mpsc::Sender<(Command, tracing::Span)>,
}

impl Vm {
    /// Starts the owner task of the VM of `sandbox_id` in `paths`; nothing is
    /// created yet.
    pub(crate) fn spawn(sandbox_id: &str, paths: SandboxPaths) -> Vm {
        let (tx, rx) = mpsc::channel(16);
        let actor = Actor {
            sandbox_id: sandbox_id.into(),
            record: State {
                launcher_pid: std::process::id(),
                ..Default::default()
            },
            state: VmState::Empty,
            exit: wch::channel(None).0,
            ready: wch::channel(None).0,
            stop_requested: Arc::new(AtomicBool::new(false)),
            console: paths.console_log(),
            uids: None,
            uid_lease: None,
            paths,
        };
        tokio::spawn(actor.run(rx));
        Vm { tx }
    }

    async fn call<T>(&self, cmd: impl FnOnce(Reply<T>) -> Command) -> Result<T, LauncherError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((cmd(reply), tracing::Span::current()))
            .await
            .map_err(|_| LauncherError::Gone)?;
        rx.await.map_err(|_| LauncherError::Gone)?
    }

    /// Creates the VM, paused.
    pub(crate) async fn create(&self, spec: VmSpec) -> Result<Created, LauncherError> {
        let spec = Box::new(spec);
        self.call(|reply| Command::Create { spec, reply }).await
    }

    /// Lets the vCPUs run; waits up to `ready_timeout` for the agent's
    /// announcement (0: not at all). Returns the microseconds it took.
    pub(crate) async fn start(&self, ready_timeout: Duration) -> Result<u64, LauncherError> {
        let t0 = Instant::now();
        let Starting {
            mut ready,
            mut exit,
            console,
        } = self.call(|reply| Command::Start { reply }).await?;
        if ready_timeout.is_zero() {
            return Ok(0);
        }
        let wait = async {
            loop {
                if ready.borrow().is_some() {
                    return Ok(());
                }
                if let Some(e) = exit.borrow().clone() {
                    return Err(LauncherError::State(format!(
                        "the VM exited ({}) before the agent was ready; console log {}: {}",
                        e.reason,
                        console.display(),
                        console::tail(&console)
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
                let at = ready.borrow().unwrap_or(t0);
                let us = at.saturating_duration_since(t0).as_micros() as u64;
                info!(ready_ms = us / 1000, "agent ready");
                Ok(us)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(LauncherError::Timeout(format!(
                "the agent did not announce itself within {ready_timeout:?}; console log {}: {}",
                console.display(),
                console::tail(&console)
            ))),
        }
    }

    /// Pauses the vCPUs.
    pub(crate) async fn pause(&self) -> Result<(), LauncherError> {
        self.call(|reply| Command::Pause { reply }).await
    }

    /// Resumes the vCPUs.
    pub(crate) async fn resume(&self) -> Result<(), LauncherError> {
        self.call(|reply| Command::Resume { reply }).await
    }

    /// QMP `quit` (QEMU's orderly exit), then SIGKILL after `timeout` (0: the
    /// default). The guest is not asked: ending the sandbox in the guest is
    /// the shim's (the agent's `DestroySandbox`).
    pub(crate) async fn stop(&self, timeout: Duration) -> Result<VmExit, LauncherError> {
        let rx = self.call(|reply| Command::Stop { timeout, reply }).await?;
        exit_of(rx).await
    }

    /// Waits for the VM to exit.
    pub(crate) async fn wait(&self) -> Result<VmExit, LauncherError> {
        let rx = self.call(|reply| Command::Wait { reply }).await?;
        exit_of(rx).await
    }

    /// The state, the pid, the vsock socket, readiness.
    pub(crate) async fn status(&self) -> Result<VmStatusResponse, LauncherError> {
        self.call(|reply| Command::Status { reply }).await
    }

    /// Hot-plugs the NIC of `dev` into the VM.
    pub(crate) async fn add_nic(&self, dev: NetDevice) -> Result<(), LauncherError> {
        self.call(|reply| Command::AddNic { dev, reply }).await
    }

    /// Unplugs the hot-plugged NIC of `tap`.
    pub(crate) async fn remove_nic(&self, tap: String) -> Result<(), LauncherError> {
        self.call(|reply| Command::RemoveNic { tap, reply }).await
    }

    /// Resizes the running VM.
    pub(crate) async fn resize(
        &self,
        req: ResizeVmRequest,
    ) -> Result<ResizeVmResponse, LauncherError> {
        self.call(|reply| Command::Resize { req, reply }).await
    }

    /// Stops the VM if it runs and removes every resource of the sandbox.
    pub(crate) async fn teardown(&self) {
        if let Err(e) = self.call(|reply| Command::Shutdown { reply }).await {
            warn!("teardown: {e}");
        }
    }
}

async fn exit_of(mut rx: ExitRx) -> Result<VmExit, LauncherError> {
    let e = rx
        .wait_for(Option::is_some)
        .await
        .map_err(|_| LauncherError::Gone)?;
    Ok(e.clone().unwrap_or_default())
}

/// QMP `quit`, then SIGKILL if QEMU is still there after `timeout`; returns
/// once it is gone.
async fn quit_then_kill(qmp: Arc<Qmp>, pid: u32, mut exit: ExitRx, timeout: Duration) {
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
}

/// The VM's owner task.
struct Actor {
    sandbox_id: String,
    paths: SandboxPaths,
    state: VmState,
    /// What `launcher.json` says (written on every change).
    record: State,
    exit: wch::Sender<Option<VmExit>>,
    ready: wch::Sender<Option<Instant>>,
    /// Set by StopVm and the teardown: the exit is reported as "stopped".
    stop_requested: Arc<AtomicBool>,
    console: PathBuf,
    uids: Option<UidAllocator>,
    uid_lease: Option<UidLease>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<(Command, tracing::Span)>) {
        let mut exit = self.exit.subscribe();
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some((cmd, span)) => self.apply(cmd).instrument(span).await,
                    None => break,
                },
                Ok(()) = exit.changed() => self.note_exit(),
            }
        }
    }

    /// Moves to `Stopped` once the exit watcher reported.
    fn note_exit(&mut self) {
        let Some(exit) = self.exit.borrow().clone() else {
            return;
        };
        self.state = match std::mem::replace(&mut self.state, VmState::Empty) {
            VmState::Created(hv) | VmState::Running(hv) | VmState::Paused(hv) => {
                VmState::Stopped { hv, exit }
            }
            other => other,
        };
    }

    async fn apply(&mut self, cmd: Command) {
        self.note_exit();
        // a reply nobody waits for any more (the caller went away) is dropped
        match cmd {
            Command::Create { spec, reply } => {
                let _ = reply.send(self.create(*spec).await);
            }
            Command::Start { reply } => {
                let _ = reply.send(self.start().await);
            }
            Command::Pause { reply } => {
                let _ = reply.send(self.set_paused(true).await);
            }
            Command::Resume { reply } => {
                let _ = reply.send(self.set_paused(false).await);
            }
            Command::Stop { timeout, reply } => {
                let _ = reply.send(self.stop(timeout));
            }
            Command::Wait { reply } => {
                let _ = reply.send(match self.state {
                    VmState::Empty => Err(no_vm()),
                    _ => Ok(self.exit.subscribe()),
                });
            }
            Command::Status { reply } => {
                let _ = reply.send(Ok(self.status()));
            }
            Command::AddNic { dev, reply } => {
                let r = match self.state.live_mut() {
                    Ok(hv) => hv.nics.add(&hv.qmp, dev).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::RemoveNic { tap, reply } => {
                let r = match self.state.live_mut() {
                    Ok(hv) => hv.nics.remove(&hv.qmp, &tap).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::Resize { req, reply } => {
                let r = match self.state.live_mut() {
                    Ok(hv) => hv.resources.resize(&hv.qmp, req).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::Shutdown { reply } => {
                self.teardown().await;
                let _ = reply.send(Ok(()));
            }
        }
    }

    async fn create(&mut self, spec: VmSpec) -> Result<Created, LauncherError> {
        if !matches!(self.state, VmState::Empty) {
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
            Ok(hv) => {
                if let Some(l) = self.uid_lease.as_mut() {
                    if let Err(e) = l.record(hv.pid, start_time(hv.pid).unwrap_or(0)) {
                        warn!("recording the hypervisor in its uid lock: {e}");
                    }
                }
                let created = Created {
                    pid: hv.pid,
                    vsock_uds: hv.vsock_uds.clone(),
                    accel,
                    hypervisor_start: hv.start,
                };
                self.state = VmState::Created(Box::new(hv));
                Ok(created)
            }
            Err(e) => {
                // nothing of a failed create stays behind
                self.uid_lease = None;
                cgroup::remove(&cgroups);
                let _ = std::fs::remove_dir_all(&vm_dir);
                let _ = std::fs::remove_dir(self.paths.jail_root());
                for p in [
                    self.paths.vsock_uds(),
                    paths::hybrid_listener_path(&self.paths.vsock_uds(), ports::READY),
                ] {
                    let _ = std::fs::remove_file(p);
                }
                self.record.cgroups.clear();
                self.record.uid_lock = None;
                let _ = self.record.save(&self.paths);
                Err(e)
            }
        }
    }

    async fn start(&mut self) -> Result<Starting, LauncherError> {
        let hv = match std::mem::replace(&mut self.state, VmState::Empty) {
            VmState::Created(hv) => hv,
            other => {
                let e = match &other {
                    VmState::Running(_) | VmState::Paused(_) => {
                        LauncherError::State("the VM was already started".into())
                    }
                    s => s.live().err().unwrap_or_else(no_vm),
                };
                self.state = other;
                return Err(e);
            }
        };
        let cont = hv.qmp.execute("cont", None).await;
        if let Err(e) = cont {
            self.state = VmState::Created(hv);
            return Err(e.into());
        }
        self.state = VmState::Running(hv);
        info!("VM started");
        Ok(Starting {
            ready: self.ready.subscribe(),
            exit: self.exit.subscribe(),
            console: self.console.clone(),
        })
    }

    async fn set_paused(&mut self, pause: bool) -> Result<(), LauncherError> {
        let was_paused = matches!(self.state, VmState::Paused(_));
        let hv = match std::mem::replace(&mut self.state, VmState::Empty) {
            VmState::Running(hv) | VmState::Paused(hv) => hv,
            other => {
                let e = match &other {
                    VmState::Created(_) => LauncherError::State("the VM is not started".into()),
                    s => s.live().err().unwrap_or_else(no_vm),
                };
                self.state = other;
                return Err(e);
            }
        };
        let r = hv
            .qmp
            .execute(if pause { "stop" } else { "cont" }, None)
            .await;
        // on an error the vCPUs are where they were
        let paused = if r.is_ok() { pause } else { was_paused };
        self.state = if paused {
            VmState::Paused(hv)
        } else {
            VmState::Running(hv)
        };
        r.map(|_| ()).map_err(LauncherError::from)
    }

    fn stop(&mut self, timeout: Duration) -> Result<ExitRx, LauncherError> {
        let timeout = if timeout.is_zero() {
            STOP_TIMEOUT
        } else {
            timeout
        };
        let hv = match &self.state {
            VmState::Empty => return Err(no_vm()),
            VmState::Stopped { .. } => return Ok(self.exit.subscribe()),
            VmState::Created(hv) | VmState::Running(hv) | VmState::Paused(hv) => hv,
        };
        self.stop_requested.store(true, Ordering::SeqCst);
        // the task keeps taking commands (WaitVm, VmStatus) meanwhile
        tokio::spawn(quit_then_kill(
            hv.qmp.clone(),
            hv.pid,
            self.exit.subscribe(),
            timeout,
        ));
        Ok(self.exit.subscribe())
    }

    fn status(&self) -> VmStatusResponse {
        let agent_ready = self.ready.borrow().is_some();
        let uds = |hv: &Hypervisor| hv.vsock_uds.display().to_string();
        let (state, hypervisor_pid, vsock_uds_path, agent_ready) = match &self.state {
            VmState::Empty => ("none", 0, String::new(), false),
            VmState::Created(hv) => ("created", hv.pid, uds(hv), agent_ready),
            VmState::Running(hv) => ("running", hv.pid, uds(hv), agent_ready),
            VmState::Paused(hv) => ("paused", hv.pid, uds(hv), agent_ready),
            VmState::Stopped { hv, .. } => ("exited", 0, uds(hv), agent_ready),
        };
        VmStatusResponse {
            state: state.into(),
            hypervisor_pid,
            vsock_uds_path,
            agent_ready,
        }
    }

    async fn teardown(&mut self) {
        if let Ok(hv) = self.state.live() {
            self.stop_requested.store(true, Ordering::SeqCst);
            let (qmp, pid) = (hv.qmp.clone(), hv.pid);
            quit_then_kill(qmp, pid, self.exit.subscribe(), TEARDOWN_STOP_TIMEOUT).await;
            self.note_exit();
        }
        let has_vm = self.state.hypervisor().is_some();
        if let VmState::Stopped { hv, .. } = &mut self.state {
            if let Some(v) = hv.vsock.take() {
                v.shutdown();
            }
        }
        for (d, e) in cgroup::remove(&self.record.cgroups) {
            warn!("cannot remove cgroup {}: {e}", d.display());
        }
        // the hypervisor is gone (or was never there): its uid is free again
        if self.exit.borrow().is_some() || !has_vm {
            self.uid_lease = None;
        }
        remove_sandbox_files(&self.paths);
        info!("sandbox resources removed");
    }
}
