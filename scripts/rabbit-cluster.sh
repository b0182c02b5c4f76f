#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on loopback for the node-loss test (worker/tests/rabbit_node_loss.rs)
# and for trying keyfleet against a cluster by hand. Beside the system RabbitMQ on 5672, never
# touching it: nodes kf1@localhost, kf2@localhost, kf3@localhost, AMQP on 127.0.0.1:5681-5683,
# Erlang distribution on 25681-25683, no plugins, everything (data, logs, PID files, the Erlang
# cookie) under one folder of its own.
#
#   scripts/rabbit-cluster.sh up          start what is missing and form the cluster (idempotent:
#                                         a running cluster is reused; a node killed earlier is
#                                         started again and rejoins)
#   scripts/rabbit-cluster.sh ctl N ARGS  rabbitmqctl on node N (1-3), with the cluster's cookie
#   scripts/rabbit-cluster.sh queues N ARGS  rabbitmq-queues on node N, likewise
#   scripts/rabbit-cluster.sh pid N       the OS PID of node N's Erlang VM (beam.smp)
#   scripts/rabbit-cluster.sh urls        the AMQP URLs, comma-separated (for --amqp-url)
#   scripts/rabbit-cluster.sh stop        stops the three nodes
#
# Every wait is bounded; on failure the script says which node and which step failed, and
# where that node's log is.
#
# The folder is fixed (not under target/) so that every checkout on this machine finds the same
# cluster and its cookie: the ports are fixed too, so there can only be one.
set -euo pipefail

DIR="${KEYFLEET_TEST_RABBIT_DIR:-/tmp/keyfleet-rabbit-cluster}"
PORTS=(${KEYFLEET_TEST_RABBIT_PORTS:-5681 5682 5683})
# How long one node may take to boot on a loaded 2-core machine.
BOOT_SECONDS="${KEYFLEET_TEST_RABBIT_BOOT_SECONDS:-90}"

