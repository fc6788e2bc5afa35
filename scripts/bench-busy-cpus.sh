#!/usr/bin/env bash
# What a guest's steady writes pay when the machine's CPUs are busy with
# something else, with no tidemark involved: the same fio load as
# bench-run's rate steps (random 4-64 KiB O_DIRECT writes at a fixed rate
# on a 2 GiB loop device) alone, and next to each of these:
#   reader    a 1 MiB O_DIRECT reader of the same device at 200 MB/s,
#             8 reads in flight (the agent's reads, without its CPU work)
#   busy1     one busy loop (one CPU left idle)
#   busy      a busy loop per CPU, at nice 0
#   busy19    a busy loop per CPU, at nice 19
#   busyidle  a busy loop per CPU, SCHED_IDLE (runs only when nothing else
#             wants the CPU)
# and prints fio's completion latency (p50, p99, p99.9) for each. It
# separates what replication's I/O costs the guest from what its CPU
# use costs (docs/BENCHMARKS.md, "The guest's latency at a steady rate").
# ON_DIR=DIR writes to a 2 GiB file in DIR instead of the loop device
# (the loop driver completes each write on a worker thread of its own; a
# file on the VM's disk shows what a device without one pays).
# Usage (root): scripts/bench-busy-cpus.sh [RATE_MBPS] [SECONDS] [MODES...]
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-175}
secs=${2:-12}
shift 2 2>/dev/null || shift $#
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(none reader busy1 busy busy19 busyidle none)
[ "$(id -u)" -eq 0 ] || { echo "bench-busy-cpus: needs root" >&2; exit 1; }
command -v fio >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null; }
. scripts/bench-common.sh
work=$(mktemp -d "${ON_DIR:-/var/tmp}/tidemark-bench-busy.XXXXXX")
loopdev=""
cleanup() {
  # shellcheck disable=SC2046
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "$loopdev" ] && losetup -d "$loopdev" || true
  rm -rf "$work"
}
trap cleanup EXIT
# Written once, so every mode overwrites allocated blocks (bench-run does
# the same).
dd if=/dev/zero of="$work/disk.img" bs=1M count=2048 conv=fsync status=none
target=$work/disk.img
[ -n "${ON_DIR:-}" ] || { loopdev=$(bench_loop "$work/disk.img"); target=$loopdev; }
ncpu=$(nproc)
busy() { # count, then the command that runs each loop
  local n=$1
  shift
  for _ in $(seq 1 "$n"); do timeout $((secs + 2)) "$@" sh -c 'while :; do :; done' & done
}
printf '%-9s %9s %9s %9s %9s\n' mode "MB/s" "p50 us" "p99 us" "p99.9 us"
for mode in "${modes[@]}"; do
  case $mode in
    none) ;;
    reader)
      fio --name=reader --filename="$target" --ioengine=io_uring --direct=1 --rw=randread \
        --bs=1m --iodepth=8 --time_based --runtime=$((secs + 2)) --rate=200m >/dev/null &
      ;;
    busy1) busy 1 env ;;
    busy) busy "$ncpu" env ;;
    busy19) busy "$ncpu" nice -n 19 ;;
    busyidle) busy "$ncpu" chrt --idle 0 ;;
    *) echo "bench-busy-cpus: unknown mode $mode (none reader busy1 busy busy19 busyidle)" >&2; exit 1 ;;
  esac
  sleep 1
  fio --name=guest --filename="$target" --ioengine=io_uring --direct=1 --rw=randwrite \
    --bsrange=4k-64k --iodepth=16 --time_based --runtime="$secs" --randrepeat=0 \
    --rate="${rate}m" --output-format=json --output="$work/guest.json" >/dev/null
  python3 - "$work/guest.json" "$mode" <<'PY'
import json, sys
w = json.load(open(sys.argv[1]))["jobs"][0]["write"]
p = w["clat_ns"]["percentile"]
print(f'{sys.argv[2]:<9} {w["bw_bytes"] / 1e6:9.1f} {p["50.000000"] / 1e3:9.0f} {p["99.000000"] / 1e3:9.0f} {p["99.900000"] / 1e3:9.0f}')
PY
  wait
done
