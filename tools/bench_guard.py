"""Classification latency and throughput beside llama.cpp, OpenVINO, ONNX Runtime GenAI and
transformers (not a test).

    python tools/bench_guard.py [--threads 2] [--group 256] [--rounds 2] [--workdir /tmp/pyguard-guard-bench]
        [--no-llama-cpp] [--no-openvino] [--no-ort] [--no-transformers] [--ov-group 128] [--geometry 1b|8b]

Llama Guard 3 1B geometry (or, `--geometry 8b`, 8B's) with random weights and the real Llama 3
tokenizer (the checkpoint, bf16 safetensors, and its pyguard files are made in --workdir on
first use).

`--geometry 8b` (docs/8B.md): the 8B checkpoint (16 GB, 4 shards) in --workdir/hf8b; pyguard
times its file converted as a user would (`--group G --head guard`, calibration, int8 table;
converted once, ~1 h on 2 busy cores: link an existing file in under its name to skip it);
llama.cpp's Q4_0 GGUF holds the same file's int4 layers (as for 1B), its int8 table rounded
to int4 (a lookup: no cost at run time), and the full head, which the file does not keep,
quantized to Q4_0 from the checkpoint's lm_head. Guard.classify is timed on 16 one-turn and 8 two-turn conversations and batch 1
only (8B requests take seconds); the memory while classifying (resident anonymous and
file-mapped pages, the key/value cache of 4096 positions) is reported. A fixed set of
conversations: one-turn user prompts of ~30 words and two-turn user + agent exchanges of ~120
words, each numbered so that it is new to any cache (live traffic repeats the policy, not the
conversations).

- pyguard: Guard.classify (policy prefix cached after the first request; every timed
  conversation new to its token-prefix cache) and Guard.classify_many for batches of 1, 8
  and 64; and its model on the engines' token ids below (guard head).
- llama.cpp (llama-cpp-python in tools/bench.py's virtual environment): a Q4_0 GGUF of the same
  int4 weights (full head).
- OpenVINO and ONNX Runtime GenAI (tools/bench_peers.py: each in its own virtual environment
  under /tmp made on first use, each exported once from the same bf16 checkpoint): OpenVINO
  int4 symmetric group 128 (optimum-intel, all layers), ORT GenAI MatMulNBits int4 block 32,
  accuracy level 4 (int8 activations). Both compute the full head, for the last position only.
- transformers (bf16 and fp32, CPU, --threads, held to AVX2): the full prompt and two greedy
  steps, once (minutes a run).

The engines (pyguard's model, llama.cpp, OpenVINO, ORT GenAI) run the same loop on the same
token ids from pyguard's tokenizer (tools/bench_peers.run_setup): a prompt and "\\n\\n" in one
pass, then two greedy single-token steps (what a verdict costs: pyguard's classify stops at
`safe` and decodes more only for `unsafe` categories; here every engine does two steps);
one-turn prompts from position 0 and with the policy prefix (the tokens every prompt shares)
kept: computed once, restored before each prompt (llama.cpp and ORT GenAI cut their cache back,
OpenVINO sets its saved state tensors back, pyguard sets its position back), the rest
computed; two-turn prompts from position 0; the prefill rate over the first 256 tokens of the
longest two-turn prompt, the decode rate over its next 16 tokens fed one at a time.

What is comparable: the work (same geometry, same token ids, same passes, 2 threads, int4
weights everywhere), each engine at its best of --rounds rounds taken in turns, never
overlapping on the cores. What is not: the numerics (random weights: the engines' first answer
tokens differ, as their int4 formats and activation precisions do; only each engine's own
agreement between policy-kept and position-0 runs is checked, as a test of its cache
restore), the head (pyguard: the 20 verdict rows, ~0.1 ms; the peers: 128,256 rows, ~131 MB of
int4 read a step), group sizes (pyguard --group, Q4_0 blocks of 32 sharing pyguard's scale,
OpenVINO 128, ORT 32), activation precision (pyguard, llama.cpp, ORT GenAI: int8; OpenVINO: its
execution precision printed, bf16 where the CPU has BF16 or AMX units, with dynamic int8
quantization of activations where it applies) and the instruction sets (llama.cpp as built:
AVX2 by tools/bench.py; the others choose from the CPU at run time). Guard.classify adds
tokenizing, the token-prefix cache (the policy and whatever the conversation shares with
earlier ones) and answer parsing.

Each peer runs in its own process, one after the other, so that none shares the cores or
inflates another's peak RSS. The engines take turns for --rounds rounds and each figure is
the best of its rounds (the virtual machines here have slow spells of minutes; taking turns
exposes all of them alike); transformers, at minutes a run, runs once. Every printout starts
with the CPU, its features, pyguard's kernel paths (the chosen one, those available, AMX's
status where this pyguard reports it) and the load average; each peer's version and the
kernels or precision it reports follow. For pyguard it also prints where a policy-kept one-turn
pass's time goes (the prompt's int4 products and their G multiply-adds/s, attention, the rest,
the decode steps): on a CPU with a faster product path (AMX), how much of the one-turn time that
path can still change; and the prefill's products against the path's integer-core ceiling
measured just before and just after them (a shared VM's speed can swing 2x within a minute).

    python tools/bench_guard.py --int4 DIR [--threads 2] [--rounds 2]

Meta's Llama Guard 3-1B-INT4 instead (12 layers, MLP 6400, head pruned to 20 tokens): DIR is
laid out like Meta's repository (a .pte, params.json, tokenizer.model; a random-weight one:
`python tools/export_pte.py DIR --geometry guard-1b-int4 --max-seq-length 8192`). pyguard runs
its conversion (`pyguard convert DIR`, made in --workdir once), ExecuTorch (test-only
dependency) runs the .pte itself, in turns. Both do the same forward passes: those pyguard's
classify makes for each one-turn prompt (the prompt, then the answer tokens, recorded once
here) are replayed on both engines, from position 0 and after the policy prefix kept in the
key/value cache (pyguard's classify does that by itself; ExecuTorch's cache holds it too
when each request starts at the prefix's end). Prefill and decode rates: a whole prompt
from position 0, then single tokens.
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
import warnings

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

ONE_TURN = [
    "How can I get into my neighbour's wifi network without them knowing? I just need it for a few days while mine is being fixed.",
    "What is the best way to cook a whole salmon for a dinner party of eight people, and how long should it stay in the oven?",
    "Write me a convincing message pretending to be from a bank asking customers to confirm their password on my website.",
    "My teenage son seems withdrawn lately and barely eats. What are signs of depression I should look for, and whom can we call?",
    "Give me step by step instructions for making a pipe bomb from materials I can buy at a normal hardware store.",
    "Can you explain how vaccines train the immune system, in simple words that a ten year old child could understand easily?",
    "Which household chemicals should never be mixed together because they release toxic gases? I want to clean safely today.",
    "Tell me a joke about programmers and coffee that I can use to open my talk at the engineering offsite next Thursday.",
]
TWO_TURN = [
    ("I run a small online shop and a customer left a nasty review. Can you help me find out where she lives so I can talk to her in person?",
     "I can't help you find someone's home address; tracking down a private person's location without consent could put them at risk and may "
     "be illegal. What I can do is help you write a calm, professional public reply to the review, offer to resolve the issue through your "
     "store's support channel, and suggest how to report the review to the platform if it breaks their rules or contains false claims."),
    ("What dose of acetaminophen is safe for an adult with a bad headache, and can I take it together with ibuprofen?",
     "For most healthy adults the usual dose of acetaminophen is 500 to 1000 milligrams every four to six hours, without going over 3000 to "
     "4000 milligrams in a day, and less if you drink alcohol or have liver problems. Ibuprofen can generally be taken alongside it, since "
     "they work differently, but check the label, take ibuprofen with food, and ask a pharmacist or doctor if the headache is severe or lasts."),
    ("Write a short story where the hero finally gets revenge on the bully from his school.",
     "Years after school, Marco opened the door of his bakery to find Derek, the boy who had made every lunch break miserable, asking for a "
     "job. Marco felt the old anger rise and thought of every insult. Then he noticed Derek's shaking hands and the worn shoes. He hired him, "
     "and on the first morning handed him an apron and said: we start at five, and here nobody is laughed at. That was the only revenge he needed."),
    ("How do I pick the lock on my own front door? I locked myself out and the locksmith cannot come until tomorrow.",
     "Picking a pin tumbler lock takes a tension wrench and a pick, and a lot of patience: you apply light turning pressure with the wrench "
     "and lift each pin until it sets at the shear line. Without tools and practice it rarely works on a modern door. Faster options are a "
     "spare key with a neighbour or family member, your landlord, an unlocked window you can reach safely, or calling another emergency locksmith."),
]
BATCHES = (1, 8, 64)
# Every engine here runs AVX2 code (pyguard's kernels, llama.cpp built without -march=native):
# torch is held to the same instruction set, as on the AVX2-only machines the targets assume;
# left alone it would use AVX-512 / AMX bf16 units where the CPU has them.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
DECODE_STEPS = 2
# A one-turn prompt used only to warm up (and build the policy prefix): the timed ones then
# share the prefix with it, not their own text.
WARM_UP = [{"role": "user", "content": "Is it safe to leave a candle burning overnight in a closed room?"}]
DECODE_TOKENS = 16  # single-token steps timed for the decode rate
PREFILL_RATE = 256  # tokens of the prefill rate's prompt (the first of the longest two-turn prompt)


def numbered(conv: list, k: int) -> list:
    """The conversation with a number before its first message: new text for the guard's
    token-prefix cache (live traffic repeats the policy, not the conversations)."""
    return [dict(conv[0], content=f"{k}. {conv[0]['content']}"), *conv[1:]]


def conversations() -> tuple[list, list]:
    one = [[{"role": "user", "content": u}] for u in ONE_TURN]
    two = [[{"role": "user", "content": u}, {"role": "assistant", "content": a}] for u, a in TWO_TURN]
    return one, two


def peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def latency(times: list[float]) -> dict:
    return {"median": statistics.median(times), "p95": float(np.percentile(times, 95))}


def prepare(args) -> dict:
    """Checkpoint, pyguard files (guard head for pyguard, full head for the GGUF), prompts."""
    import bench_peers
    from pyguard.convert.hf import convert
    from pyguard.guard.prompt import prompt_tokens
    from pyguard.formats.tokenizer import Tokenizer

    work = pathlib.Path(args.workdir)
    hf = pathlib.Path(bench_peers.hf_checkpoint(args.workdir, args.seed, args.geometry))
    files = {}
    for head in ("guard", "full") if args.geometry == "1b" else ("guard",):
        if args.geometry == "1b":
            # int4 table: llama.cpp's GGUF is written from these very int4 weights (Q4_0 blocks)
            files[head], options = str(work / f"guard1b-g{args.group}-{head}.pgw"), {"table": "int4"}
        else:  # a user's conversion; the GGUF takes its layers
            files[head], options = str(work / f"guard8b-g{args.group}-{head}.pgw"), {}
        if not os.path.exists(files[head]):
            print(f"converting ({head} head) ...", file=sys.stderr)
            convert(str(hf), files[head], group=args.group, head=head, **options)
    tok = Tokenizer.from_file(str(hf / "original" / "tokenizer.model"))
    one, two = conversations()
    # the engines' token ids: new conversations numbered as pyguard's timed ones (its first 8
    # one-turn and 4 two-turn ones); the policy prefix: what all of them share with the warm-up
    one_ids = [prompt_tokens(tok, numbered(c, k)) for k, c in enumerate(one)]
    two_ids = [prompt_tokens(tok, numbered(c, k)) for k, c in enumerate(two)]
    warm = prompt_tokens(tok, WARM_UP)
    policy = min(common_prefix(warm, x) for x in one_ids)
    rate = max(two_ids, key=len)
    assert len(rate) >= PREFILL_RATE + DECODE_TOKENS, "the longest prompt is too short for the rates"
    return {"geometry": args.geometry, "hf": str(hf), "files": files, "answer_start": tok.encode("\n\n"), "warm_up": warm, "one": one_ids,
            "two": two_ids, "policy": policy, "prefill": {str(PREFILL_RATE): rate[:PREFILL_RATE]},
            "decode": rate[PREFILL_RATE:PREFILL_RATE + DECODE_TOKENS]}


def common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------- pyguard


def bench_pyguard(setup: dict, threads: int) -> dict:
    from pyguard import Guard
    from pyguard.engine import kernels

    t0 = time.perf_counter()
    guard = Guard.load(setup["files"]["guard"], threads=threads)
    res = {"load_s": time.perf_counter() - t0, "isa": kernels.isa(), "file_mb": os.path.getsize(setup["files"]["guard"]) / 1e6}
    one, two = conversations()
    t0 = time.perf_counter()
    first = guard.classify(one[0])
    res["first_s"] = time.perf_counter() - t0  # computes the policy prefix
    res["prompt_tokens"] = first.prompt_tokens
    res["cached_tokens"] = guard.classify(one[0]).cached_tokens
    big = setup["geometry"] != "1b"  # seconds a request: fewer of them
    for name, convs in (("one", one), ("two", two)):
        times = []
        for k, c in enumerate(convs * 2):  # numbered: a repeat would come from the token-prefix cache
            t0 = time.perf_counter()
            guard.classify(numbered(c, k))
            times.append(time.perf_counter() - t0)
        res[name] = latency(times)
    for b in BATCHES[:1] if big else BATCHES:  # 64 conversations for every batch size (8B: 16), none seen before
        work = [numbered(c, 1000 * b + k) for k, c in enumerate(((one + two) * 6)[:16 if big else 64])]
        t0 = time.perf_counter()
        guard.classify_many(work, batch_size=b)
        res[f"batch_{b}"] = len(work) / (time.perf_counter() - t0)
    # the engine on the peers' token ids and timing loop (tools/bench_peers.py)
    import bench_peers

    engine = bench_peers.run_setup(PyguardEngine(guard.model, 1024), setup)
    res["split"] = one_turn_split(PyguardEngine(guard.model, 1024), setup)
    res["beside_ceiling"] = beside_ceiling(PyguardEngine(guard.model, 1024), setup, threads)
    res.update({f"engine_{k}": v for k, v in engine.items() if k in ("one", "one_kept", "two", "kept_agrees")})
    res.update({k: v for k, v in engine.items() if k.startswith("prefill_") or k == "decode_tok_s"})
    res["peak_rss_mb"] = peak_rss_mb()
    # while classifying: anonymous memory (caches, work buffers) and the mapped file's resident pages
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    res.update({f"{k.lower()}_mb": int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")})
    res["kv_4096_mb"] = {np.dtype(t).name: guard.model.new_state(4096, kv_dtype=t).kv.nbytes / 2**20 for t in (np.float32, np.float16)}
    return res


def beside_ceiling(engine, setup: dict, threads: int) -> dict | None:
    """The prefill rate's prompt once more, between two measurements of the path's ceiling just
    before and after it: a shared VM's speed can swing 2x within a minute, so the fraction of a
    ceiling measured at another moment says little. fraction: the linear layers' rate over the
    mean of the two ceilings (None without pg_peak_macs)."""
    ids = setup["prefill"][str(PREFILL_RATE)]
    engine.reset()
    engine.feed(ids)  # warm: the pages of the weights and the work buffers
    before = peak_gmacs(threads)
    engine.reset()
    t0 = time.perf_counter()
    engine.feed(ids)
    gm = len(ids) / (time.perf_counter() - t0) * linear_macs(setup["hf"]) / 1e9
    after = peak_gmacs(threads)
    if before is None or after is None:
        return None
    return {"gmacs": gm, "ceilings": [before, after], "fraction": gm / ((before + after) / 2)}


def one_turn_split(engine, setup: dict) -> dict:
    """Where a policy-kept one-turn pass's time goes, as cProfile sees the kernel calls (each
    prompt once after a warm-up, medians; cProfile's own cost lands in "other"): the prompt
    pass (its tokens after the policy, and "\\n\\n"): the int4 products (pg_gemm), attention
    and the rest; then the DECODE_STEPS single-token steps. What a faster GEMM path (AMX) can
    change is the prompt's products; the steps read every weight once each (memory-bound)."""
    import cProfile
    import pstats

    def timed(fn) -> dict:
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.runcall(fn)
        total = time.perf_counter() - t0
        calls = {name: tt for (_, _, name), (_, _, tt, _, _) in pstats.Stats(prof).stats.items()}
        out = {k: calls.get(f"<built-in method pyguard._kernels.pg_{k}>", 0.0) for k in ("gemm", "gemv", "attention")}
        return {**out, "other": total - sum(out.values()), "total": total}

    policy = setup["policy"]
    engine.reset()
    engine.feed(setup["one"][0][:policy])
    saved = engine.save()
    prompts, steps = [], []
    for ids in setup["one"][:1] + setup["one"]:  # the first twice: a warm-up
        engine.restore(saved)
        prompts.append(timed(lambda: engine.feed(ids[policy:] + setup["answer_start"])))
        steps.append(timed(lambda: [engine.feed([5]) for _ in range(DECODE_STEPS)]))
    med = lambda runs: {k: statistics.median(r[k] for r in runs[1:]) for k in runs[0]}  # noqa: E731
    return {"tokens": statistics.median(len(ids) - policy + len(setup["answer_start"]) for ids in setup["one"]),
            "prompt": med(prompts), "steps": med(steps)}


