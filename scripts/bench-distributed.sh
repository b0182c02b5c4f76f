#!/usr/bin/env bash
# Distributed-mode benchmarks on this machine (numbers only, nothing asserted):
#   1. end-to-end keys/s through RabbitMQ and Redis with one worker, against raw key generation
#      on the same cores, alternating rounds so machine noise hits both alike (medians), and
#      the CPU a key of each component (as --pooled below prints it) while keys are made;
#   2. `keyfleet submit` enqueue rate with publisher confirms (100,000 jobs, no worker running);
#   3. worker memory with that 100,000-job backlog: RSS sampled while it works, and peak RSS
#      (BACKLOG=0 skips steps 2 and 3).
# `submit` packs KEYFLEET_JOBS_PER_MESSAGE jobs a message (default auto: 8 for a batch's first
# 256 jobs, 32 after; 1 for v1 messages).
# With --pooled instead: the plumbing alone. The worker's reservoir is filled with every key of
# the round before the clock starts and never refilled (--reservoir-once), then a `submit
# --wait` of that many rows is timed: keys/s and CPU ms a key for each component — the worker,
# `submit --wait` (producer and collector), RabbitMQ (beam.smp) and Redis (redis-server).
# BIN_DIR=DIR takes keyfleet and keyfleet-worker from DIR instead of building them (two builds
# side by side, alternated). KEEP_OUTPUT=1 leaves the key files in place at the end: on an ext4
# without a journal, files created within minutes of a mass deletion cost several times the
# CPU (the inode allocator passes over recently deleted inodes), so a run right after another
# run's cleanup measures that. Needs RabbitMQ and Redis on loopback (scripts/test.sh starts
# them). Usage:
#   scripts/bench-distributed.sh [KEYS_PER_ROUND=200] [ROUNDS=3] [BACKLOG=100000]
#   scripts/bench-distributed.sh --pooled [KEYS_PER_ROUND=2000] [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
POOLED=0
if [ "${1:-}" = "--pooled" ]; then POOLED=1; shift; fi
KEYS=${1:-$([ $POOLED = 1 ] && echo 2000 || echo 200)}; ROUNDS=${2:-3}; BACKLOG=${3:-100000}
if [ -n "${BIN_DIR:-}" ]; then
  KF=$BIN_DIR/keyfleet; W=$BIN_DIR/keyfleet-worker
else
  cargo build --release -q -p keyfleet -p keyfleet-worker
  KF=target/release/keyfleet; W=target/release/keyfleet-worker
fi
prefix="kfbench-$$"; dir=$(mktemp -d)
# Identities of batches submitted without --wait go to the state folder: keep them in $dir.
export XDG_STATE_HOME="$dir/state"
cleanup() {
  if [ -n "${wpid:-}" ]; then kill "$wpid" 2>/dev/null || true; fi
  for q in "$prefix.jobs" "$prefix.jobs.dead" "${prefix}b.jobs" "${prefix}b.jobs.dead"; do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
  for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep -E "^${prefix}b?\.results\." || true); do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
  redis-cli --scan --pattern "${prefix}*" | xargs -r redis-cli del >/dev/null
  if [ "${KEEP_OUTPUT:-0}" = 1 ]; then echo "output kept in $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT

regions=(cn-qingdao cn-beijing cn-zhangjiakou cn-huhehaote cn-hangzhou cn-shanghai cn-shenzhen cn-chengdu cn-hongkong ap-southeast-1)
fleet() { # rows file: spread over regions so the 500 quota never binds (an owner per round)
  { echo "RegionId,KeyPairName"; for ((i = 0; i < $1; i++)); do echo "${regions[i % ${#regions[@]}]},h-$2-$i"; done; } > "$3"
}

# CPU seconds (user + system) of a process, from /proc/PID/stat (USER_HZ = 100).
cpu_of() { awk '{ sub(/^.*\) /, ""); print ($12 + $13) / 100 }' "/proc/$1/stat"; }
# Redis's own count, to the microsecond (its work per key is well under one 10 ms tick).
redis_cpu() { redis-cli info cpu | awk -F: '/^used_cpu_(user|sys):/ { s += $2 } END { print s }'; }
# `submit --wait` of CSV as batch BATCH into OUT, timed: prints its wall seconds and its own CPU
# seconds (its rusage as a child of this python). An owner per round: every round's keys fit
# the quota of 500 a region (10 regions).
timed_submit() {
  python3 - "$KF" "$1" "$prefix" "$2" "$3" <<'PY'
import resource, subprocess, sys, time
kf, csv, prefix, batch, out = sys.argv[1:]
t0 = time.monotonic()
subprocess.run([kf, "submit", csv, "--prefix", prefix, "--batch-id", batch, "--wait", "--out", out,
                "--owner", "bench-" + batch, "--progress", "off", "--json"], check=True,
               stdout=subprocess.DEVNULL)
wall = time.monotonic() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(wall, ru.ru_utime + ru.ru_stime)
PY
}
# The CPU a key of each component, from rows "wall submit_cpu worker_cpu beam_cpu redis_cpu".
cpu_split() {
  python3 - "$@" <<'PY'
import statistics, sys
keys = int(sys.argv[1])
runs = [[float(x) for x in r.split()] for r in sys.argv[2:]]
for i, name in [(2, "worker"), (1, "submit --wait (producer + collector)"), (3, "RabbitMQ (beam.smp)"), (4, "Redis")]:
    ms = [r[i] * 1000 / keys for r in runs]
    print(f"  CPU a key, {name}: {', '.join(f'{x:.3f}' for x in ms)} ms  median {statistics.median(ms):.3f}")
total = [sum(r[1:5]) * 1000 / keys for r in runs]
print(f"  CPU a key, all: median {statistics.median(total):.2f} ms")
PY
}

