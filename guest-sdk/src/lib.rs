//! Write a vp guest: a deterministic state machine that runs as a virtual peer.
//!
//! An app is a `Default` struct plus a handler. Messages and replies are plain
//! serde types (they travel as CBOR; `vp-host send` turns JSON into them).
//!
//! ```
//! use vp_guest_sdk::prelude::*;
//!
//! #[derive(Default)]
//! pub struct Counter { total: i64 }
//!
//! #[derive(Deserialize)]
//! #[serde(rename_all = "snake_case")]
//! pub enum Msg { Add(i64), Get }
//!
//! impl App for Counter {
//!     type Msg = Msg;
//!     type Reply = i64;
//!     fn handle(&mut self, _ctx: &mut Ctx<Self>, msg: Msg) -> Outcome<i64> {
//!         if let Msg::Add(n) = msg {
//!             self.total = self.total.checked_add(n).ok_or("counter would overflow")?;
//!         }
//!         Ok(self.total.into())
//!     }
//! }
//! vp_guest_sdk::export_app!(Counter);
//! # let mut t = vp_guest_sdk::testing::TestApp::<Counter>::new();
//! # assert_eq!(t.request::<_, i64>(&serde_json::json!({"add": 2})).unwrap(), 2);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-unknown-unknown` (crate
//! type `cdylib`), test its handlers natively with [`testing::TestApp`].
//!
//! Rules a guest lives by (the host enforces them; `docs/abi.md` has the detail):
//! state changes only while handling a message; time and randomness come from
//! [`Ctx::now_ms`] and [`Ctx::random_u64`], which the ordering leader stamped;
//! a handler that traps or runs out of fuel has no effect at all; to act
//! later, arm a timer ([`Ctx::set_timer`], handled by [`App::timer`]). Log lines
//! for yourself with [`info!`] and friends ([`log`]); `vp-host logs <vp>`
//! shows them.

pub mod abi;
pub mod log;
mod runtime;
pub mod testing;
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod wasm;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

pub use abi::{Address, VpId};
pub use runtime::{Call, Ctx, Runtime};
pub use serde;

/// What most apps need.
pub mod prelude {
    pub use crate::{Address, App, Call, Ctx, Error, Handled, Outcome, VpId};
    pub use serde::{Deserialize, Serialize};
}

/// A virtual peer's app: its state is `Self`, changed only by [`App::handle`].
pub trait App: Default + 'static {
    /// The messages the app accepts (decoded from CBOR; from JSON at the CLI).
    type Msg: serde::de::DeserializeOwned + 'static;
    /// What a handled message answers.
    type Reply: serde::Serialize + 'static;

    /// Handle one ordered message. Reply now with `Ok(reply.into())`, fail with
    /// `Err(..)` (or `?`), or return `Ok(ctx.later(async move { ... }))` to
    /// await calls to other virtual peers first. The same messages in the same
    /// order must give the same state on every replica, which holds as long as
    /// the handler uses only its inputs, its state and the `ctx`.
    ///
    /// An error reply does not undo changes the handler already made to
    /// `self`; a trap (a panic, running out of fuel or memory) undoes
    /// everything the message did.
    fn handle(&mut self, ctx: &mut Ctx<Self>, msg: Self::Msg) -> Outcome<Self::Reply>;

    /// A timer this app armed ([`Ctx::set_timer`]) is due. Runs as an
    /// ordered input on every replica, like a message, with the ordered time
    /// at or after the due time; the timer is disarmed before this runs (arm
    /// it again for a periodic one). Nobody awaits the outcome: an error, or
    /// the error of a `ctx.later(..)` future, goes to the app's log
    /// (`vp-host logs`). `ctx.from()` is `Address::Client(0)` and
    /// `ctx.message_id()` the timer's id. The default does nothing.
    fn timer(&mut self, ctx: &mut Ctx<Self>, id: u64) -> Outcome<()> {
        let _ = (ctx, id);
        Ok(().into())
    }

    /// Answer a linearizable read (`vp-host send --read`) without changing
    /// state. Runs on one replica only, so it must not mutate anything; the
    /// default refuses reads.
    fn read(&self, msg: Self::Msg) -> Result<Self::Reply, Error> {
        let _ = msg;
        Err(Error::new(
            "this app does not answer reads; send the message without --read",
        ))
    }
}

/// What [`App::handle`] returns: a reply or an error reply.
pub type Outcome<R> = Result<Handled<R>, Error>;

/// A successful [`App::handle`]: the reply now, or a future that replies later.
pub enum Handled<R> {
    /// The reply is ready (`Ok(reply.into())` builds this).
    Now(R),
    /// The handler continues asynchronously (it awaits calls); its output is
    /// the reply. Build it with [`Ctx::later`].
    Later(Pin<Box<dyn Future<Output = Result<R, Error>>>>),
}

impl<R> From<R> for Handled<R> {
    fn from(reply: R) -> Self {
        Handled::Now(reply)
    }
}

impl<R> fmt::Debug for Handled<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Handled::Now(_) => f.write_str("Handled::Now(..)"),
            Handled::Later(_) => f.write_str("Handled::Later(..)"),
        }
    }
}

/// An error reply: a message for the sender.
#[derive(Clone, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    /// An error with this message.
    pub fn new(msg: impl Into<String>) -> Self {
        Error(msg.into())
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error({:?})", self.0)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(msg: String) -> Self {
        Error(msg)
    }
}

impl From<&str> for Error {
    fn from(msg: &str) -> Self {
        Error(msg.to_string())
    }
}

/// Export an [`App`] as the guest's entry points (`vp_abi_version`, `vp_init`,
/// `vp_handle`, `vp_query`). Use once, in the app's `cdylib` crate. On native
/// targets it expands to nothing, so the crate also builds for tests.
#[macro_export]
macro_rules! export_app {
    ($app:ty) => {
        #[cfg(target_arch = "wasm32")]
        static __VP_RUNTIME: $crate::wasm::RuntimeSlot<$app> = $crate::wasm::RuntimeSlot::new();

        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn vp_abi_version() -> u32 {
            $crate::abi::ABI_VERSION
        }

        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn vp_init() -> u32 {
            $crate::wasm::init(&__VP_RUNTIME)
        }

        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn vp_handle(len: u32) -> u32 {
            $crate::wasm::handle(&__VP_RUNTIME, len)
        }

        #[cfg(target_arch = "wasm32")]
        #[unsafe(no_mangle)]
        pub extern "C" fn vp_query(len: u32) -> u32 {
            $crate::wasm::query(&__VP_RUNTIME, len)
        }
    };
}
