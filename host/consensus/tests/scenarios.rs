//! Scripted interleavings, written as stories. Each runs the real replicas inside the
//! simulator with random faults off; the simulator's checkers (agreement, identical
//! outcomes and states, exactly-once, linearizability) stay on throughout.

use vp_consensus::sim::{Faults, Sim, SimOptions};
use vp_consensus::{HostId, MembershipChange, ReadMode};

/// A quiet three-host cluster with a leader and paused clients.
fn quiet_cluster(seed: u64) -> (Sim, HostId, Vec<HostId>) {
    let mut sim = Sim::new(SimOptions {
        faults: Faults::none(),
        ..SimOptions::new(seed)
    });
    sim.set_faults(false);
    sim.pause_clients(true);
    sim.run_for(1_000_000).unwrap_or_else(|f| panic!("{f}"));
    let leader = sim.leader().expect("a leader after one quiet second");
    let others: Vec<HostId> = sim
        .host_ids()
        .into_iter()
        .filter(|h| *h != leader)
        .collect();
    (sim, leader, others)
}

fn run(sim: &mut Sim, us: u64) {
    sim.run_for(us).unwrap_or_else(|f| panic!("{f}"));
}

/// Runs until `cond` holds, failing after `us_max` of simulated time.
fn run_until(sim: &mut Sim, us_max: u64, what: &str, cond: impl Fn(&Sim) -> bool) {
    let end = sim.now().0 + us_max;
    while !cond(sim) {
        assert!(sim.now().0 < end, "timed out waiting for: {what}");
        run(sim, 1_000);
    }
}

#[test]
fn leader_change_mid_batch_keeps_every_accepted_command_once() {
    let (mut sim, old, others) = quiet_cluster(1);
    let (a, b) = (others[0], others[1]);

    // The old leader's accepts reach only `a`, and `a`'s votes never come back.
    sim.block(old, b);
    sim.block(a, old);
    for i in 0..6 {
        sim.propose_put(old, 500, i, i, 100 + i)
            .expect("the leader queues the command");
    }
    run(&mut sim, 20_000);
    assert_eq!(
        sim.replica(old).map(|r| r.decided_below()),
        sim.replica(a).map(|r| r.decided_below()),
        "nothing decided: the old leader never had a quorum"
    );

    // The old leader vanishes mid-pipeline; `a` takes over.
    sim.isolate(&[old]);
    sim.elect(a);
    run_until(&mut sim, 2_000_000, "a new leader", |s| {
        s.leader().is_some_and(|l| l != old)
    });
    // The first two puts went out alone, the other four queued behind their
    // writes and went out together: three slots, all accepted by `a`. Phase 1 found them
    // there and the new leader re-proposed them; each put applies once.
    run_until(&mut sim, 2_000_000, "the six accepted puts applied", |s| {
        let l = s.leader().unwrap_or(a);
        (0..6).all(|i| s.app(l).is_some_and(|app| app.get(i) == 100 + i))
    });

    // The old leader comes back, learns the same log, and converges.
    sim.heal_network();
    run(&mut sim, 1_000_000);
    let states: Vec<_> = sim
        .host_ids()
        .iter()
        .map(|h| sim.app(*h).cloned())
        .collect();
    assert!(states.windows(2).all(|w| w[0] == w[1]), "{states:?}");
    sim.check_history().unwrap_or_else(|f| panic!("{f}"));
}

#[test]
fn config_change_racing_a_leader_crash_converges_and_makes_progress() {
    let (mut sim, leader, others) = quiet_cluster(2);
    let newcomer = sim.spawn_host();

    // Replace a follower; the leader crashes right after sending the stop-sign.
    sim.reconfigure(MembershipChange::Replace {
        remove: others[1],
        add: newcomer,
    })
    .expect("the leader accepts the change");
    run(&mut sim, 1_000);
    sim.crash(leader);

    // Someone else leads and the change either completes or was never decided.
    run_until(&mut sim, 3_000_000, "a new leader", |s| {
        s.leader().is_some()
    });
    sim.restart(leader);
    sim.pause_clients(false);
    // Crash the leader again in the middle of the learner's promotion.
    run_until(&mut sim, 5_000_000, "the newcomer known as a member", |s| {
        s.leader()
            .and_then(|l| s.replica(l))
            .is_some_and(|r| r.membership().is_member(newcomer))
    });
    if let Some(l) = sim.leader() {
        sim.crash(l);
        run(&mut sim, 300_000);
        sim.restart(l);
    }
    run_until(
        &mut sim,
        10_000_000,
        "the newcomer promoted to voter",
        |s| {
            s.leader().and_then(|l| s.replica(l)).is_some_and(|r| {
                r.membership().is_voter(newcomer) && !r.membership().is_voter(others[1])
            })
        },
    );
    let before = sim.report().client_ops;
    run(&mut sim, 2_000_000);
    assert!(
        sim.report().client_ops > before + 10,
        "progress after the change"
    );
    // Every member of the final configuration agrees on it.
    let l = sim.leader().expect("leader");
    let m = sim
        .replica(l)
        .map(|r| (**r.membership()).clone())
        .expect("membership");
    for v in &m.voters {
        run_until(&mut sim, 2_000_000, "voters agree on the membership", |s| {
            s.replica(*v).is_some_and(|r| **r.membership() == m)
        });
    }
    sim.check_history().unwrap_or_else(|f| panic!("{f}"));
}

