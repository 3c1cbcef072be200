//! kata-virtiofsd mounted on the host (`--fuse-mount`): file operations through
//! the mount checked against the kernel's own view of the shared directory,
//! the guest-side policy (read-only, no setuid, no devices, restricted xattr
//! namespaces), the control endpoint, and a clean SIGTERM. Needs root
//! (mounting FUSE, namespaces).
//!
//! Every daemon is started by a [`Daemon`] guard (`common/virtiofsd.rs`) that,
//! whatever happens, unmounts its own mount point (MNT_DETACH) and kills only
//! the pid it started.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kata_proto::virtiofsd::MetricsResponse;

mod common;

use common::virtiofsd::*;

#[test]
fn file_operations_match_the_shared_dir() {
    let d = Daemon::start(&["--cache", "auto"]);

    // create, write, read; the kernel's view has the same bytes
    fs::write(d.m("a.txt"), b"hello virtio-fs\n").unwrap();
    assert_eq!(fs::read(d.d("a.txt")).unwrap(), b"hello virtio-fs\n");
    assert_eq!(fs::read(d.m("a.txt")).unwrap(), b"hello virtio-fs\n");
    same_stat(&d, "a.txt");
    // and a file made on the host side is seen through the mount
    fs::write(d.d("host.txt"), b"from the host").unwrap();
    assert_eq!(fs::read(d.m("host.txt")).unwrap(), b"from the host");

    // append, overwrite in the middle, truncate
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(d.m("a.txt"))
        .unwrap();
    f.write_all(b"more\n").unwrap();
    drop(f);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(d.m("a.txt"))
        .unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(b"HELLO").unwrap();
    f.set_len(10).unwrap();
    drop(f);
    assert_eq!(fs::read(d.d("a.txt")).unwrap(), b"HELLO virt");
    same_stat(&d, "a.txt");

    // mkdir, nested files, rename across directories, rmdir
    fs::create_dir(d.m("sub")).unwrap();
    fs::write(d.m("sub/inner"), b"x").unwrap();
    assert!(d.d("sub/inner").is_file());
    fs::rename(d.m("sub/inner"), d.m("moved")).unwrap();
    assert!(!d.d("sub/inner").exists());
    assert_eq!(fs::read(d.d("moved")).unwrap(), b"x");
    fs::remove_dir(d.m("sub")).unwrap();
    assert!(!d.d("sub").exists());
    assert_eq!(errno(fs::remove_dir(d.m("nope"))), libc::ENOENT);
    fs::create_dir(d.m("full")).unwrap();
    fs::write(d.m("full/f"), b"").unwrap();
    assert_eq!(errno(fs::remove_dir(d.m("full"))), libc::ENOTEMPTY);

    // hard link: same inode, link count 2 on both sides
    fs::hard_link(d.m("moved"), d.m("hard")).unwrap();
    assert_eq!(fs::metadata(d.d("moved")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(d.d("moved")).unwrap().ino(),
        fs::metadata(d.d("hard")).unwrap().ino()
    );
    same_stat(&d, "hard");

    // symlink: the link text is stored as given, never resolved by the daemon
    std::os::unix::fs::symlink("a.txt", d.m("rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", d.m("abs-link")).unwrap();
    assert_eq!(fs::read_link(d.d("rel-link")).unwrap(), Path::new("a.txt"));
    assert_eq!(
        fs::read_link(d.m("abs-link")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(fs::read(d.m("rel-link")).unwrap(), b"HELLO virt");
    same_stat(&d, "rel-link");

    // rename over an existing file (RENAME) and RENAME_NOREPLACE (RENAME2)
    fs::write(d.m("victim"), b"old").unwrap();
    fs::rename(d.m("hard"), d.m("victim")).unwrap();
    assert_eq!(fs::read(d.d("victim")).unwrap(), b"x");
    let (from, to) = (c(&d.m("victim")), c(&d.m("a.txt")));
    // SAFETY: valid NUL-terminated paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );

    // readdir: the same names on both sides
    assert_eq!(names(&d.mnt), names(&d.dir));

    // chmod, chown, utimes
    fs::set_permissions(d.m("victim"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(d.m("victim"), Some(1234), Some(5678)).unwrap();
    let t = nix::sys::time::TimeSpec::new(1_000_000_000, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        &d.m("victim"),
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    let st = fs::metadata(d.d("victim")).unwrap();
    assert_eq!(st.mode() & 0o7777, 0o640);
    assert_eq!((st.uid(), st.gid()), (1234, 5678));
    assert_eq!(st.mtime(), 1_000_000_000);
    same_stat(&d, "victim");

    // unlink
    fs::remove_file(d.m("victim")).unwrap();
    fs::remove_file(d.m("abs-link")).unwrap();
    assert!(!d.d("victim").exists());
    assert!(fs::symlink_metadata(d.d("abs-link")).is_err());
    assert_eq!(errno(fs::remove_file(d.m("victim"))), libc::ENOENT);

    // a large sparse file: 4 GiB apparent, a few blocks on disk
    let mut f = fs::File::create(d.m("sparse")).unwrap();
    f.seek(SeekFrom::Start(4 << 30)).unwrap();
    f.write_all(b"end").unwrap();
    f.sync_all().unwrap();
    drop(f);
    let st = fs::metadata(d.d("sparse")).unwrap();
    assert_eq!(st.size(), (4 << 30) + 3);
    assert!(st.blocks() < 1024, "not sparse: {} blocks", st.blocks());
    same_stat(&d, "sparse");
    let mut f = fs::File::open(d.m("sparse")).unwrap();
    f.seek(SeekFrom::Start((4 << 30) - 2)).unwrap();
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).unwrap();
    assert_eq!(buf, b"\0\0end");
    // SEEK_DATA finds the data past the hole (LSEEK)
    let pos = nix::unistd::lseek(&f, 0, nix::unistd::Whence::SeekData).unwrap();
    assert!(pos > 0 && pos <= 4 << 30, "SEEK_DATA = {pos}");

    // a file larger than one FUSE request, byte for byte
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i| (i % 251) as u8).collect();
    fs::write(d.m("big"), &big).unwrap();
    assert_eq!(fs::read(d.d("big")).unwrap(), big);
    assert_eq!(fs::read(d.m("big")).unwrap(), big);

    // statfs of the mount reports the shared dir's filesystem
    let a = nix::sys::statvfs::statvfs(&d.mnt).unwrap();
    let b = nix::sys::statvfs::statvfs(&d.dir).unwrap();
    assert_eq!(a.blocks(), b.blocks());
}

#[test]
fn guest_policy_no_setid_no_devices_user_xattrs_only() {
    let d = Daemon::start(&["--xattr"]);

    // setuid/setgid bits asked for by the client are dropped
    fs::write(d.m("prog"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(d.m("prog"), fs::Permissions::from_mode(0o6755)).unwrap();
    assert_eq!(fs::metadata(d.d("prog")).unwrap().mode() & 0o7777, 0o755);
    let path = c(&d.m("created"));
    // SAFETY: valid path; the fd is closed right away.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o4755) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    assert_eq!(fs::metadata(d.d("created")).unwrap().mode() & 0o7777, 0o755);
    // a setgid directory keeps its group inheritance
    fs::create_dir(d.m("grp")).unwrap();
    fs::set_permissions(d.m("grp"), fs::Permissions::from_mode(0o2775)).unwrap();
    assert_eq!(fs::metadata(d.d("grp")).unwrap().mode() & 0o7777, 0o2775);

    // device nodes: refused; FIFOs and sockets are fine
    let mknod = |name: &str, kind: nix::sys::stat::SFlag, dev: u64| {
        nix::sys::stat::mknod(
            &d.m(name),
            kind,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            dev,
        )
    };
    use nix::sys::stat::SFlag;
    assert_eq!(
        mknod("null", SFlag::S_IFCHR, nix::sys::stat::makedev(1, 3)),
        Err(nix::errno::Errno::EPERM)
    );
    assert_eq!(
        mknod("disk", SFlag::S_IFBLK, nix::sys::stat::makedev(8, 0)),
        Err(nix::errno::Errno::EPERM)
    );
    assert!(!d.d("null").exists() && !d.d("disk").exists());
    mknod("fifo", SFlag::S_IFIFO, 0).unwrap();
    assert!(fs::symlink_metadata(d.d("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());

    // xattrs: user.* round-trips to the host file; restricted namespaces never
    // reach it
    setxattr(&d.m("prog"), "user.kata", b"yes").unwrap();
    assert_eq!(getxattr(&d.d("prog"), "user.kata").unwrap(), b"yes");
    assert_eq!(getxattr(&d.m("prog"), "user.kata").unwrap(), b"yes");
    assert_eq!(listxattr(&d.m("prog")), vec!["user.kata".to_string()]);
    setxattr(&d.m("grp"), "user.dir", b"1").unwrap();
    assert_eq!(getxattr(&d.d("grp"), "user.dir").unwrap(), b"1");
    assert_eq!(
        errno(setxattr(&d.m("prog"), "trusted.overlay.opaque", b"y")),
        libc::EPERM
    );
    assert!(getxattr(&d.d("prog"), "trusted.overlay.opaque").is_err());
    // set on the host side: invisible through the mount
    setxattr(&d.d("prog"), "trusted.host", b"secret").unwrap();
    assert_eq!(errno(getxattr(&d.m("prog"), "trusted.host")), libc::ENODATA);
    assert_eq!(listxattr(&d.m("prog")), vec!["user.kata".to_string()]);
    // SAFETY: valid NUL-terminated strings.
    let rc = unsafe {
        libc::lremovexattr(
            c(&d.m("prog")).as_ptr(),
            CString::new("user.kata").unwrap().as_ptr(),
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(errno(getxattr(&d.d("prog"), "user.kata")), libc::ENODATA);
}

#[test]
fn readonly_refuses_every_change() {
    let d = Daemon::start(&["--readonly", "--sandbox", "namespace"]);
    fs::write(d.d("file"), b"data").unwrap();
    fs::create_dir(d.d("dir")).unwrap();
    assert_eq!(fs::read(d.m("file")).unwrap(), b"data");
    assert_eq!(names(&d.m("dir")), Vec::<String>::new());

    assert_eq!(errno(fs::write(d.m("new"), b"x")), libc::EROFS);
    assert_eq!(
        errno(fs::OpenOptions::new().write(true).open(d.m("file"))),
        libc::EROFS
    );
    assert_eq!(errno(fs::create_dir(d.m("d2"))), libc::EROFS);
    assert_eq!(errno(fs::remove_file(d.m("file"))), libc::EROFS);
    assert_eq!(errno(fs::remove_dir(d.m("dir"))), libc::EROFS);
    assert_eq!(errno(fs::rename(d.m("file"), d.m("f2"))), libc::EROFS);
    assert_eq!(errno(fs::hard_link(d.m("file"), d.m("f3"))), libc::EROFS);
    assert_eq!(
        errno(std::os::unix::fs::symlink("file", d.m("l"))),
        libc::EROFS
    );
    assert_eq!(
        errno(fs::set_permissions(
            d.m("file"),
            fs::Permissions::from_mode(0o777)
        )),
        libc::EROFS
    );
    // nothing changed on the host
    assert_eq!(fs::read(d.d("file")).unwrap(), b"data");
    assert_eq!(names(&d.dir), vec!["dir".to_string(), "file".to_string()]);
    // the refusals came from the daemon (the host mount itself is read-write)
    let rt = kata_proto::runtime().unwrap();
    let m = rt.block_on(async { d.client().await.metrics(()).await.unwrap().into_inner() });
    let refused: u64 = m.ops.iter().map(|o| o.errors).sum();
    assert!(refused >= 5, "errors counted: {m:?}");
    let s = rt.block_on(async { d.client().await.status(()).await.unwrap().into_inner() });
    assert!(s.readonly);
}

fn op(m: &MetricsResponse, name: &str) -> (u64, u64) {
    m.ops
        .iter()
        .find(|o| o.op == name)
        .map(|o| {
            assert_eq!(o.latency_counts.len(), o.latency_bounds_us.len() + 1);
            assert_eq!(
                o.latency_counts.iter().sum::<u64>(),
                o.count,
                "{name} histogram"
            );
            (o.count, o.errors)
        })
        .unwrap_or((0, 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_status_and_moving_metrics() {
    let d = Daemon::start(&["--cache", "none"]);
    let mut c = d.client().await;
    let s = c.status(()).await.expect("Status").into_inner();
    assert_eq!(s.transport, "fuse");
    assert!(s.connected);
    assert!(!s.readonly);
    assert_eq!(s.cache, "none");
    assert_eq!(s.sandbox_id, "fuse-test");
    assert_eq!(
        Path::new(&s.shared_dir),
        fs::canonicalize(&d.dir).unwrap().as_path()
    );
    assert!(!s.version.is_empty());

    let before = c.metrics(()).await.expect("Metrics").into_inner();
    let (mnt, dir) = (d.mnt.clone(), d.dir.clone());
    tokio::task::spawn_blocking(move || {
        let data = vec![7u8; 256 * 1024];
        fs::write(mnt.join("m"), &data).unwrap();
        assert_eq!(fs::read(mnt.join("m")).unwrap(), data);
        assert!(fs::metadata(mnt.join("missing")).is_err());
        assert!(dir.join("m").exists());
    })
    .await
    .unwrap();
    let after = c.metrics(()).await.expect("Metrics").into_inner();
    assert!(
        after.bytes_written >= before.bytes_written + 256 * 1024,
        "{after:?}"
    );
    assert!(
        after.bytes_read >= before.bytes_read + 256 * 1024,
        "{after:?}"
    );
    let (l0, le0) = op(&before, "LOOKUP");
    let (l1, le1) = op(&after, "LOOKUP");
    assert!(l1 > l0, "LOOKUP count did not move: {l0} -> {l1}");
    assert!(
        le1 > le0,
        "the failed LOOKUP is not counted: {le0} -> {le1}"
    );
    let (w1, we1) = op(&after, "WRITE");
    assert!(w1 >= 1 && we1 == 0, "WRITE {w1}/{we1}");
    assert!(op(&after, "READ").0 >= 1);
    assert!(op(&after, "CREATE").0 >= 1);
    assert!(op(&after, "INIT").0 == 1);
    assert_eq!(after.malformed, 0);
    let up = c.status(()).await.unwrap().into_inner().uptime_ms;
    assert!(up >= s.uptime_ms);
}

#[test]
fn sigterm_unmounts_removes_the_socket_and_exits_zero() {
    let mut d = Daemon::start(&[]);
    fs::write(d.m("f"), b"x").unwrap();
    assert!(d.ctl.exists());
    let st = d.terminate();
    assert!(st.success(), "exit status {st}");
    assert!(!mounted(&d.mnt), "still mounted after SIGTERM");
    assert!(!d.ctl.exists(), "control socket left behind");
    // the data stays on the host
    assert_eq!(fs::read(d.d("f")).unwrap(), b"x");
}

#[test]
fn external_unmount_ends_the_daemon_cleanly() {
    let mut d = Daemon::start(&["--sandbox", "none", "--thread-pool-size", "2"]);
    fs::write(d.m("f"), b"x").unwrap();
    nix::mount::umount2(&d.mnt, nix::mount::MntFlags::MNT_DETACH).unwrap();
    let child = d.child.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "still running after the unmount");
        std::thread::sleep(Duration::from_millis(20));
    };
    d.child = None;
    assert!(st.success(), "exit status {st}");
    assert!(!d.ctl.exists());
}

#[test]
fn requests_run_with_the_callers_uid_and_gid() {
    let d = Daemon::start(&["--thread-pool-size", "2"]);
    // let other users reach the mount and write into the shared dir
    fs::set_permissions(d.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&d.dir, fs::Permissions::from_mode(0o1777)).unwrap();
    let as_user = |uid: u32, script: &str| {
        let out = Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "sh",
                "-c",
                script,
            ])
            .env("M", &d.mnt)
            .output()
            .expect("setpriv (util-linux) runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = as_user(
        1000,
        "echo hi > $M/mine && mkdir $M/dir && ln -s mine $M/link",
    );
    assert!(ok, "{err}");
    for name in ["mine", "dir", "link"] {
        let st = fs::symlink_metadata(d.d(name)).unwrap();
        assert_eq!(
            (st.uid(), st.gid()),
            (1000, 1000),
            "{name} owner on the host"
        );
    }
    // the sticky directory protects it from another user
    let (ok, _) = as_user(1001, "rm $M/mine");
    assert!(!ok, "another uid removed a file in a sticky directory");
    let (ok, _) = as_user(1001, "echo x >> $M/mine");
    assert!(!ok, "another uid wrote to a 0644 file");
    assert_eq!(fs::read(d.d("mine")).unwrap(), b"hi\n");
}

/// `openat2(root, path, RESOLVE_IN_ROOT)`: resolves `path` as a guest whose
/// root is the mount would (the host kernel must not resolve the daemon's
/// symlinks from the host's root).
fn open_in_root(root: &fs::File, path: &str) -> std::io::Result<fs::File> {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT,
    };
    let p = CString::new(path).unwrap();
    // EAGAIN: a rename or mount anywhere on the system (another test's)
    // raced the ".." resolution; openat2(2) says to retry
    let mut tries = 0;
    let fd = loop {
        // SAFETY: valid dirfd, path and open_how of the size given.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                std::os::fd::AsRawFd::as_raw_fd(root),
                p.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd >= 0 {
            break fd;
        }
        let e = std::io::Error::last_os_error();
        tries += 1;
        if e.raw_os_error() != Some(libc::EAGAIN) || tries >= 1000 {
            return Err(e);
        }
    };
    // SAFETY: a new fd nobody else owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) })
}

#[test]
fn links_and_dotdot_never_leave_the_shared_dir() {
    let d = Daemon::start(&["--xattr"]);
    let outside = d.tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"host secret").unwrap();
    setxattr(&outside.join("secret"), "user.secret", b"s").unwrap();
    fs::write(d.d("inside"), b"inside").unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), d.d("abs")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", d.d("rel")).unwrap();
    std::os::unix::fs::symlink(&outside, d.d("dirlink")).unwrap();
    // a hard link made on the host side is the same inode: it is served
    fs::hard_link(d.d("inside"), d.d("hard")).unwrap();

    let root = fs::File::open(&d.mnt).unwrap();
    let mut s = String::new();
    open_in_root(&root, "inside")
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "inside");
    for p in [
        "abs",
        "rel",
        "dirlink/secret",
        "../outside/secret",
        "../../outside/secret",
        "./../outside/secret",
    ] {
        match open_in_root(&root, p) {
            Ok(mut f) => {
                let mut s = String::new();
                let _ = f.read_to_string(&mut s);
                assert!(!s.contains("host secret"), "{p} reached the host file");
                panic!("{p} opened something: {s:?}");
            }
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{p}: {e}"),
        }
    }
    // the daemon hands back link texts, it never follows them
    assert_eq!(fs::read_link(d.m("abs")).unwrap(), outside.join("secret"));
    assert_eq!(
        fs::read_link(d.m("rel")).unwrap(),
        Path::new("../outside/secret")
    );
    assert!(fs::symlink_metadata(d.m("dirlink"))
        .unwrap()
        .file_type()
        .is_symlink());
    // xattrs of a symlink are the link's (none), not its target's
    assert_eq!(errno(getxattr(&d.m("abs"), "user.secret")), libc::ENODATA);
    assert!(listxattr(&d.m("abs")).is_empty());
    // the outside stays untouched
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"host secret");
}

/// A symlink to a host file swapped in for a regular file, over and over,
/// while the mount opens that name: the daemon resolves by its own inode
/// handles without following links, so the outside file is never read.
#[test]
fn a_symlink_swapped_in_during_lookups_never_leaks() {
    let d = Daemon::start(&[]);
    let outside = d.tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"host secret").unwrap();
    fs::write(d.d("race"), b"inside").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let dir = d.dir.clone();
        let secret = outside.join("secret");
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = fs::remove_file(dir.join("tmp-link"));
                let _ = std::os::unix::fs::symlink(&secret, dir.join("tmp-link"));
                let _ = fs::rename(dir.join("tmp-link"), dir.join("race"));
                let _ = fs::write(dir.join("tmp-file"), b"inside");
                let _ = fs::rename(dir.join("tmp-file"), dir.join("race"));
                n += 1;
            }
            n
        })
    };
    let mut opened = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        // O_NOFOLLOW: the host kernel itself must not follow a link it is
        // shown; whatever the daemon answers must never be the host file.
        if let Ok(mut f) = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(d.m("race"))
        {
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            assert!(
                !s.contains("host secret"),
                "the swapped-in link leaked the host file"
            );
            opened += 1;
        }
        if let Ok(t) = fs::read_link(d.m("race")) {
            // a link is shown as the link it is, never resolved by the daemon
            assert_eq!(t, outside.join("secret"));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    // how many opens landed on the file depends on the kernel's dentry cache
    // timing; the race ran if the swapper did, and no open leaked (above)
    assert!(
        swaps > 10,
        "the swapper ran: {swaps} swaps ({opened} opens)"
    );
    // once the swapping stops and the caches expire, the name is the file again
    let deadline = Instant::now() + Duration::from_secs(5);
    let last = loop {
        let r = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(d.m("race"))
            .and_then(|mut f| {
                let mut v = Vec::new();
                f.read_to_end(&mut v).map(|_| v)
            });
        match r {
            Ok(v) => break v,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("the file never came back after the race: {e}"),
        }
    };
    assert_eq!(last, b"inside");
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"host secret");
}

/// Renames never cross the shared directory: from the mount, a rename to a
/// host path outside is a cross-device rename the kernel refuses, and the
/// daemon only ever renames between its own inodes.
#[test]
fn renames_across_the_boundary_are_refused() {
    let d = Daemon::start(&[]);
    let outside = d.tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), b"host").unwrap();
    fs::write(d.d("mine"), b"guest").unwrap();
    assert_eq!(
        errno(fs::rename(d.m("mine"), outside.join("moved"))),
        libc::EXDEV,
        "out of the share"
    );
    assert_eq!(
        errno(fs::rename(outside.join("victim"), d.m("stolen"))),
        libc::EXDEV,
        "into the share"
    );
    // a rename inside the share over a name, and across directories, works
    fs::create_dir(d.m("sub")).unwrap();
    fs::rename(d.m("mine"), d.m("sub/mine")).unwrap();
    assert_eq!(fs::read(d.d("sub/mine")).unwrap(), b"guest");
    assert!(!outside.join("moved").exists() && outside.join("victim").exists());
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"host");
}

