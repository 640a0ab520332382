"""`pyguard serve`: Llama Guard as an HTTP moderation service (OpenAI's /v1/moderations and a
native /v1/classify), with dynamic batching and bounded, overload-safe queueing.

One inference thread owns the Guard. A request (in the asyncio event loop) checks its body,
puts its conversations on a bounded queue and awaits their futures; the thread takes up to
max_batch queued conversations with the same options and judges them together
(Guard.classify_many), so the event loop never waits on inference and every result is exactly
Guard.classify's (batching is bit-exact). A queue too full for a request answers 429 at once.

Stack: starlette + uvicorn (the `serve` extra), the mainstream small ASGI pair: starlette
routes and reads bodies in a stream (for the size limit), uvicorn is the server and drains
in-flight requests on SIGTERM/SIGINT. Both are pure Python; no framework validation layer is
needed for two JSON endpoints. Prometheus text is a few lines written here (no client library).
"""

from __future__ import annotations

import asyncio
import bisect
import hmac
import ipaddress
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from . import checks
from .engine import kernels
from .errors import PyguardError
from .guard.guard import Guard, Result
from .guard.prompt import categories_of
from .guard.thresholds import check as check_thresholds

# OpenAI's moderation categories, each with the Llama Guard 3 codes it is filled from. A code
# may fill several; S6 (specialized advice), S7 (privacy), S8 (intellectual property) and S13
# (elections) have no OpenAI key and the sub-categories without codes are never flagged: such
# verdicts show in `flagged` and in the native `pyguard` field of each result.
MODERATION_CATEGORIES: dict[str, tuple[str, ...]] = {
    "harassment": ("S5",),
    "harassment/threatening": (),
    "hate": ("S10",),
    "hate/threatening": (),
    "illicit": ("S2", "S3", "S14"),
    "illicit/violent": ("S1", "S9"),
    "self-harm": ("S11",),
    "self-harm/intent": (),
    "self-harm/instructions": (),
    "sexual": ("S3", "S4", "S12"),
    "sexual/minors": ("S4",),
    "violence": ("S1", "S9"),
    "violence/graphic": (),
}
ENDPOINTS = ("/v1/moderations", "/v1/classify", "/healthz", "/metrics")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
GUARD_MAX_TOKENS = 8192  # Guard's default max_tokens: the longest conversation when the budget allows it


def moderation(r: Result) -> dict[str, Any]:
    """One OpenAI moderation result: a key is flagged when the verdict names one of its codes;
    its score is the sum of its codes' category scores, which is P(unsafe and the first code
    named is one of them): the codes' events are disjoint, so the sum is exact."""
    scores = {k: sum((r.category_scores.get(c, 0.0) for c in codes), 0.0) for k, codes in MODERATION_CATEGORIES.items()}
    return {
        "flagged": r.unsafe,
        "categories": {k: any(c in r.categories for c in codes) for k, codes in MODERATION_CATEGORIES.items()},
        "category_scores": scores,
        "category_applied_input_types": {k: ["text"] for k in MODERATION_CATEGORIES},
        "pyguard": {"verdict": r.verdict, "categories": r.categories, "category_names": r.category_names,
                    "score": r.score, "category_scores": r.category_scores},
    }


class ApiError(Exception):
    """An HTTP error in OpenAI's shape {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES[self.status], "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client hung up before its answer was ready (inside its body, or while its
    conversations waited in the queue, which then drops them): counted as status 499 (nginx's
    "client closed request"), answered to nobody, never a 5xx."""


CLIENT_GONE = 499


def shutting_down() -> ApiError:
    """The answer to what is left when the shutdown's deadline comes (the connection then closes)."""
    return ApiError(503, "the server is shutting down", code="shutting_down", headers={"Connection": "close"})


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, x: float) -> None:
        i = bisect.bisect_left(self.buckets, x)
        if i < len(self.buckets):
            self.counts[i] += 1
        self.sum += x
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        cum, out = 0, []
        for b, n in zip(self.buckets, self.counts):
            cum += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {cum}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        tail = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{tail} {self.sum:.6f}", f"{name}_count{tail} {self.count}"]