#[test]
fn snapshot_install_racing_new_entries() {
    let (mut sim, _leader, others) = quiet_cluster(3);
    let lagger = others[1];

    // The lagger is cut off while the others decide, checkpoint and truncate.
    sim.isolate(&[lagger]);
    sim.pause_clients(false);
    run(&mut sim, 2_000_000);
    let lagger_before = sim.replica(lagger).map(|r| r.decided_below()).expect("up");
    let leader = sim.leader().expect("leader");
    let leader_log_start = sim
        .replica(leader)
        .map(|r| r.status().log_start)
        .expect("up");
    assert!(
        leader_log_start > lagger_before,
        "the slots the lagger lacks are gone from the leader's log"
    );

    // It comes back while clients keep writing: it must install a snapshot (in
    // chunks) while new entries keep arriving, then continue from the log.
    sim.heal_network();
    run_until(
        &mut sim,
        3_000_000,
        "the lagger installed a snapshot",
        |s| {
            s.replica(lagger)
                .is_some_and(|r| r.snapshot_slot() >= leader_log_start)
        },
    );
    run(&mut sim, 1_000_000);
    sim.pause_clients(true);
    run(&mut sim, 1_000_000);
    let leader = sim.leader().expect("leader");
    assert_eq!(
        sim.replica(lagger).map(|r| r.applied_below()),
        sim.replica(leader).map(|r| r.applied_below())
    );
    assert_eq!(sim.app(lagger), sim.app(leader));
    assert!(sim.report().snapshots_installed > 0);
    sim.check_history().unwrap_or_else(|f| panic!("{f}"));
}

#[test]
fn read_index_at_a_deposed_leader_never_returns_stale_data() {
    let (mut sim, old, others) = quiet_cluster(4);
    sim.propose_put(old, 900, 1, 7, 1).expect("leader");
    run(&mut sim, 100_000);

    // Cut the leader off, then ask it for a quorum-confirmed read.
    sim.isolate(&[old]);
    let read = sim
        .read_at(old, ReadMode::ReadIndex)
        .expect("it still thinks it leads");
    // Meanwhile the rest elect a leader and overwrite the key.
    run_until(&mut sim, 3_000_000, "a new leader", |s| {
        s.leader().is_some_and(|l| l != old)
    });
    let new = sim.leader().expect("new leader");
    sim.propose_put(new, 901, 1, 7, 2).expect("new leader");
    run_until(&mut sim, 1_000_000, "the overwrite applied", |s| {
        s.app(others[0]).is_some_and(|a| a.get(7) == 2)
    });
    // The old leader could not confirm: the read is aborted, never served stale.
    run(&mut sim, 500_000);
    assert_eq!(sim.read_outcome(old, read), Some(false));
}

#[test]
fn lease_holds_off_a_new_leader_until_it_expires() {
    let (mut sim, old, others) = quiet_cluster(5);
    run(&mut sim, 100_000); // heartbeats acknowledged: the lease is fresh
    sim.isolate(&[old]);
    let read = sim.read_at(old, ReadMode::Lease).expect("it still leads");
    run(&mut sim, 1_000);
    assert_eq!(
        sim.read_outcome(old, read),
        Some(true),
        "served under the lease"
    );
    // A follower tries to take over at once: the other follower heard from the old
    // leader within the election timeout and refuses, so the lease stays safe.
    sim.elect(others[0]);
    run(&mut sim, 60_000);
    assert!(
        sim.leader().is_none_or(|l| l == old),
        "no new leader while followers are sticky"
    );
    run_until(&mut sim, 3_000_000, "a new leader after the lease", |s| {
        s.leader().is_some_and(|l| l != old)
    });
}

