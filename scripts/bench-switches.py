#!/usr/bin/env python3
"""Context switches per thread while the disks are busy.

    scripts/bench-switches.py SECONDS [MIN_READ_MBPS]

Samples every thread's voluntary and involuntary switches
(/proc/*/task/*/status) once a second for SECONDS, and the machine's
block reads (/proc/vmstat pgpgin). Prints, per process and thread name
(numbers dropped, so compress-0 and compress-1 are one line), the
switches a second averaged over the seconds that read more than
MIN_READ_MBPS (default 250: a catch-up drain of scripts/bench-run.sh,
which reads the backlog at that rate while nothing else reads much).
Run it beside `scripts/bench-run.sh 2048 5 100` (docs/BENCHMARKS.md,
"Pre-images handed to the encoder in batches").
"""
import collections
import os
import re
import sys
import time


def snapshot():
    threads = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            pcomm = open(f"/proc/{pid}/comm").read().strip()
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
                vol = invol = 0
                for line in open(f"/proc/{pid}/task/{tid}/status"):
                    if line.startswith("voluntary_ctxt_switches"):
                        vol = int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol = int(line.split()[1])
                threads[tid] = (pcomm, comm, vol, invol)
            except OSError:
                pass  # the thread ended meanwhile
    read = 0
    for line in open("/proc/vmstat"):
        if line.startswith("pgpgin "):
            read = int(line.split()[1]) * 1024
    return time.monotonic(), read, threads


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: scripts/bench-switches.py SECONDS [MIN_READ_MBPS]")
    seconds = int(sys.argv[1])
    bar = float(sys.argv[2]) if len(sys.argv) == 3 else 250.0
    busy = []
    prev = snapshot()
    for _ in range(seconds):
        time.sleep(1)
        cur = snapshot()
        dt = cur[0] - prev[0]
        if (cur[1] - prev[1]) / dt / 1e6 > bar:
            rates = collections.defaultdict(lambda: [0.0, 0.0])
            for tid, (pcomm, comm, vol, invol) in cur[2].items():
                if tid in prev[2]:
                    key = (re.sub(r"\d+$", "", pcomm), re.sub(r"[-/:]?\d+$", "", comm))
                    rates[key][0] += (vol - prev[2][tid][2]) / dt
                    rates[key][1] += (invol - prev[2][tid][3]) / dt
            busy.append(rates)
        prev = cur
    if not busy:
        sys.exit(f"no second read more than {bar} MB/s; nothing to report")
    total = collections.defaultdict(lambda: [0.0, 0.0])
    for rates in busy:
        for key, (vol, invol) in rates.items():
            total[key][0] += vol / len(busy)
            total[key][1] += invol / len(busy)
    print(f"{len(busy)} seconds read more than {bar} MB/s; switches a second:")
    ranked = sorted(total.items(), key=lambda kv: -sum(kv[1]))
    for (pcomm, comm), (vol, invol) in ranked[:25]:
        print(f"{pcomm:>18} {comm:<28} {vol + invol:8.0f}  (voluntary {vol:.0f})")


if __name__ == "__main__":
    main()
