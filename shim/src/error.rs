//! Errors to containerd: ttrpc statuses whose codes containerd maps to its
//! own kinds (NotFound, AlreadyExists, FailedPrecondition, ...).

pub use containerd_shim::protos::ttrpc::Code;
use containerd_shim::protos::ttrpc::{get_status, Error};

/// A ttrpc error with `code` and `message`.
pub fn err(code: Code, message: impl ToString) -> Error {
    Error::RpcStatus(get_status(code, message))
}

/// An agent (gRPC) error as a ttrpc error with the same code.
pub fn from_status(s: tonic::Status) -> Error {
    use tonic::Code as G;
    let code = match s.code() {
        G::Ok => Code::OK,
        G::Cancelled => Code::CANCELLED,
        G::InvalidArgument => Code::INVALID_ARGUMENT,
        G::DeadlineExceeded => Code::DEADLINE_EXCEEDED,
        G::NotFound => Code::NOT_FOUND,
        G::AlreadyExists => Code::ALREADY_EXISTS,
        G::PermissionDenied => Code::PERMISSION_DENIED,
        G::ResourceExhausted => Code::RESOURCE_EXHAUSTED,
        G::FailedPrecondition => Code::FAILED_PRECONDITION,
        G::Aborted => Code::ABORTED,
        G::OutOfRange => Code::OUT_OF_RANGE,
        G::Unimplemented => Code::UNIMPLEMENTED,
        G::Internal => Code::INTERNAL,
        G::Unavailable => Code::UNAVAILABLE,
        G::DataLoss => Code::DATA_LOSS,
        G::Unauthenticated => Code::UNAUTHENTICATED,
        G::Unknown => Code::UNKNOWN,
    };
    err(code, format!("guest agent: {}", s.message()))
}
