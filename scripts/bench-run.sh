#!/usr/bin/env bash
# Benchmark of continuous replication (`tidemark-agent run`) on a loop
# device under an fio random-write load of 4-64 KiB writes:
#  1. the guest's own fio throughput and p99 write latency with no agent,
#     then with the agent replicating, in the same run: unthrottled, and
#     at each of the steady rates below (each rate is run once without the
#     agent first, so its p99 has a baseline of its own);
#  2. at several churn rates: how far the newest durable point lags (time
#     from asking for a point to the receiver holding it, median and max of
#     the points taken during the load), agent CPU per 100 MB of churn, and
#     the agent's peak RSS; and where the machine's two cores went: the
#     receiver's CPU per 100 MB and the share left idle;
#  3. catch-up: a fixed, seeded 1 GiB burst of the same writes as fast as
#     fio goes, then the time until a point holds all of it: the rate at
#     which the agent and receiver drain a backlog, i.e. the highest churn
#     they could sustain. Reported with the CPU time the hypervisor stole
#     meanwhile (this VM shares its host: a high figure means a slow run).
#  4. what compression saved: disk bytes shipped after the initial sync
#     against bytes on the wire, and how much went uncompressed or at the
#     fast level (the agent's own counters, scraped from its metrics port).
#  5. the receiver's journal: bytes written over the image behind a point,
#     how many of them had their pre-image journaled (a byte already
#     journaled since the newest point is not again), and the journal's
#     size at the end (the receiver's metrics port).
# Usage (root): scripts/bench-run.sh [DISK_MIB] [SECONDS_PER_STEP] [RATES_MBPS...]
# TIDEMARK_BIN=DIR (another build) and LOOP_DIRECT_IO=1 (the loop device
# past the page cache): see scripts/bench-common.sh.
# BIN=DIR runs the agent and receiver binaries in DIR instead (to compare
# two builds in one sitting, alternating). AGENT_SETTINGS='queue_depth = 8'
# adds top-level agent settings (to compare tunings the same way);
# AGENT_ENV='VAR=value ...' sets environment variables for the agent alone.
# TRACKING_ONLY=1 also runs the guest's fio (unthrottled, then at each
# rate) with the agent tracking but nothing to ship to (before the
# receiver starts): what the tracing itself costs the guest.
# AGENT_AS_UNIT=1 runs the agent at the systemd unit's priorities (Nice=5,
# best-effort I/O class at level 4) instead of fio's.
# RECEIVER_NICE=N runs the receiver at nice N: on a real site it is another
# machine, here it shares the guest's two cores. It does not make the
# receiver's CPU free for the guest on this VM (docs/BENCHMARKS.md, "The
# guest's latency at a steady rate").
# AGENT_IDLE=1 and RECEIVER_IDLE=1 run the agent or the receiver under
# SCHED_IDLE (`chrt --idle 0`): CPU only when nothing else wants it. The
# kernel's own work for them (the loop worker serving the agent's reads,
# writeback of the images, the network's softirqs) keeps its priority
# (docs/BENCHMARKS.md, "Replication under SCHED_IDLE").
# AGENT_BLKIO=1 runs the agent in a block-I/O cgroup of its own, as a
# systemd service is in its unit's: the loop driver then serves the
# agent's reads on a worker thread of their own instead of queueing them
# behind the guest's writes in one (a real disk has no such thread).
# TIMELINE=FILE writes, for each rate step, the agent's backlog every
# 0.25 s and each bookmark's start and lag (seconds since the step began),
# to see what a lag spike coincides with; beside each backlog, what the
# machine did (page cache dirty and under writeback, MiB written to its
# disks, agent and receiver CPU ticks so far). AGENT_LOG=FILE keeps the
# agent's log (with TIMELINE: what the agent said at a spike).
# FS=ext4 puts an ext4 filesystem on the device and runs the guest's fio
# on a file in it (three quarters of the disk, written once beforehand),
# so each point freezes it: the rate steps then also report the freeze
# time per point (median and the largest of the step's points).
# SYSCALLS=FILE counts the agent's and the receiver's system calls per
# thread (`perf trace -s`) for 5 s, from 4 s into the first rate step:
# how often each thread waits and wakes (futex) and talks to the kernel.
# PROFILE=PREFIX samples the agent's stacks (`perf record -g`, 499 Hz)
# for 8 s from 4 s into each rate step, into PREFIX.RATE.data: where its
# CPU goes at each rate (`perf report -i PREFIX.100.data --sort comm,sym`).
# DISK_IN_RAM=1 keeps the protected disk's backing file in a tmpfs of its
# own instead of /var/tmp: the guest's writes then never reach the
# virtual disk that holds the receiver's images and journal. Otherwise
# the kernel writes the backing file back there about every 30 s, a
# gigabyte or more at 3-4 GB/s, and the receiver's syncs wait behind it
# (docs/BENCHMARKS.md, "A burst ships at once"): every 5-6 s under a
# steady 200 MB/s, enough to put the lag past 5 s in minute-long steps
# ("200 MB/s held for a minute"). On a real site the master target is
# another machine, with disks of its own.
# IMAGES_FS=xfs|ext4 puts the receiver's images on a filesystem of their
# own (IMAGES_GIB, default 32) on a loop device over a fully allocated
# file, made without discards so that it stays allocated: what the
# images' filesystem does, without a sparse file under it allocating too.
set -euo pipefail
cd "$(dirname "$0")/.."
disk_mib=${1:-2048}
secs=${2:-20}
shift 2 2>/dev/null || shift $#
rates=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(50 100 200 400)
[ "$(id -u)" -eq 0 ] || { echo "bench-run: needs root" >&2; exit 1; }
scripts/install-deps.sh
command -v fio >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null; }
. scripts/bench-common.sh
bench_bin
work=$(mktemp -d /var/tmp/tidemark-bench-run.XXXXXX)
loopdev=""; rx=""; ag=""; blkio=""; mnt=""; images_loop=""; disk_ram=""
cleanup() {
  [ -n "$ag" ] && kill "$ag" 2>/dev/null && wait "$ag" 2>/dev/null || true
  [ -n "$rx" ] && kill "$rx" 2>/dev/null && wait "$rx" 2>/dev/null || true
  # A fio (or sampler) still running when the script is killed.
  pkill -P $$ 2>/dev/null || true
  if [ -n "$images_loop" ]; then
    umount "$work/images" || umount -l "$work/images" || true
    losetup -d "$images_loop" || true
  fi
  rmdir /sys/kernel/tracing/instances/tidemark-bench-run 2>/dev/null || true
  [ -n "$blkio" ] && rmdir "$blkio" 2>/dev/null || true
  [ -n "$mnt" ] && umount "$mnt" || true
  [ -n "$loopdev" ] && losetup -d "$loopdev" || true
  # Lazily if busy: a fio killed with the script may still hold the loop
  # device, which then lets the backing file go only when fio ends.
  [ -n "$disk_ram" ] && { umount "$disk_ram" || umount -l "$disk_ram"; } || true
  [ -n "${AGENT_LOG:-}" ] && cp "$work/agent.log" "$AGENT_LOG" || true
  rm -rf "$work"
}
trap cleanup EXIT

