//! One pod: its sandbox directory, kata-virtiofsd, kata-vmm-launcher (and its
//! VM), the agent connection, and a teardown that always runs to the end.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kata_proto::agent::{CreateSandboxRequest, DestroySandboxRequest, Storage};
use kata_proto::config::{Config, ConfigError, Workload};
use kata_proto::dialer::Address;
use kata_proto::launcher::launcher_client::LauncherClient;
use kata_proto::launcher::{Accelerator, CreateVmRequest, StartVmRequest, StopVmRequest, VmSpec};
use kata_proto::paths::{ports, SandboxPaths};
use kata_proto::trace::Traced;
use kata_vmm_launcher::client::{die_with_parent, LauncherProcess, LiveLauncher};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tracing::{info, info_span, warn, Instrument};

use crate::agent::AgentError;
use crate::error::{grpc_code, Code};
use crate::mounts;
use crate::network::NetnsChoice;
use crate::spec::GUEST_SHARE;

pub use crate::agent::AgentClient as Agent;

/// Why a pod could not be brought up. Launcher and agent errors keep their
/// gRPC code, so containerd sees the code the helper meant.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The launcher refused or failed a call.
    #[error("launcher: {what}: {}", .status.message())]
    Launcher {
        /// The step.
        what: &'static str,
        /// Its answer.
        status: tonic::Status,
    },
    /// The agent failed a call.
    #[error("{what}: {source}")]
    Agent {
        /// The step.
        what: &'static str,
        /// Why.
        source: AgentError,
    },
    /// The configuration names something unusable.
    #[error("configuration: {0}")]
    Config(ConfigError),
    /// A host-side step failed.
    #[error("{what}: {why}")]
    Host {
        /// The step.
        what: String,
        /// Why.
        why: String,
    },
    /// The pod's network.
    #[error("pod network: {0}")]
    Network(#[from] crate::network::NetError),
    /// A resize the pod's bounds do not allow (the pod is unchanged).
    #[error("{0}")]
    Refused(String),
}

impl PodError {
    fn host(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PodError {
        let what = what.into();
        move |e| PodError::Host {
            what,
            why: e.to_string(),
        }
    }

    /// The containerd (ttrpc) code.
    pub fn code(&self) -> Code {
        match self {
            PodError::Launcher { status, .. } => grpc_code(status.code()),
            PodError::Agent { source, .. } => source.code(),
            PodError::Config(_) => Code::INVALID_ARGUMENT,
            PodError::Host { .. } => Code::INTERNAL,
            PodError::Refused(_) => Code::INVALID_ARGUMENT,
            PodError::Network(e) => match e {
                crate::network::NetError::Config(_) => Code::INVALID_ARGUMENT,
                crate::network::NetError::Netmon(_) => Code::FAILED_PRECONDITION,
                crate::network::NetError::Agent { source, .. } => source.code(),
            },
        }
    }
}

impl From<crate::mounts::MountError> for PodError {
    fn from(e: crate::mounts::MountError) -> Self {
        PodError::Host {
            what: "preparing the pod's mounts".into(),
            why: e.to_string(),
        }
    }
}

type Result<T, E = PodError> = std::result::Result<T, E>;

/// What the shim keeps on disk so that `shim delete` can clean a pod whose
/// shim was SIGKILLed.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PodState {
    /// The pod.
    pub sandbox_id: String,
    /// The shim serving it.
    pub shim_pid: u32,
    /// kata-virtiofsd's pid and start time (to tell a reused pid).
    pub virtiofsd_pid: u32,
    /// Its start time (clock ticks since boot).
    pub virtiofsd_start: u64,
    /// The pod's network namespace kata-netmon plumbed (its leftovers are
    /// removed from there after a crash).
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The shim made that netns (SandboxPaths::pod_netns): it goes at teardown.
    #[serde(default)]
    pub own_netns: bool,
    /// The pod's host cgroups (recorded before they are made).
    #[serde(default)]
    pub cgroups: Option<crate::cgroups::Recorded>,
}

impl PodState {
    fn file(paths: &SandboxPaths) -> PathBuf {
        paths.dir.join("shim.json")
    }

    fn save(&self, paths: &SandboxPaths) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = paths.dir.join(".shim.json.tmp");
        let json = serde_json::to_vec(self).map_err(std::io::Error::from);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&json?))
            .and_then(|_| std::fs::rename(&tmp, Self::file(paths)))
            .map_err(PodError::host(format!(
                "writing {}",
                Self::file(paths).display()
            )))
    }

    /// Reads the state of the pod in `paths`.
    pub fn load(paths: &SandboxPaths) -> Option<PodState> {
        serde_json::from_slice(&std::fs::read(Self::file(paths)).ok()?).ok()
    }
}

