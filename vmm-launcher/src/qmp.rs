//! A small QMP client: QEMU's JSON control protocol over a unix socket.
//!
//! One reader task owns the socket's read half: replies are matched to their
//! command by `id`, events go to a broadcast channel. Every command has a
//! deadline, so a wedged QEMU never hangs the launcher.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};
use tracing::debug;

/// The longest QMP line we accept (QEMU's replies here are small).
const MAX_LINE: usize = 1 << 20;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QmpError {
    /// Socket I/O.
    #[error("QMP socket {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// QEMU closed the socket (it exited).
    #[error("QMP: QEMU closed the connection")]
    Closed,
    /// QEMU did not answer in time.
    #[error("QMP: no reply to {command} within {timeout:?}")]
    Timeout {
        /// The command.
        command: String,
        /// The deadline.
        timeout: Duration,
    },
    /// QEMU answered with an error.
    #[error("QMP: {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// Not QMP.
    #[error("QMP: unexpected message: {0}")]
    Protocol(String),
}

/// An asynchronous event from QEMU (`SHUTDOWN`, `STOP`, `RESUME`, ...).
#[derive(Debug, Clone)]
pub(crate) struct Event {
    /// The event name.
    pub(crate) name: String,
    /// Its data.
    pub(crate) data: Value,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A connected QMP session (capabilities negotiated).
#[derive(Debug)]
pub(crate) struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: std::sync::atomic::AtomicU64,
    events: broadcast::Sender<Event>,
    timeout: Duration,
}

impl Qmp {
    /// Connects to `path`, reads the greeting and enters command mode.
    pub(crate) async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let io = |source| QmpError::Io {
            path: path.display().to_string(),
            source,
        };
        let stream = UnixStream::connect(path).await.map_err(io)?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read);
        let mut greeting = String::new();
        match tokio::time::timeout(timeout, read_line(&mut lines, &mut greeting)).await {
            Err(_) => {
                return Err(QmpError::Timeout {
                    command: "greeting".into(),
                    timeout,
                });
            }
            Ok(r) => r?,
        }
        let g: Value = serde_json::from_str(&greeting)
            .map_err(|_| QmpError::Protocol(greeting.trim().to_string()))?;
        if g.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.trim().to_string()));
        }
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(64);
        tokio::spawn(reader(lines, pending.clone(), events.clone()));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            next_id: 1.into(),
            events,
            timeout,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Subscribes to events from now on.
    pub(crate) fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Runs `command` with optional `arguments`; returns its `return` value.
    pub(crate) async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_with_fd(command, arguments, None).await
    }

    /// Runs `command`, passing `fd` with it (SCM_RIGHTS on the command's
    /// bytes), as `getfd` wants.
    pub(crate) async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let mut line = msg.to_string();
        line.push('\n');
        debug!(command, "QMP command");
        {
            let mut w = self.writer.lock().await;
            let mut sent = 0;
            if let Some(fd) = fd {
                match send_with_fd(&w, line.as_bytes(), fd).await {
                    Ok(n) => sent = n,
                    Err(_) => return Err(QmpError::Closed),
                }
            }
            if w.write_all(&line.as_bytes()[sent..]).await.is_err() {
                return Err(QmpError::Closed);
            }
        }
        let reply = match tokio::time::timeout(self.timeout, rx).await {
            Err(_) => {
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                return Err(QmpError::Timeout {
                    command: command.into(),
                    timeout: self.timeout,
                });
            }
            Ok(Err(_)) => return Err(QmpError::Closed),
            Ok(Ok(v)) => v,
        };
        if let Some(err) = reply.get("error") {
            return Err(QmpError::Command {
                command: command.into(),
                class: err["class"].as_str().unwrap_or("?").into(),
                desc: err["desc"].as_str().unwrap_or("?").into(),
            });
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// `device_del` of `id`, then waits up to `timeout` for QEMU's
    /// `DEVICE_DELETED` of it (the guest let the device go). A timeout is
    /// [`QmpError::Timeout`]; the device may still go later.
    pub(crate) async fn device_del(&self, id: &str, timeout: Duration) -> Result<(), QmpError> {
        let mut events = self.events();
        self.execute("device_del", Some(json!({ "id": id })))
            .await?;
        let deleted = async {
            loop {
                match events.recv().await {
                    Ok(e) if e.name == "DEVICE_DELETED" && e.data["device"] == id => return true,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return false,
                }
            }
        };
        match tokio::time::timeout(timeout, deleted).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(QmpError::Closed),
            Err(_) => Err(QmpError::Timeout {
                command: format!("device_del {id} (DEVICE_DELETED)"),
                timeout,
            }),
        }
    }

    /// `query-status`'s `status` ("running", "paused", "prelaunch", ...).
    #[cfg(test)]
    pub(crate) async fn status(&self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        Ok(v["status"].as_str().unwrap_or("unknown").to_string())
    }
}

