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

/// A reply of the small HTTP servers (the shim's management socket,
/// kata-monitor).
pub type Reply = hyper::Response<http_body_util::Full<Bytes>>;

/// A reply with `status`, `content_type` and `body`.
pub fn reply(status: hyper::StatusCode, content_type: &str, body: String) -> Reply {
    let mut r = hyper::Response::new(http_body_util::Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Serves HTTP/1.1 on every connection `accept` gives, each in a task of its
/// own (see [`serve_connection`]), forever; an accept error is logged and
/// retried after 100 ms (a full fd table must not spin).
pub async fn serve<S, A, AF, F, Fut>(mut accept: A, handler: F, limit: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    A: FnMut() -> AF,
    AF: std::future::Future<Output = std::io::Result<S>>,
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Reply> + Send + 'static,
{
    loop {
        match accept().await {
            Ok(stream) => serve_connection(stream, handler.clone(), limit),
            Err(e) => {
                tracing::warn!("HTTP accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves HTTP/1.1 on one accepted connection in a task of its own, each
/// request answered by `handler`, the whole connection bounded by `limit`
/// (a client that stalls loses it). A request hyper cannot parse gets 400.
pub fn serve_connection<S, F, Fut>(stream: S, handler: F, limit: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Reply> + Send + 'static,
{
    tokio::spawn(async move {
        let svc = hyper::service::service_fn(move |req| {
            let h = handler.clone();
            async move { Ok::<_, std::convert::Infallible>(h(req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
        if let Err(e) = tokio::time::timeout(limit, conn).await {
            tracing::debug!("HTTP connection: {e}");
        }
    });
}
