//! virtio-vsock packet headers and the hybrid vsock `CONNECT <port>\n` line.
//!
//! Everything here is pure (no I/O, no guest memory), so it can be fuzzed:
//! [`parse_packet`] and [`parse_connect_line`] accept any bytes and never panic.

/// Size of `struct virtio_vsock_hdr` (packed, little endian).
pub const HDR_LEN: usize = 44;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type we offer.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload we accept from (or send to) the guest in one packet
/// (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Operation codes.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Reset / refused.
    pub const RST: u16 = 3;
    /// Half or full close (flags: [`super::SHUTDOWN_RCV`], [`super::SHUTDOWN_SEND`]).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Credit information only.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the peer for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// A decoded `virtio_vsock_hdr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Header {
    /// Decodes the first [`HDR_LEN`] bytes; `None` if `b` is shorter.
    pub fn decode(b: &[u8]) -> Option<Header> {
        let b = b.get(..HDR_LEN)?;
        Some(Header {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        })
    }

    /// Encodes to the wire format.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A validated guest packet operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Connect to host port `dst_port`.
    Request,
    /// Accepts our request.
    Response,
    /// Reset.
    Rst,
    /// The guest will receive (`rcv`) / send (`send`) no more.
    Shutdown {
        /// `VIRTIO_VSOCK_SHUTDOWN_RCV`.
        rcv: bool,
        /// `VIRTIO_VSOCK_SHUTDOWN_SEND`.
        send: bool,
    },
    /// Data (`len` bytes).
    Rw,
    /// Credit information.
    CreditUpdate,
    /// Asks for our credit.
    CreditRequest,
}

/// Why a guest packet was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Fewer than [`HDR_LEN`] readable bytes.
    Short(usize),
    /// The source CID is not the guest's (answered by silence).
    SrcCid(u64),
    /// The destination CID is not the host's (answered by silence).
    DstCid(u64),
    /// Not a stream socket (answered by RST).
    Type(u16),
    /// Unknown operation (answered by RST).
    Op(u16),
    /// `len` exceeds [`MAX_PAYLOAD`] or the bytes present in the chain
    /// (answered by RST).
    Len {
        /// The header's `len`.
        len: u32,
        /// Payload bytes present.
        avail: usize,
    },
}

impl Reject {
    /// Whether the peer should get an RST (the addressing is ours, the
    /// content is not acceptable).
    pub fn wants_rst(&self) -> bool {
        matches!(self, Reject::Type(_) | Reject::Op(_) | Reject::Len { .. })
    }
}

/// Validates a header coming from the guest. `avail` is the number of payload
/// bytes present after the header in the descriptor chain.
pub fn validate(h: &Header, guest_cid: u64, avail: usize) -> Result<Op, Reject> {
    if h.src_cid != guest_cid {
        return Err(Reject::SrcCid(h.src_cid));
    }
    if h.dst_cid != HOST_CID {
        return Err(Reject::DstCid(h.dst_cid));
    }
    if h.type_ != TYPE_STREAM {
        return Err(Reject::Type(h.type_));
    }
    let op = match h.op {
        op::REQUEST => Op::Request,
        op::RESPONSE => Op::Response,
        op::RST => Op::Rst,
        op::SHUTDOWN => Op::Shutdown {
            rcv: h.flags & SHUTDOWN_RCV != 0,
            send: h.flags & SHUTDOWN_SEND != 0,
        },
        op::RW => Op::Rw,
        op::CREDIT_UPDATE => Op::CreditUpdate,
        op::CREDIT_REQUEST => Op::CreditRequest,
        other => return Err(Reject::Op(other)),
    };
    if op == Op::Rw && (h.len as usize > MAX_PAYLOAD || h.len as usize > avail) {
        return Err(Reject::Len { len: h.len, avail });
    }
    Ok(op)
}

/// Parses one guest packet from the bytes of a TX descriptor chain (header
/// then payload). Returns the header, the operation and the payload (empty
/// unless `Rw`). Pure and total: any input gives `Ok` or `Err`, never a panic.
pub fn parse_packet(bytes: &[u8], guest_cid: u64) -> Result<(Header, Op, &[u8]), Reject> {
    let h = Header::decode(bytes).ok_or(Reject::Short(bytes.len()))?;
    let rest = &bytes[HDR_LEN..];
    let op = validate(&h, guest_cid, rest.len())?;
    let payload = if op == Op::Rw {
        &rest[..h.len as usize]
    } else {
        &[]
    };
    Ok((h, op, payload))
}