/// File handles: forged handles given to open_by_handle_at never reach a
/// file outside the share (the daemon does not serve handles; the kernel's
/// FUSE handles name node ids the daemon checks against its own table).
#[test]
fn forged_file_handles_reach_nothing_outside() {
    let d = Daemon::start(&[]);
    let outside = d.tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"host secret").unwrap();
    fs::write(d.d("f"), b"inside").unwrap();
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        data: [u8; 128],
    }
    let mut h = Handle {
        bytes: 128,
        kind: 0,
        data: [0; 128],
    };
    let mut mount_id = 0i32;
    let path = c(&d.m("f"));
    // SAFETY: valid path, handle buffer of the size announced, out pointer.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            path.as_ptr(),
            &mut h as *mut Handle,
            &mut mount_id as *mut i32,
            0,
        )
    };
    let mnt = fs::File::open(d.m("")).unwrap();
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut tries = 0;
    for _ in 0..500 {
        let mut forged = Handle {
            bytes: if rc == 0 { h.bytes } else { 16 },
            kind: if rc == 0 { h.kind } else { 1 },
            data: h.data,
        };
        for b in forged.data.iter_mut().take(forged.bytes as usize) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            *b = rng as u8;
        }
        // SAFETY: valid mount fd and handle struct; flags are plain.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                std::os::fd::AsRawFd::as_raw_fd(&mnt),
                &mut forged as *mut Handle,
                libc::O_RDONLY,
            )
        };
        tries += 1;
        if fd >= 0 {
            // SAFETY: a new fd nobody else owns.
            let mut f: fs::File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) };
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            assert!(
                !s.contains("host secret"),
                "a forged handle reached the host file"
            );
        }
    }
    assert_eq!(tries, 500);
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"host secret");
}

