#!/usr/bin/env python3
"""Code search, measured end to end with the `sembed` binary (standard library only).

    python3 bench/code_search.py SRC [--sembed target/release/sembed] [-m MODEL] [--pairs 500]
                                     [--quantize int8] [--out report.json]

1. Copies SRC to a scratch folder (so a file can be touched) and indexes it: files, chunks,
   chunks/s embedded, seconds.
2. Touches one file (appends a function) and indexes again: seconds, and what was re-embedded.
3. Mines (docstring -> function) pairs from SRC with `sembed mine`, takes a seeded sample, and asks
   `sembed serve --index` for each docstring (POST /search, k=10). A hit is relevant when it is the
   pair's file and its text holds the function's first line. Reports NDCG@10, MRR@10, recall@1/10.
4. Runs `sembed eval` on the same pairs (each docstring against the sampled functions only) for
   comparison, and the search latency the server measured.
Loopback only; every loop is bounded by the number of pairs.
"""
import argparse
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def run(cmd, **kw):
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p, time.time() - t


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def post(port, path, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("--sembed", default="target/release/sembed")
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=None)
    ap.add_argument("--ann-threshold", type=int, default=None,
                    help="vectors from which the index uses its HNSW graph (sembed's default: 20000)")
    ap.add_argument("--recall-queries", type=int, default=100,
                    help="queries whose HNSW hits are compared with exact search (when the graph answers)")
    ap.add_argument("--exclude", action="append", default=[],
                    help="folder names left out of the copy (e.g. test, site-packages)")
    a = ap.parse_args()
    sembed = os.path.abspath(a.sembed)
    model = ["-m", a.model] if a.model else []
    quant = ["--quantize", a.quantize] if a.quantize else []
    ann = ["--ann-threshold", str(a.ann_threshold)] if a.ann_threshold is not None else []
    work = tempfile.mkdtemp(prefix="sembed-codesearch-")
    report = {"src": a.src, "model": a.model or "all-MiniLM-L6-v2", "quantize": a.quantize}
    try:
        repo = os.path.join(work, "repo")
        shutil.copytree(a.src, repo, ignore=shutil.ignore_patterns("__pycache__", ".git", ".venv*", "target", *a.exclude))
        db = os.path.join(work, "index.sqlite")
        p, secs = run([sembed, "index", repo, "--db", db, "-q", "--json", *model, *quant, *ann])
        first = json.loads(p.stdout)
        report["index"] = {k: first[k] for k in ("files", "chunks", "embedded", "split", "skipped")}
        report["index"]["seconds"] = round(first["seconds"], 2)
        report["index"]["chunks_per_s"] = round(first["embedded"] / first["seconds"], 2)
        print(f"index: {first['files']} files, {first['chunks']} chunks in {first['seconds']:.1f} s "
              f"= {report['index']['chunks_per_s']} chunks/s", file=sys.stderr)

        # Touch one file: a new function at the end of the first Python (or any) file.
        # A file the index holds (not under a hidden or ignored folder).
        files = sorted(
            os.path.join(d, f) for d, _, fs in os.walk(repo) for f in fs
            if f.endswith((".py", ".rs")) and not any(
                part.startswith(".") for part in os.path.relpath(d, repo).split(os.sep) if part != ".")
        )
        touched = files[len(files) // 2]
        with open(touched, "a") as f:
            f.write("\n\ndef sembed_touched_marker(x):\n    return x\n" if touched.endswith(".py")
                    else "\n\nfn sembed_touched_marker(x: u32) -> u32 { x }\n")
        p, _ = run([sembed, "index", repo, "--db", db, "-q", "--json", *model, *quant, *ann])
        again = json.loads(p.stdout)
        report["rerun_after_touching_one_file"] = {
            "file": os.path.relpath(touched, repo),
            "seconds": round(again["seconds"], 2),
            "embedded": again["embedded"],
            "added": again["added"],
            "removed": again["removed"],
            "unchanged": again["unchanged"],
        }
        print(f"rerun after touching {os.path.relpath(touched, repo)}: {again['seconds']:.2f} s, "
              f"{again['embedded']} embedded, {again['unchanged']} unchanged", file=sys.stderr)

        # Pairs mined from the same tree (paths relative to it, as the index stores them).
        pairs_all = os.path.join(work, "pairs-all.jsonl")
        run([sembed, "mine", repo, "--out", pairs_all, "-q"])
        with open(pairs_all) as f:
            rows = [json.loads(l) for l in f]
        random.Random(a.seed).shuffle(rows)
        rows = rows[: a.pairs]
        pairs = os.path.join(work, "pairs.jsonl")
        with open(pairs, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

        port = free_port()
        server = subprocess.Popen(
            [sembed, "serve", "--index", db, "--port", str(port), *quant],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except Exception:
                    time.sleep(0.2)
            ndcg = mrr = r1 = r10 = 0.0
            lat = []
            method = None
            for r in rows:
                rel = os.path.relpath(r["file"], repo)
                first_line = r["positive"].splitlines()[0].strip()
                t = time.time()
                res = post(port, "/search", {"query": r["anchor"], "k": 10})
                lat.append((time.time() - t) * 1e3)
                method = res["method"]
                rank = next(
                    (i for i, h in enumerate(res["hits"]) if h["path"] == rel and first_line in h["text"]),
                    None,
                )
                if rank is not None:
                    ndcg += 1 / math.log2(rank + 2)
                    mrr += 1 / (rank + 1)
                    r1 += rank == 0
                    r10 += 1
        finally:
            server.terminate()
            server.wait(timeout=30)
        n = len(rows)
        lat.sort()
        report["search"] = {
            "pairs": n,
            "corpus_chunks": again["chunks"],
            "ndcg_at_10": round(ndcg / n, 4),
            "mrr_at_10": round(mrr / n, 4),
            "recall_at_1": round(r1 / n, 4),
            "recall_at_10": round(r10 / n, 4),
            "http_p50_ms": round(lat[n // 2], 1),
            "http_p99_ms": round(lat[min(n - 1, int(n * 0.99))], 1),
            "method": method,
        }
        if method == "ann":
            # The graph's hits against every vector compared, on the same real queries.
            found = 0
            qs = rows[: a.recall_queries]
            for r in qs:
                hits = []
                for extra in ([], ["--exact"]):
                    p, _ = run([sembed, "search", r["anchor"], "--db", db, "--json", "-k", "10", *extra])
                    hits.append([(h["path"], h["start_byte"]) for h in json.loads(p.stdout)["hits"]])
                found += len(set(hits[0]) & set(hits[1]))
            report["search"]["hnsw_recall_at_10_vs_exact"] = round(found / (10 * len(qs)), 4)
        p, _ = run([sembed, "eval", "--data", pairs, "-q", *model, *quant])
        ev = json.loads(p.stdout)
        report["eval_same_pairs"] = {k: round(ev[k], 4) for k in ("ndcg_at_10", "mrr_at_10", "recall_at_1", "recall_at_10")}
        report["eval_same_pairs"]["corpus"] = n
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
