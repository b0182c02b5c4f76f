#!/usr/bin/env bash
# Chaos soak of distributed mode at fleet scale (not part of CI; run it by hand, 30-50 s a round).
#
#   scripts/chaos.sh [--rounds N] [--seed S] [--jobs J] [--workers W] [--rps R] [--concurrency C]
#                    [--bin DIR] [--logs DIR] [--keep] [--faults KIND,...] [--force-rabbit]
#
#   --rounds N     rounds to run (default 20)
#   --seed S       seed of everything random: inputs, quotas, fault kinds and points (default:
#                  the date, %s). The same seed gives the same rounds (fault *timing* follows the
#                  batch's progress, so it varies a little with the machine).
#   --jobs J       rows per round (default 100: ~45 keys in the long lane, so ~11 s of batch at
#                  the defaults before faults lengthen it)
#   --workers W    workers per round (default 4)
#   --rps R        each worker's --upstream-rps, the pace of a round (default 1; see "Pace")
#   --concurrency C  each worker's --concurrency, jobs it holds at once (default 8; see "Pace")
#   --bin DIR      where keyfleet and keyfleet-worker are (default target/release; build them
#                  first: cargo build --release --workspace)
#   --logs DIR     per-round logs (default target/chaos/<seed>)
#   --keep         keep each round's key files (default: only rounds with a violation keep them)
#   --faults LIST  fault kinds to draw from (default all six: worker-kill,rabbit-restart,
#                  redis-restart,redis-stall,rabbit-node-kill,redis-master-kill); a kind left
#                  out is not drawn
#   --force-rabbit inject RabbitMQ faults even when clients other than this round's are on the
#                  cluster (by default such a fault is skipped and counted as skipped: the
#                  cluster of scripts/rabbit-cluster.sh is shared with worker/tests/rabbit_node_loss.rs)
#
# Servers. RabbitMQ: the 3-node cluster of scripts/rabbit-cluster.sh (kf1..kf3@localhost,
# AMQP 127.0.0.1:5681-5683; started if needed, never the machine's broker on 5672). Every
# process gets the three URLs, each worker in another order (worker i starts at node i mod 3),
# so the workers are spread over the nodes. Redis: each round a Redis Cluster of its own, 3
# masters with a replica each (6 redis-server processes on free loopback ports, data in the
# round's folder, no persistence configured, cluster-node-timeout 10 s so that stalls and
# restarts do not look like a dead master), and every process on --redis-replicas 1 (each
# write that decides a key's fate is on the replica before it is acted on).
#
# Each round: a fresh prefix (kfchaos-<seed>-<round>), the Redis Cluster, W workers
# (--threads 1 --reservoir 0 --upstream-rps R --upstream-burst 1), `keyfleet submit` of a
# generated batch (done before any fault: submit does not move to another node mid-run) — both
# clouds, ~5 % invalid rows, ~8 % duplicate names, half the rounds a small quota (keyfleet.toml)
# with a hot region — a collector running through the faults (a collect whose node dies exits
# and is started again), and 2-5 faults at random points of the batch's progress:
#   worker-kill        SIGKILL one worker, start a replacement at once
#   rabbit-restart     rabbitmqctl stop_app on all three nodes, 1-4 s down, start_app on all
#                      three (the whole broker down: every connection drops, no node to move to)
#   rabbit-node-kill   SIGKILL the node that leads the jobs quorum queue (its Erlang VM), so a
#                      survivor takes the queue over and the workers on that node move to the
#                      next one; started again (scripts/rabbit-cluster.sh up) 2-6 s later, in
#                      the background, and back before the next RabbitMQ fault and the checks
#   redis-restart      SHUTDOWN SAVE of the master serving the long lane's scope (see "Pace"),
#                      1-4 s down, redis-server again on the same port, RDB and nodes.conf: a
#                      restart that keeps its data and its role
#   redis-stall        DEBUG SLEEP 2-6 s on that master: it hangs without dropping connections
#   redis-master-kill  SIGKILL that master at once; its replica is promoted (CLUSTER FAILOVER
#                      FORCE on the replica: the other masters vote now, not after the node
#                      timeout; TAKEOVER if they do not within 3 s, as for a second kill of the
#                      shard within 2 x node timeout); 1-4 s after the promotion the killed node
#                      is started again, empty, and rejoins as the new master's replica (until
#                      it has synced, writes to that master wait for a replica and are retried)
#
# Pace. A batch must outlast its faults on any machine: on a CPU with IFMA, 150 rows ended in
# about a second and no fault landed. So a round is paced by the upstream rate limit, not by
# the CPU: each worker passes at most R keys a second per scope (--upstream-rps R, burst 1;
# every key made goes through it, after its reservation and before its commit), and the plan
# puts 55 % of the valid rows in one scope, the long lane (aliyun/acme/cn-hangzhou, never under
# a small quota). A round's batch then lasts about (long-lane keys) / (W x R) seconds -- ~11 s
# at the defaults -- on any machine that makes more than W x R x 5 keys a second, and longer
# on a slower one; faults that stop the work (a stall, a restart) lengthen it as they go.
# --concurrency 8 (the worker's default is 68): after a lost connection a worker still works
# through the jobs it held on the dead channel, one token each, before the jobs it is given
# again; 8 keeps that detour to seconds. The lookups a fault needs (the jobs queue's leader
# and its PID, the master of the long lane and its replica) are made before its point is
# reached (the first fault's before the batch is submitted), so it lands at its point. A fault
# whose point the batch passed meanwhile is still injected while the batch is incomplete; one
# that finds the batch complete is counted as not reached. The final table shows, per kind,
# the faults planned, injected, not reached and skipped.
#
# Then `keyfleet collect` until the batch is complete (deadline 300 s), every killed node back,
# workers drained with SIGTERM, and the invariants checked (scripts/chaos.py check): every input
# row exactly one manifest line; every answer one the API could give; per region created ==
# min(quota, distinct names); created == registry records == .pem files; each .pem's
# fingerprint (ssh-keygen) == the registry's == the manifest's, .pub matches, mode 0600; no
# duplicate fingerprints; quota never above the limit (records and the `used` counter); no
# reservation left, every record delivered; nothing in <prefix>.jobs.dead or left in
# <prefix>.jobs; no message unacked on any queue of the round, each a quorum queue with a
# member on all three nodes; no rejected/unreadable results; `status` agrees with the manifest;
# no worker died by itself or exited non-zero on SIGTERM; no panic or private key in any log.
# Output: one line per round and a final table. Exit 1 if any invariant was violated.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ROUNDS=20; SEED=$(date +%s); JOBS=100; WORKERS=4; RPS=1; CONC=8; BIN=target/release; LOGS=; KEEP=0; FORCE_RABBIT=0
KINDS=worker-kill,rabbit-restart,redis-restart,redis-stall,rabbit-node-kill,redis-master-kill
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --rps) RPS=$2; shift 2 ;;
    --concurrency) CONC=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    --logs) LOGS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --faults) KINDS=$2; shift 2 ;;
    --force-rabbit) FORCE_RABBIT=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "chaos.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $ROUNDS =~ ^[0-9]+$ && $JOBS =~ ^[0-9]+$ && $WORKERS =~ ^[1-9][0-9]*$ && $RPS =~ ^[1-9][0-9]*$ && $CONC =~ ^[1-9][0-9]*$ && $SEED =~ ^[A-Za-z0-9]+$ ]] \
  || { echo "chaos.sh: --rounds, --jobs, --workers, --rps and --concurrency take numbers, --seed letters and digits" >&2; exit 2; }
