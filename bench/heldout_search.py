#!/usr/bin/env python3
"""Code search on code whose documentation is gone: the measure of issue 23 (standard library only).

    python3 bench/heldout_search.py --lang python|elixir SRC [SRC...] [--sembed target/release/sembed]
        [-m MODEL] [--modes dense,lexical,hybrid] [--max-queries N] [--index-arg=--flag ...]
        [--keep DIR] [--out report.json]

1. Copies the source files of each SRC (`.py` or `.ex`/`.exs`) to a scratch tree, removing their
   documentation: Python docstrings (modules, classes, functions), Elixir `@moduledoc`, `@doc` and
   `@typedoc` strings. Each removed doc of a function (Python: `def`; Elixir: `def`/`defp`/`defmacro`/
   `defmacrop`/`defguard`, and a module's `@moduledoc` for its `defmodule`) whose first paragraph has
   at least three words becomes a query; its answer is the chunk holding that definition's first line
   in the stripped copy.
2. Indexes the stripped tree with `sembed index` (extra `--index-arg`s passed on), serves it with
   `sembed serve --index`, and asks every query (POST /search, k 10) in each mode.
3. Reports per mode: NDCG@10 (one relevant chunk: 1/log2(1+rank)), MRR@10, R@1, R@10, and the p50 /
   p95 of the search latency the client saw.

Hold-out rule: tune on one set of folders, report on another; never train on what you report.
Loopback only; every loop is bounded by the number of queries.
"""
import argparse
import ast
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


# --- Python ------------------------------------------------------------------------------------------

def first_paragraph(doc):
    for para in re.split(r"\n\s*\n", doc.strip()):
        words = " ".join(line.strip() for line in para.splitlines() if line.strip())
        if words:
            return words if len(words.split()) >= 3 else None
    return None


def strip_python(src):
    """(stripped source, [(query, definition line in the stripped source)]) or None if unparsable."""
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return None
    lines = src.splitlines(keepends=True)
    cut = {}  # first line -> (last line, replacement or None)
    queries = []  # (query, original def line)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if not body or not isinstance(body[0], ast.Expr):
            continue
        v = body[0].value
        if not (isinstance(v, ast.Constant) and isinstance(v.value, str)):
            continue
        d = body[0]
        if d.lineno == getattr(node, "lineno", 0):
            continue  # `def f(): "doc"` on one line: leave it
        only = len(body) == 1
        indent = re.match(r"\s*", lines[d.lineno - 1]).group(0)
        cut[d.lineno] = (d.end_lineno, indent + "pass\n" if only else None)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not only:
            q = first_paragraph(v.value)
            if q:
                queries.append((q, node.lineno))
    out, new_line, i = [], {}, 1
    while i <= len(lines):
        if i in cut:
            last, repl = cut[i]
            if repl:
                out.append(repl)
            i = last + 1
            continue
        out.append(lines[i - 1])
        new_line[i] = len(out)
        i += 1
    return "".join(out), [(q, new_line[line]) for q, line in queries]


# --- Elixir ------------------------------------------------------------------------------------------

DOC_OPEN = re.compile(r'^\s*@(doc|moduledoc|typedoc)\s+(~[sS])?("""|\'\'\')\s*$')
DOC_ONE = re.compile(r'^\s*@(doc|moduledoc|typedoc)\s+(~[sS])?"((?:[^"\\]|\\.)*)"\s*$')
DEF = re.compile(r"^\s*(def|defp|defmacro|defmacrop|defguard)\s+\S")
MODULE = re.compile(r"^\s*defmodule\s+\S")


def strip_elixir(src):
    lines = src.splitlines(keepends=True)
    docs = []  # (kind, first line, last line, text)
    i = 0
    while i < len(lines):
        m = DOC_OPEN.match(lines[i])
        if m:
            close = m.group(3)
            j = i + 1
            while j < len(lines) and lines[j].strip() != close:
                j += 1
            if j >= len(lines):
                return None
            docs.append((m.group(1), i, j, "".join(lines[i + 1:j])))
            i = j + 1
            continue
        m = DOC_ONE.match(lines[i])
        if m:
            docs.append((m.group(1), i, i, m.group(3).replace("\\n", "\n")))
        i += 1
    gone = set()
    for _, a, b, _ in docs:
        gone.update(range(a, b + 1))
    new_line, n = {}, 0
    for i in range(len(lines)):
        if i not in gone:
            n += 1
        new_line[i] = n
    queries = []
    doc_starts = {a for _, a, _, _ in docs}
    for kind, a, b, text in docs:
        q = first_paragraph(text)
        if not q or kind == "typedoc":
            continue
        target = None
        if kind == "doc":
            for j in range(b + 1, len(lines)):
                if j in doc_starts:
                    break
                if DEF.match(lines[j]):
                    target = j
                    break
                if MODULE.match(lines[j]):
                    break
        else:
            for j in range(a - 1, -1, -1):
                if MODULE.match(lines[j]):
                    target = j
                    break
        if target is not None:
            queries.append((q, new_line[target]))
    out = "".join(l for i, l in enumerate(lines) if i not in gone)
    return out, queries


