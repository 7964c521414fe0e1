"""CriticClient against the real server: retries, idempotent retries, clear failures."""

import socket
import threading
import time

import pytest
import torch

from aligner.serving.client import (
    CriticClient,
    CriticRequestError,
    CriticServerError,
    CriticUnavailableError,
)
from aligner.serving.server import BackgroundServer, create_app

TOKEN = "client-test-token"
TOKENS = torch.tensor([[4, 7, 1, 0], [9, 3, 0, 0]])
LENGTHS = torch.tensor([3, 2])


class FakeCritic:
    """values = tokens * 0.5, rewards = lengths; train returns the sum of returns."""

    def __init__(self, delay_s=0.0, ready=True):
        self.delay_s = delay_s
        self.ready = threading.Event()
        if ready:
            self.ready.set()
        self.train_keys_seen = 0
        self.train_calls = []
        self.infer_calls = 0
        self.fail = False

    def infer(self, tensors):
        time.sleep(self.delay_s)
        self.infer_calls += 1
        if self.fail:
            raise ValueError("simulated model failure")
        return {"values": tensors["tokens"].float() * 0.5, "rewards": tensors["lengths"].float()}

    def train(self, tensors):
        self.train_calls.append(tensors["returns"].clone())
        time.sleep(self.delay_s)
        return {"loss": float(tensors["returns"].double().sum()), "applied": len(self.train_calls)}

    def save(self, step):
        return {"step": step, "path": f"/ckpt/{step}"}

    def is_ready(self):
        return self.ready.is_set()

    def metrics(self):
        return {}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_app(handler, **options):
    settings = dict(token=TOKEN, max_request_bytes=1 << 20, queue_limit=4, retry_after_s=1, idempotency_cache_size=16)
    settings.update(options)
    return create_app(handler, **settings)


def client_for(port, **options):
    settings = dict(token=TOKEN, request_timeout_s=5, total_timeout_s=10, backoff_initial_s=0.1, backoff_max_s=0.4)
    settings.update(options)
    return CriticClient("127.0.0.1", port, **settings)


def expected_values(tokens):
    """Hand-written reference: 0.5 * token id, row by row."""
    return [[0.5 * t for t in row] for row in tokens.tolist()]


def train_tensors(scale=1.0):
    return {
        "tokens": TOKENS,
        "lengths": LENGTHS,
        "returns": torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]]) * scale,
        "prev_values": torch.zeros(2, 4),
        "mask": torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]),
    }


def server_metrics(server):
    with client_for(server.port) as client:
        return client.metrics()


def test_infer_train_save_round_trip_and_async_fan_out():
    handler = FakeCritic()
    server = BackgroundServer(make_app(handler)).start()
    try:
        with client_for(server.port) as client:
            assert client.health()["status"] == "ok"
            client.wait_until_ready(timeout_s=2)
            out = client.infer(TOKENS.to(torch.int32), LENGTHS)  # int32 is widened on the client
            assert out["values"].tolist() == expected_values(TOKENS)
            assert out["rewards"].tolist() == [3.0, 2.0]

            batches = [torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(i)) for i in range(6)]
            futures = [client.infer_async(b, torch.tensor([5, 4, 1])) for b in batches]
            for batch, future in zip(batches, futures):
                assert future.result(timeout=10)["values"].tolist() == expected_values(batch)

            metrics = client.train(train_tensors(), idempotency_key="step0-mb0")
            assert metrics == {"loss": 15.0, "applied": 1.0}
            assert client.train_async(train_tensors(2.0), "step0-mb1").result(timeout=10)["loss"] == 30.0
            assert client.save(7) == {"step": 7, "path": "/ckpt/7"}
            assert client.save(8, idempotency_key="save-8") == {"step": 8, "path": "/ckpt/8"}
            with pytest.raises(TypeError):  # where to save is the server's choice, never the client's
                client.save(9, "/elsewhere", idempotency_key="save-9")
    finally:
        server.stop()


def test_client_started_before_the_server_retries_until_it_is_up():
    port = free_port()
    handler = FakeCritic()
    app = make_app(handler)
    holder = {}

    def start_late():
        time.sleep(1.0)
        holder["server"] = BackgroundServer(app, port=port).start()

    starter = threading.Thread(target=start_late, daemon=True)
    starter.start()
    started = time.monotonic()
    try:
        with client_for(port) as client:
            out = client.infer(TOKENS, LENGTHS)
        assert time.monotonic() - started >= 0.9
        assert out["values"].tolist() == expected_values(TOKENS)
        assert handler.infer_calls == 1
    finally:
        starter.join()
        holder["server"].stop()


