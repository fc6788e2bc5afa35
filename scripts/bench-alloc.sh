#!/usr/bin/env bash
# Benchmark: what the receiver's fallocate before each write into a raw or
# flat image costs and saves (receiver/src/image/storage.rs,
# FileStorage::allocate_exact), on ext4 and XFS. The receiver's pattern
# without the rest of it: 20000 writes of 4-64 KiB at random 4 KiB-aligned
# offsets of an 8 GiB file, fdatasync every 150 writes; once into a sparse
# file (new data into holes), once over the same file filled with data
# (overwrites), each plain and with fallocate(KEEP_SIZE) of the range
# first. Prints CPU and wall seconds per variant, medians over RUNS.
# Usage (root): scripts/bench-alloc.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
[ "$(id -u)" -eq 0 ] || { echo "bench-alloc: needs root" >&2; exit 1; }
scripts/install-deps.sh
work=$(mktemp -d /var/tmp/tidemark-bench.XXXXXX)
loopdev=""
cleanup() {
  if mountpoint -q "$work/mnt"; then umount "$work/mnt" || umount -l "$work/mnt"; fi
  [ -n "$loopdev" ] && losetup -d "$loopdev" || true
  rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/writes.py" <<'EOF'
import ctypes, os, random, resource, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
path, allocate, seed = sys.argv[1], sys.argv[2] == "fallocate", int(sys.argv[3])
SIZE = 8 << 30
KEEP_SIZE = 1
fd = os.open(path, os.O_RDWR | os.O_CREAT)
if os.fstat(fd).st_size == 0:
    os.ftruncate(fd, SIZE)
rng = random.Random(seed)
data = os.urandom(64 << 10)
t0, r0 = time.time(), resource.getrusage(resource.RUSAGE_SELF)
for i in range(20000):
    n = rng.choice([4, 8, 16, 32, 64]) << 10
    at = rng.randrange(0, SIZE - n) & ~4095
    if allocate and libc.fallocate(fd, KEEP_SIZE, at, n) != 0:
        sys.exit(f"fallocate: errno {ctypes.get_errno()}")
    os.pwrite(fd, data[:n], at)
    if i % 150 == 149:
        os.fdatasync(fd)
os.fdatasync(fd)
r1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
print(f"{cpu:.3f} {time.time() - t0:.3f}")
EOF

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '%-5s %-11s %-10s %14s %14s\n' fs writes variant "CPU s (med)" "wall s (med)"
for fs in ext4 xfs; do
  truncate -s 12G "$work/fs.img"
  if [ "$fs" = xfs ]; then mkfs.xfs -q -f "$work/fs.img"
  else mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$work/fs.img"; fi
  loopdev=$(losetup --find --show "$work/fs.img")
  mkdir -p "$work/mnt"
  mount "$loopdev" "$work/mnt"
  for kind in new over; do
    for variant in plain fallocate; do
      cpus=(); walls=()
      for r in $(seq 1 "$runs"); do
        f="$work/mnt/image"
        rm -f "$f"
        if [ "$kind" = over ]; then
          dd if=/dev/zero of="$f" bs=4M count=2048 status=none
          sync
        fi
        out=$(python3 "$work/writes.py" "$f" "$variant" "$r")
        read -r cpu wall <<< "$out"
        cpus+=("$cpu"); walls+=("$wall")
        rm -f "$f"
      done
      printf '%-5s %-11s %-10s %14s %14s\n' "$fs" "$kind" "$variant" \
        "$(printf '%s\n' "${cpus[@]}" | median)" "$(printf '%s\n' "${walls[@]}" | median)"
    done
  done
  umount "$work/mnt"
  losetup -d "$loopdev"
  loopdev=""
done
