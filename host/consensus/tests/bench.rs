//! The core benchmark runs and reports consistent figures (no timing assertions).

use std::time::Duration;
use vp_consensus::bench::{self, BenchOptions};

#[test]
fn core_bench_commits_and_reports_one_json_line() {
    let r = bench::core(BenchOptions {
        proposers: 8,
        duration: Duration::from_millis(200),
        payload_bytes: 16,
    });
    assert!(r.commits > 0, "{r:?}");
    assert!(r.slots > 0 && r.commands_per_slot >= 1.0, "{r:?}");
    assert!(r.latency_p50_us <= r.latency_p99_us, "{r:?}");
    let line = serde_json::to_string(&r).expect("json");
    assert!(!line.contains('\n') && line.contains("\"commits_per_sec\""));
}