/// What a pod is made with: its VM's size and the host cgroup it lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The VM at boot, and its room to grow.
    pub size: kata_proto::config::VmSize,
    /// The limits of the sandbox container (the first of the pod's
    /// workloads).
    pub workload: Workload,
    /// The sandbox cgroup (`linux.cgroupsPath`, or `kata_<id>`).
    pub cgroup: String,
}

/// A running pod.
pub struct Pod {
    /// The pod (sandbox) id.
    pub id: String,
    /// Its directory.
    pub paths: SandboxPaths,
    /// The configuration it was created with (annotations applied).
    pub config: Config,
    /// The agent.
    pub agent: Agent,
    /// The agent's address (stdio streams use it).
    pub agent_addr: Address,
    /// The hypervisor's pid (what containerd sees as the task's pid).
    pub hypervisor_pid: u32,
    /// The launcher, when the pod runs in a VM (None: a host-mode agent).
    pub(crate) launcher: Option<LauncherClient<Traced>>,
    /// The containers' limits and the VM's size now (resizes).
    pub(crate) resources: tokio::sync::Mutex<crate::resize::Resources>,
    /// Where the guest sees the share (container rootfs and binds).
    pub guest_share: PathBuf,
    pub(crate) children: Mutex<Children>,
    /// Host-side time of the critical path of CreateVm+StartVm etc.
    pub timings: Timings,
}

#[derive(Default)]
pub(crate) struct Children {
    /// The pod's host cgroups.
    pub(crate) cgroups: Option<Arc<std::sync::Mutex<crate::cgroups::HostCgroups>>>,
    launcher: Option<Child>,
    launcher_client: Option<LauncherClient<Traced>>,
    virtiofsd: Option<Child>,
    netmon: Option<kata_netmon::client::NetmonProcess>,
    /// Keeps the guest's network what netmon reports.
    net: Option<Arc<crate::network::NetSync>>,
    /// Forwards netmon's changes to the guest.
    net_follow: Option<tokio::task::JoinHandle<()>>,
    /// Serves the management socket.
    monitor: Option<tokio::task::JoinHandle<()>>,
    /// kata-trace-forwarder, when the agent traces.
    forwarder: Option<Child>,
}

/// Where pod start time went.
#[derive(Debug, Default, Clone, Copy)]
pub struct Timings {
    /// Directory, mounts, kata-virtiofsd and launcher up, CreateVm.
    pub host_prepare: Duration,
    /// Of which: until kata-virtiofsd and the launcher both served.
    pub helpers: Duration,
    /// Of which: the hypervisor's own start (spawn until QMP answered).
    pub hypervisor_start: Duration,
    /// StartVm until the agent announced itself (guest boot).
    pub guest_boot: Duration,
    /// Agent connection and CreateSandbox.
    pub sandbox: Duration,
}

