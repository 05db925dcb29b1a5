//! Messages survive CBOR; hostile or malformed input gives errors, never panics; limits
//! give clear errors.

use vp_alm::{
    AckStatus, AlmError, AlmHost, Body, Bound, Bytes, Config, HostId, HostRef, Key, KeyRange,
    MembershipVector, Message, NodeRef, OpId, RejectReason, Rng, Side, Time,
};

fn key(s: &str) -> Key {
    Key::new(s.as_bytes())
}

fn node(k: &str, host: u64, mv: u64) -> NodeRef<u32> {
    NodeRef {
        key: key(k),
        mv: MembershipVector(mv),
        host: HostId(host),
        contact: host as u32,
    }
}

fn hr(h: u64) -> HostRef<u32> {
    HostRef {
        host: HostId(h),
        contact: h as u32,
    }
}

fn random_key(rng: &mut Rng, long: bool) -> Key {
    let len = if long {
        300 + rng.below(10)
    } else {
        rng.below(6)
    } as usize;
    let pool = [b'a', b'b', b'c', b'/', 0, 0xff];
    Key::new(
        (0..len)
            .map(|_| pool[rng.below(6) as usize])
            .collect::<Vec<u8>>(),
    )
}

fn random_node(rng: &mut Rng) -> NodeRef<u32> {
    let h = rng.below(5);
    let long = rng.chance(0.02);
    NodeRef {
        key: random_key(rng, long),
        mv: MembershipVector(rng.next_u64() & 0xf),
        host: HostId(h),
        contact: h as u32,
    }
}

fn random_body(rng: &mut Rng) -> Body<u32> {
    let level = rng.below(70) as u8;
    let side = if rng.chance(0.5) {
        Side::Left
    } else {
        Side::Right
    };
    let req = rng.below(20);
    let op = OpId {
        origin: HostId(rng.below(5)),
        seq: rng.below(20),
    };
    let bound = |rng: &mut Rng| match rng.below(3) {
        0 => Bound::Included(random_key(rng, false)),
        1 => Bound::Excluded(random_key(rng, false)),
        _ => Bound::Unbounded,
    };
    match rng.below(18) {
        0 => Body::Ping { nonce: req },
        1 => Body::Pong { nonce: req },
        2 => Body::Search {
            op,
            attempt: 1,
            target: random_key(rng, false),
            origin: hr(rng.below(5)),
            to: Some(random_key(rng, false)),
            hops: rng.below(300) as u32,
            fwd: rng.below(3),
        },
        3 => Body::SearchReply {
            op,
            attempt: 1,
            found: random_node(rng),
            exact: rng.chance(0.5),
            next: Some(random_node(rng)),
            hops: 3,
        },
        4 => Body::LinkRequest {
            req,
            to: random_key(rng, false),
            level,
            node: random_node(rng),
        },
        5 => Body::Walk {
            req,
            to: random_key(rng, false),
            level,
            side,
            node: random_node(rng),
            hops: rng.below(300) as u32,
        },
        6 => Body::LinkAccept {
            req,
            to: random_key(rng, false),
            level,
            by: random_node(rng),
            old: Some(random_node(rng)),
        },
        7 => Body::LinkRedirect {
            req,
            to: random_key(rng, false),
            level,
            by: random_node(rng),
            next: random_node(rng),
        },
        8 => Body::LinkReject {
            req,
            to: random_key(rng, false),
            key: random_key(rng, false),
            reason: [
                RejectReason::NoSuchKey,
                RejectReason::NotReady,
                RejectReason::PrefixMismatch,
                RejectReason::SameKey,
            ][rng.below(4) as usize],
        },
        9 => Body::WalkEnd {
            req,
            to: random_key(rng, false),
        },
        10 => Body::Leave {
            to: random_key(rng, false),
            level,
            leaving: random_key(rng, false),
            replacement: Some(random_node(rng)),
        },
        11 => Body::Multicast {
            fwd: req,
            to: random_key(rng, false),
            op,
            origin: hr(rng.below(5)),
            range: KeyRange {
                lo: bound(rng),
                hi: bound(rng),
            },
            payload: Bytes::from(vec![7u8; if rng.chance(0.05) { 300_000 } else { 10 }]),
            hops: rng.below(300) as u32,
        },
        12 => Body::MulticastAck {
            fwd: req,
            status: [AckStatus::Taken, AckStatus::NoSuchKey, AckStatus::Busy]
                [rng.below(3) as usize],
        },
        13 => Body::MulticastEmpty { op },
        14 => Body::Gone {
            key: random_key(rng, false),
        },
        16 => Body::SearchAck { fwd: req },
        15 => Body::Hint {
            to: random_key(rng, false),
            level,
            node: random_node(rng),
        },
        _ => Body::Beyond {
            req,
            to: random_key(rng, false),
            side,
            node: random_node(rng),
        },
    }
}

