//! The network layer between in-process hosts on loopback: real libp2p
//! connections (TCP + noise + yamux, QUIC), frames, private networks, bad input.

use std::time::Duration;

use futures::AsyncWriteExt;
use libp2p::{Multiaddr, PeerId, identity::Keypair};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use vp_host::net::{Net, NetConfig, NetEvent};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Msg {
    Hello(u64),
    Blob(#[serde(with = "serde_bytes")] Vec<u8>),
}

type Events = mpsc::Receiver<NetEvent<Msg>>;

async fn host(psk: Option<libp2p::pnet::PreSharedKey>) -> (Net<Msg>, Events, Multiaddr) {
    let config = NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        psk,
        ..NetConfig::default()
    };
    let (net, mut events) = Net::<Msg>::start(Keypair::generate_ed25519(), config)
        .await
        .unwrap();
    let addr = loop {
        match events.recv().await.unwrap() {
            NetEvent::ListenAddr(addr) => break addr,
            _ => continue,
        }
    };
    (net, events, addr)
}

async fn next_message(events: &mut Events) -> (PeerId, Msg) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let NetEvent::Message { from, msg } = events.recv().await.expect("events open") {
                return (from, msg);
            }
        }
    })
    .await
    .expect("a message arrives")
}

#[tokio::test]
async fn messages_flow_both_ways_in_order() {
    let (a, mut a_events, _) = host(None).await;
    let (b, mut b_events, b_addr) = host(None).await;
    let b_id = a.dial(b_addr).await.unwrap();
    assert_eq!(b_id, b.local_peer_id());
    for i in 0..100 {
        a.send(b_id, &Msg::Hello(i)).unwrap();
    }
    for i in 0..100 {
        assert_eq!(
            next_message(&mut b_events).await,
            (a.local_peer_id(), Msg::Hello(i))
        );
    }
    // b answers over the connection a opened
    b.send(a.local_peer_id(), &Msg::Blob(vec![7; 100_000]))
        .unwrap();
    assert_eq!(
        next_message(&mut a_events).await.1,
        Msg::Blob(vec![7; 100_000])
    );
    let status = a.status().await.unwrap();
    assert!(
        status
            .connected_peers
            .iter()
            .any(|p| p.peer_id == b_id.to_string())
    );
    assert!(a.counters().frames_sent >= 100);
}

/// Frames sent at once from several threads outside the runtime (as member
/// threads send), small ones and blobs larger than yamux's stream window,
/// arrive whole and in each thread's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_from_many_threads_arrive_whole_in_each_threads_order() {
    let (a, _a_events, _) = host(None).await;
    let (_b, mut b_events, b_addr) = host(None).await;
    let b_id = a.dial(b_addr).await.unwrap();
    a.send(b_id, &Msg::Hello(0)).unwrap();
    assert_eq!(next_message(&mut b_events).await.1, Msg::Hello(0));
    const THREADS: u64 = 3;
    const EACH: u64 = 300;
    let senders: Vec<_> = (0..THREADS)
        .map(|t| {
            let a = a.clone();
            std::thread::spawn(move || {
                for i in 1..=EACH {
                    let msg = if i % 50 == 0 {
                        Msg::Blob(vec![t as u8; 700_000])
                    } else {
                        Msg::Hello(t * 1_000_000 + i)
                    };
                    // A full queue drops the frame (the protocols tolerate
                    // loss): offer it again until the writer makes room.
                    loop {
                        match a.send(b_id, &msg) {
                            Ok(()) => break,
                            Err(vp_host::net::SendError::QueueFull(_)) => std::thread::yield_now(),
                            Err(e) => panic!("send failed: {e}"),
                        }
                    }
                }
            })
        })
        .collect();
    let mut next = [1u64; THREADS as usize];
    let mut blobs = 0;
    while next.iter().any(|n| *n <= EACH) {
        match next_message(&mut b_events).await.1 {
            Msg::Hello(v) => {
                let (t, i) = ((v / 1_000_000) as usize, v % 1_000_000);
                assert_eq!(i, next[t], "thread {t}'s frames out of order");
                next[t] += 1;
            }
            Msg::Blob(bytes) => {
                let t = bytes[0] as usize;
                assert_eq!(next[t] % 50, 0, "thread {t}'s blob out of order");
                assert_eq!(bytes.len(), 700_000);
                let other = bytes.iter().position(|b| *b != bytes[0]);
                assert_eq!(other, None, "a blob arrived mixed with other bytes");
                next[t] += 1;
                blobs += 1;
            }
        }
    }
    for s in senders {
        s.join().unwrap();
    }
    assert_eq!(blobs, THREADS * EACH / 50);
}

