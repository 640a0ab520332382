"""pyguard.ray on a real local Ray: a one-node cluster (ray.init) and a two-node cluster on this
machine (ray.cluster_utils.Cluster), against the CLI's results for the same conversations."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

import pyguard.ray as pgray
from pyguard import Guard, PyguardError, cli
from synth import SAMPLES, decisive_guard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

N = 200  # good conversations; the bad rows below come on top
BAD = {
    "no-messages": {},
    "wrong-roles": {"messages": [{"role": "assistant", "content": "Hi"}]},
    "over-long": {"messages": [{"role": "user", "content": "word " * 9000}]},
    "empty": {"messages": [{"role": "user", "content": "  "}]},
}
OPTIONS = {"threshold": 0.5, "exclude": ("S1",)}
FIELDS = ("verdict", "categories", "category_names", "score", "answer", "prompt_tokens", "category_scores")


def rows() -> list[dict]:
    out = []
    for i in range(N):  # the samples, each made distinct so that no two prompts are the same
        c = SAMPLES[i % len(SAMPLES)]
        c = [{"role": "user", "content": c}] if isinstance(c, str) else [dict(m) for m in c]
        c[-1]["content"] += f" ({i})"
        out.append({"id": f"c{i:04d}", "messages": c})
    bad = [{"id": k, **v} for k, v in BAD.items()]
    return out[:50] + bad[:2] + out[50:] + bad[2:]  # bad rows inside and at the end


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The model, the input file, and the CLI's results for it: {id: result dict} and {id: error}."""
    d = tmp_path_factory.mktemp("ray")
    model = decisive_guard(str(d))
    src = d / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    ids = [r["id"] for r in rows()]
    refs = {}
    for name, extra in (("default", []), ("options", ["--threshold", "0.5", "--exclude", "S1"])):
        out, err = d / f"cli-{name}.jsonl", io.StringIO()
        with contextlib.redirect_stderr(err):
            assert cli.main(["classify", "-m", model, "--jsonl", str(src), "--out", str(out), "--threads", "2", *extra]) == 2
        results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
        errors = {ids[int(n) - 1]: msg for n, msg in re.findall(r"^pyguard: .*?: line (\d+): (.*)$", err.getvalue(), re.M)}
        assert len(results) == N and sorted(errors) == sorted(BAD)
        refs[name] = (results, errors)
    return {"dir": d, "model": model, "src": str(src), "refs": refs}


def check(out: list[dict], ref: tuple[dict, dict]) -> None:
    """Every row once, with the CLI's result or its error, and its input columns intact."""
    results, errors = ref
    by_id = {r["id"]: r for r in out}
    assert len(out) == len(by_id) == len(results) + len(errors)  # each row exactly once
    inputs = {r["id"]: r for r in rows()}
    unsafe = 0
    for i, r in by_id.items():
        if i in errors:
            assert r["error"] == errors[i] and all(r[f] is None for f in FIELDS)
            continue
        assert r["error"] is None and r["messages"] == inputs[i]["messages"]
        got = r | {"category_scores": dict(r["category_scores"])}  # a JSON object, or Arrow's (key, value) pairs
        assert {f: got[f] for f in FIELDS} == {f: results[i][f] for f in FIELDS}  # scores bit for bit
        assert bool(got["category_scores"]) == (r["verdict"] == "unsafe")
        unsafe += r["verdict"] == "unsafe"
    assert 0 < unsafe < len(results)  # the decisive model: both verdicts occur


def read(data) -> "ray.data.Dataset":
    return ray.data.read_json(data["src"], lines=True)


def workers() -> list[int]:
    """Pids of this machine's pyguard actors (Ray names their processes after the class)."""
    pids = []
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"MapBatches(Classifier)" in f.read():
                    pids.append(int(p))
        except (OSError, ValueError):
            pass
    return pids


def assert_lean() -> None:
    """The connected cluster was started as pyguard.ray.init starts a local one."""
    config = ray._private.state.state.get_system_config()  # what the GCS gives every process
    assert {k: config.get(k) for k in pgray.LEAN_SYSTEM} == pgray.LEAN_SYSTEM
    assert ray._private.worker.get_dashboard_url() == ""  # include_dashboard=False


@pytest.fixture(scope="module")
def local():
    pgray.init(num_cpus=3)  # 2 actors and a CPU for Ray Data's own tasks
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def test_a_local_cluster_starts_lean(local):
    assert ray.cluster_resources()["CPU"] == 3
    assert_lean()


def test_local_cluster_gives_the_cli_results(data, local):
    out = pgray.classify(read(data), data["model"], concurrency=2, batch_size=8).materialize()
    rows_out = out.take_all()
    check(rows_out, data["refs"]["default"])
    results, errors = data["refs"]["default"]
    unsafe = sum(r["verdict"] == "unsafe" for r in results.values())
    assert pgray.counts(out) == {"rows": N + len(BAD), "unsafe": unsafe, "errors": len(errors)}


