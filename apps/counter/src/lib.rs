//! A counter: `{"add": N}` replies with the new total, `"get"` with the total.

use vp_guest_sdk::prelude::*;

#[derive(Default)]
pub struct Counter {
    total: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Msg {
    Add(i64),
    Get,
}

impl App for Counter {
    type Msg = Msg;
    type Reply = i64;

    fn handle(&mut self, _ctx: &mut Ctx<Self>, msg: Msg) -> Outcome<i64> {
        if let Msg::Add(n) = msg {
            self.total = self.total.checked_add(n).ok_or("counter would overflow")?;
        }
        Ok(self.total.into())
    }

    fn read(&self, msg: Msg) -> Result<i64, Error> {
        match msg {
            Msg::Get => Ok(self.total),
            Msg::Add(_) => Err(Error::new("add changes state: send it without --read")),
        }
    }
}

vp_guest_sdk::export_app!(Counter);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vp_guest_sdk::testing::TestApp;

    #[test]
    fn adds_and_gets() {
        let mut t = TestApp::<Counter>::new();
        assert_eq!(t.request::<_, i64>(&json!({"add": 5})).unwrap(), 5);
        assert_eq!(t.request::<_, i64>(&json!({"add": -2})).unwrap(), 3);
        assert_eq!(t.request::<_, i64>(&json!("get")).unwrap(), 3);
        assert_eq!(t.read::<_, i64>(&json!("get")).unwrap(), 3);
        assert!(t.read::<_, i64>(&json!({"add": 1})).is_err());
    }

    #[test]
    fn overflow_is_an_error_and_changes_nothing() {
        let mut t = TestApp::<Counter>::new();
        t.request::<_, i64>(&json!({"add": i64::MAX})).unwrap();
        let err = t.request::<_, i64>(&json!({"add": 1})).unwrap_err();
        assert!(err.message().contains("overflow"));
        assert_eq!(t.request::<_, i64>(&json!("get")).unwrap(), i64::MAX);
    }
}
