"""`pyguard serve` under open-loop load, beside llama.cpp's server (not a test).

    python tools/bench_serve.py [--model FILE] [--threads 2] [--max-queue 64] [--clients 4] [--rounds 2]
        [--duration 30] [--max-requests 3000] [--loads 0.25,0.5,0.8,1,2] [--soak SECONDS]
        [--llama-cpp [--gguf FILE] [--venv /tmp/benchenv]] [--json FILE]

Loopback only; every run is bounded in time (--duration per load level, --soak) and in count
(--max-requests per level). The model: --model, else tools/bench_guard.py's random-weight
Llama Guard 3 1B (guard head, made in /tmp/pyguard-guard-bench on first use).

1. Capacity: --clients in a closed loop for --duration: completed requests per second; the
   servers (both up) take turns for --rounds, the best round of each counts.
2. Open loop at fractions of that capacity (--loads): requests sent at Poisson arrival times
   whatever the answers (a client that does not wait, as real traffic); per level:
   throughput, p50/p99 latency of the answered (200) requests, the share of 429s and their
   p99 latency, 5xx count, and the server's RSS (sampled every 10 s).
3. --soak SECONDS: 80% of capacity for that long (one open loop), the same figures (flat RSS:
   no leak). pyguard only.
4. --llama-cpp: llama.cpp's server (`python -m llama_cpp.server` from --venv, which needs
   `pip install 'llama-cpp-python[server]'`) on the Q4_0 GGUF of the same int4 weights
   (tools/bench.py's writer, here with the real Llama 3 vocabulary: byte-level BPE, merges
   rebuilt from the tiktoken ranks, so llama.cpp tokenizes text into pyguard's very tokens;
   or --gguf FILE), sent the same conversations as the Llama Guard prompt text on
   /v1/completions (greedy, two tokens: a real model's `safe` and <|eot_id|>; its server
   reuses the previous prompt's common prefix, the policy): its capacity and the levels up
   to 1 (beyond, its unbounded queue only grows).

Each request is one conversation from tools/bench_guard.py's set (one- and two-turn), made
unique by a number at the start of its first message (no server answers a repeat from a cache).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list of a tiktoken vocabulary: tiktoken joins any two adjacent parts whose
    concatenation is a token, lowest token rank first, so every split of a token into two
    tokens is a merge of that token's rank (as Hugging Face's tiktoken converter lists them)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(splits, key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))
    return merges


def write_text_gguf(pgw: str, tokenizer_model: str, out: str) -> None:
    """tools/bench.py's Q4_0 GGUF of a pyguard file (full head), with the real vocabulary in
    place of bench.py's placeholder (its writer calls are redirected: it stays the one GGUF
    writer). Runs in the llama-cpp-python environment (the gguf package)."""
    import base64

    import bench
    import gguf

    from pyguard.formats import file
    from pyguard.formats.tokenizer import Tokenizer

    ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in open(tokenizer_model) if line.strip())}
    special = Tokenizer.from_file(tokenizer_model).special_tokens
    byte_char = {b: chr(c) for b, c in zip(*_bytes_to_unicode())}
    text = lambda b: "".join(byte_char[x] for x in b)
    tokens = [text(t) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    tokens += [name for name, _ in sorted(special.items(), key=lambda kv: kv[1])]
    types = [1] * len(ranks) + [3] * len(special)
    merges = [f"{text(a)} {text(b)}" for a, b in bpe_merges(ranks)]

    class Writer(gguf.GGUFWriter):
        def add_tokenizer_model(self, model: str) -> None:
            super().add_tokenizer_model("gpt2")
            super().add_tokenizer_pre("llama-bpe")

        def add_token_list(self, _) -> None:
            super().add_token_list(tokens)
            super().add_token_merges(merges)

        def add_token_scores(self, _) -> None:
            pass

        def add_token_types(self, _) -> None:
            super().add_token_types(types)

        def add_bos_token_id(self, _) -> None:
            super().add_bos_token_id(special["<|begin_of_text|>"])

        def add_eos_token_id(self, _) -> None:
            super().add_eos_token_id(special["<|eot_id|>"])

    f = file.load(pgw)
    plain, gguf.GGUFWriter = gguf.GGUFWriter, Writer
    try:
        bench.write_gguf(out + ".part", f.config, f.tensors)
    finally:
        gguf.GGUFWriter = plain
    os.replace(out + ".part", out)


def _bytes_to_unicode() -> tuple[list[int], list[int]]:
    """GPT-2's printable stand-ins for bytes, as byte-level BPE vocabularies spell tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return bs, cs


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
        self.url = None
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
        if not found.wait(timeout) or self.url is None:
            self.stop()
            raise SystemExit("server did not start:\n" + "\n".join(self.lines[-20:]))

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


