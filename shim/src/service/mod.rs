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
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::TtrpcResult;
use kata_proto::agent as pb;
use kata_proto::config::Config;
use oci_spec::runtime::Spec;
use tokio::sync::Mutex;
use tracing::{info, warn, Instrument};

use crate::error::{err, Code};
use crate::guest_events::{forward_oom, RateLimit, OOM_BURST, OOM_PER_SEC};
use crate::io::{self as stdio, Paths};
use crate::pod::Pod;
use crate::spec::{self as ocispec, Role};
use crate::{mounts, options};

/// What Create reads first ([`Service::prepare_create`]).
struct Prepared {
    spec: Spec,
    joins: Joins,
    pod_id: String,
}

/// What a new container is to its pod.
enum Joins {
    /// It makes the pod, with this configuration (and the name of where it
    /// came from).
    NewPod(Box<(Config, String)>),
    /// It joins the running pod of this id.
    Pod(String),
}

/// Bundle file naming the pod of a container, read by `shim delete` after a
/// crash.
pub const SANDBOX_FILE: &str = "kata-rs-sandbox";
mod state;
mod task;

use state::{now, Ctr, Exit, Inner, PState, Proc};

/// The task service of one shim (one pod).
#[derive(Clone)]
pub struct Service(Arc<Inner>);

/// Where task events go.
pub enum Events {
    /// To containerd.
    Containerd(RemotePublisher),
    /// Kept, as (topic, event in text form), for tests.
    Recorded(Arc<StdMutex<Vec<(String, String)>>>),
}

/// Where the pod's agent runs.
#[derive(Debug, Clone)]
pub enum PodSource {
    /// In a VM that the shim starts (kata-virtiofsd, launcher, QEMU).
    Vm,
    /// Already running on this host at this address (tests of the task
    /// logic without QEMU).
    HostAgent(kata_proto::dialer::Address),
}

