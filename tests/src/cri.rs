//! A blocking client of the Kubernetes CRI (`runtime.v1`), to drive
//! containerd's CRI plugin over its unix socket as the kubelet does.
//!
//! The API is the subset in `tests/protos/cri.proto` (wire-compatible with
//! cri-api v0.25, what containerd 1.6 serves). Every call blocks on the
//! client's own one-thread runtime, so plain `#[test]` functions use it.
//!
//! ```no_run
//! use kata_tests::cri::{api, container_config, pod_config, Cri};
//! # let (socket, logs) = (std::path::Path::new("/run/containerd.sock"), std::path::Path::new("/tmp/logs"));
//! let mut cri = Cri::connect(socket);
//! cri.wait_ready(std::time::Duration::from_secs(30));
//! let config = pod_config("web", "0f9d5c1e-0000-4000-8000-000000000001", logs);
//! let pod = cri
//!     .run_pod_sandbox(api::RunPodSandboxRequest {
//!         config: Some(config.clone()),
//!         runtime_handler: "kata".into(),
//!     })
//!     .unwrap()
//!     .pod_sandbox_id;
//! let id = cri
//!     .create_container(api::CreateContainerRequest {
//!         pod_sandbox_id: pod,
//!         config: Some(container_config("app", &["sleep", "inf"])),
//!         sandbox_config: Some(config),
//!     })
//!     .unwrap()
//!     .container_id;
//! ```

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use kata_proto::dialer::{self, Address};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use api::image_service_client::ImageServiceClient;
use api::runtime_service_client::RuntimeServiceClient;

/// The CRI messages and clients (tests/protos/cri.proto, package `runtime.v1`).
#[allow(clippy::all, missing_docs, clippy::undocumented_unsafe_blocks)]
pub mod api {
    tonic::include_proto!("runtime.v1");
}

/// How long [`Cri::connect`] tries to reach the socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The default per-call timeout: RunPodSandbox boots a VM, under TCG on CI.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// A connection to a CRI endpoint (RuntimeService and ImageService).
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    image: ImageServiceClient<Channel>,
    timeout: Duration,
}

/// Runs one call on `rt`, with `timeout` sent as the gRPC deadline and
/// enforced here too (a call that gets no answer is `DeadlineExceeded`).
fn block<T>(
    rt: &tokio::runtime::Runtime,
    timeout: Duration,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<T, Status> {
    rt.block_on(async {
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r.map(Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {timeout:?}"
            ))),
        }
    })
}

/// A request carrying `timeout` as its gRPC deadline.
fn request<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// One blocking method per RPC of the client field `$client`.
macro_rules! rpcs {
    ($client:ident: $($(#[$doc:meta])* $name:ident($req:ident) -> $resp:ident;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(&mut self, req: api::$req) -> Result<api::$resp, Status> {
                let Cri { rt, $client: client, timeout, .. } = self;
                block(rt, *timeout, client.$name(request(req, *timeout)))
            }
        )*
    };
}

