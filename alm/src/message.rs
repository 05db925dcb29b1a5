//! Wire messages between hosts. The daemon encodes them (CBOR); everything decoded from the
//! network is checked by [`Message::validate`] before the core acts on it.

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::types::{Bytes, Contact, HostRef, Key, KeyRange, NodeRef, OpId, Side};

/// One message: the sending host (identity and contact, so that any host can answer it)
/// and the body. The daemon must check `from.host` against the authenticated sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message<C> {
    /// The sender.
    pub from: HostRef<C>,
    /// What it says.
    pub body: Body<C>,
}

/// Why a link request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// The addressed key is not held by this host (any more).
    NoSuchKey,
    /// The requester's membership vector does not put it in the addressed node's list.
    PrefixMismatch,
    /// The requester has the same key as the addressed node.
    SameKey,
    /// The addressed node is itself still joining or repairing that level: retry later.
    NotReady,
}

/// Outcome of a multicast hand-off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckStatus {
    /// Taken over: the receiver is now responsible for the range.
    Taken,
    /// The addressed key is not held by the receiver: route around it.
    NoSuchKey,
    /// The receiver is at `forwards_in_flight_max`: try again later.
    Busy,
}

/// The body of a message. Requests name the key (`to`) they are addressed to on the
/// receiving host; replies name the request (`req`, a number local to the requester).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body<C> {
    /// Liveness probe.
    Ping {
        /// Echoed in the pong.
        nonce: u64,
    },
    /// Answer to a ping.
    Pong {
        /// From the ping.
        nonce: u64,
    },
    /// Route towards `target` (greedy, top level down); the last node answers `origin`.
    Search {
        /// The operation.
        op: OpId,
        /// Which attempt of the operation this is.
        attempt: u32,
        /// The key sought.
        target: Key,
        /// Who to answer.
        origin: HostRef<C>,
        /// The node to continue from (`None`: any key of the receiving host, e.g. at an
        /// introducer).
        to: Option<Key>,
        /// Forwards so far.
        hops: u32,
        /// Hand-off number at the forwarding host, to acknowledge with `SearchAck` (0: no
        /// acknowledgement wanted).
        fwd: u64,
    },
    /// Acknowledges a forwarded search (so the forwarder can route around a silent host).
    SearchAck {
        /// The hand-off.
        fwd: u64,
    },
    /// The end of a search: the node holding `target`, or the nearest one (the largest
    /// key below it when routing rightwards, the smallest above it when leftwards).
    SearchReply {
        /// The operation.
        op: OpId,
        /// The attempt answered.
        attempt: u32,
        /// The node found.
        found: NodeRef<C>,
        /// True if `found` holds exactly the key sought.
        exact: bool,
        /// `found`'s level-0 neighbour on the target's side (so a joining or repairing
        /// node learns both of its neighbours).
        next: Option<NodeRef<C>>,
        /// Forwards the search took.
        hops: u32,
    },
    /// "Take `node` as your neighbour at `level` on its side of you" (join, repair and
    /// stabilisation all use this).
    LinkRequest {
        /// Request number at the requester.
        req: u64,
        /// The addressed node.
        to: Key,
        /// The level.
        level: u8,
        /// The requester.
        node: NodeRef<C>,
    },
    /// Walk the `level` list in direction `side` until a node that shares `level + 1`
    /// membership bits with `node`; that node treats it as a link request at `level + 1`.
    Walk {
        /// Request number at the requester.
        req: u64,
        /// The addressed node.
        to: Key,
        /// The list walked.
        level: u8,
        /// Direction of the walk.
        side: Side,
        /// The requester.
        node: NodeRef<C>,
        /// Forwards so far.
        hops: u32,
    },
    /// The link request (or walk) was accepted by `by`, which replaced `old` by the
    /// requester.
    LinkAccept {
        /// The request.
        req: u64,
        /// The requesting node.
        to: Key,
        /// The level linked.
        level: u8,
        /// The node that accepted.
        by: NodeRef<C>,
        /// Its previous neighbour on the requester's side (now the requester's neighbour on
        /// the far side, if it lies there).
        old: Option<NodeRef<C>>,
    },
    /// `next` lies between `by` and the requester at this level: ask it instead.
    LinkRedirect {
        /// The request.
        req: u64,
        /// The requesting node.
        to: Key,
        /// The level.
        level: u8,
        /// The node that refused.
        by: NodeRef<C>,
        /// The closer node.
        next: NodeRef<C>,
    },
    /// The link request was refused.
    LinkReject {
        /// The request.
        req: u64,
        /// The requesting node.
        to: Key,
        /// The refused key.
        key: Key,
        /// Why.
        reason: RejectReason,
    },
    /// The walk ran off the end of the list: no node on that side qualifies.
    WalkEnd {
        /// The request.
        req: u64,
        /// The requesting node.
        to: Key,
    },
    /// "Which node do you know on `side` beyond me?": asked by a node that lost level 0 on
    /// that side, of its neighbour on the other side. Answered by a `LinkRedirect` to the
    /// closest such node (which the requester then asks to link) or `WalkEnd`.
    Beyond {
        /// Request number at the requester.
        req: u64,
        /// The addressed node.
        to: Key,
        /// The side beyond the requester.
        side: Side,
        /// The requester.
        node: NodeRef<C>,
    },
    /// "`node` lies beyond you on its side at `level`": sent by a node that just replaced
    /// `node` by the addressee as its neighbour, so the addressee can link to it.
    Hint {
        /// The addressed node.
        to: Key,
        /// The level.
        level: u8,
        /// The node beyond.
        node: NodeRef<C>,
    },
    /// `leaving` leaves the `level` list; `replacement` is its neighbour on the far side.
    Leave {
        /// The addressed node.
        to: Key,
        /// The level.
        level: u8,
        /// The key that leaves.
        leaving: Key,
        /// The new neighbour of `to` on that side.
        replacement: Option<NodeRef<C>>,
    },
    /// A range multicast hand-off: the receiver becomes responsible for delivering
    /// `payload` to every key in `range` (if its own key is in it), or for routing it
    /// towards the range (if not).
    Multicast {
        /// Hand-off number at the sender (for the acknowledgement).
        fwd: u64,
        /// The addressed node.
        to: Key,
        /// The multicast.
        op: OpId,
        /// Its sender.
        origin: HostRef<C>,
        /// The part of the range the receiver is responsible for.
        range: KeyRange,
        /// The payload.
        payload: Bytes,
        /// Forwards so far.
        hops: u32,
    },
    /// Acknowledges a hand-off.
    MulticastAck {
        /// The hand-off.
        fwd: u64,
        /// Outcome.
        status: AckStatus,
    },
    /// A node found that (part of) a multicast range holds no key at all.
    MulticastEmpty {
        /// The multicast.
        op: OpId,
    },
    /// A message was addressed to a key the sender does not hold (drop references to it).
    Gone {
        /// The key.
        key: Key,
    },
}

