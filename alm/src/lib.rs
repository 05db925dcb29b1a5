//! `vp-alm`: a skip graph over all hosts and range multicast over it (application-level
//! multicast), as a sans-IO core.
//!
//! Each host runs one [`AlmHost`], which holds several keys (one per virtual-peer
//! membership, e.g. `<vp-id>/<host-id>`, plus the host's own key). A message to virtual
//! peer `x` is a multicast over [`KeyRange::prefix`]`(x)`: it reaches the current members
//! without the sender knowing who they are.
//!
//! The core never does I/O, reads no clock and draws no OS randomness: the caller passes
//! `now` ([`Time`]) into every call, sends what [`AlmHost::poll_send`] yields, reports
//! what arrives through [`AlmHost::handle_message`], and calls
//! [`AlmHost::handle_timeout`] at [`AlmHost::poll_timeout`]. [`sim`] drives thousands of
//! hosts that way deterministically; [`bench`] measures them.
//!
//! See `docs/alm.md` for the data structure, the messages and the algorithms.

pub mod bench;
mod config;
mod error;
mod host;
mod message;
mod rng;
pub mod sim;
mod types;

pub use config::Config;
pub use error::{AlmError, OpError};
pub use host::{AlmHost, Event, HostStats, NodeView, Transmit};
pub use message::{AckStatus, Body, Message, RejectReason};
pub use rng::Rng;
pub use types::{
    Bound, Bytes, Contact, ContactBytes, HostId, HostRef, Key, KeyRange, MembershipVector, NodeRef,
    OpId, Side, Time,
};
