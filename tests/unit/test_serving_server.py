"""The critic HTTP server, run for real under waitress on 127.0.0.1 (port 0) with a fake model.

Bodies are built and read with safetensors directly (not our encoder) and sent with plain
requests, so these tests check the server against the wire format itself.
"""

import json
import logging
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import requests
import safetensors.torch
import torch

from aligner.serving.server import (
    BackgroundServer,
    InsecureBindError,
    create_app,
    read_ready_file,
    write_ready_file,
)

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeCritic:
    """values = tokens * 0.5, rewards = lengths; counts calls; can be slow, failing, unready."""

    def __init__(self, delay_s=0.0, ready=True):
        self.delay_s = delay_s
        self.ready = threading.Event()
        if ready:
            self.ready.set()
        self.lock = threading.Lock()
        self.infer_calls = 0
        self.train_calls = []
        self.save_calls = []
        self.fail_with = None
        self.concurrent = 0
        self.max_concurrent = 0

    def _enter(self):
        with self.lock:
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        time.sleep(self.delay_s)
        if self.fail_with is not None:
            with self.lock:
                self.concurrent -= 1
            raise self.fail_with

    def _exit(self):
        with self.lock:
            self.concurrent -= 1

    def infer(self, tensors):
        self._enter()
        self.infer_calls += 1
        self._exit()
        return {"values": tensors["tokens"].double() * 0.5, "rewards": tensors["lengths"].float()}

    def train(self, tensors):
        self._enter()
        self.train_calls.append({k: v.clone() for k, v in tensors.items()})
        self._exit()
        return {"loss": float(tensors["returns"].sum()), "calls": len(self.train_calls)}

    def save(self, step):
        self._enter()
        self.save_calls.append(step)
        self._exit()
        return {"step": step, "path": f"/ckpt/step{step}"}

    def is_ready(self):
        return self.ready.is_set()

    def metrics(self):
        return {"train_calls": len(self.train_calls)}


@contextmanager
def serving(handler, threads=8, **options):
    settings = dict(token=TOKEN, max_request_bytes=4096, queue_limit=4, retry_after_s=2, idempotency_cache_size=8)
    settings.update(options)
    server = BackgroundServer(create_app(handler, **settings), port=0, threads=threads).start()
    try:
        yield server.url
    finally:
        server.stop(wait_s=2)


def body_of(tensors, metadata=None):
    return safetensors.torch.save(tensors, metadata=metadata)


TOKENS = torch.tensor([[4, 7, 1, 0], [9, 3, 0, 0]])
LENGTHS = torch.tensor([3, 2])
INFER_BODY = body_of({"tokens": TOKENS, "lengths": LENGTHS})


def train_body(scale=1.0):
    return body_of(
        {
            "tokens": TOKENS,
            "lengths": LENGTHS,
            "returns": torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]]) * scale,
            "prev_values": torch.zeros(2, 4),
            "mask": torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]),
        }
    )


def post(url, route, body, headers=None, **kw):
    return requests.post(url + route, data=body, headers={**AUTH, **(headers or {})}, timeout=10, **kw)


def assert_infer_ok(url):
    response = post(url, "/v1/infer", INFER_BODY)
    assert response.status_code == 200, response.text
    out = safetensors.torch.load(response.content)
    # Hand-worked: 0.5 * token id, as float32 on the wire.
    expected = [[2.0, 3.5, 0.5, 0.0], [4.5, 1.5, 0.0, 0.0]]
    assert out["values"].dtype == torch.float32
    assert out["values"].tolist() == expected
    assert out["rewards"].tolist() == [3.0, 2.0]


def assert_json_error(response, status):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    payload = response.json()
    assert payload["status"] == status
    assert isinstance(payload["error"], str) and payload["error"]
    return payload["error"]


def _oversize_chunks():
    for _ in range(5):
        yield b"\0" * 1000


