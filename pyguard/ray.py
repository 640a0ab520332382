"""Dataset-scale classification on Ray Data (the optional `ray` extra; the core package never
imports this module).

    import ray, pyguard.ray
    pyguard.ray.init()                                           # a lean local cluster (or ray.init(address=...))
    ds = ray.data.read_json("conversations.jsonl", lines=True)   # a "messages" column, optional "id"
    out = pyguard.ray.classify(ds, "guard.pgw", concurrency=2, threads_per_worker=1)
    out.write_parquet("results/")

A pool of actors (`map_batches` with a callable class) each holds one Guard: the file is
mapped, so the actors of a machine share its pages. Every row's result is the one
Guard.classify (and the CLI) gives; a row that cannot be judged gets its reason in `error`
and nulls for the results, and the others go on. Ray restarts a killed actor and retries
the batch it held: every row comes out exactly once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any, Mapping, Sequence

try:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray
    import ray.data
except ImportError as e:
    from pyguard.errors import PyguardError

    raise PyguardError(f"pyguard.ray needs Ray Data ({e.name} is missing): pip install 'pyguard-lg3[ray]'") from None

from pyguard import checks
from pyguard.errors import PyguardError
from pyguard.guard.guard import Guard, Result
from pyguard.guard.thresholds import check as check_thresholds

# Switches for a local cluster that pyguard starts for its own jobs (init without an address),
# kept for their measured effect (docs/RAY.md, "A lean local cluster"). A cluster given by
# address is never changed.
LEAN_INIT = {"include_dashboard": False}  # no dashboard modules in the head's API server: nobody looks
LEAN_SYSTEM = {  # Ray's _system_config, read by every process of the cluster
    "prestart_worker_first_driver": False,  # no idle workers started with the driver: the actors start their own
    "enable_metrics_collection": False,  # no Prometheus metrics: nothing scrapes a private cluster
    "task_events_report_interval_ms": 0,  # no task state events to the GCS (`ray list tasks`, the timeline)
    # the actors are the job, not background work: at Ray's default (15) any other process of the
    # machine takes their cores first, where `pyguard classify` without --ray would share them
    "worker_niceness": 0,
}

# The columns added to the input's; `error` is null for a judged row, the others for a failed one.
RESULTS = pa.schema([("verdict", pa.string()), ("categories", pa.list_(pa.string())),
                     ("category_names", pa.list_(pa.string())), ("score", pa.float64()), ("answer", pa.string()),
                     ("prompt_tokens", pa.int64()), ("category_scores", pa.map_(pa.string(), pa.float64())),
                     ("error", pa.string())])


def _missing(conversation: Any) -> bool:
    # no "messages" column: None; a row without it among rows with it: null, or NaN from pandas
    return conversation is None or (isinstance(conversation, float) and math.isnan(conversation))


def judge(guard: Guard, conversations: Sequence[Any], options: Mapping[str, Any], batch_size: int) -> list[Result | PyguardError]:
    """Each conversation's Result, or the PyguardError that kept it from being judged."""
    out: list[Result | PyguardError | None] = [None] * len(conversations)
    ok = []
    for i, c in enumerate(conversations):
        try:
            if _missing(c):
                raise PyguardError('expected an object with "messages"')  # the CLI's words
            guard.prepare(c, options["categories"], options["exclude"])
            ok.append(i)
        except PyguardError as e:
            out[i] = e
    try:
        for i, r in zip(ok, guard.classify_many([conversations[i] for i in ok], **options, batch_size=batch_size)):
            out[i] = r
    except PyguardError:  # a failure at classification time (non-finite logits): find the rows at fault, each alone
        for i in ok:
            try:
                out[i] = guard.classify(conversations[i], **options)
            except PyguardError as e:
                out[i] = e
    return out


class Classifier:
    """The actor: one Guard, loaded once, judging batches (pyarrow tables) of rows."""

    def __init__(self, path: str, threads: int, options: dict, batch_size: int):
        # every checksum read once at start: an actor judges many rows, and a damaged copy of
        # the file on one node would otherwise change its verdicts without a word
        self.guard = Guard.load(path, threads=threads, verify=True)
        self.options, self.batch_size = options, batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        clash = [n for n in RESULTS.names if n in batch.column_names]
        if clash:
            raise PyguardError(f"the dataset already has result columns ({', '.join(clash)}): rename or drop them")
        n = batch.num_rows
        conversations = batch.column("messages").to_pylist() if "messages" in batch.column_names else [None] * n
        cols: dict[str, list] = {name: [None] * n for name in RESULTS.names}
        for i, r in enumerate(judge(self.guard, conversations, self.options, self.batch_size)):
            if isinstance(r, PyguardError):
                cols["error"][i] = " ".join(str(r).split())
            else:
                for name in RESULTS.names[:-1]:
                    cols[name][i] = getattr(r, name)
        for f in RESULTS:
            batch = batch.append_column(f, pa.array(cols[f.name], f.type))
        return batch


