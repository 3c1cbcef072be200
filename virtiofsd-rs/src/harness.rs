//! The whole request path without a transport: the FUSE server, the policy
//! guard and the passthrough filesystem over a directory, fed raw request
//! bytes, replies read back from a pipe. For the malformed-input tests and the
//! fuzz target (`make fuzz`).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{InHeader, InitIn, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::Config;
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader};
use vm_memory::ByteValued;

use crate::fs::{GuardedFs, Policy};
use crate::metrics::Metrics;

/// The largest reply read back.
const REPLY_MAX: usize = 1 << 20;

/// A server over `dir`, initialised (FUSE INIT done).
pub struct Harness {
    server: Server<Arc<GuardedFs>>,
    /// The filesystem (guard + passthrough), for its counts.
    pub fs: Arc<GuardedFs>,
    /// The daemon's counters.
    pub metrics: Arc<Metrics>,
    rx: File,
    tx: File,
}

impl Harness {
    /// Serves `dir` (xattrs on, the default policy otherwise).
    pub fn new(dir: &Path) -> std::io::Result<Harness> {
        Harness::with_policy(
            dir,
            Policy {
                xattr: true,
                ..Default::default()
            },
        )
    }

    /// Serves `dir` with `policy`.
    pub fn with_policy(dir: &Path, policy: Policy) -> std::io::Result<Harness> {
        let metrics = Arc::new(Metrics::default());
        let cfg = Config {
            root_dir: std::fs::canonicalize(dir)?.to_string_lossy().into_owned(),
            do_import: true,
            ..Default::default()
        };
        let fs = Arc::new(GuardedFs::new(cfg, policy, metrics.clone())?);
        let (rx, tx) = nix::unistd::pipe()?;
        nix::fcntl::fcntl(
            &rx,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        let mut h = Harness {
            server: Server::new(fs.clone()),
            fs,
            metrics,
            rx: File::from(rx),
            tx: File::from(tx),
        };
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0,
            flags: 0,
        };
        if h.send(&message(26, 1, init.as_slice())) != Some(0) {
            return Err(std::io::Error::other("FUSE INIT was refused"));
        }
        Ok(h)
    }

    /// Sends raw bytes as one request; the reply's error (0 = ok), if a reply
    /// was written.
    pub fn send(&mut self, bytes: &[u8]) -> Option<i32> {
        self.request(bytes).map(|(e, _)| e)
    }

    /// Sends raw bytes as one request; the reply's error (0 = ok) and body
    /// (what follows the out header), if a reply was written.
    pub fn request(&mut self, bytes: &[u8]) -> Option<(i32, Vec<u8>)> {
        let mut inbuf = bytes.to_vec();
        let mut outbuf = vec![0u8; REPLY_MAX];
        let reader = Reader::<()>::from_fuse_buffer(FuseBuf::new(&mut inbuf)).ok()?;
        let writer = FuseDevWriter::<()>::new(self.tx.as_raw_fd(), &mut outbuf).ok()?;
        let res =
            self.server
                .handle_message(reader, writer.into(), None, Some(&self.metrics.hook()));
        self.metrics.finish(res.is_err());
        let mut reply = vec![0u8; REPLY_MAX];
        match self.rx.read(&mut reply) {
            Ok(n) if n >= std::mem::size_of::<OutHeader>() => {
                let hl = std::mem::size_of::<OutHeader>();
                let oh = OutHeader::from_slice(&reply[..hl])?;
                assert_eq!(oh.len as usize, n, "a reply's length is what was written");
                Some((oh.error, reply[hl..n].to_vec()))
            }
            _ => None,
        }
    }
}

/// A request: header for `opcode` on `nodeid`, then `body`.
pub fn message(opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
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
