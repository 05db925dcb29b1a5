//! The local control API: HTTP + JSON on a loopback address, guarded by a
//! bearer token stored in the data directory (readable only by its owner).
//!
//! The daemon serves it ([`serve`]); every CLI subcommand other than `join`,
//! `exec`, `bench` and `sim` is a client of it ([`ApiClient`]). The routes
//! and their bodies are listed in docs/host.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::net::identity::{read_private_file, write_private_file};

pub mod stream;

/// File in the data directory holding the API token.
pub const API_TOKEN_FILE: &str = "api-token";
/// File in the data directory holding the address the API listens on.
pub const API_ADDR_FILE: &str = "api-addr";
/// Where the API listens unless told otherwise.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:7070";
/// Largest request body the API accepts.
pub const API_BODY_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How long a client waits for an answer.
pub const API_TIMEOUT: Duration = Duration::from_secs(120);

/// An error as the API returns it: `{"error": "..."}` with an HTTP status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
        }
    }
}

/// As a client sees it: the message (the status is there for callers that
/// tell a missing virtual peer from a busy host).
impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// Load the API token from `data_dir`, creating it on first start.
pub fn load_or_create_token(data_dir: &Path) -> Result<String> {
    let path = data_dir.join(API_TOKEN_FILE);
    if path.exists() {
        let bytes = read_private_file(&path)?;
        let token = String::from_utf8(bytes)
            .context("API token is not text")?
            .trim()
            .to_string();
        if token.len() < 32 {
            bail!(
                "{} holds no usable token; delete it to make a new one",
                path.display()
            );
        }
        return Ok(token);
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    write_private_file(&path, token.as_bytes())?;
    Ok(token)
}

async fn require_token(
    State(token): State<std::sync::Arc<str>>,
    request: Request,
    next: Next,
) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let expected = format!("Bearer {token}");
    // Constant-time enough for a local token: compare full strings of equal length.
    let ok = given.is_some_and(|g| {
        g.len() == expected.len()
            && g.bytes()
                .zip(expected.bytes())
                .fold(0, |a, (x, y)| a | (x ^ y))
                == 0
    });
    if !ok {
        return ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or wrong API token".into(),
        }
        .into_response();
    }
    next.run(request).await
}

/// Bind the API on a loopback address and serve `router` with token checks.
/// Writes the bound address to the data directory (so `--api 127.0.0.1:0`
/// works) and returns it.
pub async fn serve(addr: SocketAddr, data_dir: &Path, router: axum::Router) -> Result<SocketAddr> {
    if !addr.ip().is_loopback() {
        bail!("the control API listens on loopback only; {addr} is not a loopback address");
    }
    let token: std::sync::Arc<str> = load_or_create_token(data_dir)?.into();
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} for the control API (another vp-host running? use --api to pick another address)")
    })?;
    let bound = listener.local_addr()?;
    let tmp = data_dir.join(format!(".{API_ADDR_FILE}.tmp"));
    std::fs::write(&tmp, bound.to_string())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, data_dir.join(API_ADDR_FILE))?;
    let app = router
        .layer(axum::middleware::from_fn_with_state(token, require_token))
        .layer(axum::extract::DefaultBodyLimit::max(API_BODY_BYTES_MAX));
    // Answers go out as soon as they are written: a send stream writes
    // small answer lines while earlier ones are not yet acknowledged, which
    // Nagle's algorithm would hold back until the client's delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY on an API connection: {e}");
        }
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("control API stopped: {e}");
        }
    });
    tracing::info!(%bound, "control API listening");
    Ok(bound)
}

/// The default data directory: `$VP_DATA_DIR`, else `~/.local/share/vp-host`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VP_DATA_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/vp-host")
}

/// Idle connections a client keeps open to its daemon.
pub const API_IDLE_CONNECTIONS_MAX: usize = 256;