/// Sends the first bytes of `buf` with `fd` attached; returns how many went.
async fn send_with_fd(
    w: &OwnedWriteHalf,
    buf: &[u8],
    fd: BorrowedFd<'_>,
) -> std::io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let sock: &UnixStream = w.as_ref();
    let fds = [fd.as_raw_fd()];
    loop {
        sock.writable().await?;
        let r = sock.try_io(tokio::io::Interest::WRITABLE, || {
            sendmsg::<()>(
                sock.as_raw_fd(),
                &[std::io::IoSlice::new(buf)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match r {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn read_line(
    r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    buf: &mut String,
) -> Result<(), QmpError> {
    buf.clear();
    let n = (&mut *r)
        .take(MAX_LINE as u64)
        .read_line(buf)
        .await
        .map_err(|source| QmpError::Io {
            path: "qmp".into(),
            source,
        })?;
    if n == 0 {
        return Err(QmpError::Closed);
    }
    Ok(())
}

use tokio::io::AsyncReadExt as _;

async fn reader(
    mut lines: BufReader<tokio::net::unix::OwnedReadHalf>,
    pending: Pending,
    events: broadcast::Sender<Event>,
) {
    let mut line = String::new();
    while read_line(&mut lines, &mut line).await.is_ok() {
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            debug!(line = line.trim(), "QMP: ignoring a line that is not JSON");
            continue;
        };
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            debug!(event = name, "QMP event");
            let _ = events.send(Event {
                name: name.into(),
                data: v["data"].clone(),
            });
        } else if let Some(id) = v.get("id").and_then(Value::as_u64) {
            let tx = pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            if let Some(tx) = tx {
                let _ = tx.send(v);
            }
        }
    }
    // Dropping the senders wakes every waiter with Closed.
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn commands_events_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line).await.unwrap() == 0 {
                    break;
                }
                let v: Value = serde_json::from_str(&line).unwrap();
                let id = v["id"].clone();
                let reply = match v["execute"].as_str().unwrap() {
                    "query-status" => {
                        w.write_all(b"{\"event\": \"STOP\", \"data\": {}}\n")
                            .await
                            .unwrap();
                        json!({"return": {"status": "paused"}, "id": id})
                    }
                    "bogus" => {
                        json!({"error": {"class": "CommandNotFound", "desc": "no"}, "id": id})
                    }
                    "hang" => continue,
                    _ => json!({"return": {}, "id": id}),
                };
                w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
            }
        });
        let q = Qmp::connect(&path, Duration::from_millis(300))
            .await
            .unwrap();
        let mut ev = q.events();
        assert_eq!(q.status().await.unwrap(), "paused");
        assert_eq!(ev.recv().await.unwrap().name, "STOP");
        let e = q.execute("bogus", None).await.unwrap_err().to_string();
        assert!(e.contains("CommandNotFound"), "{e}");
        let e = q.execute("hang", None).await.unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn not_qmp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"hello\n").await.unwrap();
        });
        let e = Qmp::connect(&path, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, QmpError::Protocol(_)), "{e:?}");
    }
}
