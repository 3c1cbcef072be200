//! vhost-user glue: the virtio-vsock device seen by QEMU. Moves packets between
//! the vrings (guest memory) and the [`Muxer`].
//!
//! Every guest-controlled failure (bad chain, bad address, bad header) is
//! handled here by skipping that one chain; `handle_event` never returns an
//! error, because an error ends the vring worker thread for good.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tracing::{debug, trace};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::conn::Muxer;
use super::packet::{self, HDR_LEN, MAX_PAYLOAD};

/// Guest memory as vhost-user-backend hands it to us.
pub(crate) type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

const RX: usize = 0;
const TX: usize = 1;
const NUM_QUEUES: usize = 3;
const QUEUE_SIZE: usize = 1024;
/// Event id of the muxer's epoll fd in the backend's event loop (ids up to
/// `NUM_QUEUES` are the library's).
pub(crate) const HOST_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Locks, ignoring poisoning (a panic elsewhere must not take the device down).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One vhost-user session's device.
pub(crate) struct VsockDevice {
    muxer: Arc<Mutex<Muxer>>,
    guest_cid: u64,
    event_idx: AtomicBool,
    mem: RwLock<Option<Mem>>,
    active: Arc<AtomicBool>,
}

impl VsockDevice {
    /// A device for one frontend connection.
    pub(crate) fn new(muxer: Arc<Mutex<Muxer>>, guest_cid: u64, active: Arc<AtomicBool>) -> Self {
        VsockDevice {
            muxer,
            guest_cid,
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            active,
        }
    }

    fn deactivate(&self) {
        self.active.store(false, Ordering::Release);
        lock(&self.muxer).set_active(false);
    }

    fn memory(&self) -> Option<Mem> {
        self.mem.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Recomputes whether RX and TX are both started and enabled.
    fn update_active(&self, vrings: &[VringRwLock<Mem>], mux: &mut Muxer) -> bool {
        let ready = |i: usize| {
            vrings.get(i).is_some_and(|v| {
                let s = v.get_ref();
                s.is_enabled() && s.get_queue().ready()
            })
        };
        let now = self.memory().is_some() && ready(RX) && ready(TX);
        if now != mux.is_active() {
            mux.set_active(now);
        }
        self.active.store(now, Ordering::Release);
        now
    }

    fn process_tx(&self, vring: &VringRwLock<Mem>, mem: &GuestMemoryMmap, mux: &mut Muxer) {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut state = vring.get_mut();
        let mut used = false;
        let mut scratch = std::mem::take(&mut mux.scratch);
        loop {
            if event_idx {
                let _ = state.disable_notification();
            }
            while let Some(chain) = pop(&mut state, mem) {
                let head = chain.head_index();
                self.handle_tx_chain(chain, mem, mux, &mut scratch);
                if let Err(e) = state.add_used(head, 0) {
                    debug!("vsock: TX add_used failed: {e}");
                }
                used = true;
            }
            if !event_idx || !state.enable_notification().unwrap_or(false) {
                break;
            }
        }
        mux.scratch = scratch;
        signal(&mut state, used);
    }

    fn handle_tx_chain(
        &self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        mux: &mut Muxer,
        scratch: &mut [u8],
    ) {
        let (copied, total) = match read_chain(chain, mem, scratch) {
            Ok(v) => v,
            Err(e) => {
                debug!("vsock: bad TX descriptor chain: {e}");
                mux.stats.bad_packets += 1;
                return;
            }
        };
        // `avail` for the length check is what is really in the chain; we
        // copied at most HDR_LEN + MAX_PAYLOAD of it, which bounds `len` too.
        match packet::parse_packet(&scratch[..copied], self.guest_cid) {
            Ok((h, op, payload)) => {
                trace!(
                    op = h.op,
                    src = h.src_port,
                    dst = h.dst_port,
                    len = h.len,
                    "vsock: guest packet"
                );
                mux.on_guest_packet(&h, op, payload);
            }
            Err(r) => {
                mux.stats.bad_packets += 1;
                debug!(?r, total, "vsock: rejected guest packet");
                if r.wants_rst() {
                    if let Some(h) = packet::Header::decode(&scratch[..copied]) {
                        mux.reject(&h);
                    }
                }
            }
        }
    }

    fn process_rx(&self, vring: &VringRwLock<Mem>, mem: &GuestMemoryMmap, mux: &mut Muxer) {
        if !mux.has_rx_work() {
            return;
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut state = vring.get_mut();
        let mut used = false;
        let mut scratch = std::mem::take(&mut mux.scratch);
        loop {
            if event_idx {
                let _ = state.disable_notification();
            }
            let mut out_of_buffers = false;
            while mux.has_rx_work() {
                let Some(chain) = pop(&mut state, mem) else {
                    out_of_buffers = true;
                    break;
                };
                let head = chain.head_index();
                let cap = match writable_len(&chain, mem) {
                    Ok(c) if c >= HDR_LEN => c,
                    Ok(_) | Err(_) => {
                        debug!("vsock: bad RX descriptor chain, skipping it");
                        mux.stats.bad_packets += 1;
                        let _ = state.add_used(head, 0);
                        used = true;
                        continue;
                    }
                };
                let max = (cap - HDR_LEN).min(MAX_PAYLOAD).min(scratch.len());
                let Some((h, n)) = mux.next_rx(&mut scratch[..max]) else {
                    state.get_queue_mut().go_to_previous_position();
                    break;
                };
                let len = match write_chain(chain, mem, &h.encode(), &scratch[..n]) {
                    Ok(len) => len,
                    Err(e) => {
                        debug!("vsock: RX write to guest memory failed: {e}");
                        mux.rx_failed(&h);
                        0
                    }
                };
                let _ = state.add_used(head, len);
                used = true;
            }
            if !out_of_buffers || !mux.has_rx_work() || !event_idx {
                break;
            }
            // out of RX buffers with work pending: ask for a kick, then
            // look again in case buffers arrived meanwhile
            if !state.enable_notification().unwrap_or(false) {
                break;
            }
        }
        mux.scratch = scratch;
        signal(&mut state, used);
    }
}

fn pop<'a>(
    state: &mut VringState<Mem>,
    mem: &'a GuestMemoryMmap,
) -> Option<DescriptorChain<&'a GuestMemoryMmap>> {
    match state.get_queue_mut().iter(mem) {
        Ok(mut it) => it.next(),
        Err(e) => {
            debug!("vsock: cannot read the available ring: {e}");
            None
        }
    }
}

