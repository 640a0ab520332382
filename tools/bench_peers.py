"""OpenVINO and ONNX Runtime GenAI as peers of pyguard in tools/bench_guard.py and tools/bench.py
(not a test), and the timing loop every engine there runs on the same token ids.

Each peer lives in its own virtual environment under /tmp, created on first use with pip from
PyPI (nothing else is downloaded; the project's own dependencies and tests do not change):

- OpenVINO (/tmp/benchenv-openvino): openvino, optimum-intel[openvino], nncf, torch (for the
  export only; the same release as this interpreter's torch when it has one, so pip can take a
  CPU wheel already on the machine). Export: optimum-intel's OVModelForCausalLM from the
  benchmark's own Hugging Face checkpoint (random bf16 weights), every linear layer and the
  embedding int4 symmetric, group 128 (--ov-group; NNCF takes any group dividing 2048 and
  8192), ratio 1.0, all layers (the head too: pyguard's and llama.cpp's files are int4
  everywhere), stateful (key/value cache inside the model). At run time the head is computed
  for the last position only (a Slice before its MatMul, as openvino.genai's LLMPipeline does).
  The plugin's defaults stay: on this kind of CPU it reports its execution precision
  (INFERENCE_PRECISION_HINT: bf16 where the CPU has AVX512-BF16 or AMX, else f32), the key/value
  cache precision (u8) and dynamic int8 quantization of activations per group
  (DYNAMIC_QUANTIZATION_GROUP_SIZE); the primitives its FullyConnected nodes run on are read
  from the compiled model and printed.
- ONNX Runtime GenAI (/tmp/benchenv-ort): onnxruntime-genai (it pulls onnxruntime), onnx,
  onnx_ir (the builder imports it without requiring it), transformers, torch. Export:
  onnxruntime_genai.models.builder -p int4 -e cpu, block_size=32, accuracy_level=4 (int8
  activations: MLAS's CompInt8 kernels), prune_lm_head=true (the head for the last position
  only), from the checkpoint beside a tokenizer.json made from its tokenizer.model (the
  builder loads a tokenizer); the embedding stays fp32 (the builder's default).

Exports are made once into the benchmark's --workdir (keyed by the checkpoint and the options)
and reused; their time and peak RSS are kept beside them (export.json) and printed.

The engines (here: llama.cpp, OpenVINO, ONNX Runtime GenAI; pyguard's model in bench_guard.py)
expose reset(), feed(ids) -> the last position's logits, save() and restore(saved) (the
key/value cache's length and, where the engine needs it, its content), and run_setup() times
them all the same way on the same token ids.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent

DECODE_STEPS = 2  # greedy steps after the prompt and "\n\n": a verdict ("safe" / "unsafe" and the end)

PEERS = {
    "openvino": {
        "title": "OpenVINO",
        "venv": "/tmp/benchenv-openvino",
        "packages": ["openvino==2026.4.1", "optimum-intel[openvino]==2.2.0", "nncf"],
        "after": [["uninstall", "-y", "torchvision"]],  # pulled by optimum; its import breaks transformers
    },
    "ort": {
        "title": "ONNX Runtime GenAI",
        "venv": "/tmp/benchenv-ort",
        "packages": ["onnxruntime-genai==0.18.0", "onnx", "onnx_ir", "transformers"],
        "after": [],
    },
}


def torch_requirement() -> str:
    """This interpreter's torch release (without its local label) when it has one: pip may then
    take the CPU wheel already on the machine instead of a CUDA build."""
    from importlib import metadata

    try:
        return "torch==" + metadata.version("torch").split("+")[0]
    except metadata.PackageNotFoundError:
        return "torch"


def ensure_venv(name: str, venv: str | None = None) -> str:
    """The peer environment's python, created on first use; raises RuntimeError if pip fails."""
    spec = PEERS[name]
    venv = venv or spec["venv"]
    py = pathlib.Path(venv) / "bin" / "python"
    marker = pathlib.Path(venv) / ".pyguard-bench-ready"
    if marker.exists():
        return str(py)
    log = pathlib.Path(venv + ".log")
    print(f"creating {venv} for {spec['title']} (pip, several minutes; log {log}) ...", file=sys.stderr)
    t0 = time.perf_counter()
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    with open(log, "a") as out:
        r = subprocess.run(["nice", "-n", "10", str(py), "-m", "pip", "install", torch_requirement(), "numpy", *spec["packages"]],
                           stdout=out, stderr=subprocess.STDOUT)
        if r.returncode:
            raise RuntimeError(f"pip could not install {spec['title']} into {venv} (see {log})")
        for cmd in spec["after"]:
            subprocess.run([str(py), "-m", "pip", *cmd], stdout=out, stderr=subprocess.STDOUT)
    marker.write_text(f"{time.perf_counter() - t0:.0f} s\n")
    return str(py)


