//! The connection multiplexer: host unix sockets on one side, guest vsock
//! packets on the other. No guest memory and no vrings here: the device glue
//! feeds guest packets in ([`Muxer::on_guest_packet`]) and pulls packets for
//! the guest out ([`Muxer::next_rx`]), so this is testable with socketpairs.
//!
//! Host sockets are registered edge-triggered in the muxer's own epoll; each
//! connection remembers `readable`/`writable` until a syscall says
//! `EAGAIN`, so flow control never needs `epoll_ctl` and never busy-loops:
//! a connection that has data but no guest credit (or no RX buffers) simply
//! is not scheduled until the credit (or a buffer) arrives.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, MsgFlags};
use tracing::{debug, trace, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::packet::{self, op, Header, LineError, Op, HOST_CID, SHUTDOWN_SEND};

/// Receive buffer we advertise per connection (guest to host direction).
pub(crate) const BUF_ALLOC: u32 = 256 * 1024;
/// How long a host client may take to send its `CONNECT` line.
pub(crate) const LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections (any state, both directions) at once.
pub(crate) const MAX_CONNS: usize = 4096;
/// Most guest-initiated connections (any state) at once: the guest's
/// REQUEST beyond it gets an RST, counted in [`Stats::refused_guest_conns`].
pub(crate) const MAX_GUEST_CONNS: usize = 256;
/// Most guest bytes held for slow host sockets, all connections of the VM
/// together (buffer capacity, not just content). A guest packet that would
/// go past it resets its connection ([`Stats::buffer_resets`]).
pub(crate) const MAX_BUFFERED: usize = 16 << 20;
/// `SO_SNDBUF` of the host sockets of guest-initiated connections: bounds
/// what the kernel holds for each (it doubles the value).
pub(crate) const GUEST_CONN_SNDBUF: usize = 32 * 1024;
/// Most queued RSTs for packets that match no connection.
const MAX_ORPHAN_RST: usize = 1024;
/// First host port handed out to host-initiated connections.
const FIRST_HOST_PORT: u32 = 49152;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;
const TOKEN_CONN_BASE: u64 = 2;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host client: waiting for `CONNECT <port>\n`.
    AwaitLine { deadline: Instant },
    /// Host client sent its line, the device is not active yet.
    Held,
    /// REQUEST queued or sent to the guest, waiting for RESPONSE/RST.
    Connecting,
    /// Data flows.
    Established,
}

// Control packets a connection owes the guest.
const P_REQUEST: u8 = 1;
const P_RESPONSE: u8 = 2;
const P_CREDIT_UPDATE: u8 = 4;
const P_CREDIT_REQUEST: u8 = 8;
const P_SHUTDOWN: u8 = 16;

struct Conn {
    stream: UnixStream,
    gen: u32,
    state: State,
    host_port: u32,
    guest_port: u32,
    host_initiated: bool,
    /// Bytes at the front of `to_host` that are not guest data (the `OK` line).
    ok_bytes: usize,
    /// Edge-triggered readiness, cleared on EAGAIN.
    readable: bool,
    writable: bool,
    /// The host peer closed completely (EPOLLHUP).
    hup: bool,
    in_rx_queue: bool,
    pending: u8,
    /// Guest to host: bytes received from the guest but not yet written.
    to_host: VecDeque<u8>,
    /// Bytes received from the guest (RW payloads).
    rx_cnt: u32,
    /// Bytes of those written to the host socket.
    fwd_cnt: u32,
    /// `fwd_cnt` the guest last heard of.
    fwd_cnt_sent: u32,
    /// Host to guest: bytes sent to the guest.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    credit_requested: bool,
    /// Read EOF from the host socket.
    host_eof: bool,
    /// We told the guest SHUTDOWN(SEND) (or it told us it won't receive).
    guest_rx_done: bool,
    /// Guest sent SHUTDOWN(SEND).
    guest_send_done: bool,
    /// We called `shutdown(Write)` on the host socket.
    host_write_done: bool,
    /// Guest sent SHUTDOWN(RCV).
    guest_rcv_shut: bool,
}

