"""Worker for the TP/DP parity tests (run under torchrun by test_parallel_parity.py).

modes:
  init   OUT          TP=1: build a tiny Llama, save a native checkpoint and reference logits
  logits CKPT REF     load CKPT at TP=world, compare gathered logits with REF (max abs diff printed)
  step   CKPT OUT     load CKPT at DP=world, one optimizer step on a fixed global batch, save weights
  policy CKPT OUT MICRO MODE
                      the same with the rollout engine's policy loss (clipped ratio, entropy bonus,
                      loss_agg_mode MODE) in micro-batches of MICRO rows on each rank
  train  CKPT OUT TP PP OPTIM STEPS [FIRST]
                      load CKPT (weights, and optimizer state when it has some) at TP x PP (DP = the
                      rest), STEPS optimizer steps on fixed global batches FIRST+1.. (SFT loss, through
                      megatron's pipeline schedule when PP > 1) with optimizer OPTIM (fused_adam |
                      distributed_fused_adam), save a native checkpoint of step FIRST+STEPS under OUT;
                      the last pipeline stage writes the per-step losses to OUT/losses.rank<R>
"""
import sys

import torch
from safetensors.torch import load_file, save_file

from aligner.distributed import setup as dist_setup
from aligner.models.config import ModelConfig
from aligner.models.gpt import build_gpt, position_ids_for, unwrap
from aligner.training import checkpoint
from aligner.training.optim import OptimSettings, build_optimizer, wrap_data_parallel
from aligner.training.step import split_micro_batches, train_step
from aligner.trainers.sft import SFTLoss

CONFIG = ModelConfig(arch="llama", vocab_size=128, hidden_size=64, ffn_hidden_size=128, num_layers=2,
                     num_attention_heads=4, num_query_groups=2, max_position_embeddings=64)
SETTINGS = OptimSettings.from_config({"lr": 1e-2, "weight_decay": 0.01, "sched": {"name": "Constant"}},
                                     max_steps=10, gradient_clip_val=1.0)
GLOBAL_BATCH, MICRO_BATCH, SEQ = 8, 2, 16


def fixed_tokens(n: int) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (n, SEQ), generator=torch.Generator().manual_seed(7))


def full_state(model) -> dict:
    return {k: v.detach().clone().float().contiguous() for k, v in unwrap(model).state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    if mode == "train":
        train_layouts(args)
        return
    tp = world if mode == "logits" else 1
    layout = dist_setup.initialize(tp, 1, seed=11)
    model = build_gpt(CONFIG, torch.float32, tensor_parallel=tp)
    if mode == "init":
        ddp = wrap_data_parallel(model, SETTINGS)
        optimizer, scheduler = build_optimizer(ddp, SETTINGS, torch.float32)
        checkpoint.save(args[0], 0, ddp, optimizer, {"model_config": CONFIG.to_dict()})
        tokens = fixed_tokens(4)
        with torch.no_grad():
            logits = model(tokens, position_ids_for(tokens), None, runtime_gather_output=True)
        save_file({"tokens": tokens, "logits": logits.contiguous()}, args[0] + "/reference.safetensors")
        save_file(full_state(model), args[0] + "/initial.safetensors")
    elif mode == "logits":
        checkpoint.load_weights_only(args[0], model)
        ref = load_file(args[1])
        with torch.no_grad():
            logits = model(ref["tokens"], position_ids_for(ref["tokens"]), None, runtime_gather_output=True)
        diff = (logits - ref["logits"]).abs().max().item()
        print(f"rank {layout.rank} tp={tp} max_abs_logit_diff={diff:.3e}", flush=True)
        assert diff < 1e-5, diff
    elif mode == "step":
        ddp = wrap_data_parallel(model, SETTINGS)
        optimizer, scheduler = build_optimizer(ddp, SETTINGS, torch.float32)
        checkpoint.load(args[0], ddp, optimizer, load_rng=False)
        tokens = fixed_tokens(GLOBAL_BATCH)
        labels = torch.roll(tokens, -1, dims=1)
        mask = torch.ones_like(tokens, dtype=torch.float32)
        mask[:, -1] = 0
        mask[::3, :5] = 0  # uneven token counts per sample: exercises the global token normalisation
        per_rank = GLOBAL_BATCH // layout.data_parallel
        rows = slice(layout.dp_rank * per_rank, (layout.dp_rank + 1) * per_rank)
        batch = {"tokens": tokens[rows], "labels": labels[rows], "loss_mask": mask[rows]}
        metrics = train_step(ddp, optimizer, scheduler, SFTLoss(), split_micro_batches(batch, MICRO_BATCH))
        print(f"rank {layout.rank} dp={layout.data_parallel} loss={metrics['loss']:.8f}", flush=True)
        with open(f"{args[1]}.rank{layout.rank}.loss", "w") as handle:  # stdout of ranks interleaves
            handle.write(repr(metrics["loss"]))
        if layout.rank == 0:
            save_file(full_state(ddp), args[1])
    elif mode == "policy":
        from aligner.rollout.engine import PolicyLoss, UpdateSettings

        ddp = wrap_data_parallel(model, SETTINGS)
        optimizer, scheduler = build_optimizer(ddp, SETTINGS, torch.float32)
        checkpoint.load(args[0], ddp, optimizer, load_rng=False)
        gen = torch.Generator().manual_seed(3)
        tokens = fixed_tokens(GLOBAL_BATCH)
        mask = torch.zeros(GLOBAL_BATCH, SEQ)
        for row, (start, stop) in enumerate([(3, 15), (5, 9), (2, 15), (7, 8), (4, 12), (3, 4), (6, 15), (2, 10)]):
            mask[row, start:stop] = 1  # responses of very different lengths: normalisation matters
        batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, dims=1), "policy_mask": mask,
                 "old_logprobs": -4.0 - torch.rand(GLOBAL_BATCH, SEQ, generator=gen),
                 "advantages": torch.randn(GLOBAL_BATCH, SEQ, generator=gen)}
        per_rank = GLOBAL_BATCH // layout.data_parallel
        rows = slice(layout.dp_rank * per_rank, (layout.dp_rank + 1) * per_rank)
        loss = PolicyLoss(UpdateSettings(epochs=1, mini_batch_size=GLOBAL_BATCH, micro_batch_size=int(args[2]),
                                         clip_ratio_low=0.2, clip_ratio_high=0.28, entropy_coef=0.01,
                                         loss_agg_mode=args[3]))
        train_step(ddp, optimizer, scheduler, loss,
                   split_micro_batches({k: v[rows] for k, v in batch.items()}, int(args[2])))
        # the gradients (summed over micro-batches and ranks, as the optimizer saw them) and the weights
        grads = {f"grad.{name}": p.main_grad.detach().float().clone() for name, p in ddp.named_parameters()}
        if layout.rank == 0:
            save_file({**full_state(ddp), **grads}, args[1])
    dist_setup.shutdown()


