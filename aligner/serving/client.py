"""Client of the critic + reward-model server, used by the PPO actor.

Retry policy: only failures that say nothing about the request itself are retried —
connection errors, timeouts, and 502/503/504 (honouring ``Retry-After``) — with exponential
backoff and jitter, all within ``total_timeout_s`` per logical call. A train or save call sends
the same ``Idempotency-Key`` on every retry, so the server applies it at most once even when a
response was lost. 4xx answers mean the request is wrong and are raised at once
(:class:`CriticRequestError`); other 5xx answers are raised at once too
(:class:`CriticServerError`). When the budget runs out, :class:`CriticUnavailableError` says
which URL was tried, how often, for how long, the last error, and which config keys to check.

Each ``*_async`` method serialises the tensors in the calling thread (so the caller may reuse
its buffers at once) and sends them from a small thread pool, so the actor can fire one infer
per micro-batch and keep computing log-probs meanwhile.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Mapping

import requests
import torch

from aligner.serving.protocol import (
    API_VERSION,
    CONTENT_TYPE,
    IDEMPOTENCY_HEADER,
    INFER_REQUEST,
    INFER_RESPONSE,
    TRAIN_REQUEST,
    ProtocolError,
    decode_tensors,
    encode_tensors,
    metrics_from_results,
    results_from_metadata,
    restore_request_metadata,
    save_request_metadata,
    train_request_metadata,
    validate,
)

RETRY_STATUSES = frozenset({502, 503, 504})
# Responses are trusted more than requests, but a bound still stops a confused peer from
# exhausting memory.
_MAX_RESPONSE_BYTES = 1 << 34
# Below this much remaining budget another attempt cannot succeed, so stop and report.
_MIN_ATTEMPT_S = 0.05
_CONFIG_HINT = (
    "is the critic server running and reachable from this node? Check "
    "remote_critic_rm.critic.ip and remote_critic_rm.critic.port (and the server's ready file "
    "/ log), then try GET {base}/health"
)


class CriticClientError(RuntimeError):
    """Base class of everything CriticClient raises."""


class CriticRequestError(CriticClientError):
    """The server rejected the request (4xx) or it failed local validation; not retried."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(f"{url} answered {status}: {message}")
        self.url = url
        self.status = status
        self.message = message


