#!/usr/bin/env bash
# Soak test of one keyfleet-worker's memory under a steady job rate.
#
# Usage: scripts/soak-worker.sh [DURATION_SECONDS=1800] [RATE_JOBS_PER_S=10] [BIN_DIR=target/release]
#
#   Needs RabbitMQ (guest/guest on 127.0.0.1:5672) and Redis (127.0.0.1:6379),
#   plus jq, rabbitmqctl and redis-cli. Every queue, exchange and Redis key
#   uses the prefix $SOAK_PREFIX (default kfsoak-<pid>); queues and keys are
#   removed on exit (exchanges stay: rabbitmqctl cannot delete them).
#
#   Every BATCH_SECONDS (20) one `keyfleet submit --wait` enqueues
#   RATE*BATCH_SECONDS rows for a fresh owner (acct-N, 10 regions, well under
#   the 500-per-region quota) and waits for all its results. Every 60 s the
#   worker's VmRSS is printed as `seconds rss_kib`; lines starting with `#`
#   are commentary. Private keys are written to a temp dir and deleted after
#   each batch; they are never printed.
#
#   Exit status: 0 when every batch answered all its rows with no failures,
#   1 otherwise.
set -euo pipefail

DURATION=${1:-1800}
RATE=${2:-10}
BIN_DIR=${3:-target/release}
BATCH_SECONDS=20
SAMPLE_SECONDS=60
PREFIX=${SOAK_PREFIX:-kfsoak-$$}
SUBMIT_TIMEOUT=${SOAK_SUBMIT_TIMEOUT:-300}

KEYFLEET=$BIN_DIR/keyfleet
WORKER_BIN=$BIN_DIR/keyfleet-worker
for b in "$KEYFLEET" "$WORKER_BIN"; do
  [[ -x $b ]] || { echo "soak: $b not found or not executable" >&2; exit 2; }
done
for t in jq rabbitmqctl redis-cli; do
  command -v "$t" >/dev/null || { echo "soak: $t is required" >&2; exit 2; }
done

REGIONS=(cn-qingdao cn-beijing cn-zhangjiakou cn-huhehaote cn-hangzhou
         cn-shanghai cn-shenzhen cn-chengdu cn-hongkong ap-southeast-1)
