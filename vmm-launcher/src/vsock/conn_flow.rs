//! The per-connection steps of the multiplexer (src/vsock/conn.rs): data
//! from the guest into a connection's buffer, the next packet a connection
//! owes the guest, credit accounting, RST answers and the non-blocking
//! connect to a host listener.

use super::*;

/// Our RST answer to a guest packet.
pub(super) fn rst_reply(h: &Header) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: h.src_cid,
        src_port: h.dst_port,
        dst_port: h.src_port,
        len: 0,
        type_: packet::TYPE_STREAM,
        op: op::RST,
        flags: 0,
        buf_alloc: 0,
        fwd_cnt: 0,
    }
}

pub(super) fn count_forwarded(c: &mut Conn, n: u32) {
    c.fwd_cnt = c.fwd_cnt.wrapping_add(n);
    if c.wants_credit_update() {
        c.pending |= P_CREDIT_UPDATE;
    }
}

/// Guest data for an established connection that may hold at most `room`
/// bytes for the host.
pub(super) fn guest_data(c: &mut Conn, payload: &[u8], room: usize, stats: &mut Stats) -> Fate {
    if c.guest_send_done {
        debug!("vsock: guest sent data after SHUTDOWN(SEND)");
        return Fate::Reset;
    }
    let buffered = c.rx_cnt.wrapping_sub(c.fwd_cnt) as usize;
    if buffered + payload.len() > BUF_ALLOC as usize {
        debug!("vsock: guest exceeded its credit");
        return Fate::Reset;
    }
    c.rx_cnt = c.rx_cnt.wrapping_add(payload.len() as u32);
    if c.host_write_done || c.hup {
        // the host end is gone for writing: drop, but keep the credit moving
        count_forwarded(c, payload.len() as u32);
        return Fate::Keep;
    }
    let mut rest = payload;
    // OK line first, then straight to the socket while it takes data
    if c.to_host.is_empty() {
        while c.writable && !rest.is_empty() {
            match send(c.stream.as_raw_fd(), rest) {
                Ok(n) => {
                    rest = &rest[n..];
                    count_forwarded(c, n as u32);
                }
                Err(Errno::EAGAIN) => c.writable = false,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    trace!("vsock: host write failed: {e}");
                    return Fate::Reset;
                }
            }
        }
    }
    if !rest.is_empty() {
        let need = c.to_host.len() + rest.len();
        if need.max(c.to_host.capacity()) > room {
            stats.buffer_resets += 1;
            if stats.buffer_resets.is_power_of_two() {
                warn!(
                    resets = stats.buffer_resets,
                    "vsock: the VM's buffered guest data reached its cap ({MAX_BUFFERED} bytes); resetting the connection"
                );
            }
            return Fate::Reset;
        }
        c.to_host.reserve_exact(rest.len());
        c.to_host.extend(rest);
    }
    if let Err(e) = c.flush() {
        trace!("vsock: host write failed: {e}");
        return Fate::Reset;
    }
    Fate::Keep
}

/// The next packet one connection has for the guest.
pub(super) fn produce(
    c: &mut Conn,
    guest_cid: u64,
    payload: &mut [u8],
) -> (Option<(Header, usize)>, Fate) {
    let ctl = |c: &mut Conn, bit: u8, op: u16| {
        c.pending &= !bit;
        c.fwd_cnt_sent = c.fwd_cnt;
        c.pending &= !P_CREDIT_UPDATE;
        Some((c.header(guest_cid, op), 0))
    };
    if c.pending & P_REQUEST != 0 {
        return (ctl(c, P_REQUEST, op::REQUEST), Fate::Keep);
    }
    if c.pending & P_RESPONSE != 0 {
        return (ctl(c, P_RESPONSE, op::RESPONSE), Fate::Keep);
    }
    if c.can_read_host() && c.peer_credit() > 0 && !payload.is_empty() {
        let want = payload.len().min(c.peer_credit() as usize);
        loop {
            match socket::recv(
                c.stream.as_raw_fd(),
                &mut payload[..want],
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => {
                    c.host_eof = true;
                    if c.hup {
                        // the client closed completely: nothing to half-close
                        return (None, Fate::Reset);
                    }
                    c.pending |= P_SHUTDOWN;
                    break;
                }
                Ok(n) => {
                    c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                    c.fwd_cnt_sent = c.fwd_cnt;
                    c.pending &= !P_CREDIT_UPDATE;
                    let mut h = c.header(guest_cid, op::RW);
                    h.len = n as u32;
                    return (Some((h, n)), Fate::Keep);
                }
                Err(Errno::EAGAIN) => {
                    c.readable = false;
                    break;
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    trace!("vsock: host read failed: {e}");
                    return (None, Fate::Reset);
                }
            }
        }
    } else if c.can_read_host() && c.peer_credit() == 0 && !c.credit_requested {
        c.credit_requested = true;
        return (ctl(c, P_CREDIT_REQUEST, op::CREDIT_REQUEST), Fate::Keep);
    }
    if c.pending & P_SHUTDOWN != 0 {
        c.guest_rx_done = true;
        let out = ctl(c, P_SHUTDOWN, op::SHUTDOWN).map(|(mut h, n)| {
            h.flags = SHUTDOWN_SEND;
            (h, n)
        });
        return (out, Fate::Keep);
    }
    if c.pending & P_CREDIT_UPDATE != 0 {
        return (ctl(c, P_CREDIT_UPDATE, op::CREDIT_UPDATE), Fate::Keep);
    }
    (None, Fate::Keep)
}

/// `connect(2)` on a non-blocking unix socket: never waits for a full
/// backlog. `sndbuf`: its `SO_SNDBUF`.
pub(super) fn connect_nonblocking(path: &Path, sndbuf: Option<usize>) -> io::Result<UnixStream> {
    let fd = socket::socket(
        socket::AddressFamily::Unix,
        socket::SockType::Stream,
        socket::SockFlag::SOCK_NONBLOCK | socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    if let Some(n) = sndbuf {
        socket::setsockopt(&fd, socket::sockopt::SndBuf, &n)?;
    }
    let addr = socket::UnixAddr::new(path)?;
    socket::connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}