# Written once before anything is measured: the first write into a
# sparse file allocates blocks and page-cache pages, several times the
# cost of an overwrite, and would handicap whichever fio run came first.
# Disks past 16 GiB (run to see the agent's memory with a full-size dirty
# map: 256 GiB already has the largest, 8 MiB) stay sparse instead.
disk_dir=$work
if [ "${DISK_IN_RAM:-0}" = 1 ]; then
  disk_ram=$work/disk-ram
  mkdir -p "$disk_ram"
  mount -t tmpfs -o size="$((disk_mib + 64))m" tidemark-bench-disk "$disk_ram"
  disk_dir=$disk_ram
fi
if [ "$disk_mib" -le 16384 ]; then
  dd if=/dev/zero of="$disk_dir/disk.img" bs=1M count="$disk_mib" conv=fsync status=none
else
  truncate -s "${disk_mib}M" "$disk_dir/disk.img"
fi
loopdev=$(bench_loop "$disk_dir/disk.img")
# What fio writes to: the device, or a file in the filesystem on it.
target=("--filename=$loopdev")
if [ -n "${FS:-}" ]; then
  [ "$FS" = ext4 ] || { echo "bench-run: FS=$FS: only ext4 is supported" >&2; exit 1; }
  mkfs.ext4 -q -F "$loopdev"
  mnt=$work/mnt
  mkdir -p "$mnt"
  mount "$loopdev" "$mnt"
  file_mib=$((disk_mib * 3 / 4))
  # Written once, so that fio's writes overwrite allocated blocks as the
  # raw device's do rather than allocating (and journaling) as they go.
  dd if=/dev/zero of="$mnt/fio.dat" bs=1M count="$file_mib" oflag=direct conv=fsync status=none
  target=("--filename=$mnt/fio.dat" "--size=${file_mib}m")
