//! The send stream: many messages to one virtual peer over one kept-open
//! connection, for clients that send a lot (`vp-host send <vp> -`, the
//! benchmarks, an app's own client).
//!
//! The client asks for `GET /v1/vps/{vp}/stream` with `Connection: upgrade`
//! and `Upgrade: vp-stream` (and the API token, as for every route); the
//! daemon answers `101 Switching Protocols`, and from then on both sides
//! write JSON lines:
//!
//! - client to daemon, one [`StreamRequest`] per line: `{"id": 7, "msg": {...}}`
//!   (optional `"read": true`, `"timeout_ms": N`);
//! - daemon to client, one [`StreamAnswer`] per line as each message
//!   completes, in completion order, carrying the request's `id`.
//!
//! Each message is handled exactly as `POST /v1/vps/{vp}/send` would handle
//! it: its own session and sequence number, retried through leader changes.
//! Messages in flight at the same time are concurrent: the virtual peer may
//! order them either way, as it would requests from different clients. A
//! client that needs an order waits for an answer before sending the next.
//!
//! The daemon reads at most [`STREAM_IN_FLIGHT_MAX`] messages ahead of its
//! answers (beyond that it stops reading: the client's writes block), and a
//! line longer than [`STREAM_LINE_BYTES_MAX`] ends the stream with an error
//! line. A line that is not a request gets an answer with `failed` (and the
//! id, if one could be read) and the stream goes on.

use std::collections::HashMap;

use anyhow::{Context, Result, anyhow};
use axum::http::{StatusCode, header};
use http_body_util::Full;
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::{ApiClient, ApiError};
use crate::node::api::{SendAnswer, SendRequest};

/// The protocol name in the `Upgrade` header.
pub const STREAM_PROTOCOL: &str = "vp-stream";
/// Messages the daemon accepts on one stream before their answers.
pub const STREAM_IN_FLIGHT_MAX: usize = 4096;
/// Longest line either side accepts (a message is at most 1 MiB once encoded;
/// its JSON may be larger).
pub const STREAM_LINE_BYTES_MAX: usize = 4 << 20;

/// One message, as a line from the client.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamRequest {
    /// Chosen by the client; the answer carries it back.
    pub id: u64,
    pub msg: serde_json::Value,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// One answer, as a line from the daemon: the virtual peer's `reply`, its
/// `error` reply, or `failed` when the message could not be delivered (with
/// the HTTP status the same failure gets from the send route: 400 bad
/// request, 404 unknown virtual peer, 503 not answered in time or host busy).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StreamAnswer {
    /// The request's id; absent when a line could not be read as a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

impl StreamAnswer {
    /// The answer to request `id` as the send route would give it.
    pub fn of(id: Option<u64>, result: Result<SendAnswer, ApiError>) -> Self {
        match result {
            Ok(a) => StreamAnswer {
                id,
                reply: if a.error.is_none() {
                    Some(a.reply.unwrap_or(serde_json::Value::Null))
                } else {
                    a.reply
                },
                error: a.error,
                ..Default::default()
            },
            Err(e) => StreamAnswer {
                id,
                failed: Some(e.message),
                status: Some(e.status.as_u16()),
                ..Default::default()
            },
        }
    }

    /// Back to the send route's shape (`failed` becomes an [`ApiError`]).
    pub fn into_result(self) -> Result<SendAnswer, ApiError> {
        match self.failed {
            Some(message) => Err(ApiError {
                status: self
                    .status
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                message,
            }),
            None => Ok(SendAnswer {
                reply: self.reply,
                error: self.error,
            }),
        }
    }

    /// The line for this answer, newline included.
    pub fn push_line(&self, out: &mut Vec<u8>) {
        // Serialising these plain fields cannot fail.
        serde_json::to_writer(&mut *out, self).expect("a stream answer serialises");
        out.push(b'\n');
    }
}

/// Up to `max` complete lines at the front of `buf`, each without its
/// newline; removes them from `buf` (lines beyond `max` stay for later).
/// Errors when the next line has no newline yet and is already too long.
pub fn take_lines(buf: &mut Vec<u8>, max: usize) -> Result<Vec<Vec<u8>>, String> {
    let mut lines = Vec::new();
    let mut start = 0;
    while lines.len() < max {
        let Some(end) = buf[start..].iter().position(|&b| b == b'\n') else {
            break;
        };
        lines.push(buf[start..start + end].to_vec());
        start += end + 1;
    }
    buf.drain(..start);
    // Judged once the lines before it are out (none is dropped with it).
    if lines.is_empty() && buf.len() > STREAM_LINE_BYTES_MAX && !buf.contains(&b'\n') {
        return Err(format!(
            "a line is longer than {STREAM_LINE_BYTES_MAX} bytes"
        ));
    }
    Ok(lines)
}

type Waiters = HashMap<u64, oneshot::Sender<Result<SendAnswer, ApiError>>>;

/// A client's end of a send stream. Clones share the connection; each
/// [`SendStream::send`] waits for its own answer, so many tasks can send
/// through one stream at once.
#[derive(Clone, Debug)]
pub struct SendStream {
    tx: mpsc::Sender<(SendRequest, oneshot::Sender<Result<SendAnswer, ApiError>>)>,
}

