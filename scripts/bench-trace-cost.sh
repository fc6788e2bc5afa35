#!/usr/bin/env bash
# What recording block completions in a tracefs instance costs a guest
# that writes as fast as it can, with no tidemark process at all: the
# same fio load as bench-run (random 4-64 KiB O_DIRECT writes, io_uring,
# iodepth 16, unthrottled) on a 2 GiB loop device over a tmpfs, with the
# agent's event and filter (`block_rq_complete`, the device, writes,
# discards and write-zeroes) disabled and enabled in turn. Nothing reads
# the ring (it overwrites itself): this is the kernel's side of the
# tracking alone, to set beside bench-run's TRACKING_ONLY=1 figures
# (the agent tracking too) in docs/BENCHMARKS.md.
# Usage (root): scripts/bench-trace-cost.sh [SECONDS] [PAIRS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
pairs=${2:-3}
[ "$(id -u)" -eq 0 ] || { echo "bench-trace-cost: needs root" >&2; exit 1; }
command -v fio >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null; }
work=$(mktemp -d /var/tmp/tidemark-bench-trace.XXXXXX)
inst=/sys/kernel/tracing/instances/tidemark-bench-trace-cost
loopdev=""
mounted=""
cleanup() {
  if [ -d "$inst" ]; then
    echo 0 > "$inst/events/block/block_rq_complete/enable" || true
    rmdir "$inst" || true
  fi
  [ -n "$loopdev" ] && losetup -d "$loopdev" || true
  [ -n "$mounted" ] && umount "$work" || true
  rm -rf "$work"
}
trap cleanup EXIT
mount -t tmpfs -o size=2200m tidemark-bench-trace "$work"
mounted=1
# Written once, so every run overwrites allocated pages.
dd if=/dev/zero of="$work/disk.img" bs=1M count=2048 status=none
loopdev=$(losetup --find --show "$work/disk.img")
devt=$(( (16#$(stat -c %t "$loopdev") << 20) | 16#$(stat -c %T "$loopdev") ))
mkdir "$inst"
echo 4096 > "$inst/buffer_size_kb"
echo "dev == $devt && nr_sector != 0 && rwbs ~ \"*[WDN]*\"" > "$inst/events/block/block_rq_complete/filter"
printf '%-8s %10s %9s\n' mode "MB/s" "p99 us"
for _ in $(seq 1 "$pairs"); do
  for mode in alone traced; do
    enable=0
    [ "$mode" = traced ] && enable=1
    echo "$enable" > "$inst/events/block/block_rq_complete/enable"
    fio --name=guest --filename="$loopdev" --ioengine=io_uring --direct=1 --rw=randwrite \
      --bsrange=4k-64k --iodepth=16 --time_based --runtime="$secs" --randrepeat=0 \
      --output-format=json --output="$work/guest.json" >/dev/null
    python3 - "$work/guest.json" "$mode" <<'PY'
import json, sys
w = json.load(open(sys.argv[1]))["jobs"][0]["write"]
print(f'{sys.argv[2]:<8} {w["bw_bytes"] / 1e6:10.1f} {w["clat_ns"]["percentile"]["99.000000"] / 1e3:9.0f}')
PY
  done
done
echo "events recorded on cpu0 (most overwritten): $(awk '/^entries|^overrun/ {s += $2} END {print s}' "$inst/per_cpu/cpu0/stats")"
