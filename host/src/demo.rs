//! `vp-host demo`: a virtual peer surviving the loss of a member, on one machine.
//!
//! Starts hosts as child processes on loopback (`crate::local`), spawns the
//! counter app, sends it messages, SIGKILLs a member while a client keeps
//! sending, and narrates what the virtual peer's status shows: the leader
//! noticing the silent member, the replacement it chose, the state moving to
//! it, the virtual peer back at full strength with identical state digests.
//! Then a summary, and every host is stopped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;

use crate::local::{DEFAULT_LOG_FILTER, LocalCluster};
use crate::node::vps::SpawnEvent;
use crate::vp::VpStatus;

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub hosts: usize,
    pub members: usize,
    /// Messages sent before and after the crash.
    pub messages: u64,
    /// Kill the leader instead of a follower.
    pub kill_leader: bool,
    /// Where the hosts keep their data and logs (default: a fresh temporary directory).
    pub dir: Option<PathBuf>,
    /// Keep the directory afterwards.
    pub keep: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            hosts: 5,
            members: 3,
            messages: 10,
            kill_leader: false,
            dir: None,
            keep: false,
        }
    }
}

/// What the demo measured (printed as the summary).
#[derive(Debug, serde::Serialize)]
pub struct DemoSummary {
    pub vp: String,
    pub killed: String,
    pub killed_was_leader: bool,
    pub replacement: String,
    /// From the SIGKILL until the leader began replacing the member.
    pub noticed_ms: f64,
    /// Until the replacement was a learner in the configuration.
    pub learner_ms: f64,
    /// Until the virtual peer had all its members again, the new one voting.
    pub restored_ms: f64,
    /// Messages the client sent while the member was down and being replaced,
    /// and the slowest of their answers.
    pub sent_during_recovery: u64,
    pub slowest_reply_during_recovery_ms: f64,
    pub final_count: u64,
    pub acknowledged_adds: u64,
    pub digests_equal: bool,
}

struct Narrator {
    start: Instant,
}

impl Narrator {
    fn say(&self, line: impl AsRef<str>) {
        println!(
            "[{:6.2} s] {}",
            self.start.elapsed().as_secs_f64(),
            line.as_ref()
        );
    }
    fn detail(&self, line: impl AsRef<str>) {
        println!("            {}", line.as_ref());
    }
}

/// Run the demo; prints as it goes.
pub async fn run(options: DemoOptions) -> Result<DemoSummary> {
    ensure!(
        options.members >= 2 && options.members <= 7,
        "--members must be 2 to 7 (a replacement needs a surviving quorum)"
    );
    ensure!(
        options.hosts > options.members,
        "--hosts must exceed --members, so a spare host can take the dead member's place"
    );
    let exe = std::env::current_exe().context("cannot find the vp-host executable")?;
    let dir = match &options.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("vp-demo-{}", std::process::id())),
    };
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "{} is not empty; give an empty or new directory with --dir",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let n = Narrator {
        start: Instant::now(),
    };
    println!(
        "vp demo: {} hosts on loopback, the counter app as a virtual peer of {} members",
        options.hosts, options.members
    );
    println!(
        "          data and logs of every host: {}{}",
        dir.display(),
        if options.keep {
            ""
        } else {
            " (removed at the end; --keep keeps it)"
        }
    );
    let result = run_in(&options, &exe, &dir, &n).await;
    if !options.keep && result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else if result.is_err() {
        eprintln!("the hosts' logs are kept in {}", dir.display());
    }
    result
}

