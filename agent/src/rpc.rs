//! The agent's gRPC services: Kata's `Health` and `AgentService`.
//!
//! Implemented so far: the health check, `GetGuestDetails`, `DestroySandbox`.
//! Every other call of the declared surface answers `Unimplemented` with the
//! call's name, so a client never mistakes it for a failure of the guest.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kata_proto::agent::agent_service_server::AgentService;
use kata_proto::agent::health_check_response::ServingStatus;
use kata_proto::agent::health_server::Health;
use kata_proto::agent::*;
use tokio::sync::Notify;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::guest;

/// Storage handlers this agent knows (reported in `GetGuestDetails`).
const STORAGE_HANDLERS: &[&str] = &[];
/// kata-rs features (reported in `GetGuestDetails`).
const FEATURES: &[&str] = &["ready-announce"];

/// State shared by the services.
#[derive(Debug, Default)]
pub struct Agent {
    /// Notified when `DestroySandbox` asked the agent to end.
    pub shutdown: Notify,
    /// Whether the agent is PID 1 of a guest (else host mode).
    pub init: bool,
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

macro_rules! not_yet {
    ($( $name:ident ( $req:ty ) -> $resp:ty ;)*) => {
        $(
            // Written the way async_trait expands a method: the attribute does
            // not see inside macro output.
            fn $name<'life0, 'async_trait>(
                &'life0 self,
                _r: Request<$req>,
            ) -> Pin<Box<dyn Future<Output = Result<Response<$resp>, Status>> + Send + 'async_trait>>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                Box::pin(async {
                    Err(Status::unimplemented(concat!(
                        stringify!($name),
                        " is not implemented by this kata-agent yet"
                    )))
                })
            }
        )*
    };
}

#[tonic::async_trait]
impl AgentService for AgentRpc {
    type ProcessIoStream = Pin<Box<dyn Stream<Item = Result<ProcessIoDown, Status>> + Send>>;

    async fn process_io(
        &self,
        _r: Request<tonic::Streaming<ProcessIoUp>>,
    ) -> Result<Response<Self::ProcessIoStream>, Status> {
        Err(Status::unimplemented(
            "process_io is not implemented by this kata-agent yet",
        ))
    }

    async fn get_guest_details(
        &self,
        r: Request<GuestDetailsRequest>,
    ) -> Result<Response<GuestDetailsResponse>, Status> {
        let want_block_size = r.into_inner().mem_block_size;
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
                storage_handlers: STORAGE_HANDLERS.iter().map(|s| s.to_string()).collect(),
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

    async fn destroy_sandbox(&self, _r: Request<DestroySandboxRequest>) -> Empty {
        info!("DestroySandbox: the agent ends once this reply is sent");
        // The reply must reach the host before the guest goes away: the serve
        // loop waits for this notification, then finishes in-flight replies.
        self.0.shutdown.notify_one();
        Ok(Response::new(()))
    }

    not_yet! {
        create_container(CreateContainerRequest) -> ();
        start_container(StartContainerRequest) -> ();
        remove_container(RemoveContainerRequest) -> ();
        exec_process(ExecProcessRequest) -> ();
        signal_process(SignalProcessRequest) -> ();
        wait_process(WaitProcessRequest) -> WaitProcessResponse;
        update_container(UpdateContainerRequest) -> ();
        stats_container(StatsContainerRequest) -> StatsContainerResponse;
        pause_container(PauseContainerRequest) -> ();
        resume_container(ResumeContainerRequest) -> ();
        list_processes(ListProcessesRequest) -> ListProcessesResponse;
        write_stdin(WriteStreamRequest) -> WriteStreamResponse;
        read_stdout(ReadStreamRequest) -> ReadStreamResponse;
        read_stderr(ReadStreamRequest) -> ReadStreamResponse;
        close_stdin(CloseStdinRequest) -> ();
        tty_win_resize(TtyWinResizeRequest) -> ();
        update_interface(UpdateInterfaceRequest) -> Interface;
        update_routes(UpdateRoutesRequest) -> Routes;
        list_interfaces(ListInterfacesRequest) -> Interfaces;
        list_routes(ListRoutesRequest) -> Routes;
        add_arp_neighbors(AddArpNeighborsRequest) -> ();
        get_metrics(GetMetricsRequest) -> Metrics;
        get_oom_event(GetOomEventRequest) -> OomEvent;
        get_volume_stats(VolumeStatsRequest) -> VolumeStatsResponse;
        create_sandbox(CreateSandboxRequest) -> ();
        online_cpu_mem(OnlineCpuMemRequest) -> ();
        reseed_random_dev(ReseedRandomDevRequest) -> ();
        mem_hotplug_by_probe(MemHotplugByProbeRequest) -> ();
        set_guest_date_time(SetGuestDateTimeRequest) -> ();
        copy_file(CopyFileRequest) -> ();
        add_swap(AddSwapRequest) -> ();
        update_ephemeral_mounts(UpdateEphemeralMountsRequest) -> ();
        set_policy(SetPolicyRequest) -> ();
    }
}