BAD_REQUESTS = [
    # (name, method, route, body, headers, expected status, fragment of the error message)
    ("wrong dtype", "POST", "/v1/infer", body_of({"tokens": TOKENS.float(), "lengths": LENGTHS}), {}, 400, "tokens"),
    ("shape mismatch", "POST", "/v1/infer", body_of({"tokens": TOKENS, "lengths": torch.tensor([3, 2, 1])}), {}, 400, "lengths"),
    ("truncated body", "POST", "/v1/infer", INFER_BODY[:-6], {}, 400, "safetensors"),
    ("garbage body", "POST", "/v1/infer", b"not safetensors at all, just words", {}, 400, "safetensors"),
    ("empty body", "POST", "/v1/infer", b"", {}, 400, "8-byte"),
    ("oversize body", "POST", "/v1/infer", b"\0" * 5000, {}, 413, "max_request_bytes"),
    ("oversize chunked", "POST", "/v1/infer", "chunks", {}, 413, "max_request_bytes"),
    ("bad values", "POST", "/v1/infer", body_of({"tokens": -TOKENS, "lengths": LENGTHS}), {}, 422, "tokens"),
    ("missing token", "POST", "/v1/infer", INFER_BODY, {"Authorization": None}, 401, "Authorization"),
    ("wrong token", "POST", "/v1/infer", INFER_BODY, {"Authorization": "Bearer s3cret-tokem"}, 403, "token"),
    ("wrong scheme", "POST", "/v1/infer", INFER_BODY, {"Authorization": f"Basic {TOKEN}"}, 403, "token"),
    ("unknown route", "POST", "/v1/inference", INFER_BODY, {}, 404, "/v1/infer"),
    ("unknown version", "GET", "/v2/metrics", None, {}, 404, "/v1/metrics"),
    ("wrong method", "GET", "/v1/infer", None, {}, 405, "GET"),
    ("missing idempotency key", "POST", "/v1/train", train_body(), {}, 400, "Idempotency-Key"),
    ("bad idempotency key", "POST", "/v1/train", train_body(), {"Idempotency-Key": "has space"}, 400, "Idempotency-Key"),
    ("train nan", "POST", "/v1/train", body_of({"tokens": TOKENS, "lengths": LENGTHS, "returns": torch.full((2, 4), float("nan")), "prev_values": torch.zeros(2, 4), "mask": torch.ones(2, 4)}), {"Idempotency-Key": "t-nan"}, 422, "returns"),
    ("save without step", "POST", "/v1/save", body_of({}), {"Idempotency-Key": "s-1"}, 400, "step"),
    ("save with a path", "POST", "/v1/save", body_of({}, {"step": "3", "path": "../../x"}), {"Idempotency-Key": "s-2"}, 400, "'path'"),
    ("save step negative", "POST", "/v1/save", body_of({}, {"step": "-3"}), {"Idempotency-Key": "s-3"}, 400, "'step'"),
]


def test_bad_requests_get_4xx_and_the_server_keeps_serving():
    handler = FakeCritic()
    with serving(handler) as url:
        for name, method, route, body, headers, status, fragment in BAD_REQUESTS:
            all_headers = {k: v for k, v in {**AUTH, **headers}.items() if v is not None}
            data = _oversize_chunks() if body == "chunks" else body
            response = requests.request(method, url + route, data=data, headers=all_headers, timeout=10)
            message = assert_json_error(response, status)
            assert fragment in message, (name, message)
            if status == 405:
                assert "POST" in response.headers["Allow"]
            if status == 401:
                assert response.headers["WWW-Authenticate"] == "Bearer"
            assert_infer_ok(url)
        # None of the bad requests reached the model; only the follow-up infers did.
        assert handler.infer_calls == len(BAD_REQUESTS)
        assert handler.train_calls == [] and handler.save_calls == []


def test_health_needs_no_token_but_everything_else_does():
    with serving(FakeCritic()) as url:
        assert requests.get(url + "/health", timeout=10).json()["status"] == "ok"
        for route in ("/ready", "/v1/metrics"):
            assert_json_error(requests.get(url + route, timeout=10), 401)
            assert requests.get(url + route, headers=AUTH, timeout=10).status_code == 200


def test_no_token_configured_means_open_access():
    with serving(FakeCritic(), token=None) as url:
        response = requests.post(url + "/v1/infer", data=INFER_BODY, timeout=10)
        assert response.status_code == 200