async fn spawn_virtiofsd(cfg: &Config, id: &str, paths: &SandboxPaths) -> Result<Child> {
    let q = &cfg.hypervisor.qemu;
    let bin = q.virtio_fs_daemon_path().map_err(PodError::Config)?;
    std::fs::create_dir_all(paths.vm_dir()).map_err(PodError::host(format!(
        "creating {}",
        paths.vm_dir().display()
    )))?;
    let mut cmd = Command::new(&bin);
    cmd.arg("--socket-path")
        .arg(paths.virtiofsd_socket())
        .arg("--shared-dir")
        .arg(paths.shared_dir())
        .arg("--cache")
        .arg(q.virtiofsd_cache_mode())
        .arg("--sandbox-id")
        .arg(id)
        .arg("--control-socket")
        .arg(paths.virtiofsd_control())
        .args(&q.virtio_fs_extra_args)
        .envs(kata_proto::trace::child_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    let child = cmd
        .spawn()
        .map_err(PodError::host(format!("starting {}", bin.display())))?;
    wait_ready(child, &bin).await
}

/// Waits for a helper's `READY` line; kills and reaps it if it does not come.
async fn wait_ready(mut child: Child, bin: &Path) -> Result<Child> {
    let ready = match child.stdout.take() {
        Some(out) => kata_proto::wait_ready_line(out, Duration::from_secs(10)).await,
        None => Err("no stdout".into()),
    };
    if let Err(why) = ready {
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Err(PodError::Host {
            what: format!("starting {}", bin.display()),
            why,
        });
    }
    Ok(child)
}

/// Starts tracing the shim's work as the pod's configuration says
/// (`[runtime] enable_tracing`): spans to `jaeger_endpoint`.
pub fn start_tracing(cfg: &Config) -> std::result::Result<(), String> {
    let exporter = kata_proto::trace::otlp::Exporter::new(
        cfg.runtime.tracing_endpoint(),
        cfg.runtime.tracing_auth(),
    )
    .map_err(|e| format!("jaeger_endpoint: {e}"))?;
    kata_proto::trace::start(kata_proto::trace::Sink::Otlp(exporter))
}

/// Starts kata-trace-forwarder on the hybrid vsock listener of host port
/// 10240, before the guest boots; its log lines join the shim's.
async fn spawn_forwarder(cfg: &Config, id: &str, paths: &SandboxPaths) -> Result<Child> {
    let bin = cfg
        .agent
        .kata
        .trace_forwarder_path()
        .map_err(PodError::Config)?;
    let socket = kata_proto::paths::hybrid_listener_path(&paths.vsock_uds(), ports::TRACING);
    let mut cmd = Command::new(&bin);
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--otlp-endpoint")
        .arg(cfg.runtime.tracing_endpoint())
        .arg("--sandbox-id")
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some((user, password)) = cfg.runtime.tracing_auth() {
        cmd.arg("--otlp-user")
            .arg(user)
            .env("KATA_TRACE_PASSWORD", password);
    }
    die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(PodError::host(format!("starting {}", bin.display())))?;
    if let Some(err) = child.stderr.take() {
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(err).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                info!(helper = "kata-trace-forwarder", "{l}");
            }
        });
    }
    wait_ready(child, &bin).await
}

fn accelerator(name: &str) -> Accelerator {
    match name {
        "kvm" => Accelerator::Kvm,
        "tcg" => Accelerator::Tcg,
        _ => Accelerator::Auto,
    }
}

/// Waits for one of the node's boot slots ([`kata_proto::boot_slots`]) for
/// at most `limit`; `None` when there is no limit, or no slot came in time,
/// or the slot directory failed (the boot goes on: a slot never fails a pod).
async fn boot_slot(
    configured: i32,
    tcg: bool,
    limit: Duration,
) -> Option<kata_proto::boot_slots::Slot> {
    use kata_proto::boot_slots::{acquire, count, dir, Acquired};
    let n = count(configured, tcg);
    let waiting = || info!(slots = n, "every boot slot is taken: waiting for one");
    match acquire(&dir(), n, limit, waiting).await {
        Ok(Acquired::Slot(slot, waited)) => {
            if waited > Duration::ZERO {
                info!(
                    slot = slot.index,
                    waited_ms = waited.as_millis() as u64,
                    "boot slot taken"
                );
            }
            Some(slot)
        }
        Ok(Acquired::Unlimited) => None,
        Ok(Acquired::TimedOut(waited)) => {
            warn!(
                slots = n,
                waited_ms = waited.as_millis() as u64,
                "no boot slot came free in time; booting without one"
            );
            None
        }
        Err(e) => {
            warn!(dir = %dir().display(), error = %e, "boot slots unavailable; booting without one");
            None
        }
    }
}

impl Pod {
    /// Brings a pod up: directory, shared mount, kata-virtiofsd, the launcher,
    /// the VM, the agent, CreateSandbox. On failure everything made so far is
    /// removed before the error returns.
    pub async fn create(
        id: &str,
        cfg: Config,
        plan: Plan,
        hostname: &str,
        netns: NetnsChoice,
    ) -> Result<Pod> {
        let paths = SandboxPaths::new(id);
        if paths.dir.exists() {
            // a pod of that id left by a dead shim: clean it first
            warn!(
                "{} exists: cleaning what a previous shim left",
                paths.dir.display()
            );
            cleanup_dead(&paths).await;
        }
        let mut children = Children::default();
        let up = Self::bring_up(id, &paths, &cfg, &plan, hostname, netns, &mut children);
        match up.await {
            Ok((agent, agent_addr, hypervisor_pid, launcher, timings)) => Ok(Pod {
                id: id.into(),
                paths,
                resources: tokio::sync::Mutex::new(crate::resize::Resources::new(id, &plan)),
                config: cfg,
                agent,
                agent_addr,
                hypervisor_pid,
                launcher: Some(launcher),
                guest_share: GUEST_SHARE.into(),
                children: Mutex::new(children),
                timings,
            }),
            Err(e) => {
                warn!("pod creation failed, removing what was made: {e:#}");
                teardown_children(&paths, &mut children).await;
                Err(e)
            }
        }
    }

