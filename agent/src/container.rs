//! Containers and their processes, as the agent keeps them: creation through
//! the set-up helper ([`crate::childinit`]), start, exec, exit tracking.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_spec::runtime::{Process as OciProcess, Spec};
use tokio::sync::watch;
use tonic::Status;
use tracing::{debug, info};

use crate::cgroup::ContainerCgroup;
use crate::childinit::{self, ChildMode, ChildMsg, ChildRequest, SetupCode};
use crate::mounts::check_container_path;
use crate::reaper::{self, ExitStatus};
use crate::stdio::Stdio;

/// How long the set-up helper may take to report.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// After an exit, how long output held open by other processes may delay
/// the exit report.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Set up, waiting for StartContainer.
    Created,
    /// Its process runs.
    Running,
    /// Frozen.
    Paused,
    /// Its process ended.
    Stopped,
}

/// One process: a container's init or an exec.
#[derive(Debug)]
pub struct Process {
    /// Empty for the container's init process.
    pub exec_id: String,
    /// Its pid as the agent sees it.
    pub pid: i32,
    /// Its stdio.
    pub stdio: Arc<Stdio>,
    exit: watch::Receiver<Option<ExitStatus>>,
}

impl Process {
    fn new(
        exec_id: String,
        pid: i32,
        stdio: Arc<Stdio>,
    ) -> (Arc<Process>, watch::Sender<Option<ExitStatus>>) {
        let (tx, rx) = watch::channel(None);
        (
            Arc::new(Process {
                exec_id,
                pid,
                stdio,
                exit: rx,
            }),
            tx,
        )
    }

    /// The exit status, once it exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Waits for the exit, then for the output to be delivered.
    pub async fn wait(&self) -> ExitStatus {
        let mut rx = self.exit.clone();
        let status = match rx.wait_for(|s| s.is_some()).await {
            Ok(s) => s.unwrap_or(ExitStatus::Signaled(libc::SIGKILL)),
            Err(_) => ExitStatus::Signaled(libc::SIGKILL),
        };
        self.stdio.drained(DRAIN_GRACE).await;
        status
    }

    /// Sends a signal; NotFound once the process has exited.
    pub fn signal(&self, sig: i32) -> Result<(), Status> {
        if self.exited().is_some() {
            return Err(Status::not_found(format!(
                "process {} has already exited",
                self.pid
            )));
        }
        // SAFETY: kill takes integers only.
        if unsafe { libc::kill(self.pid, sig) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ESRCH) => Status::not_found(format!("process {} is gone", self.pid)),
                Some(libc::EINVAL) => {
                    Status::invalid_argument(format!("signal {sig} is not a signal"))
                }
                _ => Status::internal(format!("kill {} {sig}: {e}", self.pid)),
            });
        }
        Ok(())
    }
}

/// A container.
#[derive(Debug)]
pub struct Container {
    /// Its id.
    pub id: String,
    /// The spec it was created with.
    pub spec: Spec,
    /// Its cgroup.
    pub cgroup: Arc<ContainerCgroup>,
    /// Its first process.
    pub init: Arc<Process>,
    /// Processes started with ExecProcess, by exec id.
    pub execs: Mutex<HashMap<String, Arc<Process>>>,
    state: Arc<Mutex<State>>,
    start: Mutex<Option<UnixStream>>,
    /// Storages mounted for this container (unmounted on removal).
    pub storages: Vec<PathBuf>,
    /// The OOM watcher task.
    pub oom_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Apply the spec's seccomp.
    pub seccomp: bool,
}

