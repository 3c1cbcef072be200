//! The shim's one way to the guest agent. Every call carries a deadline (the
//! two event waits, WaitProcess and GetOOMEvent, excepted: they wait for
//! something to happen), so a guest that stops answering fails the call with
//! DeadlineExceeded instead of hanging containerd; errors keep the agent's
//! gRPC code all the way to containerd.

use std::time::Duration;

use kata_proto::agent as pb;
use kata_proto::agent::agent_service_client::AgentServiceClient;
use kata_proto::trace::{traced, Traced};
use tonic::transport::Channel;

use crate::error::{err, grpc_code, Code};

/// Why an agent call failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent answered with an error.
    #[error("guest agent: {}", .0.message())]
    Status(tonic::Status),
    /// No answer within the deadline.
    #[error("the guest agent did not answer {call} within {after:?}")]
    Timeout {
        /// The RPC.
        call: &'static str,
        /// The deadline.
        after: Duration,
    },
}

impl AgentError {
    /// The containerd (ttrpc) code.
    pub fn code(&self) -> Code {
        match self {
            AgentError::Status(s) => grpc_code(s.code()),
            AgentError::Timeout { .. } => Code::DEADLINE_EXCEEDED,
        }
    }
}

impl From<AgentError> for containerd_shim::protos::ttrpc::Error {
    fn from(e: AgentError) -> Self {
        err(e.code(), e.to_string())
    }
}

/// The agent client: cheap to clone, every call bounded by `deadline`.
#[derive(Clone, Debug)]
pub struct AgentClient {
    inner: AgentServiceClient<Traced>,
    deadline: Duration,
}

async fn bounded<T>(
    call: &'static str,
    deadline: Duration,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, AgentError> {
    match tokio::time::timeout(deadline, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(AgentError::Status(s)),
        Err(_) => Err(AgentError::Timeout {
            call,
            after: deadline,
        }),
    }
}

macro_rules! bounded_calls {
    ($($name:ident: $rpc:literal ($req:ty) -> $resp:ty;)*) => {
        impl AgentClient {
            $(
                #[doc = concat!("`", $rpc, "`, bounded by the client's deadline.")]
                pub async fn $name(&self, req: $req) -> Result<$resp, AgentError> {
                    let mut c = self.inner.clone();
                    bounded($rpc, self.deadline, c.$name(req)).await
                }
            )*
        }
    };
}

bounded_calls! {
    create_sandbox: "CreateSandbox" (pb::CreateSandboxRequest) -> ();
    set_policy: "SetPolicy" (pb::SetPolicyRequest) -> ();
    destroy_sandbox: "DestroySandbox" (pb::DestroySandboxRequest) -> ();
    create_container: "CreateContainer" (pb::CreateContainerRequest) -> ();
    start_container: "StartContainer" (pb::StartContainerRequest) -> ();
    remove_container: "RemoveContainer" (pb::RemoveContainerRequest) -> ();
    exec_process: "ExecProcess" (pb::ExecProcessRequest) -> ();
    signal_process: "SignalProcess" (pb::SignalProcessRequest) -> ();
    pause_container: "PauseContainer" (pb::PauseContainerRequest) -> ();
    resume_container: "ResumeContainer" (pb::ResumeContainerRequest) -> ();
    list_processes: "ListProcesses" (pb::ListProcessesRequest) -> pb::ListProcessesResponse;
    tty_win_resize: "TtyWinResize" (pb::TtyWinResizeRequest) -> ();
    close_stdin: "CloseStdin" (pb::CloseStdinRequest) -> ();
    update_container: "UpdateContainer" (pb::UpdateContainerRequest) -> ();
    stats_container: "StatsContainer" (pb::StatsContainerRequest) -> pb::StatsContainerResponse;
    get_metrics: "GetMetrics" (pb::GetMetricsRequest) -> pb::Metrics;
    update_interface: "UpdateInterface" (pb::UpdateInterfaceRequest) -> pb::Interface;
    update_routes: "UpdateRoutes" (pb::UpdateRoutesRequest) -> pb::Routes;
    add_arp_neighbors: "AddARPNeighbors" (pb::AddArpNeighborsRequest) -> ();
    online_cpu_mem: "OnlineCPUMem" (pb::OnlineCpuMemRequest) -> ();
    get_guest_details: "GetGuestDetails" (pb::GuestDetailsRequest) -> pb::GuestDetailsResponse;
}

impl AgentClient {
    /// A client over `channel` whose calls wait at most `deadline` (and
    /// carry the current span's traceparent).
    pub fn new(channel: Channel, deadline: Duration) -> Self {
        Self {
            inner: AgentServiceClient::new(traced(channel)),
            deadline,
        }
    }

    /// The same client with another deadline (e.g. a teardown's shorter one).
    pub fn with_deadline(&self, deadline: Duration) -> Self {
        Self {
            inner: self.inner.clone(),
            deadline,
        }
    }

    /// The deadline of each call.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// WaitProcess: waits, without a deadline, until the process exits.
    pub async fn wait_process(&self, req: pb::WaitProcessRequest) -> Result<i32, AgentError> {
        let mut c = self.inner.clone();
        c.wait_process(req)
            .await
            .map(|r| r.into_inner().status)
            .map_err(AgentError::Status)
    }

    /// GetOOMEvent: waits, without a deadline, for the next OOM kill.
    pub async fn get_oom_event(&self) -> Result<String, AgentError> {
        let mut c = self.inner.clone();
        c.get_oom_event(pb::GetOomEventRequest {})
            .await
            .map(|r| r.into_inner().container_id)
            .map_err(AgentError::Status)
    }
}
