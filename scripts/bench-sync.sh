#!/usr/bin/env bash
# Benchmark: a full `tidemark-agent sync` of a loop device to a receiver on
# 127.0.0.1 (io_uring reads, zstd, TLS, checksum verify, fsync'd sparse
# image), side by side with `qemu-img convert` copying the same device to a
# local sparse raw file. Prints each run, the median ratio ours/qemu, and
# the CPU time agent and receiver spent per GiB of disk.
# Usage (root): scripts/bench-sync.sh [SIZE_MIB] [RUNS]
# AGENT_SETTINGS='sync_queue_depth = 8' adds top-level agent settings (to
# compare tunings, alternating).
# TIDEMARK_BIN=DIR (another build) and LOOP_DIRECT_IO=1 (the loop device
# past the page cache): see scripts/bench-common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
runs=${2:-3}
[ "$(id -u)" -eq 0 ] || { echo "bench-sync: needs root" >&2; exit 1; }
scripts/install-deps.sh
. scripts/bench-common.sh
bench_bin
work=$(mktemp -d /var/tmp/tidemark-bench.XXXXXX)
loopdev=""
rx=""
cleanup() {
  [ -n "$rx" ] && kill "$rx" 2>/dev/null && wait "$rx" 2>/dev/null || true
  [ -n "$loopdev" ] && losetup -d "$loopdev" || true
  rm -rf "$work"
}
trap cleanup EXIT

# Mixed content: per 8 MiB block, 3 MiB random, 2 MiB compressible text, 3 MiB zeros.
truncate -s "${size_mib}M" "$work/disk.img"
python3 - "$work/disk.img" "$size_mib" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
text = b"".join(b"%08d the quick brown fox jumps over the lazy dog\n" % i for i in range(40000))
with open(path, "r+b") as f:
    for blk in range(0, mib, 8):
        f.seek(blk << 20)
        f.write(os.urandom(3 << 20))
        f.write(text[: 2 << 20])
PY
loopdev=$(bench_loop "$work/disk.img")
port=$((20000 + RANDOM % 20000))
"$bin/tidemark-receiver" init --dir "$work/rx" --name bench --listen "127.0.0.1:$port" \
  --image-dir "$work/images" --retention-dir "$work/retention" --retention-on-root-filesystem >/dev/null
"$bin/tidemark-receiver" issue-cert --dir "$work/rx" --name bench-agent \
  --receiver "127.0.0.1:$port" --out "$work/agent" >/dev/null
printf '\n%s\n[[disk]]\ndevice = "%s"\nid = "bench-disk"\n' "${AGENT_SETTINGS:-}" "$loopdev" >> "$work/agent/agent.toml"
"$bin/tidemark-receiver" serve --config "$work/rx/receiver.toml" 2> "$work/rx.log" &
rx=$!
for _ in $(seq 1 100); do grep -q "listening on" "$work/rx.log" && break; sleep 0.1; done

ours=()
theirs=()
agent_cpu=()
rx_cpu=()
hz=$(getconf CLK_TCK)
rx_ticks() { awk '{print $14 + $15}' "/proc/$rx/stat"; }
TIMEFORMAT='%U %S'
for i in $(seq 1 "$runs"); do
  # Each sync after the first overwrites the image through the undo
  # journal; start from nothing so every run does the same work.
  kill "$rx"; wait "$rx" 2>/dev/null || true
  rm -rf "$work/images"/* "$work/retention"/*
  "$bin/tidemark-receiver" serve --config "$work/rx/receiver.toml" 2> "$work/rx.log" &
  rx=$!
  for _ in $(seq 1 100); do grep -q "listening on" "$work/rx.log" && break; sleep 0.1; done
  sync; echo 3 > /proc/sys/vm/drop_caches
  r0=$(rx_ticks)
  t0=$(date +%s.%N)
  # `time` reports the agent's user and system CPU; its own output is
  # dropped.
  cpu=$( { time "$bin/tidemark-agent" sync --config "$work/agent/agent.toml" >/dev/null 2>&1; } 2>&1 )
  t1=$(date +%s.%N)
  r1=$(rx_ticks)
  ac=$(echo "$cpu" | awk '{print $1 + $2}')
  rc=$(echo "($r1 - $r0) / $hz" | bc -l)
  agent_cpu+=("$ac"); rx_cpu+=("$rc")
  sync; echo 3 > /proc/sys/vm/drop_caches
  rm -f "$work/qemu.raw"
  t2=$(date +%s.%N)
  qemu-img convert -f raw -O raw "$loopdev" "$work/qemu.raw"
  sync -f "$work/qemu.raw"
  t3=$(date +%s.%N)
  a=$(echo "$t1 - $t0" | bc -l); b=$(echo "$t3 - $t2" | bc -l)
  ours+=("$a"); theirs+=("$b")
  printf 'run %d: tidemark sync %.2f s (%.0f MB/s)   qemu-img convert %.2f s (%.0f MB/s)   ratio %.2f   CPU agent %.2f s, receiver %.2f s\n' \
    "$i" "$a" "$(echo "$size_mib * 1.048576 / $a" | bc -l)" "$b" "$(echo "$size_mib * 1.048576 / $b" | bc -l)" "$(echo "$a / $b" | bc -l)" "$ac" "$rc"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mo=$(median "${ours[@]}"); mt=$(median "${theirs[@]}")
printf 'median over %d runs, %d MiB: tidemark %.2f s, qemu-img %.2f s, ratio ours/qemu %.2f\n' \
  "$runs" "$size_mib" "$mo" "$mt" "$(echo "$mo / $mt" | bc -l)"
printf 'median CPU per GiB of disk: agent %.3f s, receiver %.3f s\n' \
  "$(echo "$(median "${agent_cpu[@]}") * 1024 / $size_mib" | bc -l)" \
  "$(echo "$(median "${rx_cpu[@]}") * 1024 / $size_mib" | bc -l)"