def test_train_retried_across_a_server_restart_is_applied_exactly_once():
    port = free_port()
    handler = FakeCritic(delay_s=0.8)
    app = make_app(handler)
    first = BackgroundServer(app, port=port).start()
    second = None
    try:
        with client_for(port) as client:
            future = client.train_async(train_tensors(), idempotency_key="step3-mb2")
            while not handler.train_calls:  # the handler is now running the update
                time.sleep(0.01)
            first.stop(wait_s=0)  # connections dropped mid-request, like a killed front
            time.sleep(0.5)  # client retries meet a refused connection
            second = BackgroundServer(app, port=port).start()
            metrics = future.result(timeout=15)
        assert len(handler.train_calls) == 1
        assert metrics == {"loss": 15.0, "applied": 1.0}
        counts = server_metrics(second)
        assert counts["requests"]["POST /v1/train"] == {"200": 2}  # the lost response and the retry
        assert counts["idempotency"]["replays"] == 1
    finally:
        if second is not None:
            second.stop()


def test_no_server_raises_unavailable_within_the_budget_naming_the_address():
    port = free_port()
    with client_for(port, total_timeout_s=1.5) as client:
        started = time.monotonic()
        with pytest.raises(CriticUnavailableError) as info:
            client.infer(TOKENS, LENGTHS)
        elapsed = time.monotonic() - started
    assert 1.3 <= elapsed <= 2.2, elapsed
    message = str(info.value)
    assert f"http://127.0.0.1:{port}/v1/infer" in message
    assert "remote_critic_rm.critic.ip" in message and "remote_critic_rm.critic.port" in message
    assert "refused" in message.lower()
    assert info.value.attempts >= 3  # backoff 0.1..0.4 s over 1.5 s


def test_health_is_a_single_attempt():
    with client_for(free_port(), total_timeout_s=30) as client:
        started = time.monotonic()
        with pytest.raises(CriticUnavailableError) as info:
            client.health()
    assert time.monotonic() - started < 2
    assert info.value.attempts == 1


def test_4xx_is_raised_at_once_without_retry():
    handler = FakeCritic()
    server = BackgroundServer(make_app(handler)).start()
    try:
        with client_for(server.port, token="wrong-token", total_timeout_s=30) as client:
            started = time.monotonic()
            with pytest.raises(CriticRequestError) as info:
                client.infer(TOKENS, LENGTHS)
            assert time.monotonic() - started < 2
        assert info.value.status == 403 and "token" in info.value.message
        assert f":{server.port}/v1/infer" in str(info.value)
        assert server_metrics(server)["requests"]["POST /v1/infer"] == {"403": 1}

        # Invalid tensors are rejected before sending, with the server's own wording.
        with client_for(server.port) as client:
            with pytest.raises(CriticRequestError) as info:
                client.infer(TOKENS, torch.tensor([3, 9]))
            assert info.value.status == 422 and "'lengths'" in info.value.message
            with pytest.raises(CriticRequestError) as info:
                client.train({**train_tensors(), "mask": torch.ones(2, 5)}, "bad-shape")
            assert info.value.status == 400 and "'mask'" in info.value.message
        assert handler.infer_calls == 0 and handler.train_calls == []
    finally:
        server.stop()


def test_500_is_raised_at_once_without_retry():
    handler = FakeCritic()
    handler.fail = True
    server = BackgroundServer(make_app(handler)).start()
    try:
        with client_for(server.port) as client:
            with pytest.raises(CriticServerError) as info:
                client.infer(TOKENS, LENGTHS)
        assert info.value.status == 500 and "simulated model failure" in info.value.message
        assert handler.infer_calls == 1
    finally:
        server.stop()


def test_busy_server_503_is_retried_after_retry_after():
    # a slow handler and 4 concurrent requests: they overlap even on a loaded machine
    handler = FakeCritic(delay_s=1.0)
    server = BackgroundServer(make_app(handler, queue_limit=0, retry_after_s=1)).start()
    try:
        with client_for(server.port, max_in_flight=4) as client:
            futures = [client.infer_async(TOKENS, LENGTHS) for _ in range(4)]
            results = [f.result(timeout=60) for f in futures]
        assert all(r["values"].tolist() == expected_values(TOKENS) for r in results)
        assert handler.infer_calls == 4
        statuses = server_metrics(server)["requests"]["POST /v1/infer"]
        assert statuses["200"] == 4 and statuses.get("503", 0) >= 1
    finally:
        server.stop()


def test_wait_until_ready():
    handler = FakeCritic(ready=False)
    server = BackgroundServer(make_app(handler)).start()
    try:
        with client_for(server.port) as client:
            with pytest.raises(CriticUnavailableError) as info:
                client.wait_until_ready(timeout_s=0.5)
            assert "/ready" in str(info.value) and "503" in info.value.last_error
            threading.Timer(0.3, handler.ready.set).start()
            client.wait_until_ready(timeout_s=5)
            assert client.infer(TOKENS, LENGTHS)["values"].tolist() == expected_values(TOKENS)
    finally:
        server.stop()
