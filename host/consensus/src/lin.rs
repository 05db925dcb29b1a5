//! A linearizability checker for key-value histories (Wing & Gong's search with
//! Lowe's memoisation of visited configurations).
//!
//! Linearizability is local (Herlihy & Wing), so a history is checked key by key: each
//! key is an independent register.

use std::collections::{BTreeMap, HashSet};

/// What a client asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvInput {
    /// Write a value; the output is the previous value.
    Put(u64),
    /// Read; the output is the current value.
    Get,
}

/// One operation of the history, on one key. Times are the client's send and receive.
#[derive(Clone, Debug)]
pub struct KvOp {
    pub key: u64,
    pub call: u64,
    /// `None` if the client never got an answer: the operation may or may not have
    /// taken effect, at any time after `call`.
    pub ret: Option<u64>,
    pub input: KvInput,
    /// The value observed (previous value for a put, current value for a get).
    pub output: Option<u64>,
}

/// Why a history is not linearizable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinViolation {
    pub key: u64,
    pub ops: usize,
    pub detail: String,
}

impl std::fmt::Display for LinViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "history of key {} ({} ops) is not linearizable: {}",
            self.key, self.ops, self.detail
        )
    }
}

/// Search budget: configurations explored per key before giving up as "too hard"
/// (reported as a violation so it cannot pass silently).
pub const SEARCH_STEPS_MAX: u64 = 5_000_000;

/// Checks a whole history. Returns the number of operations checked.
pub fn check(history: &[KvOp]) -> Result<usize, LinViolation> {
    let mut by_key: BTreeMap<u64, Vec<KvOp>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.key).or_default().push(op.clone());
    }
    let mut n = 0;
    for (key, ops) in by_key {
        n += ops.len();
        check_register(key, &ops)?;
    }
    Ok(n)
}

struct Search<'a> {
    ops: &'a [KvOp],
    done: Vec<bool>,
    visited: HashSet<(Vec<u64>, Option<u64>)>,
    steps: u64,
}

fn bits(done: &[bool]) -> Vec<u64> {
    let mut v = vec![0u64; done.len().div_ceil(64)];
    for (i, d) in done.iter().enumerate() {
        if *d {
            v[i / 64] |= 1 << (i % 64);
        }
    }
    v
}

impl Search<'_> {
    /// Depth-first: can the remaining operations be linearized from `state`?
    fn go(&mut self, state: Option<u64>) -> Result<bool, ()> {
        self.steps += 1;
        if self.steps > SEARCH_STEPS_MAX {
            return Err(());
        }
        // Finished when every completed operation is linearized (pending ones may
        // never have taken effect).
        let remaining_completed = self
            .ops
            .iter()
            .zip(&self.done)
            .any(|(op, d)| !d && op.ret.is_some());
        if !remaining_completed {
            return Ok(true);
        }
        if !self.visited.insert((bits(&self.done), state)) {
            return Ok(false);
        }
        // Only operations invoked before every pending return may go next.
        let horizon = self
            .ops
            .iter()
            .zip(&self.done)
            .filter(|(_, d)| !**d)
            .filter_map(|(op, _)| op.ret)
            .min()
            .unwrap_or(u64::MAX);
        for i in 0..self.ops.len() {
            if self.done[i] || self.ops[i].call > horizon {
                continue;
            }
            let op = &self.ops[i];
            let (ok, next) = match op.input {
                KvInput::Put(v) => (
                    op.output.is_none_or(|o| Some(o) == state.or(Some(0))),
                    Some(v),
                ),
                KvInput::Get => (
                    op.output.is_none_or(|o| Some(o) == state.or(Some(0))),
                    state,
                ),
            };
            // Unknown outputs (pending ops) match anything.
            let ok = if op.ret.is_none() { true } else { ok };
            if !ok {
                continue;
            }
            self.done[i] = true;
            let r = self.go(next)?;
            self.done[i] = false;
            if r {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Checks one register (initial value 0, outputs report 0 for "never written").
pub fn check_register(key: u64, ops: &[KvOp]) -> Result<(), LinViolation> {
    let mut sorted: Vec<KvOp> = ops.to_vec();
    sorted.sort_by_key(|o| (o.call, o.ret.unwrap_or(u64::MAX)));
    let mut s = Search {
        ops: &sorted,
        done: vec![false; sorted.len()],
        visited: HashSet::new(),
        steps: 0,
    };
    match s.go(None) {
        Ok(true) => Ok(()),
        Ok(false) => Err(LinViolation {
            key,
            ops: sorted.len(),
            detail: format!("no valid order; ops: {sorted:?}"),
        }),
        Err(()) => Err(LinViolation {
            key,
            ops: sorted.len(),
            detail: "search budget exhausted".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: u64, ret: Option<u64>, input: KvInput, output: Option<u64>) -> KvOp {
        KvOp {
            key: 1,
            call,
            ret,
            input,
            output,
        }
    }

    #[test]
    fn sequential_history_passes() {
        let h = vec![
            op(0, Some(1), KvInput::Put(5), Some(0)),
            op(2, Some(3), KvInput::Get, Some(5)),
            op(4, Some(5), KvInput::Put(6), Some(5)),
            op(6, Some(7), KvInput::Get, Some(6)),
        ];
        assert_eq!(check(&h), Ok(4));
    }

    #[test]
    fn stale_read_after_completed_write_fails() {
        let h = vec![
            op(0, Some(1), KvInput::Put(5), Some(0)),
            op(2, Some(3), KvInput::Get, Some(0)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn concurrent_ops_may_order_either_way() {
        // The read overlaps the write: it may see old or new.
        let h = vec![
            op(0, Some(10), KvInput::Put(5), Some(0)),
            op(1, Some(2), KvInput::Get, Some(5)),
            op(3, Some(4), KvInput::Get, Some(5)),
        ];
        assert!(check(&h).is_ok());
        // But once a read saw the new value, a later read cannot see the old one.
        let h = vec![
            op(0, Some(10), KvInput::Put(5), Some(0)),
            op(1, Some(2), KvInput::Get, Some(5)),
            op(3, Some(4), KvInput::Get, Some(0)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn pending_write_may_or_may_not_take_effect() {
        let h = vec![
            op(0, None, KvInput::Put(5), None),
            op(1, Some(2), KvInput::Get, Some(0)),
            op(3, Some(4), KvInput::Get, Some(5)),
        ];
        assert!(check(&h).is_ok());
        let h = vec![
            op(0, None, KvInput::Put(5), None),
            op(3, Some(4), KvInput::Get, Some(7)),
        ];
        assert!(check(&h).is_err());
    }
}