fi
port=$((20000 + RANDOM % 20000))
metrics_port=$((port + 1))
if [ -n "${IMAGES_FS:-}" ]; then
  fallocate -l "${IMAGES_GIB:-32}G" "$work/images.fs"
  case "$IMAGES_FS" in
    xfs) mkfs.xfs -q -f -K "$work/images.fs" ;;
    ext4) mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$work/images.fs" ;;
    *) echo "bench-run: IMAGES_FS=$IMAGES_FS: xfs or ext4" >&2; exit 1 ;;
  esac
  images_loop=$(losetup --find --show "$work/images.fs")
  mkdir -p "$work/images"
  mount "$images_loop" "$work/images"
fi
"$bin/tidemark-receiver" init --dir "$work/rx" --name bench --listen "127.0.0.1:$port" \
  --image-dir "$work/images" --retention-dir "$work/retention" --retention-on-root-filesystem >/dev/null
# The receiver's metrics too: how much of what it overwrote it journaled.
rx_metrics_port=$((port + 2))
sed -i "1i metrics_listen = \"127.0.0.1:$rx_metrics_port\"" "$work/rx/receiver.toml"
"$bin/tidemark-receiver" issue-cert --dir "$work/rx" --name bench-run \
  --receiver "127.0.0.1:$port" --out "$work/agent" >/dev/null
{
  printf 'state_dir = "%s"\nadmin_socket = "%s"\n' "$work/state" "$work/agent.sock"
  printf 'crash_consistent_interval_secs = 0\napp_consistent_interval_secs = 0\n'
  printf 'metrics_listen = "127.0.0.1:%s"\n' "$metrics_port"
  printf '%s\n' "${AGENT_SETTINGS:-}"
  cat "$work/agent/agent.toml"
  printf '\n[[disk]]\ndevice = "%s"\nid = "bench-run-disk"\n' "$loopdev"
} > "$work/agent/run.toml"
cp "$work/agent/"*.pem "$work/" 2>/dev/null || true

fio_run() { # rate_mbps (0 = unthrottled) seconds json_out
  local rate=()
  [ "$1" -gt 0 ] && rate=(--rate="${1}m")
  fio --name=churn "${target[@]}" --ioengine=io_uring --direct=1 --rw=randwrite \
    --bsrange=4k-64k --iodepth=16 --time_based --runtime="$2" --randrepeat=0 \
    "${rate[@]}" --output-format=json --output="$3" >/dev/null
}
fio_summary() { # json -> "MBps p99_us"
  python3 - "$1" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]["write"]
p99 = j["clat_ns"]["percentile"].get("99.000000", 0) / 1000
print(f'{j["bw_bytes"] / 1e6:.1f} {p99:.0f}')
PY
}

echo "== guest fio without the agent (${secs}s, unthrottled)"
fio_run 0 "$secs" "$work/base.json"
read -r base_bw base_p99 < <(fio_summary "$work/base.json")
echo "without agent: ${base_bw} MB/s, p99 ${base_p99} us"
rx_priority=(env)
[ -n "${RECEIVER_NICE:-}" ] && rx_priority=(nice -n "$RECEIVER_NICE")
[ "${RECEIVER_IDLE:-0}" = 1 ] && rx_priority=(chrt --idle 0)
# The steady rates without the agent: the p99 each rate step is held to.
declare -A rate_base_p99
for rate in "${rates[@]}"; do
  fio_run "$rate" "$secs" "$work/rate-base.json"
  read -r _ rate_base_p99[$rate] < <(fio_summary "$work/rate-base.json")