impl SendStream {
    /// Send one message and wait for its answer (the same as the send route's).
    pub async fn send(&self, req: SendRequest) -> Result<SendAnswer, ApiError> {
        let (reply, rx) = oneshot::channel();
        let closed = || ApiError::unavailable("the stream to the daemon closed");
        self.tx.send((req, reply)).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

impl ApiClient {
    /// Open a send stream to virtual peer `vp` (id or name).
    pub async fn stream(&self, vp: &str) -> Result<SendStream> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| {
                anyhow!(
                    "no daemon at {}: {e}; start one with `vp-host join`",
                    self.addr
                )
            })?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let request = hyper::Request::builder()
            .method(hyper::Method::GET)
            .uri(format!("/v1/vps/{vp}/stream"))
            .header(header::HOST, self.addr.to_string())
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, STREAM_PROTOCOL)
            .body(Full::new(Bytes::new()))?;
        let mut response = sender.send_request(request).await?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = response.status();
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await?
                .to_bytes();
            return Err(ApiError {
                status,
                message: super::error_message(&body),
            }
            .into());
        }
        let io = hyper::upgrade::on(&mut response)
            .await
            .context("the daemon accepted the stream but the upgrade failed")?;
        let (tx, rx) = mpsc::channel(STREAM_IN_FLIGHT_MAX);
        tokio::spawn(client_task(hyper_util::rt::TokioIo::new(io), rx));
        Ok(SendStream { tx })
    }
}

/// Writes requests as they come (all that queued, in one write), reads
/// answers and hands each to its waiter.
async fn client_task<Io>(
    io: Io,
    mut requests: mpsc::Receiver<(SendRequest, oneshot::Sender<Result<SendAnswer, ApiError>>)>,
) where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut waiters: Waiters = HashMap::new();
    let mut next_id = 0u64;
    let mut inbuf = Vec::with_capacity(64 * 1024);
    let mut out = Vec::with_capacity(64 * 1024);
    let mut open = true;
    let why = loop {
        tokio::select! {
            request = requests.recv(), if open => {
                let Some(first) = request else {
                    open = false;
                    if waiters.is_empty() {
                        break None;
                    }
                    continue;
                };
                let mut next = Some(first);
                while let Some((req, reply)) = next {
                    let id = next_id;
                    next_id += 1;
                    let line = StreamRequest { id, msg: req.msg, read: req.read, timeout_ms: req.timeout_ms };
                    serde_json::to_writer(&mut out, &line).expect("a request serialises");
                    out.push(b'\n');
                    waiters.insert(id, reply);
                    next = requests.try_recv().ok();
                }
                if let Err(e) = wr.write_all(&out).await {
                    break Some(format!("the stream to the daemon broke: {e}"));
                }
                out.clear();
            }
            read = rd.read_buf(&mut inbuf) => {
                match read {
                    Ok(0) => break Some("the daemon closed the stream".to_string()),
                    Err(e) => break Some(format!("the stream to the daemon broke: {e}")),
                    Ok(_) => {}
                }
                let lines = match take_lines(&mut inbuf, usize::MAX) {
                    Ok(lines) => lines,
                    Err(e) => break Some(format!("bad answer from the daemon: {e}")),
                };
                for line in lines {
                    match serde_json::from_slice::<StreamAnswer>(&line) {
                        Ok(answer) => {
                            let waiter = answer.id.and_then(|id| waiters.remove(&id));
                            match waiter {
                                Some(w) => { let _ = w.send(answer.into_result()); }
                                None => tracing::warn!(
                                    "the daemon's stream answered an unknown request: {}",
                                    String::from_utf8_lossy(&line)
                                ),
                            }
                        }
                        Err(e) => tracing::warn!("unreadable answer line from the daemon ({e})"),
                    }
                }
                if !open && waiters.is_empty() {
                    break None;
                }
            }
        }
    };
    if let Some(why) = why {
        for (_, w) in waiters.drain() {
            let _ = w.send(Err(ApiError::unavailable(why.clone())));
        }
        // Later sends see the channel closed.
    }
}

/// Check a request line from a client; an error names what is wrong.
pub fn parse_request(line: &[u8]) -> Result<StreamRequest, (Option<u64>, String)> {
    match serde_json::from_slice::<StreamRequest>(line) {
        Ok(r) => Ok(r),
        Err(e) => {
            // Name the id when the line has one, so the client can match it.
            let id = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("id").and_then(|i| i.as_u64()));
            Err((
                id,
                format!("not a stream request ({{\"id\": N, \"msg\": ...}}): {e}"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_taken_up_to_the_limit_and_the_rest_waits() {
        let mut buf = b"a\nbb\nccc\ndd".to_vec();
        assert_eq!(
            take_lines(&mut buf, 2).unwrap(),
            [b"a".to_vec(), b"bb".to_vec()]
        );
        assert_eq!(
            buf, b"ccc\ndd",
            "the third line and the unfinished one stay"
        );
        assert_eq!(take_lines(&mut buf, usize::MAX).unwrap(), [b"ccc".to_vec()]);
        assert_eq!(buf, b"dd");
    }

    #[test]
    fn only_an_unfinished_line_can_be_too_long() {
        let mut long = vec![b'x'; STREAM_LINE_BYTES_MAX + 1];
        let err = take_lines(&mut long.clone(), usize::MAX).unwrap_err();
        assert!(err.contains("longer than"), "{err}");
        // The same bytes behind lines still waiting are not judged yet.
        let mut buf = b"a\nb\n".to_vec();
        buf.append(&mut long);
        assert_eq!(take_lines(&mut buf, 1).unwrap(), [b"a".to_vec()]);
        assert_eq!(
            take_lines(&mut buf, 1).unwrap(),
            [b"b".to_vec()],
            "not lost"
        );
        assert!(take_lines(&mut buf, 1).is_err(), "now it is next");
    }
}