type Connection = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A client of a running daemon's control API. Clones share a pool of
/// kept-alive connections, so a client sending many requests (a benchmark,
/// the demo) does not pay a TCP handshake for each.
#[derive(Clone)]
pub struct ApiClient {
    addr: SocketAddr,
    token: String,
    idle: std::sync::Arc<std::sync::Mutex<Vec<Connection>>>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ApiClient {
    /// Find the daemon: `--api` if given, else the address the daemon wrote to
    /// its data directory, else the default; the token from the data directory
    /// (or `VP_API_TOKEN`).
    pub fn locate(api: Option<SocketAddr>, data_dir: &Path) -> Result<ApiClient> {
        let recorded = std::fs::read_to_string(data_dir.join(API_ADDR_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let addr = api
            .or(recorded)
            .unwrap_or_else(|| DEFAULT_API_ADDR.parse().expect("default address parses"));
        let token = match std::env::var("VP_API_TOKEN") {
            Ok(token) => token,
            Err(_) => {
                let path = data_dir.join(API_TOKEN_FILE);
                let bytes = std::fs::read(&path).with_context(|| {
                    format!(
                        "no daemon data in {}: start one with `vp-host join`, or point --data-dir at its data directory",
                        data_dir.display()
                    )
                })?;
                String::from_utf8_lossy(&bytes).trim().to_string()
            }
        };
        Ok(ApiClient {
            addr,
            token,
            idle: Default::default(),
        })
    }

    /// The daemon's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// GET `path`, decode the JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(hyper::Method::GET, path, Bytes::new()).await
    }

    /// POST `body` as JSON to `path`, decode the JSON answer.
    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.call(
            hyper::Method::POST,
            path,
            Bytes::from(serde_json::to_vec(body)?),
        )
        .await
    }

    /// GET `path`, the answer as text (`/v1/metrics`).
    pub async fn get_text(&self, path: &str) -> Result<String> {
        let bytes = self.fetch(hyper::Method::GET, path, Bytes::new()).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// DELETE `path`, decode the JSON answer.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(hyper::Method::DELETE, path, Bytes::new()).await
    }

    /// POST raw bytes to `path` and hand each line of the streamed answer to
    /// `on_line` as it arrives.
    pub async fn post_lines(
        &self,
        path: &str,
        body: Vec<u8>,
        mut on_line: impl FnMut(&str),
    ) -> Result<()> {
        let (response, _) = self
            .request(hyper::Method::POST, path, Bytes::from(body))
            .await?;
        let status = response.status();
        let mut body = response.into_body();
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                if !status.is_success() {
                    bail!("{}", error_message(line.as_bytes()));
                }
                on_line(&line);
            }
        }
        if !status.is_success() {
            bail!("{}", error_message(&pending));
        }
        Ok(())
    }

    /// Send one request, on an idle kept-alive connection if there is one
    /// (else a new one). Returns the connection with the answer; give it back
    /// with [`ApiClient::keep`] once the answer's body is read.
    async fn request(
        &self,
        method: hyper::Method,
        path: &str,
        body: Bytes,
    ) -> Result<(hyper::Response<hyper::body::Incoming>, Connection)> {
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.to_string())
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let exchange = async {
            let mut request = request;
            // An idle connection the daemon closed meanwhile gives the request
            // back unsent; then the next one (or a new connection) takes it.
            loop {
                let mut sender = match self.idle() {
                    Some(sender) => sender,
                    None => self.connect().await?,
                };
                if sender.ready().await.is_err() {
                    continue;
                }
                match sender.try_send_request(request).await {
                    Ok(response) => return Ok((response, sender)),
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => request = unsent,
                        None => return Err(anyhow::Error::from(e.into_error())),
                    },
                }
            }
        };
        tokio::time::timeout(API_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the daemon at {} did not answer within {:?}",
                    self.addr,
                    API_TIMEOUT
                )
            })?
    }

    /// An idle kept-alive connection that is still open.
    fn idle(&self) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// Keep a connection whose last answer was read, for the next request.
    fn keep(&self, sender: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < API_IDLE_CONNECTIONS_MAX && !sender.is_closed() {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<Connection> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "no daemon at {}: {e}; start one with `vp-host join`",
                    self.addr
                )
            })?;
        let _ = stream.set_nodelay(true);
        let io = hyper_util::rt::TokioIo::new(stream);
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: hyper::Method,
        path: &str,
        body: Bytes,
    ) -> Result<T> {
        let bytes = self.fetch(method, path, body).await?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("unexpected answer from the daemon at {}", self.addr))
    }

    /// One request's whole answer; an error status is an [`ApiError`].
    async fn fetch(&self, method: hyper::Method, path: &str, body: Bytes) -> Result<Bytes> {
        let (response, sender) = self.request(method, path, body).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        self.keep(sender);
        if !status.is_success() {
            return Err(ApiError {
                status,
                message: error_message(&bytes),
            }
            .into());
        }
        Ok(bytes)
    }
}

/// The message of an `{"error": ...}` body, or the body as text.
fn error_message(bytes: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned())
}