class CriticServerError(CriticClientError):
    """The server failed (500, or a response that breaks the protocol); not retried."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(f"{url} failed with {status}: {message}")
        self.url = url
        self.status = status
        self.message = message


class CriticUnavailableError(CriticClientError):
    """No usable answer within total_timeout_s despite retries."""

    def __init__(self, url: str, attempts: int, elapsed_s: float, last_error: str, hint: str):
        super().__init__(
            f"critic server at {url} gave no usable answer after {attempts} attempt(s) over "
            f"{elapsed_s:.1f} s; last error: {last_error}. Hint: {hint}"
        )
        self.url = url
        self.attempts = attempts
        self.elapsed_s = elapsed_s
        self.last_error = last_error


class CriticClient:
    """Talks to one critic server at http://host:port (API v1). Thread-safe."""

    def __init__(
        self,
        host: str,
        port: int,
        token: str | None = None,
        request_timeout_s: float = 60,
        total_timeout_s: float = 600,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 10,
        max_in_flight: int = 4,
    ):
        if request_timeout_s <= 0 or total_timeout_s < 0:
            raise ValueError("request_timeout_s must be > 0 and total_timeout_s >= 0")
        if backoff_initial_s <= 0 or backoff_max_s < backoff_initial_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")
        self.host = host
        self.port = int(port)
        self.base_url = f"http://{host}:{self.port}"
        self.request_timeout_s = request_timeout_s
        self.total_timeout_s = total_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._local = threading.local()  # one requests.Session per thread
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="critic-client")
        self._random = random.Random()

    # -- public API --------------------------------------------------------------------------

    def infer(self, tokens: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Values [B, S] (and rewards [B] if the server computes them) for right-padded
        tokens [B, S] with real lengths [B]."""
        return self._infer_call(*self._infer_request(tokens, lengths))

    def infer_async(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Future:
        """Like infer, but returns a Future at once; the tensors may be reused immediately."""
        return self._pool.submit(self._infer_call, *self._infer_request(tokens, lengths))

    def train(self, tensors: Mapping[str, torch.Tensor], idempotency_key: str,
              step: int | None = None) -> dict[str, float]:
        """One critic update on {tokens, lengths, returns, prev_values, mask}; returns the
        server's metrics. Use a key that names the logical update (e.g. "step12-mb3") so a
        restarted actor does not train twice either. With ``step`` the update is sequenced:
        the server answers 409 unless its state has applied exactly the steps before it."""
        return self._train_call(*self._train_request(tensors, idempotency_key, step))

    def train_async(self, tensors: Mapping[str, torch.Tensor], idempotency_key: str,
                    step: int | None = None) -> Future:
        """Like train, but returns a Future at once; the tensors may be reused immediately."""
        return self._pool.submit(self._train_call, *self._train_request(tensors, idempotency_key, step))

    def save(self, step: int, idempotency_key: str | None = None) -> dict:
        """Ask the server to checkpoint the critic (always in its own checkpoint directory);
        returns the server's description of it, e.g. {"path": ..., "step": ...}."""
        route = f"/{API_VERSION}/save"
        key = idempotency_key or f"save-{step}-{uuid.uuid4().hex}"
        body = encode_tensors({}, save_request_metadata(step))
        response = self._request("POST", route, body, {IDEMPOTENCY_HEADER: key})
        _, metadata = self._decode(route, response)
        try:
            return results_from_metadata(metadata)
        except ProtocolError as exc:
            raise CriticServerError(self.base_url + route, response.status_code, exc.message) from None

    def restore(self, step: int) -> dict:
        """Rewind the server's state to its own checkpoint of ``step`` (weights, optimizer, the
        updates it holds); returns the server's description of it."""
        route = f"/{API_VERSION}/restore"
        response = self._request("POST", route, encode_tensors({}, restore_request_metadata(step)))
        _, metadata = self._decode(route, response)
        try:
            return results_from_metadata(metadata)
        except ProtocolError as exc:
            raise CriticServerError(self.base_url + route, response.status_code, exc.message) from None

    def wait_until_ready(self, timeout_s: float) -> None:
        """Block until GET /ready answers 200 (model loaded); CriticUnavailableError after
        timeout_s."""
        self._request("GET", "/ready", total_timeout_s=timeout_s)

    def health(self) -> dict[str, Any]:
        """GET /health, one attempt: is the process up?"""
        return self._request("GET", "/health", total_timeout_s=0).json()

    def metrics(self) -> dict[str, Any]:
        """GET /v1/metrics: request counts, latencies, queue depth, handler metrics."""
        return self._request("GET", f"/{API_VERSION}/metrics").json()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def __enter__(self) -> "CriticClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- calls: requests are built (validated, serialised) in the caller's thread -------------

    def _infer_request(self, tokens: torch.Tensor, lengths: torch.Tensor):
        route = f"/{API_VERSION}/infer"
        tensors = {"tokens": _as_dtype(tokens, torch.int64), "lengths": _as_dtype(lengths, torch.int64)}
        dims = self._validate_locally(route, tensors, INFER_REQUEST)
        return route, encode_tensors(tensors), dims

    def _train_request(self, tensors: Mapping[str, torch.Tensor], key: str, step: int | None = None):
        route = f"/{API_VERSION}/train"
        if not key:
            raise ValueError("train needs a non-empty idempotency_key")
        wire = {
            name: _as_dtype(t, torch.int64 if name in ("tokens", "lengths") else torch.float32)
            for name, t in tensors.items()
        }
        self._validate_locally(route, wire, TRAIN_REQUEST)
        return route, encode_tensors(wire, train_request_metadata(step)), key

    def _infer_call(self, route: str, body: bytes, dims: dict[str, int]) -> dict[str, torch.Tensor]:
        response = self._request("POST", route, body)
        tensors, _ = self._decode(route, response)
        try:
            got = validate(tensors, INFER_RESPONSE)
        except ProtocolError as exc:
            raise CriticServerError(self.base_url + route, 200, f"invalid response: {exc.message}") from None
        if any(got.get(d, dims[d]) != dims[d] for d in ("B", "S")):
            raise CriticServerError(
                self.base_url + route, 200, f"response shape {got} does not match request {dims}"
            )
        return tensors

    def _train_call(self, route: str, body: bytes, key: str) -> dict[str, float]:
        response = self._request("POST", route, body, {IDEMPOTENCY_HEADER: key})
        _, metadata = self._decode(route, response)
        try:
            return metrics_from_results(results_from_metadata(metadata))
        except ProtocolError as exc:
            raise CriticServerError(self.base_url + route, 200, exc.message) from None

    def _validate_locally(self, route: str, tensors: Mapping[str, torch.Tensor], specs) -> dict[str, int]:
        """Same checks as the server, before spending a round trip."""
        try:
            return validate(tensors, specs)
        except ProtocolError as exc:
            raise CriticRequestError(
                self.base_url + route, exc.status, f"request not sent: {exc.message}"
            ) from None

    def _decode(self, route: str, response: requests.Response):
        try:
            return decode_tensors(response.content, _MAX_RESPONSE_BYTES)
        except ProtocolError as exc:
            raise CriticServerError(
                self.base_url + route, response.status_code, f"unreadable response: {exc.message}"
            ) from None

    # -- transport ---------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _request(
        self,
        method: str,
        route: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        total_timeout_s: float | None = None,
    ) -> requests.Response:
        """One logical call with retries; the same headers (idempotency key) on every try."""
        url = self.base_url + route
        budget = self.total_timeout_s if total_timeout_s is None else total_timeout_s
        all_headers = {**self._auth, **(headers or {})}
        if body is not None:
            all_headers["Content-Type"] = CONTENT_TYPE
        start = time.monotonic()
        deadline = start + budget
        delay = self.backoff_initial_s
        attempts = 0
        last_error = "no attempt made"
        while True:
            attempts += 1
            remaining = deadline - time.monotonic()
            timeout = max(_MIN_ATTEMPT_S, min(self.request_timeout_s, remaining))
            if budget == 0:
                timeout = self.request_timeout_s
            retry_after = None
            try:
                response = self._session().request(
                    method, url, data=body, headers=all_headers, timeout=timeout
                )
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as exc:
                last_error = _describe(exc)
            else:
                status = response.status_code
                if status < 400:
                    return response
                message = _error_message(response)
                if status in RETRY_STATUSES:
                    last_error = f"HTTP {status}: {message}"
                    retry_after = _retry_after_s(response)
                elif status < 500:
                    raise CriticRequestError(url, status, message)
                else:
                    raise CriticServerError(url, status, message)

            if retry_after is not None:
                pause = retry_after * self._random.uniform(1.0, 1.2)
            else:
                pause = min(delay, self.backoff_max_s) * self._random.uniform(0.5, 1.0)
            delay = min(delay * 2, self.backoff_max_s)
            remaining = deadline - time.monotonic()
            if remaining < _MIN_ATTEMPT_S:
                raise CriticUnavailableError(
                    url,
                    attempts,
                    time.monotonic() - start,
                    last_error,
                    _CONFIG_HINT.format(base=self.base_url),
                )
            time.sleep(min(pause, remaining - _MIN_ATTEMPT_S))


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast within a kind (int32 tokens -> int64, bf16 values -> float32); never across kinds,
    so float tokens still fail validation with a clear message."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
    same_kind = tensor.is_floating_point() == dtype.is_floating_point and tensor.dtype != torch.bool
    return tensor.to(dtype) if same_kind and tensor.dtype != dtype else tensor


def _error_message(response: requests.Response) -> str:
    try:
        payload = response.json()
        if isinstance(payload, dict) and "error" in payload:
            return str(payload["error"])
    except ValueError:
        pass
    text = response.text.strip()
    return text[:300] if text else response.reason or "no message"


def _retry_after_s(response: requests.Response) -> float | None:
    raw = response.headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


def _describe(exc: Exception) -> str:
    """requests wraps the useful reason (refused, timed out) deep inside urllib3 errors."""
    reason: Any = exc
    inner = exc.args[0] if exc.args else None
    if inner is not None and getattr(inner, "reason", None) is not None:
        reason = inner.reason
    return f"{type(exc).__name__}: {str(reason)[:300]}"
