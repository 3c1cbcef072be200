//! The shim's process lifecycle (containerd's `start`, `delete` and serve).

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::DeleteResponse;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error, Flags, StartOpts};
use kata_proto::paths::SandboxPaths;
use tracing::{info, warn};

use crate::service::{Service, SANDBOX_FILE};
use crate::{mounts, pod, spec};

/// The runtime name containerd knows us by.
pub const RUNTIME: &str = "io.containerd.kata.v2";

/// One shim process.
pub struct KataShim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for KataShim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        KataShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // one shim per pod: containers of a pod share the pod's socket
        let grouping = oci_spec::runtime::Spec::load("config.json")
            .map(|s| spec::pod_id(&s, &opts.id))
            .unwrap_or_else(|_| opts.id.clone());
        let address = spawn(opts, &grouping, Vec::new()).await?;
        let _ = std::fs::write("address", &address);
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        // the shim serving this container is gone: clean what it left
        let sandbox = std::fs::read_to_string(SANDBOX_FILE).unwrap_or_default();
        let sandbox = sandbox.trim();
        if !sandbox.is_empty() && kata_proto::ids::SandboxId::new(sandbox).is_ok() {
            let paths = SandboxPaths::new(sandbox);
            if sandbox == self.id {
                info!(sandbox, "cleaning the pod of a dead shim");
                pod::cleanup_dead(&paths).await;
            } else if kata_proto::ids::ContainerId::new(self.id.as_str()).is_ok() {
                let dir = paths.host_mounts_dir().join(&self.id);
                if let Err(e) = mounts::unmount_and_remove(&dir) {
                    warn!("{e:#}");
                }
            }
        }
        let _ = std::fs::remove_file(SANDBOX_FILE);
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 128 + 9,
            exited_at: MessageField::some(containerd_shim::util::timestamp().unwrap_or_default()),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        Service::new(&self.namespace, publisher, self.exit.clone())
    }
}
