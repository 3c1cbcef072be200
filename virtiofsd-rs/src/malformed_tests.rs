//! Bad input through the whole request path (Server + guard + passthrough on
//! a temporary directory, `/dev/fuse`-style buffers, replies into a pipe):
//! short headers, wrong lengths, unknown opcodes, huge sizes, random bytes.
//! Each gets an error reply or is dropped; nothing panics; the counters say so.

use fuse_backend_rs::abi::fuse_abi::{GetxattrIn, ReadIn};
use vm_memory::ByteValued;

use crate::harness::{message, Harness};

#[test]
fn malformed_requests_get_errors_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"data").unwrap();
    let mut h = Harness::new(dir.path()).unwrap();
    // a good LOOKUP first
    assert_eq!(h.send(&message(1, 1, b"f\0")), Some(0));

    // short header: dropped
    assert_eq!(h.send(&[1, 2, 3, 4, 5]), None);
    // header length far beyond the maximum
    let mut m = message(1, 1, b"f\0");
    m[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(h.send(&m), Some(-libc::ENOMEM));
    // unknown opcode
    assert_eq!(h.send(&message(9999, 1, b"")), Some(-libc::ENOSYS));
    // LOOKUP of a name without its NUL, of "a/b", of ".." at the root
    assert_eq!(h.send(&message(1, 1, b"f")), Some(-libc::EINVAL));
    assert_eq!(h.send(&message(1, 1, b"a/../f\0")), Some(-libc::EINVAL));
    assert_ne!(h.send(&message(1, 1, b"..\0")), None);
    // an inode number the daemon never gave out
    assert_eq!(
        h.send(&message(3, 0xdead_beef, &[0u8; 16])),
        Some(-libc::EBADF)
    );
    // READ of a handle that does not exist, with a huge size
    let read = ReadIn {
        fh: 12345,
        size: u32::MAX,
        ..Default::default()
    };
    assert!(h.send(&message(15, 1, read.as_slice())).unwrap_or(-1) < 0);
    // GETXATTR asking for 4 GiB of buffer: capped, answered
    let mut gx = GetxattrIn {
        size: u32::MAX,
        padding: 0,
    }
    .as_slice()
    .to_vec();
    gx.extend_from_slice(b"user.nothing\0");
    assert_eq!(h.send(&message(22, 1, &gx)), Some(-libc::ENODATA));
    // a body shorter than the opcode's fixed part
    assert_ne!(h.send(&message(15, 1, &[0u8; 3])), Some(0));

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
        let mut m = message(opcode, nodeid, &body);
        if i % 7 == 0 {
            // a header length that lies
            let bad = (next() % 400) as u32;
            m[0..4].copy_from_slice(&bad.to_le_bytes());
        }
        let _ = h.send(&m);
    }
    // still serving
    assert_eq!(h.send(&message(1, 1, b"f\0")), Some(0));
    let s = h.metrics.snapshot();
    assert!(s.malformed >= 1, "{s:?}");
    let lookup = s.ops.iter().find(|o| o.op == "LOOKUP").unwrap();
    assert!(lookup.errors >= 2);
}
