#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) with libFuzzer,
# starting from the seed corpus in fuzz/corpus/<target>/. New inputs that
# widen coverage are kept in the corpus; a crash stops the script with the
# reproducer under fuzz/artifacts/<target>/ (copy it into the corpus so the
# normal tests replay it once fixed).
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cd fuzz && cargo +nightly fuzz list)
fi
for t in "${targets[@]}"; do
  echo "== fuzz $t for ${secs}s"
  mkdir -p "fuzz/corpus/$t"
  # -rss_limit_mb: the parsers must bound their own memory.
  log=$(mktemp)
  status=0
  (cd fuzz && cargo +nightly fuzz run "$t" "corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=1024 -max_len=1048576 -print_final_stats=1) \
    >"$log" 2>&1 || status=$?
  grep -E "stat::number_of_executed_units|SUMMARY|panicked" "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    echo "fuzz: $t found a crash (reproducer in fuzz/artifacts/$t)" >&2
    exit 1
  fi
  rm -f "$log"
done
echo "fuzz: every target ran ${secs}s without a crash"
