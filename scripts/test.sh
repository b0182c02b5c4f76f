#!/usr/bin/env bash
# keyfleet's test command (README): makes sure the tools and local services the tests use are
# present and running, then runs the whole test suite.
#   - ssh-keygen and openssl check every generated key;
#   - Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672, guest/guest) are the real servers the
#     distributed-mode tests talk to; a 3-master Redis Cluster and a 3-node RabbitMQ cluster on
#     loopback are there for the cluster tests.
# Missing tools are installed with apt-get where possible; otherwise the script stops and says
# exactly what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'scripts/test.sh: %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

apt_updated=0
apt_install() {
  if ! command -v apt-get >/dev/null; then
    say "missing: $* (no apt-get here; install the package(s) '$*' and run again)"
    exit 1
  fi
  if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null; then
    say "missing: $* (need root or sudo to apt-get install it)"
    exit 1
  fi
  local SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  if [ $apt_updated = 0 ]; then $SUDO apt-get update -qq >/dev/null; apt_updated=1; fi
  say "installing $*"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

command -v cargo >/dev/null || { say "missing: cargo (install Rust 1.95+ with rustup)"; exit 1; }
command -v ssh-keygen >/dev/null || apt_install openssh-client
command -v openssl >/dev/null || apt_install openssl
command -v promtool >/dev/null || apt_install prometheus
command -v redis-cli >/dev/null || apt_install redis-tools

wait_port() { # port name seconds
  local i
  for ((i = 0; i < $3 * 4; i++)); do port_open "$1" && return 0; sleep 0.25; done
  say "$2 did not start listening on 127.0.0.1:$1 within $3 s"
  exit 1
}

if ! port_open 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  say "starting Redis on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  wait_port 6379 Redis 30
fi
if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  say "starting RabbitMQ on 127.0.0.1:5672"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_port 5672 RabbitMQ 120
fi

# A 3-master Redis Cluster on loopback for tests/redis/redis_cluster.rs (no replicas: 2 cores).
CLUSTER_PORTS="${KEYFLEET_TEST_CLUSTER_PORTS:-7101 7102 7103}"
cluster_ok() { redis-cli -p "${CLUSTER_PORTS%% *}" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; }
if ! cluster_ok; then
  command -v redis-server >/dev/null || apt_install redis-server
  dir="$PWD/target/redis-cluster"
  mkdir -p "$dir"
  nodes=()
  for p in $CLUSTER_PORTS; do
    if ! port_open "$p"; then
      rm -f "$dir/nodes-$p.conf"
      redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
        --cluster-config-file "nodes-$p.conf" --dir "$dir" --save "" --appendonly no \
        --daemonize yes --logfile "$dir/redis-$p.log" >/dev/null
      wait_port "$p" "Redis Cluster node" 30
    fi
    nodes+=("127.0.0.1:$p")
  done
  say "creating a Redis Cluster on ${nodes[*]}"
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
  for ((i = 0; i < 120; i++)); do cluster_ok && break; sleep 0.25; done
  cluster_ok || { say "the Redis Cluster on ${nodes[*]} did not become ready (see $dir)"; exit 1; }
fi
export KEYFLEET_TEST_CLUSTER_URLS
KEYFLEET_TEST_CLUSTER_URLS="$(for p in $CLUSTER_PORTS; do printf 'redis://127.0.0.1:%s,' "$p"; done)"
KEYFLEET_TEST_CLUSTER_URLS="${KEYFLEET_TEST_CLUSTER_URLS%,}"

# A 3-node RabbitMQ cluster on loopback (kf1-kf3@localhost, AMQP 5681-5683) for
# worker/tests/rabbit_node_loss.rs: reused when running, otherwise started and joined (about a
# minute on 2 cores); a node a previous run killed is started again.
command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
command -v python3 >/dev/null || apt_install python3 # reads rabbitmqctl's JSON
scripts/rabbit-cluster.sh up
export KEYFLEET_TEST_RABBIT_CLUSTER_URLS
KEYFLEET_TEST_RABBIT_CLUSTER_URLS="$(scripts/rabbit-cluster.sh urls)"

# The house rules of DESIGN.md §9 (no import circles, imports run down the wings, clap only in
# src/cli/): under a second, so a change that breaks them fails first.
command -v python3 >/dev/null || apt_install python3
python3 scripts/import-graph.py

scripts/sdk/setup.sh # the official SDKs tests/serve/serve_sdk.rs drives: target/sdk/{venv,node}

exec cargo test --workspace --all-targets "$@"
