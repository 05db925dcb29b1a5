//! Virtual peers end to end: real `vp-host join` processes on loopback, real
//! SIGKILLs, real files. Each test starts its own hosts.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Cluster, wait_for, wait_for_async};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use vp_host::sandbox::ModuleHash;

/// The tests start many processes; running them one at a time keeps a 2-core
/// machine responsive enough that the timings stay realistic.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// Wait until every voter has applied the same slots, then return
/// (applied_below, digest) per voter.
async fn converged(cluster: &Cluster, vp: &str, voters: &[String]) -> Vec<(u64, String)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut seen = Vec::new();
        for v in voters {
            let Some(i) = cluster.index_of(v).await else {
                continue;
            };
            if let Ok(s) = cluster.vp_status(i, vp).await
                && s.host == *v
            {
                seen.push((s.applied_below, s.state_digest.unwrap_or_default()));
            }
        }
        let same_slot = seen.len() == voters.len() && seen.windows(2).all(|w| w[0].0 == w[1].0);
        if same_slot || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn assert_identical(states: &[(u64, String)]) {
    assert!(states.len() >= 2, "too few voters answered: {states:?}");
    assert!(
        states.windows(2).all(|w| w[0] == w[1]),
        "replicas differ: {states:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_send_status_and_every_example_app() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start("vp-apps", 5).await;

    let counter = c
        .spawn(0, vp_apps::COUNTER, "&name=ctr")
        .await
        .expect("spawn counter");
    assert_eq!(c.ask(1, &counter, json!({"add": 5})).await, json!(5));
    assert_eq!(c.ask(2, &counter, json!({"add": -2})).await, json!(3));
    assert_eq!(
        c.ask(0, "ctr", json!("get")).await,
        json!(3),
        "by name on the spawning host"
    );
    // A name is unique on the host that spawns, and fits in a path.
    let taken = c.spawn(0, vp_apps::COUNTER, "&name=ctr").await.unwrap_err();
    assert!(format!("{taken:#}").contains("taken"), "{taken:#}");
    let odd = c
        .spawn(0, vp_apps::COUNTER, "&name=a%2Fb")
        .await
        .unwrap_err();
    assert!(format!("{odd:#}").contains("name `a/b`"), "{odd:#}");
    assert_eq!(
        c.ask(0, "ctr", json!("get")).await,
        json!(3),
        "still the first"
    );
    // Two spawns taking one name at once: one gets it, the other is refused.
    let (a, b) = tokio::join!(
        c.spawn(0, vp_apps::COUNTER, "&name=twin"),
        c.spawn(0, vp_apps::COUNTER, "&name=twin")
    );
    let (won, lost) = match (a, b) {
        (Ok(vp), Err(e)) | (Err(e), Ok(vp)) => (vp, e),
        other => panic!("exactly one spawn takes the name: {other:?}"),
    };
    assert!(format!("{lost:#}").contains("name"), "{lost:#}");
    c.ask(0, "twin", json!({"add": 7})).await;
    assert_eq!(
        c.ask(0, &won, json!("get")).await,
        json!(7),
        "the name is the winner's"
    );
    let read = vp_host::node::api::SendRequest {
        msg: json!("get"),
        read: true,
        timeout_ms: Some(30_000),
    };
    let answer: vp_host::node::api::SendAnswer = c.hosts[3]
        .api
        .post(&format!("/v1/vps/{counter}/send"), &read)
        .await
        .unwrap();
    assert_eq!(answer.reply, Some(json!(3)), "linearizable read");
    // The leader's host in the Prometheus text format (`GET /v1/metrics`).
    let leader = c.wait_voters(0, &counter, 3, &[]).await.leader.unwrap();
    let at = c.index_of(&leader).await.unwrap();
    let metrics = c.hosts[at].api.get_text("/v1/metrics").await.unwrap();
    let sample = |prefix: &str| -> f64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"));
        line.rsplit_once(' ').unwrap().1.parse().unwrap()
    };
    let series = format!("{{vp=\"{counter}\",name=\"ctr\"}}");
    assert_eq!(sample(&format!("vp_member_leader{series}")), 1.0);
    assert_eq!(sample(&format!("vp_member_voters{series}")), 3.0);
    assert!(sample(&format!("vp_member_applied_below{series}")) >= 3.0);
    assert!(sample("vp_host_memberships ") >= 1.0);
    assert!(sample("vp_host_frames_sent_total ") > 0.0);
    // An unknown virtual peer is a 404 with a clear message, not a busy host.
    let unknown = c
        .send(0, "no-such-vp", json!("get"))
        .await
        .expect_err("an unknown name is an error");
    let api = unknown
        .downcast_ref::<vp_host::api::ApiError>()
        .expect("an API error");
    assert_eq!(api.status, 404, "{api}");
    assert!(api.message.contains("no-such-vp"), "{api}");
    // An id no virtual peer has: the overlay finds its key range empty, and
    // the send and the status query say so instead of waiting 30 s.
    let nowhere = "00c0ffee00c0ffee";
    let (sent, status) = tokio::join!(c.send(1, nowhere, json!("get")), c.vp_status(2, nowhere));
    for err in [sent.expect_err("not found"), status.expect_err("not found")] {
        let text = format!("{err:#}");
        assert!(
            text.contains("no virtual peer 00c0ffee00c0ffee was found"),
            "{text}"
        );
    }
    let err = c.send(4, &counter, json!({"add": "x"})).await.unwrap();
    assert!(err.error.unwrap().contains("cannot decode message"));
    send_streams(&c, &counter).await;
    for i in 0..5 {
        let s = c
            .vp_status(i, &counter)
            .await
            .unwrap_or_else(|e| panic!("status from h{i}: {e:#}"));
        assert_eq!(s.voters.len(), 3);
        assert!(s.leader.is_some());
        assert!(s.applied_below >= 3);
        // Every member times its log writes; the leader also its slots and
        // requests (the messages above went through it).
        let t = &s.timings;
        assert!(t.log_write.samples > 0, "h{i}: {t:?}");
        assert!(t.log_write.p50_us <= t.log_write.max_us, "h{i}: {t:?}");
        let leads = s.leader.as_deref() == Some(s.host.as_str());
        assert_eq!(t.commit.samples > 0, leads, "h{i}: {t:?}");
        assert_eq!(t.request.samples > 0, leads, "h{i}: {t:?}");
        if leads {
            assert!(t.request.samples >= 3, "h{i}: {t:?}");
            assert!(t.commit.max_us > 0 && t.request.max_us > 0, "h{i}: {t:?}");
        }
    }

    let kv = c.spawn(1, vp_apps::KV, "").await.expect("spawn kv");
    assert_eq!(
        c.ask(2, &kv, json!({"put": {"key": "a", "value": [1, 2]}}))
            .await,
        Value::Null
    );
    assert_eq!(c.ask(3, &kv, json!({"get": "a"})).await, json!([1, 2]));
    assert_eq!(c.ask(4, &kv, json!({"delete": "a"})).await, json!([1, 2]));

    // chat: an async call from one virtual peer to another, and one-way sends
    let a = c.spawn(2, vp_apps::CHAT, "").await.expect("spawn chat a");
    let b = c.spawn(3, vp_apps::CHAT, "").await.expect("spawn chat b");
    c.ask(0, &b, json!({"post": {"from": "bob", "text": "hello"}}))
        .await;
    let history = c.ask(1, &a, json!({"ask": {"room": b, "last": 5}})).await;
    assert_eq!(history[0]["text"], "hello");
    // A call to a virtual peer that is nowhere resumes with that error.
    let lost = c
        .send(1, &a, json!({"ask": {"room": nowhere, "last": 5}}))
        .await
        .unwrap();
    assert!(
        lost.error
            .as_deref()
            .is_some_and(|e| e.contains("no virtual peer 00c0ffee00c0ffee was found")),
        "{lost:?}"
    );
    c.ask(2, &a, json!({"bridge": b})).await;
    // What `a` logged (its bridge), printed by `vp-host logs` on a host
    // that may not be a member; then as JSON, from where the first ended.
    let dir4 = c.hosts[4].data_dir.to_string_lossy().into_owned();
    let bridged = format!("bridged to {b}: posts here are forwarded there");
    let printed = wait_for(Duration::from_secs(15), || {
        let out = common::run(&["--data-dir", &dir4, "logs", &a], "");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && text.contains(&bridged)).then_some(text)
    })
    .await
    .expect("vp-host logs prints the app's line");
    let line = printed.lines().find(|l| l.contains(&bridged)).unwrap();
    assert!(line.contains(" info  ["), "{line}");
    let out = common::run(&["--data-dir", &dir4, "logs", &a, "--json"], "");
    let entries: Vec<Value> = common::stdout_lines(&out)
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let entry = entries
        .iter()
        .find(|e| e["text"] == bridged.as_str())
        .unwrap();
    assert_eq!(entry["level"], "info");
    let cursor = format!("{}.{}", entry["slot"], entry["n"]);
    let out = common::run(&["--data-dir", &dir4, "logs", &a, "--after", &cursor], "");
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&bridged),
        "only the lines after {cursor}"
    );
    let out = common::run(&["--data-dir", &dir4, "logs", &a, "--after", "7"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SLOT.N"));
    c.ask(3, &a, json!({"post": {"from": "ann", "text": "relayed"}}))
        .await;
    let relayed = common::wait_for_async(Duration::from_secs(30), || async {
        let h = c.ask(4, &b, json!({"history": {"last": 5}})).await;
        (h.as_array().map(Vec::len) == Some(2)).then_some(h)
    })
    .await
    .expect("the bridged post arrives");
    assert_eq!(relayed[1]["from"], format!("ann@{a}"));
    // exactly once: the forwarded post is not duplicated by retries
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        c.ask(0, &b, json!({"history": {"last": 10}}))
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // More lines than one answer holds (200): `b` logs one line per bridge
    // it takes, then one per bridge it refuses. `--after` pages through all.
    let first = common::run(&["--data-dir", &dir4, "logs", &b, "--json"], "");
    assert!(common::stdout_lines(&first).is_empty(), "{first:?}");
    let rooms: String = (0..260u64)
        .map(|i| format!("{{\"bridge\": \"{:016x}\"}}\n", 0xb000 + i))
        .collect();
    let dir1 = c.hosts[1].data_dir.to_string_lossy().into_owned();
    let out = common::run(&["--data-dir", &dir1, "send", &b, "-"], &rooms);
    assert_eq!(common::stdout_lines(&out).len(), 260, "{out:?}");
    // (host 4's own member, if it is one, may apply the last ones a moment later)
    let lines = wait_for(Duration::from_secs(15), || {
        let out = common::run(&["--data-dir", &dir4, "logs", &b, "--after", "1.0"], "");
        let lines = common::stdout_lines(&out);
        (lines.len() >= 260).then_some(lines)
    })
    .await
    .expect("every line, 200 per request");
    assert_eq!(lines.len(), 260);
    assert!(
        lines[0].contains("bridged to 000000000000b000"),
        "{}",
        lines[0]
    );
    assert!(
        lines[259].contains("bridge to 000000000000b103 refused"),
        "{}",
        lines[259]
    );
    // without a cursor: the latest 200, and a count of the rest
    let out = common::run(&["--data-dir", &dir4, "logs", &b], "");
    assert_eq!(common::stdout_lines(&out).len(), 200);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(60 earlier line(s) not shown)"),
        "{out:?}"
    );
    // 750 lines more: the member keeps the last 1,000, so a reader still at
    // the start is told lines after its position are gone; one at the last
    // line it read (still kept) is not.
    let last_read = lines[259]
        .split('[')
        .nth(1)
        .and_then(|r| r.split(']').next())
        .expect("a [SLOT.N] position")
        .to_string();
    let more: String = (0..750u64)
        .map(|i| format!("{{\"bridge\": \"{:016x}\"}}\n", 0xc000 + i))
        .collect();
    let out = common::run(&["--data-dir", &dir1, "send", &b, "-"], &more);
    assert_eq!(common::stdout_lines(&out).len(), 750, "{out:?}");
    let out = wait_for(Duration::from_secs(15), || {
        let out = common::run(&["--data-dir", &dir4, "logs", &b, "--after", "1.0"], "");
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.contains("may be missing").then_some(out)
    })
    .await
    .expect("a reader whose lines were dropped is told so");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("bridged to 000000000000b000"),
        "the oldest line is still kept: {out:?}"
    );
    let out = common::run(
        &["--data-dir", &dir4, "logs", &b, "--after", &last_read],
        "",
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("may be missing"),
        "{out:?}"
    );
    assert_eq!(common::stdout_lines(&out).len(), 750, "every line after it");
}

