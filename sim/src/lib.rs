//! blockd-sim: a deterministic simulator of a replicated pair.
//!
//! Each node runs the real replication core ([`blockd::repl::core::Core`]) and the
//! project's own metadata code on a simulated disk; everything else the cores touch
//! is simulated from one seeded PRNG and one virtual clock:
//!
//! - [`disk`]: data and internal metadata on one device with volatile and durable
//!   versions per block; flushes, FUA, power loss that keeps any subset of what was
//!   not flushed and may tear a block, failing metadata writes;
//! - [`net`]: one session at a time per pair, in-order delivery with latency, cuts
//!   and partitions noticed by each side at its own moment, dial races;
//! - [`node`]: a node's life: `create-md`, start through `repl::recover` (as
//!   `blockd run`), crash, restart;
//! - [`client`]: the NBD client (writes, FUA, trims, zeroes, flushes) and what each
//!   acknowledgement promises; [`model`] records it; [`pattern`] tags every sector;
//! - [`operator`]: faults and operator commands (on either node or both at once),
//!   then healing until the pair is in sync;
//! - [`checks`]: the invariants, after every step and at quiescence;
//! - [`world`]: the event loop tying it together; [`config`]: what a seed runs.
//!
//! [`run_seed`] runs one seed; the `blockd-sim` binary runs many and prints
//! `sim: N seeds, T steps, F failures`. A failure names its seed, the first
//! invariant it broke, and the events before it; the same seed replays it exactly.

pub mod checks;
pub mod client;
pub mod config;
pub mod disk;
pub mod model;
pub mod net;
pub mod node;
pub mod operator;
pub mod pattern;
pub mod prefix;
pub mod world;

pub use config::SimConfig;
pub use world::{Failure, World};

/// What one seed did.
#[derive(Debug)]
pub struct SeedOutcome {
    pub seed: u64,
    pub steps: u64,
    pub episodes: u64,
    pub pull_aheads: u64,
    pub rollbacks: u64,
    pub acked_writes: u64,
    pub failure: Option<Failure>,
    /// The last events before the failure.
    pub trace: Vec<String>,
    pub config: SimConfig,
}

/// The known bugs named in `names` (see `--inject`).
pub fn injected_bugs(names: &[String]) -> Result<blockd::repl::core::InjectedBugs, String> {
    let mut b = blockd::repl::core::InjectedBugs::default();
    for name in names {
        match name.as_str() {
            "ack-before-write" => b.ack_before_write = true,
            "skip-chunk" => b.skip_chunk = true,
            "promotion-skips-peer" => b.promotion_skips_peer = true,
            "accept-stale-completion" => b.accept_stale_completion = true,
            "apply-out-of-order" => b.apply_out_of_order = true,
            "ahead-forgets-writes" => b.ahead_forgets_writes = true,
            other => return Err(format!("unknown bug `{other}`")),
        }
    }
    Ok(b)
}

/// Runs seed `seed` for at most `steps` events.
pub fn run_seed(seed: u64, steps: u64, verbose: bool) -> SeedOutcome {
    let mut config = SimConfig::from_seed(seed);
    config.verbose = verbose;
    run_config(config, steps)
}

/// Runs a given configuration.
pub fn run_config(config: SimConfig, steps: u64) -> SeedOutcome {
    let seed = config.seed;
    let mut world = match World::new(config.clone()) {
        Ok(w) => w,
        Err(e) => {
            let failure = Failure { step: 0, time_us: 0, invariant: "setup", detail: format!("{e:#}") };
            return SeedOutcome {
                seed,
                steps: 0,
                episodes: 0,
                pull_aheads: 0,
                rollbacks: 0,
                acked_writes: 0,
                failure: Some(failure),
                trace: Vec::new(),
                config,
            };
        }
    };
    world.run(steps);
    let trace = if world.failure.is_some() { world.trace().cloned().collect() } else { Vec::new() };
    SeedOutcome {
        seed,
        steps: world.steps,
        episodes: world.episodes,
        pull_aheads: world.pull_aheads,
        rollbacks: world.rollbacks,
        acked_writes: world.client.acked_writes,
        failure: world.failure.clone(),
        trace,
        config,
    }
}
