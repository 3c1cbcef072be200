//! kata-netmon: one per pod, in the pod's network namespace. It plumbs each
//! pod interface to a device QEMU opens (src/plumb.rs), reports the network
//! the guest must configure (src/scan.rs) over its gRPC API
//! (proto/protos/netmon.proto) and follows every netlink change of the netns
//! until the shim asks it to stop; then it removes what it made.

pub mod client;
pub mod plumb;
pub mod scan;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kata_proto::netmon::netmon_server::{Netmon, NetmonServer};
use kata_proto::netmon::{Endpoint, Network};
use rtnetlink::{new_connection, new_multicast_connection, Handle, MulticastGroup};
use tokio::sync::{watch, Mutex, Notify};
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

pub use plumb::Model;
use plumb::Plumbed;
use scan::Snapshot;

/// How long netmon waits for a burst of netlink events to end before it
/// reads the netns again (CNI plugins change several things at once).
const SETTLE: Duration = Duration::from_millis(100);

/// Why netmon failed.
#[derive(Debug, thiserror::Error)]
pub enum NetmonError {
    /// A netlink request failed.
    #[error("netlink: {0}: {1}")]
    Netlink(&'static str, rtnetlink::Error),
    /// Building the plumbing failed.
    #[error("{0}: {1}")]
    Plumb(String, rtnetlink::Error),
    /// Creating a tap failed.
    #[error("creating the tap {0}: {1}")]
    Tap(String, std::io::Error),
    /// A link netmon made vanished at once.
    #[error("the link {0} does not exist")]
    Missing(String),
    /// The arguments do not fit together.
    #[error("{0}")]
    Config(String),
    /// A host operation failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// The monitor: what is plumbed, and the network as last reported.
struct Monitor {
    handle: Handle,
    model: Model,
    plumbed: BTreeMap<u32, Plumbed>,
    next_device: u32,
    generation: u64,
    tx: watch::Sender<Network>,
    /// Torn down: nothing is plumbed any more.
    stopped: bool,
}

impl Monitor {
    /// Reads the netns, plumbs new interfaces, unplumbs vanished ones, and
    /// publishes the network if it changed.
    async fn refresh(&mut self) -> Result<(), NetmonError> {
        if self.stopped {
            return Ok(());
        }
        let snap = Snapshot::read(&self.handle).await?;
        if self.model != Model::None {
            // a veth that is gone: its plumbing goes too
            let gone: Vec<u32> = self
                .plumbed
                .keys()
                .filter(|i| !snap.links.contains_key(i))
                .copied()
                .collect();
            for i in gone {
                if let Some(p) = self.plumbed.remove(&i) {
                    plumb::unplumb(&self.handle, &p).await;
                }
            }
            let new: Vec<scan::Link> = snap
                .candidates()
                .into_iter()
                .filter(|l| !self.plumbed.contains_key(&l.index))
                .cloned()
                .collect();
            for l in new {
                let p = plumb::plumb(&self.handle, self.model, &l, self.next_device).await?;
                self.next_device += 1;
                self.plumbed.insert(l.index, p);
            }
        }
        // the snapshot of the links netmon just made may be stale: their
        // names and indexes are in `plumbed`
        let taken: Vec<u32> = self.plumbed.keys().copied().collect();
        let endpoints = self
            .plumbed
            .values()
            .filter_map(|p| {
                let mut i = snap.interface(p.veth)?;
                if let Some(mac) = &p.pod_mac {
                    // the veth lent its MAC to the macvtap: the guest's
                    i.hw_addr = kata_proto::net::mac_string(mac);
                }
                Some(Endpoint {
                    interface: Some(i),
                    host_device: p.device.clone(),
                    model: self.model.name().into(),
                    ifindex: p.veth,
                    macvtap_dev: p.char_dev.clone(),
                })
            })
            .collect();
        let mut net = Network {
            endpoints,
            routes: snap.guest_routes(&taken),
            neighbors: snap.guest_neighbours(&taken),
            generation: self.generation,
        };
        let changed = {
            let cur = self.tx.borrow();
            cur.endpoints != net.endpoints
                || cur.routes != net.routes
                || cur.neighbors != net.neighbors
        };
        if changed || self.generation == 0 {
            self.generation += 1;
            net.generation = self.generation;
            info!(
                generation = net.generation,
                interfaces = net.endpoints.len(),
                routes = net.routes.len(),
                "network changed"
            );
            self.tx.send_replace(net);
        }
        Ok(())
    }

    async fn teardown(&mut self) {
        self.stopped = true;
        for (_, p) in std::mem::take(&mut self.plumbed) {
            plumb::unplumb(&self.handle, &p).await;
        }
        // the end of every WatchNetwork stream (their sender goes)
        self.tx = watch::channel(Network::default()).0;
    }
}

struct Service {
    rx: watch::Receiver<Network>,
    mon: Arc<Mutex<Monitor>>,
    stop: Arc<Notify>,
}

type NetStream = Pin<Box<dyn futures_util::Stream<Item = Result<Network, Status>> + Send>>;

#[tonic::async_trait]
impl Netmon for Service {
    async fn get_network(&self, _r: Request<()>) -> Result<Response<Network>, Status> {
        // read the netns now: a change whose events have not settled yet
        // (a CNI plugin that just returned) is in the answer
        if let Err(e) = self.mon.lock().await.refresh().await {
            return Err(Status::unavailable(format!("reading the network: {e}")));
        }
        Ok(Response::new(self.rx.borrow().clone()))
    }

    type WatchNetworkStream = NetStream;

    async fn watch_network(
        &self,
        _r: Request<()>,
    ) -> Result<Response<Self::WatchNetworkStream>, Status> {
        let s = WatchStream::new(self.rx.clone()).map(Ok);
        Ok(Response::new(Box::pin(s)))
    }

    async fn shutdown(&self, _r: Request<()>) -> Result<Response<()>, Status> {
        self.stop.notify_one();
        Ok(Response::new(()))
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The pod's sandbox id (for logs).
    pub sandbox_id: String,
    /// The API socket.
    pub socket: PathBuf,
    /// The internetworking model.
    pub model: Model,
}

/// Serves until Shutdown or SIGTERM, in the calling thread's network
/// namespace (the caller entered the pod's); prints `READY` once the first
/// network is plumbed and the socket listens; removes what it made before
/// it returns.
pub async fn run(opts: Options, ready: impl FnOnce()) -> Result<(), NetmonError> {
    let io = |what: String| move |e: std::io::Error| NetmonError::Io(what, e);
    let (conn, handle, _) = new_connection().map_err(io("netlink socket".into()))?;
    tokio::spawn(conn);
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Neigh,
    ];
    // listen before the first read: no change falls between the two
    let (mconn, _mh, mut events) =
        new_multicast_connection(&groups).map_err(io("netlink multicast socket".into()))?;
    tokio::spawn(mconn);
    let (tx, rx) = watch::channel(Network::default());
    let mut mon = Monitor {
        handle,
        model: opts.model,
        plumbed: BTreeMap::new(),
        next_device: 0,
        generation: 0,
        tx,
        stopped: false,
    };
    if let Err(e) = mon.refresh().await {
        mon.teardown().await;
        return Err(e);
    }
    let _ = std::fs::remove_file(&opts.socket);
    let listener = match tokio::net::UnixListener::bind(&opts.socket) {
        Ok(l) => l,
        Err(e) => {
            mon.teardown().await;
            return Err(NetmonError::Io(
                format!("binding {}", opts.socket.display()),
                e,
            ));
        }
    };
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&opts.socket, std::fs::Permissions::from_mode(0o600));
    let stop = Arc::new(Notify::new());
    let mon = Arc::new(Mutex::new(mon));
    let svc = Service {
        rx,
        mon: mon.clone(),
        stop: stop.clone(),
    };
    let watcher = {
        let mon = mon.clone();
        tokio::spawn(async move {
            while events.next().await.is_some() {
                // let the burst settle, then drain it
                tokio::time::sleep(SETTLE).await;
                while let Ok(Some(_)) =
                    tokio::time::timeout(Duration::from_millis(1), events.next()).await
                {
                }
                if let Err(e) = mon.lock().await.refresh().await {
                    warn!("reading the network after a change: {e}");
                }
            }
        })
    };
    ready();
    info!(model = opts.model.name(), socket = %opts.socket.display(), "netmon serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("SIGTERM handler".into()))?;
    // the plumbing goes first, then the server: open WatchNetwork streams
    // end with it instead of holding the graceful shutdown
    let stopped = {
        let stop = stop.clone();
        let mon = mon.clone();
        async move {
            tokio::select! {
                _ = stop.notified() => info!("Shutdown: removing the plumbing"),
                _ = term.recv() => info!("SIGTERM: removing the plumbing"),
            }
            watcher.abort();
            mon.lock().await.teardown().await;
        }
    };
    let served = tonic::transport::Server::builder()
        .add_service(NetmonServer::new(svc))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped)
        .await;
    // (an error of the server itself: the plumbing still goes)
    mon.lock().await.teardown().await;
    let _ = std::fs::remove_file(&opts.socket);
    served.map_err(|e| NetmonError::Config(format!("serving: {e}")))
}

/// Removes what a killed netmon left in the calling thread's netns: every
/// link named `*_kata` and the ingress qdiscs of the other links.
pub async fn cleanup() -> Result<(), NetmonError> {
    let (conn, handle, _) =
        new_connection().map_err(|e| NetmonError::Io("netlink socket".into(), e))?;
    tokio::spawn(conn);
    let snap = Snapshot::read(&handle).await?;
    for l in snap.links.values() {
        if l.name.ends_with(scan::OWN_SUFFIX) {
            info!(link = %l.name, "removing a leftover link");
            if let Err(e) = handle.link().del(l.index).execute().await {
                warn!(link = %l.name, "{e}");
            }
            if let (Some(rtnetlink::packet_route::link::InfoKind::MacVtap), Some(veth)) =
                (&l.kind, l.lower)
            {
                // the macvtap held the veth's own MAC
                plumb::restore_veth(&handle, veth, &l.mac).await;
            }
        } else if !l.loopback {
            plumb::remove_ingress(&handle, l.index).await;
        }
    }
    Ok(())
}
