//! Backend lifecycle without QEMU.

use super::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn cfg(dir: &Path) -> VsockConfig {
    VsockConfig {
        vhost_socket: dir.join("vhost.sock"),
        uds_path: dir.join("vsock.sock"),
        guest_cid: 3,
    }
}

#[test]
fn start_hold_and_shutdown_without_frontend() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path());
    // a stale socket file is replaced
    drop(std::os::unix::net::UnixListener::bind(&c.uds_path).unwrap());
    let b = VsockBackend::start(c.clone()).unwrap();
    assert!(!b.is_active());
    assert!(c.vhost_socket.exists() && c.uds_path.exists());
    // the host sockets are served before QEMU connects: a CONNECT is held
    let mut s = UnixStream::connect(&c.uds_path).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 8];
    let e = s.read(&mut buf).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "held, not refused");
    // garbage is closed at once
    let mut g = UnixStream::connect(&c.uds_path).unwrap();
    g.write_all(b"HELLO\n").unwrap();
    g.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(g.read(&mut buf).unwrap_or(0), 0);
    let t = Instant::now();
    b.shutdown();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(!c.vhost_socket.exists() && !c.uds_path.exists());
    // the held client sees the end
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
}

#[test]
fn frontend_that_leaves_does_not_kill_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path());
    let b = VsockBackend::start(c.clone()).unwrap();
    for _ in 0..3 {
        // connect and hang up like a crashed QEMU; the backend accepts again
        drop(UnixStream::connect(&c.vhost_socket).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    let _frontend = UnixStream::connect(&c.vhost_socket).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(!b.is_active());
    let t = Instant::now();
    drop(b); // with a frontend connected: must not hang either
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(!c.uds_path.exists());
}

#[test]
fn errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    std::fs::write(&c.uds_path, b"not a socket").unwrap();
    let e = VsockBackend::start(c.clone()).unwrap_err().to_string();
    assert!(
        e.contains("vsock.sock") && e.contains("not a socket"),
        "{e}"
    );
    c.uds_path = dir.path().join("missing/dir/v.sock");
    let e = VsockBackend::start(c.clone()).unwrap_err().to_string();
    assert!(e.contains("missing/dir/v.sock"), "{e}");
    c.guest_cid = 2;
    assert!(matches!(
        VsockBackend::start(c),
        Err(VsockError::InvalidCid(2))
    ));
}