done

# CPU ticks (user and system) of the agent and of the receiver so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$ag/stat"; }
rx_ticks() { awk '{print $14 + $15}' "/proc/$rx/stat"; }
hz=$(getconf CLK_TCK)
# The agent's own start line, shared by the tracking-only phase and the
# run proper.
priority=()
[ "${AGENT_AS_UNIT:-0}" = 1 ] && priority=(nice -n 5 ionice -c 2 -n 4)
[ "${AGENT_IDLE:-0}" = 1 ] && priority=(chrt --idle 0)
start_agent() { # log file
  env ${AGENT_ENV:-} "${priority[@]}" "$bin/tidemark-agent" run --config "$work/agent/run.toml" 2> "$1" &
  ag=$!
  for _ in $(seq 1 300); do grep -q "replicating" "$1" && break; sleep 0.1; done
}
if [ "${TRACKING_ONLY:-0}" = 1 ]; then
  # The agent with no receiver up yet: it traces every write and drains
  # its tracer, and ships nothing (it retries the connection meanwhile).
  # What the guest pays for the tracking alone, beside what it pays with
  # the shipping, the receiver and their CPU below.
  echo "== guest fio with the agent only tracking (no receiver yet; ${secs}s, unthrottled, then each rate)"
  start_agent "$work/agent-tracking.log"
  t0=$(cpu_ticks)
  fio_run 0 "$secs" "$work/track.json"
  read -r track_bw track_p99 < <(fio_summary "$work/track.json")
  printf 'tracking only: %s MB/s, p99 %s us  (throughput %.1f%% of baseline, p99 %+.1f%%)\n' "$track_bw" "$track_p99" \
    "$(echo "100 * $track_bw / $base_bw" | bc -l)" "$(echo "100 * ($track_p99 - $base_p99) / $base_p99" | bc -l)"
  churn=$(echo "$track_bw * $secs" | bc -l)
  for rate in "${rates[@]}"; do
    fio_run "$rate" "$secs" "$work/track-rate.json"
    read -r bw p99 < <(fio_summary "$work/track-rate.json")
    churn=$(echo "$churn + $bw * $secs" | bc -l)
    printf 'tracking only at %s MB/s: fio %s MB/s, p99 %s us alone / %s us tracked (%+.1f%%)\n' "$rate" "$bw" \
      "${rate_base_p99[$rate]}" "$p99" "$(echo "100 * ($p99 - ${rate_base_p99[$rate]}) / ${rate_base_p99[$rate]}" | bc -l)"
  done
  t1=$(cpu_ticks)
  printf 'tracking only: agent CPU %.2f s for %.0f MB of churn (%.4f s per 100 MB)\n' "$(echo "($t1 - $t0) / $hz" | bc -l)" \
    "$churn" "$(echo "($t1 - $t0) / $hz * 100 / $churn" | bc -l)"
  kill "$ag" && wait "$ag" || true
  ag=""
  [ -n "${AGENT_LOG:-}" ] && cp "$work/agent-tracking.log" "$AGENT_LOG.tracking"
fi

"${rx_priority[@]}" "$bin/tidemark-receiver" serve --config "$work/rx/receiver.toml" 2> "$work/rx.log" &
rx=$!
for _ in $(seq 1 100); do grep -q "listening on" "$work/rx.log" && break; sleep 0.1; done
start_agent "$work/agent.log"
if [ "${AGENT_BLKIO:-0}" = 1 ]; then
  # cgroup v1 (blkio) or v2 (the io controller must be enabled above it).
  if [ -d /sys/fs/cgroup/blkio ]; then blkio=/sys/fs/cgroup/blkio/tidemark-bench-agent; else blkio=/sys/fs/cgroup/tidemark-bench-agent; fi
  mkdir -p "$blkio"
  echo "$ag" > "$blkio/cgroup.procs"