// ------------------------------------------------------------ hostile guest
//
// The FUSE client below (this test process, root, with CAP_FSETID) stands for
// a guest kernel whose root is hostile: docs/virtiofsd.md, "What the guest can
// and cannot do".

/// The server process of a daemon (the supervisor's only child).
fn server_pid(d: &Daemon) -> i32 {
    let p = d.pid();
    let children = fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap();
    let pids: Vec<i32> = children
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 1, "children of {p}: {children:?}");
    pids[0]
}

fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

fn status_kib(pid: i32, key: &str) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let l = s.lines().find(|l| l.starts_with(key)).unwrap();
    l.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// (soft, hard) "Max open files" of `pid`.
fn nofile(pid: i32) -> (u64, u64) {
    let s = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let l = s.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let v: Vec<u64> = l
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0], v[1])
}

fn refused(m: &MetricsResponse, name: &str) -> u64 {
    m.ops.iter().find(|o| o.op == name).map_or(0, |o| {
        assert_eq!(o.count, o.errors);
        o.count
    })
}

/// (2a) A setuid/setgid file of the image (made on the host side) is shown
/// to the guest as it is; any write or truncation through the mount, by a
/// root writer with CAP_FSETID (whose kernel asks for no privilege kill),
/// leaves it without the bits on the host. Before: the daemon kept
/// CAP_FSETID and the bits survived a write.
#[test]
fn guest_writes_and_truncates_clear_setid_bits_on_the_host() {
    let d = Daemon::start(&["--cache", "none"]);
    let image = |n: &str| {
        fs::write(d.d(n), b"\x7fELF original").unwrap();
        fs::set_permissions(d.d(n), fs::Permissions::from_mode(0o6755)).unwrap();
    };
    for n in ["su", "ping", "mount", "passwd", "chsh", "sudo"] {
        image(n);
    }
    let host = |n: &str| fs::metadata(d.d(n)).unwrap().mode() & 0o7777;
    // the image's bits are reported as they are (the guest enforces them)
    assert_eq!(fs::metadata(d.m("su")).unwrap().mode() & 0o7777, 0o6755);

    // WRITE in the middle, no truncation
    let mut f = fs::OpenOptions::new().write(true).open(d.m("su")).unwrap();
    assert_eq!(host("su"), 0o6755, "opening for writing changes nothing");
    f.write_all(b"\x7fELF evil").unwrap();
    drop(f);
    assert_eq!(host("su"), 0o755, "WRITE");
    // O_APPEND write
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(d.m("sudo"))
        .unwrap();
    f.write_all(b" more").unwrap();
    drop(f);
    assert_eq!(host("sudo"), 0o755, "append WRITE");
    // truncate through an open file (SETATTR size with a handle)
    let f = fs::OpenOptions::new()
        .write(true)
        .open(d.m("ping"))
        .unwrap();
    f.set_len(3).unwrap();
    drop(f);
    assert_eq!(host("ping"), 0o755, "ftruncate");
    // truncate by path (SETATTR size without a handle)
    nix::unistd::truncate(&d.m("chsh"), 1).unwrap();
    assert_eq!(host("chsh"), 0o755, "truncate");
    // O_TRUNC open
    drop(
        fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(d.m("mount"))
            .unwrap(),
    );
    assert_eq!(host("mount"), 0o755, "O_TRUNC");
    // fallocate
    let f = fs::OpenOptions::new()
        .write(true)
        .open(d.m("passwd"))
        .unwrap();
    nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, 1 << 20).unwrap();
    drop(f);
    assert_eq!(host("passwd"), 0o755, "fallocate");
    // and the guest cannot put them back
    fs::set_permissions(d.m("su"), fs::Permissions::from_mode(0o6755)).unwrap();
    assert_eq!(host("su"), 0o755, "chmod");
    // what the guest sees agrees
    assert_eq!(fs::metadata(d.m("su")).unwrap().mode() & 0o7777, 0o755);
}

