"""Rows/s of dataset classification on Ray Data against one process (not a test).

    python tools/bench_ray.py [--rows 512] [--rounds 1] [--group 256] [--workdir /tmp/pyguard-ray-bench]
    python tools/bench_ray.py --switches --rows 12 --rounds 2     # each of pyguard.ray's lean switches

Llama Guard 3 1B geometry with random int4 weights (drawn directly, tests/synth.py), guard
head, the real Llama 3 tokenizer; the file is made in --workdir on first use. The same
conversations (bench_guard's one- and two-turn ones, each made distinct) through:

- single: Guard.classify_many in this process, 2 threads (batches of 16);
- shards 2x1: the rows in two halves, each in its own process with 1 thread (the CLI per shard);
- ray 1x2: pyguard.ray.classify on a local cluster started as pyguard.ray.init starts it (lean,
  the machine's cores and a CPU for Ray Data), 1 actor x 2 threads;
- ray 2x1: the same cluster, 2 actors x 1 thread;
- 2 nodes: ray.cluster_utils.Cluster, two nodes of 1 CPU on this machine, started with the same
  lean switches, 2 actors x 1 thread.

Each Ray run takes its rows from memory (ray.data.from_items: no read task) and is timed from the job's
start to its last row, actor start-up (a worker importing Ray, pyarrow and pyguard: ~3 CPU s)
included, cluster start-up not. The configurations take turns for --rounds rounds; the best of each counts.
Each run also reports the CPU seconds spent meanwhile by pyguard's actors, Ray's own
processes (raylet, GCS, agents, Ray Data's helper actors), the driver and everything else on the machine (other
people's work: the figures mean little when that is large), and each actor's peak memory:
its own (RssAnon) and the mapped file's pages (RssFile), which the actors of a machine
share, so the total counts them once.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools"), str(ROOT / "tests")]
TICK = os.sysconf("SC_CLK_TCK")
DRIVER = open("/proc/self/cmdline", "rb").read()  # this process and its forks (shards)


def model_file(workdir: str, group: int) -> str:
    from pyguard.formats import file
    from pyguard.convert.checkpoint import reference_tokenizer_model
    from pyguard.formats.tokenizer import Tokenizer
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


class Watch:
    """While a run lasts: CPU seconds by kind of process (pyguard's actors, Ray's own processes,
    this driver, everyone else on the machine) and each actor's peak memory, its own (RssAnon)
    and the mapped file's pages (RssFile, shared by the actors of a machine)."""

    def __init__(self) -> None:
        self.cpu0, self.busy0 = self.cpu(), self.busy()
        self.seen: dict[int, tuple[str, float]] = {}
        self.anon: dict[int, float] = {}
        self.file: dict[int, float] = {}
        self.running = True
        self.thread = threading.Thread(target=self.sample)
        self.thread.start()

    @staticmethod
    def busy() -> tuple[float, float]:
        """CPU seconds the machine has spent busy, and stolen by the hypervisor (/proc/stat)."""
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return (f[0] + f[1] + f[2] + f[5] + f[6]) / TICK, f[7] / TICK

    @staticmethod
    def cpu() -> dict[int, tuple[str, float]]:
        out = {}
        for p in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = open(f"/proc/{p}/cmdline", "rb").read()
                stat = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            except (OSError, ValueError):
                continue
            kind = ("driver" if cmd == DRIVER else "actors" if b"MapBatches(Classifier)" in cmd
                    else "ray" if b"ray" in cmd else None)
            if kind:
                out[int(p)] = (kind, (int(stat[11]) + int(stat[12])) / TICK)
        return out

    def sample(self) -> None:  # the actors exit with the job: read them while it runs
        while self.running:
            self.seen.update(self.cpu())
            for pid, (kind, _) in self.seen.items():
                if kind == "actors":
                    try:
                        st = {x.split(":")[0]: int(x.split()[1]) / 1024 for x in open(f"/proc/{pid}/status") if x.startswith("Rss")}
                    except (OSError, ValueError):
                        continue
                    if "RssAnon" not in st:  # exiting
                        continue
                    self.anon[pid] = max(self.anon.get(pid, 0.0), st["RssAnon"])
                    self.file[pid] = max(self.file.get(pid, 0.0), st["RssFile"])
            time.sleep(0.5)

    def stop(self, wall: float) -> dict:
        self.running = False
        self.thread.join()
        self.seen.update(self.cpu())
        cpu = {"actors": 0.0, "ray": 0.0, "driver": 0.0}
        for pid, (kind, t) in self.seen.items():
            cpu[kind] += t - self.cpu0.get(pid, (kind, 0.0))[1]  # a process born during the run: all of it
        busy, steal = self.busy()
        cpu["others"] = busy - self.busy0[0] - sum(cpu.values())
        cpu["stolen"] = steal - self.busy0[1]  # by the hypervisor: a busy host
        out = {"wall_s": round(wall, 1), "cpu_s": {k: round(v, 1) for k, v in cpu.items()}}
        if self.anon:  # all actors on this machine: the file's pages count once
            out["actor_mb"] = [f"{a:.0f} own + {self.file[p]:.0f} file" for p, a in sorted(self.anon.items())]
            out["total_mb"] = round(sum(self.anon.values()) + max(self.file.values()))
        return out


