//! The `kata-virtiofsd --fuse-mount` guard and small helpers shared by the
//! host-mount test files (`virtiofsd_fuse.rs`, `virtiofsd_posix.rs`).
//!
//! Every daemon is started by a [`Daemon`] guard that, whatever happens,
//! unmounts its own mount point (MNT_DETACH) and kills only the pid it started.

// each test file uses a different part of this module
#![allow(dead_code)]

use std::ffi::CString;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kata_proto::dialer::Address;
use kata_proto::virtiofsd::virtiofsd_client::VirtiofsdClient;

/// A running `kata-virtiofsd --fuse-mount` on a fresh shared dir and mount point.
pub struct Daemon {
    pub child: Option<Child>,
    /// The shared directory (the kernel's view).
    pub dir: PathBuf,
    /// The FUSE mount point.
    pub mnt: PathBuf,
    /// The control socket.
    pub ctl: PathBuf,
    pub tmp: tempfile::TempDir,
}

impl Daemon {
    pub fn start(args: &[&str]) -> Daemon {
        kata_tests::require_root();
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("shared");
        let mnt = tmp.path().join("mnt");
        let ctl = tmp.path().join("ctl.sock");
        fs::create_dir(&dir).unwrap();
        fs::create_dir(&mnt).unwrap();
        let mut child = Command::new(kata_tests::bin("kata-virtiofsd"))
            .arg("--fuse-mount")
            .arg(&mnt)
            .arg("--shared-dir")
            .arg(&dir)
            .arg("--control-socket")
            .arg(&ctl)
            .arg("--sandbox-id")
            .arg("fuse-test")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("kata-virtiofsd starts");
        let out = child.stdout.take().unwrap();
        let mut d = Daemon {
            child: Some(child),
            dir,
            mnt,
            ctl,
            tmp,
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(l) if l.trim() == "READY" => {}
            other => {
                let st = d.child.as_mut().unwrap().try_wait();
                panic!("kata-virtiofsd did not say READY within 10 s: {other:?}, status {st:?}");
            }
        }
        assert!(
            mounted(&d.mnt),
            "{} is not mounted after READY",
            d.mnt.display()
        );
        d
    }

    pub fn m(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    pub fn d(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGTERM, then the exit status (within 10 s).
    pub fn terminate(&mut self) -> ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                self.child = None;
                return st;
            }
            assert!(Instant::now() < deadline, "no exit within 10 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn client(&self) -> VirtiofsdClient<tonic::transport::Channel> {
        let ch =
            kata_proto::dialer::channel(&Address::Unix(self.ctl.clone()), Duration::from_secs(5))
                .await
                .expect("control socket");
        VirtiofsdClient::new(ch)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // our own mount point only
        let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Whether `p` is a mount point in this mount namespace.
pub fn mounted(p: &Path) -> bool {
    let p = p.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_str()))
}

pub fn errno(r: std::io::Result<impl std::fmt::Debug>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.raw_os_error().expect("an OS error"),
    }
}

pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// stat through the mount and on the shared dir agree.
pub fn same_stat(d: &Daemon, name: &str) {
    let a = fs::symlink_metadata(d.m(name)).unwrap();
    let b = fs::symlink_metadata(d.d(name)).unwrap();
    assert_eq!(a.mode(), b.mode(), "{name}: mode");
    assert_eq!(a.size(), b.size(), "{name}: size");
    assert_eq!(a.nlink(), b.nlink(), "{name}: nlink");
    assert_eq!((a.uid(), a.gid()), (b.uid(), b.gid()), "{name}: owner");
    assert_eq!(a.mtime(), b.mtime(), "{name}: mtime");
}

pub fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub fn setxattr(p: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let n = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a valid value slice.
    let rc = unsafe {
        libc::lsetxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn getxattr(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: the kernel writes at most buf.len() bytes.
    let rc = unsafe {
        libc::lgetxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(rc as usize);
    Ok(buf)
}

pub fn listxattr(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: the kernel writes at most buf.len() bytes.
    let rc = unsafe { libc::llistxattr(c(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(rc >= 0, "listxattr: {}", std::io::Error::last_os_error());
    buf.truncate(rc as usize);
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}
