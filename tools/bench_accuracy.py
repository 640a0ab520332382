"""How far the quantized engine's logits are from the unquantized checkpoint (not a test;
needs torch and transformers): on real pretrained weights (--real DIR), or on random ones.

    python tools/smollm2.py /tmp/smollm2 && python tools/bench_accuracy.py --real /tmp/smollm2 [--groups 32 64]
        [--llama-cpp /tmp/benchenv/bin/python]
    python tools/bench_accuracy.py [--geometry small|1b] [--tokens 256] [--groups 32 64 128 256]

--real: a Hugging Face float checkpoint (SmolLM2-135M-Instruct from tools/smollm2.py) run by
transformers in float32 is the reference, on held-out text in several languages (HELD_OUT, not
the calibration conversations). Each converter setting is converted with `pyguard convert`'s
code and run by the engine (int4 weights, int8 activations), and its dequantized weights are
run by transformers (float activations: what weight rounding alone costs). Calibration prompts
are the built-in conversations in the guard template, tokenized by the checkpoint's tokenizer.
Settings: plain scales, importance-weighted scales, folding, GPTQ (error feedback in activation
order; with folding: the converter's default), with the int8 embedding table/head (the default)
or, for the first two rows, the int4 table (as before format 2).
--llama-cpp: llama.cpp's Q4_0 and Q4_K_M of the same weights (the source GGUF's values written as
an F32 GGUF, then llama_model_quantize), run by llama-cpp-python on the same token ids; the F32
GGUF is run too, as a check that both runtimes compute the same model. Each pyguard row then says
whether the issue's target is met (on every text: KL at most half of Q4_0's, top-1 above it;
a file no larger than Q4_0's).

The reference is the checkpoint run in float32 by transformers (bf16 weights, exact
arithmetic otherwise). For each int4 group size: the oracle with the dequantized int4
weights and float activations (what weight rounding alone costs), and pyguard (int4 weights
and int8 activations), each with plain absmax scales and with the converter's searched scales
(the gain is absmax's error over the searched one's). Per position: KL(reference || model) of the softmax over the full
vocabulary, and whether the top token is the same. Random weights as in the tests, except
the head: independent Gaussian rows giving logits of std --logit-std, a flat output where any
change of the hidden state reorders the top tokens (--decisive keeps the tests' head, built
from the embedding, whose top token wins by a wide margin). Random Gaussian weights are a
harsh case for int4: trained checkpoints quantize far better (Meta's 1B-INT4 loses no F1).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import oracle  # noqa: E402
import synth  # noqa: E402
import torch  # noqa: E402
from pyguard.convert import calibrate  # noqa: E402
from pyguard.formats import file  # noqa: E402
from pyguard.formats.config import ModelConfig  # noqa: E402
from pyguard.convert.hf import convert, read_config  # noqa: E402
from pyguard.engine.model import Model  # noqa: E402
from pyguard.guard.prompt import format_prompt  # noqa: E402

SMALL = ModelConfig(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, head_dim=64, hidden_dim=4096, vocab_size=8192,
                    rope_theta=500000.0, rope_scaling=synth.GUARD_1B.rope_scaling, max_seq_len=131072)


def kl_top1(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Mean KL(softmax(ref) || softmax(got)) in nats, and top-1 agreement."""
    lp = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(got).double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return kl, float(np.mean(ref.argmax(1) == got.argmax(1)))


