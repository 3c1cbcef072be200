//! The agent's gRPC services: Kata's `Health` and `AgentService`.
//!
//! Containers and processes, stdio control, cgroups, OOM events, networking,
//! the sandbox calls and SetPolicy are implemented; the others (metrics,
//! hot-plug) answer `Unimplemented` with the call's name, so a client never
//! mistakes them for a failure of the guest. Every AgentService call is first
//! checked by the agent policy (`take`). Errors carry proper codes: NotFound, AlreadyExists,
//! InvalidArgument, FailedPrecondition.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kata_proto::agent::agent_service_server::AgentService;
use kata_proto::agent::health_check_response::ServingStatus;
use kata_proto::agent::health_server::Health;
use kata_proto::agent::*;
use tokio::sync::{mpsc, Notify};
use tonic::{Request, Response, Status};
use tracing::{info, warn, Instrument};

use crate::container::{self, Container, State};
use crate::guest;
use crate::network;
use crate::sandbox::{self, SandboxInfo, STORAGE_DRIVERS};
use crate::stdio::Stdio;
use kata_proto::stdio::Header;

/// kata-rs features (reported in `GetGuestDetails`).
const FEATURES: &[&str] = &["ready-announce", "stdio-streams"];
/// How long OnlineCPUMem waits for hot-plugged CPUs to appear.
const ONLINE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// State shared by the services.
#[derive(Debug)]
pub struct Agent {
    /// Notified when `DestroySandbox` asked the agent to end.
    pub shutdown: Notify,
    /// Whether the agent is PID 1 of a guest (else host mode).
    pub init: bool,
    /// The agent's state directory.
    pub root: PathBuf,
    sandbox: Mutex<SandboxInfo>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    creating: Mutex<HashSet<String>>,
    oom_tx: mpsc::UnboundedSender<String>,
    oom_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
    /// The agent policy in force (allows all without the `agent-policy` feature).
    pub policy: crate::policy::Gate,
}

/// The cgroup under which a sandbox's containers go when their spec names
/// none (flat, so that removing it leaves no empty parent behind).
pub fn cgroup_parent(sandbox_id: &str) -> String {
    format!("kata-rs-{sandbox_id}")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Agent {
    /// A fresh agent.
    pub fn new(init: bool, root: PathBuf, policy: crate::policy::Gate) -> Agent {
        let (oom_tx, oom_rx) = mpsc::unbounded_channel();
        Agent {
            shutdown: Notify::new(),
            init,
            root,
            sandbox: Mutex::new(SandboxInfo {
                id: format!("agent-{}", std::process::id()),
                ..Default::default()
            }),
            containers: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
            oom_tx,
            oom_rx: tokio::sync::Mutex::new(oom_rx),
            policy,
        }
    }

    /// A container by id.
    pub fn container(&self, id: &str) -> Result<Arc<Container>, Status> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no container {id:?} in this sandbox")))
    }

    /// The stdio of a process, for the stdio port. Attaching an output is
    /// checked by the policy as `ReadStreamRequest`, stdin as
    /// `WriteStreamRequest` (the RPCs Kata's runtime polls instead).
    pub fn stdio_of(&self, h: &Header) -> Result<Arc<Stdio>, Status> {
        match h.which {
            kata_proto::stdio::Which::Stdin => self.policy.check(
                "WriteStreamRequest",
                &WriteStreamRequest {
                    container_id: h.container_id.clone(),
                    exec_id: h.exec_id.clone(),
                    data: vec![],
                },
            )?,
            _ => self.policy.check(
                "ReadStreamRequest",
                &ReadStreamRequest {
                    container_id: h.container_id.clone(),
                    exec_id: h.exec_id.clone(),
                    len: 0,
                },
            )?,
        }
        Ok(self
            .container(&h.container_id)?
            .process(&h.exec_id)?
            .stdio
            .clone())
    }

    /// Ends every container and unmounts the sandbox's storages.
    pub async fn destroy_all(&self) {
        let all: Vec<_> = lock(&self.containers).drain().map(|(_, c)| c).collect();
        for c in all {
            if let Err(e) = container::destroy(&c, Duration::from_secs(5)).await {
                warn!(container = %c.id, "{}", e.message());
            }
            sandbox::unmount_storages(&c.storages);
        }
        let (storages, id) = {
            let mut sb = lock(&self.sandbox);
            (std::mem::take(&mut sb.storages), sb.id.clone())
        };
        sandbox::unmount_storages(&storages);
        crate::cgroup::remove_empty(&cgroup_parent(&id));
    }
}

