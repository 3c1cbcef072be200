//! State machine tests: a real host side (unix sockets), a synthetic guest.

use super::*;
use crate::vsock::packet::{op, SHUTDOWN_RCV, SHUTDOWN_SEND};
use std::io::{Read, Write};

const GUEST: u64 = 3;

struct H {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    mux: Muxer,
    buf: Vec<u8>,
}

type Pkt = (Header, Vec<u8>);

impl H {
    fn new(active: bool) -> H {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let l = UnixListener::bind(&uds).unwrap();
        let mut mux = Muxer::new(l, &uds, GUEST).unwrap();
        mux.set_active(active);
        H {
            _dir: dir,
            uds,
            mux,
            buf: vec![0u8; packet::MAX_PAYLOAD],
        }
    }

    fn client(&self) -> UnixStream {
        let s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// Host events, then every packet for the guest (RX buffers of `room` bytes).
    fn rx_room(&mut self, room: usize) -> Vec<Pkt> {
        self.mux.process_host_events();
        let mut out = Vec::new();
        while let Some((h, n)) = self.mux.next_rx(&mut self.buf[..room]) {
            assert_eq!(h.len as usize, n);
            assert_eq!(
                (h.src_cid, h.dst_cid, h.type_),
                (HOST_CID, GUEST, packet::TYPE_STREAM)
            );
            out.push((h, self.buf[..n].to_vec()));
            self.mux.process_host_events();
        }
        out
    }

    fn rx(&mut self) -> Vec<Pkt> {
        self.rx_room(4096)
    }

    fn guest(&mut self, op: u16, guest_port: u32, host_port: u32, flags: u32, data: &[u8]) {
        self.guest_credit(op, guest_port, host_port, flags, data, 1 << 20, 0);
    }

    #[allow(clippy::too_many_arguments)]
    fn guest_credit(
        &mut self,
        op: u16,
        guest_port: u32,
        host_port: u32,
        flags: u32,
        data: &[u8],
        buf_alloc: u32,
        fwd_cnt: u32,
    ) {
        let h = Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            len: data.len() as u32,
            type_: packet::TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        };
        let mut bytes = h.encode().to_vec();
        bytes.extend_from_slice(data);
        let (h, op, payload) = packet::parse_packet(&bytes, GUEST).unwrap();
        self.mux.on_guest_packet(&h, op, payload);
        self.mux.process_host_events();
    }

    /// Client connects to guest port `port`; returns (client, host port)
    /// once the guest accepted and "OK" was read.
    fn connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut c = self.client();
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let p = self.rx();
        assert_eq!(p.len(), 1, "{p:?}");
        let req = p[0].0;
        assert_eq!((req.op, req.dst_port), (op::REQUEST, port));
        self.guest(op::RESPONSE, port, req.src_port, 0, b"");
        let line = read_line(&mut c);
        assert_eq!(line, format!("OK {}\n", req.src_port));
        (c, req.src_port)
    }
}

fn read_line(c: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while c.read(&mut b).unwrap() == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

fn read_n(c: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    c.read_exact(&mut v).unwrap();
    v
}

fn assert_eof(c: &mut UnixStream) {
    let mut b = [0u8; 16];
    match c.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("expected EOF, got {:?}", &b[..n]),
        Err(e) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{e}"
        ),
    }
}

fn ops(p: &[Pkt]) -> Vec<u16> {
    p.iter().map(|(h, _)| h.op).collect()
}

#[test]
fn handshake_data_and_pipelined_bytes() {
    let mut h = H::new(true);
    let mut c = h.client();
    c.write_all(b"CONNECT 1024\nearly").unwrap();
    let p = h.rx();
    assert_eq!(ops(&p), [op::REQUEST]);
    let hp = p[0].0.src_port;
    assert_eq!(p[0].0.buf_alloc, BUF_ALLOC);
    h.guest(op::RESPONSE, 1024, hp, 0, b"");
    assert_eq!(read_line(&mut c), format!("OK {hp}\n"));
    // bytes sent right after the line are stream data
    let p = h.rx();
    assert_eq!(ops(&p), [op::RW]);
    assert_eq!(p[0].1, b"early");
    c.write_all(b"hello").unwrap();
    let p = h.rx();
    assert_eq!(
        (p[0].0.op, p[0].0.src_port, p[0].0.dst_port),
        (op::RW, hp, 1024)
    );
    assert_eq!(p[0].1, b"hello");
    h.guest(op::RW, 1024, hp, 0, b"world");
    assert_eq!(read_n(&mut c, 5), b"world");
    // the OK line is not guest data: fwd_cnt counts only "world"
    h.guest(op::CREDIT_REQUEST, 1024, hp, 0, b"");
    let p = h.rx();
    assert_eq!(ops(&p), [op::CREDIT_UPDATE]);
    assert_eq!(p[0].0.fwd_cnt, 5);
}

