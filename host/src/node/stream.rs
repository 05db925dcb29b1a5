//! The daemon's end of a send stream (`GET /v1/vps/{vp}/stream`; the
//! protocol is described in `crate::api::stream`). One task per stream reads
//! request lines, hands each to the node as the send route would, and writes
//! the answers as they complete: all answers ready at one wake-up go out in
//! one write, and all requests read at once reach the node in one hand-off.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::api::{NodeRequest, SendRequest};
use crate::api::ApiError;
use crate::api::stream::{
    STREAM_IN_FLIGHT_MAX, STREAM_PROTOCOL, StreamAnswer, parse_request, take_lines,
};

/// `GET /v1/vps/{vp}/stream`: check the virtual peer, then switch the
/// connection to the stream protocol.
pub(super) async fn route(
    State(tx): State<mpsc::Sender<NodeRequest>>,
    Path(vp): Path<String>,
    mut request: Request,
) -> Response {
    let asks_for_stream = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(STREAM_PROTOCOL));
    if !asks_for_stream {
        return ApiError::bad_request(format!(
            "this route switches protocols: send `Connection: upgrade` and `Upgrade: {STREAM_PROTOCOL}` (docs/host.md)"
        ))
        .into_response();
    }
    // An unknown name fails here, once, rather than on every line.
    let (reply, rx) = oneshot::channel();
    if tx.send(NodeRequest::Resolve(vp, reply)).await.is_err() {
        return ApiError::unavailable("the host is shutting down").into_response();
    }
    let vp = match rx.await {
        Ok(Ok(vp)) => vp,
        Ok(Err(e)) => return ApiError::not_found(e).into_response(),
        Err(_) => return ApiError::unavailable("the host is shutting down").into_response(),
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(io) => serve(hyper_util::rt::TokioIo::new(io), vp, tx).await,
            Err(e) => tracing::debug!("a send stream's upgrade failed: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, STREAM_PROTOCOL)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Serve one stream until the client closes it (after its last answer) or
/// the connection breaks. Lines already read wait in `inbuf` while
/// `STREAM_IN_FLIGHT_MAX` messages are in flight, and nothing more is read
/// until they are all handed on.
async fn serve<Io>(io: Io, vp: String, tx: mpsc::Sender<NodeRequest>)
where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut inbuf = Vec::with_capacity(64 * 1024);
    let mut out = Vec::with_capacity(64 * 1024);
    let mut pending = FuturesUnordered::new();
    let mut reading = true;
    loop {
        let room = STREAM_IN_FLIGHT_MAX.saturating_sub(pending.len());
        let lines = match take_lines(&mut inbuf, room) {
            Ok(lines) => lines,
            Err(e) => {
                StreamAnswer::of(None, Err(ApiError::bad_request(e))).push_line(&mut out);
                let _ = wr.write_all(&out).await;
                return;
            }
        };
        let mut batch = Vec::with_capacity(lines.len());
        for line in lines
            .iter()
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        {
            match parse_request(line) {
                Ok(r) => {
                    let (reply, rx) = oneshot::channel();
                    let req = SendRequest {
                        msg: r.msg,
                        read: r.read,
                        timeout_ms: r.timeout_ms,
                    };
                    batch.push((req, reply));
                    let id = r.id;
                    pending.push(async move {
                        let result = rx.await.unwrap_or_else(|_| {
                            Err(ApiError::unavailable(
                                "the host dropped the request (shutting down?)",
                            ))
                        });
                        StreamAnswer::of(Some(id), result)
                    });
                }
                Err((id, why)) => {
                    StreamAnswer::of(id, Err(ApiError::bad_request(why))).push_line(&mut out);
                }
            }
        }
        // Each waiter answers "dropped" when the node is gone.
        if !batch.is_empty()
            && tx
                .send(NodeRequest::SendMany(vp.clone(), batch))
                .await
                .is_err()
        {
            tracing::debug!("a send stream outlived the node");
        }
        if !out.is_empty() {
            if let Err(e) = wr.write_all(&out).await {
                tracing::debug!("a send stream broke: {e}");
                return;
            }
            out.clear();
        }
        let backlog = inbuf.contains(&b'\n');
        if !reading && !backlog && pending.is_empty() {
            break;
        }
        tokio::select! {
            read = rd.read_buf(&mut inbuf), if reading && !backlog => match read {
                Ok(0) => {
                    reading = false;
                    // A last line without its newline still counts.
                    if !inbuf.is_empty() {
                        inbuf.push(b'\n');
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("a send stream broke: {e}");
                    return;
                }
            },
            Some(answer) = pending.next(), if !pending.is_empty() => {
                answer.push_line(&mut out);
                // Everything else already done goes in the same write.
                while let Some(Some(answer)) = futures::FutureExt::now_or_never(pending.next()) {
                    answer.push_line(&mut out);
                }
            }
            // Lines still buffered (all of the last batch were refused): on.
            else => {}
        }
    }
    let _ = wr.shutdown().await;
}