/// The `Health` service.
#[derive(Debug, Clone)]
pub struct HealthService(pub Arc<Agent>);

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        _r: Request<CheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    async fn version(
        &self,
        _r: Request<CheckRequest>,
    ) -> Result<Response<VersionCheckResponse>, Status> {
        Ok(Response::new(VersionCheckResponse {
            grpc_version: "tonic-0.14".into(),
            agent_version: kata_proto::VERSION.into(),
        }))
    }
}

/// The `AgentService` service.
#[derive(Debug, Clone)]
pub struct AgentRpc(pub Arc<Agent>);

type Empty = Result<Response<()>, Status>;

fn ok() -> Empty {
    Ok(Response::new(()))
}

macro_rules! not_yet {
    ($( $name:ident ( $req:ty as $kata:literal ) -> $resp:ty ;)*) => {
        $(
            // Written the way async_trait expands a method: the attribute does
            // not see inside macro output.
            fn $name<'life0, 'async_trait>(
                &'life0 self,
                r: Request<$req>,
            ) -> Pin<Box<dyn Future<Output = Result<Response<$resp>, Status>> + Send + 'async_trait>>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                Box::pin(async {
                    self.take($kata, r)?;
                    Err(Status::unimplemented(concat!(
                        stringify!($name),
                        " is not implemented by this kata-agent yet"
                    )))
                })
            }
        )*
    };
}

fn polled_stdio() -> Status {
    Status::unimplemented(
        "kata-agent streams stdio on its stdio port (vsock 1027) instead of ReadStdout/ReadStderr/WriteStdin polling",
    )
}

fn signal_number(sig: u32) -> Result<i32, Status> {
    match i32::try_from(sig) {
        Ok(s) if (0..=64).contains(&s) => Ok(s),
        _ => Err(Status::invalid_argument(format!(
            "signal {sig} is not a signal number (0-64)"
        ))),
    }
}

fn parse_resources(r: Option<LinuxResources>) -> Result<oci_spec::runtime::LinuxResources, Status> {
    let json = r.map(|r| r.oci_resources_json).unwrap_or_default();
    if json.trim().is_empty() {
        return Err(Status::invalid_argument(
            "resources.oci_resources_json is empty: give OCI linux.resources as JSON",
        ));
    }
    serde_json::from_str(&json)
        .map_err(|e| Status::invalid_argument(format!("resources do not parse: {e}")))
}

fn network_stats() -> Vec<NetworkStats> {
    let Ok(text) = std::fs::read_to_string("/proc/net/dev") else {
        return vec![];
    };
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let name = name.trim();
            if name == "lo" {
                return None;
            }
            let v: Vec<u64> = rest
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            (v.len() >= 12).then(|| NetworkStats {
                name: name.to_string(),
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_errors: v[2],
                rx_dropped: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_errors: v[10],
                tx_dropped: v[11],
            })
        })
        .collect()
}

fn cmdline_of(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|p| !p.is_empty())
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