HELD_OUT = {
    "en": "The old lighthouse keeper climbed the spiral stairs every evening at dusk. For forty years he had trimmed the wick, "
          "polished the lens and written the weather in a leather notebook. Ships no longer needed him; satellites guided them now. "
          "Still, the town council voted each spring to keep the light burning, partly out of habit and partly because the "
          "children liked to watch the beam sweep across the bay. When he finally retired, nobody applied for the job.",
    "chat": "User: Can you explain how vaccines train the immune system?\n\nAssistant: Sure. A vaccine shows your immune system "
            "a harmless piece or copy of a germ, such as a protein from its surface. Your body makes antibodies and memory cells "
            "against it, so if the real germ arrives later, the response is fast and strong.\n\nUser: And why do some need boosters?",
    "code": "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n    i = j = 0\n    out = []\n"
            "    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i])\n            i += 1\n"
            "        else:\n            out.append(b[j])\n            j += 1\n    out.extend(a[i:])\n    out.extend(b[j:])\n    return out\n",
    "fr": "Le petit village se réveillait lentement sous la brume d'automne. Le boulanger avait déjà sorti ses premières "
          "baguettes, et l'odeur du pain chaud flottait dans la rue principale. Sur la place, quelques anciens discutaient "
          "du prix des pommes et de la pluie qui n'arrivait pas, tandis que les enfants couraient vers l'école.",
    "de": "Am Montagmorgen war der Bahnhof voller Menschen, die zur Arbeit fuhren. Ein verspäteter Zug sorgte für Unruhe, "
          "doch die Durchsage kam rasch: Der Ersatzverkehr stehe bereit. Die meisten Reisenden nahmen es gelassen, holten "
          "sich einen Kaffee und lasen weiter in ihren Zeitungen, bis der Bus eintraf.",
    "es": "Durante el verano, la familia viajaba a la costa para visitar a los abuelos. Pasaban las tardes en la playa, "
          "recogiendo conchas y construyendo castillos de arena, y por la noche cenaban pescado fresco en la terraza mientras "
          "el abuelo contaba historias de cuando era pescador.",
}


LLAMA_WORKER = """
import ctypes, json, os, sys
import numpy as np
import gguf, llama_cpp
from gguf.quants import dequantize

src, work = sys.argv[1:3]
texts = json.load(open(os.path.join(work, "ids.json")))
f32 = os.path.join(work, "F32.gguf")  # the GGUF's values dequantized: the same weights as the HF checkpoint
r = gguf.GGUFReader(src)
w = gguf.GGUFWriter(f32, r.fields["general.architecture"].contents())
for f in r.fields.values():
    if not f.name.startswith("GGUF.") and f.name != "general.architecture":
        val = 0 if f.name == "general.file_type" else f.contents()  # 0: all F32
        w.add_key_value(f.name, val, f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
for t in r.tensors:
    w.add_tensor(t.name, np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape([int(n) for n in reversed(t.shape)]))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
sizes = {}
for label in ("F32", "Q4_0", "Q4_K_M"):
    path = os.path.join(work, label + ".gguf")
    if label != "F32":
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.nthread = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + label), 2
        if llama_cpp.llama_model_quantize(f32.encode(), path.encode(), ctypes.byref(p)):
            raise SystemExit("llama_model_quantize failed: " + label)
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, logits_all=True, n_threads=2, verbose=False)
    for k, ids in texts.items():
        llm.reset()
        llm.eval(ids)
        np.save(os.path.join(work, label + "." + k + ".npy"), np.asarray(llm.scores[: len(ids)], np.float32))
    sizes[label] = os.path.getsize(path)
    del llm
json.dump(sizes, open(os.path.join(work, "sizes.json"), "w"))
"""


def llama_cpp_rows(python: str, gguf_path: str, texts: dict, refs: dict) -> dict[str, tuple[int, list]]:
    """{llama.cpp type: (file bytes, [(KL, top-1) per text])} for F32, Q4_0 and Q4_K_M of the GGUF's
    weights, written with llama_model_quantize and run by llama-cpp-python in its own venv."""
    import json
    import subprocess

    with tempfile.TemporaryDirectory(prefix="pyguard-accuracy-") as work:  # the quantized GGUFs: hundreds of MB
        with open(os.path.join(work, "ids.json"), "w") as f:
            json.dump({k: [int(i) for i in v] for k, v in texts.items()}, f)
        subprocess.run([python, "-c", LLAMA_WORKER, gguf_path, work], check=True, stderr=subprocess.DEVNULL)
        with open(os.path.join(work, "sizes.json")) as f:
            sizes = json.load(f)
        return {label: (size, [kl_top1(refs[k], np.load(os.path.join(work, f"{label}.{k}.npy"))) for k in texts])
                for label, size in sizes.items()}


