//! The pod's network: kata-netmon in the pod's network namespace plumbs its
//! interfaces (before CreateVm, which gets their taps as NICs), the guest is
//! told what to configure once the agent is up (Kata's order: interfaces,
//! permanent neighbours, routes), and later changes in the netns are
//! forwarded while the pod lives.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_netmon::client::NetmonProcess;
use kata_netmon::Model;
use kata_proto::agent as pb;
use kata_proto::config::{Config, InterworkingModel};
use kata_proto::launcher::NetDevice;
use kata_proto::netmon::Network;
use kata_proto::paths::SandboxPaths;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use tracing::{info, warn};

use crate::agent::{AgentClient, AgentError};

/// How long kata-netmon may take to plumb the pod and serve.
const NETMON_START: Duration = Duration::from_secs(10);

/// The pod's network namespace, as the sandbox's spec names it (containerd
/// and the CNI plugins made it); `None`: the pod has no network of its own.
pub fn netns_of(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)
        .and_then(|n| n.path().clone())
        .filter(|p| !p.as_os_str().is_empty())
}

/// Why the pod's network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The configuration asks for what is not there.
    #[error("{0}")]
    Config(String),
    /// kata-netmon failed.
    #[error("{0}")]
    Netmon(#[from] kata_netmon::client::ClientError),
    /// The guest refused the configuration.
    #[error("{what}: {source}")]
    Agent {
        /// The step.
        what: String,
        /// Why.
        source: AgentError,
    },
}

/// A running kata-netmon and what it reported first.
pub struct PodNetwork {
    /// The process.
    pub netmon: NetmonProcess,
    /// The network at start.
    pub initial: Network,
}

/// Starts kata-netmon for the pod if it has a netns and the configuration
/// plumbs one; `Ok(None)`: no network for this pod.
pub async fn start(
    cfg: &Config,
    id: &str,
    paths: &SandboxPaths,
    netns: Option<&Path>,
) -> Result<Option<PodNetwork>, NetError> {
    let Some(netns) = netns else {
        return Ok(None);
    };
    let model = match cfg.runtime.internetworking_model {
        InterworkingModel::None => return Ok(None),
        InterworkingModel::TcFilter => Model::Tcfilter,
        InterworkingModel::Macvtap => {
            return Err(NetError::Config(
                "runtime.internetworking_model = \"macvtap\": kata-netmon plumbs it, but the \
                 launcher cannot hand a macvtap to QEMU yet; use \"tcfilter\" (the default) or \"none\""
                    .into(),
            ))
        }
    };
    if !netns.exists() {
        return Err(NetError::Config(format!(
            "the pod's network namespace {} does not exist",
            netns.display()
        )));
    }
    let bin = kata_proto::config::netmon_path().map_err(|e| NetError::Config(e.to_string()))?;
    let mut netmon =
        NetmonProcess::spawn(&bin, id, netns, &paths.netmon_socket(), model, NETMON_START).await?;
    let initial = netmon
        .client
        .get_network(())
        .await
        .map_err(kata_netmon::client::ClientError::Call)?
        .into_inner();
    info!(
        netns = %netns.display(),
        interfaces = initial.endpoints.len(),
        model = model.name(),
        "pod network plumbed"
    );
    Ok(Some(PodNetwork { netmon, initial }))
}

/// The NICs of the VM: one per plumbed interface, with its MAC.
pub fn net_devices(n: &Network) -> Vec<NetDevice> {
    n.endpoints
        .iter()
        .filter_map(|e| {
            Some(NetDevice {
                tap: e.host_device.clone(),
                mac: e.interface.as_ref()?.hw_addr.clone(),
            })
        })
        .collect()
}

/// Tells the guest the network `n`: the interfaces (found by MAC), the
/// permanent neighbours, the routes.
pub async fn configure(agent: &AgentClient, n: &Network) -> Result<(), NetError> {
    let fail = |what: String| move |source| NetError::Agent { what, source };
    for e in &n.endpoints {
        let Some(i) = &e.interface else { continue };
        agent
            .update_interface(pb::UpdateInterfaceRequest {
                interface: Some(i.clone()),
            })
            .await
            .map_err(fail(format!(
                "configuring {} ({}) in the guest",
                i.name, i.hw_addr
            )))?;
    }
    if !n.neighbors.is_empty() {
        agent
            .add_arp_neighbors(pb::AddArpNeighborsRequest {
                neighbors: Some(pb::ArpNeighbors {
                    arp_neighbors: n.neighbors.clone(),
                }),
            })
            .await
            .map_err(fail("adding the permanent neighbours in the guest".into()))?;
    }
    agent
        .update_routes(pb::UpdateRoutesRequest {
            routes: Some(pb::Routes {
                routes: n.routes.clone(),
            }),
        })
        .await
        .map_err(fail("setting the routes in the guest".into()))?;
    Ok(())
}

/// Forwards the changes kata-netmon reports after `initial` to the guest,
/// until the stream ends (netmon stopped). Interfaces that were not there at
/// start would need a NIC hot-plugged: they are reported, not configured.
pub async fn follow(
    mut client: kata_proto::netmon::netmon_client::NetmonClient<tonic::transport::Channel>,
    agent: AgentClient,
    initial: Network,
) {
    let Ok(stream) = client.watch_network(()).await else {
        warn!("kata-netmon does not stream changes: the guest's network stays as at start");
        return;
    };
    let mut stream = stream.into_inner();
    let start_macs: Vec<String> = initial
        .endpoints
        .iter()
        .filter_map(|e| e.interface.as_ref().map(|i| i.hw_addr.clone()))
        .collect();
    let mut seen = initial.generation;
    while let Ok(Some(mut n)) = stream.message().await {
        if n.generation <= seen {
            continue;
        }
        seen = n.generation;
        let (known, new): (Vec<_>, Vec<_>) = n.endpoints.drain(..).partition(|e| {
            e.interface
                .as_ref()
                .is_some_and(|i| start_macs.contains(&i.hw_addr))
        });
        for e in &new {
            kata_proto::warn_limited!(
                device = %e.host_device,
                "a new interface in the pod's netns: NIC hot-plug is not supported yet, the guest does not get it"
            );
        }
        n.endpoints = known;
        // routes through an interface the guest lacks would be refused
        let names: Vec<String> = n
            .endpoints
            .iter()
            .filter_map(|e| e.interface.as_ref().map(|i| i.name.clone()))
            .collect();
        n.routes.retain(|r| names.contains(&r.device));
        n.neighbors.retain(|a| names.contains(&a.device));
        match configure(&agent, &n).await {
            Ok(()) => info!(generation = n.generation, "guest network updated"),
            Err(e) => warn!("updating the guest's network: {e}"),
        }
    }
    // (the teardown aborts this task before it stops netmon: an end here is
    // netmon's death; the plumbing stays in the kernel and traffic flows)
    warn!("kata-netmon is gone: the guest's network keeps working but no longer follows the pod's netns");
}
