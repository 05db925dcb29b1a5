//! The daemon's control API routes and the JSON shapes they use. Each route
//! asks the node task through a bounded channel and waits for its answer.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use vp_alm::{Key, KeyRange};

use crate::api::ApiError;
use crate::net::{ConnectedPeer, NetCounters};
use crate::node::vps::SpawnEvent;
use crate::vp::VpStatus;

/// What the API asks the node.
#[derive(Debug)]
pub enum NodeRequest {
    Status(oneshot::Sender<HostStatus>),
    Search(SearchRequest, oneshot::Sender<Result<SearchAnswer, String>>),
    Multicast(
        MulticastRequest,
        oneshot::Sender<Result<MulticastAnswer, String>>,
    ),
    Deliveries(oneshot::Sender<Vec<DeliveryRecord>>),
    InsertKey(KeyRequest, oneshot::Sender<Result<(), String>>),
    RemoveKey(KeyRequest, oneshot::Sender<Result<(), String>>),
    Spawn(SpawnParams, Vec<u8>, mpsc::Sender<SpawnEvent>),
    /// Errors carry their HTTP status: an unknown virtual peer is 404, a
    /// message that cannot be encoded 400, the rest 503 (retry later).
    Send(String, SendRequest, SendWaiter),
    /// Destroy a virtual peer (`DELETE /v1/vps/{vp}`).
    Destroy(String, oneshot::Sender<Result<DestroyAnswer, ApiError>>),
    /// Several sends to one virtual peer at once (a send stream's batch).
    SendMany(String, Vec<(SendRequest, SendWaiter)>),
    /// The id (16 hex digits) of the virtual peer with this id or name.
    Resolve(String, oneshot::Sender<Result<String, String>>),
    VpList(oneshot::Sender<Vec<VpStatus>>),
    /// A virtual peer's status; with a cursor, also its guest's log lines after it.
    VpStatus(
        String,
        Option<crate::vp::LogCursor>,
        oneshot::Sender<Result<VpStatus, String>>,
    ),
    VpDigest(String, oneshot::Sender<Result<String, String>>),
    /// This host is leaving (`POST /v1/drain`, `stay` false) or stays after
    /// all (`DELETE /v1/drain`, `stay` true): answers how many virtual peers
    /// it is a member of still. Either is saved in the data directory first.
    Drain {
        stay: bool,
        reply: oneshot::Sender<Result<DrainAnswer, String>>,
    },
}

/// `POST /v1/drain`: the host takes no new member and asks each of its
/// virtual peers' leaders to replace it; it is done when `memberships` (as
/// `GET /v1/status` counts them in `virtual_peers`) is 0. The host keeps
/// leaving across restarts until `DELETE /v1/drain`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DrainAnswer {
    pub memberships: usize,
}

/// Where the answer to one send goes.
pub type SendWaiter = oneshot::Sender<Result<SendAnswer, ApiError>>;

/// `POST /v1/vps?members=3&name=..&fuel_per_message=..&memory_max=..` with the
/// module as the body. Answers with JSON lines: progress, then done or failed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SpawnParams {
    pub members: Option<usize>,
    pub name: Option<String>,
    pub fuel_per_message: Option<u64>,
    pub memory_max: Option<u64>,
    pub replace_after_ms: Option<u64>,
    pub checkpoint_every_slots: Option<u64>,
}

/// `POST /v1/vps/{vp}/send`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SendRequest {
    pub msg: serde_json::Value,
    #[serde(default)]
    pub read: bool,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// The virtual peer's reply (`reply`) or error reply (`error`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SendAnswer {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reply: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

/// `DELETE /v1/vps/{vp}`: the virtual peer is destroyed (every member
/// applied it or will, then leaves and deletes its state).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DestroyAnswer {
    pub vp: String,
    /// This host knew it was destroyed already.
    pub already: bool,
}

/// `GET /v1/vps/{vp}/logs?after=SLOT.N`: the guest's log lines, oldest
/// first, as the member `host` has them, at most 200: without a cursor the
/// latest ones; after a cursor the next ones (a full answer means there may
/// be more: ask again after its last line).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogsAnswer {
    pub vp: String,
    pub host: String,
    pub lines: Vec<crate::vp::GuestLogEntry>,
    /// Without a cursor: the kept lines before these that the answer leaves out.
    #[serde(default)]
    pub skipped: u64,
    /// After a cursor: lines after it may be missing (the member keeps the
    /// last 1,000 lines and 256 KiB, and only those since it started from a
    /// snapshot).
    #[serde(default)]
    pub gap: bool,
}

/// The query of `GET /v1/vps/{vp}/logs`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LogsParams {
    /// `SLOT.N`: only lines after this one.
    pub after: Option<String>,
}

