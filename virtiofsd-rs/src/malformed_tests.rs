//! Bad input through the whole request path (Server + guard + passthrough on
//! a temporary directory, `/dev/fuse`-style buffers, replies into a pipe):
//! short headers, wrong lengths, unknown opcodes, huge sizes, random bytes.
//! Each gets an error reply or is dropped; nothing panics; the counters say so.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{GetxattrIn, InHeader, InitIn, OutHeader, ReadIn};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::Config;
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader};
use vm_memory::ByteValued;

use crate::fs::{GuardedFs, Policy};
use crate::metrics::Metrics;

struct Harness {
    server: Server<Arc<GuardedFs>>,
    metrics: Arc<Metrics>,
    rx: File,
    tx: File,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"data").unwrap();
        let metrics = Arc::new(Metrics::default());
        let cfg = Config {
            root_dir: std::fs::canonicalize(dir.path())
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            do_import: true,
            ..Default::default()
        };
        let policy = Policy {
            xattr: true,
            ..Default::default()
        };
        let fs = Arc::new(GuardedFs::new(cfg, policy, metrics.clone()).unwrap());
        let (rx, tx) = nix::unistd::pipe().unwrap();
        let mut h = Harness {
            server: Server::new(fs),
            metrics,
            rx: File::from(rx),
            tx: File::from(tx),
            _dir: dir,
        };
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0,
            flags: 0,
        };
        let r = h.send(&msg(26, 1, init.as_slice()));
        assert_eq!(r, Some(0), "INIT");
        h
    }

    /// Sends raw bytes as one request; the reply's error (0 = ok), if any.
    fn send(&mut self, bytes: &[u8]) -> Option<i32> {
        let mut inbuf = bytes.to_vec();
        let mut outbuf = vec![0u8; 1 << 20];
        let reader = Reader::<()>::from_fuse_buffer(FuseBuf::new(&mut inbuf)).unwrap();
        let writer = FuseDevWriter::<()>::new(self.tx.as_raw_fd(), &mut outbuf).unwrap();
        let res =
            self.server
                .handle_message(reader, writer.into(), None, Some(&self.metrics.hook()));
        self.metrics.finish(res.is_err());
        // a reply, if one was written, is waiting in the pipe
        nix::fcntl::fcntl(
            &self.rx,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        let mut reply = vec![0u8; 1 << 20];
        match self.rx.read(&mut reply) {
            Ok(n) if n >= std::mem::size_of::<OutHeader>() => {
                let oh = OutHeader::from_slice(&reply[..std::mem::size_of::<OutHeader>()]).unwrap();
                assert_eq!(oh.len as usize, n, "reply length");
                Some(oh.error)
            }
            _ => None,
        }
    }
}

fn msg(opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let h = InHeader {
        len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
        opcode,
        unique: 7,
        nodeid,
        ..Default::default()
    };
    let mut v = h.as_slice().to_vec();
    v.extend_from_slice(body);
    v
}

#[test]
fn malformed_requests_get_errors_never_panics() {
    let mut h = Harness::new();
    // a good LOOKUP first
    assert_eq!(h.send(&msg(1, 1, b"f\0")), Some(0));

    // short header: dropped
    assert_eq!(h.send(&[1, 2, 3, 4, 5]), None);
    // header length far beyond the maximum
    let mut m = msg(1, 1, b"f\0");
    m[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(h.send(&m), Some(-libc::ENOMEM));
    // unknown opcode
    assert_eq!(h.send(&msg(9999, 1, b"")), Some(-libc::ENOSYS));
    // LOOKUP of a name without its NUL, of "a/b", of ".." at the root
    assert_eq!(h.send(&msg(1, 1, b"f")), Some(-libc::EINVAL));
    assert_eq!(h.send(&msg(1, 1, b"a/../f\0")), Some(-libc::EINVAL));
    assert_ne!(h.send(&msg(1, 1, b"..\0")), None);
    // an inode number the daemon never gave out
    assert_eq!(h.send(&msg(3, 0xdead_beef, &[0u8; 16])), Some(-libc::EBADF));
    // READ of a handle that does not exist, with a huge size
    let read = ReadIn {
        fh: 12345,
        size: u32::MAX,
        ..Default::default()
    };
    assert!(h.send(&msg(15, 1, read.as_slice())).unwrap_or(-1) < 0);
    // GETXATTR asking for 4 GiB of buffer: capped, answered
    let mut gx = GetxattrIn {
        size: u32::MAX,
        padding: 0,
    }
    .as_slice()
    .to_vec();
    gx.extend_from_slice(b"user.nothing\0");
    assert_eq!(h.send(&msg(22, 1, &gx)), Some(-libc::ENODATA));
    // a body shorter than the opcode's fixed part
    assert_ne!(h.send(&msg(15, 1, &[0u8; 3])), Some(0));

    // random bytes with valid and invalid opcodes
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..3000 {
        let len = (next() % 200) as usize;
        let body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // not FORGET/INIT/DESTROY (they only reset state), nor what would
        // move or remove the file checked at the end
        let opcode = match (next() % 60) as u32 {
            2 | 4 | 10 | 11 | 12 | 26 | 38 | 42 | 45 => 1,
            o => o,
        };
        let nodeid = if i % 2 == 0 { 1 } else { next() % 8 };
        let mut m = msg(opcode, nodeid, &body);
        if i % 7 == 0 {
            // a header length that lies
            let bad = (next() % 400) as u32;
            m[0..4].copy_from_slice(&bad.to_le_bytes());
        }
        let _ = h.send(&m);
    }
    // still serving
    assert_eq!(h.send(&msg(1, 1, b"f\0")), Some(0));
    let s = h.metrics.snapshot();
    assert!(s.malformed >= 1, "{s:?}");
    let lookup = s.ops.iter().find(|o| o.op == "LOOKUP").unwrap();
    assert!(lookup.errors >= 2);
}
