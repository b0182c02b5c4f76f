#!/usr/bin/env python3
"""The import graph of the library (src/): which file uses which, read from `crate::` paths.

Checks the house rules of DESIGN.md §9 and prints what breaks them:
  - no import circles between files;
  - no import that runs from a lower wing up to a higher one (the order of WINGS; MAX_UP);
  - clap only under src/cli/ (and no file outside src/cli/ uses `crate::cli`);
  - at most MAX_TOP `.rs` files directly in src/.
Exit 0 when all hold, 1 otherwise. `--edges` also prints every edge.

Every cross-module import in this crate is written as a `crate::` path (`use crate::a::b` or
`crate::a::b::f()` inline), so those are the edges; `super::` between a module and its own
children is the parent/child pattern of Rust modules and is not counted. Test modules
(`#[cfg(test)] mod tests`) are left out: they may reach anywhere.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
MAX_UP = 0
MAX_TOP = 14
# Wings from the door down: an import may run down this list or stay within a wing.
WINGS = [
    "main.rs", "cli", "modes", "lifecycle.rs", "quota_gauge.rs", "reservoir.rs", "upstream",
    "credentials.rs", "sink", "retry.rs", "queue", "registry", "telemetry", "settings.rs", "job",
    "dialect", "keys", "prime", "sign", "escape.rs", "group.rs", "time.rs", "shutdown.rs",
    "hardening.rs", "lib.rs",
]

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def files():
    for d, _, fs in os.walk(ROOT):
        for f in fs:
            if f.endswith(".rs"):
                yield os.path.relpath(os.path.join(d, f), ROOT)


def module_file(parts):
    """The file of the longest module prefix of `parts` (a list of path segments)."""
    for n in range(len(parts), 0, -1):
        base = os.path.join(*parts[:n])
        for cand in (base + ".rs", os.path.join(base, "mod.rs")):
            if os.path.exists(os.path.join(ROOT, cand)):
                return cand
    return None


def expand(text):
    """Every `crate::…` path in `text`, with `{…}` groups expanded into whole paths."""
    out = []
    for m in re.finditer(r"\bcrate::", text):
        i = m.end()
        out.extend(_paths(text, i, []))
    return out


def _paths(text, i, prefix):
    parts = list(prefix)
    while True:
        m = re.match(IDENT, text[i:])
        if m:
            parts.append(m.group(0))
            i += m.end()
            if text.startswith("::", i):
                i += 2
                continue
            return [parts]
        if text.startswith("{", i):
            res, depth, j, start = [], 1, i + 1, i + 1
            while depth and j < len(text):
                c = text[j]
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                if (c == "," and depth == 1) or depth == 0:
                    item = text[start:j].strip()
                    if item:
                        res.extend(_paths(item, 0, parts))
                    start = j + 1
                j += 1
            return res or [parts]
        return [parts]


def strip(text):
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    cut = text.find("#[cfg(test)]\nmod tests")
    return text if cut < 0 else text[:cut]


def wing(f):
    top = f.split(os.sep)[0]
    return WINGS.index(top) if top in WINGS else len(WINGS)


def main():
    edges = {}
    problems = []
    for f in sorted(files()):
        text = strip(open(os.path.join(ROOT, f), encoding="utf-8").read())
        for parts in expand(text):
            target = module_file([p for p in parts if p != "self"])
            if target and target != f:
                edges.setdefault(f, set()).add(target)
        if re.search(r"\bclap(::|\s*;|_)", text) and not f.startswith("cli" + os.sep):
            problems.append(f"{f} uses clap outside src/cli/")
        if not f.startswith("cli" + os.sep) and f != "main.rs":
            if any(t.startswith("cli" + os.sep) for t in edges.get(f, ())):
                problems.append(f"{f} imports from src/cli/ (the door is the top floor)")

    # Circles: strongly connected components of more than one file (Tarjan).
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    for c in comps:
        problems.append("import circle: " + " -> ".join(c))

    up = sorted((a, b) for a, ts in edges.items() for b in ts if wing(b) < wing(a))
    top = sorted(f for f in files() if os.sep not in f)
    n_edges = sum(len(t) for t in edges.values())
    print(f"{len(list(files()))} files, {n_edges} imports, {len(comps)} circles, "
          f"{len(up)} up the wings (at most {MAX_UP}), {len(top)} files directly in src/ "
          f"(at most {MAX_TOP})")
    for a, b in up:
        print(f"  up: {a} -> {b}")
    if len(up) > MAX_UP:
        problems.append(f"{len(up)} imports run up the wings")
    if len(top) > MAX_TOP:
        problems.append(f"{len(top)} files directly in src/: {', '.join(top)}")
    if "--edges" in sys.argv:
        for a in sorted(edges):
            for b in sorted(edges[a]):
                print(f"  {a} -> {b}")
    for p in problems:
        print("FAIL: " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
