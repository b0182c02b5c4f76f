#!/usr/bin/env python3
"""Helper of scripts/chaos.sh (standard library only): plans a round, checks its invariants,
prints the final table. Not meant to be run by hand.

  chaos.py plan SEED ROUND JOBS DIR      -> DIR/input.csv, DIR/plan.json, DIR/faults.txt
  chaos.py check DIR                     -> DIR/check.json; prints one summary line
  chaos.py redis-state PORT PREFIX     -> per-scope reservations / pairs / used, as JSON
  chaos.py table LOGDIR WALL_SECONDS     -> the final table; exit 1 if any violation
"""

import collections
import glob
import json
import os
import random
import stat
import subprocess
import sys

ALIYUN_SCOPES = [("aliyun", "acme", "cn-hangzhou"), ("aliyun", "acme", "cn-shanghai"),
                 ("aliyun", "acme", "cn-beijing")]
UCLOUD_SCOPES = [("ucloud", "org-acme", "cn-bj2", "cn-bj2-02"), ("ucloud", "org-acme", "cn-zj", "cn-zj-01")]
HEADER = "Provider,Owner,RegionId,KeyPairName,Region,Zone"
FAULT_KINDS = ["worker-kill", "rabbit-restart", "redis-restart", "redis-stall"]
CODES = {  # provider -> (already exists, quota exceeded)
    "aliyun": ("KeyPair.AlreadyExist", "QuotaExceed.KeyPair"),
    "ucloud": ("8204", "8203"),
}


def plan(seed, rnd, jobs, d):
    rng = random.Random(f"{seed}/{rnd}")
    # Half the rounds run with a small quota and a hot scope, so the quota is really hit.
    quota = rng.randint(6, 30) if rng.random() < 0.5 else None
    rows = []  # (csv line, expectation)
    names = collections.defaultdict(list)  # scope -> names used so far
    for i in range(jobs):
        r = rng.random()
        if r < 0.05:  # invalid rows: answered by submit at once, never enqueued
            kind = rng.choice(["badname", "badregion", "badzone"])
            if kind == "badname":
                rows.append((f"aliyun,acme,cn-hangzhou,{i}-starts-with-digit,,", "invalid:InvalidKeyPairName.Malformed"))
            elif kind == "badregion":
                rows.append((f"aliyun,acme,cn-atlantis-{i},lost-{i},,", "invalid:InvalidRegionId.NotFound"))
            else:
                rows.append((f"ucloud,org-acme,,bad-zone-{i},cn-bj2,cn-zz-{i % 90 + 10}", "invalid:8202"))
            continue
        if quota and rng.random() < 0.45:
            scope = ALIYUN_SCOPES[0]  # the hot scope
        else:
            scope = rng.choice(ALIYUN_SCOPES + UCLOUD_SCOPES)
        key = scope[:3]
        if names[key] and rng.random() < 0.08:
            name = rng.choice(names[key])  # a duplicate: KeyPair.AlreadyExist / 8204 (or quota)
        else:
            name = (f"数据库-{rnd}-{i}" if rng.random() < 0.05 else f"h-{rnd}-{i}")
            names[key].append(name)
        if scope[0] == "aliyun":
            rows.append((f"aliyun,acme,{scope[2]},{name},,", "valid"))
        else:
            rows.append((f"ucloud,org-acme,,{name},{scope[2]},{scope[3]}", "valid"))
    nfaults = rng.randint(2, 5)
    fracs = sorted(rng.uniform(0.08, 0.85) for _ in range(nfaults))
    faults = []
    for f in fracs:
        kind = rng.choices(FAULT_KINDS, weights=[4, 2, 2, 2])[0]
        arg = {"worker-kill": rng.randint(0, 2), "rabbit-restart": rng.randint(1, 4),
               "redis-restart": rng.randint(1, 4), "redis-stall": rng.randint(2, 6)}[kind]
        faults.append((round(f, 3), kind, arg))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "input.csv"), "w", encoding="utf-8") as f:
        f.write(HEADER + "\n")
        for line, _ in rows:
            f.write(line + "\n")
    expect = {}  # input line number -> expectation; scope -> distinct names
    for n, (line, e) in enumerate(rows, start=2):
        p = line.split(",")
        region = p[2] if p[0] == "aliyun" else p[4]
        expect[n] = {"expect": e, "scope": [p[0], p[1], region], "name": p[3]}
    distinct = {"/".join(k): len(v) for k, v in names.items()}
    with open(os.path.join(d, "plan.json"), "w", encoding="utf-8") as f:
        json.dump({"seed": seed, "round": rnd, "jobs": jobs, "quota": quota, "faults": faults,
                   "rows": expect, "distinct": distinct}, f, ensure_ascii=False, indent=1)
    with open(os.path.join(d, "faults.txt"), "w") as f:
        for frac, kind, arg in faults:
            f.write(f"{frac} {kind} {arg}\n")
    print(quota or 0)


