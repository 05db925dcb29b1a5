//! Test an app's handlers natively, with plain `cargo test`.
//!
//! [`TestApp`] runs the same runtime the wasm guest runs, and every message,
//! reply and call crosses the same CBOR encoding, so a serde mistake shows up
//! here rather than in production. It plays the host: it stamps time and
//! entropy, collects calls and sends, lets a test deliver call replies by
//! hand, and keeps the timers the app arms: [`TestApp::advance_ms`] moves the
//! clock and fires the ones that come due, in order, as the host would.
//!
//! ```
//! use vp_guest_sdk::prelude::*;
//! use vp_guest_sdk::testing::TestApp;
//!
//! #[derive(Default)]
//! struct Echo;
//! impl App for Echo {
//!     type Msg = String;
//!     type Reply = String;
//!     fn handle(&mut self, _: &mut Ctx<Self>, msg: String) -> Outcome<String> {
//!         Ok(msg.into())
//!     }
//! }
//!
//! let mut app = TestApp::<Echo>::new();
//! assert_eq!(app.request::<_, String>(&"hi").unwrap(), "hi");
//! ```

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::abi::{self, Address, Effect, Envelope, Input, VpId, WireResult};
use crate::{App, Error, Runtime};

/// The client address `TestApp` sends requests from.
pub const TEST_CLIENT: Address = Address::Client(1);

/// A call or send the app made, as the host would see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Outbound {
    /// Call id (for a call, the id its reply must name).
    pub id: u64,
    /// The callee.
    pub to: VpId,
    /// CBOR payload.
    pub payload: Vec<u8>,
    /// `true` for a call that expects a reply, `false` for a one-way send.
    pub expects_reply: bool,
}

impl Outbound {
    /// Decode the payload.
    pub fn decode<M: DeserializeOwned>(&self) -> Result<M, String> {
        abi::decode(&self.payload)
    }
}

/// What processing one input produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delivery {
    /// Replies, as (recipient, request id, CBOR result).
    pub replies: Vec<(Address, u64, WireResult)>,
    /// Calls and sends, in the order the app made them.
    pub outbound: Vec<Outbound>,
}

impl Delivery {
    /// The reply to request `id` from the test client, decoded.
    pub fn reply<R: DeserializeOwned>(&self, id: u64) -> Option<Result<R, Error>> {
        self.replies
            .iter()
            .find(|(to, rid, _)| *to == TEST_CLIENT && *rid == id)
            .map(|(_, _, r)| decode_result(r))
    }
}

fn decode_result<R: DeserializeOwned>(result: &WireResult) -> Result<R, Error> {
    match result {
        Ok(bytes) => {
            abi::decode(bytes).map_err(|e| Error::new(format!("reply did not decode: {e}")))
        }
        Err(e) => Err(Error::new(e.clone())),
    }
}

/// Lines logged natively (`crate::log`), oldest first, at most `LOG_KEPT_MAX`.
#[cfg(not(target_arch = "wasm32"))]
const LOG_KEPT_MAX: usize = 4096;

#[cfg(not(target_arch = "wasm32"))]
thread_local! {
    static LOG: std::cell::RefCell<std::collections::VecDeque<(crate::log::Level, String)>> =
        const { std::cell::RefCell::new(std::collections::VecDeque::new()) };
}

/// Keep a line logged outside a guest (a native test) for [`TestApp::take_log`].
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn capture_log(level: crate::log::Level, line: &str) {
    LOG.with(|log| {
        let mut log = log.borrow_mut();
        if log.len() == LOG_KEPT_MAX {
            log.pop_front();
        }
        log.push_back((level, line.to_string()));
    });
}

/// An app under test.
pub struct TestApp<A: App> {
    runtime: Runtime<A>,
    time_ms: u64,
    next_id: u64,
    outbox: Vec<Outbound>,
    /// The armed timers as the host keeps them (from the effects): id -> due.
    timers: std::collections::BTreeMap<u64, u64>,
}

