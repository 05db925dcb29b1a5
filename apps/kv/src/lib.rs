//! A key-value store. Keys are strings, values any JSON/CBOR value.
//!
//! - `{"put": {"key": K, "value": V}}` replies with the previous value or null;
//!   with `"ttl_ms": N` the key expires N ms after the put (a later put or
//!   delete of the key replaces or drops its expiry)
//! - `{"get": K}` replies with the value or null (also a read: `send --read`)
//! - `{"delete": K}` replies with the removed value or null
//! - `{"expiring": null}` replies with the number of keys that have an expiry
//!
//! Expiry uses one timer, armed for the earliest expiry: however many keys
//! expire, the app holds one of the host's timers. A key is gone for `get`
//! from its expiry time on (the ordered clock says so); the timer removes it
//! from memory a moment later. A read (`send --read`) has no clock, so it may
//! still see a key in that moment.

use std::collections::{BTreeMap, BTreeSet};

use ciborium::Value;
use vp_guest_sdk::prelude::*;

/// Longest key accepted, in bytes.
pub const KEY_BYTES_MAX: usize = 1024;
/// The app's only timer: the next expiry.
const EXPIRY_TIMER: u64 = 0;

#[derive(Default)]
pub struct Kv {
    map: BTreeMap<String, Value>,
    /// Keys with an expiry, by due time.
    expiry: BTreeSet<(u64, String)>,
    /// Each expiring key's due time.
    due_of: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Msg {
    Put {
        key: String,
        value: Value,
        #[serde(default)]
        ttl_ms: Option<u64>,
    },
    Get(String),
    Delete(String),
    Expiring(()),
}

impl Kv {
    fn forget_expiry(&mut self, key: &str) {
        if let Some(due) = self.due_of.remove(key) {
            self.expiry.remove(&(due, key.to_string()));
        }
    }

    /// Remove `key` if its expiry has passed at `now_ms`.
    fn expire_if_due(&mut self, key: &str, now_ms: u64) {
        if self.due_of.get(key).is_some_and(|&due| due <= now_ms) {
            self.forget_expiry(key);
            self.map.remove(key);
        }
    }

    /// Keep the timer at the earliest expiry (or disarmed when none).
    fn arm(&self, ctx: &Ctx<Self>) -> Result<(), Error> {
        match self.expiry.first() {
            Some(&(due, _)) if ctx.timer_due(EXPIRY_TIMER) != Some(due) => {
                ctx.set_timer_at(EXPIRY_TIMER, due)
            }
            Some(_) => Ok(()),
            None => {
                ctx.cancel_timer(EXPIRY_TIMER);
                Ok(())
            }
        }
    }
}

impl App for Kv {
    type Msg = Msg;
    type Reply = Option<Value>;

    fn handle(&mut self, ctx: &mut Ctx<Self>, msg: Msg) -> Outcome<Option<Value>> {
        let now = ctx.now_ms();
        let reply = match msg {
            Msg::Put { key, value, ttl_ms } => {
                if key.len() > KEY_BYTES_MAX {
                    return Err(Error::new(format!(
                        "key is {} bytes; at most {KEY_BYTES_MAX}",
                        key.len()
                    )));
                }
                self.expire_if_due(&key, now);
                self.forget_expiry(&key);
                if let Some(ttl) = ttl_ms {
                    let due = now.saturating_add(ttl);
                    self.due_of.insert(key.clone(), due);
                    self.expiry.insert((due, key.clone()));
                }
                self.map.insert(key, value)
            }
            Msg::Get(key) => {
                self.expire_if_due(&key, now);
                self.map.get(&key).cloned()
            }
            Msg::Delete(key) => {
                self.expire_if_due(&key, now);
                self.forget_expiry(&key);
                self.map.remove(&key)
            }
            Msg::Expiring(()) => Some(Value::from(self.due_of.len() as u64)),
        };
        self.arm(ctx)?;
        Ok(reply.into())
    }

    fn timer(&mut self, ctx: &mut Ctx<Self>, _id: u64) -> Outcome<()> {
        let now = ctx.now_ms();
        while let Some((due, key)) = self.expiry.first().cloned() {
            if due > now {
                break;
            }
            self.expiry.pop_first();
            self.due_of.remove(&key);
            self.map.remove(&key);
        }
        self.arm(ctx)?;
        Ok(().into())
    }

