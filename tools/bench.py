"""Speed and memory of the engine beside llama.cpp, on the Llama Guard 3 1B geometry with random
int4 weights (not a test).

    python tools/bench.py [--threads 2] [--group 256] [--rounds 3] [--no-llama-cpp] [--no-openvino] [--no-ort]

pyguard runs in this interpreter. llama.cpp runs in a separate virtual environment
(/tmp/benchenv, or --venv) holding llama-cpp-python and gguf, created on first use (pip
compiles llama.cpp from source, for AVX2 like pyguard's kernels: about 15 minutes on 2
cores; CMAKE_ARGS below to do it by hand): this script re-invokes itself
there with --llama-cpp, writes the same weights as a Q4_0 GGUF (int4 values and scales carried
over exactly: a group of 256 is 8 Q4_0 blocks sharing one scale; q/k rows permuted back to
Meta's interleaved rotary layout, llama.cpp's tensor names, a placeholder vocabulary), and
reports its figures as JSON. The two runs take turns, never overlapping on the cores, for
--rounds rounds; each figure is the best of its rounds (shared virtual machines have slow
spells of minutes; taking turns exposes both engines to them alike).

OpenVINO (int4 symmetric, group 128, optimum-intel) and ONNX Runtime GenAI (MatMulNBits int4,
block 32, accuracy level 4) take their turns too, each in its own virtual environment under
/tmp, made on first use, and exported once from tools/bench_guard.py's random bf16 checkpoint
of the same geometry in --workdir (tools/bench_peers.py says how): the same prompts' token
ids, prefill from position 0, decode of 16 fixed tokens after a 64-token prompt, the full head
for the last position only. Their weights are other random values than pyguard's (no logits
check) and their int4 formats and activation precisions differ; the work per token is the
same. The printout starts with the CPU, its features and pyguard's kernel paths.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time
import tracemalloc

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tools")]

import synth  # noqa: E402
from pyguard.formats import file, quant  # noqa: E402
from pyguard.engine import kernels  # noqa: E402
from pyguard.formats.config import ModelConfig  # noqa: E402

PROMPTS = (64, 256, 1024)
DECODE_STEPS = 16
CONTEXT = 4096  # the memory check's context


def rss_mb(field: str = "VmRSS") -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def prompt(n: int, vocab: int, seed: int = 7) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


# ---------------------------------------------------------------- pyguard


def bench_pyguard(path: str, threads: int, with_memory: bool) -> dict:
    from pyguard.engine import kernels
    from pyguard.engine.model import Model

    kernels.set_threads(threads)
    reset_peak_rss()
    t0 = time.perf_counter()
    f = file.load(path)  # what Model.load does
    full = Model(f.config, f.tensors, threads=threads)
    load = time.perf_counter() - t0
    cfg, tensors = f.config, f.tensors
    weights_mb = os.path.getsize(path) / 2**20
    head = synth.GUARD_HEAD
    out = tensors["output"]
    guard = Model(cfg, {**tensors, "output": quant.QTensor(out.qs[head], out.scales[head], out.rowsum[head], out.group)}, head, threads)
    res = {"load_s": load, "isa": kernels.isa(), "weights_mb": weights_mb}
    guard.prefill(guard.new_state(64), prompt(64, cfg.vocab_size))  # warm up
    for n in PROMPTS:
        state = guard.new_state(n)
        t0 = time.perf_counter()
        guard.prefill(state, prompt(n, cfg.vocab_size))
        res[f"prefill_{n}"] = n / (time.perf_counter() - t0)
    for name, model in (("full", full), ("guard", guard)):
        state = model.new_state(64 + DECODE_STEPS)
        logits = model.prefill(state, prompt(64, cfg.vocab_size))
        if name == "full":
            res["check_logits"] = logits.tolist()
        t0 = time.perf_counter()
        for _ in range(DECODE_STEPS):
            logits = model.decode(state, int(np.argmax(logits)))
        res[f"decode_{name}"] = DECODE_STEPS / (time.perf_counter() - t0)
    res["peak_rss_mb"] = rss_mb("VmHWM")
    del full
    if with_memory:
        res.update(memory_at_context(guard, cfg))
    return res


def memory_at_context(model, cfg: ModelConfig) -> dict:
    """The engine's allocations (numpy, traced) at a CONTEXT-token context: the cache of a
    CONTEXT-position state filled up to CONTEXT - 128, then one 128-token prefill chunk
    attending over all of them (the widest attention; a real 4096-token prefill is 32 such
    chunks). Traced rather than RSS, which keeps freed heap from earlier runs."""
    res = {}
    for dtype in (np.float32, np.float16):
        tracemalloc.start()
        state = model.new_state(CONTEXT, kv_dtype=dtype)
        state.pos = CONTEXT - 128
        model.prefill(state, prompt(128, cfg.vocab_size))
        res[f"ctx{CONTEXT}_{np.dtype(dtype).name}_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        del state
    return res


# ---------------------------------------------------------------- llama.cpp


def rope_factors(cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's rope_freqs tensor: the divisor of each frequency under Llama 3 scaling."""
    s = cfg.rope_scaling
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < s["original_max_position_embeddings"] / s["high_freq_factor"]:
            out.append(1.0)
        elif wavelen > s["original_max_position_embeddings"] / s["low_freq_factor"]:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, np.float32)


