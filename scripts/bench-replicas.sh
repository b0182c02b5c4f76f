#!/usr/bin/env bash
# What `--redis-replicas` costs: the distributed plumbing alone (pooled, as
# `scripts/bench-distributed.sh --pooled`) on a Redis master with one replica, both started here
# on free loopback ports, with `--redis-replicas 0` and `1` alternated round by round so machine
# noise hits both alike. Each round: a fresh worker whose reservoir holds every key of the round
# (--reservoir-once), then a timed `keyfleet submit --wait` of that many rows; the worker and
# `submit --wait` both run with the round's setting. Prints keys/s per round and the medians.
# First, at the Redis level, what `WAIT 1` adds to one write (scripts/wait-cost.py); with
# --writes, only that (no build, no RabbitMQ).
# Needs RabbitMQ on loopback (scripts/test.sh starts it), redis-server, redis-cli and curl.
# Usage: scripts/bench-replicas.sh [--writes] [KEYS_PER_ROUND=2000] [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
WRITES_ONLY=0
if [ "${1:-}" = "--writes" ]; then WRITES_ONLY=1; shift; fi
KEYS=${1:-2000}; ROUNDS=${2:-3}
[ $WRITES_ONLY = 1 ] || cargo build --release -q -p keyfleet -p keyfleet-worker
KF=target/release/keyfleet; W=target/release/keyfleet-worker
prefix="kfreplbench-$$"; dir=$(mktemp -d)
export XDG_STATE_HOME="$dir/state"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
master=$(free_port); replica=$(free_port); metrics=$(free_port)
cleanup() {
  if [ -n "${wpid:-}" ]; then kill "$wpid" 2>/dev/null || true; fi
  redis-cli -p "$replica" shutdown nosave >/dev/null 2>&1 || true
  redis-cli -p "$master" shutdown nosave >/dev/null 2>&1 || true
  for q in "$prefix.jobs" "$prefix.jobs.dead"; do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
  for q in $(rabbitmqctl -q list_queues name 2>/dev/null | grep -E "^${prefix}\.results\." || true); do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
  rm -rf "$dir"
}
trap cleanup EXIT
mkdir -p "$dir/master" "$dir/replica"
redis-server --port "$master" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --dir "$dir/master" --logfile "$dir/master.log" >/dev/null
redis-server --port "$replica" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --dir "$dir/replica" --replicaof 127.0.0.1 "$master" --logfile "$dir/replica.log" >/dev/null
until redis-cli -p "$master" info replication 2>/dev/null | grep -q 'slave0:.*state=online'; do sleep 0.2; done
export KEYFLEET_REDIS_URL="redis://127.0.0.1:$master/"

echo "one write, master + 1 replica on loopback:"
python3 scripts/wait-cost.py "$master" 5000
[ $WRITES_ONLY = 0 ] || exit 0

regions=(cn-qingdao cn-beijing cn-zhangjiakou cn-huhehaote cn-hangzhou cn-shanghai cn-shenzhen cn-chengdu cn-hongkong ap-southeast-1)
fleet() { # rows tag file: one owner a round, spread over regions, so the 500 quota never binds
  { echo "Owner,RegionId,KeyPairName"; for ((i = 0; i < $1; i++)); do echo "acct-$2,${regions[i % ${#regions[@]}]},h-$2-$i"; done; } > "$3"
}

rows=()
for ((r = 0; r < ROUNDS; r++)); do
  for n in 0 1; do
    fleet "$KEYS" "n$n-$r" "$dir/pooled.csv"
    KEYFLEET_REDIS_REPLICAS=$n $W --prefix "$prefix" --threads 2 --metrics-addr "127.0.0.1:$metrics" \
      --reservoir "$KEYS" --reservoir-once --upstream-rps 0 --log error &
    wpid=$!
    until curl -sf "http://127.0.0.1:$metrics/metrics" 2>/dev/null \
      | awk -v k="$KEYS" '/^keyfleet_reservoir_keys\{bits="2048"\}/ && $2 >= k { ok = 1 } END { exit !ok }'; do
      sleep 0.5
    done
    t0=$(date +%s.%N)
    KEYFLEET_REDIS_REPLICAS=$n $KF submit "$dir/pooled.csv" --prefix "$prefix" --batch-id "n$n-$r" \
      --wait --out "$dir/out-n$n-$r" --progress off --json > "$dir/n$n-$r.json" 2>> "$dir/submit.log"
    t1=$(date +%s.%N)
    kill -TERM "$wpid"; wait "$wpid" || true; wpid=
    rm -rf "$dir/out-n$n-$r"
    created=$(jq -r '.tally.created // .created // empty' "$dir/n$n-$r.json" 2>/dev/null || true)
    rate=$(python3 -c "print($KEYS / ($t1 - $t0))")
    echo "round $((r + 1)), --redis-replicas $n: $rate keys/s (created: ${created:-?})"
    rows+=("$n $rate")
  done
done
python3 - "$KEYS" "${rows[@]}" <<'PY'
import statistics, sys
keys = int(sys.argv[1])
by = {}
for r in sys.argv[2:]:
    n, rate = r.split()
    by.setdefault(n, []).append(float(rate))
m0, m1 = statistics.median(by["0"]), statistics.median(by["1"])
print(f"pooled, {keys} keys a round, 1 worker (2 threads), master + 1 replica on loopback:")
for n in ("0", "1"):
    print(f"  --redis-replicas {n}: {', '.join(f'{x:.0f}' for x in by[n])} keys/s  median {statistics.median(by[n]):.0f}")
print(f"  cost of --redis-replicas 1: {(1 - m1 / m0) * 100:.1f} % of the plumbing's rate")
PY