def hf_checkpoint(workdir: str, seed: int = 0, geometry: str = "1b") -> str:
    """The benchmark's Hugging Face checkpoint (Llama Guard 3 1B geometry, or 8B's, random bf16
    weights, the Llama 3 tokenizer.model), written into workdir/hf (hf8b) on first use (with
    pyguard, in the project's interpreter; the 8B's 16 GB in 4 shards, a block of rows at a
    time); tools/bench_guard.py and tools/bench.py share it."""
    hf = pathlib.Path(workdir) / ("hf" if geometry == "1b" else "hf" + geometry)
    if not (hf / "config.json").exists():
        from pyguard.convert.checkpoint import GUARD_1B, GUARD_8B, reference_tokenizer_model, write_checkpoint

        cfg, shard = {"1b": (GUARD_1B, None), "8b": (GUARD_8B, 5 * 10**9)}[geometry]
        print(f"writing a random Llama Guard 3 {geometry.upper()} checkpoint to {hf} ...", file=sys.stderr)
        write_checkpoint(str(hf) + ".part", cfg, seed=seed, tokenizer_model=reference_tokenizer_model(), max_shard_bytes=shard)
        os.replace(str(hf) + ".part", hf)
    return str(hf)


LLAMA3_SPECIAL = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
                  128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>",
                  128010: "<|python_tag|>"}


def with_tokenizer(hf_dir: str) -> str:
    """hf_dir's files (linked) beside a Hugging Face tokenizer.json made from its
    original/tokenizer.model (transformers' TikTokenConverter and the 256 Llama 3 special
    tokens), made once in this interpreter: the ORT GenAI builder loads a tokenizer (the
    benchmark itself feeds token ids)."""
    import shutil

    out = pathlib.Path(str(hf_dir) + "-tok")
    if (out / "tokenizer.json").exists():
        return str(out)
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir()
    for f in pathlib.Path(hf_dir).iterdir():
        if f.name != "original":
            (part / f.name).symlink_to(f.resolve())
    reserved = iter(range(256))
    specials = [LLAMA3_SPECIAL.get(i) or f"<|reserved_special_token_{next(reserved)}|>" for i in range(128000, 128256)]
    tok = TikTokenConverter(vocab_file=str(pathlib.Path(hf_dir) / "original" / "tokenizer.model"),
                            extra_special_tokens=specials).converted()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>").save_pretrained(part)
    os.replace(part, out)
    return str(out)


def checkpoint_key(hf_dir: str) -> str:
    h = hashlib.sha256()
    for f in sorted(pathlib.Path(hf_dir).glob("*.json")) + sorted(pathlib.Path(hf_dir).glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name} {st.st_size} {int(st.st_mtime)}".encode())
    return h.hexdigest()[:10]


def export(name: str, hf_dir: str, workdir: str, py: str, group: int) -> tuple[str, dict]:
    """The peer's model made from hf_dir (once: later calls reuse it) and its export.json."""
    tag = f"g{group}" if name == "openvino" else "b32-acc4"
    out = pathlib.Path(workdir) / f"{name}-{tag}-{checkpoint_key(hf_dir)}"
    info = out / "export.json"
    if not info.exists():
        print(f"exporting {PEERS[name]['title']} to {out} (minutes) ...", file=sys.stderr)
        src = with_tokenizer(hf_dir) if name == "ort" else hf_dir
        r = subprocess.run(["nice", "-n", "5", py, str(HERE / "bench_peers.py"), "--export", name, "--hf", src,
                            "--out", str(out), "--group", str(group)], capture_output=True, text=True)
        if r.returncode or not info.exists():
            tail = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
            raise RuntimeError(f"{PEERS[name]['title']} export failed: {tail}")
    return str(out), json.loads(info.read_text())


def peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children_peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# ---------------------------------------------------------------- exports (in the peer's venv)


def export_openvino(hf: str, out: str, group: int) -> dict:
    import openvino
    from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig

    q = OVWeightQuantizationConfig(bits=4, sym=True, group_size=group, ratio=1.0, all_layers=True)
    model = OVModelForCausalLM.from_pretrained(hf, export=True, quantization_config=q, compile=False, stateful=True)
    model.save_pretrained(out)
    return {"openvino": openvino.__version__, "weights": f"int4 sym group {group}, ratio 1.0, all layers"}


def export_ort(hf: str, out: str) -> dict:
    import onnxruntime_genai

    cache = out + ".cache"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out, "-p", "int4", "-e", "cpu",
           "-c", cache, "--extra_options", "block_size=32", "accuracy_level=4", "prune_lm_head=true"]
    with open(out + ".log", "w") as log:  # the builder's progress bars and quantizer's lines
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"the model builder failed (exit {r.returncode}): see {out}.log")
    return {"onnxruntime_genai": onnxruntime_genai.__version__, "weights": "MatMulNBits int4 block 32, accuracy level 4"}


def export_main(args) -> None:
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    info = export_openvino(args.hf, args.out, args.group) if args.export == "openvino" else export_ort(args.hf, args.out)
    info.update(export_s=time.perf_counter() - t0, peak_rss_mb=max(peak_rss_mb(), children_peak_rss_mb()))
    pathlib.Path(args.out, "export.json").write_text(json.dumps(info))


# ---------------------------------------------------------------- engines


class OpenVINOEngine:
    def __init__(self, model_dir: str, threads: int):
        import openvino as ov

        self.ov = ov
        core = ov.Core()
        model = core.read_model(str(pathlib.Path(model_dir) / "openvino_model.xml"))
        self.head_sliced = _slice_before_head(model)
        t0 = time.perf_counter()
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                          "PERFORMANCE_HINT": "LATENCY"})
        self.compile_s = time.perf_counter() - t0
        self.request = self.compiled.create_infer_request()
        self.inputs = {i.get_any_name() for i in self.compiled.inputs}
        self.pos = 0

    def info(self) -> dict:
        props = {}
        for p in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "DYNAMIC_QUANTIZATION_GROUP_SIZE", "INFERENCE_NUM_THREADS"):
            try:
                v = self.compiled.get_property(p)
            except Exception:  # noqa: BLE001  (a property this release does not have)
                continue
            props[p] = v.get_type_name() if hasattr(v, "get_type_name") else str(v)
        return {"version": self.ov.get_version(), "properties": props, "head_last_position_only": self.head_sliced,
                "compile_s": self.compile_s}

    def kernels(self) -> dict:
        """{primitive (runtime precision): count} of the FullyConnected nodes as last executed
        (the plugin picks them per shape: a prefill's and a decode step's may differ)."""
        out: dict = {}
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            if "layerType" in rt and rt["layerType"].astype(str) == "FullyConnected":
                k = f"{rt['primitiveType'].astype(str)} ({rt['runtimePrecision'].astype(str)})"
                out[k] = out.get(k, 0) + 1
        return out

    def reset(self) -> None:
        self.request.reset_state()
        self.pos = 0

    def feed(self, ids: list[int]) -> np.ndarray:
        n = len(ids)
        feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, self.pos + n), np.int64),
                "position_ids": np.arange(self.pos, self.pos + n, dtype=np.int64)[None], "beam_idx": np.zeros(1, np.int32)}
        self.request.infer({k: v for k, v in feed.items() if k in self.inputs})
        self.pos += n
        return self.request.get_tensor("logits").data[0, -1].copy()

    def save(self):
        return self.pos, {s.name: s.state.data.copy() for s in self.request.query_state()}

    def restore(self, saved) -> None:
        self.pos, states = saved
        for s in self.request.query_state():
            s.state = self.ov.Tensor(states[s.name])


