//! containerd's task API (shim v2, ttrpc) over one pod: containers and
//! processes map to the agent's RPCs, stdio to the agent's streams, and the
//! task events go back to containerd.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::TtrpcResult;
use kata_proto::agent as pb;
use kata_proto::config::Config;
use oci_spec::runtime::Spec;
use tokio::sync::{watch, Mutex};
use tracing::{info, warn};

use crate::error::{err, from_status, Code};
use crate::guest_events::{forward_oom, RateLimit, OOM_BURST, OOM_PER_SEC};
use crate::io::{self as stdio, Copies, Paths};
use crate::pod::{Pod, Size};
use crate::spec::{self as ocispec, Role};
use crate::{mounts, options};

/// Bundle file naming the pod of a container, read by `shim delete` after a
/// crash.
pub const SANDBOX_FILE: &str = "kata-rs-sandbox";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PState {
    Created,
    Running,
    Stopped,
}

#[derive(Debug, Clone)]
struct Exit {
    status: u32,
    at: Timestamp,
}

struct Proc {
    cid: String,
    exec_id: String,
    io: Paths,
    process_json: String,
    state: StdMutex<PState>,
    exit: watch::Sender<Option<Exit>>,
    copies: Mutex<Option<Copies>>,
}

impl Proc {
    fn new(cid: &str, exec_id: &str, io: Paths, process_json: String) -> Arc<Proc> {
        Arc::new(Proc {
            cid: cid.into(),
            exec_id: exec_id.into(),
            io,
            process_json,
            state: StdMutex::new(PState::Created),
            exit: watch::channel(None).0,
            copies: Mutex::new(None),
        })
    }

    fn state(&self) -> PState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, s: PState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    fn exit_info(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }
}

struct Ctr {
    id: String,
    bundle: String,
    owner: bool,
    init: Arc<Proc>,
    execs: StdMutex<HashMap<String, Arc<Proc>>>,
    paused: AtomicBool,
}

impl Ctr {
    fn process(&self, exec_id: &str) -> TtrpcResult<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                err(
                    Code::NOT_FOUND,
                    format!("exec {exec_id} of container {} does not exist", self.id),
                )
            })
    }
}

struct Inner {
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    pod: Mutex<Option<Arc<Pod>>>,
    destroying: AtomicBool,
    containers: StdMutex<HashMap<String, Arc<Ctr>>>,
}

/// The task service of one shim (one pod).
#[derive(Clone)]
pub struct Service(Arc<Inner>);

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

