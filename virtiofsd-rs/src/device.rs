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
//!
//! A queue the device cannot use any more is fatal, never silent: an
//! available index more than the queue size ahead of the device's (a guest
//! writing garbage into its ring: virtio-queue refuses to walk it), a used
//! ring it cannot write, no guest memory, an event it does not expect. An
//! error returned from `handle_event` ends vhost-user-backend's vring thread
//! for good while the daemon lives on and the guest waits forever; so the
//! backend calls its `on_broken` hook once, from the thread that found it, and
//! the daemon exits with an error (src/server.rs) that the shim sees as the
//! pod failing.

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
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
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
                        kata_proto::debug_limited!("bad FUSE request: {e}");
                        0
                    }
                }
            }
            _ => {
                // descriptors outside guest memory, or lengths that overflow
                metrics.finish(true);
                kata_proto::debug_limited!("bad descriptor chain");
                0
            }
        }
    }));
    match res {
        Ok(n) => u32::try_from(n).unwrap_or(u32::MAX),
        Err(_) => {
            metrics.finish(true);
            kata_proto::warn_limited!("a FUSE request panicked; dropped");
            0
        }
    }
}

/// Puts a served chain on the used ring and notifies the guest if it wants.
/// A used ring the device cannot write is an error (the device is broken).
fn complete(vring: &VringRwLock<Mem>, head: u16, len: u32, event_idx: bool) -> io::Result<()> {
    vring.add_used(head, len).map_err(|e| {
        io::Error::other(format!(
            "returning descriptor {head} to the used ring: {e:?}"
        ))
    })?;
    let notify = !event_idx || vring.needs_notification().unwrap_or(true);
    if notify {
        if let Err(e) = vring.signal_used_queue() {
            kata_proto::debug_limited!("signalling the guest: {e}");
        }
    }
    Ok(())
}

/// What the daemon does when the device cannot go on; called once, with
/// what went wrong.
pub type OnBroken = Box<dyn Fn(&str) + Send + Sync>;

/// Whether the device broke, and what to do about it.
struct Health {
    broken: AtomicBool,
    on_broken: OnBroken,
}

impl Health {
    fn fail(&self, what: &str) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            tracing::error!("the virtio-fs device is broken: {what}");
            (self.on_broken)(what);
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
    health: Arc<Health>,
}

impl FsBackend {
    /// A backend serving `fs`; `threads` > 0 starts that many workers.
    /// `on_broken` is called (once) when a queue can no longer be served.
    pub fn new(
        fs: Arc<GuardedFs>,
        metrics: Arc<Metrics>,
        threads: usize,
        on_broken: OnBroken,
    ) -> io::Result<Self> {
        let health = Arc::new(Health {
            broken: AtomicBool::new(false),
            on_broken,
        });
        let server = Arc::new(Server::new(fs.clone()));
        let pool = if threads > 0 {
            let (tx, rx) = sync_channel::<Job>(QUEUE_SIZE);
            let rx = Arc::new(Mutex::new(rx));
            for i in 0..threads {
                let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
                let server = server.clone();
                let metrics = metrics.clone();
                let health = health.clone();
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
                        if let Err(e) = complete(&job.vring, head, len, job.event_idx) {
                            health.fail(&e.to_string());
                        }
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
            health,
        })
    }

    /// Whether the device broke (a queue could not be served).
    pub fn is_broken(&self) -> bool {
        self.health.broken.load(Ordering::SeqCst)
    }

    /// Serves every available chain of `vring`; false if there was none.
    fn drain(&self, vring: &VringRwLock<Mem>) -> io::Result<bool> {
        let mem = match self.mem.read().map(|m| m.clone()) {
            Ok(Some(m)) => m.memory(),
            _ => return Err(io::Error::other("no guest memory")),
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let chains: Vec<Chain> = match queue.iter(mem.clone()) {
            Ok(it) => it.collect(),
            Err(e) => {
                let avail = queue
                    .avail_idx(&*mem, std::sync::atomic::Ordering::Acquire)
                    .map(|w| w.0.to_string())
                    .unwrap_or_else(|_| "unreadable".into());
                return Err(io::Error::other(format!(
                    "reading the available ring: {e} (the guest's available index {avail}, \
                     the device's next {}, queue size {})",
                    queue.next_avail(),
                    queue.size()
                )));
            }
        };
        drop(state);
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
                    complete(vring, head, len, event_idx)?;
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
        if self.is_broken() {
            return Err(io::Error::other("the device is broken"));
        }
        let r = self.serve_event(device_event, evset, vrings);
        if let Err(e) = &r {
            // vhost-user-backend ends this vring thread on an error: never
            // silently
            self.health.fail(&format!("queue {device_event}: {e}"));
        }
        r
    }
}

impl FsBackend {
    fn serve_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock<Mem>],
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

#[cfg(test)]
mod tests {
    //! The queue handling on a hand-built guest memory and split queue
    //! (virtio-queue's `mock`, as the guest driver would lay it out).

    use std::sync::Mutex;