def test_a_killed_actor_loses_no_row(data, local):
    for _ in range(60):  # the previous job's actors are gone: the ones found below are this job's
        if not workers():
            break
        time.sleep(0.5)
    assert not workers()
    out, killed = [], None
    job = pgray.classify(read(data), data["model"], concurrency=2, batch_size=4, **OPTIONS)
    for b in job.iter_batches(batch_size=None, batch_format="pyarrow"):  # each block as it comes
        out += b.to_pylist()
        if killed is None:  # the first results are in, most rows are not: kill one actor
            killed, done = workers()[0], len(out)
            os.kill(killed, signal.SIGKILL)
    assert killed is not None and done < N // 2
    check(out, data["refs"]["options"])


def test_arguments_fail_before_the_job(data, local):
    ds = read(data)
    for kw, what in (({"concurrency": 0}, "concurrency"), ({"threads_per_worker": 1.5}, "threads_per_worker"),
                     ({"batch_size": 0}, "batch_size"), ({"batch_size": True}, "batch_size"),
                     ({"threshold": 2}, "threshold"), ({"threshold": float("nan")}, "threshold"),
                     ({"threshold": True}, "threshold"), ({"threshold": "0.5"}, "threshold"),
                     ({"exclude": ["S99"]}, "S99"), ({"categories": {"X1": "Bad."}}, "X1"),
                     ({"thresholds": {"S1": 2}}, "S1 must be a number"), ({"thresholds": {"S99": 0.5}}, "S99"),
                     ({"thresholds": [0.5]}, "thresholds must be a mapping")):
        with pytest.raises(PyguardError, match=what):
            pgray.classify(ds, data["model"], **{"concurrency": 1, **kw})
    # absent here (a path on the nodes, say): the actors' PyguardError ends the job, no hang
    with pytest.raises(ray.exceptions.RayError, match="nope.pgw: cannot read"):
        pgray.classify(ds, str(data["dir"] / "nope.pgw"), concurrency=1).take_all()


def test_thresholds_give_the_api_results(data, local):
    """Per-category thresholds through the actors: Guard.classify's results, row for row
    (docs/THRESHOLDS.md; the same rule as the CLI and the service)."""
    convs = [r["messages"] for r in rows()[:24]]
    guard = Guard.load(data["model"], threads=2)
    limits = {"S1": 0.04, "S10": 0.05, "S12": 0.05}
    want = guard.classify_many(convs, thresholds=limits, threshold=0.9)
    out = pgray.classify(ray.data.from_items([{"i": i, "messages": c} for i, c in enumerate(convs)]), data["model"],
                         concurrency=2, batch_size=8, thresholds=limits, threshold=0.9).take_all()
    # a Dataset's rows come in the order blocks finish (Ray's default; the CLI asks for input order)
    got = [r | {"category_scores": dict(r["category_scores"])} for r in sorted(out, key=lambda r: r["i"])]
    assert [{f: r[f] for f in FIELDS} for r in got] == [{f: getattr(w, f) for f in FIELDS} for w in want]
    plain = guard.classify_many(convs, threshold=0.9)
    assert sum(w.unsafe for w in want) > sum(p.unsafe for p in plain)  # the category thresholds made a difference


def test_the_actors_verify_the_file(data, local, tmp_path):
    """A flipped weight bit passes the driver's check (the header and small arrays) and would
    change verdicts: the actors read every checksum when they start."""
    from pyguard.formats import file

    _, meta, start, _ = file._read_header(data["model"])
    e = next(x for x in meta["arrays"] if x["name"].endswith(".qs"))
    flipped = bytearray(open(data["model"], "rb").read())
    flipped[start + e["offset"] + 7] ^= 0x10
    bad = tmp_path / "flipped.pgw"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ray.exceptions.RayError, match="checksum mismatch"):
        pgray.classify(read(data), str(bad), concurrency=1).take_all()


def test_result_columns_in_the_input_are_refused(data, local):
    ds = ray.data.from_items([{"messages": [{"role": "user", "content": "hi"}], "score": 1}])
    with pytest.raises(Exception, match="already has result columns"):
        pgray.classify(ds, data["model"], concurrency=1).take_all()


def test_the_cli_on_a_local_cluster(data, local, capsys):
    ray.shutdown()  # the CLI starts its own: lean, this machine's cores and a CPU for Ray Data
    out = data["dir"] / "ray.jsonl"
    assert cli.main(["classify", "-m", data["model"], "--jsonl", data["src"], "--out", str(out), "--ray"]) == 2
    assert ray.cluster_resources()["CPU"] == len(os.sched_getaffinity(0)) + 1
    assert_lean()
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == [r["id"] for r in rows()]  # input order
    check(lines, data["refs"]["default"])
    assert f"{N + len(BAD)} rows" in capsys.readouterr().err
    for argv in (["--ray", "--resume"], ["--ray", "--jsonl", "-"]):
        assert cli.main(["classify", "-m", data["model"], "--jsonl", data["src"], "--out", str(out), *argv]) == 2


