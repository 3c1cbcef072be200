//! The guest as an adversary, through the whole request path ([`Harness`]:
//! Server + guard + passthrough, raw FUSE requests as a guest kernel under
//! its root's control could send them): setuid/setgid and device nodes that
//! must not reach the host, and the caps on handles and inodes.
//!
//! The harness runs requests on the test's own thread, with the test
//! process's capabilities. The server process runs without `CAP_FSETID`
//! (`sandbox::server_capabilities`); tests about what the host kernel then
//! does drop it from this thread's effective set first ([`no_fsetid`]).

use std::ffi::CString;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use fuse_backend_rs::abi::fuse_abi::{
    BatchForgetIn, CreateIn, EntryOut, ForgetIn, ForgetOne, MkdirIn, MknodIn, OpenIn, OpenOut,
    ReadIn, ReleaseIn, SetattrIn, WriteIn,
};
use vm_memory::ByteValued;

use crate::fs::{Limits, Policy};
use crate::harness::{message, Harness};
use crate::metrics::{REFUSED_HANDLES, REFUSED_INODES};

const ROOT: u64 = 1;
const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const SETATTR: u32 = 4;
const MKNOD: u32 = 8;
const MKDIR: u32 = 9;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const RELEASE: u32 = 18;
const OPENDIR: u32 = 27;
const RELEASEDIR: u32 = 29;
const CREATE: u32 = 35;
const BATCH_FORGET: u32 = 42;
const FATTR_MODE: u32 = 1;
const FATTR_SIZE: u32 = 1 << 3;

fn name(s: &str) -> Vec<u8> {
    CString::new(s).unwrap().into_bytes_with_nul()
}

fn body<T: ByteValued>(v: T, tail: &[u8]) -> Vec<u8> {
    let mut b = v.as_slice().to_vec();
    b.extend_from_slice(tail);
    b
}

fn reply<T: ByteValued + Copy>(r: Option<(i32, Vec<u8>)>) -> Result<T, i32> {
    match r {
        Some((0, b)) => Ok(*T::from_slice(&b[..std::mem::size_of::<T>()]).unwrap()),
        Some((e, _)) => Err(-e),
        None => Err(0),
    }
}

fn lookup(h: &mut Harness, parent: u64, n: &str) -> Result<u64, i32> {
    reply::<EntryOut>(h.request(&message(LOOKUP, parent, &name(n)))).map(|e| e.nodeid)
}

fn forget(h: &mut Harness, node: u64, n: u64) {
    assert_eq!(
        h.send(&message(FORGET, node, ForgetIn { nlookup: n }.as_slice())),
        None,
        "FORGET has no reply"
    );
}

fn open(h: &mut Harness, node: u64, flags: i32) -> Result<u64, i32> {
    let o = OpenIn {
        flags: flags as u32,
        fuse_flags: 0,
    };
    reply::<OpenOut>(h.request(&message(OPEN, node, o.as_slice()))).map(|o| o.fh)
}

fn release(h: &mut Harness, op: u32, node: u64, fh: u64) -> Option<i32> {
    let r = ReleaseIn {
        fh,
        ..Default::default()
    };
    h.send(&message(op, node, r.as_slice()))
}

fn read(h: &mut Harness, node: u64, fh: u64, size: u32) -> Result<Vec<u8>, i32> {
    let r = ReadIn {
        fh,
        size,
        ..Default::default()
    };
    match h.request(&message(READ, node, r.as_slice())) {
        Some((0, b)) => Ok(b),
        Some((e, _)) => Err(-e),
        None => Err(0),
    }
}

fn write(h: &mut Harness, node: u64, fh: u64, data: &[u8]) -> Option<i32> {
    let w = WriteIn {
        fh,
        size: data.len() as u32,
        ..Default::default()
    };
    h.send(&message(WRITE, node, &body(w, data)))
}

fn setattr(h: &mut Harness, node: u64, valid: u32, mode: u32, size: u64) -> Option<i32> {
    let s = SetattrIn {
        valid,
        mode,
        size,
        ..Default::default()
    };
    h.send(&message(SETATTR, node, s.as_slice()))
}

fn mknod(h: &mut Harness, parent: u64, n: &str, mode: u32, rdev: u32) -> Option<i32> {
    let m = MknodIn {
        mode,
        rdev,
        umask: 0,
        padding: 0,
    };
    h.send(&message(MKNOD, parent, &body(m, &name(n))))
}