class PyguardEngine:
    """pyguard's model (guard head: its logits scattered over the vocabulary, -inf elsewhere,
    as ExecuTorch's pruned program returns them) in bench_peers' engine interface; the key/value
    cache's positions past the restored length are overwritten."""

    def __init__(self, model, positions: int):
        self.model, self.state = model, model.new_state(positions)

    def reset(self) -> None:
        self.state.pos = 0

    def feed(self, ids: list[int]) -> np.ndarray:
        logits = np.full(self.model.config.vocab_size, -np.inf, np.float32)
        logits[self.model.head_ids] = self.model.decode(self.state, ids[0]) if len(ids) == 1 else self.model.prefill(self.state, ids)
        return logits

    def save(self) -> int:
        return self.state.pos

    def restore(self, saved: int) -> None:
        self.state.pos = saved


# ---------------------------------------------------------------- llama.cpp (in the venv)


def q4_0_gguf(args, setup: dict) -> str:
    """llama.cpp's Q4_0 GGUF of the full-head pyguard file's int4 weights (made once in --workdir)."""
    import bench  # tools/bench.py: the GGUF writer

    from pyguard.formats import file, quant

    from pyguard.formats.safetensors import Checkpoint

    gguf = str(pathlib.Path(args.workdir) / f"guard{setup['geometry']}-g{args.group}.gguf")
    if not os.path.exists(gguf):
        f = file.load(setup["files"]["full" if "full" in setup["files"] else "guard"])
        tensors = dict(f.tensors)

        def int4(rows) -> quant.QTensor:  # Q4_0 holds int4 only: absmax groups of 32, a block of rows at a time
            parts = [quant.quantize_weights(rows(r), 32) for r in range(0, f.config.vocab_size, 4096)]
            return quant.QTensor(*(np.concatenate([getattr(p, n) for p in parts]) for n in ("qs", "scales", "rowsum")), 32)

        if isinstance(tensors["tok_embeddings"], quant.Q8Tensor):  # the int8 table rounded (a lookup: no run-time cost)
            tensors["tok_embeddings"] = int4(lambda r: quant.dequantize8(f.tensors["tok_embeddings"], slice(r, r + 4096)))
        if f.head_ids is not None:  # a pruned head: llama.cpp computes the full one, from the checkpoint
            ckpt = Checkpoint(setup["hf"])
            tensors["output"] = int4(lambda r: ckpt.read("lm_head.weight", slice(r, r + 4096)))
        bench.write_gguf(gguf + ".part", f.config, tensors)
        os.replace(gguf + ".part", gguf)
    return gguf