impl Service {
    /// A service publishing to containerd through `publisher`.
    pub fn new(namespace: &str, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Service {
        Self::with(
            namespace,
            Events::Containerd(publisher),
            PodSource::Vm,
            exit,
        )
    }

    /// A service with the given event sink and pod source.
    pub fn with(
        namespace: &str,
        events: Events,
        source: PodSource,
        exit: Arc<ExitSignal>,
    ) -> Service {
        Service(Arc::new(Inner {
            namespace: namespace.into(),
            events,
            source,
            exit,
            pod: Mutex::new(None),
            destroying: AtomicBool::new(false),
            containers: StdMutex::new(HashMap::new()),
            traces: StdMutex::new(HashMap::new()),
        }))
    }

    async fn publish(&self, topic: &str, ev: Box<dyn MessageDyn>) {
        match &self.0.events {
            Events::Containerd(publisher) => {
                let ctx = containerd_shim::protos::ttrpc::context::Context::default();
                if let Err(e) = publisher.publish(ctx, topic, &self.0.namespace, ev).await {
                    warn!("publishing {topic}: {e}");
                }
            }
            Events::Recorded(list) => list
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((topic.to_string(), ev.to_string())),
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
            let agent = pod.agent();
            let status = match agent
                .wait_process(pb::WaitProcessRequest {
                    container_id: p.cid.clone(),
                    exec_id: p.exec_id.clone(),
                })
                .await
            {
                Ok(status) => status as u32,
                Err(e) => {
                    // the message is the guest's: escaped and rate-limited
                    kata_proto::warn_limited!(
                        container = %p.cid,
                        "WaitProcess: {}",
                        e.to_string().escape_debug()
                    );
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
            svc.end_all(pod.hypervisor_pid).await;
        });
        let svc = self.clone();
        tokio::spawn(async move {
            let agent = p2.agent();
            let limit = RateLimit::new(OOM_BURST, OOM_PER_SEC, std::time::Instant::now());
            let next = || {
                let agent = agent.clone();
                async move { agent.get_oom_event().await.ok() }
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

    /// The pod's configuration (the file, then the pod's annotations), and
    /// the file's name for errors.
    fn pod_config(&self, spec: &Spec, opts: Option<&Any>) -> TtrpcResult<(Config, String)> {
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
        Ok((cfg, name))
    }

    /// What Create reads before it acts: the checked ids, the spec, and for
    /// the pod's first container the pod's configuration; tracing starts
    /// here when that configuration asks for it.
    fn prepare_create(&self, req: &api::CreateTaskRequest) -> TtrpcResult<Prepared> {
        let cid = req.id.as_str();
        kata_proto::ids::ContainerId::new(cid)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        if self.container(cid).is_ok() {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("container {cid} already exists"),
            ));
        }
        let spec = load_spec(&req.bundle)?;
        // the host cgroup containerd or the kubelet names, checked before
        // anything is made
        if let Some(p) = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
        {
            let p = p.to_string_lossy();
            if !p.is_empty() {
                kata_proto::cgroups::CgroupPath::parse(&p)
                    .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
            }
        }
        let role = ocispec::role(&spec);
        let pod_id = ocispec::pod_id(&spec, cid);
        // the pod id of a member comes from its annotations
        kata_proto::ids::SandboxId::new(pod_id.as_str())
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        let joins = match role {
            Role::Owner => {
                kata_proto::logging::set_sandbox_id(cid);
                let (cfg, name) = self.pod_config(&spec, req.options.as_ref())?;
                if cfg.runtime.enable_tracing {
                    crate::pod::start_tracing(&cfg).map_err(|e| {
                        err(Code::INVALID_ARGUMENT, format!("configuration {name}: {e}"))
                    })?;
                }
                Joins::NewPod(Box::new((cfg, name)))
            }
            Role::Member { sandbox_id } => Joins::Pod(sandbox_id),
        };
        Ok(Prepared {
            spec,
            joins,
            pod_id,
        })
    }

    /// Starts container `cid`'s trace (its root span lives until Delete)
    /// and returns the span of its Create; no span when tracing is off.
    fn container_trace(&self, cid: &str) -> tracing::Span {
        if !kata_proto::trace::enabled() {
            return tracing::Span::none();
        }
        let root = tracing::info_span!(
            parent: None,
            "container",
            otel.name = "container",
            container_id = cid,
            sandbox_id = kata_proto::logging::sandbox_id().unwrap_or("")
        );
        self.0
            .traces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cid.to_string(), root);
        self.call_span("Create", cid)
    }

    /// Ends container `cid`'s trace (its root span is exported once the
    /// spans under it have ended).
    fn end_container_trace(&self, cid: &str) {
        self.0
            .traces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(cid);
    }

    /// The span of one task API call about container `cid`, in that
    /// container's trace. Wait, State, Stats and Connect get none: they
    /// wait or poll, and would bury the lifecycle in noise.
    fn call_span(&self, method: &'static str, cid: &str) -> tracing::Span {
        if !kata_proto::trace::enabled() || matches!(method, "Wait" | "State" | "Stats" | "Connect")
        {
            return tracing::Span::none();
        }
        let traces = self.0.traces.lock().unwrap_or_else(|p| p.into_inner());
        let parent = traces.get(cid).and_then(|root| root.id());
        tracing::info_span!(
            parent: parent,
            "task",
            otel.name = method,
            otel.kind = "server",
            container_id = cid,
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty
        )
    }

    async fn create_pod(
        &self,
        id: &str,
        spec: &Spec,
        (cfg, name): (Config, String),
    ) -> TtrpcResult<Arc<Pod>> {
        if let PodSource::HostAgent(addr) = &self.0.source {
            let pod = Pod::attach_host_agent(id, cfg, addr.clone())
                .await
                .map_err(|e| err(e.code(), format!("attaching the host agent: {e}")))?;
            let pod = Arc::new(pod);
            pod.start_monitor().await;
            return Ok(pod);
        }
        cfg.check_files()
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("configuration {name}: {e}")))?;
        let plan = plan(id, spec, &cfg);
        let hostname = spec.hostname().clone().unwrap_or_default();
        let pod = Pod::create(id, cfg, plan, &hostname, crate::network::netns_of(spec))
            .await
            .map_err(|e| err(e.code(), format!("creating the pod VM: {e}")))?;
        let pod = Arc::new(pod);
        pod.start_monitor().await;
        Ok(pod)
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
        // a container joining the pod: its limits grow the VM first
        let member = *cid != pod.id;
        if member {
            let w = kata_proto::config::Workload::from_resources(
                spec.linux().as_ref().and_then(|l| l.resources().as_ref()),
            );
            pod.resize(cid, Some(w))
                .await
                .map_err(|e| err(e.code(), format!("container {cid}: {e}")))?;
        }
        let res = async {
            let root_rel = spec
                .root()
                .as_ref()
                .map(|r| r.path().clone())
                .unwrap_or_else(|| PathBuf::from("rootfs"));
            let guest = ocispec::to_guest(spec, cid, &pod.guest_share)
                .map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
            for d in &guest.dropped {
                warn!(container = %cid, "mount left out: {d}");
            }
            let rootfs = cdir.join("rootfs");
            let internal = |e: mounts::MountError| err(Code::INTERNAL, e.to_string());
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
            let agent = pod.agent();
            agent
                .create_container(pb::CreateContainerRequest {
                    container_id: cid.clone(),
                    oci_spec_json: json,
                    ..Default::default()
                })
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
            if member {
                if let Err(e) = pod.resize(cid, None).await {
                    warn!(container = %cid, "giving back the resources of a failed create: {e}");
                }
            }
        }
        res
    }

    /// Pause or Resume: the container's freezer in the guest, and the event.
    async fn set_paused(&self, id: &str, pause: bool) -> TtrpcResult<api::Empty> {
        let c = self.container(id)?;
        let agent = self.pod().await?.agent();
        let container_id = id.to_string();
        let (topic, ev): (&str, Box<dyn MessageDyn>) = if pause {
            agent
                .pause_container(pb::PauseContainerRequest {
                    container_id: container_id.clone(),
                })
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

    /// Every process that has not ended ends now with status 255, with its
    /// exit event: the VM they ran in is gone, and containerd must never
    /// wait on a task that cannot finish.
    async fn end_all(&self, hypervisor_pid: u32) {
        let all: Vec<Arc<Ctr>> = self
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
                    self.exited(p, 255, hypervisor_pid).await;
                }
            }
        }
    }

