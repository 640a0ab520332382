"""Rows/s of dataset classification on Ray Data against one process (not a test).

    python tools/bench_ray.py [--rows 512] [--group 256] [--workdir /tmp/pyguard-ray-bench]

Llama Guard 3 1B geometry with random int4 weights (drawn directly, tests/synth.py), guard
head, the real Llama 3 tokenizer; the file is made in --workdir on first use. The same
conversations (bench_guard's one- and two-turn ones, each made distinct) through:

- single: Guard.classify_many in this process, 2 threads (batches of 16);
- ray 1x2: pyguard.ray.classify on a local cluster of 2 CPUs, 1 actor x 2 threads;
- ray 2x1: the same cluster, 2 actors x 1 thread;
- 2 nodes: ray.cluster_utils.Cluster, two nodes of 1 CPU on this machine, 2 actors x 1 thread.

Each Ray run takes its rows from memory (ray.data.from_items: no read task) and is timed from the job's
start to its last row, actor start-up (a mapped file: milliseconds) included, cluster
start-up not. Peak RSS per actor: VmHWM of the actor processes, sampled while the job runs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools"), str(ROOT / "tests")]


def peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def model_file(workdir: str, group: int) -> str:
    from pyguard import file
    from pyguard.checkpoint import reference_tokenizer_model
    from pyguard.tokenizer import Tokenizer
    from synth import GUARD_1B, GUARD_HEAD, random_int4_checkpoint

    path = os.path.join(workdir, f"guard1b-g{group}.pgw")
    if not os.path.exists(path):
        print(f"writing {path} ...", file=sys.stderr)
        os.makedirs(workdir, exist_ok=True)
        tensors, _ = random_int4_checkpoint(GUARD_1B, group, head_ids=GUARD_HEAD)
        file.save(path, GUARD_1B, tensors, head_ids=GUARD_HEAD, family="llama-guard-3-1b",
                  tokenizer=Tokenizer.from_file(reference_tokenizer_model()))
    return path


def conversations(n: int) -> list[dict]:
    from bench_guard import conversations as pairs

    one, two = pairs()
    out = []
    for i in range(n):
        c = [dict(m) for m in (one + two)[i % (len(one) + len(two))]]
        c[-1]["content"] += f" ({i})"
        out.append({"id": i, "messages": c})
    return out


def single(path: str, rows: list[dict]) -> dict:
    from pyguard import Guard

    guard = Guard.load(path, threads=2)
    t0 = time.perf_counter()
    guard.classify_many([r["messages"] for r in rows], batch_size=16)
    return {"rows_s": len(rows) / (time.perf_counter() - t0), "peak_rss_mb": peak_rss_mb()}


def actor_rss_mb() -> dict[int, float]:
    """Peak RSS (VmHWM) of this machine's pyguard actors, by pid."""
    out = {}
    for p in os.listdir("/proc"):
        try:
            if b"MapBatches(Classifier)" in open(f"/proc/{p}/cmdline", "rb").read():
                out[int(p)] = next(int(x.split()[1]) / 1024 for x in open(f"/proc/{p}/status") if x.startswith("VmHWM:"))
        except (OSError, ValueError, StopIteration):
            pass
    return out


def on_ray(path: str, rows: list[dict], actors: int, threads: int) -> dict:
    import threading

    import ray

    import pyguard.ray as pgray

    ds = ray.data.from_items(rows)  # blocks already in the object store: no read task
    rss: dict[int, float] = {}
    running = True

    def sample() -> None:  # the actors exit with the job: read their peaks while it runs
        while running:
            for pid, mb in actor_rss_mb().items():
                rss[pid] = max(rss.get(pid, 0.0), mb)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    got = pgray.classify(ds, path, concurrency=actors, threads_per_worker=threads).take_all()
    dt = time.perf_counter() - t0
    running = False
    sampler.join()
    assert sorted(r["id"] for r in got) == list(range(len(rows))) and not any(r["error"] for r in got)
    return {"rows_s": len(rows) / dt, "peak_rss_mb_per_actor": sorted(round(v) for v in rss.values()),
            "peak_rss_mb_total": round(sum(rss.values()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--group", type=int, default=256)
    ap.add_argument("--workdir", default="/tmp/pyguard-ray-bench")
    args = ap.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    path, rows = model_file(args.workdir, args.group), conversations(args.rows)
    res = {"single 1x2": single(path, rows)}
    ray.init("local", num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    res["ray 1x2"] = on_ray(path, rows, 1, 2)
    res["ray 2x1"] = on_ray(path, rows, 2, 1)
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    res["2 nodes 2x1"] = on_ray(path, rows, 2, 1)
    ray.shutdown()
    cluster.shutdown()
    base = res["single 1x2"]["rows_s"]
    print(f"{args.rows} conversations, 1B geometry, group {args.group}, guard head, 2 cores")
    for name, r in res.items():
        print(f"{name:12s} {r['rows_s']:.3f} rows/s ({r['rows_s'] / base:.3f} of single)  {r['rows_s'] / 2:.3f} rows/s per core  "
              + json.dumps({k: v for k, v in r.items() if k != "rows_s"}))


if __name__ == "__main__":
    main()