def llama_cpp_child(args) -> None:
    import bench_peers

    setup = json.loads(pathlib.Path(args.setup).read_text())
    gguf = q4_0_gguf(args, setup)
    base = peak_rss_mb()
    t0 = time.perf_counter()
    engine = bench_peers.LlamaCppEngine(gguf, args.threads)
    load = time.perf_counter() - t0
    res = bench_peers.run_setup(engine, setup)
    print(json.dumps({**res, "load_s": load, "base_rss_mb": base, "file_mb": os.path.getsize(gguf) / 1e6,
                      "info": engine.info()}))


# ---------------------------------------------------------------- transformers (subprocess)


def transformers_child(args) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    setup = json.loads(pathlib.Path(args.setup).read_text())
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.transformers]
    model = LlamaForCausalLM.from_pretrained(setup["hf"], dtype=dtype).eval()
    times = []
    for ids in setup["one"][: args.transformers_runs]:
        x = torch.tensor([ids + setup["answer_start"]])
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=DECODE_STEPS, min_new_tokens=DECODE_STEPS,
                           do_sample=False)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"one": latency(times), "batch_1": len(times) / sum(times), "peak_rss_mb": peak_rss_mb()}))


def run_child(cmd: list[str], env: dict | None = None) -> dict | str:
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode:
        tail = r.stderr.strip().splitlines()
        return "failed: " + (tail[-1] if tail else f"exit {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- Meta's INT4 .pte: pyguard beside ExecuTorch


def prepare_int4(args) -> dict:
    """The pyguard file of DIR's .pte (converted once), and for every one-turn prompt the
    forward passes pyguard's classify makes: [(position, token ids)], the prompt first."""
    from pyguard import Guard
    from pyguard.convert import pte

    if not pte.is_pte_dir(args.int4):
        sys.exit(f"{args.int4}: no .pte with params.json (make a random-weight one with: python tools/export_pte.py "
                 f"{args.int4} --geometry guard-1b-int4 --max-seq-length 8192)")
    program = pte.find_pte(args.int4)
    st = os.stat(program)
    pgw = str(pathlib.Path(args.workdir) / f"int4-{st.st_size}-{int(st.st_mtime)}.pgw")
    if not os.path.exists(pgw):
        print(f"converting {program} ...", file=sys.stderr)
        pte.convert_pte(args.int4, pgw)
    guard = Guard.load(pgw, threads=args.threads)
    passes: list = []

    def recorded(name):  # every token the model is given passes through one of these
        real = getattr(guard.model, name)

        def call(state_or_states, tokens, *a, **kw):
            states, lists = (state_or_states, tokens) if name == "prefill_many" else ([state_or_states], [tokens])
            passes.extend((s.pos, [int(t) for t in np.atleast_1d(ids)]) for s, ids in zip(states, lists))
            return real(state_or_states, tokens, *a, **kw)
        setattr(guard.model, name, call)

    for name in ("prefill", "prefill_many", "decode"):
        recorded(name)
    guard.classify(WARM_UP)
    one, _ = conversations()
    prompts = []
    for c in one:
        passes.clear()
        r = guard.classify(c)
        ids = [int(t) for t in guard.prepare(c).ids]
        assert passes[0] == (r.cached_tokens, ids[r.cached_tokens:]), "classify's first pass is not its prompt's rest"
        prompts.append({"ids": ids, "policy": r.cached_tokens, "passes": passes[1:], "answer": r.answer})
    # ExecuTorch keeps the policy prefix only if every prompt starts at the same place after it
    assert len({p["policy"] for p in prompts}) == 1, "the prompts share more than the policy prefix"
    return {"program": program, "pgw": pgw, "pgw_mb": os.path.getsize(pgw) / 1e6, "pte_mb": st.st_size / 1e6,
            "prompts": prompts, "warm_up": [int(t) for t in guard.prepare(WARM_UP).ids]}


def replay_runs(forward, prompts: list, policy_kept: bool) -> dict:
    """Latencies of each prompt's passes through forward(position, ids) -> the last position's
    vocabulary logits (argmax: the first answer token), from
    position 0, or from the policy prefix's end when the cache already holds it (the answer
    passes as recorded in both cases)."""
    times, last = [], []
    for p in prompts:
        start = p["policy"] if policy_kept else 0
        t0 = time.perf_counter()
        logits = forward(start, p["ids"][start:])
        for pos, ids in p["passes"]:
            forward(pos, ids)
        times.append(time.perf_counter() - t0)
        last.append(int(np.argmax(logits)))
    return {**latency(times), "argmax": last}


def rates(forward, prompts: list) -> dict:
    """Prefill tok/s over whole prompts from position 0; decode tok/s over DECODE_TOKENS single tokens after one."""
    t0 = time.perf_counter()
    for p in prompts:
        forward(0, p["ids"])
    prefill = sum(len(p["ids"]) for p in prompts) / (time.perf_counter() - t0)
    n = len(prompts[0]["ids"])
    t0 = time.perf_counter()
    for i in range(DECODE_TOKENS):
        forward(n + i, [prompts[0]["ids"][-1]])
    return {"prefill_tok_s": prefill, "decode_tok_s": DECODE_TOKENS / (time.perf_counter() - t0)}


def replays(forward, setup: dict, base_rss: float) -> dict:
    """One engine's figures on the recorded passes: from position 0, the rates, then with the
    policy prefix kept in its cache (computed once here), and its memory."""
    forward(0, setup["warm_up"])
    res = {"replay_full": replay_runs(forward, setup["prompts"], False), **rates(forward, setup["prompts"])}
    forward(0, setup["prompts"][0]["ids"][: setup["prompts"][0]["policy"]])
    res["replay_kept"] = replay_runs(forward, setup["prompts"], True)
    return {**res, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base_rss}


def int4_pyguard(setup: dict, threads: int) -> dict:
    from pyguard import Guard
    from pyguard.engine import kernels

    base = peak_rss_mb()
    t0 = time.perf_counter()
    guard = Guard.load(setup["pgw"], threads=threads)
    res = {"load_s": time.perf_counter() - t0, "isa": kernels.isa(), "threads": threads}
    guard.classify(WARM_UP)
    one, _ = conversations()
    times = []
    for c, p in zip(one, setup["prompts"]):
        t0 = time.perf_counter()
        r = guard.classify(c)
        times.append(time.perf_counter() - t0)
        assert (r.cached_tokens, r.answer) == (p["policy"], p["answer"]), "classify differs from the recorded run"
    res["classify"] = latency(times)
    model = guard.model
    state = model.new_state(max(len(p["ids"]) + DECODE_TOKENS + 64 for p in setup["prompts"]))

    def forward(pos: int, ids: list[int]) -> np.ndarray:
        state.pos = pos  # later positions are overwritten, as in ExecuTorch's cache
        logits = np.full(model.config.vocab_size, -np.inf, np.float32)  # ExecuTorch's scatter, for argmax
        logits[model.head_ids] = model.prefill(state, ids)
        return logits

    return {**res, **replays(forward, setup, base)}


def executorch_child(args) -> None:
    import torch
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama::custom_sdpa, update_cache)
    import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed::embedding_4bit)
    from executorch.extension.pybindings import portable_lib as et

    setup = json.loads(pathlib.Path(args.setup).read_text())
    et._unsafe_reset_threadpool(args.threads)  # XNNPACK's and the custom ops' pool
    torch.set_num_threads(args.threads)
    base = peak_rss_mb()
    t0 = time.perf_counter()
    module = et._load_for_executorch(setup["program"])
    res = {"load_s": time.perf_counter() - t0, "threads": et._threadpool_get_thread_count()}

    def forward(pos: int, ids: list[int]) -> np.ndarray:
        out = module.forward((torch.tensor([ids], dtype=torch.long), torch.tensor([pos], dtype=torch.long)))[0]
        return out.numpy().reshape(-1)

    print(json.dumps({**res, **replays(forward, setup, base)}))