impl Container {
    /// Its state.
    pub fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets its state (not once stopped).
    pub fn set_state(&self, s: State) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *st != State::Stopped {
            *st = s;
        }
    }

    /// A process by exec id (empty: init).
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, Status> {
        if exec_id.is_empty() || exec_id == self.id {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                Status::not_found(format!(
                    "container {} has no process with exec id {exec_id:?}",
                    self.id
                ))
            })
    }

    /// Lets the waiting container process run.
    pub async fn start(self: &Arc<Self>) -> Result<(), Status> {
        match self.state() {
            State::Created => {}
            s => {
                return Err(Status::failed_precondition(format!(
                    "container {} is {s:?}, not Created: it can start only once",
                    self.id
                )))
            }
        }
        let sock = self
            .start
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| Status::failed_precondition("container is already starting"))?;
        let id = self.id.clone();
        let r = tokio::task::spawn_blocking(move || -> Result<(), Status> {
            let mut sock = sock;
            sock.write_all(b"S").map_err(|e| {
                Status::failed_precondition(format!("container {id}'s process is gone: {e}"))
            })?;
            match childinit::recv::<ChildMsg>(&mut sock) {
                Ok(None) => Ok(()),
                Ok(Some(ChildMsg::Error { code, message })) => Err(status_from(code, message)),
                Ok(Some(other)) => Err(Status::internal(format!(
                    "unexpected set-up message {other:?}"
                ))),
                Err(e) => Err(Status::internal(format!("starting container {id}: {e}"))),
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        if r.is_ok() {
            self.set_state(State::Running);
        }
        r
    }
}

/// A gRPC status from the helper's failure.
pub fn status_from(code: SetupCode, message: String) -> Status {
    Status::new(code.into(), message)
}

/// Checks an id from a request (`what`: `sandbox_id`, `container_id`,
/// `exec_id`) by the one rule of [`kata_proto::ids`].
pub fn check_id(what: &'static str, id: &str) -> Result<(), Status> {
    kata_proto::ids::check(what, id).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Parses and checks a spec: what can be refused before any work is done.
pub fn parse_spec(json: &str) -> Result<Spec, Status> {
    if json.trim().is_empty() {
        return Err(Status::invalid_argument(
            "oci_spec_json is empty: give the container's OCI spec",
        ));
    }
    let spec: Spec = serde_json::from_str(json)
        .map_err(|e| Status::invalid_argument(format!("the OCI spec does not parse: {e}")))?;
    let root = spec.root().as_ref().ok_or_else(|| {
        Status::invalid_argument("the OCI spec has no root: set root.path to the rootfs")
    })?;
    let rootfs = root.path();
    if !rootfs.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "root.path {} must be an absolute path in the guest",
            rootfs.display()
        )));
    }
    match std::fs::metadata(rootfs) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Status::invalid_argument(format!(
                "root.path {} is not a directory",
                rootfs.display()
            )))
        }
        Err(e) => {
            return Err(Status::invalid_argument(format!(
                "root.path {}: {e}: the rootfs must exist before CreateContainer (mount its storage first)",
                rootfs.display()
            )))
        }
    }
    for m in spec.mounts().clone().unwrap_or_default() {
        let d = m.destination().to_string_lossy();
        check_container_path(&d)
            .map_err(|e| Status::invalid_argument(format!("mount destination: {e}")))?;
    }
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("the OCI spec has no process"))?;
    check_process(process)?;
    if let Some(linux) = spec.linux() {
        for ns in linux.namespaces().clone().unwrap_or_default() {
            use oci_spec::runtime::LinuxNamespaceType as T;
            if matches!(ns.typ(), T::User | T::Time) {
                return Err(Status::invalid_argument(format!(
                    "{} namespaces are not supported by kata-agent; remove it from linux.namespaces",
                    ns.typ()
                )));
            }
        }
    } else {
        return Err(Status::invalid_argument(
            "the OCI spec has no linux section",
        ));
    }
    Ok(spec)
}

/// Checks a process: arguments, user ids, working directory.
pub fn check_process(p: &OciProcess) -> Result<(), Status> {
    if p.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(Status::invalid_argument(
            "process.args is empty: give the program to run",
        ));
    }
    let u = p.user();
    for (what, id) in [("uid", u.uid()), ("gid", u.gid())] {
        if id == u32::MAX {
            return Err(Status::invalid_argument(format!(
                "process.user.{what} {id} is not a valid id ((uid_t)-1 means \"no change\")"
            )));
        }
    }
    for g in u.additional_gids().clone().unwrap_or_default() {
        if g == u32::MAX {
            return Err(Status::invalid_argument(format!(
                "process.user.additionalGids contains {g}, not a valid id"
            )));
        }
    }
    if !p.cwd().is_absolute() {
        return Err(Status::invalid_argument(format!(
            "process.cwd {} must be absolute",
            p.cwd().display()
        )));
    }
    Ok(())
}

/// Applies Kata's `string_user` (ids already resolved by the runtime).
pub fn apply_string_user(
    p: &mut OciProcess,
    su: Option<&kata_proto::agent::StringUser>,
) -> Result<(), Status> {
    let Some(su) = su else { return Ok(()) };
    let parse = |what: &str, s: &str| {
        s.parse::<u32>().map_err(|_| {
            Status::invalid_argument(format!("string_user.{what} {s:?} is not a number"))
        })
    };
    let mut user = p.user().clone();
    if !su.uid.is_empty() {
        user.set_uid(parse("uid", &su.uid)?);
    }
    if !su.gid.is_empty() {
        user.set_gid(parse("gid", &su.gid)?);
    }
    if !su.additional_gids.is_empty() {
        let g = su
            .additional_gids
            .iter()
            .map(|g| parse("additionalGids", g))
            .collect::<Result<Vec<_>, _>>()?;
        user.set_additional_gids(Some(g));
    }
    p.set_user(user);
    Ok(())
}

/// A spawned helper, reporting.
struct Helper {
    sock: UnixStream,
    pid: i32,
}