# --- the run -----------------------------------------------------------------------------------------

def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def post(port, path, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def build_tree(lang, srcs, repo):
    exts = (".py",) if lang == "python" else (".ex", ".exs")
    strip = strip_python if lang == "python" else strip_elixir
    queries = []
    for src in srcs:
        src = os.path.abspath(src)
        name = os.path.basename(src.rstrip("/"))
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in ("test", "tests", "__pycache__"))
            for fn in sorted(filenames):
                if not fn.endswith(exts):
                    continue
                p = os.path.join(dirpath, fn)
                try:
                    text = open(p, encoding="utf-8").read()
                except (UnicodeDecodeError, OSError):
                    continue
                got = strip(text)
                if got is None:
                    continue
                out, qs = got
                rel = os.path.join(name, os.path.relpath(p, src))
                dst = os.path.join(repo, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with open(dst, "w", encoding="utf-8") as f:
                    f.write(out)
                queries.extend({"query": q, "path": rel, "line": line} for q, line in qs)
    # The same question twice is one query (its first definition).
    seen, uniq = set(), []
    for q in queries:
        if q["query"] not in seen:
            seen.add(q["query"])
            uniq.append(q)
    return uniq


def serve(sembed, db):
    """`sembed serve --index DB` on a free loopback port, once it answers: (process, port)."""
    port = free_port()
    server = subprocess.Popen([sembed, "serve", "--index", db, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server, port
        except Exception:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                sys.exit("sembed serve did not start:\n" + (server.stderr.read() if server.poll() is not None else ""))
            time.sleep(0.5)


def rank_of(hits, q):
    for i, h in enumerate(hits):
        if h["path"] == q["path"] and h["start_line"] <= q["line"] <= h["end_line"]:
            return i + 1
    return None


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("srcs", nargs="+")
    ap.add_argument("--lang", required=True, choices=["python", "elixir"])
    ap.add_argument("--sembed", default="target/release/sembed")
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--modes", default="dense,lexical,hybrid")
    ap.add_argument("--max-queries", type=int, default=0, help="a seeded sample of the queries (0: all)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--index-arg", action="append", default=[], help="passed to `sembed index`")
    ap.add_argument("--keep", default=None, help="build the stripped tree and index here and keep them")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    sembed = os.path.abspath(a.sembed)
    work = os.path.abspath(a.keep) if a.keep else tempfile.mkdtemp(prefix="sembed-heldout-")
    os.makedirs(work, exist_ok=True)
    repo, db = os.path.join(work, "repo"), os.path.join(work, "index.sqlite")
    report = {"srcs": a.srcs, "lang": a.lang, "model": a.model or "all-MiniLM-L6-v2",
              "index_args": a.index_arg}
    server = None
    try:
        if not os.path.isdir(repo):
            queries = build_tree(a.lang, a.srcs, repo)
            with open(os.path.join(work, "queries.json"), "w") as f:
                json.dump(queries, f)
        else:
            queries = json.load(open(os.path.join(work, "queries.json")))
        if a.max_queries and len(queries) > a.max_queries:
            queries = random.Random(a.seed).sample(queries, a.max_queries)
        model = ["-m", a.model] if a.model else []
        t = time.time()
        p = run([sembed, "index", repo, "--db", db, "-q", "--json", *model, *a.index_arg])
        idx = json.loads(p.stdout.strip().splitlines()[-1])
        report["index"] = {"files": idx["files"], "chunks": idx["chunks"], "embedded": idx["embedded"],
                           "seconds": round(time.time() - t, 1)}
        report["queries"] = len(queries)
        print(f"{len(queries)} queries, {idx['files']} files, {idx['chunks']} chunks "
              f"({idx['embedded']} embedded in {report['index']['seconds']} s)", file=sys.stderr)
        server, port = serve(sembed, db)
        report["modes"] = {}
        for mode in a.modes.split(","):
            ranks, ms = [], []
            for q in queries:
                t = time.perf_counter()
                r = post(port, "/search", {"query": q["query"], "k": 10, "mode": mode})
                ms.append((time.perf_counter() - t) * 1e3)
                ranks.append(rank_of(r["hits"], q))
            n = max(1, len(ranks))
            m = {
                "ndcg@10": sum(1 / math.log2(1 + r) for r in ranks if r) / n,
                "mrr@10": sum(1 / r for r in ranks if r) / n,
                "r@1": sum(1 for r in ranks if r == 1) / n,
                "r@10": sum(1 for r in ranks if r) / n,
                "p50_ms": percentile(ms, 50),
                "p95_ms": percentile(ms, 95),
            }
            report["modes"][mode] = {k: round(v, 4) for k, v in m.items()}
            print(f"{mode:8} NDCG@10 {m['ndcg@10']:.3f}  MRR@10 {m['mrr@10']:.3f}  R@1 {m['r@1']:.3f}  "
                  f"R@10 {m['r@10']:.3f}  p50 {m['p50_ms']:.1f} ms  p95 {m['p95_ms']:.1f} ms", file=sys.stderr)
    finally:
        if server:
            server.terminate()
            server.wait(timeout=30)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
