"""Malformed and hostile requests against a real serve_ppo_critic.py process (issue 11).

One critic server, initialised from a tiny reward model trained for two steps, with its token
given only through ALIGNER_CRITIC_TOKEN (so every authenticated answer here also proves that the
environment variable works). Each hostile request must get a 4xx whose JSON message names the
field (or header, route) at fault, and a healthy request right after it must get exactly the
values the server answered before any of them: nothing a hostile request does changes the
critic. Then: saves write and prune only inside the server's own checkpoint directory, and a
SIGKILL right after a save leaves no process behind.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
import safetensors.torch
import torch
from omegaconf import OmegaConf

from aligner.serving.client import CriticRequestError
from aligner.trainers.critic import check_auth_settings, prune_critic_checkpoints, resolve_size_limits
from aligner.training.config_check import ConfigError
from tests.integration.test_critic_server import (  # noqa: F401  (reward_model is a fixture)
    SERVE_CRITIC,
    ServerProcess,
    critic_overrides,
    reward_model,
)
from tests.launch import child_env

pytestmark = pytest.mark.timeout(420)

TOKEN = "env-only-secret"
MAX_REQUEST_BYTES = 2_000_000
MAX_TOKENS = 4096


# --------------------------------------------------------------------------------------------
# Pure checks (no processes)
# --------------------------------------------------------------------------------------------


def _loop(**values):
    return OmegaConf.create({"host": "127.0.0.1", "auth_token": None, "allow_unauthenticated": False,
                             "max_sequence_length": None, "max_tokens_per_request": None, **values})


def test_public_bind_needs_a_token_or_an_explicit_opt_out():
    check_auth_settings(_loop(), "ppo", None)  # loopback: no token needed
    check_auth_settings(_loop(host="0.0.0.0"), "ppo", "secret")
    check_auth_settings(_loop(host="0.0.0.0", allow_unauthenticated=True), "ppo", None)
    for host in ("0.0.0.0", "10.1.2.3", "::", "node17"):
        with pytest.raises(ConfigError) as info:
            check_auth_settings(_loop(host=host), "ppo", None)
        for key in ("trainer.ppo.host", "trainer.ppo.auth_token", "ALIGNER_CRITIC_TOKEN",
                    "trainer.ppo.allow_unauthenticated=true"):
            assert key in str(info.value), (key, str(info.value))
    with pytest.raises(ConfigError, match="ALIGNER_RM_TOKEN"):
        check_auth_settings(_loop(host="0.0.0.0"), "rm_server", None)


def test_size_limits_default_to_the_model_context():
    class Config:
        max_position_embeddings, is_llama = 256, True

    assert resolve_size_limits(_loop(), "ppo", Config) == (256, None)
    assert resolve_size_limits(_loop(max_sequence_length=64, max_tokens_per_request=1000), "ppo", Config) == (64, 1000)
    for key, bad in (("max_sequence_length", 0), ("max_tokens_per_request", -5), ("max_sequence_length", "x")):
        with pytest.raises(ConfigError, match=f"trainer.rm_server.{key}"):
            resolve_size_limits(_loop(**{key: bad}), "rm_server", Config)
    Config.is_llama = False  # learned positions: nothing exists beyond them
    with pytest.raises(ConfigError, match="max_position_embeddings=256"):
        resolve_size_limits(_loop(max_sequence_length=512), "ppo", Config)


def _fake_checkpoint(path: Path, state: dict) -> Path:
    path.mkdir(parents=True)
    (path / "weights").mkdir()
    (path / "trainer_state.json").write_text(json.dumps(state))
    (path / "COMPLETE").write_text("ok\n")
    return path


def test_pruning_touches_only_critic_checkpoints_in_its_own_directory(tmp_path):
    root = tmp_path / "checkpoints"
    ours = [_fake_checkpoint(root / f"step_{s:07d}", {"critic_mode": "critic+rm", "step": s}) for s in (1, 2, 3)]
    foreign = _fake_checkpoint(root / "step_0000000", {"algorithm": "rm", "step": 0})
    outside = _fake_checkpoint(tmp_path / "elsewhere" / "step_0000001", {"critic_mode": "critic", "step": 1})
    (root / "step_0000004").symlink_to(outside)  # looks like ours, but a link out of the directory
    stray = root / "step_notes"
    stray.mkdir()
    assert prune_critic_checkpoints(root, keep=1) == [ours[0], ours[1]]
    assert not ours[0].exists() and not ours[1].exists() and ours[2].is_dir()
    assert foreign.is_dir() and stray.is_dir() and (outside / "COMPLETE").is_file()
    assert (root / "step_0000004").is_symlink()


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def critic(reward_model):  # noqa: F811
    job = ServerProcess("hostile", SERVE_CRITIC, reward_model["root"],
                        [*critic_overrides(reward_model), f"trainer.ppo.max_request_bytes={MAX_REQUEST_BYTES}",
                         f"trainer.ppo.max_tokens_per_request={MAX_TOKENS}",
                         "exp_manager.checkpoint_callback_params.save_top_k=1"],
                        token=TOKEN, ALIGNER_CRITIC_TOKEN=TOKEN)
    try:
        client = job.wait_ready()
        tokens = torch.randint(0, reward_model["vocab"], (3, 10), generator=torch.Generator().manual_seed(5))
        lengths = torch.tensor([10, 4, 1])
        baseline = client.infer(tokens, lengths)
        yield {"job": job, "client": client, "url": client.base_url, "tokens": tokens, "lengths": lengths,
               "baseline": baseline, "vocab": reward_model["vocab"],
               "context": reward_model["state"]["model_config"]["max_position_embeddings"]}
    finally:
        job.kill()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def body(tensors: dict, metadata: dict | None = None) -> bytes:
    return safetensors.torch.save({k: v.clone() for k, v in tensors.items()}, metadata=metadata)


def infer_body(tokens, lengths) -> bytes:
    return body({"tokens": tokens, "lengths": lengths})


def train_tensors(batch: int = 2, seq: int = 6, **overrides) -> dict:
    tensors = {"tokens": torch.arange(batch * seq).reshape(batch, seq) % 50, "lengths": torch.full((batch,), seq),
               "returns": torch.ones(batch, seq), "prev_values": torch.zeros(batch, seq),
               "mask": torch.ones(batch, seq)}
    tensors.update(overrides)
    return {k: v for k, v in tensors.items() if v is not None}


def _raw(header: object, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def hostile_requests(vocab: int, context: int) -> list[tuple]:
    """(name, method, route, body, extra headers, expected status, fragments the message names)."""
    ok_tokens, ok_lengths = torch.tensor([[1, 2, 3, 4]]), torch.tensor([4])
    train = lambda **o: body(train_tensors(**o))  # noqa: E731
    key = lambda name: {"Idempotency-Key": f"hostile-{name}"}  # noqa: E731
    seq_too_long = context + 1
    return [
        # -- /v1/infer: structure (400) --
        ("tokens float", "POST", "/v1/infer", infer_body(ok_tokens.float(), ok_lengths), {}, 400, ["'tokens'", "float32"]),
        ("tokens int32", "POST", "/v1/infer", infer_body(ok_tokens.int(), ok_lengths), {}, 400, ["'tokens'", "int32"]),
        ("tokens rank 1", "POST", "/v1/infer", infer_body(ok_tokens[0], ok_lengths), {}, 400, ["'tokens'", "[B, S]"]),
        ("tokens rank 3", "POST", "/v1/infer", infer_body(ok_tokens[None], ok_lengths), {}, 400, ["'tokens'", "3 dims"]),
        ("lengths rank 2", "POST", "/v1/infer", infer_body(ok_tokens, ok_lengths[None]), {}, 400, ["'lengths'"]),
        ("B mismatch", "POST", "/v1/infer", infer_body(ok_tokens, torch.tensor([4, 4])), {}, 400, ["'lengths'", "B=1"]),
        ("missing lengths", "POST", "/v1/infer", body({"tokens": ok_tokens}), {}, 400, ["'lengths'"]),
        ("unexpected tensor", "POST", "/v1/infer", body({"tokens": ok_tokens, "lengths": ok_lengths, "x": ok_lengths}),
         {}, 400, ["'x'"]),
        # -- /v1/infer: values (422) and limits (413/422), found before the model is waited for --
        ("length 0", "POST", "/v1/infer", infer_body(ok_tokens, torch.tensor([0])), {}, 422, ["'lengths'"]),
        ("length > S", "POST", "/v1/infer", infer_body(ok_tokens, torch.tensor([5])), {}, 422, ["'lengths'", "S=4"]),
        ("negative length", "POST", "/v1/infer", infer_body(ok_tokens, torch.tensor([-3])), {}, 422, ["'lengths'"]),
        ("token = vocab", "POST", "/v1/infer", infer_body(torch.tensor([[1, vocab]]), torch.tensor([2])), {}, 422,
         ["'tokens'", "vocabulary"]),
        ("token 2^40", "POST", "/v1/infer", infer_body(torch.tensor([[1 << 40]]), torch.tensor([1])), {}, 422,
         ["'tokens'", "vocabulary"]),
        ("negative token", "POST", "/v1/infer", infer_body(torch.tensor([[1, -7]]), torch.tensor([2])), {}, 422,
         ["'tokens'", "-7"]),
        ("S beyond the context", "POST", "/v1/infer", infer_body(torch.ones(1, seq_too_long, dtype=torch.int64),
                                                                 torch.tensor([seq_too_long])), {}, 422,
         ["'tokens'", f"S={seq_too_long}", f"max_sequence_length={context}"]),
        ("S = 200000", "POST", "/v1/infer", infer_body(torch.ones(1, 200_000, dtype=torch.int64),
                                                      torch.tensor([200_000])), {}, 422, ["'tokens'", "S=200000"]),
        ("B x S too many", "POST", "/v1/infer", infer_body(torch.ones(17, 256, dtype=torch.int64),
                                                          torch.full((17,), 256)), {}, 413,
         ["'tokens'", "max_tokens_per_request=4096"]),
        ("empty batch", "POST", "/v1/infer", infer_body(torch.ones(0, 4, dtype=torch.int64),
                                                       torch.ones(0, dtype=torch.int64)), {}, 422, ["'tokens'", "B"]),
        ("S = 0", "POST", "/v1/infer", infer_body(torch.ones(1, 0, dtype=torch.int64), torch.tensor([1])), {}, 422,
         ["'tokens'", "S"]),
        # -- bodies that are not (valid) safetensors --
        ("truncated body", "POST", "/v1/infer", infer_body(ok_tokens, ok_lengths)[:-5], {}, 400, ["safetensors"]),
        ("not safetensors", "POST", "/v1/infer", b"GET / HTTP/1.1 this is not safetensors", {}, 400, ["safetensors"]),
        ("empty body", "POST", "/v1/infer", b"", {}, 400, ["8-byte"]),
        ("header length 2^60", "POST", "/v1/infer", struct.pack("<Q", 1 << 60) + b"{}", {}, 400, ["truncated"]),
        ("header not JSON", "POST", "/v1/infer", struct.pack("<Q", 5) + b"{{{{{", {}, 400, ["JSON"]),
        ("header not an object", "POST", "/v1/infer", _raw([1, 2, 3]), {}, 400, ["object"]),
        ("data offsets beyond body", "POST", "/v1/infer",
         _raw({"tokens": {"dtype": "I64", "shape": [1, 4], "data_offsets": [0, 32]}}, b"\0" * 8), {}, 400,
         ["safetensors"]),
        ("oversized body", "POST", "/v1/infer", b"\0" * (MAX_REQUEST_BYTES + 1), {}, 413, ["max_request_bytes"]),
        # -- /v1/train --
        ("no idempotency key", "POST", "/v1/train", train(), {}, 400, ["Idempotency-Key"]),
        ("key with a space", "POST", "/v1/train", train(), {"Idempotency-Key": "a b"}, 400, ["Idempotency-Key"]),
        ("key of 201 chars", "POST", "/v1/train", train(), {"Idempotency-Key": "k" * 201}, 400, ["Idempotency-Key"]),
        ("key not ASCII", "POST", "/v1/train", train(), {"Idempotency-Key": "cl\xe9"}, 400, ["Idempotency-Key"]),
        ("NaN returns", "POST", "/v1/train", train(returns=torch.full((2, 6), float("nan"))), key("nan"), 422,
         ["'returns'", "nan"]),
        ("inf prev_values", "POST", "/v1/train", train(prev_values=torch.full((2, 6), float("-inf"))), key("inf"), 422,
         ["'prev_values'"]),
        ("returns 1e30", "POST", "/v1/train", train(returns=torch.full((2, 6), 1e30)), key("huge"), 422, ["'returns'"]),
        ("mask 2", "POST", "/v1/train", train(mask=torch.full((2, 6), 2.0)), key("mask2"), 422, ["'mask'"]),
        ("mask -1", "POST", "/v1/train", train(mask=torch.full((2, 6), -1.0)), key("mask-1"), 422, ["'mask'"]),
        ("mask bool", "POST", "/v1/train", train(mask=torch.ones(2, 6, dtype=torch.bool)), key("maskb"), 400,
         ["'mask'", "bool"]),
        ("returns float64", "POST", "/v1/train", train(returns=torch.ones(2, 6, dtype=torch.float64)), key("f64"), 400,
         ["'returns'", "float64"]),
        ("missing returns", "POST", "/v1/train", train(returns=None), key("noret"), 400, ["'returns'"]),
        ("prev_values S mismatch", "POST", "/v1/train", train(prev_values=torch.zeros(2, 7)), key("smis"), 400,
         ["'prev_values'", "S=6"]),
        ("train token = vocab", "POST", "/v1/train", train(tokens=torch.full((2, 6), vocab)), key("vocab"), 422,
         ["'tokens'", "vocabulary"]),
        ("train B x S too many", "POST", "/v1/train",
         train(batch=17, seq=256, tokens=torch.ones(17, 256, dtype=torch.int64)), key("many"), 413,
         ["max_tokens_per_request"]),
        ("metadata not a string", "POST", "/v1/train",
         _raw({"__metadata__": {"step": 1}, "tokens": {"dtype": "I64", "shape": [0], "data_offsets": [0, 0]}}),
         key("meta-int"), 400, ["__metadata__"]),
        ("unknown metadata key", "POST", "/v1/train", body(train_tensors(), {"stp": "1"}), key("stp"), 400, ["'stp'"]),
        ("step 0", "POST", "/v1/train", body(train_tensors(), {"step": "0"}), key("step0"), 400, ["'step'"]),
        ("step not a number", "POST", "/v1/train", body(train_tensors(), {"step": "one"}), key("stepx"), 400, ["'step'"]),
        ("step of 5000 digits", "POST", "/v1/train", body(train_tensors(), {"step": "9" * 5000}), key("stepbig"), 400,
         ["'step'"]),
        ("step out of order", "POST", "/v1/train", body(train_tensors(), {"step": "7"}), key("step7"), 409,
         ["'step'", "critic_step=0"]),
        # -- /v1/save: never a client-chosen place --
        ("save with a path", "POST", "/v1/save", body({}, {"step": "0", "path": "../../../x"}), key("p1"), 400,
         ["'path'"]),
        ("save with an absolute path", "POST", "/v1/save", body({}, {"step": "0", "path": "/proc/x"}), key("p2"), 400,
         ["'path'"]),
        ("save step negative", "POST", "/v1/save", body({}, {"step": "-1"}), key("s-neg"), 400, ["'step'"]),
        ("save step not numeric", "POST", "/v1/save", body({}, {"step": "1e3"}), key("s-x"), 400, ["'step'"]),
        ("save without step", "POST", "/v1/save", body({}), key("s-none"), 400, ["'step'"]),
        ("save with a tensor", "POST", "/v1/save", body({"x": torch.zeros(1)}, {"step": "0"}), key("s-t"), 400, ["'x'"]),
        ("save a step not reached", "POST", "/v1/save", body({}, {"step": "3"}), key("s-3"), 409,
         ["'step'", "critic_step=0"]),
        ("save without key", "POST", "/v1/save", body({}, {"step": "0"}), {}, 400, ["Idempotency-Key"]),
        # -- /v1/restore: only the server's own checkpoints, by step --
        ("restore with a path", "POST", "/v1/restore", body({}, {"step": "1", "path": "/tmp"}), {}, 400, ["'path'"]),
        ("restore step zero", "POST", "/v1/restore", body({}, {"step": "0"}), {}, 400, ["'step'", ">= 1"]),
        ("restore without step", "POST", "/v1/restore", body({}), {}, 400, ["'step'"]),
        ("restore a step never saved", "POST", "/v1/restore", body({}, {"step": "7"}), {}, 404,
         ["'step'", "no complete checkpoint of PPO step 7"]),
        ("restore with a tensor", "POST", "/v1/restore", body({"x": torch.zeros(1)}, {"step": "1"}), {}, 400, ["'x'"]),
        # -- auth and routing --
        ("missing auth", "POST", "/v1/infer", infer_body(ok_tokens, ok_lengths), {"Authorization": None}, 401,
         ["Authorization"]),
        ("wrong token", "POST", "/v1/infer", infer_body(ok_tokens, ok_lengths), {"Authorization": "Bearer nope"}, 403,
         ["token"]),
        ("basic scheme", "POST", "/v1/infer", infer_body(ok_tokens, ok_lengths), {"Authorization": f"Basic {TOKEN}"},
         403, ["token"]),
        ("wrong token on save", "POST", "/v1/save", body({}, {"step": "0"}),
         {"Authorization": "Bearer nope", **key("s-auth")}, 403, ["token"]),
        ("unknown route", "POST", "/v1/delete", b"", {}, 404, ["/v1/delete", "/v1/infer"]),
        ("unknown version", "POST", "/v2/infer", infer_body(ok_tokens, ok_lengths), {}, 404, ["/v2/infer"]),
        ("path traversal route", "GET", "/v1/../../etc/passwd", None, {}, 404, ["/etc/passwd"]),
        ("wrong method on infer", "GET", "/v1/infer", None, {}, 405, ["GET", "/v1/infer"]),
        ("wrong method on health", "POST", "/health", b"", {}, 405, ["POST", "/health"]),
        ("wrong method on save", "PUT", "/v1/save", body({}, {"step": "0"}), key("s-put"), 405, ["PUT", "/v1/save"]),
    ]


def test_hostile_requests_get_4xx_naming_the_field_and_change_nothing(critic):
    cases = hostile_requests(critic["vocab"], critic["context"])
    assert len({case[0] for case in cases}) == len(cases) >= 40
    client, url = critic["client"], critic["url"]
    before = client.metrics()
    assert before["limits"] == {"max_request_bytes": MAX_REQUEST_BYTES, "max_sequence_length": critic["context"],
                                "max_tokens_per_request": MAX_TOKENS}
    checkpoints = critic["job"].log_dir / "checkpoints"
    saved_before = sorted(p.name for p in checkpoints.glob("*")) if checkpoints.exists() else []
    session = requests.Session()
    for name, method, route, data, headers, status, fragments in cases:
        all_headers = {k: v for k, v in {**AUTH, **headers}.items() if v is not None}
        response = session.request(method, url + route, data=data, headers=all_headers, timeout=60)
        assert response.status_code == status, (name, response.status_code, response.text[:300])
        assert response.headers["Content-Type"].startswith("application/json"), (name, response.headers)
        payload = response.json()
        assert payload["status"] == status, name
        for fragment in fragments:
            assert fragment in payload["error"], (name, fragment, payload["error"])
        # a healthy request right after: answered, and with exactly the values from before
        after = client.infer(critic["tokens"], critic["lengths"])
        for field in ("values", "rewards"):
            assert torch.equal(after[field], critic["baseline"][field]), (name, field)
    handler = client.metrics()["handler"]
    assert handler["trained_step"] == 0 and handler["applied_train_requests"] == 0
    assert handler["checkpoint_step"] == before["handler"]["checkpoint_step"]
    assert (sorted(p.name for p in checkpoints.glob("*")) if checkpoints.exists() else []) == saved_before
    statuses = {s for route in client.metrics()["requests"].values() for s in route}
    assert not any(s.startswith("5") for s in statuses), statuses


def test_saves_stay_in_the_server_directory_and_prune_only_its_own(critic, tmp_path):
    """save_top_k=1: the second save prunes the first; a foreign checkpoint, a link to a directory
    outside, and a stray step_* name in the same directory are left alone."""
    client, job = critic["client"], critic["job"]
    root = job.log_dir / "checkpoints"
    foreign = _fake_checkpoint(root / "step_0000090", {"algorithm": "rm", "step": 90})
    outside = _fake_checkpoint(tmp_path / "outside" / "step_0000001", {"critic_mode": "critic+rm", "step": 1})
    (root / "step_0000091").symlink_to(outside)
    (root / "step_draft").mkdir()
    first = Path(client.save(0, idempotency_key="save-0")["path"])
    assert first == root / "step_0000000" and (first / "COMPLETE").is_file()
    request = train_tensors(3, 10, tokens=critic["tokens"], lengths=critic["lengths"])
    assert client.train(request, "train-1", step=1)["critic_step"] == 1
    second = Path(client.save(1, idempotency_key="save-1")["path"])
    assert second == root / "step_0000001" and (second / "COMPLETE").is_file()
    assert not first.exists()  # pruned: it was this server's own
    assert foreign.is_dir() and (root / "step_0000091").is_symlink() and (root / "step_draft").is_dir()
    assert sorted(p.name for p in outside.iterdir()) == ["COMPLETE", "trainer_state.json", "weights"]
    with pytest.raises(CriticRequestError) as refused:
        client.save(5, idempotency_key="save-5")
    assert refused.value.status == 409 and not (root / "step_0000005").exists()


def test_sigkill_right_after_a_save_leaves_no_process_behind(critic):
    """The checkpoint writer (megatron's dist-checkpointing) forks; nothing the server started
    may outlive a SIGKILL of the server by more than a few seconds."""
    client, job = critic["client"], critic["job"]
    step = client.metrics()["handler"]["trained_step"]
    client.save(step, idempotency_key=f"save-before-kill-{step}")
    server = psutil.Process(job.proc.pid)
    started = server.children(recursive=True)
    print(f"{len(started)} child process(es) of the server before the SIGKILL")
    port = client.port
    os.kill(job.proc.pid, signal.SIGKILL)
    job.proc.wait(timeout=30)
    _, alive = psutil.wait_procs(started, timeout=5)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    orphans = [p for p in psutil.process_iter(["ppid", "cmdline"])
               if p.info["ppid"] == 1 and str(job.log_dir) in " ".join(p.info["cmdline"] or [])]
    assert not orphans, orphans
    deadline = time.monotonic() + 5
    while True:  # the port is free again: no child kept the listening socket
        try:
            with socket.create_server(("127.0.0.1", port)):
                break
        except OSError:
            assert time.monotonic() < deadline, f"port {port} still held after the SIGKILL"
            time.sleep(0.2)
    job.close()


def test_public_bind_without_token_refuses_to_start_before_loading_the_model(reward_model, tmp_path):  # noqa: F811
    env = {k: v for k, v in child_env().items() if k not in ("ALIGNER_CRITIC_TOKEN",)}
    args = [*critic_overrides(reward_model), "trainer.ppo.host=0.0.0.0", "trainer.ppo.port=0",
            f"exp_manager.explicit_log_dir={tmp_path / 'public'}"]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(SERVE_CRITIC), *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=str(tmp_path))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    for key in ("trainer.ppo.host=0.0.0.0", "trainer.ppo.auth_token", "ALIGNER_CRITIC_TOKEN",
                "trainer.ppo.allow_unauthenticated=true"):
        assert key in output, (key, output[-3000:])
    assert "server ready to start" not in output  # refused before the model was built
    assert not (tmp_path / "public" / "checkpoints").exists()
    print(f"refused in {time.monotonic() - started:.1f} s")