def single(path: str, rows: list[dict]) -> dict:
    from pyguard import Guard

    guard = Guard.load(path, threads=2)
    watch = Watch()
    t0 = time.perf_counter()
    guard.classify_many([r["messages"] for r in rows], batch_size=16)
    dt = time.perf_counter() - t0
    st = {x.split(":")[0]: int(x.split()[1]) / 1024 for x in open("/proc/self/status") if x.startswith("VmHWM")}
    return {"rows_s": len(rows) / dt, **watch.stop(dt), "peak_rss_mb": round(st["VmHWM"])}


def shard(path: str, rows: list[dict]) -> float:
    from pyguard import Guard

    Guard.load(path, threads=1).classify_many([r["messages"] for r in rows], batch_size=16)
    return next(int(x.split()[1]) / 1024 for x in open("/proc/self/status") if x.startswith("VmHWM"))


def shards(path: str, rows: list[dict]) -> dict:
    """The rows in two halves, each classified by its own 1-thread process, as the CLI per shard
    would (no Ray): the baseline of 2 actors x 1 thread. Process start and load are timed."""
    import multiprocessing

    watch = Watch()
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        rss = pool.starmap(shard, [(path, rows[: len(rows) // 2]), (path, rows[len(rows) // 2 :])])
    dt = time.perf_counter() - t0
    return {"rows_s": len(rows) / dt, **watch.stop(dt), "peak_rss_mb": [round(x) for x in rss]}


def on_ray(path: str, rows: list[dict], actors: int, threads: int) -> dict:
    import ray

    import pyguard.ray as pgray

    ds = ray.data.from_items(rows)  # blocks already in the object store: no read task
    for _ in range(60):  # the previous job's actors exit in the background: not among this one's
        if not any(k == "actors" for k, _ in Watch.cpu().values()):
            break
        time.sleep(0.5)
    watch = Watch()
    t0 = time.perf_counter()
    got = pgray.classify(ds, path, concurrency=actors, threads_per_worker=threads).take_all()
    dt = time.perf_counter() - t0
    assert sorted(r["id"] for r in got) == list(range(len(rows))) and not any(r["error"] for r in got)
    return {"rows_s": len(rows) / dt, **watch.stop(dt)}


def lean_local(init: dict, system: dict) -> None:
    """A local cluster as pyguard.ray.init starts it (its cores and one CPU more), with these switches."""
    import ray

    import pyguard.ray as pgray

    ray.init("local", num_cpus=pgray.local_cpus(), **init, _system_config=system)
    ray.data.DataContext.get_current().enable_progress_bars = False


def switches(path: str, rows: list[dict], rounds: int) -> None:
    """Each of pyguard.ray's lean switches (LEAN_INIT, LEAN_SYSTEM) left out in turn:
    CPU seconds of Ray's processes and the driver while the cluster starts and while it runs the
    rows on 1 actor x 2 threads, against all of them and none (Ray's defaults)."""
    import ray

    import pyguard.ray as pgray

    lean = (pgray.LEAN_INIT, pgray.LEAN_SYSTEM)
    configs = {"lean": lean, "none (Ray's defaults)": ({}, {})}
    for i, part in enumerate(lean):
        for key in part:
            configs[f"lean but {key}"] = tuple({k: v for k, v in p.items() if k != key} if j == i else p for j, p in enumerate(lean))
    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for name, (init, system) in list(configs.items()) + [("lean, progress bars on", lean)]:
            watch = Watch()
            t0 = time.perf_counter()
            lean_local(init, system)
            ray.data.DataContext.get_current().enable_progress_bars = name.endswith("bars on")
            start = watch.stop(time.perf_counter() - t0)
            run = on_ray(path, rows, 1, 2)
            ray.shutdown()
            runs.setdefault(name, []).append({"start": start, "run": run})
            print(name, json.dumps(runs[name][-1]), file=sys.stderr, flush=True)
    print(f"{len(rows)} conversations, 1 actor x 2 threads, {rounds} round(s): Ray's processes' and the driver's CPU s, "
          "starting the cluster, then running the rows (per second of the run); rows/s")
    for name, rs in runs.items():
        ours = [(r["start"]["cpu_s"]["ray"] + r["start"]["cpu_s"]["driver"],
                 r["run"]["cpu_s"]["ray"], r["run"]["cpu_s"]["driver"], r["run"]["wall_s"], r["run"]["rows_s"]) for r in rs]
        print(f"{name:40s} " + "  ".join(f"start {a:.1f}, run ray {b:.1f} ({b / w:.3f}/s) driver {c:.1f} ({c / w:.3f}/s), {x:.3f} rows/s"
                                         for a, b, c, w, x in ours))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--group", type=int, default=256)
    ap.add_argument("--workdir", default="/tmp/pyguard-ray-bench")
    ap.add_argument("--switches", action="store_true", help="measure each lean switch instead (a few rows are enough)")
    args = ap.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    import pyguard.ray as pgray

    path, rows = model_file(args.workdir, args.group), conversations(args.rows)
    if args.switches:
        return switches(path, rows, args.rounds)
    runs: dict[str, list[dict]] = {}

    def record(name: str, run: dict) -> None:  # each run as it ends: a later failure loses none
        runs.setdefault(name, []).append(run)
        print(name, json.dumps(run), file=sys.stderr, flush=True)

    for _ in range(args.rounds):  # the configurations take turns: a slow spell of the machine hits all alike
        record("single 1x2", single(path, rows))
        record("shards 2x1", shards(path, rows))
        lean_local(pgray.LEAN_INIT, pgray.LEAN_SYSTEM)
        record("ray 1x2", on_ray(path, rows, 1, 2))
        record("ray 2x1", on_ray(path, rows, 2, 1))
        ray.shutdown()
        # the nodes started as lean as pyguard.ray.init's local cluster
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **pgray.LEAN_INIT, "_system_config": pgray.LEAN_SYSTEM})
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        ray.data.DataContext.get_current().enable_progress_bars = False
        record("2 nodes 2x1", on_ray(path, rows, 2, 1))
        ray.shutdown()
        cluster.shutdown()
    print(f"{args.rows} conversations, 1B geometry, group {args.group}, guard head, 2 cores, Ray started lean "
          f"(pyguard.ray.LEAN_INIT, LEAN_SYSTEM), {args.rounds} round(s): best, then each run")
    base = max(r["rows_s"] for r in runs["single 1x2"])
    for name, rs in runs.items():
        best = max(r["rows_s"] for r in rs)
        cpu = min(sum(v for k, v in r["cpu_s"].items() if k not in ("others", "stolen")) for r in rs) / args.rows
        print(f"{name:12s} {best:.3f} rows/s ({best / base:.3f} of single)  {best / 2:.3f} rows/s per core  "
              f"{cpu:.2f} CPU s per row (pyguard, Ray and driver)")
        for r in rs:
            print("   ", json.dumps(r))


if __name__ == "__main__":
    main()
