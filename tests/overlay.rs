//! The overlay on the real network: `vp-host join` processes on loopback,
//! checked through their control APIs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{Host, scratch_dir, start_host, wait_for_async};
use vp_host::node::api::{
    DeliveryRecord, Done, HostStatus, KeyRequest, MulticastAnswer, MulticastRequest, SearchAnswer,
    SearchRequest,
};

const HOSTS: usize = 12;

async fn start_cluster(name: &str, n: usize) -> Vec<Host> {
    let dir = scratch_dir(name);
    let first = start_host(&dir, "h00", None, &[]).await;
    let bootstrap = first.listen.clone();
    let mut hosts = vec![first];
    for i in 1..n {
        hosts.push(start_host(&dir, &format!("h{i:02}"), Some(&bootstrap), &[]).await);
    }
    hosts
}

async fn statuses(hosts: &[Host]) -> Vec<HostStatus> {
    let mut out = Vec::new();
    for h in hosts.iter().filter(|h| h.is_running()) {
        out.push(
            h.status()
                .await
                .unwrap_or_else(|e| panic!("{} status: {e:#}", h.name)),
        );
    }
    out
}

/// Every level's lists are consistent and sorted: a right neighbour's left
/// neighbour is the key itself, neighbours are on the right side, and level 0
/// chains every key in order. Returns the level-0 order, or why not.
fn check_consistent(all: &[HostStatus]) -> Result<Vec<String>, String> {
    let mut nodes = BTreeMap::new();
    for s in all {
        for k in &s.overlay.keys {
            if !k.joined {
                return Err(format!("{} is still joining", k.key));
            }
            nodes.insert(k.key.clone(), k);
        }
    }
    for (key, node) in &nodes {
        for (level, [left, right]) in node.levels.iter().enumerate() {
            if let Some(r) = right {
                if r.key <= *key {
                    return Err(format!(
                        "{key}: right neighbour {} at level {level} is not greater",
                        r.key
                    ));
                }
                let back = nodes.get(&r.key).ok_or_else(|| {
                    format!(
                        "{key}: right neighbour {} at level {level} is not a live key",
                        r.key
                    )
                })?;
                let back_left = back
                    .levels
                    .get(level)
                    .and_then(|l| l[0].as_ref())
                    .map(|n| n.key.clone());
                if back_left.as_deref() != Some(key.as_str()) {
                    return Err(format!(
                        "{key} -> {} at level {level}, but its left is {back_left:?}",
                        r.key
                    ));
                }
            }
            if let Some(l) = left
                && (l.key >= *key || !nodes.contains_key(&l.key))
            {
                return Err(format!(
                    "{key}: bad left neighbour {} at level {level}",
                    l.key
                ));
            }
        }
    }
    // level 0 is one sorted chain through every key
    let mut order = Vec::new();
    let mut at = nodes.keys().next().cloned();
    while let Some(key) = at {
        order.push(key.clone());
        at = nodes[&key]
            .levels
            .first()
            .and_then(|l| l[1].as_ref())
            .map(|n| n.key.clone());
        if order.len() > nodes.len() {
            return Err("level 0 has a cycle".into());
        }
    }
    if order.len() != nodes.len() {
        return Err(format!(
            "level 0 chains {} of {} keys",
            order.len(),
            nodes.len()
        ));
    }
    Ok(order)
}