if [ $POOLED = 1 ]; then
  beam=$(pgrep -o beam.smp)
  port=$((20000 + $$ % 20000))
  rows=()
  for ((r = 0; r < ROUNDS; r++)); do
    fleet "$KEYS" "p$r" "$dir/pooled.csv"
    $W --prefix "$prefix" --threads 2 --metrics-addr "127.0.0.1:$port" --reservoir "$KEYS" \
      --reservoir-once --upstream-rps 0 --log warn &
    wpid=$!
    # The reservoir is full when its gauge says so.
    until curl -sf "http://127.0.0.1:$port/metrics" 2>/dev/null \
      | awk -v k="$KEYS" '/^keyfleet_reservoir_keys\{bits="2048"\}/ && $2 >= k { ok = 1 } END { exit !ok }'; do
      sleep 0.5
    done
    w0=$(cpu_of "$wpid"); b0=$(cpu_of "$beam"); r0=$(redis_cpu)
    row=$(timed_submit "$dir/pooled.csv" "p$r" "$dir/outp$r")
    w1=$(cpu_of "$wpid"); b1=$(cpu_of "$beam"); r1=$(redis_cpu)
    kill -TERM "$wpid"; wait "$wpid" || true; wpid=
    rows+=("$row $(python3 -c "print($w1 - $w0, $b1 - $b0, $r1 - $r0)")")
  done
  python3 - "$KEYS" "${rows[@]}" <<'PY'
import statistics, sys
keys = int(sys.argv[1])
kps = [keys / float(r.split()[0]) for r in sys.argv[2:]]
print(f"pooled, {keys} keys a round, 1 worker (2 threads), all on this machine's cores:")
print(f"  plumbing: {', '.join(f'{x:.0f}' for x in kps)} keys/s  median {statistics.median(kps):.0f}")
PY
  cpu_split "$KEYS" "${rows[@]}"
  exit 0
fi

raws=(); e2es=(); rows=()
beam=$(pgrep -o beam.smp)
for ((r = 0; r < ROUNDS; r++)); do
  raws+=("$($KF bench --keys "$KEYS" --threads 2 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["keys_per_second"])')")
  fleet "$KEYS" "r$r" "$dir/e2e.csv"
  $W --prefix "$prefix" --threads 2 --metrics-addr off --reservoir 0 --upstream-rps 0 --log warn &
  wpid=$!
  sleep 1
  w0=$(cpu_of "$wpid"); b0=$(cpu_of "$beam"); r0=$(redis_cpu)
  row=$(timed_submit "$dir/e2e.csv" "e2e$r" "$dir/out$r")
  w1=$(cpu_of "$wpid"); b1=$(cpu_of "$beam"); r1=$(redis_cpu)
  kill -TERM "$wpid"; wait "$wpid" || true; wpid=
  rows+=("$row $(python3 -c "print($w1 - $w0, $b1 - $b0, $r1 - $r0)")")
  e2es+=("$(python3 -c "print($KEYS / ${row%% *})")")
done
python3 - "${raws[*]}" "${e2es[*]}" <<'PY'
import statistics, sys
raw = [float(x) for x in sys.argv[1].split()]; e2e = [float(x) for x in sys.argv[2].split()]
print(f"raw keygen (2 threads):        {', '.join(f'{x:.1f}' for x in raw)} keys/s  median {statistics.median(raw):.1f}")
print(f"end to end (1 worker, 2 thr.): {', '.join(f'{x:.1f}' for x in e2e)} keys/s  median {statistics.median(e2e):.1f}")
print(f"ratio of medians: {statistics.median(e2e) / statistics.median(raw) * 100:.1f}%")
print(f"raw key on 2 threads: {2000 / statistics.median(raw):.3f} ms of the cores a key; end to end: {2000 / statistics.median(e2e):.3f}")
PY
cpu_split "$KEYS" "${rows[@]}"

if [ "$BACKLOG" = 0 ]; then exit 0; fi
fleet "$BACKLOG" big "$dir/big.csv"
$KF submit "$dir/big.csv" --prefix "${prefix}b" --batch-id big --progress off --json > "$dir/submit.json"
python3 -c "import json; s=json.load(open('$dir/submit.json')); print(f\"submit: {s['enqueued']} jobs in {s['seconds']:.2f} s = {s['jobs_per_second']:.0f} jobs/s with confirms\")"

$W --prefix "${prefix}b" --threads 2 --metrics-addr off --upstream-rps 0 --log warn &
wpid=$!
samples=()
for ((t = 5; t <= 60; t += 5)); do
  sleep 5
  samples+=("$(awk '/VmRSS/ {print $2}' "/proc/$wpid/status")")
done
peak=$(awk '/VmHWM/ {print $2}' "/proc/$wpid/status")
left=$(rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="${prefix}b.jobs" '$1 == q {print $2}')
kill -TERM "$wpid"; wait "$wpid" || true; wpid=
echo "worker RSS every 5 s with a $BACKLOG-job backlog (KiB): ${samples[*]}"
echo "worker peak RSS: $peak KiB; jobs still queued after 60 s: $left"