#[tokio::test]
async fn peers_learned_second_hand_are_dialed_on_demand() {
    let (a, _a_events, _) = host(None).await;
    let (c, mut c_events, c_addr) = host(None).await;
    // a never dialed c; it only learned c's address (as from an overlay reference)
    a.add_addresses(c.local_peer_id(), [c_addr]);
    a.send(c.local_peer_id(), &Msg::Hello(1)).unwrap();
    assert_eq!(
        next_message(&mut c_events).await,
        (a.local_peer_id(), Msg::Hello(1))
    );
}

#[tokio::test]
async fn many_peers_learned_second_hand_are_all_dialed_at_once() {
    // libp2p_stream asks for a dial through a channel with room for one
    // request: a host writing to several unconnected peers in one turn used
    // to dial only the first, and the others' frames waited out the stream
    // open timeout and were dropped (a client's host after a failover).
    let (a, _a_events, _) = host(None).await;
    let mut peers = Vec::new();
    for _ in 0..6 {
        let (p, events, addr) = host(None).await;
        a.add_addresses(p.local_peer_id(), [addr]);
        peers.push((p, events));
    }
    for (i, (p, _)) in peers.iter().enumerate() {
        a.send(p.local_peer_id(), &Msg::Hello(i as u64)).unwrap();
    }
    for (i, (_, events)) in peers.iter_mut().enumerate() {
        assert_eq!(
            next_message(events).await,
            (a.local_peer_id(), Msg::Hello(i as u64))
        );
    }
    assert_eq!(a.counters().frames_dropped_unreachable, 0);
}

#[test]
fn a_peer_that_vanishes_is_reported_as_a_broken_connection() {
    // b runs on a runtime of its own; dropping that runtime closes b's
    // sockets under its connections, as a killed process's are closed.
    let b_rt = tokio::runtime::Runtime::new().unwrap();
    let (b_id, b_addr, b_keep) = b_rt.block_on(async {
        let (b, b_events, b_addr) = host(None).await;
        (b.local_peer_id(), b_addr, (b, b_events))
    });
    let a_rt = tokio::runtime::Runtime::new().unwrap();
    let (a, mut a_events) = a_rt.block_on(async {
        let (a, a_events, _) = host(None).await;
        assert_eq!(a.dial(b_addr).await.unwrap(), b_id);
        (a, a_events)
    });
    drop(b_keep);
    drop(b_rt);
    let broken = a_rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let NetEvent::Disconnected { peer, broken } =
                    a_events.recv().await.expect("events open")
                    && peer == b_id
                {
                    return broken;
                }
            }
        })
        .await
        .expect("a sees the connection end")
    });
    assert!(broken, "a connection whose peer vanished counts as broken");
    drop(a);
}

#[tokio::test]
async fn private_networks_keep_strangers_out() {
    let key = libp2p::pnet::PreSharedKey::new([1; 32]);
    let other = libp2p::pnet::PreSharedKey::new([2; 32]);
    let (member, mut member_events, member_addr) = host(Some(key)).await;
    let (stranger, _, _) = host(Some(other)).await;
    let (open, _, _) = host(None).await;
    let err = stranger.dial(member_addr.clone()).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("--network-key"),
        "the error says why: {err:#}"
    );
    assert!(open.dial(member_addr.clone()).await.is_err());
    // the member is unaffected and still accepts a host with the right key
    let (friend, _, _) = host(Some(key)).await;
    let id = friend.dial(member_addr).await.unwrap();
    friend.send(id, &Msg::Hello(9)).unwrap();
    assert_eq!(next_message(&mut member_events).await.1, Msg::Hello(9));
    assert!(
        member.counters().connection_errors >= 2,
        "failed handshakes are counted"
    );
}

#[tokio::test]
async fn a_private_host_skips_quic_and_listens_on_tcp() {
    let psk = libp2p::pnet::PreSharedKey::new([3; 32]);
    let listen = vec![
        "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap(),
        "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
    ];
    let config = NetConfig {
        listen,
        psk: Some(psk),
        ..NetConfig::default()
    };
    let (_net, mut events) = Net::<Msg>::start(Keypair::generate_ed25519(), config)
        .await
        .unwrap();
    let addr = loop {
        if let NetEvent::ListenAddr(addr) = events.recv().await.unwrap() {
            break addr;
        }
    };
    assert!(addr.to_string().contains("/tcp/"), "{addr}");
    let (friend, _, _) = host(Some(psk)).await;
    friend.dial(addr).await.unwrap();
}

