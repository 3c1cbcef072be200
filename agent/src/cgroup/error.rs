//! [`CgroupError`]: why a cgroup operation failed.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Why a cgroup operation failed. Each message names the path or field at
/// fault and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A resource value is out of range or inconsistent.
    #[error("invalid linux.resources {field}: {reason}")]
    InvalidArgument {
        /// The OCI field, e.g. `memory.limit`.
        field: String,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// The OCI `cgroupsPath` cannot be used.
    #[error("invalid cgroupsPath {path:?}: {reason}")]
    InvalidPath {
        /// As given.
        path: String,
        /// Why.
        reason: String,
    },
    /// No cgroup file system is mounted.
    #[error("no cgroup hierarchy found: {0}")]
    NoHierarchy(String),
    /// The resources (or the operation) need a controller this machine lacks.
    #[error("the {controller} cgroup controller is needed for {field}, but {detail}")]
    ControllerMissing {
        /// e.g. `hugetlb`.
        controller: String,
        /// The OCI field or operation that needs it.
        field: String,
        /// Why it is missing and what to do.
        detail: String,
    },
    /// The cgroup directory does not exist (any more).
    #[error("cgroup {} does not exist: it was destroyed or never created", .path.display())]
    Gone {
        /// The directory.
        path: PathBuf,
    },
    /// The cgroup exists and still holds processes.
    #[error("cgroup {} already exists and holds processes {pids:?}: destroy the old container first or use another cgroupsPath", .path.display())]
    NotEmpty {
        /// The directory.
        path: PathBuf,
        /// Its processes.
        pids: Vec<i32>,
    },
    /// Reading a cgroup file failed.
    #[error("cannot read {}: {source}{}", .path.display(), io_hint(.source))]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Writing a cgroup file failed.
    #[error("cannot write {value:?} to {}: {source}{}", .path.display(), io_hint(.source))]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// Why.
        source: io::Error,
    },
    /// Creating a cgroup directory failed.
    #[error("cannot create cgroup directory {}: {source}{}", .path.display(), io_hint(.source))]
    Create {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Removing a cgroup directory failed.
    #[error("cannot remove cgroup directory {}: {source}{}", .path.display(), io_hint(.source))]
    Remove {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A cgroup file holds something unexpected.
    #[error("cannot parse {}: {reason}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A cgroups-rs call failed.
    #[error("cannot {action} in {}: {source}", .path.display())]
    Controller {
        /// What was being done, e.g. `freeze`.
        action: &'static str,
        /// The cgroup directory.
        path: PathBuf,
        /// The crate's error (naming the file).
        source: cgroups_rs::error::Error,
    },
    /// A bounded wait ran out.
    #[error("timed out after {waited:?} waiting for {what} in {}: {hint}", .path.display())]
    Timeout {
        /// What did not happen.
        what: String,
        /// The cgroup directory.
        path: PathBuf,
        /// How long it waited.
        waited: Duration,
        /// What to look at.
        hint: &'static str,
    },
    /// Signalling a process of the cgroup failed.
    #[error("cannot send SIGKILL to process {pid} of cgroup {}: {source}", .path.display())]
    Signal {
        /// The process.
        pid: i32,
        /// The cgroup directory.
        path: PathBuf,
        /// Why.
        source: nix::Error,
    },
    /// Setting up or reading an OOM notification failed.
    #[error("OOM notification on {}: {what}: {source}", .path.display())]
    Watch {
        /// `memory.oom_control` or `memory.events`.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
}

/// What to do about a failed file operation in cgroupfs, from its errno.
fn io_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
            " (needs root and a read-write cgroup mount)"
        }
        Some(libc::ENOENT) => {
            " (no such cgroup or file: check the controller is mounted/enabled and the cgroup was not removed)"
        }
        Some(libc::EBUSY) => {
            " (the cgroup is busy: it still holds processes or child cgroups, or processes in a parent stop a controller from being enabled)"
        }
        Some(libc::EINVAL) => {
            " (the kernel rejected the value: check it is in range and within the parent cgroup's limits)"
        }
        Some(libc::ESRCH) => " (no such process: it may have exited already)",
        Some(libc::ENOSPC) => {
            " (cpuset.cpus/cpuset.mems of the cgroup are empty or outside its parent's)"
        }
        Some(libc::EOPNOTSUPP) => " (not supported by this kernel)",
        _ => "",
    }
}

impl CgroupError {
    /// The gRPC code of this failure: what the caller can do about it.
    ///
    /// | error | code |
    /// |---|---|
    /// | a bad resource value or `cgroupsPath`; a value the kernel rejects (EINVAL) | InvalidArgument |
    /// | the cgroup is gone; a cgroup file or process that no longer exists (ENOENT, ESRCH) | NotFound |
    /// | the cgroup still holds processes | AlreadyExists |
    /// | no hierarchy or a missing controller; a busy cgroup (EBUSY, ENOSPC) | FailedPrecondition |
    /// | a bounded wait ran out | DeadlineExceeded |
    /// | the kernel refused (EACCES, EPERM, EROFS) | PermissionDenied |
    /// | anything else | Internal |
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        let errno = |e: &io::Error| match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ERANGE) => Code::InvalidArgument,
            Some(libc::ENOENT) | Some(libc::ESRCH) => Code::NotFound,
            Some(libc::EBUSY) | Some(libc::ENOSPC) => Code::FailedPrecondition,
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => Code::PermissionDenied,
            _ => Code::Internal,
        };
        match self {
            CgroupError::InvalidArgument { .. } | CgroupError::InvalidPath { .. } => {
                Code::InvalidArgument
            }
            CgroupError::NoHierarchy(_) | CgroupError::ControllerMissing { .. } => {
                Code::FailedPrecondition
            }
            CgroupError::Gone { .. } => Code::NotFound,
            CgroupError::NotEmpty { .. } => Code::AlreadyExists,
            CgroupError::Timeout { .. } => Code::DeadlineExceeded,
            CgroupError::Read { source, .. }
            | CgroupError::Write { source, .. }
            | CgroupError::Create { source, .. }
            | CgroupError::Remove { source, .. }
            | CgroupError::Watch { source, .. } => errno(source),
            CgroupError::Signal { source, .. } => match source {
                nix::Error::ESRCH => Code::NotFound,
                nix::Error::EPERM => Code::PermissionDenied,
                _ => Code::Internal,
            },
            CgroupError::Controller { .. } | CgroupError::Parse { .. } => Code::Internal,
        }
    }

    /// This failure as a gRPC status, its message prefixed with `context`
    /// (e.g. `updating container c1`).
    pub fn status(&self, context: &str) -> tonic::Status {
        tonic::Status::new(self.code(), format!("{context}: {self}"))
    }
}
