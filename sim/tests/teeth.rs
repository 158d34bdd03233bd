//! The simulator has teeth: each known bug put back into the core is caught, by the
//! invariant that guards against it, within a bounded number of seeds.

use blockd_sim::{SimConfig, injected_bugs, run_config};

/// Seeds tried per bug before the test gives up (each runs `STEPS` events).
const MAX_SEEDS: u64 = 300;
const STEPS: u64 = 20_000;

/// Runs seeds from 0 with `bug` injected until one fails; returns the seed and the
/// invariant it broke.
fn first_catch(bug: &str) -> (u64, &'static str, String) {
    // A core's panic is caught and reported by the simulator; no backtrace noise.
    std::panic::set_hook(Box::new(|_| {}));
    let bugs = injected_bugs(&[bug.to_string()]).expect("a known bug");
    for seed in 0..MAX_SEEDS {
        let mut config = SimConfig::from_seed(seed);
        config.bugs = bugs;
        if let Some(f) = run_config(config, STEPS).failure {
            eprintln!("{bug}: caught by seed {seed} at step {}: {} ({})", f.step, f.invariant, f.detail);
            return (seed, f.invariant, f.detail);
        }
    }
    panic!("{bug} was not caught within {MAX_SEEDS} seeds");
}

#[test]
fn a_secondary_acknowledging_before_its_write_completes_is_caught() {
    let (_, invariant, _) = first_catch("ack-before-write");
    assert_eq!(invariant, "a peer acknowledges only what it has written");
}

#[test]
fn a_source_skipping_a_chunk_is_caught() {
    let (_, invariant, detail) = first_catch("skip-chunk");
    assert_eq!(invariant, "UpToDate means the Primary's data", "{detail}");
}

#[test]
fn a_promotion_skipping_the_peer_is_caught() {
    let (_, invariant, _) = first_catch("promotion-skips-peer");
    assert_eq!(invariant, "never two Primaries while connected");
}

#[test]
fn a_completion_of_the_previous_link_taken_for_the_current_one_is_caught() {
    let (_, invariant, detail) = first_catch("accept-stale-completion");
    // The old link's completion underflows the new link's count (the panic seen in
    // the field), or acknowledges a write of the new link that is not written.
    assert!(
        invariant == "no panic" || invariant == "a peer acknowledges only what it has written",
        "{invariant}: {detail}"
    );
}

/// Without injected bugs the same seeds pass (so the catches above are the bugs').
#[test]
fn the_seeds_pass_without_injected_bugs() {
    for seed in 0..20 {
        let outcome = run_config(SimConfig::from_seed(seed), STEPS);
        assert!(outcome.failure.is_none(), "seed {seed}: {:?}", outcome.failure);
    }
}

#[test]
fn a_secondary_applying_epochs_out_of_order_is_caught() {
    let (_, invariant, detail) = first_catch("apply-out-of-order");
    // Out of order, a later write of a block may land before an earlier one.
    assert!(
        invariant == "a Secondary holds a prefix of the epochs"
            || invariant == "UpToDate means the Primary's data",
        "{invariant}: {detail}"
    );
}

#[test]
fn a_primary_pulled_ahead_forgetting_its_writes_is_caught() {
    let (_, invariant, detail) = first_catch("ahead-forgets-writes");
    // The catch-up resync does not copy them: the Secondary ends its resync (or
    // is UpToDate) with older data.
    assert!(
        invariant == "no resync from the stale side" || invariant == "UpToDate means the Primary's data",
        "{invariant}: {detail}"
    );
}
