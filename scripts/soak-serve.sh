#!/usr/bin/env bash
# Memory soak of `keyfleet serve`: continuous signed requests from the official classic Alibaba
# SDK (create, describe, delete in a loop, several clients at once) for DURATION seconds, with
# the server's resident memory sampled every 30 s. Not part of CI; run it and read the table.
#   scripts/soak-serve.sh [DURATION_SECONDS=600] [CLIENTS=4] [KEYFLEET_BIN=target/release/keyfleet]
# With SOAK_REDIS_URL set (e.g. redis://127.0.0.1:6379), the registry and the nonces live in
# Redis under a fresh prefix (removed afterwards) instead of the embedded state file, so the
# server's own memory is measured apart from the state file's page cache.
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-600}"; clients="${2:-4}"; bin="${3:-target/release/keyfleet}"
[ -x "$bin" ] || { echo "no $bin: cargo build --release first" >&2; exit 1; }
scripts/sdk/setup.sh >/dev/null
py=target/sdk/venv/bin/python
work="$(mktemp -d)"; pid=""
cleanup() {
  kill "$pid" 2>/dev/null || true
  rm -rf "$work"
  if [ -n "${SOAK_REDIS_URL:-}" ]; then
    redis-cli -u "$SOAK_REDIS_URL" --scan --pattern "$prefix*" | xargs -r redis-cli -u "$SOAK_REDIS_URL" del >/dev/null
  fi
}
trap cleanup EXIT
cat >"$work/creds.toml" <<'TOML'
[[aliyun]]
access_key_id = "soakid"
access_key_secret = "soaksecret"
account = "soak"
TOML
chmod 600 "$work/creds.toml"
store=(--state "$work/state.redb")
prefix="kfsoakserve-$$"
if [ -n "${SOAK_REDIS_URL:-}" ]; then store=(--redis-url "$SOAK_REDIS_URL" --prefix "$prefix"); fi
"$bin" serve --listen 127.0.0.1:0 --credentials "$work/creds.toml" "${store[@]}" \
  --quota 100000 >"$work/addr" 2>"$work/serve.log" &
pid=$!
for _ in $(seq 100); do grep -q listening "$work/addr" && break; sleep 0.1; done
addr="$(sed -n 's|listening on http://||p' "$work/addr")"
cat >"$work/client.py" <<'PY'
import json, sys, time
from aliyunsdkcore.client import AcsClient
from aliyunsdkcore.request import CommonRequest
addr, worker, until = sys.argv[1], sys.argv[2], time.time() + float(sys.argv[3])
client = AcsClient("soakid", "soaksecret", "cn-hangzhou")
def call(action, **params):
    r = CommonRequest(domain=addr, version="2014-05-26", action_name=action)
    r.set_protocol_type("http"); r.set_method("POST")
    for k, v in params.items(): r.add_query_param(k, v)
    return json.loads(client.do_action_with_exception(r))
n = 0
while time.time() < until:
    name = f"soak-{worker}-{n % 50}"
    call("CreateKeyPair", RegionId="cn-hangzhou", KeyPairName=name)
    call("DescribeKeyPairs", RegionId="cn-hangzhou", KeyPairName=name)
    call("DeleteKeyPairs", RegionId="cn-hangzhou", KeyPairNames=json.dumps([name]))
    n += 1
print(n)
PY
for c in $(seq "$clients"); do "$py" "$work/client.py" "$addr" "$c" "$duration" >"$work/client-$c.out" 2>&1 & done
printf '%8s %10s\n' seconds rss_kib
start=$(date +%s)
while [ $(( $(date +%s) - start )) -lt "$duration" ]; do
  printf '%8s %10s\n' $(( $(date +%s) - start )) "$(awk '/VmRSS/ {print $2}' /proc/$pid/status)"
  sleep 30
done
wait $(jobs -p | grep -v "^$pid$") 2>/dev/null || true
printf '%8s %10s\n' $(( $(date +%s) - start )) "$(awk '/VmRSS/ {print $2}' /proc/$pid/status)"
echo "cycles (create+describe+delete) per client: $(cat "$work"/client-*.out | tr '\n' ' ')"
