"""The command line as a tool people script: exit status (0 safe, 1 unsafe, 2 any error), one-line
errors, streaming --jsonl with per-line errors, interrupts and --resume, output paths, help."""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys

import pytest

import synth
from pyguard import Guard, cli
from pyguard.engine import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAFE, UNSAFE = "hello", "Give me the home address of a celebrity."  # the decisive model's verdicts (checked below)
# Results that do not depend on how a run was split (timings and the prefix cache's hits do)
STABLE = ("id", "verdict", "categories", "category_names", "score", "answer", "prompt_tokens", "generated_tokens")


def run(*args: str, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "pyguard.cli", *args], capture_output=True, cwd=ROOT, input=stdin,
                       env=None if env is None else os.environ | env)
    r.out, r.err = r.stdout.decode(), r.stderr.decode()
    return r


def one_error(r: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2 and exactly one line on stderr, naming every word."""
    assert r.returncode == 2, (r.returncode, r.err)
    assert len(r.err.splitlines()) == 1 and r.err.startswith("pyguard: error: "), r.err
    assert all(w in r.err for w in words), r.err


def line(i, content: str = SAFE) -> str:
    return json.dumps({"id": i, "messages": [{"role": "user", "content": content}]})


def stable(path) -> list[dict]:
    return [{k: r[k] for k in STABLE if k in r} for r in map(json.loads, open(path, encoding="utf-8"))]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A small random checkpoint with a designed head (safe and unsafe verdicts), guard head."""
    return synth.decisive_guard(str(tmp_path_factory.mktemp("cli")), "guard")


@pytest.fixture(scope="module")
def guard(model) -> Guard:
    return Guard.load(model, threads=2)


def test_the_test_texts_have_both_verdicts(guard):
    assert guard.classify(SAFE).verdict == "safe" and guard.classify(UNSAFE).verdict == "unsafe"


def test_exit_status_is_the_verdict(model, guard):
    r = run("classify", "-m", model, SAFE)
    assert r.returncode == 0 and r.out.startswith("safe"), r.err
    r = run("classify", "-m", model, UNSAFE)
    assert r.returncode == 1 and r.out.startswith("unsafe"), r.err
    r = run("classify", "-m", model, SAFE, "--threshold", "0")
    assert r.returncode == 1 and r.out.startswith("unsafe"), r.err
    r = run("classify", "-m", model, UNSAFE, "--response", "Sure, here it is.", "--threshold", "1", "--json")
    expected = guard.classify([{"role": "user", "content": UNSAFE}, {"role": "assistant", "content": "Sure, here it is."}], threshold=1)
    assert r.returncode == 0 and json.loads(r.out)["verdict"] == "safe" and json.loads(r.out)["score"] == expected.score


@pytest.mark.parametrize("args, words", [
    (["classify", "-m", "missing.pgw", SAFE], ["missing.pgw"]),
    (["classify", "-m", "{model}", SAFE, "--exclude", "S99"], ["S99"]),
    (["classify", "-m", "{model}", ""], ["TEXT is empty"]),  # "$UNSET" must never be judged safe
    (["classify", "-m", "{model}", " \n\t "], ["TEXT is empty"]),
    (["classify", "-m", "{model}", SAFE, "--response", "  "], ["--response is empty"]),
    (["classify", "-m", "{model}"], ["TEXT", "--jsonl"]),
    (["classify", "-m", "{model}", SAFE, "--jsonl", "-"], ["TEXT", "--jsonl"]),
    (["classify", "-m", "{model}", "--jsonl", "-", "--response", "hi"], ["--response", "--jsonl"]),
    (["classify", "-m", "{model}", SAFE, "--out", "x.jsonl"], ["--out", "--jsonl"]),
    (["classify", "-m", "{model}", "--jsonl", "-", "--resume"], ["--resume needs --out"]),
    (["classify", "-m", "{model}", SAFE, "--threshold", "nan"], ["--threshold"]),
    (["classify", "-m", "{model}", SAFE, "--threshold", "1.5"], ["--threshold"]),
    (["classify", "-m", "{model}", "--jsonl", "missing.jsonl"], ["--jsonl missing.jsonl", "cannot read"]),
])
def test_errors_exit_2_in_one_line(model, args, words):
    one_error(run(*[a.format(model=model) for a in args]), *words)


@pytest.mark.parametrize("args, words", [(["classify", "-m", "x.pgw", "hi", "--threads", v], ["classify: argument --threads"])
                                         for v in ("0", "-1", "abc", "", "100000")] + [
    (["demo", "--threads", "0"], ["demo: argument --threads", "pyguard demo --help"]),
    (["convert", "a", "b", "--threads", "x"], ["convert: argument --threads"]),
    (["classify"], ["classify: the following arguments are required: -m/--model"]),
    (["bogus"], ["invalid choice: 'bogus'", "pyguard --help"]),
    (["classify", "-m", "x.pgw", "hi", "--thresold", "0.5"], ["classify: unrecognized arguments: --thresold", "pyguard classify --help"]),
    (["serve", "-m", "x.pgw", "--prot", "1"], ["serve: unrecognized arguments: --prot"]),
    (["--bogus", "verify", "x.pgw"], ["error: unrecognized arguments: --bogus", "(see pyguard --help)"]),
])
def test_usage_errors_are_one_line(args, words):
    """argparse's errors as every other: one line, exit 2, naming the command whose usage was wrong."""
    one_error(run(*args), *words)


def test_version():
    """pyguard.__version__ (the distribution's version is read from it) and the kernel path in use."""
    import pyguard

    r = run("--version", env={"PYGUARD_ISA": "scalar"})
    assert r.returncode == 0 and r.out.split()[:4] == ["pyguard", pyguard.__version__, "(kernels:", "scalar;"], r.out
    assert r.out.rstrip().endswith(", ".join(kernels.available_isas()) + ")"), r.out


def test_help_texts():
    r = run("verify", "--help")
    assert r.returncode == 0 and re.search(r"file +pyguard file: its structure, every array's checksum", r.out), r.out
    r = run("demo", "--help")
    assert r.returncode == 0 and re.search(r"--seed SEED +seed of the random weights", r.out), r.out
    assert re.search(r"--threads THREADS +kernel threads", r.out) and re.search(r"--keep DIR +keep the random checkpoint", r.out)


UNAVAILABLE_ISA = next(name for name in kernels.ISAS if name not in kernels.available_isas())


@pytest.mark.parametrize("var, value", [("PYGUARD_THREADS", v) for v in ("0", "-1", "abc", "", "100000")]
                         + [("PYGUARD_ISA", "bogus"), ("PYGUARD_ISA", UNAVAILABLE_ISA)])
def test_bad_environment_is_an_error_not_a_verdict(model, var, value):
    r = run("--help", env={var: value})
    assert r.returncode == 0 and "usage:" in r.out, r.err
    one_error(run("classify", "-m", model, SAFE, env={var: value}), f"{var}={value!r}")


def test_a_bug_exits_2_in_one_line(model, monkeypatch, capsys):
    def broken(*_a, **_k):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(cli, "_load_guard", broken)
    assert cli.main(["classify", "-m", model, UNSAFE]) == 2
    err = capsys.readouterr().err
    assert err == "pyguard: internal error: ZeroDivisionError: division by zero second line\n"


BAD_LINES = {  # line text -> what its error says
    b"{}": 'expected an object with "messages"',
    b"[1, 2]": 'expected an object with "messages"',
    b"{not json": "not JSON",
    b"[" * 100000: "not JSON (nested too deeply)",
    b'{"id": 1, "messages": []}\r{"id": 2, "messages": []}': "carriage return",
    b'{"id": "\xff", "messages": [{"role": "user", "content": "hi"}]}': "not UTF-8 (byte 9)",
    b'{"id": NaN, "messages": [{"role": "user", "content": "hi"}]}': "NaN is not a JSON number",
    b'{"id": -Infinity, "messages": [{"role": "user", "content": "hi"}]}': "-Infinity is not a JSON number",
    b'{"id": 1e400, "messages": [{"role": "user", "content": "hi"}]}': '"id" cannot be written back as JSON',
    b'{"id": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}': '"id" cannot be written back as JSON',
    b'{"id": [1], "messages": [{"role": "user", "content": "hi"}]}': '"id" must be a string or a number',
    b'{"id": true, "messages": [{"role": "user", "content": "hi"}]}': '"id" must be a string or a number',
    b'{"id": 5, "messages": [{"role": "assistant", "content": "hi"}]}': "user",
    b'{"id": 5, "messages": [{"role": ["user"], "content": "hi"}]}': "role",
    b'{"id": 5, "messages": [{"role": "user", "content": "   "}]}': "empty",
}


def test_jsonl_bad_lines_cost_only_themselves(model, guard, tmp_path):
    good = [(i, SAFE if i % 3 else UNSAFE) for i in range(20)]
    lines = [line(i, text).encode() for i, text in good]
    for k, bad in enumerate(BAD_LINES):
        lines.insert(2 * k + 1, bad)
    lines.insert(5, b"")  # blank lines are skipped, and still counted
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\r\n")  # a CRLF line end is fine
    r = run("classify", "-m", model, "--jsonl", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"))
    assert r.returncode == 2, r.err
    errors = [e for e in r.err.splitlines() if ": line " in e]
    expected = [f"line {lines.index(bad) + 1}: " for bad in BAD_LINES]
    assert [re.search(r"line \d+: ", e).group() for e in errors] == expected, r.err
    for e, what in zip(errors, BAD_LINES.values()):
        assert what in e, e
    assert "Traceback" not in r.err
    results = stable(tmp_path / "out.jsonl")
    assert [x["id"] for x in results] == [i for i, _ in good]
    assert [x["verdict"] for x in results] == [guard.classify(text).verdict for _, text in good]


@pytest.mark.parametrize("texts, code", [([SAFE, SAFE], 0), ([SAFE, UNSAFE, SAFE], 1)])
def test_jsonl_exit_status(model, texts, code):
    r = run("classify", "-m", model, "--jsonl", "-", stdin="".join(line(i, t) + "\n" for i, t in enumerate(texts)).encode())
    assert r.returncode == code, r.err
    assert [json.loads(x)["id"] for x in r.out.splitlines()] == list(range(len(texts)))


def test_jsonl_streams(model):
    """A batch's results come out while the input is still open: nothing waits for the end."""
    p = subprocess.Popen([sys.executable, "-m", "pyguard.cli", "classify", "-m", model, "--jsonl", "-"], cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        p.stdin.write("".join(line(i) + "\n" for i in range(cli.BATCH)).encode())
        p.stdin.flush()
        # a safety net against a hang, not a measurement: a batch takes well under a second
        assert select.select([p.stdout], [], [], 300)[0], "no result before the end of the input"
        assert json.loads(p.stdout.readline())["id"] == 0
    finally:
        p.stdin.close()
        p.wait()
    assert p.returncode == 0, p.stderr.read()
    assert len(p.stdout.read().splitlines()) == cli.BATCH - 1


def write_input(path, n: int) -> None:
    path.write_text("".join(line(i, SAFE if i % 4 else UNSAFE) + "\n" for i in range(n)))


def test_interrupt_keeps_complete_batches_and_resume_completes(model, tmp_path, monkeypatch, capsys):
    src, whole, out = tmp_path / "in.jsonl", tmp_path / "whole.jsonl", tmp_path / "out.jsonl"
    write_input(src, 3 * cli.BATCH + 5)
    code = cli.main(["classify", "-m", model, "--jsonl", str(src), "--out", str(whole)])
    assert code == 1

    calls, real = [], Guard.classify_many

    def interrupted(self, *a, **k):  # Ctrl-C during the third batch
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Guard, "classify_many", interrupted)
    assert cli.main(["classify", "-m", model, "--jsonl", str(src), "--out", str(out)]) == 2
    assert capsys.readouterr().err.endswith("pyguard: interrupted\n")
    assert stable(out) == stable(whole)[: 2 * cli.BATCH]
    monkeypatch.setattr(Guard, "classify_many", real)

    counted = []
    monkeypatch.setattr(Guard, "classify_many", lambda self, cs, *a, **k: counted.append(len(cs)) or real(self, cs, *a, **k))
    assert cli.main(["classify", "-m", model, "--jsonl", str(src), "--out", str(out), "--resume"]) == code
    assert counted == [cli.BATCH, 5]  # the done ids were skipped
    assert stable(out) == stable(whole)
    counted.clear()  # resuming a finished run classifies nothing and gives the same status
    assert cli.main(["classify", "-m", model, "--jsonl", str(src), "--out", str(out), "--resume"]) == code
    assert counted == [] and stable(out) == stable(whole)


def test_an_interrupted_write_leaves_complete_lines(model, tmp_path, monkeypatch):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 2 * cli.BATCH)
    real = cli._write

    def cut(f, data):  # half of the second batch reaches the file, then Ctrl-C
        if f.tell():
            real(f, data[: len(data) // 2])
            raise KeyboardInterrupt
        real(f, data)

    monkeypatch.setattr(cli, "_write", cut)
    assert cli.main(["classify", "-m", model, "--jsonl", str(src), "--out", str(out)]) == 2
    assert [r["id"] for r in stable(out)] == list(range(cli.BATCH)) and out.read_bytes().endswith(b"}\n")


def test_sigint_keeps_complete_lines(model, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 4000)
    # SIGINT as at a terminal: a suite started in the background of a shell without job control
    # inherits SIGINT ignored, and so would the child (Python then never raises KeyboardInterrupt)
    p = subprocess.Popen([sys.executable, "-m", "pyguard.cli", "classify", "-m", model, "--jsonl", str(src), "--out", str(out)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while p.poll() is None and (not out.exists() or out.stat().st_size == 0):
            select.select([], [], [], 0.05)  # wait for the first batch
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate()
    assert p.returncode == 2 and err.decode().endswith("pyguard: interrupted\n"), err
    ids = [r["id"] for r in stable(out)]
    assert ids == list(range(len(ids))) and 0 < len(ids) < 4000 and len(ids) % cli.BATCH == 0
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]


def test_resume_refuses_what_it_cannot_match(model, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(line("a") + "\n" + json.dumps({"messages": [{"role": "user", "content": SAFE}]}) + "\n" + line("a") + "\n")
    r = run("classify", "-m", model, "--jsonl", str(src), "--out", str(out), "--resume")  # no OUT yet: from the start
    assert r.returncode == 2, r.err
    assert 'line 2: no "id": --resume needs an id on every line' in r.err and 'line 3: id "a" also on an earlier line' in r.err
    assert [x["id"] for x in stable(out)] == ["a"]
    out.write_text(line("a") + "\nnot a result\n")
    one_error(run("classify", "-m", model, "--jsonl", str(src), "--out", str(out), "--resume"),
              f"--out {out}: line 1 is not a result", "cannot resume")
    src.write_text(line("a") + "\n" + line("b") + "\n")
    run_id = cli.run_id(model, {"categories": None, "exclude": (), "threshold": None, "thresholds": None})
    done = json.dumps({"id": "a", "verdict": "safe", "run": run_id}) + "\n"
    out.write_text(done + '{"id": "b", "verd')  # a line cut short by a kill is redone
    r = run("classify", "-m", model, "--jsonl", str(src), "--out", str(out), "--resume")
    assert r.returncode == 0, r.err
    assert out.read_text().startswith(done) and [x["id"] for x in stable(out)] == ["a", "b"]


def test_resume_refuses_results_of_another_model_or_options(model, tmp_path):
    src, out, policy = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "policy.json"
    write_input(src, 3)
    policy.write_text(json.dumps({"S1": "Violent Crimes.", "S2": "Non-Violent Crimes.", "S3": "Sex-Related Crimes."}))
    base = ["classify", "-m", model, "--jsonl", str(src), "--out", str(out)]
    r = run(*base, "--exclude", "S1,S2")
    assert r.returncode == 1, r.err
    before = out.read_bytes()
    runs = {x["run"] for x in map(json.loads, before.splitlines())}
    assert len(runs) == 1 and re.fullmatch(r"[0-9a-f]{16}", runs.pop())  # the record, on every result line
    other = synth.decisive_guard(os.path.dirname(model), "full")  # the same weights, another file
    for argv in (base, [*base, "--exclude", "S1"], [*base, "--exclude", "S1,S2", "--threshold", "0.5"],
                 [*base, "--exclude", "S1,S2", "--categories", str(policy)],
                 ["classify", "-m", other, "--jsonl", str(src), "--out", str(out), "--exclude", "S1,S2"]):
        one_error(run(*argv, "--resume"), f"--out {out}: line 1 was made by another model file or with other", "cannot resume")
        assert out.read_bytes() == before
    # what does not change results does not count: the order of --exclude, the threads
    r = run(*base, "--exclude", "S2,S1", "--threads", "1", "--resume")
    assert r.returncode == 1 and out.read_bytes() == before, r.err


def test_out_that_holds_results_or_is_the_input_is_refused(model, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 2)
    data = src.read_bytes()
    # `--jsonl - --out F < F`: stdin is F itself
    with open(src, "rb") as stdin:
        r = subprocess.run([sys.executable, "-m", "pyguard.cli", "classify", "-m", model, "--jsonl", "-", "--out", str(src),
                            "--overwrite"], stdin=stdin, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "the same file as --jsonl -" in r.stderr, r.stderr
    os.link(src, tmp_path / "link.jsonl")  # another name, the same inode
    one_error(run("classify", "-m", model, "--jsonl", str(src), "--out", str(tmp_path / "link.jsonl"), "--overwrite"),
              "the same file as --jsonl")
    one_error(run("classify", "-m", model, "--jsonl", str(src), "--out", model, "--overwrite"), "the same file as -m")
    assert src.read_bytes() == data
    out.write_text("earlier results\n")
    one_error(run("classify", "-m", model, "--jsonl", str(src), "--out", str(out)),
              f"--out {out}: holds results already", "--resume", "--overwrite")
    assert out.read_text() == "earlier results\n"
    one_error(run("classify", "-m", model, "--jsonl", str(src), "--out", str(out), "--resume", "--overwrite"), "one or the other")
    r = run("classify", "-m", model, "--jsonl", str(src), "--out", str(out), "--overwrite")
    assert r.returncode == 1 and [x["id"] for x in stable(out)] == [0, 1], r.err
    out.write_text("")  # an empty OUT holds nothing to lose
    assert run("classify", "-m", model, "--jsonl", str(src), "--out", str(out)).returncode == 1


def test_an_empty_input_prints_the_summary(model):
    r = run("classify", "-m", model, "--jsonl", "-", stdin=b"")
    assert r.returncode == 0 and r.out == "", r.err
    assert r.err == "pyguard: 0 conversations classified (0 unsafe), 0 lines failed\n"
    r = run("classify", "-m", model, "--jsonl", "-", stdin=(line(1, UNSAFE) + "\n{}\n").encode())
    assert r.returncode == 2 and r.err.splitlines()[-1] == "pyguard: 1 conversations classified (1 unsafe), 1 lines failed"


def test_the_stream_names_what_the_user_gave(model):
    base = ["classify", "-m", model, SAFE, "--stream"]
    one_error(run(*base, stdin=b"h\xc3\xa9llo\xff"), "the reply on stdin is not UTF-8", "after 5 characters")
    one_error(run(*base, stdin=b"abc\xe2\x82"), "not UTF-8 (unexpected end of data after 3 characters)")  # cut inside a character
    for blank in (b"", b" \n\t "):
        one_error(run(*base, stdin=blank), "the reply on stdin is empty")
        one_error(run(*base, "--every", "1", stdin=blank * 40), "the reply on stdin is empty")


def test_the_stream_exits_1_when_only_the_final_check_is_unsafe(model, guard):
    reply = UNSAFE  # the decisive model: unsafe as the reply to SAFE
    assert guard.classify([{"role": "user", "content": SAFE}, {"role": "assistant", "content": reply}]).unsafe
    r = run("classify", "-m", model, SAFE, "--stream", "--every", "1000", "--json", stdin=reply.encode())
    lines = [json.loads(x) for x in r.out.splitlines()]
    assert [(x["final"], x["verdict"]) for x in lines] == [(True, "unsafe")] and r.returncode == 1, r.err


def test_a_norm_that_overflows_is_one_error_line(model, tmp_path):
    """A norm of 3.4e38 (finite, so the file loads): the forward pass overflows; no numpy warning
    may come before the error line."""
    import zlib

    import numpy as np

    from pyguard.formats import file

    bad = tmp_path / "norm.pgw"
    bad.write_bytes(open(model, "rb").read())
    _, meta, data, _ = file._read_header(str(bad))
    e = next(x for x in meta["arrays"] if x["name"] == "norm")
    values = np.full(e["nbytes"] // 4, 3.4e38, np.float32).tobytes()
    with open(bad, "r+b") as f:  # the new values, their CRC-32 and the metadata's: a sound file
        f.seek(data + e["offset"])
        f.write(values)
        head = f.seek(0) or f.read(file.HEADER)
        raw = f.read(int.from_bytes(head[12:16], "little"))
        assert raw.count(e["crc32"].encode()) == 1
        raw = raw.replace(e["crc32"].encode(), f"{zlib.crc32(values):08x}".encode())
        f.seek(16)
        f.write(zlib.crc32(raw).to_bytes(4, "little"))
        f.seek(file.HEADER)
        f.write(raw)
    assert run("verify", str(bad)).returncode == 0
    one_error(run("classify", "-m", str(bad), SAFE), "non-finite")


def test_a_bad_variable_fails_every_command_before_any_work_unless_the_option_wins(model, tmp_path):
    hf = os.path.join(os.path.dirname(model), "decisive-g32-s0")
    assert run("classify", "-m", model, SAFE, "--threads", "1", env={"PYGUARD_THREADS": "abc"}).returncode == 0
    for var, value in (("PYGUARD_THREADS", "abc"), ("PYGUARD_ISA", "bogus")):
        words = f"{var}={value!r}"
        one_error(run("verify", model, env={var: value}), words)
        one_error(run("convert", hf, str(tmp_path / "x.pgw"), env={var: value}), words)
        r = run("demo", "--keep", str(tmp_path / "demo"), env={var: value})
        one_error(r, words)
        assert r.out == "" and sorted(os.listdir(tmp_path)) == []  # nothing written, nothing converted
    one_error(run("convert", hf, str(tmp_path / "x.pgw"), "--threads", "1", env={"PYGUARD_ISA": "bogus"}), "PYGUARD_ISA")


def test_convert_threads_default_to_the_variable(model, tmp_path, monkeypatch):
    import pyguard.convert.hf

    seen = []
    monkeypatch.setattr(pyguard.convert.hf, "convert", lambda *a, threads, **k: seen.append(threads) or 1 / 0)
    hf = os.path.join(os.path.dirname(model), "decisive-g32-s0")
    for env, option, expected in (("3", [], 3), ("3", ["--threads", "2"], 2)):
        monkeypatch.setenv("PYGUARD_THREADS", env)
        assert cli.main(["convert", hf, str(tmp_path / "x.pgw"), *option]) == 2  # 1 / 0: stopped there
    assert seen == [3, 2]


def test_verify_option_finds_a_damaged_weight(model, tmp_path):
    bad = tmp_path / "flipped.pgw"
    data = bytearray(open(model, "rb").read())
    _, meta, start, _ = __import__("pyguard.formats.file", fromlist=["x"])._read_header(model)
    e = next(x for x in meta["arrays"] if x["name"].endswith(".qs"))
    data[start + e["offset"] + 7] ^= 0x10  # one bit of a weight
    bad.write_bytes(bytes(data))
    assert run("classify", "-m", str(bad), SAFE).returncode in (0, 1)  # unchecked: a verdict, maybe another
    one_error(run("classify", "-m", str(bad), SAFE, "--verify"), "checksum mismatch")
    assert run("classify", "-m", model, SAFE, "--verify").returncode == 0


def test_output_paths_are_checked_before_any_work(model, tmp_path):
    hf = os.path.join(os.path.dirname(model), "decisive-g32-s0")
    (tmp_path / "file").write_text("")
    for out, why in [(tmp_path, "is a directory"), (tmp_path / "no" / "x.pgw", "is not a directory"),
                     (tmp_path / "file" / "x.pgw", "is not a directory"),
                     ("/proc/pyguard-test.pgw", "cannot write")]:  # /proc takes no new files, even from root
        r = run("convert", hf, str(out))
        one_error(r, f"OUT_FILE {out}: ", why)
        assert ".part" not in r.err and "converting" not in r.err
        r = run("classify", "-m", model, "--jsonl", "-", "--out", str(out), stdin=(line(1) + "\n").encode())
        one_error(r, f"--out {out}: ", why)
    assert sorted(os.listdir(tmp_path)) == ["file"]
    src = tmp_path / "in.jsonl"
    src.write_text(line(1) + "\n")
    one_error(run("classify", "-m", model, "--jsonl", str(src), "--out", str(src)), "the same file as --jsonl")
    assert src.read_text() == line(1) + "\n"


def test_convert_names_the_path_typed_and_leaves_no_part_file(model, tmp_path, monkeypatch, capsys):
    import tempfile

    import pyguard.formats.file

    hf, out = os.path.join(os.path.dirname(model), "decisive-g32-s0"), str(tmp_path / "x.pgw")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where a calibration store would be left
    os.mkdir(tmp_path / "tmp")
    fds = len(os.listdir("/proc/self/fd"))  # the calibration's store and the .part file get closed too
    os.mkdir(out + ".part")  # a stale directory where the temporary file goes (found after the calibration)
    assert cli.main(["convert", hf, out]) == 2
    assert capsys.readouterr().err.endswith(f"\npyguard: error: {out}: cannot write (Is a directory)\n")
    assert os.listdir(tmp_path / "tmp") == [] and len(os.listdir("/proc/self/fd")) == fds
    os.rmdir(out + ".part")
    real, calls = pyguard.formats.file.Writer.append, []

    def interrupted(self, a):  # Ctrl-C once the file has begun
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(self, a)

    monkeypatch.setattr(pyguard.formats.file.Writer, "append", interrupted)
    assert cli.main(["convert", hf, out]) == 2
    assert capsys.readouterr().err.endswith("pyguard: interrupted\n") and os.listdir(tmp_path) == ["tmp"]
    assert os.listdir(tmp_path / "tmp") == [] and len(os.listdir("/proc/self/fd")) == fds


def _stopped_in_calibration(hf: str, out, tmp, sig: int) -> tuple[int, str]:
    """Start `pyguard convert` (TMPDIR tmp), send `sig` once it reports its calibration's first
    layer done (its matrices are in the store; the second and last layer is running), return
    (exit status, stderr)."""
    p = subprocess.Popen([sys.executable, "-m", "pyguard.cli", "convert", hf, str(out)], cwd=ROOT, stderr=subprocess.PIPE,
                         env={**os.environ, "TMPDIR": str(tmp)})
    err = b""
    try:
        while b"calibration layer 0" not in err and p.poll() is None:
            err += os.read(p.stderr.fileno(), 4096)
    finally:
        p.send_signal(sig)
        _, rest = p.communicate(timeout=120)
    return p.returncode, (err + rest).decode()


def test_sigterm_during_a_conversion_leaves_nothing(model, tmp_path):
    """SIGTERM (a service manager, a timeout) stops a conversion as Ctrl-C does: no output, no
    .part file, nothing left in the temporary directory."""
    hf, out, tmp = os.path.join(os.path.dirname(model), "decisive-g32-s0"), tmp_path / "x.pgw", tmp_path / "tmp"
    tmp.mkdir()
    code, err = _stopped_in_calibration(hf, out, tmp, signal.SIGTERM)
    assert code == 2 and err.endswith("pyguard: terminated\n"), err
    assert os.listdir(tmp) == [] and sorted(os.listdir(tmp_path)) == ["tmp"]


def test_sigkill_during_calibration_leaves_nothing(model, tmp_path):
    """Even a kill no handler sees (the OOM killer's) leaves no calibration store: it is an
    unlinked temporary file, which the system frees with the process."""
    hf, out, tmp = os.path.join(os.path.dirname(model), "decisive-g32-s0"), tmp_path / "x.pgw", tmp_path / "tmp"
    tmp.mkdir()
    code, err = _stopped_in_calibration(hf, out, tmp, signal.SIGKILL)
    assert code == -signal.SIGKILL and "calibration layer 0" in err, err
    assert os.listdir(tmp) == []  # (a kill once the file is being written leaves its .part: the next run replaces it)


def test_convert_names_the_path_typed_on_a_full_disk(model, tmp_path):
    import resource

    hf, out = os.path.join(os.path.dirname(model), "decisive-g32-s0"), str(tmp_path / "x.pgw")
    # a file size limit stands in for a full disk: writes fail with EFBIG, an error without a file name
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = subprocess.run([sys.executable, "-m", "pyguard.cli", "convert", hf, out], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "TMPDIR": str(tmp)},
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)))
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == f"pyguard: error: {out}: cannot write (File too large)", r.stderr
    assert sorted(os.listdir(tmp_path)) == ["tmp"] and os.listdir(tmp) == []  # no empty x.pgw.part, no store


def test_verify_progress_is_a_percentage(model):
    r = run("verify", model)
    assert r.returncode == 0 and "all checksums match" in r.out, r.err
    percents = [float(x) for x in re.findall(r"verifying +([\d.]+)%", r.err)]
    assert percents and percents[-1] == 100.0 and percents == sorted(percents) and max(percents) <= 100


def test_demo_runs():
    r = run("demo", "--threads", "1")
    assert r.returncode == 0, r.err
    assert "RANDOM" in r.out and "-> " in r.out and "Llama-Guard-3-1B" in r.out


def test_demo_keeps_its_files_and_the_next_commands_work(tmp_path):
    keep = tmp_path / "demo dir"  # a space: the printed commands must quote it
    r = run("demo", "--keep", str(keep), "--seed", "1")
    assert r.returncode == 0, r.err
    assert (keep / "hf" / "config.json").exists() and (keep / "demo.pgw").exists()
    commands = [shlex.split(x) for x in r.out.splitlines() if x.startswith("  pyguard ")]
    assert [c[1] for c in commands] == ["verify", "classify", "convert"], r.out
    verdicts = {"safe": 0, "unsafe": 1}
    for c in commands:
        done = run(*c[1:])
        expected = verdicts[Guard.load(str(keep / "demo.pgw")).classify(c[4]).verdict] if c[1] == "classify" else 0
        assert done.returncode == expected, done.err
    assert os.path.exists(commands[2][3])
    one_error(run("demo", "--keep", str(keep)), f"--keep {keep}: exists and is not an empty directory")


# ---- --thresholds (per-category thresholds: docs/THRESHOLDS.md)

def _main(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_thresholds_file_gives_the_api_verdict(model, guard, tmp_path, capsys):
    """classify --thresholds, alone and with --jsonl, gives Guard.classify(thresholds=...)'s results."""
    base = guard.classify(SAFE, category_scores=True)
    top = max(base.category_scores, key=base.category_scores.get)
    limits = {top: base.category_scores[top]}  # reached exactly: unsafe, with that code
    t = tmp_path / "t.json"
    t.write_text(json.dumps({"threshold": None, "categories": limits}))
    expected = guard.classify(SAFE, thresholds=limits)
    assert expected.unsafe and top in expected.categories and base.verdict == "safe"
    code, out, err = _main(capsys, "classify", "-m", model, SAFE, "--thresholds", str(t), "--json")
    got = json.loads(out)
    assert code == 1 and {k: got[k] for k in STABLE[1:]} == {k: getattr(expected, k) for k in STABLE[1:]}, err
    src, res = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(line("a") + "\n" + line("b", UNSAFE) + "\n")
    assert _main(capsys, "classify", "-m", model, "--jsonl", str(src), "--out", str(res), "--thresholds", str(t))[0] == 1
    want = [expected, guard.classify(UNSAFE, thresholds=limits)]
    assert [{k: r[k] for k in STABLE[1:]} for r in stable(res)] == [{k: getattr(r, k) for k in STABLE[1:]} for r in want]
    # the thresholds are in the run record: resuming with others (or none) is refused, the same ones go on
    t2 = tmp_path / "t2.json"
    t2.write_text(json.dumps({"threshold": None, "categories": {top: 0.5}}))
    for extra in (["--thresholds", str(t2)], []):
        code, _, err = _main(capsys, "classify", "-m", model, "--jsonl", str(src), "--out", str(res), "--resume", *extra)
        assert code == 2 and "with other --categories, --exclude, --threshold or --thresholds" in err
    assert _main(capsys, "classify", "-m", model, "--jsonl", str(src), "--out", str(res), "--resume", "--thresholds", str(t))[0] == 1


def test_thresholds_file_and_threshold_option(model, guard, tmp_path, capsys):
    t = tmp_path / "t.json"
    t.write_text(json.dumps({"threshold": 0.0, "categories": {"S1": 1}}))
    assert _main(capsys, "classify", "-m", model, SAFE, "--thresholds", str(t))[0] == 1  # the file's threshold applies
    assert _main(capsys, "classify", "-m", model, SAFE, "--thresholds", str(t), "--threshold", "0")[0] == 1  # equal: fine
    code, _, err = _main(capsys, "classify", "-m", model, SAFE, "--thresholds", str(t), "--threshold", "0.5")
    assert code == 2 and err == f"pyguard: error: --threshold 0.5 and the threshold 0.0 of --thresholds {t} differ: give one of them\n"


@pytest.mark.parametrize("text, words", [
    ("not json", ["not JSON"]),
    ('{"threshold": NaN, "categories": {}}', ["NaN is not a JSON number"]),
    ('{"threshold": 0.5, "categories": {"S1": 2}}', ["categories: S1 must be a number from 0 to 1"]),
    ('{"threshold": 0.5, "categories": {"S1": "x"}}', ["categories: S1 must be a number"]),
    ('{"threshold": 0.5}', ['expected {"threshold"']),
    ('{"categories": {"S99": 0.5}}', ["thresholds: S99 not among the categories judged"]),  # the model's policy
    ('{"categories": {"S6": 0.5}}', ["thresholds: S6 not among the categories judged"]),  # excluded
])
@pytest.mark.parametrize("mode", [[SAFE], ["--jsonl", "{src}"], [SAFE, "--stream"]])
def test_bad_thresholds_files_exit_2_in_one_line(model, tmp_path, capsys, text, words, mode):
    t, src = tmp_path / "t.json", tmp_path / "in.jsonl"
    t.write_text(text)
    src.write_text(line("a") + "\n")
    argv = ["classify", "-m", model, *[m.format(src=src) for m in mode], "--exclude", "S6", "--thresholds", str(t)]
    code, out, err = _main(capsys, *argv)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith("pyguard: error: ")
    assert all(w in err for w in words) and ("S99" in text or "S6" in text or f"--thresholds {t}: " in err), err
