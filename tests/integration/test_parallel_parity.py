"""TP=2 computes the same logits as TP=1; DP=2 makes the same update as one process.

Each case runs real separate processes under torchrun with gloo, starting from one native
checkpoint written at TP=1 (so loading also exercises resharding).
"""
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import check, mpirun_available, torchrun

WORKER = Path(__file__).with_name("parallel_worker.py")


@pytest.fixture(scope="module")
def initial_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parity") / "ckpt"
    check(torchrun(WORKER, ["init", out], nproc=1))
    return out / "step_0000000"


def test_tp2_logits_match_tp1(initial_checkpoint):
    out = check(torchrun(WORKER, ["logits", initial_checkpoint, initial_checkpoint.parent / "reference.safetensors"],
                         nproc=2))
    assert out.count("max_abs_logit_diff") == 2


def test_dp2_update_matches_single_process(initial_checkpoint, tmp_path):
    single, dual = tmp_path / "dp1.safetensors", tmp_path / "dp2.safetensors"
    check(torchrun(WORKER, ["step", initial_checkpoint, single], nproc=1))
    check(torchrun(WORKER, ["step", initial_checkpoint, dual], nproc=2))
    loss1 = float(Path(f"{single}.rank0.loss").read_text())
    losses2 = [float(Path(f"{dual}.rank{r}.loss").read_text()) for r in (0, 1)]
    assert len(losses2) == 2 and all(abs(l - loss1) < 1e-6 for l in losses2), (loss1, losses2)
    a, b = load_file(single), load_file(dual)
    initial = load_file(str(initial_checkpoint.parent / "initial.safetensors"))
    assert a.keys() == b.keys() == initial.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), (name, (a[name] - b[name]).abs().max())
    # the step really moved every weight (otherwise equality would prove nothing)
    moved = [name for name in a if not torch.equal(a[name], initial[name])]
    assert len(moved) == len(a), set(a) - set(moved)


@pytest.mark.skipif(not mpirun_available(), reason="mpirun not found: OpenMPI could not be installed here "
                    "(scripts/install.sh installs openmpi-bin where apt-get is usable as root)")
