//! Chat rooms. A room keeps the latest posts; it can forward its posts to
//! bridged rooms (one-way sends) and ask another room for its history (an
//! async call: the handler suspends until the other room answers).
//!
//! - `{"post": {"from": "ann", "text": "hi"}}` appends, forwards to every
//!   bridged room, replies with the post's number
//! - `{"bridge": "<vp-id>"}` forwards future posts there; replies with the
//!   number of bridges
//! - `{"history": {"last": N}}` replies with the last N posts (also a read)
//! - `{"ask": {"room": "<vp-id>", "last": N}}` calls the other room's
//!   `history` and replies with what it answered

use std::collections::{BTreeSet, VecDeque};

use vp_guest_sdk::prelude::*;

/// Posts a room keeps; older ones are dropped.
pub const POSTS_MAX: usize = 10_000;
/// Longest post text, in bytes.
pub const TEXT_BYTES_MAX: usize = 4096;
/// Most rooms one room forwards to.
pub const BRIDGES_MAX: usize = 16;

#[derive(Default)]
pub struct Chat {
    posts: VecDeque<Post>,
    posted: u64,
    bridges: BTreeSet<VpId>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Post {
    pub n: u64,
    pub time_ms: u64,
    pub from: String,
    pub text: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Msg {
    Post {
        from: String,
        text: String,
    },
    /// A post forwarded by a bridged room (not forwarded again).
    Forwarded {
        from: String,
        text: String,
    },
    Bridge(String),
    History {
        last: usize,
    },
    Ask {
        room: String,
        last: usize,
    },
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Count(u64),
    Posts(Vec<Post>),
}

fn vp_id(s: &str) -> Result<VpId, Error> {
    s.parse().map_err(Error::new)
}

impl Chat {
    fn append(&mut self, time_ms: u64, from: String, text: String) -> Result<u64, Error> {
        if text.len() > TEXT_BYTES_MAX {
            return Err(Error::new(format!(
                "post is {} bytes; at most {TEXT_BYTES_MAX}",
                text.len()
            )));
        }
        self.posted += 1;
        if self.posts.len() == POSTS_MAX {
            self.posts.pop_front();
        }
        self.posts.push_back(Post {
            n: self.posted,
            time_ms,
            from,
            text,
        });
        Ok(self.posted)
    }

    fn history(&self, last: usize) -> Vec<Post> {
        self.posts
            .iter()
            .skip(self.posts.len().saturating_sub(last))
            .cloned()
            .collect()
    }
}

impl App for Chat {
    type Msg = Msg;
    type Reply = Reply;

    fn handle(&mut self, ctx: &mut Ctx<Self>, msg: Msg) -> Outcome<Reply> {
        match msg {
            Msg::Post { from, text } => {
                let n = self.append(ctx.now_ms(), from.clone(), text.clone())?;
                for room in &self.bridges {
                    ctx.send(
                        *room,
                        &Msg::Forwarded {
                            from: from.clone(),
                            text: text.clone(),
                        },
                    )?;
                }
                Ok(Reply::Count(n).into())
            }
            Msg::Forwarded { from, text } => {
                // the sender of a forwarded post is the room that forwarded it
                let room = match ctx.from() {
                    Address::Vp(vp) => vp.to_string(),
                    Address::Client(_) => "client".to_string(),
                };
                Ok(Reply::Count(self.append(ctx.now_ms(), format!("{from}@{room}"), text)?).into())
            }
            Msg::Bridge(room) => {
                let room = vp_id(&room)?;
                if self.bridges.len() >= BRIDGES_MAX && !self.bridges.contains(&room) {
                    vp_guest_sdk::warn!("bridge to {room} refused: {BRIDGES_MAX} already");
                    return Err(Error::new(format!("at most {BRIDGES_MAX} bridges")));
                }
                if self.bridges.insert(room) {
                    vp_guest_sdk::info!("bridged to {room}: posts here are forwarded there");
                }
                Ok(Reply::Count(self.bridges.len() as u64).into())
            }
            Msg::History { last } => Ok(Reply::Posts(self.history(last)).into()),
            Msg::Ask { room, last } => {
                let call = ctx.call::<_, Vec<Post>>(vp_id(&room)?, &Msg::History { last });
                Ok(ctx.later(async move { Ok(Reply::Posts(call.await?)) }))
            }
        }
    }

    fn read(&self, msg: Msg) -> Result<Reply, Error> {
        match msg {
            Msg::History { last } => Ok(Reply::Posts(self.history(last))),
            _ => Err(Error::new("only history is a read")),
        }
    }
}

vp_guest_sdk::export_app!(Chat);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vp_guest_sdk::testing::{TEST_CLIENT, TestApp};

    #[test]
    fn posts_are_numbered_and_kept() {
        let mut t = TestApp::<Chat>::new();
        t.set_time_ms(1000);
        let n: u64 = t
            .request(&json!({"post": {"from": "ann", "text": "hi"}}))
            .unwrap();
        assert_eq!(n, 1);
        let posts: Vec<Post> = t.request(&json!({"history": {"last": 5}})).unwrap();
        assert_eq!(posts.len(), 1);
        assert_eq!(posts[0].from, "ann");
        assert_eq!(posts[0].time_ms, 1001);
        let read: Vec<Post> = t.read(&json!({"history": {"last": 5}})).unwrap();
        assert_eq!(read, posts);
    }

    #[test]
    fn bridged_posts_are_forwarded_once() {
        let mut t = TestApp::<Chat>::new();
        let _: u64 = t.request(&json!({"bridge": "00000000000000aa"})).unwrap();
        let _: u64 = t
            .request(&json!({"post": {"from": "bob", "text": "yo"}}))
            .unwrap();
        let out = t.take_outbox();
        assert_eq!(out.len(), 1);
        assert!(!out[0].expects_reply);
        assert_eq!(
            t.take_log(),
            vec![(
                vp_guest_sdk::log::Level::Info,
                "bridged to 00000000000000aa: posts here are forwarded there".to_string()
            )]
        );
        assert_eq!(out[0].to, VpId(0xaa));
        // a forwarded post is stored, not forwarded again
        let d = t.deliver(
            Address::Vp(VpId(0xcc)),
            &json!({"forwarded": {"from": "bob", "text": "yo"}}),
        );
        assert!(d.outbound.is_empty());
        let posts: Vec<Post> = t.request(&json!({"history": {"last": 1}})).unwrap();
        assert_eq!(posts[0].from, "bob@00000000000000cc");
        assert!(t.request::<_, u64>(&json!({"bridge": "not hex"})).is_err());
    }

    #[test]
    fn ask_awaits_the_other_room() {
        let mut t = TestApp::<Chat>::new();
        let d = t.deliver(
            TEST_CLIENT,
            &json!({"ask": {"room": "00000000000000bb", "last": 2}}),
        );
        assert!(d.replies.is_empty());
        let call = &d.outbound[0];
        assert!(call.expects_reply);
        assert!(matches!(
            call.decode::<Msg>().unwrap(),
            Msg::History { last: 2 }
        ));
        let theirs = vec![Post {
            n: 7,
            time_ms: 5,
            from: "cy".into(),
            text: "hello".into(),
        }];
        let d = t.reply_to_call(call.id, Ok(&theirs));
        assert_eq!(d.reply::<Vec<Post>>(1).unwrap().unwrap(), theirs);
    }
}