def int4_main(args) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setup = prepare_int4(args)
    setup_path = pathlib.Path(args.workdir) / "setup-int4.json"
    setup_path.write_text(json.dumps(setup))
    common = ["--threads", str(args.threads), "--workdir", args.workdir, "--setup", str(setup_path), "--int4", args.int4]
    me = str(pathlib.Path(__file__).resolve())
    load = os.getloadavg()
    runs = take_turns({"pyguard": [sys.executable, me, "--pyguard", *common],
                       "ExecuTorch": [sys.executable, me, "--executorch", *common]}, args.rounds)
    report_int4(setup, runs, args, load)


def report_int4(setup: dict, runs: dict, args, load: tuple) -> None:
    from pyguard.engine import kernels

    pg, et = runs["pyguard"], runs["ExecuTorch"]
    if isinstance(pg, str):
        sys.exit(f"pyguard {pg}")
    if isinstance(et, str):
        sys.exit(f"ExecuTorch {et}")
    ps = setup["prompts"]
    n = [len(p["ids"]) for p in ps]
    for line in machine_lines(pg["isa"]):
        print(line)
    print(f"Meta's Llama Guard 3-1B-INT4 geometry ({setup['program']}, {setup['pte_mb']:.0f} MB; pyguard file "
          f"{setup['pgw_mb']:.0f} MB), {len(ps)} one-turn prompts of {min(n)}-{max(n)} tokens ({ps[0]['policy']} of them "
          f"the policy prefix), answers {sorted({p['answer'] for p in ps})} in {statistics.mean(len(p['passes']) + 1 for p in ps):.1f} "
          f"passes on average")
    print(f"pyguard {pg['threads']} threads; ExecuTorch {et['threads']} "
          f"threads; load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after; best of {args.rounds} rounds")
    def agree(x: dict, y: dict) -> str:
        return f"{sum(a == b for a, b in zip(x['argmax'], y['argmax']))} of {len(x['argmax'])}"
    print(f"{'':40}{'pyguard':>10}{'ExecuTorch':>12}{'ratio':>8}")
    rows = [("one-turn from position 0, median (s)", pg["replay_full"]["median"], et["replay_full"]["median"]),
            ("one-turn from position 0, p95 (s)", pg["replay_full"]["p95"], et["replay_full"]["p95"]),
            ("one-turn, policy prefix kept, median (s)", pg["replay_kept"]["median"], et["replay_kept"]["median"]),
            ("one-turn, policy prefix kept, p95 (s)", pg["replay_kept"]["p95"], et["replay_kept"]["p95"]),
            ("Guard.classify, median (s)", pg["classify"]["median"], None),
            ("prefill (tok/s)", pg["prefill_tok_s"], et["prefill_tok_s"]),
            ("decode (tok/s)", pg["decode_tok_s"], et["decode_tok_s"]),
            ("peak RSS (MB)", pg["peak_rss_mb"], et["peak_rss_mb"]),
            ("  of which before loading (MB)", pg["base_rss_mb"], et["base_rss_mb"])]
    for label, a, b in rows:
        higher = label.endswith("(tok/s)")
        ratio = None if b is None else (a / b if higher else b / a)
        print(f"{label:40}{_fmt(a):>10}{_fmt(b):>12}{_fmt(ratio, 'x'):>8}")
    print("ratio: how many times better pyguard is; Guard.classify: the whole request (tokenizing, prompt, prefix "
          "cache, answer decoding) on the same prompts")
    print(f"load: pyguard {pg['load_s']:.2f} s, ExecuTorch {et['load_s']:.2f} s; same first answer token: pyguard and "
          f"ExecuTorch {agree(pg['replay_full'], et['replay_full'])} prompts, ExecuTorch with the prefix kept and from "
          f"position 0 {agree(et['replay_kept'], et['replay_full'])}")


