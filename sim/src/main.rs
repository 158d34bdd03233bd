//! `blockd-sim --seeds N [--steps M] [--seed S]`: runs seeds S, S+1, … S+N-1 (each
//! for at most M steps) on all cores, prints each failure (seed, invariant, the
//! events before it, and the command that replays it), and last the line
//! `sim: N seeds, T steps, F failures`. Exit status 1 if any seed failed.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;

#[derive(Parser)]
#[command(name = "blockd-sim", about = "Deterministic simulation of a blockd pair")]
struct Args {
    /// How many seeds to run.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Steps (events) per seed.
    #[arg(long, default_value_t = 20_000)]
    steps: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print every event of every seed (use with one seed).
    #[arg(long, short)]
    verbose: bool,
    /// Lines of the trace shown before a failure.
    #[arg(long, default_value_t = 60)]
    trace_lines: usize,
    /// Puts a known bug back into the core (to see the simulator catch it):
    /// ack-before-write, skip-chunk, promotion-skips-peer, accept-stale-completion,
    /// apply-out-of-order.
    #[arg(long)]
    inject: Vec<String>,
}

fn main() {
    let args = Args::parse();
    // A core's panic is caught and reported as a failure of its seed (with the
    // message); the default hook would print a backtrace for each as well.
    std::panic::set_hook(Box::new(|_| {}));
    let bugs = match blockd_sim::injected_bugs(&args.inject) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("blockd-sim: {e}");
            std::process::exit(2);
        }
    };
    let started = std::time::Instant::now();
    let next = AtomicU64::new(args.seed);
    let end = args.seed + args.seeds;
    let outcomes = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(args.seeds.max(1) as usize);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end {
                        break;
                    }
                    let mut config = blockd_sim::SimConfig::from_seed(seed);
                    config.verbose = args.verbose;
                    config.bugs = bugs;
                    let outcome = blockd_sim::run_config(config, args.steps);
                    outcomes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(outcome);
                }
            });
        }
    });
    let mut outcomes = outcomes.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    outcomes.sort_by_key(|o| o.seed);
    let (mut steps, mut failures, mut episodes, mut writes) = (0u64, 0u64, 0u64, 0u64);
    let (mut pull_aheads, mut rollbacks) = (0u64, 0u64);
    for o in &outcomes {
        steps += o.steps;
        pull_aheads += o.pull_aheads;
        rollbacks += o.rollbacks;
        episodes += o.episodes;
        writes += o.acked_writes;
        let Some(f) = &o.failure else { continue };
        failures += 1;
        println!(
            "seed {} FAILED at step {} ({:.3} s virtual): {}",
            o.seed,
            f.step,
            f.time_us as f64 / 1e6,
            f.invariant
        );
        println!("  {}", f.detail);
        println!("  config: {:?}", o.config);
        let skip = o.trace.len().saturating_sub(args.trace_lines);
        for line in &o.trace[skip..] {
            println!("    {line}");
        }
        println!(
            "  replay: cargo run --release -p blockd-sim -- --seeds 1 --seed {} --steps {} --verbose",
            o.seed, args.steps
        );
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{episodes} episodes converged, {writes} writes acknowledged, {pull_aheads} pull-aheads, \
         {rollbacks} rollbacks to a fallback image, \
         {:.0} steps/s on {threads} threads",
        steps as f64 / secs.max(1e-9)
    );
    println!("sim: {} seeds, {steps} steps, {failures} failures", outcomes.len());
    if failures > 0 {
        std::process::exit(1);
    }
}