/// The lease is only as good as its clock assumption. With the old leader's clock
/// running at a fifth of real speed (far outside "no clock more than 2x faster than
/// another"), its lease outlives the followers' stickiness and it serves a stale read:
/// this test shows the assumption is real (and that a stale read is observable here).
/// `ReadIndex` needs no such assumption (see the test above).
#[test]
fn lease_beyond_its_clock_assumption_serves_stale_data() {
    let (mut sim, old, others) = quiet_cluster(6);
    sim.propose_put(old, 900, 1, 7, 1).expect("leader");
    run(&mut sim, 100_000);
    sim.set_clock_drift(old, -800_000);
    sim.isolate(&[old]);
    run_until(&mut sim, 3_000_000, "a new leader", |s| {
        s.leader().is_some_and(|l| l != old)
    });
    let new = sim.leader().expect("new leader");
    sim.propose_put(new, 901, 1, 7, 2).expect("new leader");
    run_until(&mut sim, 1_000_000, "the overwrite applied", |s| {
        s.app(others[0]).is_some_and(|a| a.get(7) == 2)
    });
    let read = sim
        .read_at(old, ReadMode::Lease)
        .expect("the old leader still believes it leads");
    run(&mut sim, 1_000);
    assert_eq!(
        sim.read_outcome(old, read),
        Some(true),
        "served under a lease that is not valid"
    );
    assert_eq!(sim.app(old).map(|a| a.get(7)), Some(1), "stale value");
}

/// A follower that restarts forgets that it recently heard from the leader. If it then
/// promised a new candidate at once, the old leader's lease (which counted that
/// follower) would still be running while a new leader commits writes. A restarted
/// replica therefore refuses to promise anyone for an election timeout.
#[test]
fn restarted_follower_does_not_break_the_lease() {
    let (mut sim, old, others) = quiet_cluster(7);
    let (a, b) = (others[0], others[1]);
    sim.propose_put(old, 900, 1, 7, 1).expect("leader");
    run(&mut sim, 100_000);
    // b loses the leader (and runs for election); a keeps acknowledging the leader.
    sim.block(old, b);
    sim.block(b, old);
    run(&mut sim, 50_000);
    sim.elect(b);
    run(&mut sim, 2_000);
    // a crashes and comes straight back; the leader's lease still counts its last ack.
    sim.crash(a);
    sim.restart(a);
    // ... and from now on its refusals to the old leader are lost.
    sim.block(a, old);
    let read_time_limit = sim.now().0 + 30_000;
    let mut stale = false;
    while sim.now().0 < read_time_limit {
        run(&mut sim, 1_000);

        if let Some(l) = sim.leader()
            && l != old
        {
            let _ = sim.propose_put(l, 901, 1, 7, 2);
        }
        if sim.app(a).is_some_and(|x| x.get(7) == 2) || sim.app(b).is_some_and(|x| x.get(7) == 2) {
            // A write committed elsewhere: a lease read at the old leader now is stale.
            if let Ok(id) = sim.read_at(old, ReadMode::Lease) {
                run(&mut sim, 1_000);
                stale |= sim.read_outcome(old, id) == Some(true)
                    && sim.app(old).is_some_and(|x| x.get(7) == 1);
            }
            break;
        }
    }
    assert!(!stale, "the old leader served a stale lease read");
}

/// Regression for the bug seed 460 found (under an earlier version of the simulator,
/// whose runs the current one no longer reproduces): a host elected while behind the
/// others' truncated logs lost its one catch-up request and never asked again, so its
/// pipeline window never opened. Now a leader asks whenever a heartbeat ack shows a
/// follower decided more than it did.
#[test]
fn leader_elected_while_behind_catches_up_after_its_request_is_lost() {
    let (mut sim, old, others) = quiet_cluster(8);
    let (b, c) = (others[0], others[1]);
    sim.isolate(&[c]);
    sim.pause_clients(false);
    run(&mut sim, 2_000_000);
    sim.pause_clients(true);
    run(&mut sim, 300_000);
    let ahead = sim.replica(b).map(|r| r.decided_below()).expect("b");
    let b_log_start = sim.replica(b).map(|r| r.status().log_start).expect("b");
    let behind = sim.replica(c).map(|r| r.decided_below()).expect("c");
    assert!(b_log_start > behind, "b truncated the slots c lacks");

    // The leader dies; only c runs for election, and wins with b's promise.
    sim.auto_elect = false;
    sim.crash(old);
    run(&mut sim, 300_000);
    sim.heal_network();
    // Its first catch-up request is lost.
    sim.drop_next(c, b, "catchup_request", 1);
    sim.elect(c);
    run_until(&mut sim, 100_000, "c leads", |s| {
        s.replica(c).is_some_and(|r| r.is_leader())
    });
    run_until(&mut sim, 2_000_000, "the new leader caught up", |s| {
        s.replica(c).is_some_and(|r| r.decided_below() >= ahead)
    });
    sim.propose_put(c, 77, 1, 1, 4242).expect("c leads");
    run_until(&mut sim, 1_000_000, "a new command decided", |s| {
        s.app(b).is_some_and(|a| a.get(1) == 4242)
    });
}

