//! The pod's network: kata-netmon in the pod's network namespace plumbs its
//! interfaces (before CreateVm, which gets their taps as NICs), the guest is
//! told what to configure once the agent is up (Kata's order: interfaces,
//! permanent neighbours, routes), and later changes in the netns are
//! forwarded while the pod lives.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kata_netmon::client::NetmonProcess;
use kata_netmon::Model;
use kata_proto::agent as pb;
use kata_proto::config::{Config, InterworkingModel};
use kata_proto::launcher::launcher_client::LauncherClient;
use kata_proto::launcher::NetDevice;
use kata_proto::netmon::netmon_client::NetmonClient;
use kata_proto::netmon::{Endpoint, Network};
use kata_proto::paths::SandboxPaths;
use kata_proto::trace::Traced;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use tokio::sync::Mutex;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::agent::{AgentClient, AgentError};

/// How long kata-netmon may take to plumb the pod and serve.
const NETMON_START: Duration = Duration::from_secs(10);

/// Where the pod's network namespace comes from, as the sandbox's spec says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsChoice {
    /// No network namespace in the spec: the host's network. kata-rs does
    /// not plumb the host's interfaces into a VM: the pod has no network.
    Host,
    /// A path (containerd's CRI plugin or `ctr run --with-ns` made it, and
    /// the CNI plugins filled it).
    Given(PathBuf),
    /// A network namespace without a path: a new one, which the shim makes
    /// (unless `disable_new_netns`); `ctr run --cni` runs the CNI plugins
    /// in it after Create, through the task's pid (QEMU lives there).
    New,
}

/// The pod's network namespace, as the sandbox's spec names it.
pub fn netns_of(spec: &Spec) -> NetnsChoice {
    let ns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| ns.iter().find(|n| n.typ() == LinuxNamespaceType::Network));
    match ns {
        None => NetnsChoice::Host,
        Some(n) => match n.path() {
            Some(p) if !p.as_os_str().is_empty() => NetnsChoice::Given(p.clone()),
            _ => NetnsChoice::New,
        },
    }
}

/// Makes a new network namespace, bound to `at` (a file, created) so it
/// outlives the thread that made it; only `lo`, down.
pub fn create_netns(at: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(at)?;
    let at2 = at.to_path_buf();
    let r = std::thread::spawn(move || -> std::io::Result<()> {
        // this thread alone moves into the new namespace, then ends
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &at2,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("the netns thread panicked")));
    if r.is_err() {
        let _ = std::fs::remove_file(at);
    }
    r
}

/// Removes a network namespace [`create_netns`] made (it ends once nothing
/// else holds it: QEMU and kata-netmon are gone by then).
pub fn remove_netns(at: &Path) {
    match nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => warn!("unmounting the pod's netns {}: {e}", at.display()),
    }
    match std::fs::remove_file(at) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("removing {}: {e}", at.display()),
    }
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
        InterworkingModel::Macvtap => Model::Macvtap,
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
    n.endpoints.iter().filter_map(net_devices_of).collect()
}

