#!/usr/bin/env python3
"""Helper of scripts/chaos.sh (standard library only): plans a round, checks its invariants,
prints the final table. Not meant to be run by hand.

  chaos.py plan SEED ROUND JOBS WORKERS KINDS DIR
                                         -> DIR/input.csv, DIR/plan.json, DIR/faults.txt and, in
                                            quota rounds, DIR/keyfleet.toml; prints the quota
  chaos.py check DIR                     -> DIR/check.json; prints one summary line
  chaos.py redis-state PORT PREFIX       -> per-scope reservations / pairs / used, as JSON (PORT:
                                            any node of the round's Redis Cluster)
  chaos.py redis-lane PORTS TAG          -> "MASTER REPLICA": the ports of the master serving TAG's
                                            slot and of its replica
  chaos.py queues PREFIX BATCH           -> the batch's queues on the RabbitMQ cluster, as JSON
                                            (rabbitmqctl list_queues --formatter json on stdin)
  chaos.py table LOGDIR WALL_SECONDS     -> the final table; exit 1 if any violation
"""

import collections
import concurrent.futures
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
FAULT_KINDS = ["worker-kill", "rabbit-restart", "redis-restart", "redis-stall", "rabbit-node-kill",
               "redis-master-kill"]
FAULT_WEIGHTS = [4, 2, 2, 2, 3, 3]
# Most valid rows go to one scope, the long lane: the workers run at `--upstream-rps 1` (one key
# a second per worker and scope), so this lane sets the round's length (about its keys / the
# number of workers, in seconds) whatever the CPU. Its quota is never small.
LONG_LANE = ALIYUN_SCOPES[0]
LONG_LANE_SHARE = 0.55
CODES = {  # provider -> (already exists, quota exceeded)
    "aliyun": ("KeyPair.AlreadyExist", "QuotaExceed.KeyPair"),
    "ucloud": ("8204", "8203"),
}