class Metrics:
    """Counters for /metrics, updated by the event loop and the inference thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency = {e: Histogram(LATENCY_BUCKETS) for e in ENDPOINTS + ("other",)}
        self.tokens = {"prompt": 0, "cached": 0, "generated": 0}
        self.batches = Histogram(BATCH_BUCKETS)
        self.item_seconds = 0.0  # inference time per conversation, smoothed (for Retry-After)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1
            self.latency[endpoint].observe(seconds)

    def batch(self, results: list[Result], seconds: float) -> None:
        with self.lock:
            self.batches.observe(len(results))
            for r in results:
                self.tokens["prompt"] += r.prompt_tokens
                self.tokens["cached"] += r.cached_tokens
                self.tokens["generated"] += r.generated_tokens
            per_item = seconds / len(results)
            self.item_seconds = per_item if self.item_seconds == 0 else 0.9 * self.item_seconds + 0.1 * per_item

    def text(self, depth: int) -> str:
        with self.lock:
            out = ["# HELP pyguard_requests_total HTTP requests by endpoint and status.", "# TYPE pyguard_requests_total counter"]
            out += [f'pyguard_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP pyguard_request_seconds Request latency.", "# TYPE pyguard_request_seconds histogram"]
            for e, h in self.latency.items():
                out += h.lines("pyguard_request_seconds", f'endpoint="{e}"') if h.count else []
            out += ["# HELP pyguard_tokens_total Prompt (of which cached) and generated tokens.", "# TYPE pyguard_tokens_total counter"]
            out += [f'pyguard_tokens_total{{kind="{k}"}} {n}' for k, n in self.tokens.items()]
            out += ["# HELP pyguard_batch_size Conversations per inference batch.", "# TYPE pyguard_batch_size histogram"]
            out += self.batches.lines("pyguard_batch_size")
            out += ["# HELP pyguard_queue_depth Conversations waiting for inference.", "# TYPE pyguard_queue_depth gauge",
                    f"pyguard_queue_depth {depth}"]
        return "\n".join(out) + "\n"


@dataclass
class Job:
    conversation: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def settle(self, value: Any) -> None:
        """Hand a Result or an ApiError to the waiting request, from the inference thread."""
        def done():
            if not self.future.done():  # cancelled if the client went away
                (self.future.set_exception if isinstance(value, ApiError) else self.future.set_result)(value)
        try:
            self.loop.call_soon_threadsafe(done)
        except RuntimeError:  # the loop has closed: nobody is waiting
            pass


class Batcher:
    """The bounded queue and the inference thread that owns the guard.

    max_positions bounds the key/value positions of one inference call (each conversation
    takes its prompt's tokens plus its longest answer, what Guard allocates for it): a batch
    taken from the queue is judged in as many calls as that needs, so memory does not grow
    with how many long conversations arrive together."""

    def __init__(self, guard: Guard, max_batch: int, max_queue: int, metrics: Metrics, max_positions: int = 8192):
        self.guard, self.max_batch, self.max_queue, self.metrics = guard, max_batch, max_queue, metrics
        self.max_positions = max_positions
        self._jobs: deque[tuple[str, dict, Job]] = deque()
        self._running: list[Job] = []  # the batch being judged (settled early if the shutdown cuts it)
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pyguard-inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def depth(self) -> int:
        return len(self._jobs)

    def submit(self, options: dict, conversations: list, loop: asyncio.AbstractEventLoop) -> list[asyncio.Future] | None:
        """Queue every conversation (all or none; None when the queue has no room for them).
        The lock is only ever held for queue operations, never during inference."""
        key = json.dumps(options)  # batches share options; the categories' order matters (it is the prompt's)
        with self._cv:
            if self._closed or len(self._jobs) + len(conversations) > self.max_queue:
                return None
            jobs = [Job(c, loop.create_future(), loop) for c in conversations]
            self._jobs.extend((key, options, j) for j in jobs)
            self._cv.notify()
        return [j.future for j in jobs]

    def withdraw(self, futures: list[asyncio.Future]) -> None:
        """Take the queued jobs of these futures off the queue (their client hung up): nobody
        would read their results. A job already being judged finishes and finds its future done."""
        gone = set(futures)
        with self._cv:
            self._jobs = deque(item for item in self._jobs if item[2].future not in gone)

    def close(self, wait: float | None = None) -> None:
        """No more jobs; the thread judges what is queued, then stops. wait: seconds to wait for
        it (None: until it stops)."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(wait)

    def cut(self) -> None:
        """Answer every queued and running job 503 now (the shutdown's deadline). The running
        batch goes on in the thread; its results then find their futures settled."""
        with self._cv:
            jobs = [item[2] for item in self._jobs] + self._running
            self._jobs.clear()
        for job in jobs:
            job.settle(shutting_down())

    def _take(self) -> tuple[dict, list[Job]] | None:
        """The oldest job and up to max_batch - 1 later ones with the same options (None: closed and drained)."""
        with self._cv:
            while not self._jobs and not self._closed:
                self._cv.wait()
            if not self._jobs:
                return None
            key, options, job = self._jobs.popleft()
            batch, rest = [job], deque()
            while self._jobs:
                item = self._jobs.popleft()
                if item[0] == key and len(batch) < self.max_batch:
                    batch.append(item[2])
                else:
                    rest.append(item)
            self._jobs = rest
            self._running = batch
            return options, batch

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            try:
                self._judge(*taken)
            except Exception as e:  # a bug: the requests get a 500, the thread goes on
                print(f"pyguard serve: internal error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                for job in taken[1]:
                    job.settle(ApiError(500, "internal error", code="internal_error"))
            with self._cv:
                self._running = []

    def _judge(self, options: dict, batch: list[Job]) -> None:
        """Judge a batch in calls of at most max_positions positions (a conversation alone if
        it needs more: Guard's max_tokens, set from the budget, keeps it within)."""
        calls: list[list[Job]] = []
        used = self.max_positions
        for job in batch:  # a conversation that cannot be judged fails alone, not its batch
            try:
                r = self.guard.prepare(job.conversation, options["categories"], options["exclude"])
            except PyguardError as e:
                job.settle(ApiError(400, str(e), code="invalid_input"))
                continue
            positions = len(r.ids) + r.budget
            if used + positions > self.max_positions:
                calls.append([])
                used = 0
            calls[-1].append(job)
            used += positions
        for jobs in calls:
            t0 = time.perf_counter()
            try:
                results = self.guard.classify_many([j.conversation for j in jobs], batch_size=len(jobs), **options)
            except PyguardError as e:  # a damaged model (non-finite logits): no verdict
                # classify_many names the conversation by its index in this call, which no client saw
                message = re.sub(r"^conversation \d+: ", "", str(e))
                for job in jobs:
                    job.settle(ApiError(500, message, code="no_verdict"))
                continue
            self.metrics.batch(results, time.perf_counter() - t0)
            for job, r in zip(jobs, results):
                job.settle(r)


def _json(body: bytes) -> Any:
    def constant(name: str):
        raise ValueError(f"{name} is not JSON")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=constant)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the request body is not JSON: {e}", code="invalid_json") from None


def _fields(body: Any, required: tuple[str, ...], allowed: tuple[str, ...]) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    unknown = [k for k in body if k not in allowed]
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r:.60} (fields: {', '.join(allowed)})", param=unknown[0][:60])
    for k in required:
        if k not in body:
            raise ApiError(400, f"missing field {k!r}", param=k)
    return body