def fingerprint_of_pem(path):
    pub = subprocess.run(["ssh-keygen", "-y", "-f", path], capture_output=True, text=True)
    if pub.returncode != 0:
        return None, f"ssh-keygen -y failed: {pub.stderr.strip()}"
    fp = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", "-"], input=pub.stdout,
                        capture_output=True, text=True)
    if fp.returncode != 0:
        return None, f"ssh-keygen -l failed: {fp.stderr.strip()}"
    return fp.stdout.split()[1], pub.stdout.split()[1]


def check(d):
    p = json.load(open(os.path.join(d, "plan.json"), encoding="utf-8"))
    quota = p["quota"] or 500
    out = os.path.join(d, "out")
    v = collections.defaultdict(list)  # violation kind -> details

    def bad(kind, detail):
        v[kind].append(detail)

    # --- the manifest: every job exactly one result line
    lines = []
    mpath = os.path.join(out, "manifest.jsonl")
    if os.path.exists(mpath):
        for raw in open(mpath, encoding="utf-8"):
            try:
                lines.append(json.loads(raw))
            except ValueError:
                bad("manifest-torn-line", raw[:200])
    by_job = collections.defaultdict(list)
    for m in lines:
        by_job[m["job_id"]].append(m)
    by_line = collections.defaultdict(set)
    for jid, ms in by_job.items():
        if len(ms) != 1:
            bad("job-not-exactly-one-result",
                f"job {jid} line {ms[0].get('line')}: {len(ms)} lines: "
                + "; ".join(f"{m['status']} {m.get('code')}" for m in ms))
        for m in ms:
            by_line[m.get("line")].add(jid)
    rows = {int(k): r for k, r in p["rows"].items()}
    for n in rows:
        if len(by_line.get(n, ())) != 1:
            bad("job-not-exactly-one-result", f"input line {n}: {len(by_line.get(n, ()))} job ids in the manifest")
    for n in by_line:
        if n not in rows:
            bad("job-not-exactly-one-result", f"manifest line number {n} is not an input row")
    final = {jid: ms[-1] for jid, ms in by_job.items()}  # the README: the last line is the answer

    # --- each row's answer is one the API could give
    created = collections.Counter()
    for m in final.values():
        r = rows.get(m.get("line"))
        if r is None:
            continue
        e = r["expect"]
        if e.startswith("invalid:"):
            if m["status"] != "failed" or str(m.get("code")) != e[8:]:
                bad("wrong-answer", f"line {m['line']}: expected {e[8:]}, got {m['status']} {m.get('code')}")
        elif m["status"] == "created":
            created["/".join(r["scope"])] += 1
        elif str(m.get("code")) not in CODES[r["scope"][0]]:
            bad("wrong-answer", f"line {m['line']} ({r['name']}): {m['status']} {m.get('code')} {m.get('message')}")

    # --- the registry (Redis, the round's prefix)
    recs = []
    for raw in open(os.path.join(d, "describe.jsonl"), encoding="utf-8"):
        if raw.strip():
            recs.append(json.loads(raw))
    reg = {}
    for r in recs:
        s = r["scope"]
        reg[(s["provider"], s["owner"], s["region"], r["name"])] = r
        if not r.get("delivered"):
            bad("registry-undelivered", f"{s} {r['name']} job {r['job_id']}")
    per_scope = collections.Counter("/".join([k[0], k[1], k[2]]) for k in reg)
    for sc, n in per_scope.items():
        if n > quota:
            bad("quota-exceeded", f"{sc}: {n} key pairs registered, quota {quota}")
    for sc, n in created.items():
        if n > quota:
            bad("quota-exceeded", f"{sc}: {n} created in the manifest, quota {quota}")
    # Exactly min(quota, distinct names) per scope: every distinct name is created unless the
    # scope is full, and no name twice.
    for sc, dn in p["distinct"].items():
        want = min(quota, dn)
        if created.get(sc, 0) != want or per_scope.get(sc, 0) != want:
            bad("created-count", f"{sc}: manifest {created.get(sc, 0)}, registry {per_scope.get(sc, 0)}, expected min(quota {quota}, {dn} names) = {want}")
    raw_state = json.load(open(os.path.join(d, "redis-state.json")))
    for sc, st in raw_state.items():
        if st["reserved"]:
            bad("registry-leftover", f"{sc}: {st['reserved']} reservations left after the batch")
        if st["used"] != st["pairs"]:
            bad("registry-leftover", f"{sc}: used counter {st['used']} != {st['pairs']} pairs")
        if st["used"] > quota:
            bad("quota-exceeded", f"{sc}: used counter {st['used']} > quota {quota}")

    # --- key files: created == registry == .pem files; fingerprints match the registry
    pems = sorted(glob.glob(os.path.join(out, "**", "*.pem"), recursive=True))
    ncreated = sum(created.values())
    if not (ncreated == len(reg) == len(pems)):
        bad("created-registry-files", f"created {ncreated}, registry {len(reg)}, .pem files {len(pems)}")
    fps = collections.Counter()
    for pem in pems:
        rel = os.path.relpath(pem, out).split(os.sep)
        key = tuple(rel[:3]) + (rel[3][:-4],) if len(rel) == 4 else None
        st = os.stat(pem)
        if stat.S_IMODE(st.st_mode) != 0o600:
            bad("key-file", f"{pem}: mode {oct(stat.S_IMODE(st.st_mode))}")
        fp, blob = fingerprint_of_pem(pem)
        if fp is None:
            bad("key-file", f"{pem}: {blob}")
            continue
        fps[fp] += 1
        r = reg.get(key)
        if r is None:
            bad("key-not-registered", f"{pem} ({fp}) has no registry record")
        elif r["fingerprint_sha256"] != fp:
            bad("key-fingerprint-mismatch", f"{pem}: file {fp}, registry {r['fingerprint_sha256']} (job {r['job_id']})")
        pubf = pem[:-4] + ".pub"
        if not os.path.exists(pubf) or open(pubf).read().split()[1] != blob:
            bad("key-file", f"{pubf} missing or not the .pem's public key")
    for r in recs:
        fps_reg = r["fingerprint_sha256"]
        if sum(1 for x in recs if x["fingerprint_sha256"] == fps_reg) > 1:
            bad("duplicate-fingerprint", f"registry: {fps_reg}")
    for fp, n in fps.items():
        if n > 1:
            bad("duplicate-fingerprint", f"key files: {fp} x{n}")
    for m in final.values():
        if m["status"] == "created":
            r = reg.get((m["provider"], m["owner"], m["region"], m["key_pair_name"]))
            if r is None or r["fingerprint_sha256"] != m.get("fingerprint_sha256") or r["job_id"] != m["job_id"]:
                bad("manifest-registry-mismatch", f"line {m['line']} {m['key_pair_name']}: manifest {m.get('fingerprint_sha256')}, registry {r and r['fingerprint_sha256']}")

    # --- collect's side files, queues, status, logs
    for side in ("rejected.jsonl", "unreadable.jsonl"):
        f = os.path.join(out, side)
        if os.path.exists(f) and os.path.getsize(f) > 0:
            bad("collect-" + side.split(".")[0], f"{f}: {sum(1 for _ in open(f))} lines")
    q = json.load(open(os.path.join(d, "queues.json")))
    if q.get("dead", 0):
        bad("dead-letter", f"{q['dead']} messages in {q['dead_name']} (every job submitted was valid)")
    if q.get("jobs", 0):
        bad("jobs-left", f"{q['jobs']} messages (ready+unacked) still in the jobs queue")
    st = json.load(open(os.path.join(d, "status.json")))
    nfailed = sum(1 for m in final.values() if m["status"] == "failed")
    if st.get("total") != len(rows) or st.get("created") != ncreated or sum(st.get("failed", {}).values()) != nfailed:
        bad("status-mismatch", f"status total {st.get('total')} created {st.get('created')} failed {sum(st.get('failed', {}).values())}; manifest rows {len(rows)} created {ncreated} failed {nfailed}")
    for log in glob.glob(os.path.join(d, "worker-*.log")) + glob.glob(os.path.join(d, "collect-*.log")):
        text = open(log, errors="replace").read()
        if "PRIVATE KEY" in text:
            bad("private-key-in-log", log)
        if "panicked" in text:
            bad("panic", log)
    ex = os.path.join(d, "worker-exits.txt")
    if os.path.exists(ex):
        for line in open(ex):
            if line.strip():
                bad("worker-died-by-itself", line.strip())

    res = {"violations": {k: len(x) for k, x in v.items()}, "details": v, "created": ncreated,
           "failed": nfailed, "registry": len(reg), "pems": len(pems), "quota": p["quota"],
           "quota_hit": any(str(m.get("code")) in ("QuotaExceed.KeyPair", "8203") for m in final.values())}
    json.dump(res, open(os.path.join(d, "check.json"), "w"), ensure_ascii=False, indent=1)
    nv = sum(res["violations"].values())
    print(f"created={ncreated} registry={len(reg)} pem={len(pems)} failed={nfailed} "
          f"quota={p['quota'] or 'default'}{' (hit)' if res['quota_hit'] else ''} violations={nv}"
          + ("" if not nv else " " + ",".join(f"{k}:{n}" for k, n in res["violations"].items())))