/// (7b) The vhost-user and control sockets are 0600 whatever the umask the
/// daemon was started with (here 000). Before: 0777 & ~umask.
#[test]
fn sockets_are_0600_whatever_the_umask() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    kata_tests::require_root();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shared");
    fs::create_dir(&dir).unwrap();
    let sock = tmp.path().join("vhost.sock");
    let ctl = tmp.path().join("ctl.sock");
    let mut cmd = Command::new(kata_tests::bin("kata-virtiofsd"));
    cmd.arg("--socket-path")
        .arg(&sock)
        .arg("--control-socket")
        .arg(&ctl)
        .arg("--shared-dir")
        .arg(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped());
    // SAFETY: umask is async-signal-safe and touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    /// Kills the one daemon this test started.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(cmd.spawn().expect("kata-virtiofsd starts"));
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "READY");
    for s in [&sock, &ctl] {
        let m = fs::symlink_metadata(s).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.mode() & 0o7777, 0o600, "{}", s.display());
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!sock.exists() && !ctl.exists());
}

/// (4) RLIMIT_NOFILE of the server is set from the caps: lowered to exactly
/// what they need when more was inherited, and when the hard limit is too low
/// for the defaults (and cannot be raised: no CAP_SYS_RESOURCE, or above
/// fs.nr_open) the caps are lowered to fit it instead.
#[test]
fn rlimit_nofile_fits_the_caps() {
    const RESERVE: u64 = 512;
    // small caps: the limit is lowered to them
    let d = Daemon::start(&["--max-handles", "1000", "--max-inodes", "3000"]);
    let want = 1000 + 3000 + RESERVE;
    assert_eq!(nofile(server_pid(&d)), (want, want));
    drop(d);

    // the defaults: 65,536 handles + 262,144 inodes + the reserve
    let need = 65_536 + 262_144 + RESERVE;
    let (_, hard) = nofile(std::process::id() as i32);
    let nr_open: u64 = fs::read_to_string("/proc/sys/fs/nr_open")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let can_raise = caps_has_sys_resource() && nr_open >= need;
    let d = Daemon::start(&[]);
    let got = nofile(server_pid(&d));
    if hard >= need || can_raise {
        assert_eq!(got, (need, need));
    } else {
        // lowered caps: a quarter of the budget for handles
        assert_eq!(got, (hard, hard));
        let handles = (hard - RESERVE) / 4;
        fs::write(d.m("f"), b"x").unwrap();
        let mut held = Vec::new();
        let err = loop {
            match fs::File::open(d.m("f")) {
                Ok(f) => held.push(f),
                Err(e) => break e,
            }
            assert!(held.len() as u64 <= handles, "no cap at {handles}");
        };
        assert_eq!(err.raw_os_error(), Some(libc::EMFILE));
        assert_eq!(held.len() as u64, handles);
    }
}