    /// A pod whose agent already runs on this host (`kata-agent --listen
    /// unix://...`): no VM, no launcher, no kata-virtiofsd. The share is
    /// prepared as for a VM and the agent reads it where the host has it.
    /// This is how the shim's task logic is tested without QEMU.
    pub async fn attach_host_agent(id: &str, cfg: Config, agent_addr: Address) -> Result<Pod> {
        let paths = SandboxPaths::new(id);
        if paths.dir.exists() {
            cleanup_dead(&paths).await;
        }
        let up = async {
            mounts::private_dir(&paths.dir)?;
            mounts::make_share(&paths.host_mounts_dir(), &paths.shared_dir())?;
            let ch = kata_proto::dialer::channel(&agent_addr, Duration::from_secs(10))
                .await
                .map_err(|e| PodError::Host {
                    what: "connecting to the agent".into(),
                    why: e.to_string(),
                })?;
            let agent = Agent::new(ch, Duration::from_millis(cfg.agent.kata.request_timeout_ms));
            set_policy(&agent, &cfg).await?;
            agent
                .create_sandbox(CreateSandboxRequest {
                    sandbox_id: id.into(),
                    ..Default::default()
                })
                .await
                .map_err(|source| PodError::Agent {
                    what: "CreateSandbox",
                    source,
                })?;
            Ok(agent)
        };
        match up.await {
            Ok(agent) => Ok(Pod {
                id: id.into(),
                guest_share: paths.shared_dir(),
                paths,
                config: cfg,
                agent,
                agent_addr,
                hypervisor_pid: 0,
                launcher: None,
                resources: tokio::sync::Mutex::new(crate::resize::Resources::fixed(id)),
                children: Mutex::new(Children::default()),
                timings: Timings::default(),
            }),
            Err(e) => {
                remove_dir(&paths);
                Err(e)
            }
        }
    }

