#!/usr/bin/env bash
# Chaos soak of distributed mode (not part of CI; run it by hand, it takes ~1 minute a round).
#
#   scripts/chaos.sh [--rounds N] [--seed S] [--jobs J] [--bin DIR] [--logs DIR] [--keep]
#                    [--faults KIND,...] [--force-rabbit]
#
#   --rounds N     rounds to run (default 20)
#   --seed S       seed of everything random: inputs, quotas, fault kinds and points (default:
#                  the date, %s). The same seed gives the same rounds (fault *timing* follows the
#                  batch's progress, so it varies a little with the machine).
#   --jobs J       rows per round (default 150)
#   --bin DIR      where keyfleet and keyfleet-worker are (default target/release; build them
#                  first: cargo build --release --workspace)
#   --logs DIR     per-round logs (default target/chaos/<seed>)
#   --keep         keep each round's key files (default: only rounds with a violation keep them)
#   --faults LIST  fault kinds to draw from (default all: worker-kill,rabbit-restart,
#                  redis-restart,redis-stall); a kind left out is not injected
#   --force-rabbit restart RabbitMQ's app even when clients other than this round's are
#                  connected (by default such a restart is skipped and counted as
#                  rabbit-restart-skipped: the broker is the machine's, shared with other tests)
#
# Each round: a fresh prefix (kfchaos-<seed>-<round>), a private Redis on a free loopback port
# (no persistence configured; its data directory is the round's), the machine's RabbitMQ
# (amqp://guest:guest@127.0.0.1:5672), 3 workers (--threads 1 --reservoir 0: no keys made
# ahead, so key generation paces the batch and the faults land while jobs are in flight), `keyfleet submit` of a generated
# batch (both clouds, ~5 % invalid rows, ~8 % duplicate names, half the rounds a small --quota
# with a hot region), a collector running through the faults, and 2-5 faults at random points
# of the batch's progress:
#   worker-kill     SIGKILL one worker, start a replacement at once
#   rabbit-restart  rabbitmqctl stop_app, 1-4 s down, start_app (every connection drops)
#   redis-restart   SHUTDOWN SAVE, 1-4 s down, redis-server again on the same port and RDB file:
#                   a restart of a Redis that keeps its data (connections drop, port refuses)
#   redis-stall     DEBUG SLEEP 2-6 s: the server hangs without dropping connections
# Then `keyfleet collect` until the batch is complete (deadline 300 s), workers drained with
# SIGTERM, and the invariants checked (scripts/chaos.py check): every input row exactly one
# manifest line; every answer one the API could give; per region created == min(quota,
# distinct names); created == registry records == .pem files; each .pem's fingerprint
# (ssh-keygen) == the registry's == the manifest's, .pub matches, mode 0600; no duplicate
# fingerprints; quota never above the limit (records and the `used` counter); no reservation
# left, every record delivered; nothing in <prefix>.jobs.dead or left in <prefix>.jobs;
# no rejected/unreadable results; `status` agrees with the manifest; no worker died by itself
# or exited non-zero on SIGTERM; no panic or private key in any log.
# Output: one line per round and a final table. Exit 1 if any invariant was violated.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ROUNDS=20; SEED=$(date +%s); JOBS=150; BIN=target/release; LOGS=; KEEP=0; FORCE_RABBIT=0
KINDS=worker-kill,rabbit-restart,redis-restart,redis-stall
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    --logs) LOGS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --faults) KINDS=$2; shift 2 ;;
    --force-rabbit) FORCE_RABBIT=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "chaos.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $ROUNDS =~ ^[0-9]+$ && $JOBS =~ ^[0-9]+$ && $SEED =~ ^[A-Za-z0-9]+$ ]] \
  || { echo "chaos.sh: --rounds and --jobs take numbers, --seed letters and digits" >&2; exit 2; }
BIN=$(cd "$BIN" 2>/dev/null && pwd) || { echo "chaos.sh: no folder $BIN" >&2; exit 2; }
KF=$BIN/keyfleet; KW=$BIN/keyfleet-worker
for x in "$KF" "$KW"; do [ -x "$x" ] || { echo "chaos.sh: $x is missing (cargo build --release --workspace)" >&2; exit 2; }; done
for t in redis-server redis-cli rabbitmqctl ssh-keygen python3 ss; do
  command -v $t >/dev/null || { echo "chaos.sh: $t is needed" >&2; exit 2; }
