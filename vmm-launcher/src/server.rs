//! The launcher's gRPC service over its unix socket: each call is one step of
//! the VM's lifecycle (see launcher.proto), applied by [`Vm`].

use std::sync::Arc;
use std::time::Duration;

use kata_proto::launcher::launcher_server::Launcher;
use kata_proto::launcher::*;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::vm::Vm;
use crate::LauncherError;

/// The service.
pub(crate) struct LauncherService {
    /// The one VM.
    pub(crate) vm: Arc<Vm>,
    /// Notified by `Shutdown` once everything is removed.
    pub(crate) done: Arc<Notify>,
}

impl From<LauncherError> for Status {
    fn from(e: LauncherError) -> Status {
        let msg = e.to_string();
        match e {
            LauncherError::InvalidSpec(_)
            | LauncherError::Cgroup(crate::cgroup::CgroupError::BadPath(_)) => {
                Status::invalid_argument(msg)
            }
            LauncherError::State(_) => Status::failed_precondition(msg),
            LauncherError::Timeout(_) => Status::deadline_exceeded(msg),
            LauncherError::Jail(crate::jail::JailError::Open { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Status::not_found(msg)
            }
            _ => Status::internal(msg),
        }
    }
}

#[tonic::async_trait]
impl Launcher for LauncherService {
    async fn create_vm(
        &self,
        r: Request<CreateVmRequest>,
    ) -> Result<Response<CreateVmResponse>, Status> {
        let spec = r
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("CreateVm: spec is missing"))?;
        let (pid, uds, accel, hv_start) = self.vm.create(spec).await?;
        Ok(Response::new(CreateVmResponse {
            vsock_uds_path: uds.display().to_string(),
            hypervisor_pid: pid,
            accelerator: accel as i32,
            hypervisor_start_us: hv_start.as_micros() as u64,
        }))
    }

    async fn start_vm(
        &self,
        r: Request<StartVmRequest>,
    ) -> Result<Response<StartVmResponse>, Status> {
        let t = Duration::from_secs(u64::from(r.into_inner().agent_ready_timeout_seconds));
        let agent_ready_us = self.vm.start(t).await?;
        Ok(Response::new(StartVmResponse { agent_ready_us }))
    }

    async fn stop_vm(&self, r: Request<StopVmRequest>) -> Result<Response<VmExit>, Status> {
        let t = Duration::from_secs(u64::from(r.into_inner().timeout_seconds));
        Ok(Response::new(self.vm.stop(t).await?))
    }

    async fn pause_vm(&self, _r: Request<()>) -> Result<Response<()>, Status> {
        self.vm.set_paused(true).await?;
        Ok(Response::new(()))
    }

    async fn resume_vm(&self, _r: Request<()>) -> Result<Response<()>, Status> {
        self.vm.set_paused(false).await?;
        Ok(Response::new(()))
    }

    async fn wait_vm(&self, _r: Request<()>) -> Result<Response<VmExit>, Status> {
        Ok(Response::new(self.vm.wait().await?))
    }

    async fn vm_status(&self, _r: Request<()>) -> Result<Response<VmStatusResponse>, Status> {
        let (state, hypervisor_pid, vsock_uds_path, agent_ready) = self.vm.status().await;
        Ok(Response::new(VmStatusResponse {
            state,
            hypervisor_pid,
            vsock_uds_path,
            agent_ready,
        }))
    }

    async fn shutdown(&self, _r: Request<()>) -> Result<Response<()>, Status> {
        self.vm.teardown().await;
        self.done.notify_one();
        Ok(Response::new(()))
    }
}