impl<C> Body<C> {
    /// A short name for statistics.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Ping { .. } => "ping",
            Body::Pong { .. } => "pong",
            Body::Search { .. } => "search",
            Body::SearchAck { .. } => "search_ack",
            Body::SearchReply { .. } => "search_reply",
            Body::LinkRequest { .. } => "link_request",
            Body::Walk { .. } => "walk",
            Body::LinkAccept { .. } => "link_accept",
            Body::LinkRedirect { .. } => "link_redirect",
            Body::LinkReject { .. } => "link_reject",
            Body::WalkEnd { .. } => "walk_end",
            Body::Leave { .. } => "leave",
            Body::Hint { .. } => "hint",
            Body::Beyond { .. } => "beyond",
            Body::Multicast { .. } => "multicast",
            Body::MulticastAck { .. } => "multicast_ack",
            Body::MulticastEmpty { .. } => "multicast_empty",
            Body::Gone { .. } => "gone",
        }
    }
}

impl<C: Contact> Message<C> {
    /// Check every size, count and level against `config`. Never panics.
    pub fn validate(&self, config: &Config) -> Result<(), String> {
        let key = |k: &Key| -> Result<(), String> {
            if k.len() > config.key_bytes_max {
                Err(format!(
                    "key of {} bytes > key_bytes_max {}",
                    k.len(),
                    config.key_bytes_max
                ))
            } else {
                Ok(())
            }
        };
        let contact = |c: &C| -> Result<(), String> {
            if c.size_bytes() > config.contact_bytes_max {
                Err(format!(
                    "contact of {} bytes > contact_bytes_max {}",
                    c.size_bytes(),
                    config.contact_bytes_max
                ))
            } else {
                Ok(())
            }
        };
        let node = |n: &NodeRef<C>| -> Result<(), String> {
            key(&n.key)?;
            contact(&n.contact)
        };
        let level = |l: u8| -> Result<(), String> {
            if usize::from(l) >= config.level_max {
                Err(format!("level {l} >= level_max {}", config.level_max))
            } else {
                Ok(())
            }
        };
        let hops = |h: u32| -> Result<(), String> {
            if h > config.hops_max {
                Err(format!("hops {h} > hops_max {}", config.hops_max))
            } else {
                Ok(())
            }
        };
        contact(&self.from.contact)?;
        match &self.body {
            Body::Ping { .. }
            | Body::Pong { .. }
            | Body::SearchAck { .. }
            | Body::MulticastAck { .. }
            | Body::MulticastEmpty { .. } => Ok(()),
            Body::Search {
                target,
                origin,
                to,
                hops: h,
                ..
            } => {
                key(target)?;
                contact(&origin.contact)?;
                if let Some(t) = to {
                    key(t)?;
                }
                hops(*h)
            }
            Body::SearchReply {
                found,
                next,
                hops: h,
                ..
            } => {
                node(found)?;
                if let Some(n) = next {
                    node(n)?;
                }
                hops(*h)
            }
            Body::LinkRequest {
                to,
                level: l,
                node: n,
                ..
            } => {
                key(to)?;
                level(*l)?;
                node(n)?;
                if n.host != self.from.host {
                    return Err("link request for a node of another host".into());
                }
                Ok(())
            }
            Body::Walk {
                to,
                level: l,
                node: n,
                hops: h,
                ..
            } => {
                key(to)?;
                // The walk links at `level + 1`.
                level(l.saturating_add(1))?;
                node(n)?;
                hops(*h)
            }
            Body::LinkAccept {
                to,
                level: l,
                by,
                old,
                ..
            } => {
                key(to)?;
                level(*l)?;
                node(by)?;
                if by.host != self.from.host {
                    return Err("link accepted for a node of another host".into());
                }
                if let Some(o) = old {
                    node(o)?;
                }
                Ok(())
            }
            Body::LinkRedirect {
                to,
                level: l,
                by,
                next,
                ..
            } => {
                key(to)?;
                level(*l)?;
                node(by)?;
                node(next)
            }
            Body::LinkReject { to, key: k, .. } => {
                key(to)?;
                key(k)
            }
            Body::WalkEnd { to, .. } => key(to),
            Body::Beyond { to, node: n, .. } => {
                key(to)?;
                node(n)
            }
            Body::Hint {
                to,
                level: l,
                node: n,
            } => {
                key(to)?;
                level(*l)?;
                node(n)
            }
            Body::Leave {
                to,
                level: l,
                leaving,
                replacement,
            } => {
                key(to)?;
                level(*l)?;
                key(leaving)?;
                if let Some(r) = replacement {
                    node(r)?;
                }
                Ok(())
            }
            Body::Multicast {
                to,
                origin,
                range,
                payload,
                hops: h,
                ..
            } => {
                key(to)?;
                contact(&origin.contact)?;
                if range.size_bytes() > 2 * config.key_bytes_max {
                    return Err("range bounds too long".into());
                }
                if payload.len() > config.payload_bytes_max {
                    return Err(format!(
                        "payload of {} bytes > payload_bytes_max {}",
                        payload.len(),
                        config.payload_bytes_max
                    ));
                }
                hops(*h)
            }
            Body::Gone { key: k } => key(k),
        }
    }
}