fn kill(pid: i32) {
    // SAFETY: kill takes integers only.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Runs the set-up helper and returns once it reported the process's pid
/// (and, for a container, that it is ready to start).
fn spawn_helper(
    req: &ChildRequest,
    fds: [OwnedFd; 3],
    cgroup: &ContainerCgroup,
) -> Result<Helper, Status> {
    let (mut ours, theirs) =
        UnixStream::pair().map_err(|e| Status::internal(format!("socketpair: {e}")))?;
    let [fd0, fd1, fd2] = fds;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg(childinit::CHILD_ARG)
        .env_clear()
        .stdin(fd0)
        .stdout(fd1)
        .stderr(fd2);
    let theirs_fd = theirs.as_raw_fd();
    // SAFETY: the closure only calls dup2/fcntl, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if theirs_fd == childinit::SYNC_FD {
                let fl = libc::fcntl(theirs_fd, libc::F_GETFD);
                libc::fcntl(theirs_fd, libc::F_SETFD, fl & !libc::FD_CLOEXEC);
            } else if libc::dup2(theirs_fd, childinit::SYNC_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Status::internal(format!("starting the set-up helper: {e}")))?;
    drop(theirs);
    let helper_pid = child.id() as i32;
    // The reaper owns the wait; keep its status for the error message.
    let helper_exit = reaper::watch(helper_pid);
    drop(child);
    let fail = |st: Status| {
        kill(helper_pid);
        st
    };
    cgroup
        .add_pid(helper_pid)
        .map_err(|e| fail(e.status("moving the set-up helper into the cgroup")))?;
    childinit::send(&mut ours, req).map_err(|e| {
        fail(Status::internal(format!(
            "talking to the set-up helper: {e}"
        )))
    })?;
    let _ = ours.set_read_timeout(Some(SETUP_TIMEOUT));
    let mut helper_exit = helper_exit;
    let unexpected_end = |helper_exit: &mut tokio::sync::oneshot::Receiver<ExitStatus>| {
        std::thread::sleep(Duration::from_millis(20));
        let how = helper_exit
            .try_recv()
            .map(|s| format!("{s:?}"))
            .unwrap_or_else(|_| "without a word".into());
        Status::internal(format!("the container set-up helper ended early ({how})"))
    };
    let pid = match childinit::recv::<ChildMsg>(&mut ours) {
        Ok(Some(ChildMsg::Pid(p))) => p,
        Ok(Some(ChildMsg::Error { code, message })) => return Err(status_from(code, message)),
        Ok(Some(m)) => {
            return Err(fail(Status::internal(format!(
                "unexpected set-up message {m:?}"
            ))))
        }
        Ok(None) => return Err(unexpected_end(&mut helper_exit)),
        Err(e) => {
            return Err(fail(Status::deadline_exceeded(format!(
                "container set-up: {e}"
            ))))
        }
    };
    Ok(Helper { sock: ours, pid })
}

/// What creating a container needs.
pub struct CreateArgs {
    /// Container id.
    pub id: String,
    /// Its spec (already checked with [`parse_spec`]).
    pub spec: Spec,
    /// The cgroups path to use.
    pub cgroup_path: String,
    /// Apply the spec's seccomp.
    pub seccomp: bool,
    /// Storages mounted for it.
    pub storages: Vec<PathBuf>,
}

