//! The executor that lives inside the guest.
//!
//! A suspended handler is a boxed future stored in [`Runtime::tasks`]; it is
//! ordinary data in linear memory, so a snapshot of the guest carries it to
//! another machine. Futures never need a real waker: the only thing a handler
//! can wait for is a [`Call`], and a call is resolved only by an ordered
//! `Input::CallReply`, at which point the runtime polls the task that waits
//! for it. Everything is single-threaded and deterministic.
//!
//! The armed timers are kept here too (id to due time), mirroring the table
//! the host keeps from the `set_timer` / `cancel_timer` effects, so the SDK
//! can refuse more than `TIMERS_MAX` and answer `Ctx::timer_due` itself.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::abi::{self, Address, Effect, Envelope, Input, VpId, WireResult};
use crate::{App, Error, Handled};

type TaskFuture = Pin<Box<dyn Future<Output = WireResult>>>;

struct Task {
    future: TaskFuture,
    /// The request the task answers; `None` for a timer's handler (its
    /// result is logged if it is an error).
    reply_to: Option<(Address, u64)>,
    /// The timer whose handler this is (for the log line of a failure).
    timer: u64,
}

enum CallSlot {
    /// No reply yet; the task (if any) that polled the call and waits for it.
    Waiting(Option<u64>),
    /// The reply arrived; the awaiting future takes it.
    Ready(WireResult),
}

/// The state a handler context shares with the runtime.
struct Shared {
    effects: RefCell<Vec<Effect>>,
    calls: RefCell<BTreeMap<u64, CallSlot>>,
    /// Armed timers: id -> due time (ms since the epoch).
    timers: RefCell<BTreeMap<u64, u64>>,
    time_ms: Cell<u64>,
    from: Cell<Address>,
    message_id: Cell<u64>,
    rng: Cell<u64>,
    next_call_id: Cell<u64>,
    polling_task: Cell<Option<u64>>,
}

impl Shared {
    fn begin(&self, env: &Envelope) {
        self.time_ms.set(env.time_ms());
        self.rng.set(env.entropy());
    }

    fn effect(&self, effect: Effect) {
        self.effects.borrow_mut().push(effect);
    }

    fn next_call_id(&self) -> u64 {
        let id = self.next_call_id.get();
        self.next_call_id.set(id + 1);
        id
    }
}

/// A handler's view of the world: who sent the message, the ordered time and
/// randomness, and the ways to talk to other virtual peers.
///
/// `Ctx` is cheap to clone and `'static`, so an async handler moves a clone
/// into its future and keeps using it after an `.await`.
pub struct Ctx<A> {
    shared: Rc<Shared>,
    app: Rc<RefCell<A>>,
}

impl<A> Clone for Ctx<A> {
    fn clone(&self) -> Self {
        Ctx {
            shared: self.shared.clone(),
            app: self.app.clone(),
        }
    }
}

