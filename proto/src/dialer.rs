//! Dialers: the one way every host program reaches a guest port.
//!
//! * `vsock://CID:PORT`: AF_VSOCK (the host has `/dev/vhost-vsock`);
//! * `hvsock:///path/to/vsock.sock:PORT`: hybrid vsock, the Firecracker / Cloud
//!   Hypervisor convention: connect to the unix socket, write `CONNECT <port>\n`,
//!   read `OK <host port>\n`, then the stream is the guest connection;
//! * `unix:///path`: a host-mode agent listening on a unix socket (tests).
//!
//! Every dial has a deadline, and the errors say which address failed and why.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use tokio_vsock::{VsockAddr, VsockStream};

/// The longest reply line a hybrid vsock backend may send (`OK 4294967295\n`).
const MAX_REPLY: usize = 32;

/// Where a guest (or host-mode) port is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// AF_VSOCK.
    Vsock {
        /// Guest context id.
        cid: u32,
        /// Guest port.
        port: u32,
    },
    /// Hybrid vsock through a unix socket.
    Hybrid {
        /// The backend's host socket.
        path: PathBuf,
        /// Guest port.
        port: u32,
    },
    /// A plain unix socket.
    Unix(PathBuf),
}

impl Address {
    /// The same endpoint, another port: the guest port for vsock and hybrid
    /// vsock; for a plain unix socket (a host-mode agent) the sibling socket
    /// `<path>_<port>`, the hybrid-vsock naming of a port on the host side.
    pub fn with_port(&self, port: u32) -> Address {
        match self {
            Address::Vsock { cid, .. } => Address::Vsock { cid: *cid, port },
            Address::Hybrid { path, .. } => Address::Hybrid {
                path: path.clone(),
                port,
            },
            Address::Unix(path) => Address::Unix(crate::paths::hybrid_listener_path(path, port)),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Address::Hybrid { path, port } => write!(f, "hvsock://{}:{port}", path.display()),
            Address::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// Why an address did not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid address {input:?}: {reason} (expected vsock://CID:PORT, hvsock:///PATH:PORT or unix:///PATH)")]
pub struct AddressError {
    input: String,
    reason: &'static str,
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| AddressError {
            input: s.to_string(),
            reason,
        };
        let port_of = |rest: &str| -> Result<(String, u32), AddressError> {
            let (head, port) = rest.rsplit_once(':').ok_or_else(|| err("no :PORT"))?;
            let port = port
                .parse::<u32>()
                .map_err(|_| err("the port is not a number"))?;
            Ok((head.to_string(), port))
        };
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = port_of(rest)?;
            let cid = cid
                .parse::<u32>()
                .map_err(|_| err("the CID is not a number"))?;
            Ok(Address::Vsock { cid, port })
        } else if let Some(rest) = s.strip_prefix("hvsock://") {
            let (path, port) = port_of(rest)?;
            if !path.starts_with('/') {
                return Err(err("the socket path must be absolute"));
            }
            Ok(Address::Hybrid {
                path: path.into(),
                port,
            })
        } else if let Some(rest) = s.strip_prefix("unix://") {
            if !rest.starts_with('/') {
                return Err(err("the socket path must be absolute"));
            }
            Ok(Address::Unix(rest.into()))
        } else {
            Err(err("unknown scheme"))
        }
    }
}

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The deadline passed.
    #[error("dialing {addr}: no connection within {timeout:?}")]
    Timeout {
        /// Where.
        addr: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The socket could not be reached.
    #[error("dialing {addr}: {source}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The hybrid vsock backend closed the connection before `OK`: nothing
    /// listens on that guest port (yet), or the guest is not up.
    #[error("dialing {addr}: the guest refused the connection (nothing listening on that port, or the guest is not ready)")]
    Refused {
        /// Where.
        addr: String,
    },
    /// The hybrid vsock backend answered something else than `OK <n>`.
    #[error("dialing {addr}: unexpected reply from the vsock backend: {reply:?}")]
    BadReply {
        /// Where.
        addr: String,
        /// What it said.
        reply: String,
    },
}

/// A connected stream to a guest or host-mode port.
#[derive(Debug)]
pub enum Stream {
    /// Unix socket (hybrid vsock or host mode).
    Unix(UnixStream),
    /// AF_VSOCK.
    Vsock(VsockStream),
}

impl std::os::fd::AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Vsock(s) => s.as_fd(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Vsock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Vsock(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Vsock(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Vsock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Connects to `addr` within `timeout`.
pub async fn dial(addr: &Address, timeout: Duration) -> Result<Stream, DialError> {
    match tokio::time::timeout(timeout, dial_inner(addr)).await {
        Ok(r) => r,
        Err(_) => Err(DialError::Timeout {
            addr: addr.to_string(),
            timeout,
        }),
    }
}

async fn dial_inner(addr: &Address) -> Result<Stream, DialError> {
    let connect_err = |source| DialError::Connect {
        addr: addr.to_string(),
        source,
    };
    match addr {
        Address::Vsock { cid, port } => {
            let s = VsockStream::connect(VsockAddr::new(*cid, *port))
                .await
                .map_err(connect_err)?;
            Ok(Stream::Vsock(s))
        }
        Address::Unix(path) => Ok(Stream::Unix(
            UnixStream::connect(path).await.map_err(connect_err)?,
        )),
        Address::Hybrid { path, port } => {
            let mut s = UnixStream::connect(path).await.map_err(connect_err)?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())
                .await
                .map_err(connect_err)?;
            // Read the reply a byte at a time: whatever follows the newline is
            // already guest data and must stay in the socket.
            let mut line = Vec::with_capacity(MAX_REPLY);
            loop {
                let mut b = [0u8; 1];
                match s.read(&mut b).await {
                    Ok(0) => {
                        return Err(DialError::Refused {
                            addr: addr.to_string(),
                        })
                    }
                    Ok(_) if b[0] == b'\n' => break,
                    Ok(_) if line.len() < MAX_REPLY => line.push(b[0]),
                    Ok(_) => {
                        return Err(DialError::BadReply {
                            addr: addr.to_string(),
                            reply: String::from_utf8_lossy(&line).into_owned(),
                        })
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                        ) =>
                    {
                        return Err(DialError::Refused {
                            addr: addr.to_string(),
                        })
                    }
                    Err(e) => return Err(connect_err(e)),
                }
            }
            let reply = String::from_utf8_lossy(&line);
            match reply.strip_prefix("OK ").map(|n| n.trim().parse::<u32>()) {
                Some(Ok(_)) => Ok(Stream::Unix(s)),
                _ => Err(DialError::BadReply {
                    addr: addr.to_string(),
                    reply: reply.into_owned(),
                }),
            }
        }
    }
}

/// A tonic channel to `addr`. The connection is made now (so errors show here),
/// each dial limited by `timeout`.
pub async fn channel(
    addr: &Address,
    timeout: Duration,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let addr = addr.clone();
    tonic::transport::Endpoint::from_static("http://kata.invalid")
        .connect_timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_| {
            let addr = addr.clone();
            async move { dial(&addr, timeout).await.map(TokioIo::new) }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn parse() {
        assert_eq!(
            "vsock://3:1024".parse::<Address>().unwrap(),
            Address::Vsock { cid: 3, port: 1024 }
        );
        assert_eq!(
            "hvsock:///run/kata/x/vsock.sock:1024"
                .parse::<Address>()
                .unwrap(),
            Address::Hybrid {
                path: "/run/kata/x/vsock.sock".into(),
                port: 1024
            }
        );
        assert_eq!(
            "unix:///a/b".parse::<Address>().unwrap(),
            Address::Unix("/a/b".into())
        );
        for bad in [
            "vsock://x:1",
            "vsock://3",
            "hvsock://rel:1",
            "tcp://1.2.3.4:5",
            "unix://rel",
        ] {
            let e = bad.parse::<Address>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    async fn backend(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            s.write_all(reply).await.unwrap();
            // keep the stream open a while so the client sees the reply
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        (dir, path)
    }

    #[tokio::test]
    async fn hybrid_ok_keeps_following_bytes() {
        let (_d, path) = backend(b"OK 5000\nhello").await;
        let mut s = dial(
            &Address::Hybrid { path, port: 1024 },
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[tokio::test]
    async fn hybrid_refused_and_garbage() {
        let (_d, path) = backend(b"").await;
        let e = dial(
            &Address::Hybrid { path, port: 1024 },
            Duration::from_secs(2),
        )
        .await;
        assert!(matches!(e, Err(DialError::Refused { .. })), "{e:?}");
        let (_d, path) = backend(b"NOPE\n").await;
        let e = dial(
            &Address::Hybrid { path, port: 1024 },
            Duration::from_secs(2),
        )
        .await;
        assert!(matches!(e, Err(DialError::BadReply { .. })), "{e:?}");
        let (_d, path) = backend(&[b'x'; 100]).await;
        let e = dial(
            &Address::Hybrid { path, port: 1024 },
            Duration::from_secs(2),
        )
        .await;
        assert!(matches!(e, Err(DialError::BadReply { .. })), "{e:?}");
    }

    #[tokio::test]
    async fn timeout_and_missing_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let e = dial(
            &Address::Hybrid {
                path: path.clone(),
                port: 1,
            },
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("v.sock"), "{e}");
        // a backend that accepts and never answers
        let _l = UnixListener::bind(&path).unwrap();
        let e = dial(
            &Address::Hybrid { path, port: 1 },
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, DialError::Timeout { .. }), "{e:?}");
    }
}