/// Creates a container: cgroup, stdio, helper; the process waits for start.
/// On failure nothing is left behind.
pub async fn create(args: CreateArgs) -> Result<Arc<Container>, Status> {
    let spec = args.spec;
    let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
    let cgroup = tracing::info_span!("cgroup").in_scope(|| {
        ContainerCgroup::create(&args.cgroup_path, resources.as_ref())
            .map(Arc::new)
            .map_err(|e| e.status(&format!("cgroup {}", args.cgroup_path)))
    })?;
    let process = spec.process().clone().unwrap_or_default();
    let terminal = process.terminal().unwrap_or(false);
    let (stdio, fds) = match Stdio::new(terminal) {
        Ok(x) => x,
        Err(e) => {
            let _ = cgroup.destroy();
            return Err(Status::internal(format!("stdio: {e}")));
        }
    };
    let rootfs = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_default();
    let req = ChildRequest {
        mode: ChildMode::Create { rootfs },
        spec: spec.clone(),
        process,
        seccomp: args.seccomp,
    };
    let cg = cgroup.clone();
    // namespaces, mounts, seccomp: the helper's set-up up to the init's exec
    let phase = tracing::info_span!("spawn_init");
    let r = tokio::task::spawn_blocking(move || -> Result<(Helper, i32), Status> {
        let _phase = phase.entered();
        let mut h = spawn_helper(&req, fds, &cg)?;
        let pid = h.pid;
        match childinit::recv::<ChildMsg>(&mut h.sock) {
            Ok(Some(ChildMsg::Ready)) => Ok((h, pid)),
            Ok(Some(ChildMsg::Error { code, message })) => {
                kill(pid);
                Err(status_from(code, message))
            }
            Ok(other) => {
                kill(pid);
                Err(Status::internal(format!(
                    "container set-up ended without being ready ({other:?})"
                )))
            }
            Err(e) => {
                kill(pid);
                Err(Status::deadline_exceeded(format!("container set-up: {e}")))
            }
        }
    })
    .await
    .map_err(|e| Status::internal(e.to_string()));
    let (helper, pid) = match r.and_then(|r| r) {
        Ok(x) => x,
        Err(st) => {
            // The process (if any) was killed; the cgroup kills anything left.
            let _ = cgroup.destroy();
            return Err(st);
        }
    };
    let (init, exit_tx) = Process::new(String::new(), pid, stdio);
    let state = Arc::new(Mutex::new(State::Created));
    let c = Arc::new(Container {
        id: args.id.clone(),
        spec,
        cgroup,
        init,
        execs: Mutex::new(HashMap::new()),
        state: state.clone(),
        start: Mutex::new(Some(helper.sock)),
        storages: args.storages,
        oom_task: Mutex::new(None),
        seccomp: args.seccomp,
    });
    let rx = reaper::watch(pid);
    let id = args.id;
    tokio::spawn(async move {
        let status = rx.await.unwrap_or(ExitStatus::Signaled(libc::SIGKILL));
        info!(container = %id, pid, ?status, "container process exited");
        *state.lock().unwrap_or_else(|e| e.into_inner()) = State::Stopped;
        let _ = exit_tx.send(Some(status));
    });
    Ok(c)
}

/// Starts a process in a running container.
pub async fn exec(
    c: &Arc<Container>,
    exec_id: String,
    process: OciProcess,
) -> Result<Arc<Process>, Status> {
    match c.state() {
        State::Running => {}
        s => {
            return Err(Status::failed_precondition(format!(
                "container {} is {s:?}: exec needs a running container",
                c.id
            )))
        }
    }
    {
        let execs = c.execs.lock().unwrap_or_else(|e| e.into_inner());
        if execs.contains_key(&exec_id) || exec_id == c.id {
            return Err(Status::already_exists(format!(
                "container {} already has a process with exec id {exec_id:?}",
                c.id
            )));
        }
    }
    let terminal = process.terminal().unwrap_or(false);
    let (stdio, fds) = Stdio::new(terminal).map_err(|e| Status::internal(format!("stdio: {e}")))?;
    let req = ChildRequest {
        mode: ChildMode::Exec {
            target_pid: c.init.pid,
        },
        spec: c.spec.clone(),
        process,
        seccomp: c.seccomp,
    };
    let cg = c.cgroup.clone();
    let pid = tokio::task::spawn_blocking(move || -> Result<i32, Status> {
        let mut h = spawn_helper(&req, fds, &cg)?;
        // End of file: the program was executed (the socket is close-on-exec).
        match childinit::recv::<ChildMsg>(&mut h.sock) {
            Ok(None) => Ok(h.pid),
            Ok(Some(ChildMsg::Error { code, message })) => Err(status_from(code, message)),
            Ok(Some(other)) => {
                kill(h.pid);
                Err(Status::internal(format!(
                    "unexpected set-up message {other:?}"
                )))
            }
            Err(e) => {
                kill(h.pid);
                Err(Status::deadline_exceeded(format!("exec set-up: {e}")))
            }
        }
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))??;
    let (p, exit_tx) = Process::new(exec_id.clone(), pid, stdio);
    let rx = reaper::watch(pid);
    let cid = c.id.clone();
    tokio::spawn(async move {
        let status = rx.await.unwrap_or(ExitStatus::Signaled(libc::SIGKILL));
        debug!(container = %cid, exec_id, pid, ?status, "exec process exited");
        let _ = exit_tx.send(Some(status));
    });
    c.execs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(p.exec_id.clone(), p.clone());
    Ok(p)
}

/// Kills whatever runs in the container, waits for its init to be reaped
/// (up to `timeout`) and removes its cgroup.
pub async fn destroy(c: &Arc<Container>, timeout: Duration) -> Result<(), Status> {
    if let Some(t) = c.oom_task.lock().unwrap_or_else(|e| e.into_inner()).take() {
        t.abort();
    }
    // A container never started still has its process waiting on the socket.
    c.start.lock().unwrap_or_else(|e| e.into_inner()).take();
    let cg = c.cgroup.clone();
    tokio::task::spawn_blocking(move || cg.destroy())
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| e.status("removing the cgroup"))?;
    let mut rx = c.init.exit.clone();
    let _ = tokio::time::timeout(timeout, rx.wait_for(|s| s.is_some())).await;
    Ok(())
}