    async fn bring_up(
        id: &str,
        paths: &SandboxPaths,
        cfg: &Config,
        plan: &Plan,
        hostname: &str,
        netns: NetnsChoice,
        children: &mut Children,
    ) -> Result<(Agent, Address, u32, LauncherClient<Traced>, Timings)> {
        let t0 = Instant::now();
        let q = &cfg.hypervisor.qemu;
        // root-only whatever the umask: nothing below is for other host users
        mounts::private_dir(&paths.dir)?;
        let mut state = PodState {
            sandbox_id: id.into(),
            shim_pid: std::process::id(),
            ..Default::default()
        };
        // the cgroups first: every helper starts in the one it belongs to
        // (recorded before they are made: a crash in between leaves a
        // record the cleanup follows)
        let recorded =
            crate::cgroups::Recorded::new(id, &plan.cgroup, cfg.runtime.sandbox_cgroup_only);
        state.cgroups = Some(recorded.clone());
        state.save(paths)?;
        let cgroups =
            tokio::task::spawn_blocking(move || crate::cgroups::HostCgroups::create(&recorded))
                .await
                .map_err(|e| PodError::host("making the host cgroups")(std::io::Error::other(e)))?
                .map_err(|e| PodError::Host {
                    what: "making the host cgroups".into(),
                    why: e.to_string(),
                })?;
        let cgroups = Arc::new(std::sync::Mutex::new(cgroups));
        children.cgroups = Some(cgroups.clone());
        let netns = match netns {
            NetnsChoice::Given(p) => Some(p),
            NetnsChoice::Host => {
                info!("the spec has no network namespace (host network): the pod gets no network");
                None
            }
            NetnsChoice::New if cfg.runtime.disable_new_netns => {
                info!("disable_new_netns: the VM stays in the shim's network namespace, with no network");
                None
            }
            NetnsChoice::New => {
                // recorded before it exists: a crash in between leaves a
                // file the cleanup removes
                state.netns = Some(paths.pod_netns());
                state.own_netns = true;
                state.save(paths)?;
                crate::network::create_netns(&paths.pod_netns()).map_err(PodError::host(
                    format!(
                        "creating the pod's network namespace {}",
                        paths.pod_netns().display()
                    ),
                ))?;
                Some(paths.pod_netns())
            }
        };
        let netns = netns.as_deref();
        state.netns = netns.map(Path::to_path_buf);
        state.save(paths)?;
        let shared = q.shared_fs == kata_proto::config::SharedFs::VirtioFs;
        let mut virtiofs_socket = String::new();
        let launcher_bin = q.launcher_path().map_err(PodError::Config)?;
        // kata-virtiofsd and the launcher start side by side
        let fs = async {
            if !shared {
                return Ok(None);
            }
            mounts::make_share(&paths.host_mounts_dir(), &paths.shared_dir())?;
            Ok(Some(spawn_virtiofsd(cfg, id, paths).await?))
        };
        let launcher = async {
            LauncherProcess::spawn(&launcher_bin, id, &paths.dir, Duration::from_secs(10))
                .await
                .map_err(|e| PodError::Host {
                    what: format!("starting {}", launcher_bin.display()),
                    why: format!("{e:#}"),
                })
        };
        // and kata-netmon plumbs the pod's network meanwhile, and
        // kata-trace-forwarder waits for the agent's spans
        let net = crate::network::start(cfg, id, paths, netns);
        let forwarder = async {
            if cfg.agent.kata.enable_tracing {
                Ok(Some(spawn_forwarder(cfg, id, paths).await?))
            } else {
                Ok(None)
            }
        };
        let (fs, launcher, net, forwarder) = async { tokio::join!(fs, launcher, net, forwarder) }
            .instrument(info_span!("helpers"))
            .await;
        let forwarder_err = match forwarder {
            Ok(f) => {
                children.forwarder = f;
                None
            }
            Err(e) => Some(e),
        };
        let (net, net_err) = match net {
            Ok(Some(n)) => (Some(n.initial), {
                children.netmon = Some(n.netmon);
                None
            }),
            Ok(None) => (None, None),
            Err(e) => (None, Some(e)),
        };
        // whatever started is kept in `children`, for the teardown
        let fs_err = match fs {
            Ok(Some(child)) => {
                state.virtiofsd_pid = child.id().unwrap_or(0);
                state.virtiofsd_start =
                    kata_proto::process::start_time(state.virtiofsd_pid).unwrap_or(0);
                children.virtiofsd = Some(child);
                state.save(paths)?;
                virtiofs_socket = paths.virtiofsd_socket().display().to_string();
                None
            }
            Ok(None) => None,
            Err(e) => Some(e),
        };
        let LauncherProcess {
            child, mut client, ..
        } = launcher?;
        children.launcher = Some(child);
        children.launcher_client = Some(client.clone());
        if let Some(e) = fs_err {
            return Err(e);
        }
        if let Some(e) = net_err {
            return Err(e.into());
        }
        if let Some(e) = forwarder_err {
            return Err(e);
        }
        let helpers = t0.elapsed();

        let mut params = q.kernel_params.clone();
        if cfg.agent.kata.enable_debug {
            params.push_str(" agent.log=debug");
        }
        if cfg.agent.kata.debug_console_enabled {
            params.push_str(" agent.debug_console");
        }
        if cfg.agent.kata.enable_tracing {
            params.push_str(" agent.trace");
        }
        let size = plan.size;
        let spec = VmSpec {
            vcpus: size.vcpus,
            max_vcpus: size.max_vcpus,
            memory_mib: size.memory_mib,
            max_memory_mib: size.max_memory_mib,
            memory_slots: if size.max_memory_mib > size.memory_mib {
                q.memory_slots
            } else {
                0
            },
            kernel_path: q.kernel.display().to_string(),
            initrd_path: q.initrd.display().to_string(),
            kernel_params: params.trim().to_string(),
            accelerator: accelerator(&q.accelerator) as i32,
            hypervisor_path: q.path.display().to_string(),
            machine_type: q.machine_type.clone(),
            firmware_path: q.firmware.display().to_string(),
            virtiofs_socket,
            // QEMU lives in the pod's netns, NICs or not (the task's pid is
            // QEMU's: `ctr run --cni` plumbs /proc/<pid>/ns/net)
            netns_path: netns.map(|n| n.display().to_string()).unwrap_or_default(),
            net_devices: net
                .as_ref()
                .map(crate::network::net_devices)
                .unwrap_or_default(),
            hotplug_slots: if net.is_some() && q.machine_type == "q35" {
                q.pcie_root_port
            } else {
                0
            },
            ..Default::default()
        };
        let created = client
            .create_vm(CreateVmRequest { spec: Some(spec) })
            .instrument(info_span!("create_vm"))
            .await
            .map_err(|status| PodError::Launcher {
                what: "creating the VM",
                status,
            })?
            .into_inner();
        let pid = created.hypervisor_pid;
        let placed =
            crate::resize::with_cgroups(&cgroups, move |cg| cg.place_hypervisor(pid)).await;
        placed.map_err(|e| PodError::Host {
            what: "placing QEMU in the sandbox cgroup".into(),
            why: e.to_string(),
        })?;
        let overhead = crate::resize::overhead(cfg);
        let (workload, memory) = (plan.workload, size.memory_mib);
        let limited = crate::resize::with_cgroups(&cgroups, move |cg| {
            cg.set_limits(workload, memory, overhead)
        })
        .await;
        limited.map_err(|e| PodError::Host {
            what: "setting the sandbox cgroup's limits".into(),
            why: e.to_string(),
        })?;
        let host_prepare = t0.elapsed();
        let hypervisor_start = Duration::from_micros(created.hypervisor_start_us);
        let ready_limit = Duration::from_secs(cfg.agent.kata.dial_timeout.max(1));
        let held_slot = boot_slot(
            q.max_concurrent_boots,
            created.accelerator == Accelerator::Tcg as i32,
            ready_limit,
        )
        .instrument(info_span!("boot_slot"))
        .await;
        let t1 = Instant::now();
        client
            .start_vm(StartVmRequest {
                agent_ready_timeout_seconds: ready_limit.as_secs() as u32,
            })
            .instrument(info_span!("boot"))
            .await
            .map_err(|status| PodError::Launcher {
                what: "starting the VM",
                status,
            })?;
        let guest_boot = t1.elapsed();
        drop(held_slot);
        let t2 = Instant::now();
        let agent_addr = Address::Hybrid {
            path: created.vsock_uds_path.clone().into(),
            port: ports::AGENT,
        };
        let ch = kata_proto::dialer::channel(&agent_addr, Duration::from_secs(10))
            .instrument(info_span!("agent_connect"))
            .await
            .map_err(|e| PodError::Host {
                what: "connecting to the agent".into(),
                why: e.to_string(),
            })?;
        let agent = Agent::new(ch, Duration::from_millis(cfg.agent.kata.request_timeout_ms));
        let mut storages = Vec::new();
        if shared {
            storages.push(Storage {
                driver: "virtio-fs".into(),
                source: "kataShared".into(),
                fstype: "virtiofs".into(),
                mount_point: GUEST_SHARE.into(),
                ..Default::default()
            });
        }
        let limit = Duration::from_secs(cfg.agent.kata.dial_timeout.max(1));
        set_policy(&agent.with_deadline(limit), cfg).await?;
        agent
            .with_deadline(limit)
            .create_sandbox(CreateSandboxRequest {
                hostname: hostname.into(),
                storages,
                sandbox_id: id.into(),
                disable_guest_seccomp: cfg.runtime.disable_guest_seccomp,
                kernel_modules: cfg.agent.kata.kernel_modules.clone(),
                ..Default::default()
            })
            .await
            .map_err(|source| PodError::Agent {
                what: "CreateSandbox in the guest",
                source,
            })?;
        if let (Some(n), Some(nm)) = (net, children.netmon.as_ref()) {
            if !crate::network::nothing_to_apply(&n) {
                crate::network::configure(&agent, &n)
                    .instrument(info_span!("network"))
                    .await?;
            }
            let sync = Arc::new(crate::network::NetSync::new(
                nm.client.clone(),
                client.clone(),
                agent.clone(),
                &n,
            ));
            children.net_follow = Some(tokio::spawn(sync.clone().follow()));
            children.net = Some(sync);
        }
        let timings = Timings {
            host_prepare,
            helpers,
            hypervisor_start,
            guest_boot,
            sandbox: t2.elapsed(),
        };
        info!(
            hypervisor_pid = created.hypervisor_pid,
            host_ms = host_prepare.as_millis() as u64,
            helpers_ms = helpers.as_millis() as u64,
            qemu_ms = hypervisor_start.as_millis() as u64,
            boot_ms = guest_boot.as_millis() as u64,
            sandbox_ms = timings.sandbox.as_millis() as u64,
            "pod is up"
        );
        Ok((agent, agent_addr, created.hypervisor_pid, client, timings))
    }

