"""`pyguard serve` as clients see it: a real server in a subprocess on a free loopback port,
the official openai client on /v1/moderations, httpx for the rest; and Result.category_scores
in the Python API. The model is the decisive one (synth.decisive_guard): mid-range scores and
both verdicts, so results can be told apart and compared with direct classification."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyguard import Guard
from pyguard.serve import MODERATION_CATEGORIES, ApiError, Batcher, Histogram, Metrics
from synth import SAMPLES, decisive_guard

START_TIMEOUT = 120  # seconds for a server to load and listen (a bound, not a measurement)
TEXTS = [c for c in SAMPLES if isinstance(c, str)]
SAME = ("verdict", "categories", "category_names", "score", "answer", "prompt_tokens", "generated_tokens",
        "category_scores")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return decisive_guard(str(tmp_path_factory.mktemp("serve")), "guard")


@pytest.fixture(scope="module")
def guard(model):
    return Guard.load(model, threads=1)


class Server:
    """A `pyguard serve` subprocess; its stderr lines are collected by a thread."""

    def __init__(self, model: str, *args: str, env: dict | None = None):
        cmd = [sys.executable, "-m", "pyguard.cli", "serve", "-m", model, "--port", "0", "--threads", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        ready: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        try:
            self.url = ready.get(timeout=START_TIMEOUT)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"no ready message: {self.lines}") from None
        assert self.url, self.lines

    def _read(self, ready: queue.Queue) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("pyguard serve:") and " on http://" in line:
                ready.put(line.split(" on ")[1].split()[0])
        ready.put(None)  # the process ended (if not ready yet: it failed)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@contextmanager
def running(model: str, *args: str, env: dict | None = None):
    s = Server(model, *args, env=env)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def server(model):
    with running(model) as s:
        yield s


def post(url: str, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"content-type": "application/json", **kw.pop("headers", {})},
                      timeout=60, **kw)


def burst(url: str, path: str, bodies: list, headers: dict | None = None) -> list[httpx.Response]:
    """Every body posted at once (one connection each), the responses in order."""
    async def run():
        limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as client:
            return await asyncio.gather(*(client.post(url + path, json=b) for b in bodies))
    return asyncio.run(run())


def native(r) -> dict:
    return {k: getattr(r, k) for k in SAME}


# ---- the Python API: Result.category_scores


def test_category_scores(guard):
    """P(unsafe) x P(first code): over the codes they sum to the score, the greedy first code
    is the likeliest, batched equals alone; filled when unsafe or asked for, else empty."""
    plain = [guard.classify(c) for c in SAMPLES]
    scored = guard.classify_many(SAMPLES, category_scores=True)
    assert any(r.unsafe for r in plain) and not all(r.unsafe for r in plain)
    for c, p, s in zip(SAMPLES, plain, scored):
        assert native(guard.classify(c, category_scores=True)) == native(s)
        assert (p.verdict, p.answer, p.score) == (s.verdict, s.answer, s.score)
        assert list(s.category_scores) == [f"S{i}" for i in range(1, 14)]
        assert sum(s.category_scores.values()) == pytest.approx(s.score, rel=1e-9)
        assert all(0 < x < s.score for x in s.category_scores.values())
        assert p.category_scores == (s.category_scores if p.unsafe else {})
        if s.unsafe:
            assert max(s.category_scores, key=s.category_scores.get) == s.categories[0]
    with pytest.raises(Exception, match="category_scores must be True or False"):
        guard.classify("hi", category_scores="yes")


def test_core_does_not_import_the_server_stack():
    code = "import sys, pyguard, pyguard.cli; assert not {'starlette', 'uvicorn'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- the OpenAI API


def test_openai_client(server, guard):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    resp = client.moderations.create(input=TEXTS, model="llama-guard-3-1b")
    assert resp.id.startswith("modr-") and resp.model.endswith(".pgw") and len(resp.results) == len(TEXTS)
    flagged = 0
    for text, m in zip(TEXTS, resp.results):
        r = guard.classify(text, category_scores=True)
        flagged += m.flagged
        assert m.flagged == r.unsafe
        cats, scores = m.categories.model_dump(by_alias=True), m.category_scores.model_dump(by_alias=True)
        assert set(cats) == set(scores) == set(MODERATION_CATEGORIES)
        for key, codes in MODERATION_CATEGORIES.items():
            assert cats[key] == any(c in r.categories for c in codes)
            assert scores[key] == sum((r.category_scores.get(c, 0.0) for c in codes), 0.0)
        assert m.model_extra["pyguard"] == {"verdict": r.verdict, "categories": r.categories,
                                            "category_names": r.category_names, "score": r.score,
                                            "category_scores": r.category_scores}
    assert 0 < flagged < len(TEXTS)
    one = client.moderations.create(input=TEXTS[1])
    assert one.results[0].model_extra["pyguard"]["score"] == guard.classify(TEXTS[1]).score
    assert any(line.startswith("POST /v1/moderations 200 ") and line.endswith(" tokens") for line in server.lines)


def test_text_parts_and_images(server, guard):
    r = post(server.url, "/v1/moderations", {"input": [{"type": "text", "text": TEXTS[4]}]})
    assert r.status_code == 200 and r.json()["results"][0]["pyguard"]["score"] == guard.classify(TEXTS[4]).score
    r = post(server.url, "/v1/moderations", {"input": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]})
    assert r.status_code == 400 and "images are not supported" in r.json()["error"]["message"]


# ---- the native API, batching


def test_concurrent_requests_equal_direct_classification(server, guard):
    convs = [SAMPLES[i % len(SAMPLES)] for i in range(64)]
    convs = [[{"role": "user", "content": c}] if isinstance(c, str) else c for c in convs]
    before = _metric(server.url, "pyguard_batch_size_count")
    responses = burst(server.url, "/v1/classify", [{"messages": c} for c in convs])
    direct = {json.dumps(c): native(guard.classify(c)) for c in convs}
    for c, r in zip(convs, responses):
        assert r.status_code == 200, r.text
        assert {k: r.json()[k] for k in SAME} == direct[json.dumps(c)]
    batches = _metric(server.url, "pyguard_batch_size_count") - before
    assert 1 <= batches < 64  # requests were judged together


def test_classify_options_and_conversations(server, guard):
    convs = SAMPLES[:5]
    body = {"conversations": convs, "exclude": ["S13"], "threshold": 0.3, "category_scores": True}
    r = post(server.url, "/v1/classify", body)
    assert r.status_code == 200, r.text
    want = guard.classify_many(convs, exclude=["S13"], threshold=0.3, category_scores=True)
    assert [{k: x[k] for k in SAME} for x in r.json()["results"]] == [native(w) for w in want]
    cats = {"S1": "Violence.", "S2": "Crime."}
    r = post(server.url, "/v1/classify", {"messages": [{"role": "user", "content": TEXTS[1]}], "categories": cats})
    assert {k: r.json()[k] for k in SAME} == native(guard.classify(TEXTS[1], categories=cats))


def test_classify_thresholds(server, guard):
    """Per-category thresholds give Guard.classify's verdicts: a threshold at a safe sample's
    top category score makes it unsafe with that code (docs/THRESHOLDS.md)."""
    convs = SAMPLES[:6]
    base = guard.classify(convs[0], category_scores=True)
    top = max(base.category_scores, key=base.category_scores.get)
    limits = {top: base.category_scores[top], "S10": 0.05}
    r = post(server.url, "/v1/classify", {"conversations": convs, "thresholds": limits, "threshold": None})
    assert r.status_code == 200, r.text
    want = guard.classify_many(convs, thresholds=limits)
    assert [{k: x[k] for k in SAME} for x in r.json()["results"]] == [native(w) for w in want]
    assert base.verdict == "safe" and want[0].unsafe and top in want[0].categories


def test_health_and_metrics(server):
    h = httpx.get(server.url + "/healthz").json()
    assert h["status"] == "ok" and h["model"].endswith(".pgw") and h["kernel"] and h["queue_depth"] == 0
    post(server.url, "/v1/moderations", {"input": "hello"})
    text = httpx.get(server.url + "/metrics").text
    for name in ("pyguard_requests_total", "pyguard_request_seconds", "pyguard_tokens_total", "pyguard_batch_size",
                 "pyguard_queue_depth"):
        assert f"# TYPE {name} " in text
    assert _metric(server.url, 'pyguard_requests_total{endpoint="/v1/moderations",status="200"}') >= 1
    assert _metric(server.url, 'pyguard_tokens_total{kind="prompt"}') > 0


def _metric(url: str, name: str, default: float | None = None) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    if default is not None:
        return default
    raise AssertionError(f"no metric {name}")


# ---- overload, bad input, auth, shutdown


def test_burst_on_a_tiny_queue(model, guard):
    """40 requests at once on a queue of 2: some 429 (with Retry-After), the others answered
    exactly; every request gets a status, none a 5xx."""
    with running(model, "--max-queue", "2", "--max-batch", "1") as s:
        responses = burst(s.url, "/v1/moderations", [{"input": TEXTS[i % len(TEXTS)]} for i in range(40)])
        codes = [r.status_code for r in responses]
        assert set(codes) == {200, 429}, codes
        for i, r in enumerate(responses):
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["results"][0]["pyguard"]["score"] == guard.classify(TEXTS[i % len(TEXTS)]).score
        assert post(s.url, "/v1/moderations", {"input": "hello"}).status_code == 200  # still serving
        assert _metric(s.url, 'pyguard_batch_size_bucket{le="1"}') == _metric(s.url, "pyguard_batch_size_count") > 0


LONG = "word " * 9000  # over max_tokens (8192) with the prompt
BAD = [
    ("/v1/moderations", b"{", None, "not JSON"),
    ("/v1/moderations", b'{"input": NaN}', None, "not JSON"),
    ("/v1/moderations", b"\xff\xfe", None, "not JSON"),
    ("/v1/moderations", b"[" * 100000, None, "nested too deeply"),
    ("/v1/moderations", [], None, "must be a JSON object"),
    ("/v1/moderations", {}, "input", "missing field 'input'"),
    ("/v1/moderations", {"input": "x", "extra": 1}, "extra", "unknown field"),
    ("/v1/moderations", {"input": 5}, "input", "input must be a string"),
    ("/v1/moderations", {"input": []}, "input", "non-empty list"),
    ("/v1/moderations", {"input": ["ok", 3]}, "input", "input 2 must be a string"),  # inputs count from 1
    ("/v1/moderations", {"input": "   "}, "input", "input is empty (nothing but white space)"),
    ("/v1/moderations", {"input": ""}, "input", "input is empty (nothing but white space)"),  # was "message 0"
    ("/v1/moderations", {"input": ["ok", ""]}, "input", "input 2 is empty"),
    ("/v1/moderations", {"input": [{"type": "text", "text": " "}]}, "input", "input 1 is empty"),
    ("/v1/moderations", {"input": ["ok", {"type": "image_url", "image_url": {"url": "x"}}]}, "input",
     "input 2: images are not supported"),
    ("/v1/moderations", {"input": "x", "model": 3}, "model", "model must be a string"),
    ("/v1/moderations", {"input": ["ok", LONG]}, None, "input 2: the prompt is"),
    ("/v1/moderations", {"input": ["x"] * 257}, "input", "257 conversations in one request, over the queue's 256"),
    ("/v1/classify", {}, None, "exactly one of messages"),
    ("/v1/classify", {"messages": [], "conversations": []}, None, "exactly one of messages"),
    ("/v1/classify", {"conversations": "abc"}, "conversations", "non-empty list"),
    ("/v1/classify", {"messages": [{"role": "robot", "content": "hi"}]}, None, "role"),
    ("/v1/classify", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}, None,
     "message 2 (the response): empty content"),
    ("/v1/classify", {"messages": " "}, None, "the message: empty content"),
    ("/v1/classify", {"conversations": ["ok", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "user", "content": "c"}]]},
     None, "conversation 2: message 2: roles must alternate"),
    ("/v1/classify", {"conversations": ["ok", "fine", " "]}, None, "conversation 3: the message: empty content"),
    ("/v1/classify", {"messages": "hi", "threshold": 2}, "threshold", "threshold must be"),
    ("/v1/classify", {"messages": "hi", "threshold": "0.5"}, "threshold", "threshold must be"),
    ("/v1/classify", {"messages": "hi", "exclude": ["S99"]}, "exclude", "S99"),
    ("/v1/classify", {"messages": "hi", "categories": {"X1": "Unspellable."}}, None, "cannot answer X1"),
    ("/v1/classify", {"messages": "hi", "category_scores": "yes"}, "category_scores", "True or False"),
    ("/v1/classify", {"messages": "hi", "thresholds": {"S1": 1.5}}, "thresholds", "S1 must be a number from 0 to 1"),
    ("/v1/classify", {"messages": "hi", "thresholds": {"S1": "0.5"}}, "thresholds", "S1 must be a number from 0 to 1"),
    ("/v1/classify", {"messages": "hi", "thresholds": {"S1": True}}, "thresholds", "S1 must be a number from 0 to 1"),
    ("/v1/classify", {"messages": "hi", "thresholds": {"S99": 0.5}}, "thresholds", "S99 not among the categories judged"),
    ("/v1/classify", {"messages": "hi", "exclude": ["S6"], "thresholds": {"S6": 0.5}}, "thresholds",
     "S6 not among the categories judged"),
    ("/v1/classify", {"messages": "hi", "thresholds": [0.5]}, "thresholds", "thresholds must be a mapping"),
    ("/v1/classify", {"messages": [{"role": "user", "content": LONG}]}, None, "tokens"),
]


@pytest.mark.parametrize("path,body,param,message", BAD, ids=[f"{i}-{b[3][:20]}" for i, b in enumerate(BAD)])
def test_bad_input(server, path, body, param, message):
    r = post(server.url, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert message in err["message"] and err["param"] == param and "\n" not in err["message"]
    assert not err["message"].startswith(("input 1:", "conversation 1:"))  # an index only among several
    assert not any(f"{what} 0" in err["message"] for what in ("input", "conversation", "message"))  # counted from 1


FIELDS = ["input", "model", "messages", "conversations", "categories", "exclude", "threshold", "thresholds", "category_scores", "role",
          "content", "type", "text", "S1", "S6"]
JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-2, 2) | st.sampled_from(["", " ", "user", "assistant", "S6", "hi"]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4),
                    max_leaves=12)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(path=st.sampled_from(["/v1/moderations", "/v1/classify"]), body=JSON)
def test_any_json_gets_a_verdict_or_a_400(server, path, body):
    """Whatever JSON arrives: a 200 with results, or a 400 in OpenAI's shape; never a 5xx."""
    r = post(server.url, path, body)
    assert r.status_code in (200, 400), (r.status_code, r.text)
    if r.status_code == 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"] and "\n" not in err["message"]
    else:
        assert "results" in r.json() or r.json()["verdict"] in ("safe", "unsafe")