say() { printf 'scripts/rabbit-cluster.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# The package's own scripts, not the /usr/sbin wrappers: those switch to the rabbitmq user (and
# its HOME, so its cookie), which could not read this folder's cookie.
BIN=/usr/lib/rabbitmq/bin
[ -x "$BIN/rabbitmq-server" ] || BIN="$(dirname "$(command -v rabbitmq-server 2>/dev/null || echo /nonexistent/x)")"
[ -x "$BIN/rabbitmq-server" ] || die "rabbitmq-server is not installed (apt-get install rabbitmq-server)"

node() { echo "kf$1@localhost"; }
port() { echo "${PORTS[$(($1 - 1))]}"; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The environment every command on node N runs with. HOME holds the cookie; our own (empty)
# rabbitmq-env.conf and rabbitmq.conf replace the system's, which name the system node and its
# listener on 5672.
node_env() {
  local n=$1
  export HOME="$DIR"
  export RABBITMQ_NODENAME
  RABBITMQ_NODENAME="$(node "$n")"
  export RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf"
  export RABBITMQ_CONFIG_FILE="$DIR/rabbitmq.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$DIR/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins"
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT
  RABBITMQ_NODE_PORT="$(port "$n")"
  export RABBITMQ_DIST_PORT=$((RABBITMQ_NODE_PORT + 20000))
  export RABBITMQ_MNESIA_BASE="$DIR/kf$n"
  export RABBITMQ_LOG_BASE="$DIR/kf$n/log"
  export RABBITMQ_PID_FILE="$DIR/kf$n/pid"
  export ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

ctl() { local n=$1; shift; (node_env "$n"; "$BIN/rabbitmqctl" -n "$(node "$n")" "$@"); }
queues() { local n=$1; shift; (node_env "$n"; "$BIN/rabbitmq-queues" -n "$(node "$n")" "$@"); }
log_of() { echo "$DIR/kf$1/log/$(node "$1").log"; }

prepare() {
  mkdir -p "$DIR"
  chmod 700 "$DIR"
  if [ ! -s "$DIR/.erlang.cookie" ]; then
    # Any value works; only these nodes and the CLI run with this folder as HOME.
    (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/.erlang.cookie")
    chmod 400 "$DIR/.erlang.cookie"
  fi
  : >"$DIR/rabbitmq-env.conf"
  # Management and every other plugin off: they cost boot time and ports.
  echo '[].' >"$DIR/enabled_plugins"
  cat >"$DIR/rabbitmq.conf" <<'EOF'
# Written by scripts/rabbit-cluster.sh. Listener and names come from the environment.
log.console = false
log.file.level = info
# A loaded test machine must not see its own nodes as gone.
net_ticktime = 20
EOF
}

# Node N answers as a running RabbitMQ application.
running() { ctl "$1" -q await_startup --timeout 5 >/dev/null 2>&1; }

# Nodes running in the cluster as node N sees it.
running_nodes() {
  ctl "$1" -q cluster_status --formatter json 2>/dev/null |
    python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin).get("running_nodes", [])))' 2>/dev/null || true
}

cluster_ok() {
  local seen
  seen="$(running_nodes 1)"
  for n in 1 2 3; do [[ " $seen " == *" $(node "$n") "* ]] || return 1; done
}

start_node() {
  local n=$1
  if port_open "$(port "$n")" && running "$n"; then return 0; fi
  mkdir -p "$DIR/kf$n/log"
  say "starting $(node "$n") on 127.0.0.1:$(port "$n")"
  # -detached: the VM daemonizes, so it outlives the shell (and the test) that started it.
  (node_env "$n"; cd "$DIR" && "$BIN/rabbitmq-server" -detached >>"$DIR/kf$n/start.log" 2>&1) ||
    die "$(node "$n") did not start (see $DIR/kf$n/start.log)"
}

await_node() {
  local n=$1 deadline=$((SECONDS + BOOT_SECONDS))
  until port_open "$(port "$n")" && running "$n"; do
    [ $SECONDS -lt $deadline ] ||
      die "$(node "$n") did not come up on 127.0.0.1:$(port "$n") within $BOOT_SECONDS s (see $(log_of "$n") and $DIR/kf$n/start.log)"
    sleep 1
  done
}

join() {
  local n=$1 out
  say "joining $(node "$n") to $(node 1)"
  out="$(ctl "$n" stop_app 2>&1 && ctl "$n" join_cluster "$(node 1)" 2>&1 && ctl "$n" start_app 2>&1)" ||
    die "$(node "$n") could not join $(node 1): $out (see $(log_of "$n"))"
}

up() {
  command -v python3 >/dev/null || die "python3 is needed to read rabbitmqctl's JSON"
  prepare
  if cluster_ok; then return 0; fi
  local started=$SECONDS
  # Boot in parallel: a node takes ~10 s, mostly one core.
  for n in 1 2 3; do start_node "$n"; done
  for n in 1 2 3; do await_node "$n"; done
  # A node whose data already names the cluster rejoins by itself when it boots; only a fresh
  # one has to be joined.
  local seen
  seen="$(running_nodes 1)"
  for n in 2 3; do
    [[ " $seen " == *" $(node "$n") "* ]] || join "$n"
  done
  local deadline=$((SECONDS + 30))
  until cluster_ok; do
    [ $SECONDS -lt $deadline ] ||
      die "the cluster did not form: $(node 1) sees running nodes [$(running_nodes 1)] (logs under $DIR/kf*/log; to start over: scripts/rabbit-cluster.sh stop && rm -rf $DIR)"
    sleep 1
  done
  say "RabbitMQ cluster $(node 1),$(node 2),$(node 3) up in $((SECONDS - started)) s"
}

pid_of() {
  local n=$1 p
  p="$(cat "$DIR/kf$n/pid" 2>/dev/null || true)"
  if [ -z "$p" ] || ! kill -0 "$p" 2>/dev/null; then
    p="$(ctl "$n" -q eval 'os:getpid().' 2>/dev/null | tr -d '"[:space:]')"
  fi
  [ -n "$p" ] || die "$(node "$n") is not running"
  echo "$p"
}

stop() {
  for n in 1 2 3; do
    if port_open "$(port "$n")"; then ctl "$n" stop >/dev/null 2>&1 || true; fi
  done
}

urls() {
  local out="" p
  for p in "${PORTS[@]}"; do out+="amqp://guest:guest@127.0.0.1:$p/%2f,"; done
  echo "${out%,}"
}

case "${1:-}" in
  up) up ;;
  ctl) shift; n=$1; shift; ctl "$n" "$@" ;;
  queues) shift; n=$1; shift; queues "$n" "$@" ;;
  pid) pid_of "$2" ;;
  urls) urls ;;
  stop) stop ;;
  *) die "usage: $0 up | ctl N ARGS... | queues N ARGS... | pid N | urls | stop" ;;
esac