    /// Brings the guest's network to the pod's netns as it is now (a CNI
    /// plugin may have run since Create); nothing if the pod has none.
    pub async fn sync_network(&self) -> Result<()> {
        let net = self.children.lock().await.net.clone();
        match net {
            Some(n) => Ok(n.sync().await?),
            None => Ok(()),
        }
    }

    /// The agent client (cheap clone).
    pub fn agent(&self) -> Agent {
        self.agent.clone()
    }

    /// The host directory of container `cid` in the host-only mount tree
    /// (the guest sees it, read-only, through the share).
    pub fn container_dir(&self, cid: &str) -> PathBuf {
        self.paths.host_mounts_dir().join(cid)
    }

    /// Resolves when the VM ended (poweroff, crash, kill) or the launcher or
    /// kata-virtiofsd died: whatever makes the pod unusable.
    pub async fn failed(&self) -> String {
        let Some(mut launcher) = self.launcher.clone() else {
            // a host-mode agent: the pod fails with the agent only
            return std::future::pending().await;
        };
        let vm = async move {
            match launcher.wait_vm(()).await {
                Ok(r) => {
                    let r = r.into_inner();
                    format!("the VM exited ({}, code {})", r.reason, r.exit_code)
                }
                Err(s) => format!("the launcher is gone ({})", s.message()),
            }
        };
        let fs = async {
            loop {
                {
                    let mut c = self.children.lock().await;
                    match c.virtiofsd.as_mut().map(|v| v.try_wait()) {
                        Some(Ok(Some(st))) => return format!("kata-virtiofsd exited ({st})"),
                        None => return std::future::pending().await,
                        _ => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            m = vm => m,
            m = fs => m,
        }
    }

    /// Serves the pod's management socket (metrics, the agent's address).
    pub async fn start_monitor(self: &Arc<Self>) {
        let path = self.paths.shim_monitor_socket();
        match crate::monitor::spawn(path.clone(), Arc::downgrade(self)) {
            Ok(h) => self.children.lock().await.monitor = Some(h),
            Err(e) => warn!("management socket {}: {e}", path.display()),
        }
        crate::monitor::settle();
    }

    /// The pod's host processes besides the shim, with their metric prefix.
    pub async fn process_pids(&self) -> Vec<(&'static str, u32)> {
        let mut out = vec![];
        if self.launcher.is_some() && self.hypervisor_pid != 0 {
            out.push(("kata_hypervisor", self.hypervisor_pid));
        }
        let c = self.children.lock().await;
        if let Some(id) = c.launcher.as_ref().and_then(|c| c.id()) {
            out.push(("kata_launcher", id));
        }
        if let Some(id) = c.virtiofsd.as_ref().and_then(|c| c.id()) {
            out.push(("kata_virtiofsd", id));
        }
        if let Some(id) = c.netmon.as_ref().and_then(|n| n.child.id()) {
            out.push(("kata_netmon", id));
        }
        if let Some(id) = c.forwarder.as_ref().and_then(|c| c.id()) {
            out.push(("kata_trace_forwarder", id));
        }
        out
    }

    /// Stops the VM at once (the pod failed).
    pub async fn stop_vm(&self) {
        let Some(mut l) = self.launcher.clone() else {
            return;
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            l.stop_vm(StopVmRequest { timeout_seconds: 1 }),
        )
        .await;
    }

    /// Stops the VM (through the agent if it answers) and every helper, and
    /// removes the sandbox directory, its mounts and cgroups.
    pub async fn destroy(&self) {
        let graceful = self
            .agent
            .with_deadline(Duration::from_secs(5))
            .destroy_sandbox(DestroySandboxRequest {})
            .await
            .is_ok();
        if graceful {
            if let Some(mut launcher) = self.launcher.clone() {
                let _ = tokio::time::timeout(Duration::from_secs(10), launcher.wait_vm(())).await;
            }
        }
        let mut c = self.children.lock().await;
        teardown_children(&self.paths, &mut c).await;
        info!("pod removed");
    }
}

async fn teardown_children(paths: &SandboxPaths, c: &mut Children) {
    if let Some(t) = c.monitor.take() {
        t.abort();
    }
    let _ = std::fs::remove_file(paths.shim_monitor_socket());
    if let Some(t) = c.net_follow.take() {
        t.abort();
    }
    c.net = None;
    if let Some(mut l) = c.launcher_client.take() {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            l.stop_vm(StopVmRequest { timeout_seconds: 2 }),
        )
        .await;
        let _ = tokio::time::timeout(Duration::from_secs(5), l.shutdown(())).await;
    }
    if let Some(mut child) = c.launcher.take() {
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            warn!("the launcher did not exit: killing it");
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
    // the launcher removes its own things; after a kill, what it left
    if let Err(e) = kata_vmm_launcher::client::cleanup(paths, LiveLauncher::Refuse) {
        warn!("launcher cleanup: {e}");
    }
    if let Some(child) = c.forwarder.take() {
        stop_forwarder(child).await;
    }
    if let Some(mut child) = c.virtiofsd.take() {
        // it exits by itself once QEMU disconnected
        if tokio::time::timeout(Duration::from_secs(3), child.wait())
            .await
            .is_err()
        {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
    let netmon_done = match c.netmon.take() {
        Some(nm) => match nm.shutdown(Duration::from_secs(5)).await {
            Ok(()) => true,
            Err(e) => {
                warn!("stopping kata-netmon: {e}");
                false
            }
        },
        None => false,
    };
    // after a kill (or a failed start), what netmon left in the netns
    let st = PodState::load(paths);
    if !netmon_done {
        if let Some(ns) = st.as_ref().and_then(|s| s.netns.as_ref()) {
            netmon_cleanup(&paths.dir, ns).await;
        }
    }
    if st.as_ref().is_some_and(|s| s.own_netns) {
        crate::network::remove_netns(&paths.pod_netns());
    }
    match c.cgroups.take() {
        Some(cg) => {
            let _ = tokio::task::spawn_blocking(move || {
                cg.lock().unwrap_or_else(|p| p.into_inner()).destroy()
            })
            .await;
        }
        // made or not: what was recorded
        None => {
            if let Some(r) = st.and_then(|s| s.cgroups) {
                let _ = tokio::task::spawn_blocking(move || crate::cgroups::cleanup(&r)).await;
            }
        }
    }
    remove_dir(paths);
}

/// Stops kata-trace-forwarder once the guest is gone: SIGTERM (it sends
/// the spans it holds), a kill after 3 s.
async fn stop_forwarder(mut child: Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(3), child.wait())
        .await
        .is_err()
    {
        warn!("kata-trace-forwarder did not exit: killing it");
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

/// Removes what a killed kata-netmon left in `netns`.
async fn netmon_cleanup(dir: &Path, netns: &Path) {
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match kata_proto::config::netmon_path() {
        Ok(bin) => {
            if let Err(e) = kata_netmon::client::cleanup(&bin, &id, netns).await {
                warn!("kata-netmon cleanup: {e}");
            }
        }
        Err(e) => warn!("kata-netmon cleanup: {e}"),
    }
}

fn remove_dir(paths: &SandboxPaths) {
    for dir in [paths.shared_dir(), paths.host_mounts_dir()] {
        if let Err(e) = mounts::unmount_and_remove(&dir) {
            warn!("{e:#}");
        }
    }
    let _ = std::fs::remove_file(PodState::file(paths));
    if paths.dir.exists() {
        if let Err(e) = mounts::unmount_and_remove(&paths.dir) {
            warn!("{e:#}");
        }
    }
}

/// Cleans a pod whose shim is dead: its launcher, hypervisor, kata-virtiofsd,
/// mounts, cgroups and directory.
pub async fn cleanup_dead(paths: &SandboxPaths) {
    // its launcher, if it outlived the shim, is killed first
    if let Err(e) = kata_vmm_launcher::client::cleanup(paths, LiveLauncher::Kill) {
        warn!("launcher cleanup: {e}");
    }
    if let Some(st) = PodState::load(paths) {
        kata_proto::process::kill_if_same(st.virtiofsd_pid, st.virtiofsd_start);
        // kata-netmon died with the shim (PDEATHSIG): its plumbing stays
        if let Some(ns) = &st.netns {
            netmon_cleanup(&paths.dir, ns).await;
        }
        if st.own_netns {
            crate::network::remove_netns(&paths.pod_netns());
        }
        if let Some(r) = st.cgroups {
            let _ = tokio::task::spawn_blocking(move || crate::cgroups::cleanup(&r)).await;
        }
    }
    remove_dir(paths);
}

/// Gives the agent the pod's policy (the annotation
/// `io.katacontainers.config.agent.policy`), first thing after it answers:
/// before CreateSandbox and any container, so the policy judges them all.
/// Without the annotation SetPolicy is not called (the guest's default
/// policy stays in force).
async fn set_policy(agent: &Agent, cfg: &Config) -> Result<(), PodError> {
    let Some(policy) = &cfg.agent.kata.policy else {
        return Ok(());
    };
    agent
        .set_policy(kata_proto::agent::SetPolicyRequest {
            policy: policy.clone(),
        })
        .await
        .map_err(|source| PodError::Agent {
            what: "SetPolicy with the pod's io.katacontainers.config.agent.policy",
            source,
        })?;
    info!(
        bytes = policy.len(),
        "agent policy of the pod's annotation in force"
    );
    Ok(())
}