/// A new leader that lags behind every log needs a snapshot from a follower;
/// the snapshot's first chunk is lost and the follower goes on with the
/// later ones, which the leader cannot use. The follower's own retry timer
/// resends in production, but a request that comes again must resume a
/// stalled transfer too (the simulator's scenario mode runs no follower
/// timers, which is how a longer load phase in the scenario above, with two
/// chunks reordered, stalled the transfer for good).
#[test]
fn a_stalled_snapshot_transfer_resumes_when_asked_again() {
    let (mut sim, old, others) = quiet_cluster(8);
    let (b, c) = (others[0], others[1]);
    sim.isolate(&[c]);
    sim.pause_clients(false);
    run(&mut sim, 2_000_000);
    sim.pause_clients(true);
    run(&mut sim, 300_000);
    let ahead = sim.replica(b).map(|r| r.decided_below()).expect("b");
    let b_log_start = sim.replica(b).map(|r| r.status().log_start).expect("b");
    let behind = sim.replica(c).map(|r| r.decided_below()).expect("c");
    assert!(b_log_start > behind, "c needs a snapshot");

    sim.auto_elect = false;
    sim.crash(old);
    run(&mut sim, 300_000);
    sim.heal_network();
    sim.drop_next(b, c, "snapshot_chunk", 1);
    sim.elect(c);
    run_until(&mut sim, 2_000_000, "the new leader caught up", |s| {
        s.replica(c).is_some_and(|r| r.decided_below() >= ahead)
    });
    sim.check_history().unwrap_or_else(|f| panic!("{f}"));
}

/// A crashed leader's connections close; the daemon passes that on as
/// `suspect`. The survivors still refuse a new leader while the old lease may
/// run, then elect one. (How much sooner than the election timeout is
/// measured on real hosts by `vp-host bench failover`: the simulator's
/// drifting clocks make a with/without comparison here unreliable.)
#[test]
fn a_suspected_leader_is_replaced_but_never_during_its_lease() {
    let t = vp_consensus::sim::sim_timing();
    let (mut sim, old, others) = quiet_cluster(21);
    run(&mut sim, 100_000);
    sim.crash(old);
    for h in &others {
        sim.suspect(*h, old);
    }
    for _ in 0..t.leader_lease_us / 1000 {
        run(&mut sim, 1_000);
        assert!(
            sim.leader().is_none(),
            "a new leader while the old lease may run"
        );
    }
    run_until(&mut sim, 3_000_000, "a new leader", |s| {
        s.leader().is_some_and(|l| l != old)
    });
    sim.check_history().unwrap_or_else(|f| panic!("{f}"));
}

/// A suspicion about a host that is not the leader changes nothing, and a
/// wrong suspicion about a live leader only costs an election: the leader's
/// lease reads stay correct (the simulator's checkers run throughout).
#[test]
fn a_wrong_suspicion_costs_at_most_an_election() {
    let (mut sim, leader, others) = quiet_cluster(22);
    run(&mut sim, 100_000);
    sim.suspect(others[0], others[1]);
    run(&mut sim, 400_000);
    assert_eq!(
        sim.leader(),
        Some(leader),
        "suspecting a follower changes nothing"
    );
    sim.pause_clients(false);
    for h in &others {
        sim.suspect(*h, leader);
    }
    run(&mut sim, 2_000_000);
    sim.pause_clients(true);
    run_until(&mut sim, 3_000_000, "a leader", |s| s.leader().is_some());
    sim.check_history().unwrap_or_else(|f| panic!("{f}"));
}
