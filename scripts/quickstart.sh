#!/usr/bin/env bash
# tidemark end to end on this machine, as root: builds, makes certificates,
# puts a filesystem with files on a loop device, starts a receiver on
# 127.0.0.1, syncs the disk with the agent, lists the recovery point and
# checks the exported image against the device byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "quickstart: needs root (loop devices, raw disk reads); run it as root" >&2
  exit 1
fi
scripts/install-deps.sh
cargo build --release --locked -p tidemark-agent -p tidemark-receiver
bin=$PWD/target/release

work=${TIDEMARK_QUICKSTART_DIR:-/tmp/tidemark-quickstart}
port=${TIDEMARK_QUICKSTART_PORT:-10443}
rm -rf "$work"
mkdir -p "$work"
loopdev=""
mnt="$work/mnt"
receiver_pid=""
cleanup() {
  [ -n "$receiver_pid" ] && kill "$receiver_pid" 2>/dev/null && wait "$receiver_pid" 2>/dev/null || true
  mountpoint -q "$mnt" 2>/dev/null && umount "$mnt" || true
  [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null || true
}
trap cleanup EXIT

echo "== receiver: CA, certificate, receiver.toml"
"$bin/tidemark-receiver" init --dir "$work/receiver" --name quickstart-receiver \
  --listen "127.0.0.1:$port" --image-dir "$work/images" --retention-dir "$work/retention" --retention-on-root-filesystem
"$bin/tidemark-receiver" issue-cert --dir "$work/receiver" --name quickstart-agent \
  --receiver "127.0.0.1:$port" --out "$work/agent"

echo "== a 256 MiB disk with an ext4 filesystem and some files"
truncate -s 256M "$work/disk.img"
loopdev=$(losetup --find --show "$work/disk.img")
mkfs.ext4 -q -F "$loopdev"
mkdir -p "$mnt"
mount "$loopdev" "$mnt"
head -c 48M /dev/urandom > "$mnt/random.bin"
for i in $(seq 1 2000); do echo "line $i of a compressible log file"; done > "$mnt/log.txt"
cp -r /etc/apt "$mnt/etc-apt" 2>/dev/null || true
umount "$mnt"
cat >> "$work/agent/agent.toml" <<TOML

[[disk]]
device = "$loopdev"
id = "quickstart-disk"
TOML

echo "== start the receiver"
"$bin/tidemark-receiver" serve --config "$work/receiver/receiver.toml" 2> "$work/receiver.log" &
receiver_pid=$!
for _ in $(seq 1 100); do
  grep -q "listening on" "$work/receiver.log" && break
  sleep 0.1
done
grep -q "listening on" "$work/receiver.log" || { cat "$work/receiver.log"; exit 1; }

echo "== sync the disk"
point=$("$bin/tidemark-agent" sync --config "$work/agent/agent.toml")
echo "recovery point: $point"

echo "== recovery points"
"$bin/tidemark-receiver" points --config "$work/receiver/receiver.toml"

echo "== export the latest point and compare with the device"
"$bin/tidemark-receiver" export --config "$work/receiver/receiver.toml" \
  --disk quickstart-disk --point latest --format raw --out "$work/export.raw"
cmp "$work/export.raw" "$loopdev"
qemu-img compare -f raw -F raw "$work/export.raw" "$loopdev"
echo "quickstart OK: exported point $point equals $loopdev byte for byte"
