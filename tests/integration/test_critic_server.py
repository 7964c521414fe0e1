"""The PPO critic + reward-model server as real processes, on a tiny reward model.

A tiny reward model is trained for two steps with train_reward_model.py (so its value head is
not zero). Then three servers start side by side: the combined critic+RM server as one process
and under torchrun with data parallelism 2, and the reward model alone (serve_reward_model.py)
under torchrun with tensor parallelism 2.
Their answers are checked against a float64 re-implementation of the Llama forward pass that
reads the RM's checkpoint files directly (no megatron), and against each other. At the end the
TP=2 job is stopped with SIGTERM (every rank exits 0) and the DP=2 job loses its rank 0 to
SIGKILL (every process of the job is gone within a bounded time). The follower watchdog is also
run on its own, in a two-rank gloo job without a model.
"""
from __future__ import annotations

import contextlib
import json
import re
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from aligner.distributed.launch_env import free_port
from aligner.serving.client import CriticClient, CriticRequestError
from aligner.serving.server import read_ready_file
from aligner.trainers.critic import (combine_step_metrics, mini_batch_slices, pad_rows,
                                     resolve_reward_standardization)
from aligner.training.config_check import ConfigError
from tests.launch import REPO, check, child_env

pytestmark = pytest.mark.timeout(420)

TRAIN_RM = REPO / "examples/nlp/gpt/train_reward_model.py"
SERVE_CRITIC = REPO / "examples/nlp/gpt/serve_ppo_critic.py"
SERVE_RM = REPO / "examples/nlp/gpt/serve_reward_model.py"
TINY = ["model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=2", "model.num_attention_heads=2",
        "model.num_query_groups=null", "model.encoder_seq_length=32", "model.micro_batch_size=2",
        "model.global_batch_size=4"]
CLIP = 0.2
SINGLE_TOKEN, DP2_TOKEN = "single-secret", "dp2-secret"
FOLLOWER_TIMEOUT_S = 8


# --------------------------------------------------------------------------------------------
# Pure helpers (no processes)
# --------------------------------------------------------------------------------------------


def test_mini_batch_slices_cover_rows_in_order():
    assert mini_batch_slices(7, 3) == [slice(0, 3), slice(3, 5), slice(5, 7)]
    assert mini_batch_slices(2, 4) == [slice(0, 1), slice(1, 2)]  # never an empty mini-batch
    assert mini_batch_slices(5, 1) == [slice(0, 5)]


def test_pad_rows_repeats_last_row_and_zeroes_mask():
    tensors = {"tokens": torch.tensor([[1, 2], [3, 4], [5, 6]]), "mask": torch.ones(3, 2)}
    padded = pad_rows(tensors, 2, zero_fields=("mask",))
    assert padded["tokens"].tolist() == [[1, 2], [3, 4], [5, 6], [5, 6]]
    assert padded["mask"].tolist() == [[1, 1], [1, 1], [1, 1], [0, 0]]
    assert pad_rows(tensors, 3)["tokens"].shape == (3, 2)


def test_reward_standardization_sources():
    stored = {"mean": 1.5, "std": 0.5}
    assert resolve_reward_standardization(False, 1.0, 2.0, stored) is None
    assert resolve_reward_standardization(True, 1.0, 2.0, stored) == (1.0, 2.0)
    assert resolve_reward_standardization(True, None, None, stored) == (1.5, 0.5)
    assert resolve_reward_standardization(True, 1.0, None, stored) == (1.5, 0.5)  # both or neither
    with pytest.raises(ConfigError, match="reward_standardization"):
        resolve_reward_standardization(True, None, None, None)
    with pytest.raises(ConfigError, match="std > 0"):
        resolve_reward_standardization(True, 0.0, 0.0, None)


