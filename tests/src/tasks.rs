//! containerd's Tasks API, for what `ctr` 1.6 cannot do: `Update` (a
//! running task's resources, as the kubelet's UpdateContainerResources
//! reaches the runtime). The one message is declared here with prost's
//! derive; the call goes over containerd's gRPC socket like ctr's.

use std::path::Path;
use std::time::Duration;

use kata_proto::dialer::Address;

/// `containerd.services.tasks.v1.UpdateTaskRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateTaskRequest {
    /// The container.
    #[prost(string, tag = "1")]
    pub container_id: String,
    /// The new resources: OCI LinuxResources as JSON, typed by URL.
    #[prost(message, optional, tag = "2")]
    pub resources: Option<prost_types::Any>,
}

/// containerd's type URL of OCI LinuxResources.
pub const LINUX_RESOURCES_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

/// Calls Tasks.Update on the containerd at `socket`, in namespace `ns`,
/// with `resources` (OCI LinuxResources JSON). Returns the gRPC error, if
/// any, as text with its code.
pub fn update(
    socket: &Path,
    ns: &str,
    container: &str,
    resources: &serde_json::Value,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        let ch = kata_proto::dialer::channel(
            &Address::Unix(socket.to_path_buf()),
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| format!("connecting to containerd: {e}"))?;
        let mut grpc = tonic::client::Grpc::new(ch);
        grpc.ready().await.map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(UpdateTaskRequest {
            container_id: container.into(),
            resources: Some(prost_types::Any {
                type_url: LINUX_RESOURCES_URL.into(),
                value: resources.to_string().into_bytes(),
            }),
        });
        req.metadata_mut().insert(
            "containerd-namespace",
            ns.parse().map_err(|_| "a bad namespace".to_string())?,
        );
        req.set_timeout(Duration::from_secs(120));
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/containerd.services.tasks.v1.Tasks/Update",
        );
        let codec = tonic_prost::ProstCodec::<UpdateTaskRequest, ()>::default();
        grpc.unary(req, path, codec)
            .await
            .map(|_| ())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    })
}