impl Service {
    /// A service publishing to containerd through `publisher`.
    pub fn new(namespace: &str, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Service {
        Service(Arc::new(Inner {
            namespace: namespace.into(),
            publisher,
            exit,
            pod: Mutex::new(None),
            destroying: AtomicBool::new(false),
            containers: StdMutex::new(HashMap::new()),
        }))
    }

    async fn publish(&self, topic: &str, ev: Box<dyn MessageDyn>) {
        let ctx = containerd_shim::protos::ttrpc::context::Context::default();
        if let Err(e) = self
            .0
            .publisher
            .publish(ctx, topic, &self.0.namespace, ev)
            .await
        {
            warn!("publishing {topic}: {e}");
        }
    }

    fn container(&self, id: &str) -> TtrpcResult<Arc<Ctr>> {
        self.0
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {id} does not exist")))
    }

    async fn pod(&self) -> TtrpcResult<Arc<Pod>> {
        self.0
            .pod
            .lock()
            .await
            .clone()
            .ok_or_else(|| err(Code::FAILED_PRECONDITION, "the pod of this shim is gone"))
    }

    /// Marks `p` exited with `status` (once) and tells containerd.
    async fn exited(&self, p: &Arc<Proc>, status: u32, pid: u32) {
        if p.exit_info().is_some() {
            return;
        }
        let at = now();
        p.set_state(PState::Stopped);
        p.exit.send_replace(Some(Exit {
            status,
            at: at.clone(),
        }));
        info!(container = %p.cid, exec = %p.exec_id, status, "process exited");
        let id = if p.exec_id.is_empty() {
            p.cid.clone()
        } else {
            p.exec_id.clone()
        };
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: p.cid.clone(),
                id,
                pid,
                exit_status: status,
                exited_at: MessageField::some(at),
                ..Default::default()
            }),
        )
        .await;
    }

    /// Waits for `p` in the guest, drains its outputs, reports its exit.
    fn spawn_waiter(&self, pod: Arc<Pod>, p: Arc<Proc>) {
        let svc = self.clone();
        tokio::spawn(async move {
            let mut agent = pod.agent();
            let status = match agent
                .wait_process(pb::WaitProcessRequest {
                    container_id: p.cid.clone(),
                    exec_id: p.exec_id.clone(),
                })
                .await
            {
                Ok(r) => r.into_inner().status as u32,
                Err(s) => {
                    warn!(container = %p.cid, "WaitProcess: {}", s.message());
                    255
                }
            };
            if let Some(c) = p.copies.lock().await.as_mut() {
                c.finish(Duration::from_secs(10)).await;
            }
            svc.exited(&p, status, pod.hypervisor_pid).await;
        });
    }

    /// Watches the pod: a VM or helper that dies ends every process (exit
    /// 255) so containerd never waits on a task that cannot finish; OOM kills
    /// in the guest become TaskOOM events.
    fn spawn_pod_watch(&self, pod: Arc<Pod>) {
        let svc = self.clone();
        let p2 = pod.clone();
        tokio::spawn(async move {
            let why = pod.failed().await;
            if svc.0.destroying.load(Ordering::SeqCst) {
                return;
            }
            warn!("pod failed: {why}");
            // what is left of the VM is of no use: stop it now, Delete cleans
            pod.stop_vm().await;
            let all: Vec<Arc<Ctr>> = svc
                .0
                .containers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect();
            for c in all {
                let execs: Vec<_> = c
                    .execs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .cloned()
                    .collect();
                for p in execs.iter().chain(std::iter::once(&c.init)) {
                    if p.state() != PState::Stopped {
                        svc.exited(p, 255, pod.hypervisor_pid).await;
                    }
                }
            }
        });
        let svc = self.clone();
        tokio::spawn(async move {
            let agent = p2.agent();
            let limit = RateLimit::new(OOM_BURST, OOM_PER_SEC, std::time::Instant::now());
            let next = || {
                let mut agent = agent.clone();
                async move {
                    let ev = agent.get_oom_event(pb::GetOomEventRequest {}).await.ok()?;
                    Some(ev.into_inner().container_id)
                }
            };
            let owns = |cid: &str| {
                svc.0
                    .containers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(cid)
            };
            let publish = |cid: String| {
                let svc = svc.clone();
                async move {
                    info!(container = %cid, "OOM kill in the guest");
                    svc.publish(
                        topics::TASK_OOM_EVENT_TOPIC,
                        Box::new(TaskOOM {
                            container_id: cid,
                            ..Default::default()
                        }),
                    )
                    .await;
                }
            };
            forward_oom(limit, next, owns, publish).await;
        });
    }

    async fn create_pod(&self, id: &str, spec: &Spec, opts: Option<&Any>) -> TtrpcResult<Arc<Pod>> {
        let explicit = opts.and_then(options::config_path);
        let (mut cfg, source) = Config::discover_with_source(explicit.as_deref())
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        if let Some(ann) = spec.annotations() {
            cfg.apply_annotations(ann)
                .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        }
        let name = source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the built-in configuration".into());
        cfg.check_files()
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("configuration {name}: {e}")))?;
        let size = cfg.vm_size_for(kata_proto::config::Workload::of_sandbox(spec));
        let hostname = spec.hostname().clone().unwrap_or_default();
        let pod = Pod::create(
            id,
            cfg,
            Size {
                vcpus: size.vcpus,
                memory_mib: size.memory_mib,
            },
            &hostname,
        )
        .await
        .map_err(|e| err(Code::UNKNOWN, format!("creating the pod VM: {e:#}")))?;
        Ok(Arc::new(pod))
    }

    /// Mounts the rootfs and binds, creates the container in the guest,
    /// attaches the init's stdio. Undoes its mounts on failure.
    async fn create_in_pod(
        &self,
        pod: &Arc<Pod>,
        req: &api::CreateTaskRequest,
        spec: Spec,
        init: &Arc<Proc>,
    ) -> TtrpcResult<()> {
        let cid = &req.id;
        let cdir = pod.container_dir(cid);
        let res = async {
            let root_rel = spec
                .root()
                .as_ref()
                .map(|r| r.path().clone())
                .unwrap_or_else(|| PathBuf::from("rootfs"));
            let guest = ocispec::to_guest(spec, cid).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
            for d in &guest.dropped {
                warn!(container = %cid, "mount left out: {d}");
            }
            let rootfs = cdir.join("rootfs");
            let internal = |e: anyhow::Error| err(Code::INTERNAL, format!("{e:#}"));
            match req.rootfs.as_slice() {
                [] => {
                    let src = Path::new(&req.bundle).join(root_rel);
                    mounts::bind(&src, &rootfs, false, &pod.paths.dir.join("staging"))
                        .map_err(internal)?
                }
                [m] => mounts::mount_rootfs(m, &rootfs).map_err(internal)?,
                many => {
                    return Err(err(
                        Code::INVALID_ARGUMENT,
                        format!("{} rootfs mounts: only one is supported", many.len()),
                    ))
                }
            }
            for (n, m) in guest.mounts.iter().enumerate() {
                let staging = pod.paths.dir.join(format!("staging-{cid}-{n}"));
                mounts::bind(&m.source, &cdir.join(&m.relative), m.readonly, &staging)
                    .map_err(|e| err(Code::INVALID_ARGUMENT, format!("{e:#}")))?;
            }
            let json = serde_json::to_string(&guest.spec)
                .map_err(|e| err(Code::INTERNAL, e.to_string()))?;
            let mut agent = pod.agent();
            agent
                .create_container(pb::CreateContainerRequest {
                    container_id: cid.clone(),
                    oci_spec_json: json,
                    ..Default::default()
                })
                .bounded()
                .await?;
            let attach = async {
                let mut copies = stdio::attach_outputs(&pod.agent_addr, cid, "", &init.io).await?;
                stdio::attach_stdin(&mut copies, &pod.agent_addr, cid, "", &init.io).await?;
                anyhow::Ok(copies)
            };
            match attach.await {
                Ok(c) => *init.copies.lock().await = Some(c),
                Err(e) => {
                    let _ = agent
                        .remove_container(pb::RemoveContainerRequest {
                            container_id: cid.clone(),
                            timeout: 0,
                        })
                        .await;
                    return Err(err(Code::INTERNAL, format!("{e:#}")));
                }
            }
            Ok(())
        }
        .await;
        if res.is_err() {
            if let Err(e) = mounts::unmount_and_remove(&cdir) {
                warn!("{e:#}");
            }
        }
        res
    }

    /// Pause or Resume: the container's freezer in the guest, and the event.
    async fn set_paused(&self, id: &str, pause: bool) -> TtrpcResult<api::Empty> {
        let c = self.container(id)?;
        let mut agent = self.pod().await?.agent();
        let container_id = id.to_string();
        let (topic, ev): (&str, Box<dyn MessageDyn>) = if pause {
            agent
                .pause_container(pb::PauseContainerRequest {
                    container_id: container_id.clone(),
                })
                .bounded()
                .await?;
            let ev = TaskPaused {
                container_id,
                ..Default::default()
            };
            (topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev))
        } else {
            agent
                .resume_container(pb::ResumeContainerRequest {
                    container_id: container_id.clone(),
                })
                .bounded()
                .await?;
            let ev = TaskResumed {
                container_id,
                ..Default::default()
            };
            (topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev))
        };
        c.paused.store(pause, Ordering::SeqCst);
        self.publish(topic, ev).await;
        Ok(api::Empty::default())
    }

    async fn destroy_pod(&self) {
        self.0.destroying.store(true, Ordering::SeqCst);
        let pod = self.0.pod.lock().await.take();
        if let Some(pod) = pod {
            pod.destroy().await;
        }
    }
}

