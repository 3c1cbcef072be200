//! kata-virtiofsd's handling of what the guest puts in the virtio-fs queue:
//! raw FUSE requests through the real server, policy guard and passthrough
//! filesystem over a scratch directory. Each input is split into requests
//! (a length byte pair before each); none may panic, and the daemon must still
//! answer a good LOOKUP afterwards.
#![no_main]

use std::sync::{Mutex, OnceLock};

use kata_virtiofsd::harness::{message, Harness};
use libfuzzer_sys::fuzz_target;

struct Ctx {
    h: Harness,
    _dir: std::path::PathBuf,
}

fn ctx() -> &'static Mutex<Ctx> {
    static C: OnceLock<Mutex<Ctx>> = OnceLock::new();
    C.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kata-fuzz-fuse-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("d")).unwrap();
        std::fs::write(dir.join("f"), b"data").unwrap();
        let h = Harness::new(&dir).expect("harness");
        Mutex::new(Ctx { h, _dir: dir })
    })
}

fuzz_target!(|data: &[u8]| {
    let mut c = ctx().lock().unwrap_or_else(|e| e.into_inner());
    let mut rest = data;
    while rest.len() >= 2 {
        let n = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let body = &rest[2..];
        let take = n.min(body.len());
        let _ = c.h.send(&body[..take]);
        rest = &body[take..];
    }
    assert_eq!(c.h.send(&message(1, 1, b"f\0")), Some(0), "the daemon still answers");
});
