//! The host's network: libp2p connections and the `/vp/wire/2` message streams.
//!
//! Tasks and what each owns (docs/host.md has the picture):
//!
//! - the **swarm task** owns the libp2p `Swarm` (TCP + noise + yamux, with a
//!   pre-shared key when the network is private; QUIC otherwise; identify,
//!   ping, connection limits, the address book, the stream behaviour). It
//!   reports connections and identify results as [`NetEvent`]s and serves
//!   dial and status commands.
//! - one **writer task per remote peer** owns the outbound stream to that
//!   peer. [`Net::send`] puts an encoded frame on the peer's bounded queue
//!   and never waits: when the queue is full the frame is dropped and counted
//!   (`frames_dropped_queue_full`; the protocols above tolerate loss), so a
//!   slow peer cannot make this host's memory grow.
//! - one **reader task per inbound stream** decodes frames and hands them to
//!   the node through one bounded channel; when the node is behind, readers
//!   wait, and the yamux window pushes back on the senders. A frame that is
//!   too large or does not decode closes the stream and the connection.

pub mod frame;
pub mod identity;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::core::{Endpoint, transport::PortUse};
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, SwarmEvent, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, Transport, connection_limits, identify, noise, ping,
    yamux,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use frame::{FrameError, encode_frame, read_frame, write_frames};

/// The protocol of vp's message streams.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/vp/wire/2");
/// The agent string sent in identify.
pub const AGENT: &str = concat!("vp-host/", env!("CARGO_PKG_VERSION"));
/// Bytes a writer batches into one write.
const WRITE_BATCH_BYTES_MAX: usize = 1024 * 1024;
/// How long opening a stream (dialing included) may take.
const OPEN_STREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a stream open waiting for its peer asks the swarm to dial it.
const DIAL_NUDGE: Duration = Duration::from_millis(100);
/// A writer with nothing to send for this long exits (and is re-created on demand).
const WRITER_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Addresses kept per peer in the address book.
pub const PEER_ADDRS_MAX: usize = 8;
/// Peers kept in the address book.
pub const ADDRESS_BOOK_PEERS_MAX: usize = 100_000;

/// Limits and settings of the network layer.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub listen: Vec<Multiaddr>,
    pub psk: Option<PreSharedKey>,
    /// Frames queued for one peer before new ones are dropped.
    pub peer_queue_frames_max: usize,
    /// Decoded frames queued for the node before readers wait.
    pub inbound_queue_frames_max: usize,
    pub connections_max: u32,
    pub connections_per_peer_max: u32,
    pub pending_incoming_max: u32,
    pub idle_connection_timeout: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            listen: Vec::new(),
            psk: None,
            peer_queue_frames_max: 4096,
            inbound_queue_frames_max: 8192,
            connections_max: 1024,
            connections_per_peer_max: 4,
            pending_incoming_max: 128,
            idle_connection_timeout: Duration::from_secs(300),
        }
    }
}

/// What the network tells the node.
#[derive(Debug)]
pub enum NetEvent<M> {
    /// A message from a peer.
    Message { from: PeerId, msg: M },
    /// The first connection to a peer was established.
    Connected { peer: PeerId, addr: Multiaddr },
    /// The last connection to a peer closed; `broken` if it failed (an I/O
    /// error: the peer's process died, or the network between us did) rather
    /// than being closed (idle, or on purpose).
    Disconnected { peer: PeerId, broken: bool },
    /// A peer told us its listen addresses.
    Identified {
        peer: PeerId,
        listen_addrs: Vec<Multiaddr>,
        agent: String,
    },
    /// We listen on a new address.
    ListenAddr(Multiaddr),
    /// A stream to this peer could not be opened (it is down or unreachable).
    Unreachable { peer: PeerId },
}

/// Counters, for `vp-host status` and the logs.
#[derive(Debug, Default)]
pub struct NetStats {
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub frames_received: AtomicU64,
    pub frames_dropped_queue_full: AtomicU64,
    pub frames_dropped_unreachable: AtomicU64,
    pub bad_frames: AtomicU64,
    pub connection_errors: AtomicU64,
}