    async fn destroy_pod(&self) {
        self.0.destroying.store(true, Ordering::SeqCst);
        let pod = self.0.pod.lock().await.take();
        if let Some(pod) = pod {
            pod.destroy().await;
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

/// The VM and cgroup of a pod whose sandbox container has `spec`. A
/// statically sized VM holds the whole pod from the start (the CRI sandbox
/// annotations, when containerd gives them); a VM that follows its
/// containers boots with the sandbox container's own limits and grows as
/// the others come. Hot-plug needs ACPI: on microvm the VM stays as booted.
fn plan(id: &str, spec: &Spec, cfg: &Config) -> crate::pod::Plan {
    use kata_proto::config::Workload;
    let own = Workload::from_resources(spec.linux().as_ref().and_then(|l| l.resources().as_ref()));
    let workload = if cfg.runtime.static_sandbox_resource_mgmt {
        Workload::of_sandbox(spec)
    } else {
        own
    };
    let mut size = cfg.vm_size_for(workload);
    if cfg.hypervisor.qemu.machine_type == "microvm" {
        (size.max_vcpus, size.max_memory_mib) = (size.vcpus, size.memory_mib);
    }
    let cgroup = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.to_string_lossy().into_owned());
    crate::pod::Plan {
        size,
        workload: own,
        cgroup: crate::cgroups::sandbox_path(id, cgroup.as_deref()),
    }
}