def classify(ds: ray.data.Dataset, path: str, concurrency: int | None = None, threads_per_worker: int = 1,
             batch_size: int = 16, categories: Mapping[str, str] | None = None, exclude: Sequence[str] = (),
             threshold: float | None = None, thresholds: Mapping[str, float] | None = None) -> ray.data.Dataset:
    """The dataset's rows with the result columns added (RESULTS), lazily (Ray runs it when the
    output is consumed or written).

    path: the pyguard file, at this path on every node (or on shared storage); concurrency:
    actors (None: the cluster's CPUs less one, / threads_per_worker); threads_per_worker: each
    actor's kernel threads and the CPUs it reserves; batch_size: rows per actor call,
    classified together. categories, exclude, threshold, thresholds: as Guard.classify. When
    the file is present here, it and the policy are checked before the job starts.

    Actors holding every CPU leave none for Ray Data's own tasks (listing files, reading,
    writing) and the job waits forever: the default leaves one CPU to them."""
    # checked here, not by each actor: a bad value would otherwise fail the job, or every row
    threshold, thresholds = checks.threshold(threshold), check_thresholds(thresholds)
    checks.integer(threads_per_worker, "threads_per_worker", 1)
    checks.integer(batch_size, "batch_size", 1)
    if concurrency is None:
        concurrency = max(1, (_cpus() - 1) // threads_per_worker)
    checks.integer(concurrency, "concurrency", 1)
    exclude = tuple(exclude)
    if os.path.exists(path):
        path = os.path.abspath(path)  # the workers' working directory is not ours
        # a bad file or policy fails here, not per row (thresholds' codes are checked against the file's policy)
        Guard.load(path, threads=1).check_policy(categories, exclude, threshold, thresholds)
    options = {"categories": categories, "exclude": exclude, "threshold": threshold, "thresholds": thresholds}
    return ds.map_batches(Classifier, fn_constructor_args=(path, threads_per_worker, options, batch_size),
                          batch_format="pyarrow", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
                          # exactly-once output rests on Ray Data's defaults for actor pools
                          # (max_restarts=-1, max_task_retries=-1: a dead actor is restarted and its
                          # batch retried); passing them again is deprecated (Ray 2.60)
                          num_cpus=threads_per_worker, udf_modifying_row_count=False)


def init(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Connect this process to Ray: to the cluster at `address` as it is ("auto": this node's
    running cluster; ray.init's other forms too), or, with no address, to a new local cluster
    of this machine started lean (LEAN_INIT, LEAN_SYSTEM) with num_cpus CPUs (None:
    this process's cores plus one, for Ray Data's own tasks: see local_cpus). log_to_driver:
    print the workers' output here (ray.init's option; this process's only)."""
    if address is not None:
        ray.init(address=address, log_to_driver=log_to_driver)
        return
    ray.init("local", num_cpus=num_cpus or local_cpus(), log_to_driver=log_to_driver, **LEAN_INIT,
             _system_config=LEAN_SYSTEM)


def local_cpus() -> int:
    """The CPUs of a local cluster: the cores this process may use, and one more for Ray Data's
    own tasks (reading, writing: light). Ray's CPUs are scheduling tokens, not pinned cores, so
    the pool can use every core and a reading task still finds a CPU (else the job waits forever)."""
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) + 1


def _cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def counts(results: ray.data.Dataset) -> dict[str, int]:
    """{"rows", "unsafe", "errors"} of classify()'s output (this runs it unless materialized)."""
    rows = unsafe = errors = 0
    for b in results.select_columns(["verdict", "error"]).iter_batches(batch_format="pyarrow"):
        rows, unsafe, errors = rows + b.num_rows, unsafe + _unsafe(b), errors + _errors(b)
    return {"rows": rows, "unsafe": unsafe, "errors": errors}


def _unsafe(b: pa.Table) -> int:
    return pc.sum(pc.equal(b["verdict"], "unsafe")).as_py() or 0


def _errors(b: pa.Table) -> int:
    return b.num_rows - b["error"].null_count


def _json_row(row: dict) -> dict:
    # a value missing from a JSON lines input comes back from Ray's (pandas) reader as NaN
    out = {k: None if _missing(v) else v for k, v in row.items()}
    if out["category_scores"] is not None:  # an Arrow map comes back as (key, value) pairs
        out["category_scores"] = dict(out["category_scores"])
    return out


# `--ray ADDRESS`: seconds for a TCP connection to ADDRESS, then for ray.init to join the
# cluster there, before the CLI gives up (ray.init itself retries for minutes: over 5 seen)
CONNECT_TIMEOUT = 10.0
INIT_TIMEOUT = 60.0


def run_cli(model: str, src: str, out: str | None, address: str | None, threads: int | None, options: dict) -> int:
    """`pyguard classify --jsonl IN [--out OUT] --ray [ADDRESS]`: IN and OUT are Parquet when
    their names end in .parquet, else JSON lines (OUT: stdout when None); rows in input order.
    What can be checked here is checked before any cluster is started or joined: the model
    file and the policy, IN (every line parses, as without --ray; no result columns), and that
    ADDRESS answers within CONNECT_TIMEOUT. Any error is one PyguardError line.
    Exit status as the CLI's: 2 if any row has an error, else 1 if any is unsafe, else 0."""
    for what, name in (("-m", model), ("--jsonl", src)):
        if address is None and not os.path.exists(name):  # a local cluster reads them here
            raise PyguardError(f"{what} {name}: no such file or directory")
    if os.path.exists(model):  # else a path on the cluster's nodes: its actors check it
        Guard.load(model, threads=1).check_policy(**options)
    if os.path.exists(src):
        _check_input(src)
    # the actors print nothing of use here, but Ray forwards their tracebacks: an actor that
    # cannot start would bury the one-line error under pages of them
    if not ray.is_initialized() and address is None:
        init(log_to_driver=False)  # a new lean local cluster
    elif not ray.is_initialized():
        if address != "auto":  # this node's running cluster, found by Ray from local files
            _reachable(address)
        _init_within(address, INIT_TIMEOUT)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    # a failed job is reported below in one line; Ray Data would first log its whole stack
    logging.getLogger("ray.data.exceptions").setLevel(logging.CRITICAL)
    try:
        return _run(model, src, out, threads, options)
    except ray.exceptions.RayError as e:  # the job failed (a file the actors cannot read, say): one line, not Ray's pages
        raise PyguardError(f"the Ray job failed: {_one_line(e)}") from None


def _check_input(src: str) -> None:
    """IN as the job will read it: no result columns; as JSON lines, every line a JSON object
    (Ray's reader would fail the whole job on any other line; what is in the object, such as
    "messages", is each row's own affair: an error in its row)."""
    from pyguard.cli import parse_json

    def clash(names) -> None:
        names = [n for n in RESULTS.names if n in names]
        if names:
            raise PyguardError(f"--jsonl {src}: already has result columns ({', '.join(names)}): rename or drop them")

    if src.endswith(".parquet"):
        try:
            clash(pq.read_schema(src).names)
        except (OSError, pa.ArrowException) as e:
            raise PyguardError(f"--jsonl {src}: cannot read as Parquet ({_one_line(e)})") from None
        return
    bad, first = 0, ""
    try:
        with open(src, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    item = parse_json(raw)
                    if not isinstance(item, dict):
                        raise PyguardError("not a JSON object")
                except PyguardError as e:
                    bad, first = bad + 1, first or f"line {n}: {e}"
                    continue
                clash(item)
    except OSError as e:
        raise PyguardError(f"--jsonl {src}: cannot read ({e.strerror})") from None
    if bad:
        raise PyguardError(f"--jsonl {src}: {first}" + (f" (and {bad - 1} more bad lines)" if bad > 1 else "")
                           + ": --ray reads the file whole; without --ray bad lines are reported and skipped")


def _reachable(address: str) -> None:
    """Fail within CONNECT_TIMEOUT if nothing answers at ADDRESS ("host:port", "ray://host:port")."""
    import socket

    hostport = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise PyguardError(f"--ray {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else e.strerror or str(e)
        raise PyguardError(f"--ray {address}: cannot connect ({why} within {CONNECT_TIMEOUT:g} s)") from None


def _init_within(address: str, timeout: float) -> None:
    """init(address), or exit 2 with one line after `timeout` seconds: ray.init blocks in Ray's
    C++ client, which no Python exception can interrupt, so a watchdog thread ends the process
    (the CLI only: nothing has been written yet)."""
    import threading

    def give_up() -> None:
        sys.stderr.write(f"pyguard: error: --ray {address}: no Ray cluster answered there within {timeout:g} s\n")
        sys.stderr.flush()
        os._exit(2)

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        init(address, log_to_driver=False)
    finally:
        watchdog.cancel()


def _one_line(e: BaseException) -> str:
    """A Ray error's root cause in one short line (Ray's own text runs to pages of tracebacks)."""
    while isinstance(getattr(e, "cause", None), BaseException):
        e = e.cause
    text = str(e).strip().splitlines()
    first = next((x for x in reversed(text) if x.strip() and not x.startswith(" ")), "") if text else ""
    line = " ".join(first.split()) or type(e).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _run(model: str, src: str, out: str | None, threads: int | None, options: dict) -> int:
    ds = ray.data.read_parquet(src) if src.endswith(".parquet") else ray.data.read_json(src, lines=True)
    results = classify(ds, model, threads_per_worker=threads or 1, **options)
    rows = unsafe = errors = 0
    writer = None
    sink = open(out, "wb") if out else sys.stdout.buffer
    try:
        for b in results.iter_batches(batch_format="pyarrow"):
            if out and out.endswith(".parquet"):
                writer = writer or pq.ParquetWriter(sink, b.schema)
                writer.write_table(b)
            else:
                lines = (json.dumps(_json_row(r), ensure_ascii=False, allow_nan=False, default=str) + "\n" for r in b.to_pylist())
                sink.write("".join(lines).encode("utf-8"))
                sink.flush()
            rows, unsafe, errors = rows + b.num_rows, unsafe + _unsafe(b), errors + _errors(b)
        if writer:
            writer.close()
    finally:
        if out:
            sink.close()
    print(f"pyguard: {rows} rows, {unsafe} unsafe, {errors} errors", file=sys.stderr)
    return 2 if errors else 1 if unsafe else 0
