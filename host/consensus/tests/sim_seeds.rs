//! Hundreds of simulator seeds with every fault on, plus named regressions for bugs the
//! simulator found. A failure prints the seed and `vp-host sim --seed <N>`.

use vp_consensus::sim::{self, Faults, SimOptions};

fn seeds(first: u64, count: u64, voters: usize) {
    let opts = SimOptions {
        voters,
        ..SimOptions::new(first)
    };
    assert_eq!(
        opts.faults,
        Faults::all(),
        "the seed suite runs with all faults on"
    );
    match sim::run_many(opts, count) {
        Ok(m) => {
            assert_eq!(m.passed, count);
            // The runs did real work: commands were decided and faults happened.
            assert!(m.client_ops > count * 10, "{m}");
            assert!(m.crashes > 0 && m.reconfigurations > 0, "{m}");
        }
        Err(f) => panic!("{f}"),
    }
}

// 4 x 250 = 1000 seeds with 3 founding voters, split so the test harness runs them in
// parallel on both cores.
#[test]
fn seeds_0_to_250_all_faults() {
    seeds(0, 250, 3);
}

#[test]
fn seeds_250_to_500_all_faults() {
    seeds(250, 250, 3);
}

#[test]
fn seeds_500_to_750_all_faults() {
    seeds(500, 250, 3);
}

#[test]
fn seeds_750_to_1000_all_faults() {
    seeds(750, 250, 3);
}

#[test]
fn seeds_with_five_voters_all_faults() {
    seeds(10_000, 200, 5);
}

#[test]
fn same_seed_same_run() {
    let a = sim::run(SimOptions::new(42)).expect("seed 42 passes");
    let b = sim::run(SimOptions::new(42)).expect("seed 42 passes");
    assert_eq!(a, b, "one seed must give one run");
}

/// Regression, seed 20: a leader learned slots by catch-up (a snapshot) while it still
/// had recovered slots queued for re-proposal; it then wrote below its log start and
/// panicked ("log write below start"). Fix: drop re-proposals of slots decided meanwhile.
/// The simulator has gained faults since (clock drift, pauses, async replies), so this
/// seed no longer replays the original interleaving; it stays as a named run.
#[test]
fn regression_seed_20_reproposal_below_log_start() {
    let r = sim::run(SimOptions::new(20)).unwrap_or_else(|f| panic!("{f}"));
    assert!(r.snapshots_installed > 0);
}

/// Regression, seed 460: a host was elected while behind (others had truncated the
/// slots it lacked); its one catch-up request was lost and nothing retried it, so its
/// pipeline window never opened: no progress after faults stopped. Fix: a leader asks
/// for catch-up whenever a heartbeat ack shows a follower decided more than it did.
/// The current simulator no longer replays that interleaving; the scripted scenario
/// `leader_elected_while_behind_catches_up_after_its_request_is_lost` reproduces it
/// (and fails without the fix).
#[test]
fn regression_seed_460_leader_behind_never_caught_up() {
    let r = sim::run(SimOptions::new(460)).unwrap_or_else(|f| panic!("{f}"));
    assert!(r.client_ops > 0);
}

/// Regression, seed 110 (checker bug, not a replica bug): a late duplicate of a request
/// the client had already completed was answered `Forgotten`; the checker flagged it.
/// The checker now only objects when the client is still waiting for that request.
#[test]
fn regression_seed_110_forgotten_after_client_moved_on() {
    sim::run(SimOptions::new(110)).unwrap_or_else(|f| panic!("{f}"));
}

#[test]
fn failure_message_names_seed_and_replay_command() {
    let f = sim::SimFailure {
        seed: 7,
        at_ms: 12,
        message: "x".into(),
    };
    let s = f.to_string();
    assert!(
        s.contains("seed 7") && s.contains("vp-host sim --seed 7"),
        "{s}"
    );
}

fn variant(name: &str, opts: SimOptions, count: u64) {
    match sim::run_many(opts, count) {
        Ok(m) => assert_eq!(m.passed, count, "{name}: {m}"),
        Err(f) => panic!("{name}: {f}"),
    }
}

#[test]
fn variant_contention_on_two_keys() {
    let mut o = SimOptions::new(1_000_000);
    o.clients = 8;
    o.keys = 2;
    variant("contention", o, 60);
}

#[test]
fn variant_checkpoint_every_three_slots_and_never() {
    let mut o = SimOptions::new(2_000_000);
    o.checkpoint_every = 3;
    variant("checkpoint every 3 slots", o, 60);
    let mut o = SimOptions::new(3_000_000);
    o.checkpoint_every = 0;
    variant("no checkpoints", o, 60);
}

#[test]
fn variant_heavy_loss_duplication_and_reordering() {
    let mut o = SimOptions::new(4_000_000);
    o.faults.loss_ppm = 200_000;
    o.faults.duplicate_ppm = 100_000;
    o.faults.long_delay_ppm = 200_000;
    variant("20% loss, 10% duplication, 20% reordering", o, 60);
}

#[test]
fn variant_single_voter_grown_by_churn() {
    let mut o = SimOptions::new(5_000_000);
    o.voters = 1;
    variant("single founding voter", o, 60);
}