fn signal(state: &mut VringState<Mem>, used: bool) {
    if used && state.needs_notification().unwrap_or(true) {
        if let Err(e) = state.signal_used_queue() {
            debug!("vsock: signalling the guest failed: {e}");
        }
    }
}

/// Copies the readable part of a chain into `out` (as much as fits).
/// Returns (bytes copied, bytes readable in the chain).
fn read_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    out: &mut [u8],
) -> io::Result<(usize, usize)> {
    let mut copied = 0usize;
    let mut total = 0usize;
    for desc in chain.readable() {
        let len = desc.len() as usize;
        total = total.saturating_add(len);
        let n = len.min(out.len() - copied);
        if n > 0 {
            mem.read_slice(&mut out[copied..copied + n], desc.addr())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            copied += n;
        }
    }
    Ok((copied, total))
}

/// Total writable bytes of a chain, every descriptor checked to be in guest
/// memory (so the later write cannot fail half-way).
fn writable_len(
    chain: &DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> io::Result<usize> {
    let mut total = 0usize;
    for desc in chain.clone().writable() {
        if !mem.check_range(
            desc.addr(),
            desc.len() as usize,
            vm_memory::Permissions::Write,
        ) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "descriptor outside guest memory",
            ));
        }
        total = total.saturating_add(desc.len() as usize);
    }
    Ok(total)
}

/// Writes header then payload into the writable descriptors. Returns the
/// bytes written.
fn write_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    hdr: &[u8],
    payload: &[u8],
) -> io::Result<u32> {
    let mut parts = [hdr, payload];
    let mut part = 0;
    let mut written = 0usize;
    for desc in chain.writable() {
        let mut addr = desc.addr();
        let mut room = desc.len() as usize;
        while room > 0 && part < parts.len() {
            let src = parts[part];
            let n = src.len().min(room);
            mem.write_slice(&src[..n], addr)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            parts[part] = &src[n..];
            if parts[part].is_empty() {
                part += 1;
            }
            written += n;
            room -= n;
            addr = vm_memory::GuestAddress(addr.0.wrapping_add(n as u64));
        }
        if part >= parts.len() {
            break;
        }
    }
    if part < parts.len() && parts.iter().any(|p| !p.is_empty()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "RX chain too short",
        ));
    }
    u32::try_from(written).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

impl VhostUserBackend for VsockDevice {
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
            | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_vsock_config { le64 guest_cid; }
        let cfg = self.guest_cid.to_le_bytes();
        let (o, s) = (offset as usize, size as usize);
        match o.checked_add(s) {
            Some(end) if end <= cfg.len() => cfg[o..end].to_vec(),
            _ => Vec::new(),
        }
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn reset_device(&self) {
        self.deactivate();
    }

    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        self.deactivate();
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        let mut mux = lock(&self.muxer);
        if device_event == HOST_EVENT {
            mux.process_host_events();
        }
        if !self.update_active(vrings, &mut mux) {
            return Ok(());
        }
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        let mem = mem.memory();
        if let (Some(rx), Some(tx)) = (vrings.get(RX), vrings.get(TX)) {
            // TX first: guest packets may free credit or queue answers.
            if device_event as usize == TX || device_event as usize == RX {
                self.process_tx(tx, &mem, &mut mux);
            }
            self.process_rx(rx, &mem, &mut mux);
        }
        Ok(())
    }
}
