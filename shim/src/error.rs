//! Errors to containerd: ttrpc statuses whose codes containerd maps to its
//! own kinds (NotFound, AlreadyExists, FailedPrecondition, ...).

pub use containerd_shim::protos::ttrpc::Code;
use containerd_shim::protos::ttrpc::{get_status, Error};

/// A ttrpc error with `code` and `message`.
pub fn err(code: Code, message: impl ToString) -> Error {
    Error::RpcStatus(get_status(code, message))
}

/// A gRPC (launcher, agent) status as a ttrpc error with the same code;
/// `who` prefixes the message (`guest agent`, `launcher`).
pub fn from_status(who: &str, s: &tonic::Status) -> Error {
    err(grpc_code(s.code()), format!("{who}: {}", s.message()))
}

/// The ttrpc code of a gRPC code (the same numbering).
pub fn grpc_code(c: tonic::Code) -> Code {
    use tonic::Code as G;
    match c {
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
    }
}