done
LOGS=${LOGS:-target/chaos/$SEED}
mkdir -p "$LOGS"; LOGS=$(cd "$LOGS" && pwd)
HELPER=$ROOT/scripts/chaos.py
AMQP_PORT=5672

# RabbitMQ restarts need rabbitmqctl to manage the broker on 127.0.0.1:5672 as this user.
if [[ ,$KINDS, == *,rabbit-restart,* ]] && ! rabbitmqctl -q status >/dev/null 2>&1; then
  echo "chaos.sh: rabbitmqctl cannot manage the broker here: rabbit-restart is skipped" >&2
  KINDS=$(echo ",$KINDS," | sed 's/,rabbit-restart,/,/; s/^,//; s/,$//')
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port up|down seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    if port_open "$1"; then [ "$2" = up ] && return 0; else [ "$2" = down ] && return 0; fi
    sleep 0.1
  done
  return 1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
since() { python3 -c "print(f'{$(now) - $1:.1f}')"; }

# --- state of the current round (for cleanup on exit)
declare -a WPID=() WGEN=()
RD=; RPORT=; PREFIX=; BATCH=; CPID=; RABBIT_DOWN=0

start_redis() {
  mkdir -p "$RD/redis"
  redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --dir "$RD/redis" --dbfilename dump.rdb --pidfile "$RD/redis/redis.pid" \
    --logfile "$RD/redis/redis.log" --enable-debug-command local >/dev/null
  wait_port "$RPORT" up 20 && redis-cli -p "$RPORT" PING >/dev/null
}

start_worker() { # slot
  local s=$1
  WGEN[$s]=$(( ${WGEN[$s]:-0} + 1 ))
  ( cd "$RD" && exec nice "$KW" --threads 1 --reservoir 0 --metrics-addr off "${QUOTA_ARGS[@]}" --log info ) \
    >"$RD/worker-$s-${WGEN[$s]}.log" 2>&1 &
  WPID[$s]=$!
}

my_pids() { echo "${WPID[@]:-}" "${CPID:-}"; }

# Clients on the broker that are not this round's processes.
foreign_amqp_clients() {
  local mine=" $(my_pids) " pid out=()
  for pid in $(ss -tnpH state established "( dport = :$AMQP_PORT )" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
    [[ $mine == *" $pid "* ]] || out+=("$pid:$(cat /proc/$pid/comm 2>/dev/null)")
  done
  echo "${out[@]:-}"
}

check_workers() { # restart a worker that died without being killed; record it
  local s code
  for s in 0 1 2; do
    [ -n "${WPID[$s]:-}" ] || continue
    if ! kill -0 "${WPID[$s]}" 2>/dev/null; then
      wait "${WPID[$s]}"; code=$?
      echo "worker slot $s gen ${WGEN[$s]} pid ${WPID[$s]} exited by itself with status $code at $(since "$T0") s (log worker-$s-${WGEN[$s]}.log)" >>"$RD/worker-exits.txt"
      start_worker "$s"
    fi
  done
}

progress() { # prints "done total" (total may be "?")
  local js
  js=$(timeout 8 "$KF" status "$BATCH" --json --connect-timeout 2s 2>/dev/null) || { echo "? ?"; return; }
  python3 -c 'import json,sys; s=json.loads(sys.argv[1]); print(s["created"]+sum(s["failed"].values()), s["total"] if s["total"] is not None else "?")' "$js"
}

inject() { # kind arg -> note
  local kind=$1 arg=$2 s pid f
  case $kind in
    worker-kill)
      s=$arg; pid=${WPID[$s]}
      kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
      start_worker "$s"
      echo "slot $s pid $pid killed, replaced by ${WPID[$s]}" ;;
    rabbit-restart)
      f=$(foreign_amqp_clients)
      if [ -n "$f" ] && [ "$FORCE_RABBIT" = 0 ]; then
        echo "SKIPPED: other clients on the broker ($f)"; return 3
      fi
      RABBIT_DOWN=1
      rabbitmqctl -q stop_app >/dev/null 2>&1
      sleep "$arg"
      rabbitmqctl -q start_app >/dev/null 2>&1 && RABBIT_DOWN=0
      wait_port $AMQP_PORT up 60
      echo "stop_app, ${arg}s, start_app" ;;
    redis-restart)
      redis-cli -p "$RPORT" SHUTDOWN SAVE >/dev/null 2>&1
      wait_port "$RPORT" down 10
      sleep "$arg"
      start_redis
      echo "SHUTDOWN SAVE, ${arg}s down, started from dump.rdb ($(redis-cli -p "$RPORT" DBSIZE) keys)" ;;
    redis-stall)
      redis-cli -p "$RPORT" DEBUG SLEEP "$arg" >/dev/null 2>&1
      echo "DEBUG SLEEP $arg" ;;
  esac
}

