"""HTTP front of the combined critic + reward-model server (Flask app under waitress).

The PPO actor job calls this server over HTTP with safetensors bodies (see protocol.py).
The model side plugs in through :class:`CriticHandler`; this module is only plumbing:

* auth: optional bearer token (``hmac.compare_digest``), required on every route but /health;
  binding beyond loopback without one is refused unless ``allow_unauthenticated``;
* size: ``max_request_bytes`` enforced on Content-Length and on the bytes actually read (413);
  ``max_sequence_length`` (422) and ``max_tokens_per_request`` (413) bound the work a request
  asks for, checked from its shapes before the model is waited for;
* the handler's own static checks (``check_request``: vocabulary, mode) also run before the
  model gate, so a request that cannot succeed never queues behind a long one;
* one model, one lock: infer/train/save run one at a time, in arrival (FIFO) order, because
  the model is shared and follower ranks must see commands in the same order. At most
  ``queue_limit`` requests wait; the next one gets 503 + ``Retry-After`` (back-pressure);
* /health, /ready and /v1/metrics never wait for the model: at most ``queue_limit + 1`` requests
  to the model routes (and never more than ``threads - 1``) are admitted at a time (running,
  queued, reading, or waiting for a duplicate's result); the rest get 503 + ``Retry-After`` at
  once, so a thread is always free for them;
* idempotency: train and save require an ``Idempotency-Key`` header (idempotency.py);
* errors are JSON ``{"error": ..., "status": N}`` on every path, never HTML; a failing handler
  gives 500 and the server keeps serving.

Routes (API v1): ``POST /v1/infer``, ``POST /v1/train``, ``POST /v1/save``, ``GET /health``
(process is up), ``GET /ready`` (handler loaded), ``GET /v1/metrics`` (JSON counters).

Every admitted model request holds one waitress thread; with ``threads <= queue_limit + 1``
fewer requests are admitted than ``queue_limit`` allows (a warning says so).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
from collections import Counter, defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import flask
import torch
import waitress
from waitress.channel import HTTPChannel
from werkzeug.exceptions import HTTPException

from aligner.serving.idempotency import IdempotencyCache, KeyConflict, RecordedResponse
from aligner.serving.protocol import (
    API_VERSION,
    CONTENT_TYPE,
    IDEMPOTENCY_HEADER,
    INFER_REQUEST,
    INFER_RESPONSE,
    REPLAY_HEADER,
    RESTORE_REQUEST,
    SAVE_REQUEST,
    TRAIN_REQUEST,
    ProtocolError,
    SizeLimits,
    decode_tensors,
    encode_tensors,
    metrics_from_results,
    parse_restore_request,
    parse_save_request,
    parse_train_request,
    results_to_metadata,
    validate,
)

logger = logging.getLogger(__name__)

_IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,200}")  # printable ASCII, no spaces
_EXTENSION = "aligner.serving"
_READ_CHUNK = 1 << 20


class CriticHandler(Protocol):
    """What the model side implements. Calls arrive one at a time (never concurrently).

    infer:  {"tokens": int64 [B, S], "lengths": int64 [B]}
            -> {"values": float [B, S], optional "rewards": float [B]} (sent as float32)
    train:  {"tokens", "lengths", "returns" [B, S], "prev_values" [B, S], "mask" [B, S]}
            (+ ``step=N`` keyword when the request is sequenced) -> metrics {name: float}
    save:   (step) -> JSON-able dict, e.g. {"path": ..., "step": ...}; the handler chooses
            where (its own checkpoint directory), never the client
    restore: (step) -> JSON-able dict; optional: rewind the state to the handler's own
            checkpoint of that step (the route answers 501 without it)

    Optional ``check_request(route, tensors)`` (route "infer" or "train") is called before the
    request waits for the model, and may run concurrently with a call: static checks only
    (vocabulary, mode), nothing that reads state a call changes.

    A handler refuses a request the client got wrong (or that conflicts with its state) by
    raising ProtocolError with a 4xx status; anything else it raises is answered 500.
    """

    def infer(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def train(self, tensors: dict[str, torch.Tensor], step: int | None = None) -> dict[str, float]: ...

    def save(self, step: int) -> dict: ...

    def is_ready(self) -> bool: ...

    def metrics(self) -> dict: ...


class _HttpError(Exception):
    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def _error_record(
    status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
) -> RecordedResponse:
    body = json.dumps({"error": message, "status": status}).encode()
    return RecordedResponse(status, body, "application/json", headers)


class _Busy(Exception):
    pass


class _ModelGate:
    """FIFO mutual exclusion with a bounded number of waiters.

    A plain Lock would let a retried request overtake older ones; tickets keep arrival order,
    which is the order commands are broadcast to follower ranks.
    """

    def __init__(self, queue_limit: int):
        if queue_limit < 0:
            raise ValueError(f"queue_limit must be >= 0, got {queue_limit}")
        self.queue_limit = queue_limit
        self._cond = threading.Condition()
        self._busy = False
        self._waiting: deque[object] = deque()

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._cond:
            if self._busy or self._waiting:
                if len(self._waiting) >= self.queue_limit:
                    raise _Busy()
                ticket = object()
                self._waiting.append(ticket)
                while self._busy or self._waiting[0] is not ticket:
                    self._cond.wait()
                self._waiting.popleft()
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"waiting": len(self._waiting), "busy": self._busy, "limit": self.queue_limit}


class _RequestStats:
    """Request counts by route and status, and latencies by route."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: defaultdict[str, Counter] = defaultdict(Counter)
        self._latency: dict[str, dict[str, float]] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._counts[route][str(status)] += 1
            lat = self._latency.setdefault(route, {"count": 0, "total_s": 0.0, "max_s": 0.0})
            lat["count"] += 1
            lat["total_s"] += seconds
            lat["max_s"] = max(lat["max_s"], seconds)
            lat["last_s"] = seconds

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            latency = {
                route: {**lat, "mean_s": lat["total_s"] / lat["count"]}
                for route, lat in self._latency.items()
            }
            return {
                "requests": {route: dict(c) for route, c in self._counts.items()},
                "latency": latency,
            }