def test_handler_exception_is_500_json_and_server_keeps_serving():
    handler = FakeCritic()
    with serving(handler) as url:
        handler.fail_with = RuntimeError("CUDA out of memory (simulated)")
        message = assert_json_error(post(url, "/v1/infer", INFER_BODY), 500)
        assert "handler.infer" in message and "CUDA out of memory" in message
        message = assert_json_error(post(url, "/v1/train", train_body(), {"Idempotency-Key": "fail-1"}), 500)
        assert "handler.train" in message
        handler.fail_with = None
        assert_infer_ok(url)
        # A failed train is not recorded: retrying the same key runs it.
        response = post(url, "/v1/train", train_body(), {"Idempotency-Key": "fail-1"})
        assert response.status_code == 200 and "Idempotent-Replay" not in response.headers
        assert len(handler.train_calls) == 1


def test_handler_returning_bad_output_is_500():
    handler = FakeCritic()
    handler.infer = lambda tensors: {"values": torch.zeros(3, 4)}  # wrong batch size
    with serving(handler) as url:
        message = assert_json_error(post(url, "/v1/infer", INFER_BODY), 500)
        assert "B=3" in message


def test_train_round_trip_and_idempotent_replay():
    handler = FakeCritic()
    with serving(handler) as url:
        first = post(url, "/v1/train", train_body(), {"Idempotency-Key": "step1-mb0"})
        assert first.status_code == 200 and "Idempotent-Replay" not in first.headers
        second = post(url, "/v1/train", train_body(), {"Idempotency-Key": "step1-mb0"})
        assert second.status_code == 200
        assert second.headers["Idempotent-Replay"] == "true"
        assert second.content == first.content
        assert len(handler.train_calls) == 1
        # The handler saw exactly the tensors that were sent.
        assert torch.equal(handler.train_calls[0]["returns"], torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]]))
        # A new key trains again; the same key with another body is a client bug.
        assert post(url, "/v1/train", train_body(2.0), {"Idempotency-Key": "step1-mb1"}).status_code == 200
        message = assert_json_error(post(url, "/v1/train", train_body(3.0), {"Idempotency-Key": "step1-mb0"}), 409)
        assert "step1-mb0" in message
        assert len(handler.train_calls) == 2
        header = _metadata(second.content)
        assert float(header["loss"]) == 15.0  # 1+2+3+4+5
        assert float(header["calls"]) == 1.0


def _metadata(body):
    """safetensors metadata, read by hand rather than with our decoder."""
    (n,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8 : 8 + n]).get("__metadata__", {})


def test_idempotency_cache_is_lru_bounded():
    handler = FakeCritic()
    with serving(handler, idempotency_cache_size=2) as url:
        for key in ("a", "b", "a", "c"):  # "a" is refreshed, so "b" is evicted by "c"
            assert post(url, "/v1/train", train_body(), {"Idempotency-Key": key}).status_code == 200
        assert len(handler.train_calls) == 3
        assert post(url, "/v1/train", train_body(), {"Idempotency-Key": "a"}).headers.get("Idempotent-Replay") == "true"
        assert "Idempotent-Replay" not in post(url, "/v1/train", train_body(), {"Idempotency-Key": "b"}).headers
        assert len(handler.train_calls) == 4


def test_concurrent_duplicates_run_once():
    handler = FakeCritic(delay_s=0.4)
    with serving(handler) as url:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(post, url, "/v1/train", train_body(), {"Idempotency-Key": "dup"}) for _ in range(3)]
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert len(handler.train_calls) == 1
        assert sum(r.headers.get("Idempotent-Replay") == "true" for r in responses) == 2
        assert len({r.content for r in responses}) == 1


def test_save_is_idempotent_and_returns_handler_result():
    handler = FakeCritic()
    with serving(handler) as url:
        body = body_of({}, {"step": "40"})
        for _ in range(2):
            response = post(url, "/v1/save", body, {"Idempotency-Key": "save-40"})
            assert response.status_code == 200
            meta = _metadata(response.content)
            assert meta == {"step": "40", "path": '"/ckpt/step40"'}
        assert handler.save_calls == [40]
        assert_json_error(post(url, "/v1/save", body), 400)