impl Cri {
    /// Connects to the CRI endpoint at the unix socket `socket` (containerd's
    /// own socket: CRI is one of its services). Panics if it cannot.
    pub fn connect(socket: &Path) -> Cri {
        Cri::try_connect(socket).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Cri::connect`] that returns why it could not connect.
    pub fn try_connect(socket: &Path) -> Result<Cri, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("a tokio runtime: {e}"))?;
        let channel = rt
            .block_on(dialer::channel(
                &Address::Unix(socket.to_path_buf()),
                CONNECT_TIMEOUT,
            ))
            .map_err(|e| format!("connecting to CRI at {}: {e}", socket.display()))?;
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            image: ImageServiceClient::new(channel),
            rt,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Sets the timeout of each later call (default 300 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Polls Status until the runtime reports the RuntimeReady condition true
    /// (NetworkReady may still be false). Panics with the last answer or
    /// error if it does not within `timeout`.
    pub fn wait_ready(&mut self, timeout: Duration) {
        self.poll("CRI was not ready", timeout, |cri, left| {
            let Cri { rt, runtime, .. } = cri;
            let req = request(api::StatusRequest { verbose: false }, left);
            match block(rt, left, runtime.status(req)) {
                Ok(r) => {
                    let conditions = r.status.map(|s| s.conditions).unwrap_or_default();
                    let ready = conditions
                        .iter()
                        .any(|c| c.r#type == "RuntimeReady" && c.status);
                    (!ready).then(|| format!("not ready: {conditions:?}"))
                }
                Err(e) => Some(format!("Status: {e}")),
            }
        });
    }

    /// Polls ImageStatus until the runtime has the image `name` (CRI learns
    /// of an image imported with ctr from an event, a moment later). Panics
    /// with the last answer or error if it does not within `timeout`.
    pub fn wait_image(&mut self, name: &str, timeout: Duration) {
        let what = format!("CRI did not have the image {name}");
        self.poll(&what, timeout, |cri, left| {
            let Cri { rt, image, .. } = cri;
            let spec = api::ImageSpec {
                image: name.into(),
                ..Default::default()
            };
            let req = api::ImageStatusRequest {
                image: Some(spec),
                verbose: false,
            };
            match block(rt, left, image.image_status(request(req, left))) {
                Ok(r) if r.image.is_some() => None,
                Ok(_) => Some("not there".into()),
                Err(e) => Some(format!("ImageStatus: {e}")),
            }
        });
    }

    /// Calls `attempt` (given the time left for one call) every 200 ms until
    /// it returns `None`; panics with `what` and its last answer after
    /// `timeout`.
    fn poll(
        &mut self,
        what: &str,
        timeout: Duration,
        mut attempt: impl FnMut(&mut Cri, Duration) -> Option<String>,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1))
                .min(self.timeout);
            let Some(last) = attempt(self, left) else {
                return;
            };
            assert!(
                Instant::now() < deadline,
                "{what} within {timeout:?}: {last}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    rpcs! { runtime:
        /// Version: the runtime's name and version, and the CRI version.
        version(VersionRequest) -> VersionResponse;
        /// RunPodSandbox: creates and starts a pod (for kata, boots its VM).
        run_pod_sandbox(RunPodSandboxRequest) -> RunPodSandboxResponse;
        /// StopPodSandbox: stops a pod's containers and sandbox, frees its network.
        stop_pod_sandbox(StopPodSandboxRequest) -> StopPodSandboxResponse;
        /// RemovePodSandbox: removes a pod and its containers.
        remove_pod_sandbox(RemovePodSandboxRequest) -> RemovePodSandboxResponse;
        /// PodSandboxStatus: a pod's state and IP.
        pod_sandbox_status(PodSandboxStatusRequest) -> PodSandboxStatusResponse;
        /// ListPodSandbox: the pods matching a filter.
        list_pod_sandbox(ListPodSandboxRequest) -> ListPodSandboxResponse;
        /// CreateContainer: creates a container in a pod.
        create_container(CreateContainerRequest) -> CreateContainerResponse;
        /// StartContainer: starts a created container.
        start_container(StartContainerRequest) -> StartContainerResponse;
        /// StopContainer: stops a container (SIGTERM, SIGKILL after the grace period).
        stop_container(StopContainerRequest) -> StopContainerResponse;
        /// RemoveContainer: removes a container.
        remove_container(RemoveContainerRequest) -> RemoveContainerResponse;
        /// ListContainers: the containers matching a filter.
        list_containers(ListContainersRequest) -> ListContainersResponse;
        /// ContainerStatus: a container's state, times and exit code.
        container_status(ContainerStatusRequest) -> ContainerStatusResponse;
        /// UpdateContainerResources: changes a running container's resources.
        update_container_resources(UpdateContainerResourcesRequest) -> UpdateContainerResourcesResponse;
        /// ExecSync: runs a command in a container, returns its output and exit code.
        exec_sync(ExecSyncRequest) -> ExecSyncResponse;
        /// ContainerStats: a container's CPU, memory and disk usage.
        container_stats(ContainerStatsRequest) -> ContainerStatsResponse;
        /// ListContainerStats: the usage of the containers matching a filter.
        list_container_stats(ListContainerStatsRequest) -> ListContainerStatsResponse;
        /// Status: the runtime's conditions (RuntimeReady, NetworkReady).
        status(StatusRequest) -> StatusResponse;
    }

    rpcs! { image:
        /// ImageStatus: an image, or none if the runtime does not have it.
        image_status(ImageStatusRequest) -> ImageStatusResponse;
        /// ListImages: the images matching a filter.
        list_images(ListImagesRequest) -> ListImagesResponse;
    }
}

impl Cri {
    /// RunPodSandbox of `config` with runtime handler `handler`: the pod's id.
    pub fn run_pod(
        &mut self,
        config: api::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, Status> {
        self.run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: handler.into(),
        })
        .map(|r| r.pod_sandbox_id)
    }

    /// CreateContainer and StartContainer of `config` in pod `pod` (made
    /// from `pod_config`), as the kubelet starts a container: its id, or
    /// which call failed and why.
    pub fn create_and_start(
        &mut self,
        pod: &str,
        pod_config: &api::PodSandboxConfig,
        config: api::ContainerConfig,
    ) -> Result<String, String> {
        let id = self
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .map_err(|e| format!("CreateContainer: {e}"))?
            .container_id;
        self.start_container(api::StartContainerRequest {
            container_id: id.clone(),
        })
        .map_err(|e| format!("StartContainer: {e}"))?;
        Ok(id)
    }

    /// StopPodSandbox, then RemovePodSandbox whatever the stop answered (a
    /// removal stops what still runs), as the kubelet ends a pod: the first
    /// call that failed and why.
    pub fn stop_and_remove_pod(&mut self, pod: &str) -> Result<(), String> {
        let stopped = self
            .stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .map_err(|e| format!("StopPodSandbox {pod}: {e}"));
        let removed = self
            .remove_pod_sandbox(api::RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .map_err(|e| format!("RemovePodSandbox {pod}: {e}"));
        stopped.and(removed.map(|_| ()))
    }
}

/// Namespaces as the kubelet asks for them by default: the pod's network and
/// IPC, a PID namespace per container.
fn kubelet_namespaces() -> api::NamespaceOption {
    api::NamespaceOption {
        network: api::NamespaceMode::Pod as i32,
        pid: api::NamespaceMode::Container as i32,
        ipc: api::NamespaceMode::Pod as i32,
        target_id: String::new(),
    }
}

/// A pod's config as the kubelet sends it for a plain pod: name `name` in
/// namespace `default`, uid `uid`, hostname `name`, container logs under
/// `log_dir`.
pub fn pod_config(name: &str, uid: &str, log_dir: &Path) -> api::PodSandboxConfig {
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.display().to_string(),
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(kubelet_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container's config: name `name`, the busybox image
/// ([`crate::containerd::BUSYBOX_IMAGE`]), running `command`.
pub fn container_config(name: &str, command: &[&str]) -> api::ContainerConfig {
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(api::ImageSpec {
            image: crate::containerd::BUSYBOX_IMAGE.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        linux: Some(api::LinuxContainerConfig {
            security_context: Some(api::LinuxContainerSecurityContext {
                namespace_options: Some(kubelet_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