def sft_batch(step: int) -> dict:
    """The global batch of optimizer step `step` (different every step, uneven masks)."""
    tokens = torch.randint(0, CONFIG.vocab_size, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))
    mask = torch.ones_like(tokens, dtype=torch.float32)
    mask[:, -1] = 0
    mask[step % 3::3, :5] = 0
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, dims=1), "loss_mask": mask}


def train_layouts(args: list[str]) -> None:
    from megatron.core import parallel_state

    ckpt, out, tp, pp, optim_name, steps = args[0], args[1], int(args[2]), int(args[3]), args[4], int(args[5])
    first = int(args[6]) if len(args) > 6 else 0
    layout = dist_setup.initialize(tp, pp, seed=11)
    # lr 1e-3, eps 1e-6: Adam divides by sqrt(v) + eps, so for a weight whose gradient is ~0 a
    # different reduction order (TP all-reduce, pipeline stages) moves it by up to ~lr. At lr 1e-2,
    # eps 1e-8 a few dozen of 100k weights differed by up to 1e-4 while the moments agreed to 1e-7.
    settings = OptimSettings.from_config({"name": optim_name, "lr": 1e-3, "eps": 1e-6, "weight_decay": 0.01,
                                          "sched": {"name": "Constant"}}, max_steps=10, gradient_clip_val=1.0)
    ddp = wrap_data_parallel(build_gpt(CONFIG, torch.float32, tensor_parallel=tp, pipeline_parallel=pp), settings)
    optimizer, scheduler = build_optimizer(ddp, settings, torch.float32)
    checkpoint.load(ckpt, ddp, optimizer, load_rng=False)
    losses = []
    per_rank = GLOBAL_BATCH // layout.data_parallel
    rows = slice(layout.dp_rank * per_rank, (layout.dp_rank + 1) * per_rank)
    for step in range(first + 1, first + steps + 1):
        batch = {k: v[rows] for k, v in sft_batch(step).items()}
        metrics = train_step(ddp, optimizer, scheduler, SFTLoss(), split_micro_batches(batch, MICRO_BATCH))
        losses.append(metrics.get("loss"))
    checkpoint.save(out, first + steps, ddp, optimizer, {"model_config": CONFIG.to_dict()}, keep_last=None)
    if parallel_state.is_pipeline_last_stage():
        with open(f"{out}/losses.rank{layout.rank}", "w") as handle:
            handle.write(" ".join(repr(float(v)) for v in losses))
    print(f"rank {layout.rank} tp={tp} pp={pp} dp={layout.data_parallel} {optim_name} losses={losses}", flush=True)
    dist_setup.shutdown()


if __name__ == "__main__":
    main()