def test_model_calls_never_overlap_and_queue_overflow_is_503_with_retry_after():
    handler = FakeCritic(delay_s=0.5)
    with serving(handler, queue_limit=1, retry_after_s=3) as url:
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: post(url, "/v1/infer", INFER_BODY), range(4)))
        statuses = sorted(r.status_code for r in responses)
        assert 200 in statuses and 503 in statuses, statuses
        for response in responses:
            if response.status_code == 503:
                assert response.headers["Retry-After"] == "3"
                assert "queue_limit" in assert_json_error(response, 503)
        assert handler.max_concurrent == 1
        metrics = requests.get(url + "/v1/metrics", headers=AUTH, timeout=10).json()
        assert metrics["requests"]["POST /v1/infer"] == {
            str(s): statuses.count(s) for s in set(statuses)
        }
        assert metrics["queue"] == {"waiting": 0, "busy": False, "limit": 1, "admitted": 0}


def test_ready_is_503_until_the_handler_is_ready():
    handler = FakeCritic(ready=False)
    with serving(handler) as url:
        assert requests.get(url + "/health", timeout=10).status_code == 200
        response = requests.get(url + "/ready", headers=AUTH, timeout=10)
        assert_json_error(response, 503)
        assert response.headers["Retry-After"] == "2"
        response = post(url, "/v1/infer", INFER_BODY)
        assert "loading" in assert_json_error(response, 503)
        assert response.headers["Retry-After"] == "2"
        handler.ready.set()
        assert requests.get(url + "/ready", headers=AUTH, timeout=10).json() == {"ready": True}
        assert_infer_ok(url)


def test_metrics_count_requests_by_route_and_status():
    handler = FakeCritic()
    with serving(handler) as url:
        for _ in range(3):
            assert_infer_ok(url)
        post(url, "/v1/infer", b"garbage!garbage!")
        post(url, "/v1/train", train_body(), {"Idempotency-Key": "m1"})
        post(url, "/v1/train", train_body(), {"Idempotency-Key": "m1"})
        requests.get(url + "/nope", headers=AUTH, timeout=10)
        metrics = requests.get(url + "/v1/metrics", headers=AUTH, timeout=10).json()
    assert metrics["api_version"] == "v1"
    assert metrics["requests"]["POST /v1/infer"] == {"200": 3, "400": 1}
    assert metrics["requests"]["POST /v1/train"] == {"200": 2}
    assert metrics["requests"]["GET <unmatched>"] == {"404": 1}
    assert metrics["latency"]["POST /v1/infer"]["count"] == 4
    assert metrics["latency"]["POST /v1/infer"]["max_s"] >= metrics["latency"]["POST /v1/infer"]["mean_s"] > 0
    assert metrics["idempotency"]["replays"] == 1
    assert metrics["handler"] == {"train_calls": 1}


def test_binding_beyond_loopback_without_token_is_refused_unless_allowed(caplog):
    app = create_app(FakeCritic(), token=None, queue_limit=1)
    with caplog.at_level(logging.WARNING, logger="aligner.serving.server"):
        BackgroundServer(app, host="127.0.0.1", port=0).stop()
        assert not caplog.records
        with pytest.raises(InsecureBindError, match="without a token"):
            BackgroundServer(app, host="0.0.0.0", port=0)
        BackgroundServer(create_app(FakeCritic(), token=TOKEN), host="0.0.0.0", port=0).stop()
        assert not caplog.records
        allowed = create_app(FakeCritic(), token=None, queue_limit=1, allow_unauthenticated=True)
        BackgroundServer(allowed, host="0.0.0.0", port=0).stop()
    assert any("without a token" in r.getMessage() for r in caplog.records)


def test_ready_file_round_trip(tmp_path):
    path = tmp_path / "sub" / "critic.addr"
    write_ready_file(str(path), "10.1.2.3", 5567)
    assert path.read_text() == "10.1.2.3:5567\n"
    assert read_ready_file(str(path)) == ("10.1.2.3", 5567)
    write_ready_file(str(path), "0.0.0.0", 80)
    host, port = read_ready_file(str(path))
    assert host not in ("0.0.0.0", "") and port == 80


