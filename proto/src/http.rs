//! A GET over a unix socket (HTTP/1.1): how kata-monitor and `kata-ctl
//! metrics` read a pod's management socket.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;

/// Why a GET failed.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// Nothing listens (a stale socket of a dead shim) or the path is wrong.
    #[error("connecting to {0}: {1}")]
    Connect(String, std::io::Error),
    /// No complete answer within the deadline.
    #[error("no answer from {0} within {1:?}")]
    Timeout(String, Duration),
    /// The conversation broke or the answer was too large.
    #[error("{0}: {1}")]
    Http(String, String),
    /// An answer, but not 200.
    #[error("{0}: HTTP {1}: {2}")]
    Status(String, u16, String),
}

/// GETs `path` from the HTTP server on the unix socket `socket`, within
/// `timeout` for everything, taking at most `limit` bytes of body.
pub async fn get_unix(
    socket: &Path,
    path: &str,
    timeout: Duration,
    limit: usize,
) -> Result<String, GetError> {
    let what = socket.display().to_string();
    let work = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| GetError::Connect(what.clone(), e))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| GetError::Http(what.clone(), e.to_string()))?;
        let driver = tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .map_err(|e| GetError::Http(what.clone(), e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| GetError::Http(what.clone(), e.to_string()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| GetError::Http(what.clone(), e.to_string()))?
            .to_bytes();
        driver.abort();
        let text = String::from_utf8_lossy(&body).into_owned();
        if status != hyper::StatusCode::OK {
            return Err(GetError::Status(
                what.clone(),
                status.as_u16(),
                text.trim().to_string(),
            ));
        }
        Ok(text)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| GetError::Timeout(socket.display().to_string(), timeout))?
}
