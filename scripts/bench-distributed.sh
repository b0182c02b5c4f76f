#!/usr/bin/env bash
# Distributed-mode benchmarks on this machine (numbers only, nothing asserted):
#   1. end-to-end keys/s through RabbitMQ and Redis with one worker, against raw key generation
#      on the same cores, alternating rounds so machine noise hits both alike (medians);
#   2. `keyfleet submit` enqueue rate with publisher confirms (100,000 jobs, no worker running);
#   3. worker memory with that 100,000-job backlog: RSS sampled while it works, and peak RSS.
# Needs RabbitMQ and Redis on loopback (scripts/test.sh starts them). Usage:
#   scripts/bench-distributed.sh [KEYS_PER_ROUND=200] [ROUNDS=3] [BACKLOG=100000]
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${1:-200}; ROUNDS=${2:-3}; BACKLOG=${3:-100000}
cargo build --release -q -p keyfleet -p keyfleet-worker
KF=target/release/keyfleet; W=target/release/keyfleet-worker
prefix="kfbench-$$"; dir=$(mktemp -d)
cleanup() {
  if [ -n "${wpid:-}" ]; then kill "$wpid" 2>/dev/null || true; fi
  for q in "$prefix.jobs" "$prefix.jobs.dead" "${prefix}b.jobs" "${prefix}b.jobs.dead"; do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
  for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep -E "^${prefix}b?\.results\." || true); do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
  redis-cli --scan --pattern "${prefix}*" | xargs -r redis-cli del >/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT

regions=(cn-qingdao cn-beijing cn-zhangjiakou cn-huhehaote cn-hangzhou cn-shanghai cn-shenzhen cn-chengdu cn-hongkong ap-southeast-1)
fleet() { # rows file: spread over regions so the 500 quota never binds
  { echo "RegionId,KeyPairName"; for ((i = 0; i < $1; i++)); do echo "${regions[i % ${#regions[@]}]},h-$2-$i"; done; } > "$3"
}

raws=(); e2es=()
for ((r = 0; r < ROUNDS; r++)); do
  raws+=("$($KF bench --keys "$KEYS" --threads 2 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["keys_per_second"])')")
  fleet "$KEYS" "r$r" "$dir/e2e.csv"
  $W --prefix "$prefix" --threads 2 --metrics-addr off --reservoir 0 --upstream-rps 0 --log warn &
  wpid=$!
  sleep 1
  t0=$(date +%s.%N)
  $KF submit "$dir/e2e.csv" --prefix "$prefix" --batch-id "e2e$r" --wait --out "$dir/out$r" --progress off --json > "$dir/e2e$r.json"
  t1=$(date +%s.%N)
  kill -TERM "$wpid"; wait "$wpid" || true; wpid=
  e2es+=("$(python3 -c "print($KEYS / ($t1 - $t0))")")
done
python3 - "${raws[*]}" "${e2es[*]}" <<'PY'
import statistics, sys
raw = [float(x) for x in sys.argv[1].split()]; e2e = [float(x) for x in sys.argv[2].split()]
print(f"raw keygen (2 threads):        {', '.join(f'{x:.1f}' for x in raw)} keys/s  median {statistics.median(raw):.1f}")
print(f"end to end (1 worker, 2 thr.): {', '.join(f'{x:.1f}' for x in e2e)} keys/s  median {statistics.median(e2e):.1f}")
print(f"ratio of medians: {statistics.median(e2e) / statistics.median(raw) * 100:.1f}%")
PY

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