impl Conn {
    fn new(stream: UnixStream, gen: u32, state: State) -> Conn {
        Conn {
            stream,
            gen,
            state,
            host_port: 0,
            guest_port: 0,
            host_initiated: true,
            ok_bytes: 0,
            readable: false,
            writable: false,
            hup: false,
            in_rx_queue: false,
            pending: 0,
            to_host: VecDeque::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            host_eof: false,
            guest_rx_done: false,
            guest_send_done: false,
            host_write_done: false,
            guest_rcv_shut: false,
        }
    }

    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_read_host(&self) -> bool {
        self.state == State::Established && self.readable && !self.host_eof && !self.guest_rx_done
    }

    fn has_rx_work(&self) -> bool {
        self.pending != 0
            || (self.can_read_host() && (self.peer_credit() > 0 || !self.credit_requested))
    }

    /// Whether the guest should hear our `fwd_cnt` now: it believes more
    /// than half of our buffer is in use and we freed some of it.
    fn wants_credit_update(&self) -> bool {
        let believed_used = self.rx_cnt.wrapping_sub(self.fwd_cnt_sent);
        self.fwd_cnt != self.fwd_cnt_sent && believed_used > BUF_ALLOC / 2
    }

    fn header(&self, guest_cid: u64, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.host_port,
            dst_port: self.guest_port,
            len: 0,
            type_: packet::TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Writes as much of `to_host` as the socket takes, counting the guest
    /// bytes forwarded; an emptied buffer is freed.
    fn flush(&mut self) -> io::Result<()> {
        while self.writable && !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match send(self.stream.as_raw_fd(), a) {
                Ok(n) => {
                    self.to_host.drain(..n);
                    let ok = n.min(self.ok_bytes);
                    self.ok_bytes -= ok;
                    count_forwarded(self, (n - ok) as u32);
                }
                Err(Errno::EAGAIN) => self.writable = false,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if self.to_host.is_empty() && self.to_host.capacity() > 0 {
            self.to_host = VecDeque::new();
        }
        Ok(())
    }

    /// Heap bytes this connection holds for the host.
    fn held(&self) -> usize {
        self.to_host.capacity()
    }
}

fn send(fd: RawFd, buf: &[u8]) -> nix::Result<usize> {
    socket::send(fd, buf, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL)
}

/// What happened to a connection after an operation.
enum Fate {
    Keep,
    /// Close the host socket and forget the connection, sending the guest an
    /// RST if it knows the connection.
    Reset,
}

/// Counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Stats {
    /// Packets dropped or answered with RST because they were malformed.
    pub(crate) bad_packets: u64,
    /// Host clients closed because of a bad or late `CONNECT` line.
    pub(crate) bad_lines: u64,
    /// Guest REQUESTs refused (RST) because the VM had [`MAX_GUEST_CONNS`]
    /// guest-initiated connections (or [`MAX_CONNS`] in all).
    pub(crate) refused_guest_conns: u64,
    /// Connections reset because their guest data would have taken the
    /// VM's buffered bytes past [`MAX_BUFFERED`].
    pub(crate) buffer_resets: u64,
}

/// What the connection table holds, for limits and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Connections, any state.
    pub(crate) conns: usize,
    /// Of which guest-initiated.
    pub(crate) guest_conns: usize,
    /// Heap bytes held in guest-to-host buffers.
    pub(crate) buffered: usize,
    /// Most `buffered` ever was.
    pub(crate) buffered_peak: usize,
}

/// The connection table and everything around it.
pub(crate) struct Muxer {
    uds_path: PathBuf,
    guest_cid: u64,
    epoll: Epoll,
    listener: UnixListener,
    timer: TimerFd,
    timer_armed: bool,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    next_gen: u32,
    live: usize,
    guest_live: usize,
    buffered: usize,
    buffered_peak: usize,
    by_key: HashMap<(u32, u32), usize>,
    rx_queue: VecDeque<usize>,
    rst_queue: VecDeque<Header>,
    next_host_port: u32,
    active: bool,
    awaiting_lines: usize,
    /// How long a host client may take to send its `CONNECT` line.
    pub(crate) line_timeout: Duration,
    /// Scratch space for the device glue (one packet's payload).
    pub(crate) scratch: Vec<u8>,
    /// Counters.
    pub(crate) stats: Stats,
}

