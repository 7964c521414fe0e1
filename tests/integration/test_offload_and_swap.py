"""Adam-state offload is a bitwise-lossless round trip and leaves training unchanged; parked
weights swap in and out exactly."""
import pytest
import torch

from aligner.distributed import setup as dist_setup
from aligner.models.config import ModelConfig
from aligner.models.gpt import build_gpt, unwrap
from aligner.models.weight_swap import ParkedWeights
from aligner.trainers.sft import SFTLoss
from aligner.training.offload import OptimizerStateOffloader, torch_optimizers
from aligner.training.optim import OptimSettings, build_optimizer, wrap_data_parallel
from aligner.training.step import split_micro_batches, train_step

CONFIG = ModelConfig(arch="llama", vocab_size=96, hidden_size=32, ffn_hidden_size=64, num_layers=2,
                     num_attention_heads=2, max_position_embeddings=32)


@pytest.fixture(scope="module", autouse=True)
def distributed():
    dist_setup.initialize(1, 1, seed=5)
    yield


def _setup(dtype=torch.float32):
    dist_setup.seed_everything(5)
    model = build_gpt(CONFIG, dtype)
    settings = OptimSettings.from_config({"lr": 1e-2, "sched": {"name": "Constant"}}, max_steps=10,
                                         gradient_clip_val=1.0)
    ddp = wrap_data_parallel(model, settings)
    optimizer, scheduler = build_optimizer(ddp, settings, dtype)
    return ddp, optimizer, scheduler


def _batch(seed):
    tokens = torch.randint(0, CONFIG.vocab_size, (4, 12), generator=torch.Generator().manual_seed(seed))
    return split_micro_batches({"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
                                "loss_mask": torch.ones(4, 12)}, 2)


def _states(optimizer):
    return [{k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
            for opt in torch_optimizers(optimizer) for state in opt.state.values()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offload_round_trip_is_bitwise_and_training_is_unchanged(dtype):
    runs = {}
    for offload in (False, True):
        model, optimizer, scheduler = _setup(dtype)
        train_step(model, optimizer, scheduler, SFTLoss(), _batch(1))
        if offload:
            offloader = OptimizerStateOffloader(optimizer, "cpu")
            before = _states(optimizer)
            moved = offloader.offload()
            assert moved > 0
            live = [t for opt in torch_optimizers(optimizer) for s in opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor) and t.dim() > 0]
            assert live and all(t.numel() == 0 for t in live)  # storage really released
            offloader.restore()
            after = _states(optimizer)
            assert len(before) == len(after)
            for a, b in zip(before, after):
                for key in a:
                    assert torch.equal(a[key], b[key]), key
        losses = [train_step(model, optimizer, scheduler, SFTLoss(), _batch(s))["loss"] for s in (2, 3)]
        runs[offload] = (losses, {k: v.clone() for k, v in unwrap(model).state_dict().items()
                                  if isinstance(v, torch.Tensor)})
    assert runs[False][0] == runs[True][0]
    for key, value in runs[False][1].items():
        assert torch.equal(value, runs[True][1][key]), key


def test_parked_weights_swap_in_and_out_exactly():
    model, optimizer, scheduler = _setup()
    parked = ParkedWeights(model)
    initial = {k: v.detach().clone() for k, v in unwrap(model).named_parameters()}
    train_step(model, optimizer, scheduler, SFTLoss(), _batch(4))
    trained = {k: v.detach().clone() for k, v in unwrap(model).named_parameters()}
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    with parked.swapped_in(model):
        for k, v in unwrap(model).named_parameters():
            assert torch.equal(v, initial[k]), k
    for k, v in unwrap(model).named_parameters():
        assert torch.equal(v, trained[k]), k
    # the optimizer still steps the live (trained) weights: parameter identity was kept
    train_step(model, optimizer, scheduler, SFTLoss(), _batch(5))
    assert any(not torch.equal(v, trained[k]) for k, v in unwrap(model).named_parameters())
