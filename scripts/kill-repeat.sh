#!/usr/bin/env bash
# Runs the SIGKILL tests of `run`, the worker and `collect` again and again (not part of CI,
# where each runs once): each run of a test kills its process several times at points that
# differ run to run, then checks that every key was delivered once and that each key file is
# the registered key (fingerprints compared with the registry).
#
#   scripts/kill-repeat.sh [N]      N runs of each test (default 5)
#
# Kills per run: `run` 6, the worker 10 (+1 in the mid-batch test), `collect` 4. Prints one
# line per run and a count of passes per test; exits 1 if any run failed. Needs what
# scripts/test.sh needs (Redis, RabbitMQ); run that once first.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-5}"

tests=(
  "keyfleet cli run_crash::run_killed_repeatedly_then_rerun_lists_every_row_with_its_registered_key"
  "keyfleet-worker fleet distributed::worker_killed_ten_times_every_delivered_key_is_the_registered_key"
  "keyfleet-worker fleet distributed::worker_killed_mid_batch_every_job_answered_once_and_keys_delivered_once"
  "keyfleet-worker fleet collect::killed_collect_loses_no_key"
)

cargo test --workspace --no-run -q 2>/dev/null || cargo test --workspace --no-run
failed=0
for t in "${tests[@]}"; do
  read -r package binary name <<<"$t"
  pass=0
  for ((i = 1; i <= n; i++)); do
    if cargo test -q -p "$package" --test "$binary" -- --exact "$name" >"/tmp/kill-repeat.$$.log" 2>&1; then
      pass=$((pass + 1))
      echo "$name run $i: passed"
    else
      failed=1
      echo "$name run $i: FAILED (log: /tmp/kill-repeat.$$.$binary.$i.log)"
      cp "/tmp/kill-repeat.$$.log" "/tmp/kill-repeat.$$.$binary.$i.log"
    fi
  done
  echo "== $name: $pass of $n passed"
done
rm -f "/tmp/kill-repeat.$$.log"
exit "$failed"