/// Longest `CONNECT <port>\n` line a host client may send.
pub const MAX_CONNECT_LINE: usize = 64;

/// Why a `CONNECT` line was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineError {
    /// Does not start with `CONNECT `.
    Verb,
    /// The port is missing, not decimal, or too large for a u32.
    Port,
    /// No newline within [`MAX_CONNECT_LINE`] bytes.
    TooLong,
}

/// Parses the start of what a host client sent. `Ok(None)`: incomplete, read
/// more; `Ok(Some((port, n)))`: the line is the first `n` bytes (newline
/// included; whatever follows is stream data). Accepts an optional `\r`
/// before the newline. Pure and total.
pub fn parse_connect_line(buf: &[u8]) -> Result<Option<(u32, usize)>, LineError> {
    const VERB: &[u8] = b"CONNECT ";
    let head = &buf[..buf.len().min(VERB.len())];
    if !VERB.starts_with(head) {
        return Err(LineError::Verb);
    }
    let Some(nl) = buf.iter().take(MAX_CONNECT_LINE).position(|&b| b == b'\n') else {
        if buf.len() >= MAX_CONNECT_LINE {
            return Err(LineError::TooLong);
        }
        // Fail early on a bad character in what we have so far.
        if buf.len() > VERB.len() {
            let so_far = &buf[VERB.len()..];
            let ok = so_far
                .iter()
                .enumerate()
                .all(|(i, &b)| b.is_ascii_digit() || (b == b'\r' && i + 1 == so_far.len()));
            if !ok || so_far.len() > 11 {
                return Err(LineError::Port);
            }
        }
        return Ok(None);
    };
    if nl < VERB.len() {
        return Err(LineError::Verb);
    }
    let mut digits = &buf[VERB.len()..nl];
    if let Some(d) = digits.strip_suffix(b"\r") {
        digits = d;
    }
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(LineError::Port);
    }
    let port = digits
        .iter()
        .try_fold(0u64, |acc, &d| Some(acc * 10 + u64::from(d - b'0')))
        .and_then(|p| u32::try_from(p).ok())
        .ok_or(LineError::Port)?;
    Ok(Some((port, nl + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiny deterministic PRNG (xorshift) so the fuzz-like tests need no crate.
    pub(crate) struct Rng(u64);
    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Rng(seed | 1)
        }
        pub(crate) fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn hdr(op: u16, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 1028,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1 << 18,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_roundtrip() {
        let h = Header {
            flags: 3,
            ..hdr(op::SHUTDOWN, 0)
        };
        assert_eq!(Header::decode(&h.encode()), Some(h));
        assert_eq!(Header::decode(&[0u8; HDR_LEN - 1]), None);
        // field offsets as in the virtio spec
        let b = h.encode();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &op::SHUTDOWN.to_le_bytes());
    }

    #[test]
    fn packet_validation() {
        let mut bytes = hdr(op::RW, 5).encode().to_vec();
        bytes.extend_from_slice(b"helloEXTRA");
        let (h, op, payload) = parse_packet(&bytes, 3).unwrap();
        assert_eq!((h.len, op, payload), (5, Op::Rw, &b"hello"[..]));

        assert_eq!(parse_packet(&bytes[..10], 3), Err(Reject::Short(10)));
        assert_eq!(parse_packet(&bytes, 4), Err(Reject::SrcCid(3)));
        let h = Header {
            dst_cid: 9,
            ..hdr(op::RW, 0)
        };
        assert_eq!(parse_packet(&h.encode(), 3), Err(Reject::DstCid(9)));
        let h = Header {
            type_: 2,
            ..hdr(op::RW, 0)
        };
        assert_eq!(parse_packet(&h.encode(), 3), Err(Reject::Type(2)));
        assert_eq!(parse_packet(&hdr(99, 0).encode(), 3), Err(Reject::Op(99)));
        assert_eq!(
            parse_packet(&hdr(op::RW, 6).encode(), 3),
            Err(Reject::Len { len: 6, avail: 0 })
        );
        let mut big = hdr(op::RW, MAX_PAYLOAD as u32 + 1).encode().to_vec();
        big.resize(HDR_LEN + MAX_PAYLOAD + 1, 0);
        assert!(matches!(parse_packet(&big, 3), Err(Reject::Len { .. })));
        // non-RW ops ignore len and carry no payload
        let req = hdr(op::REQUEST, 1000).encode();
        let (_, op, payload) = parse_packet(&req, 3).unwrap();
        assert_eq!((op, payload.len()), (Op::Request, 0));
        let h = Header {
            flags: SHUTDOWN_SEND,
            ..hdr(op::SHUTDOWN, 0)
        };
        assert_eq!(
            parse_packet(&h.encode(), 3).unwrap().1,
            Op::Shutdown {
                rcv: false,
                send: true
            }
        );
        assert!(Reject::Op(1).wants_rst() && !Reject::DstCid(1).wants_rst());
    }

    #[test]
    fn packet_fuzz_never_panics() {
        let mut rng = Rng::new(0x5eed);
        for i in 0..20_000 {
            let n = (rng.next() % 200) as usize;
            let mut b = rng.bytes(n);
            // bias towards plausible headers so the deeper checks run too
            if i % 2 == 0 && b.len() >= HDR_LEN {
                b[0..8].copy_from_slice(&3u64.to_le_bytes());
                b[8..16].copy_from_slice(&2u64.to_le_bytes());
                b[28..30].copy_from_slice(&1u16.to_le_bytes());
                b[30] %= 9;
                b[31] = 0;
                b[24..28].copy_from_slice(&((rng.next() % 300) as u32).to_le_bytes());
            }
            if let Ok((h, op, payload)) = parse_packet(&b, 3) {
                if op == Op::Rw {
                    assert_eq!(payload.len(), h.len as usize);
                } else {
                    assert!(payload.is_empty());
                }
            }
        }
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1024\n"), Ok(Some((1024, 13))));
        assert_eq!(
            parse_connect_line(b"CONNECT 1024\r\nxyz"),
            Ok(Some((1024, 14)))
        );
        assert_eq!(
            parse_connect_line(b"CONNECT 4294967295\n"),
            Ok(Some((u32::MAX, 19)))
        );
        assert_eq!(
            parse_connect_line(b"CONNECT 4294967296\n"),
            Err(LineError::Port)
        );
        assert_eq!(parse_connect_line(b""), Ok(None));
        assert_eq!(parse_connect_line(b"CONN"), Ok(None));
        assert_eq!(parse_connect_line(b"CONNECT 10"), Ok(None));
        assert_eq!(parse_connect_line(b"CONNECT 10\r"), Ok(None));
        assert_eq!(
            parse_connect_line(b"GET / HTTP/1.1\r\n"),
            Err(LineError::Verb)
        );
        assert_eq!(parse_connect_line(b"connect 1\n"), Err(LineError::Verb));
        assert_eq!(parse_connect_line(b"CONNECT\n"), Err(LineError::Verb));
        assert_eq!(parse_connect_line(b"CONNECT \n"), Err(LineError::Port));
        assert_eq!(parse_connect_line(b"CONNECT -1\n"), Err(LineError::Port));
        assert_eq!(parse_connect_line(b"CONNECT 1 2\n"), Err(LineError::Port));
        assert_eq!(parse_connect_line(b"CONNECT 12x"), Err(LineError::Port));
        assert_eq!(
            parse_connect_line(b"CONNECT 000000000001"),
            Err(LineError::Port)
        );
        assert_eq!(parse_connect_line(&[b'C'; 100]), Err(LineError::Verb));
        let mut long = b"CONNECT ".to_vec();
        long.resize(MAX_CONNECT_LINE, b'1');
        assert!(parse_connect_line(&long).is_err());
    }

    #[test]
    fn connect_line_fuzz_never_panics() {
        let mut rng = Rng::new(42);
        for i in 0..20_000 {
            let n = (rng.next() % 80) as usize;
            let mut b = rng.bytes(n);
            if i % 2 == 0 {
                let mut v = b"CONNECT ".to_vec();
                v.extend(
                    b.iter()
                        .map(|x| if x % 3 == 0 { b'\n' } else { b'0' + x % 10 }),
                );
                b = v;
            }
            if let Ok(Some((_, used))) = parse_connect_line(&b) {
                assert!(used <= b.len() && used <= MAX_CONNECT_LINE && b[used - 1] == b'\n');
            }
        }
    }
}
