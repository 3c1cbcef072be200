//! The daemon as QEMU sees it: a vhost-user frontend written here (vhost's
//! `Frontend`) connects to a real `kata-virtiofsd --socket-path`, shares a
//! memfd as guest memory, lays out the request queue as a guest driver would
//! (virtio-queue's mock split queue) and sends FUSE INIT. Then the guest
//! turns hostile and writes a garbage available index: the daemon must exit
//! with an error (3) and remove its sockets, not hang with a dead vring
//! thread. No VM is started. Needs root (the server's namespace sandbox).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{InHeader, InitIn, OutHeader};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 4 << 20;
const SIZE: u16 = 16;
const REQ: u64 = 0x10_0000;
const REPLY: u64 = 0x20_0000;

/// Kills the one daemon this test started, whatever happens.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn memfd() -> File {
    let name = c"guest-ram";
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a new fd nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(MEM as u64).unwrap();
    f
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_garbage_available_index_ends_the_daemon_with_an_error() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let sock = tmp.path().join("vhost.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_kata-virtiofsd"))
        .arg("--socket-path")
        .arg(&sock)
        .arg("--shared-dir")
        .arg(&shared)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut d = Daemon(child);
    let mut line = String::new();
    BufReader::new(d.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "READY");

    // guest memory: a memfd, mapped here and by the daemon
    let ram = memfd();
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(ram.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    let q = MockSplitQueue::new(&mem, SIZE);

    // the frontend's side of the handshake, as QEMU's vhost-user-fs does it
    let mut fe = Frontend::connect(&sock, 2).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    let want = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << 30); // PROTOCOL_FEATURES
    assert_eq!(features & want, want);
    fe.set_features(want).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf & VhostUserProtocolFeatures::MQ)
        .unwrap();
    // guest physical = frontend virtual address here: the table maps 1:1
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: 0,
        mmap_offset: 0,
        mmap_handle: ram.as_raw_fd(),
    }])
    .unwrap();
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    fe.set_vring_num(1, SIZE).unwrap();
    fe.set_vring_addr(
        1,
        &VringConfigData {
            queue_max_size: 1024,
            queue_size: SIZE,
            flags: 0,
            desc_table_addr: q.desc_table_addr().0,
            used_ring_addr: q.used_addr().0,
            avail_ring_addr: q.avail_addr().0,
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(1, 0).unwrap();
    fe.set_vring_call(1, &call).unwrap();
    fe.set_vring_kick(1, &kick).unwrap();
    fe.set_vring_enable(1, true).unwrap();

    // a good request first: FUSE INIT, served and returned
    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 0,
        flags: 0,
    };
    let h = InHeader {
        len: (std::mem::size_of::<InHeader>() + std::mem::size_of::<InitIn>()) as u32,
        opcode: 26,
        unique: 1,
        ..Default::default()
    };
    let mut req = h.as_slice().to_vec();
    req.extend_from_slice(init.as_slice());
    mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    q.add_desc_chains(
        &[
            RawDescriptor::from(SplitDescriptor::new(
                REQ,
                req.len() as u32,
                VRING_DESC_F_NEXT as u16,
                1,
            )),
            RawDescriptor::from(SplitDescriptor::new(
                REPLY,
                4096,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ],
        0,
    )
    .unwrap();
    kick.write(1).unwrap();
    wait_for("the INIT reply", || q.used().idx().load() == 1);
    let oh: OutHeader = mem.read_obj(GuestAddress(REPLY)).unwrap();
    assert_eq!((oh.error, oh.unique), (0, 1));
    assert_eq!(call.read().unwrap(), 1, "the guest was notified");

    // the hostile part: an available index 1000 entries ahead
    q.avail().idx().store(1001);
    kick.write(1).unwrap();
    let t = Instant::now();
    wait_for("the daemon to exit", || d.0.try_wait().unwrap().is_some());
    let st = d.0.wait().unwrap();
    eprintln!("exited {st} {:?} after the bad index", t.elapsed());
    assert_eq!(st.code(), Some(3), "{st}");
    assert!(!sock.exists(), "the socket is removed");
    let mut err = String::new();
    d.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(
        err.contains("the virtio-fs device is broken") && err.contains("available index 1001"),
        "{err}"
    );
}
