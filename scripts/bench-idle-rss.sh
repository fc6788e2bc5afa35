#!/usr/bin/env bash
# Memory of a quiet agent: `tidemark-agent run` on a 2 GiB loop device is
# started, takes its first point, is stopped with SIGTERM and started
# again (so it resumes from its saved state without a resync, as after an
# upgrade), then sees 200 random 4 KiB writes over 10 s and takes a
# point. Prints the agent's RSS and peak RSS at the end.
# Usage (root): scripts/bench-idle-rss.sh
# TIDEMARK_BIN=DIR (another build) and LOOP_DIRECT_IO=1 (the loop device
# past the page cache): see scripts/bench-common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench-idle-rss: needs root" >&2; exit 1; }
scripts/install-deps.sh
. scripts/bench-common.sh
bench_bin
work=$(mktemp -d /var/tmp/tidemark-idle-rss.XXXXXX)
loopdev=""; rx=""; ag=""
cleanup() {
  [ -n "$ag" ] && kill "$ag" 2>/dev/null && wait "$ag" 2>/dev/null || true
  [ -n "$rx" ] && kill "$rx" 2>/dev/null && wait "$rx" 2>/dev/null || true
  rmdir /sys/kernel/tracing/instances/tidemark-idle-rss 2>/dev/null || true
  [ -n "$loopdev" ] && losetup -d "$loopdev" || true
  rm -rf "$work"
}
trap cleanup EXIT
truncate -s 2G "$work/disk.img"
loopdev=$(bench_loop "$work/disk.img")
port=$((20000 + RANDOM % 20000))
"$bin/tidemark-receiver" init --dir "$work/rx" --name idle --listen "127.0.0.1:$port" \
  --image-dir "$work/images" --retention-dir "$work/retention" --retention-on-root-filesystem >/dev/null
"$bin/tidemark-receiver" issue-cert --dir "$work/rx" --name idle-rss \
  --receiver "127.0.0.1:$port" --out "$work/agent" >/dev/null
cfg=$work/agent/run.toml
{
  printf 'state_dir = "%s"\nadmin_socket = "%s"\n' "$work/state" "$work/agent.sock"
  printf 'crash_consistent_interval_secs = 0\napp_consistent_interval_secs = 0\n'
  cat "$work/agent/agent.toml"
  printf '\n[[disk]]\ndevice = "%s"\nid = "idle-disk"\n' "$loopdev"
} > "$cfg"
"$bin/tidemark-receiver" serve --config "$work/rx/receiver.toml" 2> "$work/rx.log" &
rx=$!
for _ in $(seq 1 100); do grep -q "listening on" "$work/rx.log" && break; sleep 0.1; done
start_agent() {
  "$bin/tidemark-agent" run --config "$cfg" 2> "$work/agent-$1.log" &
  ag=$!
  for _ in $(seq 1 300); do grep -q "replicating" "$work/agent-$1.log" && break; sleep 0.1; done
  "$bin/tidemark-agent" bookmark --config "$cfg" >/dev/null 2>&1
}
start_agent 1
kill "$ag"; wait "$ag" || true; ag=""
start_agent 2
grep -q "resuming from saved state" "$work/agent-2.log" || { echo "bench-idle-rss: the agent did not resume from its state" >&2; exit 1; }
if grep -q "resync required" "$work/agent-2.log"; then
  echo "bench-idle-rss: the restarted agent resynced, so this is not the quiet case" >&2; exit 1
fi
for _ in $(seq 1 20); do
  for _ in $(seq 1 10); do
    dd if=/dev/urandom of="$loopdev" bs=4k count=1 seek=$((RANDOM * 16)) oflag=direct conv=notrunc status=none
  done
  sleep 0.5
done
"$bin/tidemark-agent" bookmark --config "$cfg" >/dev/null 2>&1
awk '/VmRSS|VmHWM/ {printf "%s %.1f MiB  ", $1, $2 / 1024} END {print ""}' "/proc/$ag/status"