def test_duplicate_of_a_long_running_request_gets_503_after_inflight_wait():
    handler = FakeCritic(delay_s=0.6)
    with serving(handler, inflight_wait_s=0.1) as url:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, url, "/v1/train", train_body(), {"Idempotency-Key": "long"})
            time.sleep(0.2)
            waiting = post(url, "/v1/train", train_body(), {"Idempotency-Key": "long"})
            assert "still running" in assert_json_error(waiting, 503)
            assert waiting.headers["Retry-After"] == "2"
            assert first.result().status_code == 200
        later = post(url, "/v1/train", train_body(), {"Idempotency-Key": "long"})
        assert later.headers["Idempotent-Replay"] == "true"
        assert len(handler.train_calls) == 1


class SequencedCritic(FakeCritic):
    """Applies train step N only on a state at N-1; refuses other steps with 409 (as the critic)."""

    def __init__(self):
        super().__init__()
        self.at = 0

    def train(self, tensors, step=None):
        from aligner.serving.protocol import ProtocolError

        if step is not None and step != self.at + 1:
            raise ProtocolError(409, f"state at step {self.at}, request for step {step}")
        result = super().train(tensors)
        self.at = step if step is not None else self.at + 1
        return {**result, "step": float(self.at)}


def test_handler_refusal_keeps_its_4xx_and_is_not_recorded():
    handler = SequencedCritic()
    with serving(handler) as url:
        step2 = body_of(safetensors.torch.load(train_body()), {"step": "2"})
        message = assert_json_error(post(url, "/v1/train", step2, {"Idempotency-Key": "s2"}), 409)
        assert "state at step 0" in message and handler.train_calls == []
        step1 = body_of(safetensors.torch.load(train_body()), {"step": "1"})
        assert post(url, "/v1/train", step1, {"Idempotency-Key": "s1"}).status_code == 200
        # the refused key was not recorded: once in order, the same key and body are applied
        response = post(url, "/v1/train", step2, {"Idempotency-Key": "s2"})
        assert response.status_code == 200 and "Idempotent-Replay" not in response.headers
        assert handler.at == 2 and len(handler.train_calls) == 2
        assert_infer_ok(url)


@pytest.mark.parametrize("metadata,fragment", [({"step": "0"}, "'step'"), ({"step": "x"}, "'step'"),
                                                ({"stp": "1"}, "'stp'")])
def test_malformed_train_metadata_is_400_naming_the_key(metadata, fragment):
    handler = SequencedCritic()
    with serving(handler) as url:
        body = body_of(safetensors.torch.load(train_body()), metadata)
        message = assert_json_error(post(url, "/v1/train", body, {"Idempotency-Key": "bad-meta"}), 400)
        assert fragment in message and handler.train_calls == []