def test_step_metrics_are_means_over_steps():
    steps = [{"value_loss": 1.0, "value_clip_fraction": 0.5, "grad_norm": 2.0, "lr": 0.1},
             {"value_loss": 3.0, "value_clip_fraction": 0.0, "grad_norm": 4.0, "lr": 0.05, "update_skipped": 1.0}]
    assert combine_step_metrics(steps) == {"value_loss": 2.0, "value_clip_fraction": 0.25, "grad_norm": 3.0,
                                           "lr": 0.05, "optimizer_steps": 2.0, "updates_skipped": 1.0}
    assert math.isnan(combine_step_metrics([])["value_loss"])


# --------------------------------------------------------------------------------------------
# A tiny reward model, and a float64 re-implementation of its forward pass
# --------------------------------------------------------------------------------------------

SENTENCES = ["the movie was great and I loved it", "the movie was terrible and boring", "what a wonderful film",
             "an awful waste of time", "great acting and a fine story", "bad plot and poor acting"]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> dict:
    from aligner.data.train_tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("critic_server")
    tokenizer = train_bpe_tokenizer(SENTENCES * 3, 300, root / "tok")
    data = root / "comparisons.jsonl"
    pairs = [("Review: ", "the movie was great", "the movie was bad"), ("Review: ", "a wonderful film", "an awful film")]
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs * 4))
    run_dir = root / "rm"
    # Two steps at a high learning rate without warmup: the head (zero at init) and the trunk move.
    args = [*TINY, "trainer.rm.max_steps=2", "trainer.rm.val_check_interval=0", "model.optim.lr=0.01",
            "model.optim.sched.warmup_steps=0", "pretrained_checkpoint.restore_from_path=null",
            f"model.tokenizer.model={root / 'tok'}", f"model.data.train_ds.file_path={data}",
            f"model.data.validation_ds.file_path={data}", f"exp_manager.explicit_log_dir={run_dir}",
            "exp_manager.create_tensorboard_logger=false", "exp_manager.create_csv_logger=false"]
    proc = subprocess.run([sys.executable, str(TRAIN_RM), *args], capture_output=True, text=True, timeout=300,
                          env=child_env(), cwd=str(root))
    check(proc)
    ckpt = run_dir / "checkpoints" / "step_0000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return {"root": root, "run_dir": run_dir, "checkpoint": ckpt, "state": state, "vocab": tokenizer.vocab_size}