def test_http_errors(server):
    r = post(server.url, "/v1/moderations", b'{"input": "' + b"x" * (2 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    r = post(server.url, "/v1/classify", b"x" * (64 << 20))  # declared far over the limit: refused unread
    assert r.status_code == 413
    assert httpx.get(server.url + "/v1/moderations").status_code == 405
    r = httpx.get(server.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route GET /v2/nothing"
    assert post(server.url, "/v1/moderations", {"input": "hello"}).status_code == 200  # still serving


def test_api_key(model):
    with running(model, env={"PYGUARD_API_KEY": "s3cret"}) as s:
        assert "API key required" in s.lines[-1]
        assert httpx.get(s.url + "/healthz").status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}, {"authorization": "Bearer s3cre"},
                        {"authorization": "Bearer s3cretX"}, {"authorization": "Bearer s3cret s3cret"},
                        {"authorization": "bearer s3cret"}, {"authorization": "Bearer  s3cret"}):
            r = post(s.url, "/v1/moderations", {"input": "hi"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
            assert httpx.get(s.url + "/metrics", headers=headers).status_code == 401
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0).moderations.create(input="hi")
        assert len(ok.results) == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).moderations.create(input="hi")
    with running(model, "--api-key", "other") as s:
        assert post(s.url, "/v1/moderations", {"input": "hi"}, headers={"authorization": "Bearer other"}).status_code == 200


@pytest.mark.parametrize("args,message", [
    (["--host", "0.0.0.0"], "--insecure"),
    (["--max-queue", "0"], "max_queue must be"),
    (["--max-batch", "-1"], "max_batch must be"),
    (["--port", "65536"], "port must be"),
    (["--api-key", ""], "API key"),
    (["--api-key", " s3cret"], "white space"),  # HTTP strips a header's outer white space: it could never match
    (["--api-key", "s3cret "], "white space"),
    (["--max-tokens-in-flight", "0"], "max_tokens_in_flight must be"),
    (["--max-tokens-in-flight", "100"], "max_tokens_in_flight 100 is too small"),
    (["--read-timeout", "0"], "read_timeout must be"),
    (["--shutdown-timeout", "nan"], "shutdown_timeout must be"),
])
def test_refused_at_start(model, args, message):
    p = subprocess.run([sys.executable, "-m", "pyguard.cli", "serve", "-m", model, *args], capture_output=True, text=True,
                       timeout=120, env={k: v for k, v in os.environ.items() if k != "PYGUARD_API_KEY"})
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr


def test_damaged_file_refused_at_start(model, tmp_path):
    """A flipped weight byte (its checksum in the directory unchanged): pyguard serve checks
    every checksum before listening and refuses the file with one line, exit 2; --no-verify
    (documented as skipping it) starts."""
    import shutil

    from pyguard.formats.file import load

    bad = tmp_path / "flipped.pgw"
    shutil.copyfile(model, bad)
    (entry,) = [e for e in load(model).meta["arrays"] if e["name"] == "layers.1.w2.qs"]
    data_offset = int.from_bytes(open(model, "rb").read(32)[24:32], "little")
    with open(bad, "r+b") as f:
        f.seek(data_offset + entry["offset"] + 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    p = subprocess.run([sys.executable, "-m", "pyguard.cli", "serve", "-m", str(bad), "--port", "0"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
    assert "'layers.1.w2.qs' is corrupt (checksum mismatch)" in p.stderr, p.stderr
    with running(str(bad), "--no-verify") as s:
        assert httpx.get(s.url + "/healthz").status_code == 200


def test_cache_size_option(model, guard):
    """--cache-mb 0 keeps nothing: the same results, from scratch; a bad size is a usage error."""
    with running(model, "--cache-mb", "0") as s:
        for text in TEXTS[:2] * 2:  # each twice: nothing comes from a cache
            got = post(s.url, "/v1/classify", {"messages": [{"role": "user", "content": text}]})
            assert got.status_code == 200 and {k: got.json()[k] for k in SAME} == native(guard.classify(text))
            assert got.json()["cached_tokens"] == 0
    p = subprocess.run([sys.executable, "-m", "pyguard.cli", "serve", "-m", model, "--cache-mb", "-1"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "--cache-mb: expected an integer from 0" in p.stderr.splitlines()[-1], p.stderr


def test_port_in_use(model, server):
    port = server.url.rsplit(":", 1)[1]
    p = subprocess.run([sys.executable, "-m", "pyguard.cli", "serve", "-m", model, "--port", port], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in p.stderr, p.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown(model, guard, sig):
    """A signal while requests are queued: every one is answered, then exit 0. The work left
    at the signal (at least 5 conversations of ~2,200 tokens, judged one at a time from
    scratch) outlasts uvicorn's first 0.1 s of shutdown by far: a shutdown deadline cut short
    would answer some of them 503."""
    with running(model, "--max-batch", "1", "--cache-mb", "0") as s:
        results: list = []
        bodies = [{"input": f"{i} " + "word " * 2000} for i in range(8)]
        t = threading.Thread(target=lambda: results.extend(burst(s.url, "/v1/moderations", bodies)))
        t.start()
        deadline = time.monotonic() + 60  # a bound on the wait, not a measurement
        while httpx.get(s.url + "/healthz").json()["queue_depth"] < 5:
            assert time.monotonic() < deadline and t.is_alive(), "the requests never queued"
        assert s.stop(sig) == 0
        t.join(timeout=60)
        assert [r.status_code for r in results] == [200] * len(bodies), [r.text[:200] for r in results]
        for b, r in zip(bodies, results):
            assert r.json()["results"][0]["pyguard"]["score"] == guard.classify(b["input"]).score
        assert s.lines[-1] == "pyguard serve: stopped"
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/healthz")


# ---- read deadlines, bounded shutdown, hang-ups, HTTP framing

EXIT_BOUND = 30  # seconds: a bound that a server held by a stalled client would never meet, not a measurement


def _connect(url: str):
    import socket

    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=EXIT_BOUND)  # every read bounded
    return sock


def _read_all(sock) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _json_error(response: bytes, status: int) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), response[:300]
    assert b"content-type: application/json" in head.lower(), head
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"], err
    return err


STALLED = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n0123456789"


def test_read_deadlines(model):
    """A body that stops arriving gets 408 after --read-timeout and the connection is closed;
    headers that never end are cut too; neither holds SIGTERM: the process exits soon after."""
    with running(model, "--read-timeout", "1") as s:
        with _connect(s.url) as sock:
            sock.sendall(STALLED)
            response = _read_all(sock)
            err = _json_error(response, 408)
            assert err["code"] == "timeout" and "within 1 s" in err["message"]
            assert b"\r\nconnection: close\r\n" in response.partition(b"\r\n\r\n")[0].lower()  # not kept alive
        with _connect(s.url) as sock:
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            assert _read_all(sock) == b""  # closed by the server (recv would time out otherwise)
        assert post(s.url, "/v1/moderations", {"input": "hello"}).status_code == 200  # still serving
        with _connect(s.url) as stuck:
            stuck.sendall(STALLED)
            time.sleep(0.2)  # let the server start reading the body
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            assert s.proc.wait(timeout=EXIT_BOUND) == 0
            print(f"exit {time.monotonic() - t0:.2f} s after SIGTERM with a stalled client (read timeout 1 s)")
        assert any(line.startswith("POST /v1/classify 408 ") for line in s.lines)
        assert s.lines[-1] == "pyguard serve: stopped"


def test_shutdown_deadline_cuts_what_is_left(model, guard):
    """--shutdown-timeout 1 with far more work queued (conversations of ~7,200 tokens, a few
    seconds each here) and a client stalled in its body (--read-timeout longer than the
    shutdown): what was not judged by then gets the JSON 503, the stalled client too, and the
    process exits 0 without finishing the batch in progress."""
    with running(model, "--max-batch", "1", "--cache-mb", "0", "--read-timeout", "600", "--shutdown-timeout", "1") as s:
        results: list = []
        bodies = [{"input": f"{i} " + "word " * 7000} for i in range(4)]
        t = threading.Thread(target=lambda: results.extend(burst(s.url, "/v1/moderations", bodies)))
        t.start()
        deadline = time.monotonic() + 60
        while httpx.get(s.url + "/healthz").json()["queue_depth"] < 3:
            assert time.monotonic() < deadline and t.is_alive(), "the requests never queued"
        with _connect(s.url) as stuck:
            stuck.sendall(STALLED)
            time.sleep(0.2)
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            assert s.proc.wait(timeout=EXIT_BOUND) == 0
            print(f"exit {time.monotonic() - t0:.2f} s after SIGTERM (shutdown timeout 1 s)")
            assert _json_error(_read_all(stuck), 503)["code"] == "shutting_down"
        t.join(timeout=60)
        codes = [r.status_code for r in results]
        assert set(codes) <= {200, 503} and 503 in codes, codes
        for r in results:
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "shutting_down" and r.json()["error"]["type"] == "server_error"
        assert s.lines[-1] == "pyguard serve: stopped"


def test_client_hangup_is_not_a_server_error(model):
    """A client that hangs up inside its body is counted as 499 (client closed request),
    never as a 5xx; the server goes on."""
    with running(model) as s:
        for _ in range(3):
            with _connect(s.url) as sock:
                sock.sendall(STALLED)
                time.sleep(0.2)
        deadline = time.monotonic() + 60
        while _metric(s.url, 'pyguard_requests_total{endpoint="/v1/classify",status="499"}', 0) < 3:
            assert time.monotonic() < deadline, s.lines
            time.sleep(0.05)
        text = httpx.get(s.url + "/metrics").text
        assert 'status="5' not in text and "internal error" not in "\n".join(s.lines), s.lines
        assert sum(line.startswith("POST /v1/classify 499 ") for line in s.lines) == 3


def test_client_gone_while_queued_is_not_judged(model):
    """A client that hangs up while its conversation waits in the queue is counted as 499 and
    its conversation leaves the queue unjudged: only the two long requests make batches."""
    with running(model, "--max-batch", "1", "--cache-mb", "0") as s:
        results: list = []
        long = [{"input": f"{i} " + "word " * 7000} for i in range(2)]  # a few seconds each
        t = threading.Thread(target=lambda: results.extend(burst(s.url, "/v1/moderations", long)))
        t.start()
        deadline = time.monotonic() + 60
        while httpx.get(s.url + "/healthz").json()["queue_depth"] < 1:  # one judged, one waiting
            assert time.monotonic() < deadline and t.is_alive(), "the requests never queued"
        body = json.dumps({"messages": [{"role": "user", "content": "hello"}]}).encode()
        with _connect(s.url) as sock:
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            while httpx.get(s.url + "/healthz").json()["queue_depth"] < 2:
                assert time.monotonic() < deadline, "the short request never queued"
        while _metric(s.url, 'pyguard_requests_total{endpoint="/v1/classify",status="499"}', 0) < 1:
            assert time.monotonic() < deadline, s.lines
            time.sleep(0.05)
        assert httpx.get(s.url + "/healthz").json()["queue_depth"] <= 1  # withdrawn at once, not when its turn came
        t.join(timeout=120)
        assert [r.status_code for r in results] == [200, 200]
        assert _metric(s.url, "pyguard_batch_size_count", 0) == 2, httpx.get(s.url + "/metrics").text
        assert post(s.url, "/v1/classify", json.loads(body)).status_code == 200  # the server goes on
        assert _metric(s.url, "pyguard_batch_size_count", 0) == 3
        assert sum(line.startswith("POST /v1/classify 499 ") for line in s.lines) == 1


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    b"GARBAGE\r\n\r\n",
])
def test_malformed_http_gets_the_json_error(server, request_bytes):
    before = _metric(server.url, 'pyguard_requests_total{endpoint="other",status="400"}', 0)
    with _connect(server.url) as sock:
        sock.sendall(request_bytes)
        assert _json_error(_read_all(sock), 400)["code"] == "bad_http"
    assert _metric(server.url, 'pyguard_requests_total{endpoint="other",status="400"}', 0) == before + 1


# ---- the batcher, in process: the queue's bound, mixed batches, the tokens in flight


def _batcher_run(guard, submissions: list[tuple[dict, list]], max_queue: int = 256, max_positions: int = 8192,
                 start: bool = True) -> tuple[list, Batcher]:
    """Submit each (options, conversations) before the inference thread starts (so that they
    share batches deterministically), then start it; the outcome of each submission: None
    (refused) or its results and ApiErrors in order."""
    async def run():
        b = Batcher(guard, max_batch=16, max_queue=max_queue, metrics=Metrics(), max_positions=max_positions)
        loop = asyncio.get_running_loop()
        futures = [b.submit(opts, convs, loop) for opts, convs in submissions]
        if start:
            b.start()
            out = [None if f is None else await asyncio.wait_for(asyncio.gather(*f, return_exceptions=True), 60)
                   for f in futures]
            b.close()
            return out, b
        return futures, b
    return asyncio.run(run())


PLAIN = {"categories": None, "exclude": [], "threshold": None, "category_scores": False}


def test_queue_bound_counts_every_conversation(guard):
    """A request of several conversations needs room for all of them: the queue never holds
    more than max_queue, and a request that fits exactly is accepted."""
    subs = [(PLAIN, ["a", "b", "c"]), (PLAIN, ["d", "e"]), (PLAIN, ["f"]), (PLAIN, ["g"]), (PLAIN, ["h"] * 5)]
    futures, b = _batcher_run(guard, subs, max_queue=4, start=False)
    assert [f is not None for f in futures] == [True, False, True, False, False]
    assert b.depth() == 4
    futures, b = _batcher_run(guard, [(PLAIN, ["a"] * 4)], max_queue=4, start=False)
    assert futures[0] is not None and b.depth() == 4


def test_mixed_batch_results_go_to_their_requests(guard):
    """Conversations of several requests share one batch with some that cannot be judged
    (too long, an empty message): each request gets its own results, in its order, and the
    bad ones their own 400."""
    long = [{"role": "user", "content": "word " * 9000}]
    empty = [{"role": "user", "content": " "}]
    subs = [(PLAIN, [SAMPLES[1], long, SAMPLES[2]]), (PLAIN, [empty]), (PLAIN, [SAMPLES[4], SAMPLES[0]]),
            (PLAIN, [long, SAMPLES[12]]), (PLAIN, [SAMPLES[7]])]
    out, b = _batcher_run(guard, subs)
    assert b.metrics.batches.count == 1  # all the judgeable ones in one call: they did share a batch
    for (_, convs), results in zip(subs, out):
        for c, r in zip(convs, results):
            if c is long:
                assert isinstance(r, ApiError) and r.status == 400 and "tokens" in r.message
            elif c is empty:
                assert isinstance(r, ApiError) and r.status == 400 and "empty" in r.message
            else:
                assert native(r) == native(guard.classify(c)), c


def test_tokens_in_flight_bound_each_inference_call(guard, monkeypatch):
    """--max-tokens-in-flight: no inference call holds more positions (prompt tokens and the
    policy's longest answer, per conversation) than the budget; a batch over it is judged in
    several calls, every result unchanged. Conversations of equal size p: a budget of 2p - 1
    takes one per call (a count that forgot the answer's positions would take two), 2p two."""
    convs = [f"{i} " + "word " * 150 for i in range(6)]
    sizes = {len(r.ids) + r.budget for r in (guard.prepare(c) for c in convs)}
    assert len(sizes) == 1 and min(len(guard.prepare(c).ids) for c in convs) < min(sizes)
    p = sizes.pop()
    real = guard.classify_many
    for budget, per_call in ((2 * p - 1, 1), (2 * p, 2)):
        calls: list[int] = []

        def spy(conversations, **kw):
            calls.append(len(conversations))
            return real(conversations, **kw)

        monkeypatch.setattr(guard, "classify_many", spy)
        out, _ = _batcher_run(guard, [(PLAIN, convs)], max_positions=budget)
        monkeypatch.undo()
        assert calls == [per_call] * (len(convs) // per_call), (budget, calls)
        assert [native(r) for r in out[0]] == [native(guard.classify(c)) for c in convs]


def test_no_verdict_names_no_internal_index(model):
    """A damaged model (non-finite logits) is a 500 for every request of the failing call; its
    message names no conversation by its index in the server's internal batch (which the client
    never saw: "conversation 0: ..." for a request's only conversation, or its second)."""
    import numpy as np

    from pyguard.engine.model import Model
    from pyguard.formats.file import load

    f = load(model)
    tensors = dict(f.tensors)
    tensors["norm"] = np.full(f.config.dim, np.nan, np.float32)  # every logit NaN
    damaged = Guard(Model(f.config, tensors, f.head_ids, threads=1), f.tokenizer(), f.family)
    out, _ = _batcher_run(damaged, [(PLAIN, ["hello"]), (PLAIN, ["there", "again"])])
    for results in out:
        for r in results:
            assert isinstance(r, ApiError) and r.status == 500 and r.code == "no_verdict", r
            assert r.message.startswith("the model computed non-finite logits") and "conversation" not in r.message


class _SlowGuard:
    """A stand-in guard whose inference waits for a signal, to hold a batch running."""

    def __init__(self, guard):
        self.guard, self.running, self.release = guard, threading.Event(), threading.Event()

    def prepare(self, conversation, categories=None, exclude=()):
        return self.guard.prepare(conversation, categories, exclude)

    def classify_many(self, conversations, **kw):
        self.running.set()
        assert self.release.wait(60), "never released"
        return self.guard.classify_many(conversations, **kw)


def test_shutdown_cut_answers_queued_and_running(guard):
    """At the shutdown's deadline (Batcher.cut) every job still queued or in the batch being
    judged gets the 503 at once; the batch's later results are dropped, not delivered twice."""
    slow = _SlowGuard(guard)

    async def run():
        b = Batcher(slow, max_batch=2, max_queue=8, metrics=Metrics())
        loop = asyncio.get_running_loop()
        futures = b.submit(PLAIN, ["a", "b", "c", "d"], loop)
        b.start()
        assert await asyncio.to_thread(slow.running.wait, 60)  # "a" and "b" being judged, "c" and "d" queued
        b.cut()
        done = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 60)
        slow.release.set()
        b.close()
        return done, b.depth()

    done, depth = asyncio.run(run())
    assert depth == 0
    for r in done:
        assert isinstance(r, ApiError) and r.status == 503 and r.code == "shutting_down", r


# ---- metrics


def test_histogram_buckets():
    """Prometheus buckets are cumulative counts of observations <= le (a value on a bound
    counts in that bucket); +Inf and _count are all of them."""
    h = Histogram((1, 2, 4))
    for x in (0.5, 1, 2, 2.5, 4, 9):
        h.observe(x)
    assert h.lines("m", 'e="x"') == ['m_bucket{e="x",le="1"} 2', 'm_bucket{e="x",le="2"} 3', 'm_bucket{e="x",le="4"} 5',
                                     'm_bucket{e="x",le="+Inf"} 6', 'm_sum{e="x"} 19.000000', 'm_count{e="x"} 6']
    m = Metrics()
    m.request("/healthz", 200, 0.005)
    m.request("/healthz", 200, 0.0051)
    text = m.text(0)
    assert 'pyguard_request_seconds_bucket{endpoint="/healthz",le="0.005"} 1\n' in text
    assert 'pyguard_request_seconds_bucket{endpoint="/healthz",le="0.01"} 2\n' in text


def test_token_counters(server):
    """pyguard_tokens_total adds up exactly the prompt, cached and generated tokens of the results."""
    kinds = ("prompt", "cached", "generated")
    before = {k: _metric(server.url, f'pyguard_tokens_total{{kind="{k}"}}') for k in kinds}
    got = {k: 0 for k in kinds}
    for c in ([{"role": "user", "content": "A question about counters."}],) * 2 + ([{"role": "user", "content": TEXTS[1]}],):
        r = post(server.url, "/v1/classify", {"messages": c}).json()
        for k in kinds:
            got[k] += r[f"{k}_tokens"]
    assert 0 < got["cached"] < got["prompt"] and got["generated"] > 0
    assert {k: _metric(server.url, f'pyguard_tokens_total{{kind="{k}"}}') - before[k] for k in kinds} == got
