#!/usr/bin/env bash
# Benchmark: checksum resync of a loop device whose receiver image differs
# in 1 % of its 4 KiB blocks (scattered at random), side by side with
# `rsync --inplace --no-whole-file` of the same old and new images to an
# rsync daemon on 127.0.0.1; and the agent's hashing rate against fio's
# sequential io_uring read of the same device, twice: into fio's own
# buffers, and into buffers in huge pages (`--iomem=shmhuge`). A 1 MiB
# read into scattered pages is split by a loop device's queue limits, and
# fio's buffers are contiguous or not by chance, so the first swings
# between two rates from run to run; the second is what the device gives
# every time, and the harder reference. Bytes on the wire are
# counted on the loopback interface. Prints each run and the medians.
# Also prints the CPU time both tidemark processes spent on the resync,
# and the agent's hashing rate on its own: the agent's side of the same
# resync with the receiver's hashes already in hand (the `hash_rate`
# example of the agent crate), since here the receiver hashes on the same
# two cores.
# Usage (root): [PERF_OUT=FILE] scripts/bench-resync.sh [SIZE_MIB] [RUNS]
# TIDEMARK_BIN=DIR (another build) and LOOP_DIRECT_IO=1 (the loop device
# past the page cache): see scripts/bench-common.sh.
# PERF_OUT: record a system-wide profile (perf record -a -g) of each
# measured resync into FILE.N.
# AGENT_SETTINGS='queue_depth = 16' adds top-level agent settings (to
# compare tunings, alternating).
# RECEIVER_TMPFS=1 keeps the receiver's side (its image and journal, and
# rsync's destination file) on a tmpfs: the two sides then do not read
# the same virtual disk at once, as on two machines, and the hashing rate
# is the agent's own.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-4096}
runs=${2:-3}
[ "$(id -u)" -eq 0 ] || { echo "bench-resync: needs root" >&2; exit 1; }
scripts/install-deps.sh
for tool in rsync fio; do command -v $tool >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $tool >/dev/null; done
. scripts/bench-common.sh
bench_bin
# The agent's side alone: another build's if it brought one
# (TIDEMARK_BIN=DIR with DIR/examples/hash_rate), else this tree's.
hash_rate_bin=$bin/examples/hash_rate
if [ ! -x "$hash_rate_bin" ]; then
  cargo build --release --locked -q -p tidemark-agent --example hash_rate
  hash_rate_bin=$PWD/target/release/examples/hash_rate
fi
work=$(mktemp -d /var/tmp/tidemark-bench.XXXXXX)
loopdev=""
rx=""
rsyncd=""
rxfs=""
cleanup() {
  [ -n "$rx" ] && kill "$rx" 2>/dev/null && wait "$rx" 2>/dev/null || true
  [ -n "$rsyncd" ] && kill "$(cat "$work/rsyncd.pid" 2>/dev/null)" 2>/dev/null || true
  [ -n "$loopdev" ] && losetup -d "$loopdev" || true
  [ -n "$rxfs" ] && umount "$rxfs" || true
  rm -rf "$work"
}
trap cleanup EXIT
lo_bytes() { awk '/^ *lo:/ {print $2}' /proc/net/dev; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }

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
side=$work
if [ "${RECEIVER_TMPFS:-0}" = 1 ]; then
  rxfs=$work/rxfs
  mkdir -p "$rxfs"
  mount -t tmpfs -o size=$((size_mib * 3))m tidemark-bench "$rxfs"
  side=$rxfs
fi
port=$((20000 + RANDOM % 20000))
"$bin/tidemark-receiver" init --dir "$side/rx" --name bench --listen "127.0.0.1:$port" \
  --image-dir "$side/images" --retention-dir "$side/retention" --retention-on-root-filesystem >/dev/null
"$bin/tidemark-receiver" issue-cert --dir "$side/rx" --name bench-agent \
  --receiver "127.0.0.1:$port" --out "$work/agent" >/dev/null
printf 'state_dir = "%s"\n%s\n%s\n[[disk]]\ndevice = "%s"\nid = "bench-disk"\n' \
  "$work/agent/state" "${AGENT_SETTINGS:-}" "$(cat "$work/agent/agent.toml")" "$loopdev" > "$work/agent/agent.toml.new"
