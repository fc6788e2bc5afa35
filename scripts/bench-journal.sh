#!/usr/bin/env bash
# Benchmark of the retention journal (issue 5's figures), with a real agent
# and receiver on 127.0.0.1:
#  1. apply throughput with the journal on vs writing the image directly:
#     a full sync into a new image (no history yet: nothing to journal)
#     against a full sync of new content over it (every overwrite saves its
#     pre-image in the undo journal first); same bytes, same zero layout;
#  2. journal bytes per byte of churn on mixed data (from 1, and from the
#     rounds of 3);
#  3. export of a point ROUNDS rounds of churn deep (a stand-in for 24 h
#     of hourly churn) against `qemu-img convert` of the live image to raw,
#     page cache dropped before each; the export is checked byte for byte.
# Usage (root): scripts/bench-journal.sh [SIZE_MIB] [RUNS] [ROUNDS] [CHURN_MIB_PER_ROUND]
# TIDEMARK_BIN=DIR (another build) and LOOP_DIRECT_IO=1 (the loop device
# past the page cache): see scripts/bench-common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-4096}
runs=${2:-3}
rounds=${3:-24}
churn_mib=${4:-64}
[ "$(id -u)" -eq 0 ] || { echo "bench-journal: needs root" >&2; exit 1; }
scripts/install-deps.sh
. scripts/bench-common.sh
bench_bin
work=$(mktemp -d /var/tmp/tidemark-bench-journal.XXXXXX)
loopdev=""
rx=""
cleanup() {
  [ -n "$rx" ] && kill "$rx" 2>/dev/null && wait "$rx" 2>/dev/null || true
  [ -n "$loopdev" ] && losetup -d "$loopdev" || true
  rm -rf "$work"
}
trap cleanup EXIT

# Per 8 MiB: 3 MiB random, 2 MiB compressible text, 3 MiB zeros; SEED
# picks the random bytes and the text's numbering.
fill() {
  python3 - "$1" "$size_mib" "$2" <<'PY'
import os, random, sys
path, mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
text = b"".join(b"%08d the quick brown fox jumps over the lazy dog\n" % (i + seed) for i in range(40000))
with open(path, "r+b") as f:
    for blk in range(0, mib, 8):
        f.seek(blk << 20)
        f.write(rng.randbytes(3 << 20))
        f.write(text[: 2 << 20])
    f.flush()
    os.fsync(f.fileno())
PY
}