def plan(seed, rnd, jobs, workers, kinds, d):
    rng = random.Random(f"{seed}/{rnd}")
    # Half the rounds run with a small quota (every scope but the long lane, which keeps the
    # default through keyfleet.toml's [quota_per_region]) and a hot scope, so the quota is
    # really hit.
    quota = rng.randint(6, 30) if rng.random() < 0.5 else None
    hot = ALIYUN_SCOPES[1]
    others = [sc for sc in ALIYUN_SCOPES + UCLOUD_SCOPES if sc != LONG_LANE]
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
        if rng.random() < LONG_LANE_SHARE:
            scope = LONG_LANE
        elif quota and rng.random() < 0.45:
            scope = hot
        else:
            scope = rng.choice(others)
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
    # Kinds left out (--faults) are not drawn: every fault planned is one the round can inject.
    allowed = [(k, w) for k, w in zip(FAULT_KINDS, FAULT_WEIGHTS) if k in kinds.split(",")]
    faults = []
    for f in fracs:
        kind = rng.choices([k for k, _ in allowed], weights=[w for _, w in allowed])[0]
        arg = {"worker-kill": rng.randint(0, workers - 1), "rabbit-restart": rng.randint(1, 4),
               "redis-restart": rng.randint(1, 4), "redis-stall": rng.randint(2, 6),
               "rabbit-node-kill": rng.randint(2, 6), "redis-master-kill": rng.randint(1, 4)}[kind]
        faults.append((round(f, 3), kind, arg))
    quotas = {"/".join(sc[:3]): (500 if sc == LONG_LANE else quota or 500)
              for sc in ALIYUN_SCOPES + UCLOUD_SCOPES}
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
        json.dump({"seed": seed, "round": rnd, "jobs": jobs, "quota": quota, "quotas": quotas,
                   "faults": faults, "rows": expect, "distinct": distinct}, f,
                  ensure_ascii=False, indent=1)
    if quota:
        with open(os.path.join(d, "keyfleet.toml"), "w") as f:
            f.write(f"# chaos.sh round {rnd}: a small quota, but not for the long lane\n"
                    f"quota = {quota}\n[quota_per_region]\n{LONG_LANE[2]} = 500\n")
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
    quotas = p["quotas"]

    def quota_of(sc):  # sc: provider/owner/region
        return quotas.get(sc, p["quota"] or 500)
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
        if n > quota_of(sc):
            bad("quota-exceeded", f"{sc}: {n} key pairs registered, quota {quota_of(sc)}")
    for sc, n in created.items():
        if n > quota_of(sc):
            bad("quota-exceeded", f"{sc}: {n} created in the manifest, quota {quota_of(sc)}")
    # Exactly min(quota, distinct names) per scope: every distinct name is created unless the
    # scope is full, and no name twice.
    for sc, dn in p["distinct"].items():
        want = min(quota_of(sc), dn)
        if created.get(sc, 0) != want or per_scope.get(sc, 0) != want:
            bad("created-count", f"{sc}: manifest {created.get(sc, 0)}, registry {per_scope.get(sc, 0)}, expected min(quota {quota_of(sc)}, {dn} names) = {want}")
    raw_state = json.load(open(os.path.join(d, "redis-state.json")))
    for sc, st in raw_state.items():
        if st["reserved"]:
            bad("registry-leftover", f"{sc}: {st['reserved']} reservations left after the batch")
        if st["used"] != st["pairs"]:
            bad("registry-leftover", f"{sc}: used counter {st['used']} != {st['pairs']} pairs")
        if st["used"] > quota_of(sc):
            bad("quota-exceeded", f"{sc}: used counter {st['used']} > quota {quota_of(sc)}")

    # --- key files: created == registry == .pem files; fingerprints match the registry
    pems = sorted(glob.glob(os.path.join(out, "**", "*.pem"), recursive=True))
    ncreated = sum(created.values())
    if not (ncreated == len(reg) == len(pems)):
        bad("created-registry-files", f"created {ncreated}, registry {len(reg)}, .pem files {len(pems)}")
    fps = collections.Counter()
    # ssh-keygen twice a file: in a few threads (the work is in the child processes).
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        fingerprints = dict(zip(pems, pool.map(fingerprint_of_pem, pems)))
    for pem in pems:
        rel = os.path.relpath(pem, out).split(os.sep)
        key = tuple(rel[:3]) + (rel[3][:-4],) if len(rel) == 4 else None
        st = os.stat(pem)
        if stat.S_IMODE(st.st_mode) != 0o600:
            bad("key-file", f"{pem}: mode {oct(stat.S_IMODE(st.st_mode))}")
        fp, blob = fingerprints[pem]
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
    if q.get("error"):
        bad("queues-unreadable", q["error"])
    if q.get("dead", 0):
        bad("dead-letter", f"{q['dead']} messages in {q['dead_name']} (every job submitted was valid)")
    if q.get("jobs", 0):
        bad("jobs-left", f"{q['jobs']} messages (ready+unacked) still in the jobs queue")
    for row in q.get("queues", []):
        # On the cluster: nothing unacked on any queue of the round (a job held by a consumer
        # on a node that died would show here), and every queue a quorum queue with a member
        # on each of the three nodes, the killed ones included.
        if row.get("messages_unacknowledged"):
            bad("unacked-left", f"{row['name']}: {row['messages_unacknowledged']} unacked (leader {row.get('leader')})")
        if row.get("type") != "quorum" or len(row.get("members") or []) != 3:
            bad("queue-not-replicated", f"{row['name']}: type {row.get('type')}, members {row.get('members')}")
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
        r = subprocess.run(["redis-cli", "-c", "-p", port, *args], capture_output=True, text=True, check=True)
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


def redis_lane(ports, tag):
    """`MASTER REPLICA`: the ports of the master serving TAG's hash slot and of its replica that
    is online ("-" if none). Each node is asked about itself (its own line of CLUSTER NODES, its
    INFO replication), which is never stale, unlike its view of the others right after a
    failover or the cluster's creation."""
    def cli(p, *args):
        try:
            r = subprocess.run(["redis-cli", "-p", p, *args], capture_output=True, text=True, timeout=5)
        except subprocess.TimeoutExpired:
            return None
        return r.stdout if r.returncode == 0 and r.stdout.strip() and not r.stdout.startswith("ERR") else None
    ports = ports.split(",")
    slot = next((int(x) for x in (cli(p, "CLUSTER", "KEYSLOT", tag) for p in ports) if x), None)
    if slot is None:
        sys.exit("no node of the Redis Cluster answers")
    for p in ports:
        nodes = cli(p, "CLUSTER", "NODES")
        me = next((l.split() for l in (nodes or "").splitlines() if "myself" in l.split()[2:3][0]), None)
        if not me or "master" not in me[2].split(","):
            continue
        for rng in me[8:]:
            if rng.startswith("["):
                continue
            a, _, b = rng.partition("-")
            if int(a) <= slot <= int(b or a):
                info = cli(p, "INFO", "replication") or ""
                rep = next((l for l in info.splitlines() if l.startswith("slave") and "state=online" in l), None)
                rport = next((kv[5:] for kv in rep.split(",") if kv.startswith("port=")), "-") if rep else "-"
                print(p, rport)
                return
    sys.exit(f"no master serves slot {slot}")


