//! Runs the simulator: `cargo run --release -p vp-consensus --example sim -- [first_seed] [count] [voters]`
//! (the same as `vp-host sim --seed N` / `--seeds N` once the CLI is wired).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let first: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let count: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let voters: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let opts = vp_consensus::sim::SimOptions {
        voters,
        ..vp_consensus::sim::SimOptions::new(first)
    };
    let start = std::time::Instant::now();
    if count == 1 {
        match vp_consensus::sim::run(opts) {
            Ok(r) => println!("{}", serde_json::to_string(&r).unwrap_or_default()),
            Err(f) => {
                eprintln!("{f}");
                std::process::exit(1);
            }
        }
    } else {
        match vp_consensus::sim::run_many(opts, count) {
            Ok(m) => {
                let secs = start.elapsed().as_secs_f64();
                println!("{m} ({:.1} seeds/s)", count as f64 / secs);
            }
            Err(f) => {
                eprintln!("{f}");
                std::process::exit(1);
            }
        }
    }
}
