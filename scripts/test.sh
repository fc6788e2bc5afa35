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
cargo test --workspace --locked
scripts/quickstart.sh