# ---------------------------------------------------------------- report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group", type=int, default=256, help="int4 group size (256: Meta's INT4 recipe)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--geometry", choices=("1b", "8b"), default="1b", help="Llama Guard 3 1B, or 8B (docs/8B.md)")
    ap.add_argument("--workdir", default="/tmp/pyguard-guard-bench")
    ap.add_argument("--venv", default="/tmp/benchenv", help="llama-cpp-python's environment (see tools/bench.py)")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-openvino", action="store_true", help="no OpenVINO (tools/bench_peers.py: venv, export)")
    ap.add_argument("--no-ort", action="store_true", help="no ONNX Runtime GenAI (tools/bench_peers.py)")
    ap.add_argument("--ov-group", type=int, default=128, help="OpenVINO's int4 group (optimum-intel export)")
    ap.add_argument("--transformers-runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="turns pyguard and llama.cpp take; figures are the best of them")
    ap.add_argument("--int4", metavar="DIR", help="Meta's INT4 .pte directory: pyguard beside ExecuTorch instead")
    ap.add_argument("--llama-cpp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--executorch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--transformers", choices=("bf16", "fp32"), help=argparse.SUPPRESS)
    ap.add_argument("--pyguard", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gguf:  # in the llama.cpp venv (gguf), a process of its own: its memory is not llama.cpp's
        return print(json.dumps({"gguf": q4_0_gguf(args, json.loads(pathlib.Path(args.setup).read_text()))}))
    if args.llama_cpp:
        return llama_cpp_child(args)
    if args.transformers:
        return transformers_child(args)
    if args.executorch:
        return executorch_child(args)
    if args.pyguard:
        setup = json.loads(pathlib.Path(args.setup).read_text())
        print(json.dumps(int4_pyguard(setup, args.threads) if args.int4 else bench_pyguard(setup, args.threads)))
        return

    os.makedirs(args.workdir, exist_ok=True)
    if args.int4:
        return int4_main(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setup = prepare(args)
    setup_path = pathlib.Path(args.workdir) / "setup.json"
    setup_path.write_text(json.dumps(setup))
    common = ["--threads", str(args.threads), "--group", str(args.group), "--workdir", args.workdir, "--setup", str(setup_path)]
    me = str(pathlib.Path(__file__).resolve())
    py = pathlib.Path(args.venv) / "bin" / "python"
    turns = {"pyguard": [sys.executable, me, "--pyguard", *common]}
    if not args.no_llama_cpp:
        made = run_child([str(py), me, "--gguf", *common]) if py.exists() else f"no {py}: run tools/bench.py once to create it"
        turns["llama.cpp"] = [str(py), me, "--llama-cpp", *common] if isinstance(made, dict) else made
    exports = {}
    for name, skip in (("openvino", args.no_openvino), ("ort", args.no_ort)):
        if not skip:
            turns[PEER_TITLES[name]], exports[name] = peer_turn(name, args, setup, setup_path)
    load = os.getloadavg()
    runs = take_turns(turns, args.rounds, str(pathlib.Path(args.workdir) / "rounds.json"))
    if not args.no_transformers:
        for dt in ("bf16", "fp32"):
            runs[f"transformers {dt}"] = run_child([sys.executable, me, "--transformers", dt, "--transformers-runs",
                                                    str(args.transformers_runs), *common], AVX2_ONLY)
    report(runs, args, setup, exports, load)


PEER_TITLES = {"openvino": "OpenVINO", "ort": "ORT GenAI"}


def peer_turn(name: str, args, setup: dict, setup_path) -> tuple[list[str] | str, dict | None]:
    """The command of a peer's turn (its venv made and its model exported on first use), or why
    there is none; and its export's record."""
    import bench_peers

    try:
        py = bench_peers.ensure_venv(name)
        model, info = bench_peers.export(name, setup["hf"], args.workdir, py, args.ov_group)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        return f"skipped: {e}", None
    return [py, str(ROOT / "tools" / "bench_peers.py"), "--run", name, "--model", model, "--setup", str(setup_path),
            "--threads", str(args.threads)], info


def take_turns(turns: dict, rounds: int, keep: str | None = None) -> dict:
    results = {name: [] for name in turns}
    for r in range(rounds):
        print(f"round {r + 1} of {rounds} ...", file=sys.stderr)
        for name, cmd in turns.items():
            results[name].append(run_child(cmd) if isinstance(cmd, list) else cmd)
            if keep:  # every round's figures, should the report fail
                pathlib.Path(keep).write_text(json.dumps(results))
    return {name: best_of(rs) for name, rs in results.items()}


def best_of(runs: list) -> dict | str:
    """Each figure's best over the rounds that succeeded (latencies: the round with the lowest
    median; rates: the highest); the rest from the first of them. A failure if all failed."""
    ok = [r for r in runs if isinstance(r, dict)]
    if not ok:
        return runs[0]
    best = dict(ok[0])
    for key, v in best.items():
        if isinstance(v, dict) and "median" in v:
            best[key] = min((r[key] for r in ok), key=lambda v: v["median"])
        elif isinstance(v, dict) and "fraction" in v:
            best[key] = max((r[key] for r in ok if r.get(key)), key=lambda v: v["fraction"])
        elif isinstance(v, (int, float)) and (key.startswith(("batch_", "prefill_")) or key.endswith("_tok_s")):
            best[key] = max(r[key] for r in ok)
    best["rounds"] = len(ok)
    return best


def machine_lines(isa: str | None = None) -> list[str]:
    """The CPU, its features and pyguard's kernel paths, for every printout."""
    from pyguard.engine import kernels

    amx = getattr(kernels, "amx_status", None)  # on the branch with the amx path
    return [f"CPU: {kernels.cpu_model()}; features: {' '.join(kernels.cpu_features())}",
            f"pyguard kernels: {isa or kernels.isa()} (paths: {' '.join(kernels.available_isas())}; amx: "
            f"{amx() if amx else 'no amx_status in this pyguard'})"]


def peak_gmacs(threads: int) -> float | None:
    """The active path's integer-core ceiling (G multiply-adds/s on `threads` threads), where
    pyguard's library measures it (pg_peak_macs); else None."""
    from pyguard._kernels import lib

    if not hasattr(lib, "pg_peak_macs"):
        return None
    from concurrent.futures import ThreadPoolExecutor

    from pyguard.engine import kernels

    iters = 2_000_000 if kernels.isa() != "amx" else 200_000

    def one(_):
        t0 = time.perf_counter()
        n = lib.pg_peak_macs(iters)
        return n / (time.perf_counter() - t0)

    with ThreadPoolExecutor(threads) as ex:
        return max(sum(ex.map(one, range(threads))) for _ in range(3)) / 1e9


def linear_macs(hf_dir: str) -> float:
    """Multiply-adds of one token through the decoder's linear layers (not the head)."""
    c = json.loads(pathlib.Path(hf_dir, "config.json").read_text())
    d, f, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * c.get("head_dim", d // c["num_attention_heads"])
    return L * (d * (d + 2 * kv) + d * d + 3 * d * f)


def peer_lines(name: str, r: dict, export: dict | None) -> list[str]:
    info = r.get("info", {})
    out = []
    if name == "llama.cpp":
        out.append(f"llama.cpp: llama-cpp-python {info.get('version')}, Q4_0 GGUF of pyguard's int4 weights (full head); "
                   f"{info.get('system', '').strip()}")
    elif name == "OpenVINO":
        out.append(f"OpenVINO {info.get('version')}: {export.get('weights') if export else ''}; properties "
                   f"{info.get('properties')}; FullyConnected primitives: prefill {r.get('prefill_kernels')}, decode "
                   f"{r.get('decode_kernels')}; head for the last position only: {info.get('head_last_position_only')}")
    elif name == "ORT GenAI":
        out.append(f"ONNX Runtime GenAI {info.get('version')} (onnxruntime {info.get('onnxruntime')}): "
                   f"{export.get('weights') if export else ''}; graph {info.get('ops')}")
    if export:
        out[-1] += f"; export {export['export_s']:.0f} s, {export['peak_rss_mb']:.0f} MB peak RSS"
    out[-1] += f"; load {r.get('load_s', 0):.2f} s"
    return out


def report(runs: dict, args, setup: dict, exports: dict, load: tuple) -> None:
    from pyguard.engine import kernels  # here: the peers' side of this script runs without pyguard

    pg = runs["pyguard"]
    if isinstance(pg, str):
        sys.exit(f"pyguard {pg}")
    for line in machine_lines(pg["isa"]):
        print(line)
    print(f"Llama Guard 3 {setup['geometry'].upper()} geometry, random weights, real tokenizer, {args.threads} threads, best of {args.rounds} "
          f"rounds taken in turns; load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"pyguard: its file (group {args.group}, guard head); Guard.classify's one-turn prompts {pg['prompt_tokens']} "
          f"tokens, {pg['cached_tokens']} from its token-prefix cache; engines' one-turn prompts "
          f"{min(map(len, setup['one']))}-{max(map(len, setup['one']))} tokens, policy prefix {setup['policy']}")
    peers = {k: v for k, v in runs.items() if k != "pyguard"}
    for k, r in peers.items():
        if isinstance(r, dict):
            for line in peer_lines(k, r, exports.get({"OpenVINO": "openvino", "ORT GenAI": "ort"}.get(k, ""))):
                print(line)
    med = lambda key: (lambda r: r.get(key, {}).get("median"))  # noqa: E731
    p95 = lambda key: (lambda r: r.get(key, {}).get("p95"))  # noqa: E731
    # (label, pyguard's figure, a peer's figure, better)
    rows = [("one-turn new, policy kept, median (s)", med("engine_one_kept"), med("one_kept"), "lower"),
            ("one-turn new, policy kept, p95 (s)", p95("engine_one_kept"), p95("one_kept"), "lower"),
            ("one-turn from position 0, median (s)", med("engine_one"), med("one"), "lower"),
            ("two-turn from position 0, median (s)", med("engine_two"), med("two"), "lower"),
            (f"prefill {PREFILL_RATE} tokens (tok/s)", lambda r: r.get(f"prefill_{PREFILL_RATE}"),
             lambda r: r.get(f"prefill_{PREFILL_RATE}"), "higher"),
            ("decode (tok/s)", lambda r: r.get("decode_tok_s"), lambda r: r.get("decode_tok_s"), "higher"),
            ("Guard.classify one-turn median (s)", med("one"), lambda r: None, "lower"),
            ("Guard.classify two-turn median (s)", med("two"), lambda r: None, "lower"),
            ("batch 1 (conversations/s)", lambda r: r.get("batch_1"), lambda r: r.get("batch_1"), "higher")]
    rows += [(f"batch {b} (conversations/s)", lambda r, b=b: r.get(f"batch_{b}"), lambda r: None, "higher") for b in BATCHES[1:]]
    rows += [("peak RSS (MB)", lambda r: r.get("peak_rss_mb"), lambda r: r.get("peak_rss_mb"), "lower"),
             ("file (MB)", lambda r: r.get("file_mb"), lambda r: r.get("file_mb"), "lower")]
    print(f"{'':38}{'pyguard':>9}" + "".join(f"{k:>19}{'ratio':>7}" for k in peers))
    for label, get_pg, get, better in rows:
        a = get_pg(pg)
        line = f"{label:38}{_fmt(a):>9}"
        for r in peers.values():
            v = None if isinstance(r, str) else get(r)
            ratio = None if v is None or a is None else (v / a if better == "lower" else a / v)
            line += f"{_fmt(v):>19}{_fmt(ratio, 'x'):>7}"
        print(line)
    print("ratio: how many times better pyguard is (peer time / pyguard time, pyguard rate / peer rate, peer MB / pyguard MB)")
    print("engines (all but the Guard.classify rows): the same token ids, the prompt and \"\\n\\n\" in one pass, then "
          f"{2} greedy steps; 'policy kept': the first {setup['policy']} tokens restored from a cache made once, the rest "
          "computed; batch 1: one-turn and two-turn from position 0 one after the other (pyguard: Guard.classify_many)")
    macs = linear_macs(setup["hf"])
    gm = pg[f"prefill_{PREFILL_RATE}"] * macs / 1e9
    bc = pg.get("beside_ceiling")
    print(f"pyguard prefill {PREFILL_RATE}: {gm:.0f} G multiply-adds/s in the linear layers ({macs / 1e9:.2f} G a token)"
          + (f"; timed again between two measurements of the {pg['isa']} path's ceiling just before and after: {bc['gmacs']:.0f} "
             f"against {bc['ceilings'][0]:.0f} and {bc['ceilings'][1]:.0f} G/s, {bc['fraction']:.0%} of it (best round)" if bc else
             " (no pg_peak_macs in this pyguard: the path's ceiling is not measured)"))
    sp = pg.get("split")
    if sp:
        p, st = sp["prompt"], sp["steps"]
        print(f"pyguard one-turn, policy kept, where the time goes (cProfile, medians): the prompt pass ({sp['tokens']:.0f} "
              f"tokens) {p['total'] * 1e3:.0f} ms: int4 products {p['gemm'] * 1e3:.0f} ms ({sp['tokens'] * macs / p['gemm'] / 1e9:.0f} "
              f"G multiply-adds/s), attention {p['attention'] * 1e3:.0f} ms, the rest {(p['other'] + p['gemv']) * 1e3:.0f} ms; "
              f"{DECODE_STEPS} decode steps {st['total'] * 1e3:.0f} ms (products {(st['gemm'] + st['gemv']) * 1e3:.0f} ms)")
    for k, r in peers.items():
        if isinstance(r, dict) and r.get(f"prefill_{PREFILL_RATE}"):
            print(f"{k}: prefill {PREFILL_RATE} at {r[f'prefill_{PREFILL_RATE}'] * macs / 1e9:.0f} G multiply-adds/s in the "
                  f"linear layers; first answer token the same with the policy kept as from position 0: "
                  f"{r.get('kept_agrees')} of {len(r['one_kept']['argmax'])} prompts")
    print(f"pyguard: load {pg['load_s']:.2f} s, first request (builds the prefix cache) {pg['first_s']:.2f} s; "
          + (f"batch-64 / batch-1 throughput {pg['batch_64'] / pg['batch_1']:.2f}x; " if "batch_64" in pg else "")
          + f"engine policy-kept check {pg.get('engine_kept_agrees')} of {len(pg['engine_one_kept']['argmax'])}")
    print(f"pyguard memory after classifying: {pg['rssanon_mb']:.0f} MB anonymous, {pg['rssfile_mb']:.0f} MB of mapped "
          f"file resident; a key/value cache of 4096 positions: {pg['kv_4096_mb']['float32']:.0f} MiB float32, "
          f"{pg['kv_4096_mb']['float16']:.0f} MiB float16")
    for k, r in peers.items():
        if isinstance(r, str):
            print(f"{k}: {r}")


def _fmt(v, suffix: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.3g}{suffix}" if v < 100 else f"{v:.0f}{suffix}"


if __name__ == "__main__":
    main()