for k in ${KINDS//,/ }; do
  case $k in worker-kill|rabbit-restart|redis-restart|redis-stall|rabbit-node-kill|redis-master-kill) ;;
    *) echo "chaos.sh: unknown fault kind $k (see --help)" >&2; exit 2 ;; esac
done
BIN=$(cd "$BIN" 2>/dev/null && pwd) || { echo "chaos.sh: no folder $BIN" >&2; exit 2; }
KF=$BIN/keyfleet; KW=$BIN/keyfleet-worker
for x in "$KF" "$KW"; do [ -x "$x" ] || { echo "chaos.sh: $x is missing (cargo build --release --workspace)" >&2; exit 2; }; done
for t in redis-server redis-cli ssh-keygen python3 ss; do
  command -v $t >/dev/null || { echo "chaos.sh: $t is needed" >&2; exit 2; }
done
LOGS=${LOGS:-target/chaos/$SEED}
mkdir -p "$LOGS"; LOGS=$(cd "$LOGS" && pwd)
HELPER=$ROOT/scripts/chaos.py
RMQ=$ROOT/scripts/rabbit-cluster.sh
LANE_TAG=aliyun:acme:cn-hangzhou       # the long lane's scope (chaos.py LONG_LANE): its hash tag
REDIS_NODE_TIMEOUT=10000