def _slice_before_head(model) -> bool:
    """Have the head's MatMul take the last position only (the logits output keeps its rank)."""
    import openvino as ov

    try:
        import openvino.opset13 as ops
    except ImportError:  # older layouts
        from openvino.runtime import opset13 as ops
    node = model.output("logits").get_node()
    for _ in range(8):  # Result <- (Convert...) <- MatMul
        node = node.input_value(0).get_node()
        if node.get_type_name() == "MatMul":
            break
    else:
        return False
    hidden = node.input_value(0)
    last = ops.slice(hidden, np.array([-1], np.int64), np.array([np.iinfo(np.int64).max], np.int64), np.array([1], np.int64),
                     np.array([1], np.int64))
    node.input(0).replace_source_output(last.output(0))
    model.validate_nodes_and_infer_types()
    return True


class OrtGenaiEngine:
    def __init__(self, model_dir: str, threads: int, max_length: int):
        import onnxruntime_genai as og

        self.og = og
        cfg_path = pathlib.Path(model_dir) / "genai_config.json"
        cfg = json.loads(cfg_path.read_text())
        opts = cfg["model"]["decoder"].setdefault("session_options", {})
        want = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        if any(opts.get(k) != v for k, v in want.items()) or cfg["search"].get("max_length") != max_length:
            opts.update(want)
            cfg["search"]["max_length"] = max_length  # else a key/value buffer for the whole context
            cfg_path.write_text(json.dumps(cfg, indent=2))
        t0 = time.perf_counter()
        self.model = og.Model(og.Config(model_dir))
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length)
        self.generator = og.Generator(self.model, params)
        self.compile_s = time.perf_counter() - t0
        self.model_dir = model_dir
        self.pos = 0

    def info(self) -> dict:
        import onnxruntime

        res = {"version": self.og.__version__, "onnxruntime": onnxruntime.__version__, "compile_s": self.compile_s}
        try:
            import onnx

            m = onnx.load(str(pathlib.Path(self.model_dir) / "model.onnx"), load_external_data=False)
            kinds: dict = {}
            for n in m.graph.node:
                if n.op_type in ("MatMulNBits", "GatherBlockQuantized", "MatMul"):
                    a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
                    k = f"{n.op_type} bits {a.get('bits', '-')} block {a.get('block_size', '-')} acc {a.get('accuracy_level', '-')}"
                    kinds[k] = kinds.get(k, 0) + 1
            res["ops"] = kinds
        except Exception as e:  # noqa: BLE001
            res["ops"] = f"not read: {e}"
        return res

    def reset(self) -> None:
        self.restore(0)

    def feed(self, ids: list[int]) -> np.ndarray:
        self.generator.append_tokens(np.array([ids], np.int32))
        self.pos += len(ids)
        return np.asarray(self.generator.get_output("logits"))[0, -1].astype(np.float32)

    def save(self):
        return self.pos

    def restore(self, saved) -> None:
        if saved != self.pos:
            self.generator.rewind_to(saved)
        self.pos = saved


class LlamaCppEngine:
    def __init__(self, gguf: str, threads: int, n_ctx: int = 2048):
        import llama_cpp

        self.llama_cpp = llama_cpp
        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(gguf, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.compile_s = time.perf_counter() - t0
        self.vocab = self.llm.n_vocab()

    def info(self) -> dict:
        sysinfo = self.llama_cpp.llama_print_system_info()
        return {"version": self.llama_cpp.__version__, "compile_s": self.compile_s,
                "system": sysinfo.decode() if isinstance(sysinfo, bytes) else str(sysinfo)}

    def reset(self) -> None:
        self.llm.reset()

    def feed(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,)).copy()

    def save(self):
        return self.llm.n_tokens

    def restore(self, saved) -> None:
        ctx = self.llm._ctx
        rm = getattr(ctx, "memory_seq_rm", None) or getattr(ctx, "kv_cache_seq_rm")
        rm(-1, saved, -1)
        self.llm.n_tokens = saved


# ---------------------------------------------------------------- timing (the same for every engine)


def latency(times: list[float]) -> dict:
    return {"median": statistics.median(times), "p95": float(np.percentile(times, 95)), "n": len(times)}