fn create(h: &mut Harness, parent: u64, n: &str, flags: i32, mode: u32) -> Option<i32> {
    let c = CreateIn {
        flags: flags as u32,
        mode,
        umask: 0,
        fuse_flags: 0,
    };
    h.send(&message(CREATE, parent, &body(c, &name(n))))
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode()
}

fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Drops `CAP_FSETID` from this thread's effective set, as the server runs.
fn no_fsetid() {
    caps::drop(None, caps::CapSet::Effective, caps::Capability::CAP_FSETID).unwrap();
}

fn refused(h: &Harness, op: &str) -> u64 {
    h.metrics
        .snapshot()
        .ops
        .iter()
        .find(|o| o.op == op)
        .map_or(0, |o| o.count)
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    l.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// (2b) SETATTR's mode carries a file type the guest chooses: a regular file
/// sent a directory's mode must not keep setgid; the type is the inode's.
#[test]
fn setattr_takes_the_file_type_from_the_inode_not_the_request() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"#!/bin/sh\n").unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    let mut h = Harness::new(dir.path()).unwrap();
    let f = lookup(&mut h, ROOT, "f").unwrap();
    let d = lookup(&mut h, ROOT, "d").unwrap();

    // the lie: "this is a directory, keep its setgid"
    for lie in [libc::S_IFDIR | 0o2755, libc::S_IFDIR | 0o6755, 0o2755] {
        assert_eq!(setattr(&mut h, f, FATTR_MODE, lie, 0), Some(0));
        assert_eq!(
            mode_of(&dir.path().join("f")) & 0o7777,
            0o755,
            "mode {lie:o} sent"
        );
    }
    // the other lie: a directory sent as a regular file keeps its setgid
    // (group inheritance), never setuid
    assert_eq!(
        setattr(&mut h, d, FATTR_MODE, libc::S_IFREG | 0o6775, 0),
        Some(0)
    );
    assert_eq!(mode_of(&dir.path().join("d")) & 0o7777, 0o2775);
    // MKNOD and CREATE of regular files: no setuid/setgid either
    assert_eq!(mknod(&mut h, ROOT, "m", libc::S_IFREG | 0o6755, 0), Some(0));
    assert_eq!(mode_of(&dir.path().join("m")) & 0o7777, 0o755);
    assert_eq!(
        create(&mut h, ROOT, "c", libc::O_WRONLY | libc::O_CREAT, 0o6755),
        Some(0)
    );
    assert_eq!(mode_of(&dir.path().join("c")) & 0o7777, 0o755);
}

/// (2a) Files that already carry setuid/setgid on the host (an image's `su`)
/// are reported as they are; any truncation or write from the guest clears
/// them on the host, whatever the guest's flags say. The server has no
/// `CAP_FSETID`, so the host kernel clears them; this thread drops it too.
/// Covers the requests a FUSE mount cannot send on purpose: CREATE over an
/// existing file (no `O_EXCL`) with `O_TRUNC`.
#[test]
fn truncating_and_writing_a_setid_file_clears_it_on_the_host() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = |n: &str| {
        let p = dir.path().join(n);
        std::fs::write(&p, b"ELF...").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o6755)).unwrap();
        p
    };
    let (su, ping, mount, passwd) = (image("su"), image("ping"), image("mount"), image("passwd"));
    let mut h = Harness::new(dir.path()).unwrap();
    no_fsetid();

    // reported as is
    let e = reply::<EntryOut>(h.request(&message(LOOKUP, ROOT, &name("su")))).unwrap();
    assert_eq!(e.attr.mode & 0o7777, 0o6755);

    // CREATE over the existing file, O_TRUNC, mode asking for the bits again
    assert_eq!(
        create(
            &mut h,
            ROOT,
            "su",
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
            0o6755
        ),
        Some(0)
    );
    assert_eq!(mode_of(&su) & 0o7777, 0o755);
    assert_eq!(std::fs::metadata(&su).unwrap().len(), 0);

    // OPEN with O_TRUNC
    let n = lookup(&mut h, ROOT, "ping").unwrap();
    open(&mut h, n, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    assert_eq!(mode_of(&ping) & 0o7777, 0o755);

    // SETATTR size
    let n = lookup(&mut h, ROOT, "mount").unwrap();
    assert_eq!(setattr(&mut h, n, FATTR_SIZE, 0, 1), Some(0));
    assert_eq!(mode_of(&mount) & 0o7777, 0o755);

    // WRITE, no WRITE_KILL_PRIV asked
    let n = lookup(&mut h, ROOT, "passwd").unwrap();
    let fh = open(&mut h, n, libc::O_WRONLY).unwrap();
    assert_eq!(mode_of(&passwd) & 0o7777, 0o6755, "opening changes nothing");
    assert_eq!(write(&mut h, n, fh, b"evil"), Some(0));
    assert_eq!(mode_of(&passwd) & 0o7777, 0o755);
}

