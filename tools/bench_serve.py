"""`pyguard serve` under open-loop load, beside llama.cpp's server (not a test).

    python tools/bench_serve.py [--model FILE] [--threads 2] [--duration 10] [--max-requests 3000]
        [--loads 0.25,0.5,0.8,1,2] [--soak SECONDS] [--gguf FILE --venv /tmp/benchenv]

Loopback only; every run is bounded in time (--duration per load level, --soak) and in count
(--max-requests per level). The model: --model, else tools/bench_guard.py's random-weight
Llama Guard 3 1B (guard head, made in /tmp/pyguard-guard-bench on first use).

1. Capacity: max-queue clients in a closed loop for --duration: completed requests per second.
2. Open loop at fractions of that capacity (--loads): requests sent at Poisson arrival times
   whatever the answers (a client that does not wait, as real traffic); per level:
   throughput, p50/p99 latency of the answered (200) requests, the share of 429s and their
   p99 latency, 5xx count, and the server's RSS.
3. --soak SECONDS: 80% of capacity for that long, RSS sampled every 10 s (flat = no leak).
4. --gguf FILE: llama.cpp's server (`python -m llama_cpp.server` from --venv, which needs
   `pip install 'llama-cpp-python[server]'`) on a Q4_0 GGUF of the same model with its real
   tokenizer, sent the same conversations as the Llama Guard prompt text on /v1/completions
   (greedy, up to 10 tokens: the verdict): its capacity and the same open-loop levels. The
   GGUFs tools/bench.py writes have a placeholder vocabulary (they are fed token ids), so
   they cannot serve text; convert a real checkpoint (llama.cpp's convert_hf_to_gguf.py).

Each request is one conversation from tools/bench_guard.py's set (one- and two-turn).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Process:
    """A server subprocess; ready when `ready(line)` matches a line of its output."""

    def __init__(self, cmd: list[str], ready, timeout: float = 300):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        found = threading.Event()

        def read():
            for line in self.proc.stdout:
                if len(self.lines) < 1000:  # bounded: the request log is not kept
                    self.lines.append(line.rstrip())
                if not found.is_set() and ready(line):
                    self.url = ready(line)
                    found.set()
            found.set()
        threading.Thread(target=read, daemon=True).start()
        if not found.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise SystemExit("server did not start:\n" + "\n".join(self.lines[-20:]))

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def pyguard_request(conv) -> tuple[str, dict]:
    return "/v1/classify", {"messages": conv}


def llama_request(prompt_text):
    def make(conv) -> tuple[str, dict]:
        return "/v1/completions", {"prompt": prompt_text(conv), "max_tokens": 10, "temperature": 0}
    return make


async def closed_loop(url: str, make, convs: list, clients: int, duration: float, cap: int) -> float:
    """Completed requests per second with `clients` always waiting on an answer."""
    import httpx

    done, stop = 0, time.perf_counter() + duration
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as client:
        async def worker(k: int):
            nonlocal done
            i = k
            while time.perf_counter() < stop and done < cap:
                path, body = make(convs[i % len(convs)])
                r = await client.post(url + path, json=body)
                done += r.status_code == 200
                i += clients
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        return done / (time.perf_counter() - t0)


async def open_loop(url: str, make, convs: list, rate: float, duration: float, cap: int, seed: int = 0) -> dict:
    """Poisson arrivals at `rate` per second for `duration` (at most `cap` requests)."""
    import httpx

    rng = random.Random(seed)
    out: list[tuple[int, float]] = []
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=None)) as client:
        async def one(i: int):
            path, body = make(convs[i % len(convs)])
            t = time.perf_counter()
            try:
                status = (await client.post(url + path, json=body)).status_code
            except httpx.HTTPError:
                status = 0  # no status at all: a dropped connection
            out.append((status, time.perf_counter() - t))
        tasks, t0, at = [], time.perf_counter(), 0.0
        while at < duration and len(tasks) < cap:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(len(tasks))))
            at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    ok = [s for st, s in out if st == 200]
    busy = [s for st, s in out if st == 429]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")
    return {"sent": len(out), "rate": rate, "throughput": len(ok) / elapsed, "p50_ms": pct(ok, 50), "p99_ms": pct(ok, 99),
            "share_429": len(busy) / len(out), "p99_429_ms": pct(busy, 99), "5xx": sum(st >= 500 for st, _ in out),
            "dropped": sum(st == 0 for st, _ in out), "other": sorted({st for st, _ in out} - {0, 200, 429} - set(range(500, 600)))}


def run(name: str, server: Process, url: str, make, convs: list, args) -> dict:
    cap = asyncio.run(closed_loop(url, make, convs, args.clients, args.duration, args.max_requests))
    print(f"{name}: capacity {cap:.1f} req/s (closed loop, {args.clients} clients); RSS {rss_mb(server.proc.pid):.0f} MB",
          file=sys.stderr)
    levels = []
    for f in args.loads:
        r = asyncio.run(open_loop(url, make, convs, f * cap, args.duration, args.max_requests))
        r["load"], r["rss_mb"] = f, rss_mb(server.proc.pid)
        print(f"  {f:4.2f} x: {r['sent']:5d} sent, {r['throughput']:6.1f} req/s, p50 {r['p50_ms']:7.1f} ms, "
              f"p99 {r['p99_ms']:7.1f} ms, 429 {100 * r['share_429']:4.1f}% (p99 {r['p99_429_ms']:.1f} ms), "
              f"5xx {r['5xx']}, dropped {r['dropped']}, RSS {r['rss_mb']:.0f} MB", file=sys.stderr)
        levels.append(r)
    res = {"capacity": cap, "levels": levels}
    if args.soak:
        rss, stop = [], time.perf_counter() + args.soak
        while time.perf_counter() < stop:
            asyncio.run(open_loop(url, make, convs, 0.8 * cap, min(10, args.soak), args.max_requests))
            rss.append(rss_mb(server.proc.pid))
        res["soak_rss_mb"] = rss
        print(f"  soak at 0.8 x for {args.soak:.0f} s: RSS {rss[0]:.0f} .. {max(rss):.0f} .. {rss[-1]:.0f} MB", file=sys.stderr)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="pyguard file (default: bench_guard's random 1B, guard head)")
    ap.add_argument("--workdir", default="/tmp/pyguard-guard-bench")
    ap.add_argument("--group", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--duration", type=float, default=10, help="seconds per load level (default 10)")
    ap.add_argument("--max-requests", type=int, default=3000, help="requests per level at most (default 3000)")
    ap.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5, 0.8, 1.0, 2.0])
    ap.add_argument("--soak", type=float, default=0, help="seconds at 80%% of capacity, RSS sampled (default 0: none)")
    ap.add_argument("--gguf", help="a Q4_0 GGUF of the same model with its real tokenizer, for llama.cpp's server")
    ap.add_argument("--venv", default="/tmp/benchenv", help="the environment with llama-cpp-python[server]")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    args.clients = args.max_queue  # closed loop: never more waiting than the queue holds (no 429s)

    import bench_guard

    one, two = bench_guard.conversations()
    convs = one + two
    model = args.model or bench_guard.prepare(args)["files"]["guard"]
    out = {}
    cmd = [sys.executable, "-m", "pyguard.cli", "serve", "-m", model, "--port", "0", "--threads", str(args.threads),
           "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
    ready = lambda line: line.split(" on ")[1].split()[0] if line.startswith("pyguard serve:") and " on http://" in line else None
    server = Process(cmd, ready)
    try:
        out["pyguard"] = run("pyguard serve", server, server.url, pyguard_request, convs, args)
    finally:
        server.stop()
    if args.gguf:
        from pyguard import Guard, format_prompt

        guard = Guard.load(model, threads=1)
        text = lambda conv: format_prompt(conv, family=guard.family)
        port = 18000 + random.Random().randrange(1000)
        cmd = [str(pathlib.Path(args.venv) / "bin" / "python"), "-m", "llama_cpp.server", "--model", args.gguf,
               "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(args.threads), "--n_ctx", "2048"]
        ready = lambda line: f"http://127.0.0.1:{port}" if "Uvicorn running" in line else None
        server = Process(cmd, ready)
        try:
            out["llama.cpp"] = run("llama.cpp server", server, server.url, llama_request(text), convs, args)
        finally:
            server.stop()
        print(f"capacity ratio pyguard / llama.cpp: {out['pyguard']['capacity'] / out['llama.cpp']['capacity']:.1f}",
              file=sys.stderr)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