def run_setup(engine, setup: dict) -> dict:
    """Figures of one engine on setup's token ids:
    - classification ("one", "two": lists of prompts; "answer_start": the ids forced after
      each): the prompt and answer_start in one pass, then DECODE_STEPS greedy single tokens;
      "one" from position 0 (every prompt whole) and, "one_kept", with the policy prefix
      (setup["policy"] tokens, the same in every prompt) kept in the engine's cache from one
      earlier pass and restored before each prompt (the restore is timed);
    - "batch_1": conversations/s over one and two, one after the other, from position 0;
    - rates ("prefill": {n: ids}, "decode": ids): tok/s of a pass over each prompt from
      position 0 and of single-token steps after "decode_after" (default: the last prefill prompt).
    Also the first answer token of each one-turn prompt both ways (the cache restore's check)."""
    res: dict = {}
    answer = setup.get("answer_start", [])

    def classify(ids: list[int], start: int) -> int:
        logits = engine.feed(ids[start:] + answer)
        first = int(np.argmax(logits))
        tok = first
        for _ in range(DECODE_STEPS):
            tok = int(np.argmax(engine.feed([tok])))
        return first

    if "one" in setup:
        engine.reset()
        engine.feed(setup["warm_up"])  # one-time set-up costs (compilation, allocations)
        for name in ("one", "two"):
            times, first = [], []
            for ids in setup[name]:
                engine.reset()
                t0 = time.perf_counter()
                first.append(classify(ids, 0))
                times.append(time.perf_counter() - t0)
            res[name] = {**latency(times), "argmax": first}
        policy = setup["policy"]
        engine.reset()
        engine.feed(setup["one"][0][:policy])
        saved = engine.save()
        times, first = [], []
        for ids in setup["one"]:
            assert ids[:policy] == setup["one"][0][:policy], "the prompts do not share the policy prefix"
            t0 = time.perf_counter()
            engine.restore(saved)
            first.append(classify(ids, policy))
            times.append(time.perf_counter() - t0)
        res["one_kept"] = {**latency(times), "argmax": first}
        res["kept_agrees"] = sum(a == b for a, b in zip(first, res["one"]["argmax"]))
        mix = setup["one"] + setup["two"]
        t0 = time.perf_counter()
        for ids in mix:
            engine.reset()
            classify(ids, 0)
        res["batch_1"] = len(mix) / (time.perf_counter() - t0)
    if "prefill" in setup:
        for n, ids in setup["prefill"].items():
            engine.reset()
            engine.feed(ids[:8])  # warm up this engine's prompt path
            engine.reset()
            t0 = time.perf_counter()
            engine.feed(ids)
            res[f"prefill_{n}"] = len(ids) / (time.perf_counter() - t0)
        if hasattr(engine, "kernels"):
            res["prefill_kernels"] = engine.kernels()
        engine.reset()
        engine.feed(setup.get("decode_after", ids))  # the decode rate's context: this prompt's
        t0 = time.perf_counter()
        for t in setup["decode"]:
            engine.feed([t])
        res["decode_tok_s"] = len(setup["decode"]) / (time.perf_counter() - t0)
        if hasattr(engine, "kernels"):
            res["decode_kernels"] = engine.kernels()
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def run_main(args) -> None:
    setup = json.loads(pathlib.Path(args.setup).read_text())
    base = peak_rss_mb()
    t0 = time.perf_counter()
    if args.run == "openvino":
        engine = OpenVINOEngine(args.model, args.threads)
    else:
        longest = max(len(x) for k in ("one", "two") for x in setup.get(k, [])) if "one" in setup else 0
        longest = max([longest] + [len(x) for x in setup.get("prefill", {}).values()])
        engine = OrtGenaiEngine(args.model, args.threads, longest + 64 + len(setup.get("decode", [])))
    load = time.perf_counter() - t0
    res = run_setup(engine, setup)
    print(json.dumps({**res, "load_s": load, "base_rss_mb": base, "info": engine.info()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", choices=tuple(PEERS))
    ap.add_argument("--run", choices=tuple(PEERS))
    ap.add_argument("--hf")
    ap.add_argument("--out")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--model")
    ap.add_argument("--setup")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.export:
        return export_main(args)
    if args.run:
        return run_main(args)
    ap.error("--export or --run")


if __name__ == "__main__":
    main()