/// A setgid directory keeps its bit also when the server is not in the
/// directory's group (without `CAP_FSETID` the host kernel would clear it).
#[test]
fn setgid_directory_of_another_group_keeps_its_bit() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("shared-group");
    std::fs::create_dir(&d).unwrap();
    std::os::unix::fs::chown(&d, Some(1000), Some(4321)).unwrap();
    let f = dir.path().join("file");
    std::fs::write(&f, b"x").unwrap();
    std::os::unix::fs::chown(&f, Some(1000), Some(4321)).unwrap();
    let mut h = Harness::new(dir.path()).unwrap();
    no_fsetid();
    let dn = lookup(&mut h, ROOT, "shared-group").unwrap();
    let fnode = lookup(&mut h, ROOT, "file").unwrap();
    assert_eq!(
        setattr(&mut h, dn, FATTR_MODE, libc::S_IFDIR | 0o2775, 0),
        Some(0)
    );
    assert_eq!(mode_of(&d) & 0o7777, 0o2775);
    // this thread's egid is back to what it was
    assert_eq!(nix::unistd::getegid().as_raw(), 0);
    // and a file of that group, sent as a directory, does not get it
    assert_eq!(
        setattr(&mut h, fnode, FATTR_MODE, libc::S_IFDIR | 0o2775, 0),
        Some(0)
    );
    assert_eq!(mode_of(&f) & 0o7777, 0o775);
    // clearing it works as usual
    assert_eq!(
        setattr(&mut h, dn, FATTR_MODE, libc::S_IFDIR | 0o775, 0),
        Some(0)
    );
    assert_eq!(mode_of(&d) & 0o7777, 0o775);
}

