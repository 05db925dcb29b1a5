//! Run the ALM benchmark and print its JSON summary line:
//! `cargo run --release -p vp-alm --example bench_alm -- --hosts 100000 [--churn 10] [--seed 1]`
//! (`vp-host bench alm` calls the same `vp_alm::bench::run`).

use vp_alm::bench::{AlmBenchOptions, run};

fn main() {
    let mut opts = AlmBenchOptions::default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--hosts" => opts.hosts = value.parse().expect("--hosts N"),
            "--churn" => opts.churn_pct = value.parse().expect("--churn PCT"),
            "--seed" => opts.seed = value.parse().expect("--seed S"),
            "--searches" => opts.searches = value.parse().expect("--searches N"),
            "--groups" => opts.groups = value.parse().expect("--groups N"),
            "--joins" => opts.joins = value.parse().expect("--joins N"),
            "--loss" => opts.loss = value.parse().expect("--loss P"),
            "--repair-secs" => opts.repair_secs_max = value.parse().expect("--repair-secs S"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    let report = run(opts);
    println!(
        "{}",
        serde_json::to_string(&report).expect("report serialises")
    );
}
