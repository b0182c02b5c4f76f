#!/usr/bin/env bash
# Memory soak of one keyfleet-worker working through a large backlog (default 1,000,000 jobs).
#
# Usage: scripts/soak-backlog.sh [JOBS=1000000] [BIN_DIR=target/release]
#
#   Needs RabbitMQ (guest/guest on 127.0.0.1:5672) and Redis (127.0.0.1:6379),
#   plus jq, rabbitmqctl and redis-cli. Every queue, exchange and Redis key
#   uses the prefix $SOAK_PREFIX (default kfbacklog-<pid>); queues and keys are
#   removed on exit (exchanges stay: rabbitmqctl cannot delete them).
#
#   The batch: JOBS rows with unique names (bl-0, bl-1, ...), dealt round-robin
#   over every region of the region catalogue of both providers (aliyun and
#   ucloud, read from src/dialect/mod.rs: 32 + 24 = 56 regions), one owner,
#   mixed-provider CSV with a Provider column. With the default quota of 500
#   per region, about (regions x 500) = 28,000 rows create keys and the rest are
#   answered `QuotaExceed.KeyPair` (UCloud rows: RetCode 8203, the same quota
#   error in UCloud's dialect). That is intended: it keeps key generation to
#   minutes while the worker still takes every one of the JOBS jobs through its
#   whole lifecycle (decode, reserve in Redis, answer, publish the result with
#   a confirm, record the batch status, ack).
#
#   Steps: the whole batch is enqueued first (`keyfleet submit`, no worker
#   running, fresh --batch-id), so the backlog exists before the worker starts;
#   the enqueue time is printed. Then one worker (--prefix, --metrics-addr off,
#   --log warn, default threads) and a collector (`keyfleet collect` into a temp
#   folder, restarted if it stops idle before the batch is complete) start.
#   Every 30 s a line `seconds rss_kib jobs_queue answered collected` is
#   printed (seconds since the worker started; the worker's VmRSS; messages in
#   the jobs queue; jobs answered per `keyfleet status`; manifest lines written),
#   until every job is answered and collected, or $SOAK_TIMEOUT seconds
#   (default 10800) pass. Lines starting with `#` are commentary.
#
#   Checks at the end: rows answered == JOBS (one answer per job id and per
#   input line); created + failed == JOBS; created == .pem files == registry
#   records (`keyfleet describe`) == `keyfleet status` created; every failure
#   is the quota error (failure counts by code are printed); per region,
#   created == min(quota, rows in that region); queues drained, no dead
#   letters; no private key material in any log; the worker's RSS stayed
#   within +-10 % of its sample at 120 s (or, in a run shorter than that, its
#   first sample after start-up) from then to the end. Peak RSS (VmHWM) and
#   the first/last/peak samples are printed.
#
#   Private keys are written to a temp dir (mode 0700) and deleted on exit;
#   they are never printed.
#
#   Environment: SOAK_PREFIX, SOAK_TIMEOUT (seconds, default 10800),
#   SOAK_QUOTA (the worker's --quota, default 500; lower it only for a quick
#   trial of the quota path).
#
#   Exit status: 0 when every check holds, 1 otherwise, 2 for a bad set-up.
set -euo pipefail

JOBS=${1:-1000000}
BIN_DIR=${2:-target/release}
PREFIX=${SOAK_PREFIX:-kfbacklog-$$}
TIMEOUT=${SOAK_TIMEOUT:-10800}
QUOTA=${SOAK_QUOTA:-500}
SAMPLE_SECONDS=30
RSS_REF_SECONDS=120
OWNER=soak-backlog
BATCH=backlog-$(date +%s)-$$
REDIS_URL=redis://127.0.0.1:6379/

REPO=$(cd "$(dirname "$0")/.." && pwd)
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "soak: JOBS must be a positive integer, not '$JOBS'" >&2; exit 2; }
[[ $QUOTA =~ ^[1-9][0-9]*$ ]] || { echo "soak: SOAK_QUOTA must be a positive integer" >&2; exit 2; }
BIN_DIR=$(cd "$BIN_DIR" 2>/dev/null && pwd) || { echo "soak: no folder $2" >&2; exit 2; }
KEYFLEET=$BIN_DIR/keyfleet
WORKER_BIN=$BIN_DIR/keyfleet-worker
for b in "$KEYFLEET" "$WORKER_BIN"; do
  [[ -x $b ]] || { echo "soak: $b not found or not executable" >&2; exit 2; }
