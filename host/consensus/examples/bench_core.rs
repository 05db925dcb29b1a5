//! Runs the core benchmark in release mode:
//! `cargo run --release -p vp-consensus --example bench_core -- [proposers] [seconds] [payload_bytes]`
//! (the same as `vp-host bench core` once the CLI is wired). Prints one JSON line.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let proposers: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let secs: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let payload_bytes: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(16);
    let r = vp_consensus::bench::core(vp_consensus::bench::BenchOptions {
        proposers,
        duration: std::time::Duration::from_secs_f64(secs),
        payload_bytes,
    });
    println!("{}", serde_json::to_string(&r).unwrap_or_default());
}
