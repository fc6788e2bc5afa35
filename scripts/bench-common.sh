# Sourced by the bench-*.sh scripts, from the project root.

# Sets `bin` to the directory of the binaries to measure:
# TIDEMARK_BIN=DIR (or BIN=DIR, its older name) names another build's,
# for A/B runs that alternate two builds in one sitting; without it,
# this tree's release build, built first.
bench_bin() {
  bin=${TIDEMARK_BIN:-${BIN:-}}
  if [ -z "$bin" ]; then
    cargo build --release --locked -q -p tidemark-agent -p tidemark-receiver
    bin=$PWD/target/release
  fi
}

# Attaches FILE to a free loop device and prints the device's path.
# LOOP_DIRECT_IO=1 attaches it with direct I/O: the loop driver then
# reads and writes FILE past the page cache, as a disk would be read and
# written, instead of through cache pages of its own. On this project's
# VMs a new cache page costs a fault in the host, so a buffered loop
# device reads at a fraction of the virtual disk's speed
# (docs/BENCHMARKS.md: its opening lines, and the checksum resync section).
bench_loop() {
  local dio=off
  [ "${LOOP_DIRECT_IO:-0}" = 1 ] && dio=on
  losetup --find --show --direct-io="$dio" "$1"
}