end_round() { # stop everything this round started; delete its queues
  local s pid
  [ "$RABBIT_DOWN" = 1 ] && { rabbitmqctl -q start_app >/dev/null 2>&1; wait_port $AMQP_PORT up 60; RABBIT_DOWN=0; }
  if [ -n "${CPID:-}" ]; then kill -TERM "$CPID" 2>/dev/null; wait "$CPID" 2>/dev/null; CPID=; fi
  for s in 0 1 2; do
    pid=${WPID[$s]:-}; [ -n "$pid" ] || continue
    kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  done
  WPID=(); WGEN=()
  if [ -n "$RPORT" ]; then redis-cli -p "$RPORT" SHUTDOWN NOSAVE >/dev/null 2>&1; RPORT=; fi
  if [ -n "$PREFIX" ]; then
    local q
    for q in "$PREFIX.jobs" "$PREFIX.jobs.dead" "$PREFIX.results.$BATCH"; do
      rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1
    done
    # Exchanges: rabbitmqctl has no delete_exchange; ask the broker itself.
    for x in "$PREFIX.jobs" "$PREFIX.dlx" "$PREFIX.results"; do
      rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$x\">>), false, <<\"chaos.sh\">>)." >/dev/null 2>&1
    done
    PREFIX=
  fi
}
trap 'end_round; exit 130' INT TERM
trap 'end_round' EXIT