/// (2d) MKNOD of character and block devices is EPERM and creates nothing;
/// the one exception, the 0:0 character device (overlayfs's whiteout), has
/// no driver: opening it on the host is ENXIO. FIFOs and sockets are made.
#[test]
fn mknod_of_devices_is_refused_fifos_and_sockets_are_not() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(dir.path()).unwrap();
    let dev = |ma: u32, mi: u32| (ma << 8) | (mi & 0xff) | ((mi & !0xff) << 12);
    for (n, mode, rdev) in [
        ("mem", libc::S_IFCHR | 0o666, dev(1, 1)),
        ("null", libc::S_IFCHR | 0o666, dev(1, 3)),
        ("kmsg", libc::S_IFCHR | 0o666, dev(1, 11)),
        ("sda", libc::S_IFBLK | 0o666, dev(8, 0)),
        ("blk0", libc::S_IFBLK | 0o666, 0),
        ("setuid-dev", libc::S_IFCHR | 0o4666, dev(1, 3)),
    ] {
        assert_eq!(
            mknod(&mut h, ROOT, n, mode, rdev),
            Some(-libc::EPERM),
            "{n}"
        );
        assert!(
            std::fs::symlink_metadata(dir.path().join(n)).is_err(),
            "{n} reached the host"
        );
    }
    assert_eq!(
        mknod(&mut h, ROOT, "whiteout", libc::S_IFCHR | 0o600, 0),
        Some(0)
    );
    let w = dir.path().join("whiteout");
    let st = std::fs::symlink_metadata(&w).unwrap();
    assert!(st.file_type().is_char_device());
    assert_eq!(st.rdev(), 0);
    let e = std::fs::OpenOptions::new().read(true).open(&w).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENXIO), "0:0 has no driver");
    assert_eq!(
        mknod(&mut h, ROOT, "fifo", libc::S_IFIFO | 0o600, 0),
        Some(0)
    );
    assert_eq!(
        mknod(&mut h, ROOT, "sock", libc::S_IFSOCK | 0o600, 0),
        Some(0)
    );
    assert!(std::fs::symlink_metadata(dir.path().join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(std::fs::symlink_metadata(dir.path().join("sock"))
        .unwrap()
        .file_type()
        .is_socket());
}

/// (4) 100,000 OPENs without RELEASE: the handles held stop at the cap, the
/// rest are EMFILE and counted, fds and memory stay bounded, the daemon
/// still answers, RELEASE gives the budget back (only for handles really
/// held).
#[test]
fn open_without_release_stops_at_the_handle_cap() {
    const CAP: usize = 4096;
    const OPENS: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"still here").unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    let policy = Policy {
        limits: Limits {
            handles: CAP,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut h = Harness::with_policy(dir.path(), policy).unwrap();
    let f = lookup(&mut h, ROOT, "f").unwrap();
    let d = lookup(&mut h, ROOT, "d").unwrap();
    let (fds0, rss0) = (fds(), rss_kib());

    let mut held = Vec::new();
    let mut emfile = 0;
    for i in 0..OPENS {
        // files and directories share the budget
        let r = if i % 10 == 0 {
            reply::<OpenOut>(
                h.request(&message(
                    OPENDIR,
                    d,
                    OpenIn {
                        flags: libc::O_RDONLY as u32,
                        fuse_flags: 0,
                    }
                    .as_slice(),
                )),
            )
            .map(|o| (d, o.fh))
        } else {
            open(&mut h, f, libc::O_RDONLY).map(|fh| (f, fh))
        };
        match r {
            Ok(x) => held.push(x),
            Err(e) => {
                assert_eq!(e, libc::EMFILE);
                emfile += 1;
            }
        }
    }
    let (fds1, rss1) = (fds(), rss_kib());
    assert_eq!(held.len(), CAP);
    assert_eq!(emfile, OPENS - CAP);
    assert_eq!(h.fs.handle_counts(), (CAP, CAP));
    assert_eq!(refused(&h, REFUSED_HANDLES), (OPENS - CAP) as u64);
    assert_eq!(h.metrics.refusals().0, (OPENS - CAP) as u64);
    // other tests run in this process at the same time: some slack
    assert!(
        fds1 <= fds0 + CAP + 256,
        "fds {fds0} -> {fds1} for a cap of {CAP}"
    );
    let grown = rss1.saturating_sub(rss0);
    eprintln!(
        "{OPENS} OPENs, cap {CAP}: fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} KiB (+{grown})"
    );
    assert!(grown < 16 * 1024, "RSS grew {grown} KiB");

    // still answering: LOOKUP, READ through a held handle
    let f2 = lookup(&mut h, ROOT, "f").unwrap();
    assert_eq!(f2, f);
    let (n, fh) = *held.iter().find(|(n, _)| *n == f).unwrap();
    assert_eq!(read(&mut h, n, fh, 64).unwrap(), b"still here");

    // releases that do not match a held handle give nothing back
    assert_eq!(release(&mut h, RELEASE, f, 0xdead_beef), Some(-libc::EBADF));
    assert_eq!(
        release(&mut h, RELEASE, d, fh),
        Some(-libc::EBADF),
        "wrong inode"
    );
    assert_eq!(h.fs.handle_counts(), (CAP, CAP));
    assert_eq!(open(&mut h, f, libc::O_RDONLY), Err(libc::EMFILE));

    // RELEASE/RELEASEDIR of 10: exactly 10 more OPENs fit
    for (n, fh) in held.drain(..10) {
        let op = if n == d { RELEASEDIR } else { RELEASE };
        assert_eq!(release(&mut h, op, n, fh), Some(0));
        assert_eq!(release(&mut h, op, n, fh), Some(-libc::EBADF), "twice");
    }
    assert_eq!(h.fs.handle_counts(), (CAP - 10, CAP - 10));
    for _ in 0..10 {
        held.push((f, open(&mut h, f, libc::O_RDONLY).unwrap()));
    }
    assert_eq!(open(&mut h, f, libc::O_RDONLY), Err(libc::EMFILE));

    // all released: every fd is closed again
    for (n, fh) in held.drain(..) {
        let op = if n == d { RELEASEDIR } else { RELEASE };
        assert_eq!(release(&mut h, op, n, fh), Some(0));
    }
    assert_eq!(h.fs.handle_counts(), (0, 0));
    let fds2 = fds();
    assert!(fds2 <= fds0 + 256, "fds {fds0} -> {fds2} after RELEASE");
}

/// (4) LOOKUP without FORGET: inodes held stop at the cap, new lookups are
/// ENFILE and counted (nothing is created on the host past the cap), lookups
/// of held inodes still work, FORGET shrinks the table (both of its maps)
/// and gives the room back.
#[test]
fn lookup_without_forget_stops_at_the_inode_cap_and_forget_shrinks_the_map() {
    const CAP: usize = 101; // the root and 100 more
    const FILES: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    for i in 0..FILES {
        std::fs::write(dir.path().join(format!("f{i}")), b"").unwrap();
    }
    let policy = Policy {
        limits: Limits {
            inodes: CAP,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut h = Harness::with_policy(dir.path(), policy).unwrap();
    assert_eq!(h.fs.inode_counts(), (1, 1));
    let mut nodes = Vec::new();
    let mut enfile = 0;
    for i in 0..FILES {
        match lookup(&mut h, ROOT, &format!("f{i}")) {
            Ok(n) => nodes.push(n),
            Err(e) => {
                assert_eq!(e, libc::ENFILE);
                enfile += 1;
            }
        }
    }
    assert_eq!(nodes.len(), CAP - 1);
    assert_eq!(enfile, FILES - (CAP - 1));
    assert_eq!(h.fs.inode_counts(), (CAP, CAP));
    // a held inode is found again (its count goes up, no new entry)
    assert_eq!(lookup(&mut h, ROOT, "f0"), Ok(nodes[0]));
    assert_eq!(h.fs.inode_counts(), (CAP, CAP));
    // nothing new is made on the host past the cap
    assert_eq!(
        create(&mut h, ROOT, "new", libc::O_WRONLY | libc::O_CREAT, 0o644),
        Some(-libc::ENFILE)
    );
    let m = body(
        MkdirIn {
            mode: 0o755,
            umask: 0,
        },
        &name("newdir"),
    );
    assert_eq!(h.send(&message(MKDIR, ROOT, &m)), Some(-libc::ENFILE));
    assert!(!dir.path().join("new").exists() && !dir.path().join("newdir").exists());
    let refusals = (FILES - (CAP - 1) + 2) as u64;
    assert_eq!(refused(&h, REFUSED_INODES), refusals);

    // FORGET of 50 (f0 twice: it was looked up twice), BATCH_FORGET of 20
    forget(&mut h, nodes[0], 2);
    for &n in &nodes[1..50] {
        forget(&mut h, n, 1);
    }
    assert_eq!(h.fs.inode_counts(), (CAP - 50, CAP - 50));
    let mut b = BatchForgetIn {
        count: 20,
        dummy: 0,
    }
    .as_slice()
    .to_vec();
    for &n in &nodes[50..70] {
        b.extend_from_slice(
            ForgetOne {
                nodeid: n,
                nlookup: 1,
            }
            .as_slice(),
        );
    }
    assert_eq!(h.send(&message(BATCH_FORGET, 0, &b)), None);
    assert_eq!(h.fs.inode_counts(), (CAP - 70, CAP - 70));
    // the room is back: 70 files not held before
    for i in 100..170 {
        lookup(&mut h, ROOT, &format!("f{i}")).unwrap();
    }
    assert_eq!(lookup(&mut h, ROOT, "f170"), Err(libc::ENFILE));
    assert_eq!(h.fs.inode_counts(), (CAP, CAP));
}

/// (4) The passthrough used to keep an (inode, device, mount id) entry for
/// every file ever looked up, FORGET or not: a guest walking (or creating
/// and unlinking) files grew the daemon without bound. Now the table shrinks
/// back to the root.
#[test]
fn lookup_and_forget_of_many_files_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..2000 {
        std::fs::write(dir.path().join(format!("f{i}")), b"").unwrap();
    }
    let mut h = Harness::new(dir.path()).unwrap();
    for i in 0..2000 {
        let n = lookup(&mut h, ROOT, &format!("f{i}")).unwrap();
        forget(&mut h, n, 1);
    }
    // (each inode's O_PATH fd goes with its entry)
    assert_eq!(h.fs.inode_counts(), (1, 1));
    // the same file looked up again after its FORGET: a new node id, the
    // host's inode number as before
    let a = reply::<EntryOut>(h.request(&message(LOOKUP, ROOT, &name("f1")))).unwrap();
    forget(&mut h, a.nodeid, 1);
    let b = reply::<EntryOut>(h.request(&message(LOOKUP, ROOT, &name("f1")))).unwrap();
    assert_ne!(a.nodeid, b.nodeid);
    assert_eq!(a.attr.ino, b.attr.ino);
    assert_eq!(
        a.attr.ino,
        std::fs::metadata(dir.path().join("f1")).unwrap().ino()
    );
}
