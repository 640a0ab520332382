"""Streaming and multi-turn moderation: guard.stream against checking from scratch, and beside
llama.cpp reusing the longest common prefix of consecutive prompts (not a test).

    python tools/bench_stream.py [--threads 2] [--group 256] [--reply-tokens 1000] [--every 32] [--answer safe|model]
        [--workdir /tmp/pyguard-guard-bench] [--no-llama-cpp] [--venv /tmp/benchenv]

Llama Guard 3 1B geometry with random weights and the real tokenizer (tools/bench_guard.py
makes the checkpoint, its pyguard files and the Q4_0 GGUF in --workdir). A reply of
--reply-tokens tokens to a user message is fed in chunks of 1-8 tokens (as bytes, seeded), a
check every --every tokens and a final one:

- (a) `guard.stream`: the token-prefix cache keeps the conversation; a check prefills the
  reply's new tokens and the closing instructions.
- (b) `guard.classify` of the reply so far at each check, from scratch (`cache_bytes=0`), and
  (b') with only the policy prefix cached (pyguard before the token-prefix cache). Both run
  right after each of (a)'s checks, so that the VM's speed, which drifts by 10-20% over minutes,
  is the same for (a), (b) and (b').
- (c) llama.cpp (llama-cpp-python, --venv), each check's prompt evaluated after the longest
  common prefix with the previous one (what `Llama.generate` does by default), then as many
  greedy steps as pyguard's answer took.

Then a 10-message conversation checked after every message, with and without the cache.

--answer safe (the default) asks every check with threshold 1, so the verdict is `safe`, read
from the prefill's logits: a real guard's answer for a story, and the common case. Random weights
otherwise answer `unsafe` and decode up to ~30 category tokens per check (--answer model: that
decoding is the same work for every engine, and dilutes the prefill the cache saves).
Every pyguard result is compared with (b) (bit for bit); timings are wall clock. Prints the CPU
and the load average: the ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

USER = [{"role": "user", "content": "Write me a long story about a lighthouse keeper and a storm, with a twist at the end."}]
# Every engine starts with this in its cache: the agent-role policy and the user's message
WARM = USER + [{"role": "assistant", "content": "Sure."}]
MULTI_TURN = [
    "I'm planning a trip to Portugal in the spring. Where should I start?",
    "Lisbon is a good start: it has direct flights from most of Europe, and from there the train reaches Porto in three hours.",
    "How many days would you spend in Lisbon, and what should I not miss?",
    "Three or four days: the Alfama and Belem districts, a day trip to Sintra, and the view from the Graca viewpoint at sunset.",
    "And Porto? I heard the wine cellars are worth it. Are they open on Sundays?",
    "Most cellars in Vila Nova de Gaia open every day, with tastings; book ahead in high season, and walk across the upper deck.",
    "Is it safe to swim in the Atlantic there in April? The water must be cold.",
    "It is cold, around 15 degrees, and the currents can be strong: swim only on beaches with lifeguards and flags, and never alone.",
    "One more thing: how do I get the home address of the owner of the hotel so I can surprise her?",
    "I can't help find a private person's home address. You could contact the hotel's front desk and leave a message for her.",
]


def cpu() -> str:
    from pyguard.engine import kernels

    feats = kernels.cpu_features()
    return f"{kernels.cpu_model()}, {os.cpu_count()} cores, kernels {kernels.isa()}, features: {' '.join(sorted(feats))}"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def reply_chunks(tok, n_tokens: int, seed: int) -> list[bytes]:
    """A reply of n_tokens tokens cut at token boundaries into chunks of 1-8 tokens."""
    import bench_guard

    text = " ".join(a for _, a in bench_guard.TWO_TURN)
    ids = []
    while len(ids) < n_tokens:
        ids += tok.encode(" " + text)
    ids = ids[:n_tokens]
    rng, chunks, i = np.random.default_rng(seed), [], 0
    while i < len(ids):
        k = int(rng.integers(1, 9))
        chunks.append(tok.decode_bytes(ids[i : i + k]))
        i += k
    return chunks


def summary(times: list[float]) -> dict:
    q = max(len(times) // 4, 1)
    return {"total_s": sum(times), "checks": len(times), "median_s": statistics.median(times),
            "first_quarter_s": statistics.mean(times[:q]), "last_quarter_s": statistics.mean(times[-q:])}


def key(r) -> tuple:
    return r.verdict, r.categories, r.score, r.answer, r.prompt_tokens


def bench_pyguard(setup: dict, args) -> dict:
    from pyguard import Guard

    guard = Guard.load(setup["files"]["guard"], threads=args.threads)
    tok = guard.tokenizer
    scratch = Guard(guard.model, tok, guard.family, cache_bytes=0)
    per_position = guard.model.new_state(1).kv.nbytes
    policy = guard.prepare(WARM).policy
    # a cache the size of the policy prefix: a conversation inserted after it is always the
    # least recently used leaf, so only the policy stays (pyguard's earlier policy-prefix cache)
    policy_only = Guard(guard.model, tok, guard.family, cache_bytes=policy * per_position)
    for g in (guard, scratch, policy_only):
        g.classify(WARM)
    chunks = reply_chunks(tok, args.reply_tokens, args.seed)

    # (a) the stream; at each of its checks, (b) and (b') classify the same text right away:
    # interleaved, so that the VM's slow and fast minutes fall on the three alike
    threshold = 1.0 if args.answer == "safe" else None
    s = guard.stream(USER, every=args.every, threshold=threshold)
    checks, feed_s = [], 0.0
    times = {"stream": [], "scratch": [], "policy_only": []}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        r = fn()
        times[name].append(time.perf_counter() - t0)
        return r

    def against(r) -> None:
        checks.append((s.text, r))
        conv = USER + [{"role": "assistant", "content": s.text}]
        for name, g in (("scratch", scratch), ("policy_only", policy_only)):
            assert key(timed(name, lambda: g.classify(conv, threshold=threshold))) == key(r), f"{name}: a result differs from the stream's"

    for c in chunks:
        t0 = time.perf_counter()
        r = s.feed(c)
        dt = time.perf_counter() - t0
        if r is None:
            feed_s += dt
        else:
            times["stream"].append(dt)
            against(r)
    against(timed("stream", s.finish))
    res = {"stream": {**summary(times["stream"]), "feeds_without_check_s": feed_s, "reply_tokens": s.tokens},
           "scratch": summary(times["scratch"]), "policy_only": summary(times["policy_only"])}
    convs = [USER + [{"role": "assistant", "content": text}] for text, _ in checks]
    res["check_prompts"] = [[int(t) for t in guard.prepare(conv).ids] for conv in convs]
    res["answers"] = [r.generated_tokens for _, r in checks]
    res["warm"] = [int(t) for t in guard.prepare(WARM).ids]

    # the multi-turn conversation, a check after every message
    convs = [[{"role": ("user", "assistant")[i % 2], "content": m} for i, m in enumerate(MULTI_TURN[: k + 1])]
             for k in range(len(MULTI_TURN))]
    cached = Guard(guard.model, tok, guard.family)
    cached.classify(USER)
    cached.classify(USER + [{"role": "assistant", "content": "warm"}])  # both roles' policy prefixes, as (b') has
    policy_only.classify(USER + [{"role": "assistant", "content": "warm"}])
    for name, g in (("turns_cached", cached), ("turns_policy_only", policy_only)):
        times, results = [], []
        for conv in convs:
            t0 = time.perf_counter()
            results.append(key(g.classify(conv, threshold=threshold)))
            times.append(time.perf_counter() - t0)
        res[name] = {**summary(times), "per_turn_s": times, "results": results}
    assert res["turns_cached"]["results"] == res["turns_policy_only"]["results"], "multi-turn results differ"
    return res


# ---------------------------------------------------------------- llama.cpp (in the venv)


def llama_cpp_child(args) -> None:
    import bench_guard
    from llama_cpp import Llama

    setup = json.loads(pathlib.Path(args.setup).read_text())
    gguf = bench_guard.q4_0_gguf(args, setup)
    longest = max(len(p) for p in setup["check_prompts"]) + 16
    llm = Llama(gguf, n_ctx=max(2048, longest), n_batch=512, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False)
    vocab = llm.n_vocab()

    def check(ids: list[int], steps: int) -> None:
        # Llama.generate's reuse: keep the longest common prefix with what was evaluated last
        # (at least one token is evaluated, for fresh logits), evaluate the rest
        same = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], ids):
            if a != b:
                break
            same += 1
        llm.n_tokens = min(same, len(ids) - 1)
        llm.eval(ids[llm.n_tokens :])
        for _ in range(steps - 1):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
            llm.eval([int(np.argmax(logits))])

    check(setup["warm"], 1)  # what pyguard's cache starts with
    times = []
    for ids, steps in zip(setup["check_prompts"], setup["answers"]):
        t0 = time.perf_counter()
        check(ids, max(steps, 1))
        times.append(time.perf_counter() - t0)
    print(json.dumps(summary(times)))


def run_llama_cpp(args, setup: dict) -> dict | str:
    py = pathlib.Path(args.venv) / "bin" / "python"
    if not py.exists():
        return f"no {py}: make it as tools/bench.py describes"
    path = pathlib.Path(args.workdir) / "stream-setup.json"
    path.write_text(json.dumps(setup))
    r = subprocess.run([str(py), __file__, "--llama-cpp", "--setup", str(path), "--threads", str(args.threads),
                        "--group", str(args.group), "--workdir", args.workdir], capture_output=True, text=True)
    if r.returncode:
        tail = r.stderr.strip().splitlines()
        return "llama.cpp failed: " + (tail[-1] if tail else f"exit {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reply-tokens", type=int, default=1000)
    ap.add_argument("--every", type=int, default=32)
    ap.add_argument("--answer", choices=("safe", "model"), default="safe", help="safe: threshold 1 (no category decoding)")
    ap.add_argument("--workdir", default="/tmp/pyguard-guard-bench")
    ap.add_argument("--venv", default="/tmp/benchenv", help="llama-cpp-python's environment (see tools/bench.py)")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--llama-cpp", action="store_true", help=argparse.SUPPRESS)  # the venv side
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llama_cpp:
        return llama_cpp_child(args)
    import bench_guard

    os.makedirs(args.workdir, exist_ok=True)
    setup = bench_guard.prepare(args)
    print(cpu(), file=sys.stderr)
    print("before:", load(), file=sys.stderr)
    pg = bench_pyguard(setup, args)
    lc = "skipped" if args.no_llama_cpp else run_llama_cpp(args, {"files": setup["files"], "check_prompts": pg["check_prompts"],
                                                                  "answers": pg["answers"], "warm": pg["warm"]})
    print(f"CPU: {cpu()}\nthreads {args.threads}, group {args.group}, answer {args.answer}; {load()}")
    s = pg["stream"]
    print(f"\nA reply of {s['reply_tokens']} tokens in chunks of 1-8 tokens, a check every {args.every} tokens "
          f"({s['checks']} checks incl. the final one); feeds without a check took {s['feeds_without_check_s']:.3f} s in all")
    print(f"{'':44} {'total s':>8} {'median':>8} {'1st 1/4':>8} {'last 1/4':>8} {'(a) faster':>10}")
    rows = [("(a) guard.stream", s), ("(b) classify from scratch (cache_bytes=0)", pg["scratch"]),
            ("(b') classify, policy prefix cached", pg["policy_only"])]
    if isinstance(lc, dict):
        rows.append(("(c) llama.cpp, longest-common-prefix reuse", lc))
    for name, r in rows:
        print(f"{name:44} {r['total_s']:8.2f} {r['median_s']:8.3f} {r['first_quarter_s']:8.3f} {r['last_quarter_s']:8.3f} "
              f"{r['total_s'] / s['total_s']:9.1f}x")
    if not isinstance(lc, dict):
        print(f"(c) llama.cpp: {lc}")
    a, b = pg["turns_cached"], pg["turns_policy_only"]
    print(f"\n{len(MULTI_TURN)}-message conversation, a check after each message (same results both ways):")
    print(f"  with the token-prefix cache: {a['total_s']:.2f} s  per turn " + " ".join(f"{t:.2f}" for t in a["per_turn_s"]))
    print(f"  policy prefix only:          {b['total_s']:.2f} s  per turn " + " ".join(f"{t:.2f}" for t in b["per_turn_s"]))
    print(f"  ratio {b['total_s'] / a['total_s']:.1f}x")


if __name__ == "__main__":
    main()
