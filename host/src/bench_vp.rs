//! Benchmarks of whole virtual peers: `vp-host bench commit|failover|replace`.
//!
//! Each starts real `vp-host join` processes on loopback (`crate::local`,
//! durable storage in a temporary directory), drives them through their
//! control APIs as `vp-host send` does, and prints one JSON line. Crashes are
//! SIGKILLs. Clients are tasks in this process; each request is one HTTP call
//! to a host's API, which routes it to the leader.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use serde::Serialize;
use serde_json::json;

use crate::api::stream::SendStream;
use crate::local::LocalCluster;
use crate::node::api::SendRequest;

/// Where a benchmark's hosts keep their data: a fresh temporary directory,
/// removed afterwards unless the run fails.
fn bench_dir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("vp-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Remove a finished benchmark's directory, unless `VP_BENCH_KEEP` is set
/// (then print where the hosts' logs are).
fn finish(dir: PathBuf) {
    if std::env::var_os("VP_BENCH_KEEP").is_some() {
        eprintln!("hosts' data and logs kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

async fn cluster(name: &str, hosts: usize) -> Result<(LocalCluster, PathBuf)> {
    let dir = bench_dir(name)?;
    let exe = std::env::current_exe().context("cannot find the vp-host executable")?;
    // The hosts' log filter: VP_BENCH_LOG, else info.
    let filter = std::env::var("VP_BENCH_LOG").unwrap_or_else(|_| "info,libp2p=warn".into());
    let c = LocalCluster::start(&exe, &dir, hosts, &filter).await?;
    Ok((c, dir))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// A JSON message of exactly `bytes` bytes for the stress app (`{"note": ...}`).
fn note(bytes: usize) -> serde_json::Value {
    let overhead = r#"{"note":""}"#.len();
    json!({ "note": "x".repeat(bytes.saturating_sub(overhead)) })
}

#[derive(Debug, Serialize)]
pub struct CommitReport {
    pub bench: &'static str,
    pub members: usize,
    pub clients: usize,
    /// Send streams the clients share (0: one HTTP request per message).
    pub streams: usize,
    pub message_bytes: usize,
    pub seconds: f64,
    /// Closed loop, every client sending as fast as replies come.
    pub peak_msgs_per_s: f64,
    pub peak_p50_ms: f64,
    pub peak_p99_ms: f64,
    /// Messages per decided slot in the closed-loop phase (the leader's
    /// batching: one slot is one accept round and one fsync on each member).
    pub peak_msgs_per_slot: f64,
    /// CPU time of all four processes (3 hosts and the clients) per message
    /// in the closed-loop phase, and each one's share of a core (hosts in
    /// start order, leader first, then this process).
    pub peak_cpu_us_per_msg: f64,
    pub peak_cpu_percent: Vec<f64>,
    /// Medians of the members' own timings at the end of the closed-loop
    /// phase (each over its last 1,024 samples, `vp-host status`).
    pub peak_stages_us: Stages,
    /// Open loop at a quarter of the peak rate.
    pub quarter_msgs_per_s: f64,
    pub quarter_p50_ms: f64,
    pub quarter_p99_ms: f64,
    pub quarter_stages_us: Stages,
    /// Open loop at each rate asked for with `--rates` (empty without it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub at_rates: Vec<RatePoint>,
    pub errors: u64,
}

/// Where a message's time went, in µs (medians; see `MemberTimings`).
#[derive(Debug, Serialize)]
pub struct Stages {
    /// The leader's log write and sync.
    pub leader_log_write: u64,
    /// A follower's log write and sync.
    pub follower_log_write: u64,
    /// A slot, from its accept sent to decided on the leader.
    pub commit: u64,
    /// A request, from proposed to answered on the leader.
    pub request: u64,
}

impl Stages {
    async fn of(c: &LocalCluster, vp: &str, leader: usize) -> Result<Stages> {
        let follower = (0..c.hosts.len())
            .find(|&i| i != leader)
            .context("no follower")?;
        let l = c.vp_status(leader, vp).await?.timings;
        let f = c.vp_status(follower, vp).await?.timings;
        Ok(Stages {
            leader_log_write: l.log_write.p50_us,
            follower_log_write: f.log_write.p50_us,
            commit: l.commit.p50_us,
            request: l.request.p50_us,
        })
    }
}

/// Latency of the open-loop phase at one offered rate.
#[derive(Debug, Serialize)]
pub struct RatePoint {
    pub offered_msgs_per_s: f64,
    pub msgs_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Where the load goes: virtual peer `vp` through host `via`, over the send
/// `streams` if there are any (else one HTTP request per message).
struct Target<'a> {
    c: &'a Arc<LocalCluster>,
    via: usize,
    vp: &'a str,
    streams: &'a [SendStream],
}

/// Run `clients` clients against `vp` through host `via` for `seconds`.
/// Closed loop (`rate` None): every client sends as soon as its last reply
/// came. Open loop (`rate`: messages/s over all clients): a pacer thread
/// releases sends on a fixed schedule, any idle client takes the next one,
/// and latency counts from the scheduled time (a send that waits for a free
/// client counts the wait). The pacer sleeps on the OS clock, not on tokio's
/// timer, whose millisecond ticks would add up to a millisecond to each
/// figure, and with a timer slack of 1 ns (the default 50 µs lets a sleep
/// end that much later).
async fn load(
    t: &Target<'_>,
    clients: usize,
    bytes: usize,
    seconds: f64,
    rate: Option<f64>,
) -> (u64, Vec<f64>, u64) {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let schedule = rate.map(|r| {
        let (tx, rx) = tokio::sync::mpsc::channel::<Instant>(clients.max(1) * 4);
        let interval = Duration::from_secs_f64(1.0 / r);
        std::thread::spawn(move || {
            // Linux lets a sleeping thread wake up to its timer slack (50 µs
            // by default) late, and that lateness would count as latency.
            #[cfg(target_os = "linux")]
            // SAFETY: PR_SET_TIMERSLACK takes a value and touches no memory.
            unsafe {
                libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
            }
            let mut next = Instant::now();
            while next < end {
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if tx.blocking_send(next).is_err() {
                    return;
                }
                next += interval;
            }
        });
        Arc::new(tokio::sync::Mutex::new(rx))
    });
    let mut tasks = Vec::new();
    let (via, streams) = (t.via, t.streams);
    for i in 0..clients {
        let (c, vp, schedule) = (t.c.clone(), t.vp.to_string(), schedule.clone());
        let stream = (!streams.is_empty()).then(|| streams[i % streams.len()].clone());
        let msg = note(bytes);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            loop {
                let start = match &schedule {
                    Some(rx) => match rx.lock().await.recv().await {
                        Some(at) => at,
                        None => break,
                    },
                    None if Instant::now() < end => Instant::now(),
                    None => break,
                };
                let answer = match &stream {
                    Some(s) => s
                        .send(SendRequest {
                            msg: msg.clone(),
                            read: false,
                            timeout_ms: Some(60_000),
                        })
                        .await
                        .map_err(anyhow::Error::from),
                    None => c.send(via, &vp, msg.clone(), false).await,
                };
                match answer {
                    Ok(a) if a.error.is_none() => lat.push(start.elapsed().as_secs_f64() * 1e3),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((lat, e)) = t.await {
            all.extend(lat);
            errors += e;
        }
    }
    all.sort_by(f64::total_cmp);
    (all.len() as u64, all, errors)
}

/// User plus system CPU time of each process so far, in clock ticks (0 for
/// a process that is gone).
fn cpu_ticks(pids: &[u32]) -> Vec<u64> {
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the command name (which may hold spaces): utime
            // and stime are the 12th and 13th.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| f.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            field(11) + field(12)
        })
        .collect()
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// `vp-host bench commit`.
pub async fn commit(
    clients: usize,
    streams: usize,
    bytes: usize,
    seconds: f64,
    rates: &[f64],
) -> Result<CommitReport> {
    let (c, dir) = cluster("commit", 3).await?;
    let c = Arc::new(c);
    let vp = c.spawn(0, vp_apps::STRESS, "members=3", |_| {}).await?;
    let s = c
        .wait_voters(0, &vp, 3, &[], Duration::from_secs(30))
        .await?;
    let leader = s.leader.clone().context("no leader")?;
    let via = c.index_of(&leader).context("leader not running")?;
    let mut opened = Vec::new();
    for _ in 0..streams {
        opened.push(c.hosts[via].api.stream(&vp).await?);
    }
    let streams = opened;
    let target = Target {
        c: &c,
        via,
        vp: &vp,
        streams: &streams,
    };
    // Warm up (connections, JIT of nothing: the guest is compiled at deploy).
    let _ = load(&target, clients, bytes, 1.0, None).await;
    let slots_before = c.vp_status(via, &vp).await?.decided_below;
    let mut pids: Vec<u32> = std::iter::once(via)
        .chain((0..c.hosts.len()).filter(|&i| i != via))
        .filter_map(|i| c.hosts[i].pid())
        .collect();
    pids.push(std::process::id());
    let cpu_before = cpu_ticks(&pids);
    let (n, lat, e1) = load(&target, clients, bytes, seconds, None).await;
    let cpu_after = cpu_ticks(&pids);
    let slots = c.vp_status(via, &vp).await?.decided_below - slots_before;
    let peak_stages = Stages::of(&c, &vp, via).await?;
    let cpu_s: Vec<f64> = cpu_before
        .iter()
        .zip(&cpu_after)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / clock_ticks_per_s())
        .collect();
    let peak = n as f64 / seconds;
    let (qn, qlat, mut e2) = load(&target, clients, bytes, seconds, Some(peak / 4.0)).await;
    let quarter_stages = Stages::of(&c, &vp, via).await?;
    let mut at_rates = Vec::new();
    for &rate in rates {
        let (n, lat, e) = load(&target, clients, bytes, seconds, Some(rate)).await;
        e2 += e;
        at_rates.push(RatePoint {
            offered_msgs_per_s: rate,
            msgs_per_s: n as f64 / seconds,
            p50_ms: percentile(&lat, 0.5),
            p99_ms: percentile(&lat, 0.99),
        });
    }
    let report = CommitReport {
        bench: "commit",
        members: 3,
        clients,
        streams: streams.len(),
        message_bytes: bytes,
        seconds,
        peak_msgs_per_s: peak,
        peak_p50_ms: percentile(&lat, 0.5),
        peak_p99_ms: percentile(&lat, 0.99),
        peak_msgs_per_slot: n as f64 / slots.max(1) as f64,
        peak_cpu_us_per_msg: cpu_s.iter().sum::<f64>() * 1e6 / n.max(1) as f64,
        peak_cpu_percent: cpu_s
            .iter()
            .map(|s| (s * 1000.0 / seconds).round() / 10.0)
            .collect(),
        peak_stages_us: peak_stages,
        quarter_msgs_per_s: qn as f64 / seconds,
        quarter_p50_ms: percentile(&qlat, 0.5),
        quarter_p99_ms: percentile(&qlat, 0.99),
        quarter_stages_us: quarter_stages,
        at_rates,
        errors: e1 + e2,
    };
    drop(c);
    finish(dir);
    Ok(report)
}

#[derive(Debug, Serialize)]
pub struct FailoverReport {
    pub bench: &'static str,
    pub kills: usize,
    /// From the SIGKILL of the leader to the first reply to a message sent after it.
    pub p50_ms: f64,
    pub max_ms: f64,
    pub all_ms: Vec<f64>,
    /// From the kill until a surviving member reports itself leader (the
    /// rest of each figure above is the client's host finding it).
    pub elected_ms: Vec<f64>,
    pub errors: u64,
}

/// `vp-host bench failover`.
pub async fn failover(kills: usize, clients: usize) -> Result<FailoverReport> {
    let (c, dir) = cluster("failover", 5).await?;
    let mut c = c;
    let vp = c.spawn(0, vp_apps::STRESS, "members=3", |_| {}).await?;
    let mut times = Vec::new();
    let mut elected_ms = Vec::new();
    let mut errors = 0;
    for round in 0..kills {
        let s = c
            .wait_voters(0, &vp, 3, &[], Duration::from_secs(60))
            .await?;
        let leader = s.leader.clone().context("no leader")?;
        let victim = c.index_of(&leader).context("leader not running")?;
        // Clients on a host that is not a member, so they survive the kill.
        let via = (0..c.hosts.len())
            .find(|&i| c.hosts[i].is_running() && !s.voters.contains(&c.hosts[i].host_id))
            .context("no host outside the virtual peer")?;
        let shared = Arc::new(c);
        let stop = Arc::new(AtomicBool::new(false));
        let killed_at_us = Arc::new(AtomicU64::new(u64::MAX));
        let first_after_us = Arc::new(AtomicU64::new(u64::MAX));
        let origin = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (c, vp, stop, killed, first) = (
                shared.clone(),
                vp.clone(),
                stop.clone(),
                killed_at_us.clone(),
                first_after_us.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut errors = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let sent = origin.elapsed().as_micros() as u64;
                    match c.send(via, &vp, json!({ "add": 1 }), false).await {
                        Ok(a) if a.error.is_none() => {
                            if sent >= killed.load(Ordering::SeqCst) {
                                first.fetch_min(
                                    origin.elapsed().as_micros() as u64,
                                    Ordering::SeqCst,
                                );
                            }
                        }
                        _ => errors += 1,
                    }
                }
                errors
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let survivors: Vec<usize> = s
            .voters
            .iter()
            .filter(|v| **v != leader)
            .filter_map(|v| shared.index_of(v))
            .collect();
        killed_at_us.store(origin.elapsed().as_micros() as u64, Ordering::SeqCst);
        let killed = Instant::now();
        shared.hosts[victim].kill();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut elected = None;
        while (elected.is_none() || first_after_us.load(Ordering::SeqCst) == u64::MAX)
            && Instant::now() < deadline
        {
            if elected.is_none() {
                for &i in &survivors {
                    if let Ok(st) = shared.vp_status(i, &vp).await
                        && st.role == "leader"
                    {
                        elected = Some(killed.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        elected_ms.push(elected.unwrap_or(f64::NAN));
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            errors += t.await.unwrap_or(0);
        }
        let first = first_after_us.load(Ordering::SeqCst);
        ensure!(
            first != u64::MAX,
            "round {round}: no message committed within 30 s of the kill"
        );
        times.push((first - killed_at_us.load(Ordering::SeqCst)) as f64 / 1000.0);
        c = Arc::try_unwrap(shared).map_err(|_| anyhow!("clients still hold the cluster"))?;
        // Back to full strength, then the killed host returns as a spare.
        c.wait_voters(
            via,
            &vp,
            3,
            std::slice::from_ref(&leader),
            Duration::from_secs(60),
        )
        .await?;
        c.restart(victim).await?;
        // A client uses a host that has joined the overlay (a host that has
        // not cannot locate a virtual peer yet).
        let restarted = &c.hosts[victim];
        crate::local::poll(
            Duration::from_secs(30),
            Duration::from_millis(20),
            || async {
                restarted
                    .status()
                    .await
                    .ok()
                    .filter(|s| s.overlay.joined)
                    .map(|_| ())
            },
        )
        .await
        .context("the restarted host did not rejoin the overlay")?;
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let report = FailoverReport {
        bench: "failover",
        kills,
        p50_ms: percentile(&sorted, 0.5),
        max_ms: sorted.last().copied().unwrap_or(f64::NAN),
        all_ms: times,
        elected_ms,
        errors,
    };
    drop(c);
    finish(dir);
    Ok(report)
}

#[derive(Debug, Serialize)]
pub struct ReplaceReport {
    pub bench: &'static str,
    pub state_mib: u64,
    pub rounds: usize,
    /// From the SIGKILL until the replacement votes (configuration without the
    /// dead member and without learners), per round.
    pub kill_to_voting_ms: Vec<f64>,
    /// The part after the leader began replacing (detection excluded).
    pub replacing_to_voting_ms: Vec<f64>,
    pub median_kill_to_voting_ms: f64,
    pub median_replacing_to_voting_ms: f64,
    pub replace_after_ms: u64,
}

/// `vp-host bench replace`.
pub async fn replace(
    state_mib: u64,
    rounds: usize,
    replace_after_ms: u64,
) -> Result<ReplaceReport> {
    let (c, dir) = cluster("replace", 4 + rounds).await?;
    let memory_max = (state_mib * 2 + 64) << 20;
    let query = format!("members=3&memory_max={memory_max}&replace_after_ms={replace_after_ms}");
    let vp = c.spawn(0, vp_apps::STRESS, &query, |_| {}).await?;
    c.ask(
        0,
        &vp,
        json!({ "hold": { "bytes": state_mib << 20, "seed": 7 } }),
    )
    .await?;
    let mut kill_to_voting = Vec::new();
    let mut replacing_to_voting = Vec::new();
    for _ in 0..rounds {
        let s = c
            .wait_voters(0, &vp, 3, &[], Duration::from_secs(120))
            .await?;
        let leader = s.leader.clone().context("no leader")?;
        let dead = s
            .voters
            .iter()
            .find(|v| **v != leader)
            .cloned()
            .context("no follower")?;
        let victim = c.index_of(&dead).context("follower not running")?;
        let via = c.index_of(&leader).context("leader not running")?;
        let killed = Instant::now();
        c.hosts[victim].kill();
        let mut replacing = None;
        loop {
            ensure!(
                killed.elapsed() < Duration::from_secs(120),
                "no replacement within 120 s"
            );
            if let Some(s) = c.any_vp_status(via, &vp).await {
                if replacing.is_none() && (s.replacing.is_some() || !s.voters.contains(&dead)) {
                    replacing = Some(Instant::now());
                }
                if s.is_whole(3, std::slice::from_ref(&dead)) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let done = Instant::now();
        kill_to_voting.push(done.duration_since(killed).as_secs_f64() * 1e3);
        replacing_to_voting.push(
            done.duration_since(replacing.unwrap_or(killed))
                .as_secs_f64()
                * 1e3,
        );
    }
    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        percentile(&s, 0.5)
    };
    let report = ReplaceReport {
        bench: "replace",
        state_mib,
        rounds,
        median_kill_to_voting_ms: median(&kill_to_voting),
        median_replacing_to_voting_ms: median(&replacing_to_voting),
        kill_to_voting_ms: kill_to_voting,
        replacing_to_voting_ms: replacing_to_voting,
        replace_after_ms,
    };
    drop(c);
    finish(dir);
    Ok(report)
}