def q4_0(t: quant.QTensor, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
    """Rows of a QTensor as Q4_0 blocks (fp16 scale, 16 bytes: element j low, j + 16 high)."""
    q = quant.unpack_nibbles(t.qs[rows])
    m, k = q.shape
    u = (q + 8).astype(np.uint8).reshape(m, k // 32, 2, 16)
    out = np.empty((m, k // 32, 18), np.uint8)
    out[:, :, :2] = np.repeat(t.scales[rows], t.group // 32, axis=1).view(np.uint8).reshape(m, k // 32, 2)
    out[:, :, 2:] = u[:, :, 0] | (u[:, :, 1] << 4)
    return out.reshape(m, -1)


def interleave(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order taking Hugging Face's rotate-half q/k rows back to Meta's interleaved pairs."""
    return np.arange(n_heads * head_dim).reshape(n_heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)


def write_gguf(path: str, cfg: ModelConfig, tensors: dict) -> None:
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("pyguard bench (random weights)")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    # placeholder sentencepiece vocabulary: the bench feeds token ids, never text
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [f"t{i}".encode() for i in range(len(tokens), cfg.vocab_size)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (cfg.vocab_size - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    Q4 = gguf.GGMLQuantizationType.Q4_0
    w.add_tensor("token_embd.weight", q4_0(tensors["tok_embeddings"]), raw_dtype=Q4)
    if cfg.rope_scaling:
        w.add_tensor("rope_freqs.weight", rope_factors(cfg))
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        qkv = tensors[p + "wqkv"]
        w.add_tensor(b + "attn_norm.weight", tensors[p + "attention_norm"])
        w.add_tensor(b + "attn_q.weight", q4_0(qkv, interleave(cfg.n_heads, cfg.head_dim)), raw_dtype=Q4)
        w.add_tensor(b + "attn_k.weight", q4_0(qkv, q_rows + interleave(cfg.n_kv_heads, cfg.head_dim)), raw_dtype=Q4)
        w.add_tensor(b + "attn_v.weight", q4_0(qkv, slice(q_rows + kv_rows, None)), raw_dtype=Q4)
        w.add_tensor(b + "attn_output.weight", q4_0(tensors[p + "wo"]), raw_dtype=Q4)
        w.add_tensor(b + "ffn_norm.weight", tensors[p + "ffn_norm"])
        w.add_tensor(b + "ffn_gate.weight", q4_0(tensors[p + "w13"], slice(None, cfg.hidden_dim)), raw_dtype=Q4)
        w.add_tensor(b + "ffn_up.weight", q4_0(tensors[p + "w13"], slice(cfg.hidden_dim, None)), raw_dtype=Q4)
        w.add_tensor(b + "ffn_down.weight", q4_0(tensors[p + "w2"]), raw_dtype=Q4)
    w.add_tensor("output_norm.weight", tensors["norm"])
    w.add_tensor("output.weight", q4_0(tensors["output"]), raw_dtype=Q4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def bench_llama_cpp(path: str, cfg: ModelConfig, threads: int) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(path, n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    res = {"load_s": time.perf_counter() - t0}
    llm.eval(prompt(64, cfg.vocab_size))  # warm up
    for n in PROMPTS:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt(n, cfg.vocab_size))
        res[f"prefill_{n}"] = n / (time.perf_counter() - t0)
    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(cfg.vocab_size,)).copy()

    llm.reset()
    llm.eval(prompt(64, cfg.vocab_size))
    logits = last_logits()
    res["check_logits"] = logits.tolist()
    t0 = time.perf_counter()
    for _ in range(DECODE_STEPS):
        llm.eval([int(np.argmax(logits))])
        logits = last_logits()
    res["decode_full"] = DECODE_STEPS / (time.perf_counter() - t0)
    res["peak_rss_mb"] = rss_mb("VmHWM")
    return res


def llama_cpp_child(args) -> None:
    cfg = synth.GUARD_1B
    path = f"/tmp/pyguard-bench-g{args.group}-s{args.seed}.gguf"
    if not os.path.exists(path):
        tensors, _ = synth.random_int4_checkpoint(cfg, args.group, args.seed)
        write_gguf(path + ".part", cfg, tensors)
        del tensors
        os.replace(path + ".part", path)
    res = bench_llama_cpp(path, cfg, args.threads)
    res["file_mb"] = os.path.getsize(path) / 2**20
    print(json.dumps(res))


def run_llama_cpp(args) -> dict | str:
    """The llama.cpp figures from the venv, or why there are none."""
    py = pathlib.Path(args.venv) / "bin" / "python"
    if not py.exists():
        print(f"creating {args.venv} (llama-cpp-python compiles llama.cpp: ~15 minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", args.venv], check=True)
        # AVX2 build: -march=native would use AMX here, which this virtual machine faults on
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"}
        r = subprocess.run([str(py), "-m", "pip", "install", "numpy", "cffi", "tiktoken", "gguf", "llama-cpp-python"], env=env)
        if r.returncode:
            return "llama-cpp-python could not be installed"
    cmd = [str(py), __file__, "--llama-cpp", "--threads", str(args.threads), "--group", str(args.group), "--seed", str(args.seed)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return "llama.cpp run failed: " + r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "llama.cpp run failed"
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- report


def best_of(runs: list[dict]) -> dict:
    """Each figure at its best over the rounds: highest rate, shortest load, highest peak RSS."""
    out = dict(runs[0])
    for key in out:
        values = [r[key] for r in runs if key in r]
        if key.startswith(("prefill_", "decode_")) and isinstance(out[key], (int, float)):
            out[key] = max(values)
        elif key == "load_s":
            out[key] = min(values)
        elif key == "peak_rss_mb":
            out[key] = max(values)
    return out


PEERS = {"openvino": "OpenVINO", "ort": "ORT GenAI"}


def peer_runs(args, vocab: int) -> dict:
    """Per peer (tools/bench_peers.py), its command on this benchmark's prompts, or why none:
    its venv made and its model exported (from bench_guard's random bf16 checkpoint of the same
    geometry) on first use."""
    import bench_peers

    setup = {"prefill": {str(n): prompt(n, vocab) for n in PROMPTS}, "decode": prompt(DECODE_STEPS, vocab, seed=8),
             "decode_after": prompt(64, vocab)}
    setup_path = pathlib.Path(args.workdir) / "setup-bench.json"
    cmds = {}
    for name, title in PEERS.items():
        if getattr(args, f"no_{name}"):
            continue
        try:
            os.makedirs(args.workdir, exist_ok=True)
            setup_path.write_text(json.dumps(setup))
            py = bench_peers.ensure_venv(name)
            model, info = bench_peers.export(name, bench_peers.hf_checkpoint(args.workdir, args.seed), args.workdir, py,
                                             args.ov_group)
            cmds[title] = ([py, str(ROOT / "tools" / "bench_peers.py"), "--run", name, "--model", model, "--setup",
                            str(setup_path), "--threads", str(args.threads)], info)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            cmds[title] = (f"skipped: {e}", None)
    return cmds


def run_peer(cmd) -> dict | str:
    if isinstance(cmd, str):
        return cmd
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        tail = r.stderr.strip().splitlines()
        return "failed: " + (tail[-1] if tail else f"exit {r.returncode}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["decode_full"] = res.pop("decode_tok_s")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group", type=int, default=256, help="int4 group size (256: Meta's INT4 recipe)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--venv", default="/tmp/benchenv")
    ap.add_argument("--rounds", type=int, default=3, help="turns each engine takes; figures are the best of them")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--no-openvino", action="store_true", help="no OpenVINO (tools/bench_peers.py)")
    ap.add_argument("--no-ort", action="store_true", help="no ONNX Runtime GenAI (tools/bench_peers.py)")
    ap.add_argument("--ov-group", type=int, default=128, help="OpenVINO's int4 group (optimum-intel export)")
    ap.add_argument("--workdir", default="/tmp/pyguard-guard-bench", help="the peers' checkpoint and exports (shared with "
                    "tools/bench_guard.py)")
    ap.add_argument("--llama-cpp", action="store_true", help=argparse.SUPPRESS)  # the venv side
    args = ap.parse_args()
    if args.llama_cpp:
        return llama_cpp_child(args)

    cfg = synth.GUARD_1B
    path = f"/tmp/pyguard-bench-g{args.group}-s{args.seed}.pgw"
    if not os.path.exists(path):
        t0 = time.perf_counter()
        tensors, _ = synth.random_int4_checkpoint(cfg, args.group, args.seed)
        file.save(path, cfg, tensors)
        print(f"random int4 weights, group {args.group}: written to {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        del tensors
    peers = peer_runs(args, cfg.vocab_size)
    load = os.getloadavg()
    pg_runs, lc_runs, peer_res = [], [], {k: [] for k in peers}
    for r in range(args.rounds):
        print(f"round {r + 1} of {args.rounds} ...", file=sys.stderr)
        if not args.no_llama_cpp:
            lc_runs.append(run_llama_cpp(args))
        for k, (cmd, _) in peers.items():
            peer_res[k].append(run_peer(cmd))
        pg_runs.append(bench_pyguard(path, args.threads, with_memory=r == 0))
    pg = best_of(pg_runs)
    failed = [r for r in lc_runs if isinstance(r, str)]
    others = {"llama.cpp": "skipped" if args.no_llama_cpp else failed[0] if failed else best_of(lc_runs)}
    for k, rs in peer_res.items():
        ok = [x for x in rs if isinstance(x, dict)]
        others[k] = best_of(ok) if ok else rs[0]

    amx = getattr(kernels, "amx_status", None)  # on the branch with the amx path
    print(f"CPU: {kernels.cpu_model()}; features: {' '.join(kernels.cpu_features())}")
    print(f"pyguard kernels: {pg['isa']} (paths: {' '.join(kernels.available_isas())}; amx: "
          f"{amx() if amx else 'no amx_status in this pyguard'})")
    print(f"Llama Guard 3 1B geometry, random int4 weights (group {args.group}), {args.threads} threads, best of "
          f"{args.rounds} rounds taken in turns; load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    rows = [("load (s)", "load_s")] + [(f"prefill {n} tokens (tok/s)", f"prefill_{n}") for n in PROMPTS]
    rows += [("decode, full head (tok/s)", "decode_full"), ("decode, guard head (tok/s)", "decode_guard"), ("peak RSS (MB)", "peak_rss_mb")]
    print(f"{'':30} {'pyguard':>10}" + "".join(f" {k:>10} {'ratio':>7}" for k in others))
    for label, key in rows:
        a = pg.get(key)
        line = f"{label:30} {a:10.2f}"
        for o in others.values():
            b = o.get(key, o.get("decode_full") if key == "decode_guard" else None) if isinstance(o, dict) else None
            ratio = f"{a / b:7.2f}" if a and b and key not in ("load_s", "peak_rss_mb") else ""
            line += f" {'' if b is None else f'{b:10.2f}':>10} {ratio:>7}"
        print(line)
    print("ratio: pyguard's rate / the peer's; the peers' decode is with their full head (pyguard's guard head: 20 rows)")
    print(f"pyguard file: {pg['weights_mb']:.0f} MiB, memory-mapped (load = open and map it)")
    print(f"engine memory beyond the weights at a {CONTEXT}-token context (cache + working buffers):"
          f" fp32 cache {pg[f'ctx{CONTEXT}_float32_mb']:.0f} MiB, fp16 cache {pg[f'ctx{CONTEXT}_float16_mb']:.0f} MiB"
          f" (target: file + 300 MB)")
    lc = others["llama.cpp"]
    if isinstance(lc, dict):
        a, b = np.array(pg["check_logits"]), np.array(lc["check_logits"])
        print(f"llama.cpp: GGUF {lc['file_mb']:.0f} MB; same model check: logits correlation {np.corrcoef(a, b)[0, 1]:.4f},"
              f" top-1 {'same' if a.argmax() == b.argmax() else 'differs'}; guard-head decode compared with its full-head decode")
    else:
        print(f"llama.cpp: {lc}")
    for k, (cmd, exp) in peers.items():
        r = others[k]
        if isinstance(r, str):
            print(f"{k}: {r}")
            continue
        info = r["info"]
        print(f"{k} {info.get('version')}: {exp.get('weights')} from a random bf16 checkpoint of the same geometry (other "
              f"random values: no logits check); export {exp['export_s']:.0f} s, {exp['peak_rss_mb']:.0f} MB; "
              + ", ".join(f"{x} {d[x]}" for d in (info, r) for x in ("properties", "prefill_kernels", "decode_kernels",
                                                                    "onnxruntime", "ops") if x in d))


if __name__ == "__main__":
    main()
