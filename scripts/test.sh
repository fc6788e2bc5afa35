#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit/property tests, and the
# end-to-end tests on real loop devices with real TLS (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: the end-to-end tests need root (loop devices); run it as root" >&2
  exit 1
fi
scripts/install-deps.sh

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Tests that share kernel resources serialize on a lock of their own;
# everything else runs in parallel.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
scripts/quickstart.sh
# One closing line over every test binary (doc-test runs report 0 tests).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