echo "chaos soak: seed $SEED, $ROUNDS rounds of $JOBS jobs, faults from $KINDS, logs in $LOGS"
WALL0=$(now)
for ((r = 1; r <= ROUNDS; r++)); do
  T0=$(now)
  RD=$LOGS/round-$(printf %02d "$r")
  rm -rf "$RD"; mkdir -p "$RD"
  PREFIX=kfchaos-$SEED-$r; BATCH=chaos-$SEED-$r
  quota=$(python3 "$HELPER" plan "$SEED" "$r" "$JOBS" "$RD")
  QUOTA_ARGS=(); [ "$quota" != 0 ] && QUOTA_ARGS=(--quota "$quota")
  RPORT=$(free_port)
  export KEYFLEET_PREFIX=$PREFIX KEYFLEET_REDIS_URL=redis://127.0.0.1:$RPORT/ \
    KEYFLEET_AMQP_URL=amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f KEYFLEET_PROGRESS=off
  start_redis || { echo "round $r: private Redis on port $RPORT did not start" >&2; exit 1; }
  for s in 0 1 2; do start_worker $s; done
  : >"$RD/faults-done.txt"

  ( cd "$RD" && exec nice "$KF" submit input.csv --batch-id "$BATCH" --identity batch.age-identity --json ) \
    >"$RD/submit.json" 2>"$RD/submit.log" || echo "submit exited $? (see $RD/submit.log)" >>"$RD/notes.txt"
  ( cd "$RD" && exec nice "$KF" collect "$BATCH" --out out --identity batch.age-identity --idle-timeout 20s --json ) \
    >"$RD/collect-1.json" 2>"$RD/collect-1.log" &
  CPID=$!

  # Faults at random points of the batch's progress (the plan's fractions of all rows answered).
  faults_line=()
  deadline=$(( $(date +%s) + 240 ))
  while read -r frac kind arg; do
    [[ ,$KINDS, == *,$kind,* ]] || continue
    while :; do
      check_workers
      read -r d t < <(progress)
      if [ "$t" != "?" ] && [ "$d" != "?" ]; then
        python3 -c "import sys; sys.exit(0 if $d >= $frac * $t else 1)" && break
        [ "$d" -ge "$t" ] && break
      fi
      [ "$(date +%s)" -ge $deadline ] && break
      sleep 0.3
    done
    [ "$(date +%s)" -ge $deadline ] && break
    if [ "$t" != "?" ] && [ "$d" -ge "$t" ]; then  # the batch outran this fault: not injected
      echo "$(since "$T0") not-reached $kind $arg" >>"$RD/faults-done.txt"; continue
    fi
    at=$(since "$T0")
    inject "$kind" "$arg" >"$RD/.note"; rc=$?; note=$(cat "$RD/.note")
    [ $rc = 3 ] && kind=$kind-skipped
    echo "$at $kind $arg $d/$t $note" >>"$RD/faults-done.txt"
    faults_line+=("$kind@$d/$t")
  done <"$RD/faults.txt"

  # Collect until complete (the first collector may have stopped on a fault: it resumes).
  n=1; complete=0; deadline=$(( $(date +%s) + 300 ))
  while :; do
    if [ -n "${CPID:-}" ]; then
      while kill -0 "$CPID" 2>/dev/null; do check_workers; sleep 0.5; done
      wait "$CPID"; crc=$?; CPID=
      [ $crc = 0 ] || echo "collect-$n exited $crc" >>"$RD/notes.txt"
      if python3 -c 'import json,sys; sys.exit(0 if json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["complete"] else 1)' "$RD/collect-$n.json" 2>/dev/null; then
        complete=1; break
      fi
    fi
    [ "$(date +%s)" -ge $deadline ] && break
    n=$((n + 1))
    ( cd "$RD" && exec nice "$KF" collect "$BATCH" --out out --identity batch.age-identity --idle-timeout 15s --json ) \
      >"$RD/collect-$n.json" 2>"$RD/collect-$n.log" &
    CPID=$!
  done
  [ $complete = 1 ] || echo "batch not complete after the collect deadline" >>"$RD/notes.txt"

  # Let acks of answered jobs (and redelivered duplicates) settle, then drain the workers.
  for ((i = 0; i < 60; i++)); do
    left=$(rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$PREFIX.jobs" '$1 == q {print $2}')
    [ "${left:-0}" = 0 ] && break
    sleep 0.5
  done
  check_workers
  for s in 0 1 2; do kill -TERM "${WPID[$s]}" 2>/dev/null; done
  for s in 0 1 2; do
    pid=${WPID[$s]}
    for ((i = 0; i < 400 && $(kill -0 "$pid" 2>/dev/null && echo 1 || echo 0); i++)); do sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { kill -KILL "$pid"; echo "worker slot $s pid $pid did not drain within 40 s of SIGTERM" >>"$RD/worker-exits.txt"; }
    wait "$pid"; code=$?
    [ $code = 0 ] || [ $code = 137 ] || echo "worker slot $s pid $pid exited $code after SIGTERM" >>"$RD/worker-exits.txt"
    WPID[$s]=
  done

  # Evidence for the checker.
  timeout 30 "$KF" describe --json >"$RD/describe.jsonl" 2>"$RD/describe.log" || echo "describe failed" >>"$RD/notes.txt"
  timeout 30 "$KF" status "$BATCH" --json >"$RD/status.json" 2>>"$RD/describe.log" || echo '{}' >"$RD/status.json"
  python3 "$HELPER" redis-state "$RPORT" "$PREFIX" >"$RD/redis-state.json" 2>>"$RD/describe.log" || echo '{}' >"$RD/redis-state.json"
  rabbitmqctl -q list_queues name messages 2>/dev/null | python3 -c '
import json, sys
p, b = sys.argv[1], sys.argv[2]
q = dict(l.split("\t")[:2] for l in sys.stdin.read().splitlines() if "\t" in l)
print(json.dumps({"jobs": int(q.get(p + ".jobs", 0)), "dead": int(q.get(p + ".jobs.dead", 0)),
                  "dead_name": p + ".jobs.dead", "results_left": int(q.get(p + ".results." + b, 0))}))' \
    "$PREFIX" "$BATCH" >"$RD/queues.json"
  summary=$(python3 "$HELPER" check "$RD" 2>"$RD/check.log") || summary="CHECK FAILED: $(tail -1 "$RD/check.log")"
  end_round
  viol=$(python3 -c 'import json,sys; print(sum(json.load(open(sys.argv[1]))["violations"].values()))' "$RD/check.json" 2>/dev/null || echo 1)
  if [ "$KEEP" = 0 ] && [ "$viol" = 0 ]; then rm -rf "$RD/out" "$RD/redis/dump.rdb" "$RD/batch.age-identity"; fi
  printf 'round %2d/%d  %-58s %s  %ss\n' "$r" "$ROUNDS" "faults: ${faults_line[*]:-none}" "$summary" "$(since "$T0")"
done
trap - EXIT INT TERM
python3 "$HELPER" table "$LOGS" "$(since "$WALL0")" | tee "$LOGS/table.txt"
exit "${PIPESTATUS[0]}"