/// A snapshot of [`NetStats`].
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct NetCounters {
    pub frames_sent: u64,
    pub bytes_sent: u64,
    pub frames_received: u64,
    pub frames_dropped_queue_full: u64,
    pub frames_dropped_unreachable: u64,
    pub bad_frames: u64,
    pub connection_errors: u64,
}

impl NetStats {
    fn snapshot(&self) -> NetCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetCounters {
            frames_sent: get(&self.frames_sent),
            bytes_sent: get(&self.bytes_sent),
            frames_received: get(&self.frames_received),
            frames_dropped_queue_full: get(&self.frames_dropped_queue_full),
            frames_dropped_unreachable: get(&self.frames_dropped_unreachable),
            bad_frames: get(&self.bad_frames),
            connection_errors: get(&self.connection_errors),
        }
    }
}

/// What the swarm reports about itself.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct NetStatus {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub connected_peers: Vec<ConnectedPeer>,
    pub counters: NetCounters,
    pub private_network: Option<String>,
}

/// One connected peer.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ConnectedPeer {
    pub peer_id: String,
    pub addr: String,
    pub rtt_us: Option<u64>,
    pub agent: Option<String>,
}

/// Why a send did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("queue to {0} is full; message dropped")]
    QueueFull(PeerId),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the network is shut down")]
    Closed,
}

enum Command {
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, String>>,
    },
    Status {
        reply: oneshot::Sender<NetStatus>,
    },
    Disconnect {
        peer: PeerId,
    },
    /// Dial `peer` by id (addresses from the address book) unless connected
    /// or already dialing.
    Connect {
        peer: PeerId,
    },
}

/// Addresses to dial peers at, filled from identify and from what the node
/// learns (overlay references carry addresses).
#[derive(Clone, Default)]
struct AddressBook(Arc<Mutex<HashMap<PeerId, Vec<Multiaddr>>>>);

impl AddressBook {
    fn add(&self, peer: PeerId, addrs: impl IntoIterator<Item = Multiaddr>) {
        let mut book = self.0.lock().expect("address book lock");
        if book.len() >= ADDRESS_BOOK_PEERS_MAX && !book.contains_key(&peer) {
            // Forget an arbitrary peer; it is re-learned when it matters.
            if let Some(victim) = book.keys().next().copied() {
                book.remove(&victim);
            }
        }
        let entry = book.entry(peer).or_default();
        for addr in addrs {
            if !entry.contains(&addr) {
                entry.insert(0, addr);
            }
        }
        entry.truncate(PEER_ADDRS_MAX);
    }

    fn get(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.0
            .lock()
            .expect("address book lock")
            .get(peer)
            .cloned()
            .unwrap_or_default()
    }
}

/// A behaviour that only answers "where can peer X be dialed?".
struct AddressBookBehaviour(AddressBook);

impl NetworkBehaviour for AddressBookBehaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = std::convert::Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        Ok(peer.map(|p| self.0.get(&p)).unwrap_or_default())
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _: FromSwarm<'_>) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    addresses: AddressBookBehaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    stream: libp2p_stream::Behaviour,
}

struct Inner {
    local: PeerId,
    control: libp2p_stream::Control,
    addresses: AddressBook,
    writers: Mutex<HashMap<PeerId, mpsc::Sender<Bytes>>>,
    commands: mpsc::Sender<Command>,
    stats: NetStats,
    peer_queue_frames_max: usize,
    unreachable: mpsc::Sender<PeerId>,
    /// So that threads outside the runtime (virtual-peer threads) can send.
    runtime: tokio::runtime::Handle,
}

/// Handle to the host's network. Cheap to clone.
pub struct Net<M> {
    inner: Arc<Inner>,
    /// The node's own event queue, for messages from this host to itself.
    local: mpsc::Sender<NetEvent<M>>,
    /// Set once by the node: see [`Net::set_route`].
    route: Arc<std::sync::OnceLock<Route<M>>>,
}

/// Takes an inbound message on the reader's task, before the node's event
/// queue, and gives it back (`Some`) if the node should handle it after all.
pub type Route<M> = Arc<dyn Fn(PeerId, M) -> Option<M> + Send + Sync>;

