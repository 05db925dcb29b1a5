//! The replicated client-session table: exactly-once application and a reply cache.
//!
//! It is part of the replicated state (it goes into snapshots), so every decision here
//! depends only on the decided log: command fields and the log's time stamps, never on
//! local time or on when the caller polls.

use crate::config::Limits;
use crate::types::{Bytes, ClientId, Command};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the replicas know about a request that was already applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The reply recorded when the request was applied.
    Cached(Bytes),
    /// Applied, but the application has not produced its reply yet (async guests).
    Pending,
    /// Applied long ago (the client acknowledged it, or it was evicted by a limit);
    /// the reply is gone. The request is still never applied again while the
    /// client's session exists.
    Forgotten,
}

/// Whether a decided command is applied or answered from the table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// First time: apply it (and later call `record_reply`).
    Fresh,
    /// Already applied (or forgotten): do not apply; answer with this.
    Duplicate(Reply),
    /// A new client while every session in the full table was active within
    /// `session_retain_ms`: not applied and not remembered; the client may
    /// send it again later.
    Refused,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    /// Every seq below `floor` is treated as done: acknowledged by the client or evicted.
    floor: u64,
    /// Log time (ms) of the client's latest command: drives eviction.
    last_ms: u64,
    /// seq -> reply (None while pending) for applied requests at or above `floor`.
    replies: BTreeMap<u64, Option<Bytes>>,
}

/// Sessions keyed by client. Bounded by `clients_max` and `replies_per_client_max`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionTable {
    sessions: BTreeMap<ClientId, Session>,
}

/// Why `record_reply` refused a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply is {got} bytes, limit reply_bytes_max = {max}")]
    TooLarge { got: usize, max: usize },
}

impl SessionTable {
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Decides whether `cmd`, decided with log time `time_ms`, is fresh. Updates the
    /// table as a replicated state transition.
    pub fn admit(&mut self, cmd: &Command, time_ms: u64, limits: &Limits) -> Outcome {
        if !self.sessions.contains_key(&cmd.client)
            && cmd.client.0 & limits.own_client_bits == 0
            && self.sessions.len() >= limits.clients_max
            && !self.evict_idle(time_ms, limits.session_retain_ms)
        {
            return Outcome::Refused;
        }
        let s = self.sessions.entry(cmd.client).or_default();
        s.last_ms = s.last_ms.max(time_ms);
        if cmd.ack_below > s.floor {
            s.floor = cmd.ack_below;
            // Drop replies the client has acknowledged.
            while let Some(e) = s.replies.first_entry() {
                if *e.key() >= s.floor {
                    break;
                }
                e.remove();
            }
        }
        if cmd.seq < s.floor {
            return Outcome::Duplicate(Reply::Forgotten);
        }
        if let Some(r) = s.replies.get(&cmd.seq) {
            return Outcome::Duplicate(match r {
                Some(b) => Reply::Cached(b.clone()),
                None => Reply::Pending,
            });
        }
        s.replies.insert(cmd.seq, None);
        while s.replies.len() > limits.replies_per_client_max.max(1) {
            if let Some((&lowest, _)) = s.replies.iter().next() {
                s.replies.remove(&lowest);
                s.floor = s.floor.max(lowest + 1);
            }
        }
        Outcome::Fresh
    }