class GatedCritic(FakeCritic):
    """infer blocks until ``release`` is set: a long request holding the model."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.checked = []

    def infer(self, tensors):
        self.entered.set()
        assert self.release.wait(20), "test never released the slow infer"
        return super().infer(tensors)


def _timed_get(url, route):
    started = time.perf_counter()
    response = requests.get(url + route, headers=AUTH, timeout=5)
    return response, time.perf_counter() - started


@pytest.mark.parametrize("threads, admitted", [(8, 5), (3, 2)])
def test_health_and_ready_answer_while_a_slow_infer_holds_the_model(threads, admitted):
    """With one infer holding the model and the queue full, /health, /ready and /v1/metrics answer
    at once (they never wait for the model, and a thread is always left for them, even with
    fewer threads than queue_limit + 2); model requests beyond admission get 503 at once."""
    handler = GatedCritic()
    with serving(handler, threads=threads, queue_limit=4, retry_after_s=3) as url:
        with ThreadPoolExecutor(admitted + 2) as pool:
            first = pool.submit(post, url, "/v1/infer", INFER_BODY)
            assert handler.entered.wait(10)
            queued = [pool.submit(post, url, "/v1/infer", INFER_BODY) for _ in range(admitted - 1)]
            deadline = time.monotonic() + 10
            while requests.get(url + "/v1/metrics", headers=AUTH, timeout=5).json()["queue"]["admitted"] < admitted:
                assert time.monotonic() < deadline, "queued requests never arrived"
                time.sleep(0.05)
            refused = post(url, "/v1/infer", INFER_BODY)  # beyond admission: at once, not after the slow one
            assert "queue_limit" in assert_json_error(refused, 503) and refused.headers["Retry-After"] == "3"
            for route in ("/health", "/ready", "/v1/metrics"):
                for _ in range(3):
                    response, seconds = _timed_get(url, route)
                    assert response.status_code == 200 and seconds < 1.0, (route, response.status_code, seconds)
            assert not first.done()  # all of the above happened while the slow infer held the model
            handler.release.set()
            assert [f.result().status_code for f in [first, *queued]] == [200] * admitted
        assert handler.max_concurrent == 1


class CheckingCritic(GatedCritic):
    """A handler with static checks (as the real critic's vocabulary check)."""

    def check_request(self, route, tensors):
        from aligner.serving.protocol import ProtocolError

        self.checked.append(route)
        if int(tensors["tokens"].max()) >= 50:
            raise ProtocolError(422, "field 'tokens': id beyond the vocabulary of 50")
        if route == "train" and float(tensors["returns"].sum()) == 123.0:
            raise RuntimeError("a bug in the check")


def test_limits_and_static_checks_answer_before_the_model_gate():
    """While a slow infer holds the model, requests breaking the size limits (413/422) or the
    handler's static checks (4xx) are answered at once; they never queue behind it."""
    handler = CheckingCritic()
    with serving(handler, max_request_bytes=4 << 20, max_sequence_length=8, max_tokens_per_request=16) as url:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, url, "/v1/infer", INFER_BODY)
            assert handler.entered.wait(10)
            too_long = body_of({"tokens": torch.zeros(1, 9, dtype=torch.int64), "lengths": torch.tensor([9])})
            too_many = body_of({"tokens": torch.zeros(3, 8, dtype=torch.int64), "lengths": torch.tensor([8, 8, 8])})
            beyond_vocab = body_of({"tokens": torch.tensor([[50, 1]]), "lengths": torch.tensor([2])})
            huge = body_of({"tokens": torch.zeros(1, 200000, dtype=torch.int64), "lengths": torch.tensor([200000])})
            for body, status, fragments in [(too_long, 422, ["'tokens'", "S=9", "max_sequence_length=8"]),
                                            (too_many, 413, ["'tokens'", "3 x 8 = 24", "max_tokens_per_request=16"]),
                                            (huge, 422, ["'tokens'", "S=200000"]),
                                            (beyond_vocab, 422, ["'tokens'", "vocabulary"])]:
                started = time.perf_counter()
                message = assert_json_error(post(url, "/v1/infer", body), status)
                assert time.perf_counter() - started < 2.0
                for fragment in fragments:
                    assert fragment in message, (fragment, message)
            big_train = safetensors.torch.load(train_body())
            big_train = {k: v.repeat(3, 2) for k, v in big_train.items() if k != "lengths"}
            big_train["lengths"] = torch.tensor([3, 2, 3, 2, 3, 2])
            message = assert_json_error(post(url, "/v1/train", body_of(big_train), {"Idempotency-Key": "big"}), 413)
            assert "max_tokens_per_request" in message
            buggy = safetensors.torch.load(train_body())
            buggy["returns"] = torch.zeros(2, 4)
            buggy["returns"][0, 0] = 123.0
            message = assert_json_error(post(url, "/v1/train", body_of(buggy), {"Idempotency-Key": "bug"}), 500)
            assert "handler.check_request" in message
            assert not first.done()
            handler.release.set()
            assert first.result().status_code == 200
        assert handler.checked == ["infer", "infer", "train"]  # the limits come first: no check, no model
        assert handler.infer_calls == 1 and handler.train_calls == []
        metrics = requests.get(url + "/v1/metrics", headers=AUTH, timeout=5).json()
        assert metrics["limits"] == {"max_request_bytes": 4 << 20, "max_sequence_length": 8,
                                     "max_tokens_per_request": 16}