# The RabbitMQ cluster (bounded waits inside; a node killed by an earlier run is started again).
rmq_up() { # the cluster whole again; nodes it starts are daemons: they get none of our descriptors
  "$RMQ" up </dev/null 3<&- 5>&-
}
rmq_up >"$LOGS/rabbit-cluster-up.log" 2>&1 \
  || { echo "chaos.sh: the RabbitMQ cluster did not come up (see $LOGS/rabbit-cluster-up.log)" >&2; exit 2; }
IFS=, read -r -a AMQP_URLS <<<"$("$RMQ" urls)"
AMQP_PORTS=(); for u in "${AMQP_URLS[@]}"; do p=${u##*:}; AMQP_PORTS+=("${p%%/*}"); done
[ ${#AMQP_URLS[@]} = 3 ] || { echo "chaos.sh: expected 3 RabbitMQ node URLs, got ${AMQP_URLS[*]}" >&2; exit 2; }
urls_from() { # rotated list starting at node index $1 (0-2)
  local i out=
  for i in 0 1 2; do out+=${AMQP_URLS[$(( ($1 + i) % 3 ))]},; done
  echo "${out%,}"
}
ctl() { # node (1-3) args...: rabbitmqctl on that node, bounded
  local n=$1; shift
  timeout 60 "$RMQ" ctl "$n" "$@"
}
ctl_any() { # args...: rabbitmqctl on the first node that answers
  local n
  for n in 1 2 3; do ctl "$n" "$@" 2>/dev/null && return 0; done
  return 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port up|down seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    if port_open "$1"; then [ "$2" = up ] && return 0; else [ "$2" = down ] && return 0; fi
    sleep 0.1
  done
  return 1
}
# Six free loopback ports, each with its cluster bus port (+10000) free too.
free_ports() { python3 -c '
import random, socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
out = []
while len(out) < 6:
    p = random.randint(20000, 39999)
    if p not in out and free(p) and free(p + 10000):
        out.append(p)
print(*out)'; }
now() { date +%s.%N; }
since() { python3 -c "print(f'{$(now) - $1:.1f}')"; }

# --- state of the current round (for cleanup on exit)
declare -a WPID=() WGEN=() RPORTS=()
RD=; PREFIX=; BATCH=; CPID=; NCOLLECT=0; RABBIT_STOPPED=0; RUP_PID=; CLEANUPS=(); CHECKS=()

# --- Redis Cluster of the round
start_redis_node() { # port
  local d=$RD/redis/$1
  mkdir -p "$d"
  redis-server --port "$1" --bind 127.0.0.1 --cluster-enabled yes \
    --cluster-node-timeout $REDIS_NODE_TIMEOUT --cluster-config-file nodes.conf \
    --repl-diskless-sync-delay 0 --save '' --appendonly no --daemonize yes \
    --dir "$d" --dbfilename dump.rdb --pidfile "$d/redis.pid" \
    --logfile "$d/redis.log" --enable-debug-command local >/dev/null </dev/null 3<&- 5>&-
  wait_port "$1" up 20 && redis-cli -p "$1" PING >/dev/null
}
redis_ports_csv() { local IFS=,; echo "${RPORTS[*]}"; }
redis_ok() { # every node sees a healthy cluster with 3 masters, each with a replica online
  local p
  for p in "${RPORTS[@]}"; do
    redis-cli -p "$p" CLUSTER INFO 2>/dev/null | grep -q 'cluster_state:ok' || return 1
  done
  local online=0 c
  for p in "${RPORTS[@]}"; do
    c=$(redis-cli -p "$p" INFO replication 2>/dev/null | grep -c 'slave0:.*state=online'); online=$((online + c))
  done
  [ "$online" = 3 ]
}
wait_redis_ok() { # seconds
  local i
  for ((i = 0; i < $1 * 4; i++)); do redis_ok && return 0; sleep 0.25; done
  return 1
}
start_redis_cluster() {
  local p addrs=()
  read -r -a RPORTS <<<"$(free_ports)"
  for p in "${RPORTS[@]}"; do start_redis_node "$p" || return 1; addrs+=("127.0.0.1:$p"); done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$RD/redis/create.log" 2>&1 || return 1
  wait_redis_ok 60
}
lane_nodes() { python3 "$HELPER" redis-lane "$(redis_ports_csv)" "$LANE_TAG"; } # -> "master replica"
role_of() { redis-cli -p "$1" ROLE 2>/dev/null | head -1; }

# --- RabbitMQ
jobs_leader() { # node number (1-3) leading the round's jobs queue, "" if unknown
  ctl_any -q list_queues name leader --formatter json 2>/dev/null | python3 -c '
import json, sys
q = sys.argv[1]
for r in json.load(sys.stdin):
    if r.get("name") == q:
        print(str(r.get("leader", ""))[2:].split("@")[0])' "$PREFIX.jobs" 2>/dev/null
}
rabbit_back() { # wait for a node killed earlier to be running again (its restart was started)
  [ -n "$RUP_PID" ] || return 0
  wait "$RUP_PID"; local rc=$?; RUP_PID=
  [ $rc = 0 ] || { rmq_up >>"$RD/rabbit-up.log" 2>&1 || echo "RabbitMQ node did not come back (see $RD/rabbit-up.log)" >>"$RD/notes.txt"; }
}

start_worker() { # slot
  local s=$1
  WGEN[$s]=$(( ${WGEN[$s]:-0} + 1 ))
  ( cd "$RD" && exec nice "$KW" --threads 1 --reservoir 0 --upstream-rps "$RPS" --upstream-burst 1 --concurrency "$CONC" \
      --amqp-url "$(urls_from $((s % 3)))" --metrics-addr off --log info ) \
    >"$RD/worker-$s-${WGEN[$s]}.log" 2>&1 &
  WPID[$s]=$!
}

start_collector() {
  NCOLLECT=$((NCOLLECT + 1))
  ( cd "$RD" && exec nice "$KF" collect "$BATCH" --out out --identity batch.age-identity --idle-timeout 20s --json ) \
    >"$RD/collect-$NCOLLECT.json" 2>"$RD/collect-$NCOLLECT.log" &
  CPID=$!
}
collect_complete() { python3 -c 'import json,sys; sys.exit(0 if json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["complete"] else 1)' "$RD/collect-$NCOLLECT.json" 2>/dev/null; }
check_collector() { # a collector that ended is started again unless the batch is collected
  [ -n "${CPID:-}" ] || return 0
  kill -0 "$CPID" 2>/dev/null && return 0
  wait "$CPID"; local crc=$?; CPID=
  [ $crc = 0 ] || echo "collect-$NCOLLECT exited $crc at $(since "$T0") s" >>"$RD/notes.txt"
  collect_complete && { COLLECTED=1; return 0; }
  start_collector
}

my_pids() { echo "${WPID[@]:-}" "${CPID:-}"; }

# Clients on the cluster that are not this round's processes.
foreign_amqp_clients() {
  local mine=" $(my_pids) " pid out=() f
  f=$(printf 'dport = :%s or ' "${AMQP_PORTS[@]}"); f=${f% or }
  for pid in $(ss -tnpH state established "( $f )" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
    [[ $mine == *" $pid "* ]] || out+=("$pid:$(cat /proc/$pid/comm 2>/dev/null)")
  done
  echo "${out[@]:-}"
}

check_workers() { # restart a worker that died without being killed; record it
  local s code
  for ((s = 0; s < WORKERS; s++)); do
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

# What a fault needs to know, looked up before its point so that it lands at the point.
TARGET=
prepare() { # kind
  TARGET=
  case $1 in
    rabbit-node-kill)
      rabbit_back
      local n i
      for ((i = 0; i < 5; i++)); do n=$(jobs_leader); [ -n "$n" ] && break; sleep 1; done
      [ -n "$n" ] && TARGET="$n $("$RMQ" pid "$n" 2>/dev/null)" ;;
    rabbit-restart) rabbit_back ;;
    redis-restart|redis-stall|redis-master-kill)
      # One node down at a time: the fault waits until every master has its replica in sync.
      wait_redis_ok 30 || echo "Redis Cluster not healthy before a $1" >>"$RD/notes.txt"
      TARGET=$(lane_nodes 2>/dev/null) ;;
  esac
}

rabbit_skip() { # prints why a RabbitMQ fault is skipped, if it is
  local f; f=$(foreign_amqp_clients)
  if [ -n "$f" ] && [ "$FORCE_RABBIT" = 0 ]; then echo "SKIPPED: other clients on the cluster ($f)"; return 0; fi
  return 1
}

inject() { # kind arg -> note; exit status 3: skipped
  local kind=$1 arg=$2 s pid m r n p t0
  case $kind in
    worker-kill)
      s=$arg; pid=${WPID[$s]}
      kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
      start_worker "$s"
      echo "slot $s pid $pid killed, replaced by ${WPID[$s]}" ;;
    rabbit-restart)
      rabbit_skip && return 3
      RABBIT_STOPPED=1; t0=$(now)
      on_all_nodes -q stop_app
      sleep "$arg"
      on_all_nodes -q start_app
      for p in "${AMQP_PORTS[@]}"; do wait_port "$p" up 60 || echo "port $p not listening 60 s after start_app" >>"$RD/notes.txt"; done
      RABBIT_STOPPED=0
      echo "stop_app on kf1-3, ${arg}s, start_app on kf1-3: broker back after $(since "$t0") s" ;;
    rabbit-node-kill)
      rabbit_skip && return 3
      read -r n pid <<<"$TARGET"
      if [ -z "${pid:-}" ]; then echo "SKIPPED: the jobs queue's leader or its PID was not found"; return 3; fi
      kill -KILL "$pid" 2>/dev/null || { echo "SKIPPED: kf$n (pid $pid) was not running"; return 3; }
      ( sleep "$arg"; rmq_up ) >>"$RD/rabbit-up.log" 2>&1 &
      RUP_PID=$!
      echo "kf$n (pid $pid, leader of $PREFIX.jobs) SIGKILLed; started again after ${arg}s in the background" ;;
    redis-restart)
      read -r m r <<<"$TARGET"; [ -n "${m:-}" ] || { echo "SKIPPED: no master found for the long lane"; return 3; }
      redis-cli -p "$m" SHUTDOWN SAVE >/dev/null 2>&1
      wait_port "$m" down 10
      sleep "$arg"
      start_redis_node "$m"
      echo "master $m: SHUTDOWN SAVE, ${arg}s down, started from dump.rdb ($(redis-cli -p "$m" DBSIZE) keys, role $(role_of "$m"))" ;;
    redis-stall)
      read -r m r <<<"$TARGET"; [ -n "${m:-}" ] || { echo "SKIPPED: no master found for the long lane"; return 3; }
      redis-cli -p "$m" DEBUG SLEEP "$arg" >/dev/null 2>&1
      echo "master $m: DEBUG SLEEP $arg" ;;
    redis-master-kill)
      read -r m r <<<"$TARGET"
      if [ -z "${m:-}" ] || [ "${r:--}" = - ]; then echo "SKIPPED: no master with a replica found for the long lane ($TARGET)"; return 3; fi
      t0=$(now)
      kill -KILL "$(cat "$RD/redis/$m/redis.pid")" 2>/dev/null
      # The masters vote for one failover of a shard per 2 x node timeout: a second kill of the
      # same shard within that window is not voted for, so the replica then takes over alone.
      local how=FORCE i
      redis-cli -p "$r" CLUSTER FAILOVER FORCE >/dev/null 2>&1
      for ((i = 0; i < 600; i++)); do
        [ "$(role_of "$r")" = master ] && break
        if [ $i = 30 ]; then redis-cli -p "$r" CLUSTER FAILOVER TAKEOVER >/dev/null 2>&1; how=TAKEOVER; fi
        sleep 0.1
      done
      local promoted; promoted=$(since "$t0")
      if [ "$(role_of "$r")" != master ]; then
        # Never start the killed master again, empty, while it is still the shard's master in
        # the cluster's eyes: its replica would copy the empty data set (a harness fault).
        echo "replica $r of killed master $m not promoted within 60 s: $m left down" >>"$RD/notes.txt"
        echo "master $m SIGKILLed; replica $r NOT promoted within ${promoted} s; $m left down"
        return 0
      fi
      sleep "$arg"
      rm -f "$RD/redis/$m/dump.rdb"
      start_redis_node "$m"
      wait_redis_ok 60 || echo "Redis Cluster not healthy 60 s after restarting $m" >>"$RD/notes.txt"
      echo "master $m SIGKILLed; replica $r master after ${promoted} s (CLUSTER FAILOVER $how); $m started again empty after ${arg}s, $(role_of "$m") of it, cluster healthy after $(since "$t0") s" ;;
  esac
}
on_all_nodes() { # args...: rabbitmqctl on the three nodes at once
  local n pids=()
  for n in 1 2 3; do ctl "$n" "$@" >/dev/null 2>&1 & pids+=($!); done
  wait "${pids[@]}"
}

