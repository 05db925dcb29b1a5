//! The example apps as wasm32 modules, built by this crate's build script.
//!
//! For tests, benchmarks and `vp-host demo`; app authors build their own apps
//! with `cargo build --release --target wasm32-unknown-unknown`.

/// `apps/counter`: `{"add": N}`, `"get"`.
pub const COUNTER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/counter.wasm"));
/// `apps/kv`: `{"put": {"key", "value"}}`, `{"get": K}`, `{"delete": K}`.
pub const KV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kv.wasm"));
/// `apps/chat`: posts, bridges (one-way sends), `ask` (async calls).
pub const CHAT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chat.wasm"));
/// `apps/stress`: misbehaves on request; holds bulk state.
pub const STRESS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/stress.wasm"));

/// Every example app by name.
pub const ALL: [(&str, &[u8]); 4] = [
    ("counter", COUNTER),
    ("kv", KV),
    ("chat", CHAT),
    ("stress", STRESS),
];

/// An example app by name.
pub fn by_name(name: &str) -> Option<&'static [u8]> {
    ALL.iter().find(|(n, _)| *n == name).map(|(_, wasm)| *wasm)
}