impl<A: 'static> Ctx<A> {
    /// The sender of the request being handled. After an `.await` this is still
    /// the sender of the request the handler is answering.
    pub fn from(&self) -> Address {
        self.shared.from.get()
    }

    /// The sender's id for the request being handled.
    pub fn message_id(&self) -> u64 {
        self.shared.message_id.get()
    }

    /// Milliseconds since the Unix epoch, as stamped on the input being
    /// processed by the ordering leader. Identical on every replica; never
    /// goes backwards.
    pub fn now_ms(&self) -> u64 {
        self.shared.time_ms.get()
    }

    /// A random number drawn from the entropy the leader stamped on the current
    /// input: identical on every replica, different for every input.
    pub fn random_u64(&self) -> u64 {
        // splitmix64: a well-mixed sequence from the stamped seed
        let mut z = self.shared.rng.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.shared.rng.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Send a one-way message to another virtual peer, after this input's
    /// effects are ordered. It is applied there at most once, and exactly once
    /// if the callee takes it within 60 s of retries (through leader changes
    /// on either side); a callee unreachable that long, one found nowhere (no
    /// host holds a key of it for 5 s), or one refusing it because it serves
    /// its maximum of client sessions, does not get it, and
    /// nothing tells this guest (the hosts log a warning). Any reply is dropped: use
    /// [`Ctx::call`] to learn the outcome.
    pub fn send<M: Serialize + ?Sized>(&self, to: VpId, msg: &M) -> Result<(), Error> {
        let payload = abi::encode(msg).map_err(Error::new)?;
        let id = self.shared.next_call_id();
        self.shared.effect(Effect::Send(to, id, payload.into()));
        Ok(())
    }

    /// Call another virtual peer and await its reply, decoded as `R`.
    ///
    /// The handler that awaits this suspends; its state stays in the guest's
    /// memory (and migrates with it) until the reply is ordered and delivered.
    pub fn call<M: Serialize + ?Sized, R: DeserializeOwned>(&self, to: VpId, msg: &M) -> Call<R> {
        match abi::encode(msg) {
            Ok(payload) => {
                let id = self.shared.next_call_id();
                self.shared.effect(Effect::Call(to, id, payload.into()));
                self.shared
                    .calls
                    .borrow_mut()
                    .insert(id, CallSlot::Waiting(None));
                Call {
                    shared: self.shared.clone(),
                    state: CallState::Waiting(id, to),
                    _reply: PhantomData,
                }
            }
            Err(e) => Call {
                shared: self.shared.clone(),
                state: CallState::Failed(e),
                _reply: PhantomData,
            },
        }
    }

    /// Arm timer `id` to fire `after_ms` milliseconds after this input's time
    /// ([`Ctx::now_ms`]): then [`App::timer`] runs with `id`, on every replica,
    /// as an ordered input like any message. Arming an id that is already
    /// armed moves it. Ids are the app's own choice.
    ///
    /// A timer fires once, at or after its due time: the leader proposes it
    /// when its clock reaches the due time (it checks every 20 ms), so it
    /// runs about a consensus round later, and later still while the virtual
    /// peer has no leader (a failover). Timers are part of the replicated
    /// state: they survive leader changes, member replacements and restarts.
    /// At most [`abi::TIMERS_MAX`] are armed at once; arming one more is an
    /// error (nothing changes).
    pub fn set_timer(&self, id: u64, after_ms: u64) -> Result<(), Error> {
        self.set_timer_at(id, self.now_ms().saturating_add(after_ms))
    }

    /// Arm timer `id` to fire at `due_ms` (ms since the Unix epoch, on the
    /// ordered clock); a time already past fires as soon as the leader can
    /// order it. See [`Ctx::set_timer`].
    pub fn set_timer_at(&self, id: u64, due_ms: u64) -> Result<(), Error> {
        let mut timers = self.shared.timers.borrow_mut();
        if !timers.contains_key(&id) && timers.len() >= abi::TIMERS_MAX {
            return Err(Error::new(format!(
                "{} timers are armed, the most an app may have; cancel one first",
                abi::TIMERS_MAX
            )));
        }
        timers.insert(id, due_ms);
        self.shared.effect(Effect::SetTimer(id, due_ms));
        Ok(())
    }

    /// Disarm timer `id`. Returns whether it was armed.
    pub fn cancel_timer(&self, id: u64) -> bool {
        let armed = self.shared.timers.borrow_mut().remove(&id).is_some();
        if armed {
            self.shared.effect(Effect::CancelTimer(id));
        }
        armed
    }

    /// When timer `id` is due (ms since the epoch), if it is armed.
    pub fn timer_due(&self, id: u64) -> Option<u64> {
        self.shared.timers.borrow().get(&id).copied()
    }

    /// Reply later: run `future` to completion (it may await calls) and send its
    /// result as the reply to the request being handled. Use as
    /// `Ok(ctx.later(async move { ... }))`.
    pub fn later<R, F>(&self, future: F) -> Handled<R>
    where
        F: Future<Output = Result<R, Error>> + 'static,
    {
        Handled::Later(Box::pin(future))
    }

    /// Use the app's state from async code (after an `.await`). Inside a
    /// synchronous `handle` use `&mut self` instead: the app is already
    /// borrowed there, and calling this panics (a trap, rolled back by the host).
    pub fn with_app<T>(&self, f: impl FnOnce(&mut A) -> T) -> T {
        let mut app = self.app.try_borrow_mut().unwrap_or_else(|_| {
            panic!("Ctx::with_app called while the app is borrowed (inside handle, use &mut self)")
        });
        f(&mut app)
    }
}

enum CallState {
    Waiting(u64, VpId),
    Failed(String),
    Done,
}

/// The future returned by [`Ctx::call`]: resolves to the callee's reply.
#[must_use = "a call does nothing unless awaited"]
pub struct Call<R> {
    shared: Rc<Shared>,
    state: CallState,
    _reply: PhantomData<fn() -> R>,
}