    /// Records the reply to an applied request. Returns false if the table no longer
    /// tracks it (acknowledged, evicted or never applied): the reply is simply not cached.
    pub fn record_reply(
        &mut self,
        client: ClientId,
        seq: u64,
        reply: Bytes,
        limits: &Limits,
    ) -> Result<bool, ReplyError> {
        if reply.len() > limits.reply_bytes_max {
            return Err(ReplyError::TooLarge {
                got: reply.len(),
                max: limits.reply_bytes_max,
            });
        }
        match self
            .sessions
            .get_mut(&client)
            .and_then(|s| s.replies.get_mut(&seq))
        {
            Some(slot) => {
                *slot = Some(reply);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// What the table knows about `(client, seq)` without changing it.
    pub fn lookup(&self, client: ClientId, seq: u64) -> Option<Reply> {
        let s = self.sessions.get(&client)?;
        if seq < s.floor {
            return Some(Reply::Forgotten);
        }
        s.replies.get(&seq).map(|r| match r {
            Some(b) => Reply::Cached(b.clone()),
            None => Reply::Pending,
        })
    }

    /// Evicts the session with the oldest log time (ties: smallest client id)
    /// if it has been idle for `retain_ms` of log time at `now_ms`; false if
    /// every session is more recent than that.
    fn evict_idle(&mut self, now_ms: u64, retain_ms: u64) -> bool {
        let victim = self
            .sessions
            .iter()
            .min_by_key(|(c, s)| (s.last_ms, **c))
            .filter(|(_, s)| s.last_ms.saturating_add(retain_ms) <= now_ms)
            .map(|(c, _)| *c);
        match victim {
            Some(c) => self.sessions.remove(&c).is_some(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(client: u128, seq: u64, ack_below: u64) -> Command {
        Command {
            client: ClientId(client),
            seq,
            ack_below,
            payload: Bytes::from(vec![1, 2, 3]),
        }
    }

    #[test]
    fn duplicate_is_answered_from_cache_and_never_fresh_twice() {
        let l = Limits::default();
        let mut t = SessionTable::default();
        assert_eq!(t.admit(&cmd(1, 0, 0), 10, &l), Outcome::Fresh);
        assert_eq!(
            t.admit(&cmd(1, 0, 0), 11, &l),
            Outcome::Duplicate(Reply::Pending)
        );
        assert_eq!(
            t.record_reply(ClientId(1), 0, Bytes::from(vec![9]), &l),
            Ok(true)
        );
        assert_eq!(
            t.admit(&cmd(1, 0, 0), 12, &l),
            Outcome::Duplicate(Reply::Cached(Bytes::from(vec![9])))
        );
        // Concurrent requests: seq 2 before seq 1 is fine.
        assert_eq!(t.admit(&cmd(1, 2, 0), 13, &l), Outcome::Fresh);
        assert_eq!(t.admit(&cmd(1, 1, 0), 13, &l), Outcome::Fresh);
        // Acknowledging drops replies below ack_below; the requests stay done.
        assert_eq!(t.admit(&cmd(1, 3, 2), 14, &l), Outcome::Fresh);
        assert_eq!(
            t.admit(&cmd(1, 0, 0), 15, &l),
            Outcome::Duplicate(Reply::Forgotten)
        );
        assert_eq!(t.lookup(ClientId(1), 2), Some(Reply::Pending));
    }

    #[test]
    fn limits_evict_deterministically_by_log_time() {
        let l = Limits {
            clients_max: 2,
            replies_per_client_max: 2,
            session_retain_ms: 4,
            ..Limits::default()
        };
        let mut t = SessionTable::default();
        t.admit(&cmd(1, 0, 0), 5, &l);
        t.admit(&cmd(2, 0, 0), 3, &l);
        t.admit(&cmd(3, 0, 0), 9, &l); // evicts client 2 (oldest log time, idle 6 ms)
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(ClientId(2), 0), None);
        assert_eq!(t.lookup(ClientId(1), 0), Some(Reply::Pending));
        // Per-client bound: the third outstanding reply evicts the lowest seq.
        t.admit(&cmd(1, 1, 0), 10, &l);
        t.admit(&cmd(1, 2, 0), 11, &l);
        assert_eq!(t.lookup(ClientId(1), 0), Some(Reply::Forgotten));
        assert_eq!(
            t.admit(&cmd(1, 0, 0), 12, &l),
            Outcome::Duplicate(Reply::Forgotten)
        );
        assert_eq!(
            t.record_reply(
                ClientId(1),
                1,
                Bytes::from(vec![0; 10]),
                &Limits {
                    reply_bytes_max: 4,
                    ..l.clone()
                }
            ),
            Err(ReplyError::TooLarge { got: 10, max: 4 })
        );
    }

    #[test]
    fn a_session_that_may_still_be_retried_is_never_evicted() {
        let l = Limits {
            clients_max: 2,
            session_retain_ms: 1_000,
            ..Limits::default()
        };
        let mut t = SessionTable::default();
        assert_eq!(t.admit(&cmd(1, 7, 7), 100, &l), Outcome::Fresh);
        assert_eq!(t.admit(&cmd(2, 1, 1), 200, &l), Outcome::Fresh);
        // A third client within the retain time of both: refused, nothing evicted.
        assert_eq!(t.admit(&cmd(3, 1, 1), 1_099, &l), Outcome::Refused);
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(ClientId(3), 1), None);
        // Client 1 retries its request: still a duplicate, never applied again.
        assert_eq!(
            t.admit(&cmd(1, 7, 7), 1_099, &l),
            Outcome::Duplicate(Reply::Pending)
        );
        // Once client 2 has been idle for the retain time it makes room
        // (client 1 was refreshed by its retry at 1,099).
        assert_eq!(t.admit(&cmd(3, 1, 1), 1_200, &l), Outcome::Fresh);
        assert_eq!(t.lookup(ClientId(2), 1), None);
        assert_eq!(t.lookup(ClientId(1), 7), Some(Reply::Pending));
        // An evicted client's next request opens a new session; its
        // acknowledgement keeps older requests from being applied.
        assert_eq!(t.admit(&cmd(2, 5, 5), 3_000, &l), Outcome::Fresh);
        assert_eq!(
            t.admit(&cmd(2, 3, 3), 3_000, &l),
            Outcome::Duplicate(Reply::Forgotten)
        );
    }

    #[test]
    fn the_applications_own_clients_are_admitted_into_a_full_table() {
        let own = 1 << 126;
        let l = Limits {
            clients_max: 2,
            session_retain_ms: 1_000,
            own_client_bits: own,
            ..Limits::default()
        };
        let mut t = SessionTable::default();
        assert_eq!(t.admit(&cmd(1, 1, 1), 100, &l), Outcome::Fresh);
        assert_eq!(t.admit(&cmd(2, 1, 1), 100, &l), Outcome::Fresh);
        assert_eq!(t.admit(&cmd(3, 1, 1), 200, &l), Outcome::Refused);
        assert_eq!(t.admit(&cmd(own | 3, 1, 1), 200, &l), Outcome::Fresh);
        assert_eq!(t.admit(&cmd(own | 7, 4, 4), 200, &l), Outcome::Fresh);
        assert_eq!(t.len(), 4);
        // still deduplicated like any session
        assert_eq!(
            t.admit(&cmd(own | 3, 1, 1), 300, &l),
            Outcome::Duplicate(Reply::Pending)
        );
        // and still nobody else gets in while the others are active
        assert_eq!(t.admit(&cmd(4, 1, 1), 300, &l), Outcome::Refused);
    }
}