fi
# Initial sync done once the first point is durable.
sync_start=$(date +%s.%N)
"$bin/tidemark-agent" bookmark --config "$work/agent/run.toml" 2>/dev/null >/dev/null
sync_secs=$(echo "$(date +%s.%N) - $sync_start" | bc -l)
printf 'initial sync: %.1f s (%.0f MB/s of disk), agent peak RSS so far %.1f MiB\n' "$sync_secs" \
  "$(echo "$disk_mib * 1048576 / 1000000 / $sync_secs" | bc -l)" \
  "$(awk '/VmHWM/ {print $2 / 1024}' "/proc/$ag/status")"

# Each named metric on the metrics port $1, summed over its label sets, as
# integers in the order named: one scrape per call.
metric_sums() {
  python3 - "$@" <<'PY'
import sys, urllib.request
port, names = sys.argv[1], sys.argv[2:]
text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
total = dict.fromkeys(names, 0.0)
for line in text.splitlines():
    name = line.split(" ")[0].split("{")[0]
    if name in total:
        total[name] += float(line.split()[-1])
print(*(int(total[n]) for n in names))
PY
}
# The agent's counters of disk bytes and wire bytes shipped, bytes stored
# uncompressed and bytes compressed at the fast level.
shipped() {
  metric_sums "$metrics_port" tidemark_agent_shipped_disk_bytes_total tidemark_agent_shipped_wire_bytes_total \
    tidemark_agent_stored_bytes_total tidemark_agent_fast_compressed_bytes_total
}
read -r sh_d0 sh_w0 sh_s0 sh_f0 < <(shipped)

echo "== guest fio with the agent replicating (${secs}s, unthrottled)"
fio_run 0 "$secs" "$work/with.json" &
fio_pid=$!
wait $fio_pid
read -r with_bw with_p99 < <(fio_summary "$work/with.json")
echo "with agent:    ${with_bw} MB/s, p99 ${with_p99} us  (throughput $(echo "100 * $with_bw / $base_bw" | bc -l | xargs printf '%.1f')% of baseline, p99 $(echo "100 * ($with_p99 - $base_p99) / $base_p99" | bc -l | xargs printf '%+.1f')%)"
"$bin/tidemark-agent" bookmark --config "$work/agent/run.toml" 2>/dev/null >/dev/null

