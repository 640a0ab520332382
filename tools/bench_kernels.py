"""Kernel benchmark on the Llama Guard 3 1B shapes (not a test: prints figures and ratios).

gemv: effective GB/s (packed weights + scales read per call / time) beside a plain streaming
read (pg_stream_read) of buffers of the same size, measured in the same run with the same
rotation over copies, so that neither is served from a cache the other does not get.
gemm: G multiply-adds/s (N*M*K / time) and the fraction of the path's ceiling, measured on this
machine in the same run (pg_peak_macs: 8 independent instructions of the path's integer core a
round, vpmaddubsw, vpdpbusd ymm or zmm, 4 tdpbsud for amx, times the threads), so a run on any
CPU says how close each path comes to what its instructions allow there.
sgemm: the converter's float32 products (kernels.sgemm, a calibration layer's shape: 2048 tokens,
2048 inputs, 8192 outputs), G multiply-adds/s on 1 and 2 threads, beside numpy's BLAS on the same
product (one thread: pyguard keeps it so, pyguard/engine/blas.py).

    python tools/bench_kernels.py [--group 256 32] [--reps 20] [--isa avx2 amx]   (default: every path)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pyguard.engine import blas, kernels  # noqa: E402
from pyguard.formats import quant  # noqa: E402
from pyguard._kernels import ffi, lib  # noqa: E402

SHAPES = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)]
ROTATION_BYTES = 1 << 30  # copies cycled through so that each call reads from memory


def random_qtensor(rng: np.random.Generator, m: int, k: int, group: int) -> quant.QTensor:
    q = rng.integers(-8, 8, size=(m, k), dtype=np.int8)
    scales = (rng.random((m, k // group)) * 0.02 + 0.001).astype(np.float16)
    return quant.pack_weights(q, scales)


def best_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_gemv(rng, m, k, group, reps):
    proto = random_qtensor(rng, m, k, group)
    nbytes = proto.qs.nbytes + proto.scales.nbytes
    copies = max(2, ROTATION_BYTES // nbytes)
    ws = [quant.QTensor(proto.qs.copy(), proto.scales.copy(), proto.rowsum, group) for _ in range(copies)]
    bufs = [np.empty(nbytes, np.uint8) for _ in range(copies)]
    for b in bufs:
        b[:] = 1
    x = rng.standard_normal(k).astype(np.float32)
    y = np.empty(m, np.float32)
    state = {"i": 0}

    def gemv():
        for _ in range(copies):
            kernels.gemv(ws[state["i"] % copies], x, out=y)
            state["i"] += 1

    def read():
        for _ in range(copies):
            b = bufs[state["i"] % copies]
            lib.pg_stream_read(kernels.default_pool().c, ffi.cast("uint8_t *", ffi.from_buffer(b)), b.nbytes)
            state["i"] += 1

    calls = copies
    t_gemv = best_time(gemv, reps) / calls
    t_read = best_time(read, reps) / calls
    return nbytes / t_gemv / 1e9, nbytes / t_read / 1e9


def bench_gemm(rng, m, k, n, group, reps):
    w = random_qtensor(rng, m, k, group)
    a = kernels.quantize_acts(rng.standard_normal((n, k)).astype(np.float32))
    y = np.empty((n, m), np.float32)
    t = best_time(lambda: kernels.gemm(w, a, out=y), reps)
    return n * m * k / t / 1e9


def bench_sgemm(rng, reps):
    """(kernels.sgemm on 1 thread, on 2, numpy's BLAS) G multiply-adds/s on a calibration layer's product."""
    a, b = rng.standard_normal((2048, 2048)).astype(np.float32), rng.standard_normal((8192, 2048)).astype(np.float32)
    macs = 2048 * 2048 * 8192 / 1e9
    own = [macs / best_time(lambda: kernels.sgemm(a, b, pool), reps) for pool in (kernels.Pool(1), kernels.Pool(2))]
    return *own, macs / best_time(lambda: a @ b.T, reps)


def peak_gmacs(threads: int) -> float:
    """The active path's integer-core ceiling on this machine, G multiply-adds/s, on `threads`
    threads at once (0 if the path has none)."""
    iters = 2_000_000 if kernels.isa() != "amx" else 200_000

    def one(_):
        t0 = time.perf_counter()
        n = lib.pg_peak_macs(iters)
        return n / (time.perf_counter() - t0)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as ex:  # cffi releases the GIL during the call
        return max(sum(ex.map(one, range(threads))) for _ in range(5)) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group", type=int, nargs="+", default=[256, 32])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--isa", nargs="+", default=None, help="kernel paths (default: every path this CPU runs)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"CPU: {kernels.cpu_model()}; features: {' '.join(kernels.cpu_features())}")
    print(f"paths: {' '.join(kernels.available_isas())} (chosen by default: {kernels.isa()}); amx: {kernels.amx_status()}")
    for isa in args.isa or [i for i in kernels.available_isas() if i != "scalar"]:
        kernels.set_isa(isa)
        ceilings = {t: peak_gmacs(t) for t in (1, 2)}
        print(f"\n=== path {isa}: integer-core ceiling {ceilings[1]:.0f} G multiply-adds/s on 1 thread, {ceilings[2]:.0f} on 2")
        one, two, ref = bench_sgemm(rng, 3)
        print(f"converter sgemm 2048x2048 . 8192x2048^T: {one:.1f} G multiply-adds/s on 1 thread ({one / ref:.2f}x numpy's "
              f"BLAS, {' '.join(blas.openblas_cores()) or 'not OpenBLAS'}, on its 1: {ref:.1f}), {two:.1f} on 2")
        for group in args.group:
            print(f"\n== {isa}, group size {group}")
            print(f"{'shape':>11} {'thr':>3} | {'gemv GB/s':>9} {'read GB/s':>9} {'ratio':>5} | "
                  f"{'gemm GMAC/s N=16':>16} {'N=64':>6} {'N=256':>6} {'of ceil':>7}")
            for m, k in SHAPES:
                for threads in (1, 2):
                    kernels.set_threads(threads)
                    g, r = bench_gemv(rng, m, k, group, args.reps)
                    ops = [bench_gemm(rng, m, k, n, group, max(3, args.reps // 2)) for n in (16, 64, 256)]
                    ceil = f"{ops[2] / ceilings[threads]:7.0%}" if ceilings[threads] else f"{'-':>7}"
                    print(f"{m:>5}x{k:<5} {threads:>3} | {g:9.1f} {r:9.1f} {g / r:5.2f} | "
                          f"{ops[0]:16.1f} {ops[1]:6.1f} {ops[2]:6.1f} {ceil}")


if __name__ == "__main__":
    main()