def real_benchmark(args) -> None:
    """Every converter setting against transformers fp32 on HELD_OUT (see the module doc)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    cfg = read_config(args.real)
    tok = AutoTokenizer.from_pretrained(args.real)
    ref_model = AutoModelForCausalLM.from_pretrained(args.real, dtype=torch.float32).eval()
    texts = {k: tok(v, add_special_tokens=False)["input_ids"][: args.tokens] for k, v in HELD_OUT.items()}
    refs = {k: oracle.oracle_logits(ref_model, ids) for k, ids in texts.items()}
    del ref_model
    convs = calibrate.CONVERSATIONS + [c[:1] for c in calibrate.CONVERSATIONS if len(c) > 1]  # as guard_prompts
    prompts = [tok(format_prompt(c), add_special_tokens=False)["input_ids"] for c in convs]
    print(f"{args.real}: {cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}; held-out tokens "
          + ", ".join(f"{k} {len(v)}" for k, v in texts.items()) + f"; calibration set {len(prompts)} prompts, "
          f"{sum(map(len, prompts))} tokens (the pass runs at most {calibrate.MAX_TOKENS} distinct rows)")
    print(f"{'setting':<28} {'MB':>6}  {'float acts: KL':>14} {'top-1':>6}  {'pyguard: KL':>11} {'top-1':>6}  per text (pyguard KL / top-1)")
    q4_0 = None
    if args.llama_cpp:
        import smollm2

        for label, (size, rows) in llama_cpp_rows(args.llama_cpp, args.gguf or smollm2.gguf_path(), texts, refs).items():
            m = np.mean(rows, axis=0)
            per = " ".join(f"{k} {r[0]:.3f}/{r[1]:.2f}" for k, r in zip(texts, rows))
            print(f"llama.cpp {label:<18} {size / 1e6:6.1f}  {'':>14} {'':>6}  {m[0]:11.4f} {m[1]:6.3f}  {per}", flush=True)
            if label == "Q4_0":
                q4_0 = (size, rows)
    alphas = calibrate.ALPHAS
    settings = {"plain, int4 table": (False, alphas, False, "int4"), "weighted+folding, int4 table": (prompts, alphas, False, "int4"),
                "plain (no calibration)": (False, alphas, False, "int8"), "weighted scales": (prompts, (0.0,), False, "int8"),
                "weighted + folding": (prompts, alphas, False, "int8"), "weighted + GPTQ": (prompts, (0.0,), True, "int8"),
                "default (w+f+GPTQ)": (prompts, alphas, True, "int8")}
    work = tempfile.TemporaryDirectory(prefix="pyguard-accuracy-")  # removed when the run ends, however it ends in Python
    tmp = work.name
    for g in args.groups:
        for label, (cal, calibrate.ALPHAS, calibrate.GPTQ, table) in settings.items():
            if args.only and label not in args.only:
                continue
            out = os.path.join(tmp, f"g{g}.pgw")
            try:
                convert(args.real, out, group=g, calibration=cal, table=table)
            except Exception as e:  # a group the shapes do not allow
                print(f"G={g:<3} {label:<22} {e}")
                break
            f = file.load(out)
            used = f.meta["quant"]["calibration"]
            if used:
                label += f" [{used['tokens']} rows, {used['prompts']} prompts]"
            engine = Model(f.config, f.tensors, f.head_ids, threads=2)
            float_model = oracle.hf_model(cfg, calibrate.float_checkpoint(cfg, f.tensors))
            rows = []
            for k, ids in texts.items():
                rows.append((*kl_top1(refs[k], oracle.oracle_logits(float_model, ids)), *kl_top1(refs[k], engine.logits(ids))))
            m = np.mean(rows, axis=0)
            per = " ".join(f"{k} {r[2]:.3f}/{r[3]:.2f}" for k, r in zip(texts, rows))
            size = os.path.getsize(out)
            met = ""
            if q4_0:  # the target: on every text, KL at most half of Q4_0's and top-1 above it; a file no larger
                ok = size <= q4_0[0] and all(r[2] <= q[0] / 2 and r[3] > q[1] for r, q in zip(rows, q4_0[1]))
                met = "  target met" if ok else "  target not met"
            print(f"G={g:<3} {label:<22} {size / 1e6:6.1f}  {m[0]:14.4f} {m[1]:6.3f}  {m[2]:11.4f} {m[3]:6.3f}  {per}{met}",
                  flush=True)
            del engine, float_model, f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", metavar="DIR", help="a real Hugging Face float checkpoint (tools/smollm2.py)")
    ap.add_argument("--llama-cpp", metavar="PYTHON", help="with --real: also llama.cpp's Q4_0 and Q4_K_M of the same "
                    "weights, run by this Python with llama-cpp-python and gguf (e.g. /tmp/benchenv/bin/python)")
    ap.add_argument("--gguf", help="with --llama-cpp: the GGUF the checkpoint came from (default: tools/smollm2.py's)")
    ap.add_argument("--only", nargs="+", metavar="SETTING", help="with --real: only these converter settings")
    ap.add_argument("--geometry", choices=("small", "1b"), default="small")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--logit-std", type=float, default=3.0)
    ap.add_argument("--decisive", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.real:
        return real_benchmark(args)
    cfg = SMALL if args.geometry == "small" else synth.GUARD_1B  # 1b: ~20 GB of float weights
    torch.set_num_threads(2)

    weights = synth.random_weights(cfg, args.seed)
    if not args.decisive:
        rng = np.random.default_rng([args.seed, 1])  # not random_weights' stream (its embedding)
        head = rng.standard_normal((cfg.vocab_size, cfg.dim)) * (args.logit_std / np.sqrt(cfg.dim))
        weights["lm_head.weight"] = head.astype(np.float32)
    for k, v in weights.items():  # the checkpoint is bf16
        weights[k] = torch.from_numpy(v).bfloat16().float().numpy()
    ids = np.random.default_rng(args.seed + 1).integers(0, cfg.vocab_size, args.tokens)
    ref = oracle.oracle_logits(oracle.hf_model(cfg, weights), ids)
    s = np.sort(ref, 1)
    print(f"{args.geometry} geometry ({cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}), {args.tokens} tokens;"
          f" reference top-1 probability {np.mean(torch.softmax(torch.from_numpy(ref), -1).max(-1).values.numpy()):.2f},"
          f" top-1 margin {np.mean(s[:, -1] - s[:, -2]):.2f} logits")
    print(f"{'group':>5} {'scales':>7} {'weight rel. RMSE':>16}  {'int4 weights: KL':>16} {'top-1':>6}   "
          f"{'pyguard (+int8 acts): KL':>24} {'top-1':>6}")
    matrices = [k for k, v in weights.items() if v.ndim == 2]
    for g in args.groups:
        row = {}
        for search in (False, True):
            tensors, deq = synth.quantize_checkpoint(cfg, weights, g, search=search)
            err = np.sqrt(sum(np.sum((deq[k] - weights[k]) ** 2, dtype=np.float64) for k in matrices)
                          / sum(np.sum(weights[k] ** 2, dtype=np.float64) for k in matrices))
            w_only = oracle.oracle_logits(oracle.hf_model(cfg, deq), ids)
            engine = Model(cfg, tensors).logits(ids)
            row[search] = (err, *kl_top1(ref, w_only), *kl_top1(ref, engine))
            e, kw, tw, ke, te = row[search]
            print(f"{g:5} {'search' if search else 'absmax':>7} {e:16.4f}  {kw:16.4f} {tw:6.3f}   {ke:24.4f} {te:6.3f}")
        print(f"{'':5} {'gain':>7} {row[False][0] / row[True][0]:15.3f}x  {row[False][1] / row[True][1]:15.3f}x "
              f"{'':6}   {row[False][3] / row[True][3]:23.3f}x")


if __name__ == "__main__":
    main()