fn caps_has_sys_resource() -> bool {
    let s = fs::read_to_string("/proc/self/status").unwrap();
    let l = s.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    let eff = u64::from_str_radix(l.split_whitespace().nth(1).unwrap(), 16).unwrap();
    // CAP_SYS_RESOURCE is capability 24
    eff & (1 << 24) != 0
}

/// (4) 100,000 OPENs without RELEASE through the mount: the daemon holds at
/// most its handle cap (the rest are EMFILE, counted in Metrics), its fds
/// stay under RLIMIT_NOFILE and its RSS under 64 MiB, and it still answers:
/// LOOKUP, READ on a held file, and once files are closed (RELEASE) OPEN
/// works again and the fds are closed. Before: one fd and one table entry
/// per OPEN up to the inherited RLIMIT_NOFILE, then EMFILE for every other
/// request needing an fd.
#[test]
fn a_hundred_thousand_opens_stay_under_the_caps() {
    const HANDLES: usize = 8192;
    const INODES: usize = 4096;
    const OPENS: usize = 100_000;
    const RSS_MAX_KIB: u64 = 64 * 1024;
    let d = Daemon::start(&[
        "--cache",
        "auto",
        "--max-handles",
        &HANDLES.to_string(),
        "--max-inodes",
        &INODES.to_string(),
    ]);
    let server = server_pid(&d);
    let (soft, _) = nofile(server);
    fs::write(d.m("f"), b"still here").unwrap();
    fs::write(d.m("g"), b"other").unwrap();
    let (fds0, rss0) = (fd_count(server), status_kib(server, "VmRSS:"));

    let mut held = Vec::new();
    let mut emfile = 0;
    let t = Instant::now();
    for _ in 0..OPENS {
        match fs::File::open(d.m("f")) {
            Ok(f) => held.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
                emfile += 1;
            }
        }
    }
    let took = t.elapsed();
    let (fds1, rss1, hwm) = (
        fd_count(server),
        status_kib(server, "VmRSS:"),
        status_kib(server, "VmHWM:"),
    );
    eprintln!(
        "{OPENS} OPENs in {took:?}: held {}, EMFILE {emfile}; server fds {fds0} -> {fds1} \
         (RLIMIT_NOFILE {soft}), RSS {rss0} -> {rss1} KiB (peak {hwm})",
        held.len()
    );
    assert_eq!(held.len(), HANDLES);
    assert_eq!(emfile, OPENS - HANDLES);
    assert!(fds1 as u64 <= soft, "{fds1} fds over the limit {soft}");
    assert!(fds1 <= fds0 + HANDLES + 8, "fds {fds0} -> {fds1}");
    assert!(hwm < RSS_MAX_KIB, "RSS peak {hwm} KiB");

    // still answering: LOOKUP and GETATTR, READ through a held file
    assert_eq!(fs::metadata(d.m("g")).unwrap().len(), 5);
    let mut buf = String::new();
    held[0].read_to_string(&mut buf).unwrap();
    assert_eq!(buf, "still here");
    assert_eq!(
        errno(fs::File::open(d.m("g"))),
        libc::EMFILE,
        "the budget is spent"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = rt.block_on(async { d.client().await.metrics(()).await.unwrap().into_inner() });
    assert_eq!(refused(&m, "REFUSED_HANDLES"), (OPENS - HANDLES + 1) as u64);
    assert_eq!(refused(&m, "REFUSED_INODES"), 0);

    // RELEASE (sent by the kernel shortly after close) gives the budget back
    held.truncate(HANDLES - 100);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut again = Vec::new();
    while again.len() < 100 {
        match fs::File::open(d.m("g")) {
            Ok(f) => again.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EMFILE));
                assert!(Instant::now() < deadline, "RELEASE gave nothing back");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    let mut buf = String::new();
    again[0].read_to_string(&mut buf).unwrap();
    assert_eq!(buf, "other");
    drop(again);
    drop(held);
    // every fd closed again
    let deadline = Instant::now() + Duration::from_secs(10);
    while fd_count(server) > fds0 + 8 {
        assert!(
            Instant::now() < deadline,
            "server fds still {} (from {fds0})",
            fd_count(server)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (4) LOOKUP without FORGET through the mount: a guest holding more inodes
/// than the cap gets ENFILE for new names (counted), the daemon's fds stay
/// bounded, names it already holds still work, and once the kernel forgets
/// (drop_caches) the room is back.
#[test]
fn inodes_held_stop_at_the_cap() {
    const INODES: usize = 500;
    let d = Daemon::start(&["--cache", "always", "--max-inodes", &INODES.to_string()]);
    let server = server_pid(&d);
    for i in 0..1000 {
        fs::write(d.d(&format!("f{i}")), b"").unwrap();
    }
    let fds0 = fd_count(server);
    // every stat needs a LOOKUP; nothing of the host's dentries is held by
    // anyone but the kernel's FUSE inodes
    let mut enfile = 0;
    let mut ok = 0;
    for i in 0..1000 {
        match fs::metadata(d.m(&format!("f{i}"))) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENFILE), "{e}");
                enfile += 1;
            }
        }
    }
    // the root is one of the inodes held
    assert!(ok < INODES, "{ok} inodes held past a cap of {INODES}");
    assert!(
        enfile >= 1000 - (INODES - 1),
        "{enfile} refusals, {ok} held"
    );
    let fds1 = fd_count(server);
    assert!(fds1 <= fds0 + INODES, "fds {fds0} -> {fds1}");
    // a name already held still works
    assert!(fs::metadata(d.m("f0")).is_ok());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let m = rt.block_on(async { d.client().await.metrics(()).await.unwrap().into_inner() });
    assert!(refused(&m, "REFUSED_INODES") >= enfile as u64);

    // the kernel drops its unused dentries and inodes: FORGET gives the room
    // back and the fds are closed
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        fs::write("/proc/sys/vm/drop_caches", b"2").unwrap();
        if fs::metadata(d.m("f999")).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "no room after drop_caches");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(fd_count(server) < fds1, "FORGET closed no fd");
}