# CHURN MiB at random 4 KiB-aligned offsets, 64 KiB to 1 MiB per write,
# mixed like the fill (random, text, zeros in turn).
churn() {
  python3 - "$loopdev" "$size_mib" "$churn_mib" "$1" <<'PY'
import os, random, sys
dev, mib, churn, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
text = b"".join(b"%08d pack my box with five dozen liquor jugs\n" % i for i in range(30000))
left = churn << 20
k = 0
with open(dev, "r+b", buffering=0) as f:
    while left > 0:
        n = min(left, rng.randrange(16, 257) * 4096)
        at = rng.randrange(0, ((mib << 20) - n) // 4096) * 4096
        kind = k % 3
        data = rng.randbytes(n) if kind == 0 else (text[:n] if kind == 1 else bytes(n))
        f.seek(at)
        f.write(data)
        left -= n
        k += 1
    os.fsync(f.fileno())
PY
}

du_bytes() { du -sb --apparent-size "$1" 2>/dev/null | cut -f1; }
alloc_bytes() { du -sB1 "$1" 2>/dev/null | cut -f1; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now() { date +%s.%N; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

truncate -s "${size_mib}M" "$work/disk.img"
loopdev=$(bench_loop "$work/disk.img")
port=$((20000 + RANDOM % 20000))
"$bin/tidemark-receiver" init --dir "$work/rx" --name bench --listen "127.0.0.1:$port" \
  --image-dir "$work/images" --retention-dir "$work/retention" --retention-on-root-filesystem >/dev/null
"$bin/tidemark-receiver" issue-cert --dir "$work/rx" --name bench-agent \
  --receiver "127.0.0.1:$port" --out "$work/agent" >/dev/null
printf '\n[[disk]]\ndevice = "%s"\nid = "bench-disk"\n' "$loopdev" >> "$work/agent/agent.toml"
start_rx() {
  "$bin/tidemark-receiver" serve --config "$work/rx/receiver.toml" 2> "$work/rx.log" &
  rx=$!
  for _ in $(seq 1 100); do grep -q "listening on" "$work/rx.log" && break; sleep 0.1; done
}
sync_point() { "$bin/tidemark-agent" sync --config "$work/agent/agent.toml" "$@" 2>>"$work/agent.log"; }

nonzero_mib=$((size_mib / 8 * 5))
direct=(); journal=(); jratio=()
for i in $(seq 1 "$runs"); do
  [ -n "$rx" ] && { kill "$rx"; wait "$rx" 2>/dev/null || true; }
  rm -rf "$work/images"/* "$work/retention"/*
  start_rx
  fill "$loopdev" "$((i * 2))"
  drop_caches
  t0=$(now); sync_point --mode full >/dev/null; t1=$(now)
  fill "$loopdev" "$((i * 2 + 1))"
  drop_caches
  t2=$(now); p0=$(sync_point --mode full); t3=$(now)
  a=$(echo "$t1 - $t0" | bc -l); b=$(echo "$t3 - $t2" | bc -l)
  j=$(alloc_bytes "$work/retention/undo")
  r=$(echo "$j / ($nonzero_mib * 1048576)" | bc -l)
  direct+=("$a"); journal+=("$b"); jratio+=("$r")
  printf 'run %d: direct %.2f s (%.0f MB/s)   through the journal %.2f s (%.0f MB/s)   journal/direct throughput %.2f   journal %.0f MiB for %d MiB overwritten (%.2f)\n' \
    "$i" "$a" "$(echo "$nonzero_mib * 1.048576 / $a" | bc -l)" "$b" "$(echo "$nonzero_mib * 1.048576 / $b" | bc -l)" \
    "$(echo "$a / $b" | bc -l)" "$(echo "$j / 1048576" | bc -l)" "$nonzero_mib" "$r"
done
md=$(median "${direct[@]}"); mj=$(median "${journal[@]}")
printf 'apply: median direct %.2f s, through the journal %.2f s: journal/direct throughput %.2f (target >= 0.7)\n' \
  "$md" "$mj" "$(echo "$md / $mj" | bc -l)"
printf 'journal bytes per byte overwritten (full overwrite, mixed data): median %.2f (target <= 0.6)\n' "$(median "${jratio[@]}")"

# The device as of point p0, to check the export against.
cp --sparse=always "$work/disk.img" "$work/at-p0.raw"
j_before=$(alloc_bytes "$work/retention/undo")
t_rounds0=$(now)
for r in $(seq 1 "$rounds"); do
  churn "$r"
  sync_point >/dev/null
done
t_rounds1=$(now)
j_after=$(alloc_bytes "$work/retention/undo")
printf '%d rounds of %d MiB churn (checksum syncs, %.0f s): journal grew %.0f MiB: %.2f bytes per byte of churn\n' \
  "$rounds" "$churn_mib" "$(echo "$t_rounds1 - $t_rounds0" | bc -l)" "$(echo "($j_after - $j_before) / 1048576" | bc -l)" \
  "$(echo "($j_after - $j_before) / ($rounds * $churn_mib * 1048576)" | bc -l)"

ex=(); qe=()
for i in $(seq 1 "$runs"); do
  rm -f "$work/export.raw" "$work/qemu.raw"
  drop_caches
  t0=$(now)
  "$bin/tidemark-receiver" export --config "$work/rx/receiver.toml" --disk bench-disk \
    --point "$p0" --format raw --out "$work/export.raw" >/dev/null
  t1=$(now)
  cmp "$work/export.raw" "$work/at-p0.raw" || { echo "bench-journal: export of point $p0 differs from the device then" >&2; exit 1; }
  drop_caches
  t2=$(now)
  qemu-img convert -f vmdk -O raw "$work/images/bench-disk-hosted.vmdk" "$work/qemu.raw"
  sync -f "$work/qemu.raw"
  t3=$(now)
  a=$(echo "$t1 - $t0" | bc -l); b=$(echo "$t3 - $t2" | bc -l)
  ex+=("$a"); qe+=("$b")
  printf 'export %d: point %s, %d rounds deep: %.2f s   qemu-img convert of the live image: %.2f s   ratio %.2f\n' \
    "$i" "$p0" "$rounds" "$a" "$b" "$(echo "$a / $b" | bc -l)"
done
me=$(median "${ex[@]}"); mq=$(median "${qe[@]}")
printf 'export: median %.2f s vs qemu-img convert %.2f s: ratio %.2f (target <= 1.2)\n' "$me" "$mq" "$(echo "$me / $mq" | bc -l)"