#[tonic::async_trait]
impl AgentService for AgentRpc {
    async fn get_guest_details(
        &self,
        r: Request<GuestDetailsRequest>,
    ) -> Result<Response<GuestDetailsResponse>, Status> {
        let r = self.take("GuestDetailsRequest", r)?;
        let want_block_size = r.mem_block_size;
        let d = guest::details().map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(GuestDetailsResponse {
            mem_block_size_bytes: if want_block_size {
                guest::mem_block_size()
            } else {
                0
            },
            agent_details: Some(AgentDetails {
                version: kata_proto::VERSION.into(),
                init_daemon: self.0.init,
                device_handlers: vec![],
                storage_handlers: STORAGE_DRIVERS.iter().map(|s| s.to_string()).collect(),
                supports_seccomp: true,
                features: FEATURES.iter().map(|s| s.to_string()).collect(),
            }),
            support_mem_hotplug_probe: false,
            kernel_release: d.kernel_release,
            kernel_version: d.kernel_version,
            mem_total_bytes: d.mem_total_bytes,
            mem_available_bytes: d.mem_available_bytes,
            online_vcpus: d.online_vcpus,
            uptime_seconds: d.uptime_seconds,
        }))
    }

    async fn create_sandbox(&self, r: Request<CreateSandboxRequest>) -> Empty {
        let r = self.take("CreateSandboxRequest", r)?;
        if !r.sandbox_id.is_empty() {
            container::check_id("sandbox_id", &r.sandbox_id)?;
        }
        if lock(&self.0.sandbox).created {
            return Err(Status::already_exists(
                "CreateSandbox was already called for this agent",
            ));
        }
        if !r.hostname.is_empty() {
            if self.0.init {
                nix::unistd::sethostname(&r.hostname).map_err(|e| {
                    Status::invalid_argument(format!("hostname {:?}: {e}", r.hostname))
                })?;
            } else {
                info!(hostname = %r.hostname, "host mode: the host's hostname is left alone");
            }
        }
        sandbox::write_dns(&self.0.root, &r.dns)?;
        let storages = sandbox::mount_storages(&r.storages, &sandbox::storage_bases(&self.0.root))?;
        let mut sb = lock(&self.0.sandbox);
        if !r.sandbox_id.is_empty() {
            sb.id = r.sandbox_id.clone();
            // from now on on every log line (unless the kernel command line
            // already named the sandbox)
            kata_proto::logging::set_sandbox_id(&sb.id);
        }
        sb.created = true;
        sb.disable_seccomp = r.disable_guest_seccomp;
        sb.storages = storages;
        info!(sandbox = %sb.id, "sandbox created");
        ok()
    }

    async fn create_container(&self, r: Request<CreateContainerRequest>) -> Empty {
        let r = self.take("CreateContainerRequest", r)?;
        let id = r.container_id.clone();
        container::check_id("container_id", &id)?;
        // Reserve the id, so that two creates of one id cannot race.
        {
            let containers = lock(&self.0.containers);
            let mut creating = lock(&self.0.creating);
            if containers.contains_key(&id) || !creating.insert(id.clone()) {
                return Err(Status::already_exists(format!(
                    "container {id:?} already exists"
                )));
            }
        }
        let result = self
            .create_container_inner(r)
            .instrument(tracing::info_span!("create", container = %id))
            .await;
        lock(&self.0.creating).remove(&id);
        result
    }

    async fn start_container(&self, r: Request<StartContainerRequest>) -> Empty {
        let r = self.take("StartContainerRequest", r)?;
        let c = self.0.container(&r.container_id)?;
        c.start().await?;
        info!(container = %c.id, pid = c.init.pid, "container started");
        ok()
    }

    async fn remove_container(&self, r: Request<RemoveContainerRequest>) -> Empty {
        let r = self.take("RemoveContainerRequest", r)?;
        let c = self.0.container(&r.container_id)?;
        let timeout = if r.timeout == 0 {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(u64::from(r.timeout))
        };
        container::destroy(&c, timeout).await?;
        sandbox::unmount_storages(&c.storages);
        lock(&self.0.containers).remove(&c.id);
        info!(container = %c.id, "container removed");
        ok()
    }

    async fn exec_process(&self, r: Request<ExecProcessRequest>) -> Empty {
        let r = self.take("ExecProcessRequest", r)?;
        let c = self.0.container(&r.container_id)?;
        container::check_id("exec_id", &r.exec_id)?;
        let (json, terminal) = r
            .process
            .map(|p| (p.oci_process_json, p.terminal))
            .unwrap_or_default();
        let mut process: oci_spec::runtime::Process = serde_json::from_str(&json)
            .map_err(|e| Status::invalid_argument(format!("process does not parse: {e}")))?;
        if terminal {
            // Kata's Process.terminal, the same as the OCI process's.
            process.set_terminal(Some(true));
        }
        container::apply_string_user(&mut process, r.string_user.as_ref())?;
        container::check_process(&process)?;
        let p = container::exec(&c, r.exec_id, process).await?;
        info!(container = %c.id, exec_id = %p.exec_id, pid = p.pid, "process started");
        ok()
    }

    async fn signal_process(&self, r: Request<SignalProcessRequest>) -> Empty {
        let r = self.take("SignalProcessRequest", r)?;
        let c = self.0.container(&r.container_id)?;
        let sig = signal_number(r.signal)?;
        if r.all {
            let pids = c.cgroup.pids().map_err(|e| e.status("listing processes"))?;
            for pid in pids {
                // SAFETY: kill takes integers only.
                unsafe { libc::kill(pid, sig) };
            }
            return ok();
        }
        c.process(&r.exec_id)?.signal(sig)?;
        ok()
    }

    async fn wait_process(
        &self,
        r: Request<WaitProcessRequest>,
    ) -> Result<Response<WaitProcessResponse>, Status> {
        let r = self.take("WaitProcessRequest", r)?;
        let c = self.0.container(&r.container_id)?;
        let p = c.process(&r.exec_id)?;
        let status = p.wait().await;
        if !p.exec_id.is_empty() {
            // As Kata: a waited-for exec is gone, its id free again.
            lock(&c.execs).remove(&p.exec_id);
        }
        Ok(Response::new(WaitProcessResponse {
            status: status.code(),
            signal: status.signal(),
        }))
    }

    async fn update_container(&self, r: Request<UpdateContainerRequest>) -> Empty {
        let r = self.take("UpdateContainerRequest", r)?;
        let c = self.0.container(&r.container_id)?;
        let res = parse_resources(r.resources)?;
        c.cgroup
            .update(&res)
            .map_err(|e| e.status(&format!("updating container {}", c.id)))?;
        ok()
    }

    async fn stats_container(
        &self,
        r: Request<StatsContainerRequest>,
    ) -> Result<Response<StatsContainerResponse>, Status> {
        let r = self.take("StatsContainerRequest", r)?;
        let c = self.0.container(&r.container_id)?;
        let cg = c.cgroup.stats().map_err(|e| e.status("cgroup stats"))?;
        Ok(Response::new(StatsContainerResponse {
            cgroup_stats: Some(cg),
            network_stats: network_stats(),
        }))
    }

    async fn pause_container(&self, r: Request<PauseContainerRequest>) -> Empty {
        let r = self.take("PauseContainerRequest", r)?;
        let c = self.0.container(&r.container_id)?;
        if c.state() != State::Running {
            return Err(Status::failed_precondition(format!(
                "container {} is {:?}: only a running container can be paused",
                c.id,
                c.state()
            )));
        }
        c.cgroup.freeze().map_err(|e| e.status("freezing"))?;
        c.set_state(State::Paused);
        ok()
    }

    async fn resume_container(&self, r: Request<ResumeContainerRequest>) -> Empty {
        let r = self.take("ResumeContainerRequest", r)?;
        let c = self.0.container(&r.container_id)?;
        if c.state() != State::Paused {
            return Err(Status::failed_precondition(format!(
                "container {} is {:?}, not paused",
                c.id,
                c.state()
            )));
        }
        c.cgroup.thaw().map_err(|e| e.status("thawing"))?;
        c.set_state(State::Running);
        ok()
    }

    async fn list_processes(
        &self,
        r: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        let r = self.take("ListProcessesRequest", r)?;
        let c = self.0.container(&r.container_id)?;
        let mut pids = c.cgroup.pids().map_err(|e| e.status("listing processes"))?;
        pids.sort_unstable();
        let list = match r.format.as_str() {
            "json" => serde_json::to_vec(
                &pids
                    .iter()
                    .map(|p| serde_json::json!({"pid": p, "cmd": cmdline_of(*p)}))
                    .collect::<Vec<_>>(),
            )
            .unwrap_or_default(),
            "" | "table" => {
                let mut t = String::from("PID CMD\n");
                for p in &pids {
                    t.push_str(&format!("{p} {}\n", cmdline_of(*p)));
                }
                t.into_bytes()
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "format {other:?}: expected \"table\" or \"json\""
                )))
            }
        };
        Ok(Response::new(ListProcessesResponse {
            process_list: list,
            pids,
        }))
    }

    async fn close_stdin(&self, r: Request<CloseStdinRequest>) -> Empty {
        let r = self.take("CloseStdinRequest", r)?;
        let c = self.0.container(&r.container_id)?;
        c.process(&r.exec_id)?.stdio.close_stdin();
        ok()
    }

    async fn tty_win_resize(&self, r: Request<TtyWinResizeRequest>) -> Empty {
        let r = self.take("TtyWinResizeRequest", r)?;
        let c = self.0.container(&r.container_id)?;
        let (rows, cols) = match (u16::try_from(r.row), u16::try_from(r.column)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "window size {}x{} is over 65535",
                    r.row, r.column
                )))
            }
        };
        c.process(&r.exec_id)?.stdio.resize(rows, cols)?;
        ok()
    }

    async fn write_stdin(
        &self,
        r: Request<WriteStreamRequest>,
    ) -> Result<Response<WriteStreamResponse>, Status> {
        self.take("WriteStreamRequest", r)?;
        Err(polled_stdio())
    }

    async fn read_stdout(
        &self,
        r: Request<ReadStreamRequest>,
    ) -> Result<Response<ReadStreamResponse>, Status> {
        self.take("ReadStreamRequest", r)?;
        Err(polled_stdio())
    }

    async fn read_stderr(
        &self,
        r: Request<ReadStreamRequest>,
    ) -> Result<Response<ReadStreamResponse>, Status> {
        self.take("ReadStreamRequest", r)?;
        Err(polled_stdio())
    }

    async fn get_oom_event(
        &self,
        r: Request<GetOomEventRequest>,
    ) -> Result<Response<OomEvent>, Status> {
        self.take("GetOOMEventRequest", r)?;
        let mut rx = self.0.oom_rx.lock().await;
        match rx.recv().await {
            Some(container_id) => Ok(Response::new(OomEvent { container_id })),
            None => Err(Status::unavailable("the agent is shutting down")),
        }
    }

    async fn copy_file(&self, r: Request<CopyFileRequest>) -> Empty {
        let r = self.take("CopyFileRequest", r)?;
        let root = self.0.root.clone();
        tokio::task::spawn_blocking(move || sandbox::copy_file(&root, &r))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        ok()
    }

    async fn destroy_sandbox(&self, r: Request<DestroySandboxRequest>) -> Empty {
        self.take("DestroySandboxRequest", r)?;
        info!("DestroySandbox: ending every container; the agent ends once this reply is sent");
        self.0.destroy_all().await;
        // The reply must reach the host before the guest goes away: the serve
        // loop waits for this notification, then finishes in-flight replies.
        self.0.shutdown.notify_one();
        ok()
    }

    async fn update_interface(
        &self,
        r: Request<UpdateInterfaceRequest>,
    ) -> Result<Response<Interface>, Status> {
        let r = self.take("UpdateInterfaceRequest", r)?;
        self.guest_network("UpdateInterface")?;
        let want = r
            .interface
            .ok_or_else(|| Status::invalid_argument("UpdateInterface: interface is missing"))?;
        let h = network::connect()?;
        Ok(Response::new(network::update_interface(&h, &want).await?))
    }

    async fn update_routes(
        &self,
        r: Request<UpdateRoutesRequest>,
    ) -> Result<Response<Routes>, Status> {
        let r = self.take("UpdateRoutesRequest", r)?;
        self.guest_network("UpdateRoutes")?;
        let want = r.routes.map(|r| r.routes).unwrap_or_default();
        let h = network::connect()?;
        Ok(Response::new(Routes {
            routes: network::update_routes(&h, &want).await?,
        }))
    }

    async fn list_interfaces(
        &self,
        r: Request<ListInterfacesRequest>,
    ) -> Result<Response<Interfaces>, Status> {
        self.take("ListInterfacesRequest", r)?;
        let h = network::connect()?;
        Ok(Response::new(Interfaces {
            interfaces: network::list_interfaces(&h).await?,
        }))
    }

    async fn list_routes(&self, r: Request<ListRoutesRequest>) -> Result<Response<Routes>, Status> {
        self.take("ListRoutesRequest", r)?;
        let h = network::connect()?;
        Ok(Response::new(Routes {
            routes: network::list_routes(&h).await?,
        }))
    }

    /// Onlines hot-plugged CPUs until `nb_cpus` are online (waiting up to
    /// 5 s for them to appear), and every offline memory block unless
    /// `cpu_only`.
    async fn online_cpu_mem(&self, r: Request<OnlineCpuMemRequest>) -> Empty {
        let r = self.take("OnlineCPUMemRequest", r)?;
        let got = tokio::task::spawn_blocking(move || {
            guest::online_cpu_mem(
                std::path::Path::new("/sys"),
                r.nb_cpus,
                r.cpu_only,
                r.memory_blocks,
                ONLINE_WAIT,
            )
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| match e {
            guest::OnlineError::Timeout { .. } | guest::OnlineError::MemoryTimeout { .. } => {
                Status::deadline_exceeded(e.to_string())
            }
            e => Status::internal(e.to_string()),
        })?;
        info!(
            cpus_online = got.cpus_online,
            memory_blocks = got.memory_blocks,
            "hot-plugged resources online"
        );
        ok()
    }

    async fn add_arp_neighbors(&self, r: Request<AddArpNeighborsRequest>) -> Empty {
        let r = self.take("AddARPNeighborsRequest", r)?;
        self.guest_network("AddARPNeighbors")?;
        let want = r.neighbors.map(|n| n.arp_neighbors).unwrap_or_default();
        let h = network::connect()?;
        network::add_neighbours(&h, &want).await?;
        ok()
    }

    not_yet! {
        get_volume_stats(VolumeStatsRequest as "VolumeStatsRequest") -> VolumeStatsResponse;
        reseed_random_dev(ReseedRandomDevRequest as "ReseedRandomDevRequest") -> ();
        mem_hotplug_by_probe(MemHotplugByProbeRequest as "MemHotplugByProbeRequest") -> ();
        set_guest_date_time(SetGuestDateTimeRequest as "SetGuestDateTimeRequest") -> ();
        add_swap(AddSwapRequest as "AddSwapRequest") -> ();
        update_ephemeral_mounts(UpdateEphemeralMountsRequest as "UpdateEphemeralMountsRequest") -> ();
    }

    /// The agent process and the guest in Prometheus text (Kata's
    /// `kata_agent_*` and `kata_guest_*` families), read now.
    async fn get_metrics(
        &self,
        r: Request<GetMetricsRequest>,
    ) -> Result<Response<Metrics>, Status> {
        self.take("GetMetricsRequest", r)?;
        let text = tokio::task::spawn_blocking(|| {
            let mut m = kata_proto::metrics::Metrics::new();
            kata_proto::metrics::add_process(&mut m, "kata_agent", "self");
            kata_proto::metrics::add_guest(&mut m, "/proc", &["/", "/run"]);
            if kata_proto::trace::enabled() {
                m.counter(
                    "kata_agent_trace_spans_exported_total",
                    "Trace spans the agent sent to kata-trace-forwarder.",
                    &[],
                    kata_proto::trace::exported() as f64,
                );
                m.counter(
                    "kata_agent_trace_spans_dropped_total",
                    "Trace spans the agent dropped (queue full, forwarder unreachable).",
                    &[],
                    kata_proto::trace::dropped() as f64,
                );
            }
            m.render()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(Metrics { metrics: text }))
    }

    /// Checked by the policy in force (without policy support: refused).
    async fn set_policy(&self, r: Request<SetPolicyRequest>) -> Empty {
        self.0.policy.set_policy(&r.into_inner().policy)?;
        ok()
    }
}

impl AgentRpc {
    /// The request of a call, once the agent policy allowed it as `name`
    /// (the request's message name in agent.proto, as Kata's policies use).
    fn take<T: serde::Serialize>(&self, name: &str, r: Request<T>) -> Result<T, Status> {
        let r = r.into_inner();
        self.0.policy.check(name, &r)?;
        Ok(r)
    }

    /// Network changes are for the guest's own namespace: a host-mode agent
    /// refuses them rather than change its host's network.
    fn guest_network(&self, call: &str) -> Result<(), Status> {
        if self.0.init {
            Ok(())
        } else {
            Err(Status::failed_precondition(format!(
                "{call} configures the guest's network: this agent runs in host mode"
            )))
        }
    }

    async fn create_container_inner(&self, r: CreateContainerRequest) -> Empty {
        let id = r.container_id.clone();
        let mut spec = container::parse_spec(&r.oci_spec_json)?;
        if let Some(mut p) = spec.process().clone() {
            container::apply_string_user(&mut p, r.string_user.as_ref())?;
            container::check_process(&p)?;
            spec.set_process(Some(p));
        }
        let (sandbox_id, disable_seccomp) = {
            let sb = lock(&self.0.sandbox);
            (sb.id.clone(), sb.disable_seccomp)
        };
        let cgroup_path = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone())
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| format!("/{}/{id}", cgroup_parent(&sandbox_id)));
        let storages = {
            let _phase = tracing::info_span!("mount_storages").entered();
            sandbox::mount_storages(&r.storages, &sandbox::storage_bases(&self.0.root))?
        };
        let oom_tx = self.0.oom_tx.clone();
        let created = container::create(container::CreateArgs {
            id: id.clone(),
            spec,
            cgroup_path,
            seccomp: !disable_seccomp,
            storages: storages.clone(),
        })
        .instrument(tracing::info_span!("create_container"))
        .await;
        let c = match created {
            Ok(c) => c,
            Err(e) => {
                sandbox::unmount_storages(&storages);
                return Err(e);
            }
        };
        match c.cgroup.oom_events() {
            Ok(mut w) => {
                let cid = id.clone();
                let task = tokio::spawn(async move {
                    while w.next().await.is_ok() {
                        warn!(container = %cid, "OOM: the kernel killed a process of the container");
                        if oom_tx.send(cid.clone()).is_err() {
                            return;
                        }
                    }
                });
                *lock(&c.oom_task) = Some(task);
            }
            Err(e) => warn!(container = %id, "no OOM events for this container: {e}"),
        }
        info!(container = %id, pid = c.init.pid, "container created");
        lock(&self.0.containers).insert(id, c);
        ok()
    }
}