def queues(prefix, batch):
    """The round's queues, from `rabbitmqctl list_queues name type leader members messages
    messages_ready messages_unacknowledged --formatter json` on stdin."""
    raw = sys.stdin.read()
    try:
        rows = [r for r in json.loads(raw or "[]") if str(r.get("name", "")).startswith(prefix + ".")]
    except ValueError:
        print(json.dumps({"error": f"list_queues: {raw[:300]!r}"}))
        return
    by = {r["name"]: r for r in rows}
    print(json.dumps({"jobs": by.get(prefix + ".jobs", {}).get("messages", 0),
                      "dead": by.get(prefix + ".jobs.dead", {}).get("messages", 0),
                      "dead_name": prefix + ".jobs.dead",
                      "results_left": by.get(f"{prefix}.results.{batch}", {}).get("messages", 0),
                      "queues": rows}))


def table(logdir, wall):
    rounds = sorted(glob.glob(os.path.join(logdir, "round-*")))
    planned, injected, missed, skipped = (collections.Counter() for _ in range(4))
    viol = collections.Counter()
    nrounds = created = quota_rounds = 0
    stopped = []
    for r in rounds:
        if os.path.exists(os.path.join(r, "interrupted")):
            stopped.append(os.path.basename(r))  # stopped by hand mid-round: not counted
            continue
        fl = os.path.join(r, "faults-done.txt")
        if os.path.exists(fl):
            for line in open(fl):
                w = line.split()
                if not w:
                    continue
                if w[1] == "not-reached":
                    missed[w[2]] += 1
                elif w[1].endswith("-skipped"):
                    skipped[w[1][:-len("-skipped")]] += 1
                else:
                    injected[w[1]] += 1
        c = os.path.join(r, "check.json")
        if os.path.exists(c):
            nrounds += 1
            res = json.load(open(c))
            created += res["created"]
            quota_rounds += 1 if res["quota_hit"] else 0
            viol.update(res["violations"])
            pl = json.load(open(os.path.join(r, "plan.json")))
            for _, kind, _ in pl["faults"]:
                planned[kind] += 1
        else:
            viol["round-not-checked"] += 1
    w = int(float(wall))
    print()
    print(f"{'rounds checked':<34}{nrounds}")
    if stopped:
        print(f"{'rounds interrupted (not checked)':<34}{len(stopped)} ({', '.join(stopped)})")
    print(f"{'key pairs created (all rounds)':<34}{created}")
    print(f"{'rounds where the quota was hit':<34}{quota_rounds}")
    print(f"{'faults':<22}{'planned':>8}{'injected':>10}{'not reached':>13}{'skipped':>9}")
    kinds = FAULT_KINDS + sorted((set(planned) | set(injected) | set(missed) | set(skipped)) - set(FAULT_KINDS))
    for k in kinds:
        print(f"  {k:<20}{planned[k]:>8}{injected[k]:>10}{missed[k]:>13}{skipped[k]:>9}")
    print(f"  {'all':<20}{sum(planned.values()):>8}{sum(injected.values()):>10}"
          f"{sum(missed.values()):>13}{sum(skipped.values()):>9}")
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
        plan(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7])
    elif cmd == "check":
        check(sys.argv[2])
    elif cmd == "redis-state":
        redis_state(sys.argv[2], sys.argv[3])
    elif cmd == "redis-lane":
        redis_lane(sys.argv[2], sys.argv[3])
    elif cmd == "queues":
        queues(sys.argv[2], sys.argv[3])
    elif cmd == "table":
        table(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown command {cmd}")