def _inputs(value: Any) -> list[str]:
    """OpenAI's moderation input: a string, a list of strings, or of {"type": "text", "text": ...}.
    Errors name the input as users count: "input" for a string, "input 1" for a list's first."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ApiError(400, "input must be a string or a non-empty list of strings", param="input")
    out = []
    for i, x in enumerate(items):
        name = "input" if isinstance(value, str) else f"input {i + 1}"
        if isinstance(x, dict) and x.get("type") == "text" and set(x) == {"type", "text"}:
            x = x["text"]
        elif isinstance(x, dict) and x.get("type") == "image_url":
            raise ApiError(400, f"{name}: images are not supported (Llama Guard 3 judges text)", param="input")
        if not isinstance(x, str):
            raise ApiError(400, f"{name} must be a string, not {type(x).__name__}", param="input")
        if not x.strip():  # named here: judged as a conversation, it would be "the message"
            raise ApiError(400, f"{name} is empty (nothing but white space): there is nothing to judge", param="input",
                           code="invalid_input")
        out.append(x)
    return out


class Service:
    def __init__(self, guard: Guard, name: str, max_batch: int = 16, max_queue: int = 256, api_key: str | None = None,
                 max_body: int = 1 << 20, max_positions: int = 8192, read_timeout: float = 30.0,
                 shutdown_timeout: float = 30.0):
        self.guard, self.name, self.max_body = guard, name, max_body
        self.read_timeout, self.shutdown_timeout = read_timeout, shutdown_timeout
        self.key = None if api_key is None else f"Bearer {api_key}".encode()
        self.metrics = Metrics()
        self.batcher = Batcher(guard, max_batch, max_queue, self.metrics, max_positions)
        self.ready = ""  # the ready message, printed once serving
        self._cut_at = math.inf  # loop time at which the shutdown cuts what is left
        self._reads: set[asyncio.Timeout] = set()  # the deadlines of bodies being read

    def app(self):
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.routing import Route

        @asynccontextmanager
        async def lifespan(app):
            self.batcher.start()
            print(self.ready, file=sys.stderr, flush=True)
            yield
            # every request has been answered (or cut at the shutdown's deadline): the queue is
            # empty. A batch still running after a cut is not waited for long (a daemon thread).
            await asyncio.to_thread(self.batcher.close, 1.0)

        async def not_found(request, exc):
            return await self._respond(request, None, ApiError(exc.status_code, f"no route {request.method} {request.url.path}"))

        routes = [Route("/v1/moderations", self._wrap(self.moderations), methods=["POST"]),
                  Route("/v1/classify", self._wrap(self.classify), methods=["POST"]),
                  Route("/healthz", self._wrap(self.healthz, auth=False), methods=["GET"]),
                  Route("/metrics", self._wrap(self.prometheus), methods=["GET"])]
        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})

    def shutting_down(self) -> None:
        """SIGTERM/SIGINT (uvicorn has stopped accepting): bodies still arriving and queued
        requests get until shutdown_timeout, then what is left is answered 503 at once."""
        loop = asyncio.get_running_loop()
        self._cut_at = loop.time() + self.shutdown_timeout
        for t in self._reads:
            t.reschedule(min(t.when(), self._cut_at))
        loop.call_at(self._cut_at, self.batcher.cut)

    def _wrap(self, handler, auth: bool = True):
        async def endpoint(request):
            t0 = time.perf_counter()
            try:
                if auth and self.key is not None:
                    got = request.headers.get("authorization", "").encode("utf-8", "replace")
                    if not hmac.compare_digest(got, self.key):  # constant time: the key does not leak by timing
                        raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")
                response, tokens = await handler(request)
            except ApiError as e:
                response, tokens = e, 0
            except ClientGone:
                from starlette.responses import Response

                response, tokens = Response(status_code=CLIENT_GONE), 0  # sent to nobody: counted and logged
            except Exception as e:  # a bug: one line in the log, a 500 to the client, never a traceback
                print(f"pyguard serve: internal error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                response, tokens = ApiError(500, "internal error", code="internal_error"), 0
            return await self._respond(request, t0, response, tokens)
        return endpoint

    async def _respond(self, request, t0: float | None, response, tokens: int = 0):
        from starlette.responses import JSONResponse

        if isinstance(response, ApiError):
            response = JSONResponse(response.body(), response.status, response.headers)
        seconds = 0.0 if t0 is None else time.perf_counter() - t0
        path = request.url.path
        self.metrics.request(path if path in ENDPOINTS else "other", response.status_code, seconds)
        print(f"{request.method} {path[:200]} {response.status_code} {seconds * 1000:.1f}ms {tokens} tokens",
              file=sys.stderr, flush=True)
        return response

    async def _body(self, request) -> Any:
        """The JSON body, at most max_body bytes (413); a larger one is read to its end (up to
        16 times the limit) so the client gets the status instead of a reset connection. The
        whole body must arrive within read_timeout seconds (408, and the connection closes), or
        before the shutdown's deadline (503); a client hanging up raises ClientGone."""
        from starlette.requests import ClientDisconnect

        size, chunks = 0, []
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > 16 * self.max_body:
            raise ApiError(413, f"the request body is {length} bytes, over the limit of {self.max_body}", code="too_large")
        loop = asyncio.get_running_loop()
        deadline = asyncio.timeout_at(min(loop.time() + self.read_timeout, self._cut_at))
        self._reads.add(deadline)
        try:
            async with deadline:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size <= self.max_body:
                        chunks.append(chunk)
                    elif size > 16 * self.max_body:
                        break
        except TimeoutError:
            if loop.time() >= self._cut_at:
                raise shutting_down() from None
            raise ApiError(408, f"the request body did not arrive within {self.read_timeout:g} s", code="timeout",
                           headers={"Connection": "close"}) from None
        except ClientDisconnect:
            raise ClientGone from None
        finally:
            self._reads.discard(deadline)
        if size > self.max_body:
            raise ApiError(413, f"the request body is over the limit of {self.max_body} bytes", code="too_large")
        return _json(b"".join(chunks))

    async def _judge(self, request, options: dict, conversations: list, what: str) -> list[Result]:
        """The results of conversations (errors name the failing one as `what` and its index,
        counted from 1, when there are several)."""
        n, room = len(conversations), self.batcher.max_queue
        if n > room:
            raise ApiError(400, f"{n} conversations in one request, over the queue's {room}", param="input")
        futures = self.batcher.submit(options, conversations, asyncio.get_running_loop())
        if futures is None:
            wait = max(1, math.ceil(self.batcher.depth() * self.metrics.item_seconds))
            raise ApiError(429, f"the queue is full ({self.batcher.depth()} of {room} waiting): retry later",
                           code="queue_full", headers={"Retry-After": str(wait)})
        results = asyncio.gather(*futures, return_exceptions=True)
        gone = asyncio.ensure_future(_hung_up(request))
        try:
            await asyncio.wait((results, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not results.done():  # the client left first: its queued conversations are not judged (499)
            self.batcher.withdraw(futures)
            results.cancel()
            raise ClientGone
        for i, r in enumerate(results.result()):
            if isinstance(r, ApiError):
                if n > 1:
                    r.message = f"{what} {i + 1}: {r.message}"
                raise r
            if isinstance(r, BaseException):
                raise r
        return results.result()

    async def moderations(self, request):
        body = _fields(await self._body(request), ("input",), ("input", "model"))
        if body.get("model") is not None and not isinstance(body["model"], str):
            raise ApiError(400, "model must be a string", param="model")
        inputs = _inputs(body["input"])
        options = {"categories": None, "exclude": [], "threshold": None, "category_scores": True}
        results = await self._judge(request, options, inputs, "input")
        from starlette.responses import JSONResponse

        return JSONResponse({"id": f"modr-{uuid.uuid4().hex}", "model": self.name,
                             "results": [moderation(r) for r in results]}), _tokens(results)

    async def classify(self, request):
        body = _fields(await self._body(request), (), ("messages", "conversations", "categories", "exclude", "threshold",
                                                       "thresholds", "category_scores"))
        if ("messages" in body) == ("conversations" in body):
            raise ApiError(400, "give exactly one of messages (a conversation) and conversations (a list of them)")
        convs = [body["messages"]] if "messages" in body else body["conversations"]
        if not isinstance(convs, list) or not convs:
            raise ApiError(400, "conversations must be a non-empty list of conversations", param="conversations")
        options = {"categories": body.get("categories"), "exclude": body.get("exclude", []),
                   "threshold": body.get("threshold"), "thresholds": body.get("thresholds"),
                   "category_scores": body.get("category_scores", False)}
        try:  # the options, checked here (cheap) so that an error in them is the request's, with its field
            param = "categories"
            categories_of(options["categories"], (), self.guard.family)
            param = "exclude"
            policy = categories_of(options["categories"], options["exclude"], self.guard.family)
            param = "threshold"
            checks.threshold(options["threshold"])
            param = "thresholds"
            options["thresholds"] = check_thresholds(options["thresholds"], policy)
            param = "category_scores"
            checks.flag(options["category_scores"], "category_scores")
        except PyguardError as e:
            raise ApiError(400, str(e), param=param) from None
        results = await self._judge(request, options, convs, "conversation")
        from starlette.responses import JSONResponse

        out = [r.to_dict() for r in results]
        return JSONResponse(out[0] if "messages" in body else {"results": out}), _tokens(results)

    async def healthz(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", "model": self.name, "family": self.guard.family, "kernel": kernels.isa(),
                             "threads": self.guard.model.pool.threads, "queue_depth": self.batcher.depth(),
                             "max_queue": self.batcher.max_queue, "max_batch": self.batcher.max_batch}), 0

    async def prometheus(self, request):
        from starlette.responses import PlainTextResponse

        return PlainTextResponse(self.metrics.text(self.batcher.depth()), media_type="text/plain; version=0.0.4"), 0


def _protocol(service: Service) -> type:
    """uvicorn's h11 protocol with two changes: a request's headers must arrive within
    read_timeout seconds of the connection (or of the previous response), else the connection
    is closed (the body's deadline is Service._body's); and malformed HTTP framing (e.g.
    Content-Length: -1), which h11 rejects before any route sees it, gets the OpenAI-shaped
    JSON 400 instead of uvicorn's plain text, counted in /metrics as endpoint "other"."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _headers_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._headers_timer is not None:
                self._headers_timer.cancel()
            self._headers_timer = self.loop.call_later(service.read_timeout, self._headers_late)

        def _headers_late(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # no complete request yet
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection has the same time for its headers

        def connection_lost(self, exc) -> None:
            if self._headers_timer is not None:
                self._headers_timer.cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            error = ApiError(400, "malformed HTTP request (its request line, headers or framing)", code="bad_http")
            body = json.dumps(error.body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()
            service.metrics.request("other", 400, 0.0)
            print("- - 400 0.0ms 0 tokens (malformed HTTP)", file=sys.stderr, flush=True)

    return Protocol


def _server(service: Service, config):
    """A uvicorn server that tells the service when its shutdown starts."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            service.shutting_down()
            await super().shutdown(sockets)

    return Server(config)


async def _hung_up(request) -> None:
    """Returns when the client closes its connection. Its body has been read, so the next ASGI
    message is the disconnect (uvicorn reads nothing more of a connection while it answers)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _tokens(results: list[Result]) -> int:
    return sum(r.prompt_tokens + r.generated_tokens for r in results)


def _loopback(host: str) -> bool:
    """Does host name only loopback addresses? (A name is resolved: all its addresses must be.)"""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except (OSError, OverflowError) as e:
        raise PyguardError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    return sock


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None, max_batch: int = 16,
          max_queue: int = 256, api_key: str | None = None, insecure: bool = False, max_body: int = 1 << 20,
          cache_bytes: int | None = None, max_tokens_in_flight: int = 8192, read_timeout: float = 30.0,
          shutdown_timeout: float = 30.0, verify: bool = True) -> int:
    """Serve a pyguard file until SIGTERM/SIGINT, then finish what is queued (for up to
    shutdown_timeout seconds) and return 0. api_key None: PYGUARD_API_KEY if set; cache_bytes:
    the guard's token-prefix cache (None: Guard's default); max_tokens_in_flight: the
    tokens (key/value positions: prompt and answer) judged at once, which bounds the memory
    of inference; also the most one conversation may take (below 8192);
    read_timeout: seconds for a request's headers, and again for its body; verify: check every
    checksum of the file before serving."""
    for name, value, low, high in (("port", port, 0, 65535), ("max_batch", max_batch, 1, 1 << 16),
                                   ("max_queue", max_queue, 1, 1 << 20), ("max_body", max_body, 1, 1 << 30),
                                   ("max_tokens_in_flight", max_tokens_in_flight, 1, 1 << 24)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise PyguardError(f"{name} must be an integer from {low} to {high}, not {value!r:.60}")
    for name, value in (("read_timeout", read_timeout), ("shutdown_timeout", shutdown_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
            raise PyguardError(f"{name} must be a number of seconds above 0, at most 86400, not {value!r:.60}")
    api_key = os.environ.get("PYGUARD_API_KEY") if api_key is None else api_key
    if api_key is not None and (not api_key or not api_key.isprintable() or not api_key.isascii()):
        raise PyguardError("the API key must be printable ASCII text, not empty")
    if api_key is not None and api_key != api_key.strip():
        # HTTP strips a header value's outer white space: such a key could never authenticate
        raise PyguardError("the API key must not start or end with white space (HTTP strips it from the header)")
    if api_key is None and not insecure and not _loopback(host):
        raise PyguardError(f"--host {host} is reachable from other machines: set an API key (--api-key or "
                           "PYGUARD_API_KEY), or pass --insecure to serve without one")
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise PyguardError("pyguard serve needs the serve extra: pip install 'pyguard-lg3[serve]'") from None
    try:
        guard = Guard.load(model, threads=threads, verify=verify, cache_bytes=cache_bytes,
                           max_tokens=min(GUARD_MAX_TOKENS, max_tokens_in_flight))
    except PyguardError as e:
        if "too small for any prompt" in str(e):
            raise PyguardError(f"max_tokens_in_flight {max_tokens_in_flight} is too small: {e}") from None
        raise
    sock = _listen(host, port)
    service = Service(guard, os.path.basename(model), max_batch, max_queue, api_key, max_body, max_tokens_in_flight,
                      read_timeout, shutdown_timeout)
    addr = sock.getsockname()
    where = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    service.ready = (f"pyguard serve: {os.path.basename(model)} ({kernels.isa()}, {guard.model.pool.threads} threads) "
                     f"on http://{where}:{addr[1]} (max batch {max_batch}, max queue {max_queue}"
                     f"{', API key required' if api_key else ''})")
    # uvicorn's own deadline is a backstop only: the service answers what is left at
    # shutdown_timeout (Service.shutting_down); log_level error: the service logs its own lines
    config = uvicorn.Config(service.app(), log_level="error", access_log=False, lifespan="on", http=_protocol(service),
                            timeout_graceful_shutdown=shutdown_timeout + 2)
    server = _server(service, config)
    # uvicorn drains the requests on SIGTERM/SIGINT, then raises the signal again for the
    # handler it found: make that one a no-op, so a graceful shutdown ends with exit status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    print("pyguard serve: stopped", file=sys.stderr, flush=True)
    return 0