_serial = itertools.count()


def unique(conv: list) -> list:
    """The conversation with a request number at the start of its first message: live traffic
    repeats the policy, not the messages, so neither server may answer a repeat from a cache
    (pyguard's token-prefix cache would skip a repeated conversation's prefill)."""
    first = dict(conv[0], content=f"[{next(_serial)}] {conv[0]['content']}")
    return [first, *conv[1:]]


def pyguard_request(conv) -> tuple[str, dict]:
    """threshold 1: every verdict `safe` (most live traffic), read from the prefill's logits, the
    work of a real model's safe answer; random weights mostly answer unsafe with many codes,
    which llama.cpp's two tokens below do not decode either."""
    return "/v1/classify", {"messages": unique(conv), "threshold": 1.0}


def llama_request(prompt_text):
    """The Llama Guard prompt and "\n\n" (the assistant header's end, as Llama 3's chat
    template ends it), two greedy tokens: a real model's safe answer, `safe` and <|eot_id|>
    (one decode step: the stop token is never evaluated). Random weights do not stop early."""
    def make(conv) -> tuple[str, dict]:
        return "/v1/completions", {"prompt": prompt_text(unique(conv)) + "\n\n", "max_tokens": 2, "temperature": 0}
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


def level(name: str, url: str, make, convs: list, rate: float, duration: float, cap: int, pid: int) -> dict:
    """open_loop, the server's RSS sampled every 10 s meanwhile."""
    rss, stop = [rss_mb(pid)], threading.Event()

    def sample():
        while not stop.wait(10):
            rss.append(rss_mb(pid))
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        r = asyncio.run(open_loop(url, make, convs, rate, duration, cap))
    finally:
        stop.set()
        t.join()
    r["rss_mb"] = rss + [rss_mb(pid)]
    print(f"  {name}: {r['sent']:5d} sent, {r['throughput']:6.2f} req/s, p50 {r['p50_ms']:7.0f} ms, "
          f"p99 {r['p99_ms']:7.0f} ms, 429 {100 * r['share_429']:4.1f}% (p99 {r['p99_429_ms']:.1f} ms), "
          f"5xx {r['5xx']}, dropped {r['dropped']}, other {r['other']}, "
          f"RSS {r['rss_mb'][0]:.0f} .. {max(r['rss_mb']):.0f} .. {r['rss_mb'][-1]:.0f} MB", file=sys.stderr, flush=True)
    return r


def warm_up(url: str, make, convs: list) -> None:
    import httpx

    for c in convs[:2]:  # first allocations
        path, body = make(c)
        httpx.post(url + path, json=body, timeout=300).raise_for_status()


def run(server: Process, make, convs: list, args, cap: float, loads: list[float], soak: float) -> dict:
    """The open-loop levels (fractions of cap) and the soak."""
    pid, levels = server.proc.pid, []
    for f in loads:
        r = level(f"{f:4.2f} x", server.url, make, convs, f * cap, args.duration, args.max_requests, pid)
        r["load"] = f
        levels.append(r)
    res = {"capacity": cap, "levels": levels}
    if soak:
        res["soak"] = level(f"soak 0.80 x {soak:.0f} s", server.url, make, convs, 0.8 * cap, soak, 1 << 30, pid)
    return res


