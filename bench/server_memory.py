"""The server's memory over time: RSS at start, after a burst of long inputs, and after it has been idle
long enough to give its scratch back (the batcher releases it after 5 s without work).

    python3 bench/server_memory.py [--sembed target/release/sembed] [--model REF] [--requests 48]
        [--texts 32] [--words 700] [--concurrency 8] [--idle 8] [-- extra `sembed serve` flags]

Starts `sembed serve` on a free loopback port, sends `requests` TEI /embed requests of `texts` long
inputs each (`truncate: true`, so every input fills the model's maximum length) from `concurrency`
threads, and reads VmRSS and VmHWM (peak) from /proc/PID/status. Bounded: every request has a 600 s
timeout and the burst stops at the first error. Standard library only. Prints a Markdown table and a
JSON line.
"""
import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


def post(port, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/embed", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sembed", default="target/release/sembed")
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--words", type=int, default=700)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--idle", type=float, default=8.0)
    ap.add_argument("serve_args", nargs="*")
    a = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [a.sembed, "serve", "--host", "127.0.0.1", "--port", str(port)]
    if a.model:
        cmd += ["-m", a.model]
    cmd += a.serve_args
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        info = None
        while time.time() < deadline:
            if proc.poll() is not None:
                sys.exit(f"sembed serve exited: {proc.stderr.read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=5) as r:
                    info = json.load(r)
                break
            except OSError:
                time.sleep(0.2)
        if info is None:
            sys.exit("sembed serve did not answer /info within 300 s")
        rows = [("loaded, before any request", status(proc.pid))]

        # Long inputs: real-looking code lines, far past the model's maximum length, cut by truncation.
        words = " ".join(f"let value_{i} = compute(input_{i}, {i});" for i in range(a.words // 6 + 1))
        lock = threading.Lock()
        todo = list(range(a.requests))
        errors = []

        def worker():
            while True:
                with lock:
                    if not todo or errors:
                        return
                    i = todo.pop()
                try:
                    out = post(port, {"inputs": [f"{i}-{j} {words}" for j in range(a.texts)], "truncate": True})
                    assert len(out) == a.texts, f"{len(out)} vectors for {a.texts} inputs"
                except Exception as e:  # stop the burst, report below
                    with lock:
                        errors.append(repr(e))

        t = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        burst_s = time.perf_counter() - t
        if errors:
            sys.exit(f"burst failed: {errors[0]}")
        rows.append((f"right after the burst ({a.requests} × {a.texts} long inputs, {burst_s:.1f} s)", status(proc.pid)))
        time.sleep(a.idle)
        rows.append((f"after {a.idle:.0f} s idle", status(proc.pid)))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    models = info.get("models") or [info]
    model = ", ".join(f"{m.get('name')} ({m.get('engine')})" for m in models)
    print(f"model: {model}, serve flags: {' '.join(a.serve_args) or '(none)'}\n")
    print("| when | RSS (MiB) | peak RSS so far (MiB) |")
    print("|---|---:|---:|")
    for name, s in rows:
        print(f"| {name} | {s['VmRSS'] / 2**20:.0f} | {s['VmHWM'] / 2**20:.0f} |")
    print(json.dumps({"model": str(model), "rows": [{"when": n, **s} for n, s in rows]}))


if __name__ == "__main__":
    main()