impl<R> Call<R> {
    /// The call id this guest gave the call (also visible to the host in the
    /// `call` effect).
    pub fn id(&self) -> Option<u64> {
        match self.state {
            CallState::Waiting(id, _) => Some(id),
            _ => None,
        }
    }
}

impl<R: DeserializeOwned> Future for Call<R> {
    type Output = Result<R, Error>;

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match std::mem::replace(&mut this.state, CallState::Done) {
            CallState::Failed(e) => Poll::Ready(Err(Error::new(e))),
            CallState::Done => panic!("Call polled after it completed"),
            CallState::Waiting(id, to) => {
                let mut calls = this.shared.calls.borrow_mut();
                match calls.remove(&id) {
                    Some(CallSlot::Ready(Ok(bytes))) => {
                        Poll::Ready(abi::decode(&bytes).map_err(|e| {
                            Error::new(format!("reply from vp {to} did not decode: {e}"))
                        }))
                    }
                    Some(CallSlot::Ready(Err(e))) => {
                        Poll::Ready(Err(Error::new(format!("vp {to}: {e}"))))
                    }
                    Some(CallSlot::Waiting(_)) | None => {
                        calls.insert(id, CallSlot::Waiting(this.shared.polling_task.get()));
                        this.state = CallState::Waiting(id, to);
                        Poll::Pending
                    }
                }
            }
        }
    }
}

impl<R> Drop for Call<R> {
    fn drop(&mut self) {
        // A call dropped before its reply: forget it, so the reply is ignored.
        if let CallState::Waiting(id, _) = self.state {
            self.shared.calls.borrow_mut().remove(&id);
        }
    }
}

/// One app instance and its executor. The wasm glue keeps one in a static; the
/// native test harness keeps one per [`crate::testing::TestApp`].
pub struct Runtime<A: App> {
    app: Rc<RefCell<A>>,
    shared: Rc<Shared>,
    tasks: BTreeMap<u64, Task>,
    next_task_id: u64,
    output: Vec<u8>,
}

impl<A: App> Default for Runtime<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: App> Runtime<A> {
    /// A fresh app (`A::default()`) with no suspended handlers.
    pub fn new() -> Self {
        Runtime {
            app: Rc::new(RefCell::new(A::default())),
            shared: Rc::new(Shared {
                effects: RefCell::new(Vec::new()),
                calls: RefCell::new(BTreeMap::new()),
                timers: RefCell::new(BTreeMap::new()),
                time_ms: Cell::new(0),
                from: Cell::new(Address::Client(0)),
                message_id: Cell::new(0),
                rng: Cell::new(0),
                next_call_id: Cell::new(1),
                polling_task: Cell::new(None),
            }),
            tasks: BTreeMap::new(),
            next_task_id: 1,
            output: Vec::new(),
        }
    }

