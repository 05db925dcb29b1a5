//! vp-host: runs WebAssembly apps as virtual peers.
//!
//! - [`sandbox`]: the deterministic Wasmtime sandbox (guests, snapshots, digests)
//! - [`exec`]: `vp-host exec`, an app on one machine driven by JSON lines
//! - [`bench`]: the sandbox benchmarks
//! - [`bench_vp`]: benchmarks of whole virtual peers (commit, failover, replace)
//! - [`net`]: libp2p connections and vp's message streams
//! - [`api`]: the daemon's local control API and its client
//! - [`node`]: the daemon (`vp-host join`): the overlay, and the API routes
//! - [`vp`]: virtual peers: member threads, their messages, the module store
//! - [`local`]: a cluster of `vp-host join` child processes on loopback
//! - [`demo`]: `vp-host demo`, a virtual peer losing and replacing a member

pub mod api;
pub mod bench;
pub mod bench_vp;
pub mod demo;
pub mod exec;
#[doc(hidden)]
pub mod fuzzing;
pub mod local;
pub mod net;
pub mod node;
pub mod sandbox;
pub mod vp;
pub mod watchdog;