impl<A: App> Default for TestApp<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: App> TestApp<A> {
    /// A fresh app, clock at 1_700_000_000_000 ms.
    pub fn new() -> Self {
        TestApp {
            runtime: Runtime::new(),
            time_ms: 1_700_000_000_000,
            next_id: 1,
            outbox: Vec::new(),
            timers: std::collections::BTreeMap::new(),
        }
    }

    /// The lines logged on this thread (`vp_guest_sdk::info!` and friends)
    /// since the last call, oldest first (at most the latest 4,096).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn take_log(&mut self) -> Vec<(crate::log::Level, String)> {
        LOG.with(|log| log.borrow_mut().drain(..).collect())
    }

    /// The app's state.
    pub fn app(&self) -> std::cell::Ref<'_, A> {
        self.runtime.app()
    }

    /// Set the time the next inputs are stamped with.
    pub fn set_time_ms(&mut self, time_ms: u64) {
        self.time_ms = time_ms;
    }

    /// The time the last input was stamped with (ms since the epoch).
    pub fn time_ms(&self) -> u64 {
        self.time_ms
    }

    /// The armed timers, as `(id, due_ms)`, earliest first.
    pub fn timers(&self) -> Vec<(u64, u64)> {
        let mut armed: Vec<(u64, u64)> = self.timers.iter().map(|(&id, &due)| (id, due)).collect();
        armed.sort_by_key(|&(id, due)| (due, id));
        armed
    }

    /// Move the clock `ms` forward, firing every timer that comes due on the
    /// way (earliest first, ties by id; each stamped with its due time, or
    /// later if the clock already passed it), including timers the fired
    /// handlers arm within the span. Returns what each firing produced.
    pub fn advance_ms(&mut self, ms: u64) -> Vec<Delivery> {
        let until = self.time_ms.saturating_add(ms);
        let mut fired = Vec::new();
        while let Some((id, due)) = self.timers().first().copied().filter(|&(_, d)| d <= until) {
            // `process` stamps one ms after the clock.
            self.time_ms = self.time_ms.max(due.saturating_sub(1));
            self.timers.remove(&id);
            fired.push(self.process(Input::Timer(id)));
        }
        self.time_ms = self.time_ms.max(until);
        fired
    }

    /// Handlers currently suspended on calls.
    pub fn suspended(&self) -> usize {
        self.runtime.suspended()
    }

    /// Calls and sends made so far and not yet taken.
    pub fn take_outbox(&mut self) -> Vec<Outbound> {
        std::mem::take(&mut self.outbox)
    }

    /// Send `msg` from the test client and return its reply; panics if the
    /// handler suspended instead of replying (use [`TestApp::deliver`]).
    pub fn request<M: Serialize + ?Sized, R: DeserializeOwned>(
        &mut self,
        msg: &M,
    ) -> Result<R, Error> {
        let id = self.next_id;
        let delivery = self.deliver(TEST_CLIENT, msg);
        delivery
            .reply(id)
            .unwrap_or_else(|| panic!("request {id} did not reply (the handler suspended)"))
    }

    /// Ask the app's read path.
    pub fn read<M: Serialize + ?Sized, R: DeserializeOwned>(
        &mut self,
        msg: &M,
    ) -> Result<R, Error> {
        let payload = abi::encode(msg).expect("message encodes");
        let out = self.runtime.query(&payload);
        let result = abi::codec::decode_result(&out).expect("query output decodes");
        decode_result(&result)
    }

    /// Deliver `msg` from `from` as the next ordered input.
    pub fn deliver<M: Serialize + ?Sized>(&mut self, from: Address, msg: &M) -> Delivery {
        let id = self.next_id;
        self.next_id += 1;
        let payload = abi::encode(msg).expect("message encodes");
        self.process(Input::Request(from, id, payload.into()))
    }

    /// Deliver the reply to call `call_id`.
    pub fn reply_to_call<R: Serialize + ?Sized>(
        &mut self,
        call_id: u64,
        reply: Result<&R, &str>,
    ) -> Delivery {
        let result = match reply {
            Ok(value) => Ok(abi::encode(value).expect("reply encodes").into()),
            Err(e) => Err(e.to_string()),
        };
        self.process(Input::CallReply(call_id, result))
    }

    /// Deliver raw input; this is what the host does.
    pub fn process(&mut self, input: Input) -> Delivery {
        self.time_ms += 1;
        let env = Envelope(self.time_ms, self.time_ms.wrapping_mul(0x9e37_79b9), input);
        let mut bytes = Vec::new();
        abi::codec::encode_envelope(&env, &mut bytes);
        let out = self.runtime.process(&bytes).expect("envelope accepted");
        let effects = abi::codec::decode_effects(out).expect("effects decode");
        let mut delivery = Delivery::default();
        for effect in effects {
            match effect {
                Effect::Reply(to, id, result) => delivery.replies.push((to, id, result)),
                Effect::Send(to, id, payload) => delivery.outbound.push(Outbound {
                    id,
                    to,
                    payload: payload.into_vec(),
                    expects_reply: false,
                }),
                Effect::Call(to, id, payload) => delivery.outbound.push(Outbound {
                    id,
                    to,
                    payload: payload.into_vec(),
                    expects_reply: true,
                }),
                Effect::SetTimer(id, due_ms) => {
                    self.timers.insert(id, due_ms);
                }
                Effect::CancelTimer(id) => {
                    self.timers.remove(&id);
                }
            }
        }
        self.outbox.extend(delivery.outbound.iter().cloned());
        delivery
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;

    /// Counts requests; `Ask` calls another VP and replies with its answer + 1.
    #[derive(Default)]
    struct Relay {
        handled: u32,
        asked: u32,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum RelayMsg {
        Ping,
        Ask(u64),
        AskTwice(u64),
        Notify(u64),
        Boom,
    }

    impl App for Relay {
        type Msg = RelayMsg;
        type Reply = u64;
        fn handle(&mut self, ctx: &mut Ctx<Self>, msg: RelayMsg) -> Outcome<u64> {
            self.handled += 1;
            match msg {
                RelayMsg::Ping => Ok(u64::from(self.handled).into()),
                RelayMsg::Ask(vp) => {
                    let call = ctx.call::<_, u64>(VpId(vp), &"question");
                    let ctx = ctx.clone();
                    Ok(ctx.clone().later(async move {
                        let answer = call.await?;
                        ctx.with_app(|app| app.asked += 1);
                        Ok(answer + 1)
                    }))
                }
                RelayMsg::AskTwice(vp) => {
                    let ctx = ctx.clone();
                    Ok(ctx.clone().later(async move {
                        let a: u64 = ctx.call(VpId(vp), &1).await?;
                        let b: u64 = ctx.call(VpId(vp), &2).await?;
                        Ok(a * 10 + b)
                    }))
                }
                RelayMsg::Notify(vp) => {
                    ctx.send(VpId(vp), &"hello")?;
                    Ok(0.into())
                }
                RelayMsg::Boom => Err(Error::new("boom")),
            }
        }
        fn read(&self, msg: RelayMsg) -> Result<u64, Error> {
            match msg {
                RelayMsg::Ping => Ok(u64::from(self.handled)),
                _ => Err(Error::new("not a read")),
            }
        }
    }

    #[test]
    fn sync_replies_and_errors() {
        let mut t = TestApp::<Relay>::new();
        assert_eq!(t.request::<_, u64>(&RelayMsg::Ping).unwrap(), 1);
        assert_eq!(
            t.request::<_, u64>(&RelayMsg::Boom).unwrap_err().message(),
            "boom"
        );
        assert_eq!(t.read::<_, u64>(&RelayMsg::Ping).unwrap(), 2);
        assert!(t.read::<_, u64>(&RelayMsg::Boom).is_err());
    }

    #[test]
    fn undecodable_message_gets_error_reply() {
        let mut t = TestApp::<Relay>::new();
        let err = t.request::<_, u64>(&"no such message").unwrap_err();
        assert!(err.message().contains("cannot decode message"), "{err}");
        assert_eq!(t.app().handled, 0);
    }

    #[test]
    fn async_handler_suspends_and_resumes_on_reply() {
        let mut t = TestApp::<Relay>::new();
        let d = t.deliver(TEST_CLIENT, &RelayMsg::Ask(9));
        assert!(d.replies.is_empty());
        assert_eq!(t.suspended(), 1);
        let call = &d.outbound[0];
        assert!(call.expects_reply);
        assert_eq!(call.to, VpId(9));
        assert_eq!(call.decode::<String>().unwrap(), "question");

        // other messages are handled while the first is suspended
        assert_eq!(t.request::<_, u64>(&RelayMsg::Ping).unwrap(), 2);

        let d = t.reply_to_call(call.id, Ok(&41u64));
        assert_eq!(d.reply::<u64>(1).unwrap().unwrap(), 42);
        assert_eq!(t.suspended(), 0);
        assert_eq!(t.app().asked, 1);
        // a duplicate reply is ignored
        assert_eq!(t.reply_to_call(call.id, Ok(&41u64)), Delivery::default());
    }

    #[test]
    fn sequential_awaits_and_call_errors() {
        let mut t = TestApp::<Relay>::new();
        let d = t.deliver(TEST_CLIENT, &RelayMsg::AskTwice(3));
        let first = d.outbound[0].id;
        let d = t.reply_to_call(first, Ok(&4u64));
        assert!(d.replies.is_empty());
        let second = d.outbound[0].id;
        assert_ne!(first, second);
        let d = t.reply_to_call(second, Ok(&2u64));
        assert_eq!(d.reply::<u64>(1).unwrap().unwrap(), 42);

        let d = t.deliver(TEST_CLIENT, &RelayMsg::Ask(3));
        let d = t.reply_to_call(d.outbound[0].id, Err::<&u64, _>("callee trapped"));
        let err = d.reply::<u64>(2).unwrap().unwrap_err();
        assert!(err.message().contains("callee trapped"), "{err}");
    }

    /// Arms, moves and cancels timers on request; counts firings.
    #[derive(Default)]
    struct Ticker {
        fired: Vec<(u64, u64)>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum TickerMsg {
        Arm(u64, u64),
        Cancel(u64),
        Due(u64),
        Many(u64),
    }

    impl App for Ticker {
        type Msg = TickerMsg;
        type Reply = Option<u64>;
        fn handle(&mut self, ctx: &mut Ctx<Self>, msg: TickerMsg) -> Outcome<Option<u64>> {
            Ok(match msg {
                TickerMsg::Arm(id, after) => {
                    ctx.set_timer(id, after)?;
                    None
                }
                TickerMsg::Cancel(id) => Some(u64::from(ctx.cancel_timer(id))),
                TickerMsg::Due(id) => ctx.timer_due(id),
                TickerMsg::Many(n) => {
                    for id in 0..n {
                        ctx.set_timer(1000 + id, 10)?;
                    }
                    None
                }
            }
            .into())
        }
        fn timer(&mut self, ctx: &mut Ctx<Self>, id: u64) -> Outcome<()> {
            self.fired.push((id, ctx.now_ms()));
            match id {
                // 7 is periodic: every 100 ms
                7 => ctx.set_timer(7, 100)?,
                // 8 fails
                8 => return Err(Error::new("eight is unlucky")),
                // 9 calls another VP and fails after the reply
                9 => {
                    let call = ctx.call::<_, u64>(VpId(3), &"q");
                    return Ok(ctx.later(async move {
                        call.await?;
                        Err(Error::new("after the call"))
                    }));
                }
                _ => {}
            }
            Ok(().into())
        }
    }

    #[test]
    fn timers_fire_in_order_at_or_after_their_due_time() {
        let mut t = TestApp::<Ticker>::new();
        let t0 = t.time_ms();
        t.request::<_, Option<u64>>(&TickerMsg::Arm(1, 500))
            .unwrap();
        t.request::<_, Option<u64>>(&TickerMsg::Arm(2, 200))
            .unwrap();
        t.request::<_, Option<u64>>(&TickerMsg::Arm(3, 300))
            .unwrap();
        // moving 3, cancelling 2
        t.request::<_, Option<u64>>(&TickerMsg::Arm(3, 1000))
            .unwrap();
        assert_eq!(
            t.request::<_, Option<u64>>(&TickerMsg::Cancel(2)).unwrap(),
            Some(1)
        );
        assert_eq!(
            t.request::<_, Option<u64>>(&TickerMsg::Cancel(2)).unwrap(),
            Some(0)
        );
        assert_eq!(
            t.request::<_, Option<u64>>(&TickerMsg::Due(3)).unwrap(),
            Some(t0 + 4 + 1000)
        );
        assert_eq!(t.timers(), vec![(1, t0 + 1 + 500), (3, t0 + 4 + 1000)]);
        assert_eq!(t.advance_ms(2000).len(), 2);
        assert_eq!(t.app().fired, vec![(1, t0 + 1 + 500), (3, t0 + 4 + 1000)]);
        assert!(t.timers().is_empty());
        assert_eq!(
            t.request::<_, Option<u64>>(&TickerMsg::Due(3)).unwrap(),
            None
        );

        // a stale firing (the host ordered it before a cancel) does nothing
        t.process(Input::Timer(3));
        assert_eq!(t.app().fired.len(), 2);

        // periodic: re-armed from its own handler
        t.request::<_, Option<u64>>(&TickerMsg::Arm(7, 100))
            .unwrap();
        assert_eq!(t.advance_ms(1000).len(), 10);
        let ticks: Vec<u64> = t.app().fired[2..].iter().map(|f| f.1).collect();
        assert!(ticks.windows(2).all(|w| w[1] - w[0] == 100), "{ticks:?}");
    }

    #[test]
    fn timer_errors_are_logged_and_the_limit_holds() {
        let mut t = TestApp::<Ticker>::new();
        t.take_log();
        t.request::<_, Option<u64>>(&TickerMsg::Arm(8, 1)).unwrap();
        t.request::<_, Option<u64>>(&TickerMsg::Arm(9, 1)).unwrap();
        let fired = t.advance_ms(10);
        assert_eq!(fired.len(), 2);
        assert!(
            fired.iter().all(|d| d.replies.is_empty()),
            "a timer answers nobody"
        );
        let call = fired[1].outbound[0].id;
        assert_eq!(t.suspended(), 1);
        let d = t.reply_to_call(call, Ok(&1u64));
        assert!(d.replies.is_empty());
        assert_eq!(t.suspended(), 0);
        let log: Vec<String> = t.take_log().into_iter().map(|(_, l)| l).collect();
        assert_eq!(
            log,
            vec![
                "timer 8 failed: eight is unlucky".to_string(),
                "timer 9 failed: after the call".to_string()
            ]
        );

        // at most TIMERS_MAX armed: the next one is refused, nothing changes
        let max = crate::abi::TIMERS_MAX as u64;
        t.request::<_, Option<u64>>(&TickerMsg::Many(max)).unwrap();
        assert_eq!(t.timers().len(), crate::abi::TIMERS_MAX);
        let err = t
            .request::<_, Option<u64>>(&TickerMsg::Arm(1, 5))
            .unwrap_err();
        assert!(err.message().contains("timers are armed"), "{err}");
        // moving an armed one is still allowed
        t.request::<_, Option<u64>>(&TickerMsg::Arm(1000, 50))
            .unwrap();
        assert_eq!(t.timers().len(), crate::abi::TIMERS_MAX);
    }

    #[test]
    fn sends_are_one_way() {
        let mut t = TestApp::<Relay>::new();
        assert_eq!(t.request::<_, u64>(&RelayMsg::Notify(5)).unwrap(), 0);
        let out = t.take_outbox();
        assert_eq!(out.len(), 1);
        assert!(!out[0].expects_reply);
        assert_eq!(t.suspended(), 0);
    }
}
