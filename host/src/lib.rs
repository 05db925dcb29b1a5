//! vp-host: runs WebAssembly apps as virtual peers.
//!
//! - [`sandbox`]: the deterministic Wasmtime sandbox (guests, snapshots, digests)

pub mod sandbox;