# Idle (with iowait) and all ticks of the machine, to show where the two
# cores go during a step (until its last point is durable, which can be
# after fio stops): on a real site the receiver's share is another
# machine's.
machine_ticks() { awk '/^cpu / {print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }
# The freeze time of each point the agent logged since line $1 of its log
# (with no filesystem, nothing is frozen: the figure it logs is then only
# how long the point's data took to read).
freezes() {
  [ -n "$mnt" ] || return 0
  tail -n +"$(($1 + 1))" "$work/agent.log" | sed -n 's/.*filesystems frozen for \([0-9]*\) ms.*/\1/p'
}
printf '\n%10s %12s %14s %14s %16s %18s %22s %20s %10s\n' "rate MB/s" "fio MB/s" "lag p50 (s)" "lag max (s)" "CPU s / 100 MB" "freeze p50/max ms" "fio p99 us alone/with" "receiver CPU/100 MB" "idle"
steps_log=$(wc -l < "$work/agent.log")
for rate in "${rates[@]}"; do
  fio_run "$rate" "$secs" "$work/rate.json" &
  fio_pid=$!
  t0=$(cpu_ticks); r0=$(rx_ticks); read -r idle0 all0 < <(machine_ticks)
  lags=()
  log_lines=$(wc -l < "$work/agent.log")
  step_start=$(date +%s.%N)
  sampler=""
  if [ -n "${TIMELINE:-}" ]; then
    while kill -0 "$fio_pid" 2>/dev/null; do
      "$bin/tidemark-agent" status --json --config "$work/agent/run.toml" 2>/dev/null |
        grep -o '"dirty_bytes": *[0-9]*' | awk -F: '{s += $2} END {print int(s / 1048576)}' |
        xargs printf '%s %.2f backlog_mib %s\n' "$rate" "$(echo "$(date +%s.%N) - $step_start" | bc -l)" >> "$TIMELINE"
      # What the machine did meanwhile: page cache dirty and under
      # writeback (MiB), MiB written to each real disk so far, and the
      # CPU ticks of agent and receiver so far.
      printf '%s %.2f sys dirty %s writeback %s disk_written %s agent_ticks %s receiver_ticks %s\n' "$rate" \
        "$(echo "$(date +%s.%N) - $step_start" | bc -l)" \
        "$(awk '/^Dirty:/ {print int($2 / 1024)}' /proc/meminfo)" \
        "$(awk '/^Writeback:/ {print int($2 / 1024)}' /proc/meminfo)" \
        "$(awk '$3 ~ /^(vd|sd|xvd)[a-z]+$/ || $3 ~ /^nvme[0-9]+n[0-9]+$/ {s += $10} END {print int(s / 2048)}' /proc/diskstats)" \
        "$(cpu_ticks)" "$(rx_ticks)" >> "$TIMELINE"
      sleep 0.25
    done &
    sampler=$!
  fi
  if [ -n "${SYSCALLS:-}" ] && [ "$rate" = "${rates[0]}" ]; then
    (sleep 4 && perf trace -s -p "$ag,$rx" -o "$SYSCALLS" -- sleep 5 >/dev/null 2>&1) &
  fi
  if [ -n "${PROFILE:-}" ]; then
    (sleep 4 && perf record -g -F 499 -p "$ag" -o "$PROFILE.$rate.data" -- sleep 8 >/dev/null 2>&1) &
  fi
  sleep 2
  while kill -0 "$fio_pid" 2>/dev/null; do
    s=$(date +%s.%N)
    "$bin/tidemark-agent" bookmark --config "$work/agent/run.toml" 2>/dev/null >/dev/null
    e=$(date +%s.%N)
    lags+=("$(echo "$e - $s" | bc -l)")
    [ -n "${TIMELINE:-}" ] && printf '%s %.2f lag %.2f\n' "$rate" "$(echo "$s - $step_start" | bc -l)" "$(echo "$e - $s" | bc -l)" >> "$TIMELINE"
    sleep 1
  done
  wait "$fio_pid"
  [ -n "$sampler" ] && wait "$sampler"
  t1=$(cpu_ticks); r1=$(rx_ticks); read -r idle1 all1 < <(machine_ticks)
  read -r bw rate_p99 < <(fio_summary "$work/rate.json")
  churn_mb=$(echo "$bw * $secs" | bc -l)
  cpu_s=$(echo "($t1 - $t0) / $hz" | bc -l)
  p50=$(printf '%s\n' "${lags[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  max=$(printf '%s\n' "${lags[@]}" | sort -g | tail -1)
  frozen=$(freezes "$log_lines" | sort -g | awk '{a[NR]=$1} END {if (NR) printf "%d/%d", a[int((NR+1)/2)], a[NR]; else printf "-"}')
  base=${rate_base_p99[$rate]}
  printf '%10s %12s %14.2f %14.2f %16.2f %18s %22s %20.2f %9.0f%%\n' "$rate" "$bw" "$p50" "$max" "$(echo "100 * $cpu_s / $churn_mb" | bc -l)" "$frozen" \
    "$base/$rate_p99 ($(echo "100 * ($rate_p99 - $base) / $base" | bc -l | xargs printf '%+.0f')%)" \
    "$(echo "100 * ($r1 - $r0) / $hz / $churn_mb" | bc -l)" "$(echo "100 * ($idle1 - $idle0) / ($all1 - $all0)" | bc -l)"
done

if [ -n "$mnt" ]; then
  freezes "$steps_log" | sort -g | awk '{a[NR]=$1} END {if (NR) printf "freeze per point over the steps: p50 %d ms, p99 %d ms (%d points", a[int((NR+1)/2)], a[int(NR*0.99+0.999)], NR}'
  { tail -n +"$((steps_log + 1))" "$work/agent.log" | grep -c "recording it as a sync marker" || true; } |
    xargs printf ', %s of them sync markers: written while read)\n'
fi

steal() { awk '/^cpu /{print $9}' /proc/stat; }
echo
printf '%12s %14s %12s %14s %10s\n' "catch-up" "backlog (MiB)" "drain (s)" "drain (MB/s)" "steal"
for i in 1 2 3; do
  fio --name=burst "${target[@]}" --ioengine=io_uring --direct=1 --rw=randwrite \
    --bsrange=4k-64k --iodepth=16 --io_size=1024m --randrepeat=1 --randseed=42 \
    --output-format=json --output="$work/burst.json" >/dev/null
  # The backlog is what the agent ships from here until the point holds
  # it: `status` answers from a snapshot up to a second old, which could
  # predate the burst (it then read 0.0). It leaves out what was already
  # written to the connection and not yet acknowledged (the send window,
  # 8 MiB), so the rate errs low by at most that.
  read -r d0 _ < <(shipped)
  st0=$(steal); s=$(date +%s.%N)
  "$bin/tidemark-agent" bookmark --config "$work/agent/run.toml" 2>/dev/null >/dev/null
  e=$(date +%s.%N); st1=$(steal)
  read -r d1 _ < <(shipped)
  backlog=$(echo "($d1 - $d0) / 1048576" | bc -l)
  printf '%12s %14.1f %12.2f %14.1f %9.0f%%\n' "run $i" "$backlog" "$(echo "$e - $s" | bc -l)" \
    "$(echo "$backlog * 1.048576 / ($e - $s)" | bc -l)" \
    "$(echo "100 * ($st1 - $st0) / $hz / ($e - $s) / $(nproc)" | bc -l)"
done
echo "(run 1 overwrites what the rate steps left; runs 2 and 3 overwrite run 1's blocks: the same journaled pre-images)"

echo
# What compression saved on fio's data (after the initial sync, whose
# zeros travel as zero records).
read -r sh_d1 sh_w1 sh_s1 sh_f1 < <(shipped)
printf 'shipped since the initial sync: %.2f GB of disk data as %.2f GB on the wire (%.3f); stored uncompressed %.2f GB, at the fast level %.2f GB\n' \
  "$(echo "($sh_d1 - $sh_d0) / 1000000000" | bc -l)" "$(echo "($sh_w1 - $sh_w0) / 1000000000" | bc -l)" \
  "$(echo "($sh_w1 - $sh_w0) / ($sh_d1 - $sh_d0)" | bc -l)" \
  "$(echo "($sh_s1 - $sh_s0) / 1000000000" | bc -l)" "$(echo "($sh_f1 - $sh_f0) / 1000000000" | bc -l)"
# Bytes the receiver wrote over the image behind a point, and of those
# the ones whose pre-image it journaled (the others had been overwritten
# before since the newest point), and the journal's size now.
read -r rx_over rx_jour rx_journal < <(metric_sums "$rx_metrics_port" tidemark_receiver_overwritten_bytes_total \
  tidemark_receiver_journaled_bytes_total tidemark_receiver_journal_bytes)
printf 'receiver: %.2f GB written over the image behind a point, pre-images journaled for %.2f GB of them (%.0f%%); journal now %.2f GB\n' \
  "$(echo "$rx_over / 1000000000" | bc -l)" "$(echo "$rx_jour / 1000000000" | bc -l)" \
  "$(echo "100 * $rx_jour / ($rx_over + 1)" | bc -l)" "$(echo "$rx_journal / 1000000000" | bc -l)"
echo "agent peak RSS: $(awk '/VmHWM/ {print $2/1024 " MiB"}' "/proc/$ag/status") (disk ${disk_mib} MiB)"
# Both agents' logs with TRACKING_ONLY=1: the first one begins the initial
# sync. (grep -c exits 1 on a count of 0.)
cat "$work"/agent*.log | { grep -c "resync required" || true; } | xargs echo "resyncs during the run (1 = the initial sync):"
