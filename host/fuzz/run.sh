#!/bin/sh
# Run fuzz targets with libFuzzer for a bounded time each (docs/fuzzing.md).
#
#   host/fuzz/run.sh [SECONDS] [TARGET...]     default: 300 s, every target
#
# New inputs go to host/fuzz/target/work/<target> (not committed); the committed
# corpus host/fuzz/corpus/<target> is read only. Crashes land in
# host/fuzz/artifacts/<target>/. Logs: host/fuzz/target/work/<target>.log.
# Stable rustc needs RUSTC_BOOTSTRAP=1 for cargo-fuzz's -Z flags.
set -eu
cd "$(dirname "$0")"
seconds=${1:-300}
[ $# -gt 0 ] && shift
targets=${*:-"wire consensus_message consensus_storage abi guest_snapshot guest_module local_input"}

max_len() {
    case $1 in
        guest_snapshot) echo 327680 ;;
        abi|guest_module|local_input) echo 16384 ;;
        *) echo 65536 ;;
    esac
}

export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none --codegen-units 16
for t in $targets; do
    mkdir -p "target/work/$t"
    echo "== $t ($seconds s)"
    cargo fuzz run -s none --codegen-units 16 "$t" "target/work/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -max_len="$(max_len "$t")" -timeout=10 \
        -rss_limit_mb=2048 -malloc_limit_mb=512 -print_final_stats=1 \
        >"target/work/$t.log" 2>&1 || echo "   $t stopped with a finding: see target/work/$t.log"
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)|cov: ' \
        "target/work/$t.log" | tail -5
done