mv "$work/agent/agent.toml.new" "$work/agent/agent.toml"
"$bin/tidemark-receiver" serve --config "$side/rx/receiver.toml" 2> "$work/rx.log" &
rx=$!
for _ in $(seq 1 100); do grep -q "listening on" "$work/rx.log" && break; sleep 0.1; done
# With `profile` set (an array: a command to run the agent under), the
# agent runs under it.
profile=()
agent() { "${profile[@]}" "$bin/tidemark-agent" "$@" --config "$work/agent/agent.toml" 2>>"$work/agent.log" >/dev/null; }
# CPU seconds (user + system) of the receiver so far, and of the finished
# children of this shell (the agent runs).
rx_cpu() { awk -v t="$(getconf CLK_TCK)" '{print ($14 + $15) / t}' "/proc/$rx/stat"; }
# (`times` runs in this shell, not in a pipe's subshell, which has no
# finished children of its own.)
children_cpu() {
  times > "$work/times"
  awk 'NR == 2 {gsub(/[ms]/, " "); print $1 * 60 + $2 + $3 * 60 + $4}' "$work/times"
}
agent sync
cp --sparse=always "$work/disk.img" "$work/old.img"

# rsync daemon over loopback, writing into a copy of the old image.
mkdir -p "$side/rsync"
rport=$((port + 1))
cat > "$work/rsyncd.conf" <<EOF
pid file = $work/rsyncd.pid
port = $rport
address = 127.0.0.1
use chroot = no
[bench]
path = $side/rsync
read only = no
uid = root
gid = root
EOF
rsync --daemon --config="$work/rsyncd.conf"
rsyncd=1
sleep 0.5

