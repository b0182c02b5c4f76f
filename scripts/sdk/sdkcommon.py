"""Shared scenario runner of the Python SDK drivers (aliyun_classic.py, aliyun_tea.py, ucloud.py).

A driver wraps ONE official SDK in a small adapter (create / import_ / describe / delete, how to
describe an exception, how to move the SDK's clock or pin its nonce) and hands it to `main`.
`main` runs the one scenario named on the command line and prints one JSON object per line on
stdout: what the SDK returned or raised, nothing more. Drivers never decide pass/fail; the Rust
test (tests/serve/serve_sdk.rs) reads the lines and asserts.

Output lines:
  {"op": "create", "ok": true, "status": 200, "body": {...the answer, wire field names...}}
  {"op": "create", "ok": false, "exception": "ServerException", "code": "KeyPair.AlreadyExist",
   "status": 400, "message": "...", "request_id": "..."}
  {"op": "scenario", "unsupported": true, "reason": "..."}   (the SDK cannot do this scenario)
Exit status is 0 whenever the SDK could be driven (even when it raised); 2 on a usage error.

Scenarios (NAME is chosen by the caller and should be unique per test):
  create NAME [--tag K=V ...] [--resource-group RG]
  create-many PREFIX N         N creates PREFIX-1..PREFIX-N at once (threads), one line each
  import NAME PUBKEYFILE
  describe [NAME-PATTERN]      one page of up to 50 (Alibaba) / 100 (UCloud), public keys included
  delete NAME...               Alibaba: key pair names; UCloud: KeyPairIds
  error CASE NAME              provoke one documented error (cases below); the last line is it
  wrong-secret NAME            create NAME signed with a wrong secret
  unknown-key NAME             create NAME with an access key id / public key the server does not know
  stale-timestamp NAME         create NAME with the SDK's clock helper moved 20 minutes back
  replay NAME                  create NAME twice with the SDK's nonce generator pinned to one value
Error CASEs: bad-name, duplicate-name, bad-resource-group, duplicate-tag-key, bad-tag-key,
  bad-tag-value, too-many-tags, quota-exceeded (creates NAME-1, NAME-2, … until the first failure,
  at most 60), missing-name, bad-region, bad-public-key, missing-public-key, bad-key-pair-names.
"""

import argparse
import concurrent.futures
import json
import os
import sys
import threading
import traceback

STALE_MINUTES = 20

ERROR_CASES = [
    "bad-name",
    "duplicate-name",
    "bad-resource-group",
    "duplicate-tag-key",
    "bad-tag-key",
    "bad-tag-value",
    "too-many-tags",
    "quota-exceeded",
    "missing-name",
    "bad-region",
    "bad-public-key",
    "missing-public-key",
    "bad-key-pair-names",
]

# A well-formed public key line whose base64 blob is not an SSH key.
BAD_PUBLIC_KEY = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB-not-base64 bad@example"


_emit_lock = threading.Lock()


def emit(obj):
    line = json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n"
    with _emit_lock:  # create-many prints from several threads: one whole line at a time
        sys.stdout.write(line)
        sys.stdout.flush()


class Unsupported(Exception):
    """The SDK cannot do this scenario; the message says why."""


def parser(description, defaults):
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--endpoint",
        default=os.environ.get("KEYFLEET_SDK_ENDPOINT"),
        help="host:port of keyfleet serve (env KEYFLEET_SDK_ENDPOINT)",
    )
    p.add_argument("--region", default=defaults.get("region"))
    for flag, env, default in defaults.get("credentials", []):
        p.add_argument(flag, default=os.environ.get(env, default), help="env " + env)
    for flag, kw in defaults.get("extra", []):
        p.add_argument(flag, **kw)
    p.add_argument("scenario")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def outcome(sdk, op, fn):
    """Run fn(); print and return what the SDK observed."""
    try:
        status, body = fn()
        line = {"op": op, "ok": True, "status": status, "body": body}
    except Unsupported:
        raise
    except Exception as e:  # noqa: BLE001 - every SDK exception is data for the test
        line = {"op": op, "ok": False}
        line.update(sdk.describe_exception(e))
        line.setdefault("exception", type(e).__name__)
        if os.environ.get("KEYFLEET_SDK_TRACE"):
            line["trace"] = traceback.format_exc()
    emit(line)
    return line