@pytest.fixture(scope="module")
def two_nodes(local):
    from ray.cluster_utils import Cluster

    ray.shutdown()
    # 2 + 2 CPUs: the CLI's pool of 3 actors (a CPU left to Ray Data) cannot fit in one node
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_an_address_is_used_as_it_is(two_nodes):
    ray.shutdown()
    pgray.init(two_nodes.address)  # Ray refuses a _system_config for a running cluster: none was passed
    assert ray.get_runtime_context().gcs_address == two_nodes.address
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2


def test_two_nodes_through_the_cli_with_parquet(data, two_nodes, capsys):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    src, out = data["dir"] / "in.parquet", data["dir"] / "out.parquet"
    pq.write_table(pa.Table.from_pylist(rows()), src)  # the row without messages: null
    argv = ["classify", "-m", data["model"], "--jsonl", str(src), "--out", str(out), "--threshold", "0.5", "--exclude", "S1"]
    assert cli.main([*argv, "--ray", two_nodes.address]) == 2
    lines = pq.read_table(out).to_pylist()
    assert [r["id"] for r in lines] == [r["id"] for r in rows()]
    check(lines, data["refs"]["options"])


# The checks of `--ray` that come before any cluster is started or joined; a loopback port
# that nothing listens on stands for a cluster that is not there (so a check that came after
# joining it would fail with "cannot connect" instead).


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def run_cli(*args: str, code: str = "") -> subprocess.CompletedProcess:
    """`pyguard ARGS` in a fresh process (no Ray in it yet); CODE runs first."""
    script = f"import sys\n{code}\nfrom pyguard import cli\nsys.exit(cli.main(sys.argv[1:]))"
    # a safety net against a hang, not a measurement: every case here ends within a stated timeout
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=pgray.CONNECT_TIMEOUT + pgray.INIT_TIMEOUT + 60)
    r.err = r.stderr
    return r


def one_error(r, *words: str) -> None:
    assert r.returncode == 2 and len(r.err.splitlines()) == 1 and r.err.startswith("pyguard: error: "), (r.returncode, r.err)
    assert all(w in r.err for w in words), r.err


def test_the_cli_checks_before_any_cluster(data, tmp_path):
    nowhere = f"127.0.0.1:{refused_port()}"
    cmd = ["classify", "-m", data["model"], "--jsonl"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f"{json.dumps(rows()[0])}\n\n{{not json\n{json.dumps(rows()[1])}\n[1]\n")
    one_error(run_cli(*cmd, str(bad), "--ray", nowhere), f"--jsonl {bad}: line 3: not JSON", "and 1 more bad lines")
    clash = tmp_path / "clash.jsonl"
    clash.write_text(json.dumps(rows()[0]) + "\n" + json.dumps({**rows()[1], "score": 1}) + "\n")
    one_error(run_cli(*cmd, str(clash), "--ray", nowhere), "already has result columns (score)")
    parquet = tmp_path / "clash.parquet"
    pq.write_table(pa.Table.from_pylist([{**rows()[0], "verdict": "safe"}]), parquet)
    one_error(run_cli(*cmd, str(parquet), "--ray", nowhere), "already has result columns (verdict)")
    one_error(run_cli(*cmd, data["src"], "--exclude", "S99", "--ray", nowhere), "S99")
    thresholds = tmp_path / "t.json"
    thresholds.write_text(json.dumps({"threshold": None, "categories": {"S6": 0.5}}))
    one_error(run_cli(*cmd, data["src"], "--exclude", "S6", "--thresholds", str(thresholds), "--ray", nowhere),
              "thresholds: S6 not among the categories judged")
    one_error(run_cli("classify", "-m", str(tmp_path / "nope.pgw"), "--jsonl", data["src"], "--ray"), "nope.pgw")  # no local cluster either
    # all is well here: only now the address, which nothing answers
    one_error(run_cli(*cmd, data["src"], "--ray", nowhere), f"--ray {nowhere}: cannot connect", f"within {pgray.CONNECT_TIMEOUT:g} s")


