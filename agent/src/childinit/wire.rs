//! The messages between the agent and its set-up helper on fd 3: a u32
//! big-endian length, then JSON, at most [`MAX_MSG`] bytes.

use std::io::{Read, Write};
use std::path::PathBuf;

use oci_spec::runtime::{Process, Spec};
use serde::{Deserialize, Serialize};

/// The largest message either side accepts.
pub const MAX_MSG: u32 = 4 << 20;

/// What the helper is asked to do.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChildRequest {
    /// Make a container, or join one.
    pub mode: ChildMode,
    /// The container's spec (namespaces, mounts, paths, sysctls, seccomp).
    pub spec: Spec,
    /// What to run (the spec's process, or the exec's).
    pub process: Process,
    /// Apply `linux.seccomp` from the spec.
    pub seccomp: bool,
}

/// Container or exec.
#[derive(Debug, Serialize, Deserialize)]
pub enum ChildMode {
    /// A new container whose root filesystem is at this (agent-side) path.
    Create {
        /// The rootfs, as the agent sees it.
        rootfs: PathBuf,
    },
    /// A process in the namespaces of the container whose init has this pid.
    Exec {
        /// The container's init process.
        target_pid: i32,
    },
}

/// What the helper reports.
#[derive(Debug, Serialize, Deserialize)]
pub enum ChildMsg {
    /// The container/exec process, as the agent sees it.
    Pid(i32),
    /// The container is set up and waits for the start byte.
    Ready,
    /// Set-up failed.
    Error {
        /// Which gRPC code the agent answers with.
        code: SetupCode,
        /// What failed, for the user.
        message: String,
    },
}

/// The gRPC code of a set-up failure, as the helper reports it (its name on
/// the wire, so an unknown name fails to decode instead of being guessed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetupCode {
    /// The spec asks for something impossible.
    InvalidArgument,
    /// A file the spec names (program, working directory) does not exist.
    NotFound,
    /// The kernel refused (execve EACCES/EPERM).
    PermissionDenied,
    /// The container is not in a state for it (its process is gone).
    FailedPrecondition,
    /// Anything else.
    Internal,
}

impl From<SetupCode> for tonic::Code {
    fn from(c: SetupCode) -> tonic::Code {
        match c {
            SetupCode::InvalidArgument => tonic::Code::InvalidArgument,
            SetupCode::NotFound => tonic::Code::NotFound,
            SetupCode::PermissionDenied => tonic::Code::PermissionDenied,
            SetupCode::FailedPrecondition => tonic::Code::FailedPrecondition,
            SetupCode::Internal => tonic::Code::Internal,
        }
    }
}

/// Writes one message.
pub fn send<T: Serialize>(w: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)
}

/// Reads one message; `Ok(None)` at a clean end of file.
pub fn recv<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_MSG {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message of {len} bytes is over the {MAX_MSG}-byte limit"),
        ));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure crosses the helper's socket with its code; a message with
    /// a code the agent does not know is refused, not read as Internal.
    #[test]
    fn setup_errors_keep_their_code() {
        let mut buf = vec![];
        send(
            &mut buf,
            &ChildMsg::Error {
                code: SetupCode::NotFound,
                message: "executable file \"nope\" not found".into(),
            },
        )
        .unwrap();
        let got: ChildMsg = recv(&mut buf.as_slice()).unwrap().unwrap();
        let ChildMsg::Error { code, message } = got else {
            panic!("{got:?}");
        };
        let st = crate::container::status_from(code, message);
        assert_eq!(st.code(), tonic::Code::NotFound);
        assert!(st.message().contains("nope"));
        for (c, want) in [
            (SetupCode::InvalidArgument, tonic::Code::InvalidArgument),
            (SetupCode::PermissionDenied, tonic::Code::PermissionDenied),
            (
                SetupCode::FailedPrecondition,
                tonic::Code::FailedPrecondition,
            ),
            (SetupCode::Internal, tonic::Code::Internal),
        ] {
            assert_eq!(tonic::Code::from(c), want);
        }
        let body = br#"{"Error":{"code":"Bogus","message":"x"}}"#;
        let mut framed = (body.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(body);
        assert!(recv::<ChildMsg>(&mut framed.as_slice()).is_err());
    }
}
