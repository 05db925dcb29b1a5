//! A misbehaving app for tests and benchmarks. On request it loops forever,
//! allocates without bound, panics, traps, or overflows its stack; it can
//! also hold bulk state (pseudo-random bytes) to exercise large snapshots.
//!
//! - `"spin"`: loops forever (runs out of fuel)
//! - `{"alloc": BYTES}`: allocates and keeps BYTES more bytes
//! - `{"panic": "why"}`: panics
//! - `"trap"`: executes `unreachable`
//! - `{"recurse": DEPTH}`: recursion deep enough to overflow the stack
//! - `{"add_then_panic": N}`: adds N to the counter, then panics (a trap must
//!   undo the add)
//! - `{"grow_then_panic": BYTES}`: allocates and keeps BYTES (growing memory),
//!   then panics
//! - `{"add": N}`: adds N to the counter; replies with the counter
//! - `{"hold": {"bytes": B, "seed": S}}`: replaces the held state with B
//!   pseudo-random bytes; replies with their checksum
//! - `"checksum"`: replies with the checksum of the held state (also a read)
//! - `"stats"`: replies with `[counter, held bytes, handled messages]`
//! - `{"note": TEXT}`: adds the text's length to the counter; replies with the
//!   counter (a message of any size, for throughput benchmarks)

use vp_guest_sdk::prelude::*;

#[derive(Default)]
pub struct Stress {
    counter: i64,
    held: Vec<u64>,
    hoard: Vec<Vec<u8>>,
    handled: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Msg {
    Spin,
    Alloc(u64),
    Panic(String),
    Trap,
    Recurse(u32),
    AddThenPanic(i64),
    GrowThenPanic(u64),
    Add(i64),
    Note(String),
    Hold { bytes: u64, seed: u64 },
    Checksum,
    Stats,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Number(i64),
    Stats([u64; 3]),
}

/// A word-wise checksum: cheap enough to run over 64 MiB within one message's fuel.
fn checksum(words: &[u64]) -> i64 {
    let mut sum = 0u64;
    for (i, w) in words.iter().enumerate() {
        sum = sum.rotate_left(5) ^ w.wrapping_add(i as u64);
    }
    sum as i64
}

#[inline(never)]
fn recurse(depth: u32, pad: [u8; 256]) -> u64 {
    if depth == 0 {
        return u64::from(pad[0]);
    }
    let mut next = pad;
    next[(depth % 256) as usize] = next[(depth % 256) as usize].wrapping_add(1);
    recurse(depth - 1, std::hint::black_box(next)) + u64::from(pad[1])
}

fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    panic!("trap");
}

impl App for Stress {
    type Msg = Msg;
    type Reply = Reply;

    fn handle(&mut self, _ctx: &mut Ctx<Self>, msg: Msg) -> Outcome<Reply> {
        self.handled += 1;
        let reply = match msg {
            Msg::Spin => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            Msg::Alloc(bytes) => {
                let bytes = usize::try_from(bytes)
                    .map_err(|_| "allocation larger than the address space")?;
                self.hoard.push(vec![1u8; bytes]);
                Reply::Number(self.hoard.iter().map(Vec::len).sum::<usize>() as i64)
            }
            Msg::Panic(why) => panic!("{why}"),
            Msg::Trap => trap(),
            Msg::Recurse(depth) => Reply::Number(recurse(depth, [0; 256]) as i64),
            Msg::AddThenPanic(n) => {
                self.counter += n;
                panic!("added {n}, then panicked");
            }
            Msg::GrowThenPanic(bytes) => {
                let bytes = usize::try_from(bytes)
                    .map_err(|_| "allocation larger than the address space")?;
                self.hoard.push(vec![1u8; bytes]);
                panic!("grew by {bytes} bytes, then panicked");
            }
            Msg::Add(n) => {
                self.counter = self
                    .counter
                    .checked_add(n)
                    .ok_or("counter would overflow")?;
                Reply::Number(self.counter)
            }
            Msg::Note(text) => {
                self.counter = self.counter.wrapping_add(text.len() as i64);
                Reply::Number(self.counter)
            }
            Msg::Hold { bytes, seed } => {
                let words = usize::try_from(bytes / 8).map_err(|_| "too large")?;
                let mut state = seed | 1;
                self.held = Vec::new();
                self.held.reserve_exact(words);
                self.held.extend((0..words).map(|_| {
                    // xorshift64: cheap, and never produces all-zero pages
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state
                }));
                Reply::Number(checksum(&self.held))
            }
            Msg::Checksum => Reply::Number(checksum(&self.held)),
            Msg::Stats => Reply::Stats([
                self.counter as u64,
                self.held.len() as u64 * 8,
                self.handled,
            ]),
        };
        Ok(reply.into())
    }

    fn read(&self, msg: Msg) -> Result<Reply, Error> {
        match msg {
            Msg::Checksum => Ok(Reply::Number(checksum(&self.held))),
            Msg::Stats => Ok(Reply::Stats([
                self.counter as u64,
                self.held.len() as u64 * 8,
                self.handled,
            ])),
            _ => Err(Error::new("not a read")),
        }
    }
}

vp_guest_sdk::export_app!(Stress);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vp_guest_sdk::testing::TestApp;

    #[test]
    fn holds_state_and_checksums_it() {
        let mut t = TestApp::<Stress>::new();
        let a: i64 = t
            .request(&json!({"hold": {"bytes": 4096, "seed": 7}}))
            .unwrap();
        let b: i64 = t.request(&json!("checksum")).unwrap();
        assert_eq!(a, b);
        let c: i64 = t
            .request(&json!({"hold": {"bytes": 4096, "seed": 8}}))
            .unwrap();
        assert_ne!(a, c);
        let stats: [u64; 3] = t.request(&json!("stats")).unwrap();
        assert_eq!(stats, [0, 4096, 4]);
    }

    #[test]
    fn notes_add_their_length() {
        let mut t = TestApp::<Stress>::new();
        assert_eq!(t.request::<_, i64>(&json!({"note": "abc"})).unwrap(), 3);
        assert_eq!(t.request::<_, i64>(&json!({"note": "hello"})).unwrap(), 8);
    }
}
