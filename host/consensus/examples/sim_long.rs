//! Longer, harsher runs than the default: `cargo run --release -p vp-consensus --example sim_long -- [first_seed] [count]`.
//! Ten seconds of faults per seed, up to eight membership changes, five voters.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let first: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let count: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100);
    let mut opts = vp_consensus::sim::SimOptions::new(first);
    opts.fault_us = 10_000_000;
    opts.voters = 5;
    opts.clients = 6;
    opts.faults.churn_events_max = 8;
    opts.faults.crash_ppm = 2_000;
    match vp_consensus::sim::run_many(opts, count) {
        Ok(m) => println!("{m}"),
        Err(f) => {
            eprintln!("{f}");
            std::process::exit(1);
        }
    }
}