fn drain(h: &mut AlmHost<u32>) {
    while h.poll_send().is_some() {}
    while h.poll_event().is_some() {}
    let _ = h.poll_timeout();
}

#[test]
fn every_message_kind_round_trips_through_cbor() {
    let mut rng = Rng::new(5);
    let mut kinds = std::collections::BTreeSet::new();
    for _ in 0..2000 {
        let msg = Message {
            from: hr(1),
            body: random_body(&mut rng),
        };
        kinds.insert(msg.body.kind());
        let mut buf = Vec::new();
        ciborium::into_writer(&msg, &mut buf).expect("encode");
        let back: Message<u32> = ciborium::from_reader(&buf[..]).expect("decode");
        assert_eq!(back, msg);
    }
    assert_eq!(kinds.len(), 18, "every kind generated: {kinds:?}");
    // Keys and payloads are CBOR byte strings, not arrays of integers.
    let msg = Message {
        from: hr(1),
        body: Body::Gone { key: key("abc") },
    };
    let mut buf = Vec::new();
    ciborium::into_writer(&msg, &mut buf).expect("encode");
    assert!(buf.windows(4).any(|w| w == [0x43, b'a', b'b', b'c']));
}

#[test]
fn hostile_messages_never_panic() {
    for seed in 0..4u64 {
        let mut rng = Rng::new(seed);
        let mut host = AlmHost::new(HostId(0), 0u32, Config::default(), seed);
        host.insert_key(Time(0), key("a"), None).expect("bootstrap");
        host.insert_key(Time(0), key("b/"), None)
            .expect("second key");
        let mut now = Time(0);
        for i in 0..20_000u64 {
            now = now.plus_micros(rng.below(50_000));
            let from = 1 + rng.below(4);
            let msg = Message {
                from: hr(if rng.chance(0.02) { 9 } else { from }),
                body: random_body(&mut rng),
            };
            let _ = host.handle_message(now, HostId(from), msg);
            if i % 7 == 0 {
                host.handle_timeout(now);
            }
            drain(&mut host);
        }
        // Still usable.
        host.search(now, key("zz")).expect("search after abuse");
    }
}

#[test]
fn garbage_bytes_decode_to_errors_or_harmless_messages() {
    let mut rng = Rng::new(77);
    let mut host = AlmHost::new(HostId(0), 0u32, Config::default(), 1);
    host.insert_key(Time(0), key("a"), None).expect("bootstrap");
    // Start from valid encodings and flip bytes.
    for _ in 0..5_000 {
        let msg = Message {
            from: hr(1),
            body: random_body(&mut rng),
        };
        let mut buf = Vec::new();
        ciborium::into_writer(&msg, &mut buf).expect("encode");
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(buf.len() as u64) as usize;
            buf[i] = rng.next_u64() as u8;
        }
        if let Ok(m) = ciborium::from_reader::<Message<u32>, _>(&buf[..]) {
            let _ = host.handle_message(Time(1), HostId(1), m);
            drain(&mut host);
        }
    }
}