def split_flags(args):
    """create NAME [--tag K=V ...] [--resource-group RG]"""
    name, tags, rg, rest = None, [], None, list(args)
    while rest:
        a = rest.pop(0)
        if a == "--tag":
            k, _, v = rest.pop(0).partition("=")
            tags.append((k, v))
        elif a == "--resource-group":
            rg = rest.pop(0)
        elif name is None:
            name = a
        else:
            raise SystemExit("unexpected argument " + a)
    return name, tags, rg


def run_error(sdk, case, name):
    """The SDK calls that provoke one documented error; every call's outcome is printed."""
    create = lambda **kw: outcome(sdk, "create", lambda: sdk.create(**kw))  # noqa: E731
    if case == "bad-name":
        create(name="1" + name)  # must start with a letter (Alibaba); UCloud: see ucloud.py
    elif case == "duplicate-name":
        create(name=name)
        create(name=name)
    elif case == "bad-resource-group":
        create(name=name, resource_group="rg-doesnotexist0")
    elif case == "duplicate-tag-key":
        create(name=name, tags=[("team", "a"), ("team", "b")])
    elif case == "bad-tag-key":
        create(name=name, tags=[("aliyun-owned", "v")])
    elif case == "bad-tag-value":
        create(name=name, tags=[("team", "http://example.com")])
    elif case == "too-many-tags":
        create(name=name, tags=[("k%d" % i, "v") for i in range(1, 22)])
    elif case == "quota-exceeded":
        for i in range(1, 61):
            if not create(name="%s-%d" % (name, i))["ok"]:
                break
    elif case == "missing-name":
        create(name=None)
    elif case == "bad-region":
        create(name=name, region="mars-1")
    elif case == "bad-public-key":
        outcome(sdk, "import", lambda: sdk.import_(name, BAD_PUBLIC_KEY))
    elif case == "missing-public-key":
        outcome(sdk, "import", lambda: sdk.import_(name, None))
    elif case == "bad-key-pair-names":
        outcome(sdk, "delete", lambda: sdk.delete_raw("not-a-json-array"))
    else:
        raise SystemExit("unknown error case %r; known: %s" % (case, ", ".join(ERROR_CASES)))


def main(sdk, args):
    s, a = args.scenario, args.args
    try:
        if s == "create":
            name, tags, rg = split_flags(a)
            outcome(sdk, "create", lambda: sdk.create(name=name, tags=tags, resource_group=rg))
        elif s == "create-many":
            prefix, n = a[0], int(a[1])
            with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
                futs = [
                    pool.submit(outcome, sdk, "create", lambda i=i: sdk.create(name="%s-%d" % (prefix, i)))
                    for i in range(1, n + 1)
                ]
                for f in futs:
                    f.result()
        elif s == "import":
            with open(a[1]) as f:
                body = f.read()
            outcome(sdk, "import", lambda: sdk.import_(a[0], body))
        elif s == "describe":
            outcome(sdk, "describe", lambda: sdk.describe(a[0] if a else None))
        elif s == "delete":
            outcome(sdk, "delete", lambda: sdk.delete(a))
        elif s == "error":
            run_error(sdk, a[0], a[1])
        elif s == "wrong-secret":
            sdk.use_wrong_secret()
            outcome(sdk, "create", lambda: sdk.create(name=a[0]))
        elif s == "unknown-key":
            sdk.use_unknown_key()
            outcome(sdk, "create", lambda: sdk.create(name=a[0]))
        elif s == "stale-timestamp":
            sdk.move_clock_back(STALE_MINUTES)
            outcome(sdk, "create", lambda: sdk.create(name=a[0]))
        elif s == "replay":
            sdk.pin_nonce()
            outcome(sdk, "create", lambda: sdk.create(name=a[0]))
            outcome(sdk, "create", lambda: sdk.create(name=a[0]))
        else:
            print("unknown scenario %r" % s, file=sys.stderr)
            sys.exit(2)
    except Unsupported as e:
        emit({"op": s, "unsupported": True, "reason": str(e)})
    except (IndexError, ValueError) as e:
        print("usage error in scenario %r: %s" % (s, e), file=sys.stderr)
        sys.exit(2)
