//! Benchmarks of the sandbox (`vp-host bench dispatch|snapshot`). Each returns
//! a report that the CLI prints as one JSON line; docs/benchmarks.md explains
//! the figures.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use serde_json::json;
use vp_guest_sdk::abi::{self, Address, Effect, Envelope, Input};

use crate::sandbox::{Guest, GuestLimits, Sandbox};

/// `dispatch`: one small message through the sandbox into the guest and back.
#[derive(Debug, Serialize)]
pub struct DispatchReport {
    pub bench: &'static str,
    pub app: &'static str,
    pub messages: u64,
    /// Mean time per message, µs.
    pub us_per_message: f64,
    /// Median and 99th percentile of per-message time over batches of 100, µs.
    pub p50_us: f64,
    pub p99_us: f64,
    pub messages_per_s: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Run `messages` `{"add": 1}` requests through the counter guest.
pub fn dispatch(messages: u64) -> Result<DispatchReport> {
    const BATCH: u64 = 100;
    let sandbox = Sandbox::new()?;
    let mut guest = Guest::start(
        &sandbox,
        sandbox.load(vp_apps::COUNTER)?,
        GuestLimits::default(),
    )?;
    let payload = abi::encode(&json!({"add": 1})).map_err(anyhow::Error::msg)?;
    let mut envelope = Envelope(
        1_700_000_000_000,
        0,
        Input::Request(Address::Client(7), 0, payload.into()),
    );
    let mut send = |guest: &mut Guest| -> Result<()> {
        envelope.0 += 1;
        envelope.1 += 1;
        if let Input::Request(_, id, _) = &mut envelope.2 {
            *id += 1;
        }
        let effects = guest.handle(&envelope)?;
        ensure!(
            matches!(effects.as_slice(), [Effect::Reply(_, _, Ok(_))]),
            "unexpected effects {effects:?}"
        );
        Ok(())
    };
    for _ in 0..10_000 {
        send(&mut guest)?;
    }
    let batches = messages.div_ceil(BATCH).max(1);
    let mut batch_us = Vec::with_capacity(batches as usize);
    let start = Instant::now();
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..BATCH {
            send(&mut guest)?;
        }
        batch_us.push(t.elapsed().as_secs_f64() * 1e6 / BATCH as f64);
    }
    let elapsed = start.elapsed();
    let sent = batches * BATCH;
    // The bench is honest only if every add landed.
    let check = abi::encode(&json!("get")).map_err(anyhow::Error::msg)?;
    let effects = guest.handle(&Envelope(
        0,
        0,
        Input::Request(Address::Client(7), u64::MAX, check.into()),
    ))?;
    let total = match effects.as_slice() {
        [Effect::Reply(_, _, Ok(bytes))] => {
            abi::decode::<i64>(bytes).map_err(anyhow::Error::msg)?
        }
        other => anyhow::bail!("unexpected reply to get: {other:?}"),
    };
    ensure!(
        total as u64 == sent + 10_000,
        "counter is {total}, expected {}",
        sent + 10_000
    );
    batch_us.sort_by(f64::total_cmp);
    Ok(DispatchReport {
        bench: "dispatch",
        app: "counter",
        messages: sent,
        us_per_message: elapsed.as_secs_f64() * 1e6 / sent as f64,
        p50_us: percentile(&batch_us, 0.5),
        p99_us: percentile(&batch_us, 0.99),
        messages_per_s: sent as f64 / elapsed.as_secs_f64(),
    })
}

/// `snapshot`: capture, encode, decode and restore a guest holding bulk state.
#[derive(Debug, Serialize)]
pub struct SnapshotReport {
    pub bench: &'static str,
    pub state_mib: u64,
    pub memory_bytes: usize,
    pub encoded_bytes: usize,
    /// Medians over the rounds, ms. `encode`: live memory to the encoded
    /// snapshot (zero-page scan, copy, checksum) into a fresh buffer.
    pub encode_ms: f64,
    pub restore_ms: f64,
    pub digest_ms: f64,
    /// Memory bytes / encode, MB/s (10^6 bytes).
    pub snapshot_mb_per_s: f64,
    /// `restore`: verify the encoded snapshot and restore it into a fresh
    /// instance on another engine. Memory bytes / restore, MB/s.
    pub restore_mb_per_s: f64,
    pub rounds: u32,
}

fn median_ms(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e3
}

/// Snapshot and restore the stress guest holding `state_mib` MiB of
/// pseudo-random bytes (no zero pages to skip), `rounds` times.
pub fn snapshot(state_mib: u64, rounds: u32) -> Result<SnapshotReport> {
    ensure!(rounds > 0, "rounds must be at least 1");
    let limits = GuestLimits {
        fuel_per_message: 10_000_000_000,
        memory_bytes_max: (state_mib * 2 + 64) << 20,
        ..GuestLimits::default()
    };
    let sandbox = Sandbox::new()?;
    let module = sandbox.load(vp_apps::STRESS)?;
    let mut guest = Guest::start(&sandbox, module.clone(), limits)?;
    let hold = abi::encode(&json!({"hold": {"bytes": state_mib << 20, "seed": 1}}))
        .map_err(anyhow::Error::msg)?;
    guest
        .handle(&Envelope(
            0,
            0,
            Input::Request(Address::Client(1), 1, hold.into()),
        ))
        .context("filling the guest's state")?;
    let other = Sandbox::new()?; // restore as on another machine
    let other_module = other.load(vp_apps::STRESS)?;
    let (mut encode, mut restore, mut digest) = (vec![], vec![], vec![]);
    let mut encoded = Vec::new();
    let memory_bytes = guest.memory_bytes();
    let original = guest.digest();
    for _ in 0..rounds {
        // A fresh buffer each round: the cost includes faulting its pages in.
        encoded = Vec::new();
        let t = Instant::now();
        guest.encode_snapshot_into(&mut encoded);
        encode.push(t.elapsed());
        let received = encoded.clone(); // the bytes as they arrive from another machine
        let t = Instant::now();
        let mut restored = Guest::restore_encoded(&other, other_module.clone(), received, limits)?;
        restore.push(t.elapsed());
        let t = Instant::now();
        let d = restored.digest();
        digest.push(t.elapsed());
        ensure!(d == original, "restored state differs from the original");
    }
    let encode_ms = median_ms(&mut encode);
    let restore_ms = median_ms(&mut restore);
    let mb = memory_bytes as f64 / 1e6;
    Ok(SnapshotReport {
        bench: "snapshot",
        state_mib,
        memory_bytes,
        encoded_bytes: encoded.len(),
        encode_ms,
        restore_ms,
        digest_ms: median_ms(&mut digest),
        snapshot_mb_per_s: mb / (encode_ms / 1e3),
        restore_mb_per_s: mb / (restore_ms / 1e3),
        rounds,
    })
}