#[test]
fn connect_held_until_active() {
    let mut h = H::new(false);
    let mut c = h.client();
    c.write_all(b"CONNECT 1024\n").unwrap();
    assert!(h.rx().is_empty());
    assert_eq!(h.mux.len(), 1);
    h.mux.set_active(true);
    let p = h.rx();
    assert_eq!(ops(&p), [op::REQUEST]);
    h.guest(op::RESPONSE, 1024, p[0].0.src_port, 0, b"");
    assert!(read_line(&mut c).starts_with("OK "));
    // a held client that leaves is just forgotten (the guest never knew it)
    h.mux.set_active(false);
    assert_eof(&mut c); // the device went away: established connections close
    let c2 = h.client();
    (&c2).write_all(b"CONNECT 1\n").unwrap();
    assert!(h.rx().is_empty());
    drop(c2);
    assert!(h.rx().is_empty());
    assert_eq!(h.mux.len(), 0);
}

#[test]
fn refused_by_guest_gives_eof_before_ok() {
    let mut h = H::new(true);
    let mut c = h.client();
    c.write_all(b"CONNECT 9999\n").unwrap();
    let p = h.rx();
    h.guest(op::RST, 9999, p[0].0.src_port, 0, b"");
    assert_eof(&mut c);
    assert!(h.rx().is_empty(), "no RST answers an RST");
    assert_eq!(h.mux.len(), 0);
}

#[test]
fn client_leaving_before_answer_resets_guest() {
    let mut h = H::new(true);
    let c = h.client();
    (&c).write_all(b"CONNECT 1024\n").unwrap();
    let p = h.rx();
    let hp = p[0].0.src_port;
    drop(c);
    let p = h.rx();
    assert_eq!(ops(&p), [op::RST]);
    assert_eq!((p[0].0.src_port, p[0].0.dst_port), (hp, 1024));
    // the late RESPONSE gets an RST, nothing panics
    h.guest(op::RESPONSE, 1024, hp, 0, b"");
    assert_eq!(ops(&h.rx()), [op::RST]);
    assert_eq!(h.mux.len(), 0);
}

#[test]
fn garbage_lines_close_only_that_client() {
    let mut h = H::new(true);
    let (mut good, hp) = h.connect(1024);
    for bad in [
        &b"GET / HTTP/1.1\r\n"[..],
        &[b'x'; 100][..],
        b"CONNECT abc\n",
        b"CONNECT 99999999999\n",
    ] {
        let mut c = h.client();
        c.write_all(bad).unwrap();
        assert!(h.rx().is_empty());
        assert_eof(&mut c);
    }
    let mut long = b"CONNECT ".to_vec();
    long.extend([b'1'; 70]);
    let mut c = h.client();
    c.write_all(&long).unwrap();
    h.rx();
    assert_eof(&mut c);
    assert_eq!(h.mux.stats.bad_lines, 5);
    // the good connection still works
    h.guest(op::RW, 1024, hp, 0, b"still");
    assert_eq!(read_n(&mut good, 5), b"still");
}

#[test]
fn slow_connect_line_times_out() {
    let mut h = H::new(true);
    h.mux.line_timeout = Duration::from_millis(200);
    let mut c = h.client();
    c.write_all(b"CONN").unwrap();
    h.rx();
    std::thread::sleep(Duration::from_millis(400));
    h.rx();
    assert_eof(&mut c);
    assert_eq!(h.mux.len(), 0);
}

#[test]
fn half_close_host_to_guest() {
    let mut h = H::new(true);
    let (mut c, hp) = h.connect(1024);
    c.write_all(b"request").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let p = h.rx();
    assert_eq!(ops(&p), [op::RW, op::SHUTDOWN]);
    assert_eq!(p[1].0.flags, SHUTDOWN_SEND, "SEND only: we still receive");
    // the guest answers on the other half
    h.guest(op::RW, 1024, hp, 0, b"response");
    assert_eq!(read_n(&mut c, 8), b"response");
    // guest closes: both directions done, full close
    h.guest(op::SHUTDOWN, 1024, hp, SHUTDOWN_SEND | SHUTDOWN_RCV, b"");
    assert_eof(&mut c);
    assert_eq!(ops(&h.rx()), [op::RST]);
    assert_eq!(h.mux.len(), 0);
}