/// Parse a log cursor written `SLOT.N`.
pub fn parse_log_cursor(text: &str) -> Result<crate::vp::LogCursor, String> {
    let (slot, n) = text
        .split_once('.')
        .ok_or_else(|| format!("log cursor `{text}`: expected SLOT.N, e.g. 17.2"))?;
    match (slot.parse(), n.parse()) {
        (Ok(slot), Ok(n)) => Ok((slot, n)),
        _ => Err(format!(
            "log cursor `{text}`: expected SLOT.N, two whole numbers, e.g. 17.2"
        )),
    }
}

/// `GET /v1/vps/{vp}/digest`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DigestAnswer {
    pub digest: String,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostStatus {
    pub peer_id: String,
    pub host_id: String,
    pub version: String,
    pub data_dir: String,
    pub listen_addrs: Vec<String>,
    pub connected_peers: Vec<ConnectedPeer>,
    pub counters: NetCounters,
    pub private_network: Option<String>,
    pub overlay: OverlayStatus,
    /// Virtual peers this host is a member of.
    pub virtual_peers: Vec<VpStatus>,
    /// The most it takes (`vp-host join --memberships-max`).
    pub memberships_max: usize,
    /// Leaving (`vp-host drain`): takes no new member, hands over the ones it has.
    #[serde(default)]
    pub draining: bool,
    /// The sum of its members' guest memory limits (`spawn --memory-max`).
    pub guest_memory_committed: u64,
    /// The most that sum may reach (`vp-host join --guest-memory-max`).
    pub guest_memory_max: u64,
}

/// The host's part of the skip graph.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OverlayStatus {
    /// True once the host's own key is linked at every level.
    pub joined: bool,
    pub keys: Vec<KeyStatus>,
    pub ops_in_flight: usize,
    pub stats: serde_json::Value,
}

/// One key this host holds, with its neighbours per level (`[left, right]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyStatus {
    pub key: String,
    pub joined: bool,
    pub membership_vector: String,
    pub levels: Vec<[Option<NeighbourStatus>; 2]>,
}

/// A neighbour in the skip graph.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighbourStatus {
    pub key: String,
    pub host_id: String,
    pub peer_id: String,
}

/// `POST /v1/overlay/search`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SearchRequest {
    pub key: String,
}

/// The node holding the key (or the nearest one).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SearchAnswer {
    pub found: NeighbourStatus,
    pub exact: bool,
    pub hops: u32,
}

/// `POST /v1/overlay/multicast`: deliver `payload` to every key in `[lo, hi]`,
/// or to every key starting with `prefix`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MulticastRequest {
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub lo: Option<String>,
    #[serde(default)]
    pub hi: Option<String>,
    pub payload: String,
}

impl MulticastRequest {
    /// The key range the request names.
    pub fn range(&self) -> Result<KeyRange, String> {
        match (&self.prefix, &self.lo, &self.hi) {
            (Some(prefix), None, None) => Ok(KeyRange::prefix(prefix.as_bytes())),
            (None, Some(lo), Some(hi)) => Ok(KeyRange::inclusive(
                Key::new(lo.as_bytes()),
                Key::new(hi.as_bytes()),
            )),
            _ => Err("give either \"prefix\", or both \"lo\" and \"hi\"".to_string()),
        }
    }
}

/// The multicast's id (deliveries on the receiving hosts name it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MulticastAnswer {
    pub op: String,
}

/// A multicast that reached one of this host's keys (`GET /v1/overlay/deliveries`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub op: String,
    pub key: String,
    pub origin_host_id: String,
    pub payload: String,
    pub hops: u32,
}

/// `POST /v1/overlay/keys` and `/v1/overlay/keys/remove`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyRequest {
    pub key: String,
}

/// An empty success body.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Done {}

type Tx = mpsc::Sender<NodeRequest>;

async fn ask<T>(
    tx: &Tx,
    make: impl FnOnce(oneshot::Sender<T>) -> NodeRequest,
) -> Result<T, ApiError> {
    let (reply, rx) = oneshot::channel();
    tx.send(make(reply))
        .await
        .map_err(|_| ApiError::unavailable("the host is shutting down"))?;
    rx.await
        .map_err(|_| ApiError::unavailable("the host dropped the request (shutting down?)"))
}

async fn status(State(tx): State<Tx>) -> Result<Json<HostStatus>, ApiError> {
    Ok(Json(ask(&tx, NodeRequest::Status).await?))
}

/// The status in the Prometheus text format (node/metrics.rs).
async fn metrics(State(tx): State<Tx>) -> Result<impl axum::response::IntoResponse, ApiError> {
    let status = ask(&tx, NodeRequest::Status).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            super::metrics::CONTENT_TYPE,
        )],
        super::metrics::render(&status),
    ))
}

async fn search(
    State(tx): State<Tx>,
    Json(req): Json<SearchRequest>,
) -> Result<Json<SearchAnswer>, ApiError> {
    ask(&tx, |r| NodeRequest::Search(req, r))
        .await?
        .map(Json)
        .map_err(ApiError::bad_request)
}

async fn multicast(
    State(tx): State<Tx>,
    Json(req): Json<MulticastRequest>,
) -> Result<Json<MulticastAnswer>, ApiError> {
    ask(&tx, |r| NodeRequest::Multicast(req, r))
        .await?
        .map(Json)
        .map_err(ApiError::bad_request)
}

