//! The launcher's errors, and the one place they become gRPC codes.
//!
//! | error | code |
//! |---|---|
//! | `InvalidSpec`, a cgroup path that is no relative path | InvalidArgument |
//! | `State` (the call does not fit the VM's state), `Cleanup` (the launcher of the sandbox still runs) | FailedPrecondition |
//! | `Timeout` | DeadlineExceeded |
//! | a jail file that does not exist (kernel, initrd, netns) | NotFound |
//! | `Gone` (the launcher is shutting down) | Unavailable |
//! | anything else (I/O, the hypervisor, QMP, vsock, uids) | Internal |

use tonic::Status;

/// Why a launcher operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LauncherError {
    /// The VM spec is not acceptable.
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    /// The call does not fit the VM's state.
    #[error("{0}")]
    State(String),
    /// Something took too long.
    #[error("timeout: {0}")]
    Timeout(String),
    /// A host file operation failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The hypervisor could not be started.
    #[error("cannot start the hypervisor {0}: {1}")]
    Spawn(String, std::io::Error),
    /// The hypervisor misbehaved.
    #[error("hypervisor: {0}")]
    Hypervisor(String),
    /// cgroups.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// The jail.
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    /// QMP.
    #[error(transparent)]
    Qmp(#[from] crate::qmp::QmpError),
    /// The vsock backend.
    #[error(transparent)]
    Vsock(#[from] crate::vsock::VsockError),
    /// The hypervisor's uid.
    #[error(transparent)]
    Uid(#[from] crate::uids::UidError),
    /// The VM's owner task is gone (the launcher is shutting down).
    #[error("the launcher is shutting down")]
    Gone,
    /// Leftovers of a previous launcher could not be removed.
    #[error(transparent)]
    Cleanup(#[from] crate::leftovers::CleanupError),
}

impl From<LauncherError> for Status {
    fn from(e: LauncherError) -> Status {
        let msg = e.to_string();
        match e {
            LauncherError::InvalidSpec(_)
            | LauncherError::Cgroup(crate::cgroup::CgroupError::BadPath(_)) => {
                Status::invalid_argument(msg)
            }
            LauncherError::State(_) | LauncherError::Cleanup(_) => Status::failed_precondition(msg),
            LauncherError::Timeout(_) => Status::deadline_exceeded(msg),
            LauncherError::Jail(crate::jail::JailError::Open { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Status::not_found(msg)
            }
            LauncherError::Gone => Status::unavailable(msg),
            _ => Status::internal(msg),
        }
    }
}
