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