impl Muxer {
    /// Takes the bound host listener (`uds_path`). Guest-initiated connections
    /// to host port P go to `<uds_path>_P`.
    pub(crate) fn new(
        listener: UnixListener,
        uds_path: &Path,
        guest_cid: u64,
    ) -> io::Result<Muxer> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        // SAFETY: F_SETFL on a file descriptor we own; no memory is involved.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_TIMER),
        )?;
        Ok(Muxer {
            uds_path: uds_path.to_path_buf(),
            guest_cid,
            epoll,
            listener,
            timer,
            timer_armed: false,
            conns: Vec::new(),
            free: Vec::new(),
            next_gen: 1,
            live: 0,
            guest_live: 0,
            buffered: 0,
            buffered_peak: 0,
            by_key: HashMap::new(),
            rx_queue: VecDeque::new(),
            rst_queue: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
            active: false,
            awaiting_lines: 0,
            line_timeout: LINE_TIMEOUT,
            scratch: vec![0u8; packet::HDR_LEN + packet::MAX_PAYLOAD],
            stats: Stats::default(),
        })
    }

    /// The muxer's epoll fd: readable when a host socket needs attention.
    pub(crate) fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of connections in any state.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.live
    }

    /// Connections and held bytes now.
    pub(crate) fn usage(&self) -> Usage {
        Usage {
            conns: self.live,
            guest_conns: self.guest_live,
            buffered: self.buffered,
            buffered_peak: self.buffered_peak,
        }
    }

    /// Accounts a change of one connection's held bytes.
    fn account(&mut self, before: usize, after: usize) {
        self.buffered = self.buffered.saturating_sub(before) + after;
        self.buffered_peak = self.buffered_peak.max(self.buffered);
    }

    /// Whether the guest side is up.
    pub(crate) fn is_active(&self) -> bool {
        self.active
    }

    // ---- connection table ----

    fn insert(&mut self, conn: Conn) -> io::Result<usize> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        let token = TOKEN_CONN_BASE + ((u64::from(conn.gen) << 32) | slot as u64);
        let ev = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            conn.stream.as_raw_fd(),
            EpollEvent::new(ev, token),
        ) {
            self.free.push(slot);
            return Err(e);
        }
        if matches!(conn.state, State::AwaitLine { .. }) {
            self.awaiting_lines += 1;
            self.arm_timer();
        }
        if !conn.host_initiated {
            self.guest_live += 1;
        }
        self.account(0, conn.held());
        self.conns[slot] = Some(conn);
        self.live += 1;
        Ok(slot)
    }

    fn new_gen(&mut self) -> u32 {
        let g = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        g
    }

    /// Forgets a connection; queues an RST for the guest if it knows it.
    fn remove(&mut self, slot: usize, rst: bool) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.live -= 1;
        if !conn.host_initiated {
            self.guest_live -= 1;
        }
        self.account(conn.held(), 0);
        self.free.push(slot);
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            conn.stream.as_raw_fd(),
            EpollEvent::new(EventSet::empty(), 0),
        );
        if matches!(conn.state, State::AwaitLine { .. }) {
            self.awaiting_lines -= 1;
        }
        let known_to_guest = match conn.state {
            State::AwaitLine { .. } | State::Held => false,
            State::Connecting => conn.pending & P_REQUEST == 0,
            State::Established => true,
        };
        let key = (conn.host_port, conn.guest_port);
        if self.by_key.get(&key) == Some(&slot) {
            self.by_key.remove(&key);
        }
        if known_to_guest && rst {
            let h = conn.header(self.guest_cid, op::RST);
            self.push_rst(h);
        }
        trace!(
            host_port = conn.host_port,
            guest_port = conn.guest_port,
            "vsock connection closed"
        );
        // `conn.stream` closes here: a host client waiting for "OK" sees EOF.
    }

    fn push_rst(&mut self, h: Header) {
        if self.rst_queue.len() < MAX_ORPHAN_RST {
            self.rst_queue.push_back(h);
        } else {
            debug!("vsock: too many queued RSTs, dropping one");
        }
    }

    fn schedule(&mut self, slot: usize) {
        if let Some(Some(c)) = self.conns.get_mut(slot) {
            if !c.in_rx_queue && c.has_rx_work() {
                c.in_rx_queue = true;
                self.rx_queue.push_back(slot);
            }
        }
    }

    fn alloc_host_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let p = self.next_host_port;
            self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
            if !self.by_key.contains_key(&(p, guest_port)) {
                return p;
            }
        }
    }

    // ---- device state ----

    /// The device became active (vrings enabled) or inactive (reset, stopped,
    /// frontend gone). Held `CONNECT`s go out when it becomes active; on
    /// deactivation every connection the guest knew is closed, pending
    /// `CONNECT`s are held again.
    pub(crate) fn set_active(&mut self, active: bool) {
        if self.active == active {
            return;
        }
        self.active = active;
        debug!(active, "vsock device state changed");
        self.rst_queue.clear();
        for slot in 0..self.conns.len() {
            let Some(c) = self.conns[slot].as_mut() else {
                continue;
            };
            if active {
                if c.state == State::Held {
                    c.state = State::Connecting;
                    c.pending |= P_REQUEST;
                    self.schedule(slot);
                }
            } else if c.state == State::Established || !c.host_initiated {
                self.remove(slot, false);
            } else if c.state == State::Connecting {
                // the guest forgot it: ask again once the device is back
                c.state = State::Held;
                c.pending = 0;
            }
        }
        if !active {
            self.rx_queue.clear();
            for c in self.conns.iter_mut().flatten() {
                c.in_rx_queue = false;
            }
        }
    }

    // ---- guest side ----

    /// Whether [`Muxer::next_rx`] may have a packet for the guest.
    pub(crate) fn has_rx_work(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_queue.is_empty()
    }

    /// The next packet for the guest, its payload written to `payload`
    /// (at most `payload.len()` bytes). Returns the header (its `len` set)
    /// and the payload length. `None`: nothing to send now.
    pub(crate) fn next_rx(&mut self, payload: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(h) = self.rst_queue.pop_front() {
            return Some((h, 0));
        }
        // each queued connection gets one chance per call: one that cannot
        // use this buffer (e.g. no room for payload) must not spin here
        let mut budget = self.rx_queue.len();
        while budget > 0 {
            budget -= 1;
            let Some(slot) = self.rx_queue.pop_front() else {
                break;
            };
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            c.in_rx_queue = false;
            let (out, fate) = produce(c, self.guest_cid, payload);
            match fate {
                Fate::Reset => {
                    self.remove(slot, true);
                    // the RST just queued is this connection's answer
                    if let Some(h) = self.rst_queue.pop_back() {
                        return Some((h, 0));
                    }
                    continue;
                }
                Fate::Keep => {}
            }
            self.maybe_finish(slot);
            self.schedule(slot);
            if let Some(p) = out {
                return Some(p);
            }
        }
        None
    }

    /// A guest packet addressed to us but unacceptable (bad type, op or
    /// length): reset the connection it belongs to, answer RST.
    pub(crate) fn reject(&mut self, h: &Header) {
        if let Some(&slot) = self.by_key.get(&(h.dst_port, h.src_port)) {
            self.remove(slot, false);
        }
        if h.op != op::RST {
            self.push_rst(rst_reply(h));
        }
    }

    /// A packet the guest could not receive (bad RX buffer) after we consumed
    /// host data for it: the stream is broken, reset the connection.
    pub(crate) fn rx_failed(&mut self, h: &Header) {
        if let Some(&slot) = self.by_key.get(&(h.src_port, h.dst_port)) {
            self.remove(slot, true);
        }
    }

    /// A packet from the guest (already validated by [`packet::validate`]).
    pub(crate) fn on_guest_packet(&mut self, h: &Header, op: Op, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        let Some(&slot) = self.by_key.get(&key) else {
            match op {
                Op::Request => self.guest_connect(h),
                Op::Rst => {}
                _ => {
                    debug!(?h, "vsock: packet for no connection, answering RST");
                    self.push_rst(rst_reply(h));
                }
            }
            return;
        };
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            self.by_key.remove(&key);
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        if c.peer_credit() > 0 {
            c.credit_requested = false;
        }
        let held_before = c.held();
        // what this connection may hold: the VM's budget less the others'
        let room = MAX_BUFFERED.saturating_sub(self.buffered - held_before.min(self.buffered));
        let stats = &mut self.stats;
        let fate = match op {
            Op::Request => {
                debug!(?h, "vsock: REQUEST for an existing connection");
                Fate::Reset
            }
            Op::Rst => {
                trace!(port = h.src_port, "vsock: guest reset the connection");
                self.remove(slot, false);
                return;
            }
            Op::Response if c.state == State::Connecting && c.pending & P_REQUEST == 0 => {
                c.state = State::Established;
                let line = format!("OK {}\n", c.host_port);
                c.ok_bytes = line.len();
                c.to_host.extend(line.as_bytes());
                match c.flush() {
                    Ok(()) => Fate::Keep,
                    Err(e) => {
                        trace!("vsock: host client gone before OK: {e}");
                        Fate::Reset
                    }
                }
            }
            Op::Response => Fate::Reset,
            _ if c.state != State::Established => Fate::Reset,
            Op::Rw => guest_data(c, payload, room, stats),
            Op::CreditUpdate => Fate::Keep,
            Op::CreditRequest => {
                c.pending |= P_CREDIT_UPDATE;
                Fate::Keep
            }
            Op::Shutdown { rcv, send } => {
                if rcv && !c.guest_rcv_shut {
                    c.guest_rcv_shut = true;
                    c.guest_rx_done = true;
                    c.pending &= !P_SHUTDOWN;
                    let _ = c.stream.shutdown(Shutdown::Read);
                }
                if send {
                    c.guest_send_done = true;
                }
                Fate::Keep
            }
        };
        let held_after = c.held();
        self.account(held_before, held_after);
        match fate {
            Fate::Reset => self.remove(slot, true),
            Fate::Keep => {
                self.maybe_finish(slot);
                self.schedule(slot);
            }
        }
    }

    /// After any change: half-close the host socket when the guest finished
    /// sending and we flushed, close for good when both directions are done.
    fn maybe_finish(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if c.state != State::Established {
            return;
        }
        if c.guest_send_done && c.to_host.is_empty() && !c.host_write_done {
            c.host_write_done = true;
            let _ = c.stream.shutdown(Shutdown::Write);
        }
        let host_gone = c.hup && c.to_host.is_empty() && (c.host_eof || c.guest_rx_done);
        let both_done = c.host_write_done && c.guest_rx_done && c.pending & P_SHUTDOWN == 0;
        if both_done || host_gone {
            self.remove(slot, true);
        }
    }

    fn guest_connect(&mut self, h: &Header) {
        if self.live >= MAX_CONNS || self.guest_live >= MAX_GUEST_CONNS {
            self.stats.refused_guest_conns += 1;
            let n = self.stats.refused_guest_conns;
            if n.is_power_of_two() {
                warn!(
                    refused = n,
                    guest_conns = self.guest_live,
                    "vsock: the guest has too many connections open; refusing new ones"
                );
            }
            self.push_rst(rst_reply(h));
            return;
        }
        let path = kata_proto::paths::hybrid_listener_path(&self.uds_path, h.dst_port);
        let stream = match connect_nonblocking(&path, Some(GUEST_CONN_SNDBUF)) {
            Ok(s) => s,
            Err(e) => {
                debug!(path = %path.display(), "vsock: guest connection to host port {} refused: {e}", h.dst_port);
                self.push_rst(rst_reply(h));
                return;
            }
        };
        let gen = self.new_gen();
        let mut c = Conn::new(stream, gen, State::Established);
        c.host_port = h.dst_port;
        c.guest_port = h.src_port;
        c.host_initiated = false;
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        c.pending = P_RESPONSE;
        match self.insert(c) {
            Ok(slot) => {
                self.by_key.insert((h.dst_port, h.src_port), slot);
                self.schedule(slot);
                trace!(port = h.dst_port, "vsock: guest connected to host port");
            }
            Err(e) => {
                warn!("vsock: cannot register a host socket: {e}");
                self.push_rst(rst_reply(h));
            }
        }
    }

    // ---- host side ----

    /// Handles whatever the host sockets have to say (never blocks).
    pub(crate) fn process_host_events(&mut self) {
        let mut events = [EpollEvent::new(EventSet::empty(), 0); 64];
        // New sockets report their first events on the next wait: go round
        // until nothing is left (bounded, in case a listener error persists).
        for _ in 0..64 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("vsock: epoll_wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let (token, bits) = (ev.data(), ev.events());
                match token {
                    TOKEN_LISTENER => self.accept_all(),
                    TOKEN_TIMER => self.on_timer(),
                    t => {
                        let t = t - TOKEN_CONN_BASE;
                        self.on_conn_event((t & 0xffff_ffff) as usize, (t >> 32) as u32, bits)
                    }
                }
            }
            if n == 0 {
                return;
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // EMFILE and the like: do not spin, the next connection retries.
                    warn!(path = %self.uds_path.display(), "vsock: accept failed: {e}");
                    return;
                }
            };
            if self.live >= MAX_CONNS {
                debug!("vsock: too many connections, closing a new host client");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                debug!("vsock: set_nonblocking failed: {e}");
                continue;
            }
            let gen = self.new_gen();
            let deadline = Instant::now() + self.line_timeout;
            if let Err(e) = self.insert(Conn::new(stream, gen, State::AwaitLine { deadline })) {
                warn!("vsock: cannot register a host client: {e}");
            }
            // the registration reports data already there
        }
    }

    fn arm_timer(&mut self) {
        if !self.timer_armed {
            let tick =
                (self.line_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
            if self.timer.reset(tick, Some(tick)).is_ok() {
                self.timer_armed = true;
            }
        }
    }

    fn on_timer(&mut self) {
        let _ = self.timer.wait();
        let now = Instant::now();
        for slot in 0..self.conns.len() {
            if let Some(Some(c)) = self.conns.get(slot) {
                if let State::AwaitLine { deadline } = c.state {
                    if now >= deadline {
                        debug!("vsock: host client sent no CONNECT line in time, closing it");
                        self.stats.bad_lines += 1;
                        self.remove(slot, false);
                    }
                }
            }
        }
        if self.awaiting_lines == 0 && self.timer_armed {
            let _ = self.timer.clear();
            self.timer_armed = false;
        }
    }

    fn on_conn_event(&mut self, slot: usize, gen: u32, bits: u32) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if c.gen != gen {
            return; // stale event for a reused slot
        }
        let ev = EventSet::from_bits_truncate(bits);
        if ev
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            c.readable = true;
        }
        if ev.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            c.hup = true;
        }
        if ev.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            c.writable = true;
        }
        match c.state {
            State::AwaitLine { .. } => self.read_line(slot),
            State::Held | State::Connecting => {
                if c.hup {
                    trace!("vsock: host client left before the guest answered");
                    self.remove(slot, true);
                }
            }
            State::Established => {
                let before = c.held();
                let flushed = c.flush();
                let after = c.held();
                self.account(before, after);
                if let Err(e) = flushed {
                    trace!("vsock: host write failed: {e}");
                    self.remove(slot, true);
                    return;
                }
                self.maybe_finish(slot);
                self.schedule(slot);
            }
        }
    }

    fn read_line(&mut self, slot: usize) {
        let active = self.active;
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let mut buf = [0u8; packet::MAX_CONNECT_LINE];
        let n = match socket::recv(
            c.stream.as_raw_fd(),
            &mut buf,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n) => n,
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => {
                c.readable = false;
                return;
            }
            Err(e) => {
                trace!("vsock: host client read failed: {e}");
                return self.remove(slot, false);
            }
        };
        if n == 0 {
            trace!("vsock: host client closed before its CONNECT line");
            return self.remove(slot, false);
        }
        let (port, used) = match packet::parse_connect_line(&buf[..n]) {
            Ok(Some(p)) => p,
            Ok(None) => {
                if c.hup {
                    return self.remove(slot, false);
                }
                c.readable = false;
                return;
            }
            Err(e) => {
                let why = match e {
                    LineError::Verb => "not a CONNECT line",
                    LineError::Port => "bad port",
                    LineError::TooLong => "line too long",
                };
                debug!(
                    line = %String::from_utf8_lossy(&buf[..n]).escape_debug(),
                    "vsock: host client sent garbage ({why}), closing it"
                );
                self.stats.bad_lines += 1;
                return self.remove(slot, false);
            }
        };
        // consume exactly the line; what follows is stream data
        let mut sink = [0u8; packet::MAX_CONNECT_LINE];
        match socket::recv(
            c.stream.as_raw_fd(),
            &mut sink[..used],
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(m) if m == used => {}
            _ => return self.remove(slot, false),
        }
        self.awaiting_lines -= 1;
        let host_port = self.alloc_host_port(port);
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        c.host_port = host_port;
        c.guest_port = port;
        c.readable = true; // there may be data after the line
        if active {
            c.state = State::Connecting;
            c.pending = P_REQUEST;
        } else {
            c.state = State::Held;
        }
        self.by_key.insert((host_port, port), slot);
        trace!(
            port,
            host_port,
            active,
            "vsock: host client wants a guest port"
        );
        self.schedule(slot);
    }
}

#[path = "conn_flow.rs"]
mod flow;
use flow::{connect_nonblocking, count_forwarded, guest_data, produce, rst_reply};

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