/// Whether `n` gives a freshly booted guest nothing to set: no interface,
/// neighbour or route (a pod netns with only `lo`, as `ctr run` without
/// CNI makes). Such a guest is already that network, so the pod's start
/// skips [`configure`]'s round trips.
pub fn nothing_to_apply(n: &Network) -> bool {
    n.endpoints.iter().all(|e| e.interface.is_none())
        && n.neighbors.is_empty()
        && n.routes.is_empty()
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

/// Keeps the guest's network what kata-netmon reports: NICs hot-plugged
/// for new interfaces and unplugged for vanished ones (through the
/// launcher), then the interfaces, neighbours and routes told to the agent.
/// One change at a time: the follower and a Start's sync share the lock.
pub struct NetSync {
    netmon: NetmonClient<Channel>,
    launcher: LauncherClient<Traced>,
    agent: AgentClient,
    applied: Mutex<Applied>,
}

/// What the guest has.
#[derive(Default)]
struct Applied {
    /// The generation of netmon's network it has.
    generation: u64,
    /// The host devices it has NICs of.
    nics: BTreeSet<String>,
}

impl NetSync {
    /// The guest has `initial` (its NICs were plugged at creation and
    /// [`configure`] ran).
    pub fn new(
        netmon: NetmonClient<Channel>,
        launcher: LauncherClient<Traced>,
        agent: AgentClient,
        initial: &Network,
    ) -> NetSync {
        NetSync {
            netmon,
            launcher,
            agent,
            applied: Mutex::new(Applied {
                generation: initial.generation,
                nics: initial
                    .endpoints
                    .iter()
                    .map(|e| e.host_device.clone())
                    .collect(),
            }),
        }
    }

    /// Brings the guest to the netns as it is now (netmon reads it again):
    /// a Start calls it, so what a CNI plugin did after Create is in the
    /// guest before the container runs.
    pub async fn sync(&self) -> Result<(), NetError> {
        let n = self
            .netmon
            .clone()
            .get_network(())
            .await
            .map_err(kata_netmon::client::ClientError::Call)?
            .into_inner();
        self.apply(n).await
    }

    /// Brings the guest to `n`, unless it has it (or a later one) already.
    pub async fn apply(&self, n: Network) -> Result<(), NetError> {
        let mut a = self.applied.lock().await;
        if n.generation <= a.generation {
            return Ok(());
        }
        let mut launcher = self.launcher.clone();
        let now: BTreeMap<&str, &Endpoint> = n
            .endpoints
            .iter()
            .map(|e| (e.host_device.as_str(), e))
            .collect();
        let gone: Vec<String> = a
            .nics
            .iter()
            .filter(|d| !now.contains_key(d.as_str()))
            .cloned()
            .collect();
        for dev in gone {
            // the interface vanished from the netns: its NIC goes too
            a.nics.remove(&dev);
            match launcher
                .remove_nic(NetDevice {
                    tap: dev.clone(),
                    ..Default::default()
                })
                .await
            {
                Ok(_) => info!(device = %dev, "NIC unplugged"),
                Err(s) => warn!(device = %dev, "unplugging the NIC: {}", s.message()),
            }
        }
        for (dev, e) in &now {
            if a.nics.contains(*dev) {
                continue;
            }
            let Some(d) = net_devices_of(e) else { continue };
            match launcher.add_nic(d).await {
                Ok(_) => {
                    info!(device = %dev, "NIC hot-plugged");
                    a.nics.insert(dev.to_string());
                }
                // the rest of the network still goes to the guest
                Err(s) => warn!(device = %dev, "hot-plugging a NIC: {}", s.message()),
            }
        }
        // the guest gets what it has NICs for; routes through an interface
        // it lacks would be refused
        let mut have = n.clone();
        have.endpoints.retain(|e| a.nics.contains(&e.host_device));
        let names: Vec<String> = have
            .endpoints
            .iter()
            .filter_map(|e| e.interface.as_ref().map(|i| i.name.clone()))
            .collect();
        have.routes.retain(|r| names.contains(&r.device));
        have.neighbors.retain(|x| names.contains(&x.device));
        configure(&self.agent, &have).await?;
        a.generation = n.generation;
        info!(
            generation = n.generation,
            interfaces = have.endpoints.len(),
            "guest network updated"
        );
        Ok(())
    }

    /// Applies every change kata-netmon reports until its stream ends
    /// (netmon stopped).
    pub async fn follow(self: Arc<Self>) {
        let Ok(stream) = self.netmon.clone().watch_network(()).await else {
            warn!("kata-netmon does not stream changes: the guest's network stays as it is");
            return;
        };
        let mut stream = stream.into_inner();
        while let Ok(Some(n)) = stream.message().await {
            if let Err(e) = self.apply(n).await {
                kata_proto::warn_limited!("updating the guest's network: {e}");
            }
        }
        // (the teardown aborts this task before it stops netmon: an end here
        // is netmon's death; the plumbing stays in the kernel and traffic flows)
        warn!("kata-netmon is gone: the guest's network keeps working but no longer follows the pod's netns");
    }
}

fn net_devices_of(e: &Endpoint) -> Option<NetDevice> {
    Some(NetDevice {
        tap: e.host_device.clone(),
        mac: e.interface.as_ref()?.hw_addr.clone(),
        macvtap_dev: e.macvtap_dev.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lo_is_nothing_to_apply_and_a_route_is_something() {
        let mut n = Network {
            endpoints: vec![Endpoint::default()],
            ..Default::default()
        };
        assert!(nothing_to_apply(&n));
        n.routes.push(pb::Route::default());
        assert!(!nothing_to_apply(&n));
        let n = Network {
            endpoints: vec![Endpoint {
                interface: Some(pb::Interface::default()),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(!nothing_to_apply(&n));
    }
}
