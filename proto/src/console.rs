//! The debug console's session protocol (guest vsock port 1026), between the
//! agent and `kata-ctl exec`.
//!
//! A client may open with one header line, [`MAGIC`] followed by a JSON
//! [`Request`]:
//!
//! * `tty`: a shell on a pseudo-terminal of the given size; then raw bytes
//!   both ways until the shell ends (or the client leaves, which hangs the
//!   shell up).
//! * `exec`: one command, no terminal; the client's bytes are its stdin (a
//!   half-close ends it), and the agent answers with [`Frame`]s: stdout,
//!   stderr, then the exit status.
//!
//! A client that sends no header within [`HEADER_WAIT`] (a person with
//! `socat`, as Kata's documentation shows) gets a shell on an 80x24 terminal,
//! and what it sent so far is the shell's first input.

use serde::{Deserialize, Serialize};

/// The header's first bytes.
pub const MAGIC: &str = "KATA-CONSOLE 1 ";
/// The longest header line.
pub const MAX_HEADER: usize = 64 << 10;
/// How long the agent waits for a header before starting a plain shell.
pub const HEADER_WAIT: std::time::Duration = std::time::Duration::from_millis(300);
/// The longest output frame a client accepts.
pub const MAX_FRAME: usize = 1 << 20;

/// What a session is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Request {
    /// An interactive shell on a terminal of this size.
    Tty {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// One command and its exit status.
    Exec {
        /// The program and its arguments.
        argv: Vec<String>,
    },
}

impl Request {
    /// The header line, newline included.
    pub fn header(&self) -> String {
        format!(
            "{MAGIC}{}\n",
            serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
        )
    }

    /// The request of a header line (without its newline).
    pub fn parse(line: &str) -> Result<Request, String> {
        let json = line
            .strip_prefix(MAGIC)
            .ok_or_else(|| "not a console header".to_string())?;
        let r: Request = serde_json::from_str(json).map_err(|e| format!("console header: {e}"))?;
        if let Request::Exec { argv } = &r {
            if argv.is_empty() || argv[0].is_empty() {
                return Err("console header: exec needs a program".into());
            }
        }
        Ok(r)
    }
}

/// An `exec` session's output frames: a kind byte, a 4-byte big-endian
/// length, the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Bytes of the command's stdout.
    Stdout(Vec<u8>),
    /// Bytes of its stderr.
    Stderr(Vec<u8>),
    /// Its exit status (128 + N when signal N ended it); the last frame.
    Exit(i32),
}

impl Frame {
    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, data): (u8, &[u8]) = match self {
            Frame::Stdout(d) => (1, d),
            Frame::Stderr(d) => (2, d),
            Frame::Exit(c) => {
                let mut v = vec![3];
                v.extend_from_slice(&4u32.to_be_bytes());
                v.extend_from_slice(&c.to_be_bytes());
                return v;
            }
        };
        let mut v = Vec::with_capacity(5 + data.len());
        v.push(kind);
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }
}

/// Decodes frames from the bytes of a stream (the client side: the guest
/// is not trusted, so frames are bounded and checked).
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// Adds received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, `None` until enough bytes came.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, String> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_FRAME {
            return Err(format!("console frame of {len} bytes (limit {MAX_FRAME})"));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let data: Vec<u8> = self.buf[5..5 + len].to_vec();
        let kind = self.buf[0];
        self.buf.drain(..5 + len);
        match kind {
            1 => Ok(Some(Frame::Stdout(data))),
            2 => Ok(Some(Frame::Stderr(data))),
            3 if len == 4 => Ok(Some(Frame::Exit(i32::from_be_bytes([
                data[0], data[1], data[2], data[3],
            ])))),
            k => Err(format!("console frame of unknown kind {k} or bad length")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_and_frames_round_trip() {
        let r = Request::Tty {
            rows: 30,
            cols: 100,
        };
        let h = r.header();
        assert!(h.starts_with(MAGIC) && h.ends_with('\n'));
        assert_eq!(Request::parse(h.trim_end()).unwrap(), r);
        let e = Request::Exec {
            argv: vec!["sh".into(), "-c".into(), "exit 3".into()],
        };
        assert_eq!(Request::parse(e.header().trim_end()).unwrap(), e);
        assert!(Request::parse("KATA-CONSOLE 1 {\"mode\":\"exec\",\"argv\":[]}").is_err());
        assert!(Request::parse("ls -l").is_err());

        let mut bytes = Vec::new();
        for f in [
            Frame::Stdout(b"out".to_vec()),
            Frame::Stderr(b"err".to_vec()),
            Frame::Exit(3),
        ] {
            bytes.extend(f.encode());
        }
        let mut r = FrameReader::default();
        let mut got = Vec::new();
        for b in bytes {
            r.feed(&[b]);
            while let Some(f) = r.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(
            got,
            [
                Frame::Stdout(b"out".to_vec()),
                Frame::Stderr(b"err".to_vec()),
                Frame::Exit(3)
            ]
        );
        let mut r = FrameReader::default();
        r.feed(&[1, 0xff, 0xff, 0xff, 0xff]);
        assert!(r.next_frame().is_err());
        let mut r = FrameReader::default();
        r.feed(&[9, 0, 0, 0, 0]);
        assert!(r.next_frame().is_err());
    }
}
