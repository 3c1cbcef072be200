//! The agent's stdio port protocol, both ends' shared part.
//!
//! A client opens one connection per stream and sends one header line,
//! `<STDIN|STDOUT|STDERR> <container_id> [<exec_id>]\n` (no exec id: the
//! container's init process). The agent answers `OK\n` or
//! `ERR <code> <message>\n` and then the raw bytes flow: the agent closes an
//! output stream after the process's last byte; a client half-closing STDIN
//! ends the process's input.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::dialer::{dial, Address, DialError, Stream};
use crate::paths::ports;

/// The release suffix of the kata-rs guest kernel (`6.1.192-kata-rs`),
/// which `kata-ctl image kernel` builds with every patch in
/// `bins/kernel-patches/`.
pub const KERNEL_SUFFIX: &str = "-kata-rs";

/// Whether the guest kernel of this release splices a pipe's pages into a
/// vsock stream by reference (vsock-splice-pages.patch, in every kata-rs
/// kernel), so that the agent's splice of a process's output copies nothing.
pub fn splice_sends_pages(release: &str) -> bool {
    release.ends_with(KERNEL_SUFFIX)
}

/// The longest header or reply line.
pub const MAX_LINE: usize = 512;

/// Which stream of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// Standard input (or the terminal's input).
    Stdin,
    /// Standard output (or the terminal's output).
    Stdout,
    /// Standard error (none with a terminal).
    Stderr,
}

impl Which {
    /// The header word.
    pub fn as_str(self) -> &'static str {
        match self {
            Which::Stdin => "STDIN",
            Which::Stdout => "STDOUT",
            Which::Stderr => "STDERR",
        }
    }
}

/// A parsed header line.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    /// Which stream.
    pub which: Which,
    /// The container.
    pub container_id: String,
    /// The exec id; empty for the container's init process.
    pub exec_id: String,
}

/// Parses a header line (without its newline).
pub fn parse_header(line: &str) -> Result<Header, String> {
    let mut w = line.split_ascii_whitespace();
    let which = match w.next() {
        Some("STDIN") => Which::Stdin,
        Some("STDOUT") => Which::Stdout,
        Some("STDERR") => Which::Stderr,
        other => {
            return Err(format!(
                "stdio header: expected STDIN, STDOUT or STDERR, got {other:?}"
            ))
        }
    };
    let container_id = w.next().ok_or("stdio header: no container id")?.to_string();
    let exec_id = w.next().unwrap_or_default().to_string();
    if w.next().is_some() {
        return Err(
            "stdio header: too many words; expected `<STREAM> <container_id> [<exec_id>]`".into(),
        );
    }
    Ok(Header {
        which,
        container_id,
        exec_id,
    })
}

/// Why attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The port could not be reached.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The agent refused, with a gRPC code name and a message.
    #[error("the agent refused {which} of {container}: {code}: {message}")]
    Refused {
        /// Which stream.
        which: &'static str,
        /// Container (and exec id).
        container: String,
        /// gRPC code name, e.g. NotFound.
        code: String,
        /// Why.
        message: String,
    },
    /// The conversation broke.
    #[error("stdio port: {0}")]
    Io(#[from] std::io::Error),
}

/// Opens one stdio stream of a process. `agent` is the agent's API address
/// (the stdio port is derived from it).
pub async fn attach(
    agent: &Address,
    which: Which,
    container_id: &str,
    exec_id: &str,
    timeout: Duration,
) -> Result<Stream, AttachError> {
    let mut s = dial(&agent.with_port(ports::STDIO), timeout).await?;
    let line = if exec_id.is_empty() {
        format!("{} {container_id}\n", which.as_str())
    } else {
        format!("{} {container_id} {exec_id}\n", which.as_str())
    };
    s.write_all(line.as_bytes()).await?;
    // One byte at a time: what follows the reply is process data.
    let mut reply = Vec::with_capacity(16);
    let read = async {
        loop {
            let mut b = [0u8; 1];
            if s.read(&mut b).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the agent closed the stdio stream before replying",
                ));
            }
            if b[0] == b'\n' {
                return Ok(());
            }
            if reply.len() >= MAX_LINE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "stdio reply line too long",
                ));
            }
            reply.push(b[0]);
        }
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "no stdio reply in time")
    })??;
    let reply = String::from_utf8_lossy(&reply).into_owned();
    if reply == "OK" {
        return Ok(s);
    }
    let rest = reply.strip_prefix("ERR ").unwrap_or(&reply);
    let (code, message) = rest.split_once(' ').unwrap_or((rest, ""));
    Err(AttachError::Refused {
        which: which.as_str(),
        container: if exec_id.is_empty() {
            container_id.to_string()
        } else {
            format!("{container_id}/{exec_id}")
        },
        code: code.to_string(),
        message: message.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        let h = parse_header("STDOUT c1").unwrap();
        assert_eq!(h.which, Which::Stdout);
        assert_eq!(h.container_id, "c1");
        assert_eq!(h.exec_id, "");
        let h = parse_header("STDIN c1 e2").unwrap();
        assert_eq!((h.which, h.exec_id.as_str()), (Which::Stdin, "e2"));
        assert!(parse_header("").is_err());
        assert!(parse_header("STDOUT").is_err());
        assert!(parse_header("FOO c").is_err());
        assert!(parse_header("STDOUT a b c").is_err());
    }
}