#[test]
fn invalid_messages_are_refused_with_reasons() {
    let config = Config::default();
    let mut host = AlmHost::new(HostId(0), 0u32, config.clone(), 1);
    host.insert_key(Time(0), key("a"), None).expect("bootstrap");
    let long = Key::new(vec![b'x'; config.key_bytes_max + 1]);
    let cases: Vec<(u64, Message<u32>)> = vec![
        // Claims another sender.
        (
            2,
            Message {
                from: hr(3),
                body: Body::Ping { nonce: 1 },
            },
        ),
        // Key too long.
        (
            1,
            Message {
                from: hr(1),
                body: Body::Gone { key: long.clone() },
            },
        ),
        // Level beyond level_max.
        (
            1,
            Message {
                from: hr(1),
                body: Body::LinkRequest {
                    req: 1,
                    to: key("a"),
                    level: config.level_max as u8,
                    node: node("b", 1, 0),
                },
            },
        ),
        // A link request on behalf of another host's node.
        (
            1,
            Message {
                from: hr(1),
                body: Body::LinkRequest {
                    req: 1,
                    to: key("a"),
                    level: 0,
                    node: node("b", 2, 0),
                },
            },
        ),
        // Payload too large.
        (
            1,
            Message {
                from: hr(1),
                body: Body::Multicast {
                    fwd: 1,
                    to: key("a"),
                    op: OpId {
                        origin: HostId(1),
                        seq: 1,
                    },
                    origin: hr(1),
                    range: KeyRange::prefix(b"a"),
                    payload: Bytes::from(vec![0u8; config.payload_bytes_max + 1]),
                    hops: 1,
                },
            },
        ),
        // Too many hops.
        (
            1,
            Message {
                from: hr(1),
                body: Body::Search {
                    op: OpId {
                        origin: HostId(1),
                        seq: 1,
                    },
                    attempt: 1,
                    target: key("a"),
                    origin: hr(1),
                    to: None,
                    hops: config.hops_max + 1,
                    fwd: 0,
                },
            },
        ),
    ];
    for (from, msg) in cases {
        let r = host.handle_message(Time(1), HostId(from), msg.clone());
        assert!(
            matches!(r, Err(AlmError::InvalidMessage { .. })),
            "{msg:?} gave {r:?}"
        );
    }
    assert_eq!(host.stats().invalid_messages, 6);
}

#[test]
fn limits_give_clear_errors() {
    let config = Config {
        keys_per_host_max: 2,
        ops_in_flight_max: 2,
        payload_bytes_max: 100,
        ..Config::default()
    };
    let mut host = AlmHost::new(HostId(0), 0u32, config.clone(), 1);
    let t = Time(0);
    assert_eq!(host.search(t, key("a")), Err(AlmError::NotJoined));
    host.insert_key(t, key("a"), None).expect("first");
    assert_eq!(
        host.insert_key(t, key("a"), None),
        Err(AlmError::KeyHeld(key("a")))
    );
    let long = Key::new(vec![0u8; config.key_bytes_max + 1]);
    assert!(matches!(
        host.insert_key(t, long, None),
        Err(AlmError::KeyTooLong { .. })
    ));
    host.insert_key(t, key("b"), None).expect("second");
    assert_eq!(
        host.insert_key(t, key("c"), None),
        Err(AlmError::TooManyKeys { max: 2 })
    );
    assert_eq!(
        host.remove_key(t, &key("zz")),
        Err(AlmError::NoSuchKey(key("zz")))
    );
    assert!(matches!(
        host.multicast(t, KeyRange::prefix(b"a"), Bytes::from(vec![0u8; 101])),
        Err(AlmError::PayloadTooLarge { len: 101, max: 100 })
    ));
    assert_eq!(
        host.multicast(
            t,
            KeyRange::inclusive(key("b"), key("a")),
            Bytes::from(&b""[..])
        ),
        Err(AlmError::EmptyRange)
    );
    // A single-host network answers its own searches locally, at once.
    let done = host.search(t, key("b")).expect("local search");
    let mut found = false;
    while let Some(e) = host.poll_event() {
        if let vp_alm::Event::SearchDone { op, exact, .. } = e
            && op == done
        {
            assert!(exact);
            found = true;
        }
    }
    assert!(found, "local search completes");
}

#[test]
fn ops_in_flight_are_limited() {
    let config = Config {
        ops_in_flight_max: 3,
        ..Config::default()
    };
    let mut host = AlmHost::new(HostId(0), 0u32, config, 1);
    let t = Time(0);
    host.insert_key(t, key("m"), None).expect("first");
    // Pretend a neighbour exists so that searches leave the host and stay in flight.
    let accept = Message {
        from: hr(1),
        body: Body::LinkRequest {
            req: 1,
            to: key("m"),
            level: 0,
            node: node("z", 1, 0),
        },
    };
    host.handle_message(t, HostId(1), accept).expect("valid");
    for _ in 0..3 {
        host.search(t, key("zz")).expect("in flight");
    }
    assert_eq!(
        host.search(t, key("zz")),
        Err(AlmError::TooManyOps { max: 3 })
    );
}
