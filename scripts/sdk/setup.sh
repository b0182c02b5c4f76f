#!/usr/bin/env bash
# Installs the official cloud SDKs that tests/serve/serve_sdk.rs drives against `keyfleet serve`:
#   target/sdk/venv  Python venv from scripts/sdk/requirements.txt (aliyun-python-sdk-ecs,
#                    alibabacloud-ecs20140526, ucloud-sdk-python3, all pinned)
#   target/sdk/node  `npm ci` from scripts/sdk/package.json + package-lock.json
#                    (@alicloud/ecs20140526, @alicloud/pop-core)
# Idempotent: each part is rebuilt only when the hash of its pin files differs from the one
# stamped in it by the last successful install. Stops with a message naming exactly what is
# missing (python3, its venv module, node, npm).
set -euo pipefail
cd "$(dirname "$0")/../.."

say() { printf 'scripts/sdk/setup.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

pins_hash() { cat "$@" | sha256sum | cut -d' ' -f1; }
up_to_date() { [ -f "$1/.keyfleet-pins" ] && [ "$(cat "$1/.keyfleet-pins")" = "$2" ]; }

mkdir -p target/sdk

# --- Python -----------------------------------------------------------------------------------
venv=target/sdk/venv
want=$(pins_hash scripts/sdk/requirements.txt)
if up_to_date "$venv" "$want"; then
  say "Python SDKs up to date ($venv)"
else
  command -v python3 >/dev/null ||
    die "missing: python3 (install Python 3.8+, e.g. apt-get install python3 python3-venv)"
  python3 -c 'import venv, ensurepip' 2>/dev/null ||
    die "missing: the Python venv module with ensurepip (apt-get install python3-venv, or python$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv)"
  say "installing the Python SDKs into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv" || die "python3 -m venv $venv failed"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r scripts/sdk/requirements.txt ||
    die "pip install -r scripts/sdk/requirements.txt failed (is the package index reachable?)"
  printf '%s\n' "$want" >"$venv/.keyfleet-pins"
fi

# --- Node -------------------------------------------------------------------------------------
node_dir=target/sdk/node
want=$(pins_hash scripts/sdk/package.json scripts/sdk/package-lock.json)
if up_to_date "$node_dir" "$want"; then
  say "Node SDKs up to date ($node_dir)"
else
  command -v node >/dev/null || die "missing: node (install Node.js 18+, e.g. apt-get install nodejs)"
  command -v npm >/dev/null || die "missing: npm (install it with Node.js, e.g. apt-get install npm)"
  say "installing the Node SDKs into $node_dir"
  rm -rf "$node_dir"
  mkdir -p "$node_dir"
  cp scripts/sdk/package.json scripts/sdk/package-lock.json "$node_dir/"
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error) ||
    die "npm ci in $node_dir failed (is the npm registry reachable?)"
  printf '%s\n' "$want" >"$node_dir/.keyfleet-pins"
fi
