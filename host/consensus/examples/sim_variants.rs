//! Runs the simulator under several option sets (contention, frequent checkpoints, no
//! checkpoints, heavy loss): `cargo run --release -p vp-consensus --example sim_variants -- [count]`.

use vp_consensus::sim::{SimOptions, run_many};

fn main() {
    let count: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    let mut variants: Vec<(&str, SimOptions)> = Vec::new();
    let mut o = SimOptions::new(1_000_000);
    o.clients = 8;
    o.keys = 2;
    variants.push(("contention", o));
    let mut o = SimOptions::new(2_000_000);
    o.checkpoint_every = 3;
    variants.push(("checkpoint every 3 slots", o));
    let mut o = SimOptions::new(3_000_000);
    o.checkpoint_every = 0;
    variants.push(("no checkpoints", o));
    let mut o = SimOptions::new(4_000_000);
    o.faults.loss_ppm = 200_000;
    o.faults.duplicate_ppm = 100_000;
    o.faults.long_delay_ppm = 200_000;
    variants.push(("20% loss, 10% dup, 20% reorder", o));
    let mut o = SimOptions::new(5_000_000);
    o.voters = 1;
    variants.push(("single voter growing by churn", o));
    let mut failed = false;
    for (name, opts) in variants {
        match run_many(opts, count) {
            Ok(m) => println!("{name}: {m}"),
            Err(f) => {
                println!("{name}: {f}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