    /// The app's state, for inspection.
    pub fn app(&self) -> std::cell::Ref<'_, A> {
        self.app.borrow()
    }

    /// Number of handlers suspended on calls.
    pub fn suspended(&self) -> usize {
        self.tasks.len()
    }

    /// Process one CBOR envelope; returns the CBOR array of effects, or the
    /// reason the envelope itself was unusable.
    pub fn process(&mut self, envelope: &[u8]) -> Result<&[u8], String> {
        let env =
            abi::codec::decode_envelope(envelope).map_err(|e| format!("bad envelope: {e}"))?;
        self.shared.begin(&env);
        match env.2 {
            Input::Request(from, id, payload) => self.on_request(from, id, &payload),
            Input::CallReply(call_id, result) => self.on_call_reply(call_id, result),
            Input::Timer(id) => self.on_timer(id),
        }
        let mut effects = self.shared.effects.borrow_mut();
        self.output.clear();
        abi::codec::encode_effects(&effects, &mut self.output);
        effects.clear();
        Ok(&self.output)
    }

    /// Answer a read (`App::read`) for CBOR message bytes; returns the CBOR
    /// `WireResult`.
    pub fn query(&self, payload: &[u8]) -> Vec<u8> {
        let result: WireResult = match abi::decode::<A::Msg>(payload) {
            Err(e) => Err(format!("cannot decode message: {e}")),
            Ok(msg) => {
                let app = self.app.borrow();
                encode_reply(app.read(msg))
            }
        };
        abi::encode(&result)
            .unwrap_or_else(|e| abi::encode(&WireResult::Err(e)).unwrap_or_default())
    }

    fn on_request(&mut self, from: Address, id: u64, payload: &[u8]) {
        self.shared.from.set(from);
        self.shared.message_id.set(id);
        let msg: A::Msg = match abi::decode(payload) {
            Ok(msg) => msg,
            Err(e) => {
                self.shared.effect(Effect::Reply(
                    from,
                    id,
                    Err(format!("cannot decode message: {e}")),
                ));
                return;
            }
        };
        let mut ctx = Ctx {
            shared: self.shared.clone(),
            app: self.app.clone(),
        };
        let outcome = self.app.borrow_mut().handle(&mut ctx, msg);
        match outcome {
            Err(e) => self
                .shared
                .effect(Effect::Reply(from, id, Err(e.to_string()))),
            Ok(Handled::Now(reply)) => {
                self.shared
                    .effect(Effect::Reply(from, id, encode_reply(Ok(reply))))
            }
            Ok(Handled::Later(future)) => self.spawn(future, Some((from, id)), 0),
        }
    }

    /// Keep a handler's future as a task and poll it once.
    fn spawn<R: Serialize + 'static>(
        &mut self,
        future: std::pin::Pin<Box<dyn Future<Output = Result<R, Error>>>>,
        reply_to: Option<(Address, u64)>,
        timer: u64,
    ) {
        let task_id = self.next_task_id;
        self.next_task_id += 1;
        let future: TaskFuture = Box::pin(async move { encode_reply(future.await) });
        self.tasks.insert(
            task_id,
            Task {
                future,
                reply_to,
                timer,
            },
        );
        self.poll_task(task_id);
    }

    fn on_timer(&mut self, id: u64) {
        // A timer no longer armed (cancelled or moved after the host ordered
        // it) does nothing: the host checks too, this is the second line.
        if self.shared.timers.borrow_mut().remove(&id).is_none() {
            return;
        }
        self.shared.from.set(Address::Client(0));
        self.shared.message_id.set(id);
        let mut ctx = Ctx {
            shared: self.shared.clone(),
            app: self.app.clone(),
        };
        let outcome = self.app.borrow_mut().timer(&mut ctx, id);
        match outcome {
            Err(e) => timer_failed(id, &e.to_string()),
            Ok(Handled::Now(())) => {}
            Ok(Handled::Later(future)) => self.spawn(future, None, id),
        }
    }

    fn on_call_reply(&mut self, call_id: u64, result: WireResult) {
        let waiter = {
            let mut calls = self.shared.calls.borrow_mut();
            match calls.get_mut(&call_id) {
                Some(slot @ CallSlot::Waiting(_)) => {
                    let CallSlot::Waiting(task) = std::mem::replace(slot, CallSlot::Ready(result))
                    else {
                        unreachable!()
                    };
                    task
                }
                // a reply to a send, a duplicate, or a call whose future was dropped
                _ => None,
            }
        };
        if let Some(task_id) = waiter {
            self.poll_task(task_id);
        }
    }

    fn poll_task(&mut self, task_id: u64) {
        let Some(task) = self.tasks.get_mut(&task_id) else {
            return;
        };
        // The task answers the request it was spawned for, whatever input woke it.
        let (from, id) = task.reply_to.unwrap_or((Address::Client(0), task.timer));
        self.shared.from.set(from);
        self.shared.message_id.set(id);
        self.shared.polling_task.set(Some(task_id));
        let mut cx = Context::from_waker(Waker::noop());
        let poll = task.future.as_mut().poll(&mut cx);
        self.shared.polling_task.set(None);
        if let Poll::Ready(result) = poll {
            let task = self.tasks.remove(&task_id).expect("polled task exists");
            match (task.reply_to, result) {
                (Some((to, id)), result) => self.shared.effect(Effect::Reply(to, id, result)),
                (None, Err(e)) => timer_failed(task.timer, &e),
                (None, Ok(_)) => {}
            }
        }
    }
}

/// A timer's handler has nobody to answer: its error goes to the app's log.
fn timer_failed(id: u64, why: &str) {
    crate::log::error(&format!("timer {id} failed: {why}"));
}

fn encode_reply<R: Serialize>(result: Result<R, Error>) -> WireResult {
    match result {
        Ok(reply) => abi::encode(&reply)
            .map(Into::into)
            .map_err(|e| format!("cannot encode reply: {e}")),
        Err(e) => Err(e.to_string()),
    }
}