/// How long the shim waits for the agent to answer a call (WaitProcess and
/// GetOOMEvent excepted: they wait for events): a guest that hangs or stalls
/// makes the call fail, never the shim hang.
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// An agent call bounded by [`AGENT_TIMEOUT`], its error as a ttrpc error.
trait Bounded<T> {
    async fn bounded(self) -> Result<tonic::Response<T>, containerd_shim::protos::ttrpc::Error>;
}

impl<F, T> Bounded<T> for F
where
    F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    async fn bounded(self) -> Result<tonic::Response<T>, containerd_shim::protos::ttrpc::Error> {
        match tokio::time::timeout(AGENT_TIMEOUT, self).await {
            Ok(r) => r.map_err(from_status),
            Err(_) => Err(err(
                Code::DEADLINE_EXCEEDED,
                format!("the guest agent did not answer within {AGENT_TIMEOUT:?}"),
            )),
        }
    }
}

fn load_spec(bundle: &str) -> TtrpcResult<Spec> {
    let p = Path::new(bundle).join("config.json");
    Spec::load(&p).map_err(|e| {
        err(
            Code::INVALID_ARGUMENT,
            format!("reading the OCI spec {}: {e}", p.display()),
        )
    })
}

fn status_of(p: &Proc, paused: bool) -> api::Status {
    match p.state() {
        PState::Created => api::Status::CREATED,
        PState::Running if paused => api::Status::PAUSED,
        PState::Running => api::Status::RUNNING,
        PState::Stopped => api::Status::STOPPED,
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let cid = req.id.clone();
        kata_proto::paths::validate_sandbox_id(&cid)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("container id: {e}")))?;
        if self.container(&cid).is_ok() {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("container {cid} already exists"),
            ));
        }
        let spec = load_spec(&req.bundle)?;
        let role = ocispec::role(&spec);
        let pod_id = ocispec::pod_id(&spec, &cid);
        // tells `shim delete` which pod to clean if this shim dies
        let _ = std::fs::write(Path::new(&req.bundle).join(SANDBOX_FILE), &pod_id);
        let owner = role == Role::Owner;
        let pod = match role {
            Role::Owner => {
                let mut slot = self.0.pod.lock().await;
                if let Some(p) = slot.as_ref() {
                    return Err(err(
                        Code::FAILED_PRECONDITION,
                        format!("this shim already serves pod {}", p.id),
                    ));
                }
                kata_proto::logging::set_sandbox_id(&cid);
                let pod = self.create_pod(&cid, &spec, req.options.as_ref()).await?;
                *slot = Some(pod.clone());
                self.spawn_pod_watch(pod.clone());
                pod
            }
            Role::Member { sandbox_id } => {
                let pod = self.pod().await?;
                if pod.id != sandbox_id {
                    return Err(err(
                        Code::NOT_FOUND,
                        format!(
                            "pod {sandbox_id} is not served by this shim (it serves {})",
                            pod.id
                        ),
                    ));
                }
                pod
            }
        };
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let io = Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: terminal || req.terminal,
        };
        let init = Proc::new(&cid, "", io, String::new());
        if let Err(e) = self.create_in_pod(&pod, &req, spec, &init).await {
            if owner {
                self.destroy_pod().await;
                self.0.destroying.store(false, Ordering::SeqCst);
            }
            return Err(e);
        }
        let ctr = Arc::new(Ctr {
            id: cid.clone(),
            bundle: req.bundle.clone(),
            owner,
            init,
            execs: StdMutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
        });
        self.0
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cid.clone(), ctr);
        info!(container = %cid, "container created");
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: cid.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid: pod.hypervisor_pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(api::CreateTaskResponse {
            pid: pod.hypervisor_pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let pod = self.pod().await?;
        if p.state() != PState::Created {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("process {} of {} was already started", req.exec_id, req.id),
            ));
        }
        let mut agent = pod.agent();
        if req.exec_id.is_empty() {
            if let Err(e) = agent
                .start_container(pb::StartContainerRequest {
                    container_id: req.id.clone(),
                })
                .bounded()
                .await
            {
                // its init is gone: the task is stopped, Delete works
                self.exited(&p, 255, pod.hypervisor_pid).await;
                return Err(e);
            }
        } else {
            agent
                .exec_process(pb::ExecProcessRequest {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    process: Some(pb::Process {
                        oci_process_json: p.process_json.clone(),
                        terminal: p.io.terminal,
                    }),
                    ..Default::default()
                })
                .bounded()
                .await?;
            let attach = async {
                let mut copies =
                    stdio::attach_outputs(&pod.agent_addr, &req.id, &req.exec_id, &p.io).await?;
                stdio::attach_stdin(&mut copies, &pod.agent_addr, &req.id, &req.exec_id, &p.io)
                    .await?;
                anyhow::Ok(copies)
            };
            match attach.await {
                Ok(copies) => *p.copies.lock().await = Some(copies),
                Err(e) => {
                    let _ = agent
                        .signal_process(pb::SignalProcessRequest {
                            container_id: req.id.clone(),
                            exec_id: req.exec_id.clone(),
                            signal: 9,
                            all: false,
                        })
                        .await;
                    return Err(err(Code::INTERNAL, format!("{e:#}")));
                }
            }
        }
        p.set_state(PState::Running);
        self.spawn_waiter(pod.clone(), p.clone());
        if req.exec_id.is_empty() {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid: pod.hypervisor_pid,
                    ..Default::default()
                }),
            )
            .await;
        } else {
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid: pod.hypervisor_pid,
                    ..Default::default()
                }),
            )
            .await;
        }
        Ok(api::StartResponse {
            pid: pod.hypervisor_pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let c = self.container(&req.id)?;
        let pid = self
            .0
            .pod
            .lock()
            .await
            .as_ref()
            .map(|p| p.hypervisor_pid)
            .unwrap_or(0);
        if !req.exec_id.is_empty() {
            let p = c.process(&req.exec_id)?;
            if p.state() == PState::Running {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "exec {} of {} still runs: kill it first",
                        req.exec_id, req.id
                    ),
                ));
            }
            c.execs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&req.exec_id);
            let e = p.exit_info().unwrap_or(Exit {
                status: 0,
                at: now(),
            });
            return Ok(api::DeleteResponse {
                pid,
                exit_status: e.status,
                exited_at: MessageField::some(e.at),
                ..Default::default()
            });
        }
        if c.init.state() == PState::Running {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("container {} still runs: kill it first", req.id),
            ));
        }
        let pod = self.0.pod.lock().await.clone();
        if let Some(pod) = &pod {
            let mut agent = pod.agent();
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                agent.remove_container(pb::RemoveContainerRequest {
                    container_id: req.id.clone(),
                    timeout: 5,
                }),
            )
            .await;
            if let Some(copies) = c.init.copies.lock().await.as_mut() {
                copies.close_stdin();
            }
            if let Err(e) = mounts::unmount_and_remove(&pod.container_dir(&req.id)) {
                warn!("{e:#}");
            }
        }
        self.0
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req.id);
        if c.owner {
            self.destroy_pod().await;
        }
        let _ = std::fs::remove_file(Path::new(&c.bundle).join(SANDBOX_FILE));
        let e = c.init.exit_info().unwrap_or(Exit {
            status: 0,
            at: now(),
        });
        info!(container = %req.id, "container deleted");
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                pid,
                exit_status: e.status,
                exited_at: MessageField::some(e.at.clone()),
                id: req.id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::DeleteResponse {
            pid,
            exit_status: e.status,
            exited_at: MessageField::some(e.at),
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let pid = self
            .0
            .pod
            .lock()
            .await
            .as_ref()
            .map(|p| p.hypervisor_pid)
            .unwrap_or(0);
        let exit = p.exit_info();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid,
            status: status_of(&p, c.paused.load(Ordering::SeqCst)).into(),
            stdin: p.io.stdin.clone(),
            stdout: p.io.stdout.clone(),
            stderr: p.io.stderr.clone(),
            terminal: p.io.terminal,
            exit_status: exit.as_ref().map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| e.at).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        self.container(&req.id)?;
        let mut agent = self.pod().await?.agent();
        let r = agent
            .list_processes(pb::ListProcessesRequest {
                container_id: req.id.clone(),
                format: "json".into(),
                args: vec![],
            })
            .bounded()
            .await?
            .into_inner();
        Ok(api::PidsResponse {
            processes: r
                .pids
                .into_iter()
                .map(|pid| containerd_shim::protos::types::task::ProcessInfo {
                    pid: pid as u32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.set_paused(&req.id, true).await
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.set_paused(&req.id, false).await
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(err(
            Code::UNIMPLEMENTED,
            "checkpoint is not supported by kata-rs: a VM's containers cannot be checkpointed with CRIU",
        ))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if p.state() == PState::Stopped && !req.all {
            return Err(err(Code::NOT_FOUND, "process already finished"));
        }
        if p.state() == PState::Created && req.exec_id.is_empty() {
            // never started: nothing runs in the guest yet but its init waits
            // for the start signal; ending it makes the task stopped
            let pod = self.pod().await?;
            let mut agent = pod.agent();
            let _ = agent
                .remove_container(pb::RemoveContainerRequest {
                    container_id: req.id.clone(),
                    timeout: 0,
                })
                .await;
            self.exited(&p, 128 + req.signal, pod.hypervisor_pid).await;
            return Ok(api::Empty::default());
        }
        let mut agent = self.pod().await?.agent();
        agent
            .signal_process(pb::SignalProcessRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                signal: req.signal,
                all: req.all,
            })
            .bounded()
            .await?;
        Ok(api::Empty::default())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        if req.exec_id.is_empty() {
            return Err(err(Code::INVALID_ARGUMENT, "an exec needs an id"));
        }
        let json = req
            .spec
            .as_ref()
            .map(|a| String::from_utf8_lossy(&a.value).into_owned())
            .ok_or_else(|| err(Code::INVALID_ARGUMENT, "an exec needs a process spec"))?;
        let process: oci_spec::runtime::Process = serde_json::from_str(&json).map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("the exec's process spec is not valid: {e}"),
            )
        })?;
        let io = Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal || process.terminal().unwrap_or(false),
        };
        {
            let mut execs = c.execs.lock().unwrap_or_else(|p| p.into_inner());
            if execs.contains_key(&req.exec_id) {
                return Err(err(
                    Code::ALREADY_EXISTS,
                    format!("exec {} already exists in {}", req.exec_id, req.id),
                ));
            }
            execs.insert(
                req.exec_id.clone(),
                Proc::new(&req.id, &req.exec_id, io, json),
            );
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::default())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.container(&req.id)?.process(&req.exec_id)?;
        let mut agent = self.pod().await?.agent();
        agent
            .tty_win_resize(pb::TtyWinResizeRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                row: req.height,
                column: req.width,
            })
            .bounded()
            .await?;
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let p = self.container(&req.id)?.process(&req.exec_id)?;
        if req.stdin {
            if let Some(c) = p.copies.lock().await.as_mut() {
                c.close_stdin();
            }
        }
        Ok(api::Empty::default())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        self.container(&req.id)?;
        let json = req
            .resources
            .as_ref()
            .map(|a| String::from_utf8_lossy(&a.value).into_owned())
            .unwrap_or_default();
        serde_json::from_str::<oci_spec::runtime::LinuxResources>(&json).map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("the resources are not valid OCI LinuxResources: {e}"),
            )
        })?;
        let mut agent = self.pod().await?.agent();
        agent
            .update_container(pb::UpdateContainerRequest {
                container_id: req.id.clone(),
                resources: Some(pb::LinuxResources {
                    oci_resources_json: json,
                }),
            })
            .bounded()
            .await?;
        Ok(api::Empty::default())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let p = self.container(&req.id)?.process(&req.exec_id)?;
        let mut rx = p.exit.subscribe();
        let e = loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                break e;
            }
            if rx.changed().await.is_err() {
                return Err(err(Code::INTERNAL, "the process went away"));
            }
        };
        Ok(api::WaitResponse {
            exit_status: e.status,
            exited_at: MessageField::some(e.at),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        self.container(&req.id)?;
        let mut agent = self.pod().await?.agent();
        let r = agent
            .stats_container(pb::StatsContainerRequest {
                container_id: req.id.clone(),
            })
            .bounded()
            .await?
            .into_inner();
        let any = crate::stats::to_any(&r).map_err(|e| err(Code::INTERNAL, e))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let pid = self
            .0
            .pod
            .lock()
            .await
            .as_ref()
            .map(|p| p.hypervisor_pid)
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pid,
            version: kata_proto::VERSION.into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let empty = self
            .0
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if empty {
            self.destroy_pod().await;
            info!("shutting down");
            self.0.exit.signal();
        }
        Ok(api::Empty::default())
    }
}