    fn read(&self, msg: Msg) -> Result<Option<Value>, Error> {
        match msg {
            Msg::Get(key) => Ok(self.map.get(&key).cloned()),
            Msg::Expiring(()) => Ok(Some(Value::from(self.due_of.len() as u64))),
            _ => Err(Error::new(
                "only get and expiring are reads: send put and delete without --read",
            )),
        }
    }
}

vp_guest_sdk::export_app!(Kv);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value as Json, json};
    use vp_guest_sdk::testing::TestApp;

    fn send(t: &mut TestApp<Kv>, msg: Json) -> Json {
        t.request::<_, Json>(&msg).unwrap()
    }

    #[test]
    fn put_get_delete() {
        let mut t = TestApp::<Kv>::new();
        assert_eq!(
            send(&mut t, json!({"put": {"key": "a", "value": {"x": [1, 2]}}})),
            Json::Null
        );
        assert_eq!(
            send(&mut t, json!({"put": {"key": "a", "value": "two"}})),
            json!({"x": [1, 2]})
        );
        assert_eq!(send(&mut t, json!({"get": "a"})), json!("two"));
        assert_eq!(
            t.read::<_, Json>(&json!({"get": "a"})).unwrap(),
            json!("two")
        );
        assert_eq!(send(&mut t, json!({"get": "missing"})), Json::Null);
        assert_eq!(send(&mut t, json!({"delete": "a"})), json!("two"));
        assert_eq!(send(&mut t, json!({"delete": "a"})), Json::Null);
        assert!(t.read::<_, Json>(&json!({"delete": "a"})).is_err());
        assert!(t.timers().is_empty());
    }

    #[test]
    fn long_keys_are_refused() {
        let mut t = TestApp::<Kv>::new();
        let key = "k".repeat(KEY_BYTES_MAX + 1);
        let err = t
            .request::<_, Json>(&json!({"put": {"key": key, "value": 1}}))
            .unwrap_err();
        assert!(err.message().contains("at most"));
    }

    #[test]
    fn keys_expire_on_one_timer_armed_for_the_earliest() {
        let mut t = TestApp::<Kv>::new();
        send(
            &mut t,
            json!({"put": {"key": "slow", "value": 1, "ttl_ms": 5000}}),
        );
        send(
            &mut t,
            json!({"put": {"key": "fast", "value": 2, "ttl_ms": 1000}}),
        );
        send(&mut t, json!({"put": {"key": "kept", "value": 3}}));
        let start = t.time_ms();
        // one timer, at the earliest expiry (fast's, put 1 ms after slow's)
        assert_eq!(t.timers(), vec![(EXPIRY_TIMER, start - 1 + 1000)]);
        assert_eq!(send(&mut t, json!({"expiring": null})), json!(2));

        let fired = t.advance_ms(2000);
        assert_eq!(fired.len(), 1, "one firing for fast");
        assert_eq!(
            t.read::<_, Json>(&json!({"get": "fast"})).unwrap(),
            Json::Null
        );
        assert_eq!(
            t.read::<_, Json>(&json!({"get": "slow"})).unwrap(),
            json!(1)
        );
        // re-armed for slow
        assert_eq!(t.timers(), vec![(EXPIRY_TIMER, start - 2 + 5000)]);

        // a put without ttl clears slow's expiry: the timer goes away
        send(&mut t, json!({"put": {"key": "slow", "value": 4}}));
        assert!(t.timers().is_empty());
        assert!(t.advance_ms(10_000).is_empty());
        assert_eq!(send(&mut t, json!({"get": "slow"})), json!(4));
        assert_eq!(send(&mut t, json!({"get": "kept"})), json!(3));
        assert_eq!(send(&mut t, json!({"expiring": null})), json!(0));
    }

    #[test]
    fn an_expired_key_is_gone_before_its_timer_fires() {
        let mut t = TestApp::<Kv>::new();
        send(
            &mut t,
            json!({"put": {"key": "a", "value": 1, "ttl_ms": 10}}),
        );
        // The clock passes the expiry without the timer being delivered
        // (it is ordered after this get).
        t.set_time_ms(t.time_ms() + 50);
        assert_eq!(send(&mut t, json!({"get": "a"})), Json::Null);
        assert!(t.timers().is_empty(), "nothing left to expire");
        // a re-put with a new ttl replaces the expiry
        send(
            &mut t,
            json!({"put": {"key": "b", "value": 1, "ttl_ms": 10}}),
        );
        send(
            &mut t,
            json!({"put": {"key": "b", "value": 2, "ttl_ms": 100_000}}),
        );
        assert_eq!(t.advance_ms(1000).len(), 0);
        assert_eq!(send(&mut t, json!({"get": "b"})), json!(2));
    }
}