#[test]
fn half_close_guest_to_host() {
    let mut h = H::new(true);
    let (mut c, hp) = h.connect(1024);
    h.guest(op::RW, 1024, hp, 0, b"all of it");
    h.guest(op::SHUTDOWN, 1024, hp, SHUTDOWN_SEND, b"");
    assert_eq!(read_n(&mut c, 9), b"all of it");
    assert_eof(&mut c); // shutdown(Write) on our side
                        // the other way still works
    c.write_all(b"late reply").unwrap();
    let p = h.rx();
    assert_eq!(ops(&p), [op::RW]);
    assert_eq!(p[0].1, b"late reply");
    // data after SHUTDOWN(SEND) is a protocol violation
    h.guest(op::RW, 1024, hp, 0, b"x");
    assert_eq!(ops(&h.rx()), [op::RST]);
}

#[test]
fn host_full_close_resets_guest() {
    let mut h = H::new(true);
    let (c, hp) = h.connect(1024);
    (&c).write_all(b"bye").unwrap();
    drop(c);
    let p = h.rx();
    assert_eq!(ops(&p), [op::RW, op::RST]);
    assert_eq!(p[0].1, b"bye");
    h.guest(op::RW, 1024, hp, 0, b"too late");
    assert_eq!(ops(&h.rx()), [op::RST]);
}

#[test]
fn guest_credit_stall_and_resume() {
    let mut h = H::new(true);
    let (mut c, hp) = h.connect(1024);
    // the guest has room for 1000 bytes
    h.guest_credit(op::CREDIT_UPDATE, 1024, hp, 0, b"", 1000, 0);
    let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    c.write_all(&data).unwrap();
    let p = h.rx();
    let got: usize = p.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(got, 1000, "{:?}", ops(&p));
    assert_eq!(ops(&p).last(), Some(&op::CREDIT_REQUEST));
    // stalled: nothing more, no busy loop, no repeated CREDIT_REQUEST
    assert!(h.rx().is_empty());
    let mut received: Vec<u8> = p.into_iter().flat_map(|(_, d)| d).collect();
    let mut fwd = 1000;
    while received.len() < data.len() {
        h.guest_credit(op::CREDIT_UPDATE, 1024, hp, 0, b"", 1000, fwd);
        let p = h.rx();
        let chunk: Vec<u8> = p
            .into_iter()
            .filter(|(h, _)| h.op == op::RW)
            .flat_map(|(_, d)| d)
            .collect();
        assert!(!chunk.is_empty() && chunk.len() <= 1000);
        fwd += chunk.len() as u32;
        received.extend(chunk);
    }
    assert_eq!(received, data);
}

