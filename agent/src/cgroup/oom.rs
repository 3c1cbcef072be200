//! OOM notification.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

use super::files::*;
use super::layout::Layout;
use super::{CgroupError, ContainerCgroup};

impl ContainerCgroup {
    /// Starts watching for OOM kills in the cgroup.
    pub fn oom_events(&self) -> Result<OomWatch, CgroupError> {
        let missing = |detail: String| CgroupError::ControllerMissing {
            controller: "memory".into(),
            field: "OOM events".into(),
            detail,
        };
        match &self.layout {
            Layout::V2 { .. } => {
                let file = self.leaf().join("memory.events");
                if !file.exists() {
                    return Err(missing(format!(
                        "{} does not exist: the memory controller is not enabled for this cgroup",
                        file.display()
                    )));
                }
                OomWatch::on_memory_events(file)
            }
            Layout::V1 { .. } => {
                let dir = self
                    .ctl_dir("memory")
                    .ok_or_else(|| missing("no cgroup v1 memory hierarchy is mounted".into()))?;
                let file = dir.join("memory.oom_control");
                let control = fs::File::open(&file).map_err(|source| CgroupError::Read {
                    path: file.clone(),
                    source,
                })?;
                let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                    .map_err(|e| CgroupError::Watch {
                        path: file.clone(),
                        what: "eventfd",
                        source: io::Error::from(e),
                    })?;
                write_value(
                    &dir.join("cgroup.event_control"),
                    &format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()),
                )?;
                Ok(OomWatch {
                    file,
                    kind: WatchKind::V1 { _control: control },
                    fd: FdState::Idle(WatchFd(OwnedFd::from(efd))),
                    pending: 0,
                })
            }
        }
    }
}

/// The `oom_kill` count of a v2 `memory.events`.
pub(super) fn oom_kills(file: &Path) -> Result<u64, CgroupError> {
    let text = match fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CgroupError::Gone {
                path: file.parent().unwrap_or(file).to_path_buf(),
            })
        }
        Err(source) => {
            return Err(CgroupError::Read {
                path: file.to_path_buf(),
                source,
            })
        }
    };
    Ok(parse_flat_keyed(&text)
        .get("oom_kill")
        .copied()
        .unwrap_or(0))
}

/// The eventfd (v1) or inotify (v2) descriptor of an [`OomWatch`].
#[derive(Debug)]
struct WatchFd(OwnedFd);

impl AsRawFd for WatchFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[derive(Debug)]
enum FdState {
    /// Not yet registered with tokio (that needs a runtime, and
    /// `oom_events` is synchronous).
    Idle(WatchFd),
    Armed(AsyncFd<WatchFd>),
    Broken,
}

#[derive(Debug)]
enum WatchKind {
    /// `memory.oom_control`, kept open while the eventfd is registered on it.
    V1 { _control: fs::File },
    /// The `oom_kill` count last seen.
    V2 { kills: u64 },
}

/// Resolves when the kernel OOM-killed a process of the cgroup. v1: an
/// eventfd registered through `cgroup.event_control` on `memory.oom_control`
/// (the kernel signals it when the cgroup hits its limit and the OOM killer
/// runs); v2: inotify on `memory.events`, counting rises of its `oom_kill`
/// field. Several kills between two calls of [`OomWatch::next`] give as many
/// results on v2; on v1 the eventfd counts OOM episodes.
#[derive(Debug)]
pub struct OomWatch {
    file: PathBuf,
    kind: WatchKind,
    fd: FdState,
    /// Events seen and not handed out yet.
    pending: u64,
}

impl OomWatch {
    /// The v2 watch: inotify on `file` (a `memory.events`).
    pub(super) fn on_memory_events(file: PathBuf) -> Result<OomWatch, CgroupError> {
        let werr = |what| {
            let path = file.clone();
            move |e: nix::Error| CgroupError::Watch {
                path,
                what,
                source: io::Error::from(e),
            }
        };
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(werr("inotify_init1"))?;
        ino.add_watch(&file, AddWatchFlags::IN_MODIFY)
            .map_err(werr("inotify_add_watch"))?;
        let kills = oom_kills(&file)?;
        Ok(OomWatch {
            file,
            kind: WatchKind::V2 { kills },
            fd: FdState::Idle(WatchFd(OwnedFd::from(ino))),
            pending: 0,
        })
    }

    /// Waits for the next OOM kill. Fails with [`CgroupError::Gone`] once the
    /// cgroup is removed (v1: the kernel wakes the eventfd then; v2: when the
    /// next wake-up finds `memory.events` gone). Cancel-safe: dropping the
    /// future loses no event. Needs a tokio runtime with I/O enabled.
    pub async fn next(&mut self) -> Result<(), CgroupError> {
        loop {
            if self.pending > 0 {
                self.pending -= 1;
                return Ok(());
            }
            if let WatchKind::V2 { kills } = &mut self.kind {
                // also catches kills between oom_events() and the first poll
                let now = oom_kills(&self.file)?;
                if now > *kills {
                    self.pending = now - *kills;
                    *kills = now;
                    continue;
                }
                *kills = now;
            }
            if let FdState::Idle(_) = self.fd {
                let FdState::Idle(fd) = std::mem::replace(&mut self.fd, FdState::Broken) else {
                    unreachable!("checked above")
                };
                // SAFETY: `WatchFd` owns its descriptor, which stays open and
                // is the same one for as long as the `AsyncFd` owns the
                // `WatchFd` (nothing else closes or replaces it).
                let afd = unsafe { AsyncFd::register(fd) }.map_err(|e| CgroupError::Watch {
                    path: self.file.clone(),
                    what: "register with the tokio reactor",
                    source: e.into_parts().1,
                })?;
                self.fd = FdState::Armed(afd);
            }
            let FdState::Armed(afd) = &self.fd else {
                return Err(CgroupError::Watch {
                    path: self.file.clone(),
                    what: "earlier registration failure",
                    source: io::Error::other("the watch is unusable; start a new one"),
                });
            };
            let mut guard = afd.readable().await.map_err(|source| CgroupError::Watch {
                path: self.file.clone(),
                what: "wait for readiness",
                source,
            })?;
            let v1 = matches!(self.kind, WatchKind::V1 { .. });
            let read = guard.try_io(|inner| {
                let mut buf = [0u8; 4096];
                let n = nix::unistd::read(&inner.get_ref().0, &mut buf).map_err(io::Error::from)?;
                if v1 && n >= 8 {
                    let mut c = [0u8; 8];
                    c.copy_from_slice(&buf[..8]);
                    Ok(u64::from_ne_bytes(c))
                } else {
                    Ok(0)
                }
            });
            match read {
                Err(_would_block) => continue,
                Ok(Err(source)) => {
                    return Err(CgroupError::Watch {
                        path: self.file.clone(),
                        what: "read",
                        source,
                    })
                }
                Ok(Ok(n)) => {
                    if v1 {
                        // the kernel also signals the eventfd when the cgroup goes
                        if !self.file.exists() {
                            return Err(CgroupError::Gone {
                                path: self.file.parent().unwrap_or(&self.file).to_path_buf(),
                            });
                        }
                        self.pending += n;
                    }
                }
            }
        }
    }
}