cleanup_rabbit_objects() { # prefix batch: the round's queues and exchanges, in one rabbitmqctl call
  local p=$1 b=$2
  ctl_any -q eval "
    [case rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, N)) of
       {ok, Q} -> rabbit_amqqueue:delete(Q, false, false, <<\"chaos.sh\">>);
       E -> E end
     || N <- [<<\"$p.jobs\">>, <<\"$p.jobs.dead\">>, <<\"$p.results.$b\">>]],
    [rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, X), false, <<\"chaos.sh\">>)
     || X <- [<<\"$p.jobs\">>, <<\"$p.dlx\">>, <<\"$p.results\">>]]." >>"$LOGS/cleanup.log" 2>&1
}

end_round() { # stop everything this round started; delete its queues
  local s pid p
  if [ "$RABBIT_STOPPED" = 1 ]; then
    on_all_nodes -q start_app; RABBIT_STOPPED=0
  fi
  [ -n "$RUP_PID" ] && { wait "$RUP_PID" 2>/dev/null; RUP_PID=; }
  if [ -n "${CPID:-}" ]; then kill -TERM "$CPID" 2>/dev/null; wait "$CPID" 2>/dev/null; CPID=; fi
  for ((s = 0; s < ${#WPID[@]}; s++)); do
    pid=${WPID[$s]:-}; [ -n "$pid" ] || continue
    kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  done
  WPID=(); WGEN=()
  for p in "${RPORTS[@]}"; do
    redis-cli -p "$p" SHUTDOWN NOSAVE >/dev/null 2>&1 || { [ -f "$RD/redis/$p/redis.pid" ] && kill -KILL "$(cat "$RD/redis/$p/redis.pid")" 2>/dev/null; }
  done
  RPORTS=()
  if [ -n "$PREFIX" ]; then
    for p in "${AMQP_PORTS[@]}"; do
      port_open "$p" && continue
      rmq_up >>"$LOGS/rabbit-cluster-up.log" 2>&1 || echo "chaos.sh: the RabbitMQ cluster is not whole (see $LOGS/rabbit-cluster-up.log)" >&2
      break
    done
    # In the background, beside the next round (a new prefix): waited for at the end.
    cleanup_rabbit_objects "$PREFIX" "$BATCH" &
    CLEANUPS+=($!)
    PREFIX=
  fi
}
WALL0=$(now); T0=$WALL0
exec 5>&1  # the script's own output: a signal may come while a command's output is redirected
interrupted() { # the round under way is not checked: marked, left out of the table
  wait "${CHECKS[@]}" 2>/dev/null  # rounds already over are checked to the end
  [ -n "$RD" ] && [ ! -f "$RD/check.json" ] && echo "interrupted at $(since "$T0") s" >"$RD/interrupted"
  end_round; wait "${CLEANUPS[@]}" 2>/dev/null
  python3 "$HELPER" table "$LOGS" "$(since "$WALL0")" | tee "$LOGS/table.txt" >&5
  exit 130
}
trap interrupted INT TERM
trap 'end_round; wait "${CLEANUPS[@]}" "${CHECKS[@]}" 2>/dev/null' EXIT

echo "chaos soak: seed $SEED, $ROUNDS rounds of $JOBS jobs, $WORKERS workers at --upstream-rps $RPS, faults from $KINDS, logs in $LOGS"
for ((r = 1; r <= ROUNDS; r++)); do
  T0=$(now)
  RD=$LOGS/round-$(printf %02d "$r")
  rm -rf "$RD"; mkdir -p "$RD/redis"
  PREFIX=kfchaos-$SEED-$r; BATCH=chaos-$SEED-$r; NCOLLECT=0; COLLECTED=0
  quota=$(python3 "$HELPER" plan "$SEED" "$r" "$JOBS" "$WORKERS" "$KINDS" "$RD")
  start_redis_cluster || { echo "round $r: the Redis Cluster did not start (see $RD/redis)" >&2; exit 1; }
  export KEYFLEET_PREFIX=$PREFIX KEYFLEET_REDIS_URL=$(printf 'redis://127.0.0.1:%s,' "${RPORTS[@]}" | sed 's/,$//') \
    KEYFLEET_AMQP_URL=$(urls_from 0) KEYFLEET_REDIS_REPLICAS=1 KEYFLEET_PROGRESS=off
  for ((s = 0; s < WORKERS; s++)); do start_worker $s; done
  : >"$RD/faults-done.txt"
  # The first fault's lookups before the batch starts (the others' after the fault before them).
  read -r _ kind _ <"$RD/faults.txt"; prepare "$kind"; prepared=1

  ( cd "$RD" && exec nice "$KF" submit input.csv --batch-id "$BATCH" --identity batch.age-identity --json ) \
    >"$RD/submit.json" 2>"$RD/submit.log" || echo "submit exited $? (see $RD/submit.log)" >>"$RD/notes.txt"
  start_collector
  ready=$(since "$T0")

  # Faults at random points of the batch's progress (the plan's fractions of all rows answered).
  faults_line=()
  deadline=$(( $(date +%s) + 240 ))
  while read -r frac kind arg <&3; do
    [ "$prepared" = 1 ] || prepare "$kind"; prepared=0
    while :; do
      check_workers; check_collector
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
      echo "$(since "$T0") not-reached $kind $arg" >>"$RD/faults-done.txt"; faults_line+=("($kind)"); continue
    fi
    at=$(since "$T0")
    inject "$kind" "$arg" >"$RD/.note"; rc=$?; note=$(cat "$RD/.note")
    [ $rc = 3 ] && kind=$kind-skipped
    echo "$at $kind $arg $d/$t $note" >>"$RD/faults-done.txt"
    faults_line+=("$kind@$d/$t")
  done 3<"$RD/faults.txt"
  batch_end=$(since "$T0")

  # Collect until complete (a collector that stopped on a fault resumes), every node back first.
  rabbit_back
  deadline=$(( $(date +%s) + 300 ))
  while [ "$COLLECTED" = 0 ] && [ "$(date +%s)" -lt $deadline ]; do
    check_workers; check_collector
    [ "$COLLECTED" = 1 ] || sleep 0.5
  done
  [ "$COLLECTED" = 1 ] || echo "batch not complete after the collect deadline" >>"$RD/notes.txt"
  wait_redis_ok 60 || echo "Redis Cluster not healthy before the checks" >>"$RD/notes.txt"

  # Let acks of answered jobs (and redelivered duplicates) settle, then drain the workers. The
  # last listing is the queues' evidence for the checker.
  for ((i = 0; i < 30; i++)); do
    ctl_any -q list_queues --timeout 20 name type leader members messages messages_ready messages_unacknowledged --formatter json 2>/dev/null \
      | python3 "$HELPER" queues "$PREFIX" "$BATCH" >"$RD/queues.json"
    python3 -c 'import json,sys; q=json.load(open(sys.argv[1])); sys.exit(0 if not q.get("error") and not q["jobs"] and not any(r.get("messages_unacknowledged") for r in q["queues"]) else 1)' "$RD/queues.json" && break
    sleep 1
  done
  check_workers
  for ((s = 0; s < WORKERS; s++)); do kill -TERM "${WPID[$s]}" 2>/dev/null; done
  for ((s = 0; s < WORKERS; s++)); do
    pid=${WPID[$s]}
    for ((i = 0; i < 400 && $(kill -0 "$pid" 2>/dev/null && echo 1 || echo 0); i++)); do sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { kill -KILL "$pid"; echo "worker slot $s pid $pid did not drain within 40 s of SIGTERM" >>"$RD/worker-exits.txt"; }
    wait "$pid"; code=$?
    [ $code = 0 ] || [ $code = 137 ] || echo "worker slot $s pid $pid exited $code after SIGTERM" >>"$RD/worker-exits.txt"
    WPID[$s]=
  done

  # Evidence for the checker.
  T1=$(now); round_s=$(since "$T0")
  timeout 30 "$KF" describe --json >"$RD/describe.jsonl" 2>"$RD/describe.log" || echo "describe failed" >>"$RD/notes.txt"
  timeout 30 "$KF" status "$BATCH" --json >"$RD/status.json" 2>>"$RD/describe.log" || echo '{}' >"$RD/status.json"
  python3 "$HELPER" redis-state "${RPORTS[0]}" "$PREFIX" >"$RD/redis-state.json" 2>>"$RD/describe.log" || echo '{}' >"$RD/redis-state.json"
  end_round
  # The checks read only the round's folder: they run beside the next round (its pace is the
  # rate limit's, not the CPU's), and print the round's line when done.
  ( summary=$(python3 "$HELPER" check "$RD" 2>"$RD/check.log") || summary="CHECK FAILED: $(tail -1 "$RD/check.log")"
    viol=$(python3 -c 'import json,sys; print(sum(json.load(open(sys.argv[1]))["violations"].values()))' "$RD/check.json" 2>/dev/null || echo 1)
    if [ "$KEEP" = 0 ] && [ "$viol" = 0 ]; then rm -rf "$RD/out" "$RD"/redis/*/dump.rdb "$RD/batch.age-identity"; fi
    printf 'round %2d/%d  %s  %s  batch %s-%ss  %ss (+ check %ss)\n' "$r" "$ROUNDS" "faults: ${faults_line[*]:-none}" "$summary" "$ready" "$batch_end" "$round_s" "$(since "$T1")"
  ) 3<&- &
  CHECKS+=($!)
done
trap - EXIT INT TERM
wait "${CLEANUPS[@]}" "${CHECKS[@]}" 2>/dev/null
python3 "$HELPER" table "$LOGS" "$(since "$WALL0")" | tee "$LOGS/table.txt"
exit "${PIPESTATUS[0]}"