ROWS=$((RATE * BATCH_SECONDS))

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kfsoak.XXXXXX")
chmod 700 "$WORK"
WORKER_PID=
SAMPLER_PID=

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $SAMPLER_PID ]]; then kill "$SAMPLER_PID" 2>/dev/null || true; wait "$SAMPLER_PID" 2>/dev/null || true; fi
  if [[ -n $WORKER_PID ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
    kill -TERM "$WORKER_PID" 2>/dev/null || true
    # The worker drains within --drain-timeout (30 s); give it a little more.
    for _ in $(seq 1 40); do kill -0 "$WORKER_PID" 2>/dev/null || break; sleep 1; done
    if kill -0 "$WORKER_PID" 2>/dev/null; then
      echo "# worker did not exit after SIGTERM; sending SIGKILL" >&2
      kill -KILL "$WORKER_PID" 2>/dev/null || true
    fi
    local wrc=0; wait "$WORKER_PID" 2>/dev/null || wrc=$?
    echo "# worker exit status: $wrc"
  fi
  # Queues: $PREFIX.jobs, $PREFIX.jobs.dead and every $PREFIX.results.*
  local q queues=() listing try
  for try in 1 2 3 4 5; do
    if listing=$(timeout 60 rabbitmqctl -q list_queues name </dev/null 2>/dev/null); then break; fi
    listing=; sleep 3
  done
  mapfile -t queues < <(grep -E "^${PREFIX//./\\.}\.(jobs|jobs\.dead|results\..+)$" <<<"$listing" || true)
  if (( ${#queues[@]} == 0 )) && (( ${n:-0} > 0 )); then
    # Listing failed or came back empty: delete the names we know we created.
    queues=("$PREFIX.jobs" "$PREFIX.jobs.dead")
    for ((i = 1; i <= n; i++)); do queues+=("$PREFIX.results.soak-$i"); done
  fi
  local deleted=0
  for q in "${queues[@]}"; do
    # </dev/null: rabbitmqctl would otherwise eat stdin
    if timeout 60 rabbitmqctl -q delete_queue "$q" </dev/null >/dev/null 2>&1; then
      deleted=$((deleted + 1))
    else
      echo "# could not delete queue $q" >&2
    fi
  done
  echo "# deleted $deleted of ${#queues[@]} queues"
  redis-cli --scan --pattern "$PREFIX*" | xargs -r redis-cli del >/dev/null || echo "# could not delete Redis keys" >&2
  rm -rf "$WORK"
  echo "# cleaned up prefix $PREFIX"
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "# ERROR: line $LINENO: \"$BASH_COMMAND\" failed (status $?)" >&2' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

echo "# prefix=$PREFIX duration=${DURATION}s rate=${RATE}/s rows/batch=$ROWS bin=$BIN_DIR"
echo "# cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') x $(nproc)"

"$WORKER_BIN" --prefix "$PREFIX" --threads 2 --metrics-addr off --log warn \
  </dev/null >"$WORK/worker.log" 2>&1 &
WORKER_PID=$!
START=$(date +%s)
sleep 2
if ! kill -0 "$WORKER_PID" 2>/dev/null; then
  echo "soak: worker exited at start-up:" >&2; cat "$WORK/worker.log" >&2; exit 1
fi
echo "# worker pid $WORKER_PID"

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$WORKER_PID/status" 2>/dev/null || echo NA; }

echo "seconds rss_kib"
(
  next=0
  while :; do
    now=$(date +%s)
    if (( now - START >= next )); then
      echo "$((now - START)) $(rss_kib)"
      next=$((next + SAMPLE_SECONDS))
    fi
    sleep 1
  done
) &
SAMPLER_PID=$!

END=$((START + DURATION))
batches=0 jobs=0 created=0 failed=0 incomplete=0 submit_errors=0
n=0
while (( $(date +%s) < END )); do
  n=$((n + 1))
  t0=$(date +%s)
  csv=$WORK/batch-$n.csv
  {
    echo "RegionId,KeyPairName"
    for ((i = 0; i < ROWS; i++)); do
      echo "${REGIONS[i % ${#REGIONS[@]}]},soak-$n-key-$i"
    done
  } >"$csv"

  out=$WORK/out-$n
  src=0
  timeout "$SUBMIT_TIMEOUT" "$KEYFLEET" submit "$csv" --prefix "$PREFIX" \
    --batch-id "soak-$n" --owner "acct-$n" --wait --out "$out" \
    --identity "$WORK/identity-$n" --progress off --json \
    </dev/null >"$WORK/submit-$n.json" 2>"$WORK/submit-$n.err" || src=$?
  rm -rf "$out" "$WORK/identity-$n" "$csv"

  b_rows=0 b_created=0 b_failed=0 b_complete=false b_codes='{}'
  # The --json summary holds counts only (no key material).
  if parsed=$(jq -er '[(.rows // 0), (.created // 0), (.failed // 0), (.complete // false),
                       ((.failed_by_code // {}) | tojson)] | @tsv' "$WORK/submit-$n.json" 2>/dev/null) \
     && [[ -n $parsed ]]; then
    IFS=$'\t' read -r b_rows b_created b_failed b_complete b_codes <<<"$parsed" || true
  else
    echo "# batch $n: unparsable --json output: $(head -c 300 "$WORK/submit-$n.json" | tr '\n' ' ')"
  fi
  [[ $b_rows =~ ^[0-9]+$ ]] || b_rows=0
  [[ $b_created =~ ^[0-9]+$ ]] || b_created=0
  [[ $b_failed =~ ^[0-9]+$ ]] || b_failed=0
  batches=$((batches + 1))
  created=$((created + b_created))
  failed=$((failed + b_failed))
  jobs=$((jobs + b_created + b_failed))
  dt=$(( $(date +%s) - t0 ))
  if (( src != 0 )) || [[ $b_complete != true ]] || (( b_created + b_failed != ROWS )); then
    incomplete=$((incomplete + 1))
    (( src == 0 )) || submit_errors=$((submit_errors + 1))
    echo "# batch $n: NOT all rows answered (exit $src, rows=$b_rows created=$b_created failed=$b_failed complete=$b_complete, ${dt}s): $(head -c 500 "$WORK/submit-$n.err" | tr '\n' ' ')"
  elif (( b_failed > 0 )); then
    echo "# batch $n: created=$b_created failed=$b_failed $b_codes (${dt}s)"
  fi
  rm -f "$WORK/submit-$n.json" "$WORK/submit-$n.err"

  if ! kill -0 "$WORKER_PID" 2>/dev/null; then
    echo "# worker died during batch $n:"; tail -n 20 "$WORK/worker.log"; break
  fi
  left=$(( t0 + BATCH_SECONDS - $(date +%s) ))
  if (( left > 0 )); then sleep "$left"; fi
done

kill "$SAMPLER_PID" 2>/dev/null || true; wait "$SAMPLER_PID" 2>/dev/null || true; SAMPLER_PID=
now=$(date +%s)
echo "$((now - START)) $(rss_kib)"
echo "# final VmHWM_kib $(awk '/^VmHWM:/ {print $2}' "/proc/$WORKER_PID/status" 2>/dev/null || echo NA)"
echo "# batches=$batches jobs_answered=$jobs (expected $((batches * ROWS))) created=$created failed=$failed"
if (( incomplete == 0 )); then
  echo "# all rows answered in every batch: yes"
else
  echo "# all rows answered in every batch: NO ($incomplete batches incomplete, $submit_errors submit errors)"
fi
if [[ -s $WORK/worker.log ]]; then
  echo "# worker log (warnings/errors, last 20 lines):"; tail -n 20 "$WORK/worker.log" | sed 's/^/#   /'
fi
(( incomplete == 0 && failed == 0 ))