# 1 % of the 4 KiB blocks, scattered; writes new random data into them
# and saves the old contents so the next run can start from the same state.
blocks=$((size_mib * 256))
change() {
  python3 - "$loopdev" "$blocks" "$1" "$work/undo.bin" <<'PY'
import os, random, sys
dev, blocks, seed, undo = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
chosen = sorted(rng.sample(range(blocks), blocks // 100))
fd = os.open(dev, os.O_RDWR)
with open(undo, "wb") as u:
    for b in chosen:
        u.write(b.to_bytes(8, "little") + os.pread(fd, 4096, b * 4096))
        os.pwrite(fd, os.urandom(4096), b * 4096)
os.fsync(fd)
os.close(fd)
PY
}
restore() {
  python3 - "$loopdev" "$work/undo.bin" <<'PY'
import os, sys
dev, undo = sys.argv[1], sys.argv[2]
fd = os.open(dev, os.O_RDWR)
data = open(undo, "rb").read()
for i in range(0, len(data), 4104):
    os.pwrite(fd, data[i + 8:i + 4104], int.from_bytes(data[i:i + 8], "little") * 4096)
os.fsync(fd)
os.close(fd)
PY
}

# fio's huge-page buffers come from the kernel's reserved pool: 16 MiB
# for 16 reads of 1 MiB, with room to spare. Given back on exit.
hugepages_before=$(cat /proc/sys/vm/nr_hugepages)
cleanup_hugepages() { echo "$hugepages_before" > /proc/sys/vm/nr_hugepages; cleanup; }
trap cleanup_hugepages EXIT
echo $((hugepages_before + 16)) > /proc/sys/vm/nr_hugepages
fio_read() {
  fio --name=seqread --filename="$loopdev" --rw=read --bs=1M --ioengine=io_uring \
    --direct=1 --iodepth=16 --readonly --output-format=json "$@" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["read"]["bw_bytes"] / 1e6)'
}

ours=(); cpu=(); theirs=(); ratio=(); wire_ours=(); wire_theirs=(); hash_rate=(); fio_rate=(); alone_rate=(); fio_huge_rate=()
for i in $(seq 1 "$runs"); do
  change "$i"
  cp --sparse=always "$work/disk.img" "$work/new.img"
  cp --sparse=always "$work/old.img" "$side/rsync/old.img"
  drop
  children_cpu > "$work/c0"; r0=$(rx_cpu)
  w0=$(lo_bytes); t0=$(date +%s.%N)
  [ -n "${PERF_OUT:-}" ] && profile=(perf record -q -a -g -o "$PERF_OUT.$i" --)
  agent resync --disk bench-disk --mode checksum
  profile=()
  t1=$(date +%s.%N); w1=$(lo_bytes)
  children_cpu > "$work/c1"
  cpu_agent=$(echo "$(cat "$work/c1") - $(cat "$work/c0")" | bc -l); cpu_rx=$(echo "$(rx_cpu) - $r0" | bc -l)
  drop
  t2=$(date +%s.%N)
  rsync --inplace --no-whole-file --ignore-times "$work/new.img" "rsync://127.0.0.1:$rport/bench/old.img"
  t3=$(date +%s.%N); w2=$(lo_bytes)
  cmp -s "$work/new.img" "$side/rsync/old.img" || { echo "rsync result differs" >&2; exit 1; }
  drop
  fio_bw=$(fio_read)
  drop
  fio_huge=$(fio_read --iomem=shmhuge)
  fio_huge_rate+=("$fio_huge")
  # The device still holds this run's changes, old.img what the resync
  # started from: the same comparison, the same blocks differing.
  alone_out=$("$hash_rate_bin" --config "$work/agent/agent.toml" --disk bench-disk --image "$work/old.img" --drop-caches)
  alone=$(echo "$alone_out" | sed -n 's/.*(\([0-9.]*\) MB\/s).*/\1/p')
  [ -n "$alone" ] || { echo "bench-resync: no rate in hash_rate's output: $alone_out" >&2; exit 1; }
  alone_rate+=("$alone")
  a=$(echo "$t1 - $t0" | bc -l); b=$(echo "$t3 - $t2" | bc -l)
  hr=$(echo "$size_mib * 1.048576 / $a" | bc -l)
  ours+=("$a"); theirs+=("$b"); ratio+=("$(echo "$b / $a" | bc -l)")
  wire_ours+=("$((w1 - w0))"); wire_theirs+=("$((w2 - w1))")
  hash_rate+=("$hr"); fio_rate+=("$fio_bw")
  cpu+=("$(echo "$cpu_agent + $cpu_rx" | bc -l)")
  printf 'run %d: checksum resync %.2f s (%d wire bytes, hashing %.0f MB/s, CPU agent %.2f s receiver %.2f s)   rsync %.2f s (%d wire bytes)   rsync/ours %.1fx   fio read %.0f MB/s, into huge pages %.0f MB/s   agent alone %.0f MB/s (%.2f of fio, %.2f of fio into huge pages)\n' \
    "$i" "$a" "$((w1 - w0))" "$hr" "$cpu_agent" "$cpu_rx" "$b" "$((w2 - w1))" "$(echo "$b / $a" | bc -l)" "$fio_bw" "$fio_huge" \
    "$alone" "$(echo "$alone / $fio_bw" | bc -l)" "$(echo "$alone / $fio_huge" | bc -l)"
  # Back to the old contents for the next run (itself a checksum resync).
  restore
  agent resync --disk bench-disk --mode checksum
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf 'median over %d runs, %d MiB, 1%% of blocks changed: checksum resync %.2f s (CPU %.2f s), rsync %.2f s, rsync/ours %.1fx; wire bytes ours %d, rsync %d; hashing %.0f MB/s vs fio %.0f MB/s (%.2f), vs fio into huge pages %.0f MB/s (%.2f); agent alone %.0f MB/s (%.2f of fio, %.2f of fio into huge pages)\n' \
  "$runs" "$size_mib" "$(median "${ours[@]}")" "$(median "${cpu[@]}")" "$(median "${theirs[@]}")" "$(median "${ratio[@]}")" \
  "$(median "${wire_ours[@]}")" "$(median "${wire_theirs[@]}")" "$(median "${hash_rate[@]}")" \
  "$(median "${fio_rate[@]}")" "$(echo "$(median "${hash_rate[@]}") / $(median "${fio_rate[@]}")" | bc -l)" \
  "$(median "${fio_huge_rate[@]}")" "$(echo "$(median "${hash_rate[@]}") / $(median "${fio_huge_rate[@]}")" | bc -l)" \
  "$(median "${alone_rate[@]}")" "$(echo "$(median "${alone_rate[@]}") / $(median "${fio_rate[@]}")" | bc -l)" \
  "$(echo "$(median "${alone_rate[@]}") / $(median "${fio_huge_rate[@]}")" | bc -l)"