#[tokio::test]
async fn malformed_and_oversized_frames_close_the_connection_only() {
    let (victim, mut victim_events, victim_addr) = host(None).await;
    let (attacker, _, _) = host(None).await;
    let id = attacker.dial(victim_addr.clone()).await.unwrap();

    let mut stream = attacker.open_raw_stream(id).await.unwrap();
    stream
        .write_all(&[0, 0, 0, 4, 0xff, 0xfe, 0xfd, 0xfc])
        .await
        .unwrap();
    stream.flush().await.unwrap();
    let (oversized, _, _) = host(None).await;
    let id2 = oversized.dial(victim_addr.clone()).await.unwrap();
    let mut stream = oversized.open_raw_stream(id2).await.unwrap();
    stream
        .write_all(&(64u32 << 20).to_be_bytes())
        .await
        .unwrap();
    stream.flush().await.unwrap();

    // both are counted, and the victim keeps serving well-behaved peers
    tokio::time::timeout(Duration::from_secs(20), async {
        while victim.counters().bad_frames < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("bad frames are noticed");
    let (good, _, _) = host(None).await;
    let id3 = good.dial(victim_addr).await.unwrap();
    good.send(id3, &Msg::Hello(3)).unwrap();
    assert_eq!(
        next_message(&mut victim_events).await,
        (good.local_peer_id(), Msg::Hello(3))
    );
}

#[tokio::test]
async fn a_message_after_the_connection_closed_goes_on_a_new_one() {
    let (a, mut a_events, _) = host(None).await;
    let (_b, mut b_events, b_addr) = host(None).await;
    let b_id = a.dial(b_addr).await.unwrap();
    a.send(b_id, &Msg::Hello(1)).unwrap();
    assert_eq!(
        next_message(&mut b_events).await,
        (a.local_peer_id(), Msg::Hello(1))
    );
    // b drops the connection (a bad frame from a makes it do so); a's
    // writer still holds the stream it opened on that connection.
    let mut raw = a.open_raw_stream(b_id).await.unwrap();
    raw.write_all(&[0, 0, 0, 4, 0xff, 0xfe, 0xfd, 0xfc])
        .await
        .unwrap();
    raw.flush().await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let NetEvent::Disconnected { peer, .. } = a_events.recv().await.expect("events open")
                && peer == b_id
            {
                return;
            }
        }
    })
    .await
    .expect("a sees the connection close");
    // The old stream fails; the frame goes again on a new connection.
    a.send(b_id, &Msg::Hello(2)).unwrap();
    assert_eq!(
        next_message(&mut b_events).await,
        (a.local_peer_id(), Msg::Hello(2))
    );
}

#[tokio::test]
async fn raw_tcp_garbage_is_refused_and_the_host_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (victim, mut victim_events, victim_addr) = host(None).await;
    let port = victim_addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
        _ => None,
    });
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port.unwrap()))
        .await
        .unwrap();
    raw.write_all(&[0xde; 4096]).await.unwrap();
    let mut buf = [0u8; 1024];
    // the host closes the connection (multistream-select or noise refuses the bytes)
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match raw.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "garbage connection closed");
    let (good, _, _) = host(None).await;
    let id = good.dial(victim_addr).await.unwrap();
    good.send(id, &Msg::Hello(4)).unwrap();
    assert_eq!(next_message(&mut victim_events).await.1, Msg::Hello(4));
    assert!(victim.counters().connection_errors >= 1);
}

#[tokio::test]
async fn quic_works_without_a_network_key() {
    let config = NetConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
        ..NetConfig::default()
    };
    let (b, mut b_events) = Net::<Msg>::start(Keypair::generate_ed25519(), config)
        .await
        .unwrap();
    let addr = loop {
        if let NetEvent::ListenAddr(addr) = b_events.recv().await.unwrap() {
            break addr;
        }
    };
    let (a, _, _) = host(None).await;
    let id = a.dial(addr).await.unwrap();
    a.send(id, &Msg::Hello(5)).unwrap();
    assert_eq!(
        next_message(&mut b_events).await,
        (a.local_peer_id(), Msg::Hello(5))
    );
    assert_eq!(b.local_peer_id(), id);
}
