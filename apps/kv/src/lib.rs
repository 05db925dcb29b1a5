//! A key-value store. Keys are strings, values any JSON/CBOR value.
//!
//! - `{"put": {"key": K, "value": V}}` replies with the previous value or null
//! - `{"get": K}` replies with the value or null (also a read: `send --read`)
//! - `{"delete": K}` replies with the removed value or null

use std::collections::BTreeMap;

use ciborium::Value;
use vp_guest_sdk::prelude::*;

/// Longest key accepted, in bytes.
pub const KEY_BYTES_MAX: usize = 1024;

#[derive(Default)]
pub struct Kv {
    map: BTreeMap<String, Value>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Msg {
    Put { key: String, value: Value },
    Get(String),
    Delete(String),
}

impl App for Kv {
    type Msg = Msg;
    type Reply = Option<Value>;

    fn handle(&mut self, _ctx: &mut Ctx<Self>, msg: Msg) -> Outcome<Option<Value>> {
        let reply = match msg {
            Msg::Put { key, value } => {
                if key.len() > KEY_BYTES_MAX {
                    return Err(Error::new(format!(
                        "key is {} bytes; at most {KEY_BYTES_MAX}",
                        key.len()
                    )));
                }
                self.map.insert(key, value)
            }
            Msg::Get(key) => self.map.get(&key).cloned(),
            Msg::Delete(key) => self.map.remove(&key),
        };
        Ok(reply.into())
    }

    fn read(&self, msg: Msg) -> Result<Option<Value>, Error> {
        match msg {
            Msg::Get(key) => Ok(self.map.get(&key).cloned()),
            _ => Err(Error::new(
                "only get is a read: send put and delete without --read",
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
}