def redis_state(port, prefix):
    """Per scope: entries that are reservations, key pairs, and the quota counter."""
    def cli(*args):
        r = subprocess.run(["redis-cli", "-p", port, *args], capture_output=True, text=True, check=True)
        return r.stdout.splitlines()
    state = {}
    for sc in cli("SMEMBERS", f"{prefix}:scopes"):
        if not sc:
            continue
        kv = cli("HGETALL", f"{prefix}:{{{sc}}}:pairs")
        entries = [json.loads(x) for x in kv[1::2]]
        used = cli("GET", f"{prefix}:{{{sc}}}:used")
        state[sc.replace(":", "/")] = {
            "reserved": sum(1 for e in entries if e.get("state") == "reserved"),
            "pairs": sum(1 for e in entries if e.get("state") == "pair"),
            "used": int(used[0]) if used and used[0] else 0,
        }
    print(json.dumps(state, ensure_ascii=False))


def table(logdir, wall):
    rounds = sorted(glob.glob(os.path.join(logdir, "round-*")))
    faults = collections.Counter()
    viol = collections.Counter()
    nrounds = created = quota_rounds = 0
    for r in rounds:
        fl = os.path.join(r, "faults-done.txt")
        if os.path.exists(fl):
            for line in open(fl):
                if line.strip():
                    w = line.split()
                    faults["not-reached (" + w[2] + ")" if w[1] == "not-reached" else w[1]] += 1
        c = os.path.join(r, "check.json")
        if os.path.exists(c):
            nrounds += 1
            res = json.load(open(c))
            created += res["created"]
            quota_rounds += 1 if res["quota_hit"] else 0
            viol.update(res["violations"])
        else:
            viol["round-not-checked"] += 1
    w = int(float(wall))
    print()
    print(f"{'rounds':<34}{nrounds}")
    print(f"{'key pairs created (all rounds)':<34}{created}")
    print(f"{'rounds where the quota was hit':<34}{quota_rounds}")
    print("faults injected")
    for k in FAULT_KINDS + sorted(set(faults) - set(FAULT_KINDS)):
        print(f"  {k:<32}{faults.get(k, 0)}")
    print("invariant violations")
    if not viol:
        print(f"  {'(none)':<32}0")
    for k, n in sorted(viol.items()):
        print(f"  {k:<32}{n}")
    print(f"{'wall time':<34}{w // 60}m{w % 60:02d}s")
    sys.exit(1 if viol else 0)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "plan":
        plan(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif cmd == "check":
        check(sys.argv[2])
    elif cmd == "redis-state":
        redis_state(sys.argv[2], sys.argv[3])
    elif cmd == "table":
        table(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown command {cmd}")