#[test]
fn host_backpressure_buffers_then_resumes() {
    let mut h = H::new(true);
    let (mut c, hp) = h.connect(1024);
    // fill our whole advertised buffer while the client does not read
    let chunk = vec![7u8; packet::MAX_PAYLOAD];
    let mut sent = 0usize;
    while sent + chunk.len() <= BUF_ALLOC as usize {
        h.guest(op::RW, 1024, hp, 0, &chunk);
        sent += chunk.len();
    }
    assert!(h.mux.len() == 1, "within credit: still connected");
    // now the client drains everything; EPOLLOUT resumes the writes
    let reader = std::thread::spawn(move || {
        let v = read_n(&mut c, sent);
        (c, v)
    });
    let mut updates = Vec::new();
    for _ in 0..200 {
        updates.extend(h.rx());
        if reader.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (_c, v) = reader.join().unwrap();
    assert!(v.iter().all(|&b| b == 7) && v.len() == sent);
    updates.extend(h.rx());
    // the guest heard about the freed buffer
    let last = updates
        .iter()
        .rev()
        .find(|(h, _)| h.op == op::CREDIT_UPDATE)
        .expect("credit update");
    assert!(
        last.0.fwd_cnt as usize > BUF_ALLOC as usize / 2,
        "{:?}",
        last.0
    );
}

#[test]
fn guest_exceeding_credit_is_reset() {
    let mut h = H::new(true);
    let (c, hp) = h.connect(1024);
    let chunk = vec![1u8; packet::MAX_PAYLOAD];
    let mut reset = false;
    for _ in 0..40 {
        h.guest(op::RW, 1024, hp, 0, &chunk);
        if ops(&h.rx()).contains(&op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset);
    assert_eq!(h.mux.len(), 0);
    drop(c);
}

#[test]
fn guest_initiated_connections() {
    let mut h = H::new(true);
    let l = UnixListener::bind(kata_proto::paths::hybrid_listener_path(&h.uds, 1028)).unwrap();
    h.guest(op::REQUEST, 7000, 1028, 0, b"");
    let p = h.rx();
    assert_eq!(ops(&p), [op::RESPONSE]);
    assert_eq!((p[0].0.src_port, p[0].0.dst_port), (1028, 7000));
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    h.guest(op::RW, 7000, 1028, 0, b"ready");
    assert_eq!(read_n(&mut s, 5), b"ready");
    s.write_all(b"ack").unwrap();
    let p = h.rx();
    assert_eq!(p[0].1, b"ack");
    // nobody at <uds>_1029
    h.guest(op::REQUEST, 7001, 1029, 0, b"");
    let p = h.rx();
    assert_eq!(ops(&p), [op::RST]);
    assert_eq!((p[0].0.src_port, p[0].0.dst_port), (1029, 7001));
    // duplicate REQUEST resets
    h.guest(op::REQUEST, 7000, 1028, 0, b"");
    assert_eq!(ops(&h.rx()), [op::RST]);
    assert_eof(&mut s);
}

#[test]
fn stray_packets() {
    let mut h = H::new(true);
    h.guest(op::RW, 5, 6, 0, b"x");
    assert_eq!(ops(&h.rx()), [op::RST]);
    h.guest(op::RST, 5, 6, 0, b"");
    h.guest(op::CREDIT_UPDATE, 5, 6, 0, b"");
    assert_eq!(ops(&h.rx()), [op::RST]);
    // bounded: a flood of stray packets does not grow memory without bound
    for i in 0..5000 {
        h.guest(op::RW, i, 6, 0, b"");
    }
    assert_eq!(h.rx().len(), MAX_ORPHAN_RST);
}

#[test]
fn small_rx_buffers_and_header_only_room() {
    let mut h = H::new(true);
    let (mut c, _) = h.connect(1024);
    c.write_all(&[9u8; 100]).unwrap();
    // room for no payload at all: nothing is read, nothing lost
    h.mux.process_host_events();
    assert!(h.mux.next_rx(&mut []).is_none());
    let p = h.rx_room(30);
    assert_eq!(
        p.iter().map(|(_, d)| d.len()).collect::<Vec<_>>(),
        [30, 30, 30, 10]
    );
}

#[test]
fn many_concurrent_connections() {
    let mut h = H::new(true);
    let mut clients = Vec::new();
    for i in 0..150u32 {
        let c = h.client();
        (&c).write_all(format!("CONNECT {}\n", 2000 + i).as_bytes())
            .unwrap();
        clients.push(c);
    }
    let p = h.rx();
    assert_eq!(p.len(), 150);
    let mut ports = HashMap::new();
    for (hdr, _) in &p {
        assert_eq!(hdr.op, op::REQUEST);
        ports.insert(hdr.dst_port, hdr.src_port);
        h.guest(op::RESPONSE, hdr.dst_port, hdr.src_port, 0, b"");
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let hp = ports[&(2000 + i as u32)];
        assert_eq!(read_line(c), format!("OK {hp}\n"));
        c.write_all(format!("msg{i}").as_bytes()).unwrap();
    }
    let p = h.rx();
    assert_eq!(p.len(), 150);
    for (hdr, d) in p {
        let i = hdr.dst_port - 2000;
        assert_eq!(d, format!("msg{i}").as_bytes());
        h.guest(
            op::RW,
            hdr.dst_port,
            hdr.src_port,
            0,
            format!("re{i}").as_bytes(),
        );
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let want = format!("re{i}");
        assert_eq!(read_n(c, want.len()), want.as_bytes());
    }
    assert_eq!(h.mux.len(), 150);
    let _ = SHUTDOWN_RCV;
}

/// Resident memory of this process, in bytes.
fn rss() -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: usize = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Bytes waiting in a socket's receive queue (what the kernel holds for it).
fn queued(s: &UnixStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0);
    n as usize
}

/// A hostile guest opens 2,000 connections to a host port whose listener
/// accepts them but never reads, and sends each as much as its credit
/// allows. The backend keeps at most MAX_GUEST_CONNS of them, refuses the
/// rest with RST (counted), holds at most MAX_BUFFERED bytes for them (and
/// the kernel at most 2 x GUEST_CONN_SNDBUF per connection), and host <->
/// guest streams still work afterwards.
#[test]
fn hostile_guest_connection_flood_is_capped() {
    const FLOOD: u32 = 2000;
    let mut h = H::new(true);
    let lpath = kata_proto::paths::hybrid_listener_path(&h.uds, 1028);
    let l = UnixListener::bind(&lpath).unwrap();
    l.set_nonblocking(true).unwrap();
    let rss0 = rss();
    let mut accepted = Vec::new();
    let (mut ok, mut refused) = (Vec::new(), 0u32);
    for i in 0..FLOOD {
        let port = 10_000 + i;
        h.guest(op::REQUEST, port, 1028, 0, b"");
        for (hdr, _) in h.rx() {
            match hdr.op {
                op::RESPONSE => ok.push(hdr.dst_port),
                op::RST => refused += 1,
                o => panic!("unexpected op {o}"),
            }
        }
        while let Ok((s, _)) = l.accept() {
            accepted.push(s);
        }
    }
    assert_eq!(
        ok.len(),
        MAX_GUEST_CONNS,
        "the per-VM cap on guest connections"
    );
    assert_eq!(refused, FLOOD - MAX_GUEST_CONNS as u32);
    assert_eq!(h.mux.stats.refused_guest_conns, u64::from(refused));
    assert_eq!(h.mux.usage().guest_conns, MAX_GUEST_CONNS);

    // each kept connection gets its whole credit, nobody reads on the host
    let chunk = vec![0x5au8; packet::MAX_PAYLOAD];
    for &port in &ok {
        for _ in 0..BUF_ALLOC as usize / chunk.len() {
            h.guest(op::RW, port, 1028, 0, &chunk);
        }
        h.rx();
        assert!(
            h.mux.usage().buffered <= MAX_BUFFERED,
            "{:?}",
            h.mux.usage()
        );
    }
    let resets = h.mux.stats.buffer_resets;
    let usage = h.mux.usage();
    let kernel: usize = accepted.iter().map(queued).sum();
    let rss_delta = rss().saturating_sub(rss0);
    eprintln!(
        "{FLOOD} guest connections: {} kept, {refused} refused, {resets} reset at the byte cap; \
         held: {} KiB in the backend (peak {} KiB), {} KiB in kernel socket queues; RSS +{} KiB",
        ok.len(),
        usage.buffered >> 10,
        usage.buffered_peak >> 10,
        kernel >> 10,
        rss_delta >> 10
    );
    assert!(usage.buffered_peak <= MAX_BUFFERED, "{usage:?}");
    assert!(resets > 0, "the byte cap was reached and counted");
    assert!(
        kernel <= MAX_GUEST_CONNS * 2 * GUEST_CONN_SNDBUF,
        "kernel-held bytes {kernel}"
    );
    // the old backend held ~256 KiB per connection for all 2,000: ~500 MiB
    assert!(rss_delta < 64 << 20, "RSS grew by {rss_delta} bytes");

    // the pod still works: a host-initiated stream both ways ...
    let (mut c, hp) = h.connect(1024);
    c.write_all(b"ping").unwrap();
    let p = h.rx();
    assert_eq!((ops(&p), p[0].1.as_slice()), (vec![op::RW], &b"ping"[..]));
    h.guest(op::RW, 1024, hp, 0, b"pong");
    assert_eq!(read_n(&mut c, 4), b"pong");
    // ... and once the host closes the flood's sockets, guest connections again
    drop(accepted);
    h.rx();
    assert_eq!(h.mux.usage().guest_conns, 0, "{:?}", h.mux.usage());
    assert_eq!(h.mux.usage().buffered, 0);
    h.guest(op::REQUEST, 9, 1028, 0, b"");
    assert_eq!(ops(&h.rx()), [op::RESPONSE]);
    let (mut s, _) = loop {
        if let Ok(x) = l.accept() {
            break x;
        }
    };
    s.set_nonblocking(false).unwrap();
    h.guest(op::RW, 9, 1028, 0, b"hello");
    assert_eq!(read_n(&mut s, 5), b"hello");
}