def test_an_address_that_accepts_but_never_answers_fails_in_time(data):
    with socket.socket() as silent:  # takes connections, says nothing: Ray's own client would wait for minutes
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        where = f"127.0.0.1:{silent.getsockname()[1]}"
        r = run_cli("classify", "-m", data["model"], "--jsonl", data["src"], "--ray", where,
                    code="import pyguard.ray\npyguard.ray.INIT_TIMEOUT = 3")
    assert r.returncode == 2 and r.err.splitlines()[-1] == f"pyguard: error: --ray {where}: no Ray cluster answered there within 3 s"
    # once joined, the watchdog is off: a job may take longer than INIT_TIMEOUT
    joined = "import pyguard.ray as r, time\nr.init = lambda *a, **k: None\nr._init_within('h:1', 0.2)\ntime.sleep(1)\nprint('done')"
    r = subprocess.run([sys.executable, "-c", joined], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout == "done\n", r.stderr


class Poisoned:
    """The guard of `data`, except that a conversation saying POISON cannot be judged, as one
    whose logits come out non-finite: it fails its whole batch in classify_many, and itself alone."""

    def __init__(self, guard: Guard):
        self.guard, self.batches = guard, []

    def prepare(self, *a):
        return self.guard.prepare(*a)

    def classify_many(self, conversations, **kw):
        self.batches.append(len(conversations))
        if any("POISON" in c[-1]["content"] for c in conversations):
            raise PyguardError("the model computed non-finite logits (NaN or inf):\n   no verdict")
        return self.guard.classify_many(conversations, **kw)

    def classify(self, conversation, **kw):
        if "POISON" in conversation[-1]["content"]:
            raise PyguardError("the model computed non-finite logits (NaN or inf):\n   no verdict")
        return self.guard.classify(conversation, **kw)


def test_a_failed_batch_is_judged_row_by_row_with_one_line_errors(data):
    """No cluster: the actor's code in this process. A batch that fails at classification time
    is redone a row at a time: the row at fault gets its error, in one line; the others their results."""
    guard = Guard.load(data["model"], threads=1)
    items = rows()[:6]
    items[2] = {"id": "poison", "messages": [{"role": "user", "content": "POISON"}]}
    items[4] = {"id": "no-messages"}
    actor = pgray.Classifier.__new__(pgray.Classifier)  # its state without loading the file again
    actor.guard, actor.options, actor.batch_size = Poisoned(guard), {**OPTIONS, "categories": None}, 16
    out = actor(pa.Table.from_pylist(items)).to_pylist()
    assert actor.guard.batches == [5]  # one batch of the five that could be prepared, then each alone
    assert [r["id"] for r in out] == [r["id"] for r in items]  # rows stay where they were
    assert out[2]["error"] == "the model computed non-finite logits (NaN or inf): no verdict"
    assert out[4]["error"] == 'expected an object with "messages"'
    for r, item in zip(out, items):
        if r["id"] in ("poison", "no-messages"):
            assert all(r[f] is None for f in FIELDS)
            continue
        want = guard.classify(item["messages"], **OPTIONS)
        got = r | {"category_scores": dict(r["category_scores"])}
        assert r["error"] is None and {f: got[f] for f in FIELDS} == {f: getattr(want, f) for f in FIELDS}


def test_the_cli_keeps_the_input_order_when_blocks_finish_out_of_order(data, local, tmp_path, capsys):
    """Slow rows first: the actor given the first block finishes after the other has done the
    rest, so without preserve_order the rows would come out of order (checked: Ray's default)."""
    items = [{"id": f"slow{i}", "messages": [{"role": "user", "content": f"{SAMPLES[0]} " * 40 + str(i)}]} for i in range(40)]
    items += [{"id": f"fast{i}", "messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(160)]
    src, out = tmp_path / "order.jsonl", tmp_path / "order-out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in items))
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = False
    ids = [r["id"] for r in items]
    for _ in range(5):  # Ray schedules: on a loaded machine one actor may take every block, in order
        loose = [r["id"] for r in pgray.classify(ray.data.read_json(str(src), lines=True), data["model"], concurrency=2).take_all()]
        assert sorted(loose) == sorted(ids)
        if loose != ids:
            break
    assert loose != ids, "five runs without preserve_order all came out in order: the test would prove nothing"
    assert cli.main(["classify", "-m", data["model"], "--jsonl", str(src), "--out", str(out), "--ray"]) in (0, 1)
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ids


def test_a_failed_ray_job_is_one_line(data, local):
    """The file is not on this machine, so the driver cannot check it: the actors' error ends
    the job, reported in one line, with no traceback of Ray's or the actors' before it."""
    r = run_cli("classify", "-m", str(data["dir"] / "nope.pgw"), "--jsonl", data["src"], "--ray",
                ray.get_runtime_context().gcs_address)  # the running cluster, joined from a new process
    err = r.err.splitlines()
    assert r.returncode == 2 and err[-1].startswith("pyguard: error: the Ray job failed: "), r.err
    assert "nope.pgw: cannot read" in err[-1] and len(err[-1]) < 400
    assert not [x for x in err if re.search(r"Traceback|File \"|\^\^\^|Error", x)][:-1], r.err
