"""A bf16 reward model / critic trains and checkpoints (its head computes in fp32)."""
import torch

from aligner.distributed import setup as dist_setup
from aligner.models.config import ModelConfig
from aligner.models.gpt import build_gpt
from aligner.trainers.reward_model import BradleyTerryLoss
from aligner.training import checkpoint
from aligner.training.optim import OptimSettings, build_optimizer, wrap_data_parallel
from aligner.training.step import train_step


def test_bf16_scalar_head_trains_and_saves(tmp_path):
    dist_setup.initialize(1, 1, seed=3)
    config = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, ffn_hidden_size=64, num_layers=1,
                         num_attention_heads=2, max_position_embeddings=32)
    model = build_gpt(config, torch.bfloat16, scalar_head=True)
    settings = OptimSettings.from_config({"lr": 1e-2, "sched": {"name": "Constant"}}, max_steps=5, gradient_clip_val=1.0)
    ddp = wrap_data_parallel(model, settings)
    optimizer, scheduler = build_optimizer(ddp, settings, torch.bfloat16)
    tokens = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "lengths": torch.tensor([10, 7, 9, 5])}
    before = model.output_layer.weight.detach().float().clone()
    metrics = train_step(ddp, optimizer, scheduler, BradleyTerryLoss(), [batch])
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert not torch.equal(before, model.output_layer.weight.detach().float())
    values = model(tokens, torch.arange(10).expand(4, 10), None)
    assert values.dtype == torch.float32
    saved = checkpoint.save(tmp_path / "ckpt", 1, ddp, optimizer, {"model_config": config.to_dict()})
    assert (saved / checkpoint.MARKER).is_file()