def llama_cpp_server(args, setup: dict | None, model: str, venv_py: str, convs: list) -> tuple:
    """llama.cpp's server on the GGUF (written on first use), its request maker and levels."""
    import httpx

    from pyguard import Guard, format_prompt
    from pyguard.guard.prompt import prompt_tokens

    if not args.gguf:
        if setup is None:
            raise SystemExit("--llama-cpp with --model needs --gguf (a GGUF of that model)")
        args.gguf = str(pathlib.Path(args.workdir) / f"guard1b-g{args.group}-vocab.gguf")
        if not os.path.exists(args.gguf):
            tok = str(pathlib.Path(setup["hf"]) / "original" / "tokenizer.model")
            subprocess.run([venv_py, __file__, "--write-gguf", setup["files"]["full"], tok, args.gguf], check=True)
    guard = Guard.load(model, threads=1)
    text = lambda conv: format_prompt(conv, family=guard.family)
    port = 18000 + random.Random().randrange(1000)
    cmd = [venv_py, "-m", "llama_cpp.server", "--model", args.gguf, "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", "2048"]
    server = Process(cmd, lambda line: f"http://127.0.0.1:{port}" if "Uvicorn running" in line else None)
    got = httpx.post(server.url + "/extras/tokenize", json={"input": text(convs[0]) + "\n\n"}, timeout=60).json()["tokens"]
    got = got[1:] if got[:1] == got[1:2] else got  # this endpoint adds a BOS; /v1/completions does not
    want = prompt_tokens(guard.tokenizer, convs[0], family=guard.family) + guard.start_ids
    print(f"llama.cpp tokenizes the prompt into {len(got)} tokens, pyguard {len(want)}"
          f"{' (the same)' if got == want else ' (DIFFERENT: the comparison is off)'}", file=sys.stderr)
    return server, llama_request(text), [f for f in args.loads if f <= 1], 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="pyguard file (default: bench_guard's random 1B, guard head)")
    ap.add_argument("--workdir", default="/tmp/pyguard-guard-bench")
    ap.add_argument("--group", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--clients", type=int, default=4, help="closed-loop clients for the capacity (default 4)")
    ap.add_argument("--rounds", type=int, default=2, help="capacity turns of each server (default 2: the best)")
    ap.add_argument("--duration", type=float, default=30, help="seconds per load level (default 30)")
    ap.add_argument("--max-requests", type=int, default=3000, help="requests per level at most (default 3000)")
    ap.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5, 0.8, 1.0, 2.0])
    ap.add_argument("--soak", type=float, default=0, help="seconds at 80%% of capacity, RSS sampled (default 0: none)")
    ap.add_argument("--llama-cpp", action="store_true", help="compare with llama.cpp's server")
    ap.add_argument("--gguf", help="llama.cpp's model (default: the same weights written by write_text_gguf)")
    ap.add_argument("--write-gguf", nargs=3, metavar=("PGW", "TOKENIZER", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--venv", default="/tmp/benchenv", help="the environment with llama-cpp-python[server]")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.write_gguf:  # the child in llama-cpp-python's environment
        write_text_gguf(*args.write_gguf)
        return
    venv_py = str(pathlib.Path(args.venv) / "bin" / "python")
    if args.llama_cpp and (not os.path.exists(venv_py)
                           or subprocess.run([venv_py, "-c", "import gguf, llama_cpp.server"]).returncode):
        raise SystemExit(f"--llama-cpp needs llama-cpp-python's server and gguf in {args.venv} (~15 minutes: it compiles "
                         f"llama.cpp): python -m venv {args.venv} && CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON "
                         f"-DGGML_FMA=ON -DGGML_F16C=ON' {args.venv}/bin/pip install numpy cffi tiktoken gguf "
                         "'llama-cpp-python[server]'")
    args.clients = min(args.clients, args.max_queue)  # closed loop: never more waiting than the queue holds (no 429s)

    import bench_guard

    one, two = bench_guard.conversations()
    convs = one + two
    setup = None if args.model else bench_guard.prepare(args)
    model = args.model or setup["files"]["guard"]
    servers: dict[str, tuple[Process, object, list[float], float]] = {}
    try:
        cmd = [sys.executable, "-m", "pyguard.cli", "serve", "-m", model, "--port", "0", "--threads", str(args.threads),
               "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
        ready = lambda line: line.split(" on ")[1].split()[0] if line.startswith("pyguard serve:") and " on http://" in line else None
        servers["pyguard"] = (Process(cmd, ready), pyguard_request, args.loads, args.soak)
        if args.llama_cpp:
            servers["llama.cpp"] = llama_cpp_server(args, setup, model, venv_py, convs)
        # capacity: the servers take turns (the machine's state drifts), the best round of each
        caps: dict[str, list[float]] = {name: [] for name in servers}
        for name, (server, make, _, _) in servers.items():
            warm_up(server.url, make, convs)
        for r in range(args.rounds):
            for name, (server, make, _, _) in servers.items():
                caps[name].append(asyncio.run(closed_loop(server.url, make, convs, args.clients, args.duration,
                                                          args.max_requests)))
                print(f"{name}: capacity {caps[name][-1]:.3f} req/s (round {r + 1}, closed loop, {args.clients} clients); "
                      f"RSS {rss_mb(server.proc.pid):.0f} MB", file=sys.stderr, flush=True)
        out = {}
        for name, (server, make, loads, soak) in servers.items():
            print(f"{name}: open loop at fractions of {max(caps[name]):.3f} req/s", file=sys.stderr, flush=True)
            out[name] = run(server, make, convs, args, max(caps[name]), loads, soak) | {"capacity_rounds": caps[name]}
    finally:
        for server, *_ in servers.values():
            server.stop()
    if args.llama_cpp:
        print(f"capacity ratio pyguard / llama.cpp: {out['pyguard']['capacity'] / out['llama.cpp']['capacity']:.2f}",
              file=sys.stderr)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