async fn deliveries(State(tx): State<Tx>) -> Result<Json<Vec<DeliveryRecord>>, ApiError> {
    Ok(Json(ask(&tx, NodeRequest::Deliveries).await?))
}

async fn insert_key(
    State(tx): State<Tx>,
    Json(req): Json<KeyRequest>,
) -> Result<Json<Done>, ApiError> {
    ask(&tx, |r| NodeRequest::InsertKey(req, r))
        .await?
        .map(|()| Json(Done {}))
        .map_err(ApiError::bad_request)
}

async fn remove_key(
    State(tx): State<Tx>,
    Json(req): Json<KeyRequest>,
) -> Result<Json<Done>, ApiError> {
    ask(&tx, |r| NodeRequest::RemoveKey(req, r))
        .await?
        .map(|()| Json(Done {}))
        .map_err(ApiError::bad_request)
}

async fn spawn(
    State(tx): State<Tx>,
    Query(params): Query<SpawnParams>,
    body: axum::body::Bytes,
) -> Result<Body, ApiError> {
    let (progress, rx) = mpsc::channel(64);
    tx.send(NodeRequest::Spawn(params, body.to_vec(), progress))
        .await
        .map_err(|_| ApiError::unavailable("the host is shutting down"))?;
    let lines = futures::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(line), rx))
    });
    Ok(Body::from_stream(lines))
}

async fn send(
    State(tx): State<Tx>,
    Path(vp): Path<String>,
    Json(req): Json<SendRequest>,
) -> Result<Json<SendAnswer>, ApiError> {
    ask(&tx, |r| NodeRequest::Send(vp, req, r)).await?.map(Json)
}

async fn destroy(
    State(tx): State<Tx>,
    Path(vp): Path<String>,
) -> Result<Json<DestroyAnswer>, ApiError> {
    ask(&tx, |r| NodeRequest::Destroy(vp, r)).await?.map(Json)
}

async fn drain(State(tx): State<Tx>) -> Result<Json<DrainAnswer>, ApiError> {
    ask(&tx, |reply| NodeRequest::Drain { stay: false, reply })
        .await?
        .map(Json)
        .map_err(ApiError::internal)
}

async fn stay(State(tx): State<Tx>) -> Result<Json<DrainAnswer>, ApiError> {
    ask(&tx, |reply| NodeRequest::Drain { stay: true, reply })
        .await?
        .map(Json)
        .map_err(ApiError::internal)
}

async fn vp_list(State(tx): State<Tx>) -> Result<Json<Vec<VpStatus>>, ApiError> {
    Ok(Json(ask(&tx, NodeRequest::VpList).await?))
}

async fn vp_status(
    State(tx): State<Tx>,
    Path(vp): Path<String>,
) -> Result<Json<VpStatus>, ApiError> {
    ask(&tx, |r| NodeRequest::VpStatus(vp, None, r))
        .await?
        .map(Json)
        .map_err(ApiError::not_found)
}

async fn vp_logs(
    State(tx): State<Tx>,
    Path(vp): Path<String>,
    Query(params): Query<LogsParams>,
) -> Result<Json<LogsAnswer>, ApiError> {
    let after = match params.after.as_deref() {
        Some(text) => parse_log_cursor(text).map_err(ApiError::bad_request)?,
        None => (0, 0),
    };
    let status = ask(&tx, |r| NodeRequest::VpStatus(vp, Some(after), r))
        .await?
        .map_err(ApiError::not_found)?;
    Ok(Json(LogsAnswer {
        vp: status.vp,
        host: status.host,
        lines: status.guest_log,
        skipped: status.guest_log_skipped,
        gap: status.guest_log_gap,
    }))
}

async fn vp_digest(
    State(tx): State<Tx>,
    Path(vp): Path<String>,
) -> Result<Json<DigestAnswer>, ApiError> {
    ask(&tx, |r| NodeRequest::VpDigest(vp, r))
        .await?
        .map(|digest| Json(DigestAnswer { digest }))
        .map_err(ApiError::not_found)
}

/// The routes, talking to the node through `tx`.
pub fn router(tx: Tx) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/metrics", get(metrics))
        .route("/v1/overlay/search", post(search))
        .route("/v1/overlay/multicast", post(multicast))
        .route("/v1/overlay/deliveries", get(deliveries))
        .route("/v1/overlay/keys", post(insert_key))
        .route("/v1/overlay/keys/remove", post(remove_key))
        .route("/v1/vps", get(vp_list).post(spawn))
        .route("/v1/drain", post(drain).delete(stay))
        .route("/v1/vps/{vp}", get(vp_status).delete(destroy))
        .route("/v1/vps/{vp}/send", post(send))
        .route("/v1/vps/{vp}/stream", get(super::stream::route))
        .route("/v1/vps/{vp}/digest", get(vp_digest))
        .route("/v1/vps/{vp}/logs", get(vp_logs))
        .with_state(tx)
}
