//! The vhost-user-fs device: two virtqueues (hiprio, requests) whose descriptor
//! chains carry FUSE requests; each chain becomes a fuse-backend-rs
//! Reader/Writer pair handed to `Server::handle_message`.
//!
//! With `--thread-pool-size 0` (the default) the vring thread of
//! vhost-user-backend serves the requests itself, in order; with N > 0 it hands
//! each chain to one of N worker threads, which return it to the used ring and
//! notify the guest when done (requests then complete out of order, as FUSE
//! allows). No DAX window, no migration state, no config space (QEMU's
//! `vhost-user-fs-pci` carries the tag).

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, RwLock};

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::fs::GuardedFs;
use crate::metrics::Metrics;

/// Guest memory as vhost-user-backend maps it.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap<()>>>;

/// hiprio queue + one request queue
const NUM_QUEUES: usize = 2;
const QUEUE_SIZE: usize = 1024;

/// The server every transport shares.
pub type FuseServer = Server<Arc<GuardedFs>>;

/// Serves one FUSE request from a descriptor chain; returns the reply length.
/// Never panics: a panic in the FUSE code is caught and counted as malformed.
fn serve_chain(
    server: &FuseServer,
    metrics: &Metrics,
    mem: &GuestMemoryMmap<()>,
    chain: Chain,
) -> u32 {
    let res = catch_unwind(AssertUnwindSafe(|| {
        let reader = Reader::from_descriptor_chain(mem, chain.clone());
        let writer = VirtioFsWriter::new(mem, chain);
        match (reader, writer) {
            (Ok(r), Ok(w)) => {
                let res = server.handle_message(r, w.into(), None, Some(&metrics.hook()));
                metrics.finish(res.is_err());
                match res {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::debug!("bad FUSE request: {e}");
                        0
                    }
                }
            }
            _ => {
                // descriptors outside guest memory, or lengths that overflow
                metrics.finish(true);
                tracing::debug!("bad descriptor chain");
                0
            }
        }
    }));
    match res {
        Ok(n) => u32::try_from(n).unwrap_or(u32::MAX),
        Err(_) => {
            metrics.finish(true);
            tracing::warn!("a FUSE request panicked; dropped");
            0
        }
    }
}

/// Puts a served chain on the used ring and notifies the guest if it wants.
fn complete(vring: &VringRwLock<Mem>, head: u16, len: u32, event_idx: bool) {
    if let Err(e) = vring.add_used(head, len) {
        tracing::warn!("returning a descriptor to the used ring: {e:?}");
        return;
    }
    let notify = !event_idx || vring.needs_notification().unwrap_or(true);
    if notify {
        if let Err(e) = vring.signal_used_queue() {
            tracing::debug!("signalling the guest: {e}");
        }
    }
}

struct Job {
    mem: GuestMemoryLoadGuard<GuestMemoryMmap<()>>,
    chain: Chain,
    vring: VringRwLock<Mem>,
    event_idx: bool,
}

/// The vhost-user-fs backend.
pub struct FsBackend {
    fs: Arc<GuardedFs>,
    server: Arc<FuseServer>,
    metrics: Arc<Metrics>,
    mem: RwLock<Option<Mem>>,
    event_idx: AtomicBool,
    pool: Option<SyncSender<Job>>,
}

impl FsBackend {
    /// A backend serving `fs`; `threads` > 0 starts that many workers.
    pub fn new(fs: Arc<GuardedFs>, metrics: Arc<Metrics>, threads: usize) -> io::Result<Self> {
        let server = Arc::new(Server::new(fs.clone()));
        let pool = if threads > 0 {
            let (tx, rx) = sync_channel::<Job>(QUEUE_SIZE);
            let rx = Arc::new(Mutex::new(rx));
            for i in 0..threads {
                let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
                let server = server.clone();
                let metrics = metrics.clone();
                std::thread::Builder::new()
                    .name(format!("fs-worker-{i}"))
                    .spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        let head = job.chain.head_index();
                        let len = serve_chain(&server, &metrics, &job.mem, job.chain);
                        complete(&job.vring, head, len, job.event_idx);
                    })?;
            }
            Some(tx)
        } else {
            None
        };
        Ok(FsBackend {
            fs,
            server,
            metrics,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            pool,
        })
    }

    /// Serves every available chain of `vring`; false if there was none.
    fn drain(&self, vring: &VringRwLock<Mem>) -> io::Result<bool> {
        let mem = match self.mem.read().map(|m| m.clone()) {
            Ok(Some(m)) => m.memory(),
            _ => return Err(io::Error::other("no guest memory")),
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let chains: Vec<Chain> = vring
            .get_mut()
            .get_queue_mut()
            .iter(mem.clone())
            .map_err(|e| io::Error::other(format!("reading the available ring: {e:?}")))?
            .collect();
        let any = !chains.is_empty();
        for chain in chains {
            match &self.pool {
                Some(tx) => {
                    let job = Job {
                        mem: mem.clone(),
                        chain,
                        vring: vring.clone(),
                        event_idx,
                    };
                    if tx.send(job).is_err() {
                        return Err(io::Error::other("worker threads gone"));
                    }
                }
                None => {
                    let head = chain.head_index();
                    let len = serve_chain(&self.server, &self.metrics, &mem, chain);
                    complete(vring, head, len, event_idx);
                }
            }
        }
        Ok(any)
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().map_err(|_| io::Error::other("poisoned"))? = Some(mem);
        Ok(())
    }

    fn reset_device(&self) {
        // the guest driver is gone: forget every inode and handle it had
        fuse_backend_rs::api::filesystem::FileSystem::destroy(&*self.fs);
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let vring = vrings
            .get(device_event as usize)
            .ok_or_else(|| io::Error::other(format!("unknown queue {device_event}")))?;
        if self.event_idx.load(Ordering::Relaxed) {
            // drain until the guest added nothing while notifications were off
            loop {
                let _ = vring.disable_notification();
                self.drain(vring)?;
                if !vring.enable_notification().unwrap_or(false) {
                    break;
                }
            }
        } else {
            self.drain(vring)?;
        }
        Ok(())
    }
}