    use fuse_backend_rs::abi::fuse_abi::{InHeader, InitIn, OutHeader};
    use fuse_backend_rs::passthrough::Config;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::fs::Policy;

    const SIZE: u16 = 16;
    const REQ: u64 = 0x10_0000;
    const REPLY: u64 = 0x20_0000;

    struct Device {
        backend: FsBackend,
        vrings: Vec<VringRwLock<Mem>>,
        broken: Arc<Mutex<Vec<String>>>,
        _dir: tempfile::TempDir,
    }

    fn device(mem: &GuestMemoryMmap<()>, q: &MockSplitQueue<'_, GuestMemoryMmap<()>>) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            root_dir: dir.path().to_string_lossy().into_owned(),
            do_import: true,
            ..Default::default()
        };
        let metrics = Arc::new(Metrics::default());
        let fs = Arc::new(GuardedFs::new(cfg, Policy::default(), metrics.clone()).unwrap());
        let broken = Arc::new(Mutex::new(Vec::new()));
        let seen = broken.clone();
        let backend = FsBackend::new(
            fs,
            metrics,
            0,
            Box::new(move |what| seen.lock().unwrap().push(what.to_string())),
        )
        .unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        backend.update_memory(atomic.clone()).unwrap();
        let vrings: Vec<_> = (0..NUM_QUEUES)
            .map(|_| VringRwLock::new(atomic.clone(), QUEUE_SIZE as u16).unwrap())
            .collect();
        let v = &vrings[1];
        v.set_queue_size(SIZE);
        v.set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
            .unwrap();
        v.set_queue_ready(true);
        Device {
            backend,
            vrings,
            broken,
            _dir: dir,
        }
    }

    /// A FUSE INIT request in descriptor 0, a reply buffer in descriptor 1.
    fn put_init(mem: &GuestMemoryMmap<()>, q: &MockSplitQueue<'_, GuestMemoryMmap<()>>) {
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0,
            flags: 0,
        };
        let h = InHeader {
            len: (std::mem::size_of::<InHeader>() + std::mem::size_of::<InitIn>()) as u32,
            opcode: 26,
            unique: 1,
            nodeid: 0,
            ..Default::default()
        };
        let mut req = h.as_slice().to_vec();
        req.extend_from_slice(init.as_slice());
        mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(
                REQ,
                req.len() as u32,
                VRING_DESC_F_NEXT as u16,
                1,
            )),
            RawDescriptor::from(SplitDescriptor::new(
                REPLY,
                4096,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ];
        q.add_desc_chains(&descs, 0).unwrap();
    }

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x30_0000)]).unwrap()
    }

    use vm_memory::ByteValued;

    #[test]
    fn a_request_on_the_queue_is_served_and_returned() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, SIZE);
        let d = device(&mem, &q);
        put_init(&mem, &q);
        d.backend
            .handle_event(1, EventSet::IN, &d.vrings, 0)
            .unwrap();
        assert_eq!(q.used().idx().load(), 1);
        let oh: OutHeader = mem.read_obj(GuestAddress(REPLY)).unwrap();
        assert_eq!((oh.error, oh.unique), (0, 1));
        assert!(d.broken.lock().unwrap().is_empty());
        assert!(!d.backend.is_broken());
    }

    /// (7) A guest writes a garbage available index (far more than the queue
    /// size ahead): virtio-queue refuses to walk the ring, and the backend
    /// reports the device broken (once, saying why) instead of returning an
    /// error that silently ends its vring thread.
    #[test]
    fn a_garbage_available_index_breaks_the_device_loudly() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, SIZE);
        let d = device(&mem, &q);
        put_init(&mem, &q);
        d.backend
            .handle_event(1, EventSet::IN, &d.vrings, 0)
            .unwrap();
        // the guest's index jumps 1000 entries ahead of the device's
        q.avail().idx().store(1001);
        let e = d
            .backend
            .handle_event(1, EventSet::IN, &d.vrings, 0)
            .unwrap_err();
        assert!(d.backend.is_broken());
        let broken = d.broken.lock().unwrap().clone();
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert!(
            broken[0].contains("available index 1001")
                && broken[0].contains("next 1")
                && broken[0].contains("queue size 16"),
            "{broken:?} ({e})"
        );
        // nothing more is served, and the hook is not called again
        assert!(d
            .backend
            .handle_event(1, EventSet::IN, &d.vrings, 0)
            .is_err());
        assert_eq!(d.broken.lock().unwrap().len(), 1);
        assert_eq!(q.used().idx().load(), 1);
    }

    /// Any other queue failure (an event the device does not expect, a queue
    /// number it does not have) breaks the device the same way.
    #[test]
    fn other_queue_failures_break_the_device_too() {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, SIZE);
        let d = device(&mem, &q);
        assert!(d
            .backend
            .handle_event(7, EventSet::IN, &d.vrings, 0)
            .is_err());
        let broken = d.broken.lock().unwrap().clone();
        assert_eq!(broken.len(), 1);
        assert!(broken[0].contains("unknown queue 7"), "{broken:?}");
    }
}