@pytest.fixture(scope="module")
def rm_weights(reward_model) -> dict[str, torch.Tensor]:
    """The RM's model tensors, read from the torch-distributed checkpoint files."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = reward_model["root"] / "rm_weights.pt"
    dcp_to_torch_save(str(reward_model["checkpoint"] / "weights"), str(out))
    loaded = torch.load(out, weights_only=False)
    flat = loaded.get("model", loaded)
    return {k: v for k, v in flat.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer")}


def reference_head_outputs(weights: dict[str, torch.Tensor], config: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Llama (RMSNorm, RoPE, multi-head causal attention, SwiGLU) with a scalar head, in float64.

    tokens [B, S] -> head output at every position [B, S]. Per-layer tensors are stacked on a
    leading layer axis in the checkpoint; the fused QKV rows are grouped per KV group as
    [queries of the group, key, value].
    """
    w = {k: v.double() for k, v in weights.items()}
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    groups = config["num_query_groups"] or heads
    head_dim, eps = hidden // heads, config["norm_eps"]
    batch, seq = tokens.shape

    def rms_norm(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight

    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rotate(x):  # [B, h, S, d]
        first, second = x[..., : head_dim // 2], x[..., head_dim // 2:]
        return x * cos + torch.cat([-second, first], -1) * sin

    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    x = w["embedding.word_embeddings.weight"][tokens]
    per_group = heads // groups
    for layer in range(config["num_layers"]):
        lw = {k.removeprefix("decoder.layers."): v[layer] for k, v in w.items() if k.startswith("decoder.layers.")}
        h = rms_norm(x, lw["self_attention.linear_qkv.layer_norm_weight"])
        qkv = (h @ lw["self_attention.linear_qkv.weight"].T).view(batch, seq, groups, (per_group + 2) * head_dim)
        q = qkv[..., : per_group * head_dim].reshape(batch, seq, heads, head_dim)
        k = qkv[..., per_group * head_dim: (per_group + 1) * head_dim]
        v = qkv[..., (per_group + 1) * head_dim:]
        k, v = k.repeat_interleave(per_group, dim=2), v.repeat_interleave(per_group, dim=2)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        scores = rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(head_dim)
        attn = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
        x = x + attn.permute(0, 2, 1, 3).reshape(batch, seq, hidden) @ lw["self_attention.linear_proj.weight"].T
        h = rms_norm(x, lw["mlp.linear_fc1.layer_norm_weight"])
        gate, up = (h @ lw["mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ lw["mlp.linear_fc2.weight"].T
    x = rms_norm(x, w["decoder.final_layernorm.weight"])
    return (x @ w["output_layer.weight"].T)[..., 0]


# --------------------------------------------------------------------------------------------
# Server processes
# --------------------------------------------------------------------------------------------


class ServerProcess:
    """One server job (python, or torchrun for nproc > 1) with its log file and ready file."""

    def __init__(self, name: str, script: Path, root: Path, overrides: list[str], nproc: int = 1,
                 token: str | None = None, **env: str):
        self.name, self.nproc, self.token = name, nproc, token
        self.log_dir = root / name
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file = self.log_dir / "ready"
        self.log_path = self.log_dir / f"server-{time.monotonic_ns()}.log"
        loop = "rm_server" if script == SERVE_RM else "ppo"
        args = [f"trainer.{loop}.port=0", f"trainer.{loop}.ready_file={self.ready_file}",
                f"exp_manager.explicit_log_dir={self.log_dir}", *overrides]
        if nproc == 1:
            cmd = [sys.executable, str(script), *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   f"--master_port={free_port()}", str(script), *args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=child_env(**env),
                                     cwd=str(root))
        self.client: CriticClient | None = None

    def log_tail(self, chars: int = 5000) -> str:
        self._log.flush()
        return self.log_path.read_text()[-chars:]

    def wait_ready(self, timeout_s: float = 300) -> CriticClient:
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode} before serving:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} wrote no ready file within {timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.2)
        host, port = read_ready_file(str(self.ready_file))
        self.client = CriticClient(host, port, token=self.token, total_timeout_s=120, request_timeout_s=120)
        self.client.wait_until_ready(60)
        return self.client

    def rank0_pid(self) -> int:
        """The process that serves HTTP: the job itself, or torchrun's child with RANK=0."""
        if self.nproc == 1:
            return self.proc.pid
        children = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            children += (task / "children").read_text().split()
        for child in children:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if b"RANK=0" in environ:
                return int(child)
        raise AssertionError(f"no RANK=0 child of torchrun {self.proc.pid}: {children}")

    def terminate(self, timeout_s: float = 90) -> int:
        """SIGTERM to the rank that serves HTTP; the exit code of the whole job."""
        os.kill(self.rank0_pid(), signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not exit within {timeout_s} s of SIGTERM:\n{self.log_tail()}")
        self.close()
        return code

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.close()


def critic_overrides(reward_model: dict) -> list[str]:
    return [f"pretrained_checkpoint.restore_from_path={reward_model['run_dir']}", "model.micro_batch_size=2",
            "trainer.ppo.inference_micro_batch_size=3", "model.optim.sched.warmup_steps=0",
            "exp_manager.create_tensorboard_logger=false", f"model.loss_clip_val={CLIP}"]


def sample_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """5 rows (not a multiple of the micro-batch size 3, nor of DP=2), lengths from 1 to S."""
    tokens = torch.randint(0, vocab, (5, 12), generator=torch.Generator().manual_seed(0))
    return tokens, torch.tensor([12, 1, 7, 3, 10])


@pytest.fixture(scope="module")
def servers(reward_model):
    """Start all three jobs at once (their start-up overlaps) and record each one's first
    answers before any test trains it."""
    root = reward_model["root"]
    jobs = {
        "single": ServerProcess("single", SERVE_CRITIC, root,
                                [*critic_overrides(reward_model), f"trainer.ppo.auth_token={SINGLE_TOKEN}"],
                                token=SINGLE_TOKEN),
        # token only from the environment; a short follower watchdog for the SIGKILL test
        "dp2": ServerProcess("dp2", SERVE_CRITIC, root, critic_overrides(reward_model), nproc=2, token=DP2_TOKEN,
                             ALIGNER_CRITIC_TOKEN=DP2_TOKEN, ALIGNER_FOLLOWER_TIMEOUT_S=str(FOLLOWER_TIMEOUT_S)),
        # Adam's moments in host memory between train requests (model.offload_adam_states)
        "offload": ServerProcess("offload", SERVE_CRITIC, root,
                                 [*critic_overrides(reward_model), "model.offload_adam_states=true"]),
        # tensor parallelism 2: both ranks compute halves of every layer on the same rows
        "rm": ServerProcess("rm", SERVE_RM, root, [f"pretrained_checkpoint.restore_from_path={reward_model['run_dir']}",
                                                   "trainer.rm_server.inference_micro_batch_size=2",
                                                   "model.tensor_model_parallel_size=2"], nproc=2),
    }
    try:
        tokens, lengths = sample_batch(reward_model["vocab"])
        initial = {name: job.wait_ready().infer(tokens, lengths) for name, job in jobs.items()}
        yield {"jobs": jobs, "initial": initial, "tokens": tokens, "lengths": lengths}
    finally:
        for job in jobs.values():
            job.kill()


def values_mask(lengths: torch.Tensor, seq: int) -> torch.Tensor:
    return torch.arange(seq)[None, :] < lengths[:, None]


# --------------------------------------------------------------------------------------------
# Tests against the running servers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["single", "dp2"])
def test_infer_matches_float64_reference(servers, reward_model, rm_weights, name):
    tokens, lengths = servers["tokens"], servers["lengths"]
    out = servers["initial"][name]
    config, stats = reward_model["state"]["model_config"], reward_model["state"]["reward_standardization"]
    reference = reference_head_outputs(rm_weights, config, tokens)
    inside = values_mask(lengths, tokens.shape[1])

    assert out["values"].shape == tokens.shape and out["values"].dtype == torch.float32
    assert torch.all(out["values"][~inside] == 0)
    # Before any training the critic is the reward model: its values are the RM head's outputs.
    assert reference[inside].abs().max() > 1e-2  # a non-trivial model, or the comparison proves little
    torch.testing.assert_close(out["values"][inside].double(), reference[inside], atol=2e-5, rtol=1e-4)
    raw_rewards = reference[torch.arange(5), lengths - 1]
    expected = (raw_rewards - stats["mean"]) / stats["std"]
    torch.testing.assert_close(out["rewards"].double(), expected, atol=5e-4, rtol=1e-4)


def test_reward_model_server_alone(servers, reward_model, rm_weights):
    job = servers["jobs"]["rm"]
    out = servers["initial"]["rm"]
    assert torch.all(out["values"] == 0) and out["values"].shape == servers["tokens"].shape
    torch.testing.assert_close(out["rewards"], servers["initial"]["single"]["rewards"], atol=1e-5, rtol=1e-5)
    # any batch size: 1 row, and 7 rows with micro-batches of 2
    tokens = torch.randint(0, reward_model["vocab"], (7, 9), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([9, 1, 4, 9, 2, 6, 5])
    stats = reward_model["state"]["reward_standardization"]
    raw = reference_head_outputs(rm_weights, reward_model["state"]["model_config"], tokens)[torch.arange(7), lengths - 1]
    for rows in (slice(0, 1), slice(0, 7)):
        got = job.client.infer(tokens[rows], lengths[rows])["rewards"]
        torch.testing.assert_close(got.double(), ((raw - stats["mean"]) / stats["std"])[rows], atol=5e-4, rtol=1e-4)
    with pytest.raises(CriticRequestError, match="reward-model-only"):
        job.client.train({"tokens": tokens, "lengths": lengths, "returns": torch.zeros(7, 9),
                          "prev_values": torch.zeros(7, 9), "mask": torch.ones(7, 9)}, "rm-train")


@pytest.mark.parametrize("name", ["single", "dp2"])
def test_auth_token_required(servers, name):
    """single: token from trainer.ppo.auth_token; dp2: only from ALIGNER_CRITIC_TOKEN."""
    client = servers["jobs"][name].client
    for token, status in ((None, 401), ("not-the-token", 403)):
        other = CriticClient(client.host, client.port, token=token, total_timeout_s=5)
        try:
            with pytest.raises(CriticRequestError) as info:
                other.infer(servers["tokens"], servers["lengths"])
            assert info.value.status == status
        finally:
            other.close()
    assert client.infer(servers["tokens"], servers["lengths"])["values"].shape == servers["tokens"].shape


def _train_request(servers, rm_weights, reward_model):
    tokens, lengths = servers["tokens"], servers["lengths"]
    seq = tokens.shape[1]
    values0 = reference_head_outputs(rm_weights, reward_model["state"]["model_config"], tokens)
    returns = torch.randn(5, seq, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # rollout-time values 0.5 away on even positions: value clipping is active exactly there
    offset = torch.zeros(seq, dtype=torch.float64)
    offset[::2] = 0.5
    prev = values0 + offset
    mask = (torch.arange(seq) >= 2).double().expand(5, seq).clone()
    mask[0, -1] = 0
    request = {"tokens": tokens, "lengths": lengths, "returns": returns.float(), "prev_values": prev.float(),
               "mask": mask.float()}
    # float64 reference of the first step's loss (before its update the critic is the RM)
    counted = (mask != 0) & values_mask(lengths, seq)
    clipped = prev + (values0 - prev).clamp(-CLIP, CLIP)
    per_token = 0.5 * torch.maximum((values0 - returns) ** 2, (clipped - returns) ** 2)
    expected = {"value_loss": float(per_token[counted].mean()),
                "value_clip_fraction": float(((values0 - prev).abs() > CLIP)[counted].double().mean())}
    return request, expected


def test_train_lowers_value_loss_and_dp2_matches_single_process(servers, rm_weights, reward_model):
    single, dp2 = servers["jobs"]["single"].client, servers["jobs"]["dp2"].client
    request, expected = _train_request(servers, rm_weights, reward_model)
    before = single.metrics()["handler"]["applied_train_requests"]
    history = {"single": [], "dp2": []}
    for i in range(3):
        history["single"].append(single.train(request, f"lower-{i}"))
        history["dp2"].append(dp2.train(request, f"lower-{i}"))

    first = history["single"][0]
    assert first["value_loss"] == pytest.approx(expected["value_loss"], rel=1e-4)
    assert 0 < expected["value_clip_fraction"] < 1
    assert first["value_clip_fraction"] == pytest.approx(expected["value_clip_fraction"], abs=1e-9)
    losses = [m["value_loss"] for m in history["single"]]
    assert losses[0] > losses[1] > losses[2], losses
    assert [m["critic_step"] for m in history["single"]] == [before + 1, before + 2, before + 3]
    # DP=2 splits 5 rows 3+2 (plus a padding row) and normalises over all masked tokens globally:
    # the same losses, gradients and learning rates as one process
    for a, b in zip(history["single"], history["dp2"]):
        for key in ("value_loss", "value_clip_fraction", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-7), (key, a, b)
        assert a["optimizer_steps"] == b["optimizer_steps"] == 1

    tokens, lengths = servers["tokens"], servers["lengths"]
    after = {name: servers["jobs"][name].client.infer(tokens, lengths) for name in ("single", "dp2")}
    torch.testing.assert_close(after["dp2"]["values"], after["single"]["values"], atol=1e-5, rtol=1e-4)
    moved = (after["single"]["values"] - servers["initial"]["single"]["values"]).abs().max()
    assert moved > 1e-3
    # the reward model's weights are parked, not trained
    for name in ("single", "dp2"):
        torch.testing.assert_close(after[name]["rewards"], servers["initial"][name]["rewards"], atol=1e-6, rtol=0)


def test_offloaded_adam_states_train_bitwise_like_resident_ones(servers, rm_weights, reward_model, tmp_path):
    """model.offload_adam_states=true: between train requests the critic's Adam moments are in
    host memory (the optimizer's own tensors are emptied), and training is bitwise unchanged:
    the same three updates give identical metrics and identical values afterwards as a server
    that keeps them resident (both started from the same RM, trained by nothing else)."""
    from tests.e2e.conftest import checkpoint_tensors

    single, offload = servers["jobs"]["single"], servers["jobs"]["offload"]
    request, _ = _train_request(servers, rm_weights, reward_model)
    fresh = ServerProcess("resident", SERVE_CRITIC, reward_model["root"], critic_overrides(reward_model))
    try:
        resident = fresh.wait_ready()
        assert offload.client.metrics()["handler"]["adam_states_offloaded"] is True
        for i in range(3):
            a = resident.train(request, f"offload-{i}")
            b = offload.client.train(request, f"offload-{i}")
            assert a == b, (i, a, b)  # bitwise: every float of the metrics
            assert offload.client.metrics()["handler"]["adam_states_offloaded"] is True
            assert resident.metrics()["handler"]["adam_states_offloaded"] is False
        tokens, lengths = servers["tokens"], servers["lengths"]
        assert torch.equal(resident.infer(tokens, lengths)["values"], offload.client.infer(tokens, lengths)["values"])
        saved = {name: Path(client.save(3, idempotency_key=f"offload-save-{name}")["path"])
                 for name, client in (("resident", resident), ("offload", offload.client))}
    finally:
        fresh.kill()
    got, want = checkpoint_tensors(saved["offload"] / "weights"), checkpoint_tensors(saved["resident"] / "weights")
    moments = [k for k in want if "exp_avg" in k]
    assert moments and got.keys() == want.keys()
    for name in want:  # weights and Adam moments, bit for bit, though the moments spent the gaps on the host
        assert torch.equal(got[name], want[name]), name
    assert single.client.metrics()["handler"]["adam_states_offloaded"] is False


def test_replayed_key_does_not_train_again(servers, rm_weights, reward_model):
    client = servers["jobs"]["single"].client
    request, _ = _train_request(servers, rm_weights, reward_model)
    first = client.train(request, "replay-me")
    count = client.metrics()["handler"]["applied_train_requests"]
    values = client.infer(servers["tokens"], servers["lengths"])["values"]
    again = client.train(request, "replay-me")
    assert again == first
    assert client.metrics()["handler"]["applied_train_requests"] == count
    torch.testing.assert_close(client.infer(servers["tokens"], servers["lengths"])["values"], values, atol=0, rtol=0)


def test_sequenced_train_refuses_out_of_order_steps(servers, rm_weights, reward_model):
    """A train request naming its PPO step is applied only on a state at the step before; a gap
    or a step already passed is refused with 409 (naming where the critic is) and changes nothing."""
    client = servers["jobs"]["single"].client
    request, _ = _train_request(servers, rm_weights, reward_model)
    at = client.metrics()["handler"]["trained_step"]
    values = client.infer(servers["tokens"], servers["lengths"])["values"]
    for wrong in (at + 2, at):
        with pytest.raises(CriticRequestError) as refused:
            client.train(request, f"seq-{wrong}", step=wrong)
        assert refused.value.status == 409 and f"critic_step={at}" in str(refused.value)
    assert client.metrics()["handler"]["trained_step"] == at
    torch.testing.assert_close(client.infer(servers["tokens"], servers["lengths"])["values"], values, atol=0, rtol=0)
    assert client.train(request, f"seq-{at + 1}", step=at + 1)["critic_step"] == at + 1
    assert client.metrics()["handler"]["trained_step"] == at + 1


def test_save_restart_resume_exactly_once(servers, rm_weights, reward_model):
    """Save at the PPO step the state has reached (another label is refused with 409 and writes
    nothing), apply one more request, SIGTERM (exit 0), restart from the checkpoint: the state
    is the checkpoint's, a key applied before it is not re-applied, one applied after it is, and
    the rewards still come from the reward model (parked before the resume)."""
    job = servers["jobs"]["single"]
    client = job.client
    request, _ = _train_request(servers, rm_weights, reward_model)
    tokens, lengths = servers["tokens"], servers["lengths"]
    before_save = client.train(request, "before-save")
    saved_count = client.metrics()["handler"]["applied_train_requests"]
    saved_values = client.infer(tokens, lengths)["values"]

    step = client.metrics()["handler"]["trained_step"]
    for wrong in (step + 1, step - 1):  # a label the state has not reached, or has passed
        with pytest.raises(CriticRequestError) as refused:
            client.save(wrong)
        assert refused.value.status == 409 and f"critic_step={step}" in str(refused.value)
        assert not list(job.log_dir.glob(f"checkpoints/step_{wrong:07d}*"))
    result = client.save(step)
    path = Path(result["path"])
    assert result["step"] == step and path.name == f"step_{step:07d}" and (path / "COMPLETE").is_file()
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["ppo_step"] == step == state["trained_step"] and state["step"] == step
    assert state["scalar_head"] is True
    assert state["applied_train_requests"] == saved_count
    assert "before-save" in state["idempotency_keys"] and state["has_optimizer_state"]
    assert client.metrics()["handler"]["checkpoint_step"] == step

    client.train(request, "after-save")
    assert job.terminate() == 0
    assert not job.ready_file.exists()

    restarted = ServerProcess("single", SERVE_CRITIC, reward_model["root"],
                              [*critic_overrides(reward_model), f"trainer.ppo.auth_token={SINGLE_TOKEN}"],
                              token=SINGLE_TOKEN)
    servers["jobs"]["single"] = restarted  # the fixture's teardown kills it if a check fails
    client = restarted.wait_ready()
    handler = client.metrics()["handler"]
    assert handler["checkpoint_step"] == step and handler["applied_train_requests"] == saved_count
    out = client.infer(tokens, lengths)
    torch.testing.assert_close(out["values"], saved_values, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["rewards"], servers["initial"]["single"]["rewards"], atol=1e-6, rtol=0)

    replay = client.train(request, "before-save")
    assert replay == {**before_save, "replayed": 1.0}
    assert client.metrics()["handler"]["applied_train_requests"] == saved_count
    client.train(request, "after-save")  # its first application died with the old process
    assert client.metrics()["handler"]["applied_train_requests"] == saved_count + 1
    assert restarted.terminate() == 0


def test_sigterm_stops_all_ranks_with_exit_code_zero(servers):
    job = servers["jobs"]["rm"]  # TP=2: the same STOP path as any multi-rank job
    assert job.client.metrics()["handler"]["world_size"] == 2
    assert job.terminate() == 0, job.log_tail()
    assert "critic server stopping (SIGTERM)" in job.log_path.read_text()
    assert not job.ready_file.exists()


def test_sigkill_of_rank0_ends_every_process_of_the_dp2_job(servers):
    """Rank 0 dies without a word (SIGKILL): the follower must not wait in its broadcast for the
    process group's 30-minute timeout, and no process of the job may be left behind. torchrun
    would SIGKILL a follower that ignores its SIGTERM only after its own grace period (30 s);
    the bound here is below that, so the follower left by itself (gloo's closed connection or
    the watchdog, whichever comes first)."""
    job = servers["jobs"]["dp2"]
    client = job.client
    assert client.metrics()["handler"]["world_size"] == 2
    client.save(client.metrics()["handler"]["trained_step"], idempotency_key="dp2-save-before-kill")
    launcher = psutil.Process(job.proc.pid)
    processes = launcher.children(recursive=True)
    rank0 = job.rank0_pid()
    assert len(processes) >= 2 and rank0 in {p.pid for p in processes}
    started = time.monotonic()
    os.kill(rank0, signal.SIGKILL)
    _, alive = psutil.wait_procs(processes, timeout=FOLLOWER_TIMEOUT_S + 12)
    elapsed = time.monotonic() - started
    assert not alive, ([(p.pid, p.cmdline()) for p in alive], job.log_tail())
    assert elapsed < FOLLOWER_TIMEOUT_S + 12, elapsed
    assert job.proc.wait(timeout=60) != 0
    print(f"every rank gone {elapsed:.1f} s after the SIGKILL of rank 0")
    job.close()


WATCHDOG_WORKER = """
import logging, os, sys, time
import torch, torch.distributed as dist
from aligner.trainers import critic_server as cs

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
dist.init_process_group("gloo")
rank = dist.get_rank()
store = cs._default_store()
parent = cs.ParentWatch.if_launched_by_torchrun()
if rank == 0:
    beat = cs.Heartbeat(store)
else:
    watchdog = cs.FollowerWatchdog(store, rank, timeout_s=float(os.environ["TIMEOUT"]))
dist.barrier()
print(f"rank {rank} pid {os.getpid()} ready", flush=True)
if rank == 0:
    time.sleep(600)  # the test freezes or kills this rank, or the launcher
else:
    dist.broadcast(torch.zeros(1), src=0)  # never sent: only a watchdog ends this wait
"""


def _watchdog_job(tmp_path, timeout_s: float):
    script = tmp_path / "watchdog_worker.py"
    script.write_text(WATCHDOG_WORKER)
    log = open(tmp_path / "watchdog.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", str(script)], stdout=log, stderr=subprocess.STDOUT,
                            env=child_env(TIMEOUT=str(timeout_s)), cwd=str(REPO))
    deadline = time.monotonic() + 120
    pids = {}
    while len(pids) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "watchdog.log").read_text()
        # the two ranks write to one log: their lines may interleave, so match anywhere in the text
        for rank, pid in re.findall(r"rank (\d+) pid (\d+) ready", (tmp_path / "watchdog.log").read_text()):
            pids[int(rank)] = int(pid)
        time.sleep(0.2)
    return proc, log, pids


def test_follower_watchdog_exits_when_rank0_stops_beating(tmp_path):
    """Rank 0 frozen (SIGSTOP: its connections stay open, so no collective fails): the follower's
    watchdog sees the heartbeat in torchrun's store stop moving and exits with its own code."""
    from aligner.trainers.critic_server import WATCHDOG_EXIT_CODE

    proc, log, pids = _watchdog_job(tmp_path, timeout_s=3)
    try:
        follower = psutil.Process(pids[1])
        time.sleep(4)  # beating: the watchdog must not fire while rank 0 is alive
        assert follower.is_running() and follower.status() != psutil.STATUS_ZOMBIE
        started = time.monotonic()
        os.kill(pids[0], signal.SIGSTOP)
        psutil.wait_procs([follower], timeout=15)
        elapsed = time.monotonic() - started
        assert not follower.is_running() or follower.status() == psutil.STATUS_ZOMBIE
        assert 2 < elapsed < 12, elapsed
        os.kill(pids[0], signal.SIGKILL)
        proc.wait(timeout=60)
        text = (tmp_path / "watchdog.log").read_text()
        assert "rank 1: rank 0 of the critic job is gone (rank 0's heartbeat has not moved" in text, text[-3000:]
        assert f"exitcode  : {WATCHDOG_EXIT_CODE}" in text or f"exit code {WATCHDOG_EXIT_CODE}" in text, text[-3000:]
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_every_rank_exits_when_torchrun_itself_is_killed(tmp_path):
    """SIGKILL of the launcher: rank 0 (parent watch) and the follower (parent watch, or its
    watchdog finding the agent's store gone) leave within seconds instead of serving forever."""
    proc, log, pids = _watchdog_job(tmp_path, timeout_s=30)
    try:
        ranks = [psutil.Process(pid) for pid in pids.values()]
        started = time.monotonic()
        proc.kill()
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(ranks, timeout=10)
        assert not alive, (tmp_path / "watchdog.log").read_text()[-3000:]
        print(f"both ranks gone {time.monotonic() - started:.1f} s after the launcher's SIGKILL")
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