class _Admission:
    """A non-blocking counting semaphore: at most ``limit`` model requests inside at once."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self.inside = 0

    @contextmanager
    def enter(self) -> Iterator[None]:
        with self._lock:
            if self.inside >= self.limit:
                raise _Busy()
            self.inside += 1
        try:
            yield
        finally:
            with self._lock:
                self.inside -= 1


@dataclass(frozen=True)
class ServerSettings:
    token: str | None
    max_request_bytes: int
    queue_limit: int
    retry_after_s: int
    idempotency_cache_size: int
    inflight_wait_s: float
    limits: SizeLimits = SizeLimits()
    allow_unauthenticated: bool = False


class _CriticService:
    """The endpoints' logic, independent of Flask: bytes in, RecordedResponse out."""

    def __init__(self, handler: CriticHandler, settings: ServerSettings):
        self.handler = handler
        self.settings = settings
        self.gate = _ModelGate(settings.queue_limit)
        # running + queued: every thread beyond these stays free for /health, /ready, metrics
        self.admission = _Admission(settings.queue_limit + 1)
        self.cache = IdempotencyCache(settings.idempotency_cache_size)
        self.stats = _RequestStats()
        self.started = time.time()

    # -- shared steps ------------------------------------------------------------------------

    def retry_after(self) -> tuple[tuple[str, str], ...]:
        return (("Retry-After", str(self.settings.retry_after_s)),)

    def require_ready(self) -> None:
        if not self.handler_ready():
            raise _HttpError(503, "critic model is still loading; poll GET /ready", self.retry_after())

    def handler_ready(self) -> bool:
        try:
            return bool(self.handler.is_ready())
        except Exception:
            logger.exception("handler.is_ready() raised; reporting not ready")
            return False

    def busy_error(self) -> _HttpError:
        return _HttpError(
            503,
            f"critic server busy: {self.settings.queue_limit} request(s) already queued "
            "(server option queue_limit); retry later",
            self.retry_after(),
        )

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        try:
            with self.gate.slot():
                yield
        except _Busy:
            raise self.busy_error() from None

    @contextmanager
    def admitted(self) -> Iterator[None]:
        try:
            with self.admission.enter():
                yield
        except _Busy:
            raise self.busy_error() from None

    def precheck(self, route: str, tensors: dict[str, torch.Tensor]) -> None:
        """The handler's static checks, before the request waits for the model."""
        check = getattr(self.handler, "check_request", None)
        if check is not None:
            self.call_handler("check_request", check, route, tensors)

    def call_handler(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except ProtocolError:  # the handler's own refusal of this request: its 4xx status stands
            raise
        except Exception as exc:
            logger.exception("handler.%s failed", name)
            raise _HttpError(500, f"handler.{name} raised {type(exc).__name__}: {exc}") from None

    def decode(self, body: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return decode_tensors(body, self.settings.max_request_bytes)

    # -- endpoints ---------------------------------------------------------------------------

    def infer(self, body: bytes) -> RecordedResponse:
        tensors, _ = self.decode(body)
        dims = validate(tensors, INFER_REQUEST, self.settings.limits)
        self.precheck("infer", tensors)
        with self.exclusive():
            out = self.call_handler("infer", self.handler.infer, tensors)
        out = _check_infer_output(out, dims)
        return RecordedResponse(200, encode_tensors(out), CONTENT_TYPE)

    def train(self, body: bytes) -> RecordedResponse:
        tensors, metadata = self.decode(body)
        validate(tensors, TRAIN_REQUEST, self.settings.limits)
        step = parse_train_request(metadata)
        self.precheck("train", tensors)
        train = self.handler.train if step is None else functools.partial(self.handler.train, step=step)
        with self.exclusive():
            results = self.call_handler("train", train, tensors)
        try:
            metrics = metrics_from_results(dict(results))
        except (ProtocolError, TypeError, ValueError) as exc:
            raise _HttpError(500, f"handler.train must return {{name: float}}: {exc}") from None
        return RecordedResponse(200, encode_tensors({}, results_to_metadata(metrics)), CONTENT_TYPE)

    def save(self, body: bytes) -> RecordedResponse:
        tensors, metadata = self.decode(body)
        validate(tensors, SAVE_REQUEST)
        step = parse_save_request(metadata)
        with self.exclusive():
            result = self.call_handler("save", self.handler.save, step)
        try:
            meta = results_to_metadata(dict(result or {}))
        except (TypeError, ValueError) as exc:
            raise _HttpError(500, f"handler.save must return a dict of JSON values: {exc}") from None
        return RecordedResponse(200, encode_tensors({}, meta), CONTENT_TYPE)

    def restore(self, body: bytes) -> RecordedResponse:
        """Rewind to the handler's own checkpoint of a step. The recorded train/save responses
        answered for states after it, so they are forgotten: a re-sent key must run again (the
        handler's state knows which updates it holds)."""
        restore = getattr(self.handler, "restore", None)
        if restore is None:
            raise _HttpError(501, f"this server's handler cannot restore checkpoints (/{API_VERSION}/restore)")
        tensors, metadata = self.decode(body)
        validate(tensors, RESTORE_REQUEST)
        step = parse_restore_request(metadata)
        with self.exclusive():
            result = self.call_handler("restore", restore, step)
            dropped = self.cache.forget_finished()
        logger.info("restored the checkpoint of step %d; forgot %d recorded response(s)", step, dropped)
        try:
            meta = results_to_metadata(dict(result or {}))
        except (TypeError, ValueError) as exc:
            raise _HttpError(500, f"handler.restore must return a dict of JSON values: {exc}") from None
        return RecordedResponse(200, encode_tensors({}, meta), CONTENT_TYPE)

    def idempotent(
        self, scope: str, key: str, body: bytes, run: Callable[[bytes], RecordedResponse]
    ) -> tuple[RecordedResponse, bool]:
        """(response, replayed). Runs ``run`` at most once per key (see idempotency.py)."""
        body_hash = hashlib.sha256(body).hexdigest()
        try:
            decision = self.cache.begin(scope, key, body_hash)
        except KeyConflict as exc:
            raise _HttpError(409, str(exc)) from None
        if decision.kind == "replay":
            return decision.response, True
        if decision.kind == "wait":
            response = decision.entry.wait(self.settings.inflight_wait_s)
            if response is None:
                raise _HttpError(
                    503,
                    f"the first request with {IDEMPOTENCY_HEADER} {key!r} is still running; "
                    "retry to get its result",
                    self.retry_after(),
                )
            return response, 200 <= response.status < 300
        response = _error_record(500, "internal error while handling the request")
        try:
            response = _as_record(run, body)
        finally:  # waiters must be released even if run() raised something unexpected
            self.cache.finish(decision.entry, response)
        return response, False

    def metrics(self) -> dict[str, Any]:
        try:
            handler_metrics = self.handler.metrics()
        except Exception as exc:
            handler_metrics = {"error": f"handler.metrics raised {type(exc).__name__}: {exc}"}
        return {
            "api_version": API_VERSION,
            "uptime_s": time.time() - self.started,
            "ready": self.handler_ready(),
            **self.stats.snapshot(),
            "queue": {**self.gate.stats(), "admitted": self.admission.inside},
            "limits": {"max_request_bytes": self.settings.max_request_bytes,
                       "max_sequence_length": self.settings.limits.max_sequence_length,
                       "max_tokens_per_request": self.settings.limits.max_tokens_per_request},
            "idempotency": self.cache.stats(),
            "handler": handler_metrics,
        }


def _as_record(run: Callable[[bytes], RecordedResponse], body: bytes) -> RecordedResponse:
    try:
        return run(body)
    except _HttpError as exc:
        return _error_record(exc.status, exc.message, exc.headers)
    except ProtocolError as exc:
        return _error_record(exc.status, exc.message)


def _check_infer_output(out: Any, request_dims: dict[str, int]) -> dict[str, torch.Tensor]:
    """Values/rewards as float32 CPU tensors of the request's [B, S]; 500 otherwise."""
    if not isinstance(out, dict):
        raise _HttpError(500, f"handler.infer must return a dict of tensors, got {type(out).__name__}")
    cast = {}
    for name, tensor in out.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            tensor = tensor.detach().to("cpu", torch.float32)
        cast[name] = tensor
    try:
        dims = validate(cast, INFER_RESPONSE)
    except ProtocolError as exc:
        raise _HttpError(500, f"handler.infer returned invalid output: {exc.message}") from None
    for dim in ("B", "S"):
        if dim in dims and dims[dim] != request_dims[dim]:
            raise _HttpError(
                500,
                f"handler.infer returned {dim}={dims[dim]} but the request had "
                f"{dim}={request_dims[dim]}",
            )
    return cast


# --------------------------------------------------------------------------------------------
# Flask wiring
# --------------------------------------------------------------------------------------------


def create_app(
    handler: CriticHandler,
    *,
    token: str | None = None,
    max_request_bytes: int = 256 * 1024 * 1024,
    queue_limit: int = 4,
    retry_after_s: int = 1,
    idempotency_cache_size: int = 1024,
    inflight_wait_s: float = 30.0,
    max_sequence_length: int | None = None,
    max_tokens_per_request: int | None = None,
    allow_unauthenticated: bool = False,
) -> flask.Flask:
    """Build the WSGI app around ``handler``. Serve it with :func:`serve` (or make_server).

    inflight_wait_s bounds how long a duplicate of an executing train/save waits for the
    first one before answering 503 (so abandoned retries cannot pin every server thread).
    max_sequence_length / max_tokens_per_request: see protocol.SizeLimits (None: unbounded).
    allow_unauthenticated: let make_server bind beyond loopback without a token.
    """
    if token is not None and not token:
        raise ValueError("token must be None (no auth) or a non-empty string")
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    settings = ServerSettings(
        token=token,
        max_request_bytes=max_request_bytes,
        queue_limit=queue_limit,
        retry_after_s=retry_after_s,
        idempotency_cache_size=idempotency_cache_size,
        inflight_wait_s=inflight_wait_s,
        limits=SizeLimits(max_sequence_length, max_tokens_per_request),
        allow_unauthenticated=bool(allow_unauthenticated),
    )
    service = _CriticService(handler, settings)
    app = flask.Flask("aligner.serving")
    app.extensions[_EXTENSION] = service

    @app.before_request
    def _start_and_authenticate():
        flask.g.started = time.perf_counter()
        if settings.token is not None and flask.request.path != "/health":
            _authenticate(settings.token)

    @app.after_request
    def _observe(response: flask.Response) -> flask.Response:
        rule = flask.request.url_rule.rule if flask.request.url_rule else "<unmatched>"
        elapsed = time.perf_counter() - flask.g.get("started", time.perf_counter())
        service.stats.observe(f"{flask.request.method} {rule}", response.status_code, elapsed)
        return response

    @app.errorhandler(_HttpError)
    def _http_error(exc: _HttpError):
        return _flask_response(_error_record(exc.status, exc.message, exc.headers))

    @app.errorhandler(ProtocolError)
    def _protocol_error(exc: ProtocolError):
        return _flask_response(_error_record(exc.status, exc.message))

    @app.errorhandler(HTTPException)
    def _werkzeug_error(exc: HTTPException):
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 404:
            message = f"no route {flask.request.path}; API {API_VERSION} routes: " + ", ".join(
                sorted(str(r) for r in app.url_map.iter_rules() if r.endpoint != "static")
            )
        elif status == 405:
            message = f"{flask.request.method} is not allowed on {flask.request.path}"
        headers = tuple((k, v) for k, v in exc.get_headers() if k.lower() == "allow")
        return _flask_response(_error_record(status, message, headers))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        logger.exception("unexpected error on %s %s", flask.request.method, flask.request.path)
        return _flask_response(_error_record(500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.get("/health")
    def health():
        return flask.jsonify({"status": "ok", "api_version": API_VERSION})

    @app.get("/ready")
    def ready():
        if service.handler_ready():
            return flask.jsonify({"ready": True})
        return _flask_response(
            _error_record(503, "critic model is still loading", service.retry_after())
        )

    @app.get(f"/{API_VERSION}/metrics")
    def metrics():
        body = json.dumps(service.metrics(), default=str)
        return flask.Response(body, status=200, mimetype="application/json")

    @app.post(f"/{API_VERSION}/infer")
    def infer():
        return _plain_route(service, service.infer)

    @app.post(f"/{API_VERSION}/train")
    def train():
        return _idempotent_route(service, "train", service.train)

    @app.post(f"/{API_VERSION}/save")
    def save():
        return _idempotent_route(service, "save", service.save)

    @app.post(f"/{API_VERSION}/restore")
    def restore():
        return _plain_route(service, service.restore)

    return app


def _plain_route(service: _CriticService, run: Callable[[bytes], RecordedResponse]) -> flask.Response:
    """A model route without idempotency keys (infer; restore, which is idempotent by itself)."""
    with service.admitted():
        service.require_ready()
        body = _read_body(service.settings.max_request_bytes)
        return _flask_response(_as_record(run, body))


def _idempotent_route(
    service: _CriticService, scope: str, run: Callable[[bytes], RecordedResponse]
) -> flask.Response:
    key = flask.request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        raise _HttpError(
            400,
            f"POST /{API_VERSION}/{scope} requires an {IDEMPOTENCY_HEADER} header (unique per "
            "logical request, reused on retries)",
        )
    if not _IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise _HttpError(
            400, f"{IDEMPOTENCY_HEADER} must be 1-200 printable ASCII characters without spaces"
        )
    with service.admitted():
        service.require_ready()
        body = _read_body(service.settings.max_request_bytes)
        response, replayed = service.idempotent(scope, key, body, run)
    return _flask_response(response, replayed=replayed)


def _authenticate(token: str) -> None:
    header = flask.request.headers.get("Authorization")
    if not header:
        raise _HttpError(
            401,
            "missing Authorization header: send 'Authorization: Bearer <token>' "
            "(CriticClient(token=...))",
            (("WWW-Authenticate", "Bearer"),),
        )
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        value.strip().encode("utf-8"), token.encode("utf-8")
    ):
        raise _HttpError(403, "invalid bearer token")


def _read_body(max_bytes: int) -> bytes:
    """Read the body, refusing more than max_bytes whether or not Content-Length was sent."""
    declared = flask.request.content_length
    if declared is not None and declared > max_bytes:
        raise _HttpError(
            413, f"body is {declared} bytes; the limit is {max_bytes} bytes (max_request_bytes)"
        )
    stream = flask.request.stream
    chunks, total = [], 0
    while True:
        chunk = stream.read(min(_READ_CHUNK, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise _HttpError(
                413, f"body exceeds the limit of {max_bytes} bytes (max_request_bytes)"
            )
    return b"".join(chunks)


def _flask_response(record: RecordedResponse, replayed: bool = False) -> flask.Response:
    response = flask.Response(record.body, status=record.status, content_type=record.content_type)
    for name, value in record.headers:
        response.headers[name] = value
    if replayed:
        response.headers[REPLAY_HEADER] = "true"
    return response


# --------------------------------------------------------------------------------------------
# Running under waitress
# --------------------------------------------------------------------------------------------


class InsecureBindError(ValueError):
    """Binding beyond loopback without a token (and without allow_unauthenticated)."""


def check_bind(host: str, token: str | None, allow_unauthenticated: bool) -> None:
    """Refuse a server that anyone on the network could train, unless explicitly allowed."""
    if token is None and not _is_loopback(host):
        if not allow_unauthenticated:
            raise InsecureBindError(
                f"refusing to serve on {host!r} without a token: anyone who can reach this address "
                "could train the critic and make it write checkpoints. Set a token (and give the "
                "same one to CriticClient), bind 127.0.0.1, or pass allow_unauthenticated=True"
            )
        logger.warning("critic server binds %s without a token (allow_unauthenticated): anyone who can "
                       "reach this address can train and overwrite the critic", host)


def make_server(app: flask.Flask, host: str = "127.0.0.1", port: int = 5555, threads: int = 8):
    """Bind a waitress server (not yet running). ``port=0`` picks a free port; read it back
    from ``server.effective_port``. Call ``.run()`` to serve (blocks).

    Raises InsecureBindError (see check_bind). With ``threads <= queue_limit + 1`` fewer model
    requests are admitted at once (threads - 1), so one thread always stays free for /health
    and /ready."""
    service: _CriticService | None = app.extensions.get(_EXTENSION)
    if service is not None:
        check_bind(host, service.settings.token, service.settings.allow_unauthenticated)
        if threads < 2:
            raise ValueError(f"threads={threads}: the critic server needs at least 2 (one stays free for "
                             "/health and /ready)")
        if threads < service.settings.queue_limit + 2:
            logger.warning(
                "threads=%d <= queue_limit+1=%d: admitting at most %d model requests at a time so "
                "that /health and /ready keep a thread; raise threads to use queue_limit fully",
                threads, service.settings.queue_limit + 1, threads - 1,
            )
            service.admission.limit = threads - 1
        # waitress buffers a whole body before the app sees it: cap that just above our own limit
        # (bodies in between get our JSON 413; beyond it waitress answers 413 itself)
        body_limit = service.settings.max_request_bytes + (1 << 16)
    else:
        body_limit = 1 << 30
    return waitress.create_server(
        app, host=host, port=port, threads=threads, max_request_body_size=body_limit
    )


def serve(
    app: flask.Flask,
    host: str = "127.0.0.1",
    port: int = 5555,
    threads: int = 8,
    ready_file: str | None = None,
) -> None:
    """Serve ``app`` with waitress until interrupted (production entry point).

    ready_file: written once the port is bound (useful with port=0); SLURM scripts read it
    with read_ready_file / ``IFS=: read HOST PORT`` and then poll GET /ready.
    """
    server = make_server(app, host=host, port=port, threads=threads)
    bound_port = int(server.effective_port)
    logger.info("critic server listening on http://%s:%d", server.effective_host, bound_port)
    if ready_file is not None:
        write_ready_file(ready_file, host, bound_port)
    server.run()


class BackgroundServer:
    """A waitress server on a daemon thread: tests, notebooks, single-process setups.

    ``stop()`` closes the listening socket and every open connection immediately, like a
    killed process: in-flight clients see a reset and retry. The app (and its idempotency
    cache) can be served again by a new BackgroundServer on the same port.
    """

    def __init__(self, app: flask.Flask, host: str = "127.0.0.1", port: int = 0, threads: int = 8):
        self.server = make_server(app, host=host, port=port, threads=threads)
        self.host = str(self.server.effective_host)
        self.port = int(self.server.effective_port)
        self._thread = threading.Thread(
            target=self.server.run, name=f"critic-http-{self.port}", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "BackgroundServer":
        self._thread.start()
        return self

    def stop(self, wait_s: float = 5.0) -> None:
        """Drop every connection, stop the loop, give running handlers wait_s to return."""
        server = self.server

        def close_everything():  # runs on the server's own loop thread (no fd races)
            for dispatcher in list(server._map.values()):
                if isinstance(dispatcher, HTTPChannel):
                    dispatcher.handle_close()
                else:
                    dispatcher.close()

        if self._thread.is_alive():
            try:
                server.trigger.pull_trigger(close_everything)
            except OSError:  # the loop already closed its trigger (shutting down): nothing to wake
                pass
            self._thread.join(timeout=max(wait_s, 1.0))
        else:
            close_everything()
        server.task_dispatcher.shutdown(timeout=wait_s)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def write_ready_file(path: str, host: str, port: int) -> None:
    """Atomically write ``host:port`` so launch scripts know where the server listens.

    A wildcard bind (0.0.0.0, ::) is replaced by this machine's hostname, which is what the
    actor job must put in remote_critic_rm.critic.ip.
    """
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{host}:{port}\n")
    os.replace(tmp, path)


def read_ready_file(path: str) -> tuple[str, int]:
    """(host, port) from a file written by write_ready_file."""
    with open(path) as f:
        text = f.read().strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{path}: expected 'host:port', got {text!r}")
    return host, int(port)