impl<M> Clone for Net<M> {
    fn clone(&self) -> Self {
        Net {
            inner: self.inner.clone(),
            local: self.local.clone(),
            route: self.route.clone(),
        }
    }
}

fn build_transport(
    keypair: &Keypair,
    psk: Option<PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>> {
    let noise = noise::Config::new(keypair).context("noise configuration")?;
    let tcp = libp2p::tcp::tokio::Transport::new(libp2p::tcp::Config::default().nodelay(true));
    let timeout = Duration::from_secs(10);
    Ok(match psk {
        // A private network: pnet wraps TCP before noise. QUIC has its own TLS
        // handshake that pnet cannot wrap, so a private host speaks TCP only.
        Some(psk) => tcp
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(timeout)
            .boxed(),
        None => {
            let tcp = tcp
                .upgrade(Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .timeout(timeout);
            let quic = libp2p::quic::tokio::Transport::new(libp2p::quic::Config::new(keypair))
                .map(|(peer, conn), _| (peer, StreamMuxerBox::new(conn)));
            tcp.or_transport(quic)
                .map(|either, _| match either {
                    futures::future::Either::Left((peer, muxer)) => {
                        (peer, StreamMuxerBox::new(muxer))
                    }
                    futures::future::Either::Right(out) => out,
                })
                .boxed()
        }
    })
}

impl<M: Serialize + DeserializeOwned + Send + 'static> Net<M> {
    /// Start listening; returns the handle and the stream of events for the node.
    pub async fn start(
        keypair: Keypair,
        config: NetConfig,
    ) -> Result<(Net<M>, mpsc::Receiver<NetEvent<M>>)> {
        let local = keypair.public().to_peer_id();
        let addresses = AddressBook::default();
        let private = config.psk.map(|psk| psk.fingerprint().to_string());
        let transport = build_transport(&keypair, config.psk)?;
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(config.connections_max))
            .with_max_established_per_peer(Some(config.connections_per_peer_max))
            .with_max_pending_incoming(Some(config.pending_incoming_max));
        let book = addresses.clone();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_other_transport(|_| Ok(transport))
            .map_err(|e| anyhow::anyhow!("transport: {e}"))?
            .with_behaviour(|key| Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                addresses: AddressBookBehaviour(book),
                identify: identify::Behaviour::new(
                    identify::Config::new("/vp/1".to_string(), key.public())
                        .with_agent_version(AGENT.to_string()),
                ),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(5)),
                ),
                stream: libp2p_stream::Behaviour::new(),
            })
            .map_err(|e| anyhow::anyhow!("behaviour: {e}"))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_connection_timeout))
            .build();
        for addr in &config.listen {
            let quic = addr
                .iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::QuicV1));
            if quic && private.is_some() {
                tracing::warn!(%addr, "private network: QUIC cannot carry the network key; not listening there");
                continue;
            }
            swarm
                .listen_on(addr.clone())
                .with_context(|| format!("cannot listen on {addr}"))?;
        }
        let mut control = swarm.behaviour().stream.new_control();
        let incoming = control
            .accept(PROTOCOL)
            .map_err(|_| anyhow::anyhow!("{PROTOCOL} registered twice"))?;
        let (commands, command_rx) = mpsc::channel(256);
        let (events, event_rx) = mpsc::channel(config.inbound_queue_frames_max);
        let (unreachable, mut unreachable_rx) = mpsc::channel::<PeerId>(1024);
        let forward = events.clone();
        tokio::spawn(async move {
            while let Some(peer) = unreachable_rx.recv().await {
                if forward.send(NetEvent::Unreachable { peer }).await.is_err() {
                    return;
                }
            }
        });
        let inner = Arc::new(Inner {
            local,
            control,
            addresses,
            writers: Mutex::new(HashMap::new()),
            commands,
            stats: NetStats::default(),
            peer_queue_frames_max: config.peer_queue_frames_max,
            unreachable,
            runtime: tokio::runtime::Handle::current(),
        });
        tokio::spawn(swarm_task(
            swarm,
            command_rx,
            events.clone(),
            Arc::downgrade(&inner),
            private,
        ));
        let route = Arc::new(std::sync::OnceLock::new());
        tokio::spawn(accept_task::<M>(
            incoming,
            events.clone(),
            Arc::downgrade(&inner),
            route.clone(),
        ));
        Ok((
            Net {
                inner,
                local: events,
                route,
            },
            event_rx,
        ))
    }

    /// Route inbound messages on the readers' tasks before they reach the
    /// node's event queue (the node hands consensus messages straight to
    /// member threads: they do not wait behind API requests). Set once; a
    /// second call is ignored.
    pub fn set_route(&self, route: Route<M>) {
        let _ = self.route.set(route);
    }

    /// This host's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.inner.local
    }

    /// Remember addresses a peer can be dialed at.
    pub fn add_addresses(&self, peer: PeerId, addrs: impl IntoIterator<Item = Multiaddr>) {
        if peer != self.inner.local {
            self.inner.addresses.add(peer, addrs);
        }
    }

    /// The addresses `peer` can be dialed at, as far as this host knows.
    pub fn addresses_of(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.inner.addresses.get(peer)
    }

    /// Whether any address to dial `peer` at is known (a peer that could
    /// not be reached for want of one is not known to be dead).
    pub fn knows_addresses(&self, peer: &PeerId) -> bool {
        !self.inner.addresses.get(peer).is_empty()
    }

    /// Dial `peer` unless connected or dialing already; never waits. Success
    /// shows as [`NetEvent::Connected`]; a failed dial reports nothing (only
    /// frames that cannot be delivered give [`NetEvent::Unreachable`]). Used
    /// to find out whether a peer thought dead is back.
    pub fn connect(&self, peer: PeerId) {
        let _ = self.inner.commands.try_send(Command::Connect { peer });
    }

    /// Encode `msg` once, for [`Net::send_frame`] to one or more peers.
    pub fn encode(msg: &M) -> Result<Bytes, FrameError> {
        let mut out = Vec::new();
        encode_frame(msg, &mut out)?;
        Ok(Bytes::from(out))
    }

    /// Queue `msg` for `peer`; never waits. Dropped (and counted) if the
    /// peer's queue is full.
    pub fn send(&self, peer: PeerId, msg: &M) -> Result<(), SendError> {
        self.send_frame(peer, Self::encode(msg)?)
    }

    /// Deliver `msg` to this host's own node, as if it came from the network
    /// (a member answering a client on the same host); never waits.
    pub fn send_local(&self, msg: M) -> Result<(), SendError> {
        let local = self.inner.local;
        self.local
            .try_send(NetEvent::Message { from: local, msg })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SendError::QueueFull(local),
                mpsc::error::TrySendError::Closed(_) => SendError::Closed,
            })
    }

    /// Queue an encoded frame for `peer`; never waits. Callable from any thread.
    pub fn send_frame(&self, peer: PeerId, frame: Bytes) -> Result<(), SendError> {
        let mut writers = self.inner.writers.lock().expect("writers lock");
        let sender = match writers.get(&peer) {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let (tx, rx) = mpsc::channel(self.inner.peer_queue_frames_max);
                self.inner
                    .runtime
                    .spawn(writer_task(peer, rx, Arc::downgrade(&self.inner)));
                writers.insert(peer, tx.clone());
                tx
            }
        };
        drop(writers);
        match sender.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.inner
                    .stats
                    .frames_dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
                Err(SendError::QueueFull(peer))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Closed),
        }
    }

    /// Dial an address (a bootstrap host); returns the peer's id once connected.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .commands
            .send(Command::Dial {
                addr: addr.clone(),
                reply,
            })
            .await
            .map_err(|_| anyhow::anyhow!("network stopped"))?;
        let result = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .map_err(|_| anyhow::anyhow!("dialing {addr} timed out"))?
            .map_err(|_| anyhow::anyhow!("network stopped"))?;
        result.map_err(|e| anyhow::anyhow!("cannot connect to {addr}: {e}"))
    }

    /// Listen addresses, connected peers, counters.
    pub async fn status(&self) -> Result<NetStatus> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .commands
            .send(Command::Status { reply })
            .await
            .map_err(|_| anyhow::anyhow!("network stopped"))?;
        rx.await.map_err(|_| anyhow::anyhow!("network stopped"))
    }

    /// Open a raw `/vp/wire/2` stream to `peer` (tests write malformed frames with it).
    #[doc(hidden)]
    pub async fn open_raw_stream(&self, peer: PeerId) -> Result<libp2p::Stream> {
        let mut control = self.inner.control.clone();
        Ok(
            tokio::time::timeout(OPEN_STREAM_TIMEOUT, control.open_stream(peer, PROTOCOL))
                .await??,
        )
    }

    /// Wait until every peer's queue is empty (or `timeout` passes): used before
    /// exiting, so a graceful leave's messages go out.
    pub async fn flush(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            let busy = self
                .inner
                .writers
                .lock()
                .expect("writers lock")
                .values()
                .any(|tx| tx.capacity() < tx.max_capacity());
            if !busy {
                // the last batch may still be in the writer's hands
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Counters only (no round trip to the swarm task).
    pub fn counters(&self) -> NetCounters {
        self.inner.stats.snapshot()
    }
}

/// Open a `/vp/wire/2` stream to `peer`, connecting first if need be.
///
/// `libp2p_stream` starts a dial for an unconnected peer through a channel
/// with room for one request: a second open to another unconnected peer in
/// the same swarm turn finds it full, and no dial is ever made for it. The
/// open then waited for the peer to connect of its own accord (once 4.5 s,
/// past a failover: a client's host that had not talked to the new leader
/// before). So the swarm task is asked to dial the peer as well, again every
/// `DIAL_NUDGE` until the stream opens or `OPEN_STREAM_TIMEOUT` passes; a dial
/// while connected or dialing is a no-op, and a failed dial fails the open.
async fn open_stream(
    control: &mut libp2p_stream::Control,
    commands: &mpsc::Sender<Command>,
    peer: PeerId,
) -> Result<libp2p::Stream, String> {
    let open = control.open_stream(peer, PROTOCOL);
    tokio::pin!(open);
    let deadline = tokio::time::sleep(OPEN_STREAM_TIMEOUT);
    tokio::pin!(deadline);
    let mut nudge = tokio::time::interval(DIAL_NUDGE);
    loop {
        tokio::select! {
            biased;
            opened = &mut open => return opened.map_err(|e| format!("cannot open a stream: {e}")),
            () = &mut deadline => return Err("opening a stream timed out".to_string()),
            _ = nudge.tick() => {
                let _ = commands.try_send(Command::Connect { peer });
            }
        }
    }
}

async fn writer_task(peer: PeerId, mut rx: mpsc::Receiver<Bytes>, inner: std::sync::Weak<Inner>) {
    let Some(strong) = inner.upgrade() else {
        return;
    };
    let mut control = strong.control.clone();
    drop(strong);
    let mut stream: Option<libp2p::Stream> = None;
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut failures = 0u32;
    loop {
        let first = match tokio::time::timeout(WRITER_IDLE_TIMEOUT, rx.recv()).await {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => break,
        };
        batch.clear();
        batch.extend_from_slice(&first);
        let mut frames = 1u64;
        while batch.len() < WRITE_BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(frame) => {
                    batch.extend_from_slice(&frame);
                    frames += 1;
                }
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else { break };
        // A stream kept from before may belong to a connection that has
        // closed since (the peer was killed, or restarted on the same
        // address): a failed write is tried once more on a fresh stream
        // (which dials again) before the frames are dropped. A peer that
        // cannot be reached then is reported at once.
        for attempt in 0..2 {
            if stream.is_none() {
                let why = match open_stream(&mut control, &inner.commands, peer).await {
                    Ok(s) => {
                        stream = Some(s);
                        failures = 0;
                        None
                    }
                    Err(e) => Some(e),
                };
                if let Some(why) = why {
                    failures += 1;
                    inner
                        .stats
                        .frames_dropped_unreachable
                        .fetch_add(frames, Ordering::Relaxed);
                    let _ = inner.unreachable.try_send(peer);
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::debug!(%peer, failures, "{why}; {frames} frames dropped");
                    }
                    break;
                }
            }
            let Some(s) = stream.as_mut() else { break };
            match write_frames(s, &batch).await {
                Ok(()) => {
                    inner.stats.frames_sent.fetch_add(frames, Ordering::Relaxed);
                    inner
                        .stats
                        .bytes_sent
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    stream = None;
                    if attempt == 0 {
                        tracing::debug!(%peer, "stream write failed: {e}; trying a new stream");
                    } else {
                        tracing::debug!(%peer, "stream write failed again: {e}; {frames} frames dropped");
                        inner
                            .stats
                            .frames_dropped_unreachable
                            .fetch_add(frames, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    if let Some(inner) = inner.upgrade() {
        let mut writers = inner.writers.lock().expect("writers lock");
        if writers
            .get(&peer)
            .is_some_and(|tx| tx.is_closed() || tx.capacity() == tx.max_capacity())
        {
            writers.remove(&peer);
        }
    }
}

async fn accept_task<M: DeserializeOwned + Send + 'static>(
    mut incoming: libp2p_stream::IncomingStreams,
    events: mpsc::Sender<NetEvent<M>>,
    inner: std::sync::Weak<Inner>,
    route: Arc<std::sync::OnceLock<Route<M>>>,
) {
    while let Some((peer, stream)) = incoming.next().await {
        // `instrument`, not a span entered inside the task: a guard held
        // across an await stays entered on the worker thread while other
        // tasks run there, and their lines would carry this peer.
        tokio::spawn(
            reader_task(peer, stream, events.clone(), inner.clone(), route.clone())
                .instrument(tracing::debug_span!("stream", %peer)),
        );
    }
}

async fn reader_task<M: DeserializeOwned + Send + 'static>(
    peer: PeerId,
    mut stream: libp2p::Stream,
    events: mpsc::Sender<NetEvent<M>>,
    inner: std::sync::Weak<Inner>,
    route: Arc<std::sync::OnceLock<Route<M>>>,
) {
    let mut buf = Vec::new();
    loop {
        match read_frame::<M>(&mut stream, &mut buf).await {
            Ok(Some(msg)) => {
                if let Some(inner) = inner.upgrade() {
                    inner.stats.frames_received.fetch_add(1, Ordering::Relaxed);
                }
                let msg = match route.get() {
                    Some(route) => match route(peer, msg) {
                        Some(msg) => msg,
                        None => continue,
                    },
                    None => msg,
                };
                if events
                    .send(NetEvent::Message { from: peer, msg })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(None) => return,
            Err(FrameError::Io(e)) => {
                tracing::debug!(%peer, "stream closed: {e}");
                return;
            }
            Err(e) => {
                tracing::warn!(%peer, "closing the connection: bad frame: {e}");
                if let Some(inner) = inner.upgrade() {
                    inner.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    let _ = inner.commands.try_send(Command::Disconnect { peer });
                }
                return;
            }
        }
    }
}

/// A hint for a failed connection. With mismatched network keys the pnet
/// layer decrypts garbage, so the symptom is a failed or timed-out protocol
/// negotiation rather than a clear error.
fn connection_hint(error: &str, private: bool) -> &'static str {
    let handshake = ["oise", "andshake", "pnet", "imeout", "negotiate"]
        .iter()
        .any(|s| error.contains(s));
    match (handshake, private) {
        (true, true) => " (this network is private: both hosts need the same --network-key)",
        (true, false) => {
            " (if the other host runs a private network, it needs the same --network-key as this one)"
        }
        _ => "",
    }
}

async fn swarm_task<M: Send + 'static>(
    mut swarm: Swarm<Behaviour>,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent<M>>,
    inner: std::sync::Weak<Inner>,
    private: Option<String>,
) {
    let mut dials: HashMap<ConnectionId, (Multiaddr, oneshot::Sender<Result<PeerId, String>>)> =
        HashMap::new();
    let mut rtts: HashMap<PeerId, Duration> = HashMap::new();
    let mut agents: HashMap<PeerId, String> = HashMap::new();
    let mut conn_addrs: HashMap<PeerId, Multiaddr> = HashMap::new();
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else { return };
                match command {
                    Command::Dial { addr, reply } => {
                        let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
                        let id = opts.connection_id();
                        match swarm.dial(opts) {
                            Ok(()) => { dials.insert(id, (addr, reply)); }
                            Err(e) => { let _ = reply.send(Err(e.to_string())); }
                        }
                    }
                    Command::Status { reply } => {
                        let counters = inner.upgrade().map(|i| i.stats.snapshot()).unwrap_or_default();
                        let connected_peers = swarm
                            .connected_peers()
                            .map(|p| ConnectedPeer {
                                peer_id: p.to_string(),
                                addr: conn_addrs.get(p).map(ToString::to_string).unwrap_or_default(),
                                rtt_us: rtts.get(p).map(|d| d.as_micros() as u64),
                                agent: agents.get(p).cloned(),
                            })
                            .collect();
                        let _ = reply.send(NetStatus {
                            peer_id: swarm.local_peer_id().to_string(),
                            listen_addrs: swarm.listeners().map(ToString::to_string).collect(),
                            connected_peers,
                            counters,
                            private_network: private.clone(),
                        });
                    }
                    Command::Disconnect { peer } => { let _ = swarm.disconnect_peer_id(peer); }
                    Command::Connect { peer } => {
                        if !swarm.is_connected(&peer) {
                            let opts = DialOpts::peer_id(peer)
                                .condition(PeerCondition::DisconnectedAndNotDialing)
                                .build();
                            // Refused only while connected or dialing already.
                            let _ = swarm.dial(opts);
                        }
                    }
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    tracing::info!(%address, "listening");
                    let _ = events.send(NetEvent::ListenAddr(address)).await;
                }
                SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                    let addr = endpoint.get_remote_address().clone();
                    if let Some((_, reply)) = dials.remove(&connection_id) {
                        let _ = reply.send(Ok(peer_id));
                    }
                    if let (true, Some(inner)) = (endpoint.is_dialer(), inner.upgrade()) {
                        inner.addresses.add(peer_id, [addr.clone()]);
                    }
                    if num_established.get() == 1 {
                        tracing::debug!(peer = %peer_id, %addr, "connected");
                        conn_addrs.insert(peer_id, addr.clone());
                        let _ = events.send(NetEvent::Connected { peer: peer_id, addr }).await;
                    }
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, cause, .. } => {
                    tracing::debug!(peer = %peer_id, cause = ?cause, "disconnected");
                    rtts.remove(&peer_id);
                    conn_addrs.remove(&peer_id);
                    let broken = matches!(cause, Some(libp2p::swarm::ConnectionError::IO(_)));
                    let _ = events.send(NetEvent::Disconnected { peer: peer_id, broken }).await;
                }
                SwarmEvent::OutgoingConnectionError { connection_id, peer_id, error } => {
                    let text = error.to_string();
                    if let Some(inner) = inner.upgrade() { inner.stats.connection_errors.fetch_add(1, Ordering::Relaxed); }
                    let hint = connection_hint(&text, private.is_some());
                    match dials.remove(&connection_id) {
                        Some((addr, reply)) => {
                            tracing::warn!(%addr, "cannot connect: {text}{hint}");
                            let _ = reply.send(Err(format!("{text}{hint}")));
                        }
                        None => tracing::debug!(peer = ?peer_id, "outgoing connection failed: {text}{hint}"),
                    }
                }
                SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                    if let Some(inner) = inner.upgrade() { inner.stats.connection_errors.fetch_add(1, Ordering::Relaxed); }
                    let text = error.to_string();
                    tracing::warn!(from = %send_back_addr, "incoming connection failed: {text}{}", connection_hint(&text, private.is_some()));
                }
                SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                    if let Some(inner) = inner.upgrade() { inner.addresses.add(peer_id, info.listen_addrs.iter().cloned()); }
                    agents.insert(peer_id, info.agent_version.clone());
                    let _ = events
                        .send(NetEvent::Identified { peer: peer_id, listen_addrs: info.listen_addrs, agent: info.agent_version })
                        .await;
                }
                SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, result: Ok(rtt), .. })) => {
                    rtts.insert(peer, rtt);
                }
                _ => {}
            }
        }
    }
}