/// Send streams (docs/host.md): `vp-host send <vp> -` and the protocol
/// itself, on a counter that stands at 3.
async fn send_streams(c: &Cluster, counter: &str) {
    let h = &c.hosts[1];
    let data_dir = h.data_dir.to_str().unwrap();
    // In order, one at a time; a line that is not JSON and an error reply
    // each answer in their place and the rest go on.
    let input = "{\"add\": 1}\n{\"add\": 1}\n\nnot json\n{\"add\": \"x\"}\n{\"add\": 1}\n";
    let out = common::run(&["--data-dir", data_dir, "send", counter, "-"], input);
    let lines = common::stdout_lines(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed line fails the command: {out:?}"
    );
    assert_eq!(lines.len(), 5, "one answer per message line: {lines:?}");
    assert_eq!(lines[0..2], ["4", "5"]);
    assert!(
        lines[2].contains("\"failed\"") && lines[2].contains("not JSON"),
        "{}",
        lines[2]
    );
    assert!(lines[3].contains("cannot decode message"), "{}", lines[3]);
    assert_eq!(lines[5 - 1], "6");
    // 50 at once, 16 in flight: each applied once (distinct totals 7..=56),
    // answers in input order whatever order they completed in.
    let input: String = (0..50).map(|_| "{\"add\": 1}\n").collect();
    let out = common::run(
        &[
            "--data-dir",
            data_dir,
            "send",
            counter,
            "-",
            "--in-flight",
            "16",
        ],
        &input,
    );
    assert!(out.status.success(), "{out:?}");
    let totals: BTreeSet<i64> = common::stdout_lines(&out)
        .iter()
        .map(|l| l.parse().expect("a total"))
        .collect();
    assert_eq!(totals, (7..=56).collect(), "every add applied exactly once");

    // The protocol by hand: upgrade, then JSON lines each way.
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let token = std::fs::read_to_string(h.data_dir.join("api-token")).unwrap();
    let mut tcp = tokio::net::TcpStream::connect(h.api.addr()).await.unwrap();
    let head = format!(
        "GET /v1/vps/{counter}/stream HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\nconnection: upgrade\r\nupgrade: vp-stream\r\n\r\n",
        token.trim()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut rd = BufReader::new(tcp);
    let mut line = String::new();
    rd.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("HTTP/1.1 101"), "{line}");
    while line != "\r\n" {
        line.clear();
        rd.read_line(&mut line).await.unwrap();
    }
    rd.get_mut()
        .write_all(b"{\"id\": 9, \"msg\": {\"add\": 2}}\n{\"id\": 10}\n[1,2\n{\"id\": 11, \"msg\": \"get\", \"read\": true}\n")
        .await
        .unwrap();
    let mut answers = std::collections::BTreeMap::new();
    for _ in 0..4 {
        line.clear();
        rd.read_line(&mut line).await.unwrap();
        let a: Value = serde_json::from_str(&line).unwrap();
        answers.insert(a["id"].as_u64().unwrap_or(0), a);
    }
    assert_eq!(answers[&9]["reply"], json!(58));
    assert_eq!(
        answers[&10]["status"],
        json!(400),
        "no msg: {:?}",
        answers[&10]
    );
    assert_eq!(
        answers[&0]["status"],
        json!(400),
        "not a request: {:?}",
        answers[&0]
    );
    assert!(
        answers[&11]["reply"].as_i64().unwrap() >= 56,
        "{:?}",
        answers[&11]
    );
    // Closing our side ends the stream once the answers are out.
    rd.get_mut().shutdown().await.unwrap();
    line.clear();
    assert_eq!(
        rd.read_line(&mut line).await.unwrap(),
        0,
        "closed after: {line}"
    );

    // Refused before switching: an unknown virtual peer.
    let e = h.api.stream("no-such-vp").await.expect_err("unknown name");
    let e = e
        .downcast_ref::<vp_host::api::ApiError>()
        .expect("an API error");
    assert_eq!(e.status, 404, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_app_gets_errors_and_hosts_are_unharmed() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start("vp-hostile", 4).await;
    let err = c
        .spawn(0, b"not a wasm module at all", "&name=broken")
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("not a WebAssembly module"),
        "{err:#}"
    );
    // A spawn that failed leaves no name behind: unknown (404), not a virtual
    // peer that never answers.
    let err = c.send(0, "broken", json!("get")).await.unwrap_err();
    let api = err
        .downcast_ref::<vp_host::api::ApiError>()
        .expect("an API error");
    assert_eq!(api.status, 404, "{api}");
    let wasi = wat::parse_str(
        r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32))))"#,
    )
    .unwrap();
    let err = c.spawn(0, &wasi, "").await.unwrap_err();
    assert!(
        format!("{err:#}").contains("wasi_snapshot_preview1::fd_write"),
        "{err:#}"
    );

    let vp = c
        .spawn(
            1,
            vp_apps::STRESS,
            "&fuel_per_message=20000000&memory_max=67108864",
        )
        .await
        .unwrap();
    c.ask(2, &vp, json!({"add": 1})).await;
    let spin = c.send(2, &vp, json!("spin")).await.unwrap();
    assert!(spin.error.unwrap().contains("ran out of fuel"));
    let bomb = c.send(3, &vp, json!({"alloc": 1u64 << 30})).await.unwrap();
    assert!(bomb.error.unwrap().contains("memory limit"));
    let panic = c
        .send(0, &vp, json!({"add_then_panic": 100}))
        .await
        .unwrap();
    assert!(panic.error.unwrap().contains("guest panicked"));
    // nothing the failures did remains; the virtual peer and every host go on
    assert_eq!(c.ask(1, &vp, json!({"add": 1})).await, json!(2));
    for h in &c.hosts {
        assert!(h.status().await.is_ok(), "{} stopped answering", h.name);
    }
    // A hostile peer: a stranger (it deployed nothing) tells a member's host
    // to stop its member. The host ignores it, says so, and keeps the member.
    let s = c.vp_status(0, &vp).await.unwrap();
    let member = c
        .index_of(&s.voters[0])
        .await
        .expect("a host of this cluster");
    let (stranger, mut events) = vp_host::net::Net::<vp_host::node::Wire>::start(
        libp2p::identity::Keypair::generate_ed25519(),
        vp_host::net::NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let peer = dial_host(&stranger, &c, member).await;
    let undeploy = vp_host::vp::wire::VpWire::Undeploy {
        vp: vp.parse().unwrap(),
    };
    stranger
        .send(peer, &vp_host::node::Wire::Vp(undeploy))
        .unwrap();
    let ignored = "ignored an undeploy from a host that did not deploy this member";
    wait_for(Duration::from_secs(20), || {
        c.hosts[member].log().contains(ignored).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{} never logged {ignored:?}", c.hosts[member].name));
    let still = c.hosts[member].status().await.unwrap();
    assert!(
        still.virtual_peers.iter().any(|v| v.vp == s.vp),
        "{} stopped its member on a stranger's word",
        c.hosts[member].name
    );
    assert_eq!(c.ask(member, &vp, json!({"add": 1})).await, json!(3));

    // The stranger tells the host that runs no member that the virtual peer
    // was destroyed, or that it leads it, again and again while a client
    // sends through that host. Answers to none of the host's locates or
    // requests are not believed.
    let outsider = (0..c.hosts.len())
        .find(|&i| !s.voters.contains(&c.hosts[i].host_id))
        .expect("a host that is not a member");
    let peer = dial_host(&stranger, &c, outsider).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let liar = {
        let (stranger, stop, vp) = (stranger.clone(), stop.clone(), vp.parse().unwrap());
        tokio::spawn(async move {
            let mut sent = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                use vp_host::vp::wire::VpWire;
                let me = vp_host::node::overlay::PeerContact {
                    peer: stranger.local_peer_id(),
                    addrs: Vec::new(),
                };
                let (client, host) = (
                    vp_consensus::ClientId(rand::random()),
                    vp_consensus::HostId(rand::random()),
                );
                let notice = match sent % 5 {
                    0 => VpWire::Destroyed { vp, answers: 0 },
                    1 => VpWire::Destroyed {
                        vp,
                        answers: rand::random(),
                    },
                    // "I lead it": an answer to no request, a locate or a
                    // redirect nobody asked for.
                    2 => VpWire::Reply(vp_host::vp::wire::Reply {
                        vp,
                        client,
                        seq: 1,
                        result: Ok(Default::default()),
                        leader: host,
                    }),
                    3 => VpWire::Located {
                        vp,
                        nonce: rand::random(),
                        member: host,
                        leader: Some((host, me.clone())),
                        voters: vec![(host, me)],
                    },
                    _ => VpWire::Redirect {
                        vp,
                        client,
                        seq: 1,
                        leader: Some((host, me)),
                    },
                };
                if stranger
                    .send(peer, &vp_host::node::Wire::Vp(notice))
                    .is_ok()
                {
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sent
        })
    };
    // (each kind of lie arrived and was ignored before the client sends)
    let first = wait_for(Duration::from_secs(20), || {
        let log = c.hosts[outsider].log();
        [
            "ignored a destroyed notice",
            "ignored a located",
            "ignored a redirect",
        ]
        .iter()
        .all(|l| log.contains(l))
        .then_some(())
    })
    .await;
    let answers: Vec<Value> = three_adds(&c, outsider, &vp).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = liar.await.unwrap();
    assert!(
        first.is_some(),
        "{} did not log ignoring each kind of lie ({sent} sent)",
        c.hosts[outsider].name
    );
    assert_eq!(
        answers,
        vec![json!(4), json!(5), json!(6)],
        "after {sent} false answers"
    );
    // ... and none of the client's requests or locates went to the liar.
    let mut misled = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let vp_host::net::NetEvent::Message {
            msg: vp_host::node::Wire::Vp(m),
            ..
        } = event
        {
            misled.push(format!("{m:?}"));
        }
    }
    assert!(misled.is_empty(), "the host believed a lie: {misled:?}");
    // A deployment undone while its module is on the way: the stranger deploys
    // a one-member virtual peer to the outsider and serves the module, but
    // sends `Undeploy` before the module's first chunk. The host fetches and
    // compiles it, then refuses to start the member nobody will use.
    use vp_host::node::Wire;
    use vp_host::vp::wire::{Deploy, VpWire};
    let host = vp_consensus::HostId(vp_host::node::overlay::host_id_of(&peer).0);
    let me = vp_host::node::overlay::PeerContact {
        peer: stranger.local_peer_id(),
        addrs: Vec::new(),
    };
    let undone = vp_guest_sdk::abi::VpId(rand::random());
    let config = vp_host::vp::VpConfig {
        vp: undone,
        name: None,
        module: ModuleHash::of(vp_apps::COUNTER),
        module_bytes: vp_apps::COUNTER.len() as u64,
        limits: Default::default(),
        members: 1,
        timing: vp_host::vp::VpConfig::default_timing(),
        replace_after_ms: 500,
        checkpoint_every_slots: 1024,
    };
    let deploy = Deploy {
        op: 77,
        config,
        founding: Some(vp_host::node::vps::founding(vec![host])),
        module_from: me.clone(),
        members: vec![(host, me)],
    };
    stranger
        .send(peer, &Wire::Vp(VpWire::Deploy(deploy)))
        .unwrap();
    let ack = tokio::time::timeout(Duration::from_secs(60), async {
        let mut undo_sent = false;
        loop {
            let Some(event) = events.recv().await else {
                panic!("the stranger's network stopped");
            };
            let vp_host::net::NetEvent::Message { from, msg } = event else {
                continue;
            };
            match msg {
                Wire::Vp(VpWire::FetchModule { hash, offset }) if from == peer => {
                    if !undo_sent {
                        let undo = VpWire::Undeploy { vp: undone };
                        stranger.send(peer, &Wire::Vp(undo)).unwrap();
                        undo_sent = true;
                    }
                    let start = offset as usize;
                    let end = (start + (256 << 10)).min(vp_apps::COUNTER.len());
                    let chunk = VpWire::ModuleChunk {
                        hash,
                        offset,
                        total: vp_apps::COUNTER.len() as u64,
                        bytes: vp_apps::COUNTER[start..end].to_vec(),
                    };
                    stranger.send(peer, &Wire::Vp(chunk)).unwrap();
                }
                Wire::Vp(VpWire::DeployAck { op: 77, vp, result }) if vp == undone => {
                    break (undo_sent, result);
                }
                _ => {}
            }
        }
    })
    .await
    .expect("no answer to the deployment within 60 s");
    assert!(ack.0, "the host never fetched the module");
    let why = ack.1.expect_err("the undone deployment started a member");
    assert!(why.contains("undone"), "{why}");
    let status = c.hosts[outsider].status().await.unwrap();
    assert!(
        status
            .virtual_peers
            .iter()
            .all(|v| v.vp != undone.to_string()),
        "{:?}",
        status.virtual_peers
    );
    assert!(
        c.hosts[outsider]
            .log()
            .contains("deployment undone by its spawn before it started")
    );
    assert!(
        !c.hosts[outsider]
            .data_dir
            .join("vps")
            .join(undone.to_string())
            .exists()
    );
    let s = c.vp_status(0, &vp).await.unwrap();
    let states = converged(&c, &vp, &s.voters).await;
    assert_identical(&states);
}

/// Connect `net` (a hand-made peer) to host `i` of the cluster.
async fn dial_host(
    net: &vp_host::net::Net<vp_host::node::Wire>,
    c: &Cluster,
    i: usize,
) -> libp2p::PeerId {
    let status = c.hosts[i].status().await.unwrap();
    let addr = status
        .listen_addrs
        .iter()
        .find(|a| a.contains("/tcp/"))
        .expect("a TCP listen address")
        .parse()
        .unwrap();
    net.dial(addr).await.unwrap()
}

/// Three adds in turn through host `via` (each after the last answered).
async fn three_adds(c: &Cluster, via: usize, vp: &str) -> Vec<Value> {
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(c.ask(via, vp, json!({"add": 1})).await);
    }
    answers
}

/// One client operation in the history file (JSON lines; docs/architecture.md).
#[derive(serde::Serialize)]
struct Event<'a> {
    process: usize,
    #[serde(rename = "type")]
    kind: &'a str,
    f: &'a str,
    value: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<i64>,
    time_us: u128,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_load_loses_nothing_and_applies_nothing_twice() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start("vp-leader-kill", 5).await;
    let vp = c.spawn(0, vp_apps::COUNTER, "").await.unwrap();
    let status = c.wait_voters(0, &vp, 3, &[]).await;
    let leader_id = status.leader.clone().unwrap();
    let leader = c.index_of(&leader_id).await.unwrap();
    // clients talk to two hosts that are not the leader
    let vias: Vec<usize> = (0..5).filter(|&i| i != leader).take(2).collect();

    let start = Instant::now();
    let history_path = c.dir.join("history.jsonl");
    let history = Arc::new(std::sync::Mutex::new(
        std::fs::File::create(&history_path).unwrap(),
    ));
    let c = Arc::new(c);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for process in 0..4usize {
        let (c, vp, stop, history) = (c.clone(), vp.clone(), stop.clone(), history.clone());
        let via = vias[process % vias.len()];
        // Half the clients send over send streams, half one request each.
        let stream = if process >= 2 {
            Some(c.hosts[via].api.stream(&vp).await.unwrap())
        } else {
            None
        };
        clients.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                // distinct values: a lost or doubled add shows in the final sum
                let value = (process as i64) * 1_000_000 + n;
                let log = |kind: &str, result: Option<i64>| {
                    let e = Event {
                        process,
                        kind,
                        f: "add",
                        value,
                        result,
                        time_us: start.elapsed().as_micros(),
                    };
                    let mut f = history.lock().unwrap();
                    writeln!(f, "{}", serde_json::to_string(&e).unwrap()).unwrap();
                };
                log("invoke", None);
                let answer = match &stream {
                    Some(s) => s
                        .send(vp_host::node::api::SendRequest {
                            msg: json!({"add": value}),
                            read: false,
                            timeout_ms: Some(60_000),
                        })
                        .await
                        .map_err(anyhow::Error::from),
                    None => c.send(via, &vp, json!({"add": value})).await,
                };
                match answer {
                    Ok(answer) if answer.error.is_none() => {
                        let total = answer.reply.and_then(|v| v.as_i64()).expect("a total");
                        log("ok", Some(total));
                        acked.push((value, total));
                    }
                    // not acknowledged: it may or may not have happened
                    _ => log("info", None),
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // SIGKILL the leader while the clients keep going
    c.hosts[leader].kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    for client in clients {
        acked.extend(client.await.unwrap());
    }
    drop(history);

    // every acknowledged add is in the total exactly once; totals are distinct
    let total = c.ask(vias[0], &vp, json!("get")).await.as_i64().unwrap();
    let sum: i64 = acked.iter().map(|(v, _)| v).sum();
    let history_text = std::fs::read_to_string(&history_path).unwrap();
    let unacked: i64 = history_text
        .lines()
        .filter(|l| l.contains("\"type\":\"info\""))
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["value"]
                .as_i64()
                .unwrap()
        })
        .sum();
    assert!(
        acked.len() > 20,
        "the load ran: {} acknowledged adds",
        acked.len()
    );
    assert!(
        total >= sum && total <= sum + unacked,
        "total {total}, acknowledged sum {sum}, unacknowledged {unacked}"
    );
    let totals: BTreeSet<i64> = acked.iter().map(|(_, t)| *t).collect();
    assert_eq!(
        totals.len(),
        acked.len(),
        "two adds reported the same total: one was applied twice or lost"
    );

    // the virtual peer recovered and replaced the dead leader
    let s = c
        .wait_voters(vias[0], &vp, 3, std::slice::from_ref(&leader_id))
        .await;
    let states = converged(&c, &vp, &s.voters).await;
    assert_identical(&states);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_follower_is_replaced_with_identical_state() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start("vp-follower-kill", 5).await;
    let vp = c.spawn(0, vp_apps::KV, "").await.unwrap();
    for i in 0..20 {
        c.ask(
            i % 5,
            &vp,
            json!({"put": {"key": format!("k{i}"), "value": i}}),
        )
        .await;
    }
    let s = c.wait_voters(0, &vp, 3, &[]).await;
    let follower_id = s
        .voters
        .iter()
        .find(|v| Some(*v) != s.leader.as_ref())
        .unwrap()
        .clone();
    let f = c.index_of(&follower_id).await.unwrap();
    c.hosts[f].kill();
    let via = (0..5).find(|&i| i != f).unwrap();
    let s = c.wait_voters(via, &vp, 3, &[follower_id]).await;
    assert_eq!(c.ask(via, &vp, json!({"get": "k7"})).await, json!(7));
    let states = converged(&c, &vp, &s.voters).await;
    assert_identical(&states);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_armed_before_its_leader_is_killed_fires_on_the_new_leader() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start("vp-timer", 5).await;
    let vp = c.spawn(0, vp_apps::KV, "").await.unwrap();
    // kv expires keys on one timer armed for the earliest expiry
    for (key, ttl) in [("short", 8_000), ("long", 3_600_000)] {
        let put = json!({"put": {"key": key, "value": 1, "ttl_ms": ttl}});
        assert_eq!(c.ask(0, &vp, put).await, Value::Null);
    }
    let s = c.wait_voters(0, &vp, 3, &[]).await;
    let leader = s.leader.clone().unwrap();
    let l = c.index_of(&leader).await.unwrap();
    c.hosts[l].kill();
    let via = (0..5).find(|&i| i != l).unwrap();
    // Nothing touches "short" again: only the timer's handler can take it
    // out of the expiring keys.
    let expiring = wait_for_async(Duration::from_secs(60), || async {
        let n = c.ask(via, &vp, json!({"expiring": null})).await;
        (n == json!(1)).then_some(n)
    })
    .await;
    assert_eq!(expiring, Some(json!(1)), "the timer did not fire");
    let s = c.wait_voters(via, &vp, 3, &[leader]).await;
    let states = converged(&c, &vp, &s.voters).await;
    assert_identical(&states);
    // "long" is still armed on every voter, the replacement included (it
    // came with the snapshot)
    for v in &s.voters {
        let i = c.index_of(v).await.unwrap();
        let status = c.vp_status(i, &vp).await.unwrap();
        assert_eq!((&status.host, status.timers), (v, 1));
    }
    assert_eq!(c.ask(via, &vp, json!({"get": "long"})).await, json!(1));
    assert_eq!(c.ask(via, &vp, json!({"get": "short"})).await, Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_members_killed_and_restarted_keep_every_acknowledged_message() {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start("vp-restart-all", 5).await;
    let vp = c.spawn(0, vp_apps::COUNTER, "").await.unwrap();
    let mut sum = 0;
    for i in 1..=30 {
        sum += i;
        assert_eq!(
            c.ask(i as usize % 5, &vp, json!({"add": i})).await,
            json!(sum)
        );
    }
    let s = c.wait_voters(0, &vp, 3, &[]).await;
    let mut members = Vec::new();
    for v in &s.voters {
        members.push(c.index_of(v).await.unwrap());
    }
    // Each member keeps the other two members' contacts next to its log
    // (checked once a second), to reach them after a restart without the overlay.
    for (&m, me) in members.iter().zip(&s.voters) {
        let path = c.hosts[m]
            .data_dir
            .join("vps")
            .join(&vp)
            .join("contacts.json");
        let mut others: Vec<String> = s.voters.iter().filter(|v| *v != me).cloned().collect();
        others.sort();
        let saved = || {
            let mut hosts: Vec<String> = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Vec<(u64, serde_json::Value)>>(&b).ok())
                .map(|l| l.iter().map(|(h, _)| format!("{h:016x}")).collect())
                .unwrap_or_default();
            hosts.sort();
            hosts
        };
        let found =
            vp_host::local::poll(Duration::from_secs(10), Duration::from_millis(50), || {
                let hosts = saved();
                let ok = hosts == others;
                async move { ok.then_some(()) }
            })
            .await;
        assert!(
            found.is_some(),
            "{}: {:?}, expected {others:?}",
            path.display(),
            saved()
        );
    }
    for &m in &members {
        c.hosts[m].kill();
    }
    // While the first member is down, its module store gets two modules no
    // member runs, one stored two hours ago and one just now, and the
    // counter's module (which its member runs) is made two hours old too.
    let modules = c.hosts[members[0]].data_dir.join("modules");
    let plant = |bytes: &[u8]| {
        let path = modules.join(format!("{}.wasm", ModuleHash::of(bytes)));
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let (unused_old, unused_new) = (plant(b"unused, old"), plant(b"unused, new"));
    let counter = modules.join(format!("{}.wasm", ModuleHash::of(vp_apps::COUNTER)));
    for path in [&unused_old, &counter] {
        std::fs::File::options()
            .append(true)
            .open(path)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
    }
    // The second member's copy of the counter's module is corrupted and the
    // third's deleted: each fetches it from the other members at restart.
    let module_of = |m: usize| {
        c.hosts[m]
            .data_dir
            .join("modules")
            .join(format!("{}.wasm", ModuleHash::of(vp_apps::COUNTER)))
    };
    let (corrupted, deleted) = (module_of(members[1]), module_of(members[2]));
    let mut garbage = std::fs::read(&corrupted).unwrap();
    let middle = garbage.len() / 2;
    garbage[middle] ^= 0xff;
    std::fs::write(&corrupted, &garbage).unwrap();
    std::fs::remove_file(&deleted).unwrap();
    for &m in &members {
        c.restart(m).await;
    }
    let via = (0..5).find(|i| !members.contains(i)).unwrap();
    assert_eq!(
        c.ask(via, &vp, json!("get")).await,
        json!(sum),
        "state survived every member's crash"
    );
    for path in [&corrupted, &deleted] {
        let fetched = wait_for(Duration::from_secs(30), || {
            std::fs::read(path)
                .ok()
                .filter(|b| b.as_slice() == vp_apps::COUNTER)
                .map(|_| ())
        })
        .await;
        assert!(
            fetched.is_some(),
            "{} was not fetched again",
            path.display()
        );
    }
    // The restarted host deleted the old module nobody runs, and only it.
    let collected = wait_for(Duration::from_secs(10), || {
        (!unused_old.exists()).then_some(())
    })
    .await;
    assert!(
        collected.is_some(),
        "{} is still there",
        unused_old.display()
    );
    assert!(
        counter.exists(),
        "the module a member runs is kept, however old"
    );
    assert!(
        unused_new.exists(),
        "a module stored within the hour is kept"
    );
    assert_eq!(c.ask(via, &vp, json!({"add": 1})).await, json!(sum + 1));
    let s = c.wait_voters(via, &vp, 3, &[]).await;
    let states = converged(&c, &vp, &s.voters).await;
    assert_identical(&states);
}

/// The stress app spawned through host 0, holding 64 MiB drawn from `seed`;
/// its id and the checksum of what it holds.
async fn spawn_holding_64_mib(c: &Cluster, seed: u64) -> (String, Value) {
    let vp = c
        .spawn(
            0,
            vp_apps::STRESS,
            "&memory_max=268435456&fuel_per_message=2000000000",
        )
        .await
        .unwrap();
    let checksum = c
        .ask(
            1,
            &vp,
            json!({"hold": {"bytes": 64u64 << 20, "seed": seed}}),
        )
        .await;
    (vp, checksum)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_holding_64_mib_is_replaced_by_strong_migration() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start("vp-64mib", 5).await;
    let (vp, checksum) = spawn_holding_64_mib(&c, 9).await;
    let before = c.wait_voters(0, &vp, 3, &[]).await;
    let victim_id = before
        .voters
        .iter()
        .find(|v| Some(*v) != before.leader.as_ref())
        .unwrap()
        .clone();
    let victim = c.index_of(&victim_id).await.unwrap();
    c.hosts[victim].kill();
    let via = (0..5).find(|&i| i != victim).unwrap();
    let s = c
        .wait_voters(via, &vp, 3, std::slice::from_ref(&victim_id))
        .await;
    assert!(
        s.state_bytes >= 64 << 20,
        "the state is there: {} bytes",
        s.state_bytes
    );
    let states = converged(&c, &vp, &s.voters).await;
    assert_identical(&states);
    // the new member serves the same data
    assert_eq!(c.ask(via, &vp, json!("checksum")).await, checksum);
    // The leader that replaced it checkpointed the 64 MiB state to send it,
    // and status shows that pause (a survivor's: one of them led).
    let mut paused = Vec::new();
    for v in before.voters.iter().filter(|v| **v != victim_id) {
        let i = c.index_of(v).await.unwrap();
        let t = c.vp_status(i, &vp).await.unwrap().timings.checkpoint;
        assert!(t.p50_us <= t.max_us, "{v}: {t:?}");
        paused.push((v.clone(), t));
    }
    assert!(
        paused.iter().any(|(_, t)| t.samples >= 1 && t.max_us > 0),
        "no survivor timed a checkpoint: {paused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_killed_while_catching_up_is_given_up_and_leaves_after_restart() {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start("vp-learner-killed", 5).await;
    let mut ids = Vec::new();
    for h in &c.hosts {
        ids.push(h.status().await.unwrap().host_id);
    }
    let (vp, checksum) = spawn_holding_64_mib(&c, 3).await;
    let s = c.wait_voters(0, &vp, 3, &[]).await;
    let leader = c.index_of(s.leader.as_ref().unwrap()).await.unwrap();
    let victim = (0..5)
        .find(|&i| i != leader && s.voters.contains(&ids[i]))
        .unwrap();
    let copies: Vec<std::path::PathBuf> = c
        .hosts
        .iter()
        .map(|h| h.data_dir.join("vps").join(&vp))
        .collect();
    let copy_on = |i: usize| copies[i].clone();
    c.hosts[victim].kill();
    // The leader deploys a replacement on one of the two other hosts: that
    // host is killed as soon as its copy exists, while the 64 MiB move.
    let spares: Vec<usize> = (0..5).filter(|i| !s.voters.contains(&ids[*i])).collect();
    let learner = wait_for(Duration::from_secs(30), || {
        spares.iter().copied().find(|&i| copy_on(i).exists())
    })
    .await
    .expect("a replacement was deployed");
    c.hosts[learner].kill();
    // The leader gives it up and replaces the dead member by the last host.
    let other = spares.iter().copied().find(|&i| i != learner).unwrap();
    let s = c
        .wait_voters(leader, &vp, 3, &[ids[victim].clone(), ids[learner].clone()])
        .await;
    assert!(s.voters.contains(&ids[other]), "{:?}", s.voters);
    // Restarted, the given-up copy hears from no member and leaves (or, had
    // it caught up before the kill, learns it was replaced): its directory
    // goes, and the host is a member of nothing.
    c.restart(learner).await;
    let left = wait_for(Duration::from_secs(60), || {
        (!copy_on(learner).exists()).then_some(())
    })
    .await;
    assert!(
        left.is_some(),
        "{} is still there",
        copy_on(learner).display()
    );
    let status = c.hosts[learner].status().await.unwrap();
    assert!(
        status.virtual_peers.iter().all(|v| v.vp != vp),
        "still listed: {:?}",
        status
            .virtual_peers
            .iter()
            .map(|v| &v.vp)
            .collect::<Vec<_>>()
    );
    let states = converged(&c, &vp, &s.voters).await;
    assert_identical(&states);
    assert_eq!(c.ask(learner, &vp, json!("checksum")).await, checksum);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_host_hands_over_its_members_while_a_client_sends() {
    let _serial = SERIAL.lock().await;
    let c = Arc::new(Cluster::start("vp-drain", 5).await);
    let vp = c.spawn(0, vp_apps::COUNTER, "").await.unwrap();
    let mut sum = 0;
    for i in 1..=10 {
        sum += i;
        assert_eq!(
            c.ask(i as usize % 5, &vp, json!({"add": i})).await,
            json!(sum)
        );
    }
    // The leader's host leaves: the hardest case (it replaces itself).
    let s = c.wait_voters(0, &vp, 3, &[]).await;
    let leaving_id = s.leader.clone().unwrap();
    let leaving = c.index_of(&leaving_id).await.unwrap();
    let via = (0..5).find(|&i| i != leaving).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (c, vp, stop) = (c.clone(), vp.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut acked, mut last) = (0i64, Value::Null);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(answer) = c.send(via, &vp, json!({"add": 1})).await
                    && let Some(total) = answer.reply
                {
                    acked += 1;
                    last = total;
                }
            }
            (acked, last)
        })
    };
    let dir = c.hosts[leaving].data_dir.to_string_lossy().into_owned();
    let out = tokio::task::spawn_blocking(move || common::run(&["--data-dir", &dir, "drain"], ""))
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("member of no virtual peer"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, last) = client.await.unwrap();
    assert!(acked > 0, "the client got answers while the host left");
    let s = c
        .wait_voters(via, &vp, 3, std::slice::from_ref(&leaving_id))
        .await;
    let status = c.hosts[leaving].status().await.unwrap();
    assert!(status.draining);
    assert!(
        status.virtual_peers.is_empty(),
        "{:?}",
        status.virtual_peers
    );
    let copy = c.hosts[leaving].data_dir.join("vps").join(&vp);
    let gone = wait_for(Duration::from_secs(10), || (!copy.exists()).then_some(())).await;
    assert!(gone.is_some(), "{} is still there", copy.display());
    // Nothing lost, nothing applied twice.
    let total = c.ask(via, &vp, json!("get")).await;
    assert_eq!(total, json!(sum + acked), "last reply seen: {last}");
    let states = converged(&c, &vp, &s.voters).await;
    assert_identical(&states);

    // The sole member of a one-member virtual peer leaves too: its state moves.
    let solo = c
        .spawn_with(via, vp_apps::COUNTER, "members=1")
        .await
        .unwrap();
    assert_eq!(c.ask(via, &solo, json!({"add": 7})).await, json!(7));
    let s = c.wait_voters(via, &solo, 1, &[]).await;
    let solo_host = s.voters[0].clone();
    assert_ne!(solo_host, leaving_id, "a leaving host took a member");
    let solo_index = c.index_of(&solo_host).await.unwrap();
    let dir = c.hosts[solo_index].data_dir.to_string_lossy().into_owned();
    let out = tokio::task::spawn_blocking(move || {
        common::run(&["--data-dir", &dir, "drain", "--timeout", "60"], "")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = c
        .wait_voters(via, &solo, 1, std::slice::from_ref(&solo_host))
        .await;
    assert_ne!(s.voters[0], leaving_id);
    assert_eq!(c.ask(via, &solo, json!("get")).await, json!(7));

    // Leaving lasts across a restart (SIGKILL, then the same data directory)...
    let mut c = Arc::into_inner(c).expect("the client task ended");
    c.restart(leaving).await;
    assert!(c.hosts[leaving].status().await.unwrap().draining);
    let solo_dir = c.hosts[solo_index].data_dir.to_string_lossy().into_owned();
    let out = common::run(&["--data-dir", &solo_dir, "drain", "--cancel"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!c.hosts[solo_index].status().await.unwrap().draining);
    // ...so a deployment needing every host finds one short,
    let err = c
        .spawn_with(via, vp_apps::COUNTER, "members=5")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("found only 4"), "{err:#}");
    // until the host stays after all.
    let dir = c.hosts[leaving].data_dir.to_string_lossy().into_owned();
    let out = common::run(&["--data-dir", &dir, "drain", "--cancel"], "");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("staying"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!c.hosts[leaving].status().await.unwrap().draining);
    assert!(!c.hosts[leaving].data_dir.join("draining").exists());
    let all = c
        .spawn_with(via, vp_apps::COUNTER, "members=5")
        .await
        .unwrap();
    let s = c.wait_voters(via, &all, 5, &[]).await;
    assert!(s.voters.contains(&leaving_id));
}

/// Two spawns at once want the same hosts, each of which has room for one
/// member: a host takes one (it checks its room again once the module is
/// compiled), refuses the other, and the refused spawn places again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_spawns_racing_for_the_last_room_both_land() {
    let _serial = SERIAL.lock().await;
    let one: &[&str] = &["--memberships-max", "1"];
    let c = Arc::new(Cluster::start_with("vp-race", &[one, one, one]).await);
    let spawn = |via: usize, members: &'static str| {
        let c = c.clone();
        tokio::spawn(async move {
            let mut said = Vec::new();
            let vp = vp_host::local::LocalCluster::spawn(&c, via, vp_apps::COUNTER, members, |e| {
                said.push(format!("{e:?}"))
            })
            .await;
            (vp, said)
        })
    };
    let (a, b) = (spawn(0, "members=2"), spawn(1, "members=1"));
    let ((a, said_a), (b, said_b)) = (a.await.unwrap(), b.await.unwrap());
    let (a, b) = (
        a.unwrap_or_else(|e| panic!("{e:#}; {said_a:?}")),
        b.unwrap_or_else(|e| panic!("{e:#}; {said_b:?}")),
    );
    let sa = c.wait_voters(2, &a, 2, &[]).await;
    let sb = c.wait_voters(2, &b, 1, &[]).await;
    let mut hosts: Vec<&String> = sa.voters.iter().chain(&sb.voters).collect();
    hosts.sort();
    hosts.dedup();
    assert_eq!(hosts.len(), 3, "a host took two members: {sa:?} {sb:?}");
    for (i, h) in c.hosts.iter().enumerate() {
        let n = h.status().await.unwrap().virtual_peers.len();
        assert_eq!(n, 1, "host {i} runs {n} members");
    }
    assert_eq!(c.ask(0, &a, json!({"add": 2})).await, json!(2));
    assert_eq!(c.ask(1, &b, json!({"add": 3})).await, json!(3));
    let replaced = said_a
        .iter()
        .chain(&said_b)
        .any(|l| l.contains("placing again"));
    eprintln!("placed again: {replaced}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_survives_the_callee_leader_being_killed() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start("vp-call-kill", 6).await;
    let a = c.spawn(0, vp_apps::CHAT, "").await.unwrap();
    let b = c.spawn(1, vp_apps::CHAT, "").await.unwrap();
    c.ask(2, &b, json!({"post": {"from": "bob", "text": "before"}}))
        .await;
    let sb = c.wait_voters(2, &b, 3, &[]).await;
    let sa = c.wait_voters(2, &a, 3, &[]).await;
    let b_leader = sb.leader.clone().unwrap();
    // a host that is neither b's leader nor one of a's voters sends the call
    let mut via = 0;
    for i in 0..6 {
        let id = c.hosts[i].status().await.unwrap().host_id;
        if id != b_leader && !sa.voters.contains(&id) {
            via = i;
            break;
        }
    }
    let victim = c.index_of(&b_leader).await.unwrap();
    assert_ne!(via, victim);
    let c = Arc::new(c);
    let caller = {
        let (c, a, b) = (c.clone(), a.clone(), b.clone());
        tokio::spawn(async move {
            c.send(via, &a, json!({"ask": {"room": b, "last": 5}}))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    c.hosts[victim].kill();
    let answer = caller.await.unwrap().expect("the call completes");
    let posts = answer
        .reply
        .unwrap_or_else(|| panic!("error reply: {:?}", answer.error));
    assert_eq!(posts[0]["text"], "before");
    // the callee has a new leader and replaced the dead one
    let sb = c.wait_voters(via, &b, 3, &[b_leader]).await;
    let states = converged(&c, &b, &sb.voters).await;
    assert_identical(&states);
}

/// The README's main command, end to end: its summary reports the replacement
/// and a counter equal to the acknowledged adds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_replaces_a_member_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = common::scratch_dir("vp-demo");
    let out = common::vp_host()
        .args(["demo", "--json", "--kill-leader", "--dir"])
        .arg(dir.join("cluster"))
        .output()
        .expect("vp-host demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("noticed"),
        "the demo narrates the leader noticing: {stdout}"
    );
    let summary: Value =
        serde_json::from_str(stdout.lines().last().expect("a summary line")).expect("JSON summary");
    assert_eq!(summary["final_count"], summary["acknowledged_adds"]);
    assert!(summary["acknowledged_adds"].as_u64().unwrap() >= 20);
    assert_eq!(summary["killed_was_leader"], true);
    assert_ne!(summary["replacement"], summary["killed"]);
    assert_eq!(summary["digests_equal"], true);
    assert!(
        !dir.join("cluster").exists(),
        "the demo removes its directory unless --keep"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_keeps_to_what_each_host_lends() {
    let _serial = SERIAL.lock().await;
    // Limits out of range or unreadable are refused before the host starts.
    for args in [
        &["join", "--memberships-max", "5000"][..],
        &["join", "--guest-memory-max", "lots"][..],
    ] {
        let out = common::run(args, "");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(args[2]) && err.contains(args[1]), "{err}");
    }

    // Three hosts lend room for two members and 300 MiB of guest memory
    // each; the fourth runs no app.
    let lender: &[&str] = &["--memberships-max", "2", "--guest-memory-max", "300M"];
    let mut c = Cluster::start_with(
        "vp-room",
        &[lender, lender, lender, &["--memberships-max", "0"]],
    )
    .await;
    let mut lenders: Vec<String> = c.hosts[..3].iter().map(|h| h.host_id.clone()).collect();
    lenders.sort();
    let members = |s: &vp_host::vp::VpStatus| {
        let mut v = s.voters.clone();
        v.sort();
        v
    };
    const MIB: u64 = 1 << 20;
    // Deployed through the host without room: it places, it does not host.
    let a = c.spawn(3, vp_apps::COUNTER, "").await.unwrap(); // 256 MiB
    assert_eq!(members(&c.wait_voters(3, &a, 3, &[]).await), lenders);
    assert_eq!(c.ask(3, &a, json!({"add": 2})).await, json!(2));

    // 64 MiB more fits nowhere (44 left on each lender), and the spawn says why.
    let e = c
        .spawn(0, vp_apps::COUNTER, &format!("&memory_max={}", 64 * MIB))
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("room"), "{e:#}");
    // 32 MiB does.
    let b = c
        .spawn(0, vp_apps::COUNTER, &format!("&memory_max={}", 32 * MIB))
        .await
        .unwrap();
    assert_eq!(members(&c.wait_voters(0, &b, 3, &[]).await), lenders);
    // Now every lender runs two members: 1 MiB more finds no room either.
    let e = c
        .spawn(0, vp_apps::COUNTER, &format!("&memory_max={}", MIB))
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("room"), "{e:#}");

    let lent = c.hosts[0].status().await.unwrap();
    assert_eq!(
        (lent.memberships_max, lent.virtual_peers.len()),
        (2, 2),
        "a lender"
    );
    assert_eq!(
        (lent.guest_memory_committed, lent.guest_memory_max),
        (288 * MIB, 300 * MIB)
    );
    let relay = c.hosts[3].status().await.unwrap();
    assert_eq!((relay.memberships_max, relay.virtual_peers.len()), (0, 0));
    assert_eq!(relay.guest_memory_committed, 0);
    assert_eq!(
        c.ask(0, &a, json!("get")).await,
        json!(2),
        "the first app runs on"
    );

    // A lender restarted lending less hands the excess over. Host 0 comes
    // back with room for one member (it runs two); no host has room to
    // replace it while it is down. Then the fourth lends room for one.
    let shrunk = c.hosts[0].host_id.clone();
    let newcomer = c.hosts[3].host_id.clone();
    c.restart_with(0, &["--memberships-max", "1", "--guest-memory-max", "300M"])
        .await;
    let back = c.hosts[0].status().await.unwrap();
    assert_eq!((back.memberships_max, back.virtual_peers.len()), (1, 2));
    c.restart_with(3, &["--memberships-max", "1"]).await;
    let (sa, sb) = vp_host::local::poll(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let sa = c.vp_status(1, &a).await.ok()?;
            let sb = c.vp_status(1, &b).await.ok()?;
            let on_shrunk = [&sa, &sb]
                .iter()
                .filter(|s| s.voters.contains(&shrunk))
                .count();
            let left = c.hosts[0].status().await.ok()?.virtual_peers.len();
            let settled =
                on_shrunk == 1 && left == 1 && sa.voters.len() == 3 && sb.voters.len() == 3;
            settled.then_some((sa, sb))
        },
    )
    .await
    .expect("host 0 kept both members, or a virtual peer lost one");
    assert!(
        sa.voters.contains(&newcomer) != sb.voters.contains(&newcomer),
        "the fourth host took the handed-over member: {sa:?} {sb:?}"
    );
    assert!(
        c.hosts[0]
            .log()
            .contains("more members than --memberships-max")
    );
    // While no host had room the leader asked again and again; it encoded the
    // guest for a checkpoint once, not at each attempt (consensus refuses a
    // second checkpoint of the same slot as stale).
    for h in &c.hosts {
        assert!(
            !h.log().contains("checkpoint refused"),
            "{}: a checkpoint was encoded for nothing",
            h.name
        );
    }
    assert_eq!(c.ask(1, &a, json!("get")).await, json!(2));
    assert_eq!(c.ask(1, &b, json!({"add": 5})).await, json!(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_removes_every_member_even_one_that_was_down() {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start("vp-destroy", 4).await;
    // No replacement while a member is down: it must come back to a
    // virtual peer that no longer exists.
    let vp = c
        .spawn(0, vp_apps::COUNTER, "&name=doomed&replace_after_ms=600000")
        .await
        .unwrap();
    assert_eq!(c.ask(0, &vp, json!({"add": 7})).await, json!(7));
    let s = c.wait_voters(0, &vp, 3, &[]).await;
    let mut members = Vec::new();
    for v in &s.voters {
        members.push(c.index_of(v).await.unwrap());
    }
    // The host that runs no member has talked to it (a client there).
    let outsider = (0..c.hosts.len())
        .find(|i| !members.contains(i))
        .expect("a host that is not a member");
    assert_eq!(c.ask(outsider, &vp, json!("get")).await, json!(7));
    let leader = s.leader.clone().expect("a leader");
    let away = *members
        .iter()
        .find(|&&m| m != 0 && c.hosts[m].host_id != leader)
        .expect("a follower other than host 0");
    c.hosts[away].kill();
    let data_dir = c.hosts[0].data_dir.to_str().unwrap().to_string();
    let dirs: Vec<std::path::PathBuf> = c.hosts.iter().map(|h| h.data_dir.clone()).collect();
    let member_dir = |i: usize| dirs[i].join("vps").join(&vp);
    let tombstone = |i: usize| dirs[i].join("destroyed").join(&vp);

    // Not without confirmation (no terminal here), and nothing happens.
    let out = common::run(&["--data-dir", &data_dir, "destroy", "doomed"], "");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(c.ask(0, &vp, json!({"add": 1})).await, json!(8));

    // Destroyed by name while one member is down (two of three decide it).
    let out = common::run(&["--data-dir", &data_dir, "destroy", "doomed", "--yes"], "");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains(&vp),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for &m in members.iter().filter(|&&m| m != away) {
        let gone = wait_for(Duration::from_secs(15), || {
            (!member_dir(m).exists() && tombstone(m).exists()).then_some(())
        })
        .await;
        assert!(
            gone.is_some(),
            "host {m}: member dir {} exists: {}, tombstone exists: {}",
            member_dir(m).display(),
            member_dir(m).exists(),
            tombstone(m).exists()
        );
        let st = c.hosts[m].status().await.unwrap();
        assert!(st.virtual_peers.is_empty(), "host {m} still runs a member");
    }
    // Messages and status now say so, through a host that took part, and
    // through the client's host: a former member answers its request or
    // locate with `Destroyed`, naming what it answers. (A host that never
    // talked to it finds no member, as for an id never used.)
    for via in members
        .iter()
        .copied()
        .chain([0, outsider])
        .filter(|&i| i != away)
    {
        let sent = c.send(via, &vp, json!({"add": 1})).await;
        let text = format!("{sent:?}");
        assert!(text.contains("destroyed"), "via host {via}: {text}");
    }
    let st = c.vp_status(0, &vp).await;
    assert!(
        format!("{st:?}").contains("destroyed"),
        "status of a destroyed virtual peer: {st:?}"
    );
    // Again: it is already gone, and that is not an error.
    let out = common::run(&["--data-dir", &data_dir, "destroy", &vp, "--yes"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The member that was down comes back from its disk, asks the others,
    // learns the virtual peer was destroyed, and leaves too.
    assert!(member_dir(away).exists());
    c.restart(away).await;
    let gone = wait_for(Duration::from_secs(30), || {
        (!member_dir(away).exists() && tombstone(away).exists()).then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "the returning member is still there: {}",
        c.hosts[away].log()
    );
    // The hosts go on running apps.
    let next = c.spawn(0, vp_apps::COUNTER, "").await.unwrap();
    assert_ne!(next, vp);
    assert_eq!(c.ask(away, &next, json!({"add": 2})).await, json!(2));
}