async fn run_in(
    options: &DemoOptions,
    exe: &std::path::Path,
    dir: &std::path::Path,
    n: &Narrator,
) -> Result<DemoSummary> {
    n.say(format!(
        "starting {} `vp-host join` processes, each bootstrapped through h0",
        options.hosts
    ));
    let cluster = LocalCluster::start(exe, dir, options.hosts, DEFAULT_LOG_FILTER).await?;
    let names: HashMap<String, String> = cluster
        .hosts
        .iter()
        .map(|h| (h.host_id.clone(), h.name.clone()))
        .collect();
    let name = |id: &str| names.get(id).cloned().unwrap_or_else(|| id.to_string());
    let list = |ids: &[String]| ids.iter().map(|i| name(i)).collect::<Vec<_>>().join(", ");
    for h in &cluster.hosts {
        n.detail(format!(
            "{}: host id {}, pid {}, {}",
            h.name,
            h.host_id,
            h.pid().unwrap_or(0),
            h.listen
        ));
    }
    n.say("every host has joined the skip-graph overlay");

    n.say(format!(
        "spawning the counter app with {} members (through h0)",
        options.members
    ));
    let query = format!("members={}&name=demo-counter", options.members);
    let vp = cluster
        .spawn(0, vp_apps::COUNTER, &query, |event| {
            if let SpawnEvent::Progress { message } = event {
                n.detail(message);
            }
        })
        .await?;
    let status = cluster
        .wait_voters(0, &vp, options.members, &[], Duration::from_secs(30))
        .await?;
    n.say(format!(
        "virtual peer {vp}: members {}; leader {}",
        list(&status.voters),
        name(status.leader.as_deref().unwrap_or("-"))
    ));

    // Messages before the crash, each through a different host: any host routes.
    let mut acknowledged = 0u64;
    let mut replies = Vec::new();
    for i in 0..options.messages {
        let via = (i as usize) % cluster.hosts.len();
        let reply = cluster.ask(via, &vp, json!({ "add": 1 })).await?;
        acknowledged += 1;
        replies.push(reply.to_string());
    }
    n.say(format!(
        "sent {} × {{\"add\": 1}} through every host in turn; replies: {}",
        options.messages,
        replies.join(" ")
    ));

    // Pick the victim.
    let status = cluster.vp_status(0, &vp).await?;
    let leader = status.leader.clone().context("no leader")?;
    let victim = if options.kill_leader {
        leader.clone()
    } else {
        status
            .voters
            .iter()
            .find(|v| **v != leader)
            .cloned()
            .context("no follower")?
    };
    let victim_index = cluster.index_of(&victim).context("victim not running")?;
    // Observe through a host that is not a member, so the view survives any member's death.
    let observer = (0..cluster.hosts.len())
        .find(|&i| !status.voters.contains(&cluster.hosts[i].host_id))
        .unwrap_or(0);

    // A client keeps sending while the member is down and replaced.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let slowest_us = Arc::new(AtomicU64::new(0));
    let cluster = Arc::new(cluster);
    let client = {
        let (cluster, vp, stop, sent, slowest_us) = (
            cluster.clone(),
            vp.clone(),
            stop.clone(),
            sent.clone(),
            slowest_us.clone(),
        );
        tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match cluster.ask(observer, &vp, json!({ "add": 1 })).await {
                    Ok(_) => {
                        sent.fetch_add(1, Ordering::Relaxed);
                        slowest_us.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    }
                    Err(e) => errors.push(format!("{e:#}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            errors
        })
    };

    n.say(format!(
        "killing {} ({}, the {}) with SIGKILL, while a client on {} keeps sending {{\"add\": 1}}",
        name(&victim),
        victim,
        if victim == leader {
            "leader"
        } else {
            "follower"
        },
        cluster.hosts[observer].name
    ));
    let killed_at = Instant::now();
    cluster.hosts[victim_index].kill();
    let ms = |t: Instant| t.duration_since(killed_at).as_secs_f64() * 1000.0;

    let mut noticed = None;
    let mut learner = None;
    let mut replacement = None;
    let mut last_leader = Some(leader.clone());
    let restored: VpStatus = loop {
        ensure!(
            killed_at.elapsed() < Duration::from_secs(60),
            "the virtual peer did not recover within 60 s"
        );
        let Ok(s) = cluster.vp_status(observer, &vp).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if s.leader != last_leader && s.leader.is_some() {
            n.say(format!(
                "+{:.0} ms: {} leads now (epoch {})",
                ms(Instant::now()),
                name(s.leader.as_deref().unwrap_or("-")),
                s.epoch
            ));
            last_leader = s.leader.clone();
        }
        if noticed.is_none()
            && (s.replacing.as_deref() == Some(&victim) || !s.voters.contains(&victim))
        {
            noticed = Some(Instant::now());
            n.say(format!(
                "+{:.0} ms: leader {} noticed {} silent and is replacing it",
                ms(Instant::now()),
                name(s.leader.as_deref().unwrap_or("-")),
                name(&victim)
            ));
        }
        if learner.is_none()
            && let Some(new) = s.learners.first().cloned().or_else(|| {
                s.voters
                    .iter()
                    .find(|v| !status.voters.contains(v))
                    .cloned()
            })
        {
            learner = Some(Instant::now());
            n.say(format!(
                    "+{:.0} ms: replacement chosen through the overlay: {}; it joins as a learner and receives the guest snapshot",
                    ms(Instant::now()),
                    name(&new)
                ));
            replacement = Some(new);
        }
        if s.is_whole(options.members, std::slice::from_ref(&victim)) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let restored_at = Instant::now();
    let replacement = replacement.unwrap_or_else(|| {
        restored
            .voters
            .iter()
            .find(|v| !status.voters.contains(v))
            .cloned()
            .unwrap_or_default()
    });
    if let Some(i) = cluster.index_of(&replacement)
        && let Ok(mine) = cluster.vp_status(i, &vp).await
    {
        n.say(format!(
                "+{:.0} ms: the state moved: {} holds {} bytes of guest memory (snapshot at slot {}), applied below slot {}",
                ms(restored_at),
                name(&replacement),
                mine.state_bytes,
                mine.snapshot_slot,
                mine.applied_below
            ));
    }
    n.say(format!(
        "+{:.0} ms: back at {} members: {}; epoch {}; {} votes",
        ms(restored_at),
        options.members,
        list(&restored.voters),
        restored.epoch,
        name(&replacement)
    ));
    // Let the client run a little past recovery, then stop it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let errors = client.await.context("client task")?;
    for e in &errors {
        n.detail(format!("client error: {e}"));
    }
    let during = sent.load(Ordering::Relaxed);
    acknowledged += during;
    n.say(format!(
        "the client got {during} replies while the member was down and replaced (slowest {:.0} ms), {} errors",
        slowest_us.load(Ordering::Relaxed) as f64 / 1000.0,
        errors.len()
    ));

    for i in 0..options.messages {
        let via = (i as usize) % cluster.hosts.len();
        if cluster.hosts[via].is_running() {
            cluster.ask(via, &vp, json!({ "add": 1 })).await?;
            acknowledged += 1;
        }
    }
    let read = cluster
        .send(observer, &vp, json!("get"), true)
        .await?
        .reply
        .and_then(|v| v.as_u64())
        .context("the counter's read did not answer a number")?;
    n.say(format!(
        "sent {} more; the counter reads {read} (linearizable read); {acknowledged} adds were acknowledged",
        options.messages
    ));
    // Every member applied everything: equal digests once applied slots match.
    let digests = crate::local::poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let d = cluster.digests(&vp, &restored.voters).await.ok()?;
            d.windows(2).all(|w| w[0].1 == w[1].1).then_some(d)
        },
    )
    .await;
    let digests_equal = digests.is_some();
    match &digests {
        Some(d) => n.say(format!(
            "state digests of the {} members: {} (identical)",
            d.len(),
            d.iter()
                .map(|(h, dg)| format!("{} {}", name(h), &dg[..dg.len().min(12)]))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None => n.say("state digests differ between members"),
    }
    let summary = DemoSummary {
        vp: vp.clone(),
        killed: name(&victim),
        killed_was_leader: victim == leader,
        replacement: name(&replacement),
        noticed_ms: noticed.map_or(f64::NAN, ms),
        learner_ms: learner.map_or(f64::NAN, ms),
        restored_ms: ms(restored_at),
        sent_during_recovery: during,
        slowest_reply_during_recovery_ms: slowest_us.load(Ordering::Relaxed) as f64 / 1000.0,
        final_count: read,
        acknowledged_adds: acknowledged,
        digests_equal,
    };
    println!();
    println!("summary");
    println!(
        "  killed {} ({}); replaced by {}",
        summary.killed,
        if summary.killed_was_leader {
            "leader"
        } else {
            "follower"
        },
        summary.replacement
    );
    println!(
        "  noticed after {:.0} ms, replacement learning after {:.0} ms, voting after {:.0} ms",
        summary.noticed_ms, summary.learner_ms, summary.restored_ms
    );
    println!(
        "  {} messages answered during the recovery (slowest {:.0} ms)",
        summary.sent_during_recovery, summary.slowest_reply_during_recovery_ms
    );
    println!(
        "  counter {} = {} acknowledged adds: {}",
        summary.final_count,
        summary.acknowledged_adds,
        if summary.final_count == summary.acknowledged_adds {
            "nothing lost, nothing applied twice"
        } else {
            "MISMATCH"
        }
    );
    println!(
        "  member states {}",
        if digests_equal { "identical" } else { "DIFFER" }
    );
    n.say("stopping every host (SIGTERM: each leaves the overlay)");
    for h in &cluster.hosts {
        h.terminate();
    }
    ensure!(
        summary.final_count == summary.acknowledged_adds,
        "the counter reads {} but {} adds were acknowledged",
        summary.final_count,
        summary.acknowledged_adds
    );
    ensure!(digests_equal, "the members' state digests differ");
    Ok(summary)
}