def test_mpirun_launch_gives_tp2_parity(initial_checkpoint):
    """A real 2-process run under OpenMPI's mpirun (installed by scripts/install.sh)."""
    import shutil
    import subprocess

    from aligner.distributed.launch_env import free_port
    from tests.launch import child_env

    mpirun = shutil.which("mpirun")
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [mpirun, "-n", "2", "--oversubscribe", "--allow-run-as-root", "-x", "MASTER_ADDR", "-x", "MASTER_PORT",
           "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", sys.executable, str(WORKER), "logits", str(initial_checkpoint),
           str(initial_checkpoint.parent / "reference.safetensors")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    out = check(proc)
    assert out.count("max_abs_logit_diff") == 2


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_policy_update_is_split_invariant(initial_checkpoint, tmp_path, mode):
    """The rollout engine's policy loss with loss_agg_mode normalised by the global count: one batch
    of 8 responses of very different lengths, as 1x8, 2x4 micro-batches and DP=2 x 4 rows, makes
    the same update to 1e-6 (fp32)."""
    layouts = {"1x8": (1, 8), "2x4": (1, 4), "dp2x4": (2, 4)}
    weights = {}
    for name, (nproc, micro) in layouts.items():
        out = tmp_path / f"{name}.safetensors"
        check(torchrun(WORKER, ["policy", initial_checkpoint, out, micro, mode], nproc=nproc))
        weights[name] = load_file(out)
    initial = load_file(str(initial_checkpoint.parent / "initial.safetensors"))
    reference = weights["1x8"]
    params = [k for k in reference if not k.startswith("grad.")]
    assert sum(not torch.equal(reference[k], initial[k]) for k in params) == len(params)  # every weight moved
    for name in ("2x4", "dp2x4"):
        for key in reference:
            diff = float((weights[name][key] - reference[key]).abs().max())
            # the gradient to 1e-6; the weights to 1e-5 because Adam's first step divides by |g|,
            # which magnifies rounding in the few near-zero gradient entries
            assert diff <= (1e-6 if key.startswith("grad.") else 1e-5), (name, key, diff)


# --------------------------------------------------------------------------------------------
# Training across layouts: 3 optimizer steps at TP=2, PP=2 and with the distributed optimizer
# at DP=2 give the weights and Adam moments of one process (1e-5), from the same checkpoint.
# --------------------------------------------------------------------------------------------

TRAIN_STEPS = 3


def _train(ckpt: Path, out: Path, nproc: int, tp: int, pp: int, optim: str, steps: int, first: int = 0) -> Path:
    check(torchrun(WORKER, ["train", ckpt, out, tp, pp, optim, steps, first], nproc=nproc))
    return out / f"step_{first + steps:07d}"


def _losses(out: Path) -> list[float]:
    files = sorted(out.glob("losses.rank*"))
    assert files, list(out.iterdir())
    values = [[float(v) for v in f.read_text().split()] for f in files]
    assert all(v == values[0] for v in values), values  # every last-stage rank reports the same
    return values[0]


def _tensors(step_dir: Path) -> dict:
    """Global weights and Adam moments by parameter name, whatever layout wrote them."""
    import re

    from tests.e2e.conftest import checkpoint_tensors

    return {re.sub(r"^chained_\d+\.", "", k): v for k, v in checkpoint_tensors(step_dir / "weights").items()
            if not k.endswith("_extra_state")}


def _assert_same(got: dict, want: dict, moments: bool = True) -> None:
    names = [k for k in want if moments or "optimizer" not in k]
    assert [k for k in names if "exp_avg" in k] or not moments, sorted(want)[:8]
    for name in names:
        assert name in got, (name, sorted(got)[:8])
        torch.testing.assert_close(got[name].float(), want[name].float(), atol=1e-5, rtol=0, msg=name)


@pytest.fixture(scope="module")
def one_process_training(initial_checkpoint, tmp_path_factory) -> tuple[list[float], dict]:
    out = tmp_path_factory.mktemp("train_tp1")
    step_dir = _train(initial_checkpoint, out, 1, 1, 1, "fused_adam", TRAIN_STEPS)
    return _losses(out), _tensors(step_dir)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_model_parallel_training_equals_one_process(initial_checkpoint, one_process_training, tmp_path, tp, pp):
    """TP=2 (megatron's all-reduces in every layer) and PP=2 (its pipeline schedule, activations
    and gradients sent between stages): the same losses and, after 3 optimizer steps, the same
    weights and Adam moments as one process, within 1e-5."""
    losses, want = one_process_training
    step_dir = _train(initial_checkpoint, tmp_path, 2, tp, pp, "fused_adam", TRAIN_STEPS)
    assert _losses(tmp_path) == pytest.approx(losses, abs=1e-5)
    got = _tensors(step_dir)
    _assert_same(got, want)
    initial = _tensors(initial_checkpoint)
    assert all(not torch.equal(got[k], initial[k]) for k in initial if "optimizer" not in k)  # all trained


def test_distributed_optimizer_at_dp2_trains_like_the_plain_one_and_resumes_at_any_dp(
        initial_checkpoint, one_process_training, tmp_path):
    """model.optim.name=distributed_fused_adam shards Adam's state over DP=2: two steps give the
    plain optimizer's losses and weights in one process. Its checkpoint of step 2 resumes at DP=1
    and at DP=2 (megatron's dp_reshardable format) and the third step continues identically:
    the one-process run's third loss and final weights, and the same Adam moments either way.
    Resuming it with the plain optimizer, or at another TP size, is refused before loading,
    naming the key."""
    losses, want = one_process_training
    sharded = _train(initial_checkpoint, tmp_path / "dp2", 2, 1, 1, "distributed_fused_adam", TRAIN_STEPS - 1)
    plain = _train(initial_checkpoint, tmp_path / "plain", 1, 1, 1, "fused_adam", TRAIN_STEPS - 1)
    assert _losses(tmp_path / "dp2") == pytest.approx(losses[:-1], abs=1e-5)
    _assert_same(_tensors(sharded), _tensors(plain), moments=False)
    resumed = {}
    for dp in (1, 2):
        out = tmp_path / f"resumed_dp{dp}"
        step_dir = _train(sharded, out, dp, 1, 1, "distributed_fused_adam", 1, first=TRAIN_STEPS - 1)
        assert _losses(out) == pytest.approx(losses[-1:], abs=1e-5)
        resumed[dp] = _tensors(step_dir)
        _assert_same(resumed[dp], want, moments=False)  # weights after the third step
    assert any("exp_avg" in k for k in resumed[1])
    for name in resumed[2]:  # weights, fp32 main params and both Adam moments, whatever DP wrote them
        torch.testing.assert_close(resumed[1][name], resumed[2][name], atol=1e-6, rtol=0, msg=name)
    refused = torchrun(WORKER, ["train", sharded, tmp_path / "plain_resume", 1, 1, "fused_adam", 1, 2], nproc=1)
    assert refused.returncode != 0
    assert "resumes only with model.optim.name=distributed_fused_adam (at any data-parallel size)" in \
        refused.stdout + refused.stderr
    # megatron reshards this state across data-parallel sizes only: another TP is refused by name
    refused = torchrun(WORKER, ["train", sharded, tmp_path / "tp2_resume", 2, 1, "distributed_fused_adam", 1, 2],
                       nproc=2)
    assert refused.returncode != 0
    assert "saved at model.tensor_model_parallel_size=1, model.pipeline_model_parallel_size=1" in \
        refused.stdout + refused.stderr
