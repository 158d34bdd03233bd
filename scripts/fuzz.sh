#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time (default 15 s each;
# `scripts/fuzz.sh 300` for a longer session): the test command's fuzz step.
#
# cargo-fuzz passes nightly-only flags to rustc (-Zsanitizer=address, the
# sanitizer-coverage passes). RUSTC_BOOTSTRAP=1 makes the stable compiler accept
# them, and stable ships the address sanitizer's runtime, so no nightly is needed.
#
# Fails (exit 1) on any crash, panic, timeout or out-of-memory, printing the finding
# and the reproducer's path; fails loudly if cargo-fuzz cannot be installed. New
# inputs found go to a temporary directory, never into fuzz/corpus/.
#
# Cost on this 2-core machine kind: a cold build takes about 3.5 CPU-minutes (about
# 2 minutes when nothing else runs), then 10 targets x 15 s, two at a time: ~90 s.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-${BLOCKD_FUZZ_SECONDS:-15}}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    if ! cargo install --locked cargo-fuzz; then
        echo "FAIL: cargo-fuzz could not be installed (cargo install --locked cargo-fuzz); the fuzz targets did not run" >&2
        exit 1
    fi
fi

# The flags of `build` and `run` must match, or `run` builds again. Release with
# debug assertions (and overflow checks, as the daemon ships), address sanitizer;
# 16 codegen units build much faster than cargo-fuzz's default of 1 on two cores.
flags=(--release --debug-assertions --sanitizer address --codegen-units 16)
mapfile -t targets < <(cargo fuzz list)
if ((${#targets[@]} == 0)); then
    echo "FAIL: cargo fuzz list found no targets" >&2
    exit 1
fi
build_start=$SECONDS
cargo fuzz build "${flags[@]}"
echo "built ${#targets[@]} targets in $((SECONDS - build_start)) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Runs target $1; its log is $work/$1.log, its verdict $work/$1.ok or $work/$1.failed.
run_one() {
    local t=$1
    mkdir -p "$work/$t"
    # -timeout: one input taking 10 s is a hang. -rss_limit_mb: the 2 GiB default,
    # spelled out. -malloc_limit_mb: no single allocation over 128 MiB (the largest
    # legitimate one is a 32 MiB payload buffer), so an input that makes a parser
    # size a buffer from a claimed length fails here.
    if cargo fuzz run "${flags[@]}" "$t" "$work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=128 -print_final_stats=1 \
        >"$work/$t.log" 2>&1; then
        touch "$work/$t.ok"
    else
        touch "$work/$t.failed"
    fi
}

# Targets run side by side, one per core (BLOCKD_FUZZ_JOBS, default 2).
jobs="${BLOCKD_FUZZ_JOBS:-2}"
run_start=$SECONDS
running=()
for t in "${targets[@]}"; do
    run_one "$t" &
    running+=($!)
    if ((${#running[@]} >= jobs)); then
        wait "${running[0]}" || true
        running=("${running[@]:1}")
    fi
done
wait
failed=()
for t in "${targets[@]}"; do
    log="$work/$t.log"
    if [[ -e "$work/$t.ok" ]]; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
        cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
        echo "fuzz $t: ok, ${runs:-?} runs, ${rate:-?} exec/s, ${cov:-cov: ?}"
    else
        # The finding (a panic, a sanitizer report, libFuzzer's timeout or out-of-memory
        # verdict) and the stack under it; the whole log if none is recognised.
        if ! grep -E -A24 'panicked at|==[0-9]+==ERROR|^SUMMARY' "$log" >&2; then
            cat "$log" >&2
        fi
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        echo "FAIL: fuzz target $t; reproducer: ${artifact:-none written, see the log above}" >&2
        echo "      replay it: RUSTC_BOOTSTRAP=1 cargo fuzz run ${flags[*]} $t ${artifact:-<file>}" >&2
        failed+=("$t")
    fi
done
echo "ran ${#targets[@]} targets for ${seconds} s each, $jobs at a time, in $((SECONDS - run_start)) s"
if ((${#failed[@]})); then
    echo "FAIL: fuzz targets with findings: ${failed[*]}" >&2
    exit 1
fi
