#!/usr/bin/env python3
"""Hybrid search's name-match weight, swept on an index kept by bench/heldout_search.py.

    python3 bench/name_match.py KEEP_DIR [--weights 0,0.1,0.15,0.2,0.25,0.3,0.4]
        [--max-queries N] [--seed 7] [--sembed target/release/sembed]

KEEP_DIR is a `--keep` folder of bench/heldout_search.py (its index.sqlite and queries.json). For
each weight the index's stored settings get that `name_weight` (what a model from `sembed adapt`
carries), `sembed serve --index` answers every query in hybrid mode, and NDCG@10 is reported; the
settings are put back as they were at the end. Nothing is re-implemented here: the ranking is the
server's own. Use it on development sets only (the hold-out rule of bench/heldout_search.py).
Loopback only; every loop is bounded by the number of queries.
"""
import argparse
import json
import math
import os
import random
import sqlite3
import sys

from heldout_search import post, rank_of, serve


def settings(db, new=None):
    c = sqlite3.connect(db)
    try:
        old = c.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()[0]
        if new is not None:
            c.execute("UPDATE meta SET value = ? WHERE key = 'settings'", (new,))
            c.commit()
        return old
    finally:
        c.close()


def ndcg_at(sembed, db, queries):
    server, port = serve(sembed, db)
    try:
        total, weights = 0.0, None
        for q in queries:
            r = post(port, "/search", {"query": q["query"], "k": 10, "mode": "hybrid"})
            weights = (r.get("lexical_weight"), r.get("name_weight"))
            rank = rank_of(r["hits"], q)
            if rank:
                total += 1 / math.log2(1 + rank)
        return total / max(1, len(queries)), weights
    finally:
        server.terminate()
        server.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("keep")
    ap.add_argument("--weights", default="0,0.1,0.15,0.2,0.25,0.3,0.4")
    ap.add_argument("--max-queries", type=int, default=0, help="the same seeded sample as heldout_search.py's")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--sembed", default="target/release/sembed")
    a = ap.parse_args()
    db = os.path.join(a.keep, "index.sqlite")
    queries = json.load(open(os.path.join(a.keep, "queries.json")))
    if a.max_queries and len(queries) > a.max_queries:
        queries = random.Random(a.seed).sample(queries, a.max_queries)
    original = settings(db)
    report = {"index": db, "queries": len(queries), "ndcg@10": {}}
    try:
        for w in [float(x) for x in a.weights.split(",")]:
            s = json.loads(original)
            s["name_weight"] = w
            settings(db, json.dumps(s))
            ndcg, used = ndcg_at(os.path.abspath(a.sembed), db, queries)
            if used[1] != w:
                sys.exit(f"the server searched with name weight {used[1]}, not {w}")
            report["ndcg@10"][str(w)] = round(ndcg, 4)
            report["lexical_weight"] = used[0]
            print(f"name weight {w:<5} NDCG@10 {ndcg:.4f}", file=sys.stderr)
    finally:
        settings(db, original)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