done
for t in jq rabbitmqctl redis-cli awk; do
  command -v "$t" >/dev/null || { echo "soak: $t is required" >&2; exit 2; }
done

# The region catalogue, as the binaries were built with it (src/dialect/mod.rs).
catalogue() { # $1 = ALIYUN or UCLOUD
  awk -v want="pub const $1_REGIONS" '
    index($0, want) == 1 { on = 1; next }
    on && /^\];/ { exit }
    on { if (match($0, /"[^"]+"/)) print substr($0, RSTART + 1, RLENGTH - 2) }
  ' "$REPO/src/dialect/mod.rs"
}
mapfile -t ALIYUN_REGIONS < <(catalogue ALIYUN)
mapfile -t UCLOUD_REGIONS < <(catalogue UCLOUD)
if (( ${#ALIYUN_REGIONS[@]} == 0 || ${#UCLOUD_REGIONS[@]} == 0 )); then
  echo "soak: could not read the region catalogue from $REPO/src/dialect/mod.rs" >&2; exit 2
fi
NREGIONS=$(( ${#ALIYUN_REGIONS[@]} + ${#UCLOUD_REGIONS[@]} ))

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kfbacklog.XXXXXX")
chmod 700 "$WORK"
OUT=$WORK/out
IDENTITY=$WORK/identity
# Binaries run in $WORK so that no stray ./keyfleet.toml changes regions or quota.
cd "$WORK"

WORKER_PID=
SAMPLER_PID=
COLLECT_PID=
SUBMITTED=0

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $SAMPLER_PID ]]; then kill "$SAMPLER_PID" 2>/dev/null || true; wait "$SAMPLER_PID" 2>/dev/null || true; fi
  if [[ -n $COLLECT_PID ]] && kill -0 "$COLLECT_PID" 2>/dev/null; then
    kill -TERM "$COLLECT_PID" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$COLLECT_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL "$COLLECT_PID" 2>/dev/null || true
    wait "$COLLECT_PID" 2>/dev/null || true
  fi
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
  # Queues: $PREFIX.jobs, $PREFIX.jobs.dead, $PREFIX.results.$BATCH (and any other of this prefix)
  local q queues=() listing try
  for try in 1 2 3 4 5; do
    if listing=$(timeout 60 rabbitmqctl -q list_queues name </dev/null 2>/dev/null); then break; fi
    listing=; sleep 3
  done
  mapfile -t queues < <(grep -E "^${PREFIX//./\\.}\.(jobs|jobs\.dead|results\..+)$" <<<"$listing" || true)
  if (( ${#queues[@]} == 0 && SUBMITTED )); then
    # Listing failed or came back empty: delete the names we know we created.
    queues=("$PREFIX.jobs" "$PREFIX.jobs.dead" "$PREFIX.results.$BATCH")
  fi
  local deleted=0
  for q in "${queues[@]}"; do
    # </dev/null: rabbitmqctl would otherwise eat stdin
    if timeout 120 rabbitmqctl -q delete_queue "$q" </dev/null >/dev/null 2>&1; then
      deleted=$((deleted + 1))
    else
      echo "# could not delete queue $q" >&2
    fi
  done
  echo "# deleted $deleted of ${#queues[@]} queues"
  # "$PREFIX:*", not "$PREFIX*": kfbacklog-12 must not match kfbacklog-123's keys.
  # UNLINK: the batch's job hash has JOBS fields; free it off Redis's main thread.
  local nkeys
  nkeys=$(redis-cli --scan --pattern "$PREFIX:*" | wc -l) || nkeys=0
  redis-cli --scan --pattern "$PREFIX:*" | xargs -r -n 500 redis-cli unlink >/dev/null \
    || echo "# could not delete Redis keys" >&2
  echo "# deleted $nkeys Redis keys"
  cd /
  rm -rf "$WORK"
  echo "# removed $WORK (key files, identity, manifest); cleaned up prefix $PREFIX"
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "# ERROR: line $LINENO: \"$BASH_COMMAND\" failed (status $?)" >&2' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

now_s() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# Messages (ready + unacked) in one of this run's queues; NA when rabbitmqctl does not answer.
# RabbitMQ refreshes these counts every few seconds (statistics interval), so a value read
# right after a change may be stale: queue_depth_settled polls for the value it expects.
queue_depth() { # $1 = queue name
  local listing
  listing=$(timeout 30 rabbitmqctl -q list_queues name messages </dev/null 2>/dev/null) || { echo NA; return; }
  awk -v q="$1" '$1 == q { print $2; found = 1 } END { if (!found) print "NA" }' <<<"$listing"
}
queue_depth_settled() { # $1 = queue name, $2 = expected count; gives up after ~30 s
  local d i
  for i in 1 2 3 4 5 6 7 8 9 10; do
    d=$(queue_depth "$1")
    [[ $d == "$2" ]] && break
    sleep 3
  done
  echo "$d"
}

echo "# prefix=$PREFIX batch=$BATCH jobs=$JOBS quota=$QUOTA timeout=${TIMEOUT}s bin=$BIN_DIR"
echo "# cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') x $(nproc)"
echo "# regions: ${#ALIYUN_REGIONS[@]} aliyun + ${#UCLOUD_REGIONS[@]} ucloud = $NREGIONS; owner $OWNER"

# --- the batch -----------------------------------------------------------------------------
CSV=$WORK/batch.csv
t0=$(now_s)
awk -v jobs="$JOBS" -v aliyun="${ALIYUN_REGIONS[*]}" -v ucloud="${UCLOUD_REGIONS[*]}" '
  BEGIN {
    na = split(aliyun, a, " "); nu = split(ucloud, u, " "); n = na + nu
    print "Provider,RegionId,Region,KeyPairName"
    for (i = 0; i < jobs; i++) {
      k = i % n
      if (k < na) printf "aliyun,%s,,bl-%d\n", a[k + 1], i
      else        printf "ucloud,,%s,bl-%d\n", u[k - na + 1], i
    }
  }' >"$CSV"
# Rows per provider/region, and what the quota lets each create.
awk -F, -v q="$QUOTA" 'NR > 1 { r = ($1 == "aliyun") ? $2 : $3; n[$1 "\t" r]++ }
  END { for (k in n) print k "\t" n[k] "\t" (n[k] < q ? n[k] : q) }' "$CSV" | sort >"$WORK/expected.tsv"
EXPECTED_CREATED=$(awk -F'\t' '{ s += $4 } END { print s + 0 }' "$WORK/expected.tsv")
echo "# batch file: $JOBS rows in $(elapsed "$t0" "$(now_s)") s, $(du -h "$CSV" | cut -f1);" \
  "$(wc -l <"$WORK/expected.tsv") regions, $(awk -F'\t' 'NR==1{mn=$3;mx=$3} {if($3<mn)mn=$3; if($3>mx)mx=$3} END{print mn "-" mx}' "$WORK/expected.tsv") rows each;" \
  "expected: $EXPECTED_CREATED created, $((JOBS - EXPECTED_CREATED)) quota failures"

# --- enqueue the whole backlog before any worker runs --------------------------------------
# Jobs a message: as `submit`'s default (auto) unless KEYFLEET_JOBS_PER_MESSAGE says (1: v1
# messages).
JOBS_PER_MESSAGE=$(echo "${KEYFLEET_JOBS_PER_MESSAGE:-auto}" | tr -d "[:space:]" | tr "[:upper:]" "[:lower:]")
# The messages N jobs become: auto packs 8 a message for the first 256 jobs, 32 after
# (src/job/jobs_per_message.rs); a number packs that many.
messages_for() {
  local n=$1
  if [ "$JOBS_PER_MESSAGE" = auto ]; then
    if [ "$n" -le 256 ]; then echo $(( (n + 7) / 8 )); else echo $(( 32 + (n - 256 + 31) / 32 )); fi
  else
    echo $(( (n + JOBS_PER_MESSAGE - 1) / JOBS_PER_MESSAGE ))
  fi
}
SUBMITTED=1
t0=$(now_s)
src=0
"$KEYFLEET" submit "$CSV" --prefix "$PREFIX" --batch-id "$BATCH" --owner "$OWNER" \
  --identity "$IDENTITY" --progress off --json --jobs-per-message "$JOBS_PER_MESSAGE" \
  </dev/null >"$WORK/submit.json" 2>"$WORK/submit.err" || src=$?
t1=$(now_s)
ENQUEUE_SECONDS=$(elapsed "$t0" "$t1")
sub_enqueued=$(jq -r '.enqueued // "NA"' "$WORK/submit.json" 2>/dev/null || echo NA)
sub_rejected=$(jq -r '.rejected // "NA"' "$WORK/submit.json" 2>/dev/null || echo NA)
sub_rate=$(jq -r '(.jobs_per_second // 0) | floor' "$WORK/submit.json" 2>/dev/null || echo NA)
echo "# enqueue: exit $src, ${ENQUEUE_SECONDS} s wall (submit's own figure: $(jq -r '.seconds // "NA"' "$WORK/submit.json" 2>/dev/null || echo NA) s," \
  "$sub_rate jobs/s); enqueued=$sub_enqueued rejected=$sub_rejected"
if (( src != 0 )) || [[ $sub_enqueued != "$JOBS" ]]; then
  echo "# submit failed or enqueued the wrong count: $(head -c 500 "$WORK/submit.err" | tr '\n' ' ')"
  exit 1
fi
rm -f "$CSV"
BACKLOG=$(queue_depth_settled "$PREFIX.jobs" "$(messages_for "$JOBS")")
echo "# jobs queue before the worker starts: $BACKLOG messages"

# --- worker, collector, sampler ------------------------------------------------------------
"$WORKER_BIN" --prefix "$PREFIX" --quota "$QUOTA" --metrics-addr off --log warn \
  </dev/null >"$WORK/worker.log" 2>&1 &
WORKER_PID=$!
START=$(date +%s)
echo "# worker pid $WORKER_PID"

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$WORKER_PID/status" 2>/dev/null || echo NA; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$WORKER_PID/status" 2>/dev/null || echo NA; }
answered() { "$KEYFLEET" status "$BATCH" --prefix "$PREFIX" --json </dev/null 2>/dev/null | jq -r '.answered // "NA"' 2>/dev/null || echo NA; }
collected() { if [[ -f $OUT/manifest.jsonl ]]; then wc -l <"$OUT/manifest.jsonl"; else echo 0; fi; }
sample() { # one line of the table; the VmRSS is read first, the slower probes after it
  local t rss
  t=$(( $(date +%s) - START )); rss=$(rss_kib)
  echo "$t $rss $(queue_depth "$PREFIX.jobs") $(answered) $(collected)"
}

echo "seconds rss_kib jobs_queue answered collected"
(
  next=0
  while :; do
    if (( $(date +%s) - START >= next )); then
      sample | tee -a "$WORK/samples.txt"
      next=$((next + SAMPLE_SECONDS))
    fi
    sleep 1
  done
) &
SAMPLER_PID=$!

sleep 2
if ! kill -0 "$WORKER_PID" 2>/dev/null; then
  echo "# worker exited at start-up:"; grep -v -E 'PRIVATE KEY|AGE ENCRYPTED' "$WORK/worker.log" | tail -n 20 | sed 's/^/#   /'
  exit 1
fi

ncollect=0
start_collector() {
  ncollect=$((ncollect + 1))
  "$KEYFLEET" collect "$BATCH" --out "$OUT" --identity "$IDENTITY" --prefix "$PREFIX" \
    --idle-timeout 300s --progress lines --json \
    </dev/null >"$WORK/collect-$ncollect.json" 2>>"$WORK/collect.err" &
  COLLECT_PID=$!
}
start_collector

DEADLINE=$((START + TIMEOUT))
complete=false timed_out=false worker_died=false
while :; do
  if ! kill -0 "$COLLECT_PID" 2>/dev/null; then
    crc=0; wait "$COLLECT_PID" || crc=$?
    COLLECT_PID=
    c=$(jq -r '.complete // false' "$WORK/collect-$ncollect.json" 2>/dev/null || echo false)
    if [[ $c == true ]]; then complete=true; break; fi
    echo "# collector run $ncollect stopped (exit $crc) before the batch was complete:" \
      "$(tail -n 3 "$WORK/collect.err" | tr '\n' ' ' | head -c 400)"
    if ! kill -0 "$WORKER_PID" 2>/dev/null; then worker_died=true; break; fi
    (( $(date +%s) < DEADLINE )) || { timed_out=true; break; }
    start_collector
  fi
  if ! kill -0 "$WORKER_PID" 2>/dev/null && [[ $worker_died == false ]]; then
    worker_died=true
    echo "# worker died at $(( $(date +%s) - START )) s; waiting for the collector to finish"
  fi
  if (( $(date +%s) >= DEADLINE )); then timed_out=true; break; fi
  sleep 2
done
END=$(date +%s)

kill "$SAMPLER_PID" 2>/dev/null || true; wait "$SAMPLER_PID" 2>/dev/null || true; SAMPLER_PID=
if kill -0 "$WORKER_PID" 2>/dev/null; then
  sample | tee -a "$WORK/samples.txt"
  PEAK_HWM=$(hwm_kib)
else
  PEAK_HWM=NA
fi
if [[ -n $COLLECT_PID ]]; then
  kill -TERM "$COLLECT_PID" 2>/dev/null || true; wait "$COLLECT_PID" 2>/dev/null || true; COLLECT_PID=
fi
TOTAL_SECONDS=$((END - START))
echo "# done: collector complete=$complete timed_out=$timed_out worker_died=$worker_died;" \
  "$TOTAL_SECONDS s from worker start to the last result collected ($ncollect collector run(s))"
if (( TOTAL_SECONDS > 0 )); then
  echo "# rate: $(awk -v j="$JOBS" -v s="$TOTAL_SECONDS" 'BEGIN { printf "%.0f", j / s }') jobs/s answered and collected"
fi

# Stop the worker now (not in cleanup) so its exit status and log are part of the result.
wrc=NA
if kill -0 "$WORKER_PID" 2>/dev/null; then
  kill -TERM "$WORKER_PID" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$WORKER_PID" 2>/dev/null || break; sleep 1; done
  kill -0 "$WORKER_PID" 2>/dev/null && kill -KILL "$WORKER_PID" 2>/dev/null
  wrc=0; wait "$WORKER_PID" 2>/dev/null || wrc=$?
elif [[ -n $WORKER_PID ]]; then
  wrc=0; wait "$WORKER_PID" 2>/dev/null || wrc=$?
fi
WORKER_PID=
echo "# worker exit status after SIGTERM: $wrc"

# --- verification --------------------------------------------------------------------------
fails=0
check() { # $1 = condition holds (0/1 as a shell test result), rest = description
  local ok=$1; shift
  if (( ok )); then echo "# PASS $*"; else echo "# FAIL $*"; fails=$((fails + 1)); fi
}
ok() { if "$@"; then echo 1; else echo 0; fi; }

MANIFEST=$OUT/manifest.jsonl
[[ -f $MANIFEST ]] || : >"$WORK/empty.jsonl"
[[ -f $MANIFEST ]] || MANIFEST=$WORK/empty.jsonl
MANIFEST_LINES=$(wc -l <"$MANIFEST")
# One TSV row per manifest line: job id, input line, status, code, provider, region, attempt.
# (No key material: the manifest's PrivateKeyBody holds a file path, and it is not extracted.)
jq -r '[.job_id, (.line // 0), .status, (.code // "-"), .provider, .region, (.attempt // 1)] | @tsv' \
  "$MANIFEST" >"$WORK/answers-all.tsv"
# The manifest's last line for a job id is its answer.
awk -F'\t' '{ last[$1] = $0 } END { for (j in last) print last[j] }' "$WORK/answers-all.tsv" >"$WORK/answers.tsv"
rm -f "$WORK/answers-all.tsv"
read -r A_JOBS A_LINES A_MINLINE A_MAXLINE A_CREATED A_FAILED A_REDELIVERED < <(awk -F'\t' '
  { jobs++; if (!($2 in seen)) { seen[$2] = 1; lines++ }
    if (mn == "" || $2 < mn) mn = $2; if ($2 > mx) mx = $2
    if ($3 == "created") c++; else if ($3 == "failed") f++
    if ($7 > 1) r++ }
  END { print jobs + 0, lines + 0, (mn == "" ? 0 : mn), mx + 0, c + 0, f + 0, r + 0 }' "$WORK/answers.tsv")

STATUS_JSON=$("$KEYFLEET" status "$BATCH" --prefix "$PREFIX" --json </dev/null 2>"$WORK/status.err" || echo '{}')
S_TOTAL=$(jq -r '.total // "NA"' <<<"$STATUS_JSON")
S_ANSWERED=$(jq -r '.answered // "NA"' <<<"$STATUS_JSON")
S_CREATED=$(jq -r '.created // "NA"' <<<"$STATUS_JSON")
S_FAILED=$(jq -r '[(.failed // {})[]] | add // 0' <<<"$STATUS_JSON")

"$KEYFLEET" describe --redis-url "$REDIS_URL" --prefix "$PREFIX" --owner "$OWNER" --json \
  </dev/null 2>"$WORK/describe.err" \
  | jq -r '[.scope.provider, .scope.region, (.delivered | tostring)] | @tsv' >"$WORK/registry.tsv" || true
R_RECORDS=$(wc -l <"$WORK/registry.tsv")
R_UNDELIVERED=$(awk -F'\t' '$3 != "true"' "$WORK/registry.tsv" | wc -l)

PEM_FILES=$(find "$OUT" -type f -name '*.pem' 2>/dev/null | wc -l)
PUB_FILES=$(find "$OUT" -type f -name '*.pub' 2>/dev/null | wc -l)

echo "# manifest: $MANIFEST_LINES lines, $A_JOBS distinct job ids, $A_LINES distinct input lines ($A_MINLINE..$A_MAXLINE);" \
  "created=$A_CREATED failed=$A_FAILED; answers with attempt > 1 (redelivered): $A_REDELIVERED"
echo "# status:   total=$S_TOTAL answered=$S_ANSWERED created=$S_CREATED failed=$S_FAILED"
echo "# registry: $R_RECORDS records of owner $OWNER ($R_UNDELIVERED not marked delivered); key files: $PEM_FILES .pem, $PUB_FILES .pub"
echo "# failures by code (provider code count):"
awk -F'\t' '$3 == "failed" { n[$5 "\t" $4]++ } END { for (k in n) print k "\t" n[k] }' "$WORK/answers.tsv" \
  | sort | sed 's/^/#   /' | tr '\t' ' '
BAD_CODES=$(awk -F'\t' '$3 == "failed" && !(($5 == "aliyun" && $4 == "QuotaExceed.KeyPair") || ($5 == "ucloud" && $4 == "8203"))' \
  "$WORK/answers.tsv" | wc -l)
OTHER_STATUS=$(awk -F'\t' '$3 != "created" && $3 != "failed"' "$WORK/answers.tsv" | wc -l)

# Per region: created in the manifest and records in the registry against min(quota, rows).
awk -F'\t' '$3 == "created" { print $5 "\t" $6 }' "$WORK/answers.tsv" | sort | uniq -c \
  | awk '{ print $2 "\t" $3 "\t" $1 }' >"$WORK/created.tsv"
awk -F'\t' '{ print $1 "\t" $2 }' "$WORK/registry.tsv" | sort | uniq -c \
  | awk '{ print $2 "\t" $3 "\t" $1 }' >"$WORK/registry-count.tsv"
awk -F'\t' '
  FILENAME == ARGV[1] { exp_[$1 "\t" $2] = $4; rows[$1 "\t" $2] = $3; next }
  FILENAME == ARGV[2] { cr[$1 "\t" $2] = $3; next }
                      { rg[$1 "\t" $2] = $3 }
  END {
    for (k in cr) if (!(k in exp_)) { print "unexpected region " k " created=" cr[k]; bad++ }
    for (k in exp_) {
      if (cr[k] + 0 != exp_[k] || rg[k] + 0 != exp_[k]) {
        print k ": rows=" rows[k] " expected=" exp_[k] " created=" cr[k] + 0 " registry=" rg[k] + 0; bad++
      }
      if (exp_[k] < rows[k]) full++; else under++
    }
    print "summary " bad + 0 " " full + 0 " " under + 0
  }' "$WORK/expected.tsv" "$WORK/created.tsv" "$WORK/registry-count.tsv" >"$WORK/regions.txt"
read -r _ REGION_BAD REGIONS_FULL REGIONS_UNDER < <(grep '^summary ' "$WORK/regions.txt")
grep -v '^summary ' "$WORK/regions.txt" | head -n 20 | sed 's/^/#   region mismatch: /' | tr '\t' ' ' || true
echo "# regions: $REGIONS_FULL at the quota ($QUOTA), $REGIONS_UNDER below it (all their rows created), $REGION_BAD mismatched"

J_LEFT=$(queue_depth_settled "$PREFIX.jobs" 0)
D_LEFT=$(queue_depth_settled "$PREFIX.jobs.dead" 0)
R_LEFT=$(queue_depth_settled "$PREFIX.results.$BATCH" 0)
echo "# queues at the end: jobs=$J_LEFT jobs.dead=$D_LEFT results=$R_LEFT"
DUPS=$(cat "$WORK"/collect-*.json 2>/dev/null | jq -s '[.[].duplicates // 0] | add // 0' 2>/dev/null || echo NA)
REJ=$(cat "$WORK"/collect-*.json 2>/dev/null | jq -s '[.[].rejected // 0] | add // 0' 2>/dev/null || echo NA)
UNREAD=0; [[ -f $OUT/unreadable.jsonl ]] && UNREAD=$(wc -l <"$OUT/unreadable.jsonl")
echo "# collector: $ncollect run(s); duplicates=$DUPS rejected=$REJ unreadable=$UNREAD"

# Logs: counted by level; a line holding key material is never printed, and fails the run.
KEY_LINES=$(cat "$WORK/worker.log" "$WORK/collect.err" "$WORK/submit.err" 2>/dev/null \
  | grep -c -E 'PRIVATE KEY|AGE ENCRYPTED|AGE-SECRET-KEY' || true)
W_WARN=$(grep -c ' WARN ' "$WORK/worker.log" || true)
W_ERROR=$(grep -c -E ' ERROR |panicked' "$WORK/worker.log" || true)
C_WARN=$(grep -c -E ' WARN | ERROR |panicked' "$WORK/collect.err" || true)
echo "# worker log: $(wc -l <"$WORK/worker.log") lines, $W_WARN WARN, $W_ERROR ERROR/panic; collector log: $C_WARN WARN/ERROR/panic"
if [[ -s $WORK/worker.log ]]; then
  echo "# worker log (last 15 lines):"
  grep -v -E 'PRIVATE KEY|AGE ENCRYPTED|AGE-SECRET-KEY' "$WORK/worker.log" | tail -n 15 | cut -c1-300 | sed 's/^/#   /'
fi
if (( C_WARN > 0 )); then
  echo "# collector warnings (last 10):"
  grep -E ' WARN | ERROR |panicked' "$WORK/collect.err" | grep -v -E 'PRIVATE KEY|AGE ENCRYPTED|AGE-SECRET-KEY' \
    | tail -n 10 | cut -c1-300 | sed 's/^/#   /'
fi

# RSS: reference = first sample at >= 120 s; in a shorter run, the first sample after 0 s.
read -r FIRST_T FIRST_RSS LAST_T LAST_RSS PEAK_T PEAK_RSS REF_T REF_RSS MIN_AFTER MAX_AFTER NSAMPLES < <(awk -v ref="$RSS_REF_SECONDS" '
  BEGIN { n = 0 }
  $2 ~ /^[0-9]+$/ { t[n] = $1; r[n] = $2; n++ }
  END {
    if (n == 0) { print "NA NA NA NA NA NA NA NA NA NA 0"; exit }
    p = 0; for (i = 0; i < n; i++) if (r[i] > r[p]) p = i
    k = -1; for (i = 0; i < n; i++) if (t[i] >= ref) { k = i; break }
    if (k < 0) k = (n > 1) ? 1 : 0
    mn = r[k]; mx = r[k]
    for (i = k; i < n; i++) { if (r[i] < mn) mn = r[i]; if (r[i] > mx) mx = r[i] }
    print t[0], r[0], t[n-1], r[n-1], t[p], r[p], t[k], r[k], mn, mx, n
  }' "$WORK/samples.txt")
echo "# RSS samples: $NSAMPLES; first ${FIRST_T}s ${FIRST_RSS} KiB, last ${LAST_T}s ${LAST_RSS} KiB," \
  "peak sample ${PEAK_T}s ${PEAK_RSS} KiB; worker VmHWM ${PEAK_HWM} KiB"
RSS_OK=0
if [[ $REF_RSS =~ ^[0-9]+$ ]]; then
  lo=$(awk -v r="$REF_RSS" 'BEGIN { printf "%d", r * 0.9 }')
  hi=$(awk -v r="$REF_RSS" 'BEGIN { printf "%d", r * 1.1 }')
  (( MIN_AFTER >= lo && MAX_AFTER <= hi )) && RSS_OK=1
  echo "# RSS verdict: from ${REF_T}s (${REF_RSS} KiB) to the end the samples ranged ${MIN_AFTER}..${MAX_AFTER} KiB" \
    "($(awk -v a="$MIN_AFTER" -v b="$MAX_AFTER" -v r="$REF_RSS" 'BEGIN { printf "%+.1f%%..%+.1f%%", (a - r) * 100 / r, (b - r) * 100 / r }'));" \
    "$( ((RSS_OK)) && echo "STAYED within +-10 %" || echo "did NOT stay within +-10 %")"
else
  echo "# RSS verdict: no usable samples"
fi

echo "# checks:"
check "$(ok test "$BACKLOG" = "$(messages_for "$JOBS")")" \
  "the jobs queue held the whole backlog before the worker started ($BACKLOG messages, --jobs-per-message $JOBS_PER_MESSAGE)"
check "$(ok test "$complete" = true)" "collector reported the batch complete"
check "$(ok test "$A_JOBS" -eq "$JOBS")" "rows answered == JOBS ($A_JOBS of $JOBS distinct job ids in the manifest)"
check "$(ok test "$A_LINES" -eq "$JOBS" -a "$A_MINLINE" -eq 2 -a "$A_MAXLINE" -eq $((JOBS + 1)))" \
  "every input line answered once (lines 2..$((JOBS + 1)))"
check "$(ok test "$S_TOTAL" = "$JOBS" -a "$S_ANSWERED" = "$JOBS")" "status: total == answered == JOBS ($S_TOTAL / $S_ANSWERED)"
check "$(ok test $((A_CREATED + A_FAILED)) -eq "$JOBS" -a "$OTHER_STATUS" -eq 0)" \
  "created + failed == JOBS ($A_CREATED + $A_FAILED = $((A_CREATED + A_FAILED)))"
check "$(ok test "$A_CREATED" -eq "$PEM_FILES" -a "$A_CREATED" -eq "$R_RECORDS" -a "$S_CREATED" = "$A_CREATED")" \
  "created == .pem files == registry records == status created ($A_CREATED / $PEM_FILES / $R_RECORDS / $S_CREATED)"
check "$(ok test "$A_CREATED" -eq "$EXPECTED_CREATED")" "created == sum over regions of min($QUOTA, rows) ($A_CREATED vs $EXPECTED_CREATED)"
check "$(ok test "$S_FAILED" = "$A_FAILED")" "status failed == manifest failed ($S_FAILED / $A_FAILED)"
check "$(ok test "$BAD_CODES" -eq 0)" "every failure is the quota error (QuotaExceed.KeyPair / UCloud 8203): $BAD_CODES others"
check "$(ok test "$REGION_BAD" -eq 0)" "per region created == registry == min($QUOTA, rows) ($REGION_BAD regions differ)"
check "$(ok test "$R_UNDELIVERED" -eq 0)" "every registry record marked delivered ($R_UNDELIVERED not)"
check "$(ok test "$J_LEFT" = 0 -a "$D_LEFT" = 0 -a "$R_LEFT" = 0)" "queues drained, no dead letters (jobs=$J_LEFT dead=$D_LEFT results=$R_LEFT)"
check "$(ok test "$KEY_LINES" -eq 0)" "no private key material in the logs ($KEY_LINES lines)"
check "$(ok test "$worker_died" = false -a "$wrc" = 0)" "worker ran to the end and drained cleanly (exit $wrc)"
check "$RSS_OK" "worker RSS within +-10 % of the ${REF_T}s sample until the end"
echo "# summary: jobs=$JOBS enqueue=${ENQUEUE_SECONDS}s total=${TOTAL_SECONDS}s created=$A_CREATED failed=$A_FAILED" \
  "VmHWM=${PEAK_HWM}KiB checks_failed=$fails"
(( fails == 0 ))