async fn wait_consistent(hosts: &[Host], what: &str) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        match check_consistent(&statuses(hosts).await) {
            Ok(order) => return order,
            Err(why) if tokio::time::Instant::now() > deadline => {
                panic!("overlay not consistent ({what}): {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn deliveries_of(hosts: &[Host], payload: &str) -> BTreeMap<String, usize> {
    let mut reached = BTreeMap::new();
    for h in hosts.iter().filter(|h| h.is_running()) {
        let list: Vec<DeliveryRecord> = h
            .api
            .get("/v1/overlay/deliveries")
            .await
            .unwrap_or_default();
        for d in list.into_iter().filter(|d| d.payload == payload) {
            *reached.entry(d.key).or_insert(0) += 1;
        }
    }
    reached
}

async fn search(host: &Host, key: &str) -> anyhow::Result<SearchAnswer> {
    host.api
        .post(
            "/v1/overlay/search",
            &SearchRequest {
                key: key.to_string(),
            },
        )
        .await
}

/// Multicast over `prefix` from `from`; return the keys it reached (with how
/// many times each), once every expected key reported it.
async fn multicast(
    hosts: &[Host],
    from: &Host,
    prefix: &str,
    expected: &BTreeSet<String>,
) -> BTreeMap<String, usize> {
    let payload = format!("m-{}", rand_suffix());
    let req = MulticastRequest {
        prefix: Some(prefix.to_string()),
        lo: None,
        hi: None,
        payload: payload.clone(),
    };
    let _: MulticastAnswer = from
        .api
        .post("/v1/overlay/multicast", &req)
        .await
        .expect("multicast starts");
    let _ = wait_for_async(Duration::from_secs(30), || async {
        let reached = deliveries_of(hosts, &payload).await;
        expected
            .iter()
            .all(|k| reached.contains_key(k))
            .then_some(())
    })
    .await;
    // give stray duplicates or strays outside the range a moment to show up
    tokio::time::sleep(Duration::from_millis(300)).await;
    deliveries_of(hosts, &payload).await
}

fn rand_suffix() -> u64 {
    rand::random()
}

async fn check_operations(hosts: &[Host], group: &BTreeSet<String>) {
    let all = statuses(hosts).await;
    let owners: Vec<(String, String)> = all
        .iter()
        .map(|s| (format!("h/{}", s.host_id), s.host_id.clone()))
        .collect();
    // every host finds every host key's owner
    for h in hosts.iter().filter(|h| h.is_running()) {
        for (key, owner) in &owners {
            let answer = search(h, key)
                .await
                .unwrap_or_else(|e| panic!("{} searching {key}: {e:#}", h.name));
            assert!(
                answer.exact,
                "{} searching {key} found {} instead",
                h.name, answer.found.key
            );
            assert_eq!(&answer.found.host_id, owner);
        }
    }
    // a multicast reaches exactly the group, once per key
    let from = hosts.iter().rfind(|h| h.is_running()).expect("a live host");
    let reached = multicast(hosts, from, "v/t/", group).await;
    let keys: BTreeSet<String> = reached.keys().cloned().collect();
    assert_eq!(&keys, group, "multicast reached the wrong keys");
    assert!(
        reached.values().all(|&n| n == 1),
        "a key got the multicast twice: {reached:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_hosts_form_one_overlay_and_survive_two_kills() {
    let hosts = start_cluster("overlay-12", HOSTS).await;
    // a virtual-peer-like group: extra keys on four hosts
    let mut group = BTreeSet::new();
    for (i, h) in hosts.iter().enumerate().filter(|(i, _)| i % 3 == 1) {
        let key = format!("v/t/{i:02}");
        let _: Done = h
            .api
            .post("/v1/overlay/keys", &KeyRequest { key: key.clone() })
            .await
            .expect("key inserted");
        group.insert(key);
    }
    let outsider = "v/u/00".to_string(); // next to the group, must not get its multicast
    let _: Done = hosts[0]
        .api
        .post("/v1/overlay/keys", &KeyRequest { key: outsider })
        .await
        .expect("key inserted");

    let order = wait_consistent(&hosts, "after joins").await;
    assert_eq!(order.len(), HOSTS + group.len() + 1);
    check_operations(&hosts, &group).await;

    // SIGKILL two hosts, one of them holding a group key
    let victims = [4usize, 9];
    for &v in &victims {
        hosts[v].kill();
        group.remove(&format!("v/t/{v:02}"));
    }
    let order = wait_consistent(&hosts, "after two kills").await;
    assert_eq!(
        order.len(),
        HOSTS - 2 + group.len() + 1,
        "dead hosts' keys are gone: {order:?}"
    );
    check_operations(&hosts, &group).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_the_wrong_network_key_cannot_join() {
    let dir = scratch_dir("overlay-private");
    let (key, other) = (dir.join("net.key"), dir.join("other.key"));
    for k in [&key, &other] {
        let out = common::run(&["network-key", k.to_str().unwrap()], "");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let private = ["--network-key", key.to_str().unwrap()];
    let first = start_host(&dir, "p0", None, &private).await;
    let mut hosts = vec![first];
    let bootstrap = hosts[0].listen.clone();
    for i in 1..3 {
        hosts.push(start_host(&dir, &format!("p{i}"), Some(&bootstrap), &private).await);
    }
    let stranger = start_host(
        &dir,
        "stranger",
        Some(&bootstrap),
        &["--network-key", other.to_str().unwrap()],
    )
    .await;
    let open = start_host(&dir, "open", Some(&bootstrap), &[]).await;

    // the members form their overlay, unaffected
    let order = wait_consistent(&hosts, "private members").await;
    assert_eq!(order.len(), 3);
    // the others never join, and say why in their logs
    for outsider in [&stranger, &open] {
        let said = common::wait_for(Duration::from_secs(60), || {
            outsider.log().contains("--network-key").then_some(())
        })
        .await;
        assert!(
            said.is_some(),
            "{} log does not explain: {}",
            outsider.name,
            outsider.log()
        );
        let s = outsider.status().await.unwrap();
        assert!(
            !s.overlay.joined,
            "{} joined a private network",
            outsider.name
        );
        assert!(
            s.connected_peers.is_empty(),
            "{} is connected: {:?}",
            outsider.name,
            s.connected_peers
        );
    }
    let s = hosts[0].status().await.unwrap();
    assert!(s.private_network.is_some());
    assert!(s.connected_peers.len() >= 2);
}
