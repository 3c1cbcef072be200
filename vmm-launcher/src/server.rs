//! The launcher's gRPC service over its unix socket: each call is one step of
//! the VM's lifecycle (see launcher.proto), sent as a command to the VM's
//! owner task through [`Vm`]; a [`crate::LauncherError`] becomes its code in
//! `crate::error`.

use std::sync::Arc;
use std::time::Duration;

use kata_proto::launcher::launcher_server::Launcher;
use kata_proto::launcher::*;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::vm::Vm;

/// The service.
pub(crate) struct LauncherService {
    /// The one VM.
    pub(crate) vm: Vm,
    /// Notified by `Shutdown` once everything is removed.
    pub(crate) done: Arc<Notify>,
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
        let c = self.vm.create(spec).await?;
        Ok(Response::new(CreateVmResponse {
            vsock_uds_path: c.vsock_uds.display().to_string(),
            hypervisor_pid: c.pid,
            accelerator: c.accel as i32,
            hypervisor_start_us: c.hypervisor_start.as_micros() as u64,
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
        self.vm.pause().await?;
        Ok(Response::new(()))
    }

    async fn resume_vm(&self, _r: Request<()>) -> Result<Response<()>, Status> {
        self.vm.resume().await?;
        Ok(Response::new(()))
    }

    async fn wait_vm(&self, _r: Request<()>) -> Result<Response<VmExit>, Status> {
        Ok(Response::new(self.vm.wait().await?))
    }

    async fn vm_status(&self, _r: Request<()>) -> Result<Response<VmStatusResponse>, Status> {
        Ok(Response::new(self.vm.status().await?))
    }

    async fn add_nic(&self, r: Request<NetDevice>) -> Result<Response<()>, Status> {
        self.vm.add_nic(r.into_inner()).await?;
        Ok(Response::new(()))
    }

    async fn remove_nic(&self, r: Request<NetDevice>) -> Result<Response<()>, Status> {
        self.vm.remove_nic(r.into_inner().tap).await?;
        Ok(Response::new(()))
    }

    async fn resize_vm(
        &self,
        r: Request<ResizeVmRequest>,
    ) -> Result<Response<ResizeVmResponse>, Status> {
        Ok(Response::new(self.vm.resize(r.into_inner()).await?))
    }

    async fn shutdown(&self, _r: Request<()>) -> Result<Response<()>, Status> {
        self.vm.teardown().await;
        self.done.notify_one();
        Ok(Response::new(()))
    }
}

#[cfg(test)]
mod tests {
    use kata_proto::paths::SandboxPaths;

    use super::*;

    fn service(dir: &std::path::Path) -> LauncherService {
        LauncherService {
            vm: Vm::spawn("rejects", SandboxPaths::in_dir(dir)),
            done: Arc::new(Notify::new()),
        }
    }

    /// A spec the launcher refuses reaches the caller as InvalidArgument
    /// naming the field; a call out of order as FailedPrecondition.
    #[tokio::test]
    async fn rejections_keep_their_code() {
        let d = tempfile::tempdir().unwrap();
        let svc = service(d.path());
        let spec = VmSpec {
            kernel_path: "/k".into(),
            initrd_path: "/i".into(),
            memory_mib: 1 << 40,
            ..Default::default()
        };
        let s = svc
            .create_vm(Request::new(CreateVmRequest { spec: Some(spec) }))
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains("memory_mib"), "{s:?}");
        let s = svc
            .create_vm(Request::new(CreateVmRequest { spec: None }))
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        for s in [
            svc.start_vm(Request::new(StartVmRequest::default()))
                .await
                .unwrap_err(),
            svc.pause_vm(Request::new(())).await.unwrap_err(),
            svc.wait_vm(Request::new(())).await.unwrap_err(),
        ] {
            assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
            assert!(s.message().contains("CreateVm first"), "{s:?}");
        }
        let st = svc.vm_status(Request::new(())).await.unwrap().into_inner();
        assert_eq!(st.state, "none");
        svc.shutdown(Request::new(())).await.unwrap();
    }
}
